//! `BENCHMARKS.md`: a fixed introduction, kept as it is in the file, and a results section that
//! every run rewrites.

use std::fmt::Write as _;

use crate::breakdown::{
    paired, Breakdown, Shares, CPU_TARGET_RATIO, FILTER_WORK_TARGET_US, RPS_TARGET_RATIO,
};
use crate::data_plane::{self, Round, Variant};
use crate::failover;
use crate::fan_out;
use crate::filter_scale;
use crate::instructions;
use crate::list_update;
use crate::machine::Machine;
use crate::propagation;
use crate::scale;
use crate::stats::{median, percentile};
use crate::traffic::Window;

/// Everything after this line is the results section.
pub const MARKER: &str = "<!-- bench/run rewrites everything below this line. -->";

/// The introduction written when the file has none.
pub const INTRO: &str = include_str!("intro.md");

/// One run's figures and where they came from.
pub struct Run<'a> {
    pub command: String,
    pub quick: bool,
    pub machine: &'a Machine,
    pub load_after: String,
    pub minutes: f64,
    /// Circumstances worth knowing, e.g. other work running on the machine.
    pub note: Option<&'a str>,
    pub data_plane: Option<(&'a data_plane::Settings, &'a [Round])>,
    pub instructions: Option<(&'a instructions::Settings, &'a [instructions::Count])>,
    pub propagation: Option<(&'a propagation::Settings, &'a propagation::Results)>,
    pub failover: Option<(&'a failover::Settings, &'a [failover::Round])>,
    pub scale: Option<(&'a scale::Settings, &'a [scale::Size])>,
    pub fan_out: Option<(&'a fan_out::Settings, &'a fan_out::Results)>,
    pub filter_scale: Option<(&'a filter_scale::Settings, &'a filter_scale::Results)>,
}

/// The new file: `existing`'s text up to and including [`MARKER`] (or [`INTRO`] and the marker
/// when it has none), then `results`.
pub fn splice(existing: Option<&str>, results: &str) -> String {
    let intro = existing
        .and_then(|text| text.find(MARKER).map(|at| &text[..at]))
        .unwrap_or(INTRO);
    format!(
        "{}\n\n{MARKER}\n\n{}",
        intro.trim_end(),
        results.trim_start()
    )
}

pub fn results(run: &Run) -> String {
    let mut out = String::new();
    let machine = run.machine;
    let _ = writeln!(out, "## Results\n");
    let mode = if run.quick {
        "the **quick mode** (short, few rounds: indicative only)"
    } else {
        "the full mode"
    };
    let _ = writeln!(
        out,
        "Measured with `{}`, {mode}, on {}, in {:.1} minutes.\n",
        run.command, machine.date, run.minutes
    );
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(
        out,
        "| machine | {} CPUs, {}, {} |",
        machine.cpus, machine.cpu_model, machine.kernel
    );
    let _ = writeln!(
        out,
        "| load average (1, 5, 15 min) | {} at the start, {} at the end (the run's own build and processes included) |",
        machine.load_before, run.load_after,
    );
    if let Some(note) = run.note {
        let _ = writeln!(out, "| note | {note} |");
    }
    let _ = writeln!(out, "| Envoy | {} |", machine.envoy);
    let _ = writeln!(
        out,
        "| zklb | `{}`; the control plane from `{}` |",
        machine.zklb_rev, machine.binaries
    );
    let _ = writeln!(
        out,
        "| backends, load | {}, {} |\n",
        machine.nginx, machine.wrk
    );
    if let Some((settings, rounds)) = run.data_plane {
        data_plane_section(&mut out, settings, rounds);
    }
    if let Some((settings, counts)) = run.instructions {
        let data_plane = run.data_plane.map(|(_, rounds)| rounds);
        instructions_section(&mut out, settings, counts, data_plane);
    }
    if let Some((settings, results)) = run.propagation {
        propagation_section(&mut out, settings, results);
    }
    if let Some((settings, rounds)) = run.failover {
        failover_section(&mut out, settings, rounds);
    }
    if let Some((settings, sizes)) = run.scale {
        scale_section(&mut out, settings, sizes);
    }
    if let Some((settings, results)) = run.fan_out {
        fan_out_section(&mut out, settings, results);
    }
    if let Some((settings, results)) = run.filter_scale {
        filter_scale_section(&mut out, settings, &results.sizes);
        list_update_section(&mut out, &settings.update, &results.update);
    }
    out
}

