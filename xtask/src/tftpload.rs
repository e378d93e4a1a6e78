//! A small, fast TFTP read client for the benchmarks: the same client against every
//! server. RFC 1350 + blksize/tsize/windowsize (RFC 7440 receiver rules: ACK the last
//! in-order block after a full window, at the end, or on a gap), retransmission of the
//! last ACK (or the RRQ) after 1 s of silence, at most 5 times. Every download is
//! hashed (sha256) as it arrives and checked against the expected size and digest.
//!
//! - [`download`]: one transfer on a blocking socket (lowest latency for lockstep).
//! - [`swarm`]: many concurrent transfers driven by a level-triggered epoll loop (one
//!   `recv` per event; one thread unless asked for more), so the client costs about
//!   two syscalls per packet and no context switch; 1000 clients do not need 1000
//!   threads.
//!
//! The bench runs it as a separate, optimised process (`xtask bench --loadgen …`, see
//! [`cli`]) so its speed does not depend on how `cargo xtask` itself was built.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

const RETRY_AFTER: Duration = Duration::from_secs(1);
const MAX_RETRIES: u32 = 5;

enum State {
    Running,
    Done,
    Failed(String),
}

/// One download's protocol state.
struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    path: String,
    rrq: Vec<u8>,
    peer: Option<SocketAddr>,
    bs: usize,
    ws: u16,
    expect: u16,
    in_window: u16,
    hasher: Sha256,
    total: u64,
    last_heard: Instant,
    retries: u32,
    state: State,
}

/// An ACK of `block`.
pub(crate) fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// An octet RRQ for `path` asking for `blksize`, the size (`tsize 0`) and, above 1,
/// `windowsize`: what both TFTP load generators send.
pub(crate) fn rrq(path: &str, blksize: u16, windowsize: u16) -> Vec<u8> {
    let (bs, ws) = (blksize.to_string(), windowsize.to_string());
    let mut fields = vec![path, "octet", "blksize", &bs, "tsize", "0"];
    if windowsize > 1 {
        fields.extend(["windowsize", &ws]);
    }
    let mut p = vec![0u8, 1];
    for f in fields {
        p.extend_from_slice(f.as_bytes());
        p.push(0);
    }
    p
}

impl Client {
    fn new(server: SocketAddr, path: &str, blksize: u16, windowsize: u16) -> Result<Client> {
        let sock = UdpSocket::bind(if server.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        })?;
        Ok(Client {
            sock,
            server,
            path: path.to_string(),
            rrq: rrq(path, blksize, windowsize),
            peer: None,
            bs: 512,
            ws: 1,
            expect: 1,
            in_window: 0,
            hasher: Sha256::new(),
            total: 0,
            last_heard: Instant::now(),
            retries: 0,
            state: State::Running,
        })
    }

    fn start(&mut self) -> Result<()> {
        self.sock.send_to(&self.rrq, self.server)?;
        self.last_heard = Instant::now();
        Ok(())
    }

    fn fail(&mut self, why: String) {
        self.state = State::Failed(format!("{}: {why}", self.path));
    }

    /// Nothing heard for a while: resend the RRQ or the last ACK, or give up.
    fn on_silence(&mut self, now: Instant) -> Result<()> {
        if !matches!(self.state, State::Running) || now - self.last_heard < RETRY_AFTER {
            return Ok(());
        }
        self.retries += 1;
        self.last_heard = now;
        if self.retries > MAX_RETRIES {
            let total = self.total;
            self.fail(format!("timed out at {total} bytes"));
            return Ok(());
        }
        match self.peer {
            None => self.sock.send_to(&self.rrq, self.server)?,
            Some(p) => self.sock.send_to(&ack(self.expect.wrapping_sub(1)), p)?,
        };
        Ok(())
    }

    fn on_packet(&mut self, pkt: &[u8], from: SocketAddr) -> Result<()> {
        if !matches!(self.state, State::Running) {
            return Ok(());
        }
        if self.peer.is_some_and(|p| p != from) {
            // Another TID: RFC 1350 says answer with an error and carry on.
            let _ = self
                .sock
                .send_to(b"\x00\x05\x00\x05unknown transfer id\x00", from);
            return Ok(());
        }
        if pkt.len() < 4 {
            return Ok(());
        }
        self.peer = Some(from);
        self.retries = 0;
        self.last_heard = Instant::now();
        match u16::from_be_bytes([pkt[0], pkt[1]]) {
            6 if self.expect == 1 && self.total == 0 => {
                // OACK: take what the server accepted, ACK 0.
                let parts: Vec<&[u8]> = pkt[2..].split(|b| *b == 0).collect();
                for kv in parts.chunks(2) {
                    if kv.len() < 2 {
                        continue;
                    }
                    let k = String::from_utf8_lossy(kv[0]).to_lowercase();
                    let v = String::from_utf8_lossy(kv[1]);
                    match k.as_str() {
                        "blksize" => self.bs = v.parse().unwrap_or(512),
                        "windowsize" => self.ws = v.parse().unwrap_or(1),
                        _ => {}
                    }
                }
                self.sock.send_to(&ack(0), from)?;
            }
            3 => {
                let block = u16::from_be_bytes([pkt[2], pkt[3]]);
                let data = &pkt[4..];
                if block == self.expect {
                    self.hasher.update(data);
                    self.total += data.len() as u64;
                    self.expect = self.expect.wrapping_add(1);
                    self.in_window += 1;
                    if data.len() < self.bs {
                        self.sock.send_to(&ack(block), from)?;
                        self.state = State::Done;
                    } else if self.in_window >= self.ws {
                        self.in_window = 0;
                        self.sock.send_to(&ack(block), from)?;
                    }
                } else if block != self.expect.wrapping_sub(1) {
                    // A gap: ACK what we have so the server resends from there.
                    self.in_window = 0;
                    self.sock.send_to(&ack(self.expect.wrapping_sub(1)), from)?;
                }
            }
            5 => {
                let msg = String::from_utf8_lossy(&pkt[4..])
                    .trim_end_matches('\0')
                    .to_string();
                self.fail(format!("server error: {msg}"));
            }
            _ => {}
        }
        Ok(())
    }

    fn result(self) -> Result<(u64, String)> {
        match self.state {
            State::Done => Ok((self.total, hex::encode(self.hasher.finalize()))),
            State::Failed(e) => bail!(e),
            State::Running => bail!("{}: unfinished", self.path),
        }
    }
}

