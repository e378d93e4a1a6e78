//! The TFTP server: drives [`super::engine::Transfer`] with tokio.
//!
//! Listeners are already-bound UDP sockets (IPv4 and/or IPv6, several addresses).
//! Each receives with `IP_PKTINFO` / `IPV6_RECVPKTINFO`, so the server knows which of
//! its addresses a request was sent to; every transfer then gets one new socket bound
//! to that address (port 0) and connected to the client, so replies come from the
//! address the client talked to, as multi-homed racks need. A retransmitted RRQ from
//! the same client port while its transfer runs is ignored. Memory per transfer is one
//! buffer of a block plus headers; files are read with `pread`, never loaded whole.
//!
//! Netascii requests are converted on the fly as RFC 1350 says (LF → CR LF, CR → CR
//! NUL); the transfer size is that of the converted data.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::engine::{self, Action, Limits, Outcome, Transfer};
use super::packet::{self, code, Mode, Packet, Request};
use crate::metrics::{file_class, FILE_CLASSES};

/// Server settings.
#[derive(Clone, Debug)]
pub struct TftpConfig {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// Retransmission timeout unless the client negotiates one.
    pub timeout: Duration,
    pub retries: u32,
    pub max_transfers: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            max_blksize: 1468,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            retries: 5,
            max_transfers: 4096,
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
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        match self {
            Source::File { file, .. } => {
                let mut done = 0;
                while done < buf.len() {
                    let n = file.read_at(&mut buf[done..], off + done as u64)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(done)
            }
            Source::Bytes(b) => {
                let start = (off as usize).min(b.len());
                let n = buf.len().min(b.len() - start);
                buf[..n].copy_from_slice(&b[start..start + n]);
                Ok(n)
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
    pub aborted: AtomicU64,
    pub busy: AtomicU64,
    pub class_bytes: [AtomicU64; FILE_CLASSES.len()],
    pub class_requests: [AtomicU64; FILE_CLASSES.len()],
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
    local: Option<IpAddr>,
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
                    local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr))));
                }
                ControlMessageOwned::Ipv6PacketInfo(pi) => {
                    local = Some(IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr)));
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
    local: IpAddr,
    listener: SocketAddr,
}

/// Serves until `shutdown`, then drains transfers for up to `drain_deadline`.
pub async fn serve(
    sockets: Vec<std::net::UdpSocket>,
    resolver: Arc<dyn Resolver>,
    config: TftpConfig,
    metrics: Arc<TftpMetrics>,
    shutdown: CancellationToken,
    drain_deadline: Duration,
) -> std::io::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Incoming>(1024);
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
        tracing::info!("listening for TFTP on {addr}");
        let (tx, shutdown, metrics) = (tx.clone(), shutdown.clone(), metrics.clone());
        listeners.spawn(async move {
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
                let local = got
                    .local
                    .map(|l| unmap(SocketAddr::new(l, 0)).ip())
                    .unwrap_or(addr.ip());
                let request = match packet::parse(&buf[..got.len]) {
                    Ok(Packet::Rrq(r)) => Ok((false, r)),
                    Ok(Packet::Wrq(r)) => Ok((true, r)),
                    // Stray ACK/DATA/ERROR to the listening port: not a request.
                    Ok(_) => continue,
                    Err(e) => Err(e.to_string()),
                };
                inc(&metrics.requests);
                let msg = Incoming {
                    request,
                    client,
                    local,
                    listener: addr,
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let active: Arc<Mutex<HashSet<(SocketAddr, SocketAddr)>>> = Arc::default();
    let mut transfers = tokio::task::JoinSet::new();
    let mut last_busy_warn: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = transfers.join_next(), if !transfers.is_empty() => {}
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let key = (msg.client, msg.listener);
                if !active.lock().expect("lock").insert(key) {
                    continue; // a retransmitted RRQ of a running transfer
                }
                if transfers.len() >= config.max_transfers {
                    active.lock().expect("lock").remove(&key);
                    inc(&metrics.busy);
                    if last_busy_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!("tftp transfer limit reached ({}), refusing {}", config.max_transfers, msg.client);
                        last_busy_warn = Some(Instant::now());
                    }
                    let local = msg.local;
                    tokio::spawn(async move {
                        if let Ok(s) = bind_reply(local, msg.client).await {
                            let _ = s.send(&packet::error(code::NOT_DEFINED, "server busy")).await;
                        }
                    });
                    continue;
                }
                let guard = ActiveGuard { set: active.clone(), key };
                let (resolver, config, metrics) = (resolver.clone(), config.clone(), metrics.clone());
                transfers.spawn(async move {
                    let _guard = guard;
                    serve_request(msg, resolver, config, metrics).await;
                });
            }
        }
    }
    listeners.abort_all();
    if !transfers.is_empty() {
        tracing::info!("tftp: draining {} transfers", transfers.len());
        let drain = async { while transfers.join_next().await.is_some() {} };
        if tokio::time::timeout(drain_deadline, drain).await.is_err() {
            tracing::warn!(
                "tftp: drain deadline passed; aborting {} transfers",
                transfers.len()
            );
            transfers.abort_all();
        }
    }
    Ok(())
}

