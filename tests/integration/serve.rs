//! `rackboot serve`: sync loop, TFTP with real clients, HTTP with curl, the API,
//! metrics, snapshot switches, signals, fan-out to a second rack.

use std::net::UdpSocket;
use std::time::Duration;

use nix::sys::signal::Signal;
use sequoia_openpgp::types::HashAlgorithm;

use crate::harness::*;
use crate::mirror::*;

pub const SHA512: Signing = Signing::Signed(HashAlgorithm::SHA512);

pub const LISTEN: &str = "[tftp]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = [\"127.0.0.1:0\"]\n";

pub fn products(version: &str, kernel_size: usize) -> Vec<ProductSpec> {
    let mut p = vec![image("noble", "amd64", version, kernel_size)];
    p.extend(bootloaders("20210819.0"));
    p
}

pub struct Rack {
    pub env: Env,
    pub key: TestKey,
    pub mirror: MirrorServer,
}

pub fn rack(kernel_size: usize, sync_extra: &str, extra: &str) -> Rack {
    let env = Env::new();
    let key = TestKey::generate();
    key.write_keyring(&env.keyring);
    write_stream(
        &env.mirror,
        &products("20261101", kernel_size),
        &key,
        SHA512,
    );
    let mirror = MirrorServer::start(&env.mirror);
    env.write_config(
        &mirror.url(),
        &["amd64"],
        &format!("{sync_extra}\n{LISTEN}{extra}"),
    );
    Rack { env, key, mirror }
}

pub const KERNEL: &str = "/ubuntu/amd64/generic/noble/stable/boot-kernel";

pub fn kernel_of(version: &str, size: usize) -> Vec<u8> {
    image("noble", "amd64", version, size)
        .versions
        .into_values()
        .next()
        .unwrap()[0]
        .data
        .clone()
}

