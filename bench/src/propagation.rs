//! How fast a registry change reaches requests: from a znode create (or delete) returning to the
//! first (or last) answer through Envoy from that instance, while clients send requests in a tight
//! loop. Isolated changes wait for each to settle; back-to-back changes come a fixed interval
//! apart; a brand-new service is timed to its first `200`.

use std::path::Path;
use std::time::{Duration, Instant};

use zklb_tests::stack::{ControlPlane, Envoy};
use zookeeper_client as zk;

use crate::nginx::Nginx;
use crate::registration;
use crate::startup;
use crate::traffic::{Summary, Traffic};

const ROOT: &str = "/services";
const SERVICE: &str = "prop";
/// Ports the changing instances take in turn, besides the service's one stable instance (port
/// 0); a port is reused only long after its previous instance was deleted.
const POOL: usize = 16;
/// How long an instance must go unanswered before its removal counts as settled.
const QUIET: Duration = Duration::from_secs(1);
/// The pause around an isolated change, so that each change meets an idle system (and longer
/// than any pacing in the path: Envoy's REST xDS fetcher, which zklb used before ADS, waited up
/// to twice its 1 s `refresh_delay` after each answer).
pub const ISOLATION: Duration = Duration::from_secs(2);
/// The longest any single change may take to show before it is recorded as never seen.
pub const CHANGE_LIMIT: Duration = Duration::from_secs(20);
/// The longest any request loop runs.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Instances registered, then deregistered, one change at a time.
    pub isolated: usize,
    /// Instances registered and deregistered back to back.
    pub back_to_back: usize,
    /// Time between back-to-back changes.
    pub spacing: Duration,
    /// At most this many back-to-back instances are registered at once.
    pub live: usize,
    pub new_services: usize,
    pub clients: usize,
    pub envoy_workers: u32,
}

/// Milliseconds from a change returning to its effect, one entry per change; `None` when the
/// instance was never reached.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub isolated_create: Vec<Option<f64>>,
    pub isolated_delete: Vec<Option<f64>>,
    pub back_to_back_create: Vec<Option<f64>>,
    pub back_to_back_delete: Vec<Option<f64>>,
    pub new_service: Vec<Option<f64>>,
    pub traffic: Option<Summary>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Create(usize),
    Delete(usize),
}

/// The order of back-to-back changes: `instances` creates, each instance deleted once `live`
/// later ones have been created, so that at most `live` are registered at once and each lives
/// about `2 × live − 1` intervals.
pub fn schedule(instances: usize, live: usize) -> Vec<Change> {
    let live = live.max(1);
    let mut changes = Vec::with_capacity(2 * instances);
    for k in 0..instances {
        changes.push(Change::Create(k));
        if k + 1 >= live {
            changes.push(Change::Delete(k + 1 - live));
        }
    }
    for k in instances.saturating_sub(live - 1)..instances {
        changes.push(Change::Delete(k));
    }
    changes
}

pub async fn measure(dir: &Path, settings: &Settings) -> anyhow::Result<Results> {
    let dir = dir.join("propagation");
    std::fs::create_dir_all(&dir)?;
    let nginx = Nginx::start(&dir, "nginx-propagation", 0..1 + POOL).await;
    let zookeeper = startup::zookeeper(&dir).await?;
    let control_plane = ControlPlane::start(&zookeeper, ROOT, &dir).await;
    let registrar = zookeeper.client().await;
    registration::create_service(&registrar, ROOT, SERVICE).await?;
    registration::register(&registrar, ROOT, SERVICE, "stable", nginx.ports[0]).await?;
    let envoy = Envoy::start_with_workers(&control_plane, settings.envoy_workers, &dir).await;
    let url = format!("http://127.0.0.1:{}/", envoy.listen_port);

    let traffic = Traffic::start(&url, SERVICE, settings.clients, TRAFFIC_LIMIT);
    let stable = Nginx::label(0);
    if wait_first(&traffic, &stable, Instant::now(), Duration::from_secs(60))
        .await
        .is_none()
    {
        anyhow::bail!("requests for {SERVICE} never reached its stable instance");
    }
    tokio::time::sleep(ISOLATION).await;
    let ports = &nginx.ports;
    let (isolated_create, isolated_delete) =
        isolated(&traffic, &registrar, ports, settings.isolated).await?;
    let (back_to_back_create, back_to_back_delete) =
        back_to_back(&traffic, &registrar, ports, settings).await?;
    let traffic = traffic.stop().await;
    // The new services meet an idle system too, not the tail of the back-to-back changes.
    tokio::time::sleep(ISOLATION).await;
    let new_service = new_services(&url, &registrar, ports[0], settings).await?;
    drop(registrar);
    Ok(Results {
        isolated_create,
        isolated_delete,
        back_to_back_create,
        back_to_back_delete,
        new_service,
        traffic: Some(traffic),
    })
}

