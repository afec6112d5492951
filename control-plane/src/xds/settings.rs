//! The settings of the Envoy clusters generated for services: built-in defaults, overridden for
//! every service by the file's `defaults` and for one service by its entry in `services`.
//!
//! ```json
//! {"defaults": {"connect_timeout_ms": 500},
//!  "services": {"orders-grpc": {"protocol": "http2", "max_requests": 4096}}}
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// How Envoy speaks to a service's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 without TLS (prior knowledge), for gRPC and Dubbo triple backends.
    Http2,
}

/// The settings of one service's cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterSettings {
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    /// Circuit breakers of the cluster's default priority.
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// Concurrent retries, as a share of the requests in flight (a retry budget), in percent:
    /// enough for the retries a dead host causes before it is ejected, not for a retry storm
    /// that multiplies the load on a failing service. (Envoy's default, 3 concurrent retries,
    /// turns one dead backend into client errors under load.)
    pub retry_budget_percent: u32,
    /// Concurrent retries allowed whatever the budget, for services with few requests in flight.
    pub min_retry_concurrency: u32,
    /// For instances reached with TLS: the CA certificates (PEM file) that their certificates
    /// must chain to, checked when set; without it the connection is encrypted, not verified.
    pub tls_ca_file: Option<String>,
    /// For instances reached with TLS: the server name sent (SNI) and, with `tls_ca_file`, the
    /// name their certificates must carry.
    pub tls_server_name: Option<String>,
}

impl Default for ClusterSettings {
    fn default() -> ClusterSettings {
        ClusterSettings {
            protocol: UpstreamProtocol::Http1,
            connect_timeout: Duration::from_secs(1),
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            retry_budget_percent: 50,
            min_retry_concurrency: 10,
            tls_ca_file: None,
            tls_server_name: None,
        }
    }
}

/// Settings for every service: defaults and per-service overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSettingsTable {
    defaults: ClusterSettings,
    services: BTreeMap<String, ClusterSettings>,
}

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("cannot read cluster settings {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cluster settings {path}: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawSettings,
    #[serde(default)]
    services: BTreeMap<String, RawSettings>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    protocol: Option<UpstreamProtocol>,
    connect_timeout_ms: Option<u64>,
    max_connections: Option<u32>,
    max_pending_requests: Option<u32>,
    max_requests: Option<u32>,
    retry_budget_percent: Option<u32>,
    min_retry_concurrency: Option<u32>,
    tls_ca_file: Option<String>,
    tls_server_name: Option<String>,
}

impl RawSettings {
    /// `base` with whatever this sets, or why a value cannot be used (`at` names its place).
    fn over(&self, base: &ClusterSettings, at: &str) -> Result<ClusterSettings, String> {
        let positive = |key: &str, value: Option<u32>, current: u32| match value {
            Some(0) => Err(format!("{at}.{key} must be at least 1")),
            Some(value) => Ok(value),
            None => Ok(current),
        };
        let connect_timeout = match self.connect_timeout_ms {
            Some(ms @ 1..=60_000) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(format!(
                    "{at}.connect_timeout_ms must be between 1 and 60000, got {ms}"
                ))
            }
            None => base.connect_timeout,
        };
        Ok(ClusterSettings {
            protocol: self.protocol.unwrap_or(base.protocol),
            connect_timeout,
            max_connections: positive(
                "max_connections",
                self.max_connections,
                base.max_connections,
            )?,
            max_pending_requests: positive(
                "max_pending_requests",
                self.max_pending_requests,
                base.max_pending_requests,
            )?,
            max_requests: positive("max_requests", self.max_requests, base.max_requests)?,
            retry_budget_percent: match self.retry_budget_percent {
                Some(percent @ 1..=100) => percent,
                Some(percent) => {
                    return Err(format!(
                        "{at}.retry_budget_percent must be between 1 and 100, got {percent}"
                    ))
                }
                None => base.retry_budget_percent,
            },
            min_retry_concurrency: positive(
                "min_retry_concurrency",
                self.min_retry_concurrency,
                base.min_retry_concurrency,
            )?,
            tls_ca_file: match &self.tls_ca_file {
                Some(path) if path.is_empty() => {
                    return Err(format!("{at}.tls_ca_file must name a file"))
                }
                Some(path) => Some(path.clone()),
                None => base.tls_ca_file.clone(),
            },
            tls_server_name: self
                .tls_server_name
                .clone()
                .or_else(|| base.tls_server_name.clone()),
        })
    }
}

