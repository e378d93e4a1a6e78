//! The on-disk store under `state_dir`:
//!
//! ```text
//! blobs/sha256/<aa>/<digest>   verified payloads, named by their hash, never modified
//! snapshots/<gen>/…            immutable trees in the MAAS rack layout (hardlinks to blobs)
//! snapshots/<gen>.json         the manifest of a snapshot (products, blobs it uses)
//! current -> snapshots/<gen>   switched by one atomic rename
//! tmp/                         partial downloads (<digest>.part) and snapshots being built
//! state.json, sources.json     small state files, written atomically
//! lock                         flock held by the running sync
//! gc.lock                      flock held briefly by GC and by a daemon switching snapshots
//! serving/<pid>                generations a running daemon serves or a request holds
//!                              (flocked by that daemon while it lives)
//! ```
//!
//! Invariant: nothing outside `tmp/` is ever unverified or half-written.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};

use crate::plan::ManifestProduct;
use crate::simplestreams::{RelPath, Sha256};

/// A directory tree being built: directories are created and opened one checked
/// segment at a time beneath the root's fd (`mkdirat` + `openat(O_NOFOLLOW)`), and
/// their fds cached by path.
struct Beneath {
    root: PathBuf,
    dirs: BTreeMap<String, OwnedFd>,
}

impl Beneath {
    fn open(root: &Path) -> io::Result<Beneath> {
        let fd = crate::fsutil::open_dir(root)?;
        Ok(Beneath {
            root: root.to_path_buf(),
            dirs: BTreeMap::from([(String::new(), fd)]),
        })
    }

    /// The directory fd that will hold `path` (created as needed) and its last
    /// segment. `path` must be a [`RelPath`].
    fn parent<'p>(&mut self, path: &'p str) -> anyhow::Result<(RawFd, &'p str)> {
        if RelPath::parse(path).is_none() {
            anyhow::bail!("snapshot path {path:?} is unsafe");
        }
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        if !self.dirs.contains_key(dir) {
            let mut prefix = String::new();
            for seg in dir.split('/') {
                let parent = self.dirs[&prefix].as_raw_fd();
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(seg);
                if self.dirs.contains_key(&prefix) {
                    continue;
                }
                let shown = || format!("{}/{prefix}", self.root.display());
                match nix::sys::stat::mkdirat(
                    Some(parent),
                    seg,
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => anyhow::bail!("cannot create {}: {e}", shown()),
                }
                let fd = nix::fcntl::openat(
                    Some(parent),
                    seg,
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", shown()))?;
                // SAFETY: openat returned a fresh descriptor that nothing else owns.
                self.dirs
                    .insert(prefix.clone(), unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        Ok((self.dirs[dir].as_raw_fd(), name))
    }
}

// Atomic writes and I/O error context live in `fsutil` (a leaf every layer may use);
// re-exported here for the store's callers.
pub use crate::fsutil::{
    atomic_write, atomic_write_mode, atomic_write_public, ctx, fsync_dir, give_to_dir_owner,
    remove_stray_tmp, sync_fs, PUBLIC_MODE, STATE_MODE,
};

/// Opens (creating, mode 0644 through the umask) a file used only for `flock`.
/// Read-only: a lock file created by another user (the CLI run as root) still locks.
fn open_lock_file(path: &Path) -> io::Result<File> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if let Some(dir) = path.parent() {
        // Best effort: only matters for a file this call created as root.
        if file.metadata().is_ok_and(|m| m.uid() == 0) {
            let _ = give_to_dir_owner(&file, dir);
        }
    }
    Ok(file)
}

/// The manifest of one snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub generation: u64,
    /// Unix seconds.
    pub created: u64,
    pub products: Vec<ManifestProduct>,
    /// Every served file: path → blob.
    pub files: BTreeMap<String, Sha256>,
    /// Every blob the snapshot keeps alive (files, archives, archive members,
    /// metadata).
    pub blobs: BTreeSet<Sha256>,
    /// The first source's metadata documents as fetched (path below the stream root
    /// → blob), re-exported byte for byte so signatures still verify downstream.
    #[serde(default)]
    pub metadata: BTreeMap<String, Sha256>,
}

impl Manifest {
    /// The snapshot's products as the API's `resources` and `boot-resources read
    /// --json` list them.
    pub fn resources_json(&self) -> serde_json::Value {
        self.products
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "product_name": p.product_name,
                    "version": p.version_name,
                    "size": p.size(),
                    "items": p.items,
                    "generation": self.generation,
                    "synced": self.created,
                })
            })
            .collect()
    }
}

