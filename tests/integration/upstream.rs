//! A fake upstream for tests: a SimpleStreams tree built in a temp dir (real payloads,
//! real bootloader `tar.xz` archives, clearsigned with sequoia), served by a small HTTP
//! server on 127.0.0.1:0 that records requests and injects faults per path.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::serialize::stream::{Message, Signer};
use openpgp::serialize::Serialize as _;
use openpgp::types::{HashAlgorithm, KeyFlags};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Keys and signing

/// A signing key for test streams.
pub struct TestKey {
    pub cert: openpgp::Cert,
}

impl TestKey {
    /// A fresh Ed25519 key (SHA-512 self-signatures).
    pub fn generate() -> TestKey {
        let (cert, _) = CertBuilder::new()
            .add_userid("rackboot test <test@rackboot.invalid>")
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_primary_key_flags(KeyFlags::empty().set_signing().set_certification())
            .generate()
            .expect("key generation");
        TestKey { cert }
    }

    /// The snake-oil RSA key whose only self-signature uses SHA-1 (like the keys in
    /// ubuntu-cloudimage-keyring.gpg).
    pub fn sha1_selfsigned() -> TestKey {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sha1-selfsig-secret.asc");
        TestKey {
            cert: openpgp::Cert::from_file(&path).expect("fixture key parses"),
        }
    }

    /// The public keyring (binary), as a file.
    pub fn write_keyring(&self, path: &Path) {
        let mut out = Vec::new();
        self.cert.serialize(&mut out).expect("serialise cert");
        std::fs::write(path, out).unwrap();
    }

    /// Clearsigns `text` with the given data hash.
    pub fn clearsign(&self, text: &[u8], hash: HashAlgorithm) -> Vec<u8> {
        self.clearsign_at(text, hash, SystemTime::now())
    }

    /// [`TestKey::clearsign`], the signature dated `at`.
    pub fn clearsign_at(&self, text: &[u8], hash: HashAlgorithm, at: SystemTime) -> Vec<u8> {
        let keypair = self
            .cert
            .primary_key()
            .key()
            .clone()
            .parts_into_secret()
            .expect("secret key")
            .into_keypair()
            .expect("keypair");
        let mut sink = Vec::new();
        {
            let message = Message::new(&mut sink);
            let mut signer = Signer::new(message, keypair)
                .expect("signer")
                .cleartext()
                .hash_algo(hash)
                .expect("hash algo")
                .creation_time(at)
                .build()
                .expect("build signer");
            signer.write_all(text).unwrap();
            signer.finalize().unwrap();
        }
        sink
    }
}

/// Whether the relaxed policy is needed for a key (sanity check of the fixture).
pub fn valid_under_standard_policy(cert: &openpgp::Cert) -> bool {
    cert.with_policy(&StandardPolicy::new(), None).is_ok()
}

// ---------------------------------------------------------------------------
// Stream trees

/// Deterministic pseudo-random bytes.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut out);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A `tar.xz` archive holding `members` (name → bytes).
pub fn tar_xz(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        tar.append_data(&mut h, name, &data[..]).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let mut xz =
        lzma_rust2::XZWriter::new(Vec::new(), lzma_rust2::XZOptions::with_preset(6)).unwrap();
    std::io::Write::write_all(&mut xz, &raw).unwrap();
    xz.finish().unwrap()
}

/// One item of a product version.
#[derive(Clone)]
pub struct ItemSpec {
    pub name: String,
    pub ftype: String,
    pub path: String,
    pub data: Vec<u8>,
    /// Overrides of what the index lists (to publish wrong sizes or hashes).
    pub listed_size: Option<u64>,
    pub listed_sha256: Option<String>,
}

#[derive(Clone)]
pub struct ProductSpec {
    pub content_id: String,
    pub name: String,
    pub fields: Map<String, Value>,
    pub versions: BTreeMap<String, Vec<ItemSpec>>,
}

