//! The ProxyDHCP decision, pure: a received datagram is parsed (with `dhcproto`) into
//! a [`Request`], and [`decide`] turns the request, the rack's address on the
//! interface it came in on, the [`Policy`] and the machine's [`Override`] into the
//! bytes of a reply or the [`DropReason`] reason. No sockets, no clock, no file: the server
//! (`server.rs`) does the I/O and the fuzz target drives this file directly.
//!
//! What is answered: only PXE and UEFI HTTP boot clients (option 60 beginning with
//! `PXEClient` or `HTTPClient`), a DISCOVER on port 67 with an OFFER (broadcast to
//! port 68), a REQUEST to port 4011 (boot server discovery, also iPXE's and EDK2's
//! ProxyDHCP request) with an ACK to its source. A reply never assigns an address
//! (`yiaddr` 0.0.0.0) and carries: `siaddr` and option 54 = the rack's address on the
//! ingress interface, option 60 echoed as `PXEClient` / `HTTPClient`, option 97 (the
//! client UUID) echoed when it is well formed, the boot file in the `file` field, and
//! for BIOS clients option 43.
//!
//! Option 43 (PXE spec 2.1, vendor options): sub-option 6 (discovery control) = 8,
//! "a boot file is in the offer: download it, no boot server discovery and no menu";
//! sub-option 10 (menu prompt) with a timeout of 0, which some BIOS ROMs want before
//! they take a ProxyDHCP offer (dnsmasq sends the same two without a menu); then the
//! end mark 255. UEFI PXE clients get no option 43: EDK2 then treats the offer as a
//! BINL one and asks port 4011 for the boot file, which is answered (the path
//! pixiecore and dnsmasq's UEFI handling rely on; some UEFI firmware ignores a proxy
//! offer that tries to switch discovery off). HTTP boot needs no vendor options: EDK2
//! takes a proxy offer whose file is a URL with an IP literal.
//!
//! The boot file by client (the README's table): BIOS → `pxelinux.0`; iPXE (user
//! class `iPXE`) → `http://RACK:PORT/boot.ipxe?mac=…&arch=…`; UEFI PXE amd64 (7, 9) /
//! arm64 (11) → iPXE (`ipxe/snponly.efi`, `ipxe/ipxe-arm64.efi`) with
//! `uefi_loader = "ipxe"`, shim (`bootx64.efi`, `bootaa64.efi`) with `"shim"`; HTTP
//! boot (16 / 19) → the same as URLs (`ipxe/ipxe-amd64.efi`, `ipxe/ipxe-arm64.efi` or
//! shim). iPXE understands ProxyDHCP: it asks again as iPXE and gets `boot.ipxe`.

// `core::net`: the address type only (the same type as `std::net`'s); this file
// opens no socket.
use core::net::Ipv4Addr;

use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::Encodable;

/// Where DHCP servers listen.
pub const SERVER_PORT: u16 = 67;
/// Where DHCP clients listen (broadcast replies go there).
pub const CLIENT_PORT: u16 = 68;
/// PXE boot server discovery (and the ProxyDHCP REQUEST of iPXE and EDK2).
pub const PXE_PORT: u16 = 4011;

/// The longest boot file name: the BOOTP `file` field is 128 bytes with its NUL.
pub const MAX_BOOT_FILE: usize = 127;

/// Replies are padded to this size: some BIOS PXE ROMs drop shorter (BOOTP) replies.
const MIN_REPLY: usize = 300;

/// What UEFI PXE and HTTP boot clients get (`[dhcp] uefi_loader`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UefiLoader {
    /// iPXE, which understands ProxyDHCP (Secure Boot must be off).
    Ipxe,
    /// shim, then GRUB: Debian's signed GRUB takes its TFTP server from the site's
    /// DHCP ACK, so this works only when the site's DHCP names the rack as next-server.
    Shim,
}

