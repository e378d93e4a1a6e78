//! Receiving UDP datagrams with their packet info (`IP_PKTINFO`, `IPV6_RECVPKTINFO`):
//! the address a datagram was sent to and the interface it came in on, which a server
//! listening on a wildcard address needs to answer from the right address and out of
//! the right interface. Shared by the transports that do so (`dhcp`, `tftp`); what they
//! make of the packet info stays with them.
//!
//! No panic path (declared with `no_panic_path!`): it reads packets from the network.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Asks the kernel for the packet info of every datagram `sock` receives
/// (`IP_PKTINFO` for an IPv4 socket, `IPV6_RECVPKTINFO` for an IPv6 one).
pub fn enable(sock: &impl AsFd, ipv6: bool) -> nix::Result<()> {
    if ipv6 {
        socket::setsockopt(sock, sockopt::Ipv6RecvPacketInfo, &true)
    } else {
        socket::setsockopt(sock, sockopt::Ipv4PacketInfo, &true)
    }
}

/// A datagram as received into the caller's buffer.
#[derive(Clone, Copy, Debug)]
pub struct Datagram {
    /// Bytes in the buffer.
    pub len: usize,
    /// It was longer than the buffer (`MSG_TRUNC`).
    pub truncated: bool,
    pub from: SocketAddr,
    /// The packet info, if the kernel sent one (the last, if several).
    pub info: Option<PacketInfo>,
}

/// Where a datagram went.
#[derive(Clone, Copy, Debug)]
pub struct PacketInfo {
    /// The destination address in the datagram's header.
    pub dst: IpAddr,
    /// IPv4 only: the local address the kernel would send replies from
    /// (`ipi_spec_dst`).
    pub spec_dst: Option<Ipv4Addr>,
    /// The interface it came in on.
    pub ifindex: u32,
}

/// One `recvmsg` on a non-blocking socket; `WouldBlock` when nothing is queued.
fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<Datagram> {
    sock.try_io(Interest::READABLE, || {
        let mut iov = [IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(nix::libc::in6_pktinfo, nix::libc::in_pktinfo);
        let msg = socket::recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        let mut info = None;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            match c {
                ControlMessageOwned::Ipv4PacketInfo(pi) => {
                    info = Some(PacketInfo {
                        dst: IpAddr::V4(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr))),
                        spec_dst: Some(Ipv4Addr::from(u32::from_be(pi.ipi_spec_dst.s_addr))),
                        ifindex: u32::try_from(pi.ipi_ifindex).unwrap_or(0),
                    });
                }
                ControlMessageOwned::Ipv6PacketInfo(pi) => {
                    info = Some(PacketInfo {
                        dst: IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr)),
                        spec_dst: None,
                        ifindex: pi.ipi6_ifindex,
                    });
                }
                _ => {}
            }
        }
        let from = msg
            .address
            .and_then(|a: SockaddrStorage| {
                if let Some(v4) = a.as_sockaddr_in() {
                    Some(SocketAddr::from(SocketAddrV4::from(*v4)))
                } else {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(SocketAddrV6::from(*v6)))
                }
            })
            .ok_or_else(|| io::Error::other("datagram without a source address"))?;
        Ok(Datagram {
            len: msg.bytes,
            truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
            from,
            info,
        })
    })
}

/// The next datagram on `sock` (a wake-up with nothing queued is waited out); `None`
/// once `shutdown` is cancelled or the socket cannot be polled. A receive error is
/// returned for the caller to log: the next call goes on receiving.
pub async fn next(
    sock: &UdpSocket,
    buf: &mut [u8],
    shutdown: &CancellationToken,
) -> Option<io::Result<Datagram>> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = sock.readable() => if r.is_err() { return None },
        }
        match recv(sock, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Some(r),
        }
    }
}
