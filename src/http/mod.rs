//! HTTP/1.1 server core on hyper: already-bound listeners in, one task per
//! connection, keep-alive, limits (header size → 431, header read timeout against
//! slowloris, connection count), optional TLS (rustls), graceful drain on shutdown.
//! Routing is the `App`'s job; [`files::StaticFiles`] serves a directory tree.

pub mod files;
pub mod sendfile;

use std::net::SocketAddr;
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
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_header_bytes: 16 << 10,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
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
    /// Errors by kind (`HTTP_ERROR_KINDS`).
    pub errors: [AtomicU64; HTTP_ERROR_KINDS.len()],
    /// Bytes and requests by file class (`crate::metrics::FILE_CLASSES`).
    pub class_bytes: [AtomicU64; crate::metrics::FILE_CLASSES.len()],
    pub class_requests: [AtomicU64; crate::metrics::FILE_CLASSES.len()],
}

/// Kinds of HTTP errors, in the order of `HttpMetrics::errors`: error responses of
/// the routes, then connection-level failures that hyper answers or closes itself.
pub const HTTP_ERROR_KINDS: [&str; 10] = [
    "bad_request",
    "unauthorized",
    "not_found",
    "range_not_satisfiable",
    "other_4xx",
    "server_error",
    "header_too_large",
    "header_timeout",
    "malformed",
    "connection",
];

const ERR_TOO_LARGE: usize = 6;
const ERR_TIMEOUT: usize = 7;
const ERR_MALFORMED: usize = 8;
const ERR_CONNECTION: usize = 9;

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
            400 => 0,
            401 | 403 => 1,
            404 => 2,
            416 => 3,
            402..=499 => 4,
            500.. => 5,
            _ => return,
        };
        self.errors[kind].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection that hyper ended with an error.
    fn count_connection_error(&self, e: &hyper::Error) {
        let kind = if e.is_parse_too_large() {
            ERR_TOO_LARGE
        } else if e.is_timeout() {
            ERR_TIMEOUT
        } else if e.is_parse() || e.is_parse_status() {
            ERR_MALFORMED
        } else {
            ERR_CONNECTION
        };
        self.errors[kind].fetch_add(1, Ordering::Relaxed);
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
    let fut = app.call(req, peer);
    async move {
        let resp = fut.await;
        let status = resp.status().as_u16();
        metrics.count_status(status);
        if let Some((start, method, path)) = log {
            let duration_ms = start.elapsed().as_millis() as u64;
            tracing::debug!(%peer, %method, %path, status, duration_ms, "http request");
        }
        Ok(resp)
    }
}

/// A bound listening socket, plain or TLS.
pub struct Listener {
    pub socket: std::net::TcpListener,
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let shared = Shared {
        app,
        limits,
        metrics,
    };
    let workers = Workers::start(&shared);
    let mut accept_tasks = tokio::task::JoinSet::new();
    for l in listeners {
        l.socket.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(l.socket)?;
        let addr = listener.local_addr()?;
        let acceptor = l.tls.map(tokio_rustls::TlsAcceptor::from);
        tracing::info!(
            "listening for {} on {addr}",
            if acceptor.is_some() { "HTTPS" } else { "HTTP" }
        );
        let (shared, shutdown, graceful, slots, workers) = (
            shared.clone(),
            shutdown.clone(),
            graceful.clone(),
            slots.clone(),
            workers.clone(),
        );
        accept_tasks.spawn(async move {
            let mut last_warn: Option<Instant> = None;
            loop {
                let (stream, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("accept on {addr}: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    shared
                        .metrics
                        .connections_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(
                            "http connection limit reached ({}), refusing {peer}",
                            shared.limits.max_connections
                        );
                        last_warn = Some(Instant::now());
                    }
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // The stream leaves this runtime's reactor for its worker's.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, "cannot hand the connection over: {e}");
                        continue;
                    }
                };
                let accepted = Accepted {
                    stream,
                    peer,
                    acceptor: acceptor.clone(),
                    watcher: graceful.watcher(),
                    permit,
                };
                if let Err(accepted) = workers.send(accepted) {
                    // No worker thread: serve it on this runtime.
                    tokio::spawn(accepted.run(shared.clone()));
                }
            }
        });
    }
    shutdown.cancelled().await;
    while accept_tasks.join_next().await.is_some() {}
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

/// An accepted connection on its way to a worker thread.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    watcher: hyper_util::server::graceful::Watcher,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl Accepted {
    /// Serves the connection on the current runtime.
    async fn run(self, shared: Shared) {
        let Ok(stream) = tokio::net::TcpStream::from_std(self.stream) else {
            return;
        };
        let m = shared.metrics.clone();
        m.connections_open.fetch_add(1, Ordering::Relaxed);
        connection(shared, stream, self.peer, self.acceptor, self.watcher).await;
        m.connections_open.fetch_sub(1, Ordering::Relaxed);
        drop(self.permit);
    }
}

/// Connection threads, one per core, each with a single-threaded runtime: a
/// connection lives on one thread from accept to close, with no work-stealing and
/// no cross-thread wake-ups. Accepted connections are dealt out round-robin. When
/// the accept loops end (shutdown), a worker serves what it has to the end.
#[derive(Clone)]
struct Workers {
    senders: Arc<Vec<tokio::sync::mpsc::UnboundedSender<Accepted>>>,
    next: Arc<AtomicU64>,
}

impl Workers {
    fn start(shared: &Shared) -> Workers {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut senders = Vec::new();
        for i in 0..n {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!("http worker {i}: cannot start a runtime: {e}");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        // Files of a generation no longer served are let go of
                        // within seconds, even when no request comes.
                        tokio::spawn(async {
                            let mut tick = tokio::time::interval(Duration::from_secs(5));
                            loop {
                                tick.tick().await;
                                files::open_files::release_if_orphaned();
                            }
                        });
                        let tracker = tokio_util::task::TaskTracker::new();
                        while let Some(accepted) = rx.recv().await {
                            tracker.spawn(accepted.run(shared.clone()));
                        }
                        tracker.close();
                        tracker.wait().await;
                    });
                });
            match spawned {
                Ok(_) => senders.push(tx),
                Err(e) => tracing::warn!("http worker {i}: cannot start a thread: {e}"),
            }
        }
        Workers {
            senders: Arc::new(senders),
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Hands `accepted` to the next worker; gives it back when none is running.
    fn send(&self, accepted: Accepted) -> Result<(), Accepted> {
        let n = self.senders.len();
        let mut accepted = accepted;
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % n;
            match self.senders[i].send(accepted) {
                Ok(()) => return Ok(()),
                Err(back) => accepted = back.0,
            }
        }
        Err(accepted)
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
    let result = match acceptor {
        Some(acc) => {
            let tls =
                match tokio::time::timeout(limits.header_read_timeout, acc.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        metrics.errors[ERR_CONNECTION].fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        metrics.errors[ERR_TIMEOUT].fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            watcher.watch(conn).await
        }
        None => {
            let pending = Arc::new(sendfile::Pending::default());
            let io = sendfile::SendfileStream::new(stream, pending.clone());
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            sendfile::scope(pending, watcher.watch(conn)).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "http connection: {e}");
        metrics.count_connection_error(&e);
    }
}
