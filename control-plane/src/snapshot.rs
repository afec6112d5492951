//! What the watcher publishes and every HTTP and xDS handler reads.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use zklb_wire::{Freshness, ServiceSet, Version};

use crate::registry::{DecodeStats, Registry};

/// The registry as last read from ZooKeeper. Only the watcher writes one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub services: ServiceSet,
    /// Version of the set of service names, which is all that Envoy's cluster list depends on.
    pub clusters_version: Version,
    /// False only for the placeholder before ZooKeeper was first read: its empty list says
    /// nothing about the registry and must never reach Envoy or the filter, where it would
    /// remove every service.
    pub synced: bool,
}

impl Snapshot {
    pub fn of(registry: &Registry) -> Snapshot {
        Snapshot {
            services: registry.to_service_set(),
            clusters_version: registry.services_pzxid,
            synced: true,
        }
    }
}

/// How fresh the snapshot is, and what keeps it from following ZooKeeper.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Whether the snapshot follows ZooKeeper right now (connected and read).
    pub connected: bool,
    /// Whether ZooKeeper has been read at least once.
    pub synced: bool,
    /// Since when the snapshot may lag ZooKeeper; `None` while connected.
    pub stale_since: Option<SystemTime>,
    /// When the last consistent read of the registry completed.
    pub last_sync: Option<SystemTime>,
    /// Why the registry cannot be read although ZooKeeper answers (a missing root, say).
    pub problem: Option<String>,
}

impl Health {
    /// A consistent read of the registry has just completed.
    pub fn read_now(&mut self) {
        *self = Health {
            connected: true,
            synced: true,
            stale_since: None,
            last_sync: Some(SystemTime::now()),
            problem: None,
        };
    }

    pub fn lost(&mut self) {
        self.connected = false;
        self.stale_since.get_or_insert_with(SystemTime::now);
    }

    /// ZooKeeper answers but the registry cannot be read: the last snapshot stays published and
    /// stale until it can.
    pub fn unreadable(&mut self, problem: String) {
        self.connected = true;
        self.stale_since.get_or_insert_with(SystemTime::now);
        self.problem = Some(problem);
    }

    /// Seconds the snapshot may have lagged ZooKeeper; zero while it follows it.
    pub fn stale_seconds(&self) -> f64 {
        self.stale_since
            .map(|since| since.elapsed().unwrap_or_default().as_secs_f64())
            .unwrap_or(0.0)
    }

    /// The freshness that goes with every published list.
    pub fn freshness(&self) -> Freshness {
        Freshness {
            stale: self.stale_since.is_some(),
            last_sync: self.last_sync.map(|at| {
                at.duration_since(UNIX_EPOCH).map_or(0, |since| {
                    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
                })
            }),
            session: self.session().to_string(),
        }
    }

    pub fn session(&self) -> &'static str {
        match (self.synced, self.connected) {
            (_, true) => "connected",
            (false, false) => "starting",
            (true, false) => "disconnected",
        }
    }
}

/// The sending and receiving ends that tie the watcher to the servers.
#[derive(Clone)]
pub struct Channels {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub health: watch::Receiver<Health>,
    pub stats: Arc<DecodeStats>,
}

pub struct Publishers {
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    pub health: watch::Sender<Health>,
    pub stats: Arc<DecodeStats>,
}

pub fn channels() -> (Publishers, Channels) {
    let (snapshots_tx, snapshots_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (health_tx, health_rx) = watch::channel(Health::default());
    let stats = Arc::new(DecodeStats::default());
    (
        Publishers {
            snapshots: snapshots_tx,
            health: health_tx,
            stats: Arc::clone(&stats),
        },
        Channels {
            snapshots: snapshots_rx,
            health: health_rx,
            stats,
        },
    )
}
