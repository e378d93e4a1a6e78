//! The ProxyDHCP sockets: UDP 67 (DISCOVER → OFFER, broadcast to port 68 out of the
//! interface the request came in on) and UDP 4011 (REQUEST → ACK, unicast to its
//! source), both on 0.0.0.0 with `IP_PKTINFO`, which tells the interface index and
//! the local address of each request. Only requests from the interfaces in
//! `[dhcp] interfaces` are answered; the rack's address there (the one the kernel
//! chose for replies, if it is that interface's, else its first IPv4 address) is
//! the server named in the reply. Replies are sent with an `in_pktinfo` naming that
//! interface and address, so a broadcast leaves by the right interface whatever the
//! routes say.
//!
//! Interface names are resolved to indexes and addresses from `getifaddrs` at start
//! and again when a request comes from an index not known (at most once a second)
//! or the table is older than five seconds: an interface or address that appears
//! later is picked up without a restart.
//!
//! Every request is counted, and every answer or drop is reported to
//! [`Hooks::answered`]; nothing here logs per packet above debug level.

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, ControlMessage, MsgFlags, SockaddrIn};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::pktinfo;

use super::proxy::{self, Dest, DropReason, Override, Policy, Port, Reply, Request, UefiLoader};

/// What the server needs from the daemon.
pub trait Hooks: Send + Sync {
    /// The machine's boot-file override, if it has one.
    fn override_for(&self, mac: [u8; 6]) -> Option<Override>;
    /// The HTTP port to name in URLs for a client that reached the rack at `server`.
    fn http_port(&self, server: Ipv4Addr) -> u16;
    /// Called for every request received: answered or dropped, and why.
    fn answered(&self, event: &Event<'_>);
}

/// One request and what became of it.
#[derive(Debug)]
pub struct Event<'a> {
    /// Where it came to: 67 or 4011.
    pub port: Port,
    /// The sender (0.0.0.0:68 for a client without an address yet).
    pub source: SocketAddrV4,
    /// The ingress interface, when it is one of the listed ones.
    pub interface: Option<&'a str>,
    /// The request, when it parsed.
    pub request: Option<&'a Request>,
    pub outcome: Outcome<'a>,
}

impl Event<'_> {
    /// The client's MAC, when the request parsed.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.request.map(|r| r.mac)
    }
}

#[derive(Debug)]
pub enum Outcome<'a> {
    /// An OFFER or ACK was sent naming `server` and `boot_file`.
    Replied {
        message: dhcproto::v4::MessageType,
        server: Ipv4Addr,
        boot_file: &'a str,
    },
    /// No answer, for this reason.
    Dropped(DropReason),
    /// The reply was built but could not be sent.
    SendFailed,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DhcpMetrics {
    /// Datagrams received on 67 and 4011.
    pub requests: AtomicU64,
    pub offers: AtomicU64,
    pub acks: AtomicU64,
    pub send_errors: AtomicU64,
    /// By [`DropReason::index`].
    pub drops: [AtomicU64; DropReason::ALL.len()],
}

impl DhcpMetrics {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops
            .get(reason.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The server's settings (`[dhcp]`).
#[derive(Clone, Debug)]
pub struct Config {
    /// Interface names requests are answered on.
    pub interfaces: Vec<String>,
    pub uefi_loader: UefiLoader,
}

/// The two bound sockets.
pub struct Sockets {
    dhcp: std::net::UdpSocket,
    pxe: std::net::UdpSocket,
}

/// Binds UDP 67 and 4011 on 0.0.0.0 (broadcasts allowed, `IP_PKTINFO` on). An error
/// names the port.
pub fn bind() -> Result<Sockets, String> {
    let one = |port: u16| -> Result<std::net::UdpSocket, String> {
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        let s = std::net::UdpSocket::bind(addr)
            .map_err(|e| format!("cannot bind DHCP on {addr}: {e}"))?;
        s.set_broadcast(true)
            .and_then(|()| s.set_nonblocking(true))
            .map_err(|e| format!("DHCP socket on {addr}: {e}"))?;
        pktinfo::enable(&s, false)
            .map_err(|e| format!("DHCP socket on {addr}: IP_PKTINFO: {e}"))?;
        Ok(s)
    };
    Ok(Sockets {
        dhcp: one(proxy::SERVER_PORT)?,
        pxe: one(proxy::PXE_PORT)?,
    })
}

/// One listed interface as last seen.
#[derive(Clone, Debug)]
struct Iface {
    name: String,
    index: u32,
    addrs: Vec<Ipv4Addr>,
}

/// The listed interfaces' indexes and addresses.
struct Interfaces {
    listed: Vec<String>,
    known: Vec<Iface>,
    refreshed: Option<Instant>,
}

const REFRESH_EVERY: Duration = Duration::from_secs(5);
const REFRESH_AT_MOST: Duration = Duration::from_secs(1);

impl Interfaces {
    fn refresh(&mut self) {
        let all: Vec<(String, Ipv4Addr)> = nix::ifaddrs::getifaddrs()
            .map(|it| {
                it.filter_map(|a| {
                    let v4 = a.address.as_ref()?.as_sockaddr_in()?.ip();
                    Some((a.interface_name, v4))
                })
                .collect()
            })
            .unwrap_or_default();
        self.known = self
            .listed
            .iter()
            .filter_map(|name| {
                let index = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
                let addrs = all
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, a)| *a)
                    .collect();
                Some(Iface {
                    name: name.clone(),
                    index,
                    addrs,
                })
            })
            .collect();
        self.refreshed = Some(Instant::now());
    }