/// Medians of each variant, in [`Variant::ALL`] order.
struct Medians {
    variant: Variant,
    rps: f64,
    p50: f64,
    p99: f64,
    cpu: f64,
    failures: u64,
}

fn medians(rounds: &[Round]) -> Vec<Medians> {
    Variant::ALL
        .iter()
        .filter_map(|&variant| {
            let mine: Vec<&Round> = rounds
                .iter()
                .filter(|round| round.variant == variant)
                .collect();
            let of = |field: fn(&Round) -> f64| {
                median(&mine.iter().map(|round| field(round)).collect::<Vec<_>>())
            };
            Some(Medians {
                variant,
                rps: of(|round| round.wrk.requests_per_second)?,
                p50: of(|round| round.wrk.p50_ms)?,
                p99: of(|round| round.wrk.p99_ms)?,
                cpu: of(|round| round.cpu_us_per_request)?,
                failures: mine
                    .iter()
                    .map(|round| round.wrk.non_2xx + round.wrk.socket_errors)
                    .sum(),
            })
        })
        .collect()
}

fn data_plane_section(out: &mut String, settings: &data_plane::Settings, rounds: &[Round]) {
    let _ = writeln!(out, "### Data plane\n");
    let _ = writeln!(
        out,
        "`wrk -t1 -c{} -d{}s --latency -H 'Host: <service>'`, {} interleaved rounds after a {} s warm-up (3 s at least for 5,000 instances), Envoy `--concurrency 1`, {} nginx backends (or as many ports as the service has instances). Medians over rounds; × is the ratio to `native_random`'s median.\n",
        settings.connections,
        settings.round.as_secs(),
        settings.rounds,
        settings.warm_up.as_secs(),
        settings.backends,
    );
    let medians = medians(rounds);
    let Some(baseline) = medians.iter().find(|m| m.variant == Variant::NativeRandom) else {
        return;
    };
    let ratio = |value: f64, base: f64| {
        if base > 0.0 {
            format!("{:.2}×", value / base)
        } else {
            "–".into()
        }
    };
    let _ = writeln!(out, "| variant | requests/s | × | p50 ms | × | p99 ms | × | Envoy CPU µs/request | × | failed requests |");
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for m in &medians {
        let _ = writeln!(
            out,
            "| `{}` | {:.0} | {} | {:.2} | {} | {:.2} | {} | {:.1} | {} | {} |",
            m.variant.name(),
            m.rps,
            ratio(m.rps, baseline.rps),
            m.p50,
            ratio(m.p50, baseline.p50),
            m.p99,
            ratio(m.p99, baseline.p99),
            m.cpu,
            ratio(m.cpu, baseline.cpu),
            m.failures,
        );
    }
    breakdown_table(out, rounds);
    by_policy_and_size_table(out, rounds);
    let _ = writeln!(out, "\nEvery round:\n");
    let _ = writeln!(out, "| round | variant | requests | requests/s | p50 ms | p99 ms | Envoy CPU µs/request | non-2xx | socket errors |");
    let _ = writeln!(out, "|--:|---|--:|--:|--:|--:|--:|--:|--:|");
    for round in rounds {
        let _ = writeln!(
            out,
            "| {} | `{}` | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} |",
            round.round,
            round.variant.name(),
            round.wrk.requests,
            round.wrk.requests_per_second,
            round.wrk.p50_ms,
            round.wrk.p99_ms,
            round.cpu_us_per_request,
            round.wrk.non_2xx,
            round.wrk.socket_errors,
        );
    }
    let _ = writeln!(out);
}

fn met(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "**no**"
    }
}

