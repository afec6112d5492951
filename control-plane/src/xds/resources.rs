//! What Envoy is told: one EDS cluster per service and the service's load assignment, each a
//! versioned resource. Built once per registry change, for only the services that changed, and
//! shared by every ADS stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers::thresholds::RetryBudget, circuit_breakers::Thresholds, cluster,
    load_balancing_policy, CircuitBreakers, Cluster, LoadBalancingPolicy,
};
use envoy_types::pb::envoy::config::common::mutation_rules::v3::{
    header_mutation, HeaderMutation as HeaderMutationRule,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, data_source, socket_address, transport_socket, Address,
    AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, Http1ProtocolOptions,
    Http2ProtocolOptions, Metadata, RoutingPriority, SocketAddress, TransportSocket,
    TypedExtensionConfig,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::filters::http::header_mutation::v3::{
    HeaderMutation, Mutations,
};
use envoy_types::pb::envoy::extensions::filters::http::upstream_codec::v3::UpstreamCodec;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::override_host::v3::{
    override_host::OverrideHostSource, OverrideHost,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::random::v3::Random;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, subject_alt_name_matcher::SanType as san_type_enum,
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{
    value, Any, Duration as ProtoDuration, Struct, UInt32Value, Value as ProtoValue,
};
use envoy_types::util::pack_any;
use prost::{Message, Name};
use zklb_wire::{Service, Version};

use super::settings::{ClusterSettings, ClusterSettingsTable, UpstreamProtocol};
use crate::snapshot::Snapshot;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// One resource as sent to Envoy, with the version that names its content.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub version: String,
    pub resource: Any,
}

/// Every resource of one type, by resource name.
pub type ResourceMap = BTreeMap<String, Arc<Versioned>>;

/// Everything Envoy is told, as of one registry snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XdsResources {
    /// The registry version these resources reflect.
    pub registry_version: Version,
    /// False until ZooKeeper has been read: nothing is sent before.
    pub synced: bool,
    pub clusters: ResourceMap,
    pub endpoints: ResourceMap,
    /// The version of each service that its resources were built from, so that the next
    /// snapshot rebuilds only the services that changed.
    built_from: BTreeMap<String, Version>,
}

impl XdsResources {
    /// The resources of `snapshot`, reusing those of `self` for every unchanged service.
    pub fn update(&self, snapshot: &Snapshot, settings: &ClusterSettingsTable) -> XdsResources {
        let mut next = XdsResources {
            registry_version: snapshot.version(),
            synced: snapshot.synced,
            ..XdsResources::default()
        };
        for (name, service) in snapshot.services() {
            let cluster_name = zklb_wire::cluster_name(name);
            let unchanged = self.built_from.get(name) == Some(&service.version);
            let reused = unchanged
                .then(|| {
                    let cluster = self.clusters.get(&cluster_name)?;
                    let endpoints = self.endpoints.get(&cluster_name)?;
                    Some((Arc::clone(cluster), Arc::clone(endpoints)))
                })
                .flatten();
            let (cluster, endpoints) = reused.unwrap_or_else(|| {
                (
                    Arc::new(cluster_resource(name, settings.for_service(name))),
                    Arc::new(endpoints_resource(service)),
                )
            });
            next.clusters.insert(cluster_name.clone(), cluster);
            next.endpoints.insert(cluster_name, endpoints);
            next.built_from.insert(name.clone(), service.version);
        }
        next
    }

    pub fn of_type(&self, type_url: &str) -> Option<&ResourceMap> {
        match type_url {
            CLUSTER_TYPE => Some(&self.clusters),
            ENDPOINTS_TYPE => Some(&self.endpoints),
            _ => None,
        }
    }
}

/// The registry version in a load assignment's version (`<zxid>-<digest>`): how far in the
/// registry's history the Envoy that holds it has been.
pub fn registry_version_of(version: &str) -> Option<Version> {
    version.split_once('-')?.0.parse().ok()
}

fn cluster_resource(service: &str, settings: &ClusterSettings) -> Versioned {
    let cluster = cluster(service, settings);
    let bytes = cluster.encode_to_vec();
    // The content alone names a cluster: settings that change give a new version, and every
    // replica with the same settings gives the same one.
    Versioned {
        version: format!("{:016x}", digest(&bytes)),
        resource: Any {
            type_url: Cluster::type_url(),
            value: bytes,
        },
    }
}

