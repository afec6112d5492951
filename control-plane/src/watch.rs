//! The ZooKeeper side: one session at a time, one persistent recursive watch on the root, and
//! re-reads of whatever changed. The only writer of snapshots.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::time::{timeout, timeout_at, Instant};
use zookeeper_client::{
    AddWatchMode, Client, EventType, MultiReadResult, PersistentWatcher, SessionState, Stat,
    WatchedEvent,
};

use crate::registry::{DecodeStats, Registry, ServiceRead, Znode};
use crate::snapshot::{Health, Publishers};

/// Where the registry lives and how to reach it.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// ZooKeeper connect string, `host:port[,host:port...]`.
    pub connect: String,
    /// The znode whose children are services.
    pub root: String,
    pub session_timeout: Duration,
    /// The share of all instances (0 to 1; 0 turns it off) whose sudden disappearance right
    /// after a (re)connection is held back rather than published.
    pub drop_protection: f64,
}

#[derive(Debug, Error)]
enum WatchError {
    #[error("ZooKeeper {operation} {path}: {source}")]
    ZooKeeper {
        operation: &'static str,
        path: String,
        source: zookeeper_client::Error,
    },
    #[error("the ZooKeeper session ended ({0:?})")]
    SessionEnded(SessionState),
}

/// Events that arrive within this window after a first one are handled as one batch, so that a
/// burst of registrations costs one read per service rather than one per event.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
const MAX_BATCH: usize = 10_000;
/// Read rounds per batch before publishing a registry that kept changing while it was read.
const MAX_ROUNDS: usize = 8;
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Watches ZooKeeper until the task is dropped, publishing every change. A session that ends is
/// replaced by a new one; meanwhile the last snapshot keeps being served, marked disconnected.
pub async fn watch_registry(config: WatchConfig, publishers: Publishers) {
    loop {
        match Session::open(&config).await {
            Ok(mut session) => {
                if let Err(error) = session.follow(&publishers).await {
                    tracing::warn!(%error, "ZooKeeper session lost; opening a new one");
                }
            }
            Err(error) => {
                tracing::warn!(%error, connect = config.connect, "cannot open a ZooKeeper session")
            }
        }
        publishers.health.send_modify(Health::lost);
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

struct Session<'a> {
    config: &'a WatchConfig,
    client: Client,
    watcher: PersistentWatcher,
    registry: Registry,
    /// The instance znode names of every service as last listed: what the next read asks for.
    listings: BTreeMap<String, Vec<String>>,
    /// Root children already reported as unusable service names, so each is logged once.
    rejected_names: BTreeSet<String>,
    /// Until when the session counts as just (re)connected, when a sudden drop of instances is
    /// more likely a ZooKeeper mishap (lost data, a replaced ensemble, registrars' sessions
    /// expired by the same outage and about to come back) than a fleet going away.
    settling_until: Instant,
}

/// What a batch of events asks to re-read. The root's children are read every time.
#[derive(Debug, Default)]
struct Changes {
    /// Re-read everything: the root itself changed, or events may have been lost.
    everything: bool,
    services: BTreeSet<String>,
    disconnected: bool,
    /// The session reconnected, and the server may have forgotten the persistent watch.
    reconnected: bool,
    /// More events were queued than one batch takes.
    more_queued: bool,
}

impl Changes {
    fn is_empty(&self) -> bool {
        !self.everything && self.services.is_empty() && !self.disconnected && !self.reconnected
    }

    /// What to do after a failed request: wait for the reconnection if the connection was lost
    /// (requests fail with it while the client reconnects), end the session otherwise.
    fn after(error: WatchError) -> Result<Changes, WatchError> {
        match error {
            WatchError::ZooKeeper {
                source: zookeeper_client::Error::ConnectionLoss,
                ..
            } => Ok(Changes {
                disconnected: true,
                ..Changes::default()
            }),
            error => Err(error),
        }
    }

    fn merge(&mut self, other: Changes) {
        self.everything |= other.everything;
        self.services.extend(other.services);
        self.disconnected |= other.disconnected;
        self.reconnected |= other.reconnected;
        self.more_queued |= other.more_queued;
    }
}

impl<'a> Session<'a> {
    async fn open(config: &'a WatchConfig) -> Result<Session<'a>, WatchError> {
        let connecting = Client::connector()
            .with_session_timeout(config.session_timeout)
            .connect(&config.connect);
        let client = timeout(config.session_timeout, connecting)
            .await
            .unwrap_or(Err(zookeeper_client::Error::Timeout))
            .map_err(|source| zookeeper_error("connect", &config.connect, source))?;
        // A new session may reach a server that lags the one the last session read from; `sync`
        // brings it up to date, so the registry never goes back to an older version.
        client
            .sync("/")
            .await
            .map_err(|source| zookeeper_error("sync", "/", source))?;
        // The watch goes first, so that no change made during the initial read is missed.
        let watcher = client
            .watch(&config.root, AddWatchMode::PersistentRecursive)
            .await
            .map_err(|source| zookeeper_error("watch", &config.root, source))?;
        tracing::info!(
            connect = config.connect,
            root = config.root,
            "ZooKeeper session open"
        );
        Ok(Session {
            config,
            client,
            watcher,
            registry: Registry::default(),
            listings: BTreeMap::new(),
            rejected_names: BTreeSet::new(),
            settling_until: Instant::now(),
        })
    }

    async fn follow(&mut self, publishers: &Publishers) -> Result<(), WatchError> {
        let mut changes = Changes {
            everything: true,
            ..Changes::default()
        };
        // A new session after one that served a registry is a reconnection too.
        if publishers.snapshots.borrow().synced {
            self.settling_until = Instant::now() + self.settling_time();
        }
        'batches: loop {
            if changes.disconnected {
                publishers.health.send_modify(Health::lost);
                changes = self.next_changes().await?;
                continue;
            }
            if changes.reconnected {
                self.settling_until = Instant::now() + self.settling_time();
                if let Err(error) = self.rewatch().await {
                    changes = Changes::after(error)?;
                    continue;
                }
            }
            let mut reading = if changes.everything {
                self.listings.keys().cloned().collect()
            } else {
                changes.services
            };
            // Changes seen during this batch's reads, to be read again by the next batch.
            let mut later = Changes::default();
            let mut consistent = false;
            for _ in 0..MAX_ROUNDS {
                let unsettled = match self.read(&reading, &publishers.stats).await {
                    Ok(Some(unsettled)) => unsettled,
                    Ok(None) => {
                        self.report_missing_root(publishers);
                        changes = self.next_changes().await?;
                        continue 'batches;
                    }
                    Err(error) => {
                        changes = Changes::after(error)?;
                        continue 'batches;
                    }
                };
                // ZooKeeper sends a change's event before any reply that reflects a later change.
                // So once the read is answered, every earlier change to a service outside the
                // read is queued: if there is none, the registry is one state of the tree.
                let queued = self.gather(Changes::default(), Instant::now()).await?;
                if queued.disconnected || queued.reconnected {
                    changes = queued;
                    continue 'batches;
                }
                let outside: Vec<String> = queued
                    .services
                    .iter()
                    .filter(|service| !reading.contains(*service))
                    .cloned()
                    .collect();
                let settled = unsettled.is_empty() && outside.is_empty() && !queued.more_queued;
                later.merge(queued);
                if settled {
                    consistent = true;
                    break;
                }
                reading.extend(unsettled);
                reading.extend(outside);
            }
            let mut held_until = None;
            if consistent {
                held_until = self.hold_sudden_drop(publishers);
                if held_until.is_none() {
                    publish(&self.registry, publishers);
                    publishers.health.send_modify(Health::read_now);
                }
            } else {
                // Publishing now could mix moments of the tree; keep serving the last snapshot
                // and read on.
                tracing::debug!("the registry kept changing while it was read; reading again");
                later.services.extend(reading);
            }
            changes = match (later.is_empty(), held_until) {
                (false, _) => later,
                (true, None) => self.next_changes().await?,
                // A held drop is read again when the hold ends, whatever happens meanwhile.
                (true, Some(until)) => {
                    timeout_at(until, self.next_changes())
                        .await
                        .unwrap_or(Ok(Changes {
                            everything: true,
                            ..Changes::default()
                        }))?
                }
            };
        }
    }

    /// How long a (re)connected session counts as settling: twice the session timeout, time
    /// for registrars whose sessions the same outage touched to reconnect or register again.
    fn settling_time(&self) -> Duration {
        self.config.session_timeout * 2
    }

    /// Holds back a registry that lost a large share of the published instances while the
    /// session is settling, and says so in health; returns when the hold ends.
    fn hold_sudden_drop(&self, publishers: &Publishers) -> Option<Instant> {
        let now = Instant::now();
        if now >= self.settling_until {
            return None;
        }
        let before = {
            let published = publishers.snapshots.borrow();
            if !published.synced {
                return None;
            }
            instance_count(&published.services.services)
        };
        let after = instance_count(&self.registry.services);
        if !is_sudden_drop(before, after, self.config.drop_protection) {
            return None;
        }
        let remaining = (self.settling_until - now).as_secs_f64().ceil();
        let problem = format!(
            "holding the last registry: instances fell from {before} to {after} right after connecting to ZooKeeper; publishing the drop if it lasts {remaining} s more"
        );
        if publishers.health.borrow().problem.as_ref() != Some(&problem) {
            tracing::warn!(before, after, "{problem}");
            publishers
                .health
                .send_modify(|health| health.unreadable(problem));
        }
        Some(self.settling_until)
    }

    /// A missing root is a misconfiguration (a typo in `--root`, a chroot that differs) or an
    /// operator's mistake, never an empty registry: publishing one would remove every cluster
    /// from every Envoy. The last snapshot stays, and readiness says why.
    fn report_missing_root(&self, publishers: &Publishers) {
        let problem = format!(
            "the registry root {} does not exist in ZooKeeper; serving the last registry read",
            self.config.root
        );
        let reported = publishers.health.borrow().problem.as_ref() == Some(&problem);
        if !reported {
            tracing::error!(root = self.config.root, "{problem}");
            publishers
                .health
                .send_modify(|health| health.unreadable(problem));
        }
    }

    /// Adds the persistent watch again after a reconnect. zookeeper-client 0.11 does not restore
    /// persistent watches on the new connection (its SetWatches request leaves them out), so
    /// without this the registry would stop following ZooKeeper after the first reconnect. Adding
    /// a watch the server still has is harmless.
    async fn rewatch(&mut self) -> Result<(), WatchError> {
        self.watcher = self
            .client
            .watch(&self.config.root, AddWatchMode::PersistentRecursive)
            .await
            .map_err(|source| zookeeper_error("watch", &self.config.root, source))?;
        Ok(())
    }

    /// Waits for the next event, then gathers those that arrive within the batch window.
    async fn next_changes(&mut self) -> Result<Changes, WatchError> {
        let mut changes = Changes::default();
        let first = self.watcher.changed().await;
        self.note(&mut changes, &first)?;
        self.gather(changes, Instant::now() + BATCH_WINDOW).await
    }

    /// Adds the events that arrive until `deadline` (only those already queued, for a deadline
    /// that has passed) to `changes`.
    async fn gather(
        &mut self,
        mut changes: Changes,
        deadline: Instant,
    ) -> Result<Changes, WatchError> {
        for _ in 0..MAX_BATCH {
            // `timeout_at` polls for the event before it looks at the deadline.
            match timeout_at(deadline, self.watcher.changed()).await {
                Ok(event) => self.note(&mut changes, &event)?,
                Err(_) => return Ok(changes),
            }
        }
        changes.more_queued = true;
        Ok(changes)
    }

    fn note(&self, changes: &mut Changes, event: &WatchedEvent) -> Result<(), WatchError> {
        if event.event_type != EventType::Session {
            match classify(&self.config.root, &event.path) {
                Some(Target::Root) => changes.everything = true,
                Some(Target::Service(service)) => {
                    changes.services.insert(service);
                }
                None => {}
            }
            return Ok(());
        }
        match event.session_state {
            SessionState::Disconnected => {
                tracing::warn!("ZooKeeper disconnected; serving the last snapshot");
                changes.disconnected = true;
            }
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                // Events can be lost across a reconnect (ZOOKEEPER-4698): read everything again.
                tracing::info!("ZooKeeper reconnected; re-reading the registry");
                changes.disconnected = false;
                changes.reconnected = true;
                changes.everything = true;
            }
            // Terminal: this session's watcher delivers nothing more.
            terminal => return Err(WatchError::SessionEnded(terminal)),
        }
        Ok(())
    }

    /// Reads the root's children and `services` in one atomic multi-read, so that what is read
    /// is one state of the tree, and applies it to the registry. Returns the services whose
    /// instances must be read again: new services, and services whose instance list was not
    /// the one asked for (their previous content is kept until then); `None` if the root does
    /// not exist, leaving the registry as it was.
    async fn read(
        &mut self,
        services: &BTreeSet<String>,
        stats: &DecodeStats,
    ) -> Result<Option<BTreeSet<String>>, WatchError> {
        let root = self.config.root.clone();
        let services: Vec<&String> = services
            .iter()
            .filter(|service| zklb_wire::is_valid_service_name(service))
            .collect();
        let mut reader = self.client.new_multi_reader();
        let queue = |added: Result<(), zookeeper_client::Error>, path: &str| {
            added.map_err(|source| zookeeper_error("read", path, source))
        };
        queue(reader.add_get_data(&root), &root)?;
        queue(reader.add_get_children(&root), &root)?;
        let mut asked = Vec::with_capacity(services.len());
        for service in services {
            let path = child_path(&root, service);
            let listing = self.listings.get(service).cloned().unwrap_or_default();
            queue(reader.add_get_data(&path), &path)?;
            queue(reader.add_get_children(&path), &path)?;
            for instance in &listing {
                let instance_path = child_path(&path, instance);
                queue(reader.add_get_data(&instance_path), &instance_path)?;
            }
            asked.push((service.clone(), listing));
        }
        let results = reader
            .commit()
            .await
            .map_err(|source| zookeeper_error("read", &root, source))?;
        let mut results = results.into_iter();

        let mut unsettled = BTreeSet::new();
        match node(&root, results.next(), results.next())? {
            Some((root_stat, children)) => {
                let names: Vec<String> = children
                    .into_iter()
                    .filter(|name| self.is_service_name(name, stats))
                    .collect();
                unsettled.extend(
                    names
                        .iter()
                        .filter(|name| {
                            !self.listings.contains_key(*name)
                                && !asked.iter().any(|(asked, _)| asked == *name)
                        })
                        .cloned(),
                );
                self.registry.retain_services(&names, root_stat.pzxid);
                self.listings.retain(|name, _| names.contains(name));
            }
            None => return Ok(None),
        }
        for (service, listing) in asked {
            let path = child_path(&root, &service);
            let read = node(&path, results.next(), results.next())?;
            let data: Vec<_> = (0..listing.len()).map(|_| results.next()).collect();
            let Some((stat, mut children)) = read else {
                self.registry.apply_service(&service, None, stats);
                self.listings.remove(&service);
                continue;
            };
            children.sort();
            let mut asked_for = listing.clone();
            asked_for.sort();
            let settled = children == asked_for;
            self.listings.insert(service.clone(), children);
            if !settled {
                unsettled.insert(service);
                continue;
            }
            let instances = listing
                .into_iter()
                .zip(data)
                .filter_map(|(name, result)| match result {
                    Some(MultiReadResult::Data { data, stat }) => Some(Znode {
                        name,
                        mzxid: stat.mzxid,
                        data,
                    }),
                    Some(MultiReadResult::Error { err }) => {
                        tracing::warn!(service, znode = name, error = %err, "cannot read instance znode");
                        None
                    }
                    _ => None,
                })
                .collect();
            self.registry.apply_service(
                &service,
                Some(ServiceRead {
                    czxid: stat.czxid,
                    pzxid: stat.pzxid,
                    instances,
                }),
                stats,
            );
        }
        Ok(Some(unsettled))
    }

    /// Whether a child of the root names a service zklb can publish; logs each bad name once.
    fn is_service_name(&mut self, name: &str, stats: &DecodeStats) -> bool {
        if zklb_wire::is_valid_service_name(name) {
            return true;
        }
        if self.rejected_names.insert(name.to_string()) {
            stats.rejected_names.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                service = name,
                "skipping service: names may only use ASCII letters, digits, '.', '_' and '-'"
            );
        }
        false
    }
}

