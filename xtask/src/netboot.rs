//! `cargo xtask netboot [MODE...] [--keep]`: real firmware boots from rackboot.
//!
//! In a private network namespace (`rbnb-<pid>`): a bridge with the rack's addresses
//! (`10.77.0.1/24`, `fd52::1/64`), one tap per VM, tcpdump, and the real rackboot
//! binary serving the signed demo stream on TFTP 69 and HTTP 5248 on both addresses.
//! Every VM has its own MAC, set up with `rackboot machines set` to a kernel
//! parameter that only that MAC gets; its initramfs prints the marker line with
//! `/proc/cmdline`, and the mode passes when that line carries the parameter.
//!
//! The modes run in setups, one after the other, each with its own DHCP servers:
//! - direct: dnsmasq in the rack's namespace as the site's DHCP with the boot options
//!   (boot file by client architecture, option 93; the HTTP boot URL and vendor class
//!   `HTTPClient` for HTTP-boot clients), and for IPv6 dnsmasq's router advertisements
//!   plus ISC dhcpd's DHCPv6 with the boot file URL (option 59);
//! - proxy-dnsmasq, proxy-isc: the site's DHCP is another host (namespace `rbns-<pid>`,
//!   a veth on the bridge, `10.77.0.2`) serving addresses only, no boot option at all:
//!   dnsmasq (puts its own address in `siaddr`) or ISC dhcpd (leaves it 0.0.0.0); the
//!   rack runs with `[dhcp] proxy = true` and its ProxyDHCP answers the PXE and
//!   HTTP-boot requests (UEFI machines get iPXE from Debian's `ipxe` package).
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
//! - `ipv6-uefi-amd64-tftp` OVMF PXE over IPv6 (IPv4 PXE off) → `tftp://[fd52::1]/`
//!   shim → signed GRUB (TFTP over IPv6) → kernel/initrd from `(http,[fd52::1]:5248)`
//! - `ipv6-uefi-amd64-http` OVMF HTTP boot over IPv6 → GRUB from
//!   `http://[fd52::1]:5248/` → kernel/initrd over HTTP. OVMF tries HTTP boot over
//!   IPv4 first: this VM's IPv4 offer names a URL that 404s, so it moves on at once.
//!   Both IPv6 modes also require the marker's command line to be the one rendered for
//!   an IPv6 request (`root=squash:http://[fd52::1]:5248/…`, `ip6=dhcp`).
//! - `proxy-{dnsmasq,isc}-bios` SeaBIOS, the NIC's iPXE ROM (user class `iPXE`) →
//!   ProxyDHCP → `boot.ipxe?mac=…` over HTTP (a plain PXE ROM would get pxelinux.0)
//! - `proxy-{dnsmasq,isc}-uefi-amd64` OVMF PXE → ProxyDHCP → iPXE `snponly.efi` (TFTP)
//!   → ProxyDHCP again as iPXE → `boot.ipxe` over HTTP
//! - `proxy-{dnsmasq,isc}-uefi-arm64` the same on AAVMF with `ipxe-arm64.efi`
//! - `proxy-{dnsmasq,isc}-http-amd64` OVMF HTTP boot → ProxyDHCP's `HTTPClient` offer
//!   with the URL of iPXE (`ipxe/ipxe-amd64.efi`) → `boot.ipxe`
//! - `proxy-{dnsmasq,isc}-bios-pxelinux` the BIOS VM's MAC has `dhcp_boot =
//!   pxelinux.0`: the iPXE ROM → pxelinux.0 → kernel/initrd over TFTP
//! - `proxy-isc-uefi-amd64-missing-file` the MAC's `dhcp_boot` names a loader the rack
//!   does not have: no marker; the mode passes when `rackboot boots MAC` ends at that
//!   file's TFTP ERROR 1
//!
//! After every proxy mode, `rackboot boots MAC --json` (run against the rack's API)
//! must show the VM's boot: the ProxyDHCP offer first, its TFTP/HTTP requests, and
//! the last step "initrd" (or "squashfs").
//!
//! KVM is used for amd64 when a short probe boot reaches the marker with it; TCG
//! otherwise (arm64 is always TCG here); `RACKBOOT_NETBOOT_ACCEL=tcg|kvm` decides
//! without the probe. Every wait has a timeout. Serial logs, rackboot's and the DHCP
//! servers' logs and a pcap per setup stay under `target/netboot/` when a mode fails
//! (or with `--keep`). The namespaces and every process are removed on every exit
//! path: processes by PID (and by parent-death signal if xtask itself dies), the
//! namespaces by name, and stale namespaces of dead runs at the next start.

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
/// The rack's IPv6 address on the bridge (a ULA prefix, `fd52::/64`).
const RACK_IP6: &str = "fd52::1";
const PREFIX6: &str = "fd52::";
/// The site's DHCP host in the proxy modes (its own namespace, a veth on the bridge).
const SITE_IP: &str = "10.77.0.2";
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
    "isc-dhcp-server",
    "curl",
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
    /// How the VM finds the rack.
    net: Net,
    /// A per-MAC `dhcp_boot` override for this VM (proxy modes): what rackboot's
    /// ProxyDHCP offers it instead of the loader for its architecture.
    dhcp_boot: Option<&'static str>,
    what: &'static str,
}

