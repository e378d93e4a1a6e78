//! A window of DATA packets: read with one `preadv`, sent with one UDP GSO `sendmsg`
//! (`sendmmsg` where GSO is refused).
//!
//! A transfer keeps one buffer of DATA packets, laid out as they go on the wire
//! (`[4-byte header][block]` per slot), filled by one `preadv` per window (or per
//! ~16 KiB of read-ahead in lockstep), read right after the previous window went out so
//! the read overlaps the client's turn. A window goes out with one `send` using UDP
//! GSO (`UDP_SEGMENT`, segment size 4 + blksize) where the kernel allows it, else with
//! one `sendmmsg`; a transfer whose route refuses GSO (`EINVAL`/`EIO`, e.g. a segment
//! larger than the link MTU) falls back for the rest of its life. The buffer is at most
//! 64 KiB (and about one window or 16 KiB otherwise), so memory per transfer is
//! bounded and files are never loaded whole.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};

use super::engine::Transfer;
use super::netascii::Netascii;
use super::packet;
use super::resolver::Source;

/// Lockstep read-ahead: in windows smaller than this, the buffer holds several
/// windows, so a `preadv` serves several round trips.
const READ_AHEAD: usize = 16 << 10;
/// Most bytes a transfer buffers (one GSO send is at most 64 KiB anyway).
const MAX_BUFFER: usize = 64 << 10;
/// Most datagrams per `sendmmsg` and segments per GSO send (Linux's UDP_MAX_SEGMENTS
/// is 64 on older kernels), and slots per buffer.
const MAX_SEGMENTS: usize = 64;
/// Largest UDP payload (IPv4); one GSO send carries at most this much.
const MAX_UDP_PAYLOAD: usize = 65507;

/// Whether this kernel knows UDP GSO (`UDP_SEGMENT`, Linux 4.18), asked once.
pub(super) fn gso_supported(sock: &std::net::UdpSocket) -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let ok = socket::getsockopt(sock, sockopt::UdpGsoSegment).is_ok();
        if !ok {
            tracing::info!("tftp: no UDP GSO in this kernel; windows go out with sendmmsg");
        }
        ok
    })
}

/// DATA packets of consecutive blocks as they go on the wire: slot `k` holds block
/// `first + k` as `[DATA header][data]`.
pub(super) struct Window {
    pub(super) buf: Vec<u8>,
    /// 4 + blksize.
    slot: usize,
    /// Capacity in slots.
    cap: usize,
    /// Block index of slot 0 (0 = nothing buffered).
    first: u64,
    filled: usize,
}

impl Window {
    pub(super) fn new(blksize: usize, windowsize: usize) -> Window {
        let slot = 4 + blksize;
        let window = slot * windowsize.max(1);
        let want = if window >= READ_AHEAD {
            window
        } else {
            window * (READ_AHEAD / window)
        };
        let cap = (want.min(MAX_BUFFER) / slot).clamp(1, MAX_SEGMENTS);
        Window {
            buf: vec![0u8; cap * slot],
            slot,
            cap,
            first: 0,
            filled: 0,
        }
    }

    /// Makes blocks from `from` on (up to `to`) available, reading ahead when it has
    /// to read; returns the byte range in `buf` of the consecutive packets it has
    /// starting with block `from` (at least one), and how many packets that is.
    pub(super) fn fill(
        &mut self,
        from: u64,
        to: u64,
        t: &Transfer,
        size: u64,
        src: &Source,
        netascii: Option<&mut Netascii>,
    ) -> std::io::Result<(std::ops::Range<usize>, usize)> {
        let have = self.first != 0 && from >= self.first && from < self.first + self.filled as u64;
        if !have {
            let count = (t.last().saturating_sub(from) + 1).min(self.cap as u64) as usize;
            self.first = from;
            self.filled = 0;
            self.read(from, count, t, size, src, netascii)?;
            self.filled = count;
        }
        let k = (from - self.first) as usize;
        let end_block = to.min(self.first + self.filled as u64 - 1);
        let n = (end_block - from + 1) as usize;
        let last_len = t.block_range(end_block, size).1;
        let start = k * self.slot;
        let end = (k + n - 1) * self.slot + 4 + last_len;
        Ok((start..end, n))
    }

    /// Reads blocks `from .. from + count` into slots `0..count` and writes headers.
    fn read(
        &mut self,
        from: u64,
        count: usize,
        t: &Transfer,
        size: u64,
        src: &Source,
        netascii: Option<&mut Netascii>,
    ) -> std::io::Result<()> {
        let slot = self.slot;
        let len = |k: usize| t.block_range(from + k as u64, size).1;
        // Slots are 4 + blksize bytes and a block is at most blksize: the ranges below
        // are in bounds; a miss would be a bug, reported as an error of this transfer.
        let bug = || std::io::Error::other("window slot out of range");
        let slots = self
            .buf
            .get_mut(..count * slot)
            .ok_or_else(bug)?
            .chunks_mut(slot);
        if let Some(n) = netascii {
            for (k, s) in slots.enumerate() {
                let (off, l) = t.block_range(from + k as u64, size);
                if n.read(src, off, s.get_mut(4..4 + l).ok_or_else(bug)?)? != l {
                    return Err(std::io::Error::other("file shrank during the transfer"));
                }
            }
        } else {
            let want: usize = (0..count).map(len).sum();
            let off = t.block_range(from, size).0;
            let mut iov: Vec<IoSliceMut<'_>> = slots
                .enumerate()
                .map(|(k, s)| s.get_mut(4..4 + len(k)).map(IoSliceMut::new))
                .collect::<Option<_>>()
                .ok_or_else(bug)?;
            let got = src.read_vectored_at(&mut iov, off)?;
            drop(iov);
            if got < want {
                // Short read (rare): finish slot by slot.
                let mut done = 0;
                for k in 0..count {
                    let l = len(k);
                    let have = got.saturating_sub(done).min(l);
                    if have < l {
                        let s = self
                            .buf
                            .get_mut(k * slot + 4 + have..k * slot + 4 + l)
                            .ok_or_else(bug)?;
                        if src.read_at(s, off + (done + have) as u64)? != l - have {
                            return Err(std::io::Error::other("file shrank during the transfer"));
                        }
                    }
                    done += l;
                }
            }
        }
        for k in 0..count {
            let wire = ((from + k as u64) % 65536) as u16;
            packet::data_header(self.buf.get_mut(k * slot..).unwrap_or_default(), wire);
        }
        Ok(())
    }
}

