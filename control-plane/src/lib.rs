//! zklb's control plane: watches ZooKeeper and publishes the registry.
//!
//! - [`watch`] follows ZooKeeper and is the only writer of [`snapshot`]s;
//! - [`decode`] turns znodes into normalized instances and [`registry`] versions them by zxid;
//! - [`api`] serves the lists (with long-poll), health and metrics; [`xds`] gives Envoy one
//!   cluster per service over gRPC ADS, on the same listener.

pub mod api;
pub mod decode;
pub mod registry;
pub mod snapshot;
pub mod watch;
pub mod xds;

use std::future::Future;
use std::path::PathBuf;
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
    /// Longest time a list long-poll is held open, in seconds.
    #[arg(long, env = "ZKLB_MAX_HOLD_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub max_hold_seconds: u64,
    /// How long the registry may lag ZooKeeper (while ZooKeeper is unreachable) before
    /// `/readyz` answers 503, in seconds. The lists keep being served meanwhile.
    #[arg(long, env = "ZKLB_MAX_STALE_SECONDS", default_value_t = 120)]
    pub max_stale_seconds: u64,
    /// Right after (re)connecting to ZooKeeper, a registry that lost at least this percentage
    /// of all instances is held back (the last one is served, marked stale) for twice the
    /// session timeout, and published only if the loss lasts. 0 turns this off.
    #[arg(long, env = "ZKLB_DROP_PROTECTION_PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub drop_protection_percent: u8,
    /// JSON file with the settings of the generated Envoy clusters: `{"defaults": {...},
    /// "services": {"<name>": {...}}}` (see the README). Built-in defaults without it.
    #[arg(long, env = "ZKLB_CLUSTER_SETTINGS")]
    pub cluster_settings: Option<PathBuf>,
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
            drop_protection: f64::from(self.drop_protection_percent) / 100.0,
        }
    }
}

/// Serves on `listener` until `shutdown` completes, then releases held polls, ends the ADS
/// streams and closes the ZooKeeper session.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster_settings = match &config.cluster_settings {
        Some(path) => xds::settings::ClusterSettingsTable::load(path)?,
        None => xds::settings::ClusterSettingsTable::default(),
    };
    let (publishers, channels) = snapshot::channels();
    let watcher = tokio::spawn(watch::watch_registry(config.watch_config(), publishers));
    let (resources_tx, resources) = tokio::sync::watch::channel(Arc::default());
    let builder = tokio::spawn(xds::follow_snapshots(
        channels.snapshots.clone(),
        cluster_settings,
        resources_tx,
    ));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let xds_stats = Arc::new(xds::XdsStats::default());
    let state = api::AppState {
        channels,
        xds: Arc::clone(&xds_stats),
        max_hold: Duration::from_secs(config.max_hold_seconds),
        max_stale: Duration::from_secs(config.max_stale_seconds),
        stopping: stopping.clone(),
    };
    let ads = xds::server::AdsService {
        resources,
        stats: xds_stats,
        stopping,
    };
    let app = api::router(state).route_service(&ads_path(), ads.into_server());
    tracing::info!(address = %listener.local_addr()?, "control plane listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.send_replace(true);
        })
        .await;
    watcher.abort();
    builder.abort();
    served?;
    Ok(())
}

/// The gRPC path of every ADS method, routed to the ADS service beside the HTTP API.
fn ads_path() -> String {
    use tonic::server::NamedService;
    format!("/{}/{{*method}}", xds::server::AdsServer::NAME)
}
