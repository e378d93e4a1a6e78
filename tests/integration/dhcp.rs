//! ProxyDHCP (`[dhcp] proxy = true`) over real sockets: rackboot runs in a network
//! namespace of its own (the rack: `rb0` listed, `rb1` not), the clients in another
//! (the segment), joined by veth pairs. A real client (busybox's udhcpc) and raw DHCP
//! packets built with dhcproto ask; the offers, the 4011 ACKs, the per-MAC overrides,
//! the drops of hostile or foreign packets and their counters are checked. Both
//! namespaces are deleted when the test ends, also when it fails.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

use crate::harness::{metric, rack, wait_until, Netns, Rack, Served};

const RACK_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x01];
const BIOS: &str = "PXEClient:Arch:00000:UNDI:002001";

/// A rack configured to answer ProxyDHCP on `interface` (`dhcp_extra` added to its
/// `[dhcp]` table), and its `ipxe_dir`.
fn proxy_config(interface: &str, dhcp_extra: &str) -> (Rack, tempfile::TempDir) {
    let ipxe_dir = tempfile::tempdir().unwrap();
    let rack = rack(
        4096,
        "auto = false",
        &format!(
            "[dhcp]\nproxy = true\ninterfaces = [\"{interface}\"]\nipxe_dir = \"{}\"\n{dhcp_extra}",
            ipxe_dir.path().display()
        ),
    );
    (rack, ipxe_dir)
}

/// A UDP socket in `ns` bound to `dev` and `port`, broadcasts allowed, reads
/// waiting 200 ms.
fn broadcast_socket(ns: &Netns, dev: &'static str, port: u16) -> UdpSocket {
    ns.within(move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_broadcast(true).unwrap();
        s.bind_device(Some(dev.as_bytes())).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
            .unwrap();
        let u: UdpSocket = s.into();
        u.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        u
    })
}

/// A rack answering ProxyDHCP on `rb0` in its namespace, and the segment's.
struct ProxyRack {
    // Field order is drop order: the daemon stops before its namespaces go.
    served: Served,
    rack_ns: Netns,
    seg: Netns,
    rack: Rack,
    _ipxe_dir: tempfile::TempDir,
}

/// Starts the rack with `dhcp_extra` in its `[dhcp]` table.
fn proxy_rack(dhcp_extra: &str) -> ProxyRack {
    proxy_rack_on(dhcp_extra, &[])
}

/// [`proxy_rack`], its HTTP server also listening on `http_also` (addresses of the
/// rack's namespace, which the segment can reach).
fn proxy_rack_on(dhcp_extra: &str, http_also: &[&str]) -> ProxyRack {
    let (rack, ipxe_dir) = proxy_config("rb0", dhcp_extra);
    for addr in http_also {
        crate::harness::edit_config(
            &rack.env,
            "[http]\nlisten = [\"127.0.0.1:0\"",
            &format!("[http]\nlisten = [\"127.0.0.1:0\", \"{addr}\""),
        );
    }
    let rack_ns = Netns::new("rack");
    let seg = Netns::new("seg");
    rack_ns.veth(
        "rb0",
        "10.77.0.1/24",
        &seg,
        "cl0",
        "52:54:00:77:00:01",
        "10.77.0.50/24",
    );
    rack_ns.veth(
        "rb1",
        "10.78.0.1/24",
        &seg,
        "cl1",
        "52:54:00:78:00:01",
        "10.78.0.50/24",
    );
    let (served, _) = rack
        .env
        .serve_via(&rack_ns.exec(), &["HTTP", "DHCP", "PXE"], |_| {});
    ProxyRack {
        served,
        rack_ns,
        seg,
        rack,
        _ipxe_dir: ipxe_dir,
    }
}

impl ProxyRack {
    /// A client socket in the segment on `dev`, port `port`, broadcasts allowed.
    fn client(&self, dev: &'static str, port: u16) -> UdpSocket {
        broadcast_socket(&self.seg, dev, port)
    }

    fn metrics(&self) -> String {
        let (code, body) = self.rack_ns.curl(&self.served.url("/metrics"));
        assert_eq!(code, 200);
        String::from_utf8(body).unwrap()
    }

    fn dropped(&self, reason: &str) -> f64 {
        metric(
            &self.metrics(),
            &format!("rackboot_dhcp_dropped_total{{reason=\"{reason}\"}}"),
        )
    }
}