/// "Where each microsecond goes": the split of zklb's CPU per request, and the targets.
fn breakdown_table(out: &mut String, rounds: &[Round]) {
    let Some(split) = Breakdown::of(rounds) else {
        return;
    };
    let _ = writeln!(out, "\n#### Where each microsecond goes\n");
    let _ = writeln!(
        out,
        "Envoy CPU per request, split by the variants that differ by one thing; each share is the median over rounds of the difference within a round.\n"
    );
    let _ = writeln!(out, "| share | how | µs/request |");
    let _ = writeln!(out, "|---|---|--:|");
    let _ = writeln!(
        out,
        "| plain Envoy | `native_random` | {:.1} |",
        split.native_us
    );
    for (share, how, us) in share_rows(&split.shares) {
        let _ = writeln!(out, "| {share} | {how} | {us:.1} |");
    }
    let _ = writeln!(out, "\n| target | measured | met |");
    let _ = writeln!(out, "|---|---|---|");
    let _ = writeln!(
        out,
        "| the filter's own work ≤ {FILTER_WORK_TARGET_US} µs/request | {:.1} µs | {} |",
        split.shares.filter_work,
        met(split.filter_work_met()),
    );
    let _ = writeln!(
        out,
        "| `zklb` ≥ {RPS_TARGET_RATIO}× `noop_wasm`'s requests/s | {:.2}× | {} |",
        split.rps_vs_noop,
        met(split.rps_met()),
    );
    let _ = writeln!(
        out,
        "| `zklb`'s CPU ≤ {CPU_TARGET_RATIO}× `noop_wasm`'s + cluster setup | {:.1} µs against {:.1} µs | {} |",
        split.zklb_cpu_us,
        split.cpu_limit_us(),
        met(split.cpu_met()),
    );
}

/// Instructions per request by variant, and the split of zklb's; in µs too where the data plane
/// ran, at `native_random`'s CPU time per instruction.
fn instructions_section(
    out: &mut String,
    settings: &instructions::Settings,
    counts: &[instructions::Count],
    data_plane: Option<&[Round]>,
) {
    let count = |variant: Variant| {
        counts
            .iter()
            .find(|count| count.variant == variant)
            .map(|count| count.per_request)
    };
    let Some(native) = count(Variant::NativeRandom).filter(|native| *native > 0.0) else {
        return;
    };
    let _ = writeln!(
        out,
        "\n### Instructions per request
"
    );
    let _ = writeln!(
        out,
        "Envoy's instructions (every thread, user space) counted by `valgrind --tool=callgrind` over {} requests sent one after the other on one connection, after {} not counted; each variant's Envoy set up as in the data plane. Counts hardly depend on whatever else the machine does (those of variants that did not change moved by under 1 % between runs here), so a difference of a few thousand instructions is real.\n",
        settings.requests, settings.warm_up
    );
    let _ = writeln!(out, "| variant | instructions/request | × |");
    let _ = writeln!(out, "|---|--:|--:|");
    for counted in counts {
        let _ = writeln!(
            out,
            "| `{}` | {:.0} | {:.2}× |",
            counted.variant.name(),
            counted.per_request,
            counted.per_request / native
        );
    }
    let Some(shares) = Shares::of(&count) else {
        return;
    };
    // µs per instruction of plain Envoy in this run's data plane, to put the shares in µs.
    let us_per_instruction = data_plane
        .and_then(|rounds| {
            let cpu: Vec<f64> = rounds
                .iter()
                .filter(|round| round.variant == Variant::NativeRandom)
                .map(|round| round.cpu_us_per_request)
                .collect();
            median(&cpu)
        })
        .map(|native_us| native_us / native);
    let _ = writeln!(
        out,
        "\n| share | how | instructions/request | ≈ µs/request |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|");
    let us = |instructions: f64| {
        us_per_instruction.map_or("–".to_string(), |per| {
            format!("{:.1}", instructions * per)
        })
    };
    let _ = writeln!(
        out,
        "| plain Envoy | `native_random` | {native:.0} | {} |",
        us(native)
    );
    for (share, how, instructions) in share_rows(&shares) {
        let _ = writeln!(
            out,
            "| {share} | {how} | {instructions:.0} | {} |",
            us(instructions)
        );
    }
    if us_per_instruction.is_some() {
        let _ = writeln!(
            out,
            "\nµs are instructions at `native_random`'s median CPU time per instruction in this run's data plane (kernel time included, so an estimate)."
        );
    }
    let _ = writeln!(out);
}

/// The rows of a split: what the share is, how it is taken, its figure.
fn share_rows(shares: &Shares) -> [(&'static str, &'static str, f64); 5] {
    [
        (
            "any wasm filter",
            "`noop_wasm` − `native_random`",
            shares.any_wasm,
        ),
        (
            "zklb's cluster setup (EDS cluster, `override_host`, header removal)",
            "`zklb_without_filter` − `native_random`",
            shares.cluster_setup,
        ),
        (
            "Envoy following the filter's decision (cluster header, candidates)",
            "`zklb_headers_from_client` − `zklb_without_filter`",
            shares.following_decision,
        ),
        (
            "the filter's own work (its VM and host calls)",
            "`zklb` − `noop_wasm` − (`zklb_headers_from_client` − `native_random`)",
            shares.filter_work,
        ),
        ("zklb in all", "`zklb` − `native_random`", shares.zklb),
    ]
}

