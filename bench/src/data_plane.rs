//! Data-plane cost: the same backends behind plain Envoy (the baseline), Envoy with a wasm filter
//! that does nothing, and the whole zklb stack, each Envoy on one worker, loaded by wrk in
//! interleaved rounds. Envoy's CPU time per request comes from `/proc/<pid>/stat`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use zklb_tests::eventually;
use zklb_tests::stack::{free_port, workspace_root, ControlPlane, Envoy};

use crate::nginx::Nginx;
use crate::procfs;
use crate::registration;
use crate::startup;
use crate::wrk::{self, WrkReport};

/// The service the zklb variant routes to (`Host: echo`); every variant gets the same header.
pub const SERVICE: &str = "echo";

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
    /// ZooKeeper, the control plane, Envoy rendered from `envoy/envoy.yaml` with the zklb filter.
    Zklb,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::NativeRandom, Variant::NoopWasm, Variant::Zklb];

    pub fn name(self) -> &'static str {
        match self {
            Variant::NativeRandom => "native_random",
            Variant::NoopWasm => "noop_wasm",
            Variant::Zklb => "zklb",
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

/// Starts the three variants, warms each up, and runs `settings.rounds` interleaved rounds.
pub async fn measure(dir: &Path, settings: &Settings) -> anyhow::Result<Vec<Round>> {
    let clock_ticks = procfs::clock_ticks_per_second()?;
    let nginx = Nginx::start(dir, "nginx-data-plane", 0..settings.backends).await;
    let endpoints = endpoints_yaml(&nginx.ports);

    let native = start_static(
        dir,
        "native-random.yaml",
        Variant::NativeRandom,
        &endpoints,
        None,
    )
    .await?;
    let noop_wasm_path = workspace_root().join("target/zklb_noop_filter.wasm");
    if !noop_wasm_path.exists() {
        bail!(
            "{} is missing: run scripts/build-filter zklb-noop-filter",
            noop_wasm_path.display()
        );
    }
    let noop = start_static(
        dir,
        "noop-wasm.yaml",
        Variant::NoopWasm,
        &endpoints,
        Some(&noop_wasm_path),
    )
    .await?;

    let zklb_dir = dir.join(Variant::Zklb.name());
    std::fs::create_dir_all(&zklb_dir)?;
    let zookeeper = startup::zookeeper(&zklb_dir).await?;
    let control_plane = ControlPlane::start(&zookeeper, "/services", &zklb_dir).await;
    // This session owns the registrations: it lives as long as the variant.
    let registrar = zookeeper.client().await;
    registration::create_service(&registrar, "/services", SERVICE).await?;
    for (index, port) in nginx.ports.iter().enumerate() {
        registration::register(
            &registrar,
            "/services",
            SERVICE,
            &format!("{SERVICE}-{index}"),
            *port,
        )
        .await?;
    }
    let zklb = Envoy::start_with_workers(&control_plane, 1, &zklb_dir).await;

    let envoys = [
        (Variant::NativeRandom, &native),
        (Variant::NoopWasm, &noop),
        (Variant::Zklb, &zklb),
    ];
    for (variant, envoy) in envoys {
        wait_for_every_backend(variant.name(), envoy, nginx.ports.len()).await;
    }
    for (variant, envoy) in envoys {
        println!("data plane: warming up {}", variant.name());
        wrk::run(&url(envoy), SERVICE, settings.connections, settings.warm_up).await?;
    }

    let mut rounds = Vec::new();
    for round in 1..=settings.rounds {
        for (variant, envoy) in envoys {
            let before = procfs::cpu_ticks(envoy.pid())?;
            let report =
                wrk::run(&url(envoy), SERVICE, settings.connections, settings.round).await?;
            let after = procfs::cpu_ticks(envoy.pid())?;
            let cpu_us = (after - before) as f64 * 1e6 / clock_ticks as f64;
            let measured = Round {
                variant,
                round,
                cpu_us_per_request: cpu_us / report.requests.max(1) as f64,
                wrk: report,
            };
            println!(
                "data plane: round {round}/{} {:<13} {:>9.0} rps  p50 {:.2} ms  p99 {:.2} ms  {:.1} µs CPU/req  non-2xx {}  socket errors {}",
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
    drop(registrar);
    Ok(rounds)
}

pub fn url(envoy: &Envoy) -> String {
    format!("http://127.0.0.1:{}/", envoy.listen_port)
}

/// Envoy from one of `bench/envoy/*.yaml`, on one worker.
async fn start_static(
    dir: &Path,
    template: &str,
    variant: Variant,
    endpoints: &str,
    wasm: Option<&PathBuf>,
) -> anyhow::Result<Envoy> {
    let template_path = workspace_root().join("bench/envoy").join(template);
    let text = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading {}", template_path.display()))?;
    let (listen_port, admin_port) = (free_port(), free_port());
    let mut variables = vec![
        ("BENCH_LISTEN_PORT", listen_port.to_string()),
        ("BENCH_ADMIN_PORT", admin_port.to_string()),
        ("BENCH_ENDPOINTS", endpoints.to_string()),
    ];
    if let Some(wasm) = wasm {
        variables.push(("BENCH_FILTER_WASM", wasm.display().to_string()));
    }
    let rendered = render(&text, &variables)
        .with_context(|| format!("rendering {}", template_path.display()))?;
    let variant_dir = dir.join(variant.name());
    std::fs::create_dir_all(&variant_dir)?;
    let config = variant_dir.join("envoy.yaml");
    std::fs::write(&config, rendered)?;
    Ok(Envoy::start_with_config(config, listen_port, admin_port, 1, &variant_dir).await)
}

/// Replaces each `${NAME}` by its value; refuses to leave a `${` behind.
fn render(template: &str, variables: &[(&str, String)]) -> anyhow::Result<String> {
    let mut text = template.to_string();
    for (name, value) in variables {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    if let Some(at) = text.find("${") {
        let rest: String = text[at..].chars().take(40).collect();
        bail!("no value for {rest:?}");
    }
    Ok(text)
}

/// The `lb_endpoints` entries of a static cluster, indented for the templates.
fn endpoints_yaml(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| {
            format!(
                "              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
            )
        })
        .collect()
}

/// Waits until requests through `envoy` have reached every backend, so no round measures a
/// start-up.
pub async fn wait_for_every_backend(name: &str, envoy: &Envoy, backends: usize) {
    let http = reqwest::Client::new();
    let url = url(envoy);
    let what = format!("{name} reaches all {backends} backends");
    eventually(Duration::from_secs(60), &what, || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 * backends {
            let response = http
                .get(&url)
                .header("host", SERVICE)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_rendered_completely() {
        let rendered =
            render("a ${X} b ${Y}", &[("X", "1".into()), ("Y", "2".into())]).expect("renders");
        assert_eq!(rendered, "a 1 b 2");
        let error = render("a ${X} b ${Z}", &[("X", "1".into())]).expect_err("Z has no value");
        assert!(error.to_string().contains("${Z}"), "{error}");
    }

    /// The noop-wasm variant needs its wasm module to validate (Envoy loads it); `bench/run`
    /// starts it and fails if Envoy refuses it.
    #[test]
    fn baseline_config_validates() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let template =
            std::fs::read_to_string(workspace_root().join("bench/envoy/native-random.yaml"))
                .expect("template");
        let variables = [
            ("BENCH_LISTEN_PORT", "10000".to_string()),
            ("BENCH_ADMIN_PORT", "9901".to_string()),
            ("BENCH_ENDPOINTS", endpoints_yaml(&[8081, 8082, 8083])),
        ];
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, render(&template, &variables).expect("renders")).expect("writing");
        if let Err(reasons) = zklb_tests::stack::validate_envoy_config(&config) {
            panic!("envoy rejected bench/envoy/native-random.yaml:\n{reasons}");
        }
    }

    #[test]
    fn shipped_variant_templates_take_exactly_the_bench_variables() {
        for (template, wasm) in [("native-random.yaml", false), ("noop-wasm.yaml", true)] {
            let text = std::fs::read_to_string(workspace_root().join("bench/envoy").join(template))
                .expect("template");
            let mut variables = vec![
                ("BENCH_LISTEN_PORT", "1".to_string()),
                ("BENCH_ADMIN_PORT", "2".to_string()),
                ("BENCH_ENDPOINTS", endpoints_yaml(&[3, 4])),
            ];
            if wasm {
                variables.push(("BENCH_FILTER_WASM", "/x.wasm".to_string()));
            }
            let rendered =
                render(&text, &variables).unwrap_or_else(|error| panic!("{template}: {error}"));
            assert!(
                !rendered.contains("0.0.0.0"),
                "{template} listens beyond 127.0.0.1"
            );
            assert_eq!(rendered.matches("port_value: 4 ").count(), 1, "{template}");
        }
    }
}
