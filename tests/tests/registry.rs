//! The control plane's registry against real ZooKeeper: versions every replica agrees on, and
//! malformed znodes that cost nothing but themselves.

use std::time::Duration;

use serde_json::{json, Value};
use zklb_tests::{eventually, ControlPlane, ZooKeeper};
use zookeeper_client::{Acls, Client, CreateMode};

fn curator(id: &str, port: u16) -> Vec<u8> {
    json_instance("orders", id, port)
}

fn json_instance(service: &str, id: &str, port: u16) -> Vec<u8> {
    serde_json::to_vec(&json!({"name": service, "id": id, "address": "127.0.0.1", "port": port,
        "sslPort": null, "payload": null, "registrationTimeUTC": 1_732_000_000_000_i64, "serviceType": "DYNAMIC"}))
    .expect("json")
}

async fn register(client: &Client, id: &str, data: &[u8]) {
    client
        .create(
            &format!("/services/orders/{id}"),
            data,
            &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
        )
        .await
        .unwrap_or_else(|error| panic!("registering {id}: {error}"));
}

async fn create_service(client: &Client, service: &str) {
    client
        .mkdir(
            &format!("/services/{service}"),
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .unwrap_or_else(|error| panic!("creating /services/{service}: {error}"));
}

/// The registry a control plane publishes: its version and services, without the freshness
/// that says when this replica last read it.
async fn services(control_plane: &ControlPlane) -> Result<Value, String> {
    let list = control_plane.get("/v1/services").await?;
    Ok(json!({"version": list["version"], "services": list["services"]}))
}

fn instance_ports(listing: &Value) -> Vec<u64> {
    let mut ports: Vec<u64> = listing["services"]["orders"]["instances"]
        .as_array()
        .map(|instances| {
            instances
                .iter()
                .filter_map(|i| i["port"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    ports.sort();
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_publish_the_same_version_for_the_same_registry() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let first = ControlPlane::start(&zookeeper, "/services", &dir.path().join("first")).await;
    let registrar = zookeeper.client().await;
    create_service(&registrar, "orders").await;
    for (id, port) in [("a", 9001), ("b", 9002), ("c", 9003)] {
        register(&registrar, id, &curator(id, port)).await;
    }
    registrar
        .delete("/services/orders/b", None)
        .await
        .expect("deleting b");
    registrar
        .set_data("/services/orders/c", &curator("c", 9004), None)
        .await
        .expect("moving c");

    // A replica started later reads the same ZooKeeper state from scratch.
    let second = ControlPlane::start(&zookeeper, "/services", &dir.path().join("second")).await;
    let (one, two) = eventually(
        Duration::from_secs(20),
        "both replicas list a and the moved c",
        || async {
            let one = services(&first).await?;
            let two = services(&second).await?;
            if instance_ports(&one) == [9001, 9004] && instance_ports(&two) == [9001, 9004] {
                Ok((one, two))
            } else {
                Err(format!("{one} / {two}"))
            }
        },
    )
    .await;
    assert_eq!(one, two, "replicas disagree on the same ZooKeeper state");
    let version = one["version"].as_i64().expect("version");

    // A change moves the version forward on both, to the same value.
    register(&registrar, "d", &curator("d", 9005)).await;
    let newer = eventually(Duration::from_secs(20), "both replicas see d", || async {
        let one = services(&first).await?;
        let two = services(&second).await?;
        if instance_ports(&one).len() == 3 && one == two {
            Ok(one)
        } else {
            Err(format!("{one} / {two}"))
        }
    })
    .await;
    assert!(newer["version"].as_i64().expect("version") > version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_znodes_are_skipped_counted_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start(&zookeeper, "/services", dir.path()).await;
    let registrar = zookeeper.client().await;
    create_service(&registrar, "orders").await;
    register(&registrar, "good", &curator("good", 9001)).await;
    register(
        &registrar,
        "broken",
        b"{\"address\": \"127.0.0.1\", \"port\": \"eighty\"}",
    )
    .await;
    // Filed under the wrong service: routing it would send orders' requests to billing.
    register(
        &registrar,
        "stray",
        &json_instance("billing", "stray", 9003),
    )
    .await;
    // A service name that Envoy and Host headers cannot carry.
    create_service(&registrar, "no spaces").await;

    eventually(
        Duration::from_secs(20),
        "the good instance is listed alone",
        || async {
            let listing = services(&control_plane).await?;
            let skipped = control_plane
                .metric_sum("zklb_malformed_znodes_total")
                .await;
            let rejected = control_plane
                .metric("zklb_rejected_service_names_total")
                .await;
            let only_orders = listing["services"]
                .as_object()
                .map(|services| services.len())
                == Some(1);
            if instance_ports(&listing) == [9001]
                && skipped >= 2.0
                && rejected == 1.0
                && only_orders
            {
                Ok(())
            } else {
                Err(format!("{listing}; skipped {skipped}"))
            }
        },
    )
    .await;
    assert!(
        control_plane
            .log()
            .contains("skipping malformed instance znode"),
        "no log line names the malformed znode"
    );

    // Repairing the znode brings the instance in.
    registrar
        .set_data("/services/orders/broken", &curator("broken", 9002), None)
        .await
        .expect("repairing the znode");
    eventually(
        Duration::from_secs(20),
        "the repaired instance is listed",
        || async {
            let listing = services(&control_plane).await?;
            if instance_ports(&listing) == [9001, 9002] {
                Ok(())
            } else {
                Err(listing.to_string())
            }
        },
    )
    .await;
}

/// Under churn in several services at once, a version always names one registry: the same
/// version never comes with two different lists, from one replica or from two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_names_one_registry_even_under_concurrent_changes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let replicas = [
        ControlPlane::start(&zookeeper, "/services", &dir.path().join("first")).await,
        ControlPlane::start(&zookeeper, "/services", &dir.path().join("second")).await,
    ];
    let registrar = zookeeper.client().await;
    for service in ["alpha", "beta"] {
        create_service(&registrar, service).await;
        registrar
            .create(
                &format!("/services/{service}/one"),
                &curator("one", 1),
                &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
            )
            .await
            .expect("registering");
    }

    let writers: Vec<_> = ["alpha", "beta"]
        .into_iter()
        .map(|service| {
            let connect = zookeeper.connect.clone();
            tokio::spawn(async move {
                let client = zookeeper_client::Client::connect(&connect)
                    .await
                    .expect("connecting");
                for port in 2..=1_000 {
                    client
                        .set_data(
                            &format!("/services/{service}/one"),
                            &curator("one", port),
                            None,
                        )
                        .await
                        .expect("moving the instance");
                }
            })
        })
        .collect();

    let mut seen: std::collections::BTreeMap<i64, Value> = std::collections::BTreeMap::new();
    let http = reqwest::Client::new();
    while writers.iter().any(|writer| !writer.is_finished()) {
        for replica in &replicas {
            let listing: Value = http
                .get(format!("{}/v1/services", replica.url))
                .send()
                .await
                .expect("GET /v1/services")
                .json()
                .await
                .expect("JSON");
            let version = listing["version"].as_i64().expect("version");
            let services = listing["services"].clone();
            if let Some(earlier) = seen.insert(version, services.clone()) {
                assert_eq!(
                    earlier, services,
                    "version {version} named two different registries"
                );
            }
        }
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    assert!(
        seen.len() > 10,
        "too few versions observed to mean anything: {}",
        seen.len()
    );
}
