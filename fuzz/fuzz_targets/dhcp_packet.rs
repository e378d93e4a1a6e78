//! ProxyDHCP's parse + decide path: any datagram, to either port, with any override
//! and settings, parses or is dropped cleanly (no panic); a reply never assigns an
//! address, is a BOOTREPLY to the request's MAC and xid naming the rack, and its boot
//! file fits the `file` field. The first input bytes pick the port, the loader and
//! the override; the rest is the datagram.
#![no_main]

use dhcproto::{Decodable, Decoder};
use libfuzzer_sys::fuzz_target;
use rackboot::dhcp::proxy::{self, Override, Policy, Port, UefiLoader};

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, packet)) = data.split_first() else {
        return;
    };
    let Ok(req) = proxy::parse(packet) else {
        return;
    };
    let port = if knobs & 1 == 0 { Port::Dhcp } else { Port::Pxe };
    let policy = Policy {
        uefi_loader: if knobs & 2 == 0 { UefiLoader::Ipxe } else { UefiLoader::Shim },
        http_port: 5248,
    };
    let over = match (knobs >> 2) & 3 {
        0 => None,
        1 => Some(Override::Ipxe),
        2 => Some(Override::Local),
        _ => Some(Override::parse("bootloader/pxe/i386/pxelinux.0").unwrap()),
    };
    let server = std::net::Ipv4Addr::new(10, 0, 0, 2);
    let Ok(reply) = proxy::decide(&req, port, server, &policy, over.as_ref()) else {
        return;
    };
    assert!(reply.boot_file.len() <= proxy::MAX_BOOT_FILE);
    let m = dhcproto::v4::Message::decode(&mut Decoder::new(&reply.bytes)).unwrap();
    assert_eq!(m.opcode(), dhcproto::v4::Opcode::BootReply);
    assert!(m.yiaddr().is_unspecified());
    assert_eq!(m.siaddr(), server);
    assert_eq!(m.xid(), req.xid);
    assert_eq!(m.chaddr(), req.mac);
});