/// zklb by policy and by the size of the service, against `zklb` (random, three instances).
fn by_policy_and_size_table(out: &mut String, rounds: &[Round]) {
    let medians = medians(rounds);
    let Some(base) = medians.iter().find(|m| m.variant == Variant::Zklb) else {
        return;
    };
    let others: Vec<&Medians> = medians
        .iter()
        .filter(|m| m.variant != Variant::Zklb && m.variant.policy().is_some())
        .collect();
    if others.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n#### By policy and by service size\n");
    let _ = writeln!(
        out,
        "Against `zklb` (policy `random`, three instances) in the same rounds; Δ is the median over rounds of the difference within a round. Every instance answers (nginx listens on as many ports).\n"
    );
    let _ = writeln!(
        out,
        "| variant | policy | instances | requests/s | × `zklb` | p99 ms | Envoy CPU µs/request | Δ µs/request |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|");
    for m in std::iter::once(base).chain(others) {
        let delta = paired(rounds, |cpu| Some(cpu(m.variant)? - cpu(Variant::Zklb)?));
        let _ = writeln!(
            out,
            "| `{}` | `{}` | {} | {:.0} | {:.2}× | {:.2} | {:.1} | {} |",
            m.variant.name(),
            m.variant.policy().unwrap_or("–"),
            m.variant.instances(),
            m.rps,
            m.rps / base.rps.max(1e-9),
            m.p99,
            m.cpu,
            delta.map_or("–".to_string(), |us| format!("{us:+.1}")),
        );
    }
}

fn propagation_section(
    out: &mut String,
    settings: &propagation::Settings,
    results: &propagation::Results,
) {
    let _ = writeln!(out, "### Propagation\n");
    let _ = write!(
        out,
        "Envoy `--concurrency {}`, {} clients in a tight loop",
        settings.envoy_workers, settings.clients
    );
    if let Some(traffic) = &results.traffic {
        let others: Vec<String> = traffic
            .others
            .iter()
            .map(|(status, count)| match status {
                0 => format!("{count} without an answer"),
                _ => format!("{count} × {status}"),
            })
            .collect();
        let _ = write!(
            out,
            " ({:.0} answers/s, so one of n registered backends answers about every {:.1}·n ms; {})",
            traffic.answers_per_second(),
            1000.0 / traffic.answers_per_second().max(1e-9),
            if others.is_empty() { "every answer 200".to_string() } else { others.join(", ") },
        );
    }
    let _ = writeln!(
        out,
        ". Back-to-back changes {} ms apart, at most {} changing instances registered at once. Milliseconds; nearest-rank percentiles.\n",
        settings.spacing.as_millis(),
        settings.live
    );
    let kinds: [(&str, &str, &[Option<f64>]); 5] = [
        (
            "isolated registration",
            "create → first answer from it",
            &results.isolated_create,
        ),
        (
            "isolated deregistration",
            "delete → last answer from it",
            &results.isolated_delete,
        ),
        (
            "back-to-back registration",
            "create → first answer from it",
            &results.back_to_back_create,
        ),
        (
            "back-to-back deregistration",
            "delete → last answer from it",
            &results.back_to_back_delete,
        ),
        (
            "new service",
            "first instance's create → first 200",
            &results.new_service,
        ),
    ];
    let _ = writeln!(
        out,
        "| change | measured | changes | reached | p50 ms | p99 ms | max ms |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|");
    for (kind, what, values) in kinds {
        let reached: Vec<f64> = values.iter().flatten().copied().collect();
        let shown = |value: Option<f64>| value.map_or("–".to_string(), |ms| format!("{ms:.1}"));
        let _ = writeln!(
            out,
            "| {kind} | {what} | {} | {} | {} | {} | {} |",
            values.len(),
            reached.len(),
            shown(percentile(&reached, 50.0)),
            shown(percentile(&reached, 99.0)),
            shown(percentile(&reached, 100.0)),
        );
    }
    let _ = writeln!(
        out,
        "\nEvery change, in order (ms; `never`: not reached within the time limit):\n"
    );
    for (kind, _, values) in kinds {
        let listed: Vec<String> = values
            .iter()
            .map(|value| value.map_or("never".to_string(), |ms| format!("{ms:.1}")))
            .collect();
        let _ = writeln!(out, "- {kind}: {}", listed.join(", "));
    }
}

