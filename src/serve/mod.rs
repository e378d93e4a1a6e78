//! `rackboot serve`: the long-running rack service.
//!
//! Binds (or takes from systemd) the TFTP and HTTP sockets, loads the last good
//! snapshot and serves it at once, then syncs on start and every `sync.interval`
//! (with jitter; exponential backoff after failures, never longer than the interval).
//! Sync and serving meet only through a `watch` channel carrying `Arc<Snapshot>`: a
//! request resolves the snapshot once and keeps it for its whole life, so a transfer
//! that started on the old snapshot finishes on it.

/// What a booting machine gets: boot configs from the snapshot + settings, else files.
pub mod boot;
/// Per machine, the recent events of its boots (memory only, bounded).
pub mod bootlog;
/// ProxyDHCP's hooks into the daemon (per-MAC overrides, the boot report).
pub mod dhcp;
/// `/metrics` (Prometheus text format).
pub mod metrics;
/// The HTTP routes (API, metrics, re-exported stream, files).
pub mod routes;
/// The status document the API writes and the CLI reads.
pub mod status;
/// The scheduled store check.
mod verify;
/// The Images page (server-rendered HTML, pure).
pub mod web;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Settings};
use crate::simplestreams::Sha256;
use crate::store::{Manifest, Store};
use crate::sync::{self, LiveProgress, ProgressMode};
use crate::systemd;

/// A published snapshot, as the servers see it.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    /// `state_dir/snapshots/<generation>` (not `current`: a request keeps its tree).
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Upstream item path → blob, for the re-exported stream.
    pub payloads: BTreeMap<String, Sha256>,
    /// Unix seconds when it was created.
    pub created: u64,
    /// `dir`, opened once: files are resolved beneath it with one `openat2`.
    pub root: Arc<std::os::fd::OwnedFd>,
}

impl Snapshot {
    /// Loads what `current` points at, if anything.
    pub fn load_current(store: &Store) -> anyhow::Result<Option<Snapshot>> {
        let Some(generation) = store.current_generation() else {
            return Ok(None);
        };
        Snapshot::load(store, generation).map(Some)
    }

    /// Loads generation `generation` of the store.
    pub fn load(store: &Store, generation: u64) -> anyhow::Result<Snapshot> {
        let manifest = store.read_manifest(generation)?;
        let payloads = manifest
            .products
            .iter()
            .flat_map(|p| p.items.iter().map(|i| (i.path.clone(), i.sha256)))
            .collect();
        let dir = store.snapshot_dir(generation);
        let root = Arc::new(
            crate::fsutil::open_dir(&dir)
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", dir.display()))?,
        );
        Ok(Snapshot {
            generation,
            root,
            dir,
            created: manifest.created,
            manifest,
            payloads,
        })
    }
}

/// How the periodic sync is doing (the status API and `/metrics` read it).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SyncStatus {
    pub running: bool,
    pub runs: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    pub last_started: Option<u64>,
    pub last_finished: Option<u64>,
    /// `"ok"`, `"unchanged"` or `"failed"`.
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    pub last_duration_ms: Option<u64>,
    pub bytes_fetched_total: u64,
    pub next_sync: Option<u64>,
}

