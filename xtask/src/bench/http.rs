//! HTTP: rackboot against nginx (sendfile on), serving the same snapshot directory.
//!
//! Both servers run at once and take turns: the 200 MiB squashfs with curl (one
//! download each checked by sha256, then 15 rounds to /dev/null, who goes first alternating; best and median) and
//! 1000 concurrent keep-alive clients on `maas.meta` with wrk (5 s, 2 rounds, latency
//! distribution). rackboot's peak RSS is read from /proc.

use super::*;

/// Rounds of the big-file download per server.
const BIG_ROUNDS: usize = 15;
/// Rounds of wrk per server.
const WRK_ROUNDS: usize = 2;

/// One server's numbers.
struct Row {
    server: &'static str,
    big_mib_s: f64,
    big_median: f64,
    /// The median with the server on CPU 1 and curl on CPU 0 (`None` on one core).
    pinned_median: Option<f64>,
    big_runs: Vec<f64>,
    rps: f64,
    rps_runs: Vec<f64>,
    latency_avg: String,
    latency_p99: String,
    errors: String,
    peak_rss_kib: Option<u64>,
}

/// One wrk run.
#[derive(Clone)]
struct Wrk {
    rps: f64,
    latency_avg: String,
    latency_p99: String,
    /// "Socket errors" and "Non-2xx" lines, if any.
    errors: String,
}

enum Server {
    Rackboot(Proc),
    Nginx(Proc),
}

