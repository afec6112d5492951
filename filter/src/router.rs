//! The HTTP filter: per request, the service and its ordered candidate hosts.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType, Status};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use zklb_wire::{ErrorBody, Service, Version};

use crate::balancer::{Policy, Preferences};
use crate::config::RouterConfig;
use crate::ejection::{attempts_outcomes, parse_outcome, EjectionPolicy, Ejections, Outcome};
use crate::metrics::{self, Metrics};
use crate::plan::plan_request;
use crate::shared::{service_key, Index, EJECTIONS_KEY, INDEX_KEY, VERSION_KEY};
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
}

/// The worker's service table, the versions of its services, and the index version it was
/// loaded from.
#[derive(Default)]
struct LoadedTable {
    table: ServiceTable,
    services: BTreeMap<String, Version>,
    /// `None` until the poller's first list is loaded.
    version: Option<Version>,
    /// The poller's list-version gauge when a request last looked.
    signalled: Option<u64>,
}

impl LoadedTable {
    /// Checked on every request, so that a worker routes by a new list as soon as the poller
    /// has it, not on a timer: the poller's list-version gauge, one host call that hands back a
    /// number. Only when it moved is the index read.
    fn refresh_if_signalled(&mut self, metrics: &mut Metrics) {
        let signalled = metrics.gauge(metrics::LIST_VERSION);
        if self.signalled == Some(signalled) {
            return;
        }
        self.signalled = Some(signalled);
        self.load_index();
    }

    /// Checked on the worker's tick: the version in shared data, which moves whatever the stats
    /// configuration does with the gauge (a stats matcher that rejects it holds it at 0).
    fn refresh_from_shared_version(&mut self) {
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

/// The ejection table as this worker last read it from shared data.
#[derive(Default)]
struct SharedEjections {
    table: Ejections,
    /// The shared entry's compare-and-swap token when read; `None` forces the next read.
    cas: Option<u32>,
}

/// Tries at writing the shared table before an outcome is given up (another worker wrote it
/// each time in between).
const CAS_ATTEMPTS: usize = 8;

impl SharedEjections {
    /// Reads the shared table if another worker changed it.
    fn refresh(&mut self) {
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
    fn record(
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
            let mut table = parse_ejections(bytes.as_deref());
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
                    let newly: Vec<&str> = table
                        .ejected(now_ms)
                        .filter(|host| !self.table.is_ejected(host, now_ms))
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

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|now| now.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// How often a worker takes up what other workers learnt of failing hosts, looks at the list
/// version in shared data, and flushes its counters into Envoy's stats: often enough that a
/// host another worker ejected stops getting first attempts here within a fraction of a second,
/// rarely enough to cost nothing per request.
const TICK: std::time::Duration = std::time::Duration::from_millis(100);

impl RouterRoot {
    pub fn start(config: RouterConfig) -> RouterRoot {
        let zone = config.zone.clone().or_else(node_zone);
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
        }
    }

    pub fn on_tick(&mut self) {
        self.table.borrow_mut().refresh_from_shared_version();
        if self.config.ejection.is_some() {
            self.ejections.borrow_mut().refresh();
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

pub struct Request {
    config: Rc<RouterConfig>,
    zone: Rc<Option<String>>,
    table: Rc<RefCell<LoadedTable>>,
    ejections: Rc<RefCell<SharedEjections>>,
    metrics: Rc<RefCell<Metrics>>,
    rng: Rc<RefCell<SmallRng>>,
    /// The service and candidates of this request, to learn from its outcome.
    routed: Option<(Rc<str>, String)>,
    /// The in-flight gauge this request counts in, until it ends.
    in_flight: Option<String>,
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
        self.table
            .borrow_mut()
            .refresh_if_signalled(&mut self.metrics.borrow_mut());
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
        let outcome = self
            .config
            .ejection
            .and_then(|_| header_value(MapType::HttpResponseHeaders, zklb_wire::OUTCOME_HEADER));
        // Meant for this filter alone, whether it learns from answers or not.
        self.set_http_response_header(zklb_wire::OUTCOME_HEADER, None);
        let upstream = || {
            hostcalls::get_property(vec!["upstream", "address"])
                .ok()
                .flatten()
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        };
        if let Some(policy) = &self.config.ejection {
            let (attempts, status) = match outcome.as_deref().and_then(parse_outcome) {
                Some((attempts, status)) => (Some(attempts), status),
                // Routes that do not add the outcome header: two reads instead of one.
                None => (
                    attempt_count(),
                    header_value(MapType::HttpResponseHeaders, ":status")
                        .and_then(|status| status.parse().ok())
                        .unwrap_or(0),
                ),
            };
            if attempts.is_some_and(|attempts| attempts > 1) {
                self.metrics
                    .borrow_mut()
                    .count(&format!("zklb.retried.{service}"), 1);
            }
            let first = candidates.split(',').next().unwrap_or_default();
            // The common case, a first attempt that answered for a host without a record,
            // changes nothing: no more host calls.
            let uneventful =
                attempts == Some(1) && status < 500 && !self.ejections.borrow().table.knows(first);
            if !uneventful {
                let upstream = upstream();
                if let Some(attempts) = attempts.or(upstream.as_ref().map(|_| 1)) {
                    let outcomes =
                        attempts_outcomes(&candidates, attempts, upstream.as_deref(), status);
                    self.ejections.borrow_mut().record(
                        &outcomes,
                        now_ms(),
                        policy,
                        &mut self.metrics.borrow_mut(),
                    );
                }
            }
        }
        if self.config.debug_headers {
            self.set_http_response_header(zklb_wire::CANDIDATES_HEADER, Some(&candidates));
            if let Some(upstream) = upstream() {
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

fn request_header(name: &str) -> Option<String> {
    header_value(MapType::HttpRequestHeaders, name)
}

/// A header, read as bytes: the SDK's string getter panics on a value that is not UTF-8. Such a
/// value names no service, and is refused as unknown.
fn header_value(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// How many attempts Envoy made for this request (attempt k went to candidate k), from its
/// `upstream.request_attempt_count` attribute: an unsigned 64-bit integer, in the host's byte
/// order.
fn attempt_count() -> Option<usize> {
    let bytes = hostcalls::get_property(vec!["upstream", "request_attempt_count"])
        .ok()
        .flatten()?;
    let count = u64::from_le_bytes(bytes.as_slice().try_into().ok()?);
    usize::try_from(count).ok()
}
