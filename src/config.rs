//! Configuration: TOML file + drop-ins → validated [`Settings`].
//!
//! Three stages: raw serde types (every field optional, unknown keys rejected by name),
//! merged over the drop-ins in `rackboot.toml.d/*.toml` (sorted; tables merge, other
//! values replace), then validated into `Settings` with defaults filled in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the config comes from when neither `--config` nor `$RACKBOOT_CONFIG` is set.
pub const DEFAULT_CONFIG: &str = "/etc/rackboot/rackboot.toml";
/// The default boot source (MAAS's stable image stream).
pub const DEFAULT_SOURCE_URL: &str = "https://images.maas.io/ephemeral-v3/stable/";
/// The keyring that signs images.maas.io.
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg";

/// A config error: always names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

fn err(file: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.display().to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    drain_timeout: Option<String>,
    sync: Option<RawSync>,
    tftp: Option<RawTftp>,
    http: Option<RawHttp>,
    boot: Option<RawBoot>,
    sources: Option<Vec<RawSource>>,
    machines: Option<BTreeMap<String, crate::machines::Machine>>,
    store: Option<RawStore>,
    dhcp: Option<RawDhcp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    verify_interval: Option<String>,
    verify_repair: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDhcp {
    proxy: Option<bool>,
    interfaces: Option<Vec<String>>,
    uefi_loader: Option<String>,
    ipxe_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    interval: Option<String>,
    auto: Option<bool>,
    parallel: Option<usize>,
    timeout: Option<String>,
    deadline: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTftp {
    listen: Option<Vec<String>>,
    max_blksize: Option<u16>,
    max_windowsize: Option<u16>,
    max_transfers: Option<usize>,
    max_transfers_per_client: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<Vec<String>>,
    token_file: Option<PathBuf>,
    tls_listen: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_connections: Option<usize>,
    header_timeout: Option<String>,
    max_connections_per_client: Option<usize>,
    send_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    default_image: Option<String>,
    kernel_params: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: String,
    keyring_filename: Option<PathBuf>,
    keyring_data: Option<String>,
    unsigned: Option<bool>,
    selections: Option<Vec<RawSelection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelection {
    os: Option<String>,
    release: String,
    arches: Option<Vec<String>>,
    subarches: Option<Vec<String>>,
    labels: Option<Vec<String>>,
}

/// Validated settings, defaults filled in.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The main config file that was read (`None` when it does not exist).
    pub file: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// On SIGTERM, how long transfers in progress may still run.
    pub drain_timeout: Duration,
    pub sync: SyncSettings,
    pub tftp: TftpSettings,
    pub http: HttpSettings,
    pub boot: BootSettings,
    /// Boot sources from the config file: they seed the state on first start.
    pub sources: Vec<SourceConfig>,
    /// Per-MAC boot settings from the config (the state's `machines.json` wins).
    pub machines: BTreeMap<crate::bootcfg::Mac, crate::machines::Machine>,
    pub store: StoreSettings,
    pub dhcp: DhcpSettings,
}

/// `[dhcp]`: the ProxyDHCP (off by default) and the iPXE binaries served as `ipxe/…`.
#[derive(Debug, Clone)]
pub struct DhcpSettings {
    pub proxy: bool,
    /// Interfaces ProxyDHCP answers on (non-empty when `proxy`).
    pub interfaces: Vec<String>,
    pub uefi_loader: crate::dhcp::UefiLoader,
    /// Where `ipxe/<name>` is served from (TFTP and HTTP).
    pub ipxe_dir: PathBuf,
}

/// `[store]`: the daemon's scheduled `fsck`.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// How often the daemon re-hashes the store (`None`: never; "0" in the file).
    pub verify_interval: Option<Duration>,
    /// Quarantine bad blobs found by the scheduled check (as `fsck --repair`).
    pub verify_repair: bool,
}

#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub interval: Duration,
    pub auto: bool,
    /// Parallel downloads.
    pub parallel: NonZeroUsize,
    /// How long an upstream may stay silent (connect, headers, or between body chunks).
    pub timeout: Duration,
    /// The longest a whole sync run may take (metadata, downloads, unpacking);
    /// past it the run fails and nothing is published.
    pub deadline: Duration,
}

