//! Envoy's membership arrives over one incremental ADS stream: every service cluster with its
//! members, a change sends only what it touches, and nothing can empty Envoy.

use std::time::Duration;

use zklb_tests::proxy::Relay;
use zklb_tests::stack::Answer;
use zklb_tests::{eventually, ControlPlane, Envoy, Stack, ZooKeeper};
use zookeeper_client::{Acls, CreateMode, MultiWriter};

/// The names of Envoy's dynamic clusters, from its config dump.
async fn dynamic_clusters(stack: &Stack) -> Result<Vec<String>, String> {
    let dump = stack
        .envoy
        .admin_json("/config_dump?resource=dynamic_active_clusters")
        .await?;
    let mut names: Vec<String> = dump["configs"]
        .as_array()
        .ok_or("no configs in the config dump")?
        .iter()
        .filter_map(|config| config["cluster"]["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// The `ip:port` of every member of `cluster`, from Envoy's `/clusters`.
async fn members(stack: &Stack, cluster: &str) -> Result<Vec<String>, String> {
    let clusters = stack.envoy.admin_json("/clusters?format=json").await?;
    let status = clusters["cluster_statuses"]
        .as_array()
        .ok_or("no cluster statuses")?
        .iter()
        .find(|status| status["name"] == cluster)
        .ok_or_else(|| format!("Envoy has no cluster {cluster}"))?;
    let mut hosts: Vec<String> = status["host_statuses"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|host| {
            let address = &host["address"]["socket_address"];
            format!(
                "{}:{}",
                address["address"].as_str().unwrap_or("?"),
                address["port_value"]
            )
        })
        .collect();
    hosts.sort();
    Ok(hosts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_gets_every_service_cluster_and_its_members_over_one_ads_stream() {
    let stack = Stack::start().await;
    let echo = [
        stack.backend("echo", "e1").await,
        stack.backend("echo", "e2").await,
    ];
    let orders = stack.backend("orders", "o1").await;
    stack.wait_for_backends("echo", &["e1", "e2"]).await;
    stack.wait_for_backends("orders", &["o1"]).await;

    let clusters = dynamic_clusters(&stack).await.expect("config dump");
    assert_eq!(clusters, ["zklb_service_echo", "zklb_service_orders"]);
    let dump = stack
        .envoy
        .admin_json("/config_dump?resource=dynamic_active_clusters")
        .await
        .expect("config dump");
    for config in dump["configs"].as_array().expect("configs") {
        let eds = &config["cluster"]["eds_cluster_config"]["eds_config"];
        assert!(eds.get("ads").is_some(), "members not over ADS: {eds}");
    }
    let mut expected: Vec<String> = echo
        .iter()
        .map(|backend| format!("127.0.0.1:{}", backend.port))
        .collect();
    expected.sort();
    assert_eq!(members(&stack, "zklb_service_echo").await, Ok(expected));
    assert_eq!(
        members(&stack, "zklb_service_orders").await,
        Ok(vec![format!("127.0.0.1:{}", orders.port)])
    );
    // One gRPC stream, delta protocol, and Envoy accepted everything it was sent.
    assert_eq!(stack.envoy.stat("control_plane.connected_state").await, 1);
    assert_eq!(stack.control_plane.metric("zklb_xds_streams").await, 1.0);
    assert_eq!(
        stack
            .control_plane
            .metric(r#"zklb_xds_rejections_total{type="cluster"}"#)
            .await
            + stack
                .control_plane
                .metric(r#"zklb_xds_rejections_total{type="endpoints"}"#)
                .await,
        0.0
    );
    assert_eq!(
        stack
            .envoy
            .stat("cluster_manager.cds.update_rejected")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_services_reach_envoy_and_one_change_resends_only_its_members() {
    const SERVICES: usize = 1_000;
    let stack = Stack::start().await;
    let zookeeper = stack.zookeeper.client().await;
    let instance = |port: usize| {
        format!(r#"{{"id": "i{port}", "address": "127.0.0.1", "port": {port}}}"#).into_bytes()
    };
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    // Batches of one transaction each keep every request well below ZooKeeper's 1 MiB limit.
    for batch in (0..SERVICES).collect::<Vec<_>>().chunks(100) {
        let mut writer: MultiWriter = zookeeper.new_multi_writer();
        for &n in batch {
            let service = format!("{}/bulk-{n:04}", stack.root);
            writer
                .add_create(&service, b"", &persistent)
                .expect("queueing a service");
            writer
                .add_create(&format!("{service}/i0"), &instance(20_000 + n), &persistent)
                .expect("queueing an instance");
        }
        writer.commit().await.expect("creating a batch of services");
    }
    eventually(
        Duration::from_secs(90),
        "Envoy has a cluster for every service",
        || async {
            let active = stack.envoy.stat("cluster_manager.active_clusters").await;
            // The control plane's own static cluster is the one more.
            if active == SERVICES as u64 + 1 {
                Ok(())
            } else {
                Err(format!("{active} active clusters"))
            }
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "every cluster has its member",
        || async {
            let total = stack
                .envoy
                .stat_sum(r"^cluster\.zklb_service_bulk-[0-9]+\.membership_total$")
                .await;
            if total == SERVICES as u64 {
                Ok(())
            } else {
                Err(format!("{total} members"))
            }
        },
    )
    .await;

    let sent = |kind: &'static str| {
        let control_plane = &stack.control_plane;
        async move {
            control_plane
                .metric(&format!(
                    r#"zklb_xds_resources_sent_total{{type="{kind}"}}"#
                ))
                .await
        }
    };
    let (clusters_before, endpoints_before) = (sent("cluster").await, sent("endpoints").await);
    zookeeper
        .create(
            &format!("{}/bulk-0500/i1", stack.root),
            &instance(30_500),
            &persistent,
        )
        .await
        .expect("adding an instance");
    eventually(
        Duration::from_secs(10),
        "the new member reaches Envoy",
        || async {
            let members = stack
                .envoy
                .stat("cluster.zklb_service_bulk-0500.membership_total")
                .await;
            if members == 2 {
                Ok(())
            } else {
                Err(format!("{members} members"))
            }
        },
    )
    .await;
    let clusters_sent = sent("cluster").await - clusters_before;
    let endpoints_sent = sent("endpoints").await - endpoints_before;
    println!("one change among {SERVICES} services sent {clusters_sent} clusters and {endpoints_sent} load assignments");
    assert_eq!(clusters_sent, 0.0, "an unchanged cluster was sent again");
    assert_eq!(
        endpoints_sent, 1.0,
        "more than the changed service's members were sent"
    );

    // The filter's poller got, and shared with the workers, that one service alone.
    let published = eventually(
        Duration::from_secs(10),
        "the filter publishes the change",
        || async {
            let log = stack.envoy.log();
            let last = log
                .lines()
                .rfind(|line| line.contains("published version"))
                .unwrap_or_default()
                .to_string();
            if last.contains("1000 services, 1 changed, 0 removed") {
                Ok(last)
            } else {
                Err(last)
            }
        },
    )
    .await;
    println!("{published}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_root_keeps_envoy_routing_and_readiness_says_why() {
    let stack = Stack::start().await;
    let mut backend = stack.backend("echo", "e1").await;
    stack.wait_for_backends("echo", &["e1"]).await;
    // Its agent is gone (killed: its znode stays with its session), or it would register e1
    // again, and the root with it.
    backend.kill_agent();

    // Everything under the root goes in one transaction, so that no intermediate state (an
    // empty service) is ever read: the control plane sees the root vanish at once.
    let zookeeper = stack.zookeeper.client().await;
    let mut writer = zookeeper.new_multi_writer();
    writer.add_delete(&backend.znode, None).expect("queueing");
    writer
        .add_delete(&format!("{}/echo", stack.root), None)
        .expect("queueing");
    writer.add_delete(&stack.root, None).expect("queueing");
    writer.commit().await.expect("deleting the root");

    let readiness = eventually(
        Duration::from_secs(10),
        "the control plane is no longer ready",
        || async {
            let readiness = stack.control_plane.get("/readyz").await?;
            if readiness["ready"] == false {
                Ok(readiness)
            } else {
                Err(readiness.to_string())
            }
        },
    )
    .await;
    assert!(
        readiness["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("/services does not exist")),
        "{readiness}"
    );
    let answers = stack.requests("echo", 200, 4).await;
    assert!(
        answers
            .iter()
            .all(|answer| answer.status == 200 && answer.backend() == Some("e1")),
        "requests failed after the root was deleted: {:?}",
        answers.iter().find(|answer| answer.status != 200)
    );
    assert_eq!(
        members(&stack, "zklb_service_echo").await,
        Ok(vec![format!("127.0.0.1:{}", backend.port)])
    );
    let list = stack.control_plane.get("/v1/services").await.expect("list");
    assert_eq!(
        list["services"]["echo"]["instances"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(list["stale"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_root_at_start_publishes_nothing_until_it_exists() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::launch(&zookeeper, "/absent", dir.path()).await;
    let readiness = eventually(
        Duration::from_secs(10),
        "readiness names the missing root",
        || async {
            let readiness = control_plane.get("/readyz").await?;
            let names_root = readiness["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("/absent does not exist"));
            if names_root {
                Ok(readiness)
            } else {
                Err(readiness.to_string())
            }
        },
    )
    .await;
    assert_eq!(readiness["ready"], false);
    let list = control_plane.get("/v1/services").await.expect("list");
    assert_eq!(
        list["error"],
        "the control plane has not read ZooKeeper yet"
    );

    let client = zookeeper.client().await;
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    client
        .create("/absent", b"", &persistent)
        .await
        .expect("creating the root");
    client
        .create("/absent/echo", b"", &persistent)
        .await
        .expect("creating a service");
    control_plane.wait_until_serving().await;
    // The root and the service are two writes: a version with the root alone may be published
    // between them, so the service is waited for rather than expected in the first list.
    let list = eventually(
        Duration::from_secs(10),
        "the service under the new root is listed",
        || async {
            let list = control_plane.get("/v1/services").await?;
            if list["services"]["echo"].is_object() {
                Ok(list)
            } else {
                Err(list.to_string())
            }
        },
    )
    .await;
    assert_eq!(list["stale"], false);
}

/// What a client may see for a service that is being created: the filter's own JSON answers
/// while it does not know the service or its instances yet, then the backend. Anything else
/// (Envoy's plain 503 for a cluster it does not have yet, or for a cluster without members) is
/// a request that failed because the filter got ahead of Envoy.
fn documented(answer: &Answer) -> bool {
    let error = answer.body["error"].as_str().unwrap_or_default();
    match answer.status {
        200 => answer.backend().is_some(),
        404 => error.starts_with("no service named"),
        503 => error.ends_with("has no available instances"),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_new_services_under_load_costs_no_failed_request() {
    const SERVICES: usize = 50;
    const CLIENTS: usize = 8;
    let stack = Stack::start().await;
    let backend = stack.backend("steady", "s1").await;
    stack.wait_for_backends("steady", &["s1"]).await;
    let names: Vec<String> = (0..SERVICES).map(|n| format!("burst-{n:02}")).collect();

    // Clients ask for every new service in turn from before it exists until each has been
    // served, bounded in time and count.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let http = stack.http.clone();
        let url = format!("http://127.0.0.1:{}/hello", stack.envoy.listen_port);
        let names = names.clone();
        clients.spawn(async move {
            let mut served = std::collections::BTreeSet::new();
            let mut answers = Vec::new();
            for next in client..client + 200_000 {
                if served.len() == names.len() || std::time::Instant::now() > deadline {
                    break;
                }
                let name = &names[next % names.len()];
                let answer = Answer::of(http.get(&url).header("host", name).send().await).await;
                if answer.status == 200 {
                    served.insert(name.clone());
                }
                answers.push(answer);
            }
            (served.len(), answers)
        });
    }

    let zookeeper = stack.zookeeper.client().await;
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let instance = format!(
        r#"{{"id": "i", "address": "127.0.0.1", "port": {}}}"#,
        backend.port
    );
    for name in &names {
        let service = format!("{}/{name}", stack.root);
        let mut writer = zookeeper.new_multi_writer();
        writer
            .add_create(&service, b"", &persistent)
            .expect("queueing");
        writer
            .add_create(&format!("{service}/i"), instance.as_bytes(), &persistent)
            .expect("queueing");
        writer.commit().await.expect("creating a service");
    }

    let mut answers = Vec::new();
    while let Some(done) = clients.join_next().await {
        let (served, client_answers) = done.expect("client task");
        assert_eq!(
            served, SERVICES,
            "a client did not get every new service served"
        );
        answers.extend(client_answers);
    }
    let failed: Vec<_> = answers
        .iter()
        .filter(|answer| !documented(answer))
        .collect();
    let count = |status| {
        answers
            .iter()
            .filter(|answer| answer.status == status)
            .count()
    };
    println!(
        "{} requests during the burst: {} served, {} 404 before the service was known, {} 503 before it had instances, {} failed",
        answers.len(),
        count(200),
        count(404),
        count(503),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(5)]
    );
}

/// Every registry version the filter's poller published, in order, from Envoy's log.
fn published_versions(envoy: &Envoy) -> Vec<i64> {
    envoy
        .log()
        .lines()
        .filter_map(|line| line.split("published version ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_off_from_zookeeper_never_takes_envoy_or_the_filter_back() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = "/services";
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let fresh = ControlPlane::start(&zookeeper, root, &dir.path().join("fresh")).await;
    let zookeeper_address = zookeeper.connect.parse().expect("a socket address");
    let relay = Relay::start(zookeeper_address).await;

    // Envoy streams from the fresh replica first: the other is not running yet.
    let lagging_port = zklb_tests::stack::free_port();
    let envoy = Envoy::start_with_replicas(&[fresh.port, lagging_port], 2, dir.path()).await;
    fresh.wait_for_ads_stream(Duration::from_secs(30)).await;
    let lagging = ControlPlane::launch_at(
        lagging_port,
        &relay.address.to_string(),
        root,
        &dir.path().join("lagging"),
    )
    .await;
    lagging.wait_until_serving().await;

    let mut stack = Stack::around(zookeeper, fresh, envoy, root, dir).await;
    let _b1 = stack.backend("echo", "b1").await;
    stack.wait_for_backends("echo", &["b1"]).await;

    relay.cut();
    lagging
        .wait_for_status("stale", Duration::from_secs(20))
        .await;
    let _b2 = stack.backend("echo", "b2").await;
    stack.wait_for_backends("echo", &["b1", "b2"]).await;
    let held = members(&stack, "zklb_service_echo")
        .await
        .expect("Envoy holds echo's members");
    assert_eq!(held.len(), 2);
    let filter_versions = published_versions(&stack.envoy);
    let newest = *filter_versions.last().expect("the filter published lists");
    let lagging_version = lagging.get("/v1/services").await.expect("list")["version"].clone();
    assert!(
        lagging_version
            .as_i64()
            .is_some_and(|version| version < newest),
        "the cut-off replica is not behind: {lagging_version} vs {newest}"
    );

    // The fresh replica goes away: Envoy's stream and the filter's polls can only reach the
    // replica that has not seen b2.
    stack.control_plane.stop();
    lagging.wait_for_ads_stream(Duration::from_secs(30)).await;
    let answers = stack.requests("echo", 400, 4).await;
    let counts = Stack::count_by_backend(&answers);
    assert!(
        answers.iter().all(|answer| answer.status == 200),
        "requests failed with the lagging replica alone: {:?}",
        answers.iter().find(|answer| answer.status != 200)
    );
    assert!(
        counts.get("b2").is_some_and(|&count| count > 50),
        "b2 lost its traffic, so Envoy went back to an older membership: {counts:?}"
    );
    assert_eq!(
        members(&stack, "zklb_service_echo").await,
        Ok(held.clone()),
        "Envoy's membership of echo changed while only the lagging replica answered"
    );
    // It held its answers: nothing older than what Envoy had was sent.
    let sent = lagging
        .metric(r#"zklb_xds_responses_total{type="cluster"}"#)
        .await
        + lagging
            .metric(r#"zklb_xds_responses_total{type="endpoints"}"#)
            .await;
    assert_eq!(sent, 0.0, "the lagging replica answered Envoy");
    let versions = published_versions(&stack.envoy);
    assert!(
        versions.windows(2).all(|pair| pair[0] <= pair[1]),
        "the filter's list went back: {versions:?}"
    );
    println!("Envoy kept echo's members {held:?}; the filter published {versions:?}; the lagging replica had version {lagging_version}");

    // Healed, the lagging replica catches up and updates flow through it again.
    relay.heal();
    lagging
        .wait_for_status("serving", Duration::from_secs(30))
        .await;
    let _b3 = stack.backend("echo", "b3").await;
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
}

/// A Curator instance registered with an `sslPort` only is reached with TLS: a real TLS server
/// (`openssl s_server`) answers through Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_with_only_an_ssl_port_is_reached_over_tls() {
    let stack = Stack::start().await;
    let dir = stack.dir.path();
    let certificate = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=secure.internal", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("running openssl req");
    assert!(
        certificate.status.success(),
        "{}",
        String::from_utf8_lossy(&certificate.stderr)
    );
    let port = zklb_tests::stack::free_port();
    let mut server = std::process::Command::new("openssl");
    server
        .args(["s_server", "-www", "-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(dir.join("cert.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"));
    let _server = zklb_tests::process::Child::spawn("tls-server", server, dir);
    eventually(
        Duration::from_secs(10),
        "the TLS server listens",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|error| error.to_string())
        },
    )
    .await;

    let zookeeper = stack.zookeeper.client().await;
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let instance =
        format!(r#"{{"id": "s1", "address": "127.0.0.1", "port": null, "sslPort": {port}}}"#);
    zookeeper
        .mkdir(&format!("{}/secure", stack.root), &persistent)
        .await
        .expect("creating the service");
    zookeeper
        .create(
            &format!("{}/secure/s1", stack.root),
            instance.as_bytes(),
            &persistent,
        )
        .await
        .expect("registering");

    let answer = eventually(
        Duration::from_secs(20),
        "the TLS instance answers",
        || async {
            let answer = stack.request("secure", &[]).await;
            let served_by_openssl = answer
                .body
                .as_str()
                .is_some_and(|body| body.contains("s_server"));
            if answer.status == 200 && served_by_openssl {
                Ok(answer)
            } else {
                Err(format!("{answer:?}"))
            }
        },
    )
    .await;
    let handshakes = stack
        .envoy
        .stat("cluster.zklb_service_secure.ssl.handshake")
        .await;
    assert!(handshakes >= 1, "no TLS handshake: {answer:?}");
}
