//! Hostile upstreams: traversal (`../../x`), absolute (`/tmp/x`), dot (`.`, `..`),
//! scheme (`file:/etc/passwd`, `http://other/x`) and foreign-host values in every
//! field that forms a path (os, arch, subarch, release, label, bootloader-type,
//! kflavor, item path, content_id, archive member names, mirror records), for signed
//! and unsigned sources, through `rackboot sync` and `rackboot mirror`. Each run must
//! create nothing outside `state_dir` / DEST (the directory around them is scanned
//! before and after), leave `current` as it was, and name the field.

use std::collections::BTreeMap;
use std::path::Path;

use sequoia_openpgp::types::HashAlgorithm;
use serde_json::json;

use crate::harness::*;
use crate::upstream::*;

const CID: &str = "com.ubuntu.maas:stable:v3:download";

/// Everything under the test's temp dir except the trees a run may write (`state`,
/// `dest`) and the fake upstream (`mirror`): path → content hash or link target.
fn outside(env: &Env) -> BTreeMap<String, String> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
        let rel = p.strip_prefix(base).unwrap().display().to_string();
        if ["state", "dest", "mirror"].contains(&rel.as_str()) {
            return;
        }
        let meta = std::fs::symlink_metadata(p).unwrap();
        if meta.is_symlink() {
            out.insert(rel, format!("-> {:?}", std::fs::read_link(p).unwrap()));
        } else if meta.is_dir() {
            out.insert(rel, "dir".into());
            for e in std::fs::read_dir(p).unwrap().flatten() {
                walk(base, &e.path(), out);
            }
        } else {
            out.insert(rel, file_sha256(p));
        }
    }
    let mut out = BTreeMap::new();
    walk(env.dir.path(), env.dir.path(), &mut out);
    out
}

/// A name no other test uses, for traversals that would land in `/tmp`.
fn canary(env: &Env) -> String {
    format!(
        "rackboot-hostile-{}",
        env.dir.path().file_name().unwrap().to_string_lossy()
    )
}

/// The values every path-forming field is tried with.
fn hostile_values(env: &Env) -> Vec<String> {
    let c = canary(env);
    vec![
        "../../x".into(),
        format!("{}tmp/{c}", "../".repeat(16)),
        format!("{}/abs-x", env.dir.path().display()),
        format!("/tmp/{c}-abs"),
        ".".into(),
        "..".into(),
        "x/../../y".into(),
        "file:/etc/passwd".into(),
        "http://other.invalid/x".into(),
        "//other.invalid/x".into(),
    ]
}

fn no_canary(env: &Env) {
    let c = canary(env);
    for p in [format!("/tmp/{c}"), format!("/tmp/{c}-abs")] {
        assert!(
            std::fs::symlink_metadata(&p).is_err(),
            "{p} was created outside the state dir"
        );
    }
}

/// A rack synced once from a good stream: noble amd64 and the bootloaders.
struct Rig {
    env: Env,
    key: TestKey,
    _server: MirrorServer,
    signed: bool,
}

fn good_products() -> Vec<ProductSpec> {
    let mut p = vec![image("noble", "amd64", "20261101", 16 << 10)];
    p.extend(bootloaders("20210819.0"));
    p
}

impl Rig {
    fn new(signed: bool) -> Rig {
        let env = Env::new();
        let (key, server) = env.signed_upstream(&good_products());
        if signed {
            env.write_config(&server.url(), &["amd64"], "");
        } else {
            std::fs::write(
                &env.config,
                format!(
                    "state_dir = \"{}\"\n\n[[sources]]\nurl = \"{}streams/v1/index.json\"\n\
                     unsigned = true\n\n[[sources.selections]]\nos = \"ubuntu\"\n\
                     release = \"noble\"\narches = [\"amd64\"]\n",
                    env.state.display(),
                    server.url()
                ),
            )
            .unwrap();
        }
        let out = env.ok(&["sync"]);
        assert!(out.contains("synced: generation 1"), "{out}");
        Rig {
            env,
            key,
            _server: server,
            signed,
        }
    }

    fn publish(&self, products: &[ProductSpec]) {
        write_stream(&self.env.mirror, products, &self.key, SHA512);
    }

