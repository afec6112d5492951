//! The binary refuses a configuration that cannot work with a message naming the problem and
//! exit code 2, before it connects to ZooKeeper or listens.

use std::net::TcpListener;
use std::process::Command;

#[test]
fn bad_configurations_exit_2_with_the_reason_before_touching_zookeeper() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let short_token = dir.path().join("admin.token");
    std::fs::write(&short_token, "letmein\n").expect("writing a token file");
    let short_token_flag = format!("--admin-token-file={}", short_token.display());
    let cases: [(&[&str], &str); 8] = [
        (
            &["--registry", "/services=consul"],
            "unknown format \"consul\"",
        ),
        (
            &[
                "--registry",
                "/services=auto",
                "--registry",
                "/services/inner=dubbo",
            ],
            "the registry root /services/inner is inside /services",
        ),
        (
            &["--zookeeper-digest-file", "/nonexistent/reader.digest"],
            "--zookeeper-digest-file /nonexistent/reader.digest: cannot read it",
        ),
        (
            &["--zookeeper-tls-cert", "/nonexistent/cert.pem"],
            "--zookeeper-tls-key",
        ),
        (&["--log-format", "xml"], "--log-format"),
        (
            &[&short_token_flag],
            "is 7 characters long; use at least 16",
        ),
        (
            &["--admin-token-file", "/nonexistent/admin.token"],
            "cannot read the admin token /nonexistent/admin.token",
        ),
        (
            &["--secret-metadata", "*token*,*"],
            "would hide every metadata key",
        ),
    ];
    for (args, reason) in cases {
        let zookeeper = TcpListener::bind("127.0.0.1:0").expect("binding");
        zookeeper.set_nonblocking(true).expect("non-blocking");
        let output = Command::new(env!("CARGO_BIN_EXE_zklb-control-plane"))
            .args([
                "--zookeeper",
                &zookeeper.local_addr().expect("address").to_string(),
            ])
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("running zklb-control-plane");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert!(
            zookeeper.accept().is_err(),
            "{args:?}: connected to ZooKeeper"
        );
    }
}
