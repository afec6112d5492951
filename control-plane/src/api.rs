//! The HTTP API: service lists with versions and long-poll, health, metrics; xDS is mounted
//! alongside from [`crate::xds`].

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use zklb_wire::{ErrorBody, Version};

use crate::snapshot::{Channels, Snapshot};
use crate::xds::{self, XdsSettings};

#[derive(Clone)]
pub struct AppState {
    pub channels: Channels,
    pub xds: Arc<XdsSettings>,
    /// Longest time a long-poll is held open.
    pub max_hold: Duration,
    /// Turns true when the server shuts down, releasing held polls.
    pub stopping: watch::Receiver<bool>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service))
        .route("/healthz", get(get_health))
        .route("/metrics", get(get_metrics))
        .route("/v3/discovery:clusters", post(xds::discover_clusters))
        .route("/v3/discovery:endpoints", post(xds::discover_endpoints))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(state)
}

/// Every error the API answers: JSON `{"error": reason}` with a 4xx status.
#[derive(Debug)]
pub enum ApiError {
    NotFound(String),
    BadRequest(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            ApiError::NotFound(reason) => (StatusCode::NOT_FOUND, reason),
            ApiError::BadRequest(reason) => (StatusCode::BAD_REQUEST, reason),
        };
        (status, Json(ErrorBody { error })).into_response()
    }
}

/// `?after=<version>&wait=<seconds>`: answer once the registry is newer than `after`, or with
/// 304 Not Modified after `wait` seconds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollQuery {
    after: Option<Version>,
    wait: Option<u64>,
}

impl AppState {
    /// The current snapshot once `ready` holds for it, or `None` if `wait` passes (or the server
    /// stops) first.
    pub async fn snapshot_when(
        &self,
        wait: Duration,
        ready: impl Fn(&Snapshot) -> bool,
    ) -> Option<Arc<Snapshot>> {
        let mut snapshots = self.channels.snapshots.clone();
        let mut stopping = self.stopping.clone();
        let wait = wait.min(self.max_hold);
        tokio::select! {
            found = tokio::time::timeout(wait, snapshots.wait_for(|snapshot| ready(snapshot))) => {
                found.ok()?.ok().map(|snapshot| Arc::clone(&snapshot))
            }
            _ = stopping.wait_for(|stopping| *stopping) => None,
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.channels.snapshots.borrow())
    }
}

async fn list_services(
    State(state): State<AppState>,
    query: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let Some(after) = query.after else {
        return Ok(Json(&state.snapshot().services).into_response());
    };
    let wait = Duration::from_secs(query.wait.unwrap_or(state.max_hold.as_secs()));
    let newer = state.snapshot_when(wait, |snapshot| snapshot.services.version > after);
    Ok(respond_or_not_modified(newer, |snapshot| Json(&snapshot.services).into_response()).await)
}

pub async fn respond_or_not_modified(
    snapshot: impl Future<Output = Option<Arc<Snapshot>>>,
    respond: impl FnOnce(&Snapshot) -> Response,
) -> Response {
    match snapshot.await {
        Some(snapshot) => respond(&snapshot),
        None => StatusCode::NOT_MODIFIED.into_response(),
    }
}

async fn get_service(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let snapshot = state.snapshot();
    let service =
        snapshot.services.services.get(&name).ok_or_else(|| {
            ApiError::NotFound(format!("no service named {name:?} is registered"))
        })?;
    Ok(Json(service).into_response())
}

async fn get_health(State(state): State<AppState>) -> Response {
    let health = *state.channels.health.borrow();
    let snapshot = state.snapshot();
    let status = match (health.synced, health.connected) {
        (false, _) => "starting",
        (true, true) => "serving",
        (true, false) => "stale",
    };
    let body = json!({
        "status": status,
        "zookeeper": if health.connected { "connected" } else { "disconnected" },
        "version": snapshot.services.version,
        "services": snapshot.services.services.len(),
        "stale_seconds": health.stale_seconds(),
    });
    // Never synced: nothing worth serving yet. Stale: still serving the last good list.
    let code = if health.synced {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn get_metrics(State(state): State<AppState>) -> Response {
    let health = *state.channels.health.borrow();
    let snapshot = state.snapshot();
    let instances: usize = snapshot
        .services
        .services
        .values()
        .map(|s| s.instances.len())
        .sum();
    let skipped = state.channels.stats.skipped_znodes.load(Ordering::Relaxed);
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "zklb_registry_version",
        "gauge",
        "zxid of the last change in the published registry.",
        snapshot.services.version.to_string(),
    );
    metric(
        "zklb_services",
        "gauge",
        "Services in the published registry.",
        snapshot.services.services.len().to_string(),
    );
    metric(
        "zklb_instances",
        "gauge",
        "Instances in the published registry.",
        instances.to_string(),
    );
    metric(
        "zklb_zookeeper_connected",
        "gauge",
        "1 while the ZooKeeper session is connected.",
        u8::from(health.connected).to_string(),
    );
    metric(
        "zklb_stale_seconds",
        "gauge",
        "Seconds the registry may have lagged ZooKeeper (0 while connected).",
        health.stale_seconds().to_string(),
    );
    metric(
        "zklb_malformed_znodes_total",
        "counter",
        "Instance znodes skipped because they could not be decoded.",
        skipped.to_string(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