/// The boot file the `*-missing-file` modes are offered: the rack does not have it,
/// so the VM never reaches a marker; the boot log must show that file's error as the
/// machine's last event.
const MISSING_LOADER: &str = "ipxe/not-shipped.efi";

/// How a mode's VM finds the rack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    /// The rack's dnsmasq hands out IPv4 addresses and the boot options.
    V4,
    /// IPv6 only: dnsmasq's router advertisements, ISC dhcpd's DHCPv6 with the boot
    /// file URL (option 59; dnsmasq cannot send the binary vendor class option 16
    /// that UEFI HTTP boot over IPv6 requires).
    V6,
    /// The site's DHCP server on another host hands out addresses only; rackboot's
    /// ProxyDHCP answers the PXE and HTTP-boot requests.
    Proxy(Site),
}

/// The site's DHCP server in the proxy modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    /// dnsmasq: puts its own address in `siaddr`.
    Dnsmasq,
    /// ISC dhcpd: leaves `siaddr` 0.0.0.0 (as Kea and most enterprise servers do).
    Isc,
}

impl Site {
    fn name(self) -> &'static str {
        match self {
            Site::Dnsmasq => "dnsmasq",
            Site::Isc => "isc",
        }
    }
}

/// The modes that share one set of servers on the bridge boot together: the direct
/// modes (IPv4 and IPv6 side by side), then each site server's proxy modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Direct,
    Proxy(Site),
}

impl Mode {
    fn setup(&self) -> Setup {
        match self.net {
            Net::V4 | Net::V6 => Setup::Direct,
            Net::Proxy(site) => Setup::Proxy(site),
        }
    }
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::Direct => "direct".into(),
            Setup::Proxy(site) => format!("proxy-{}", site.name()),
        }
    }
}

/// A proxy mode: the site's DHCP serves addresses only, rackboot's ProxyDHCP the rest.
const fn proxy_mode(
    name: &'static str,
    site: Site,
    firmware: Firmware,
    http_boot: bool,
    what: &'static str,
) -> Mode {
    Mode {
        name,
        firmware,
        http_boot,
        secure_boot: false,
        tag: None,
        net: Net::Proxy(site),
        dhcp_boot: None,
        what,
    }
}

/// [`proxy_mode`] whose VM's MAC gets `dhcp_boot` as its ProxyDHCP boot file.
const fn proxy_mode_booting(
    name: &'static str,
    site: Site,
    firmware: Firmware,
    dhcp_boot: &'static str,
    what: &'static str,
) -> Mode {
    let mut m = proxy_mode(name, site, firmware, false, what);
    m.dhcp_boot = Some(dhcp_boot);
    m
}

