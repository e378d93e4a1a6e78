//! The daemon serves exactly what `current` names, whoever switched it, and GC never
//! removes what a daemon serves: `rackboot sync` beside `rackboot serve`, failures
//! after publish, a held sync lock, SIGHUP with a new `state_dir`, file modes, an
//! unreadable `current`, and `rackboot mirror` twice into one DEST.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::upstream::*;

const SIZE: usize = 256 << 10;
const VERSIONS: [&str; 2] = ["20261101", "20261120"];

/// Waits (at most 1 s) until the API reports the generation `current` names.
fn assert_follows_current(s: &Served, env: &Env, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let want = env.current_generation();
        let got = s.status()["generation"].as_u64();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the API reports generation {got:?} but current names {want:?} after 1 s\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fetches the kernel and `pxelinux.cfg/default` over and over until stopped;
/// records every answer that is not a 200 with the bytes of one of the versions.
struct Client {
    stop: Arc<AtomicBool>,
    bad: Arc<Mutex<Vec<String>>>,
    fetches: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(s: &Served) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let fetches = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let good: Vec<String> = VERSIONS
            .iter()
            .map(|v| sha256_hex(&kernel_of(v, SIZE)))
            .collect();
        let (kernel, cfg) = (s.url(KERNEL), s.url("/pxelinux.cfg/default"));
        let thread = {
            let (stop, bad, fetches) = (stop.clone(), bad.clone(), fetches.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (code, body) = curl(&[&kernel]);
                    if code != 200 || !good.contains(&sha256_hex(&body)) {
                        bad.lock().unwrap().push(format!(
                            "kernel: HTTP {code}, {} bytes, sha256 {}",
                            body.len(),
                            sha256_hex(&body)
                        ));
                    }
                    let (code, _) = curl(&[&cfg]);
                    if code != 200 {
                        bad.lock()
                            .unwrap()
                            .push(format!("pxelinux.cfg/default: HTTP {code}"));
                    }
                    fetches.fetch_add(2, Ordering::Relaxed);
                }
            })
        };
        Client {
            stop,
            bad,
            fetches,
            thread: Some(thread),
        }
    }

    /// Stops the client; asserts every answer was good; returns the fetch count.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let bad = self.bad.lock().unwrap();
        assert!(
            bad.is_empty(),
            "{} bad answers: {:?}",
            bad.len(),
            &bad[..bad.len().min(10)]
        );
        self.fetches.load(Ordering::Relaxed)
    }
}

fn publish_version(r: &Rack, i: usize) {
    r.publish(VERSIONS[i % 2], SIZE);
}

