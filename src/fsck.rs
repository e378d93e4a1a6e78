//! `rackboot fsck [--repair]`: checks the store against itself.
//!
//! Every blob is re-hashed against its name; every snapshot that has a manifest is
//! checked file by file (each file must be the store's blob — the same inode — and
//! every symlink must resolve inside the tree); `current` must name a complete
//! generation; the state files must parse. Leftovers of interrupted runs (`tmp/`,
//! `.current.new`, a generation renamed into `snapshots/` whose manifest was never
//! written) are what a crash leaves by design: counted, not problems.
//!
//! `--repair` moves bad blobs to `quarantine/` (never deletes them) and points a
//! dangling `current` at the newest complete generation. It does not rebuild
//! anything itself: the next sync sees that the served generation lost a blob or a
//! file ([`intact`]), reads the upstream whole, re-fetches what is missing and
//! publishes a new generation that does not share the bad inode.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::Digest as _;

use crate::simplestreams::Sha256;
use crate::store::Store;

/// Where `--repair` moves blobs whose bytes do not match their name.
pub const QUARANTINE_DIR: &str = "quarantine";

/// One thing wrong, as one line naming the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub what: String,
    /// What `--repair` did about it, if anything.
    pub repaired: Option<String>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)?;
        if let Some(r) = &self.repaired {
            write!(f, " [repaired: {r}]")?;
        }
        Ok(())
    }
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    /// Blobs re-hashed.
    pub blobs: u64,
    pub bytes: u64,
    /// Snapshot files checked (all generations with a manifest).
    pub files: u64,
    pub generations: u64,
    /// Leftovers of interrupted runs, and incomplete generations nothing serves (not
    /// problems; the next sync removes them).
    pub leftovers: u64,
}

/// Checks the store at `store`; with `repair`, quarantines bad blobs and fixes a
/// dangling `current`. The caller holds the sync lock (a sync or GC running beside
/// the check would show up as missing files).
pub fn check(store: &Store, repair: bool) -> io::Result<Report> {
    let mut r = Report::default();
    let root = store.root();
    if !root.join("blobs/sha256").is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not a rackboot store (no blobs/sha256)",
                root.display()
            ),
        ));
    }
    let blobs = check_blobs(store, repair, &mut r)?;
    let current = store.current_generation();
    // What is or may be served: `current` and what running daemons registered.
    // Another generation is garbage the next sync collects; one that GC was
    // removing when the process was killed is incomplete by design.
    let mut live = store.served_generations();
    live.extend(current);
    let mut complete = BTreeSet::new();
    for g in store.generations() {
        match store.read_manifest(g) {
            Ok(m) => {
                r.generations += 1;
                let before = r.problems.len();
                check_snapshot(store, g, &m, &blobs, &mut r);
                if r.problems.len() == before {
                    complete.insert(g);
                } else if !live.contains(&g) {
                    r.problems.truncate(before);
                    r.leftovers += 1;
                }
            }
            // Renamed into snapshots/ but its manifest never written: a build a
            // crash cut short (never published unless `current` names it).
            Err(_) if !store.manifest_path(g).exists() && current != Some(g) => r.leftovers += 1,
            Err(e) => r.problems.push(Problem {
                path: store.manifest_path(g),
                what: format!("manifest unreadable: {e:#}"),
                repaired: None,
            }),
        }
    }
    check_current(store, current, &complete, repair, &mut r);
    for (name, p) in state_file_problems(root) {
        r.problems.push(Problem {
            path: root.join(name),
            what: p,
            repaired: None,
        });
    }
    r.leftovers += fs::read_dir(store.tmp_dir()).into_iter().flatten().count() as u64;
    r.leftovers += u64::from(root.join(".current.new").symlink_metadata().is_ok());
    Ok(r)
}

/// `rackboot fsck` found problems (exit status 1).
#[derive(Debug, thiserror::Error)]
#[error("{0} problem(s) found")]
pub struct ProblemsFound(pub usize);