/// What a firmware's request carries.
struct Ask<'a> {
    message: MessageType,
    class: Option<&'a str>,
    arch: Option<u16>,
    ipxe: bool,
    mac: [u8; 6],
}

impl Ask<'_> {
    fn discover(class: &str, arch: u16) -> Ask<'_> {
        Ask {
            message: MessageType::Discover,
            class: Some(class),
            arch: Some(arch),
            ipxe: false,
            mac: CLIENT_MAC,
        }
    }

    fn bytes(&self, xid: u32) -> Vec<u8> {
        let mut m = v4::Message::default();
        // The broadcast flag, as firmware without an IP stack sets it: the site's
        // DHCP then broadcasts its offer too, which this test's socket can see.
        m.set_chaddr(&self.mac)
            .set_xid(xid)
            .set_flags(v4::Flags::default().set_broadcast());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(self.message));
        if let Some(c) = self.class {
            o.insert(DhcpOption::ClassIdentifier(c.as_bytes().to_vec()));
        }
        if let Some(a) = self.arch {
            o.insert(DhcpOption::ClientSystemArchitecture(a.into()));
        }
        if self.ipxe {
            o.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        let mut uuid = vec![0u8];
        uuid.extend(0xa0..0xb0u8);
        o.insert(DhcpOption::ClientMachineIdentifier(uuid));
        m.to_vec().unwrap()
    }
}

/// The reply with `xid` on `sock`, waiting at most `limit`.
fn reply(sock: &UdpSocket, xid: u32, limit: Duration) -> Option<(v4::Message, SocketAddr)> {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Ok(m) = v4::Message::decode(&mut Decoder::new(&buf[..n])) {
            if m.xid() == xid && m.opcode() == v4::Opcode::BootReply {
                return Some((m, from));
            }
        }
    }
    None
}

/// Broadcasts `packet` to port 67 from `sock`.
fn broadcast(sock: &UdpSocket, packet: &[u8]) {
    sock.send_to(packet, (Ipv4Addr::BROADCAST, 67)).unwrap();
}