#[derive(Debug, Clone)]
pub struct TftpSettings {
    pub listen: Vec<SocketAddr>,
    pub max_blksize: u16,
    pub max_windowsize: u16,
    pub max_transfers: usize,
    /// Transfers one client address may run at once.
    pub max_transfers_per_client: usize,
}

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub listen: Vec<SocketAddr>,
    pub token_file: Option<PathBuf>,
    pub tls: Option<TlsSettings>,
    /// Open connections (plain and TLS together); more are closed at once.
    pub max_connections: usize,
    /// Time a client has to send a request head (slowloris guard).
    pub header_timeout: Duration,
    /// Open connections from one client address; more from it are closed at once.
    pub max_connections_per_client: usize,
    /// A response that makes no send progress this long is closed.
    pub send_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub listen: Vec<SocketAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct BootSettings {
    pub default_image: String,
    pub kernel_params: String,
}

/// A boot source as configured (and as stored in the state, with ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceConfig {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring_filename: Option<PathBuf>,
    /// Base64 of a binary keyring; wins over `keyring_filename`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring_data: Option<String>,
    #[serde(default)]
    pub unsigned: bool,
    #[serde(default)]
    pub selections: Vec<Selection>,
}

// `Selection` belongs to the pure `select` layer; the config names it.
pub use crate::select::Selection;

/// Parses durations such as `"5m"`, `"30s"`, `"250ms"`, `"1h"`, `"2d"` or a bare
/// number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86400)?),
        _ => return None,
    };
    Some(d)
}

/// Parses `"[::]:69"`, `"0.0.0.0:69"`, `"127.0.0.1:0"`.
fn parse_addrs(file: &Path, key: &str, list: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    list.iter()
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|_| err(file, format!("{key}: invalid socket address {a:?}")))
        })
        .collect()
}

/// Which config file to read: `--config`, else `$RACKBOOT_CONFIG`, else the default.
pub fn config_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os("RACKBOOT_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG),
    }
}

fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| err(path, one_line(&e.to_string())))?;
    // Check each file on its own so an unknown key is reported against its file.
    RawConfig::deserialize(table.clone())
        .map_err(|e: toml::de::Error| err(path, one_line(&e.to_string())))?;
    Ok(table)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Tables merge key by key; everything else (arrays included) is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Loads `path` (a missing main file means "all defaults") and its drop-ins.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let mut table = toml::Table::new();
    let file = if path.exists() {
        table = read_toml(path)?;
        Some(path.to_path_buf())
    } else if path != Path::new(DEFAULT_CONFIG) {
        return Err(err(path, "no such config file"));
    } else {
        None
    };
    let dropin_dir = {
        let mut d = path.as_os_str().to_owned();
        d.push(".d");
        PathBuf::from(d)
    };
    if let Ok(rd) = std::fs::read_dir(&dropin_dir) {
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for f in files {
            merge(&mut table, read_toml(&f)?);
        }
    }
    let raw = RawConfig::deserialize(table).map_err(|e| err(path, one_line(&e.to_string())))?;
    validate(path, file, raw)
}

/// Parses a config from a string (tests and examples).
pub fn from_str(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| err(path, one_line(&e.to_string())))?;
    validate(path, Some(path.to_path_buf()), raw)
}

/// Largest `tftp.max_windowsize` accepted.
const MAX_TFTP_WINDOWSIZE: u16 = 256;

