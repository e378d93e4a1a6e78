//! The daemon's HTTP routes: JSON API under `/api/v1/`, `/metrics`, the re-exported
//! SimpleStreams tree (`/streams/v1/…` + payloads at their upstream paths), and the
//! snapshot tree (also under `/images/`, as MAAS serves it).
//!
//! The re-exported tree holds each `.sjson` of a signed upstream and its plain
//! `.json` (see `reexport`). Edits of `sources.json` / `machines.json` hold
//! `state::StateLock` from read to write.
//!
//! Writes need `Authorization: Bearer <token>` with the token from `http.token_file`;
//! without a token file, write endpoints are off. Errors are JSON: `{"error": "…"}`.

// Handlers return `Err(response)` to short-circuit with the HTTP error to send; it is
// built once per failed request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::http::{full, App, Body, StaticFiles};
use crate::serve::status::{Progress, Status};
use crate::serve::Daemon;
use crate::state::{EditError, Sources, StoredSelection, StoredSource};

/// Largest JSON request body accepted.
const MAX_BODY: usize = 64 << 10;

pub struct Api {
    d: Arc<Daemon>,
}

impl Api {
    pub fn new(d: Arc<Daemon>) -> Api {
        Api { d }
    }
}

/// `v` with the credentials of every URL in its strings replaced (source URLs, sync
/// errors naming what they fetched, warnings): no answer of the API shows them.
fn redact_json(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(crate::config::redact_text(s)),
        Value::Array(a) => Value::Array(a.iter().map(redact_json).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (crate::config::redact_text(k), redact_json(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let v = &redact_json(v);
    let mut body = serde_json::to_vec_pretty(v).expect("json serialises");
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(full(Bytes::from(body)))
        .expect("valid response")
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Body> {
    json_response(status, &json!({ "error": msg.to_string() }))
}

impl App for Api {
    fn call(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send + 'static>> {
        let d = self.d.clone();
        Box::pin(async move { route(d, req, peer).await })
    }
}

async fn route(d: Arc<Daemon>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = std::time::Instant::now();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(rest) = path.strip_prefix("/api/v1/") {
        return api(d, req, rest.trim_end_matches('/').to_string()).await;
    }
    if path == "/metrics" {
        return match method {
            Method::GET | Method::HEAD => crate::serve::metrics::response(&d),
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        };
    }
    if path == "/" || path == "/index.html" {
        return match method {
            Method::GET | Method::HEAD => images_page(&d, method == Method::HEAD),
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        };
    }
    // iPXE binaries for ProxyDHCP's UEFI clients, from `[dhcp] ipxe_dir`.
    let decoded = crate::http::files::clean_path(&path).unwrap_or_default();
    // Recorded in the boot log when the response body is done.
    let logged = crate::serve::bootlog::HttpRequest {
        log: d.boots.clone(),
        client: peer.ip(),
        path: decoded
            .strip_prefix("images/")
            .unwrap_or(&decoded)
            .to_string(),
        query: req.uri().query().map(String::from),
        started,
        head: method == Method::HEAD,
    };
    if let Some(name) = crate::serve::boot::ipxe_name(&decoded) {
        let Some(name) = name else {
            return logged.answer(error(StatusCode::NOT_FOUND, "not found"));
        };
        let files =
            StaticFiles::new(d.settings().dhcp.ipxe_dir.clone()).counting(d.http_metrics.clone());
        return logged.answer(files.respond(&method, req.headers(), name).await);
    }
    let Some(snap) = d.current() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no snapshot yet: the first sync has not finished",
        );
    };
    let headers = req.headers();
    let collapsed = collapse(&path);
    let rel = collapsed.trim_start_matches('/');
    // The re-exported stream: upstream metadata byte for byte, payloads by upstream path.
    let blob = |digest: &crate::simplestreams::Sha256| {
        let hex = digest.to_string();
        let files = StaticFiles::new(d.settings().state_dir.join("blobs/sha256"))
            .counting(d.http_metrics.clone());
        (files, format!("/{}/{}", &hex[..2], hex))
    };
    // Lookups by name use the percent-decoded path (iPXE sends `%3A` for `:`).
    if let Some(digest) = snap.manifest.metadata.get(decoded.as_str()) {
        let (files, p) = blob(digest);
        return files.respond_as(&method, headers, &p, Some(rel)).await;
    }
    let static_path = rel.strip_prefix("images/").unwrap_or(rel);
    // Boot configs rendered per request, with URLs for the host the client used.
    let host = headers
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok());
    let port = match host.and_then(crate::serve::boot::host_ip) {
        Some(ip) => d.http_port_for(ip),
        None => d.http_port_for(std::net::Ipv4Addr::UNSPECIFIED.into()),
    };
    let here = crate::serve::boot::Here::from_host(host, port);
    let dynamic_path = decoded.strip_prefix("images/").unwrap_or(&decoded);
    match crate::serve::boot::dynamic(
        &d.settings(),
        &snap,
        dynamic_path,
        req.uri().query(),
        true,
        &here,
    ) {
        crate::serve::boot::Dynamic::Text(text) => {
            let len = text.len();
            let body = if method == Method::HEAD {
                crate::http::empty()
            } else {
                full(text)
            };
            return logged.answer(
                Response::builder()
                    .header("content-type", "text/plain; charset=utf-8")
                    .header("content-length", len)
                    .header("cache-control", "no-store")
                    .body(body)
                    .expect("valid response"),
            );
        }
        crate::serve::boot::Dynamic::NotFound => {
            return logged.answer(error(StatusCode::NOT_FOUND, "not found"))
        }
        crate::serve::boot::Dynamic::Static => {}
    }
    // The body keeps the snapshot: its generation is not collected while it is sent.
    let files = StaticFiles::with_fd(snap.dir.clone(), snap.root.clone())
        .counting(d.http_metrics.clone())
        .keeping(snap.clone());
    let resp = files.respond(&method, headers, static_path).await;
    if resp.status() == StatusCode::NOT_FOUND {
        if let Some(digest) = snap.payloads.get(rel) {
            let (files, p) = blob(digest);
            return files.respond_as(&method, headers, &p, Some(rel)).await;
        }
    }
    logged.answer(resp)
}

fn collapse(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Checks the bearer token for a write. `Err` is the response to send.
fn authorize(d: &Daemon, req: &Request<Incoming>) -> Result<(), Response<Body>> {
    let settings = d.settings();
    let Some(file) = &settings.http.token_file else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "write endpoints are disabled: set http.token_file in the config",
        ));
    };
    let token = match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("token file {} is empty", file.display()),
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read token file {}: {e}", file.display()),
            ))
        }
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(error(StatusCode::UNAUTHORIZED, "wrong bearer token")),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token>",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body: {e}"),
            ))
        }
    };
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<body::Strict>(&bytes) {
        Ok(v) => Ok(v.0),
        Err(e) if e.is_data() => Err(error(StatusCode::BAD_REQUEST, format!("request body: {e}"))),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("request body is not JSON: {e}"),
        )),
    }
}

