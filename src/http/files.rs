//! Static files from a directory tree: GET/HEAD, a single Range (206/416), strong
//! ETags with If-None-Match / If-Modified-Since / If-Range, Last-Modified, correct
//! Content-Type and Content-Length, streamed in large chunks without buffering the file.
//!
//! Paths are percent-decoded; repeated `/` and `.` collapse (UEFI HTTP boot asks for
//! `//grubx64.efi`); any `..` segment, NUL or backslash is a 400; a symlink whose target
//! leaves the root is a 404, as are directories. The root may itself be a symlink; it is
//! resolved per request, and an open response keeps streaming the file it opened.
//! Several ranges in one request get the whole file (200), which RFC 9110 allows.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Response, StatusCode};

use super::{empty, full, Body};

/// Bytes read and sent per body chunk.
const CHUNK: usize = 512 << 10;

/// Serves files below `root`.
#[derive(Clone)]
pub struct StaticFiles {
    root: PathBuf,
    /// The root opened once (a snapshot); without it the path is opened per request.
    root_fd: Option<Arc<std::os::fd::OwnedFd>>,
    metrics: Option<Arc<super::HttpMetrics>>,
    /// Held by every response body (e.g. the snapshot the files belong to).
    keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for StaticFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticFiles")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// Why a request path is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// Malformed or hostile (`..`, NUL, bad escapes): 400.
    Bad,
}

/// Percent-decodes and normalises a request path into a relative path.
pub fn clean_path(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::Bad)?;
            let s = std::str::from_utf8(hex).map_err(|_| PathError::Bad)?;
            out.push(u8::from_str_radix(s, 16).map_err(|_| PathError::Bad)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).map_err(|_| PathError::Bad)?;
    if decoded.contains('\0') || decoded.contains('\\') {
        return Err(PathError::Bad);
    }
    let mut parts = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => return Err(PathError::Bad),
            s => parts.push(s),
        }
    }
    Ok(parts.join("/"))
}

/// The Content-Type of a served file. Files come from upstream, so no name makes
/// them active content (HTML, script, style, SVG) on the rack's origin: anything
/// that is not metadata or a config is `application/octet-stream`.
pub fn content_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext {
        "json" => "application/json",
        "sjson" | "txt" | "cfg" | "ipxe" | "lst" | "meta" => "text/plain; charset=utf-8",
        "gpg" => "application/pgp-keys",
        _ if name.starts_with("grub.cfg") || name.starts_with("ipxe.cfg") => {
            "text/plain; charset=utf-8"
        }
        _ => "application/octet-stream",
    }
}

fn etag(meta: &std::fs::Metadata) -> String {
    format!(
        "\"{:x}-{:x}-{:x}\"",
        meta.ino(),
        meta.len(),
        meta.mtime_nsec() as u64 ^ ((meta.mtime() as u64) << 20)
    )
}

fn status(code: StatusCode, msg: &'static str) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(msg))
        .expect("valid response")
}

/// `Range: bytes=…` → `(start, end_inclusive)`; `Err(())` when unsatisfiable;
/// `Ok(None)` when absent, malformed or multi-range (serve everything).
fn parse_range(value: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.is_empty(), b.is_empty()) {
        (true, true) => return Ok(None),
        (true, false) => {
            let Ok(n) = b.parse::<u64>() else {
                return Ok(None);
            };
            if n == 0 || len == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len - 1)
        }
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else {
                return Ok(None);
            };
            let end = if b.is_empty() {
                u64::MAX
            } else {
                match b.parse::<u64>() {
                    Ok(e) if e >= start => e,
                    _ => return Ok(None),
                }
            };
            if start >= len {
                return Err(());
            }
            (start, end.min(len - 1))
        }
    };
    Ok(Some(range))
}

fn etag_matches(list: &str, tag: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == tag)
}

impl StaticFiles {
    pub fn new(root: PathBuf) -> StaticFiles {
        StaticFiles {
            root,
            root_fd: None,
            metrics: None,
            keep: None,
        }
    }

