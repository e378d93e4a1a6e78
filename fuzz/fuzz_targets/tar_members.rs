//! Bootloader archive members: the input is a tar stream, packed into xz and unpacked
//! by `archive::unpack` into a blob store on tmpfs, as a sync does. Properties: no
//! panic, every member kept has a clean relative path, and the names linked at the
//! snapshot root for it are clean too.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rackboot::simplestreams::{RelPath, Sha256};
use rackboot::store::Store;
use sha2::Digest;

fn store() -> &'static Store {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            // tmpfs: unpacking syncs the file system, cheap there.
            let dir = tempfile::Builder::new()
                .prefix("rackboot-fuzz-")
                .tempdir_in("/dev/shm")
                .or_else(|_| tempfile::tempdir())
                .unwrap();
            let store = Store::open(dir.path()).unwrap();
            (dir, store)
        })
        .1
}

fn contained(p: &str) -> bool {
    RelPath::parse(p).is_some_and(|r| r.as_str() == p)
}

fuzz_target!(|data: &[u8]| {
    let store = store();
    let mut xz =
        lzma_rust2::XZWriter::new(Vec::new(), lzma_rust2::XZOptions::with_preset(0)).unwrap();
    xz.write_all(data).unwrap();
    let packed = xz.finish().unwrap();
    let digest = Sha256::from_bytes(sha2::Sha256::digest(&packed).into());
    std::fs::write(store.staged_path(&digest), &packed).unwrap();
    let result = rackboot::archive::unpack(store, &digest);
    // Start every input from an empty store.
    for e in std::fs::read_dir(store.tmp_dir()).unwrap().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let Ok(members) = result else { return };
    for m in &members {
        assert!(contained(&m.path), "member {:?} leaves the root", m.path);
    }
    let names: Vec<String> = members.into_iter().map(|m| m.path).collect();
    for (kind, arch) in [
        ("pxe", "i386"),
        ("uefi", "amd64"),
        ("uefi", "arm64"),
        ("open-firmware", "ppc64el"),
    ] {
        for (served, member) in rackboot::plan::root_links(kind, arch, &names) {
            assert!(contained(&served), "root link {served:?}");
            assert!(
                names.contains(&member),
                "link to a missing member {member:?}"
            );
        }
    }
});
