//! What a booting machine gets: files of the snapshot current when its request
//! arrived, and boot configs rendered per request from local state (the snapshot,
//! `[boot]` and the machine's settings), never a network round trip.
//!
//! Dynamic paths (leading `/` optional, MAC in any common spelling):
//! - `pxelinux.cfg/01-<mac>`, `pxelinux.cfg/default[-…|.…]`: configs for lpxelinux
//!   (served as `pxelinux.0`, as MAAS does), which fetches kernel and initrd over HTTP;
//!   under `bootloader/pxe/<arch>/pxelinux.cfg/…` the same for the TFTP-only pxelinux
//!   kept there, with TFTP paths. Other names pxelinux tries (its UUID, hex IP
//!   prefixes) are "not found" at once.
//! - `grub/grub.cfg` (static: chains to the per-MAC file), `grub/grub.cfg-<mac>`,
//!   `grub/grub.cfg-default[-<arch>]`; a `*.lst` GRUB probes that the snapshot lacks
//!   is served empty. Over TFTP GRUB loads the kernel by TFTP (Debian's signed GRUB has
//!   no built-in HTTP and may not load modules under Secure Boot); over HTTP boot, by
//!   HTTP.
//! - `ipxe.cfg` (static chain), `ipxe.cfg-<mac>`, `ipxe.cfg-default[-<arch>]`, and over
//!   HTTP `boot.ipxe?mac=…`.
//!
//! A MAC without settings (or an unparseable one) gets the default config; a machine
//! set to local boot gets a config that boots its disk.
//!
//! `ipxe/<name>` (what ProxyDHCP offers UEFI machines) is served over TFTP and HTTP
//! from `[dhcp] ipxe_dir` (Debian's `ipxe` package), whatever the snapshot: `<name>`
//! must be one plain file name ([`ipxe_name`]), opened beneath that directory.
//!
//! Only the known architectures (`amd64`, `arm64` and their aliases) are looked up,
//! and only snapshot directories whose names pass [`bootcfg::segment_ok`] are
//! candidates: a name from the stream with a space, `;`, `#` or `$` never reaches a
//! config. A config that fails [`bootcfg`]'s render checks (an over-long command
//! line) is "not found", with a warning naming the MAC and the reason.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::bootcfg::{
    self, ephemeral_params, Boot, Ephemeral, Grub, ImageBoot, Ipxe, Mac, Pxelinux,
};
use crate::config::Settings;
use crate::machines::{self, ImageRef};
use crate::serve::{Daemon, Snapshot};
use crate::tftp::{from_beneath, Ending, Finished, OpenError, Resolver, Source};

/// Where this rack answers: the address the request came to and the HTTP port.
#[derive(Clone, Debug)]
pub struct Here {
    /// `host` or `host:port` as a URL authority for HTTP.
    pub http_authority: String,
}

impl Here {
    pub fn from_ip(ip: IpAddr, port: u16) -> Here {
        // An IPv4 client on a dual-stack socket shows up as `::ffff:a.b.c.d`: its
        // loaders need the IPv4 form (and the IPv4 kernel parameters).
        let host = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("[{v6}]"),
            },
            IpAddr::V4(v4) => v4.to_string(),
        };
        Here {
            http_authority: format!("{host}:{port}"),
        }
    }

    /// From an HTTP request's `Host` header. A header without a port gets `port` (the
    /// one rackboot listens on): GRUB's http module sends the bare host name whatever
    /// the port. A missing or odd header gives `127.0.0.1:port`.
    pub fn from_host(host: Option<&str>, port: u16) -> Here {
        let Some(host) = host.filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".:-[]".contains(c))
        }) else {
            return Here {
                http_authority: format!("127.0.0.1:{port}"),
            };
        };
        // A bare IPv6 literal (a client that forgot the brackets): bracket it, or
        // its last group would read as a port.
        if let Ok(ip @ IpAddr::V6(_)) = host.parse::<IpAddr>() {
            return Here::from_ip(ip, port);
        }
        let has_port = match host.rfind(']') {
            Some(end) => host[end..].contains(':'),
            None => host.contains(':'),
        };
        Here {
            http_authority: if has_port {
                host.to_string()
            } else {
                format!("{host}:{port}")
            },
        }
    }

    /// `http://host:port/images/`: where HTTP loaders find image files.
    pub fn http_images(&self) -> String {
        format!("http://{}/images/", self.http_authority)
    }

    /// `(http,host:port)/images/`: the same for GRUB.
    pub fn grub_http_images(&self) -> String {
        format!("(http,{})/images/", self.http_authority)
    }
}

