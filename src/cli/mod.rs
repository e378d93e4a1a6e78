//! The command line: parsing (clap) and the subcommands that are not the daemon.
//!
//! Exit codes: 0 success; 1 the operation failed; 2 bad usage or bad config.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::config::{self, Selection, Settings};
use crate::state::{Sources, StoredSelection, StoredSource, SyncState};
use crate::store::Store;
use crate::sync::{self, human_bytes, LiveProgress, ProgressMode};

#[derive(Debug, Parser)]
#[command(
    name = "rackboot",
    version,
    about = "Boot server for a rack: verified image sync + TFTP/HTTP"
)]
pub struct Cli {
    /// Config file (else $RACKBOOT_CONFIG, else /etc/rackboot/rackboot.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sync the selected images from the boot sources now.
    Sync {
        /// Print the plan (what would be fetched, kept, dropped) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Fail at once if another sync is running instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        /// Accept signed metadata older than what this rack saw before (normally
        /// refused as a possible replay).
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Boot sources: read | create key=value… | update ID key=value… | delete ID.
    #[command(name = "boot-sources")]
    BootSources {
        #[arg(value_name = "OP")]
        op: String,
        #[arg(value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Selections: read SOURCE | create SOURCE key=value… | update SOURCE ID key=value… | delete SOURCE ID.
    #[command(name = "boot-source-selections")]
    BootSourceSelections {
        #[arg(value_name = "OP")]
        op: String,
        #[arg(value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Boot resources: read | import | is-importing | stop-import. `import` and
    /// `stop-import` ask the running daemon (its API, with the token of
    /// http.token_file); without a daemon, `import` syncs here and `stop-import` stops
    /// the `rackboot sync` that holds the lock.
    #[command(name = "boot-resources")]
    BootResources {
        #[arg(value_name = "OP")]
        op: String,
        /// The daemon's base URL (default: from http.listen in the config).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// What is served and how the last sync went, from the running daemon's API
    /// (from the state directory when the daemon cannot be reached).
    Status {
        /// The daemon's HTTP address (default: the first `http.listen` address of
        /// the config, with a wildcard address replaced by loopback).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Per-machine boot settings: set MAC key=value… | read [MAC] | delete MAC.
    Machines {
        #[arg(value_name = "OP")]
        op: String,
        #[arg(value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Run the rack service: the periodic sync, TFTP and HTTP.
    Serve,
    /// Mirror a SimpleStreams source into a directory, as sstream-mirror does
    /// (needs no config). FILTER: key=value, key!=value, key~regex, key!~regex.
    Mirror {
        /// Stream root or index URL (http, https, file).
        #[arg(value_name = "SOURCE")]
        source: String,
        /// Output directory.
        #[arg(value_name = "DEST")]
        dest: PathBuf,
        #[arg(value_name = "FILTER")]
        filters: Vec<String>,
        /// Keep only the N greatest versions of each product.
        #[arg(long, value_name = "N")]
        max: Option<usize>,
        /// Keep versions the source no longer lists (up to --max).
        #[arg(long)]
        keep: bool,
        /// A progress bar.
        #[arg(long)]
        progress: bool,
        /// Print what would change and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keyring to verify a signed (.sjson) source with.
        #[arg(long, value_name = "FILE")]
        keyring: Option<PathBuf>,
        /// Read a signed source without checking signatures.
        #[arg(long, short = 'U')]
        no_verify: bool,
        /// Parallel downloads.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
}

/// An error that exits with status 2 (bad usage or bad config).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Loads the settings; config problems are usage errors (exit 2).
pub fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let path = config::config_path(cli.config.as_deref());
    config::load(&path).map_err(|e| usage(e.to_string()))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Mirror { .. } = &cli.command {
        return cmd_mirror(&cli).await;
    }
    let settings = settings(&cli)?;
    match &cli.command {
        Command::Sync {
            dry_run,
            no_wait,
            allow_downgrade,
        } => cmd_sync(&cli, &settings, *dry_run, !*no_wait, *allow_downgrade).await,
        Command::BootSources { op, args } => cmd_sources(&cli, &settings, op, args),
        Command::BootSourceSelections { op, args } => cmd_selections(&cli, &settings, op, args),
        Command::BootResources { op, url } => {
            cmd_resources(&cli, &settings, op, url.as_deref()).await
        }
        Command::Status { url } => cmd_status(&cli, &settings, url.as_deref()).await,
        Command::Machines { op, args } => cmd_machines(&cli, &settings, op, args),
        Command::Serve => {
            let path = config::config_path(cli.config.as_deref());
            crate::serve::serve(&path, settings).await
        }
        Command::Mirror { .. } => unreachable!("dispatched above"),
    }
}

async fn cmd_mirror(cli: &Cli) -> anyhow::Result<()> {
    let Command::Mirror {
        source,
        dest,
        filters,
        max,
        keep,
        progress,
        dry_run,
        keyring,
        no_verify,
        parallel,
    } = &cli.command
    else {
        unreachable!("called for mirror only")
    };
    if *keep && max.is_none() {
        return Err(usage("--keep needs --max N"));
    }
    let filters = filters
        .iter()
        .map(|f| f.parse::<crate::mirror::Filter>().map_err(usage))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = crate::mirror::Options {
        source: source.clone(),
        dest: dest.clone(),
        filters,
        max: *max,
        keep: *keep,
        dry_run: *dry_run,
        progress: *progress,
        keyring: keyring.clone(),
        no_verify: *no_verify,
        parallel: *parallel,
        timeout: std::time::Duration::from_secs(60),
    };
    let report = crate::mirror::run(&opts).await?;
    if cli.json {
        return print_json(&report);
    }
    if !dry_run {
        println!(
            "mirrored {} into {}: {} files ({}) fetched, {} removed, {} metadata files, {} ms",
            source,
            dest.display(),
            report.fetched_files,
            human_bytes(report.fetched_bytes),
            report.removed_files,
            report.metadata_files,
            report.elapsed_ms
        );
    }
    Ok(())
}

/// Run as root on a state directory another user owns (the unit's `User=rackboot`),
/// a sync acts as that user: everything it creates (blobs, snapshots, state files,
/// lock files) is then the daemon's to read, replace and collect.
fn act_as_state_owner(settings: &Settings) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let Ok(m) = std::fs::metadata(&settings.state_dir) else {
        return Ok(());
    };
    if m.uid() == 0 {
        return Ok(());
    }
    // Group first: without root's uid the gid can no longer be changed.
    nix::unistd::setegid(nix::unistd::Gid::from_raw(m.gid()))
        .and_then(|()| nix::unistd::seteuid(nix::unistd::Uid::from_raw(m.uid())))
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot act as uid {}, the owner of {}: {e}",
                m.uid(),
                settings.state_dir.display()
            )
        })?;
    tracing::info!(
        "syncing as uid {} gid {}, the owner of {}",
        m.uid(),
        m.gid(),
        settings.state_dir.display()
    );
    Ok(())
}

async fn cmd_sync(
    cli: &Cli,
    settings: &Settings,
    dry_run: bool,
    wait: bool,
    allow_downgrade: bool,
) -> anyhow::Result<()> {
    if !dry_run {
        act_as_state_owner(settings)?;
    }
    let opts = sync::Options {
        allow_downgrade,
        dry_run,
        wait,
        progress: if cli.json {
            ProgressMode::Lines
        } else {
            ProgressMode::detect()
        },
        keep: Default::default(),
        stop: None,
        on_publish: None,
    };
    let report = sync::run(settings, &opts, Arc::new(LiveProgress::default())).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if dry_run {
        for l in &report.plan {
            println!("{l}");
        }
        for c in &report.changes {
            println!("{c}");
        }
        let fetch: Vec<_> = report.plan.iter().filter(|l| l.starts_with('+')).collect();
        println!(
            "dry run: {} of {} files to fetch, {} selected in all; nothing changed",
            fetch.len(),
            report.files_total,
            human_bytes(report.bytes_total)
        );
        return Ok(());
    }
    let secs = report.elapsed_ms as f64 / 1000.0;
    if !report.changed {
        println!(
            "up to date: generation {} unchanged ({} request{}, {} ms)",
            report
                .generation
                .map(|g| g.to_string())
                .unwrap_or_else(|| "none".into()),
            report.requests,
            if report.requests == 1 { "" } else { "s" },
            report.elapsed_ms
        );
        return Ok(());
    }
    for c in &report.changes {
        println!("{c}");
    }
    let rate = if secs > 0.0 {
        report.bytes_fetched as f64 / secs / (1024.0 * 1024.0)
    } else {
        0.0
    };
    println!(
        "synced: generation {} (was {}): {} files, {} selected; fetched {} files, {} in {:.2} s ({:.1} MiB/s); collected {} blobs ({})",
        report.generation.unwrap_or(0),
        report.previous_generation.map(|g| g.to_string()).unwrap_or_else(|| "none".into()),
        report.files_total,
        human_bytes(report.bytes_total),
        report.files_fetched,
        human_bytes(report.bytes_fetched),
        secs,
        rate,
        report.gc_blobs,
        human_bytes(report.gc_bytes)
    );
    Ok(())
}

/// Parses `key=value` arguments (MAAS CLI style).
fn kv(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .ok_or_else(|| usage(format!("argument {a:?} is not key=value")))
        })
        .collect()
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn id_arg(args: &[String], i: usize, what: &str) -> anyhow::Result<u64> {
    let a = args
        .get(i)
        .ok_or_else(|| usage(format!("missing {what}")))?;
    a.parse()
        .map_err(|_| usage(format!("{what} {a:?} is not a number")))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn apply_source_kv(
    s: &mut StoredSource,
    pairs: &[(String, String)],
) -> anyhow::Result<()> {
    for (k, v) in pairs {
        match k.as_str() {
            "url" => s.url = v.clone(),
            "keyring_filename" => s.keyring_filename = (!v.is_empty()).then(|| v.into()),
            "keyring_data" => s.keyring_data = (!v.is_empty()).then(|| v.clone()),
            "unsigned" => {
                s.unsigned = v
                    .parse()
                    .map_err(|_| usage(format!("unsigned={v:?}: expected true or false")))?
            }
            _ => return Err(usage(format!("unknown boot-source field {k:?}"))),
        }
    }
    config::check_source(&s.config()).map_err(usage)
}

/// A new selection made from `key=value` pairs over MAAS's defaults (ubuntu, every
/// arch, subarch and label; the release must be given).
pub(crate) fn selection_from_kv(pairs: &[(String, String)]) -> anyhow::Result<Selection> {
    let mut sel = Selection {
        os: "ubuntu".into(),
        release: String::new(),
        arches: vec!["*".into()],
        subarches: vec!["*".into()],
        labels: vec!["*".into()],
    };
    apply_selection_kv(&mut sel, pairs)?;
    Ok(sel)
}

pub(crate) fn apply_selection_kv(
    s: &mut Selection,
    pairs: &[(String, String)],
) -> anyhow::Result<()> {
    for (k, v) in pairs {
        match k.as_str() {
            "os" => s.os = v.clone(),
            "release" => s.release = v.clone(),
            "arches" => s.arches = list(v),
            "subarches" => s.subarches = list(v),
            "labels" => s.labels = list(v),
            _ => return Err(usage(format!("unknown selection field {k:?}"))),
        }
    }
    if s.release.is_empty() {
        return Err(usage("a selection needs release=…"));
    }
    Ok(())
}

fn cmd_sources(cli: &Cli, settings: &Settings, op: &str, args: &[String]) -> anyhow::Result<()> {
    // Held until the changed file is written: no concurrent edit is lost.
    let _lock = (op != "read")
        .then(|| crate::state::StateLock::acquire(&settings.state_dir))
        .transpose()?;
    let mut sources = Sources::current(settings)?;
    match op {
        "read" => {
            if cli.json {
                return print_json(&crate::serve::routes::shown_sources(&sources.sources));
            }
            for s in &sources.sources {
                let keyring = s
                    .keyring_filename
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .or(s
                        .keyring_data
                        .as_ref()
                        .map(|_| "<inline keyring_data>".into()))
                    .unwrap_or_else(|| "<unsigned>".into());
                println!(
                    "{}\t{}\t{}\t{} selections",
                    s.id,
                    crate::config::redacted(&s.url),
                    keyring,
                    s.selections.len()
                );
            }
            return Ok(());
        }
        "create" => {
            let mut s = StoredSource {
                id: sources.next_source_id(),
                url: String::new(),
                keyring_filename: None,
                keyring_data: None,
                unsigned: false,
                selections: vec![],
            };
            apply_source_kv(&mut s, &kv(args)?)?;
            sources.sources.push(s);
        }
        "update" => {
            let id = id_arg(args, 0, "boot source id")?;
            let pairs = kv(&args[1..])?;
            let s = sources
                .sources
                .iter_mut()
                .find(|s| s.id == id)
                .ok_or_else(|| anyhow::anyhow!("no boot source {id}"))?;
            apply_source_kv(s, &pairs)?;
        }
        "delete" => {
            let id = id_arg(args, 0, "boot source id")?;
            let before = sources.sources.len();
            sources.sources.retain(|s| s.id != id);
            if sources.sources.len() == before {
                anyhow::bail!("no boot source {id}");
            }
        }
        other => {
            return Err(usage(format!(
                "unknown boot-sources operation {other:?} (read, create, update, delete)"
            )))
        }
    }
    std::fs::create_dir_all(&settings.state_dir)?;
    sources.save(&settings.state_dir)?;
    if cli.json {
        print_json(&crate::serve::routes::shown_sources(&sources.sources))
    } else {
        println!("saved; the next sync applies it");
        Ok(())
    }
}

fn cmd_selections(cli: &Cli, settings: &Settings, op: &str, args: &[String]) -> anyhow::Result<()> {
    let _lock = (op != "read")
        .then(|| crate::state::StateLock::acquire(&settings.state_dir))
        .transpose()?;
    let mut sources = Sources::current(settings)?;
    let source_id = id_arg(args, 0, "boot source id")?;
    let next_id = sources.next_selection_id();
    let source = sources
        .sources
        .iter_mut()
        .find(|s| s.id == source_id)
        .ok_or_else(|| anyhow::anyhow!("no boot source {source_id}"))?;
    match op {
        "read" => {
            if cli.json {
                return print_json(&source.selections);
            }
            for s in &source.selections {
                let sel = &s.selection;
                println!(
                    "{}\tos={}\trelease={}\tarches={}\tsubarches={}\tlabels={}",
                    s.id,
                    sel.os,
                    sel.release,
                    sel.arches.join(","),
                    sel.subarches.join(","),
                    sel.labels.join(",")
                );
            }
            return Ok(());
        }
        "create" => {
            let sel = selection_from_kv(&kv(&args[1..])?)?;
            source.selections.push(StoredSelection {
                id: next_id,
                selection: sel,
            });
        }
        "update" => {
            let id = id_arg(args, 1, "selection id")?;
            let pairs = kv(&args[2..])?;
            let sel = source
                .selections
                .iter_mut()
                .find(|s| s.id == id)
                .ok_or_else(|| anyhow::anyhow!("no selection {id} in boot source {source_id}"))?;
            apply_selection_kv(&mut sel.selection, &pairs)?;
        }
        "delete" => {
            let id = id_arg(args, 1, "selection id")?;
            let before = source.selections.len();
            source.selections.retain(|s| s.id != id);
            if source.selections.len() == before {
                anyhow::bail!("no selection {id} in boot source {source_id}");
            }
        }
        other => {
            return Err(usage(format!(
                "unknown boot-source-selections operation {other:?} (read, create, update, delete)"
            )))
        }
    }
    std::fs::create_dir_all(&settings.state_dir)?;
    sources.save(&settings.state_dir)?;
    if !cli.json {
        println!("saved; the next sync applies it");
    }
    Ok(())
}

fn cmd_machines(cli: &Cli, settings: &Settings, op: &str, args: &[String]) -> anyhow::Result<()> {
    use crate::bootcfg::Mac;
    let mac_arg = |i: usize| -> anyhow::Result<Mac> {
        let a = args.get(i).ok_or_else(|| usage("missing MAC address"))?;
        Mac::parse(a).ok_or_else(|| usage(format!("{a:?} is not a MAC address")))
    };
    let _lock = (op != "read")
        .then(|| crate::state::StateLock::acquire(&settings.state_dir))
        .transpose()?;
    let mut state = crate::machines::load(&settings.state_dir)?;
    match op {
        "read" => {
            let macs: Vec<Mac> = match args.first() {
                Some(_) => vec![mac_arg(0)?],
                None => settings
                    .machines
                    .keys()
                    .chain(state.keys())
                    .copied()
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            };
            let all: serde_json::Map<String, serde_json::Value> = macs
                .iter()
                .map(|m| {
                    (
                        m.to_string(),
                        json!(crate::machines::effective(&settings.machines, &state, m)),
                    )
                })
                .collect();
            if cli.json {
                return print_json(&all);
            }
            for (mac, m) in &all {
                println!(
                    "{mac}\timage={}\tkernel_params={}\tlocal_boot={}",
                    m["image"].as_str().unwrap_or("(default)"),
                    m["kernel_params"].as_str().unwrap_or(""),
                    m["local_boot"].as_bool().unwrap_or(false)
                );
            }
            Ok(())
        }
        "set" => {
            let mac = mac_arg(0)?;
            let pairs = kv(&args[1..])?;
            crate::machines::apply_kv(state.entry(mac).or_default(), &pairs).map_err(usage)?;
            let merged = crate::machines::effective(&settings.machines, &state, &mac);
            crate::machines::check_fits(&merged, &settings.boot.kernel_params).map_err(usage)?;
            crate::machines::save(&settings.state_dir, &state)?;
            if cli.json {
                print_json(&crate::machines::effective(
                    &settings.machines,
                    &state,
                    &mac,
                ))
            } else {
                println!("saved {mac}; applies to its next boot");
                Ok(())
            }
        }
        "delete" => {
            let mac = mac_arg(0)?;
            if state.remove(&mac).is_none() {
                anyhow::bail!(
                    "no settings for {mac} in {}/machines.json",
                    settings.state_dir.display()
                );
            }
            crate::machines::save(&settings.state_dir, &state)?;
            if !cli.json {
                println!("deleted {mac}");
            }
            Ok(())
        }
        other => Err(usage(format!(
            "unknown machines operation {other:?} (set, read, delete)"
        ))),
    }
}

fn sync_running(settings: &Settings) -> bool {
    let store = Store::existing(&settings.state_dir);
    settings.state_dir.join("lock").exists() && store.lock(false, |_| {}).is_err()
}

async fn cmd_resources(
    cli: &Cli,
    settings: &Settings,
    op: &str,
    url: Option<&str>,
) -> anyhow::Result<()> {
    let store = Store::existing(&settings.state_dir);
    match op {
        "read" => {
            let Some(g) = store.current_generation() else {
                if cli.json {
                    return print_json(&json!([]));
                }
                println!("no snapshot yet: run `rackboot sync`");
                return Ok(());
            };
            let m = store.read_manifest(g)?;
            if cli.json {
                return print_json(&m.resources_json());
            }
            for p in &m.products {
                let size = p.size();
                println!(
                    "{}\t{}\t{}\t{} items",
                    p.name,
                    p.version_name,
                    human_bytes(size),
                    p.items.len()
                );
            }
            Ok(())
        }
        "is-importing" => {
            let running = sync_running(settings);
            if cli.json {
                print_json(&json!(running))
            } else {
                println!("{running}");
                Ok(())
            }
        }
        "import" => {
            let base = daemon_url(settings, url)?;
            if let Err(e) = fetch_status(&base).await {
                // A daemon serving this state dir that does not answer (busy, or
                // listening elsewhere): importing here instead would be a surprise.
                let servers = Store::existing(&settings.state_dir).servers();
                if let Some(pid) = servers.first() {
                    anyhow::bail!(
                        "the daemon serving {} (pid {pid}) did not answer at {base}: {e:#}; not importing here (retry, pass --url, or run `rackboot sync` to sync from this process)",
                        settings.state_dir.display()
                    );
                }
                // No daemon to ask: import here, as `rackboot sync` does.
                return cmd_sync(cli, settings, false, true, false).await;
            }
            let v = daemon_call(
                &base,
                reqwest::Method::POST,
                "api/v1/sync",
                &api_token(settings)?,
            )
            .await?;
            if cli.json {
                return print_json(&v);
            }
            println!(
                "import started by the daemon at {base}; `rackboot status` shows its progress"
            );
            Ok(())
        }
        "stop-import" => {
            let base = daemon_url(settings, url)?;
            if fetch_status(&base).await.is_ok() {
                let token = api_token(settings)?;
                let stopped =
                    match daemon_call(&base, reqwest::Method::POST, "api/v1/sync/stop", &token)
                        .await
                    {
                        Ok(_) => true,
                        Err(e) if format!("{e:#}").contains("HTTP 409") => false,
                        Err(e) => return Err(e),
                    };
                if cli.json {
                    return print_json(&json!({ "stopped": stopped }));
                }
                println!(
                    "{}",
                    if stopped {
                        "stopping the daemon's import"
                    } else {
                        "no import is running"
                    }
                );
                return Ok(());
            }
            // No daemon: stop the `rackboot sync` holding the lock, if any.
            let holder = Store::existing(&settings.state_dir).lock_holder();
            if let Some(pid) = holder {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                )
                .map_err(|e| anyhow::anyhow!("cannot stop the sync of pid {pid}: {e}"))?;
            }
            if cli.json {
                return print_json(&json!({ "stopped": holder.is_some() }));
            }
            match holder {
                Some(pid) => println!(
                    "stopped the sync of pid {pid} (its downloads are kept for the next run)"
                ),
                None => println!("no import is running"),
            }
            Ok(())
        }
        other => Err(usage(format!(
            "unknown boot-resources operation {other:?} (read, import, is-importing, stop-import)"
        ))),
    }
}

/// Where `rackboot status` finds the daemon: `--url`, else the first HTTP listen
/// address of the config (a wildcard address means this host: loopback).
fn daemon_url(settings: &Settings, url: Option<&str>) -> anyhow::Result<url::Url> {
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
async fn fetch_status(base: &url::Url) -> anyhow::Result<serde_json::Value> {
    daemon_call(base, reqwest::Method::GET, "api/v1/status", "").await
}

/// The bearer token for API writes, from `http.token_file`.
fn api_token(settings: &Settings) -> anyhow::Result<String> {
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
async fn daemon_call(
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
        anyhow::bail!("{url}: HTTP {status}: {msg}");
    }
    serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("{url}: not a rackboot API document: {e}"))
}

fn unix_date(t: &serde_json::Value) -> String {
    t.as_u64()
        .map(|t| httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)))
        .unwrap_or_else(|| "never".into())
}

