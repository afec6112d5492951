//! APISIX's ZooKeeper discovery as apisix-seed reads it: one persistent znode per service,
//! `<root>/<service>`, whose data lists every instance,
//! `[{"host": "10.0.0.1", "port": 1980, "weight": 100, "metadata": {...}}]` (older seeds: one
//! object whose `host` carries the port). The registrar maintains the list itself.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use zklb_wire::{Instance, SourceFormat};

use super::{metadata_string, port_number, DecodeError, ServiceRead, ZnodeRead};
use crate::tree::Znode;

/// apisix-seed's default node weight.
const DEFAULT_WEIGHT: u32 = 100;
/// The port of a node that names none, as APISIX's own ZooKeeper discovery assumes.
const DEFAULT_PORT: i64 = 80;

#[derive(Deserialize)]
#[serde(untagged)]
enum Nodes {
    List(Vec<Node>),
    One(Node),
}

#[derive(Deserialize)]
struct Node {
    host: Option<String>,
    port: Option<i64>,
    weight: Option<i64>,
    #[serde(default)]
    metadata: BTreeMap<String, Value>,
}

/// Whether a znode's data looks like an APISIX node list: what `auto` reads a service znode by.
pub fn holds_nodes(znode: &Znode) -> bool {
    matches!(
        serde_json::from_slice::<Value>(&znode.data),
        Ok(Value::Array(_))
    ) || serde_json::from_slice::<Node>(&znode.data).is_ok_and(|node| node.host.is_some())
}

/// The service znode at `path` and the instances its data lists.
pub fn read(path: &str, znode: &Znode, name: &str) -> ServiceRead {
    ServiceRead {
        name: name.to_string(),
        format: Some(SourceFormat::Apisix),
        czxid: znode.czxid,
        version: znode.newest_zxid(),
        znodes: vec![ZnodeRead {
            path: path.to_string(),
            mzxid: znode.mzxid,
            format: SourceFormat::Apisix,
            instances: decode(&znode.data),
        }],
    }
}

/// Decodes a service znode's node list. Node metadata becomes instance metadata, and its
/// `zone` the zone.
pub fn decode(data: &[u8]) -> Result<Vec<Instance>, DecodeError> {
    let nodes = match serde_json::from_slice(data)? {
        Nodes::List(nodes) => nodes,
        Nodes::One(node) => vec![node],
    };
    nodes.into_iter().map(instance).collect()
}

fn instance(node: Node) -> Result<Instance, DecodeError> {
    let host = node
        .host
        .filter(|host| !host.trim().is_empty())
        .ok_or(DecodeError::Missing("host"))?;
    // Older seeds wrote `"host": "127.0.0.1:1980"` with no port of its own.
    let (host, port) = match (node.port, host.rsplit_once(':')) {
        (None, Some((address, port))) if !address.contains(':') => (
            address.to_string(),
            port.parse().map_err(|_| DecodeError::Invalid {
                field: "host",
                reason: format!("{host:?} has a port that is not a number"),
            })?,
        ),
        (port, _) => (host, port.unwrap_or(DEFAULT_PORT)),
    };
    let port = port_number("port", port)?;
    let weight = match node.weight {
        Some(weight) => u32::try_from(weight).map_err(|_| DecodeError::Invalid {
            field: "weight",
            reason: format!("{weight} is not a non-negative integer"),
        })?,
        None => DEFAULT_WEIGHT,
    };
    let metadata: BTreeMap<String, String> = node
        .metadata
        .iter()
        .map(|(key, value)| (key.clone(), metadata_string(value)))
        .collect();
    let id = format!("{host}:{port}");
    Ok(Instance {
        weight,
        zone: metadata.get("zone").cloned(),
        metadata,
        ..Instance::new(id, host, port, SourceFormat::Apisix)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::fixture;

    #[test]
    fn apisix_seed_node_list() {
        let instances = decode(&fixture("apisix", "apisix-seed.json")).expect("decodes");
        let hosts: Vec<(&str, u16, u32)> = instances
            .iter()
            .map(|instance| (instance.address.as_str(), instance.port, instance.weight))
            .collect();
        assert_eq!(hosts, [("127.0.0.1", 1980, 100), ("127.0.0.1", 1981, 100)]);
        assert_eq!(instances[0].source, SourceFormat::Apisix);
        let unweighted = decode(br#"[{"host": "10.0.0.1", "port": 8080}]"#).expect("decodes");
        assert_eq!(unweighted[0].weight, DEFAULT_WEIGHT);
    }

    #[test]
    fn older_seeds_put_the_port_in_the_host() {
        let instances = decode(br#"{"host": "127.0.0.1:1980", "weight": 3}"#).expect("decodes");
        assert_eq!(
            (
                instances[0].address.as_str(),
                instances[0].port,
                instances[0].weight
            ),
            ("127.0.0.1", 1980, 3)
        );
        let no_port = decode(br#"[{"host": "10.0.0.1"}]"#).expect("decodes");
        assert_eq!(no_port[0].port, 80);
    }

    #[test]
    fn malformed_node_lists_say_what_is_wrong() {
        let error = |data: &str| decode(data.as_bytes()).expect_err(data).to_string();
        assert!(error("[{\"port\": 80}]").contains("missing field `host`"));
        assert!(error("[{\"host\": \"h\", \"port\": 70000}]").contains("70000 is not a TCP port"));
        assert!(error("[{\"host\": \"h:x\"}]").contains("not a number"));
        assert!(error("[{\"host\": \"h\", \"weight\": -1}]").contains("weight"));
        assert!(error("\"just a string\"").contains("not valid JSON"));
    }

    #[test]
    fn only_node_lists_look_like_apisix() {
        let znode = |data: &[u8]| Znode {
            data: data.to_vec(),
            ..Znode::default()
        };
        assert!(holds_nodes(&znode(b"[]")));
        assert!(holds_nodes(&znode(br#"{"host": "127.0.0.1:1980"}"#)));
        assert!(!holds_nodes(&znode(b"")));
        assert!(
            !holds_nodes(&znode(b"10.0.0.1")),
            "Curator's default data of a parent"
        );
        assert!(
            !holds_nodes(&znode(br#"{"haproxy": {}}"#)),
            "Synapse's config on a parent"
        );
    }
}
