//! TFTP: rackboot against tftpd-hpa, atftpd and dnsmasq, each measured with two clients
//! in the same run:
//! - the atftp client (a real, widely used client; one process per download), and
//! - xtask's own load generator (`crate::tftpload`, run as an optimised process; the
//!   same client code for every server, every download's size and sha256 checked).
//!
//! Cases: one 64 MiB transfer at windowsize 1 and at windowsize 8 (blksize 1468, best
//! of 3), and 200 and 1000 concurrent clients fetching a 4 MiB file (blksize 1468,
//! windowsize 1, aggregate throughput = bytes of correct downloads / wall time).

use super::*;

/// One server's results with one client kind.
#[derive(Clone, Debug, Default)]
struct Row {
    ws1: f64,
    ws8: f64,
    c200: f64,
    f200: usize,
    c1000: f64,
    f1000: usize,
}

impl Row {
    fn json(&self) -> serde_json::Value {
        json!({"ws1_mib_s": self.ws1, "ws8_mib_s": self.ws8,
               "clients200_mib_s": self.c200, "clients200_failures": self.f200,
               "clients1000_mib_s": self.c1000, "clients1000_failures": self.f1000})
    }
}

/// Where atftp writes its downloads (tmpfs, so the disk is not measured).
const SHM: &str = "/dev/shm/rackboot-bench";

