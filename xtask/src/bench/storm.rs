//! `cargo xtask bench storm [--clients N[,N…]] [--window S] [--kernel-mib K]
//! [--initrd-mib I] [--only rackboot|peers] [--rackboot BIN] [--tftp-max-transfers N]`: a boot storm, rackboot against dnsmasq
//! (TFTP) + nginx (HTTP, sendfile) in the same run, written to `bench/results/`.
//!
//! Every simulated machine does what EDK2 + shim + GRUB do, from its own loopback
//! address (127.10.0.0/16 and up; Linux routes all of 127/8 to `lo`), so per-client
//! caps are never what limits it:
//! 1. the firmware's `tsize` probe for `bootx64.efi`, aborted with ERROR 8 on the OACK;
//! 2. `bootx64.efi` (shim) at blksize 1468 windowsize 4, then `grubx64.efi` (GRUB) at
//!    blksize 512 windowsize 4;
//! 3. GRUB's own TFTP client (blksize 1024, no window) for `grub/grub.cfg` and
//!    `grub/grub.cfg-<mac>`; the kernel and initrd URLs are taken from the latter's
//!    `insmod http` branch;
//! 4. kernel, then initrd, over HTTP/1.1 (one connection each, like GRUB).
//!
//! Every payload is checked (size and sha256; `grub/grub.cfg` byte for byte); any error,
//! timeout (TFTP: 1 s retransmission, 5 tries; HTTP: 30 s without progress) or wrong
//! byte is a failure of that client. Arrivals are spread evenly over the window.
//!
//! The stream is unsigned, `file://`: the real shim and signed GRUB from Debian (what the
//! demo stream ships) and a kernel and initrd of configurable size. The peers serve the
//! same files: dnsmasq from a TFTP root holding the bootloaders and one static per-MAC
//! config per client (rackboot's rendered config with nginx's port), nginx the images.
//!
//! The clients run in a separate, release-built xtask process (`--gen SPEC`), one
//! blocking thread per machine in flight (small stacks): simple and faithful, at the
//! price of a context switch per packet, paid the same for both servers.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;

use super::*;

const RETRY_AFTER: Duration = Duration::from_secs(1);
const MAX_RETRIES: u32 = 5;
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
const GRUB_CFG: &str = "set default=\"0\"\nset timeout=0\nconfigfile /grub/grub.cfg-${net_default_mac}\nconfigfile /grub/grub.cfg-default-${grub_cpu}\n";
const IMAGE_DIR: &str = "storm/amd64/generic/storm/stable";

struct Opts {
    clients: Vec<usize>,
    window_s: f64,
    kernel_mib: f64,
    initrd_mib: f64,
    rackboot: bool,
    peers: bool,
    /// A rackboot binary at hand: nothing is built, the clients run in this very
    /// xtask binary (for trying the harness; measurements use the release builds).
    bin: Option<PathBuf>,
    /// rackboot's `tftp.max_transfers` (its default, 4096, when not given).
    max_transfers: Option<usize>,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        clients: vec![5000],
        window_s: 10.0,
        kernel_mib: 2.0,
        initrd_mib: 4.0,
        rackboot: true,
        peers: true,
        bin: None,
        max_transfers: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .map(|s| s.as_str())
                .with_context(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--clients" => {
                o.clients = val()?
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--clients: a number or comma-separated numbers")?;
                if o.clients.iter().any(|&n| n == 0 || n > 60_000) {
                    bail!("--clients: each count must be 1..=60000");
                }
            }
            "--window" => o.window_s = val()?.parse().context("--window: seconds")?,
            "--kernel-mib" => o.kernel_mib = val()?.parse().context("--kernel-mib: MiB")?,
            "--initrd-mib" => o.initrd_mib = val()?.parse().context("--initrd-mib: MiB")?,
            "--rackboot" => o.bin = Some(PathBuf::from(val()?)),
            "--tftp-max-transfers" => {
                o.max_transfers = Some(val()?.parse().context("--tftp-max-transfers: a count")?)
            }
            "--only" => match val()? {
                "rackboot" => o.peers = false,
                "peers" => o.rackboot = false,
                other => bail!("--only: rackboot or peers, not {other}"),
            },
            other => bail!("bench storm: unknown argument {other}"),
        }
    }
    if !(o.window_s >= 0.0 && o.kernel_mib > 0.0 && o.initrd_mib > 0.0) {
        bail!("bench storm: --window must be >= 0 and the sizes > 0");
    }
    Ok(o)
}

