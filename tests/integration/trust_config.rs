//! What an attacker upstream, on the path or at the API can make a rack do with
//! boot configs, signatures, replays and concurrent state writes; and the re-export
//! an unsigned downstream rack syncs from. Each test drives the real binary.

use std::path::Path;
use std::time::{Duration, SystemTime};

use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::parse::Parse as _;
use openpgp::serialize::Serialize as _;
use openpgp::types::{HashAlgorithm, KeyFlags};

use crate::harness::*;
use crate::upstream::*;

const TOKEN: &str = "h4-token";
const UPDATED: &str = "Mon, 24 Nov 2026 12:00:00 +0000";

/// Rewrites every `.sjson` of the stream under `root` from its `.json` with `sign`
/// (the index's entries name the `.sjson` files, as `write_stream` makes them).
fn resign(root: &Path, sign: &dyn Fn(&[u8]) -> Vec<u8>) {
    for e in std::fs::read_dir(root.join("streams/v1"))
        .unwrap()
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let mut text = std::fs::read_to_string(&p).unwrap();
            if p.ends_with("index.json") {
                text = text.replace(".json\"", ".sjson\"");
            }
            std::fs::write(p.with_extension("sjson"), sign(text.as_bytes())).unwrap();
        }
    }
}

/// Sets the `updated` stamp of every document of the stream, then re-signs.
fn restamp(root: &Path, key: &TestKey, updated: &str) {
    for e in std::fs::read_dir(root.join("streams/v1"))
        .unwrap()
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, text.replace(UPDATED, updated)).unwrap();
        }
    }
    resign(root, &|t| key.clearsign(t, HashAlgorithm::SHA512));
}

fn keyring_of(certs: &[&openpgp::Cert], path: &Path) {
    let mut out = Vec::new();
    for c in certs {
        c.serialize(&mut out).unwrap();
    }
    std::fs::write(path, out).unwrap();
}

/// noble amd64 (label `stable`) and bootloaders; `arm64_label` adds an arm64 image
/// with that label.
fn products(version: &str, arm64_label: Option<&str>) -> Vec<ProductSpec> {
    let mut p = vec![image("noble", "amd64", version, 4096)];
    if let Some(label) = arm64_label {
        let mut arm = image("noble", "arm64", version, 4096);
        arm.fields.insert("label".into(), label.into());
        p.push(arm);
    }
    p.extend(bootloaders("20210819.0"));
    p
}

/// A synced rack that serves HTTP and TFTP on 127.0.0.1 with API writes enabled.
fn rack(arm64_label: Option<&str>) -> (Env, MirrorServer, Served) {
    let (env, mirror, s, _key) = rack_keyed(arm64_label);
    (env, mirror, s)
}

/// [`rack`], also returning the stream's signing key (to publish a next version).
fn rack_keyed(arm64_label: Option<&str>) -> (Env, MirrorServer, Served, TestKey) {
    let env = Env::new();
    let (key, mirror) = env.signed_upstream(&products("20261101", arm64_label));
    let token = env.dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    env.write_config(
        &mirror.url(),
        &["amd64", "arm64"],
        &format!(
            "auto = false\n[tftp]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = [\"127.0.0.1:0\"]\ntoken_file = \"{}\"\n[boot]\ndefault_image = \"ubuntu/noble\"\n",
            token.display()
        ),
    );
    let s = env.serve_synced();
    (env, mirror, s, key)
}

/// How many commands iPXE runs from one script line: it splits at whitespace, the
/// words `;`, `||` and `&&` separate commands, a word starting with `#` starts a
/// comment (which hides the words after it, e.g. `BOOTIF`).
fn ipxe_commands(line: &str) -> usize {
    let mut n = 1;
    for w in line.split_whitespace() {
        if [";", "||", "&&"].contains(&w) {
            n += 1;
        }
        if w.starts_with('#') {
            return n + 1;
        }
    }
    n
}

fn assert_one_command_per_line(script: &str) {
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    for line in script.lines().skip(1) {
        assert_eq!(
            ipxe_commands(line),
            1,
            "iPXE would run more than one command: {line}"
        );
    }
}