fn instance_count(services: &BTreeMap<String, zklb_wire::Service>) -> usize {
    services
        .values()
        .map(|service| service.instances.len())
        .sum()
}

/// Whether going from `before` to `after` instances loses at least `share` of them.
fn is_sudden_drop(before: usize, after: usize, share: f64) -> bool {
    share > 0.0 && before > 0 && after < before && (before - after) as f64 >= share * before as f64
}

/// A node's stat and children from a multi-read's `get_data` and `get_children` results, or
/// `None` if the node does not exist.
fn node(
    path: &str,
    data: Option<MultiReadResult>,
    children: Option<MultiReadResult>,
) -> Result<Option<(Stat, Vec<String>)>, WatchError> {
    match (data, children) {
        (
            Some(MultiReadResult::Data { stat, .. }),
            Some(MultiReadResult::Children { children }),
        ) => Ok(Some((stat, children))),
        (
            Some(MultiReadResult::Error {
                err: zookeeper_client::Error::NoNode,
            }),
            _,
        ) => Ok(None),
        (Some(MultiReadResult::Error { err }), _) | (_, Some(MultiReadResult::Error { err })) => {
            Err(zookeeper_error("read", path, err))
        }
        _ => Err(zookeeper_error(
            "read",
            path,
            zookeeper_client::Error::UnexpectedError("a multi-read answered out of order".into()),
        )),
    }
}