    /// Rewrites every metadata document's text with `f`.
    fn rewrite(&self, f: impl Fn(&str) -> String) {
        rewrite_docs(&self.env.mirror, &self.key, f);
    }

    /// Runs a sync that must fail: nothing outside the state dir, `current` and the
    /// store unchanged, and every `expect` in the error.
    fn refused(&self, what: &str, expect: &[&str]) {
        let env = &self.env;
        // Without a catalog the run reads the whole upstream (no conditional GET of
        // an index that did not change).
        let _ = std::fs::remove_file(env.state.join("catalog.json"));
        let (before, around) = (env.fingerprint(), outside(env));
        let out = env.run(&["sync"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mode = if self.signed { "signed" } else { "unsigned" };
        assert_eq!(
            out.status.code(),
            Some(1),
            "{mode} {what}: the sync must fail\n{stderr}"
        );
        for e in expect {
            assert!(
                stderr.contains(e),
                "{mode} {what}: expected {e:?} in\n{stderr}"
            );
        }
        assert_eq!(
            env.fingerprint(),
            before,
            "{mode} {what}: the store changed"
        );
        assert_eq!(
            outside(env),
            around,
            "{mode} {what}: a file appeared outside the state dir"
        );
        no_canary(env);
    }
}

fn with_field(target: &str, field: &str, value: &str) -> Vec<ProductSpec> {
    let mut products = good_products();
    for p in &mut products {
        let is_image = p.fields.contains_key("release");
        let is = match target {
            "image" => is_image,
            _ => p.fields.get("bootloader-type").and_then(|v| v.as_str()) == Some("pxe"),
        };
        if is {
            p.fields.insert(field.into(), json!(value));
        }
    }
    products
}

fn sync_refuses_hostile_fields(signed: bool) {
    let rig = Rig::new(signed);
    let values = hostile_values(&rig.env);
    let fields = [
        ("image", "os"),
        ("image", "arch"),
        ("image", "subarch"),
        ("image", "release"),
        ("image", "label"),
        ("image", "kflavor"),
        ("bootloader", "arch"),
        ("bootloader", "bootloader-type"),
        ("bootloader", "label"),
    ];
    for (target, field) in fields {
        for v in &values {
            rig.publish(&with_field(target, field, v));
            let product = if target == "image" {
                "com.ubuntu.maas.stable:v3:boot:24.04:amd64:ga-24.04"
            } else {
                "com.ubuntu.maas.stable:1:pxelinux:pxe:i386"
            };
            rig.refused(
                &format!("{target} {field}={v:?}"),
                &["boot source", &format!("unsafe {field} "), product],
            );
        }
    }
}

/// The two tests of one check: over a signed stream and over an unsigned one.
macro_rules! signed_and_unsigned {
    ($check:ident: $signed:ident, $unsigned:ident) => {
        #[test]
        fn $signed() {
            $check(true);
        }

        #[test]
        fn $unsigned() {
            $check(false);
        }
    };
}

signed_and_unsigned!(sync_refuses_hostile_fields: sync_refuses_hostile_fields_signed, sync_refuses_hostile_fields_unsigned);

fn sync_refuses_hostile_item_paths(signed: bool) {
    let rig = Rig::new(signed);
    // A local file whose size and hash the attacker knows (issue 10 row 2).
    let secret = rig.env.dir.path().join("secret");
    std::fs::write(&secret, b"local secret").unwrap();
    let mut values = hostile_values(&rig.env);
    values.push(format!("file:{}", secret.display()));
    values.push(format!("file://{}", secret.display()));
    for v in &values {
        let mut products = good_products();
        let it = &mut products[0].versions.values_mut().next().unwrap()[0];
        if v.contains("secret") {
            // Listed with the local file's size and sha256.
            it.data = b"local secret".to_vec();
        }
        let good = it.path.clone();
        rig.publish(&products);
        rig.rewrite(|t| t.replace(&format!("\"{good}\""), &json!(v).to_string()));
        rig.refused(
            &format!("item path {v:?}"),
            &["boot source", "unsafe path", "boot-kernel"],
        );
    }
    // An index entry's path is an item path too.
    for v in [
        "../../x.json",
        "file:/etc/passwd",
        "http://other.invalid/x.json",
    ] {
        rig.publish(&good_products());
        let from = format!("streams/v1/{CID}.json");
        rig.rewrite(|t| t.replace(&format!("\"{from}\""), &json!(v).to_string()));
        rig.refused(&format!("index path {v:?}"), &["unsafe path"]);
    }
}

signed_and_unsigned!(sync_refuses_hostile_item_paths: sync_refuses_hostile_item_paths_signed, sync_refuses_hostile_item_paths_unsigned);

fn sync_refuses_hostile_content_ids(signed: bool) {
    let rig = Rig::new(signed);
    for v in hostile_values(&rig.env) {
        rig.publish(&good_products());
        rig.rewrite(|t| t.replace(&format!("\"{CID}\""), &json!(v).to_string()));
        rig.refused(&format!("content_id {v:?}"), &["boot source", "content_id"]);
    }
}

signed_and_unsigned!(sync_refuses_hostile_content_ids: sync_refuses_hostile_content_ids_signed, sync_refuses_hostile_content_ids_unsigned);

/// A `tar.xz` with one member whose name is written into the header as is (the tar
/// builder refuses `..` and absolute names).
fn raw_member_tar_xz(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend_from_slice(data);
    raw.resize(raw.len().div_ceil(512) * 512 + 1024, 0);
    let mut xz =
        lzma_rust2::XZWriter::new(Vec::new(), lzma_rust2::XZOptions::with_preset(1)).unwrap();
    std::io::Write::write_all(&mut xz, &raw).unwrap();
    xz.finish().unwrap()
}

#[test]
fn sync_refuses_hostile_archive_members() {
    for signed in [true, false] {
        let rig = Rig::new(signed);
        let c = canary(&rig.env);
        let names = [
            "../../x".to_string(),
            format!("{}tmp/{c}", "../".repeat(16)),
            format!("/tmp/{c}-abs"),
            format!("{}/abs-x", rig.env.dir.path().display()),
            "a/../../x".into(),
            "./../x".into(),
            "file:x".into(),
        ];
        for name in &names {
            let mut products = good_products();
            let pxe = products
                .iter_mut()
                .find(|p| p.fields.get("bootloader-type") == Some(&json!("pxe")))
                .unwrap();
            let it = &mut pxe.versions.values_mut().next().unwrap()[0];
            it.data = raw_member_tar_xz(name, b"outside");
            rig.publish(&products);
            rig.refused(
                &format!("archive member {name:?}"),
                &["bootloader/pxe/i386", "unsafe member path"],
            );
        }
    }
}

/// Issue 11 row 4: two sources carry a byte-identical kernel under other paths; the
/// kernel is fetched from one of them at the path that source lists.
#[test]
fn identical_bytes_from_two_sources_sync() {
    let env = Env::new();
    let key = TestKey::generate();
    key.write_keyring(&env.keyring);
    let a_root = env.mirror.join("a");
    let b_root = env.mirror.join("b");
    let mut a = good_products();
    let mut b = vec![image("noble", "arm64", "20261101", 16 << 10)];
    // Same kernel bytes, another path (and another product) on source B.
    let kernel = a[0].versions.values().next().unwrap()[0].data.clone();
    let bk = &mut b[0].versions.values_mut().next().unwrap()[0];
    bk.data = kernel.clone();
    bk.path = "elsewhere/boot-kernel".into();
    a.truncate(1);
    write_stream(&a_root, &a, &key, SHA512);
    write_stream(&b_root, &b, &key, SHA512);
    let server = MirrorServer::start(&env.mirror);
    let source = |root: &str, arch: &str| {
        format!(
            "[[sources]]\nurl = \"{}{root}/\"\nkeyring_filename = \"{}\"\n\n\
             [[sources.selections]]\nos = \"ubuntu\"\nrelease = \"noble\"\narches = [\"{arch}\"]\n\n",
            server.url(),
            env.keyring.display()
        )
    };
    std::fs::write(
        &env.config,
        format!(
            "state_dir = \"{}\"\n\n{}{}",
            env.state.display(),
            source("b", "arm64"),
            source("a", "amd64")
        ),
    )
    .unwrap();
    let out = env.ok(&["sync"]);
    assert!(out.contains("synced: generation 1"), "{out}");
    for arch in ["amd64", "arm64"] {
        let k = env
            .current()
            .join(format!("ubuntu/{arch}/ga-24.04/noble/stable/boot-kernel"));
        let got = std::fs::read(&k).unwrap_or_else(|e| {
            panic!(
                "{}: {e}\n{out}\n{:?}",
                k.display(),
                env.fingerprint().keys()
            )
        });
        assert_eq!(got, kernel, "{}", k.display());
    }
}

// ---------------------------------------------------------------------------
// rackboot mirror

struct MirrorRig {
    env: Env,
    key: TestKey,
    server: MirrorServer,
    dest: std::path::PathBuf,
}

impl MirrorRig {
    fn new() -> MirrorRig {
        let env = Env::new();
        let (key, server) = env.signed_upstream(&good_products());
        let dest = env.dir.path().join("dest");
        MirrorRig {
            env,
            key,
            server,
            dest,
        }
    }

    fn run(&self, signed: bool) -> std::process::Output {
        let index = if signed { "index.sjson" } else { "index.json" };
        let url = format!("{}streams/v1/{index}", self.server.url());
        let (keyring, dest) = (
            self.env.keyring.display().to_string(),
            self.dest.display().to_string(),
        );
        let mut args = vec!["mirror"];
        if signed {
            args.extend(["--keyring", &keyring]);
        }
        args.extend([url.as_str(), dest.as_str()]);
        self.env.run(&args)
    }
}

fn mirror_case(m: &MirrorRig, signed: bool, what: &str, expect: Option<&str>) {
    let around = outside(&m.env);
    let out = m.run(signed);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match expect {
        Some(e) => {
            assert!(!out.status.success(), "mirror {what}: must fail\n{stderr}");
            assert!(
                stderr.contains(e),
                "mirror {what}: expected {e:?} in\n{stderr}"
            );
        }
        None => assert!(out.status.success(), "mirror {what}: {stderr}"),
    }
    assert_eq!(
        outside(&m.env),
        around,
        "mirror {what}: a file appeared outside DEST"
    );
    no_canary(&m.env);
}

#[test]
fn mirror_refuses_hostile_paths_and_content_ids() {
    for signed in [true, false] {
        let m = MirrorRig::new();
        let values = hostile_values(&m.env);
        for v in &values {
            // Item paths: refused.
            let products = good_products();
            let good = products[0].versions.values().next().unwrap()[0]
                .path
                .clone();
            write_stream(&m.env.mirror, &products, &m.key, SHA512);
            rewrite_docs(&m.env.mirror, &m.key, |t| {
                t.replace(&format!("\"{good}\""), &json!(v).to_string())
            });
            mirror_case(&m, signed, &format!("item path {v:?}"), Some("unsafe path"));
            // Content ids: refused (DEST/.data/<content_id> is a file name).
            write_stream(&m.env.mirror, &good_products(), &m.key, SHA512);
            rewrite_docs(&m.env.mirror, &m.key, |t| {
                t.replace(&format!("\"{CID}\""), &json!(v).to_string())
            });
            mirror_case(&m, signed, &format!("content_id {v:?}"), Some("content_id"));
            // Fields the mirror copies but forms no path from: mirrored as listed.
            for field in ["os", "arch", "release", "label", "bootloader-type"] {
                write_stream(
                    &m.env.mirror,
                    &with_field("image", field, v),
                    &m.key,
                    SHA512,
                );
                mirror_case(&m, signed, &format!("{field}={v:?}"), None);
            }
        }
    }
}

/// Rewrites the metadata documents under `root` with `f` (and re-signs them).
fn rewrite_docs(root: &Path, key: &TestKey, f: impl Fn(&str) -> String) {
    let dir = root.join("streams/v1");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = f(&std::fs::read_to_string(&p).unwrap());
            std::fs::write(&p, &text).unwrap();
            let signed_text = if p.ends_with("index.json") {
                text.replace(".json\"", ".sjson\"")
            } else {
                text
            };
            std::fs::write(
                p.with_extension("sjson"),
                key.clearsign(signed_text.as_bytes(), HashAlgorithm::SHA512),
            )
            .unwrap();
        }
    }
}

