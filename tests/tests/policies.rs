//! Envoy follows the filter's choice: weighted shares that Envoy's own random fallback could not
//! produce, and every request at the upstream the filter put first.

use std::time::Duration;

use zklb_tests::stats::{chi_square, fits_shares};
use zklb_tests::{eventually, Stack};
use zookeeper_client::{Acls, CreateMode};

/// Registers an instance of `service` for each of `ports` (the processes already serve), with
/// `extra` fields merged into its Curator JSON (a payload with weight or zone, a registration
/// time), as Spring Cloud and Dubbo 3 write them.
async fn register_instances(
    stack: &Stack,
    service: &str,
    ports: &[u16],
    extra: impl Fn(usize) -> serde_json::Value,
) {
    let zookeeper = stack.zookeeper.client().await;
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let directory = format!("{}/{service}", stack.root);
    zookeeper
        .mkdir(&directory, &persistent)
        .await
        .expect("creating the service");
    for (i, port) in ports.iter().enumerate() {
        let mut instance = serde_json::json!({
            "id": format!("w{port}"), "address": "127.0.0.1", "port": port,
        });
        if let (Some(instance), serde_json::Value::Object(extra)) =
            (instance.as_object_mut(), extra(i))
        {
            instance.extend(extra);
        }
        zookeeper
            .create(
                &format!("{directory}/w{port}"),
                &serde_json::to_vec(&instance).expect("json"),
                &persistent,
            )
            .await
            .expect("registering");
    }
}

