//! `cargo xtask demo`: the README's first command. Builds the signed demo stream from
//! Debian packages, writes a config in a fresh state dir under `target/demo/`, and
//! runs the real rackboot binary against it: a sync, a no-op sync, and what is served.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::prereq::cmd;

pub fn run(_args: &[String]) -> Result<()> {
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
    std::fs::write(&config, demo_config(&stream, &state))?;
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
    println!(
        "\nfirst sync {:.2} s, no-op sync {:.0} ms (wall time including process start)",
        first.as_secs_f64(),
        second.as_secs_f64() * 1000.0
    );
    println!("config: {}\nstate:  {}", config.display(), state.display());
    Ok(())
}

fn demo_config(stream: &Path, state: &Path) -> String {
    format!(
        r#"state_dir = "{state}"

[sync]
interval = "5m"

[tftp]
listen = ["127.0.0.1:6969"]

[http]
listen = ["127.0.0.1:5248"]

[boot]
default_image = "debian/bookworm"

[[sources]]
url = "file://{stream}/"
keyring_filename = "{stream}/keyring.gpg"

[[sources.selections]]
os = "debian"
release = "bookworm"
arches = ["amd64", "arm64"]
"#,
        state = state.display(),
        stream = stream.display(),
    )
}

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
