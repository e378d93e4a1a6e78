//! `rackboot mirror SOURCE DEST [FILTER…]`: what `sstream-mirror` does, for any
//! SimpleStreams source (a MAAS stream, images.maas.io, another mirror).
//!
//! - SOURCE names a stream root (then `streams/v1/index.sjson`) or an index file;
//!   `.sjson` means every metadata document must be clearsigned and, unless
//!   `--no-verify`, verified with `--keyring`; `.json` is read as is.
//! - Filters (`key=value`, `key!=value`, `key~regex`, `key!~regex`, all ANDed) apply
//!   to each item's flattened record; a missing key compares as `""`. Versions left
//!   without items vanish; `--max N` keeps the N lexically greatest versions of each
//!   product, `--keep` also keeps (within N) versions the source no longer lists.
//!   Products the filters leave out are not touched, so runs with different filters
//!   (images, then bootloaders) add up in one mirror.
//! - Metadata documents are written byte for byte at their own paths (signatures
//!   still verify downstream); payloads go to `DEST/<item path>` through
//!   `<path>.part` (resumed with HTTP Range) and are renamed into place only after
//!   their size and checksum (sha512, else sha256, else md5) match. Existing payloads
//!   are immutable and skipped.
//! - What was mirrored is recorded in `DEST/.data/<content_id>` (JSON) and
//!   `DEST/.data/references.json`; the next run removes the payloads of versions that
//!   left the mirror.
//! - `--dry-run` prints `+ product version item path N Mb` per download, `- …` per
//!   removal and `N Mb change` to stderr, and writes nothing.
//!
//! Filtering and planning are pure (`update_target`, `plan`); the rest is I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use url::Url;

use crate::config::SourceUrl;
use crate::simplestreams::{self, Checksum, Props, RawItem};
use crate::store::atomic_write_public as atomic_write;
use crate::upstream::{Fetched, Fetcher};
use crate::verify::{self, Keyring};

/// A filter's comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Match,
    NoMatch,
}

/// One `key OP value` filter.
#[derive(Clone, Debug)]
pub struct Filter {
    pub key: String,
    pub op: Op,
    pub value: String,
    regex: Option<regex::Regex>,
}

impl FromStr for Filter {
    type Err = String;

    /// `^([\w|\-]+) *(!?[=~]) *(.*)$`, as sstream-mirror reads filters.
    fn from_str(s: &str) -> Result<Filter, String> {
        let bad =
            || format!("bad filter {s:?}: expected key=value, key!=value, key~regex or key!~regex");
        let key_end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '|' || c == '-'))
            .ok_or_else(bad)?;
        let key = &s[..key_end];
        if key.is_empty() {
            return Err(bad());
        }
        let rest = s[key_end..].trim_start_matches(' ');
        let (op, rest) = if let Some(r) = rest.strip_prefix("!=") {
            (Op::Ne, r)
        } else if let Some(r) = rest.strip_prefix("!~") {
            (Op::NoMatch, r)
        } else if let Some(r) = rest.strip_prefix('=') {
            (Op::Eq, r)
        } else if let Some(r) = rest.strip_prefix('~') {
            (Op::Match, r)
        } else {
            return Err(bad());
        };
        let value = rest.trim_start_matches(' ').to_string();
        let regex = match op {
            Op::Match | Op::NoMatch => {
                Some(regex::Regex::new(&value).map_err(|e| format!("bad filter {s:?}: {e}"))?)
            }
            _ => None,
        };
        Ok(Filter {
            key: key.to_string(),
            op,
            value,
            regex,
        })
    }
}

impl Filter {
    /// Whether an item's flattened record passes (a missing key is `""`).
    pub fn matches(&self, props: &Props) -> bool {
        let v = props.get(&self.key).map(String::as_str).unwrap_or("");
        match self.op {
            Op::Eq => v == self.value,
            Op::Ne => v != self.value,
            Op::Match => self.regex.as_ref().is_some_and(|r| r.is_match(v)),
            Op::NoMatch => !self.regex.as_ref().is_some_and(|r| r.is_match(v)),
        }
    }
}

/// One mirrored item, as recorded in `.data/<content_id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub product: String,
    pub version: String,
    pub item: String,
    pub path: String,
    pub size: Option<u64>,
    pub checksum: Checksum,
}

