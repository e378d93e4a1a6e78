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

/// Writes `path` atomically: temp file in the same directory, fsync, rename, fsync
/// the directory. A crash leaves either the old or the new content.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fsync_dir(dir)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flushes everything written to the filesystem holding `path` (data and directory
/// entries) with one `syncfs`: how a batch of files (archive members, blob renames,
/// a snapshot tree) becomes durable without one fsync per file.
pub fn sync_fs(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path)?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(io::Error::from)
}

/// Adds the path to an I/O error so the message names it.
pub fn ctx<T>(r: io::Result<T>, what: &str, path: &Path) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
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
        for g in keep {
            live.extend(self.read_manifest(*g)?.blobs);
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

    /// Takes the sync lock. With `wait`, blocks until the running sync finishes
    /// (calling `on_wait` once first); without it, fails at once.
    pub fn lock(&self, wait: bool, on_wait: impl FnOnce(&str)) -> anyhow::Result<SyncLock> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.root.join("lock");
        let open = || {
            ctx(
                fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(&path),
                "cannot open",
                &path,
            )
        };
        let lock = match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = lock_holder(&path)
                    .map(|pid| format!("held by pid {pid}"))
                    .unwrap_or_else(|| "held".into());
                let msg = format!("another sync is running (lock {} {holder})", path.display());
                if !wait {
                    anyhow::bail!("{msg}");
                }
                on_wait(&msg);
                Flock::lock(open()?, FlockArg::LockExclusive)
                    .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", path.display()))?
            }
            Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", path.display()),
        };
        // Nothing is written to the lock file: a sync with nothing to do writes no
        // file at all (the holder is found through /proc/locks instead).
        Ok(SyncLock { _lock: lock })
    }
}

impl Store {
    /// The PID of the process running a sync (holding the lock), if any.
    pub fn lock_holder(&self) -> Option<u32> {
        lock_holder(&self.root.join("lock"))
    }
}

/// The PID holding the flock on `path`, from `/proc/locks` (matched by inode).
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