/// At most this many snapshots on disk during the loops: `current`, the one a
/// transfer still reads, and one per HTTP thread whose cache of open files still
/// holds an older generation (for up to 5 s).
fn snapshot_bound() -> usize {
    3 + std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Snapshots on disk (directories under `snapshots/`).
fn snapshot_count(env: &Env) -> usize {
    std::fs::read_dir(env.state.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .count()
}

#[test]
fn cli_syncs_beside_a_serving_daemon_never_break_a_download() {
    let r = rack(SIZE, "auto = false", "");
    let s = r.env.serve_synced();
    let client = Client::start(&s);
    // A slow download of the first generation spans several syncs.
    let slow = SlowDownload::start(&s.url(KERNEL), "64K");
    for i in 1..=20 {
        publish_version(&r, i);
        r.env.ok(&["sync"]);
        assert_follows_current(&s, &r.env, &format!("after CLI sync {i}"));
        assert!(
            snapshot_count(&r.env) <= snapshot_bound(),
            "snapshots pile up"
        );
    }
    assert_eq!(
        sha256_hex(&slow.finish(Duration::from_secs(60))),
        sha256_hex(&kernel_of(VERSIONS[0], SIZE)),
        "the slow download kept its generation's bytes"
    );
    let n = client.finish();
    assert!(n > 20, "the client made only {n} requests");
    let (code, body) = s.get(KERNEL);
    assert_eq!(
        (code, sha256_hex(&body)),
        (200, sha256_hex(&kernel_of(VERSIONS[0], SIZE)))
    );
}

/// Makes the next sync fail at `step`; returns what undoes it.
fn inject(env: &Env, step: usize) -> Box<dyn FnOnce()> {
    match step {
        // catalog.json cannot be replaced: the write after publish fails.
        0 => {
            let p = env.state.join("catalog.json");
            let _ = std::fs::remove_file(&p);
            std::fs::create_dir_all(p.join("x")).unwrap();
            Box::new(move || std::fs::remove_dir_all(&p).unwrap())
        }
        // GC finds a directory where a blob file is expected: it fails after
        // publish and before the small writes.
        1 => {
            let p = env.state.join("blobs/sha256/00/not-a-blob");
            std::fs::create_dir_all(p.join("x")).unwrap();
            Box::new(move || std::fs::remove_dir_all(&p).unwrap())
        }
        // state.json is a directory: the run fails reading its state.
        2 => {
            let p = env.state.join("state.json");
            let saved = std::fs::read(&p).ok();
            let _ = std::fs::remove_file(&p);
            std::fs::create_dir_all(p.join("x")).unwrap();
            Box::new(move || {
                std::fs::remove_dir_all(&p).unwrap();
                if let Some(b) = saved {
                    std::fs::write(&p, b).unwrap();
                }
            })
        }
        _ => Box::new(|| {}),
    }
}

#[test]
fn fifty_syncs_with_failures_after_publish_keep_serving_what_current_names() {
    let r = rack_with_token(SIZE, "auto = false", "");
    let s = r.env.serve_synced();
    let client = Client::start(&s);
    let started = Instant::now();
    let mut failed = 0;
    let mut most = 0;
    for i in 1..=50 {
        publish_version(&r, i);
        let undo = inject(&r.env, i % 4);
        if i % 5 == 0 {
            // The daemon's own sync (the API's trigger).
            let runs = s.status()["sync"]["runs"].as_u64().unwrap();
            let (code, _) = post_sync(&s);
            assert!(code == 200 || code == 202, "POST /api/v1/sync: {code}");
            wait_until(Duration::from_secs(30), "the daemon's sync", || {
                s.status()["sync"]["runs"].as_u64().unwrap() > runs
            });
            if s.status()["sync"]["last_result"] == "failed" {
                failed += 1;
            }
        } else if !r.env.run(&["sync"]).status.success() {
            failed += 1;
        }
        assert_follows_current(&s, &r.env, &format!("sync {i} (fault {})", i % 4));
        undo();
        let n = snapshot_count(&r.env);
        assert!(n <= snapshot_bound(), "sync {i}: {n} snapshots on disk");
        most = most.max(n);
    }
    // A clean run after the faults: GC brings the store back to one snapshot.
    publish_version(&r, 0);
    r.env.ok(&["sync"]);
    assert_follows_current(&s, &r.env, "the last sync");
    let n = client.finish();
    assert!(
        failed >= 30,
        "only {failed} of 50 syncs failed: the faults did not bite"
    );
    assert!(n > 50, "the client made only {n} requests");
    let (code, body) = s.get(KERNEL);
    assert_eq!(
        (code, sha256_hex(&body)),
        (200, sha256_hex(&kernel_of(VERSIONS[0], SIZE)))
    );
    eprintln!(
        "50 syncs ({failed} failed) with {n} fetches in {:.1} s, at most {most} snapshots",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_failed_write_after_publish_is_served_and_the_next_sync_collects() {
    let r = rack_with_token(SIZE, "auto = false", "");
    let s = r.env.serve_synced();
    publish_version(&r, 1);
    let undo = inject(&r.env, 0);
    let (code, _) = post_sync(&s);
    assert!(code == 200 || code == 202);
    wait_until(Duration::from_secs(30), "the failed sync", || {
        s.status()["sync"]["last_result"] == "failed"
    });
    assert_follows_current(&s, &r.env, "a catalog write failed after publish");
    assert_eq!(s.status()["generation"], 2);
    let (_, body) = s.get(KERNEL);
    assert_eq!(sha256_hex(&body), sha256_hex(&kernel_of(VERSIONS[1], SIZE)));
    undo();
    // Generation 1 is released once no request (nor an HTTP thread's cache of open
    // files, kept up to 5 s) holds it; the daemon's registration then names only 2.
    let reg = r.env.state.join("serving").join(s.pid().to_string());
    wait_until(
        Duration::from_secs(10),
        "generation 1 to be released",
        || std::fs::read_to_string(&reg).is_ok_and(|t| t == "2\n"),
    );
    // Nothing new upstream: the next sync completes the writes and collects.
    let (code, _) = post_sync(&s);
    assert!(code == 200 || code == 202);
    wait_until(Duration::from_secs(30), "the next sync", || {
        s.status()["sync"]["last_result"] == "unchanged"
    });
    assert!(r.env.state.join("catalog.json").is_file());
    assert_eq!(snapshot_count(&r.env), 1);
}

/// `rackboot serve` with a single async worker thread (as on a one-CPU machine).
fn serve_one_worker(env: &Env) -> Served {
    let log = env.dir.path().join("serve-one-worker.log");
    let child = env
        .command(&["serve"])
        .env("RACKBOOT_LOG", "info,rackboot=debug")
        .env("TOKIO_WORKER_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut s = Served {
        child: Some(child),
        log,
        tftp: "0.0.0.0:0".parse().unwrap(),
        http: "0.0.0.0:0".parse().unwrap(),
    };
    let addr = |text: &str, what: &str| -> Option<std::net::SocketAddr> {
        text.lines()
            .find_map(|l| l.split(&format!("listening for {what} on ")).nth(1))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    wait_until(Duration::from_secs(30), "serve to listen", || {
        let text = s.log_text();
        match (addr(&text, "TFTP"), addr(&text, "HTTP")) {
            (Some(t), Some(h)) if text.ends_with('\n') => {
                (s.tftp, s.http) = (t, h);
                true
            }
            _ => false,
        }
    });
    s
}

#[test]
fn a_held_sync_lock_blocks_no_worker_and_stop_and_sigterm_end_the_wait() {
    let r = rack_with_token(SIZE, "auto = false", "");
    r.env.ok(&["sync"]);
    // An outside process holds the sync lock while the daemon starts (and syncs).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(r.env.state.join("lock"))
        .unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let mut s = serve_one_worker(&r.env);
    wait_until(
        Duration::from_secs(10),
        "the sync to wait for the lock",
        || s.log_text().contains("another sync is running"),
    );
    // Serving goes on: HTTP and TFTP answer at once.
    let t = Instant::now();
    let (code, _) = s.get(KERNEL);
    assert_eq!(code, 200);
    let out = run_client(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("tftp://{}/pxelinux.0", s.tftp),
        ],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "TFTP: {out:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "answers took {:?}",
        t.elapsed()
    );
    // sync/stop ends the wait.
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &s.url("/api/v1/sync/stop"),
    ]);
    assert!(
        code == 200 || code == 202,
        "{code}: {}",
        String::from_utf8_lossy(&body)
    );
    wait_until(Duration::from_secs(5), "the waiting sync to stop", || {
        s.status()["sync"]["running"] == false
    });
    let st = s.status();
    assert!(
        st["sync"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("stopped by request"),
        "{st}"
    );
    // Another sync waits again; SIGTERM ends the daemon at once.
    let (code, _) = post_sync(&s);
    assert!(code == 200 || code == 202);
    wait_until(Duration::from_secs(5), "the second sync to wait", || {
        s.status()["sync"]["running"] == true
    });
    let t = Instant::now();
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    drop(held);
}

#[test]
fn sighup_with_a_new_state_dir_keeps_the_old_one_until_restart() {
    let r = rack(SIZE, "auto = false", "");
    let s = r.env.serve_synced();
    let other = r.env.dir.path().join("other-state");
    edit_config(
        &r.env,
        &format!("state_dir = \"{}\"", r.env.state.display()),
        &format!("state_dir = \"{}\"", other.display()),
    );
    let runs = s.status()["sync"]["runs"].as_u64().unwrap();
    s.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(30), "the sync after the reload", || {
        s.status()["sync"]["runs"].as_u64().unwrap() > runs
    });
    assert!(
        s.log_text().contains("state_dir changed"),
        "{}",
        s.log_text()
    );
    assert!(
        !other.exists(),
        "the new state_dir was used before a restart"
    );
    let (code, body) = s.get("/api/v1/sources");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(s.status()["generation"], 1);
}

#[test]
fn files_written_as_root_keep_the_state_dirs_owner_and_intended_modes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (files written as root beside a daemon's user)");
        return;
    }
    let r = rack(SIZE, "auto = false", "");
    std::fs::create_dir_all(&r.env.state).unwrap();
    let nobody = 65534;
    std::os::unix::fs::chown(&r.env.state, Some(nobody), Some(nobody)).unwrap();
    // The state dir's owner must reach it (a temp dir is 0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(r.env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // umask 022, as a login shell has.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 022; exec {BIN} --config {} sync",
            r.env.config.display()
        ))
        .output()
        .unwrap();
    assert_success(&out, "sync under umask 022");
    r.env
        .ok(&["machines", "set", "52:54:00:12:34:56", "local_boot=true"]);
    for name in [
        "sources.json",
        "state.json",
        "catalog.json",
        "machines.json",
    ] {
        let m = std::fs::metadata(r.env.state.join(name)).unwrap();
        assert_eq!(m.mode() & 0o777, 0o640, "{name}");
        assert_eq!((m.uid(), m.gid()), (nobody, nobody), "{name}");
    }
    // What the sync created belongs to the state dir's owner: the daemon running as
    // that user can open, replace and collect it.
    for name in [
        "lock",
        "gc.lock",
        "blobs/sha256",
        "snapshots/1",
        "snapshots/1.json",
        "tmp",
    ] {
        let m = std::fs::metadata(r.env.state.join(name)).unwrap();
        assert_eq!(m.uid(), nobody, "{name}");
    }
    // Every served file (kernels, bootloader members) is world-readable.
    let snap = std::fs::canonicalize(r.env.current()).unwrap();
    let mut dirs = vec![snap];
    let mut files = 0;
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                dirs.push(e.path());
            } else if m.is_file() {
                files += 1;
                assert_eq!(m.mode() & 0o444, 0o444, "{}", e.path().display());
            }
        }
    }
    assert!(files > 3, "{files} files");
}

