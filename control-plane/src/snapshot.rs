//! What the watcher publishes and every HTTP and xDS handler reads.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use tokio::sync::watch;
use zklb_wire::{Freshness, Service, ServiceChanges, Version};

use crate::registry::{DecodeStats, Publication};

/// The registry as last read from ZooKeeper. Only the ingest side writes one.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub publication: Publication,
    /// False only for the placeholder before ZooKeeper was first read: its empty list says
    /// nothing about the registry and must never reach Envoy or the filter, where it would
    /// remove every service.
    pub synced: bool,
    /// The services this process saw disappear, with the registry version it saw them gone at
    /// (no older than their removal), so that a client can be told what it must drop.
    pub removed: BTreeMap<String, Version>,
    /// The oldest version that changes can be counted from: this process's first registry, or
    /// later once old removals are forgotten. A client behind it gets the whole registry.
    pub horizon: Version,
    /// The JSON of every service, made once however many clients ask for the whole registry.
    services_json: OnceLock<Box<RawValue>>,
}

/// Removals remembered for clients that lag; the oldest beyond this are forgotten (and the
/// horizon moves past them), so that churn of service names cannot grow memory for ever.
const MAX_REMOVALS: usize = 10_000;

impl Snapshot {
    /// The snapshot that follows this one when the registry publishes `publication`.
    pub fn succeeded_by(&self, publication: Publication) -> Snapshot {
        self.succeeded_within(publication, MAX_REMOVALS)
    }

    fn succeeded_within(&self, publication: Publication, max_removals: usize) -> Snapshot {
        if !self.synced {
            return Snapshot {
                horizon: publication.version,
                publication,
                synced: true,
                ..Snapshot::default()
            };
        }
        let services = &publication.services;
        let mut removed = self.removed.clone();
        for name in self.publication.services.keys() {
            if !services.contains_key(name) {
                removed.insert(name.clone(), publication.version);
            }
        }
        removed.retain(|name, _| !services.contains_key(name));
        let mut horizon = self.horizon;
        while removed.len() > max_removals {
            let Some(oldest) = removed.values().min().copied() else {
                break;
            };
            removed.retain(|_, at| *at > oldest);
            horizon = horizon.max(oldest);
        }
        Snapshot {
            publication,
            synced: true,
            removed,
            horizon,
            services_json: OnceLock::new(),
        }
    }

    /// The registry version: the newest ZooKeeper change it reflects.
    pub fn version(&self) -> Version {
        self.publication.version
    }

    pub fn services(&self) -> &BTreeMap<String, Arc<Service>> {
        &self.publication.services
    }

    /// Every service as JSON (the `services` of a list), serialized once per snapshot.
    pub fn services_json(&self) -> &RawValue {
        self.services_json.get_or_init(|| {
            serde_json::value::to_raw_value(self.services())
                .expect("a map of plain structs with string keys always serializes")
        })
    }

    /// What changed since `after`: the services whose version moved and those removed; `None`
    /// when `after` is older than the horizon, so that only the whole registry will do.
    pub fn changes_since(&self, after: Version) -> Option<ServiceChanges> {
        if after < self.horizon {
            return None;
        }
        Some(ServiceChanges {
            version: self.version(),
            full: false,
            services: self
                .services()
                .iter()
                .filter(|(_, service)| service.version > after)
                .map(|(name, service)| (name.clone(), Service::clone(service)))
                .collect(),
            removed: self
                .removed
                .iter()
                .filter(|(_, &at)| at > after)
                .map(|(name, _)| name.clone())
                .collect(),
            freshness: Freshness::default(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(services: &[(&str, Version)]) -> Publication {
        let services: BTreeMap<String, Arc<Service>> = services
            .iter()
            .map(|&(name, version)| {
                let service = Service {
                    name: name.into(),
                    version,
                    ..Service::default()
                };
                (name.to_string(), Arc::new(service))
            })
            .collect();
        let version = services.values().map(|s| s.version).max().unwrap_or(0);
        Publication {
            version,
            services,
            ..Publication::default()
        }
    }

    fn names(changes: &ServiceChanges) -> Vec<&str> {
        changes.services.keys().map(String::as_str).collect()
    }

    #[test]
    fn changes_since_a_version_are_the_services_that_moved_and_those_removed() {
        let first = Snapshot::default().succeeded_by(set(&[("a", 3), ("b", 4), ("c", 5)]));
        assert_eq!(first.horizon, 5);
        let second = first.succeeded_by(set(&[("a", 3), ("b", 8)]));
        let third = second.succeeded_by(set(&[("a", 3), ("b", 8), ("d", 9)]));
        let since_five = third.changes_since(5).expect("counted");
        assert!(!since_five.full);
        assert_eq!(names(&since_five), ["b", "d"]);
        assert_eq!(since_five.removed, ["c"]);
        let since_eight = third.changes_since(8).expect("counted");
        assert_eq!(names(&since_eight), ["d"]);
        assert!(since_eight.removed.is_empty(), "c was gone before 8");
        assert_eq!(
            third.changes_since(9).map(|changes| changes.services.len()),
            Some(0)
        );
    }

    #[test]
    fn a_client_behind_the_horizon_needs_everything() {
        let first = Snapshot::default().succeeded_by(set(&[("a", 3), ("b", 7)]));
        assert!(first.changes_since(6).is_none());
        let whole: BTreeMap<String, Service> =
            serde_json::from_str(first.services_json().get()).expect("the services parse");
        let published: BTreeMap<String, Service> = first
            .services()
            .iter()
            .map(|(name, service)| (name.clone(), Service::clone(service)))
            .collect();
        assert_eq!(whole, published);
    }

    #[test]
    fn a_service_that_returns_is_no_longer_removed() {
        let first = Snapshot::default().succeeded_by(set(&[("a", 3), ("b", 4)]));
        let second = first.succeeded_by(set(&[("a", 3)]));
        let third = second.succeeded_by(set(&[("a", 3), ("b", 9)]));
        let changes = third.changes_since(4).expect("counted");
        assert_eq!(names(&changes), ["b"]);
        assert!(changes.removed.is_empty());
    }

    #[test]
    fn forgotten_removals_move_the_horizon() {
        let all = [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)];
        let mut snapshot = Snapshot::default().succeeded_by(set(&all));
        for remaining in (0..all.len()).rev() {
            let mut services = set(&all[..remaining]);
            services.version = 20 - remaining as Version;
            snapshot = snapshot.succeeded_within(services, 3);
        }
        assert_eq!(snapshot.removed.len(), 3);
        // e and d went at 16 and 17 and are forgotten; c, b and a went at 18, 19 and 20.
        assert_eq!(snapshot.horizon, 17);
        assert!(snapshot.changes_since(16).is_none());
        assert_eq!(
            snapshot.changes_since(17).map(|changes| changes.removed),
            Some(vec!["a".to_string(), "b".to_string(), "c".to_string()])
        );
    }
}
