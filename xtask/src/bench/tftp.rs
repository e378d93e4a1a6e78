//! TFTP: rackboot against tftpd-hpa, atftpd and dnsmasq, each measured with two clients
//! in the same run:
//! - the atftp client (a real, widely used client; one process per download), and
//! - xtask's own load generator (`crate::tftpload`, run as an optimised process; the
//!   same client code for every server, every download's size and sha256 checked).
//!
//! Cases: one 64 MiB transfer at windowsize 1 and at windowsize 8 (blksize 1468), and
//! 200 and 1000 concurrent clients fetching a 4 MiB file (blksize 1468, windowsize 1,
//! aggregate throughput = bytes of correct downloads / wall time).
//!
//! The servers take turns: every round of a case runs each server once, each on a
//! freshly started process (so one that falls over only fails its own run), and the
//! tables show the median of the rounds (best in brackets). On a small shared machine
//! the load of the moment swings single runs by ±15%; turns spread it over all servers.

use super::*;

/// Where atftp writes its downloads (tmpfs, so the disk is not measured).
const SHM: &str = "/dev/shm/rackboot-bench";

const SERVERS: [&str; 4] = ["rackboot", "tftpd-hpa", "atftpd", "dnsmasq"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Client {
    Atftp,
    Loadgen,
}

#[derive(Clone, Copy)]
enum Case {
    /// One download of the big file at this windowsize.
    Single(u16),
    /// This many concurrent downloads of the small file.
    Swarm(usize),
}

const CASES: [(Case, &str, usize); 4] = [
    (Case::Single(1), "windowsize 1", 5),
    (Case::Single(8), "windowsize 8", 5),
    (Case::Swarm(200), "200 clients", 3),
    (Case::Swarm(1000), "1000 clients", 2),
];

/// The runs of one case for one server and client: MiB/s per round (0 = failed run)
/// and failed downloads.
#[derive(Clone, Debug, Default)]
struct Cell {
    runs: Vec<f64>,
    failures: usize,
}

impl Cell {
    fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn best(&self) -> f64 {
        self.runs.iter().copied().fold(0.0, f64::max)
    }
}

/// What a case needs to know about the files.
struct Files {
    big: u64,
    big_sha: String,
    small: u64,
    small_sha: String,
}

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
            kids.push((Proc::adopt("atftp", child), out));
        }
        let mut failures = 0;
        for (mut c, out) in kids {
            let ok = c.child.wait()?.success()
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

    /// One run of `case` with `client` against a server at `host:port`: (MiB/s of
    /// correct downloads, failed downloads).
    fn tftp_run(
        &self,
        client: Client,
        case: Case,
        host: &str,
        port: u16,
        f: &Files,
    ) -> (f64, usize) {
        let addr = format!("{host}:{port}");
        let r: Result<(f64, usize)> = match (client, case) {
            (Client::Atftp, Case::Single(ws)) => {
                let out = Path::new(SHM).join("single");
                self.atftp(host, port, KERNEL, ws, &out).and_then(|d| {
                    let got = hex::encode(Sha256::digest(std::fs::read(&out)?));
                    if got != f.big_sha {
                        bail!("{addr}: atftp got a wrong file");
                    }
                    Ok((mib_s(f.big, d), 0))
                })
            }
            (Client::Atftp, Case::Swarm(n)) => {
                self.atftp_swarm(host, port, n, INITRD, f.small, &f.small_sha)
            }
            (Client::Loadgen, Case::Single(ws)) => self
                .loadgen(&[
                    "single".into(),
                    addr.clone(),
                    KERNEL.into(),
                    "1468".into(),
                    ws.to_string(),
                ])
                .and_then(|v| {
                    if v["bytes"].as_u64() != Some(f.big)
                        || v["sha256"].as_str() != Some(&f.big_sha)
                    {
                        bail!("{addr}: the load generator got a wrong file: {v}");
                    }
                    let secs = v["secs"].as_f64().context("secs")?;
                    Ok((f.big as f64 / secs / (1024.0 * 1024.0), 0))
                }),
            (Client::Loadgen, Case::Swarm(n)) => self
                .loadgen(&[
                    "swarm".into(),
                    addr.clone(),
                    INITRD.into(),
                    "1468".into(),
                    "1".into(),
                    n.to_string(),
                    f.small.to_string(),
                    f.small_sha.clone(),
                ])
                .and_then(|v| {
                    let failed = v["failed"].as_u64().context("failed")? as usize;
                    if failed > 0 {
                        eprintln!("{addr}: {failed} of {n} downloads failed: {}", v["errors"]);
                    }
                    let bytes = v["bytes"].as_u64().context("bytes")?;
                    let secs = v["secs"].as_f64().context("secs")?;
                    Ok((bytes as f64 / secs / (1024.0 * 1024.0), failed))
                }),
        };
        match r {
            Ok(x) => x,
            Err(e) => {
                eprintln!("{e:#}");
                let failed = match case {
                    Case::Single(_) => 1,
                    Case::Swarm(n) => n,
                };
                (0.0, failed)
            }
        }
    }

    pub(super) fn tftp_bench(&mut self) -> Result<()> {
        let files = Files {
            big: std::fs::metadata(self.snapshot.join(KERNEL))?.len(),
            big_sha: hex::encode(Sha256::digest(std::fs::read(self.snapshot.join(KERNEL))?)),
            small: std::fs::metadata(self.snapshot.join(INITRD))?.len(),
            small_sha: hex::encode(Sha256::digest(std::fs::read(self.snapshot.join(INITRD))?)),
        };
        let _ = std::fs::remove_dir_all(SHM);
        std::fs::create_dir_all(SHM)?;
        let mut ports = BTreeMap::new();
        for server in SERVERS {
            let at = if server == "dnsmasq" {
                ("127.0.0.2", 69)
            } else {
                ("127.0.0.1", free_udp_port()?)
            };
            ports.insert(server, at);
        }
        // cells[client][case][server]
        let mut cells: BTreeMap<(u8, usize, &str), Cell> = BTreeMap::new();
        let mut rss_kib = 0;
        for (ci, (case, name, rounds)) in CASES.iter().enumerate() {
            for round in 0..*rounds {
                for client in [Client::Atftp, Client::Loadgen] {
                    for server in SERVERS {
                        let (host, port) = ports[server];
                        eprintln!(
                            "tftp bench: {name}, round {}, {}, {server}",
                            round + 1,
                            if client == Client::Atftp {
                                "atftp"
                            } else {
                                "load generator"
                            }
                        );
                        let p = self.start_server(server, port)?;
                        let (rate, failed) = self.tftp_run(client, *case, host, port, &files);
                        if server == "rackboot" {
                            rss_kib = rss_kib.max(peak_rss_kib(p.pid()));
                        }
                        drop(p);
                        let cell = cells.entry((client as u8, ci, server)).or_default();
                        cell.runs.push(rate);
                        cell.failures += failed;
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(SHM);

        writeln!(
            self.report,
            "## TFTP ({} MiB file, blksize 1468; 200 and 1000 concurrent clients × {} MiB, windowsize 1)\n",
            files.big >> 20,
            files.small >> 20
        )?;
        writeln!(
            self.report,
            "Servers take turns; each cell is the median of its rounds ({}), best in brackets; ratios are of medians.\n",
            CASES
                .iter()
                .map(|(_, n, r)| format!("{n}: {r}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            self.report,
            "rackboot peak RSS (the largest of its processes, including 1000 clients): {:.1} MiB (goal < 64 MiB)\n",
            rss_kib as f64 / 1024.0
        )?;
        let mut json_tables = serde_json::Map::new();
        for client in [Client::Atftp, Client::Loadgen] {
            if client == Client::Atftp {
                writeln!(self.report, "### atftp client (one process per download)\n")?;
                writeln!(
                    self.report,
                    "The atftp client is the bottleneck at high rates (one process per download; \
                     a `pselect6`, a `recvmsg` and a `sendto` per block, and it writes the file), \
                     so these numbers understate the faster servers; the load-generator table \
                     below measures the servers.\n"
                )?;
            } else {
                writeln!(
                    self.report,
                    "### xtask load generator (one optimised process: a blocking socket for single transfers, one epoll thread for the concurrent clients, leaving the other core to the server; the same client for every server)\n\nThe one client thread saturates its core at about 400 MiB/s on this machine, so concurrent-client cells near that measure the client as much as the server.\n"
                )?;
            }
            let get = |ci: usize, server: &str| cells[&(client as u8, ci, server)].clone();
            writeln!(
                self.report,
                "| server | {} | failed (200 / 1000) |\n|---|---|---|---|---|---|",
                CASES.iter().map(|c| c.1).collect::<Vec<_>>().join(" | ")
            )?;
            let mut json_rows = serde_json::Map::new();
            for server in SERVERS {
                let mut line = format!("| {server} |");
                let mut js = serde_json::Map::new();
                for (ci, (_, name, _)) in CASES.iter().enumerate() {
                    let c = get(ci, server);
                    if c.median() > 0.0 {
                        write!(line, " {:.1} MiB/s ({:.1}) |", c.median(), c.best())?;
                    } else {
                        write!(line, " failed |")?;
                    }
                    js.insert(
                        name.to_string(),
                        json!({"median_mib_s": c.median(), "runs_mib_s": c.runs, "failures": c.failures}),
                    );
                }
                write!(
                    line,
                    " {} / {} |",
                    get(2, server).failures,
                    get(3, server).failures
                )?;
                writeln!(self.report, "{line}")?;
                json_rows.insert(server.into(), serde_json::Value::Object(js));
            }
            let m = |ci: usize, server: &str| get(ci, server).median();
            writeln!(
                self.report,
                "\nratios: ws=1 rackboot/tftpd-hpa {:.2}x (goal ≥ 1); ws=8 rackboot/atftpd {:.2}x (goal ≥ 1.5); 200 clients rackboot/tftpd-hpa {:.2}x (goal ≥ 1.5); 1000 clients rackboot/tftpd-hpa {:.2}x (goal ≥ 1.5); rackboot failed downloads {} (goal 0)\n",
                m(0, "rackboot") / m(0, "tftpd-hpa"),
                m(1, "rackboot") / m(1, "atftpd"),
                m(2, "rackboot") / m(2, "tftpd-hpa"),
                m(3, "rackboot") / m(3, "tftpd-hpa"),
                (0..4).map(|ci| get(ci, "rackboot").failures).sum::<usize>(),
            )?;
            json_tables.insert(
                if client == Client::Atftp {
                    "atftp"
                } else {
                    "loadgen"
                }
                .into(),
                serde_json::Value::Object(json_rows),
            );
        }
        json_tables.insert("rackboot_peak_rss_kib".into(), json!(rss_kib));
        self.results
            .insert("tftp".into(), serde_json::Value::Object(json_tables));
        Ok(())
    }
}
