//! zklb's benchmarks: the data-plane cost of zklb against plain Envoy, how fast registry changes
//! reach requests, what a backend crash under load costs, and how the control plane and the
//! filter cope with large registries, on this machine, written into `BENCHMARKS.md`.
//!
//! - [`data_plane`]: wrk against Envoy variants in interleaved rounds
//!   ([`breakdown`] splits its cost; [`envoy_configs`] are the Envoys it compares);
//! - [`instructions`]: the same Envoys under valgrind, their instructions per request counted;
//! - [`propagation`]: registry changes timed to the first or last answer through Envoy;
//! - [`failover`]: a backend crashing under load, through zklb and plain Envoy, counted in
//!   failed requests, retries and the time to eject it;
//! - [`scale`]: the control plane with thousands of instances registered;
//! - [`fan_out`]: a change reaching many long-polling filters and ADS streams ([`ads_client`]);
//! - [`filter_scale`]: the filter's cost and propagation with hundreds of services, and
//!   [`list_update`], one change's cost on a large registry;
//! - [`filter_comparison`]: builds of the filter against each other, for a change's before and
//!   after (`--compare-filters`, printed, not written into `BENCHMARKS.md`);
//! - [`report`]: the results section of `BENCHMARKS.md`;
//! - [`nginx`], [`registration`], [`traffic`], [`wrk`], [`startup`]: the backends, the znodes, the
//!   request loop, the load generator and starting ZooKeeper; [`stats`], [`procfs`] and
//!   [`machine`] what the figures are reduced to, read from and measured on.
//!
//! Processes (ZooKeeper, control plane, Envoy) come from the end-to-end harness `zklb-tests`.

mod ads_client;
mod breakdown;
mod data_plane;
mod envoy_configs;
mod failover;
mod fan_out;
mod filter_comparison;
mod filter_scale;
mod instructions;
mod list_update;
mod machine;
mod nginx;
mod propagation;
mod registration;
mod report;
mod scale;
mod startup;
mod stats;
mod traffic;
mod wrk;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use zklb_tests::stack::{envoy_binary, workspace_root};

#[derive(Debug, Parser)]
#[command(name = "zklb-bench", about)]
struct Args {
    /// A run of one to two minutes: shorter and fewer rounds, fewer changes.
    #[arg(long)]
    quick: bool,
    /// Run one part only (the results then hold only that part).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// The file whose results section is rewritten.
    #[arg(long)]
    output: Option<PathBuf>,
    /// A line about the circumstances, written with the results (other work on the machine...).
    #[arg(long)]
    note: Option<String>,
    /// Compare these builds of the filter (wasm files, the first the baseline) on Envoy's CPU per
    /// request, loaded at the same time, and print the table; nothing else runs and
    /// BENCHMARKS.md is left as it is.
    #[arg(long, value_delimiter = ',')]
    compare_filters: Vec<PathBuf>,
    /// Rounds of `--compare-filters` (default 15, 5 with `--quick`): a difference of a
    /// microsecond or two needs more than the default.
    #[arg(long)]
    rounds: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    DataPlane,
    Instructions,
    Propagation,
    Failover,
    Scale,
    FanOut,
    FilterScale,
}

fn data_plane_settings(quick: bool) -> data_plane::Settings {
    data_plane::Settings {
        rounds: if quick { 3 } else { 7 },
        round: Duration::from_secs(if quick { 2 } else { 10 }),
        warm_up: Duration::from_secs(if quick { 1 } else { 3 }),
        connections: 50,
        backends: 3,
    }
}

fn instructions_settings(quick: bool) -> instructions::Settings {
    instructions::Settings {
        warm_up: if quick { 100 } else { 300 },
        requests: if quick { 300 } else { 2_000 },
    }
}

fn propagation_settings(quick: bool) -> propagation::Settings {
    propagation::Settings {
        isolated: if quick { 5 } else { 30 },
        back_to_back: if quick { 10 } else { 30 },
        spacing: Duration::from_millis(300),
        live: 6,
        new_services: if quick { 2 } else { 10 },
        clients: 4,
        envoy_workers: 2,
    }
}

fn failover_settings(quick: bool) -> failover::Settings {
    failover::Settings {
        rounds: if quick { 2 } else { 6 },
        stretch: Duration::from_secs(if quick { 2 } else { 5 }),
        clients: 4,
        envoy_workers: 2,
    }
}

fn scale_settings(quick: bool) -> scale::Settings {
    scale::Settings {
        sizes: if quick {
            vec![1_000, 10_000]
        } else {
            vec![1_000, 10_000, 100_000]
        },
        per_service: 100,
        changes: if quick { 5 } else { 20 },
    }
}

fn fan_out_settings(quick: bool) -> fan_out::Settings {
    fan_out::Settings {
        services: if quick { 100 } else { 1_000 },
        per_service: 100,
        pollers: 100,
        ads_streams: 100,
        changes: if quick { 3 } else { 10 },
    }
}

