//! `cargo xtask bench [tftp] [http] [sync]`: rackboot against its peers, measured in
//! the same run on loopback, results (Markdown + JSON) written to `bench/results/`.
//!
//! A bench stream (unsigned, `file://`) with a 64 MiB kernel, a 4 MiB initrd and a
//! 200 MiB squashfs is synced by the shipped binary (static musl, `dist` profile); the peers serve the very same
//! snapshot directory.
//! - tftp: one transfer at windowsize 1 and at windowsize 8 (blksize 1468), and 200
//!   and 1000 concurrent clients (4 MiB each, every download checked), against
//!   tftpd-hpa, dnsmasq and atftpd, with the atftp client and with xtask's own load
//!   generator. Peak RSS of rackboot is read from /proc.
//! - http: a 200 MiB file (curl, 15 interleaved rounds, median and best; 15 more
//!   with the servers pinned to CPU 1 and curl to CPU 0) and 1000
//!   concurrent keep-alive clients (wrk, 5 s, 2 rounds) against nginx with sendfile,
//!   both running at once; rackboot's peak RSS.
//! - sync: a full sync of the bench stream from a local mirror (file:// and http), and
//!   a no-op sync, against sstream-mirror (python-simplestreams from PyPI).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

mod http;
pub(crate) mod storm;
mod sync;
mod tftp;
use crate::prereq::{self, cmd};
/// Every server and client a bench starts, stopped on drop.
use crate::proc::Guard as Proc;

const KERNEL: &str = "bench/amd64/generic/bench/stable/boot-kernel";
const INITRD: &str = "bench/amd64/generic/bench/stable/boot-initrd";
const SQUASHFS: &str = "bench/amd64/generic/bench/stable/squashfs";

struct Bench {
    dir: PathBuf,
    bin: PathBuf,
    /// The release-built xtask binary (for `--loadgen`).
    xtask: PathBuf,
    snapshot: PathBuf,
    atftpd: PathBuf,
    results: BTreeMap<String, serde_json::Value>,
    report: String,
}

fn spawn(program: &Path, args: &[&str]) -> Result<Proc> {
    let mut c = Command::new(program);
    c.args(args);
    Proc::spawn_quiet(c, &program.display().to_string())
}

/// nginx with prefix `prefix` and config `conf` (which keeps it in the foreground),
/// stopped the way it expects: SIGTERM to the master, which takes its workers down (a
/// SIGKILL would leave them listening).
fn start_nginx(prefix: &Path, conf: &Path) -> Result<Proc> {
    let mut c = Command::new("nginx");
    c.args([
        "-p",
        prefix.to_str().context("utf-8")?,
        "-c",
        conf.to_str().context("utf-8")?,
    ]);
    Ok(Proc::spawn_quiet(c, "nginx")?.term_first(Duration::from_secs(5)))
}

pub(crate) fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut out);
    out
}

/// Writes an unsigned stream of one products document: `streams/v1/<name>.json` (the
/// given products) and an `index.json` naming it as `content_id`.
pub(crate) fn write_unsigned_stream(
    stream: &Path,
    content_id: &str,
    name: &str,
    products: &serde_json::Value,
) -> Result<()> {
    let rel = format!("streams/v1/{name}.json");
    std::fs::create_dir_all(stream.join("streams/v1"))?;
    std::fs::write(stream.join(&rel), serde_json::to_vec(products)?)?;
    std::fs::write(
        stream.join("streams/v1/index.json"),
        serde_json::to_vec(&json!({"format": "index:1.0", "index": {content_id: {
            "format": "products:1.0", "path": rel}}}))?,
    )?;
    Ok(())
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port_udp_ready(port: u16) {
    // The daemons bind quickly; give them a moment.
    let _ = port;
    std::thread::sleep(Duration::from_millis(400));
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1024.0 * 1024.0)
}

fn peak_rss_kib(pid: u32) -> u64 {
    crate::proc::status_kib(pid, "VmHWM").unwrap_or(0)
}