fn validate(path: &Path, file: Option<PathBuf>, raw: RawConfig) -> Result<Settings, ConfigError> {
    let sync = raw.sync.unwrap_or_default();
    let dur = |key: &str, v: Option<String>, default: Duration| duration(path, key, v, default);
    let drain_timeout = dur("drain_timeout", raw.drain_timeout, Duration::from_secs(30))?;
    let sync = SyncSettings {
        interval: dur("sync.interval", sync.interval, Duration::from_secs(300))?,
        auto: sync.auto.unwrap_or(true),
        parallel: NonZeroUsize::new(sync.parallel.unwrap_or(4))
            .ok_or_else(|| err(path, "sync.parallel: must be at least 1"))?,
        timeout: dur("sync.timeout", sync.timeout, Duration::from_secs(30))?,
        deadline: dur(
            "sync.deadline",
            sync.deadline,
            Duration::from_secs(2 * 3600),
        )?,
    };
    let tftp = validate_tftp(path, raw.tftp.unwrap_or_default())?;
    let http = validate_http(path, raw.http.unwrap_or_default())?;
    let boot = raw.boot.unwrap_or_default();
    let boot = BootSettings {
        default_image: boot.default_image.unwrap_or_else(|| "ubuntu/noble".into()),
        kernel_params: boot.kernel_params.unwrap_or_default(),
    };
    crate::bootcfg::check_kernel_params(&boot.kernel_params)
        .map_err(|e| err(path, format!("boot.{e}")))?;
    let sources = match raw.sources {
        None => vec![default_source()],
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, s)| validate_source(s).map_err(|m| err(path, format!("sources[{i}]: {m}"))))
            .collect::<Result<_, _>>()?,
    };
    let machines = validate_machines(path, raw.machines.unwrap_or_default())?;
    let store = validate_store(path, raw.store.unwrap_or_default())?;
    let dhcp = validate_dhcp(path, raw.dhcp.unwrap_or_default())?;
    Ok(Settings {
        dhcp,
        store,
        machines,
        file,
        state_dir: raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/rackboot")),
        drain_timeout,
        sync,
        tftp,
        http,
        boot,
        sources,
    })
}

/// A positive duration setting, `default` when unset.
fn duration(
    path: &Path,
    key: &str,
    v: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => match parse_duration(&s) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(err(
                path,
                format!("{key}: invalid duration {s:?} (use e.g. \"5m\", \"30s\")"),
            )),
        },
    }
}

/// The `[tftp]` section.
fn validate_tftp(path: &Path, tftp: RawTftp) -> Result<TftpSettings, ConfigError> {
    let max_blksize = tftp.max_blksize.unwrap_or(1468);
    if !(512..=65464).contains(&max_blksize) {
        return Err(err(
            path,
            format!("tftp.max_blksize: {max_blksize} is outside 512..=65464"),
        ));
    }
    let max_windowsize = tftp.max_windowsize.unwrap_or(64);
    if max_windowsize == 0 {
        return Err(err(path, "tftp.max_windowsize: must be at least 1"));
    }
    // A window goes out per ACK: bound the burst one (possibly spoofed) ACK can cause.
    if max_windowsize > MAX_TFTP_WINDOWSIZE {
        return Err(err(
            path,
            format!(
                "tftp.max_windowsize: {max_windowsize} is above {MAX_TFTP_WINDOWSIZE} (one ACK may cause a whole window to be sent)"
            ),
        ));
    }
    let max_transfers_per_client = tftp.max_transfers_per_client.unwrap_or(64);
    if max_transfers_per_client == 0 {
        return Err(err(
            path,
            "tftp.max_transfers_per_client: must be at least 1",
        ));
    }
    Ok(TftpSettings {
        listen: parse_addrs(
            path,
            "tftp.listen",
            &tftp.listen.unwrap_or_else(|| vec!["[::]:69".into()]),
        )?,
        max_blksize,
        max_windowsize,
        max_transfers: tftp.max_transfers.unwrap_or(8192),
        max_transfers_per_client,
    })
}

