//! Zero-copy file bodies on plain-TCP connections: `sendfile(2)` underneath hyper.
//!
//! hyper owns the connection and writes body frames through its IO type. On a plain
//! TCP connection that IO is [`SendfileStream`], and the connection task runs inside a
//! [`Pending`] scope. A [`super::files`] body polled in that scope does not read its
//! file: it records the file segment in the connection's queue and yields a
//! placeholder frame of the same length, a slice of [`placeholder`]. hyper queues
//! body frames without copying them (the writev strategy, forced in `serve`) and
//! hands them to `poll_write_vectored` in order; there each placeholder slice is
//! replaced by a `sendfile` of the segment at the head of the queue. The placeholder
//! memory is never read or sent.
//!
//! Consistency is checked, not assumed: a placeholder slice must be exactly the
//! unsent rest of the head segment (its offset in the placeholder and its length
//! both match), otherwise the connection fails with an error instead of sending
//! wrong bytes. Headers and other frames are written with `sendmsg(MSG_MORE)` when a
//! file segment follows, so a small response leaves in full packets.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Largest file segment per body frame (and the size of the placeholder).
pub const MAX_SEGMENT: usize = 4 << 20;

/// Zeroed memory that placeholder frames point into. Allocated zeroed and never
/// written or read, so its pages are never touched and cost no resident memory.
pub fn placeholder() -> &'static [u8] {
    static SPAN: OnceLock<&'static [u8]> = OnceLock::new();
    SPAN.get_or_init(|| Vec::leak(vec![0u8; MAX_SEGMENT]))
}

/// A file range to send in place of a placeholder frame.
pub struct Segment {
    file: Arc<File>,
    /// Next file offset to send.
    offset: u64,
    /// Bytes already sent.
    done: u64,
    /// Bytes still to send.
    left: u64,
    /// Where to count the bytes actually sent (metrics, by file class).
    sent: Option<(Arc<super::HttpMetrics>, crate::file_class::FileClass)>,
}

impl Segment {
    /// `len` bytes of `file` from `offset`; `len` is at most [`MAX_SEGMENT`].
    pub fn new(
        file: Arc<File>,
        offset: u64,
        len: u64,
        sent: Option<(Arc<super::HttpMetrics>, crate::file_class::FileClass)>,
    ) -> Segment {
        debug_assert!(len > 0 && len <= MAX_SEGMENT as u64);
        Segment {
            file,
            offset,
            done: 0,
            left: len,
            sent,
        }
    }
}

/// The file segments a connection still has to send, in body order.
#[derive(Default)]
pub struct Pending(Mutex<VecDeque<Segment>>);

tokio::task_local! {
    static PENDING: Arc<Pending>;
}

/// Runs a connection future with `pending` as the place file bodies queue into.
pub async fn scope<F: std::future::Future>(pending: Arc<Pending>, fut: F) -> F::Output {
    PENDING.scope(pending, fut).await
}

/// Queues `segment` on the current connection if it sends files with `sendfile`;
/// gives the segment back when it does not (TLS, or outside a connection).
pub fn enqueue(segment: Segment) -> Result<(), Segment> {
    let mut segment = Some(segment);
    let queued = PENDING.try_with(|p| {
        p.0.lock()
            .expect("pending lock")
            .push_back(segment.take().expect("once"));
    });
    match queued {
        Ok(()) => Ok(()),
        Err(_) => Err(segment.expect("not queued")),
    }
}

/// A plain TCP stream that sends placeholder slices with `sendfile`.
pub struct SendfileStream {
    stream: TcpStream,
    pending: Arc<Pending>,
}

impl SendfileStream {
    pub fn new(stream: TcpStream, pending: Arc<Pending>) -> SendfileStream {
        SendfileStream { stream, pending }
    }
}

/// Where `slice` starts in the placeholder, if it points into it.
fn placeholder_offset(slice: &[u8]) -> Option<usize> {
    let span = placeholder();
    let start = span.as_ptr() as usize;
    let p = slice.as_ptr() as usize;
    (!slice.is_empty() && p >= start && p + slice.len() <= start + span.len()).then(|| p - start)
}

fn mismatch(what: &str) -> io::Error {
    io::Error::other(format!("sendfile body out of step with hyper: {what}"))
}

