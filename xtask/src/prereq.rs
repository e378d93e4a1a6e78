//! Prerequisites: Debian packages (native, from bookworm-backports, or foreign-arch
//! packages downloaded and unpacked without installing) and rustup components, plus
//! the `cmd` helper that runs a program and names it when it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs a program, echoing its command line; fails naming it and its exit status.
pub fn cmd(program: &str, args: &[&str]) -> Result<()> {
    let mut line = args.join(" ");
    if line.len() > 300 {
        let cut = (0..=300)
            .rev()
            .find(|i| line.is_char_boundary(*i))
            .unwrap_or(0);
        line.truncate(cut);
        line.push_str(" …");
    }
    eprintln!("$ {program} {line}");
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Runs a program and returns its stdout; fails with the tail of its stderr.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        bail!(
            "{program} {} failed: {}: {}",
            args.join(" "),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `path` as an argument of [`cmd`] or [`output`]; fails on a path that is not UTF-8.
pub fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("not a UTF-8 path: {}", path.display()))
}

fn is_root() -> bool {
    output("id", &["-u"])
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

fn installed(pkg: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", pkg])
        .map(|s| s.contains("install ok installed"))
        .unwrap_or(false)
}

/// apt-get, waiting up to 10 minutes for the dpkg lock that another apt (or a
/// parallel xtask) may hold instead of failing at once.
fn apt(args: &[&str]) -> Result<()> {
    let mut full = vec!["-o", "DPkg::Lock::Timeout=600"];
    full.extend_from_slice(args);
    cmd("apt-get", &full)
}

static APT_UPDATED: std::sync::Once = std::sync::Once::new();

fn apt_update() -> Result<()> {
    let mut result = Ok(());
    APT_UPDATED.call_once(|| result = apt(&["update", "-q"]));
    result
}

fn apt_install(pkgs: &[&str], extra: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {} (install them as root: apt-get install {})",
            missing.join(" "),
            missing.join(" ")
        );
    }
    apt_update()?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&missing);
    std::env::set_var("DEBIAN_FRONTEND", "noninteractive");
    apt(&args)
}

/// Installs missing Debian packages from the configured suites.
pub fn ensure_debs(pkgs: &[&str]) -> Result<()> {
    apt_install(pkgs, &[])
}

const BACKPORTS_FILE: &str = "/etc/apt/sources.list.d/rackboot-backports.sources";

