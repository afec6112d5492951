//! Failed attempts are retried on other hosts, so dead and failing instances cost clients nothing.

use std::time::Duration;

use serde_json::json;
use zklb_tests::stack::{
    assert_all_served, free_port, render_envoy_config, with_router_options, ControlPlane, Envoy,
    ZooKeeper,
};
use zklb_tests::{eventually, Stack};
use zookeeper_client::{Acls, CreateMode};

const CLUSTER: &str = "cluster.zklb_service_echo";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_and_failing_backends_cost_no_client_errors() {
    // Ejection off: this is about retries, and ejection would stop trying the bad hosts first.
    let stack = Stack::start_with_router_options(r#""ejection": {"enabled": false}"#).await;
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

    assert_all_served(&answers);
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

/// Short ejections, so that readmission is quick to see.
const SHORT_EJECTIONS: &str = r#""ejection": {"base_ms": 1000, "max_ms": 2000}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_host_is_ejected_by_every_worker_and_readmitted_when_it_returns() {
    let stack = Stack::start_with_router_options(SHORT_EJECTIONS).await;
    a_dead_host_is_ejected_and_readmitted(&stack).await;
    // Failing requests reach the learner in Envoy's access log, and it ejects.
    assert!(
        ejected_by(&stack, "zklb_learner"),
        "the learner ejected nothing"
    );
    // It keeps saying it runs: past the silence after which the routers would take it to be
    // gone, they still leave failures to it.
    eventually(Duration::from_secs(30), "Envoy has run 7 s", || async {
        let uptime = stack.envoy.stat("server.uptime").await;
        if uptime >= 7 {
            Ok(())
        } else {
            Err(format!("{uptime} s"))
        }
    })
    .await;
    let log = stack.envoy.log();
    assert!(
        log.contains("a learner runs"),
        "the routers never saw the learner"
    );
    assert!(
        !log.contains("no learner runs"),
        "the routers stopped hearing from the learner"
    );
}

/// With an Envoy configuration of a user's own that has no learner in its access log, the
/// routers learn from every answer themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_learner_the_routers_eject_a_dead_host_themselves() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let (listen_port, admin_port) = (free_port(), free_port());
    let shipped = render_envoy_config(listen_port, admin_port, control_plane.port);
    let config = without_learner(&with_router_options(&shipped, SHORT_EJECTIONS));
    let envoy = Envoy::start_rendered(config, listen_port, admin_port, 2, dir.path()).await;
    let stack = Stack::around(zookeeper, control_plane, envoy, "/services", dir).await;
    a_dead_host_is_ejected_and_readmitted(&stack).await;
    assert!(
        ejected_by(&stack, "zklb_router"),
        "the routers ejected nothing"
    );
}

/// Whether Envoy's log has an ejection by `plugin` (the learner's or the router's name).
fn ejected_by(stack: &Stack, plugin: &str) -> bool {
    stack
        .envoy
        .log()
        .lines()
        .any(|line| line.contains(plugin) && line.contains("ejecting"))
}

/// `config` without the access log that runs the learner.
fn without_learner(config: &str) -> String {
    let start = config
        .find("                access_log:\n")
        .expect("the template has an access log");
    let end = start
        + config[start..]
            .find("                route_config:\n")
            .expect("the route configuration follows the access log");
    let config = format!("{}{}", &config[..start], &config[end..]);
    assert!(!config.contains("envoy.access_loggers.wasm"), "{config}");
    config
}

