//! `cargo xtask test`: the README's test command. Installs what the tests need, then
//! runs the format check, clippy with warnings denied, and every test of the workspace.

use anyhow::Result;

use crate::prereq::{self, cmd};

/// Debian packages the test suite drives (real clients, fixtures, firmware).
pub const TEST_DEBS: &[&str] = &["curl", "gnupg", "atftp", "tftp-hpa", "xz-utils", "cpio"];

pub fn run(_args: &[String]) -> Result<()> {
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
    cmd("cargo", &["test", "--workspace", "--no-fail-fast"])?;
    Ok(())
}
