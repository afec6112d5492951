//! The normalized registry: the mirror of every root, the services found in them, and the set of
//! services that is published, versioned by ZooKeeper zxids.
//!
//! Pure bookkeeping. The ingest side hands over what it read and what was deleted; this module
//! finds the services those znodes belong to, decodes only those, skips and reports what is
//! malformed, settles which of two services claiming one name is routed, puts resolved addresses
//! in place of host names, and says what changed since the last publication, so a change costs
//! the service it touches rather than the whole registry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use zklb_wire::{Instance, Problems, Service, SourceFormat, Version, MAX_PROBLEMS};

use crate::formats::{self, RegistrySpec, ServiceRead};
use crate::resolve::Resolutions;
use crate::secrets::SecretKeys;
use crate::tree::{relative_segments, Tree, Znode};

/// Counters of what the registry skipped since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct DecodeStats {
    /// Znodes skipped because they do not decode, by format and reason; each version of a
    /// znode once, however often its service is read again.
    malformed: Mutex<BTreeMap<(SourceFormat, &'static str), u64>>,
    /// Znodes that could not name a service (characters, length), each once per process.
    pub rejected_names: AtomicU64,
}

impl DecodeStats {
    fn count_malformed(&self, format: SourceFormat, reason: &'static str) {
        let mut counts = self
            .malformed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        *counts.entry((format, reason)).or_default() += 1;
    }

    /// Malformed znodes skipped, by format and reason.
    pub fn malformed(&self) -> BTreeMap<(SourceFormat, &'static str), u64> {
        self.malformed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

/// What is published: the routable services by name, and why some are not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Publication {
    pub version: Version,
    pub services: BTreeMap<String, Arc<Service>>,
    /// Services left out because another service claims the same name (up to case), with why.
    pub conflicts: BTreeMap<String, String>,
    pub problems: Problems,
}

#[cfg(test)]
impl Publication {
    /// A publication of `services`, versioned by the newest of them.
    pub fn of(services: impl IntoIterator<Item = Service>) -> Publication {
        let services: BTreeMap<String, Arc<Service>> = services
            .into_iter()
            .map(|service| (service.name.clone(), Arc::new(service)))
            .collect();
        Publication {
            version: services.values().map(|s| s.version).max().unwrap_or(0),
            services,
            ..Publication::default()
        }
    }
}

/// One root: its mirror and the services found in it.
#[derive(Debug)]
struct Root {
    spec: RegistrySpec,
    tree: Tree,
    /// Whether the root znode exists, as last read; `None` before it was read. While it is
    /// missing, its services stay as they were: a missing root is a mistake to report, never
    /// an empty registry.
    exists: Option<bool>,
    /// The services found, by the path of their znode.
    services: BTreeMap<String, Found>,
    /// Service znodes whose paths cannot name a service, reported once each.
    rejected: BTreeSet<String>,
    /// Service paths to read again before the next publication.
    pending: BTreeSet<String>,
    /// Znodes that could not be read, with why (retried by the ingest side).
    unreadable: BTreeMap<String, String>,
}

/// A service as found in a root, with its addresses as registered.
#[derive(Debug, Clone, PartialEq)]
struct Found {
    service: Service,
    czxid: i64,
    /// The znodes that did not decode, with the version they were found so at and why.
    malformed: BTreeMap<String, (i64, String)>,
}

impl Found {
    fn host_names(&self) -> impl Iterator<Item = &str> {
        self.service
            .instances
            .iter()
            .map(|instance| instance.address.as_str())
            .filter(|address| address.parse::<IpAddr>().is_err())
    }
}

#[derive(Debug)]
pub struct Registry {
    roots: Vec<Root>,
    stats: Arc<DecodeStats>,
    /// The newest zxid any read has shown: the version of the registry as ZooKeeper made it.
    newest_zxid: i64,
    /// Which root and service path claim each name, keyed by the name in lower case (host
    /// names ignore case), ordered by who was first.
    claims: BTreeMap<String, BTreeSet<Claim>>,
    /// Names (in lower case) whose published service must be worked out again.
    dirty: BTreeSet<String>,
    resolutions: Resolutions,
    /// The services that use each host name, by (root index, service path).
    host_users: HashMap<String, BTreeSet<(usize, String)>>,
    published: Publication,
    /// The published and conflicting names, by the name in lower case.
    names_by_lower: HashMap<String, BTreeSet<String>>,
    /// Metadata keys dropped from every instance as it is decoded.
    secrets: SecretKeys,
}

/// A service's claim on a name: the oldest znode (lowest czxid) wins, then the earlier root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    czxid: i64,
    root: usize,
    path: String,
}

