//! What the agent registers and how it checks it: flags or `ZKLB_AGENT_*` variables for one
//! instance, a JSON file (`--config`) for several. Everything is validated before ZooKeeper is
//! touched, and a problem is reported with the flag or the file key that holds it.
//!
//! ```json
//! {"instances": [
//!   {"service": "orders", "address": "10.0.0.5", "port": 8080, "weight": 10, "zone": "eu-west-1a",
//!    "metadata": {"version": "1.4.2"},
//!    "check": {"http": "/health", "interval_ms": 1000, "rise": 2, "fall": 3},
//!    "on_unhealthy": "disable"},
//!   {"service": "orders-grpc", "address": "10.0.0.5", "port": 9090, "check": {"tcp": true}}
//! ]}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use thiserror::Error;

use zklb_zk_access::{Access, AccessArgs, AccessError, ReadAcl};

use crate::curator::Instance;
use crate::health::{CheckConfig, Probe, Statuses};

const DEFAULT_INTERVAL_MS: u64 = 2_000;
const DEFAULT_TIMEOUT_MS: u64 = 1_000;
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;

/// The command line; `--help` lists it. Instance flags describe one instance and cannot be
/// combined with `--config`.
#[derive(Debug, Clone, Parser)]
#[command(name = "zklb-agent", version, about, args_override_self = true)]
pub struct Args {
    /// ZooKeeper connect string.
    #[arg(long, env = "ZKLB_AGENT_ZOOKEEPER", default_value = "127.0.0.1:2181")]
    pub zookeeper: String,
    /// The registry root: instances register as `<root>/<service>/<id>`.
    #[arg(long, env = "ZKLB_AGENT_ROOT", default_value = "/services")]
    pub root: String,
    /// ZooKeeper session timeout, in milliseconds: how long ZooKeeper keeps the registrations
    /// of an agent it no longer hears from.
    #[arg(long, env = "ZKLB_AGENT_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// On SIGTERM, how long the instances stay registered as out of service, so that traffic
    /// moves away, before they are deregistered, in milliseconds.
    #[arg(long, env = "ZKLB_AGENT_GRACE_MS", default_value_t = 5_000)]
    pub grace_ms: u64,
    /// Address of the agent's own `/metrics` and `/healthz`; port 0 picks a free one (the first
    /// line on stdout says which).
    #[arg(long, env = "ZKLB_AGENT_LISTEN", default_value = "127.0.0.1:9911")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub access: AccessArgs,
    /// Who may read the registrations (every permission stays with the agent's own identity
    /// when it authenticates): `world:anyone`, `digest:<user>:<hash>`, `ip:<address>`,
    /// `x509:<name>` (repeated, or comma-separated in the variable).
    #[arg(
        long = "read-acl",
        env = "ZKLB_AGENT_READ_ACL",
        value_delimiter = ',',
        default_value = "world:anyone"
    )]
    pub read_acls: Vec<ReadAcl>,
    /// A JSON file of instances (`{"instances": [...]}`, see the README), instead of the
    /// instance flags below.
    #[arg(long, env = "ZKLB_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// The service the instance belongs to.
    #[arg(
        long,
        env = "ZKLB_AGENT_SERVICE",
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    pub service: Option<String>,
    /// The instance id (the znode's name); defaults to `<address>:<port>`.
    #[arg(long, env = "ZKLB_AGENT_ID", conflicts_with = "config")]
    pub id: Option<String>,
    /// The instance's IP address, as clients reach it.
    #[arg(
        long,
        env = "ZKLB_AGENT_ADDRESS",
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    pub address: Option<String>,
    #[arg(
        long,
        env = "ZKLB_AGENT_PORT",
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    pub port: Option<u16>,
    /// The registry weight (`payload.metadata.weight`).
    #[arg(long, env = "ZKLB_AGENT_WEIGHT", conflicts_with = "config")]
    pub weight: Option<u32>,
    /// The zone the instance runs in (`payload.metadata.zone`).
    #[arg(long, env = "ZKLB_AGENT_ZONE", conflicts_with = "config")]
    pub zone: Option<String>,
    /// More `payload.metadata`, `KEY=VALUE` (repeated, or comma-separated in the variable).
    #[arg(
        long = "metadata",
        env = "ZKLB_AGENT_METADATA",
        value_delimiter = ',',
        conflicts_with = "config"
    )]
    pub metadata: Vec<String>,
    /// The payload's `@class`, for Curator readers that deserialize payloads into a class.
    #[arg(long, env = "ZKLB_AGENT_PAYLOAD_CLASS", conflicts_with = "config")]
    pub payload_class: Option<String>,
    /// Check the instance with `GET PATH`.
    #[arg(long, env = "ZKLB_AGENT_HTTP_CHECK", value_name = "PATH", conflicts_with_all = ["config", "tcp_check"])]
    pub http_check: Option<String>,
    /// Check the instance by connecting to its port.
    #[arg(long, env = "ZKLB_AGENT_TCP_CHECK", conflicts_with = "config")]
    pub tcp_check: bool,
    /// HTTP statuses that pass the check, as `200-299,404` [default: 200-399].
    #[arg(long, env = "ZKLB_AGENT_HTTP_EXPECT", conflicts_with = "config")]
    pub http_expect: Option<String>,
    /// Milliseconds between checks [default: 2000].
    #[arg(long, env = "ZKLB_AGENT_INTERVAL_MS", conflicts_with = "config")]
    pub interval_ms: Option<u64>,
    /// Milliseconds after which a check fails [default: 1000].
    #[arg(long, env = "ZKLB_AGENT_TIMEOUT_MS", conflicts_with = "config")]
    pub timeout_ms: Option<u64>,
    /// Checks passed in a row that put an unhealthy instance in rotation [default: 2].
    #[arg(long, env = "ZKLB_AGENT_RISE", conflicts_with = "config")]
    pub rise: Option<u32>,
    /// Checks failed in a row that take a healthy instance out of rotation [default: 3].
    #[arg(long, env = "ZKLB_AGENT_FALL", conflicts_with = "config")]
    pub fall: Option<u32>,
    /// What an unhealthy instance becomes: `disable` (registered with `enabled: false`, which
    /// drains it) or `deregister` (its znode removed) [default: disable].
    #[arg(long, env = "ZKLB_AGENT_ON_UNHEALTHY", conflicts_with = "config")]
    pub on_unhealthy: Option<OnUnhealthy>,
}