struct ActiveGuard {
    set: Arc<Mutex<HashSet<(SocketAddr, SocketAddr)>>>,
    key: (SocketAddr, SocketAddr),
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.set.lock().expect("lock").remove(&self.key);
    }
}

async fn bind_reply(local: IpAddr, client: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind(SocketAddr::new(local, 0)).await?;
    sock.connect(client).await?;
    Ok(sock)
}

/// Reads a file in chunks of many blocks (one `pread` per ~16 KiB instead of one per
/// block); memory stays bounded per transfer.
struct ReadAhead {
    buf: Vec<u8>,
    /// File offset of `buf[0]`, and how many bytes of `buf` are valid.
    start: u64,
    valid: usize,
}

impl ReadAhead {
    fn new(blksize: usize) -> ReadAhead {
        let blocks = (16 << 10) / blksize.max(1);
        ReadAhead {
            buf: vec![0u8; blksize * blocks.max(1)],
            start: 0,
            valid: 0,
        }
    }

    fn read(&mut self, src: &Source, out: &mut [u8], off: u64) -> std::io::Result<usize> {
        let end = off + out.len() as u64;
        if off < self.start || end > self.start + self.valid as u64 {
            self.start = off;
            self.valid = src.read_at(&mut self.buf, off)?;
        }
        let from = (off - self.start) as usize;
        let n = out.len().min(self.valid.saturating_sub(from));
        out[..n].copy_from_slice(&self.buf[from..from + n]);
        Ok(n)
    }
}

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
                + buf[..n]
                    .iter()
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
        let (&start, &(mut src_off, mut pending)) = self
            .checkpoints
            .range(..=conv_off)
            .next_back()
            .expect("checkpoint 0 exists");
        let mut pos = start;
        let mut n = 0;
        let mut chunk = vec![0u8; 4096];
        let cap = out.len();
        // Emits one converted byte (dropped while still before `conv_off`).
        let mut emit = |b: u8, pos: &mut u64, n: &mut usize| {
            if *pos >= conv_off {
                out[*n] = b;
                *n += 1;
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
            for &b in &chunk[..got] {
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
        // Keep the map small: only recent block starts are ever revisited.
        while self.checkpoints.len() > 256 {
            let first = *self.checkpoints.keys().next().expect("non-empty");
            self.checkpoints.remove(&first);
        }
        Ok(n)
    }
}

async fn serve_request(
    msg: Incoming,
    resolver: Arc<dyn Resolver>,
    config: TftpConfig,
    metrics: Arc<TftpMetrics>,
) {
    let client = msg.client;
    let sock = match bind_reply(msg.local, client).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%client, "tftp: cannot open a reply socket on {}: {e}", msg.local);
            return;
        }
    };
    let (is_write, req) = match msg.request {
        Ok(r) => r,
        Err(e) => {
            inc(&metrics.illegal_op);
            let _ = sock
                .send(&packet::error(
                    code::ILLEGAL_OPERATION,
                    &format!("malformed request: {e}"),
                ))
                .await;
            tracing::info!(%client, error = %e, "tftp: malformed request");
            return;
        }
    };
    if is_write {
        inc(&metrics.access_violation);
        let _ = sock
            .send(&packet::error(
                code::ACCESS_VIOLATION,
                "server is read-only",
            ))
            .await;
        tracing::info!(%client, path = %req.filename, "tftp: write request refused");
        return;
    }
    let span = tracing::info_span!("tftp", %client, path = %req.filename);
    transfer(sock, req, client, msg.local, resolver, config, metrics)
        .instrument(span)
        .await;
}