/// The shares of `ids` among `answers`.
fn shares_of(answers: &[zklb_tests::stack::Answer], ids: &[&str]) -> Vec<u64> {
    let counts = Stack::count_by_backend(answers);
    ids.iter()
        .map(|id| counts.get(*id).copied().unwrap_or(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weighted_random_shares_follow_the_registry_weights_through_envoy() {
    let stack = Stack::start_with_router_options(r#""policy": "weighted_random""#).await;
    // The backends register themselves under a service of their own; the weighted service
    // names the same processes with weights.
    let backends = [
        stack.backend("plain", "b1").await,
        stack.backend("plain", "b2").await,
        stack.backend("plain", "b3").await,
    ];
    let ports: Vec<u16> = backends.iter().map(|backend| backend.port).collect();
    let weights = [1, 2, 5];
    register_instances(
        &stack,
        "weighted",
        &ports,
        |i| serde_json::json!({"payload": {"metadata": {"weight": weights[i].to_string()}}}),
    )
    .await;
    stack
        .wait_for_backends("weighted", &["b1", "b2", "b3"])
        .await;

    let answers = stack.requests("weighted", 4_000, 8).await;
    assert!(answers.iter().all(|answer| answer.status == 200));
    let counts = Stack::count_by_backend(&answers);
    let observed: Vec<u64> = ["b1", "b2", "b3"]
        .iter()
        .map(|id| counts.get(*id).copied().unwrap_or(0))
        .collect();
    let shares: Vec<f64> = weights
        .iter()
        .map(|&weight| f64::from(weight) / 8.0)
        .collect();
    println!(
        "weights {weights:?}: shares {observed:?}, chi-square {:.2}",
        chi_square(&observed, &shares)
    );
    // Envoy's random fallback would spread evenly: these shares come from the filter's picks.
    assert!(
        fits_shares(&observed, &shares),
        "shares {observed:?} do not follow weights {weights:?}"
    );

    // The picks are counted in Envoy's stats, per service and policy, and so are refusals.
    stack
        .envoy
        .stat_reaches("wasmcustom.zklb.picks.weighted.weighted_random", 4_000)
        .await;
    let refused = "wasmcustom.zklb.refused.unknown_service";
    let before = stack.envoy.stat(refused).await;
    assert_eq!(stack.request("nosuch", &[]).await.status, 404);
    assert_eq!(
        stack.envoy.stat_reaches(refused, before + 1).await,
        before + 1
    );
    let version = stack.control_plane.get("/v1/services").await.expect("list")["version"].as_u64();
    assert_eq!(
        Some(stack.envoy.stat("wasmcustom.zklb.list_version").await),
        version,
        "the filter's list version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_reaches_the_filters_first_candidate() {
    let stack = Stack::start_with_router_options(r#""debug_headers": true"#).await;
    let _backends = stack.serving("echo", &["b1", "b2", "b3"]).await;

    let retries = format!(
        "cluster.{}.upstream_rq_retry",
        zklb_wire::cluster_name("echo")
    );
    let retries_before = stack.envoy.stat(&retries).await;
    let answers = stack.requests("echo", 900, 6).await;
    assert_eq!(
        stack.envoy.stat(&retries).await,
        retries_before,
        "a retry went to another candidate"
    );
    let mut firsts = std::collections::BTreeMap::new();
    for answer in &answers {
        assert_eq!(answer.status, 200, "{answer:?}");
        let candidates = answer
            .header(zklb_wire::CANDIDATES_HEADER)
            .unwrap_or_else(|| panic!("no candidates in {answer:?}"));
        let first = candidates.split(',').next().unwrap_or_default();
        assert_eq!(
            answer.header(zklb_wire::UPSTREAM_HEADER),
            Some(first),
            "Envoy did not follow the filter's first candidate: {answer:?}"
        );
        *firsts.entry(first.to_string()).or_insert(0u64) += 1;
    }
    println!("first candidates, each the upstream that answered: {firsts:?}");
    assert_eq!(
        firsts.len(),
        3,
        "every backend was somebody's first candidate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_rules_map_requests_by_path_header_host_suffix_and_default() {
    let stack = Stack::start_with_router_options(
        r#""routes": [
            {"path_prefix": "/api/orders/", "service": "orders", "strip_prefix": true},
            {"header": "x-service"},
            {"host": "*.svc.internal"}
        ], "default_service": "web""#,
    )
    .await;
    let _backends = [
        stack.backend("orders", "o1").await,
        stack.backend("billing", "b1").await,
        stack.backend("web", "w1").await,
    ];
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", stack.envoy.listen_port);
    let ask = |path: String, host: &'static str, header: Option<&'static str>| {
        let mut request = stack.http.get(path).header("host", host);
        if let Some(service) = header {
            request = request.header("x-service", service);
        }
        async move { zklb_tests::stack::Answer::of(request.send().await).await }
    };
    // web registered last: once it answers, the filter has the others too.
    eventually(
        Duration::from_secs(20),
        "the services are routable",
        || async {
            let answer = ask(url("/"), "www.example.com", None).await;
            if answer.backend() == Some("w1") {
                Ok(())
            } else {
                Err(format!("{answer:?}"))
            }
        },
    )
    .await;
    let answer = ask(url("/api/orders/17"), "shop.example", None).await;
    assert_eq!(answer.backend(), Some("o1"));
    assert_eq!(answer.body["path"], "/17", "the prefix is stripped");

    let by_header = ask(url("/api/orders/17"), "x", Some("billing")).await;
    assert_eq!(
        by_header.backend(),
        Some("o1"),
        "the first matching rule wins"
    );
    let by_header = ask(url("/pay"), "x", Some("billing")).await;
    assert_eq!(
        (by_header.backend(), &by_header.body["path"]),
        (Some("b1"), &serde_json::json!("/pay"))
    );
    let by_suffix = ask(url("/"), "billing.svc.internal:8080", None).await;
    assert_eq!(by_suffix.backend(), Some("b1"));
    let by_default = ask(url("/"), "www.example.com", None).await;
    assert_eq!(by_default.backend(), Some("w1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_request_counts_requests_in_flight_across_workers() {
    let stack = Stack::start_with_router_options(r#""policy": "least_request""#).await;
    let _backends = stack.serving("echo", &["b1", "b2", "b3"]).await;
    let answers = stack.requests("echo", 600, 8).await;
    assert!(answers.iter().all(|answer| answer.status == 200));
    let counts = Stack::count_by_backend(&answers);
    assert_eq!(counts.len(), 3, "every backend served: {counts:?}");
    stack
        .envoy
        .stat_reaches("wasmcustom.zklb.picks.echo.least_request", 600)
        .await;
    // A gauge per host, and every request that ended left it.
    let gauges = stack
        .envoy
        .admin_json(r"/stats?format=json&filter=^wasmcustom\.zklb\.inflight\.")
        .await
        .expect("stats");
    assert_eq!(
        gauges["stats"].as_array().map(Vec::len),
        Some(3),
        "one in-flight gauge per backend: {gauges}"
    );
    let in_flight = stack.envoy.stat_sum(r"^wasmcustom\.zklb\.inflight\.").await;
    assert_eq!(in_flight, 0, "requests still counted in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_callers_zone_is_served_first() {
    let stack = Stack::start_with_router_options(r#""zone": "eu-1a""#).await;
    let backends = stack.serving("plain", &["a1", "a2", "b1", "b2"]).await;
    let ports: Vec<u16> = backends.iter().map(|backend| backend.port).collect();
    register_instances(&stack, "zoned", &ports, |i| {
        let zone = if i < 2 { "eu-1a" } else { "eu-1b" };
        serde_json::json!({"payload": {"metadata": {"zone": zone}}})
    })
    .await;
    stack.wait_for_backends("zoned", &["a1", "a2"]).await;
    let answers = stack.requests("zoned", 400, 4).await;
    let observed = shares_of(&answers, &["a1", "a2", "b1", "b2"]);
    println!("zone eu-1a first: shares {observed:?}");
    assert_eq!(
        &observed[2..],
        [0, 0],
        "another zone served while eu-1a had hosts"
    );
    assert!(fits_shares(&observed[..2], &[0.5, 0.5]), "{observed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warming_instance_gets_a_share_that_grows_with_its_age() {
    let stack = Stack::start_with_router_options(r#""warmup_seconds": 600"#).await;
    let backends = stack.serving("plain", &["new", "old1", "old2"]).await;
    let ports: Vec<u16> = backends.iter().map(|backend| backend.port).collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as i64;
    // "new" registered a quarter of the window ago, the others long before.
    register_instances(&stack, "warming", &ports, |i| {
        let registered = if i == 0 {
            now_ms - 150_000
        } else {
            now_ms - 3_600_000
        };
        serde_json::json!({"registrationTimeUTC": registered})
    })
    .await;
    stack
        .wait_for_backends("warming", &["new", "old1", "old2"])
        .await;
    let answers = stack.requests("warming", 3_000, 8).await;
    let observed = shares_of(&answers, &["new", "old1", "old2"]);
    // Shares 0.25 : 1 : 1, give or take the few seconds the test takes.
    let shares = [0.25 / 2.25, 1.0 / 2.25, 1.0 / 2.25];
    println!(
        "warming at a quarter of the window: shares {observed:?}, chi-square {:.2}",
        chi_square(&observed, &shares)
    );
    assert!(fits_shares(&observed, &shares), "{observed:?}");
}