const MODES: &[Mode] = &[
    Mode {
        name: "bios-tftp",
        firmware: Firmware::SeaBios,
        http_boot: false,
        secure_boot: false,
        tag: Some("pxetftp"),
        net: Net::V4,
        dhcp_boot: None,
        what: "BIOS PXE, pxelinux.0, kernel over TFTP",
    },
    Mode {
        name: "bios-http",
        firmware: Firmware::SeaBios,
        http_boot: false,
        secure_boot: false,
        tag: None,
        net: Net::V4,
        dhcp_boot: None,
        what: "BIOS PXE, lpxelinux.0, kernel over HTTP",
    },
    Mode {
        name: "ipxe",
        firmware: Firmware::SeaBios,
        http_boot: false,
        secure_boot: false,
        tag: Some("ipxemode"),
        net: Net::V4,
        dhcp_boot: None,
        what: "iPXE chainload: ipxe.cfg, per-MAC script over HTTP",
    },
    Mode {
        name: "uefi-amd64-tftp",
        firmware: Firmware::Ovmf,
        http_boot: false,
        secure_boot: false,
        tag: None,
        net: Net::V4,
        dhcp_boot: None,
        what: "OVMF PXE, shim + signed GRUB over TFTP",
    },
    Mode {
        name: "uefi-amd64-secureboot",
        firmware: Firmware::Ovmf,
        http_boot: false,
        secure_boot: true,
        tag: None,
        net: Net::V4,
        dhcp_boot: None,
        what: "OVMF PXE with Secure Boot on: MS-signed shim, signed GRUB, signed kernel",
    },
    Mode {
        name: "uefi-amd64-http",
        firmware: Firmware::Ovmf,
        http_boot: true,
        secure_boot: false,
        tag: None,
        net: Net::V4,
        dhcp_boot: None,
        what: "OVMF UEFI HTTP boot, GRUB over HTTP",
    },
    Mode {
        name: "uefi-arm64-tftp",
        firmware: Firmware::Aavmf,
        http_boot: false,
        secure_boot: false,
        tag: None,
        net: Net::V4,
        dhcp_boot: None,
        what: "AAVMF PXE, shim + signed GRUB over TFTP",
    },
    Mode {
        name: "uefi-arm64-secureboot",
        firmware: Firmware::Aavmf,
        http_boot: false,
        secure_boot: true,
        tag: None,
        net: Net::V4,
        dhcp_boot: None,
        what: "AAVMF PXE with Secure Boot on: MS-signed shim, signed GRUB, signed kernel",
    },
    Mode {
        name: "uefi-arm64-http",
        firmware: Firmware::Aavmf,
        http_boot: true,
        secure_boot: false,
        tag: None,
        net: Net::V4,
        dhcp_boot: None,
        what: "AAVMF UEFI HTTP boot, GRUB over HTTP",
    },
    Mode {
        name: "ipv6-uefi-amd64-tftp",
        firmware: Firmware::Ovmf,
        http_boot: false,
        secure_boot: false,
        tag: Some("v6only"),
        net: Net::V6,
        dhcp_boot: None,
        what: "OVMF PXE over IPv6 (DHCPv6 tftp://[fd52::1]/bootx64.efi), shim + signed GRUB, kernel over HTTP to [fd52::1]",
    },
    Mode {
        name: "ipv6-uefi-amd64-http",
        firmware: Firmware::Ovmf,
        http_boot: true,
        secure_boot: false,
        tag: Some("v6only"),
        net: Net::V6,
        dhcp_boot: None,
        what: "OVMF UEFI HTTP boot over IPv6 (DHCPv6 http://[fd52::1]:5248/…), GRUB over HTTP",
    },
    proxy_mode(
        "proxy-dnsmasq-bios",
        Site::Dnsmasq,
        Firmware::SeaBios,
        false,
        "site dnsmasq (siaddr = itself) + rackboot ProxyDHCP: SeaBIOS iPXE ROM → boot.ipxe (HTTP)",
    ),
    proxy_mode(
        "proxy-dnsmasq-uefi-amd64",
        Site::Dnsmasq,
        Firmware::Ovmf,
        false,
        "site dnsmasq + rackboot ProxyDHCP: OVMF PXE → iPXE snponly.efi",
    ),
    proxy_mode(
        "proxy-dnsmasq-uefi-arm64",
        Site::Dnsmasq,
        Firmware::Aavmf,
        false,
        "site dnsmasq + rackboot ProxyDHCP: AAVMF PXE → iPXE ipxe-arm64.efi",
    ),
    proxy_mode(
        "proxy-dnsmasq-http-amd64",
        Site::Dnsmasq,
        Firmware::Ovmf,
        true,
        "site dnsmasq + rackboot ProxyDHCP: OVMF HTTP boot → iPXE",
    ),
    proxy_mode(
        "proxy-isc-bios",
        Site::Isc,
        Firmware::SeaBios,
        false,
        "site ISC dhcpd (siaddr 0.0.0.0) + rackboot ProxyDHCP: SeaBIOS iPXE ROM → boot.ipxe (HTTP)",
    ),
    proxy_mode(
        "proxy-isc-uefi-amd64",
        Site::Isc,
        Firmware::Ovmf,
        false,
        "site ISC dhcpd + rackboot ProxyDHCP: OVMF PXE → iPXE snponly.efi",
    ),
    proxy_mode(
        "proxy-isc-uefi-arm64",
        Site::Isc,
        Firmware::Aavmf,
        false,
        "site ISC dhcpd + rackboot ProxyDHCP: AAVMF PXE → iPXE ipxe-arm64.efi",
    ),
    proxy_mode(
        "proxy-isc-http-amd64",
        Site::Isc,
        Firmware::Ovmf,
        true,
        "site ISC dhcpd + rackboot ProxyDHCP: OVMF HTTP boot → iPXE",
    ),
    proxy_mode_booting(
        "proxy-dnsmasq-bios-pxelinux",
        Site::Dnsmasq,
        Firmware::SeaBios,
        "pxelinux.0",
        "site dnsmasq + rackboot ProxyDHCP, the MAC's dhcp_boot = pxelinux.0: SeaBIOS iPXE ROM → pxelinux (TFTP)",
    ),
    proxy_mode_booting(
        "proxy-isc-bios-pxelinux",
        Site::Isc,
        Firmware::SeaBios,
        "pxelinux.0",
        "site ISC dhcpd + rackboot ProxyDHCP, the MAC's dhcp_boot = pxelinux.0: SeaBIOS iPXE ROM → pxelinux (TFTP)",
    ),
    proxy_mode_booting(
        "proxy-isc-uefi-amd64-missing-file",
        Site::Isc,
        Firmware::Ovmf,
        MISSING_LOADER,
        "site ISC dhcpd + rackboot ProxyDHCP offering a loader the rack lacks: the boot log ends at its ERROR 1",
    ),
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
        // `nodad`: usable at once (rackboot binds it before the bridge has a port).
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{RACK_IP6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(ns)
    }

    /// Another host on the bridge: the namespace `name` with a veth whose peer is a
    /// port of `self`'s bridge, addressed `ip`/24. Deleted (with the veth) on drop.
    fn create_host(&self, name: &str, ip: &str) -> Result<Netns> {
        cmd("ip", &["netns", "add", name])?;
        let host = Netns {
            name: name.to_string(),
        };
        host.ip(&["link", "set", "lo", "up"])?;
        self.ip(&[
            "link", "add", "vsite-br", "type", "veth", "peer", "name", "vsite", "netns", name,
        ])?;
        self.ip(&["link", "set", "vsite-br", "master", "br0"])?;
        self.ip(&["link", "set", "vsite-br", "up"])?;
        host.ip(&["addr", "add", &format!("{ip}/24"), "dev", "vsite"])?;
        host.ip(&["link", "set", "vsite", "up"])?;
        Ok(host)
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
        // rbnb-<pid>: the rack's namespace; rbns-<pid>: the site's DHCP host.
        if let Some(pid) = name
            .strip_prefix("rbnb-")
            .or_else(|| name.strip_prefix("rbns-"))
        {
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

/// What every dnsmasq of the harness runs with: DHCP only (no DNS) on `interface`,
/// each exchange logged, IPv4 addresses 10.77.0.100–200 for an hour, leases in `leases`.
fn dnsmasq_base(interface: &str, leases: &Path) -> String {
    format!(
        "port=0
interface={interface}
bind-interfaces
log-facility=-
log-dhcp
dhcp-range=10.77.0.100,10.77.0.200,255.255.255.0,1h
dhcp-leasefile={}
",
        leases.display()
    )
}

fn dnsmasq_config(dir: &Path, macs: &[(Mode, String)]) -> String {
    let mut c = dnsmasq_base("br0", &dir.join("dnsmasq.leases"));
    let http = format!("http://{RACK_IP}:{HTTP_PORT}");
    let _ = write!(
        c,
        "dhcp-range={PREFIX6},ra-only,64
enable-ra
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
dhcp-boot=tag:efi64http,tag:!v6only,{http}/bootloader/uefi/amd64/grubhttpx64.efi
dhcp-boot=tag:efi64http,tag:v6only,{http}/{V6ONLY_404}
dhcp-option-force=tag:efiarmhttp,60,HTTPClient
dhcp-boot=tag:efiarmhttp,{http}/bootloader/uefi/arm64/grubhttpaa64.efi
"
    );
    for (mode, mac) in macs {
        if let Some(tag) = mode.tag {
            let _ = writeln!(c, "dhcp-host={mac},set:{tag}");
        }
    }
    c
}

/// What an IPv6 mode's VM gets offered over IPv4 HTTP boot (OVMF tries HTTPv4
/// before HTTPv6 and has no switch for it): a URL that 404s, so the firmware moves
/// on to IPv6 at once instead of waiting a minute for an offer it can use.
const V6ONLY_404: &str = "this-vm-boots-over-ipv6";

/// ISC dhcpd's DHCPv6 config for the IPv6 modes: addresses from `fd52::/64`, and the
/// boot file URL (option 59) by vendor class (option 16, enterprise 343 as EDK2
/// sends it): `HTTPClient` gets the HTTP-boot GRUB and the `HTTPClient` vendor class
/// back (EDK2 takes no HTTP offer without it), PXE clients get shim over TFTP.
fn dhcpd6_config() -> String {
    let http = format!("http://[{RACK_IP6}]:{HTTP_PORT}");
    format!(
        "default-lease-time 3600;
preferred-lifetime 3600;
option dhcp6.vendor-class code 16 = {{ integer 32, integer 16, string }};
subnet6 {PREFIX6}/64 {{
  range6 fd52::100 fd52::1ff;
  if substring(option dhcp6.vendor-class, 6, 10) = \"HTTPClient\" {{
    option dhcp6.bootfile-url \"{http}/bootloader/uefi/amd64/grubhttpx64.efi\";
    option dhcp6.vendor-class 343 10 \"HTTPClient\";
  }} else {{
    option dhcp6.bootfile-url \"tftp://[{RACK_IP6}]/bootx64.efi\";
  }}
}}
"
    )
}

/// The site's DHCP server in the proxy modes: addresses only, not one boot option.
/// dnsmasq puts its own address in `siaddr`; ISC dhcpd leaves it 0.0.0.0.
fn site_dhcp_config(site: Site, dir: &Path) -> String {
    match site {
        Site::Dnsmasq => dnsmasq_base("vsite", &dir.join("site-dnsmasq.leases")),
        Site::Isc => "authoritative;
default-lease-time 3600;
max-lease-time 3600;
subnet 10.77.0.0 netmask 255.255.255.0 {
  range 10.77.0.100 10.77.0.200;
}
"
        .to_string(),
    }
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
    } else if mode.net == Net::V6 {
        // PXE over IPv6 only (OVMF would try IPv4 first).
        push(&["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]);
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
    /// The rack's config for the proxy modes: the same plus `[dhcp] proxy = true`.
    proxy_config: String,
    kvm: bool,
    macs: Vec<(Mode, String)>,
    expected: Vec<String>,
}

/// The servers on the namespace's bridge for one [`Setup`], stopped on drop in field
/// order: DHCP first, then the server, then the capture (so it holds the end), then
/// the site's host (its namespace, by name).
struct Network {
    _dhcp: Vec<Guard>,
    _serve: Guard,
    _tcpdump: Guard,
    _site: Option<Netns>,
}

/// One VM booting.
struct Vm {
    mode: Mode,
    mac: String,
    /// When the boot log was last asked (the missing-file mode polls it).
    last_look: Option<Instant>,
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
    // One setup after the other: the direct modes share the rack's DHCP; each proxy
    // setup has its own site host and rackboot's ProxyDHCP.
    let mut setups: Vec<Setup> = Vec::new();
    for m in &modes {
        if !setups.contains(&m.setup()) {
            setups.push(m.setup());
        }
    }
    let mut outcomes = Vec::new();
    for setup in setups {
        let which: Vec<usize> = (0..p.macs.len())
            .filter(|i| p.macs[*i].0.setup() == setup)
            .collect();
        let net = start_network(&ns, &p, setup)?;
        outcomes.extend(boot_all(&ns, &p, &which)?);
        drop(net);
    }
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
    let bin = prereq::utf8(&bin)?.to_string();

    let state = dir.join("state");
    let config = dir.join("rackboot.toml");
    // Both addresses of the bridge (two TOML array items in the one field).
    let (tftp, http) = (
        format!("{RACK_IP}:69\", \"[{RACK_IP6}]:69"),
        format!("{RACK_IP}:{HTTP_PORT}\", \"[{RACK_IP6}]:{HTTP_PORT}"),
    );
    let rack = DemoRack {
        sync: "auto = false",
        tftp_listen: &tftp,
        http_listen: &http,
        kernel_params: Some("panic=-1"),
        arches: "\"amd64\", \"arm64\"",
    };
    std::fs::write(&config, rack.config(&stream, &state))?;
    let config = prereq::utf8(&config)?.to_string();
    // The proxy modes' rack: rackboot's ProxyDHCP on the bridge, chaining UEFI
    // machines to iPXE (Debian's signed GRUB cannot follow a proxy offer).
    let proxy_config = dir.join("rackboot-proxy.toml");
    let ipxe_dir = if modes.iter().any(|m| matches!(m.net, Net::Proxy(_))) {
        prereq::ensure_ipxe_efi()?
    } else {
        Default::default()
    };
    std::fs::write(
        &proxy_config,
        format!(
            "{}\n[dhcp]\nproxy = true\ninterfaces = [\"br0\"]\nuefi_loader = \"ipxe\"\nipxe_dir = \"{}\"\n",
            rack.config(&stream, &state),
            ipxe_dir.display()
        ),
    )?;
    let proxy_config = prereq::utf8(&proxy_config)?.to_string();
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
        let params = format!("kernel_params={console} {param}");
        let mut set = vec!["machines", "set", mac.as_str(), params.as_str()];
        let dhcp_boot = mode.dhcp_boot.map(|f| format!("dhcp_boot={f}"));
        set.extend(dhcp_boot.as_deref());
        rb(&set)?;
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
        proxy_config,
        kvm,
        macs,
        expected,
    })
}

/// tcpdump on the bridge, `rackboot serve` and the DHCP servers of `setup`, each up
/// before the next starts. Direct: dnsmasq (IPv4 DHCP with boot options, router
/// advertisements) and ISC dhcpd for DHCPv6 in the rack's namespace. Proxy: the
/// site's server on its own host (namespace) and rackboot with its ProxyDHCP on.
fn start_network(ns: &Netns, p: &Prepared, setup: Setup) -> Result<Network> {
    let dir = &p.dir;
    let name = setup.name();
    let pcap = dir.join(format!("netboot-{name}.pcap"));
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
            pcap.to_str().context("utf-8")?,
        ],
        &dir.join(format!("tcpdump-{name}.log")),
    )?;
    // In a proxy setup, up once its ProxyDHCP listens on 4011 (after 67).
    let (config, ready) = match setup {
        Setup::Direct => (&p.config, "listening for HTTP"),
        Setup::Proxy(_) => (&p.proxy_config, "listening for PXE"),
    };
    let serve = ns.spawn_ready(
        ("rackboot serve", &p.bin),
        &["--config", config, "serve"],
        &dir.join(format!("rackboot-{name}.log")),
        ready,
    )?;
    let mut dhcp = Vec::new();
    let mut site_ns = None;
    match setup {
        Setup::Direct => {
            std::fs::write(dir.join("dnsmasq.conf"), dnsmasq_config(dir, &p.macs))?;
            dhcp.push(ns.spawn_ready(
                ("dnsmasq", "dnsmasq"),
                &[
                    "--keep-in-foreground",
                    &format!("--conf-file={}", dir.join("dnsmasq.conf").display()),
                ],
                &dir.join("dnsmasq.log"),
                "DHCP, sockets bound",
            )?);
            std::fs::write(dir.join("dhcpd6.conf"), dhcpd6_config())?;
            dhcp.push(isc_dhcpd(ns, dir, "-6", "dhcpd6", "br0")?);
        }
        Setup::Proxy(site) => {
            let host = ns.create_host(&format!("rbns-{}", std::process::id()), SITE_IP)?;
            let conf = format!("site-{}.conf", site.name());
            std::fs::write(dir.join(&conf), site_dhcp_config(site, dir))?;
            dhcp.push(match site {
                Site::Dnsmasq => host.spawn_ready(
                    ("site dnsmasq", "dnsmasq"),
                    &[
                        "--keep-in-foreground",
                        &format!("--conf-file={}", dir.join(&conf).display()),
                    ],
                    &dir.join("site-dnsmasq.log"),
                    "DHCP, sockets bound",
                )?,
                Site::Isc => isc_dhcpd(&host, dir, "-4", "site-isc", "vsite")?,
            });
            site_ns = Some(host);
        }
    }
    Ok(Network {
        _dhcp: dhcp,
        _serve: serve,
        _tcpdump: tcpdump,
        _site: site_ns,
    })
}

