//! The singleton that long-polls the control plane through Envoy and publishes the service list
//! into shared data for every worker.

use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use zklb_wire::{ServiceChanges, Version};

use crate::answer::{self, PollError};
use crate::config::PollerConfig;
use crate::metrics::{self, Metrics};
use crate::shared::{service_key, Index, Publication, INDEX_KEY, VERSION_KEY};

/// Extra time Envoy gives a poll beyond the control plane's hold, so that a held poll ends with
/// the control plane's answer rather than a local timeout.
const POLL_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

pub struct Poller {
    config: PollerConfig,
    /// The version last published, sent back so the control plane holds the poll until a change.
    published: Option<Version>,
    /// What has been published, service by service.
    index: Index,
    /// When the control plane last read ZooKeeper for the list published, in ms since the epoch.
    last_sync_ms: Option<i64>,
    metrics: Metrics,
    in_flight: bool,
    /// After a failed poll, no new one starts before this instant.
    next_attempt: Option<SystemTime>,
    /// This Envoy's node id, sent with every poll: the control plane answers once this Envoy
    /// has the clusters and members of the list, so requests never reach a cluster that Envoy
    /// does not have yet.
    node: Option<String>,
    /// The reason of the failure the last poll ended in, if it failed: logged when it changes.
    failing: Option<&'static str>,
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
            index: Index::default(),
            last_sync_ms: None,
            metrics: Metrics::default(),
            in_flight: false,
            next_attempt: None,
            node: node_id(),
            failing: None,
        };
        poller.poll();
        poller
    }

    pub fn on_tick(&mut self) {
        if let Some(last_sync_ms) = self.last_sync_ms {
            let now_ms = now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as i64);
            let age = (now_ms - last_sync_ms).max(0) / 1_000;
            self.metrics.set("zklb.list_age_seconds", age as u64);
        }
        let due = self.next_attempt.is_none_or(|at| now() >= at);
        if !self.in_flight && due {
            self.poll();
        }
    }

    fn poll(&mut self) {
        let path = poll_path(self.published, self.config.wait, self.node.as_deref());
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
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.in_flight = false;
        match self.take_answer(headers, body_size) {
            Ok(()) => {
                if let Some(reason) = self.failing.take() {
                    log::info!(
                        "zklb poller: taking the control plane's lists again (after {reason})"
                    );
                }
                self.poll();
            }
            Err(error) => {
                self.metrics
                    .count(&format!("zklb.poll_errors.{}", error.reason()), 1);
                // Once per change of reason: a control plane that keeps failing the same way
                // every retry interval would flood the log.
                if self.failing != Some(error.reason()) {
                    log::warn!("zklb poller: keeping the last good service list: {error}");
                    self.failing = Some(error.reason());
                }
                self.metrics.flush();
                self.back_off();
            }
        }
    }

    /// Publishes what a poll's answer says changed (nothing for a 304), or says why it cannot
    /// be taken; the last good list stays in shared data then.
    fn take_answer(&mut self, headers: usize, body_size: usize) -> Result<(), PollError> {
        // A reset, a refused connection, a local timeout or a body above Envoy's own buffer
        // limit arrive without headers; asking for them then makes the SDK panic (the host
        // answers BadArgument), which would crash the VM.
        if headers == 0 {
            return Err(PollError::Unreachable);
        }
        // As bytes: the SDK's string getter panics on a value that is not UTF-8.
        let status = hostcalls::get_map_value_bytes(
            proxy_wasm::types::MapType::HttpCallResponseHeaders,
            ":status",
        )
        .ok()
        .flatten();
        match status.as_deref() {
            Some(b"200") => {
                answer::check_size(body_size, self.config.max_list_bytes)?;
                let body = hostcalls::get_buffer(
                    proxy_wasm::types::BufferType::HttpCallResponseBody,
                    0,
                    body_size,
                )
                .ok()
                .flatten()
                .unwrap_or_default();
                let changes = answer::parse_changes(&body)?;
                self.publish(&changes)
            }
            // Nothing changed during the hold.
            Some(b"304") => Ok(()),
            Some(other) => Err(PollError::Status(
                String::from_utf8_lossy(other).into_owned(),
            )),
            None => Err(PollError::Unreachable),
        }
    }

    /// Publishes what changed into shared data.
    fn publish(&mut self, changes: &ServiceChanges) -> Result<(), PollError> {
        let publication = self.index.apply(changes);
        if let Err(status) = store(&publication) {
            // What workers can read no longer matches the index: start over from a full list.
            self.index = Index::default();
            self.published = None;
            return Err(PollError::NotStored(format!("{status:?}")));
        }
        if self.published != Some(changes.version) {
            log::info!(
                "zklb poller: published version {} ({} services, {} changed, {} removed)",
                changes.version,
                self.index.services.len(),
                publication.services.len(),
                publication.cleared.len()
            );
        }
        self.published = Some(changes.version);
        self.last_sync_ms = changes.freshness.last_sync;
        self.metrics.set(
            metrics::LIST_VERSION,
            u64::try_from(changes.version).unwrap_or(0),
        );
        self.metrics.add(metrics::SHARED_CHANGES, 1);
        Ok(())
    }

    fn back_off(&mut self) {
        self.next_attempt = Some(now() + self.config.retry_interval);
    }
}

/// Writes the services first and the index's version last, so that a worker that sees the new
/// version finds every service it names.
fn store(publication: &Publication) -> Result<(), proxy_wasm::types::Status> {
    for (name, json) in &publication.services {
        hostcalls::set_shared_data(&service_key(name), Some(json), None)?;
    }
    for name in &publication.cleared {
        // Shared data cannot forget a key; an empty value frees what the service held.
        hostcalls::set_shared_data(&service_key(name), Some(&[]), None)?;
    }
    hostcalls::set_shared_data(INDEX_KEY, Some(&publication.index), None)?;
    let version = publication.version.to_string();
    hostcalls::set_shared_data(VERSION_KEY, Some(version.as_bytes()), None)
}

/// This Envoy's node id (Envoy's `xds.node` attribute).
fn node_id() -> Option<String> {
    let id = hostcalls::get_property(vec!["xds", "node", "id"])
        .ok()
        .flatten()?;
    String::from_utf8(id).ok().filter(|id| !id.is_empty())
}

/// The list request: the whole list at first, then a long-poll for the next version.
fn poll_path(published: Option<Version>, wait: Duration, node: Option<&str>) -> String {
    let mut path = match published {
        Some(version) => format!("/v1/changes?after={version}&wait={}", wait.as_secs()),
        None => "/v1/changes".to_string(),
    };
    if let Some(node) = node {
        path.push(if published.is_some() { '&' } else { '?' });
        path.push_str("node=");
        path.push_str(&percent_encode(node));
    }
    path
}

/// Encodes every byte of a query value but the unreserved ones (RFC 3986).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

fn tick_period(config: &PollerConfig) -> Duration {
    config.retry_interval.min(Duration::from_secs(1))
}

/// The host's clock: proxy-wasm offers it to every plugin, whatever the runtime's WASI support.
fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_name_the_version_held_and_the_node() {
        let wait = Duration::from_secs(30);
        assert_eq!(poll_path(None, wait, None), "/v1/changes");
        assert_eq!(
            poll_path(None, wait, Some("envoy-1")),
            "/v1/changes?node=envoy-1"
        );
        assert_eq!(
            poll_path(Some(42), wait, Some("pod a/b&c")),
            "/v1/changes?after=42&wait=30&node=pod%20a%2Fb%26c"
        );
    }
}
