//! The registries people run, read from real ZooKeeper: every format side by side, garbage that
//! costs nothing but itself, subtrees that cannot be read, host names, churn that never pauses,
//! and a registry of 100,000 instances.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zklb_tests::proxy::Relay;
use zklb_tests::registrars::KazooRegistrar;
use zklb_tests::{eventually, ControlPlane, ZooKeeper};
use zookeeper_client::{self as zk, Acl, AuthId, Client, CreateMode, Permission};

fn curator(service: &str, id: &str, address: &str, port: u16) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"name": service, "id": id, "address": address, "port": port,
        "sslPort": null, "payload": null, "registrationTimeUTC": 1_732_000_000_000_i64,
        "serviceType": "DYNAMIC"}),
    )
    .expect("json")
}

fn persistent() -> zk::CreateOptions<'static> {
    CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

async fn create(client: &Client, path: &str, data: &[u8]) {
    client
        .create(path, data, &persistent())
        .await
        .unwrap_or_else(|error| panic!("creating {path}: {error}"));
}

async fn mkdir(client: &Client, path: &str) {
    client
        .mkdir(path, &persistent())
        .await
        .unwrap_or_else(|error| panic!("creating {path}: {error}"));
}

/// Each listed service's instances as `address:port`, sorted.
fn hosts(listing: &Value) -> BTreeMap<String, Vec<String>> {
    let services = listing["services"].as_object().cloned().unwrap_or_default();
    services
        .into_iter()
        .map(|(name, service)| {
            let mut hosts: Vec<String> = service["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|instance| {
                    format!(
                        "{}:{}",
                        instance["address"].as_str().unwrap_or("?"),
                        instance["port"]
                    )
                })
                .collect();
            hosts.sort();
            (name, hosts)
        })
        .collect()
}

fn expected(hosts: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    hosts
        .iter()
        .map(|(name, hosts)| {
            (
                name.to_string(),
                hosts.iter().map(|h| h.to_string()).collect(),
            )
        })
        .collect()
}