/// What happens to the registration of an instance that fails its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnhealthy {
    /// Stays registered with `enabled: false`: listed as draining, sent no new requests.
    #[default]
    Disable,
    /// Its znode is deleted, and created again when it is healthy.
    Deregister,
}

/// Everything the agent runs with, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub zookeeper: String,
    /// How ZooKeeper is reached (TLS, digest identity).
    pub access: Access,
    /// Who may read the registrations.
    pub read_acls: Vec<ReadAcl>,
    pub root: String,
    pub session_timeout: Duration,
    pub grace: Duration,
    pub listen: SocketAddr,
    pub instances: Vec<InstanceConfig>,
}

/// One instance to register.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceConfig {
    pub instance: Instance,
    /// Where checks go: the instance's address and port.
    pub target: SocketAddr,
    pub check: Option<CheckConfig>,
    pub on_unhealthy: OnUnhealthy,
}

impl InstanceConfig {
    /// `<root>/<service>/<id>`.
    pub fn znode(&self, root: &str) -> String {
        format!(
            "{}/{}/{}",
            root.trim_end_matches('/'),
            self.instance.service,
            self.instance.id
        )
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid instance file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// An instance as written in the file, and as the flags give it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    service: String,
    id: Option<String>,
    address: String,
    port: u16,
    weight: Option<u32>,
    zone: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    payload_class: Option<String>,
    check: Option<RawCheck>,
    on_unhealthy: Option<OnUnhealthy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    http: Option<String>,
    #[serde(default)]
    tcp: bool,
    expect: Option<String>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
}

impl RawCheck {
    fn is_empty(&self) -> bool {
        self.http.is_none()
            && !self.tcp
            && self.expect.is_none()
            && self.interval_ms.is_none()
            && self.timeout_ms.is_none()
            && self.rise.is_none()
            && self.fall.is_none()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceFile {
    instances: Vec<RawInstance>,
}

/// Where an instance's settings came from, to name a bad one as its user wrote it.
enum Origin<'a> {
    Flags,
    File { path: &'a Path, index: usize },
}

/// A setting by its flag and by its key in the instance file.
struct Field {
    flag: &'static str,
    key: &'static str,
}

macro_rules! field {
    ($flag:literal, $key:literal) => {
        Field {
            flag: $flag,
            key: $key,
        }
    };
}

impl Origin<'_> {
    fn name(&self, field: &Field) -> String {
        match self {
            Origin::Flags => field.flag.to_string(),
            Origin::File { path, index } => {
                format!("{}: instances[{index}].{}", path.display(), field.key)
            }
        }
    }

    fn invalid(&self, field: &Field, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            field: self.name(field),
            reason: reason.into(),
        }
    }
}

impl Config {
    /// Validates the command line (and reads the instance file it names).
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let global = |flag: &'static str, reason: String| ConfigError::Invalid {
            field: flag.to_string(),
            reason,
        };
        if args.zookeeper.trim().is_empty() {
            return Err(global("--zookeeper", "is empty".to_string()));
        }
        if !is_znode_path(&args.root) {
            return Err(global(
                "--root",
                format!("{:?} is not a ZooKeeper path such as /services", args.root),
            ));
        }
        if args.session_timeout_ms == 0 {
            return Err(global(
                "--session-timeout-ms",
                "must be at least 1".to_string(),
            ));
        }
        let instances = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let file: InstanceFile =
                    serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                        path: path.clone(),
                        source,
                    })?;
                if file.instances.is_empty() {
                    return Err(ConfigError::Invalid {
                        field: format!("{}: instances", path.display()),
                        reason: "lists no instance".to_string(),
                    });
                }
                file.instances
                    .into_iter()
                    .enumerate()
                    .map(|(index, raw)| validate(raw, &Origin::File { path, index }))
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => vec![validate(raw_from_flags(&args)?, &Origin::Flags)?],
        };
        let mut seen = BTreeSet::new();
        for instance in &instances {
            let key = (&instance.instance.service, &instance.instance.id);
            if !seen.insert(key) {
                return Err(ConfigError::Invalid {
                    field: "instances".to_string(),
                    reason: format!("{} is registered twice", instance.znode(&args.root)),
                });
            }
        }
        Ok(Config {
            access: Access::load(&args.access)?,
            read_acls: args.read_acls,
            zookeeper: args.zookeeper,
            root: args.root,
            session_timeout: Duration::from_millis(args.session_timeout_ms),
            grace: Duration::from_millis(args.grace_ms),
            listen: args.listen,
            instances,
        })
    }
}

