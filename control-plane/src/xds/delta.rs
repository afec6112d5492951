//! The delta xDS protocol of one Envoy's ADS stream, free of I/O: what the Envoy subscribed to,
//! what it holds, which responses it acknowledged or rejected, and the next response.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use zklb_wire::Version;

use super::resources::{registry_version_of, XdsResources, CLUSTER_TYPE, ENDPOINTS_TYPE};

/// Responses remembered per type while their acknowledgement is awaited; Envoy answers each at
/// once, so more means a peer that never does, and the oldest are forgotten.
const MAX_IN_FLIGHT: usize = 64;

/// The state of one stream.
#[derive(Debug, Default)]
pub struct DeltaStream {
    subscriptions: BTreeMap<String, Subscription>,
    next_nonce: u64,
    /// The newest registry version this Envoy is known to have seen, from whichever replica:
    /// nothing is sent until the resources reach it, so that a lagging replica never takes an
    /// Envoy back in time.
    floor: Version,
    /// A reconnecting Envoy reports its clusters first and their members (whose versions carry
    /// the registry version, and so the floor) right after: clusters are not answered before,
    /// or a lagging replica could remove a service that it has not seen created.
    awaiting_member_versions: bool,
}

#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// The version of each resource the Envoy holds or was last sent.
    known: BTreeMap<String, String>,
    /// The resources of each response not yet acknowledged, by nonce.
    in_flight: BTreeMap<u64, Vec<String>>,
    /// Whether this subscription got a response yet: the first is sent even when it carries
    /// nothing, since Envoy's initialization waits for it (an empty registry is an answer).
    answered: bool,
}

/// What one request said about an earlier response.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// A subscription change or the stream's first request: no response was answered.
    None,
    Accepted {
        type_url: String,
    },
    /// Envoy rejected the response; it keeps what it had. The rejected versions are not sent
    /// again: the next change of those resources is.
    Rejected {
        type_url: String,
        resources: Vec<String>,
        error: String,
    },
}

