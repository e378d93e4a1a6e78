//! The TFTP server: drives [`super::engine::Transfer`] over UDP sockets.
//!
//! Listeners are already-bound UDP sockets (IPv4 and/or IPv6, several addresses).
//! Each receives with `IP_PKTINFO` / `IPV6_RECVPKTINFO`, so the server knows which of
//! its addresses a request was sent to; every transfer then gets one new socket bound
//! to that address (port 0) and connected to the client, so replies come from the
//! address the client talked to, as multi-homed racks need. A retransmitted RRQ from
//! the same client port while its transfer runs is ignored.
//!
//! Threads: the listeners run on the caller's tokio runtime and hand each request
//! straight to one of a few transfer threads (one per core by default; the least busy
//! one), each a plain level-triggered epoll loop over its transfers' sockets with a heap
//! of retransmission deadlines. A lockstep block then costs one wake-up, one `recv` and
//! one `send`, with no task scheduling on the packet path. (The same transfers driven
//! by tokio current-thread runtimes measured ~8% slower in lockstep and ~20% lower in
//! aggregate with 200 clients on loopback.)
//!
//! Sending: a transfer keeps one buffer of DATA packets, laid out as they go on the
//! wire (`[4-byte header][block]` per slot), filled by one `preadv` per window (or per
//! ~16 KiB of read-ahead in lockstep), read right after the previous window went out so
//! the read overlaps the client's turn. A window goes out with one `send` using UDP
//! GSO (`UDP_SEGMENT`, segment size 4 + blksize) where the kernel allows it, else with
//! one `sendmmsg`; a transfer whose route refuses GSO (`EINVAL`/`EIO`, e.g. a segment
//! larger than the link MTU) falls back for the rest of its life. The buffer is at most
//! 64 KiB (and about one window or 16 KiB otherwise), so memory per transfer is
//! bounded and files are never loaded whole.
//!
//! Netascii requests are converted on the fly as RFC 1350 says (LF → CR LF, CR → CR
//! NUL); the transfer size is that of the converted data. Knowing it means reading the
//! file once before the first reply, on the transfer thread, so netascii is served only
//! for files up to [`MAX_NETASCII_SOURCE`] (a scan of ~1 ms from the page cache; text
//! files in a boot tree are a few KiB); a larger one is refused with an ERROR asking
//! for octet mode. The alternative (no tsize, size found at the end) would let 40
//! netascii readers of a 1 GiB squashfs still cost what 40 octet readers cost, but
//! netascii of a binary is never a real client, only load. A refusal costs nothing.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    self, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::engine::{self, Action, Limits, Outcome, Transfer};
use super::packet::{self, code, Mode, Packet, Request};
use crate::file_class::{ClassCounters, FileClass};

/// Server settings.
#[derive(Clone, Debug)]
pub struct TftpConfig {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// Retransmission timeout unless the client negotiates one.
    pub timeout: Duration,
    pub retries: u32,
    pub max_transfers: usize,
    /// Transfers one client address may run at once (more are refused): one host
    /// cannot take every slot.
    pub max_transfers_per_client: usize,
    /// Transfer threads; 0 = one per core.
    pub workers: usize,
    /// Send windows with UDP GSO where the kernel accepts it (else `sendmmsg`).
    pub segmentation_offload: bool,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            max_blksize: 1468,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            retries: 5,
            max_transfers: 4096,
            max_transfers_per_client: 64,
            workers: 0,
            segmentation_offload: true,
        }
    }
}

/// What a resolved path reads from.
pub enum Source {
    File {
        file: File,
        len: u64,
    },
    /// Generated content (boot configs).
    Bytes(Bytes),
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::File { len, .. } => *len,
            Source::Bytes(b) => b.len() as u64,
        }
    }

    /// Fills `buf` from `off` (short only at the end of the data).
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        match self {
            Source::File { file, .. } => {
                let mut done = 0;
                while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
                    let n = file.read_at(rest, off + done as u64)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(done)
            }
            Source::Bytes(b) => {
                let rest = usize::try_from(off)
                    .ok()
                    .and_then(|o| b.get(o..))
                    .unwrap_or_default();
                let n = buf.len().min(rest.len());
                if let (Some(to), Some(from)) = (buf.get_mut(..n), rest.get(..n)) {
                    to.copy_from_slice(from);
                }
                Ok(n)
            }
        }
    }

    /// Fills the buffers in order from `off` with one `preadv` (may come back short).
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> std::io::Result<usize> {
        match self {
            Source::File { file, .. } => loop {
                match nix::sys::uio::preadv(file, bufs, off as i64) {
                    Err(Errno::EINTR) => continue,
                    r => return r.map_err(std::io::Error::from),
                }
            },
            Source::Bytes(_) => {
                let mut done = 0;
                for b in bufs.iter_mut() {
                    let n = self.read_at(b, off + done as u64)?;
                    done += n;
                    if n < b.len() {
                        break;
                    }
                }
                Ok(done)
            }
        }
    }
}

/// Why a path cannot be served (mapped to TFTP error codes).
#[derive(Debug)]
pub enum OpenError {
    NotFound,
    AccessDenied,
    Other(String),
}

/// Maps a cleaned relative path to something to send.
pub trait Resolver: Send + Sync + 'static {
    /// `local` is the address the request was sent to (for URLs in generated files).
    fn open(&self, path: &str, client: SocketAddr, local: IpAddr) -> Result<Source, OpenError>;
}

/// Serves a directory; the root may be a symlink (re-resolved per request); symlinks
/// whose target leaves the root are refused.
pub struct DirResolver {
    pub root: PathBuf,
}

impl Resolver for DirResolver {
    fn open(&self, path: &str, _client: SocketAddr, _local: IpAddr) -> Result<Source, OpenError> {
        open_under(&self.root, path)
    }
}

/// Opens `rel` under `root`, refusing escapes and non-files.
pub fn open_under(root: &std::path::Path, rel: &str) -> Result<Source, OpenError> {
    from_beneath(crate::fsutil::open_beneath_path(root, rel))
}