fn raw_from_flags(args: &Args) -> Result<RawInstance, ConfigError> {
    let mut metadata = BTreeMap::new();
    for entry in &args.metadata {
        let (key, value) = entry.split_once('=').ok_or_else(|| {
            Origin::Flags.invalid(
                &field!("--metadata", "metadata"),
                format!("{entry:?} is not KEY=VALUE"),
            )
        })?;
        metadata.insert(key.to_string(), value.to_string());
    }
    let check = RawCheck {
        http: args.http_check.clone(),
        tcp: args.tcp_check,
        expect: args.http_expect.clone(),
        interval_ms: args.interval_ms,
        timeout_ms: args.timeout_ms,
        rise: args.rise,
        fall: args.fall,
    };
    Ok(RawInstance {
        // Clap requires these without --config.
        service: args.service.clone().unwrap_or_default(),
        id: args.id.clone(),
        address: args.address.clone().unwrap_or_default(),
        port: args.port.unwrap_or_default(),
        weight: args.weight,
        zone: args.zone.clone(),
        metadata,
        payload_class: args.payload_class.clone(),
        check: (!check.is_empty()).then_some(check),
        on_unhealthy: args.on_unhealthy,
    })
}

fn validate(raw: RawInstance, origin: &Origin) -> Result<InstanceConfig, ConfigError> {
    if !zklb_wire::is_valid_service_name(&raw.service) {
        return Err(origin.invalid(
            &field!("--service", "service"),
            format!(
                "{:?} is not a service name (ASCII letters, digits, '.', '_' and '-')",
                raw.service
            ),
        ));
    }
    let address: IpAddr = raw.address.parse().map_err(|_| {
        origin.invalid(
            &field!("--address", "address"),
            format!("{:?} is not an IP address", raw.address),
        )
    })?;
    if address.is_unspecified() {
        return Err(origin.invalid(
            &field!("--address", "address"),
            format!("{address} is no address clients can reach"),
        ));
    }
    if raw.port == 0 {
        return Err(origin.invalid(&field!("--port", "port"), "0 is not a TCP port"));
    }
    let target = SocketAddr::new(address, raw.port);
    let id = raw.id.unwrap_or_else(|| target.to_string());
    if let Err(reason) = check_znode_name(&id) {
        return Err(origin.invalid(&field!("--id", "id"), reason));
    }
    let mut metadata = raw.metadata;
    for reserved in ["weight", "zone"] {
        if metadata.contains_key(reserved) {
            return Err(origin.invalid(
                &field!("--metadata", "metadata"),
                format!("set {reserved:?} with its own setting, not as metadata"),
            ));
        }
    }
    if let Some(key) = metadata.keys().find(|key| key.is_empty()) {
        return Err(origin.invalid(
            &field!("--metadata", "metadata"),
            format!("a key is empty ({key:?})"),
        ));
    }
    if let Some(weight) = raw.weight {
        metadata.insert("weight".to_string(), weight.to_string());
    }
    if let Some(zone) = raw.zone {
        if zone.trim().is_empty() {
            return Err(origin.invalid(&field!("--zone", "zone"), "is empty"));
        }
        metadata.insert("zone".to_string(), zone);
    }
    let check = raw
        .check
        .map(|raw| validate_check(raw, origin))
        .transpose()?;
    if check.is_none() && raw.on_unhealthy.is_some() {
        return Err(origin.invalid(
            &field!("--on-unhealthy", "on_unhealthy"),
            "needs a check (--http-check or --tcp-check; check.http or check.tcp in a file)",
        ));
    }
    Ok(InstanceConfig {
        instance: Instance {
            service: raw.service,
            id,
            address: address.to_string(),
            port: raw.port,
            metadata,
            payload_class: raw.payload_class,
        },
        target,
        check,
        on_unhealthy: raw.on_unhealthy.unwrap_or_default(),
    })
}