/// The status from the state directory alone (no daemon).
fn offline_status(settings: &Settings) -> anyhow::Result<serde_json::Value> {
    let store = Store::existing(&settings.state_dir);
    let state = SyncState::load(&settings.state_dir)?;
    let generation = store.current_generation();
    let manifest = generation.and_then(|g| store.read_manifest(g).ok());
    let sources = Sources::current(settings)?;
    let drift = Sources::load(&settings.state_dir)?.and_then(|s| s.differs_from_config(settings));
    Ok(json!({
        "state_dir": settings.state_dir,
        "generation": generation,
        "snapshot_created": manifest.as_ref().map(|m| m.created),
        "files": manifest.as_ref().map(|m| m.files.len()).unwrap_or(0),
        "products": manifest.as_ref().map(|m| m.products.len()).unwrap_or(0),
        "last_success": state.last_success,
        "sync_running": sync_running(settings),
        "sources": sources.sources.iter().map(|s| crate::config::redacted(&s.url)).collect::<Vec<_>>(),
        "warning": drift.map(|w| crate::config::redact_text(&w)),
    }))
}

async fn cmd_status(cli: &Cli, settings: &Settings, url: Option<&str>) -> anyhow::Result<()> {
    let base = daemon_url(settings, url)?;
    let mut v = match fetch_status(&base).await {
        Ok(mut v) => {
            v["daemon"] = json!({"url": base.as_str(), "running": true});
            v
        }
        Err(e) => {
            let mut v = offline_status(settings)?;
            v["daemon"] =
                json!({"url": base.as_str(), "running": false, "error": format!("{e:#}")});
            v
        }
    };
    if v.get("sources").is_none() {
        v["sources"] = json!([]);
    }
    if cli.json {
        return print_json(&v);
    }
    let daemon = &v["daemon"];
    if daemon["running"] == true {
        println!(
            "daemon:       running at {} (rackboot {}, up {} s)",
            base,
            v["version"].as_str().unwrap_or("?"),
            v["uptime_s"]
        );
    } else {
        println!(
            "daemon:       not reachable: {}",
            daemon["error"].as_str().unwrap_or("?")
        );
    }
    println!("state dir:    {}", v["state_dir"].as_str().unwrap_or("?"));
    match v["generation"].as_u64() {
        Some(g) => println!(
            "serving:      generation {g} ({} files, {} products, built {})",
            v["files"],
            v["products"],
            unix_date(&v["snapshot_created"])
        ),
        None => println!("serving:      nothing yet (no snapshot)"),
    }
    println!("last success: {}", unix_date(&v["last_success"]));
    let sync = &v["sync"];
    if sync.is_object() {
        println!(
            "last sync:    {} at {}{}",
            sync["last_result"].as_str().unwrap_or("none yet"),
            unix_date(&sync["last_finished"]),
            sync["last_duration_ms"]
                .as_u64()
                .map(|ms| format!(" ({ms} ms)"))
                .unwrap_or_default()
        );
        if let Some(err) = sync["last_error"].as_str() {
            println!("last error:   {err}");
        }
        println!(
            "syncs:        {} runs, {} failed, {} fetched",
            sync["runs"],
            sync["failures"],
            human_bytes(sync["bytes_fetched_total"].as_u64().unwrap_or(0))
        );
        if v["sync_auto"] == false {
            println!("auto sync:    paused (sync.auto = false; POST /api/v1/sync to sync)");
        } else {
            println!(
                "auto sync:    every {} s, next at {}",
                v["sync_interval_s"],
                unix_date(&sync["next_sync"])
            );
        }
    }
    let progress = &v["progress"];
    if progress.is_object() {
        println!(
            "sync running: yes, {} of {} files, {} of {}",
            progress["files_done"],
            progress["files_total"],
            human_bytes(progress["bytes_done"].as_u64().unwrap_or(0)),
            human_bytes(progress["bytes_total"].as_u64().unwrap_or(0))
        );
    } else {
        println!(
            "sync running: {}",
            if v["sync_running"] == true {
                "yes"
            } else {
                "no"
            }
        );
    }
    for (i, s) in v["sources"].as_array().into_iter().flatten().enumerate() {
        println!("source {}:     {}", i + 1, s.as_str().unwrap_or("?"));
    }
    if let Some(w) = v["warning"].as_str() {
        println!("warning:      {w}");
    }
    Ok(())
}