#[test]
fn serve_starts_empty_syncs_and_serves_over_tftp_and_http() {
    let r = rack(3 << 20, "", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    let want = kernel_of("20261101", 3 << 20);
    let (code, body) = s.get(KERNEL);
    assert_eq!(code, 200);
    assert_eq!(sha256_hex(&body), sha256_hex(&want));
    // MAAS's /images/ prefix serves the same tree; `//` collapses.
    let (code, body) = s.get(&format!("/images{KERNEL}"));
    assert_eq!((code, sha256_hex(&body)), (200, sha256_hex(&want)));
    let (code, body) = s.get("//grubx64.efi");
    assert_eq!((code, body), (200, payload(4, 6000)));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f");
    let o = out.to_str().unwrap();
    let tftp_url = format!("tftp://{}{KERNEL}", s.tftp);
    for bs in ["512", "1468", "8192"] {
        let res = run_client(
            "curl",
            &[
                "-s",
                "--max-time",
                "60",
                "--tftp-blksize",
                bs,
                "-o",
                o,
                &tftp_url,
            ],
            Duration::from_secs(70),
        );
        assert!(
            res.status.success(),
            "curl blksize {bs}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_eq!(file_sha256(&out), sha256_hex(&want), "curl blksize {bs}");
    }
    let port = s.tftp.port().to_string();
    for ws in ["1", "4", "8", "16"] {
        let _ = std::fs::remove_file(&out);
        let res = run_client(
            "atftp",
            &[
                "--get",
                "-r",
                KERNEL,
                "-l",
                o,
                "--option",
                "blksize 1468",
                "--option",
                &format!("windowsize {ws}"),
                "127.0.0.1",
                &port,
            ],
            Duration::from_secs(70),
        );
        assert!(
            res.status.success(),
            "atftp windowsize {ws}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_eq!(
            file_sha256(&out),
            sha256_hex(&want),
            "atftp windowsize {ws}"
        );
    }
    let _ = std::fs::remove_file(&out);
    let res = run_client(
        "tftp",
        &[
            "127.0.0.1",
            &port,
            "-m",
            "binary",
            "-c",
            "get",
            "pxelinux.0",
            o,
        ],
        Duration::from_secs(30),
    );
    assert!(
        res.status.success(),
        "tftp-hpa: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"lpxelinux-bios-http");

    // The metrics saw it all.
    let (code, body) = s.get("/metrics");
    assert_eq!(code, 200);
    let m = String::from_utf8(body).unwrap();
    assert!(m.contains("rackboot_snapshot_generation 1"), "{m}");
    assert!(m.contains("rackboot_tftp_transfers_ok_total 8"), "{m}");
    assert!(
        m.contains("rackboot_tftp_requests_total{class=\"kernel\"} 7"),
        "{m}"
    );
}

#[test]
fn periodic_sync_picks_up_new_versions_and_a_failing_upstream_keeps_serving() {
    let r = rack(256 << 10, "interval = \"1s\"", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    write_stream(
        &r.env.mirror,
        &products("20261120", 256 << 10),
        &r.key,
        SHA512,
    );
    s.wait_generation(2, Duration::from_secs(60));
    let (_, body) = s.get(KERNEL);
    assert_eq!(body, kernel_of("20261120", 256 << 10));

    // The upstream breaks: serving goes on and /metrics shows the failures.
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    wait_until(Duration::from_secs(60), "a failed sync", || {
        s.status()["sync"]["failures"].as_u64().unwrap_or(0) >= 1
    });
    let (code, body) = s.get(KERNEL);
    assert_eq!((code, body), (200, kernel_of("20261120", 256 << 10)));
    let (_, m) = s.get("/metrics");
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("rackboot_sync_failures_total 1")
            || m.contains("rackboot_sync_failures_total 2"),
        "{m}"
    );
    assert!(m.contains("rackboot_snapshot_generation 2"), "{m}");
    let st = s.status();
    assert!(
        st["sync"]["last_error"]
            .as_str()
            .unwrap()
            .contains("HTTP 503"),
        "{st}"
    );
}

#[test]
fn a_transfer_across_a_snapshot_switch_completes_with_the_old_bytes() {
    let r = rack(8 << 20, "auto = false", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    let old = kernel_of("20261101", 8 << 20);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("slow");
    let slow = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "60",
            "--limit-rate",
            "2M",
            "-o",
            out.to_str().unwrap(),
            &s.url(KERNEL),
        ])
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the slow download to start",
        || {
            std::fs::metadata(&out)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
        },
    );
    write_stream(
        &r.env.mirror,
        &products("20261120", 8 << 20),
        &r.key,
        SHA512,
    );
    s.signal(Signal::SIGHUP); // a reload also triggers a sync
    s.wait_generation(2, Duration::from_secs(60));
    let res = wait_output(slow, Duration::from_secs(60));
    assert!(res.status.success());
    assert_eq!(
        sha256_hex(&std::fs::read(&out).unwrap()),
        sha256_hex(&old),
        "old bytes to the end"
    );
    let (_, body) = s.get(KERNEL);
    assert_eq!(
        sha256_hex(&body),
        sha256_hex(&kernel_of("20261120", 8 << 20))
    );
}

#[test]
fn a_second_rack_syncs_from_the_first_ones_stream() {
    let r = rack(512 << 10, "", "");
    let first = r.env.serve();
    first.wait_generation(1, Duration::from_secs(60));
    let (code, idx) = first.get("/streams/v1/index.sjson");
    assert_eq!(code, 200);
    assert_eq!(
        idx,
        std::fs::read(r.env.mirror.join("streams/v1/index.sjson")).unwrap(),
        "byte for byte"
    );

    let env2 = Env::new();
    std::fs::copy(&r.env.keyring, &env2.keyring).unwrap();
    env2.write_config(&first.url("/"), &["amd64"], "");
    env2.ok(&["sync"]);
    let mut a = std::collections::BTreeMap::new();
    let mut b = std::collections::BTreeMap::new();
    for (env, map) in [(&r.env, &mut a), (&env2, &mut b)] {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.state.join(format!("snapshots/{}.json", 1))).unwrap(),
        )
        .unwrap();
        map.extend(m["files"].as_object().unwrap().clone());
    }
    assert!(!a.is_empty());
    assert_eq!(a, b, "the second rack serves the same files");
}