fn failover_section(out: &mut String, settings: &failover::Settings, rounds: &[failover::Round]) {
    let _ = writeln!(out, "\n### Failover under load\n");
    let _ = writeln!(
        out,
        "Envoy `--concurrency {}`, {} clients in a tight loop, three backends; `zklb` (the filter) and `native_random` (plain Envoy: the same members by EDS from the same control plane, RANDOM, `previous_hosts` retries, outlier detection after 3 consecutive failures) take turns. Each round: {} s as is, then one backend killed (SIGKILL) while still registered for {} s, then deregistered for {} s, then replaced. Failed: answers other than 200 and requests without an answer; retries: Envoy's `upstream_rq_retry` for the service's cluster, per answered request; the ejection: the first reading (every 20 ms) of Envoy's ejected hosts that rose.\n",
        settings.envoy_workers,
        settings.clients,
        settings.stretch.as_secs(),
        settings.stretch.as_secs(),
        settings.stretch.as_secs(),
    );
    let _ = writeln!(out, "| | `zklb` | `native_random` |");
    let _ = writeln!(out, "|---|--:|--:|");
    let of = |variant: failover::Variant| -> Vec<&failover::Round> {
        rounds
            .iter()
            .filter(|round| round.variant == variant)
            .collect()
    };
    let [zklb, native] = failover::Variant::ALL.map(of);
    type Figure = fn(&[&failover::Round]) -> String;
    let figures: [(&str, Figure); 8] = [
        ("failed requests, crashed and registered", |rounds| {
            let failed: u64 = rounds.iter().map(|round| round.crashed.failed).sum();
            let all: u64 = rounds.iter().map(|r| r.crashed.ok + r.crashed.failed).sum();
            format!("{failed} of {all}")
        }),
        ("failed requests, deregistered", |rounds| {
            let failed: u64 = rounds.iter().map(|round| round.deregistered.failed).sum();
            let all: u64 = rounds
                .iter()
                .map(|r| r.deregistered.ok + r.deregistered.failed)
                .sum();
            format!("{failed} of {all}")
        }),
        ("crash → ejection, median ms", |rounds| {
            let ms: Vec<f64> = rounds
                .iter()
                .filter_map(|round| round.ejected_after)
                .map(|after| after.as_secs_f64() * 1000.0)
                .collect();
            let ejected = ms.len();
            median(&ms).map_or("never".to_string(), |ms| {
                format!("{ms:.0} ({ejected} of {} ejected)", rounds.len())
            })
        }),
        ("retries per request, crash → ejection", |rounds| {
            ratio_of(
                rounds
                    .iter()
                    .map(|round| (round.retries_until_ejection, &round.until_ejection)),
            )
        }),
        (
            "retries per request, ejection → deregistration",
            |rounds| {
                ratio_of(
                    rounds
                        .iter()
                        .filter_map(|round| round.after_ejection.as_ref())
                        .map(|(window, retries)| (*retries, window)),
                )
            },
        ),
        ("retries per request, deregistered", |rounds| {
            ratio_of(
                rounds
                    .iter()
                    .map(|round| (round.deregistered_retries, &round.deregistered)),
            )
        }),
        ("p99 ms before the crash, median", |rounds| {
            shown_median(rounds.iter().map(|round| round.before.p99_ms))
        }),
        ("p99 ms crashed and registered, median", |rounds| {
            shown_median(rounds.iter().map(|round| round.crashed.p99_ms))
        }),
    ];
    for (figure, compute) in figures {
        let _ = writeln!(
            out,
            "| {figure} | {} | {} |",
            compute(&zklb),
            compute(&native)
        );
    }
    let _ = writeln!(out, "\nEvery round:\n");
    let _ = writeln!(
        out,
        "| round | variant | stretch | answers/s | p50 ms | p99 ms | failed | retries | per request |"
    );
    let _ = writeln!(out, "|--:|---|---|--:|--:|--:|--:|--:|--:|");
    for round in rounds {
        let ejected = round
            .ejected_after
            .map_or("never ejected".to_string(), |after| {
                format!("ejected after {} ms", after.as_millis())
            });
        let mut stretches = vec![
            ("before".to_string(), &round.before, None),
            (
                format!("crashed, until ejection ({ejected})"),
                &round.until_ejection,
                Some(round.retries_until_ejection),
            ),
        ];
        if let Some((window, retries)) = &round.after_ejection {
            stretches.push(("crashed, ejected".to_string(), window, Some(*retries)));
        }
        stretches.push((
            "deregistered".to_string(),
            &round.deregistered,
            Some(round.deregistered_retries),
        ));
        for (name, window, retries) in stretches {
            let _ = writeln!(
                out,
                "| {} | `{}` | {name} | {:.0} | {:.2} | {:.2} | {} of {} | {} | {} |",
                round.round,
                round.variant.name(),
                window.per_second(),
                window.p50_ms,
                window.p99_ms,
                window.failed,
                window.ok + window.failed,
                retries.map_or("–".to_string(), |retries| retries.to_string()),
                retries.map_or("–".to_string(), |retries| ratio_of(std::iter::once((
                    retries, window
                )))),
            );
        }
    }
}

