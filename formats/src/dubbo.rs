//! Dubbo 2 interface-level registries: `<root>/<interface>/providers/<URL-encoded provider URL>`,
//! the root being `/dubbo` unless the registry's group says otherwise. Everything is in the znode
//! name, `dubbo://10.0.0.1:20880/com.example.Orders?weight=100&timestamp=...&side=provider`;
//! the service is the interface. `consumers`, `routers` and `configurators` are not read.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use zklb_wire::{Instance, SourceFormat, Status};

use super::{port_number, DecodeError, ServiceRead, ZnodeRead};
use crate::tree::{child_path, Tree, Znode};

const PROVIDERS: &str = "providers";
/// Dubbo's weight when a provider URL has none.
const DEFAULT_WEIGHT: u32 = 100;

/// Whether a path below the root is in a category of an interface that holds no providers.
pub fn is_ignored(segments: &[&str]) -> bool {
    matches!(segments, [_, "consumers" | "routers" | "configurators", ..])
}

pub fn has_providers(tree: &Tree, path: &str) -> bool {
    tree.get(&child_path(path, PROVIDERS)).is_some()
}

/// The interface at `path`, if it has a `providers` znode.
pub fn read(tree: &Tree, path: &str, znode: &Znode, interface: &str) -> Option<ServiceRead> {
    let providers_path = child_path(path, PROVIDERS);
    let providers = tree.get(&providers_path)?;
    let mut version = znode.newest_zxid().max(providers.newest_zxid());
    let znodes = tree
        .children(&providers_path)
        .map(|(name, provider)| {
            version = version.max(provider.newest_zxid());
            ZnodeRead {
                path: child_path(&providers_path, name),
                mzxid: provider.mzxid,
                format: SourceFormat::Dubbo,
                instances: decode(interface, name).map(|instance| vec![instance]),
            }
        })
        .collect();
    Some(ServiceRead {
        name: interface.to_string(),
        format: Some(SourceFormat::Dubbo),
        czxid: znode.czxid,
        version,
        znodes,
    })
}

/// Decodes a provider znode's name (the URL-encoded provider URL) into an instance of
/// `interface`. Weight (100 by default), `enabled=false` or `disabled=true` (draining) and
/// `timestamp` (the registration time) are read; every parameter is kept as metadata, with the
/// protocol as `protocol`.
pub fn decode(interface: &str, znode_name: &str) -> Result<Instance, DecodeError> {
    let url = percent_decode(znode_name)?;
    let invalid = |reason: &str| DecodeError::Invalid {
        field: "url",
        reason: format!("{url:?} {reason}"),
    };
    let (protocol, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("is not a provider URL"))?;
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = location.split('/').next().unwrap_or_default();
    let (host, port) = split_host_port(authority).ok_or_else(|| invalid("has no host:port"))?;
    let port = port
        .parse::<i64>()
        .map_err(|_| invalid("has a port that is not a number"))?;
    let port = port_number("port", port)?;
    let mut metadata: BTreeMap<String, String> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key.to_string(), value.to_string())
        })
        .collect();
    if metadata.get("side").is_some_and(|side| side != "provider") {
        return Err(invalid("is not a provider's (side is not provider)"));
    }
    if let Some(registered) = metadata.get("interface").filter(|name| *name != interface) {
        return Err(DecodeError::WrongService {
            field: "interface",
            found: registered.clone(),
            service: interface.to_string(),
        });
    }
    let number = |key: &'static str| -> Result<Option<i64>, DecodeError> {
        metadata
            .get(key)
            .map(|value| {
                value.parse::<i64>().map_err(|_| DecodeError::Invalid {
                    field: key,
                    reason: format!("{value:?} is not a number"),
                })
            })
            .transpose()
    };
    let weight = match number("weight")? {
        Some(weight) => u32::try_from(weight.max(0)).unwrap_or(u32::MAX),
        None => DEFAULT_WEIGHT,
    };
    let registered_at = number("timestamp")?;
    let disabled = metadata
        .get("disabled")
        .is_some_and(|value| value == "true")
        || metadata
            .get("enabled")
            .is_some_and(|value| value == "false");
    metadata.insert("protocol".into(), protocol.to_string());
    Ok(Instance {
        weight,
        status: if disabled {
            Status::Draining
        } else {
            Status::Up
        },
        registered_at,
        metadata,
        ..Instance::new(authority, host, port, SourceFormat::Dubbo)
    })
}