impl Entry {
    fn from_raw(raw: &RawItem) -> Result<Entry, simplestreams::ParseError> {
        Ok(Entry {
            product: raw.product_name.clone(),
            version: raw.version_name.clone(),
            item: raw.item_name.clone(),
            path: raw.path.to_string(),
            size: raw.size()?,
            checksum: raw.checksum()?,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} {} {} {} {} Mb",
            self.product,
            self.version,
            self.item,
            self.path,
            self.size.unwrap_or(0) >> 20
        )
    }
}

/// The new mirror record of one content id, sstream-mirror's way: items are
/// filtered; for every product with items left, versions the filtered source lists
/// are added, versions it no longer lists are removed (with `keep`, the newest of
/// those stay while the product has fewer than `max`), and then only the `max`
/// greatest versions remain (lexical order). Products the filtered source does not
/// list keep what earlier runs mirrored (so runs with different filters add up).
pub fn update_target(
    items: &[RawItem],
    filters: &[Filter],
    max: Option<usize>,
    keep: bool,
    previous: &[Entry],
) -> Result<Vec<Entry>, simplestreams::ParseError> {
    type Versions = BTreeMap<String, Vec<Entry>>;
    let mut source: BTreeMap<String, Versions> = BTreeMap::new();
    for raw in items {
        if filters.iter().all(|f| f.matches(&raw.props)) {
            source
                .entry(raw.product_name.clone())
                .or_default()
                .entry(raw.version_name.clone())
                .or_default()
                .push(Entry::from_raw(raw)?);
        }
    }
    let mut target: BTreeMap<String, Versions> = BTreeMap::new();
    for e in previous {
        target
            .entry(e.product.clone())
            .or_default()
            .entry(e.version.clone())
            .or_default()
            .push(e.clone());
    }
    for (product, src_versions) in source {
        let old = target.remove(&product).unwrap_or_default();
        // Gone from the source, newest first.
        let mut gone: Vec<(String, Vec<Entry>)> = old
            .into_iter()
            .rev()
            .filter(|(v, _)| !src_versions.contains_key(v))
            .collect();
        let mut versions = src_versions;
        if let (true, Some(max)) = (keep, max) {
            while versions.len() < max && !gone.is_empty() {
                let (v, entries) = gone.remove(0);
                versions.insert(v, entries);
            }
        }
        let n = max.unwrap_or(usize::MAX);
        let trimmed: Versions = versions.into_iter().rev().take(n).collect();
        target.insert(product, trimmed);
    }
    let mut out: Vec<Entry> = target
        .into_values()
        .flat_map(|v| v.into_values().flatten())
        .collect();
    out.sort_by(|a, b| (&a.product, &a.version, &a.item).cmp(&(&b.product, &b.version, &b.item)));
    Ok(out)
}

/// What a run changes: payloads to fetch (not yet in `have`), entries to remove, and
/// paths whose last reference goes away.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub fetch: Vec<Entry>,
    pub remove: Vec<Entry>,
    pub delete_paths: BTreeSet<String>,
}

/// Compares the previous mirror with the new selection (both over all content ids).
pub fn plan(previous: &[Entry], selected: &[Entry], have: &dyn Fn(&Entry) -> bool) -> Plan {
    let key = |e: &Entry| (e.product.clone(), e.version.clone(), e.item.clone());
    let new_keys: BTreeSet<_> = selected.iter().map(key).collect();
    let new_paths: BTreeSet<&str> = selected.iter().map(|e| e.path.as_str()).collect();
    let mut p = Plan::default();
    let mut fetching = BTreeSet::new();
    for e in selected {
        if !have(e) && fetching.insert(e.path.clone()) {
            p.fetch.push(e.clone());
        }
    }
    for e in previous {
        if !new_keys.contains(&key(e)) {
            p.remove.push(e.clone());
            if !new_paths.contains(e.path.as_str()) {
                p.delete_paths.insert(e.path.clone());
            }
        }
    }
    p
}

/// Options of `rackboot mirror`.
#[derive(Clone, Debug)]
pub struct Options {
    pub source: String,
    pub dest: PathBuf,
    pub filters: Vec<Filter>,
    pub max: Option<usize>,
    pub keep: bool,
    pub dry_run: bool,
    pub progress: bool,
    pub keyring: Option<PathBuf>,
    pub no_verify: bool,
    pub parallel: usize,
    pub timeout: Duration,
}