async fn transfer(
    sock: UdpSocket,
    req: Request,
    client: SocketAddr,
    local: IpAddr,
    resolver: Arc<dyn Resolver>,
    config: TftpConfig,
    metrics: Arc<TftpMetrics>,
) {
    let started = Instant::now();
    let path = match super::path::clean(&req.filename) {
        Ok(p) => p,
        Err(e) => {
            inc(&metrics.access_violation);
            let _ = sock
                .send(&packet::error(code::ACCESS_VIOLATION, &e.to_string()))
                .await;
            tracing::info!(outcome = "denied", "tftp: {e}");
            return;
        }
    };
    let source = match resolver.open(&path, client, local) {
        Ok(s) => s,
        Err(OpenError::NotFound) => {
            inc(&metrics.not_found);
            let _ = sock
                .send(&packet::error(code::NOT_FOUND, "file not found"))
                .await;
            tracing::debug!(outcome = "not-found", "tftp: file not found");
            return;
        }
        Err(OpenError::AccessDenied) => {
            inc(&metrics.access_violation);
            let _ = sock
                .send(&packet::error(code::ACCESS_VIOLATION, "access denied"))
                .await;
            tracing::info!(outcome = "denied", "tftp: access denied");
            return;
        }
        Err(OpenError::Other(m)) => {
            inc(&metrics.transfers_failed);
            let _ = sock.send(&packet::error(code::NOT_DEFINED, &m)).await;
            tracing::warn!(outcome = "error", "tftp: {m}");
            return;
        }
    };
    let mut netascii = if req.mode == Mode::Netascii {
        match Netascii::new(&source) {
            Ok(n) => Some(n),
            Err(e) => {
                let _ = sock
                    .send(&packet::error(code::NOT_DEFINED, "read error"))
                    .await;
                tracing::warn!(outcome = "error", "tftp: reading for netascii: {e}");
                return;
            }
        }
    } else {
        None
    };
    let size = netascii
        .as_ref()
        .map(|n| n.size)
        .unwrap_or_else(|| source.len());
    let limits = Limits {
        max_blksize: config.max_blksize,
        max_windowsize: config.max_windowsize,
        default_timeout: config.timeout,
        max_retries: config.retries,
    };
    let negotiated = engine::negotiate(&req.options, Some(size), &limits);
    let class = file_class(&path);
    inc(&metrics.class_requests[class]);
    metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let mut t = Transfer::new(size, &negotiated, config.retries, Instant::now());
    let mut buf = vec![0u8; 4 + t.blksize()];
    let mut rbuf = vec![0u8; 1024];
    let mut ahead = ReadAhead::new(t.blksize());
    let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(t.deadline()));
    tokio::pin!(timer);
    let mut actions = t.start(Instant::now());
    let mut sent_bytes = 0u64;
    let mut failed_io = None;
    'run: loop {
        for a in actions.drain(..) {
            match a {
                Action::SendOack => {
                    let o = packet::oack(negotiated.oack.as_deref().unwrap_or(&[]));
                    if let Err(e) = sock.send(&o).await {
                        failed_io = Some(e);
                        break 'run;
                    }
                }
                Action::Send { from, to } => {
                    for i in from..=to {
                        let (off, len) = t.block_range(i, size);
                        let r = match &mut netascii {
                            Some(n) => n.read(&source, off, &mut buf[4..4 + len]),
                            None => ahead.read(&source, &mut buf[4..4 + len], off),
                        };
                        match r {
                            Ok(n) if n == len => {}
                            Ok(_) => {
                                failed_io =
                                    Some(std::io::Error::other("file shrank during the transfer"));
                                break 'run;
                            }
                            Err(e) => {
                                failed_io = Some(e);
                                break 'run;
                            }
                        }
                        packet::data_header(&mut buf, (i % 65536) as u16);
                        if let Err(e) = sock.send(&buf[..4 + len]).await {
                            failed_io = Some(e);
                            break 'run;
                        }
                        sent_bytes += len as u64;
                    }
                }
            }
        }
        if t.outcome().is_some() {
            break;
        }
        let deadline = tokio::time::Instant::from_std(t.deadline());
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            r = sock.recv(&mut rbuf) => match r {
                Ok(n) => match packet::parse(&rbuf[..n]) {
                    Ok(Packet::Ack { block }) => actions = t.on_ack(block, Instant::now()),
                    Ok(Packet::Error { .. }) => t.on_error(),
                    _ => {} // junk from the client: ignore
                },
                // ICMP port unreachable: the client went away.
                Err(_) => t.on_error(),
            },
            _ = &mut timer => actions = t.on_timeout(Instant::now()),
        }
        if t.outcome().is_some() && actions.is_empty() {
            break;
        }
    }
    metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    metrics.bytes_sent.fetch_add(sent_bytes, Ordering::Relaxed);
    metrics.class_bytes[class].fetch_add(sent_bytes, Ordering::Relaxed);
    let outcome = match (failed_io, t.outcome()) {
        (Some(e), _) => {
            inc(&metrics.transfers_failed);
            let _ = sock
                .send(&packet::error(code::NOT_DEFINED, "read error"))
                .await;
            tracing::warn!("tftp: transfer failed: {e}");
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
        (None, Some(Outcome::Timeout)) | (None, None) => {
            inc(&metrics.timeouts);
            inc(&metrics.transfers_failed);
            "timeout"
        }
    };
    tracing::info!(
        blksize = negotiated.blksize,
        windowsize = negotiated.windowsize,
        bytes = sent_bytes,
        duration_ms = started.elapsed().as_millis() as u64,
        outcome,
        "tftp transfer"
    );
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
