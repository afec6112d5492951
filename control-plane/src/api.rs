//! The HTTP API: service lists with versions and long-poll, liveness, readiness and metrics.
//! (Envoy's membership is served over gRPC by [`crate::xds`], on the same listener.)

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::watch;
use zklb_wire::{ErrorBody, Freshness, ServiceChanges, Version};

use crate::snapshot::{Channels, Health, Snapshot};
use crate::xds::{TypeStats, XdsStats};

#[derive(Clone)]
pub struct AppState {
    pub channels: Channels,
    pub xds: Arc<XdsStats>,
    /// Longest time a long-poll is held open.
    pub max_hold: Duration,
    /// How long the registry may lag ZooKeeper before the control plane stops being ready.
    pub max_stale: Duration,
    /// Turns true when the server shuts down, releasing held polls.
    pub stopping: watch::Receiver<bool>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/changes", get(list_changes))
        .route("/v1/services/{name}", get(get_service))
        .route("/healthz", get(get_health))
        .route("/readyz", get(get_readiness))
        .route("/metrics", get(get_metrics))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(state)
}

/// Every error the API answers: JSON `{"error": reason}` with a 4xx status.
#[derive(Debug)]
pub enum ApiError {
    NotFound(String),
    BadRequest(String),
    /// ZooKeeper has not been read yet.
    NotReady,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            ApiError::NotFound(reason) => (StatusCode::NOT_FOUND, reason),
            ApiError::BadRequest(reason) => (StatusCode::BAD_REQUEST, reason),
            ApiError::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the control plane has not read ZooKeeper yet".to_string(),
            ),
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
    /// The Envoy node whose filter asks: the answer waits (briefly) until that Envoy has taken
    /// the clusters and members of the list, so the filter never routes ahead of it.
    node: Option<String>,
}

/// Longest wait for an Envoy to acknowledge a list before its filter gets the list anyway.
const ACK_WAIT: Duration = Duration::from_secs(2);

impl AppState {
    /// The current snapshot once it reflects ZooKeeper and `ready` holds for it, or `None` if
    /// `wait` passes (or the server stops) first.
    pub async fn snapshot_when(
        &self,
        wait: Duration,
        ready: impl Fn(&Snapshot) -> bool,
    ) -> Option<Arc<Snapshot>> {
        let mut snapshots = self.channels.snapshots.clone();
        let mut stopping = self.stopping.clone();
        let wait = wait.min(self.max_hold);
        tokio::select! {
            found = tokio::time::timeout(wait, snapshots.wait_for(|snapshot| snapshot.synced && ready(snapshot))) => {
                found.ok()?.ok().map(|snapshot| Arc::clone(&snapshot))
            }
            _ = stopping.wait_for(|stopping| *stopping) => None,
        }
    }

    pub fn health(&self) -> Health {
        self.channels.health.borrow().clone()
    }

    pub fn freshness(&self) -> Freshness {
        self.health().freshness()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.channels.snapshots.borrow())
    }

    /// The current snapshot, if ZooKeeper has been read.
    pub fn synced_snapshot(&self) -> Result<Arc<Snapshot>, ApiError> {
        let snapshot = self.snapshot();
        if snapshot.synced {
            Ok(snapshot)
        } else {
            Err(ApiError::NotReady)
        }
    }
}

async fn list_services(
    State(state): State<AppState>,
    query: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    poll(&state, query, |snapshot, freshness, _| {
        Json(WholeList {
            version: snapshot.services.version,
            full: None,
            services: snapshot.services_json(),
            freshness,
            conflicts: &snapshot.conflicts,
        })
        .into_response()
    })
    .await
}

/// Like [`list_services`], with only what changed since `after`: what the filter follows.
async fn list_changes(
    State(state): State<AppState>,
    query: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    poll(&state, query, |snapshot, freshness, after| {
        match after.and_then(|after| snapshot.changes_since(after)) {
            Some(changes) => Json(ServiceChanges {
                freshness,
                ..changes
            })
            .into_response(),
            None => Json(WholeList {
                version: snapshot.services.version,
                full: Some(true),
                services: snapshot.services_json(),
                freshness,
                conflicts: &snapshot.conflicts,
            })
            .into_response(),
        }
    })
    .await
}

