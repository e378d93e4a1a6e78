//! `rackboot sync` against a fake signed mirror on 127.0.0.1.

use std::time::Duration;

use sequoia_openpgp::parse::Parse as _;
use sequoia_openpgp::types::HashAlgorithm;

use crate::harness::*;
use crate::upstream::*;

/// A mirror with noble amd64 + arm64 images and bootloaders, signed by `key`.
fn standard(env: &Env, key: &TestKey, version: &str) -> Vec<ProductSpec> {
    let mut products = vec![
        image("noble", "amd64", version, 64 << 10),
        image("noble", "arm64", version, 48 << 10),
    ];
    products.extend(bootloaders("20210819.0"));
    write_stream(&env.mirror, &products, key, SHA512);
    products
}

fn setup(arches: &[&str]) -> (Env, TestKey, MirrorServer) {
    let env = Env::new();
    let key = TestKey::generate();
    key.write_keyring(&env.keyring);
    standard(&env, &key, "20261101");
    let server = MirrorServer::start(&env.mirror);
    env.write_config(&server.url(), arches, "");
    (env, key, server)
}

/// Every served file equals the upstream item it came from.
fn assert_current_matches(env: &Env, products: &[ProductSpec], arches: &[&str]) {
    let cur = env.current();
    for p in products
        .iter()
        .filter(|p| p.fields.get("release").is_some())
    {
        let arch = p.fields["arch"].as_str().unwrap();
        if !arches.contains(&arch) {
            continue;
        }
        let (_, items) = p.versions.iter().next_back().unwrap();
        for it in items {
            let name = it.path.rsplit('/').next().unwrap();
            for sub in ["ga-24.04", "generic"] {
                let f = cur.join(format!("ubuntu/{arch}/{sub}/noble/stable/{name}"));
                assert_eq!(file_sha256(&f), sha256_hex(&it.data), "{}", f.display());
            }
        }
    }
}

#[test]
fn signed_mirror_syncs_then_noop_is_one_conditional_request() {
    let (env, key, server) = setup(&["amd64", "arm64"]);
    let products = standard(&env, &key, "20261101");
    let out = env.ok(&["sync"]);
    assert!(out.contains("synced: generation 1"), "{out}");
    assert_current_matches(&env, &products, &["amd64", "arm64"]);
    let cur = env.current();
    // Bootloaders unpacked to the names firmware asks for.
    let bios = b"lpxelinux-bios-http".to_vec();
    for (name, want) in [
        ("pxelinux.0", bios.clone()),
        ("lpxelinux.0", bios),
        ("bootx64.efi", payload(3, 5000)),
        ("grubx64.efi", payload(4, 6000)),
        ("grub/x86_64-efi/http.mod", payload(5, 700)),
        ("grubaa64.efi", payload(6, 6000)),
        ("bootaa64.efi", payload(7, 5000)),
        ("syslinux/ldlinux.c32", payload(1, 4000)),
    ] {
        assert!(std::fs::read(cur.join(name)).unwrap() == want, "{name}");
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cur.join("maas.meta")).unwrap()).unwrap();
    assert_eq!(
        meta["ubuntu"]["amd64"]["ga-24.04"]["generic"]["noble"]["stable"]["version_name"],
        "20261101"
    );

    // The catalog: every image the source offers, with its selection.
    let catalog: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.state.join("catalog.json")).unwrap()).unwrap();
    let entries: Vec<(String, bool)> = catalog
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                format!(
                    "{}/{}/{}/{}",
                    e["os"].as_str().unwrap(),
                    e["release"].as_str().unwrap(),
                    e["arch"].as_str().unwrap(),
                    e["version"].as_str().unwrap()
                ),
                e["selected"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            ("ubuntu/noble/amd64/20261101".to_string(), true),
            ("ubuntu/noble/arm64/20261101".to_string(), true)
        ]
    );

    // Nothing new upstream: one conditional request, no file written.
    let before = env.fingerprint();
    let state_mtime = std::fs::metadata(env.state.join("state.json"))
        .unwrap()
        .modified()
        .unwrap();
    server.clear_log();
    std::thread::sleep(Duration::from_millis(20));
    let since = std::time::SystemTime::now();
    let out = env.ok(&["sync"]);
    assert!(
        out.contains("up to date: generation 1 unchanged (1 request"),
        "{out}"
    );
    // No file at all was written (lock file and catalog included).
    fn newer(dir: &std::path::Path, since: std::time::SystemTime, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.modified().unwrap() > since {
                out.push(e.path().display().to_string());
            }
            if meta.is_dir() {
                newer(&e.path(), since, out);
            }
        }
    }
    let mut written = Vec::new();
    newer(&env.state, since, &mut written);
    assert!(written.is_empty(), "a no-op sync wrote {written:?}");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(reqs[0].path.ends_with("streams/v1/index.sjson"));
    assert!(reqs[0].headers.contains_key("if-none-match"), "{reqs:?}");
    assert_eq!(reqs[0].status, 304);
    assert_eq!(env.fingerprint(), before);
    assert_eq!(
        std::fs::metadata(env.state.join("state.json"))
            .unwrap()
            .modified()
            .unwrap(),
        state_mtime
    );
}

