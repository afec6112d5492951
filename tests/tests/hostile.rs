//! Hostile input: the HTTP API answers whatever it is sent as its OpenAPI description says
//! (schemathesis), thousands of long-polls and ADS streams cost bounded memory and are released,
//! and a control plane that answers the filter garbage or a huge list leaves requests routed by
//! the last good list.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client as ads, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use zklb_tests::stack::{
    assert_all_served, free_port, render_envoy_config, with_poller_settings, workspace_root,
};
use zklb_tests::{eventually, procfs, ControlPlane, Envoy, Stack, ZooKeeper};
use zookeeper_client::{Acls, CreateMode};

fn temporary_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("zklb-e2e")
        .tempdir()
        .expect("creating a temporary directory")
}

/// Registers a Curator instance of `service` directly in ZooKeeper (persistent: the test owns
/// it), nothing listening behind it.
async fn register(zookeeper: &ZooKeeper, service: &str, id: &str, port: u16) {
    let client = zookeeper.client().await;
    let anyone = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let _ = client
        .create(&format!("/services/{service}"), b"", &anyone)
        .await;
    let instance = json!({"name": service, "id": id, "address": "127.0.0.1", "port": port});
    client
        .create(
            &format!("/services/{service}/{id}"),
            &serde_json::to_vec(&instance).expect("json"),
            &anyone,
        )
        .await
        .unwrap_or_else(|error| panic!("registering {service}/{id}: {error}"));
}

// ---------------------------------------------------------------------------------------------
// The API against its OpenAPI description.

