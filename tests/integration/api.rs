//! The HTTP API: `sync.auto = false` with an on-demand `POST /api/v1/sync`, and
//! errors that are JSON with a message.

use std::time::Duration;

use crate::harness::*;

#[test]
fn auto_false_pauses_the_periodic_sync_and_post_sync_still_works() {
    let r = rack_with_token(64 << 10, "auto = false\ninterval = \"1s\"", "");
    let s = r.env.serve_synced();
    let st = s.status();
    assert_eq!(st["sync_auto"], false);
    assert!(st["sync"]["next_sync"].is_null(), "{st}");
    r.publish("20261120", 64 << 10);
    r.mirror.clear_log();
    // Three intervals pass: no periodic sync asks the mirror anything.
    std::thread::sleep(Duration::from_secs(3));
    assert!(r.mirror.requests().is_empty(), "{:?}", r.mirror.requests());
    let st = s.status();
    assert_eq!(
        (st["generation"].as_u64(), st["sync"]["runs"].as_u64()),
        (Some(1), Some(1))
    );
    // A write without the token is refused and triggers nothing.
    assert_eq!(curl(&["-X", "POST", &s.url("/api/v1/sync")]).0, 401);
    // With it, the sync runs and publishes the new version.
    let (code, body) = post_sync(&s);
    assert_eq!(code, 202);
    assert_eq!(json(&body)["sync"], "started");
    // Generation 2 is served before the sync that published it has ended (and
    // been counted): wait for both.
    s.wait_synced(2, Duration::from_secs(60));
    assert_eq!(s.get(KERNEL).1, kernel_of("20261120", 64 << 10));
    assert_eq!(s.status()["sync"]["runs"], 2);
    assert!(!r.mirror.requests().is_empty());
}

#[test]
fn api_errors_are_json_with_a_message() {
    let r = rack_with_token(64 << 10, "auto = false", "");
    let s = r.env.serve_synced();
    let auth = format!("Authorization: Bearer {TOKEN}");
    // curl arguments of a request with the token: method, then `extra`, then the URL.
    let authed = |method: &str, extra: &[&str], url: String| -> Vec<String> {
        let head = ["-X", method, "-H", &auth];
        head.iter()
            .chain(extra)
            .map(|a| a.to_string())
            .chain([url])
            .collect()
    };
    let cases: Vec<(Vec<String>, u16, &str)> = vec![
        (vec![s.url("/api/v1/nope")], 404, "no such endpoint"),
        (
            vec!["-X".into(), "POST".into(), s.url("/api/v1/sync")],
            401,
            "missing Authorization",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "Authorization: Bearer wrong".into(),
                s.url("/api/v1/sync"),
            ],
            401,
            "wrong bearer token",
        ),
        (
            vec!["-X".into(), "POST".into(), s.url("/metrics")],
            405,
            "use GET",
        ),
        (
            vec![s.url("/api/v1/sources/9/selections")],
            404,
            "no boot source 9",
        ),
        (
            vec![s.url("/api/v1/machines/not-a-mac")],
            400,
            "not a MAC address",
        ),
        (
            authed("PUT", &["-d", "{not json"], s.url("/api/v1/sources/1")),
            400,
            "not JSON",
        ),
        (
            authed("PUT", &["-d", "[1, 2]"], s.url("/api/v1/sources/1")),
            400,
            "must be a JSON object",
        ),
        (
            authed(
                "PUT",
                &["-d", "{\"nonsense\": 1}"],
                s.url("/api/v1/sources/1"),
            ),
            400,
            "nonsense",
        ),
        (
            authed("DELETE", &[], s.url("/api/v1/sources/7")),
            404,
            "no boot source 7",
        ),
        (
            authed(
                "POST",
                &[
                    "--data-binary",
                    &format!("{{\"x\": \"{}\"}}", "a".repeat(100 << 10)),
                ],
                s.url("/api/v1/sources"),
            ),
            413,
            "request body",
        ),
    ];
    for (args, want_code, want_msg) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&refs);
        assert_eq!(
            code,
            want_code,
            "{args:?}: {}",
            String::from_utf8_lossy(&body)
        );
        let v = json(&body);
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{args:?}: {v}"));
        assert!(
            msg.contains(want_msg),
            "{args:?}: {msg:?} lacks {want_msg:?}"
        );
        assert!(!msg.contains('\n'), "one line: {msg:?}");
    }
    // Without a token file, writes are off: 403 with the setting to change.
    edit_config(&r.env, "token_file", "# token_file");
    drop(s);
    let s = r.env.serve();
    let (code, body) = post_sync(&s);
    assert_eq!(code, 403);
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("http.token_file"));
}