/// Every format a registrar writes, read side by side: several roots, each in its own format,
/// and one root in `auto` that holds a service of each format and says which it chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_is_read_from_several_roots_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start_reading(
        &zookeeper,
        &[
            "/services=auto",
            "/aurora=serverset:http",
            "/nerve=nerve",
            "/dubbo=dubbo",
            "/seed=apisix",
        ],
        dir.path(),
    )
    .await;
    let registrar = zookeeper.client().await;
    mkdir(&registrar, "/services/curated").await;
    create(
        &registrar,
        "/services/curated/c1",
        &curator("curated", "c1", "127.0.0.1", 9001),
    )
    .await;
    let provider = |port: u16, weight: u32| {
        json!({"format": "dubbo", "root": "/dubbo", "interface": "com.example.Pay",
               "host": "127.0.0.1", "port": port,
               "params": {"application": "pay", "weight": weight, "timestamp": 1_732_000_000_000_i64}})
    };
    let _kazoo = KazooRegistrar::register(
        &zookeeper,
        "formats",
        json!([
            {"format": "serverset", "path": "/aurora/www/prod/hello", "host": "127.0.0.1",
             "port": 9101, "endpoints": {"http": 9111}, "shard": 0},
            {"format": "serverset", "path": "/aurora/www/prod/hello", "host": "127.0.0.1",
             "port": 9102, "endpoints": {"http": 9112}, "shard": 1},
            {"format": "serverset-vector", "path": "/aurora/www/prod/hello",
             "vector": [{"select": "shard=1", "weight": 2.5}]},
            {"format": "nerve", "path": "/nerve/web", "host": "127.0.0.1", "port": 9201,
             "instance_id": "i-1", "weight": 3, "labels": {"az": "eu-1a"}},
            provider(9301, 250),
            {"format": "apisix", "path": "/seed/search",
             "nodes": [{"host": "127.0.0.1", "port": 9401, "weight": 5},
                       {"host": "127.0.0.1", "port": 9402}]},
            // The same formats again, under the auto root.
            {"format": "serverset", "path": "/services/jobs/prod/indexer", "host": "127.0.0.1",
             "port": 9501},
            {"format": "nerve", "path": "/services/cache", "host": "127.0.0.1", "port": 9601,
             "instance_id": "i-2"},
            {"format": "dubbo", "root": "/services", "interface": "com.example.Ship",
             "host": "127.0.0.1", "port": 9701},
            {"format": "apisix", "path": "/services/images",
             "nodes": [{"host": "127.0.0.1", "port": 9801}]},
        ]),
        dir.path(),
    )
    .await;
    let want = expected(&[
        ("cache", &["127.0.0.1:9601"]),
        ("com.example.Pay", &["127.0.0.1:9301"]),
        ("com.example.Ship", &["127.0.0.1:9701"]),
        ("curated", &["127.0.0.1:9001"]),
        ("images", &["127.0.0.1:9801"]),
        ("jobs.prod.indexer", &["127.0.0.1:9501"]),
        ("search", &["127.0.0.1:9401", "127.0.0.1:9402"]),
        ("web", &["127.0.0.1:9201"]),
        ("www.prod.hello", &["127.0.0.1:9111", "127.0.0.1:9112"]),
    ]);
    let listing = eventually(
        Duration::from_secs(20),
        "every format is listed",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            if hosts(&listing) == want {
                Ok(listing)
            } else {
                Err(format!("{:?}", hosts(&listing)))
            }
        },
    )
    .await;
    let services = &listing["services"];
    let formats: BTreeMap<&str, &str> = services
        .as_object()
        .expect("services")
        .iter()
        .map(|(name, service)| (name.as_str(), service["format"].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(
        formats,
        BTreeMap::from([
            ("cache", "nerve"),
            ("com.example.Pay", "dubbo"),
            ("com.example.Ship", "dubbo"),
            ("curated", "curator"),
            ("images", "apisix"),
            ("jobs.prod.indexer", "serverset"),
            ("search", "apisix"),
            ("web", "nerve"),
            ("www.prod.hello", "serverset"),
        ])
    );
    let instance = |service: &str, port: u16| -> Value {
        services[service]["instances"]
            .as_array()
            .and_then(|all| all.iter().find(|i| i["port"] == port).cloned())
            .unwrap_or_else(|| panic!("no {service} instance on {port}: {services}"))
    };
    // ServerSet weights are Finagle's times 100; the vector selects shard 1.
    assert_eq!(instance("www.prod.hello", 9111)["weight"], 100);
    assert_eq!(instance("www.prod.hello", 9112)["weight"], 250);
    assert_eq!(instance("www.prod.hello", 9112)["metadata"]["shard"], "1");
    assert!(instance("www.prod.hello", 9112)["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("member_")));
    assert_eq!(instance("web", 9201)["weight"], 3);
    assert_eq!(instance("web", 9201)["zone"], "eu-1a");
    assert_eq!(instance("web", 9201)["id"], "i-1");
    assert_eq!(instance("com.example.Pay", 9301)["weight"], 250);
    assert_eq!(
        instance("com.example.Pay", 9301)["registered_at"],
        1_732_000_000_000_i64
    );
    assert_eq!(
        instance("com.example.Pay", 9301)["metadata"]["application"],
        "pay"
    );
    assert_eq!(
        instance("com.example.Ship", 9701)["weight"],
        100,
        "Dubbo's default"
    );
    assert_eq!(instance("search", 9401)["weight"], 5);
    assert_eq!(
        instance("search", 9402)["weight"],
        100,
        "apisix-seed's default"
    );
    for (service, port, source) in [
        ("cache", 9601, "nerve"),
        ("images", 9801, "apisix"),
        ("jobs.prod.indexer", 9501, "serverset"),
        ("curated", 9001, "curator"),
    ] {
        assert_eq!(instance(service, port)["source"], source);
        assert_eq!(instance(service, port)["status"], "up");
    }
    assert_eq!(
        services["www.prod.hello"]["znode"], "/aurora/www/prod/hello",
        "a ServerSet is named by its path"
    );
    assert!(
        !services.as_object().expect("services").contains_key("jobs"),
        "a directory of ServerSets is no service"
    );

    // A provider disabled by its registrar drains; a STOPPING member too.
    let _more = KazooRegistrar::register(
        &zookeeper,
        "draining",
        json!([
            {"format": "dubbo", "root": "/dubbo", "interface": "com.example.Pay",
             "host": "127.0.0.1", "port": 9302, "params": {"disabled": "true"}},
            {"format": "serverset", "path": "/aurora/www/prod/hello", "host": "127.0.0.1",
             "port": 9103, "endpoints": {"http": 9113}, "status": "STOPPING"},
        ]),
        dir.path(),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "draining instances are listed as such",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            let status = |service: &str, port: u16| {
                listing["services"][service]["instances"]
                    .as_array()
                    .and_then(|all| all.iter().find(|i| i["port"] == port))
                    .map(|instance| instance["status"].clone())
            };
            match (
                status("com.example.Pay", 9302),
                status("www.prod.hello", 9113),
            ) {
                (Some(pay), Some(hello)) if pay == "draining" && hello == "draining" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// Garbage of every kind, in every format: each bad znode is skipped with a reason, counted by
/// format and reason, and named in the listing; every good instance and service stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_skipped_and_reported_and_the_rest_is_intact() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let registrar = zookeeper.client().await;
    mkdir(&registrar, "/services/orders").await;
    create(
        &registrar,
        "/services/orders/good",
        &curator("orders", "good", "127.0.0.1", 9001),
    )
    .await;
    let _kazoo = KazooRegistrar::register(
        &zookeeper,
        "good",
        json!([
            {"format": "nerve", "path": "/services/web", "host": "127.0.0.1", "port": 9002,
             "instance_id": "i-1"},
            {"format": "apisix", "path": "/services/seed", "nodes": [{"host": "127.0.0.1", "port": 9003}]},
            {"format": "dubbo", "root": "/services", "interface": "com.example.Pay",
             "host": "127.0.0.1", "port": 9004},
            {"format": "serverset", "path": "/services/job", "host": "127.0.0.1", "port": 9005},
        ]),
        dir.path(),
    )
    .await;
    let good = expected(&[
        ("com.example.Pay", &["127.0.0.1:9004"]),
        ("job", &["127.0.0.1:9005"]),
        ("orders", &["127.0.0.1:9001"]),
        ("seed", &["127.0.0.1:9003"]),
        ("web", &["127.0.0.1:9002"]),
    ]);
    eventually(
        Duration::from_secs(20),
        "the good registry is listed",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            (hosts(&listing) == good)
                .then_some(())
                .ok_or_else(|| listing.to_string())
        },
    )
    .await;

    let port = |port: i64| {
        serde_json::to_vec(&json!({"name": "orders", "address": "127.0.0.1", "port": port}))
            .expect("json")
    };
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("/services/orders/text", b"hello".to_vec()),
        ("/services/orders/binary", vec![0xff, 0xfe, 0x00, 0x01]),
        ("/services/orders/huge", vec![b'x'; 1_000_000]),
        ("/services/orders/port-zero", port(0)),
        ("/services/orders/port-too-big", port(70_000)),
        (
            "/services/orders/no-address",
            br#"{"name": "orders", "port": 80}"#.to_vec(),
        ),
        (
            "/services/orders/stray",
            curator("billing", "stray", "127.0.0.1", 9009),
        ),
        (
            "/services/web/i-2_0000000002",
            br#"{"host": "127.0.0.1", "name": "i-2"}"#.to_vec(),
        ),
        (
            "/services/job/member_0000000099",
            br#"{"serviceEndpoint": {"host": "127.0.0.1", "port": 0}, "status": "ALIVE"}"#.to_vec(),
        ),
        ("/services/com.example.Pay/providers/not-a-url", Vec::new()),
        ("/services/badseed", br#"[{"port": 80}]"#.to_vec()),
    ];
    for (path, data) in &garbage {
        create(&registrar, path, data).await;
    }
    // Names that cannot be routed, and a name that differs only in case from an older one.
    mkdir(&registrar, "/services/has space").await;
    create(
        &registrar,
        "/services/has space/1",
        &curator("has space", "1", "127.0.0.1", 9010),
    )
    .await;
    let long_name = format!("/services/{}", "n".repeat(201));
    mkdir(&registrar, &long_name).await;
    mkdir(&registrar, "/services/Orders").await;
    create(
        &registrar,
        "/services/Orders/1",
        &curator("Orders", "1", "127.0.0.1", 9011),
    )
    .await;

    let counts = [
        ("curator", "not_json", 3.0),
        ("curator", "invalid_field", 2.0),
        ("curator", "missing_field", 1.0),
        ("curator", "wrong_service", 1.0),
        ("nerve", "missing_field", 1.0),
        ("serverset", "invalid_field", 1.0),
        ("dubbo", "invalid_field", 1.0),
        ("apisix", "missing_field", 1.0),
    ];
    let listing = eventually(
        Duration::from_secs(20),
        "every bad znode is reported",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            let malformed = listing["malformed"].as_object().map_or(0, |m| m.len());
            let conflict = listing["conflicts"]["Orders"].is_string();
            let rejected = control_plane
                .metric("zklb_rejected_service_names_total")
                .await;
            if malformed == garbage.len() && conflict && rejected == 2.0 {
                Ok(listing)
            } else {
                Err(format!(
                    "{malformed} malformed, {rejected} rejected: {listing}"
                ))
            }
        },
    )
    .await;
    let mut with_badseed = good.clone();
    with_badseed.insert("badseed".into(), Vec::new());
    assert_eq!(hosts(&listing), with_badseed, "the good registry is intact");
    for (format, reason, count) in counts {
        let series =
            format!("zklb_malformed_znodes_total{{format=\"{format}\",reason=\"{reason}\"}}");
        assert_eq!(control_plane.metric(&series).await, count, "{series}");
    }
    assert_eq!(
        control_plane
            .metric_sum("zklb_malformed_znodes_total")
            .await,
        garbage.len() as f64
    );
    let reason = |path: &str| {
        listing["malformed"][path]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(reason("/services/orders/port-too-big").contains("70000 is not a TCP port"));
    assert!(reason("/services/orders/stray").contains("\"billing\" is not the service"));
    assert!(reason("/services/web/i-2_0000000002").contains("missing field `port`"));
    assert!(reason("/services/com.example.Pay/providers/not-a-url").contains("not a provider URL"));
    assert!(listing["conflicts"]["Orders"]
        .as_str()
        .is_some_and(|why| why.contains("differs only in case from \"orders\"")));
    let log = control_plane.log();
    for (path, _) in &garbage {
        let line = log
            .lines()
            .find(|line| line.contains("skipping malformed instance znode") && line.contains(path))
            .unwrap_or_else(|| panic!("no log line names {path}"));
        assert!(line.contains("format="), "{line}");
    }
    assert!(log.contains("has space"), "the bad name is logged");
}

/// A subtree that cannot be read (its ACL denies this reader) is reported and read again with
/// a back-off, while everything else is served; once it can be read, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_subtree_is_reported_and_read_again_later() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let registrar = zookeeper.client().await;
    mkdir(&registrar, "/services/open").await;
    create(
        &registrar,
        "/services/open/1",
        &curator("open", "1", "127.0.0.1", 9001),
    )
    .await;
    // Everyone may administer it; only a host that is not this one may read it.
    let closed = [
        Acl::new(
            Permission::WRITE | Permission::CREATE | Permission::DELETE | Permission::ADMIN,
            AuthId::anyone(),
        ),
        Acl::new(Permission::READ, AuthId::new("ip", "10.255.255.1")),
    ];
    registrar
        .create(
            "/services/secret",
            b"",
            &CreateMode::Persistent.with_acls(zk::Acls::new(&closed)),
        )
        .await
        .expect("creating /services/secret");
    create(
        &registrar,
        "/services/secret/1",
        &curator("secret", "1", "127.0.0.1", 9002),
    )
    .await;

    eventually(
        Duration::from_secs(20),
        "the unreadable znode is reported",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            let reason = listing["unreadable"]["/services/secret"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let open = hosts(&listing).get("open").cloned();
            if reason.contains("not authorized") && open == Some(vec!["127.0.0.1:9001".into()]) {
                Ok(())
            } else {
                Err(listing.to_string())
            }
        },
    )
    .await;
    assert_eq!(control_plane.metric("zklb_unreadable_znodes").await, 1.0);
    let health = control_plane.health().await.expect("health");
    assert_eq!(health["status"], "serving", "the rest is served: {health}");

    registrar
        .set_acl(
            "/services/secret",
            &[Acl::new(Permission::ALL, AuthId::anyone())],
            None,
        )
        .await
        .expect("opening /services/secret");
    eventually(
        Duration::from_secs(30),
        "the opened subtree is read again",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            let secret = hosts(&listing).get("secret").cloned();
            if secret == Some(vec!["127.0.0.1:9002".into()]) && listing.get("unreadable").is_none()
            {
                Ok(())
            } else {
                Err(listing.to_string())
            }
        },
    )
    .await;
}

/// A registrar that gives a host name (Spring Cloud Zookeeper does unless told to prefer IPs)
/// is routed at the address it resolves to; a name that does not resolve is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_are_resolved_and_those_that_do_not_resolve_are_reported() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let registrar = zookeeper.client().await;
    mkdir(&registrar, "/services/spring").await;
    create(
        &registrar,
        "/services/spring/a",
        &curator("spring", "a", "localhost", 9001),
    )
    .await;
    create(
        &registrar,
        "/services/spring/b",
        &curator("spring", "b", "nowhere.invalid", 9002),
    )
    .await;
    let listing = eventually(
        Duration::from_secs(30),
        "localhost resolves, nowhere does not",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            let unresolved = listing["unresolved"]["nowhere.invalid"].is_string();
            let spring = hosts(&listing).remove("spring").unwrap_or_default();
            if spring.contains(&"127.0.0.1:9001".to_string()) && unresolved {
                Ok(listing)
            } else {
                Err(listing.to_string())
            }
        },
    )
    .await;
    let instances = listing["services"]["spring"]["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let resolved = instances
        .iter()
        .find(|i| i["id"] == "a")
        .expect("a is listed");
    assert_eq!(resolved["hostname"], "localhost");
    let unresolved = instances
        .iter()
        .find(|i| i["id"] == "b")
        .expect("b is listed");
    assert_eq!(
        unresolved["address"], "nowhere.invalid",
        "not routable until it resolves"
    );
    assert_eq!(control_plane.metric("zklb_unresolved_hostnames").await, 1.0);
    // Envoy is given only the resolved instance: the control plane's own view of routability.
    let service: zklb_wire::Service =
        serde_json::from_value(listing["services"]["spring"].clone()).expect("a Service");
    let routable: Vec<String> = service
        .routable_instances()
        .iter()
        .map(|i| i.host())
        .collect();
    assert_eq!(routable, ["127.0.0.1:9001"]);
}

/// A rolling replacement of 200 instances that never pauses: the registry is still published at
/// least every second, and ends with exactly the final set.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_replacement_under_churn_is_published_every_second_and_ends_exact() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let registrar = zookeeper.client().await;
    mkdir(&registrar, "/services/rolling").await;
    const INSTANCES: u16 = 200;
    const ROUNDS: u16 = 5;
    let path = |generation: u16, slot: u16| format!("/services/rolling/g{generation}-{slot}");
    for slot in 0..INSTANCES {
        create(
            &registrar,
            &path(0, slot),
            &curator("rolling", "x", "127.0.0.1", 10_000 + slot),
        )
        .await;
    }
    let listing = eventually(
        Duration::from_secs(20),
        "the first generation is listed",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            let count = hosts(&listing).get("rolling").map_or(0, Vec::len);
            (count == usize::from(INSTANCES))
                .then_some(listing.clone())
                .ok_or(listing.to_string())
        },
    )
    .await;
    let first_version = listing["version"].as_i64().expect("version");

    // Each slot is replaced by its next generation, slot after slot, round after round, with
    // two writers so that changes never pause.
    let started = Instant::now();
    let writers: Vec<_> = (0..2u16)
        .map(|writer| {
            let connect = zookeeper.connect.clone();
            tokio::spawn(async move {
                let client = Client::connect(&connect).await.expect("connecting");
                for generation in 1..=ROUNDS {
                    for slot in (writer..INSTANCES).step_by(2) {
                        let data = curator(
                            "rolling",
                            "x",
                            "127.0.0.1",
                            10_000 + slot + generation * 1000,
                        );
                        client
                            .create(&path(generation, slot), &data, &persistent())
                            .await
                            .expect("creating");
                        client
                            .delete(&path(generation - 1, slot), None)
                            .await
                            .expect("deleting");
                    }
                }
            })
        })
        .collect();
    let http = reqwest::Client::new();
    let mut version = first_version;
    let mut published = vec![started];
    while writers.iter().any(|writer| !writer.is_finished()) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the churn did not end"
        );
        let response = http
            .get(format!(
                "{}/v1/services?after={version}&wait=2",
                control_plane.url
            ))
            .send()
            .await
            .expect("GET /v1/services");
        if response.status() == 200 {
            let listing: Value = response.json().await.expect("JSON");
            version = listing["version"].as_i64().expect("version");
            published.push(Instant::now());
        }
    }
    let churn = started.elapsed();
    for writer in writers {
        writer.await.expect("writer");
    }
    let gaps: Vec<Duration> = published.windows(2).map(|pair| pair[1] - pair[0]).collect();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    println!(
        "churn of {:?}: {} publications, longest gap {longest:?}",
        churn,
        published.len() - 1
    );
    assert!(
        published.len() > 2,
        "too short a churn to mean anything: {churn:?}"
    );
    assert!(
        longest <= Duration::from_secs(1),
        "no publication for {longest:?}"
    );

    let last: BTreeSet<String> = (0..INSTANCES)
        .map(|slot| format!("127.0.0.1:{}", 10_000 + slot + ROUNDS * 1000))
        .collect();
    eventually(
        Duration::from_secs(20),
        "exactly the last generation is listed",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            let listed: BTreeSet<String> = hosts(&listing)
                .remove("rolling")
                .unwrap_or_default()
                .into_iter()
                .collect();
            (listed == last)
                .then_some(())
                .ok_or(format!("{} listed", listed.len()))
        },
    )
    .await;
}

