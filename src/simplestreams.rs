//! SimpleStreams index and products files (pure: no I/O, no clock).
//!
//! Parses `index:1.0` and `products:1.0` documents into domain types and flattens
//! property inheritance (top level → product → version → item, later wins) so that
//! every [`Item`] carries its effective record. Only this module knows the JSON shape.
//! Every upstream string that becomes part of a local path or a URL is checked here,
//! once: item and index `path`s become [`RelPath`]s, content ids and the fields the
//! rack layout is built from ([`PATH_FIELDS`]) must be [`Segment`]s. A document with
//! one unsafe value is rejected whole, naming the product and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// Largest metadata document rackboot accepts (index or products file).
pub const MAX_METADATA_BYTES: usize = 64 << 20;
/// Most metadata documents (indexes and products files) read from one source in a run.
pub const MAX_METADATA_DOCS: usize = 256;
/// Most bytes of metadata documents read from one source in a run (they are held in
/// memory until the run ends).
pub const MAX_METADATA_TOTAL: usize = 256 << 20;

/// Counts the metadata documents of one source against [`MAX_METADATA_DOCS`] and
/// [`MAX_METADATA_TOTAL`].
#[derive(Debug, Default)]
pub struct MetadataBudget {
    docs: usize,
    bytes: usize,
}

impl MetadataBudget {
    /// Adds a document of `len` bytes; the error says which bound it crossed.
    pub fn add(&mut self, len: usize) -> Result<(), String> {
        self.docs += 1;
        self.bytes = self.bytes.saturating_add(len);
        if self.docs > MAX_METADATA_DOCS {
            return Err(format!(
                "more than {MAX_METADATA_DOCS} metadata documents (index and products files)"
            ));
        }
        if self.bytes > MAX_METADATA_TOTAL {
            return Err(format!(
                "metadata documents total more than {} MiB",
                MAX_METADATA_TOTAL >> 20
            ));
        }
        Ok(())
    }
}

/// Errors in a SimpleStreams document. The caller adds the URL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("malformed json: {0}")]
    Json(String),
    #[error("expected format {expected:?}, found {found:?}")]
    Format {
        expected: &'static str,
        found: String,
    },
    #[error("content_id {found:?} does not match the index entry {expected:?}")]
    ContentId { expected: String, found: String },
    #[error("{context}: missing or invalid field {field:?}")]
    Field {
        context: String,
        field: &'static str,
    },
    #[error("{context}: unsafe path {path:?} (must be relative, without `.`, `..`, empty segments, a scheme, `%`, `?`, `#`, `\\` or control characters)")]
    UnsafePath { context: String, path: String },
    #[error("{context}: unsafe {field} {value:?} (must be 1-{max} of A-Z a-z 0-9 . _ + ~ -, not only dots)", max = MAX_SEGMENT)]
    UnsafeField {
        context: String,
        field: String,
        value: String,
    },
    #[error("{context}: invalid sha256 {value:?}")]
    Digest { context: String, value: String },
}

/// A SHA-256 digest, displayed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Sha256(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Sha256 {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out)?;
        Ok(Sha256(out))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

impl serde::Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest [`Segment`] (a file name on every filesystem rackboot runs on).
pub const MAX_SEGMENT: usize = 255;
/// Longest [`RelPath`].
pub const MAX_PATH: usize = 1024;

/// Item fields the rack layout (`os/arch/subarch/release/label`, bootloader
/// directories, `maas.meta` keys) is built from: each must be a [`Segment`].
pub const PATH_FIELDS: &[&str] = &[
    "os",
    "arch",
    "subarch",
    "release",
    "label",
    "bootloader-type",
    "kflavor",
];

/// One path component taken from upstream: 1-255 of `[A-Za-z0-9._+~-]`, not `.` or
/// `..` (content ids may also hold `:`). Joined below a directory it names an entry of
/// that directory and nothing else.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Segment(String);

