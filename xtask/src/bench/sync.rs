//! Sync: rackboot against `sstream-mirror` (python-simplestreams from PyPI) on the
//! same local mirror, taking turns so both see the same machine.
//!
//! The mirror (64 MiB kernel, 4 MiB initrd, 200 MiB squashfs, unsigned) is read
//! through `file://` and through nginx on loopback. Per tool and transport: the time
//! to exit (median of 5 runs, a fresh target each time), the time until the data is
//! on disk (the run plus `sync(1)`: rackboot fsyncs its files itself, sstream-mirror
//! does not), and peak RSS. Then the no-op run against the unchanged mirror: time,
//! HTTP requests (from nginx's access log) and files written.

use super::*;

/// python-simplestreams as published on PyPI.
const SIMPLESTREAMS: &str = "python-simplestreams==0.1.0.post59";
const RUNS: usize = 5;

/// One timed run of a command.
struct Timed {
    wall: Duration,
    durable: Duration,
    rss_kib: u64,
}

/// Runs `program args` under GNU time (for the peak RSS), then `sync`.
fn timed(program: &Path, args: &[&str], dir: &Path) -> Result<Timed> {
    let rss_file = dir.join("time.out");
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let wall = t.elapsed();
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cmd("sync", &[])?;
    let durable = t.elapsed();
    let rss_kib = std::fs::read_to_string(&rss_file)?
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    Ok(Timed {
        wall,
        durable,
        rss_kib,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Files under `dir` (recursively) whose mtime is after `since`.
fn written_since(dir: &Path, since: std::time::SystemTime) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += written_since(&p, since);
        } else if e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|m| m > since)
        {
            n += 1;
        }
    }
    n
}

/// `sstream-mirror` in a private virtualenv under the xtask cache.
fn sstream_mirror(target: &Path) -> Result<PathBuf> {
    let venv = target.join("xtask-cache/sstream-venv");
    let bin = venv.join("bin/sstream-mirror");
    if !bin.exists() {
        prereq::ensure_debs(&["python3-venv"])?;
        cmd("python3", &["-m", "venv", venv.to_str().context("utf-8")?])?;
        cmd(
            venv.join("bin/pip").to_str().context("utf-8")?,
            &["install", "-q", SIMPLESTREAMS],
        )?;
    }
    Ok(bin)
}

/// nginx serving `root` on loopback with an access log.
fn nginx(dir: &Path, root: &Path, port: u16) -> Result<Proc> {
    let prefix = dir.join("sync-nginx");
    std::fs::create_dir_all(&prefix)?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\nerror_log stderr;\npid {p}/nginx.pid;\nevents {{ worker_connections 256; }}\nhttp {{ access_log {p}/access.log; sendfile on;\n server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
            p = prefix.display(),
            root = root.display()
        ),
    )?;
    // nginx stops the way it expects: SIGTERM to the master, which takes its workers
    // down (a SIGKILL would leave them listening).
    let p = start_nginx(&prefix, &conf)?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(p);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nginx did not listen on 127.0.0.1:{port}")
}