impl UefiLoader {
    pub fn parse(s: &str) -> Option<UefiLoader> {
        match s {
            "ipxe" => Some(UefiLoader::Ipxe),
            "shim" => Some(UefiLoader::Shim),
            _ => None,
        }
    }
}

/// A machine's boot-file override (`dhcp_boot` in its settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Override {
    /// Force iPXE (BIOS: `ipxe/undionly.kpxe`), whatever `uefi_loader` says.
    Ipxe,
    /// No answer at all: the firmware falls through to its disk.
    Local,
    /// This boot file (a path on the rack, or an `http://` URL).
    File(String),
}

impl Override {
    /// `ipxe`, `local` or a boot file: 1 to [`MAX_BOOT_FILE`] bytes of
    /// `A-Z a-z 0-9 . _ + ~ - / : ? & = %`, no `..` segment, not starting with `/`.
    pub fn parse(s: &str) -> Result<Override, String> {
        match s {
            "ipxe" => return Ok(Override::Ipxe),
            "local" => return Ok(Override::Local),
            _ => {}
        }
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "._+~-/:?&=%".contains(c);
        if s.is_empty()
            || s.len() > MAX_BOOT_FILE
            || !s.chars().all(ok_char)
            || s.starts_with('/')
            || s.split('/').any(|seg| seg == "..")
        {
            return Err(format!(
                "dhcp_boot {s:?}: expected \"ipxe\", \"local\" or a boot file name \
                 (at most {MAX_BOOT_FILE} bytes of A-Z a-z 0-9 . _ + ~ - / : ? & = %, no \"..\")"
            ));
        }
        Ok(Override::File(s.to_string()))
    }
}

/// Why a request got no answer (one counter each on `/metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not a DHCP request (too short, bad cookie, no message type, not Ethernet…).
    Malformed,
    /// No option 60 beginning with `PXEClient` or `HTTPClient`.
    NotPxe,
    /// Not a message this proxy answers there (a REQUEST on port 67, a DISCOVER on
    /// 4011, a REQUEST for another server).
    NotForUs,
    /// Relayed (`giaddr` set): answered only on the segments of the listed interfaces.
    Relayed,
    /// A client architecture (option 93) with no boot file here.
    UnsupportedArch,
    /// The machine is set to boot from its disk (`dhcp_boot = "local"`).
    Local,
    /// It came in on an interface not in `[dhcp] interfaces`.
    WrongInterface,
    /// The ingress interface has no IPv4 address to name as the server.
    NoAddress,
    /// The reply could not be built (a bug, or an over-long boot file).
    Internal,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::NotPxe,
        DropReason::NotForUs,
        DropReason::Relayed,
        DropReason::UnsupportedArch,
        DropReason::Local,
        DropReason::WrongInterface,
        DropReason::NoAddress,
        DropReason::Internal,
    ];

    /// The `/metrics` label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotPxe => "not_pxe",
            DropReason::NotForUs => "not_for_us",
            DropReason::Relayed => "relayed",
            DropReason::UnsupportedArch => "unsupported_arch",
            DropReason::Local => "local_boot",
            DropReason::WrongInterface => "wrong_interface",
            DropReason::NoAddress => "no_address",
            DropReason::Internal => "internal",
        }
    }

    /// Its index in [`DropReason::ALL`] (for counters).
    pub fn index(self) -> usize {
        DropReason::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }
}

/// The port a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// 67: DISCOVERs are answered with an OFFER.
    Dhcp,
    /// 4011: REQUESTs are answered with an ACK.
    Pxe,
}

/// The vendor class a boot client announced (option 60).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Pxe,
    Http,
}

impl Class {
    /// What a reply echoes in option 60.
    pub fn name(self) -> &'static str {
        match self {
            Class::Pxe => "PXEClient",
            Class::Http => "HTTPClient",
        }
    }
}