/// The port index of the `k`-th changing instance.
fn port(k: usize) -> usize {
    1 + k % POOL
}

/// Milliseconds to the first and to the last answer of `count` instances registered and
/// deregistered one at a time.
async fn isolated(
    traffic: &Traffic,
    registrar: &zk::Client,
    ports: &[u16],
    count: usize,
) -> anyhow::Result<(Vec<Option<f64>>, Vec<Option<f64>>)> {
    let (mut creates, mut deletes) = (Vec::new(), Vec::new());
    for k in 0..count {
        let label = Nginx::label(port(k));
        let id = format!("iso-{k}");
        let path = registration::register(registrar, ROOT, SERVICE, &id, ports[port(k)]).await?;
        let created = Instant::now();
        let first = wait_first(traffic, &label, created, CHANGE_LIMIT).await;
        creates.push(first.map(|at| millis(at - created)));
        tokio::time::sleep(ISOLATION).await;
        registration::deregister(registrar, &path).await?;
        let deleted = Instant::now();
        let last = wait_quiet(traffic, &label, deleted).await;
        deletes.push(first.map(|_| last.map_or(0.0, |at| millis(at - deleted))));
        println!(
            "propagation: isolated {}/{count}: first answer {}, last answer {}",
            k + 1,
            shown(creates.last()),
            shown(deletes.last())
        );
        tokio::time::sleep(ISOLATION.saturating_sub(QUIET)).await;
    }
    Ok((creates, deletes))
}

/// Milliseconds to the first and to the last answer of instances registered and deregistered
/// back to back, [`Settings::spacing`] apart, in the order of [`schedule`].
async fn back_to_back(
    traffic: &Traffic,
    registrar: &zk::Client,
    ports: &[u16],
    settings: &Settings,
) -> anyhow::Result<(Vec<Option<f64>>, Vec<Option<f64>>)> {
    let count = settings.back_to_back;
    let changes = schedule(count, settings.live);
    let mut created: Vec<Option<Instant>> = vec![None; count];
    let mut deleted: Vec<Option<Instant>> = vec![None; count];
    let mut paths: Vec<String> = vec![String::new(); count];
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    for (j, change) in changes.iter().enumerate() {
        tokio::time::sleep_until(start + settings.spacing * j as u32).await;
        match *change {
            Change::Create(k) => {
                let id = format!("b2b-{k}");
                paths[k] =
                    registration::register(registrar, ROOT, SERVICE, &id, ports[port(k)]).await?;
                created[k] = Some(Instant::now());
            }
            Change::Delete(k) => {
                registration::deregister(registrar, &paths[k]).await?;
                deleted[k] = Some(Instant::now());
            }
        }
    }
    // Settled once the last instance on every port has gone quiet.
    let last_on_each_port = count.saturating_sub(POOL);
    for (k, at) in deleted.iter().enumerate().skip(last_on_each_port) {
        if let Some(at) = at {
            wait_quiet(traffic, &Nginx::label(port(k)), *at).await;
        }
    }
    let now = Instant::now();
    let (mut creates, mut deletes) = (Vec::new(), Vec::new());
    for k in 0..count {
        let (Some(created_at), Some(deleted_at)) = (created[k], deleted[k]) else {
            continue;
        };
        let label = Nginx::label(port(k));
        // The next instance on the same port ends this one's window.
        let reused = created.get(k + POOL).copied().flatten().unwrap_or(now);
        let first = traffic.first_between(&label, created_at, reused);
        let last = traffic.last_between(&label, deleted_at, reused);
        creates.push(first.map(|at| millis(at - created_at)));
        deletes.push(first.map(|_| last.map_or(0.0, |at| millis(at - deleted_at))));
    }
    println!(
        "propagation: {} back-to-back changes {:?} apart done",
        changes.len(),
        settings.spacing
    );
    Ok((creates, deletes))
}