fn publish(registry: &Registry, publishers: &Publishers) {
    let (services, conflicts) = registry.published();
    publishers.snapshots.send_if_modified(|current| {
        if current.synced && current.services == services && current.conflicts == conflicts {
            return false;
        }
        for (name, reason) in &conflicts {
            if !current.conflicts.contains_key(name) {
                tracing::warn!(service = name, "not routing service: {reason}");
            }
        }
        tracing::info!(
            version = services.version,
            services = services.services.len(),
            "publishing registry"
        );
        *current = Arc::new(current.succeeded_by(services).with_conflicts(conflicts));
        true
    });
}

fn zookeeper_error(
    operation: &'static str,
    path: &str,
    source: zookeeper_client::Error,
) -> WatchError {
    WatchError::ZooKeeper {
        operation,
        path: path.to_string(),
        source,
    }
}

/// What a changed path is, relative to the root.
#[derive(Debug, PartialEq)]
enum Target {
    Root,
    /// A service directory, or anything in it.
    Service(String),
}

fn classify(root: &str, path: &str) -> Option<Target> {
    if path == root {
        return Some(Target::Root);
    }
    let relative = path
        .strip_prefix(root.trim_end_matches('/'))?
        .strip_prefix('/')?;
    let service = relative
        .split_once('/')
        .map_or(relative, |(service, _)| service);
    Some(Target::Service(service.to_string()))
}

