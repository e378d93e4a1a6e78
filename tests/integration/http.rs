//! `rackboot serve` beyond the basics in `serve.rs`: TLS, `rackboot status` against
//! the daemon, systemd notify and socket activation, `sync.auto = false` with an
//! on-demand sync, `/metrics` families and their movement, API errors, the
//! connection limit, keep-alive, symlinks out of the tree, serving the last good
//! snapshot at once while the upstream is down.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::mirror::*;
use crate::serve::{kernel_of, products, rack, Rack, KERNEL, SHA512};

pub const TOKEN: &str = "t0ken-for-tests";

/// Replaces `from` with `to` in the rack's config.
pub fn edit_config(env: &Env, from: &str, to: &str) {
    let text = std::fs::read_to_string(&env.config).unwrap();
    assert!(text.contains(from), "{from:?} not in the config:\n{text}");
    std::fs::write(&env.config, text.replace(from, to)).unwrap();
}

/// A rack whose API takes writes with [`TOKEN`]; `http_extra` goes into `[http]`.
pub fn rack_with_token(kernel_size: usize, sync_extra: &str, http_extra: &str) -> Rack {
    let r = rack(
        kernel_size,
        sync_extra,
        &format!("token_file = \"TOKENFILE\"\n{http_extra}"),
    );
    let token = r.env.dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    edit_config(&r.env, "TOKENFILE", token.to_str().unwrap());
    r
}

pub fn post_sync(s: &Served) -> (u16, Vec<u8>) {
    curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &s.url("/api/v1/sync"),
    ])
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// The value of one sample line (`name{labels} value`) in a metrics text.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no sample {sample:?} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn metrics(s: &Served) -> String {
    let (code, body) = s.get("/metrics");
    assert_eq!(code, 200);
    String::from_utf8(body).unwrap()
}

