//! `cargo xtask dist [--no-smoke]`: the release binaries.
//!
//! Builds `rackboot` with the `dist` profile (fat LTO, one codegen unit, stripped,
//! panics unwind) for `x86_64-unknown-linux-musl` and `aarch64-unknown-linux-musl`,
//! installing what that needs (the rustup targets, musl-tools, Debian's aarch64 cross
//! gcc, qemu-user-static, file). The linker and C compiler for aarch64 are set in
//! `.cargo/config.toml`. Output in `<target dir>/dist/`: `rackboot-<version>-x86_64`,
//! `rackboot-<version>-aarch64`, `SHA256SUMS` and `report.md` (the size table); the
//! checks work in `<target dir>/dist-check/`.
//!
//! Each binary is checked: `file` must call it static and stripped, it must be under
//! the 20 MiB budget (the task fails naming the size otherwise), `--version` must print
//! the crate version and `--help` must run (natively for x86_64, under
//! `qemu-aarch64-static` for aarch64), and a config with an unknown key must exit 2.
//! Unless `--no-smoke`: each binary syncs the signed demo stream from `file://`, serves
//! it on loopback (ephemeral ports, read back from its log), a kernel fetched over HTTP
//! must hash to a payload of the signed stream, a bootloader must come over TFTP, and
//! SIGTERM must stop it with status 0. The x86_64 server's idle RSS is reported.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::demo_stream::DemoRack;
use crate::prereq::{self, cmd, output};
use crate::proc::Guard;

/// One release target.
pub struct Target {
    pub triple: &'static str,
    /// The name in the artifact (`rackboot-<version>-<arch>`).
    pub arch: &'static str,
    /// How to run it on this (x86_64) machine: directly, or under qemu-user.
    pub runner: Option<&'static str>,
}

pub const X86_64: Target = Target {
    triple: "x86_64-unknown-linux-musl",
    arch: "x86_64",
    runner: None,
};
pub const AARCH64: Target = Target {
    triple: "aarch64-unknown-linux-musl",
    arch: "aarch64",
    runner: Some("qemu-aarch64-static"),
};
const TARGETS: [&Target; 2] = [&X86_64, &AARCH64];

/// DESIGN.md's budget for the static binary.
const SIZE_LIMIT: u64 = 20 << 20;
/// Bound on one rackboot command in the checks (qemu-user is slow at start-up).
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the smoke sync of the demo stream (qemu-user hashes slowly).
const SMOKE_SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// Debian packages the build and the checks need.
const DEBS: &[&str] = &[
    "musl-tools",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    "file",
    "curl",
];

