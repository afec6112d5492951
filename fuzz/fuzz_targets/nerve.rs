//! Airbnb Nerve instance JSON: the znode name, then its data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zklb_formats::nerve;

fuzz_target!(|input: &[u8]| {
    let ([znode], data) = zklb_fuzz::lines::<1>(input);
    let _ = nerve::decode(znode, data);
});