/// A port that was free a moment ago (for configs that must name a fixed port).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `rackboot serve` with `customize` applied to the command and waits for the
/// `listening for {what} on ADDR` lines; returns the addresses in that order.
pub fn spawn_serve(
    env: &Env,
    what: &[&str],
    customize: impl FnOnce(&mut Command),
) -> (Served, Vec<SocketAddr>) {
    let log = env.dir.path().join(format!(
        "serve-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut cmd = env.command(&["serve"]);
    cmd.env("RACKBOOT_LOG", "info,rackboot=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    customize(&mut cmd);
    let child = cmd.spawn().unwrap();
    let mut served = Served {
        child: Some(child),
        log,
        tftp: "0.0.0.0:0".parse().unwrap(),
        http: "0.0.0.0:0".parse().unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = served.log_text();
        let found: Vec<Option<SocketAddr>> = what
            .iter()
            .map(|w| {
                text.lines()
                    .find_map(|l| l.split(&format!("listening for {w} on ")).nth(1))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|a| a.parse().ok())
            })
            .collect();
        if found.iter().all(Option::is_some) {
            let addrs: Vec<SocketAddr> = found.into_iter().map(Option::unwrap).collect();
            if let Some(i) = what.iter().position(|w| *w == "HTTP") {
                served.http = addrs[i];
            }
            if let Some(i) = what.iter().position(|w| *w == "TFTP") {
                served.tftp = addrs[i];
            }
            return (served, addrs);
        }
        if let Some(status) = served.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("rackboot serve exited with {status}:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "rackboot serve did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, made with openssl.
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = run_client(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=rackboot test",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A rack with a TLS listener on 127.0.0.1:0 and a fresh self-signed certificate
/// (returned, for `curl --cacert`).
pub fn rack_with_tls(kernel_size: usize) -> (Rack, std::path::PathBuf) {
    let r = rack(kernel_size, "auto = false", "TLS\n");
    let (cert, key) = self_signed(r.env.dir.path());
    edit_config(
        &r.env,
        "TLS\n",
        &format!(
            "tls_listen = [\"127.0.0.1:0\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    (r, cert)
}

#[test]
fn tls_listener_serves_files_and_the_api_with_the_configured_certificate() {
    let (r, cert) = rack_with_tls(1 << 20);
    let (s, addrs) = spawn_serve(&r.env, &["TFTP", "HTTP", "HTTPS"], |_| {});
    s.wait_generation(1, Duration::from_secs(60));
    let https = |p: &str| format!("https://{}{p}", addrs[2]);
    let cacert = cert.to_str().unwrap();
    let want = kernel_of("20261101", 1 << 20);
    let (code, body) = curl(&["--cacert", cacert, &https(KERNEL)]);
    assert_eq!(code, 200);
    assert_eq!(sha256_hex(&body), sha256_hex(&want), "the file over TLS");
    let (code, body) = curl(&["--cacert", cacert, "-r", "1000-1999", &https(KERNEL)]);
    assert_eq!((code, body.as_slice()), (206, &want[1000..2000]));
    let (code, body) = curl(&["--cacert", cacert, &https("/api/v1/status")]);
    assert_eq!(code, 200);
    assert_eq!(json(&body)["generation"], 1);
    // The certificate really is the configured one: without it curl refuses.
    let out = run_client(
        "curl",
        &["-s", "-o", "/dev/null", "--max-time", "20", &https(KERNEL)],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(60), "curl: unknown CA");
    // Plain HTTP on the TLS port gets no HTTP answer; the plain port is unaffected.
    let (code, _) = curl(&[&format!("http://{}{KERNEL}", addrs[2])]);
    assert_eq!(code, 0);
    assert_eq!(s.get(KERNEL).0, 200);
}

#[test]
fn tls_config_errors_name_the_file_or_key() {
    let env = Env::new();
    TestKey::generate().write_keyring(&env.keyring);
    env.write_config("http://127.0.0.1:1/", &["amd64"], "");
    let bad = env.dir.path().join("not-a-cert.pem");
    std::fs::write(&bad, "hello\n").unwrap();
    let cfg = std::fs::read_to_string(&env.config).unwrap();
    let with = |http: &str| {
        std::fs::write(
            &env.config,
            cfg.replace(
                "[sync]",
                &format!("[tftp]\nlisten = []\n[http]\nlisten = [\"127.0.0.1:0\"]\n{http}\n[sync]"),
            ),
        )
        .unwrap();
    };
    with(&format!(
        "tls_listen = [\"127.0.0.1:0\"]\ntls_cert = \"{0}\"\ntls_key = \"{0}\"",
        bad.display()
    ));
    let out = env.run_for(&["serve"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("error:")).unwrap_or("");
    assert!(
        line.contains(bad.to_str().unwrap()) && line.contains("no certificate"),
        "{err}"
    );
    with(&format!("tls_cert = \"{}\"", bad.display()));
    let err = env.fails(&["serve"], 2);
    assert!(err.contains("tls_cert and http.tls_key"), "{err}");
}

#[test]
fn status_talks_to_the_running_daemon_and_falls_back_to_the_state_dir() {
    let r = rack_with_token(64 << 10, "auto = false", "");
    let port = free_port();
    edit_config(
        &r.env,
        "[http]\nlisten = [\"127.0.0.1:0\"]",
        &format!("[http]\nlisten = [\"127.0.0.1:{port}\"]"),
    );
    let s = r.env.serve();
    assert_eq!(s.http.port(), port);
    s.wait_generation(1, Duration::from_secs(60));
    // A failing sync shows in the daemon's status (the state dir cannot know it).
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    assert_eq!(post_sync(&s).0, 202);
    wait_until(Duration::from_secs(60), "the failed sync", || {
        s.status()["sync"]["failures"] == 1
    });
    let v = json(r.env.ok(&["status", "--json"]).as_bytes());
    assert_eq!(v["daemon"]["running"], true, "{v}");
    assert_eq!(v["daemon"]["url"], format!("http://127.0.0.1:{port}/"));
    assert_eq!(v["generation"], 1);
    assert_eq!(v["sync"]["runs"], 2, "{v}");
    assert_eq!(v["sync"]["last_result"], "failed");
    assert!(v["sync"]["last_error"].as_str().unwrap().contains("503"));
    assert_eq!(v["sync_auto"], false);
    assert!(v["uptime_s"].is_u64());
    let human = r.env.ok(&["status"]);
    for want in [
        &format!("daemon:       running at http://127.0.0.1:{port}/") as &str,
        "serving:      generation 1 (",
        "last sync:    failed at ",
        "HTTP 503",
        "syncs:        2 runs, 1 failed",
        "auto sync:    paused",
        "sync running: no",
        &format!("source 1:     {}", r.mirror.url()),
    ] {
        assert!(human.contains(want), "{want:?} in:\n{human}");
    }
    // --url names the daemon explicitly; a bad one is a usage error.
    let v = json(
        r.env
            .ok(&["status", "--json", "--url", &s.url("/")])
            .as_bytes(),
    );
    assert_eq!(v["daemon"]["running"], true);
    let err = r.env.fails(&["status", "--url", "ftp://127.0.0.1/"], 2);
    assert!(err.contains("--url") && err.lines().count() == 1, "{err}");
    // Without the daemon: the state dir's view, and why the daemon was not reached.
    let mut s = s;
    s.signal(Signal::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(40)).success());
    let v = json(r.env.ok(&["status", "--json"]).as_bytes());
    assert_eq!(v["daemon"]["running"], false, "{v}");
    assert!(
        v["daemon"]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{port}")),
        "{v}"
    );
    assert_eq!(v["generation"], 1);
    assert!(v["sync"].is_null());
    let human = r.env.ok(&["status"]);
    assert!(human.contains("daemon:       not reachable: "), "{human}");
    assert!(human.contains("serving:      generation 1 ("), "{human}");
}

/// Messages sent to a `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notify {
            sock,
            path,
            seen: vec![],
        }
    }

    /// Reads messages until one satisfies `pred` (at most `limit`); returns it.
    fn wait(&mut self, limit: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            assert!(
                Instant::now() < deadline,
                "no notify message for {what} within {limit:?}; got {:?}",
                self.seen
            );
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                self.seen.push(msg.clone());
                if pred(&msg) {
                    return msg;
                }
            }
        }
    }
}

#[test]
fn systemd_notify_ready_status_after_every_sync_watchdog_and_stopping() {
    let r = rack_with_token(64 << 10, "auto = false", "");
    let mut n = Notify::bind(r.env.dir.path());
    let notify_path = n.path.clone();
    let (mut s, _) = spawn_serve(&r.env, &["TFTP", "HTTP"], |c| {
        c.env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "400000")
            .env_remove("WATCHDOG_PID");
    });
    n.wait(Duration::from_secs(30), "READY=1", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    // The first sync (on start) reports its result, and so does each sync after it.
    n.wait(Duration::from_secs(60), "the first sync", |m| {
        m == "STATUS=serving generation 1; last sync ok"
    });
    assert!(
        n.seen.iter().any(|m| m == "STATUS=syncing images"),
        "{:?}",
        n.seen
    );
    write_stream(
        &r.env.mirror,
        &products("20261120", 64 << 10),
        &r.key,
        SHA512,
    );
    assert_eq!(post_sync(&s).0, 202);
    n.wait(Duration::from_secs(60), "the second sync", |m| {
        m == "STATUS=serving generation 2; last sync ok"
    });
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    assert_eq!(post_sync(&s).0, 202);
    let failed = n.wait(Duration::from_secs(60), "the failed sync", |m| {
        m.starts_with("STATUS=last sync failed")
    });
    assert!(failed.contains("503"), "{failed}");
    // WATCHDOG=1 keeps coming (every WATCHDOG_USEC/2).
    let before = n.seen.iter().filter(|m| *m == "WATCHDOG=1").count();
    for _ in 0..2 {
        n.wait(Duration::from_secs(10), "WATCHDOG=1", |m| m == "WATCHDOG=1");
    }
    assert!(n.seen.iter().filter(|m| *m == "WATCHDOG=1").count() >= before + 2);
    s.signal(Signal::SIGTERM);
    n.wait(Duration::from_secs(30), "STOPPING=1", |m| m == "STOPPING=1");
    assert!(s.wait_exit(Duration::from_secs(40)).success());
    assert_eq!(
        n.seen
            .iter()
            .filter(|m| m.lines().any(|l| l == "READY=1"))
            .count(),
        1,
        "{:?}",
        n.seen
    );
}

/// `rackboot serve` started the way systemd starts it with socket activation: `fds`
/// become descriptors 3, 4, … with `$LISTEN_FDS` (and `$LISTEN_FDNAMES` when `names`
/// is given); stderr goes to `log`.
fn spawn_activated(
    env: &Env,
    fds: &[std::os::fd::RawFd],
    names: Option<&str>,
    notify: Option<&Path>,
    log: &Path,
) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let names = names
        .map(|n| format!(" LISTEN_FDNAMES={n}"))
        .unwrap_or_default();
    // LISTEN_PID must be the daemon's own PID: a shell sets it and execs rackboot.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "export LISTEN_PID=$$ LISTEN_FDS={}{names}; exec {BIN} --config {} serve",
            fds.len(),
            env.config.display()
        ))
        .env("RACKBOOT_LOG", "info,rackboot=debug")
        .env_remove("RACKBOOT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n);
    }
    let fds = fds.to_vec();
    // SAFETY: between fork and exec only fcntl, dup2 and close run (all
    // async-signal-safe). The sockets are first copied above 100 so that placing
    // them at 3, 4, … cannot overwrite one with another; dup2 leaves the targets
    // without close-on-exec, so they reach rackboot.
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            let mut high = [0; 8];
            for (h, fd) in high.iter_mut().zip(&fds) {
                *h = libc::fcntl(*fd, libc::F_DUPFD, 100);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (to, from) in (3..).zip(&high[..fds.len()]) {
                if libc::dup2(*from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*from);
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn socket_activation_serves_on_the_passed_sockets() {
    use std::os::fd::AsRawFd;

    let r = rack(64 << 10, "auto = false", "");
    let mut n = Notify::bind(r.env.dir.path());
    // systemd passes fd 3 (the HTTP stream socket) and fd 4 (the TFTP datagram socket).
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tftp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (http_addr, tftp_addr) = (http.local_addr().unwrap(), tftp.local_addr().unwrap());
    let log = r.env.dir.path().join("activated.log");
    let child = spawn_activated(
        &r.env,
        &[http.as_raw_fd(), tftp.as_raw_fd()],
        None,
        Some(&n.path),
        &log,
    );
    let s = Served {
        child: Some(child),
        log,
        tftp: tftp_addr,
        http: http_addr,
    };
    // Only the daemon holds the sockets now: if it ignored them, nothing would answer.
    drop(http);
    drop(tftp);
    n.wait(Duration::from_secs(30), "READY=1", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    // READY means the sockets are served: the API answers at once.
    let (code, body) = s.get("/api/v1/status");
    assert_eq!(code, 200, "{}", s.log_text());
    assert!(json(&body)["uptime_s"].is_u64());
    s.wait_generation(1, Duration::from_secs(60));
    let text = s.log_text();
    assert!(
        text.contains(&format!("listening for HTTP on {http_addr}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("listening for TFTP on {tftp_addr}")),
        "{text}"
    );
    assert_eq!(
        s.get(KERNEL),
        (200, kernel_of("20261101", 64 << 10)),
        "HTTP on the passed socket"
    );
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
            &format!("tftp://{tftp_addr}{KERNEL}"),
        ],
        Duration::from_secs(40),
    );
    assert!(res.status.success(), "TFTP on the passed socket");
    assert_eq!(
        file_sha256(&out),
        sha256_hex(&kernel_of("20261101", 64 << 10))
    );
    // The config's own listen addresses (port 0) were not bound as well.
    assert_eq!(text.matches("listening for HTTP on").count(), 1, "{text}");
}

#[test]
fn socket_activation_serves_tls_on_a_socket_named_https() {
    use std::os::fd::AsRawFd;

    let (r, cert) = rack_with_tls(64 << 10);
    // Two stream sockets: the unit names the second `https`.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let https = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (http_addr, https_addr) = (http.local_addr().unwrap(), https.local_addr().unwrap());
    let log = r.env.dir.path().join("activated-tls.log");
    let child = spawn_activated(
        &r.env,
        &[http.as_raw_fd(), https.as_raw_fd()],
        Some("http:https"),
        None,
        &log,
    );
    let s = Served {
        child: Some(child),
        log,
        tftp: "127.0.0.1:9".parse().unwrap(),
        http: http_addr,
    };
    drop((http, https));
    s.wait_generation(1, Duration::from_secs(60));
    let want = kernel_of("20261101", 64 << 10);
    let (code, body) = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        &format!("https://{https_addr}{KERNEL}"),
    ]);
    assert_eq!((code, sha256_hex(&body)), (200, sha256_hex(&want)));
    assert_eq!(s.get(KERNEL), (200, want), "plain HTTP on the other socket");
    let text = s.log_text();
    assert!(
        text.contains(&format!("listening for HTTPS on {https_addr}")),
        "{text}"
    );
    // The config's tls_listen (port 0) was not bound as well.
    assert_eq!(text.matches("listening for HTTPS on").count(), 1, "{text}");

    // A socket named https without a certificate configured is a clear error.
    let plain = rack(64 << 10, "auto = false", "");
    let lone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let log = plain.env.dir.path().join("activated-no-tls.log");
    let child = spawn_activated(&plain.env, &[lone.as_raw_fd()], Some("https"), None, &log);
    let status = wait_output(child, Duration::from_secs(30)).status;
    assert_eq!(status.code(), Some(1));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains(
            "systemd passed a socket named https, but http.tls_cert and http.tls_key are not set"
        ),
        "{err}"
    );
}

#[test]
fn auto_false_pauses_the_periodic_sync_and_post_sync_still_works() {
    let r = rack_with_token(64 << 10, "auto = false\ninterval = \"1s\"", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    let st = s.status();
    assert_eq!(st["sync_auto"], false);
    assert!(st["sync"]["next_sync"].is_null(), "{st}");
    write_stream(
        &r.env.mirror,
        &products("20261120", 64 << 10),
        &r.key,
        SHA512,
    );
    r.mirror.clear_log();
    // Three intervals pass: no periodic sync asks the mirror anything.
    std::thread::sleep(Duration::from_secs(3));
    assert!(r.mirror.requests().is_empty(), "{:?}", r.mirror.requests());
    let st = s.status();
    assert_eq!(
        (st["generation"].as_u64(), st["sync"]["runs"].as_u64()),
        (Some(1), Some(1))
    );
    // A write without the token is refused and triggers nothing.
    assert_eq!(curl(&["-X", "POST", &s.url("/api/v1/sync")]).0, 401);
    // With it, the sync runs and publishes the new version.
    let (code, body) = post_sync(&s);
    assert_eq!(code, 202);
    assert_eq!(json(&body)["sync"], "started");
    s.wait_generation(2, Duration::from_secs(60));
    assert_eq!(s.get(KERNEL).1, kernel_of("20261120", 64 << 10));
    assert_eq!(s.status()["sync"]["runs"], 2);
    assert!(!r.mirror.requests().is_empty());
}

#[test]
fn metrics_have_every_family_and_move_with_traffic_and_syncs() {
    // The kernel is larger than loopback's socket buffers, so a client that does not
    // read keeps its transfer in flight.
    let size = 8 << 20;
    let r = rack_with_token(size, "auto = false", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    let m0 = metrics(&s);
    for family in [
        "rackboot_tftp_requests",
        "rackboot_tftp_sent_bytes",
        "rackboot_tftp_errors",
        "rackboot_tftp_tsize_probes",
        "rackboot_tftp_transfers_in_flight",
        "rackboot_http_requests",
        "rackboot_http_file_requests",
        "rackboot_http_sent_bytes",
        "rackboot_http_errors",
        "rackboot_http_transfers_in_flight",
        "rackboot_http_connections_open",
        "rackboot_sync_runs",
        "rackboot_sync_failures",
        "rackboot_sync_duration_milliseconds",
        "rackboot_sync_fetched_bytes",
        "rackboot_snapshot_generation",
        "rackboot_snapshot_age_seconds",
    ] {
        assert!(
            m0.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{m0}"
        );
    }
    assert!(m0.trim_end().ends_with("# EOF"), "OpenMetrics text");
    assert_eq!(metric(&m0, "rackboot_snapshot_generation"), 1.0);
    assert!(metric(&m0, "rackboot_snapshot_age_seconds") >= 0.0);
    assert_eq!(metric(&m0, "rackboot_sync_runs_total"), 1.0);
    assert_eq!(metric(&m0, "rackboot_sync_failures_total"), 0.0);
    let fetched0 = metric(&m0, "rackboot_sync_fetched_bytes_total");
    assert!(fetched0 >= size as f64, "the first sync fetched the kernel");

    // HTTP: one kernel, one 404, one 416, one 431; each lands in its place.
    let kernel = kernel_of("20261101", size);
    assert_eq!(s.get(KERNEL).1, kernel);
    assert_eq!(s.get("/no/such/file").0, 404);
    assert_eq!(curl(&["-r", "99999999-", &s.url(KERNEL)]).0, 416);
    let big = format!("X-Big: {}", "a".repeat(20 << 10));
    assert_eq!(curl(&["-H", &big, &s.url(KERNEL)]).0, 431);
    // TFTP: one kernel and one tsize probe (curl asks for tsize, then transfers).
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
            &format!("tftp://{}{KERNEL}", s.tftp),
        ],
        Duration::from_secs(40),
    );
    assert!(res.status.success());
    let m1 = metrics(&s);
    let delta = |sample: &str| metric(&m1, sample) - metric(&m0, sample);
    assert_eq!(
        delta("rackboot_http_file_requests_total{class=\"kernel\"}"),
        1.0
    );
    assert_eq!(
        delta("rackboot_http_sent_bytes_total{class=\"kernel\"}"),
        kernel.len() as f64
    );
    assert_eq!(delta("rackboot_http_errors_total{kind=\"not_found\"}"), 1.0);
    assert_eq!(
        delta("rackboot_http_errors_total{kind=\"range_not_satisfiable\"}"),
        1.0
    );
    assert_eq!(
        delta("rackboot_http_errors_total{kind=\"header_too_large\"}"),
        1.0
    );
    assert!(delta("rackboot_http_requests_total") >= 4.0);
    assert_eq!(delta("rackboot_tftp_requests_total{class=\"kernel\"}"), 1.0);
    // (At least: a retransmitted block counts again.)
    assert!(delta("rackboot_tftp_sent_bytes_total{class=\"kernel\"}") >= kernel.len() as f64);
    assert_eq!(metric(&m1, "rackboot_http_transfers_in_flight"), 0.0);

    // A transfer in flight shows as one until its client goes away.
    let mut stalled = TcpStream::connect(s.http).unwrap();
    stalled
        .write_all(format!("GET {KERNEL} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    wait_until(
        Duration::from_secs(20),
        "one HTTP transfer in flight",
        || metric(&metrics(&s), "rackboot_http_transfers_in_flight") == 1.0,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&metrics(&s), "rackboot_http_transfers_in_flight"),
        1.0
    );
    drop(stalled);
    wait_until(
        Duration::from_secs(20),
        "no HTTP transfer in flight",
        || metric(&metrics(&s), "rackboot_http_transfers_in_flight") == 0.0,
    );

    // Syncs: a new version counts a run and its bytes; a broken upstream a failure.
    write_stream(&r.env.mirror, &products("20261120", size), &r.key, SHA512);
    assert_eq!(post_sync(&s).0, 202);
    s.wait_generation(2, Duration::from_secs(60));
    let m2 = metrics(&s);
    assert_eq!(metric(&m2, "rackboot_sync_runs_total"), 2.0);
    assert_eq!(metric(&m2, "rackboot_snapshot_generation"), 2.0);
    assert!(metric(&m2, "rackboot_sync_fetched_bytes_total") >= fetched0 + size as f64);
    assert!(
        metric(&m2, "rackboot_sync_duration_milliseconds_total")
            >= metric(&m0, "rackboot_sync_duration_milliseconds_total")
    );
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    assert_eq!(post_sync(&s).0, 202);
    wait_until(Duration::from_secs(60), "the failed sync", || {
        metric(&metrics(&s), "rackboot_sync_failures_total") == 1.0
    });
    let m3 = metrics(&s);
    assert_eq!(metric(&m3, "rackboot_sync_runs_total"), 3.0);
    assert_eq!(metric(&m3, "rackboot_sync_last_success"), 0.0);
    assert_eq!(metric(&m3, "rackboot_snapshot_generation"), 2.0);
}

#[test]
fn api_errors_are_json_with_a_message() {
    let r = rack_with_token(64 << 10, "auto = false", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    let auth = format!("Authorization: Bearer {TOKEN}");
    let cases: Vec<(Vec<String>, u16, &str)> = vec![
        (vec![s.url("/api/v1/nope")], 404, "no such endpoint"),
        (
            vec!["-X".into(), "POST".into(), s.url("/api/v1/sync")],
            401,
            "missing Authorization",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "Authorization: Bearer wrong".into(),
                s.url("/api/v1/sync"),
            ],
            401,
            "wrong bearer token",
        ),
        (
            vec!["-X".into(), "POST".into(), s.url("/metrics")],
            405,
            "use GET",
        ),
        (
            vec![s.url("/api/v1/sources/9/selections")],
            404,
            "no boot source 9",
        ),
        (
            vec![s.url("/api/v1/machines/not-a-mac")],
            400,
            "not a MAC address",
        ),
        (
            vec![
                "-X".into(),
                "PUT".into(),
                "-H".into(),
                auth.clone(),
                "-d".into(),
                "{not json".into(),
                s.url("/api/v1/sources/1"),
            ],
            400,
            "not JSON",
        ),
        (
            vec![
                "-X".into(),
                "PUT".into(),
                "-H".into(),
                auth.clone(),
                "-d".into(),
                "[1, 2]".into(),
                s.url("/api/v1/sources/1"),
            ],
            400,
            "must be a JSON object",
        ),
        (
            vec![
                "-X".into(),
                "PUT".into(),
                "-H".into(),
                auth.clone(),
                "-d".into(),
                "{\"nonsense\": 1}".into(),
                s.url("/api/v1/sources/1"),
            ],
            400,
            "nonsense",
        ),
        (
            vec![
                "-X".into(),
                "DELETE".into(),
                "-H".into(),
                auth.clone(),
                s.url("/api/v1/sources/7"),
            ],
            404,
            "no boot source 7",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                auth.clone(),
                "--data-binary".into(),
                format!("{{\"x\": \"{}\"}}", "a".repeat(100 << 10)),
                s.url("/api/v1/sources"),
            ],
            413,
            "request body",
        ),
    ];
    for (args, want_code, want_msg) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&refs);
        assert_eq!(
            code,
            want_code,
            "{args:?}: {}",
            String::from_utf8_lossy(&body)
        );
        let v = json(&body);
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{args:?}: {v}"));
        assert!(
            msg.contains(want_msg),
            "{args:?}: {msg:?} lacks {want_msg:?}"
        );
        assert!(!msg.contains('\n'), "one line: {msg:?}");
    }
    // Without a token file, writes are off: 403 with the setting to change.
    edit_config(&r.env, "token_file", "# token_file");
    drop(s);
    let s = r.env.serve();
    let (code, body) = post_sync(&s);
    assert_eq!(code, 403);
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("http.token_file"));
}

