//! HTTP serving beyond the basics in `serve.rs`: the connection limit, keep-alive,
//! symlinks out of the tree and hostile paths, header case, conditional requests and
//! HEAD, the last good snapshot served at once while the upstream is down, and the
//! drain deadline on SIGTERM with a transfer stuck.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::upstream::*;

#[test]
fn the_connection_limit_refuses_extra_connections_and_recovers() {
    let r = rack(16 << 10, "auto = false", "max_connections = 4\n");
    let s = r.env.serve_synced();
    // Four keep-alive connections, each with a request answered, held open.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(s.http).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            c.write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            c
        })
        .collect();
    let m = |s: &Served| {
        let mut c = TcpStream::connect(s.http).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // A refused connection may be reset before the request is written.
        let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = c.read_to_string(&mut text);
        text
    };
    // A fifth is closed without an answer, and counted.
    let fifth = m(&s);
    assert!(fifth.is_empty(), "{fifth}");
    // One held connection goes away: new ones are served again.
    drop(held.pop());
    let mut text = String::new();
    wait_until(Duration::from_secs(10), "a free connection slot", || {
        text = m(&s);
        !text.is_empty()
    });
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        metric(&text, "rackboot_http_connections_rejected_total") >= 1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "rackboot_http_connections_open"), 4.0);
    drop(held);
}

#[test]
fn keep_alive_symlinks_out_and_more_hostile_paths() {
    let r = rack(64 << 10, "auto = false", "");
    let s = r.env.serve_synced();
    // Two requests on one connection.
    let out = run_client(
        "curl",
        &[
            "-sv",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            &s.url(KERNEL),
            &s.url("/maas.meta"),
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Re-using existing connection"), "{err}");
    // Symlinks planted in the served snapshot that lead out of it are refused.
    let snap = std::fs::canonicalize(r.env.current()).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", snap.join("abs-out")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc", snap.join("rel-out")).unwrap();
    std::os::unix::fs::symlink("ubuntu", snap.join("in-tree")).unwrap();
    for p in ["/abs-out", "/rel-out/passwd", "/images/rel-out/passwd"] {
        let (code, body) = s.get(p);
        assert_eq!(code, 404, "{p}");
        assert!(!String::from_utf8_lossy(&body).contains("root:"), "{p}");
    }
    // A symlink that stays inside the tree is followed.
    let (code, body) = s.get("/in-tree/amd64/generic/noble/stable/boot-kernel");
    assert_eq!((code, body), (200, kernel_of("20261101", 64 << 10)));
    // Encoded and mixed traversal spellings, NUL, backslash, double encoding.
    s.assert_traversals_refused(&[
        "/%2E%2E/%2E%2E/etc/passwd",
        "/ubuntu/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/.%2e/.%2e/etc/passwd",
        "/ubuntu/..%5c..%5cetc%5cpasswd",
        "/maas.meta%00.png",
        "/%252e%252e/%252e%252e/etc/passwd",
    ]);
    // `//` and `/./` collapse (UEFI HTTP boot asks for `//grubx64.efi`).
    let (code, _) = curl(&[
        "--path-as-is",
        &s.url("//ubuntu/./amd64//generic/noble/stable/boot-kernel"),
    ]);
    assert_eq!(code, 200);
}

#[test]
fn header_names_are_title_case_as_grub_matches_them() {
    // GRUB 2.06's http module looks for "Content-Length: " byte for byte; a
    // lower-case name leaves it waiting for the end of a keep-alive body forever.
    let r = rack(64 << 10, "auto = false", "");
    let s = r.env.serve_synced();
    let mut c = TcpStream::connect(s.http).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // What GRUB sends: a file from the snapshot, then a dynamic config, one connection.
    for (path, want) in [
        (KERNEL, Some(kernel_of("20261101", 64 << 10))),
        ("/grub/grub.cfg", None),
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: GRUB 2.06-13+deb12u2\r\nRange: bytes=0-\r\n\r\n"
        );
        c.write_all(req.as_bytes()).unwrap();
        let (head, body) = read_response(&mut c);
        assert!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.1 206"),
            "{path}: {head}"
        );
        for name in ["Content-Length: ", "Content-Type: "] {
            assert!(head.contains(&format!("\r\n{name}")), "{path}: {head}");
        }
        match want {
            Some(bytes) => assert_eq!(body, bytes, "{path}"),
            None => assert!(
                String::from_utf8_lossy(&body).contains("configfile"),
                "{path}"
            ),
        }
    }
}

