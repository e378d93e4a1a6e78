//! Config parsing and validation on arbitrary text: no panic; an error is one line
//! naming the file; accepted settings are within the documented bounds.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = rackboot::config::parse_duration(text);
    match rackboot::config::from_str(Path::new("fuzz.toml"), text) {
        Ok(s) => {
            assert!((512..=65464).contains(&s.tftp.max_blksize));
            assert!((1..=256).contains(&s.tftp.max_windowsize));
            assert!(s.tftp.max_transfers_per_client >= 1);
            assert!(!s.sync.interval.is_zero() && !s.drain_timeout.is_zero());
        }
        Err(e) => {
            let line = e.to_string();
            assert!(line.starts_with("fuzz.toml: "), "{line:?}");
            assert!(!line.contains('\n'), "a multi-line error: {line:?}");
        }
    }
});
