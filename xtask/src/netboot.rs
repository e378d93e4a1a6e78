//! `cargo xtask netboot [MODE...] [--keep]`: real firmware boots from rackboot.
//!
//! In a private network namespace (`rbnb-<pid>`): a bridge with the rack's address,
//! one tap per VM, dnsmasq as DHCP only (boot file by client architecture, option 93;
//! the HTTP boot URL and vendor class `HTTPClient` for HTTP-boot clients), tcpdump,
//! and the real rackboot binary serving the signed demo stream on TFTP 69 and HTTP
//! 5248. Every VM has its own MAC, set up with `rackboot machines set` to a kernel
//! parameter that only that MAC gets; its initramfs prints the marker line with
//! `/proc/cmdline`, and the mode passes when that line carries the parameter.
//!
//! Modes:
//! - `bios-tftp`       SeaBIOS PXE → pxelinux.0 (TFTP only) → kernel/initrd over TFTP
//! - `bios-http`       SeaBIOS PXE → lpxelinux.0 → kernel/initrd over HTTP
//! - `ipxe`            the NIC's iPXE → `ipxe.cfg` (TFTP) → per-MAC script over HTTP
//! - `uefi-amd64-tftp` OVMF PXE → shim → signed GRUB → `insmod http` → HTTP
//! - `uefi-amd64-secureboot` OVMF with Secure Boot on (Microsoft keys) → PXE → the
//!   Microsoft-signed shim → Debian-signed GRUB (locked down, no modules: the config
//!   keeps kernel/initrd on TFTP) → the Debian-signed kernel, which must say
//!   "Secure boot enabled"
//! - `uefi-amd64-http` OVMF HTTP boot → GRUB (HTTP) → kernel/initrd over HTTP
//! - `uefi-arm64-tftp` AAVMF PXE → shim → signed GRUB → kernel/initrd
//! - `uefi-arm64-secureboot` the same chain on AAVMF with Secure Boot on
//! - `uefi-arm64-http` AAVMF HTTP boot → GRUB (HTTP) → kernel/initrd over HTTP
//!
//! KVM is used for amd64 when a short probe boot reaches the marker with it; TCG
//! otherwise (arm64 is always TCG here); `RACKBOOT_NETBOOT_ACCEL=tcg|kvm` decides
//! without the probe. Every wait has a timeout. Serial logs,
//! rackboot's and dnsmasq's logs and a pcap stay under `target/netboot/` when a mode
//! fails (or with `--keep`). The namespace and every process are removed on every
//! exit path: processes by PID (and by parent-death signal if xtask itself dies),
//! the namespace by name, and stale namespaces of dead runs at the next start.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::demo_stream::{DemoRack, MARKER};
use crate::prereq::{self, cmd, output};
use crate::proc::Guard;

/// The rack's address on the bridge, and the DHCP range for the VMs.
const RACK_IP: &str = "10.77.0.1";
const HTTP_PORT: u16 = 5248;
/// What the kernel prints when the firmware booted it with Secure Boot on.
const SECURE_BOOT_LINE: &str = "Secure boot enabled";
/// The bridge's MAC (locally administered), set so that it never changes.
const BRIDGE_MAC: &str = "02:77:00:00:00:01";

/// Packages the harness drives (QEMU from bookworm-backports: the machine's
/// qemu-utils comes from there and conflicts with bookworm's qemu-system-common).
const DEBS: &[&str] = &[
    "ovmf",
    "qemu-efi-aarch64",
    "ipxe-qemu",
    "seabios",
    "dnsmasq-base",
    "iproute2",
    "tcpdump",
    "util-linux",
];
const BACKPORTS_DEBS: &[&str] = &["qemu-system-x86", "qemu-system-arm"];

/// How long one VM may take to reach its marker (TCG on 2 cores, two VMs at once).
const MODE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the KVM probe may take: a working KVM reaches the marker of a direct
/// kernel boot in a second or two; on this machine kind KVM guests hang instead.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Firmware {
    SeaBios,
    Ovmf,
    Aavmf,
}

#[derive(Clone, Copy, Debug)]
struct Mode {
    name: &'static str,
    firmware: Firmware,
    /// UEFI HTTP boot (PXE disabled in the firmware, so it goes straight to HTTP).
    http_boot: bool,
    /// UEFI Secure Boot on, with the Microsoft keys enrolled (as shipped PCs have).
    secure_boot: bool,
    /// A dnsmasq tag for this VM's MAC (for the BIOS modes that share client arch 0).
    tag: Option<&'static str>,
    what: &'static str,
}

