//! `rackboot status`: against the running daemon, falling back to the state dir, and
//! a sync in progress with how far it got.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::upstream::*;

#[test]
fn status_talks_to_the_running_daemon_and_falls_back_to_the_state_dir() {
    let r = rack_with_token(64 << 10, "auto = false", "");
    let port = free_port();
    edit_config(
        &r.env,
        "[http]\nlisten = [\"127.0.0.1:0\"]",
        &format!("[http]\nlisten = [\"127.0.0.1:{port}\"]"),
    );
    let s = r.env.serve();
    assert_eq!(s.http.port(), port);
    s.wait_generation(1, Duration::from_secs(60));
    // A failing sync shows in the daemon's status (the state dir cannot know it).
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    assert_eq!(post_sync(&s).0, 202);
    wait_until(Duration::from_secs(60), "the failed sync", || {
        s.status()["sync"]["failures"] == 1
    });
    let v = json(r.env.ok(&["status", "--json"]).as_bytes());
    assert_eq!(v["daemon"]["running"], true, "{v}");
    assert_eq!(v["daemon"]["url"], format!("http://127.0.0.1:{port}/"));
    assert_eq!(v["generation"], 1);
    assert_eq!(v["sync"]["runs"], 2, "{v}");
    assert_eq!(v["sync"]["last_result"], "failed");
    assert!(v["sync"]["last_error"].as_str().unwrap().contains("503"));
    assert_eq!(v["sync_auto"], false);
    assert!(v["uptime_s"].is_u64());
    let human = r.env.ok(&["status"]);
    for want in [
        &format!("daemon:       running at http://127.0.0.1:{port}/") as &str,
        "serving:      generation 1 (",
        "last sync:    failed at ",
        "HTTP 503",
        "syncs:        2 runs, 1 failed",
        "auto sync:    paused",
        "sync running: no",
        &format!("source 1:     {}", r.mirror.url()),
    ] {
        assert!(human.contains(want), "{want:?} in:\n{human}");
    }
    // --url names the daemon explicitly; a bad one is a usage error.
    let v = json(
        r.env
            .ok(&["status", "--json", "--url", &s.url("/")])
            .as_bytes(),
    );
    assert_eq!(v["daemon"]["running"], true);
    let err = r.env.fails(&["status", "--url", "ftp://127.0.0.1/"], 2);
    assert!(err.contains("--url") && err.lines().count() == 1, "{err}");
    // Without the daemon: the state dir's view, and why the daemon was not reached.
    let mut s = s;
    s.signal(Signal::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(40)).success());
    let v = json(r.env.ok(&["status", "--json"]).as_bytes());
    assert_eq!(v["daemon"]["running"], false, "{v}");
    assert!(
        v["daemon"]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{port}")),
        "{v}"
    );
    assert_eq!(v["generation"], 1);
    assert!(v["sync"].is_null());
    let human = r.env.ok(&["status"]);
    assert!(human.contains("daemon:       not reachable: "), "{human}");
    assert!(human.contains("serving:      generation 1 ("), "{human}");
}

#[test]
fn status_shows_a_sync_in_progress_and_how_far_it_got() {
    let r = rack_with_token(1 << 20, "auto = false", "");
    let s = r.env.serve_synced();
    assert!(s.status()["progress"].is_null());
    // The next version's kernel comes slowly (about 10 s: room for a loaded machine),
    // and so does its index (a second or two before the plan exists).
    r.mirror.fault("boot-kernel", Fault::Throttle(100_000));
    r.mirror.fault("index.sjson", Fault::Throttle(1_000));
    r.publish("20261120", 1 << 20);
    assert_eq!(post_sync(&s).0, 202);
    // From its start the sync shows its own progress, not the last sync's figures.
    let mut st = serde_json::Value::Null;
    wait_until(Duration::from_secs(10), "the sync to start", || {
        st = s.status();
        st["sync_running"] == true
    });
    let p = &st["progress"];
    assert!(
        p["bytes_total"] == 0 || p["bytes_done"] != p["bytes_total"],
        "the last sync's progress: {st}"
    );
    wait_until(
        Duration::from_secs(30),
        "a sync in progress with bytes done",
        || {
            st = s.status();
            st["progress"]["bytes_done"].as_u64().unwrap_or(0) > 0
        },
    );
    assert_eq!(st["sync"]["running"], true, "{st}");
    assert_eq!(st["sync_running"], true, "{st}");
    let p = &st["progress"];
    assert!(p["bytes_total"].as_u64().unwrap() >= 1 << 20, "{st}");
    assert!(p["files_total"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        p["bytes_done"].as_u64().unwrap() < p["bytes_total"].as_u64().unwrap(),
        "{st}"
    );
    // The CLI shows it too.
    let human = r.env.ok(&["status", "--url", &s.url("/")]);
    assert!(human.contains("sync running: yes, "), "{human}");
    s.wait_generation(2, Duration::from_secs(60));
    // The new generation is served from the moment it is published; the sync then
    // collects garbage and writes its state before it counts as finished.
    wait_until(Duration::from_secs(30), "the sync to finish", || {
        s.status()["sync"]["running"] == false
    });
    let st = s.status();
    assert!(st["progress"].is_null(), "{st}");
    assert_eq!(st["sync"]["running"], false);
    assert_eq!(st["sync"]["last_result"], "ok");
}