/// Handle on a state directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// An exclusive sync lock; released on drop.
pub struct SyncLock {
    _lock: nix::fcntl::Flock<File>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> anyhow::Result<Store> {
        for d in ["blobs/sha256", "snapshots", "tmp"] {
            let p = root.join(d);
            ctx(fs::create_dir_all(&p), "cannot create", &p)?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// Opens an existing store without creating anything (read-only commands).
    pub fn existing(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Sha256) -> PathBuf {
        let hex = d.to_string();
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    /// Whether the store holds the blob with the right size.
    pub fn has_blob(&self, d: &Sha256, size: Option<u64>) -> bool {
        match fs::metadata(self.blob_path(d)) {
            Ok(m) => m.is_file() && size.is_none_or(|s| m.len() == s),
            Err(_) => false,
        }
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where a partial download of `d` lives (resumable across runs).
    pub fn part_path(&self, d: &Sha256) -> PathBuf {
        self.tmp_dir().join(format!("{d}.part"))
    }

    /// Where a verified payload waits until the whole sync succeeds.
    pub fn staged_path(&self, d: &Sha256) -> PathBuf {
        self.tmp_dir().join(format!("{d}.ok"))
    }

    /// A verified copy of `d`: in the blob store, or staged by an earlier (failed) run.
    pub fn verified_path(&self, d: &Sha256, size: Option<u64>) -> Option<PathBuf> {
        [self.blob_path(d), self.staged_path(d)]
            .into_iter()
            .find(|p| {
                fs::metadata(p).is_ok_and(|m| m.is_file() && size.is_none_or(|s| m.len() == s))
            })
    }

    /// Moves staged payloads (durable already) into the blob store, then makes the new
    /// names durable with one `syncfs`. Digests already in the store are skipped.
    pub fn commit_staged<'a>(
        &self,
        digests: impl IntoIterator<Item = &'a Sha256>,
    ) -> anyhow::Result<()> {
        let mut moved = false;
        for d in digests {
            let staged = self.staged_path(d);
            if staged.exists() {
                let dest = self.blob_path(d);
                let dir = dest.parent().expect("blob paths have a parent");
                ctx(fs::create_dir_all(dir), "cannot create", dir)?;
                ctx(fs::rename(&staged, &dest), "cannot move blob into", &dest)?;
                moved = true;
            }
        }
        if moved {
            ctx(sync_fs(&self.root), "cannot sync", &self.root)?;
        }
        Ok(())
    }

    /// Removes leftovers of interrupted runs from `tmp/`, keeping resumable `.part`
    /// files and verified `.ok` files whose digest is still wanted.
    pub fn clean_tmp(&self, wanted: &BTreeSet<Sha256>) -> anyhow::Result<()> {
        let tmp = self.tmp_dir();
        for e in ctx(fs::read_dir(&tmp), "cannot read", &tmp)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            let keep = name
                .strip_suffix(".part")
                .or_else(|| name.strip_suffix(".ok"))
                .and_then(|h| h.parse::<Sha256>().ok())
                .is_some_and(|d| wanted.contains(&d));
            if !keep {
                let p = e.path();
                let r = if e.file_type()?.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                ctx(r, "cannot remove", &p)?;
            }
        }
        Ok(())
    }

    /// Removes what interrupted runs left behind and no later run will use: in
    /// `tmp/` everything but `<digest>.part` / `<digest>.ok` (half-built snapshots,
    /// archive members), and old `.tmp-*` files of atomic writes. Call with the sync
    /// lock held. Returns how many entries went.
    pub fn clean_stray(&self) -> usize {
        let mut n = 0;
        for e in fs::read_dir(self.tmp_dir()).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let resumable = name
                .strip_suffix(".part")
                .or_else(|| name.strip_suffix(".ok"))
                .is_some_and(|h| h.parse::<Sha256>().is_ok());
            if resumable {
                continue;
            }
            let p = e.path();
            let gone = if e.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            n += usize::from(gone.is_ok());
        }
        let _ = fs::remove_file(self.root.join(".current.new"));
        n + remove_stray_tmp(&self.root) + remove_stray_tmp(&self.root.join("snapshots"))
    }

    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    /// The generation `current` points at, if any.
    pub fn current_generation(&self) -> Option<u64> {
        let target = fs::read_link(self.current_link()).ok()?;
        target.file_name()?.to_str()?.parse().ok()
    }

    pub fn snapshot_dir(&self, generation: u64) -> PathBuf {
        self.root.join("snapshots").join(generation.to_string())
    }

    pub fn manifest_path(&self, generation: u64) -> PathBuf {
        self.root
            .join("snapshots")
            .join(format!("{generation}.json"))
    }

    pub fn read_manifest(&self, generation: u64) -> anyhow::Result<Manifest> {
        let p = self.manifest_path(generation);
        let text = ctx(fs::read(&p), "cannot read", &p)?;
        serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    }

    /// Generations present on disk (directories under `snapshots/`).
    pub fn generations(&self) -> Vec<u64> {
        let mut gens: Vec<u64> = fs::read_dir(self.root.join("snapshots"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        gens.sort_unstable();
        gens
    }

    /// The next generation number (never reuses one that exists on disk).
    pub fn next_generation(&self, recorded: u64) -> u64 {
        let on_disk = self.generations().last().copied().unwrap_or(0);
        recorded
            .max(on_disk)
            .max(self.current_generation().unwrap_or(0))
            + 1
    }

    /// Builds snapshot `generation` from blobs: files are hardlinked, `symlinks` are
    /// relative links inside the tree, `meta` becomes `maas.meta`. The tree is built
    /// in `tmp/` and renamed into `snapshots/` only when complete; the manifest is
    /// written after it.
    pub fn build_snapshot(
        &self,
        manifest: &Manifest,
        symlinks: &BTreeMap<String, String>,
        meta: &str,
    ) -> anyhow::Result<PathBuf> {
        let build = self
            .tmp_dir()
            .join(format!("snapshot-{}", manifest.generation));
        if build.exists() {
            ctx(fs::remove_dir_all(&build), "cannot remove", &build)?;
        }
        ctx(fs::create_dir_all(&build), "cannot create", &build)?;
        // Every entry is made with an *at call beneath the build directory's fd, one
        // checked segment at a time, never following a symlink: whatever a path
        // says, nothing lands outside the tree.
        let mut tree = ctx(Beneath::open(&build), "cannot open", &build)?;
        for (path, digest) in &manifest.files {
            let (dir, name) = tree.parent(path)?;
            let blob = self.blob_path(digest);
            nix::unistd::linkat(
                None,
                blob.as_path(),
                Some(dir),
                Path::new(name),
                nix::fcntl::AtFlags::empty(),
            )
            .map_err(|e| anyhow::anyhow!("cannot link {}/{path}: {e}", build.display()))?;
        }
        for (path, target) in symlinks {
            // Relative and without `..`: it resolves inside the tree.
            if RelPath::parse(target).is_none() {
                anyhow::bail!("snapshot link {path:?} -> {target:?}: unsafe target");
            }
            let (dir, name) = tree.parent(path)?;
            nix::unistd::symlinkat(target.as_str(), Some(dir), name)
                .map_err(|e| anyhow::anyhow!("cannot link {}/{path}: {e}", build.display()))?;
        }
        let meta_path = build.join("maas.meta");
        let (dir, name) = tree.parent("maas.meta")?;
        let fd = nix::fcntl::openat(
            Some(dir),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", meta_path.display()))?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        let mut f = unsafe { File::from_raw_fd(fd) };
        ctx(f.write_all(meta.as_bytes()), "cannot write", &meta_path)?;
        drop(f);
        // Make the tree durable before it becomes reachable.
        ctx(sync_fs(&build), "cannot sync", &build)?;
        let dest = self.snapshot_dir(manifest.generation);
        ctx(fs::rename(&build, &dest), "cannot move snapshot to", &dest)?;
        let snapshots = self.root.join("snapshots");
        ctx(fsync_dir(&snapshots), "cannot sync", &snapshots)?;
        let mpath = self.manifest_path(manifest.generation);
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        ctx(atomic_write(&mpath, &json), "cannot write", &mpath)?;
        Ok(dest)
    }

    /// Points `current` at `generation` with one atomic rename.
    pub fn publish(&self, generation: u64) -> anyhow::Result<()> {
        let tmp = self.root.join(".current.new");
        let _ = fs::remove_file(&tmp);
        let target = format!("snapshots/{generation}");
        ctx(
            std::os::unix::fs::symlink(&target, &tmp),
            "cannot create",
            &tmp,
        )?;
        let link = self.current_link();
        ctx(fs::rename(&tmp, &link), "cannot switch", &link)?;
        ctx(fsync_dir(&self.root), "cannot sync", &self.root)
    }

    /// Removes snapshots other than `keep` and blobs no kept snapshot refers to.
    /// `extra` names blobs to keep regardless (e.g. those of a sync in flight).
    pub fn gc(&self, keep: &BTreeSet<u64>, extra: &BTreeSet<Sha256>) -> anyhow::Result<GcStats> {
        let mut stats = GcStats::default();
        let mut live: BTreeSet<Sha256> = extra.clone();
        // A kept generation whose manifest cannot be read: its blobs are unknown, so
        // none are removed this time (snapshots still are).
        let mut blobs_known = true;
        for g in keep {
            match self.read_manifest(*g) {
                Ok(m) => live.extend(m.blobs),
                Err(e) => {
                    tracing::warn!("keeping every blob: {e:#}");
                    blobs_known = false;
                }
            }
        }
        for g in self.generations() {
            if keep.contains(&g) {
                continue;
            }
            let dir = self.snapshot_dir(g);
            ctx(fs::remove_dir_all(&dir), "cannot remove", &dir)?;
            let _ = fs::remove_file(self.manifest_path(g));
            stats.snapshots += 1;
        }
        // Orphaned manifests (a crash between writing the manifest and the tree).
        for e in fs::read_dir(self.root.join("snapshots"))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(g) = name
                .strip_suffix(".json")
                .and_then(|g| g.parse::<u64>().ok())
            {
                if !keep.contains(&g) && !self.snapshot_dir(g).exists() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if !blobs_known {
            return Ok(stats);
        }
        let blobs = self.root.join("blobs/sha256");
        for sub in ctx(fs::read_dir(&blobs), "cannot read", &blobs)?.flatten() {
            for f in fs::read_dir(sub.path())?.flatten() {
                let name = f.file_name().to_string_lossy().to_string();
                let known = name.parse::<Sha256>().ok();
                if known.is_some_and(|d| live.contains(&d)) {
                    continue;
                }
                let m = f.metadata()?;
                ctx(fs::remove_file(f.path()), "cannot remove", &f.path())?;
                stats.blobs += 1;
                // Space comes back once no snapshot hardlink remains.
                if m.nlink() <= 1 {
                    stats.bytes += m.len();
                }
            }
        }
        Ok(stats)
    }

    /// Takes the sync lock without waiting: `Ok(None)` when another process (or
    /// another sync of this one) holds it. Never blocks, so an async caller can wait
    /// for it with [`Store::lock_async`] and still be stopped.
    pub fn try_lock(&self) -> anyhow::Result<Option<SyncLock>> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.root.join("lock");
        let file = ctx(open_lock_file(&path), "cannot open", &path)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            // Nothing is written to the lock file: a sync with nothing to do writes
            // no file at all (the holder is found through /proc/locks instead).
            Ok(l) => Ok(Some(SyncLock { _lock: l })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", path.display()),
        }
    }

    /// "another sync is running (lock … held by pid N)".
    pub fn busy_message(&self) -> String {
        let path = self.root.join("lock");
        let holder = lock_holder(&path)
            .map(|pid| format!("held by pid {pid}"))
            .unwrap_or_else(|| "held".into());
        format!("another sync is running (lock {} {holder})", path.display())
    }

    /// The first attempt of `lock`/`lock_async`: the lock, or (when it is held)
    /// an error without `wait`, else the busy message after telling `on_wait`.
    fn first_try(
        &self,
        wait: bool,
        on_wait: impl FnOnce(&str),
    ) -> anyhow::Result<Result<SyncLock, String>> {
        if let Some(l) = self.try_lock()? {
            return Ok(Ok(l));
        }
        let msg = self.busy_message();
        if !wait {
            anyhow::bail!("{msg}");
        }
        on_wait(&msg);
        Ok(Err(msg))
    }

    /// Takes the sync lock. Without `wait`, fails at once when it is held.
    pub fn lock(&self, wait: bool, on_wait: impl FnOnce(&str)) -> anyhow::Result<SyncLock> {
        if let Ok(l) = self.first_try(wait, on_wait)? {
            return Ok(l);
        }
        loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if let Some(l) = self.try_lock()? {
                return Ok(l);
            }
        }
    }

    /// Takes the sync lock from async code: polls (every 100 ms) rather than block
    /// a runtime worker in `flock`, and gives up when `stop` is cancelled (`sync/stop`,
    /// shutdown) while it waits.
    pub async fn lock_async(
        &self,
        wait: bool,
        stop: Option<&tokio_util::sync::CancellationToken>,
        on_wait: impl FnOnce(&str),
    ) -> anyhow::Result<SyncLock> {
        let msg = match self.first_try(wait, on_wait)? {
            Ok(l) => return Ok(l),
            Err(msg) => msg,
        };
        let never = tokio_util::sync::CancellationToken::new();
        let stop = stop.unwrap_or(&never);
        loop {
            tokio::select! {
                _ = stop.cancelled() => anyhow::bail!("stopped by request while waiting: {msg}"),
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
            if let Some(l) = self.try_lock()? {
                return Ok(l);
            }
        }
    }

    /// Takes the GC lock, waiting at most `limit` (polling: a thread waiting here can
    /// always be abandoned at shutdown). GC holds it while it decides and deletes; a
    /// daemon holds it while it reads `current`, registers that generation and opens
    /// it. So GC never deletes a generation between a daemon choosing and registering
    /// it. Call off the async workers.
    pub fn gc_lock(&self, limit: std::time::Duration) -> anyhow::Result<nix::fcntl::Flock<File>> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.root.join("gc.lock");
        let deadline = std::time::Instant::now() + limit;
        let mut file = ctx(open_lock_file(&path), "cannot open", &path)?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(l),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
                Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", path.display()),
            }
            if std::time::Instant::now() >= deadline {
                let holder = lock_holder(&path)
                    .map(|pid| format!(" (held by pid {pid})"))
                    .unwrap_or_default();
                anyhow::bail!(
                    "{} stayed locked for {} s{holder}",
                    path.display(),
                    limit.as_secs()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn serving_dir(&self) -> PathBuf {
        self.root.join("serving")
    }

    /// Registers this process as a server of this store: `serving/<pid>`, flocked for
    /// the life of the returned handle. Call with the GC lock held.
    pub fn register_server(&self) -> anyhow::Result<ServerRegistration> {
        use nix::fcntl::{Flock, FlockArg};
        let dir = self.serving_dir();
        ctx(fs::create_dir_all(&dir), "cannot create", &dir)?;
        let path = dir.join(std::process::id().to_string());
        let file = ctx(
            fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path),
            "cannot open",
            &path,
        )?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", path.display()))?;
        Ok(ServerRegistration {
            lock,
            path,
            written: None,
        })
    }

    /// Generations that running daemons serve or hold for requests (read with the GC
    /// lock held). Registrations of processes that are gone (no flock) are removed.
    pub fn served_generations(&self) -> BTreeSet<u64> {
        use nix::fcntl::{Flock, FlockArg};
        let mut out = BTreeSet::new();
        for e in fs::read_dir(self.serving_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(file) = File::open(e.path()) else {
                continue;
            };
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                // Nobody holds it: its daemon is gone.
                Ok(_stale) => {
                    let _ = fs::remove_file(e.path());
                }
                Err((file, _)) => {
                    let text = io::read_to_string(&file).unwrap_or_default();
                    out.extend(
                        text.split_whitespace()
                            .filter_map(|g| g.parse::<u64>().ok()),
                    );
                }
            }
        }
        out
    }

    /// PIDs of the daemons serving this store (registered and alive).
    pub fn servers(&self) -> Vec<u32> {
        use nix::fcntl::{Flock, FlockArg};
        fs::read_dir(self.serving_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                File::open(e.path()).is_ok_and(|f| {
                    matches!(
                        Flock::lock(f, FlockArg::LockSharedNonblock),
                        Err((_, nix::errno::Errno::EWOULDBLOCK))
                    )
                })
            })
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// GC as a sync runs it: takes the GC lock, keeps what `current` names, what every
    /// running daemon registered and `extra`, and removes the rest.
    pub fn collect(&self, extra: &BTreeSet<u64>) -> anyhow::Result<GcStats> {
        let _gc = self.gc_lock(std::time::Duration::from_secs(60))?;
        let mut keep: BTreeSet<u64> = self.served_generations();
        keep.extend(extra);
        keep.extend(self.current_generation());
        // Only generations that are complete (a manifest to read the blobs from).
        keep.retain(|g| self.manifest_path(*g).exists());
        self.gc(&keep, &BTreeSet::new())
    }

    /// The newest generation on disk, other than `not`, whose manifest reads.
    pub fn newest_readable(&self, not: Option<u64>) -> Option<u64> {
        self.generations()
            .into_iter()
            .rev()
            .filter(|g| Some(*g) != not)
            .find(|g| self.read_manifest(*g).is_ok() && self.snapshot_dir(*g).is_dir())
    }
}

/// A daemon's entry in `serving/`: which generations it may still read.
pub struct ServerRegistration {
    lock: nix::fcntl::Flock<File>,
    path: PathBuf,
    written: Option<BTreeSet<u64>>,
}

impl ServerRegistration {
    /// Records `gens` (call with the GC lock held). Written in place: the flock is on
    /// this inode, and readers hold the GC lock, so they never see half of it.
    pub fn set(&mut self, gens: &BTreeSet<u64>) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.written.as_ref() == Some(gens) {
            return Ok(());
        }
        let text: String = gens.iter().map(|g| format!("{g}\n")).collect();
        let f: &File = &self.lock;
        // Overwrite, then cut: a failed write (a full disk) leaves the old list
        // readable rather than an empty one.
        ctx(
            f.write_all_at(text.as_bytes(), 0),
            "cannot write",
            &self.path,
        )?;
        ctx(f.set_len(text.len() as u64), "cannot write", &self.path)?;
        self.written = Some(gens.clone());
        Ok(())
    }
}

impl Drop for ServerRegistration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Store {
    /// The PID of the process running a sync (holding the lock), if any.
    pub fn lock_holder(&self) -> Option<u32> {
        lock_holder(&self.root.join("lock"))
    }
}

/// The PID holding the flock on `path`, from `/proc/locks` (matched by inode).
pub fn flock_holder(path: &Path) -> Option<u32> {
    lock_holder(path)
}

fn lock_holder(path: &Path) -> Option<u32> {
    let ino = fs::metadata(path).ok()?.ino();
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        let f: Vec<&str> = l.split_whitespace().collect();
        let (kind, pid, dev_ino) = (f.get(1)?, f.get(4)?, f.get(5)?);
        (*kind == "FLOCK" && dev_ino.rsplit(':').next()?.parse::<u64>().ok()? == ino)
            .then(|| pid.parse().ok())
            .flatten()
    })
}

