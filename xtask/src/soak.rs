//! `cargo xtask soak [--minutes M]` (default 2, what CI runs): rackboot `serve`
//! syncing every 2 s from an upstream that changes every few seconds, while TFTP and
//! HTTP clients download and verify the kernel and initrd without pause.
//!
//! Each round publishes a new version of an unsigned `file://` stream (new kernel and
//! initrd bytes, the previous version kept, older ones deleted, as mirrors do); every
//! fifth round is a fault: the new version's kernel does not match its listed sha256,
//! which rackboot must refuse while it goes on serving what it has. A download counts
//! as verified when its size and sha256 are those of a good published version; bytes of
//! the faulty version or of nothing published are a failure.
//!
//! At the end the server must have: grown its RSS by less than 32 MiB and its open fds
//! by fewer than 64 since the baseline (taken after the first sync), at most 3
//! snapshots on disk, served the newest good version, and no client failure. One
//! summary line of counts is printed.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::bench::storm::{http_get, tftp_get, Fetch};
use crate::prereq::{self, cmd};

const ROUND: Duration = Duration::from_secs(3);
const IMAGE: &str = "soak/amd64/generic/soak/stable";
const RSS_GROWTH_MAX_KIB: u64 = 32 * 1024;
const FD_GROWTH_MAX: usize = 64;
const SNAPSHOTS_MAX: usize = 3;

/// rackboot, killed (by PID, through its handle) on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (size, sha256) of payloads.
type Digests = Arc<Mutex<HashSet<(u64, String)>>>;

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    crate::bench::pseudo_random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), len)
}

fn digest(d: &[u8]) -> (u64, String) {
    (d.len() as u64, hex::encode(Sha256::digest(d)))
}

/// The upstream mirror: writes version `n` (payloads first, then the product
/// document by rename), keeping version `n - 1`.
struct Upstream {
    dir: PathBuf,
    /// Versions listed now: (version, items JSON).
    listed: Vec<(u64, serde_json::Value)>,
}

