//! Running under systemd: `sd_notify` READY/STATUS/WATCHDOG/STOPPING messages and
//! socket activation (plain and TLS sockets passed as `$LISTEN_FDS`).

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::upstream::*;

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
    let (mut s, _) = r.env.serve_with(&["TFTP", "HTTP"], |c| {
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
    r.publish("20261120", 64 << 10);
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
/// is given); stderr goes to `log_name` in the rack's directory. The rack is talked
/// to at `http` and `tftp` (the addresses of the passed sockets).
fn serve_activated(
    env: &Env,
    fds: &[std::os::fd::RawFd],
    names: Option<&str>,
    notify: Option<&Path>,
    log_name: &str,
    (http, tftp): (SocketAddr, SocketAddr),
) -> Served {
    use std::os::unix::process::CommandExt;
    let log = env.dir.path().join(log_name);
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
        .stderr(std::fs::File::create(&log).unwrap());
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
    Served {
        child: Some(cmd.spawn().unwrap()),
        log,
        tftp,
        http,
    }
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
    let s = serve_activated(
        &r.env,
        &[http.as_raw_fd(), tftp.as_raw_fd()],
        None,
        Some(&n.path),
        "activated.log",
        (http_addr, tftp_addr),
    );
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
    let got = curl_fetch(
        &format!("tftp://{tftp_addr}{KERNEL}"),
        &[],
        "TFTP on the passed socket",
    );
    assert_eq!(
        sha256_hex(&got),
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
    let s = serve_activated(
        &r.env,
        &[http.as_raw_fd(), https.as_raw_fd()],
        Some("http:https"),
        None,
        "activated-tls.log",
        (http_addr, "127.0.0.1:9".parse().unwrap()),
    );
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
    let mut refused = serve_activated(
        &plain.env,
        &[lone.as_raw_fd()],
        Some("https"),
        None,
        "activated-no-tls.log",
        (lone.local_addr().unwrap(), "127.0.0.1:9".parse().unwrap()),
    );
    let status = refused.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    let err = refused.log_text();
    assert!(
        err.contains(
            "systemd passed a socket named https, but http.tls_cert and http.tls_key are not set"
        ),
        "{err}"
    );
}
