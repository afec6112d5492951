//! The JSON that the control plane publishes and the filter reads.
//!
//! Both sides depend on this crate so that the format cannot drift. It has no I/O and no runtime
//! dependencies beyond serde, so it builds for `wasm32-wasip1` as well as natively.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Request header in which the filter hands Envoy's `override_host` load-balancing policy the
/// ordered candidate hosts (`ip:port,ip:port,...`): attempt k goes to entry k.
pub const CANDIDATES_HEADER: &str = "x-zklb-candidates";

/// Response header naming the upstream that answered, when the filter's debug headers are on
/// (they also echo the request's candidates in [`CANDIDATES_HEADER`]).
pub const UPSTREAM_HEADER: &str = "x-zklb-upstream";

/// Request header in which the filter names the Envoy cluster of the chosen service; the route
/// selects its cluster with `cluster_header`.
pub const CLUSTER_HEADER: &str = "x-zklb-cluster";

/// Prefix of every Envoy cluster that the control plane creates for a service. It keeps service
/// clusters apart from static ones (the control plane's own above all).
const SERVICE_CLUSTER_PREFIX: &str = "zklb_service_";

/// The Envoy cluster that holds the members of `service`.
pub fn cluster_name(service: &str) -> String {
    format!("{SERVICE_CLUSTER_PREFIX}{service}")
}

/// Whether `name` can name a service: it must be usable verbatim in an Envoy cluster name and an
/// HTTP header value, so it is limited to ASCII letters, digits, `.`, `_` and `-`.
pub fn is_valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The service whose cluster is `cluster`, if `cluster` is a service cluster.
pub fn service_of_cluster(cluster: &str) -> Option<&str> {
    cluster.strip_prefix(SERVICE_CLUSTER_PREFIX)
}

/// A snapshot version: the ZooKeeper zxid of the last change it reflects. Every control-plane
/// replica that has seen the same ZooKeeper state computes the same version, so a client that
/// moves between replicas never sees it go backwards for a different list.
pub type Version = i64;

/// Every service the control plane knows, as `GET /v1/services` answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceSet {
    pub version: Version,
    pub services: BTreeMap<String, Service>,
}

/// One service's instances, as `GET /v1/services/{name}` answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub version: Version,
    /// The registry format the service was read as (for a root read in `auto`, the one chosen),
    /// once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SourceFormat>,
    /// The znode the service was read from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub znode: String,
    pub instances: Vec<Instance>,
}

impl Service {
    /// The instances that may take requests, one per `ip:port`: two registrations of one
    /// address (a restarted process whose old session has not expired yet) are one host, so it
    /// neither gets a double share nor is tried twice for one request.
    pub fn routable_instances(&self) -> Vec<&Instance> {
        let mut seen = std::collections::HashSet::new();
        self.instances
            .iter()
            .filter(|instance| instance.is_routable() && seen.insert(instance.host()))
            .collect()
    }
}

/// One registered instance, normalized from whichever registry format announced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The registrar's instance id (the znode name when the format has none).
    pub id: String,
    /// The IP address requests are sent to. A registrar that gave a host name has it resolved
    /// by the control plane; until it resolves, this is the name, and the instance is not
    /// routable.
    pub address: String,
    /// The host name the registrar gave, when it gave one rather than an IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub port: u16,
    /// Whether `port` speaks TLS (a Curator instance registered with an `sslPort` only): Envoy
    /// connects to it with TLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub status: Status,
    /// Milliseconds since the Unix epoch, when the registrar says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    pub source: SourceFormat,
}

fn default_weight() -> u32 {
    1
}

impl Instance {
    /// An up instance of weight 1, with no zone, registration time or metadata: what every
    /// registry format provides at the least. Decoders fill in whatever more their format says.
    pub fn new(
        id: impl Into<String>,
        address: impl Into<String>,
        port: u16,
        source: SourceFormat,
    ) -> Instance {
        Instance {
            id: id.into(),
            address: address.into(),
            hostname: None,
            port,
            tls: false,
            weight: default_weight(),
            zone: None,
            status: Status::Up,
            registered_at: None,
            metadata: BTreeMap::new(),
            source,
        }
    }

    pub fn with_status(self, status: Status) -> Instance {
        Instance { status, ..self }
    }