impl Registry {
    pub fn new(specs: Vec<RegistrySpec>, stats: Arc<DecodeStats>) -> Registry {
        let roots = specs
            .into_iter()
            .map(|spec| Root {
                spec,
                tree: Tree::default(),
                exists: None,
                services: BTreeMap::new(),
                rejected: BTreeSet::new(),
                pending: BTreeSet::new(),
                unreadable: BTreeMap::new(),
            })
            .collect();
        Registry {
            roots,
            stats,
            newest_zxid: 0,
            claims: BTreeMap::new(),
            dirty: BTreeSet::new(),
            resolutions: Resolutions::default(),
            host_users: HashMap::new(),
            published: Publication::default(),
            names_by_lower: HashMap::new(),
            secrets: SecretKeys::default(),
        }
    }

    /// The registry with `secrets` dropped from every instance's metadata.
    pub fn hiding(self, secrets: SecretKeys) -> Registry {
        Registry { secrets, ..self }
    }

    pub fn specs(&self) -> impl Iterator<Item = &RegistrySpec> {
        self.roots.iter().map(|root| &root.spec)
    }

    /// The root a path belongs to, if any.
    pub fn root_of(&self, path: &str) -> Option<usize> {
        self.roots
            .iter()
            .position(|root| relative_segments(&root.spec.root, path).is_some())
    }

    /// Whether nothing under `path` is read: no root holds it, or its format ignores it.
    pub fn is_ignored(&self, path: &str) -> bool {
        match self.root_of(path) {
            Some(index) => formats::is_ignored(&self.roots[index].spec, path),
            None => true,
        }
    }

    /// Whether `path` has been read, or is above every root (and so never read).
    pub fn knows(&self, path: &str) -> bool {
        match self.root_of(path) {
            Some(index) => self.roots[index].tree.get(path).is_some(),
            None => true,
        }
    }

    /// The roots known to be missing.
    pub fn missing_roots(&self) -> Vec<&str> {
        self.roots
            .iter()
            .filter(|root| root.exists == Some(false))
            .map(|root| root.spec.root.as_str())
            .collect()
    }

    /// Whether the registry can be published: every root has been read, and one exists.
    pub fn is_readable(&self) -> bool {
        self.roots.iter().all(|root| root.exists.is_some())
            && self.roots.iter().any(|root| root.exists == Some(true))
    }

    pub fn newest_zxid(&self) -> i64 {
        self.newest_zxid
    }

    /// Replaces what is known at and below `path` with a complete read of it (`None`: `path`
    /// does not exist). For a root that does not exist, its services stay as they were.
    pub fn replace_subtree(&mut self, path: &str, tree: Option<Tree>) {
        let Some(index) = self.root_of(path) else {
            return;
        };
        let root = &mut self.roots[index];
        let is_root = path == root.spec.root;
        if is_root {
            root.exists = Some(tree.is_some());
        }
        let Some(tree) = tree else {
            if !is_root {
                Self::forget(root, path);
            }
            return;
        };
        if is_root {
            // Every service the root had is looked at again: those gone are dropped.
            root.pending.extend(root.services.keys().cloned());
        }
        Self::forget(root, path);
        let mut newest = self.newest_zxid;
        for (read, znode) in tree.into_nodes() {
            newest = newest.max(znode.newest_zxid());
            root.pending
                .extend(formats::affected_services(&root.spec, &read));
            root.unreadable.remove(&read);
            root.tree.put(&read, znode);
        }
        self.newest_zxid = newest;
    }