/// The IP address in a `Host` header (`10.0.0.1:5248`, `[fd00::1]`), if it is one.
pub fn host_ip(host: &str) -> Option<IpAddr> {
    if let Ok(ip) = host.parse() {
        return Some(ip); // a bare address, IPv6 without brackets included
    }
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    host.split(':').next()?.parse().ok()
}

/// The file name in `ipxe/<name>`, when `path` (cleaned, no leading `/`) is one: a
/// single segment of `[A-Za-z0-9._+~-]`, not starting with `.`. `Some(None)`: under
/// `ipxe/` but not a name that is served (not found).
pub fn ipxe_name(path: &str) -> Option<Option<&str>> {
    let name = path.strip_prefix("ipxe/")?;
    Some((bootcfg::segment_ok(name) && !name.starts_with('.')).then_some(name))
}

/// The result of looking at a path: a generated file, a definite "not found", or
/// "not dynamic" (serve from the snapshot).
pub enum Dynamic {
    Text(String),
    NotFound,
    Static,
}

const ARCHES: [(&str, &str); 2] = [("amd64", "x86_64"), ("arm64", "arm64")];

/// The snapshot's name for a CPU architecture a loader reports, if it is one rackboot
/// serves; anything else (`../../..` included) is never looked up.
fn norm_arch(a: &str) -> Option<&'static str> {
    match a {
        "amd64" | "x86_64" | "i386" | "i686" | "x86" => Some("amd64"),
        "aarch64" | "arm64" => Some("arm64"),
        _ => None,
    }
}

fn exists(snap: &Snapshot, rel: &str) -> bool {
    crate::fsutil::open_beneath(snap.root.as_fd(), &snap.dir, rel).is_ok()
}

fn subdirs(snap: &Snapshot, rel: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(snap.dir.join(rel))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| bootcfg::segment_ok(name))
        .collect();
    v.sort();
    v
}

/// Finds the image directory (`os/arch/subarch/release/label`) for `image` on `arch`.
fn image_dir(snap: &Snapshot, image: &ImageRef, arch: &str) -> Option<String> {
    if image
        .arch
        .as_deref()
        .is_some_and(|a| norm_arch(a) != Some(arch))
    {
        return None;
    }
    let subarches = match &image.subarch {
        Some(s) => vec![s.clone()],
        None => {
            let mut all = subdirs(snap, &format!("{}/{arch}", image.os));
            all.sort_by_key(|s| s != "generic");
            all
        }
    };
    for sub in subarches {
        let base = format!("{}/{arch}/{sub}/{}", image.os, image.release);
        let labels = match &image.label {
            Some(l) => vec![l.clone()],
            None => {
                let mut all = subdirs(snap, &base);
                all.sort_by_key(|l| l != "stable");
                all
            }
        };
        for label in labels {
            let dir = format!("{base}/{label}");
            if exists(snap, &format!("{dir}/boot-kernel")) {
                return Some(dir);
            }
        }
    }
    None
}

