//! `cargo xtask demo [--serve]`: the README's first command. Builds the signed demo
//! stream from Debian packages, writes a config in a fresh state dir under
//! `target/demo/`, and runs the real rackboot binary against it: a sync, a no-op sync,
//! what is in the store, then `rackboot serve` on loopback with a few fetches the way
//! a booting machine makes them (TFTP, HTTP, boot configs). With `--serve` it keeps
//! serving until Ctrl-C.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::prereq::cmd;

pub fn run(args: &[String]) -> Result<()> {
    let keep_serving = args.iter().any(|a| a == "--serve");
    crate::prereq::ensure_debs(&["curl"])?;
    let root = crate::root();
    let demo = root.join("target/demo");
    let stream = demo.join("stream");
    let state = demo.join("state");
    if state.exists() {
        std::fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    std::fs::create_dir_all(&state)?;
    let summary = crate::demo_stream::build(&stream)?;
    println!("{summary}");

    std::env::set_current_dir(&root)?;
    cmd("cargo", &["build", "--release", "--bin", "rackboot"])?;
    let bin = root.join("target/release/rackboot");
    let config = demo.join("rackboot.toml");
    let tftp = format!("127.0.0.1:{TFTP_PORT}");
    let http = format!("127.0.0.1:{HTTP_PORT}");
    let rack = crate::demo_stream::DemoRack {
        sync: "interval = \"5m\"",
        tftp_listen: &tftp,
        http_listen: &http,
        kernel_params: None,
        arches: "\"amd64\", \"arm64\"",
    };
    std::fs::write(&config, rack.config(&stream, &state))?;
    let rb = |args: &[&str]| -> Result<()> {
        let mut full = vec!["--config", config.to_str().expect("utf-8 path")];
        full.extend_from_slice(args);
        cmd(bin.to_str().expect("utf-8 path"), &full)
    };
    println!("\n== rackboot sync (first: downloads and verifies everything)");
    let t = Instant::now();
    rb(&["sync"])?;
    let first = t.elapsed();
    println!("\n== rackboot sync (again: nothing new upstream)");
    let t = Instant::now();
    rb(&["sync"])?;
    let second = t.elapsed();
    println!("\n== rackboot boot-resources read");
    rb(&["boot-resources", "read"])?;
    println!("\n== rackboot status");
    rb(&["status"])?;
    println!("\n== what is served (state/current)");
    list(&state.join("current"), &state.join("current"))?;
    serve(&bin, &config, keep_serving)?;
    println!(
        "\nfirst sync {:.2} s, no-op sync {:.0} ms (wall time including process start)",
        first.as_secs_f64(),
        second.as_secs_f64() * 1000.0
    );
    println!("config: {}\nstate:  {}", config.display(), state.display());
    Ok(())
}

/// Starts `rackboot serve` and fetches what a booting machine would.
fn serve(bin: &Path, config: &Path, keep_serving: bool) -> Result<()> {
    use std::process::{Command, Stdio};
    println!("\n== rackboot serve (TFTP 127.0.0.1:{TFTP_PORT}, HTTP 127.0.0.1:{HTTP_PORT})");
    let mut child = Command::new(bin)
        .args(["--config", config.to_str().expect("utf-8 path"), "serve"])
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start rackboot serve")?;
    let result = (|| -> Result<()> {
        let http = format!("http://127.0.0.1:{HTTP_PORT}");
        // Wait (bounded) until it answers.
        let ready = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            Command::new("curl")
                .args(["-sf", "-o", "/dev/null", &format!("{http}/api/v1/status")])
                .status()
                .is_ok_and(|s| s.success())
        });
        if !ready {
            anyhow::bail!("rackboot serve did not answer on {http} within 10 s");
        }
        let tftp = format!("tftp://127.0.0.1:{TFTP_PORT}");
        let fetches: [(&str, Vec<String>); 5] = [
            (
                "BIOS firmware: pxelinux.0 over TFTP",
                vec![
                    "-s".into(),
                    "-o".into(),
                    "/dev/null".into(),
                    "-w".into(),
                    "%{size_download} bytes\n".into(),
                    format!("{tftp}/pxelinux.0"),
                ],
            ),
            (
                "lpxelinux: its config (default, any MAC)",
                vec![
                    "-s".into(),
                    format!("{tftp}/pxelinux.cfg/01-52-54-00-12-34-56"),
                ],
            ),
            (
                "GRUB: the config for an arm64 machine",
                vec!["-s".into(), format!("{http}/grub/grub.cfg-default-arm64")],
            ),
            (
                "the kernel over HTTP (first 1 KiB, a Range request)",
                vec![
                    "-s".into(),
                    "-o".into(),
                    "/dev/null".into(),
                    "-r".into(),
                    "0-1023".into(),
                    "-w".into(),
                    "HTTP %{http_code}, %{size_download} bytes\n".into(),
                    format!("{http}/images/debian/amd64/generic/bookworm/stable/boot-kernel"),
                ],
            ),
            ("status", vec!["-s".into(), format!("{http}/api/v1/status")]),
        ];
        for (what, args) in fetches {
            println!("\n-- {what}: curl {}", args.last().expect("a URL"));
            let status = Command::new("curl").args(&args).status()?;
            if !status.success() {
                anyhow::bail!("curl {} failed: {status}", args.join(" "));
            }
        }
        println!();
        if keep_serving {
            println!("serving; boot configs at {http}/pxelinux.cfg/default, metrics at {http}/metrics; Ctrl-C to stop");
            child.wait()?;
        }
        Ok(())
    })();
    // Stop it the way systemd does: SIGTERM, then wait.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    result
}

const TFTP_PORT: u16 = 6969;
const HTTP_PORT: u16 = 5248;

fn list(dir: &Path, base: &Path) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p)?;
        let rel = p.strip_prefix(base)?.display().to_string();
        if meta.is_symlink() {
            println!("  {rel} -> {}", std::fs::read_link(&p)?.display());
        } else if meta.is_dir() {
            if rel.starts_with("grub/") || rel.contains("-efi") {
                let n = std::fs::read_dir(&p)?.count();
                println!("  {rel}/ ({n} files)");
                continue;
            }
            list(&p, base)?;
        } else {
            println!("  {rel} ({} bytes)", meta.len());
        }
    }
    Ok(())
}
