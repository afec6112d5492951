//! A list answer from the control plane, down the path the filter takes it: parsed by the
//! poller, applied to the shared index, each service's shared JSON read back by a worker into
//! its service table, and looked up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zklb_filter::answer;
use zklb_filter::shared::Index;
use zklb_filter::table::ServiceTable;
use zklb_wire::Service;

fuzz_target!(|data: &[u8]| {
    let Ok(changes) = answer::parse_changes(data) else {
        return;
    };
    let mut index = Index::default();
    let publication = index.apply(&changes);
    let mut table = ServiceTable::default();
    for (name, json) in &publication.services {
        let service: Service =
            serde_json::from_slice(json).expect("what the poller shares, a worker reads");
        table.upsert(&service);
        let _ = table.lookup(name);
    }
    for name in &publication.cleared {
        table.remove(name);
    }
});
