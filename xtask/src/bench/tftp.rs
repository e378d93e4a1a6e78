//! TFTP: rackboot against tftpd-hpa, atftpd and dnsmasq.

use super::*;

impl Bench {
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

    pub(super) fn tftp_bench(&mut self) -> Result<()> {
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
}
