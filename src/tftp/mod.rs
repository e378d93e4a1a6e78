//! The TFTP server (read-only): RFC 1350 with options (RFC 2347 OACK, 2348 blksize,
//! 2349 tsize/timeout, 7440 windowsize), block-number rollover, replies from the
//! address a request was sent to.
//!
//! Written as an I/O-free protocol engine (`packet`, `path`, `engine`: pure) driven by
//! the server: `server` (settings, counters, start, drain, stop), `listen` (listeners
//! with packet info, dispatch to a transfer thread), `worker` (the epoll transfer
//! threads), `window` (a window read with `preadv`, sent with UDP GSO or `sendmmsg`)
//! and `netascii`. `resolver` is the interface the rest of the crate plugs in: what a
//! path serves. async-tftp was not used: it runs on async-std/async-io rather than
//! tokio, its handler never learns which local address a request was sent to, and it
//! binds transfer sockets from the listener address, so a wildcard listener cannot
//! reply from the address the client talked to.
//!
//! No panic path: one transfer thread serves many machines, so a panic on packet
//! input would end all their transfers and the thread (catching it per transfer would
//! not be enough; see ARCHITECTURE.md, Trust boundaries). So this
//! module denies `unwrap`, `expect`, indexing and slicing, `panic!`, `unreachable!`
//! (tests excepted; `no_panic_path!` in `lib.rs` declares the module) and handles every case: a malformed packet is a `ParseError`, an
//! impossible state is an I/O error that ends one transfer. Arithmetic on block
//! numbers and offsets saturates or is bounded by the negotiated sizes. The fuzz
//! targets in `fuzz/` (`cargo xtask fuzz`) drive the parser and the engine with
//! arbitrary input to back this up.

pub mod engine;
mod listen;
mod netascii;
pub mod packet;
pub mod path;
mod resolver;
mod server;
mod window;
mod worker;

/// Proptest settings for the fuzz-style properties: `cases` by default (bounded, so CI
/// time stays bounded), or `RACKBOOT_FUZZ_CASES` for a longer local run.
#[cfg(test)]
pub(crate) fn fuzz_config(cases: u32) -> proptest::prelude::ProptestConfig {
    let cases = std::env::var("RACKBOOT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    proptest::prelude::ProptestConfig {
        cases,
        // Shrinking is for debugging a failure, not for CI time.
        max_shrink_iters: 2048,
        ..proptest::prelude::ProptestConfig::default()
    }
}

/// Bytes of a recognisable pattern (no period a block size would hide), for tests
/// that compare what arrived with what was sent.
#[cfg(test)]
pub(crate) fn test_pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
        .collect()
}

pub use resolver::{
    from_beneath, open_under, DirResolver, Ending, Finished, OpenError, Resolver, Source,
};
pub use server::{serve, TftpConfig, TftpMetrics};
