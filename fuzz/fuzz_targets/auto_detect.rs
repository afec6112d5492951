//! Format detection and every decoder behind it: a tree of znodes under one root read in `auto`,
//! each service that a change to one of them touches read as the registry reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zklb_formats::tree::{child_path, Tree, Znode};
use zklb_formats::{self as formats, RegistrySpec};

const ROOT: &str = "/services";

fuzz_target!(|input: &[u8]| {
    let Ok(spec) = format!("{ROOT}=auto:http").parse::<RegistrySpec>() else {
        return;
    };
    let mut tree = Tree::default();
    tree.put(ROOT, Znode::default());
    let mut paths = Vec::new();
    // Only paths ZooKeeper would accept: no empty, `.` or `..` segment.
    let valid = |relative: &str| {
        relative
            .split('/')
            .all(|segment| !matches!(segment, "" | "." | ".."))
    };
    let records = zklb_fuzz::znodes(input).filter(|(relative, _)| valid(relative));
    for (zxid, (relative, data)) in (1..).zip(records) {
        let path = child_path(ROOT, relative);
        let znode = Znode {
            czxid: zxid,
            mzxid: zxid,
            pzxid: zxid,
            num_children: 0,
            data: data.to_vec(),
        };
        tree.put(&path, znode);
        paths.push(path);
    }
    for path in &paths {
        if formats::is_ignored(&spec, path) {
            continue;
        }
        for service in formats::affected_services(&spec, path) {
            let _ = formats::read_service(&spec, &tree, &service);
        }
    }
});
