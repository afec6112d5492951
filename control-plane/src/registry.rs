//! The normalized registry: every service and its instances, versioned by ZooKeeper zxids.
//!
//! Pure bookkeeping: the watcher reads znodes and hands them over; this module decodes them,
//! skips what is malformed, and computes versions that every replica agrees on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use zklb_wire::{Service, ServiceSet, Version};

use crate::decode;

/// One instance znode as read from ZooKeeper.
#[derive(Debug, Clone)]
pub struct Znode {
    pub name: String,
    /// zxid of the znode's last data change.
    pub mzxid: i64,
    pub data: Vec<u8>,
}

/// One service directory as read from ZooKeeper.
#[derive(Debug, Clone, Default)]
pub struct ServiceRead {
    /// zxid of the directory's creation: which of two services whose names differ only in case
    /// came first.
    pub czxid: i64,
    /// zxid of the last creation or deletion among the service's instances.
    pub pzxid: i64,
    pub instances: Vec<Znode>,
}

/// Counts malformed znodes skipped since start, for `/metrics`: each version of a znode once,
/// however often its service is read again.
#[derive(Debug, Default)]
pub struct DecodeStats {
    pub skipped_znodes: AtomicU64,
    /// Root children that cannot name a service (characters, length), each once per session.
    pub rejected_names: AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    /// zxid of the last creation or deletion of a service directory: the version of the set of
    /// services, and so of Envoy's clusters.
    pub services_pzxid: i64,
    pub services: BTreeMap<String, Service>,
    /// Per service, the malformed znodes and the mzxid at which they were found so, so that each
    /// is logged and counted once rather than on every read of its service.
    malformed: BTreeMap<String, BTreeMap<String, i64>>,
    /// Per service, the czxid of its directory.
    created: BTreeMap<String, i64>,
}

impl Registry {
    /// The version of the whole registry: the newest zxid it reflects.
    pub fn version(&self) -> Version {
        self.services
            .values()
            .map(|service| service.version)
            .fold(self.services_pzxid, Version::max)
    }

    /// Replaces one service with what was read; `None` means its directory is gone.
    pub fn apply_service(&mut self, name: &str, read: Option<ServiceRead>, stats: &DecodeStats) {
        match read {
            Some(read) => {
                self.created.insert(name.to_string(), read.czxid);
                let known = self.malformed.remove(name).unwrap_or_default();
                let (service, malformed) = decode_service(name, read, &known, stats);
                self.services.insert(name.to_string(), service);
                if !malformed.is_empty() {
                    self.malformed.insert(name.to_string(), malformed);
                }
            }
            None => {
                self.services.remove(name);
                self.malformed.remove(name);
                self.created.remove(name);
            }
        }
    }

    /// Keeps exactly the services in `names` (the root's children), dropping the others.
    pub fn retain_services(&mut self, names: &[String], pzxid: i64) {
        self.services.retain(|name, _| names.contains(name));
        self.malformed.retain(|name, _| names.contains(name));
        self.created.retain(|name, _| names.contains(name));
        self.services_pzxid = pzxid;
    }

    /// What is published: every service but those whose names differ only in case from one
    /// created before them (Host headers ignore case, so only one can be reached by name, and
    /// which one must not depend on sorting), and those conflicts with their reasons.
    pub fn published(&self) -> (ServiceSet, BTreeMap<String, String>) {
        let mut first_by_name: BTreeMap<String, (&String, i64)> = BTreeMap::new();
        for name in self.services.keys() {
            let created = self.created.get(name).copied().unwrap_or(i64::MAX);
            let entry = first_by_name
                .entry(name.to_ascii_lowercase())
                .or_insert((name, created));
            if (created, name) < (entry.1, entry.0) {
                *entry = (name, created);
            }
        }
        let mut conflicts = BTreeMap::new();
        let mut services = BTreeMap::new();
        for (name, service) in &self.services {
            let (first, _) = first_by_name[&name.to_ascii_lowercase()];
            if first == name {
                services.insert(name.clone(), service.clone());
            } else {
                let reason = format!(
                    "differs only in case from {first:?}, registered before it; not routed until one is renamed"
                );
                conflicts.insert(name.clone(), reason);
            }
        }
        let set = ServiceSet {
            version: self.version(),
            services,
        };
        (set, conflicts)
    }
}

