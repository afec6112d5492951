//! The filter's metrics, through the proxy-wasm metrics ABI: Envoy stats (prefixed
//! `wasmcustom.`), so they show in `/stats` and `/stats/prometheus` with Envoy's own.
//!
//! - `zklb.picks.<service>.<policy>`: requests routed;
//! - `zklb.retried.<service>`: requests that took more than one attempt;
//! - `zklb.refused.<reason>`: requests the filter answered itself (`unknown_service`,
//!   `no_instances`, `not_loaded`);
//! - `zklb.ejections` and `zklb.ejected_hosts`: hosts ejected, and ejected now;
//! - `zklb.inflight.<ip:port>`: requests in flight at a host, for `least_request` services;
//! - `zklb.list_version` and `zklb.list_age_seconds`: the service list in use and how long ago
//!   the control plane last read ZooKeeper for it;
//! - `zklb.shared_changes`: changes to the lists and the ejections that workers share, counted
//!   so that every worker looks again;
//! - `zklb.poll_errors.<reason>`: list polls that left the last good list in place
//!   (`unreachable`, `status`, `too_large`, `unparsable`, `not_stored`).

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::balancer::Policy;

/// The gauge of the list version the poller last published.
pub const LIST_VERSION: &str = "zklb.list_version";
/// The gauge counting changes to what workers share (lists, ejections): routers read it on every
/// request, since reading a number costs Envoy less than a shared-data read, which copies bytes
/// into the VM.
pub const SHARED_CHANGES: &str = "zklb.shared_changes";

/// Metric ids by name, defined on first use (names carry service names, which come and go).
/// Counters are added up here and handed to Envoy by [`Metrics::flush`] (every worker tick):
/// a request costs no host call for them.
#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
    /// The picks counter of each service, by service name alone: no name is built per request.
    picks: HashMap<String, u32>,
    /// Counts not handed to Envoy yet, by metric id.
    pending: HashMap<u32, i64>,
}

impl Metrics {
    pub fn count(&mut self, name: &str, by: i64) {
        if let Some(id) = self.id(MetricType::Counter, name) {
            *self.pending.entry(id).or_default() += by;
        }
    }

    /// Hands the counts added up since the last flush to Envoy.
    pub fn flush(&mut self) {
        for (id, by) in self.pending.drain() {
            if by != 0 {
                let _ = hostcalls::increment_metric(id, by);
            }
        }
    }

    /// Counts a request routed to `service` by `policy`.
    pub fn count_pick(&mut self, service: &str, policy: Policy) {
        let id = match self.picks.get(service) {
            Some(&id) => Some(id),
            None => {
                let name = format!("zklb.picks.{service}.{}", policy.name());
                let id = self.id(MetricType::Counter, &name);
                if let Some(id) = id {
                    self.picks.insert(service.to_string(), id);
                }
                id
            }
        };
        if let Some(id) = id {
            *self.pending.entry(id).or_default() += 1;
        }
    }

    /// Adds `by` (which may be negative) to a gauge, at once: `least_request` reads it.
    pub fn add(&mut self, name: &str, by: i64) {
        if let Some(id) = self.id(MetricType::Gauge, name) {
            let _ = hostcalls::increment_metric(id, by);
        }
    }

    /// A gauge's value, across every worker.
    pub fn gauge(&mut self, name: &str) -> u64 {
        self.id(MetricType::Gauge, name)
            .and_then(|id| hostcalls::get_metric(id).ok())
            .unwrap_or(0)
    }

    pub fn set(&mut self, name: &str, value: u64) {
        if let Some(id) = self.id(MetricType::Gauge, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    fn id(&mut self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(&id) = self.ids.get(name) {
            return Some(id);
        }
        match hostcalls::define_metric(kind, name) {
            Ok(id) => {
                self.ids.insert(name.to_string(), id);
                Some(id)
            }
            Err(status) => {
                log::warn!("zklb: cannot define metric {name}: {status:?}");
                None
            }
        }
    }
}
