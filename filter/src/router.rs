//! The HTTP filter: per request, the service and its ordered candidate hosts.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use zklb_wire::{ErrorBody, Service, Version};

use crate::balancer::{Policy, Preferences};
use crate::config::RouterConfig;
use crate::ejection::Outcome;
use crate::host::{attempts_and_status, request_header, upstream_address};
use crate::metrics::{self, Metrics};
use crate::plan::plan_request;
use crate::shared::{
    self, service_key, Index, CANDIDATES_PROPERTY, EJECTION_POLICY_KEY, INDEX_KEY, LEARNER_KEY,
    VERSION_KEY,
};
use crate::shared_ejections::{now_ms, SharedEjections};
use crate::table::ServiceTable;

/// One per worker: that worker's copy of the service table, shared by its requests.
pub struct RouterRoot {
    config: Rc<RouterConfig>,
    /// The zone whose hosts come first: configured, or Envoy's node locality.
    zone: Rc<Option<String>>,
    table: Rc<RefCell<LoadedTable>>,
    ejections: Rc<RefCell<SharedEjections>>,
    metrics: Rc<RefCell<Metrics>>,
    rng: Rc<RefCell<SmallRng>>,
    sightings: Rc<Sightings>,
}

/// What this worker last saw of the signals in shared state.
#[derive(Default)]
struct Sightings {
    /// The gauge counting changes to shared data, when a request last looked.
    changes: Cell<Option<u64>>,
    /// Whether the learner runs in Envoy's access log (it says so in shared data): then failing
    /// requests are its to learn from, and the router reads no answer it need not.
    learner: Cell<bool>,
}

/// The worker's service table, the versions of its services, and the index version it was
/// loaded from.
#[derive(Default)]
struct LoadedTable {
    table: ServiceTable,
    services: BTreeMap<String, Version>,
    /// `None` until the poller's first list is loaded.
    version: Option<Version>,
}

impl LoadedTable {
    /// Loads the poller's list if its version moved.
    fn refresh(&mut self) {
        let Ok((Some(bytes), _)) = hostcalls::get_shared_data(VERSION_KEY) else {
            return;
        };
        let version = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|version| version.parse().ok());
        if version.is_some() && version != self.version {
            self.load_index();
        }
    }

    /// Loads what moved since the index version loaded: only the services whose version moved
    /// are read and parsed.
    fn load_index(&mut self) {
        let Ok((Some(index), _)) = hostcalls::get_shared_data(INDEX_KEY) else {
            return;
        };
        let index: Index = match serde_json::from_slice(&index) {
            Ok(index) => index,
            Err(error) => {
                log::error!("zklb router: the shared service index does not parse: {error}");
                return;
            }
        };
        if self.version == Some(index.version) {
            return;
        }
        let (load, drop) = index.diff(&self.services);
        for name in drop {
            self.table.remove(&name);
            self.services.remove(&name);
        }
        for name in load {
            let Ok((Some(json), _)) = hostcalls::get_shared_data(&service_key(&name)) else {
                continue;
            };
            match serde_json::from_slice::<Service>(&json) {
                Ok(service) if service.name == name => {
                    self.table.upsert(&service);
                    if let Some(&version) = index.services.get(&name) {
                        self.services.insert(name, version);
                    }
                }
                Ok(service) => log::error!(
                    "zklb router: shared entry of {name:?} holds service {:?}",
                    service.name
                ),
                // Not recorded as loaded, so it is read again with the next version.
                Err(error) => {
                    log::error!("zklb router: shared service {name:?} does not parse: {error}")
                }
            }
        }
        self.version = Some(index.version);
    }

    /// The table, once a list has been loaded.
    fn loaded(&self) -> Option<&ServiceTable> {
        self.version.as_ref().map(|_| &self.table)
    }
}

/// How often a worker takes up what other workers learnt of failing hosts, looks at the list
/// version in shared data, and flushes its counters into Envoy's stats: often enough that a
/// host another worker ejected stops getting first attempts here within a fraction of a second,
/// rarely enough to cost nothing per request.
const TICK: std::time::Duration = std::time::Duration::from_millis(100);