/// Test cases schemathesis generates per operation, with a fixed seed: enough to reach every
/// parameter's odd values (the coverage phase adds its own boundary cases) while the run stays
/// within a couple of minutes on two busy cores.
const SCHEMATHESIS_EXAMPLES: &str = "40";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_generated_and_hostile_requests_as_its_openapi_description_says() {
    let dir = temporary_dir();
    let zookeeper = ZooKeeper::start(dir.path()).await;
    // Holds of a second: the generated long-polls end quickly.
    let control_plane = ControlPlane::start_with(
        &zookeeper,
        &["/services=auto"],
        &["--max-hold-seconds", "1"],
        dir.path(),
    )
    .await;
    register(&zookeeper, "echo", "echo-1", free_port()).await;
    eventually(Duration::from_secs(30), "echo is listed", || async {
        let echo = control_plane.get("/v1/services/echo").await?;
        (echo["name"] == "echo")
            .then_some(())
            .ok_or(echo.to_string())
    })
    .await;

    let report = dir.path().join("schemathesis.xml");
    let output = Command::new(workspace_root().join(".venv/bin/schemathesis"))
        .arg("run")
        .arg(format!("{}/openapi.json", control_plane.url))
        .args(["--checks", "all"])
        .args(["--seed", "20261201"])
        .args(["--max-examples", SCHEMATHESIS_EXAMPLES])
        .args(["--request-timeout", "20"])
        .args(["--workers", "1"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&report)
        .arg("--no-color")
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(dir.path())
        .output()
        .expect("running schemathesis (scripts/setup installs it)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found answers that break the description:\n{printed}"
    );
    let cases = test_cases(&printed);
    eprintln!("schemathesis: {cases} test cases, no failure");
    assert!(cases >= 100, "too few test cases ran: {printed}");

    // What schemathesis does not send, sent as it is. (Bytes that HTTP forbids in a request
    // line, such as DEL, are refused by the HTTP parser itself: a 400 without a body.)
    let long_query = format!("/v1/services?after={}", "1".repeat(20_000));
    for (request, status) in [
        (raw_get("/v1/services/..%2f..%2fetc%2fpasswd"), 404),
        (raw_get("/v1/services/../../etc/passwd"), 404),
        (raw_get("/v1/services/%00%ff%fe"), 400),
        (raw_get("/v1/changes?after=1&wait=%ff"), 400),
        (raw_get("/v1/changes?after=-9223372036854775809"), 400),
        (raw_get(&long_query), 414),
        (raw("DELETE /v1/services HTTP/1.1\r\nhost: x\r\n\r\n"), 405),
        (
            raw("POST /v1/changes HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n"),
            413,
        ),
    ] {
        let (answered, head, body) = send_raw(control_plane.listening()[0], &request).await;
        assert_eq!(answered, status, "{request:?}: {head}{body}");
        let error: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{request:?}: not JSON: {body}"));
        assert!(error["error"].is_string(), "{request:?}: {body}");
        if status == 405 {
            assert!(head.to_lowercase().contains("allow: get,head"), "{head}");
        }
    }
    assert!(
        control_plane.health().await.is_ok(),
        "the control plane still answers"
    );
}

/// The number of test cases schemathesis's summary says it ran (`Test cases:` then
/// `261 generated, 261 passed`).
fn test_cases(printed: &str) -> u64 {
    let mut lines = printed
        .lines()
        .skip_while(|line| line.trim() != "Test cases:");
    lines
        .nth(1)
        .and_then(|line| line.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn raw_get(target: &str) -> String {
    raw(&format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n"))
}

fn raw(request: &str) -> String {
    request.to_string()
}

/// Sends `request` as it is on a new connection; the status, the head and the body answered.
async fn send_raw(address: SocketAddr, request: &str) -> (u16, String, String) {
    let mut connection = TcpStream::connect(address).await.expect("connecting");
    connection
        .write_all(request.as_bytes())
        .await
        .expect("sending");
    let mut reader = BufReader::new(connection);
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line))
            .await
            .expect("an answer within 30 s")
            .expect("reading");
        if read == 0 || line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        head.push_str(&line);
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.expect("the body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Thousands of clients.

const LONG_POLLS: usize = 2_000;
const ADS_STREAMS: usize = 1_000;

/// Room for what one held client may cost the control plane: a connection's buffers and its
/// task. Far above what is measured (see RELIABILITY.md), far below what a leak of one list
/// per client would cost.
const MAX_RESIDENT_KIB_PER_CLIENT: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_long_polls_and_ads_streams_cost_bounded_memory_and_are_released() {
    raise_open_files_limit(2 * (LONG_POLLS + ADS_STREAMS) as u64 + 1_000);
    let dir = temporary_dir();
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start_with(
        &zookeeper,
        &["/services=auto"],
        &["--max-hold-seconds", "300"],
        dir.path(),
    )
    .await;
    register(&zookeeper, "echo", "echo-1", free_port()).await;
    let version = eventually(Duration::from_secs(30), "echo is listed", || async {
        let list = control_plane.get("/v1/services").await?;
        list["services"]["echo"]["name"]
            .is_string()
            .then(|| list["version"].as_i64().unwrap_or(0))
            .ok_or(list.to_string())
    })
    .await;
    let pid = control_plane.pid();
    let files_before = procfs::open_files(pid).expect("open files");
    let resident_before = procfs::resident_kib(pid).expect("resident memory");

    // Long-polls, each on a connection of its own, held until the registry changes.
    let address = control_plane.listening()[0];
    let request = format!("GET /v1/changes?after={version}&wait=300 HTTP/1.1\r\nhost: x\r\n\r\n");
    let polls = connect_all(address, LONG_POLLS, &request).await;
    wait_for_open_files(pid, files_before + LONG_POLLS, "every long-poll is held").await;
    let resident_polls = procfs::resident_kib(pid).expect("resident memory");
    assert_responsive(&control_plane).await;
    // A change answers every one of them: they were held, not dropped.
    register(&zookeeper, "echo", "echo-2", free_port()).await;
    let answered = answers(polls).await;
    assert_eq!(
        answered,
        vec![200; LONG_POLLS].as_slice(),
        "every long-poll answered 200"
    );
    wait_for_open_files(
        pid,
        files_before,
        "the long-polls' connections are released",
    )
    .await;
    let resident_after_polls = procfs::resident_kib(pid).expect("resident memory");

    // ADS streams, each on a connection of its own as every Envoy has.
    let streams = open_ads_streams(&control_plane.url, ADS_STREAMS).await;
    eventually(
        Duration::from_secs(60),
        "every ADS stream is counted",
        || async {
            let open = control_plane.metric("zklb_xds_streams").await;
            (open == ADS_STREAMS as f64)
                .then_some(())
                .ok_or(format!("{open}"))
        },
    )
    .await;
    let resident_streams = procfs::resident_kib(pid).expect("resident memory");
    assert_responsive(&control_plane).await;
    drop(streams);
    eventually(
        Duration::from_secs(60),
        "every ADS stream is closed",
        || async {
            let open = control_plane.metric("zklb_xds_streams").await;
            (open == 0.0).then_some(()).ok_or(format!("{open}"))
        },
    )
    .await;
    wait_for_open_files(
        pid,
        files_before,
        "the ADS streams' connections are released",
    )
    .await;
    let resident_after = procfs::resident_kib(pid).expect("resident memory");

    eprintln!(
        "control plane resident memory: {resident_before} KiB before, {resident_polls} KiB \
         under {LONG_POLLS} long-polls, {resident_after_polls} KiB after them, \
         {resident_streams} KiB under {ADS_STREAMS} ADS streams, {resident_after} KiB after"
    );
    // Memory the allocator keeps after the long-polls is used again by the streams.
    let bound = |from: u64, clients: usize| from + clients as u64 * MAX_RESIDENT_KIB_PER_CLIENT;
    assert!(
        resident_polls <= bound(resident_before, LONG_POLLS),
        "{resident_polls} KiB under long-polls"
    );
    assert!(
        resident_streams <= bound(resident_after_polls, ADS_STREAMS),
        "{resident_streams} KiB under streams"
    );
}

/// Raises this process's soft limit of open files to `wanted` (within the hard limit), for
/// itself and the control plane it starts, which inherits it.
fn raise_open_files_limit(wanted: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let (soft, hard) = limits
        .lines()
        .find_map(|line| {
            let numbers = line.strip_prefix("Max open files")?;
            let mut numbers = numbers.split_whitespace();
            let soft: u64 = numbers.next()?.parse().ok()?;
            let hard = numbers.next()?.parse().unwrap_or(u64::MAX);
            Some((soft, hard))
        })
        .expect("the open files limit");
    if soft >= wanted {
        return;
    }
    assert!(
        hard >= wanted,
        "the hard limit of open files ({hard}) is below {wanted}"
    );
    let status = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string()])
        .arg(format!("--nofile={wanted}:"))
        .status()
        .expect("running prlimit");
    assert!(status.success(), "prlimit failed");
}

/// `count` connections to `address`, each having sent `request`; opened a hundred at a time
/// so that the listen backlog never overflows.
async fn connect_all(address: SocketAddr, count: usize, request: &str) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(count);
    for batch in (0..count).collect::<Vec<_>>().chunks(100) {
        let mut opening = JoinSet::new();
        for _ in batch {
            let request = request.to_string();
            opening.spawn(async move {
                let mut connection = TcpStream::connect(address).await.expect("connecting");
                connection
                    .write_all(request.as_bytes())
                    .await
                    .expect("sending");
                connection
            });
        }
        while let Some(opened) = opening.join_next().await {
            connections.push(opened.expect("connecting task"));
        }
    }
    connections
}

/// The status each connection was answered with, then closed.
async fn answers(connections: Vec<TcpStream>) -> Vec<u16> {
    let mut reading = JoinSet::new();
    for (index, connection) in connections.into_iter().enumerate() {
        reading.spawn(async move {
            let mut line = String::new();
            let mut reader = BufReader::new(connection);
            let read = tokio::time::timeout(Duration::from_secs(60), reader.read_line(&mut line));
            let status = match read.await {
                Ok(Ok(_)) => line.split_whitespace().nth(1).and_then(|s| s.parse().ok()),
                _ => None,
            };
            (index, status.unwrap_or(0))
        });
    }
    let mut statuses = vec![0; reading.len()];
    while let Some(done) = reading.join_next().await {
        let (index, status) = done.expect("reading task");
        statuses[index] = status;
    }
    statuses
}

async fn wait_for_open_files(pid: u32, expected: usize, what: &str) {
    eventually(Duration::from_secs(60), what, || async {
        let open = procfs::open_files(pid).map_err(|error| error.to_string())?;
        // A few files come and go on their own (the ZooKeeper connection, a log rotation).
        if open.abs_diff(expected) <= 5 {
            Ok(())
        } else {
            Err(format!("{open} files open, expected {expected}"))
        }
    })
    .await;
}

/// Other clients are answered while the control plane holds thousands.
async fn assert_responsive(control_plane: &ControlPlane) {
    let health = control_plane.health().await.expect("/healthz answers");
    assert_eq!(health["status"], "serving", "{health}");
    let list = control_plane.get("/v1/services").await.expect("the list");
    assert!(list["services"]["echo"].is_object(), "{list}");
}

type AdsStream = (
    tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
);

/// `count` ADS streams, each on its own connection, once each has had its first answer.
async fn open_ads_streams(url: &str, count: usize) -> Vec<AdsStream> {
    let mut streams = Vec::with_capacity(count);
    for batch in (0..count).collect::<Vec<_>>().chunks(100) {
        let mut opening = JoinSet::new();
        for &index in batch {
            let url = url.to_string();
            opening.spawn(async move { open_ads_stream(url, index).await });
        }
        while let Some(opened) = opening.join_next().await {
            streams.push(opened.expect("opening task"));
        }
    }
    streams
}

async fn open_ads_stream(url: String, index: usize) -> AdsStream {
    let mut client = ads::AggregatedDiscoveryServiceClient::connect(url)
        .await
        .expect("connecting to ADS");
    let (requests, outgoing) = tokio::sync::mpsc::channel(1);
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: format!("load-{index}"),
                ..Node::default()
            }),
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .expect("queueing the subscription");
    let mut responses = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .expect("opening the stream")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(60), responses.message())
        .await
        .expect("the clusters within 60 s")
        .expect("a response");
    assert!(first.is_some(), "stream {index} ended without an answer");
    (requests, responses)
}

