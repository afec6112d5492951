//! Apache Curator x-discovery instances, as written by Curator's `ServiceDiscovery`, Spring Cloud
//! Zookeeper, Dubbo 3's application-level registry and zklb-agent: one JSON znode per instance
//! under `/<root>/<service>/<instance id>`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use zklb_wire::{Instance, SourceFormat, Status};

use super::{metadata_string, port_number, DecodeError};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CuratorInstance {
    name: Option<String>,
    id: Option<String>,
    address: Option<String>,
    port: Option<i64>,
    ssl_port: Option<i64>,
    payload: Option<Value>,
    #[serde(rename = "registrationTimeUTC")]
    registration_time_utc: Option<i64>,
    /// Curator 5 writes it; older registrars omit it, which means enabled.
    enabled: Option<bool>,
}

/// Decodes one Curator instance znode of `service`. `znode_name` stands in for a missing `id`.
///
/// Conventions read from `payload.metadata` (Spring Cloud and Dubbo 3 put metadata there):
/// `instance_status` `OUT_OF_SERVICE` (like `enabled: false`) marks the instance draining, any other
/// but `UP` down; `weight` and `zone` set those fields.
pub fn decode(service: &str, znode_name: &str, data: &[u8]) -> Result<Instance, DecodeError> {
    let raw: CuratorInstance = serde_json::from_slice(data)?;
    // An instance filed under another service's directory is a registrar's mistake: routing it
    // would send one service's requests to another's backend.
    if let Some(name) = raw.name.filter(|name| name != service) {
        return Err(DecodeError::WrongService {
            field: "name",
            found: name,
            service: service.to_string(),
        });
    }
    let address = raw
        .address
        .filter(|address| !address.trim().is_empty())
        .ok_or(DecodeError::Missing("address"))?;
    // The plain port when there is one; an instance that offers only TLS is reached with TLS.
    let (port, tls) = match (raw.port, raw.ssl_port) {
        (Some(port), _) => (port_number("port", port)?, false),
        (None, Some(ssl_port)) => (port_number("sslPort", ssl_port)?, true),
        (None, None) => return Err(DecodeError::Missing("port")),
    };
    let metadata = payload_metadata(raw.payload.as_ref());
    let reported = metadata
        .get("instance_status")
        .map(|status| status.to_ascii_uppercase());
    let status = match (raw.enabled.unwrap_or(true), reported.as_deref()) {
        (false, _) | (true, Some("OUT_OF_SERVICE")) => Status::Draining,
        (true, None | Some("UP")) => Status::Up,
        (true, Some(_)) => Status::Down,
    };
    let weight = match metadata.get("weight") {
        Some(weight) => weight.parse().map_err(|_| DecodeError::Invalid {
            field: "payload.metadata.weight",
            reason: format!("{weight:?} is not a non-negative integer"),
        })?,
        None => 1,
    };
    let id = raw.id.unwrap_or_else(|| znode_name.to_string());
    Ok(Instance {
        tls,
        weight,
        zone: metadata.get("zone").cloned(),
        status,
        registered_at: raw.registration_time_utc,
        metadata,
        ..Instance::new(id, address, port, SourceFormat::Curator)
    })
}

