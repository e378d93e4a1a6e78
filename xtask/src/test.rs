//! `cargo xtask test [--quick]`: the README's test command. Installs what the tests
//! need, then runs the format check, clippy with warnings denied, every test of the
//! workspace, each fuzz target briefly (20 s; 5 s with `--quick`), a 2-minute soak
//! (`xtask soak`), and the QEMU netboot harness (all modes; `--quick` leaves it out).

use anyhow::{bail, Context, Result};

use crate::prereq::{self, cmd};

/// Debian packages the test suite drives (real clients, fixtures, firmware).
pub const TEST_DEBS: &[&str] = &[
    "curl",
    "gnupg",
    "atftp",
    "tftp-hpa",
    "xz-utils",
    "cpio",
    "openssl",
    // ProxyDHCP tests: network namespaces and veth pairs, busybox's udhcpc, and
    // dnsmasq as the site's DHCP beside the rack.
    "iproute2",
    "busybox-static",
    "dnsmasq",
    // The Images page test drives a real headless Chromium.
    "chromium",
    "chromium-driver",
];

pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let root = crate::root();
    prereq::ensure_debs(TEST_DEBS)?;
    // The real Ubuntu cloud-image keyring comes from bookworm-backports.
    prereq::ensure_backports_debs(&["ubuntu-keyring"])?;
    prereq::ensure_rustup_components(&["rustfmt", "clippy"])?;
    std::env::set_current_dir(&root)?;
    cmd("cargo", &["fmt", "--all", "--", "--check"])?;
    cmd(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let tests = cargo_test(&["test", "--workspace", "--no-fail-fast"]);
    // Every fuzz target for a bounded time (runs even when a test failed).
    let fuzz_time = std::time::Duration::from_secs(if quick { 5 } else { 20 });
    let targets: Vec<String> = crate::fuzz::TARGETS.iter().map(|t| t.to_string()).collect();
    let fuzz = crate::fuzz::run_targets(&targets, fuzz_time);
    // Real firmware booting from rackboot (runs even when a test failed, so one run
    // shows everything that is wrong).
    let netboot = if quick {
        Ok(())
    } else {
        crate::netboot::run(&[])
    };
    // Syncs of a changing upstream under download load, with leak bounds.
    let soak = crate::soak::run(&["--minutes".into(), "2".into()]);
    let failures: Vec<String> = [tests.err(), fuzz.err(), netboot.err(), soak.err()]
        .into_iter()
        .flatten()
        .map(|e| format!("{e:#}"))
        .collect();
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one plain
/// `N passed, M failed` line totalling every test binary.
fn cargo_test(args: &[&str]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    eprintln!("$ cargo {}", args.join(" "));
    let mut child = Command::new("cargo")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let count = |line: &str, what: &str| -> u64 {
        line.split(';')
            .find_map(|part| part.trim().strip_suffix(what))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if line.starts_with("test result:") {
            passed += count(&line, "passed");
            failed += count(&line, "failed");
            ignored += count(&line, "ignored");
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}