/// ISC dhcpd in the foreground in `ns` (`family` `-4` or `-6`) with `dir/<name>.conf`
/// on `interface`, its leases and PID file in `dir`.
fn isc_dhcpd(ns: &Netns, dir: &Path, family: &str, name: &str, interface: &str) -> Result<Guard> {
    let leases = dir.join(format!("{name}.leases"));
    std::fs::write(&leases, "")?;
    let path = |p: std::path::PathBuf| p.to_str().map(String::from).context("utf-8 path");
    ns.spawn_ready(
        (name, "dhcpd"),
        &[
            family,
            "-f",
            "-d",
            "-cf",
            &path(dir.join(format!("{name}.conf")))?,
            "-lf",
            &path(leases)?,
            "-pf",
            &path(dir.join(format!("{name}.pid")))?,
            interface,
        ],
        &dir.join(format!("{name}.log")),
        "Server starting service",
    )
}

/// Boots every mode's VM, [`PARALLEL`] at a time, until each reaches its marker,
/// fails or times out.
fn boot_all(ns: &Netns, p: &Prepared, which: &[usize]) -> Result<Vec<Outcome>> {
    let mut queue = which.iter().copied();
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
            let polled = if vm.mode.dhcp_boot == Some(MISSING_LOADER) {
                poll_missing_file(ns, p, &mut vm)
            } else {
                poll_line(
                    &vm.serial,
                    MARKER,
                    BOOT_FAILURES,
                    &mut vm.proc,
                    vm.started,
                    MODE_TIMEOUT,
                )
            };
            match polled {
                None => still.push(vm),
                Some(r) => outcomes.push(finish_vm(ns, p, &vm, r)),
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
        mac: mac.clone(),
        last_look: None,
        param: param.clone(),
        serial,
        proc,
        started: Instant::now(),
        accel: if use_kvm { "kvm" } else { "tcg" },
    })
}

