//! Envoy's cluster membership over REST-JSON xDS: one EDS cluster per service, whose members are
//! exactly the service's routable instances, so that neither the filter's candidates nor the
//! `override_host` fallback can leave the service.
//!
//! Envoy sends the version it last accepted; an unchanged resource is held as a long-poll until
//! it changes, then answered, or answered 304 when the hold ends.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use zklb_wire::{Instance, Version};

use crate::api::{respond_or_not_modified, ApiError, AppState};
use crate::snapshot::Snapshot;

const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINTS_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// How the generated clusters reach back to the control plane and behave.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// Envoy's static cluster that points at the control plane.
    pub control_plane_cluster: String,
    /// How long Envoy waits for a held EDS poll; must exceed the hold.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

#[derive(Debug, Deserialize)]
pub struct DiscoveryRequest {
    #[serde(default)]
    version_info: String,
    #[serde(default)]
    resource_names: Vec<String>,
}

pub async fn discover_clusters(
    State(state): State<AppState>,
    request: Result<Json<DiscoveryRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = request.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let known = request.version_info;
    let changed = state.snapshot_when(state.max_hold, |snapshot| {
        snapshot.clusters_version.to_string() != known
    });
    let settings = &state.xds;
    Ok(respond_or_not_modified(changed, |snapshot| {
        Json(clusters(snapshot, settings)).into_response()
    })
    .await)
}

pub async fn discover_endpoints(
    State(state): State<AppState>,
    request: Result<Json<DiscoveryRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = request.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let names = request.resource_names;
    let known = request.version_info;
    let changed = state.snapshot_when(state.max_hold, |snapshot| {
        endpoints_version(snapshot, &names).to_string() != known
    });
    Ok(respond_or_not_modified(changed, |snapshot| {
        Json(endpoints(snapshot, &names)).into_response()
    })
    .await)
}

/// A `DiscoveryResponse` with one cluster per service.
pub fn clusters(snapshot: &Snapshot, settings: &XdsSettings) -> Value {
    let resources: Vec<Value> = snapshot
        .services
        .services
        .keys()
        .map(|service| cluster(service, settings))
        .collect();
    json!({
        "version_info": snapshot.clusters_version.to_string(),
        "type_url": CLUSTER_TYPE,
        "resources": resources,
    })
}

fn cluster(service: &str, settings: &XdsSettings) -> Value {
    json!({
        "@type": CLUSTER_TYPE,
        "name": zklb_wire::cluster_name(service),
        "type": "EDS",
        "connect_timeout": duration(settings.connect_timeout),
        "eds_cluster_config": {
            "eds_config": {
                "resource_api_version": "V3",
                "api_config_source": {
                    "api_type": "REST",
                    "transport_api_version": "V3",
                    "cluster_names": [settings.control_plane_cluster],
                    // Only paces retries after a failed poll: a held poll returns on change.
                    "refresh_delay": "1s",
                    "request_timeout": duration(settings.request_timeout),
                }
            }
        },
        // Every attempt of a request may be a retry; Envoy's default of 3 concurrent retries per
        // cluster turns one dead backend into client errors under load.
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": 10000}]},
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [{"header": zklb_wire::CANDIDATES_HEADER}],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.random",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.random.v3.Random"}
                }}]}
            }
        }}]},
        // The candidate list is for Envoy alone: removed before the request leaves for a backend
        // (after host selection, which has already read it).
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": [
                    {
                        "name": "envoy.filters.http.header_mutation",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                            "mutations": {"request_mutations": [{"remove": zklb_wire::CANDIDATES_HEADER}]}
                        }
                    },
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}
                    }
                ]
            }
        }
    })
}

/// The version of the named clusters' memberships: the newest of their services' versions.
fn endpoints_version(snapshot: &Snapshot, cluster_names: &[String]) -> Version {
    cluster_names
        .iter()
        .filter_map(|name| zklb_wire::service_of_cluster(name))
        .filter_map(|service| snapshot.services.services.get(service))
        .map(|service| service.version)
        .max()
        .unwrap_or_default()
}