/// `payload.metadata` as strings; payloads of other shapes carry no metadata we understand.
fn payload_metadata(payload: Option<&Value>) -> BTreeMap<String, String> {
    let Some(Value::Object(metadata)) = payload.and_then(|payload| payload.get("metadata")) else {
        return BTreeMap::new();
    };
    metadata
        .iter()
        .map(|(key, value)| (key.clone(), metadata_string(value)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        crate::tests::fixture("curator", name)
    }

    #[test]
    fn plain_curator_instance() {
        let instance = decode("orders", "ignored", &fixture("curator-5.json")).expect("decodes");
        assert_eq!(instance.id, "9a0ca2d4-6bf3-4e3f-a4c5-3f0f5a1e2b7c");
        assert_eq!(instance.address, "10.1.2.3");
        assert_eq!(instance.port, 8080);
        assert_eq!(instance.weight, 1);
        assert_eq!(instance.status, Status::Up);
        assert_eq!(instance.registered_at, Some(1_732_000_000_000));
        assert!(instance.metadata.is_empty());
        assert_eq!(instance.source, SourceFormat::Curator);
    }

    /// Written by Apache Curator 5.4's own `ServiceDiscovery` (tests/registrars/CuratorRegistrar.java).
    #[test]
    fn instance_written_by_curator_itself() {
        let instance =
            decode("orders", "abc-1", &fixture("curator-5.4-real.json")).expect("decodes");
        assert_eq!(instance.id, "abc-1");
        assert_eq!(
            (instance.address.as_str(), instance.port),
            ("127.0.0.1", 8080)
        );
        assert_eq!(instance.status, Status::Up);
        assert_eq!(instance.registered_at, Some(1_795_632_095_290));
    }

    #[test]
    fn spring_cloud_instance_status_and_metadata() {
        let up = decode("catalog", "x", &fixture("spring-cloud-up.json")).expect("decodes");
        assert_eq!(up.status, Status::Up);
        assert_eq!(up.zone.as_deref(), Some("eu-west-1a"));
        assert_eq!(
            up.metadata.get("version").map(String::as_str),
            Some("1.4.2")
        );
        let out =
            decode("catalog", "x", &fixture("spring-cloud-out-of-service.json")).expect("decodes");
        assert_eq!(out.status, Status::Draining);
        let down = decode(
            "orders",
            "x",
            br#"{"address": "10.0.0.1", "port": 80, "payload": {"metadata": {"instance_status": "DOWN"}}}"#,
        )
        .expect("decodes");
        assert_eq!(down.status, Status::Down);
    }

    #[test]
    fn dubbo3_application_instance() {
        let instance = decode("demo-provider", "x", &fixture("dubbo3.json")).expect("decodes");
        assert_eq!(instance.address, "192.168.10.21");
        assert_eq!(instance.port, 20880);
        assert_eq!(instance.status, Status::Up);
        assert_eq!(
            instance
                .metadata
                .get("dubbo.metadata.storage-type")
                .map(String::as_str),
            Some("local")
        );
    }

    #[test]
    fn disabled_instances_are_draining() {
        let instance = decode("orders", "x", &fixture("disabled.json")).expect("decodes");
        assert_eq!(instance.status, Status::Draining);
    }

    #[test]
    fn an_instance_with_only_an_ssl_port_is_reached_with_tls() {
        let tls_only = decode(
            "orders",
            "x",
            br#"{"address": "10.0.0.7", "port": null, "sslPort": 8443}"#,
        )
        .expect("decodes");
        assert_eq!((tls_only.port, tls_only.tls), (8443, true));
        let both = decode(
            "orders",
            "x",
            br#"{"address": "10.0.0.7", "port": 8080, "sslPort": 8443}"#,
        )
        .expect("decodes");
        assert_eq!(
            (both.port, both.tls),
            (8080, false),
            "the plain port when there is one"
        );
    }

    #[test]
    fn missing_id_falls_back_to_the_znode_name() {
        let instance = decode(
            "orders",
            "node-7",
            br#"{"address": "10.0.0.7", "port": 81}"#,
        )
        .expect("decodes");
        assert_eq!(instance.id, "node-7");
    }

    #[test]
    fn malformed_instances_say_what_is_wrong() {
        let error = |data: &str| {
            decode("orders", "x", data.as_bytes())
                .expect_err("rejected")
                .to_string()
        };
        assert!(error("{not json").contains("not valid JSON"));
        assert!(error(r#"{"port": 80}"#).contains("missing field `address`"));
        assert!(
            error(r#"{"name": "billing", "address": "10.0.0.1", "port": 80}"#)
                .contains(r#""billing" is not the service it is registered under ("orders")"#)
        );
        assert!(error(r#"{"address": "10.0.0.1"}"#).contains("missing field `port`"));
        assert!(
            error(r#"{"address": "10.0.0.1", "port": 70000}"#).contains("70000 is not a TCP port")
        );
        assert!(error(r#"{"address": "10.0.0.1", "sslPort": 0}"#).contains("0 is not a TCP port"));
        assert!(error(
            r#"{"address": "10.0.0.1", "port": 80, "payload": {"metadata": {"weight": "-1"}}}"#
        )
        .contains("payload.metadata.weight"));
    }
}
