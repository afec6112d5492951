//! Data-plane cost: the same backends behind plain Envoy (the baseline), Envoy with a wasm filter
//! that does nothing, zklb's Envoy configuration without its filter, and the whole zklb stack;
//! then zklb with each balancing policy and with services of many instances. Each Envoy runs one
//! worker and is loaded by wrk in interleaved rounds. Envoy's CPU time per request comes from
//! `/proc/<pid>/stat`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use zklb_tests::eventually;
use zklb_tests::stack::{
    free_port, render_envoy_config, with_router_options, workspace_root, ControlPlane, Envoy,
};

use crate::envoy_configs::{self, endpoints_yaml};
use crate::nginx::Nginx;
use crate::registration;
use crate::startup;
use crate::wrk::{self, WrkReport};
use zklb_tests::procfs;

/// The service of three instances that the main variants route to (`Host: echo`); the variants
/// that do not read the header get it too.
pub const SERVICE: &str = "echo";
const ROOT: &str = "/services";

#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: usize,
    pub round: Duration,
    pub warm_up: Duration,
    pub connections: u32,
    pub backends: usize,
}

/// What was measured against the same backends, one Envoy worker each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Plain Envoy: a static cluster, RANDOM load balancing. The baseline.
    NativeRandom,
    /// The baseline plus a proxy-wasm filter that does nothing.
    NoopWasm,
    /// zklb's Envoy configuration without the zklb filter: the service's cluster from the control
    /// plane, the `override_host` policy, the upstream removal of the candidate header.
    ZklbWithoutFilter,
    /// The same, routed by the cluster and candidate headers as zklb's is, but written by the
    /// client (every request names the same three candidates in the same order): what Envoy does
    /// to follow the filter's decision, without the filter.
    ZklbHeadersFromClient,
    /// ZooKeeper, the control plane, Envoy rendered from `envoy/envoy.yaml` with the zklb filter.
    Zklb,
    /// zklb, the service's policy `weighted_random` (weights 1, 2, 3).
    ZklbWeightedRandom,
    /// zklb, the service's policy `least_request`.
    ZklbLeastRequest,
    /// zklb, a service of 100 instances.
    Zklb100Instances,
    /// zklb, a service of 5,000 instances.
    Zklb5000Instances,
}

impl Variant {
    pub const ALL: [Variant; 9] = [
        Variant::NativeRandom,
        Variant::NoopWasm,
        Variant::ZklbWithoutFilter,
        Variant::ZklbHeadersFromClient,
        Variant::Zklb,
        Variant::ZklbWeightedRandom,
        Variant::ZklbLeastRequest,
        Variant::Zklb100Instances,
        Variant::Zklb5000Instances,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::NativeRandom => "native_random",
            Variant::NoopWasm => "noop_wasm",
            Variant::ZklbWithoutFilter => "zklb_without_filter",
            Variant::ZklbHeadersFromClient => "zklb_headers_from_client",
            Variant::Zklb => "zklb",
            Variant::ZklbWeightedRandom => "zklb_weighted_random",
            Variant::ZklbLeastRequest => "zklb_least_request",
            Variant::Zklb100Instances => "zklb_100_instances",
            Variant::Zklb5000Instances => "zklb_5000_instances",
        }
    }

    /// The service its requests name in `Host`.
    pub fn service(self) -> &'static str {
        match self {
            Variant::ZklbWeightedRandom => "echo-weighted",
            Variant::ZklbLeastRequest => "echo-least",
            Variant::Zklb100Instances => "echo-100",
            Variant::Zklb5000Instances => "echo-5000",
            _ => SERVICE,
        }
    }

    /// The instances of its service.
    pub fn instances(self) -> usize {
        match self {
            Variant::Zklb100Instances => 100,
            Variant::Zklb5000Instances => 5_000,
            _ => 3,
        }
    }

    /// The filter's policy for its service (`None`: no zklb filter).
    pub fn policy(self) -> Option<&'static str> {
        match self {
            Variant::NativeRandom
            | Variant::NoopWasm
            | Variant::ZklbWithoutFilter
            | Variant::ZklbHeadersFromClient => None,
            Variant::ZklbWeightedRandom => Some("weighted_random"),
            Variant::ZklbLeastRequest => Some("least_request"),
            _ => Some("random"),
        }
    }
}

