//! `rackboot serve` over TFTP against hostile clients (issue 10): a `timeout=255` flood
//! from one address, a netascii transfer with a huge window and a partial ACK, netascii
//! requests of a large file, and a spoofed RRQ nobody acknowledges. Raw UDP sockets on
//! 127.0.0.x drive the real binary.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use rackboot::tftp::packet::{self, Packet};

use crate::harness::*;
use crate::upstream::*;

/// A 6000-byte bootloader file in the served tree (`payload(4, 6000)`).
const SMALL: &str = "grubx64.efi";

/// RFC 1350 netascii of `data` (LF → CR LF, CR → CR NUL).
fn netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

/// A complete download (blksize 512, no options) in `mode`; panics on an ERROR or
/// when nothing comes for 5 s.
fn download(server: SocketAddr, local: &str, name: &str, mode: &str) -> Vec<u8> {
    let sock = client(local, Duration::from_secs(5));
    sock.send_to(&packet::rrq(name, mode, &[]), server).unwrap();
    let (first, peer) = recv(&sock, &format!("DATA 1 of {name}"));
    finish_download(&sock, first, peer, || {})
}

/// Row 5: one address sends far more RRQs than there are transfer slots, each asking
/// `timeout=255`. The address gets at most `max_transfers_per_client` of them (the
/// rest an ERROR), the OACK honours at most 10 s, unacknowledged transfers end within
/// seconds, and another machine is served meanwhile.
#[test]
fn a_timeout_255_flood_from_one_address_does_not_starve_another() {
    let r = listen_rack(&["127.0.0.1:0"], "max_transfers = 80");
    let s = &r.served;
    let mut flood = vec![];
    for _ in 0..200 {
        let sock = client("127.0.0.2:0", Duration::from_secs(5));
        sock.send_to(
            &packet::rrq(KERNEL, "octet", &[("timeout", "255"), ("tsize", "0")]),
            s.tftp,
        )
        .unwrap();
        flood.push(sock);
    }
    // Every flooder hears back: an OACK (timeout capped) or a "busy" ERROR.
    let (mut oacks, mut refused) = (0, 0);
    for sock in &flood {
        let (pkt, _) = recv(sock, "a reply to the flood");
        match packet::parse(&pkt).unwrap() {
            Packet::Oack { options } => {
                oacks += 1;
                let t: u64 = options
                    .iter()
                    .find(|(k, _)| k == "timeout")
                    .map(|(_, v)| v.parse().unwrap())
                    .expect("timeout in the OACK");
                assert!(t <= 10, "OACK honours timeout {t}");
            }
            Packet::Error { message, .. } => {
                assert!(message.contains("busy"), "{message}");
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (oacks, refused),
        (64, 136),
        "one address runs tftp.max_transfers_per_client (64) transfers"
    );
    // Another machine gets the whole kernel while the flood's transfers hold slots.
    let got = download(s.tftp, "127.0.0.3:0", KERNEL, "octet");
    assert_eq!(got.len(), LISTEN_RACK_KERNEL);
    wait_until(Duration::from_secs(10), "the per-client log line", || {
        s.log_text().contains("tftp.max_transfers_per_client")
    });
    // Nobody ACKed the flood's OACKs: those transfers end within 2 × 2.5 s.
    let start = Instant::now();
    wait_until(
        Duration::from_secs(8),
        "the unacknowledged transfers to end",
        || s.metric("rackboot_tftp_transfers_in_flight") == 0.0,
    );
    eprintln!(
        "flood transfers ended {:?} after the download",
        start.elapsed()
    );
    // The address is free again.
    let again = download(s.tftp, "127.0.0.2:0", SMALL, "octet");
    assert_eq!(again, payload(4, 6000));
}

/// Row 7: netascii with a window larger than the converter keeps checkpoints for,
/// then a partial ACK: the resent block is right and the server keeps serving.
#[test]
fn netascii_with_a_huge_window_and_a_partial_ack_does_not_kill_the_server() {
    let r = listen_rack(&["127.0.0.1:0"], "max_windowsize = 256");
    let s = &r.served;
    let want = netascii(&payload(4, 6000));
    let sock = client("127.0.0.1:0", Duration::from_secs(5));
    sock.send_to(
        &packet::rrq(
            SMALL,
            "netascii",
            &[("blksize", "8"), ("windowsize", "256"), ("tsize", "0")],
        ),
        s.tftp,
    )
    .unwrap();
    let (oack, peer) = recv(&sock, "OACK");
    let Ok(Packet::Oack { options }) = packet::parse(&oack) else {
        panic!("expected an OACK: {oack:?}");
    };
    assert!(options.contains(&("windowsize".into(), "256".into())));
    assert!(options.contains(&("tsize".into(), want.len().to_string())));
    sock.send_to(&packet::ack(0), peer).unwrap();
    // The whole first window: blocks 1..=256.
    let mut last = 0;
    while last < 256 {
        let (pkt, _) = recv(&sock, "the first window");
        if let Ok(Packet::Data { block, data }) = packet::parse(&pkt) {
            let off = (usize::from(block) - 1) * 8;
            assert_eq!(data, &want[off..off + 8], "block {block}");
            last = last.max(block);
        }
    }
    // A partial ACK: the window restarts at block 2.
    sock.send_to(&packet::ack(1), peer).unwrap();
    // Under load the server may have retransmitted the first window before it saw
    // the ACK: those copies can still be queued (at most one window of them).
    let mut got2 = false;
    for _ in 0..=2 * 256 {
        let (pkt, _) = recv(&sock, "DATA 2 after the partial ACK");
        match packet::parse(&pkt).unwrap() {
            Packet::Data { block: 2, data } => {
                assert_eq!(data, &want[8..16]);
                got2 = true;
                break;
            }
            Packet::Data { block, data } => {
                let off = (usize::from(block) - 1) * 8;
                assert_eq!(data, &want[off..off + 8], "block {block}");
            }
            other => panic!("expected DATA 2, got {other:?}"),
        }
    }
    assert!(got2, "no DATA 2 after the partial ACK");
    sock.send_to(&packet::error(0, "enough"), peer).unwrap();
    // Still serving, on every transfer thread.
    for i in 0..6 {
        assert_eq!(
            download(s.tftp, "127.0.0.1:0", SMALL, "octet"),
            payload(4, 6000),
            "download {i} after the partial ACK"
        );
    }
    assert_eq!(download(s.tftp, "127.0.0.1:0", SMALL, "netascii"), want);
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

/// Row 8: netascii requests of a large file are refused at once (no scan of the file
/// on a transfer thread), while an octet download of the same file runs on.
#[test]
fn netascii_requests_of_a_large_file_are_refused_without_reading_it() {
    let r = listen_rack(&["127.0.0.1:0"], "");
    let s = &r.served;
    // An octet download in progress: its first block is in.
    let dl = client("127.0.0.1:0", Duration::from_secs(5));
    dl.send_to(&packet::rrq(KERNEL, "octet", &[]), s.tftp)
        .unwrap();
    let (first, peer) = recv(&dl, "DATA 1");
    let Ok(Packet::Data { block: 1, data }) = packet::parse(&first) else {
        panic!("expected DATA 1");
    };
    let mut got = data.to_vec();
    // 40 netascii readers of the 3 MiB kernel: each gets an ERROR naming octet mode
    // (the old server scanned the whole file for tsize before answering each one).
    let readers: Vec<UdpSocket> = (0..40)
        .map(|_| {
            let c = client("127.0.0.4:0", Duration::from_secs(5));
            c.send_to(&packet::rrq(KERNEL, "netascii", &[("tsize", "0")]), s.tftp)
                .unwrap();
            c
        })
        .collect();
    for c in &readers {
        let (pkt, _) = recv(c, "an answer to a netascii RRQ");
        match packet::parse(&pkt).unwrap() {
            Packet::Error { message, .. } => {
                assert!(message.contains("octet"), "{message}")
            }
            other => panic!("expected an ERROR, got {other:?}"),
        }
    }
    // The octet download goes on to the end.
    dl.send_to(&packet::ack(1), peer).unwrap();
    let mut expect = 2u16;
    loop {
        let (pkt, _) = recv(&dl, "the rest of the kernel");
        if let Ok(Packet::Data { block, data }) = packet::parse(&pkt) {
            if block == expect {
                got.extend_from_slice(data);
                dl.send_to(&packet::ack(block), peer).unwrap();
                if data.len() < 512 {
                    break;
                }
                expect = expect.wrapping_add(1);
            }
        }
    }
    assert_eq!(got.len(), LISTEN_RACK_KERNEL);
    // A small file is still served in netascii, with its converted size.
    let want = netascii(&payload(4, 6000));
    let c = client("127.0.0.1:0", Duration::from_secs(5));
    c.send_to(&packet::rrq(SMALL, "netascii", &[("tsize", "0")]), s.tftp)
        .unwrap();
    let (oack, _) = recv(&c, "OACK");
    assert_eq!(
        packet::parse(&oack).unwrap(),
        Packet::Oack {
            options: vec![("tsize".into(), want.len().to_string())]
        }
    );
    assert_eq!(download(s.tftp, "127.0.0.1:0", SMALL, "netascii"), want);
}

/// Row 9: an RRQ whose source never ACKs (spoofed: the victim never asked) gets at
/// most two packets: the first one and one resend.
#[test]
fn an_unacknowledged_rrq_gets_at_most_one_resend() {
    let r = listen_rack(&["127.0.0.1:0"], "");
    let s = &r.served;
    let plain = client("127.0.0.5:0", Duration::from_millis(500));
    let rrq = packet::rrq(KERNEL, "octet", &[]);
    plain.send_to(&rrq, s.tftp).unwrap();
    let with_opts = client("127.0.0.5:0", Duration::from_millis(500));
    let rrq2 = packet::rrq(
        KERNEL,
        "octet",
        &[("blksize", "1468"), ("windowsize", "64"), ("tsize", "0")],
    );
    with_opts.send_to(&rrq2, s.tftp).unwrap();
    // Listen for 9 s (the old server resent 5 times, 1 s apart).
    let end = Instant::now() + Duration::from_secs(9);
    let (mut data, mut data_bytes, mut oacks, mut other) = (0, 0, 0, 0);
    let mut buf = [0u8; 70000];
    while Instant::now() < end {
        for sock in [&plain, &with_opts] {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                match packet::parse(&buf[..n]) {
                    Ok(Packet::Data { .. }) => {
                        data += 1;
                        data_bytes += n;
                    }
                    Ok(Packet::Oack { .. }) => oacks += 1,
                    _ => other += 1,
                }
            }
        }
    }
    eprintln!(
        "a {}-byte RRQ drew {data} DATA packets ({data_bytes} bytes); a {}-byte RRQ with options drew {oacks} OACKs",
        rrq.len(),
        rrq2.len()
    );
    assert!((1..=2).contains(&data), "{data} DATA packets for one RRQ");
    assert!((1..=2).contains(&oacks), "{oacks} OACKs for one RRQ");
    assert_eq!(other, 0);
    assert_eq!(s.metric("rackboot_tftp_transfers_in_flight"), 0.0);
    assert_eq!(
        s.metric("rackboot_tftp_errors_total{kind=\"timeout\"}"),
        2.0
    );
    assert_eq!(
        s.metric("rackboot_tftp_errors_total{kind=\"unacknowledged\"}"),
        2.0,
        "counted as never acknowledged"
    );
}
