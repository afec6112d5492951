//! A proxy-wasm HTTP filter that lets every request through untouched. Envoy still creates a
//! context per request and calls into the VM for each callback the SDK exports, so measuring it
//! against plain Envoy gives the cost of having any wasm filter at all.

use proxy_wasm::traits::{Context, HttpContext};

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Noop) });
}}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}
