//! The README's first command: `scripts/stack` brings the whole stack up, says where to send
//! requests, serves them, keeps serving them across ZooKeeper pauses and restarts, and stops
//! everything when told to.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zklb_tests::eventually;
use zklb_tests::process::Child;
use zklb_tests::stack::{free_port, workspace_root};

/// The agents' session timeout in this test: short, so that a pause of ZooKeeper outlasts it.
const AGENT_SESSION_TIMEOUT: Duration = Duration::from_secs(2);
const ZNODES: [&str; 3] = [
    "/services/echo/echo-1",
    "/services/echo/echo-2",
    "/services/echo/echo-3",
];

/// Which demo backends answered 60 requests, if every request was served.
async fn backends_serving(http: &reqwest::Client, url: &str) -> Result<BTreeSet<String>, String> {
    let mut backends = BTreeSet::new();
    for _ in 0..60 {
        let answer: serde_json::Value = http
            .get(url)
            .header("host", "echo")
            .send()
            .await
            .and_then(|response| response.error_for_status())
            .map_err(|error| error.to_string())?
            .json()
            .await
            .map_err(|error| error.to_string())?;
        let backend = answer["backend"].as_str().ok_or("no backend id")?;
        backends.insert(backend.to_string());
    }
    Ok(backends)
}

async fn wait_until_three_backends_serve(http: &reqwest::Client, url: &str, what: &str) {
    eventually(Duration::from_secs(60), what, || async {
        let backends = backends_serving(http, url).await?;
        if backends.len() == 3 {
            Ok(())
        } else {
            Err(format!("served by {backends:?}"))
        }
    })
    .await;
}

/// The sessions that own the demo backends' znodes, once all three exist.
async fn owners(zookeeper: &str) -> Result<Vec<i64>, String> {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        zookeeper_client::Client::connect(zookeeper),
    )
    .await
    .map_err(|_| "connecting to ZooKeeper timed out".to_string())?
    .map_err(|error| error.to_string())?;
    let mut owners = Vec::new();
    for znode in ZNODES {
        match client.check_stat(znode).await {
            Ok(Some(stat)) => owners.push(stat.ephemeral_owner),
            Ok(None) => return Err(format!("{znode} is missing")),
            Err(error) => return Err(error.to_string()),
        }
    }
    Ok(owners)
}

/// The ZooKeeper process that the script runs now.
fn zookeeper_pid(work: &Path) -> Option<String> {
    let pid = std::fs::read_to_string(work.join("zookeeper.pid")).ok()?;
    Some(pid.trim().to_string()).filter(|pid| !pid.is_empty())
}

fn signal(pid: &str, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), pid])
        .status()
        .is_ok_and(|status| status.success());
    assert!(sent, "sending SIG{signal} to {pid}");
}

#[tokio::test]
async fn stack_script_serves_the_demo_service_until_stopped() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let listen_port = free_port();
    let zookeeper_port = free_port();
    let mut command = Command::new(workspace_root().join("scripts/stack"));
    command
        .env(
            "ZKLB_AGENT_SESSION_TIMEOUT_MS",
            AGENT_SESSION_TIMEOUT.as_millis().to_string(),
        )
        .env("ZKLB_ZOOKEEPER_PORT", zookeeper_port.to_string())
        .env("ZKLB_CONTROL_PLANE_PORT", free_port().to_string())
        .env("ZKLB_LISTEN_PORT", listen_port.to_string())
        .env("ZKLB_ADMIN_PORT", free_port().to_string());
    let mut stack = Child::spawn("stack", command, dir.path());

    // It may have to build first.
    let url = format!("http://127.0.0.1:{listen_port}/");
    eventually(
        Duration::from_secs(600),
        "scripts/stack says it is running",
        || async {
            if stack.log().contains(&format!("curl -H 'Host: echo' {url}")) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;

    let http = reqwest::Client::new();
    let backends = backends_serving(&http, &url)
        .await
        .expect("the printed command works");
    assert_eq!(backends.len(), 3, "three demo backends serve: {backends:?}");
    let work = stack
        .log()
        .lines()
        .find_map(|line| line.trim().strip_prefix("logs:"))
        .map(|work| PathBuf::from(work.trim()))
        .expect("the script says where its logs are");
    let zookeeper = format!("127.0.0.1:{zookeeper_port}");

    // ZooKeeper paused for longer than the agents' sessions: they expire, and the agents
    // register the backends again in new sessions.
    let before = owners(&zookeeper)
        .await
        .expect("the backends are registered");
    let paused = zookeeper_pid(&work).expect("the script names ZooKeeper's pid");
    signal(&paused, "STOP");
    // Not a wait for a condition: the pause itself must outlast the session timeout.
    tokio::time::sleep(AGENT_SESSION_TIMEOUT * 2).await;
    signal(&paused, "CONT");
    let after = eventually(
        Duration::from_secs(30),
        "the backends are registered in new sessions",
        || async {
            let after = owners(&zookeeper).await?;
            if after.iter().all(|owner| !before.contains(owner)) {
                Ok(after)
            } else {
                Err(format!("owners {after:x?}, before {before:x?}"))
            }
        },
    )
    .await;
    println!("the znodes' sessions were {before:x?} before the pause, {after:x?} after");
    wait_until_three_backends_serve(&http, &url, "three backends serve after the pause").await;

    // ZooKeeper killed: the script starts it again, and the agents register the backends there.
    signal(&paused, "KILL");
    eventually(
        Duration::from_secs(60),
        "the script starts ZooKeeper again",
        || async {
            match zookeeper_pid(&work) {
                Some(pid) if pid != paused => owners(&zookeeper).await.map(drop),
                _ => Err("not restarted yet".to_string()),
            }
        },
    )
    .await;
    wait_until_three_backends_serve(&http, &url, "three backends serve after the restart").await;
    assert!(stack.is_running(), "scripts/stack exited: {}", stack.log());

    Command::new("kill")
        // Ctrl-C (SIGINT) and SIGTERM run the same trap. The test sends SIGTERM because a shell
        // cannot trap a SIGINT that was ignored when it started, as it is for every process of a
        // test run that was itself started in the background.
        .args(["-TERM", &stack.id().to_string()])
        .status()
        .expect("sending SIGTERM");
    eventually(
        Duration::from_secs(60),
        "scripts/stack stops everything",
        || {
            let running = stack.is_running();
            let listening = std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_ok();
            async move {
                match (running, listening) {
                    (false, false) => Ok(()),
                    _ => Err(format!(
                        "script running: {running}, Envoy listening: {listening}"
                    )),
                }
            }
        },
    )
    .await;
}