/// Adds bookworm-backports (same mirror URI as the existing Debian source) if no
/// configured source has it yet.
fn ensure_backports_source() -> Result<()> {
    let mut texts = Vec::new();
    for dir in ["/etc/apt/sources.list", "/etc/apt/sources.list.d"] {
        let p = Path::new(dir);
        if p.is_file() {
            texts.push(std::fs::read_to_string(p).unwrap_or_default());
        } else if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".sources") || name.ends_with(".list") {
                    texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
    }
    if texts.iter().any(|t| t.contains("bookworm-backports")) {
        return Ok(());
    }
    let uri = texts
        .iter()
        .flat_map(|t| t.lines())
        .find_map(|l| {
            let l = l.trim();
            if let Some(u) = l.strip_prefix("URIs:") {
                let u = u.trim();
                (!u.contains("security")).then(|| u.to_string())
            } else if l.starts_with("deb ") && !l.contains("security") {
                l.split_whitespace()
                    .find(|w| w.starts_with("http"))
                    .map(String::from)
            } else {
                None
            }
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".into());
    if !is_root() {
        bail!("bookworm-backports is not configured; add it (URI {uri}) as root");
    }
    std::fs::write(
        BACKPORTS_FILE,
        format!(
            "Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )
    .with_context(|| format!("writing {BACKPORTS_FILE}"))?;
    apt(&["update", "-q"])
}

/// Installs packages from bookworm-backports (adding the suite when needed).
pub fn ensure_backports_debs(pkgs: &[&str]) -> Result<()> {
    if pkgs.iter().all(|p| installed(p)) {
        return Ok(());
    }
    ensure_backports_source()?;
    apt_install(pkgs, &["-t", "bookworm-backports"])
}

/// Downloads foreign-architecture packages (never installs them) and unpacks them
/// into `dest`; the .debs are cached under `target/xtask-cache/debs/<arch>/`.
pub fn ensure_foreign_debs(arch: &str, pkgs: &[&str], dest: &Path) -> Result<Vec<PathBuf>> {
    let cache = target_dir(&crate::root())
        .join("xtask-cache/debs")
        .join(arch);
    std::fs::create_dir_all(&cache)?;
    let have = |pkg: &str| -> Option<PathBuf> {
        std::fs::read_dir(&cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
    };
    if pkgs.iter().any(|p| have(p).is_none()) {
        let native = output("dpkg", &["--print-architecture"])?;
        let arches = output("dpkg", &["--print-foreign-architectures"])?;
        if native.trim() != arch && !arches.lines().any(|l| l.trim() == arch) {
            cmd("dpkg", &["--add-architecture", arch])?;
            apt(&["update", "-q"])?;
        } else {
            apt_update()?;
        }
        let specs: Vec<String> = pkgs.iter().map(|p| format!("{p}:{arch}")).collect();
        let mut args = vec!["download"];
        args.extend(specs.iter().map(String::as_str));
        let status = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(&args)
            .current_dir(&cache)
            .status()
            .context("cannot run apt-get download")?;
        if !status.success() {
            bail!("apt-get download {} failed: {status}", specs.join(" "));
        }
    }
    std::fs::create_dir_all(dest)?;
    let mut debs = Vec::new();
    for p in pkgs {
        let deb = have(p).with_context(|| format!("{p}:{arch} was not downloaded"))?;
        cmd(
            "dpkg-deb",
            &[
                "-x",
                deb.to_str().expect("utf-8"),
                dest.to_str().expect("utf-8"),
            ],
        )?;
        debs.push(deb);
    }
    Ok(debs)
}

/// Debian trixie's `ipxe` package (architecture `all`): the iPXE EFI binaries a
/// ProxyDHCP rack chains UEFI machines to (`snponly.efi`, `ipxe-arm64.efi`). Bookworm's
/// `ipxe` has no arm64 build, so this one .deb is fetched by URL and checked against
/// its SHA-256 (computed when the URL was pinned).
const IPXE_DEB_URL: &str =
    "http://deb.debian.org/debian/pool/main/i/ipxe/ipxe_1.21.1+git20250501.dad20602+dfsg-1_all.deb";
const IPXE_DEB_SHA256: &str = "eeaca79dbde0fb86c102bf1d362c6f6a67ed0ddab38b3dd12e1b332339f5dd99";

/// Downloads the pinned `ipxe` .deb once (into the target directory, checked against
/// [`IPXE_DEB_SHA256`]), unpacks it, and returns the directory holding
/// `snponly.efi`, `ipxe-amd64.efi` and `ipxe-arm64.efi`.
pub fn ensure_ipxe_efi() -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let cache = target_dir(&crate::root()).join("xtask-cache/ipxe");
    let dir = cache.join("root/usr/lib/ipxe");
    let all = ["snponly.efi", "ipxe-amd64.efi", "ipxe-arm64.efi"];
    if all.iter().all(|f| dir.join(f).is_file()) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&cache)?;
    let deb = cache.join("ipxe_all.deb");
    let part = cache.join(format!("ipxe_all.deb.{}", std::process::id()));
    let part_s = utf8(&part)?;
    cmd(
        "curl",
        &["-sSfL", "--max-time", "300", "-o", part_s, IPXE_DEB_URL],
    )?;
    let got = hex::encode(Sha256::digest(std::fs::read(&part)?));
    if got != IPXE_DEB_SHA256 {
        let _ = std::fs::remove_file(&part);
        bail!("{IPXE_DEB_URL}: SHA-256 {got}, expected {IPXE_DEB_SHA256}");
    }
    std::fs::rename(&part, &deb)?;
    let root = cache.join("root");
    cmd("dpkg-deb", &["-x", utf8(&deb)?, utf8(&root)?])?;
    for f in all {
        if !dir.join(f).is_file() {
            bail!("{} has no {f}", deb.display());
        }
    }
    Ok(dir)
}

/// Installs rustup components (rustfmt, clippy) when rustup is there.
pub fn ensure_rustup_components(components: &[&str]) -> Result<()> {
    let Ok(list) = output("rustup", &["component", "list", "--installed"]) else {
        return Ok(()); // no rustup: a distro toolchain, nothing to add
    };
    for c in components {
        if !list.lines().any(|l| l.starts_with(c)) {
            cmd("rustup", &["component", "add", c])?;
        }
    }
    Ok(())
}

/// Adds rustup targets (the musl targets of `cargo xtask dist`) that are missing.
pub fn ensure_rustup_targets(targets: &[&str]) -> Result<()> {
    let list = output("rustup", &["target", "list", "--installed"])
        .context("rustup is needed to add the musl targets")?;
    for t in targets {
        if !list.lines().any(|l| l.trim() == *t) {
            cmd("rustup", &["target", "add", t])?;
        }
    }
    Ok(())
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` when set (relative to the workspace
/// root, as cargo reads it), else `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}
