//! `cargo xtask fuzz [TARGET…] [--time S]`: coverage-guided fuzzing (cargo-fuzz,
//! libFuzzer) of the targets in `fuzz/` (its own workspace), each for `S` seconds
//! (default 60), starting from the seed corpus in `fuzz/corpus/<target>/`. New inputs
//! go to `fuzz/target/corpus/<target>/` (not the repository), crashes to
//! `fuzz/artifacts/<target>/`. Ends with one line per target: how long it ran, how
//! many inputs, the coverage reached and what it found; fails if any target crashed.
//!
//! Only a stable toolchain is assumed: cargo-fuzz needs nightly flags, so it runs with
//! `RUSTC_BOOTSTRAP=1`, and without AddressSanitizer (`--sanitizer none`; the code is
//! safe Rust apart from a few syscalls), with debug assertions on so arithmetic
//! overflow is found too. cargo-fuzz is installed with `cargo install` when missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::prereq::cmd;

/// Every target in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "tftp_packet",
    "tftp_engine",
    "paths",
    "streams",
    "tar_members",
    "bootcfg_quote",
    "config",
    "dhcp_packet",
];

pub fn run(args: &[String]) -> Result<()> {
    let mut time = Duration::from_secs(60);
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                let v = it.next().context("--time needs a number of seconds")?;
                let s: u64 = v
                    .parse()
                    .with_context(|| format!("--time {v:?}: not a number of seconds"))?;
                time = Duration::from_secs(s.max(1));
            }
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!(
                "unknown fuzz target {other:?} (targets: {})",
                TARGETS.join(", ")
            ),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    run_targets(&targets, time)
}

/// Runs `targets` for `time` each; prints the summary; fails naming what crashed.
pub fn run_targets(targets: &[String], time: Duration) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz = crate::root().join("fuzz");
    // `cargo fuzz build` takes one target or none (= all).
    let builds: Vec<Option<&String>> = if targets.len() == TARGETS.len() {
        vec![None]
    } else {
        targets.iter().map(Some).collect()
    };
    for t in builds {
        let mut build = fuzz_cmd(&fuzz);
        build.args(["fuzz", "build", "--sanitizer", "none", "--debug-assertions"]);
        build.args(t);
        eprintln!(
            "$ cargo fuzz build --sanitizer none --debug-assertions {}",
            t.map_or("", |t| t.as_str())
        );
        let status = build.status().context("cannot run cargo fuzz build")?;
        if !status.success() {
            bail!("cargo fuzz build failed: {status}");
        }
    }
    let mut results = Vec::new();
    for t in targets {
        results.push(run_one(&fuzz, t, time)?);
    }
    println!("fuzz summary ({} s per target):", time.as_secs());
    for r in &results {
        println!("  {r}");
    }
    let crashed: Vec<&String> = results
        .iter()
        .filter(|r| r.found.is_some())
        .map(|r| &r.target)
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz targets found crashes: {} (inputs in fuzz/artifacts/)",
            crashed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// What one target's run came to.
struct Outcome {
    target: String,
    secs: f64,
    runs: u64,
    cov: u64,
    corpus: u64,
    /// The crash (libFuzzer's reason and the saved input), if one was found.
    found: Option<String>,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<14} {:>6.1} s {:>10} runs  cov {:>5}  corpus {:>5}  {}",
            self.target,
            self.secs,
            self.runs,
            self.cov,
            self.corpus,
            self.found.as_deref().unwrap_or("nothing found")
        )
    }
}

fn fuzz_cmd(fuzz: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(fuzz)
        .env("RUSTC_BOOTSTRAP", "1")
        // The fuzz crate has its own target directory (fuzz/target), whatever the
        // caller's CARGO_TARGET_DIR says: its flags differ from every other build.
        .env_remove("CARGO_TARGET_DIR");
    c
}

fn run_one(fuzz: &Path, target: &str, time: Duration) -> Result<Outcome> {
    let work: PathBuf = fuzz.join("target/corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let seeds = fuzz.join("corpus").join(target);
    let mut c = fuzz_cmd(fuzz);
    c.args([
        "fuzz",
        "run",
        "--sanitizer",
        "none",
        "--debug-assertions",
        target,
    ])
    .arg(&work);
    if seeds.is_dir() {
        c.arg(&seeds);
    }
    c.args([
        "--",
        &format!("-max_total_time={}", time.as_secs()),
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ])
    .stderr(Stdio::piped());
    eprintln!("$ cargo fuzz run {target} ({} s)", time.as_secs());
    let started = Instant::now();
    let mut child = c.spawn().context("cannot run cargo fuzz run")?;
    let (mut runs, mut cov, mut corpus) = (0u64, 0u64, 0u64);
    let mut reason: Option<String> = None;
    let mut artifact: Option<String> = None;
    let stderr = child.stderr.take().context("piped stderr")?;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        // libFuzzer's status lines: "#1234 NEW cov: 56 ft: 78 corp: 9/10b …".
        if let Some(v) = field(&line, "cov:") {
            cov = cov.max(v);
        }
        if let Some(rest) = line.split("corp: ").nth(1) {
            if let Some(n) = rest.split('/').next().and_then(|n| n.parse().ok()) {
                corpus = n;
            }
        }
        if let Some(v) = line
            .strip_prefix("stat::number_of_executed_units:")
            .and_then(|v| v.trim().parse().ok())
        {
            runs = v;
        }
        if line.starts_with("==") && line.contains("ERROR: libFuzzer:") {
            reason = Some(
                line.split("ERROR: libFuzzer:")
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string(),
            );
        }
        if reason.is_none() && line.contains("panicked at") {
            reason = Some(line.trim().to_string());
        }
        if let Some(p) = line.split("Test unit written to ").nth(1) {
            artifact = Some(p.trim().to_string());
        }
        if reason.is_some() || line.starts_with("thread '") {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    let secs = started.elapsed().as_secs_f64();
    let found = if status.success() {
        None
    } else {
        Some(format!(
            "CRASH: {} ({})",
            reason.unwrap_or_else(|| format!("exit {status}")),
            artifact.unwrap_or_else(|| "no input saved".into())
        ))
    };
    Ok(Outcome {
        target: target.to_string(),
        secs,
        runs,
        cov,
        corpus,
        found,
    })
}

fn field(line: &str, name: &str) -> Option<u64> {
    line.split(name)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Installs cargo-fuzz with `cargo install` unless `cargo fuzz` already runs.
fn ensure_cargo_fuzz() -> Result<()> {
    let works = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        cmd("cargo", &["install", "cargo-fuzz", "--locked"])?;
    }
    Ok(())
}
