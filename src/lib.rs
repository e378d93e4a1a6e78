//! rackboot: the boot server of a rack.
//!
//! Data flow (modules in pipeline order):
//! upstream → verify → simplestreams → select → plan → download/archive → store → serve.
//! `simplestreams`, `select` and `plan` are pure (no I/O, no clock); `sync` drives the
//! pipeline; the servers only read the published snapshot.

/// Declares a module with no panic path: `unwrap`, `expect`, indexing and slicing,
/// `panic!`, `unreachable!`, `todo!` and `unimplemented!` are denied in it outside
/// tests. For the modules that read packets from the network (`dhcp`, `tftp`, `pktinfo`),
/// where one bad packet must not end a listener or a transfer thread.
macro_rules! no_panic_path {
    ($(#[$attr:meta])* pub mod $name:ident;) => {
        $(#[$attr])*
        #[deny(
            clippy::unwrap_used,
            clippy::expect_used,
            clippy::indexing_slicing,
            clippy::panic,
            clippy::unreachable,
            clippy::todo,
            clippy::unimplemented
        )]
        #[cfg_attr(
            test,
            allow(
                clippy::unwrap_used,
                clippy::expect_used,
                clippy::indexing_slicing,
                clippy::panic
            )
        )]
        pub mod $name;
    };
}

/// Bootloader archive unpacking into the blob store.
pub mod archive;
/// Typed pxelinux/GRUB/iPXE configs; escaping of outside strings (pure).
pub mod bootcfg;
/// The command line.
pub mod cli;
/// Configuration file, drop-ins and validated settings.
pub mod config;
no_panic_path! {
    /// ProxyDHCP for PXE and HTTP boot clients (UDP 67 and 4011).
    pub mod dhcp;
}
/// Streaming, resumable, hash-checked downloads into the blob store.
pub mod download;
/// The class of a served file (labels per-class counters).
pub mod file_class;
/// `rackboot fsck`: re-hash blobs, check snapshots, `current` and state files.
pub mod fsck;
/// Opening files below a root without escaping it.
pub mod fsutil;
/// HTTP server core and static files.
pub mod http;
/// Per-MAC boot settings.
pub mod machines;
/// `rackboot mirror`: sstream-mirror's job (filters, --max, byte-identical metadata).
pub mod mirror;
no_panic_path! {
    /// UDP datagrams with their packet info (`IP_PKTINFO`): what `dhcp` and `tftp` share.
    pub mod pktinfo;
}
/// Selection + store contents → what to fetch and the snapshot layout (pure).
pub mod plan;
/// The re-exported stream's plain `.json` documents beside the `.sjson` ones.
pub mod reexport;
/// Boot-source selections → selected products (pure).
pub mod select;
/// `rackboot serve`: the daemon (sockets, sync loop, signals) and what it serves:
/// routes, boot configs, `/metrics`, the Images page.
pub mod serve;
/// SimpleStreams documents → domain types (pure).
pub mod simplestreams;
/// Sources and sync state files.
pub mod state;
/// Blobs, snapshots, `current`, GC and the sync lock.
pub mod store;
/// One sync run, end to end.
pub mod sync;
/// sd_notify, watchdog and socket activation.
pub mod systemd;
no_panic_path! {
    /// TFTP server: pure protocol engine + tokio driver.
    pub mod tftp;
}
/// Fetching metadata and payloads from an upstream mirror (HTTP(S), file://).
pub mod upstream;
/// OpenPGP verification; the only producer of `Verified` documents.
pub mod verify;

/// rackboot's version: the crate's, then `+SUFFIX` when the build had
/// `RACKBOOT_VERSION_SUFFIX=SUFFIX` in its environment (a build of the same source that
/// must say it is another one, as the appliance image check's "v2" update).
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| match option_env!("RACKBOOT_VERSION_SUFFIX") {
        Some(s) if !s.is_empty() => format!("{}+{s}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    })
}
