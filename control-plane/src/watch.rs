//! The ZooKeeper side: one session at a time, one persistent recursive watch on the root, and
//! re-reads of whatever changed. The only writer of snapshots.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::time::timeout;
use zookeeper_client::{
    AddWatchMode, Client, EventType, PersistentWatcher, SessionState, WatchedEvent,
};

use crate::registry::{is_service_directory, Registry, ServiceRead, Znode};
use crate::snapshot::{Health, Publishers, Snapshot};

/// Where the registry lives and how to reach it.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// ZooKeeper connect string, `host:port[,host:port...]`.
    pub connect: String,
    /// The znode whose children are services.
    pub root: String,
    pub session_timeout: Duration,
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

/// Events that arrive within this window are handled as one batch, so that a burst of
/// registrations costs one read per service rather than one per event.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
const MAX_BATCH: usize = 10_000;
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
}

/// What a batch of events asks to re-read.
#[derive(Debug, Default)]
struct Changes {
    /// Re-read everything: the root itself changed, or events may have been lost.
    everything: bool,
    /// The root's children (the set of services) changed.
    service_set: bool,
    services: BTreeSet<String>,
    disconnected: bool,
    /// The session reconnected, and the server may have forgotten the persistent watch.
    reconnected: bool,
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
        })
    }

    async fn follow(&mut self, publishers: &Publishers) -> Result<(), WatchError> {
        let mut changes = Changes {
            everything: true,
            ..Changes::default()
        };
        loop {
            if changes.disconnected {
                publishers.health.send_modify(Health::lost);
            } else {
                if changes.reconnected {
                    self.rewatch().await?;
                }
                self.read(&changes, publishers).await?;
                publish(&self.registry, publishers);
            }
            changes = self.next_changes().await?;
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

    /// Waits for the next event, then gathers the ones right behind it.
    async fn next_changes(&mut self) -> Result<Changes, WatchError> {
        let mut changes = Changes::default();
        let first = self.watcher.changed().await;
        self.note(&mut changes, &first)?;
        for _ in 0..MAX_BATCH {
            match timeout(BATCH_WINDOW, self.watcher.changed()).await {
                Ok(event) => self.note(&mut changes, &event)?,
                Err(_) => break,
            }
        }
        Ok(changes)
    }

    fn note(&self, changes: &mut Changes, event: &WatchedEvent) -> Result<(), WatchError> {
        if event.event_type != EventType::Session {
            match classify(&self.config.root, &event.path) {
                Some(Target::Root) => changes.everything = true,
                Some(Target::Service(name)) => {
                    changes.service_set = true;
                    changes.services.insert(name);
                }
                Some(Target::Instance(service)) => {
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

    async fn read(&mut self, changes: &Changes, publishers: &Publishers) -> Result<(), WatchError> {
        let mut services = changes.services.clone();
        if changes.everything || changes.service_set {
            let (children, pzxid) = self.read_root().await?;
            let children: Vec<String> = children
                .into_iter()
                .filter(|name| is_service_directory(name))
                .collect();
            if changes.everything {
                services.extend(children.iter().cloned());
            } else {
                // New services are read even if no event named them yet.
                services.extend(
                    children
                        .iter()
                        .filter(|name| !self.registry.services.contains_key(*name))
                        .cloned(),
                );
            }
            self.registry.retain_services(&children, pzxid);
        }
        for name in services {
            if !zklb_wire::is_valid_service_name(&name) {
                continue;
            }
            let read = self.read_service(&name).await?;
            self.registry.apply_service(&name, read, &publishers.stats);
        }
        publishers.health.send_replace(Health::in_sync());
        Ok(())
    }

    /// The services under the root and the root's pzxid; a missing root is an empty registry.
    async fn read_root(&self) -> Result<(Vec<String>, i64), WatchError> {
        match self.client.get_children(&self.config.root).await {
            Ok((children, stat)) => Ok((children, stat.pzxid)),
            Err(zookeeper_client::Error::NoNode) => Ok((Vec::new(), 0)),
            Err(source) => Err(zookeeper_error("list", &self.config.root, source)),
        }
    }

    async fn read_service(&self, name: &str) -> Result<Option<ServiceRead>, WatchError> {
        let path = child_path(&self.config.root, name);
        let (children, stat) = match self.client.get_children(&path).await {
            Ok(listing) => listing,
            Err(zookeeper_client::Error::NoNode) => return Ok(None),
            Err(source) => return Err(zookeeper_error("list", &path, source)),
        };
        // Requests are sent when their futures are created: issue them all, then collect, so that
        // a large service costs one round trip rather than one per instance.
        let reads: Vec<_> = children
            .iter()
            .map(|child| self.client.get_data(&child_path(&path, child)))
            .collect();
        let mut instances = Vec::with_capacity(children.len());
        for (child, read) in children.into_iter().zip(reads) {
            match read.await {
                Ok((data, stat)) => instances.push(Znode {
                    name: child,
                    mzxid: stat.mzxid,
                    data,
                }),
                // Deleted since the listing; its deletion event follows.
                Err(zookeeper_client::Error::NoNode) => {}
                Err(source) => {
                    return Err(zookeeper_error("read", &child_path(&path, &child), source))
                }
            }
        }
        Ok(Some(ServiceRead {
            pzxid: stat.pzxid,
            instances,
        }))
    }
}

fn publish(registry: &Registry, publishers: &Publishers) {
    let snapshot = Snapshot::of(registry);
    publishers.snapshots.send_if_modified(|current| {
        if **current == snapshot {
            return false;
        }
        tracing::info!(
            version = snapshot.services.version,
            services = snapshot.services.services.len(),
            "publishing registry"
        );
        *current = Arc::new(snapshot);
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
    Service(String),
    /// An instance znode, or anything deeper, of this service.
    Instance(String),
}

fn classify(root: &str, path: &str) -> Option<Target> {
    if path == root {
        return Some(Target::Root);
    }
    let relative = path
        .strip_prefix(root.trim_end_matches('/'))?
        .strip_prefix('/')?;
    match relative.split_once('/') {
        None => Some(Target::Service(relative.to_string())),
        Some((service, _)) => Some(Target::Instance(service.to_string())),
    }
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
            Some(Target::Instance("echo".into()))
        );
        assert_eq!(
            classify("/services", "/services/echo/a1/extra"),
            Some(Target::Instance("echo".into()))
        );
        assert_eq!(classify("/services", "/servicesx/echo"), None);
        assert_eq!(classify("/", "/echo"), Some(Target::Service("echo".into())));
        assert_eq!(
            classify("/", "/echo/a1"),
            Some(Target::Instance("echo".into()))
        );
    }

    #[test]
    fn child_paths_join_under_any_root() {
        assert_eq!(child_path("/services", "echo"), "/services/echo");
        assert_eq!(child_path("/", "echo"), "/echo");
    }
}