    /// Records a read of `path`: what it holds, or `None` if it does not exist (any more).
    pub fn apply_read(&mut self, path: &str, read: Option<Znode>) {
        let Some(index) = self.root_of(path) else {
            return;
        };
        if let Some(znode) = &read {
            self.newest_zxid = self.newest_zxid.max(znode.newest_zxid());
        }
        let root = &mut self.roots[index];
        root.unreadable.remove(path);
        if path == root.spec.root {
            root.exists = Some(read.is_some());
        }
        match read {
            Some(znode) => root.tree.put(path, znode),
            // The root's services stay while it is missing; the read that finds it again
            // replaces the whole root.
            None if path == root.spec.root => return,
            None => Self::forget(root, path),
        }
        root.pending
            .extend(formats::affected_services(&root.spec, path));
    }

    /// Records that `path` was deleted.
    pub fn apply_deletion(&mut self, path: &str) {
        let Some(index) = self.root_of(path) else {
            return;
        };
        let root = &mut self.roots[index];
        if path == root.spec.root {
            root.exists = Some(false);
            return;
        }
        Self::forget(root, path);
        root.pending
            .extend(formats::affected_services(&root.spec, path));
    }

    fn forget(root: &mut Root, path: &str) {
        for gone in root.tree.remove_subtree(path) {
            root.unreadable.remove(&gone);
            if root.services.contains_key(&gone) {
                root.pending.insert(gone);
            }
        }
    }

    /// Records that `path` could not be read, and why.
    pub fn apply_unreadable(&mut self, path: &str, reason: String) {
        if let Some(index) = self.root_of(path) {
            self.roots[index]
                .unreadable
                .insert(path.to_string(), reason);
        }
    }

    /// The znodes that could not be read, to be read again.
    pub fn unreadable(&self) -> impl Iterator<Item = &str> {
        self.roots
            .iter()
            .flat_map(|root| root.unreadable.keys().map(String::as_str))
    }

    /// Host names in use that have not been resolved yet.
    pub fn unresolved_host_names(&self) -> Vec<String> {
        self.host_users
            .keys()
            .filter(|name| !self.resolutions.knows(name))
            .cloned()
            .collect()
    }

    /// Every host name in use.
    pub fn host_names(&self) -> Vec<String> {
        self.host_users.keys().cloned().collect()
    }

    /// Records what `name` resolves to now; the services that use it are worked out again if
    /// that changes their addresses.
    pub fn apply_resolution(&mut self, name: &str, resolved: Result<IpAddr, String>) {
        if !self.resolutions.record(name, resolved) {
            return;
        }
        let users = self.host_users.get(name).cloned().unwrap_or_default();
        for (root, path) in users {
            if let Some(found) = self.roots[root].services.get(&path) {
                self.dirty.insert(found.service.name.to_ascii_lowercase());
            }
        }
    }

    /// Reads the services that changed since the last call out of the mirrors.
    pub fn refresh(&mut self) {
        for index in 0..self.roots.len() {
            if self.roots[index].exists != Some(true) {
                continue;
            }
            let pending = std::mem::take(&mut self.roots[index].pending);
            for path in pending {
                let read = {
                    let root = &self.roots[index];
                    formats::read_service(&root.spec, &root.tree, &path)
                };
                self.update_service(index, &path, read);
            }
        }
    }

    fn update_service(&mut self, index: usize, path: &str, read: Option<ServiceRead>) {
        let found = read.and_then(|read| self.found(index, path, read));
        let root = &mut self.roots[index];
        let previous = match &found {
            Some(found) => root.services.insert(path.to_string(), found.clone()),
            None => root.services.remove(path),
        };
        if previous == found {
            return;
        }
        if let Some(previous) = &previous {
            let name = previous.service.name.to_ascii_lowercase();
            let claim = Claim {
                czxid: previous.czxid,
                root: index,
                path: path.to_string(),
            };
            if let Some(claims) = self.claims.get_mut(&name) {
                claims.remove(&claim);
                if claims.is_empty() {
                    self.claims.remove(&name);
                }
            }
            for host in previous.host_names() {
                if let Some(users) = self.host_users.get_mut(host) {
                    users.remove(&(index, path.to_string()));
                }
            }
            self.dirty.insert(name);
        }
        if let Some(found) = &found {
            let name = found.service.name.to_ascii_lowercase();
            self.claims.entry(name.clone()).or_default().insert(Claim {
                czxid: found.czxid,
                root: index,
                path: path.to_string(),
            });
            for host in found.host_names() {
                self.host_users
                    .entry(host.to_string())
                    .or_default()
                    .insert((index, path.to_string()));
            }
            self.dirty.insert(name);
        }
        // A name is forgotten only once nothing uses it: a service that changed and still
        // names a host keeps its resolution, which is not looked up again before the refresh.
        for host in previous.iter().flat_map(Found::host_names) {
            if self.host_users.get(host).is_some_and(BTreeSet::is_empty) {
                self.host_users.remove(host);
                self.resolutions.forget(host);
            }
        }
    }