const SERVERS: [&str; 4] = ["rackboot", "tftpd-hpa", "atftpd", "dnsmasq"];

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

    /// `clients` concurrent atftp processes fetching `path` (`len` bytes, sha256
    /// `want`); returns (aggregate MiB/s of correct downloads, failures).
    fn atftp_swarm(
        &self,
        host: &str,
        port: u16,
        clients: usize,
        path: &str,
        len: u64,
        want: &str,
    ) -> Result<(f64, usize)> {
        let shm = Path::new(SHM);
        let t = Instant::now();
        let mut kids = Vec::new();
        for i in 0..clients {
            let out = shm.join(format!("c{i}"));
            let child = Command::new("timeout")
                .args([
                    "300",
                    "atftp",
                    "--get",
                    "-r",
                    path,
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
            kids.push((Proc(child), out));
        }
        let mut failures = 0;
        for (mut c, out) in kids {
            let ok = c.0.wait()?.success()
                && std::fs::read(&out)
                    .map(|d| hex::encode(Sha256::digest(&d)) == want)
                    .unwrap_or(false);
            if !ok {
                failures += 1;
            }
            let _ = std::fs::remove_file(&out);
        }
        let wall = t.elapsed();
        Ok((mib_s(len * (clients - failures) as u64, wall), failures))
    }

    /// Runs the load generator process; returns its JSON answer.
    fn loadgen(&self, args: &[String]) -> Result<serde_json::Value> {
        let mut full = vec!["bench".to_string(), "--loadgen".to_string()];
        full.extend_from_slice(args);
        let out = Command::new("timeout")
            .arg("900")
            .arg(&self.xtask)
            .args(&full)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.xtask.display()))?;
        if !out.status.success() {
            bail!(
                "load generator {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Best of 3 single downloads with the load generator; returns MiB/s (0 if all
    /// three failed).
    fn loadgen_single(&self, addr: &str, ws: u16, len: u64, want: &str) -> f64 {
        let mut best = 0f64;
        for _ in 0..3 {
            let r = self
                .loadgen(&[
                    "single".into(),
                    addr.into(),
                    KERNEL.into(),
                    "1468".into(),
                    ws.to_string(),
                ])
                .and_then(|v| {
                    if v["bytes"].as_u64() != Some(len) || v["sha256"].as_str() != Some(want) {
                        bail!("{addr}: the load generator got a wrong file: {v}");
                    }
                    v["secs"].as_f64().context("secs")
                });
            match r {
                Ok(secs) => best = best.max(len as f64 / secs / (1024.0 * 1024.0)),
                Err(e) => eprintln!("{e:#}"),
            }
        }
        best
    }

    /// `clients` concurrent downloads with the load generator; returns (MiB/s of correct
    /// downloads, failures).
    fn loadgen_swarm(
        &self,
        addr: &str,
        clients: usize,
        len: u64,
        want: &str,
    ) -> Result<(f64, usize)> {
        let v = self.loadgen(&[
            "swarm".into(),
            addr.into(),
            INITRD.into(),
            "1468".into(),
            "1".into(),
            clients.to_string(),
            len.to_string(),
            want.into(),
        ])?;
        let failed = v["failed"].as_u64().context("failed")? as usize;
        if failed > 0 {
            eprintln!(
                "{addr}: {failed} of {clients} downloads failed: {}",
                v["errors"]
            );
        }
        let bytes = v["bytes"].as_u64().context("bytes")?;
        let secs = v["secs"].as_f64().context("secs")?;
        Ok((bytes as f64 / secs / (1024.0 * 1024.0), failed))
    }

    pub(super) fn tftp_bench(&mut self) -> Result<()> {
        let size = std::fs::metadata(self.snapshot.join(KERNEL))?.len();
        let small = std::fs::metadata(self.snapshot.join(INITRD))?.len();
        let want_small = hex::encode(Sha256::digest(std::fs::read(self.snapshot.join(INITRD))?));
        let want_big = hex::encode(Sha256::digest(std::fs::read(self.snapshot.join(KERNEL))?));
        let shm = PathBuf::from(SHM);
        let _ = std::fs::remove_dir_all(&shm);
        std::fs::create_dir_all(&shm)?;
        let mut atftp_rows: Vec<(&str, Row)> = Vec::new();
        let mut fast_rows: Vec<(&str, Row)> = Vec::new();
        let mut json_rows = serde_json::Map::new();
        let mut rss_kib = 0;
        for server in SERVERS {
            let (host, port) = if server == "dnsmasq" {
                ("127.0.0.2", 69)
            } else {
                ("127.0.0.1", free_udp_port()?)
            };
            let addr = format!("{host}:{port}");
            // A fresh server for each group of cases, so one that falls over (atftpd
            // aborts past 1024 descriptors) only fails its own cases.
            let mut rss = |p: &Proc| {
                if server == "rackboot" {
                    rss_kib = rss_kib.max(peak_rss_kib(p.0.id()));
                }
            };
            eprintln!("tftp bench: {server}, atftp client");
            let out = shm.join("single");
            let best = |ws: u16| -> f64 {
                let mut best = 0f64;
                for _ in 0..3 {
                    let r = self.atftp(host, port, KERNEL, ws, &out).and_then(|d| {
                        let got = hex::encode(Sha256::digest(std::fs::read(&out)?));
                        if got != want_big {
                            bail!("{server}: atftp got a wrong file");
                        }
                        Ok(d)
                    });
                    match r {
                        Ok(d) => best = best.max(mib_s(size, d)),
                        Err(e) => eprintln!("{server}: {e:#}"),
                    }
                }
                best
            };
            let mut a = Row::default();
            let p = self.start_server(server, port)?;
            (a.ws1, a.ws8) = (best(1), best(8));
            (a.c200, a.f200) = self.atftp_swarm(host, port, 200, INITRD, small, &want_small)?;
            rss(&p);
            drop(p);
            let p = self.start_server(server, port)?;
            (a.c1000, a.f1000) = self.atftp_swarm(host, port, 1000, INITRD, small, &want_small)?;
            rss(&p);
            drop(p);

            eprintln!("tftp bench: {server}, load generator");
            let mut f = Row::default();
            let p = self.start_server(server, port)?;
            f.ws1 = self.loadgen_single(&addr, 1, size, &want_big);
            f.ws8 = self.loadgen_single(&addr, 8, size, &want_big);
            (f.c200, f.f200) = self.loadgen_swarm(&addr, 200, small, &want_small)?;
            rss(&p);
            drop(p);
            let p = self.start_server(server, port)?;
            (f.c1000, f.f1000) = self.loadgen_swarm(&addr, 1000, small, &want_small)?;
            rss(&p);
            drop(p);

            json_rows.insert(
                server.into(),
                json!({"atftp": a.json(), "loadgen": f.json(),
                       "peak_rss_kib": if server == "rackboot" { Some(rss_kib) } else { None }}),
            );
            atftp_rows.push((server, a));
            fast_rows.push((server, f));
        }
        let _ = std::fs::remove_dir_all(&shm);

        writeln!(
            self.report,
            "## TFTP ({} MiB file, blksize 1468, best of 3; 200 and 1000 concurrent clients × {} MiB, windowsize 1)\n",
            size >> 20,
            small >> 20
        )?;
        writeln!(
            self.report,
            "rackboot peak RSS over the whole TFTP run (including 1000 clients): {:.1} MiB (goal < 64 MiB)\n",
            rss_kib as f64 / 1024.0
        )?;
        writeln!(self.report, "### atftp client (one process per download)\n")?;
        writeln!(
            self.report,
            "The atftp client is the bottleneck at high rates (one process per download; \
             a `pselect6`, a `recvmsg` and a `sendto` per block, and it writes the file), so \
             these numbers understate the faster servers; the load-generator table below \
             measures the servers.\n"
        )?;
        table(&mut self.report, &atftp_rows)?;
        writeln!(
            self.report,
            "### xtask load generator (one optimised process: a blocking socket for single transfers, one epoll thread for the concurrent clients; the same client for every server)\n"
        )?;
        table(&mut self.report, &fast_rows)?;
        self.results
            .insert("tftp".into(), serde_json::Value::Object(json_rows));
        Ok(())
    }
}

/// Writes one results table and its ratio line.
fn table(out: &mut String, rows: &[(&str, Row)]) -> Result<()> {
    writeln!(
        out,
        "| server | windowsize 1 | windowsize 8 | 200 clients | 1000 clients | failed (200 / 1000) |\n|---|---|---|---|---|---|"
    )?;
    let rate = |v: f64| {
        if v > 0.0 {
            format!("{v:.1} MiB/s")
        } else {
            "failed".to_string()
        }
    };
    for (name, r) in rows {
        writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} / {} |",
            rate(r.ws1),
            rate(r.ws8),
            rate(r.c200),
            rate(r.c1000),
            r.f200,
            r.f1000
        )?;
    }
    let get = |n: &str| &rows.iter().find(|r| r.0 == n).expect("measured").1;
    let (rb, hpa, at) = (get("rackboot"), get("tftpd-hpa"), get("atftpd"));
    writeln!(
        out,
        "\nratios: ws=1 rackboot/tftpd-hpa {:.2}x (goal ≥ 1); ws=8 rackboot/atftpd {:.2}x (goal ≥ 1.5); 200 clients rackboot/tftpd-hpa {:.2}x (goal ≥ 1.5); 1000 clients rackboot/tftpd-hpa {:.2}x (goal ≥ 1.5); rackboot failures {} (goal 0)\n",
        rb.ws1 / hpa.ws1,
        rb.ws8 / at.ws8,
        rb.c200 / hpa.c200,
        rb.c1000 / hpa.c1000,
        rb.f200 + rb.f1000,
    )?;
    Ok(())
}