impl DeltaStream {
    /// Takes one request from Envoy: subscription changes, what it holds, and its verdict on an
    /// earlier response.
    pub fn receive(&mut self, request: &DeltaDiscoveryRequest) -> Verdict {
        let first = !self.subscriptions.contains_key(&request.type_url);
        if request.type_url == CLUSTER_TYPE
            && first
            && !request.initial_resource_versions.is_empty()
            && !self.subscriptions.contains_key(ENDPOINTS_TYPE)
        {
            self.awaiting_member_versions = true;
        }
        if request.type_url == ENDPOINTS_TYPE {
            self.awaiting_member_versions = false;
        }
        let subscription = self
            .subscriptions
            .entry(request.type_url.clone())
            .or_default();
        // An empty first subscription is the legacy way of asking for everything.
        if first && request.resource_names_subscribe.is_empty() {
            subscription.wildcard = true;
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                subscription.wildcard = true;
            } else {
                subscription.names.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                subscription.wildcard = false;
            } else {
                subscription.names.remove(name);
                subscription.known.remove(name);
            }
        }
        for (name, version) in &request.initial_resource_versions {
            subscription.known.insert(name.clone(), version.clone());
            if let Some(seen) = registry_version_of(version) {
                self.floor = self.floor.max(seen);
            }
        }
        let Ok(nonce) = request.response_nonce.parse::<u64>() else {
            return Verdict::None;
        };
        let resources = subscription.in_flight.remove(&nonce).unwrap_or_default();
        match &request.error_detail {
            Some(status) => Verdict::Rejected {
                type_url: request.type_url.clone(),
                resources,
                error: status.message.clone(),
            },
            None => Verdict::Accepted {
                type_url: request.type_url.clone(),
            },
        }
    }

    /// The subscribed types, clusters before load assignments (a new cluster's members follow
    /// the cluster), then any other.
    pub fn subscribed_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.subscriptions.keys().cloned().collect();
        types.sort_by_key(|type_url| match type_url.as_str() {
            CLUSTER_TYPE => 0,
            ENDPOINTS_TYPE => 1,
            _ => 2,
        });
        types
    }

    /// Whether the Envoy holds everything it was sent and asked for: no response awaits its
    /// verdict, and every cluster it has was followed by a subscription to its members (which
    /// Envoy asks for only after it took the cluster). Then what the last [`DeltaStream::respond`]
    /// calls had to send has reached it.
    pub fn is_settled(&self) -> bool {
        let awaiting = self
            .subscriptions
            .values()
            .any(|subscription| !subscription.in_flight.is_empty());
        let members_asked_for = match (
            self.subscriptions.get(CLUSTER_TYPE),
            self.subscriptions.get(ENDPOINTS_TYPE),
        ) {
            (Some(clusters), Some(endpoints)) => clusters
                .known
                .keys()
                .all(|cluster| endpoints.known.contains_key(cluster)),
            (Some(clusters), None) => clusters.known.is_empty(),
            (None, _) => true,
        };
        !awaiting && members_asked_for
    }

    /// The response that brings the Envoy's `type_url` resources up to `resources`, or `None`
    /// when it has them all (or the resources lag what the Envoy has seen).
    pub fn respond(
        &mut self,
        type_url: &str,
        resources: &XdsResources,
    ) -> Option<DeltaDiscoveryResponse> {
        if !resources.synced || resources.registry_version < self.floor {
            return None;
        }
        if type_url == CLUSTER_TYPE && self.awaiting_member_versions {
            return None;
        }
        let available = resources.of_type(type_url)?;
        let subscription = self.subscriptions.get_mut(type_url)?;
        let in_scope = |name: &String| subscription.wildcard || subscription.names.contains(name);
        let updated: Vec<Resource> = available
            .iter()
            .filter(|(name, resource)| {
                in_scope(name) && subscription.known.get(*name) != Some(&resource.version)
            })
            .map(|(name, resource)| Resource {
                name: name.clone(),
                version: resource.version.clone(),
                resource: Some(resource.resource.clone()),
                ..Resource::default()
            })
            .collect();
        // Load assignments of a removed service go when Envoy drops its cluster and unsubscribes;
        // removing them first would leave the cluster without members meanwhile.
        let removed: Vec<String> = if subscription.wildcard {
            subscription
                .known
                .keys()
                .filter(|name| !available.contains_key(*name))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        if updated.is_empty() && removed.is_empty() && subscription.answered {
            return None;
        }
        subscription.answered = true;
        for resource in &updated {
            subscription
                .known
                .insert(resource.name.clone(), resource.version.clone());
        }
        for name in &removed {
            subscription.known.remove(name);
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce;
        let mut carried: Vec<String> = updated.iter().map(|r| r.name.clone()).collect();
        carried.extend(removed.iter().cloned());
        subscription.in_flight.insert(nonce, carried);
        while subscription.in_flight.len() > MAX_IN_FLIGHT {
            subscription.in_flight.pop_first();
        }
        self.floor = self.floor.max(resources.registry_version);
        Some(DeltaDiscoveryResponse {
            system_version_info: resources.registry_version.to_string(),
            type_url: type_url.to_string(),
            resources: updated,
            removed_resources: removed,
            nonce: nonce.to_string(),
            ..DeltaDiscoveryResponse::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use zklb_wire::{Instance, Service, SourceFormat};

    use crate::registry::Publication;

    use super::*;
    use crate::snapshot::Snapshot;
    use crate::xds::settings::ClusterSettingsTable;

    fn resources(services: &[(&str, Version, &[u16])]) -> XdsResources {
        let services: Vec<Service> = services
            .iter()
            .map(|(name, version, ports)| {
                let instances = ports
                    .iter()
                    .map(|&port| {
                        Instance::new(port.to_string(), "127.0.0.1", port, SourceFormat::Curator)
                    })
                    .collect();
                Service {
                    name: name.to_string(),
                    version: *version,
                    instances,
                    ..Service::default()
                }
            })
            .collect();
        let snapshot = Snapshot::default().succeeded_by(Publication::of(services));
        XdsResources::default().update(&snapshot, &ClusterSettingsTable::default())
    }

    fn subscribe(type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|name| name.to_string()).collect(),
            ..DeltaDiscoveryRequest::default()
        }
    }

    fn answer(type_url: &str, nonce: &str, error: Option<&str>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|message| RpcStatus {
                code: 3,
                message: message.into(),
                details: vec![],
            }),
            ..DeltaDiscoveryRequest::default()
        }
    }

    fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
        response.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn a_wildcard_subscription_gets_every_cluster_then_only_what_changed() {
        let mut stream = DeltaStream::default();
        assert_eq!(stream.receive(&subscribe(CLUSTER_TYPE, &[])), Verdict::None);
        let first = resources(&[("a", 3, &[8001]), ("b", 4, &[8002])]);
        let response = stream.respond(CLUSTER_TYPE, &first).expect("everything");
        assert_eq!(names(&response), ["zklb_service_a", "zklb_service_b"]);
        assert_eq!(response.system_version_info, "4");
        assert_eq!(
            stream.receive(&answer(CLUSTER_TYPE, &response.nonce, None)),
            Verdict::Accepted {
                type_url: CLUSTER_TYPE.into()
            }
        );
        assert_eq!(
            stream.respond(CLUSTER_TYPE, &first),
            None,
            "nothing changed"
        );

        let second = resources(&[("b", 4, &[8002]), ("c", 9, &[8003])]);
        let response = stream.respond(CLUSTER_TYPE, &second).expect("a change");
        assert_eq!(names(&response), ["zklb_service_c"]);
        assert_eq!(response.removed_resources, ["zklb_service_a"]);
    }

    #[test]
    fn load_assignments_go_to_subscribers_of_that_cluster_only() {
        let mut stream = DeltaStream::default();
        stream.receive(&subscribe(ENDPOINTS_TYPE, &["zklb_service_a"]));
        let first = resources(&[("a", 3, &[8001]), ("b", 4, &[8002])]);
        let response = stream.respond(ENDPOINTS_TYPE, &first).expect("a's members");
        assert_eq!(names(&response), ["zklb_service_a"]);
        // b changes: nothing for a subscriber of a alone.
        let second = resources(&[("a", 3, &[8001]), ("b", 8, &[8002, 8004])]);
        assert_eq!(stream.respond(ENDPOINTS_TYPE, &second), None);
        // a is gone from the registry: its members stay until Envoy drops the cluster.
        let third = resources(&[("b", 8, &[8002, 8004])]);
        assert_eq!(stream.respond(ENDPOINTS_TYPE, &third), None);
        stream.receive(&DeltaDiscoveryRequest {
            type_url: ENDPOINTS_TYPE.into(),
            resource_names_unsubscribe: vec!["zklb_service_a".into()],
            resource_names_subscribe: vec!["zklb_service_b".into()],
            ..DeltaDiscoveryRequest::default()
        });
        let response = stream.respond(ENDPOINTS_TYPE, &third).expect("b's members");
        assert_eq!(names(&response), ["zklb_service_b"]);
        assert!(response.removed_resources.is_empty());
    }

    #[test]
    fn what_a_reconnecting_envoy_holds_is_not_sent_again() {
        let current = resources(&[("a", 3, &[8001]), ("b", 4, &[8002])]);
        let held = |name: &str| current.endpoints[name].version.clone();
        let mut stream = DeltaStream::default();
        stream.receive(&DeltaDiscoveryRequest {
            type_url: ENDPOINTS_TYPE.into(),
            resource_names_subscribe: vec!["zklb_service_a".into(), "zklb_service_b".into()],
            initial_resource_versions: HashMap::from([
                ("zklb_service_a".to_string(), held("zklb_service_a")),
                ("zklb_service_b".to_string(), "2-0".to_string()),
            ]),
            ..DeltaDiscoveryRequest::default()
        });
        let response = stream
            .respond(ENDPOINTS_TYPE, &current)
            .expect("b is older");
        assert_eq!(names(&response), ["zklb_service_b"]);
    }

    #[test]
    fn a_replica_behind_what_the_envoy_has_seen_sends_nothing_until_it_catches_up() {
        let mut stream = DeltaStream::default();
        stream.receive(&DeltaDiscoveryRequest {
            type_url: ENDPOINTS_TYPE.into(),
            resource_names_subscribe: vec!["zklb_service_a".into()],
            initial_resource_versions: HashMap::from([(
                "zklb_service_a".to_string(),
                "40-0".to_string(),
            )]),
            ..DeltaDiscoveryRequest::default()
        });
        stream.receive(&subscribe(CLUSTER_TYPE, &["*"]));
        let lagging = resources(&[("a", 30, &[8001])]);
        assert_eq!(stream.respond(ENDPOINTS_TYPE, &lagging), None);
        assert_eq!(stream.respond(CLUSTER_TYPE, &lagging), None);
        let caught_up = resources(&[("a", 41, &[8001, 8002])]);
        assert!(stream.respond(CLUSTER_TYPE, &caught_up).is_some());
        assert!(stream.respond(ENDPOINTS_TYPE, &caught_up).is_some());
    }

    #[test]
    fn a_reconnecting_envoys_clusters_wait_for_its_member_versions() {
        let lagging = resources(&[("a", 30, &[8001])]);
        let mut stream = DeltaStream::default();
        // Envoy has b, created after everything this replica has read.
        stream.receive(&DeltaDiscoveryRequest {
            type_url: CLUSTER_TYPE.into(),
            initial_resource_versions: HashMap::from([
                (
                    "zklb_service_a".to_string(),
                    lagging.clusters["zklb_service_a"].version.clone(),
                ),
                ("zklb_service_b".to_string(), "0123".to_string()),
            ]),
            ..DeltaDiscoveryRequest::default()
        });
        assert_eq!(
            stream.respond(CLUSTER_TYPE, &lagging),
            None,
            "b would be removed before the floor is known"
        );
        stream.receive(&DeltaDiscoveryRequest {
            type_url: ENDPOINTS_TYPE.into(),
            resource_names_subscribe: vec!["zklb_service_a".into(), "zklb_service_b".into()],
            initial_resource_versions: HashMap::from([(
                "zklb_service_b".to_string(),
                "35-0".to_string(),
            )]),
            ..DeltaDiscoveryRequest::default()
        });
        assert_eq!(stream.respond(CLUSTER_TYPE, &lagging), None);
        let caught_up = resources(&[("a", 30, &[8001]), ("b", 35, &[8002])]);
        let response = stream.respond(CLUSTER_TYPE, &caught_up).expect("caught up");
        assert!(response.removed_resources.is_empty());
    }

    #[test]
    fn a_rejection_names_the_resources_and_they_are_resent_only_when_they_change() {
        let mut stream = DeltaStream::default();
        stream.receive(&subscribe(CLUSTER_TYPE, &["*"]));
        let first = resources(&[("a", 3, &[8001])]);
        let response = stream.respond(CLUSTER_TYPE, &first).expect("a");
        assert_eq!(
            stream.receive(&answer(CLUSTER_TYPE, &response.nonce, Some("bad cluster"))),
            Verdict::Rejected {
                type_url: CLUSTER_TYPE.into(),
                resources: vec!["zklb_service_a".into()],
                error: "bad cluster".into(),
            }
        );
        assert_eq!(stream.respond(CLUSTER_TYPE, &first), None);
        let second = resources(&[("a", 3, &[8001]), ("b", 5, &[8002])]);
        let response = stream.respond(CLUSTER_TYPE, &second).expect("b");
        assert_eq!(names(&response), ["zklb_service_b"]);
    }

    #[test]
    fn an_empty_registry_is_answered_once_so_that_envoy_can_start() {
        let mut stream = DeltaStream::default();
        stream.receive(&subscribe(CLUSTER_TYPE, &[]));
        let empty = resources(&[]);
        let response = stream
            .respond(CLUSTER_TYPE, &empty)
            .expect("an empty answer");
        assert!(response.resources.is_empty() && response.removed_resources.is_empty());
        assert_eq!(stream.respond(CLUSTER_TYPE, &empty), None);
    }

    #[test]
    fn a_stream_is_settled_once_envoy_acknowledged_a_new_cluster_and_its_members() {
        let mut stream = DeltaStream::default();
        stream.receive(&subscribe(CLUSTER_TYPE, &[]));
        let current = resources(&[("a", 3, &[8001])]);
        let clusters = stream.respond(CLUSTER_TYPE, &current).expect("a's cluster");
        assert!(!stream.is_settled(), "the cluster is not acknowledged");
        stream.receive(&answer(CLUSTER_TYPE, &clusters.nonce, None));
        assert_eq!(stream.respond(ENDPOINTS_TYPE, &current), None);
        assert!(
            !stream.is_settled(),
            "Envoy has not asked for a's members yet"
        );
        stream.receive(&subscribe(ENDPOINTS_TYPE, &["zklb_service_a"]));
        let members = stream
            .respond(ENDPOINTS_TYPE, &current)
            .expect("a's members");
        assert!(!stream.is_settled(), "the members are not acknowledged");
        stream.receive(&answer(ENDPOINTS_TYPE, &members.nonce, None));
        assert!(stream.is_settled());
    }

    #[test]
    fn nothing_is_sent_before_zookeeper_is_read() {
        let mut stream = DeltaStream::default();
        stream.receive(&subscribe(CLUSTER_TYPE, &[]));
        assert_eq!(stream.respond(CLUSTER_TYPE, &XdsResources::default()), None);
    }

    #[test]
    fn clusters_are_answered_before_their_members() {
        let mut stream = DeltaStream::default();
        stream.receive(&subscribe(ENDPOINTS_TYPE, &["zklb_service_a"]));
        stream.receive(&subscribe(CLUSTER_TYPE, &[]));
        assert_eq!(stream.subscribed_types(), [CLUSTER_TYPE, ENDPOINTS_TYPE]);
    }
}
