//! ProxyDHCP for PXE and UEFI HTTP boot clients (`[dhcp] proxy = true`): beside the
//! site's DHCP server, which hands out the addresses, the rack answers boot clients
//! with offers that assign nothing and name the rack and a boot file, so no one has
//! to edit the site's DHCP. DHCPv4 only.
//!
//! `proxy` is the decision (pure: parsed request + interface address + policy +
//! per-MAC override → reply bytes or a drop reason); `server` the sockets on UDP 67
//! and 4011 (`IP_PKTINFO` says which interface a request came in on; requests from
//! interfaces not listed are dropped). The daemon (`serve/`) hands the server a
//! [`Hooks`] object for what this transport cannot know: per-MAC overrides, the HTTP
//! port, and where answered and dropped requests are reported.
//!
//! No panic path, as in `tftp/`: one bad packet must not end the listener (and with
//! it the daemon), so `unwrap`, `expect`, indexing and `panic!` are denied here
//! outside tests (`no_panic_path!` in `lib.rs` declares the module). Messages are read with `dhcproto`'s borrowed (lazy) decoder and
//! only the options used are decoded (its eager decoder `debug_assert`s option
//! lengths that come from the packet); replies are built with its encoder.

pub mod proxy;
pub mod server;

pub use proxy::{DropReason, Override, UefiLoader};
pub use server::{bind, serve, Config, DhcpMetrics, Event, Hooks, Outcome, Sockets};