/// One wrk run on one variant.
#[derive(Debug, Clone)]
pub struct Round {
    pub variant: Variant,
    pub round: usize,
    pub wrk: WrkReport,
    /// Envoy's user + system CPU time during the run, per request.
    pub cpu_us_per_request: f64,
}

/// The Envoys under test, with what serves and registers their backends.
pub struct Envoys {
    native: Envoy,
    noop: Envoy,
    without_filter: Envoy,
    headers_from_client: Envoy,
    /// The headers of `zklb_headers_from_client`'s requests: its service, cluster, candidates.
    client_decision: Vec<String>,
    zklb: Envoy,
    /// zklb with per-service policies: `weighted_random` and `least_request` services.
    policies: Envoy,
    /// zklb for the services of many instances, in an Envoy of their own: the upstream
    /// connections to thousands of instances must not weigh on `zklb`'s figures.
    many_instances: Envoy,
    _backends: [Nginx; 2],
    /// The session that owns the registrations: they live as long as it does.
    _registrar: zookeeper_client::Client,
    _control_plane: ControlPlane,
    _zookeeper: zklb_tests::ZooKeeper,
}

impl Envoys {
    pub fn of(&self, variant: Variant) -> &Envoy {
        match variant {
            Variant::NativeRandom => &self.native,
            Variant::NoopWasm => &self.noop,
            Variant::ZklbWithoutFilter => &self.without_filter,
            Variant::ZklbHeadersFromClient => &self.headers_from_client,
            Variant::ZklbWeightedRandom | Variant::ZklbLeastRequest => &self.policies,
            Variant::Zklb => &self.zklb,
            Variant::Zklb100Instances | Variant::Zklb5000Instances => &self.many_instances,
        }
    }

    /// The headers every request of `variant` carries.
    pub fn headers(&self, variant: Variant) -> Vec<String> {
        match variant {
            Variant::ZklbHeadersFromClient => self.client_decision.clone(),
            _ => vec![format!("Host: {}", variant.service())],
        }
    }
}

/// Starts every variant, warms each up, and runs `settings.rounds` interleaved rounds.
pub async fn measure(dir: &Path, settings: &Settings) -> anyhow::Result<Vec<Round>> {
    let clock_ticks = procfs::clock_ticks_per_second()?;
    let envoys = start(dir, settings, &[]).await?;
    for variant in Variant::ALL {
        println!("data plane: warming up {}", variant.name());
        // Many instances means as many upstream connections to open before the rounds measure
        // a steady state.
        let warm_up = if variant.instances() > 100 {
            settings.warm_up.max(Duration::from_secs(3))
        } else {
            settings.warm_up
        };
        let url = url(envoys.of(variant));
        let headers = envoys.headers(variant);
        wrk::run_with_headers(&url, &headers, settings.connections, warm_up).await?;
    }

    let mut rounds = Vec::new();
    for round in 1..=settings.rounds {
        for variant in Variant::ALL {
            let envoy = envoys.of(variant);
            let before = procfs::cpu_ticks(envoy.pid())?;
            let report = wrk::run_with_headers(
                &url(envoy),
                &envoys.headers(variant),
                settings.connections,
                settings.round,
            )
            .await?;
            let after = procfs::cpu_ticks(envoy.pid())?;
            let cpu_us = (after - before) as f64 * 1e6 / clock_ticks as f64;
            let measured = Round {
                variant,
                round,
                cpu_us_per_request: cpu_us / report.requests.max(1) as f64,
                wrk: report,
            };
            println!(
                "data plane: round {round}/{} {:<20} {:>9.0} rps  p50 {:.2} ms  p99 {:.2} ms  {:.1} µs CPU/req  non-2xx {}  socket errors {}",
                settings.rounds,
                variant.name(),
                measured.wrk.requests_per_second,
                measured.wrk.p50_ms,
                measured.wrk.p99_ms,
                measured.cpu_us_per_request,
                measured.wrk.non_2xx,
                measured.wrk.socket_errors,
            );
            rounds.push(measured);
        }
    }
    Ok(rounds)
}