impl Segment {
    fn check(s: &str, extra: &[char]) -> Option<Segment> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SEGMENT
            && !s.chars().all(|c| c == '.')
            && s.chars().all(|c| {
                c.is_ascii_alphanumeric()
                    || matches!(c, '.' | '_' | '+' | '~' | '-')
                    || extra.contains(&c)
            });
        ok.then(|| Segment(s.to_string()))
    }

    /// A path component (os, arch, release, label, …).
    pub fn parse(s: &str) -> Option<Segment> {
        Segment::check(s, &[])
    }

    /// A content id (`com.ubuntu.maas:stable:v3:download`): a segment that may hold `:`.
    pub fn parse_id(s: &str) -> Option<Segment> {
        Segment::check(s, &[':'])
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A relative path inside a stream or a tree: `/`-separated segments, none empty or all
/// dots (`.`, `..`), no scheme-like first segment (`file:`), no `%`, `?`, `#` (a URL
/// would read them as escapes, query or fragment), `\`, NUL or control
/// characters; at most [`MAX_PATH`] bytes. Joined below a directory or a stream root
/// it stays below it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct RelPath(String);

impl RelPath {
    /// Checks a path from upstream (a document, an archive member, a record); `None`
    /// when it is unsafe. Nothing is normalised away: an odd path is refused.
    pub fn parse(path: &str) -> Option<RelPath> {
        if path.is_empty()
            || path.len() > MAX_PATH
            || path
                .chars()
                .any(|c| c.is_control() || matches!(c, '\\' | '%' | '?' | '#'))
        {
            return None;
        }
        for (i, seg) in path.split('/').enumerate() {
            if seg.is_empty() || seg.chars().all(|c| c == '.') || seg.len() > MAX_SEGMENT {
                return None;
            }
            // `file:x`, `http:`: a URL join would read a scheme.
            if i == 0 && seg.contains(':') {
                return None;
            }
        }
        Some(RelPath(path.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The last path segment.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
    /// The segments, each non-empty and neither `.` nor `..`.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One followed entry of an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub content_id: String,
    pub path: RelPath,
    /// `products:1.0` or `index:1.0` (nested index).
    pub format: String,
}

/// A parsed `index:1.0` document: the entries worth following.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    pub updated: Option<String>,
    pub entries: Vec<IndexEntry>,
}

/// Flattened string properties of an item (the effective record).
pub type Props = BTreeMap<String, String>;

/// One payload file of a product version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub content_id: String,
    pub product_name: String,
    pub version_name: String,
    pub item_name: String,
    pub ftype: String,
    pub path: RelPath,
    pub size: u64,
    pub sha256: Sha256,
    /// The flattened record: inherited scalars plus the synthetic name keys.
    pub props: Props,
}

impl Item {
    /// A property of the flattened record (`""` when absent, as sstream filters do).
    pub fn prop(&self, key: &str) -> &str {
        self.props.get(key).map(String::as_str).unwrap_or("")
    }
}

/// A parsed `products:1.0` document: every item, flattened, in a stable order
/// (product, version, item name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Products {
    pub content_id: String,
    pub items: Vec<Item>,
}

fn parse_json(text: &str) -> Result<Map<String, Value>, ParseError> {
    if text.len() > MAX_METADATA_BYTES {
        return Err(ParseError::Json(format!(
            "document is {} bytes, more than the {} byte limit",
            text.len(),
            MAX_METADATA_BYTES
        )));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ParseError::Json("top level is not an object".into())),
        Err(e) => Err(ParseError::Json(e.to_string())),
    }
}

fn check_format(top: &Map<String, Value>, expected: &'static str) -> Result<(), ParseError> {
    match top.get("format").and_then(Value::as_str) {
        Some(f) if f == expected => Ok(()),
        other => Err(ParseError::Format {
            expected,
            found: other.unwrap_or("<none>").to_string(),
        }),
    }
}

fn safe_path(context: &str, v: Option<&Value>) -> Result<RelPath, ParseError> {
    let raw = v.and_then(Value::as_str).ok_or_else(|| ParseError::Field {
        context: context.to_string(),
        field: "path",
    })?;
    RelPath::parse(raw).ok_or_else(|| ParseError::UnsafePath {
        context: context.to_string(),
        path: raw.to_string(),
    })
}