/// A file every client must receive intact.
#[derive(Clone)]
struct Want {
    len: u64,
    sha: String,
}

fn want_of(data: &[u8]) -> Want {
    Want {
        len: data.len() as u64,
        sha: hex::encode(Sha256::digest(data)),
    }
}

fn want_json(w: &Want) -> serde_json::Value {
    json!({"len": w.len, "sha256": w.sha})
}

fn want_from(v: &serde_json::Value) -> Result<Want> {
    Ok(Want {
        len: v["len"].as_u64().context("spec: len")?,
        sha: v["sha256"].as_str().context("spec: sha256")?.to_string(),
    })
}

/// Client `i`'s source address and MAC.
fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        10 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

fn client_mac(i: usize) -> String {
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

// ---------------------------------------------------------------------------------
// The orchestrator

pub fn run(args: &[String]) -> Result<()> {
    if args.first().is_some_and(|a| a == "--gen") {
        let spec = args.get(1).context("--gen SPECFILE")?;
        return generator(Path::new(spec));
    }
    let o = parse_opts(args)?;
    let root = setup(&[
        "dnsmasq-base",
        "nginx-light",
        "shim-signed",
        "grub-efi-amd64-signed",
        "xz-utils",
    ])?;
    let target = prereq::target_dir(&root);
    let (bin, xtask) = match &o.bin {
        Some(bin) => (std::fs::canonicalize(bin)?, std::env::current_exe()?),
        None => {
            // rackboot and the client generator, both optimised.
            cmd(
                "cargo",
                &[
                    "build",
                    "--release",
                    "--package",
                    "rackboot",
                    "--package",
                    "xtask",
                ],
            )?;
            (
                target.join("release/rackboot"),
                target.join("release/xtask"),
            )
        }
    };
    let dir = target.join("storm");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let setup = Setup::build(&dir, &bin, &o)?;
    let stamp = output_stamp();
    let mut rows = Vec::new();
    for &n in &o.clients {
        for (which, wanted) in [("rackboot", o.rackboot), ("dnsmasq+nginx", o.peers)] {
            if !wanted {
                continue;
            }
            eprintln!("== storm: {n} clients against {which}");
            let r = setup.storm(which, n, o.window_s, &xtask)?;
            eprintln!("{}", serde_json::to_string(&r)?);
            rows.push(r);
        }
    }
    let knee = knee(&rows);
    let mut md = String::new();
    writeln!(md, "# rackboot boot storm ({stamp})\n")?;
    writeln!(
        md,
        "Loopback, {} cores (shared: other builds ran at the same time, numbers are noisy); rackboot {}; dnsmasq {} (TFTP, `--tftp-max` = clients + 100) + nginx {} (sendfile, 2 workers) serving the same files, in the same run.\n",
        num_cpus(),
        match &o.bin {
            Some(b) => format!("`{}` (given)", b.display()),
            None => "`--release` build".to_string(),
        } + &match o.max_transfers {
            Some(n) => format!(" with `tftp.max_transfers = {n}`"),
            None => " at its defaults".to_string(),
        },
        version("dnsmasq", &["--version"]),
        version("nginx", &["-v"]),
    )?;
    writeln!(
        md,
        "Per client, from its own 127.x address: tsize probe (ERROR 8), shim {} B (blksize 1468, windowsize 4), GRUB {} B (blksize 512, windowsize 4), `grub/grub.cfg` and `grub/grub.cfg-<mac>` (blksize 1024), then kernel {} B and initrd {} B over HTTP; every file's sha256 checked. Arrivals over {} s. Times are from a client's first packet, over the clients that finished; a client fails on any error, 5 TFTP retransmissions unanswered (1 s apart) or 30 s of HTTP silence.\n",
        setup.shim.len, setup.grub.len, setup.kernel.len, setup.initrd.len, o.window_s
    )?;
    writeln!(md, "| clients | server | failures | p50 / p95 / p99 to kernel (s) | p50 / p95 / p99 to initrd (s) | storm wall (s) | peak RSS (MiB) | CPU (s) |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        let p = |k: &str, q: &str| r[k][q].as_f64().unwrap_or(f64::NAN);
        writeln!(
            md,
            "| {} | {} | {} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {:.1} | {:.1} | {:.1} |",
            r["clients"], r["server"].as_str().unwrap_or(""), r["failed"],
            p("to_kernel_s", "p50"), p("to_kernel_s", "p95"), p("to_kernel_s", "p99"),
            p("to_initrd_s", "p50"), p("to_initrd_s", "p95"), p("to_initrd_s", "p99"),
            r["wall_s"].as_f64().unwrap_or(0.0),
            r["peak_rss_kib"].as_u64().unwrap_or(0) as f64 / 1024.0,
            r["cpu_s"].as_f64().unwrap_or(0.0),
        )?;
    }
    writeln!(md)?;
    for r in &rows {
        if let Some(errs) = r["errors"].as_array().filter(|e| !e.is_empty()) {
            writeln!(
                md,
                "First failures, {} with {} clients:",
                r["server"].as_str().unwrap_or(""),
                r["clients"]
            )?;
            for e in errs {
                writeln!(md, "- {}", e.as_str().unwrap_or(""))?;
            }
            writeln!(md)?;
        }
    }
    writeln!(md, "Knee: {knee}\n")?;
    let out_dir = root.join("bench/results");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join(format!("{stamp}-storm.md"));
    std::fs::write(&path, &md)?;
    std::fs::write(
        out_dir.join(format!("{stamp}-storm.json")),
        serde_json::to_string_pretty(&json!({"storm": rows, "knee": knee}))?,
    )?;
    println!("{md}");
    println!("written to {}", path.display());
    Ok(())
}

fn version(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output();
    let text = out
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    text.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) || w.starts_with("nginx/"))
        .unwrap_or("?")
        .trim_start_matches("nginx/")
        .to_string()
}