/// Re-hashes every blob. Returns the digests of the good ones with their inode.
fn check_blobs(
    store: &Store,
    repair: bool,
    r: &mut Report,
) -> io::Result<BTreeMap<Sha256, (u64, u64)>> {
    let mut good = BTreeMap::new();
    let dir = store.root().join("blobs/sha256");
    let mut subs: Vec<_> = fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    subs.sort_by_key(|e| e.file_name());
    for sub in subs {
        let mut files: Vec<_> = fs::read_dir(sub.path())?.collect::<Result<_, _>>()?;
        files.sort_by_key(|e| e.file_name());
        for f in files {
            let path = f.path();
            let name = f.file_name().to_string_lossy().to_string();
            let meta = fs::symlink_metadata(&path)?;
            let bad = match name.parse::<Sha256>() {
                Err(_) => Some("not a blob name (sha256 hex)".to_string()),
                Ok(_) if !meta.is_file() => Some("not a regular file".to_string()),
                Ok(_) if !name.starts_with(&sub.file_name().to_string_lossy().to_string()) => {
                    Some("blob in the wrong directory".to_string())
                }
                Ok(d) => {
                    r.blobs += 1;
                    r.bytes += meta.len();
                    let got = hash_file(&path)?;
                    if got == d {
                        good.insert(d, (meta.dev(), meta.ino()));
                        None
                    } else {
                        Some(format!("content does not match its name (sha256 is {got})"))
                    }
                }
            };
            if let Some(what) = bad {
                let repaired = if repair {
                    Some(quarantine(store, &path, &name)?)
                } else {
                    None
                };
                r.problems.push(Problem {
                    path,
                    what,
                    repaired,
                });
            }
        }
    }
    Ok(good)
}

fn hash_file(path: &Path) -> io::Result<Sha256> {
    let mut h = sha2::Sha256::new();
    crate::fsutil::for_each_chunk(fs::File::open(path)?, |c| h.update(c))?;
    Ok(Sha256::from_bytes(h.finalize().into()))
}

/// Moves a bad blob to `quarantine/<name>.<unix time>`; returns what it did.
fn quarantine(store: &Store, path: &Path, name: &str) -> io::Result<String> {
    let q = store.root().join(QUARANTINE_DIR);
    if !q.is_dir() {
        fs::create_dir_all(&q)?;
        // Run as root on a daemon user's store: the directory is that user's.
        let _ = crate::store::give_to_dir_owner(&fs::File::open(&q)?, store.root());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dest = q.join(format!("{name}.{now}"));
    fs::rename(path, &dest)?;
    crate::store::fsync_dir(&q)?;
    if let Some(parent) = path.parent() {
        crate::store::fsync_dir(parent)?;
    }
    Ok(format!(
        "moved to {}; the next sync fetches it again",
        dest.display()
    ))
}

/// One generation: every manifest file is the store's blob (same inode), every
/// blob the manifest keeps is in the store, symlinks stay inside the tree.
fn check_snapshot(
    store: &Store,
    g: u64,
    m: &crate::store::Manifest,
    blobs: &BTreeMap<Sha256, (u64, u64)>,
    r: &mut Report,
) {
    let dir = store.snapshot_dir(g);
    let mut push = |path: PathBuf, what: String| {
        r.problems.push(Problem {
            path,
            what,
            repaired: None,
        })
    };
    for (rel, d) in &m.files {
        let p = dir.join(rel);
        match fs::symlink_metadata(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                push(p, format!("missing from generation {g} (blob {d})"))
            }
            Err(e) => push(p, format!("cannot stat: {e}")),
            Ok(meta) if !meta.is_file() => push(p, "not a regular file".into()),
            Ok(meta) => match blobs.get(d) {
                None => push(
                    p,
                    format!("blob {d} is missing from the store or bad; the next sync rebuilds"),
                ),
                Some(&(dev, ino)) if (dev, ino) != (meta.dev(), meta.ino()) => {
                    push(p, format!("is not the store's blob {d} (another inode)"))
                }
                Some(_) => {}
            },
        }
    }
    r.files += m.files.len() as u64;
    for d in m.blobs.iter().chain(m.metadata.values()) {
        if !blobs.contains_key(d) && !m.files.values().any(|f| f == d) {
            push(
                store.blob_path(d),
                format!("generation {g} needs this blob: missing or bad"),
            );
        }
    }
    if !dir.join("maas.meta").is_file() {
        push(dir.join("maas.meta"), "missing".into());
    }
    check_links(&dir, &dir, &mut push);
}

/// Every symlink below `dir` is relative and resolves to something inside `top`.
fn check_links(top: &Path, dir: &Path, push: &mut impl FnMut(PathBuf, String)) {
    let Ok(entries) = fs::read_dir(dir) else {
        push(dir.to_path_buf(), "cannot read directory".into());
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            check_links(top, &p, push);
        } else if t.is_symlink() {
            let Ok(target) = fs::read_link(&p) else {
                continue;
            };
            let inside = target.is_relative()
                && fs::canonicalize(&p)
                    .is_ok_and(|c| fs::canonicalize(top).is_ok_and(|t| c.starts_with(t)));
            if !inside {
                push(
                    p,
                    format!(
                        "link to {} leads outside the snapshot or nowhere",
                        target.display()
                    ),
                );
            }
        }
    }
}

