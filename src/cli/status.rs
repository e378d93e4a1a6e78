//! `rackboot status` and the client of the daemon's API: where the daemon is, its
//! token, one call, and the status document (typed: [`crate::serve::status::Status`])
//! printed for people.

use crate::config::Settings;
use crate::serve::status::{Progress, Reach, Status};
use crate::state::{Sources, SyncState};
use crate::store::Store;
use crate::sync::human_bytes;

use super::{print_json, sync_running, usage, Cli};

/// The daemon answered a call with an error status.
#[derive(Debug, thiserror::Error)]
#[error("{url}: HTTP {status}: {message}")]
pub struct ApiError {
    pub url: url::Url,
    pub status: reqwest::StatusCode,
    /// The daemon's `{"error"}` text, else its body.
    pub message: String,
}
/// Where `rackboot status` finds the daemon: `--url`, else the first HTTP listen
/// address of the config (a wildcard address means this host: loopback).
pub(super) fn daemon_url(settings: &Settings, url: Option<&str>) -> anyhow::Result<url::Url> {
    if let Some(u) = url {
        let parsed = url::Url::parse(u).map_err(|e| usage(format!("--url {u:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(usage(format!("--url {u:?}: not an http(s) URL")));
        }
        return Ok(parsed);
    }
    let Some(addr) = settings.http.listen.first() else {
        return Err(usage(
            "http.listen is empty in the config: pass --url to reach the daemon",
        ));
    };
    let mut addr = *addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    url::Url::parse(&format!("http://{addr}/")).map_err(|e| anyhow::anyhow!("{addr}: {e}"))
}

/// The daemon's `/api/v1/status` document.
pub(super) async fn fetch_status(base: &url::Url) -> anyhow::Result<Status> {
    let v = daemon_call(base, reqwest::Method::GET, "api/v1/status", "").await?;
    serde_json::from_value(v)
        .map_err(|e| anyhow::anyhow!("{base}: not a rackboot status document: {e}"))
}

/// The bearer token for API writes, from `http.token_file`.
pub(super) fn api_token(settings: &Settings) -> anyhow::Result<String> {
    let Some(path) = &settings.http.token_file else {
        return Err(usage(
            "http.token_file is not set: the daemon's API takes no writes without it",
        ));
    };
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the API token {}: {e}", path.display()))?;
    Ok(token.trim().to_string())
}

/// One request to the daemon's API (with a bearer token unless `token` is empty);
/// its JSON answer, or an error naming the URL, the status and the daemon's message.
pub(super) async fn daemon_call(
    base: &url::Url,
    method: reqwest::Method,
    path: &str,
    token: &str,
) -> anyhow::Result<serde_json::Value> {
    let url = base.join(path)?;
    let client = reqwest::Client::builder()
        .user_agent(concat!("rackboot/", env!("CARGO_PKG_VERSION")))
        .timeout(std::time::Duration::from_secs(5))
        .no_proxy()
        .build()?;
    let mut req = client.request(method, url.clone());
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.map_err(|e| {
        // reqwest's own text repeats the URL; the innermost cause says why.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        anyhow::anyhow!("{url}: {cause}")
    })?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
        return Err(ApiError {
            url,
            status,
            message: msg,
        }
        .into());
    }
    serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("{url}: not a rackboot API document: {e}"))
}

fn unix_date(t: Option<u64>) -> String {
    t.map(|t| httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)))
        .unwrap_or_else(|| "never".into())
}

/// The status from the state directory alone (no daemon).
fn offline_status(settings: &Settings) -> anyhow::Result<Status> {
    let store = Store::existing(&settings.state_dir);
    let state = SyncState::load(&settings.state_dir)?;
    let generation = store.current_generation();
    let manifest = generation.and_then(|g| store.read_manifest(g).ok());
    let sources = Sources::current(settings)?;
    let drift = Sources::load(&settings.state_dir)?.and_then(|s| s.differs_from_config(settings));
    Ok(Status {
        state_dir: settings.state_dir.clone(),
        generation,
        snapshot_created: manifest.as_ref().map(|m| m.created),
        files: manifest.as_ref().map(|m| m.files.len()).unwrap_or(0),
        products: manifest.as_ref().map(|m| m.products.len()).unwrap_or(0),
        last_success: state.last_success,
        sync_running: sync_running(settings),
        sources: sources
            .sources
            .iter()
            .map(|s| crate::config::redacted(&s.url))
            .collect(),
        warning: drift.map(|w| crate::config::redact_text(&w)),
        ..Status::default()
    })
}

pub(super) async fn cmd_status(
    cli: &Cli,
    settings: &Settings,
    url: Option<&str>,
) -> anyhow::Result<()> {
    let base = daemon_url(settings, url)?;
    let v = match fetch_status(&base).await {
        Ok(v) => Status {
            daemon: Some(Reach {
                url: base.to_string(),
                running: true,
                error: None,
            }),
            ..v
        },
        Err(e) => Status {
            daemon: Some(Reach {
                url: base.to_string(),
                running: false,
                error: Some(format!("{e:#}")),
            }),
            ..offline_status(settings)?
        },
    };
    if cli.json {
        return print_json(&v);
    }
    print_status(&base, &v);
    Ok(())
}

/// `rackboot status` for people.
fn print_status(base: &url::Url, v: &Status) {
    match &v.daemon {
        Some(Reach { running: true, .. }) => println!(
            "daemon:       running at {} (rackboot {}, up {} s)",
            base,
            v.version.as_deref().unwrap_or("?"),
            v.uptime_s.unwrap_or(0)
        ),
        other => println!(
            "daemon:       not reachable: {}",
            other
                .as_ref()
                .and_then(|d| d.error.as_deref())
                .unwrap_or("?")
        ),
    }
    println!("state dir:    {}", v.state_dir.display());
    match v.generation {
        Some(g) => println!(
            "serving:      generation {g} ({} files, {} products, built {})",
            v.files,
            v.products,
            unix_date(v.snapshot_created)
        ),
        None => println!("serving:      nothing yet (no snapshot)"),
    }
    println!("last success: {}", unix_date(v.last_success));
    if let Some(sync) = &v.sync {
        println!(
            "last sync:    {} at {}{}",
            sync.last_result.as_deref().unwrap_or("none yet"),
            unix_date(sync.last_finished),
            sync.last_duration_ms
                .map(|ms| format!(" ({ms} ms)"))
                .unwrap_or_default()
        );
        if let Some(err) = &sync.last_error {
            println!("last error:   {err}");
        }
        println!(
            "syncs:        {} runs, {} failed, {} fetched",
            sync.runs,
            sync.failures,
            human_bytes(sync.bytes_fetched_total)
        );
        if v.sync_auto == Some(false) {
            println!("auto sync:    paused (sync.auto = false; POST /api/v1/sync to sync)");
        } else {
            println!(
                "auto sync:    every {} s, next at {}",
                v.sync_interval_s.unwrap_or(0),
                unix_date(sync.next_sync)
            );
        }
    }
    match &v.progress {
        Progress::Running {
            bytes_done,
            bytes_total,
            files_done,
            files_total,
        } => println!(
            "sync running: yes, {files_done} of {files_total} files, {} of {}",
            human_bytes(*bytes_done),
            human_bytes(*bytes_total)
        ),
        _ => println!(
            "sync running: {}",
            if v.sync_running { "yes" } else { "no" }
        ),
    }
    for (i, s) in v.sources.iter().enumerate() {
        println!("source {}:     {s}", i + 1);
    }
    if let Some(w) = &v.warning {
        println!("warning:      {w}");
    }
}
