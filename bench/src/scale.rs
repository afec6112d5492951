//! Control-plane scale: with N instances registered in ZooKeeper, how long a control plane takes
//! from start to serving them all, what the full list weighs, how long a change takes to reach a
//! long-polling reader of that list, and what the control plane holds in memory and spent in CPU.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use zklb_tests::stack::ControlPlane;
use zklb_wire::ServiceSet;

use crate::registration;
use crate::startup;
use crate::stats::median;
use zklb_tests::procfs;

/// How long the control plane may take to list everything before the size counts as not served.
const SERVE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Registry sizes, in instances.
    pub sizes: Vec<usize>,
    /// Instances per service.
    pub per_service: usize,
    /// Changes timed at each size.
    pub changes: usize,
}

/// The figures of one registry size.
#[derive(Debug, Clone)]
pub struct Size {
    pub instances: usize,
    pub services: usize,
    /// Registering everything (pipelined creates).
    pub populate_ms: f64,
    /// From the control plane's start to `/healthz` answering 200 and the list holding every
    /// instance; `None` when that did not happen within [`SERVE_LIMIT`].
    pub serving_ms: Option<f64>,
    pub list_bytes: usize,
    /// Median time to fetch the whole list.
    pub list_fetch_ms: f64,
    /// Create returned → a long-poll of the changes (`/v1/changes?after=<version>`, as the filter
    /// asks) answered with the new instance, per change.
    pub changes_ms: Vec<f64>,
    pub resident_mib: f64,
    /// The control plane's CPU time from its start until it served everything.
    pub startup_cpu_ms: f64,
}

pub async fn measure(dir: &Path, settings: &Settings) -> anyhow::Result<Vec<Size>> {
    let dir = dir.join("scale");
    std::fs::create_dir_all(&dir)?;
    let zookeeper = Arc::new(startup::zookeeper(&dir).await?);
    let registrar = zookeeper.client().await;
    let clock_ticks = procfs::clock_ticks_per_second()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut sizes = Vec::new();
    for &instances in &settings.sizes {
        let root = format!("/scale-{instances}");
        let services = instances.div_ceil(settings.per_service.max(1));
        let started = Instant::now();
        for s in 0..services {
            let service = format!("svc-{s}");
            registration::create_service(&registrar, &root, &service).await?;
            let count = settings
                .per_service
                .min(instances - s * settings.per_service);
            let ports: Vec<u16> = (0..count).map(|i| 20_000 + i as u16).collect();
            registration::register_many(&registrar, &root, &service, "i", &ports).await?;
        }
        let populate_ms = millis(started.elapsed());
        println!(
            "scale: {instances} instances in {services} services registered in {populate_ms:.0} ms"
        );

        let size_dir = dir.join(format!("{instances}"));
        std::fs::create_dir_all(&size_dir)?;
        let started = Instant::now();
        let starting = {
            let (zookeeper, root, size_dir) = (zookeeper.clone(), root.clone(), size_dir.clone());
            // The harness panics when the control plane does not serve in time; a task turns
            // that into a missing figure.
            tokio::spawn(async move { ControlPlane::start(&zookeeper, &root, &size_dir).await })
        };
        let Ok(control_plane) = starting.await else {
            println!("scale: {instances} instances: the control plane did not serve");
            sizes.push(Size::unserved(instances, services, populate_ms));
            continue;
        };
        let Some(list_bytes) = wait_for_all(&http, &control_plane, instances).await else {
            println!("scale: {instances} instances: the control plane never listed them all");
            sizes.push(Size::unserved(instances, services, populate_ms));
            continue;
        };
        let serving_ms = millis(started.elapsed());
        let startup_cpu_ms =
            procfs::cpu_ticks(control_plane.pid())? as f64 * 1000.0 / clock_ticks as f64;

        let mut fetches = Vec::new();
        for _ in 0..5 {
            let fetch = Instant::now();
            list(&http, &control_plane).await?;
            fetches.push(millis(fetch.elapsed()));
        }

        let mut changes_ms = Vec::new();
        for j in 0..settings.changes {
            let (set, _) = list(&http, &control_plane).await?;
            // What the filter follows: only the services that moved.
            let url = format!(
                "{}/v1/changes?after={}&wait=20",
                control_plane.url, set.version
            );
            let poll = {
                let http = http.clone();
                tokio::spawn(async move {
                    let response = http.get(&url).send().await?.error_for_status()?;
                    let body = response.bytes().await?;
                    anyhow::Ok((Instant::now(), body.len()))
                })
            };
            // Let the poll reach the control plane and be held.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let path =
                registration::register(&registrar, &root, "svc-0", &format!("probe-{j}"), 30_000)
                    .await?;
            let created = Instant::now();
            let (answered, _) = poll.await.context("long-poll task")??;
            changes_ms.push(millis(answered.saturating_duration_since(created)));
            registration::deregister(&registrar, &path).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let size = Size {
            instances,
            services,
            populate_ms,
            serving_ms: Some(serving_ms),
            list_bytes,
            list_fetch_ms: median(&fetches).unwrap_or(0.0),
            changes_ms,
            resident_mib: procfs::resident_kib(control_plane.pid())? as f64 / 1024.0,
            startup_cpu_ms,
        };
        println!(
            "scale: {instances} instances: serving all after {serving_ms:.0} ms ({startup_cpu_ms:.0} ms CPU), list {} KiB fetched in {:.1} ms, change → long-poll answer median {:.1} ms, {:.0} MiB resident",
            size.list_bytes / 1024,
            size.list_fetch_ms,
            median(&size.changes_ms).unwrap_or(0.0),
            size.resident_mib,
        );
        sizes.push(size);
    }
    drop(registrar);
    Ok(sizes)
}

impl Size {
    fn unserved(instances: usize, services: usize, populate_ms: f64) -> Size {
        Size {
            instances,
            services,
            populate_ms,
            serving_ms: None,
            list_bytes: 0,
            list_fetch_ms: 0.0,
            changes_ms: Vec::new(),
            resident_mib: 0.0,
            startup_cpu_ms: 0.0,
        }
    }
}

/// The whole list and its size in bytes.
pub async fn list(
    http: &reqwest::Client,
    control_plane: &ControlPlane,
) -> anyhow::Result<(ServiceSet, usize)> {
    let url = format!("{}/v1/services", control_plane.url);
    let body = http
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let set = serde_json::from_slice(&body).with_context(|| format!("reading GET {url}"))?;
    Ok((set, body.len()))
}

/// Waits until the list holds `instances` instances; its size in bytes, or `None` after
/// [`SERVE_LIMIT`].
pub async fn wait_for_all(
    http: &reqwest::Client,
    control_plane: &ControlPlane,
    instances: usize,
) -> Option<usize> {
    let deadline = Instant::now() + SERVE_LIMIT;
    while Instant::now() < deadline {
        if let Ok((set, bytes)) = list(http, control_plane).await {
            let listed: usize = set
                .services
                .values()
                .map(|service| service.instances.len())
                .sum();
            if listed >= instances {
                return Some(bytes);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