/// Typed request bodies: a JSON object's fields taken one by one with the type each
/// must have (`null` clears a setting), anything left over an unknown field, and
/// duplicate keys refused at any depth. Every error names the field.
mod body {
    use super::*;
    use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

    /// A JSON value parsed with duplicate object keys refused (serde_json's own
    /// `Value` silently keeps the last one).
    pub struct Strict(pub Value);

    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
            d.deserialize_any(StrictVisitor)
        }
    }

    struct StrictVisitor;

    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = Strict;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_unit<E>(self) -> Result<Strict, E> {
            Ok(Strict(Value::Null))
        }
        fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
            Ok(Strict(Value::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
            Ok(Strict(json!(v)))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
            Ok(Strict(json!(v)))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
            Ok(Strict(json!(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
            Ok(Strict(Value::String(v.to_string())))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
            let mut out = Vec::new();
            while let Some(Strict(v)) = seq.next_element()? {
                out.push(v);
            }
            Ok(Strict(Value::Array(out)))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(k) = map.next_key::<String>()? {
                if out.contains_key(&k) {
                    return Err(A::Error::custom(format!("duplicate key {k:?}")));
                }
                let Strict(v) = map.next_value()?;
                out.insert(k, v);
            }
            Ok(Strict(Value::Object(out)))
        }
    }

    /// What a field of a body asks for.
    pub enum Patch<T> {
        /// Absent: leave the setting as it is.
        Keep,
        /// `null`: back to the default.
        Clear,
        Set(T),
    }

    impl<T> Patch<T> {
        /// Applies the field to `slot`: `null` stores `cleared`, a value what `set` makes
        /// of it.
        fn apply<U>(self, slot: &mut U, cleared: U, set: impl FnOnce(T) -> U) {
            match self {
                Patch::Keep => {}
                Patch::Clear => *slot = cleared,
                Patch::Set(v) => *slot = set(v),
            }
        }
    }

    fn kind(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }

    /// A JSON object body being taken apart; `what` prefixes its errors.
    pub struct Fields {
        obj: serde_json::Map<String, Value>,
        what: String,
        /// The fields taken so far: the known ones.
        known: Vec<&'static str>,
    }

    pub fn bad(msg: impl std::fmt::Display) -> Response<Body> {
        error(StatusCode::BAD_REQUEST, msg)
    }

    impl Fields {
        pub fn new(v: Value, what: &str) -> Result<Fields, Response<Body>> {
            match v {
                Value::Object(obj) => Ok(Fields {
                    obj,
                    what: what.to_string(),
                    known: Vec::new(),
                }),
                other => Err(bad(format!(
                    "{what}: request body must be a JSON object, not {}",
                    kind(&other)
                ))),
            }
        }

        fn wrong(&self, k: &str, want: &str, got: &Value) -> Response<Body> {
            bad(format!(
                "{}: field {k:?} must be {want}, not {}",
                self.what,
                kind(got)
            ))
        }

        /// Takes field `k`: absent, `null`, or what `of` makes of its value (which
        /// gives the value back when it is not `want`).
        fn take<T>(
            &mut self,
            k: &'static str,
            want: &str,
            of: fn(Value) -> Result<T, Value>,
        ) -> Result<Patch<T>, Response<Body>> {
            self.known.push(k);
            match self.obj.remove(k) {
                None => Ok(Patch::Keep),
                Some(Value::Null) => Ok(Patch::Clear),
                Some(v) => of(v).map(Patch::Set).map_err(|v| self.wrong(k, want, &v)),
            }
        }

        pub fn string(&mut self, k: &'static str) -> Result<Patch<String>, Response<Body>> {
            self.take(k, "a string or null", |v| match v {
                Value::String(s) => Ok(s),
                v => Err(v),
            })
        }

        pub fn boolean(&mut self, k: &'static str) -> Result<Patch<bool>, Response<Body>> {
            self.take(k, "true, false or null", |v| match v {
                Value::Bool(b) => Ok(b),
                v => Err(v),
            })
        }

        /// An array of strings (or one string, a comma-separated list, as the CLI
        /// takes it).
        pub fn list(&mut self, k: &'static str) -> Result<Patch<Vec<String>>, Response<Body>> {
            let items = match self.take(k, "an array of strings or null", |v| match v {
                Value::String(s) => Ok(vec![Value::String(s)]),
                Value::Array(a) => Ok(a),
                v => Err(v),
            })? {
                Patch::Keep => return Ok(Patch::Keep),
                Patch::Clear => return Ok(Patch::Clear),
                Patch::Set(items) => items,
            };
            let mut out = Vec::new();
            for item in items {
                match item {
                    Value::String(s) => out.extend(crate::select::split_list(&s)),
                    other => {
                        return Err(self.wrong(
                            k,
                            "an array of strings (an element is not)",
                            &other,
                        ))
                    }
                }
            }
            Ok(Patch::Set(out))
        }

        /// Refuses whatever field was not taken.
        pub fn done(self) -> Result<(), Response<Body>> {
            match self.obj.keys().next() {
                None => Ok(()),
                Some(k) => Err(bad(format!(
                    "{}: unknown field {k:?} (known: {})",
                    self.what,
                    self.known.join(", ")
                ))),
            }
        }
    }

    /// A machine's settings from a `PUT /api/v1/machines/MAC` body.
    pub fn apply_machine(m: &mut crate::machines::Machine, v: Value) -> Result<(), Response<Body>> {
        let mut f = Fields::new(v, "machine")?;
        let image = f.string("image")?;
        let kernel_params = f.string("kernel_params")?;
        let local_boot = f.boolean("local_boot")?;
        let dhcp_boot = f.string("dhcp_boot")?;
        f.done()?;
        local_boot.apply(&mut m.local_boot, None, Some);
        for (field, patch) in [
            ("image", image),
            ("kernel_params", kernel_params),
            ("dhcp_boot", dhcp_boot),
        ] {
            let value = match &patch {
                Patch::Keep => continue,
                Patch::Clear => None,
                Patch::Set(s) => Some(s.as_str()),
            };
            m.set_text(field, value)
                .map_err(|e| bad(format!("machine: field {field:?}: {e}")))?;
        }
        Ok(())
    }

    /// A boot source's fields from a body; the result is checked (URL, signing,
    /// keyring parsed) before anything is saved.
    pub fn apply_source(s: &mut StoredSource, v: Value) -> Result<(), Response<Body>> {
        let mut f = Fields::new(v, "boot source")?;
        let url = f.string("url")?;
        let keyring_filename = f.string("keyring_filename")?;
        let keyring_data = f.string("keyring_data")?;
        let unsigned = f.boolean("unsigned")?;
        f.done()?;
        match url {
            Patch::Keep => {}
            Patch::Clear => return Err(bad("boot source: field \"url\" cannot be null")),
            Patch::Set(u) => s.url = u,
        }
        if s.url.is_empty() {
            return Err(bad("boot source: field \"url\" is required"));
        }
        keyring_filename.apply(&mut s.keyring_filename, None, |p| {
            (!p.is_empty()).then(|| p.into())
        });
        keyring_data.apply(&mut s.keyring_data, None, |d| (!d.is_empty()).then_some(d));
        unsigned.apply(&mut s.unsigned, false, |b| b);
        crate::config::check_source(&s.config())
            .map_err(|e| bad(format!("boot source {}: {e}", s.id)))
    }

    /// A selection's fields from a body (`what` names it in errors); `null` puts a
    /// field back to MAAS's default (ubuntu, every arch, subarch and label).
    pub fn apply_selection(
        sel: &mut crate::config::Selection,
        v: Value,
        what: &str,
    ) -> Result<(), Response<Body>> {
        let mut f = Fields::new(v, what)?;
        let os = f.string("os")?;
        let release = f.string("release")?;
        let arches = f.list("arches")?;
        let subarches = f.list("subarches")?;
        let labels = f.list("labels")?;
        f.done()?;
        // `null` puts MAAS's default back.
        let default = crate::config::Selection::maas_default();
        os.apply(&mut sel.os, default.os, |s| s);
        release.apply(&mut sel.release, default.release, |s| s);
        arches.apply(&mut sel.arches, default.arches, |v| v);
        subarches.apply(&mut sel.subarches, default.subarches, |v| v);
        labels.apply(&mut sel.labels, default.labels, |v| v);
        if sel.release.is_empty() || sel.os.is_empty() {
            return Err(bad(format!("{what}: a selection needs os and release")));
        }
        Ok(())
    }

    /// A new selection from a body, over MAAS's defaults.
    pub fn selection(v: Value, what: &str) -> Result<crate::config::Selection, Response<Body>> {
        let mut sel = crate::config::Selection::maas_default();
        apply_selection(&mut sel, v, what)?;
        Ok(sel)
    }
}

/// Sources as shown outside the state file: URLs without their credentials.
pub fn shown_sources(sources: &[StoredSource]) -> Vec<StoredSource> {
    sources.iter().map(shown_source).collect()
}

pub fn shown_source(s: &StoredSource) -> StoredSource {
    StoredSource {
        url: crate::config::redacted(&s.url),
        ..s.clone()
    }
}

fn status_doc(d: &Daemon) -> Status {
    let snap = d.shown();
    let st = d.status();
    let live = &d.live;
    use std::sync::atomic::Ordering::Relaxed;
    let settings = d.settings();
    let drift = Sources::load(&settings.state_dir)
        .ok()
        .flatten()
        .and_then(|s| s.differs_from_config(&settings))
        .map(|w| crate::config::redact_text(&w));
    let sources = Sources::current(&settings).unwrap_or_default();
    let last_success = crate::state::SyncState::load(&settings.state_dir)
        .ok()
        .and_then(|s| s.last_success);
    Status {
        version: Some(crate::version().into()),
        uptime_s: Some(d.started.elapsed().as_secs()),
        state_dir: settings.state_dir.clone(),
        generation: snap.as_ref().map(|s| s.generation),
        snapshot_created: snap.as_ref().map(|s| s.created),
        files: snap.as_ref().map(|s| s.manifest.files.len()).unwrap_or(0),
        products: snap
            .as_ref()
            .map(|s| s.manifest.products.len())
            .unwrap_or(0),
        last_success,
        sources: sources
            .sources
            .iter()
            .map(|s| crate::config::redacted(&s.url))
            .collect(),
        sync_running: st.running,
        sync_auto: Some(settings.sync.auto),
        sync_interval_s: Some(settings.sync.interval.as_secs()),
        progress: if st.running {
            Progress::Running {
                bytes_done: live.bytes_done.load(Relaxed),
                bytes_total: live.bytes_total.load(Relaxed),
                files_done: live.files_done.load(Relaxed),
                files_total: live.files_total.load(Relaxed),
            }
        } else {
            Progress::Idle
        },
        sync: Some(st),
        warning: drift,
        daemon: None,
    }
}

/// The catalog the last sync that read the upstream wrote (`[]` before that).
fn catalog(d: &Daemon) -> Vec<crate::select::CatalogEntry> {
    let p = d.settings().state_dir.join(crate::sync::CATALOG_FILE);
    std::fs::read(&p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The Images page.
fn images_page(d: &Daemon, head: bool) -> Response<Body> {
    let settings = d.settings();
    let snap = d.shown();
    let status = d.status();
    let sources = Sources::current(&settings).unwrap_or_default();
    let catalog = catalog(d);
    let boots = d.boots.list().machines;
    let html = crate::serve::web::render(&crate::serve::web::Page {
        version: crate::version(),
        generation: snap.as_ref().map(|s| s.generation),
        snapshot_created: snap.as_ref().map(|s| s.created),
        status: &status,
        sync_auto: settings.sync.auto,
        sources: &sources.sources,
        catalog: &catalog,
        resources: snap
            .as_ref()
            .map(|s| s.manifest.products.as_slice())
            .unwrap_or(&[]),
        writes_enabled: settings.http.token_file.is_some(),
        boots: &boots,
    });
    let len = html.len();
    Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .header("content-length", len)
        .header("cache-control", "no-store")
        .header("content-security-policy", crate::serve::web::csp())
        .body(if head {
            crate::http::empty()
        } else {
            full(html)
        })
        .expect("valid response")
}

fn resources_json(d: &Daemon) -> Value {
    match d.shown().as_deref() {
        Some(snap) => snap.manifest.resources_json(),
        None => json!([]),
    }
}

/// The API's GET and HEAD routes.
fn api_read(
    d: &Daemon,
    settings: &crate::config::Settings,
    parts: &[&str],
    rest: &str,
) -> Response<Body> {
    match (parts, true) {
        (["status"], true) => json_response(
            StatusCode::OK,
            &serde_json::to_value(status_doc(d)).expect("status serialises"),
        ),
        (["resources"], true) => json_response(StatusCode::OK, &resources_json(d)),
        (["boots"], true) => json_response(
            StatusCode::OK,
            &serde_json::to_value(d.boots.list()).expect("boots serialise"),
        ),
        (["boots", mac], true) => {
            let Some(mac) = crate::bootcfg::Mac::parse(mac) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{mac:?} is not a MAC address"),
                );
            };
            match d.boots.machine(mac) {
                Some(b) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(b).expect("boots serialise"),
                ),
                None => error(StatusCode::NOT_FOUND, format!("no boots logged for {mac}")),
            }
        }
        (["catalog"], true) => json_response(StatusCode::OK, &json!(catalog(d))),
        (["machines"], true) => match crate::machines::load(&settings.state_dir) {
            Ok(state) => {
                let macs: std::collections::BTreeSet<_> = settings
                    .machines
                    .keys()
                    .chain(state.keys())
                    .copied()
                    .collect();
                let all: serde_json::Map<String, Value> = macs
                    .iter()
                    .map(|m| {
                        (
                            m.to_string(),
                            json!(crate::machines::effective(&settings.machines, &state, m)),
                        )
                    })
                    .collect();
                json_response(StatusCode::OK, &Value::Object(all))
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        },
        (["machines", mac], true) => {
            let Some(mac) = crate::bootcfg::Mac::parse(mac) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{mac:?} is not a MAC address"),
                );
            };
            match crate::machines::load(&settings.state_dir) {
                Ok(state) => json_response(
                    StatusCode::OK,
                    &json!(crate::machines::effective(&settings.machines, &state, &mac)),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
            }
        }
        (["sources"], true) => match Sources::current(settings) {
            Ok(s) => json_response(StatusCode::OK, &json!(shown_sources(&s.sources))),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        },
        (["sources", id, "selections"], true) | (["selections", id], true) => {
            let sources = match Sources::current(settings) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
            };
            match sources.sources.iter().find(|s| s.id.to_string() == *id) {
                Some(s) => json_response(StatusCode::OK, &json!(s.selections)),
                None => error(StatusCode::NOT_FOUND, format!("no boot source {id}")),
            }
        }
        (["selections"], true) => {
            let sources = Sources::current(settings).unwrap_or_default();
            let all: Vec<Value> = sources
                .sources
                .iter()
                .flat_map(|s| {
                    s.selections.iter().map(move |sel| {
                        let mut v = json!(sel);
                        v["boot_source_id"] = json!(s.id);
                        v
                    })
                })
                .collect();
            json_response(StatusCode::OK, &Value::Array(all))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint /api/v1/{rest}"),
        ),
    }
}