    fn age(&self) -> Option<Duration> {
        self.refreshed.map(|t| t.elapsed())
    }

    /// The listed interface with `index` (refreshed when stale), if any.
    fn lookup(&mut self, index: u32) -> Option<Iface> {
        if self.age().is_none_or(|a| a > REFRESH_EVERY) {
            self.refresh();
        }
        let find = |known: &[Iface]| known.iter().find(|i| i.index == index).cloned();
        if let Some(i) = find(&self.known) {
            return Some(i);
        }
        if self.age().is_none_or(|a| a > REFRESH_AT_MOST) {
            self.refresh();
            return find(&self.known);
        }
        None
    }
}

/// The address to name as the server on `iface`: the one the kernel picked for
/// replies when it is the interface's, else the interface's first.
fn server_address(iface: &Iface, spec_dst: Ipv4Addr) -> Option<Ipv4Addr> {
    if iface.addrs.contains(&spec_dst) {
        return Some(spec_dst);
    }
    iface.addrs.first().copied()
}

struct Shared {
    config: Config,
    hooks: Arc<dyn Hooks>,
    metrics: Arc<DhcpMetrics>,
    interfaces: Mutex<Interfaces>,
}

/// A datagram as received.
struct Received {
    len: usize,
    truncated: bool,
    from: SocketAddrV4,
    ifindex: u32,
    /// The local address the kernel would send replies from.
    spec_dst: Ipv4Addr,
}

impl Received {
    fn of(d: pktinfo::Datagram) -> std::io::Result<Received> {
        let SocketAddr::V4(from) = d.from else {
            return Err(std::io::Error::other("datagram without an IPv4 source"));
        };
        Ok(Received {
            len: d.len,
            truncated: d.truncated,
            from,
            ifindex: d.info.map_or(0, |i| i.ifindex),
            spec_dst: d
                .info
                .and_then(|i| i.spec_dst)
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
        })
    }
}