fn child_path(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified_relative_to_the_root() {
        assert_eq!(classify("/services", "/services"), Some(Target::Root));
        assert_eq!(
            classify("/services", "/services/echo"),
            Some(Target::Service("echo".into()))
        );
        assert_eq!(
            classify("/services", "/services/echo/a1"),
            Some(Target::Service("echo".into()))
        );
        assert_eq!(
            classify("/services", "/services/echo/a1/extra"),
            Some(Target::Service("echo".into()))
        );
        assert_eq!(classify("/services", "/servicesx/echo"), None);
        assert_eq!(classify("/", "/echo"), Some(Target::Service("echo".into())));
        assert_eq!(
            classify("/", "/echo/a1"),
            Some(Target::Service("echo".into()))
        );
    }

    #[test]
    fn a_sudden_drop_is_a_large_enough_share_of_all_instances() {
        assert!(is_sudden_drop(4, 1, 0.5));
        assert!(is_sudden_drop(4, 2, 0.5));
        assert!(!is_sudden_drop(4, 3, 0.5));
        assert!(is_sudden_drop(1, 0, 0.5));
        assert!(!is_sudden_drop(0, 0, 0.5), "nothing to lose");
        assert!(!is_sudden_drop(4, 6, 0.5), "a rise");
        assert!(!is_sudden_drop(100, 0, 0.0), "turned off");
    }

    #[test]
    fn child_paths_join_under_any_root() {
        assert_eq!(child_path("/services", "echo"), "/services/echo");
        assert_eq!(child_path("/", "echo"), "/echo");
    }
}
