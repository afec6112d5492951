//! Control-plane fan-out: on a large registry, many filters long-polling the changes and many
//! Envoys on ADS streams at once. Timed: from one change's create returning to the last
//! subscriber of each kind receiving it; measured: the control plane's resident memory before
//! and with them all connected.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinSet;
use zklb_tests::stack::ControlPlane;
use zklb_wire::ServiceChanges;

use crate::ads_client;
use crate::registration;
use crate::scale;
use crate::startup;
use zklb_tests::procfs;

const ROOT: &str = "/fan-out";
/// Ports of the changes' new instances: the `j`-th change registers port `PROBE_PORT + j`, which
/// no other instance has, so a subscriber knows it by its port.
const PROBE_PORT: u16 = 40_000;
/// How long every subscriber may take to receive one change.
const CHANGE_LIMIT: Duration = Duration::from_secs(30);
/// How long the ADS streams may take to receive the whole registry.
const CONNECT_LIMIT: Duration = Duration::from_secs(120);
/// How long the control plane may take to settle after the subscribers' first load.
const IDLE_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Settings {
    pub services: usize,
    pub per_service: usize,
    /// Clients long-polling `/v1/changes`, as the filter's poller does.
    pub pollers: usize,
    /// ADS streams, each as one Envoy's.
    pub ads_streams: usize,
    pub changes: usize,
}

/// The kinds of subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Poller,
    Ads,
}

#[derive(Debug, Clone)]
pub struct Results {
    pub instances: usize,
    pub populate_ms: f64,
    /// Resident memory with no subscriber, and with all of them connected and up to date.
    pub resident_idle_mib: f64,
    pub resident_connected_mib: f64,
    /// From the ADS streams' start until every one of them held every service's members.
    pub ads_connect_ms: Option<f64>,
    /// Per change: create returned → the last poller, and the last ADS stream, receiving it;
    /// `None` when one of them had not within the time limit.
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, Default)]
pub struct Change {
    pub last_poller_ms: Option<f64>,
    pub last_ads_ms: Option<f64>,
}

/// When each subscriber first received each probe port, and how many services each ADS stream
/// holds the members of.
#[derive(Default)]
struct Seen {
    probes: HashMap<(Kind, usize, u16), Instant>,
    ads_services: HashMap<usize, std::collections::HashSet<String>>,
}

type Shared = Arc<Mutex<Seen>>;

fn lock(seen: &Shared) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub async fn measure(dir: &Path, settings: &Settings) -> anyhow::Result<Results> {
    let dir = dir.join("fan-out");
    std::fs::create_dir_all(&dir)?;
    let zookeeper = startup::zookeeper(&dir).await?;
    let registrar = zookeeper.client().await;
    let instances = settings.services * settings.per_service;
    let started = Instant::now();
    registration::register_bulk(&registrar, ROOT, settings.services, settings.per_service).await?;
    let populate_ms = started.elapsed().as_secs_f64() * 1000.0;
    println!("fan-out: {instances} instances registered in {populate_ms:.0} ms");
    let control_plane = ControlPlane::start(&zookeeper, ROOT, &dir).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(settings.pollers)
        .build()?;
    scale::wait_for_all(&http, &control_plane, instances)
        .await
        .context("the control plane never listed every instance")?;
    let resident_idle_mib = procfs::resident_kib(control_plane.pid())? as f64 / 1024.0;

    let seen = Shared::default();
    let mut subscribers = JoinSet::new();
    let (version_set, _) = scale::list(&http, &control_plane).await?;
    for poller in 0..settings.pollers {
        let (http, seen) = (http.clone(), seen.clone());
        let url = control_plane.url.clone();
        subscribers.spawn(poll(http, url, version_set.version, poller, seen));
    }
    let ads_started = Instant::now();
    for stream in 0..settings.ads_streams {
        let seen = seen.clone();
        let url = control_plane.url.clone();
        subscribers.spawn(async move {
            let node = format!("bench-fan-out-{stream}");
            let result = ads_client::follow(&url, &node, |cluster, assignment| {
                record_assignment(&seen, stream, cluster, assignment)
            })
            .await;
            if let Err(error) = result {
                eprintln!("fan-out: ADS stream {stream}: {error:#}");
            }
        });
    }
    let ads_connect_ms = wait_until(CONNECT_LIMIT, || {
        let seen = lock(&seen);
        (0..settings.ads_streams).all(|stream| {
            seen.ads_services
                .get(&stream)
                .is_some_and(|services| services.len() >= settings.services)
        })
    })
    .await
    .then(|| ads_started.elapsed().as_secs_f64() * 1000.0);
    println!(
        "fan-out: {} ADS streams hold every service's members after {}",
        settings.ads_streams,
        ads_connect_ms.map_or("never".to_string(), |ms| format!("{ms:.0} ms"))
    );

    // Changes meet a control plane that is done with the subscribers' first load.
    let clock_ticks = procfs::clock_ticks_per_second()?;
    let idle = wait_for_idle(control_plane.pid(), clock_ticks).await?;
    println!("fan-out: the control plane is idle: {idle}");

    let mut changes = Vec::new();
    for j in 0..settings.changes {
        let service = format!("svc-{}", (j * 7) % settings.services);
        let port = PROBE_PORT + j as u16;
        let id = format!("probe-{j}");
        registration::register(&registrar, ROOT, &service, &id, port).await?;
        let created = Instant::now();
        let everyone = |seen: &Seen| {
            let reached = |kind: Kind, count: usize| {
                (0..count)
                    .filter(|&n| seen.probes.contains_key(&(kind, n, port)))
                    .count()
            };
            (
                reached(Kind::Poller, settings.pollers),
                reached(Kind::Ads, settings.ads_streams),
            )
        };
        wait_until(CHANGE_LIMIT, || {
            everyone(&lock(&seen)) == (settings.pollers, settings.ads_streams)
        })
        .await;
        let seen = lock(&seen);
        let last = |kind: Kind, count: usize| {
            let times: Option<Vec<Instant>> = (0..count)
                .map(|n| seen.probes.get(&(kind, n, port)).copied())
                .collect();
            times?
                .into_iter()
                .max()
                .map(|at| at.saturating_duration_since(created).as_secs_f64() * 1000.0)
        };
        let change = Change {
            last_poller_ms: last(Kind::Poller, settings.pollers),
            last_ads_ms: last(Kind::Ads, settings.ads_streams),
        };
        println!(
            "fan-out: change {}/{}: last poller after {}, last ADS stream after {}",
            j + 1,
            settings.changes,
            shown(change.last_poller_ms),
            shown(change.last_ads_ms),
        );
        changes.push(change);
    }
    let resident_connected_mib = procfs::resident_kib(control_plane.pid())? as f64 / 1024.0;
    subscribers.abort_all();
    while subscribers.join_next().await.is_some() {}
    drop(registrar);
    Ok(Results {
        instances,
        populate_ms,
        resident_idle_mib,
        resident_connected_mib,
        ads_connect_ms,
        changes,
    })
}

