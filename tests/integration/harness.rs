//! Test environment: a temp dir holding a state dir, a config and a mirror tree, and
//! helpers to run the real `rackboot` binary with a deadline, and every helper more
//! than one feature file uses: racks, the token, metrics, a TFTP client. A failing
//! test prints its daemon's log tail and keeps its directory.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sequoia_openpgp::types::HashAlgorithm;
use sha2::{Digest, Sha256};

use crate::upstream::{
    bootloaders, image, write_stream, MirrorServer, ProductSpec, Signing, TestKey,
};

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
        let head = format!(
            "state_dir = \"{}\"\n\n[sync]\ntimeout = \"5s\"\n{extra}\n",
            self.state.display()
        );
        std::fs::write(&self.config, head).unwrap();
        self.add_source(url, "noble", arches);
    }

    /// Appends a `[[sources]]` table to the config: `url`, checked with the keyring,
    /// and one selection of Ubuntu `release` for `arches`.
    pub fn add_source(&self, url: &str, release: &str, arches: &[&str]) {
        let arches = arches
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let table = format!(
            r#"
[[sources]]
url = "{url}"
keyring_filename = "{keyring}"

[[sources.selections]]
os = "ubuntu"
release = "{release}"
arches = [{arches}]
"#,
            keyring = self.keyring.display(),
        );
        let mut config = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .unwrap();
        std::io::Write::write_all(&mut config, table.as_bytes()).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_via(&[], args)
    }

    /// [`Env::command`] run through `launcher` (such as `ip netns exec NAME`, which
    /// execs it: the PID is rackboot's).
    pub fn command_via(&self, launcher: &[&str], args: &[&str]) -> Command {
        let mut c = match launcher.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        c.arg("--config").arg(&self.config).args(args);
        c.env("RACKBOOT_LOG", "info");
        c.env_remove("RACKBOOT_CONFIG");
        c.stdin(Stdio::null());
        c
    }

    /// Starts rackboot with `args`, its output piped (for [`wait_output`]).
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs rackboot to completion (at most `limit`), returning its output.
    pub fn run_for(&self, args: &[&str], limit: Duration) -> Output {
        wait_output(self.spawn(args), limit)
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

    /// The generation `current` names on disk.
    pub fn current_generation(&self) -> Option<u64> {
        std::fs::read_link(self.current())
            .ok()?
            .file_name()?
            .to_str()?
            .parse()
            .ok()
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

use std::net::{SocketAddr, UdpSocket};

use rackboot::tftp::packet::{self, Packet};

impl Env {
    /// Starts `rackboot serve` (the config must listen on port 0) and waits for its
    /// listening lines.
    pub fn serve(&self) -> Served {
        self.serve_with(&["TFTP", "HTTP"], |_| {}).0
    }

    /// [`Env::serve`], then waits (at most 60 s) until generation 1 is served and its
    /// sync has ended (a generation is served from publish on, before the run is
    /// counted in the status and `/metrics`).
    pub fn serve_synced(&self) -> Served {
        let s = self.serve();
        s.wait_synced(1, Duration::from_secs(60));
        s
    }

    /// Starts `rackboot serve` with `customize` applied to the command and waits for
    /// the `listening for {what} on ADDR` lines; returns the addresses in that order.
    pub fn serve_with(
        &self,
        what: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> (Served, Vec<SocketAddr>) {
        self.serve_via(&[], what, customize)
    }

    /// [`Env::serve_with`], started through `launcher` ([`Env::command_via`]).
    pub fn serve_via(
        &self,
        launcher: &[&str],
        what: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> (Served, Vec<SocketAddr>) {
        let log = self.dir.path().join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = self.command_via(launcher, &["serve"]);
        cmd.env("RACKBOOT_LOG", "info,rackboot=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        customize(&mut cmd);
        let mut served = Served {
            child: Some(cmd.spawn().unwrap()),
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
            let found: Option<Vec<SocketAddr>> = what.iter().map(|w| find(&text, w)).collect();
            if let Some(addrs) = found {
                for (w, a) in what.iter().zip(&addrs) {
                    match *w {
                        "HTTP" => served.http = *a,
                        "TFTP" => served.tftp = *a,
                        _ => {}
                    }
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

    /// GET `path`, which must answer 200 with UTF-8: the text.
    pub fn get_text(&self, path: &str) -> String {
        let (code, body) = self.get(path);
        assert_eq!(code, 200, "GET {path}");
        String::from_utf8(body).unwrap()
    }

    /// Each path, sent as it is (no client-side cleaning), gets a 400 or 404 and no
    /// line of `/etc/passwd`.
    pub fn assert_traversals_refused(&self, paths: &[&str]) {
        for p in paths {
            let (code, body) = curl(&["--path-as-is", &self.url(p)]);
            assert!(code == 400 || code == 404, "{p}: {code}");
            assert!(!String::from_utf8_lossy(&body).contains("root:"), "{p}");
        }
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

    /// Waits until generation `n` is served and no sync runs: the daemon serves a
    /// generation as soon as `current` names it, before the sync that published it
    /// has ended.
    pub fn wait_synced(&self, n: u64, limit: Duration) {
        wait_until(
            limit,
            &format!("generation {n} and no sync running"),
            || {
                let st = self.status();
                st["generation"].as_u64().is_some_and(|g| g >= n) && st["sync_running"] == false
            },
        );
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
        if std::thread::panicking() {
            eprintln!("{}", log_tail(&self.log, LOG_TAIL_LINES));
        }
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
    curl_via(&[], 60, args)
}

/// [`curl`] that must answer 200 with UTF-8: the text.
pub fn curl_text(args: &[&str]) -> String {
    let (code, body) = curl(args);
    assert_eq!(code, 200, "curl {args:?}");
    String::from_utf8(body).unwrap()
}

/// curl started through `launcher` (nothing, or `ip netns exec NAME`), given
/// `max_time` seconds: (HTTP status, body).
fn curl_via(launcher: &[&str], max_time: u64, args: &[&str]) -> (u16, Vec<u8>) {
    let max = max_time.to_string();
    let mut all = launcher.to_vec();
    all.extend([
        "curl",
        "-s",
        "--max-time",
        &max,
        "-o",
        OUT,
        "-w",
        "%{http_code}",
    ]);
    all.extend_from_slice(args);
    let (out, body) = run_client_to_file(all[0], &all[1..], Duration::from_secs(max_time + 10));
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (code, body.unwrap_or_default())
}

/// A curl download held to `--limit-rate`, so that it spans what a test does next
/// (a snapshot switch, syncs, SIGTERM); killed on drop if not finished.
pub struct SlowDownload {
    _dir: tempfile::TempDir,
    out: PathBuf,
    child: Option<Child>,
}

impl SlowDownload {
    /// Starts downloading `url` at `rate` and waits until the first bytes are in.
    pub fn start(url: &str, rate: &str) -> SlowDownload {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("slow");
        let child = Command::new("curl")
            .args(["-s", "--max-time", "60", "--limit-rate", rate, "-o"])
            .arg(&out)
            .arg(url)
            .spawn()
            .expect("curl is installed");
        wait_until(
            Duration::from_secs(10),
            "the slow download to start",
            || std::fs::metadata(&out).is_ok_and(|m| m.len() > 0),
        );
        SlowDownload {
            _dir: dir,
            out,
            child: Some(child),
        }
    }

    /// Waits (at most `limit`) for curl to succeed; returns what it downloaded.
    pub fn finish(mut self, limit: Duration) -> Vec<u8> {
        let res = wait_output(self.child.take().unwrap(), limit);
        assert!(res.status.success(), "slow download: {:?}", res.status);
        std::fs::read(&self.out).unwrap()
    }
}

impl Drop for SlowDownload {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Fails with `what`, the exit status and stderr unless `out` is a success.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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

/// The argument of [`run_client_to_file`] that stands for the file the client writes.
pub const OUT: &str = "{OUT}";

/// [`run_client`] with [`OUT`] in `args` replaced by a fresh temporary file: the
/// output, and what the client wrote there (`None` when it wrote no file).
pub fn run_client_to_file(
    program: &str,
    args: &[&str],
    limit: Duration,
) -> (Output, Option<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out");
    let path = file.to_str().unwrap();
    let args: Vec<&str> = args
        .iter()
        .map(|&a| if a == OUT { path } else { a })
        .collect();
    let out = run_client(program, &args, limit);
    (out, std::fs::read(&file).ok())
}

// ---------------------------------------------------------------------------
// A failing test keeps its evidence

/// How much of a daemon's log a failing test prints.
pub const LOG_TAIL_LINES: usize = 40;

/// The last `n` lines of `log`, framed with its path. The harness's own status polls
/// (every 20 ms while a test waits) are left out: they would fill the tail.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (polls, lines): (Vec<&str>, Vec<&str>) = text
        .lines()
        .partition(|l| l.contains("method=GET path=/api/v1/status status=200"));
    let tail = &lines[lines.len().saturating_sub(n)..];
    format!(
        "--- last {} lines of {} ({} status polls left out) ---\n{}\n--- end of {} ---",
        tail.len(),
        log.display(),
        polls.len(),
        tail.join("\n"),
        log.display()
    )
}

impl Drop for Env {
    // A failing test keeps its directory (state, config, mirror, daemon logs) for a
    // post-mortem; a passing one cleans up as before.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "test failed: kept its directory {}",
                self.dir.path().display()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Racks: a fake signed upstream, a config and (on demand) a serving daemon

pub const SHA512: Signing = Signing::Signed(HashAlgorithm::SHA512);

/// Both listeners on 127.0.0.1, port 0 (the daemon logs the ports it got).
pub const LISTEN: &str = "[tftp]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = [\"127.0.0.1:0\"]\n";

pub const KERNEL: &str = "/ubuntu/amd64/generic/noble/stable/boot-kernel";

/// A noble amd64 image of `version` with a kernel of `kernel_size`, and bootloaders.
pub fn products(version: &str, kernel_size: usize) -> Vec<ProductSpec> {
    let mut p = vec![image("noble", "amd64", version, kernel_size)];
    p.extend(bootloaders("20210819.0"));
    p
}

/// The kernel bytes of [`products`] at `version`.
pub fn kernel_of(version: &str, size: usize) -> Vec<u8> {
    image("noble", "amd64", version, size)
        .versions
        .into_values()
        .next()
        .unwrap()[0]
        .data
        .clone()
}

impl Env {
    /// A fresh signing key in the env's keyring and a stream of `products` signed
    /// with it (SHA-512) in its mirror dir, served on 127.0.0.1.
    pub fn signed_upstream(&self, products: &[ProductSpec]) -> (TestKey, MirrorServer) {
        let key = TestKey::generate();
        key.write_keyring(&self.keyring);
        write_stream(&self.mirror, products, &key, SHA512);
        (key, MirrorServer::start(&self.mirror))
    }
}

pub struct Rack {
    pub env: Env,
    pub key: TestKey,
    pub mirror: MirrorServer,
}

/// A rack with a signed upstream of [`products`] at 20261101, configured with
/// `sync_extra` in `[sync]` and `extra` after the [`LISTEN`] tables; not serving yet.
pub fn rack(kernel_size: usize, sync_extra: &str, extra: &str) -> Rack {
    let env = Env::new();
    let (key, mirror) = env.signed_upstream(&products("20261101", kernel_size));
    env.write_config(
        &mirror.url(),
        &["amd64"],
        &format!("{sync_extra}\n{LISTEN}{extra}"),
    );
    Rack { env, key, mirror }
}

impl Rack {
    /// Publishes [`products`] at `version` (signed) in place of the upstream's stream.
    pub fn publish(&self, version: &str, kernel_size: usize) {
        write_stream(
            &self.env.mirror,
            &products(version, kernel_size),
            &self.key,
            SHA512,
        );
    }
}

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

/// `POST /api/v1/sync` with [`TOKEN`].
pub fn post_sync(s: &Served) -> (u16, Vec<u8>) {
    curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &s.url("/api/v1/sync"),
    ])
}

// ---------------------------------------------------------------------------
// Clients and parsers shared by the feature files

/// A port that was free a moment ago (for configs that must name a fixed port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// The value of one sample line (`name{labels} value`) in a metrics text.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {sample:?} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

impl Served {
    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        self.get_text("/metrics")
    }

    /// One sample of `/metrics` (see [`metric`]).
    pub fn metric(&self, sample: &str) -> f64 {
        metric(&self.metrics(), sample)
    }
}

/// Response heads as curl prints them for `args` (the body is dropped).
pub fn curl_heads(args: &[&str]) -> String {
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
}

impl Served {
    /// A client that asks for `path` over HTTP/1.1 and reads nothing, once the
    /// daemon counts its transfer (the only one) in flight.
    pub fn stalled_get(&self, path: &str) -> std::net::TcpStream {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(self.http).unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        wait_until(Duration::from_secs(20), "the transfer to start", || {
            self.metric("rackboot_http_transfers_in_flight") == 1.0
        });
        c
    }
}

/// Fetches `path` with curl's TFTP client from the rack; `None` when refused.
pub fn tftp_get(s: &Served, path: &str) -> Option<String> {
    tftp_get_at(&s.tftp.to_string(), path)
}

/// Fetches `path` with curl's TFTP client from `authority` (`host:port`); `None` (and
/// curl's complaint on stderr) when the server refuses it.
pub fn tftp_get_at(authority: &str, path: &str) -> Option<String> {
    match curl_download(&format!("tftp://{authority}/{path}"), &[]) {
        Ok(data) => Some(String::from_utf8_lossy(&data).into_owned()),
        Err(e) => {
            eprintln!("curl tftp {path}: {e}");
            None
        }
    }
}

/// Downloads `url` with curl (`extra` options before it, such as `--tftp-blksize`);
/// the bytes, or curl's complaint.
pub fn curl_download(url: &str, extra: &[&str]) -> Result<Vec<u8>, String> {
    curl_download_within(url, extra, 60)
}

/// [`curl_download`] given `max_time` seconds.
pub fn curl_download_within(url: &str, extra: &[&str], max_time: u64) -> Result<Vec<u8>, String> {
    let max = max_time.to_string();
    let mut args = vec!["-sS", "--max-time", &max];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-o", OUT, url]);
    let (res, data) = run_client_to_file("curl", &args, Duration::from_secs(max_time + 10));
    if !res.status.success() {
        return Err(String::from_utf8_lossy(&res.stderr).into_owned());
    }
    Ok(data.unwrap_or_default())
}

/// [`curl_download`] that must succeed; `what` names the download in the failure.
pub fn curl_fetch(url: &str, extra: &[&str], what: &str) -> Vec<u8> {
    curl_download(url, extra).unwrap_or_else(|e| panic!("curl {what} ({url}): {e}"))
}

/// A self-signed certificate for 127.0.0.1 and localhost, made with openssl.
pub fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
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
    assert_success(&out, "openssl");
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

/// Reads one HTTP/1.1 response with a Content-Length body from `c`.
pub fn read_response(c: &mut std::net::TcpStream) -> (String, Vec<u8>) {
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
fn a_failing_test_keeps_its_directory_and_its_daemon_log() {
    // A test thread that starts a daemon and then fails, as a real test would.
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = std::thread::spawn(move || {
        let r = rack(4096, "auto = false", "");
        let s = r.env.serve();
        assert!(s.status()["generation"].is_null() || s.status()["generation"].is_u64());
        tx.send((r.env.dir.path().to_path_buf(), s.log.clone(), s.pid()))
            .unwrap();
        panic!("this test fails on purpose");
    })
    .join();
    assert!(failed.is_err());
    let (dir, log, pid) = rx.recv().unwrap();
    // The daemon was stopped, its directory and log are still there, and the tail the
    // guard printed holds the daemon's last lines.
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
        "the daemon of a failed test was left running"
    );
    assert!(dir.join("rackboot.toml").is_file(), "{dir:?} was removed");
    let tail = log_tail(&log, LOG_TAIL_LINES);
    assert!(tail.contains("listening for HTTP on"), "{tail}");
    assert!(!tail.contains("path=/api/v1/status"), "{tail}");
    assert!(tail.lines().count() <= LOG_TAIL_LINES + 2, "{tail}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// TFTP racks and raw clients

pub const LISTEN_RACK_KERNEL: usize = 3 << 20;

/// A synced rack (kernel of [`LISTEN_RACK_KERNEL`] bytes, version 20261101) whose config has `listen` as the TFTP
/// addresses and `tftp_extra` in its `[tftp]` table; serving, generation 1 published.
pub struct ListenRack {
    // Field order is drop order: stop the daemon before its files go.
    pub served: Served,
    _mirror: MirrorServer,
    _env: Env,
}

pub fn listen_rack(listen: &[&str], tftp_extra: &str) -> ListenRack {
    let env = Env::new();
    let mut products = vec![image("noble", "amd64", "20261101", LISTEN_RACK_KERNEL)];
    products.extend(bootloaders("20210819.0"));
    let (_key, mirror) = env.signed_upstream(&products);
    let listen = listen
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    env.write_config(
        &mirror.url(),
        &["amd64"],
        &format!(
            "auto = false\n[tftp]\nlisten = [{listen}]\n{tftp_extra}\n[http]\nlisten = [\"127.0.0.1:0\"]\n"
        ),
    );
    let served = env.serve_synced();
    ListenRack {
        served,
        _mirror: mirror,
        _env: env,
    }
}

/// A raw client socket on `local` (port 0) with a read timeout.
pub fn client(local: &str, timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind(local).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s
}

/// The next datagram on `sock` and where it came from; fails naming `what` when
/// none comes within the socket's timeout.
pub fn recv(sock: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 70000];
    let (n, from) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no {what}: {e}"));
    (buf[..n].to_vec(), from)
}

/// Sends an RRQ for `name` to `server` and returns the first reply and where it came
/// from.
pub fn first_reply(
    sock: &UdpSocket,
    server: SocketAddr,
    name: &str,
    opts: &[(&str, &str)],
) -> (Vec<u8>, SocketAddr) {
    sock.send_to(&packet::rrq(name, "octet", opts), server)
        .unwrap();
    recv(sock, &format!("reply from {server}"))
}

/// Finishes a download the server has answered (OACK or DATA 1 in `first`, from the
/// transfer port `peer`) as an RFC 7440 client; `poke` runs once, after the first
/// window. Returns the file; fails on a packet from any other port.
pub fn finish_download(
    sock: &UdpSocket,
    first: Vec<u8>,
    peer: SocketAddr,
    mut poke: impl FnMut(),
) -> Vec<u8> {
    let (mut bs, mut ws) = (512usize, 1u64);
    let mut out = Vec::new();
    let (mut expect, mut in_window) = (1u64, 0u64);
    let mut pending = Some(first);
    let mut poked = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let pkt = match pending.take() {
            Some(p) => p,
            None => {
                let (pkt, from) = recv(sock, "packet within the timeout");
                assert_eq!(from, peer, "a packet from a second transfer port");
                pkt
            }
        };
        match packet::parse(&pkt).expect("a TFTP packet") {
            Packet::Oack { options } => {
                assert!(expect == 1, "an OACK in the middle of the transfer");
                for (k, v) in options {
                    match k.as_str() {
                        "blksize" => bs = v.parse().unwrap(),
                        "windowsize" => ws = v.parse().unwrap(),
                        _ => {}
                    }
                }
                sock.send_to(&packet::ack(0), peer).unwrap();
            }
            Packet::Data { block, data } => {
                if block == (expect % 65536) as u16 {
                    out.extend_from_slice(data);
                    in_window += 1;
                    if data.len() < bs {
                        sock.send_to(&packet::ack(block), peer).unwrap();
                        return out;
                    }
                    expect += 1;
                    if in_window == ws {
                        in_window = 0;
                        if !poked {
                            poked = true;
                            poke();
                        }
                        sock.send_to(&packet::ack(block), peer).unwrap();
                    }
                } else if block != ((expect - 1) % 65536) as u16 {
                    in_window = 0;
                    sock.send_to(&packet::ack(((expect - 1) % 65536) as u16), peer)
                        .unwrap();
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("download did not finish within 60 s");
}

impl Env {
    /// Every file, directory entry and link under the state dir, files with their
    /// hash: equal before and after means nothing there was written.
    pub fn state_tree(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        walk(&self.state, &self.state, &mut out);
        out
    }
}

impl Served {
    /// The boot log: `GET /api/v1/boots`, or `/api/v1/boots/<mac>`.
    pub fn boots(&self, mac: Option<&str>) -> serde_json::Value {
        let path = match mac {
            Some(m) => format!("/api/v1/boots/{m}"),
            None => "/api/v1/boots".into(),
        };
        let (code, body) = self.get(&path);
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
        json(&body)
    }

    /// Waits (at most 30 s) until `mac`'s boot log holds `n` events, and returns it:
    /// an HTTP request is logged when its response body is dropped, just after the
    /// client has the last byte.
    pub fn boots_with(&self, mac: &str, n: usize) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        wait_until(Duration::from_secs(30), "boot log events", || {
            let (code, body) = self.get(&format!("/api/v1/boots/{mac}"));
            if code == 200 {
                last = json(&body);
            }
            last["event_list"].as_array().is_some_and(|e| e.len() >= n)
        });
        last
    }
}

/// curl with its source address set to `from` (any 127.0.0.0/8 address is this
/// host's), as if another machine asked: (HTTP status, body).
pub fn curl_from(from: &str, url: &str) -> (u16, Vec<u8>) {
    curl(&["--interface", from, url])
}

/// Fetches `path` with curl's TFTP client from source address `from`: the bytes, or
/// curl's complaint (which names the TFTP error).
pub fn tftp_from(s: &Served, from: &str, path: &str) -> Result<Vec<u8>, String> {
    curl_download(&format!("tftp://{}/{path}", s.tftp), &["--interface", from])
}

// ---------------------------------------------------------------------------
// Network namespaces (ProxyDHCP needs real interfaces and ports 67/4011)

/// A network namespace of this test run (a unique name), deleted on drop, also when
/// the test panics. Namespaces left by a run that was killed are swept by the next.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        sweep_stale_namespaces();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = Netns {
            name: format!("rbt-{}-{n}-{tag}", std::process::id()),
        };
        run_ok("ip", &["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS…`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        run_ok("ip", &[&["-n", self.name.as_str()], args].concat());
    }

    /// The launcher that runs a program inside: `ip netns exec NAME`.
    pub fn exec(&self) -> [&str; 4] {
        ["ip", "netns", "exec", self.name.as_str()]
    }

    /// Runs `f` on a thread that entered the namespace: sockets it makes live there
    /// (and keep working from any thread).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let fd = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd we own.
            let rc = unsafe { nix::libc::setns(fd.as_raw_fd(), nix::libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// A `veth` pair, `here` in this namespace with `here_addr` (CIDR), `there` in
    /// `other` with `there_mac` and `there_addr`; both up.
    pub fn veth(
        &self,
        here: &str,
        here_addr: &str,
        other: &Netns,
        there: &str,
        there_mac: &str,
        there_addr: &str,
    ) {
        self.veth_port(here, other, there, there_mac, there_addr);
        self.ip(&["addr", "add", here_addr, "dev", here]);
    }

    /// [`Netns::veth`] without an address on `here` (a bridge port).
    pub fn veth_port(
        &self,
        here: &str,
        other: &Netns,
        there: &str,
        there_mac: &str,
        there_addr: &str,
    ) {
        run_ok(
            "ip",
            &[
                "link",
                "add",
                "name",
                here,
                "netns",
                &self.name,
                "type",
                "veth",
                "peer",
                "name",
                there,
                "netns",
                &other.name,
            ],
        );
        self.ip(&["link", "set", here, "up"]);
        other.ip(&["link", "set", there, "address", there_mac]);
        other.ip(&["addr", "add", there_addr, "dev", there]);
        other.ip(&["link", "set", there, "up"]);
    }

    /// GET `url` with curl from inside; (status, body).
    pub fn curl(&self, url: &str) -> (u16, Vec<u8>) {
        curl_via(&["ip", "netns", "exec", &self.name], 20, &[url])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `program` (at most 30 s) and asserts it succeeded.
fn run_ok(program: &str, args: &[&str]) {
    let out = run_client(program, args, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes `rbt-PID-…` namespaces whose test process is gone.
fn sweep_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix("rbt-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