    /// `ip:port`, the form in which Envoy names a cluster member.
    pub fn host(&self) -> String {
        match self.address.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.address, self.port),
        }
    }

    /// Whether requests may be sent to this instance: it is up, and its address is an IP literal,
    /// which is what Envoy requires of an EDS member and of an `override_host` entry.
    pub fn is_routable(&self) -> bool {
        self.status == Status::Up && self.port != 0 && self.address.parse::<IpAddr>().is_ok()
    }
}

/// Whether an instance takes traffic, as its registrar says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Up,
    /// Taken out of rotation on purpose, about to go (Curator `enabled: false`, Spring
    /// `OUT_OF_SERVICE`): no new requests.
    Draining,
    /// Registered but not able to take traffic (down, starting, unknown to its registrar).
    Down,
    /// A status that a newer control plane knows and this build does not. Such an instance is
    /// not routable, and the rest of the list is still used: an older filter must keep routing
    /// when the control plane is upgraded first.
    #[serde(other)]
    Unknown,
}

/// The registry format an instance was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// Apache Curator x-discovery JSON (also written by Spring Cloud Zookeeper, Dubbo 3 and
    /// zklb-agent).
    Curator,
    /// Finagle / Aurora ServerSet members (`member_*` JSON znodes).
    Serverset,
    /// Airbnb Nerve JSON.
    Nerve,
    /// Dubbo 2 interface-level provider URLs (the znode name is the instance).
    Dubbo,
    /// APISIX (apisix-seed): one znode per service holding its nodes as JSON.
    Apisix,
    /// A format that a newer control plane decodes and this build does not know by name.
    #[serde(other)]
    Unknown,
}

impl SourceFormat {
    /// The format's name, as in the JSON, the `--registry` flag and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Curator => "curator",
            SourceFormat::Serverset => "serverset",
            SourceFormat::Nerve => "nerve",
            SourceFormat::Dubbo => "dubbo",
            SourceFormat::Apisix => "apisix",
            SourceFormat::Unknown => "unknown",
        }
    }
}

/// The JSON body of every HTTP error the control plane or the filter answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// How fresh a published list is, sent with every list (in the JSON and as headers), so that a
/// consumer can tell a list that follows ZooKeeper from one kept while ZooKeeper is unreachable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Freshness {
    /// True while the control plane cannot follow ZooKeeper and serves its last read.
    pub stale: bool,
    /// When the ZooKeeper read that the list reflects completed, in milliseconds since the Unix
    /// epoch; `None` before the first read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<i64>,
    /// The control plane's ZooKeeper session: `connected`, `disconnected` or `starting`.
    pub session: String,
}

/// Response header carrying [`Freshness::stale`].
pub const STALE_HEADER: &str = "x-zklb-stale";
/// Response header carrying [`Freshness::last_sync`].
pub const LAST_SYNC_HEADER: &str = "x-zklb-last-sync";
/// Response header carrying [`Freshness::session`].
pub const SESSION_HEADER: &str = "x-zklb-session";

/// `GET /v1/services`: the service set with its freshness.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceList {
    #[serde(flatten)]
    pub set: ServiceSet,
    #[serde(flatten)]
    pub freshness: Freshness,
    /// Services left out of `services` because their names differ only in case from an older
    /// one's (a `Host` header could reach only one of them), with the reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conflicts: BTreeMap<String, String>,
    /// What the registry holds and zklb cannot use, with the reasons.
    #[serde(flatten)]
    pub problems: Problems,
}

/// What is registered but not routed, and why, by what an operator must fix.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Problems {
    /// Znodes that do not decode in their format, by path (at most [`MAX_PROBLEMS`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub malformed: BTreeMap<String, String>,
    /// Znodes that cannot be read (no permission, say), by path; they are read again later.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unreadable: BTreeMap<String, String>,
    /// Registered host names that do not resolve to an address, with the resolver's error;
    /// their instances get no traffic until they do.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unresolved: BTreeMap<String, String>,
}

/// The most entries a list of [`Problems`] carries, so a registry full of garbage cannot make
/// every list huge; the metrics count them all.
pub const MAX_PROBLEMS: usize = 100;

