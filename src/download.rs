//! Downloads: stream a payload into `tmp/<digest>.part`, checking size and sha256 as
//! bytes arrive; once it matches it becomes `tmp/<digest>.ok` (staged), and the sync
//! moves staged files into the blob store only when the whole run succeeded.
//!
//! A partial file from an earlier run (crash, kill -9, truncated body, full disk) is
//! resumed with an HTTP Range request; its bytes are re-hashed first. A file that turns
//! out too long or with the wrong hash is deleted: nothing unverified leaves `tmp/`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use futures_util::StreamExt;
use sha2::{Digest, Sha256 as Hasher};
use url::Url;

use crate::simplestreams::Sha256;
use crate::store::Store;
use crate::upstream::{FetchError, Fetcher};

/// One payload to fetch.
#[derive(Clone, Debug)]
pub struct Job {
    pub url: Url,
    pub sha256: Sha256,
    pub size: u64,
}

/// Why a download failed; each names the URL or the file.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{url}: truncated body: got {got} of {expected} bytes{cause} (kept for resume)")]
    Truncated {
        url: String,
        expected: u64,
        got: u64,
        /// `": <transport error>"` when the connection broke, else empty.
        cause: String,
    },
    #[error("{url}: wrong size: more than the {expected} bytes the index lists")]
    TooLong { url: String, expected: u64 },
    #[error("{url}: sha256 mismatch: expected {expected}, got {got}")]
    Hash {
        url: String,
        expected: Sha256,
        got: Sha256,
    },
    // Not a `source` field: the message carries it (a source would print it twice).
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |error| DownloadError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// How many bytes to write before asking the kernel to start writing them back.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts asynchronous writeback of `len` bytes at `offset` (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`, which does not wait), so the fsync that makes the file
/// durable at the end has little left to do. Advisory: errors are ignored, the
/// final fsync is what counts.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an fd we own; no memory is passed.
    unsafe {
        nix::libc::sync_file_range(
            file.as_raw_fd(),
            offset as nix::libc::off64_t,
            len as nix::libc::off64_t,
            nix::libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Re-hashes the bytes already in a partial file.
fn rehash(part: &Path, hasher: &mut Hasher) -> std::io::Result<u64> {
    let mut f = File::open(part)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Fetches `job` into the store. `progress` is called with the bytes of each chunk
/// written (and once with the resumed prefix). Returns the bytes transferred.
pub async fn fetch(
    fetcher: &Fetcher,
    store: &Store,
    job: &Job,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<u64, DownloadError> {
    if store.verified_path(&job.sha256, Some(job.size)).is_some() {
        progress(job.size);
        return Ok(0);
    }
    let part = store.part_path(&job.sha256);
    let url = job.url.to_string();
    let mut hasher = Hasher::new();
    let mut have = match fs::metadata(&part) {
        Ok(m) if m.len() > 0 && m.len() < job.size => {
            // Reading back up to a whole image: not on an async worker.
            let p = part.clone();
            let (h, n) = tokio::task::spawn_blocking(move || {
                let mut h = Hasher::new();
                rehash(&p, &mut h).map(|n| (h, n))
            })
            .await
            .expect("rehash does not panic")
            .map_err(io_err(&part))?;
            hasher = h;
            n
        }
        Ok(_) => {
            fs::remove_file(&part).map_err(io_err(&part))?;
            0
        }
        Err(_) => 0,
    };
    let mut body = fetcher.get_payload(&job.url, have).await?;
    if have > 0 && !body.resumed {
        // The server ignored the Range: start over.
        hasher = Hasher::new();
        have = 0;
    }
    if have > 0 {
        tracing::info!(url = %job.url, offset = have, "resuming partial download");
        progress(have);
    }
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(have > 0)
        .truncate(have == 0)
        .open(&part)
        .map_err(io_err(&part))?;
    let mut got = have;
    let mut transferred = 0u64;
    let mut written_back = have;
    while let Some(chunk) = body.stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e @ FetchError::Timeout { .. }) => {
                let _ = file.sync_all();
                return Err(e.into());
            }
            Err(e) => {
                let _ = file.sync_all();
                let cause = match &e {
                    FetchError::Transport { message, .. } => format!(": {message}"),
                    other => format!(": {other}"),
                };
                return Err(DownloadError::Truncated {
                    url,
                    expected: job.size,
                    got,
                    cause,
                });
            }
        };
        if got + chunk.len() as u64 > job.size {
            drop(file);
            let _ = fs::remove_file(&part);
            return Err(DownloadError::TooLong {
                url,
                expected: job.size,
            });
        }
        file.write_all(&chunk).map_err(io_err(&part))?;
        hasher.update(&chunk);
        got += chunk.len() as u64;
        transferred += chunk.len() as u64;
        progress(chunk.len() as u64);
        if got - written_back >= WRITEBACK_STEP {
            start_writeback(&file, written_back, got - written_back);
            written_back = got;
        }
    }
    // fsync of a whole image: not on an async worker.
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .expect("fsync does not panic")
        .map_err(io_err(&part))?;
    if got < job.size {
        return Err(DownloadError::Truncated {
            url,
            expected: job.size,
            got,
            cause: String::new(),
        });
    }
    let digest = Sha256::from_bytes(hasher.finalize().into());
    if digest != job.sha256 {
        let _ = fs::remove_file(&part);
        return Err(DownloadError::Hash {
            url,
            expected: job.sha256,
            got: digest,
        });
    }
    let staged = store.staged_path(&job.sha256);
    fs::rename(&part, &staged).map_err(io_err(&staged))?;
    Ok(transferred)
}

#[cfg(test)]
mod tests {
    use super::DownloadError;

    /// The I/O error is said once, not again as a cause in the chain.
    #[test]
    fn io_error_is_printed_once() {
        crate::fsutil::assert_io_cause_said_once(|error| DownloadError::Io {
            path: "/var/lib/rackboot/tmp/x.part".into(),
            error,
        });
    }
}
