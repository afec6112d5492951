//! The HTTP filter: per request, the service and its ordered candidate hosts.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use zklb_wire::{ErrorBody, Service, Version};

use crate::config::RouterConfig;
use crate::plan::plan_request;
use crate::shared::{service_key, Index, INDEX_KEY, VERSION_KEY};
use crate::table::ServiceTable;

/// One per worker: that worker's copy of the service table, shared by its requests.
pub struct RouterRoot {
    config: Rc<RouterConfig>,
    table: Rc<RefCell<LoadedTable>>,
    rng: Rc<RefCell<SmallRng>>,
}

/// The worker's service table, the versions of its services, and the shared-data version it
/// was loaded from.
#[derive(Default)]
struct LoadedTable {
    table: ServiceTable,
    services: BTreeMap<String, Version>,
    /// `None` until the poller's first list is loaded.
    version: Option<Vec<u8>>,
}

impl LoadedTable {
    /// Loads what moved if the poller's version did. Checked on every request: one small
    /// shared-data read, so that a worker routes by a new list as soon as the poller has it,
    /// not on a timer; then only the services whose version moved are read and parsed.
    fn refresh(&mut self) {
        let Ok((Some(version), _)) = hostcalls::get_shared_data(VERSION_KEY) else {
            return;
        };
        if self.version.as_ref() == Some(&version) {
            return;
        }
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
        self.version = Some(version);
    }

    /// The table, once a list has been loaded.
    fn loaded(&self) -> Option<&ServiceTable> {
        self.version.as_ref().map(|_| &self.table)
    }
}

impl RouterRoot {
    pub fn start(config: RouterConfig) -> RouterRoot {
        RouterRoot {
            config: Rc::new(config),
            table: Rc::new(RefCell::new(LoadedTable::default())),
            rng: Rc::new(RefCell::new(seeded_rng())),
        }
    }

    pub fn request_context(&self) -> Request {
        Request {
            config: Rc::clone(&self.config),
            table: Rc::clone(&self.table),
            rng: Rc::clone(&self.rng),
            candidates: None,
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
    table: Rc<RefCell<LoadedTable>>,
    rng: Rc<RefCell<SmallRng>>,
    /// The candidates written for this request, kept for the debug headers.
    candidates: Option<String>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Whatever the client sent in our headers must never steer routing.
        self.set_http_request_header(zklb_wire::CANDIDATES_HEADER, None);
        self.set_http_request_header(zklb_wire::CLUSTER_HEADER, None);

        // As bytes: the SDK's string getter panics on a header that is not UTF-8. Such a host
        // names no service, and is refused as unknown.
        let authority = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":authority")
            .ok()
            .flatten()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        self.table.borrow_mut().refresh();
        let planned = plan_request(
            self.table.borrow().loaded(),
            &authority,
            &self.config,
            &mut *self.rng.borrow_mut(),
        );
        match planned {
            Ok(plan) => {
                self.set_http_request_header(zklb_wire::CLUSTER_HEADER, Some(&plan.cluster));
                self.set_http_request_header(zklb_wire::CANDIDATES_HEADER, Some(&plan.candidates));
                if self.config.debug_headers {
                    self.candidates = Some(plan.candidates);
                }
                Action::Continue
            }
            Err(refusal) => {
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

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(candidates) = self.candidates.take() else {
            return Action::Continue;
        };
        self.set_http_response_header(zklb_wire::CANDIDATES_HEADER, Some(&candidates));
        let upstream = hostcalls::get_property(vec!["upstream", "address"])
            .ok()
            .flatten()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        if let Some(upstream) = upstream {
            self.set_http_response_header(zklb_wire::UPSTREAM_HEADER, Some(&upstream));
        }
        Action::Continue
    }
}