/// Parses an `index:1.0` document. Entries of other formats are skipped; a single
/// unsafe path rejects the whole document.
pub fn parse_index(text: &str) -> Result<Index, ParseError> {
    let top = parse_json(text)?;
    check_format(&top, "index:1.0")?;
    let index = top
        .get("index")
        .and_then(Value::as_object)
        .ok_or_else(|| ParseError::Field {
            context: "index".into(),
            field: "index",
        })?;
    let mut entries = Vec::new();
    for (content_id, entry) in index {
        let ctx = format!("index entry {content_id}");
        // A mirror names a file after it (`.data/<content_id>`).
        if Segment::parse_id(content_id).is_none() {
            return Err(ParseError::UnsafeField {
                context: "index".into(),
                field: "content_id".into(),
                value: content_id.clone(),
            });
        }
        let entry = entry.as_object().ok_or_else(|| ParseError::Field {
            context: ctx.clone(),
            field: "index",
        })?;
        // Check every path, followed or not: a hostile index is rejected whole.
        let path = safe_path(&ctx, entry.get("path"))?;
        let format = entry.get("format").and_then(Value::as_str).unwrap_or("");
        if format == "products:1.0" || format == "index:1.0" {
            entries.push(IndexEntry {
                content_id: content_id.clone(),
                path,
                format: format.to_string(),
            });
        }
    }
    Ok(Index {
        updated: top.get("updated").and_then(Value::as_str).map(String::from),
        entries,
    })
}

/// Adds the scalar fields of `obj` to `props` (numbers and bools stringified the way
/// python-simplestreams does; lists and objects are not inherited).
fn inherit(props: &mut Props, obj: &Map<String, Value>) {
    for (k, v) in obj {
        let s = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(true) => "True".to_string(),
            Value::Bool(false) => "False".to_string(),
            _ => continue,
        };
        props.insert(k.clone(), s);
    }
}

/// An item as listed, flattened, before any field but its path is required (what a
/// mirror copies; [`parse_products`] turns these into [`Item`]s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawItem {
    pub product_name: String,
    pub version_name: String,
    pub item_name: String,
    pub path: RelPath,
    /// The flattened record, synthetic keys included.
    pub props: Props,
}

impl RawItem {
    /// A flattened field, `""` when absent.
    pub fn prop(&self, key: &str) -> &str {
        self.props.get(key).map(String::as_str).unwrap_or("")
    }

    fn context(&self) -> String {
        format!(
            "product {} version {} item {}",
            self.product_name, self.version_name, self.item_name
        )
    }

    /// The listed size, if any.
    pub fn size(&self) -> Result<Option<u64>, ParseError> {
        match self.props.get("size") {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| ParseError::Field {
                context: self.context(),
                field: "size",
            }),
        }
    }

    /// The strongest listed checksum: sha512, else sha256, else md5 (as
    /// python-simplestreams prefers them). An item with none is an error.
    pub fn checksum(&self) -> Result<Checksum, ParseError> {
        for (field, len, make) in [
            ("sha512", 64, Checksum::Sha512 as fn(Vec<u8>) -> Checksum),
            ("sha256", 32, Checksum::Sha256 as fn(Vec<u8>) -> Checksum),
            ("md5", 16, Checksum::Md5 as fn(Vec<u8>) -> Checksum),
        ] {
            if let Some(v) = self.props.get(field) {
                return match hex::decode(v) {
                    Ok(b) if b.len() == len => Ok(make(b)),
                    _ => Err(ParseError::Digest {
                        context: self.context(),
                        value: v.clone(),
                    }),
                };
            }
        }
        Err(ParseError::Field {
            context: self.context(),
            field: "sha512/sha256/md5",
        })
    }
}

/// A payload checksum as listed (raw digest bytes).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Checksum {
    Sha512(Vec<u8>),
    Sha256(Vec<u8>),
    Md5(Vec<u8>),
}