const MODES: &[Mode] = &[
    Mode {
        name: "bios-tftp",
        firmware: Firmware::SeaBios,
        http_boot: false,
        secure_boot: false,
        tag: Some("pxetftp"),
        what: "BIOS PXE, pxelinux.0, kernel over TFTP",
    },
    Mode {
        name: "bios-http",
        firmware: Firmware::SeaBios,
        http_boot: false,
        secure_boot: false,
        tag: None,
        what: "BIOS PXE, lpxelinux.0, kernel over HTTP",
    },
    Mode {
        name: "ipxe",
        firmware: Firmware::SeaBios,
        http_boot: false,
        secure_boot: false,
        tag: Some("ipxemode"),
        what: "iPXE chainload: ipxe.cfg, per-MAC script over HTTP",
    },
    Mode {
        name: "uefi-amd64-tftp",
        firmware: Firmware::Ovmf,
        http_boot: false,
        secure_boot: false,
        tag: None,
        what: "OVMF PXE, shim + signed GRUB over TFTP",
    },
    Mode {
        name: "uefi-amd64-secureboot",
        firmware: Firmware::Ovmf,
        http_boot: false,
        secure_boot: true,
        tag: None,
        what: "OVMF PXE with Secure Boot on: MS-signed shim, signed GRUB, signed kernel",
    },
    Mode {
        name: "uefi-amd64-http",
        firmware: Firmware::Ovmf,
        http_boot: true,
        secure_boot: false,
        tag: None,
        what: "OVMF UEFI HTTP boot, GRUB over HTTP",
    },
    Mode {
        name: "uefi-arm64-tftp",
        firmware: Firmware::Aavmf,
        http_boot: false,
        secure_boot: false,
        tag: None,
        what: "AAVMF PXE, shim + signed GRUB over TFTP",
    },
    Mode {
        name: "uefi-arm64-secureboot",
        firmware: Firmware::Aavmf,
        http_boot: false,
        secure_boot: true,
        tag: None,
        what: "AAVMF PXE with Secure Boot on: MS-signed shim, signed GRUB, signed kernel",
    },
    Mode {
        name: "uefi-arm64-http",
        firmware: Firmware::Aavmf,
        http_boot: true,
        secure_boot: false,
        tag: None,
        what: "AAVMF UEFI HTTP boot, GRUB over HTTP",
    },
];

