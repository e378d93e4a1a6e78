//! `/metrics`: every family is there and moves with traffic and syncs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::*;
use crate::upstream::*;

#[test]
fn metrics_have_every_family_and_move_with_traffic_and_syncs() {
    // The kernel is larger than loopback's socket buffers, so a client that does not
    // read keeps its transfer in flight.
    let size = 8 << 20;
    let r = rack_with_token(size, "auto = false", "");
    let s = r.env.serve_synced();
    let m0 = s.metrics();
    for family in [
        "rackboot_tftp_requests",
        "rackboot_tftp_sent_bytes",
        "rackboot_tftp_errors",
        "rackboot_tftp_tsize_probes",
        "rackboot_tftp_transfers_in_flight",
        "rackboot_http_requests",
        "rackboot_http_file_requests",
        "rackboot_http_sent_bytes",
        "rackboot_http_errors",
        "rackboot_http_transfers_in_flight",
        "rackboot_http_connections_open",
        "rackboot_sync_runs",
        "rackboot_sync_failures",
        "rackboot_sync_duration_milliseconds",
        "rackboot_sync_fetched_bytes",
        "rackboot_snapshot_generation",
        "rackboot_snapshot_age_seconds",
    ] {
        assert!(
            m0.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{m0}"
        );
    }
    assert!(m0.trim_end().ends_with("# EOF"), "OpenMetrics text");
    assert_eq!(metric(&m0, "rackboot_snapshot_generation"), 1.0);
    assert!(metric(&m0, "rackboot_snapshot_age_seconds") >= 0.0);
    assert_eq!(metric(&m0, "rackboot_sync_runs_total"), 1.0);
    assert_eq!(metric(&m0, "rackboot_sync_failures_total"), 0.0);
    let fetched0 = metric(&m0, "rackboot_sync_fetched_bytes_total");
    assert!(fetched0 >= size as f64, "the first sync fetched the kernel");

    // HTTP: one kernel, one 404, one 416, one 431; each lands in its place.
    let kernel = kernel_of("20261101", size);
    assert_eq!(s.get(KERNEL).1, kernel);
    assert_eq!(s.get("/no/such/file").0, 404);
    assert_eq!(curl(&["-r", "99999999-", &s.url(KERNEL)]).0, 416);
    let big = format!("X-Big: {}", "a".repeat(20 << 10));
    assert_eq!(curl(&["-H", &big, &s.url(KERNEL)]).0, 431);
    // TFTP: one kernel and one tsize probe (curl asks for tsize, then transfers).
    curl_fetch(
        &format!("tftp://{}{KERNEL}", s.tftp),
        &[],
        "the kernel over TFTP",
    );
    let m1 = s.metrics();
    let delta = |sample: &str| metric(&m1, sample) - metric(&m0, sample);
    assert_eq!(
        delta("rackboot_http_file_requests_total{class=\"kernel\"}"),
        1.0
    );
    assert_eq!(
        delta("rackboot_http_sent_bytes_total{class=\"kernel\"}"),
        kernel.len() as f64
    );
    assert_eq!(delta("rackboot_http_errors_total{kind=\"not_found\"}"), 1.0);
    assert_eq!(
        delta("rackboot_http_errors_total{kind=\"range_not_satisfiable\"}"),
        1.0
    );
    assert_eq!(
        delta("rackboot_http_errors_total{kind=\"header_too_large\"}"),
        1.0
    );
    assert!(delta("rackboot_http_requests_total") >= 4.0);
    assert_eq!(delta("rackboot_tftp_requests_total{class=\"kernel\"}"), 1.0);
    // (At least: a retransmitted block counts again.)
    assert!(delta("rackboot_tftp_sent_bytes_total{class=\"kernel\"}") >= kernel.len() as f64);
    assert_eq!(metric(&m1, "rackboot_http_transfers_in_flight"), 0.0);

    // A transfer in flight shows as one until its client goes away.
    let mut stalled = TcpStream::connect(s.http).unwrap();
    stalled
        .write_all(format!("GET {KERNEL} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    wait_until(
        Duration::from_secs(20),
        "one HTTP transfer in flight",
        || s.metric("rackboot_http_transfers_in_flight") == 1.0,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.metric("rackboot_http_transfers_in_flight"), 1.0);
    drop(stalled);
    wait_until(
        Duration::from_secs(20),
        "no HTTP transfer in flight",
        || s.metric("rackboot_http_transfers_in_flight") == 0.0,
    );

    // Syncs: a new version counts a run and its bytes; a broken upstream a failure.
    r.publish("20261120", size);
    assert_eq!(post_sync(&s).0, 202);
    s.wait_generation(2, Duration::from_secs(60));
    // The daemon follows `current` and may serve generation 2 before the sync that
    // published it has finished and been counted.
    wait_until(Duration::from_secs(30), "the sync to be counted", || {
        s.metric("rackboot_sync_runs_total") == 2.0
    });
    let m2 = s.metrics();
    assert_eq!(metric(&m2, "rackboot_sync_runs_total"), 2.0);
    assert_eq!(metric(&m2, "rackboot_snapshot_generation"), 2.0);
    assert!(metric(&m2, "rackboot_sync_fetched_bytes_total") >= fetched0 + size as f64);
    assert!(
        metric(&m2, "rackboot_sync_duration_milliseconds_total")
            >= metric(&m0, "rackboot_sync_duration_milliseconds_total")
    );
    r.mirror.fault("streams/v1/index.sjson", Fault::Status(503));
    assert_eq!(post_sync(&s).0, 202);
    wait_until(Duration::from_secs(60), "the failed sync", || {
        s.metric("rackboot_sync_failures_total") == 1.0
    });
    let m3 = s.metrics();
    assert_eq!(metric(&m3, "rackboot_sync_runs_total"), 3.0);
    assert_eq!(metric(&m3, "rackboot_sync_last_success"), 0.0);
    assert_eq!(metric(&m3, "rackboot_snapshot_generation"), 2.0);
}