#[test]
fn http_semantics_with_curl() {
    let r = rack(64 << 10, "auto = false", "token_file = \"TOKEN\"\n");
    // The token file path is only known now.
    let token = r.env.dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let cfg = std::fs::read_to_string(&r.env.config)
        .unwrap()
        .replace("TOKEN", token.to_str().unwrap());
    std::fs::write(&r.env.config, cfg).unwrap();
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    let url = s.url(KERNEL);
    let want = kernel_of("20261101", 64 << 10);
    let hdr = |args: &[&str]| -> String {
        let out = run_client(
            "curl",
            &[
                &["-s", "-D", "-", "-o", "/dev/null", "--max-time", "20"],
                args,
            ]
            .concat(),
            Duration::from_secs(30),
        );
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    // Range
    let (code, body) = curl(&["-r", "10-19", &url]);
    assert_eq!((code, body.as_slice()), (206, &want[10..20]));
    let (code, body) = curl(&["-r", "-5", &url]);
    assert_eq!((code, body.as_slice()), (206, &want[want.len() - 5..]));
    let (code, _) = curl(&["-r", "999999999-", &url]);
    assert_eq!(code, 416);
    // HEAD
    let h = hdr(&["-I", &url]);
    assert!(h.starts_with("http/1.1 200"), "{h}");
    assert!(
        h.contains(&format!("content-length: {}", want.len())),
        "{h}"
    );
    assert!(
        h.contains("accept-ranges: bytes") && h.contains("last-modified:"),
        "{h}"
    );
    let etag = h
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .trim()
        .to_string();
    // 304
    let (code, body) = curl(&["-H", &format!("If-None-Match: {etag}"), &url]);
    assert_eq!((code, body.len()), (304, 0));
    // Traversal attempts
    for p in [
        "/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/ubuntu/..%2f..%2f..%2fetc/passwd",
    ] {
        let (code, body) = curl(&["--path-as-is", &s.url(p)]);
        assert!(code == 400 || code == 404, "{p}: {code}");
        assert!(!String::from_utf8_lossy(&body).contains("root:"), "{p}");
    }
    // Oversized headers
    let big = format!("X-Big: {}", "a".repeat(20 << 10));
    let (code, _) = curl(&["-H", &big, &url]);
    assert_eq!(code, 431);
    // API writes: no token, wrong token, right token.
    let sync = s.url("/api/v1/sync");
    assert_eq!(curl(&["-X", "POST", &sync]).0, 401);
    assert_eq!(
        curl(&["-X", "POST", "-H", "Authorization: Bearer nope", &sync]).0,
        401
    );
    let (code, body) = curl(&["-X", "POST", "-H", "Authorization: Bearer s3cret", &sync]);
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let (code, body) = curl(&[&s.url("/api/v1/nope")]);
    assert_eq!(code, 404);
    assert!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"].is_string());
    // Read endpoints.
    let (code, body) = s.get("/api/v1/resources");
    assert_eq!(code, 200);
    let res: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(res
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "ubuntu/amd64/ga-24.04/noble/stable"));
    // The CLI reads the same document from the state directory.
    let cli: serde_json::Value =
        serde_json::from_str(&r.env.ok(&["boot-resources", "read", "--json"])).unwrap();
    assert_eq!(cli, res);
    let (code, body) = s.get("/api/v1/sources");
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains(&r.mirror.url()));
    // A selection written through the API is applied by the next sync.
    let (code, body) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Authorization: Bearer s3cret",
        "-d",
        r#"{"arches": ["arm64"]}"#,
        &s.url("/api/v1/sources/1/selections/1"),
    ]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    s.wait_generation(2, Duration::from_secs(60));
    assert_eq!(s.get(KERNEL).0, 404, "amd64 unselected");
}