/// Issue 10 row 3: a mirrored record listing a path outside DEST; the next run
/// removes that version and must not delete the outside file.
#[test]
fn mirror_record_with_an_outside_path_deletes_nothing() {
    let m = MirrorRig::new();
    let out = m.run(true);
    assert!(out.status.success(), "{out:?}");
    let record = m.dest.join(".data").join(CID);
    let victim = m.env.dir.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let mut entries: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    for e in &mut entries {
        e["path"] = json!("../victim");
    }
    std::fs::write(&record, serde_json::to_vec(&entries).unwrap()).unwrap();
    // Upstream moves to a new version: the recorded one would be removed.
    let mut products = vec![image("noble", "amd64", "20261120", 16 << 10)];
    products.extend(bootloaders("20210819.0"));
    write_stream(&m.env.mirror, &products, &m.key, SHA512);
    let out = m.run(true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("unsafe path") && stderr.contains(&record.display().to_string()),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
}

/// Issue 10 row 1: a second source *without selections* lists a bootloader whose
/// `arch` is a traversal; it is refused before anything is fetched.
#[test]
fn second_source_without_selections_is_checked_too() {
    let rig = Rig::new(true);
    let env = &rig.env;
    let second = env.mirror.join("second");
    // The second source joins (config seeds sources.json again) with good content.
    write_stream(&second, &bootloaders("20210819.0"), &rig.key, SHA512);
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{config}\n[[sources]]\nurl = \"{}second/\"\nkeyring_filename = \"{}\"\n",
            rig._server.url(),
            env.keyring.display()
        ),
    )
    .unwrap();
    std::fs::remove_file(env.state.join("sources.json")).unwrap();
    env.ok(&["sync"]);
    let c = canary(env);
    for v in ["../../x".to_string(), format!("/tmp/{c}-abs")] {
        let mut bl = bootloaders("20210819.1");
        for p in &mut bl {
            p.fields.insert("arch".into(), json!(v));
        }
        write_stream(&second, &bl, &rig.key, SHA512);
        rig.refused(
            &format!("second source bootloader arch={v:?}"),
            &[
                "boot source 2",
                "unsafe arch",
                "product com.ubuntu.maas.stable:1:",
            ],
        );
        assert_eq!(
            std::fs::read_link(env.current().join("syslinux")).unwrap(),
            Path::new("bootloader/pxe/i386"),
            "current/syslinux points inside the snapshot"
        );
    }
}

