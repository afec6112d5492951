//! An ADS client that follows the control plane as an Envoy does: one delta xDS stream, every
//! cluster (a wildcard subscription), then the members of each cluster it is sent, every
//! response acknowledged. It hands each load assignment it receives to its caller, encoded: a
//! hundred streams decoding a whole registry each would starve the process that measures.

use std::collections::BTreeSet;

use anyhow::Context as _;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINTS_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Envoy takes messages far larger than tonic's 4 MiB default; a whole registry's members
/// come in one response.
const MAX_MESSAGE: usize = 1 << 30;

/// Follows the control plane at `url` as node `node` until the stream ends or fails, calling
/// `received` with the name and the encoded `ClusterLoadAssignment` of every load assignment
/// sent.
pub async fn follow(
    url: &str,
    node: &str,
    mut received: impl FnMut(&str, &[u8]),
) -> anyhow::Result<()> {
    let mut client = AggregatedDiscoveryServiceClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to {url}"))?
        .max_decoding_message_size(MAX_MESSAGE);
    let (requests, outgoing) = mpsc::unbounded_channel();
    let send = |request: DeltaDiscoveryRequest| {
        requests
            .send(request)
            .map_err(|_| anyhow::anyhow!("the request stream closed"))
    };
    send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: node.to_string(),
            ..Node::default()
        }),
        type_url: CLUSTER_TYPE.to_string(),
        ..DeltaDiscoveryRequest::default()
    })?;
    let outgoing = UnboundedReceiverStream::new(outgoing);
    let mut responses = client
        .delta_aggregated_resources(outgoing)
        .await
        .context("opening the ADS stream")?
        .into_inner();
    let mut clusters = BTreeSet::new();
    while let Some(response) = responses
        .message()
        .await
        .context("reading the ADS stream")?
    {
        let subscribe = new_clusters(&response, &mut clusters);
        if response.type_url == ENDPOINTS_TYPE {
            for resource in &response.resources {
                let Some(any) = &resource.resource else {
                    continue;
                };
                received(&resource.name, &any.value);
            }
        }
        send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        })?;
        if !subscribe.is_empty() {
            send(DeltaDiscoveryRequest {
                type_url: ENDPOINTS_TYPE.to_string(),
                resource_names_subscribe: subscribe,
                ..DeltaDiscoveryRequest::default()
            })?;
        }
    }
    Ok(())
}

/// The clusters of a cluster response not known before, now added to `known`: their members
/// are subscribed to, as Envoy does once it has taken a cluster.
fn new_clusters(response: &DeltaDiscoveryResponse, known: &mut BTreeSet<String>) -> Vec<String> {
    if response.type_url != CLUSTER_TYPE {
        return Vec::new();
    }
    for removed in &response.removed_resources {
        known.remove(removed);
    }
    response
        .resources
        .iter()
        .filter(|resource| known.insert(resource.name.clone()))
        .map(|resource| resource.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;

    fn response(type_url: &str, names: &[&str], removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            resources: names
                .iter()
                .map(|name| Resource {
                    name: name.to_string(),
                    ..Resource::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|name| name.to_string()).collect(),
            ..DeltaDiscoveryResponse::default()
        }
    }

    #[test]
    fn members_are_subscribed_once_per_new_cluster() {
        let mut known = BTreeSet::new();
        let first = response(CLUSTER_TYPE, &["a", "b"], &[]);
        assert_eq!(new_clusters(&first, &mut known), ["a", "b"]);
        let changed = response(CLUSTER_TYPE, &["b", "c"], &["a"]);
        assert_eq!(new_clusters(&changed, &mut known), ["c"]);
        let again = response(CLUSTER_TYPE, &["a"], &[]);
        assert_eq!(new_clusters(&again, &mut known), ["a"]);
        let members = response(ENDPOINTS_TYPE, &["d"], &[]);
        assert!(new_clusters(&members, &mut known).is_empty());
    }
}
