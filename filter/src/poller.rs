//! The singleton that long-polls the control plane through Envoy and publishes the service list
//! into shared data for every worker.

use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use zklb_wire::ServiceSet;

use crate::config::PollerConfig;
use crate::{SERVICES_KEY, SERVICES_VERSION_KEY};

/// Extra time Envoy gives a poll beyond the control plane's hold, so that a held poll ends with
/// the control plane's answer rather than a local timeout.
const POLL_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

pub struct Poller {
    config: PollerConfig,
    /// The version last published, sent back so the control plane holds the poll until a change.
    published: Option<zklb_wire::Version>,
    in_flight: bool,
    /// After a failed poll, no new one starts before this instant.
    next_attempt: Option<SystemTime>,
}

impl Poller {
    pub fn start(config: PollerConfig) -> Poller {
        // Ticks only restart polling after a failure; a successful poll starts the next at once.
        if let Err(status) = hostcalls::set_tick_period(tick_period(&config)) {
            log::error!("zklb poller: cannot set tick period: {status:?}");
        }
        let mut poller = Poller {
            config,
            published: None,
            in_flight: false,
            next_attempt: None,
        };
        poller.poll();
        poller
    }

    pub fn on_tick(&mut self) {
        let due = self.next_attempt.is_none_or(|at| now() >= at);
        if !self.in_flight && due {
            self.poll();
        }
    }

    fn poll(&mut self) {
        let path = match self.published {
            Some(version) => format!(
                "/v1/services?after={version}&wait={}",
                self.config.wait.as_secs()
            ),
            None => "/v1/services".to_string(),
        };
        let headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", "zklb-control-plane"),
        ];
        match hostcalls::dispatch_http_call(
            &self.config.control_plane_cluster,
            headers,
            None,
            vec![],
            self.config.wait + POLL_TIMEOUT_MARGIN,
        ) {
            Ok(_token) => self.in_flight = true,
            Err(status) => {
                log::warn!(
                    "zklb poller: cannot call cluster {}: {status:?}",
                    self.config.control_plane_cluster
                );
                self.back_off();
            }
        }
    }

    pub fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.in_flight = false;
        let status = hostcalls::get_map_value(
            proxy_wasm::types::MapType::HttpCallResponseHeaders,
            ":status",
        )
        .ok()
        .flatten();
        match status.as_deref() {
            Some("200") => {
                let body = hostcalls::get_buffer(
                    proxy_wasm::types::BufferType::HttpCallResponseBody,
                    0,
                    body_size,
                )
                .ok()
                .flatten()
                .unwrap_or_default();
                if self.publish(&body) {
                    self.poll();
                } else {
                    self.back_off();
                }
            }
            // Nothing changed during the hold.
            Some("304") => self.poll(),
            Some(other) => {
                log::warn!("zklb poller: control plane answered {other}");
                self.back_off();
            }
            // A reset, a refused connection or a local timeout arrive without headers.
            None => {
                log::warn!("zklb poller: control plane unreachable");
                self.back_off();
            }
        }
    }

    /// Publishes a list that parses, and keeps the last good one otherwise.
    fn publish(&mut self, body: &[u8]) -> bool {
        let set: ServiceSet = match serde_json::from_slice(body) {
            Ok(set) => set,
            Err(error) => {
                log::error!("zklb poller: ignoring a service list that does not parse: {error}");
                return false;
            }
        };
        let version = set.version.to_string();
        let stored = hostcalls::set_shared_data(SERVICES_KEY, Some(body), None).and_then(|()| {
            hostcalls::set_shared_data(SERVICES_VERSION_KEY, Some(version.as_bytes()), None)
        });
        if let Err(status) = stored {
            log::error!("zklb poller: cannot store the service list: {status:?}");
            return false;
        }
        if self.published != Some(set.version) {
            log::info!(
                "zklb poller: published version {} ({} services)",
                set.version,
                set.services.len()
            );
        }
        self.published = Some(set.version);
        true
    }

    fn back_off(&mut self) {
        self.next_attempt = Some(now() + self.config.retry_interval);
    }
}

fn tick_period(config: &PollerConfig) -> Duration {
    config.retry_interval.min(Duration::from_secs(1))
}

/// The host's clock: proxy-wasm offers it to every plugin, whatever the runtime's WASI support.
fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
}