impl Upstream {
    fn publish(&mut self, n: u64, fault: bool, good: &Digests) -> Result<()> {
        let mut items = serde_json::Map::new();
        for (k, (name, len)) in [
            ("boot-kernel", 256 << 10),
            ("boot-initrd", 1 << 20),
            ("squashfs", 4096),
        ]
        .into_iter()
        .enumerate()
        {
            let data = bytes(n * 8 + k as u64, len);
            let path = format!("soak/{n}/{name}");
            let p = self.dir.join(&path);
            std::fs::create_dir_all(p.parent().expect("parent"))?;
            std::fs::write(&p, &data)?;
            let (size, mut sha) = digest(&data);
            if name != "squashfs" {
                if fault && name == "boot-kernel" {
                    // Listed with another payload's digest: the download must be refused.
                    sha = hex::encode(Sha256::digest(b"not the kernel"));
                } else if !fault {
                    good.lock().expect("lock").insert((size, sha.clone()));
                }
            }
            items.insert(
                name.into(),
                json!({"ftype": name, "path": path, "size": size, "sha256": sha}),
            );
        }
        self.listed.push((n, serde_json::Value::Object(items)));
        while self.listed.len() > 2 {
            let (old, _) = self.listed.remove(0);
            let _ = std::fs::remove_dir_all(self.dir.join(format!("soak/{old}")));
        }
        let versions: serde_json::Map<String, serde_json::Value> = self
            .listed
            .iter()
            .map(|(v, items)| (format!("{v:08}"), json!({"items": items})))
            .collect();
        let doc = json!({"format": "products:1.0", "content_id": "soak:v3:download", "products": {
            "soak:amd64": {"os": "soak", "release": "soak", "arch": "amd64", "subarch": "generic",
                "label": "stable", "versions": versions}}});
        // The products document, then the index (whose `updated` a mirror bumps with
        // every change), each replaced by rename.
        let updated = format!("Fri, 04 Dec 2026 00:00:00 +0000 (round {n})");
        let index = json!({"format": "index:1.0", "updated": updated, "index": {"soak:v3:download": {
            "format": "products:1.0", "updated": updated, "path": "streams/v1/soak.json"}}});
        for (name, doc) in [("soak.json", doc), ("index.json", index)] {
            let tmp = self.dir.join(format!("streams/v1/{name}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec(&doc)?)?;
            std::fs::rename(&tmp, self.dir.join("streams/v1").join(name))?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counts {
    http: AtomicU64,
    tftp: AtomicU64,
    failures: AtomicU64,
}

fn rss_kib(pid: u32) -> u64 {
    crate::proc::status_kib(pid, "VmRSS").unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn run(args: &[String]) -> Result<()> {
    let minutes: f64 = match args {
        [] => 2.0,
        [flag, m] if flag == "--minutes" => m.parse().context("--minutes: a number")?,
        _ => bail!("usage: cargo xtask soak [--minutes M]"),
    };
    if !(minutes > 0.0 && minutes <= 24.0 * 60.0) {
        bail!("--minutes: must be more than 0 and at most a day");
    }
    let root = crate::root();
    std::env::set_current_dir(&root)?;
    cmd(
        "cargo",
        &["build", "--package", "rackboot", "--bin", "rackboot"],
    )?;
    let target = prereq::target_dir(&root);
    let bin = target.join("debug/rackboot");
    let dir = target.join(format!("soak-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(dir.join("stream/streams/v1"))?;
    soak(&bin, &dir, Duration::from_secs_f64(minutes * 60.0))?;
    // Kept when the soak fails (its rackboot.log says what the server did).
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn soak(bin: &Path, dir: &Path, length: Duration) -> Result<()> {
    let stream = dir.join("stream");
    let good: Digests = Arc::default();
    let mut up = Upstream {
        dir: stream.clone(),
        listed: vec![],
    };
    up.publish(1, false, &good)?;
    let tftp_port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let state = dir.join("state");
    let config = dir.join("rackboot.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[sync]\ninterval = \"2s\"\n[tftp]\nlisten = [\"127.0.0.1:{tftp_port}\"]\n[http]\nlisten = [\"127.0.0.1:{http_port}\"]\n[boot]\ndefault_image = \"soak/soak\"\n[[sources]]\nurl = \"file://{}/streams/v1/index.json\"\nunsigned = true\n[[sources.selections]]\nos = \"soak\"\nrelease = \"soak\"\n",
            state.display(),
            stream.display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("rackboot.log"))?;
    let server = Server(
        Command::new(bin)
            .args(["--config", config.to_str().context("utf-8")?, "serve"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start rackboot serve")?,
    );
    let pid = server.0.id();
    let http = (
        format!("127.0.0.1:{http_port}"),
        format!("/images/{IMAGE}/boot-kernel"),
    );
    let lo = Ipv4Addr::LOCALHOST;
    // Served once the first sync has published.
    let t = Instant::now();
    while http_get(lo, &http).is_err() {
        if t.elapsed() > Duration::from_secs(60) {
            bail!(
                "rackboot served nothing 60 s after start (log: {})",
                dir.join("rackboot.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (rss0, fds0) = (rss_kib(pid), fds(pid));
    let counts = Arc::new(Counts::default());
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tftp_server: SocketAddr = format!("127.0.0.1:{tftp_port}").parse()?;
    let mut clients = Vec::new();
    for c in 0..4 {
        let (counts, errors, stop, good) =
            (counts.clone(), errors.clone(), stop.clone(), good.clone());
        clients.push(std::thread::spawn(move || {
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let file = ["boot-kernel", "boot-initrd"][k % 2];
                k += 1;
                let got = if c % 2 == 0 {
                    http_get(
                        lo,
                        &(
                            format!("127.0.0.1:{http_port}"),
                            format!("/images/{IMAGE}/{file}"),
                        ),
                    )
                } else {
                    tftp_get(
                        IpAddr::V4(lo),
                        tftp_server,
                        &format!("{IMAGE}/{file}"),
                        1468,
                        4,
                        Fetch::Hash,
                    )
                };
                let verdict = got.and_then(|g| {
                    if good.lock().expect("lock").contains(&(g.len, g.sha.clone())) {
                        Ok(())
                    } else {
                        bail!(
                            "{file}: {} bytes with sha256 {}: no good version has it",
                            g.len,
                            g.sha
                        )
                    }
                });
                match verdict {
                    Ok(()) if c % 2 == 0 => counts.http.fetch_add(1, Ordering::Relaxed),
                    Ok(()) => counts.tftp.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        let mut errs = errors.lock().expect("lock");
                        if errs.len() < 5 {
                            errs.push(format!(
                                "{} {file}: {e:#}",
                                if c % 2 == 0 { "HTTP" } else { "TFTP" }
                            ));
                        }
                        counts.failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let started = Instant::now();
    let (mut rounds, mut faults, mut n) = (0u64, 0u64, 1u64);
    let mut last_good = 1u64;
    while started.elapsed() + ROUND < length {
        std::thread::sleep(ROUND);
        n += 1;
        rounds += 1;
        let fault = rounds % 5 == 0;
        faults += u64::from(fault);
        up.publish(n, fault, &good)?;
        if !fault {
            last_good = n;
        }
    }
    // The newest good version is served within a few sync intervals.
    let want = digest(&bytes(last_good * 8, 256 << 10));
    let t = Instant::now();
    let followed = loop {
        if http_get(lo, &http).is_ok_and(|g| (g.len, g.sha.clone()) == want) {
            break true;
        }
        if t.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let (rss1, fds1) = (rss_kib(pid), fds(pid));
    // A snapshot is a directory (with its manifest beside it as `N.json`).
    let snapshots = std::fs::read_dir(state.join("snapshots"))
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0);
    let alive = std::fs::metadata(format!("/proc/{pid}")).is_ok();
    drop(server);
    let (h, t, f) = (
        counts.http.load(Ordering::Relaxed),
        counts.tftp.load(Ordering::Relaxed),
        counts.failures.load(Ordering::Relaxed),
    );
    let log = std::fs::read_to_string(dir.join("rackboot.log")).unwrap_or_default();
    let published = log.matches("sync published generation").count();
    let refused = log.matches("sync failed").count();
    println!(
        "soak: {:.1} min, {rounds} rounds ({faults} faults), {published} syncs published, {refused} refused, {} files verified ({h} HTTP, {t} TFTP), {f} failures, RSS {:.1} -> {:.1} MiB, fds {fds0} -> {fds1}, {snapshots} snapshots",
        started.elapsed().as_secs_f64() / 60.0,
        h + t,
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
    );
    let mut wrong = Vec::new();
    if !alive {
        wrong.push("rackboot exited during the soak".to_string());
    }
    if f > 0 {
        wrong.push(format!(
            "{f} client failures: {}",
            errors.lock().expect("lock").join("; ")
        ));
    }
    if h == 0 || t == 0 {
        wrong.push("no HTTP or no TFTP download verified".into());
    }
    if rss1.saturating_sub(rss0) >= RSS_GROWTH_MAX_KIB {
        wrong.push(format!(
            "RSS grew {} KiB (bound {RSS_GROWTH_MAX_KIB})",
            rss1 - rss0
        ));
    }
    if fds1 >= fds0 + FD_GROWTH_MAX {
        wrong.push(format!(
            "open fds grew from {fds0} to {fds1} (bound +{FD_GROWTH_MAX})"
        ));
    }
    if snapshots > SNAPSHOTS_MAX {
        wrong.push(format!(
            "{snapshots} snapshots on disk (bound {SNAPSHOTS_MAX})"
        ));
    }
    if faults > 0 && refused == 0 {
        wrong.push("no faulty upstream version was refused".into());
    }
    if !followed {
        wrong.push(format!(
            "version {last_good} (the newest good one) was not served 20 s after the last round"
        ));
    }
    if !wrong.is_empty() {
        bail!(
            "soak: {} (server log: {})",
            wrong.join("; "),
            dir.join("rackboot.log").display()
        );
    }
    Ok(())
}
