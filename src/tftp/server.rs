//! The TFTP server: drives [`super::engine::Transfer`] over UDP sockets. This file
//! holds its settings, its counters and its life: [`serve`] starts the transfer
//! threads (`worker`) and the listeners (`listen`), waits for shutdown, drains the
//! transfers in flight and stops the threads. Windows are read and sent by `window`,
//! netascii is converted by `netascii`; what is served comes from a `Resolver`
//! (`resolver`).
//!
//! Threads: the listeners run on the caller's tokio runtime and hand each request
//! straight to one of a few transfer threads (one per core by default; the least busy
//! one), each an epoll loop over its transfers' sockets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::listen::{spawn_listeners, Dispatch};
use super::resolver::Resolver;
use super::worker;
use crate::file_class::ClassCounters;

/// Server settings.
#[derive(Clone, Debug)]
pub struct TftpConfig {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// Retransmission timeout unless the client negotiates one.
    pub timeout: Duration,
    pub retries: u32,
    pub max_transfers: usize,
    /// Transfers one client address may run at once (more are refused): one host
    /// cannot take every slot.
    pub max_transfers_per_client: usize,
    /// Transfer threads; 0 = one per core.
    pub workers: usize,
    /// Send windows with UDP GSO where the kernel accepts it (else `sendmmsg`).
    pub segmentation_offload: bool,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            max_blksize: 1468,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            retries: 5,
            max_transfers: 4096,
            max_transfers_per_client: 64,
            workers: 0,
            segmentation_offload: true,
        }
    }
}

/// Counters exported by `/metrics`.
#[derive(Debug, Default)]
pub struct TftpMetrics {
    pub requests: AtomicU64,
    pub transfers_ok: AtomicU64,
    pub transfers_failed: AtomicU64,
    pub tsize_probes: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub in_flight: AtomicU64,
    pub not_found: AtomicU64,
    pub access_violation: AtomicU64,
    pub illegal_op: AtomicU64,
    pub timeouts: AtomicU64,
    /// Timeouts of transfers whose client never ACKed (spoofed or dead sources).
    pub unacknowledged: AtomicU64,
    pub aborted: AtomicU64,
    pub busy: AtomicU64,
    pub class_bytes: ClassCounters,
    pub class_requests: ClassCounters,
}

pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Waits for the transfers in flight to end, up to `drain_deadline`.
async fn drain(d: &Dispatch, drain_deadline: Duration) {
    let running = d
        .active
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len();
    if running > 0 {
        tracing::info!("tftp: draining {running} transfers");
        let deadline = tokio::time::Instant::now() + drain_deadline;
        loop {
            let notified = d.idle.notified();
            if d.active
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
            {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    "tftp: drain deadline passed; aborting {} transfers",
                    d.active
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .len()
                );
                break;
            }
        }
    }
}

/// Serves until `shutdown`, then drains transfers for up to `drain_deadline`. Every
/// transfer holds a socket and a file: the caller raises the open-files limit
/// (`daemon::serve` does, before binding).
pub async fn serve(
    sockets: Vec<std::net::UdpSocket>,
    resolver: Arc<dyn Resolver>,
    config: TftpConfig,
    metrics: Arc<TftpMetrics>,
    shutdown: CancellationToken,
    drain_deadline: Duration,
) -> std::io::Result<()> {
    let n = match config.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let (d, wake_rx) = Dispatch::new(resolver, config, metrics, n)?;
    let d = Arc::new(d);
    let mut threads = Vec::new();
    let started = worker::spawn(&d, wake_rx, &mut threads)
        .and_then(|()| spawn_listeners(&d, sockets, &shutdown));
    let mut listeners = match started {
        Ok(l) => l,
        Err(e) => {
            stop_workers(&d);
            return Err(e);
        }
    };
    shutdown.cancelled().await;
    listeners.abort_all();
    while listeners.join_next().await.is_some() {}
    drain(&d, drain_deadline).await;
    stop_workers(&d);
    drop(d);
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    Ok(())
}

