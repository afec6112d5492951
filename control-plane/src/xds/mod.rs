//! Envoy's cluster membership over gRPC ADS with incremental (delta) xDS: one EDS cluster per
//! service, whose members are exactly the service's routable instances, so that neither the
//! filter's candidates nor the `override_host` fallback can leave the service.
//!
//! - [`settings`]: per-service cluster settings (defaults and overrides);
//! - [`resources`]: the versioned clusters and load assignments of a snapshot;
//! - [`delta`]: the protocol of one stream (subscriptions, nonces, ACK/NACK), free of I/O;
//! - [`server`]: the tonic service that runs a stream per Envoy.

pub mod delta;
pub mod resources;
pub mod server;
pub mod settings;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use zklb_wire::Version;

use crate::snapshot::Snapshot;
use resources::{XdsResources, CLUSTER_TYPE, ENDPOINTS_TYPE};
use settings::ClusterSettingsTable;

/// Keeps the xDS resources in step with the registry until the snapshot channel closes: the
/// one place where resources are built, whatever the number of streams.
pub async fn follow_snapshots(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    settings: ClusterSettingsTable,
    resources: watch::Sender<Arc<XdsResources>>,
) {
    loop {
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        if snapshot.synced {
            let next = resources.borrow().update(&snapshot, &settings);
            resources.send_replace(Arc::new(next));
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// The registry version each Envoy has taken in full (acknowledged every cluster and member of
/// it) on each of its streams to this replica, by node id. The filter's list waits for it, so
/// that the filter never names a service or instance that its Envoy does not have yet.
#[derive(Debug)]
pub struct AckBook {
    by_node: watch::Sender<BTreeMap<String, BTreeMap<u64, Version>>>,
    next_stream: AtomicU64,
}

impl Default for AckBook {
    fn default() -> AckBook {
        AckBook {
            by_node: watch::Sender::new(BTreeMap::new()),
            next_stream: AtomicU64::new(0),
        }
    }
}

impl AckBook {
    /// A number for a new stream, unique in this process.
    pub fn new_stream(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    pub fn record(&self, node: &str, stream: u64, version: Version) {
        self.by_node.send_if_modified(|nodes| {
            let streams = nodes.entry(node.to_string()).or_default();
            streams.insert(stream, version) != Some(version)
        });
    }

    pub fn forget(&self, node: &str, stream: u64) {
        self.by_node.send_modify(|nodes| {
            if let Some(streams) = nodes.get_mut(node) {
                streams.remove(&stream);
                if streams.is_empty() {
                    nodes.remove(node);
                }
            }
        });
    }

    /// Waits until every stream of `node` on this replica has taken `version`, for at most
    /// `within`. A node with no stream here (its Envoy streams from another replica) is not
    /// waited for; nor is one that does not acknowledge in time, so that a stuck Envoy cannot
    /// stop its filter's updates.
    pub async fn wait_for(&self, node: &str, version: Version, within: Duration) {
        let mut nodes = self.by_node.subscribe();
        let taken = nodes.wait_for(|nodes| {
            nodes
                .get(node)
                .is_none_or(|streams| streams.values().all(|&acked| acked >= version))
        });
        if tokio::time::timeout(within, taken).await.is_err() {
            tracing::debug!(
                node,
                version,
                "Envoy has not acknowledged this version; answering its filter anyway"
            );
        }
    }
}

/// Counters of the ADS side, for `/metrics`.
#[derive(Debug, Default)]
pub struct XdsStats {
    pub acks: AckBook,
    pub streams: AtomicU64,
    pub clusters: TypeStats,
    pub endpoints: TypeStats,
}

/// Counters of one resource type.
#[derive(Debug, Default)]
pub struct TypeStats {
    pub responses: AtomicU64,
    /// Resources sent (added or updated), over every stream.
    pub resources_sent: AtomicU64,
    pub rejections: AtomicU64,
}

/// Counts a stream as open while it lives.
pub struct OpenStream<'a>(&'a XdsStats);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl XdsStats {
    pub fn open_stream(&self) -> OpenStream<'_> {
        self.streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(self)
    }

    fn of_type(&self, type_url: &str) -> Option<&TypeStats> {
        match type_url {
            CLUSTER_TYPE => Some(&self.clusters),
            ENDPOINTS_TYPE => Some(&self.endpoints),
            _ => None,
        }
    }

    pub fn count_response(&self, type_url: &str, resources: usize) {
        if let Some(stats) = self.of_type(type_url) {
            stats.responses.fetch_add(1, Ordering::Relaxed);
            stats
                .resources_sent
                .fetch_add(resources as u64, Ordering::Relaxed);
        }
    }

    pub fn count_rejection(&self, type_url: &str) {
        if let Some(stats) = self.of_type(type_url) {
            stats.rejections.fetch_add(1, Ordering::Relaxed);
        }
    }
}