#[test]
fn slowloris_does_not_starve_other_clients() {
    // The slow clients and the normal one share 127.0.0.1: lift the per-client cap so
    // that all 200 are held and the header timeout is what keeps the rack serving.
    let r = rack(
        64 << 10,
        "auto = false",
        "max_connections_per_client = 1000\n",
    );
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    use std::io::Write;
    let mut conns: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(s.http).unwrap())
        .collect();
    let head = b"GET /ubuntu/amd64/generic/noble/stable/boot-kernel HTTP/1.1\r\nHost: x\r\n";
    let started = std::time::Instant::now();
    for i in 0..head.len().min(20) {
        for c in conns.iter_mut() {
            let _ = c.write_all(&head[i..i + 1]);
        }
        if i % 5 == 0 {
            let t = std::time::Instant::now();
            let (code, body) = s.get(KERNEL);
            assert_eq!(code, 200);
            assert_eq!(body.len(), 64 << 10);
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "a normal client waited {:?}",
                t.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
}

#[test]
fn sigterm_drains_and_exits_zero_and_sighup_reloads() {
    let r = rack(4 << 20, "auto = false", "");
    let mut s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    // SIGHUP picks up a changed config (the sync interval is visible in the status);
    // what needs a restart is named in the log and left as it was.
    let cfg = std::fs::read_to_string(&r.env.config)
        .unwrap()
        .replace("auto = false", "auto = false\ninterval = \"7m\"")
        .replace("[sync]", "drain_timeout = \"45s\"\n[sync]");
    std::fs::write(&r.env.config, cfg).unwrap();
    s.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(10), "the reload", || {
        s.status()["sync_interval_s"] == 420
    });
    let log = s.log_text();
    assert!(
        log.contains("drain_timeout changed") && log.contains("restart rackboot"),
        "{log}"
    );
    // SIGTERM during a transfer: it finishes, then the process exits 0.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k");
    let slow = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "60",
            "--limit-rate",
            "2M",
            "-o",
            out.to_str().unwrap(),
            &s.url(KERNEL),
        ])
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the download to start", || {
        std::fs::metadata(&out)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
    });
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "{status}");
    assert!(s.log_text().contains("draining transfers (up to 30 s)"));
    let res = wait_output(slow, Duration::from_secs(10));
    assert!(res.status.success());
    assert_eq!(
        sha256_hex(&std::fs::read(&out).unwrap()),
        sha256_hex(&kernel_of("20261101", 4 << 20))
    );
}

/// Sends `pkt` from a fresh socket and returns the first reply (if any).
fn exchange(server: std::net::SocketAddr, pkt: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    sock.send_to(pkt, server).unwrap();
    let mut buf = [0u8; 2048];
    sock.recv_from(&mut buf)
        .ok()
        .map(|(n, _)| buf[..n].to_vec())
}

fn error_code(reply: &[u8]) -> u16 {
    assert_eq!(&reply[..2], &[0, 5], "an ERROR packet: {reply:?}");
    u16::from_be_bytes([reply[2], reply[3]])
}