    /// A service read as it is kept: usable name, decoded instances, malformed znodes reported
    /// once per version.
    fn found(&mut self, index: usize, path: &str, read: ServiceRead) -> Option<Found> {
        let root = &mut self.roots[index];
        if !zklb_wire::is_valid_service_name(&read.name) {
            if root.rejected.insert(path.to_string()) {
                self.stats.rejected_names.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    znode = path,
                    service = read.name,
                    "skipping service: a name is 1 to 200 ASCII letters, digits, '.', '_' and '-'"
                );
            }
            return None;
        }
        let known = root
            .services
            .get(path)
            .map(|found| &found.malformed)
            .cloned()
            .unwrap_or_default();
        let mut malformed = BTreeMap::new();
        let mut instances = Vec::new();
        for znode in read.znodes {
            match znode.instances {
                Ok(decoded) => instances.extend(decoded.into_iter().map(|mut instance| {
                    self.secrets.hide(&mut instance.metadata);
                    instance
                })),
                Err(error) => {
                    if known.get(&znode.path).map(|(mzxid, _)| *mzxid) != Some(znode.mzxid) {
                        self.stats.count_malformed(znode.format, error.reason());
                        tracing::warn!(
                            znode = znode.path,
                            format = znode.format.name(),
                            %error,
                            "skipping malformed instance znode"
                        );
                    }
                    malformed.insert(znode.path, (znode.mzxid, error.to_string()));
                }
            }
        }
        // Canonical order, so that equal registries compare equal whatever order ZooKeeper
        // listed them in.
        instances.sort_by(|a, b| (&a.address, a.port, &a.id).cmp(&(&b.address, b.port, &b.id)));
        Some(Found {
            service: Service {
                name: read.name,
                version: read.version,
                format: read.format,
                znode: path.to_string(),
                instances,
            },
            czxid: read.czxid,
            malformed,
        })
    }

    /// The registry as last published by [`Registry::publish`].
    pub fn publication(&self) -> &Publication {
        &self.published
    }

    /// Works out the publication again for what changed since the last call; returns whether
    /// it changed. Only the services whose names were touched are rebuilt, and only those whose
    /// routing changed get new versions.
    pub fn publish(&mut self) -> bool {
        let problems = self.problems();
        let problems_changed = problems != self.published.problems;
        self.published.problems = problems;
        if self.dirty.is_empty() && self.published.version != 0 {
            return problems_changed;
        }
        let mut changed: Vec<String> = Vec::new();
        let mut conflicts_changed = false;
        for lower in std::mem::take(&mut self.dirty) {
            let before = self.names_by_lower.remove(&lower).unwrap_or_default();
            for name in &before {
                conflicts_changed |= self.published.conflicts.remove(name).is_some();
            }
            let claims: Vec<Claim> = self
                .claims
                .get(&lower)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let mut names = BTreeSet::new();
            let winner = claims
                .first()
                .map(|claim| self.claimed(claim).service.clone());
            for claim in claims.iter().skip(1) {
                let loser = &self.claimed(claim).service;
                let first = winner.as_ref().map_or("", |service| service.name.as_str());
                let reason = conflict_reason(&loser.name, first, &claims[0].path);
                names.insert(loser.name.clone());
                self.published.conflicts.insert(loser.name.clone(), reason);
                conflicts_changed = true;
            }
            let next = winner.map(|service| self.resolved(service));
            for name in before {
                let keeps = next.as_ref().is_some_and(|next| next.name == name);
                if !keeps && self.published.services.remove(&name).is_some() {
                    changed.push(name);
                }
            }
            if let Some(next) = next {
                names.insert(next.name.clone());
                let unchanged = self
                    .published
                    .services
                    .get(&next.name)
                    .is_some_and(|current| same_routing(current, &next));
                if !unchanged {
                    changed.push(next.name.clone());
                    self.published
                        .services
                        .insert(next.name.clone(), Arc::new(next));
                }
            }
            if !names.is_empty() {
                self.names_by_lower.insert(lower, names);
            }
        }
        if self.published.version == 0 {
            // The first publication, of however many services: as new as what was read.
            self.published.version = self.newest_zxid;
            return true;
        }
        if changed.is_empty() {
            return problems_changed || conflicts_changed;
        }
        // A version names one registry: a change that ZooKeeper did not number (a host name
        // that resolved, a conflict that ended) or that was read before the events up to its
        // zxid were (under churn) takes the next version rather than repeat one.
        let previous = self.published.version;
        let mut version = self.newest_zxid.max(previous);
        for name in &changed {
            if let Some(service) = self.published.services.get_mut(name) {
                if service.version <= previous {
                    version = version.max(previous + 1);
                    Arc::make_mut(service).version = version;
                }
            }
        }
        if version == previous {
            // Only removals, which ZooKeeper numbered no later than what was published.
            version = previous + 1;
        }
        self.published.version = version;
        true
    }

    fn claimed(&self, claim: &Claim) -> &Found {
        &self.roots[claim.root].services[&claim.path]
    }

    /// `service` with resolved addresses in place of host names.
    fn resolved(&self, mut service: Service) -> Service {
        for instance in &mut service.instances {
            resolve_instance(instance, &self.resolutions);
        }
        service
    }

    fn problems(&self) -> Problems {
        let mut problems = Problems::default();
        for root in &self.roots {
            for found in root.services.values() {
                for (path, (_, reason)) in &found.malformed {
                    if problems.malformed.len() < MAX_PROBLEMS {
                        problems.malformed.insert(path.clone(), reason.clone());
                    }
                }
            }
            for (path, reason) in &root.unreadable {
                if problems.unreadable.len() < MAX_PROBLEMS {
                    problems.unreadable.insert(path.clone(), reason.clone());
                }
            }
        }
        for (name, reason) in self.resolutions.failures() {
            if problems.unresolved.len() < MAX_PROBLEMS && self.host_users.contains_key(name) {
                problems
                    .unresolved
                    .insert(name.to_string(), reason.to_string());
            }
        }
        problems
    }
}