fn validate_check(raw: RawCheck, origin: &Origin) -> Result<CheckConfig, ConfigError> {
    let probe = match (raw.http, raw.tcp) {
        (Some(_), true) => {
            return Err(origin.invalid(
                &field!("--http-check", "check.http"),
                "an instance has one check: HTTP or TCP, not both",
            ))
        }
        (None, false) => {
            return Err(origin.invalid(
                &field!("--http-check", "check.http"),
                "check settings without a check: give an HTTP path or TCP",
            ))
        }
        (Some(path), false) => {
            if !path.starts_with('/') || path.chars().any(char::is_whitespace) {
                return Err(origin.invalid(
                    &field!("--http-check", "check.http"),
                    format!("{path:?} is not a path such as /health"),
                ));
            }
            let expect = match raw.expect {
                Some(text) => text.parse().map_err(|reason| {
                    origin.invalid(&field!("--http-expect", "check.expect"), reason)
                })?,
                None => Statuses::default(),
            };
            Probe::Http { path, expect }
        }
        (None, true) => {
            if raw.expect.is_some() {
                return Err(origin.invalid(
                    &field!("--http-expect", "check.expect"),
                    "is for HTTP checks",
                ));
            }
            Probe::Tcp
        }
    };
    let interval_ms = raw.interval_ms.unwrap_or(DEFAULT_INTERVAL_MS);
    let timeout_ms = raw
        .timeout_ms
        .unwrap_or(DEFAULT_TIMEOUT_MS.min(interval_ms));
    if interval_ms == 0 {
        return Err(origin.invalid(
            &field!("--interval-ms", "check.interval_ms"),
            "must be at least 1",
        ));
    }
    if timeout_ms == 0 || timeout_ms > interval_ms {
        return Err(origin.invalid(
            &field!("--timeout-ms", "check.timeout_ms"),
            format!("{timeout_ms} must be from 1 to the interval ({interval_ms})"),
        ));
    }
    let rise = raw.rise.unwrap_or(DEFAULT_RISE);
    let fall = raw.fall.unwrap_or(DEFAULT_FALL);
    if rise == 0 {
        return Err(origin.invalid(&field!("--rise", "check.rise"), "must be at least 1"));
    }
    if fall == 0 {
        return Err(origin.invalid(&field!("--fall", "check.fall"), "must be at least 1"));
    }
    Ok(CheckConfig {
        probe,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
        rise,
        fall,
    })
}