/// Downloads `path` on a blocking socket; returns (bytes, sha256 hex).
pub fn download(
    server: SocketAddr,
    path: &str,
    blksize: u16,
    windowsize: u16,
) -> Result<(u64, String)> {
    let mut c = Client::new(server, path, blksize, windowsize)?;
    c.sock.set_read_timeout(Some(RETRY_AFTER))?;
    c.start()?;
    let mut buf = vec![0u8; 65536];
    while matches!(c.state, State::Running) {
        match c.sock.recv_from(&mut buf) {
            Ok((n, from)) => c.on_packet(&buf[..n], from)?,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                c.on_silence(Instant::now())?
            }
            Err(e) => return Err(e.into()),
        }
    }
    c.result()
}

/// What a swarm of concurrent downloads achieved.
#[derive(Debug)]
pub struct Swarm {
    pub ok: usize,
    pub failed: usize,
    /// Bytes of the downloads that arrived whole and correct.
    pub bytes: u64,
    pub elapsed: Duration,
    /// `epoll_wait` calls (how bursty the server's answers were).
    pub waits: u64,
    /// The first few failure reasons.
    pub errors: Vec<String>,
}

mod sys {
    //! The three epoll calls from the C library (std links it; xtask has no libc crate).
    #[cfg_attr(target_arch = "x86_64", repr(C, packed))]
    #[cfg_attr(not(target_arch = "x86_64"), repr(C))]
    #[derive(Clone, Copy)]
    pub struct EpollEvent {
        pub events: u32,
        pub data: u64,
    }
    extern "C" {
        pub fn epoll_create1(flags: i32) -> i32;
        pub fn epoll_ctl(epfd: i32, op: i32, fd: i32, event: *mut EpollEvent) -> i32;
        pub fn epoll_wait(epfd: i32, events: *mut EpollEvent, maxevents: i32, timeout: i32) -> i32;
    }
    pub const EPOLL_CLOEXEC: i32 = 0o2000000;
    pub const EPOLL_CTL_ADD: i32 = 1;
    pub const EPOLLIN: u32 = 1;
}

/// What to download.
pub struct Spec<'a> {
    pub server: SocketAddr,
    pub path: &'a str,
    pub blksize: u16,
    pub windowsize: u16,
}

/// `clients` concurrent downloads spread over `threads` threads (each its own epoll
/// loop, all starting together); each download must have `want_len` bytes with sha256
/// `want_sha`.
pub fn swarm(
    spec: &Spec,
    clients: usize,
    threads: usize,
    want_len: u64,
    want_sha: &str,
    limit: Duration,
) -> Result<Swarm> {
    let threads = threads.clamp(1, clients.max(1));
    let start = std::sync::Barrier::new(threads);
    let parts: Vec<Result<Swarm>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let share = clients / threads + usize::from(i < clients % threads);
                let start = &start;
                scope.spawn(move || swarm_one(spec, share, want_len, want_sha, limit, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a load thread panicked")))
            .collect()
    });
    let mut total = Swarm {
        ok: 0,
        failed: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        waits: 0,
        errors: vec![],
    };
    for p in parts {
        let p = p?;
        total.ok += p.ok;
        total.failed += p.failed;
        total.bytes += p.bytes;
        total.elapsed = total.elapsed.max(p.elapsed);
        total.waits += p.waits;
        total.errors.extend(p.errors);
    }
    total.errors.truncate(5);
    Ok(total)
}

