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
//! - iPXE has no way to quote `$`: `$` and control characters become `_`.

use std::fmt;

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
                for c in s.chars() {
                    use fmt::Write as _;
                    f.write_char(if c.is_control() || c == '$' { '_' } else { c })?;
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

/// A kernel + initrd boot. `kernel`/`initrd` are locations the loader can fetch;
/// `params` are the kernel parameters, each an outside string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBoot {
    pub kernel: String,
    pub initrd: String,
    pub params: Vec<String>,
}

/// A pxelinux config.
pub struct Pxelinux(pub Boot);

impl fmt::Display for Pxelinux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "DEFAULT execute")?;
        writeln!(f, "LABEL execute")?;
        match &self.0 {
            Boot::Image(b) => {
                writeln!(f, "  KERNEL {}", Quote::Pxelinux(&b.kernel))?;
                writeln!(f, "  INITRD {}", Quote::Pxelinux(&b.initrd))?;
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

/// A GRUB menu: one entry per CPU it may run on (`$grub_cpu`), so one per-MAC config
/// serves whatever architecture the machine turns out to be.
pub struct Grub {
    /// `(grub_cpu, boot)` pairs, e.g. `("x86_64", …)`, `("arm64", …)`.
    pub by_cpu: Vec<(String, Boot)>,
}

impl fmt::Display for Grub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "set default=\"0\"")?;
        writeln!(f, "set timeout=0")?;
        writeln!(f, "menuentry 'Ephemeral' {{")?;
        for (i, (cpu, boot)) in self.by_cpu.iter().enumerate() {
            let kw = if i == 0 { "if" } else { "elif" };
            writeln!(f, "  {kw} [ \"$grub_cpu\" = {} ]; then", Quote::Grub(cpu))?;
            match boot {
                Boot::Image(b) => {
                    write!(f, "    linux {}", Quote::Grub(&b.kernel))?;
                    for p in &b.params {
                        write!(f, " {}", Quote::Grub(p))?;
                    }
                    writeln!(f, " BOOTIF=01-${{net_default_mac}}")?;
                    writeln!(f, "    initrd {}", Quote::Grub(&b.initrd))?;
                }
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

/// An iPXE script.
pub struct Ipxe(pub Boot);

impl fmt::Display for Ipxe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "#!ipxe")?;
        match &self.0 {
            Boot::Image(b) => {
                write!(f, "kernel {}", Quote::Ipxe(&b.kernel))?;
                for p in &b.params {
                    write!(f, " {}", Quote::Ipxe(p))?;
                }
                writeln!(f, " BOOTIF=01-${{netX/mac:hexhyp}}")?;
                writeln!(f, "initrd {}", Quote::Ipxe(&b.initrd))?;
                writeln!(f, "boot")
            }
            Boot::LocalDisk => {
                writeln!(f, "sanboot --no-describe --drive 0x80 || exit 1")
            }
        }
    }
}

