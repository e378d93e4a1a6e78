//! Opening files below a root without escaping it: `openat2(RESOLVE_BENEATH)` on a
//! directory descriptor (one syscall; the kernel refuses `..`, absolute symlinks and
//! symlinks leading out), with a canonicalize-and-compare fallback for kernels
//! older than 5.6.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
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
