//! The whole per-request decision, free of host calls: which cluster, which candidates, or why
//! the request is refused.

use std::rc::Rc;

use rand::Rng;

use crate::balancer::{Policy, Preferences};
use crate::config::RouterConfig;
use crate::routing::Resolved;
use crate::table::{Lookup, ServiceTable};

/// Where a request goes: the headers the filter writes for the router and `override_host`.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub service: Rc<str>,
    pub policy: Policy,
    pub cluster: Rc<str>,
    /// `ip:port,ip:port,...`: attempt k goes to entry k.
    pub candidates: String,
}

/// A request the filter answers itself.
#[derive(Debug, PartialEq)]
pub struct Refusal {
    pub status: u32,
    pub reason: String,
    pub kind: RefusalKind,
}

/// Why a request was refused, as the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    NotLoaded,
    UnknownService,
    NoInstances,
}

impl RefusalKind {
    pub fn name(self) -> &'static str {
        match self {
            RefusalKind::NotLoaded => "not_loaded",
            RefusalKind::UnknownService => "unknown_service",
            RefusalKind::NoInstances => "no_instances",
        }
    }
}

/// The plan of a request for `resolved` (`None`: no rule matched).
pub fn plan_request(
    table: Option<&ServiceTable>,
    resolved: Option<&Resolved>,
    config: &RouterConfig,
    preferences: &Preferences<'_>,
    rng: &mut impl Rng,
) -> Result<Plan, Refusal> {
    let Some(table) = table else {
        // Fail closed: without the list there is no way to keep the request inside a service.
        return Err(Refusal {
            status: 503,
            reason: "zklb has not loaded the service list yet".into(),
            kind: RefusalKind::NotLoaded,
        });
    };
    let Some(resolved) = resolved else {
        return Err(Refusal {
            status: 404,
            reason: "no routing rule matches this request".into(),
            kind: RefusalKind::UnknownService,
        });
    };
    let route = match table.lookup(&resolved.service) {
        Lookup::Found(route) => route,
        Lookup::Unknown(service) => {
            return Err(Refusal {
                status: 404,
                reason: format!("no service named {service:?} is registered"),
                kind: RefusalKind::UnknownService,
            })
        }
    };
    let policy = resolved
        .policy
        .unwrap_or_else(|| config.policy_for(&route.name));
    let candidates = resolved
        .retries
        .map_or(config.candidates, |retries| retries + 1);
    let chosen = route
        .hosts
        .choose_with(policy, candidates, preferences, rng);
    if chosen.is_empty() {
        return Err(Refusal {
            status: 503,
            reason: format!("service {:?} has no available instances", route.name),
            kind: RefusalKind::NoInstances,
        });
    }
    let mut candidates = String::with_capacity(chosen.len() * 22);
    for (i, host) in chosen.iter().enumerate() {
        if i > 0 {
            candidates.push(',');
        }
        candidates.push_str(&host.address);
    }
    Ok(Plan {
        service: Rc::clone(&route.name),
        policy,
        cluster: Rc::clone(&route.cluster),
        candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    use std::collections::BTreeMap;
    use zklb_wire::{Instance, Service, ServiceSet, SourceFormat};

    fn config() -> RouterConfig {
        match crate::config::PluginConfig::parse(br#"{"role": "router", "retries": 2}"#) {
            Ok(crate::config::PluginConfig::Router(config)) => config,
            other => panic!("{other:?}"),
        }
    }

    fn resolved(service: &str) -> Option<Resolved> {
        Some(Resolved {
            service: service.into(),
            path: None,
            policy: None,
            retries: None,
        })
    }

    fn table(hosts: &[u16]) -> ServiceTable {
        let instances = hosts
            .iter()
            .map(|&port| Instance::new(port.to_string(), "127.0.0.1", port, SourceFormat::Curator))
            .collect();
        let service = Service {
            name: "echo".into(),
            version: 1,
            instances,
            ..Service::default()
        };
        ServiceTable::from_service_set(&ServiceSet {
            version: 1,
            services: BTreeMap::from([("echo".to_string(), service)]),
        })
    }

    #[test]
    fn a_known_service_gets_its_cluster_and_distinct_candidates() {
        let table = table(&[8001, 8002, 8003, 8004]);
        let mut rng = SmallRng::seed_from_u64(3);
        let plan = plan_request(
            Some(&table),
            resolved("echo").as_ref(),
            &config(),
            &Preferences::default(),
            &mut rng,
        )
        .expect("routable");
        assert_eq!(&*plan.cluster, zklb_wire::cluster_name("echo"));
        let hosts: Vec<&str> = plan.candidates.split(',').collect();
        assert_eq!(hosts.len(), 3);
        assert!(hosts.iter().all(|host| host.starts_with("127.0.0.1:800")));
    }

    #[test]
    fn unknown_services_get_404_and_empty_ones_503() {
        let mut rng = SmallRng::seed_from_u64(3);
        let unknown = plan_request(
            Some(&table(&[8001])),
            resolved("zklb_control_plane").as_ref(),
            &config(),
            &Preferences::default(),
            &mut rng,
        );
        assert_eq!(unknown.expect_err("refused").status, 404);
        let empty = plan_request(
            Some(&table(&[])),
            resolved("echo").as_ref(),
            &config(),
            &Preferences::default(),
            &mut rng,
        )
        .expect_err("refused");
        assert_eq!(empty.status, 503);
        assert!(empty.reason.contains("no available instances"));
        let unloaded = plan_request(
            None,
            resolved("echo").as_ref(),
            &config(),
            &Preferences::default(),
            &mut rng,
        )
        .expect_err("refused");
        assert_eq!(unloaded.status, 503);
    }
}
