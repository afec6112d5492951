//! The agent's own HTTP endpoint: Prometheus metrics (`/metrics`) and liveness (`/healthz`),
//! on 127.0.0.1 unless told otherwise.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

use crate::drain::Phase;

/// What one instance's checks and registration have done.
#[derive(Debug)]
pub struct InstanceMetrics {
    pub service: String,
    pub id: String,
    pub znode: String,
    healthy: AtomicBool,
    /// Whether its znode exists as this agent last wrote it, and with which `enabled`.
    registered: AtomicBool,
    enabled: AtomicBool,
    registrations: AtomicU64,
    checks_passed: AtomicU64,
    checks_failed: AtomicU64,
}

impl InstanceMetrics {
    pub fn new(service: &str, id: &str, znode: String, healthy: bool) -> InstanceMetrics {
        InstanceMetrics {
            service: service.to_string(),
            id: id.to_string(),
            znode,
            healthy: AtomicBool::new(healthy),
            registered: AtomicBool::new(false),
            enabled: AtomicBool::new(false),
            registrations: AtomicU64::new(0),
            checks_passed: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
        }
    }

    pub fn count_check(&self, passed: bool) {
        let counter = if passed {
            &self.checks_passed
        } else {
            &self.checks_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Its znode was created by this agent.
    pub fn count_registration(&self) {
        self.registrations.fetch_add(1, Ordering::Relaxed);
    }

    /// What its znode says now: absent (`None`) or registered with `enabled`.
    pub fn set_written(&self, enabled: Option<bool>) {
        self.registered.store(enabled.is_some(), Ordering::Relaxed);
        self.enabled.store(enabled == Some(true), Ordering::Relaxed);
    }
}

/// Everything the endpoint reports.
#[derive(Debug)]
pub struct Metrics {
    pub instances: Vec<Arc<InstanceMetrics>>,
    connected: AtomicBool,
    sessions: AtomicU64,
}

impl Metrics {
    pub fn new(instances: Vec<Arc<InstanceMetrics>>) -> Metrics {
        Metrics {
            instances,
            connected: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
        }
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub fn count_session(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    phase: watch::Receiver<Phase>,
}

pub fn router(metrics: Arc<Metrics>, phase: watch::Receiver<Phase>) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(get_health))
        .route("/readyz", get(get_readiness))
        .with_state(AppState { metrics, phase })
}

/// Readiness: `200` while every instance is registered in rotation, `503` with the reason
/// otherwise (not registered yet, failing its checks, draining), for orchestrators that wait
/// until a backend takes traffic.
async fn get_readiness(State(state): State<AppState>) -> Response {
    let phase = *state.phase.borrow();
    let out_of_rotation: Vec<&str> = state
        .metrics
        .instances
        .iter()
        .filter(|instance| {
            !(instance.registered.load(Ordering::Relaxed)
                && instance.enabled.load(Ordering::Relaxed))
        })
        .map(|instance| instance.znode.as_str())
        .collect();
    let reason = if phase != Phase::Serving {
        Some(format!("the agent is {}", phase.name()))
    } else if !out_of_rotation.is_empty() {
        Some(format!("not in rotation: {}", out_of_rotation.join(", ")))
    } else {
        None
    };
    match reason {
        None => Json(json!({"ready": true})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

/// Liveness: `200` while the process runs, with what it is doing.
async fn get_health(State(state): State<AppState>) -> Response {
    let metrics = &state.metrics;
    let instances: Vec<_> = metrics
        .instances
        .iter()
        .map(|instance| {
            json!({
                "service": instance.service,
                "id": instance.id,
                "znode": instance.znode,
                "healthy": instance.healthy.load(Ordering::Relaxed),
                "registered": instance.registered.load(Ordering::Relaxed),
                "enabled": instance.enabled.load(Ordering::Relaxed),
            })
        })
        .collect();
    let zookeeper = if metrics.connected.load(Ordering::Relaxed) {
        "connected"
    } else {
        "disconnected"
    };
    Json(json!({
        "status": state.phase.borrow().name(),
        "zookeeper": zookeeper,
        "instances": instances,
    }))
    .into_response()
}

async fn get_metrics(State(state): State<AppState>) -> Response {
    let metrics = &state.metrics;
    let mut text = String::new();
    let mut family = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in lines {
            let _ = writeln!(text, "{name}{labels} {value}");
        }
    };
    let per_instance = |value: &dyn Fn(&InstanceMetrics) -> u64| -> Vec<(String, u64)> {
        metrics
            .instances
            .iter()
            .map(|instance| (labels(instance, None), value(instance)))
            .collect()
    };
    let flag = |flag: &AtomicBool| u64::from(flag.load(Ordering::Relaxed));
    family(
        "zklb_agent_instance_healthy",
        "gauge",
        "1 while the instance passes its checks (always, without checks).",
        per_instance(&|instance| flag(&instance.healthy)),
    );
    family(
        "zklb_agent_instance_registered",
        "gauge",
        "1 while the instance's znode exists as this agent wrote it.",
        per_instance(&|instance| flag(&instance.registered)),
    );
    family(
        "zklb_agent_instance_enabled",
        "gauge",
        "1 while the instance is registered in rotation (enabled: true).",
        per_instance(&|instance| flag(&instance.enabled)),
    );
    family(
        "zklb_agent_registrations_total",
        "counter",
        "Times the instance's znode was created: its first registration and every one after its session expired or the znode was deleted.",
        per_instance(&|instance| instance.registrations.load(Ordering::Relaxed)),
    );
    let checks = metrics
        .instances
        .iter()
        .flat_map(|instance| {
            [
                ("passed", &instance.checks_passed),
                ("failed", &instance.checks_failed),
            ]
            .map(|(result, count)| {
                (
                    labels(instance, Some(result)),
                    count.load(Ordering::Relaxed),
                )
            })
        })
        .collect();
    family(
        "zklb_agent_checks_total",
        "counter",
        "Health checks of the instance, by result.",
        checks,
    );
    family(
        "zklb_agent_zookeeper_connected",
        "gauge",
        "1 while the ZooKeeper session is connected.",
        vec![(String::new(), flag(&metrics.connected))],
    );
    family(
        "zklb_agent_sessions_total",
        "counter",
        "ZooKeeper sessions opened (a new one replaces each that expired).",
        vec![(String::new(), metrics.sessions.load(Ordering::Relaxed))],
    );
    family(
        "zklb_agent_stopping",
        "gauge",
        "1 once the agent was told to stop and drains its instances.",
        vec![(
            String::new(),
            u64::from(*state.phase.borrow() != Phase::Serving),
        )],
    );
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

fn labels(instance: &InstanceMetrics, result: Option<&str>) -> String {
    let mut labels = format!(
        "{{service=\"{}\",id=\"{}\"",
        escape(&instance.service),
        escape(&instance.id)
    );
    if let Some(result) = result {
        let _ = write!(labels, ",result=\"{result}\"");
    }
    labels.push('}');
    labels
}

/// A Prometheus label value.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let response = app
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8(body.to_vec()).expect("UTF-8"))
    }

    fn sample() -> (Arc<Metrics>, watch::Sender<Phase>) {
        let orders = Arc::new(InstanceMetrics::new(
            "orders",
            "a\"b",
            "/services/orders/a\"b".to_string(),
            false,
        ));
        orders.count_check(true);
        orders.count_check(false);
        orders.count_check(false);
        orders.count_registration();
        orders.set_written(Some(false));
        let metrics = Arc::new(Metrics::new(vec![orders]));
        metrics.count_session();
        metrics.set_connected(true);
        (metrics, watch::Sender::new(Phase::Serving))
    }

    #[tokio::test]
    async fn metrics_report_each_instance_and_the_session() {
        let (metrics, phase) = sample();
        let (status, text) = get(router(metrics, phase.subscribe()), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        let labels = r#"{service="orders",id="a\"b"}"#;
        for line in [
            format!("zklb_agent_instance_healthy{labels} 0"),
            format!("zklb_agent_instance_registered{labels} 1"),
            format!("zklb_agent_instance_enabled{labels} 0"),
            format!("zklb_agent_registrations_total{labels} 1"),
            r#"zklb_agent_checks_total{service="orders",id="a\"b",result="passed"} 1"#.to_string(),
            r#"zklb_agent_checks_total{service="orders",id="a\"b",result="failed"} 2"#.to_string(),
            "zklb_agent_zookeeper_connected 1".to_string(),
            "zklb_agent_sessions_total 1".to_string(),
            "zklb_agent_stopping 0".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[tokio::test]
    async fn readiness_needs_every_instance_in_rotation() {
        let (metrics, phase) = sample();
        let (status, body) = get(router(Arc::clone(&metrics), phase.subscribe()), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("not in rotation: /services/orders/a\\\"b"),
            "{body}"
        );
        metrics.instances[0].enabled.store(true, Ordering::Relaxed);
        let (status, _) = get(router(Arc::clone(&metrics), phase.subscribe()), "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        phase.send_replace(Phase::Draining);
        let (status, body) = get(router(metrics, phase.subscribe()), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("the agent is draining"), "{body}");
    }

    #[tokio::test]
    async fn liveness_says_what_the_agent_does() {
        let (metrics, phase) = sample();
        phase.send_replace(Phase::Draining);
        let (status, body) = get(router(metrics, phase.subscribe()), "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(health["status"], "draining");
        assert_eq!(health["zookeeper"], "connected");
        assert_eq!(
            health["instances"][0],
            json!({"service": "orders", "id": "a\"b", "znode": "/services/orders/a\"b",
                   "healthy": false, "registered": true, "enabled": false})
        );
    }
}
