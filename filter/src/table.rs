//! The filter's view of the services: which request goes to which service, and its hosts.
//! Kept up to date one service at a time, so that a change costs what it touches.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use zklb_wire::Service;

use crate::balancer::{Host, Hosts};

/// The routable hosts of every service, by lower-case service name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceTable {
    /// Host names ignore case, ZooKeeper does not: every service whose name lower-cases to the
    /// key, by exact name. Only the first in that order is reached, always the same one.
    services: HashMap<String, BTreeMap<String, ServiceRoute>>,
}

/// Where the requests of one service go.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRoute {
    /// Shared with every request routed by it, so that none copies it.
    pub name: Rc<str>,
    /// The Envoy cluster whose members are this service's instances.
    pub cluster: Rc<str>,
    /// Every routable instance.
    pub hosts: Hosts,
}

/// What a request maps to.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    Found(&'a ServiceRoute),
    /// No service has this name.
    Unknown(String),
}

impl ServiceTable {
    /// Adds or replaces `service`. A name the filter cannot route by is ignored: the control
    /// plane checks names too, but the filter does not trust what crosses a network with the
    /// values of its routing headers.
    pub fn upsert(&mut self, service: &Service) {
        if !zklb_wire::is_valid_service_name(&service.name) {
            log::warn!("zklb: ignoring service {:?}: unusable name", service.name);
            return;
        }
        let route = ServiceRoute {
            name: Rc::from(service.name.as_str()),
            cluster: Rc::from(zklb_wire::cluster_name(&service.name)),
            hosts: Hosts::new(
                service
                    .routable_instances()
                    .into_iter()
                    .map(|instance| Host {
                        address: instance.host(),
                        weight: instance.weight,
                        zone: instance.zone.clone(),
                        registered_at: instance.registered_at,
                    })
                    .collect(),
            ),
        };
        let alike = self
            .services
            .entry(service.name.to_ascii_lowercase())
            .or_default();
        alike.insert(service.name.clone(), route);
        if alike.len() > 1 {
            let names: Vec<&String> = alike.keys().collect();
            log::warn!(
                "zklb: services {names:?} differ only in case; requests go to {:?}",
                names[0]
            );
        }
    }

    pub fn remove(&mut self, name: &str) {
        let key = name.to_ascii_lowercase();
        if let Some(alike) = self.services.get_mut(&key) {
            alike.remove(name);
            if alike.is_empty() {
                self.services.remove(&key);
            }
        }
    }

    /// The service named `service`, compared case-insensitively as host names are.
    pub fn lookup(&self, service: &str) -> Lookup<'_> {
        // Host names arrive in lower case already: no copy for them.
        let lowered;
        let name = if service.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = service.to_ascii_lowercase();
            lowered.as_str()
        } else {
            service
        };
        match self
            .services
            .get(name)
            .and_then(|alike| alike.values().next())
        {
            Some(route) => Lookup::Found(route),
            None => Lookup::Unknown(name.to_string()),
        }
    }
}

#[cfg(test)]
impl ServiceTable {
    pub fn from_service_set(set: &zklb_wire::ServiceSet) -> ServiceTable {
        let mut table = ServiceTable::default();
        for service in set.services.values() {
            table.upsert(service);
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use zklb_wire::ServiceSet;
    use zklb_wire::{Instance, Service, SourceFormat, Status};

    fn instance(address: &str, port: u16, status: Status) -> Instance {
        Instance::new(
            format!("{address}:{port}"),
            address,
            port,
            SourceFormat::Curator,
        )
        .with_status(status)
    }

    fn table() -> ServiceTable {
        let mut services = BTreeMap::new();
        services.insert(
            "Echo".to_string(),
            Service {
                name: "Echo".into(),
                version: 7,
                instances: vec![
                    instance("127.0.0.1", 8001, Status::Up),
                    instance("127.0.0.1", 8002, Status::Down),
                    instance("backend.example", 8003, Status::Up),
                ],
                ..Service::default()
            },
        );
        ServiceTable::from_service_set(&ServiceSet {
            version: 9,
            services,
        })
    }

    #[test]
    fn services_are_found_ignoring_case() {
        let table = table();
        for authority in ["echo", "ECHO", "Echo"] {
            let Lookup::Found(route) = table.lookup(authority) else {
                panic!("{authority} must map to echo");
            };
            assert_eq!(&*route.name, "Echo");
            assert_eq!(&*route.cluster, zklb_wire::cluster_name("Echo"));
        }
        assert_eq!(table.lookup("other"), Lookup::Unknown("other".into()));
    }

    #[test]
    fn services_differing_only_in_case_resolve_to_the_same_one_every_time() {
        let service = |name: &str| Service {
            name: name.into(),
            version: 1,
            instances: vec![],
            ..Service::default()
        };
        let set = ServiceSet {
            version: 1,
            services: BTreeMap::from([
                ("echo".into(), service("echo")),
                ("Echo".into(), service("Echo")),
            ]),
        };
        let table = ServiceTable::from_service_set(&set);
        let Lookup::Found(route) = table.lookup("ECHO") else {
            panic!("one of them must be found");
        };
        assert_eq!(&*route.name, "Echo");
    }

    #[test]
    fn only_routable_instances_become_hosts() {
        let table = table();
        let Lookup::Found(route) = table.lookup("echo") else {
            panic!("echo must exist");
        };
        assert_eq!(
            route.hosts.addresses().collect::<Vec<_>>(),
            ["127.0.0.1:8001"]
        );
    }

    /// A control plane upgraded before the filter may send statuses and formats this build has
    /// never heard of: those instances are not routed to, and the rest of the list is.
    #[test]
    fn a_list_from_a_newer_control_plane_still_routes() {
        let json = br#"{"version": 12, "stale": false, "session": "connected",
            "services": {"echo": {"name": "echo", "version": 12, "instances": [
                {"id": "a", "address": "127.0.0.1", "port": 8001, "status": "up", "source": "curator"},
                {"id": "b", "address": "127.0.0.1", "port": 8002, "status": "up", "source": "eureka"},
                {"id": "c", "address": "127.0.0.1", "port": 8003, "status": "hibernating", "source": "curator"}
            ]}}}"#;
        let set: ServiceSet = serde_json::from_slice(json).expect("the list is still used");
        let table = ServiceTable::from_service_set(&set);
        let Lookup::Found(route) = table.lookup("echo") else {
            panic!("echo must exist");
        };
        assert_eq!(
            route.hosts.addresses().collect::<Vec<_>>(),
            ["127.0.0.1:8001", "127.0.0.1:8002"]
        );
    }

    #[test]
    fn services_come_and_go_one_at_a_time() {
        let mut table = table();
        let other = Service {
            name: "ECHO".into(),
            version: 1,
            instances: vec![instance("127.0.0.1", 9001, Status::Up)],
            ..Service::default()
        };
        table.upsert(&other);
        let Lookup::Found(route) = table.lookup("echo") else {
            panic!("echo must exist");
        };
        assert_eq!(&*route.name, "ECHO", "the first by exact name is reached");
        table.remove("ECHO");
        let Lookup::Found(route) = table.lookup("echo") else {
            panic!("Echo must remain");
        };
        assert_eq!(&*route.name, "Echo");
        table.remove("Echo");
        assert_eq!(table.lookup("echo"), Lookup::Unknown("echo".into()));
    }
}