async fn api(d: Arc<Daemon>, req: Request<Incoming>, rest: String) -> Response<Body> {
    let method = req.method().clone();
    let parts: Vec<&str> = rest.split('/').collect();
    let settings = d.settings();
    let read = matches!(method, Method::GET | Method::HEAD);
    if read {
        return api_read(&d, &settings, &parts, &rest);
    }
    if let Err(resp) = authorize(&d, &req) {
        return resp;
    }
    match (method, parts.as_slice()) {
        (Method::POST, ["sync"]) => {
            // `{"allow_downgrade": true}`: this sync accepts older signed metadata.
            let body = match read_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let allow = match body.get("allow_downgrade") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("allow_downgrade={other}: expected true or false"),
                    )
                }
            };
            if allow {
                d.allow_downgrade_once
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            d.trigger.notify_one();
            json_response(StatusCode::ACCEPTED, &json!({"sync": "started"}))
        }
        (Method::POST, ["sync", "stop"]) => match d.sync_stop.lock().expect("lock").as_ref() {
            Some(stop) => {
                stop.cancel();
                json_response(StatusCode::ACCEPTED, &json!({"sync": "stopping"}))
            }
            None => error(StatusCode::CONFLICT, "no sync is running"),
        },
        (m @ (Method::PUT | Method::DELETE), ["machines", mac]) => {
            let Some(mac) = crate::bootcfg::Mac::parse(mac) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{mac:?} is not a MAC address"),
                );
            };
            // The lock is held until machines.json is written: no concurrent edit is lost.
            let (body, _lock) = match body_under_lock(req, &settings.state_dir).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let mut state = match crate::machines::load(&settings.state_dir) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
            };
            if m == Method::DELETE {
                state.remove(&mac);
            } else {
                let mut entry = state.get(&mac).cloned().unwrap_or_default();
                if let Err(r) = body::apply_machine(&mut entry, body) {
                    return r;
                }
                state.insert(mac, entry);
                let merged = crate::machines::effective(&settings.machines, &state, &mac);
                if let Err(e) = crate::machines::check_fits(&merged, &settings.boot.kernel_params) {
                    return error(StatusCode::BAD_REQUEST, e);
                }
            }
            if let Err(e) = crate::machines::save(&settings.state_dir, &state) {
                return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
            }
            json_response(
                StatusCode::OK,
                &json!(crate::machines::effective(&settings.machines, &state, &mac)),
            )
        }
        (m, p) => {
            let (body, _lock) = match body_under_lock(req, &settings.state_dir).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match write_sources(&d, &m, p, body) {
                Ok(v) => {
                    d.trigger.notify_one();
                    json_response(StatusCode::OK, &v)
                }
                Err(r) => r,
            }
        }
    }
}