#[test]
fn an_unreadable_current_manifest_serves_the_newest_complete_generation() {
    let r = rack(SIZE, "auto = false", "");
    r.env.ok(&["sync"]);
    // Keep generation 1 aside (a plain sync collects it), then publish 2.
    let snaps = r.env.state.join("snapshots");
    let aside = r.env.dir.path().join("aside");
    std::fs::create_dir_all(&aside).unwrap();
    // Generation 1 (its tree and manifest) copied from one directory to another.
    let copy_gen1 = |from: &std::path::Path, to: &std::path::Path| {
        assert!(std::process::Command::new("cp")
            .args(["-a"])
            .arg(from.join("1"))
            .arg(from.join("1.json"))
            .arg(to)
            .status()
            .unwrap()
            .success());
    };
    copy_gen1(&snaps, &aside);
    publish_version(&r, 1);
    r.env.ok(&["sync"]);
    assert_eq!(r.env.current_generation(), Some(2));
    copy_gen1(&aside, &snaps);
    std::fs::write(snaps.join("2.json"), b"{ not json").unwrap();
    // Leftovers of a crash: removed at start.
    let stray = r.env.state.join("tmp/snapshot-9");
    std::fs::create_dir_all(stray.join("x")).unwrap();
    // The upstream is down: the start sync fails and serving must not depend on it.
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    let s = r.env.serve();
    assert_eq!(s.status()["generation"], 1, "{}", s.log_text());
    let (code, body) = s.get(KERNEL);
    assert_eq!(
        (code, sha256_hex(&body)),
        (200, sha256_hex(&kernel_of(VERSIONS[0], SIZE)))
    );
    assert!(
        s.log_text().contains("the newest complete one"),
        "{}",
        s.log_text()
    );
    assert!(!stray.exists(), "tmp/snapshot-9 was left");
}