/// Maps an [`crate::fsutil::open_beneath`] result to what the server sends.
pub fn from_beneath(
    r: Result<(File, std::fs::Metadata), crate::fsutil::BeneathError>,
) -> Result<Source, OpenError> {
    use crate::fsutil::BeneathError;
    match r {
        Ok((file, meta)) => Ok(Source::File {
            file,
            len: meta.len(),
        }),
        Err(BeneathError::NotFound) => Err(OpenError::NotFound),
        Err(BeneathError::Denied) => Err(OpenError::AccessDenied),
        Err(BeneathError::Io(e)) => Err(OpenError::Other(e.to_string())),
    }
}

/// Counters exported by `/metrics`.
#[derive(Debug, Default)]
pub struct TftpMetrics {
    pub requests: AtomicU64,
    pub transfers_ok: AtomicU64,
    pub transfers_failed: AtomicU64,
    pub tsize_probes: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub in_flight: AtomicU64,
    pub not_found: AtomicU64,
    pub access_violation: AtomicU64,
    pub illegal_op: AtomicU64,
    pub timeouts: AtomicU64,
    /// Timeouts of transfers whose client never ACKed (spoofed or dead sources).
    pub unacknowledged: AtomicU64,
    pub aborted: AtomicU64,
    pub busy: AtomicU64,
    pub class_bytes: ClassCounters,
    pub class_requests: ClassCounters,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

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

struct Received {
    len: usize,
    from: SocketAddr,
    /// The address the datagram was sent to, and the interface it came in on.
    local: Option<(IpAddr, u32)>,
}

fn recv_with_pktinfo(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    sock.try_io(Interest::READABLE, || {
        let mut iov = [IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(nix::libc::in6_pktinfo, nix::libc::in_pktinfo);
        let msg = socket::recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        let mut local = None;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            match c {
                ControlMessageOwned::Ipv4PacketInfo(pi) => {
                    local = Some((
                        IpAddr::V4(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr))),
                        pi.ipi_ifindex as u32,
                    ));
                }
                ControlMessageOwned::Ipv6PacketInfo(pi) => {
                    local = Some((
                        IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr)),
                        pi.ipi6_ifindex,
                    ));
                }
                _ => {}
            }
        }
        let from = msg
            .address
            .and_then(|a: SockaddrStorage| {
                if let Some(v4) = a.as_sockaddr_in() {
                    Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                } else {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                }
            })
            .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
        Ok(Received {
            len: msg.bytes,
            from,
            local,
        })
    })
}

struct Incoming {
    request: Result<(bool, Request), String>,
    client: SocketAddr,
    /// The address the request was sent to (replies come from it).
    local: IpAddr,
    /// Interface index, for IPv6 link-local addresses.
    scope: u32,
    listener: SocketAddr,
}

/// epoll (level-triggered), through the C library: nix's wrapper needs a crate feature
/// this build does not enable.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> std::io::Result<Epoll> {
        // SAFETY: plain syscall; a non-negative result is a fresh descriptor we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: see above.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, data: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: no limit); returns how many events were filled in.
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> std::io::Result<usize> {
        // SAFETY: the kernel writes at most `events.len()` entries into `events`.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }
}

/// One transfer thread, as the listeners see it.
struct Worker {
    /// Requests handed over and not yet picked up.
    queue: Mutex<Vec<Job>>,
    /// Written to after a push to `queue` (or to stop): wakes the thread's epoll.
    wake: UnixDatagram,
    /// Transfers running on it.
    load: AtomicUsize,
}

/// A request on its way to a transfer thread, with its place in the active set.
struct Job {
    msg: Incoming,
    guard: ActiveGuard,
}

/// What the listeners and the transfer threads share.
struct Dispatch {
    resolver: Arc<dyn Resolver>,
    config: TftpConfig,
    metrics: Arc<TftpMetrics>,
    /// Running transfers.
    active: Mutex<Active>,
    workers: Vec<Worker>,
    /// Set when the transfer threads must end (whatever still runs is dropped).
    stop: AtomicBool,
    /// Signalled when the last running transfer ends (for the drain).
    idle: tokio::sync::Notify,
    busy_log: Mutex<(Option<Instant>, u64)>,
    /// Same, for refusals by `max_transfers_per_client`.
    client_cap_log: Mutex<(Option<Instant>, u64)>,
}

/// The running transfers: (client, listener) of each, and how many each client
/// address runs.
#[derive(Default)]
struct Active {
    keys: HashSet<(SocketAddr, SocketAddr)>,
    per_client: HashMap<IpAddr, usize>,
}

impl Active {
    fn len(&self) -> usize {
        self.keys.len()
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Removes a finished transfer from [`Dispatch`], however it ends.
struct ActiveGuard {
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
        inc(&self.metrics.busy);
        {
            let mut log = self
                .client_cap_log
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            log.1 += 1;
            if log.0.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    client = %msg.client,
                    "tftp: {} already runs {} transfers (tftp.max_transfers_per_client); refusing more ({} refused so far)",
                    msg.client.ip(),
                    self.config.max_transfers_per_client,
                    log.1
                );
                log.0 = Some(Instant::now());
            }
        }
        if let Ok(s) = reply_socket(msg.local, msg.scope, msg.client) {
            let _ = s.send(&packet::error(
                code::NOT_DEFINED,
                "server busy: too many transfers from this address, try again later",
            ));
        }
    }

    fn refuse_busy(&self, msg: &Incoming) {
        inc(&self.metrics.busy);
        {
            let mut log = self.busy_log.lock().unwrap_or_else(PoisonError::into_inner);
            log.1 += 1;
            if log.0.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    client = %msg.client,
                    "tftp: transfer limit reached ({} running, tftp.max_transfers); refusing {} ({} refused so far)",
                    self.config.max_transfers,
                    msg.client,
                    log.1
                );
                log.0 = Some(Instant::now());
            }
        }
        // A short non-blocking send from a fresh socket on the address the client used.
        if let Ok(s) = reply_socket(msg.local, msg.scope, msg.client) {
            let _ = s.send(&packet::error(
                code::NOT_DEFINED,
                "server busy: transfer limit reached, try again later",
            ));
        }
    }
}

