//! A demo backend: answers every request with its own identity. It only serves HTTP; zklb-agent
//! registers it in ZooKeeper and checks its health endpoint, whose answer can be changed at run
//! time to take it out of rotation and back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "zklb-demo-backend", about)]
struct Args {
    /// The service it says it belongs to.
    #[arg(long)]
    service: String,
    /// The identity it answers with.
    #[arg(long)]
    id: String,
    /// Address to listen on; port 0 picks a free one. The first line on stdout says which.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// HTTP status to answer requests with (503 makes a failing backend).
    #[arg(long, default_value_t = 200)]
    status: u16,
}

struct Backend {
    id: String,
    service: String,
    status: StatusCode,
    /// What `GET /_demo/health` answers; `PUT /_demo/health` changes it.
    health: AtomicU16,
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
    println!("listening {}", listener.local_addr()?);
    let backend = Arc::new(Backend {
        id: args.id,
        service: args.service,
        status,
        health: AtomicU16::new(StatusCode::OK.as_u16()),
        requests: AtomicU64::new(0),
        leaked_headers: AtomicU64::new(0),
    });
    // In-flight requests finish on SIGTERM; the agent has drained the backend before.
    axum::serve(listener, router(backend))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

fn router(backend: Arc<Backend>) -> Router {
    Router::new()
        .route("/_demo/stats", get(stats))
        .route("/_demo/health", get(health).put(set_health))
        .fallback(answer)
        .with_state(backend)
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

async fn health(State(backend): State<Arc<Backend>>) -> Response {
    let status = backend.health.load(Ordering::Relaxed);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(json!({"backend": backend.id, "status": status.as_u16()})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct HealthChange {
    status: u16,
}

/// `{"status": 503}` makes the health endpoint answer 503 from now on.
async fn set_health(State(backend): State<Arc<Backend>>, body: axum::body::Bytes) -> Response {
    let status = serde_json::from_slice::<HealthChange>(&body)
        .ok()
        .and_then(|change| StatusCode::from_u16(change.status).ok());
    match status {
        Some(status) => {
            backend.health.store(status.as_u16(), Ordering::Relaxed);
            Json(json!({"backend": backend.id, "status": status.as_u16()})).into_response()
        }
        None => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "expected {\"status\": <HTTP status>}"})),
        )
            .into_response(),
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn backend() -> Arc<Backend> {
        Arc::new(Backend {
            id: "b1".to_string(),
            service: "echo".to_string(),
            status: StatusCode::OK,
            health: AtomicU16::new(200),
            requests: AtomicU64::new(0),
            leaked_headers: AtomicU64::new(0),
        })
    }

    async fn send(backend: &Arc<Backend>, request: axum::http::Request<Body>) -> StatusCode {
        router(Arc::clone(backend))
            .oneshot(request)
            .await
            .expect("response")
            .status()
    }

    fn get(path: &str) -> axum::http::Request<Body> {
        axum::http::Request::get(path)
            .body(Body::empty())
            .expect("request")
    }

    fn put_health(body: &'static str) -> axum::http::Request<Body> {
        axum::http::Request::put("/_demo/health")
            .body(Body::from(body))
            .expect("request")
    }

    #[tokio::test]
    async fn the_health_endpoint_answers_what_it_was_told() {
        let backend = backend();
        assert_eq!(send(&backend, get("/_demo/health")).await, StatusCode::OK);
        assert_eq!(
            send(&backend, put_health(r#"{"status": 503}"#)).await,
            StatusCode::OK
        );
        assert_eq!(
            send(&backend, get("/_demo/health")).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Requests are still answered: only the health endpoint changed.
        assert_eq!(send(&backend, get("/hello")).await, StatusCode::OK);
        assert_eq!(
            send(&backend, put_health(r#"{"status": "bad"}"#)).await,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            send(&backend, get("/_demo/health")).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
