//! Finagle / Aurora ServerSets: any znode with `member_*` children is a service, named by its path
//! below the root (`/` becomes `.`). Each member is JSON
//! `{"serviceEndpoint": {"host", "port"}, "additionalEndpoints": {name: {"host", "port"}},
//! "status": "ALIVE", "shard": N}`; `vector_*` siblings hold weight vectors
//! `{"vector": [{"select": "inet=host:port" | "member=member_N" | "shard=N", "weight": 2.0}]}`
//! whose matching weights multiply, as Finagle's `serverset2` applies them.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use zklb_wire::{Instance, SourceFormat, Status};

use super::{metadata_string, port_number, DecodeError, RegistrySpec, ServiceRead, ZnodeRead};
use crate::tree::{child_path, parent_path, Tree, Znode};

const MEMBER_PREFIX: &str = "member_";
const VECTOR_PREFIX: &str = "vector_";
/// Finagle weights are real numbers around 1.0; registry weights are integers, so a ServerSet
/// weight is Finagle's times this (a member without vectors weighs 100).
pub const WEIGHT_SCALE: f64 = 100.0;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Member {
    service_endpoint: Option<Endpoint>,
    #[serde(default)]
    additional_endpoints: BTreeMap<String, Endpoint>,
    status: Option<String>,
    shard: Option<i64>,
    #[serde(default)]
    metadata: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct Endpoint {
    host: Option<String>,
    port: Option<i64>,
}

/// A decoded member, with what weight vectors select it by.
#[derive(Debug)]
pub struct DecodedMember {
    pub instance: Instance,
    pub shard: Option<i64>,
}

/// Decodes the member znode `znode_name`; `endpoint` names the `additionalEndpoints` entry to
/// route to instead of `serviceEndpoint`.
pub fn decode_member(
    znode_name: &str,
    data: &[u8],
    endpoint: Option<&str>,
) -> Result<DecodedMember, DecodeError> {
    let member: Member = serde_json::from_slice(data)?;
    let chosen = match endpoint {
        Some(name) => member
            .additional_endpoints
            .get(name)
            .ok_or(DecodeError::Invalid {
                field: "additionalEndpoints",
                reason: format!("has no endpoint named {name:?}"),
            })?,
        None => member
            .service_endpoint
            .as_ref()
            .ok_or(DecodeError::Missing("serviceEndpoint"))?,
    };
    let host = chosen
        .host
        .clone()
        .filter(|host| !host.trim().is_empty())
        .ok_or(DecodeError::Missing("host"))?;
    let port = port_number("port", chosen.port.ok_or(DecodeError::Missing("port"))?)?;
    // Only ALIVE members take traffic; STOPPING is a member on its way out.
    let status = match member.status.as_deref() {
        Some("ALIVE") => Status::Up,
        Some("STOPPING") => Status::Draining,
        _ => Status::Down,
    };
    let mut metadata: BTreeMap<String, String> = member
        .metadata
        .iter()
        .map(|(key, value)| (key.clone(), metadata_string(value)))
        .collect();
    if let Some(shard) = member.shard {
        metadata.insert("shard".into(), shard.to_string());
    }
    Ok(DecodedMember {
        instance: Instance {
            status,
            weight: WEIGHT_SCALE as u32,
            metadata,
            ..Instance::new(znode_name, host, port, SourceFormat::Serverset)
        },
        shard: member.shard,
    })
}

#[derive(Deserialize)]
struct VectorDocument {
    vector: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    select: String,
    weight: Option<f64>,
}

/// One weight vector: its selectors with their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Vector(Vec<(Selector, f64)>);

#[derive(Debug, Clone, PartialEq)]
enum Selector {
    Inet { host: String, port: u16 },
    Member(String),
    Shard(i64),
}

pub fn decode_vector(data: &[u8]) -> Result<Vector, DecodeError> {
    let document: VectorDocument = serde_json::from_slice(data)?;
    let mut descriptors = Vec::with_capacity(document.vector.len());
    for descriptor in document.vector {
        let weight = descriptor.weight.unwrap_or(1.0);
        if !weight.is_finite() || weight < 0.0 {
            return Err(DecodeError::Invalid {
                field: "weight",
                reason: format!("{weight} is not a non-negative number"),
            });
        }
        let invalid = || DecodeError::Invalid {
            field: "select",
            reason: format!(
                "{:?} is not inet=<host>:<port>, member=<member> or shard=<n>",
                descriptor.select
            ),
        };
        let (kind, argument) = descriptor.select.split_once('=').ok_or_else(invalid)?;
        let selector = match kind {
            "inet" => {
                let (host, port) = argument.rsplit_once(':').ok_or_else(invalid)?;
                let port = port.parse().map_err(|_| invalid())?;
                Selector::Inet {
                    host: host.trim_matches(['[', ']']).to_string(),
                    port,
                }
            }
            "member" => Selector::Member(argument.to_string()),
            "shard" => Selector::Shard(argument.parse().map_err(|_| invalid())?),
            _ => return Err(invalid()),
        };
        descriptors.push((selector, weight));
    }
    Ok(Vector(descriptors))
}

impl Vector {
    /// This vector's factor for a member: the product of the weights of every descriptor that
    /// selects it (1.0 when none does).
    fn weight_of(&self, member: &DecodedMember) -> f64 {
        self.0
            .iter()
            .filter(|(selector, _)| match selector {
                Selector::Inet { host, port } => {
                    member.instance.address.trim_matches(['[', ']']) == host
                        && member.instance.port == *port
                }
                Selector::Member(id) => member.instance.id == *id,
                Selector::Shard(shard) => member.shard == Some(*shard),
            })
            .map(|(_, weight)| weight)
            .product()
    }
}

/// Whether `path` has member children: what makes a znode a ServerSet.
pub fn has_members(tree: &Tree, path: &str) -> bool {
    tree.children(path)
        .any(|(name, _)| name.starts_with(MEMBER_PREFIX))
}

/// The service paths a change to `path` may concern: its parent when it is a member or a
/// vector, and itself (a znode that may have become a ServerSet, or stopped being one).
pub fn affected(path: &str) -> Vec<String> {
    let mut affected = vec![path.to_string()];
    let name = path.rsplit('/').next().unwrap_or_default();
    if name.starts_with(MEMBER_PREFIX) || name.starts_with(VECTOR_PREFIX) {
        if let Some(parent) = parent_path(path) {
            affected.push(parent.to_string());
        }
    }
    affected
}

/// The ServerSet at `path`, if it has members.
pub fn read(
    spec: &RegistrySpec,
    tree: &Tree,
    path: &str,
    znode: &Znode,
    name: String,
) -> Option<ServiceRead> {
    if !has_members(tree, path) {
        return None;
    }
    let mut version = znode.newest_zxid();
    let mut vectors = Vec::new();
    let mut znodes = Vec::new();
    let mut members = Vec::new();
    for (child, data) in tree.children(path) {
        version = version.max(data.newest_zxid());
        let child_path = child_path(path, child);
        let result = if child.starts_with(VECTOR_PREFIX) {
            decode_vector(&data.data).map(|vector| vectors.push(vector))
        } else if child.starts_with(MEMBER_PREFIX) {
            decode_member(child, &data.data, spec.endpoint.as_deref())
                .map(|member| members.push(member))
        } else {
            continue;
        };
        if let Err(error) = result {
            znodes.push(ZnodeRead {
                path: child_path,
                mzxid: data.mzxid,
                format: SourceFormat::Serverset,
                instances: Err(error),
            });
        }
    }
    let instances = members
        .into_iter()
        .map(|member| {
            let factor: f64 = vectors
                .iter()
                .map(|vector| vector.weight_of(&member))
                .product();
            let weight = (WEIGHT_SCALE * factor).round().min(f64::from(u32::MAX)) as u32;
            Instance {
                weight,
                ..member.instance
            }
        })
        .collect();
    znodes.push(ZnodeRead {
        path: path.to_string(),
        mzxid: znode.mzxid,
        format: SourceFormat::Serverset,
        instances: Ok(instances),
    });
    Some(ServiceRead {
        name,
        format: Some(SourceFormat::Serverset),
        czxid: znode.czxid,
        version,
        znodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::fixture;

    #[test]
    fn finagle_member_with_additional_endpoints() {
        let data = fixture("serverset", "finagle-member.json");
        let member = decode_member("member_0000000007", &data, None).expect("decodes");
        let instance = &member.instance;
        assert_eq!((instance.address.as_str(), instance.port), ("10.0.0.3", 80));
        assert_eq!(instance.id, "member_0000000007");
        assert_eq!(instance.status, Status::Up);
        assert_eq!(instance.weight, 100);
        assert_eq!(member.shard, Some(0));
        assert_eq!(instance.metadata["shard"], "0");
        let http = decode_member("member_0000000007", &data, Some("http")).expect("decodes");
        assert_eq!(
            (http.instance.address.as_str(), http.instance.port),
            ("10.0.0.2", 80)
        );
        let error = decode_member("m", &data, Some("thrift")).expect_err("no such endpoint");
        assert!(error.to_string().contains("no endpoint named \"thrift\""));
    }

    #[test]
    fn only_alive_members_are_up_and_stopping_ones_drain() {
        let with_status = |status: &str| {
            let data = format!(
                r#"{{"serviceEndpoint": {{"host": "10.0.0.1", "port": 80}}, "additionalEndpoints": {{}}, "status": "{status}"}}"#
            );
            decode_member("member_1", data.as_bytes(), None)
                .expect("decodes")
                .instance
                .status
        };
        assert_eq!(with_status("ALIVE"), Status::Up);
        assert_eq!(with_status("STOPPING"), Status::Draining);
        for status in ["DEAD", "STARTING", "STOPPED", "WARNING", "UNKNOWN"] {
            assert_eq!(with_status(status), Status::Down, "{status}");
        }
    }

    #[test]
    fn malformed_members_say_what_is_wrong() {
        let error = |data: &str| {
            decode_member("member_1", data.as_bytes(), None)
                .expect_err(data)
                .to_string()
        };
        assert!(error("{").contains("not valid JSON"));
        assert!(error(r#"{"status": "ALIVE"}"#).contains("missing field `serviceEndpoint`"));
        assert!(error(r#"{"serviceEndpoint": {"port": 80}}"#).contains("missing field `host`"));
        assert!(error(r#"{"serviceEndpoint": {"host": "h", "port": 0}}"#)
            .contains("0 is not a TCP port"));
        assert!(
            error(r#"{"serviceEndpoint": {"host": "h", "port": 65536}}"#)
                .contains("65536 is not a TCP port")
        );
    }

    #[test]
    fn vectors_multiply_the_weights_of_what_they_select() {
        let vector = decode_vector(&fixture("serverset", "finagle-vector.json")).expect("decodes");
        let member = |id: &str, host: &str, port: u16, shard: Option<i64>| DecodedMember {
            instance: Instance::new(id, host, port, SourceFormat::Serverset),
            shard,
        };
        // {"select":"member=1","weight":1.2}, {"select":"inet=10.0.0.3:80","weight":1.3}
        assert!((vector.weight_of(&member("1", "10.0.0.3", 80, None)) - 1.2 * 1.3).abs() < 1e-9);
        assert!((vector.weight_of(&member("1", "10.0.0.4", 80, None)) - 1.2).abs() < 1e-9);
        assert!((vector.weight_of(&member("2", "10.0.0.3", 81, None)) - 1.0).abs() < 1e-9);
        let shards = decode_vector(br#"{"vector": [{"select": "shard=3", "weight": 0.5}]}"#)
            .expect("decodes");
        assert!((shards.weight_of(&member("x", "h", 1, Some(3))) - 0.5).abs() < 1e-9);
        assert!(decode_vector(br#"{"vector": [{"select": "colour=blue"}]}"#).is_err());
        assert!(decode_vector(br#"{"vector": [{"select": "shard=3", "weight": -1.0}]}"#).is_err());
    }

    #[test]
    fn a_service_is_a_znode_with_members_named_by_its_path() {
        let spec: RegistrySpec = "/aurora=serverset".parse().expect("spec");
        let mut tree = Tree::default();
        let put = |tree: &mut Tree, path: &str, zxid: i64, data: &[u8]| {
            tree.put(
                path,
                Znode {
                    czxid: zxid,
                    mzxid: zxid,
                    pzxid: zxid,
                    num_children: 0,
                    data: data.to_vec(),
                },
            )
        };
        let member = |host: &str| {
            format!(r#"{{"serviceEndpoint": {{"host": "{host}", "port": 80}}, "status": "ALIVE"}}"#)
        };
        put(&mut tree, "/aurora", 1, b"");
        put(&mut tree, "/aurora/www", 2, b"");
        put(&mut tree, "/aurora/www/prod", 3, b"");
        put(&mut tree, "/aurora/www/prod/hello", 4, b"");
        put(
            &mut tree,
            "/aurora/www/prod/hello/member_0000000001",
            5,
            member("10.0.0.1").as_bytes(),
        );
        put(
            &mut tree,
            "/aurora/www/prod/hello/member_0000000002",
            6,
            member("10.0.0.2").as_bytes(),
        );
        put(
            &mut tree,
            "/aurora/www/prod/hello/member_0000000003",
            7,
            b"garbage",
        );
        put(
            &mut tree,
            "/aurora/www/prod/hello/vector_0000000001",
            9,
            br#"{"vector": [{"select": "member=member_0000000002", "weight": 2.5}]}"#,
        );
        assert!(read(
            &spec,
            &tree,
            "/aurora/www/prod",
            &Znode::default(),
            "x".into()
        )
        .is_none());
        let hello = tree.get("/aurora/www/prod/hello").expect("known").clone();
        let service = read(
            &spec,
            &tree,
            "/aurora/www/prod/hello",
            &hello,
            "www.prod.hello".into(),
        )
        .expect("a ServerSet");
        assert_eq!(service.version, 9);
        let instances: Vec<(String, u32)> = service
            .znodes
            .iter()
            .filter_map(|znode| znode.instances.as_ref().ok())
            .flatten()
            .map(|instance| (instance.address.clone(), instance.weight))
            .collect();
        assert_eq!(
            instances,
            [("10.0.0.1".to_string(), 100), ("10.0.0.2".to_string(), 250)]
        );
        let malformed: Vec<&str> = service
            .znodes
            .iter()
            .filter(|znode| znode.instances.is_err())
            .map(|znode| znode.path.as_str())
            .collect();
        assert_eq!(malformed, ["/aurora/www/prod/hello/member_0000000003"]);
        assert_eq!(
            affected("/aurora/www/prod/hello/member_0000000001"),
            [
                "/aurora/www/prod/hello/member_0000000001",
                "/aurora/www/prod/hello"
            ]
        );
    }
}