fn put_machine(s: &Served, mac: &str, body: &str) -> (u16, Vec<u8>) {
    curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        "-d",
        body,
        &s.url(&format!("/api/v1/machines/{mac}")),
    ])
}

/// Issue 10 rows 13 and 15: command separators and comments in kernel parameters
/// and in a stream's label never reach iPXE as such; an `arch` that is not a known
/// architecture name is never looked up.
#[test]
fn ipxe_configs_keep_outside_text_inert() {
    let (env, _mirror, s, key) = rack_keyed(None);
    env.ok(&[
        "machines",
        "set",
        "52:54:00:00:00:01",
        "kernel_params=a ; chain http://127.0.0.1:9/evil ; #",
    ]);
    env.ok(&[
        "machines",
        "set",
        "52:54:00:00:00:02",
        "kernel_params=b || chain http://127.0.0.1:9/evil && x",
    ]);
    for path in [
        "/ipxe.cfg-52:54:00:00:00:01",
        "/boot.ipxe?mac=52:54:00:00:00:02",
        "/ipxe.cfg-52:54:00:00:00:02",
    ] {
        let (code, body) = s.get(path);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(code, 200, "{path}: {text}");
        assert_one_command_per_line(&text);
        assert!(
            text.contains("BOOTIF=01-${netX/mac:hexhyp}\n"),
            "{path}: {text}"
        );
    }
    // A label holding iPXE syntax is not a path segment: the stream is refused whole
    // at sync (naming the field), so it never reaches a config; generation 1 stays.
    write_stream(
        &env.mirror,
        &products("20261102", Some("stable ; shell ; #")),
        &key,
        SHA512,
    );
    let e = env.fails(&["sync"], 1);
    assert!(e.contains("label"), "{e}");
    let (code, body) = s.get("/ipxe.cfg-default-arm64");
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("shell"), "{text}");
    assert_eq!(code, 404, "{text}");
    assert_eq!(s.status()["generation"], 1);
    // Only known architecture names; amd64 still works under its aliases.
    for arch in ["amd64/../arm64", "../../..", "mips"] {
        let (code, body) = s.get(&format!("/boot.ipxe?arch={arch}"));
        assert_eq!(code, 404, "arch={arch}: {}", String::from_utf8_lossy(&body));
    }
    for arch in ["x86_64", "i386", "amd64"] {
        let (code, body) = s.get(&format!("/boot.ipxe?arch={arch}"));
        assert_eq!(code, 200, "arch={arch}");
        assert!(String::from_utf8_lossy(&body).contains("/ubuntu/amd64/"));
    }
}

/// Issue 10 row 16: kernel parameters are limited when set (CLI, API, config), and a
/// config whose `APPEND` line pxelinux would split is never served.
#[test]
fn kernel_params_are_limited_and_long_lines_never_served() {
    let (env, _mirror, s) = rack(None);
    let long = format!("x={}", "a".repeat(1100));
    let e = env.fails(
        &[
            "machines",
            "set",
            "52:54:00:00:00:01",
            &format!("kernel_params={long}"),
        ],
        2,
    );
    assert!(e.contains("kernel_params") && e.contains("1024"), "{e}");
    let (code, body) = put_machine(
        &s,
        "52:54:00:00:00:01",
        &format!("{{\"kernel_params\": \"{long}\"}}"),
    );
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("kernel_params"), "{body}");
    let fits = format!("x={}", "a".repeat(1000));
    let (code, _) = put_machine(
        &s,
        "52:54:00:00:00:02",
        &format!("{{\"kernel_params\": \"{fits}\"}}"),
    );
    assert_eq!(code, 200);

    // Written past the checks (by hand): ` KERNEL http://…` would start at byte
    // 4095 of the APPEND line, i.e. become a directive of its own.
    let base = tftp_get(&s, "pxelinux.cfg/01-52-54-00-00-00-09").unwrap();
    let append = base.lines().find(|l| l.starts_with("  APPEND")).unwrap();
    let pad = 4095 - append.len() - 1;
    let evil = format!("{} KERNEL http://127.0.0.1:9/evil", "p".repeat(pad));
    std::fs::write(
        env.state.join("machines.json"),
        serde_json::to_vec(&serde_json::json!({"52:54:00:00:00:03": {"kernel_params": evil}}))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(tftp_get(&s, "pxelinux.cfg/01-52-54-00-00-00-03"), None);
    let (code, body) = s.get("/pxelinux.cfg/01-52-54-00-00-00-03");
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));
    wait_until(Duration::from_secs(5), "the refusal in the log", || {
        s.log_text()
            .contains("not serving a boot config for 52:54:00:00:00:03")
    });

    // The config file is checked too.
    let other = Env::new();
    other.write_config(
        "http://127.0.0.1:1/",
        &["amd64"],
        &format!("[boot]\nkernel_params = \"{long}\"\n"),
    );
    let e = other.fails(&["machines", "read"], 2);
    assert!(e.contains("boot.kernel_params"), "{e}");
}