/// A parsed request: only what the decision and the reply need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub mac: [u8; 6],
    pub message: MessageType,
    /// `None`: no boot client (no or another option 60).
    pub class: Option<Class>,
    /// Option 93 (the first entry), else the `Arch:` field of option 60.
    pub arch: Option<u16>,
    /// User class (option 77) `iPXE`.
    pub ipxe: bool,
    /// Option 97 when well formed (type 0 and a 16-byte UUID).
    pub uuid: Option<[u8; 17]>,
    /// Option 54: the server the client addresses.
    pub server_id: Option<Ipv4Addr>,
    /// Option 50: the address a REQUEST asks the site's server for (a boot client's
    /// broadcast REQUEST tells the rack which address that MAC will use).
    pub requested_ip: Option<Ipv4Addr>,
}

impl Request {
    /// The address the client has or asks for: option 50, else a non-zero ciaddr.
    pub fn client_ip(&self) -> Option<Ipv4Addr> {
        self.requested_ip
            .or((!self.ciaddr.is_unspecified()).then_some(self.ciaddr))
    }
}

/// Reads one datagram. Only Ethernet BOOTREQUESTs with a message type parse; a
/// request without a boot client's option 60 parses too (with `class: None`), so
/// its drop can name the MAC.
pub fn parse(packet: &[u8]) -> Result<Request, DropReason> {
    let msg = v4::borrowed::Message::new(packet).map_err(|_| DropReason::Malformed)?;
    // Checked before `chaddr()`, which slices `hlen` bytes.
    if msg.opcode() != v4::Opcode::BootRequest || msg.htype() != v4::HType::Eth || msg.hlen() != 6 {
        return Err(DropReason::Malformed);
    }
    let mac: [u8; 6] = msg.chaddr().try_into().map_err(|_| DropReason::Malformed)?;
    let mut req = Request {
        xid: msg.xid(),
        flags: msg.flags().into(),
        ciaddr: msg.ciaddr(),
        giaddr: msg.giaddr(),
        mac,
        message: MessageType::Unknown(0),
        class: None,
        arch: None,
        ipxe: false,
        uuid: None,
        server_id: None,
        requested_ip: None,
    };
    let mut class_text: Option<Vec<u8>> = None;
    let mut message = None;
    for opt in msg.opts() {
        // Only these options are decoded into values, each with a length check of
        // its own; the others are skipped unread.
        match opt.code() {
            OptionCode::MessageType => match opt.data() {
                [t] => message = Some(MessageType::from(*t)),
                _ => return Err(DropReason::Malformed),
            },
            OptionCode::ClassIdentifier => class_text = Some(opt.data().to_vec()),
            OptionCode::UserClass => req.ipxe = is_ipxe_user_class(opt.data()),
            OptionCode::ClientSystemArchitecture => {
                if let [a, b, ..] = opt.data() {
                    req.arch = Some(u16::from_be_bytes([*a, *b]));
                }
            }
            OptionCode::ClientMachineIdentifier => {
                req.uuid = <[u8; 17]>::try_from(opt.data())
                    .ok()
                    .filter(|u| u.first() == Some(&0));
            }
            OptionCode::ServerIdentifier => {
                if let Ok(a) = <[u8; 4]>::try_from(opt.data()) {
                    req.server_id = Some(Ipv4Addr::from(a));
                }
            }
            OptionCode::RequestedIpAddress => {
                if let Ok(a) = <[u8; 4]>::try_from(opt.data()) {
                    req.requested_ip = Some(Ipv4Addr::from(a)).filter(|a| !a.is_unspecified());
                }
            }
            _ => {}
        }
    }
    req.message = message.ok_or(DropReason::Malformed)?;
    if let Some(text) = class_text {
        req.class = if text.starts_with(b"PXEClient") {
            Some(Class::Pxe)
        } else if text.starts_with(b"HTTPClient") {
            Some(Class::Http)
        } else {
            None
        };
        if req.arch.is_none() && req.class.is_some() {
            req.arch = arch_from_class(&text);
        }
    }
    Ok(req)
}