/// What a run did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub fetched_files: usize,
    pub fetched_bytes: u64,
    pub removed_files: usize,
    pub metadata_files: usize,
    pub elapsed_ms: u64,
}

/// How metadata documents are trusted in this run.
enum Trust {
    Unsigned,
    Verify(Keyring),
    /// `--no-verify`: clearsigned, but the signature is not checked.
    NoVerify,
}

impl Trust {
    fn text(&self, url: &Url, bytes: &[u8]) -> anyhow::Result<String> {
        match self {
            Trust::Unsigned => {
                String::from_utf8(bytes.to_vec()).map_err(|_| anyhow::anyhow!("{url}: not UTF-8"))
            }
            Trust::Verify(k) => verify::verify_clearsigned(k, bytes, SystemTime::now())
                .map(|v| v.get().clone())
                .map_err(|e| anyhow::anyhow!("{url}: signature check failed: {e}")),
            Trust::NoVerify => {
                verify::clearsigned_text(bytes).map_err(|e| anyhow::anyhow!("{url}: {e}"))
            }
        }
    }
}

fn data_dir(dest: &Path) -> PathBuf {
    dest.join(".data")
}

/// The record of `content_id` (a checked [`simplestreams::Segment`]). Its paths are
/// checked again: a record is a file anyone with write access to DEST could edit,
/// and its paths are deleted.
fn load_previous(dest: &Path, content_id: &str) -> anyhow::Result<Vec<Entry>> {
    if simplestreams::Segment::parse_id(content_id).is_none() {
        anyhow::bail!("unsafe content_id {content_id:?}");
    }
    let p = data_dir(dest).join(content_id);
    let entries: Vec<Entry> = match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{}: not a mirror record", p.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", p.display())),
    };
    for e in &entries {
        if simplestreams::RelPath::parse(&e.path).is_none() {
            anyhow::bail!(
                "{}: product {} version {} item {}: unsafe path {:?}",
                p.display(),
                e.product,
                e.version,
                e.item,
                e.path
            );
        }
    }
    Ok(entries)
}

/// A hasher for the checksum an item lists.
enum Hasher {
    Sha512(sha2::Sha512),
    Sha256(sha2::Sha256),
    Md5(md5::Md5),
}

impl Hasher {
    fn for_checksum(c: &Checksum) -> Hasher {
        match c {
            Checksum::Sha512(_) => Hasher::Sha512(sha2::Sha512::new()),
            Checksum::Sha256(_) => Hasher::Sha256(sha2::Sha256::new()),
            Checksum::Md5(_) => Hasher::Md5(md5::Md5::new()),
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha512(h) => h.update(b),
            Hasher::Sha256(h) => h.update(b),
            Hasher::Md5(h) => h.update(b),
        }
    }
    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha512(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Md5(h) => h.finalize().to_vec(),
        }
    }
}

/// Whether `dest/<path>` already holds the entry (existing payloads are immutable:
/// only the size is compared, as sstream-mirror does).
fn present(dest: &Path, e: &Entry) -> bool {
    std::fs::metadata(dest.join(&e.path))
        .is_ok_and(|m| m.is_file() && e.size.is_none_or(|s| m.len() == s))
}

