//! HTTP/1.1 server core on hyper: already-bound listeners in, one task per
//! connection, keep-alive, limits (header size → 431, header read timeout against
//! slowloris, connection count), optional TLS (rustls), graceful drain on shutdown.
//! Routing is the `App`'s job; [`files::StaticFiles`] serves a directory tree.

pub mod files;
pub mod progress;
pub mod sendfile;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::file_class::ClassCounters;

pub use files::StaticFiles;

/// Response body type of every route.
pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The routes of a server.
pub trait App: Send + Sync + 'static {
    fn call(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send + 'static>>;
}

/// Connection and request limits.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Larger request heads get 431.
    pub max_header_bytes: usize,
    /// A client must send its request head within this time (slowloris guard).
    pub header_read_timeout: Duration,
    /// Open connections; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// Open connections from one client address; beyond it new ones from that
    /// address are closed at once (one client cannot take every slot).
    pub max_connections_per_client: usize,
    /// A response whose writes make no progress this long is closed (and its body,
    /// with the snapshot it holds, dropped).
    pub send_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_header_bytes: 16 << 10,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_client: 64,
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// HTTP counters, exported by `/metrics`.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    pub requests: AtomicU64,
    pub status_2xx: AtomicU64,
    pub status_3xx: AtomicU64,
    pub status_4xx: AtomicU64,
    pub status_5xx: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_rejected: AtomicU64,
    /// File bodies being sent.
    pub transfers_in_flight: AtomicU64,
    /// Errors by kind (index: `HttpErrorKind as usize`; read with [`HttpMetrics::error_count`]).
    errors: [AtomicU64; HttpErrorKind::ALL.len()],
    /// Bytes and requests by file class.
    pub class_bytes: ClassCounters,
    pub class_requests: ClassCounters,
}

/// Kinds of HTTP errors counted in `HttpMetrics::errors` (indexed by the kind): error
/// responses of the routes, then connection-level failures that hyper answers or closes
/// itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpErrorKind {
    BadRequest,
    Unauthorized,
    NotFound,
    RangeNotSatisfiable,
    Other4xx,
    ServerError,
    HeaderTooLarge,
    HeaderTimeout,
    Malformed,
    Connection,
    SendTimeout,
}

impl HttpErrorKind {
    /// Every kind, in counter order.
    pub const ALL: [HttpErrorKind; 11] = [
        HttpErrorKind::BadRequest,
        HttpErrorKind::Unauthorized,
        HttpErrorKind::NotFound,
        HttpErrorKind::RangeNotSatisfiable,
        HttpErrorKind::Other4xx,
        HttpErrorKind::ServerError,
        HttpErrorKind::HeaderTooLarge,
        HttpErrorKind::HeaderTimeout,
        HttpErrorKind::Malformed,
        HttpErrorKind::Connection,
        HttpErrorKind::SendTimeout,
    ];

    /// The `kind` label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            HttpErrorKind::BadRequest => "bad_request",
            HttpErrorKind::Unauthorized => "unauthorized",
            HttpErrorKind::NotFound => "not_found",
            HttpErrorKind::RangeNotSatisfiable => "range_not_satisfiable",
            HttpErrorKind::Other4xx => "other_4xx",
            HttpErrorKind::ServerError => "server_error",
            HttpErrorKind::HeaderTooLarge => "header_too_large",
            HttpErrorKind::HeaderTimeout => "header_timeout",
            HttpErrorKind::Malformed => "malformed",
            HttpErrorKind::Connection => "connection",
            HttpErrorKind::SendTimeout => "send_timeout",
        }
    }
}

impl HttpMetrics {
    fn count_status(&self, status: u16) {
        let c = match status {
            200..=299 => &self.status_2xx,
            300..=399 => &self.status_3xx,
            400..=499 => &self.status_4xx,
            _ => &self.status_5xx,
        };
        c.fetch_add(1, Ordering::Relaxed);
        let kind = match status {
            400 => HttpErrorKind::BadRequest,
            401 | 403 => HttpErrorKind::Unauthorized,
            404 => HttpErrorKind::NotFound,
            416 => HttpErrorKind::RangeNotSatisfiable,
            402..=499 => HttpErrorKind::Other4xx,
            500.. => HttpErrorKind::ServerError,
            _ => return,
        };
        self.count_error(kind);
    }

