//! HTTP: rackboot against nginx (sendfile on), serving the same snapshot directory.
//!
//! Per server: the 200 MiB squashfs with curl (one download checked by sha256, then
//! best of 3 to /dev/null) and 1000 concurrent keep-alive clients on `maas.meta` with
//! wrk (5 s, latency distribution). rackboot's peak RSS is read from /proc.

use super::*;

/// One server's numbers.
struct Row {
    server: &'static str,
    big_mib_s: f64,
    big_runs: Vec<f64>,
    rps: f64,
    latency_avg: String,
    latency_p99: String,
    errors: String,
    peak_rss_kib: Option<u64>,
}

/// nginx stopped the way it expects (SIGTERM to the master, which takes its workers
/// down), then reaped; SIGKILL only if it does not stop.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

enum Server {
    Rackboot(Proc),
    Nginx(Nginx),
}

impl Server {
    fn pid(&self) -> u32 {
        match self {
            Server::Rackboot(p) => p.0.id(),
            Server::Nginx(n) => n.0.id(),
        }
    }
}

/// Waits until something accepts TCP connections on `port` (at most 10 s).
fn wait_tcp(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn sha256_file(p: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The value after `label` on the line that starts with it (wrk's output).
fn wrk_field(text: &str, label: &str, index: usize) -> String {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().nth(index))
        .unwrap_or("?")
        .to_string()
}

impl Bench {
    fn start_http(&self, server: &str, port: u16) -> Result<Server> {
        Ok(match server {
            "rackboot" => {
                let config = self.dir.join("http.toml");
                std::fs::write(
                    &config,
                    format!(
                        "state_dir = \"{}\"\n[sync]\nauto = false\n[tftp]\nlisten = []\n[http]\nlisten = [\"127.0.0.1:{port}\"]\n[[sources]]\nurl = \"file:///nonexistent/streams/v1/index.json\"\nunsigned = true\n",
                        self.dir.join("state").display()
                    ),
                )?;
                // rackboot raises its own open-files limit.
                Server::Rackboot(Proc(
                    Command::new(&self.bin)
                        .arg("--config")
                        .arg(&config)
                        .arg("serve")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .context("cannot start rackboot")?,
                ))
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
                Server::Nginx(Nginx(
                    Command::new("nginx")
                        .args([
                            "-p",
                            prefix.to_str().expect("utf-8"),
                            "-c",
                            conf.to_str().expect("utf-8"),
                            "-g",
                            "daemon off;",
                        ])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .context("cannot start nginx")?,
                ))
            }
        })
    }

    fn http_one(&self, server: &'static str, want_sha: &str) -> Result<Row> {
        let port = free_tcp_port()?;
        let proc = self.start_http(server, port)?;
        wait_tcp(port)?;
        let url = format!("http://127.0.0.1:{port}/{SQUASHFS}");
        // One checked download first: a fast wrong answer is worth nothing.
        let check = self.dir.join("http-check");
        let o = Command::new("curl")
            .args(["-sf", "--max-time", "60", "-o"])
            .arg(&check)
            .arg(&url)
            .status()?;
        if !o.success() {
            bail!("{server}: curl {url} failed: {o}");
        }
        let got = sha256_file(&check)?;
        std::fs::remove_file(&check)?;
        if got != want_sha {
            bail!("{server}: {url} has sha256 {got}, want {want_sha}");
        }
        let mut runs = vec![];
        for _ in 0..3 {
            let o = Command::new("curl")
                .args([
                    "-sf",
                    "--max-time",
                    "60",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{speed_download} %{size_download}",
                    &url,
                ])
                .output()?;
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            let mut it = out.split_whitespace();
            let speed: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let size: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let want_len = std::fs::metadata(self.snapshot.join(SQUASHFS))?.len();
            if !o.status.success() || size != want_len {
                bail!(
                    "{server}: curl got {size} of {want_len} bytes ({})",
                    o.status
                );
            }
            runs.push(speed / (1024.0 * 1024.0));
        }
        let best = runs.iter().copied().fold(0.0, f64::max);
        let small_url = format!("http://127.0.0.1:{port}/maas.meta");
        let o = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "ulimit -n $(ulimit -Hn); wrk -t 2 -c 1000 -d 5s --timeout 10s --latency {small_url}"
                ),
            ])
            .output()?;
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        if !o.status.success() || !text.contains("Requests/sec:") {
            bail!(
                "{server}: wrk failed: {text}{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let rps: f64 = wrk_field(&text, "Requests/sec:", 0).parse().unwrap_or(0.0);
        let errors = text
            .lines()
            .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
            .map(|l| l.trim().to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let peak_rss_kib = matches!(proc, Server::Rackboot(_)).then(|| peak_rss_kib(proc.pid()));
        Ok(Row {
            server,
            big_mib_s: best,
            big_runs: runs,
            rps,
            latency_avg: wrk_field(&text, "Latency", 0),
            latency_p99: wrk_field(&text, "99%", 0),
            errors: if errors.is_empty() {
                "none".into()
            } else {
                errors
            },
            peak_rss_kib,
        })
    }

    pub(super) fn http_bench(&mut self) -> Result<()> {
        let big = std::fs::metadata(self.snapshot.join(SQUASHFS))?.len();
        let want_sha = sha256_file(&self.snapshot.join(SQUASHFS))?;
        let rows = vec![
            self.http_one("rackboot", &want_sha)?,
            self.http_one("nginx", &want_sha)?,
        ];
        let (rb, ng) = (&rows[0], &rows[1]);
        writeln!(
            self.report,
            "## HTTP ({} MiB file with curl, checked once, then best of 3; 1000 keep-alive connections with wrk -t 2, 5 s)\n",
            big >> 20
        )?;
        writeln!(
            self.report,
            "| server | large file | runs | 1000 clients | latency avg | p99 | errors | peak RSS |\n|---|---|---|---|---|---|---|---|"
        )?;
        for r in &rows {
            writeln!(
                self.report,
                "| {} | {:.0} MiB/s | {} | {:.0} req/s | {} | {} | {} | {} |",
                r.server,
                r.big_mib_s,
                r.big_runs
                    .iter()
                    .map(|v| format!("{v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.rps,
                r.latency_avg,
                r.latency_p99,
                r.errors,
                r.peak_rss_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into()),
            )?;
        }
        let big_ratio = rb.big_mib_s / ng.big_mib_s;
        let rps_ratio = rb.rps / ng.rps;
        writeln!(
            self.report,
            "\nratios: large file rackboot/nginx {big_ratio:.2}x (goal ≥ 0.9: {}); 1000 clients rackboot/nginx {rps_ratio:.2}x, rackboot errors: {} (goal: none)\n",
            if big_ratio >= 0.9 { "met" } else { "NOT met" },
            rb.errors,
        )?;
        let mut json_rows = serde_json::Map::new();
        for r in &rows {
            json_rows.insert(
                r.server.into(),
                json!({
                    "big_file_mib_s": r.big_mib_s,
                    "runs_mib_s": r.big_runs,
                    "wrk_1000_rps": r.rps,
                    "wrk_latency_avg": r.latency_avg,
                    "wrk_latency_p99": r.latency_p99,
                    "wrk_errors": r.errors,
                    "peak_rss_kib": r.peak_rss_kib,
                }),
            );
        }
        json_rows.insert("big_file_ratio".into(), json!(big_ratio));
        json_rows.insert("wrk_1000_ratio".into(), json!(rps_ratio));
        self.results
            .insert("http".into(), serde_json::Value::Object(json_rows));
        Ok(())
    }
}