#[test]
fn import_does_not_sync_locally_when_a_daemon_serves_but_does_not_answer() {
    let r = rack_with_token(SIZE, "auto = false", "");
    let s = r.env.serve_synced();
    publish_version(&r, 1);
    let err = r.env.fails(
        &["boot-resources", "import", "--url", "http://127.0.0.1:9/"],
        1,
    );
    assert!(
        err.contains("did not answer") && err.contains("not importing here"),
        "{err}"
    );
    assert_eq!(r.env.current_generation(), Some(1), "a local sync ran");
    // Without a daemon, import still syncs here.
    drop(s);
    r.env
        .ok(&["boot-resources", "import", "--url", "http://127.0.0.1:9/"]);
    assert_eq!(r.env.current_generation(), Some(2));
}

#[test]
fn two_mirrors_into_one_dest_the_second_is_refused() {
    let env = Env::new();
    let (_key, m) = env.signed_upstream(&products(VERSIONS[0], 4 << 20));
    m.fault("boot-kernel", Fault::Throttle(1 << 20));
    let dest = env.dir.path().join("dest");
    let url = format!("{}streams/v1/index.sjson", m.url());
    let args = |env: &Env| {
        let mut c = env.command(&["mirror", "--keyring", env.keyring.to_str().unwrap()]);
        c.arg(&url).arg(&dest);
        c
    };
    // Leftovers of an interrupted run's atomic writes: removed under the lock.
    let strays = [
        dest.join(".data/.tmp-a1b2c3"),
        dest.join("streams/v1/.tmp-d4e5f6"),
    ];
    for p in &strays {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"half").unwrap();
    }
    let first = args(&env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the first mirror to lock DEST",
        || {
            std::fs::File::open(dest.join(".data/lock")).is_ok_and(|f| {
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
            })
        },
    );
    let second = args(&env).output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another rackboot mirror"), "{err}");
    let first = wait_output(first, Duration::from_secs(60));
    assert_success(&first, "the first mirror");
    assert!(dest.join(".data/references.json").is_file());
    for p in &strays {
        assert!(!p.exists(), "{} was left", p.display());
    }
    // Metadata is world-readable.
    let m = std::fs::metadata(dest.join("streams/v1/index.sjson")).unwrap();
    assert_eq!(m.mode() & 0o444, 0o444);
}