impl RouterRoot {
    pub fn start(config: RouterConfig) -> RouterRoot {
        let zone = config.zone.clone().or_else(node_zone);
        // For the learner, so that it ejects by the router's policy; empty when ejection is off.
        let policy = config
            .ejection
            .map(|policy| serde_json::to_vec(&policy).unwrap_or_default())
            .unwrap_or_default();
        if let Err(status) = hostcalls::set_shared_data(EJECTION_POLICY_KEY, Some(&policy), None) {
            log::error!("zklb router: cannot share the ejection policy: {status:?}");
        }
        if let Err(status) = hostcalls::set_tick_period(TICK) {
            log::error!("zklb router: cannot set a tick: {status:?}");
        }
        RouterRoot {
            zone: Rc::new(zone),
            config: Rc::new(config),
            table: Rc::new(RefCell::new(LoadedTable::default())),
            ejections: Rc::new(RefCell::new(SharedEjections::default())),
            metrics: Rc::new(RefCell::new(Metrics::default())),
            rng: Rc::new(RefCell::new(seeded_rng())),
            sightings: Rc::new(Sightings::default()),
        }
    }

    /// Looks at shared data whatever the gauge says (a stats matcher that rejects the gauge
    /// holds it at 0), and at whether a learner runs.
    pub fn on_tick(&mut self) {
        take_up_shared_changes(&self.config, &self.table, &self.ejections);
        let runs = learner_runs();
        if self.sightings.learner.replace(runs) != runs {
            if runs {
                log::info!(
                    "zklb router: a learner runs in the access log and learns from failures"
                );
            } else {
                log::info!("zklb router: no learner runs: learning from every answer");
            }
        }
        self.metrics.borrow_mut().flush();
    }

    pub fn request_context(&self) -> Request {
        Request {
            config: Rc::clone(&self.config),
            zone: Rc::clone(&self.zone),
            table: Rc::clone(&self.table),
            ejections: Rc::clone(&self.ejections),
            metrics: Rc::clone(&self.metrics),
            rng: Rc::clone(&self.rng),
            sightings: Rc::clone(&self.sightings),
            routed: None,
            in_flight: None,
        }
    }
}

/// A generator seeded once per worker VM from WASI `random_get`, or from the host clock should
/// that fail: picks must stay uniform, they need not be unpredictable.
fn seeded_rng() -> SmallRng {
    SmallRng::try_from_os_rng().unwrap_or_else(|error| {
        log::warn!("zklb router: no OS randomness ({error}); seeding from the clock");
        let now = hostcalls::get_current_time().unwrap_or(std::time::UNIX_EPOCH);
        let nanos = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        SmallRng::seed_from_u64(nanos as u64)
    })
}

/// Reads the list and the ejection table again where they moved in shared data.
fn take_up_shared_changes(
    config: &RouterConfig,
    table: &RefCell<LoadedTable>,
    ejections: &RefCell<SharedEjections>,
) {
    table.borrow_mut().refresh();
    if config.ejection.is_some() {
        ejections.borrow_mut().refresh();
    }
}

/// Whether a learner says it runs.
fn learner_runs() -> bool {
    let said = hostcalls::get_shared_data(LEARNER_KEY)
        .ok()
        .and_then(|(said, _)| said);
    shared::learner_runs(said.as_deref(), now_ms())
}

pub struct Request {
    config: Rc<RouterConfig>,
    zone: Rc<Option<String>>,
    table: Rc<RefCell<LoadedTable>>,
    ejections: Rc<RefCell<SharedEjections>>,
    metrics: Rc<RefCell<Metrics>>,
    rng: Rc<RefCell<SmallRng>>,
    sightings: Rc<Sightings>,
    /// The service and candidates of this request, to learn from its outcome.
    routed: Option<(Rc<str>, String)>,
    /// The in-flight gauge this request counts in, until it ends.
    in_flight: Option<String>,
}