/// The `[http]` section.
fn validate_http(path: &Path, http: RawHttp) -> Result<HttpSettings, ConfigError> {
    let dur = |key: &str, v: Option<String>, default: Duration| duration(path, key, v, default);
    let tls = match (http.tls_cert, http.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(TlsSettings {
            listen: parse_addrs(
                path,
                "http.tls_listen",
                &http.tls_listen.unwrap_or_else(|| vec!["[::]:5443".into()]),
            )?,
            cert,
            key,
        }),
        _ => {
            return Err(err(
                path,
                "http.tls_cert and http.tls_key must be set together",
            ))
        }
    };
    Ok(HttpSettings {
        listen: parse_addrs(
            path,
            "http.listen",
            &http.listen.unwrap_or_else(|| vec!["[::]:5248".into()]),
        )?,
        token_file: http.token_file,
        tls,
        max_connections: match http.max_connections.unwrap_or(10_000) {
            0 => return Err(err(path, "http.max_connections: must be at least 1")),
            n => n,
        },
        header_timeout: dur(
            "http.header_timeout",
            http.header_timeout,
            Duration::from_secs(10),
        )?,
        max_connections_per_client: match http.max_connections_per_client.unwrap_or(64) {
            0 => {
                return Err(err(
                    path,
                    "http.max_connections_per_client: must be at least 1",
                ))
            }
            n => n,
        },
        send_timeout: dur(
            "http.send_timeout",
            http.send_timeout,
            Duration::from_secs(60),
        )?,
    })
}

/// The `[machines]` table: MAC addresses, image references, kernel parameters.
fn validate_machines(
    path: &Path,
    raw: BTreeMap<String, crate::machines::Machine>,
) -> Result<BTreeMap<crate::bootcfg::Mac, crate::machines::Machine>, ConfigError> {
    let mut machines = BTreeMap::new();
    for (mac, m) in raw {
        let parsed = crate::bootcfg::Mac::parse(&mac)
            .ok_or_else(|| err(path, format!("machines: {mac:?} is not a MAC address")))?;
        if let Some(image) = &m.image {
            crate::machines::ImageRef::parse(image)
                .map_err(|e| err(path, format!("machines.{mac:?}.image: {e}")))?;
        }
        if let Some(p) = &m.kernel_params {
            crate::bootcfg::check_kernel_params(p)
                .map_err(|e| err(path, format!("machines.{mac:?}.{e}")))?;
        }
        if let Some(b) = &m.dhcp_boot {
            crate::dhcp::Override::parse(b)
                .map_err(|e| err(path, format!("machines.{mac:?}.{e}")))?;
        }
        machines.insert(parsed, m);
    }
    Ok(machines)
}

/// The `[store]` section.
fn validate_store(path: &Path, raw_store: RawStore) -> Result<StoreSettings, ConfigError> {
    Ok(StoreSettings {
        verify_interval: match raw_store.verify_interval.as_deref().map(str::trim) {
            None => Some(Duration::from_secs(7 * 86400)),
            Some("0") => None,
            Some(v) => match parse_duration(v) {
                Some(d) if d >= Duration::from_secs(1) => Some(d),
                _ => {
                    return Err(err(
                        path,
                        format!(
                            "store.verify_interval: invalid duration {v:?} (e.g. \"7d\"; \
                             \"0\" disables the check)"
                        ),
                    ))
                }
            },
        },
        verify_repair: raw_store.verify_repair.unwrap_or(false),
    })
}

