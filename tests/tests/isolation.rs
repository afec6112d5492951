//! Clients cannot steer routing: zklb's headers are overwritten and never reach a backend, and
//! no request reaches a cluster that is not a registered service's.

use std::time::Duration;

use zklb_tests::stats::is_uniform;
use zklb_tests::{eventually, Stack};
use zookeeper_client::{Acls, CreateMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_supplied_zklb_headers_are_ignored_and_never_reach_a_backend() {
    let stack = Stack::start().await;
    let backends = stack.serving("echo", &["b1", "b2", "b3"]).await;

    let pinned = format!("127.0.0.1:{}", backends[0].port);
    let answers = stack
        .requests_with(
            "echo",
            &[
                ("x-zklb-candidates", &pinned),
                ("x-zklb-cluster", "zklb_control_plane"),
            ],
            600,
            4,
        )
        .await;

    assert!(answers.iter().all(|answer| answer.status == 200));
    for answer in &answers {
        assert_eq!(
            answer.body["zklb_headers"],
            serde_json::json!([]),
            "a backend saw {answer:?}"
        );
    }
    let counts = Stack::count_by_backend(&answers);
    let observed: Vec<u64> = ["b1", "b2", "b3"]
        .iter()
        .map(|id| counts.get(*id).copied().unwrap_or(0))
        .collect();
    assert!(
        is_uniform(&observed),
        "the client's candidate header steered traffic: {observed:?}"
    );
    for backend in &backends {
        let (_, leaked) = backend.stats().await;
        assert_eq!(leaked, 0, "{} saw zklb headers", backend.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_for_anything_but_a_registered_service_are_refused_with_a_reason() {
    let stack = Stack::start().await;
    let _backend = stack.backend("echo", "b1").await;
    stack.wait_for_backends("echo", &["b1"]).await;

    let attempts: [(&str, &[(&str, &str)]); 4] = [
        ("nosuch", &[]),
        ("zklb_control_plane", &[]),
        (
            "zklb_control_plane",
            &[("x-zklb-cluster", "zklb_control_plane")],
        ),
        (
            "zklb_service_echo",
            &[("x-zklb-cluster", "zklb_service_echo")],
        ),
    ];
    for (host, headers) in attempts {
        let answer = stack.request(host, headers).await;
        assert_eq!(
            answer.status, 404,
            "Host {host} with {headers:?}: {answer:?}"
        );
        let reason = answer.body["error"].as_str().unwrap_or_default();
        assert!(
            reason.contains("no service named"),
            "Host {host}: reason {reason:?}"
        );
    }

    // A known service stays inside its own cluster whatever the client asks for.
    let answer = stack
        .request("echo", &[("x-zklb-cluster", "zklb_control_plane")])
        .await;
    assert_eq!(answer.backend(), Some("b1"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_without_instances_answers_503_with_a_reason() {
    let stack = Stack::start().await;
    let operator = stack.zookeeper.client().await;
    operator
        .mkdir(
            "/services/empty",
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .expect("creating /services/empty");

    // Unknown (404) until the control plane, Envoy and the filter have caught up; then 503.
    eventually(
        Duration::from_secs(30),
        "the empty service answers 503 with a reason",
        || async {
            let answer = stack.request("empty", &[]).await;
            let reason = answer.body["error"].as_str().unwrap_or_default();
            if answer.status == 503
                && reason.contains("service \"empty\" has no available instances")
            {
                Ok(())
            } else {
                Err(format!("{answer:?}"))
            }
        },
    )
    .await;
}

/// ZooKeeper names are case-sensitive, Host headers are not: of `Orders` and `orders`, the one
/// registered first keeps the name, whatever the order they sort in, and the other gets no
/// traffic and is reported as a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_services_differing_only_in_case_the_first_registered_keeps_the_traffic() {
    let stack = Stack::start().await;
    // "orders" sorts after "Orders", and is registered first.
    let _first = stack.serving("orders", &["first"]).await;
    let _second = stack.backend("Orders", "second").await;
    let listing = eventually(
        Duration::from_secs(20),
        "the conflict is reported",
        || async {
            let listing = stack.control_plane.get("/v1/services").await?;
            if listing["conflicts"]["Orders"].is_string() {
                Ok(listing)
            } else {
                Err(listing.to_string())
            }
        },
    )
    .await;
    assert!(listing["services"]["Orders"].is_null(), "{listing}");
    assert!(listing["services"]["orders"].is_object(), "{listing}");
    let answers = stack.requests("ORDERS", 200, 4).await;
    assert!(
        answers
            .iter()
            .all(|answer| answer.backend() == Some("first")),
        "the later service took traffic: {:?}",
        Stack::count_by_backend(&answers)
    );
    assert_eq!(
        stack.control_plane.metric("zklb_service_conflicts").await,
        1.0
    );
}

/// Nothing listens beyond this machine unless configured to: every process of the stack, with
/// its defaults, listens on loopback addresses only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_part_of_the_stack_listens_on_loopback_only() {
    let stack = Stack::start().await;
    let backends = stack.serving("echo", &["b1"]).await;
    let parts = [
        ("ZooKeeper", stack.zookeeper.listening()),
        ("the control plane", stack.control_plane.listening()),
        ("Envoy", stack.envoy.listening()),
        ("a demo backend", backends[0].listening()),
        ("zklb-agent", backends[0].agent.listening()),
    ];
    for (part, addresses) in parts {
        assert!(
            !addresses.is_empty(),
            "{part} listens on nothing that was found"
        );
        assert!(
            addresses
                .iter()
                .all(|address| address.ip().to_canonical().is_loopback()),
            "{part} listens beyond loopback: {addresses:?}"
        );
        println!("{part} listens on {addresses:?}");
    }
}