/// Retries per request over several stretches together.
fn ratio_of<'a>(stretches: impl Iterator<Item = (u64, &'a Window)>) -> String {
    let (retries, requests) = stretches.fold((0, 0), |(retries, requests), (more, window)| {
        (retries + more, requests + window.ok + window.failed)
    });
    if requests == 0 {
        "–".to_string()
    } else {
        format!("{:.3}", retries as f64 / requests as f64)
    }
}

fn shown_median(values: impl Iterator<Item = f64>) -> String {
    median(&values.collect::<Vec<_>>()).map_or("–".to_string(), |value| format!("{value:.2}"))
}

fn scale_section(out: &mut String, settings: &scale::Settings, sizes: &[scale::Size]) {
    let _ = writeln!(out, "\n### Control-plane scale\n");
    let _ = writeln!(
        out,
        "Curator instances, {} per service, registered in ZooKeeper before a control plane starts on them (a root per size). Serving: from the start to `/healthz` 200 and the list holding every instance (polled every 20–50 ms). A change: an instance created while a reader long-polls `/v1/services?after=<version>`, timed from the create returning to the answer (the whole list) received; {} changes per size. Memory and CPU: the control plane's resident set after the changes, and its CPU time until it served everything.\n",
        settings.per_service, settings.changes,
    );
    let _ = writeln!(out, "| instances | services | registering ms | serving ms | CPU ms to serve | list KiB | list fetch ms | change p50 ms | change p99 ms | resident MiB |");
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for size in sizes {
        let Some(serving) = size.serving_ms else {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | not within 60 s | – | – | – | – | – | – |",
                size.instances, size.services, size.populate_ms
            );
            continue;
        };
        let shown = |value: Option<f64>| value.map_or("–".to_string(), |ms| format!("{ms:.1}"));
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {serving:.0} | {:.0} | {} | {:.1} | {} | {} | {:.0} |",
            size.instances,
            size.services,
            size.populate_ms,
            size.startup_cpu_ms,
            size.list_bytes / 1024,
            size.list_fetch_ms,
            shown(percentile(&size.changes_ms, 50.0)),
            shown(percentile(&size.changes_ms, 99.0)),
            size.resident_mib,
        );
    }
}

