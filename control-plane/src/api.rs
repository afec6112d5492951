//! The HTTP API: service lists with versions and long-poll, liveness, readiness, metrics, the
//! operator's status page and the OpenAPI description of it all (`openapi.json`, kept true by
//! tests that check real answers against it). Envoy's membership is served over gRPC by
//! [`crate::xds`], on the same listener.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::watch;
use zklb_wire::{ErrorBody, Freshness, Problems, ServiceChanges, Version};

use crate::admin::{self, AdminToken, Resync};
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
    /// Where `POST /v1/resync` asks the ingest task for a full read.
    pub resync: Arc<Resync>,
}

/// Every route on one listener: what clients read and the operator's [`admin`] routes.
pub fn router(state: AppState, token: AdminToken) -> Router {
    with_fallback(data_routes(state.clone()).merge(admin::routes(state, token)))
}

/// What Envoy's filters and other clients read: the lists, health, readiness and the API's
/// description. No fallback: the listener that serves them adds it.
pub fn data_routes(state: AppState) -> Router {
    Router::new()
        .route("/openapi.json", get(get_openapi))
        .route("/v1/services", get(list_services))
        .route("/v1/changes", get(list_changes))
        .route("/v1/services/{name}", get(get_service))
        .route("/healthz", get(get_health))
        .route("/readyz", get(get_readiness))
        .with_state(state)
}

/// `routes` answering a JSON 404 for everything else, a JSON 405 (with `Allow`) for a method a
/// route does not take, and refusing requests too large to be the API's.
pub fn with_fallback(routes: Router) -> Router {
    routes
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        // axum adds the `Allow` header to what this answers.
        .method_not_allowed_fallback(
            |method: Method| async move { ApiError::MethodNotAllowed(method) },
        )
        .layer(middleware::from_fn(refuse_oversized))
}

/// The longest request target (path and query) answered: the API's are a few dozen bytes; a
/// longer one is refused before anything parses it.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// The largest request body announced: no endpoint reads one, so a body is only ever noise.
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

/// Refuses requests too large to be the API's (414, 413) with the JSON every error has.
async fn refuse_oversized(request: Request, next: Next) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target > MAX_TARGET_BYTES {
        return ApiError::TargetTooLong(target).into_response();
    }
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if let Some(length) = announced.filter(|&length| length > MAX_BODY_BYTES) {
        return ApiError::BodyTooLarge(length).into_response();
    }
    next.run(request).await
}

/// Every error the API answers: JSON `{"error": reason}` with a 4xx status.
#[derive(Debug)]
pub enum ApiError {
    NotFound(String),
    BadRequest(String),
    /// ZooKeeper has not been read yet.
    NotReady,
    /// A method the endpoint does not answer; the router adds `Allow`.
    MethodNotAllowed(Method),
    /// A request target longer than [`MAX_TARGET_BYTES`], by its length.
    TargetTooLong(usize),
    /// A request body announced longer than [`MAX_BODY_BYTES`], by its length.
    BodyTooLarge(u64),
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
            ApiError::MethodNotAllowed(method) => (
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed here: the API is read with GET"),
            ),
            ApiError::TargetTooLong(length) => (
                StatusCode::URI_TOO_LONG,
                format!("the request target is {length} bytes, more than {MAX_TARGET_BYTES}"),
            ),
            ApiError::BodyTooLarge(length) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is {length} bytes, more than {MAX_BODY_BYTES}: \
                     no endpoint takes one"
                ),
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
            version: snapshot.version(),
            full: None,
            services: snapshot.services_json(),
            freshness,
            conflicts: &snapshot.publication.conflicts,
            problems: &snapshot.publication.problems,
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
                version: snapshot.version(),
                full: Some(true),
                services: snapshot.services_json(),
                freshness,
                conflicts: &snapshot.publication.conflicts,
                problems: &snapshot.publication.problems,
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
    #[serde(flatten)]
    problems: &'a Problems,
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
            let version = snapshot.version();
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
            .snapshot_when(wait, |snapshot| snapshot.version() > after)
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
    let service = snapshot
        .services()
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no service named {name:?} is registered")))?;
    Ok(with_freshness(
        &state.freshness(),
        Json(service).into_response(),
    ))
}

/// The operator's page: the registry, its freshness and its problems, as HTML.
pub(crate) async fn get_status_page(State(state): State<AppState>) -> Response {
    let page = crate::status::render(
        &state.snapshot(),
        &state.health(),
        crate::status::now_millis(),
    );
    axum::response::Html(page).into_response()
}

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn get_openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
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
        "version": snapshot.version(),
        "services": snapshot.services().len(),
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

