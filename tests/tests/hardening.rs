//! The shipped Envoy configuration holds up against clients and sick backends: forged x-envoy-*
//! headers change nothing, a hung backend costs one per-try timeout, and a request that is not
//! idempotent is not sent twice after a 5xx.

use std::time::Duration;

use serde_json::json;
use std::path::Path;

use zklb_tests::stack::{
    assert_all_served, filter_wasm, free_port, render_envoy_config, workspace_root,
};
use zklb_tests::{eventually, ControlPlane, Envoy, Stack, ZooKeeper};
use zookeeper_client::{Acls, CreateMode};

/// Registers an instance whose process is gone: nothing listens on its port.
async fn register_dead(stack: &Stack, service: &str) {
    let registrar = stack.zookeeper.client().await;
    let dead = json!({"id": "dead", "address": "127.0.0.1", "port": free_port()});
    registrar
        .create(
            &format!("{}/{service}/dead", stack.root),
            &serde_json::to_vec(&dead).expect("json"),
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .expect("registering the dead instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_envoy_headers_do_not_steer_retries_or_timeouts() {
    // Ejection off, so that the dead host keeps being tried first now and then.
    let stack = Stack::start_with_router_options(r#""ejection": {"enabled": false}"#).await;
    let _live = stack.serving("echo", &["b1", "b2"]).await;
    register_dead(&stack, "echo").await;
    let connect_failures = "cluster.zklb_service_echo.upstream_cx_connect_fail";
    eventually(
        Duration::from_secs(20),
        "the dead host is tried",
        || async {
            stack.requests("echo", 20, 2).await;
            if stack.envoy.stat(connect_failures).await > 0 {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;

    let forged = [
        ("x-envoy-max-retries", "0"),
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-upstream-rq-timeout-ms", "1"),
        ("x-envoy-upstream-rq-per-try-timeout-ms", "1"),
        ("x-forwarded-for", "127.0.0.1"),
    ];
    let answers = stack.requests_with("echo", &forged, 600, 6).await;
    // A third of first attempts go to the dead host: with the forged headers obeyed, they
    // would fail instead of being retried.
    assert_all_served(&answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_backend_costs_a_per_try_timeout_not_a_failed_request() {
    let stack = Stack::start().await;
    let backends = stack.serving("echo", &["b1", "b2", "hung"]).await;
    backends[2].freeze();

    let answers = stack.requests("echo", 120, 6).await;
    assert_all_served(&answers);
    let counts = Stack::count_by_backend(&answers);
    assert_eq!(counts.get("hung"), None);
    let timeouts = stack
        .envoy
        .stat("cluster.zklb_service_echo.upstream_rq_per_try_timeout")
        .await;
    println!(
        "120 requests with one of three backends hung: {timeouts} per-try timeouts, {counts:?}"
    );
    assert!(timeouts > 0, "the hung backend was never tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_idempotent_requests_are_retried_after_a_5xx() {
    // Ejection off, so that the failing host stays a first candidate.
    let stack = Stack::start_with_router_options(r#""ejection": {"enabled": false}"#).await;
    let _ok = stack.backend("echo", "ok").await;
    stack.wait_for_backends("echo", &["ok"]).await;
    let sick = stack.failing_backend("echo", "sick", 503).await;
    eventually(
        Duration::from_secs(20),
        "the 503 backend is tried",
        || async {
            stack.requests("echo", 20, 2).await;
            if sick.stats().await.0 > 0 {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;

    let url = format!("http://127.0.0.1:{}/orders", stack.envoy.listen_port);
    let mut posts_failed = 0;
    let mut gets_failed = 0;
    for _ in 0..200 {
        let post = stack.http.post(&url).header("host", "echo").body("{}");
        if post
            .send()
            .await
            .map_or(true, |answer| answer.status() != 200)
        {
            posts_failed += 1;
        }
        let get = stack.http.get(&url).header("host", "echo");
        if get
            .send()
            .await
            .map_or(true, |answer| answer.status() != 200)
        {
            gets_failed += 1;
        }
    }
    let (sick_answered, _) = sick.stats().await;
    println!("200 POSTs and 200 GETs, half of first attempts at a 503 backend: {posts_failed} POSTs and {gets_failed} GETs failed ({sick_answered} answered 503)");
    assert_eq!(gets_failed, 0, "GETs are retried on the next candidate");
    assert!(
        posts_failed > 0,
        "a POST that got a 503 was sent again, which is not safe for a request that is not idempotent"
    );
}

/// Envoy on the shipped configuration with the crash-probe build of the filter (a request with
/// `x-zklb-crash-probe` makes it panic), one worker, and `failure_policy` as given.
async fn envoy_with_crashable_filter(
    control_plane: &ControlPlane,
    failure_policy: &str,
    dir: &Path,
) -> Envoy {
    let (listen_port, admin_port) = (free_port(), free_port());
    let shipped = render_envoy_config(listen_port, admin_port, control_plane.port);
    let probe = workspace_root().join("target/zklb_filter_crash_probe.wasm");
    assert!(
        probe.exists(),
        "run scripts/build-filter zklb-filter crash-probe"
    );
    let config = shipped
        .replace(
            &filter_wasm().display().to_string(),
            &probe.display().to_string(),
        )
        .replace(
            "failure_policy: FAIL_RELOAD",
            &format!("failure_policy: {failure_policy}"),
        );
    assert!(config.contains(&format!("failure_policy: {failure_policy}")));
    std::fs::create_dir_all(dir).expect("a directory");
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).expect("writing the configuration");
    Envoy::start_with_config(path, listen_port, admin_port, 1, dir).await
}

/// A filter VM that crashes is replaced (the shipped `FAIL_RELOAD`): the requests after the
/// crash are routed again, where `FAIL_CLOSED` would fail every one of them for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_filter_vm_is_replaced_and_routing_goes_on() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let reloading =
        envoy_with_crashable_filter(&control_plane, "FAIL_RELOAD", &dir.path().join("reload"))
            .await;
    let closing =
        envoy_with_crashable_filter(&control_plane, "FAIL_CLOSED", &dir.path().join("closed"))
            .await;
    let stack = Stack::around(zookeeper, control_plane, reloading, "/services", dir).await;
    let _backends = stack.serving("echo", &["b1", "b2"]).await;
    let http = reqwest::Client::new();
    let send = |envoy: &Envoy, crash: bool| {
        let mut request = http
            .get(format!("http://127.0.0.1:{}/", envoy.listen_port))
            .header("host", "echo");
        if crash {
            request = request.header("x-zklb-crash-probe", "1");
        }
        async move {
            match request.send().await {
                Ok(response) => response.status().as_u16(),
                Err(_) => 0,
            }
        }
    };
    for envoy in [&stack.envoy, &closing] {
        eventually(Duration::from_secs(20), "Envoy routes", || async {
            let status = send(envoy, false).await;
            (status == 200).then_some(()).ok_or(format!("{status}"))
        })
        .await;
        assert_ne!(send(envoy, true).await, 200, "the probe crashed the filter");
        assert!(
            envoy.log().contains("zklb: crashing on request"),
            "the VM did not crash: {}",
            envoy.log()
        );
    }

    // FAIL_RELOAD: a new VM takes over, with the list the poller keeps in shared data.
    let recovered = eventually(
        Duration::from_secs(20),
        "the crashed VM is replaced",
        || async {
            let status = send(&stack.envoy, false).await;
            (status == 200).then_some(()).ok_or(format!("{status}"))
        },
    );
    recovered.await;
    let answers = stack.requests("echo", 100, 4).await;
    assert_all_served(&answers);
    // FAIL_CLOSED, the same crash, for contrast: the worker fails every request after it.
    let mut failed = 0;
    for _ in 0..20 {
        if send(&closing, false).await != 200 {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 20,
        "FAIL_CLOSED recovered by itself: the contrast shows nothing"
    );
}