    /// Resolves below an already opened root directory (`root` names it in errors).
    /// The tree must not change while it is served (a snapshot): its small files are
    /// kept open between requests (see [`open_files`]).
    pub fn with_fd(root: PathBuf, fd: Arc<std::os::fd::OwnedFd>) -> StaticFiles {
        StaticFiles {
            root,
            root_fd: Some(fd),
            metrics: None,
            keep: None,
        }
    }

    /// Counts requests and body bytes actually sent, by file class.
    pub fn counting(mut self, metrics: Arc<super::HttpMetrics>) -> StaticFiles {
        self.metrics = Some(metrics);
        self
    }

    /// Keeps `what` alive until every body this serves has been sent or dropped.
    pub fn keeping(mut self, what: Arc<dyn std::any::Any + Send + Sync>) -> StaticFiles {
        self.keep = Some(what);
        self
    }

    /// Opens `rel` below the root, refusing anything that resolves outside it. Below
    /// an opened root (an immutable snapshot) small files stay open in a per-thread
    /// cache (see [`open_files`]).
    fn open(&self, rel: &str) -> Option<(Arc<File>, std::fs::Metadata)> {
        use std::os::fd::AsFd;
        match &self.root_fd {
            Some(fd) => {
                if let Some(hit) = open_files::get(fd, rel) {
                    return Some(hit);
                }
                let (file, meta) = crate::fsutil::open_beneath(fd.as_fd(), &self.root, rel).ok()?;
                let file = Arc::new(file);
                open_files::put(fd, rel, &file, &meta);
                Some((file, meta))
            }
            None => crate::fsutil::open_beneath_path(&self.root, rel)
                .ok()
                .map(|(f, m)| (Arc::new(f), m)),
        }
    }

    /// The response for a request of `raw_path` (the URI path, still percent-encoded).
    pub async fn respond(
        &self,
        method: &Method,
        headers: &HeaderMap,
        raw_path: &str,
    ) -> Response<Body> {
        self.respond_as(method, headers, raw_path, None).await
    }

