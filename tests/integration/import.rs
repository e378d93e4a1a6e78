//! `rackboot boot-resources import | is-importing | stop-import`, against the running
//! daemon (through its API) and without one (a `rackboot sync` holding the lock).

use std::time::Duration;

use crate::harness::*;
use crate::upstream::*;

fn tmp_parts(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.state.join("tmp"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn import_and_stop_import_through_the_daemon() {
    let r = rack_with_token(1 << 20, "auto = false", "");
    let s = r.env.serve();
    s.wait_synced(1, Duration::from_secs(60));
    let url = s.url("/");
    let res = |op: &str| r.env.ok(&["boot-resources", op, "--url", &url]);
    assert_eq!(res("is-importing").trim(), "false");
    assert_eq!(res("stop-import").trim(), "no import is running");

    // A new version whose kernel comes slowly: `import` starts it, `stop-import`
    // stops it; nothing is published and the partial download is kept.
    r.mirror.fault("boot-kernel", Fault::Throttle(100_000));
    r.publish("20261120", 1 << 20);
    let out = res("import");
    assert!(out.contains("import started"), "{out}");
    wait_until(
        Duration::from_secs(30),
        "the import to be downloading",
        || s.status()["progress"]["bytes_done"].as_u64().unwrap_or(0) > 0,
    );
    assert_eq!(res("is-importing").trim(), "true");
    assert_eq!(res("stop-import").trim(), "stopping the daemon's import");
    wait_until(Duration::from_secs(30), "the import to stop", || {
        s.status()["sync"]["running"] == false
    });
    let st = s.status();
    assert_eq!(st["generation"], 1, "{st}");
    assert_eq!(st["sync"]["last_result"], "failed", "{st}");
    assert!(
        st["sync"]["last_error"]
            .as_str()
            .unwrap()
            .contains("stopped by request"),
        "{st}"
    );
    assert!(
        !tmp_parts(&r.env).is_empty(),
        "the partial kernel stays for the next run"
    );

    // Importing again finishes the job.
    r.mirror.clear_faults();
    res("import");
    s.wait_generation(2, Duration::from_secs(60));

    // Writes need the token: without a token file the CLI says so.
    let cfg = std::fs::read_to_string(&r.env.config).unwrap();
    let no_token: String = cfg
        .lines()
        .filter(|l| !l.starts_with("token_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&r.env.config, no_token).unwrap();
    let err = r.env.fails(&["boot-resources", "import", "--url", &url], 2);
    assert!(err.contains("http.token_file"), "{err}");
}

#[test]
fn stop_import_without_a_daemon_stops_the_running_sync() {
    let env = Env::new();
    let (_key, mirror) = env.signed_upstream(&products("20261101", 1 << 20));
    mirror.fault("boot-kernel", Fault::Throttle(100_000));
    // No daemon listens on this address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.write_config(
        &mirror.url(),
        &["amd64"],
        &format!("[http]\nlisten = [\"127.0.0.1:{port}\"]\n"),
    );
    let sync = env.spawn(&["sync"]);
    let pid = sync.id();
    wait_until(
        Duration::from_secs(30),
        "the sync to be downloading",
        || !tmp_parts(&env).is_empty(),
    );
    assert_eq!(env.ok(&["boot-resources", "is-importing"]).trim(), "true");
    let out = env.ok(&["boot-resources", "stop-import"]);
    assert_eq!(
        out.trim(),
        format!("stopped the sync of pid {pid} (its downloads are kept for the next run)")
    );
    let done = wait_output(sync, Duration::from_secs(30));
    assert!(!done.status.success());
    assert!(!env.state.join("current").exists(), "nothing was published");
    assert_eq!(env.ok(&["boot-resources", "is-importing"]).trim(), "false");
    // Without a daemon, `import` syncs here and resumes the partial download.
    mirror.clear_faults();
    let out = env.ok(&["boot-resources", "import"]);
    assert!(out.contains("synced: generation 1"), "{out}");
}
