//! What one service's change costs Envoy with the zklb filter when the registry is large: the
//! CPU time of Envoy's main thread (ADS, the poller's fetch and parse, shared data) across the
//! change, and of its one worker for the first request after it (the worker takes up the new
//! list on its next request), each against the same without a change, in alternating samples.
//! Thread CPU times come from `/proc/<pid>/task/<tid>/schedstat`, in nanoseconds.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use zklb_tests::eventually;
use zklb_tests::stack::{ControlPlane, Envoy};

use crate::data_plane::{self, SERVICE};
use crate::registration;
use crate::scale;
use crate::stats::median;
use zklb_tests::procfs;

/// How long after a change the main thread's CPU time is read: far past the changes' p99 to
/// reach requests on a small registry. A change whose list the filter did not hold by then is
/// left out of the main thread's figures (and counted).
const WINDOW: Duration = Duration::from_secs(1);
/// New instances' ports: above every other instance's, and never listened on (nothing is sent
/// to them).
const PROBE_PORT: u16 = 40_000;
/// The name of Envoy's worker threads (`wrk:worker_0`...).
const WORKER_THREAD: &str = "wrk:worker";

#[derive(Debug, Clone)]
pub struct Settings {
    pub services: usize,
    pub per_service: usize,
    /// Samples with a change, each followed by one without.
    pub changes: usize,
}

/// CPU time in microseconds, per sample.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub instances: usize,
    /// The main thread across [`WINDOW`], with and without a change.
    pub main_changed_us: Vec<f64>,
    pub main_unchanged_us: Vec<f64>,
    /// The worker for one request, the first after a change and one without.
    pub worker_changed_us: Vec<f64>,
    pub worker_unchanged_us: Vec<f64>,
    /// Changes the filter did not hold within [`WINDOW`].
    pub late_changes: usize,
}

impl Results {
    /// Median with a change minus median without, for the main thread and for the worker.
    pub fn costs_us(&self) -> Option<(f64, f64)> {
        Some((
            median(&self.main_changed_us)? - median(&self.main_unchanged_us)?,
            median(&self.worker_changed_us)? - median(&self.worker_unchanged_us)?,
        ))
    }
}

/// Measures on a registry of `settings.services` services of `settings.per_service`
/// instances (under `root`) plus `echo`, served by `echo_ports`.
pub async fn measure(
    dir: &Path,
    zookeeper: &zklb_tests::ZooKeeper,
    echo_ports: &[u16],
    settings: &Settings,
) -> anyhow::Result<Results> {
    const ROOT: &str = "/list-update";
    let dir = dir.join("list-update");
    std::fs::create_dir_all(&dir)?;
    let registrar = zookeeper.client().await;
    registration::create_service(&registrar, ROOT, SERVICE).await?;
    for (index, port) in echo_ports.iter().enumerate() {
        registration::register(
            &registrar,
            ROOT,
            SERVICE,
            &format!("{SERVICE}-{index}"),
            *port,
        )
        .await?;
    }
    registration::register_bulk(&registrar, ROOT, settings.services, settings.per_service).await?;
    let instances = settings.services * settings.per_service + echo_ports.len();
    let control_plane = ControlPlane::start(zookeeper, ROOT, &dir).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    scale::wait_for_all(&http, &control_plane, instances)
        .await
        .context("the control plane never listed every instance")?;
    let envoy = Envoy::start_with_workers(&control_plane, 1, &dir).await;
    let name = format!("{instances} instances");
    data_plane::wait_for_every_backend(&name, &envoy, SERVICE, echo_ports.len()).await;
    println!("list update: Envoy serves with {instances} instances registered");

    let request = || async {
        let response = http
            .get(data_plane::url(&envoy))
            .header("host", SERVICE)
            .send()
            .await?
            .error_for_status()?;
        response.bytes().await?;
        anyhow::Ok(())
    };
    let mut results = Results {
        instances,
        ..Results::default()
    };
    for j in 0..2 * settings.changes {
        let changed = j % 2 == 0;
        // The worker holds the current list, and the connection is open.
        request().await?;
        let main_before = main_thread_ns(&envoy)?;
        if changed {
            let service = format!("svc-{}", (j / 2) % settings.services);
            let port = PROBE_PORT + j as u16;
            registration::register(&registrar, ROOT, &service, &format!("probe-{j}"), port).await?;
        }
        tokio::time::sleep(WINDOW).await;
        let main_us = (main_thread_ns(&envoy)? - main_before) as f64 / 1000.0;
        let late = changed && holds_list(&http, &control_plane, &envoy).await?.is_err();
        if changed {
            wait_for_list(&http, &control_plane, &envoy).await?;
        }
        let worker_before = worker_ns(&envoy)?;
        request().await?;
        let worker_us = (worker_ns(&envoy)? - worker_before) as f64 / 1000.0;
        if late {
            results.late_changes += 1;
            results.worker_changed_us.push(worker_us);
        } else if changed {
            results.main_changed_us.push(main_us);
            results.worker_changed_us.push(worker_us);
        } else {
            results.main_unchanged_us.push(main_us);
            results.worker_unchanged_us.push(worker_us);
        }
        println!(
            "list update: {}: main thread {main_us:.0} µs over {} ms, worker {worker_us:.0} µs for the next request",
            match (changed, late) {
                (true, true) => "a change, not through within the window",
                (true, false) => "a change",
                _ => "no change",
            },
            WINDOW.as_millis(),
        );
    }
    drop(registrar);
    Ok(results)
}

/// Waits until the filter's poller holds the control plane's current list, so that the next
/// request is the worker's first on it.
async fn wait_for_list(
    http: &reqwest::Client,
    control_plane: &ControlPlane,
    envoy: &Envoy,
) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(30),
        "the filter holds the new list",
        || async {
            holds_list(http, control_plane, envoy)
                .await
                .map_err(|error| format!("{error:#}"))?
        },
    )
    .await;
    Ok(())
}

/// Whether the filter's poller holds the control plane's current list (its `zklb.list_version`
/// gauge): `Err` with the versions when it does not.
async fn holds_list(
    http: &reqwest::Client,
    control_plane: &ControlPlane,
    envoy: &Envoy,
) -> anyhow::Result<Result<(), String>> {
    let (set, _) = scale::list(http, control_plane).await?;
    let held = envoy.stat("wasmcustom.zklb.list_version").await;
    Ok(
        if i64::try_from(held).is_ok_and(|held| held >= set.version) {
            Ok(())
        } else {
            Err(format!("version {held}, not {}", set.version))
        },
    )
}

fn main_thread_ns(envoy: &Envoy) -> anyhow::Result<u64> {
    let pid = envoy.pid();
    procfs::thread_cpu_ns(pid, "")?
        .into_iter()
        .find(|(tid, _)| *tid == pid)
        .map(|(_, ns)| ns)
        .context("Envoy's main thread is gone")
}

/// The CPU time of Envoy's worker (it runs one).
fn worker_ns(envoy: &Envoy) -> anyhow::Result<u64> {
    let workers = procfs::thread_cpu_ns(envoy.pid(), WORKER_THREAD)?;
    match workers.as_slice() {
        [(_, ns)] => Ok(*ns),
        _ => anyhow::bail!("expected one Envoy worker thread, found {workers:?}"),
    }
}
