//! zklb-agent registers backends that cannot register themselves: every field reaches the control
//! plane and Apache Curator's own reader; a backend that stops answering its health check leaves
//! rotation and returns; a registration deleted by someone else or expired with its session comes
//! back exactly once, and a connection lost for less than the session changes nothing; SIGTERM
//! drains the instance without a client error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use zklb_tests::proxy::Relay;
use zklb_tests::registrars::curator_query;
use zklb_tests::stack::{assert_all_served, Answer};
use zklb_tests::{eventually, Backend, Stack};

/// Checks every 300 ms, each failing after 200 ms; three failures take an instance out of
/// rotation, two passes put it back.
const INTERVAL: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_millis(200);
const RISE: u32 = 2;
const FALL: u32 = 3;
/// What a busy two-core machine may add to the checks' own timing: the write to ZooKeeper, the
/// control plane's read, scheduling.
const SLACK: Duration = Duration::from_secs(1);
/// The agents' session timeout where expiry is provoked.
const AGENT_SESSION_TIMEOUT: Duration = Duration::from_secs(2);

/// What the agent is told about an instance besides its address.
const LABELS: [&str; 8] = [
    "--weight",
    "7",
    "--zone",
    "eu-west-1a",
    "--metadata",
    "version=1.4.2",
    "--metadata",
    "team=payments",
];

fn health_check() -> Vec<String> {
    [
        "--http-check",
        "/_demo/health",
        "--interval-ms",
        &INTERVAL.as_millis().to_string(),
        "--timeout-ms",
        &TIMEOUT.as_millis().to_string(),
        "--rise",
        &RISE.to_string(),
        "--fall",
        &FALL.to_string(),
    ]
    .map(str::to_string)
    .to_vec()
}

fn strs(options: &[String]) -> Vec<&str> {
    options.iter().map(String::as_str).collect()
}

/// The control plane's listing of one instance, if it lists it.
async fn listed(stack: &Stack, service: &str, id: &str) -> Result<Option<Value>, String> {
    let listing = stack
        .control_plane
        .get(&format!("/v1/services/{service}"))
        .await?;
    let instances = listing["instances"].as_array().cloned().unwrap_or_default();
    let mut matching = instances.iter().filter(|instance| instance["id"] == id);
    let first = matching.next().cloned();
    assert!(matching.next().is_none(), "{id} is listed twice: {listing}");
    Ok(first)
}