/// What `mac` (or a machine without settings, `None`) boots on `arch`.
fn boot_for(
    settings: &Settings,
    snap: &Snapshot,
    mac: Option<Mac>,
    arch: &str,
    here: &Here,
) -> Option<Boot> {
    let state = machines::load(&settings.state_dir).unwrap_or_else(|e| {
        tracing::warn!("{e:#}; using the config's machine settings only");
        Default::default()
    });
    let m = mac
        .map(|m| machines::effective(&settings.machines, &state, &m))
        .unwrap_or_default();
    if m.local_boot == Some(true) {
        return Some(Boot::LocalDisk);
    }
    let image = m.image.as_deref().unwrap_or(&settings.boot.default_image);
    let image = ImageRef::parse(image).ok()?;
    let dir = image_dir(snap, &image, arch)?;
    let hostname = match mac {
        Some(m) => format!("rackboot-{}", m.to_string().replace(':', "")),
        None => "rackboot".into(),
    };
    let extra: Vec<&str> = [
        settings.boot.kernel_params.as_str(),
        m.kernel_params.as_deref().unwrap_or(""),
    ]
    .into_iter()
    .filter(|s| !s.trim().is_empty())
    .collect();
    let extra_len = extra.iter().map(|s| s.len() + 1).sum::<usize>();
    if extra_len > bootcfg::MAX_EXTRA_PARAMS {
        tracing::warn!(
            "not serving a boot config for {}: [boot] kernel_params and the machine's kernel_params are {extra_len} bytes together; at most {} are allowed",
            mac.map(|m| m.to_string()).unwrap_or_else(|| "the default config".into()),
            bootcfg::MAX_EXTRA_PARAMS
        );
        return None;
    }
    let squashfs = format!("{}{dir}/squashfs", here.http_images());
    Some(Boot::Image(ImageBoot {
        params: ephemeral_params(
            &Ephemeral {
                squashfs: &squashfs,
                hostname: &hostname,
                ipv6: here.http_authority.starts_with('['),
                os: &image.os,
                release: &image.release,
            },
            &extra,
        ),
        dir,
    }))
}

/// The GRUB config for `mac` (or the default one) on every CPU it may run on, or
/// only `only`'s.
fn grub_for(
    settings: &Settings,
    snap: &Snapshot,
    mac: Option<Mac>,
    only: Option<&str>,
    over_http: bool,
    here: &Here,
) -> Dynamic {
    let by_cpu: Vec<(String, Boot)> = ARCHES
        .iter()
        .filter(|(arch, _)| only.is_none_or(|o| norm_arch(o) == Some(*arch)))
        .filter_map(|(arch, cpu)| {
            Some((cpu.to_string(), boot_for(settings, snap, mac, arch, here)?))
        })
        .collect();
    if by_cpu.is_empty() {
        return Dynamic::NotFound;
    }
    let http = here.grub_http_images();
    let grub = Grub {
        by_cpu: &by_cpu,
        http: Some(&http),
        // Loaded over TFTP: TFTP again when Secure Boot forbids the http module.
        tftp: (!over_http).then_some("/"),
    };
    rendered(mac, grub.render())
}

/// A rendered config, or "not found" with a warning saying why it was refused.
fn rendered(mac: Option<Mac>, r: Result<String, bootcfg::RenderError>) -> Dynamic {
    match r {
        Ok(text) => Dynamic::Text(text),
        Err(e) => {
            let who = mac
                .map(|m| m.to_string())
                .unwrap_or_else(|| "the default config".into());
            tracing::warn!("not serving a boot config for {who}: {e}");
            Dynamic::NotFound
        }
    }
}