/// Decodes a service's znodes, skipping malformed ones; returns them with their mzxids.
fn decode_service(
    name: &str,
    read: ServiceRead,
    known_malformed: &BTreeMap<String, i64>,
    stats: &DecodeStats,
) -> (Service, BTreeMap<String, i64>) {
    let mut version = read.pzxid;
    let mut instances = Vec::with_capacity(read.instances.len());
    let mut malformed = BTreeMap::new();
    for znode in read.instances {
        version = version.max(znode.mzxid);
        match decode::curator::decode(name, &znode.name, &znode.data) {
            Ok(instance) => instances.push(instance),
            Err(error) => {
                if known_malformed.get(&znode.name) != Some(&znode.mzxid) {
                    stats.skipped_znodes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = name, znode = znode.name, %error, "skipping malformed instance znode");
                }
                malformed.insert(znode.name, znode.mzxid);
            }
        }
    }
    // Canonical order, so that equal registries compare equal whatever order ZooKeeper listed.
    instances.sort_by(|a, b| (&a.address, a.port, &a.id).cmp(&(&b.address, b.port, &b.id)));
    let service = Service {
        name: name.to_string(),
        version,
        instances,
    };
    (service, malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn znode(name: &str, mzxid: i64, port: u16) -> Znode {
        Znode {
            name: name.into(),
            mzxid,
            data: format!(r#"{{"id": "{name}", "address": "127.0.0.1", "port": {port}}}"#)
                .into_bytes(),
        }
    }

    #[test]
    fn versions_are_the_newest_zxid_seen() {
        let stats = DecodeStats::default();
        let mut registry = Registry::default();
        registry.retain_services(&["echo".into()], 5);
        registry.apply_service(
            "echo",
            Some(ServiceRead {
                czxid: 0,
                pzxid: 8,
                instances: vec![znode("a", 7, 8001), znode("b", 12, 8002)],
            }),
            &stats,
        );
        assert_eq!(registry.services["echo"].version, 12);
        assert_eq!(registry.version(), 12);
        registry.retain_services(&["echo".into()], 20);
        assert_eq!(registry.version(), 20);
    }

    #[test]
    fn malformed_znodes_are_skipped_and_counted_without_losing_the_rest() {
        let stats = DecodeStats::default();
        let mut registry = Registry::default();
        let mut broken = znode("broken", 9, 1);
        broken.data = b"{\"address\": 17}".to_vec();
        registry.apply_service(
            "echo",
            Some(ServiceRead {
                czxid: 0,
                pzxid: 3,
                instances: vec![znode("a", 4, 8001), broken],
            }),
            &stats,
        );
        assert_eq!(registry.services["echo"].instances.len(), 1);
        assert_eq!(registry.services["echo"].version, 9);
        assert_eq!(stats.skipped_znodes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_malformed_znode_is_counted_once_per_version() {
        let stats = DecodeStats::default();
        let mut registry = Registry::default();
        let broken = |mzxid| Znode {
            name: "broken".into(),
            mzxid,
            data: b"{}".to_vec(),
        };
        let read = |mzxid| {
            Some(ServiceRead {
                czxid: 0,
                pzxid: 1,
                instances: vec![znode("a", 2, 8001), broken(mzxid)],
            })
        };
        registry.apply_service("echo", read(3), &stats);
        registry.apply_service("echo", read(3), &stats);
        assert_eq!(stats.skipped_znodes.load(Ordering::Relaxed), 1);
        registry.apply_service("echo", read(4), &stats);
        assert_eq!(stats.skipped_znodes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn instance_order_does_not_depend_on_listing_order() {
        let stats = DecodeStats::default();
        let read = |instances| {
            Some(ServiceRead {
                czxid: 0,
                pzxid: 1,
                instances,
            })
        };
        let mut first = Registry::default();
        first.apply_service(
            "echo",
            read(vec![znode("a", 2, 8001), znode("b", 3, 8002)]),
            &stats,
        );
        let mut second = Registry::default();
        second.apply_service(
            "echo",
            read(vec![znode("b", 3, 8002), znode("a", 2, 8001)]),
            &stats,
        );
        assert_eq!(first, second);
    }

    #[test]
    fn of_names_that_differ_only_in_case_the_first_created_is_published() {
        let stats = DecodeStats::default();
        let mut registry = Registry::default();
        let created_at = |czxid| {
            Some(ServiceRead {
                czxid,
                pzxid: czxid,
                instances: vec![],
            })
        };
        // "orders" sorts after "Orders" but was created first.
        registry.apply_service("Orders", created_at(9), &stats);
        registry.apply_service("orders", created_at(4), &stats);
        registry.apply_service("other", created_at(5), &stats);
        let (set, conflicts) = registry.published();
        let names: Vec<&String> = set.services.keys().collect();
        assert_eq!(names, ["orders", "other"]);
        assert!(conflicts["Orders"].contains("differs only in case from \"orders\""));
        registry.apply_service("orders", None, &stats);
        let (set, conflicts) = registry.published();
        assert!(
            set.services.contains_key("Orders"),
            "resolved once one goes"
        );
        assert!(conflicts.is_empty());
    }

    #[test]
    fn removed_services_disappear() {
        let stats = DecodeStats::default();
        let mut registry = Registry::default();
        registry.apply_service(
            "echo",
            Some(ServiceRead {
                czxid: 0,
                pzxid: 1,
                instances: vec![],
            }),
            &stats,
        );
        registry.apply_service(
            "other",
            Some(ServiceRead {
                czxid: 0,
                pzxid: 1,
                instances: vec![],
            }),
            &stats,
        );
        registry.apply_service("echo", None, &stats);
        registry.retain_services(&[], 6);
        assert!(registry.services.is_empty());
        assert_eq!(registry.version(), 6);
    }
}