/// A rack (sync only) whose upstream is signed by `key`, amd64 only.
fn sync_env(key: &TestKey) -> (Env, MirrorServer) {
    let env = Env::new();
    key.write_keyring(&env.keyring);
    write_stream(&env.mirror, &products("20261101", None), key, SHA512);
    let mirror = MirrorServer::start(&env.mirror);
    env.write_config(&mirror.url(), &["amd64"], "");
    (env, mirror)
}

/// The packets of the signature block of a clearsigned document.
fn signature_packets(doc: &[u8]) -> Vec<openpgp::Packet> {
    let text = std::str::from_utf8(doc).unwrap();
    let start = text.find("-----BEGIN PGP SIGNATURE-----").unwrap();
    openpgp::PacketPile::from_bytes(&text.as_bytes()[start..])
        .unwrap()
        .into_children()
        .collect()
}

/// Issue 10 row 17: a good signature by one keyring key does not excuse a bad one
/// by another keyring key (gpgv refuses such a document too).
#[test]
fn a_bad_keyring_signature_beside_a_good_one_is_refused() {
    let key = TestKey::generate();
    let other = TestKey::generate();
    let (env, _mirror) = sync_env(&key);
    keyring_of(&[&key.cert, &other.cert], &env.keyring);
    // Baseline: both keys in the keyring, one good signature, syncs.
    env.ok(&["sync"]);

    let idx = env.mirror.join("streams/v1/index.sjson");
    let good = std::fs::read(&idx).unwrap();
    let bad = other.clearsign(b"{\"other\": \"text\"}", HashAlgorithm::SHA512);
    let text = std::str::from_utf8(&good).unwrap();
    let head = &text[..text.find("-----BEGIN PGP SIGNATURE-----").unwrap()];
    let mut doc = head.as_bytes().to_vec();
    {
        let mut w = openpgp::armor::Writer::new(&mut doc, openpgp::armor::Kind::Signature).unwrap();
        for p in signature_packets(&good)
            .into_iter()
            .chain(signature_packets(&bad))
        {
            p.serialize(&mut w).unwrap();
        }
        w.finalize().unwrap();
    }
    std::fs::write(&idx, doc).unwrap();
    let before = env.fingerprint();
    let e = env.fails(&["sync"], 1);
    assert!(
        e.contains("index.sjson") && e.contains("bad signature"),
        "{e}"
    );
    assert!(
        e.contains(&other.cert.fingerprint().to_hex()) || e.contains(&other.cert.keyid().to_hex()),
        "names the key: {e}"
    );
    assert_eq!(env.fingerprint(), before);
}

/// Issue 10 row 17: a document signed while the key was alive, by a key that has
/// expired since, is refused (the module doc always said so).
#[test]
fn a_signature_by_a_key_expired_since_is_refused() {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let (cert, _) = CertBuilder::new()
        .add_userid("expired <expired@rackboot.invalid>")
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_primary_key_flags(KeyFlags::empty().set_signing().set_certification())
        .set_creation_time(now - 10 * day)
        .set_validity_period(5 * day)
        .generate()
        .unwrap();
    let key = TestKey { cert };
    let (env, _mirror) = sync_env(&key);
    // Signed 7 days ago, when the key (expired 5 days ago) was alive.
    resign(&env.mirror, &|t| {
        key.clearsign_at(t, HashAlgorithm::SHA512, now - 7 * day)
    });
    let e = env.fails(&["sync"], 1);
    assert!(
        e.contains("index.sjson") && e.contains("not alive now"),
        "{e}"
    );
    assert!(!env.current().exists());
}

