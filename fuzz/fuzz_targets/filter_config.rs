//! The filter's plugin configuration, as Envoy hands it to `on_configure`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zklb_filter::config::PluginConfig;

fuzz_target!(|data: &[u8]| {
    let _ = PluginConfig::parse(data);
});
