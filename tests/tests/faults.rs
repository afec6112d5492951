//! Faults under continuous load through Envoy (two workers) with the filter: a ZooKeeper leader
//! killed, ZooKeeper gone for a minute, a network partition from ZooKeeper, a control plane
//! killed, a hung backend, a rolling restart. No client sees an error, and each test prints one
//! `figure:` line with what it measured.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use zklb_tests::ensemble::Ensemble;
use zklb_tests::load::{Load, Tally};
use zklb_tests::netns::Namespace;
use zklb_tests::stack::{free_port, SESSION_TIMEOUT};
use zklb_tests::{eventually, ControlPlane, Envoy, Stack, ZooKeeper};

/// Clients sending one request after another, each at most every 10 ms.
const CLIENTS: usize = 4;
/// How long ZooKeeper stays away in the outage test.
const OUTAGE: Duration = Duration::from_secs(60);
/// How long the partition lasts: well past the session timeout, so that ZooKeeper expires the
/// control plane's session meanwhile.
const PARTITION: Duration = Duration::from_secs(12);
/// Generous, for a loaded two-core machine.
const RECOVERY: Duration = Duration::from_secs(60);

const ROOT: &str = "/services";

fn assert_no_client_error(tally: &Tally) {
    assert!(tally.requests > 0, "no load went through");
    assert_eq!(
        tally.errors, 0,
        "{} of {} requests failed, e.g. {:?}",
        tally.errors, tally.requests, tally.examples
    );
}

/// How many times the control plane's log says `line`.
fn log_count(control_plane: &ControlPlane, line: &str) -> usize {
    control_plane.log().matches(line).count()
}

const SESSION_OPEN: &str = "ZooKeeper session open";
const SESSION_LOST: &str = "ZooKeeper session lost; opening a new one";

/// The control plane says everywhere that its lists are stale: in the lists, in `/readyz` and
/// in its metrics (and goes on serving the lists).
async fn assert_stale_everywhere(control_plane: &ControlPlane) {
    let readiness = eventually(RECOVERY, "/readyz says why it is not ready", || async {
        let readiness = control_plane.get("/readyz").await?;
        match readiness["reason"].as_str() {
            Some(reason) if readiness["ready"] == false && !reason.is_empty() => Ok(readiness),
            _ => Err(readiness.to_string()),
        }
    })
    .await;
    let list = control_plane.get("/v1/services").await.expect("the list");
    assert_eq!(list["stale"], true, "{list}");
    assert_eq!(list["session"], "disconnected", "{list}");
    assert!(
        list["services"]["echo"]["instances"]
            .as_array()
            .is_some_and(|instances| !instances.is_empty()),
        "the last list is no longer served: {list}"
    );
    assert_eq!(control_plane.metric("zklb_zookeeper_connected").await, 0.0);
    assert_eq!(control_plane.metric("zklb_ready").await, 0.0);
    assert!(control_plane.metric("zklb_stale_seconds").await > 0.0);
    println!("/readyz while ZooKeeper is away: {readiness}");
}

/// Waits until the control plane follows ZooKeeper again (serving, lists not stale), and
/// returns how long that took.
async fn time_until_fresh(control_plane: &ControlPlane) -> Duration {
    let since = Instant::now();
    eventually(RECOVERY, "the lists are fresh again", || async {
        let list = control_plane.get("/v1/services").await?;
        let health = control_plane.health().await?;
        if list["stale"] == false && health["status"] == "serving" {
            Ok(())
        } else {
            Err(format!("{health}; stale: {}", list["stale"]))
        }
    })
    .await;
    since.elapsed()
}