/// The smallest count where rackboot first fails, or its p99 to initrd is at least
/// twice that of the smallest count measured.
fn knee(rows: &[serde_json::Value]) -> String {
    let rb: Vec<&serde_json::Value> = rows.iter().filter(|r| r["server"] == "rackboot").collect();
    let Some(base) = rb.first() else {
        return "rackboot not measured".into();
    };
    let p99 = |r: &serde_json::Value| r["to_initrd_s"]["p99"].as_f64().unwrap_or(f64::INFINITY);
    for r in &rb {
        if r["failed"].as_u64().unwrap_or(1) > 0 {
            return format!("rackboot first fails at {} clients", r["clients"]);
        }
        if p99(r) >= 2.0 * p99(base) && r["clients"] != base["clients"] {
            return format!(
                "rackboot's p99 to initrd doubles ({:.2} s → {:.2} s) at {} clients",
                p99(base),
                p99(r),
                r["clients"]
            );
        }
    }
    format!(
        "not reached up to {} clients (no failure, p99 to initrd below twice that at {})",
        rb.last().map(|r| r["clients"].clone()).unwrap_or_default(),
        base["clients"]
    )
}

/// The synced snapshot and the peers' tree.
struct Setup {
    dir: PathBuf,
    bin: PathBuf,
    max_transfers: Option<usize>,
    shim: Want,
    grub: Want,
    kernel: Want,
    initrd: Want,
    /// rackboot's rendered `grub/grub.cfg-<mac>` for client 0, with its HTTP
    /// authority (to rewrite for nginx).
    mac_cfg0: Option<(String, String)>,
}

fn free_port_pair() -> Result<(u16, u16)> {
    Ok((free_udp_port()?, free_tcp_port()?))
}