fn endpoints_resource(service: &Service) -> Versioned {
    let assignment = load_assignment(service);
    let bytes = assignment.encode_to_vec();
    Versioned {
        version: format!("{}-{:016x}", service.version, digest(&bytes)),
        resource: Any {
            type_url: ClusterLoadAssignment::type_url(),
            value: bytes,
        },
    }
}

/// An EDS cluster whose members come over the same ADS stream, balanced by `override_host`
/// (attempt k goes to the filter's candidate k) with a random fallback.
fn cluster(service: &str, settings: &ClusterSettings) -> Cluster {
    let random = TypedExtensionConfig {
        name: "envoy.load_balancing_policies.random".into(),
        typed_config: Some(pack_any(Random::default())),
    };
    let override_host = OverrideHost {
        override_host_sources: vec![OverrideHostSource {
            header: zklb_wire::CANDIDATES_HEADER.into(),
            ..OverrideHostSource::default()
        }],
        fallback_policy: Some(LoadBalancingPolicy {
            policies: vec![load_balancing_policy::Policy {
                typed_extension_config: Some(random),
            }],
        }),
        ..OverrideHost::default()
    };
    Cluster {
        name: zklb_wire::cluster_name(service),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..ConfigSource::default()
            }),
            service_name: String::new(),
        }),
        connect_timeout: Some(proto_duration(settings.connect_timeout)),
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                priority: RoutingPriority::Default as i32,
                max_connections: Some(UInt32Value {
                    value: settings.max_connections,
                }),
                max_pending_requests: Some(UInt32Value {
                    value: settings.max_pending_requests,
                }),
                max_requests: Some(UInt32Value {
                    value: settings.max_requests,
                }),
                retry_budget: Some(RetryBudget {
                    budget_percent: Some(Percent {
                        value: f64::from(settings.retry_budget_percent),
                    }),
                    min_retry_concurrency: Some(UInt32Value {
                        value: settings.min_retry_concurrency,
                    }),
                    ..RetryBudget::default()
                }),
                ..Thresholds::default()
            }],
            ..CircuitBreakers::default()
        }),
        load_balancing_policy: Some(LoadBalancingPolicy {
            policies: vec![load_balancing_policy::Policy {
                typed_extension_config: Some(TypedExtensionConfig {
                    name: "envoy.load_balancing_policies.override_host".into(),
                    typed_config: Some(pack_any(override_host)),
                }),
            }],
        }),
        transport_socket_matches: vec![cluster::TransportSocketMatch {
            name: "tls".into(),
            r#match: Some(tls_match()),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
                    tls_context(settings),
                ))),
            }),
        }],
        typed_extension_protocol_options: HashMap::from([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack_any(protocol_options(settings.protocol)),
        )]),
        ..Cluster::default()
    }
}

/// The upstream protocol, and the upstream filters that remove the candidate list before the
/// request leaves for a backend (after host selection, which has already read it; removing it
/// in the route would break the override).
fn protocol_options(protocol: UpstreamProtocol) -> HttpProtocolOptions {
    let protocol_config = match protocol {
        UpstreamProtocol::Http1 => {
            ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
        }
        UpstreamProtocol::Http2 => {
            ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
        }
    };
    let remove_candidates = HeaderMutation {
        mutations: Some(Mutations {
            request_mutations: vec![HeaderMutationRule {
                action: Some(header_mutation::Action::Remove(
                    zklb_wire::CANDIDATES_HEADER.into(),
                )),
            }],
            ..Mutations::default()
        }),
        ..HeaderMutation::default()
    };
    HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol_config),
            },
        )),
        http_filters: vec![
            HttpFilter {
                name: "envoy.filters.http.header_mutation".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                    remove_candidates,
                ))),
                ..HttpFilter::default()
            },
            HttpFilter {
                name: "envoy.filters.http.upstream_codec".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                    UpstreamCodec {},
                ))),
                ..HttpFilter::default()
            },
        ],
        ..HttpProtocolOptions::default()
    }
}

/// The metadata by which an endpoint that speaks TLS selects the cluster's TLS transport socket.
fn tls_match() -> Struct {
    Struct {
        fields: HashMap::from([(
            TLS_MATCH_KEY.to_string(),
            ProtoValue {
                kind: Some(value::Kind::BoolValue(true)),
            },
        )]),
    }
}

const TLS_MATCH_KEY: &str = "tls";

