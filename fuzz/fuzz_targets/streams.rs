//! SimpleStreams parse → select → plan on an arbitrary products document (and index):
//! no panic, and every path the plan would create in the snapshot stays under its
//! root (a clean relative path), whatever the stream says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rackboot::config::Selection;
use rackboot::simplestreams::{self, RelPath};
use rackboot::verify;

fn contained(p: &str) -> bool {
    RelPath::parse(p).is_some_and(|r| r.as_str() == p)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = simplestreams::parse_index(text);
    let Ok(products) = simplestreams::parse_products(text, "c") else {
        return;
    };
    let all = |os: &str| Selection {
        os: os.into(),
        release: "*".into(),
        arches: vec!["*".into()],
        subarches: vec!["*".into()],
        labels: vec!["*".into()],
    };
    let v =
        verify::accept_unsigned(String::new(), verify::unsigned_for_fuzzing()).map(|_| products);
    let sources = vec![(vec![v], vec![all("*"), all("ubuntu")])];
    let selected = rackboot::select::select(&sources);
    let _ = rackboot::select::catalog(&sources);
    for have in [false, true] {
        let plan = rackboot::plan::plan(&selected, &|_| have);
        for path in plan.files.keys() {
            assert!(contained(path), "planned file {path:?} leaves the root");
        }
        for a in &plan.archives {
            assert!(contained(&a.dir), "archive dir {:?} leaves the root", a.dir);
        }
        for item in plan.fetch.iter().chain(&plan.have) {
            assert!(
                contained(item.path.as_str()),
                "upstream path {:?}",
                item.path
            );
        }
    }
});