/// One listening socket: receives requests and hands them to the dispatcher until
/// `shutdown`.
async fn listen(d: Arc<Dispatch>, sock: UdpSocket, addr: SocketAddr, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = sock.readable() => if r.is_err() { return },
        }
        let got = match recv_with_pktinfo(&sock, &mut buf) {
            Ok(g) => g,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("tftp receive on {addr}: {e}");
                continue;
            }
        };
        let client = unmap(got.from);
        let (local, scope) = match got.local {
            Some((l, scope)) => (unmap(SocketAddr::new(l, 0)).ip(), scope),
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

/// Waits for the transfers in flight to end, up to `drain_deadline`.
async fn drain(d: &Dispatch, drain_deadline: Duration) {
    let running = d
        .active
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len();
    if running > 0 {
        tracing::info!("tftp: draining {running} transfers");
        let deadline = tokio::time::Instant::now() + drain_deadline;
        loop {
            let notified = d.idle.notified();
            if d.active
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
            {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    "tftp: drain deadline passed; aborting {} transfers",
                    d.active
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .len()
                );
                break;
            }
        }
    }
}

/// Serves until `shutdown`, then drains transfers for up to `drain_deadline`. Every
/// transfer holds a socket and a file: the caller raises the open-files limit
/// (`daemon::serve` does, before binding).
pub async fn serve(
    sockets: Vec<std::net::UdpSocket>,
    resolver: Arc<dyn Resolver>,
    config: TftpConfig,
    metrics: Arc<TftpMetrics>,
    shutdown: CancellationToken,
    drain_deadline: Duration,
) -> std::io::Result<()> {
    let n = match config.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
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
    let d = Arc::new(Dispatch {
        resolver,
        config,
        metrics,
        active: Mutex::default(),
        workers,
        stop: AtomicBool::new(false),
        idle: tokio::sync::Notify::new(),
        busy_log: Mutex::default(),
        client_cap_log: Mutex::default(),
    });
    let mut threads = Vec::new();
    for (i, rx) in wake_rx.into_iter().enumerate() {
        let ep = Epoll::new()?;
        ep.ctl(
            libc::EPOLL_CTL_ADD,
            rx.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKE,
        )?;
        let d2 = d.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tftp-{i}"))
            .spawn(move || run_worker(d2, i, ep, rx));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop_workers(&d);
                return Err(e);
            }
        }
    }
    let mut listeners = tokio::task::JoinSet::new();
    for s in sockets {
        s.set_nonblocking(true)?;
        let addr = s.local_addr()?;
        let sock = UdpSocket::from_std(s)?;
        if addr.is_ipv4() {
            socket::setsockopt(&sock, sockopt::Ipv4PacketInfo, &true)
                .map_err(std::io::Error::from)?;
        } else {
            socket::setsockopt(&sock, sockopt::Ipv6RecvPacketInfo, &true)
                .map_err(std::io::Error::from)?;
        }
        // Room for a storm of requests (many machines powered on at once); the kernel
        // caps it at net.core.rmem_max.
        let _ = socket::setsockopt(&sock, sockopt::RcvBuf, &(4 << 20));
        tracing::info!("listening for TFTP on {addr}");
        let (d, shutdown) = (d.clone(), shutdown.clone());
        listeners.spawn(listen(d, sock, addr, shutdown));
    }
    shutdown.cancelled().await;
    listeners.abort_all();
    while listeners.join_next().await.is_some() {}
    drain(&d, drain_deadline).await;
    stop_workers(&d);
    drop(d);
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    Ok(())
}

fn stop_workers(d: &Dispatch) {
    d.stop.store(true, Ordering::SeqCst);
    for w in &d.workers {
        let _ = w.wake.send(&[0]);
    }
}