/// The `[dhcp]` section.
fn validate_dhcp(path: &Path, raw: RawDhcp) -> Result<DhcpSettings, ConfigError> {
    let proxy = raw.proxy.unwrap_or(false);
    let interfaces = raw.interfaces.unwrap_or_default();
    for name in &interfaces {
        // IFNAMSIZ is 16 with the NUL; the kernel refuses `/`, `:` and spaces.
        let ok = !name.is_empty()
            && name.len() <= 15
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | ':'));
        if !ok {
            return Err(err(
                path,
                format!("dhcp.interfaces: {name:?} is not an interface name"),
            ));
        }
    }
    if proxy && interfaces.is_empty() {
        return Err(err(
            path,
            "dhcp.interfaces: list the interfaces ProxyDHCP answers on (e.g. [\"br0\"]) when dhcp.proxy = true",
        ));
    }
    let uefi_loader = match raw.uefi_loader.as_deref() {
        None => crate::dhcp::UefiLoader::Ipxe,
        Some(v) => crate::dhcp::UefiLoader::parse(v).ok_or_else(|| {
            err(
                path,
                format!("dhcp.uefi_loader: {v:?} is neither \"ipxe\" nor \"shim\""),
            )
        })?,
    };
    Ok(DhcpSettings {
        proxy,
        interfaces,
        uefi_loader,
        ipxe_dir: raw
            .ipxe_dir
            .unwrap_or_else(|| PathBuf::from("/usr/lib/ipxe")),
    })
}

/// The source used when the config names none: images.maas.io stable, the Ubuntu
/// cloud image keyring, the current LTS for amd64.
pub fn default_source() -> SourceConfig {
    SourceConfig {
        url: DEFAULT_SOURCE_URL.into(),
        keyring_filename: Some(DEFAULT_KEYRING.into()),
        keyring_data: None,
        unsigned: false,
        selections: vec![Selection {
            os: "ubuntu".into(),
            release: "noble".into(),
            arches: vec!["amd64".into()],
            subarches: vec!["*".into()],
            labels: vec!["*".into()],
        }],
    }
}

fn validate_source(s: RawSource) -> Result<SourceConfig, String> {
    let source = SourceConfig {
        url: s.url,
        keyring_filename: s.keyring_filename,
        keyring_data: s.keyring_data,
        unsigned: s.unsigned.unwrap_or(false),
        selections: s
            .selections
            .unwrap_or_default()
            .into_iter()
            .map(|r| Selection {
                os: r.os.unwrap_or_else(|| "ubuntu".into()),
                release: r.release,
                arches: r.arches.unwrap_or_else(|| vec!["*".into()]),
                subarches: r.subarches.unwrap_or_else(|| vec!["*".into()]),
                labels: r.labels.unwrap_or_else(|| vec!["*".into()]),
            })
            .collect(),
    };
    check_source(&source)?;
    Ok(source)
}

