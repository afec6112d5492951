//! The binary refuses a configuration that cannot work with a message naming the problem and
//! exit code 2, before it connects to ZooKeeper.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ONE_INSTANCE: [&str; 6] = [
    "--service",
    "orders",
    "--address",
    "10.0.0.5",
    "--port",
    "8080",
];

/// A ZooKeeper address that the test listens on, to see whether the agent connects, and the
/// agent's command with `args`, pointed there.
fn agent(args: &[&str]) -> (TcpListener, Command) {
    let zookeeper = TcpListener::bind("127.0.0.1:0").expect("binding");
    zookeeper.set_nonblocking(true).expect("non-blocking");
    let mut command = Command::new(env!("CARGO_BIN_EXE_zklb-agent"));
    command
        .args([
            "--zookeeper",
            &zookeeper.local_addr().expect("address").to_string(),
        ])
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("RUST_LOG");
    (zookeeper, command)
}

#[test]
fn a_valid_configuration_connects_to_zookeeper() {
    // The control for the test below: the listener sees an agent that does connect.
    let (zookeeper, mut command) = agent(&ONE_INSTANCE);
    let mut agent = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running zklb-agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let connected = loop {
        if zookeeper.accept().is_ok() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(connected, "the agent never connected to ZooKeeper");
}

#[test]
fn bad_configurations_exit_2_with_the_reason_before_touching_zookeeper() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("instances.json");
    std::fs::write(
        &file,
        r#"{"instances": [{"service": "orders", "address": "10.0.0.5", "port": 8080,
                           "check": {"http": "/health", "timeout_ms": 5000, "interval_ms": 1000}}]}"#,
    )
    .expect("writing");
    let file = file.to_str().expect("UTF-8 path");
    let with = |extra: &[&'static str]| -> Vec<&str> {
        ONE_INSTANCE.iter().chain(extra).copied().collect()
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            with(&["--address", "orders.local"]),
            "--address: \"orders.local\" is not an IP address",
        ),
        (
            with(&["--rise", "2"]),
            "--http-check: check settings without a check",
        ),
        (vec!["--address", "10.0.0.5", "--port", "8080"], "--service"),
        (
            vec!["--config", file],
            "instances[0].check.timeout_ms: 5000 must be from 1 to the interval (1000)",
        ),
        (
            with(&["--zookeeper-digest-file", "/nonexistent/agent.digest"]),
            "--zookeeper-digest-file /nonexistent/agent.digest: cannot read it",
        ),
        (
            with(&["--zookeeper-tls-cert", "/nonexistent/cert.pem"]),
            "--zookeeper-tls-key",
        ),
        (with(&["--read-acl", "everyone"]), "is not <scheme>:<id>"),
    ];
    for (args, reason) in cases {
        let (zookeeper, mut command) = agent(&args);
        let output = command.output().expect("running zklb-agent");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert!(
            zookeeper.accept().is_err(),
            "{args:?}: connected to ZooKeeper"
        );
    }
}
