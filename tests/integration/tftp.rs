//! `rackboot serve` over TFTP where the address matters: IPv6, several listen
//! addresses and wildcard listeners (replies must come from the address the client
//! talked to), the transfer limit, retransmitted RRQs, hostile clients, and a
//! 100 MiB file whose block number rolls over.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use rackboot::tftp::packet::{self, Packet};

use crate::harness::*;
use crate::upstream::*;

const KERNEL_SIZE: usize = LISTEN_RACK_KERNEL;
const VERSION: &str = "20261101";

fn kernel_sha() -> String {
    let p = image("noble", "amd64", VERSION, KERNEL_SIZE);
    sha256_hex(&p.versions.into_values().next().unwrap()[0].data)
}

/// Every TFTP address the daemon logged, once `n` of them are there.
fn tftp_addrs(s: &Served, n: usize) -> Vec<SocketAddr> {
    let mut addrs = vec![];
    wait_until(Duration::from_secs(10), "the TFTP listening lines", || {
        addrs = s
            .log_text()
            .lines()
            .filter_map(|l| l.split("listening for TFTP on ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        addrs.len() >= n
    });
    addrs
}

#[test]
fn ipv6_with_real_clients() {
    let r = listen_rack(&["[::1]:0"], "");
    let s = &r.served;
    assert_eq!(s.tftp.ip(), "::1".parse::<IpAddr>().unwrap());
    let want = kernel_sha();
    let url = format!("tftp://[::1]:{}{KERNEL}", s.tftp.port());
    for bs in ["512", "1468"] {
        let got = curl_fetch(
            &url,
            &["--tftp-blksize", bs],
            &format!("over ::1, blksize {bs}"),
        );
        assert_eq!(sha256_hex(&got), want, "curl over ::1, blksize {bs}");
    }
    // tftp-hpa exits 0 even on a TFTP error: the contents are what counts.
    let port = s.tftp.port().to_string();
    let (res, got) = run_client_to_file(
        "tftp",
        &["-6", "::1", &port, "-m", "binary", "-c", "get", KERNEL, OUT],
        Duration::from_secs(70),
    );
    assert_success(&res, "tftp-hpa over IPv6");
    let got = got.expect("tftp-hpa wrote the file");
    assert_eq!(sha256_hex(&got), want, "tftp-hpa over ::1");
    // Windowed, from a raw socket: every packet comes from ::1, one transfer port.
    let sock = client("[::1]:0", Duration::from_secs(5));
    let (first, peer) = first_reply(
        &sock,
        s.tftp,
        KERNEL,
        &[("blksize", "1468"), ("windowsize", "8")],
    );
    assert_eq!(peer.ip(), s.tftp.ip());
    assert_eq!(
        sha256_hex(&finish_download(&sock, first, peer, || {})),
        want
    );
}

#[test]
fn replies_come_from_the_address_the_client_talked_to() {
    let want = kernel_sha();
    // Two specific addresses.
    let r = listen_rack(&["127.0.0.1:0", "127.0.0.2:0"], "");
    let addrs = tftp_addrs(&r.served, 2);
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let server = *addrs
            .iter()
            .find(|a| a.ip().to_string() == ip)
            .unwrap_or_else(|| panic!("no listener on {ip}: {addrs:?}"));
        let sock = client("127.0.0.1:0", Duration::from_secs(5));
        let (first, peer) = first_reply(&sock, server, KERNEL, &[("blksize", "1468")]);
        assert_eq!(
            peer.ip().to_string(),
            ip,
            "reply to a request sent to {server}"
        );
        assert_ne!(peer.port(), server.port(), "a transfer gets its own port");
        assert_eq!(
            sha256_hex(&finish_download(&sock, first, peer, || {})),
            want
        );
    }
    let second = addrs
        .iter()
        .find(|a| a.ip().to_string() == "127.0.0.2")
        .unwrap();
    let got = curl_fetch(
        &format!("tftp://{second}{KERNEL}"),
        &[],
        "the kernel over TFTP",
    );
    assert_eq!(sha256_hex(&got), want);
    drop(r);

    // Wildcard listeners: the reply address comes from IP_PKTINFO / IPV6_PKTINFO, so
    // it is whichever local address the request was sent to (IPv4 on the dual-stack
    // socket arrives as a mapped address and must still be answered from IPv4).
    let r = listen_rack(&["0.0.0.0:0", "[::]:0"], "");
    let addrs = tftp_addrs(&r.served, 2);
    let v4 = addrs.iter().find(|a| a.is_ipv4()).unwrap().port();
    let v6 = addrs.iter().find(|a| a.is_ipv6()).unwrap().port();
    let dual_stack = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
        .map(|s| s.trim() == "0")
        .unwrap_or(false);
    let mut cases = vec![
        ("127.0.0.1:0", "127.0.0.2", v4),
        ("127.0.0.1:0", "127.0.0.3", v4),
        ("[::1]:0", "::1", v6),
    ];
    if dual_stack {
        cases.push(("127.0.0.1:0", "127.0.0.3", v6));
    }
    for (from, to, port) in cases {
        let server = SocketAddr::new(to.parse().unwrap(), port);
        let sock = client(from, Duration::from_secs(5));
        let (first, peer) = first_reply(
            &sock,
            server,
            KERNEL,
            &[("blksize", "1468"), ("windowsize", "4")],
        );
        assert_eq!(
            peer.ip(),
            server.ip(),
            "reply to a request sent to {server}"
        );
        assert_eq!(
            sha256_hex(&finish_download(&sock, first, peer, || {})),
            want
        );
    }
}

#[test]
fn the_transfer_limit_refuses_clearly_and_recovers() {
    let r = listen_rack(&["127.0.0.1:0"], "max_transfers = 2");
    let s = &r.served;
    // Two clients that get DATA 1 and never acknowledge it hold both slots.
    let mut hogs = vec![];
    for _ in 0..2 {
        let sock = client("127.0.0.1:0", Duration::from_secs(5));
        let (first, peer) = first_reply(&sock, s.tftp, KERNEL, &[]);
        assert_eq!(&first[..4], &[0, 3, 0, 1], "DATA 1");
        hogs.push((sock, peer));
    }
    // A third one is told, and the log says why.
    let third = client("127.0.0.1:0", Duration::from_secs(5));
    let (reply, _) = first_reply(&third, s.tftp, KERNEL, &[]);
    let Ok(Packet::Error { code, message }) = packet::parse(&reply) else {
        panic!("expected an ERROR, got {:?}", &reply[..reply.len().min(16)]);
    };
    assert_eq!(code, 0);
    assert!(
        message.contains("busy") && message.contains("limit"),
        "{message}"
    );
    wait_until(
        Duration::from_secs(10),
        "the transfer-limit log line",
        || s.log_text().contains("transfer limit reached"),
    );
    assert!(
        s.log_text().contains("tftp.max_transfers"),
        "the line names the setting"
    );
    assert_eq!(s.metric("rackboot_tftp_errors_total{kind=\"busy\"}"), 1.0);
    // The holders were not disturbed: the server still retransmits DATA 1 to them.
    let mut buf = [0u8; 2048];
    for (sock, peer) in &hogs {
        let (n, from) = sock.recv_from(&mut buf).expect("DATA 1 again");
        assert_eq!((&buf[..4], from), (&[0u8, 3, 0, 1][..], *peer));
        assert_eq!(n, 516);
    }
    // They give up (ERROR to the transfer port): the slots free at once.
    for (sock, peer) in &hogs {
        sock.send_to(b"\x00\x05\x00\x00client gone\x00", peer)
            .unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "the aborted transfers to end",
        || {
            s.metric("rackboot_tftp_transfers_in_flight") == 0.0
                && s.metric("rackboot_tftp_errors_total{kind=\"aborted\"}") == 2.0
        },
    );
    let got = curl_fetch(
        &format!("tftp://{}{KERNEL}", s.tftp),
        &[],
        "the kernel over TFTP",
    );
    assert_eq!(sha256_hex(&got), kernel_sha());
    assert_eq!(s.metric("rackboot_tftp_errors_total{kind=\"busy\"}"), 1.0);
}

#[test]
fn a_retransmitted_rrq_does_not_start_a_second_transfer() {
    let r = listen_rack(&["127.0.0.1:0"], "");
    let s = &r.served;
    let want = kernel_sha();
    let opts = [("blksize", "1468"), ("windowsize", "4"), ("tsize", "0")];
    let rrq = packet::rrq(KERNEL, "octet", &opts);
    let sock = client("127.0.0.1:0", Duration::from_secs(3));
    // The RRQ goes out twice back to back (a client that retransmits early).
    sock.send_to(&rrq, s.tftp).unwrap();
    sock.send_to(&rrq, s.tftp).unwrap();
    let mut buf = [0u8; 2048];
    let (n, peer) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..2], &[0, 6], "OACK");
    // Nothing else arrives before we answer: no second OACK, from any port (the
    // server resends only after its 1 s timeout).
    sock.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut other = [0u8; 2048];
    if let Ok((m, from)) = sock.recv_from(&mut other) {
        panic!("a second answer from {from}: {:?}", &other[..m.min(16)]);
    }
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // And once more in the middle of the transfer.
    let got = finish_download(&sock, buf[..n].to_vec(), peer, || {
        sock.send_to(&rrq, s.tftp).unwrap();
    });
    assert_eq!(sha256_hex(&got), want);
    wait_until(
        Duration::from_secs(10),
        "the transfer to be counted",
        || s.metric("rackboot_tftp_transfers_ok_total") == 1.0,
    );
    assert_eq!(s.metric("rackboot_tftp_received_requests_total"), 3.0);
    assert_eq!(
        s.metric("rackboot_tftp_requests_total{class=\"kernel\"}"),
        1.0
    );
    // Once it is over, the same port may ask again: that is a new transfer.
    let (first, peer2) = first_reply(&sock, s.tftp, KERNEL, &opts);
    assert_ne!(peer2, peer, "a new transfer port");
    assert_eq!(
        sha256_hex(&finish_download(&sock, first, peer2, || {})),
        want
    );
}