/// Binds a socket to the address the client talked to (port 0), connects it to the
/// client and makes it non-blocking: one per transfer, so replies come from there.
fn reply_socket(
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

/// epoll data of a transfer thread's wake-up socket (other values are slot numbers).
const WAKE: u64 = u64::MAX;

/// A transfer thread: its transfers live in slots of `xfers`; epoll says which
/// socket is readable (or writable again), a heap of deadlines says whose timer is due.
fn run_worker(d: Arc<Dispatch>, me: usize, ep: Epoll, wake: UnixDatagram) {
    let mut xfers: Vec<Option<Xfer>> = Vec::new();
    let mut generation: Vec<u64> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut timers: BinaryHeap<Reverse<(Instant, usize, u64)>> = BinaryHeap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut rbuf = [0u8; 516];
    while !d.stop.load(Ordering::SeqCst) {
        let timeout = timers.peek().map_or(-1, |Reverse((when, _, _))| {
            let left = when.saturating_duration_since(Instant::now());
            // Round up: waking before the deadline would only mean waiting again.
            left.as_millis().min(60_000) as i32 + i32::from(left.subsec_nanos() % 1_000_000 != 0)
        });
        let n = match ep.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("tftp: epoll_wait: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let now = Instant::now();
        for ev in events.iter().take(n) {
            let (data, flags) = (ev.u64, ev.events);
            if data == WAKE {
                let mut b = [0u8; 64];
                while wake.recv(&mut b).is_ok() {}
                let jobs = d
                    .workers
                    .get(me)
                    .map(|w| {
                        std::mem::take(&mut *w.queue.lock().unwrap_or_else(PoisonError::into_inner))
                    })
                    .unwrap_or_default();
                for job in jobs {
                    let slot = free.pop().unwrap_or_else(|| {
                        xfers.push(None);
                        generation.push(0);
                        xfers.len() - 1
                    });
                    let Some(gen) = generation.get_mut(slot).map(|g| {
                        *g += 1;
                        *g
                    }) else {
                        continue; // slots and generations grow together
                    };
                    match Xfer::start(job, &d, now, &ep, slot) {
                        Some(x) if !x.done() => match xfers.get_mut(slot) {
                            Some(place) => {
                                timers.push(Reverse((x.t.deadline(), slot, gen)));
                                *place = Some(x);
                            }
                            None => x.finish(&d),
                        },
                        Some(x) => {
                            x.finish(&d);
                            free.push(slot);
                        }
                        None => free.push(slot),
                    }
                }
                continue;
            }
            let slot = data as usize;
            let Some(x) = xfers.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if flags & libc::EPOLLOUT as u32 != 0 {
                x.on_writable(&ep);
            }
            if flags & (libc::EPOLLIN | libc::EPOLLERR) as u32 != 0 {
                x.on_readable(now, &mut rbuf, &ep);
            }
            if x.done() {
                if let Some(x) = xfers.get_mut(slot).and_then(Option::take) {
                    x.finish(&d);
                }
                free.push(slot);
            }
        }
        // Due timers; an entry whose transfer moved its deadline on is re-queued.
        while let Some(&Reverse((when, slot, gen))) = timers.peek() {
            if when > now {
                break;
            }
            timers.pop();
            if generation.get(slot) != Some(&gen) {
                continue;
            }
            let Some(x) = xfers.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let due = x.t.deadline();
            if due > now {
                timers.push(Reverse((due, slot, gen)));
                continue;
            }
            x.on_timeout(now, &ep);
            if x.done() {
                if let Some(x) = xfers.get_mut(slot).and_then(Option::take) {
                    x.finish(&d);
                }
                free.push(slot);
            } else {
                timers.push(Reverse((x.t.deadline(), slot, gen)));
            }
        }
    }
    // Stopping: whatever still runs ends here (dropping a transfer frees its place).
    for x in xfers.into_iter().flatten() {
        x.finish(&d);
    }
}

/// Largest file served in netascii mode (see the module doc).
pub const MAX_NETASCII_SOURCE: u64 = 1 << 20;

/// Converts data to netascii on the fly with checkpoints at block starts, so a
/// retransmitted block is reproduced without rereading from the start.
struct Netascii {
    /// converted offset → (source offset, pending second byte of a CR pair)
    checkpoints: BTreeMap<u64, (u64, Option<u8>)>,
    size: u64,
}

impl Netascii {
    fn new(src: &Source) -> std::io::Result<Netascii> {
        let mut buf = vec![0u8; 64 << 10];
        let (mut off, mut size) = (0u64, 0u64);
        loop {
            let n = src.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            size += n as u64
                + buf
                    .iter()
                    .take(n)
                    .filter(|b| **b == b'\n' || **b == b'\r')
                    .count() as u64;
            off += n as u64;
        }
        Ok(Netascii {
            checkpoints: BTreeMap::from([(0, (0, None))]),
            size,
        })
    }

    fn read(&mut self, src: &Source, conv_off: u64, out: &mut [u8]) -> std::io::Result<usize> {
        // Checkpoint 0 is never evicted, so there always is one at or before `conv_off`.
        let Some((&start, &(mut src_off, mut pending))) =
            self.checkpoints.range(..=conv_off).next_back()
        else {
            return Err(std::io::Error::other("netascii: no checkpoint"));
        };
        let mut pos = start;
        let mut n = 0;
        let mut chunk = vec![0u8; 4096];
        let cap = out.len();
        // Emits one converted byte (dropped while still before `conv_off`).
        let mut emit = |b: u8, pos: &mut u64, n: &mut usize| {
            if *pos >= conv_off {
                if let Some(o) = out.get_mut(*n) {
                    *o = b;
                    *n += 1;
                }
            }
            *pos += 1;
        };
        'outer: while n < cap {
            if let Some(p) = pending.take() {
                emit(p, &mut pos, &mut n);
                continue;
            }
            let got = src.read_at(&mut chunk, src_off)?;
            if got == 0 {
                break;
            }
            for &b in chunk.iter().take(got) {
                if n >= cap {
                    break 'outer;
                }
                src_off += 1;
                let second = match b {
                    b'\n' => Some(b'\n'),
                    b'\r' => Some(0),
                    _ => None,
                };
                match second {
                    None => emit(b, &mut pos, &mut n),
                    Some(s2) => {
                        emit(b'\r', &mut pos, &mut n);
                        if n >= cap {
                            pending = Some(s2);
                            break 'outer;
                        }
                        emit(s2, &mut pos, &mut n);
                    }
                }
            }
        }
        self.checkpoints.insert(pos, (src_off, pending));
        // Keep the map small: only recent block starts are ever revisited (a window
        // larger than this restarts a partial-ACK resend from an older checkpoint, at
        // worst from 0: slower, still right). Checkpoint 0 stays.
        while self.checkpoints.len() > 256 {
            let Some(&oldest) = self.checkpoints.keys().nth(1) else {
                break;
            };
            self.checkpoints.remove(&oldest);
        }
        Ok(n)
    }
}

/// Lockstep read-ahead: in windows smaller than this, the buffer holds several
/// windows, so a `preadv` serves several round trips.
const READ_AHEAD: usize = 16 << 10;
/// Most bytes a transfer buffers (one GSO send is at most 64 KiB anyway).
const MAX_BUFFER: usize = 64 << 10;
/// Most datagrams per `sendmmsg` and segments per GSO send (Linux's UDP_MAX_SEGMENTS
/// is 64 on older kernels), and slots per buffer.
const MAX_SEGMENTS: usize = 64;
/// Largest UDP payload (IPv4); one GSO send carries at most this much.
const MAX_UDP_PAYLOAD: usize = 65507;

/// Whether this kernel knows UDP GSO (`UDP_SEGMENT`, Linux 4.18), asked once.
fn gso_supported(sock: &std::net::UdpSocket) -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let ok = socket::getsockopt(sock, sockopt::UdpGsoSegment).is_ok();
        if !ok {
            tracing::info!("tftp: no UDP GSO in this kernel; windows go out with sendmmsg");
        }
        ok
    })
}

/// DATA packets of consecutive blocks as they go on the wire: slot `k` holds block
/// `first + k` as `[DATA header][data]`.
struct Window {
    buf: Vec<u8>,
    /// 4 + blksize.
    slot: usize,
    /// Capacity in slots.
    cap: usize,
    /// Block index of slot 0 (0 = nothing buffered).
    first: u64,
    filled: usize,
}

impl Window {
    fn new(blksize: usize, windowsize: usize) -> Window {
        let slot = 4 + blksize;
        let window = slot * windowsize.max(1);
        let want = if window >= READ_AHEAD {
            window
        } else {
            window * (READ_AHEAD / window)
        };
        let cap = (want.min(MAX_BUFFER) / slot).clamp(1, MAX_SEGMENTS);
        Window {
            buf: vec![0u8; cap * slot],
            slot,
            cap,
            first: 0,
            filled: 0,
        }
    }