impl SendfileStream {
    /// Sends (part of) the head segment for the placeholder slice `slice`.
    fn poll_segment(
        &self,
        cx: &mut Context<'_>,
        slice: &[u8],
        at: usize,
    ) -> Poll<io::Result<usize>> {
        let (file, offset, count) = {
            let q = self.pending.0.lock().expect("pending lock");
            let Some(seg) = q.front() else {
                return Poll::Ready(Err(mismatch("no segment queued")));
            };
            // A frame of n bytes is placeholder[..n]; after k bytes went out hyper
            // passes placeholder[k..n]: both ends must match the head segment.
            if seg.done != at as u64 || seg.left != slice.len() as u64 {
                return Poll::Ready(Err(mismatch("the placeholder is not the head segment")));
            }
            (seg.file.clone(), seg.offset, slice.len())
        };
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            // A short count means the socket buffer is full: report it to tokio as
            // WouldBlock too (from inside `try_io`, so an edge that arrives meanwhile
            // is not lost), and the next call waits for room instead of sending the
            // few bytes that drained since (nginx does the same; half the calls).
            let mut short = 0;
            let r = self.stream.try_io(Interest::WRITABLE, || {
                let n = sendfile(self.stream.as_raw_fd(), file.as_raw_fd(), offset, count)?;
                if n > 0 && n < count {
                    short = n;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            let r = match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(short),
                r => r,
            };
            match r {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while sending",
                    )))
                }
                Ok(n) => {
                    let mut q = self.pending.0.lock().expect("pending lock");
                    let seg = q.front_mut().expect("checked above");
                    seg.offset += n as u64;
                    seg.done += n as u64;
                    seg.left -= n as u64;
                    if let Some((m, class)) = &seg.sent {
                        m.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                        m.class_bytes[*class].fetch_add(n as u64, Ordering::Relaxed);
                    }
                    if seg.left == 0 {
                        q.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes ordinary slices; `more` says a file segment follows them.
    fn poll_plain(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        more: bool,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let r = self.stream.try_io(Interest::WRITABLE, || {
                use nix::sys::socket::MsgFlags;
                // nix has no name for MSG_MORE.
                let more = MsgFlags::from_bits_retain(if more { nix::libc::MSG_MORE } else { 0 });
                let flags = more | MsgFlags::MSG_NOSIGNAL;
                nix::sys::socket::sendmsg::<()>(self.stream.as_raw_fd(), bufs, &[], flags, None)
                    .map_err(io::Error::from)
            });
            match r {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// `sendfile(2)` of `count` bytes of `file` from `offset` to `socket`.
fn sendfile(socket: i32, file: i32, offset: u64, count: usize) -> io::Result<usize> {
    let mut off = offset as nix::libc::off_t;
    // SAFETY: both descriptors are open for the duration of the call (the socket by
    // the stream, the file by the segment's Arc); `off` is a valid local.
    let n = unsafe { nix::libc::sendfile(socket, file, &mut off, count) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let bufs = {
            let skip = bufs.iter().take_while(|b| b.is_empty()).count();
            &bufs[skip..]
        };
        let Some(first) = bufs.first() else {
            return Poll::Ready(Ok(0));
        };
        if let Some(at) = placeholder_offset(first) {
            return self.poll_segment(cx, first, at);
        }
        // Ordinary bytes up to the next placeholder (if any) in one sendmsg.
        let run = bufs
            .iter()
            .position(|b| placeholder_offset(b).is_some())
            .unwrap_or(bufs.len());
        self.poll_plain(cx, &bufs[..run.min(64)], run < bufs.len())
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected loopback pair: (server side wrapped, client side).
    async fn pair() -> (SendfileStream, Arc<Pending>, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let pending = Arc::new(Pending::default());
        (
            SendfileStream::new(server, pending.clone()),
            pending,
            client,
        )
    }

    fn file_of(data: &[u8]) -> Arc<File> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        Arc::new(f)
    }

    fn queue(p: &Pending, seg: Segment) {
        p.0.lock().unwrap().push_back(seg);
    }

    #[tokio::test]
    async fn placeholders_become_the_queued_file_ranges() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut server, pending, mut client) = pair().await;
        let file = file_of(&data);
        queue(&pending, Segment::new(file.clone(), 10, 1000, None));
        queue(&pending, Segment::new(file, 3000, 500, None));
        let span = placeholder();
        // Headers, then two body frames, as hyper hands them over.
        let mut parts: Vec<&[u8]> = vec![b"HEAD", &span[..1000], b"mid", &span[..500]];
        let mut sent = 0;
        while !parts.is_empty() {
            let bufs: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            let mut n = server.write_vectored(&bufs).await.unwrap();
            assert!(n > 0);
            sent += n;
            while n > 0 {
                let k = n.min(parts[0].len());
                parts[0] = &parts[0][k..];
                n -= k;
                if parts[0].is_empty() {
                    parts.remove(0);
                }
            }
        }
        assert_eq!(sent, 4 + 1000 + 3 + 500);
        assert!(pending.0.lock().unwrap().is_empty());
        let mut got = vec![0u8; sent];
        client.read_exact(&mut got).await.unwrap();
        let mut want = b"HEAD".to_vec();
        want.extend_from_slice(&data[10..1010]);
        want.extend_from_slice(b"mid");
        want.extend_from_slice(&data[3000..3500]);
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_placeholder_out_of_step_fails_instead_of_sending() {
        let (mut server, pending, _client) = pair().await;
        let span = placeholder();
        // Nothing queued.
        let e = server.write(&span[..100]).await.unwrap_err();
        assert!(e.to_string().contains("out of step"), "{e}");
        // Queued 100 bytes, but the slice claims 5 were already sent.
        queue(&pending, Segment::new(file_of(&[1; 100]), 0, 100, None));
        let e = server.write(&span[5..100]).await.unwrap_err();
        assert!(e.to_string().contains("out of step"), "{e}");
        // Right start, wrong length.
        let e = server.write(&span[..60]).await.unwrap_err();
        assert!(e.to_string().contains("out of step"), "{e}");
    }

    #[tokio::test]
    async fn bodies_queue_only_inside_a_connection_scope() {
        let seg = || Segment::new(file_of(b"x"), 0, 1, None);
        assert!(enqueue(seg()).is_err(), "no connection: read and copy");
        let pending = Arc::new(Pending::default());
        scope(pending.clone(), async { assert!(enqueue(seg()).is_ok()) }).await;
        assert_eq!(pending.0.lock().unwrap().len(), 1);
    }
}
