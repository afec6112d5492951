//! The service list as the poller shares it with every worker: one shared-data entry per
//! service, an index of their versions, and the index's version. A worker that sees the version
//! move reads the index and then only the services whose version moved, so that a change costs
//! each worker what changed, not the whole registry.
//!
//! Pure bookkeeping; the poller and the router make the host calls.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zklb_wire::{ServiceChanges, Version};

/// The version of the index: what a worker checks on every request.
pub const VERSION_KEY: &str = "zklb.services.version";
/// The [`Index`].
pub const INDEX_KEY: &str = "zklb.services.index";

/// The [`crate::ejection::Ejections`] of every worker.
pub const EJECTIONS_KEY: &str = "zklb.ejections";
/// The routers' [`crate::ejection::EjectionPolicy`], for the learner (empty: ejection is off).
pub const EJECTION_POLICY_KEY: &str = "zklb.ejection_policy";
/// The request's property (Envoy filter state) in which the router leaves its candidates for the
/// learner.
pub const CANDIDATES_PROPERTY: &str = "zklb_candidates";
/// When a learner in Envoy's access log last said it runs (milliseconds since the Unix epoch).
pub const LEARNER_KEY: &str = "zklb.learner";
/// How often a learner says it runs...
pub const LEARNER_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// ...and how long after its last word the routers take it to be gone (a configuration without
/// it loaded since), and learn from every answer again.
const LEARNER_SILENCE_MS: u64 = 5_000;

/// Whether the learner whose last word is `said` ([`LEARNER_KEY`]'s value) runs at `now_ms`.
pub fn learner_runs(said: Option<&[u8]>, now_ms: u64) -> bool {
    said.and_then(|said| std::str::from_utf8(said).ok()?.parse::<u64>().ok())
        .is_some_and(|at| now_ms.saturating_sub(at) <= LEARNER_SILENCE_MS)
}

/// The shared-data entry holding one service's JSON.
pub fn service_key(name: &str) -> String {
    format!("zklb.service.{name}")
}

/// Every service the poller has published, with its version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub version: Version,
    pub services: BTreeMap<String, Version>,
}

/// What the poller writes for one answer of the control plane, in this order: the services,
/// the cleared entries, the index, then its version.
#[derive(Debug, PartialEq)]
pub struct Publication {
    /// Service name and its JSON.
    pub services: Vec<(String, Vec<u8>)>,
    /// Services gone: their entries are emptied.
    pub cleared: Vec<String>,
    pub index: Vec<u8>,
    pub version: Version,
}

impl Index {
    /// Takes the control plane's changes. Services whose names could not be routed by (the
    /// control plane checks them too; the filter does not trust what crosses a network with
    /// its shared-data keys and routing headers) are left out.
    pub fn apply(&mut self, changes: &ServiceChanges) -> Publication {
        let mut cleared: Vec<String> = if changes.full {
            self.services
                .keys()
                .filter(|name| !changes.services.contains_key(*name))
                .cloned()
                .collect()
        } else {
            changes
                .removed
                .iter()
                .filter(|name| self.services.contains_key(*name))
                .cloned()
                .collect()
        };
        let mut services = Vec::with_capacity(changes.services.len());
        for (name, service) in &changes.services {
            if !zklb_wire::is_valid_service_name(name) || service.name != *name {
                log::warn!("zklb: ignoring a service with an unusable name: {name:?}");
                continue;
            }
            if self.services.get(name) == Some(&service.version) {
                continue;
            }
            match serde_json::to_vec(service) {
                Ok(json) => {
                    self.services.insert(name.clone(), service.version);
                    services.push((name.clone(), json));
                }
                Err(error) => log::error!("zklb: cannot share service {name:?}: {error}"),
            }
        }
        for name in &cleared {
            self.services.remove(name);
        }
        cleared.sort();
        self.version = changes.version;
        Publication {
            services,
            cleared,
            index: serde_json::to_vec(self).unwrap_or_default(),
            version: changes.version,
        }
    }