/// An upstream that trickles: the whole run is bounded by `sync.deadline`.
#[test]
fn sync_deadline_bounds_a_trickling_upstream() {
    let env = Env::new();
    let (key, server) = env.signed_upstream(&good_products());
    env.write_config(&server.url(), &["amd64"], "");
    env.ok(&["sync"]);
    let mut newer = vec![image("noble", "amd64", "20261120", 64 << 10)];
    newer.extend(bootloaders("20210819.0"));
    write_stream(&env.mirror, &newer, &key, SHA512);
    // 4 KiB/s: each chunk arrives well within sync.timeout (5 s), the run cannot
    // finish within the deadline.
    server.fault("squashfs", Fault::Throttle(4096));
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("timeout = \"5s\"", "timeout = \"5s\"\ndeadline = \"2s\""),
    )
    .unwrap();
    let before = env.fingerprint();
    let t = std::time::Instant::now();
    let stderr = env.fails(&["sync"], 1);
    assert!(stderr.contains("sync.deadline"), "{stderr}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(env.fingerprint(), before);
}

/// An index that leads to more metadata documents than the per-source bound.
#[test]
fn too_many_metadata_documents_fail_with_one_line() {
    let rig = Rig::new(false);
    let v1 = rig.env.mirror.join("streams/v1");
    std::fs::write(
        v1.join("empty.json"),
        r#"{"format":"index:1.0","index":{}}"#,
    )
    .unwrap();
    let entries: serde_json::Map<String, serde_json::Value> = (0..300)
        .map(|i| {
            (
                format!("sub{i:03}"),
                json!({"format": "index:1.0", "path": "streams/v1/empty.json"}),
            )
        })
        .collect();
    std::fs::write(
        v1.join("index.json"),
        json!({"format": "index:1.0", "index": entries}).to_string(),
    )
    .unwrap();
    rig.refused(
        "300 metadata documents",
        &["boot source 1", "more than 256 metadata documents"],
    );
}
