//! Instances registered in ZooKeeper the way Curator x-discovery registers them: an ephemeral
//! znode `<root>/<service>/<id>` holding the instance's JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use zklb_agent::curator::Instance;
use zookeeper_client::{Acls, Client, CreateMode};

/// The Curator x-discovery JSON of an instance on 127.0.0.1, in rotation.
fn curator_instance(service: &str, id: &str, port: u16, registered_ms: u64) -> Vec<u8> {
    Instance::new(service, id, "127.0.0.1", port).to_json(true, registered_ms)
}

/// An instance on 127.0.0.1 of registry weight `weight` (Spring Cloud's `metadata.weight`).
pub fn weighted_instance(service: &str, id: &str, port: u16, weight: u32) -> Instance {
    let mut instance = Instance::new(service, id, "127.0.0.1", port);
    instance
        .metadata
        .insert("weight".into(), weight.to_string());
    instance
}

/// Creates the service's persistent znode (and the root) if missing.
pub async fn create_service(zookeeper: &Client, root: &str, service: &str) -> anyhow::Result<()> {
    let path = format!("{root}/{service}");
    zookeeper
        .mkdir(&path, &CreateMode::Persistent.with_acls(Acls::anyone_all()))
        .await
        .with_context(|| format!("creating {path}"))
}

/// Registers an instance on 127.0.0.1 of an existing service; returns its znode once the create
/// has returned.
pub async fn register(
    zookeeper: &Client,
    root: &str,
    service: &str,
    id: &str,
    port: u16,
) -> anyhow::Result<String> {
    register_instance(
        zookeeper,
        root,
        &Instance::new(service, id, "127.0.0.1", port),
    )
    .await
}

/// Registers `instance` (of an existing service); returns its znode once the create has
/// returned.
pub async fn register_instance(
    zookeeper: &Client,
    root: &str,
    instance: &Instance,
) -> anyhow::Result<String> {
    let path = format!("{root}/{}/{}", instance.service, instance.id);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .unwrap_or(0);
    zookeeper
        .create(
            &path,
            &instance.to_json(true, now_ms),
            &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
        )
        .await
        .with_context(|| format!("creating {path}"))?;
    Ok(path)
}

/// Registers `ports.len()` instances `<prefix>-<i>` of an existing service, sending each batch of
/// creates before awaiting any (ZooKeeper answers them in order), so that thousands take seconds.
pub async fn register_many(
    zookeeper: &Client,
    root: &str,
    service: &str,
    prefix: &str,
    ports: &[u16],
) -> anyhow::Result<()> {
    let mode = CreateMode::Ephemeral.with_acls(Acls::anyone_all());
    for (batch, chunk) in ports.chunks(500).enumerate() {
        let paths: Vec<(String, String, u16)> = chunk
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let id = format!("{prefix}-{}", batch * 500 + i);
                (format!("{root}/{service}/{id}"), id, *port)
            })
            .collect();
        let pending: Vec<_> = paths
            .iter()
            .map(|(path, id, port)| {
                zookeeper.create(path, &curator_instance(service, id, *port, 0), &mode)
            })
            .collect();
        for (created, (path, _, _)) in pending.into_iter().zip(&paths) {
            created.await.with_context(|| format!("creating {path}"))?;
        }
    }
    Ok(())
}

/// `services` services `svc-<n>` under `root`, each of `per_service` instances `i-<k>` on ports
/// from 20000 up: the bulk of a large registry, whose instances are never sent requests.
pub async fn register_bulk(
    zookeeper: &Client,
    root: &str,
    services: usize,
    per_service: usize,
) -> anyhow::Result<()> {
    let ports: Vec<u16> = (0..per_service).map(|i| 20_000 + i as u16).collect();
    for s in 0..services {
        let service = format!("svc-{s}");
        create_service(zookeeper, root, &service).await?;
        register_many(zookeeper, root, &service, "i", &ports).await?;
    }
    Ok(())
}

pub async fn deregister(zookeeper: &Client, path: &str) -> anyhow::Result<()> {
    zookeeper
        .delete(path, None)
        .await
        .with_context(|| format!("deleting {path}"))
}
