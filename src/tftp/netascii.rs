//! Netascii, converted on the fly as RFC 1350 says (LF → CR LF, CR → CR NUL); the
//! transfer size is that of the converted data. Knowing it means reading the file once
//! before the first reply, on the transfer thread, so netascii is served only for files
//! up to [`MAX_NETASCII_SOURCE`] (a scan of ~1 ms from the page cache; text files in a
//! boot tree are a few KiB); a larger one is refused with an ERROR asking for octet
//! mode. The alternative (no tsize, size found at the end) would let 40 netascii
//! readers of a 1 GiB squashfs still cost what 40 octet readers cost, but netascii of
//! a binary is never a real client, only load. A refusal costs nothing.

use std::collections::BTreeMap;

use super::resolver::Source;

/// Largest file served in netascii mode (see the module doc).
pub const MAX_NETASCII_SOURCE: u64 = 1 << 20;

/// Converts data to netascii on the fly with checkpoints at block starts, so a
/// retransmitted block is reproduced without rereading from the start.
pub(super) struct Netascii {
    /// converted offset → (source offset, pending second byte of a CR pair)
    checkpoints: BTreeMap<u64, (u64, Option<u8>)>,
    pub(super) size: u64,
}

impl Netascii {
    pub(super) fn new(src: &Source) -> std::io::Result<Netascii> {
        let mut buf = vec![0u8; 64 << 10];
        let (mut off, mut size) = (0u64, 0u64);
        loop {
            let n = src.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            size += n as u64
                + buf
                    .iter()
                    .take(n)
                    .filter(|b| **b == b'\n' || **b == b'\r')
                    .count() as u64;
            off += n as u64;
        }
        Ok(Netascii {
            checkpoints: BTreeMap::from([(0, (0, None))]),
            size,
        })
    }

    pub(super) fn read(
        &mut self,
        src: &Source,
        conv_off: u64,
        out: &mut [u8],
    ) -> std::io::Result<usize> {
        // Checkpoint 0 is never evicted, so there always is one at or before `conv_off`.
        let Some((&start, &(mut src_off, mut pending))) =
            self.checkpoints.range(..=conv_off).next_back()
        else {
            return Err(std::io::Error::other("netascii: no checkpoint"));
        };
        let mut pos = start;
        let mut n = 0;
        let mut chunk = vec![0u8; 4096];
        let cap = out.len();
        // Emits one converted byte (dropped while still before `conv_off`).
        let mut emit = |b: u8, pos: &mut u64, n: &mut usize| {
            if *pos >= conv_off {
                if let Some(o) = out.get_mut(*n) {
                    *o = b;
                    *n += 1;
                }
            }
            *pos += 1;
        };
        'outer: while n < cap {
            if let Some(p) = pending.take() {
                emit(p, &mut pos, &mut n);
                continue;
            }
            let got = src.read_at(&mut chunk, src_off)?;
            if got == 0 {
                break;
            }
            for &b in chunk.iter().take(got) {
                if n >= cap {
                    break 'outer;
                }
                src_off += 1;
                let second = match b {
                    b'\n' => Some(b'\n'),
                    b'\r' => Some(0),
                    _ => None,
                };
                match second {
                    None => emit(b, &mut pos, &mut n),
                    Some(s2) => {
                        emit(b'\r', &mut pos, &mut n);
                        if n >= cap {
                            pending = Some(s2);
                            break 'outer;
                        }
                        emit(s2, &mut pos, &mut n);
                    }
                }
            }
        }
        self.checkpoints.insert(pos, (src_off, pending));
        // Keep the map small: only recent block starts are ever revisited (a window
        // larger than this restarts a partial-ACK resend from an older checkpoint, at
        // worst from 0: slower, still right). Checkpoint 0 stays.
        while self.checkpoints.len() > 256 {
            let Some(&oldest) = self.checkpoints.keys().nth(1) else {
                break;
            };
            self.checkpoints.remove(&oldest);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn convert(data: &[u8], bs: usize, order: &[usize]) -> Vec<u8> {
        let src = Source::Bytes(Bytes::copy_from_slice(data));
        let mut n = Netascii::new(&src).unwrap();
        let blocks = (n.size as usize) / bs + 1;
        let mut out = vec![vec![]; blocks];
        for b in order
            .iter()
            .copied()
            .chain(0..blocks)
            .filter(|b| *b < blocks)
        {
            let mut buf = vec![0u8; bs];
            let len = n.read(&src, (b * bs) as u64, &mut buf).unwrap();
            buf.truncate(len);
            out[b] = buf;
        }
        out.concat()
    }

    #[test]
    fn netascii_conversion_with_retransmits() {
        let data = b"a\nb\r\nc\rd\n\n";
        let want = b"a\r\nb\r\0\r\nc\r\0d\r\n\r\n".to_vec();
        for bs in 1..8 {
            assert_eq!(convert(data, bs, &[]), want, "bs {bs}");
            assert_eq!(
                convert(data, bs, &[0, 1, 0, 2, 1, 3, 2]),
                want,
                "bs {bs} with resends"
            );
        }
    }
}