/// An absolute ZooKeeper path: `/`, or `/`-separated non-empty names without a trailing `/`.
fn is_znode_path(path: &str) -> bool {
    path == "/"
        || (path.starts_with('/')
            && path[1..]
                .split('/')
                .all(|name| check_znode_name(name).is_ok()))
}

/// Whether ZooKeeper accepts `name` as one path element.
fn check_znode_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("{name:?} cannot name a znode"));
    }
    // ZooKeeper refuses these characters in paths (PathUtils.validatePath; the surrogates it
    // also refuses cannot occur in a Rust string).
    let refused = |c: char| {
        c == '/'
            || c.is_control()
            || ('\u{e000}'..='\u{f8ff}').contains(&c)
            || ('\u{fff0}'..='\u{ffff}').contains(&c)
    };
    match name.chars().find(|&c| refused(c)) {
        Some(c) => Err(format!("{name:?} holds {c:?}, which a znode name cannot")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_from(std::iter::once("zklb-agent").chain(args.iter().copied()))
            .map_err(|error| error.to_string())?;
        Config::from_args(args).map_err(|error| error.to_string())
    }

    fn one(args: &[&str]) -> InstanceConfig {
        let mut config = parse(args).unwrap_or_else(|error| panic!("{args:?}: {error}"));
        assert_eq!(config.instances.len(), 1);
        config.instances.remove(0)
    }

    fn error(args: &[&str]) -> String {
        match parse(args) {
            Ok(config) => panic!("{args:?} was accepted: {config:?}"),
            Err(error) => error,
        }
    }

    const MINIMAL: [&str; 6] = [
        "--service",
        "orders",
        "--address",
        "10.0.0.5",
        "--port",
        "8080",
    ];

    fn with(extra: &[&'static str]) -> Vec<&'static str> {
        MINIMAL.iter().chain(extra).copied().collect()
    }

    #[test]
    fn one_instance_from_flags_with_defaults() {
        let config = parse(&MINIMAL).expect("valid");
        assert_eq!(config.zookeeper, "127.0.0.1:2181");
        assert_eq!(config.root, "/services");
        assert_eq!(config.session_timeout, Duration::from_secs(10));
        assert_eq!(config.grace, Duration::from_secs(5));
        assert_eq!(config.listen, "127.0.0.1:9911".parse().expect("address"));
        let instance = &config.instances[0];
        assert_eq!(instance.instance.id, "10.0.0.5:8080");
        assert_eq!(
            instance.znode(&config.root),
            "/services/orders/10.0.0.5:8080"
        );
        assert!(instance.instance.metadata.is_empty());
        assert_eq!(instance.check, None);
        assert_eq!(instance.on_unhealthy, OnUnhealthy::Disable);
    }

    #[test]
    fn weight_zone_and_metadata_become_payload_metadata() {
        let instance = one(&with(&[
            "--weight",
            "10",
            "--zone",
            "eu-west-1a",
            "--metadata",
            "version=1.4.2",
            "--metadata",
            "team=a=b",
        ]));
        let metadata: Vec<(&str, &str)> = instance
            .instance
            .metadata
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        assert_eq!(
            metadata,
            [
                ("team", "a=b"),
                ("version", "1.4.2"),
                ("weight", "10"),
                ("zone", "eu-west-1a")
            ]
        );
    }

    #[test]
    fn http_and_tcp_checks_with_their_settings() {
        let http = one(&with(&[
            "--http-check",
            "/health",
            "--http-expect",
            "200,204",
            "--interval-ms",
            "300",
            "--rise",
            "1",
            "--fall",
            "2",
            "--on-unhealthy",
            "deregister",
        ]));
        let check = http.check.expect("a check");
        assert_eq!(
            check.probe,
            Probe::Http {
                path: "/health".to_string(),
                expect: "200,204".parse().expect("statuses")
            }
        );
        assert_eq!(check.interval, Duration::from_millis(300));
        // The default timeout is shortened to the interval.
        assert_eq!(check.timeout, Duration::from_millis(300));
        assert_eq!((check.rise, check.fall), (1, 2));
        assert_eq!(http.on_unhealthy, OnUnhealthy::Deregister);

        let tcp = one(&with(&["--tcp-check"]));
        let check = tcp.check.expect("a check");
        assert_eq!(check.probe, Probe::Tcp);
        assert_eq!(check.interval, Duration::from_millis(DEFAULT_INTERVAL_MS));
        assert_eq!(check.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert_eq!((check.rise, check.fall), (DEFAULT_RISE, DEFAULT_FALL));
    }

    #[test]
    fn bad_flags_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--service", "or/ders"],
                "--service: \"or/ders\" is not a service name",
            ),
            (
                &["--address", "orders.local"],
                "--address: \"orders.local\" is not an IP address",
            ),
            (
                &["--address", "0.0.0.0"],
                "--address: 0.0.0.0 is no address clients can reach",
            ),
            (&["--port", "0"], "--port: 0 is not a TCP port"),
            (&["--id", "a/b"], "--id: \"a/b\" holds '/'"),
            (&["--id", ".."], "--id: \"..\" cannot name a znode"),
            (
                &["--root", "services"],
                "--root: \"services\" is not a ZooKeeper path",
            ),
            (
                &["--root", "/services/"],
                "--root: \"/services/\" is not a ZooKeeper path",
            ),
            (&["--zone", " "], "--zone: is empty"),
            (
                &["--metadata", "version"],
                "--metadata: \"version\" is not KEY=VALUE",
            ),
            (
                &["--metadata", "weight=3"],
                "--metadata: set \"weight\" with its own setting",
            ),
            (&["--metadata", "=3"], "--metadata: a key is empty"),
            (
                &["--http-check", "health"],
                "--http-check: \"health\" is not a path",
            ),
            (
                &["--rise", "2"],
                "--http-check: check settings without a check",
            ),
            (
                &["--on-unhealthy", "deregister"],
                "--on-unhealthy: needs a check",
            ),
            (
                &["--tcp-check", "--http-expect", "200"],
                "--http-expect: is for HTTP checks",
            ),
            (
                &["--http-check", "/h", "--http-expect", "2xx"],
                "--http-expect: \"2xx\" is not an HTTP status",
            ),
            (
                &["--tcp-check", "--interval-ms", "0"],
                "--interval-ms: must be at least 1",
            ),
            (
                &["--tcp-check", "--interval-ms", "100", "--timeout-ms", "200"],
                "--timeout-ms: 200 must be from 1 to the interval (100)",
            ),
            (
                &["--tcp-check", "--rise", "0"],
                "--rise: must be at least 1",
            ),
            (
                &["--tcp-check", "--fall", "0"],
                "--fall: must be at least 1",
            ),
            (
                &["--session-timeout-ms", "0"],
                "--session-timeout-ms: must be at least 1",
            ),
            (&["--zookeeper", ""], "--zookeeper: is empty"),
        ];
        for (extra, expected) in cases {
            // Later flags replace the minimal ones.
            let message = error(&with(extra));
            assert!(message.contains(expected), "{extra:?}: {message}");
        }
    }

    #[test]
    fn usage_errors_come_from_clap() {
        assert!(error(&["--service", "orders", "--port", "80"]).contains("--address"));
        assert!(
            error(&with(&["--http-check", "/h", "--tcp-check"])).contains("cannot be used with")
        );
        assert!(error(&with(&["--port", "70000"])).contains("70000"));
        assert!(error(&with(&["--config", "instances.json"])).contains("cannot be used with"));
        assert!(error(&with(&["--on-unhealthy", "explode"])).contains("explode"));
    }

    fn from_file(json: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("instances.json");
        std::fs::write(&path, json).expect("writing");
        let path = path.to_str().expect("UTF-8 path");
        parse(&["--config", path]).map_err(|error| error.replace(path, "FILE"))
    }

    #[test]
    fn several_instances_from_a_file() {
        let config = from_file(
            r#"{"instances": [
                {"service": "orders", "address": "10.0.0.5", "port": 8080, "id": "orders-1",
                 "weight": 10, "zone": "eu-west-1a", "metadata": {"version": "1.4.2"},
                 "check": {"http": "/health", "interval_ms": 1000, "rise": 3},
                 "on_unhealthy": "deregister"},
                {"service": "orders-grpc", "address": "::1", "port": 9090, "check": {"tcp": true}},
                {"service": "plain", "address": "10.0.0.5", "port": 8081}
            ]}"#,
        )
        .expect("valid");
        assert_eq!(config.instances.len(), 3);
        let orders = &config.instances[0];
        assert_eq!(orders.instance.id, "orders-1");
        assert_eq!(orders.instance.metadata.len(), 3);
        let check = orders.check.as_ref().expect("a check");
        assert_eq!(
            (check.interval, check.rise, check.fall),
            (Duration::from_secs(1), 3, DEFAULT_FALL)
        );
        assert_eq!(orders.on_unhealthy, OnUnhealthy::Deregister);
        let grpc = &config.instances[1];
        assert_eq!(grpc.instance.id, "[::1]:9090");
        assert_eq!(grpc.target, "[::1]:9090".parse().expect("address"));
        assert_eq!(
            grpc.check.as_ref().map(|check| &check.probe),
            Some(&Probe::Tcp)
        );
        assert_eq!(config.instances[2].check, None);
    }

    #[test]
    fn bad_files_are_named_with_the_key() {
        let cases = [
            (r#"{"instances": []}"#, "FILE: instances: lists no instance"),
            (
                r#"{"instances": [{"service": "a", "address": "10.0.0.1"}]}"#,
                "missing field `port`",
            ),
            (
                r#"{"instances": [{"service": "a", "address": "10.0.0.1", "port": 1, "colour": 2}]}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"instances": [{"service": "a", "address": "10.0.0.1", "port": 1},
                               {"service": "b", "address": "10.0.0.1", "port": 0}]}"#,
                "FILE: instances[1].port: 0 is not a TCP port",
            ),
            (
                r#"{"instances": [{"service": "a", "address": "10.0.0.1", "port": 1, "check": {"http": "/h", "tcp": true}}]}"#,
                "FILE: instances[0].check.http: an instance has one check",
            ),
            (
                r#"{"instances": [{"service": "a", "address": "10.0.0.1", "port": 1, "check": {"tcp": true, "timeout_ms": 5000}}]}"#,
                "FILE: instances[0].check.timeout_ms: 5000 must be from 1 to the interval (2000)",
            ),
            (
                r#"{"instances": [{"service": "a", "address": "10.0.0.1", "port": 1},
                               {"service": "a", "address": "10.0.0.2", "port": 1, "id": "10.0.0.1:1"}]}"#,
                "instances: /services/a/10.0.0.1:1 is registered twice",
            ),
            ("{not json", "FILE is not a valid instance file"),
        ];
        for (json, expected) in cases {
            let message = from_file(json).expect_err(json);
            assert!(message.contains(expected), "{json}: {message}");
        }
        let missing =
            parse(&["--config", "/nonexistent/instances.json"]).expect_err("missing file");
        assert!(
            missing.contains("cannot read /nonexistent/instances.json"),
            "{missing}"
        );
    }
}
