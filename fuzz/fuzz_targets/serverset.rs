//! Finagle/Aurora ServerSets: a member's znode name, the named endpoint to route to (none when
//! empty), then the data, read both as a member and as a weight vector.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zklb_formats::serverset;

fuzz_target!(|input: &[u8]| {
    let ([znode, endpoint], data) = zklb_fuzz::lines::<2>(input);
    let endpoint = Some(endpoint).filter(|endpoint| !endpoint.is_empty());
    let _ = serverset::decode_member(znode, data, endpoint);
    let _ = serverset::decode_vector(data);
});