/// Everything the servers and the sync loop share.
pub struct Daemon {
    pub config_path: PathBuf,
    settings: RwLock<Arc<Settings>>,
    /// What is served; read through [`Daemon::current`], which tells GC what requests hold.
    snapshot: watch::Sender<Option<Arc<Snapshot>>>,
    pub status: Mutex<SyncStatus>,
    pub live: Arc<LiveProgress>,
    pub trigger: Notify,
    /// Stops the sync in progress, if any (`POST /api/v1/sync/stop`).
    pub sync_stop: Mutex<Option<CancellationToken>>,
    pub tftp_metrics: Arc<crate::tftp::TftpMetrics>,
    pub http_metrics: Arc<crate::http::HttpMetrics>,
    pub dhcp_metrics: Arc<crate::dhcp::DhcpMetrics>,
    pub sync_duration_ms_total: AtomicU64,
    /// The HTTP listeners' addresses (for URLs in boot configs).
    http_addrs: Vec<SocketAddr>,
    /// Snapshots handed out to requests; their generations are not collected while
    /// any request still holds them.
    handed_out: Mutex<Vec<Weak<Snapshot>>>,
    /// This daemon's entry in `state_dir/serving/`: what GC must keep for it.
    registration: Mutex<Option<crate::store::ServerRegistration>>,
    /// The generation `current` named when loading it last failed (said once).
    failed_load: Mutex<Option<u64>>,
    register_failed: std::sync::atomic::AtomicBool,
    follow_failed: std::sync::atomic::AtomicBool,
    pub started: Instant,
    /// Set by `POST /api/v1/sync` with `{"allow_downgrade": true}`: the next sync
    /// accepts signed metadata older than what was seen before (taken by that sync).
    pub allow_downgrade_once: std::sync::atomic::AtomicBool,
    /// What booting machines asked for (`/api/v1/boots`, `rackboot boots`).
    pub boots: Arc<bootlog::BootLog>,
}

/// A generation as the log and STATUS= lines say it: its number, or `none`.
struct Generation(Option<u64>);

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(g) => write!(f, "{g}"),
            None => f.write_str("none"),
        }
    }
}

impl Daemon {
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// The snapshot served now, to report on (status, metrics, the page); a request
    /// that serves its files takes [`Daemon::current`] instead.
    pub fn shown(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.borrow().clone()
    }

    /// The generation served now.
    fn served_generation(&self) -> Option<u64> {
        self.snapshot.borrow().as_ref().map(|s| s.generation)
    }

