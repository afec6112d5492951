//! Where zklb's microseconds of Envoy CPU per request go, split by the data-plane variants that
//! differ by one thing each, and how the split compares with the targets zklb sets itself.
//!
//! Every share is the median over rounds of a difference taken within one round: the variants
//! of a round ran one after the other, so a change in the machine's load between rounds cancels
//! out of the difference.

use crate::data_plane::{Round, Variant};
use crate::stats::median;

/// The most the filter's own work may cost, in µs of Envoy CPU per request.
pub const FILTER_WORK_TARGET_US: f64 = 2.0;
/// The least share of `noop_wasm`'s requests per second zklb must serve.
pub const RPS_TARGET_RATIO: f64 = 0.95;
/// The most zklb's CPU per request may be, as a multiple of `noop_wasm`'s (plus the cluster
/// setup's share).
pub const CPU_TARGET_RATIO: f64 = 1.05;

/// What each thing zklb adds costs per request, from one figure per variant (µs of CPU in one
/// round, or instructions): the variants differ by one thing each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shares {
    /// `noop_wasm` − `native_random`: having any wasm filter.
    pub any_wasm: f64,
    /// `zklb_without_filter` − `native_random`: zklb's clusters, policy and header removal.
    pub cluster_setup: f64,
    /// `zklb_headers_from_client` − `zklb_without_filter`: Envoy routing by the cluster header
    /// and `override_host` following the candidates, the decision the filter writes.
    pub following_decision: f64,
    /// `zklb` − `noop_wasm` − (`zklb_headers_from_client` − `native_random`): what the filter
    /// itself does, in its VM and in the host calls it makes.
    pub filter_work: f64,
    /// `zklb` − `native_random`: zklb in all.
    pub zklb: f64,
}

impl Shares {
    /// The split of `figure`; `None` if a variant it needs has no figure.
    pub fn of(figure: &dyn Fn(Variant) -> Option<f64>) -> Option<Shares> {
        let native = figure(Variant::NativeRandom)?;
        let noop = figure(Variant::NoopWasm)?;
        let without_filter = figure(Variant::ZklbWithoutFilter)?;
        let headers_from_client = figure(Variant::ZklbHeadersFromClient)?;
        let zklb = figure(Variant::Zklb)?;
        Some(Shares {
            any_wasm: noop - native,
            cluster_setup: without_filter - native,
            following_decision: headers_from_client - without_filter,
            filter_work: zklb - noop - (headers_from_client - native),
            zklb: zklb - native,
        })
    }
}

/// The shares of Envoy's CPU per request, in µs: each the median over rounds of its [`Shares`].
#[derive(Debug, Clone, PartialEq)]
pub struct Breakdown {
    /// `native_random`: plain Envoy.
    pub native_us: f64,
    /// In µs: each the median over rounds of that round's share.
    pub shares: Shares,
    /// Median requests per second of `zklb` over that of `noop_wasm`.
    pub rps_vs_noop: f64,
    /// Median CPU per request of `zklb` and `noop_wasm`.
    pub zklb_cpu_us: f64,
    pub noop_cpu_us: f64,
}

impl Breakdown {
    /// The split, from the rounds in which all five variants it needs ran; `None` without any.
    pub fn of(rounds: &[Round]) -> Option<Breakdown> {
        let share = |field: fn(&Shares) -> f64| {
            paired(rounds, |cpu| Shares::of(cpu).map(|shares| field(&shares)))
        };
        let of = |variant: Variant, field: fn(&Round) -> f64| {
            let values: Vec<f64> = rounds
                .iter()
                .filter(|round| round.variant == variant)
                .map(field)
                .collect();
            median(&values)
        };
        let rps = |round: &Round| round.wrk.requests_per_second;
        let cpu = |round: &Round| round.cpu_us_per_request;
        Some(Breakdown {
            native_us: of(Variant::NativeRandom, cpu)?,
            shares: Shares {
                any_wasm: share(|shares| shares.any_wasm)?,
                cluster_setup: share(|shares| shares.cluster_setup)?,
                following_decision: share(|shares| shares.following_decision)?,
                filter_work: share(|shares| shares.filter_work)?,
                zklb: share(|shares| shares.zklb)?,
            },
            rps_vs_noop: of(Variant::Zklb, rps)? / of(Variant::NoopWasm, rps)?.max(1e-9),
            zklb_cpu_us: of(Variant::Zklb, cpu)?,
            noop_cpu_us: of(Variant::NoopWasm, cpu)?,
        })
    }

    pub fn filter_work_met(&self) -> bool {
        self.shares.filter_work <= FILTER_WORK_TARGET_US
    }

