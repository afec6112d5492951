//! The plugin configuration, parsed and checked once when Envoy loads the plugin.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::balancer::Policy;
use crate::ejection::EjectionPolicy;
use crate::routing::{RawRule, Rules};

/// What a root context was configured to be, from its JSON plugin configuration
/// (`{"role": "poller", ...}`, `{"role": "router", ...}` or `{"role": "learner"}`).
#[derive(Debug, Clone, PartialEq)]
pub enum PluginConfig {
    Poller(PollerConfig),
    Router(RouterConfig),
    /// Ejects by the routers' ejection policy, so it has no settings of its own.
    Learner,
}

/// The singleton that fetches the service list from the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollerConfig {
    /// The Envoy cluster through which the control plane is reached.
    pub control_plane_cluster: String,
    /// How long the control plane may hold a poll open waiting for a change.
    pub wait: Duration,
    /// How long to wait before polling again after a failed poll.
    pub retry_interval: Duration,
    /// The largest list answer taken: a bigger one is refused unread, and the last good list
    /// stays in use.
    pub max_list_bytes: usize,
}

/// The HTTP filter that chooses the upstream candidates of every request.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// Candidates written per request: the route's `num_retries` + 1, so that every attempt goes
    /// to a different host.
    pub candidates: usize,
    /// The policy of every service without one of its own.
    pub policy: Policy,
    /// Per-service policies, by exact service name.
    pub services: BTreeMap<String, Policy>,
    /// Whether responses say which candidates were chosen and which upstream answered
    /// (`x-zklb-candidates`, `x-zklb-upstream`): for debugging and tests, off by default.
    pub debug_headers: bool,
    /// Passive ejection of failing hosts, shared by every worker; `None` when turned off.
    pub ejection: Option<EjectionPolicy>,
    /// Which service a request is for.
    pub routes: Rules,
    /// The zone this Envoy runs in, whose hosts come first; `None`: Envoy's node locality.
    pub zone: Option<String>,
    /// How many usable hosts the caller's zone needs for them to come first.
    pub min_zone_hosts: usize,
    /// How long a newly registered host's share takes to ramp up (0: off).
    pub warmup: Duration,
}