/// The kernel parameters of an ephemeral boot, as MAAS builds them (without the
/// cloud-config URL and remote syslog, which need a region), followed by the
/// configured parameters. `squashfs` is the URL of the image's root filesystem.
pub fn ephemeral_params(squashfs: &str, hostname: &str, extra: &[&str]) -> Vec<String> {
    let mut p: Vec<String> = vec![
        "nomodeset".into(),
        "ro".into(),
        format!("root=squash:{squashfs}"),
        format!("ip=::::{hostname}:BOOTIF"),
        "ip6=off".into(),
        "overlayroot=tmpfs".into(),
        "overlayroot_cfgdisk=disabled".into(),
        "cc:{'datasource_list': ['MAAS']}end_cc".into(),
    ];
    for e in extra {
        p.extend(split_params(e));
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

    fn image() -> Boot {
        Boot::Image(ImageBoot {
            kernel: "http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-kernel"
                .into(),
            initrd: "http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-initrd"
                .into(),
            params: ephemeral_params(
                "http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs",
                "rackboot-525400123456",
                &["console=ttyS0,115200 panic=-1"],
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
    fn pxelinux_snapshot() {
        let want = "DEFAULT execute
LABEL execute
  KERNEL http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-kernel
  INITRD http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-initrd
  APPEND nomodeset ro root=squash:http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs ip=::::rackboot-525400123456:BOOTIF ip6=off overlayroot=tmpfs overlayroot_cfgdisk=disabled cc:{'datasource_list': ['MAAS']}end_cc console=ttyS0,115200 panic=-1
  IPAPPEND 2
";
        assert_eq!(Pxelinux(image()).to_string(), want);
        assert_eq!(
            Pxelinux(Boot::LocalDisk).to_string(),
            "DEFAULT execute\nLABEL execute\n  KERNEL chain.c32\n  APPEND hd0\n"
        );
    }

    #[test]
    fn grub_snapshot() {
        let g = Grub {
            by_cpu: vec![
                ("x86_64".into(), image()),
                ("arm64".into(), Boot::LocalDisk),
            ],
        };
        let want = "set default=\"0\"
set timeout=0
menuentry 'Ephemeral' {
  if [ \"$grub_cpu\" = 'x86_64' ]; then
    linux 'http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-kernel' 'nomodeset' 'ro' 'root=squash:http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs' 'ip=::::rackboot-525400123456:BOOTIF' 'ip6=off' 'overlayroot=tmpfs' 'overlayroot_cfgdisk=disabled' 'cc:{'\\''datasource_list'\\'': ['\\''MAAS'\\'']}end_cc' 'console=ttyS0,115200' 'panic=-1' BOOTIF=01-${net_default_mac}
    initrd 'http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-initrd'
  elif [ \"$grub_cpu\" = 'arm64' ]; then
    for efi in /efi/boot/bootx64.efi /efi/boot/bootaa64.efi /efi/ubuntu/shimx64.efi /efi/ubuntu/shimaa64.efi /efi/debian/shimx64.efi /efi/debian/shimaa64.efi; do
      if search --set=root --file $efi; then chainloader $efi; boot; fi
    done
    exit 1
  fi
}
";
        assert_eq!(g.to_string(), want);
    }

    #[test]
    fn ipxe_snapshot() {
        let want = "#!ipxe
kernel http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-kernel nomodeset ro root=squash:http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/squashfs ip=::::rackboot-525400123456:BOOTIF ip6=off overlayroot=tmpfs overlayroot_cfgdisk=disabled cc:{'datasource_list': ['MAAS']}end_cc console=ttyS0,115200 panic=-1 BOOTIF=01-${netX/mac:hexhyp}
initrd http://10.0.0.1:5248/images/debian/amd64/generic/bookworm/stable/boot-initrd
boot
";
        assert_eq!(Ipxe(image()).to_string(), want);
    }

    /// Undoes GRUB quoting of one word (for the property test): a sequence of
    /// `'…'` runs (literal) and `\X` escapes.
    fn grub_unquote(w: &str) -> Option<String> {
        let mut out = String::new();
        let mut chars = w.chars();
        while let Some(c) = chars.next() {
            match c {
                '\'' => loop {
                    match chars.next()? {
                        '\'' => break,
                        c => out.push(c),
                    }
                },
                '\\' => out.push(chars.next()?),
                _ => return None,
            }
        }
        Some(out)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn outside_strings_never_break_out(s in "\\PC{0,30}|[\\x00-\\x7f]{0,30}") {
            let boot = Boot::Image(ImageBoot { kernel: s.clone(), initrd: s.clone(), params: vec![s.clone(), "x".into()] });
            // pxelinux: the structure is intact (same lines, same directives).
            let p = Pxelinux(boot.clone()).to_string();
            let lines: Vec<&str> = p.lines().collect();
            proptest::prop_assert_eq!(lines.len(), 6);
            proptest::prop_assert!(lines[2].starts_with("  KERNEL ") && lines[3].starts_with("  INITRD ") && lines[4].starts_with("  APPEND "));
            proptest::prop_assert!(lines[4].ends_with(" x"));
            // GRUB: the word round-trips exactly (control characters aside).
            let q = Quote::Grub(&s).to_string();
            let clean: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            proptest::prop_assert_eq!(grub_unquote(&q), Some(clean));
            let g = Grub { by_cpu: vec![("x86_64".into(), boot.clone())] }.to_string();
            proptest::prop_assert_eq!(g.lines().count(), 8);
            // iPXE: no expansion and no new lines.
            let i = Ipxe(boot).to_string();
            proptest::prop_assert_eq!(i.lines().count(), 4);
            let kernel_line = i.lines().nth(1).unwrap();
            proptest::prop_assert_eq!(kernel_line.matches('$').count(), 1, "only BOOTIF's own expansion");
        }
    }
}
