//! Whether an instance may take traffic: its checks' results, counted in a row against the rise
//! and fall thresholds, decide when it turns healthy or unhealthy.

pub mod probe;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::metrics::InstanceMetrics;
use crate::now_ms;
pub use probe::{Probe, Prober, Statuses};

/// How an instance is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    pub probe: Probe,
    pub interval: Duration,
    /// A check that has not passed by then fails.
    pub timeout: Duration,
    /// Checks passed in a row that make an unhealthy instance healthy.
    pub rise: u32,
    /// Checks failed in a row that make a healthy instance unhealthy.
    pub fall: u32,
}

/// Hysteresis over check results: one result never flips the state unless the threshold is 1.
/// An instance starts unhealthy and earns traffic with `rise` passed checks in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiseFall {
    healthy: bool,
    /// Results in a row that disagree with the current state.
    against: u32,
    rise: u32,
    fall: u32,
}

impl RiseFall {
    pub fn new(rise: u32, fall: u32) -> RiseFall {
        RiseFall {
            healthy: false,
            against: 0,
            rise,
            fall,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Counts one check; returns the new state when this result changed it.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            self.against = 0;
            return None;
        }
        self.against += 1;
        let threshold = if self.healthy { self.fall } else { self.rise };
        if self.against < threshold {
            return None;
        }
        self.healthy = passed;
        self.against = 0;
        Some(self.healthy)
    }
}

/// What the registration of an instance follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub healthy: bool,
    /// When it last turned healthy (ms since the epoch), written as `registrationTimeUTC`: the
    /// time it entered rotation, from which zklb's warm-up counts.
    pub since_ms: u64,
}

impl Status {
    /// Healthy from the start when nothing checks it; unhealthy until checks pass otherwise.
    pub fn initial(checked: bool) -> Status {
        Status {
            healthy: !checked,
            since_ms: now_ms(),
        }
    }
}

/// Checks the instance every `interval` (the first check at once), for as long as the task
/// runs, and publishes each change of health.
pub async fn keep_checking(
    check: CheckConfig,
    prober: Prober,
    status: watch::Sender<Status>,
    metrics: Arc<InstanceMetrics>,
) {
    let mut state = RiseFall::new(check.rise, check.fall);
    let mut ticks = tokio::time::interval(check.interval);
    // A slow check delays the next one rather than firing a burst after it.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = match tokio::time::timeout(check.timeout, prober.check()).await {
            Ok(result) => result,
            Err(_) => Err(probe::ProbeError::Timeout(check.timeout)),
        };
        metrics.count_check(result.is_ok());
        let Some(healthy) = state.record(result.is_ok()) else {
            continue;
        };
        match &result {
            Ok(()) => {
                tracing::info!(target = %prober.target(), "healthy: {} checks passed in a row", check.rise)
            }
            Err(error) => {
                tracing::warn!(target = %prober.target(), %error, "unhealthy: {} checks failed in a row", check.fall)
            }
        }
        metrics.set_healthy(healthy);
        status.send_modify(|status| {
            status.healthy = healthy;
            if healthy {
                status.since_ms = now_ms();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: &mut RiseFall, results: &[bool]) -> Vec<Option<bool>> {
        results.iter().map(|&passed| state.record(passed)).collect()
    }

    #[test]
    fn an_instance_starts_unhealthy_and_rises_after_rise_passes_in_a_row() {
        let mut state = RiseFall::new(2, 3);
        assert!(!state.is_healthy());
        assert_eq!(run(&mut state, &[true]), [None]);
        assert_eq!(run(&mut state, &[true]), [Some(true)]);
        assert!(state.is_healthy());
        assert_eq!(run(&mut state, &[true, true]), [None, None]);
    }

    #[test]
    fn it_falls_after_fall_failures_in_a_row_and_not_before() {
        let mut state = RiseFall::new(1, 3);
        assert_eq!(state.record(true), Some(true));
        assert_eq!(run(&mut state, &[false, false]), [None, None]);
        assert!(state.is_healthy());
        assert_eq!(state.record(false), Some(false));
        assert!(!state.is_healthy());
    }

    #[test]
    fn an_agreeing_result_resets_the_count() {
        let mut state = RiseFall::new(1, 2);
        state.record(true);
        // fail, pass, fail, pass: never two failures in a row.
        assert_eq!(
            run(&mut state, &[false, true, false, true]),
            [None, None, None, None]
        );
        assert!(state.is_healthy());
        let mut rising = RiseFall::new(3, 1);
        assert_eq!(
            run(&mut rising, &[true, true, false, true, true]),
            [None, None, None, None, None]
        );
        assert_eq!(rising.record(true), Some(true));
    }

    #[test]
    fn thresholds_of_one_follow_every_result() {
        let mut state = RiseFall::new(1, 1);
        assert_eq!(
            run(&mut state, &[true, false, false, true]),
            [Some(true), Some(false), None, Some(true)]
        );
    }

    #[test]
    fn unchecked_instances_start_healthy() {
        assert!(Status::initial(false).healthy);
        assert!(!Status::initial(true).healthy);
    }
}