/// `GET /v1/changes?after=V`: what changed in the registry since version `V`, so that a client
/// that holds `V` gets only the services whose version moved and the names of those removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceChanges {
    pub version: Version,
    /// True when this is the whole registry (no `after`, or one older than this control plane
    /// can answer from): every service not listed is gone.
    pub full: bool,
    /// The services added or changed since `after` (every service when `full`).
    pub services: BTreeMap<String, Service>,
    /// The services removed since `after`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    #[serde(flatten)]
    pub freshness: Freshness,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(address: &str, port: u16, status: Status) -> Instance {
        Instance::new("a", address, port, SourceFormat::Curator).with_status(status)
    }

    #[test]
    fn cluster_names_round_trip_and_reject_foreign_clusters() {
        assert_eq!(service_of_cluster(&cluster_name("orders")), Some("orders"));
        assert_eq!(service_of_cluster("zklb_control_plane"), None);
    }

    #[test]
    fn service_names_are_limited_to_what_envoy_and_headers_accept() {
        assert!(is_valid_service_name("com.example.Orders-v2_eu"));
        assert!(!is_valid_service_name(""));
        assert!(!is_valid_service_name("two words"));
        assert!(!is_valid_service_name("a,b"));
        assert!(!is_valid_service_name("caf\u{e9}"));
    }

    #[test]
    fn hosts_are_written_the_way_envoy_names_members() {
        assert_eq!(instance("10.0.0.1", 80, Status::Up).host(), "10.0.0.1:80");
        assert_eq!(instance("::1", 80, Status::Up).host(), "[::1]:80");
    }

    #[test]
    fn only_up_instances_with_ip_addresses_are_routable() {
        assert!(instance("127.0.0.1", 8080, Status::Up).is_routable());
        assert!(!instance("127.0.0.1", 8080, Status::Down).is_routable());
        assert!(!instance("backend.example", 8080, Status::Up).is_routable());
        assert!(!instance("127.0.0.1", 0, Status::Up).is_routable());
    }

    #[test]
    fn an_address_registered_twice_is_one_routable_instance() {
        let service = Service {
            name: "echo".into(),
            version: 1,
            instances: vec![
                Instance::new("old", "127.0.0.1", 8080, SourceFormat::Curator),
                Instance::new("new", "127.0.0.1", 8080, SourceFormat::Curator),
                Instance::new("down", "127.0.0.1", 8081, SourceFormat::Curator)
                    .with_status(Status::Down),
                Instance::new("other", "127.0.0.1", 8082, SourceFormat::Curator),
            ],
            ..Service::default()
        };
        let ids: Vec<&str> = service
            .routable_instances()
            .iter()
            .map(|instance| instance.id.as_str())
            .collect();
        assert_eq!(ids, ["old", "other"]);
    }

    #[test]
    fn values_from_a_newer_control_plane_decode_as_unknown_and_are_not_routable() {
        let json = r#"{"id": "a", "address": "127.0.0.1", "port": 80,
                       "status": "warming", "source": "consul"}"#;
        let instance: Instance = serde_json::from_str(json).expect("parses");
        assert_eq!(instance.status, Status::Unknown);
        assert_eq!(instance.source, SourceFormat::Unknown);
        assert!(!instance.is_routable());
    }

    #[test]
    fn a_list_carries_its_freshness_beside_the_set() {
        let list = ServiceList {
            set: ServiceSet {
                version: 5,
                services: BTreeMap::new(),
            },
            freshness: Freshness {
                stale: true,
                last_sync: Some(1_700_000_000_000),
                session: "disconnected".into(),
            },
            conflicts: BTreeMap::new(),
            problems: Problems::default(),
        };
        let json = serde_json::to_value(&list).expect("serializes");
        assert_eq!(json["version"], 5);
        assert_eq!(json["stale"], true);
        assert_eq!(json["session"], "disconnected");
        let set: ServiceSet = serde_json::from_value(json).expect("a plain set parses too");
        assert_eq!(set, list.set);
    }

    #[test]
    fn instances_survive_a_json_round_trip() {
        let original = instance("127.0.0.1", 8080, Status::Up);
        let json = serde_json::to_string(&original).expect("serializes");
        assert_eq!(
            serde_json::from_str::<Instance>(&json).expect("parses"),
            original
        );
    }
}
