//! A demo backend: answers every request with its own identity and, while it runs, is registered
//! in ZooKeeper as an ephemeral Curator x-discovery instance.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use serde_json::json;
use tokio::net::TcpListener;
use zookeeper_client::{Acls, Client, CreateMode};

#[derive(Debug, Parser)]
#[command(name = "zklb-demo-backend", about)]
struct Args {
    /// ZooKeeper connect string.
    #[arg(long, env = "ZKLB_ZOOKEEPER", default_value = "127.0.0.1:2181")]
    zookeeper: String,
    /// Registry root; the instance registers under `<root>/<service>/<id>`.
    #[arg(long, env = "ZKLB_ROOT", default_value = "/services")]
    root: String,
    #[arg(long)]
    service: String,
    /// Instance id; defaults to `<service>-<port>`.
    #[arg(long)]
    id: Option<String>,
    /// Address to listen on; port 0 picks a free one. The first line on stdout says which.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// HTTP status to answer with (503 makes a failing backend).
    #[arg(long, default_value_t = 200)]
    status: u16,
    /// On shutdown, how long to keep serving after deregistering, while load balancers catch up.
    #[arg(long, default_value_t = 500)]
    drain_ms: u64,
}

struct Backend {
    id: String,
    service: String,
    status: StatusCode,
    requests: AtomicU64,
    /// Requests that arrived carrying one of zklb's internal headers: always a bug.
    leaked_headers: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let status =
        StatusCode::from_u16(args.status).with_context(|| format!("--status {}", args.status))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", args.service, address.port()));
    println!("listening {address}");

    let zookeeper = Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(&args.zookeeper)
        .await
        .with_context(|| format!("cannot connect to ZooKeeper at {}", args.zookeeper))?;
    let znode = register(&zookeeper, &args, &id, address).await?;
    println!("registered {znode}");

    let backend = Arc::new(Backend {
        id,
        service: args.service.clone(),
        status,
        requests: AtomicU64::new(0),
        leaked_headers: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/_demo/stats", get(stats))
        .fallback(answer)
        .with_state(backend);
    let drain = Duration::from_millis(args.drain_ms);
    let deregistered = async move {
        shutdown_signal().await;
        // Deregister first, and keep serving while load balancers stop sending, so that stopping
        // fails no request.
        match zookeeper.delete(&znode, None).await {
            Ok(()) => tracing::info!(znode, "deregistered"),
            Err(error) => {
                tracing::warn!(znode, %error, "cannot deregister; the session's end will")
            }
        }
        tokio::time::sleep(drain).await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(deregistered)
        .await?;
    Ok(())
}

/// Creates `<root>/<service>/<id>` as an ephemeral Curator x-discovery instance.
async fn register(
    zookeeper: &Client,
    args: &Args,
    id: &str,
    address: SocketAddr,
) -> anyhow::Result<String> {
    let directory = format!("{}/{}", args.root.trim_end_matches('/'), args.service);
    zookeeper
        .mkdir(
            &directory,
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .with_context(|| format!("cannot create {directory}"))?;
    let registered = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let instance = json!({
        "name": args.service,
        "id": id,
        "address": address.ip().to_string(),
        "port": address.port(),
        "sslPort": null,
        "payload": null,
        "registrationTimeUTC": registered,
        "serviceType": "DYNAMIC",
        "uriSpec": {"parts": [
            {"value": "scheme", "variable": true},
            {"value": "://", "variable": false},
            {"value": "address", "variable": true},
            {"value": ":", "variable": false},
            {"value": "port", "variable": true}
        ]},
        "enabled": true
    });
    let znode = format!("{directory}/{id}");
    zookeeper
        .create(
            &znode,
            &serde_json::to_vec(&instance)?,
            &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
        )
        .await
        .with_context(|| format!("cannot create {znode}"))?;
    Ok(znode)
}

async fn answer(State(backend): State<Arc<Backend>>, request: Request) -> impl IntoResponse {
    backend.requests.fetch_add(1, Ordering::Relaxed);
    let zklb_headers: Vec<&str> = request
        .headers()
        .keys()
        .map(|name| name.as_str())
        .filter(|name| name.starts_with("x-zklb-"))
        .collect();
    if !zklb_headers.is_empty() {
        backend.leaked_headers.fetch_add(1, Ordering::Relaxed);
    }
    let body = json!({
        "backend": backend.id,
        "service": backend.service,
        "path": request.uri().path(),
        "zklb_headers": zklb_headers,
    });
    (backend.status, Json(body))
}

async fn stats(State(backend): State<Arc<Backend>>) -> impl IntoResponse {
    Json(json!({
        "backend": backend.id,
        "requests": backend.requests.load(Ordering::Relaxed),
        "leaked_headers": backend.leaked_headers.load(Ordering::Relaxed),
    }))
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
