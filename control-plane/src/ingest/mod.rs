//! The ZooKeeper side: one session at a time, a persistent recursive watch on every registry
//! root, and reads of exactly the znodes that changed. The only writer of snapshots.
//!
//! A session starts with a complete read of every root (in chunks, [`read`]); after that each
//! event costs a read of its own znode (and, for a deletion, of its parent's stat, for the
//! version). What is read is published once it is one moment of the tree: ZooKeeper sends a
//! change's event before any answer that reflects a later change, so when a read is answered and
//! no event about anything outside it is queued, nothing else moved meanwhile. Under churn that
//! never pauses (a rolling deploy), the registry is published anyway every [`MAX_UNSETTLED`].

mod read;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use thiserror::Error;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use zookeeper_client::{
    AddWatchMode, Client, EventType, PersistentWatcher, SessionState, WatchedEvent,
};

use zklb_zk_access::Access;

use crate::admin::Resync;
use crate::formats::RegistrySpec;
use crate::registry::{Publication, Registry};
use crate::resolve::Resolver;
use crate::secrets::SecretKeys;
use crate::snapshot::{Health, Publishers};
use crate::tree::parent_path;
use read::Found;

/// Where the registry lives and how to follow it.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// ZooKeeper connect string, `host:port[,host:port...]`.
    pub connect: String,
    /// TLS and the digest identity, if any.
    pub access: Access,
    pub registries: Vec<RegistrySpec>,
    pub session_timeout: Duration,
    /// The share of all instances (0 to 1; 0 turns it off) whose sudden disappearance right
    /// after a (re)connection is held back rather than published.
    pub drop_protection: f64,
    /// How often registered host names are resolved again.
    pub dns_refresh: Duration,
    /// Metadata keys never served.
    pub secrets: SecretKeys,
    /// Requests for a full read of every root.
    pub resync: Arc<Resync>,
}

#[derive(Debug, Error)]
pub enum WatchError {
    #[error("ZooKeeper {operation} {path}: {source}")]
    ZooKeeper {
        operation: &'static str,
        path: String,
        source: zookeeper_client::Error,
    },
    #[error("the ZooKeeper session ended ({0:?})")]
    SessionEnded(SessionState),
}

impl WatchError {
    fn zookeeper(operation: &'static str, path: &str, source: zookeeper_client::Error) -> Self {
        WatchError::ZooKeeper {
            operation,
            path: path.to_string(),
            source,
        }
    }
}

/// Events that arrive within this window after a first one are handled as one batch, so that a
/// burst of registrations costs a few multi-reads rather than one read each.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
const MAX_BATCH: usize = 10_000;
/// The longest the registry goes unpublished while it keeps changing under every read.
pub const MAX_UNSETTLED: Duration = Duration::from_millis(500);
/// Reconnection delays: doubling from the first to the last, each with up to half again of
/// random jitter, so that replicas cut off together do not return together. The last is short:
/// an attempt on a ZooKeeper that is away costs a refused or timed-out connection, and a long
/// wait would keep the lists stale for that long after ZooKeeper is back (a minute's outage
/// left them stale for up to 11 s with 30 s here).
const FIRST_RECONNECT: Duration = Duration::from_millis(250);
const LAST_RECONNECT: Duration = Duration::from_secs(4);
/// Retries of a znode that could not be read: doubling from the first to the last.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

/// Follows ZooKeeper until the task is dropped, publishing every change. A session that ends is
/// replaced by a new one, after a back-off; meanwhile the last snapshot keeps being served,
/// marked stale.
pub async fn ingest(config: IngestConfig, publishers: Publishers) {
    let mut registry = Registry::new(config.registries.clone(), Arc::clone(&publishers.stats))
        .hiding(config.secrets.clone());
    let mut resolver = Resolver::new(config.dns_refresh);
    let mut failures = 0;
    loop {
        let problem = match Session::open(&config).await {
            Ok(mut session) => {
                let ended = session
                    .follow(&mut registry, &mut resolver, &publishers)
                    .await;
                if session.published {
                    failures = 0;
                }
                match ended {
                    Ok(()) => None,
                    Err(error) => {
                        tracing::warn!(%error, "ZooKeeper session lost; opening a new one");
                        Some(error.to_string())
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, connect = config.connect, "cannot open a ZooKeeper session");
                Some(error.to_string())
            }
        };
        publishers.health.send_modify(|health| {
            health.lost();
            health.problem = problem.filter(|_| failures > 0);
        });
        tokio::time::sleep(backoff(failures, FIRST_RECONNECT, LAST_RECONNECT, true)).await;
        failures += 1;
    }
}

/// The wait after `failures` failures in a row: doubling from `first` up to `last`, plus up to
/// half again at random when `jitter`.
fn backoff(failures: u32, first: Duration, last: Duration, jitter: bool) -> Duration {
    let base = first.saturating_mul(1 << failures.min(20)).min(last);
    if !jitter {
        return base;
    }
    // A random number without a dependency: every RandomState has fresh random keys.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    base + base.mul_f64((random % 1000) as f64 / 2000.0)
}

struct Session<'a> {
    config: &'a IngestConfig,
    client: Client,
    /// One per root, in the order of the configuration.
    watchers: Vec<PersistentWatcher>,
    /// Until when the session counts as just (re)connected, when a sudden drop of instances is
    /// more likely a ZooKeeper mishap (lost data, a replaced ensemble, registrars' sessions
    /// expired by the same outage and about to come back) than a fleet going away.
    settling_until: Instant,
    /// Znodes that could not be read, and when to try again.
    retries: BTreeMap<String, Retry>,
    /// Whether this session has published a registry.
    published: bool,
}

