//! The learner: Envoy's access log hands it the requests that took more than one attempt or
//! ended in a 5xx, and only those (a filter in the access-log configuration picks them), and it
//! records what they say about their hosts in the ejection table that every worker shares. So a
//! request that went well costs the router no read of its answer.

use proxy_wasm::hostcalls;

use crate::ejection::EjectionPolicy;
use crate::metrics::Metrics;
use crate::shared::{CANDIDATES_PROPERTY, EJECTION_POLICY_KEY, LEARNER_HEARTBEAT, LEARNER_KEY};
use crate::shared_ejections::{now_ms, SharedEjections};

#[derive(Default)]
pub struct Learner {
    ejections: SharedEjections,
    metrics: Metrics,
}

impl Learner {
    /// Tells the routers that failing requests are learnt from here, and keeps telling them.
    pub fn start() -> Learner {
        if let Err(status) = hostcalls::set_tick_period(LEARNER_HEARTBEAT) {
            log::error!("zklb learner: cannot set a tick: {status:?}");
        }
        say_it_runs();
        Learner::default()
    }

    pub fn on_tick(&mut self) {
        say_it_runs();
    }

    pub fn on_log(&mut self) {
        let Some(policy) = ejection_policy() else {
            return;
        };
        // A request the router refused went to no host.
        let Some(candidates) = hostcalls::get_property(vec![CANDIDATES_PROPERTY])
            .ok()
            .flatten()
            .and_then(|candidates| String::from_utf8(candidates).ok())
        else {
            return;
        };
        let service = upstream_service();
        self.ejections.learn_from_answer(
            service.as_deref(),
            &candidates,
            &policy,
            &mut self.metrics,
        );
        // Failing requests are few: their counts need not wait for a tick.
        self.metrics.flush();
    }
}

fn say_it_runs() {
    let now = now_ms().to_string();
    if let Err(status) = hostcalls::set_shared_data(LEARNER_KEY, Some(now.as_bytes()), None) {
        log::error!("zklb learner: cannot say that it runs: {status:?}");
    }
}

/// The routers' ejection policy; `None` when ejection is off or no router has started.
fn ejection_policy() -> Option<EjectionPolicy> {
    let (bytes, _) = hostcalls::get_shared_data(EJECTION_POLICY_KEY).ok()?;
    serde_json::from_slice(&bytes?).ok()
}

/// The service of the cluster the request was routed to.
fn upstream_service() -> Option<String> {
    let cluster = hostcalls::get_property(vec!["xds", "cluster_name"])
        .ok()
        .flatten()?;
    let cluster = String::from_utf8(cluster).ok()?;
    zklb_wire::service_of_cluster(&cluster).map(str::to_string)
}
