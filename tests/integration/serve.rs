//! `rackboot serve`: sync loop, the first TFTP and HTTP downloads, HTTP with curl,
//! snapshot switches, slowloris, signals, fan-out to a second rack, a taken port.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::upstream::*;

#[test]
fn serve_starts_empty_syncs_and_serves_over_tftp_and_http() {
    let r = rack(3 << 20, "", "");
    let s = r.env.serve_synced();
    let want = kernel_of("20261101", 3 << 20);
    let (code, body) = s.get(KERNEL);
    assert_eq!(code, 200);
    assert_eq!(sha256_hex(&body), sha256_hex(&want));
    // MAAS's /images/ prefix serves the same tree; `//` collapses.
    let (code, body) = s.get(&format!("/images{KERNEL}"));
    assert_eq!((code, sha256_hex(&body)), (200, sha256_hex(&want)));
    let (code, body) = s.get("//grubx64.efi");
    assert_eq!((code, body), (200, payload(4, 6000)));

    let tftp_url = format!("tftp://{}{KERNEL}", s.tftp);
    for bs in ["512", "1468", "8192"] {
        let got = curl_fetch(&tftp_url, &["--tftp-blksize", bs], &format!("blksize {bs}"));
        assert_eq!(sha256_hex(&got), sha256_hex(&want), "curl blksize {bs}");
    }
    let port = s.tftp.port().to_string();
    for ws in ["1", "4", "8", "16"] {
        let (res, got) = run_client_to_file(
            "atftp",
            &[
                "--get",
                "-r",
                KERNEL,
                "-l",
                OUT,
                "--option",
                "blksize 1468",
                "--option",
                &format!("windowsize {ws}"),
                "127.0.0.1",
                &port,
            ],
            Duration::from_secs(70),
        );
        assert_success(&res, &format!("atftp windowsize {ws}"));
        let got = got.unwrap_or_else(|| panic!("atftp windowsize {ws} wrote no file"));
        assert_eq!(sha256_hex(&got), sha256_hex(&want), "atftp windowsize {ws}");
    }
    let (res, got) = run_client_to_file(
        "tftp",
        &[
            "127.0.0.1",
            &port,
            "-m",
            "binary",
            "-c",
            "get",
            "pxelinux.0",
            OUT,
        ],
        Duration::from_secs(30),
    );
    assert_success(&res, "tftp-hpa");
    assert_eq!(got.as_deref(), Some(&b"lpxelinux-bios-http"[..]));

    // The metrics saw it all.
    let m = s.metrics();
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
    let s = r.env.serve_synced();
    r.publish("20261120", 256 << 10);
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
    let s = r.env.serve_synced();
    let old = kernel_of("20261101", 8 << 20);
    let slow = SlowDownload::start(&s.url(KERNEL), "2M");
    r.publish("20261120", 8 << 20);
    s.signal(Signal::SIGHUP); // a reload also triggers a sync
    s.wait_generation(2, Duration::from_secs(60));
    assert_eq!(
        sha256_hex(&slow.finish(Duration::from_secs(60))),
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
    let first = r.env.serve_synced();
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
    let s = r.env.serve_synced();
    let url = s.url(KERNEL);
    let want = kernel_of("20261101", 64 << 10);
    let hdr = |args: &[&str]| -> String { curl_heads(args).to_lowercase() };
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
    s.assert_traversals_refused(&[
        "/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/ubuntu/..%2f..%2f..%2fetc/passwd",
    ]);
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
    let s = r.env.serve_synced();
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
    let mut s = r.env.serve_synced();
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
    let slow = SlowDownload::start(&s.url(KERNEL), "2M");
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "{status}");
    assert!(s.log_text().contains("draining transfers (up to 30 s)"));
    assert_eq!(
        sha256_hex(&slow.finish(Duration::from_secs(10))),
        sha256_hex(&kernel_of("20261101", 4 << 20))
    );
}

#[test]
fn a_second_rackboot_on_the_same_http_port_is_refused_by_name() {
    let first = rack(64 << 10, "auto = false", "");
    let s = first.env.serve_synced();
    // The first one's HTTP sockets share their port among its own threads
    // (SO_REUSEPORT); another process binding it must still fail, by name.
    let second = rack(64 << 10, "auto = false", "");
    edit_config(
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
