//! zklb's control plane: watches ZooKeeper and publishes the registry.
//!
//! - [`watch`] follows ZooKeeper and is the only writer of [`snapshot`]s;
//! - [`decode`] turns znodes into normalized instances and [`registry`] versions them by zxid;
//! - [`api`] serves the lists (with long-poll), health and metrics; [`xds`] gives Envoy one
//!   cluster per service.

pub mod api;
pub mod decode;
pub mod registry;
pub mod snapshot;
pub mod watch;
pub mod xds;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;

/// Everything the control plane is configured with, from flags or `ZKLB_*` variables.
#[derive(Debug, Clone, Parser)]
#[command(name = "zklb-control-plane", version, about)]
pub struct Config {
    /// Address the HTTP API and xDS listen on.
    #[arg(long, env = "ZKLB_LISTEN", default_value = "127.0.0.1:18000")]
    pub listen: String,
    /// ZooKeeper connect string.
    #[arg(long, env = "ZKLB_ZOOKEEPER", default_value = "127.0.0.1:2181")]
    pub zookeeper: String,
    /// The znode whose children are services and grandchildren instances.
    #[arg(long, env = "ZKLB_ROOT", default_value = "/services", value_parser = parse_root)]
    pub root: String,
    /// ZooKeeper session timeout, in milliseconds.
    #[arg(long, env = "ZKLB_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// Name of Envoy's cluster that reaches this control plane; generated clusters fetch their
    /// members through it.
    #[arg(long, env = "ZKLB_XDS_CLUSTER", default_value = "zklb_control_plane")]
    pub xds_cluster: String,
    /// Longest time a long-poll (lists or xDS) is held open, in seconds. At most 30: it must stay
    /// below the `request_timeout` of Envoy's cluster-list subscription (40 s in envoy.yaml).
    #[arg(long, env = "ZKLB_MAX_HOLD_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=30))]
    pub max_hold_seconds: u64,
}

fn parse_root(root: &str) -> Result<String, String> {
    let valid =
        root.starts_with('/') && (root == "/" || !root.ends_with('/')) && !root.contains("//");
    if valid {
        Ok(root.to_string())
    } else {
        Err(format!(
            "{root:?} is not a ZooKeeper path such as /services"
        ))
    }
}

impl Config {
    fn watch_config(&self) -> watch::WatchConfig {
        watch::WatchConfig {
            connect: self.zookeeper.clone(),
            root: self.root.clone(),
            session_timeout: Duration::from_millis(self.session_timeout_ms),
        }
    }
}

/// Serves on `listener` until `shutdown` completes, then releases held polls and closes the
/// ZooKeeper session.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (publishers, channels) = snapshot::channels();
    let watcher = tokio::spawn(watch::watch_registry(config.watch_config(), publishers));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let max_hold = Duration::from_secs(config.max_hold_seconds);
    let state = api::AppState {
        channels,
        xds: Arc::new(xds::XdsSettings {
            control_plane_cluster: config.xds_cluster.clone(),
            request_timeout: max_hold + Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
        }),
        max_hold,
        stopping,
    };
    tracing::info!(address = %listener.local_addr()?, "control plane listening");
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.send_replace(true);
        })
        .await;
    watcher.abort();
    served?;
    Ok(())
}
