//! systemd integration without libsystemd: `sd_notify` over `$NOTIFY_SOCKET`, the
//! watchdog period from `$WATCHDOG_USEC`, and sockets passed by socket activation
//! (`$LISTEN_FDS`, `$LISTEN_FDNAMES`). A failed notify is logged, never fatal.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends a notification (`READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`).
/// Does nothing when not started by systemd with `Type=notify`.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(abstract_name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("systemd notify {state:?} failed: {e}");
    }
}

/// Half the watchdog timeout, if systemd asked for keep-alives.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// A socket passed by systemd.
pub enum Activated {
    Udp(std::net::UdpSocket),
    Tcp(std::net::TcpListener),
    /// A stream socket named `https` (`FileDescriptorName=https` in the socket unit):
    /// served with TLS.
    Https(std::net::TcpListener),
}

/// Takes the sockets passed with socket activation (fds 3…), if any are for us.
pub fn activated_sockets() -> Vec<Activated> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count: RawFd = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !for_us || count <= 0 {
        return vec![];
    }
    // The names are colon-separated, one per descriptor, when the unit sets them.
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    // SAFETY-free alternative is not available: systemd hands us raw descriptors.
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDNAMES");
    let mut out = Vec::new();
    for (i, fd) in (3..3 + count).enumerate() {
        let https = names.get(i).is_some_and(|n| n == "https");
        // SAFETY: systemd passes these descriptors to this process, open and owned
        // by nobody else; we take ownership exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let kind = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::SockType);
        match kind {
            Ok(nix::sys::socket::SockType::Datagram) => out.push(Activated::Udp(owned.into())),
            Ok(nix::sys::socket::SockType::Stream) if https => {
                out.push(Activated::Https(owned.into()))
            }
            Ok(nix::sys::socket::SockType::Stream) => out.push(Activated::Tcp(owned.into())),
            other => tracing::warn!("ignoring passed fd {fd} of socket type {other:?}"),
        }
    }
    out
}