impl ItemSpec {
    /// An item the index lists as it is.
    fn new(name: &str, ftype: &str, path: String, data: Vec<u8>) -> ItemSpec {
        ItemSpec {
            name: name.into(),
            ftype: ftype.into(),
            path,
            data,
            listed_size: None,
            listed_sha256: None,
        }
    }
}

impl ProductSpec {
    /// A product with one version holding `items`; `fields` are its string fields.
    fn new(
        content_id: &str,
        name: String,
        fields: &[(&str, &str)],
        version: &str,
        items: Vec<ItemSpec>,
    ) -> ProductSpec {
        ProductSpec {
            content_id: content_id.into(),
            name,
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
            versions: BTreeMap::from([(version.to_string(), items)]),
        }
    }
}

/// A boot image product (kernel, initrd, squashfs) with a GA generic kernel.
pub fn image(release: &str, arch: &str, version: &str, size: usize) -> ProductSpec {
    let seed = |s: &str| {
        let h = Sha256::digest(format!("{release}{arch}{version}{s}"));
        u64::from_le_bytes(h[..8].try_into().unwrap())
    };
    let base = format!("{release}/{arch}/{version}");
    let item = |name: &str, path: String, len: usize| {
        ItemSpec::new(name, name, path, payload(seed(name), len))
    };
    ProductSpec::new(
        "com.ubuntu.maas:stable:v3:download",
        format!("com.ubuntu.maas.stable:v3:boot:24.04:{arch}:ga-24.04"),
        &[
            ("os", "ubuntu"),
            ("release", release),
            ("version", "24.04"),
            ("arch", arch),
            ("subarch", "ga-24.04"),
            ("subarches", "generic,ga-24.04"),
            ("kflavor", "generic"),
            ("label", "stable"),
            ("release_title", "24.04 LTS"),
        ],
        version,
        vec![
            item(
                "boot-kernel",
                format!("{base}/ga-24.04/generic/boot-kernel"),
                size,
            ),
            item(
                "boot-initrd",
                format!("{base}/ga-24.04/generic/boot-initrd"),
                size / 2 + 3,
            ),
            item("squashfs", format!("{base}/squashfs"), size * 2 + 1),
        ],
    )
}

/// The bootloader products for amd64 (pxelinux, shim+grub) and arm64 (grub).
pub fn bootloaders(version: &str) -> Vec<ProductSpec> {
    // `name` is MAAS's `os:bootloader-type:arch`.
    let mk = |name: &str, arches: &str, items: Vec<(&str, Vec<u8>)>| {
        let [os, btype, arch] = name.split(':').collect::<Vec<_>>()[..] else {
            panic!("{name} is not os:type:arch")
        };
        let path = |item: &str| format!("bootloaders/{btype}/{arch}/{version}/{item}.tar.xz");
        ProductSpec::new(
            "com.ubuntu.maas:stable:1:bootloader-download",
            format!("com.ubuntu.maas.stable:1:{name}"),
            &[
                ("os", os),
                ("arch", arch),
                ("arches", arches),
                ("bootloader-type", btype),
                ("label", "stable"),
            ],
            version,
            items
                .into_iter()
                .map(|(item, data)| ItemSpec::new(item, "archive.tar.xz", path(item), data))
                .collect(),
        )
    };
    vec![
        mk(
            "pxelinux:pxe:i386",
            "i386,amd64",
            vec![(
                "pxelinux",
                tar_xz(&[
                    ("pxelinux.0", b"pxelinux-bios".to_vec()),
                    ("lpxelinux.0", b"lpxelinux-bios-http".to_vec()),
                    ("ldlinux.c32", payload(1, 4000)),
                    ("chain.c32", payload(2, 3000)),
                ]),
            )],
        ),
        mk(
            "grub-efi-signed:uefi:amd64",
            "amd64",
            vec![
                (
                    "shim-signed",
                    tar_xz(&[("shimx64.efi.signed", payload(3, 5000))]),
                ),
                (
                    "grub2-signed",
                    tar_xz(&[
                        ("grubnetx64.efi.signed", payload(4, 6000)),
                        ("grub/x86_64-efi/http.mod", payload(5, 700)),
                    ]),
                ),
            ],
        ),
        mk(
            "grub-efi:uefi:arm64",
            "arm64",
            vec![(
                "grub2-signed",
                tar_xz(&[
                    ("grubnetaa64.efi.signed", payload(6, 6000)),
                    ("shimaa64.efi.signed", payload(7, 5000)),
                ]),
            )],
        ),
    ]
}

