//! Bootloader archives (`archive.tar.xz`): unpack each regular member into the blob
//! store under its own sha256, streaming (xz decoder → tar reader), so memory stays
//! bounded whatever the archive size. Disk use is bounded too ([`LIMITS`]): a small
//! xz can unpack to terabytes.

use std::fs::File;
use std::io::{BufReader, Read, Write};

use sha2::{Digest, Sha256 as Hasher};

use crate::simplestreams::{RelPath, Sha256};
use crate::store::{ctx, Store};

/// Bounds on what one archive may unpack to; crossing one fails the sync.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub member_bytes: u64,
    pub total_bytes: u64,
    /// Entries of any type.
    pub members: usize,
}

/// 512 MiB per member, 2 GiB per archive, 10000 entries (real bootloader archives
/// hold a few MiB in a few hundred files).
pub const LIMITS: Limits = Limits {
    member_bytes: 512 << 20,
    total_bytes: 2 << 30,
    members: 10_000,
};

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
        &LIMITS,
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
fn unpack_tar(
    store: &Store,
    reader: impl Read,
    name: &str,
    limits: &Limits,
) -> anyhow::Result<Vec<Member>> {
    let mut out = Vec::new();
    let (mut entries_seen, mut total) = (0usize, 0u64);
    // Closed temporary files (deleted on drop unless persisted).
    let mut pending: Vec<(tempfile::TempPath, Sha256)> = Vec::new();
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| anyhow::anyhow!("{name}: not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| anyhow::anyhow!("{name}: bad tar entry: {e}"))?;
        entries_seen += 1;
        if entries_seen > limits.members {
            anyhow::bail!("{name}: more than {} archive members", limits.members);
        }
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw = entry
            .path()
            .map_err(|e| anyhow::anyhow!("{name}: bad member name: {e}"))?
            .to_string_lossy()
            .to_string();
        // `tar -C dir -c .` writes `./name`: that prefix alone is accepted.
        let Some(member) = RelPath::parse(raw.strip_prefix("./").unwrap_or(&raw)) else {
            anyhow::bail!("{name}: unsafe member path {raw:?}");
        };
        let listed = entry.size();
        if listed > limits.member_bytes {
            anyhow::bail!(
                "{name}: member {raw:?} is {listed} bytes, more than the {} byte limit",
                limits.member_bytes
            );
        }
        if total + listed > limits.total_bytes {
            anyhow::bail!(
                "{name}: members total more than the {} byte limit",
                limits.total_bytes
            );
        }
        // Counted again while reading: a sparse member's header size is not its length.
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
            if size > limits.member_bytes || total + size > limits.total_bytes {
                anyhow::bail!(
                    "{name}: member {raw:?} unpacks to more than the limit ({} bytes per member, {} per archive)",
                    limits.member_bytes,
                    limits.total_bytes
                );
            }
        }
        total += size;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(members: &[(&str, usize)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, len) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(*len as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &vec![7u8; *len][..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn unpack_with(data: &[u8], limits: Limits) -> anyhow::Result<Vec<Member>> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        unpack_tar(&store, data, "a.tar.xz", &limits)
    }

    const SMALL: Limits = Limits {
        member_bytes: 100,
        total_bytes: 250,
        members: 4,
    };

    #[test]
    fn members_within_limits_unpack() {
        let m = unpack_with(&tar(&[("./a", 100), ("grub/b", 100), ("c", 50)]), SMALL).unwrap();
        let names: Vec<&str> = m.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(names, ["a", "grub/b", "c"], "a leading ./ is dropped");
    }

    #[test]
    fn limits_fail_with_one_line_each() {
        let e = unpack_with(&tar(&[("a", 101)]), SMALL).unwrap_err();
        assert!(
            e.to_string().contains("more than the 100 byte limit"),
            "{e}"
        );
        let e = unpack_with(&tar(&[("a", 100), ("b", 100), ("c", 51)]), SMALL).unwrap_err();
        assert!(e.to_string().contains("total more than the 250"), "{e}");
        let e = unpack_with(
            &tar(&[("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)]),
            SMALL,
        )
        .unwrap_err();
        assert!(e.to_string().contains("more than 4 archive members"), "{e}");
    }

    #[test]
    fn unsafe_member_names_fail() {
        for bad in ["../x", "a/../../x", "file:x", "a//b", "./../x"] {
            // tar::Builder refuses `..`; write the name into the header directly.
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..bad.len()].copy_from_slice(bad.as_bytes());
            h.set_size(1);
            h.set_mode(0o644);
            h.set_cksum();
            let mut data = h.as_bytes().to_vec();
            data.extend_from_slice(&[1u8; 512]);
            data.extend_from_slice(&[0u8; 1024]);
            let e = unpack_with(&data, SMALL).unwrap_err();
            assert!(e.to_string().contains("unsafe member path"), "{bad}: {e}");
        }
    }
}
