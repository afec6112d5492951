//! Instances registered by real client libraries, not by zklb's own code, receive traffic.

use zklb_tests::registrars::CuratorRegistrar;
use zklb_tests::Stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_registered_by_apache_curator_receives_traffic() {
    let stack = Stack::start().await;
    let _b1 = stack.backend("echo", "b1").await;
    // b2 registers itself under another service; Curator registers its address for echo.
    let b2 = stack.backend("elsewhere", "b2").await;
    let _curator = CuratorRegistrar::register(
        &stack.zookeeper,
        &stack.root,
        "echo",
        "curator-1",
        "127.0.0.1",
        b2.port,
        stack.dir.path(),
    )
    .await;

    stack.wait_for_backends("echo", &["b1", "b2"]).await;

    let listing = stack
        .control_plane
        .get("/v1/services/echo")
        .await
        .expect("GET /v1/services/echo");
    let curator = listing["instances"]
        .as_array()
        .and_then(|instances| {
            instances
                .iter()
                .find(|instance| instance["id"] == "curator-1")
        })
        .unwrap_or_else(|| panic!("no curator-1 in {listing}"));
    assert_eq!(curator["port"], b2.port);
    assert_eq!(curator["status"], "up");
    assert_eq!(curator["source"], "curator");
    assert!(
        curator["registered_at"].as_i64().is_some_and(|at| at > 0),
        "{curator}"
    );
}