/// Lines in nginx's access log (it writes a line once the response is out, which can
/// be just after the client has exited: give it a moment).
fn access_log_lines(dir: &Path) -> usize {
    std::thread::sleep(Duration::from_millis(100));
    std::fs::read_to_string(dir.join("sync-nginx/access.log"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

impl Bench {
    /// Builds the bench stream, benchmarks the sync against sstream-mirror, and
    /// remembers the synced snapshot for the serving benchmarks.
    pub(super) fn sync_bench(&mut self) -> Result<()> {
        prereq::ensure_debs(&["time", "nginx-light"])?;
        let target = prereq::target_dir(&crate::root());
        let sstream = sstream_mirror(&target)?;
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
        write_unsigned_stream(&stream, "bench:v3:download", "bench", &products)?;
        let port = free_tcp_port()?;
        let _nginx = nginx(&self.dir, &stream, port)?;
        let urls = [
            (
                "file://",
                format!("file://{}/streams/v1/index.json", stream.display()),
            ),
            (
                "http (nginx, loopback)",
                format!("http://127.0.0.1:{port}/streams/v1/index.json"),
            ),
        ];
        let state = self.dir.join("state");
        let out = self.dir.join("sstream-out");
        let config = |url: &str| -> Result<PathBuf> {
            let c = self.dir.join("rackboot.toml");
            std::fs::write(
                &c,
                format!(
                    "state_dir = \"{}\"\n[sync]\nauto = false\n[[sources]]\nurl = \"{url}\"\nunsigned = true\n[[sources.selections]]\nos = \"bench\"\nrelease = \"bench\"\n",
                    state.display()
                ),
            )?;
            Ok(c)
        };
        writeln!(
            self.report,
            "## sync: rackboot vs sstream-mirror ({} MiB local mirror)\n",
            total >> 20
        )?;
        writeln!(
            self.report,
            "Median of {RUNS} runs each, taking turns, fresh target every run. \"On disk\" adds `sync(1)` after the run: rackboot fsyncs what it stores, sstream-mirror leaves its files in the page cache.\n"
        )?;
        writeln!(
            self.report,
            "| transport | tool | to exit | throughput | to on disk | peak RSS |\n|---|---|---|---|---|---|"
        )?;
        let mut json_rows = serde_json::Map::new();
        let mut ratios = Vec::new();
        for (transport, url) in &urls {
            let cfg = config(url)?;
            let (mut rb, mut ss) = (Vec::new(), Vec::new());
            for _ in 0..RUNS {
                let _ = std::fs::remove_dir_all(&state);
                rb.push(timed(
                    &self.bin,
                    &["--config", cfg.to_str().context("utf-8")?, "sync"],
                    &self.dir,
                )?);
                let _ = std::fs::remove_dir_all(&out);
                ss.push(timed(
                    &sstream,
                    &[url, out.to_str().context("utf-8")?],
                    &self.dir,
                )?);
            }
            let summarize = |runs: &[Timed]| {
                (
                    median(runs.iter().map(|r| r.wall).collect()),
                    median(runs.iter().map(|r| r.durable).collect()),
                    runs.iter().map(|r| r.rss_kib).max().unwrap_or(0),
                )
            };
            let (rb_wall, rb_disk, rb_rss) = summarize(&rb);
            let (ss_wall, ss_disk, ss_rss) = summarize(&ss);
            for (tool, wall, disk, rss) in [
                ("rackboot", rb_wall, rb_disk, rb_rss),
                ("sstream-mirror", ss_wall, ss_disk, ss_rss),
            ] {
                writeln!(
                    self.report,
                    "| {transport} | {tool} | {:.2} s | {:.0} MiB/s | {:.2} s | {:.1} MiB |",
                    wall.as_secs_f64(),
                    mib_s(total, wall),
                    disk.as_secs_f64(),
                    rss as f64 / 1024.0
                )?;
            }
            let exit_ratio = ss_wall.as_secs_f64() / rb_wall.as_secs_f64();
            let disk_ratio = ss_disk.as_secs_f64() / rb_disk.as_secs_f64();
            ratios.push(format!(
                "{transport}: sstream-mirror/rackboot time to exit {exit_ratio:.2}x, to on disk {disk_ratio:.2}x (goal ≥ 1.5); peak RSS rackboot {:.1} MiB vs {:.1} MiB (goal: not higher)",
                rb_rss as f64 / 1024.0,
                ss_rss as f64 / 1024.0
            ));
            json_rows.insert(
                transport.to_string(),
                json!({"rackboot": {"exit_s": rb_wall.as_secs_f64(), "disk_s": rb_disk.as_secs_f64(), "rss_kib": rb_rss},
                       "sstream-mirror": {"exit_s": ss_wall.as_secs_f64(), "disk_s": ss_disk.as_secs_f64(), "rss_kib": ss_rss},
                       "ratio_exit": exit_ratio, "ratio_disk": disk_ratio}),
            );
        }
        writeln!(self.report, "\n{}\n", ratios.join("\n\n"))?;

        // No-op runs against the unchanged mirror, over HTTP (requests counted).
        let url = &urls[1].1;
        let cfg = config(url)?;
        let (mut rb_noop, mut ss_noop) = (Vec::new(), Vec::new());
        let (mut rb_req, mut ss_req, mut rb_files, mut ss_files) = (0, 0, 0, 0);
        for i in 0..RUNS {
            let before = access_log_lines(&self.dir);
            let since = std::time::SystemTime::now();
            rb_noop.push(self.rackboot(&cfg, &["sync"])?);
            if i == 0 {
                rb_req = access_log_lines(&self.dir) - before;
                rb_files = written_since(&state, since);
            }
            let before = access_log_lines(&self.dir);
            let since = std::time::SystemTime::now();
            let t = Instant::now();
            let o = Command::new(&sstream)
                .args([url.as_str(), out.to_str().context("utf-8")?])
                .output()?;
            if !o.status.success() {
                bail!(
                    "sstream-mirror no-op failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            ss_noop.push(t.elapsed());
            if i == 0 {
                ss_req = access_log_lines(&self.dir) - before;
                ss_files = written_since(&out, since);
            }
        }
        let (rb_noop, ss_noop) = (median(rb_noop), median(ss_noop));
        writeln!(
            self.report,
            "| no-op run (nothing new upstream) | time (process start to exit) | HTTP requests | files written |\n|---|---|---|---|"
        )?;
        writeln!(
            self.report,
            "| rackboot | {:.1} ms | {rb_req} | {rb_files} |\n| sstream-mirror | {:.1} ms | {ss_req} | {ss_files} |\n",
            rb_noop.as_secs_f64() * 1000.0,
            ss_noop.as_secs_f64() * 1000.0
        )?;
        writeln!(
            self.report,
            "no-op goal: one conditional request, no file written, under 20 ms: rackboot {:.1} ms, {rb_req} request(s), {rb_files} file(s)\n",
            rb_noop.as_secs_f64() * 1000.0
        )?;
        json_rows.insert(
            "noop".into(),
            json!({"rackboot": {"ms": rb_noop.as_secs_f64() * 1000.0, "requests": rb_req, "files_written": rb_files},
                   "sstream-mirror": {"ms": ss_noop.as_secs_f64() * 1000.0, "requests": ss_req, "files_written": ss_files}}),
        );
        json_rows.insert("bytes".into(), json!(total));
        self.results
            .insert("sync".into(), serde_json::Value::Object(json_rows));
        self.snapshot = std::fs::canonicalize(state.join("current"))?;
        Ok(())
    }
}