#[test]
fn the_connection_limit_refuses_extra_connections_and_recovers() {
    let r = rack(16 << 10, "auto = false", "max_connections = 4\n");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
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
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
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
    for p in [
        "/%2E%2E/%2E%2E/etc/passwd",
        "/ubuntu/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/.%2e/.%2e/etc/passwd",
        "/ubuntu/..%5c..%5cetc%5cpasswd",
        "/maas.meta%00.png",
        "/%252e%252e/%252e%252e/etc/passwd",
    ] {
        let (code, body) = curl(&["--path-as-is", &s.url(p)]);
        assert!(code == 400 || code == 404, "{p}: {code}");
        assert!(!String::from_utf8_lossy(&body).contains("root:"), "{p}");
    }
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
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
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
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    let url = s.url(KERNEL);
    // Response heads as curl prints them (header values keep their case: dates are
    // case-sensitive).
    let heads = |args: &[&str]| -> String {
        let out = run_client(
            "curl",
            &[
                &["-s", "-D", "-", "-o", "/dev/null", "--max-time", "20"],
                args,
            ]
            .concat(),
            Duration::from_secs(30),
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
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

/// Reads one HTTP/1.1 response with a Content-Length body from `c`.
fn read_response(c: &mut TcpStream) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
        assert!(head.len() < 16 << 10, "response head too long");
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).unwrap();
    (head, body)
}

#[test]
fn an_old_snapshot_is_kept_while_a_transfer_holds_it_and_collected_after() {
    let size = 8 << 20;
    let r = rack_with_token(size, "auto = false", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    // A client asks for the kernel of generation 1 and reads nothing yet: the file
    // is larger than the socket buffers, so its transfer stays open.
    let mut stalled = TcpStream::connect(s.http).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stalled
        .write_all(format!("GET {KERNEL} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    wait_until(Duration::from_secs(20), "the transfer to start", || {
        metric(&metrics(&s), "rackboot_http_transfers_in_flight") == 1.0
    });
    // Two new generations are published meanwhile.
    for (generation, version) in [(2, "20261120"), (3, "20261201")] {
        write_stream(&r.env.mirror, &products(version, size), &r.key, SHA512);
        assert_eq!(post_sync(&s).0, 202);
        s.wait_generation(generation, Duration::from_secs(60));
    }
    let snapshots = r.env.state.join("snapshots");
    assert!(
        snapshots.join("1").is_dir(),
        "generation 1 is in use and kept"
    );
    assert!(
        !snapshots.join("2").exists(),
        "generation 2 was never used and is collected"
    );
    // The held transfer ends with generation 1's bytes.
    let (head, body) = read_response(&mut stalled);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(sha256_hex(&body), sha256_hex(&kernel_of("20261101", size)));
    drop(stalled);
    wait_until(Duration::from_secs(20), "the transfer to end", || {
        metric(&metrics(&s), "rackboot_http_transfers_in_flight") == 0.0
    });
    // The next published generation collects it.
    write_stream(&r.env.mirror, &products("20261215", size), &r.key, SHA512);
    assert_eq!(post_sync(&s).0, 202);
    s.wait_generation(4, Duration::from_secs(60));
    assert!(!snapshots.join("1").exists(), "generation 1 is collected");
    assert_eq!(s.get(KERNEL).1, kernel_of("20261215", size));
}

/// The server's open descriptors that point at deleted files.
fn deleted_open_files(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy().into_owned();
            if t.ends_with(" (deleted)") {
                out.push(t);
            }
        }
    }
    out
}