/// Downloads one payload into `dest/<path>` via `<path>.part`.
async fn fetch_one(
    fetcher: &Fetcher,
    root: &Url,
    dest: &Path,
    e: &Entry,
    progress: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<u64> {
    use std::io::Write;
    let path = simplestreams::RelPath::parse(&e.path)
        .ok_or_else(|| anyhow::anyhow!("unsafe item path {:?}", e.path))?;
    let url = crate::upstream::under_root(root, &path).map_err(|m| anyhow::anyhow!("{m}"))?;
    let target = dest.join(&e.path);
    let dir = target.parent().expect("item paths have a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let part = PathBuf::from(format!("{}.part", target.display()));
    let mut hasher = Hasher::for_checksum(&e.checksum);
    let mut have = 0u64;
    if let Ok(m) = std::fs::metadata(&part) {
        if e.size.is_some_and(|s| m.len() < s) && m.len() > 0 {
            let f = std::fs::File::open(&part)?;
            have = crate::fsutil::for_each_chunk(f, |c| hasher.update(c))?;
        }
    }
    let mut body = fetcher.get_payload(&url, have).await?;
    if have > 0 && !body.resumed {
        hasher = Hasher::for_checksum(&e.checksum);
        have = 0;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(have > 0)
        .truncate(have == 0)
        .open(&part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    progress(have);
    let mut got = have;
    while let Some(chunk) = body.stream.next().await {
        let chunk =
            chunk.map_err(|err| anyhow::anyhow!("{err} (got {got} bytes, kept for resume)"))?;
        if e.size.is_some_and(|s| got + chunk.len() as u64 > s) {
            drop(file);
            let _ = std::fs::remove_file(&part);
            anyhow::bail!(
                "{url}: wrong size: more than the {} bytes the index lists",
                e.size.unwrap_or(0)
            );
        }
        file.write_all(&chunk)
            .with_context(|| format!("cannot write {}", part.display()))?;
        hasher.update(&chunk);
        got += chunk.len() as u64;
        progress(chunk.len() as u64);
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", part.display()))?;
    drop(file);
    if let Some(s) = e.size.filter(|s| got < *s) {
        anyhow::bail!("{url}: truncated body: got {got} of {s} bytes (kept for resume)");
    }
    let digest = hasher.finish();
    if digest != e.checksum.digest() {
        let _ = std::fs::remove_file(&part);
        anyhow::bail!(
            "{url}: {} mismatch: expected {}, got {}",
            e.checksum.algorithm(),
            hex::encode(e.checksum.digest()),
            hex::encode(&digest)
        );
    }
    std::fs::rename(&part, &target)
        .with_context(|| format!("cannot move {} into place", target.display()))?;
    Ok(got - have)
}

/// Takes `DEST/.data/lock` (flock, not waiting): a second `rackboot mirror` into
/// the same DEST fails at once, naming the running one.
fn lock_dest(dest: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let data = data_dir(dest);
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let path = data.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = crate::store::flock_holder(&path)
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            anyhow::bail!(
                "another rackboot mirror{holder} is writing {} (lock {}); not starting a second one",
                dest.display(),
                path.display()
            )
        }
        Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", path.display()),
    }
}

/// Removes `.tmp-*` files (interrupted atomic writes) below `dest`; run with the
/// DEST lock held, so none can belong to a running writer. Symlinks are not followed.
fn remove_stray_tmp(dest: &Path) -> usize {
    let mut n = 0;
    let mut dirs = vec![dest.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_file()
                && e.file_name().to_string_lossy().starts_with(".tmp-")
                && std::fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

/// Removes `path` under `dest` and the directories it leaves empty (up to `dest`).
fn delete_payload(dest: &Path, path: &str) -> anyhow::Result<()> {
    let p = dest.join(path);
    match std::fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot remove {}: {e}", p.display()),
    }
    let mut dir = p.parent();
    while let Some(d) = dir {
        if d == dest || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// Raw metadata documents (path under the root, bytes) and each products file's
/// items by content id.
type Metadata = (Vec<(String, Vec<u8>)>, Vec<(String, Vec<RawItem>)>);

/// Fetches the index and every products file it leads to (indexes nest at most
/// two deep), bounded in total size, each verified per `trust` and kept raw.
async fn fetch_metadata(
    fetcher: &Fetcher,
    src: &SourceUrl,
    trust: &Trust,
) -> anyhow::Result<Metadata> {
    let index_url = src.root.join(&src.index)?;
    let mut raw_docs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut products: Vec<(String, Vec<RawItem>)> = Vec::new();
    let mut pending = vec![(src.index.clone(), index_url, 0u32)];
    let mut budget = simplestreams::MetadataBudget::default();
    while let Some((rel, url, depth)) = pending.pop() {
        let (bytes, text) = fetch_doc(fetcher, trust, &mut budget, &url).await?;
        raw_docs.push((rel, bytes));
        let index = simplestreams::parse_index(&text).map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        for entry in index.entries {
            let purl = crate::upstream::under_root(&src.root, &entry.path)
                .map_err(|e| anyhow::anyhow!("{url}: index entry {}: {e}", entry.content_id))?;
            if entry.format == "index:1.0" {
                if depth >= 2 {
                    anyhow::bail!("{purl}: indexes nested too deep");
                }
                pending.push((entry.path.to_string(), purl, depth + 1));
                continue;
            }
            let (bytes, text) = fetch_doc(fetcher, trust, &mut budget, &purl).await?;
            let items = simplestreams::parse_raw_items(&text, &entry.content_id)
                .map_err(|e| anyhow::anyhow!("{purl}: {e}"))?;
            raw_docs.push((entry.path.to_string(), bytes));
            products.push((entry.content_id, items));
        }
    }
    Ok((raw_docs, products))
}

/// One metadata document: fetched, counted against `budget`, its text per `trust`.
async fn fetch_doc(
    fetcher: &Fetcher,
    trust: &Trust,
    budget: &mut simplestreams::MetadataBudget,
    url: &Url,
) -> anyhow::Result<(Vec<u8>, String)> {
    let Fetched::Body { bytes, .. } = fetcher.get_meta(url, None).await? else {
        anyhow::bail!("{url}: unexpected 304 for an unconditional request");
    };
    budget
        .add(bytes.len())
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let text = trust.text(url, &bytes)?;
    Ok((bytes, text))
}

/// Writes the metadata byte for byte, then the record of what is mirrored per
/// content id and the references of every payload path.
fn write_records(
    dest: &Path,
    raw_docs: &[(String, Vec<u8>)],
    selected_by_cid: &BTreeMap<String, Vec<Entry>>,
) -> anyhow::Result<()> {
    for (rel, bytes) in raw_docs {
        let p = dest.join(rel);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        atomic_write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let data = data_dir(dest);
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let mut references: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (cid, entries) in selected_by_cid {
        let p = data.join(cid);
        atomic_write(&p, &serde_json::to_vec_pretty(entries)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
        for e in entries {
            references
                .entry(&e.path)
                .or_default()
                .push(format!("{cid}/{}/{}/{}", e.product, e.version, e.item));
        }
    }
    let refs = data.join("references.json");
    atomic_write(&refs, &serde_json::to_vec_pretty(&references)?)
        .with_context(|| format!("cannot write {}", refs.display()))?;
    Ok(())
}

/// Downloads `fetch` into DEST, `opts.parallel` at a time; every failure is
/// named. Returns the bytes fetched.
async fn download_all(
    opts: &Options,
    fetcher: &Fetcher,
    root: &Url,
    fetch: &[Entry],
    change: u64,
) -> anyhow::Result<u64> {
    let bar = opts.progress.then(|| {
        let b = indicatif::ProgressBar::new(change);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("valid template"),
        );
        b
    });
    let bytes = Arc::new(AtomicU64::new(0));
    let progress = {
        let (bar, bytes) = (bar.clone(), bytes.clone());
        move |n: u64| {
            bytes.fetch_add(n, Ordering::Relaxed);
            if let Some(b) = &bar {
                b.inc(n);
            }
        }
    };
    let results: Vec<anyhow::Result<u64>> = futures_util::stream::iter(fetch.iter())
        .map(|e| {
            let (fetcher, root, dest, progress) = (fetcher, root, &opts.dest, &progress);
            async move {
                let r = fetch_one(fetcher, root, dest, e, progress).await;
                if r.is_ok() && !opts.progress {
                    tracing::info!("mirrored {} ({} bytes)", e.path, e.size.unwrap_or(0));
                }
                r
            }
        })
        .buffer_unordered(opts.parallel.max(1))
        .collect()
        .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| format!("{e:#}"))
        .collect();
    if !errors.is_empty() {
        anyhow::bail!(
            "{} of {} downloads failed: {}",
            errors.len(),
            fetch.len(),
            errors.join("; ")
        );
    }

    Ok(bytes.load(Ordering::Relaxed))
}

/// Runs a mirror.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let src = SourceUrl::parse(&opts.source).map_err(|e| anyhow::anyhow!("{e}"))?;
    let trust = match (src.signed, &opts.keyring, opts.no_verify) {
        (false, _, _) => Trust::Unsigned,
        (true, _, true) => Trust::NoVerify,
        (true, Some(k), false) => Trust::Verify(Keyring::from_file(k)?),
        (true, None, false) => anyhow::bail!(
            "{} is signed (.sjson): pass --keyring FILE to verify it, or --no-verify",
            src.root.join(&src.index)?
        ),
    };
    let fetcher = Fetcher::new(opts.timeout)?;
    // Metadata: the index and every products file it leads to, verified, kept raw.
    let (raw_docs, products) = fetch_metadata(&fetcher, &src, &trust).await?;

    // One run per DEST at a time: the records are read, changed and written back,
    // and `.part` files are resumed by whoever finds them. Held to the end.
    let _lock = if opts.dry_run {
        None
    } else {
        let lock = lock_dest(&opts.dest)?;
        let stray = remove_stray_tmp(&opts.dest);
        if stray > 0 {
            tracing::info!("removed {stray} temporary files an interrupted run left");
        }
        Some(lock)
    };

    // The new record per content id, compared with what earlier runs mirrored.
    let mut previous = Vec::new();
    let mut selected_by_cid: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for (cid, items) in &products {
        let prev = load_previous(&opts.dest, cid)?;
        let sel = update_target(items, &opts.filters, opts.max, opts.keep, &prev)
            .map_err(|e| anyhow::anyhow!("{cid}: {e}"))?;
        previous.extend(prev);
        selected_by_cid.insert(cid.clone(), sel);
    }
    let selected: Vec<Entry> = selected_by_cid.values().flatten().cloned().collect();
    let plan = plan(&previous, &selected, &|e| present(&opts.dest, e));
    let change: u64 = plan.fetch.iter().map(|e| e.size.unwrap_or(0)).sum();

    if opts.dry_run {
        for e in &plan.fetch {
            eprintln!("+ {}", e.describe());
        }
        for e in &plan.remove {
            eprintln!("- {}", e.describe());
        }
        eprintln!("{} Mb change", change >> 20);
        return Ok(Report {
            elapsed_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        });
    }

    // Payloads, in parallel (bounded); the first failure stops the run.
    std::fs::create_dir_all(&opts.dest)
        .with_context(|| format!("cannot create {}", opts.dest.display()))?;
    let fetched_bytes = download_all(opts, &fetcher, &src.root, &plan.fetch, change).await?;

    // The payloads' new names reach the disk before any metadata names them (one
    // syncfs for all the renames; their data was synced before each rename).
    if !plan.fetch.is_empty() {
        crate::store::sync_fs(&opts.dest)
            .with_context(|| format!("cannot sync {}", opts.dest.display()))?;
    }
    // Metadata byte for byte, then the record of what is mirrored, then removals.
    write_records(&opts.dest, &raw_docs, &selected_by_cid)?;
    for path in &plan.delete_paths {
        delete_payload(&opts.dest, path)?;
    }
    Ok(Report {
        fetched_files: plan.fetch.len(),
        fetched_bytes,
        removed_files: plan.delete_paths.len(),
        metadata_files: raw_docs.len(),
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(product: &str, version: &str, item: &str, props: &[(&str, &str)]) -> RawItem {
        let mut p: Props = props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.insert("product_name".into(), product.into());
        p.insert("version_name".into(), version.into());
        p.insert("item_name".into(), item.into());
        p.entry("sha256".into()).or_insert_with(|| "00".repeat(32));
        RawItem {
            product_name: product.into(),
            version_name: version.into(),
            item_name: item.into(),
            path: simplestreams::RelPath::parse(&format!("{product}/{version}/{item}")).unwrap(),
            props: p,
        }
    }

    fn f(s: &str) -> Filter {
        s.parse().unwrap()
    }

    #[test]
    fn filter_grammar_and_semantics() {
        let props: Props = [("arch", "amd64"), ("release", "jammy")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(f("arch=amd64").matches(&props));
        assert!(!f("arch=amd").matches(&props));
        assert!(f("arch!=arm64").matches(&props));
        assert!(
            f("release~(bionic|jam)").matches(&props),
            "unanchored search"
        );
        assert!(f("release!~focal").matches(&props));
        assert!(f("os=").matches(&props), "a missing key is \"\"");
        assert!(!f("os!=").matches(&props));
        assert!(
            f("arch = amd64").matches(&props),
            "spaces around the operator"
        );
        for bad in ["arch:amd64", "=x", "arch", "a b=c", "release~("] {
            assert!(bad.parse::<Filter>().is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_and_max_pick_greatest_versions_with_items() {
        let items = vec![
            raw("p", "20250805", "k", &[("arch", "amd64")]),
            raw("p", "20250805.1", "k", &[("arch", "amd64")]),
            raw("p", "20250901", "k", &[("arch", "arm64")]),
            raw("q", "1", "k", &[("arch", "amd64")]),
        ];
        let sel = update_target(&items, &[f("arch=amd64")], Some(1), false, &[]).unwrap();
        let got: Vec<(&str, &str)> = sel
            .iter()
            .map(|e| (e.product.as_str(), e.version.as_str()))
            .collect();
        // 20250901 has no amd64 item, so the greatest version left is 20250805.1.
        assert_eq!(got, vec![("p", "20250805.1"), ("q", "1")]);
        let all = update_target(&items, &[], None, false, &[]).unwrap();
        assert_eq!(all.len(), 4);
        let both = update_target(
            &items,
            &[f("arch=amd64"), f("product_name=q")],
            None,
            false,
            &[],
        )
        .unwrap();
        assert_eq!(both.len(), 1, "filters are ANDed");
    }

    #[test]
    fn keep_retains_versions_gone_upstream_within_max() {
        let old = update_target(
            &[raw("p", "1", "k", &[]), raw("p", "2", "k", &[])],
            &[],
            None,
            false,
            &[],
        )
        .unwrap();
        let now = vec![raw("p", "3", "k", &[])];
        let kept = update_target(&now, &[], Some(2), true, &old).unwrap();
        let versions: Vec<&str> = kept.iter().map(|e| e.version.as_str()).collect();
        assert_eq!(versions, vec!["2", "3"]);
        let dropped = update_target(&now, &[], Some(2), false, &old).unwrap();
        assert_eq!(dropped.len(), 1);
        let p = plan(&old, &dropped, &|_| false);
        assert_eq!(p.fetch.len(), 1);
        assert_eq!(p.remove.len(), 2);
        assert_eq!(
            p.delete_paths,
            BTreeSet::from(["p/1/k".to_string(), "p/2/k".to_string()])
        );
    }

    #[test]
    fn runs_with_different_filters_add_up() {
        let items = vec![
            raw("img", "1", "k", &[("arch", "amd64"), ("release", "noble")]),
            raw("grub", "1", "efi", &[("arch", "amd64"), ("os", "grub-efi")]),
        ];
        let first = update_target(&items, &[f("release~noble")], Some(1), false, &[]).unwrap();
        assert_eq!(first.len(), 1);
        let second =
            update_target(&items, &[f("os~(grub|pxelinux)")], Some(1), false, &first).unwrap();
        let products: Vec<&str> = second.iter().map(|e| e.product.as_str()).collect();
        assert_eq!(
            products,
            vec!["grub", "img"],
            "the images of the first run stay"
        );
        // A new version replaces the old one under --max 1.
        let newer = vec![raw("img", "2", "k", &[("release", "noble")])];
        let third = update_target(&newer, &[f("release~noble")], Some(1), false, &second).unwrap();
        let img: Vec<&str> = third
            .iter()
            .filter(|e| e.product == "img")
            .map(|e| e.version.as_str())
            .collect();
        assert_eq!(img, vec!["2"]);
        let p = plan(&second, &third, &|_| false);
        assert_eq!(p.delete_paths, BTreeSet::from(["img/1/k".to_string()]));
    }

    #[test]
    fn checksum_preference() {
        let mut r = raw(
            "p",
            "1",
            "k",
            &[("md5", &"11".repeat(16)), ("sha512", &"22".repeat(64))],
        );
        assert_eq!(r.checksum().unwrap().algorithm(), "sha512");
        r.props.remove("sha512");
        assert_eq!(r.checksum().unwrap().algorithm(), "sha256");
        r.props.remove("sha256");
        assert_eq!(r.checksum().unwrap().algorithm(), "md5");
        r.props.remove("md5");
        assert!(
            r.checksum().is_err(),
            "an item without a checksum is an error"
        );
    }
}