#[test]
fn conditional_requests_and_head_on_every_kind_of_answer() {
    let r = rack(64 << 10, "auto = false", "");
    let s = r.env.serve_synced();
    let url = s.url(KERNEL);
    // Response heads as curl prints them (header values keep their case: dates are
    // case-sensitive).
    let heads = curl_heads;
    let h = heads(&["-I", &url]);
    let field = |h: &str, name: &str| -> String {
        h.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {name} in {h}"))
    };
    let (etag, modified) = (field(&h, "etag"), field(&h, "last-modified"));
    assert_eq!(field(&h, "content-type"), "application/octet-stream");
    // If-Modified-Since with the file's own date: 304; with an older date: 200.
    let (code, body) = curl(&["-H", &format!("If-Modified-Since: {modified}"), &url]);
    assert_eq!((code, body.len()), (304, 0));
    let (code, _) = curl(&[
        "-H",
        "If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT",
        &url,
    ]);
    assert_eq!(code, 200);
    // If-Range with a stale validator: the whole file (200), not a part.
    let (code, body) = curl(&["-r", "0-9", "-H", "If-Range: \"stale\"", &url]);
    assert_eq!((code, body.len()), (200, 64 << 10));
    let (code, body) = curl(&["-r", "0-9", "-H", &format!("If-Range: {etag}"), &url]);
    assert_eq!((code, body.len()), (206, 10));
    // HEAD of a range: 206 with its length and no body.
    let h = heads(&["-I", "-r", "100-199", &url]);
    assert!(h.starts_with("HTTP/1.1 206"), "{h}");
    assert_eq!(field(&h, "content-length"), "100");
    assert_eq!(
        field(&h, "content-range"),
        format!("bytes 100-199/{}", 64 << 10)
    );
    // 416 says how long the file is.
    let h = heads(&["-r", "70000-", &url]);
    assert!(h.starts_with("HTTP/1.1 416"), "{h}");
    assert_eq!(field(&h, "content-range"), format!("bytes */{}", 64 << 10));
    // Content types of other files.
    let h = heads(&["-I", &s.url("/streams/v1/index.sjson")]);
    assert!(field(&h, "content-type").starts_with("text/plain"), "{h}");
    // Methods other than GET/HEAD on files: 405 with Allow.
    let h = heads(&["-X", "DELETE", &url]);
    assert!(h.starts_with("HTTP/1.1 405"), "{h}");
    assert_eq!(field(&h, "allow"), "GET, HEAD");
}

#[test]
fn the_last_good_snapshot_is_served_at_once_while_the_upstream_is_down() {
    let r = rack(64 << 10, "interval = \"1s\"", "");
    r.env.ok(&["sync"]);
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    let s = r.env.serve();
    // Served from the first request on, before any sync finished.
    assert_eq!(s.get(KERNEL), (200, kernel_of("20261101", 64 << 10)));
    assert_eq!(s.status()["generation"], 1);
    wait_until(Duration::from_secs(60), "two failed syncs", || {
        s.status()["sync"]["failures"].as_u64().unwrap_or(0) >= 2
    });
    assert_eq!(s.get(KERNEL), (200, kernel_of("20261101", 64 << 10)));
    let st = s.status();
    assert_eq!(st["sync"]["last_result"], "failed");
    assert_eq!(st["generation"], 1);
    // The upstream comes back: the next sync succeeds (backoff stays within the interval).
    r.mirror.clear_faults();
    wait_until(Duration::from_secs(60), "a good sync", || {
        s.status()["sync"]["last_result"] == "unchanged"
    });
}

#[test]
fn sigterm_exits_zero_when_the_drain_deadline_passes_with_a_transfer_stuck() {
    let r = rack(8 << 20, "auto = false", "");
    edit_config(&r.env, "[sync]", "drain_timeout = \"4s\"\n\n[sync]");
    let mut s = r.env.serve_synced();
    // A client that asks for the kernel and never reads: its transfer cannot finish.
    let stalled = s.stalled_get(KERNEL);
    s.signal(Signal::SIGTERM);
    // While it drains, new connections are refused at once, not left waiting in
    // an accept queue that no one reads any more.
    let mut refused = false;
    for _ in 0..40 {
        match TcpStream::connect_timeout(&s.http, Duration::from_millis(500)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    assert!(refused, "connections still accepted while draining");
    assert!(
        s.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "refused because it had already exited, not while draining"
    );
    // After drain_timeout (4 s here, 30 s by default) rackboot gives up on it and
    // exits 0; well before the default would have passed.
    let status = s.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}\n{}", s.log_text());
    let log = s.log_text();
    assert!(log.contains("draining transfers (up to 4 s)"), "{log}");
    assert!(log.contains("drain deadline passed"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    drop(stalled);
}
