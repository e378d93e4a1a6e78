//! Fetching from an upstream mirror: `http(s)://` (reqwest + rustls) or `file://`.
//!
//! Metadata is fetched whole (bounded size) with conditional GET; payloads are
//! streamed, optionally from an offset (HTTP Range) to resume a partial download.
//! Redirects are followed only within the same scheme, host and port. Every wait is
//! bounded by the configured timeout (connect, headers, and each body chunk).

use std::io::{Read, Seek, SeekFrom};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::simplestreams::{RelPath, MAX_METADATA_BYTES};

/// The URL of `path` below a stream `root`: it must keep the root's scheme, host,
/// port and path prefix (so an item path can never name another host, a local file
/// of an HTTP source, or a place above the root). The error names the path only.
pub fn under_root(root: &Url, path: &RelPath) -> Result<Url, String> {
    let url = root
        .join(path.as_str())
        .map_err(|e| format!("item path {:?} is not a valid URL path: {e}", path.as_str()))?;
    let same = url.scheme() == root.scheme()
        && url.host_str() == root.host_str()
        && url.port_or_known_default() == root.port_or_known_default()
        && url.path().starts_with(root.path())
        && url.query().is_none()
        && url.fragment().is_none();
    if !same {
        return Err(format!(
            "item path {:?} leads outside the source root {root}",
            path.as_str()
        ));
    }
    Ok(url)
}

/// Why a fetch failed. Every variant names the URL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: no response for {secs} s (timed out)")]
    Timeout { url: String, secs: u64 },
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: larger than the {limit} byte limit for metadata")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: redirect to another host refused ({to})")]
    Redirect { url: String, to: String },
}

/// Cache validators of a metadata document, kept in `state.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

/// Result of a conditional metadata fetch.
pub enum Fetched {
    NotModified,
    Body {
        bytes: Vec<u8>,
        validators: Validators,
    },
}

/// A payload body being streamed.
pub struct Payload {
    /// The server honoured the requested offset (206, or a file seek).
    pub resumed: bool,
    pub stream: Pin<Box<dyn Stream<Item = Result<Bytes, FetchError>> + Send>>,
}

/// The HTTP client shared by a sync run.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    timeout: Duration,
}

fn transport(url: &Url, e: impl std::fmt::Display) -> FetchError {
    FetchError::Transport {
        url: url.to_string(),
        message: e.to_string(),
    }
}

fn reqwest_err(url: &Url, e: reqwest::Error, timeout: Duration) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout {
            url: url.to_string(),
            secs: timeout.as_secs().max(1),
        };
    }
    if e.is_redirect() {
        if let Some(to) = e.url() {
            return FetchError::Redirect {
                url: url.to_string(),
                to: to.to_string(),
            };
        }
    }
    // The full chain, on one line ("error sending request: connection refused").
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    transport(url, msg)
}