/// 100,000 instances (1,000 services of 100) are read in full after a start, and again after
/// the control plane's connection is cut while the registry changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_thousand_instances_are_read_after_a_start_and_after_a_reconnect() {
    const SERVICES: usize = 1_000;
    const PER_SERVICE: usize = 100;
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let registrar = zookeeper.client().await;
    mkdir(&registrar, "/services").await;
    let generated = Instant::now();
    // Many creates per transaction, far below jute.maxbuffer each.
    let instance = |service: usize, n: usize| {
        let name = format!("s{service:04}");
        let port = u16::try_from(10_000 + n).expect("a port");
        (
            format!("/services/{name}/i{n:03}"),
            curator(&name, &format!("i{n:03}"), "10.0.0.1", port),
        )
    };
    for service in 0..SERVICES {
        let mut writer = registrar.new_multi_writer();
        writer
            .add_create(&format!("/services/s{service:04}"), b"", &persistent())
            .expect("queueing");
        for n in 0..PER_SERVICE {
            let (path, data) = instance(service, n);
            writer
                .add_create(&path, &data, &persistent())
                .expect("queueing");
        }
        writer.commit().await.expect("creating a service");
    }
    println!(
        "generated {} instances in {:?}",
        SERVICES * PER_SERVICE,
        generated.elapsed()
    );

    let relay = Relay::start(zookeeper.connect.parse().expect("address")).await;
    let started = Instant::now();
    let control_plane = ControlPlane::launch_reading(
        zklb_tests::stack::free_port(),
        &relay.address.to_string(),
        &["/services=auto"],
        dir.path(),
    )
    .await;
    let count = |expected: f64| {
        let control_plane = &control_plane;
        async move {
            let instances = control_plane.metric("zklb_instances").await;
            let ready = control_plane.get("/readyz").await?;
            if instances == expected && ready["ready"] == true {
                Ok(())
            } else {
                Err(format!("{instances} instances, {ready}"))
            }
        }
    };
    let total = (SERVICES * PER_SERVICE) as f64;
    eventually(Duration::from_secs(120), "every instance is read", || {
        count(total)
    })
    .await;
    println!("read in full {:?} after the start", started.elapsed());

    // Cut off while a service loses half its instances and another gains some: events are lost
    // across a reconnect, so only a complete read after it can know.
    relay.cut();
    control_plane
        .wait_for_status("stale", Duration::from_secs(30))
        .await;
    for n in 0..50 {
        registrar
            .delete(&instance(7, n).0, None)
            .await
            .expect("deleting");
    }
    for n in PER_SERVICE..PER_SERVICE + 20 {
        let (path, data) = instance(8, n);
        create(&registrar, &path, &data).await;
    }
    relay.heal();
    let healed = Instant::now();
    eventually(
        Duration::from_secs(120),
        "the changed registry is read in full",
        || async {
            count(total - 50.0 + 20.0).await?;
            let s0007 = control_plane.get("/v1/services/s0007").await?;
            let s0008 = control_plane.get("/v1/services/s0008").await?;
            let sizes = (
                s0007["instances"].as_array().map(Vec::len),
                s0008["instances"].as_array().map(Vec::len),
            );
            (sizes == (Some(50), Some(120)))
                .then_some(())
                .ok_or(format!("{sizes:?}"))
        },
    )
    .await;
    println!("read in full {:?} after the reconnect", healed.elapsed());
}