// ---------------------------------------------------------------------------------------------
// The filter against a control plane that answers garbage.

/// What the hostile list server answers the filter's polls.
#[derive(Clone)]
enum Lists {
    /// A real control plane's list; a poll for anything newer is held until the mode changes.
    Good(Arc<Vec<u8>>),
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with a list of `bytes` that would drop every service, were it taken.
    Huge(usize),
}

/// The filter's `max_list_bytes` in this test: 1 MiB, so that a list above it stays below the
/// buffer limit of Envoy's own HTTP client.
const MAX_LIST_BYTES: usize = 1 << 20;

/// A list that parses, newer than any, with no service: taking it would empty the filter's.
fn emptying_list(bytes: usize) -> Arc<Vec<u8>> {
    let mut list = br#"{"version": 9223372036854775806, "full": true, "services": {},
        "stale": false, "session": "connected"}"#
        .to_vec();
    list.resize(bytes, b' ');
    Arc::new(list)
}

/// An HTTP/1.1 server on 127.0.0.1 answering `/v1/changes` as `lists` says; stopped when the
/// returned task is aborted (or the test ends).
async fn start_list_server(lists: watch::Receiver<Lists>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let port = listener.local_addr().expect("address").port();
    let server = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((connection, _)) = listener.accept().await {
            connections.spawn(serve_lists(connection, lists.clone()));
        }
    });
    (port, server)
}