#[test]
fn new_version_becomes_current_and_unselected_image_is_collected() {
    let (env, key, _server) = setup(&["amd64", "arm64"]);
    env.ok(&["sync"]);
    let old_arm_kernel = file_sha256(
        &env.current()
            .join("ubuntu/arm64/ga-24.04/noble/stable/boot-kernel"),
    );

    // A new version upstream becomes current.
    let products = standard(&env, &key, "20261120");
    let out = env.ok(&["sync"]);
    assert!(out.contains("synced: generation 2 (was 1)"), "{out}");
    assert!(
        out.contains("~ ubuntu/amd64/ga-24.04/noble/stable 20261101 -> 20261120"),
        "{out}"
    );
    assert_current_matches(&env, &products, &["amd64", "arm64"]);
    assert!(
        !env.state.join("snapshots/1").exists(),
        "old snapshot collected"
    );

    // Unselect arm64: it disappears from the next snapshot and its blobs go.
    let arm_kernel = file_sha256(
        &env.current()
            .join("ubuntu/arm64/ga-24.04/noble/stable/boot-kernel"),
    );
    assert_ne!(arm_kernel, old_arm_kernel);
    env.ok(&["boot-source-selections", "update", "1", "1", "arches=amd64"]);
    let out = env.ok(&["sync"]);
    assert!(
        out.contains("- ubuntu/arm64/ga-24.04/noble/stable 20261120"),
        "{out}"
    );
    assert!(out.contains("- bootloader/uefi/arm64"), "{out}");
    assert!(!env.current().join("ubuntu/arm64").exists());
    assert!(!env.current().join("grubaa64.efi").exists());
    assert!(env
        .current()
        .join("ubuntu/amd64/generic/noble/stable/boot-kernel")
        .exists());
    let blobs = env.blobs();
    assert!(!blobs.contains(&arm_kernel), "arm64 kernel blob collected");
    assert!(!blobs.contains(&old_arm_kernel));
}

#[test]
fn real_ubuntu_cloudimage_keyring_loads_and_is_usable() {
    let path = std::path::Path::new("/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg");
    assert!(
        path.exists(),
        "{} is missing: install Debian's ubuntu-keyring (bookworm-backports); .ci/run does",
        path.display()
    );
    let kr = rackboot::verify::Keyring::from_file(path).unwrap();
    assert_eq!(kr.fingerprints().len(), 2, "{:?}", kr.fingerprints());
    assert_eq!(kr.usable_certs(std::time::SystemTime::now()), 2);
    // …which the default policy would not accept:
    let certs: Vec<sequoia_openpgp::Cert> =
        sequoia_openpgp::cert::CertParser::from_bytes(&std::fs::read(path).unwrap())
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    assert!(certs.iter().all(|c| !valid_under_standard_policy(c)));
}

#[test]
fn mirror_signed_by_a_sha1_selfsigned_key_syncs() {
    let env = Env::new();
    let key = TestKey::sha1_selfsigned();
    assert!(
        !valid_under_standard_policy(&key.cert),
        "fixture must need the relaxed policy"
    );
    key.write_keyring(&env.keyring);
    let products = standard(&env, &key, "20261101");
    let server = MirrorServer::start(&env.mirror);
    env.write_config(&server.url(), &["amd64"], "");
    env.ok(&["sync"]);
    assert_current_matches(&env, &products, &["amd64"]);
}

