//! TFTP packet parsing: any datagram parses or fails cleanly (no panic), and a parsed
//! packet serialises to bytes that parse back to the same packet. A request's file
//! name goes through the path cleaner the server uses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rackboot::tftp::packet::{self, Packet};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = packet::parse(data) else { return };
    let bytes = p.to_bytes();
    assert_eq!(
        packet::parse(&bytes).as_ref(),
        Ok(&p),
        "round trip of {data:?}"
    );
    if let Packet::Rrq(r) | Packet::Wrq(r) = &p {
        if let Ok(clean) = rackboot::tftp::path::clean(&r.filename) {
            assert!(
                !clean.split('/').any(|s| s == ".." || s.is_empty()),
                "{clean:?}"
            );
        }
    }
});