    fn count_error(&self, kind: HttpErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many errors of `kind` were counted.
    pub fn error_count(&self, kind: HttpErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    /// Counts a connection that hyper ended with an error.
    fn count_connection_error(&self, e: &hyper::Error) {
        let kind = if e.is_parse_too_large() {
            HttpErrorKind::HeaderTooLarge
        } else if e.is_timeout() {
            HttpErrorKind::HeaderTimeout
        } else if e.is_parse() || e.is_parse_status() {
            HttpErrorKind::Malformed
        } else {
            HttpErrorKind::Connection
        };
        self.count_error(kind);
    }
}

/// A TLS config error names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    pub path: String,
    pub message: String,
}

/// Loads a PEM certificate chain and private key.
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let e = |p: &Path, m: String| TlsError {
        path: p.display().to_string(),
        message: m,
    };
    let cert_pem = std::fs::read(cert).map_err(|x| e(cert, format!("cannot read: {x}")))?;
    let key_pem = std::fs::read(key).map_err(|x| e(key, format!("cannot read: {x}")))?;
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|x| e(cert, format!("bad PEM: {x}")))?;
    if certs.is_empty() {
        return Err(e(cert, "no certificate in the file".into()));
    }
    let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|x| e(key, format!("bad PEM: {x}")))?
        .ok_or_else(|| e(key, "no private key in the file".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|x| e(cert, x.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|x| e(key, x.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Wraps the app: counts requests and statuses, logs at debug level.
fn handle(
    app: Arc<dyn App>,
    metrics: Arc<HttpMetrics>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> impl std::future::Future<Output = Result<Response<Body>, std::convert::Infallible>> {
    // What the debug log line needs, only when it is on.
    let log = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        (
            Instant::now(),
            req.method().clone(),
            req.uri().path().to_string(),
        )
    });
    metrics.requests.fetch_add(1, Ordering::Relaxed);
    #[cfg(debug_assertions)]
    test_panic(req.uri().path());
    let fut = app.call(req, peer);
    async move {
        let mut resp = fut.await;
        secure_headers(resp.headers_mut());
        let status = resp.status().as_u16();
        metrics.count_status(status);
        if let Some((start, method, path)) = log {
            let duration_ms = start.elapsed().as_millis() as u64;
            tracing::debug!(%peer, %method, %path, status, duration_ms, "http request");
        }
        Ok(resp)
    }
}

/// Debug builds only: a request for `$RACKBOOT_TEST_PANIC_PATH` panics, so the tests
/// can show that a panic while handling a request ends that connection and nothing
/// else (the shipped, release-built binary has no such path).
#[cfg(debug_assertions)]
fn test_panic(path: &str) {
    static PATH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = PATH.get_or_init(|| std::env::var("RACKBOOT_TEST_PANIC_PATH").ok());
    if armed.as_deref() == Some(path) {
        panic!("test panic while handling {path}");
    }
}

/// What every response is sent with unless its route set its own: no content type
/// sniffing, and a policy under which a served file can run nothing and reach
/// nothing on the rack's origin (upstream content is never trusted as a page).
pub const SANDBOX_CSP: &str = "default-src 'none'; sandbox";

fn secure_headers(h: &mut hyper::HeaderMap) {
    use hyper::header::{HeaderValue, CONTENT_SECURITY_POLICY, X_CONTENT_TYPE_OPTIONS};
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.entry(CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(SANDBOX_CSP));
}

/// A listening address, plain or TLS.
pub struct Listener {
    /// Either one socket per connection thread (an SO_REUSEPORT group from
    /// [`bind_group`]), or one socket that every thread accepts on (one passed by
    /// systemd).
    pub sockets: Vec<std::net::TcpListener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// How many connection threads serve HTTP: one per core.
pub fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Binds `addr` as `n` listening sockets of one SO_REUSEPORT group, each with a long
/// accept queue (a rack of machines powered on together connects at once; std's
/// queue of 128 drops SYNs beyond it, and a dropped SYN costs the client a second).
///
/// The kernel deals connections out over the group, and a connection wakes only the
/// thread owning its socket. With one socket shared by all threads every thread wakes
/// for every connection and the first to run takes it; with a local client that is
/// the client's own CPU, and the two then take turns on one core (perf sched showed
/// it; 0.86x nginx on a 200 MiB download, against 1.0x with one wake-up).
///
/// Binding first without SO_REUSEPORT keeps "address in use" an error: a group would
/// otherwise quietly share the port with another rackboot of the same user.
pub fn bind_group(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    drop(std::net::TcpListener::bind(addr)?);
    let mut at = addr;
    let mut group = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&at.into())?;
        s.listen(nix::libc::SOMAXCONN)?;
        let l = std::net::TcpListener::from(s);
        // Port 0: the others join the port the first one got.
        at = l.local_addr()?;
        group.push(l);
    }
    Ok(group)
}

/// What every connection task needs.
#[derive(Clone)]
struct Shared {
    app: Arc<dyn App>,
    limits: HttpLimits,
    metrics: Arc<HttpMetrics>,
}

/// Serves `listeners` until `shutdown`; then stops accepting, lets open connections
/// finish their requests for up to `drain_deadline`, and returns. The connection
/// limit counts plain and TLS connections together.
pub async fn serve(
    listeners: Vec<Listener>,
    app: Arc<dyn App>,
    limits: HttpLimits,
    metrics: Arc<HttpMetrics>,
    shutdown: CancellationToken,
    drain_deadline: Duration,
) -> std::io::Result<()> {
    let mut ports = Vec::new();
    for l in listeners {
        let acceptor = l.tls.map(tokio_rustls::TlsAcceptor::from);
        let shared = l.sockets.len() == 1;
        for (index, socket) in l.sockets.into_iter().enumerate() {
            socket.set_nonblocking(true)?;
            let addr = socket.local_addr()?;
            if index == 0 {
                tracing::info!(
                    "listening for {} on {addr}",
                    if acceptor.is_some() { "HTTPS" } else { "HTTP" }
                );
            }
            ports.push(Port {
                socket,
                addr,
                acceptor: acceptor.clone(),
                owner: (!shared).then_some(index),
            });
        }
    }
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let accept = Accept {
        shared: Shared {
            app,
            limits,
            metrics,
        },
        slots,
        graceful: graceful.clone(),
        shutdown: shutdown.clone(),
        last_warn: Arc::new(std::sync::Mutex::new(None)),
        per_client: Arc::new(PerClient::default()),
    };
    // Every accept loop holds a sender; all of them gone means no loop is left.
    let (alive, mut loops_left) = tokio::sync::mpsc::channel::<()>(1);
    let orphans = workers::start(&ports, &accept, &alive);
    // The loops hold their own descriptors: a socket closes when its last loop ends,
    // so nothing waits in an accept queue that no one reads while connections drain.
    drop(ports);
    if !orphans.is_empty() {
        // Sockets whose thread could not start: accept and serve on this runtime.
        let tracker = tokio_util::task::TaskTracker::new();
        for port in orphans {
            let listener = port.listen()?;
            let (accept, alive, tracker) = (accept.clone(), alive.clone(), tracker.clone());
            tokio::spawn(async move {
                accept.run(&listener, &tracker).await;
                drop(accept);
                drop(alive);
            });
        }
    }
    drop((alive, accept));
    shutdown.cancelled().await;
    while loops_left.recv().await.is_some() {}
    // Only the accept loops held the Arc; connections hold watchers.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        unreachable!("accept loops have ended")
    };
    if tokio::time::timeout(drain_deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("http: drain deadline passed with connections still open");
    }
    Ok(())
}

/// A listening socket and what its connections start with.
struct Port {
    socket: std::net::TcpListener,
    addr: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Its index in an SO_REUSEPORT group (the thread `owner % threads` accepts on
    /// it), or `None` for a socket every thread accepts on.
    owner: Option<usize>,
}

/// One of a port's accept loops: the listener on the current runtime.
struct Listening {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl Port {
    fn try_clone(&self) -> std::io::Result<Port> {
        Ok(Port {
            socket: self.socket.try_clone()?,
            addr: self.addr,
            acceptor: self.acceptor.clone(),
            owner: self.owner,
        })
    }

    /// Whether thread `i` of `n` accepts on this socket.
    fn served_by(&self, i: usize, n: usize) -> bool {
        self.owner.is_none_or(|o| o % n == i)
    }

    /// The socket on the current thread's runtime.
    fn listen(self) -> std::io::Result<Listening> {
        Ok(Listening {
            listener: tokio::net::TcpListener::from_std(self.socket)?,
            addr: self.addr,
            acceptor: self.acceptor,
        })
    }
}

/// What an accept loop needs; shared by all of them.
#[derive(Clone)]
struct Accept {
    shared: Shared,
    /// The connection limit.
    slots: Arc<tokio::sync::Semaphore>,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    shutdown: CancellationToken,
    /// When the limit was last logged (once per 10 s at most).
    last_warn: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Open connections by client address.
    per_client: Arc<PerClient>,
}

/// Open connections by client address, and when the per-client limit was last logged.
#[derive(Default)]
struct PerClient {
    open: std::sync::Mutex<HashMap<IpAddr, usize>>,
    last_warn: std::sync::Mutex<Option<Instant>>,
}

/// One connection counted against its client's limit; uncounted when dropped.
struct ClientSlot {
    clients: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    /// Counts a connection from `ip`, unless `ip` already has `max` open.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        // An IPv4 client on a dual-stack socket is one client whichever way it shows.
        let ip = ip.to_canonical();
        let mut open = self.open.lock().expect("per-client lock");
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            clients: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().expect("per-client lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Accept {
    /// Accepts connections on `l` and serves each on the current thread, until
    /// shutdown.
    async fn run(&self, l: &Listening, connections: &tokio_util::task::TaskTracker) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = l.listener.accept() => match r {
                    // (A connection another thread took first is not an error:
                    // tokio waits for the next one.)
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept on {}: {e}", l.addr);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.shared
                    .metrics
                    .connections_rejected
                    .fetch_add(1, Ordering::Relaxed);
                let mut last = self.last_warn.lock().expect("warn lock");
                if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(
                        "http connection limit reached ({}), refusing {peer}",
                        self.shared.limits.max_connections
                    );
                    *last = Some(Instant::now());
                }
                drop(stream);
                continue;
            };
            let limit = self.shared.limits.max_connections_per_client;
            let Some(client_slot) = self.per_client.take(peer.ip(), limit) else {
                self.shared
                    .metrics
                    .connections_rejected
                    .fetch_add(1, Ordering::Relaxed);
                let mut last = self.per_client.last_warn.lock().expect("warn lock");
                if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(
                        "http: {} has {limit} connections open (http.max_connections_per_client), refusing more",
                        peer.ip().to_canonical()
                    );
                    *last = Some(Instant::now());
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (shared, acceptor, watcher) = (
                self.shared.clone(),
                l.acceptor.clone(),
                self.graceful.watcher(),
            );
            // A panic while serving the connection ends this task only (tokio catches
            // it; release builds unwind, see Cargo.toml): the guards below are
            // dropped either way, so the slots and the gauge come back.
            connections.spawn(async move {
                let _open = OpenGauge::enter(shared.metrics.clone());
                connection(shared, stream, peer, acceptor, watcher).await;
                drop(client_slot);
                drop(permit);
            });
        }
    }
}

/// Counts a connection in `connections_open` while it lives, however it ends.
struct OpenGauge(Arc<HttpMetrics>);

impl OpenGauge {
    fn enter(m: Arc<HttpMetrics>) -> OpenGauge {
        m.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenGauge(m)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connection threads, one per core, each with a single-threaded runtime that
/// accepts on its sockets itself and serves what it accepted: a connection lives on
/// the thread whose accept woke up for it, from accept to close, with no hand-over
/// between threads, no work-stealing and no cross-thread wake-ups.
mod workers {
    use super::*;

    /// Starts the threads, each with its sockets; returns the sockets left without
    /// a thread (all of them when none could be started).
    pub(super) fn start(
        ports: &[Port],
        accept: &Accept,
        alive: &tokio::sync::mpsc::Sender<()>,
    ) -> Vec<Port> {
        let n = worker_count();
        let mut orphans = Vec::new();
        let mut started = 0;
        for i in 0..n {
            let mine: std::io::Result<Vec<Port>> = ports
                .iter()
                .filter(|p| p.served_by(i, n))
                .map(Port::try_clone)
                .collect();
            let spawned = mine.and_then(|mine| spawn(i, mine, accept.clone(), alive.clone()));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::warn!("http worker {i}: cannot start: {e}");
                    orphans.extend(
                        ports
                            .iter()
                            .filter(|p| p.owner.is_some() && p.served_by(i, n))
                            .filter_map(|p| p.try_clone().ok()),
                    );
                }
            }
        }
        if started == 0 {
            return ports.iter().filter_map(|p| p.try_clone().ok()).collect();
        }
        orphans
    }

    /// Starts thread `i` with its sockets; returns once its runtime runs (or could
    /// not be built).
    fn spawn(
        i: usize,
        ports: Vec<Port>,
        accept: Accept,
        alive: tokio::sync::mpsc::Sender<()>,
    ) -> std::io::Result<()> {
        let (ready, started_up) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => {
                        let _ = ready.send(Ok(()));
                        run(i, rt, ports, accept, alive)
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })?;
        started_up
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread ended")))
    }

    /// One worker thread: its accept loops, then the connections it still serves.
    fn run(
        i: usize,
        rt: tokio::runtime::Runtime,
        ports: Vec<Port>,
        accept: Accept,
        alive: tokio::sync::mpsc::Sender<()>,
    ) {
        rt.block_on(async move {
            // Files of a generation no longer served are let go of within seconds,
            // even when no request comes.
            tokio::spawn(async {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    files::open_files::release_if_orphaned();
                }
            });
            let connections = tokio_util::task::TaskTracker::new();
            let mut loops = tokio::task::JoinSet::new();
            for port in ports {
                let addr = port.addr;
                match port.listen() {
                    Ok(l) => {
                        let (accept, connections) = (accept.clone(), connections.clone());
                        loops.spawn(async move { accept.run(&l, &connections).await });
                    }
                    Err(e) => tracing::error!("http worker {i}: cannot listen on {addr}: {e}"),
                }
            }
            while loops.join_next().await.is_some() {}
            // The loops are done: let go of the shared state before saying so.
            drop(accept);
            drop(alive);
            connections.close();
            connections.wait().await;
        });
    }
}