/// Syncs a good mirror, breaks it with `breakage`, and checks that the next sync fails
/// with a message containing `expect` and leaves `current` and the store unchanged.
fn failing_sync_changes_nothing(
    expect: &str,
    config_extra: &str,
    breakage: impl FnOnce(&Env, &TestKey, &MirrorServer),
) {
    let env = Env::new();
    let key = TestKey::generate();
    key.write_keyring(&env.keyring);
    standard(&env, &key, "20261101");
    let server = MirrorServer::start(&env.mirror);
    env.write_config(&server.url(), &["amd64", "arm64"], config_extra);
    env.ok(&["sync"]);
    // Something new upstream, so the failing run has real work to do.
    breakage(&env, &key, &server);
    let before = env.fingerprint();
    let stderr = env.fails(&["sync"], 1);
    assert!(stderr.contains(expect), "expected {expect:?} in:\n{stderr}");
    let first = stderr.lines().find(|l| l.contains("error:")).unwrap_or("");
    assert!(
        first.contains("http://127.0.0.1") || first.contains(&env.dir.path().display().to_string()),
        "the first error line names the URL or file: {first}"
    );
    assert_eq!(env.fingerprint(), before, "a failed sync changed the store");
    // The served tree still verifies.
    assert!(env
        .current()
        .join("ubuntu/amd64/generic/noble/stable/boot-kernel")
        .exists());
}

fn new_version(env: &Env, key: &TestKey) -> Vec<ProductSpec> {
    standard(env, key, "20261120")
}

/// The signed products document of the fake upstream's stream.
fn products_doc(env: &Env) -> std::path::PathBuf {
    env.mirror
        .join("streams/v1/com.ubuntu.maas:stable:v3:download.sjson")
}

#[test]
fn fails_safely_on_unknown_key() {
    failing_sync_changes_nothing("unknown key", "", |env, _key, _s| {
        new_version(env, &TestKey::generate());
    });
}

#[test]
fn fails_safely_on_wrong_signature() {
    // Signed by another key whose certificate is in the keyring under the same
    // fingerprint is impossible; a signature made over different text is the
    // realistic "wrong signature": take the signature block of another document.
    failing_sync_changes_nothing("bad signature", "", |env, key, _s| {
        new_version(env, key);
        let idx = env.mirror.join("streams/v1/index.sjson");
        let other = products_doc(env);
        let idx_text = String::from_utf8(std::fs::read(&idx).unwrap()).unwrap();
        let other_text = String::from_utf8(std::fs::read(&other).unwrap()).unwrap();
        let sig_start = |t: &str| t.find("-----BEGIN PGP SIGNATURE-----").unwrap();
        let spliced = format!(
            "{}{}",
            &idx_text[..sig_start(&idx_text)],
            &other_text[sig_start(&other_text)..]
        );
        std::fs::write(&idx, spliced).unwrap();
    });
}

#[test]
fn fails_safely_on_tampered_index() {
    failing_sync_changes_nothing("bad signature", "", |env, key, _s| {
        new_version(env, key);
        let p = products_doc(env);
        let text = String::from_utf8(std::fs::read(&p).unwrap()).unwrap();
        std::fs::write(&p, text.replacen("20261120", "20261121", 1)).unwrap();
    });
}

#[test]
fn fails_safely_on_sha1_data_signature() {
    failing_sync_changes_nothing("too weak", "", |env, key, _s| {
        let mut products = vec![image("noble", "amd64", "20261120", 64 << 10)];
        products.extend(bootloaders("20210819.0"));
        write_stream(
            &env.mirror,
            &products,
            key,
            Signing::Signed(HashAlgorithm::SHA1),
        );
    });
}

#[test]
fn fails_safely_on_unsigned_products_file_in_signed_mode() {
    failing_sync_changes_nothing("not a clearsigned document", "", |env, key, _s| {
        new_version(env, key);
        let dir = env.mirror.join("streams/v1");
        std::fs::copy(
            dir.join("com.ubuntu.maas:stable:v3:download.json"),
            dir.join("com.ubuntu.maas:stable:v3:download.sjson"),
        )
        .unwrap();
    });
}

fn with_item(env: &Env, key: &TestKey, edit: impl FnOnce(&mut ItemSpec)) {
    let mut img = image("noble", "amd64", "20261120", 64 << 10);
    edit(&mut img.versions.values_mut().next().unwrap()[0]);
    let mut products = vec![img, image("noble", "arm64", "20261101", 48 << 10)];
    products.extend(bootloaders("20210819.0"));
    write_stream(&env.mirror, &products, key, SHA512);
}

#[test]
fn fails_safely_on_wrong_sha256() {
    failing_sync_changes_nothing("sha256 mismatch", "", |env, key, _s| {
        with_item(env, key, |it| {
            it.listed_sha256 = Some(sha256_hex(b"something else"))
        });
    });
}

