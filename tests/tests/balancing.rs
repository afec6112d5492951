//! The filter's picks: uniform over the registered instances, following ZooKeeper as instances
//! come and go.

use std::time::Duration;

use zklb_tests::stats::{chi_square_uniform, is_uniform};
use zklb_tests::{eventually, Stack};

const RETRIES: &str = "cluster.zklb_service_echo.upstream_rq_retry";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_backends_share_traffic_uniformly() {
    let stack = Stack::start().await;
    let _backends = stack.serving("echo", &["b1", "b2", "b3"]).await;

    let answers = stack.requests("echo", 3_000, 8).await;

    assert!(
        answers.iter().all(|answer| answer.status == 200),
        "every request succeeds"
    );
    let counts = Stack::count_by_backend(&answers);
    let observed: Vec<u64> = ["b1", "b2", "b3"]
        .iter()
        .map(|id| counts.get(*id).copied().unwrap_or(0))
        .collect();
    assert_eq!(observed.iter().sum::<u64>(), 3_000);
    println!(
        "shares {observed:?}, chi-square {:.2}",
        chi_square_uniform(&observed)
    );
    assert!(
        is_uniform(&observed),
        "shares {observed:?} are not uniform (chi-square {:.2}, critical 13.816 at p = 0.001)",
        chi_square_uniform(&observed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_follows_registrations_and_deregistrations() {
    let stack = Stack::start().await;
    let b1 = stack.backend("echo", "b1").await;
    let mut b2 = stack.backend("echo", "b2").await;
    let mut b3 = stack.backend("echo", "b3").await;
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
    let first_version = echo_version(&stack).await;

    // A fourth instance registers: it gets traffic.
    let _b4 = stack.backend("echo", "b4").await;
    stack
        .wait_for_backends("echo", &["b1", "b2", "b3", "b4"])
        .await;

    // b2's registration disappears while its process keeps running: it gets nothing more. Its
    // agent is gone first (killed: its session, and the znode, would outlive it), or it would
    // register b2 again.
    b2.kill_agent();
    let operator = stack.zookeeper.client().await;
    operator
        .delete(&b2.znode, None)
        .await
        .expect("deleting b2's znode");
    stack.wait_for_backends("echo", &["b1", "b3", "b4"]).await;
    let (b2_before, _) = b2.stats().await;
    let answers = stack.requests("echo", 300, 4).await;
    assert!(answers.iter().all(|answer| answer.status == 200));
    let (b2_after, _) = b2.stats().await;
    assert_eq!(
        b2_after, b2_before,
        "a deregistered backend received requests"
    );

    // b3 stops: its agent drains and deregisters it, and no attempt is wasted on it.
    b3.stop();
    stack.wait_for_backends("echo", &["b1", "b4"]).await;
    let retries_before = stack.envoy.stat(RETRIES).await;
    let answers = stack.requests("echo", 300, 4).await;
    assert!(answers.iter().all(|answer| answer.status == 200));
    assert_eq!(
        stack.envoy.stat(RETRIES).await,
        retries_before,
        "requests were retried after b3 left"
    );
    let (b1_requests, _) = b1.stats().await;
    assert!(b1_requests > 0);

    // The control plane agrees, with a version that moved forward.
    let listing: serde_json::Value = eventually(
        Duration::from_secs(10),
        "the registry lists b1 and b4",
        || async {
            let listing = stack.control_plane.get("/v1/services/echo").await?;
            let ids: Vec<&str> = listing["instances"]
                .as_array()
                .map(|instances| instances.iter().filter_map(|i| i["id"].as_str()).collect())
                .unwrap_or_default();
            if ids == ["b1", "b4"] || ids == ["b4", "b1"] {
                Ok(listing.clone())
            } else {
                Err(format!("instances {ids:?}"))
            }
        },
    )
    .await;
    assert!(listing["version"].as_i64().expect("version") > first_version);
}

async fn echo_version(stack: &Stack) -> i64 {
    let listing = stack
        .control_plane
        .get("/v1/services/echo")
        .await
        .expect("GET /v1/services/echo");
    listing["version"].as_i64().expect("version")
}

/// An instance taken out of rotation (Curator's `enabled: false`) is drained: no new requests
/// within moments, and back in rotation when it is enabled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disabled_instance_is_drained_and_returns_when_enabled() {
    let stack = Stack::start().await;
    let backends = stack.serving("echo", &["b1", "b2", "b3"]).await;

    let zookeeper = stack.zookeeper.client().await;
    let set_enabled = |enabled: bool| {
        let zookeeper = &zookeeper;
        let znode = backends[2].znode.clone();
        async move {
            let (data, _) = zookeeper.get_data(&znode).await.expect("reading b3");
            let mut instance: serde_json::Value = serde_json::from_slice(&data).expect("json");
            instance["enabled"] = serde_json::json!(enabled);
            zookeeper
                .set_data(&znode, &serde_json::to_vec(&instance).expect("json"), None)
                .await
                .expect("writing b3");
        }
    };
    set_enabled(false).await;
    stack.wait_for_backends("echo", &["b1", "b2"]).await;
    let listing = stack
        .control_plane
        .get("/v1/services/echo")
        .await
        .expect("echo");
    let b3 = listing["instances"]
        .as_array()
        .and_then(|instances| instances.iter().find(|instance| instance["id"] == "b3"))
        .cloned()
        .expect("b3 stays registered");
    assert_eq!(b3["status"], "draining");

    set_enabled(true).await;
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
}
