//! A backend crashing under load: requests keep flowing through Envoy with the zklb filter while
//! one of three backends is killed (its registration stays, as when a host dies before its
//! ZooKeeper session expires), then deregistered, then brought back. Counted per stretch: answers,
//! failed requests, and Envoy's retries.

use std::path::Path;
use std::time::{Duration, Instant};

use zklb_tests::stack::{ControlPlane, Envoy};

use crate::nginx::Nginx;
use crate::registration;
use crate::startup;
use crate::traffic::{Traffic, Window};

const ROOT: &str = "/services";
const SERVICE: &str = "failover";
const BACKENDS: usize = 3;
const START_LIMIT: Duration = Duration::from_secs(60);
const TRAFFIC_LIMIT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: usize,
    /// How long each stretch lasts: before the crash, with the crashed backend still registered,
    /// and after its deregistration.
    pub stretch: Duration,
    pub clients: usize,
    pub envoy_workers: u32,
}

/// One crash of one backend.
#[derive(Debug, Clone)]
pub struct Round {
    pub round: usize,
    pub before: Window,
    /// The crashed backend still registered.
    pub crashed: Window,
    pub crashed_retries: u64,
    /// The crashed backend deregistered.
    pub deregistered: Window,
    pub deregistered_retries: u64,
}

pub async fn measure(dir: &Path, settings: &Settings) -> anyhow::Result<Vec<Round>> {
    let dir = dir.join("failover");
    std::fs::create_dir_all(&dir)?;
    let zookeeper = startup::zookeeper(&dir).await?;
    let control_plane = ControlPlane::start(&zookeeper, ROOT, &dir).await;
    let registrar = zookeeper.client().await;
    registration::create_service(&registrar, ROOT, SERVICE).await?;
    let mut backends = Vec::new();
    let mut paths = Vec::new();
    for index in 0..BACKENDS {
        let (backend, path) = start_backend(&dir, &registrar, index, 0).await?;
        backends.push(backend);
        paths.push(path);
    }
    let envoy = Envoy::start_with_workers(&control_plane, settings.envoy_workers, &dir).await;
    let retries = format!(
        "cluster.{}.upstream_rq_retry",
        zklb_wire::cluster_name(SERVICE)
    );
    let url = format!("http://127.0.0.1:{}/", envoy.listen_port);
    let traffic = Traffic::start(&url, SERVICE, settings.clients, TRAFFIC_LIMIT);
    for index in 0..BACKENDS {
        reached(&traffic, index, Instant::now()).await?;
    }

    let mut rounds = Vec::new();
    for round in 1..=settings.rounds {
        let victim = (round - 1) % BACKENDS;
        let started = Instant::now();
        tokio::time::sleep(settings.stretch).await;

        let crashed_at = Instant::now();
        let retries_before = envoy.stat(&retries).await;
        backends[victim].crash();
        tokio::time::sleep(settings.stretch).await;
        let deregistered_at = Instant::now();
        let retries_crashed = envoy.stat(&retries).await;
        registration::deregister(&registrar, &paths[victim]).await?;
        tokio::time::sleep(settings.stretch).await;
        let ended = Instant::now();
        let retries_after = envoy.stat(&retries).await;

        let measured = Round {
            round,
            before: traffic.window(started, crashed_at),
            crashed: traffic.window(crashed_at, deregistered_at),
            crashed_retries: retries_crashed.saturating_sub(retries_before),
            deregistered: traffic.window(deregistered_at, ended),
            deregistered_retries: retries_after.saturating_sub(retries_crashed),
        };
        println!(
            "failover: round {round}/{}: {:.0} answers/s, p99 {:.1} ms before; crashed: {:.0}/s, p99 {:.1} ms, {} failed, {} retries; deregistered: {:.0}/s, {} failed, {} retries",
            settings.rounds,
            measured.before.per_second(),
            measured.before.p99_ms,
            measured.crashed.per_second(),
            measured.crashed.p99_ms,
            measured.crashed.failed,
            measured.crashed_retries,
            measured.deregistered.per_second(),
            measured.deregistered.failed,
            measured.deregistered_retries,
        );
        rounds.push(measured);

        // Back to three backends before the next round.
        let (backend, path) = start_backend(&dir, &registrar, victim, round).await?;
        backends[victim] = backend;
        paths[victim] = path;
        reached(&traffic, victim, Instant::now()).await?;
    }
    traffic.stop().await;
    drop(registrar);
    Ok(rounds)
}

/// An nginx answering with label `index`, registered as instance `fo-<index>-<generation>`.
async fn start_backend(
    dir: &Path,
    registrar: &zookeeper_client::Client,
    index: usize,
    generation: usize,
) -> anyhow::Result<(Nginx, String)> {
    let name = format!("nginx-failover-{index}-{generation}");
    let backend = Nginx::start(dir, &name, index..index + 1).await;
    let id = format!("fo-{index}-{generation}");
    let path = registration::register(registrar, ROOT, SERVICE, &id, backend.ports[0]).await?;
    Ok((backend, path))
}

/// Waits until the backend with label `index` has answered since `since`.
async fn reached(traffic: &Traffic, index: usize, since: Instant) -> anyhow::Result<()> {
    let label = Nginx::label(index);
    loop {
        let far = Instant::now() + Duration::from_secs(3600);
        if traffic.first_between(&label, since, far).is_some() {
            return Ok(());
        }
        if since.elapsed() > START_LIMIT {
            anyhow::bail!("requests for {SERVICE} never reached backend {label}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