    /// The snapshot to serve a request from (kept alive by the returned Arc).
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        let snap = self.snapshot.borrow().clone()?;
        let mut handed = self.handed_out.lock().expect("lock");
        if handed.len() > 64 {
            handed.retain(|w| w.strong_count() > 0);
        }
        if !handed.iter().any(|w| w.as_ptr() == Arc::as_ptr(&snap)) {
            handed.push(Arc::downgrade(&snap));
        }
        Some(snap)
    }

    /// Makes the served snapshot the one `current` names, whoever switched it (this
    /// daemon's sync, `rackboot sync`, `boot-resources import` run elsewhere), and
    /// keeps this daemon's registration (served + held by requests) up to date for
    /// GC. Blocking (GC lock, manifest read): run it off the async workers.
    pub fn follow_current(&self) {
        let store = Store::existing(&self.settings().state_dir);
        // Short: GC may hold it while it deletes; the next round retries.
        let _gc = match store.gc_lock(Duration::from_millis(500)) {
            Ok(l) => {
                self.follow_failed.store(false, Ordering::Relaxed);
                l
            }
            Err(e) => {
                if !self.follow_failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!("cannot check what current names (retrying): {e:#}");
                }
                return;
            }
        };
        let served = self.served_generation();
        let current = store.current_generation();
        let mut keep = self.pinned();
        keep.extend(served);
        if current.is_none() || current == served {
            self.register(&keep);
            return;
        }
        let g = current.expect("checked");
        // Registered before it is opened: GC (which waits for the lock we hold)
        // will keep it from now on.
        keep.insert(g);
        if !self.register(&keep) {
            // Unregistered, GC could delete it under us: stay on what is served.
            return;
        }
        match Snapshot::load_current(&store) {
            Ok(Some(snap)) if snap.generation == g => {
                let snap = Arc::new(snap);
                self.handed_out
                    .lock()
                    .expect("lock")
                    .push(Arc::downgrade(&snap));
                tracing::info!("serving generation {g} (was {})", Generation(served));
                self.snapshot.send_replace(Some(snap));
                // The old generation stays registered only while a request holds it.
                let mut now = self.pinned();
                now.insert(g);
                self.register(&now);
                *self.failed_load.lock().expect("lock") = None;
                systemd::notify(&format!("STATUS=serving generation {g}"));
            }
            Ok(_) => {}
            Err(e) => {
                let mut failed = self.failed_load.lock().expect("lock");
                if *failed != Some(g) {
                    tracing::error!(
                        "current names generation {g} but it cannot be loaded; still serving generation {}: {e:#}",
                        Generation(served)
                    );
                    *failed = Some(g);
                }
            }
        }
    }

    /// Records `gens` as this daemon's registration; false when it cannot be
    /// written.
    fn register(&self, gens: &BTreeSet<u64>) -> bool {
        let mut reg = self.registration.lock().expect("lock");
        let Some(r) = reg.as_mut() else {
            return false;
        };
        match r.set(gens) {
            Ok(()) => {
                self.register_failed.store(false, Ordering::Relaxed);
                true
            }
            Err(e) => {
                // Retried every round; said once per failure spell.
                if !self.register_failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!("cannot register the served generations {gens:?} for GC: {e:#}");
                }
                false
            }
        }
    }

    /// Generations still in use by requests in flight.
    pub fn pinned(&self) -> BTreeSet<u64> {
        let mut handed = self.handed_out.lock().expect("lock");
        handed.retain(|w| w.strong_count() > 0);
        handed
            .iter()
            .filter_map(|w| w.upgrade().map(|s| s.generation))
            .collect()
    }

    /// The HTTP port to name in URLs for a client that reached us at `local`: that of
    /// the listener on `local` itself, else of a wildcard listener of its family, else
    /// the first listener's (5248 with none).
    pub fn http_port_for(&self, local: std::net::IpAddr) -> u16 {
        let on = |f: &dyn Fn(&SocketAddr) -> bool| {
            self.http_addrs.iter().find(|a| f(a)).map(|a| a.port())
        };
        on(&|a| a.ip() == local)
            .or_else(|| on(&|a| a.ip().is_unspecified() && a.is_ipv6() == local.is_ipv6()))
            .or_else(|| on(&|a| a.ip().is_unspecified()))
            .or_else(|| self.http_addrs.first().map(|a| a.port()))
            .unwrap_or(5248)
    }

    pub fn status(&self) -> SyncStatus {
        self.status.lock().expect("status lock").clone()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The delay before the next periodic sync: the interval ±10 % jitter after success;
/// 15 s doubling per consecutive failure after a failure, capped at the interval.
pub fn next_delay(interval: Duration, consecutive_failures: u32, jitter_unit: f64) -> Duration {
    if consecutive_failures > 0 {
        let base = Duration::from_secs(15)
            .saturating_mul(1u32 << consecutive_failures.saturating_sub(1).min(16));
        return base.min(interval);
    }
    let jitter = interval.as_secs_f64() * 0.1 * (2.0 * jitter_unit - 1.0);
    Duration::from_secs_f64((interval.as_secs_f64() + jitter).max(1.0))
}

fn jitter_unit() -> f64 {
    // Good enough randomness for spreading racks' syncs apart.
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2654435761);
    (n % 10_000) as f64 / 10_000.0
}

/// Runs one sync and records its outcome; then serves what `current` names.
/// Runs one sync as a task of its own: a panic in it (a bug) fails that sync, named
/// in the status and the log, and the daemon goes on serving what `current` names.
async fn run_isolated(
    settings: Arc<Settings>,
    opts: sync::Options,
    live: Arc<sync::LiveProgress>,
) -> anyhow::Result<sync::Report> {
    let task = tokio::spawn(async move {
        // Debug builds only: lets the tests show what a panicking sync does.
        #[cfg(debug_assertions)]
        if std::env::var_os("RACKBOOT_TEST_PANIC_SYNC").is_some() {
            panic!("test panic in a sync");
        }
        sync::run(&settings, &opts, live).await
    });
    match task.await {
        Ok(result) => result,
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(anyhow::anyhow!(
                "the sync panicked ({what}); this is a bug, please report it"
            ))
        }
        Err(e) => Err(anyhow::anyhow!("the sync task ended: {e}")),
    }
}