/// How the metadata is published.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    /// `.json` and `.sjson` signed with the data hash.
    Signed(HashAlgorithm),
}

/// Writes a whole stream under `root`: payloads, products files and index, both
/// `.json` and clearsigned `.sjson`. Returns the payload paths → bytes.
pub fn write_stream(root: &Path, products: &[ProductSpec], key: &TestKey, signing: Signing) {
    let Signing::Signed(hash) = signing;
    let mut by_cid: BTreeMap<String, Vec<&ProductSpec>> = BTreeMap::new();
    for p in products {
        by_cid.entry(p.content_id.clone()).or_default().push(p);
    }
    let updated = "Mon, 24 Nov 2026 12:00:00 +0000";
    let mut index_json = Map::new();
    let mut index_sjson = Map::new();
    for (cid, prods) in &by_cid {
        let mut pmap = Map::new();
        for p in prods {
            let mut versions = Map::new();
            for (v, items) in &p.versions {
                let mut imap = Map::new();
                for it in items {
                    let file = root.join(&it.path);
                    if !it.path.contains("..") && !it.path.starts_with('/') {
                        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                        std::fs::write(&file, &it.data).unwrap();
                    }
                    imap.insert(
                        it.name.clone(),
                        json!({
                            "ftype": it.ftype,
                            "path": it.path,
                            "size": it.listed_size.unwrap_or(it.data.len() as u64),
                            "sha256": it.listed_sha256.clone().unwrap_or_else(|| sha256_hex(&it.data)),
                        }),
                    );
                }
                versions.insert(v.clone(), json!({ "items": imap }));
            }
            let mut prod = p.fields.clone();
            prod.insert("versions".into(), Value::Object(versions));
            pmap.insert(p.name.clone(), Value::Object(prod));
        }
        let doc = json!({
            "format": "products:1.0",
            "content_id": cid,
            "datatype": "image-ids",
            "updated": updated,
            "products": pmap,
        });
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let base = format!("streams/v1/{cid}");
        std::fs::create_dir_all(root.join("streams/v1")).unwrap();
        std::fs::write(root.join(format!("{base}.json")), &text).unwrap();
        std::fs::write(
            root.join(format!("{base}.sjson")),
            key.clearsign(text.as_bytes(), hash),
        )
        .unwrap();
        let names: Vec<&str> = prods.iter().map(|p| p.name.as_str()).collect();
        for (map, ext) in [(&mut index_json, "json"), (&mut index_sjson, "sjson")] {
            map.insert(
                cid.clone(),
                json!({"datatype": "image-ids", "format": "products:1.0", "updated": updated,
                       "path": format!("{base}.{ext}"), "products": names}),
            );
        }
    }
    let idx = |m: Map<String, Value>| {
        serde_json::to_string_pretty(
            &json!({"format": "index:1.0", "updated": updated, "index": m}),
        )
        .unwrap()
    };
    std::fs::write(root.join("streams/v1/index.json"), idx(index_json)).unwrap();
    let signed = idx(index_sjson);
    std::fs::write(
        root.join("streams/v1/index.sjson"),
        key.clearsign(signed.as_bytes(), hash),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------
// The HTTP server

/// A fault injected for paths that end with a given suffix.
#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    /// Accept the request, then send nothing for this long.
    Stall(Duration),
    /// Announce the full length but close after this many body bytes.
    Truncate(usize),
    /// Send the body at about this many bytes per second.
    Throttle(usize),
    /// Redirect to this URL.
    Redirect(String),
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub status: u16,
}

#[derive(Default)]
struct Shared {
    faults: Vec<(String, Fault)>,
    log: Vec<Request>,
}

/// A file server on 127.0.0.1:0; stops (and joins its thread) on drop.
pub struct MirrorServer {
    pub port: u16,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MirrorServer {
    pub fn start(root: &Path) -> MirrorServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, st) = (root.to_path_buf(), shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (r, s, st) = (r.clone(), s.clone(), st.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &r, &s, &st);
                });
            }
        });
        MirrorServer {
            port,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn fault(&self, suffix: &str, fault: Fault) {
        self.shared
            .lock()
            .unwrap()
            .faults
            .push((suffix.to_string(), fault));
    }

    pub fn clear_faults(&self) {
        self.shared.lock().unwrap().faults.clear();
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.shared.lock().unwrap().log.clear();
    }
}