impl Request {
    /// Checked on every request, so that a worker routes by a new list, and away from a host
    /// another worker ejected, as soon as they are shared rather than on the next tick: the
    /// gauge that counts changes to shared data, one host call that hands back a number (a
    /// shared-data read makes Envoy call into the VM to allocate what it copies). Only when the
    /// gauge moved is shared data read.
    fn take_up_signalled_changes(&self) {
        let changes = self.metrics.borrow_mut().gauge(metrics::SHARED_CHANGES);
        if self.sightings.changes.replace(Some(changes)) != Some(changes) {
            take_up_shared_changes(&self.config, &self.table, &self.ejections);
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "crash-probe")]
        if request_header("x-zklb-crash-probe").is_some() {
            panic!("zklb: crashing on request, as the crash-probe build does");
        }
        let authority = request_header(":authority").unwrap_or_default();
        let routes = &self.config.routes;
        let path = routes
            .needs_path()
            .then(|| request_header(":path"))
            .flatten();
        let resolved = routes.resolve(&authority, path.as_deref(), request_header);
        self.take_up_signalled_changes();
        let metrics = &self.metrics;
        let load = |address: &str| metrics.borrow_mut().gauge(&in_flight_metric(address));
        let ejections = self.ejections.borrow();
        let timed = !ejections.table.is_empty() || !self.config.warmup.is_zero();
        let now = if timed { now_ms() } else { 0 };
        let preferences = Preferences {
            avoid: ejections.table.ejected(now).collect(),
            max_avoided_share: self
                .config
                .ejection
                .map_or(0.0, |ejection| ejection.max_ejected_share),
            zone: self.zone.as_deref(),
            min_zone_hosts: self.config.min_zone_hosts,
            warmup_ms: u64::try_from(self.config.warmup.as_millis()).unwrap_or(u64::MAX),
            now_ms: now,
            load: Some(&load),
        };
        let planned = plan_request(
            self.table.borrow().loaded(),
            resolved.as_ref(),
            &self.config,
            &preferences,
            &mut *self.rng.borrow_mut(),
        );
        drop(preferences);
        drop(ejections);
        match planned {
            Ok(plan) => {
                // Setting replaces every value a client sent: what it wrote in these headers
                // never steers routing. A refused request goes nowhere, with or without them.
                self.set_http_request_header(zklb_wire::CLUSTER_HEADER, Some(&plan.cluster));
                self.set_http_request_header(zklb_wire::CANDIDATES_HEADER, Some(&plan.candidates));
                // The header leaves before the request goes upstream; the learner, if the
                // request fails, finds the candidates here.
                if self.sightings.learner.get() && self.config.ejection.is_some() {
                    let _ = hostcalls::set_property(
                        vec![CANDIDATES_PROPERTY],
                        Some(plan.candidates.as_bytes()),
                    );
                }
                if let Some(path) = resolved
                    .as_ref()
                    .and_then(|resolved| resolved.path.as_deref())
                {
                    self.set_http_request_header(":path", Some(path));
                }
                self.metrics
                    .borrow_mut()
                    .count_pick(&plan.service, plan.policy);
                if plan.policy == Policy::LeastRequest {
                    let first = plan.candidates.split(',').next().unwrap_or_default();
                    let metric = in_flight_metric(first);
                    self.metrics.borrow_mut().add(&metric, 1);
                    self.in_flight = Some(metric);
                }
                self.routed = Some((plan.service, plan.candidates));
                Action::Continue
            }
            Err(refusal) => {
                self.metrics
                    .borrow_mut()
                    .count(&format!("zklb.refused.{}", refusal.kind.name()), 1);
                let body = serde_json::to_vec(&ErrorBody {
                    error: refusal.reason,
                })
                .unwrap_or_default();
                self.send_http_response(
                    refusal.status,
                    vec![("content-type", "application/json")],
                    Some(&body),
                );
                Action::Pause
            }
        }
    }

    /// The stream is over, however it ended: its request is no longer in flight.
    fn on_log(&mut self) {
        if let Some(metric) = self.in_flight.take() {
            self.metrics.borrow_mut().add(&metric, -1);
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some((service, candidates)) = self.routed.take() else {
            return Action::Continue;
        };
        if let Some(policy) = self.config.ejection {
            let first = candidates.split(',').next().unwrap_or_default();
            if !self.sightings.learner.get() {
                // Where no learner runs in Envoy's access log: two reads per request.
                self.ejections.borrow_mut().learn_from_answer(
                    Some(&service),
                    &candidates,
                    &policy,
                    &mut self.metrics.borrow_mut(),
                );
            } else if self.ejections.borrow().table.knows(first) {
                // Failing requests go to the learner; a first attempt that answered is this
                // filter's to see, for a host with a record, which the success clears.
                if let (Some(1), status) = attempts_and_status() {
                    if status < 500 {
                        self.ejections.borrow_mut().record(
                            &[(first, Outcome::Success)],
                            now_ms(),
                            &policy,
                            &mut self.metrics.borrow_mut(),
                        );
                    }
                }
            }
        }
        if self.config.debug_headers {
            self.set_http_response_header(zklb_wire::CANDIDATES_HEADER, Some(&candidates));
            if let Some(upstream) = upstream_address() {
                self.set_http_response_header(zklb_wire::UPSTREAM_HEADER, Some(&upstream));
            }
        }
        Action::Continue
    }
}

/// The gauge of requests in flight at `address`, shared by every worker.
fn in_flight_metric(address: &str) -> String {
    format!("zklb.inflight.{address}")
}

/// The zone of Envoy's node locality, if it has one.
fn node_zone() -> Option<String> {
    let zone = hostcalls::get_property(vec!["xds", "node", "locality", "zone"])
        .ok()
        .flatten()?;
    String::from_utf8(zone).ok().filter(|zone| !zone.is_empty())
}