impl Checksum {
    pub fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Sha512(_) => "sha512",
            Checksum::Sha256(_) => "sha256",
            Checksum::Md5(_) => "md5",
        }
    }

    pub fn digest(&self) -> &[u8] {
        match self {
            Checksum::Sha512(d) | Checksum::Sha256(d) | Checksum::Md5(d) => d,
        }
    }
}

/// One level of the product tree (a product, a version, an item; `field` names the
/// map it is in): its object, and its properties over those it inherits.
fn level<'a>(
    value: &'a Value,
    context: &str,
    field: &'static str,
    inherited: &Props,
) -> Result<(&'a Map<String, Value>, Props), ParseError> {
    let obj = value.as_object().ok_or_else(|| ParseError::Field {
        context: context.to_string(),
        field,
    })?;
    let mut props = inherited.clone();
    inherit(&mut props, obj);
    Ok((obj, props))
}

/// Parses a `products:1.0` document that the index listed under `content_id` into
/// flattened raw items. A single unsafe path rejects the whole document.
pub fn parse_raw_items(text: &str, content_id: &str) -> Result<Vec<RawItem>, ParseError> {
    let top = parse_json(text)?;
    check_format(&top, "products:1.0")?;
    let found = top.get("content_id").and_then(Value::as_str).unwrap_or("");
    if found != content_id {
        return Err(ParseError::ContentId {
            expected: content_id.to_string(),
            found: found.to_string(),
        });
    }
    let mut base = Props::new();
    inherit(&mut base, &top);
    let products = top
        .get("products")
        .and_then(Value::as_object)
        .ok_or_else(|| ParseError::Field {
            context: content_id.to_string(),
            field: "products",
        })?;
    let mut items = Vec::new();
    for (pname, product) in products {
        let ctx = format!("product {pname}");
        let (product, pprops) = level(product, &ctx, "products", &base)?;
        let Some(versions) = product.get("versions").and_then(Value::as_object) else {
            continue; // a product without versions is dropped
        };
        for (vname, version) in versions {
            let vctx = format!("{ctx} version {vname}");
            let (version, vprops) = level(version, &vctx, "versions", &pprops)?;
            let Some(vitems) = version.get("items").and_then(Value::as_object) else {
                continue;
            };
            for (iname, item) in vitems {
                let ictx = format!("{vctx} item {iname}");
                let (item, mut props) = level(item, &ictx, "items", &vprops)?;
                props.insert("content_id".into(), content_id.to_string());
                props.insert("product_name".into(), pname.clone());
                props.insert("version_name".into(), vname.clone());
                props.insert("item_name".into(), iname.clone());
                items.push(RawItem {
                    product_name: pname.clone(),
                    version_name: vname.clone(),
                    item_name: iname.clone(),
                    path: safe_path(&ictx, item.get("path"))?,
                    props,
                });
            }
        }
    }
    Ok(items)
}