impl Drop for MirrorServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn etag_of(data: &[u8]) -> String {
    format!("\"{}\"", &sha256_hex(data)[..16])
}

fn handle(
    mut conn: TcpStream,
    root: &Path,
    shared: &Mutex<Shared>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    // One request per connection (we answer with Connection: close).
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("/").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let fault = {
        let s = shared.lock().unwrap();
        s.faults
            .iter()
            .find(|(suf, _)| path.ends_with(suf.as_str()))
            .map(|(_, f)| f.clone())
    };
    let log = |status: u16| {
        shared.lock().unwrap().log.push(Request {
            path: path.clone(),
            headers: headers.clone(),
            status,
        })
    };
    let reply =
        |conn: &mut TcpStream, status: u16, extra: &str, body: &[u8]| -> std::io::Result<()> {
            write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                body.len()
            )?;
            if method != "HEAD" {
                conn.write_all(body)?;
            }
            Ok(())
        };
    match &fault {
        Some(Fault::Status(code)) => {
            log(*code);
            return reply(&mut conn, *code, "", b"injected failure");
        }
        Some(Fault::Stall(d)) => {
            log(0);
            let deadline = Instant::now() + *d;
            while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return Ok(());
        }
        Some(Fault::Redirect(to)) => {
            log(302);
            return reply(&mut conn, 302, &format!("Location: {to}\r\n"), b"");
        }
        _ => {}
    }
    let rel = path.trim_start_matches('/');
    let file = root.join(rel);
    let data = match (rel.contains(".."), std::fs::read(&file)) {
        (false, Ok(d)) => d,
        _ => {
            log(404);
            return reply(&mut conn, 404, "", b"not found");
        }
    };
    let etag = etag_of(&data);
    if headers.get("if-none-match") == Some(&etag) {
        log(304);
        return reply(&mut conn, 304, &format!("ETag: {etag}\r\n"), b"");
    }
    let (status, body, extra) = match headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok())
    {
        Some(start) if start < data.len() => (
            206,
            &data[start..],
            format!(
                "Content-Range: bytes {start}-{}/{}\r\n",
                data.len() - 1,
                data.len()
            ),
        ),
        _ => (200, &data[..], String::new()),
    };
    log(status);
    write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nETag: {etag}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )?;
    if method == "HEAD" {
        return Ok(());
    }
    match fault {
        Some(Fault::Truncate(n)) => {
            conn.write_all(&body[..n.min(body.len())])?;
        }
        Some(Fault::Throttle(rate)) => {
            let chunk = (rate / 20).max(1);
            for c in body.chunks(chunk) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                conn.write_all(c)?;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        _ => conn.write_all(body)?,
    }
    let _ = conn.flush();
    // Drain anything left so the close is clean.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(10)));
    let _ = reader.read(&mut [0u8; 64]);
    Ok(())
}