    pub fn rps_met(&self) -> bool {
        self.rps_vs_noop >= RPS_TARGET_RATIO
    }

    /// The most CPU per request zklb may take: `noop_wasm`'s × [`CPU_TARGET_RATIO`] plus the
    /// cluster setup's share (what following the filter's decision costs Envoy counts against it).
    pub fn cpu_limit_us(&self) -> f64 {
        CPU_TARGET_RATIO * self.noop_cpu_us + self.shares.cluster_setup
    }

    pub fn cpu_met(&self) -> bool {
        self.zklb_cpu_us <= self.cpu_limit_us()
    }
}

/// The median over rounds of `difference`, given each round's CPU per request by variant; rounds
/// where it is `None` (a variant missing) are left out.
pub fn paired(
    rounds: &[Round],
    difference: impl Fn(&dyn Fn(Variant) -> Option<f64>) -> Option<f64>,
) -> Option<f64> {
    let mut numbers: Vec<usize> = rounds.iter().map(|round| round.round).collect();
    numbers.sort_unstable();
    numbers.dedup();
    let differences: Vec<f64> = numbers
        .into_iter()
        .filter_map(|number| {
            let cpu = |variant: Variant| {
                rounds
                    .iter()
                    .find(|round| round.round == number && round.variant == variant)
                    .map(|round| round.cpu_us_per_request)
            };
            difference(&cpu)
        })
        .collect();
    median(&differences)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wrk::WrkReport;

    fn round(variant: Variant, round: usize, rps: f64, cpu: f64) -> Round {
        Round {
            variant,
            round,
            cpu_us_per_request: cpu,
            wrk: WrkReport {
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

    /// Two rounds, the second on a machine twice as slow: the shares of each round are
    /// proportional to its load, and their medians are the mean of the two here.
    fn two_rounds() -> Vec<Round> {
        let mut rounds = Vec::new();
        for (number, slow) in [(1, 1.0), (2, 2.0)] {
            rounds.push(round(
                Variant::NativeRandom,
                number,
                1000.0 / slow,
                50.0 * slow,
            ));
            rounds.push(round(Variant::NoopWasm, number, 900.0 / slow, 56.0 * slow));
            rounds.push(round(
                Variant::ZklbWithoutFilter,
                number,
                950.0 / slow,
                53.0 * slow,
            ));
            rounds.push(round(
                Variant::ZklbHeadersFromClient,
                number,
                930.0 / slow,
                54.0 * slow,
            ));
            rounds.push(round(Variant::Zklb, number, 860.0 / slow, 60.0 * slow));
        }
        rounds
    }

    #[test]
    fn shares_are_medians_of_differences_within_rounds() {
        let split = Breakdown::of(&two_rounds()).expect("all five variants ran");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(split.native_us, 75.0), "{split:?}");
        assert!(close(split.shares.any_wasm, 9.0), "{split:?}");
        assert!(close(split.shares.cluster_setup, 4.5), "{split:?}");
        assert!(close(split.shares.following_decision, 1.5), "{split:?}");
        // Round 1: 60 − 56 − (54 − 50) = 0; round 2: 120 − 112 − (108 − 100) = 0.
        assert!(close(split.shares.filter_work, 0.0), "{split:?}");
        assert!(close(split.shares.zklb, 15.0), "{split:?}");
        assert!(
            close(split.rps_vs_noop, (430.0 + 860.0) / (450.0 + 900.0)),
            "{split:?}"
        );
        assert!(split.filter_work_met());
        assert!(split.rps_met());
        // zklb 90 µs against 1.05 × 84 + 4.5 = 92.7 µs.
        assert!(close(split.cpu_limit_us(), 92.7), "{split:?}");
        assert!(split.cpu_met());
    }

    #[test]
    fn targets_are_missed_when_the_figures_are_above_them() {
        let mut rounds = two_rounds();
        for round in rounds
            .iter_mut()
            .filter(|round| round.variant == Variant::Zklb)
        {
            round.cpu_us_per_request += 10.0;
            round.wrk.requests_per_second *= 0.5;
        }
        let split = Breakdown::of(&rounds).expect("all five variants ran");
        assert!(!split.filter_work_met());
        assert!(!split.rps_met());
        assert!(!split.cpu_met());
    }

    #[test]
    fn no_split_without_the_variants_it_needs() {
        for missing in [Variant::ZklbWithoutFilter, Variant::ZklbHeadersFromClient] {
            let rounds: Vec<Round> = two_rounds()
                .into_iter()
                .filter(|round| round.variant != missing)
                .collect();
            assert_eq!(Breakdown::of(&rounds), None, "without {}", missing.name());
        }
    }
}