/// The rack's boot log of `mac`: `rackboot boots MAC --json`, run in the namespace
/// against the rack's HTTP API (the command a user runs).
fn boot_log(ns: &Netns, p: &Prepared, mac: &str) -> Result<serde_json::Value> {
    let url = format!("http://{RACK_IP}:{HTTP_PORT}");
    let out = output(
        "ip",
        &[
            "netns",
            "exec",
            &ns.name,
            &p.bin,
            "--config",
            &p.proxy_config,
            "--json",
            "boots",
            mac,
            "--url",
            &url,
        ],
    )?;
    serde_json::from_str(&out).context("`rackboot boots --json` printed no JSON")
}

/// A `*-missing-file` VM (no marker to wait for): done when the boot log's last
/// event is the missing loader's failure; a marker or the timeout fails it. Asks the
/// boot log every 2 s.
fn poll_missing_file(ns: &Netns, p: &Prepared, vm: &mut Vm) -> Option<Result<String>> {
    let limit = MODE_TIMEOUT;
    if vm.started.elapsed() > limit {
        let log = boot_log(ns, p, &vm.mac).map(|l| l.to_string());
        return Some(Err(anyhow::anyhow!(
            "the boot log did not end at {MISSING_LOADER} within {} s: {}",
            limit.as_secs(),
            log.unwrap_or_else(|e| format!("{e:#}"))
        )));
    }
    let now = Instant::now();
    if vm
        .last_look
        .is_some_and(|t| now - t < Duration::from_secs(2))
    {
        return None;
    }
    vm.last_look = Some(now);
    let Ok(log) = boot_log(ns, p, &vm.mac) else {
        return None;
    };
    let last = &log["last_event"];
    if last["file"] == MISSING_LOADER && last["ok"] == false {
        return Some(Ok(format!(
            "{} {}: {}",
            last["kind"].as_str().unwrap_or("?"),
            MISSING_LOADER,
            last["result"].as_str().unwrap_or("?")
        )));
    }
    None
}

