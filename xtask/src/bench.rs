//! `cargo xtask bench [tftp] [http] [sync]`: rackboot against its peers, measured in
//! the same run on loopback, results (Markdown + JSON) written to `bench/results/`.
//!
//! A bench stream (unsigned, `file://`) with a 64 MiB kernel, a 4 MiB initrd and a
//! 200 MiB squashfs is synced by the release binary; the peers serve the very same
//! snapshot directory.
//! - tftp: one transfer at windowsize 1 and at windowsize 8 (blksize 1468, atftp
//!   client), and 200 concurrent clients (4 MiB each, every download checked), against
//!   tftpd-hpa, dnsmasq and atftpd. Peak RSS of rackboot is read from /proc.
//! - http: a 200 MiB file (curl, best of 3) and 1000 concurrent keep-alive clients
//!   (wrk, 5 s) against nginx with sendfile.
//! - sync: a full sync of the bench stream from a local mirror, and a no-op sync.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::prereq::{self, cmd};

const KERNEL: &str = "bench/amd64/generic/bench/stable/boot-kernel";
const INITRD: &str = "bench/amd64/generic/bench/stable/boot-initrd";
const SQUASHFS: &str = "bench/amd64/generic/bench/stable/squashfs";

struct Bench {
    dir: PathBuf,
    bin: PathBuf,
    snapshot: PathBuf,
    atftpd: PathBuf,
    results: BTreeMap<String, serde_json::Value>,
    report: String,
}

