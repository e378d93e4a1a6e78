//! `cargo xtask image [--arch amd64|arm64] [--check | --no-check]`: the rackboot
//! appliance disk image.
//!
//! Builds `<target dir>/image/rackboot-appliance-amd64.img` and its update artefacts
//! (`<target dir>/image/updates/`: signed RAUC bundles, `SHA256SUMS`, `SHA256SUMS.sig`)
//! from the definition in `images/appliance/` (package list, dpkg excludes, files, the
//! GRUB A/B script) with its `build.sh`: mmdebstrap (Debian 12 from the package
//! mirror), the static x86_64 binary from `cargo xtask dist` at /usr/bin/rackboot, the
//! unit, sysusers.d, tmpfiles.d and default config from `systemd/`, RAUC with its GRUB
//! backend, systemd-networkd, serial console on ttyS0, and a GPT disk (ESP with shim +
//! signed GRUB, root slots A and B, the settings partition, the data partition),
//! written without mounts or loop devices. The check's v2 is the same tree with the
//! binary built with `RACKBOOT_VERSION_SUFFIX`; v3 is v2 with a config rackboot
//! refuses. Then (unless `--no-check`) it checks the image; `--check` checks the image
//! already built (building it when missing).
//!
//! The check boots a sparse copy of the image, enlarged to 6 GiB, in QEMU (q35, OVMF,
//! virtio disk and NIC, user-mode networking with hostfwds to the appliance's HTTP
//! port 5248 and SSH). KVM is tried first and dropped for TCG when the kernel does not
//! print its banner within a short limit (on this machine kind /dev/kvm exists but
//! guests hang). The appliance keeps its shipped config (images.maas.io); the check
//! sets it up as an operator would, through the RACKBOOT-CFG partition (written with
//! mtools): a drop-in pointing its source at a rackboot on this host (the dist binary
//! serving the signed demo stream on loopback, reached from the guest as 10.0.2.2,
//! its keyring put on the data partition) — so the appliance really syncs, as its own
//! user under the sandboxed unit, through the re-exported stream — a static address,
//! an SSH key, and a bad drop-in and network file that must be refused. The check
//! waits (every wait bounded) for `/api/v1/status` to answer through the hostfwd (boot
//! time), checks the settings (refusals on the console, the token shown on the console
//! allows an API write, SSH with the key and not with a password, the static address,
//! the login banner), waits for the first sync, fetches a kernel and compares its
//! sha256 with the upstream's, fetches `/metrics`, waits past the unit's WatchdogSec
//! with the same process, then powers the VM off over the QEMU monitor and requires a
//! clean stop (rackboot stopped, "reboot: Power down"). Afterwards the copy's data
//! partition and its filesystem must have grown over the 6 GiB (systemd-repart +
//! x-systemd.growfs), and the generated token must be on RACKBOOT-CFG. A second boot
//! goes through GRUB's serial recovery entry; a third updates the appliance
//! (`updates`). QEMU, the HTTP server and the host rackboot are killed by PID on every
//! exit path.
//!
//! `--arch arm64` builds `rackboot-appliance-arm64.img` (and `updates-arm64/release/`)
//! from the same definition with the aarch64 dist binary, and checks its first boot
//! (everything up to the recovery boot) under `qemu-system-aarch64 -M virt` with
//! AAVMF, TCG, Secure Boot off, every limit scaled (see `arch`).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::dist;
use crate::prereq::{self, cmd, output};
use crate::proc::Guard;

mod arch;
mod updates;

use arch::Arch;

/// The appliance's HTTP port (systemd/rackboot.toml).
const GUEST_HTTP_PORT: u16 = 5248;
/// The size the check's copy of the image is grown to before booting.
const CHECK_DISK_BYTES: u64 = 6 << 30;
/// The version suffix of the check's v2 (`RACKBOOT_VERSION_SUFFIX`).
const V2_SUFFIX: &str = "image-check-v2";

/// Host tools for the build.
const BUILD_DEBS: &[&str] = &[
    "mmdebstrap",
    "debian-archive-keyring",
    "dosfstools",
    "mtools",
    "e2fsprogs",
    "fdisk",
    "shim-signed",
    "grub-efi-amd64-signed",
    // The update bundles (rauc bundle runs mksquashfs), the GRUB environment block,
    // the signing CA and SHA256SUMS.sig.
    "rauc",
    "squashfs-tools",
    "grub-common",
    "openssl",
];
/// Host tools for the check (QEMU from bookworm-backports: the machine's qemu-utils
/// comes from there and conflicts with bookworm's qemu-system-common).
const CHECK_DEBS: &[&str] = &[
    "curl",
    "e2fsprogs",
    "fdisk",
    "util-linux",
    "mtools",
    "openssh-client",
    // The update server of the check.
    "python3",
];
// The firmware and QEMU of each architecture are in `arch`. Every amd64 boot of the
// check runs with Secure Boot on: OVMF's Secure Boot build (its variables live in SMM)
// with Secure Boot enabled and Microsoft's keys enrolled, so only the chain shim →
// Debian-signed GRUB → Debian-signed kernel boots.
/// What the kernel prints when the firmware booted it with Secure Boot on.
const SECURE_BOOT_LINE: &str = "secureboot: Secure boot enabled";

/// The whole build script (mmdebstrap fetches a few hundred MiB).
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// KVM must get the kernel to print its banner within this.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// From QEMU start until /api/v1/status answers (TCG on 2 cores, OVMF, first boot).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// From the first answer until the first sync has published a snapshot.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// The unit's WatchdogSec plus a margin: the daemon must still be the same process.
const WATCHDOG_WAIT: Duration = Duration::from_secs(75);
/// The appliance's SSH port.
const GUEST_SSH_PORT: u16 = 22;
/// The settings partition's number (physically between the ESP and root slot A).
const CFG_PARTITION: usize = 3;
/// Root slot A's partition number (the image's version is in it).
const SLOT_A_PARTITION: usize = 2;
/// The data partition (the last; grown at first boot).
const DATA_PARTITION: usize = 5;
/// One SSH command against the appliance, connection included.
const SSH_TIMEOUT: Duration = Duration::from_secs(60);
/// A MAC address for the check's API write.
const CHECK_MAC: &str = "52:54:00:0a:b1:01";
/// From `system_powerdown` until QEMU exits.
const POWERDOWN_TIMEOUT: Duration = Duration::from_secs(180);

fn image_dir() -> PathBuf {
    prereq::target_dir(&crate::root()).join("image")
}

/// The update artefacts: `release/` (this version's bundle), the check's `v2/`, `v3/`
/// (amd64: `updates/`; another architecture: `updates-<arch>/`, `release/` only).
fn updates_dir_of(arch: &Arch) -> PathBuf {
    match arch.name {
        "amd64" => image_dir().join("updates"),
        other => image_dir().join(format!("updates-{other}")),
    }
}

