//! A small, fast TFTP read client for the benchmarks (the same client against every
//! server): RFC 1350 + blksize/tsize/windowsize (RFC 7440 receiver rules: ACK the last
//! in-order block after a full window, at the end, or on a gap), hashing what arrives.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Result};
use sha2::{Digest, Sha256};

/// Downloads `path`; returns (bytes, sha256 hex).
pub fn download(
    server: SocketAddr,
    path: &str,
    blksize: u16,
    windowsize: u16,
) -> Result<(u64, String)> {
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    })?;
    sock.set_read_timeout(Some(Duration::from_millis(1000)))?;
    let mut rrq = vec![0u8, 1];
    let mut opt = |k: &str, v: &str| {
        rrq.extend_from_slice(k.as_bytes());
        rrq.push(0);
        rrq.extend_from_slice(v.as_bytes());
        rrq.push(0);
    };
    opt(path, "octet");
    opt("blksize", &blksize.to_string());
    opt("tsize", "0");
    if windowsize > 1 {
        opt("windowsize", &windowsize.to_string());
    }
    sock.send_to(&rrq, server)?;
    let mut buf = vec![0u8; 65536];
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut bs = 512usize;
    let mut ws = 1u16;
    let mut expect: u16 = 1;
    let mut in_window = 0u16;
    let mut retries = 0;
    let mut peer: Option<SocketAddr> = None;
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                retries += 1;
                if retries > 5 {
                    bail!("{path}: timed out at {total} bytes");
                }
                match peer {
                    None => sock.send_to(&rrq, server)?,
                    Some(p) => sock.send_to(&ack(expect.wrapping_sub(1)), p)?,
                };
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if peer.is_some_and(|p| p != from) {
            continue;
        }
        peer = Some(from);
        retries = 0;
        if n < 4 {
            continue;
        }
        let op = u16::from_be_bytes([buf[0], buf[1]]);
        match op {
            6 => {
                // OACK: take what the server accepted, ACK 0.
                let parts: Vec<&[u8]> = buf[2..n].split(|b| *b == 0).collect();
                for kv in parts.chunks(2) {
                    if kv.len() < 2 {
                        continue;
                    }
                    let (k, v) = (
                        String::from_utf8_lossy(kv[0]).to_lowercase(),
                        String::from_utf8_lossy(kv[1]).to_string(),
                    );
                    match k.as_str() {
                        "blksize" => bs = v.parse().unwrap_or(512),
                        "windowsize" => ws = v.parse().unwrap_or(1),
                        _ => {}
                    }
                }
                sock.send_to(&ack(0), from)?;
            }
            3 => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                let data = &buf[4..n];
                if block == expect {
                    hasher.update(data);
                    total += data.len() as u64;
                    let last = data.len() < bs;
                    expect = expect.wrapping_add(1);
                    in_window += 1;
                    if last {
                        sock.send_to(&ack(block), from)?;
                        return Ok((total, hex::encode(hasher.finalize())));
                    }
                    if in_window >= ws {
                        in_window = 0;
                        sock.send_to(&ack(block), from)?;
                    }
                } else if block != expect.wrapping_sub(1) {
                    // A gap: ACK what we have so the server resends from there.
                    in_window = 0;
                    sock.send_to(&ack(expect.wrapping_sub(1)), from)?;
                }
            }
            5 => bail!(
                "{path}: server error {}",
                String::from_utf8_lossy(&buf[4..n])
            ),
            _ => {}
        }
    }
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}