    /// Makes blocks from `from` on (up to `to`) available, reading ahead when it has
    /// to read; returns the byte range in `buf` of the consecutive packets it has
    /// starting with block `from` (at least one), and how many packets that is.
    fn fill(
        &mut self,
        from: u64,
        to: u64,
        t: &Transfer,
        size: u64,
        src: &Source,
        netascii: Option<&mut Netascii>,
    ) -> std::io::Result<(std::ops::Range<usize>, usize)> {
        let have = self.first != 0 && from >= self.first && from < self.first + self.filled as u64;
        if !have {
            let count = (t.last().saturating_sub(from) + 1).min(self.cap as u64) as usize;
            self.first = from;
            self.filled = 0;
            self.read(from, count, t, size, src, netascii)?;
            self.filled = count;
        }
        let k = (from - self.first) as usize;
        let end_block = to.min(self.first + self.filled as u64 - 1);
        let n = (end_block - from + 1) as usize;
        let last_len = t.block_range(end_block, size).1;
        let start = k * self.slot;
        let end = (k + n - 1) * self.slot + 4 + last_len;
        Ok((start..end, n))
    }

    /// Reads blocks `from .. from + count` into slots `0..count` and writes headers.
    fn read(
        &mut self,
        from: u64,
        count: usize,
        t: &Transfer,
        size: u64,
        src: &Source,
        netascii: Option<&mut Netascii>,
    ) -> std::io::Result<()> {
        let slot = self.slot;
        let len = |k: usize| t.block_range(from + k as u64, size).1;
        // Slots are 4 + blksize bytes and a block is at most blksize: the ranges below
        // are in bounds; a miss would be a bug, reported as an error of this transfer.
        let bug = || std::io::Error::other("window slot out of range");
        let slots = self
            .buf
            .get_mut(..count * slot)
            .ok_or_else(bug)?
            .chunks_mut(slot);
        if let Some(n) = netascii {
            for (k, s) in slots.enumerate() {
                let (off, l) = t.block_range(from + k as u64, size);
                if n.read(src, off, s.get_mut(4..4 + l).ok_or_else(bug)?)? != l {
                    return Err(std::io::Error::other("file shrank during the transfer"));
                }
            }
        } else {
            let want: usize = (0..count).map(len).sum();
            let off = t.block_range(from, size).0;
            let mut iov: Vec<IoSliceMut<'_>> = slots
                .enumerate()
                .map(|(k, s)| s.get_mut(4..4 + len(k)).map(IoSliceMut::new))
                .collect::<Option<_>>()
                .ok_or_else(bug)?;
            let got = src.read_vectored_at(&mut iov, off)?;
            drop(iov);
            if got < want {
                // Short read (rare): finish slot by slot.
                let mut done = 0;
                for k in 0..count {
                    let l = len(k);
                    let have = got.saturating_sub(done).min(l);
                    if have < l {
                        let s = self
                            .buf
                            .get_mut(k * slot + 4 + have..k * slot + 4 + l)
                            .ok_or_else(bug)?;
                        if src.read_at(s, off + (done + have) as u64)? != l - have {
                            return Err(std::io::Error::other("file shrank during the transfer"));
                        }
                    }
                    done += l;
                }
            }
        }
        for k in 0..count {
            let wire = ((from + k as u64) % 65536) as u16;
            packet::data_header(self.buf.get_mut(k * slot..).unwrap_or_default(), wire);
        }
        Ok(())
    }
}

/// Errors with which the kernel refuses a GSO send that a plain send would pass:
/// segment larger than the route's MTU, no checksum offload, IPsec, …
fn gso_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::EIO | Errno::EMSGSIZE | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT)
    )
}

/// Sends a prefix of `data` (consecutive packets of `segment` bytes, the last one
/// possibly shorter) without blocking: one plain `send` for a single packet, else one
/// GSO `sendmsg` (while `gso` holds; a refusal turns it off) or one `sendmmsg`.
/// Returns how many bytes (whole packets, at least one) went out, or `WouldBlock`.
fn send_some(
    sock: &std::net::UdpSocket,
    data: &[u8],
    segment: usize,
    gso: &mut bool,
) -> std::io::Result<usize> {
    if data.len() <= segment {
        return sock.send(data).map(|_| data.len());
    }
    if *gso {
        let per_send = (MAX_UDP_PAYLOAD / segment).clamp(1, MAX_SEGMENTS) * segment;
        let n = data.len().min(per_send);
        let seg = segment as u16;
        let r = socket::sendmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &[IoSlice::new(data.get(..n).unwrap_or(data))],
            &[ControlMessage::UdpGsoSegments(&seg)],
            MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from);
        match r {
            Ok(_) => return Ok(n),
            Err(e) if gso_refused(&e) => {
                *gso = false;
                tracing::debug!("tftp: GSO refused ({e}); this transfer uses sendmmsg");
            }
            Err(e) => return Err(e),
        }
    }
    sendmmsg_now(sock, data, segment)
}