impl ClusterSettingsTable {
    pub fn load(path: &Path) -> Result<ClusterSettingsTable, SettingsError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| SettingsError::Read {
            path: shown.clone(),
            source,
        })?;
        ClusterSettingsTable::parse(&text).map_err(|reason| SettingsError::Invalid {
            path: shown,
            reason,
        })
    }

    pub fn parse(json: &[u8]) -> Result<ClusterSettingsTable, String> {
        let raw: RawFile = serde_json::from_slice(json).map_err(|error| error.to_string())?;
        let defaults = raw.defaults.over(&ClusterSettings::default(), "defaults")?;
        let mut services = BTreeMap::new();
        for (service, settings) in &raw.services {
            if !zklb_wire::is_valid_service_name(service) {
                return Err(format!(
                    "services.{service:?} is not a service name (ASCII letters, digits, '.', '_', '-')"
                ));
            }
            let resolved = settings.over(&defaults, &format!("services.{service}"))?;
            services.insert(service.clone(), resolved);
        }
        Ok(ClusterSettingsTable { defaults, services })
    }

    pub fn for_service(&self, service: &str) -> &ClusterSettings {
        self.services.get(service).unwrap_or(&self.defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_inherit_the_file_defaults_and_override_them() {
        let table = ClusterSettingsTable::parse(
            br#"{"defaults": {"connect_timeout_ms": 250},
                 "services": {"grpc": {"protocol": "http2", "max_requests": 4096}}}"#,
        )
        .expect("valid");
        let plain = table.for_service("echo");
        assert_eq!(plain.protocol, UpstreamProtocol::Http1);
        assert_eq!(plain.connect_timeout, Duration::from_millis(250));
        assert_eq!(plain.retry_budget_percent, 50);
        let grpc = table.for_service("grpc");
        assert_eq!(grpc.protocol, UpstreamProtocol::Http2);
        assert_eq!(grpc.connect_timeout, Duration::from_millis(250));
        assert_eq!(grpc.max_requests, 4096);
    }

    #[test]
    fn an_empty_file_means_the_built_in_defaults() {
        let table = ClusterSettingsTable::parse(b"{}").expect("valid");
        assert_eq!(table, ClusterSettingsTable::default());
    }

    #[test]
    fn bad_settings_are_refused_with_the_key_that_is_wrong() {
        let refusal = |json: &str| ClusterSettingsTable::parse(json.as_bytes()).expect_err(json);
        assert!(refusal(r#"{"defaults": {"protocol": "http3"}}"#).contains("unknown variant"));
        assert!(refusal(r#"{"defaults": {"timeout": 3}}"#).contains("unknown field `timeout`"));
        assert!(refusal(r#"{"services": {"a": {"connect_timeout_ms": 0}}}"#)
            .contains("services.a.connect_timeout_ms must be between 1 and 60000"));
        assert!(
            refusal(r#"{"services": {"a": {"min_retry_concurrency": 0}}}"#)
                .contains("services.a.min_retry_concurrency must be at least 1")
        );
        assert!(
            refusal(r#"{"services": {"a": {"retry_budget_percent": 101}}}"#)
                .contains("services.a.retry_budget_percent must be between 1 and 100, got 101")
        );
        assert!(refusal(r#"{"services": {"a b": {}}}"#).contains("is not a service name"));
        assert!(refusal(r#"{"defaults": {"tls_ca_file": ""}}"#)
            .contains("defaults.tls_ca_file must name a file"));
    }
}