/// Errors with which the kernel refuses a GSO send that a plain send would pass:
/// segment larger than the route's MTU, no checksum offload, IPsec, …
fn gso_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::EIO | Errno::EMSGSIZE | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT)
    )
}

/// Sends a prefix of `data` (consecutive packets of `segment` bytes, the last one
/// possibly shorter) without blocking: one plain `send` for a single packet, else one
/// GSO `sendmsg` (while `gso` holds; a refusal turns it off) or one `sendmmsg`.
/// Returns how many bytes (whole packets, at least one) went out, or `WouldBlock`.
pub(super) fn send_some(
    sock: &std::net::UdpSocket,
    data: &[u8],
    segment: usize,
    gso: &mut bool,
) -> std::io::Result<usize> {
    if data.len() <= segment {
        return sock.send(data).map(|_| data.len());
    }
    if *gso {
        let per_send = (MAX_UDP_PAYLOAD / segment).clamp(1, MAX_SEGMENTS) * segment;
        let n = data.len().min(per_send);
        let seg = segment as u16;
        let r = socket::sendmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &[IoSlice::new(data.get(..n).unwrap_or(data))],
            &[ControlMessage::UdpGsoSegments(&seg)],
            MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from);
        match r {
            Ok(_) => return Ok(n),
            Err(e) if gso_refused(&e) => {
                *gso = false;
                tracing::debug!("tftp: GSO refused ({e}); this transfer uses sendmmsg");
            }
            Err(e) => return Err(e),
        }
    }
    sendmmsg_now(sock, data, segment)
}

/// One `sendmmsg` of up to [`MAX_SEGMENTS`] packets from `data`; returns the bytes of
/// the packets sent (at least one).
fn sendmmsg_now(sock: &std::net::UdpSocket, data: &[u8], segment: usize) -> std::io::Result<usize> {
    let packets: Vec<[IoSlice<'_>; 1]> = data
        .chunks(segment)
        .take(MAX_SEGMENTS)
        .map(|p| [IoSlice::new(p)])
        .collect();
    let addrs: Vec<Option<SockaddrStorage>> = vec![None; packets.len()];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(packets.len(), None);
    let no_cmsgs: [ControlMessage<'_>; 0] = [];
    let count = socket::sendmmsg(
        sock.as_raw_fd(),
        &mut headers,
        &packets,
        &addrs,
        no_cmsgs,
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?
    .count();
    Ok(packets.iter().take(count).map(|[p]| p.len()).sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::test_pattern as pattern;
    use std::time::Duration;

    #[test]
    fn a_route_that_refuses_gso_falls_back_to_sendmmsg() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let segment = 1472;
        assert!(gso_supported(&tx), "loopback takes GSO");
        // GSO works: three packets in one send.
        let mut gso = true;
        let data = pattern(segment * 2 + 100, 7);
        assert_eq!(
            send_some(&tx, &data, segment, &mut gso).unwrap(),
            data.len()
        );
        assert!(gso);
        let mut buf = [0u8; 2000];
        for chunk in data.chunks(segment) {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], chunk);
        }
        // Checksums off (SO_NO_CHECK): the kernel refuses GSO with EINVAL, as it does
        // for a segment bigger than the route's MTU (blksize 8192 on a 1500-byte link).
        let one: nix::libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own with a c_int option value.
        let r = unsafe {
            nix::libc::setsockopt(
                tx.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                nix::libc::SO_NO_CHECK,
                (&one as *const nix::libc::c_int).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let data = pattern(segment * 2 + 100, 9);
        assert_eq!(
            send_some(&tx, &data, segment, &mut gso).unwrap(),
            data.len()
        );
        assert!(!gso, "GSO off for the rest of the transfer");
        for chunk in data.chunks(segment) {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], chunk);
        }
    }

    #[test]
    fn window_buffer_is_bounded_and_reads_ahead_in_lockstep() {
        for (bs, ws) in [
            (512, 1),
            (1468, 1),
            (1468, 8),
            (1468, 64),
            (8192, 64),
            (65464, 64),
            (8, 64),
        ] {
            let w = Window::new(bs, ws);
            assert!(w.buf.len() <= MAX_BUFFER.max(4 + bs), "{bs}/{ws}");
            assert!(w.cap >= 1 && w.cap <= MAX_SEGMENTS);
        }
        assert_eq!(Window::new(1468, 1).cap, (16 << 10) / 1472);
        assert_eq!(Window::new(1468, 8).cap, 8, "one window per read");
        assert_eq!(Window::new(512, 4).cap, 28, "whole windows of read-ahead");
    }
}
