//! A backend crashing under load, through zklb and through plain Envoy side by side: requests keep
//! flowing while one of three backends is killed (its registration stays, as when a host dies
//! before its ZooKeeper session expires), then deregistered, then brought back. Plain Envoy gets
//! the same members from the same control plane (EDS), balances at random, retries on other
//! hosts and ejects failing ones by outlier detection. Counted per stretch: answers, failed
//! requests, latency and Envoy's retries, split at the moment the crashed host was ejected.

use std::path::Path;
use std::time::{Duration, Instant};

use zklb_tests::stack::{ControlPlane, Envoy};

use crate::envoy_configs;
use crate::nginx::Nginx;
use crate::registration;
use crate::startup;
use crate::traffic::{Traffic, Window};

const ROOT: &str = "/services";
const SERVICE: &str = "failover";
const BACKENDS: usize = 3;
const START_LIMIT: Duration = Duration::from_secs(60);
const TRAFFIC_LIMIT: Duration = Duration::from_secs(10 * 60);
/// How often Envoy's retry count and ejected hosts are read while the crashed host is registered:
/// the resolution of the moment of its ejection.
const SAMPLING: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: usize,
    /// How long each stretch lasts: before the crash, with the crashed backend still registered,
    /// and after its deregistration.
    pub stretch: Duration,
    pub clients: usize,
    pub envoy_workers: u32,
}

/// The Envoys that take the crash, in the order each round runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Envoy with the zklb filter: the filter's candidates, its own ejection of failing hosts.
    Zklb,
    /// Plain Envoy (`bench/envoy/native-failover.yaml`): RANDOM, `previous_hosts` retries,
    /// outlier detection.
    NativeRandom,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Zklb, Variant::NativeRandom];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Zklb => "zklb",
            Variant::NativeRandom => "native_random",
        }
    }

    /// Envoy's counter of retries, and its gauge of the hosts ejected now.
    fn stats(self) -> (String, &'static str) {
        match self {
            Variant::Zklb => (
                format!(
                    "cluster.{}.upstream_rq_retry",
                    zklb_wire::cluster_name(SERVICE)
                ),
                "wasmcustom.zklb.ejected_hosts",
            ),
            Variant::NativeRandom => (
                "cluster.backends.upstream_rq_retry".to_string(),
                "cluster.backends.outlier_detection.ejections_active",
            ),
        }
    }
}

/// One crash of one backend, through one variant.
#[derive(Debug, Clone)]
pub struct Round {
    pub variant: Variant,
    pub round: usize,
    pub before: Window,
    /// The crashed backend still registered.
    pub crashed: Window,
    pub crashed_retries: u64,
    /// The part of `crashed` until the crashed host was ejected (all of it if it was not).
    pub until_ejection: Window,
    pub retries_until_ejection: u64,
    /// From the crash to the first reading that showed the host ejected; `None` if none did.
    pub ejected_after: Option<Duration>,
    /// The part of `crashed` after the ejection.
    pub after_ejection: Option<(Window, u64)>,
    /// The crashed backend deregistered.
    pub deregistered: Window,
    pub deregistered_retries: u64,
}

/// Envoy's retries and ejected hosts at one moment.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    retries: u64,
    ejected: u64,
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
    let zklb_dir = dir.join(Variant::Zklb.name());
    std::fs::create_dir_all(&zklb_dir)?;
    let zklb = Envoy::start_with_workers(&control_plane, settings.envoy_workers, &zklb_dir).await;
    let native = envoy_configs::start_template(
        &dir.join(Variant::NativeRandom.name()),
        "native-failover.yaml",
        &[
            ("BENCH_CONTROL_PLANE_PORT", control_plane.port.to_string()),
            ("BENCH_EDS_SERVICE", zklb_wire::cluster_name(SERVICE)),
        ],
        settings.envoy_workers,
        &[],
    )
    .await?;

    let mut rounds = Vec::new();
    let mut generation = 0;
    for round in 1..=settings.rounds {
        for variant in Variant::ALL {
            let envoy = match variant {
                Variant::Zklb => &zklb,
                Variant::NativeRandom => &native,
            };
            let victim = generation % BACKENDS;
            generation += 1;
            let url = format!("http://127.0.0.1:{}/", envoy.listen_port);
            let traffic = Traffic::start(&url, SERVICE, settings.clients, TRAFFIC_LIMIT);
            let since = Instant::now();
            for index in 0..BACKENDS {
                reached(&traffic, index, since).await?;
            }
            let measured = crash_one(
                variant,
                round,
                settings,
                envoy,
                &traffic,
                &mut backends[victim],
                &registrar,
                &paths[victim],
            )
            .await?;
            traffic.stop().await;
            println!(
                "failover: round {round}/{} {:<13} {:.0} answers/s before; crashed: {} failed, {} retries, ejected after {}; deregistered: {} failed, {} retries",
                settings.rounds,
                variant.name(),
                measured.before.per_second(),
                measured.crashed.failed,
                measured.crashed_retries,
                measured
                    .ejected_after
                    .map_or("never".to_string(), |after| format!("{} ms", after.as_millis())),
                measured.deregistered.failed,
                measured.deregistered_retries,
            );
            rounds.push(measured);

            // Back to three backends before the next crash.
            let (backend, path) = start_backend(&dir, &registrar, victim, generation).await?;
            backends[victim] = backend;
            paths[victim] = path;
        }
    }
    drop(registrar);
    Ok(rounds)
}