#[test]
fn fails_safely_on_wrong_size() {
    failing_sync_changes_nothing("wrong size", "", |env, key, _s| {
        with_item(env, key, |it| {
            it.listed_size = Some(it.data.len() as u64 - 100)
        });
    });
}

#[test]
fn fails_safely_on_truncated_body() {
    failing_sync_changes_nothing("truncated body", "", |env, key, server| {
        new_version(env, key);
        server.fault(
            "20261120/ga-24.04/generic/boot-kernel",
            Fault::Truncate(1000),
        );
    });
}

#[test]
fn fails_safely_on_404_and_503() {
    failing_sync_changes_nothing("HTTP 404", "", |env, key, _s| {
        new_version(env, key);
        std::fs::remove_file(env.mirror.join("noble/amd64/20261120/squashfs")).unwrap();
    });
    failing_sync_changes_nothing("HTTP 503", "", |env, key, server| {
        new_version(env, key);
        server.fault("streams/v1/index.sjson", Fault::Status(503));
    });
}

#[test]
fn fails_safely_on_stalled_upstream() {
    failing_sync_changes_nothing("timed out", "", |env, key, server| {
        new_version(env, key);
        server.fault("20261120/squashfs", Fault::Stall(Duration::from_secs(30)));
    });
}

#[test]
fn fails_safely_on_redirect_to_another_host() {
    failing_sync_changes_nothing("redirect", "", |env, key, server| {
        new_version(env, key);
        server.fault(
            "20261120/squashfs",
            Fault::Redirect("http://127.0.0.2:9/elsewhere".into()),
        );
    });
}

#[test]
fn fails_safely_on_malformed_json() {
    failing_sync_changes_nothing("malformed json", "", |env, key, _s| {
        new_version(env, key);
        let p = products_doc(env);
        std::fs::write(
            &p,
            key.clearsign(b"{\"format\": \"products:1.0\", ", HashAlgorithm::SHA512),
        )
        .unwrap();
    });
}

#[test]
fn fails_safely_on_path_escape() {
    failing_sync_changes_nothing("unsafe path", "", |env, key, _s| {
        with_item(env, key, |it| it.path = "../../etc/passwd".into());
    });
}

#[test]
fn fails_safely_on_full_disk() {
    // The state dir on a small tmpfs: the first sync fits, the next one does not.
    let env = Env::new();
    std::fs::create_dir_all(&env.state).unwrap();
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1200k",
            "rackboot-test",
            &env.state.display().to_string(),
        ])
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs needs root (CI runs as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(env.state.clone());
    let mut products = vec![image("noble", "amd64", "20261101", 64 << 10)];
    products.extend(bootloaders("20210819.0"));
    let (key, server) = env.signed_upstream(&products);
    env.write_config(&server.url(), &["amd64"], "");
    env.ok(&["sync"]);
    let mut products = vec![image("noble", "amd64", "20261120", 2 << 20)];
    products.extend(bootloaders("20210819.0"));
    write_stream(&env.mirror, &products, &key, SHA512);
    let before = env.fingerprint();
    let stderr = env.fails(&["sync"], 1);
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert_eq!(env.fingerprint(), before);
}

#[test]
fn kill_9_mid_download_then_resume_with_range() {
    let env = Env::new();
    let mut products = vec![image("noble", "amd64", "20261101", 8 << 20)];
    products.extend(bootloaders("20210819.0"));
    let (_key, server) = env.signed_upstream(&products);
    env.write_config(&server.url(), &["amd64"], "");
    server.fault("20261101/squashfs", Fault::Throttle(2 << 20));
    let mut child = env
        .command(&["sync"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tmp = env.state.join("tmp");
    let squashfs = products[0].versions.values().next().unwrap()[2].clone();
    assert_eq!(squashfs.ftype, "squashfs");
    let part = tmp.join(format!("{}.part", sha256_hex(&squashfs.data)));
    let part_size = || std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    wait_until(
        Duration::from_secs(30),
        "a partial squashfs download",
        || part_size() > (1 << 20),
    );
    child.kill().unwrap(); // SIGKILL, by PID
    child.wait().unwrap();
    assert!(
        !env.current().exists(),
        "nothing published by the killed run"
    );
    let partial = part_size();
    assert!(
        partial > (1 << 20) && partial < squashfs.data.len() as u64,
        "{partial}"
    );

    server.clear_faults();
    server.clear_log();
    env.ok(&["sync"]);
    assert_current_matches(&env, &products, &["amd64"]);
    let ranged: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("squashfs") && r.headers.contains_key("range"))
        .collect();
    assert_eq!(
        ranged.len(),
        1,
        "one resumed request: {:?}",
        server.requests()
    );
    assert_eq!(ranged[0].status, 206);
    let from: u64 = ranged[0].headers["range"]
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert_eq!(from, partial, "resumed from the partial file's length");
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "tmp/ is clean"
    );
}