/// Issue 10 row 12: an older, validly signed stream replayed by a man in the middle
/// is refused (nothing changes); `--allow-downgrade` accepts it.
#[test]
fn an_older_signed_stream_is_refused_as_a_downgrade() {
    let key = TestKey::generate();
    let (env, _mirror) = sync_env(&key);
    env.ok(&["sync"]);
    let streams = env.mirror.join("streams/v1");
    let saved = env.dir.path().join("old-streams");
    std::fs::create_dir_all(&saved).unwrap();
    for e in std::fs::read_dir(&streams).unwrap().flatten() {
        std::fs::copy(e.path(), saved.join(e.file_name())).unwrap();
    }
    // Upstream moves on: a newer version, a newer stamp.
    write_stream(&env.mirror, &products("20261120", None), &key, SHA512);
    restamp(&env.mirror, &key, "Tue, 25 Nov 2026 12:00:00 +0000");
    let out = env.ok(&["sync"]);
    assert!(out.contains("generation 2"), "{out}");

    // The replay: yesterday's documents, signatures intact.
    for e in std::fs::read_dir(&saved).unwrap().flatten() {
        std::fs::copy(e.path(), streams.join(e.file_name())).unwrap();
    }
    let before = env.fingerprint();
    let e = env.fails(&["sync"], 1);
    let first = e.lines().find(|l| l.contains("error")).unwrap_or(&e);
    assert!(
        first.contains("streams/v1/index.sjson")
            && first.contains(UPDATED)
            && first.contains("--allow-downgrade"),
        "{e}"
    );
    assert_eq!(
        env.fingerprint(),
        before,
        "a refused downgrade changed the store"
    );
    let out = env.ok(&["sync", "--allow-downgrade"]);
    assert!(out.contains("generation 3"), "{out}");
    // Accepted once, it is the new baseline.
    env.ok(&["sync"]);
}

fn post_sync(s: &Served, body: &str) -> u16 {
    curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        "-d",
        body,
        &s.url("/api/v1/sync"),
    ])
    .0
}

/// Issue 10 row 12, the daemon: its syncs refuse a replay (the status says why), and
/// `POST /api/v1/sync` with `{"allow_downgrade": true}` accepts it for one sync.
#[test]
fn the_daemon_refuses_a_replay_until_told_otherwise() {
    let (env, _mirror, s) = rack(None);
    // `rack` keeps its signing key: sign with a new one, trusted from now on.
    let key = TestKey::generate();
    key.write_keyring(&env.keyring);
    // Upstream at 24 Nov (signed by the new key), then at 25 Nov.
    write_stream(&env.mirror, &products("20261101", None), &key, SHA512);
    let saved = env.dir.path().join("old-streams");
    std::fs::create_dir_all(&saved).unwrap();
    let streams = env.mirror.join("streams/v1");
    for e in std::fs::read_dir(&streams).unwrap().flatten() {
        std::fs::copy(e.path(), saved.join(e.file_name())).unwrap();
    }
    write_stream(&env.mirror, &products("20261120", None), &key, SHA512);
    restamp(&env.mirror, &key, "Tue, 25 Nov 2026 12:00:00 +0000");
    assert_eq!(post_sync(&s, ""), 202);
    s.wait_generation(2, Duration::from_secs(60));

    for e in std::fs::read_dir(&saved).unwrap().flatten() {
        std::fs::copy(e.path(), streams.join(e.file_name())).unwrap();
    }
    let runs = s.status()["sync"]["runs"].as_u64().unwrap();
    assert_eq!(post_sync(&s, ""), 202);
    wait_until(Duration::from_secs(60), "the refused sync", || {
        s.status()["sync"]["runs"].as_u64().unwrap() > runs
    });
    let st = s.status();
    let err = st["sync"]["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("allow-downgrade") && err.contains(UPDATED),
        "{st}"
    );
    assert_eq!(st["generation"], 2);

    assert_eq!(post_sync(&s, "{\"allow_downgrade\": \"yes\"}"), 400);
    assert_eq!(post_sync(&s, "{\"allow_downgrade\": true}"), 202);
    s.wait_generation(3, Duration::from_secs(60));
}

