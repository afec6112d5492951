//! Failed attempts are retried on other hosts, so dead and failing instances cost clients nothing.

use std::time::Duration;

use serde_json::json;
use zklb_tests::stack::free_port;
use zklb_tests::{eventually, Stack};
use zookeeper_client::{Acls, CreateMode};

const CLUSTER: &str = "cluster.zklb_service_echo";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_and_failing_backends_cost_no_client_errors() {
    let stack = Stack::start().await;
    let ok1 = stack.backend("echo", "ok1").await;
    let ok2 = stack.backend("echo", "ok2").await;
    let sick = stack.failing_backend("echo", "sick", 503).await;

    // A registration whose process is gone: nothing listens on its port.
    let registrar = stack.zookeeper.client().await;
    let dead = json!({"name": "echo", "id": "dead", "address": "127.0.0.1", "port": free_port(),
                      "sslPort": null, "payload": null, "registrationTimeUTC": 0, "serviceType": "DYNAMIC"});
    registrar
        .create(
            "/services/echo/dead",
            &serde_json::to_vec(&dead).expect("json"),
            &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
        )
        .await
        .expect("registering the dead instance");

    // Until both bad hosts have been tried, the test would prove nothing.
    eventually(
        Duration::from_secs(30),
        "the sick and the dead instance are being picked",
        || async {
            stack.requests("echo", 40, 4).await;
            let (sick_requests, _) = sick.stats().await;
            let connect_failures = stack
                .envoy
                .stat(&format!("{CLUSTER}.upstream_cx_connect_fail"))
                .await;
            if sick_requests > 0 && connect_failures > 0 {
                Ok(())
            } else {
                Err(format!(
                    "sick answered {sick_requests}, {connect_failures} connect failures"
                ))
            }
        },
    )
    .await;

    let (sick_before, _) = sick.stats().await;
    let (ok1_before, _) = ok1.stats().await;
    let (ok2_before, _) = ok2.stats().await;
    let retries_before = stack
        .envoy
        .stat(&format!("{CLUSTER}.upstream_rq_retry"))
        .await;
    let connect_failures_before = stack
        .envoy
        .stat(&format!("{CLUSTER}.upstream_cx_connect_fail"))
        .await;

    let answers = stack.requests("echo", 1_000, 8).await;

    let errors: Vec<_> = answers
        .iter()
        .filter(|answer| answer.status != 200)
        .collect();
    assert!(
        errors.is_empty(),
        "{} client errors, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    let counts = Stack::count_by_backend(&answers);
    assert_eq!(
        counts.get("ok1").copied().unwrap_or(0) + counts.get("ok2").copied().unwrap_or(0),
        1_000
    );

    // The bad hosts were tried, and each failed attempt was retried on another host (the healthy
    // backends served every request).
    let sick_tried = sick.stats().await.0 - sick_before;
    let retries = stack
        .envoy
        .stat(&format!("{CLUSTER}.upstream_rq_retry"))
        .await
        - retries_before;
    let connect_failures = stack
        .envoy
        .stat(&format!("{CLUSTER}.upstream_cx_connect_fail"))
        .await
        - connect_failures_before;
    let ok_served = ok1.stats().await.0 - ok1_before + ok2.stats().await.0 - ok2_before;
    println!(
        "1000 requests: {sick_tried} answered 503, {connect_failures} connect failures, {retries} retries"
    );
    assert!(sick_tried > 0, "the 503 backend was never tried");
    assert!(connect_failures > 0, "the dead backend was never tried");
    // At least one retry per failed attempt: Envoy may also retry, say, a reset of a pooled
    // connection the backend had just closed, so the count is not exact.
    assert!(
        retries >= sick_tried + connect_failures,
        "{retries} retries for {sick_tried} 503s and {connect_failures} connect failures"
    );
    assert_eq!(
        ok_served, 1_000,
        "the healthy backends served exactly the client requests"
    );
}