fn filter_scale_section(
    out: &mut String,
    settings: &filter_scale::Settings,
    sizes: &[filter_scale::Size],
) {
    let _ = writeln!(out, "\n### Filter scale\n");
    let _ = writeln!(
        out,
        "Per size, a control plane and an Envoy (`--concurrency 1`) with the zklb filter on a registry of that many services (three instances each); requests go to `echo` alone, the same three nginx backends at every size. `wrk -t1 -c{} -d{}s --latency -H 'Host: echo'`, {} rounds interleaved across sizes; medians over rounds; × is the ratio to the smallest size. Registration: an isolated new `echo` instance, from its create returning to the first answer from it, {} per size.\n",
        settings.connections,
        settings.round.as_secs(),
        settings.rounds,
        settings.changes,
    );
    let figures: Vec<(usize, f64, f64, f64, f64)> = sizes
        .iter()
        .filter_map(|size| {
            let of = |field: fn(&(crate::wrk::WrkReport, f64)) -> f64| {
                median(&size.rounds.iter().map(field).collect::<Vec<_>>())
            };
            Some((
                size.services,
                of(|(wrk, _)| wrk.requests_per_second)?,
                of(|(wrk, _)| wrk.p50_ms)?,
                of(|(wrk, _)| wrk.p99_ms)?,
                of(|(_, cpu)| *cpu)?,
            ))
        })
        .collect();
    let Some(&(_, base_rps, _, _, base_cpu)) = figures.first() else {
        return;
    };
    let _ = writeln!(out, "| services | requests/s | × | p50 ms | p99 ms | Envoy CPU µs/request | × | registration p50 ms | p99 ms | every round, requests/s |");
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for (size, (services, rps, p50, p99, cpu)) in sizes.iter().zip(&figures) {
        let reached: Vec<f64> = size.changes_ms.iter().flatten().copied().collect();
        let shown = |value: Option<f64>| value.map_or("–".to_string(), |ms| format!("{ms:.1}"));
        let every: Vec<String> = size
            .rounds
            .iter()
            .map(|(wrk, _)| format!("{:.0}", wrk.requests_per_second))
            .collect();
        let _ = writeln!(
            out,
            "| {services} | {rps:.0} | {:.2}× | {p50:.2} | {p99:.2} | {cpu:.1} | {:.2}× | {} | {} | {} |",
            rps / base_rps,
            cpu / base_cpu,
            shown(percentile(&reached, 50.0)),
            shown(percentile(&reached, 99.0)),
            every.join(", "),
        );
    }
}

fn fan_out_section(out: &mut String, settings: &fan_out::Settings, results: &fan_out::Results) {
    let _ = writeln!(out, "\n### Control-plane fan-out\n");
    let _ = writeln!(
        out,
        "{} Curator instances ({} services of {}) registered before a control plane starts on them; then {} clients long-poll `/v1/changes?after=<version>` as the filter's poller does, and {} gRPC ADS streams follow it as Envoys do (every cluster, then the members of each, every response acknowledged). {} changes, one at a time, each a new instance in another service: from its create returning to the last subscriber of each kind receiving it. Resident memory of the control plane before the subscribers and with all of them connected, after the changes.\n",
        results.instances,
        settings.services,
        settings.per_service,
        settings.pollers,
        settings.ads_streams,
        settings.changes,
    );
    let shown = |value: Option<f64>| value.map_or("–".to_string(), |ms| format!("{ms:.1}"));
    let _ = writeln!(out, "| subscribers | reached every one | p50 ms to the last | p99 ms to the last | every change, ms |");
    let _ = writeln!(out, "|---|--:|--:|--:|---|");
    type LastOne = fn(&fan_out::Change) -> Option<f64>;
    let kinds: [(String, LastOne); 2] = [
        (
            format!("{} long-polls of `/v1/changes`", settings.pollers),
            |change| change.last_poller_ms,
        ),
        (format!("{} ADS streams", settings.ads_streams), |change| {
            change.last_ads_ms
        }),
    ];
    for (kind, last) in &kinds {
        let reached: Vec<f64> = results.changes.iter().filter_map(last).collect();
        let every: Vec<String> = results
            .changes
            .iter()
            .map(|change| last(change).map_or("never".to_string(), |ms| format!("{ms:.1}")))
            .collect();
        let _ = writeln!(
            out,
            "| {kind} | {} of {} changes | {} | {} | {} |",
            reached.len(),
            results.changes.len(),
            shown(percentile(&reached, 50.0)),
            shown(percentile(&reached, 99.0)),
            every.join(", "),
        );
    }
    let _ = writeln!(
        out,
        "\nThe ADS streams held every service's members {} after they opened. Control plane resident memory: {:.0} MiB before the subscribers, {:.0} MiB with them. Registering the instances took {:.0} ms.",
        results
            .ads_connect_ms
            .map_or("never (not within the limit)".to_string(), |ms| format!("{ms:.0} ms")),
        results.resident_idle_mib,
        results.resident_connected_mib,
        results.populate_ms,
    );
}