/// Serves one connection to its end (TLS handshake first when `acceptor` is set).
async fn connection(
    shared: Shared,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let Shared {
        app,
        limits,
        metrics,
    } = shared;
    let svc = {
        let metrics = metrics.clone();
        hyper::service::service_fn(move |req| handle(app.clone(), metrics.clone(), peer, req))
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        // Queue body frames instead of copying them: sendfile relies on seeing each
        // frame's own memory (see `sendfile`).
        .writev(true)
        // GRUB's http module matches header names case-sensitively
        // ("Content-Length: "); without its length it waits for the body to end
        // and hangs on a keep-alive connection.
        .title_case_headers(true)
        .keep_alive(true);
    // Dropping the connection future on a stall closes the socket and drops the
    // body, which lets go of its snapshot.
    let stall = Arc::new(progress::Stall::default());
    let stalled = || {
        tracing::info!(
            %peer,
            "http: closing a connection that made no send progress for {:?} (http.send_timeout)",
            limits.send_timeout
        );
        metrics.count_error(HttpErrorKind::SendTimeout);
    };
    let result = match acceptor {
        Some(acc) => {
            let tls =
                match tokio::time::timeout(limits.header_read_timeout, acc.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        metrics.count_error(HttpErrorKind::Connection);
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        metrics.count_error(HttpErrorKind::HeaderTimeout);
                        return;
                    }
                };
            let io = progress::Watched::new(tls, stall.clone());
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc));
            tokio::select! {
                r = conn => r,
                () = stall.expired(limits.send_timeout) => return stalled(),
            }
        }
        None => {
            let pending = Arc::new(sendfile::Pending::default());
            let io = sendfile::SendfileStream::new(stream, pending.clone());
            let io = progress::Watched::new(io, stall.clone());
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            let conn = sendfile::scope(pending, watcher.watch(conn));
            tokio::select! {
                r = conn => r,
                () = stall.expired(limits.send_timeout) => return stalled(),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "http connection: {e}");
        metrics.count_connection_error(&e);
    }
}
