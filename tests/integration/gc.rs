//! Garbage collection against open files: an old snapshot is kept while a transfer
//! holds it and collected after; small files kept open follow the generation.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::*;
use crate::upstream::*;

#[test]
fn an_old_snapshot_is_kept_while_a_transfer_holds_it_and_collected_after() {
    let size = 8 << 20;
    let r = rack_with_token(size, "auto = false", "");
    let s = r.env.serve_synced();
    // A client asks for the kernel of generation 1 and reads nothing yet: the file
    // is larger than the socket buffers, so its transfer stays open.
    let mut stalled = TcpStream::connect(s.http).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stalled
        .write_all(format!("GET {KERNEL} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    wait_until(Duration::from_secs(20), "the transfer to start", || {
        s.metric("rackboot_http_transfers_in_flight") == 1.0
    });
    // Two new generations are published meanwhile.
    for (generation, version) in [(2, "20261120"), (3, "20261201")] {
        r.publish(version, size);
        assert_eq!(post_sync(&s).0, 202);
        // Served as soon as published; collected after, before the sync ends.
        s.wait_synced(generation, Duration::from_secs(60));
    }
    let snapshots = r.env.state.join("snapshots");
    assert!(
        snapshots.join("1").is_dir(),
        "generation 1 is in use and kept"
    );
    assert!(
        !snapshots.join("2").exists(),
        "generation 2 was never used and is collected"
    );
    // The held transfer ends with generation 1's bytes.
    let (head, body) = read_response(&mut stalled);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(sha256_hex(&body), sha256_hex(&kernel_of("20261101", size)));
    drop(stalled);
    wait_until(Duration::from_secs(20), "the transfer to end", || {
        s.metric("rackboot_http_transfers_in_flight") == 0.0
    });
    // The next published generation collects it.
    r.publish("20261215", size);
    assert_eq!(post_sync(&s).0, 202);
    s.wait_synced(4, Duration::from_secs(60));
    assert!(!snapshots.join("1").exists(), "generation 1 is collected");
    assert_eq!(s.get(KERNEL).1, kernel_of("20261215", size));
}

/// The server's open descriptors that point at deleted files.
fn deleted_open_files(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy().into_owned();
            if t.ends_with(" (deleted)") {
                out.push(t);
            }
        }
    }
    out
}

#[test]
fn small_files_kept_open_follow_the_generation_and_are_let_go_of() {
    // Small snapshot files stay open between requests (a per-thread cache); a new
    // generation must be served at once, and the old one's files released even
    // when no request comes after the switch.
    let size = 64 << 10;
    let r = rack_with_token(size, "auto = false", "");
    let s = r.env.serve_synced();
    // Many requests, on several connections, so every connection thread opens it.
    for _ in 0..8 {
        assert_eq!(s.get(KERNEL).1, kernel_of("20261101", size));
        assert_eq!(s.get("/maas.meta").0, 200);
    }
    for (generation, version) in [(2, "20261120"), (3, "20261201")] {
        r.publish(version, size);
        assert_eq!(post_sync(&s).0, 202);
        s.wait_generation(generation, Duration::from_secs(60));
        // The new bytes at once, never the cached old ones.
        for _ in 0..8 {
            assert_eq!(s.get(KERNEL).1, kernel_of(version, size), "{version}");
        }
    }
    let snapshots = r.env.state.join("snapshots");
    assert!(!snapshots.join("1").exists(), "generation 1 is collected");
    // Generation 3's files were fetched last. Two more generations are published
    // (the sync that publishes 5 collects 3) with no request in between: the
    // threads let go of generation 3's files by themselves.
    for (generation, version) in [(4, "20261215"), (5, "20261224")] {
        r.publish(version, size);
        assert_eq!(post_sync(&s).0, 202);
        s.wait_generation(generation, Duration::from_secs(60));
    }
    assert!(!snapshots.join("3").exists(), "generation 3 is collected");
    let mut open = Vec::new();
    wait_until(Duration::from_secs(30), "no open deleted files", || {
        open = deleted_open_files(s.pid());
        if !open.is_empty() {
            eprintln!("still open: {open:?}");
        }
        open.is_empty()
    });
    assert_eq!(s.get(KERNEL).1, kernel_of("20261224", size));
}
