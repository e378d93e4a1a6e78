//! `rackboot mirror`: sstream-mirror's job, against the fake signed mirror.

use std::path::Path;

use crate::harness::*;
use crate::upstream::*;

/// noble amd64 with the given versions, noble arm64, and the bootloaders.
fn products(amd64_versions: &[&str]) -> Vec<ProductSpec> {
    let mut amd64 = image("noble", "amd64", amd64_versions[0], 32 << 10);
    for v in &amd64_versions[1..] {
        amd64
            .versions
            .extend(image("noble", "amd64", v, 32 << 10).versions);
    }
    let mut p = vec![amd64, image("noble", "arm64", "20261101", 32 << 10)];
    p.extend(bootloaders("20210819.0"));
    p
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, p: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

#[test]
fn mirror_filters_verifies_and_feeds_a_rack() {
    let env = Env::new();
    let upstream = products(&["20261101", "20261102"]);
    let (key, server) = env.signed_upstream(&upstream);
    let dest = env.dir.path().join("out");
    let (url, dest_s, keyring) = (
        server.url(),
        dest.display().to_string(),
        env.keyring.display().to_string(),
    );
    let mirror = |extra: &[&str]| -> Vec<String> {
        let mut a = vec!["mirror", "--max", "1", "--keyring", &keyring, &url, &dest_s];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect()
    };

    // Dry run: the plan in sstream-mirror's words, nothing written.
    let mut dry = mirror(&["release~noble", "arch=amd64"]);
    dry.insert(1, "--dry-run".into());
    let out = env.run(&args(&dry));
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("+ com.ubuntu.maas.stable:v3:boot:24.04:amd64:ga-24.04 20261102 boot-kernel noble/amd64/20261102/ga-24.04/generic/boot-kernel 0 Mb"),
        "{err}"
    );
    assert!(
        !err.contains("20261101"),
        "--max 1 keeps the greatest version: {err}"
    );
    assert!(!err.contains("arm64"), "{err}");
    assert!(err.trim_end().ends_with("Mb change"), "{err}");
    assert!(!dest.exists(), "a dry run writes nothing");

    // Images: amd64 only, newest version only, bytes as listed.
    env.ok(&args(&mirror(&["release~noble", "arch=amd64"])));
    let amd64 = &upstream[0].versions["20261102"];
    for it in amd64 {
        assert_eq!(
            std::fs::read(dest.join(&it.path)).unwrap(),
            it.data,
            "{}",
            it.path
        );
    }
    let files = files_under(&dest);
    assert!(!files.iter().any(|f| f.contains("20261101/")), "{files:?}");
    assert!(!files.iter().any(|f| f.contains("arm64")), "{files:?}");
    assert!(!files.iter().any(|f| f.ends_with(".part")), "{files:?}");
    // Metadata byte for byte (signatures still verify downstream).
    for rel in files.iter().filter(|f| f.starts_with("streams/v1/")) {
        assert_eq!(
            std::fs::read(dest.join(rel)).unwrap(),
            std::fs::read(env.mirror.join(rel)).unwrap(),
            "{rel}"
        );
    }
    assert!(files.contains(&"streams/v1/index.sjson".to_string()));
    assert!(files.iter().any(|f| f.starts_with(".data/")), "{files:?}");

    // Bootloaders in a second run; the images of the first stay.
    env.ok(&args(&mirror(&["os~(grub|pxelinux)"])));
    let files = files_under(&dest);
    assert!(files.iter().any(|f| f.contains("pxelinux")), "{files:?}");
    assert!(
        dest.join(&amd64[0].path).exists(),
        "the first run's images stay"
    );

    // A rack syncs from the mirror, verifying it with the same keyring.
    env.write_config(&format!("file://{dest_s}/"), &["amd64"], "");
    let out = env.ok(&["sync"]);
    assert!(out.contains("synced: generation 1"), "{out}");
    assert_eq!(
        file_sha256(
            &env.current()
                .join("ubuntu/amd64/ga-24.04/noble/stable/boot-kernel")
        ),
        sha256_hex(&amd64[0].data)
    );

    // A new upstream version replaces the old one on disk.
    let newer = products(&["20261101", "20261102", "20261103"]);
    write_stream(&env.mirror, &newer, &key, SHA512);
    env.ok(&args(&mirror(&["release~noble", "arch=amd64"])));
    let files = files_under(&dest);
    assert!(files.iter().any(|f| f.contains("20261103/")), "{files:?}");
    assert!(!files.iter().any(|f| f.contains("20261102/")), "{files:?}");

    // A payload that does not match its checksum is refused and not kept.
    let bad_dest = env.dir.path().join("bad");
    let bad_item = &newer[0].versions["20261103"][0];
    std::fs::write(env.mirror.join(&bad_item.path), b"tampered").unwrap();
    let out = env.run(&[
        "mirror",
        "--keyring",
        &keyring,
        &url,
        &bad_dest.display().to_string(),
        "release~noble",
        "arch=amd64",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&bad_item.path), "{err}");
    assert!(!bad_dest.join(&bad_item.path).exists());

    // Another key's signature is refused; --no-verify reads it anyway.
    let other = TestKey::generate();
    let other_ring = env.dir.path().join("other.gpg");
    other.write_keyring(&other_ring);
    let d2 = env.dir.path().join("out2").display().to_string();
    let err = env.fails(
        &[
            "mirror",
            "--keyring",
            &other_ring.display().to_string(),
            &url,
            &d2,
            "os=pxelinux",
        ],
        1,
    );
    assert!(err.contains("signature"), "{err}");
    env.ok(&["mirror", "--no-verify", &url, &d2, "os=pxelinux"]);
    assert!(files_under(Path::new(&d2))
        .iter()
        .any(|f| f.contains("pxelinux")));

    // Usage errors exit 2 and name the argument.
    let err = env.fails(&["mirror", &url, &d2, "arch:amd64"], 2);
    assert!(err.contains("arch:amd64"), "{err}");
    let err = env.fails(&["mirror", "--keep", &url, &d2], 2);
    assert!(err.contains("--max"), "{err}");
    let err = env.fails(&["mirror", &url, &d2], 1);
    assert!(err.contains("--keyring"), "{err}");
}