#[test]
fn concurrent_syncs_never_corrupt() {
    let (env, key, server) = setup(&["amd64", "arm64"]);
    let products = standard(&env, &key, "20261101");
    server.fault("squashfs", Fault::Throttle(1 << 20));
    let a = env.spawn(&["sync"]);
    // The lock is an flock on state_dir/lock (visible in /proc/locks by inode).
    let locked = || {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(env.state.join("lock")) else {
            return false;
        };
        let ino = format!(":{}", meta.ino());
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| {
                l.contains("FLOCK")
                    && l.split_whitespace()
                        .nth(5)
                        .is_some_and(|d| d.ends_with(&ino))
            })
    };
    wait_until(
        Duration::from_secs(20),
        "the first sync to take the lock",
        locked,
    );
    // A second sync with --no-wait says clearly that one is running, and which.
    let stderr = env.fails(&["sync", "--no-wait"], 1);
    assert!(
        stderr.contains(&format!(
            "another sync is running (lock {} held by pid {})",
            env.state.join("lock").display(),
            a.id()
        )),
        "{stderr}"
    );
    // A third waits for the first, then finds nothing to do.
    let c = env.spawn(&["sync"]);
    let a = wait_output(a, Duration::from_secs(60));
    let c = wait_output(c, Duration::from_secs(60));
    assert_success(&a, "the first sync");
    assert_success(&c, "the second sync");
    assert!(
        String::from_utf8_lossy(&c.stderr).contains("waiting"),
        "the waiter said it waits"
    );
    assert!(String::from_utf8_lossy(&c.stdout).contains("up to date"));
    assert_current_matches(&env, &products, &["amd64", "arm64"]);
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let (env, _key, _server) = setup(&["amd64"]);
    let out = env.ok(&["sync", "--dry-run"]);
    assert!(
        out.contains("+ com.ubuntu.maas.stable:v3:boot:24.04:amd64:ga-24.04 20261101 boot-kernel"),
        "{out}"
    );
    assert!(out.contains("+ bootloader/pxe/i386 20210819.0"), "{out}");
    assert!(out.contains("nothing changed"), "{out}");
    assert!(
        !env.state.exists(),
        "dry run created {}",
        env.state.display()
    );
}

