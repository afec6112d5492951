//! Curator x-discovery instance JSON: service name, znode name, then the znode's data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zklb_formats::curator;

fuzz_target!(|input: &[u8]| {
    let ([service, znode], data) = zklb_fuzz::lines::<2>(input);
    let _ = curator::decode(service, znode, data);
});