/// The private network namespace, deleted (with its bridge and taps) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        cmd("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        // A fixed MAC: a bridge without one takes the lowest MAC of its ports, so
        // adding the next VM's tap could change the rack's MAC under a VM that has
        // it in its ARP cache; that VM's packets (GRUB's ACKs mid-kernel) then go to
        // the old MAC and are dropped, and its download stalls.
        ns.ip(&[
            "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge",
        ])?;
        ns.ip(&["addr", "add", &format!("{RACK_IP}/24"), "dev", "br0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend_from_slice(args);
        cmd("ip", &full)
    }

    fn add_tap(&self, tap: &str) -> Result<()> {
        self.ip(&["tuntap", "add", tap, "mode", "tap"])?;
        self.ip(&["link", "set", tap, "master", "br0"])?;
        self.ip(&["link", "set", tap, "up"])
    }

    /// Starts `program` inside the namespace.
    fn spawn(&self, what: &str, program: &str, args: &[&str], log: &Path) -> Result<Guard> {
        Guard::spawn_via(
            &["ip", "netns", "exec", &self.name],
            what,
            program,
            args,
            log,
        )
        .with_context(|| format!("in {}", self.name))
    }

    /// [`Netns::spawn`] (`what`, `program`), then waits (at most 30 s) until its log
    /// has a line holding `ready`.
    fn spawn_ready(
        &self,
        (what, program): (&str, &str),
        args: &[&str],
        log: &Path,
        ready: &str,
    ) -> Result<Guard> {
        let mut g = self.spawn(what, program, args, log)?;
        wait_for_line(log, ready, &[], &mut g, Duration::from_secs(30))?;
        Ok(g)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Deletes namespaces left by runs whose xtask process is gone.
fn sweep_stale_namespaces() {
    let Ok(list) = output("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(pid) = name.strip_prefix("rbnb-") {
            if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("removing the stale namespace {name}");
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

/// One look at `path`: `Some(Ok(line))` once a line holds `needle`, `Some(Err)` when
/// a failure pattern shows up, the process exited or `limit` passed since `started`,
/// `None` to keep waiting.
/// The first line of `text` holding `needle`, trimmed. With `whole_only`, a last line
/// without its newline does not count: a VM's serial file grows a few bytes at a time
/// under TCG, and a line read before its end is missing the end.
fn line_with(text: &str, needle: &str, whole_only: bool) -> Option<String> {
    text.split_inclusive('\n')
        .filter(|l| !whole_only || l.ends_with('\n'))
        .find(|l| l.contains(needle))
        .map(|l| l.trim().to_string())
}

fn poll_line(
    path: &Path,
    needle: &str,
    fail: &[&str],
    proc: &mut Guard,
    started: Instant,
    limit: Duration,
) -> Option<Result<String>> {
    let read = || String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    let found = |text: &str, whole_only: bool| line_with(text, needle, whole_only);
    let text = read();
    if let Some(line) = found(&text, true) {
        return Some(Ok(line));
    }
    if let Some(f) = fail.iter().find(|f| text.contains(*f)) {
        return Some(Err(anyhow::anyhow!("{} printed {f:?}", proc.what)));
    }
    if let Some(status) = proc.exited() {
        // One last read: the line may have landed as it exited.
        return Some(found(&read(), false).ok_or_else(|| {
            anyhow::anyhow!("{} exited ({status}) before printing {needle:?}", proc.what)
        }));
    }
    if started.elapsed() > limit {
        return Some(Err(anyhow::anyhow!(
            "{} did not print {needle:?} within {} s",
            proc.what,
            limit.as_secs()
        )));
    }
    None
}

/// Waits (bounded by `limit`) for a line holding `needle` in `path`.
fn wait_for_line(
    path: &Path,
    needle: &str,
    fail: &[&str],
    proc: &mut Guard,
    limit: Duration,
) -> Result<String> {
    let started = Instant::now();
    loop {
        if let Some(r) = poll_line(path, needle, fail, proc, started, limit) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn mac_of(i: usize) -> String {
    format!("52:54:00:77:00:{:02x}", i + 1)
}

fn dnsmasq_config(dir: &Path, macs: &[(Mode, String)]) -> String {
    let mut c = String::new();
    let http = format!("http://{RACK_IP}:{HTTP_PORT}");
    let _ = write!(
        c,
        "port=0
interface=br0
bind-interfaces
log-facility=-
log-dhcp
dhcp-range=10.77.0.100,10.77.0.200,255.255.255.0,1h
dhcp-leasefile={leases}
dhcp-match=set:bios,option:client-arch,0
dhcp-match=set:efi64,option:client-arch,7
dhcp-match=set:efi64,option:client-arch,9
dhcp-match=set:efiarm,option:client-arch,11
dhcp-match=set:efi64http,option:client-arch,16
dhcp-match=set:efiarmhttp,option:client-arch,19
dhcp-userclass=set:ipxe,iPXE
dhcp-boot=tag:bios,tag:!pxetftp,tag:!ipxemode,pxelinux.0,,{RACK_IP}
dhcp-boot=tag:bios,tag:pxetftp,bootloader/pxe/i386/pxelinux.0,,{RACK_IP}
dhcp-boot=tag:ipxe,tag:ipxemode,ipxe.cfg,,{RACK_IP}
dhcp-boot=tag:efi64,bootx64.efi,,{RACK_IP}
dhcp-boot=tag:efiarm,bootaa64.efi,,{RACK_IP}
dhcp-option-force=tag:efi64http,60,HTTPClient
dhcp-boot=tag:efi64http,{http}/bootloader/uefi/amd64/grubhttpx64.efi
dhcp-option-force=tag:efiarmhttp,60,HTTPClient
dhcp-boot=tag:efiarmhttp,{http}/bootloader/uefi/arm64/grubhttpaa64.efi
",
        leases = dir.join("dnsmasq.leases").display(),
    );
    for (mode, mac) in macs {
        if let Some(tag) = mode.tag {
            let _ = writeln!(c, "dhcp-host={mac},set:{tag}");
        }
    }
    c
}

/// A UEFI mode's firmware image and the template of its variable store (Debian's
/// `ovmf` and `qemu-efi-aarch64`). With Secure Boot: the Secure Boot build, and
/// variables with Secure Boot on and the Microsoft keys enrolled.
fn uefi_files(mode: &Mode) -> Option<(&'static str, &'static str)> {
    Some(match (mode.firmware, mode.secure_boot) {
        (Firmware::SeaBios, _) => return None,
        (Firmware::Ovmf, false) => (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        (Firmware::Ovmf, true) => (
            "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
        ),
        (Firmware::Aavmf, false) => (
            "/usr/share/AAVMF/AAVMF_CODE.fd",
            "/usr/share/AAVMF/AAVMF_VARS.fd",
        ),
        (Firmware::Aavmf, true) => (
            "/usr/share/AAVMF/AAVMF_CODE.ms.fd",
            "/usr/share/AAVMF/AAVMF_VARS.ms.fd",
        ),
    })
}

/// The QEMU command line of a mode (run inside the namespace).
fn qemu_args(
    mode: &Mode,
    mac: &str,
    tap: &str,
    serial: &Path,
    vars: &Path,
    kvm: bool,
) -> (String, Vec<String>) {
    let mut a: Vec<String> = Vec::new();
    let mut push = |v: &[&str]| a.extend(v.iter().map(|s| s.to_string()));
    let nic_rom = match mode.firmware {
        // SeaBIOS boots through the NIC's iPXE option ROM; UEFI firmware uses its
        // own virtio-net driver and network stack.
        Firmware::SeaBios => String::new(),
        _ => ",romfile=".to_string(),
    };
    let accel = if kvm { "kvm" } else { "tcg" };
    let program = match mode.firmware {
        Firmware::SeaBios => {
            push(&[
                "-machine",
                &format!("pc,accel={accel}"),
                "-m",
                "512",
                "-boot",
                "n",
            ]);
            "qemu-system-x86_64"
        }
        Firmware::Ovmf => {
            if mode.secure_boot {
                // The Secure Boot build of OVMF keeps its variables in SMM.
                push(&["-machine", &format!("q35,smm=on,accel={accel}")]);
                push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
            } else {
                push(&["-machine", &format!("q35,accel={accel}")]);
            }
            push(&["-m", "1024"]);
            "qemu-system-x86_64"
        }
        Firmware::Aavmf => {
            push(&["-machine", "virt,accel=tcg", "-cpu", "max", "-m", "1024"]);
            "qemu-system-aarch64"
        }
    };
    if let Some((code, _)) = uefi_files(mode) {
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,readonly=on,file={code}"),
        ]);
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,file={}", vars.display()),
        ]);
    }
    if mode.http_boot {
        push(&["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]);
        push(&["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]);
    }
    push(&[
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
        &format!("file:{}", serial.display()),
        "-netdev",
        &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={mac}{nic_rom}"),
    ]);
    (program.to_string(), a)
}

/// Whether KVM boots a guest here: a direct kernel boot of the demo kernel and
/// initramfs must reach the marker (on this machine kind /dev/kvm exists but guests
/// hang, so the device alone proves nothing).
fn kvm_works(snapshot: &Path, dir: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let img = snapshot.join("debian/amd64/generic/bookworm/stable");
    let serial = dir.join("kvm-probe.serial");
    let (kernel, initrd) = (img.join("boot-kernel"), img.join("boot-initrd"));
    let args = [
        "-machine",
        "pc,accel=kvm",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
        &format!("file:{}", serial.display()),
        "-net",
        "none",
        "-kernel",
        kernel.to_str().unwrap_or(""),
        "-initrd",
        initrd.to_str().unwrap_or(""),
        "-append",
        "console=ttyS0,115200 panic=-1",
    ];
    let Ok(mut p) = Guard::spawn(
        "KVM probe",
        "qemu-system-x86_64",
        &args,
        &dir.join("kvm-probe.log"),
    ) else {
        return false;
    };
    let ok = wait_for_line(&serial, MARKER, &[], &mut p, KVM_PROBE_TIMEOUT).is_ok();
    drop(p);
    ok
}

struct Outcome {
    mode: Mode,
    accel: &'static str,
    result: Result<(Duration, String)>,
}

/// Two VMs at a time (the machine has two cores); the next starts as one ends.
const PARALLEL: usize = 2;

/// Serial output that means a boot has failed (no need to wait for the timeout).
const BOOT_FAILURES: &[&str] = &[
    "grub>",
    "Kernel panic",
    "No bootable device",
    "Failed to boot both default and fallback entries",
];

/// What `prepare` made: the run's directory, a synced rack config, and per mode the
/// MAC and the kernel parameter its marker line must carry.
struct Prepared {
    base: std::path::PathBuf,
    dir: std::path::PathBuf,
    bin: String,
    config: String,
    kvm: bool,
    macs: Vec<(Mode, String)>,
    expected: Vec<String>,
}

/// The servers on the namespace's bridge, stopped on drop in field order: DHCP
/// first, then the server, then the capture (so it holds the end).
struct Network {
    _dnsmasq: Guard,
    _serve: Guard,
    _tcpdump: Guard,
}

/// One VM booting.
struct Vm {
    mode: Mode,
    param: String,
    serial: std::path::PathBuf,
    proc: Guard,
    started: Instant,
    accel: &'static str,
}

pub fn run(args: &[String]) -> Result<()> {
    let keep = args.iter().any(|a| a == "--keep");
    let modes = select_modes(args)?;
    prereq::ensure_debs(DEBS)?;
    prereq::ensure_backports_debs(BACKPORTS_DEBS)?;
    sweep_stale_namespaces();
    let p = prepare(&modes)?;
    let ns = Netns::create(&format!("rbnb-{}", std::process::id()))?;
    let net = start_network(&ns, &p)?;
    let outcomes = boot_all(&ns, &p)?;
    drop(net);
    drop(ns);
    report(&p, &outcomes, keep)
}

/// The modes named on the command line (all when none is).
fn select_modes(args: &[String]) -> Result<Vec<Mode>> {
    let wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for w in &wanted {
        if !MODES.iter().any(|m| m.name == *w) {
            bail!(
                "unknown netboot mode {w:?} (modes: {})",
                MODES.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(MODES
        .iter()
        .filter(|m| wanted.is_empty() || wanted.contains(&m.name))
        .copied()
        .collect())
}

/// Builds the demo stream and rackboot, syncs a rack, gives every VM's MAC its own
/// kernel parameter, and probes KVM.
fn prepare(modes: &[Mode]) -> Result<Prepared> {
    let root = crate::root();
    let base = root.join("target/netboot");
    std::fs::create_dir_all(&base)?;
    let dir = base.join(format!("run-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let stream = base.join("stream");
    let summary = crate::demo_stream::build(&stream)?;
    eprintln!("{summary}");
    std::env::set_current_dir(&root)?;
    cmd("cargo", &["build", "--bin", "rackboot"])?;
    let bin = crate::prereq::target_dir(&root).join("debug/rackboot");
    let bin = bin.to_str().context("utf-8 path")?.to_string();

    let state = dir.join("state");
    let config = dir.join("rackboot.toml");
    let (tftp, http) = (format!("{RACK_IP}:69"), format!("{RACK_IP}:{HTTP_PORT}"));
    let rack = DemoRack {
        sync: "auto = false",
        tftp_listen: &tftp,
        http_listen: &http,
        kernel_params: Some("panic=-1"),
        arches: "\"amd64\", \"arm64\"",
    };
    std::fs::write(&config, rack.config(&stream, &state))?;
    let config = config.to_str().context("utf-8 path")?.to_string();
    let rb = |args: &[&str]| -> Result<()> {
        let mut full = vec!["--config", config.as_str()];
        full.extend_from_slice(args);
        cmd(&bin, &full)
    };
    rb(&["sync"])?;

    // A parameter only each VM's MAC gets: the marker must carry it.
    let token = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id())
    );
    let macs: Vec<(Mode, String)> = modes
        .iter()
        .enumerate()
        .map(|(i, m)| (*m, mac_of(i)))
        .collect();
    let mut expected = Vec::new();
    for (mode, mac) in &macs {
        let console = match mode.firmware {
            Firmware::Aavmf => "console=ttyAMA0",
            _ => "console=ttyS0,115200",
        };
        let param = format!("rackboot.netboot={}-{token}", mode.name);
        rb(&[
            "machines",
            "set",
            mac,
            &format!("kernel_params={console} {param}"),
        ])?;
        expected.push(param);
    }

    // RACKBOOT_NETBOOT_ACCEL=tcg|kvm skips the probe.
    let kvm = match std::env::var("RACKBOOT_NETBOOT_ACCEL").as_deref() {
        Ok("tcg") => false,
        Ok("kvm") => true,
        _ => kvm_works(&state.join("current"), &dir),
    };
    eprintln!(
        "KVM: {}",
        if kvm {
            "works, used for amd64"
        } else {
            "not usable, TCG for all"
        }
    );
    Ok(Prepared {
        base,
        dir,
        bin,
        config,
        kvm,
        macs,
        expected,
    })
}

/// tcpdump on the bridge, `rackboot serve` and dnsmasq (DHCP) in the namespace, each
/// up before the next starts.
fn start_network(ns: &Netns, p: &Prepared) -> Result<Network> {
    let dir = &p.dir;
    let tcpdump = ns.spawn(
        "tcpdump",
        "tcpdump",
        &[
            "-i",
            "br0",
            "-U",
            "-s",
            "512",
            "-w",
            dir.join("netboot.pcap").to_str().context("utf-8")?,
        ],
        &dir.join("tcpdump.log"),
    )?;
    let serve = ns.spawn_ready(
        ("rackboot serve", &p.bin),
        &["--config", &p.config, "serve"],
        &dir.join("rackboot.log"),
        "listening for HTTP",
    )?;
    std::fs::write(dir.join("dnsmasq.conf"), dnsmasq_config(dir, &p.macs))?;
    let dnsmasq = ns.spawn_ready(
        ("dnsmasq", "dnsmasq"),
        &[
            "--keep-in-foreground",
            &format!("--conf-file={}", dir.join("dnsmasq.conf").display()),
        ],
        &dir.join("dnsmasq.log"),
        "DHCP, sockets bound",
    )?;
    Ok(Network {
        _dnsmasq: dnsmasq,
        _serve: serve,
        _tcpdump: tcpdump,
    })
}

/// Boots every mode's VM, [`PARALLEL`] at a time, until each reaches its marker,
/// fails or times out.
fn boot_all(ns: &Netns, p: &Prepared) -> Result<Vec<Outcome>> {
    let mut queue = 0..p.macs.len();
    let mut running: Vec<Vm> = Vec::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    loop {
        while running.len() < PARALLEL {
            let Some(i) = queue.next() else {
                break;
            };
            running.push(start_vm(ns, p, i)?);
        }
        if running.is_empty() {
            return Ok(outcomes);
        }
        let mut still = Vec::new();
        for mut vm in running {
            match poll_line(
                &vm.serial,
                MARKER,
                BOOT_FAILURES,
                &mut vm.proc,
                vm.started,
                MODE_TIMEOUT,
            ) {
                None => still.push(vm),
                Some(r) => outcomes.push(finish_vm(&vm, r)),
            }
        }
        running = still;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts the VM of mode `i` on its own tap.
fn start_vm(ns: &Netns, p: &Prepared, i: usize) -> Result<Vm> {
    let ((mode, mac), param) = (&p.macs[i], &p.expected[i]);
    let tap = format!("tap{i}");
    ns.add_tap(&tap)?;
    let serial = p.dir.join(format!("{}.serial", mode.name));
    let vars = p.dir.join(format!("{}.vars.fd", mode.name));
    if let Some((_, template)) = uefi_files(mode) {
        std::fs::copy(template, &vars)?;
    }
    let use_kvm = p.kvm && mode.firmware != Firmware::Aavmf;
    let (program, args) = qemu_args(mode, mac, &tap, &serial, &vars, use_kvm);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eprintln!("starting {} ({}), MAC {mac}", mode.name, mode.what);
    let proc = ns.spawn(
        mode.name,
        &program,
        &args,
        &p.dir.join(format!("{}.qemu.log", mode.name)),
    )?;
    Ok(Vm {
        mode: *mode,
        param: param.clone(),
        serial,
        proc,
        started: Instant::now(),
        accel: if use_kvm { "kvm" } else { "tcg" },
    })
}

/// Judges a VM that stopped waiting: its marker line must carry its parameter (and,
/// with Secure Boot, the kernel must have said so); a failure shows the serial tail.
fn finish_vm(vm: &Vm, r: Result<String>) -> Outcome {
    let t = vm.started.elapsed();
    let result = r.and_then(|line| {
        if !line.contains(&vm.param) {
            bail!("the marker line lacks {:?}: {line}", vm.param)
        }
        if vm.mode.secure_boot {
            let serial = std::fs::read(&vm.serial).unwrap_or_default();
            if !String::from_utf8_lossy(&serial).contains(SECURE_BOOT_LINE) {
                bail!("the kernel did not say {SECURE_BOOT_LINE:?}");
            }
        }
        Ok((t, line))
    });
    match &result {
        Ok((t, _)) => {
            eprintln!("{}: marker after {:.1} s", vm.mode.name, t.as_secs_f64())
        }
        Err(e) => {
            eprintln!("{}: FAILED: {e:#}", vm.mode.name);
            // CI keeps only the output: show where the boot stopped.
            eprintln!(
                "--- last lines of {} ---\n{}\n---",
                vm.serial.display(),
                readable_tail(&vm.serial, 25)
            );
        }
    }
    Outcome {
        mode: vm.mode,
        accel: vm.accel,
        result,
    }
}

/// Prints and writes the table of outcomes; fails naming the modes that failed (and
/// keeps their logs).
fn report(p: &Prepared, outcomes: &[Outcome], keep: bool) -> Result<()> {
    let mut report = String::new();
    writeln!(
        report,
        "| mode | boot path | accel | result | time to marker |"
    )?;
    writeln!(report, "|---|---|---|---|---|")?;
    for o in outcomes {
        let (res, t) = match &o.result {
            Ok((t, _)) => ("ok".to_string(), format!("{:.1} s", t.as_secs_f64())),
            Err(e) => (format!("FAILED: {e:#}"), "-".into()),
        };
        writeln!(
            report,
            "| {} | {} | {} | {res} | {t} |",
            o.mode.name, o.mode.what, o.accel
        )?;
    }
    println!("\n{report}");
    std::fs::write(p.base.join("report.md"), &report)?;
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| o.mode.name)
        .collect();
    if failed.is_empty() {
        if !keep {
            std::fs::remove_dir_all(&p.dir)?;
        } else {
            println!("logs kept in {}", p.dir.display());
        }
        println!("netboot: {} modes reached their marker", outcomes.len());
        Ok(())
    } else {
        bail!(
            "netboot: {} failed ({}); serial logs, rackboot.log, dnsmasq.log and netboot.pcap are in {}",
            failed.len(),
            failed.join(", "),
            p.dir.display()
        )
    }
}

/// The last `lines` lines of a serial log, with terminal escape sequences and
/// other control bytes removed (firmware and GRUB draw with them).
fn readable_tail(path: &Path, lines: usize) -> String {
    let raw = std::fs::read(path).unwrap_or_default();
    let mut text = String::with_capacity(raw.len());
    let mut bytes = raw.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            0x1b => {
                // CSI: ESC [ parameters final-byte; other escapes: ESC + one byte.
                if bytes.next_if_eq(&b'[').is_some() {
                    for c in bytes.by_ref() {
                        if (0x40..=0x7e).contains(&c) {
                            break;
                        }
                    }
                } else {
                    bytes.next();
                }
            }
            b'\n' => text.push('\n'),
            b'\r' => text.push('\n'),
            0x20..=0x7e => text.push(b as char),
            _ => {}
        }
    }
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::line_with;

    #[test]
    fn a_marker_line_counts_once_it_has_its_newline() {
        let partial = "boot\r\nRACKBOOT-MARKER cmdline=ro ip6=";
        assert_eq!(line_with(partial, "RACKBOOT-MARKER", true), None);
        // After the VM exits, what is there is all there will be.
        assert_eq!(
            line_with(partial, "RACKBOOT-MARKER", false).as_deref(),
            Some("RACKBOOT-MARKER cmdline=ro ip6=")
        );
        let whole = "boot\r\nRACKBOOT-MARKER cmdline=ro ip6=off x=1\r\n[ 3.1] reboot";
        assert_eq!(
            line_with(whole, "RACKBOOT-MARKER", true).as_deref(),
            Some("RACKBOOT-MARKER cmdline=ro ip6=off x=1")
        );
    }
}
