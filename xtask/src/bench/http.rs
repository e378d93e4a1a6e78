//! HTTP: rackboot against nginx (sendfile on).

use super::*;

impl Bench {
    pub(super) fn http_bench(&mut self) -> Result<()> {
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