impl Server {
    fn pid(&self) -> u32 {
        match self {
            Server::Rackboot(p) | Server::Nginx(p) => p.pid(),
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
            "rackboot" => Server::Rackboot(self.serve_rackboot(
                "http.toml",
                "listen = []",
                &format!(
                    "listen = [\"127.0.0.1:{port}\"]\n# every client is 127.0.0.1\nmax_connections_per_client = 10000"
                ),
            )?),
            _ => {
                let prefix = self.dir.join("nginx");
                std::fs::create_dir_all(prefix.join("logs"))?;
                let conf = prefix.join("nginx.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "daemon off;\nworker_processes {};\nworker_rlimit_nofile 65536;\nerror_log stderr;\npid {}/nginx.pid;\nevents {{ worker_connections 8192; }}\nhttp {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;\n server {{ listen 127.0.0.1:{port}; root {}; }} }}\n",
                        num_cpus(),
                        prefix.display(),
                        self.snapshot.display()
                    ),
                )?;
                Server::Nginx(start_nginx(&prefix, &conf)?)
            }
        })
    }

    /// One checked download: a fast wrong answer is worth nothing. Hashed as it
    /// streams from curl (no file written: writeback would disturb the timed runs).
    fn http_check(&self, server: &str, url: &str, want_sha: &str) -> Result<()> {
        let mut child = Command::new("curl")
            .args(["-sf", "--max-time", "60", url])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().expect("piped");
        let got = crate::dist::sha256_reader(out)?;
        let status = child.wait()?;
        if !status.success() {
            bail!("{server}: curl {url} failed: {status}");
        }
        if got != want_sha {
            bail!("{server}: {url} has sha256 {got}, want {want_sha}");
        }
        Ok(())
    }

    /// One timed download of the big file to /dev/null (size checked), in MiB/s;
    /// curl runs on `cpu` when given.
    fn http_big_run(
        &self,
        server: &str,
        url: &str,
        want_len: u64,
        cpu: Option<usize>,
    ) -> Result<f64> {
        let mut c = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string(), "curl"]);
                c
            }
            None => Command::new("curl"),
        };
        let o = c
            .args([
                "-sf",
                "--max-time",
                "60",
                "-o",
                "/dev/null",
                "-w",
                "%{speed_download} %{size_download}",
                url,
            ])
            .output()?;
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let mut it = out.split_whitespace();
        let speed: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let size: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if !o.status.success() || size != want_len {
            bail!(
                "{server}: curl got {size} of {want_len} bytes ({})",
                o.status
            );
        }
        Ok(speed / (1024.0 * 1024.0))
    }

    /// 1000 keep-alive clients on a small file for 5 s.
    fn http_wrk(&self, server: &str, port: u16) -> Result<Wrk> {
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
        let errors = text
            .lines()
            .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
            .map(|l| l.trim().to_string())
            .collect::<Vec<_>>()
            .join("; ");
        Ok(Wrk {
            rps: wrk_field(&text, "Requests/sec:", 0).parse().unwrap_or(0.0),
            latency_avg: wrk_field(&text, "Latency", 0),
            latency_p99: wrk_field(&text, "99%", 0),
            errors,
        })
    }

    pub(super) fn http_bench(&mut self) -> Result<()> {
        let big = std::fs::metadata(self.snapshot.join(SQUASHFS))?.len();
        let want_sha = crate::dist::sha256_file(&self.snapshot.join(SQUASHFS))?;
        // Both servers run side by side and take turns, so that both see the same
        // machine (other load on it comes and goes).
        let names = ["rackboot", "nginx"];
        let mut procs = Vec::new();
        let mut ports = Vec::new();
        for name in names {
            let port = free_tcp_port()?;
            procs.push(self.start_http(name, port)?);
            wait_tcp(port)?;
            ports.push(port);
        }
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}/{SQUASHFS}"))
            .collect();
        for (name, url) in names.iter().zip(&urls) {
            self.http_check(name, url, &want_sha)?;
        }
        // Who goes first alternates from round to round.
        let order = |round: usize| {
            if round.is_multiple_of(2) {
                [0, 1]
            } else {
                [1, 0]
            }
        };
        let mut runs = [Vec::new(), Vec::new()];
        for round in 0..BIG_ROUNDS {
            for i in order(round) {
                runs[i].push(self.http_big_run(names[i], &urls[i], big, None)?);
            }
        }
        // On loopback the scheduler's placement of the server next to curl (or
        // not) moves a run by a third; pinned alike, both servers are measured on
        // their own core with curl on another.
        let mut pinned = [Vec::new(), Vec::new()];
        if num_cpus() >= 2 {
            for p in &procs {
                pin_tree(p.pid(), "1")?;
            }
            for round in 0..BIG_ROUNDS {
                for i in order(round) {
                    pinned[i].push(self.http_big_run(names[i], &urls[i], big, Some(0))?);
                }
            }
            let all = format!("0-{}", num_cpus() - 1);
            for p in &procs {
                pin_tree(p.pid(), &all)?;
            }
        }
        let mut wrks: [Vec<Wrk>; 2] = [Vec::new(), Vec::new()];
        for round in 0..WRK_ROUNDS {
            for i in order(round) {
                wrks[i].push(self.http_wrk(names[i], ports[i])?);
            }
        }
        let rss = peak_rss_kib(procs[0].pid());
        drop(procs);
        let rows: Vec<Row> = (0..2)
            .map(|i| {
                let best = wrks[i]
                    .iter()
                    .max_by(|a, b| a.rps.total_cmp(&b.rps))
                    .expect("rounds")
                    .clone();
                let errors: Vec<String> = wrks[i]
                    .iter()
                    .filter(|w| !w.errors.is_empty())
                    .map(|w| w.errors.clone())
                    .collect();
                Row {
                    server: names[i],
                    big_mib_s: runs[i].iter().copied().fold(0.0, f64::max),
                    big_median: median(&runs[i]),
                    pinned_median: (!pinned[i].is_empty()).then(|| median(&pinned[i])),
                    big_runs: runs[i].clone(),
                    rps: best.rps,
                    rps_runs: wrks[i].iter().map(|w| w.rps).collect(),
                    latency_avg: best.latency_avg,
                    latency_p99: best.latency_p99,
                    errors: if errors.is_empty() {
                        "none".into()
                    } else {
                        errors.join("; ")
                    },
                    peak_rss_kib: (i == 0).then_some(rss),
                }
            })
            .collect();
        let (rb, ng) = (&rows[0], &rows[1]);
        writeln!(
            self.report,
            "## HTTP ({} MiB file with curl: each server checked by sha256 once, then {BIG_ROUNDS} rounds taking turns, then {BIG_ROUNDS} more with every server thread on CPU 1 and curl on CPU 0; 1000 keep-alive connections with wrk -t 2 -c 1000, 5 s, {WRK_ROUNDS} rounds taking turns)\n",
            big >> 20
        )?;
        writeln!(
            self.report,
            "| server | large file best | median | runs (MiB/s) | pinned median | 1000 clients best | runs (req/s) | latency avg | p99 | errors | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for r in &rows {
            writeln!(
                self.report,
                "| {} | {:.0} MiB/s | {:.0} MiB/s | {} | {} | {:.0} req/s | {} | {} | {} | {} | {} |",
                r.server,
                r.big_mib_s,
                r.big_median,
                list(&r.big_runs),
                r.pinned_median
                    .map(|m| format!("{m:.0} MiB/s"))
                    .unwrap_or_else(|| "-".into()),
                r.rps,
                list(&r.rps_runs),
                r.latency_avg,
                r.latency_p99,
                r.errors,
                r.peak_rss_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into()),
            )?;
        }
        let big_ratio = rb.big_mib_s / ng.big_mib_s;
        let median_ratio = rb.big_median / ng.big_median;
        let rps_ratio = rb.rps / ng.rps;
        let pinned_ratio = rb.pinned_median.zip(ng.pinned_median).map(|(r, n)| r / n);
        writeln!(
            self.report,
            "\nratios: large file rackboot/nginx {median_ratio:.2}x median, {big_ratio:.2}x best (goal ≥ 0.9 on the median, the steadier figure: {}); {}1000 clients rackboot/nginx {rps_ratio:.2}x, rackboot errors: {} (goal: none)\n",
            if median_ratio >= 0.9 { "met" } else { "NOT met" },
            pinned_ratio
                .map(|r| format!("pinned (servers on CPU 1, curl on CPU 0) {r:.2}x median; "))
                .unwrap_or_default(),
            rb.errors,
        )?;
        let mut json_rows = serde_json::Map::new();
        for r in &rows {
            json_rows.insert(
                r.server.into(),
                json!({
                    "big_file_mib_s": r.big_mib_s,
                    "big_file_median_mib_s": r.big_median,
                    "runs_mib_s": r.big_runs,
                    "big_file_pinned_median_mib_s": r.pinned_median,
                    "wrk_1000_rps": r.rps,
                    "wrk_1000_runs_rps": r.rps_runs,
                    "wrk_latency_avg": r.latency_avg,
                    "wrk_latency_p99": r.latency_p99,
                    "wrk_errors": r.errors,
                    "peak_rss_kib": r.peak_rss_kib,
                }),
            );
        }
        json_rows.insert("big_file_ratio".into(), json!(big_ratio));
        json_rows.insert("big_file_median_ratio".into(), json!(median_ratio));
        json_rows.insert("wrk_1000_ratio".into(), json!(rps_ratio));
        json_rows.insert("big_file_pinned_median_ratio".into(), json!(pinned_ratio));
        self.results
            .insert("http".into(), serde_json::Value::Object(json_rows));
        Ok(())
    }
}

/// Puts every thread of `pid` and of its child processes (nginx's workers) on
/// `cpus` (a taskset list).
fn pin_tree(pid: u32, cpus: &str) -> Result<()> {
    let children = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    for p in std::iter::once(pid).chain(children) {
        let out = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &p.to_string()])
            .output()?;
        if !out.status.success() {
            bail!(
                "taskset -a -p -c {cpus} {p}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}