#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Instant,
    failures: u32,
}

/// What a batch of events asks to read.
#[derive(Debug, Default)]
struct Work {
    /// Znodes created or changed, and parents of deleted ones (for their stat).
    reads: BTreeSet<String>,
    deletions: BTreeSet<String>,
    /// Subtrees to read whole: the roots after (re)connecting or when one appears, and znodes
    /// that could not be read before.
    subtrees: BTreeSet<String>,
    disconnected: bool,
    /// The session reconnected, and the server may have forgotten the persistent watches.
    reconnected: bool,
    /// More events were queued than one batch takes.
    more_queued: bool,
    /// Something changed that needs no read (a host name resolved, a hold ended).
    wake: bool,
}

impl Work {
    fn everything(registry: &Registry) -> Work {
        Work {
            subtrees: registry.specs().map(|spec| spec.root.clone()).collect(),
            ..Work::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.reads.is_empty()
            && self.deletions.is_empty()
            && self.subtrees.is_empty()
            && !self.disconnected
            && !self.reconnected
            && !self.more_queued
            && !self.wake
    }

    /// What to do after a failed request: wait for the reconnection if the connection was lost
    /// (requests fail with it while the client reconnects), end the session otherwise.
    fn after(error: WatchError) -> Result<Work, WatchError> {
        match error {
            WatchError::ZooKeeper {
                source: zookeeper_client::Error::ConnectionLoss,
                ..
            } => Ok(Work {
                disconnected: true,
                ..Work::default()
            }),
            error => Err(error),
        }
    }

    /// Whether a read of this work, answered at one moment, together with `queued` (what arrived
    /// by the time it was answered) leaves the registry at one moment of the tree: nothing is
    /// queued, or only changes to znodes that the one read covered.
    fn settles(&self, queued: &Work) -> bool {
        if queued.is_empty() {
            return true;
        }
        let one_moment = self.subtrees.is_empty() && read::is_one_read(self.reads.len());
        one_moment
            && queued.subtrees.is_empty()
            && !queued.more_queued
            && queued
                .reads
                .iter()
                .chain(&queued.deletions)
                .all(|path| self.reads.contains(path))
    }
}

impl<'a> Session<'a> {
    async fn open(config: &'a IngestConfig) -> Result<Session<'a>, WatchError> {
        let connecting = config
            .access
            .connect(&config.connect, config.session_timeout);
        let client = timeout(config.session_timeout, connecting)
            .await
            .unwrap_or(Err(zookeeper_client::Error::Timeout))
            .map_err(|source| WatchError::zookeeper("connect", &config.connect, source))?;
        // A new session may reach a server that lags the one the last session read from; `sync`
        // brings it up to date, so the registry never goes back to an older version.
        client
            .sync("/")
            .await
            .map_err(|source| WatchError::zookeeper("sync", "/", source))?;
        // The watches go first, so that no change made during the initial read is missed.
        let mut watchers = Vec::with_capacity(config.registries.len());
        for spec in &config.registries {
            watchers.push(watch(&client, &spec.root).await?);
        }
        tracing::info!(
            connect = config.connect,
            registries = ?config.registries.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ZooKeeper session open"
        );
        Ok(Session {
            config,
            client,
            watchers,
            settling_until: Instant::now(),
            retries: BTreeMap::new(),
            published: false,
        })
    }

    async fn follow(
        &mut self,
        registry: &mut Registry,
        resolver: &mut Resolver,
        publishers: &Publishers,
    ) -> Result<(), WatchError> {
        // A new session after one that served a registry is a reconnection too.
        if publishers.snapshots.borrow().synced {
            self.settling_until = Instant::now() + self.settling_time();
        }
        let mut work = Work::everything(registry);
        let mut last_publication = Instant::now();
        loop {
            if work.disconnected {
                publishers.health.send_modify(Health::lost);
                work = self.next_work(registry, resolver, None).await?;
                continue;
            }
            if work.reconnected {
                self.settling_until = Instant::now() + self.settling_time();
                if let Err(error) = self.rewatch().await {
                    work = Work::after(error)?;
                    continue;
                }
                work = Work::everything(registry);
            }
            if let Err(error) = self.read(&work, registry).await {
                work = Work::after(error)?;
                continue;
            }
            registry.refresh();
            resolver.track(registry.host_names(), Instant::now());
            resolver.start_due(Instant::now());
            let queued = self
                .gather_until(registry, Work::default(), Instant::now())
                .await?;
            if queued.disconnected || queued.reconnected {
                work = queued;
                continue;
            }
            let mut held_until = None;
            if work.settles(&queued) || last_publication.elapsed() >= MAX_UNSETTLED {
                held_until = self.publish(registry, publishers);
                last_publication = Instant::now();
            }
            work = if queued.is_empty() {
                self.next_work(registry, resolver, held_until).await?
            } else {
                queued
            };
        }
    }

    /// How long a (re)connected session counts as settling: twice the session timeout, time
    /// for registrars whose sessions the same outage touched to reconnect or register again.
    fn settling_time(&self) -> Duration {
        self.config.session_timeout * 2
    }

    /// Reads what `work` asks for into the registry.
    async fn read(&mut self, work: &Work, registry: &mut Registry) -> Result<(), WatchError> {
        for path in &work.subtrees {
            let skip = |path: &str| registry.is_ignored(path);
            let (tree, unreadable) = read::read_subtree(&self.client, path, skip).await?;
            registry.replace_subtree(path, tree);
            for (path, reason) in unreadable {
                self.unreadable(registry, path, reason);
            }
        }
        for path in &work.deletions {
            registry.apply_deletion(path);
            self.retries.remove(path);
        }
        let paths: Vec<String> = work.reads.iter().cloned().collect();
        let found = read::read_data(&self.client, &paths).await?;
        let mut orphans = BTreeSet::new();
        for (path, found) in paths.into_iter().zip(found) {
            match found {
                Found::Znode(znode) => {
                    self.retries.remove(&path);
                    registry.apply_read(&path, Some(znode));
                    // ZooKeeper tells a watcher of no znode it may not read: a parent never
                    // heard of may be one, and is read (or reported) with everything below it.
                    if let Some(parent) =
                        parent_path(&path).filter(|parent| !registry.knows(parent))
                    {
                        orphans.insert(parent.to_string());
                    }
                }
                Found::Missing => registry.apply_read(&path, None),
                Found::Unreadable(reason) => self.unreadable(registry, path, reason),
            }
        }
        for parent in orphans {
            let skip = |path: &str| registry.is_ignored(path);
            let (tree, unreadable) = read::read_subtree(&self.client, &parent, skip).await?;
            registry.replace_subtree(&parent, tree);
            for (path, reason) in unreadable {
                self.unreadable(registry, path, reason);
            }
        }
        Ok(())
    }

    /// Reports a znode that cannot be read, and schedules it to be read again.
    fn unreadable(&mut self, registry: &mut Registry, path: String, reason: String) {
        let failures = self.retries.get(&path).map_or(0, |retry| retry.failures);
        let wait = backoff(failures, FIRST_RETRY, LAST_RETRY, false);
        if failures == 0 {
            tracing::warn!(znode = path, %reason, "cannot read a znode; reading it again later");
        }
        registry.apply_unreadable(&path, reason);
        self.retries.insert(
            path,
            Retry {
                at: Instant::now() + wait,
                failures: failures + 1,
            },
        );
    }

    /// Publishes the registry if it can and anything changed; returns when a held drop should be
    /// looked at again.
    fn publish(&mut self, registry: &mut Registry, publishers: &Publishers) -> Option<Instant> {
        let problem = missing_roots_problem(registry);
        if !registry.is_readable() {
            report(publishers, problem);
            return None;
        }
        registry.publish();
        let publication = registry.publication();
        if let Some(until) = self.hold_sudden_drop(publication, publishers) {
            return Some(until);
        }
        publish(publication, publishers);
        self.published = true;
        publishers.health.send_modify(|health| {
            health.read_now();
            health.problem = problem;
        });
        None
    }

    /// Holds back a registry that lost a large share of the published instances while the
    /// session is settling, and says so in health; returns when the hold ends.
    fn hold_sudden_drop(
        &self,
        publication: &Publication,
        publishers: &Publishers,
    ) -> Option<Instant> {
        let now = Instant::now();
        if now >= self.settling_until {
            return None;
        }
        let before = {
            let published = publishers.snapshots.borrow();
            if !published.synced {
                return None;
            }
            instance_count(&published.publication)
        };
        let after = instance_count(publication);
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

    /// Adds the persistent watches again after a reconnect. zookeeper-client 0.11 does not
    /// restore persistent watches on the new connection (its SetWatches request leaves them
    /// out), so without this the registry would stop following ZooKeeper after the first
    /// reconnect. Adding a watch the server still has is harmless.
    async fn rewatch(&mut self) -> Result<(), WatchError> {
        for (watcher, spec) in self.watchers.iter_mut().zip(&self.config.registries) {
            *watcher = watch(&self.client, &spec.root).await?;
        }
        Ok(())
    }

    /// Waits for the next thing to do: events (gathered over the batch window), a host name
    /// resolved, a znode due to be read again, or the end of a held drop.
    async fn next_work(
        &mut self,
        registry: &mut Registry,
        resolver: &mut Resolver,
        held_until: Option<Instant>,
    ) -> Result<Work, WatchError> {
        let far = Instant::now() + Duration::from_secs(3600);
        loop {
            let lookup_due = resolver.next_due().unwrap_or(far);
            let retry_due = self.retries.values().map(|retry| retry.at).min();
            tokio::select! {
                event = next_event(&mut self.watchers) => {
                    let mut work = Work::default();
                    note(registry, &mut work, &event)?;
                    return self.gather_until(registry, work, Instant::now() + BATCH_WINDOW).await;
                }
                (name, resolved) = resolver.finished() => {
                    registry.apply_resolution(&name, resolved);
                    return Ok(Work { wake: true, ..Work::default() });
                }
                _ = sleep_until(lookup_due) => resolver.start_due(Instant::now()),
                _ = sleep_until(retry_due.unwrap_or(far)), if retry_due.is_some() => {
                    let now = Instant::now();
                    let subtrees = self
                        .retries
                        .iter()
                        .filter(|(_, retry)| retry.at <= now)
                        .map(|(path, _)| path.clone())
                        .collect();
                    return Ok(Work { subtrees, ..Work::default() });
                }
                _ = sleep_until(held_until.unwrap_or(far)), if held_until.is_some() => {
                    return Ok(Work { wake: true, ..Work::default() });
                }
                _ = self.config.resync.requested() => {
                    tracing::info!("reading every registry root again, as requested");
                    self.retries.clear();
                    self.config.resync.count_done();
                    return Ok(Work::everything(registry));
                }
            }
        }
    }

    /// Adds the events that arrive until `deadline` to `work`; with a deadline that has passed,
    /// the events already queued (a ready event is taken before the deadline is looked at).
    async fn gather_until(
        &mut self,
        registry: &Registry,
        mut work: Work,
        deadline: Instant,
    ) -> Result<Work, WatchError> {
        for _ in 0..MAX_BATCH {
            match timeout_at(deadline, next_event(&mut self.watchers)).await {
                Ok(event) => note(registry, &mut work, &event)?,
                Err(_) => return Ok(work),
            }
        }
        work.more_queued = true;
        Ok(work)
    }
}

/// Adds what an event asks for to `work`.
fn note(registry: &Registry, work: &mut Work, event: &WatchedEvent) -> Result<(), WatchError> {
    if event.event_type != EventType::Session {
        let path = &event.path;
        if registry.is_ignored(path) {
            return Ok(());
        }
        let is_root = registry.specs().any(|spec| spec.root == *path);
        match event.event_type {
            EventType::NodeCreated if is_root => {
                work.subtrees.insert(path.clone());
            }
            EventType::NodeCreated | EventType::NodeDataChanged => {
                work.reads.insert(path.clone());
            }
            EventType::NodeDeleted => {
                work.deletions.insert(path.clone());
                // The parent's stat carries the zxid of the deletion, for the version.
                if let Some(parent) = parent_path(path).filter(|_| !is_root) {
                    work.reads.insert(parent.to_string());
                }
            }
            _ => {}
        }
        return Ok(());
    }
    match event.session_state {
        SessionState::Disconnected => {
            if !work.disconnected {
                tracing::warn!("ZooKeeper disconnected; serving the last snapshot");
            }
            work.disconnected = true;
        }
        SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
            // Events can be lost across a reconnect (ZOOKEEPER-4698): read everything again.
            if !work.reconnected {
                tracing::info!("ZooKeeper reconnected; reading the registry again");
            }
            work.disconnected = false;
            work.reconnected = true;
        }
        // Terminal: this session's watchers deliver nothing more.
        terminal => return Err(WatchError::SessionEnded(terminal)),
    }
    Ok(())
}

/// The next event of any watcher. Taking an event from a watcher's channel is all or nothing,
/// so the watchers that did not answer first lose nothing.
async fn next_event(watchers: &mut [PersistentWatcher]) -> WatchedEvent {
    type Change<'w> = Pin<Box<dyn Future<Output = WatchedEvent> + Send + 'w>>;
    let mut changes: Vec<Change<'_>> = watchers
        .iter_mut()
        .map(|watcher| Box::pin(watcher.changed()) as Change<'_>)
        .collect();
    std::future::poll_fn(|context| {
        for change in &mut changes {
            if let Poll::Ready(event) = change.as_mut().poll(context) {
                return Poll::Ready(event);
            }
        }
        Poll::Pending
    })
    .await
}

async fn watch(client: &Client, root: &str) -> Result<PersistentWatcher, WatchError> {
    client
        .watch(root, AddWatchMode::PersistentRecursive)
        .await
        .map_err(|source| WatchError::zookeeper("watch", root, source))
}

/// Why the registry is not whole, if a root is missing: a misconfiguration (a typo, a chroot
/// that differs) or an operator's mistake, never an empty registry, which would remove every
/// cluster from every Envoy.
fn missing_roots_problem(registry: &Registry) -> Option<String> {
    let missing = registry.missing_roots();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "the registry root {} does not exist in ZooKeeper; serving the last registry read",
        missing.join(", ")
    ))
}

/// Says why the registry cannot be published, once.
fn report(publishers: &Publishers, problem: Option<String>) {
    let Some(problem) = problem else {
        return;
    };
    if publishers.health.borrow().problem.as_ref() != Some(&problem) {
        tracing::error!("{problem}");
        publishers
            .health
            .send_modify(|health| health.unreadable(problem));
    }
}

fn publish(publication: &Publication, publishers: &Publishers) {
    publishers.snapshots.send_if_modified(|current| {
        let published = &current.publication;
        if current.synced
            && published.version == publication.version
            && published.conflicts == publication.conflicts
            && published.problems == publication.problems
        {
            return false;
        }
        for (name, reason) in &publication.conflicts {
            if !published.conflicts.contains_key(name) {
                tracing::warn!(service = name, "not routing service: {reason}");
            }
        }
        if !current.synced || published.version != publication.version {
            tracing::info!(
                version = publication.version,
                services = publication.services.len(),
                "publishing registry"
            );
        }
        *current = Arc::new(current.succeeded_by(publication.clone()));
        true
    });
}

fn instance_count(publication: &Publication) -> usize {
    publication
        .services
        .values()
        .map(|service| service.instances.len())
        .sum()
}

/// Whether going from `before` to `after` instances loses at least `share` of them.
fn is_sudden_drop(before: usize, after: usize, share: f64) -> bool {
    share > 0.0 && before > 0 && after < before && (before - after) as f64 >= share * before as f64
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn reconnections_back_off_with_jitter() {
        let first = Duration::from_millis(250);
        let last = Duration::from_secs(30);
        let plain: Vec<u128> = (0..9)
            .map(|failures| backoff(failures, first, last, false).as_millis())
            .collect();
        assert_eq!(
            plain,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
        for failures in 0..9 {
            let base = backoff(failures, first, last, false);
            let jittered = backoff(failures, first, last, true);
            assert!(
                jittered >= base && jittered <= base + base / 2,
                "{jittered:?}"
            );
        }
    }

    #[test]
    fn a_read_settles_when_nothing_outside_it_moved() {
        let read = |paths: &[&str]| Work {
            reads: paths.iter().map(|path| path.to_string()).collect(),
            ..Work::default()
        };
        let work = read(&["/s/a/1", "/s/b/1"]);
        assert!(work.settles(&Work::default()));
        assert!(
            work.settles(&read(&["/s/a/1"])),
            "a later change to what was read"
        );
        assert!(
            !work.settles(&read(&["/s/c/1"])),
            "a change it did not read"
        );
        let deleted = Work {
            deletions: ["/s/c/1".to_string()].into(),
            ..Work::default()
        };
        assert!(!work.settles(&deleted));
        let whole = Work {
            subtrees: ["/s".to_string()].into(),
            ..Work::default()
        };
        assert!(
            !whole.settles(&read(&["/s/a/1"])),
            "a read in chunks is no one moment"
        );
        assert!(whole.settles(&Work::default()));
    }
}