/// Checks a source the same way whether it comes from the config, the CLI or the API.
/// The message names what is wrong (the keyring file, the URL).
pub fn check_source(s: &SourceConfig) -> Result<(), String> {
    let url = SourceUrl::parse(&s.url)?;
    let has_keyring = s.keyring_filename.is_some() || s.keyring_data.is_some();
    if s.unsigned && has_keyring {
        return Err("unsigned = true cannot be combined with a keyring".into());
    }
    if !url.signed && !s.unsigned {
        return Err(format!(
            "url {} names an unsigned index; set unsigned = true to use it without verification",
            s.url
        ));
    }
    if url.signed && s.unsigned && url.explicit_index {
        return Err(format!(
            "url {} names a signed index but unsigned = true",
            s.url
        ));
    }
    if !s.unsigned && !has_keyring {
        return Err(
            "a signed source needs keyring_filename or keyring_data (or unsigned = true)".into(),
        );
    }
    // The keyring is parsed as a sync would: a bad one is refused here, not saved to
    // fail every later sync (of the healthy sources too).
    if let Some(data) = &s.keyring_data {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| format!("keyring_data is not base64: {e}"))?;
        crate::verify::Keyring::from_bytes(&bytes, "keyring_data").map_err(|e| e.to_string())?;
    } else if let Some(f) = &s.keyring_filename {
        crate::verify::Keyring::from_file(f).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A boot source URL split into the mirror root and the index document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUrl {
    /// The mirror root, ending in `/`.
    pub root: url::Url,
    /// Path of the index below the root (`streams/v1/index.sjson`).
    pub index: String,
    /// `.sjson` (clearsigned) mode.
    pub signed: bool,
    /// Whether the URL named the index file itself.
    pub explicit_index: bool,
    /// The retired daily stream was rewritten to stable.
    pub rewritten_daily: bool,
}

impl SourceUrl {
    pub fn parse(raw: &str) -> Result<SourceUrl, String> {
        let mut raw = raw.trim().to_string();
        let mut rewritten_daily = false;
        if let Some(pos) = raw.find("/ephemeral-v3/daily") {
            let rest = &raw[pos + "/ephemeral-v3/daily".len()..];
            if rest.is_empty() || rest.starts_with('/') {
                raw = format!("{}/ephemeral-v3/stable{}", &raw[..pos], rest);
                rewritten_daily = true;
            }
        }
        let url = url::Url::parse(&raw).map_err(|e| format!("invalid url {raw:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https" | "file") {
            return Err(format!(
                "unsupported url scheme in {raw:?} (http, https or file)"
            ));
        }
        let path = url.path().to_string();
        let (root_path, index, explicit) = match path.find("streams/v1/") {
            Some(pos) if path.ends_with(".json") || path.ends_with(".sjson") => {
                (path[..pos].to_string(), path[pos..].to_string(), true)
            }
            _ => {
                let mut p = path.clone();
                if !p.ends_with('/') {
                    p.push('/');
                }
                (p, "streams/v1/index.sjson".to_string(), false)
            }
        };
        let mut root = url.clone();
        root.set_path(&root_path);
        root.set_query(None);
        root.set_fragment(None);
        let signed = index.ends_with(".sjson");
        Ok(SourceUrl {
            root,
            index,
            signed,
            explicit_index: explicit,
            rewritten_daily,
        })
    }
}

/// `url` with its credentials (`user:pass@`) replaced by `***@`: the form a source URL
/// is shown in (API, page, CLI) and logged.
pub fn redacted(url: &str) -> String {
    redact_text(url)
}

/// `text` (an error, a log line) with the credentials of every URL in it replaced by
/// `***`: anything between `scheme://` and an `@` before the end of the authority.
pub fn redact_text(text: &str) -> String {
    if !text.contains('@') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority ends at the path, query, fragment or the end of the URL.
        let end = after
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '`') || c.is_whitespace()
            })
            .unwrap_or(after.len());
        match after[..end].rfind('@') {
            Some(userinfo) => {
                out.push_str("***");
                rest = &after[userinfo..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// Renders a source for a warning when the config's sources differ from the state's.
pub fn describe_sources(sources: &[SourceConfig]) -> BTreeMap<String, usize> {
    sources
        .iter()
        .map(|s| (s.url.clone(), s.selections.len()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config: `head` (settings before the sources), then one unsigned local source.
    fn with_source(head: &str) -> Result<Settings, ConfigError> {
        from_str(
            Path::new("c.toml"),
            &format!("{head}[[sources]]\nurl = \"http://127.0.0.1/streams/v1/index.json\"\nunsigned = true\n"),
        )
    }

    #[test]
    fn tftp_limits_are_validated() {
        let p = Path::new("rackboot.toml");
        let parse = |t: &str| validate(p, None, toml::from_str(t).unwrap());
        let s = parse("[tftp]\nmax_transfers_per_client = 8\nmax_windowsize = 256\n").unwrap();
        assert_eq!(
            (s.tftp.max_transfers_per_client, s.tftp.max_windowsize),
            (8, 256)
        );
        assert_eq!(parse("").unwrap().tftp.max_transfers_per_client, 64);
        let e = parse("[tftp]\nmax_windowsize = 257\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tftp.max_windowsize: 257 is above 256"), "{e}");
        let e = parse("[tftp]\nmax_transfers_per_client = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tftp.max_transfers_per_client"), "{e}");
    }

    #[test]
    fn store_verify_interval() {
        let p = Path::new("x.toml");
        let s = from_str(p, "").unwrap();
        assert_eq!(
            s.store.verify_interval,
            Some(Duration::from_secs(7 * 86400))
        );
        assert!(!s.store.verify_repair);
        let s = from_str(p, "[store]\nverify_interval = \"0\"\n").unwrap();
        assert_eq!(s.store.verify_interval, None);
        let s = from_str(
            p,
            "[store]\nverify_interval = \"12h\"\nverify_repair = true\n",
        )
        .unwrap();
        assert_eq!(
            s.store.verify_interval,
            Some(Duration::from_secs(12 * 3600))
        );
        assert!(s.store.verify_repair);
        for bad in ["\"weekly\"", "\"100ms\""] {
            let e = from_str(p, &format!("[store]\nverify_interval = {bad}\n")).unwrap_err();
            assert!(e.to_string().contains("store.verify_interval"), "{e}");
        }
    }

    #[test]
    fn dhcp_section() {
        let p = Path::new("x.toml");
        let s = from_str(p, "").unwrap();
        assert!(!s.dhcp.proxy);
        assert_eq!(s.dhcp.uefi_loader, crate::dhcp::UefiLoader::Ipxe);
        assert_eq!(s.dhcp.ipxe_dir, PathBuf::from("/usr/lib/ipxe"));
        let s = from_str(
            p,
            "[dhcp]\nproxy = true\ninterfaces = [\"br0\", \"eth1\"]\nuefi_loader = \"shim\"\n",
        )
        .unwrap();
        assert!(s.dhcp.proxy);
        assert_eq!(s.dhcp.interfaces, ["br0", "eth1"]);
        assert_eq!(s.dhcp.uefi_loader, crate::dhcp::UefiLoader::Shim);
        for (bad, key) in [
            ("proxy = true\n", "dhcp.interfaces"),
            ("proxy = true\ninterfaces = []\n", "dhcp.interfaces"),
            ("interfaces = [\"../x\"]\n", "dhcp.interfaces"),
            (
                "interfaces = [\"a-very-long-interface\"]\n",
                "dhcp.interfaces",
            ),
            ("uefi_loader = \"grub\"\n", "dhcp.uefi_loader"),
            ("proxi = true\n", "proxi"),
        ] {
            let e = from_str(p, &format!("[dhcp]\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && !e.contains('\n'), "{bad}: {e}");
        }
        let e = from_str(
            p,
            "[machines.\"52:54:00:00:00:01\"]\ndhcp_boot = \"/etc/x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dhcp_boot"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("5 parsecs"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = from_str(Path::new("x.toml"), "[sync]\nintervall = \"5m\"\n").unwrap_err();
        assert!(e.to_string().contains("intervall"), "{e}");
        assert!(e.to_string().starts_with("x.toml: "), "{e}");
        let e = from_str(Path::new("x.toml"), "bogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn credentials_are_redacted_wherever_a_url_appears() {
        assert_eq!(
            redacted("https://user:s3cret@mirror.example/maas/"),
            "https://***@mirror.example/maas/"
        );
        assert_eq!(redacted("http://tok@h:8080"), "http://***@h:8080");
        assert_eq!(redacted("http://h/a@b"), "http://h/a@b");
        assert_eq!(redacted("file:///srv/m@x/"), "file:///srv/m@x/");
        assert_eq!(
            redact_text("GET http://u:p@a/x failed; see https://b/ and ftp://q:w@c?z@y"),
            "GET http://***@a/x failed; see https://b/ and ftp://***@c?z@y"
        );
        assert_eq!(
            redact_text("urls [\"http://u:p@a/\"]"),
            "urls [\"http://***@a/\"]"
        );
        assert_eq!(redact_text("plain text @ no url"), "plain text @ no url");
    }

    #[test]
    fn source_urls() {
        let u = SourceUrl::parse("https://images.maas.io/ephemeral-v3/stable").unwrap();
        assert_eq!(
            u.root.as_str(),
            "https://images.maas.io/ephemeral-v3/stable/"
        );
        assert_eq!(u.index, "streams/v1/index.sjson");
        assert!(u.signed);
        let u = SourceUrl::parse("http://region:5240/MAAS/images-stream/streams/v1/index.json")
            .unwrap();
        assert_eq!(u.root.as_str(), "http://region:5240/MAAS/images-stream/");
        assert!(!u.signed && u.explicit_index);
        let u = SourceUrl::parse("http://images.maas.io/ephemeral-v3/daily/").unwrap();
        assert!(u.rewritten_daily);
        assert_eq!(
            u.root.as_str(),
            "http://images.maas.io/ephemeral-v3/stable/"
        );
        assert!(SourceUrl::parse("ftp://x/").is_err());
    }

    #[test]
    fn unreadable_keyring_is_named() {
        let text =
            "[[sources]]\nurl = \"http://127.0.0.1/\"\nkeyring_filename = \"/nonexistent/k.gpg\"\n";
        let e = from_str(Path::new("c.toml"), text).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/k.gpg"), "{e}");
    }

    #[test]
    fn sync_deadline_defaults_and_is_checked() {
        assert_eq!(
            with_source("").unwrap().sync.deadline,
            Duration::from_secs(7200)
        );
        let s = with_source("[sync]\ndeadline = \"30m\"\n").unwrap();
        assert_eq!(s.sync.deadline, Duration::from_secs(1800));
        let e = with_source("[sync]\ndeadline = \"0s\"\n").unwrap_err();
        assert!(e.to_string().contains("sync.deadline"), "{e}");
    }

    #[test]
    fn http_limits_default_parse_and_are_checked() {
        let s = with_source("").unwrap();
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert_eq!(s.http.max_connections, 10_000);
        assert_eq!(s.http.header_timeout, Duration::from_secs(10));
        assert_eq!(s.http.max_connections_per_client, 64);
        assert_eq!(s.http.send_timeout, Duration::from_secs(60));
        let set = "drain_timeout = \"2m\"\n[http]\nmax_connections = 64\nheader_timeout = \"3s\"\n\
                   max_connections_per_client = 8\nsend_timeout = \"2s\"\n";
        let s = with_source(set).unwrap();
        assert_eq!(s.drain_timeout, Duration::from_secs(120));
        assert_eq!(s.http.max_connections, 64);
        assert_eq!(s.http.header_timeout, Duration::from_secs(3));
        assert_eq!(s.http.max_connections_per_client, 8);
        assert_eq!(s.http.send_timeout, Duration::from_secs(2));
        for (bad, key) in [
            ("[http]\nmax_connections = 0", "http.max_connections"),
            ("[http]\nheader_timeout = \"soon\"", "http.header_timeout"),
            (
                "[http]\nmax_connections_per_client = 0",
                "http.max_connections_per_client",
            ),
            ("[http]\nsend_timeout = \"0s\"", "http.send_timeout"),
            ("drain_timeout = \"never\"", "drain_timeout"),
        ] {
            let e = with_source(&format!("{bad}\n")).unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn example_configs_parse() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/rackboot.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        // The shipped config names the system keyring, which may be absent here:
        // check its syntax and keys, not the keyring's presence.
        let raw: Result<RawConfig, _> = toml::from_str(&text);
        assert!(raw.is_ok(), "{}: {:?}", p.display(), raw.err());
    }

    #[test]
    fn signed_source_needs_keyring_and_unsigned_needs_consent() {
        let e = from_str(
            Path::new("c.toml"),
            "[[sources]]\nurl = \"http://127.0.0.1/\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("keyring"), "{e}");
        let e = from_str(
            Path::new("c.toml"),
            "[[sources]]\nurl = \"http://127.0.0.1/streams/v1/index.json\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unsigned = true"), "{e}");
        assert!(with_source("").unwrap().sources[0].unsigned);
    }
}