fn rrq(name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut v = vec![0, 1];
    for s in [name, "octet"] {
        v.extend_from_slice(s.as_bytes());
        v.push(0);
    }
    for (k, val) in opts {
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

#[test]
fn tftp_hostile_clients_get_errors_and_others_are_still_served() {
    let r = rack(256 << 10, "auto = false", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    let srv = s.tftp;
    // Truncated and unknown packets: an illegal-operation error or nothing, never a crash.
    for junk in [
        &b"\x00"[..],
        b"\x00\x01",
        b"\x00\x01abc",
        b"\x00\x09hello\x00",
        b"\xff\xff\xff",
    ] {
        if let Some(reply) = exchange(srv, junk) {
            assert_eq!(error_code(&reply), 4, "{junk:?}");
        }
    }
    // Traversal attempts: access violation.
    for name in [
        "../etc/passwd",
        "..\\..\\etc\\passwd",
        "/../../etc/passwd",
        "a/../../b",
    ] {
        let reply = exchange(srv, &rrq(name, &[])).expect("an answer");
        assert_eq!(error_code(&reply), 2, "{name}");
    }
    // Write requests: access violation.
    let mut wrq = rrq("x", &[]);
    wrq[1] = 2;
    assert_eq!(error_code(&exchange(srv, &wrq).unwrap()), 2);
    // Not found is quick and says so.
    assert_eq!(
        error_code(&exchange(srv, &rrq("pxelinux.cfg/C0A80001", &[])).unwrap()),
        1
    );
    // Huge option values and 1000 options.
    let reply = exchange(
        srv,
        &rrq(
            "pxelinux.0",
            &[("blksize", "99999999999999999999999"), ("tsize", "0")],
        ),
    )
    .unwrap();
    assert_eq!(&reply[..2], &[0, 6], "OACK with only tsize");
    assert!(String::from_utf8_lossy(&reply).contains("tsize"));
    assert!(!String::from_utf8_lossy(&reply).contains("blksize"));
    let many: Vec<(String, String)> = (0..1000).map(|i| (format!("opt{i}"), "1".into())).collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        error_code(&exchange(srv, &rrq("pxelinux.0", &refs)).unwrap()),
        4
    );
    // The tsize probe: RRQ, OACK, client ERROR ends it at once.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(&rrq(KERNEL, &[("tsize", "0"), ("blksize", "1468")]), srv)
        .unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..2], &[0, 6]);
    assert!(String::from_utf8_lossy(&buf[..n]).contains(&format!("tsize\0{}", 256 << 10)));
    sock.send_to(b"\x00\x05\x00\x08tsize probe\x00", from)
        .unwrap();
    // Duplicate RRQs from one port start one transfer only, and an ACK flood for wrong
    // blocks is ignored.
    let dup = UdpSocket::bind("127.0.0.1:0").unwrap();
    dup.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let req = rrq(KERNEL, &[]);
    dup.send_to(&req, srv).unwrap();
    dup.send_to(&req, srv).unwrap();
    let mut firsts = 0;
    let mut peer = None;
    while let Ok((n, from)) = dup.recv_from(&mut buf) {
        if n >= 4 && buf[..4] == [0, 3, 0, 1] {
            firsts += 1;
            peer = Some(from);
        }
    }
    assert_eq!(firsts, 1, "one transfer answers with DATA 1");
    for b in [7u16, 900, 65535, 3] {
        let mut ack = vec![0, 4];
        ack.extend_from_slice(&b.to_be_bytes());
        dup.send_to(&ack, peer.unwrap()).unwrap();
    }
    // Everyone else is still served correctly.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k");
    let res = run_client(
        "curl",
        &[
            "-s",
            "--max-time",
            "30",
            "-o",
            out.to_str().unwrap(),
            &format!("tftp://{srv}{KERNEL}"),
        ],
        Duration::from_secs(40),
    );
    assert!(res.status.success());
    assert_eq!(
        file_sha256(&out),
        sha256_hex(&kernel_of("20261101", 256 << 10))
    );
    let (_, m) = s.get("/metrics");
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("rackboot_tftp_tsize_probes_total 1"), "{m}");
}

#[test]
fn tftp_100_mib_with_blksize_512_rolls_over() {
    let r = rack(50 << 20, "auto = false", ""); // squashfs is 2x + 1 = 100 MiB + 1
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(120));
    let want = image("noble", "amd64", "20261101", 50 << 20)
        .versions
        .into_values()
        .next()
        .unwrap()[2]
        .data
        .clone();
    assert!(want.len() > 65535 * 512);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sq");
    let res = run_client(
        "curl",
        &[
            "-s",
            "--max-time",
            "300",
            "--tftp-blksize",
            "512",
            "-o",
            out.to_str().unwrap(),
            &format!(
                "tftp://{}/ubuntu/amd64/generic/noble/stable/squashfs",
                s.tftp
            ),
        ],
        Duration::from_secs(320),
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(file_sha256(&out), sha256_hex(&want));
}

#[test]
fn a_second_rackboot_on_the_same_http_port_is_refused_by_name() {
    let first = rack(64 << 10, "auto = false", "");
    let s = first.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    // The first one's HTTP sockets share their port among its own threads
    // (SO_REUSEPORT); another process binding it must still fail, by name.
    let second = rack(64 << 10, "auto = false", "");
    crate::http::edit_config(
        &second.env,
        "[http]\nlisten = [\"127.0.0.1:0\"]",
        &format!("[http]\nlisten = [\"{}\"]", s.http),
    );
    let err = second.env.fails(&["serve"], 1);
    assert!(
        err.contains(&format!("cannot bind HTTP on {}", s.http)),
        "{err}"
    );
    // The first one serves on, every connection answered.
    for _ in 0..20 {
        assert_eq!(s.get(KERNEL).0, 200);
    }
}