/// Option 77 is `iPXE`, raw (as iPXE sends it) or as an RFC 3004 list.
fn is_ipxe_user_class(data: &[u8]) -> bool {
    if data == b"iPXE" {
        return true;
    }
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let Some((item, after)) = tail.split_at_checked(usize::from(len)) else {
            return false;
        };
        if item == b"iPXE" {
            return true;
        }
        rest = after;
    }
    false
}

/// `PXEClient:Arch:00007:UNDI:003016` → 7.
fn arch_from_class(text: &[u8]) -> Option<u16> {
    let text = core::str::from_utf8(text).ok()?;
    let mut fields = text.split(':');
    while let Some(f) = fields.next() {
        if f == "Arch" {
            return fields.next()?.parse().ok();
        }
    }
    None
}

/// The settings a decision needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub uefi_loader: UefiLoader,
    /// The HTTP port the rack's URLs name.
    pub http_port: u16,
}

/// The CPU a boot client runs, and whether its firmware is BIOS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Firmware {
    Bios,
    Uefi(Cpu),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cpu {
    Amd64,
    Arm64,
}

impl Cpu {
    fn name(self) -> &'static str {
        match self {
            Cpu::Amd64 => "amd64",
            Cpu::Arm64 => "arm64",
        }
    }
}

/// RFC 4578 / IANA processor architecture types served here: 0 BIOS, 7 and 9 UEFI
/// x64, 11 UEFI arm64, 16 and 19 their HTTP boot. No option 93 at all (old BIOS
/// ROMs) counts as BIOS.
fn firmware(arch: Option<u16>) -> Option<Firmware> {
    match arch {
        None | Some(0) => Some(Firmware::Bios),
        Some(7 | 9 | 16) => Some(Firmware::Uefi(Cpu::Amd64)),
        Some(11 | 19) => Some(Firmware::Uefi(Cpu::Arm64)),
        _ => None,
    }
}

/// Whether `req` is something this proxy answers on `port` at all (before the
/// interface, the override or the boot file are looked at).
pub fn screen(req: &Request, port: Port) -> Result<(), DropReason> {
    let class = req.class.ok_or(DropReason::NotPxe)?;
    match (port, req.message) {
        (Port::Dhcp, MessageType::Discover) | (Port::Pxe, MessageType::Request) => {}
        _ => return Err(DropReason::NotForUs),
    }
    if !req.giaddr.is_unspecified() {
        return Err(DropReason::Relayed);
    }
    if firmware(req.arch).is_none() {
        return Err(DropReason::UnsupportedArch);
    }
    // An HTTP boot client on BIOS does not exist.
    if class == Class::Http && firmware(req.arch) == Some(Firmware::Bios) {
        return Err(DropReason::UnsupportedArch);
    }
    Ok(())
}

/// Where a reply goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// 255.255.255.255:68 out of the ingress interface (an OFFER).
    Broadcast,
    /// Back to the request's source address and port (an ACK on 4011).
    Source,
}

/// A reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub dest: Dest,
    /// OFFER or ACK.
    pub message: MessageType,
    pub boot_file: String,
}

/// The reply to `req`, which came to `port` on an interface where the rack is
/// `server`, or why there is none.
pub fn decide(
    req: &Request,
    port: Port,
    server: Ipv4Addr,
    policy: &Policy,
    over: Option<&Override>,
) -> Result<Reply, DropReason> {
    screen(req, port)?;
    let class = req.class.ok_or(DropReason::NotPxe)?;
    let fw = firmware(req.arch).ok_or(DropReason::UnsupportedArch)?;
    if server.is_unspecified() {
        return Err(DropReason::NoAddress);
    }
    // A REQUEST to 4011 names the proxy it asks (iPXE does); another's is not ours.
    if port == Port::Pxe && req.server_id.is_some_and(|s| s != server) {
        return Err(DropReason::NotForUs);
    }
    let boot_file = boot_file(req, class, fw, server, policy, over)?;
    if boot_file.len() > MAX_BOOT_FILE {
        return Err(DropReason::Internal);
    }
    let (message, dest) = match port {
        Port::Dhcp => (MessageType::Offer, Dest::Broadcast),
        Port::Pxe => (MessageType::Ack, Dest::Source),
    };
    let bytes = encode(req, class, fw, server, message, &boot_file).ok_or(DropReason::Internal)?;
    Ok(Reply {
        bytes,
        dest,
        message,
        boot_file,
    })
}

