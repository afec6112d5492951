//! Every registry format end to end: instances registered the way each format's registrars do
//! get traffic through Envoy, in the proportions of the weights that format gives them.

use serde_json::json;
use zklb_tests::registrars::KazooRegistrar;
use zklb_tests::stats::{chi_square, fits_shares};
use zklb_tests::Stack;
use zookeeper_client::{Acls, CreateMode};

const WEIGHTS: [u32; 3] = [1, 2, 5];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_format_routes_to_its_instances_by_their_weights() {
    let stack = Stack::start_reading(
        &[
            "/services=auto",
            "/aurora=serverset:http",
            "/nerve=nerve",
            "/dubbo=dubbo",
            "/seed=apisix",
        ],
        r#""policy": "weighted_random""#,
    )
    .await;
    // Three processes, registered under a service of their own; every format's service names
    // the same three with weights 1, 2 and 5 in that format's terms.
    let backends = [
        stack.backend("plain", "b1").await,
        stack.backend("plain", "b2").await,
        stack.backend("plain", "b3").await,
    ];
    let ports: Vec<u16> = backends.iter().map(|backend| backend.port).collect();
    let mut registrations = Vec::new();
    for (i, (&port, weight)) in ports.iter().zip(WEIGHTS).enumerate() {
        // A ServerSet member of shard i, routed on its "http" endpoint, weighted by a vector.
        registrations.push(
            json!({"format": "serverset", "path": "/aurora/www/prod/hello",
            "host": "127.0.0.1", "port": 1, "endpoints": {"http": port}, "shard": i}),
        );
        registrations.push(
            json!({"format": "nerve", "path": "/nerve/web", "host": "127.0.0.1",
            "port": port, "instance_id": format!("i-{i}"), "weight": weight}),
        );
        registrations.push(json!({"format": "dubbo", "root": "/dubbo",
            "interface": "com.example.Pay", "host": "127.0.0.1", "port": port,
            "params": {"weight": weight * 100}}));
    }
    registrations.push(
        json!({"format": "serverset-vector", "path": "/aurora/www/prod/hello",
        "vector": [{"select": "shard=1", "weight": 2.0}, {"select": "shard=2", "weight": 5.0}]}),
    );
    registrations.push(json!({"format": "apisix", "path": "/seed/search",
        "nodes": ports.iter().zip(WEIGHTS).map(|(port, weight)|
            json!({"host": "127.0.0.1", "port": port, "weight": weight})).collect::<Vec<_>>()}));
    let _kazoo = KazooRegistrar::register(
        &stack.zookeeper,
        "formats",
        json!(registrations),
        stack.dir.path(),
    )
    .await;
    let registrar = stack.zookeeper.client().await;
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    registrar
        .mkdir("/services/orders", &persistent)
        .await
        .expect("creating /services/orders");
    for (i, (&port, weight)) in ports.iter().zip(WEIGHTS).enumerate() {
        let instance = json!({"name": "orders", "id": format!("o{i}"), "address": "127.0.0.1",
            "port": port, "payload": {"metadata": {"weight": weight.to_string()}}});
        registrar
            .create(
                &format!("/services/orders/o{i}"),
                &serde_json::to_vec(&instance).expect("json"),
                &persistent,
            )
            .await
            .expect("registering");
    }

    for (service, format) in [
        ("orders", "curator"),
        ("www.prod.hello", "serverset"),
        ("web", "nerve"),
        ("com.example.Pay", "dubbo"),
        ("search", "apisix"),
    ] {
        stack.wait_for_backends(service, &["b1", "b2", "b3"]).await;
        let answers = stack.requests(service, 1_600, 8).await;
        zklb_tests::stack::assert_all_served(&answers);
        let counts = Stack::count_by_backend(&answers);
        let observed: Vec<u64> = ["b1", "b2", "b3"]
            .iter()
            .map(|id| counts.get(*id).copied().unwrap_or(0))
            .collect();
        let shares: Vec<f64> = WEIGHTS
            .iter()
            .map(|&weight| f64::from(weight) / 8.0)
            .collect();
        println!(
            "{format}: shares {observed:?}, chi-square {:.2}",
            chi_square(&observed, &shares)
        );
        // Envoy's fallback would spread evenly: these shares come from the weights the format
        // gave the filter.
        assert!(
            fits_shares(&observed, &shares),
            "{format}: shares {observed:?} do not follow weights {WEIGHTS:?}"
        );
    }
}

/// Spring Cloud Zookeeper registers the host name unless told to prefer IPs: such an instance
/// gets traffic at the address its name resolves to.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_registered_by_host_name_gets_traffic() {
    let stack = Stack::start().await;
    let backend = stack.backend("plain", "b1").await;
    let registrar = stack.zookeeper.client().await;
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    registrar
        .mkdir("/services/spring", &persistent)
        .await
        .expect("creating /services/spring");
    let instance = json!({"name": "spring", "id": "s1", "address": "localhost", "port": backend.port,
        "payload": {"@class": "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
                    "metadata": {"instance_status": "UP"}}});
    registrar
        .create(
            "/services/spring/s1",
            &serde_json::to_vec(&instance).expect("json"),
            &persistent,
        )
        .await
        .expect("registering");
    stack.wait_for_backends("spring", &["b1"]).await;
}