/// Sends `bytes` to `dest` out of interface `ifindex`, from `src`.
async fn send(
    sock: &UdpSocket,
    bytes: &[u8],
    dest: SocketAddrV4,
    ifindex: u32,
    src: Ipv4Addr,
) -> std::io::Result<()> {
    let info = nix::libc::in_pktinfo {
        ipi_ifindex: i32::try_from(ifindex).unwrap_or(0),
        ipi_spec_dst: nix::libc::in_addr {
            s_addr: u32::from(src).to_be(),
        },
        ipi_addr: nix::libc::in_addr { s_addr: 0 },
    };
    let to = SockaddrIn::from(dest);
    for _ in 0..2 {
        let sent = sock.try_io(Interest::WRITABLE, || {
            socket::sendmsg(
                sock.as_raw_fd(),
                &[IoSlice::new(bytes)],
                &[ControlMessage::Ipv4PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&to),
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sock.writable()).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::ErrorKind::WouldBlock.into())
}

impl Shared {
    /// The decision for one datagram (before sending), with the interface it
    /// resolved to.
    fn decide(
        &self,
        port: Port,
        got: &Received,
        parsed: &Result<Request, DropReason>,
    ) -> (Option<Iface>, Result<(Reply, Ipv4Addr), DropReason>) {
        let req = match parsed {
            Ok(r) => r,
            Err(d) => return (None, Err(*d)),
        };
        if let Err(d) = proxy::screen(req, port) {
            return (None, Err(d));
        }
        let iface = self
            .interfaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lookup(got.ifindex);
        let Some(iface) = iface else {
            return (None, Err(DropReason::WrongInterface));
        };
        let Some(server) = server_address(&iface, got.spec_dst) else {
            return (Some(iface), Err(DropReason::NoAddress));
        };
        let over = self.hooks.override_for(req.mac);
        let policy = Policy {
            uefi_loader: self.config.uefi_loader,
            http_port: self.hooks.http_port(server),
        };
        let reply = proxy::decide(req, port, server, &policy, over.as_ref());
        (Some(iface), reply.map(|r| (r, server)))
    }

    async fn handle(&self, sock: &UdpSocket, port: Port, got: Received, datagram: &[u8]) {
        inc(&self.metrics.requests);
        let parsed = if got.truncated {
            Err(DropReason::Malformed)
        } else {
            proxy::parse(datagram)
        };
        let (iface, decided) = self.decide(port, &got, &parsed);
        let outcome = match &decided {
            Err(d) => {
                if let Some(c) = self.metrics.drops.get(d.index()) {
                    inc(c);
                }
                Outcome::Dropped(*d)
            }
            Ok((reply, server)) => {
                let dest = match reply.dest {
                    Dest::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, proxy::CLIENT_PORT),
                    Dest::Source if got.from.ip().is_unspecified() => {
                        SocketAddrV4::new(Ipv4Addr::BROADCAST, got.from.port())
                    }
                    Dest::Source => got.from,
                };
                let ifindex = iface.as_ref().map_or(0, |i| i.index);
                match send(sock, &reply.bytes, dest, ifindex, *server).await {
                    Ok(()) => {
                        inc(match port {
                            Port::Dhcp => &self.metrics.offers,
                            Port::Pxe => &self.metrics.acks,
                        });
                        Outcome::Replied {
                            message: reply.message,
                            server: *server,
                            boot_file: &reply.boot_file,
                        }
                    }
                    Err(e) => {
                        inc(&self.metrics.send_errors);
                        tracing::debug!("dhcp: cannot send to {dest}: {e}");
                        Outcome::SendFailed
                    }
                }
            }
        };
        self.hooks.answered(&Event {
            port,
            source: got.from,
            interface: iface.as_ref().map(|i| i.name.as_str()),
            request: parsed.as_ref().ok(),
            outcome,
        });
    }
}

/// One socket's receive loop, until `shutdown`.
async fn listen(shared: Arc<Shared>, sock: UdpSocket, port: Port, shutdown: CancellationToken) {
    // Larger than any DHCP message a client sends; a longer datagram is truncated
    // and dropped as malformed.
    let mut buf = vec![0u8; 8192];
    while let Some(got) = pktinfo::next(&sock, &mut buf, &shutdown).await {
        let got = match got.and_then(Received::of) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!("dhcp: receive on port {port:?}: {e}");
                continue;
            }
        };
        let datagram = buf.get(..got.len).unwrap_or_default();
        shared.handle(&sock, port, got, datagram).await;
    }
}

/// Says at start what will not work: listed interfaces that are missing or have no
/// IPv4 address (answered once they do), and the `shim` loader's condition.
fn log_start(config: &Config, interfaces: &Interfaces) {
    for name in &config.interfaces {
        match interfaces.known.iter().find(|i| &i.name == name) {
            None => tracing::warn!(
                "dhcp: interface {name} does not exist (yet): ProxyDHCP answers on it once it does"
            ),
            Some(i) if i.addrs.is_empty() => tracing::warn!(
                "dhcp: interface {name} has no IPv4 address: ProxyDHCP answers on it once it has one"
            ),
            Some(_) => {}
        }
    }
    if config.uefi_loader == UefiLoader::Shim {
        tracing::warn!(
            "dhcp: uefi_loader = \"shim\": UEFI PXE machines get shim and GRUB, and Debian's signed GRUB \
             takes its TFTP server from the site's DHCP answer, so they boot only where the site's DHCP \
             names this rack as next-server"
        );
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    sockets: Sockets,
    config: Config,
    hooks: Arc<dyn Hooks>,
    metrics: Arc<DhcpMetrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut interfaces = Interfaces {
        listed: config.interfaces.clone(),
        known: Vec::new(),
        refreshed: None,
    };
    interfaces.refresh();
    log_start(&config, &interfaces);
    let shared = Arc::new(Shared {
        config,
        hooks,
        metrics,
        interfaces: Mutex::new(interfaces),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (sock, port) in [(sockets.dhcp, Port::Dhcp), (sockets.pxe, Port::Pxe)] {
        let addr = sock.local_addr()?;
        let sock = UdpSocket::from_std(sock)?;
        tracing::info!(
            "listening for {} on {addr} (ProxyDHCP on {})",
            match port {
                Port::Dhcp => "DHCP",
                Port::Pxe => "PXE",
            },
            shared.config.interfaces.join(", ")
        );
        tasks.spawn(listen(shared.clone(), sock, port, shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
