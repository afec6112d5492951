//! Failure is normal: a restarting control plane or a crashed ZooKeeper costs no request, and
//! updates resume when they are back.

use std::time::Duration;

use zklb_tests::proxy::Relay;
use zklb_tests::stack::SESSION_TIMEOUT;
use zklb_tests::{eventually, Backend, ControlPlane, Stack, ZooKeeper};
use zookeeper_client::{Acls, CreateMode};

async fn echo_with_two_backends() -> (Stack, Vec<Backend>) {
    let stack = Stack::start().await;
    let backends = stack.serving("echo", &["b1", "b2"]).await;
    (stack, backends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traffic_survives_a_control_plane_crash_and_updates_resume() {
    let (mut stack, _backends) = echo_with_two_backends().await;

    stack.control_plane.kill();
    let answers = stack.requests("echo", 300, 4).await;
    assert!(
        answers.iter().all(|answer| answer.status == 200),
        "requests failed while the control plane was down"
    );

    // Registered while the control plane is down: picked up once it is back.
    let _b3 = stack.backend("echo", "b3").await;
    let dir = stack.dir.path().to_path_buf();
    stack.control_plane.restart(&stack.zookeeper, &dir).await;
    stack.control_plane.wait_until_serving().await;
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zookeeper_crash_serves_the_last_list_marked_stale_until_it_returns() {
    let (mut stack, _backends) = echo_with_two_backends().await;

    stack.zookeeper.crash();
    let health = stack
        .control_plane
        .wait_for_status("stale", Duration::from_secs(30))
        .await;
    assert_eq!(health["zookeeper"], "disconnected");
    assert_eq!(
        health["services"], 1,
        "the last list is still served: {health}"
    );
    let answers = stack.requests("echo", 300, 4).await;
    assert!(
        answers.iter().all(|answer| answer.status == 200),
        "requests failed while ZooKeeper was down"
    );

    stack.zookeeper.restart().await;
    stack
        .control_plane
        .wait_for_status("serving", Duration::from_secs(60))
        .await;
    let _b3 = stack.backend("echo", "b3").await;
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_plane_restarted_without_zookeeper_does_not_empty_envoy() {
    let (mut stack, _backends) = echo_with_two_backends().await;

    // The new process cannot read ZooKeeper, so it knows of no service at all.
    stack.zookeeper.crash();
    stack.control_plane.stop();
    let dir = stack.dir.path().to_path_buf();
    stack.control_plane.restart(&stack.zookeeper, &dir).await;
    let health = stack.control_plane.health().await.expect("health");
    assert_eq!(health["status"], "starting", "{health}");

    // Envoy opens its ADS stream to it again (the filter's poll is held there too, as the new
    // process has nothing to publish); both keep what they had.
    stack
        .control_plane
        .wait_for_ads_stream(Duration::from_secs(30))
        .await;
    let answers = stack.requests("echo", 300, 4).await;
    assert!(
        answers.iter().all(|answer| answer.status == 200),
        "requests failed after an unsynced control plane answered"
    );

    stack.zookeeper.restart().await;
    stack.control_plane.wait_until_serving().await;
    let _b3 = stack.backend("echo", "b3").await;
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_session_is_replaced_and_the_registry_followed_again() {
    let (stack, _backends) = echo_with_two_backends().await;

    // A control plane frozen past its session timeout comes back to an expired session.
    stack.control_plane.freeze();
    let answers = stack.requests("echo", 200, 4).await;
    // Not a wait for a condition: the outage itself must outlast the session timeout.
    tokio::time::sleep(SESSION_TIMEOUT * 2).await;
    stack.control_plane.thaw();
    assert!(
        answers.iter().all(|answer| answer.status == 200),
        "requests failed while the control plane was frozen"
    );

    // Right after the thaw it still reports the state it had before the freeze: wait for the
    // new session, then for it to serve.
    eventually(
        Duration::from_secs(30),
        "a new session replaces the expired one",
        || async {
            if stack
                .control_plane
                .log()
                .contains("ZooKeeper session lost; opening a new one")
            {
                Ok(())
            } else {
                Err("the expired session is still in use".to_string())
            }
        },
    )
    .await;
    stack
        .control_plane
        .wait_for_status("serving", Duration::from_secs(30))
        .await;
    let _b3 = stack.backend("echo", "b3").await;
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
}

/// Instances that vanish while the control plane is cut off from ZooKeeper are, on reconnection,
/// more likely a ZooKeeper mishap than a fleet going away: a large drop is held back for twice
/// the session timeout, then published if it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sudden_drop_after_reconnecting_is_held_back_then_published_if_it_lasts() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let relay = Relay::start(zookeeper.connect.parse().expect("a socket address")).await;
    let registrar = zookeeper.client().await;
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    registrar
        .mkdir("/services/orders", &persistent)
        .await
        .expect("creating the service");
    for port in 9001..=9004 {
        let instance = format!(r#"{{"id": "i{port}", "address": "127.0.0.1", "port": {port}}}"#);
        registrar
            .create(
                &format!("/services/orders/i{port}"),
                instance.as_bytes(),
                &persistent,
            )
            .await
            .expect("registering");
    }
    let control_plane = ControlPlane::launch_at(
        zklb_tests::stack::free_port(),
        &relay.address.to_string(),
        "/services",
        dir.path(),
    )
    .await;
    control_plane.wait_until_serving().await;
    let instances = |list: &serde_json::Value| {
        list["services"]["orders"]["instances"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let list = control_plane.get("/v1/services").await.expect("list");
    assert_eq!(instances(&list), 4);

    // Cut off for less than the session timeout: the session survives, three instances do not.
    relay.cut();
    control_plane
        .wait_for_status("stale", Duration::from_secs(10))
        .await;
    for port in 9001..=9003 {
        registrar
            .delete(&format!("/services/orders/i{port}"), None)
            .await
            .expect("deleting");
    }
    relay.heal();
    let held = eventually(Duration::from_secs(10), "the drop is held back", || async {
        let readiness = control_plane.get("/readyz").await?;
        let reason = readiness["reason"].as_str().unwrap_or_default();
        if reason.contains("fell from 4 to 1") {
            Ok(std::time::Instant::now())
        } else {
            Err(readiness.to_string())
        }
    })
    .await;
    let list = control_plane.get("/v1/services").await.expect("list");
    assert_eq!(
        instances(&list),
        4,
        "the drop was published at once: {list}"
    );
    assert_eq!(list["stale"], true);

    control_plane.wait_until_serving().await;
    let list = control_plane.get("/v1/services").await.expect("list");
    assert_eq!(
        instances(&list),
        1,
        "the lasting drop was not published: {list}"
    );
    println!(
        "the drop was held for {:.1} s after it was first reported",
        held.elapsed().as_secs_f64()
    );
}