/// The whole registry as a [`ServiceList`], or a [`ServiceChanges`] with `full`, whose services
/// were serialized once for the snapshot rather than once per request.
#[derive(Serialize)]
struct WholeList<'a> {
    version: Version,
    #[serde(skip_serializing_if = "Option::is_none")]
    full: Option<bool>,
    services: &'a RawValue,
    #[serde(flatten)]
    freshness: Freshness,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    conflicts: &'a BTreeMap<String, String>,
}

/// Answers with `respond` at once without `after`, or once the registry is newer than `after`
/// (304 after `wait`); in both cases only once the asking filter's Envoy has taken that registry.
async fn poll(
    state: &AppState,
    query: Result<Query<PollQuery>, QueryRejection>,
    respond: impl FnOnce(&Snapshot, Freshness, Option<Version>) -> Response,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let answer = |snapshot: &Snapshot| {
        let freshness = state.freshness();
        with_freshness(
            &freshness.clone(),
            respond(snapshot, freshness, query.after),
        )
    };
    let acknowledged = |snapshot: Arc<Snapshot>| async {
        if let Some(node) = &query.node {
            let version = snapshot.services.version;
            state.xds.acks.wait_for(node, version, ACK_WAIT).await;
        }
        snapshot
    };
    let Some(after) = query.after else {
        let snapshot = acknowledged(state.synced_snapshot()?).await;
        return Ok(answer(&snapshot));
    };
    let wait = Duration::from_secs(query.wait.unwrap_or(state.max_hold.as_secs()));
    let newer = async {
        let snapshot = state
            .snapshot_when(wait, |snapshot| snapshot.services.version > after)
            .await?;
        Some(acknowledged(snapshot).await)
    };
    Ok(respond_or_not_modified(newer, answer).await)
}

/// Adds the freshness headers, so that a consumer that reads only headers sees it too.
fn with_freshness(freshness: &Freshness, mut response: Response) -> Response {
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set(zklb_wire::STALE_HEADER, freshness.stale.to_string());
    if let Some(last_sync) = freshness.last_sync {
        set(zklb_wire::LAST_SYNC_HEADER, last_sync.to_string());
    }
    set(zklb_wire::SESSION_HEADER, freshness.session.clone());
    response
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
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let snapshot = state.synced_snapshot()?;
    let service =
        snapshot.services.services.get(&name).ok_or_else(|| {
            ApiError::NotFound(format!("no service named {name:?} is registered"))
        })?;
    Ok(with_freshness(
        &state.freshness(),
        Json(service).into_response(),
    ))
}

/// Liveness: the process answers. The body says how the registry is doing.
async fn get_health(State(state): State<AppState>) -> Response {
    let health = state.health();
    let snapshot = state.snapshot();
    let status = match (health.synced, health.stale_since.is_some()) {
        (false, _) => "starting",
        (true, false) => "serving",
        (true, true) => "stale",
    };
    let body = json!({
        "status": status,
        "zookeeper": health.session(),
        "version": snapshot.services.version,
        "services": snapshot.services.services.len(),
        "stale_seconds": health.stale_seconds(),
        "problem": health.problem,
    });
    Json(body).into_response()
}

/// Why the control plane is not ready, if it is not: it has read ZooKeeper, can read the
/// registry, and its registry lags ZooKeeper by no more than `max_stale`.
fn unreadiness(health: &Health, max_stale: Duration) -> Option<String> {
    if let Some(problem) = &health.problem {
        return Some(problem.clone());
    }
    if !health.synced {
        return Some("the control plane has not read ZooKeeper yet".into());
    }
    let stale = health.stale_seconds();
    (stale > max_stale.as_secs_f64()).then(|| {
        format!(
            "ZooKeeper has been unreachable for {stale:.0} s (more than {} s); serving the last registry read",
            max_stale.as_secs()
        )
    })
}