pub async fn sync_once(d: &Arc<Daemon>) {
    let settings = d.settings();
    {
        let mut st = d.status.lock().expect("lock");
        d.live.reset();
        st.running = true;
        st.last_started = Some(now_unix());
    }
    systemd::notify("STATUS=syncing images");
    let stop = tokio_util::sync::CancellationToken::new();
    *d.sync_stop.lock().expect("lock") = Some(stop.clone());
    let opts = sync::Options {
        // A replay is refused unless the operator asked for this one sync.
        allow_downgrade: d.allow_downgrade_once.swap(false, Ordering::Relaxed),
        dry_run: false,
        wait: true,
        progress: ProgressMode::Quiet,
        // What requests hold is in this daemon's registration, read by GC after
        // publish (a set taken now would keep what is served now after it is not).
        keep: BTreeSet::new(),
        stop: Some(stop),
        on_publish: Some(sync::PublishHook({
            let d = Arc::downgrade(d);
            Arc::new(move || {
                if let Some(d) = d.upgrade() {
                    d.follow_current();
                }
            })
        })),
    };
    let t = Instant::now();
    let before = d.served_generation();
    let result = run_isolated(settings.clone(), opts, d.live.clone()).await;
    *d.sync_stop.lock().expect("lock") = None;
    // Whatever the outcome (a write after publish may have failed), serve what
    // `current` names now.
    follow(d).await;
    let after = d.served_generation();
    let elapsed = t.elapsed();
    d.sync_duration_ms_total
        .fetch_add(elapsed.as_millis() as u64, Ordering::Relaxed);
    let mut st = d.status.lock().expect("lock");
    st.running = false;
    st.runs += 1;
    st.last_finished = Some(now_unix());
    st.last_duration_ms = Some(elapsed.as_millis() as u64);
    match result {
        Ok(report) => {
            st.consecutive_failures = 0;
            st.last_error = None;
            st.bytes_fetched_total += report.bytes_fetched;
            st.last_result = Some(if report.changed { "ok" } else { "unchanged" }.into());
            drop(st);
            if report.changed {
                tracing::info!(
                    bytes = report.bytes_fetched,
                    "sync published generation {}: {}",
                    report.generation.map(|g| g.to_string()).unwrap_or_default(),
                    report.changes.join(", ")
                );
                if after != report.generation {
                    tracing::error!(
                        "serving generation {} although the sync published {}",
                        Generation(after),
                        report.generation.map(|g| g.to_string()).unwrap_or_default()
                    );
                }
            } else {
                tracing::info!("sync: up to date ({} ms)", report.elapsed_ms);
            }
            systemd::notify(&format!(
                "STATUS=serving generation {}; last sync ok",
                Generation(d.served_generation())
            ));
        }
        Err(e) => {
            st.failures += 1;
            st.consecutive_failures += 1;
            st.last_result = Some("failed".into());
            // `systemctl status` shows STATUS= to every user: no URL credentials.
            let e = crate::config::redact_text(&format!("{e:#}"));
            st.last_error = Some(e.clone());
            drop(st);
            if before == after {
                tracing::error!("sync failed (still serving the last good snapshot): {e}");
            } else {
                tracing::error!(
                    "sync failed after publishing generation {}, which is served: {e}",
                    Generation(after)
                );
            }
            systemd::notify(&format!("STATUS=last sync failed: {e}"));
        }
    }
}

/// [`Daemon::follow_current`] on a blocking thread.
async fn follow(d: &Arc<Daemon>) {
    let d = d.clone();
    let _ = tokio::task::spawn_blocking(move || d.follow_current()).await;
}

/// How often the daemon checks what `current` names (one `readlink`, under the GC
/// lock): a `rackboot sync` run beside it is served within this period.
const FOLLOW_PERIOD: Duration = Duration::from_millis(250);

/// Follows `current` whoever switches it, and keeps the registration current.
async fn follow_loop(d: Arc<Daemon>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FOLLOW_PERIOD) => {}
        }
        follow(&d).await;
    }
}

/// The sync loop: once at start, then periodically (when `sync.auto`) and on demand.
async fn sync_loop(d: Arc<Daemon>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sync_once(&d) => {}
        }
        let settings = d.settings();
        let failures = d.status().consecutive_failures;
        let delay = next_delay(settings.sync.interval, failures, jitter_unit());
        let auto = settings.sync.auto;
        d.status.lock().expect("lock").next_sync = auto.then(|| now_unix() + delay.as_secs());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = d.trigger.notified() => {}
            _ = tokio::time::sleep(delay), if auto => {}
        }
    }
}