impl Setup {
    fn build(dir: &Path, bin: &Path, o: &Opts) -> Result<Setup> {
        let stream = dir.join("stream");
        let shim_data = std::fs::read("/usr/lib/shim/shimx64.efi.signed")?;
        let grub_data = std::fs::read("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed")?;
        let kernel = pseudo_random(31, (o.kernel_mib * 1048576.0) as usize);
        let initrd = pseudo_random(37, (o.initrd_mib * 1048576.0) as usize);
        let squashfs = pseudo_random(41, 4096);
        let mut items = serde_json::Map::new();
        for (name, data) in [
            ("boot-kernel", &kernel),
            ("boot-initrd", &initrd),
            ("squashfs", &squashfs),
        ] {
            let path = format!("storm/amd64/1/{name}");
            let p = stream.join(&path);
            std::fs::create_dir_all(p.parent().expect("parent"))?;
            std::fs::write(&p, data)?;
            let w = want_of(data);
            items.insert(
                name.into(),
                json!({"ftype": name, "path": path, "size": w.len, "sha256": w.sha}),
            );
        }
        // The bootloader archive (tar.xz of shim and GRUB, as MAAS streams ship them).
        let bl = dir.join("bl");
        std::fs::create_dir_all(&bl)?;
        std::fs::write(bl.join("shimx64.efi.signed"), &shim_data)?;
        std::fs::write(bl.join("grubnetx64.efi.signed"), &grub_data)?;
        let tar_rel = "bootloaders/uefi/amd64/1/grub.tar.xz";
        std::fs::create_dir_all(stream.join("bootloaders/uefi/amd64/1"))?;
        let tar = stream.join(tar_rel);
        cmd(
            "tar",
            &[
                "-cJf",
                tar.to_str().context("utf-8")?,
                "-C",
                bl.to_str().context("utf-8")?,
                "shimx64.efi.signed",
                "grubnetx64.efi.signed",
            ],
        )?;
        let tw = want_of(&std::fs::read(&tar)?);
        let products = json!({"format": "products:1.0", "content_id": "storm:v3:download", "products": {
            "storm:amd64": {"os": "storm", "release": "storm", "version": "1", "arch": "amd64", "subarch": "generic",
                "subarches": "generic", "krel": "storm", "kflavor": "generic", "label": "stable",
                "versions": {"1": {"items": items}}},
            "storm:grub-efi-signed:uefi:amd64": {"os": "grub-efi-signed", "arch": "amd64", "arches": "amd64",
                "bootloader-type": "uefi", "label": "stable",
                "versions": {"1": {"items": {"grub2-signed": {"ftype": "archive.tar.xz", "path": tar_rel,
                    "size": tw.len, "sha256": tw.sha}}}}}}});
        write_unsigned_stream(&stream, "storm:v3:download", "storm", &products)?;
        let mut s = Setup {
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            max_transfers: o.max_transfers,
            shim: want_of(&shim_data),
            grub: want_of(&grub_data),
            kernel: want_of(&kernel),
            initrd: want_of(&initrd),
            mac_cfg0: None,
        };
        let (t, h) = free_port_pair()?;
        let config = s.config(t, h)?;
        let out = Command::new(bin)
            .args(["--config", config.to_str().context("utf-8")?, "sync"])
            .output()
            .context("cannot run rackboot sync")?;
        if !out.status.success() {
            bail!(
                "rackboot sync of the storm stream failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // rackboot's per-MAC config, to give the peers the same one.
        let _server = spawn(
            bin,
            &["--config", config.to_str().context("utf-8")?, "serve"],
        )?;
        let server: SocketAddr = format!("127.0.0.1:{t}").parse()?;
        let mut cfg = None;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(c) = tftp_get(
                IpAddr::V4(client_ip(0)),
                server,
                &format!("grub/grub.cfg-{}", client_mac(0)),
                1024,
                1,
                Fetch::Keep,
            ) {
                cfg = c.data;
                break;
            }
        }
        let cfg = String::from_utf8(
            cfg.context("rackboot did not serve grub/grub.cfg-<mac> over TFTP")?,
        )?;
        let (kurl, _) = http_urls(&cfg)?;
        s.mac_cfg0 = Some((cfg, kurl.0));
        // The peers' tree: bootloaders, GRUB configs, images, all plain files.
        let peer = dir.join("peer");
        std::fs::create_dir_all(peer.join("grub"))?;
        std::fs::create_dir_all(peer.join("images").join(IMAGE_DIR))?;
        std::fs::write(peer.join("bootx64.efi"), &shim_data)?;
        std::fs::write(peer.join("grubx64.efi"), &grub_data)?;
        std::fs::write(peer.join("grub/grub.cfg"), GRUB_CFG)?;
        std::fs::write(
            peer.join("images").join(IMAGE_DIR).join("boot-kernel"),
            &kernel,
        )?;
        std::fs::write(
            peer.join("images").join(IMAGE_DIR).join("boot-initrd"),
            &initrd,
        )?;
        Ok(s)
    }

    fn config(&self, tftp: u16, http: u16) -> Result<PathBuf> {
        let c = self.dir.join("rackboot.toml");
        std::fs::write(
            &c,
            format!(
                "state_dir = \"{state}\"\n[sync]\nauto = false\n[tftp]\nlisten = [\"127.0.0.1:{tftp}\"]\n{max}[http]\nlisten = [\"127.0.0.1:{http}\"]\n[boot]\ndefault_image = \"storm/storm\"\n[[sources]]\nurl = \"file://{stream}/streams/v1/index.json\"\nunsigned = true\n[[sources.selections]]\nos = \"storm\"\nrelease = \"storm\"\narches = [\"amd64\"]\n",
                state = self.dir.join("state").display(),
                max = self
                    .max_transfers
                    .map(|n| format!("max_transfers = {n}\n"))
                    .unwrap_or_default(),
                stream = self.dir.join("stream").display(),
            ),
        )?;
        Ok(c)
    }

    /// One storm of `n` clients against `which`, with the server's costs.
    fn storm(
        &self,
        which: &str,
        n: usize,
        window_s: f64,
        xtask: &Path,
    ) -> Result<serde_json::Value> {
        let mut procs: Vec<Proc> = Vec::new();
        let mut nginx_guard = None;
        let (tftp, pids) = if which == "rackboot" {
            let (t, h) = free_port_pair()?;
            let config = self.config(t, h)?;
            let p = spawn(
                &self.bin,
                &["--config", config.to_str().context("utf-8")?, "serve"],
            )?;
            let pid = p.pid();
            procs.push(p);
            wait_tcp(h)?;
            (format!("127.0.0.1:{t}"), vec![pid])
        } else {
            let peer = self.dir.join("peer");
            let port = free_tcp_port()?;
            let (cfg0, auth0) = self.mac_cfg0.as_ref().context("no per-MAC config")?;
            let auth = format!("127.0.0.1:{port}");
            for i in 0..n {
                let text = cfg0
                    .replace(auth0.as_str(), &auth)
                    .replace(&client_mac(0), &client_mac(i))
                    .replace(
                        &client_mac(0).replace(':', ""),
                        &client_mac(i).replace(':', ""),
                    );
                std::fs::write(peer.join(format!("grub/grub.cfg-{}", client_mac(i))), text)?;
            }
            let conf = self.dir.join("nginx.conf");
            std::fs::write(
                &conf,
                format!(
                    "daemon off;\nworker_processes 2;\nworker_rlimit_nofile 65536;\nerror_log stderr;\npid {d}/nginx.pid;\nevents {{ worker_connections 20000; }}\nhttp {{ access_log off; sendfile on; keepalive_timeout 65;\n server {{ listen {auth} backlog=65535; root {root}; }} }}\n",
                    d = self.dir.display(),
                    root = peer.display()
                ),
            )?;
            let ng = start_nginx(&self.dir, &conf)?;
            let ng_pid = ng.pid();
            nginx_guard = Some(ng);
            wait_tcp(port)?;
            let mut dm = Command::new("sh");
            dm.arg("-c").arg(format!(
                "ulimit -n 65536 2>/dev/null || ulimit -n 20000; exec /usr/sbin/dnsmasq --keep-in-foreground --conf-file=/dev/null --port=0 --enable-tftp --tftp-root={} --listen-address=127.0.0.2 --bind-interfaces --tftp-max={} --user=root --pid-file=",
                peer.display(),
                n + 100
            ));
            let dm = Proc::spawn_quiet(dm, "dnsmasq")?;
            let dm_pid = dm.pid();
            procs.push(dm);
            std::thread::sleep(Duration::from_millis(500));
            let mut pids = vec![dm_pid, ng_pid];
            pids.extend(children(ng_pid));
            ("127.0.0.2:69".to_string(), pids)
        };
        let cpu0: f64 = pids.iter().map(|&p| cpu_secs(p)).sum();
        let spec = self.dir.join("spec.json");
        std::fs::write(
            &spec,
            serde_json::to_vec(&json!({"tftp": tftp, "clients": n, "window_s": window_s,
                "shim": want_json(&self.shim), "grub": want_json(&self.grub),
                "kernel": want_json(&self.kernel), "initrd": want_json(&self.initrd)}))?,
        )?;
        let out = Command::new(xtask)
            .args(["bench", "storm", "--gen", spec.to_str().context("utf-8")?])
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run the storm generator")?;
        if !out.status.success() {
            bail!("the storm generator failed ({})", out.status);
        }
        let cpu: f64 = pids.iter().map(|&p| cpu_secs(p)).sum::<f64>() - cpu0;
        let rss: u64 = pids.iter().map(|&p| peak_rss_kib(p)).sum();
        drop(nginx_guard);
        drop(procs);
        let mut r: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("generator output")?;
        r["server"] = json!(which);
        r["peak_rss_kib"] = json!(rss);
        r["cpu_s"] = json!(cpu);
        Ok(r)
    }
}

fn wait_tcp(port: u16) -> Result<()> {
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}

/// PIDs whose parent is `pid` (nginx's workers).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if after
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok())
            == Some(pid)
        {
            out.push(p);
        }
    }
    out
}

