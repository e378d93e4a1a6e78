//! The command line: parsing (clap) and the subcommands that are not the daemon.
//!
//! Exit codes: 0 success; 1 the operation failed; 2 bad usage or bad config.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::config::{self, Settings};
use crate::store::Store;
use crate::sync::{self, human_bytes, LiveProgress, ProgressMode};

mod boots;
mod fsck;
mod sources;
mod status;

use sources::{cmd_machines, cmd_selections, cmd_sources};
use status::{api_token, cmd_status, daemon_call, daemon_url, fetch_status, ApiError};

#[derive(Debug, Parser)]
#[command(
    name = "rackboot",
    version = crate::version(),
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
    /// Check the store: re-hash every blob, check every snapshot, `current` and the
    /// state files. Exit 0 clean, 1 problems found, 2 usage or I/O error.
    Fsck {
        /// Move bad blobs to quarantine/ (the next sync fetches them again).
        #[arg(long)]
        repair: bool,
    },
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
    /// What booting machines asked for, from the running daemon's boot log: every
    /// machine with its last step and last file, or one machine's events.
    Boots {
        /// One machine's events (any common MAC spelling).
        #[arg(value_name = "MAC")]
        mac: Option<String>,
        /// The daemon's HTTP address (default: from http.listen in the config).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
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
        Command::Fsck { repair } => fsck::cmd(&settings, *repair, cli.json).map_err(|e| {
            match e.downcast::<crate::fsck::ProblemsFound>() {
                Ok(p) => p.into(),
                Err(e) => usage(format!("{e:#}")),
            }
        }),
        Command::Mirror { .. } => unreachable!("dispatched above"),
        Command::Boots { mac, url } => {
            boots::cmd(&cli, &settings, mac.as_deref(), url.as_deref()).await
        }
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

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
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
    match op {
        "read" => resources_read(cli, settings),
        "is-importing" => {
            let running = sync_running(settings);
            if cli.json {
                print_json(&json!(running))
            } else {
                println!("{running}");
                Ok(())
            }
        }
        "import" => resources_import(cli, settings, url).await,
        "stop-import" => resources_stop_import(cli, settings, url).await,
        other => Err(usage(format!(
            "unknown boot-resources operation {other:?} (read, import, is-importing, stop-import)"
        ))),
    }
}

/// `boot-resources read`: the products of the served snapshot.
fn resources_read(cli: &Cli, settings: &Settings) -> anyhow::Result<()> {
    let store = Store::existing(&settings.state_dir);
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

/// `boot-resources import`: asks the daemon to sync, or syncs here when no daemon
/// serves this state dir.
async fn resources_import(cli: &Cli, settings: &Settings, url: Option<&str>) -> anyhow::Result<()> {
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
    println!("import started by the daemon at {base}; `rackboot status` shows its progress");
    Ok(())
}

/// `boot-resources stop-import`: stops the daemon's sync, or the `rackboot sync`
/// holding the lock.
async fn resources_stop_import(
    cli: &Cli,
    settings: &Settings,
    url: Option<&str>,
) -> anyhow::Result<()> {
    let base = daemon_url(settings, url)?;
    if fetch_status(&base).await.is_ok() {
        let token = api_token(settings)?;
        let stopped =
            match daemon_call(&base, reqwest::Method::POST, "api/v1/sync/stop", &token).await {
                Ok(_) => true,
                Err(e)
                    if e.downcast_ref::<ApiError>()
                        .is_some_and(|a| a.status == reqwest::StatusCode::CONFLICT) =>
                {
                    false
                }
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
        Some(pid) => {
            println!("stopped the sync of pid {pid} (its downloads are kept for the next run)")
        }
        None => println!("no import is running"),
    }
    Ok(())
}
