//! Listeners and dispatch: requests in, handed to a transfer thread.
//!
//! Listeners are already-bound UDP sockets (IPv4 and/or IPv6, several addresses).
//! Each receives with `IP_PKTINFO` / `IPV6_RECVPKTINFO`, so the server knows which of
//! its addresses a request was sent to; every transfer then gets one new socket bound
//! to that address (port 0) and connected to the client ([`reply_socket`]), so replies
//! come from the address the client talked to, as multi-homed racks need. A
//! retransmitted RRQ from the same client port while its transfer runs is ignored.
//!
//! The listeners run on the caller's tokio runtime; [`Dispatch::submit`] applies the
//! transfer limits (`max_transfers`, `max_transfers_per_client`; a refusal is one
//! ERROR datagram and a rate-limited warning) and queues the request on the least busy
//! transfer thread, waking its epoll.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::packet::{self, code, Packet, Request};
use crate::pktinfo;
use super::resolver::Resolver;
use super::server::{inc, TftpConfig, TftpMetrics};

/// Turns IPv4-mapped IPv6 addresses into IPv4 ones.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        _ => a,
    }
}

pub(super) struct Incoming {
    pub(super) request: Result<(bool, Request), String>,
    pub(super) client: SocketAddr,
    /// The address the request was sent to (replies come from it).
    pub(super) local: IpAddr,
    /// Interface index, for IPv6 link-local addresses.
    pub(super) scope: u32,
    listener: SocketAddr,
}

/// One transfer thread, as the listeners see it.
pub(super) struct Worker {
    /// Requests handed over and not yet picked up.
    pub(super) queue: Mutex<Vec<Job>>,
    /// Written to after a push to `queue` (or to stop): wakes the thread's epoll.
    pub(super) wake: UnixDatagram,
    /// Transfers running on it.
    load: AtomicUsize,
}

/// A request on its way to a transfer thread, with its place in the active set.
pub(super) struct Job {
    pub(super) msg: Incoming,
    pub(super) guard: ActiveGuard,
}

/// What the listeners and the transfer threads share.
pub(super) struct Dispatch {
    pub(super) resolver: Arc<dyn Resolver>,
    pub(super) config: TftpConfig,
    pub(super) metrics: Arc<TftpMetrics>,
    /// Running transfers.
    pub(super) active: Mutex<Active>,
    pub(super) workers: Vec<Worker>,
    /// Set when the transfer threads must end (whatever still runs is dropped).
    pub(super) stop: AtomicBool,
    /// Signalled when the last running transfer ends (for the drain).
    pub(super) idle: tokio::sync::Notify,
    busy_log: Mutex<(Option<Instant>, u64)>,
    /// Same, for refusals by `max_transfers_per_client`.
    client_cap_log: Mutex<(Option<Instant>, u64)>,
}

/// The running transfers: (client, listener) of each, and how many each client
/// address runs.
#[derive(Default)]
pub(super) struct Active {
    keys: HashSet<(SocketAddr, SocketAddr)>,
    per_client: HashMap<IpAddr, usize>,
}

impl Active {
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Removes a finished transfer from [`Dispatch`], however it ends.
pub(super) struct ActiveGuard {
    d: Arc<Dispatch>,
    key: (SocketAddr, SocketAddr),
    worker: usize,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let empty = {
            let mut active = self.d.active.lock().unwrap_or_else(PoisonError::into_inner);
            if active.keys.remove(&self.key) {
                let ip = self.key.0.ip();
                if let Some(n) = active.per_client.get_mut(&ip) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        active.per_client.remove(&ip);
                    }
                }
            }
            active.is_empty()
        };
        if let Some(w) = self.d.workers.get(self.worker) {
            w.load.fetch_sub(1, Ordering::Relaxed);
        }
        if empty {
            self.d.idle.notify_one();
        }
    }
}

impl Dispatch {
    /// The state shared by the listeners and `n` transfer threads, and the receiving
    /// ends of the threads' wake-up sockets.
    pub(super) fn new(
        resolver: Arc<dyn Resolver>,
        config: TftpConfig,
        metrics: Arc<TftpMetrics>,
        n: usize,
    ) -> std::io::Result<(Dispatch, Vec<UnixDatagram>)> {
        let mut workers = Vec::new();
        let mut wake_rx = Vec::new();
        for _ in 0..n {
            let (tx, rx) = UnixDatagram::pair()?;
            tx.set_nonblocking(true)?;
            rx.set_nonblocking(true)?;
            workers.push(Worker {
                queue: Mutex::default(),
                wake: tx,
                load: AtomicUsize::new(0),
            });
            wake_rx.push(rx);
        }
        let d = Dispatch {
            resolver,
            config,
            metrics,
            active: Mutex::default(),
            workers,
            stop: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
            busy_log: Mutex::default(),
            client_cap_log: Mutex::default(),
        };
        Ok((d, wake_rx))
    }

