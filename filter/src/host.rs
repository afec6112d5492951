//! Reads of what Envoy knows about the current request, for the router and the learner.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

pub fn request_header(name: &str) -> Option<String> {
    header_value(MapType::HttpRequestHeaders, name)
}

/// A header, read as bytes: the SDK's string getter panics on a value that is not UTF-8. Such a
/// value names no service, and is refused as unknown.
pub fn header_value(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// How many attempts Envoy made for this request (attempt k went to candidate k), from its
/// `upstream.request_attempt_count` attribute: an unsigned 64-bit integer, in the host's byte
/// order.
pub fn attempt_count() -> Option<usize> {
    let bytes = hostcalls::get_property(vec!["upstream", "request_attempt_count"])
        .ok()
        .flatten()?;
    let count = u64::from_le_bytes(bytes.as_slice().try_into().ok()?);
    usize::try_from(count).ok()
}

/// The attempts Envoy made and the status it answered with (0 when unknown).
pub fn attempts_and_status() -> (Option<usize>, u32) {
    let status = header_value(MapType::HttpResponseHeaders, ":status")
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    (attempt_count(), status)
}

/// The `ip:port` of the upstream that answered, if one did.
pub fn upstream_address() -> Option<String> {
    hostcalls::get_property(vec!["upstream", "address"])
        .ok()
        .flatten()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}
