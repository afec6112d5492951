//! Airbnb Nerve: one ephemeral sequential znode per instance under the service's path,
//! `<root>/<service>/<instance_id>_<sequence>`, holding
//! `{"host", "port", "name": <instance_id>, "weight"?, "haproxy_server_options"?, "labels"?}`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use zklb_wire::{Instance, SourceFormat};

use super::{metadata_string, port_number, DecodeError};

#[derive(Deserialize)]
struct NerveInstance {
    host: Option<String>,
    /// Nerve passes the configured port through as it is: usually a number, sometimes a string.
    port: Option<Value>,
    /// Nerve's `instance_id`: which machine this is, not the service.
    name: Option<String>,
    weight: Option<i64>,
    haproxy_server_options: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, Value>,
}

/// Decodes one Nerve znode. Labels become metadata, and `az` (or `zone`) the zone.
pub fn decode(znode_name: &str, data: &[u8]) -> Result<Instance, DecodeError> {
    let raw: NerveInstance = serde_json::from_slice(data)?;
    let host = raw
        .host
        .filter(|host| !host.trim().is_empty())
        .ok_or(DecodeError::Missing("host"))?;
    let port = match raw.port.ok_or(DecodeError::Missing("port"))? {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
    .ok_or(DecodeError::Invalid {
        field: "port",
        reason: "is not a number".into(),
    })?;
    let port = port_number("port", port)?;
    let weight = match raw.weight {
        Some(weight) => u32::try_from(weight).map_err(|_| DecodeError::Invalid {
            field: "weight",
            reason: format!("{weight} is not a non-negative integer"),
        })?,
        None => 1,
    };
    let mut metadata: BTreeMap<String, String> = raw
        .labels
        .iter()
        .map(|(key, value)| (key.clone(), metadata_string(value)))
        .collect();
    let zone = metadata.get("az").or_else(|| metadata.get("zone")).cloned();
    if let Some(options) = raw.haproxy_server_options {
        metadata.insert("haproxy_server_options".into(), options);
    }
    let id = raw.name.unwrap_or_else(|| znode_name.to_string());
    Ok(Instance {
        weight,
        zone,
        metadata,
        ..Instance::new(id, host, port, SourceFormat::Nerve)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::fixture;

    #[test]
    fn nerve_instance_with_labels() {
        let instance =
            decode("i-xxxxxx_0000000003", &fixture("nerve", "labels.json")).expect("decodes");
        assert_eq!(instance.id, "i-xxxxxx");
        assert_eq!(
            (instance.address.as_str(), instance.port),
            ("127.0.0.1", 3000)
        );
        assert_eq!(instance.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(instance.metadata["region"], "us-east-1");
        assert_eq!(instance.weight, 1);
        assert_eq!(instance.source, SourceFormat::Nerve);
    }

    #[test]
    fn nerve_weight_and_server_options() {
        let instance =
            decode("i-1_0000000001", &fixture("nerve", "weighted.json")).expect("decodes");
        assert_eq!(instance.weight, 5);
        assert_eq!(instance.metadata["haproxy_server_options"], "backup");
        let string_port = decode("x", br#"{"host": "10.0.0.1", "port": "8080"}"#)
            .expect("a port written as a string");
        assert_eq!(string_port.port, 8080);
        assert_eq!(string_port.id, "x", "the znode name without a name field");
    }

    #[test]
    fn malformed_nerve_instances_say_what_is_wrong() {
        let error = |data: &str| decode("x", data.as_bytes()).expect_err(data).to_string();
        assert!(error(r#"{"port": 80}"#).contains("missing field `host`"));
        assert!(error(r#"{"host": "h"}"#).contains("missing field `port`"));
        assert!(error(r#"{"host": "h", "port": "port"}"#).contains("not a number"));
        assert!(error(r#"{"host": "h", "port": 99999}"#).contains("99999 is not a TCP port"));
        assert!(error(r#"{"host": "h", "port": 80, "weight": -2}"#).contains("weight"));
        assert!(error("\u{0}\u{1}").contains("not valid JSON"));
    }
}