/// What a proxy mode's boot left in the rack's boot log: the ProxyDHCP offer, the
/// files over TFTP/HTTP, and the last step reached (the marker initramfs reads no
/// squashfs, so "initrd"; "squashfs" would do too). For the missing-file mode: the
/// missing loader's TFTP ERROR 1 (or HTTP 404) as the last event.
fn check_boot_log(ns: &Netns, p: &Prepared, vm: &Vm) -> Result<String> {
    let log = boot_log(ns, p, &vm.mac)?;
    let events = log["event_list"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    if kinds.first() != Some(&"dhcp_offer") {
        bail!(
            "the boot log of {} does not start with the ProxyDHCP offer: {log}",
            vm.mac
        );
    }
    if !kinds.iter().any(|k| *k == "tftp" || *k == "http") {
        bail!(
            "the boot log of {} has no TFTP or HTTP request: {log}",
            vm.mac
        );
    }
    let last_step = log["last_step"].as_str().unwrap_or("none");
    let last = &log["last_event"];
    if vm.mode.dhcp_boot == Some(MISSING_LOADER) {
        let result = last["result"].as_str().unwrap_or("");
        if last["file"] != MISSING_LOADER || !(result.starts_with("ERROR 1") || result == "404") {
            bail!(
                "the boot log of {} does not end at {MISSING_LOADER}'s ERROR 1 / 404: {log}",
                vm.mac
            );
        }
    } else if !matches!(last_step, "initrd" | "squashfs") {
        bail!(
            "the boot log of {} reached {last_step:?}, not initrd/squashfs: {log}",
            vm.mac
        );
    }
    Ok(format!(
        "boot log: {} events ({}), last step {last_step}, last {} {}",
        kinds.len(),
        kinds.join(" "),
        last["file"].as_str().unwrap_or("?"),
        last["result"].as_str().unwrap_or("?")
    ))
}

/// Judges a VM that stopped waiting: its marker line must carry its parameter (and,
/// with Secure Boot, the kernel must have said so; in a proxy mode the boot log must
/// show the boot); a failure shows the serial tail.
fn finish_vm(ns: &Netns, p: &Prepared, vm: &Vm, r: Result<String>) -> Outcome {
    let t = vm.started.elapsed();
    if vm.mode.dhcp_boot == Some(MISSING_LOADER) {
        let result = r
            .and_then(|_| check_boot_log(ns, p, vm))
            .map(|summary| (t, summary));
        return report_vm(vm, result);
    }
    let result = r.and_then(|line| {
        if !line.contains(&vm.param) {
            bail!("the marker line lacks {:?}: {line}", vm.param)
        }
        if vm.mode.net == Net::V6 {
            // The config was rendered for a request that came over IPv6.
            let root = format!("root=squash:http://[{RACK_IP6}]:{HTTP_PORT}/");
            if !line.contains(&root) || !line.contains("ip6=dhcp") {
                bail!("the marker line lacks the IPv6 config ({root}…, ip6=dhcp): {line}")
            }
        }
        if vm.mode.secure_boot {
            let serial = std::fs::read(&vm.serial).unwrap_or_default();
            if !String::from_utf8_lossy(&serial).contains(SECURE_BOOT_LINE) {
                bail!("the kernel did not say {SECURE_BOOT_LINE:?}");
            }
        }
        if matches!(vm.mode.net, Net::Proxy(_)) {
            eprintln!("{}: {}", vm.mode.name, check_boot_log(ns, p, vm)?);
        }
        Ok((t, line))
    });
    report_vm(vm, result)
}

/// Prints how a VM ended (the serial tail when it failed) and makes its outcome.
fn report_vm(vm: &Vm, result: Result<(Duration, String)>) -> Outcome {
    match &result {
        Ok((t, _)) if vm.mode.dhcp_boot == Some(MISSING_LOADER) => eprintln!(
            "{}: the boot log ended at {MISSING_LOADER} after {:.1} s",
            vm.mode.name,
            t.as_secs_f64()
        ),
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
            "netboot: {} failed ({}); serial logs, rackboot's and the DHCP servers' logs and a pcap per setup are in {}",
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
    use super::*;

    #[test]
    fn the_site_dhcp_of_the_proxy_modes_serves_addresses_only() {
        for site in [Site::Dnsmasq, Site::Isc] {
            let c = site_dhcp_config(site, Path::new("/tmp/x"));
            assert!(c.contains("10.77.0.100"), "{c}");
            for boot in [
                "boot",
                "next-server",
                "filename",
                "option",
                "pxe",
                "HTTPClient",
                "tag",
            ] {
                assert!(!c.contains(boot), "{site:?} config has {boot:?}:\n{c}");
            }
        }
        // Every site and mode kind is there, once per site.
        for site in ["dnsmasq", "isc"] {
            for kind in ["bios", "uefi-amd64", "uefi-arm64", "http-amd64"] {
                let name = format!("proxy-{site}-{kind}");
                assert_eq!(MODES.iter().filter(|m| m.name == name).count(), 1, "{name}");
            }
        }
    }

    #[test]
    fn ipv6_boot_urls_name_the_rack_in_brackets() {
        let c = dhcpd6_config();
        assert!(c.contains("\"tftp://[fd52::1]/bootx64.efi\""), "{c}");
        assert!(c.contains("\"http://[fd52::1]:5248/bootloader/uefi/amd64/grubhttpx64.efi\""));
        // EDK2 compares the text after the enterprise number and length.
        assert!(c.contains("substring(option dhcp6.vendor-class, 6, 10) = \"HTTPClient\""));
        assert!(c.contains("option dhcp6.vendor-class 343 10 \"HTTPClient\";"));
    }

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