/// Issue 10 row 18: a second rack with `unsigned = true` and the first rack's root
/// URL syncs from the re-export, which serves `index.json` and the products `.json`
/// (the upstream's bytes) beside the `.sjson` files.
#[test]
fn an_unsigned_downstream_syncs_from_the_re_export() {
    let (env, _mirror, s) = rack(None);
    for name in ["index.json", "com.ubuntu.maas:stable:v3:download.json"] {
        let (code, body) = s.get(&format!("/streams/v1/{name}"));
        assert_eq!(code, 200, "{name}: {}", String::from_utf8_lossy(&body));
        assert_eq!(
            body,
            std::fs::read(env.mirror.join("streams/v1").join(name)).unwrap(),
            "{name}: the upstream's bytes"
        );
    }
    let (code, _) = s.get("/streams/v1/index.sjson");
    assert_eq!(code, 200);

    let down = Env::new();
    std::fs::write(
        &down.config,
        format!(
            "state_dir = \"{}\"\n\n[[sources]]\nurl = \"http://{}/\"\nunsigned = true\n\n[[sources.selections]]\nos = \"ubuntu\"\nrelease = \"noble\"\narches = [\"amd64\"]\n",
            down.state.display(),
            s.http
        ),
    )
    .unwrap();
    let out = down.ok(&["sync"]);
    assert!(out.contains("generation 1"), "{out}");
    let kernel = "ubuntu/amd64/generic/noble/stable/boot-kernel";
    assert_eq!(
        file_sha256(&down.current().join(kernel)),
        file_sha256(&env.current().join(kernel))
    );
}

/// Issue 10 row 11: many CLI and API writes of `machines.json` and `sources.json`
/// at once; none is lost.
#[test]
fn concurrent_cli_and_api_writes_are_all_kept() {
    let (env, _mirror, s) = rack(None);
    const N: usize = 16;
    let mut children = Vec::new();
    for i in 0..N {
        children.push(
            env.command(&[
                "machines",
                "set",
                &format!("52:54:00:00:01:{i:02x}"),
                "local_boot=true",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        );
        children.push(
            env.command(&[
                "boot-source-selections",
                "create",
                "1",
                "os=ubuntu",
                &format!("release=cli{i}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        );
    }
    let api: Vec<_> = (0..N)
        .map(|i| {
            let url = s.url("");
            std::thread::spawn(move || {
                let m = curl(&[
                    "-X",
                    "PUT",
                    "-H",
                    &format!("Authorization: Bearer {TOKEN}"),
                    "-d",
                    "{\"local_boot\": false}",
                    &format!("{url}/api/v1/machines/52:54:00:00:02:{i:02x}"),
                ]);
                let sel = curl(&[
                    "-X",
                    "POST",
                    "-H",
                    &format!("Authorization: Bearer {TOKEN}"),
                    "-d",
                    &format!("{{\"os\": \"ubuntu\", \"release\": \"api{i}\"}}"),
                    &format!("{url}/api/v1/sources/1/selections"),
                ]);
                (m.0, sel.0)
            })
        })
        .collect();
    for c in children {
        let out = wait_output(c, Duration::from_secs(60));
        assert_success(&out, "a concurrent CLI edit");
    }
    for t in api {
        assert_eq!(t.join().unwrap(), (200, 200));
    }
    let machines: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "machines", "read"])).unwrap();
    let sources: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "boot-sources", "read"])).unwrap();
    let releases: Vec<&str> = sources[0]["selections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["release"].as_str().unwrap())
        .collect();
    let mut ids: Vec<u64> = sources[0]["selections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    for i in 0..N {
        for mac in [
            format!("52:54:00:00:01:{i:02x}"),
            format!("52:54:00:00:02:{i:02x}"),
        ] {
            assert!(machines.get(&mac).is_some(), "{mac} lost: {machines}");
        }
        for r in [format!("cli{i}"), format!("api{i}")] {
            assert!(releases.contains(&r.as_str()), "{r} lost: {releases:?}");
        }
    }
    let all = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all, "selection ids are unique");
}