/// Every variant's Envoy, with its backends and registrations, once each serves as its variant
/// should; started by `launcher` if it is not empty (valgrind, to count instructions: see
/// [`Envoy::start_under`]).
pub async fn start(dir: &Path, settings: &Settings, launcher: &[String]) -> anyhow::Result<Envoys> {
    let nginx = Nginx::start(dir, "nginx-data-plane", 0..settings.backends).await;
    let largest = Variant::ALL
        .iter()
        .map(|v| v.instances())
        .max()
        .unwrap_or(0);
    let many = Nginx::start(dir, "nginx-many-instances", 0..largest).await;
    let endpoints = endpoints_yaml(&nginx.ports);

    let native = envoy_configs::start_template(
        &dir.join(Variant::NativeRandom.name()),
        "native-random.yaml",
        &[("BENCH_ENDPOINTS", endpoints.clone())],
        1,
        launcher,
    )
    .await?;
    let noop_wasm_path = workspace_root().join("target/zklb_noop_filter.wasm");
    if !noop_wasm_path.exists() {
        bail!(
            "{} is missing: run scripts/build-filter zklb-noop-filter",
            noop_wasm_path.display()
        );
    }
    let noop = envoy_configs::start_template(
        &dir.join(Variant::NoopWasm.name()),
        "noop-wasm.yaml",
        &[
            ("BENCH_ENDPOINTS", endpoints),
            ("BENCH_FILTER_WASM", noop_wasm_path.display().to_string()),
        ],
        1,
        launcher,
    )
    .await?;

    let zklb_dir = dir.join(Variant::Zklb.name());
    std::fs::create_dir_all(&zklb_dir)?;
    let zookeeper = startup::zookeeper(&zklb_dir).await?;
    let control_plane = ControlPlane::start(&zookeeper, ROOT, &zklb_dir).await;
    let registrar = zookeeper.client().await;
    let mut registered = std::collections::BTreeSet::new();
    for variant in Variant::ALL {
        let service = variant.service();
        if !registered.insert(service) {
            continue;
        }
        registration::create_service(&registrar, ROOT, service).await?;
        if variant.instances() > settings.backends {
            let ports = &many.ports[..variant.instances()];
            registration::register_many(&registrar, ROOT, service, "i", ports).await?;
            continue;
        }
        for (index, &port) in nginx.ports.iter().enumerate() {
            let id = format!("{service}-{index}");
            let weight = match variant.policy() {
                Some("weighted_random") => index as u32 + 1,
                _ => 1,
            };
            let instance = registration::weighted_instance(service, &id, port, weight);
            registration::register_instance(&registrar, ROOT, &instance).await?;
        }
    }

    let shipped = |dir: PathBuf| async move {
        let (listen_port, admin_port) = (free_port(), free_port());
        let config = render_envoy_config(listen_port, admin_port, control_plane.port);
        envoy_configs::start_rendered(&dir, &config, listen_port, admin_port, 1, launcher).await
    };
    let zklb = shipped(zklb_dir.join("envoy")).await?;
    let many_instances = shipped(dir.join("zklb_many_instances")).await?;
    let without_filter = {
        let (listen_port, admin_port) = (free_port(), free_port());
        let rendered = render_envoy_config(listen_port, admin_port, control_plane.port);
        let config =
            envoy_configs::without_zklb_filter(&rendered, Some(&zklb_wire::cluster_name(SERVICE)))?;
        let variant_dir = dir.join(Variant::ZklbWithoutFilter.name());
        envoy_configs::start_rendered(&variant_dir, &config, listen_port, admin_port, 1, launcher)
            .await?
    };
    let headers_from_client = {
        let (listen_port, admin_port) = (free_port(), free_port());
        let rendered = render_envoy_config(listen_port, admin_port, control_plane.port);
        let config = envoy_configs::without_zklb_filter(&rendered, None)?;
        let variant_dir = dir.join(Variant::ZklbHeadersFromClient.name());
        envoy_configs::start_rendered(&variant_dir, &config, listen_port, admin_port, 1, launcher)
            .await?
    };
    let candidates: Vec<String> = nginx
        .ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let client_decision = vec![
        format!("Host: {SERVICE}"),
        format!(
            "{}: {}",
            zklb_wire::CLUSTER_HEADER,
            zklb_wire::cluster_name(SERVICE)
        ),
        format!("{}: {}", zklb_wire::CANDIDATES_HEADER, candidates.join(",")),
    ];
    let policies = {
        let (listen_port, admin_port) = (free_port(), free_port());
        let services: Vec<String> = Variant::ALL
            .iter()
            .filter_map(|variant| {
                let policy = variant.policy().filter(|policy| *policy != "random")?;
                Some(format!(
                    r#""{}": {{"policy": "{policy}"}}"#,
                    variant.service()
                ))
            })
            .collect();
        let rendered = render_envoy_config(listen_port, admin_port, control_plane.port);
        let options = format!(r#""services": {{{}}}"#, services.join(", "));
        let config = with_router_options(&rendered, &options);
        let policies_dir = dir.join("zklb_policies");
        envoy_configs::start_rendered(&policies_dir, &config, listen_port, admin_port, 1, launcher)
            .await?
    };

    let envoys = Envoys {
        native,
        noop,
        without_filter,
        headers_from_client,
        client_decision,
        zklb,
        policies,
        many_instances,
        _backends: [nginx, many],
        _registrar: registrar,
        _control_plane: control_plane,
        _zookeeper: zookeeper,
    };
    for variant in Variant::ALL {
        let envoy = envoys.of(variant);
        if variant == Variant::ZklbHeadersFromClient {
            wait_for_first_candidate(envoy, &envoys.client_decision).await;
        } else if variant.instances() > settings.backends {
            wait_for_members(variant, envoy).await;
        } else {
            wait_for_every_backend(variant.name(), envoy, variant.service(), settings.backends)
                .await;
        }
    }
    Ok(envoys)
}

pub fn url(envoy: &Envoy) -> String {
    format!("http://127.0.0.1:{}/", envoy.listen_port)
}

/// Waits until `envoy` has every instance of the variant's service in its cluster and answers
/// for it.
async fn wait_for_members(variant: Variant, envoy: &Envoy) {
    let http = reqwest::Client::new();
    let members = format!(
        "cluster.{}.membership_total",
        zklb_wire::cluster_name(variant.service())
    );
    let what = format!("{} has {} members", variant.name(), variant.instances());
    eventually(Duration::from_secs(60), &what, || async {
        let listed = envoy.stat(&members).await;
        if listed != variant.instances() as u64 {
            return Err(format!("{listed} members"));
        }
        let response = http
            .get(url(envoy))
            .header("host", variant.service())
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    })
    .await;
}

/// Waits until `envoy` answers requests that carry `headers` (a cluster and candidates) from
/// their first candidate, the first backend, and from no other: so that the variant measures
/// Envoy following those headers.
async fn wait_for_first_candidate(envoy: &Envoy, headers: &[String]) {
    let http = reqwest::Client::new();
    let url = url(envoy);
    let first = Nginx::label(0);
    let what = format!("requests are answered by their first candidate ({first})");
    eventually(Duration::from_secs(60), &what, || async {
        for _ in 0..20 {
            let mut request = http.get(&url);
            for (name, value) in headers.iter().filter_map(|header| header.split_once(": ")) {
                request = request.header(name, value);
            }
            let response = request.send().await.map_err(|error| error.to_string())?;
            let status = response.status();
            let body = response.text().await.map_err(|error| error.to_string())?;
            if !status.is_success() || body != first {
                return Err(format!("{status}: {body}"));
            }
        }
        Ok(())
    })
    .await;
}

/// Waits until requests for `service` through `envoy` have reached every backend, so no round
/// measures a start-up.
pub async fn wait_for_every_backend(name: &str, envoy: &Envoy, service: &str, backends: usize) {
    let http = reqwest::Client::new();
    let url = url(envoy);
    let what = format!("{name} reaches all {backends} backends");
    eventually(Duration::from_secs(60), &what, || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 * backends {
            let response = http
                .get(&url)
                .header("host", service)
                .send()
                .await
                .map_err(|error| error.to_string())?;
            let status = response.status();
            let body = response.text().await.map_err(|error| error.to_string())?;
            if !status.is_success() {
                return Err(format!("{status}: {body}"));
            }
            seen.insert(body);
        }
        if seen.len() == backends {
            Ok(())
        } else {
            Err(format!("reached {seen:?}"))
        }
    })
    .await;
}