/// One `sendmmsg` of up to [`MAX_SEGMENTS`] packets from `data`; returns the bytes of
/// the packets sent (at least one).
fn sendmmsg_now(sock: &std::net::UdpSocket, data: &[u8], segment: usize) -> std::io::Result<usize> {
    let packets: Vec<[IoSlice<'_>; 1]> = data
        .chunks(segment)
        .take(MAX_SEGMENTS)
        .map(|p| [IoSlice::new(p)])
        .collect();
    let addrs: Vec<Option<SockaddrStorage>> = vec![None; packets.len()];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(packets.len(), None);
    let no_cmsgs: [ControlMessage<'_>; 0] = [];
    let count = socket::sendmmsg(
        sock.as_raw_fd(),
        &mut headers,
        &packets,
        &addrs,
        no_cmsgs,
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?
    .count();
    Ok(packets.iter().take(count).map(|[p]| p.len()).sum())
}

/// One running transfer on a transfer thread.
struct Xfer {
    sock: std::net::UdpSocket,
    /// Its epoll data.
    slot: usize,
    t: Transfer,
    size: u64,
    source: Source,
    netascii: Option<Netascii>,
    window: Window,
    /// Windows go out with UDP GSO (until the route refuses it).
    gso: bool,
    negotiated: engine::Negotiated,
    /// What could not be sent yet (the socket buffer was full): resumed when the
    /// socket is writable, replaced by whatever the engine asks for next.
    pending: Option<Action>,
    /// EPOLLOUT is registered.
    want_write: bool,
    sent_bytes: u64,
    failed: Option<std::io::Error>,
    class: FileClass,
    started: Instant,
    span: tracing::Span,
    _guard: ActiveGuard,
}

impl Xfer {
    /// Answers the request: an error and `None`, or a running transfer whose first
    /// packet (OACK or DATA) went out.
    fn start(job: Job, d: &Dispatch, now: Instant, ep: &Epoll, slot: usize) -> Option<Xfer> {
        let Job { msg, guard } = job;
        let metrics = &d.metrics;
        let client = msg.client;
        let sock = match reply_socket(msg.local, msg.scope, client) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%client, "tftp: cannot open a reply socket on {}: {e}", msg.local);
                return None;
            }
        };
        // Error replies are single small datagrams on a fresh socket: they go out.
        let refuse = |code: u16, text: &str| {
            let _ = sock.send(&packet::error(code, text));
        };
        let (is_write, req) = match msg.request {
            Ok(r) => r,
            Err(e) => {
                inc(&metrics.illegal_op);
                refuse(code::ILLEGAL_OPERATION, &format!("malformed request: {e}"));
                tracing::info!(%client, error = %e, "tftp: malformed request");
                return None;
            }
        };
        if is_write {
            inc(&metrics.access_violation);
            refuse(code::ACCESS_VIOLATION, "server is read-only");
            tracing::info!(%client, path = %req.filename, "tftp: write request refused");
            return None;
        }
        let span = tracing::info_span!("tftp", %client, path = %req.filename);
        let path = match super::path::clean(&req.filename) {
            Ok(p) => p,
            Err(e) => {
                inc(&metrics.access_violation);
                refuse(code::ACCESS_VIOLATION, &e.to_string());
                span.in_scope(|| tracing::info!(outcome = "denied", "tftp: {e}"));
                return None;
            }
        };
        let source = match d.resolver.open(&path, client, msg.local) {
            Ok(s) => s,
            Err(OpenError::NotFound) => {
                inc(&metrics.not_found);
                refuse(code::NOT_FOUND, "file not found");
                span.in_scope(|| tracing::debug!(outcome = "not-found", "tftp: file not found"));
                return None;
            }
            Err(OpenError::AccessDenied) => {
                inc(&metrics.access_violation);
                refuse(code::ACCESS_VIOLATION, "access denied");
                span.in_scope(|| tracing::info!(outcome = "denied", "tftp: access denied"));
                return None;
            }
            Err(OpenError::Other(m)) => {
                inc(&metrics.transfers_failed);
                refuse(code::NOT_DEFINED, &m);
                span.in_scope(|| tracing::warn!(outcome = "error", "tftp: {m}"));
                return None;
            }
        };
        if req.mode == Mode::Netascii && source.len() > MAX_NETASCII_SOURCE {
            inc(&metrics.transfers_failed);
            refuse(
                code::NOT_DEFINED,
                "netascii is served for files up to 1 MiB only; use octet mode",
            );
            span.in_scope(|| {
                tracing::info!(
                    outcome = "refused",
                    size = source.len(),
                    "tftp: netascii request of a file over 1 MiB refused"
                )
            });
            return None;
        }
        let netascii = if req.mode == Mode::Netascii {
            match Netascii::new(&source) {
                Ok(n) => Some(n),
                Err(e) => {
                    refuse(code::NOT_DEFINED, "read error");
                    span.in_scope(|| {
                        tracing::warn!(outcome = "error", "tftp: reading for netascii: {e}")
                    });
                    return None;
                }
            }
        } else {
            None
        };
        let size = netascii
            .as_ref()
            .map(|n| n.size)
            .unwrap_or_else(|| source.len());
        let config = &d.config;
        let limits = Limits {
            max_blksize: config.max_blksize,
            max_windowsize: config.max_windowsize,
            default_timeout: config.timeout,
            max_retries: config.retries,
        };
        let negotiated = engine::negotiate(&req.options, Some(size), &limits);
        if let Err(e) = ep.ctl(
            libc::EPOLL_CTL_ADD,
            sock.as_raw_fd(),
            libc::EPOLLIN as u32,
            slot as u64,
        ) {
            refuse(code::NOT_DEFINED, "server error");
            span.in_scope(|| tracing::warn!(outcome = "error", "tftp: epoll: {e}"));
            return None;
        }
        let class = FileClass::of(&path);
        inc(crate::file_class::counter(&metrics.class_requests, class));
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut t = Transfer::new(size, &negotiated, config.retries, now);
        let first = t.start(now);
        let gso = config.segmentation_offload && negotiated.windowsize > 1 && gso_supported(&sock);
        let mut x = Xfer {
            window: Window::new(t.blksize(), usize::from(negotiated.windowsize)),
            sock,
            slot,
            t,
            size,
            source,
            netascii,
            gso,
            negotiated,
            pending: None,
            want_write: false,
            sent_bytes: 0,
            failed: None,
            class,
            started: now,
            span,
            _guard: guard,
        };
        x.act(first, ep);
        Some(x)
    }

    fn done(&self) -> bool {
        self.failed.is_some() || self.t.outcome().is_some()
    }

    /// Sends what the engine asked for, as far as the socket takes it.
    fn act(&mut self, a: Action, ep: &Epoll) {
        self.pending = None;
        match self.send(a) {
            Ok(rest) => self.pending = rest,
            Err(e) => self.failed = Some(e),
        }
        let want = self.pending.is_some();
        if want != self.want_write {
            let events = if want {
                (libc::EPOLLIN | libc::EPOLLOUT) as u32
            } else {
                libc::EPOLLIN as u32
            };
            match ep.ctl(
                libc::EPOLL_CTL_MOD,
                self.sock.as_raw_fd(),
                events,
                self.slot as u64,
            ) {
                Ok(()) => self.want_write = want,
                Err(e) => self.failed = Some(e),
            }
        }
    }

    /// Returns what is left when the socket buffer fills up.
    fn send(&mut self, a: Action) -> std::io::Result<Option<Action>> {
        let would_block = |e: &std::io::Error| e.kind() == std::io::ErrorKind::WouldBlock;
        match a {
            Action::SendOack => {
                let o = packet::oack(self.negotiated.oack.as_deref().unwrap_or(&[]));
                match self.sock.send(&o) {
                    Ok(_) => Ok(None),
                    Err(e) if would_block(&e) => Ok(Some(a)),
                    Err(e) => Err(e),
                }
            }
            Action::Send { from, to } => {
                let segment = 4 + self.t.blksize();
                let mut i = from;
                while i <= to {
                    let (range, _) = self.window.fill(
                        i,
                        to,
                        &self.t,
                        self.size,
                        &self.source,
                        self.netascii.as_mut(),
                    )?;
                    let sent = match send_some(
                        &self.sock,
                        self.window
                            .buf
                            .get(range)
                            .ok_or_else(|| std::io::Error::other("window range out of bounds"))?,
                        segment,
                        &mut self.gso,
                    ) {
                        Ok(n) => n,
                        Err(e) if would_block(&e) => return Ok(Some(Action::Send { from: i, to })),
                        Err(e) => return Err(e),
                    };
                    let packets = sent.div_ceil(segment);
                    self.sent_bytes += (sent - 4 * packets) as u64;
                    i += packets as u64;
                }
                // Read what comes next now, while the client works on this window,
                // rather than after its ACK (the read then costs no latency). A
                // failure here shows again when the blocks are really needed.
                if to < self.t.last() {
                    let _ = self.window.fill(
                        to + 1,
                        to + 1,
                        &self.t,
                        self.size,
                        &self.source,
                        self.netascii.as_mut(),
                    );
                }
                Ok(None)
            }
        }
    }

    /// One datagram from the client (level-triggered epoll reports the next one).
    fn on_readable(&mut self, now: Instant, buf: &mut [u8], ep: &Epoll) {
        match self.sock.recv(buf) {
            Ok(n) => match packet::parse(buf.get(..n).unwrap_or_default()) {
                Ok(Packet::Ack { block }) => {
                    if let Some(a) = self.t.on_ack(block, now) {
                        self.act(a, ep);
                    }
                }
                Ok(Packet::Error { .. }) => self.t.on_error(),
                _ => {} // junk from the client: ignore
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // ICMP port unreachable: the client went away.
            Err(_) => self.t.on_error(),
        }
    }

    fn on_writable(&mut self, ep: &Epoll) {
        match self.pending.take() {
            Some(a) => self.act(a, ep),
            None => {
                if ep
                    .ctl(
                        libc::EPOLL_CTL_MOD,
                        self.sock.as_raw_fd(),
                        libc::EPOLLIN as u32,
                        self.slot as u64,
                    )
                    .is_ok()
                {
                    self.want_write = false;
                }
            }
        }
    }

    fn on_timeout(&mut self, now: Instant, ep: &Epoll) {
        if let Some(a) = self.t.on_timeout(now) {
            self.act(a, ep);
        }
    }

    /// Counts and logs the outcome (the place in the active set goes with `self`).
    fn finish(self, d: &Dispatch) {
        let metrics = &d.metrics;
        metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        metrics
            .bytes_sent
            .fetch_add(self.sent_bytes, Ordering::Relaxed);
        crate::file_class::counter(&metrics.class_bytes, self.class)
            .fetch_add(self.sent_bytes, Ordering::Relaxed);
        let outcome = match (&self.failed, self.t.outcome()) {
            (Some(_), _) => {
                inc(&metrics.transfers_failed);
                let _ = self
                    .sock
                    .send(&packet::error(code::NOT_DEFINED, "read error"));
                "error"
            }
            (None, Some(Outcome::Ok)) => {
                inc(&metrics.transfers_ok);
                "ok"
            }
            (None, Some(Outcome::TsizeProbe)) => {
                inc(&metrics.tsize_probes);
                "tsize-probe"
            }
            (None, Some(Outcome::Aborted)) => {
                inc(&metrics.aborted);
                inc(&metrics.transfers_failed);
                "aborted"
            }
            (None, Some(Outcome::Timeout)) => {
                inc(&metrics.timeouts);
                if !self.t.got_ack() {
                    inc(&metrics.unacknowledged);
                }
                inc(&metrics.transfers_failed);
                "timeout"
            }
            // Still running: the server is stopping.
            (None, None) => {
                inc(&metrics.transfers_failed);
                "stopped"
            }
        };
        self.span.in_scope(|| {
            if let Some(e) = &self.failed {
                tracing::warn!("tftp: transfer failed: {e}");
            }
            tracing::info!(
                blksize = self.negotiated.blksize,
                windowsize = self.negotiated.windowsize,
                bytes = self.sent_bytes,
                duration_ms = self.started.elapsed().as_millis() as u64,
                outcome,
                "tftp transfer"
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(data: &[u8], bs: usize, order: &[usize]) -> Vec<u8> {
        let src = Source::Bytes(Bytes::copy_from_slice(data));
        let mut n = Netascii::new(&src).unwrap();
        let blocks = (n.size as usize) / bs + 1;
        let mut out = vec![vec![]; blocks];
        for b in order
            .iter()
            .copied()
            .chain(0..blocks)
            .filter(|b| *b < blocks)
        {
            let mut buf = vec![0u8; bs];
            let len = n.read(&src, (b * bs) as u64, &mut buf).unwrap();
            buf.truncate(len);
            out[b] = buf;
        }
        out.concat()
    }

    /// A minimal RFC 7440 client: RRQ with `opts`, ACK 0 after an OACK, ACK after
    /// every full window, on a gap and at the end. Returns the file and checks that
    /// every packet came from one transfer port.
    fn fetch(server: SocketAddr, name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(&packet::rrq(name, "octet", opts), server)
            .unwrap();
        let (mut bs, mut ws) = (512usize, 1u64);
        let mut buf = vec![0u8; 70000];
        let mut out = Vec::new();
        let (mut expect, mut in_window) = (1u64, 0u64);
        let mut peer = None;
        for _ in 0..10_000_000 {
            let (n, from) = sock.recv_from(&mut buf).expect("a packet within 5 s");
            assert!(peer.is_none_or(|p| p == from), "packets from two ports");
            peer = Some(from);
            let Ok(pkt) = packet::parse(&buf[..n]) else {
                panic!(
                    "bad packet of {n} bytes after block {expect}: {:?}",
                    &buf[..n.min(32)]
                );
            };
            match pkt {
                Packet::Oack { options } => {
                    for (k, v) in options {
                        match k.as_str() {
                            "blksize" => bs = v.parse().unwrap(),
                            "windowsize" => ws = v.parse().unwrap(),
                            _ => {}
                        }
                    }
                    sock.send_to(&packet::ack(0), from).unwrap();
                }
                Packet::Data { block, data } => {
                    if block == (expect % 65536) as u16 {
                        out.extend_from_slice(data);
                        in_window += 1;
                        if data.len() < bs {
                            sock.send_to(&packet::ack(block), from).unwrap();
                            return out;
                        }
                        expect += 1;
                        if in_window == ws {
                            in_window = 0;
                            sock.send_to(&packet::ack(block), from).unwrap();
                        }
                    } else if block != ((expect - 1) % 65536) as u16 {
                        in_window = 0;
                        sock.send_to(&packet::ack(((expect - 1) % 65536) as u16), from)
                            .unwrap();
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("no end");
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
            .collect()
    }

    /// Runs the server on 127.0.0.1 over a temp dir holding `files`.
    fn start(
        files: &[(&str, Vec<u8>)],
        config: TftpConfig,
    ) -> (
        SocketAddr,
        CancellationToken,
        tempfile::TempDir,
        std::thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in files {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (root, s) = (dir.path().to_path_buf(), stop.clone());
        let th = std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
                .block_on(serve(
                    vec![sock],
                    Arc::new(DirResolver { root }),
                    config,
                    Arc::default(),
                    s,
                    Duration::from_secs(1),
                ))
                .unwrap();
        });
        (addr, stop, dir, th)
    }

    #[test]
    fn windows_with_gso_and_with_sendmmsg_arrive_whole() {
        let sizes = [0usize, 1, 511, 512, 8192 * 3, 300_001];
        let files: Vec<(String, Vec<u8>)> = sizes
            .iter()
            .map(|n| (format!("f{n}"), pattern(*n, *n as u8)))
            .collect();
        let refs: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
        for gso in [true, false] {
            let config = TftpConfig {
                max_blksize: 8192,
                segmentation_offload: gso,
                ..TftpConfig::default()
            };
            let (addr, stop, _dir, th) = start(&refs, config);
            for (name, want) in &files {
                for bs in ["512", "1468", "8192"] {
                    for ws in ["1", "4", "16", "64"] {
                        let got = fetch(addr, name, &[("blksize", bs), ("windowsize", ws)]);
                        assert!(
                            got == *want,
                            "{name} bs {bs} ws {ws} gso {gso}: {} bytes",
                            got.len()
                        );
                    }
                }
            }
            // Plain RFC 1350 (no options) too.
            assert_eq!(fetch(addr, "f300001", &[]), files[5].1);
            stop.cancel();
            th.join().unwrap();
        }
    }

    #[test]
    fn block_numbers_roll_over_in_windows() {
        // 70 000 blocks of 8 bytes: the wire numbers wrap past 65535 to 0.
        let data = pattern(70_000 * 8 + 5, 3);
        let (addr, stop, _dir, th) = start(&[("big", data.clone())], TftpConfig::default());
        assert!(fetch(addr, "big", &[("blksize", "8"), ("windowsize", "64")]) == data);
        stop.cancel();
        th.join().unwrap();
    }

    #[test]
    fn a_route_that_refuses_gso_falls_back_to_sendmmsg() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let segment = 1472;
        assert!(gso_supported(&tx), "loopback takes GSO");
        // GSO works: three packets in one send.
        let mut gso = true;
        let data = pattern(segment * 2 + 100, 7);
        assert_eq!(
            send_some(&tx, &data, segment, &mut gso).unwrap(),
            data.len()
        );
        assert!(gso);
        let mut buf = [0u8; 2000];
        for chunk in data.chunks(segment) {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], chunk);
        }
        // Checksums off (SO_NO_CHECK): the kernel refuses GSO with EINVAL, as it does
        // for a segment bigger than the route's MTU (blksize 8192 on a 1500-byte link).
        let one: nix::libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own with a c_int option value.
        let r = unsafe {
            nix::libc::setsockopt(
                tx.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                nix::libc::SO_NO_CHECK,
                (&one as *const nix::libc::c_int).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let data = pattern(segment * 2 + 100, 9);
        assert_eq!(
            send_some(&tx, &data, segment, &mut gso).unwrap(),
            data.len()
        );
        assert!(!gso, "GSO off for the rest of the transfer");
        for chunk in data.chunks(segment) {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], chunk);
        }
    }

    #[test]
    fn window_buffer_is_bounded_and_reads_ahead_in_lockstep() {
        for (bs, ws) in [
            (512, 1),
            (1468, 1),
            (1468, 8),
            (1468, 64),
            (8192, 64),
            (65464, 64),
            (8, 64),
        ] {
            let w = Window::new(bs, ws);
            assert!(w.buf.len() <= MAX_BUFFER.max(4 + bs), "{bs}/{ws}");
            assert!(w.cap >= 1 && w.cap <= MAX_SEGMENTS);
        }
        assert_eq!(Window::new(1468, 1).cap, (16 << 10) / 1472);
        assert_eq!(Window::new(1468, 8).cap, 8, "one window per read");
        assert_eq!(Window::new(512, 4).cap, 28, "whole windows of read-ahead");
    }

    #[test]
    fn netascii_conversion_with_retransmits() {
        let data = b"a\nb\r\nc\rd\n\n";
        let want = b"a\r\nb\r\0\r\nc\r\0d\r\n\r\n".to_vec();
        for bs in 1..8 {
            assert_eq!(convert(data, bs, &[]), want, "bs {bs}");
            assert_eq!(
                convert(data, bs, &[0, 1, 0, 2, 1, 3, 2]),
                want,
                "bs {bs} with resends"
            );
        }
    }
}
