//! One sync run: upstream → verify → select → plan → download → snapshot → publish → gc.
//!
//! The run is a reconciler: it takes no input beyond the settings and the state's
//! sources, never retries internally (the next run is the retry), holds the store
//! lock for its whole duration, and either publishes a complete new snapshot or
//! leaves `current` and the store as they were.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use sha2::Digest as _;
use url::Url;

use crate::config::{Settings, SourceUrl};
use crate::download::{self, Job};
use crate::plan::{self, Plan};
use crate::select::{self, Selected};
use crate::simplestreams::{self, Products};
use crate::state::{Sources, StoredSource, SyncState};
use crate::store::{Manifest, Store};
use crate::upstream::{Fetched, Fetcher, Validators};
use crate::verify::{self, Keyring, Verified};

/// How a sync reports progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Progress bars (a terminal).
    Bars,
    /// Plain log lines.
    Lines,
    /// Nothing but the result (the daemon).
    Quiet,
}

impl ProgressMode {
    pub fn detect() -> ProgressMode {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bars
        } else {
            ProgressMode::Lines
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub dry_run: bool,
    /// Wait for a running sync instead of failing.
    pub wait: bool,
    pub progress: ProgressMode,
    /// Generations still in use (by requests in flight): not collected.
    pub keep: BTreeSet<u64>,
    /// Cancelled to stop the run (`boot-resources stop-import`): downloads are
    /// abandoned (partial files stay in `tmp/` for the next run) and nothing is
    /// published. Checked while downloading and between the later steps.
    pub stop: Option<tokio_util::sync::CancellationToken>,
    /// Accept signed documents older than ones seen before (`--allow-downgrade`).
    pub allow_downgrade: bool,
    /// Called (on a blocking thread) right after `current` is switched and before
    /// GC: the daemon serves the new generation first, so GC can let the old one go
    /// unless a request still holds it.
    pub on_publish: Option<PublishHook>,
}

/// See [`Options::on_publish`].
#[derive(Clone)]
pub struct PublishHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for PublishHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublishHook")
    }
}

/// Live progress of a running sync (read by the daemon's status API).
#[derive(Debug, Default)]
pub struct LiveProgress {
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub files_total: AtomicU64,
}

impl LiveProgress {
    /// Nothing done of nothing: a sync that starts must not show the last one's
    /// figures until its plan sets the totals.
    pub fn reset(&self) {
        for n in [
            &self.bytes_done,
            &self.bytes_total,
            &self.files_done,
            &self.files_total,
        ] {
            n.store(0, Ordering::Relaxed);
        }
    }
}

/// What a sync did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Generation served after the run.
    pub generation: Option<u64>,
    pub previous_generation: Option<u64>,
    /// A new snapshot was published.
    pub changed: bool,
    /// Metadata requests made (index + products files).
    pub requests: u64,
    pub files_fetched: usize,
    pub bytes_fetched: u64,
    pub files_total: usize,
    pub bytes_total: u64,
    pub elapsed_ms: u64,
    /// `+ name version`, `- name version`, `~ name old -> new`.
    pub changes: Vec<String>,
    pub gc_blobs: usize,
    pub gc_bytes: u64,
    pub warnings: Vec<String>,
    /// Dry run: the plan lines.
    pub plan: Vec<String>,
}

/// A source ready to fetch.
struct Resolved {
    url: SourceUrl,
    index_url: Url,
    keyring: Option<Keyring>,
    stored: StoredSource,
}