/// What a GC run removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub snapshots: usize,
    pub blobs: usize,
    pub bytes: u64,
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    fn store_with_blob() -> (tempfile::TempDir, Store, Sha256) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let d = Sha256::from_bytes([7; 32]);
        let p = store.blob_path(&d);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"blob").unwrap();
        (dir, store, d)
    }

    fn manifest(files: &[(&str, Sha256)]) -> Manifest {
        Manifest {
            generation: 1,
            files: files.iter().map(|(p, d)| (p.to_string(), *d)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn builds_a_tree_of_links() {
        let (_dir, store, d) = store_with_blob();
        let links = BTreeMap::from([("syslinux".to_string(), "bootloader/pxe/i386".to_string())]);
        let snap = store
            .build_snapshot(
                &manifest(&[
                    ("ubuntu/amd64/ga/noble/stable/boot-kernel", d),
                    ("bootloader/pxe/i386/x", d),
                ]),
                &links,
                "{}",
            )
            .unwrap();
        assert_eq!(
            fs::read(snap.join("ubuntu/amd64/ga/noble/stable/boot-kernel")).unwrap(),
            b"blob"
        );
        assert_eq!(fs::read(snap.join("syslinux/x")).unwrap(), b"blob");
        assert_eq!(fs::read(snap.join("maas.meta")).unwrap(), b"{}");
    }

    #[test]
    fn unsafe_paths_and_link_targets_are_refused_and_nothing_escapes() {
        let (dir, store, d) = store_with_blob();
        for bad in ["../../x", "/tmp/x", "a/../../x", "a//b", "./x", "file:/x"] {
            let e = store
                .build_snapshot(&manifest(&[(bad, d)]), &BTreeMap::new(), "{}")
                .unwrap_err();
            assert!(e.to_string().contains("unsafe"), "{bad}: {e}");
        }
        for target in ["../../..", "/etc", "a/../.."] {
            let links = BTreeMap::from([("syslinux".to_string(), target.to_string())]);
            let e = store
                .build_snapshot(&manifest(&[]), &links, "{}")
                .unwrap_err();
            assert!(e.to_string().contains("unsafe target"), "{target}: {e}");
        }
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["state"]);
    }

    #[test]
    fn a_symlink_in_the_build_dir_is_not_followed() {
        let (dir, store, d) = store_with_blob();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        // A directory entry that the tree would descend through is a symlink out.
        let mut tree = Beneath::open(&store.tmp_dir()).unwrap();
        std::os::unix::fs::symlink(&outside, store.tmp_dir().join("ubuntu")).unwrap();
        assert!(tree.parent("ubuntu/k").is_err());
        let e = store
            .build_snapshot(&manifest(&[("ubuntu/k", d)]), &BTreeMap::new(), "{}")
            .map(|_| ());
        assert!(e.is_ok(), "a fresh build dir holds no such link: {e:?}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with empty snapshots `gens` (directory + manifest), `current` at the
    /// last one.
    fn store_with(gens: &[u64]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for g in gens {
            fs::create_dir_all(store.snapshot_dir(*g)).unwrap();
            let m = Manifest {
                generation: *g,
                ..Default::default()
            };
            fs::write(store.manifest_path(*g), serde_json::to_vec(&m).unwrap()).unwrap();
        }
        store.publish(*gens.last().unwrap()).unwrap();
        (dir, store)
    }

    #[test]
    fn gc_keeps_current_and_what_a_live_server_registered() {
        let (_dir, store) = store_with(&[1, 2, 3, 4]);
        let mut reg = {
            let _gc = store.gc_lock(std::time::Duration::from_secs(1)).unwrap();
            let mut reg = store.register_server().unwrap();
            reg.set(&[2].into()).unwrap();
            reg
        };
        let stats = store.collect(&[3].into()).unwrap();
        assert_eq!(stats.snapshots, 1);
        assert_eq!(store.generations(), vec![2, 3, 4]);
        assert_eq!(store.servers(), vec![std::process::id()]);
        // A shorter list replaces a longer one completely.
        reg.set(&[4].into()).unwrap();
        assert_eq!(store.served_generations(), [4].into());
        drop(reg);
        assert!(store.servers().is_empty());
        store.collect(&BTreeSet::new()).unwrap();
        assert_eq!(store.generations(), vec![4]);
    }

    #[test]
    fn a_registration_nobody_holds_is_stale() {
        let (_dir, store) = store_with(&[1, 2]);
        fs::create_dir_all(store.serving_dir()).unwrap();
        fs::write(store.serving_dir().join("999999"), "1\n").unwrap();
        assert!(store.served_generations().is_empty());
        assert!(!store.serving_dir().join("999999").exists());
        store.collect(&BTreeSet::new()).unwrap();
        assert_eq!(store.generations(), vec![2]);
    }

    #[test]
    fn the_gc_lock_gives_up_after_its_limit_and_names_the_holder() {
        let (_dir, store) = store_with(&[1]);
        let _held = store.gc_lock(std::time::Duration::from_secs(1)).unwrap();
        let t = std::time::Instant::now();
        let e = store
            .gc_lock(std::time::Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        assert!(e.contains("gc.lock stayed locked"), "{e}");
    }

    #[test]
    fn state_files_are_0640_public_files_0644_through_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        atomic_write(&a, b"x").unwrap();
        atomic_write_public(&b, b"x").unwrap();
        // The test process's umask is at most 022 here (checked, not assumed).
        let mask = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|m| u32::from_str_radix(m.trim(), 8).ok())
            })
            .unwrap_or(0o022);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&a), STATE_MODE & !mask);
        assert_eq!(mode(&b), PUBLIC_MODE & !mask);
    }
}