/// A `DiscoveryResponse` with the members of each named cluster; a cluster that is no service's
/// gets no members.
pub fn endpoints(snapshot: &Snapshot, cluster_names: &[String]) -> Value {
    let resources: Vec<Value> = cluster_names
        .iter()
        .map(|name| {
            let instances = zklb_wire::service_of_cluster(name)
                .and_then(|service| snapshot.services.services.get(service))
                .map(|service| service.routable_instances())
                .unwrap_or_default();
            load_assignment(name, &instances)
        })
        .collect();
    json!({
        "version_info": endpoints_version(snapshot, cluster_names).to_string(),
        "type_url": ENDPOINTS_TYPE,
        "resources": resources,
    })
}

fn load_assignment(cluster: &str, instances: &[&Instance]) -> Value {
    let members: Vec<Value> = instances
        .iter()
        .map(|instance| {
            json!({"endpoint": {"address": {"socket_address": {
                "address": instance.address,
                "port_value": instance.port,
            }}}})
        })
        .collect();
    json!({
        "@type": ENDPOINTS_TYPE,
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": members}],
    })
}

fn duration(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use zklb_wire::{Service, ServiceSet, SourceFormat, Status};

    fn instance(address: &str, port: u16, status: Status) -> Instance {
        Instance::new(
            format!("{address}:{port}"),
            address,
            port,
            SourceFormat::Curator,
        )
        .with_status(status)
    }

    fn snapshot() -> Snapshot {
        let echo = Service {
            name: "echo".into(),
            version: 11,
            instances: vec![
                instance("127.0.0.1", 8001, Status::Up),
                instance("127.0.0.1", 8002, Status::Down),
                instance("echo.internal", 8003, Status::Up),
            ],
        };
        let orders = Service {
            name: "orders".into(),
            version: 4,
            instances: vec![],
        };
        Snapshot {
            services: ServiceSet {
                version: 11,
                services: BTreeMap::from([("echo".into(), echo), ("orders".into(), orders)]),
            },
            clusters_version: 3,
            synced: true,
        }
    }

    fn settings() -> XdsSettings {
        XdsSettings {
            control_plane_cluster: "zklb_control_plane".into(),
            request_timeout: Duration::from_secs(40),
            connect_timeout: Duration::from_millis(250),
        }
    }

    #[test]
    fn every_service_gets_an_override_host_eds_cluster() {
        let response = clusters(&snapshot(), &settings());
        assert_eq!(response["version_info"], "3");
        let names: Vec<&str> = response["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|cluster| cluster["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, ["zklb_service_echo", "zklb_service_orders"]);
        let echo = &response["resources"][0];
        assert_eq!(echo["type"], "EDS");
        assert_eq!(echo["connect_timeout"], "0.25s");
        assert_eq!(
            echo["eds_cluster_config"]["eds_config"]["api_config_source"]["cluster_names"][0],
            "zklb_control_plane"
        );
        let policy = &echo["load_balancing_policy"]["policies"][0]["typed_extension_config"];
        assert_eq!(
            policy["name"],
            "envoy.load_balancing_policies.override_host"
        );
        assert_eq!(
            policy["typed_config"]["override_host_sources"][0]["header"],
            zklb_wire::CANDIDATES_HEADER
        );
    }

    #[test]
    fn members_are_the_routable_instances_only() {
        let response = endpoints(&snapshot(), &["zklb_service_echo".to_string()]);
        assert_eq!(response["version_info"], "11");
        let members = &response["resources"][0]["endpoints"][0]["lb_endpoints"];
        assert_eq!(members.as_array().map(Vec::len), Some(1));
        assert_eq!(
            members[0]["endpoint"]["address"]["socket_address"]["port_value"],
            8001
        );
    }

    #[test]
    fn clusters_that_are_no_service_get_no_members() {
        for name in ["zklb_control_plane", "zklb_service_gone"] {
            let response = endpoints(&snapshot(), &[name.to_string()]);
            assert_eq!(response["resources"][0]["cluster_name"], name);
            assert_eq!(
                response["resources"][0]["endpoints"][0]["lb_endpoints"],
                serde_json::json!([])
            );
        }
    }

    #[test]
    fn endpoint_versions_follow_only_the_requested_services() {
        let snapshot = snapshot();
        assert_eq!(
            endpoints_version(&snapshot, &["zklb_service_orders".into()]),
            4
        );
        assert_eq!(
            endpoints_version(&snapshot, &["zklb_service_echo".into()]),
            11
        );
    }
}
