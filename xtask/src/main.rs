//! `cargo xtask`: the project's tasks beyond `cargo build`, one module each.
//!
//! - `test`          fmt check, clippy -D warnings, every test (installs prerequisites)
//! - `demo`          README command one: a signed demo stream, rackboot syncing it
//! - `demo-stream D` build the signed demo SimpleStreams tree into D
//! - `bench [tftp|http]` rackboot against tftpd-hpa, atftpd, dnsmasq and nginx
//! - `netboot [MODE…]` QEMU VMs (BIOS, UEFI amd64/arm64, iPXE) netboot from rackboot
//! - `dist`          static, stripped musl binaries for x86_64 and aarch64, checked
//! - `image [--check]` the bootable appliance disk image (mmdebstrap), booted in QEMU
//! - `fuzz [TARGET…] [--time S]` coverage-guided fuzzing (cargo-fuzz) of `fuzz/`
//! - `soak [--minutes M]` serve + syncs of a changing upstream under download load

mod bench;
mod demo;
mod demo_stream;
mod dist;
mod fuzz;
mod image;
mod netboot;
mod prereq;
mod proc;
mod soak;
mod test;
mod tftpload;

use std::path::PathBuf;

fn usage() -> ! {
    eprintln!("usage: cargo xtask <test | demo | demo-stream DIR | bench [tftp] [http] | netboot [MODE...] [--keep] | dist [--no-smoke] | image [--check | --no-check] | fuzz [TARGET...] [--time S] | soak [--minutes M]>");
    std::process::exit(2);
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else { usage() };
    let rest = &args[1..];
    match task.as_str() {
        "test" => test::run(rest),
        "bench" => bench::run(rest),
        "demo" => demo::run(rest),
        "netboot" => netboot::run(rest),
        "dist" => dist::run(rest),
        "image" => image::run(rest),
        "fuzz" => fuzz::run(rest),
        "soak" => soak::run(rest),
        "demo-stream" => {
            let Some(dir) = rest.first() else { usage() };
            let summary = demo_stream::build(&PathBuf::from(dir))?;
            println!("{summary}");
            Ok(())
        }
        _ => usage(),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}