pub fn run(args: &[String]) -> Result<()> {
    if args.first().is_some_and(|a| a == "storm") {
        return storm::run(&args[1..]);
    }
    if args.first().is_some_and(|a| a == "--loadgen") {
        // The TFTP load generator, run as its own optimised process by `tftp_bench`.
        return crate::tftpload::cli(&args[1..]);
    }
    let all = args.is_empty();
    let want = |k: &str| all || args.iter().any(|a| a == k);
    let root = setup(&[
        "atftp",
        "tftpd-hpa",
        "dnsmasq-base",
        "nginx-light",
        "wrk",
        "curl",
    ])?;
    // The binary that ships: static musl, `dist` profile (fat LTO, mimalloc).
    let shipped = match std::env::consts::ARCH {
        "x86_64" => &crate::dist::X86_64,
        "aarch64" => &crate::dist::AARCH64,
        other => bail!("no release target for this machine's architecture {other}"),
    };
    crate::dist::prerequisites(&[shipped])?;
    let bin = crate::dist::cargo_build(shipped)?;
    if want("tftp") {
        // The load generator runs optimised, whatever profile `cargo xtask` used.
        cmd("cargo", &["build", "--release", "--package", "xtask"])?;
    }
    let target = prereq::target_dir(&root);
    let dir = target.join("bench");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let atftpd_root = target.join("xtask-cache/atftpd");
    if !atftpd_root.join("usr/sbin/atftpd").exists() {
        // atftpd and tftpd-hpa conflict as packages: unpack atftpd privately.
        prereq::ensure_foreign_debs(&native_arch()?, &["atftpd"], &atftpd_root)?;
    }
    let mut b = Bench {
        bin,
        xtask: target.join("release/xtask"),
        snapshot: PathBuf::new(),
        atftpd: atftpd_root.join("usr/sbin/atftpd"),
        dir,
        results: BTreeMap::new(),
        report: String::new(),
    };
    let stamp = output_stamp();
    writeln!(b.report, "# rackboot benchmarks ({stamp})\n")?;
    writeln!(
        b.report,
        "Loopback, {} cores; rackboot as shipped ({}, `dist` profile); peers from Debian 12.\n",
        num_cpus(),
        shipped.triple
    )?;
    b.sync_bench()?;
    if want("tftp") {
        b.tftp_bench()?;
    }
    if want("http") {
        b.http_bench()?;
    }
    let out_dir = root.join("bench/results");
    std::fs::create_dir_all(&out_dir)?;
    let md = out_dir.join(format!("{stamp}.md"));
    std::fs::write(&md, &b.report)?;
    std::fs::write(
        out_dir.join(format!("{stamp}.json")),
        serde_json::to_string_pretty(&b.results)?,
    )?;
    println!("{}", b.report);
    println!("written to {}", md.display());
    Ok(())
}

/// Installs the peers and tools a bench needs (`debs`) and moves to the repository
/// root, which it returns.
fn setup(debs: &[&str]) -> Result<PathBuf> {
    prereq::ensure_debs(debs)?;
    let root = crate::root();
    std::env::set_current_dir(&root)?;
    Ok(root)
}

fn native_arch() -> Result<String> {
    Ok(prereq::output("dpkg", &["--print-architecture"])?
        .trim()
        .to_string())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn output_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    prereq::output(
        "date",
        &["-u", "-d", &format!("@{secs}"), "+%Y%m%dT%H%M%SZ"],
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_else(|_| secs.to_string())
}

impl Bench {
    fn rackboot(&self, config: &Path, args: &[&str]) -> Result<Duration> {
        let t = Instant::now();
        let mut full = vec!["--config", config.to_str().expect("utf-8")];
        full.extend_from_slice(args);
        let out = Command::new(&self.bin).args(&full).output()?;
        if !out.status.success() {
            bail!(
                "rackboot {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t.elapsed())
    }

    /// Starts the shipped rackboot serving the bench's state dir (no sync) with config
    /// file `name`; `tftp` and `http` are the lines of its `[tftp]` and `[http]` tables.
    /// It raises its own open-files limit.
    fn serve_rackboot(&self, name: &str, tftp: &str, http: &str) -> Result<Proc> {
        let config = self.dir.join(name);
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n[sync]\nauto = false\n[tftp]\n{tftp}\n[http]\n{http}\n[[sources]]\nurl = \"file:///nonexistent/streams/v1/index.json\"\nunsigned = true\n",
                self.dir.join("state").display(),
            ),
        )?;
        spawn(
            &self.bin,
            &["--config", config.to_str().context("utf-8")?, "serve"],
        )
    }

    fn start_server(&self, which: &str, port: u16) -> Result<Proc> {
        let root = self.snapshot.to_str().expect("utf-8");
        let addr = format!("127.0.0.1:{port}");
        let p = match which {
            "rackboot" => self.serve_rackboot(
                "serve.toml",
                &format!(
                    "listen = [\"{addr}\"]\n# every load-generator client is 127.0.0.1: one address stands for a whole rack\nmax_transfers_per_client = 10000"
                ),
                &format!("listen = [\"127.0.0.1:{}\"]", free_tcp_port()?),
            )?,
            "tftpd-hpa" => spawn(
                Path::new("/usr/sbin/in.tftpd"),
                &["-L", "-l", "-a", &addr, "-u", "root", "-s", root],
            )?,
            "atftpd" => spawn(
                &self.atftpd,
                &[
                    "--daemon",
                    "--no-fork",
                    "--port",
                    &port.to_string(),
                    "--bind-address",
                    "127.0.0.1",
                    "--user",
                    "root",
                    "--group",
                    "root",
                    "--logfile",
                    "/dev/null",
                    "--maxthread",
                    "1000",
                    root,
                ],
            )?,
            "dnsmasq" => spawn(
                Path::new("/usr/sbin/dnsmasq"),
                &[
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--port=0",
                    "--enable-tftp",
                    &format!("--tftp-root={root}"),
                    "--listen-address=127.0.0.2",
                    "--bind-interfaces",
                    "--tftp-max=1000",
                    "--user=root",
                    "--pid-file=",
                ],
            )?,
            _ => bail!("unknown server {which}"),
        };
        wait_port_udp_ready(port);
        Ok(p)
    }
}
