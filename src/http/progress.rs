//! Send-progress watch: a connection whose writes make no progress for
//! `http.send_timeout` is closed.
//!
//! A client that asks for a file and never reads would otherwise hold its
//! connection slot, its body and the snapshot the body keeps (so that generation is
//! never collected) for as long as it likes. [`Watched`] wraps a connection's stream
//! and notes when a write (or flush) first found the socket full and when bytes
//! last went out; [`Stall::expired`] completes once a write has waited longer than
//! the limit, and the connection task then drops the connection, which releases
//! the body and its snapshot. A client that reads slowly but steadily is not cut off.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When a connection's writes started waiting, if they are waiting.
#[derive(Debug)]
pub struct Stall {
    base: Instant,
    /// Milliseconds after `base` (plus one) since when a write waits; 0: none waits.
    since: AtomicU64,
}

impl Default for Stall {
    fn default() -> Self {
        Stall {
            base: Instant::now(),
            since: AtomicU64::new(0),
        }
    }
}

impl Stall {
    fn waiting(&self) {
        if self.since.load(Ordering::Relaxed) == 0 {
            let now = self.base.elapsed().as_millis() as u64 + 1;
            self.since.store(now, Ordering::Relaxed);
        }
    }

    fn progressed(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    /// How long the current write has waited without progress.
    pub fn waited(&self) -> Option<Duration> {
        match self.since.load(Ordering::Relaxed) {
            0 => None,
            t => Some(
                self.base
                    .elapsed()
                    .saturating_sub(Duration::from_millis(t - 1)),
            ),
        }
    }

    /// Completes once a write has waited `limit` without any byte going out.
    pub async fn expired(&self, limit: Duration) {
        loop {
            let wait = match self.waited() {
                Some(w) if w >= limit => return,
                Some(w) => limit - w,
                None => limit,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A stream whose write progress is noted in a [`Stall`].
pub struct Watched<S> {
    inner: S,
    stall: Arc<Stall>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, stall: Arc<Stall>) -> Watched<S> {
        Watched { inner, stall }
    }

    fn note<T>(&self, r: Poll<io::Result<T>>, moved: impl Fn(&T) -> bool) -> Poll<io::Result<T>> {
        match &r {
            Poll::Pending => self.stall.waiting(),
            Poll::Ready(Ok(x)) if moved(x) => self.stall.progressed(),
            Poll::Ready(_) => {}
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(r, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r, |_| true)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn writes_to_a_client_that_never_reads_expire() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        let stall = Arc::new(Stall::default());
        let mut w = Watched::new(server, stall.clone());
        assert_eq!(stall.waited(), None);
        // Fill the socket buffers: the client never reads.
        let chunk = vec![0u8; 1 << 20];
        let writing = async {
            loop {
                w.write_all(&chunk).await.unwrap();
            }
        };
        let limit = Duration::from_millis(300);
        let start = Instant::now();
        tokio::select! {
            _ = writing => unreachable!(),
            _ = stall.expired(limit) => {}
        }
        assert!(start.elapsed() >= limit);
        assert!(stall.waited().unwrap() >= limit);
        drop(client);
    }
}