/// User + system CPU seconds of a live process (clock ticks of 1/100 s).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

// ---------------------------------------------------------------------------------
// The clients

pub(crate) enum Fetch {
    /// The OACK's tsize, then ERROR 8 (what EDK2 does before loading a file).
    Probe,
    /// Hash as it arrives.
    Hash,
    /// Keep the bytes too.
    Keep,
}

pub(crate) struct Got {
    pub len: u64,
    pub sha: String,
    pub data: Option<Vec<u8>>,
}

/// One TFTP read from `src` (RFC 1350 + 2347/2348/2349/7440 receiver rules).
pub(crate) fn tftp_get(
    src: IpAddr,
    server: SocketAddr,
    path: &str,
    blksize: u16,
    ws: u16,
    mode: Fetch,
) -> Result<Got> {
    let sock = UdpSocket::bind(SocketAddr::new(src, 0))?;
    sock.set_read_timeout(Some(RETRY_AFTER))?;
    let req = crate::tftpload::rrq(path, blksize, ws);
    sock.send_to(&req, server)?;
    let (mut bs, mut win) = (512usize, 1u16);
    let mut peer: Option<SocketAddr> = None;
    let mut expect: u16 = 1;
    let mut in_window = 0u16;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut keep = matches!(mode, Fetch::Keep).then(Vec::new);
    let mut retries = 0;
    let mut buf = vec![0u8; 65536];
    let ack = crate::tftpload::ack;
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                retries += 1;
                if retries > MAX_RETRIES {
                    bail!("{path}: timed out at {total} bytes");
                }
                match peer {
                    None => sock.send_to(&req, server)?,
                    Some(p) => sock.send_to(&ack(expect.wrapping_sub(1)), p)?,
                };
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let pkt = &buf[..n];
        if from.ip() != server.ip() || peer.is_some_and(|p| p != from) || n < 4 {
            continue;
        }
        peer = Some(from);
        retries = 0;
        match u16::from_be_bytes([pkt[0], pkt[1]]) {
            6 if expect == 1 && total == 0 => {
                let parts: Vec<&[u8]> = pkt[2..].split(|b| *b == 0).collect();
                let mut tsize = None;
                for kv in parts.chunks(2) {
                    if kv.len() < 2 {
                        continue;
                    }
                    let v = String::from_utf8_lossy(kv[1]);
                    match String::from_utf8_lossy(kv[0]).to_lowercase().as_str() {
                        "blksize" => bs = v.parse().unwrap_or(512),
                        "windowsize" => win = v.parse().unwrap_or(1),
                        "tsize" => tsize = v.parse::<u64>().ok(),
                        _ => {}
                    }
                }
                if matches!(mode, Fetch::Probe) {
                    sock.send_to(b"\x00\x05\x00\x08\x00", from)?;
                    let len = tsize.with_context(|| format!("{path}: no tsize in the OACK"))?;
                    return Ok(Got {
                        len,
                        sha: String::new(),
                        data: None,
                    });
                }
                sock.send_to(&ack(0), from)?;
            }
            3 => {
                if matches!(mode, Fetch::Probe) {
                    bail!("{path}: the server sent data instead of an OACK to a tsize probe");
                }
                let block = u16::from_be_bytes([pkt[2], pkt[3]]);
                let data = &pkt[4..];
                if block == expect {
                    hasher.update(data);
                    if let Some(k) = keep.as_mut() {
                        k.extend_from_slice(data);
                    }
                    total += data.len() as u64;
                    expect = expect.wrapping_add(1);
                    in_window += 1;
                    if data.len() < bs {
                        sock.send_to(&ack(block), from)?;
                        return Ok(Got {
                            len: total,
                            sha: hex::encode(hasher.finalize()),
                            data: keep,
                        });
                    } else if in_window >= win {
                        in_window = 0;
                        sock.send_to(&ack(block), from)?;
                    }
                } else if block != expect.wrapping_sub(1) {
                    in_window = 0;
                    sock.send_to(&ack(expect.wrapping_sub(1)), from)?;
                }
            }
            5 => {
                let msg = String::from_utf8_lossy(&pkt[4..])
                    .trim_end_matches('\0')
                    .to_string();
                bail!(
                    "{path}: TFTP error {}: {msg}",
                    u16::from_be_bytes([pkt[2], pkt[3]])
                );
            }
            _ => {}
        }
    }
}