    /// Like [`StaticFiles::respond`], with the Content-Type and metrics class taken
    /// from `name` (e.g. a blob served under the name it has upstream).
    pub async fn respond_as(
        &self,
        method: &Method,
        headers: &HeaderMap,
        raw_path: &str,
        name: Option<&str>,
    ) -> Response<Body> {
        if method != Method::GET && method != Method::HEAD {
            let mut r = status(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let Ok(rel) = clean_path(raw_path) else {
            return status(StatusCode::BAD_REQUEST, "bad path\n");
        };
        // Inline, like the reads: one openat2 + fstat of a tree that lives in the page
        // cache costs microseconds, far less than a hop to the blocking pool.
        let Some((file, meta)) = self.open(&rel) else {
            return status(StatusCode::NOT_FOUND, "not found\n");
        };
        self.respond_file(method, headers, name.unwrap_or(&rel), file, &meta)
    }

    /// The response for an already opened file.
    pub fn respond_file(
        &self,
        method: &Method,
        headers: &HeaderMap,
        rel: &str,
        file: Arc<File>,
        meta: &std::fs::Metadata,
    ) -> Response<Body> {
        let len = meta.len();
        let tag = etag(meta);
        let modified = meta.modified().unwrap_or(UNIX_EPOCH);
        let last_modified = httpdate::fmt_http_date(modified);
        let header_str = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
        let not_modified = if let Some(inm) = header_str(header::IF_NONE_MATCH) {
            etag_matches(inm, &tag)
        } else if let Some(ims) = header_str(header::IF_MODIFIED_SINCE) {
            httpdate::parse_http_date(ims)
                .map(|since| {
                    modified
                        .duration_since(since)
                        .map_or(true, |d| d < Duration::from_secs(1))
                })
                .unwrap_or(false)
        } else {
            false
        };
        let mut builder = Response::builder()
            .header(header::ETAG, &tag)
            .header(header::LAST_MODIFIED, &last_modified)
            .header(header::ACCEPT_RANGES, "bytes");
        if not_modified {
            return builder
                .status(StatusCode::NOT_MODIFIED)
                .body(empty())
                .expect("valid response");
        }
        let range_ok = match header_str(header::IF_RANGE) {
            None => true,
            Some(v) if v.starts_with('"') || v.starts_with("W/") => v == tag,
            Some(v) => httpdate::parse_http_date(v).is_ok_and(|d| {
                modified
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|m| m.as_secs())
                    <= d.duration_since(UNIX_EPOCH).ok().map(|x| x.as_secs())
            }),
        };
        let range = match header_str(header::RANGE).filter(|_| range_ok) {
            None => None,
            Some(r) => match parse_range(r, len) {
                Ok(x) => x,
                Err(()) => {
                    return builder
                        .status(StatusCode::RANGE_NOT_SATISFIABLE)
                        .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                        .body(empty())
                        .expect("valid response");
                }
            },
        };
        let (start, count) = match range {
            Some((a, b)) => {
                builder = builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{len}"));
                (a, b - a + 1)
            }
            None => (0, len),
        };
        builder = builder
            .header(header::CONTENT_TYPE, content_type(rel))
            .header(header::CONTENT_LENGTH, count);
        if method == Method::HEAD {
            return builder.body(empty()).expect("valid response");
        }
        let counter = self.metrics.clone().map(|m| {
            let class = crate::file_class::FileClass::of(rel);
            m.class_requests[class].fetch_add(1, Ordering::Relaxed);
            (m, class)
        });
        builder
            .body(file_body(file, start, count, counter, self.keep.clone()))
            .expect("valid response")
    }
}

/// Streams `count` bytes of `file` from `start`: with `sendfile` on a plain-TCP
/// connection (see [`super::sendfile`]), else with large positioned reads.
/// `keep` is held until the body is dropped (e.g. the snapshot the file belongs to).
pub fn file_body(
    file: Arc<File>,
    start: u64,
    count: u64,
    sent: Option<(Arc<super::HttpMetrics>, crate::file_class::FileClass)>,
    keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
) -> Body {
    if let Some((m, _)) = &sent {
        m.transfers_in_flight.fetch_add(1, Ordering::Relaxed);
    }
    BodyExt::boxed(FileBody {
        file,
        pos: start,
        left: count,
        sent,
        _keep: keep,
    })
}

/// Files at least this large go out with `sendfile`; smaller ones are read and
/// written with the headers in one `writev`, which costs fewer system calls.
const SENDFILE_MIN: u64 = 32 << 10;

/// A body that sends its file as hyper asks for frames. Reads are page-cache
/// `pread`s of at most 512 KiB, short enough to do inline.
struct FileBody {
    file: Arc<File>,
    pos: u64,
    left: u64,
    sent: Option<(Arc<super::HttpMetrics>, crate::file_class::FileClass)>,
    _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl Drop for FileBody {
    fn drop(&mut self) {
        if let Some((m, _)) = &self.sent {
            m.transfers_in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        if self.left >= SENDFILE_MIN {
            let n = self.left.min(super::sendfile::MAX_SEGMENT as u64);
            let segment =
                super::sendfile::Segment::new(self.file.clone(), self.pos, n, self.sent.clone());
            if super::sendfile::enqueue(segment).is_ok() {
                self.pos += n;
                self.left -= n;
                let frame = Bytes::from_static(&super::sendfile::placeholder()[..n as usize]);
                return std::task::Poll::Ready(Some(Ok(Frame::data(frame))));
            }
        }
        let n = (self.left as usize).min(CHUNK);
        let mut buf = vec![0u8; n];
        let r = self.file.read_at(&mut buf, self.pos);
        std::task::Poll::Ready(Some(match r {
            Ok(0) => {
                self.left = 0;
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while sending",
                ))
            }
            Ok(k) => {
                buf.truncate(k);
                self.pos += k as u64;
                self.left -= k as u64;
                if let Some((m, class)) = &self.sent {
                    m.bytes_sent.fetch_add(k as u64, Ordering::Relaxed);
                    m.class_bytes[*class].fetch_add(k as u64, Ordering::Relaxed);
                }
                Ok(Frame::data(Bytes::from(buf)))
            }
            Err(e) => {
                self.left = 0;
                Err(e)
            }
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// Small files of immutable trees (snapshots), kept open per thread: a hit saves the
/// `openat2`, `statx` and `close` of a request, half its system calls. Snapshot files
/// never change (a sync publishes a new tree), so an open file is as good as a fresh
/// open. The cache belongs to one root at a time, known by a weak reference (which
/// also keeps its address from being reused): a request below another root (the next
/// generation) empties it, and so does the periodic check once the root's snapshot is
/// gone. Only files up to `MAX_SIZE` are kept, at most `MAX_ENTRIES` of them, so what
/// a thread holds open is bounded in descriptors and in the space of collected files.
pub mod open_files {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::sync::{Arc, Weak};

    pub const MAX_ENTRIES: usize = 128;
    pub const MAX_SIZE: u64 = 1 << 20;

    #[derive(Default)]
    struct Cache {
        root: Weak<OwnedFd>,
        files: HashMap<String, (Arc<File>, std::fs::Metadata)>,
    }

    thread_local! {
        static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
    }

    fn same_root(c: &Cache, root: &Arc<OwnedFd>) -> bool {
        std::ptr::eq(c.root.as_ptr(), Arc::as_ptr(root))
    }

    pub fn get(root: &Arc<OwnedFd>, rel: &str) -> Option<(Arc<File>, std::fs::Metadata)> {
        CACHE.with_borrow(|c| {
            if !same_root(c, root) {
                return None;
            }
            c.files.get(rel).map(|(f, m)| (f.clone(), m.clone()))
        })
    }

    pub fn put(root: &Arc<OwnedFd>, rel: &str, file: &Arc<File>, meta: &std::fs::Metadata) {
        if !meta.is_file() || meta.len() > MAX_SIZE {
            return;
        }
        CACHE.with_borrow_mut(|c| {
            if !same_root(c, root) {
                c.files.clear();
                c.root = Arc::downgrade(root);
            }
            if c.files.len() >= MAX_ENTRIES {
                c.files.clear();
            }
            c.files
                .insert(rel.to_string(), (file.clone(), meta.clone()));
        })
    }

    /// Lets go of everything once the root's snapshot is gone (no longer served, and
    /// no response sending from it).
    pub fn release_if_orphaned() {
        CACHE.with_borrow_mut(|c| {
            if c.root.strong_count() == 0 && !c.files.is_empty() {
                *c = Cache::default();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(clean_path("//grubx64.efi").unwrap(), "grubx64.efi");
        assert_eq!(clean_path("/a/./b//c").unwrap(), "a/b/c");
        assert_eq!(clean_path("/a%20b").unwrap(), "a b");
        for bad in [
            "/../etc/passwd",
            "/%2e%2e/x",
            "/%2E%2e/x",
            "/a/..%2f..%2fetc",
            "/a%00",
            "/a\\b",
            "/%zz",
            "/%c3%28",
        ] {
            assert_eq!(clean_path(bad), Err(PathError::Bad), "{bad}");
        }
    }

    #[test]
    fn upstream_names_never_make_active_content() {
        for name in [
            "a/b.html", "x.htm", "x.js", "x.css", "x.svg", "x.xhtml", "x.xml", "squashfs",
        ] {
            assert_eq!(content_type(name), "application/octet-stream", "{name}");
        }
        assert_eq!(content_type("streams/v1/index.json"), "application/json");
        assert_eq!(
            content_type("grub/grub.cfg-01-aa"),
            "text/plain; charset=utf-8"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=10-19", 100), Ok(Some((10, 19))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-1000", 100), Ok(Some((0, 99))));
        assert_eq!(parse_range("bytes=50-1000", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
        assert_eq!(parse_range("bytes=1-2,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=1-2", 100), Ok(None));
        assert_eq!(parse_range("bytes=5-2", 100), Ok(None));
    }
}
