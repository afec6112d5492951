//! The registry formats people run, one submodule per dialect: where each lays out its services
//! under a root, and what its znodes say. Pure functions over the [`Tree`] mirror; the registry
//! calls them for the services a change touched.
//!
//! | format | a service is | its instances are |
//! |---|---|---|
//! | `curator` | a child of the root | its children, JSON each |
//! | `serverset` | any znode with `member_*` children, named by its path | those children, weighted by `vector_*` siblings |
//! | `nerve` | a child of the root | its children, JSON each |
//! | `dubbo` | a child of the root with a `providers` child | the names of the `providers` children |
//! | `apisix` | a child of the root | the nodes listed in its own data |
//! | `auto` | whichever of the above the znodes' shape says, service by service | |

pub mod apisix;
pub mod curator;
pub mod dubbo;
pub mod nerve;
pub mod serverset;
pub mod tree;

use std::fmt;
use std::str::FromStr;

use serde_json::Value;
use thiserror::Error;
use zklb_wire::{Instance, SourceFormat};

use crate::tree::{child_path, relative_segments, Tree, Znode};

/// How a root is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Decides service by service from the shape of the znodes.
    Auto,
    Fixed(SourceFormat),
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Auto => f.write_str("auto"),
            Format::Fixed(format) => f.write_str(format.name()),
        }
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(name: &str) -> Result<Format, String> {
        let fixed = match name {
            "auto" => return Ok(Format::Auto),
            "curator" => SourceFormat::Curator,
            "serverset" => SourceFormat::Serverset,
            "nerve" => SourceFormat::Nerve,
            "dubbo" => SourceFormat::Dubbo,
            "apisix" => SourceFormat::Apisix,
            other => {
                return Err(format!(
                    "unknown format {other:?}: expected auto, curator, serverset, nerve, dubbo or apisix"
                ))
            }
        };
        Ok(Format::Fixed(fixed))
    }
}

/// One registry root and how to read it: `<path>=<format>[:<endpoint>]`, such as
/// `/services=auto` or `/aurora=serverset:http`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySpec {
    pub root: String,
    pub format: Format,
    /// For ServerSets: the `additionalEndpoints` entry to route to instead of `serviceEndpoint`.
    pub endpoint: Option<String>,
}

impl fmt::Display for RegistrySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.root, self.format)?;
        match &self.endpoint {
            Some(endpoint) => write!(f, ":{endpoint}"),
            None => Ok(()),
        }
    }
}

impl FromStr for RegistrySpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<RegistrySpec, String> {
        let (root, format) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?} is not <path>=<format>, such as /services=auto"))?;
        check_root(root)?;
        let (format, endpoint) = match format.split_once(':') {
            Some((format, endpoint)) => (format, Some(endpoint.to_string())),
            None => (format, None),
        };
        let format: Format = format.parse()?;
        if let Some(endpoint) = &endpoint {
            if endpoint.is_empty() {
                return Err(format!("{spec:?}: the endpoint after ':' is empty"));
            }
            if !matches!(
                format,
                Format::Auto | Format::Fixed(SourceFormat::Serverset)
            ) {
                return Err(format!(
                    "{spec:?}: only ServerSets (serverset or auto) have named endpoints"
                ));
            }
        }
        Ok(RegistrySpec {
            root: root.to_string(),
            format,
            endpoint,
        })
    }
}

fn check_root(root: &str) -> Result<(), String> {
    let valid = root.starts_with('/')
        && (root == "/" || !root.ends_with('/'))
        && !root.contains("//")
        && root
            .split('/')
            .skip(1)
            .all(|segment| segment != "." && segment != "..")
        && !root.chars().any(char::is_control);
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{root:?} is not a ZooKeeper path such as /services"
        ))
    }
}

/// Refuses roots that cannot be read side by side: the same root twice, or one inside another
/// (their services would be read twice, under two formats).
pub fn check_roots(specs: &[RegistrySpec]) -> Result<(), String> {
    if specs.is_empty() {
        return Err("no registry root is configured".into());
    }
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[i + 1..] {
            if a.root == b.root {
                return Err(format!("the registry root {} is configured twice", a.root));
            }
            let (outer, inner) = if a.root.len() < b.root.len() {
                (a, b)
            } else {
                (b, a)
            };
            if relative_segments(&outer.root, &inner.root).is_some() {
                return Err(format!(
                    "the registry root {} is inside {}: configure one of them",
                    inner.root, outer.root
                ));
            }
        }
    }
    Ok(())
}

/// Why a znode could not be read as instances. The caller names the znode.
#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// An instance filed under another service's znode: routing it would send one service's
    /// requests to another's backend.
    #[error("field `{field}` is invalid: {found:?} is not the service it is registered under ({service:?})")]
    WrongService {
        field: &'static str,
        found: String,
        service: String,
    },
    #[error("matches no registry format: {0}")]
    Unrecognized(&'static str),
}

