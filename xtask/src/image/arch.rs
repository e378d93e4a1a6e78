//! What differs between the appliance's architectures (`cargo xtask image --arch
//! amd64|arm64`): the dist target of the binary, the EFI packages, the QEMU machine
//! and firmware of the check, its serial console and time limits. The definition in
//! `images/appliance/` is the same for both; `build.sh` takes `ARCH`.
//!
//! arm64 on this amd64 host: mmdebstrap runs the arm64 root's maintainer scripts under
//! `qemu-aarch64-static` (package qemu-user-static) through binfmt_misc, so
//! [`ensure_binfmt`] mounts `/proc/sys/fs/binfmt_misc` when it is not mounted and
//! registers the package's `qemu-aarch64` handler with `systemd-binfmt` (the package
//! ships `/usr/lib/binfmt.d/qemu-aarch64.conf`; in a container without systemd as
//! init nothing registers it at boot). The handler has the F flag (the interpreter is
//! opened at registration), so it also works inside the chroot. The check boots the
//! image under `qemu-system-aarch64 -M virt` with AAVMF (TCG: there is no KVM for
//! aarch64 guests on an amd64 host), with Secure Boot off (AAVMF here has no
//! Microsoft keys enrolled): shim → GRUB → kernel still runs, unverified.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::dist::{self, Target};
use crate::prereq::{self, cmd};

/// One architecture of the appliance.
pub(super) struct Arch {
    /// Debian's name (`ARCH` of build.sh, the image's and bundles' names).
    pub name: &'static str,
    /// The static binary's dist target.
    pub target: &'static Target,
    /// The serial console the kernel, the getty and the check use.
    pub console: &'static str,
    /// `qemu-system-*` of the check.
    pub qemu: &'static str,
    /// `-machine` (without `accel=`) and any further QEMU arguments before the drives.
    pub machine: &'static str,
    pub cpu: Option<&'static str>,
    /// Firmware code (read-only) and the variable store copied for each boot.
    pub firmware_code: &'static str,
    pub firmware_vars: &'static str,
    /// The check boots with Secure Boot on (OVMF's secboot build, Microsoft's keys).
    pub secure_boot: bool,
    /// The check's time limits are multiplied by this (TCG aarch64 is slow).
    pub time_scale: u32,
    /// Host packages the check needs for this architecture (firmware, QEMU from
    /// bookworm-backports).
    pub check_debs: &'static [&'static str],
    pub check_backports_debs: &'static [&'static str],
    /// The check's v2/v3 updates and the recovery boot run for this architecture.
    pub full_check: bool,
}

pub(super) const AMD64: Arch = Arch {
    name: "amd64",
    target: &dist::X86_64,
    console: "ttyS0",
    qemu: "qemu-system-x86_64",
    machine: "q35,smm=on",
    cpu: None,
    firmware_code: "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
    firmware_vars: "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
    secure_boot: true,
    time_scale: 1,
    check_debs: &["ovmf"],
    check_backports_debs: &["qemu-system-x86"],
    full_check: true,
};

pub(super) const ARM64: Arch = Arch {
    name: "arm64",
    target: &dist::AARCH64,
    console: "ttyAMA0",
    qemu: "qemu-system-aarch64",
    machine: "virt",
    // cortex-a72 rather than max: TCG emulates max's pointer authentication slowly.
    cpu: Some("cortex-a72"),
    firmware_code: "/usr/share/AAVMF/AAVMF_CODE.fd",
    firmware_vars: "/usr/share/AAVMF/AAVMF_VARS.fd",
    secure_boot: false,
    time_scale: 3,
    check_debs: &["qemu-efi-aarch64"],
    check_backports_debs: &["qemu-system-arm"],
    full_check: false,
};

impl Arch {
    pub fn parse(s: &str) -> Result<&'static Arch> {
        match s {
            "amd64" => Ok(&AMD64),
            "arm64" => Ok(&ARM64),
            _ => bail!("unknown architecture {s:?} (amd64 or arm64)"),
        }
    }

    /// `rackboot-appliance-<arch>.img`.
    pub fn image_name(&self) -> String {
        format!("rackboot-appliance-{}.img", self.name)
    }

    /// A time limit of the check, scaled for this architecture.
    pub fn limit(&self, d: Duration) -> Duration {
        d * self.time_scale
    }

    /// Builds (or finds fresh) this architecture's static binary with `cargo xtask
    /// dist`'s build.
    pub fn binary(&self) -> Result<PathBuf> {
        dist::prerequisites(&[self.target])?;
        dist::build(self.target, &dist::version()?)
    }

    /// What build.sh needs beyond the common host tools: for a foreign architecture,
    /// the binfmt_misc handler and that architecture's shim and signed GRUB unpacked
    /// under `dir` (returned as build.sh's `EFI_ROOT`); for amd64 the host's own
    /// packages (`None`: build.sh reads them from /).
    pub fn build_prerequisites(&self, dir: &Path) -> Result<Option<PathBuf>> {
        if self.name == "amd64" {
            return Ok(None);
        }
        prereq::ensure_debs(&["qemu-user-static"])?;
        ensure_binfmt()?;
        let root = dir.join(format!("efi-{}", self.name));
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        prereq::ensure_foreign_debs(
            self.name,
            &[
                "shim-signed",
                &format!("shim-helpers-{}-signed", self.name),
                &format!("grub-efi-{}-signed", self.name),
            ],
            &root,
        )?;
        Ok(Some(root))
    }
}

const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";
const BINFMT_HANDLER: &str = "/proc/sys/fs/binfmt_misc/qemu-aarch64";
const BINFMT_CONF: &str = "/usr/lib/binfmt.d/qemu-aarch64.conf";

/// Makes aarch64 binaries run on this host: binfmt_misc mounted and the
/// `qemu-aarch64` handler from qemu-user-static registered and enabled.
fn ensure_binfmt() -> Result<()> {
    if !Path::new(BINFMT_DIR).join("register").exists() {
        cmd("mount", &["-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR])
            .with_context(|| format!("mounting binfmt_misc on {BINFMT_DIR}"))?;
    }
    if !Path::new(BINFMT_HANDLER).exists() {
        // systemd-binfmt writes the package's line to `register`.
        cmd("/usr/lib/systemd/systemd-binfmt", &[BINFMT_CONF])?;
    }
    let status = std::fs::read_to_string(BINFMT_HANDLER).with_context(|| {
        format!("the qemu-aarch64 binfmt handler is not registered ({BINFMT_HANDLER})")
    })?;
    if !status.starts_with("enabled") {
        std::fs::write(BINFMT_HANDLER, "1").context("enabling the qemu-aarch64 handler")?;
    }
    eprintln!("binfmt_misc: qemu-aarch64 registered ({BINFMT_HANDLER})");
    Ok(())
}