/// Waits until the control plane lists `id` with `status` (`up`, `draining`), and returns when.
async fn wait_for_status(stack: &Stack, service: &str, id: &str, status: &str, within: Duration) {
    let what = format!("the control plane lists {id} as {status}");
    eventually(within, &what, || async {
        match listed(stack, service, id).await? {
            Some(instance) if instance["status"] == status => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

async fn wait_until_unlisted(stack: &Stack, service: &str, id: &str, within: Duration) {
    let what = format!("the control plane no longer lists {id}");
    eventually(within, &what, || async {
        match listed(stack, service, id).await? {
            None => Ok(()),
            Some(instance) => Err(instance.to_string()),
        }
    })
    .await;
}

fn registrations(id: &str) -> String {
    format!(r#"zklb_agent_registrations_total{{service="echo",id="{id}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registered_instance_is_listed_with_every_field_and_comes_back_when_deleted() {
    let stack = Stack::start().await;
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let orders = stack.backend_with_agent("orders", "o1", &LABELS).await;
    stack.wait_for_backends("orders", &["o1"]).await;

    let instance = listed(&stack, "orders", "o1")
        .await
        .expect("listing")
        .expect("o1 is listed");
    println!("listed: {instance}");
    assert_eq!(instance["address"], "127.0.0.1");
    assert_eq!(instance["port"], orders.port);
    assert_eq!(instance["weight"], 7);
    assert_eq!(instance["zone"], "eu-west-1a");
    assert_eq!(instance["status"], "up");
    assert_eq!(instance["source"], "curator");
    assert_eq!(
        instance["metadata"],
        serde_json::json!({"team": "payments", "version": "1.4.2", "weight": "7", "zone": "eu-west-1a"})
    );
    let registered_at = instance["registered_at"].as_i64().expect("registered_at");
    assert!(
        (started_ms..=started_ms + 60_000).contains(&registered_at),
        "registered at {registered_at}, the test started at {started_ms}"
    );

    // Someone deletes the znode: the agent creates it again, under the same name, in the same
    // session, once.
    let operator = stack.zookeeper.client().await;
    let (_, before) = operator.get_data(&orders.znode).await.expect("reading o1");
    operator
        .delete(&orders.znode, None)
        .await
        .expect("deleting o1's znode");
    let after = eventually(
        Duration::from_secs(10),
        "o1 is registered again",
        || async {
            match operator.get_data(&orders.znode).await {
                Ok((_, stat)) => Ok(stat),
                Err(error) => Err(error.to_string()),
            }
        },
    )
    .await;
    assert_ne!(after.czxid, before.czxid, "the znode was not created again");
    assert_eq!(after.ephemeral_owner, before.ephemeral_owner);
    let children = operator
        .list_children("/services/orders")
        .await
        .expect("listing orders");
    assert_eq!(children, ["o1"]);
    assert_eq!(
        orders
            .agent
            .metric(r#"zklb_agent_registrations_total{service="orders",id="o1"}"#)
            .await,
        2.0
    );
    stack.wait_for_backends("orders", &["o1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apache_curators_service_discovery_reads_what_the_agent_writes() {
    let stack = Stack::start().await;
    let healthy = stack.backend_with_agent("orders", "o1", &LABELS).await;
    let sick = stack
        .backend_with_agent("orders", "o2", &strs(&health_check()))
        .await;
    sick.set_health(503).await;
    eventually(Duration::from_secs(10), "o2 is unhealthy", || async {
        let health = sick.agent.health().await?;
        let instance = &health["instances"][0];
        if instance["healthy"] == false && instance["registered"] == true {
            Ok(())
        } else {
            Err(health.to_string())
        }
    })
    .await;

    let mut read = curator_query(&stack.zookeeper, &stack.root, "orders", stack.dir.path()).await;
    read.sort_by_key(|instance| instance["id"].as_str().map(str::to_string));
    println!("Curator read: {read:?}");
    assert_eq!(read.len(), 2, "{read:?}");
    let (o1, o2) = (&read[0], &read[1]);
    assert_eq!(o1["name"], "orders");
    assert_eq!(o1["id"], "o1");
    assert_eq!(o1["address"], "127.0.0.1");
    assert_eq!(o1["port"], healthy.port);
    assert_eq!(o1["sslPort"], Value::Null);
    assert_eq!(o1["enabled"], true);
    assert_eq!(o1["serviceType"], "DYNAMIC");
    assert!(o1["registrationTimeUTC"].as_i64().is_some_and(|at| at > 0));
    assert_eq!(o1["uri"], format!("http://127.0.0.1:{}", healthy.port));
    assert_eq!(
        o1["payload"],
        serde_json::json!({"metadata": {"team": "payments", "version": "1.4.2", "weight": "7", "zone": "eu-west-1a"}})
    );
    assert_eq!(o2["id"], "o2");
    assert_eq!(o2["port"], sick.port);
    assert_eq!(o2["enabled"], false, "Curator reads o2 as disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_that_stops_answering_leaves_rotation_within_interval_times_fall_and_returns_within_interval_times_rise(
) {
    let stack = Stack::start().await;
    let _b1 = stack.backend("echo", "b1").await;
    let _b2 = stack.backend("echo", "b2").await;
    let checked = stack
        .backend_with_agent("echo", "hc", &strs(&health_check()))
        .await;
    stack.wait_for_backends("echo", &["b1", "b2", "hc"]).await;

    // It stops answering: its checks time out.
    checked.freeze();
    let frozen = Instant::now();
    let bound = INTERVAL * FALL + TIMEOUT + SLACK;
    wait_for_status(&stack, "echo", "hc", "draining", bound).await;
    let out = frozen.elapsed();
    println!(
        "out of rotation {} ms after it stopped answering (interval x fall = {} ms)",
        out.as_millis(),
        (INTERVAL * FALL).as_millis()
    );
    // Once the filter follows, no request is sent to it: none waits for its per-try timeout.
    stack.wait_for_backends("echo", &["b1", "b2"]).await;
    let timeouts = "cluster.zklb_service_echo.upstream_rq_per_try_timeout";
    let timeouts_before = stack.envoy.stat(timeouts).await;
    let answers = stack.requests("echo", 200, 4).await;
    assert_all_served(&answers);
    assert_eq!(
        stack.envoy.stat(timeouts).await,
        timeouts_before,
        "requests were sent to the backend out of rotation"
    );

    // Back: in rotation after `rise` passed checks.
    checked.thaw();
    let thawed = Instant::now();
    let bound = INTERVAL * RISE + TIMEOUT + SLACK;
    wait_for_status(&stack, "echo", "hc", "up", bound).await;
    println!(
        "back in rotation {} ms after it answered again (interval x rise = {} ms)",
        thawed.elapsed().as_millis(),
        (INTERVAL * RISE).as_millis()
    );
    stack.wait_for_backends("echo", &["b1", "b2", "hc"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unhealthy_instance_is_deregistered_when_so_configured_and_registered_again_when_healthy(
) {
    let stack = Stack::start().await;
    let _b1 = stack.backend("echo", "b1").await;
    let mut options = health_check();
    options.extend(["--on-unhealthy", "deregister"].map(str::to_string));
    let checked = stack
        .backend_with_agent("echo", "hc", &strs(&options))
        .await;
    stack.wait_for_backends("echo", &["b1", "hc"]).await;

    checked.set_health(503).await;
    wait_until_unlisted(&stack, "echo", "hc", INTERVAL * FALL + TIMEOUT + SLACK).await;
    stack.wait_for_backends("echo", &["b1"]).await;

    checked.set_health(200).await;
    wait_for_status(
        &stack,
        "echo",
        "hc",
        "up",
        INTERVAL * RISE + TIMEOUT + SLACK,
    )
    .await;
    stack.wait_for_backends("echo", &["b1", "hc"]).await;
    assert_eq!(checked.agent.metric(&registrations("hc")).await, 2.0);
}

/// The czxid and owner of a znode, and the number of changes to its parent's children.
async fn snapshot(stack: &Stack, znodes: &[&str]) -> (Vec<(i64, i64)>, i32) {
    let zookeeper = stack.zookeeper.client().await;
    let mut stats = Vec::new();
    for znode in znodes {
        let (_, stat) = zookeeper
            .get_data(znode)
            .await
            .unwrap_or_else(|error| panic!("reading {znode}: {error}"));
        stats.push((stat.czxid, stat.ephemeral_owner));
    }
    let (_, service) = zookeeper
        .get_data("/services/echo")
        .await
        .expect("reading /services/echo");
    (stats, service.cversion)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_lost_for_less_than_the_session_timeout_changes_nothing() {
    let stack = Stack::start().await;
    // The agent reaches ZooKeeper through a relay that the test can cut; its session times out
    // after 10 s, the default.
    let relay = Relay::start(stack.zookeeper.connect.parse().expect("address")).await;
    let relayed = relay.address.to_string();
    let b1 = stack
        .backend_with_agent("echo", "b1", &["--zookeeper", &relayed])
        .await;
    stack.wait_for_backends("echo", &["b1"]).await;
    let before = snapshot(&stack, &[&b1.znode]).await;

    relay.cut();
    eventually(
        Duration::from_secs(5),
        "the agent is disconnected",
        || async {
            let health = b1.agent.health().await?;
            if health["zookeeper"] == "disconnected" {
                Ok(())
            } else {
                Err(health.to_string())
            }
        },
    )
    .await;
    // Not a wait for a condition: the outage itself must last.
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.heal();
    eventually(Duration::from_secs(10), "the agent reconnects", || async {
        let health = b1.agent.health().await?;
        if health["zookeeper"] == "connected" {
            Ok(())
        } else {
            Err(health.to_string())
        }
    })
    .await;

    assert_eq!(
        snapshot(&stack, &[&b1.znode]).await,
        before,
        "the disconnection changed the registration"
    );
    assert_eq!(b1.agent.metric("zklb_agent_sessions_total").await, 1.0);
    assert_eq!(b1.agent.metric(&registrations("b1")).await, 1.0);
    assert!(
        b1.agent
            .log()
            .contains("ZooKeeper reconnected; checking the registrations"),
        "the agent did not notice the disconnection"
    );
    stack.wait_for_backends("echo", &["b1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zookeeper_frozen_past_the_session_timeout_each_instance_is_registered_again_exactly_once()
{
    let stack = Stack::start().await;
    let timeout_ms = AGENT_SESSION_TIMEOUT.as_millis().to_string();
    let b1 = stack
        .backend_with_agent("echo", "b1", &["--session-timeout-ms", &timeout_ms])
        .await;
    let b2 = stack
        .backend_with_agent("echo", "b2", &["--session-timeout-ms", &timeout_ms])
        .await;
    stack.wait_for_backends("echo", &["b1", "b2"]).await;
    let znodes = [b1.znode.as_str(), b2.znode.as_str()];
    let (registered, cversion) = snapshot(&stack, &znodes).await;

    // ZooKeeper frozen past the session timeout: when it runs again, both sessions expire and
    // both instances are registered again, once each, under the same names.
    let answers_during = tokio::spawn({
        let http = stack.http.clone();
        let url = format!("http://127.0.0.1:{}/hello", stack.envoy.listen_port);
        async move {
            let mut answers = Vec::new();
            for _ in 0..100 {
                answers.push(Answer::of(http.get(&url).header("host", "echo").send().await).await);
            }
            answers
        }
    });
    stack.zookeeper.freeze();
    // Not a wait for a condition: the pause itself must outlast the session timeout.
    tokio::time::sleep(AGENT_SESSION_TIMEOUT * 2).await;
    stack.zookeeper.thaw();
    assert_all_served(&answers_during.await.expect("requests"));

    let agents = [(&b1, "b1"), (&b2, "b2")];
    let operator = stack.zookeeper.client().await;
    eventually(
        Duration::from_secs(30),
        "both instances are registered in new sessions",
        || async {
            // Never more than one znode per instance, whenever it is looked at.
            let children = operator
                .list_children("/services/echo")
                .await
                .map_err(|error| error.to_string())?;
            assert!(children.len() <= 2, "duplicates: {children:?}");
            for (backend, id) in agents {
                let count = backend.agent.metric(&registrations(id)).await;
                if count != 2.0 {
                    return Err(format!("{id} registered {count} times"));
                }
            }
            Ok(())
        },
    )
    .await;
    let (reregistered, after) = snapshot(&stack, &znodes).await;
    for ((czxid_before, owner_before), (czxid, owner)) in registered.iter().zip(&reregistered) {
        assert_ne!(czxid, czxid_before, "a znode was not created again");
        assert_ne!(
            owner, owner_before,
            "a znode stayed with the expired session"
        );
    }
    // Each instance's znode went once (with its session) and came back once.
    assert_eq!(
        after - cversion,
        4,
        "the children of /services/echo changed {} times",
        after - cversion
    );
    println!(
        "after the pause: sessions {:x?} became {:x?}; /services/echo's children changed {} times",
        registered
            .iter()
            .map(|(_, owner)| owner)
            .collect::<Vec<_>>(),
        reregistered
            .iter()
            .map(|(_, owner)| owner)
            .collect::<Vec<_>>(),
        after - cversion
    );
    stack.wait_for_backends("echo", &["b1", "b2"]).await;

    // And it stays so: nothing registers twice later.
    let until = Instant::now() + AGENT_SESSION_TIMEOUT * 2;
    while Instant::now() < until {
        assert_eq!(
            snapshot(&stack, &znodes).await,
            (reregistered.clone(), after)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (backend, id) in agents {
        assert_eq!(backend.agent.metric(&registrations(id)).await, 2.0);
    }
}

/// Requests sent without a pause, 4 at a time, until `stop` turns true; `sent` counts them.
fn load(
    stack: &Stack,
    stop: tokio::sync::watch::Receiver<bool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinSet<Vec<Answer>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let http = stack.http.clone();
        let url = format!("http://127.0.0.1:{}/hello", stack.envoy.listen_port);
        let (stop, sent) = (stop.clone(), Arc::clone(&sent));
        tasks.spawn(async move {
            let mut answers = Vec::new();
            // Bounded: a minute of requests at most.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !*stop.borrow() && Instant::now() < deadline {
                answers.push(Answer::of(http.get(&url).header("host", "echo").send().await).await);
                sent.fetch_add(1, Ordering::Relaxed);
            }
            answers
        });
    }
    tasks
}

/// The grace period of the agent stopped under load.
const GRACE: Duration = Duration::from_millis(2000);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_the_instance_under_load_without_a_client_error() {
    let stack = Stack::start().await;
    let _b1 = stack.backend("echo", "b1").await;
    let _b2 = stack.backend("echo", "b2").await;
    let grace = GRACE.as_millis().to_string();
    let mut leaving = stack
        .backend_with_agent("echo", "b3", &["--grace-ms", &grace])
        .await;
    stack.wait_for_backends("echo", &["b1", "b2", "b3"]).await;
    let cluster = "cluster.zklb_service_echo";
    let retries_before = stack
        .envoy
        .stat(&format!("{cluster}.upstream_rq_retry"))
        .await;
    let failures_before = stack
        .envoy
        .stat(&format!("{cluster}.upstream_cx_connect_fail"))
        .await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sent = Arc::new(AtomicU64::new(0));
    let mut load = load(&stack, stopped, Arc::clone(&sent));
    eventually(Duration::from_secs(10), "b3 takes requests", || async {
        let (served, _) = leaving.stats().await;
        if served > 50 {
            Ok(())
        } else {
            Err(format!("{served} requests"))
        }
    })
    .await;

    leaving.agent.terminate();
    let signalled = Instant::now();
    wait_for_status(&stack, "echo", "b3", "draining", GRACE).await;
    // Traffic moves away during the grace period, while b3 is still registered and serving.
    eventually(GRACE, "b3 gets no more requests", || async {
        let (before, _) = leaving.stats().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (after, _) = leaving.stats().await;
        if after == before {
            Ok(())
        } else {
            Err(format!("{} requests in 200 ms", after - before))
        }
    })
    .await;
    let drained = signalled.elapsed();
    assert!(
        drained < GRACE,
        "traffic moved away only after the grace period"
    );
    let code = leaving.agent.exit_code(Duration::from_secs(15)).await;
    let exited = signalled.elapsed();
    assert_eq!(code, Some(0), "the agent's exit code");
    // It deregistered before exiting: the control plane follows within moments.
    wait_until_unlisted(&stack, "echo", "b3", SLACK).await;
    let (served_at_exit, _) = leaving.stats().await;
    // The operator stops the backend once its agent is gone; requests go on a while.
    leaving.stop();
    let sent_at_stop = sent.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "requests go on after b3 stopped",
        || async {
            let since = sent.load(Ordering::Relaxed) - sent_at_stop;
            if since >= 200 {
                Ok(())
            } else {
                Err(format!("{since} requests"))
            }
        },
    )
    .await;
    stop.send_replace(true);
    let mut answers = Vec::new();
    while let Some(done) = load.join_next().await {
        answers.extend(done.expect("load task"));
    }

    assert_all_served(&answers);
    let retries = stack
        .envoy
        .stat(&format!("{cluster}.upstream_rq_retry"))
        .await
        - retries_before;
    let failures = stack
        .envoy
        .stat(&format!("{cluster}.upstream_cx_connect_fail"))
        .await
        - failures_before;
    let counts = Stack::count_by_backend(&answers);
    println!(
        "{} requests during the drain, none failed; {retries} retries, {failures} connect failures; b3 got its last request within {} ms of SIGTERM, the agent exited after {} ms; b3 served {served_at_exit} in all; {counts:?}",
        answers.len(),
        drained.as_millis(),
        exited.as_millis()
    );
    // No request was even tried on b3 after it stopped: drained, not merely retried elsewhere.
    assert_eq!(retries, 0, "requests were retried");
    assert_eq!(failures, 0, "connections to b3 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_sigterm_exits_at_once_leaving_the_instance_out_of_rotation() {
    let stack = Stack::start().await;
    let _b1 = stack.backend("echo", "b1").await;
    let mut leaving: Backend = stack
        .backend_with_agent("echo", "b2", &["--grace-ms", "60000"])
        .await;
    stack.wait_for_backends("echo", &["b1", "b2"]).await;

    leaving.agent.terminate();
    wait_for_status(&stack, "echo", "b2", "draining", Duration::from_secs(5)).await;
    leaving.agent.terminate();
    let told_again = Instant::now();
    let code = leaving.agent.exit_code(Duration::from_secs(5)).await;
    println!(
        "exited {} ms after the second SIGTERM (grace period 60 s)",
        told_again.elapsed().as_millis()
    );
    assert_eq!(code, Some(1));
    assert!(told_again.elapsed() < Duration::from_secs(2));
    // Until its session expires, it stays registered out of rotation.
    assert_eq!(
        listed(&stack, "echo", "b2")
            .await
            .expect("listing")
            .map(|b2| b2["status"].clone()),
        Some("draining".into())
    );
    stack.wait_for_backends("echo", &["b1"]).await;
}
