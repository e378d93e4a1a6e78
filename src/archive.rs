//! Bootloader archives (`archive.tar.xz`): unpack each regular member into the blob
//! store under its own sha256, streaming (xz decoder → tar reader), so memory stays
//! bounded whatever the archive size.

use std::fs::File;
use std::io::{BufReader, Read, Write};

use sha2::{Digest, Sha256 as Hasher};

use crate::simplestreams::{RelPath, Sha256};
use crate::store::{ctx, Store};

/// A member stored as a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub path: String,
    pub sha256: Sha256,
    pub size: u64,
}

/// Unpacks the verified archive `archive` into member payloads, staged in `tmp/` like
/// downloads (the caller commits them when the sync succeeds).
pub fn unpack(store: &Store, archive: &Sha256) -> anyhow::Result<Vec<Member>> {
    let path = store
        .verified_path(archive, None)
        .ok_or_else(|| anyhow::anyhow!("archive {archive} is neither stored nor staged"))?;
    let file = ctx(File::open(&path), "cannot open", &path)?;
    let name = path.display().to_string();
    let xz = lzma_rust2::XZReader::new(BufReader::with_capacity(256 << 10, file), true);
    unpack_tar(
        store,
        XzErrors {
            inner: xz,
            name: name.clone(),
        },
        &name,
    )
}

/// Names the archive in the decoder's errors ("not a valid xz archive").
struct XzErrors<R> {
    inner: R,
    name: String,
}

impl<R: Read> Read for XzErrors<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("{}: not a valid xz archive: {e}", self.name),
            )
        })
    }
}

/// Members are written unsynced to temporary files; once the archive is read, one
/// `syncfs` makes them all durable and only then do they get their staged (trusted)
/// names, so a crash never leaves a staged name over unwritten data.
fn unpack_tar(store: &Store, reader: impl Read, name: &str) -> anyhow::Result<Vec<Member>> {
    let mut out = Vec::new();
    // Closed temporary files (deleted on drop unless persisted).
    let mut pending: Vec<(tempfile::TempPath, Sha256)> = Vec::new();
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| anyhow::anyhow!("{name}: not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| anyhow::anyhow!("{name}: bad tar entry: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw = entry
            .path()
            .map_err(|e| anyhow::anyhow!("{name}: bad member name: {e}"))?
            .to_string_lossy()
            .to_string();
        let Some(member) = RelPath::parse(&raw) else {
            anyhow::bail!("{name}: unsafe member path {raw:?}");
        };
        let mut tmp = tempfile::Builder::new()
            .prefix("member-")
            // Served files: readable by the daemon whoever runs the sync.
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(
                crate::store::PUBLIC_MODE,
            ))
            .tempfile_in(store.tmp_dir())?;
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut size = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| anyhow::anyhow!("{name}: reading {raw}: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.path().display()))?;
            size += n as u64;
        }
        let digest = Sha256::from_bytes(hasher.finalize().into());
        if store.verified_path(&digest, Some(size)).is_none()
            && !pending.iter().any(|(_, d)| *d == digest)
        {
            pending.push((tmp.into_temp_path(), digest));
        }
        out.push(Member {
            path: member.to_string(),
            sha256: digest,
            size,
        });
    }
    if !pending.is_empty() {
        let tmp_dir = store.tmp_dir();
        ctx(crate::store::sync_fs(&tmp_dir), "cannot sync", &tmp_dir)?;
        for (tmp, digest) in pending {
            let staged = store.staged_path(&digest);
            tmp.persist(&staged)
                .map_err(|e| anyhow::anyhow!("{}: {}", staged.display(), e.error))?;
        }
    }
    Ok(out)
}