/// One round: a stretch as is, the crash with the backend registered (Envoy read every
/// [`SAMPLING`]), its deregistration.
#[allow(clippy::too_many_arguments)]
async fn crash_one(
    variant: Variant,
    round: usize,
    settings: &Settings,
    envoy: &Envoy,
    traffic: &Traffic,
    victim: &mut Nginx,
    registrar: &zookeeper_client::Client,
    victim_path: &str,
) -> anyhow::Result<Round> {
    let (retries, ejected) = variant.stats();
    let retries = retries.as_str();
    let read = || async move {
        Reading {
            at: Instant::now(),
            retries: envoy.stat(retries).await,
            ejected: envoy.stat(ejected).await,
        }
    };
    let started = Instant::now();
    tokio::time::sleep(settings.stretch).await;

    let at_crash = read().await;
    let crashed_at = Instant::now();
    victim.crash();
    let mut readings = vec![at_crash];
    while crashed_at.elapsed() < settings.stretch {
        tokio::time::sleep(SAMPLING).await;
        readings.push(read().await);
    }
    let deregistered_at = Instant::now();
    let at_deregistration = read().await;
    registration::deregister(registrar, victim_path).await?;
    tokio::time::sleep(settings.stretch).await;
    let ended = Instant::now();
    let at_end = read().await;

    let ejection = first_ejection(&readings);
    let (until_ejection, retries_until_ejection, after_ejection) = match ejection {
        Some(ejected) => (
            traffic.window(crashed_at, ejected.at),
            ejected.retries.saturating_sub(at_crash.retries),
            Some((
                traffic.window(ejected.at, deregistered_at),
                at_deregistration.retries.saturating_sub(ejected.retries),
            )),
        ),
        None => (
            traffic.window(crashed_at, deregistered_at),
            at_deregistration.retries.saturating_sub(at_crash.retries),
            None,
        ),
    };
    Ok(Round {
        variant,
        round,
        before: traffic.window(started, crashed_at),
        crashed: traffic.window(crashed_at, deregistered_at),
        crashed_retries: at_deregistration.retries.saturating_sub(at_crash.retries),
        until_ejection,
        retries_until_ejection,
        ejected_after: ejection.map(|ejected| ejected.at.saturating_duration_since(crashed_at)),
        after_ejection,
        deregistered: traffic.window(deregistered_at, ended),
        deregistered_retries: at_end.retries.saturating_sub(at_deregistration.retries),
    })
}

/// The first reading whose count of ejected hosts is above the one before it. The count may
/// start above zero (a host replaced in an earlier round can still be listed as ejected), so
/// the rise, not the value, marks the ejection.
fn first_ejection(readings: &[Reading]) -> Option<Reading> {
    readings
        .windows(2)
        .find(|pair| pair[1].ejected > pair[0].ejected)
        .map(|pair| pair[1])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ejection_is_the_first_rise_of_the_ejected_hosts() {
        let start = Instant::now();
        let reading = |ms: u64, retries: u64, ejected: u64| Reading {
            at: start + Duration::from_millis(ms),
            retries,
            ejected,
        };
        // One host still ejected from before the crash, then the crashed one.
        let readings = [
            reading(0, 10, 1),
            reading(20, 14, 1),
            reading(40, 19, 2),
            reading(60, 19, 1),
            reading(80, 19, 2),
        ];
        let ejected = first_ejection(&readings).expect("an ejection");
        assert_eq!(ejected.at, start + Duration::from_millis(40));
        assert_eq!(ejected.retries, 19);
        assert!(first_ejection(&readings[..2]).is_none());
        assert!(first_ejection(&[]).is_none());
    }
}