impl RouterConfig {
    pub fn policy_for(&self, service: &str) -> Policy {
        self.services.get(service).copied().unwrap_or(self.policy)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoller {
    control_plane_cluster: String,
    #[serde(default = "default_wait_seconds")]
    wait_seconds: u64,
    #[serde(default = "default_retry_interval_ms")]
    retry_interval_ms: u64,
    #[serde(default = "default_max_list_bytes")]
    max_list_bytes: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLearner {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    retries: usize,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
    #[serde(default)]
    debug_headers: bool,
    #[serde(default)]
    ejection: RawEjection,
    routes: Option<Vec<RawRule>>,
    default_service: Option<String>,
    zone: Option<String>,
    #[serde(default = "default_min_zone_hosts")]
    min_zone_hosts: usize,
    #[serde(default)]
    warmup_seconds: u64,
}

fn default_min_zone_hosts() -> usize {
    2
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEjection {
    enabled: bool,
    consecutive_failures: u32,
    base_ms: u64,
    max_ms: u64,
    max_ejected_percent: u32,
}

impl Default for RawEjection {
    fn default() -> RawEjection {
        let policy = EjectionPolicy::default();
        RawEjection {
            enabled: true,
            consecutive_failures: policy.consecutive_failures,
            base_ms: policy.base_ms,
            max_ms: policy.max_ms,
            max_ejected_percent: (policy.max_ejected_share * 100.0) as u32,
        }
    }
}

impl RawEjection {
    fn policy(self) -> Result<Option<EjectionPolicy>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let invalid = |reason: String| Err(ConfigError(format!("router: ejection.{reason}")));
        if self.consecutive_failures == 0 {
            return invalid("consecutive_failures must be at least 1".into());
        }
        if self.base_ms == 0 || self.max_ms < self.base_ms {
            return invalid(format!(
                "base_ms must be positive and at most max_ms, got {} and {}",
                self.base_ms, self.max_ms
            ));
        }
        if self.max_ejected_percent > 100 {
            return invalid(format!(
                "max_ejected_percent must be at most 100, got {}",
                self.max_ejected_percent
            ));
        }
        Ok(Some(EjectionPolicy {
            consecutive_failures: self.consecutive_failures,
            base_ms: self.base_ms,
            max_ms: self.max_ms,
            max_ejected_share: f64::from(self.max_ejected_percent) / 100.0,
        }))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    policy: Policy,
}

fn default_wait_seconds() -> u64 {
    30
}

fn default_retry_interval_ms() -> u64 {
    1_000
}

fn default_max_list_bytes() -> usize {
    32 << 20
}

/// Bounds of `max_list_bytes`: below, not even a small registry's list fits; above, one answer
/// would take a worker VM's memory.
const MIN_LIST_BYTES: usize = 1 << 10;
const MAX_LIST_BYTES: usize = 1 << 30;

/// Most retries a route may ask for; the candidate header stays a few hundred bytes.
const MAX_RETRIES: usize = 16;

/// Why a plugin configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl PluginConfig {
    pub fn parse(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
        let shape = |reason: String| {
            ConfigError(format!(
                "expected JSON {{\"role\": \"poller\" | \"router\" | \"learner\", ...}}: {reason}"
            ))
        };
        let mut value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|error| shape(error.to_string()))?;
        let role = match value.as_object_mut().map(|fields| fields.remove("role")) {
            Some(Some(serde_json::Value::String(role))) => role,
            _ => return Err(shape("no \"role\" string".into())),
        };
        match role.as_str() {
            "learner" => {
                let RawLearner {} = role_fields("learner", value)?;
                Ok(PluginConfig::Learner)
            }
            "poller" => {
                let raw: RawPoller = role_fields("poller", value)?;
                if raw.control_plane_cluster.is_empty() {
                    return Err(ConfigError(
                        "poller: control_plane_cluster must not be empty".into(),
                    ));
                }
                if raw.wait_seconds == 0 || raw.wait_seconds > 300 {
                    return Err(ConfigError(format!(
                        "poller: wait_seconds must be between 1 and 300, got {}",
                        raw.wait_seconds
                    )));
                }
                if raw.retry_interval_ms == 0 {
                    return Err(ConfigError(
                        "poller: retry_interval_ms must be positive".into(),
                    ));
                }
                if !(MIN_LIST_BYTES..=MAX_LIST_BYTES).contains(&raw.max_list_bytes) {
                    return Err(ConfigError(format!(
                        "poller: max_list_bytes must be between {MIN_LIST_BYTES} and \
                         {MAX_LIST_BYTES}, got {}",
                        raw.max_list_bytes
                    )));
                }
                Ok(PluginConfig::Poller(PollerConfig {
                    control_plane_cluster: raw.control_plane_cluster,
                    wait: Duration::from_secs(raw.wait_seconds),
                    retry_interval: Duration::from_millis(raw.retry_interval_ms),
                    max_list_bytes: raw.max_list_bytes,
                }))
            }
            "router" => {
                let raw: RawRouter = role_fields("router", value)?;
                if raw.retries > MAX_RETRIES {
                    return Err(ConfigError(format!(
                        "router: retries must be at most {MAX_RETRIES}, got {}",
                        raw.retries
                    )));
                }
                if let Some(name) = raw
                    .services
                    .keys()
                    .find(|name| !zklb_wire::is_valid_service_name(name))
                {
                    return Err(ConfigError(format!(
                        "router: services.{name:?} is not a service name (ASCII letters, digits, '.', '_', '-')"
                    )));
                }
                Ok(PluginConfig::Router(RouterConfig {
                    candidates: raw.retries + 1,
                    policy: raw.policy,
                    services: raw
                        .services
                        .into_iter()
                        .map(|(name, service)| (name, service.policy))
                        .collect(),
                    debug_headers: raw.debug_headers,
                    ejection: raw.ejection.policy()?,
                    routes: Rules::parse(raw.routes, raw.default_service, MAX_RETRIES)
                        .map_err(|reason| ConfigError(format!("router: {reason}")))?,
                    zone: raw.zone.filter(|zone| !zone.is_empty()),
                    min_zone_hosts: raw.min_zone_hosts.max(1),
                    warmup: Duration::from_secs(raw.warmup_seconds),
                }))
            }
            other => Err(shape(format!("unknown role {other:?}"))),
        }
    }
}

/// The configuration of a `role`, its fields checked one by one: a wrong one is named by its
/// path (`ejection.base_ms`), which serde's own errors leave out.
fn role_fields<T: DeserializeOwned>(
    role: &str,
    value: serde_json::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let reason = error.into_inner();
        if path == "." {
            ConfigError(format!("{role}: {reason}"))
        } else {
            ConfigError(format!("{role}: {path}: {reason}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(json: &str) -> String {
        PluginConfig::parse(json.as_bytes())
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn router_config_asks_for_one_candidate_per_attempt() {
        let config = PluginConfig::parse(br#"{"role": "router", "retries": 2}"#).expect("valid");
        assert_eq!(
            config,
            PluginConfig::Router(RouterConfig {
                candidates: 3,
                policy: Policy::Random,
                services: BTreeMap::new(),
                debug_headers: false,
                ejection: Some(EjectionPolicy::default()),
                routes: Rules::default(),
                zone: None,
                min_zone_hosts: 2,
                warmup: Duration::ZERO,
            })
        );
    }

    #[test]
    fn services_may_have_policies_of_their_own() {
        let config = PluginConfig::parse(
            br#"{"role": "router", "retries": 1, "policy": "weighted_random",
                 "services": {"cache": {"policy": "random"}}, "debug_headers": true}"#,
        )
        .expect("valid");
        let PluginConfig::Router(config) = config else {
            panic!("a router");
        };
        assert_eq!(config.policy_for("orders"), Policy::WeightedRandom);
        assert_eq!(config.policy_for("cache"), Policy::Random);
        assert!(config.debug_headers);
        let off = PluginConfig::parse(
            br#"{"role": "router", "retries": 1, "ejection": {"enabled": false}}"#,
        );
        assert!(matches!(
            off,
            Ok(PluginConfig::Router(RouterConfig { ejection: None, .. }))
        ));
    }

    #[test]
    fn poller_config_has_defaults() {
        let config = PluginConfig::parse(br#"{"role": "poller", "control_plane_cluster": "cp"}"#)
            .expect("valid");
        assert_eq!(
            config,
            PluginConfig::Poller(PollerConfig {
                control_plane_cluster: "cp".into(),
                wait: Duration::from_secs(30),
                retry_interval: Duration::from_secs(1),
                max_list_bytes: 32 * 1024 * 1024,
            })
        );
    }

    #[test]
    fn the_learner_takes_no_settings() {
        assert_eq!(
            PluginConfig::parse(br#"{"role": "learner"}"#),
            Ok(PluginConfig::Learner)
        );
        // Its ejection policy is the routers': one given here would be ignored, so it is refused.
        let error = rejection(r#"{"role": "learner", "ejection": {"base_ms": 5}}"#);
        assert!(error.starts_with("learner: "), "{error}");
        assert!(error.contains("ejection"), "{error}");
    }

    #[test]
    fn bad_configs_are_rejected_with_the_reason() {
        assert!(rejection("").contains("expected JSON"));
        assert!(rejection(r#"{"role": "balancer"}"#).contains("unknown role \"balancer\""));
        assert!(rejection(r#"{"retries": 2}"#).contains("no \"role\""));
        assert!(rejection(r#"{"role": "router"}"#).contains("missing field `retries`"));
        assert!(
            rejection(r#"{"role": "router", "retries": 2, "retrys": 3}"#)
                .contains("unknown field `retrys`")
        );
        assert!(rejection(r#"{"role": "router", "retries": 99}"#).contains("at most 16"));
        assert!(
            rejection(r#"{"role": "router", "retries": 2, "policy": "round_robin"}"#)
                .contains("unknown variant `round_robin`")
        );
        assert!(rejection(
            r#"{"role": "router", "retries": 2, "services": {"a b": {"policy": "random"}}}"#
        )
        .contains("is not a service name"));
        assert!(rejection(
            r#"{"role": "router", "retries": 2, "ejection": {"consecutive_failures": 0}}"#
        )
        .contains("ejection.consecutive_failures must be at least 1"));
        assert!(
            rejection(r#"{"role": "router", "retries": 2, "ejection": {"after": 3}}"#)
                .contains("unknown field `after`")
        );
        assert!(rejection(
            r#"{"role": "router", "retries": 2, "routes": [{"path_prefix": "/a"}]}"#
        )
        .contains("router: routes[0] with a path_prefix must name its service"));
        assert!(
            rejection(r#"{"role": "poller", "control_plane_cluster": ""}"#)
                .contains("must not be empty")
        );
        assert!(rejection(
            r#"{"role": "poller", "control_plane_cluster": "cp", "wait_seconds": 0}"#
        )
        .contains("between 1 and 300"));
        assert!(rejection(
            r#"{"role": "poller", "control_plane_cluster": "cp", "max_list_bytes": 0}"#
        )
        .contains("max_list_bytes must be between 1024 and 1073741824, got 0"));
        let negative =
            rejection(r#"{"role": "poller", "control_plane_cluster": "cp", "max_list_bytes": -1}"#);
        assert!(
            negative
                .contains("poller: max_list_bytes: invalid value: integer `-1`, expected usize"),
            "{negative}"
        );
        let nested =
            rejection(r#"{"role": "router", "retries": 2, "ejection": {"base_ms": "soon"}}"#);
        assert!(
            nested.contains("router: ejection.base_ms: invalid type: string \"soon\""),
            "{nested}"
        );
    }
}