/// The boot file for `req` (see the module doc); `Err(Local)` for a local-boot machine.
fn boot_file(
    req: &Request,
    class: Class,
    fw: Firmware,
    server: Ipv4Addr,
    policy: &Policy,
    over: Option<&Override>,
) -> Result<String, DropReason> {
    let base = format!("http://{server}:{}/", policy.http_port);
    let cpu = match fw {
        Firmware::Bios => Cpu::Amd64,
        Firmware::Uefi(c) => c,
    };
    let mac = req
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let boot_ipxe = format!("{base}boot.ipxe?mac={mac}&arch={}", cpu.name());
    let http = class == Class::Http;
    let url_or_path = |name: &str| {
        if http && !name.starts_with("http://") {
            format!("{base}{name}")
        } else {
            name.to_string()
        }
    };
    let ipxe_binary = match (fw, http) {
        (Firmware::Bios, _) => "ipxe/undionly.kpxe",
        (Firmware::Uefi(Cpu::Amd64), false) => "ipxe/snponly.efi",
        (Firmware::Uefi(Cpu::Amd64), true) => "ipxe/ipxe-amd64.efi",
        (Firmware::Uefi(Cpu::Arm64), _) => "ipxe/ipxe-arm64.efi",
    };
    match over {
        Some(Override::Local) => return Err(DropReason::Local),
        // iPXE asking again after loading an iPXE binary gets its script, or it
        // would load itself forever.
        Some(Override::File(f)) if req.ipxe && f.starts_with("ipxe/") => return Ok(boot_ipxe),
        Some(Override::File(f)) => return Ok(url_or_path(f)),
        Some(Override::Ipxe) if req.ipxe => return Ok(boot_ipxe),
        Some(Override::Ipxe) => return Ok(url_or_path(ipxe_binary)),
        None => {}
    }
    if req.ipxe {
        return Ok(boot_ipxe);
    }
    let shim = match cpu {
        Cpu::Amd64 => "bootx64.efi",
        Cpu::Arm64 => "bootaa64.efi",
    };
    Ok(match (fw, policy.uefi_loader) {
        (Firmware::Bios, _) => "pxelinux.0".to_string(),
        (Firmware::Uefi(_), UefiLoader::Ipxe) => url_or_path(ipxe_binary),
        (Firmware::Uefi(_), UefiLoader::Shim) => url_or_path(shim),
    })
}

/// Option 43 for BIOS clients: discovery control 8, a menu prompt with no wait, end.
fn pxe_vendor_options() -> Vec<u8> {
    let prompt = b"rackboot";
    let mut v = vec![6, 1, 8, 10, 1 + prompt.len() as u8, 0];
    v.extend_from_slice(prompt);
    v.push(255);
    v
}