fn list_update_section(
    out: &mut String,
    settings: &list_update::Settings,
    results: &list_update::Results,
) {
    let _ = writeln!(out, "\n#### One change on a large registry\n");
    let _ = writeln!(
        out,
        "{} instances ({} services of {}, and `echo`), a control plane and an Envoy (`--concurrency 1`) with the zklb filter, idle. {} samples with a change (a new instance in one service) alternate with as many without. Main thread: its CPU time over the second after the change's create returned (ADS, the poller's fetch and parse; {} of the changes were not through by then and are left out of its figures); worker: its CPU time for the next request, on which it takes up the new list. Thread CPU times from `/proc/<pid>/task/<tid>/schedstat`; medians; cost = with − without.\n",
        results.instances,
        settings.services,
        settings.per_service,
        settings.changes,
        results.late_changes,
    );
    let shown = |values: &[f64]| median(values).map_or("–".to_string(), |us| format!("{us:.0}"));
    let (main_cost, worker_cost) = results
        .costs_us()
        .map_or(("–".to_string(), "–".to_string()), |(main, worker)| {
            (format!("{main:.0}"), format!("{worker:.0}"))
        });
    let _ = writeln!(
        out,
        "| thread | with a change, µs | without, µs | cost of the change, µs |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|");
    let _ = writeln!(
        out,
        "| main (over 1 s) | {} | {} | {main_cost} |",
        shown(&results.main_changed_us),
        shown(&results.main_unchanged_us),
    );
    let _ = writeln!(
        out,
        "| worker (the next request) | {} | {} | {worker_cost} |",
        shown(&results.worker_changed_us),
        shown(&results.worker_unchanged_us),
    );
    let _ = writeln!(
        out,
        "\nThe per-pick cost in a service of 5,000 instances is in the data plane's table by policy and service size (Δ of `zklb_5000_instances`)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splicing_keeps_the_intro_and_replaces_the_results() {
        let existing = format!("# Benchmarks\n\nMethod.\n\n{MARKER}\n\n## Results\n\nold\n");
        let spliced = splice(Some(&existing), "## Results\n\nnew\n");
        assert_eq!(
            spliced,
            format!("# Benchmarks\n\nMethod.\n\n{MARKER}\n\n## Results\n\nnew\n")
        );
        assert_eq!(
            splice(Some(&spliced), "## Results\n\nnew\n"),
            spliced,
            "stable across runs"
        );
    }

    fn round(variant: Variant, round: usize, rps: f64, cpu: f64) -> Round {
        Round {
            variant,
            round,
            cpu_us_per_request: cpu,
            wrk: crate::wrk::WrkReport {
                requests: 1000,
                seconds: 1.0,
                requests_per_second: rps,
                p50_ms: 1.0,
                p99_ms: 2.0,
                non_2xx: 0,
                socket_errors: 0,
            },
        }
    }

    #[test]
    fn data_plane_medians_are_given_as_ratios_to_the_baseline() {
        let rounds = [
            round(Variant::NativeRandom, 1, 100.0, 40.0),
            round(Variant::Zklb, 1, 50.0, 60.0),
            round(Variant::NativeRandom, 2, 300.0, 50.0),
            round(Variant::Zklb, 2, 90.0, 80.0),
            round(Variant::NativeRandom, 3, 200.0, 60.0),
            round(Variant::Zklb, 3, 70.0, 100.0),
        ];
        let settings = data_plane::Settings {
            rounds: 3,
            round: std::time::Duration::from_secs(1),
            warm_up: std::time::Duration::from_secs(1),
            connections: 50,
            backends: 3,
        };
        let mut out = String::new();
        data_plane_section(&mut out, &settings, &rounds);
        // Medians: baseline 200 rps and 50 µs; zklb 70 rps (0.35×) and 80 µs (1.60×).
        assert!(
            out.contains("| `native_random` | 200 | 1.00× | 1.00 | 1.00× | 2.00 | 1.00× | 50.0 | 1.00× | 0 |"),
            "{out}"
        );
        assert!(
            out.contains(
                "| `zklb` | 70 | 0.35× | 1.00 | 1.00× | 2.00 | 1.00× | 80.0 | 1.60× | 0 |"
            ),
            "{out}"
        );
        assert!(
            !out.contains("noop_wasm"),
            "a variant without rounds has no row"
        );
        assert!(out.contains("| 3 | `zklb` | 1000 | 70 |"), "{out}");
    }

    #[test]
    fn a_file_without_the_marker_gets_the_default_intro() {
        let spliced = splice(Some("# Something else\n"), "## Results\n");
        assert!(spliced.starts_with(INTRO.trim_end()));
        assert!(spliced.ends_with(&format!("{MARKER}\n\n## Results\n")));
        assert_eq!(splice(None, "## Results\n"), spliced);
    }
}