/// The version of the rackboot package, from `cargo metadata`.
pub fn version() -> Result<String> {
    let meta = output(
        "cargo",
        &[
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&meta).context("parsing cargo metadata")?;
    v["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "rackboot"))
        .and_then(|p| p["version"].as_str())
        .map(String::from)
        .context("cargo metadata names no rackboot package")
}

/// `<target dir>/dist`: the artifacts. (Cargo also keeps the host-side build files of
/// the `dist` profile there: `build/`, `deps/`, `.fingerprint/`.)
pub fn dist_dir() -> PathBuf {
    prereq::target_dir(&crate::root()).join("dist")
}

/// `<target dir>/dist-check`: scratch space of the checks and the smoke test.
fn check_dir() -> PathBuf {
    prereq::target_dir(&crate::root()).join("dist-check")
}

/// Installs the rustup targets and Debian packages the build of `targets` needs.
pub fn prerequisites(targets: &[&Target]) -> Result<()> {
    let triples: Vec<&str> = targets.iter().map(|t| t.triple).collect();
    prereq::ensure_rustup_targets(&triples)?;
    prereq::ensure_debs(DEBS)
}

/// Builds one target with the `dist` profile; returns where cargo left the binary.
pub fn cargo_build(t: &Target) -> Result<PathBuf> {
    cargo_build_suffixed(t, None)
}

/// [`cargo_build`], with `RACKBOOT_VERSION_SUFFIX` set to `suffix` (or removed) for the
/// build: the binary reports `<version>+<suffix>`. A suffixed build has its own target
/// dir (`<target dir>/suffixed/`, first seeded with a copy of the target dir's dist
/// artefacts so that only rackboot itself compiles): in one dir, cargo would rebuild
/// the rackboot crate each time the suffix changes.
fn cargo_build_suffixed(t: &Target, suffix: Option<&str>) -> Result<PathBuf> {
    let root = crate::root();
    std::env::set_current_dir(&root)?;
    let started = Instant::now();
    let mut target_dir = prereq::target_dir(&root);
    let mut c = std::process::Command::new("cargo");
    if suffix.is_some() {
        let own = target_dir.join("suffixed");
        if !own.exists() {
            let tmp = target_dir.join(".suffixed.tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)?;
            for sub in [t.triple, "dist"] {
                let from = target_dir.join(sub);
                if from.exists() {
                    cmd("cp", &["-a", prereq::utf8(&from)?, prereq::utf8(&tmp)?])?;
                }
            }
            std::fs::rename(&tmp, &own)?;
        }
        c.env("CARGO_TARGET_DIR", &own);
        target_dir = own;
    }
    c.args([
        "build",
        "--locked",
        "--profile",
        "dist",
        "--target",
        t.triple,
        "--bin",
        "rackboot",
    ]);
    match suffix {
        Some(s) => c.env("RACKBOOT_VERSION_SUFFIX", s),
        None => c.env_remove("RACKBOOT_VERSION_SUFFIX"),
    };
    let status = c.status().context("running cargo build")?;
    if !status.success() {
        bail!(
            "cargo build --profile dist --target {} failed ({status})",
            t.triple
        );
    }
    eprintln!(
        "built {} in {:.0} s (wall, including a no-op when fresh)",
        t.triple,
        started.elapsed().as_secs_f64()
    );
    Ok(target_dir.join(t.triple).join("dist/rackboot"))
}

/// Builds one target with the `dist` profile and copies it to
/// `<target dir>/dist/rackboot-<version>-<arch>`; returns that path.
pub fn build(t: &Target, version: &str) -> Result<PathBuf> {
    let built = cargo_build(t)?;
    let dir = dist_dir();
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("rackboot-{version}-{}", t.arch));
    // Copy through a temporary name so a half-written artifact never has the real name.
    let tmp = dir.join(format!(".rackboot-{version}-{}.tmp", t.arch));
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// The x86_64 binary for the appliance image, built (or found fresh) by cargo.
pub fn build_x86_64() -> Result<PathBuf> {
    prerequisites(&[&X86_64])?;
    build(&X86_64, &version()?)
}

/// The x86_64 binary `build_x86_64` left in `<target dir>/dist/` (built when missing):
/// what the appliance image was built with, without rebuilding it after a suffixed build.
pub fn built_x86_64() -> Result<PathBuf> {
    let out = dist_dir().join(format!("rackboot-{}-{}", version()?, X86_64.arch));
    if out.exists() {
        return Ok(out);
    }
    build_x86_64()
}

/// The x86_64 binary built with `RACKBOOT_VERSION_SUFFIX=suffix`, copied to
/// `<target dir>/dist/rackboot-<version>+<suffix>-x86_64` (the appliance check's "v2":
/// the same source, saying it is another version).
pub fn build_x86_64_suffixed(suffix: &str) -> Result<PathBuf> {
    prerequisites(&[&X86_64])?;
    let built = cargo_build_suffixed(&X86_64, Some(suffix))?;
    let dir = dist_dir();
    std::fs::create_dir_all(&dir)?;
    let name = format!("rackboot-{}+{suffix}-{}", version()?, X86_64.arch);
    let tmp = dir.join(format!(".{name}.tmp"));
    let out = dir.join(name);
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// The SHA-256 of a file, read 1 MiB at a time.
pub fn sha256_file(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(sha256_reader(f)?)
}

/// The SHA-256 (hex) of what `r` yields to its end, read 1 MiB at a time.
pub fn sha256_reader(mut r: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Runs the binary (under its runner) with `args`, bounded by `limit`; returns
/// (exit code, stdout, stderr).
fn run_bin(t: &Target, bin: &Path, args: &[&str], limit: Duration) -> Result<(i32, String)> {
    let bin = prereq::utf8(bin)?;
    let (program, mut full) = match t.runner {
        Some(r) => (r, vec![bin]),
        None => (bin, vec![]),
    };
    full.extend_from_slice(args);
    let dir = check_dir();
    std::fs::create_dir_all(&dir)?;
    let log = dir.join(format!("{}.out", t.arch));
    let mut g = Guard::spawn(&format!("rackboot ({})", t.arch), program, &full, &log)?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = g.child.try_wait()? {
            break s;
        }
        if started.elapsed() > limit {
            bail!(
                "rackboot ({}) {} did not finish within {} s",
                t.arch,
                args.join(" "),
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    Ok((status.code().unwrap_or(-1), text))
}

/// What the checks found for one binary.
struct Checked {
    path: PathBuf,
    size: u64,
    file: String,
    sha256: String,
    smoke: Option<Smoke>,
}

/// The static checks: `file`, size, `--version`, `--help`, exit 2 on a bad config.
fn check(t: &Target, bin: &Path, version: &str) -> Result<Checked> {
    let size = std::fs::metadata(bin)?.len();
    let file = output("file", &["-b", prereq::utf8(bin)?])?
        .trim()
        .to_string();
    let name = bin.display();
    if !(file.contains("statically linked") || file.contains("static-pie linked")) {
        bail!("{name} is not static: file says {file:?}");
    }
    if !file.contains(", stripped") {
        bail!("{name} is not stripped: file says {file:?}");
    }
    let want_arch = match t.arch {
        "x86_64" => "x86-64",
        _ => "ARM aarch64",
    };
    if !file.contains(want_arch) {
        bail!("{name} is not a {want_arch} binary: file says {file:?}");
    }
    if size > SIZE_LIMIT {
        bail!(
            "{name} is {size} bytes ({:.2} MiB), over the {} MiB budget",
            mib(size),
            SIZE_LIMIT >> 20
        );
    }
    let (code, out) = run_bin(t, bin, &["--version"], CHECK_TIMEOUT)?;
    if code != 0 || !out.contains(version) {
        bail!("{name} --version exited {code}, printed {out:?} (want {version})");
    }
    let (code, out) = run_bin(t, bin, &["--help"], CHECK_TIMEOUT)?;
    if code != 0 || !out.contains("serve") {
        bail!("{name} --help exited {code}, printed {out:?}");
    }
    let bad = check_dir().join("bad.toml");
    std::fs::write(&bad, "state_dir = \"/nonexistent\"\nno_such_key = 1\n")?;
    let bad = prereq::utf8(&bad)?;
    let (code, out) = run_bin(t, bin, &["--config", bad, "status"], CHECK_TIMEOUT)?;
    if code != 2 || !out.contains("no_such_key") {
        bail!(
            "{name} with a config holding an unknown key exited {code} (want 2), printed {out:?}"
        );
    }
    eprintln!(
        "{}: static, stripped, {size} bytes, --version, --help, exit 2 on a bad config: ok",
        t.arch
    );
    Ok(Checked {
        path: bin.to_path_buf(),
        size,
        file,
        sha256: sha256_file(bin)?,
        smoke: None,
    })
}

/// What the smoke test measured.
struct Smoke {
    sync: Duration,
    kernel_bytes: u64,
    tftp_bytes: u64,
    /// Resident memory of the idle server after the fetches (native runs only).
    idle_rss_kib: Option<u64>,
}

/// Downloads `url` to `out` with curl (failing on an HTTP error, within 60 s).
fn curl_to(url: &str, out: &Path) -> Result<()> {
    let out = prereq::utf8(out)?;
    cmd("curl", &["-sSf", "--max-time", "60", "-o", out, url])
}

/// Sync + serve + fetch with one binary.
fn smoke(t: &Target, bin: &Path, stream: &crate::demo_stream::Summary) -> Result<Smoke> {
    let dir = check_dir().join(format!("smoke-{}", t.arch));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("state");
    let config = dir.join("rackboot.toml");
    std::fs::write(
        &config,
        DemoRack::loopback("\"amd64\"").config(&stream.dir, &state),
    )?;
    let config = prereq::utf8(&config)?;

    let started = Instant::now();
    let (code, out) = run_bin(t, bin, &["--config", config, "sync"], SMOKE_SYNC_TIMEOUT)?;
    let sync = started.elapsed();
    if code != 0 {
        bail!(
            "rackboot ({}) sync of the demo stream exited {code}: {out}",
            t.arch
        );
    }

    let bin_s = prereq::utf8(bin)?;
    let (program, mut args) = match t.runner {
        Some(r) => (r, vec![bin_s]),
        None => (bin_s, vec![]),
    };
    args.extend_from_slice(&["--config", config, "serve"]);
    let log = dir.join("serve.log");
    let mut serve = Guard::spawn(
        &format!("rackboot serve ({})", t.arch),
        program,
        &args,
        &log,
    )?;
    let http = serve.wait_for_log(&log, "listening for HTTP on", CHECK_TIMEOUT)?;
    let tftp = serve.wait_for_log(&log, "listening for TFTP on", CHECK_TIMEOUT)?;

    let kernel = dir.join("boot-kernel");
    curl_to(
        &format!("http://{http}/images/debian/amd64/generic/bookworm/stable/boot-kernel"),
        &kernel,
    )?;
    let digest = sha256_file(&kernel)?;
    if !stream.payloads.iter().any(|p| p.sha256 == digest) {
        bail!("the kernel served by rackboot ({}) has sha256 {digest}, which no payload of the signed stream has", t.arch);
    }
    let loader = dir.join("pxelinux.0");
    curl_to(&format!("tftp://{tftp}/pxelinux.0"), &loader)?;
    let tftp_bytes = std::fs::metadata(&loader)?.len();
    if tftp_bytes == 0 {
        bail!("pxelinux.0 over TFTP from rackboot ({}) is empty", t.arch);
    }
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss_kib = if t.runner.is_none() {
        crate::proc::status_kib(serve.pid(), "VmRSS")
    } else {
        None
    };
    let status = serve.terminate(Duration::from_secs(20))?;
    if !status.success() {
        bail!(
            "rackboot serve ({}) exited {status} on SIGTERM; see {}",
            t.arch,
            log.display()
        );
    }
    eprintln!(
        "{}: smoke ok: sync {:.1} s, kernel over HTTP matches the stream ({} bytes), pxelinux.0 over TFTP ({tftp_bytes} bytes), clean exit on SIGTERM",
        t.arch,
        sync.as_secs_f64(),
        std::fs::metadata(&kernel)?.len()
    );
    Ok(Smoke {
        sync,
        kernel_bytes: std::fs::metadata(&kernel)?.len(),
        tftp_bytes,
        idle_rss_kib,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn run(args: &[String]) -> Result<()> {
    let smoke_test = !args.iter().any(|a| a == "--no-smoke");
    if let Some(a) = args.iter().find(|a| *a != "--no-smoke") {
        bail!("unknown dist argument {a:?} (usage: cargo xtask dist [--no-smoke])");
    }
    prerequisites(&TARGETS)?;
    let version = version()?;
    let dir = dist_dir();
    let mut checked = Vec::new();
    let started = Instant::now();
    for t in TARGETS {
        let bin = build(t, &version)?;
        checked.push(check(t, &bin, &version)?);
    }
    let build_time = started.elapsed();

    let mut sums = String::new();
    for c in &checked {
        let name = c
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .context("name")?;
        writeln!(sums, "{}  {name}", c.sha256)?;
    }
    std::fs::write(dir.join("SHA256SUMS"), &sums)?;

    if smoke_test {
        let stream = crate::demo_stream::build(&check_dir().join("stream"))?;
        for (t, c) in TARGETS.iter().zip(checked.iter_mut()) {
            c.smoke = Some(smoke(t, &c.path, &stream)?);
        }
    }

    let mut report = String::new();
    writeln!(report, "# rackboot {version} release binaries\n")?;
    writeln!(
        report,
        "| binary | bytes | MiB | budget | file | smoke (sync / HTTP kernel / TFTP / idle RSS) |"
    )?;
    writeln!(report, "|---|---:|---:|---|---|---|")?;
    for c in &checked {
        let linkage = if c.file.contains("static-pie") {
            "static-pie, stripped"
        } else {
            "static, stripped"
        };
        let smoke = match &c.smoke {
            Some(s) => format!(
                "{:.1} s / {} B / {} B / {}",
                s.sync.as_secs_f64(),
                s.kernel_bytes,
                s.tftp_bytes,
                s.idle_rss_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "- (qemu-user)".into())
            ),
            None => "skipped".into(),
        };
        writeln!(
            report,
            "| {} | {} | {:.2} | < {} MiB ok | {linkage} | {smoke} |",
            c.path.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            c.size,
            mib(c.size),
            SIZE_LIMIT >> 20,
        )?;
    }
    writeln!(
        report,
        "\nBuilt and checked in {:.0} s; SHA256SUMS:\n\n```\n{sums}```",
        build_time.as_secs_f64()
    )?;
    std::fs::write(dir.join("report.md"), &report)?;
    println!("\n{report}");
    println!("artifacts in {}", dir.display());
    Ok(())
}
