//! Crash and fault cases of the store: `rackboot fsck` finds a flipped byte in a blob
//! and a missing snapshot file and `--repair` + the next sync bring the store back;
//! kill -9 of `rackboot serve` at random moments of a sync (20 rounds); corrupt
//! state files; a full (ENOSPC) and a read-only state directory.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::upstream::*;

/// Prints a count line past libtest's capture (it captures `print!`, not writes to
/// the stderr handle), so `cargo xtask test` shows the counts of passing tests.
fn counts(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// `rackboot fsck --json`: (exit code, report, stdout+stderr for messages).
fn fsck(env: &Env, repair: bool) -> (i32, serde_json::Value, String) {
    let mut args = vec!["--json", "fsck"];
    if repair {
        args.push("--repair");
    }
    let out = env.run_for(&args, Duration::from_secs(60));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v, text)
}

/// Checks that `current` names a complete generation whose every file has the
/// bytes its manifest names; returns how many files were verified.
fn verify_current(env: &Env) -> usize {
    let g = env
        .current_generation()
        .expect("current names a generation");
    let snap = env.state.join("snapshots");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join(format!("{g}.json"))).unwrap())
            .unwrap_or_else(|e| panic!("manifest of generation {g}: {e}"));
    let files = m["files"].as_object().unwrap();
    assert!(!files.is_empty());
    for (rel, digest) in files {
        let p = snap.join(g.to_string()).join(rel);
        assert_eq!(
            file_sha256(&p),
            digest.as_str().unwrap(),
            "generation {g}: {rel} does not have its manifest's bytes"
        );
    }
    assert!(snap.join(g.to_string()).join("maas.meta").is_file());
    files.len()
}

/// The served kernel path inside `current`.
fn kernel_path(env: &Env) -> PathBuf {
    env.current().join(KERNEL.trim_start_matches('/'))
}

