//! The plain (`.json`) side of the re-exported stream. A signed upstream publishes
//! `index.json` and each products `.json` beside the clearsigned `.sjson`; a rack
//! re-exports both, so an unsigned downstream rack, a MAAS region without a keyring
//! and `sstream-mirror`/`sstream-query` all work against it.
//!
//! Each `.json` is the upstream's own bytes when they say exactly what the verified
//! `.sjson` says (same JSON value; an index's paths naming `.json` instead of
//! `.sjson`), else (missing upstream, or different content) the verified text
//! itself, with the index's paths renamed. Nothing unverified is ever re-exported.

use serde_json::Value;
use url::Url;

use crate::upstream::{Fetched, Fetcher};

/// A verified document of the re-exported source.
pub struct Doc<'a> {
    /// Path below the stream root, ending in `.sjson`.
    pub path: &'a str,
    /// The verified (signed) text.
    pub text: &'a str,
}

/// `x.sjson` → `x.json`.
fn plain_path(path: &str) -> Option<String> {
    path.strip_suffix(".sjson").map(|p| format!("{p}.json"))
}

/// What the plain copy of `text` must say: the same document, with an index's
/// entries pointing at `.json` files.
fn plain_value(text: &str) -> Option<Value> {
    let mut v: Value = serde_json::from_str(text).ok()?;
    if v.get("format").and_then(Value::as_str) == Some("index:1.0") {
        if let Some(index) = v.get_mut("index").and_then(Value::as_object_mut) {
            for entry in index.values_mut() {
                if let Some(p) = entry.get("path").and_then(Value::as_str) {
                    if let Some(plain) = plain_path(p) {
                        entry["path"] = Value::String(plain);
                    }
                }
            }
        }
    }
    Some(v)
}

/// The `.json` copies (path, bytes) of the verified `.sjson` documents of the stream
/// at `root`. Fetch errors are not sync errors: the verified text stands in.
pub async fn plain_copies(
    fetcher: &Fetcher,
    root: &Url,
    docs: &[Doc<'_>],
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for d in docs {
        let (Some(path), Some(want)) = (plain_path(d.path), plain_value(d.text)) else {
            continue;
        };
        let upstream = match root.join(&path) {
            Ok(url) => match fetcher.get_meta(&url, None).await {
                Ok(Fetched::Body { bytes, .. }) => Some((url, bytes)),
                _ => None,
            },
            Err(_) => None,
        };
        let bytes = match upstream {
            Some((_, bytes))
                if serde_json::from_slice::<Value>(&bytes).ok().as_ref() == Some(&want) =>
            {
                bytes
            }
            other => {
                if let Some((url, _)) = other {
                    tracing::warn!(
                        "{url} differs from its verified .sjson; re-exporting the verified content"
                    );
                }
                if want.get("format").and_then(Value::as_str) == Some("index:1.0") {
                    let mut b = serde_json::to_vec_pretty(&want).expect("JSON serialises");
                    b.push(b'\n');
                    b
                } else {
                    d.text.as_bytes().to_vec()
                }
            }
        };
        out.push((path, bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_paths_point_at_plain_files() {
        let v =
            plain_value(r#"{"format":"index:1.0","index":{"a":{"path":"streams/v1/a.sjson"}}}"#)
                .unwrap();
        assert_eq!(v["index"]["a"]["path"], "streams/v1/a.json");
        let p = plain_value(r#"{"format":"products:1.0","x":"y.sjson"}"#).unwrap();
        assert_eq!(p["x"], "y.sjson");
        assert_eq!(
            plain_path("streams/v1/index.sjson").unwrap(),
            "streams/v1/index.json"
        );
        assert_eq!(plain_path("streams/v1/index.json"), None);
    }
}