fn shown(ms: Option<f64>) -> String {
    ms.map_or("never".to_string(), |ms| format!("{ms:.1} ms"))
}

/// Waits until the process spends at most a hundredth of its time on the CPU over half a
/// second, for [`IDLE_LIMIT`] at most; says whether it did.
async fn wait_for_idle(pid: u32, clock_ticks: u64) -> anyhow::Result<bool> {
    const SPAN: Duration = Duration::from_millis(500);
    let deadline = Instant::now() + IDLE_LIMIT;
    while Instant::now() < deadline {
        let before = procfs::cpu_ticks(pid)?;
        tokio::time::sleep(SPAN).await;
        let busy = (procfs::cpu_ticks(pid)? - before) as f64 / clock_ticks as f64;
        if busy <= SPAN.as_secs_f64() / 100.0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Polls `condition` every 5 ms until it holds (true) or `limit` has passed (false).
async fn wait_until(limit: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One filter's poller: long-polls `/v1/changes` from `version` on, recording each probe
/// instance the first time it is listed.
async fn poll(
    http: reqwest::Client,
    url: String,
    mut version: zklb_wire::Version,
    poller: usize,
    seen: Shared,
) {
    loop {
        let asked = format!("{url}/v1/changes?after={version}&wait=30");
        let answer = async {
            let response = http.get(&asked).send().await?.error_for_status()?;
            if response.status() == reqwest::StatusCode::NOT_MODIFIED {
                return anyhow::Ok(None);
            }
            Ok(Some(response.json::<ServiceChanges>().await?))
        };
        match answer.await {
            Ok(Some(changes)) => {
                let now = Instant::now();
                version = changes.version;
                let mut seen = lock(&seen);
                for instance in changes.services.values().flat_map(|s| &s.instances) {
                    if instance.port >= PROBE_PORT {
                        seen.probes
                            .entry((Kind::Poller, poller, instance.port))
                            .or_insert(now);
                    }
                }
            }
            Ok(None) => {}
            Err(error) => {
                eprintln!("fan-out: poller {poller}: {error:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Records a load assignment an ADS stream received: its service, and its probe instances. A
/// service's first assignment is the stream's initial load, before any change: only later ones
/// are decoded.
fn record_assignment(seen: &Shared, stream: usize, cluster: &str, encoded: &[u8]) {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
    use prost::Message as _;
    let now = Instant::now();
    let first = lock(seen)
        .ads_services
        .entry(stream)
        .or_default()
        .insert(cluster.to_string());
    if first {
        return;
    }
    let Ok(assignment) = ClusterLoadAssignment::decode(encoded) else {
        eprintln!("fan-out: ADS stream {stream}: {cluster}'s members do not decode");
        return;
    };
    let ports = assignment
        .endpoints
        .iter()
        .flat_map(|locality| &locality.lb_endpoints)
        .filter_map(|endpoint| match &endpoint.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) => endpoint.address.as_ref(),
            _ => None,
        })
        .filter_map(|address| match &address.address {
            Some(address::Address::SocketAddress(socket)) => socket.port_specifier.as_ref(),
            _ => None,
        })
        .map(|port| match port {
            socket_address::PortSpecifier::PortValue(port) => *port,
            socket_address::PortSpecifier::NamedPort(_) => 0,
        });
    let mut seen = lock(seen);
    for port in ports {
        if port >= u32::from(PROBE_PORT) {
            seen.probes
                .entry((Kind::Ads, stream, port as u16))
                .or_insert(now);
        }
    }
}