async fn serve_lists(connection: TcpStream, mut lists: watch::Receiver<Lists>) {
    let mut connection = BufReader::new(connection);
    loop {
        let mut target = String::new();
        let mut line = String::new();
        while connection.read_line(&mut line).await.unwrap_or(0) > 0 && line != "\r\n" {
            if target.is_empty() {
                target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            }
            line.clear();
        }
        if target.is_empty() {
            return;
        }
        let holding =
            matches!(*lists.borrow_and_update(), Lists::Good(_)) && target.contains("after=");
        // Nothing newer than the good list: held until the mode changes, or answered 304 as the
        // control plane does at the end of a hold.
        let held = !holding || {
            let changed = tokio::time::timeout(Duration::from_secs(30), lists.changed());
            matches!(changed.await, Ok(Ok(())))
        };
        let answer = if held {
            let body = match &*lists.borrow_and_update() {
                Lists::Good(list) => Arc::clone(list),
                Lists::Garbage => Arc::new(b"<html>502 Bad Gateway</html>".to_vec()),
                Lists::Huge(bytes) => emptying_list(*bytes),
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            (head, body)
        } else {
            let head = "HTTP/1.1 304 Not Modified\r\ncontent-length: 0\r\n\r\n".to_string();
            (head, Arc::new(Vec::new()))
        };
        let stream = connection.get_mut();
        let (head, body) = answer;
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&body).await.is_err()
        {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_or_a_huge_list_from_the_control_plane_leaves_the_last_good_list_routing() {
    let dir = temporary_dir();
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let (good_tx, good_rx) = watch::channel(Lists::Garbage);
    let (list_port, list_server) = start_list_server(good_rx).await;
    let listen_port = free_port();
    let admin_port = free_port();
    // The filter's polls go to the hostile server; Envoy's membership (ADS) still comes from
    // the real control plane.
    let config = render_envoy_config(listen_port, admin_port, control_plane.port);
    let config = with_poller_settings(
        &config,
        &format!(r#""control_plane_cluster": "hostile_lists", "max_list_bytes": {MAX_LIST_BYTES}"#),
    );
    let clusters = "  clusters:\n";
    assert!(
        config.contains(clusters),
        "the template has static clusters"
    );
    let hostile_cluster = [
        "  clusters:",
        "    - name: hostile_lists",
        "      type: STATIC",
        "      connect_timeout: 1s",
        "      load_assignment:",
        "        cluster_name: hostile_lists",
        "        endpoints:",
        "          - lb_endpoints:",
        "              - endpoint:",
        "                  address:",
        &format!(
            "                    socket_address: {{ address: 127.0.0.1, port_value: {list_port} }}"
        ),
        "",
    ]
    .join("\n");
    let config = config.replacen(clusters, &hostile_cluster, 1);
    let config_path: PathBuf = dir.path().join("envoy.yaml");
    std::fs::write(&config_path, config).expect("writing envoy.yaml");

    let backends = async {
        let stack_dir = dir.path();
        let mut started = Vec::new();
        for id in ["b1", "b2"] {
            started.push(
                zklb_tests::Backend::start(&zookeeper, "/services", "echo", id, 200, 0, stack_dir)
                    .await,
            );
        }
        started
    };
    let _backends = backends.await;
    let good = eventually(
        Duration::from_secs(30),
        "echo has both backends",
        || async {
            let list = control_plane.get("/v1/changes").await?;
            let instances = list["services"]["echo"]["instances"]
                .as_array()
                .map_or(0, Vec::len);
            (instances == 2)
                .then(|| serde_json::to_vec(&list).expect("json"))
                .ok_or(list.to_string())
        },
    )
    .await;
    good_tx.send_replace(Lists::Good(Arc::new(good)));
    let envoy = Envoy::start_with_config(config_path, listen_port, admin_port, 2, dir.path()).await;
    let stack = Stack::around(zookeeper, control_plane, envoy, "/services", dir).await;
    stack.wait_for_backends("echo", &["b1", "b2"]).await;

    for (lists, reason, logged) in [
        (
            Lists::Garbage,
            "unparsable",
            "the service list does not parse",
        ),
        (
            Lists::Huge(2 * MAX_LIST_BYTES),
            "too_large",
            "the service list is 2097152 bytes, more than max_list_bytes (1048576)",
        ),
        // Above what Envoy's HTTP client buffers: Envoy drops the answer, and the poller is told
        // of no answer at all.
        (
            Lists::Huge(40 << 20),
            "unreachable",
            "keeping the last good service list: the control plane is unreachable",
        ),
    ] {
        good_tx.send_replace(lists);
        let stat = format!("wasmcustom.zklb.poll_errors.{reason}");
        // The poller tries again every second: three failures in a row, and routing goes on.
        eventually(
            Duration::from_secs(60),
            &format!("{stat} counts"),
            || async {
                let answers = stack.requests("echo", 40, 4).await;
                assert_all_served(&answers);
                let counted = stack.envoy.stat(&stat).await;
                (counted >= 3).then_some(()).ok_or(format!("{counted}"))
            },
        )
        .await;
        let answers = stack.requests("echo", 200, 4).await;
        assert_all_served(&answers);
        let by_backend = Stack::count_by_backend(&answers);
        assert_eq!(
            by_backend.len(),
            2,
            "both backends still serve: {by_backend:?}"
        );
        // Logged once for the whole run of failures, not once per poll.
        let log = stack.envoy.log();
        let lines = log.lines().filter(|line| line.contains(logged)).count();
        assert_eq!(lines, 1, "{logged:?} logged {lines} times");
    }
    assert!(
        !stack.envoy.log().contains("panicked"),
        "the filter's VM crashed"
    );
    list_server.abort();
}