fn filter_scale_settings(quick: bool) -> filter_scale::Settings {
    filter_scale::Settings {
        sizes: if quick {
            vec![1, 100]
        } else {
            vec![1, 100, 500]
        },
        rounds: if quick { 2 } else { 5 },
        round: Duration::from_secs(if quick { 3 } else { 8 }),
        warm_up: Duration::from_secs(1),
        connections: 50,
        changes: if quick { 2 } else { 5 },
        clients: 4,
        update: list_update::Settings {
            services: if quick { 100 } else { 1_000 },
            per_service: 100,
            changes: if quick { 3 } else { 10 },
        },
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let root = workspace_root();
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| root.join("BENCHMARKS.md"));
    let machine = machine::Machine::read(&root, &envoy_binary());
    let dir = tempfile::Builder::new().prefix("zklb-bench").tempdir()?;
    println!(
        "zklb-bench: {} CPUs, {}; logs in {}",
        machine.cpus,
        machine.cpu_model,
        dir.path().display()
    );

    if !args.compare_filters.is_empty() {
        if args.compare_filters.len() < 2 {
            anyhow::bail!("--compare-filters needs two builds at least, comma-separated");
        }
        let settings = filter_comparison::Settings {
            rounds: args.rounds.unwrap_or(if args.quick { 5 } else { 15 }),
            round: Duration::from_secs(5),
            connections: 25,
        };
        let builds =
            match filter_comparison::measure(dir.path(), &settings, &args.compare_filters).await {
                Ok(builds) => builds,
                Err(error) => {
                    eprintln!("zklb-bench: failed; logs kept in {}", dir.keep().display());
                    return Err(error);
                }
            };
        println!("\n{}", filter_comparison::table(&settings, &builds));
        return Ok(());
    }

    let data_plane_settings = data_plane_settings(args.quick);
    let instructions_settings = instructions_settings(args.quick);
    let propagation_settings = propagation_settings(args.quick);
    let failover_settings = failover_settings(args.quick);
    let scale_settings = scale_settings(args.quick);
    let fan_out_settings = fan_out_settings(args.quick);
    let filter_scale_settings = filter_scale_settings(args.quick);
    let wants = |part: Part| args.only.is_none_or(|only| only == part);
    let measured = async {
        let data_plane = if wants(Part::DataPlane) {
            Some(data_plane::measure(dir.path(), &data_plane_settings).await?)
        } else {
            None
        };
        let instructions = if wants(Part::Instructions) {
            let dir = dir.path().join("instructions");
            std::fs::create_dir_all(&dir)?;
            Some(instructions::measure(&dir, &data_plane_settings, &instructions_settings).await?)
        } else {
            None
        };
        let propagation = if wants(Part::Propagation) {
            Some(propagation::measure(dir.path(), &propagation_settings).await?)
        } else {
            None
        };
        let failover = if wants(Part::Failover) {
            Some(failover::measure(dir.path(), &failover_settings).await?)
        } else {
            None
        };
        let scale = if wants(Part::Scale) {
            Some(scale::measure(dir.path(), &scale_settings).await?)
        } else {
            None
        };
        let fan_out = if wants(Part::FanOut) {
            Some(fan_out::measure(dir.path(), &fan_out_settings).await?)
        } else {
            None
        };
        let filter_scale = if wants(Part::FilterScale) {
            Some(filter_scale::measure(dir.path(), &filter_scale_settings).await?)
        } else {
            None
        };
        anyhow::Ok((
            data_plane,
            instructions,
            propagation,
            failover,
            scale,
            fan_out,
            filter_scale,
        ))
    }
    .await;
    let (data_plane, instructions, propagation, failover, scale, fan_out, filter_scale) =
        match measured {
            Ok(measured) => measured,
            Err(error) => {
                eprintln!("zklb-bench: failed; logs kept in {}", dir.keep().display());
                return Err(error);
            }
        };

    let mut command = "bench/run".to_string();
    if args.quick {
        command.push_str(" --quick");
    }
    if let Some(only) = args.only {
        command.push_str(&format!(
            " --only {}",
            only.to_possible_value()
                .map_or("?".into(), |value| value.get_name().to_string())
        ));
    }
    let run = report::Run {
        command,
        quick: args.quick,
        machine: &machine,
        load_after: machine::load_average(),
        minutes: started.elapsed().as_secs_f64() / 60.0,
        note: args.note.as_deref(),
        data_plane: data_plane
            .as_deref()
            .map(|rounds| (&data_plane_settings, rounds)),
        instructions: instructions
            .as_deref()
            .map(|counts| (&instructions_settings, counts)),
        propagation: propagation
            .as_ref()
            .map(|results| (&propagation_settings, results)),
        failover: failover
            .as_deref()
            .map(|rounds| (&failover_settings, rounds)),
        scale: scale.as_deref().map(|sizes| (&scale_settings, sizes)),
        fan_out: fan_out.as_ref().map(|results| (&fan_out_settings, results)),
        filter_scale: filter_scale
            .as_ref()
            .map(|results| (&filter_scale_settings, results)),
    };
    let existing = std::fs::read_to_string(&output).ok();
    let text = report::splice(existing.as_deref(), &report::results(&run));
    std::fs::write(&output, text).with_context(|| format!("writing {}", output.display()))?;
    println!("zklb-bench: results written to {}", output.display());
    Ok(())
}