#[test]
fn config_errors_exit_2_naming_the_key_or_file() {
    let env = Env::new();
    std::fs::write(&env.config, "[sync]\nintervall = \"5m\"\n").unwrap();
    let stderr = env.fails(&["sync"], 2);
    assert!(
        stderr.contains("intervall") && stderr.contains("rackboot.toml"),
        "{stderr}"
    );
    std::fs::write(
        &env.config,
        "[[sources]]\nurl = \"http://127.0.0.1:1/\"\nkeyring_filename = \"/nonexistent/keyring.gpg\"\n",
    )
    .unwrap();
    let stderr = env.fails(&["sync"], 2);
    assert!(stderr.contains("/nonexistent/keyring.gpg"), "{stderr}");
    // Drop-ins override the main file.
    std::fs::write(
        &env.config,
        format!("state_dir = \"{}\"\n", env.state.display()),
    )
    .unwrap();
    std::fs::create_dir_all(env.dir.path().join("rackboot.toml.d")).unwrap();
    std::fs::write(
        env.dir.path().join("rackboot.toml.d/10-bad.toml"),
        "[tftp]\nmax_blksize = 9\n",
    )
    .unwrap();
    let stderr = env.fails(&["status"], 2);
    assert!(stderr.contains("max_blksize"), "{stderr}");
    // $RACKBOOT_CONFIG is honoured when --config is absent.
    let out = std::process::Command::new(BIN)
        .arg("status")
        .env("RACKBOOT_CONFIG", env.dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

/// A MAAS region's `images-stream` (classic rack sync source): unsigned
/// `…/MAAS/images-stream/streams/v1/index.json`, content id `maas:v2:download`,
/// products named `maas:boot:<os>:<arch>:<subarch>:<series>`, bootloaders with the
/// bootloader type as their series and subarch `generic`, item paths
/// `<os>/<arch>/<subarch>/<series>/<version>/<file>`.
#[test]
fn maas_region_images_stream_syncs_unsigned() {
    let env = Env::new();
    let key = TestKey::generate();
    let region = env.mirror.join("MAAS/images-stream");
    let mut products = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut p = image("noble", arch, "20261101", 32 << 10);
        p.content_id = "maas:v2:download".into();
        p.name = format!("maas:boot:ubuntu:{arch}:ga-24.04:noble");
        p.fields.insert("title".into(), "Ubuntu 24.04 LTS".into());
        for items in p.versions.values_mut() {
            for it in items.iter_mut() {
                let file = it.path.rsplit('/').next().unwrap().to_string();
                it.path = format!("ubuntu/{arch}/ga-24.04/noble/20261101/{file}");
            }
        }
        products.push(p);
    }
    for mut b in bootloaders("20210819.0") {
        let btype = b.fields["bootloader-type"].as_str().unwrap().to_string();
        let (os, arch) = (
            b.fields["os"].as_str().unwrap().to_string(),
            b.fields["arch"].as_str().unwrap().to_string(),
        );
        b.content_id = "maas:v2:download".into();
        b.name = format!("maas:boot:{os}:{arch}:generic:{btype}");
        b.fields.insert("subarch".into(), "generic".into());
        b.fields.insert("release".into(), btype.clone().into());
        for items in b.versions.values_mut() {
            for it in items.iter_mut() {
                let file = it.path.rsplit('/').next().unwrap().to_string();
                it.path = format!("{os}/{arch}/generic/{btype}/20210819.0/{file}");
            }
        }
        products.push(b);
    }
    write_stream(&region, &products, &key, SHA512);
    let server = MirrorServer::start(&env.mirror);
    std::fs::write(
        &env.config,
        format!(
            r#"state_dir = "{state}"

[[sources]]
url = "{url}MAAS/images-stream/streams/v1/index.json"
unsigned = true

[[sources.selections]]
os = "ubuntu"
release = "noble"
arches = ["amd64", "arm64"]
"#,
            state = env.state.display(),
            url = server.url()
        ),
    )
    .unwrap();
    let out = env.ok(&["sync"]);
    assert!(out.contains("synced: generation 1"), "{out}");
    // (The first two products are the images; the region gives bootloaders a release.)
    assert_current_matches(&env, &products[..2], &["amd64", "arm64"]);
    let cur = env.current();
    assert_eq!(
        std::fs::read(cur.join("pxelinux.0")).unwrap(),
        b"lpxelinux-bios-http"
    );
    assert_eq!(
        std::fs::read(cur.join("bootx64.efi")).unwrap(),
        payload(3, 5000)
    );
    // Unsigned: the plain index was read, never the .sjson.
    let paths: Vec<String> = server.requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.iter().any(|p| p.ends_with("/streams/v1/index.json")),
        "{paths:?}"
    );
    assert!(!paths.iter().any(|p| p.ends_with(".sjson")), "{paths:?}");
    // And the no-op sync stays one conditional request.
    server.clear_log();
    let out = env.ok(&["sync"]);
    assert!(out.contains("up to date"), "{out}");
    assert_eq!(server.requests().len(), 1);
}

/// Upstream republishing a version under the same name with other bytes is picked
/// up (the index changed, the files differ) and reported as such.
#[test]
fn republished_version_is_synced_and_reported() {
    let (env, key, _server) = setup(&["amd64"]);
    env.ok(&["sync"]);
    let mut products = vec![
        image("noble", "amd64", "20261101", 64 << 10),
        image("noble", "arm64", "20261101", 48 << 10),
    ];
    products.extend(bootloaders("20210819.0"));
    let kernel = &mut products[0].versions.get_mut("20261101").unwrap()[0];
    kernel.data = payload(99, 70_000);
    let want = sha256_hex(&kernel.data);
    write_stream(&env.mirror, &products, &key, SHA512);
    let out = env.ok(&["sync"]);
    assert!(out.contains("synced: generation 2"), "{out}");
    assert!(
        out.contains(
            "~ ubuntu/amd64/ga-24.04/noble/stable 20261101 (republished with other content)"
        ),
        "{out}"
    );
    assert_eq!(
        file_sha256(
            &env.current()
                .join("ubuntu/amd64/ga-24.04/noble/stable/boot-kernel")
        ),
        want
    );
}