fn tls_context(settings: &ClusterSettings) -> UpstreamTlsContext {
    let validation = settings.tls_ca_file.as_ref().map(|ca_file| {
        ValidationContextType::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(DataSource {
                specifier: Some(data_source::Specifier::Filename(ca_file.clone())),
                ..DataSource::default()
            }),
            match_typed_subject_alt_names: settings
                .tls_server_name
                .iter()
                .map(|name| SubjectAltNameMatcher {
                    san_type: san_type_enum::Dns as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(name.clone())),
                        ..StringMatcher::default()
                    }),
                    ..SubjectAltNameMatcher::default()
                })
                .collect(),
            ..CertificateValidationContext::default()
        })
    });
    UpstreamTlsContext {
        sni: settings.tls_server_name.clone().unwrap_or_default(),
        common_tls_context: Some(CommonTlsContext {
            validation_context_type: validation,
            ..CommonTlsContext::default()
        }),
        ..UpstreamTlsContext::default()
    }
}

/// Exactly the service's routable instances, so that neither the filter's candidates nor the
/// fallback can leave the service.
fn load_assignment(service: &Service) -> ClusterLoadAssignment {
    let members = service
        .routable_instances()
        .into_iter()
        .map(|instance| LbEndpoint {
            metadata: instance.tls.then(|| Metadata {
                filter_metadata: HashMap::from([(
                    "envoy.transport_socket_match".to_string(),
                    tls_match(),
                )]),
                ..Metadata::default()
            }),
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: instance.address.clone(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                            instance.port,
                        ))),
                        ..SocketAddress::default()
                    })),
                }),
                ..Endpoint::default()
            })),
            ..LbEndpoint::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: zklb_wire::cluster_name(&service.name),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: members,
            ..LocalityLbEndpoints::default()
        }],
        ..ClusterLoadAssignment::default()
    }
}