impl DecodeError {
    /// A short, fixed name for the reason, for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "not_json",
            DecodeError::Missing(_) => "missing_field",
            DecodeError::Invalid { .. } => "invalid_field",
            DecodeError::WrongService { .. } => "wrong_service",
            DecodeError::Unrecognized(_) => "unrecognized",
        }
    }
}

/// A TCP port from a registrar's number.
pub fn port_number(field: &'static str, port: i64) -> Result<u16, DecodeError> {
    u16::try_from(port)
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| DecodeError::Invalid {
            field,
            reason: format!("{port} is not a TCP port"),
        })
}

/// JSON values as metadata strings: strings as they are, anything else as its JSON.
pub fn metadata_string(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A service as found in the tree.
#[derive(Debug)]
pub struct ServiceRead {
    pub name: String,
    pub format: Option<SourceFormat>,
    /// zxid of the service znode's creation: of two services that claim one name, the first.
    pub czxid: i64,
    /// The newest change among the znodes the service was read from.
    pub version: i64,
    pub znodes: Vec<ZnodeRead>,
}

/// What one znode of a service said: its instances, or why it says nothing usable.
#[derive(Debug)]
pub struct ZnodeRead {
    pub path: String,
    pub mzxid: i64,
    pub format: SourceFormat,
    pub instances: Result<Vec<Instance>, DecodeError>,
}

/// The znodes whose service may have changed when `path` did: every service path that
/// [`read_service`] should look at again.
pub fn affected_services(spec: &RegistrySpec, path: &str) -> Vec<String> {
    let Some(segments) = relative_segments(&spec.root, path) else {
        return Vec::new();
    };
    if segments.is_empty() {
        return Vec::new();
    }
    let top = child_path(&spec.root, segments[0]);
    match spec.format {
        Format::Fixed(SourceFormat::Serverset) => serverset::affected(path),
        Format::Fixed(_) => vec![top],
        Format::Auto => {
            let mut affected = serverset::affected(path);
            if !affected.contains(&top) {
                affected.push(top);
            }
            affected
        }
    }
}

/// Whether the subtree at `path` holds nothing a registry format reads, so that it is neither
/// read nor watched for (Dubbo's consumers, routers and configurators).
pub fn is_ignored(spec: &RegistrySpec, path: &str) -> bool {
    let Some(segments) = relative_segments(&spec.root, path) else {
        return true;
    };
    match spec.format {
        Format::Auto | Format::Fixed(SourceFormat::Dubbo) => dubbo::is_ignored(&segments),
        Format::Fixed(_) => false,
    }
}

/// The service at `path`, if the znodes there make one in `spec`'s format.
pub fn read_service(spec: &RegistrySpec, tree: &Tree, path: &str) -> Option<ServiceRead> {
    let segments = relative_segments(&spec.root, path)?;
    if segments.is_empty() {
        return None;
    }
    let znode = tree.get(path)?;
    let top_level = segments.len() == 1;
    let name = segments.join(".");
    let found = |format: SourceFormat| match format {
        SourceFormat::Serverset => serverset::read(spec, tree, path, znode, name.clone()),
        SourceFormat::Dubbo if top_level => dubbo::read(tree, path, znode, &name),
        SourceFormat::Apisix if top_level => Some(apisix::read(path, znode, &name)),
        SourceFormat::Curator | SourceFormat::Nerve if top_level => {
            Some(read_json_children(tree, path, znode, &name, Some(format)))
        }
        _ => None,
    };
    match spec.format {
        Format::Fixed(format) => found(format),
        Format::Auto => {
            if serverset::has_members(tree, path) {
                return found(SourceFormat::Serverset);
            }
            if !top_level {
                return None;
            }
            if dubbo::has_providers(tree, path) {
                return found(SourceFormat::Dubbo);
            }
            if apisix::holds_nodes(znode) {
                return found(SourceFormat::Apisix);
            }
            // Children without data are directories (or being made into ones): services are
            // further down, as in an Aurora role's tree.
            let has_children = tree.children(path).next().is_some();
            if has_children && tree.children(path).all(|(_, child)| child.data.is_empty()) {
                return None;
            }
            Some(read_json_children(tree, path, znode, &name, None))
        }
    }
}

/// A service whose instances are its children, one JSON document each: Curator or Nerve, or for
/// `auto` (no `format`) whichever each document looks like.
fn read_json_children(
    tree: &Tree,
    path: &str,
    znode: &Znode,
    name: &str,
    format: Option<SourceFormat>,
) -> ServiceRead {
    let mut version = znode.newest_zxid();
    let znodes: Vec<ZnodeRead> = tree
        .children(path)
        // In `auto`, a child without data is a directory, not an instance of any format.
        .filter(|(_, instance)| format.is_some() || !instance.data.is_empty())
        .map(|(child, instance)| {
            version = version.max(instance.newest_zxid());
            let format = format.unwrap_or_else(|| detect_json(&instance.data));
            let decoded = match format {
                SourceFormat::Nerve => nerve::decode(child, &instance.data),
                SourceFormat::Serverset => serverset::decode_member(child, &instance.data, None)
                    .map(|member| member.instance),
                _ => curator::decode(name, child, &instance.data),
            };
            ZnodeRead {
                path: child_path(path, child),
                mzxid: instance.mzxid,
                format,
                instances: decoded.map(|instance| vec![instance]),
            }
        })
        .collect();
    ServiceRead {
        name: name.to_string(),
        format: majority_format(&znodes).or(format),
        czxid: znode.czxid,
        version,
        znodes,
    }
}

/// The format a JSON instance document is written in, by the fields that only it has; Curator
/// (the most common, and whose errors then say what is missing) when nothing tells.
fn detect_json(data: &[u8]) -> SourceFormat {
    let Ok(Value::Object(document)) = serde_json::from_slice::<Value>(data) else {
        return SourceFormat::Curator;
    };
    let has = |field: &str| document.contains_key(field);
    if has("serviceEndpoint") {
        SourceFormat::Serverset
    } else if has("host") && !has("address") {
        SourceFormat::Nerve
    } else {
        SourceFormat::Curator
    }
}

/// The format most of a service's instances were read in (the first in format order on a tie).
fn majority_format(znodes: &[ZnodeRead]) -> Option<SourceFormat> {
    let mut counts: std::collections::BTreeMap<SourceFormat, usize> = Default::default();
    for znode in znodes {
        *counts.entry(znode.format).or_default() += 1;
    }
    let most = counts.values().copied().max()?;
    counts
        .into_iter()
        .find(|&(_, count)| count == most)
        .map(|(format, _)| format)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A sample of `format` kept in `tests/fixtures/<format>/`.
    pub fn fixture(format: &str, name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/{format}/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    #[test]
    fn registry_specs_parse_and_say_what_is_wrong() {
        let spec: RegistrySpec = "/services=auto".parse().expect("parses");
        assert_eq!(
            spec,
            RegistrySpec {
                root: "/services".into(),
                format: Format::Auto,
                endpoint: None
            }
        );
        let spec: RegistrySpec = "/aurora/jobs=serverset:http".parse().expect("parses");
        assert_eq!(spec.format, Format::Fixed(SourceFormat::Serverset));
        assert_eq!(spec.endpoint.as_deref(), Some("http"));
        assert_eq!(spec.to_string(), "/aurora/jobs=serverset:http");
        let error = |spec: &str| spec.parse::<RegistrySpec>().expect_err(spec);
        assert!(error("/services").contains("<path>=<format>"));
        assert!(error("services=auto").contains("not a ZooKeeper path"));
        assert!(error("/services/=auto").contains("not a ZooKeeper path"));
        assert!(error("/a/../b=auto").contains("not a ZooKeeper path"));
        assert!(error("/services=consul").contains("unknown format \"consul\""));
        assert!(error("/services=dubbo:http").contains("only ServerSets"));
        assert!(error("/services=serverset:").contains("empty"));
    }

    #[test]
    fn roots_that_overlap_are_refused() {
        let specs = |roots: &[&str]| -> Vec<RegistrySpec> {
            roots
                .iter()
                .map(|root| format!("{root}=auto").parse().expect("parses"))
                .collect()
        };
        assert!(check_roots(&specs(&["/services", "/dubbo", "/servicesx"])).is_ok());
        assert!(check_roots(&specs(&["/services", "/services"]))
            .expect_err("twice")
            .contains("twice"));
        assert!(check_roots(&specs(&["/services/inner", "/services"]))
            .expect_err("nested")
            .contains("/services/inner is inside /services"));
        assert!(check_roots(&specs(&["/", "/dubbo"])).is_err());
        assert!(check_roots(&[]).is_err());
    }

    #[test]
    fn json_documents_are_told_apart_by_their_fields() {
        assert_eq!(
            detect_json(br#"{"address": "10.0.0.1", "port": 80}"#),
            SourceFormat::Curator
        );
        assert_eq!(
            detect_json(br#"{"host": "10.0.0.1", "port": 80, "name": "i-1"}"#),
            SourceFormat::Nerve
        );
        assert_eq!(
            detect_json(br#"{"serviceEndpoint": {"host": "10.0.0.1", "port": 80}}"#),
            SourceFormat::Serverset
        );
        assert_eq!(detect_json(b"\xff\xfe"), SourceFormat::Curator);
    }
}
