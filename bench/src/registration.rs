//! Instances registered in ZooKeeper the way Curator x-discovery registers them: an ephemeral
//! znode `<root>/<service>/<id>` holding the instance's JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::json;
use zookeeper_client::{Acls, Client, CreateMode};

/// The Curator x-discovery JSON of an instance on 127.0.0.1.
pub fn curator_instance(service: &str, id: &str, port: u16, registered_ms: u64) -> Vec<u8> {
    let instance = json!({
        "name": service,
        "id": id,
        "address": "127.0.0.1",
        "port": port,
        "sslPort": null,
        "payload": null,
        "registrationTimeUTC": registered_ms,
        "serviceType": "DYNAMIC",
        "uriSpec": {"parts": [
            {"value": "scheme", "variable": true},
            {"value": "://", "variable": false},
            {"value": "address", "variable": true},
            {"value": ":", "variable": false},
            {"value": "port", "variable": true}
        ]}
    });
    instance.to_string().into_bytes()
}

/// Creates the service's persistent znode (and the root) if missing.
pub async fn create_service(zookeeper: &Client, root: &str, service: &str) -> anyhow::Result<()> {
    let path = format!("{root}/{service}");
    zookeeper
        .mkdir(&path, &CreateMode::Persistent.with_acls(Acls::anyone_all()))
        .await
        .with_context(|| format!("creating {path}"))
}

/// Registers an instance of an existing service; returns its znode once the create has returned.
pub async fn register(
    zookeeper: &Client,
    root: &str,
    service: &str,
    id: &str,
    port: u16,
) -> anyhow::Result<String> {
    let path = format!("{root}/{service}/{id}");
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .unwrap_or(0);
    zookeeper
        .create(
            &path,
            &curator_instance(service, id, port, now_ms),
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

pub async fn deregister(zookeeper: &Client, path: &str) -> anyhow::Result<()> {
    zookeeper
        .delete(path, None)
        .await
        .with_context(|| format!("deleting {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_curator_json_on_loopback() {
        let bytes = curator_instance("echo", "echo-1", 8080, 1_700_000_000_000);
        let instance: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        assert_eq!(instance["name"], "echo");
        assert_eq!(instance["id"], "echo-1");
        assert_eq!(instance["address"], "127.0.0.1");
        assert_eq!(instance["port"], 8080);
        assert_eq!(instance["serviceType"], "DYNAMIC");
        assert_eq!(instance["registrationTimeUTC"], 1_700_000_000_000u64);
    }
}