/// The reply's bytes (dhcproto's encoder), padded to [`MIN_REPLY`].
fn encode(
    req: &Request,
    class: Class,
    fw: Firmware,
    server: Ipv4Addr,
    message: MessageType,
    boot_file: &str,
) -> Option<Vec<u8>> {
    let mut m = v4::Message::new_with_id(
        req.xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        server,
        req.giaddr,
        &req.mac,
    );
    m.set_opcode(v4::Opcode::BootReply)
        .set_htype(v4::HType::Eth);
    match message {
        MessageType::Offer => {
            m.set_flags(v4::Flags::new(req.flags).set_broadcast());
        }
        _ => {
            m.set_flags(v4::Flags::new(req.flags))
                .set_ciaddr(req.ciaddr);
        }
    }
    if boot_file.len() > MAX_BOOT_FILE {
        return None;
    }
    m.set_fname(boot_file.as_bytes());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(message));
    opts.insert(DhcpOption::ServerIdentifier(server));
    opts.insert(DhcpOption::ClassIdentifier(
        class.name().as_bytes().to_vec(),
    ));
    if let Some(uuid) = req.uuid {
        opts.insert(DhcpOption::ClientMachineIdentifier(uuid.to_vec()));
    }
    if fw == Firmware::Bios && class == Class::Pxe {
        opts.insert(DhcpOption::VendorExtensions(pxe_vendor_options()));
    }
    let mut bytes = m.to_vec().ok()?;
    if bytes.len() < MIN_REPLY {
        bytes.resize(MIN_REPLY, 0);
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::{Decodable, Decoder};

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const RACK: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    /// A request as firmware sends it.
    fn packet(message: MessageType, class: Option<&str>, arch: Option<u16>, ipxe: bool) -> Vec<u8> {
        let mut m = v4::Message::default();
        m.set_chaddr(&MAC).set_xid(0x1234_5678);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(message));
        if let Some(c) = class {
            o.insert(DhcpOption::ClassIdentifier(c.as_bytes().to_vec()));
        }
        if let Some(a) = arch {
            o.insert(DhcpOption::ClientSystemArchitecture(a.into()));
        }
        if ipxe {
            o.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        let mut uuid = vec![0u8];
        uuid.extend(1..=16u8);
        o.insert(DhcpOption::ClientMachineIdentifier(uuid));
        m.to_vec().unwrap()
    }

    /// A DISCOVER from a boot client that is not iPXE.
    fn discover(class: &str, arch: u16) -> Vec<u8> {
        packet(MessageType::Discover, Some(class), Some(arch), false)
    }

    /// The message of a reply, decoded.
    fn decoded(r: &Reply) -> v4::Message {
        v4::Message::decode(&mut Decoder::new(&r.bytes)).unwrap()
    }

    fn policy(uefi_loader: UefiLoader) -> Policy {
        Policy {
            uefi_loader,
            http_port: 5248,
        }
    }

    fn answer(
        p: &[u8],
        port: Port,
        loader: UefiLoader,
        over: Option<&Override>,
    ) -> Result<Reply, DropReason> {
        decide(&parse(p)?, port, RACK, &policy(loader), over)
    }

    fn file_for(class: &str, arch: u16, ipxe: bool, loader: UefiLoader) -> String {
        let p = packet(MessageType::Discover, Some(class), Some(arch), ipxe);
        answer(&p, Port::Dhcp, loader, None).unwrap().boot_file
    }

    #[test]
    fn boot_files_follow_the_readme_table() {
        let pxe = "PXEClient:Arch:00000:UNDI:002001";
        let http = "HTTPClient:Arch:00016:UNDI:003001";
        use UefiLoader::{Ipxe, Shim};
        let ipxe_script = "http://10.0.0.2:5248/boot.ipxe?mac=52:54:00:12:34:56";
        let table: &[(&str, u16, bool, UefiLoader, &str)] = &[
            (pxe, 0, false, Ipxe, "pxelinux.0"),
            (pxe, 0, true, Ipxe, &format!("{ipxe_script}&arch=amd64")),
            (pxe, 11, true, Shim, &format!("{ipxe_script}&arch=arm64")),
            (pxe, 7, false, Ipxe, "ipxe/snponly.efi"),
            (pxe, 9, false, Ipxe, "ipxe/snponly.efi"),
            (pxe, 11, false, Ipxe, "ipxe/ipxe-arm64.efi"),
            (pxe, 7, false, Shim, "bootx64.efi"),
            (pxe, 11, false, Shim, "bootaa64.efi"),
            (http, 16, false, Ipxe, "http://10.0.0.2:5248/ipxe/ipxe-amd64.efi"),
            (http, 19, false, Ipxe, "http://10.0.0.2:5248/ipxe/ipxe-arm64.efi"),
            (http, 16, false, Shim, "http://10.0.0.2:5248/bootx64.efi"),
        ];
        for &(class, arch, ipxe, loader, want) in table {
            assert_eq!(
                file_for(class, arch, ipxe, loader),
                want,
                "{class} arch {arch} ipxe {ipxe} {loader:?}"
            );
        }
    }

    #[test]
    fn an_offer_assigns_nothing_and_echoes_the_client() {
        let p = discover("PXEClient:Arch:00000:UNDI:002001", 0);
        let r = answer(&p, Port::Dhcp, UefiLoader::Ipxe, None).unwrap();
        assert_eq!((r.dest, r.message), (Dest::Broadcast, MessageType::Offer));
        assert!(r.bytes.len() >= MIN_REPLY);
        let m = decoded(&r);
        assert_eq!(m.opcode(), v4::Opcode::BootReply);
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(m.siaddr(), RACK);
        assert_eq!(m.xid(), 0x1234_5678);
        assert_eq!(m.chaddr(), MAC);
        assert!(m.flags().broadcast());
        // dhcproto keeps the NUL that ends the field.
        assert_eq!(m.fname(), Some(&b"pxelinux.0\0"[..]));
        let o = m.opts();
        assert_eq!(
            o.get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(RACK))
        );
        assert_eq!(
            o.get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
            o.get(OptionCode::ClientMachineIdentifier)
        else {
            panic!("no option 97: {o:?}");
        };
        assert_eq!(uuid.len(), 17);
        let Some(DhcpOption::VendorExtensions(v)) = o.get(OptionCode::VendorExtensions) else {
            panic!("no option 43: {o:?}");
        };
        assert!(v.starts_with(&[6, 1, 8]), "{v:?}");
        assert_eq!(v.last(), Some(&255));
    }

    #[test]
    fn uefi_and_http_offers_carry_no_vendor_options_and_http_echoes_httpclient() {
        let p = discover("PXEClient:Arch:00007", 7);
        let r = answer(&p, Port::Dhcp, UefiLoader::Ipxe, None).unwrap();
        let m = decoded(&r);
        assert!(m.opts().get(OptionCode::VendorExtensions).is_none());
        let p = discover("HTTPClient:Arch:00016", 16);
        let r = answer(&p, Port::Dhcp, UefiLoader::Ipxe, None).unwrap();
        let m = decoded(&r);
        assert_eq!(
            m.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
        );
    }

    #[test]
    fn the_pxe_port_acks_requests_only() {
        let req = packet(
            MessageType::Request,
            Some("PXEClient:Arch:00007"),
            Some(7),
            false,
        );
        let r = answer(&req, Port::Pxe, UefiLoader::Ipxe, None).unwrap();
        assert_eq!((r.dest, r.message), (Dest::Source, MessageType::Ack));
        assert_eq!(
            answer(&req, Port::Dhcp, UefiLoader::Ipxe, None),
            Err(DropReason::NotForUs)
        );
        let mut other = parse(&req).unwrap();
        other.server_id = Some(Ipv4Addr::new(10, 0, 0, 9));
        let p = policy(UefiLoader::Ipxe);
        assert_eq!(
            decide(&other, Port::Pxe, RACK, &p, None),
            Err(DropReason::NotForUs)
        );
        other.server_id = Some(RACK);
        assert!(decide(&other, Port::Pxe, RACK, &p, None).is_ok());
        let disc = discover("PXEClient", 7);
        assert_eq!(
            answer(&disc, Port::Pxe, UefiLoader::Ipxe, None),
            Err(DropReason::NotForUs)
        );
    }

    #[test]
    fn only_boot_clients_are_answered() {
        let plain = packet(MessageType::Discover, None, None, false);
        assert_eq!(parse(&plain).unwrap().mac, MAC);
        assert_eq!(
            answer(&plain, Port::Dhcp, UefiLoader::Ipxe, None),
            Err(DropReason::NotPxe)
        );
        let other = packet(MessageType::Discover, Some("MSFT 5.0"), None, false);
        assert_eq!(
            answer(&other, Port::Dhcp, UefiLoader::Ipxe, None),
            Err(DropReason::NotPxe)
        );
        let itanium = discover("PXEClient", 2);
        assert_eq!(
            answer(&itanium, Port::Dhcp, UefiLoader::Ipxe, None),
            Err(DropReason::UnsupportedArch)
        );
        // The architecture comes from option 60 when option 93 is missing.
        let p = packet(
            MessageType::Discover,
            Some("PXEClient:Arch:00011:UNDI:003016"),
            None,
            false,
        );
        assert_eq!(parse(&p).unwrap().arch, Some(11));
    }

    #[test]
    fn overrides() {
        let p = discover("PXEClient:Arch:00000", 0);
        let ipxe = packet(
            MessageType::Discover,
            Some("PXEClient:Arch:00000"),
            Some(0),
            true,
        );
        let efi = discover("PXEClient:Arch:00007", 7);
        let http = discover("HTTPClient:Arch:00016", 16);
        let file = |p: &[u8], o: &Override| {
            answer(p, Port::Dhcp, UefiLoader::Shim, Some(o)).map(|r| r.boot_file)
        };
        assert_eq!(file(&p, &Override::Local), Err(DropReason::Local));
        assert_eq!(file(&p, &Override::Ipxe).unwrap(), "ipxe/undionly.kpxe");
        assert_eq!(file(&efi, &Override::Ipxe).unwrap(), "ipxe/snponly.efi");
        assert!(file(&ipxe, &Override::Ipxe)
            .unwrap()
            .contains("/boot.ipxe?"));
        let own = Override::parse("bootloader/pxe/i386/pxelinux.0").unwrap();
        assert_eq!(file(&p, &own).unwrap(), "bootloader/pxe/i386/pxelinux.0");
        assert_eq!(file(&ipxe, &own).unwrap(), "bootloader/pxe/i386/pxelinux.0");
        assert_eq!(
            file(&http, &own).unwrap(),
            "http://10.0.0.2:5248/bootloader/pxe/i386/pxelinux.0"
        );
        let looped = Override::parse("ipxe/snponly.efi").unwrap();
        assert!(file(&ipxe, &looped).unwrap().contains("/boot.ipxe?"));
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "a b",
            "x;y",
            "$x",
            &"a".repeat(128),
        ] {
            assert!(Override::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostile_packets_are_dropped_not_panicked_on() {
        let good = discover("PXEClient", 0);
        for cut in 0..good.len() {
            let _ = parse(&good[..cut])
                .map(|r| decide(&r, Port::Dhcp, RACK, &policy(UefiLoader::Ipxe), None));
        }
        assert_eq!(parse(&good[..239]), Err(DropReason::Malformed));
        // A huge hlen must not reach chaddr().
        let mut bad = good.clone();
        bad[2] = 255;
        assert_eq!(parse(&bad), Err(DropReason::Malformed));
        // Hundreds of options, repeated (RFC 3396 concatenation) and overlong.
        let mut flood = good[..240].to_vec();
        flood.extend([53, 1, 1]);
        for i in 0..600u32 {
            flood.extend([60, 255]);
            flood.extend(std::iter::repeat_n((i % 251) as u8, 255));
        }
        flood.push(255);
        let r = parse(&flood).unwrap();
        assert_eq!(r.class, None);
        // Option 93 of one byte, option 97 of the wrong size, option 53 of two bytes.
        let mut odd = good[..240].to_vec();
        odd.extend([53, 1, 1, 60, 9]);
        odd.extend(b"PXEClient");
        odd.extend([93, 1, 7, 97, 3, 0, 1, 2, 94, 2, 1, 2, 255]);
        let r = parse(&odd).unwrap();
        assert_eq!((r.arch, r.uuid), (None, None));
        let mut two = good[..240].to_vec();
        two.extend([53, 2, 1, 1, 255]);
        assert_eq!(parse(&two), Err(DropReason::Malformed));
    }
}
