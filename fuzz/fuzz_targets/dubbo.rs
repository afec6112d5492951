//! Dubbo provider URLs, which are znode names: the interface, then the provider's znode name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zklb_formats::dubbo;

fuzz_target!(|input: &[u8]| {
    let ([interface, znode], _) = zklb_fuzz::lines::<2>(input);
    let _ = dubbo::decode(interface, znode);
});
