//! The gRPC side of ADS: one task per Envoy stream, feeding [`DeltaStream`] with Envoy's
//! requests and with every new set of resources.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::delta::{DeltaStream, Verdict};
use super::resources::XdsResources;
use super::XdsStats;

/// What every stream reads.
#[derive(Clone)]
pub struct AdsService {
    pub resources: watch::Receiver<Arc<XdsResources>>,
    pub stats: Arc<XdsStats>,
    /// Turns true when the server shuts down, ending every stream.
    pub stopping: watch::Receiver<bool>,
}

pub type AdsServer = AggregatedDiscoveryServiceServer<AdsService>;

impl AdsService {
    pub fn into_server(self) -> AdsServer {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "zklb serves incremental xDS only: set ads_config.api_type to DELTA_GRPC",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |address| address.to_string());
        let (responses, outgoing) = mpsc::channel(16);
        tokio::spawn(serve_stream(
            self.clone(),
            request.into_inner(),
            responses,
            peer,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }
}

async fn serve_stream(
    service: AdsService,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    peer: String,
) {
    let AdsService {
        mut resources,
        stats,
        mut stopping,
    } = service;
    let _open = stats.open_stream();
    let stream_id = stats.acks.new_stream();
    let mut stream = DeltaStream::default();
    let mut node = String::new();
    tracing::info!(peer, "ADS stream opened");
    'stream: loop {
        tokio::select! {
            request = requests.message() => match request {
                Ok(Some(request)) => {
                    if let Some(sent) = &request.node {
                        node.clone_from(&sent.id);
                    }
                    match stream.receive(&request) {
                        Verdict::Rejected { type_url, resources, error } => {
                            stats.count_rejection(&type_url);
                            tracing::warn!(node, peer, type_url, ?resources, error, "Envoy rejected resources; it keeps its last good ones");
                        }
                        Verdict::Accepted { .. } | Verdict::None => {}
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(node, peer, %status, "ADS stream failed");
                    break;
                }
            },
            changed = resources.changed() => if changed.is_err() { break },
            _ = stopping.wait_for(|stopping| *stopping) => break,
        }
        let current = Arc::clone(&resources.borrow_and_update());
        let mut sent = false;
        for type_url in stream.subscribed_types() {
            let Some(response) = stream.respond(&type_url, &current) else {
                continue;
            };
            sent = true;
            stats.count_response(&type_url, response.resources.len());
            tracing::debug!(
                node,
                type_url,
                version = response.system_version_info,
                updated = response.resources.len(),
                removed = response.removed_resources.len(),
                "ADS response"
            );
            if responses.send(Ok(response)).await.is_err() {
                break 'stream;
            }
        }
        if !sent && current.synced && stream.is_settled() {
            stats
                .acks
                .record(&node, stream_id, current.registry_version);
        }
    }
    stats.acks.forget(&node, stream_id);
    tracing::info!(node, peer, "ADS stream closed");
}