/// Says which state files this process cannot read (typically written by the CLI
/// run as another user): each would silently change what is served or synced.
fn warn_unreadable_state(state_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    for name in [
        "sources.json",
        "machines.json",
        "state.json",
        sync::CATALOG_FILE,
    ] {
        let p = state_dir.join(name);
        if let Err(e) = std::fs::File::open(&p) {
            if e.kind() == std::io::ErrorKind::NotFound {
                continue;
            }
            let owner = std::fs::metadata(&p)
                .map(|m| format!(" (owner uid {}, mode {:o})", m.uid(), m.mode() & 0o7777))
                .unwrap_or_default();
            tracing::warn!(
                "cannot read {}{owner}: {e}; run rackboot commands as the user the daemon runs as",
                p.display()
            );
        }
    }
}

/// The snapshot to serve at start: what `current` names, else (its manifest or tree
/// unreadable) the newest complete generation on disk, said in the log.
fn load_start_snapshot(store: &Store) -> Option<Snapshot> {
    let err = match Snapshot::load_current(store) {
        Ok(s) => return s,
        Err(e) => e,
    };
    let current = store.current_generation();
    let Some(g) = store.newest_readable(current) else {
        tracing::error!("cannot load what current names, and no other generation is complete: serving nothing until a sync succeeds: {err:#}");
        return None;
    };
    match Snapshot::load(store, g) {
        Ok(s) => {
            tracing::warn!(
                "cannot load generation {} (current): {err:#}; serving generation {g}, the newest complete one, until a sync publishes another",
                current.map(|g| g.to_string()).unwrap_or_default()
            );
            Some(s)
        }
        Err(e) => {
            tracing::error!("cannot load what current names ({err:#}) nor generation {g} ({e:#}): serving nothing until a sync succeeds");
            None
        }
    }
}

/// Binds a UDP socket with SO_REUSEADDR (and IPV6_V6ONLY off for `[::]`).
fn bind_udp(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(addr).map_err(|e| anyhow::anyhow!("cannot bind TFTP on {addr}: {e}"))
}

/// Binds a TCP listening address as one socket per HTTP connection thread.
fn bind_tcp(addr: SocketAddr, what: &str) -> anyhow::Result<Vec<std::net::TcpListener>> {
    crate::http::bind_group(addr, crate::http::worker_count())
        .map_err(|e| anyhow::anyhow!("cannot bind {what} on {addr}: {e}"))
}

/// Raises the soft open-files limit to the hard one: every HTTP connection, every
/// TFTP transfer and every file being sent holds a descriptor, and systemd's default
/// soft limit is 1024 (TFTP transfers would stop near 500).
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            tracing::debug!("open files limit raised from {soft} to {hard}");
        }
    }
}

/// Tidies leftovers, registers this daemon for GC and loads the snapshot to serve first.
fn open_store(
    settings: &Settings,
) -> anyhow::Result<(Option<Snapshot>, crate::store::ServerRegistration)> {
    let store = Store::open(&settings.state_dir)?;
    // Leftovers of interrupted runs, unless a sync (which may own them) is running.
    if let Ok(Some(_lock)) = store.try_lock() {
        let n = store.clean_stray();
        if n > 0 {
            tracing::info!("removed {n} leftovers of interrupted runs");
        }
    }
    warn_unreadable_state(&settings.state_dir);
    let (snapshot, registration) = {
        let _gc = store.gc_lock(Duration::from_secs(60))?;
        let mut registration = store.register_server()?;
        let snapshot = load_start_snapshot(&store);
        registration.set(&snapshot.iter().map(|s| s.generation).collect())?;
        (snapshot, registration)
    };
    match &snapshot {
        Some(s) => tracing::info!(
            "serving generation {} from {}",
            s.generation,
            s.dir.display()
        ),
        None => tracing::info!("no snapshot yet: serving nothing until the first sync"),
    }
    Ok((snapshot, registration))
}

