//! Failure is normal: a restarting control plane or a crashed ZooKeeper costs no request, and
//! updates resume when they are back.

use std::time::Duration;

use zklb_tests::stack::SESSION_TIMEOUT;
use zklb_tests::{eventually, Backend, Stack};

async fn echo_with_two_backends() -> (Stack, [Backend; 2]) {
    let stack = Stack::start().await;
    let backends = [
        stack.backend("echo", "b1").await,
        stack.backend("echo", "b2").await,
    ];
    stack.wait_for_backends("echo", &["b1", "b2"]).await;
    (stack, backends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traffic_survives_a_control_plane_restart_and_updates_resume() {
    let (mut stack, _backends) = echo_with_two_backends().await;

    stack.control_plane.stop();
    let answers = stack.requests("echo", 300, 4).await;
    assert!(
        answers.iter().all(|answer| answer.status == 200),
        "requests failed while the control plane was down"
    );

    // Registered while the control plane is down: picked up once it is back.
    let _b3 = stack.backend("echo", "b3").await;
    let root = stack.root.clone();
    let dir = stack.dir.path().to_path_buf();
    stack
        .control_plane
        .restart(&stack.zookeeper, &root, &dir)
        .await;
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
    let root = stack.root.clone();
    let dir = stack.dir.path().to_path_buf();
    stack
        .control_plane
        .restart(&stack.zookeeper, &root, &dir)
        .await;
    let health = stack.control_plane.health().await.expect("health");
    assert_eq!(health["status"], "starting", "{health}");

    // Envoy opens its ADS stream to it again (the filter's poll is held there too, as the new
    // process has nothing to publish); both keep what they had.
    eventually(
        Duration::from_secs(30),
        "Envoy streams from the new control plane",
        || async {
            let streams = stack.control_plane.metric("zklb_xds_streams").await;
            if streams == 1.0 {
                Ok(())
            } else {
                Err(format!("{streams} ADS streams"))
            }
        },
    )
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