/// Sends `pkt` from a fresh socket and returns the first reply (if any).
fn exchange(server: std::net::SocketAddr, pkt: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    sock.send_to(pkt, server).unwrap();
    let mut buf = [0u8; 2048];
    sock.recv_from(&mut buf)
        .ok()
        .map(|(n, _)| buf[..n].to_vec())
}

fn error_code(reply: &[u8]) -> u16 {
    assert_eq!(&reply[..2], &[0, 5], "an ERROR packet: {reply:?}");
    u16::from_be_bytes([reply[2], reply[3]])
}

fn rrq(name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    packet::rrq(name, "octet", opts)
}

#[test]
fn tftp_hostile_clients_get_errors_and_others_are_still_served() {
    let r = rack(256 << 10, "auto = false", "");
    let s = r.env.serve_synced();
    let srv = s.tftp;
    // Truncated and unknown packets: an illegal-operation error or nothing, never a crash.
    for junk in [
        &b"\x00"[..],
        b"\x00\x01",
        b"\x00\x01abc",
        b"\x00\x09hello\x00",
        b"\xff\xff\xff",
    ] {
        if let Some(reply) = exchange(srv, junk) {
            assert_eq!(error_code(&reply), 4, "{junk:?}");
        }
    }
    // Traversal attempts: access violation.
    for name in [
        "../etc/passwd",
        "..\\..\\etc\\passwd",
        "/../../etc/passwd",
        "a/../../b",
    ] {
        let reply = exchange(srv, &rrq(name, &[])).expect("an answer");
        assert_eq!(error_code(&reply), 2, "{name}");
    }
    // Write requests: access violation.
    let mut wrq = rrq("x", &[]);
    wrq[1] = 2;
    assert_eq!(error_code(&exchange(srv, &wrq).unwrap()), 2);
    // Not found is quick and says so.
    assert_eq!(
        error_code(&exchange(srv, &rrq("pxelinux.cfg/C0A80001", &[])).unwrap()),
        1
    );
    // Huge option values and 1000 options.
    let reply = exchange(
        srv,
        &rrq(
            "pxelinux.0",
            &[("blksize", "99999999999999999999999"), ("tsize", "0")],
        ),
    )
    .unwrap();
    assert_eq!(&reply[..2], &[0, 6], "OACK with only tsize");
    assert!(String::from_utf8_lossy(&reply).contains("tsize"));
    assert!(!String::from_utf8_lossy(&reply).contains("blksize"));
    let many: Vec<(String, String)> = (0..1000).map(|i| (format!("opt{i}"), "1".into())).collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        error_code(&exchange(srv, &rrq("pxelinux.0", &refs)).unwrap()),
        4
    );
    // The tsize probe: RRQ, OACK, client ERROR ends it at once.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(&rrq(KERNEL, &[("tsize", "0"), ("blksize", "1468")]), srv)
        .unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..2], &[0, 6]);
    assert!(String::from_utf8_lossy(&buf[..n]).contains(&format!("tsize\0{}", 256 << 10)));
    sock.send_to(b"\x00\x05\x00\x08tsize probe\x00", from)
        .unwrap();
    // Duplicate RRQs from one port start one transfer only, and an ACK flood for wrong
    // blocks is ignored.
    let dup = UdpSocket::bind("127.0.0.1:0").unwrap();
    dup.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let req = rrq(KERNEL, &[]);
    dup.send_to(&req, srv).unwrap();
    dup.send_to(&req, srv).unwrap();
    let mut firsts = 0;
    let mut peer = None;
    while let Ok((n, from)) = dup.recv_from(&mut buf) {
        if n >= 4 && buf[..4] == [0, 3, 0, 1] {
            firsts += 1;
            peer = Some(from);
        }
    }
    assert_eq!(firsts, 1, "one transfer answers with DATA 1");
    for b in [7u16, 900, 65535, 3] {
        let mut ack = vec![0, 4];
        ack.extend_from_slice(&b.to_be_bytes());
        dup.send_to(&ack, peer.unwrap()).unwrap();
    }
    // Everyone else is still served correctly.
    let got = curl_fetch(
        &format!("tftp://{srv}{KERNEL}"),
        &[],
        "the kernel over TFTP",
    );
    assert_eq!(
        sha256_hex(&got),
        sha256_hex(&kernel_of("20261101", 256 << 10))
    );
    let (_, m) = s.get("/metrics");
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("rackboot_tftp_tsize_probes_total 1"), "{m}");
}

#[test]
fn tftp_100_mib_with_blksize_512_rolls_over() {
    let r = rack(50 << 20, "auto = false", ""); // squashfs is 2x + 1 = 100 MiB + 1
    let s = r.env.serve();
    s.wait_generation(1, Duration::from_secs(120));
    let want = image("noble", "amd64", "20261101", 50 << 20)
        .versions
        .into_values()
        .next()
        .unwrap()[2]
        .data
        .clone();
    assert!(want.len() > 65535 * 512);
    let got = curl_download_within(
        &format!(
            "tftp://{}/ubuntu/amd64/generic/noble/stable/squashfs",
            s.tftp
        ),
        &["--tftp-blksize", "512"],
        300,
    )
    .unwrap_or_else(|e| panic!("curl: {e}"));
    assert_eq!(sha256_hex(&got), sha256_hex(&want));
}