/// The listening sockets: from systemd, else bound here.
struct Sockets {
    udp: Vec<std::net::UdpSocket>,
    /// One group per address (a socket per HTTP thread, or the one systemd passed).
    tcp: Vec<Vec<std::net::TcpListener>>,
    tls_listeners: Vec<Vec<std::net::TcpListener>>,
    tls_config: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Sockets {
    fn take(settings: &Settings) -> anyhow::Result<Sockets> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut https = Vec::new();
        for s in systemd::activated_sockets() {
            match s {
                systemd::Activated::Udp(u) => udp.push(u),
                // Every connection thread accepts on a socket systemd passed.
                systemd::Activated::Tcp(t) => tcp.push(vec![t]),
                systemd::Activated::Https(t) => https.push(vec![t]),
            }
        }
        if udp.is_empty() {
            for a in &settings.tftp.listen {
                udp.push(bind_udp(*a)?);
            }
        }
        if tcp.is_empty() {
            for a in &settings.http.listen {
                tcp.push(bind_tcp(*a, "HTTP")?);
            }
        }
        let (tls_listeners, tls_config) = match &settings.http.tls {
            Some(t) => {
                let cfg = crate::http::load_tls(&t.cert, &t.key).map_err(|e| anyhow::anyhow!("{e}"))?;
                if https.is_empty() {
                    for a in &t.listen {
                        https.push(bind_tcp(*a, "HTTPS")?);
                    }
                }
                (https, Some(cfg))
            }
            None if !https.is_empty() => anyhow::bail!(
                "systemd passed a socket named https, but http.tls_cert and http.tls_key are not set"
            ),
            None => (vec![], None),
        };
        Ok(Sockets {
            udp,
            tcp,
            tls_listeners,
            tls_config,
        })
    }
}

/// Serves until SIGTERM or SIGINT (SIGHUP reloads; the watchdog is fed); a server task
/// that ends on its own is an error.
async fn run_until_signal(
    daemon: &Arc<Daemon>,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(daemon),
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                systemd::notify("WATCHDOG=1");
            }
            Some(res) = tasks.join_next() => {
                // A server task ended on its own: that is an error.
                match res {
                    Ok(Ok(())) => anyhow::bail!("a server task stopped unexpectedly"),
                    Ok(Err(e)) => return Err(e),
                    Err(e) => anyhow::bail!("a server task failed: {e}"),
                }
            }
        }
    }
    Ok(())
}

/// Waits for the servers to finish their transfers, up to `drain` (+5 s).
async fn drain_tasks(mut tasks: tokio::task::JoinSet<anyhow::Result<()>>, drain: Duration) {
    let deadline = tokio::time::sleep(drain + Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => {
                tracing::warn!("drain deadline passed; exiting");
                break;
            }
            next = tasks.join_next() => match next {
                None => break,
                Some(Ok(Err(e))) => tracing::warn!("while stopping: {e:#}"),
                Some(_) => {}
            }
        }
    }
}