/// Looks at `path` (already cleaned, no leading `/`); `query` is the HTTP query.
pub fn dynamic(
    settings: &Settings,
    snap: &Snapshot,
    path: &str,
    query: Option<&str>,
    over_http: bool,
    here: &Here,
) -> Dynamic {
    // pxelinux: lpxelinux (`pxelinux.0` at the root) fetches images over HTTP; the
    // TFTP-only pxelinux under `bootloader/pxe/<arch>/` over TFTP.
    let pxe = path
        .strip_prefix("pxelinux.cfg/")
        .map(|n| (n, true))
        .or_else(|| {
            let rest = path.strip_prefix("bootloader/pxe/")?;
            let (_, n) = rest.split_once("/pxelinux.cfg/")?;
            Some((n, over_http))
        });
    if let Some((name, images_over_http)) = pxe {
        // Built only here: every other request passes through this function too.
        let http_images;
        let base = if images_over_http {
            http_images = here.http_images();
            http_images.as_str()
        } else {
            "::/"
        };
        let mac = if let Some(m) = name.strip_prefix("01-") {
            match Mac::parse(m) {
                Some(mac) => Some(mac),
                None => return Dynamic::NotFound,
            }
        } else if name == "default" || name.starts_with("default-") || name.starts_with("default.")
        {
            None
        } else {
            return Dynamic::NotFound; // UUID and hex-IP probes
        };
        return match boot_for(settings, snap, mac, "amd64", here) {
            Some(boot) => rendered(mac, Pxelinux { boot: &boot, base }.render()),
            None => Dynamic::NotFound,
        };
    }
    // GRUB
    if path == "grub/grub.cfg" {
        return Dynamic::Text(
            "set default=\"0\"\nset timeout=0\nconfigfile /grub/grub.cfg-${net_default_mac}\nconfigfile /grub/grub.cfg-default-${grub_cpu}\n".into(),
        );
    }
    if let Some(rest) = path.strip_prefix("grub/grub.cfg-") {
        if let Some(arch) = rest.strip_prefix("default") {
            let arch = arch
                .strip_prefix('-')
                .map(|a| a.split('-').next().unwrap_or(a));
            return grub_for(settings, snap, None, arch, over_http, here);
        }
        // An unknown or malformed MAC gets the default config.
        return grub_for(settings, snap, Mac::parse(rest), None, over_http, here);
    }
    if path.starts_with("grub/") && path.ends_with(".lst") && !exists(snap, path) {
        return Dynamic::Text(String::new());
    }
    // iPXE: the static chain script passes the MAC and iPXE's build architecture.
    if path == "ipxe.cfg" {
        return Dynamic::Text(format!(
            "#!ipxe\nchain http://{h}/ipxe.cfg-${{mac}}?arch=${{buildarch}} ||\nchain http://{h}/ipxe.cfg-default-${{buildarch}}\n",
            h = here.http_authority
        ));
    }
    let query_arg = |key: &str| -> Option<String> {
        query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| v.replace("%3A", ":").replace("%3a", ":"))
        })
    };
    let ipxe = if let Some(rest) = path.strip_prefix("ipxe.cfg-") {
        match rest.strip_prefix("default") {
            Some(arch) => Some((None, arch.strip_prefix('-').map(String::from))),
            None => Some((Mac::parse(rest), None)),
        }
    } else if path == "boot.ipxe" {
        Some((query_arg("mac").and_then(|m| Mac::parse(&m)), None))
    } else {
        None
    };
    if let Some((mac, arch)) = ipxe {
        let arch = match arch.or_else(|| query_arg("arch")) {
            None => "amd64",
            Some(a) => match norm_arch(a.split('-').next().unwrap_or(&a)) {
                Some(a) => a,
                None => return Dynamic::NotFound,
            },
        };
        return match boot_for(settings, snap, mac, arch, here) {
            Some(boot) => rendered(
                mac,
                Ipxe {
                    boot: &boot,
                    base: &here.http_images(),
                }
                .render(),
            ),
            None => Dynamic::NotFound,
        };
    }
    Dynamic::Static
}

/// The TFTP side: dynamic configs, else files of the snapshot.
pub struct TftpResolver {
    d: Arc<Daemon>,
}

impl TftpResolver {
    pub fn new(d: Arc<Daemon>) -> TftpResolver {
        TftpResolver { d }
    }
}

impl Resolver for TftpResolver {
    fn open(&self, path: &str, _client: SocketAddr, local: IpAddr) -> Result<Source, OpenError> {
        if let Some(name) = ipxe_name(path) {
            let name = name.ok_or(OpenError::NotFound)?;
            let dir = self.d.settings().dhcp.ipxe_dir.clone();
            return from_beneath(crate::fsutil::open_beneath_path(&dir, name));
        }
        let Some(snap) = self.d.current() else {
            return Err(OpenError::NotFound);
        };
        let here = Here::from_ip(local, self.d.http_port_for(local));
        match dynamic(&self.d.settings(), &snap, path, None, false, &here) {
            Dynamic::Text(t) => Ok(Source::Bytes(t.into())),
            Dynamic::NotFound => Err(OpenError::NotFound),
            Dynamic::Static => from_beneath(crate::fsutil::open_beneath(
                snap.root.as_fd(),
                &snap.dir,
                path,
            )),
        }
    }