fn check_current(
    store: &Store,
    current: Option<u64>,
    complete: &BTreeSet<u64>,
    repair: bool,
    r: &mut Report,
) {
    let link = store.current_link();
    let Ok(target) = fs::read_link(&link) else {
        // Nothing published yet (a first sync cut short): nothing is served.
        return;
    };
    // A generation with a manifest whose files are wrong was reported file by file;
    // the next sync rebuilds it.
    if current.is_some_and(|g| store.manifest_path(g).is_file() && store.snapshot_dir(g).is_dir()) {
        return;
    }
    let repaired = match complete.iter().next_back() {
        Some(&g) if repair => match store.publish(g) {
            Ok(()) => Some(format!("now names generation {g}")),
            Err(e) => Some(format!("could not point it at generation {g}: {e:#}")),
        },
        _ => None,
    };
    r.problems.push(Problem {
        path: link,
        what: format!(
            "names {}, which is not a complete generation",
            target.display()
        ),
        repaired,
    });
}

/// The state files that do not load, each with one line saying how to fix it.
/// `state.json` and `catalog.json` are rebuilt by a sync once moved aside;
/// `sources.json` and `machines.json` hold settings, so the line says what moving
/// them aside loses.
pub fn state_file_problems(state_dir: &Path) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let fix = |e: anyhow::Error, how: &str| format!("{}; {how}", root_cause(&e));
    if let Err(e) = crate::state::SyncState::load(state_dir) {
        out.push((
            "state.json",
            fix(
                e,
                "move it aside to reset it (the next sync reads the upstream whole again)",
            ),
        ));
    }
    if let Err(e) = crate::state::Sources::load(state_dir) {
        out.push((
            "sources.json",
            fix(
                e,
                "restore it from a backup, or move it aside to start again from the \
                 config file's sources (boot sources and selections made since are lost)",
            ),
        ));
    }
    if let Err(e) = crate::machines::load(state_dir) {
        out.push((
            "machines.json",
            fix(
                e,
                "restore it from a backup, or move it aside (the per-machine settings \
                 made with `rackboot machines` are lost)",
            ),
        ));
    }
    let catalog = state_dir.join(crate::state::CATALOG_FILE);
    if let Ok(b) = fs::read(&catalog) {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&b) {
            out.push((
                crate::state::CATALOG_FILE,
                format!("not valid JSON ({e}); move it aside, the next sync writes it again"),
            ));
        }
    }
    out
}

/// The loaders say "<path>: <serde error>"; the caller names the file itself.
fn root_cause(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    match s.split_once(".json: ") {
        Some((_, rest)) => format!("not valid ({rest})"),
        None => s,
    }
}

/// Refuses to start on a state file that does not load: one line naming the file
/// and the fix, and nothing is written or removed.
pub fn refuse_bad_state(state_dir: &Path) -> anyhow::Result<()> {
    refuse_bad(state_dir, &["state.json", "sources.json", "machines.json"])
}

/// [`refuse_bad_state`] for the files a sync reads (`machines.json` is not one: a
/// damaged one must not stop image updates).
pub fn refuse_bad_sync_state(state_dir: &Path) -> anyhow::Result<()> {
    refuse_bad(state_dir, &["state.json", "sources.json"])
}

fn refuse_bad(state_dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    match state_file_problems(state_dir)
        .into_iter()
        .find(|(name, _)| names.contains(name))
    {
        Some((name, p)) => anyhow::bail!("state file {}: {p}", state_dir.join(name).display()),
        None => Ok(()),
    }
}

/// Whether generation `g` still has everything its manifest names: each blob in
/// the store and each file in the tree as that blob's inode. A stat per file, no
/// hashing: cheap enough for every sync, which rebuilds the generation when not.
pub fn intact(store: &Store, g: u64) -> bool {
    let Ok(m) = store.read_manifest(g) else {
        return true; // the daemon's fallback handles an unreadable manifest
    };
    let dir = store.snapshot_dir(g);
    let blob_ok = |d: &Sha256| fs::metadata(store.blob_path(d)).ok();
    m.blobs
        .iter()
        .chain(m.metadata.values())
        .all(|d| blob_ok(d).is_some())
        && m.files.iter().all(
            |(rel, d)| match (blob_ok(d), fs::symlink_metadata(dir.join(rel))) {
                (Some(b), Ok(f)) => (b.dev(), b.ino()) == (f.dev(), f.ino()),
                _ => false,
            },
        )
}