/// One thread's share of a swarm; the clock starts when every thread is ready.
fn swarm_one(
    spec: &Spec,
    clients: usize,
    want_len: u64,
    want_sha: &str,
    limit: Duration,
    start: &std::sync::Barrier,
) -> Result<Swarm> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let setup = || -> Result<(OwnedFd, Vec<Client>)> {
        // SAFETY: plain syscalls on descriptors we own; the event buffers outlive the
        // calls.
        let ep = unsafe { sys::epoll_create1(sys::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut all = Vec::with_capacity(clients);
        for i in 0..clients {
            let c = Client::new(spec.server, spec.path, spec.blksize, spec.windowsize)?;
            c.sock.set_nonblocking(true)?;
            let mut ev = sys::EpollEvent {
                events: sys::EPOLLIN,
                data: i as u64,
            };
            let r = unsafe {
                sys::epoll_ctl(
                    ep.as_raw_fd(),
                    sys::EPOLL_CTL_ADD,
                    c.sock.as_raw_fd(),
                    &mut ev,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error()).context("epoll_ctl");
            }
            all.push(c);
        }
        Ok((ep, all))
    };
    let ready = setup();
    // Every thread passes the barrier, also one whose setup failed.
    start.wait();
    let (ep, mut all) = ready?;
    let started = Instant::now();
    for c in &mut all {
        c.start()?;
    }
    let mut running = clients;
    let mut buf = vec![0u8; 65536];
    let mut events = vec![sys::EpollEvent { events: 0, data: 0 }; 256];
    let mut last_sweep = Instant::now();
    let mut waits = 0u64;
    while running > 0 {
        if started.elapsed() > limit {
            break;
        }
        let n = unsafe {
            sys::epoll_wait(
                ep.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                100,
            )
        };
        waits += 1;
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("epoll_wait");
        }
        for ev in &events[..n as usize] {
            let i = ev.data as usize;
            let c = &mut all[i];
            let was_running = matches!(c.state, State::Running);
            // One datagram per event: epoll is level-triggered and reports the socket
            // again if more are queued, which saves a `recv` that would only say
            // EAGAIN after every block.
            match c.sock.recv_from(&mut buf) {
                Ok((len, from)) => {
                    if let Err(e) = c.on_packet(&buf[..len], from) {
                        c.fail(e.to_string());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => c.fail(e.to_string()),
            }
            if was_running && !matches!(c.state, State::Running) {
                running -= 1;
            }
        }
        let now = Instant::now();
        if now - last_sweep >= Duration::from_millis(100) {
            last_sweep = now;
            for c in &mut all {
                let was_running = matches!(c.state, State::Running);
                if let Err(e) = c.on_silence(now) {
                    c.fail(e.to_string());
                }
                if was_running && !matches!(c.state, State::Running) {
                    running -= 1;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    let mut s = Swarm {
        ok: 0,
        failed: 0,
        bytes: 0,
        elapsed,
        waits,
        errors: vec![],
    };
    for c in all {
        let path = c.path.clone();
        let r = c.result().and_then(|(n, sha)| {
            if n != want_len || sha != want_sha {
                bail!("{path}: got {n} bytes with sha256 {sha}, not the file");
            }
            Ok(n)
        });
        match r {
            Ok(n) => {
                s.ok += 1;
                s.bytes += n;
            }
            Err(e) => {
                s.failed += 1;
                if s.errors.len() < 5 {
                    s.errors.push(e.to_string());
                }
            }
        }
    }
    Ok(s)
}

/// `xtask bench --loadgen single ADDR PATH BLKSIZE WINDOWSIZE` and
/// `xtask bench --loadgen swarm ADDR PATH BLKSIZE WINDOWSIZE CLIENTS LEN SHA256 [THREADS]`
/// (one client thread unless given):
/// runs and prints one JSON line (times measured here, without process start-up).
pub fn cli(args: &[String]) -> Result<()> {
    let arg = |i: usize| -> Result<&str> {
        args.get(i).map(|s| s.as_str()).context(
            "usage: --loadgen single|swarm ADDR PATH BLKSIZE WINDOWSIZE [CLIENTS LEN SHA256]",
        )
    };
    let addr: SocketAddr = arg(1)?.parse()?;
    let path = arg(2)?;
    let bs: u16 = arg(3)?.parse()?;
    let ws: u16 = arg(4)?.parse()?;
    let out = match arg(0)? {
        "single" => {
            let t = Instant::now();
            let (n, sha) = download(addr, path, bs, ws)?;
            serde_json::json!({"bytes": n, "sha256": sha, "secs": t.elapsed().as_secs_f64()})
        }
        "swarm" => {
            let clients: usize = arg(5)?.parse()?;
            let len: u64 = arg(6)?.parse()?;
            let spec = Spec {
                server: addr,
                path,
                blksize: bs,
                windowsize: ws,
            };
            // One thread by default: on a small machine it leaves the other cores to
            // the server (a second client thread competes with it).
            let threads = args.get(8).map_or(Ok(1), |t| t.parse())?;
            let s = swarm(
                &spec,
                clients,
                threads,
                len,
                arg(7)?,
                Duration::from_secs(600),
            )?;
            serde_json::json!({"ok": s.ok, "failed": s.failed, "bytes": s.bytes,
                "secs": s.elapsed.as_secs_f64(), "epoll_waits": s.waits, "errors": s.errors})
        }
        other => bail!("unknown loadgen mode {other}"),
    };
    println!("{out}");
    Ok(())
}