/// A registration whose process is gone is ejected, costs next to no retries while it is, and
/// gets traffic again once a process listens on its port.
async fn a_dead_host_is_ejected_and_readmitted(stack: &Stack) {
    let _live = stack.serving("echo", &["b1", "b2", "b3"]).await;

    // A registration whose process is gone: nothing listens on its port.
    let dead_port = free_port();
    let registrar = stack.zookeeper.client().await;
    let dead = json!({"id": "dead", "address": "127.0.0.1", "port": dead_port});
    registrar
        .create(
            "/services/echo/dead",
            &serde_json::to_vec(&dead).expect("json"),
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .expect("registering the dead instance");
    let connect_failures = format!("{CLUSTER}.upstream_cx_connect_fail");
    eventually(
        Duration::from_secs(20),
        "the dead instance is picked",
        || async {
            let answers = stack.requests("echo", 40, 4).await;
            assert!(answers.iter().all(|answer| answer.status == 200));
            let failures = stack.envoy.stat(&connect_failures).await;
            if failures > 0 {
                Ok(())
            } else {
                Err("no connect failure yet".to_string())
            }
        },
    )
    .await;

    // Once ejected, it is tried only after every live host, so no request needs a retry.
    let retries = format!("{CLUSTER}.upstream_rq_retry");
    let retries_before = stack.envoy.stat(&retries).await;
    let answers = stack.requests("echo", 2_000, 8).await;
    let retried = stack.envoy.stat(&retries).await - retries_before;
    let errors = answers.iter().filter(|answer| answer.status != 200).count();
    println!(
        "2000 requests with one of four hosts dead and ejected: {retried} retries, {errors} errors"
    );
    assert_eq!(errors, 0);
    // The ejection lasts 1 to 2 s, longer than a few hundred ms of requests, but it may end
    // once or twice during the batch: each end costs a few retries until the host fails again.
    assert!(
        retried * 100 < 2_000,
        "{retried} of 2000 requests needed a retry (1 % is the target)"
    );
    // The ejection is counted, and so are the requests that took a retry.
    stack
        .envoy
        .stat_reaches("wasmcustom.zklb.ejections", 1)
        .await;
    stack
        .envoy
        .stat_reaches("wasmcustom.zklb.retried.echo", 1)
        .await;

    // Back: a process listens on the port again, and gets traffic once its ejection ends.
    let revived = stack
        .backend_listening_on("other", "revived", dead_port)
        .await;
    eventually(
        Duration::from_secs(20),
        "the returned host gets traffic",
        || async {
            let before = revived.stats().await.0;
            stack.requests("echo", 80, 4).await;
            let served = revived.stats().await.0 - before;
            if served > 0 {
                Ok(())
            } else {
                Err("no request reached it".to_string())
            }
        },
    )
    .await;
}

/// With more of a service ejected than `max_ejected_percent`, ejection says more about the
/// checks than about the hosts: it is ignored, and every host is a first candidate again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_panic_share_ejected_hosts_are_first_candidates_again() {
    let stack = Stack::start_with_router_options(
        r#""debug_headers": true, "ejection": {"max_ejected_percent": 25}"#,
    )
    .await;
    let _live = stack.serving("echo", &["b1", "b2"]).await;
    let registrar = stack.zookeeper.client().await;
    let mut dead = Vec::new();
    for id in ["dead1", "dead2"] {
        let port = free_port();
        let instance = json!({"id": id, "address": "127.0.0.1", "port": port});
        registrar
            .create(
                &format!("/services/echo/{id}"),
                &serde_json::to_vec(&instance).expect("json"),
                &CreateMode::Persistent.with_acls(Acls::anyone_all()),
            )
            .await
            .expect("registering a dead instance");
        dead.push(format!("127.0.0.1:{port}"));
    }
    // Both dead hosts are tried and ejected: two of four, past the 25 % allowed.
    eventually(
        Duration::from_secs(20),
        "both dead hosts are ejected",
        || async {
            let answers = stack.requests("echo", 40, 4).await;
            assert_all_served(&answers);
            let ejections = stack.envoy.stat("wasmcustom.zklb.ejections").await;
            if ejections >= 2 {
                Ok(())
            } else {
                Err(format!("{ejections} ejections"))
            }
        },
    )
    .await;

    let answers = stack.requests("echo", 400, 4).await;
    assert_all_served(&answers);
    let dead_first = answers
        .iter()
        .filter_map(|answer| answer.header(zklb_wire::CANDIDATES_HEADER))
        .filter(|candidates| {
            dead.iter()
                .any(|host| candidates.starts_with(host.as_str()))
        })
        .count();
    println!(
        "past the panic share, a dead host was the first candidate of {dead_first} of 400 requests"
    );
    // Half of the hosts are dead: about 200 if ejection is ignored, none if it is honoured.
    assert!(
        dead_first > 100,
        "ejection was not ignored past the panic share"
    );
}