/// Checks the fields the rack layout is built from ([`PATH_FIELDS`]): each, when
/// set, must be a [`Segment`].
pub fn check_path_fields(context: &str, props: &Props) -> Result<(), ParseError> {
    for field in PATH_FIELDS {
        match props.get(*field) {
            Some(v) if !v.is_empty() && Segment::parse(v).is_none() => {
                return Err(ParseError::UnsafeField {
                    context: context.to_string(),
                    field: field.to_string(),
                    value: v.clone(),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Parses a `products:1.0` document that the index listed under `content_id`; every
/// item must list its size, sha256 and ftype (the rack's store is sha256-addressed),
/// and its [`PATH_FIELDS`] must be [`Segment`]s.
pub fn parse_products(text: &str, content_id: &str) -> Result<Products, ParseError> {
    let mut items = Vec::new();
    for raw in parse_raw_items(text, content_id)? {
        let ictx = raw.context();
        let size = raw.size()?.ok_or_else(|| ParseError::Field {
            context: ictx.clone(),
            field: "size",
        })?;
        let digest = raw.props.get("sha256").ok_or_else(|| ParseError::Field {
            context: ictx.clone(),
            field: "sha256",
        })?;
        let sha256 = digest.parse().map_err(|_| ParseError::Digest {
            context: ictx.clone(),
            value: digest.clone(),
        })?;
        let ftype = raw.props.get("ftype").cloned().ok_or(ParseError::Field {
            context: ictx.clone(),
            field: "ftype",
        })?;
        check_path_fields(&ictx, &raw.props)?;
        items.push(Item {
            content_id: content_id.to_string(),
            product_name: raw.product_name,
            version_name: raw.version_name,
            item_name: raw.item_name,
            ftype,
            path: raw.path,
            size,
            sha256,
            props: raw.props,
        });
    }
    Ok(Products {
        content_id: content_id.to_string(),
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn products_doc(path: &str) -> String {
        format!(
            r#"{{"format":"products:1.0","content_id":"c","datatype":"image-ids",
            "arch":"amd64","products":{{"p1":{{"release":"jammy","subarch":"ga-22.04",
            "versions":{{"20250805":{{"label":"stable","items":{{
              "boot-kernel":{{"ftype":"boot-kernel","path":"{path}","size":0,"sha256":"{DIGEST}"}},
              "boot-initrd":{{"ftype":"boot-initrd","path":"a/i","size":"3","sha256":"{DIGEST}","arch":"arm64"}}
            }}}}}}}}}}}}"#
        )
    }

    #[test]
    fn flattening_inherits_and_item_overrides() {
        let p = parse_products(&products_doc("a/k"), "c").unwrap();
        assert_eq!(p.items.len(), 2);
        let initrd = &p.items[0];
        assert_eq!(initrd.item_name, "boot-initrd");
        assert_eq!(initrd.prop("arch"), "arm64", "item field wins");
        assert_eq!(initrd.size, 3);
        let kernel = &p.items[1];
        assert_eq!(kernel.prop("arch"), "amd64", "top-level field inherited");
        assert_eq!(kernel.prop("release"), "jammy");
        assert_eq!(kernel.prop("label"), "stable");
        assert_eq!(kernel.prop("product_name"), "p1");
        assert_eq!(kernel.prop("version_name"), "20250805");
        assert_eq!(kernel.prop("content_id"), "c");
        assert_eq!(kernel.prop("missing"), "");
        assert_eq!(kernel.sha256.to_string(), DIGEST);
    }

    #[test]
    fn unsafe_paths_reject_the_document() {
        for bad in [
            "../x",
            "a/../b",
            "/etc/passwd",
            "a/.../b",
            "a\\\\b",
            "a\\u0008",
            "",
        ] {
            let err = parse_products(&products_doc(bad), "c").unwrap_err();
            assert!(
                matches!(
                    err,
                    ParseError::UnsafePath { .. } | ParseError::Field { .. }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn relpath_is_strict() {
        assert_eq!(RelPath::parse("a/b").unwrap().file_name(), "b");
        assert_eq!(
            RelPath::parse("bootloaders/uefi/amd64/20210819.0/grub2-signed.tar.xz")
                .unwrap()
                .as_str(),
            "bootloaders/uefi/amd64/20210819.0/grub2-signed.tar.xz"
        );
        assert!(
            RelPath::parse("a/b:c").is_some(),
            "a colon past the first segment"
        );
        for bad in [
            "./",
            "a//b",
            "a/./c",
            "a/",
            "/tmp/x",
            "../../x",
            "a/..",
            "file:/etc/passwd",
            "file:etc/passwd",
            "http://other/x",
            "//other/x",
            "a/%2e%2e/b",
            "a?b",
            "a#b",
            "a\\b",
            "a\0b",
        ] {
            assert!(RelPath::parse(bad).is_none(), "{bad:?}");
        }
        assert!(RelPath::parse(&"a/".repeat(600)).is_none(), "too long");
    }

    #[test]
    fn segments() {
        for good in [
            "ubuntu",
            "ga-22.04",
            "hwe-22.04-lowlatency",
            "a+b~c_d",
            "a..b",
        ] {
            assert!(Segment::parse(good).is_some(), "{good:?}");
        }
        for bad in [
            "", ".", "..", "...", "a/b", "/x", "../../x", "file:", "a b", "a\0", "é",
        ] {
            assert!(Segment::parse(bad).is_none(), "{bad:?}");
        }
        assert!(Segment::parse(&"a".repeat(256)).is_none());
        assert!(Segment::parse_id("com.ubuntu.maas:stable:v3:download").is_some());
        assert!(Segment::parse_id("../x").is_none());
        assert!(Segment::parse_id("/x").is_none());
    }

    fn field_doc(field: &str, value: &str) -> String {
        let mut doc: Value = serde_json::from_str(&products_doc("a/k")).unwrap();
        doc["products"]["p1"]["versions"]["20250805"]["items"]["boot-kernel"][field] =
            Value::String(value.into());
        doc.to_string()
    }

    #[test]
    fn unsafe_path_fields_reject_the_document_naming_the_field() {
        for field in PATH_FIELDS {
            for bad in ["../../x", "/tmp/x", ".", "..", "a/b", "file:/etc/passwd"] {
                let err = parse_products(&field_doc(field, bad), "c").unwrap_err();
                let msg = err.to_string();
                assert!(
                    matches!(&err, ParseError::UnsafeField { field: f, .. } if f == field),
                    "{field}={bad}: {msg}"
                );
                assert!(msg.contains("product p1") && msg.contains(field), "{msg}");
            }
            assert!(parse_products(&field_doc(field, "ok-1.0"), "c").is_ok());
        }
        // The mirror copies items as listed: it forms no path from these fields.
        assert!(parse_raw_items(&field_doc("label", "../x"), "c").is_ok());
    }

    #[test]
    fn unsafe_content_id_rejects_the_index() {
        for bad in ["../../x", "/tmp/x", "..", "a/b"] {
            let doc = serde_json::json!({"format": "index:1.0", "index": {
                bad: {"format": "products:1.0", "path": "streams/v1/a.json"}}});
            let err = parse_index(&doc.to_string()).unwrap_err();
            assert!(err.to_string().contains("content_id"), "{err}");
        }
    }

    #[test]
    fn index_follows_only_product_formats() {
        let doc = r#"{"format":"index:1.0","index":{
            "a":{"format":"products:1.0","path":"streams/v1/a.json"},
            "b":{"format":"something:1.0","path":"streams/v1/b.json"}}}"#;
        let idx = parse_index(doc).unwrap();
        assert_eq!(idx.entries.len(), 1);
        assert_eq!(idx.entries[0].content_id, "a");
        let bad = r#"{"format":"index:1.0","index":{"b":{"format":"x","path":"../b.json"}}}"#;
        assert!(matches!(
            parse_index(bad),
            Err(ParseError::UnsafePath { .. })
        ));
    }

    #[test]
    fn wrong_format_and_content_id_and_bad_json() {
        assert!(matches!(
            parse_index(r#"{"format":"products:1.0"}"#),
            Err(ParseError::Format { .. })
        ));
        assert!(matches!(
            parse_products(&products_doc("a/k"), "other"),
            Err(ParseError::ContentId { .. })
        ));
        assert!(matches!(parse_index("{"), Err(ParseError::Json(_))));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn parsers_never_panic(s in ".{0,400}") {
            let _ = parse_index(&s);
            let _ = parse_products(&s, "c");
        }

        #[test]
        fn relpath_never_escapes(s in "[a-z./:%\\\\]{0,40}") {
            if let Some(p) = RelPath::parse(&s) {
                proptest::prop_assert!(!p.as_str().starts_with('/'));
                proptest::prop_assert!(p.as_str().split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
                // Joined to a stream root it stays below the root.
                let root = url::Url::parse("http://h:1/a/b/").unwrap();
                let u = root.join(p.as_str()).unwrap();
                proptest::prop_assert_eq!(u.origin(), root.origin());
                proptest::prop_assert!(u.path().starts_with("/a/b/"), "{}", u);
            }
        }
    }
}
