//! Who may write and read the registry: the agent's registrations belong to its digest identity
//! and can be kept from readers without another; and every zklb process reaches a ZooKeeper that
//! speaks only TLS, with a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zklb_tests::pki::Pki;
use zklb_tests::stack::{free_port, scrape, Backend};
use zklb_tests::{eventually, ControlPlane, ZooKeeper};
use zookeeper_client::{self as zk, Acl, AuthId, Permission};

fn secret(dir: &Path, name: &str, credentials: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{credentials}\n")).expect("writing a digest file");
    path
}

/// The ACL id ZooKeeper's `DigestAuthenticationProvider` makes of `user:password`:
/// `user:base64(sha1(user:password))`.
fn digest_id(credentials: &str) -> String {
    let output = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import base64, hashlib, sys; c = sys.argv[1]; \
             print(c.split(':')[0] + ':' + base64.b64encode(hashlib.sha1(c.encode()).digest()).decode())",
            credentials,
        ])
        .output()
        .expect("running python3");
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .trim()
        .to_string()
}

async fn client_as(zookeeper: &ZooKeeper, credentials: Option<&str>) -> zk::Client {
    let mut connector = zk::Client::connector();
    if let Some(credentials) = credentials {
        connector = connector.with_auth("digest", credentials.as_bytes());
    }
    connector
        .connect(&zookeeper.connect)
        .await
        .expect("connecting to ZooKeeper")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_registrations_belong_to_its_identity_and_readers_can_be_limited() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let agent_secret = secret(dir.path(), "agent.digest", "agent:agent-secret");
    let agent_flag = format!("--zookeeper-digest-file={}", agent_secret.display());
    let backend = Backend::start_with_agent(
        &zookeeper,
        "/services",
        "echo",
        "b1",
        200,
        0,
        &[&agent_flag],
        dir.path(),
    )
    .await;
    let agent = &backend.agent;
    eventually(
        Duration::from_secs(20),
        "the registration is listed",
        || async {
            let echo = control_plane.get("/v1/services/echo").await?;
            (echo["instances"][0]["id"] == "b1")
                .then_some(())
                .ok_or(echo.to_string())
        },
    )
    .await;

    // Only its owner sees the digest in full (ZooKeeper hides it from others).
    let owner = client_as(&zookeeper, Some("agent:agent-secret")).await;
    let (acls, _) = owner.get_acl(&agent.znode).await.expect("its ACL");
    assert_eq!(
        acls,
        [
            Acl::new(
                Permission::ALL,
                AuthId::new("digest", &digest_id("agent:agent-secret"))
            ),
            Acl::new(Permission::READ, AuthId::anyone()),
        ]
    );
    for (who, client) in [
        ("anyone", client_as(&zookeeper, None).await),
        (
            "another identity",
            client_as(&zookeeper, Some("mallory:guess")).await,
        ),
    ] {
        let overwritten = client.set_data(&agent.znode, b"{}", None).await;
        assert_eq!(
            overwritten,
            Err(zk::Error::NoAuth),
            "{who} overwrote the registration"
        );
        let deleted = client.delete(&agent.znode, None).await;
        assert_eq!(
            deleted,
            Err(zk::Error::NoAuth),
            "{who} deleted the registration"
        );
    }

    // Registrations readable only by the control plane's identity.
    let reader = "reader:reader-secret";
    let read_acl = format!("--read-acl=digest:{}", digest_id(reader));
    let private = Backend::start_with_agent(
        &zookeeper,
        "/services",
        "private",
        "p1",
        200,
        0,
        &[&agent_flag, &read_acl],
        dir.path(),
    )
    .await;
    let anonymous =
        ControlPlane::start(&zookeeper, "/services", &dir.path().join("anonymous")).await;
    let reader_flag = format!(
        "--zookeeper-digest-file={}",
        secret(dir.path(), "reader.digest", reader).display()
    );
    let trusted = ControlPlane::start_with(
        &zookeeper,
        &["/services=auto"],
        &[&reader_flag],
        &dir.path().join("trusted"),
    )
    .await;
    let listing = eventually(
        Duration::from_secs(20),
        "the reader lists the private instance",
        || async {
            let private = trusted.get("/v1/services/private").await?;
            (private["instances"][0]["id"] == "p1")
                .then_some(private.clone())
                .ok_or(private.to_string())
        },
    )
    .await;
    assert_eq!(listing["instances"][0]["port"], private.port);
    // Without the reader's identity, the private service's znode cannot even be listed.
    let unreadable = anonymous.get("/v1/services").await.expect("the list");
    assert!(
        unreadable["unreadable"]["/services/private"]
            .as_str()
            .is_some_and(|reason| reason.contains("not authorized")),
        "{unreadable}"
    );
    assert!(unreadable["services"]["private"].is_null(), "{unreadable}");
    assert_eq!(unreadable["services"]["echo"]["instances"][0]["id"], "b1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_reaches_a_zookeeper_that_speaks_only_tls() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pki = Pki::new(dir.path());
    let server = pki.issue("zookeeper");
    let client = pki.issue("zklb");
    let secure_port = free_port();
    // The plain port serves the test's own client only; zklb is given the TLS port.
    let zookeeper = ZooKeeper::start_with(
        dir.path(),
        &format!(
            "secureClientPortAddress=127.0.0.1\nsecureClientPort={secure_port}\n\
             serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
             ssl.keyStore.location={}\nssl.keyStore.type=PEM\n\
             ssl.trustStore.location={}\nssl.trustStore.type=PEM\nssl.clientAuth=need\n",
            server.key_and_certificate.display(),
            pki.ca.display(),
        ),
    )
    .await;
    let secure = format!("127.0.0.1:{secure_port}");
    let tls = [
        format!("--zookeeper={secure}"),
        format!("--zookeeper-tls-ca={}", pki.ca.display()),
        format!("--zookeeper-tls-cert={}", client.certificate.display()),
        format!("--zookeeper-tls-key={}", client.key.display()),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let control_plane =
        ControlPlane::start_with(&zookeeper, &["/services=auto"], &tls, dir.path()).await;
    let backend = Backend::start_with_agent(
        &zookeeper,
        "/services",
        "echo",
        "b1",
        200,
        0,
        &tls,
        dir.path(),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the registration made over TLS is listed",
        || async {
            let echo = control_plane.get("/v1/services/echo").await?;
            (echo["instances"][0]["port"] == backend.port)
                .then_some(())
                .ok_or(echo.to_string())
        },
    )
    .await;

    // Without TLS, the same port is refused: the sessions above did speak TLS.
    let plain = ControlPlane::launch_reading(
        free_port(),
        &secure,
        &["/services=auto"],
        &dir.path().join("plain"),
    )
    .await;
    eventually(Duration::from_secs(30), "plain text is refused", || async {
        let log = plain.log();
        let ready = plain.get("/readyz").await?;
        if log.contains("cannot open a ZooKeeper session") && ready["ready"] == false {
            Ok(())
        } else {
            Err(format!("{ready}"))
        }
    })
    .await;
}

/// `POST` to `url` with `authorization`, if any: the status, the `WWW-Authenticate` header and
/// the JSON body.
async fn post(url: &str, authorization: Option<&str>) -> (u16, Option<String>, serde_json::Value) {
    let mut request = reqwest::Client::new().post(url);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request.send().await.expect("a POST");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|value| value.to_str().expect("ASCII").to_string());
    let body = response.json().await.expect("a JSON body");
    (status, challenge, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_routes_listen_apart_and_a_state_change_needs_the_token() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let token = "a7c1-operators-only-2f9e";
    let token_file = secret(dir.path(), "admin.token", token);
    let admin_port = free_port();
    let admin_listen = format!("--admin-listen=127.0.0.1:{admin_port}");
    let token_flag = format!("--admin-token-file={}", token_file.display());
    let control_plane = ControlPlane::start_with(
        &zookeeper,
        &["/services=auto"],
        &[&admin_listen, &token_flag],
        dir.path(),
    )
    .await;
    let admin = format!("http://127.0.0.1:{admin_port}");

    // What Envoy's filters reach serves the lists, and none of the operator's routes.
    control_plane.get("/v1/services").await.expect("the list");
    for path in ["/", "/metrics", "/v1/resync"] {
        let answer = control_plane.get(path).await.expect(path);
        assert_eq!(
            answer["error"], "no such endpoint",
            "{path} on the main listener"
        );
    }
    let page = reqwest::get(format!("{admin}/"))
        .await
        .expect("the status page")
        .text()
        .await
        .expect("HTML");
    assert!(page.contains("<html"), "{page}");
    let resyncs = "zklb_resyncs_total";
    assert_eq!(scrape(&format!("{admin}/metrics"), resyncs).await, 0.0);

    let resync = format!("{admin}/v1/resync");
    for authorization in [None, Some("Bearer a7c1-operators-only-2f9f"), Some(token)] {
        let (status, challenge, body) = post(&resync, authorization).await;
        assert_eq!(status, 401, "{authorization:?}: {body}");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"zklb\""));
        assert!(body["error"]
            .as_str()
            .expect("a reason")
            .contains("admin token"));
    }
    let (status, _, body) = post(&resync, Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 202, "{body}");
    let done = eventually(Duration::from_secs(10), "the resync is done", || async {
        match scrape(&format!("{admin}/metrics"), resyncs).await {
            0.0 => Err("not yet".to_string()),
            done => Ok(done),
        }
    })
    .await;
    assert_eq!(done, 1.0, "one request, one full read");
    assert!(control_plane
        .log()
        .contains("reading every registry root again, as requested"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_no_request_changes_state() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let url = format!("{}/v1/resync", control_plane.url);
    let (status, _, body) = post(&url, Some("Bearer anything-at-all-long-enough")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]
        .as_str()
        .expect("a reason")
        .contains("--admin-token-file"));
    assert_eq!(control_plane.metric("zklb_resyncs_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_marked_secret_is_served_nowhere() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start_with(
        &zookeeper,
        &["/services=curator"],
        &["--secret-metadata=*password*,internal.*"],
        dir.path(),
    )
    .await;
    let client = zookeeper.client().await;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    client
        .create("/services/orders", b"", &persistent)
        .await
        .expect("the service");
    // As Spring Cloud Zookeeper writes it when an application's discovery metadata carries a
    // datasource password and an internal build id.
    let instance = r#"{"name": "orders", "id": "o1", "address": "127.0.0.1", "port": 8080,
        "payload": {"@class": "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
        "id": "orders", "name": "orders", "metadata": {"zone": "eu-1a", "instance_status": "UP",
        "spring.datasource.Password": "hunter2-orders", "internal.build": "b-4471"}}}"#;
    client
        .create(
            "/services/orders/o1",
            instance.as_bytes(),
            &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .expect("the instance");
    let service = eventually(
        Duration::from_secs(10),
        "the instance is listed",
        || async {
            let service = control_plane.get("/v1/services/orders").await?;
            if service["instances"]
                .as_array()
                .is_some_and(|all| !all.is_empty())
            {
                Ok(service)
            } else {
                Err(service.to_string())
            }
        },
    )
    .await;
    assert_eq!(service["instances"][0]["metadata"]["zone"], "eu-1a");
    let page = reqwest::get(&control_plane.url)
        .await
        .expect("the status page")
        .text()
        .await
        .expect("HTML");
    let answers = [
        service.to_string(),
        control_plane
            .get("/v1/services")
            .await
            .expect("list")
            .to_string(),
        control_plane
            .get("/v1/changes")
            .await
            .expect("changes")
            .to_string(),
        page,
    ];
    for answer in &answers {
        for secret in ["hunter2-orders", "spring.datasource.Password", "b-4471"] {
            assert!(!answer.contains(secret), "{secret} served in {answer}");
        }
    }
    assert!(answers[3].contains("eu-1a"), "the page shows the instance");
}