pub(crate) async fn get_metrics(State(state): State<AppState>) -> Response {
    let health = state.health();
    let snapshot = state.snapshot();
    let instances: usize = snapshot
        .services()
        .values()
        .map(|s| s.instances.len())
        .sum();
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
        snapshot.version().to_string(),
    );
    metric(
        "zklb_services",
        "gauge",
        "Services in the published registry.",
        snapshot.services().len().to_string(),
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
        "zklb_rejected_service_names_total",
        "counter",
        "Znodes skipped because their names cannot name a service (each once).",
        state
            .channels
            .stats
            .rejected_names
            .load(Ordering::Relaxed)
            .to_string(),
    );
    let problems = &snapshot.publication.problems;
    metric(
        "zklb_unreadable_znodes",
        "gauge",
        "Znodes that cannot be read (no permission, say); they are read again later.",
        problems.unreadable.len().to_string(),
    );
    metric(
        "zklb_unresolved_hostnames",
        "gauge",
        "Registered host names that do not resolve; their instances get no traffic.",
        problems.unresolved.len().to_string(),
    );
    metric(
        "zklb_service_conflicts",
        "gauge",
        "Services not routed because their names differ only in case from an older one's.",
        snapshot.publication.conflicts.len().to_string(),
    );
    metric(
        "zklb_resyncs_total",
        "counter",
        "Full reads of every registry root done on request (POST /v1/resync).",
        state.resync.done.load(Ordering::Relaxed).to_string(),
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
    let malformed: String = state
        .channels
        .stats
        .malformed()
        .iter()
        .map(|((format, reason), count)| {
            format!(
                "{{format=\"{}\",reason=\"{reason}\"}} {count}\n",
                format.name()
            )
        })
        .collect();
    let labelled = labelled.into_iter().chain([(
        "zklb_malformed_znodes_total",
        "Znodes skipped because they do not decode in their format, by format and reason (each version of a znode once).",
        malformed,
    )]);
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
    use tower::ServiceExt;
    use zklb_wire::{Instance, Service, ServiceSet, SourceFormat};

    use crate::registry::Publication;

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
            resync: Arc::default(),
        };
        (router(state, AdminToken::default()), publishers, stop)
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
            ..Service::default()
        };
        Arc::new(Snapshot::default().succeeded_by(Publication::of([service])))
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

    /// Wrong methods and requests too large to be the API's get a JSON 4xx that says why.
    #[tokio::test]
    async fn wrong_methods_and_oversized_requests_are_refused_with_the_reason() {
        let (app, publishers, _stop) = app();
        publishers.snapshots.send_replace(snapshot(7, &[8001]));
        let send = |request: Request<Body>| {
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await.expect("infallible");
                let status = response.status();
                let allow = response.headers().get(header::ALLOW).cloned();
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .expect("body");
                let body: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                (
                    status,
                    allow,
                    body["error"].as_str().unwrap_or_default().to_string(),
                )
            }
        };
        for method in [Method::POST, Method::DELETE, Method::PUT, Method::OPTIONS] {
            let request = Request::builder()
                .method(method.clone())
                .uri("/v1/services")
                .body(Body::empty())
                .expect("request");
            let (status, allow, error) = send(request).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert_eq!(allow.as_ref().map(|a| a.as_bytes()), Some(&b"GET,HEAD"[..]));
            assert_eq!(
                error,
                format!("{method} is not allowed here: the API is read with GET")
            );
        }
        let long = format!("/v1/services?after={}", "9".repeat(MAX_TARGET_BYTES));
        let (status, _, error) =
            send(Request::get(long).body(Body::empty()).expect("request")).await;
        assert_eq!(status, StatusCode::URI_TOO_LONG);
        assert!(error.contains("more than 8192"), "{error}");
        let request = Request::get("/v1/services")
            .header(header::CONTENT_LENGTH, "10000000")
            .body(Body::empty())
            .expect("request");
        let (status, _, error) = send(request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(error.contains("10000000 bytes, more than 65536"), "{error}");
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
        let app = router(
            AppState {
                channels,
                xds: Arc::clone(&xds),
                max_hold: Duration::from_secs(30),
                max_stale: Duration::from_secs(60),
                stopping,
                resync: Arc::default(),
            },
            AdminToken::default(),
        );
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
        let published = ServiceSet {
            version: current.version(),
            services: current
                .services()
                .iter()
                .map(|(name, service)| (name.clone(), Service::clone(service)))
                .collect(),
        };
        assert_eq!(list.set, published);
        assert_eq!(list.freshness.session, "connected");
        let (_, body) = get(&app, "/v1/changes").await;
        let changes: ServiceChanges = serde_json::from_value(body).expect("a ServiceChanges");
        assert!(changes.full);
        assert_eq!(changes.services, published.services);
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

        let mut services = snapshot(9, &[8001, 8002]).publication.clone();
        let other = Service {
            name: "other".into(),
            version: 3,
            ..Service::default()
        };
        services.services.insert("other".into(), Arc::new(other));
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

    /// The status of `uri`'s answer and its body, checked against `openapi.json`: the status is
    /// one the document gives for `path`, and a JSON body fits the schema it gives for it.
    async fn conforming(
        app: &Router,
        document: &serde_json::Value,
        method: &str,
        path: &str,
        uri: &str,
    ) -> u16 {
        let request = Request::builder().method(method).uri(uri);
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .expect("body");
        let operation = &document["paths"][path][method.to_ascii_lowercase()];
        let mut documented = &operation["responses"][status.as_str()];
        if let Some(reference) = documented["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap_or_default();
            documented = &document["components"]["responses"][name];
        }
        assert!(
            documented.is_object(),
            "{uri}: {status} is not documented for {path}"
        );
        let Some(content) = documented["content"].as_object() else {
            assert!(bytes.is_empty(), "{uri}: {status} has an undocumented body");
            return status.as_u16();
        };
        let media = content_type.split(';').next().unwrap_or_default().trim();
        assert!(
            content.contains_key(media),
            "{uri}: {media} is not documented"
        );
        if media == "application/json" {
            let body: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON body");
            let mut schema = content[media]["schema"].clone();
            schema["components"] = document["components"].clone();
            let validator = jsonschema::validator_for(&schema).expect("a valid schema");
            let errors: Vec<String> = validator
                .iter_errors(&body)
                .map(|error| format!("{} at {}", error, error.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{uri}: {errors:?} in {body}");
        }
        status.as_u16()
    }

    /// Every documented path answers what `openapi.json` says, in every state the answers vary
    /// with: before ZooKeeper is read, with a registry holding every kind of instance and
    /// problem, on bad requests, and when too stale to be ready.
    #[tokio::test(start_paused = true)]
    async fn every_answer_is_what_the_openapi_description_says() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json");
        let (app, publishers, _stop) = app();
        let mut asked = std::collections::BTreeSet::new();
        let mut check = |path: &'static str, uri: &'static str| {
            asked.insert(path);
            let (app, document) = (app.clone(), document.clone());
            async move { conforming(&app, &document, "GET", path, uri).await }
        };
        assert_eq!(check("/v1/services", "/v1/services").await, 503);
        assert_eq!(check("/v1/changes", "/v1/changes").await, 503);
        assert_eq!(check("/readyz", "/readyz").await, 503);

        let mut named = Instance::new("a", "10.0.0.1", 8080, SourceFormat::Curator);
        named.hostname = Some("a.internal".into());
        named.zone = Some("eu-1a".into());
        named.registered_at = Some(1_732_000_000_000);
        named.metadata.insert("version".into(), "1.4.2".into());
        let mut tls = Instance::new("b", "10.0.0.2", 8443, SourceFormat::Serverset)
            .with_status(zklb_wire::Status::Draining);
        tls.tls = true;
        let gone = Service {
            name: "gone".into(),
            version: 4,
            ..Service::default()
        };
        let first = Publication::of([
            Service {
                name: "echo".into(),
                version: 5,
                format: Some(SourceFormat::Curator),
                znode: "/services/echo".into(),
                instances: vec![named, tls],
            },
            gone,
        ]);
        let first = Arc::new(Snapshot::default().succeeded_by(first));
        let mut second = first.publication.clone();
        second.version = 7;
        second.services.remove("gone");
        second.services.insert(
            "other".into(),
            Arc::new(Service {
                name: "other".into(),
                version: 7,
                ..Service::default()
            }),
        );
        second
            .conflicts
            .insert("Other".into(), "differs only in case".into());
        second
            .problems
            .malformed
            .insert("/services/x/1".into(), "not valid JSON".into());
        second
            .problems
            .unreadable
            .insert("/services/y".into(), "not authorized".into());
        second
            .problems
            .unresolved
            .insert("z.invalid".into(), "not found".into());
        publishers
            .snapshots
            .send_replace(Arc::new(first.succeeded_by(second)));
        publishers.health.send_modify(Health::read_now);

        for (path, uri, status) in [
            ("/", "/", 200),
            ("/openapi.json", "/openapi.json", 200),
            ("/v1/services", "/v1/services", 200),
            ("/v1/services", "/v1/services?after=5&wait=1", 200),
            ("/v1/services", "/v1/services?after=7&wait=1", 304),
            ("/v1/services", "/v1/services?after=soon", 400),
            ("/v1/changes", "/v1/changes", 200),
            ("/v1/changes", "/v1/changes?after=5&wait=1", 200),
            ("/v1/changes", "/v1/changes?after=1&wait=1", 200),
            ("/v1/changes", "/v1/changes?after=7&wait=1", 304),
            ("/v1/changes", "/v1/changes?wait=-1", 400),
            ("/v1/services/{name}", "/v1/services/echo", 200),
            ("/v1/services/{name}", "/v1/services/gone", 404),
            ("/v1/services/{name}", "/v1/services/%FF", 400),
            ("/healthz", "/healthz", 200),
            ("/readyz", "/readyz", 200),
            ("/metrics", "/metrics", 200),
        ] {
            assert_eq!(check(path, uri).await, status, "{uri}");
        }
        publishers.health.send_modify(|health| {
            health.lost();
            health.stale_since = Some(std::time::SystemTime::now() - Duration::from_secs(600));
        });
        assert_eq!(check("/readyz", "/readyz").await, 503);
        assert_eq!(check("/healthz", "/healthz").await, 200);
        // The one state-changing request, without credentials: challenged.
        asked.insert("/v1/resync");
        let resync = conforming(&app, &document, "POST", "/v1/resync", "/v1/resync").await;
        assert_eq!(resync, 401);

        let documented: std::collections::BTreeSet<&str> = document["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(asked, documented, "every documented path is checked");
    }
}