/// No instance lost and none made up: what ZooKeeper holds for `service`, what the control
/// plane lists and what Envoy routes to are `ids`, all three.
async fn assert_lists_agree(stack: &Stack, service: &str, ids: &[&str]) {
    let expected: BTreeSet<String> = ids.iter().map(|id| id.to_string()).collect();
    let registrar = stack.zookeeper.client().await;
    let path = format!("{}/{service}", stack.root);
    let what = format!("ZooKeeper and the control plane both hold {ids:?} for {service}");
    eventually(RECOVERY, &what, || async {
        let held: BTreeSet<String> = registrar
            .list_children(&path)
            .await
            .map_err(|error| format!("listing {path}: {error}"))?
            .into_iter()
            .collect();
        let list = stack.control_plane.get("/v1/services").await?;
        let listed: BTreeSet<String> = list["services"][service]["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|instance| instance["id"].as_str().map(str::to_string))
            .collect();
        if held == expected && listed == expected {
            Ok(())
        } else {
            Err(format!(
                "ZooKeeper holds {held:?}, the control plane lists {listed:?}"
            ))
        }
    })
    .await;
    stack.wait_for_backends(service, ids).await;
}

/// The control plane's connection to the ensemble: which server, and from which local address.
fn control_plane_server(
    ensemble: &Ensemble,
    control_plane: &ControlPlane,
) -> Result<(u32, std::net::SocketAddr), String> {
    ensemble
        .server_of(&control_plane.connections())
        .ok_or_else(|| "the control plane is connected to no server".to_string())
}

/// The control plane is given all three servers. The leader is killed under load: the servers
/// left elect a new one, and the control plane moves to one of them within its session (the
/// same session id, no new session in its log); a registration made after the kill reaches
/// Envoy and the filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_zookeeper_leader_killed_under_load_costs_no_request_and_no_session() {
    let started = Instant::now();
    let mut ensemble = Ensemble::start().await;
    let dir = tempfile::Builder::new()
        .prefix("zklb-e2e")
        .tempdir()
        .expect("creating a temporary directory");
    // The client library picks a server at random: the control plane starts again until its
    // session is on the server that leads at that moment, so that the kill moves it (each
    // start is a new process, logging into a directory of its own so that a log counts one
    // process). Leadership is asked each time: on a busy machine a fresh ensemble may elect
    // again after its first leader, and a server that is not serving takes no session.
    let log_dir = |start: u32| dir.path().join(format!("control-plane-{start}"));
    let mut seen = Vec::new();
    let (control_plane, leader_id) = loop {
        let start = seen.len() as u32 + 1;
        assert!(
            start <= 30,
            "the control plane never held its session on the leader: (server, its mode) of \
             each start: {seen:?}"
        );
        let mut control_plane =
            ControlPlane::start(ensemble.any_server(), ROOT, &log_dir(start)).await;
        let on = control_plane_server(&ensemble, &control_plane).map(|(id, _)| id);
        let mode = match on {
            Ok(id) => ensemble.mode(id).await,
            Err(ref error) => Err(error.clone()),
        };
        match (on, mode) {
            (Ok(id), Ok(mode)) if mode == "leader" => break (control_plane, id),
            answer => seen.push(answer),
        }
        control_plane.kill();
    };
    let leader = ensemble.take(leader_id);
    let envoy = Envoy::start(&control_plane, dir.path()).await;
    let mut stack = Stack::around(leader, control_plane, envoy, ROOT, dir).await;
    let _backends = stack.serving("echo", &["b1", "b2"]).await;
    let (_, local) = control_plane_server(&ensemble, &stack.control_plane).expect("connected");
    let session = ensemble
        .session_of(leader_id, local)
        .await
        .expect("the control plane's session");
    let load = Load::start(&stack.envoy, "echo", CLIENTS);
    load.after(100).await;

    stack.zookeeper.crash();
    let killed = Instant::now();
    // Connections that the client opens while the servers left elect a leader may close again:
    // ask the server of the connection the control plane holds now, each time.
    let what = "the control plane holds a session on another server";
    let (moved_to, moved_session) = eventually(RECOVERY, what, || async {
        match control_plane_server(&ensemble, &stack.control_plane)? {
            (id, local) if id != leader_id => Ok((id, ensemble.session_of(id, local).await?)),
            _ => Err("still on the killed leader".to_string()),
        }
    })
    .await;
    let moved_after = killed.elapsed();
    time_until_fresh(&stack.control_plane).await;
    let fresh_after = killed.elapsed();
    assert_eq!(
        moved_session, session,
        "the control plane opened a new session"
    );
    assert_eq!(log_count(&stack.control_plane, SESSION_OPEN), 1);
    assert_eq!(log_count(&stack.control_plane, SESSION_LOST), 0);
    let new_leader = ensemble.leader().await.expect("a new leader");
    let role = ensemble.mode(moved_to).await.expect("its mode");

    let _b3 = stack.backend("echo", "b3").await;
    let registered = Instant::now();
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
    let b3_routed_after = registered.elapsed();
    let tally = load.stop().await;
    assert_no_client_error(&tally);
    println!(
        "figure: leader (server {leader_id}) killed: {} requests, {} errors; the control plane \
         moved to server {moved_to} ({role}; server {new_leader} leads) after {:.1} s, same \
         session {session}, lists fresh after {:.1} s; a registration after the kill routed \
         within {:.1} s; test took {:.0} s",
        tally.requests,
        tally.errors,
        moved_after.as_secs_f64(),
        fresh_after.as_secs_f64(),
        b3_routed_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// ZooKeeper away for a minute under load: the lists are served, marked stale everywhere;
/// ZooKeeper back, they are fresh within seconds and hold exactly what ZooKeeper holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minute_without_zookeeper_under_load_costs_no_request_and_loses_no_instance() {
    let started = Instant::now();
    let mut stack = Stack::start().await;
    let _backends = stack.serving("echo", &["b1", "b2"]).await;
    let load = Load::start(&stack.envoy, "echo", CLIENTS);
    load.after(100).await;

    stack.zookeeper.crash();
    let crashed = Instant::now();
    assert_stale_everywhere(&stack.control_plane).await;
    // Not a wait for a condition: the outage itself is what is tested.
    tokio::time::sleep_until((crashed + OUTAGE).into()).await;
    let during = load.tally();

    stack.zookeeper.restart().await;
    let fresh_after = time_until_fresh(&stack.control_plane).await;
    assert_lists_agree(&stack, "echo", &["b1", "b2"]).await;
    let tally = load.stop().await;
    assert_no_client_error(&tally);
    println!(
        "figure: ZooKeeper down {:.0} s: {} requests ({} during the outage), {} errors; lists \
         fresh {:.1} s after ZooKeeper served again; ZooKeeper, control plane and Envoy agree on \
         2 of 2 instances; test took {:.0} s",
        OUTAGE.as_secs_f64(),
        tally.requests,
        during.requests,
        tally.errors,
        fresh_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// ZooKeeper in a network namespace of the test's, reached by the control plane through one
/// link and by the agents through another. The control plane's link drops every packet for
/// longer than the session timeout: the lists are served, marked stale; healed, the control
/// plane opens a new session and reads the registry again, with the registration made during
/// the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_from_zookeeper_under_load_costs_no_request_and_is_read_over() {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("zklb-e2e")
        .tempdir()
        .expect("creating a temporary directory");
    let mut namespace = Namespace::create();
    let control_link = namespace.link();
    let registrar_link = namespace.link();
    // Inside its own namespace, the server listens on both links.
    let zookeeper = ZooKeeper::start_through(
        dir.path(),
        "clientPortAddress=0.0.0.0\n",
        &namespace.launcher(),
        &registrar_link.namespace_address.to_string(),
    )
    .await;
    let port = zookeeper.connect.rsplit_once(':').expect("host:port").1;
    let control_connect = format!("{}:{port}", control_link.namespace_address);
    zookeeper
        .client()
        .await
        .mkdir(
            ROOT,
            &zookeeper_client::CreateMode::Persistent
                .with_acls(zookeeper_client::Acls::anyone_all()),
        )
        .await
        .expect("creating the registry root");
    let control_plane =
        ControlPlane::launch_at(free_port(), &control_connect, ROOT, dir.path()).await;
    control_plane.wait_until_serving().await;
    let envoy = Envoy::start(&control_plane, dir.path()).await;
    let stack = Stack::around(zookeeper, control_plane, envoy, ROOT, dir).await;
    let _backends = stack.serving("echo", &["b1", "b2"]).await;
    let load = Load::start(&stack.envoy, "echo", CLIENTS);
    load.after(100).await;

    namespace.cut(&control_link);
    let cut = Instant::now();
    assert_stale_everywhere(&stack.control_plane).await;
    // Registered during the partition: only a new read of the registry finds it.
    let _b3 = stack.backend("echo", "b3").await;
    // Not a wait for a condition: the partition must outlast the session timeout.
    tokio::time::sleep_until((cut + PARTITION).into()).await;
    let during = load.tally();

    namespace.heal(&control_link);
    let fresh_after = time_until_fresh(&stack.control_plane).await;
    assert_eq!(log_count(&stack.control_plane, SESSION_OPEN), 2);
    assert!(log_count(&stack.control_plane, SESSION_LOST) >= 1);
    assert_lists_agree(&stack, "echo", &["b1", "b2", "b3"]).await;
    let tally = load.stop().await;
    assert_no_client_error(&tally);
    println!(
        "figure: partition of {:.0} s (session timeout {:.0} s): {} requests ({} during it), {} \
         errors; a new session and fresh lists {:.1} s after it healed, with the instance \
         registered meanwhile; ZooKeeper, control plane and Envoy agree on 3 of 3 instances; \
         test took {:.0} s",
        PARTITION.as_secs_f64(),
        SESSION_TIMEOUT.as_secs_f64(),
        tally.requests,
        during.requests,
        tally.errors,
        fresh_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// The control plane SIGKILLed under load: Envoy and the filter keep their last lists. A
/// registration and a deregistration made while it is down reach both once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_plane_killed_under_load_costs_no_request_and_resyncs() {
    let started = Instant::now();
    let mut stack = Stack::start().await;
    let mut backends = stack.serving("echo", &["b1", "b2"]).await;
    let load = Load::start(&stack.envoy, "echo", CLIENTS);
    load.after(100).await;

    stack.control_plane.kill();
    let killed = Instant::now();
    let _b3 = stack.backend("echo", "b3").await;
    // b1's agent deregisters it and exits; b1 itself goes on answering, so only the
    // deregistration reaching Envoy and the filter keeps requests from it.
    backends[0].agent.terminate();
    let exit = backends[0].agent.exit_code(Duration::from_secs(30)).await;
    assert_eq!(exit, Some(0), "the agent of b1 exits cleanly");
    load.after(200).await;
    let down_for = killed.elapsed();
    let during = load.tally();

    let dir = stack.dir.path().to_path_buf();
    let restarted = Instant::now();
    stack.control_plane.restart(&stack.zookeeper, &dir).await;
    stack.control_plane.wait_until_serving().await;
    let serving_after = restarted.elapsed();
    assert_lists_agree(&stack, "echo", &["b2", "b3"]).await;
    let routed_after = restarted.elapsed();
    let tally = load.stop().await;
    assert_no_client_error(&tally);
    println!(
        "figure: control plane killed for {:.1} s: {} requests ({} while it was down), {} \
         errors; restarted, it served after {:.1} s, and Envoy routed to b2 and b3 alone (b3 \
         registered and b1 deregistered meanwhile) after {:.1} s; test took {:.0} s",
        down_for.as_secs_f64(),
        tally.requests,
        during.requests,
        tally.errors,
        serving_after.as_secs_f64(),
        routed_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

const PER_TRY_TIMEOUTS: &str = "cluster.zklb_service_echo.upstream_rq_per_try_timeout";
const EJECTIONS: &str = "wasmcustom.zklb.ejections";

/// Attempts Envoy has sent to the member of `echo` on `port` (its `rq_total` in `/clusters`),
/// counted when sent rather than when they fail.
async fn attempts_to(stack: &Stack, port: u16) -> Result<u64, String> {
    let clusters = stack.envoy.admin_json("/clusters?format=json").await?;
    let echo = clusters["cluster_statuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|status| status["name"] == "zklb_service_echo")
        .ok_or("Envoy has no cluster for echo")?;
    let host = echo["host_statuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|host| host["address"]["socket_address"]["port_value"] == port)
        .ok_or_else(|| format!("no member on port {port}"))?;
    let total = host["stats"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|stat| stat["name"] == "rq_total")
        .ok_or("no rq_total")?;
    // Envoy writes 64-bit counters as strings.
    match &total["value"] {
        serde_json::Value::String(text) => text.parse().map_err(|error| format!("{error}")),
        value => value.as_u64().ok_or_else(|| format!("rq_total is {value}")),
    }
}

/// A backend that hangs (SIGSTOP, still registered) under load: each request that tries it
/// first costs a per-try timeout and goes on to the next candidate; the filter ejects it, and
/// then no attempt is sent to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_backend_under_load_costs_no_request_and_is_ejected() {
    let started = Instant::now();
    let stack = Stack::start().await;
    let backends = stack.serving("echo", &["b1", "b2", "hung"]).await;
    let load = Load::start(&stack.envoy, "echo", CLIENTS);
    load.after(100).await;

    backends[2].freeze();
    let frozen = Instant::now();
    let ejections = eventually(RECOVERY, "the filter ejects the hung host", || async {
        let ejections = stack.envoy.stat(EJECTIONS).await;
        (ejections >= 1)
            .then_some(ejections)
            .ok_or(format!("{ejections} ejections"))
    })
    .await;
    let ejected_after = frozen.elapsed();
    // Without the ejection a third of first attempts would go on going to it; with it, 100
    // requests in a row send it none (an ejection lasts 10 s at first).
    let hung_port = backends[2].port;
    let quiet = eventually(RECOVERY, "no attempt goes to the hung host", || async {
        let window_start = frozen.elapsed();
        let before = attempts_to(&stack, hung_port).await?;
        load.after(100).await;
        let attempts = attempts_to(&stack, hung_port).await? - before;
        (attempts == 0)
            .then_some(window_start)
            .ok_or(format!("{attempts} attempts to it in 100 requests"))
    })
    .await;
    let timeouts = stack.envoy.stat(PER_TRY_TIMEOUTS).await;
    let tally = load.stop().await;
    backends[2].thaw();
    assert_no_client_error(&tally);
    println!(
        "figure: one of three backends hung: {} requests, {} errors, {timeouts} per-try \
         timeouts (5 s each); ejected {:.1} s after it hung ({ejections} ejections); from {:.1} \
         s after it hung, 100 requests in a row sent it no attempt; test took {:.0} s",
        tally.requests,
        tally.errors,
        ejected_after.as_secs_f64(),
        quiet.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Every backend of a service stopped with SIGTERM (its agent drains it first) and started
/// again, one after another, each back in rotation before the next: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_load_costs_no_request() {
    let started = Instant::now();
    let stack = Stack::start().await;
    let ids = ["b1", "b2", "b3"];
    let mut backends = stack.serving("echo", &ids).await;
    let load = Load::start(&stack.envoy, "echo", CLIENTS);
    load.after(100).await;
    let retries = "cluster.zklb_service_echo.upstream_rq_retry";
    let retries_before = stack.envoy.stat(retries).await;

    let mut back_after = Vec::new();
    for (backend, id) in backends.iter_mut().zip(ids) {
        let stopping = Instant::now();
        backend.stop();
        let answered = load.tally().answered_by(id);
        *backend = stack.backend("echo", id).await;
        let what = format!("{id} is back in rotation");
        eventually(RECOVERY, &what, || async {
            let now = load.tally().answered_by(id);
            (now > answered)
                .then_some(())
                .ok_or(format!("{now} answers"))
        })
        .await;
        back_after.push(format!("{id} {:.1} s", stopping.elapsed().as_secs_f64()));
    }
    let retried = stack.envoy.stat(retries).await - retries_before;
    let tally = load.stop().await;
    assert_no_client_error(&tally);
    println!(
        "figure: rolling restart of 3 backends: {} requests, {} errors, {retried} retries; \
         stopped to back in rotation: {}; test took {:.0} s",
        tally.requests,
        tally.errors,
        back_after.join(", "),
        started.elapsed().as_secs_f64()
    );
}
