//! zklb's control plane: watches ZooKeeper and publishes the registry.
//!
//! - [`ingest`] follows ZooKeeper, one watch per registry root, and is the only writer of
//!   [`snapshot`]s; it keeps a [`tree`] mirror of each root;
//! - [`formats`] finds services in a mirror and decodes their znodes, each registry dialect in
//!   its own module; [`registry`] keeps the services found, settles name conflicts, and
//!   versions what it publishes by zxid; [`resolve`] turns registered host names into addresses;
//! - [`api`] serves the lists (with long-poll), health and the API's OpenAPI description;
//!   [`xds`] gives Envoy one cluster per service over gRPC ADS, on the same listener; [`admin`]
//!   serves the [`status`] page, metrics and the one state-changing request, on that listener or
//!   an address of its own; [`secrets`] keeps secret metadata out of all of it.

pub mod admin;
pub mod api;
pub mod ingest;
pub mod registry;
pub mod resolve;
pub mod secrets;
pub mod snapshot;
pub mod status;
pub mod xds;

/// The decoders and the mirror live in their own crate, free of I/O, so that they can be fuzzed
/// without the rest of the control plane.
pub use zklb_formats as formats;
pub use zklb_formats::tree;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;

/// Everything the control plane is configured with, from flags or `ZKLB_*` variables.
#[derive(Debug, Clone, Parser)]
#[command(name = "zklb-control-plane", version, about, args_override_self = true)]
pub struct Config {
    /// Address the HTTP API and xDS listen on.
    #[arg(long, env = "ZKLB_LISTEN", default_value = "127.0.0.1:18000")]
    pub listen: String,
    /// A separate address for the status page, `/metrics` and `POST /v1/resync`, which are then
    /// not served on `--listen`. Without it, everything is served on `--listen`.
    #[arg(long, env = "ZKLB_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// File holding the bearer token that requests changing state (`POST /v1/resync`) must
    /// carry, at least 16 characters. Without it such requests are refused (403).
    #[arg(long, env = "ZKLB_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// ZooKeeper connect string.
    #[arg(long, env = "ZKLB_ZOOKEEPER", default_value = "127.0.0.1:2181")]
    pub zookeeper: String,
    #[command(flatten)]
    pub access: zklb_zk_access::AccessArgs,
    /// A registry root and its format, `<path>=<format>[:<endpoint>]`: `auto`, `curator`,
    /// `serverset` (`:<endpoint>` routes to that `additionalEndpoints` entry), `nerve`, `dubbo` or
    /// `apisix`. Repeat the flag (or separate with commas) for several roots.
    #[arg(
        long = "registry",
        env = "ZKLB_REGISTRIES",
        value_delimiter = ',',
        default_value = "/services=auto"
    )]
    pub registries: Vec<formats::RegistrySpec>,
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
    /// How the log is written: `text` (a line per event) or `json` (an object per line, for log
    /// collectors). Colour only when writing to a terminal.
    #[arg(long, env = "ZKLB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Instance metadata keys that are never served (in the lists, on the status page or to
    /// Envoy), as patterns where `*` is any run of characters, case ignored. Repeat the flag (or
    /// separate with commas); the default hides the usual names of passwords, tokens and keys.
    #[arg(
        long = "secret-metadata",
        env = "ZKLB_SECRET_METADATA",
        value_delimiter = ',',
        default_value = secrets::DEFAULT_PATTERNS
    )]
    pub secret_metadata: Vec<secrets::KeyPattern>,
    /// How often registered host names are resolved again, in seconds.
    #[arg(long, env = "ZKLB_DNS_REFRESH_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub dns_refresh_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What the files named in the configuration hold, read and checked.
pub struct Loaded {
    pub access: zklb_zk_access::Access,
    pub admin_token: admin::AdminToken,
}

/// Where the control plane is reached: the API and xDS, and the operator's routes if apart.
pub struct Listeners {
    pub api: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Config {
    /// What flags alone cannot check: roots that cannot be read side by side, and the files
    /// that say how to reach ZooKeeper and hold the admin token; what they hold when all is well.
    pub fn check(&self) -> Result<Loaded, String> {
        formats::check_roots(&self.registries)?;
        Ok(Loaded {
            access: zklb_zk_access::Access::load(&self.access)
                .map_err(|error| error.to_string())?,
            admin_token: admin::AdminToken::load(self.admin_token_file.as_deref())?,
        })
    }

    fn ingest_config(
        &self,
        access: zklb_zk_access::Access,
        resync: Arc<admin::Resync>,
    ) -> ingest::IngestConfig {
        ingest::IngestConfig {
            connect: self.zookeeper.clone(),
            access,
            registries: self.registries.clone(),
            session_timeout: Duration::from_millis(self.session_timeout_ms),
            drop_protection: f64::from(self.drop_protection_percent) / 100.0,
            dns_refresh: Duration::from_secs(self.dns_refresh_seconds),
            secrets: secrets::SecretKeys(self.secret_metadata.clone()),
            resync,
        }
    }
}

/// Serves on `listeners` until `shutdown` completes, then releases held polls, ends the ADS
/// streams and closes the ZooKeeper session.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Loaded {
        access,
        admin_token,
    } = config.check().map_err(anyhow::Error::msg)?;
    let cluster_settings = match &config.cluster_settings {
        Some(path) => xds::settings::ClusterSettingsTable::load(path)?,
        None => xds::settings::ClusterSettingsTable::default(),
    };
    let (publishers, channels) = snapshot::channels();
    let resync = Arc::new(admin::Resync::default());
    let watcher = tokio::spawn(ingest::ingest(
        config.ingest_config(access, Arc::clone(&resync)),
        publishers,
    ));
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
        resync,
    };
    let ads = xds::server::AdsService {
        resources,
        stats: xds_stats,
        stopping: stopping.clone(),
    };
    let (app, admin_app) = match listeners.admin {
        None => (api::router(state, admin_token), None),
        Some(admin_listener) => {
            let admin_app = api::with_fallback(admin::routes(state.clone(), admin_token));
            tracing::info!(address = %admin_listener.local_addr()?, "admin routes listening");
            let mut stopped = stopping;
            let admin_served =
                axum::serve(admin_listener, admin_app).with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|stopped| *stopped).await;
                });
            (
                api::with_fallback(api::data_routes(state)),
                Some(tokio::spawn(std::future::IntoFuture::into_future(
                    admin_served,
                ))),
            )
        }
    };
    let app = app.route_service(&ads_path(), ads.into_server());
    tracing::info!(address = %listeners.api.local_addr()?, "control plane listening");
    let served = axum::serve(listeners.api, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.send_replace(true);
        })
        .await;
    if let Some(admin_app) = admin_app {
        admin_app.await??;
    }
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
