//! The HTTP filter: per request, the service and its ordered candidate hosts.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use zklb_wire::{ErrorBody, ServiceSet};

use crate::config::RouterConfig;
use crate::plan::plan_request;
use crate::table::ServiceTable;
use crate::{SERVICES_KEY, SERVICES_VERSION_KEY};

/// One per worker: keeps that worker's copy of the service table fresh.
pub struct RouterRoot {
    config: Rc<RouterConfig>,
    table: Rc<RefCell<Option<ServiceTable>>>,
    rng: Rc<RefCell<SmallRng>>,
    /// The shared-data version last loaded, so an unchanged list is not parsed again.
    loaded_version: Option<Vec<u8>>,
}

impl RouterRoot {
    pub fn start(config: RouterConfig) -> RouterRoot {
        if let Err(status) = hostcalls::set_tick_period(config.refresh_interval) {
            log::error!("zklb router: cannot set tick period: {status:?}");
        }
        let mut root = RouterRoot {
            config: Rc::new(config),
            table: Rc::new(RefCell::new(None)),
            rng: Rc::new(RefCell::new(seeded_rng())),
            loaded_version: None,
        };
        root.refresh();
        root
    }

    pub fn on_tick(&mut self) {
        self.refresh();
    }

    fn refresh(&mut self) {
        let Ok((Some(version), _)) = hostcalls::get_shared_data(SERVICES_VERSION_KEY) else {
            return;
        };
        if self.loaded_version.as_ref() == Some(&version) {
            return;
        }
        let Ok((Some(body), _)) = hostcalls::get_shared_data(SERVICES_KEY) else {
            return;
        };
        match serde_json::from_slice::<ServiceSet>(&body) {
            Ok(set) => {
                *self.table.borrow_mut() = Some(ServiceTable::from_service_set(&set));
                self.loaded_version = Some(version);
            }
            Err(error) => log::error!("zklb router: shared service list does not parse: {error}"),
        }
    }

    pub fn request_context(&self) -> Request {
        Request {
            config: Rc::clone(&self.config),
            table: Rc::clone(&self.table),
            rng: Rc::clone(&self.rng),
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
    table: Rc<RefCell<Option<ServiceTable>>>,
    rng: Rc<RefCell<SmallRng>>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Whatever the client sent in our headers must never steer routing.
        self.set_http_request_header(zklb_wire::CANDIDATES_HEADER, None);
        self.set_http_request_header(zklb_wire::CLUSTER_HEADER, None);

        let authority = self
            .get_http_request_header(":authority")
            .unwrap_or_default();
        let planned = plan_request(
            self.table.borrow().as_ref(),
            &authority,
            self.config.candidates,
            &mut *self.rng.borrow_mut(),
        );
        match planned {
            Ok(plan) => {
                self.set_http_request_header(zklb_wire::CLUSTER_HEADER, Some(&plan.cluster));
                self.set_http_request_header(zklb_wire::CANDIDATES_HEADER, Some(&plan.candidates));
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
}