fn stop_workers(d: &Dispatch) {
    d.stop.store(true, Ordering::SeqCst);
    for w in &d.workers {
        let _ = w.wake.send(&[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::packet::{self, Packet};
    use crate::tftp::test_pattern as pattern;
    use crate::tftp::DirResolver;
    use std::net::SocketAddr;

    /// A minimal RFC 7440 client: RRQ with `opts`, ACK 0 after an OACK, ACK after
    /// every full window, on a gap and at the end. Returns the file and checks that
    /// every packet came from one transfer port.
    fn fetch(server: SocketAddr, name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(&packet::rrq(name, "octet", opts), server)
            .unwrap();
        let (mut bs, mut ws) = (512usize, 1u64);
        let mut buf = vec![0u8; 70000];
        let mut out = Vec::new();
        let (mut expect, mut in_window) = (1u64, 0u64);
        let mut peer = None;
        for _ in 0..10_000_000 {
            let (n, from) = sock.recv_from(&mut buf).expect("a packet within 5 s");
            assert!(peer.is_none_or(|p| p == from), "packets from two ports");
            peer = Some(from);
            let Ok(pkt) = packet::parse(&buf[..n]) else {
                panic!(
                    "bad packet of {n} bytes after block {expect}: {:?}",
                    &buf[..n.min(32)]
                );
            };
            match pkt {
                Packet::Oack { options } => {
                    for (k, v) in options {
                        match k.as_str() {
                            "blksize" => bs = v.parse().unwrap(),
                            "windowsize" => ws = v.parse().unwrap(),
                            _ => {}
                        }
                    }
                    sock.send_to(&packet::ack(0), from).unwrap();
                }
                Packet::Data { block, data } => {
                    if block == (expect % 65536) as u16 {
                        out.extend_from_slice(data);
                        in_window += 1;
                        if data.len() < bs {
                            sock.send_to(&packet::ack(block), from).unwrap();
                            return out;
                        }
                        expect += 1;
                        if in_window == ws {
                            in_window = 0;
                            sock.send_to(&packet::ack(block), from).unwrap();
                        }
                    } else if block != ((expect - 1) % 65536) as u16 {
                        in_window = 0;
                        sock.send_to(&packet::ack(((expect - 1) % 65536) as u16), from)
                            .unwrap();
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("no end");
    }

    /// Runs the server on 127.0.0.1 over a temp dir holding `files`.
    fn start(
        files: &[(&str, Vec<u8>)],
        config: TftpConfig,
    ) -> (
        SocketAddr,
        CancellationToken,
        tempfile::TempDir,
        std::thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in files {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (root, s) = (dir.path().to_path_buf(), stop.clone());
        let th = std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
                .block_on(serve(
                    vec![sock],
                    Arc::new(DirResolver { root }),
                    config,
                    Arc::default(),
                    s,
                    Duration::from_secs(1),
                ))
                .unwrap();
        });
        (addr, stop, dir, th)
    }

    #[test]
    fn windows_with_gso_and_with_sendmmsg_arrive_whole() {
        let sizes = [0usize, 1, 511, 512, 8192 * 3, 300_001];
        let files: Vec<(String, Vec<u8>)> = sizes
            .iter()
            .map(|n| (format!("f{n}"), pattern(*n, *n as u8)))
            .collect();
        let refs: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
        for gso in [true, false] {
            let config = TftpConfig {
                max_blksize: 8192,
                segmentation_offload: gso,
                ..TftpConfig::default()
            };
            let (addr, stop, _dir, th) = start(&refs, config);
            for (name, want) in &files {
                for bs in ["512", "1468", "8192"] {
                    for ws in ["1", "4", "16", "64"] {
                        let got = fetch(addr, name, &[("blksize", bs), ("windowsize", ws)]);
                        assert!(
                            got == *want,
                            "{name} bs {bs} ws {ws} gso {gso}: {} bytes",
                            got.len()
                        );
                    }
                }
            }
            // Plain RFC 1350 (no options) too.
            assert_eq!(fetch(addr, "f300001", &[]), files[5].1);
            stop.cancel();
            th.join().unwrap();
        }
    }

    #[test]
    fn block_numbers_roll_over_in_windows() {
        // 70 000 blocks of 8 bytes: the wire numbers wrap past 65535 to 0.
        let data = pattern(70_000 * 8 + 5, 3);
        let (addr, stop, _dir, th) = start(&[("big", data.clone())], TftpConfig::default());
        assert!(fetch(addr, "big", &[("blksize", "8"), ("windowsize", "64")]) == data);
        stop.cancel();
        th.join().unwrap();
    }
}
