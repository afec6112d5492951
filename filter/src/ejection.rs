//! Passive ejection: which hosts failed recently, learnt from finished requests and shared by
//! every worker. Envoy's `override_host` policy ignores cluster health and outlier detection,
//! so without this a dead host that is still registered keeps getting first attempts.
//!
//! Pure bookkeeping: the router reads and writes it in shared data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// When a host is ejected, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EjectionPolicy {
    /// Consecutive failed attempts that eject a host.
    pub consecutive_failures: u32,
    /// The first ejection's length; each repeat doubles it, up to `max_ms`.
    pub base_ms: u64,
    pub max_ms: u64,
    /// The largest share of a service's hosts that is kept out of first place at once: past it,
    /// ejections are ignored for that service (as Envoy's panic threshold does), since that
    /// many failures say more about the checks than about the hosts.
    pub max_ejected_share: f64,
}

impl Default for EjectionPolicy {
    fn default() -> EjectionPolicy {
        EjectionPolicy {
            consecutive_failures: 3,
            base_ms: 10_000,
            max_ms: 300_000,
            max_ejected_share: 0.5,
        }
    }
}

/// How one attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A connect failure, a reset, or a 5xx answer.
    Failure,
}

/// The hosts with recent failures, by `ip:port`. Hosts without any are left out, so that the
/// table stays small and a healthy fleet writes nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ejections {
    hosts: BTreeMap<String, HostRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct HostRecord {
    /// Consecutive failures since the last success or ejection.
    failures: u32,
    /// Ejections in a row, which lengthen the next one.
    ejections: u32,
    /// Milliseconds since the Unix epoch until which the host is ejected.
    until_ms: u64,
}

impl Ejections {
    /// Takes one attempt's outcome; returns whether the table changed.
    pub fn record(
        &mut self,
        host: &str,
        outcome: Outcome,
        now_ms: u64,
        policy: &EjectionPolicy,
    ) -> bool {
        match outcome {
            // A success readmits the host and forgets its history.
            Outcome::Success => self.hosts.remove(host).is_some(),
            Outcome::Failure => {
                let record = self.hosts.entry(host.to_string()).or_default();
                if record.until_ms > now_ms {
                    // Already ejected: failures of its last-resort tries change nothing.
                    return false;
                }
                record.failures += 1;
                if record.failures >= policy.consecutive_failures {
                    let doublings = record.ejections.min(16);
                    let length = policy
                        .base_ms
                        .saturating_mul(1 << doublings)
                        .min(policy.max_ms);
                    record.until_ms = now_ms + length;
                    record.ejections += 1;
                    record.failures = 0;
                }
                true
            }
        }
    }

    pub fn is_ejected(&self, host: &str, now_ms: u64) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|record| record.until_ms > now_ms)
    }

    /// Whether the table has anything on `host`: only then can a success change it.
    pub fn knows(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The hosts ejected now, for metrics and logs.
    pub fn ejected(&self, now_ms: u64) -> impl Iterator<Item = &str> {
        self.hosts
            .iter()
            .filter(move |(_, record)| record.until_ms > now_ms)
            .map(|(host, _)| host.as_str())
    }
}

/// What one finished request says about the hosts it tried: attempt k went to candidate k, and
/// every attempt but the last failed (a retry follows only a failure); the last went to
/// `upstream` (the host that answered, when Envoy says) and failed if the answer is a 5xx.
pub fn attempts_outcomes<'a>(
    candidates: &'a str,
    attempts: usize,
    upstream: Option<&'a str>,
    status: u32,
) -> Vec<(&'a str, Outcome)> {
    let candidates: Vec<&str> = candidates.split(',').filter(|c| !c.is_empty()).collect();
    let mut outcomes: Vec<(&str, Outcome)> = candidates
        .iter()
        .take(attempts.saturating_sub(1))
        .map(|&host| (host, Outcome::Failure))
        .collect();
    let last = upstream.or_else(|| candidates.get(attempts.checked_sub(1)?).copied());
    if let Some(last) = last {
        let outcome = if status >= 500 || status == 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        outcomes.push((last, outcome));
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "10.0.0.1:80";

    fn fail(ejections: &mut Ejections, times: u32, now_ms: u64) {
        for _ in 0..times {
            ejections.record(HOST, Outcome::Failure, now_ms, &EjectionPolicy::default());
        }
    }

    #[test]
    fn consecutive_failures_eject_and_the_ejection_ends() {
        let mut ejections = Ejections::default();
        fail(&mut ejections, 2, 1_000);
        assert!(!ejections.is_ejected(HOST, 1_000));
        fail(&mut ejections, 1, 1_000);
        assert!(ejections.is_ejected(HOST, 1_000));
        assert!(ejections.is_ejected(HOST, 10_999));
        assert!(!ejections.is_ejected(HOST, 11_000), "10 s later it is back");
    }

    #[test]
    fn a_success_resets_the_count_and_readmits() {
        let mut ejections = Ejections::default();
        let policy = EjectionPolicy::default();
        fail(&mut ejections, 2, 0);
        assert!(ejections.record(HOST, Outcome::Success, 0, &policy));
        fail(&mut ejections, 2, 0);
        assert!(
            !ejections.is_ejected(HOST, 0),
            "the success reset the count"
        );
        fail(&mut ejections, 1, 0);
        assert!(ejections.is_ejected(HOST, 0));
        ejections.record(HOST, Outcome::Success, 1, &policy);
        assert!(!ejections.is_ejected(HOST, 1));
        assert!(ejections.is_empty());
        assert!(
            !ejections.record(HOST, Outcome::Success, 2, &policy),
            "a healthy host writes nothing"
        );
    }

    #[test]
    fn repeated_ejections_last_longer_up_to_the_maximum() {
        let mut ejections = Ejections::default();
        let mut now = 0;
        let mut lengths = Vec::new();
        for _ in 0..8 {
            fail(&mut ejections, 3, now);
            let start = now;
            while ejections.is_ejected(HOST, now) {
                now += 1_000;
            }
            lengths.push(now - start);
        }
        assert_eq!(
            lengths,
            [10_000, 20_000, 40_000, 80_000, 160_000, 300_000, 300_000, 300_000]
        );
    }

    #[test]
    fn failures_while_ejected_change_nothing() {
        let mut ejections = Ejections::default();
        fail(&mut ejections, 3, 0);
        let before = ejections.clone();
        assert!(!ejections.record(HOST, Outcome::Failure, 5, &EjectionPolicy::default()));
        assert_eq!(ejections, before);
    }

    #[test]
    fn a_finished_request_blames_every_attempt_but_a_good_last() {
        assert_eq!(
            attempts_outcomes("a:1,b:2,c:3", 3, Some("c:3"), 200),
            [
                ("a:1", Outcome::Failure),
                ("b:2", Outcome::Failure),
                ("c:3", Outcome::Success)
            ]
        );
        assert_eq!(
            attempts_outcomes("a:1,b:2,c:3", 1, Some("a:1"), 503),
            [("a:1", Outcome::Failure)]
        );
        // Every attempt failed to connect: Envoy answers itself, with no upstream.
        assert_eq!(
            attempts_outcomes("a:1,b:2", 2, None, 503),
            [("a:1", Outcome::Failure), ("b:2", Outcome::Failure)]
        );
        // Past the candidates, the fallback's host is known only as the upstream.
        assert_eq!(
            attempts_outcomes("a:1", 2, Some("z:9"), 200),
            [("a:1", Outcome::Failure), ("z:9", Outcome::Success)]
        );
    }
}
