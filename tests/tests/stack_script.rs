//! The README's first command: `scripts/stack` brings the whole stack up, says where to send
//! requests, serves them, and stops everything when told to.

use std::process::Command;
use std::time::Duration;

use zklb_tests::eventually;
use zklb_tests::process::Child;
use zklb_tests::stack::{free_port, workspace_root};

#[tokio::test]
async fn stack_script_serves_the_demo_service_until_stopped() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let listen_port = free_port();
    let mut command = Command::new(workspace_root().join("scripts/stack"));
    command
        .env("ZKLB_ZOOKEEPER_PORT", free_port().to_string())
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
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let answer: serde_json::Value = http
            .get(&url)
            .header("host", "echo")
            .send()
            .await
            .and_then(|response| response.error_for_status())
            .expect("the printed command works")
            .json()
            .await
            .expect("a JSON answer");
        backends.insert(answer["backend"].as_str().expect("backend id").to_string());
    }
    assert_eq!(backends.len(), 3, "three demo backends serve: {backends:?}");

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