/// Lowers this thread's I/O priority to idle (`ioprio_set`, `IOPRIO_CLASS_IDLE`):
/// the scheduled check reads every blob and must not slow down serving.
pub fn idle_io_priority() -> io::Result<()> {
    const IOPRIO_WHO_PROCESS: nix::libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: nix::libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: nix::libc::c_long = 13;
    // who = 0: the calling thread.
    // SAFETY: ioprio_set takes three integers and touches no memory of ours.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as nix::libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The scheduled check's last result, for `/metrics` (one daemon per process).
#[derive(Debug)]
pub struct VerifyStatus {
    /// Problems the last check found; -1 before the first.
    pub problems: AtomicI64,
    /// Unix seconds the last check finished; 0 before the first.
    pub finished: AtomicU64,
}

pub static VERIFY: VerifyStatus = VerifyStatus {
    problems: AtomicI64::new(-1),
    finished: AtomicU64::new(0),
};

/// Where the daemon remembers when it last checked, so a restart neither re-hashes
/// the store at once nor postpones the check for ever.
#[cfg(test)]
mod tests {
    use super::*;

    /// A store with one blob served as `a/file` in generations 1 and 2 (current: 2).
    fn store_with_two_generations() -> (tempfile::TempDir, Store, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = b"boot me".to_vec();
        let d = Sha256::from_bytes(sha2::Sha256::digest(&data).into());
        let blob = store.blob_path(&d);
        fs::create_dir_all(blob.parent().unwrap()).unwrap();
        fs::write(&blob, &data).unwrap();
        for g in [1, 2] {
            let m = crate::store::Manifest {
                generation: g,
                files: [("a/file".to_string(), d)].into(),
                blobs: [d].into(),
                ..Default::default()
            };
            store.build_snapshot(&m, &BTreeMap::new(), "meta").unwrap();
        }
        store.publish(2).unwrap();
        (dir, store, blob)
    }

    #[test]
    fn a_clean_store_has_no_problems() {
        let (_d, store, _) = store_with_two_generations();
        let r = check(&store, false).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!((r.blobs, r.files, r.generations), (1, 2, 2));
        assert!(intact(&store, 2));
    }

    #[test]
    fn a_bad_blob_is_reported_and_quarantined() {
        let (d, store, blob) = store_with_two_generations();
        fs::write(&blob, b"boot mE").unwrap();
        let r = check(&store, false).unwrap();
        assert!(
            r.problems.iter().any(|p| p.path == blob),
            "{:?}",
            r.problems
        );
        assert!(
            intact(&store, 2),
            "same inode, still present: only fsck sees it"
        );
        let r = check(&store, true).unwrap();
        assert!(r.problems.iter().any(|p| p.repaired.is_some()));
        assert!(!blob.exists());
        assert_eq!(
            fs::read_dir(d.path().join(QUARANTINE_DIR)).unwrap().count(),
            1
        );
        assert!(!intact(&store, 2), "the next sync must rebuild");
    }

    #[test]
    fn an_incomplete_generation_nothing_serves_is_a_leftover() {
        let (_d, store, _) = store_with_two_generations();
        fs::remove_file(store.snapshot_dir(1).join("a/file")).unwrap();
        let r = check(&store, false).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.leftovers, 1);
        fs::remove_file(store.snapshot_dir(2).join("a/file")).unwrap();
        let r = check(&store, false).unwrap();
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(!intact(&store, 2));
    }

    #[test]
    fn repair_points_a_dangling_current_at_the_newest_complete_generation() {
        let (_d, store, _) = store_with_two_generations();
        fs::remove_dir_all(store.snapshot_dir(2)).unwrap();
        let r = check(&store, true).unwrap();
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(store.current_generation(), Some(1));
        assert!(check(&store, false).unwrap().problems.is_empty());
    }

    #[test]
    fn root_cause_drops_the_path() {
        let e = anyhow::anyhow!("/var/lib/rackboot/state.json: EOF while parsing at line 1");
        assert_eq!(root_cause(&e), "not valid (EOF while parsing at line 1)");
    }

    #[test]
    fn bad_state_files_are_named_with_a_fix() {
        let d = tempfile::tempdir().unwrap();
        assert!(refuse_bad_state(d.path()).is_ok());
        fs::write(d.path().join("machines.json"), "{\"aa\":").unwrap();
        let e = refuse_bad_state(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("machines.json") && e.contains("move it aside"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
}
