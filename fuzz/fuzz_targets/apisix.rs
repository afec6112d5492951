//! apisix-seed node lists: a service znode's data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zklb_formats::apisix;

fuzz_target!(|data: &[u8]| {
    let _ = apisix::decode(data);
});