impl Daemon {
    /// The daemon's shared state at start: serving `snapshot` (handed out as the
    /// first generation requests hold), registered for GC by `registration`.
    fn new(
        config_path: &Path,
        settings: &Settings,
        snapshot: Option<Snapshot>,
        registration: crate::store::ServerRegistration,
        http_addrs: Vec<SocketAddr>,
    ) -> Arc<Daemon> {
        let (tx, _rx) = watch::channel(snapshot.map(Arc::new));
        let daemon = Arc::new(Daemon {
            config_path: config_path.to_path_buf(),
            settings: RwLock::new(Arc::new(settings.clone())),
            snapshot: tx,
            status: Mutex::new(SyncStatus::default()),
            live: Arc::new(LiveProgress::default()),
            trigger: Notify::new(),
            sync_stop: Mutex::new(None),
            tftp_metrics: Arc::new(crate::tftp::TftpMetrics::default()),
            http_metrics: Arc::new(crate::http::HttpMetrics::default()),
            dhcp_metrics: Arc::new(crate::dhcp::DhcpMetrics::default()),
            sync_duration_ms_total: AtomicU64::new(0),
            http_addrs,
            handed_out: Mutex::new(Vec::new()),
            registration: Mutex::new(Some(registration)),
            failed_load: Mutex::new(None),
            register_failed: Default::default(),
            follow_failed: Default::default(),
            started: Instant::now(),
            allow_downgrade_once: std::sync::atomic::AtomicBool::new(false),
            boots: Default::default(),
        });
        if let Some(s) = daemon.snapshot.borrow().as_ref() {
            daemon
                .handed_out
                .lock()
                .expect("lock")
                .push(Arc::downgrade(s));
        }
        daemon
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn serve(config_path: &Path, settings: Settings) -> anyhow::Result<()> {
    raise_open_files_limit();
    // A state file that does not load: refuse with the file and the fix, touch nothing.
    crate::fsck::refuse_bad_state(&settings.state_dir)?;
    let (snapshot, registration) = open_store(&settings)?;
    let Sockets {
        udp,
        tcp,
        tls_listeners,
        tls_config,
    } = Sockets::take(&settings)?;
    let dhcp_sockets = dhcp::bind(&settings)?;

    let http_addrs = tcp
        .iter()
        .filter_map(|group| group.first()?.local_addr().ok())
        .collect();
    let daemon = Daemon::new(config_path, &settings, snapshot, registration, http_addrs);
    let shutdown = CancellationToken::new();
    let drain = settings.drain_timeout;
    let mut tasks = tokio::task::JoinSet::new();

    if !udp.is_empty() {
        let resolver = Arc::new(crate::serve::boot::TftpResolver::new(daemon.clone()));
        let cfg = crate::tftp::TftpConfig {
            max_blksize: settings.tftp.max_blksize,
            max_windowsize: settings.tftp.max_windowsize,
            max_transfers: settings.tftp.max_transfers,
            max_transfers_per_client: settings.tftp.max_transfers_per_client,
            ..Default::default()
        };
        let (m, s) = (daemon.tftp_metrics.clone(), shutdown.clone());
        tasks.spawn(async move {
            crate::tftp::serve(udp, resolver, cfg, m, s, drain)
                .await
                .map_err(|e| anyhow::anyhow!("tftp server: {e}"))
        });
    }
    let app: Arc<dyn crate::http::App> = Arc::new(crate::serve::routes::Api::new(daemon.clone()));
    let limits = crate::http::HttpLimits {
        header_read_timeout: settings.http.header_timeout,
        max_connections: settings.http.max_connections,
        max_connections_per_client: settings.http.max_connections_per_client,
        send_timeout: settings.http.send_timeout,
        ..Default::default()
    };
    let http_listeners: Vec<crate::http::Listener> = tcp
        .into_iter()
        .map(|sockets| crate::http::Listener { sockets, tls: None })
        .chain(
            tls_listeners
                .into_iter()
                .map(|sockets| crate::http::Listener {
                    sockets,
                    tls: tls_config.clone(),
                }),
        )
        .collect();
    if !http_listeners.is_empty() {
        let (s, m) = (shutdown.clone(), daemon.http_metrics.clone());
        tasks.spawn(async move {
            crate::http::serve(http_listeners, app, limits, m, s, drain)
                .await
                .map_err(|e| anyhow::anyhow!("http server: {e}"))
        });
    }
    dhcp::spawn(&daemon, dhcp_sockets, &shutdown, &mut tasks);
    // The sockets are bound and the last snapshot (or none) is loaded: ready, before
    // the first sync can report anything.
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving generation {}",
        Generation(daemon.served_generation())
    ));
    {
        let (d, s) = (daemon.clone(), shutdown.clone());
        tasks.spawn(async move {
            sync_loop(d, s).await;
            Ok(())
        });
    }
    {
        let (d, s) = (daemon.clone(), shutdown.clone());
        tasks.spawn(async move {
            follow_loop(d, s).await;
            Ok(())
        });
    }
    {
        let (d, s) = (daemon.clone(), shutdown.clone());
        tasks.spawn(async move {
            verify::verify_loop(d, s).await;
            Ok(())
        });
    }