/// A child process killed (by PID, through its handle) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &Path, args: &[&str]) -> Result<Proc> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    Ok(Proc(child))
}

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
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
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn run(args: &[String]) -> Result<()> {
    let all = args.is_empty();
    let want = |k: &str| all || args.iter().any(|a| a == k);
    prereq::ensure_debs(&[
        "atftp",
        "tftpd-hpa",
        "dnsmasq-base",
        "nginx-light",
        "wrk",
        "curl",
    ])?;
    let root = crate::root();
    std::env::set_current_dir(&root)?;
    cmd("cargo", &["build", "--release", "--bin", "rackboot"])?;
    let dir = root.join("target/bench");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let atftpd_root = root.join("target/xtask-cache/atftpd");
    if !atftpd_root.join("usr/sbin/atftpd").exists() {
        // atftpd and tftpd-hpa conflict as packages: unpack atftpd privately.
        prereq::ensure_foreign_debs(&native_arch()?, &["atftpd"], &atftpd_root)?;
    }
    let mut b = Bench {
        bin: root.join("target/release/rackboot"),
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
        "Loopback, {} cores; rackboot release build; peers from Debian 12.\n",
        num_cpus()
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

    /// Builds the bench stream, syncs it (timed), and remembers the snapshot dir.
    fn sync_bench(&mut self) -> Result<()> {
        let stream = self.dir.join("stream");
        let items = [
            ("boot-kernel", "bench/amd64/1/boot-kernel", 64usize << 20),
            ("boot-initrd", "bench/amd64/1/boot-initrd", 4 << 20),
            ("squashfs", "bench/amd64/1/squashfs", 200 << 20),
        ];
        let mut imap = serde_json::Map::new();
        let mut total = 0u64;
        for (i, (name, path, size)) in items.iter().enumerate() {
            let data = pseudo_random(i as u64 + 7, *size);
            let p = stream.join(path);
            std::fs::create_dir_all(p.parent().expect("parent"))?;
            std::fs::write(&p, &data)?;
            total += data.len() as u64;
            imap.insert(
                name.to_string(),
                json!({"ftype": name, "path": path, "size": data.len(), "sha256": hex::encode(Sha256::digest(&data))}),
            );
        }
        let products = json!({"format": "products:1.0", "content_id": "bench:v3:download", "products": {
            "bench:amd64": {"os": "bench", "release": "bench", "arch": "amd64", "subarch": "generic", "label": "stable",
                "versions": {"1": {"items": imap}}}}});
        std::fs::create_dir_all(stream.join("streams/v1"))?;
        std::fs::write(
            stream.join("streams/v1/bench.json"),
            serde_json::to_vec(&products)?,
        )?;
        std::fs::write(
            stream.join("streams/v1/index.json"),
            serde_json::to_vec(
                &json!({"format": "index:1.0", "index": {"bench:v3:download": {
                "format": "products:1.0", "path": "streams/v1/bench.json"}}}),
            )?,
        )?;
        let state = self.dir.join("state");
        let config = self.dir.join("rackboot.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n[sync]\nauto = false\n[[sources]]\nurl = \"file://{}/streams/v1/index.json\"\nunsigned = true\n[[sources.selections]]\nos = \"bench\"\nrelease = \"bench\"\n",
                state.display(),
                stream.display()
            ),
        )?;
        // Drop the page cache effect partly: the mirror was just written, so it is warm
        // for every tool alike.
        let full = self.rackboot(&config, &["sync"])?;
        let noop = self.rackboot(&config, &["sync"])?;
        let mut noops = vec![noop];
        for _ in 0..4 {
            noops.push(self.rackboot(&config, &["sync"])?);
        }
        noops.sort();
        self.snapshot = std::fs::canonicalize(state.join("current"))?;
        writeln!(self.report, "## sync (local mirror, file://)\n")?;
        writeln!(self.report, "| what | time | throughput |\n|---|---|---|")?;
        writeln!(
            self.report,
            "| full sync, {} MiB, sha256 checked | {:.2} s | {:.0} MiB/s |",
            total >> 20,
            full.as_secs_f64(),
            mib_s(total, full)
        )?;
        writeln!(
            self.report,
            "| no-op sync (process start to exit, median of 5) | {:.1} ms | |\n",
            noops[2].as_secs_f64() * 1000.0
        )?;
        self.results.insert(
            "sync".into(),
            json!({"bytes": total, "full_s": full.as_secs_f64(), "full_mib_s": mib_s(total, full), "noop_ms": noops[2].as_secs_f64() * 1000.0}),
        );
        Ok(())
    }

    fn start_server(&self, which: &str, port: u16) -> Result<Proc> {
        let root = self.snapshot.to_str().expect("utf-8");
        let addr = format!("127.0.0.1:{port}");
        let p = match which {
            "rackboot" => {
                let config = self.dir.join("serve.toml");
                std::fs::write(
                    &config,
                    format!(
                        "state_dir = \"{}\"\n[sync]\nauto = false\n[tftp]\nlisten = [\"{addr}\"]\n[http]\nlisten = [\"127.0.0.1:{}\"]\n[[sources]]\nurl = \"file:///nonexistent/streams/v1/index.json\"\nunsigned = true\n",
                        self.dir.join("state").display(),
                        free_tcp_port()?
                    ),
                )?;
                spawn(
                    &self.bin,
                    &["--config", config.to_str().expect("utf-8"), "serve"],
                )?
            }
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

    /// One atftp download; returns the time taken.
    fn atftp(&self, host: &str, port: u16, path: &str, ws: u16, out: &Path) -> Result<Duration> {
        let mut args = vec![
            "--get".to_string(),
            "-r".into(),
            path.into(),
            "-l".into(),
            out.display().to_string(),
            "--option".into(),
            "blksize 1468".into(),
        ];
        if ws > 1 {
            args.push("--option".into());
            args.push(format!("windowsize {ws}"));
        }
        args.push(host.into());
        args.push(port.to_string());
        let t = Instant::now();
        let o = Command::new("timeout")
            .arg("120")
            .arg("atftp")
            .args(&args)
            .output()?;
        let d = t.elapsed();
        if !o.status.success() {
            bail!(
                "atftp {path} from {host}:{port} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(d)
    }

    fn tftp_bench(&mut self) -> Result<()> {
        let size = std::fs::metadata(self.snapshot.join(KERNEL))?.len();
        let small = std::fs::metadata(self.snapshot.join(INITRD))?.len();
        let want_small = hex::encode(Sha256::digest(std::fs::read(self.snapshot.join(INITRD))?));
        let shm = PathBuf::from("/dev/shm/rackboot-bench");
        let _ = std::fs::remove_dir_all(&shm);
        std::fs::create_dir_all(&shm)?;
        let mut rows = Vec::new();
        let mut fast_rows: Vec<(&str, f64, f64, f64, usize)> = Vec::new();
        let mut json_rows = serde_json::Map::new();
        for server in ["rackboot", "tftpd-hpa", "atftpd", "dnsmasq"] {
            let (host, port) = if server == "dnsmasq" {
                ("127.0.0.2", 69)
            } else {
                ("127.0.0.1", free_udp_port()?)
            };
            let proc = self.start_server(server, port)?;
            let out = shm.join("single");
            let best = |ws: u16| -> Result<Duration> {
                let mut times = vec![];
                for _ in 0..3 {
                    times.push(self.atftp(host, port, KERNEL, ws, &out)?);
                }
                times.sort();
                Ok(times[0])
            };
            let ws1 = best(1)?;
            let ws8 = best(8)?;
            // 200 concurrent clients, every download verified.
            let clients = 200;
            let t = Instant::now();
            let mut kids = Vec::new();
            for i in 0..clients {
                let out = shm.join(format!("c{i}"));
                let child = Command::new("timeout")
                    .args([
                        "120",
                        "atftp",
                        "--get",
                        "-r",
                        INITRD,
                        "-l",
                        out.to_str().expect("utf-8"),
                        "--option",
                        "blksize 1468",
                        host,
                        &port.to_string(),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                kids.push((child, out));
            }
            let mut failures = 0;
            for (mut c, out) in kids {
                let ok = c.wait()?.success()
                    && std::fs::read(&out)
                        .map(|d| hex::encode(Sha256::digest(&d)) == want_small)
                        .unwrap_or(false);
                if !ok {
                    failures += 1;
                }
                let _ = std::fs::remove_file(&out);
            }
            let wall = t.elapsed();
            let agg = mib_s(small * clients as u64, wall);
            // The same measurements with the fast load generator (one process).
            let addr: std::net::SocketAddr = format!("{host}:{port}").parse()?;
            let want_big = hex::encode(Sha256::digest(std::fs::read(self.snapshot.join(KERNEL))?));
            let fast = |ws: u16| -> Result<Duration> {
                let mut best = Duration::MAX;
                for _ in 0..3 {
                    let t = Instant::now();
                    let (n, sha) = crate::tftpload::download(addr, KERNEL, 1468, ws)?;
                    if n != size || sha != want_big {
                        bail!("{server}: load generator got a wrong file");
                    }
                    best = best.min(t.elapsed());
                }
                Ok(best)
            };
            let (f1, f8) = (fast(1)?, fast(8)?);
            let mut fast_failures = 0;
            let t = Instant::now();
            let handles: Vec<_> = (0..clients)
                .map(|_| {
                    std::thread::spawn(move || crate::tftpload::download(addr, INITRD, 1468, 1))
                })
                .collect();
            for h in handles {
                match h.join() {
                    Ok(Ok((_, sha))) if sha == want_small => {}
                    _ => fast_failures += 1,
                }
            }
            let fast_agg = mib_s(small * clients as u64, t.elapsed());
            let rss = if server == "rackboot" {
                peak_rss_kib(proc.0.id())
            } else {
                0
            };
            drop(proc);
            rows.push((
                server,
                mib_s(size, ws1),
                mib_s(size, ws8),
                agg,
                failures,
                rss,
            ));
            fast_rows.push((
                server,
                mib_s(size, f1),
                mib_s(size, f8),
                fast_agg,
                fast_failures,
            ));
            json_rows.insert(
                server.into(),
                json!({"atftp": {"ws1_mib_s": mib_s(size, ws1), "ws8_mib_s": mib_s(size, ws8), "clients200_mib_s": agg, "clients200_failures": failures},
                       "loadgen": {"ws1_mib_s": mib_s(size, f1), "ws8_mib_s": mib_s(size, f8), "clients200_mib_s": fast_agg, "clients200_failures": fast_failures},
                       "peak_rss_kib": rss}),
            );
        }
        let _ = std::fs::remove_dir_all(&shm);
        let get = |name: &str| rows.iter().find(|r| r.0 == name).expect("measured");
        let rb = get("rackboot");
        writeln!(
            self.report,
            "## TFTP ({} MiB file, blksize 1468, atftp client, best of 3; 200 clients × {} MiB)\n",
            size >> 20,
            small >> 20
        )?;
        writeln!(self.report, "| server | windowsize 1 | windowsize 8 | 200 clients aggregate | failed transfers |\n|---|---|---|---|---|")?;
        for r in &rows {
            writeln!(
                self.report,
                "| {} | {:.1} MiB/s | {:.1} MiB/s | {:.1} MiB/s | {} |",
                r.0, r.1, r.2, r.3, r.4
            )?;
        }
        writeln!(
            self.report,
            "\nratios: ws=1 rackboot/tftpd-hpa {:.2}x (goal ≥ 1); ws=8 rackboot/atftpd {:.2}x (goal ≥ 1.5); 200 clients rackboot/tftpd-hpa {:.2}x (goal ≥ 1.5); rackboot peak RSS {:.1} MiB\n",
            rb.1 / get("tftpd-hpa").1,
            rb.2 / get("atftpd").2,
            rb.3 / get("tftpd-hpa").3,
            rb.5 as f64 / 1024.0
        )?;
        let fget = |name: &str| fast_rows.iter().find(|r| r.0 == name).expect("measured");
        let fr = fget("rackboot");
        writeln!(self.report, "Same servers with `xtask`'s own TFTP load generator (one process; 200 clients are 200 threads), so the client is not the bottleneck the atftp client is:\n")?;
        writeln!(self.report, "| server | windowsize 1 | windowsize 8 | 200 clients aggregate | failed transfers |\n|---|---|---|---|---|")?;
        for r in &fast_rows {
            writeln!(
                self.report,
                "| {} | {:.1} MiB/s | {:.1} MiB/s | {:.1} MiB/s | {} |",
                r.0, r.1, r.2, r.3, r.4
            )?;
        }
        writeln!(
            self.report,
            "\nratios: ws=1 rackboot/tftpd-hpa {:.2}x (goal ≥ 1); ws=8 rackboot/atftpd {:.2}x (goal ≥ 1.5); 200 clients rackboot/tftpd-hpa {:.2}x (goal ≥ 1.5)\n",
            fr.1 / fget("tftpd-hpa").1,
            fr.2 / fget("atftpd").2,
            fr.3 / fget("tftpd-hpa").3,
        )?;
        self.results
            .insert("tftp".into(), serde_json::Value::Object(json_rows));
        Ok(())
    }

    fn http_bench(&mut self) -> Result<()> {
        let big = std::fs::metadata(self.snapshot.join(SQUASHFS))?.len();
        let mut rows = Vec::new();
        let mut json_rows = serde_json::Map::new();
        for server in ["rackboot", "nginx"] {
            let port = free_tcp_port()?;
            let _proc = match server {
                "rackboot" => {
                    let config = self.dir.join("http.toml");
                    std::fs::write(
                        &config,
                        format!(
                            "state_dir = \"{}\"\n[sync]\nauto = false\n[tftp]\nlisten = []\n[http]\nlisten = [\"127.0.0.1:{port}\"]\n[[sources]]\nurl = \"file:///nonexistent/streams/v1/index.json\"\nunsigned = true\n",
                            self.dir.join("state").display()
                        ),
                    )?;
                    Proc(
                        Command::new("sh")
                            .args([
                                "-c",
                                &format!(
                                    "ulimit -n 65536; exec {} --config {} serve",
                                    self.bin.display(),
                                    config.display()
                                ),
                            ])
                            .stderr(Stdio::null())
                            .spawn()?,
                    )
                }
                _ => {
                    let prefix = self.dir.join("nginx");
                    std::fs::create_dir_all(prefix.join("logs"))?;
                    let conf = prefix.join("nginx.conf");
                    std::fs::write(
                        &conf,
                        format!(
                            "worker_processes {};\nworker_rlimit_nofile 65536;\nerror_log stderr;\npid {}/nginx.pid;\nevents {{ worker_connections 8192; }}\nhttp {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;\n server {{ listen 127.0.0.1:{port}; root {}; }} }}\n",
                            num_cpus(),
                            prefix.display(),
                            self.snapshot.display()
                        ),
                    )?;
                    Proc(
                        Command::new("nginx")
                            .args([
                                "-p",
                                prefix.to_str().expect("utf-8"),
                                "-c",
                                conf.to_str().expect("utf-8"),
                                "-g",
                                "daemon off;",
                            ])
                            .stderr(Stdio::null())
                            .spawn()?,
                    )
                }
            };
            std::thread::sleep(Duration::from_millis(500));
            let url = format!("http://127.0.0.1:{port}/{SQUASHFS}");
            let mut speeds = vec![];
            for _ in 0..3 {
                let o = Command::new("curl")
                    .args([
                        "-s",
                        "--max-time",
                        "60",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{speed_download}",
                        &url,
                    ])
                    .output()?;
                let s: f64 = String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0.0);
                speeds.push(s / (1024.0 * 1024.0));
            }
            speeds.sort_by(|a, b| b.partial_cmp(a).expect("numbers"));
            let small_url = format!("http://127.0.0.1:{port}/maas.meta");
            let o = Command::new("sh")
                .args([
                    "-c",
                    &format!("ulimit -n 65536; wrk -t 2 -c 1000 -d 5s --timeout 10s {small_url}"),
                ])
                .output()?;
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let rps: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("Requests/sec:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
            let errors = text
                .lines()
                .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
                .join("; ");
            rows.push((
                server,
                speeds[0],
                rps,
                if errors.is_empty() {
                    "none".to_string()
                } else {
                    errors
                },
            ));
            json_rows.insert(
                server.into(),
                json!({"big_file_mib_s": speeds[0], "runs_mib_s": speeds, "wrk_1000_rps": rps}),
            );
        }
        let rb = &rows[0];
        let ng = &rows[1];
        writeln!(self.report, "## HTTP ({} MiB file with curl, best of 3; 1000 keep-alive connections with wrk, 5 s)\n", big >> 20)?;
        writeln!(
            self.report,
            "| server | large file | 1000 clients | errors |\n|---|---|---|---|"
        )?;
        for r in &rows {
            writeln!(
                self.report,
                "| {} | {:.0} MiB/s | {:.0} req/s | {} |",
                r.0, r.1, r.2, r.3
            )?;
        }
        writeln!(self.report, "\nratios: large file rackboot/nginx {:.2}x (goal ≥ 0.9); 1000 clients rackboot/nginx {:.2}x\n", rb.1 / ng.1, rb.2 / ng.2)?;
        self.results
            .insert("http".into(), serde_json::Value::Object(json_rows));
        Ok(())
    }
}