/// amd64's update artefacts (the update check runs on amd64).
fn updates_dir() -> PathBuf {
    updates_dir_of(&arch::AMD64)
}

/// A per-architecture name in the image directory: `name` for amd64 (as before
/// arm64 existed), otherwise `<stem>-<arch>[.<extension>]` (`build-arm64.log`).
fn arch_dir(arch: &Arch, name: &str) -> PathBuf {
    match (arch.name, name.split_once('.')) {
        ("amd64", _) => image_dir().join(name),
        (other, Some((stem, ext))) => image_dir().join(format!("{stem}-{other}.{ext}")),
        (other, None) => image_dir().join(format!("{name}-{other}")),
    }
}

pub fn run(args: &[String]) -> Result<()> {
    const USAGE: &str = "usage: cargo xtask image [--arch amd64|arm64] [--check | --no-check]";
    let mut check_only = false;
    let mut no_check = false;
    let mut arch = &arch::AMD64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--check" => check_only = true,
            "--no-check" => no_check = true,
            "--arch" => arch = Arch::parse(it.next().context(USAGE)?)?,
            _ => match a.strip_prefix("--arch=") {
                Some(v) => arch = Arch::parse(v)?,
                None => bail!("unknown image argument {a:?} ({USAGE})"),
            },
        }
    }
    let dir = image_dir();
    std::fs::create_dir_all(&dir)?;
    let image = dir.join(arch.image_name());
    let mut report = String::new();
    writeln!(report, "# rackboot appliance image ({})\n", arch.name)?;
    if !check_only || !image.exists() {
        let built = build(&image, arch)?;
        writeln!(report, "{built}")?;
    } else {
        writeln!(report, "image: {} (already built)", image.display())?;
    }
    if !no_check {
        let checked = check(&image, arch)?;
        writeln!(report, "{checked}")?;
    }
    std::fs::write(arch_dir(arch, "report.md"), &report)?;
    println!("\n{report}");
    Ok(())
}

/// Runs a child to completion, bounded by `limit` (the child's group is killed on
/// timeout or any early return).
fn run_bounded(g: &mut Guard, limit: Duration) -> Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(s) = g.child.try_wait()? {
            return Ok(s);
        }
        if started.elapsed() > limit {
            // SIGTERM first: mmdebstrap unmounts what it mounted in the chroot.
            let _ = g.terminate(Duration::from_secs(30));
            bail!("{} did not finish within {} s", g.what, limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Unmounts whatever is still mounted below `dir` (a killed mmdebstrap leaves its
/// chroot's /proc, /sys and /dev mounts).
fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let prefix = dir.to_string_lossy().to_string();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        eprintln!("unmounting the leftover {p}");
        let _ = Command::new("umount").args(["--lazy", p]).status();
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Builds the image with `images/appliance/build.sh`; returns the report lines.
fn build(image: &Path, arch: &Arch) -> Result<String> {
    prereq::ensure_debs(BUILD_DEBS)?;
    let dir = image_dir();
    let efi_root = arch.build_prerequisites(&dir)?;
    // This version, then (amd64, for the update check) v2 (cargo rebuilds the rackboot
    // crate for each: the version suffix is compiled in). The check runs the copy of
    // this version in dist/.
    let bin = arch.binary()?;
    let bin_v2 = match arch.full_check {
        true => Some(dist::build_x86_64_suffixed(V2_SUFFIX)?),
        false => None,
    };
    let root = crate::root();
    let work = arch_dir(arch, "work");
    let log = arch_dir(arch, "build.log");
    eprintln!(
        "building {} with images/appliance/build.sh (log: {})",
        image.display(),
        log.display()
    );
    let started = Instant::now();
    let script = root.join("images/appliance/build.sh");
    let mut g = {
        // SIGTERM when xtask dies: the script passes it on to its group (mmdebstrap
        // unmounts its chroot's filesystems on it).
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "TERM", "--"]).arg(&script);
        c.env("ARCH", arch.name)
            .env("RACKBOOT_BIN", &bin)
            .env("OUT", image)
            .env("WORK", &work)
            .env("CACHE", dir.join("cache"))
            .env("UPDATES", updates_dir_of(arch))
            .env("KEYS", dir.join("keys"));
        if let Some(v2) = &bin_v2 {
            c.env("RACKBOOT_BIN_V2", v2);
        }
        if let Some(efi) = &efi_root {
            c.env("EFI_ROOT", efi);
        }
        Guard::spawn_logged(c, "images/appliance/build.sh", &log)?
    };
    let status = run_bounded(&mut g, BUILD_TIMEOUT);
    drop(g);
    unmount_below(&work);
    let status = status?;
    let elapsed = started.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "images/appliance/build.sh failed ({status}); the end of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    eprintln!(
        "built {} in {:.0} s",
        image.display(),
        elapsed.as_secs_f64()
    );
    build_report(image, arch, &text, elapsed)
}

/// The build's report rows: the image's size, the root, the update artefacts, the
/// kernel (from build.sh's summary line in its log `text`), the build time.
fn build_report(image: &Path, arch: &Arch, text: &str, elapsed: Duration) -> Result<String> {
    let summary = text
        .lines()
        .rev()
        .find(|l| l.starts_with("arch="))
        .unwrap_or("")
        .to_string();
    let field = |k: &str| -> Option<u64> {
        summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
    };
    let meta = std::fs::metadata(image)?;
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    let mut r = String::new();
    writeln!(r, "| image | value |\n|---|---|")?;
    writeln!(r, "| file | `{}` |", image.display())?;
    writeln!(
        r,
        "| size | {} bytes ({:.0} MiB), {:.0} MiB allocated (sparse) |",
        meta.len(),
        mib(meta.len()),
        mib(allocated)
    )?;
    if let (Some(rootfs), Some(fs), Some(slot)) =
        (field("rootfs_mib"), field("root_fs_mib"), field("slot_mib"))
    {
        writeln!(
            r,
            "| root tree / filesystem | {rootfs} MiB in a {fs} MiB ext4, in a {slot} MiB slot (A; B is empty) |"
        )?;
    }
    let subs: &[&str] = match arch.full_check {
        true => &["release", "v2", "v3"],
        false => &["release"],
    };
    for sub in subs {
        let d = updates_dir_of(arch).join(sub);
        let mut files: Vec<String> = Vec::new();
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            files.push(format!(
                "`{}` {:.1} MiB",
                e.file_name().to_string_lossy(),
                mib(e.metadata()?.len())
            ));
        }
        files.sort();
        writeln!(r, "| update artefacts `{sub}/` | {} |", files.join(", "))?;
    }
    writeln!(
        r,
        "| kernel | {} |",
        summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix("kernel="))
            .unwrap_or("?")
    )?;
    writeln!(r, "| build time | {:.0} s |", elapsed.as_secs_f64())?;
    Ok(r)
}

fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A free TCP port on loopback (bound and released; QEMU binds it right after).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// GET with curl, bounded; `None` when it does not answer 2xx.
fn http_get(url: &str, max_time_s: u32) -> Option<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", &max_time_s.to_string(), url])
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// Byte offset and size of partition `n` (1-based) of a disk image, from sfdisk.
fn partition(disk: &Path, n: usize) -> Result<(u64, u64)> {
    let json = output("sfdisk", &["--json", disk.to_str().context("utf-8 path")?])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("parsing sfdisk --json")?;
    let p = &v["partitiontable"]["partitions"][n - 1];
    let (Some(start), Some(size)) = (p["start"].as_u64(), p["size"].as_u64()) else {
        bail!("{} has no partition {n}", disk.display());
    };
    Ok((start * 512, size * 512))
}

/// The ext4 root filesystem's size in bytes (block count × block size), read with
/// dumpe2fs at the partition's offset.
fn ext4_bytes(disk: &Path, offset: u64) -> Result<u64> {
    let dev = format!("{}?offset={offset}", disk.display());
    let text = output("dumpe2fs", &["-h", &dev])?;
    let get = |k: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
    };
    match (get("Block count:"), get("Block size:")) {
        (Some(c), Some(s)) => Ok(c * s),
        _ => bail!("dumpe2fs -h {dev} printed no block count"),
    }
}

/// Writes files into the ext4 root of `disk` (no mount): first the directories
/// `dirs` (mode 0755), then `(host file, directory in the image, name)`, each
/// root-owned, mode 0644.
fn debugfs_write(
    disk: &Path,
    offset: u64,
    dirs: &[&str],
    files: &[(&Path, &str, &str)],
) -> Result<()> {
    let mut script = String::new();
    for dir in dirs {
        writeln!(script, "mkdir {dir}")?;
        writeln!(script, "sif {dir} mode 040755")?;
        writeln!(script, "sif {dir} uid 0")?;
        writeln!(script, "sif {dir} gid 0")?;
    }
    for (host, dir, name) in files {
        writeln!(script, "cd {dir}")?;
        writeln!(script, "write {} {name}", host.display())?;
        writeln!(script, "sif {name} mode 0100644")?;
        writeln!(script, "sif {name} uid 0")?;
        writeln!(script, "sif {name} gid 0")?;
    }
    let cmds = disk.with_extension("debugfs");
    std::fs::write(&cmds, script)?;
    let dev = format!("{}?offset={offset}", disk.display());
    let out = output(
        "debugfs",
        &["-w", "-f", cmds.to_str().context("utf-8")?, &dev],
    )?;
    // debugfs reports failures on stdout and still exits 0: read each file back.
    let back = disk.with_extension("readback");
    for (host, dir, name) in files {
        let path = format!("{}/{name}", dir.trim_end_matches('/'));
        let _ = std::fs::remove_file(&back);
        output(
            "debugfs",
            &["-R", &format!("dump {path} {}", back.display()), &dev],
        )?;
        if std::fs::read(&back).ok() != Some(std::fs::read(host)?) {
            bail!(
                "debugfs did not write {path} into {}: {out}",
                disk.display()
            );
        }
    }
    let _ = std::fs::remove_file(&back);
    Ok(())
}

/// The serial log so far, lossy, without terminal escape sequences (systemd and GRUB
/// colour and position their output: `Started \x1b[0;1;39mrackboot.service`).
fn serial_text(path: &Path) -> String {
    let raw = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in @..~.
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Lines of the serial log that say the boot or the unit went wrong.
const SERIAL_FAILURES: &[&str] = &[
    "Kernel panic",
    "fsck not present",
    "grub>",
    "You are in emergency mode",
    "Failed to start rackboot.service",
    "rackboot.service: Watchdog timeout",
    "rackboot.service: Failed with result",
    "rackboot.service: Main process exited",
];

/// What a boot of the update check must not print (rackboot failing is expected there).
const BOOT_FAILURES: &[&str] = &[
    "Kernel panic",
    "fsck not present",
    "grub>",
    "You are in emergency mode",
];

/// How a check VM boots.
#[derive(Clone, Copy)]
struct BootOpts<'a> {
    /// Names the logs (`serial-<tag>-<accel>.log`).
    tag: &'a str,
    /// The guest may reboot (else QEMU exits on a reboot: `-no-reboot`).
    reboot: bool,
    /// Serial console lines that fail the check.
    failures: &'static [&'static str],
    /// The QEMU machine, firmware and console; its `time_scale` scales every wait.
    arch: &'static Arch,
}

struct Vm {
    qemu: Guard,
    arch: &'static Arch,
    /// Host ports forwarded to the appliance's HTTP port and to its SSH.
    http_port: u16,
    ssh_port: u16,
    failures: &'static [&'static str],
    qemu_log: PathBuf,
    serial: PathBuf,
    monitor: PathBuf,
    accel: &'static str,
    started: Instant,
}