fn resolve(s: &StoredSource) -> anyhow::Result<Resolved> {
    let cfg = s.config();
    crate::config::check_source(&cfg).map_err(|m| anyhow::anyhow!("boot source {}: {m}", s.id))?;
    let mut url =
        SourceUrl::parse(&s.url).map_err(|m| anyhow::anyhow!("boot source {}: {m}", s.id))?;
    if url.rewritten_daily {
        tracing::warn!(
            "boot source {}: the daily stream is retired; using {} instead",
            s.id,
            url.root
        );
    }
    if s.unsigned && !url.explicit_index {
        url.index = "streams/v1/index.json".into();
        url.signed = false;
    }
    let keyring = match (&s.keyring_data, &s.keyring_filename) {
        (Some(data), _) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| {
                    anyhow::anyhow!("boot source {}: keyring_data is not base64: {e}", s.id)
                })?;
            Some(Keyring::from_bytes(
                &bytes,
                &format!("keyring_data of boot source {}", s.id),
            )?)
        }
        (None, Some(f)) => Some(Keyring::from_file(f)?),
        (None, None) => None,
    };
    let index_url = url.root.join(&url.index)?;
    Ok(Resolved {
        url,
        index_url,
        keyring,
        stored: s.clone(),
    })
}

/// A fingerprint of the sources and their keyrings: validators cached under one
/// key are only reused while it is unchanged.
fn sources_key(sources: &[StoredSource]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(sources).expect("sources serialise"));
    for s in sources {
        if let Some(f) = &s.keyring_filename {
            h.update(std::fs::read(f).unwrap_or_default());
        }
    }
    hex::encode(h.finalize())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Every image the sources offer and whether it is selected (`select::catalog`),
/// written after each successful sync that read the upstream.
pub use crate::state::CATALOG_FILE;

fn write_catalog(settings: &Settings, json: &[u8]) -> anyhow::Result<()> {
    let p = settings.state_dir.join(CATALOG_FILE);
    crate::store::atomic_write(&p, json).with_context(|| format!("cannot write {}", p.display()))
}

/// Verifies (or accepts, for an unsigned source) one metadata document.
fn trust(src: &Resolved, url: &Url, bytes: Vec<u8>) -> anyhow::Result<Verified<String>> {
    if src.url.signed {
        let keyring = src
            .keyring
            .as_ref()
            .expect("check_source guarantees a keyring for signed sources");
        verify::verify_clearsigned(keyring, &bytes, SystemTime::now())
            .map_err(|e| anyhow::anyhow!("{url}: signature check failed: {e}"))
    } else {
        let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{url}: not UTF-8"))?;
        Ok(verify::accept_unsigned(
            text,
            crate::verify::UnsignedSource(()),
        ))
    }
}

struct Counter(AtomicU64);

/// Fetches, verifies and parses every products file an index leads to. Every error
/// names the boot source; documents are bounded in number and total size.
async fn load_products(
    fetcher: &Fetcher,
    src: &Resolved,
    index: Verified<String>,
    requests: &Counter,
    raw: &mut Vec<(String, Vec<u8>)>,
    signed: &mut Vec<crate::state::SignedDoc>,
) -> anyhow::Result<Vec<Verified<Products>>> {
    let id = src.stored.id;
    let mut budget = simplestreams::MetadataBudget::default();
    budget
        .add(raw.iter().map(|(_, b)| b.len()).sum())
        .map_err(|e| anyhow::anyhow!("boot source {id}: {e}"))?;
    let mut out = Vec::new();
    let mut pending = vec![(src.index_url.clone(), index, 0u32)];
    while let Some((url, text, depth)) = pending.pop() {
        let index = text
            .try_map(|t| simplestreams::parse_index(&t))
            .map_err(|e| anyhow::anyhow!("boot source {id}: {url}: {e}"))?;
        for entry in &index.get().entries {
            let purl = crate::upstream::under_root(&src.url.root, &entry.path).map_err(|e| {
                anyhow::anyhow!(
                    "boot source {id}: {url}: index entry {}: {e}",
                    entry.content_id
                )
            })?;
            requests.0.fetch_add(1, Ordering::Relaxed);
            let Fetched::Body { bytes, .. } = fetcher.get_meta(&purl, None).await? else {
                anyhow::bail!("{purl}: unexpected 304 for an unconditional request");
            };
            budget
                .add(bytes.len())
                .map_err(|e| anyhow::anyhow!("boot source {id}: {purl}: {e}"))?;
            let doc = trust(src, &purl, bytes.clone())?;
            signed.push(crate::state::SignedDoc {
                path: entry.path.to_string(),
                url: purl.to_string(),
                updated: crate::state::updated_of(doc.get()),
                text: doc.get().clone(),
            });
            raw.push((entry.path.to_string(), bytes));
            if entry.format == "index:1.0" {
                if depth >= 2 {
                    anyhow::bail!("{purl}: indexes nested too deep");
                }
                pending.push((purl, doc, depth + 1));
                continue;
            }
            let products = doc
                .try_map(|t| simplestreams::parse_products(&t, &entry.content_id))
                .map_err(|e| anyhow::anyhow!("boot source {id}: {purl}: {e}"))?;
            out.push(products);
        }
    }
    Ok(out)
}