impl Fetcher {
    pub fn new(timeout: Duration) -> anyhow::Result<Fetcher> {
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            let first = attempt.previous().first().cloned();
            let same = first.is_some_and(|f| {
                f.scheme() == attempt.url().scheme()
                    && f.host_str() == attempt.url().host_str()
                    && f.port_or_known_default() == attempt.url().port_or_known_default()
            });
            if attempt.previous().len() > 5 {
                attempt.error("too many redirects")
            } else if same {
                attempt.follow()
            } else {
                attempt.error("redirect to another host")
            }
        });
        let client = reqwest::Client::builder()
            .user_agent(concat!("rackboot/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .redirect(policy)
            .no_proxy()
            .build()?;
        Ok(Fetcher { client, timeout })
    }

    fn timeout_err(&self, url: &Url) -> FetchError {
        FetchError::Timeout {
            url: url.to_string(),
            secs: self.timeout.as_secs().max(1),
        }
    }

    /// Fetches a metadata document, conditionally when `cond` is given.
    pub async fn get_meta(
        &self,
        url: &Url,
        cond: Option<&Validators>,
    ) -> Result<Fetched, FetchError> {
        if url.scheme() == "file" {
            return self.file_meta(url, cond);
        }
        let mut req = self.client.get(url.clone());
        if let Some(v) = cond {
            if let Some(e) = &v.etag {
                req = req.header(reqwest::header::IF_NONE_MATCH, e);
            }
            if let Some(lm) = &v.last_modified {
                req = req.header(reqwest::header::IF_MODIFIED_SINCE, lm);
            }
        }
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| self.timeout_err(url))?
            .map_err(|e| reqwest_err(url, e, self.timeout))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_MODIFIED && cond.is_some() {
            return Ok(Fetched::NotModified);
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let header = |h| {
            resp.headers()
                .get(h)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(String::from)
        };
        let validators = Validators {
            etag: header(reqwest::header::ETAG),
            last_modified: header(reqwest::header::LAST_MODIFIED),
        };
        if resp
            .content_length()
            .is_some_and(|l| l as usize > MAX_METADATA_BYTES)
        {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                limit: MAX_METADATA_BYTES,
            });
        }
        let mut bytes = Vec::new();
        let mut stream = resp.bytes_stream();
        loop {
            let chunk = tokio::time::timeout(self.timeout, stream.next())
                .await
                .map_err(|_| self.timeout_err(url))?;
            match chunk {
                None => break,
                Some(Err(e)) => return Err(reqwest_err(url, e, self.timeout)),
                Some(Ok(c)) => {
                    if bytes.len() + c.len() > MAX_METADATA_BYTES {
                        return Err(FetchError::TooLarge {
                            url: url.to_string(),
                            limit: MAX_METADATA_BYTES,
                        });
                    }
                    bytes.extend_from_slice(&c);
                }
            }
        }
        Ok(Fetched::Body { bytes, validators })
    }

    fn file_meta(&self, url: &Url, cond: Option<&Validators>) -> Result<Fetched, FetchError> {
        let path = url
            .to_file_path()
            .map_err(|_| transport(url, "not a local path"))?;
        let meta = std::fs::metadata(&path).map_err(|e| transport(url, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let etag = format!("\"{:x}-{:x}\"", meta.len(), mtime);
        if cond.is_some_and(|c| c.etag.as_deref() == Some(etag.as_str())) {
            return Ok(Fetched::NotModified);
        }
        if meta.len() as usize > MAX_METADATA_BYTES {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                limit: MAX_METADATA_BYTES,
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| transport(url, e))?;
        Ok(Fetched::Body {
            bytes,
            validators: Validators {
                etag: Some(etag),
                last_modified: None,
            },
        })
    }

    /// Streams a payload starting at `offset` (Range when `offset > 0`).
    pub async fn get_payload(&self, url: &Url, offset: u64) -> Result<Payload, FetchError> {
        if url.scheme() == "file" {
            return self.file_payload(url, offset);
        }
        let mut req = self.client.get(url.clone());
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| self.timeout_err(url))?
            .map_err(|e| reqwest_err(url, e, self.timeout))?;
        let status = resp.status();
        let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT;
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let (u, timeout) = (url.clone(), self.timeout);
        let inner = resp.bytes_stream();
        let stream = futures_util::stream::unfold(Some(inner), move |state| {
            let u = u.clone();
            async move {
                let mut inner = state?;
                match tokio::time::timeout(timeout, inner.next()).await {
                    Err(_) => Some((
                        Err(FetchError::Timeout {
                            url: u.to_string(),
                            secs: timeout.as_secs().max(1),
                        }),
                        None,
                    )),
                    Ok(None) => None,
                    Ok(Some(Err(e))) => Some((Err(reqwest_err(&u, e, timeout)), None)),
                    Ok(Some(Ok(b))) => Some((Ok(b), Some(inner))),
                }
            }
        });
        Ok(Payload {
            resumed,
            stream: Box::pin(stream),
        })
    }

    fn file_payload(&self, url: &Url, offset: u64) -> Result<Payload, FetchError> {
        let path = url
            .to_file_path()
            .map_err(|_| transport(url, "not a local path"))?;
        let mut f = std::fs::File::open(&path).map_err(|e| transport(url, e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| transport(url, e))?;
        let u = url.clone();
        // A blocking reader thread per file feeding a bounded channel: local mirrors
        // are read at disk speed without stalling the runtime.
        // 256 KiB chunks, at most 4 in flight: memory per file stays near 1 MiB.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, FetchError>>(4);
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; 256 << 10];
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(transport(&u, e)));
                    break;
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Payload {
            resumed: offset > 0,
            stream: Box::pin(stream),
        })
    }
}

#[cfg(test)]
mod root_tests {
    use super::*;

    #[test]
    fn item_urls_stay_under_the_root() {
        let root = Url::parse("http://127.0.0.1:8080/maas/").unwrap();
        let p = |s: &str| RelPath::parse(s).unwrap();
        assert_eq!(
            under_root(&root, &p("streams/v1/a.json")).unwrap().as_str(),
            "http://127.0.0.1:8080/maas/streams/v1/a.json"
        );
        // RelPath already refuses `file:/…`, `http://…`, `..`; a path that is valid
        // as a RelPath still cannot leave a file:// root either.
        let froot = Url::parse("file:///srv/mirror/").unwrap();
        assert_eq!(
            under_root(&froot, &p("a/b")).unwrap().as_str(),
            "file:///srv/mirror/a/b"
        );
    }
}