/// Readiness: 200 while the lists follow ZooKeeper closely enough, 503 with the reason otherwise.
async fn get_readiness(State(state): State<AppState>) -> Response {
    match unreadiness(&state.health(), state.max_stale) {
        None => Json(json!({"ready": true})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

async fn get_metrics(State(state): State<AppState>) -> Response {
    let health = state.health();
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
        "Instance znodes skipped because they could not be decoded (each version once).",
        skipped.to_string(),
    );
    metric(
        "zklb_rejected_service_names_total",
        "counter",
        "Children of the root skipped because they cannot name a service (each once per session).",
        state
            .channels
            .stats
            .rejected_names
            .load(Ordering::Relaxed)
            .to_string(),
    );
    metric(
        "zklb_service_conflicts",
        "gauge",
        "Services not routed because their names differ only in case from an older one's.",
        snapshot.conflicts.len().to_string(),
    );
    metric(
        "zklb_ready",
        "gauge",
        "1 while /readyz answers 200.",
        u8::from(unreadiness(&health, state.max_stale).is_none()).to_string(),
    );
    metric(
        "zklb_xds_streams",
        "gauge",
        "Open ADS streams (one per Envoy).",
        state.xds.streams.load(Ordering::Relaxed).to_string(),
    );
    let per_type = |stat: fn(&TypeStats) -> u64| {
        format!(
            "{{type=\"cluster\"}} {}\n{{type=\"endpoints\"}} {}",
            stat(&state.xds.clusters),
            stat(&state.xds.endpoints)
        )
    };
    let labelled = [
        (
            "zklb_xds_responses_total",
            "ADS responses sent, by resource type.",
            per_type(|stats| stats.responses.load(Ordering::Relaxed)),
        ),
        (
            "zklb_xds_resources_sent_total",
            "Resources sent (added or changed) over every ADS stream, by type.",
            per_type(|stats| stats.resources_sent.load(Ordering::Relaxed)),
        ),
        (
            "zklb_xds_rejections_total",
            "ADS responses that Envoy rejected (NACK), by type.",
            per_type(|stats| stats.rejections.load(Ordering::Relaxed)),
        ),
    ];
    for (name, help, values) in labelled {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for line in values.lines() {
            text.push_str(&format!("{name}{line}\n"));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::collections::BTreeMap;
    use tower::ServiceExt;
    use zklb_wire::{Instance, Service, ServiceSet, SourceFormat};

    use crate::snapshot::{channels, Health, Publishers};

    fn app() -> (Router, Publishers, watch::Sender<bool>) {
        let (publishers, channels) = channels();
        let (stop, stopping) = watch::channel(false);
        let state = AppState {
            channels,
            xds: Arc::new(XdsStats::default()),
            max_hold: Duration::from_secs(30),
            max_stale: Duration::from_secs(60),
            stopping,
        };
        (router(state), publishers, stop)
    }

    fn snapshot(version: Version, ports: &[u16]) -> Arc<Snapshot> {
        let instances = ports
            .iter()
            .map(|&port| Instance::new(port.to_string(), "127.0.0.1", port, SourceFormat::Curator))
            .collect();
        let service = Service {
            name: "echo".into(),
            version,
            instances,
        };
        Arc::new(Snapshot::default().succeeded_by(ServiceSet {
            version,
            services: BTreeMap::from([("echo".to_string(), service)]),
        }))
    }

    async fn get(app: &Router, uri: &str) -> (StatusCode, serde_json::Value) {
        let response = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    #[tokio::test]
    async fn services_are_listed_with_their_version() {
        let (app, publishers, _stop) = app();
        publishers
            .snapshots
            .send_replace(snapshot(7, &[8001, 8002]));
        let (status, body) = get(&app, "/v1/services").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["version"], 7);
        assert_eq!(
            body["services"]["echo"]["instances"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        let (status, body) = get(&app, "/v1/services/echo").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["name"], "echo");
    }

    #[tokio::test]
    async fn errors_are_json_with_a_reason() {
        let (app, publishers, _stop) = app();
        publishers.snapshots.send_replace(snapshot(7, &[8001]));
        let (status, body) = get(&app, "/v1/services/nosuch").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no service named \"nosuch\" is registered");
        let (status, body) = get(&app, "/v1/services?after=yesterday").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"].as_str().unwrap_or_default().contains("after"),
            "{body}"
        );
        let (status, body) = get(&app, "/v1/services?colour=blue").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("colour"),
            "{body}"
        );
        let (status, body) = get(&app, "/nowhere").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no such endpoint");
    }

    /// Hostile or broken requests get a JSON 4xx with a reason, never a 5xx.
    #[tokio::test(start_paused = true)]
    async fn hostile_requests_get_a_json_4xx() {
        let (app, publishers, _stop) = app();
        publishers.snapshots.send_replace(snapshot(7, &[8001]));
        let long_name = "a".repeat(10_000);
        for path in [
            "/v1/services/..%2F..%2Fetc%2Fpasswd",
            "/v1/services/%00",
            "/v1/services/%FF%FE",
            &format!("/v1/services/{long_name}"),
            "/v1/services?after=-1&wait=abc",
            "/v1/services?after=99999999999999999999999",
            "/v1/changes?wait=-5",
            "/v1/changes?after=1&after=2",
            "/v1/nothing/../services",
        ] {
            let (status, body) = get(&app, path).await;
            assert!(status.is_client_error(), "{path}: {status}");
            assert!(body["error"].is_string(), "{path}: {body}");
        }
        // An absurd wait is capped by the hold, not refused: the poll ends.
        let (status, _) = get(&app, "/v1/services?after=7&wait=18446744073709551615").await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_is_held_until_the_next_version() {
        let (app, publishers, _stop) = app();
        publishers.snapshots.send_replace(snapshot(7, &[8001]));
        let poll = tokio::spawn({
            let app = app.clone();
            async move { get(&app, "/v1/services?after=7&wait=20").await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!poll.is_finished(), "answered before anything changed");
        publishers
            .snapshots
            .send_replace(snapshot(9, &[8001, 8002]));
        let (status, body) = poll.await.expect("poll task");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["version"], 9);
    }

    /// Before ZooKeeper is read the control plane knows nothing: an empty list would make Envoy
    /// and the filter drop every service, so nothing is answered as if it were the registry.
    #[tokio::test(start_paused = true)]
    async fn nothing_is_published_before_zookeeper_is_read() {
        let (app, _publishers, _stop) = app();
        let (status, body) = get(&app, "/v1/services").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body["error"],
            "the control plane has not read ZooKeeper yet"
        );
        let (status, _) = get(&app, "/v1/services/echo").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _) = get(&app, "/v1/services?after=0&wait=5").await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
    }

    #[tokio::test(start_paused = true)]
    async fn a_filter_gets_a_list_once_its_envoy_has_taken_it() {
        let (publishers, channels) = channels();
        let (_stop, stopping) = watch::channel(false);
        let xds = Arc::new(XdsStats::default());
        let app = router(AppState {
            channels,
            xds: Arc::clone(&xds),
            max_hold: Duration::from_secs(30),
            max_stale: Duration::from_secs(60),
            stopping,
        });
        publishers.snapshots.send_replace(snapshot(5, &[8001]));
        xds.acks.record("envoy-1", 0, 5);
        publishers
            .snapshots
            .send_replace(snapshot(7, &[8001, 8002]));
        let poll = tokio::spawn({
            let app = app.clone();
            async move { get(&app, "/v1/services?after=5&wait=20&node=envoy-1").await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!poll.is_finished(), "answered before Envoy took version 7");
        xds.acks.record("envoy-1", 0, 7);
        let (status, body) = poll.await.expect("poll task");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["version"], 7);

        // An Envoy that streams from another replica is not waited for.
        let (status, _) = get(&app, "/v1/services?after=5&wait=20&node=elsewhere").await;
        assert_eq!(status, StatusCode::OK);
        // Nor is one that does not acknowledge in time.
        xds.acks.record("stuck", 1, 3);
        let (status, body) = get(&app, "/v1/services?after=5&wait=20&node=stuck").await;
        assert_eq!(
            (status, body["version"].as_i64()),
            (StatusCode::OK, Some(7))
        );
    }

    /// The whole lists are written from JSON serialized once per snapshot: they must still be
    /// exactly the wire types that clients parse.
    #[tokio::test]
    async fn whole_lists_parse_as_the_wire_types() {
        let (app, publishers, _stop) = app();
        let current = snapshot(7, &[8001, 8002]);
        publishers.snapshots.send_replace(Arc::clone(&current));
        publishers.health.send_modify(Health::read_now);
        let (_, body) = get(&app, "/v1/services").await;
        let list: zklb_wire::ServiceList = serde_json::from_value(body).expect("a ServiceList");
        assert_eq!(list.set, current.services);
        assert_eq!(list.freshness.session, "connected");
        let (_, body) = get(&app, "/v1/changes").await;
        let changes: ServiceChanges = serde_json::from_value(body).expect("a ServiceChanges");
        assert!(changes.full);
        assert_eq!(changes.services, current.services.services);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_carry_only_what_moved_since_the_version_held() {
        let (app, publishers, _stop) = app();
        let first = snapshot(7, &[8001]);
        publishers.snapshots.send_replace(Arc::clone(&first));
        let (status, body) = get(&app, "/v1/changes").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (body["full"].as_bool(), body["version"].as_i64()),
            (Some(true), Some(7))
        );
        assert!(body["services"]["echo"].is_object());

        let mut services = snapshot(9, &[8001, 8002]).services.clone();
        let other = Service {
            name: "other".into(),
            version: 3,
            instances: vec![],
        };
        services.services.insert("other".into(), other);
        publishers
            .snapshots
            .send_replace(Arc::new(first.succeeded_by(services)));
        let (status, body) = get(&app, "/v1/changes?after=7&wait=5").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["full"], false);
        assert_eq!(body["version"], 9);
        let changed: Vec<&String> = body["services"]
            .as_object()
            .expect("services")
            .keys()
            .collect();
        assert_eq!(changed, ["echo"], "other did not move since 7");
        let (status, _) = get(&app, "/v1/changes?after=9&wait=5").await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        let (_, body) = get(&app, "/v1/changes?after=2&wait=5").await;
        assert_eq!(
            body["full"], true,
            "2 is older than this process's first registry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_without_change_ends_not_modified() {
        let (app, publishers, _stop) = app();
        publishers.snapshots.send_replace(snapshot(7, &[8001]));
        let (status, _) = get(&app, "/v1/services?after=7&wait=5").await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        // A client ahead of this replica is held too, rather than sent back in time.
        let (status, _) = get(&app, "/v1/services?after=8&wait=5").await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        let (status, body) = get(&app, "/v1/services?after=6&wait=5").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["version"], 7);
    }

    #[tokio::test]
    async fn shutting_down_releases_held_polls() {
        let (app, publishers, stop) = app();
        publishers.snapshots.send_replace(snapshot(7, &[8001]));
        let poll = tokio::spawn({
            let app = app.clone();
            async move { get(&app, "/v1/services?after=7&wait=30").await }
        });
        tokio::task::yield_now().await;
        stop.send_replace(true);
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), poll)
            .await
            .expect("released at shutdown")
            .expect("poll task");
        assert_eq!(status, StatusCode::NOT_MODIFIED);
    }

    #[tokio::test]
    async fn health_reports_starting_serving_and_stale() {
        let (app, publishers, _stop) = app();
        let (status, body) = get(&app, "/healthz").await;
        assert_eq!(
            status,
            StatusCode::OK,
            "liveness does not depend on ZooKeeper"
        );
        assert_eq!(body["status"], "starting");
        publishers.health.send_modify(Health::read_now);
        let (_, body) = get(&app, "/healthz").await;
        assert_eq!(body["status"], "serving");
        publishers.health.send_modify(Health::lost);
        let (status, body) = get(&app, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "stale");
        assert_eq!(body["zookeeper"], "disconnected");
    }

    #[tokio::test]
    async fn readiness_needs_a_readable_registry_and_says_why_not() {
        let (app, publishers, _stop) = app();
        let (status, body) = get(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body["reason"],
            "the control plane has not read ZooKeeper yet"
        );
        publishers.health.send_modify(Health::read_now);
        let (status, body) = get(&app, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["ready"], true);
        publishers
            .health
            .send_modify(|health| health.unreadable("the registry root /x does not exist".into()));
        let (status, body) = get(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reason"], "the registry root /x does not exist");
    }

    #[test]
    fn staleness_within_the_bound_is_still_ready() {
        let mut health = Health::default();
        health.read_now();
        health.lost();
        assert_eq!(unreadiness(&health, Duration::from_secs(60)), None);
        health.stale_since = Some(std::time::SystemTime::now() - Duration::from_secs(90));
        let reason = unreadiness(&health, Duration::from_secs(60)).expect("too stale");
        assert!(reason.contains("more than 60 s"), "{reason}");
    }

    #[tokio::test]
    async fn lists_carry_their_freshness_in_the_body_and_headers() {
        let (app, publishers, _stop) = app();
        publishers.snapshots.send_replace(snapshot(7, &[8001]));
        publishers.health.send_modify(Health::read_now);
        publishers.health.send_modify(Health::lost);
        let response = app
            .clone()
            .oneshot(
                Request::get("/v1/services")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible");
        assert_eq!(response.headers()[zklb_wire::STALE_HEADER], "true");
        assert_eq!(
            response.headers()[zklb_wire::SESSION_HEADER],
            "disconnected"
        );
        assert!(response.headers().contains_key(zklb_wire::LAST_SYNC_HEADER));
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(body["stale"], true);
        assert_eq!(body["session"], "disconnected");
        assert!(body["last_sync"].as_i64().is_some(), "{body}");
        assert_eq!(body["version"], 7);
    }
}