/// Progress display for downloads.
struct Progress {
    mode: ProgressMode,
    bar: Option<indicatif::ProgressBar>,
    live: Arc<LiveProgress>,
}

impl Progress {
    fn new(mode: ProgressMode, files: usize, bytes: u64, live: Arc<LiveProgress>) -> Progress {
        live.bytes_total.store(bytes, Ordering::Relaxed);
        live.files_total.store(files as u64, Ordering::Relaxed);
        live.bytes_done.store(0, Ordering::Relaxed);
        live.files_done.store(0, Ordering::Relaxed);
        let bar = (mode == ProgressMode::Bars).then(|| {
            let b = indicatif::ProgressBar::new(bytes);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_message(format!("0/{files} files"));
            b
        });
        Progress { mode, bar, live }
    }
    fn bytes(&self, n: u64) {
        self.live.bytes_done.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
    fn file_done(&self, url: &Url, size: u64, elapsed: Duration) {
        let done = self.live.files_done.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.live.files_total.load(Ordering::Relaxed);
        match (&self.bar, self.mode) {
            (Some(b), _) => b.set_message(format!("{done}/{total} files")),
            (None, ProgressMode::Lines) => tracing::info!(
                "fetched {url} ({}, {:.2} s) [{done}/{total}]",
                human_bytes(size),
                elapsed.as_secs_f64()
            ),
            _ => {}
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn product_changes(old: &Manifest, plan: &Plan) -> Vec<String> {
    // name → (version, item digests)
    let view =
        |products: &[crate::plan::ManifestProduct]| -> BTreeMap<String, (String, Vec<String>)> {
            products
                .iter()
                .map(|p| {
                    let digests = p.items.iter().map(|i| i.sha256.to_string()).collect();
                    (p.name.clone(), (p.version_name.clone(), digests))
                })
                .collect()
        };
    let (before, after) = (view(&old.products), view(&plan.products));
    let mut out = Vec::new();
    for (name, (v, items)) in &after {
        match before.get(name) {
            None => out.push(format!("+ {name} {v}")),
            Some((old, _)) if old != v => out.push(format!("~ {name} {old} -> {v}")),
            // Same version name, other bytes: upstream republished it.
            Some((_, old_items)) if old_items != items => {
                out.push(format!("~ {name} {v} (republished with other content)"))
            }
            _ => {}
        }
    }
    for (name, (v, _)) in &before {
        if !after.contains_key(name) {
            out.push(format!("- {name} {v}"));
        }
    }
    out
}

/// Runs one sync, within `sync.deadline`. On error nothing that is served has
/// changed.
pub async fn run(
    settings: &Settings,
    opts: &Options,
    live: Arc<LiveProgress>,
) -> anyhow::Result<Report> {
    let limit = settings.sync.deadline;
    // The run awaits only before its last, synchronous, steps (commit, snapshot,
    // publish), so a deadline that strikes drops it before anything is published.
    match tokio::time::timeout(limit, run_inner(settings, opts, live)).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "sync did not finish within sync.deadline ({} s); nothing was published \
             (verified downloads are kept for the next run)",
            limit.as_secs_f64()
        ),
    }
}

/// The store, and unless a dry run, its sync lock (leftovers of interrupted runs
/// removed once it is held).
async fn open_store(
    settings: &Settings,
    opts: &Options,
) -> anyhow::Result<(Store, Option<Arc<crate::store::SyncLock>>)> {
    let store = if opts.dry_run {
        Store::existing(&settings.state_dir)
    } else {
        Store::open(&settings.state_dir)?
    };
    // Shared with blocking unpack tasks: a run dropped at its deadline keeps the lock
    // until they stop writing to tmp/.
    let lock = if opts.dry_run {
        None
    } else {
        let lock = store
            .lock_async(opts.wait, opts.stop.as_ref(), |msg| {
                tracing::warn!("{msg}; waiting for it to finish")
            })
            .await?;
        let stray = store.clean_stray();
        if stray > 0 {
            tracing::info!("removed {stray} leftovers of interrupted runs");
        }
        Some(Arc::new(lock))
    };
    Ok((store, lock))
}

impl Report {
    /// A run that changed nothing (yet): `current` stays served.
    fn unchanged(current: Option<u64>) -> Report {
        Report {
            generation: current,
            previous_generation: current,
            changed: false,
            requests: 0,
            files_fetched: 0,
            bytes_fetched: 0,
            files_total: 0,
            bytes_total: 0,
            elapsed_ms: 0,
            changes: vec![],
            gc_blobs: 0,
            gc_bytes: 0,
            warnings: vec![],
            plan: vec![],
        }
    }
}

/// Warnings about the selection: unknown ftypes skipped, nothing matched.
fn selection_warnings(selected: &Selected) -> Vec<String> {
    let mut warnings = Vec::new();
    for f in &selected.skipped_ftypes {
        warnings.push(format!("skipping items of unknown ftype {f:?}"));
    }
    if selected.products.is_empty() {
        warnings.push("the selections match no image in the boot sources".to_string());
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    warnings
}

/// What a run starts from: the store (locked unless a dry run), the sources, what the
/// last run remembered, and whether the served generation is whole.
struct Start {
    store: Store,
    lock: Option<Arc<crate::store::SyncLock>>,
    state: SyncState,
    resolved: Vec<Resolved>,
    /// Identifies the sources (and keyrings) the validators in `state` belong to.
    key: String,
    current: Option<u64>,
    intact: bool,
    /// The last run's validators may make this run's requests conditional.
    reuse_validators: bool,
}

/// 0. Opens the store and loads the sources and the sync state.
async fn start(settings: &Settings, opts: &Options) -> anyhow::Result<Start> {
    crate::fsck::refuse_bad_sync_state(&settings.state_dir)?;
    let (store, lock) = open_store(settings, opts).await?;
    let sources = if opts.dry_run {
        Sources::current(settings)?
    } else {
        Sources::load_or_seed(settings)?
    };
    let state = SyncState::load(&settings.state_dir)?;
    let resolved: Vec<Resolved> = sources
        .sources
        .iter()
        .map(resolve)
        .collect::<Result<_, _>>()?;
    let key = sources_key(&sources.sources);
    let current = store.current_generation();
    // A served generation that lost a blob or a file (`fsck --repair` quarantined a
    // bad blob) is rebuilt: read the upstream whole and publish a new generation.
    let intact = opts.dry_run || current.is_none_or(|g| crate::fsck::intact(&store, g));
    if !intact {
        tracing::warn!("the served generation is incomplete; rebuilding it");
    }
    // (Without a catalog, read the upstream whole once to write one.)
    let reuse_validators = state.sources_key == key
        && intact
        && current.is_some()
        && settings.state_dir.join(CATALOG_FILE).exists();
    Ok(Start {
        store,
        lock,
        state,
        resolved,
        key,
        current,
        intact,
        reuse_validators,
    })
}

async fn run_inner(
    settings: &Settings,
    opts: &Options,
    live: Arc<LiveProgress>,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let Start {
        store,
        lock,
        mut state,
        resolved,
        key,
        current,
        intact,
        reuse_validators,
    } = start(settings, opts).await?;
    let fetcher = Fetcher::new(settings.sync.timeout)?;
    let requests = Counter(AtomicU64::new(0));
    let mut report = Report::unchanged(current);

    // 1. Indexes, conditionally: an unchanged upstream costs one request per source.
    let conditional = reuse_validators && !opts.dry_run;
    let Some(indexes) = fetch_indexes(&fetcher, &resolved, &state, conditional, &requests).await?
    else {
        // Nothing new; still collect generations that requests held during the last
        // change (cheap when `current` is the only one on disk).
        if !opts.dry_run && store.generations().len() > 1 {
            collect(&store, opts, &mut report).await?;
        }
        report.requests = requests.0.load(Ordering::Relaxed);
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    };

    // 2. Verify and parse everything before touching the store.
    let meta = load_metadata(&fetcher, &resolved, indexes, &mut state, opts, &requests).await?;
    let selected: Selected = select::select(&meta.per_source);
    let catalog = catalog_json(&meta.per_source, &resolved)?;
    report.warnings.extend(selection_warnings(&selected));
    let plan = plan::plan(&selected, &|d| store.has_blob(d, None));
    // Payloads verified by an earlier failed run wait in tmp/ and are not refetched.
    report.files_total = plan.fetch.len() + plan.have.len();
    report.bytes_total = plan.total_bytes();
    report.requests = requests.0.load(Ordering::Relaxed);
    let old_manifest = current
        .and_then(|g| store.read_manifest(g).ok())
        .unwrap_or_default();
    report.changes = product_changes(&old_manifest, &plan);

    if opts.dry_run {
        report.plan = dry_run_lines(&plan);
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }

    // Same selected content as what is served: no snapshot, just remember the
    // validators so the next run is a single conditional request.
    let current_meta =
        current.and_then(|g| std::fs::read_to_string(store.snapshot_dir(g).join("maas.meta")).ok());
    if current_meta.as_deref() == Some(plan.meta.as_str()) && plan.fetch.is_empty() && intact {
        // GC first: it frees space the small writes below may need, and it runs
        // even when a write after an earlier publish failed.
        collect(&store, opts, &mut report).await?;
        // Served content is what upstream offers: no partial or staged download
        // in tmp/ will be wanted.
        store.clean_tmp(&BTreeSet::new())?;
        write_catalog(settings, &catalog)?;
        save_success(settings, &mut state, key, meta.validators)?;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }

    // 3. Download what is missing, in parallel.
    download_missing(
        settings,
        opts,
        &plan,
        &resolved,
        fetcher,
        &store,
        live,
        &mut report,
    )
    .await?;

    // 4. Unpack bootloaders, lay out the snapshot, publish it.
    let (manifest, symlinks) = assemble(&store, &plan, lock, &meta.raw, state.generation).await?;
    let generation = manifest.generation;
    store.build_snapshot(&manifest, &symlinks, &plan.meta)?;
    store.publish(generation)?;
    // From here `current` names the new generation whatever fails below: a daemon
    // follows `current`, so the report says so even on error.
    report.generation = Some(generation);
    report.changed = true;
    if let Some(PublishHook(hook)) = opts.on_publish.clone() {
        let _ = tokio::task::spawn_blocking(move || hook()).await;
    }
    // GC after publish (its keep set then holds the new `current` and what every
    // daemon serves) and before the small writes, which a full disk would fail.
    collect(&store, opts, &mut report).await?;
    write_catalog(settings, &catalog)?;
    state.generation = generation;
    save_success(settings, &mut state, key, meta.validators)?;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Records a successful run: the sources it read, their validators, the time.
fn save_success(
    settings: &Settings,
    state: &mut SyncState,
    key: String,
    validators: BTreeMap<String, Validators>,
) -> anyhow::Result<()> {
    state.sources_key = key;
    state.indexes = validators;
    state.last_success = Some(now_unix());
    state.save(&settings.state_dir)
}

/// Stage 1: every source's index, conditionally when `conditional`. `None` when
/// all of them are unchanged; otherwise every index is fetched whole (one changed
/// source means a new selection over all of them).
async fn fetch_indexes(
    fetcher: &Fetcher,
    resolved: &[Resolved],
    state: &SyncState,
    conditional: bool,
    requests: &Counter,
) -> anyhow::Result<Option<Vec<(Vec<u8>, Validators)>>> {
    let mut indexes: Vec<Option<(Vec<u8>, Validators)>> = Vec::new();
    for src in resolved {
        let cond = if conditional {
            state.indexes.get(src.index_url.as_str())
        } else {
            None
        };
        requests.0.fetch_add(1, Ordering::Relaxed);
        match fetcher.get_meta(&src.index_url, cond).await? {
            Fetched::NotModified => indexes.push(None),
            Fetched::Body { bytes, validators } => indexes.push(Some((bytes, validators))),
        }
    }
    if !indexes.is_empty() && indexes.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(indexes.len());
    for (src, fetched) in resolved.iter().zip(indexes) {
        let fetched = match fetched {
            Some(f) => f,
            None => {
                requests.0.fetch_add(1, Ordering::Relaxed);
                match fetcher.get_meta(&src.index_url, None).await? {
                    Fetched::Body { bytes, validators } => (bytes, validators),
                    Fetched::NotModified => anyhow::bail!("{}: unexpected 304", src.index_url),
                }
            }
        };
        out.push(fetched);
    }
    Ok(Some(out))
}

/// Stage 2's result: verified products and selections per source, the new
/// validators, and the metadata documents the HTTP server re-exports.
struct Metadata {
    per_source: Vec<(Vec<Verified<Products>>, Vec<crate::select::Selection>)>,
    validators: BTreeMap<String, Validators>,
    /// The first source's metadata, byte for byte (plus plain copies of .sjson).
    raw: Vec<(String, Vec<u8>)>,
}

/// Stage 2: verifies and parses every source's metadata before the store is
/// touched; refuses a replayed older signed stream.
async fn load_metadata(
    fetcher: &Fetcher,
    resolved: &[Resolved],
    indexes: Vec<(Vec<u8>, Validators)>,
    state: &mut SyncState,
    opts: &Options,
    requests: &Counter,
) -> anyhow::Result<Metadata> {
    let mut meta = Metadata {
        per_source: Vec::new(),
        validators: BTreeMap::new(),
        raw: Vec::new(),
    };
    for (i, (src, (bytes, validators))) in resolved.iter().zip(indexes).enumerate() {
        let index = trust(src, &src.index_url, bytes.clone())?;
        let mut signed = vec![crate::state::SignedDoc {
            path: src.url.index.clone(),
            url: src.index_url.to_string(),
            updated: crate::state::updated_of(index.get()),
            text: index.get().clone(),
        }];
        let mut raw = vec![(src.url.index.clone(), bytes)];
        let products = load_products(fetcher, src, index, requests, &mut raw, &mut signed).await?;
        // A replayed older (validly signed) stream must not roll the images back.
        if src.url.signed {
            state.check_updated(src.index_url.as_str(), &signed, opts.allow_downgrade)?;
        }
        if i == 0 {
            meta.raw = raw;
            // Beside each .sjson, its plain .json (unsigned downstreams read those).
            if src.url.signed && !opts.dry_run {
                let docs: Vec<crate::reexport::Doc> = signed
                    .iter()
                    .map(|d| crate::reexport::Doc {
                        path: &d.path,
                        text: &d.text,
                    })
                    .collect();
                requests.0.fetch_add(docs.len() as u64, Ordering::Relaxed);
                let plain = crate::reexport::plain_copies(fetcher, &src.url.root, &docs).await;
                meta.raw.extend(plain);
            }
        }
        meta.validators
            .insert(src.index_url.to_string(), validators);
        let selections = src
            .stored
            .selections
            .iter()
            .map(|s| s.selection.clone())
            .collect();
        meta.per_source.push((products, selections));
    }
    Ok(meta)
}

/// The catalog of everything the sources offer, each entry naming its source.
fn catalog_json(
    per_source: &[(Vec<Verified<Products>>, Vec<crate::select::Selection>)],
    resolved: &[Resolved],
) -> anyhow::Result<Vec<u8>> {
    let mut catalog = select::catalog(per_source);
    for e in &mut catalog {
        if let Some(src) = resolved.get(e.source) {
            e.source_id = src.stored.id;
            e.source_url = src.stored.url.clone();
        }
    }
    Ok(serde_json::to_vec_pretty(&catalog)?)
}

/// What a dry run would fetch (`+`) and already has (`=`).
fn dry_run_lines(plan: &Plan) -> Vec<String> {
    let fetch = plan.fetch.iter().map(|item| {
        format!(
            "+ {} {} {} {} {}",
            item.product_name,
            item.version_name,
            item.item_name,
            item.path,
            human_bytes(item.size)
        )
    });
    let have = plan.have.iter().map(|item| {
        format!(
            "= {} {} {} {}",
            item.product_name, item.version_name, item.item_name, item.path
        )
    });
    fetch.chain(have).collect()
}

/// Stage 3: downloads what the plan lacks, `sync.parallel` at a time. The first
/// failure or a stop request aborts the others; partial files stay in tmp/.
#[allow(clippy::too_many_arguments)]
async fn download_missing(
    settings: &Settings,
    opts: &Options,
    plan: &Plan,
    resolved: &[Resolved],
    fetcher: Fetcher,
    store: &Store,
    live: Arc<LiveProgress>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let wanted: BTreeSet<_> = plan.fetch.iter().map(|i| i.sha256).collect();
    store.clean_tmp(&wanted)?;
    let progress = Arc::new(Progress::new(
        opts.progress,
        plan.fetch.len(),
        plan.fetch_bytes(),
        live,
    ));
    let fetcher = Arc::new(fetcher);
    let store_arc = Arc::new(store.clone());
    let sem = Arc::new(tokio::sync::Semaphore::new(settings.sync.parallel.get()));
    let mut tasks = tokio::task::JoinSet::new();
    for item in &plan.fetch {
        // The path is the one listed by the source the plan took the item from.
        let src = &resolved[item.source];
        let url = crate::upstream::under_root(&src.url.root, &item.path)
            .map_err(|e| anyhow::anyhow!("boot source {}: {e}", src.stored.id))?;
        let job = Job {
            url,
            sha256: item.sha256,
            size: item.size,
        };
        let (fetcher, store, sem, progress) = (
            fetcher.clone(),
            store_arc.clone(),
            sem.clone(),
            progress.clone(),
        );
        tasks.spawn(async move {
            let _permit = sem
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let t = Instant::now();
            let p = progress.clone();
            let r = download::fetch(&fetcher, &store, &job, &move |n| p.bytes(n)).await;
            if r.is_ok() {
                progress.file_done(&job.url, job.size, t.elapsed());
            }
            r.map(|n| (n, job.size))
        });
    }
    let mut first_err = None;
    let mut failed = 0;
    let stop = opts.stop.clone().unwrap_or_default();
    loop {
        let res = tokio::select! {
            res = tasks.join_next() => match res {
                Some(r) => r,
                None => break,
            },
            _ = stop.cancelled() => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                progress.finish();
                anyhow::bail!("stopped by request (partial downloads are kept for the next run)");
            }
        };
        let res = match res {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => continue, // aborted after the first failure
            Err(e) => anyhow::bail!("download task failed: {e}"),
        };
        match res {
            Ok((n, _)) => {
                report.files_fetched += 1;
                report.bytes_fetched += n;
            }
            Err(e) => {
                failed += 1;
                if first_err.is_none() {
                    first_err = Some(e);
                    // Stop the others: partial files stay in tmp/ for the next run.
                    tasks.abort_all();
                }
            }
        }
    }
    progress.finish();
    if let Some(e) = first_err {
        let others = if failed > 1 {
            format!(" (and {} more failed)", failed - 1)
        } else {
            String::new()
        };
        return Err(anyhow::anyhow!("{e}{others}"));
    }

    if stop.is_cancelled() {
        anyhow::bail!("stopped by request (downloads are kept for the next run)");
    }
    Ok(())
}

/// Stage 4: unpacks bootloader archives, stages the metadata documents, commits
/// every verified blob and returns the new generation's manifest and symlinks.
async fn assemble(
    store: &Store,
    plan: &Plan,
    lock: Option<Arc<crate::store::SyncLock>>,
    raw_metadata: &[(String, Vec<u8>)],
    recorded_generation: u64,
) -> anyhow::Result<(Manifest, BTreeMap<String, String>)> {
    let mut files = plan.files.clone();
    let mut symlinks = BTreeMap::new();
    let mut blobs: BTreeSet<_> = plan
        .fetch
        .iter()
        .chain(&plan.have)
        .map(|i| i.sha256)
        .collect();
    for archive in &plan.archives {
        let store2 = store.clone();
        let digest = archive.sha256;
        let held = lock.clone();
        let members = tokio::task::spawn_blocking(move || {
            let _held = held;
            crate::archive::unpack(&store2, &digest)
        })
        .await
        .expect("unpack does not panic")
        .with_context(|| format!("unpacking bootloader archive for {}", archive.dir))?;
        let names: Vec<String> = members.iter().map(|m| m.path.clone()).collect();
        for m in &members {
            blobs.insert(m.sha256);
            files.insert(format!("{}/{}", archive.dir, m.path), m.sha256);
        }
        for (served, member) in plan::root_links(&archive.bootloader_type, &archive.arch, &names) {
            let m = members
                .iter()
                .find(|m| m.path == member)
                .expect("link names a member");
            files.entry(served).or_insert(m.sha256);
        }
        if archive.bootloader_type == "pxe" {
            symlinks
                .entry("syslinux".to_string())
                .or_insert(archive.dir.clone());
        }
    }
    let mut metadata = BTreeMap::new();
    for (path, bytes) in raw_metadata {
        let d = crate::simplestreams::Sha256::from_bytes(sha2::Sha256::digest(bytes).into());
        if store.verified_path(&d, None).is_none() {
            let staged = store.staged_path(&d);
            crate::store::atomic_write_public(&staged, bytes)
                .with_context(|| format!("writing {}", staged.display()))?;
        }
        blobs.insert(d);
        metadata.insert(path.clone(), d);
    }
    // Everything verified: move staged payloads into the blob store.
    store.commit_staged(&blobs)?;
    let manifest = Manifest {
        generation: store.next_generation(recorded_generation),
        created: now_unix(),
        products: plan.products.clone(),
        files,
        blobs,
        metadata,
    };
    Ok((manifest, symlinks))
}

/// Garbage collection at the end of a run: keeps `current`, what running daemons
/// registered (served or held by requests) and `opts.keep`. The GC lock is a
/// blocking flock, so it runs off the async workers.
async fn collect(store: &Store, opts: &Options, report: &mut Report) -> anyhow::Result<()> {
    let keep = opts.keep.clone();
    let store = store.clone();
    let gc = tokio::task::spawn_blocking(move || store.collect(&keep))
        .await
        .map_err(|e| anyhow::anyhow!("garbage collection failed: {e}"))??;
    report.gc_blobs += gc.blobs;
    report.gc_bytes += gc.bytes;
    Ok(())
}