/// Milliseconds from a new service's first instance registering to its first `200`, one new
/// service at a time, each with its own clients.
async fn new_services(
    url: &str,
    registrar: &zk::Client,
    port: u16,
    settings: &Settings,
) -> anyhow::Result<Vec<Option<f64>>> {
    let mut firsts = Vec::new();
    for k in 0..settings.new_services {
        let service = format!("fresh-{k}");
        let traffic = Traffic::start(url, &service, settings.clients.min(2), CHANGE_LIMIT * 2);
        tokio::time::sleep(ISOLATION).await;
        registration::create_service(registrar, ROOT, &service).await?;
        registration::register(registrar, ROOT, &service, "first", port).await?;
        let registered = Instant::now();
        let first = loop {
            if let Some(at) = traffic.first_any_after(registered) {
                break Some(at);
            }
            if registered.elapsed() > CHANGE_LIMIT {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        traffic.stop().await;
        firsts.push(first.map(|at| millis(at - registered)));
        println!(
            "propagation: new service {}/{}: first 200 {}",
            k + 1,
            settings.new_services,
            shown(firsts.last())
        );
    }
    Ok(firsts)
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn shown(value: Option<&Option<f64>>) -> String {
    match value.copied().flatten() {
        Some(ms) => format!("{ms:.1} ms"),
        None => "never".to_string(),
    }
}

/// The first answer from `label` at or after `since`, waiting up to `limit` for it.
pub async fn wait_first(
    traffic: &Traffic,
    label: &str,
    since: Instant,
    limit: Duration,
) -> Option<Instant> {
    loop {
        let far = Instant::now() + Duration::from_secs(3600);
        if let Some(at) = traffic.first_between(label, since, far) {
            return Some(at);
        }
        if since.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `label` has not answered for [`QUIET`] (or [`CHANGE_LIMIT`] has passed) and
/// returns its last answer at or after `since`.
async fn wait_quiet(traffic: &Traffic, label: &str, since: Instant) -> Option<Instant> {
    loop {
        let now = Instant::now();
        let last = traffic.last_between(label, since, now);
        if now - last.unwrap_or(since) >= QUIET || now - since > CHANGE_LIMIT {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_to_back_instances_each_come_and_go_once_with_a_bounded_number_live() {
        for (instances, live) in [(30, 6), (10, 1), (3, 6), (0, 4)] {
            let changes = schedule(instances, live);
            assert_eq!(changes.len(), 2 * instances);
            let mut registered = std::collections::BTreeSet::new();
            let mut deleted = std::collections::BTreeSet::new();
            for change in changes {
                match change {
                    Change::Create(k) => assert!(registered.insert(k), "{k} created twice"),
                    Change::Delete(k) => {
                        assert!(registered.remove(&k), "{k} deleted before its create");
                        assert!(deleted.insert(k), "{k} deleted twice");
                    }
                }
                assert!(registered.len() <= live, "more than {live} live");
            }
            assert!(registered.is_empty());
            assert_eq!(deleted.len(), instances);
        }
    }

    #[test]
    fn alternating_when_one_may_live() {
        assert_eq!(
            schedule(2, 1),
            vec![
                Change::Create(0),
                Change::Delete(0),
                Change::Create(1),
                Change::Delete(1)
            ]
        );
    }
}
