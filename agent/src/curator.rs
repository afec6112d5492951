//! The Curator x-discovery JSON of an instance, as Apache Curator 5's `ServiceDiscovery` writes
//! it: what Curator, Spring Cloud Zookeeper and the zklb control plane read. The project's one
//! encoder of the format.

use std::collections::BTreeMap;

use serde::Serialize;

/// An instance as it is registered under `<root>/<service>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    /// `payload.metadata`, strings as Spring Cloud writes them. zklb reads `weight` and `zone`
    /// from it.
    pub metadata: BTreeMap<String, String>,
    /// Written as the payload's `@class` when set. Curator readers deserialize the payload into
    /// their payload class, so Spring Cloud Zookeeper clients need theirs named
    /// (`org.springframework.cloud.zookeeper.discovery.ZookeeperInstance`), while readers whose
    /// class path lacks the named class fail; without it the payload reads as a map.
    pub payload_class: Option<String>,
}

impl Instance {
    /// An instance with no metadata and no payload class.
    pub fn new(
        service: impl Into<String>,
        id: impl Into<String>,
        address: impl Into<String>,
        port: u16,
    ) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            address: address.into(),
            port,
            metadata: BTreeMap::new(),
            payload_class: None,
        }
    }

    /// The znode data: `enabled: false` takes the instance out of rotation without removing it
    /// (Curator's own way, which zklb drains); `registered_ms` is `registrationTimeUTC`.
    pub fn to_json(&self, enabled: bool, registered_ms: u64) -> Vec<u8> {
        let payload =
            (self.payload_class.is_some() || !self.metadata.is_empty()).then_some(Payload {
                class: self.payload_class.as_deref(),
                metadata: &self.metadata,
            });
        let znode = Znode {
            name: &self.service,
            id: &self.id,
            address: &self.address,
            port: self.port,
            ssl_port: None,
            payload,
            registration_time_utc: registered_ms,
            service_type: "DYNAMIC",
            uri_spec: UriSpec { parts: &URI_SPEC },
            enabled,
        };
        serde_json::to_vec(&znode).expect("an instance always serializes")
    }
}

/// Curator's field names and order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Znode<'a> {
    name: &'a str,
    id: &'a str,
    address: &'a str,
    port: u16,
    ssl_port: Option<u16>,
    payload: Option<Payload<'a>>,
    #[serde(rename = "registrationTimeUTC")]
    registration_time_utc: u64,
    service_type: &'static str,
    uri_spec: UriSpec,
    enabled: bool,
}

#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "@class", skip_serializing_if = "Option::is_none")]
    class: Option<&'a str>,
    metadata: &'a BTreeMap<String, String>,
}

/// `{scheme}://{address}:{port}`, parsed as Curator's `UriSpec` stores it.
#[derive(Serialize)]
struct UriSpec {
    parts: &'static [UriPart],
}

#[derive(Serialize)]
struct UriPart {
    value: &'static str,
    variable: bool,
}

const URI_SPEC: [UriPart; 5] = [
    UriPart {
        value: "scheme",
        variable: true,
    },
    UriPart {
        value: "://",
        variable: false,
    },
    UriPart {
        value: "address",
        variable: true,
    },
    UriPart {
        value: ":",
        variable: false,
    },
    UriPart {
        value: "port",
        variable: true,
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn decoded(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("JSON")
    }

    #[test]
    fn an_instance_without_metadata_is_what_curator_writes() {
        let instance = Instance::new("orders", "orders-1", "10.0.0.5", 8080);
        let written = decoded(&instance.to_json(true, 1_700_000_000_000));
        assert_eq!(
            written,
            json!({
                "name": "orders",
                "id": "orders-1",
                "address": "10.0.0.5",
                "port": 8080,
                "sslPort": null,
                "payload": null,
                "registrationTimeUTC": 1_700_000_000_000u64,
                "serviceType": "DYNAMIC",
                "uriSpec": {"parts": [
                    {"value": "scheme", "variable": true},
                    {"value": "://", "variable": false},
                    {"value": "address", "variable": true},
                    {"value": ":", "variable": false},
                    {"value": "port", "variable": true}
                ]},
                "enabled": true
            })
        );
    }

    #[test]
    fn fields_come_in_curators_order() {
        let text = String::from_utf8(Instance::new("a", "b", "10.0.0.1", 1).to_json(true, 0))
            .expect("UTF-8");
        let positions: Vec<usize> = [
            "\"name\"",
            "\"id\"",
            "\"address\"",
            "\"port\"",
            "\"sslPort\"",
            "\"payload\"",
            "\"registrationTimeUTC\"",
            "\"serviceType\"",
            "\"uriSpec\"",
            "\"enabled\"",
        ]
        .iter()
        .map(|field| text.find(field).expect(field))
        .collect();
        assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "{text}");
    }

    #[test]
    fn metadata_goes_to_the_payload_as_strings_and_disabled_is_written() {
        let mut instance = Instance::new("orders", "orders-1", "10.0.0.5", 8080);
        instance.metadata = BTreeMap::from([
            ("weight".to_string(), "10".to_string()),
            ("zone".to_string(), "eu-west-1a".to_string()),
            ("version".to_string(), "1.4.2".to_string()),
        ]);
        let written = decoded(&instance.to_json(false, 5));
        assert_eq!(
            written["payload"],
            json!({"metadata": {"version": "1.4.2", "weight": "10", "zone": "eu-west-1a"}})
        );
        assert_eq!(written["enabled"], false);
    }

    #[test]
    fn a_payload_class_is_named_for_readers_that_need_it() {
        let mut instance = Instance::new("orders", "orders-1", "10.0.0.5", 8080);
        instance.payload_class =
            Some("org.springframework.cloud.zookeeper.discovery.ZookeeperInstance".to_string());
        let written = decoded(&instance.to_json(true, 5));
        assert_eq!(
            written["payload"],
            json!({"@class": "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
                   "metadata": {}})
        );
    }
}