#[test]
fn small_files_kept_open_follow_the_generation_and_are_let_go_of() {
    // Small snapshot files stay open between requests (a per-thread cache); a new
    // generation must be served at once, and the old one's files released even
    // when no request comes after the switch.
    let size = 64 << 10;
    let r = rack_with_token(size, "auto = false", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    // Many requests, on several connections, so every connection thread opens it.
    for _ in 0..8 {
        assert_eq!(s.get(KERNEL).1, kernel_of("20261101", size));
        assert_eq!(s.get("/maas.meta").0, 200);
    }
    for (generation, version) in [(2, "20261120"), (3, "20261201")] {
        write_stream(&r.env.mirror, &products(version, size), &r.key, SHA512);
        assert_eq!(post_sync(&s).0, 202);
        s.wait_generation(generation, Duration::from_secs(60));
        // The new bytes at once, never the cached old ones.
        for _ in 0..8 {
            assert_eq!(s.get(KERNEL).1, kernel_of(version, size), "{version}");
        }
    }
    let snapshots = r.env.state.join("snapshots");
    assert!(!snapshots.join("1").exists(), "generation 1 is collected");
    // Generation 3's files were fetched last. Two more generations are published
    // (the sync that publishes 5 collects 3) with no request in between: the
    // threads let go of generation 3's files by themselves.
    for (generation, version) in [(4, "20261215"), (5, "20261224")] {
        write_stream(&r.env.mirror, &products(version, size), &r.key, SHA512);
        assert_eq!(post_sync(&s).0, 202);
        s.wait_generation(generation, Duration::from_secs(60));
    }
    assert!(!snapshots.join("3").exists(), "generation 3 is collected");
    let mut open = Vec::new();
    wait_until(Duration::from_secs(30), "no open deleted files", || {
        open = deleted_open_files(s.pid());
        if !open.is_empty() {
            eprintln!("still open: {open:?}");
        }
        open.is_empty()
    });
    assert_eq!(s.get(KERNEL).1, kernel_of("20261224", size));
}

#[test]
fn sigterm_exits_zero_when_the_drain_deadline_passes_with_a_transfer_stuck() {
    let r = rack(8 << 20, "auto = false", "");
    edit_config(&r.env, "[sync]", "drain_timeout = \"4s\"\n\n[sync]");
    let mut s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    // A client that asks for the kernel and never reads: its transfer cannot finish.
    let mut stalled = TcpStream::connect(s.http).unwrap();
    stalled
        .write_all(format!("GET {KERNEL} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    wait_until(Duration::from_secs(20), "the transfer to start", || {
        metric(&metrics(&s), "rackboot_http_transfers_in_flight") == 1.0
    });
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

#[test]
fn status_shows_a_sync_in_progress_and_how_far_it_got() {
    let r = rack_with_token(1 << 20, "auto = false", "");
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(60));
    assert!(s.status()["progress"].is_null());
    // The next version's kernel comes slowly (about 10 s: room for a loaded machine),
    // and so does its index (a second or two before the plan exists).
    r.mirror.fault("boot-kernel", Fault::Throttle(100_000));
    r.mirror.fault("index.sjson", Fault::Throttle(1_000));
    write_stream(
        &r.env.mirror,
        &products("20261120", 1 << 20),
        &r.key,
        SHA512,
    );
    assert_eq!(post_sync(&s).0, 202);
    // From its start the sync shows its own progress, not the last sync's figures.
    let mut st = serde_json::Value::Null;
    wait_until(Duration::from_secs(10), "the sync to start", || {
        st = s.status();
        st["sync_running"] == true
    });
    let p = &st["progress"];
    assert!(
        p["bytes_total"] == 0 || p["bytes_done"] != p["bytes_total"],
        "the last sync's progress: {st}"
    );
    wait_until(
        Duration::from_secs(30),
        "a sync in progress with bytes done",
        || {
            st = s.status();
            st["progress"]["bytes_done"].as_u64().unwrap_or(0) > 0
        },
    );
    assert_eq!(st["sync"]["running"], true, "{st}");
    assert_eq!(st["sync_running"], true, "{st}");
    let p = &st["progress"];
    assert!(p["bytes_total"].as_u64().unwrap() >= 1 << 20, "{st}");
    assert!(p["files_total"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        p["bytes_done"].as_u64().unwrap() < p["bytes_total"].as_u64().unwrap(),
        "{st}"
    );
    // The CLI shows it too.
    let human = r.env.ok(&["status", "--url", &s.url("/")]);
    assert!(human.contains("sync running: yes, "), "{human}");
    s.wait_generation(2, Duration::from_secs(60));
    // The new generation is served from the moment it is published; the sync then
    // collects garbage and writes its state before it counts as finished.
    wait_until(Duration::from_secs(30), "the sync to finish", || {
        s.status()["sync"]["running"] == false
    });
    let st = s.status();
    assert!(st["progress"].is_null(), "{st}");
    assert_eq!(st["sync"]["running"], false);
    assert_eq!(st["sync"]["last_result"], "ok");
}