    /// Starts a transfer for `msg` unless it repeats a running one or the limit is hit.
    fn submit(self: &Arc<Self>, msg: Incoming) {
        let key = (msg.client, msg.listener);
        let Some((worker, w)) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.load.load(Ordering::Relaxed))
        else {
            return; // no transfer thread (serve starts at least one)
        };
        {
            let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
            if active.keys.contains(&key) {
                return; // a retransmitted RRQ of a running transfer
            }
            if active.len() >= self.config.max_transfers {
                drop(active);
                self.refuse_busy(&msg);
                return;
            }
            let mine = active.per_client.entry(msg.client.ip()).or_insert(0);
            if *mine >= self.config.max_transfers_per_client {
                drop(active);
                self.refuse_client_cap(&msg);
                return;
            }
            *mine += 1;
            active.keys.insert(key);
        }
        w.load.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard {
            d: self.clone(),
            key,
            worker,
        };
        let was_empty = {
            let mut q = w.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.push(Job { msg, guard });
            q.len() == 1
        };
        if was_empty {
            // A full socket buffer means a wake-up is pending anyway.
            let _ = w.wake.send(&[1]);
        }
    }

    fn refuse_client_cap(&self, msg: &Incoming) {
        let warn = |refused: u64| {
            tracing::warn!(
                client = %msg.client,
                "tftp: {} already runs {} transfers (tftp.max_transfers_per_client); refusing more ({refused} refused so far)",
                msg.client.ip(),
                self.config.max_transfers_per_client,
            )
        };
        self.refuse(
            msg,
            &self.client_cap_log,
            warn,
            "server busy: too many transfers from this address, try again later",
        );
    }

    fn refuse_busy(&self, msg: &Incoming) {
        let warn = |refused: u64| {
            tracing::warn!(
                client = %msg.client,
                "tftp: transfer limit reached ({} running, tftp.max_transfers); refusing {} ({refused} refused so far)",
                self.config.max_transfers,
                msg.client,
            )
        };
        self.refuse(
            msg,
            &self.busy_log,
            warn,
            "server busy: transfer limit reached, try again later",
        );
    }

    /// Refuses `msg` as busy: counted, warned about at most every 10 s per cause
    /// (`log`: when last, how many so far), answered with one ERROR `text`, a short
    /// non-blocking send from a fresh socket on the address the client used.
    fn refuse(
        &self,
        msg: &Incoming,
        log: &Mutex<(Option<Instant>, u64)>,
        warn: impl FnOnce(u64),
        text: &str,
    ) {
        inc(&self.metrics.busy);
        {
            let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
            log.1 += 1;
            if log.0.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                warn(log.1);
                log.0 = Some(Instant::now());
            }
        }
        if let Ok(s) = reply_socket(msg.local, msg.scope, msg.client) {
            let _ = s.send(&packet::error(code::NOT_DEFINED, text));
        }
        self.tell_refused(msg, text);
    }

    /// Tells the resolver that a read request was refused as busy.
    fn tell_refused(&self, msg: &Incoming, message: &str) {
        let Ok((false, req)) = &msg.request else {
            return;
        };
        let Ok(path) = super::path::clean(&req.filename) else {
            return;
        };
        let ending = super::resolver::Ending::Error {
            code: code::NOT_DEFINED,
            message,
        };
        let how = super::resolver::Finished {
            bytes: 0,
            duration: Duration::ZERO,
            ending,
        };
        self.resolver.finished(&path, msg.client, &how);
    }
}

/// Starts a listener task per socket on the current runtime (packet info on, room for
/// a storm of requests), each handing requests to `d` until `shutdown`.
pub(super) fn spawn_listeners(
    d: &Arc<Dispatch>,
    sockets: Vec<std::net::UdpSocket>,
    shutdown: &CancellationToken,
) -> std::io::Result<JoinSet<()>> {
    let mut listeners = JoinSet::new();
    for s in sockets {
        s.set_nonblocking(true)?;
        let addr = s.local_addr()?;
        let sock = UdpSocket::from_std(s)?;
        pktinfo::enable(&sock, addr.is_ipv6()).map_err(std::io::Error::from)?;
        // Room for a storm of requests (many machines powered on at once); the kernel
        // caps it at net.core.rmem_max.
        let _ = socket::setsockopt(&sock, sockopt::RcvBuf, &(4 << 20));
        tracing::info!("listening for TFTP on {addr}");
        let (d, shutdown) = (d.clone(), shutdown.clone());
        listeners.spawn(listen(d, sock, addr, shutdown));
    }
    Ok(listeners)
}

/// One listening socket: receives requests and hands them to the dispatcher until
/// `shutdown`.
async fn listen(d: Arc<Dispatch>, sock: UdpSocket, addr: SocketAddr, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 2048];
    while let Some(got) = pktinfo::next(&sock, &mut buf, &shutdown).await {
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("tftp receive on {addr}: {e}");
                continue;
            }
        };
        let client = unmap(got.from);
        // The address the datagram was sent to, and the interface it came in on.
        let (local, scope) = match got.info {
            Some(i) => (unmap(SocketAddr::new(i.dst, 0)).ip(), i.ifindex),
            None => (addr.ip(), 0),
        };
        let datagram = buf.get(..got.len).unwrap_or_default();
        let request = match packet::parse(datagram) {
            Ok(Packet::Rrq(r)) => Ok((false, r)),
            Ok(Packet::Wrq(r)) => Ok((true, r)),
            // Stray ACK/DATA/ERROR to the listening port: not a request.
            Ok(_) => continue,
            Err(e) => Err(e.to_string()),
        };
        inc(&d.metrics.requests);
        d.submit(Incoming {
            request,
            client,
            local,
            scope,
            listener: addr,
        });
    }
}

/// Binds a socket to the address the client talked to (port 0), connects it to the
/// client and makes it non-blocking: one per transfer, so replies come from there.
pub(super) fn reply_socket(
    local: IpAddr,
    scope: u32,
    client: SocketAddr,
) -> std::io::Result<std::net::UdpSocket> {
    let bind = match local {
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            SocketAddr::V6(SocketAddrV6::new(v6, 0, 0, scope))
        }
        ip => SocketAddr::new(ip, 0),
    };
    let sock = std::net::UdpSocket::bind(bind)?;
    sock.connect(client)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}