    run_until_signal(&daemon, &mut tasks).await?;
    tracing::info!("stopping: draining transfers (up to {} s)", drain.as_secs());
    systemd::notify("STOPPING=1");
    shutdown.cancel();
    drain_tasks(tasks, drain).await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: re-read the config; settings that need new sockets are reported.
fn reload(d: &Daemon) {
    match config::load(&d.config_path) {
        Ok(new) => {
            let old = d.settings();
            if new.tftp.listen != old.tftp.listen || new.http.listen != old.http.listen {
                tracing::warn!(
                    "listen addresses changed in {}: restart rackboot to apply them",
                    d.config_path.display()
                );
            }
            let tls = |s: &Settings| {
                s.http
                    .tls
                    .as_ref()
                    .map(|t| (t.listen.clone(), t.cert.clone(), t.key.clone()))
            };
            if tls(&new) != tls(&old)
                || new.http.max_connections != old.http.max_connections
                || new.http.header_timeout != old.http.header_timeout
            {
                tracing::warn!(
                    "HTTP TLS or limits changed in {}: restart rackboot to apply them",
                    d.config_path.display()
                );
            }
            let tftp = |s: &Settings| {
                (
                    s.tftp.max_blksize,
                    s.tftp.max_windowsize,
                    s.tftp.max_transfers,
                    s.tftp.max_transfers_per_client,
                )
            };
            if tftp(&new) != tftp(&old) || new.drain_timeout != old.drain_timeout {
                tracing::warn!(
                    "TFTP limits or drain_timeout changed in {}: restart rackboot to apply them",
                    d.config_path.display()
                );
            }
            let proxy =
                |s: &Settings| (s.dhcp.proxy, s.dhcp.interfaces.clone(), s.dhcp.uefi_loader);
            if proxy(&new) != proxy(&old) {
                tracing::warn!(
                    "dhcp.proxy, dhcp.interfaces or dhcp.uefi_loader changed in {}: restart rackboot to apply them",
                    d.config_path.display()
                );
            }
            if new.state_dir != old.state_dir {
                tracing::warn!(
                    "state_dir changed in {}: restart rackboot to apply it",
                    d.config_path.display()
                );
            }
            // What needs a restart stays as it was until then: no half-applied
            // setting (a new state_dir would move sync, API and machine lookups
            // away from the snapshot being served).
            let mut new = new;
            new.state_dir = old.state_dir.clone();
            new.tftp.listen = old.tftp.listen.clone();
            new.http.listen = old.http.listen.clone();
            new.http.tls = old.http.tls.clone();
            new.http.max_connections = old.http.max_connections;
            new.http.header_timeout = old.http.header_timeout;
            new.tftp.max_blksize = old.tftp.max_blksize;
            new.tftp.max_windowsize = old.tftp.max_windowsize;
            new.tftp.max_transfers = old.tftp.max_transfers;
            new.drain_timeout = old.drain_timeout;
            new.dhcp.proxy = old.dhcp.proxy;
            new.dhcp.interfaces = old.dhcp.interfaces.clone();
            new.dhcp.uefi_loader = old.dhcp.uefi_loader;
            *d.settings.write().expect("settings lock") = Arc::new(new);
            tracing::info!("reloaded {}", d.config_path.display());
            d.trigger.notify_one();
        }
        Err(e) => tracing::error!("reload failed, keeping the old config: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_jitter_and_back_off_within_the_interval() {
        let i = Duration::from_secs(300);
        assert!((270.0..=330.0).contains(&next_delay(i, 0, 0.0).as_secs_f64()));
        assert!((270.0..=330.0).contains(&next_delay(i, 0, 0.999).as_secs_f64()));
        assert_eq!(next_delay(i, 1, 0.5), Duration::from_secs(15));
        assert_eq!(next_delay(i, 2, 0.5), Duration::from_secs(30));
        assert_eq!(next_delay(i, 5, 0.5), Duration::from_secs(240));
        assert_eq!(next_delay(i, 6, 0.5), i);
        assert_eq!(next_delay(i, 40, 0.5), i);
        let short = Duration::from_secs(2);
        assert_eq!(next_delay(short, 3, 0.5), short);
    }
}