/// A write's JSON body, and the state lock held until the caller has written.
async fn body_under_lock(
    req: Request<Incoming>,
    state_dir: &std::path::Path,
) -> Result<(Value, crate::state::StateLock), Response<Body>> {
    let body = read_json(req).await?;
    let lock = crate::state::StateLock::acquire_async(state_dir)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    Ok((body, lock))
}

/// What a shared edit did not find is a 404 naming it.
impl From<EditError> for Response<Body> {
    fn from(e: EditError) -> Response<Body> {
        error(StatusCode::NOT_FOUND, e.to_string())
    }
}

/// Source and selection writes, with the CLI's semantics.
fn write_sources(d: &Daemon, m: &Method, p: &[&str], body: Value) -> Result<Value, Response<Body>> {
    let settings = d.settings();
    let internal = |e: anyhow::Error| error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
    let mut sources = Sources::current(&settings).map_err(internal)?;
    // Ids in the path: one that is not a number names no source or selection.
    let id_of = |id: &str| id.parse::<u64>().ok();
    let no_source = |id: &str| error(StatusCode::NOT_FOUND, format!("no boot source {id}"));
    let result = match (m, p) {
        (&Method::POST, ["sources"]) => json!(sources.add_source(|s| body::apply_source(s, body))?),
        (&Method::PUT, ["sources", id]) => {
            let id = id_of(id).ok_or_else(|| no_source(id))?;
            json!(sources.edit_source(id, |s| body::apply_source(s, body))?)
        }
        (&Method::DELETE, ["sources", id]) => {
            let id = id_of(id).ok_or_else(|| no_source(id))?;
            json!(sources.delete_source(id)?)
        }
        (&Method::POST, ["sources", id, "selections"]) => {
            let id = id_of(id).ok_or_else(|| no_source(id))?;
            let sel = body::selection(body, "selection")?;
            json!(sources.add_selection(id, sel)?)
        }
        (&Method::PUT, ["sources", id, "selections"]) => {
            // Replaces all of the source's selections (the Images page's "Save
            // selection"): a JSON array of objects with the selection keys.
            let Value::Array(list) = body else {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "expected a JSON array of selections",
                ));
            };
            let i = id_of(id)
                .and_then(|n| sources.sources.iter().position(|s| s.id == n))
                .ok_or_else(|| no_source(id))?;
            let first = sources.next_selection_id();
            let mut new = Vec::new();
            for (next, (n, item)) in (first..).zip(list.into_iter().enumerate()) {
                let sel = body::selection(item, &format!("selection {n}"))?;
                new.push(StoredSelection {
                    id: next,
                    selection: sel,
                });
            }
            sources.sources[i].selections = new;
            json!(sources.sources[i].selections)
        }
        (&Method::PUT, ["sources", id, "selections", sid]) => {
            let id = id_of(id).ok_or_else(|| no_source(id))?;
            let no_sel = || {
                error(
                    StatusCode::NOT_FOUND,
                    format!("no selection {sid} in boot source {id}"),
                )
            };
            let sid = id_of(sid).ok_or_else(no_sel)?;
            let what = format!("selection {sid}");
            json!(sources.edit_selection(id, sid, |s| body::apply_selection(s, body, &what))?)
        }
        (&Method::DELETE, ["sources", id, "selections", sid]) => {
            let id = id_of(id).ok_or_else(|| no_source(id))?;
            let no_sel = || {
                error(
                    StatusCode::NOT_FOUND,
                    format!("no selection {sid} in boot source {id}"),
                )
            };
            sources.delete_selection(id, id_of(sid).ok_or_else(no_sel)?)?;
            json!({"deleted": sid})
        }
        _ => {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint {m} /api/v1/{}", p.join("/")),
            ))
        }
    };
    std::fs::create_dir_all(&settings.state_dir).map_err(|e| internal(e.into()))?;
    sources.save(&settings.state_dir).map_err(internal)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::body::*;
    use super::*;

    fn strict(s: &str) -> Result<Value, String> {
        serde_json::from_str::<Strict>(s)
            .map(|v| v.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert_eq!(
            strict(r#"{"a": [1, {"b": null}], "c": "x"}"#).unwrap(),
            json!({"a": [1, {"b": null}], "c": "x"})
        );
        let e = strict(r#"{"a": 1, "a": 2}"#).unwrap_err();
        assert!(e.contains("duplicate key \"a\""), "{e}");
        let e = strict(r#"[{"release": "noble", "release": "jammy"}]"#).unwrap_err();
        assert!(e.contains("duplicate key \"release\""), "{e}");
    }

    #[test]
    fn null_clears_and_wrong_types_name_the_field() {
        let mut m = crate::machines::Machine {
            image: Some("ubuntu/noble".into()),
            kernel_params: Some("console=ttyS0".into()),
            local_boot: Some(true),
            dhcp_boot: None,
        };
        apply_machine(&mut m, json!({"kernel_params": null, "local_boot": false})).unwrap();
        assert_eq!(m.kernel_params, None);
        assert_eq!(m.local_boot, Some(false));
        assert_eq!(m.image.as_deref(), Some("ubuntu/noble"));
        let mut sel =
            selection(json!({"release": "noble", "arches": "amd64, arm64"}), "s").unwrap();
        assert_eq!(sel.arches, ["amd64", "arm64"]);
        apply_selection(&mut sel, json!({"arches": null}), "s").unwrap();
        assert_eq!(sel.arches, ["*"]);
        for (body, field) in [
            (json!({"kernel_params": {"a": 1}}), "kernel_params"),
            (json!({"local_boot": "true"}), "local_boot"),
            (json!({"image": 3}), "image"),
            (json!({"dhcp_boot": "../x"}), "dhcp_boot"),
            (json!({"imagee": "x"}), "imagee"),
        ] {
            let r = apply_machine(&mut m, body).unwrap_err();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            let bytes = futures_util::FutureExt::now_or_never(r.into_body().collect())
                .expect("a full body is ready")
                .unwrap()
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            let msg = v["error"].as_str().unwrap();
            assert!(msg.contains(&format!("{field:?}")), "{msg}");
        }
    }
}
