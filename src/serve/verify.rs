//! The daemon's scheduled store check (`[store] verify_interval`): [`crate::fsck::check`]
//! on a thread of its own at idle I/O priority, its time kept in `state_dir/fsck.json`
//! so a restart neither repeats it at once nor puts it off for ever.

use std::fs;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

const STAMP_FILE: &str = "fsck.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Stamp {
    /// Unix seconds of the last check (or of the first start, before any).
    last: u64,
    problems: Option<u64>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// When the store was last checked (the stamp's time, restoring its problem
/// count for the metrics); a first start stamps now, so the first check waits a
/// whole interval.
fn last_check(stamp_path: &std::path::Path) -> u64 {
    let stamp: Option<Stamp> = fs::read(stamp_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match &stamp {
        Some(s) => {
            if let Some(p) = s.problems {
                crate::fsck::VERIFY
                    .problems
                    .store(p as i64, Ordering::Relaxed);
                crate::fsck::VERIFY
                    .finished
                    .store(s.last, Ordering::Relaxed);
            }
            s.last
        }
        None => {
            let s = Stamp {
                last: now_unix(),
                problems: None,
            };
            let json = serde_json::to_vec(&s).expect("stamp serialises");
            let _ = crate::store::atomic_write(stamp_path, &json);
            s.last
        }
    }
}

/// Logs a finished check, updates the metrics and the stamp, and starts a sync
/// when blobs were quarantined.
fn record_check(d: &super::Daemon, stamp_path: &std::path::Path, r: &crate::fsck::Report) {
    for p in &r.problems {
        tracing::warn!("store check: {p}");
    }
    tracing::info!(
        "store check: {} blobs ({}) re-hashed, {} files in {} generations, {} problems",
        r.blobs,
        crate::sync::human_bytes(r.bytes),
        r.files,
        r.generations,
        r.problems.len()
    );
    let n = r.problems.len() as u64;
    let end = now_unix();
    crate::fsck::VERIFY
        .problems
        .store(n as i64, Ordering::Relaxed);
    crate::fsck::VERIFY.finished.store(end, Ordering::Relaxed);
    let json = serde_json::to_vec(&Stamp {
        last: end,
        problems: Some(n),
    })
    .expect("stamp serialises");
    if let Err(e) = crate::store::atomic_write(stamp_path, &json) {
        tracing::warn!("cannot write {}: {e}", stamp_path.display());
    }
    if r.problems.iter().any(|p| p.repaired.is_some()) {
        d.trigger.notify_one();
    }
}

/// The daemon's schedule (`[store] verify_interval`): every interval, on a thread
/// of its own at idle I/O priority, under the sync lock (retried in a minute when a
/// sync holds it). Problems are logged one per line and counted in
/// `rackboot_store_problems`; with `verify_repair` bad blobs are quarantined and a
/// sync is started to fetch them again.
pub async fn verify_loop(
    d: std::sync::Arc<super::Daemon>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let settings = d.settings();
        let Some(interval) = settings.store.verify_interval else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => continue,
            }
        };
        let stamp_path = settings.state_dir.join(STAMP_FILE);
        let last = last_check(&stamp_path);
        let due = last.saturating_add(interval.as_secs());
        let wait = std::time::Duration::from_secs(due.saturating_sub(now_unix()).clamp(1, 3600));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if now_unix() < due {
            continue; // re-read the settings and the stamp (SIGHUP may change them)
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (store, repair) = (
            crate::store::Store::existing(&settings.state_dir),
            settings.store.verify_repair,
        );
        // A thread of its own: the idle I/O class sticks to the thread.
        let spawned = std::thread::Builder::new()
            .name("fsck".into())
            .spawn(move || {
                if let Err(e) = crate::fsck::idle_io_priority() {
                    tracing::debug!("store check: cannot lower the I/O priority: {e}");
                }
                let r = match store.try_lock() {
                    Ok(Some(_lock)) => crate::fsck::check(&store, repair).map(Some),
                    Ok(None) => Ok(None),
                    Err(e) => Err(io::Error::other(format!("{e:#}"))),
                };
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            tracing::warn!("store check: cannot start a thread: {e}");
            continue;
        }
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = rx => r,
        };
        match r {
            Ok(Ok(Some(r))) => {
                record_check(&d, &stamp_path, &r);
            }
            Ok(Ok(None)) => {
                tracing::debug!("store check: a sync is running; trying again later");
                let retry = interval.min(std::time::Duration::from_secs(60));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("store check failed: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                }
            }
            Err(_) => tracing::warn!("store check: the thread ended without a result"),
        }
    }
}