/// The `(http,HOST:PORT)/path` kernel and initrd of a GRUB config's `insmod http` branch.
pub(crate) type Url = (String, String);
pub(crate) fn http_urls(cfg: &str) -> Result<(Url, Url)> {
    let find = |kw: &str| -> Result<Url> {
        cfg.lines()
            .filter_map(|l| l.trim().strip_prefix(kw))
            .find_map(|rest| {
                let word = rest.split_whitespace().next()?.trim_matches('\'');
                let rest = word.strip_prefix("(http,")?;
                let (auth, path) = rest.split_once(')')?;
                Some((auth.to_string(), path.to_string()))
            })
            .with_context(|| format!("no `{kw}(http,…)` line in the GRUB config"))
    };
    Ok((find("linux ")?, find("initrd ")?))
}

mod sys {
    //! socket/bind/connect from the C library: a TCP client bound to its own address
    //! before it connects (std cannot), without a libc crate.
    #[repr(C)]
    pub struct SockaddrIn {
        pub family: u16,
        pub port: u16,
        pub addr: u32,
        pub zero: [u8; 8],
    }
    extern "C" {
        pub fn socket(domain: i32, ty: i32, proto: i32) -> i32;
        pub fn bind(fd: i32, addr: *const SockaddrIn, len: u32) -> i32;
        pub fn connect(fd: i32, addr: *const SockaddrIn, len: u32) -> i32;
    }
}