/// Sends `ask` (broadcast to 67) and returns the offer.
fn offer(sock: &UdpSocket, ask: &Ask, xid: u32) -> v4::Message {
    broadcast(sock, &ask.bytes(xid));
    reply(sock, xid, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no offer for xid {xid:#x}"))
        .0
}

fn file(m: &v4::Message) -> String {
    let f = m.fname().unwrap_or_default();
    String::from_utf8_lossy(f.strip_suffix(&[0]).unwrap_or(f)).into_owned()
}

fn opt(m: &v4::Message, code: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(code)
}

#[test]
fn busybox_udhcpc_gets_a_proxy_offer_that_assigns_nothing() {
    let r = proxy_rack("");
    // udhcpc listens on a packet socket; the offer is broadcast, so this UDP socket
    // on port 68 of the same interface sees it too.
    let sock = r.client("cl0", 68);
    let mut udhcpc = Command::new("ip");
    udhcpc.args([
        "netns",
        "exec",
        &r.seg.name,
        "busybox",
        "udhcpc",
        "-i",
        "cl0",
        "-f",
        "-q",
        "-n",
    ]);
    udhcpc.args([
        "-t",
        "3",
        "-T",
        "1",
        "-s",
        "/bin/true",
        "-V",
        BIOS,
        "-x",
        "0x5d:0000",
    ]);
    let child = udhcpc
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("busybox (busybox-static) must be installed");
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let m = v4::Message::decode(&mut Decoder::new(&buf[..n])).unwrap();
            if m.opcode() == v4::Opcode::BootReply && m.chaddr() == CLIENT_MAC {
                got = Some(m);
            }
        }
    }
    // udhcpc gets no lease (no site DHCP here): it gives up after its 3 tries.
    let _ = crate::harness::wait_output(child, Duration::from_secs(20));
    let m = got.expect("udhcpc's DISCOVER got no offer");
    assert_eq!(
        m.yiaddr(),
        Ipv4Addr::UNSPECIFIED,
        "a proxy assigns no address"
    );
    assert_eq!(m.siaddr(), RACK_IP);
    assert!(m.flags().broadcast());
    assert_eq!(file(&m), "pxelinux.0");
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(
        opt(&m, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(RACK_IP))
    );
    assert_eq!(
        opt(&m, OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    let Some(DhcpOption::VendorExtensions(v43)) = opt(&m, OptionCode::VendorExtensions) else {
        panic!("no option 43 for a BIOS client: {:?}", m.opts());
    };
    assert!(v43.starts_with(&[6, 1, 8]), "discovery control 8: {v43:?}");
    let text = r.metrics();
    assert!(metric(&text, "rackboot_dhcp_replies_total{type=\"offer\"}") >= 1.0);
    assert!(metric(&text, "rackboot_dhcp_requests_total") >= 1.0);
}

#[test]
fn offers_by_client_architecture_and_the_4011_ack() {
    let r = proxy_rack("");
    let sock = r.client("cl0", 68);
    let http = r.served.http.port();
    // BIOS: the README's table, UUID echoed, option 43.
    let m = offer(&sock, &Ask::discover(BIOS, 0), 0x100);
    assert_eq!(file(&m), "pxelinux.0");
    let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
        opt(&m, OptionCode::ClientMachineIdentifier)
    else {
        panic!("option 97 not echoed: {:?}", m.opts());
    };
    assert_eq!(uuid.len(), 17);
    assert_eq!(uuid[1], 0xa0);
    // UEFI PXE: iPXE by default (Debian's GRUB would not find the rack), no option 43.
    let m = offer(
        &sock,
        &Ask::discover("PXEClient:Arch:00007:UNDI:003016", 7),
        0x101,
    );
    assert_eq!(file(&m), "ipxe/snponly.efi");
    assert_eq!(m.siaddr(), RACK_IP);
    assert!(opt(&m, OptionCode::VendorExtensions).is_none());
    let m = offer(
        &sock,
        &Ask::discover("PXEClient:Arch:00011:UNDI:003000", 11),
        0x102,
    );
    assert_eq!(file(&m), "ipxe/ipxe-arm64.efi");
    // iPXE asks again with its user class: the boot script, by HTTP on the rack's port.
    let ask = Ask {
        ipxe: true,
        ..Ask::discover(BIOS, 0)
    };
    let m = offer(&sock, &ask, 0x103);
    assert_eq!(
        file(&m),
        format!("http://{RACK_IP}:{http}/boot.ipxe?mac=52:54:00:77:00:01&arch=amd64")
    );
    // UEFI HTTP boot: a URL, option 60 HTTPClient.
    let m = offer(
        &sock,
        &Ask::discover("HTTPClient:Arch:00016:UNDI:003001", 16),
        0x104,
    );
    assert_eq!(
        file(&m),
        format!("http://{RACK_IP}:{http}/ipxe/ipxe-amd64.efi")
    );
    assert_eq!(
        opt(&m, OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
    );
    // Boot server discovery / BINL: a REQUEST to 4011 gets an ACK, unicast back.
    let ask = Ask {
        message: MessageType::Request,
        ..Ask::discover("PXEClient:Arch:00007:UNDI:003016", 7)
    };
    sock.send_to(&ask.bytes(0x105), (RACK_IP, 4011)).unwrap();
    let (m, from) = reply(&sock, 0x105, Duration::from_secs(5)).expect("no ACK from 4011");
    assert_eq!(from, SocketAddr::from((RACK_IP, 4011)));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(file(&m), "ipxe/snponly.efi");
    let text = r.metrics();
    assert_eq!(
        metric(&text, "rackboot_dhcp_replies_total{type=\"ack\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "rackboot_dhcp_replies_total{type=\"offer\"}"),
        5.0
    );
    // `uefi_loader = "shim"` is the README's shim names (checked in the unit tests
    // too); here the same request on port 67 is not ours to answer.
    broadcast(&sock, &ask.bytes(0x106));
    assert!(reply(&sock, 0x106, Duration::from_millis(800)).is_none());
    assert_eq!(r.dropped("not_for_us"), 1.0);
}

#[test]
fn shim_loader_offers_the_readme_names() {
    let r = proxy_rack("uefi_loader = \"shim\"\n");
    let sock = r.client("cl0", 68);
    let m = offer(
        &sock,
        &Ask::discover("PXEClient:Arch:00007:UNDI:003016", 7),
        0x200,
    );
    assert_eq!(file(&m), "bootx64.efi");
    let m = offer(
        &sock,
        &Ask::discover("PXEClient:Arch:00011:UNDI:003000", 11),
        0x201,
    );
    assert_eq!(file(&m), "bootaa64.efi");
    assert!(r.served.log_text().contains("uefi_loader = \"shim\""));
}

#[test]
fn per_mac_overrides_local_and_ipxe() {
    let r = proxy_rack("");
    let sock = r.client("cl0", 68);
    let mac = "52:54:00:77:00:01";
    r.rack.env.ok(&["machines", "set", mac, "dhcp_boot=local"]);
    broadcast(&sock, &Ask::discover(BIOS, 0).bytes(0x300));
    assert!(
        reply(&sock, 0x300, Duration::from_secs(1)).is_none(),
        "a local-boot machine got an answer"
    );
    assert_eq!(r.dropped("local_boot"), 1.0);
    // Another machine on the segment is still answered.
    let other = Ask {
        mac: [0x52, 0x54, 0, 0x77, 0, 0x09],
        ..Ask::discover(BIOS, 0)
    };
    assert_eq!(file(&offer(&sock, &other, 0x301)), "pxelinux.0");
    r.rack.env.ok(&["machines", "set", mac, "dhcp_boot=ipxe"]);
    assert_eq!(
        file(&offer(&sock, &Ask::discover(BIOS, 0), 0x302)),
        "ipxe/undionly.kpxe"
    );
    r.rack.env.ok(&[
        "machines",
        "set",
        mac,
        "dhcp_boot=bootloader/pxe/i386/pxelinux.0",
    ]);
    assert_eq!(
        file(&offer(&sock, &Ask::discover(BIOS, 0), 0x303)),
        "bootloader/pxe/i386/pxelinux.0"
    );
    let e = r
        .rack
        .env
        .fails(&["machines", "set", mac, "dhcp_boot=../../etc/passwd"], 2);
    assert!(e.contains("dhcp_boot"), "{e}");
}

#[test]
fn hostile_and_foreign_requests_are_dropped_counted_and_survived() {
    let r = proxy_rack("");
    let sock = r.client("cl0", 68);
    let good = Ask::discover(BIOS, 0).bytes(0x400);
    // Malformed: noise, truncated headers, a huge hlen, a datagram larger than the
    // receive buffer.
    let mut hlen = good.clone();
    hlen[2] = 200;
    let mut noise = vec![0u8; 600];
    for (i, b) in noise.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    for p in [
        &noise[..],
        &good[..100],
        &good[..239],
        &hlen[..],
        &vec![1u8; 9000][..],
    ] {
        broadcast(&sock, p);
    }
    // Not a boot client: a DISCOVER without option 60, and one as Windows sends it.
    let plain = Ask {
        class: None,
        arch: None,
        ..Ask::discover(BIOS, 0)
    };
    broadcast(&sock, &plain.bytes(0x401));
    broadcast(&sock, &Ask::discover("MSFT 5.0", 0).bytes(0x402));
    // Option floods: hundreds of options (repeats concatenate, RFC 3396), overlong
    // ones, an option 53 of the wrong length, a missing end mark.
    let mut flood = good[..240].to_vec();
    flood.extend([53, 1, 1]);
    for i in 0..400u32 {
        let code = (i % 200 + 1) as u8;
        if code != 53 {
            flood.extend([code, 3, 1, 2, 3]);
        }
    }
    broadcast(&sock, &flood);
    let mut long = good[..240].to_vec();
    long.extend([53, 1, 1]);
    for _ in 0..28 {
        long.extend([60, 255]);
        long.extend([b'P'; 255]);
    }
    broadcast(&sock, &long);
    let mut bad53 = good[..240].to_vec();
    bad53.extend([53, 3, 1, 1, 1, 60, 9]);
    bad53.extend(b"PXEClient");
    broadcast(&sock, &bad53);
    // A good request on the interface that is not listed.
    let other = r.client("cl1", 68);
    broadcast(&other, &Ask::discover(BIOS, 0).bytes(0x403));
    for xid in [0x401, 0x402, 0x403] {
        assert!(
            reply(&sock, xid, Duration::from_millis(300)).is_none(),
            "{xid:#x}"
        );
    }
    assert!(reply(&other, 0x403, Duration::from_millis(500)).is_none());
    // Still alive, still answering.
    assert_eq!(
        file(&offer(&sock, &Ask::discover(BIOS, 0), 0x404)),
        "pxelinux.0"
    );
    wait_until(Duration::from_secs(5), "the drop counters", || {
        r.dropped("malformed") >= 6.0
    });
    let text = r.metrics();
    let dropped = |reason: &str| {
        metric(
            &text,
            &format!("rackboot_dhcp_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(dropped("malformed"), 6.0, "{text}");
    // The flood of options has no option 60 left that says PXEClient: not a boot client.
    assert_eq!(dropped("not_pxe"), 4.0, "{text}");
    assert_eq!(dropped("wrong_interface"), 1.0, "{text}");
    assert!(metric(&text, "rackboot_dhcp_requests_total") >= 12.0);
    assert!(r
        .served
        .log_text()
        .contains("listening for DHCP on 0.0.0.0:67"));
}

#[test]
fn proxy_without_interfaces_refuses_to_start() {
    let r = rack(4096, "auto = false", "[dhcp]\nproxy = true\n");
    let out = r.rack_env_run(&["serve"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = err
        .lines()
        .find(|l| l.contains("dhcp.interfaces"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("rackboot.toml"), "{line}");
}

#[test]
fn ipxe_binaries_are_served_from_ipxe_dir_over_tftp_and_http() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("snponly.efi"), b"fake snponly\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("escape.efi")).unwrap();
    let r = rack(
        4096,
        "auto = false",
        &format!("[dhcp]\nipxe_dir = \"{}\"\n", dir.path().display()),
    );
    // Synced, so a name that is not under ipxe/ reaches the snapshot's files (a
    // refusal there, not "no snapshot yet").
    let s = r.env.serve_synced();
    assert_eq!(
        crate::harness::tftp_get(&s, "ipxe/snponly.efi").as_deref(),
        Some("fake snponly\n")
    );
    let (code, body) = s.get("/ipxe/snponly.efi");
    assert_eq!((code, body.as_slice()), (200, &b"fake snponly\n"[..]));
    for bad in [
        "/ipxe/missing.efi",
        "/ipxe/escape.efi",
        "/ipxe/..%2frackboot.toml",
        "/ipxe/.x",
    ] {
        let (code, body) = s.get(bad);
        assert!(
            [400, 403, 404].contains(&code),
            "{bad}: {code} {}",
            String::from_utf8_lossy(&body)
        );
        assert!(!String::from_utf8_lossy(&body).contains("root:"), "{bad}");
    }
    assert_eq!(crate::harness::tftp_get(&s, "ipxe/escape.efi"), None);
    assert_eq!(crate::harness::tftp_get(&s, "ipxe/../rackboot.toml"), None);
}

impl Rack {
    /// Runs rackboot in the rack's env for at most 30 s.
    fn rack_env_run(&self, args: &[&str]) -> std::process::Output {
        self.env.run_for(args, Duration::from_secs(30))
    }
}

/// A child process killed (by its PID) and reaped on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn beside_the_sites_dnsmasq_each_answers_its_part() {
    // One segment (a bridge in the rack's namespace): the rack, the site's DHCP
    // (dnsmasq, addresses only, its own namespace) and a client.
    let (rack, _ipxe_dir) = proxy_config("br0", "");
    let (rack_ns, site, seg) = (Netns::new("rack"), Netns::new("site"), Netns::new("seg"));
    rack_ns.ip(&["link", "add", "br0", "type", "bridge"]);
    rack_ns.ip(&["addr", "add", "10.79.0.1/24", "dev", "br0"]);
    rack_ns.ip(&["link", "set", "br0", "up"]);
    for (port, other, dev, mac, addr) in [
        ("rs", &site, "vs0", "52:54:00:79:00:02", "10.79.0.2/24"),
        ("rc", &seg, "cl0", "52:54:00:77:00:01", "10.79.0.60/24"),
    ] {
        rack_ns.veth_port(port, other, dev, mac, addr);
        rack_ns.ip(&["link", "set", port, "master", "br0"]);
    }
    let leases = rack.env.dir.path().join("dnsmasq.leases");
    let _dnsmasq = Killed(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &site.name,
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
            ])
            .args([
                "--port=0",
                "--interface=vs0",
                "--bind-interfaces",
                "--no-ping",
                "--user=root",
            ])
            .args(["--dhcp-range=10.79.0.100,10.79.0.150,255.255.255.0,1h"])
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .arg(format!(
                "--pid-file={}",
                rack.env.dir.path().join("dnsmasq.pid").display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq must be installed"),
    );
    let (_served, _) = rack
        .env
        .serve_via(&rack_ns.exec(), &["HTTP", "DHCP", "PXE"], |_| {});
    let sock = broadcast_socket(&seg, "cl0", 68);
    // All offers to `xid`, asking again (dnsmasq may still be starting) up to 10 s.
    let offers = |ask: &Ask, xid: u32, want: usize| {
        let mut got: Vec<v4::Message> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < want && Instant::now() < deadline {
            broadcast(&sock, &ask.bytes(xid));
            let round = Instant::now() + Duration::from_secs(2);
            while Instant::now() < round {
                if let Some((m, _)) = reply(&sock, xid, Duration::from_millis(200)) {
                    if !got
                        .iter()
                        .any(|g| g.siaddr() == m.siaddr() && g.yiaddr() == m.yiaddr())
                    {
                        got.push(m);
                    }
                }
            }
        }
        got
    };
    let got = offers(&Ask::discover(BIOS, 0), 0x500, 2);
    let site_offer = got
        .iter()
        .find(|m| !m.yiaddr().is_unspecified())
        .unwrap_or_else(|| panic!("no address offer from the site's dnsmasq: {got:?}"));
    assert!(site_offer.yiaddr().octets()[..3] == [10, 79, 0]);
    let ours = got
        .iter()
        .find(|m| m.yiaddr().is_unspecified())
        .unwrap_or_else(|| panic!("no proxy offer: {got:?}"));
    assert_eq!(ours.siaddr(), Ipv4Addr::new(10, 79, 0, 1));
    assert_eq!(file(ours), "pxelinux.0");
    assert_eq!(got.len(), 2, "{got:?}");
    // A machine that is not netbooting hears from the site only.
    let plain = Ask {
        class: None,
        arch: None,
        ..Ask::discover(BIOS, 0)
    };
    let got = offers(&plain, 0x501, 1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(!got[0].yiaddr().is_unspecified());
}

#[test]
fn a_proxy_boot_is_logged_under_its_mac_up_to_the_file_that_was_missing() {
    // HTTP on the rack's segment address too, at a port of its own.
    let seg_http = "10.77.0.1:45248";
    let r = proxy_rack_on("", &[seg_http]);
    std::fs::write(r._ipxe_dir.path().join("snponly.efi"), b"fake snponly\n").unwrap();
    let sock = r.client("cl0", 68);
    let mac = "52:54:00:77:00:01";
    // UEFI PXE: the offer names iPXE (the boot log's first step).
    let uefi = "PXEClient:Arch:00007:UNDI:003016";
    let m = offer(&sock, &Ask::discover(uefi, 7), 0x300);
    assert_eq!(file(&m), "ipxe/snponly.efi");
    // The firmware's broadcast REQUEST to the site's server (not the rack's to
    // answer) names the address it takes: 10.77.0.50, the segment's address here.
    let mut req = v4::Message::default();
    req.set_chaddr(&CLIENT_MAC)
        .set_xid(0x301)
        .set_flags(v4::Flags::default().set_broadcast());
    let o = req.opts_mut();
    o.insert(DhcpOption::MessageType(MessageType::Request));
    o.insert(DhcpOption::ClassIdentifier(uefi.as_bytes().to_vec()));
    o.insert(DhcpOption::ClientSystemArchitecture(7u16.into()));
    o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 99)));
    o.insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 50)));
    broadcast(&sock, &req.to_vec().unwrap());
    assert!(reply(&sock, 0x301, Duration::from_millis(800)).is_none());
    // From that address: the loader, then a file the rack does not have.
    let (code, _) = r.seg.curl(&format!("http://{seg_http}/ipxe/snponly.efi"));
    assert_eq!(code, 200);
    let (code, _) = r
        .seg
        .curl(&format!("http://{seg_http}/ipxe/ipxe-missing.efi"));
    assert_eq!(code, 404);
    let url = r.served.url(&format!("/api/v1/boots/{mac}"));
    let mut log = serde_json::Value::Null;
    wait_until(Duration::from_secs(20), "three boot log events", || {
        let (code, body) = r.rack_ns.curl(&url);
        if code == 200 {
            log = serde_json::from_slice(&body).unwrap();
        }
        log["event_list"].as_array().is_some_and(|e| e.len() >= 3)
    });
    let events = log["event_list"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["dhcp_offer", "http", "http"], "{log}");
    assert_eq!(events[1]["file"], "ipxe/snponly.efi", "{log}");
    assert_eq!(events[1]["result"], "200", "{log}");
    assert_eq!(log["last_event"]["file"], "ipxe/ipxe-missing.efi", "{log}");
    assert_eq!(log["last_event"]["result"], "404", "{log}");
    assert_eq!(log["last_step"], "loader", "{log}");
    assert_eq!(log["ip"], "10.77.0.50", "{log}");
}
