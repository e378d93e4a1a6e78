//! File-system helpers every layer may use: atomic writes of small files (temp file,
//! fsync, rename, fsync the directory), I/O errors that name their path, and opening
//! files below a root without escaping it: `openat2(RESOLVE_BENEATH)` on a directory
//! descriptor (one syscall; the kernel refuses `..`, absolute symlinks and symlinks
//! leading out), with a canonicalize-and-compare fallback for kernels older than 5.6.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Opens a directory to resolve paths below it.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: `open` returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Why a file below a root cannot be opened.
#[derive(Debug)]
pub enum BeneathError {
    NotFound,
    /// The path would leave the root (or is not a regular file we may read).
    Denied,
    Io(io::Error),
}

/// Opens the regular file `rel` below `root` for reading.
pub fn open_beneath(
    root: BorrowedFd<'_>,
    root_path: &Path,
    rel: &str,
) -> Result<(File, std::fs::Metadata), BeneathError> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let file = match nix::fcntl::openat2(root.as_raw_fd(), rel, how) {
        // SAFETY: openat2 returned a fresh descriptor that nothing else owns.
        Ok(fd) => unsafe { File::from_raw_fd(fd) },
        Err(nix::errno::Errno::ENOSYS) => return open_fallback(root_path, rel),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {
            return Err(BeneathError::NotFound)
        }
        Err(
            nix::errno::Errno::EXDEV
            | nix::errno::Errno::ELOOP
            | nix::errno::Errno::EACCES
            | nix::errno::Errno::EPERM,
        ) => return Err(BeneathError::Denied),
        Err(e) => return Err(BeneathError::Io(e.into())),
    };
    let meta = file.metadata().map_err(BeneathError::Io)?;
    if !meta.is_file() {
        return Err(BeneathError::NotFound);
    }
    Ok((file, meta))
}

/// Opens `rel` below the directory `root` (resolved now, so a symlinked root such as
/// `state/current` follows switches).
pub fn open_beneath_path(
    root: &Path,
    rel: &str,
) -> Result<(File, std::fs::Metadata), BeneathError> {
    let dir = open_dir(root).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BeneathError::NotFound,
        _ => BeneathError::Io(e),
    })?;
    open_beneath(dir.as_fd(), root, rel)
}

fn open_fallback(root: &Path, rel: &str) -> Result<(File, std::fs::Metadata), BeneathError> {
    let root = root.canonicalize().map_err(|_| BeneathError::NotFound)?;
    let target = root
        .join(rel)
        .canonicalize()
        .map_err(|_| BeneathError::NotFound)?;
    if !target.starts_with(&root) {
        return Err(BeneathError::Denied);
    }
    let file = File::open(&target).map_err(|_| BeneathError::NotFound)?;
    let meta = file.metadata().map_err(BeneathError::Io)?;
    if !meta.is_file() {
        return Err(BeneathError::NotFound);
    }
    Ok((file, meta))
}

/// The mode of state files (`state.json`, `sources.json`, `machines.json`, …),
/// before the umask.
pub const STATE_MODE: u32 = 0o640;
/// The mode of served files and of `rackboot mirror`'s output, before the umask.
pub const PUBLIC_MODE: u32 = 0o644;

/// Writes a state file atomically (mode [`STATE_MODE`]): temp file in the same
/// directory, fsync, rename, fsync the directory. A crash leaves either the old or
/// the new content.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_write_mode(path, bytes, STATE_MODE)
}

/// [`atomic_write`] for a file others read (served, mirrored): mode [`PUBLIC_MODE`].
pub fn atomic_write_public(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_write_mode(path, bytes, PUBLIC_MODE)
}

/// Like [`atomic_write`] with `mode` (the umask applies, as for any created file).
/// Run as root in a directory another user owns (the CLI beside the unit's
/// `User=rackboot`), the file is given to the directory's owner, so the daemon can
/// still read and replace it.
pub fn atomic_write_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    give_to_dir_owner(tmp.as_file(), dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fsync_dir(dir)
}

/// As root, hands a new file in `dir` to `dir`'s owner (a no-op otherwise).
pub fn give_to_dir_owner(file: &File, dir: &Path) -> io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let m = fs::metadata(dir)?;
    if m.uid() == 0 {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(m.uid()), Some(m.gid()))
}

/// Removes `.tmp-*` files an interrupted [`atomic_write`] left in `dir` (they are
/// never renamed into place once the writer is gone). Errors are ignored: this is
/// tidying, not correctness.
/// Only files older than a minute go: a younger one may belong to a writer that is
/// still running (another rackboot process).
pub fn remove_stray_tmp(dir: &Path) -> usize {
    let old = |e: &fs::DirEntry| {
        e.metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60))
    };
    let mut n = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-")
            && e.file_type().is_ok_and(|t| t.is_file())
            && old(&e)
            && fs::remove_file(e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
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
/// Reads `r` to its end in 1 MiB chunks, handing each to `f` (to hash a file without
/// loading it whole); returns the bytes read.
pub fn for_each_chunk(mut r: impl io::Read, mut f: impl FnMut(&[u8])) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        f(buf.get(..n).unwrap_or_default());
        total += n as u64;
    }
}

pub fn ctx<T>(r: io::Result<T>, what: &str, path: &Path) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
}

/// For the tests of errors that carry an I/O error (a file's `NotFound`, wrapped by
/// `wrap`): the chain `{e:#}` prints says it once, not again as a cause.
#[cfg(test)]
pub(crate) fn assert_io_cause_said_once<E>(wrap: impl FnOnce(std::io::Error) -> E)
where
    E: std::error::Error + Send + Sync + 'static,
{
    let e = anyhow::Error::from(wrap(std::io::Error::from(std::io::ErrorKind::NotFound)));
    let shown = format!("{e:#}");
    assert_eq!(shown.matches("entity not found").count(), 1, "{shown}");
}