fn tcp_from(src: Ipv4Addr, dst: SocketAddr) -> Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else {
        bail!("IPv4 only")
    };
    let sa = |ip: Ipv4Addr, port: u16| sys::SockaddrIn {
        family: 2,
        port: port.to_be(),
        addr: u32::from_ne_bytes(ip.octets()),
        zero: [0; 8],
    };
    // SAFETY: plain syscalls on a descriptor we own (closed by the TcpStream, or here on error).
    unsafe {
        let fd = sys::socket(2, 1 | 0o2000000, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket");
        }
        let stream = TcpStream::from_raw_fd(fd);
        let len = std::mem::size_of::<sys::SockaddrIn>() as u32;
        if sys::bind(fd, &sa(src, 0), len) < 0 {
            return Err(std::io::Error::last_os_error()).context("bind");
        }
        if sys::connect(fd, &sa(*dst.ip(), dst.port()), len) < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("connect to {dst}"));
        }
        Ok(stream)
    }
}

/// GET over its own connection, as GRUB's `http` module does; the body is hashed.
pub(crate) fn http_get(src: Ipv4Addr, (auth, path): &Url) -> Result<Got> {
    let dst: SocketAddr = auth
        .parse()
        .with_context(|| format!("HTTP authority {auth}"))?;
    let mut s = tcp_from(src, dst)?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {auth}\r\nUser-Agent: GRUB 2.06\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::with_capacity(256 * 1024, s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", line.trim());
    }
    let mut len = None;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<u64>().ok();
            }
        }
    }
    let len = len.with_context(|| format!("GET {path}: no Content-Length"))?;
    let mut hasher = Sha256::new();
    let mut left = len;
    while left > 0 {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            bail!("GET {path}: closed after {} of {len} bytes", len - left);
        }
        let take = chunk.len().min(left as usize);
        hasher.update(&chunk[..take]);
        r.consume(take);
        left -= take as u64;
    }
    let _ = r.read(&mut [0u8; 1]);
    Ok(Got {
        len,
        sha: hex::encode(hasher.finalize()),
        data: None,
    })
}