impl Vm {
    fn start(dir: &Path, disk: &Path, ports: (u16, u16), o: BootOpts, kvm: bool) -> Result<Vm> {
        let (fwd, ssh) = ports;
        let accel = if kvm { "kvm" } else { "tcg" };
        let tag = o.tag;
        let serial = dir.join(format!("serial-{tag}-{accel}.log"));
        let monitor = dir.join(format!("monitor-{tag}-{accel}.sock"));
        let _ = std::fs::remove_file(&monitor);
        let a = o.arch;
        let vars = dir.join(format!("VARS-{}.fd", a.name));
        std::fs::copy(a.firmware_vars, &vars)
            .with_context(|| format!("copying {}", a.firmware_vars))?;
        let mut args: Vec<String> = vec!["-machine".into(), format!("{},accel={accel}", a.machine)];
        if a.secure_boot {
            // The Secure Boot build's variable store is writable from SMM only.
            args.extend([
                "-global".into(),
                "driver=cfi.pflash01,property=secure,value=on".into(),
            ]);
        }
        if let Some(cpu) = a.cpu {
            args.extend(["-cpu".into(), cpu.into()]);
        }
        args.extend([
            "-smp".into(),
            "2".into(),
            "-m".into(),
            "1024".into(),
            "-drive".into(),
            format!("if=pflash,format=raw,readonly=on,file={}", a.firmware_code),
            "-drive".into(),
            format!("if=pflash,format=raw,file={}", vars.display()),
            "-drive".into(),
            format!("if=virtio,format=raw,file={}", disk.display()),
            "-netdev".into(),
            format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{fwd}-:{GUEST_HTTP_PORT},hostfwd=tcp:127.0.0.1:{ssh}-:{GUEST_SSH_PORT}"
            ),
            "-device".into(),
            "virtio-net-pci,netdev=n0,romfile=".into(),
            "-nographic".into(),
            "-serial".into(),
            format!("file:{}", serial.display()),
            "-monitor".into(),
            format!("unix:{},server=on,wait=off", monitor.display()),
        ]);
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        if !o.reboot {
            args.push("-no-reboot");
        }
        eprintln!("$ {} {}", a.qemu, args.join(" "));
        let qemu_log = dir.join(format!("qemu-{tag}-{accel}.log"));
        let qemu = Guard::spawn(&format!("QEMU ({accel})"), a.qemu, &args, &qemu_log)?;
        Ok(Vm {
            qemu,
            arch: a,
            http_port: fwd,
            ssh_port: ssh,
            failures: o.failures,
            qemu_log,
            serial,
            monitor,
            accel,
            started: Instant::now(),
        })
    }

    /// Fails when QEMU exited or the serial log shows a failure.
    fn healthy(&mut self) -> Result<()> {
        let text = serial_text(&self.serial);
        if let Some(f) = self.failures.iter().find(|f| text.contains(*f)) {
            bail!(
                "the appliance's console printed {f:?} ({}); see {}",
                self.accel,
                self.serial.display()
            );
        }
        // A KVM that cannot run the guest stops it with this and waits forever.
        let qemu_text = std::fs::read_to_string(&self.qemu_log).unwrap_or_default();
        if qemu_text.contains("KVM internal error") {
            bail!(
                "QEMU reported a KVM internal error; see {}",
                self.qemu_log.display()
            );
        }
        if let Some(s) = self.qemu.child.try_wait()? {
            bail!(
                "QEMU ({}) exited ({s}); see {}",
                self.accel,
                self.serial.display()
            );
        }
        Ok(())
    }

    /// Polls `f` every second until it yields, bounded by `limit` (scaled for the
    /// architecture); fails when the VM fails first.
    fn wait_for<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&mut Vm) -> Option<T>,
    ) -> Result<T> {
        let limit = self.arch.limit(limit);
        let started = Instant::now();
        loop {
            self.healthy()?;
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if started.elapsed() > limit {
                bail!(
                    "{what}: not within {} s ({}); see {}",
                    limit.as_secs(),
                    self.accel,
                    self.serial.display()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Waits for each of `lines` on the serial console in turn, up to a minute each
    /// (scaled for the architecture).
    fn wait_console(&mut self, lines: &[&str]) -> Result<()> {
        for needle in lines {
            self.wait_for(
                &format!("{needle:?} on the serial console"),
                Duration::from_secs(60),
                |vm| serial_text(&vm.serial).contains(needle).then_some(()),
            )?;
        }
        Ok(())
    }

    /// ACPI power button through the monitor; waits (bounded) for QEMU to exit.
    fn power_down(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let mut sock = std::os::unix::net::UnixStream::connect(&self.monitor)
            .with_context(|| format!("connecting to {}", self.monitor.display()))?;
        sock.write_all(b"system_powerdown\n")?;
        let limit = self.arch.limit(POWERDOWN_TIMEOUT);
        loop {
            if self.qemu.child.try_wait()?.is_some() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!(
                    "the appliance did not power off within {} s of system_powerdown; see {}",
                    limit.as_secs(),
                    self.serial.display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Boots the check copy with KVM; keeps the VM if the kernel prints its banner in
/// time, else kills it and boots with TCG. A foreign architecture boots with TCG.
/// Boots a check VM, its HTTP and SSH forwarded to free host ports (`Vm::http_port`,
/// `Vm::ssh_port`).
fn boot(dir: &Path, disk: &Path, o: BootOpts) -> Result<Vm> {
    let ports = (free_port()?, free_port()?);
    let kvm_usable = o.arch.name == "amd64"
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    if kvm_usable {
        let mut vm = Vm::start(dir, disk, ports, o, true)?;
        let r = vm.wait_for("KVM probe: the kernel banner", KVM_PROBE_TIMEOUT, |vm| {
            serial_text(&vm.serial)
                .contains("Linux version")
                .then_some(())
        });
        match r {
            Ok(()) => {
                eprintln!("KVM works: the kernel started; continuing with KVM");
                return Ok(vm);
            }
            Err(e) => eprintln!("KVM not usable ({e:#}); booting again with TCG"),
        }
    } else {
        eprintln!("no usable /dev/kvm; booting with TCG");
    }
    Vm::start(dir, disk, ports, o, false)
}

/// What [`check_settings`] found.
struct Settings {
    /// The API token the console showed.
    token: String,
    /// Report table rows.
    report: Vec<String>,
}

/// The token from the console allows an API write; no token and a wrong one do not.
/// Returns the report row.
fn check_api_write(base: &str, token: &str) -> Result<String> {
    let url = format!("{base}/api/v1/machines/{CHECK_MAC}");
    let put = |auth: Option<&str>| -> Result<String> {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ]);
        c.args(["-X", "PUT", "-H", "Content-Type: application/json"]);
        if let Some(t) = auth {
            c.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        c.args(["--data", r#"{"local_boot": true}"#, &url]);
        Ok(String::from_utf8_lossy(&c.output()?.stdout).into_owned())
    };
    let without = put(None)?;
    let wrong = put(Some("not-the-token-0123456789"))?;
    let with = put(Some(token))?;
    if without != "401" || wrong != "401" || !with.starts_with('2') {
        bail!("API write PUT {url}: without a token {without}, with a wrong one {wrong}, with the console's token {with} (want 401, 401, 2xx)");
    }
    let stored = http_get(&url, 10).context("GET of the machine just written")?;
    let v: serde_json::Value = serde_json::from_slice(&stored)?;
    if !v.to_string().contains("\"local_boot\":true") {
        bail!("the API write did not stick: GET {url} gave {v}");
    }
    Ok(format!(
        "| API write with the token shown once on the console (generated at first boot) | PUT machines/{CHECK_MAC} → {with}; without a token {without}, wrong token {wrong} |"
    ))
}

/// The RACKBOOT-CFG partition took effect: good files applied and bad ones refused
/// (console), the static address without DHCP, SSH as root with the key only (no
/// password), the login banner, and the token shown on the console allows an API
/// write (and nothing else does).
fn check_settings(vm: &mut Vm, key: &Path, ssh_port: u16, base: &str) -> Result<Settings> {
    let mut report = Vec::new();
    vm.wait_console(&[
        "rackboot-config: rackboot.toml.d/50-check.toml applied",
        "rackboot-config: REFUSED rackboot.toml.d/60-bad.toml: invalid type: string \"lots\"",
        "rackboot-config: network/10-static.network applied",
        "rackboot-config: REFUSED network/11-bad.network: no [Match] section",
        "rackboot-config: authorized_keys applied (1 keys",
        "rackboot-config: generated an API token",
        "rackboot API token (shown once): ",
    ])?;
    report.push(
        "| RACKBOOT-CFG: drop-in, static network file and SSH key applied before rackboot; bad drop-in and bad network file refused on the console | ok |"
            .to_string(),
    );
    let text = serial_text(&vm.serial);
    let token = text
        .split("rackboot API token (shown once): ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .context("no token after the console's token line")?
        .to_string();

    report.push(check_api_write(base, &token)?);

    // SSH as root with the key from the partition; the banner and network from inside.
    let started = Instant::now();
    let remote = "id -un; cat /etc/issue; for i in /sys/class/net/en*; do networkctl status --no-pager -n 0 \"${i##*/}\"; done; stat -c '%a %U:%G %n' /etc/rackboot/api-token";
    let out = vm.wait_for("SSH as root with the check's key", SSH_TIMEOUT * 3, |vm| {
        // Until the banner has the static address (the timer rewrites it every 30 s).
        let o = ssh_bounded(key, ssh_port, &[], remote, vm.arch.limit(SSH_TIMEOUT)).ok()?;
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        (o.status.success() && out.contains("Images page: http://10.0.2.15:5248/")).then_some(out)
    })?;
    let ssh_time = started.elapsed();
    for want in [
        "root\n",
        "Images page: http://10.0.2.15:5248/",
        "API token: /etc/rackboot/api-token",
        "10-static.network",
        "640 root:rackboot /etc/rackboot/api-token",
    ] {
        if !out.contains(want) {
            bail!("over SSH, the appliance's output lacks {want:?}:\n{out}");
        }
    }
    if serial_text(&vm.serial).contains("DHCPv4 address") {
        bail!(
            "the appliance took a DHCP address despite network/10-static.network; see {}",
            vm.serial.display()
        );
    }
    // Passwords are not offered at all.
    let pw = ssh_bounded(
        key,
        ssh_port,
        &[
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
        ],
        "true",
        vm.arch.limit(SSH_TIMEOUT),
    )?;
    let pw_err = String::from_utf8_lossy(&pw.stderr);
    if pw.status.success() || !pw_err.contains("Permission denied (publickey)") {
        bail!("SSH without the key was not refused as publickey-only: {pw_err}");
    }
    report.push(format!(
        "| SSH as root with the key from RACKBOOT-CFG (password refused: publickey only) | ok, {:.1} s after the API answered |",
        ssh_time.as_secs_f64()
    ));
    report.push(
        "| static address 10.0.2.15/24 from network/10-static.network, no DHCP; login banner shows the Images page URL and the token's place | ok |"
            .to_string(),
    );
    // The banner on the serial console too (the timer refreshes it; agetty --reload).
    vm.wait_for(
        "the login banner with the Images page URL on the serial console",
        Duration::from_secs(120),
        |vm| {
            serial_text(&vm.serial)
                .contains("Images page: http://10.0.2.15:5248/")
                .then_some(())
        },
    )?;
    Ok(Settings { token, report })
}

/// Runs an mtools command on the FAT file system at `offset` of `disk` (`-i
/// disk@@offset`, no mount): its stdout, or an error naming what it did (`what`) and
/// mtools' complaint.
fn mtools(tool: &str, disk: &Path, offset: u64, args: &[&OsStr], what: &str) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()))
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "{tool} {what} of {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Copies `file` to `path` on the FAT file system at `offset` of `disk`, replacing it.
fn fat_put(disk: &Path, offset: u64, file: &Path, path: &str) -> Result<()> {
    let dest = format!("::/{path}");
    let what = format!("{} to {path}", file.display());
    mtools(
        "mcopy",
        disk,
        offset,
        &["-o".as_ref(), file.as_os_str(), dest.as_ref()],
        &what,
    )?;
    Ok(())
}

/// Boots `disk` again through GRUB's "recovery shell on the serial port" entry (made
/// the default in a copy of the ESP's grub.cfg, put back afterwards): the console must
/// reach rescue.target and a root shell without a password. Returns power-on to the
/// shell's first command.
fn check_recovery(dir: &Path, disk: &Path) -> Result<Duration> {
    let (esp_off, _) = partition(disk, 1)?;
    let grub = cfg_read(disk, esp_off, "EFI/debian/grub.cfg")?;
    let original = dir.join("esp-grub.cfg");
    std::fs::write(&original, &grub)?;
    let entry = grub
        .lines()
        .filter(|l| l.starts_with("menuentry "))
        .position(|l| l.contains("recovery shell on the serial port"))
        .context("the image's grub.cfg has no serial recovery entry")?;
    if !grub.contains("set default=0\n") {
        bail!("the image's grub.cfg does not set default=0");
    }
    let cfg = dir.join("recovery-grub.cfg");
    std::fs::write(
        &cfg,
        grub.replace("set default=0\n", &format!("set default={entry}\n")),
    )?;
    fat_put(disk, esp_off, &cfg, "EFI/debian/grub.cfg")?;
    let took = recovery_shell(dir, disk);
    fat_put(disk, esp_off, &original, "EFI/debian/grub.cfg")?;
    took
}

/// The recovery boot of [`check_recovery`]: sulogin's prompt, then a command typed on
/// the screen's keyboard writes a marker to ttyS0.
fn recovery_shell(dir: &Path, disk: &Path) -> Result<Duration> {
    let opts = BootOpts {
        tag: "recovery",
        reboot: false,
        failures: SERIAL_FAILURES,
        arch: &arch::AMD64,
    };
    let mut vm = boot(dir, disk, opts)?;
    // sulogin asks on every console; with the root account locked it lets the person
    // at the console in without a password only when SYSTEMD_SULOGIN_FORCE is set
    // (else: "Cannot open access to console, the root account is locked").
    vm.wait_for(
        "sulogin's maintenance prompt on ttyS0",
        BOOT_TIMEOUT,
        |vm| {
            serial_text(&vm.serial)
                .contains("Press Enter for maintenance")
                .then_some(())
        },
    )?;
    // Enter and a command on the screen's keyboard (the monitor's sendkey); the shell
    // there writes a marker to the serial port, which proves it is a root shell.
    let marker = "rackbootrescueok";
    let mut keys: Vec<String> = vec!["ret".into()];
    for c in format!("echo {marker} >/dev/ttyS0").chars() {
        keys.push(match c {
            ' ' => "spc".into(),
            '>' => "shift-dot".into(),
            '/' => "slash".into(),
            c if c.is_ascii_uppercase() => format!("shift-{}", c.to_ascii_lowercase()),
            c => c.to_string(),
        });
    }
    keys.push("ret".into());
    let mut sock = std::os::unix::net::UnixStream::connect(&vm.monitor)
        .with_context(|| format!("connecting to {}", vm.monitor.display()))?;
    for (i, k) in keys.iter().enumerate() {
        sock.write_all(format!("sendkey {k}\n").as_bytes())?;
        // The shell needs a moment to start after the first Enter.
        std::thread::sleep(Duration::from_millis(if i == 0 { 5000 } else { 200 }));
    }
    vm.wait_for(
        "the recovery shell's marker on ttyS0",
        Duration::from_secs(120),
        |vm| {
            serial_text(&vm.serial)
                .lines()
                // Its own line, or after sulogin's prompt on ttyS0 (the shell runs
                // on the screen, so the prompt there is not followed by a newline).
                .any(|l| l.trim() == marker || l.trim_end().ends_with(&format!(": {marker}")))
                .then_some(())
        },
    )?;
    let took = vm.started.elapsed();
    let t = serial_text(&vm.serial);
    for bad in ["Cannot open access to console", "Started rackboot.service"] {
        if t.contains(bad) {
            bail!(
                "the recovery boot printed {bad:?}; see {}",
                vm.serial.display()
            );
        }
    }
    Ok(took)
}

/// One SSH command as root on the appliance through the hostfwd, bounded.
fn ssh(key: &Path, port: u16, extra: &[&str], remote: &str) -> Result<std::process::Output> {
    ssh_bounded(key, port, extra, remote, SSH_TIMEOUT)
}

/// [`ssh`] with its own time limit.
fn ssh_bounded(
    key: &Path,
    port: u16,
    extra: &[&str],
    remote: &str,
    limit: Duration,
) -> Result<std::process::Output> {
    let mut c = Command::new("timeout");
    c.arg(limit.as_secs().to_string()).arg("ssh");
    c.args([
        "-i",
        key.to_str().context("utf-8")?,
        "-p",
        &port.to_string(),
    ]);
    c.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=20",
        "-o",
        "LogLevel=ERROR",
    ]);
    c.args(extra);
    c.args(["root@127.0.0.1", remote]);
    Ok(c.output()?)
}

/// Writes files (path on the partition, content) into the FAT settings partition at
/// `offset` of `disk` with mtools (no mount), replacing what is there.
fn cfg_write(disk: &Path, offset: u64, files: &[(&str, &str)]) -> Result<()> {
    let tmp = disk.with_extension("cfgfile");
    for (path, content) in files {
        std::fs::write(&tmp, content)?;
        if let Some((dir, _)) = path.rsplit_once('/') {
            // Exists in the image's seed; mmd fails harmlessly then.
            let dir = format!("::/{dir}");
            let _ = mtools(
                "mmd",
                disk,
                offset,
                &["-D".as_ref(), "s".as_ref(), dir.as_ref()],
                dir.as_str(),
            );
        }
        fat_put(disk, offset, &tmp, path)?;
    }
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// A file of the FAT partition at `offset` of `disk` (mtools, no mount).
fn cfg_read(disk: &Path, offset: u64, path: &str) -> Result<String> {
    let src = format!("::/{path}");
    let what = format!("{path} from the FAT partition at {offset}");
    let out = mtools("mtype", disk, offset, &[src.as_ref()], &what)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The status JSON's `uptime_s` and `generation`.
fn status(fwd: u16) -> Option<(u64, Option<u64>)> {
    let body = http_get(&format!("http://127.0.0.1:{fwd}/api/v1/status"), 5)?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some((v["uptime_s"].as_u64()?, v["generation"].as_u64()))
}

/// Boots the image and checks it serves; returns the report lines.
fn check(image: &Path, arch: &'static Arch) -> Result<String> {
    prereq::ensure_debs(CHECK_DEBS)?;
    prereq::ensure_debs(arch.check_debs)?;
    prereq::ensure_backports_debs(arch.check_backports_debs)?;
    // The host's upstream rackboot: the x86_64 dist binary, whatever the appliance's
    // architecture.
    let bin = dist::built_x86_64()?;
    let dir = arch_dir(arch, "check");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let up = start_upstream(&dir, &bin)?;
    let prep = prepare_disk(image, &dir, arch, up.port, &up.keyring)?;
    let disk = &prep.disk;
    let mut r = String::new();
    let (generation, token) = first_boot(&dir, &prep, arch, &up, &mut r)?;

    // The generated token was written back to the settings partition.
    let on_partition = cfg_read(disk, prep.cfg_off, "api-token")?;
    if on_partition.trim() != token {
        bail!(
            "api-token on RACKBOOT-CFG is {:?}, not the token the console showed",
            on_partition.trim()
        );
    }

    // The recovery boot types on the screen's keyboard, which the arm64 virt machine
    // does not have; it and the updates run on amd64.
    let recovery = match arch.full_check {
        true => Some(check_recovery(&dir, disk)?),
        false => None,
    };

    let (_, data_size_after) = partition(disk, DATA_PARTITION)?;
    let fs_after = ext4_bytes(disk, prep.data_off)?;
    let before = prep.data_size_before;
    if data_size_after <= before || fs_after + (64 << 20) < data_size_after {
        bail!(
            "the data partition did not grow over the disk: partition {before} → {data_size_after} bytes, filesystem {fs_after} bytes"
        );
    }
    writeln!(
        r,
        "| data partition grown at first boot (image {:.0} MiB, disk {:.0} MiB) | partition {:.0} → {:.0} MiB, ext4 {:.0} MiB |",
        mib(prep.image_bytes),
        mib(CHECK_DISK_BYTES),
        mib(before),
        mib(data_size_after),
        mib(fs_after)
    )?;
    if let Some(recovery) = recovery {
        writeln!(
            r,
            "| GRUB's serial recovery entry: rescue.target, sulogin lets the console in without a password, a root shell runs a command | {:.1} s from power-on to the command's output |",
            recovery.as_secs_f64()
        )?;
        let upd = updates::check(&updates::Setup {
            dir: &dir,
            disk,
            key: &prep.key,
            kernel_path: KERNEL_PATH,
            want_sha: &up.want_sha,
            generation,
        })?;
        for line in &upd {
            writeln!(r, "{line}")?;
        }
    } else {
        writeln!(
            r,
            "| recovery boot, v2/v3 updates | not run for {} (amd64 only) |",
            arch.name
        )?;
    }
    drop(up);
    std::fs::remove_file(disk)?;
    eprintln!("image check passed; logs in {}", dir.display());
    Ok(r)
}

/// The first boot of the check's copy, up to the power-off: serving, the settings,
/// the first sync, the watchdog, a clean shutdown; writes its report rows to `r` and
/// returns the synced generation and the token the console showed.
fn first_boot(
    dir: &Path,
    prep: &CheckDisk,
    arch: &'static Arch,
    up: &Upstream,
    r: &mut String,
) -> Result<(u64, String)> {
    let opts = BootOpts {
        tag: "first",
        reboot: false,
        failures: SERIAL_FAILURES,
        arch,
    };
    let mut vm = boot(dir, &prep.disk, opts)?;
    let (fwd, ssh_port) = (vm.http_port, vm.ssh_port);
    let base = format!("http://127.0.0.1:{fwd}");

    let first = vm.wait_for(
        "the appliance answering /api/v1/status",
        BOOT_TIMEOUT,
        |_| status(fwd),
    )?;
    let to_serving = vm.started.elapsed();
    eprintln!(
        "the appliance answers /api/v1/status after {:.1} s ({}), rackboot up {} s",
        to_serving.as_secs_f64(),
        vm.accel,
        first.0
    );
    writeln!(
        r,
        "\n| check ({} {}, {}, {}) | result |\n|---|---|",
        arch.qemu, arch.machine, arch.firmware_code, vm.accel
    )?;
    writeln!(
        r,
        "| power-on to `/api/v1/status` answering through the hostfwd | {:.1} s |",
        to_serving.as_secs_f64()
    )?;
    check_started(&mut vm, r)?;
    let settings = check_settings(&mut vm, &prep.key, ssh_port, &base)?;
    // RAUC takes only bundles made for this architecture.
    let want = format!("rackboot-appliance-{}", arch.name);
    let limit = arch.limit(SSH_TIMEOUT);
    let o = ssh_bounded(
        &prep.key,
        ssh_port,
        &[],
        "rauc status --output-format=shell",
        limit,
    )?;
    let out = String::from_utf8_lossy(&o.stdout);
    let compatible = out
        .lines()
        .find_map(|l| l.strip_prefix("RAUC_SYSTEM_COMPATIBLE="))
        .map(|v| v.trim_matches('\''));
    if !o.status.success() || compatible != Some(want.as_str()) {
        bail!(
            "`rauc status` on the appliance does not say RAUC_SYSTEM_COMPATIBLE={want}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    writeln!(r, "| RAUC's compatible (`rauc status`): bundles for another architecture are refused | `{want}` |")?;
    let metrics = http_get(&format!("{base}/metrics"), 10)
        .context("the appliance does not answer /metrics")?;
    if metrics.is_empty() {
        bail!("the appliance's /metrics is empty");
    }
    let (uptime, generation) = check_sync(&mut vm, fwd, &up.want_sha, r)?;
    writeln!(r, "| `/metrics` | {} bytes |", metrics.len())?;
    for line in &settings.report {
        writeln!(r, "{line}")?;
    }

    // Past WatchdogSec with the same process (a restart would reset uptime_s).
    let mut previous = uptime;
    let survived = vm.wait_for(
        "rackboot running past its WatchdogSec",
        WATCHDOG_WAIT + Duration::from_secs(60),
        |_| {
            let (u, _) = status(fwd)?;
            if u < previous {
                // Reported as a failure below.
                return Some(Err(anyhow::anyhow!(
                    "rackboot restarted: uptime went from {previous} s to {u} s"
                )));
            }
            previous = u;
            (u >= WATCHDOG_WAIT.as_secs()).then_some(Ok(u))
        },
    )??;
    writeln!(
        r,
        "| same rackboot process past WatchdogSec=60s | uptime {survived} s |"
    )?;

    let shutdown = vm.power_down()?;
    let text = serial_text(&vm.serial);
    for needle in ["Stopped rackboot.service", "reboot: Power down"] {
        if !text.contains(needle) {
            bail!(
                "the appliance's shutdown did not print {needle:?}; see {}",
                vm.serial.display()
            );
        }
    }
    writeln!(
        r,
        "| ACPI power-off, rackboot stopped cleanly | {:.1} s |",
        shutdown.as_secs_f64()
    )?;
    Ok((generation, settings.token))
}

/// rackboot.service started (after READY=1), the privileged ports bound as the
/// rackboot user through the unit's ambient CAP_NET_BIND_SERVICE, a login prompt on
/// the serial console, and (amd64) the kernel booted with Secure Boot on.
fn check_started(vm: &mut Vm, r: &mut String) -> Result<()> {
    let arch = vm.arch;
    vm.wait_console(&[
        "Started rackboot.service",
        "listening for TFTP on [::]:69",
        "listening for HTTP on [::]:5248",
        "rackboot login:",
    ])?;
    writeln!(
        r,
        "| rackboot.service started (Type=notify), TFTP on [::]:69 and HTTP on [::]:5248 as user rackboot, serial login on {} | ok |",
        arch.console
    )?;
    if !arch.secure_boot {
        writeln!(
            r,
            "| Secure Boot off (this firmware has no Microsoft keys enrolled): shim → Debian-signed GRUB → kernel | ok |"
        )?;
        return Ok(());
    }
    if !serial_text(&vm.serial).contains(SECURE_BOOT_LINE) {
        bail!(
            "the kernel did not print {SECURE_BOOT_LINE:?}; see {}",
            vm.serial.display()
        );
    }
    writeln!(
        r,
        "| Secure Boot on (OVMF secboot build, Microsoft keys): shim → Debian-signed GRUB → Debian-signed kernel, the kernel prints `{SECURE_BOOT_LINE}` | ok |"
    )?;
    Ok(())
}

/// The kernel's timestamp (`[   76.180980] ...`) on the first console line holding
/// `needle`, in seconds.
fn kernel_time(text: &str, needle: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(needle))?;
    let stamp = line.trim_start().strip_prefix('[')?.split(']').next()?;
    stamp.trim().parse().ok()
}

/// Waits for the first sync from the host and compares a kernel the appliance serves
/// with the upstream's; returns rackboot's uptime then and the generation.
fn check_sync(vm: &mut Vm, fwd: u16, want_sha: &str, r: &mut String) -> Result<(u64, u64)> {
    let sync_started = Instant::now();
    let (uptime, generation) = vm.wait_for(
        "the appliance's first sync from the host",
        SYNC_TIMEOUT,
        |_| {
            let (u, g) = status(fwd)?;
            g.map(|g| (u, g))
        },
    )?;
    let sync_time = sync_started.elapsed();
    let got = http_get(&format!("http://127.0.0.1:{fwd}/{KERNEL_PATH}"), 120)
        .context("the appliance does not serve the kernel it synced")?;
    let got_sha = sha256_bytes(&got);
    if got_sha != want_sha {
        bail!("the kernel served by the appliance has sha256 {got_sha}, the upstream's {want_sha}");
    }
    eprintln!(
        "the appliance synced (generation {generation}) and serves the kernel ({} bytes, sha256 matches)",
        got.len()
    );
    // How long the sync itself took: the kernel's clock on rackboot's console lines
    // (the poll above only notices it between the other checks).
    let text = serial_text(&vm.serial);
    let took = match (
        kernel_time(&text, "INFO listening for HTTP on"),
        kernel_time(&text, "INFO sync published generation"),
    ) {
        (Some(a), Some(b)) => format!("{:.1} s after rackboot started (kernel clock)", b - a),
        _ => "? (no timestamps on the console)".to_string(),
    };
    writeln!(
        r,
        "| first sync from the host's rackboot (re-exported signed demo stream) | published {took}; seen {:.1} s after the first answer, generation {generation} |",
        sync_time.as_secs_f64()
    )?;
    writeln!(
        r,
        "| kernel fetched from the appliance | {} bytes, sha256 matches the upstream |",
        got.len()
    )?;
    Ok((uptime, generation))
}

/// The check's upstream: the x86_64 dist binary serving the signed demo stream on
/// loopback (the guest reaches it as 10.0.2.2).
struct Upstream {
    /// Killed (by PID) when dropped.
    _guard: Guard,
    port: u16,
    /// The sha256 of the demo kernel it serves ([`KERNEL_PATH`]).
    want_sha: String,
    /// The demo stream's keyring (the appliance needs it to check the stream).
    keyring: PathBuf,
}

/// A kernel of the demo stream, fetched from the upstream and from the appliance.
const KERNEL_PATH: &str = "images/debian/amd64/generic/bookworm/stable/boot-kernel";

/// Syncs and starts the check's upstream in `dir`.
fn start_upstream(dir: &Path, bin: &Path) -> Result<Upstream> {
    let stream = crate::demo_stream::build(&image_dir().join("check-stream"))?;
    let up_state = dir.join("upstream-state");
    let up_config = dir.join("upstream.toml");
    std::fs::write(
        &up_config,
        crate::demo_stream::DemoRack::loopback("\"amd64\"").config(&stream.dir, &up_state),
    )?;
    let up_config = up_config.to_str().context("utf-8 path")?;
    let bin_s = bin.to_str().context("utf-8 path")?;
    cmd(bin_s, &["--config", up_config, "sync"])?;
    let up_log = dir.join("upstream.log");
    let mut upstream = Guard::spawn(
        "rackboot serve (upstream on the host)",
        bin_s,
        &["--config", up_config, "serve"],
        &up_log,
    )?;
    let up_http =
        upstream.wait_for_log(&up_log, "listening for HTTP on", Duration::from_secs(30))?;
    let up_port = up_http
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .with_context(|| format!("no port in {up_http:?}"))?;
    let want = http_get(&format!("http://{up_http}/{KERNEL_PATH}"), 60)
        .context("the host rackboot does not serve the demo kernel")?;
    Ok(Upstream {
        _guard: upstream,
        port: up_port,
        want_sha: sha256_bytes(&want),
        keyring: stream.dir.join("keyring.gpg"),
    })
}

/// The check's copy of the image and what it needs to know about it.
struct CheckDisk {
    disk: PathBuf,
    /// The SSH key the settings partition authorises.
    key: PathBuf,
    image_bytes: u64,
    cfg_off: u64,
    data_off: u64,
    data_size_before: u64,
}

/// Makes the check's copy of `image` in `dir`: sparse, set up through RACKBOOT-CFG as
/// an operator would (upstream on the host's `up_port`, static address, SSH key, a bad
/// drop-in and network file), the demo `keyring` on the data partition, the journal
/// on the console, grown to [`CHECK_DISK_BYTES`].
fn prepare_disk(
    image: &Path,
    dir: &Path,
    arch: &Arch,
    up_port: u16,
    keyring: &Path,
) -> Result<CheckDisk> {
    // The check's copy: sparse, grown to 4 GiB; its settings go on the RACKBOOT-CFG
    // partition as an operator's laptop would put them there.
    let disk = dir.join("appliance.img");
    cmd(
        "cp",
        &[
            "--sparse=always",
            image.to_str().context("utf-8")?,
            disk.to_str().context("utf-8")?,
        ],
    )?;
    let image_bytes = std::fs::metadata(image)?.len();
    let (root_off, _) = partition(&disk, SLOT_A_PARTITION)?;
    let (data_off, data_size_before) = partition(&disk, DATA_PARTITION)?;
    let (cfg_off, _) = partition(&disk, CFG_PARTITION)?;
    let key = dir.join("id_check");
    cmd(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "rackboot-image-check",
            "-f",
            key.to_str().context("utf-8")?,
        ],
    )?;
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))?;
    let dropin = format!(
            "# Written by `cargo xtask image --check`: sync from the rackboot on the build host.\n\
             [boot]\ndefault_image = \"debian/bookworm\"\n\n\
             [[sources]]\nurl = \"http://10.0.2.2:{up_port}/\"\n\
             keyring_filename = \"/data/check-keyring.gpg\"\n\n\
             [[sources.selections]]\nos = \"debian\"\nrelease = \"bookworm\"\narches = [\"amd64\"]\n"
    );
    // QEMU user networking's own addresses, set statically (no DHCP on the appliance).
    let static_net =
        "[Match]\nName=en*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nDNS=10.0.2.3\n";
    cfg_write(
        &disk,
        cfg_off,
        &[
            ("rackboot.toml.d/50-check.toml", dropin.as_str()),
            // Refused (and rackboot still starts without it).
            (
                "rackboot.toml.d/60-bad.toml",
                "[http]\nmax_connections = \"lots\"\n",
            ),
            ("network/10-static.network", static_net),
            // Refused: no [Match] section.
            ("network/11-bad.network", "[Network]\nDHCP=yes\n"),
            ("authorized_keys", pubkey.as_str()),
        ],
    )?;
    // The journal on the serial console too, so the log shows what rackboot said.
    let journald = dir.join("50-check-console.conf");
    std::fs::write(
        &journald,
        format!("# Written by `cargo xtask image --check`.\n[Journal]\nForwardToConsole=yes\nTTYPath=/dev/{}\nMaxLevelConsole=info\n", arch.console),
    )?;
    // The demo keyring on the data partition, where every slot's rackboot finds it;
    // the journal on the console in slot A only (this version's first boot).
    debugfs_write(&disk, data_off, &[], &[(keyring, "/", "check-keyring.gpg")])?;
    debugfs_write(
        &disk,
        root_off,
        &["/etc/systemd/journald.conf.d"],
        &[(
            &journald,
            "/etc/systemd/journald.conf.d",
            "50-check-console.conf",
        )],
    )?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)?
        .set_len(CHECK_DISK_BYTES)?;
    Ok(CheckDisk {
        disk,
        key,
        image_bytes,
        cfg_off,
        data_off,
        data_size_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_time_reads_the_console_timestamp() {
        let text = "[   67.666682] rackboot[370]: 2026-12-05T03:25:32Z  INFO listening for HTTP on [::]:5248\n\
                    [  176.180980] rackboot[370]: 2026-12-05T03:25:40Z  INFO sync published generation 1: + a\n";
        assert_eq!(kernel_time(text, "listening for HTTP on"), Some(67.666682));
        assert_eq!(
            kernel_time(text, "sync published generation"),
            Some(176.18098)
        );
        assert_eq!(kernel_time(text, "not there"), None);
        assert_eq!(
            kernel_time("no stamp: sync published generation", "sync published"),
            None
        );
    }

    #[test]
    fn arch_names_and_directories() {
        assert_eq!(Arch::parse("arm64").unwrap().console, "ttyAMA0");
        assert!(Arch::parse("x86_64").is_err());
        assert_eq!(arch::ARM64.image_name(), "rackboot-appliance-arm64.img");
        assert!(arch_dir(&arch::ARM64, "build.log").ends_with("image/build-arm64.log"));
        assert!(arch_dir(&arch::AMD64, "build.log").ends_with("image/build.log"));
        assert!(arch_dir(&arch::ARM64, "check").ends_with("image/check-arm64"));
    }
}