fn resolve_instance(instance: &mut Instance, resolutions: &Resolutions) {
    if instance.address.parse::<IpAddr>().is_ok() {
        return;
    }
    let name = std::mem::take(&mut instance.address);
    instance.address = match resolutions.address(&name) {
        Some(ip) => ip.to_string(),
        None => name.clone(),
    };
    instance.hostname = Some(name);
}

/// Whether `next` says nothing new over `current`: the same instances read the same way, and
/// no newer change in ZooKeeper (`current`'s version may be ahead, if it was renumbered).
fn same_routing(current: &Service, next: &Service) -> bool {
    next.version <= current.version
        && current.instances == next.instances
        && current.format == next.format
        && current.znode == next.znode
}

fn conflict_reason(loser: &str, first: &str, first_path: &str) -> String {
    if loser == first {
        format!(
            "also registered at {first_path}, which was registered before it; not routed until one is renamed"
        )
    } else {
        format!(
            "differs only in case from {first:?}, registered before it; not routed until one is renamed"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zklb_wire::Status;

    /// A znode created and last changed at `zxid`.
    fn znode(zxid: i64, data: &str) -> Znode {
        Znode {
            czxid: zxid,
            mzxid: zxid,
            pzxid: zxid,
            num_children: 0,
            data: data.as_bytes().to_vec(),
        }
    }

    fn curator(address: &str, port: u16) -> String {
        format!(r#"{{"address": "{address}", "port": {port}}}"#)
    }

    fn registry(specs: &[&str]) -> Registry {
        let specs = specs
            .iter()
            .map(|spec| spec.parse().expect("a registry spec"))
            .collect();
        Registry::new(specs, Arc::default())
    }

    /// Reads `znodes` as the whole of `root`, and publishes.
    fn read_root(registry: &mut Registry, root: &str, znodes: &[(&str, Znode)]) {
        let mut tree = Tree::default();
        tree.put(root, znode(1, ""));
        for (path, znode) in znodes {
            tree.put(path, znode.clone());
        }
        registry.replace_subtree(root, Some(tree));
        registry.refresh();
        registry.publish();
    }

    fn ports(registry: &Registry, service: &str) -> Vec<u16> {
        registry.publication().services[service]
            .instances
            .iter()
            .map(|instance| instance.port)
            .collect()
    }

    #[test]
    fn a_change_rebuilds_its_service_alone_and_versions_are_zxids() {
        let mut registry = registry(&["/services=auto"]);
        read_root(
            &mut registry,
            "/services",
            &[
                ("/services/a", znode(2, "")),
                ("/services/a/1", znode(3, &curator("10.0.0.1", 80))),
                ("/services/b", znode(4, "")),
                ("/services/b/1", znode(5, &curator("10.0.0.2", 80))),
            ],
        );
        let first = registry.publication().clone();
        assert_eq!(first.version, 5);
        assert_eq!(first.services["a"].version, 3);
        registry.apply_read("/services/a/2", Some(znode(8, &curator("10.0.0.3", 81))));
        registry.refresh();
        assert!(registry.publish());
        let second = registry.publication();
        assert_eq!(second.version, 8);
        assert_eq!(ports(&registry, "a"), [80, 81]);
        assert!(
            Arc::ptr_eq(&first.services["b"], &second.services["b"]),
            "b was not touched, so not rebuilt"
        );
        // A deletion is numbered by its parent's stat, read after it.
        registry.apply_deletion("/services/a/1");
        let mut parent = znode(2, "");
        parent.pzxid = 9;
        registry.apply_read("/services/a", Some(parent));
        registry.refresh();
        assert!(registry.publish());
        assert_eq!(ports(&registry, "a"), [81]);
        assert_eq!(registry.publication().version, 9);
        assert_eq!(registry.publication().services["a"].version, 9);
        registry.refresh();
        assert!(!registry.publish(), "nothing changed");
    }

    #[test]
    fn malformed_znodes_are_listed_and_counted_once_per_version() {
        let mut registry = registry(&["/services=curator"]);
        let broken = |zxid| ("/services/a/broken", znode(zxid, "{not json"));
        read_root(
            &mut registry,
            "/services",
            &[
                ("/services/a", znode(2, "")),
                ("/services/a/1", znode(3, &curator("10.0.0.1", 80))),
                broken(4),
            ],
        );
        let count =
            |registry: &Registry| registry.stats.malformed()[&(SourceFormat::Curator, "not_json")];
        assert_eq!(count(&registry), 1);
        assert_eq!(
            ports(&registry, "a"),
            [80],
            "the rest of the service is kept"
        );
        assert!(
            registry.publication().problems.malformed["/services/a/broken"]
                .contains("not valid JSON")
        );
        registry.apply_read("/services/a/1", Some(znode(5, &curator("10.0.0.1", 80))));
        registry.refresh();
        registry.publish();
        assert_eq!(
            count(&registry),
            1,
            "read again, the same version is not counted again"
        );
        let (path, changed) = broken(6);
        registry.apply_read(path, Some(changed));
        registry.refresh();
        registry.publish();
        assert_eq!(count(&registry), 2);
        registry.apply_read(path, Some(znode(7, &curator("10.0.0.2", 80))));
        registry.refresh();
        registry.publish();
        assert_eq!(ports(&registry, "a"), [80, 80]);
        assert!(registry.publication().problems.malformed.is_empty());
    }

    #[test]
    fn of_two_services_claiming_a_name_the_first_created_is_routed() {
        let mut registry = registry(&["/services=auto", "/dubbo=dubbo"]);
        read_root(
            &mut registry,
            "/services",
            &[
                // "Orders" sorts first but was created after "orders".
                ("/services/Orders", znode(9, "")),
                ("/services/Orders/1", znode(10, &curator("10.0.0.9", 80))),
                ("/services/orders", znode(4, "")),
                ("/services/orders/1", znode(5, &curator("10.0.0.4", 80))),
                ("/services/billing", znode(20, "")),
            ],
        );
        let provider = "dubbo%3A%2F%2F10.0.0.7%3A20880%2Fbilling";
        read_root(
            &mut registry,
            "/dubbo",
            &[
                ("/dubbo/billing", znode(3, "")),
                ("/dubbo/billing/providers", znode(3, "")),
                (
                    &format!("/dubbo/billing/providers/{provider}"),
                    znode(6, ""),
                ),
            ],
        );
        let published = registry.publication();
        let names: Vec<&String> = published.services.keys().collect();
        assert_eq!(names, ["billing", "orders"]);
        assert!(published.conflicts["Orders"].contains("differs only in case from \"orders\""));
        assert!(published.conflicts["billing"].contains("also registered at /dubbo/billing"));
        assert_eq!(
            published.services["billing"].format,
            Some(SourceFormat::Dubbo)
        );
        let version = published.version;
        // The first one goes: the other takes the name, under a version of its own.
        registry.apply_deletion("/services/orders/1");
        registry.apply_deletion("/services/orders");
        registry.refresh();
        assert!(registry.publish());
        let published = registry.publication();
        assert_eq!(ports(&registry, "Orders"), [80]);
        assert!(published.services["Orders"].version > version);
        assert!(published.version > version);
        assert!(!published.conflicts.contains_key("Orders"));
    }

    #[test]
    fn a_missing_root_keeps_its_services() {
        let mut registry = registry(&["/services=auto"]);
        read_root(
            &mut registry,
            "/services",
            &[
                ("/services/a", znode(2, "")),
                ("/services/a/1", znode(3, &curator("10.0.0.1", 80))),
            ],
        );
        registry.apply_deletion("/services/a/1");
        registry.apply_deletion("/services/a");
        registry.apply_deletion("/services");
        registry.apply_read("/services", None);
        registry.refresh();
        assert!(!registry.publish());
        assert_eq!(ports(&registry, "a"), [80]);
        assert_eq!(registry.missing_roots(), ["/services"]);
        assert!(!registry.is_readable());
        registry.replace_subtree("/services", Some(Tree::default()));
        registry.refresh();
        assert!(registry.publish());
        assert!(
            registry.publication().services.is_empty(),
            "found again, and empty"
        );
    }

    #[test]
    fn host_names_are_routed_once_resolved() {
        let mut registry = registry(&["/services=auto"]);
        read_root(
            &mut registry,
            "/services",
            &[
                ("/services/a", znode(2, "")),
                (
                    "/services/a/1",
                    znode(3, &curator("backend-1.internal", 80)),
                ),
            ],
        );
        assert_eq!(registry.unresolved_host_names(), ["backend-1.internal"]);
        let before = registry.publication().clone();
        assert!(before.services["a"].routable_instances().is_empty());
        registry.apply_resolution("backend-1.internal", Ok("10.0.0.1".parse().expect("ip")));
        registry.refresh();
        assert!(registry.publish());
        let after = registry.publication();
        let instance = &after.services["a"].instances[0];
        assert_eq!(instance.address, "10.0.0.1");
        assert_eq!(instance.hostname.as_deref(), Some("backend-1.internal"));
        assert!(
            after.services["a"].version > before.version,
            "a version of its own"
        );
        assert!(after.version > before.version);
        registry.apply_resolution("gone.internal", Err("not found".into()));
        registry.apply_read(
            "/services/a/2",
            Some(znode(4, &curator("gone.internal", 80))),
        );
        registry.refresh();
        registry.publish();
        assert_eq!(
            registry.publication().problems.unresolved["gone.internal"],
            "not found"
        );
        // A change to the service keeps the address its other instances' names resolved to:
        // they are not looked up again before the refresh interval.
        let kept = &registry.publication().services["a"].instances[0];
        assert_eq!((kept.id.as_str(), kept.address.as_str()), ("1", "10.0.0.1"));
        registry.apply_deletion("/services/a/2");
        registry.refresh();
        registry.publish();
        assert!(registry.publication().problems.unresolved.is_empty());
        assert_eq!(registry.host_names(), ["backend-1.internal"]);
    }

    #[test]
    fn auto_reads_each_service_in_the_format_its_znodes_are_written_in() {
        let mut registry = registry(&["/services=auto"]);
        let member = r#"{"serviceEndpoint": {"host": "10.0.0.5", "port": 80}, "status": "ALIVE"}"#;
        let mut role = znode(10, "");
        role.num_children = 1;
        let provider = "dubbo%3A%2F%2F10.0.0.6%3A20880%2Fcom.example.Orders%3Fweight%3D7";
        read_root(
            &mut registry,
            "/services",
            &[
                ("/services/curated", znode(2, "")),
                ("/services/curated/1", znode(3, &curator("10.0.0.1", 80))),
                ("/services/nerved", znode(4, "")),
                (
                    "/services/nerved/i-1_0000000001",
                    znode(
                        5,
                        r#"{"host": "10.0.0.2", "port": 80, "name": "i-1", "weight": 3}"#,
                    ),
                ),
                (
                    "/services/seeded",
                    znode(6, r#"[{"host": "10.0.0.3", "port": 80}]"#),
                ),
                ("/services/www", role.clone()),
                ("/services/www/prod", role),
                ("/services/www/prod/hello", znode(11, "")),
                (
                    "/services/www/prod/hello/member_0000000001",
                    znode(12, member),
                ),
                ("/services/com.example.Orders", znode(13, "")),
                ("/services/com.example.Orders/providers", znode(13, "")),
                (
                    &format!("/services/com.example.Orders/providers/{provider}"),
                    znode(14, "10.0.0.6"),
                ),
                ("/services/com.example.Orders/consumers", znode(13, "")),
            ],
        );
        let published = registry.publication();
        let formats: Vec<(&str, Option<SourceFormat>, u32)> = published
            .services
            .iter()
            .map(|(name, service)| (name.as_str(), service.format, service.instances[0].weight))
            .collect();
        assert_eq!(
            formats,
            [
                ("com.example.Orders", Some(SourceFormat::Dubbo), 7),
                ("curated", Some(SourceFormat::Curator), 1),
                ("nerved", Some(SourceFormat::Nerve), 3),
                ("seeded", Some(SourceFormat::Apisix), 100),
                ("www.prod.hello", Some(SourceFormat::Serverset), 100),
            ]
        );
        assert!(
            !published.services.contains_key("www"),
            "a directory of directories is no service"
        );
        assert!(registry.is_ignored("/services/com.example.Orders/consumers/x"));
        assert!(published
            .services
            .values()
            .all(|service| service.instances[0].status == Status::Up));
    }

    #[test]
    fn secret_metadata_is_dropped_as_instances_are_decoded() {
        let secrets = crate::secrets::SecretKeys(vec!["*token*".parse().expect("pattern")]);
        let mut registry = registry(&["/services=curator"]).hiding(secrets);
        let spring = r#"{"address": "10.0.0.1", "port": 80, "payload": {"metadata":
            {"zone": "a", "auth.token": "t0p", "instance_status": "UP"}}}"#;
        read_root(
            &mut registry,
            "/services",
            &[
                ("/services/a", znode(2, "")),
                ("/services/a/1", znode(3, spring)),
            ],
        );
        let instance = &registry.publication().services["a"].instances[0];
        assert!(!instance.metadata.contains_key("auth.token"));
        assert_eq!(instance.metadata["zone"], "a");
        assert_eq!(instance.zone.as_deref(), Some("a"));
    }

    #[test]
    fn names_that_cannot_be_routed_are_skipped_and_counted_once() {
        let mut registry = registry(&["/services=auto"]);
        read_root(
            &mut registry,
            "/services",
            &[
                ("/services/no spaces", znode(2, "")),
                ("/services/no spaces/1", znode(3, &curator("10.0.0.1", 80))),
                ("/services/ok", znode(4, "")),
            ],
        );
        registry.apply_read(
            "/services/no spaces/2",
            Some(znode(5, &curator("10.0.0.2", 80))),
        );
        registry.refresh();
        registry.publish();
        let names: Vec<&String> = registry.publication().services.keys().collect();
        assert_eq!(names, ["ok"]);
        assert_eq!(registry.stats.rejected_names.load(Ordering::Relaxed), 1);
    }
}
