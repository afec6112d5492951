//! Builds of the zklb filter compared on Envoy's CPU per request: the before and after of a
//! change to the filter. Each build runs in an Envoy of its own, rendered from zklb's
//! configuration (one worker), on the same control plane and backends; in every round wrk loads
//! all of them at the same time, so that whatever else the machine does in that round hits every
//! build alike. Each figure is the median over rounds of the difference to the first build within
//! a round. Rounds taken one after the other on a shared 2-core machine swing by more than the
//! few microseconds a change to the filter moves; differences within concurrent rounds do not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zklb_tests::procfs;
use zklb_tests::stack::{filter_wasm, free_port, render_envoy_config, ControlPlane, Envoy};

use crate::data_plane::{url, wait_for_every_backend, SERVICE};
use crate::envoy_configs;
use crate::nginx::Nginx;
use crate::registration;
use crate::startup;
use crate::stats::median;
use crate::wrk;

const ROOT: &str = "/services";
const BACKENDS: usize = 3;

#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: usize,
    pub round: Duration,
    /// wrk's connections to each Envoy.
    pub connections: u32,
}

/// One build's figures, round by round.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    pub wasm: PathBuf,
    pub requests_per_second: Vec<f64>,
    pub cpu_us_per_request: Vec<f64>,
}

pub async fn measure(
    dir: &Path,
    settings: &Settings,
    wasms: &[PathBuf],
) -> anyhow::Result<Vec<Build>> {
    let clock_ticks = procfs::clock_ticks_per_second()?;
    let nginx = Nginx::start(dir, "nginx-filter-comparison", 0..BACKENDS).await;
    let zookeeper = startup::zookeeper(dir).await?;
    let control_plane = ControlPlane::start(&zookeeper, ROOT, dir).await;
    let registrar = zookeeper.client().await;
    registration::create_service(&registrar, ROOT, SERVICE).await?;
    for (index, &port) in nginx.ports.iter().enumerate() {
        let instance =
            registration::weighted_instance(SERVICE, &format!("{SERVICE}-{index}"), port, 1);
        registration::register_instance(&registrar, ROOT, &instance).await?;
    }

    let mut envoys: Vec<Envoy> = Vec::new();
    let shipped = filter_wasm().display().to_string();
    for (index, wasm) in wasms.iter().enumerate() {
        let (listen_port, admin_port) = (free_port(), free_port());
        let config = render_envoy_config(listen_port, admin_port, control_plane.port)
            .replace(&shipped, &wasm.display().to_string());
        let envoy_dir = dir.join(format!("build-{index}"));
        let envoy =
            envoy_configs::start_rendered(&envoy_dir, &config, listen_port, admin_port, 1, &[])
                .await?;
        let name = wasm.display().to_string();
        wait_for_every_backend(&name, &envoy, SERVICE, BACKENDS).await;
        println!("filter comparison: warming up {name}");
        wrk::run(&url(&envoy), SERVICE, settings.connections, settings.round).await?;
        envoys.push(envoy);
    }

    let mut builds: Vec<Build> = wasms
        .iter()
        .map(|wasm| Build {
            wasm: wasm.clone(),
            requests_per_second: Vec::new(),
            cpu_us_per_request: Vec::new(),
        })
        .collect();
    for round in 1..=settings.rounds {
        let before = envoys
            .iter()
            .map(|envoy| procfs::cpu_ticks(envoy.pid()))
            .collect::<anyhow::Result<Vec<u64>>>()?;
        let loads: Vec<_> = envoys
            .iter()
            .map(|envoy| {
                let (url, connections, length) = (url(envoy), settings.connections, settings.round);
                tokio::spawn(async move { wrk::run(&url, SERVICE, connections, length).await })
            })
            .collect();
        for (index, load) in loads.into_iter().enumerate() {
            let report = load.await??;
            let after = procfs::cpu_ticks(envoys[index].pid())?;
            let cpu_us = (after - before[index]) as f64 * 1e6 / clock_ticks as f64;
            let cpu_us_per_request = cpu_us / report.requests.max(1) as f64;
            let failed = report.non_2xx + report.socket_errors;
            if failed > 0 {
                anyhow::bail!("{}: {failed} requests failed", builds[index].wasm.display());
            }
            println!(
                "filter comparison: round {round}/{} {} {:.0} rps {cpu_us_per_request:.1} µs CPU/req",
                settings.rounds,
                builds[index].wasm.display(),
                report.requests_per_second,
            );
            builds[index]
                .requests_per_second
                .push(report.requests_per_second);
            builds[index].cpu_us_per_request.push(cpu_us_per_request);
        }
    }
    Ok(builds)
}

/// The comparison as a Markdown table, against the first build.
pub fn table(settings: &Settings, builds: &[Build]) -> String {
    let mut out = format!(
        "{} builds of the filter, each in an Envoy of zklb's configuration (`--concurrency 1`), \
         loaded at the same time: `wrk -t1 -c{} -d{}s -H 'Host: {SERVICE}'` each, {} rounds. \
         Medians over rounds; Δ is the median over rounds of the difference to the first build \
         within a round.\n\n\
         | build | requests/s | Envoy CPU µs/request | Δ µs/request |\n|---|--:|--:|--:|\n",
        builds.len(),
        settings.connections,
        settings.round.as_secs(),
        settings.rounds,
    );
    let Some(first) = builds.first() else {
        return out;
    };
    for build in builds {
        let differences: Vec<f64> = build
            .cpu_us_per_request
            .iter()
            .zip(&first.cpu_us_per_request)
            .map(|(cpu, first)| cpu - first)
            .collect();
        let figure = |samples: &[f64]| median(samples).unwrap_or(f64::NAN);
        out.push_str(&format!(
            "| `{}` | {:.0} | {:.1} | {:+.1} |\n",
            build.wasm.display(),
            figure(&build.requests_per_second),
            figure(&build.cpu_us_per_request),
            figure(&differences),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(name: &str, cpu: &[f64]) -> Build {
        Build {
            wasm: PathBuf::from(name),
            requests_per_second: cpu.iter().map(|cpu| 1e6 / cpu).collect(),
            cpu_us_per_request: cpu.to_vec(),
        }
    }

    #[test]
    fn differences_are_taken_within_rounds() {
        let settings = Settings {
            rounds: 3,
            round: Duration::from_secs(5),
            connections: 25,
        };
        // The machine slows down in round 3; the second build costs 2 µs more in every round.
        let builds = [
            build("before.wasm", &[80.0, 82.0, 120.0]),
            build("after.wasm", &[82.0, 84.0, 122.0]),
        ];
        let table = table(&settings, &builds);
        assert!(
            table.contains("| `before.wasm` | 12195 | 82.0 | +0.0 |"),
            "{table}"
        );
        assert!(
            table.contains("| `after.wasm` | 11905 | 84.0 | +2.0 |"),
            "{table}"
        );
        assert!(table.contains("-c25 -d5s"), "{table}");
    }
}
