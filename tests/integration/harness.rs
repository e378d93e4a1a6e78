//! Test environment: a temp dir holding a state dir, a config and a mirror tree, and
//! helpers to run the real `rackboot` binary with a deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_rackboot");

pub struct Env {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub config: PathBuf,
    pub mirror: PathBuf,
    pub keyring: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("rackboot-test-")
            .tempdir()
            .unwrap();
        let state = dir.path().join("state");
        let mirror = dir.path().join("mirror");
        std::fs::create_dir_all(&mirror).unwrap();
        Env {
            config: dir.path().join("rackboot.toml"),
            keyring: dir.path().join("keyring.gpg"),
            state,
            mirror,
            dir,
        }
    }

    /// Writes a config with one source and the given selection arches; `extra` is
    /// appended verbatim (other tables).
    pub fn write_config(&self, url: &str, arches: &[&str], extra: &str) {
        let arches = arches
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            r#"state_dir = "{state}"

[sync]
timeout = "5s"
{extra}

[[sources]]
url = "{url}"
keyring_filename = "{keyring}"

[[sources.selections]]
os = "ubuntu"
release = "noble"
arches = [{arches}]
"#,
            state = self.state.display(),
            keyring = self.keyring.display(),
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(&self.config).args(args);
        c.env("RACKBOOT_LOG", "info");
        c.env_remove("RACKBOOT_CONFIG");
        c.stdin(Stdio::null());
        c
    }

    /// Runs rackboot to completion (at most `limit`), returning its output.
    pub fn run_for(&self, args: &[&str], limit: Duration) -> Output {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, limit)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_for(args, Duration::from_secs(120))
    }

    /// Runs and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "rackboot {args:?} failed: {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and asserts failure with `code`, returning stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(
            out.status.code(),
            Some(code),
            "rackboot {args:?}: expected exit {code}\nstdout:\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    pub fn current(&self) -> PathBuf {
        self.state.join("current")
    }

    /// Everything a failed sync must leave untouched: where `current` points, every
    /// file of the blob store and the snapshots with its hash, and the state files.
    pub fn fingerprint(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert(
            "current".into(),
            std::fs::read_link(self.current())
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        for sub in ["blobs", "snapshots", "state.json", "sources.json"] {
            walk(&self.state.join(sub), &self.state, &mut out);
        }
        out
    }

    /// Blob digests present in the store.
    pub fn blobs(&self) -> Vec<String> {
        let mut out = BTreeMap::new();
        walk(&self.state.join("blobs"), &self.state, &mut out);
        out.keys()
            .map(|k| k.rsplit('/').next().unwrap().to_string())
            .collect()
    }
}

fn walk(p: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return;
    };
    let rel = p.strip_prefix(base).unwrap().display().to_string();
    if meta.is_symlink() {
        out.insert(
            rel,
            format!("-> {}", std::fs::read_link(p).unwrap().display()),
        );
    } else if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            walk(&e, base, out);
        }
    } else {
        out.insert(rel, file_sha256(p));
    }
}

pub fn file_sha256(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// Waits for a child with a deadline; kills it (by PID, via the handle) on timeout.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "process did not finish within {limit:?}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `rackboot serve`; stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Served {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub tftp: SocketAddr,
    pub http: SocketAddr,
}

use std::net::SocketAddr;

impl Env {
    /// Starts `rackboot serve` (the config must listen on port 0) and waits for its
    /// listening lines.
    pub fn serve(&self) -> Served {
        let log = self.dir.path().join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = self
            .command(&["serve"])
            .env("RACKBOOT_LOG", "info,rackboot=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut served = Served {
            child: Some(child),
            log,
            tftp: "0.0.0.0:0".parse().unwrap(),
            http: "0.0.0.0:0".parse().unwrap(),
        };
        // Whole lines only: a line read before its newline could end mid-port.
        let find = |text: &str, what: &str| -> Option<SocketAddr> {
            text.split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .find_map(|l| l.split(&format!("listening for {what} on ")).nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = served.log_text();
            if let (Some(t), Some(h)) = (find(&text, "TFTP"), find(&text, "HTTP")) {
                served.tftp = t;
                served.http = h;
                return served;
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
}

impl Served {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// GET with curl; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        curl(&[&self.url(path)])
    }

    /// The daemon's status document.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/api/v1/status");
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits until the served generation is at least `n`.
    pub fn wait_generation(&self, n: u64, limit: Duration) {
        wait_until(limit, &format!("generation {n}"), || {
            self.status()["generation"].as_u64().is_some_and(|g| g >= n)
        });
    }

    /// Sends a signal by PID.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit; returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "rackboot serve did not exit within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs curl (with a time limit) and returns (HTTP status, body).
pub fn curl(args: &[&str]) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "60", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (code, std::fs::read(&body).unwrap_or_default())
}

/// Runs a client program with a time limit; returns its output.
pub fn run_client(program: &str, args: &[&str], limit: Duration) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
    wait_output(child, limit)
}
