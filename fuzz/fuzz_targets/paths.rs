//! Request path cleaning (TFTP file names, HTTP paths, stream paths): whatever the
//! input, a cleaned path is relative, has no `.`, `..` or empty segment, and cleaning
//! it again changes nothing, so it cannot leave the served root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rackboot::simplestreams::RelPath;

fn assert_contained(p: &str, what: &str) {
    assert!(!p.is_empty() && !p.starts_with('/'), "{what}: {p:?}");
    for seg in p.split('/') {
        assert!(
            !matches!(seg, "" | "." | ".."),
            "{what}: segment {seg:?} in {p:?}"
        );
        assert!(!seg.contains('\0'), "{what}: NUL in {p:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(p) = rackboot::tftp::path::clean(&s) {
        assert_contained(&p, "tftp");
        assert!(
            !p.contains('\\') && !p.chars().any(char::is_control),
            "tftp: {p:?}"
        );
        assert_eq!(rackboot::tftp::path::clean(&p).as_ref(), Ok(&p));
    }
    if let Ok(p) = rackboot::http::files::clean_path(&s) {
        if !p.is_empty() {
            assert_contained(&p, "http");
        }
    }
    if let Some(r) = RelPath::parse(&s) {
        assert_contained(r.as_str(), "stream");
        assert_eq!(RelPath::parse(r.as_str()).as_ref(), Some(&r));
    }
});