#[test]
fn fsck_finds_a_flipped_byte_and_a_missing_file_and_repair_recovers_with_the_next_sync() {
    let r = rack(256 << 10, "", "");
    let env = &r.env;
    env.ok(&["sync"]);
    let (code, v, text) = fsck(env, false);
    assert_eq!(code, 0, "{text}");
    assert!(v["blobs"].as_u64().unwrap() >= 3, "{text}");
    let want = sha256_hex(&kernel_of("20261101", 256 << 10));

    // A flipped byte in the kernel: the blob and the served file are one inode.
    let served = kernel_path(env);
    let blob = env.state.join("blobs/sha256").join(&want[..2]).join(&want);
    assert_eq!(
        std::fs::metadata(&served).unwrap().ino(),
        std::fs::metadata(&blob).unwrap().ino()
    );
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
        f.seek(SeekFrom::Start(1000)).unwrap();
        f.write_all(b"\xff").unwrap();
    }
    let (code, v, text) = fsck(env, false);
    assert_eq!(code, 1, "{text}");
    let problems = v["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p["path"] == blob.to_str().unwrap()
            && p["problem"].as_str().unwrap().contains("does not match")),
        "{text}"
    );
    // Check-only changes nothing.
    assert!(blob.exists());
    // Without --json: one line per problem, naming the file, and a summary.
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with(&format!(
            "{}: content does not match its name",
            blob.display()
        ))),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("re-hashed") && stderr.contains("problem"),
        "{stderr}"
    );

    let (code, _, text) = fsck(env, true);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("quarantine"), "{text}");
    assert!(!blob.exists());
    let quarantined: Vec<_> = std::fs::read_dir(env.state.join("quarantine"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(quarantined.len(), 1);
    // Until the next sync the served generation is incomplete, and fsck says so.
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("missing"), "{text}");

    // The next sync fetches the kernel again and builds a generation without the
    // bad inode, although upstream did not change.
    r.mirror.clear_log();
    env.ok(&["sync"]);
    assert_eq!(env.current_generation(), Some(2));
    assert_eq!(file_sha256(&kernel_path(env)), want);
    assert!(r
        .mirror
        .requests()
        .iter()
        .any(|q| q.path.ends_with("boot-kernel") && q.status == 200));
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 0, "after the sync: {text}");
    verify_current(env);

    // A file missing from the served snapshot.
    let initrd = env
        .current()
        .join("ubuntu/amd64/generic/noble/stable/boot-initrd");
    assert!(initrd.exists());
    std::fs::remove_file(&initrd).unwrap();
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("boot-initrd") && text.contains("missing from generation 2"),
        "{text}"
    );
    env.ok(&["sync"]);
    assert_eq!(env.current_generation(), Some(3));
    assert!(kernel_path(env).exists());
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 0, "{text}");
    verify_current(env);

    // Usage: a state dir that is not a store is exit 2.
    let other = env.dir.path().join("other.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&env.config).unwrap().replace(
            &format!("state_dir = \"{}\"", env.state.display()),
            &format!("state_dir = \"{}\"", env.dir.path().join("nope").display()),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["--config", other.to_str().unwrap(), "fsck"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A small xorshift: the test needs spread, not quality. The seed is printed.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn kill9(s: &mut Served) {
    s.signal(Signal::SIGKILL);
    s.wait_exit(Duration::from_secs(10));
}

#[test]
fn crash_rounds_kill_serve_during_a_sync_and_the_store_stays_whole() {
    const ROUNDS: usize = 20;
    const SIZE: usize = 192 << 10;
    let started = Instant::now();
    let r = rack(SIZE, "", "");
    let env = &r.env;
    // About 1 s per sync: the kernel trickles.
    r.mirror.fault("boot-kernel", Fault::Throttle(SIZE));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    // The first sync, timed: kills are spread over that duration.
    let t = Instant::now();
    env.ok(&["sync"]);
    let sync_time = t.elapsed();
    let (mut kills, mut verified, mut blobs_hashed) = (0, 0, 0);
    let mut during_sync = 0;
    for round in 0..ROUNDS {
        let version = format!("202612{:02}", round + 1);
        let mut p = products(&version, SIZE);
        // Bootloaders change too every other round: unpacking is part of the sync.
        if round % 2 == 1 {
            p.truncate(1);
            p.extend(bootloaders(&format!("2021{:04}.0", round)));
        }
        write_stream(&env.mirror, &p, &r.key, SHA512);
        let before = env.current_generation();
        let mut s = env.serve();
        let delay = sync_time.mul_f64(rng.next_f64() * 1.2);
        std::thread::sleep(delay);
        kill9(&mut s);
        kills += 1;
        let after_kill = env.current_generation();
        during_sync += usize::from(after_kill == before);

        let (code, v, text) = fsck(env, false);
        assert_eq!(
            code, 0,
            "round {round} (seed {seed}, kill after {delay:?}): fsck found problems:\n{text}"
        );
        blobs_hashed += v["blobs"].as_u64().unwrap();
        verified += verify_current(env);

        // The next sync finishes what was left.
        let s = env.serve();
        let want = sha256_hex(&kernel_of(&version, SIZE));
        wait_until(Duration::from_secs(30), "the next sync to finish", || {
            std::fs::read(kernel_path(env)).is_ok_and(|b| sha256_hex(&b) == want)
        });
        // The daemon serves it once it switched (it follows `current` within 250 ms).
        wait_until(Duration::from_secs(5), "the daemon to serve it", || {
            let (code, body) = s.get(KERNEL);
            code == 200 && sha256_hex(&body) == want
        });
        drop(s);
    }
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 0, "{text}");
    counts(&format!(
        "crash rounds: {ROUNDS} rounds, {kills} kills ({during_sync} before publish), \
         {verified} served files verified, {blobs_hashed} blobs re-hashed by fsck, \
         seed {seed}, {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// A file's bytes, for "nothing was wiped".
fn tree(env: &Env) -> std::collections::BTreeMap<String, String> {
    let mut fp = env.fingerprint();
    fp.remove("state.json");
    fp
}

#[test]
fn corrupt_state_files_refuse_to_start_with_one_line_and_wipe_nothing() {
    let r = rack(64 << 10, "", "");
    let env = &r.env;
    env.ok(&["sync"]);
    env.ok(&["machines", "set", "52:54:00:12:34:56", "local_boot=true"]);
    let mut faults = 0;
    for name in ["state.json", "sources.json", "machines.json"] {
        let p = env.state.join(name);
        let good = std::fs::read(&p).unwrap();
        for bad in [&good[..good.len() / 2], b"\x00\x01garbage".as_slice(), b""] {
            std::fs::write(&p, bad).unwrap();
            let before = tree(env);
            // A sync does not read machines.json: only the daemon refuses for it.
            let commands: &[&[&str]] = if name == "machines.json" {
                &[&["serve"]]
            } else {
                &[&["serve"], &["sync"]]
            };
            for args in commands {
                let out = env.run_for(args, Duration::from_secs(30));
                let args = *args;
                let err = String::from_utf8_lossy(&out.stderr).to_string();
                assert_eq!(out.status.code(), Some(1), "{name} {args:?}: {err}");
                let line = err
                    .lines()
                    .find(|l| l.contains("error"))
                    .unwrap_or_else(|| panic!("{name}: no error line: {err}"));
                assert!(
                    line.contains(p.to_str().unwrap()) && line.contains("move it aside"),
                    "{name} {args:?}: {line}"
                );
                assert_eq!(tree(env), before, "{name} {args:?} changed the store");
                assert_eq!(std::fs::read(&p).unwrap(), bad, "{name} was rewritten");
                faults += 1;
            }
            if name == "machines.json" {
                env.ok(&["sync"]);
                assert_eq!(std::fs::read(&p).unwrap(), bad);
            }
            let (code, _, text) = fsck(env, false);
            assert_eq!(code, 1, "{text}");
            assert!(text.contains(name), "{text}");
        }
        std::fs::write(&p, &good).unwrap();
    }
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 0, "{text}");
    counts(&format!(
        "corrupt state: {faults} refusals checked (serve and sync), store unchanged"
    ));
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .ok()?;
    if out.status.success() {
        Some(Mount(dir.to_path_buf()))
    } else {
        counts(&format!(
            "SKIP full/read-only state dir: cannot mount a tmpfs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        None
    }
}

#[test]
fn a_full_or_read_only_state_dir_keeps_serving_and_wipes_nothing() {
    let r = rack(256 << 10, "", "");
    let env = &r.env;
    let Some(_mount) = mount_tmpfs(&env.state, "8m") else {
        return;
    };
    env.ok(&["sync"]);
    let mut s = env.serve();
    s.wait_generation(1, Duration::from_secs(30));
    let good = sha256_hex(&kernel_of("20261101", 256 << 10));
    let served_ok = |s: &Served| {
        let (code, body) = s.get(KERNEL);
        assert_eq!((code, sha256_hex(&body)), (200, good.clone()));
    };

    // ENOSPC: a kernel bigger than the state dir.
    write_stream(&env.mirror, &products("20261120", 10 << 20), &r.key, SHA512);
    let before = tree(env);
    let out = env.run(&["sync"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        tree(env),
        before,
        "a failed sync on a full disk changed the store"
    );
    served_ok(&s);
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 0, "{text}");

    // Read-only (the daemon's registration file is open for writing, which makes
    // the remount busy: stop it first).
    s.signal(Signal::SIGTERM);
    s.wait_exit(Duration::from_secs(30));
    let ro = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&env.state)
        .output()
        .unwrap();
    assert_success(&ro, "remount read-only");
    write_stream(&env.mirror, &products("20261121", 64 << 10), &r.key, SHA512);
    let out = env.run(&["sync"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(tree(env), before);
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 0, "{text}");
    let out = env.run_for(&["serve"], Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!(
        "serve on a read-only state dir: {:?}: {}",
        out.status.code(),
        err.lines().last().unwrap_or("")
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(tree(env), before);

    let rw = std::process::Command::new("mount")
        .args(["-o", "remount,rw"])
        .arg(&env.state)
        .status()
        .unwrap();
    assert!(rw.success());
    env.ok(&["sync"]);
    assert_eq!(
        file_sha256(&kernel_path(env)),
        sha256_hex(&kernel_of("20261121", 64 << 10))
    );
    let (code, _, text) = fsck(env, false);
    assert_eq!(code, 0, "{text}");
    counts("full/read-only state dir: 2 faults (ENOSPC, EROFS), served generation kept, store unchanged");
}

#[test]
fn the_daemon_checks_the_store_on_its_schedule_and_repairs_with_a_sync() {
    let r = rack(
        256 << 10,
        "",
        "[store]\nverify_interval = \"1s\"\nverify_repair = true\n",
    );
    let env = &r.env;
    let s = env.serve();
    s.wait_generation(1, Duration::from_secs(30));
    let metric = |name: &str| -> Option<f64> {
        let (_, body) = s.get("/metrics");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
    };
    wait_until(Duration::from_secs(20), "a first clean check", || {
        metric("rackboot_store_problems") == Some(0.0)
    });
    assert!(metric("rackboot_store_verified_timestamp_seconds").unwrap() > 0.0);
    let want = sha256_hex(&kernel_of("20261101", 256 << 10));
    let blob = env.state.join("blobs/sha256").join(&want[..2]).join(&want);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
        f.seek(SeekFrom::Start(7)).unwrap();
        f.write_all(b"\x00\x01").unwrap();
    }
    wait_until(
        Duration::from_secs(20),
        "the check to find the bad blob",
        || metric("rackboot_store_problems").is_some_and(|n| n >= 1.0),
    );
    // The repair quarantined it and started a sync, which fetched it again.
    s.wait_generation(2, Duration::from_secs(30));
    let (code, body) = s.get(KERNEL);
    assert_eq!((code, sha256_hex(&body)), (200, want));
    assert!(s.log_text().contains("store check:"), "{}", s.log_text());
    assert!(s.log_text().contains("does not match its name"));
    wait_until(
        Duration::from_secs(20),
        "a clean check after the sync",
        || metric("rackboot_store_problems") == Some(0.0),
    );
}
