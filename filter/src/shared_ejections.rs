//! The ejection table in shared data, as one root context last read it, and the writing of what
//! a finished request says about its hosts. The router and the learner both record through it.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::ejection::{EjectionPolicy, Ejections, Outcome};
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
