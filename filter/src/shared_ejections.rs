//! The ejection table in shared data, as one root context last read it, and the writing of what
//! a finished request says about its hosts. The router and the learner both record through it.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::ejection::{attempts_outcomes, EjectionPolicy, Ejections, Outcome};
use crate::host::{attempts_and_status, upstream_address};
use crate::metrics::{self, Metrics};
use crate::shared::EJECTIONS_KEY;

/// The ejection table as this worker last read it from shared data.
#[derive(Default)]
pub struct SharedEjections {
    pub table: Ejections,
    /// The shared entry's compare-and-swap token when read; `None` forces the next read.
    cas: Option<u32>,
}

/// Tries at writing the shared table before an outcome is given up (another worker wrote it
/// each time in between).
const CAS_ATTEMPTS: usize = 8;

impl SharedEjections {
    /// Reads the shared table if another worker changed it.
    pub fn refresh(&mut self) {
        let Ok((bytes, cas)) = hostcalls::get_shared_data(EJECTIONS_KEY) else {
            return;
        };
        if cas.is_some() && cas == self.cas {
            return;
        }
        self.table = parse_ejections(bytes.as_deref());
        self.cas = cas;
    }

    /// Learns from the answer of the request at hand, which went to `candidates` of `service`
    /// (counted in its `zklb.retried` when it took more attempts than one): Envoy says how many
    /// attempts it made, with what status, and which upstream answered.
    pub fn learn_from_answer(
        &mut self,
        service: Option<&str>,
        candidates: &str,
        policy: &EjectionPolicy,
        metrics: &mut Metrics,
    ) {
        let (attempts, status) = attempts_and_status();
        if let Some(service) = service.filter(|_| attempts.is_some_and(|attempts| attempts > 1)) {
            metrics.count(&format!("zklb.retried.{service}"), 1);
        }
        let first = candidates.split(',').next().unwrap_or_default();
        // The common case, a first attempt that answered for a host without a record, changes
        // nothing: no more host calls.
        if attempts == Some(1) && status < 500 && !self.table.knows(first) {
            return;
        }
        let upstream = upstream_address();
        if let Some(attempts) = attempts.or(upstream.as_ref().map(|_| 1)) {
            let outcomes = attempts_outcomes(candidates, attempts, upstream.as_deref(), status);
            self.record(&outcomes, now_ms(), policy, metrics);
        }
    }

    /// Records what a finished request says about its hosts, with compare-and-swap so that no
    /// worker's outcome overwrites another's.
    pub fn record(
        &mut self,
        outcomes: &[(&str, Outcome)],
        now_ms: u64,
        policy: &EjectionPolicy,
        metrics: &mut Metrics,
    ) {
        // A success of a host without a record changes nothing: a healthy fleet writes nothing.
        let unchanging = outcomes
            .iter()
            .all(|(host, outcome)| *outcome == Outcome::Success && !self.table.knows(host));
        if unchanging {
            return;
        }
        for _ in 0..CAS_ATTEMPTS {
            let Ok((bytes, cas)) = hostcalls::get_shared_data(EJECTIONS_KEY) else {
                return;
            };
            let read = parse_ejections(bytes.as_deref());
            let mut table = read.clone();
            let mut changed = false;
            for (host, outcome) in outcomes {
                changed |= table.record(host, *outcome, now_ms, policy);
            }
            if !changed {
                self.table = table;
                self.cas = cas;
                return;
            }
            let json = serde_json::to_vec(&table).unwrap_or_default();
            match hostcalls::set_shared_data(EJECTIONS_KEY, Some(&json), cas) {
                Ok(()) => {
                    metrics.add(metrics::SHARED_CHANGES, 1);
                    let newly: Vec<&str> = table
                        .ejected(now_ms)
                        .filter(|host| !read.is_ejected(host, now_ms))
                        .collect();
                    for host in &newly {
                        log::warn!("zklb: ejecting {host} after consecutive failures");
                    }
                    if !newly.is_empty() {
                        metrics.count("zklb.ejections", newly.len() as i64);
                    }
                    metrics.set("zklb.ejected_hosts", table.ejected(now_ms).count() as u64);
                    self.table = table;
                    self.cas = None;
                    return;
                }
                Err(Status::CasMismatch) => continue,
                Err(status) => {
                    log::error!("zklb: cannot share host failures: {status:?}");
                    return;
                }
            }
        }
    }
}

fn parse_ejections(bytes: Option<&[u8]>) -> Ejections {
    bytes
        .filter(|bytes| !bytes.is_empty())
        .and_then(|bytes| serde_json::from_slice(bytes).ok())
        .unwrap_or_default()
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|now| now.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}
