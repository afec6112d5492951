//! zklb's Envoy filter (proxy-wasm).
//!
//! Three roles share one wasm module and one `vm_id`, so that they share Envoy's shared data:
//! - the **poller** ([`poller`]), a singleton bootstrap service, long-polls the control plane
//!   through Envoy and publishes the service list into shared data;
//! - the **router** ([`router`]), the HTTP filter in every worker, reloads the list as soon as
//!   a request sees its version change and, per request, maps the request to a service ([`table`]) and writes the
//!   ordered candidate hosts ([`balancer`]) that Envoy's `override_host` policy follows;
//! - the **learner** (`learner`), in Envoy's access log, which sees only the requests that
//!   failed somewhere and ejects failing hosts for every worker ([`ejection`]).
//!
//! Everything that decides lives in plain modules that are unit-tested natively; only `poller`,
//! `router`, `learner` and their small host helpers talk to the proxy-wasm host.

pub mod answer;
pub mod balancer;
pub mod config;
pub mod ejection;
mod host;
mod learner;
pub mod plan;
pub mod routing;
pub mod shared;
pub mod table;

mod metrics;
mod poller;
mod router;
mod shared_ejections;

use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

use crate::config::PluginConfig;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::Unconfigured) });
}}

/// A root context whose role is chosen by its plugin configuration.
enum Root {
    Unconfigured,
    Poller(Box<poller::Poller>),
    Router(router::RouterRoot),
    Learner(learner::Learner),
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        trailers: usize,
    ) {
        if let Root::Poller(poller) = self {
            poller.on_http_call_response(token, headers, body_size, trailers);
        }
    }
}

impl RootContext for Root {
    /// Envoy's access log calls the learner's root context for each request it passes on.
    fn on_log(&mut self) {
        if let Root::Learner(learner) = self {
            learner.on_log();
        }
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match PluginConfig::parse(&bytes) {
            Ok(PluginConfig::Poller(config)) => {
                *self = Root::Poller(Box::new(poller::Poller::start(config)));
                true
            }
            Ok(PluginConfig::Router(config)) => {
                *self = Root::Router(router::RouterRoot::start(config));
                true
            }
            Ok(PluginConfig::Learner) => {
                *self = Root::Learner(learner::Learner::start());
                true
            }
            Err(error) => {
                log::error!("zklb: rejecting plugin configuration: {error}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        match self {
            Root::Poller(poller) => poller.on_tick(),
            Root::Router(router) => router.on_tick(),
            Root::Learner(learner) => learner.on_tick(),
            Root::Unconfigured => {}
        }
    }

    fn create_http_context(
        &self,
        _context_id: u32,
    ) -> Option<Box<dyn proxy_wasm::traits::HttpContext>> {
        match self {
            Root::Router(router) => Some(Box::new(router.request_context())),
            _ => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        match self {
            Root::Router(_) => Some(ContextType::HttpContext),
            _ => None,
        }
    }
}
