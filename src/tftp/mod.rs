//! The TFTP server (read-only): RFC 1350 with options (RFC 2347 OACK, 2348 blksize,
//! 2349 tsize/timeout, 7440 windowsize), block-number rollover, replies from the
//! address a request was sent to.
//!
//! Written as an I/O-free protocol engine (`packet`, `path`, `engine`: pure) driven by
//! tokio (`server`). async-tftp was not used: it runs on async-std/async-io rather
//! than tokio, its handler never learns which local address a request was sent to,
//! and it binds transfer sockets from the listener address, so a wildcard listener
//! cannot reply from the address the client talked to.

pub mod engine;
pub mod packet;
pub mod path;
pub mod server;

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

pub use server::{
    from_beneath, open_under, serve, DirResolver, OpenError, Resolver, Source, TftpConfig,
    TftpMetrics,
};