fn proto_duration(duration: std::time::Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// FNV-1a: stable across processes and builds, unlike std's hasher, so that every replica names
/// the same content with the same version.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zklb_wire::{Instance, Service, SourceFormat, Status};

    use crate::registry::Publication;

    fn instance(address: &str, port: u16, status: Status) -> Instance {
        Instance::new(
            format!("{address}:{port}"),
            address,
            port,
            SourceFormat::Curator,
        )
        .with_status(status)
    }

    fn snapshot(services: &[(&str, Version, Vec<Instance>)]) -> Snapshot {
        let services = services.iter().map(|(name, version, instances)| Service {
            name: name.to_string(),
            version: *version,
            instances: instances.clone(),
            ..Service::default()
        });
        Snapshot::default().succeeded_by(Publication::of(services))
    }

    fn decode_cluster(resources: &XdsResources, name: &str) -> Cluster {
        Cluster::decode(resources.clusters[name].resource.value.as_slice()).expect("a cluster")
    }

    fn decode_assignment(resources: &XdsResources, name: &str) -> ClusterLoadAssignment {
        ClusterLoadAssignment::decode(resources.endpoints[name].resource.value.as_slice())
            .expect("a load assignment")
    }

    #[test]
    fn every_service_gets_an_override_host_eds_cluster_fed_over_ads() {
        let resources = XdsResources::default().update(
            &snapshot(&[("echo", 5, vec![]), ("orders", 7, vec![])]),
            &ClusterSettingsTable::default(),
        );
        let names: Vec<&String> = resources.clusters.keys().collect();
        assert_eq!(names, ["zklb_service_echo", "zklb_service_orders"]);
        let cluster = decode_cluster(&resources, "zklb_service_echo");
        assert_eq!(
            cluster.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32
            ))
        );
        let eds = cluster.eds_cluster_config.and_then(|eds| eds.eds_config);
        assert!(matches!(
            eds.and_then(|source| source.config_source_specifier),
            Some(config_source::ConfigSourceSpecifier::Ads(_))
        ));
        let policy = &cluster.load_balancing_policy.expect("a policy").policies[0];
        let config = policy.typed_extension_config.as_ref().expect("typed");
        assert_eq!(config.name, "envoy.load_balancing_policies.override_host");
        let override_host = OverrideHost::decode(
            config
                .typed_config
                .as_ref()
                .expect("config")
                .value
                .as_slice(),
        )
        .expect("override_host");
        assert_eq!(
            override_host.override_host_sources[0].header,
            zklb_wire::CANDIDATES_HEADER
        );
        let breakers = &cluster.circuit_breakers.expect("breakers").thresholds[0];
        let budget = breakers.retry_budget.as_ref().expect("a retry budget");
        assert_eq!(budget.budget_percent, Some(Percent { value: 50.0 }));
        assert_eq!(
            budget.min_retry_concurrency,
            Some(UInt32Value { value: 10 })
        );
    }

    #[test]
    fn members_are_the_routable_instances_only() {
        let resources = XdsResources::default().update(
            &snapshot(&[(
                "echo",
                11,
                vec![
                    instance("127.0.0.1", 8001, Status::Up),
                    instance("127.0.0.1", 8002, Status::Down),
                    instance("echo.internal", 8003, Status::Up),
                ],
            )]),
            &ClusterSettingsTable::default(),
        );
        let assignment = decode_assignment(&resources, "zklb_service_echo");
        assert_eq!(assignment.cluster_name, "zklb_service_echo");
        assert_eq!(assignment.endpoints[0].lb_endpoints.len(), 1);
        let version = &resources.endpoints["zklb_service_echo"].version;
        assert_eq!(registry_version_of(version), Some(11));
    }

    #[test]
    fn instances_that_speak_tls_select_the_tls_transport_socket() {
        let mut secure = instance("127.0.0.1", 8443, Status::Up);
        secure.tls = true;
        let settings = ClusterSettingsTable::parse(
            br#"{"services": {"echo": {"tls_ca_file": "/etc/ca.pem", "tls_server_name": "echo.internal"}}}"#,
        )
        .expect("valid");
        let resources = XdsResources::default().update(
            &snapshot(&[(
                "echo",
                4,
                vec![secure, instance("127.0.0.1", 8080, Status::Up)],
            )]),
            &settings,
        );
        let assignment = decode_assignment(&resources, "zklb_service_echo");
        let members = &assignment.endpoints[0].lb_endpoints;
        let selects_tls = |member: &LbEndpoint| {
            member.metadata.as_ref().is_some_and(|metadata| {
                metadata.filter_metadata.get("envoy.transport_socket_match") == Some(&tls_match())
            })
        };
        assert_eq!(
            members.iter().filter(|member| selects_tls(member)).count(),
            1
        );

        let cluster = decode_cluster(&resources, "zklb_service_echo");
        let tls = &cluster.transport_socket_matches[0];
        assert_eq!(tls.r#match, Some(tls_match()));
        let Some(transport_socket::ConfigType::TypedConfig(config)) = tls
            .transport_socket
            .as_ref()
            .and_then(|socket| socket.config_type.clone())
        else {
            panic!("no TLS transport socket");
        };
        let context = UpstreamTlsContext::decode(config.value.as_slice()).expect("TLS context");
        assert_eq!(context.sni, "echo.internal");
        let Some(ValidationContextType::ValidationContext(validation)) = context
            .common_tls_context
            .and_then(|common| common.validation_context_type)
        else {
            panic!("certificates are not checked");
        };
        assert_eq!(
            validation.trusted_ca.and_then(|ca| ca.specifier),
            Some(data_source::Specifier::Filename("/etc/ca.pem".into()))
        );
    }

    #[test]
    fn only_changed_services_are_rebuilt() {
        let settings = ClusterSettingsTable::default();
        let first = XdsResources::default()
            .update(&snapshot(&[("a", 5, vec![]), ("b", 6, vec![])]), &settings);
        let second = first.update(
            &snapshot(&[
                ("a", 5, vec![]),
                ("b", 9, vec![instance("127.0.0.1", 8001, Status::Up)]),
            ]),
            &settings,
        );
        assert!(Arc::ptr_eq(
            &first.endpoints["zklb_service_a"],
            &second.endpoints["zklb_service_a"]
        ));
        assert_ne!(
            first.endpoints["zklb_service_b"].version,
            second.endpoints["zklb_service_b"].version
        );
        // The cluster itself did not change, so neither does its version.
        assert_eq!(
            first.clusters["zklb_service_b"].version,
            second.clusters["zklb_service_b"].version
        );
        let third = second.update(&snapshot(&[("b", 9, vec![])]), &settings);
        assert!(!third.clusters.contains_key("zklb_service_a"));
    }

    #[test]
    fn a_change_of_settings_is_a_new_cluster_version() {
        let snapshot = snapshot(&[("grpc", 5, vec![])]);
        let plain = XdsResources::default().update(&snapshot, &ClusterSettingsTable::default());
        let http2 =
            ClusterSettingsTable::parse(br#"{"services": {"grpc": {"protocol": "http2"}}}"#)
                .expect("valid");
        let changed = XdsResources::default().update(&snapshot, &http2);
        assert_ne!(
            plain.clusters["zklb_service_grpc"].version,
            changed.clusters["zklb_service_grpc"].version
        );
        let again = XdsResources::default().update(&snapshot, &http2);
        assert_eq!(again.clusters, changed.clusters);
    }
}