struct ClientSpec {
    tftp: SocketAddr,
    shim: Want,
    grub: Want,
    kernel: Want,
    initrd: Want,
}

fn check(what: &str, got: &Got, want: &Want) -> Result<()> {
    if got.len != want.len || (!got.sha.is_empty() && got.sha != want.sha) {
        bail!(
            "{what}: got {} bytes with sha256 {}, not the file",
            got.len,
            got.sha
        );
    }
    Ok(())
}

/// One machine's boot; returns the seconds to kernel and to initrd complete.
fn boot(i: usize, spec: &ClientSpec) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let ip = client_ip(i);
    let src = IpAddr::V4(ip);
    let probe = tftp_get(src, spec.tftp, "bootx64.efi", 1468, 1, Fetch::Probe)?;
    check("bootx64.efi (tsize)", &probe, &spec.shim)?;
    check(
        "bootx64.efi",
        &tftp_get(src, spec.tftp, "bootx64.efi", 1468, 4, Fetch::Hash)?,
        &spec.shim,
    )?;
    check(
        "grubx64.efi",
        &tftp_get(src, spec.tftp, "grubx64.efi", 512, 4, Fetch::Hash)?,
        &spec.grub,
    )?;
    let cfg = tftp_get(src, spec.tftp, "grub/grub.cfg", 1024, 1, Fetch::Keep)?;
    if cfg.data.as_deref() != Some(GRUB_CFG.as_bytes()) {
        bail!("grub/grub.cfg: not the expected chain config");
    }
    let mac = client_mac(i);
    let cfg = tftp_get(
        src,
        spec.tftp,
        &format!("grub/grub.cfg-{mac}"),
        1024,
        1,
        Fetch::Keep,
    )?;
    let text =
        String::from_utf8(cfg.data.unwrap_or_default()).context("grub.cfg-<mac>: not UTF-8")?;
    let (k, r) = http_urls(&text).with_context(|| format!("grub/grub.cfg-{mac}"))?;
    check("kernel", &http_get(ip, &k)?, &spec.kernel)?;
    let to_kernel = t0.elapsed().as_secs_f64();
    check("initrd", &http_get(ip, &r)?, &spec.initrd)?;
    Ok((to_kernel, t0.elapsed().as_secs_f64()))
}

fn percentiles(mut v: Vec<f64>) -> serde_json::Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    json!({"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "max": v[v.len() - 1]})
}

/// `xtask bench storm --gen SPEC`: runs the clients, prints one JSON line.
fn generator(spec_path: &Path) -> Result<()> {
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(spec_path)?)?;
    let n = s["clients"].as_u64().context("spec: clients")? as usize;
    let window = s["window_s"].as_f64().context("spec: window_s")?;
    let spec = std::sync::Arc::new(ClientSpec {
        tftp: s["tftp"].as_str().context("spec: tftp")?.parse()?,
        shim: want_from(&s["shim"])?,
        grub: want_from(&s["grub"])?,
        kernel: want_from(&s["kernel"])?,
        initrd: want_from(&s["initrd"])?,
    });
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    for i in 0..n {
        let at = Duration::from_secs_f64(window * i as f64 / n as f64);
        if let Some(wait) = at.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        let (txc, spec) = (tx.clone(), spec.clone());
        let spawned = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = txc.send((i, boot(i, &spec).map_err(|e| format!("{e:#}"))));
            });
        if let Err(e) = spawned {
            let _ = tx.send((
                i,
                Err(format!("generator: cannot start a client thread: {e}")),
            ));
        }
    }
    drop(tx);
    let (mut tk, mut ti, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = 0usize;
    for (i, r) in rx {
        match r {
            Ok((k, r)) => {
                tk.push(k);
                ti.push(r);
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 8 {
                    errors.push(format!("client {i} ({}): {e}", client_ip(i)));
                }
            }
        }
    }
    let out = json!({"clients": n, "ok": ti.len(), "failed": failed, "wall_s": t0.elapsed().as_secs_f64(),
        "to_kernel_s": percentiles(tk), "to_initrd_s": percentiles(ti), "errors": errors});
    println!("{out}");
    Ok(())
}