    /// What a worker holding `loaded` must do to match the index: the services to (re)load and
    /// those to drop.
    pub fn diff(&self, loaded: &BTreeMap<String, Version>) -> (Vec<String>, Vec<String>) {
        let load = self
            .services
            .iter()
            .filter(|(name, version)| loaded.get(*name) != Some(version))
            .map(|(name, _)| name.clone())
            .collect();
        let drop = loaded
            .keys()
            .filter(|name| !self.services.contains_key(*name))
            .cloned()
            .collect();
        (load, drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zklb_wire::Service;

    fn changes(full: bool, services: &[(&str, Version)], removed: &[&str]) -> ServiceChanges {
        let services: BTreeMap<String, Service> = services
            .iter()
            .map(|&(name, version)| {
                let service = Service {
                    name: name.into(),
                    version,
                    instances: vec![],
                    ..Service::default()
                };
                (name.to_string(), service)
            })
            .collect();
        ServiceChanges {
            version: services.values().map(|s| s.version).max().unwrap_or(0),
            full,
            services,
            removed: removed.iter().map(|name| name.to_string()).collect(),
            ..ServiceChanges::default()
        }
    }

    fn written(publication: &Publication) -> Vec<&str> {
        publication
            .services
            .iter()
            .map(|(name, _)| name.as_str())
            .collect()
    }

    #[test]
    fn a_change_writes_only_the_services_that_moved() {
        let mut index = Index::default();
        let first = index.apply(&changes(true, &[("a", 3), ("b", 4)], &[]));
        assert_eq!(written(&first), ["a", "b"]);
        let second = index.apply(&changes(false, &[("b", 9)], &["a"]));
        assert_eq!(written(&second), ["b"]);
        assert_eq!(second.cleared, ["a"]);
        assert_eq!(second.version, 9);
        let shared: Index = serde_json::from_slice(&second.index).expect("the index parses");
        assert_eq!(shared.services, BTreeMap::from([("b".to_string(), 9)]));
    }

    #[test]
    fn a_full_list_replaces_everything() {
        let mut index = Index::default();
        index.apply(&changes(true, &[("a", 3), ("b", 4)], &[]));
        let publication = index.apply(&changes(true, &[("b", 4), ("c", 6)], &[]));
        assert_eq!(publication.cleared, ["a"]);
        assert_eq!(written(&publication), ["c"], "b did not change");
    }

    #[test]
    fn unusable_names_are_not_shared() {
        let mut index = Index::default();
        let mut bad = changes(true, &[("ok", 1), ("a b", 2)], &[]);
        if let Some(service) = bad.services.get_mut("ok") {
            service.name = "other".into();
        }
        let publication = index.apply(&bad);
        assert!(
            publication.services.is_empty(),
            "{:?}",
            written(&publication)
        );
    }

    #[test]
    fn a_learner_runs_while_it_keeps_saying_so() {
        assert!(learner_runs(Some(b"10000"), 10_000));
        assert!(learner_runs(Some(b"10000"), 15_000));
        assert!(!learner_runs(Some(b"10000"), 15_001));
        // Another worker's clock a little ahead.
        assert!(learner_runs(Some(b"10100"), 10_000));
        assert!(!learner_runs(None, 10_000));
        assert!(!learner_runs(Some(b""), 10_000));
        assert!(!learner_runs(Some(b"yes"), 10_000));
    }

    #[test]
    fn a_worker_reloads_only_what_moved_and_drops_what_went() {
        let mut index = Index::default();
        index.apply(&changes(true, &[("a", 3), ("b", 4), ("c", 5)], &[]));
        let loaded = BTreeMap::from([
            ("a".to_string(), 3),
            ("b".to_string(), 2),
            ("gone".to_string(), 1),
        ]);
        let (load, drop) = index.diff(&loaded);
        assert_eq!(load, ["b", "c"]);
        assert_eq!(drop, ["gone"]);
    }
}