/// `host:port` or `[v6]:port`.
fn split_host_port(authority: &str) -> Option<(String, &str)> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, port) = bracketed.split_once("]:")?;
        let host: Ipv6Addr = host.parse().ok()?;
        return Some((host.to_string(), port));
    }
    let (host, port) = authority.rsplit_once(':')?;
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// Undoes Java's `URLEncoder.encode`: `%XX` escapes, and `+` for a space.
fn percent_decode(encoded: &str) -> Result<String, DecodeError> {
    let invalid = |reason: &str| DecodeError::Invalid {
        field: "url",
        reason: reason.to_string(),
    };
    let bytes = encoded.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| invalid("has a % that is not followed by two hex digits"))?;
                decoded.push(hex);
                i += 3;
            }
            b'+' => {
                decoded.push(b' ');
                i += 1;
            }
            byte => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).map_err(|_| invalid("is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::fixture;

    fn fixture_name(name: &str) -> String {
        String::from_utf8(fixture("dubbo", name))
            .expect("UTF-8")
            .trim()
            .to_string()
    }

    #[test]
    fn dubbo_3_provider_url() {
        let instance = decode(
            "org.apache.dubbo.samples.api.GreetingsService",
            &fixture_name("dubbo-3.1.4-provider.txt"),
        )
        .expect("decodes");
        assert_eq!(
            (instance.address.as_str(), instance.port),
            ("30.221.146.35", 20880)
        );
        assert_eq!(instance.id, "30.221.146.35:20880");
        assert_eq!(instance.weight, 100);
        assert_eq!(instance.status, Status::Up);
        assert_eq!(instance.registered_at, Some(1_674_960_780_647));
        assert_eq!(instance.metadata["protocol"], "dubbo");
        assert_eq!(instance.metadata["application"], "first-dubbo-provider");
        assert_eq!(
            instance.metadata["ipv6"],
            "fd00:1:5:5200:3218:774a:4f67:2341"
        );
        assert_eq!(instance.source, SourceFormat::Dubbo);
    }

    #[test]
    fn dubbo_2_provider_with_group_version_weight_and_disabled() {
        let instance = decode(
            "org.apache.dubbo.demo.EventNotifyService",
            &fixture_name("dubbo-2.7-group-version.txt"),
        )
        .expect("decodes");
        assert_eq!(instance.metadata["group"], "cn");
        assert_eq!(instance.metadata["version"], "1.0.0");
        let weighted = decode(
            "com.example.Orders",
            "dubbo%3A%2F%2F10.0.0.1%3A20880%2Fcom.example.Orders%3Fside%3Dprovider%26weight%3D250",
        )
        .expect("decodes");
        assert_eq!(weighted.weight, 250);
        for flag in ["enabled%3Dfalse", "disabled%3Dtrue"] {
            let name = format!("tri%3A%2F%2F10.0.0.1%3A50051%2Fcom.example.Orders%3F{flag}");
            let instance = decode("com.example.Orders", &name).expect("decodes");
            assert_eq!(instance.status, Status::Draining, "{flag}");
            assert_eq!(instance.metadata["protocol"], "tri");
        }
        let v6 = decode(
            "com.example.Orders",
            "dubbo%3A%2F%2F%5B%3A%3A1%5D%3A20880%2Fx",
        )
        .expect("decodes");
        assert_eq!((v6.address.as_str(), v6.port), ("::1", 20880));
    }

    #[test]
    fn malformed_provider_names_say_what_is_wrong() {
        let error = |name: &str| {
            decode("com.example.Orders", name)
                .expect_err(name)
                .to_string()
        };
        assert!(error("10.0.0.1:20880").contains("not a provider URL"));
        assert!(error("dubbo%3A%2F%2F10.0.0.1%2Fx").contains("no host:port"));
        assert!(error("dubbo%3A%2F%2F10.0.0.1%3A0%2Fx").contains("0 is not a TCP port"));
        assert!(error("dubbo%3A%2F%2F10.0.0.1%3A80%2Fx%3Fweight%3Dheavy").contains("weight"));
        assert!(error("dubbo%3A%2F%2F10.0.0.1%3A80%2Fx%3Fside%3Dconsumer").contains("side"));
        assert!(
            error("dubbo%3A%2F%2F10.0.0.1%3A80%2Fx%3Finterface%3Dcom.example.Billing")
                .contains("\"com.example.Billing\" is not the service")
        );
        assert!(error("dubbo%3A%2F%2F10.0.0.1%3A80%ZZ").contains("two hex digits"));
        assert!(error("%FF%FE").contains("UTF-8"));
    }

    #[test]
    fn only_the_providers_category_is_read() {
        assert!(is_ignored(&["com.example.Orders", "consumers"]));
        assert!(is_ignored(&["com.example.Orders", "routers", "x"]));
        assert!(!is_ignored(&["com.example.Orders", "providers", "x"]));
        assert!(!is_ignored(&["com.example.Orders"]));
    }
}