    /// Into the boot log (size probes are not: the real transfer follows).
    fn finished(&self, path: &str, client: SocketAddr, how: &Finished<'_>) {
        use crate::serve::bootlog::{FileEvent, FileResult, Kind};
        let result = match &how.ending {
            Ending::Ok => FileResult::Ok { status: None },
            Ending::TsizeProbe => return,
            Ending::Error { code, message } => FileResult::TftpError {
                code: *code,
                message: message.to_string(),
            },
            Ending::Stopped(why) => FileResult::Aborted(why.to_string()),
        };
        self.d.boots.file(FileEvent {
            kind: Kind::Tftp,
            client: client.ip(),
            path,
            query: None,
            result,
            bytes: how.bytes,
            duration: how.duration,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipxe_names_are_single_plain_segments() {
        assert_eq!(ipxe_name("ipxe/snponly.efi"), Some(Some("snponly.efi")));
        assert_eq!(ipxe_name("ipxe.cfg"), None);
        for bad in [
            "ipxe/",
            "ipxe/../x",
            "ipxe/a/b",
            "ipxe/.hidden",
            "ipxe/a b",
            "ipxe/..",
        ] {
            assert_eq!(ipxe_name(bad), Some(None), "{bad}");
        }
    }

    #[test]
    fn authority_from_the_host_header() {
        let a = |h: Option<&str>| Here::from_host(h, 5248).http_authority;
        assert_eq!(a(Some("10.0.0.1:8080")), "10.0.0.1:8080");
        assert_eq!(a(Some("10.0.0.1")), "10.0.0.1:5248", "GRUB sends no port");
        assert_eq!(a(Some("[fd00::1]")), "[fd00::1]:5248");
        assert_eq!(a(Some("[fd00::1]:80")), "[fd00::1]:80");
        assert_eq!(a(Some("rack.example")), "rack.example:5248");
        assert_eq!(a(Some("evil/\"x")), "127.0.0.1:5248");
        assert_eq!(a(None), "127.0.0.1:5248");
        assert_eq!(host_ip("10.0.0.1:80"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(host_ip("[fd00::1]:80"), Some("fd00::1".parse().unwrap()));
        assert_eq!(host_ip("rack.example"), None);
    }

    #[test]
    fn ipv6_racks_get_bracketed_urls_every_loader_parses() {
        // A bare IPv6 literal in `Host` (no brackets): its last group is not a port.
        let a = |h: &str| Here::from_host(Some(h), 5248).http_authority;
        assert_eq!(a("fd52::1"), "[fd52::1]:5248");
        assert_eq!(a("fd52::1:5248"), "[fd52::1:5248]:5248");
        assert_eq!(host_ip("fd52::1"), Some("fd52::1".parse().unwrap()));
        assert_eq!(host_ip("10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        // Over TFTP the rack's own address: bracketed for v6, plain for a mapped v4.
        let v6 = Here::from_ip("fd52::1".parse().unwrap(), 5248);
        assert_eq!(v6.http_images(), "http://[fd52::1]:5248/images/");
        // The form Debian's GRUB 2.06 parses (its net.c reads `[addr]:port`), as
        // `cargo xtask netboot ipv6-uefi-amd64-tftp` proves.
        assert_eq!(v6.grub_http_images(), "(http,[fd52::1]:5248)/images/");
        let mapped = Here::from_ip("::ffff:10.77.0.1".parse().unwrap(), 5248);
        assert_eq!(mapped.http_authority, "10.77.0.1:5248");
        assert_eq!(
            Here::from_host(Some("[::ffff:10.77.0.1]:5248"), 5248).http_authority,
            "[::ffff:10.77.0.1]:5248",
            "a client that named the mapped form keeps it"
        );
    }
}
