//! Small state files in `state_dir`, each written atomically:
//! `sources.json` (boot sources and selections: seeded from the config on first
//! use, then changed through the CLI/API) and `state.json` (what the last sync saw).
//!
//! Every read-modify-write of `sources.json` or `machines.json` (CLI, API, the
//! first-use seeding) holds [`StateLock`], an exclusive `flock` on
//! `state_dir/state.lock` (not the sync lock: a long sync must not block an edit), so
//! two writers in different processes never overwrite each other's change.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{Selection, Settings, SourceConfig};
use crate::store::{atomic_write, ctx};
use crate::upstream::Validators;

/// The lock file of state-file edits, beside the state files.
pub const STATE_LOCK_FILE: &str = "state.lock";

/// Held while a state file is read, changed and written back; released on drop
/// (or when the process dies: it is a `flock`).
pub struct StateLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl StateLock {
    /// Waits for the exclusive lock on `state_dir/state.lock` (creating both).
    pub fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", state_dir.display()))?;
        let p = state_dir.join(STATE_LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", p.display()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", p.display()))?;
        Ok(StateLock { _lock: lock })
    }

    /// [`StateLock::acquire`] from async code: waits on a blocking thread.
    pub async fn acquire_async(state_dir: &Path) -> anyhow::Result<StateLock> {
        let dir = state_dir.to_path_buf();
        tokio::task::spawn_blocking(move || StateLock::acquire(&dir))
            .await
            .map_err(|e| anyhow::anyhow!("state lock: {e}"))?
    }
}

/// What the sync engine remembers between runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyncState {
    /// Highest generation ever published.
    #[serde(default)]
    pub generation: u64,
    /// Hash of the sources (and keyrings) the validators below belong to.
    #[serde(default)]
    pub sources_key: String,
    /// Cache validators of each index URL.
    #[serde(default)]
    pub indexes: BTreeMap<String, Validators>,
    /// Unix seconds of the last successful sync that changed or confirmed content.
    #[serde(default)]
    pub last_success: Option<u64>,
}

impl SyncState {
    pub fn load(state_dir: &Path) -> anyhow::Result<SyncState> {
        let p = state_dir.join("state.json");
        match std::fs::read(&p) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SyncState::default()),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", p.display())),
        }
    }
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        let p = state_dir.join("state.json");
        let json = serde_json::to_vec_pretty(self).expect("state serialises");
        ctx(atomic_write(&p, &json), "cannot write", &p)
    }
}

/// A selection with its id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredSelection {
    pub id: u64,
    #[serde(flatten)]
    pub selection: Selection,
}

/// A boot source with its id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredSource {
    pub id: u64,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring_filename: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring_data: Option<String>,
    #[serde(default)]
    pub unsigned: bool,
    #[serde(default)]
    pub selections: Vec<StoredSelection>,
}

impl StoredSource {
    pub fn config(&self) -> SourceConfig {
        SourceConfig {
            url: self.url.clone(),
            keyring_filename: self.keyring_filename.clone(),
            keyring_data: self.keyring_data.clone(),
            unsigned: self.unsigned,
            selections: self
                .selections
                .iter()
                .map(|s| s.selection.clone())
                .collect(),
        }
    }
}

/// The boot sources in the state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sources {
    pub sources: Vec<StoredSource>,
}

impl Sources {
    pub fn from_configs(configs: &[SourceConfig]) -> Sources {
        let mut sel_id = 0;
        Sources {
            sources: configs
                .iter()
                .enumerate()
                .map(|(i, c)| StoredSource {
                    id: i as u64 + 1,
                    url: c.url.clone(),
                    keyring_filename: c.keyring_filename.clone(),
                    keyring_data: c.keyring_data.clone(),
                    unsigned: c.unsigned,
                    selections: c
                        .selections
                        .iter()
                        .map(|s| {
                            sel_id += 1;
                            StoredSelection {
                                id: sel_id,
                                selection: s.clone(),
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Reads `sources.json`; `None` when the state has none yet.
    pub fn load(state_dir: &Path) -> anyhow::Result<Option<Sources>> {
        let p = state_dir.join("sources.json");
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", p.display())),
        }
    }

    /// The state's sources, or the config's seeds when the state has none (not
    /// written: see [`Sources::load_or_seed`]).
    pub fn current(settings: &Settings) -> anyhow::Result<Sources> {
        Ok(Sources::load(&settings.state_dir)?
            .unwrap_or_else(|| Sources::from_configs(&settings.sources)))
    }

    /// Like [`Sources::current`], writing the seeds into the state on first use, and
    /// warning when the config file's sources differ from the state's.
    pub fn load_or_seed(settings: &Settings) -> anyhow::Result<Sources> {
        match Sources::load(&settings.state_dir)? {
            Some(s) => {
                if let Some(diff) = s.differs_from_config(settings) {
                    tracing::warn!("{diff}");
                }
                Ok(s)
            }
            None => {
                let _lock = StateLock::acquire(&settings.state_dir)?;
                // Another process may have seeded (or edited) it meanwhile.
                if let Some(s) = Sources::load(&settings.state_dir)? {
                    return Ok(s);
                }
                let s = Sources::from_configs(&settings.sources);
                s.save(&settings.state_dir)?;
                Ok(s)
            }
        }
    }

    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        let p = state_dir.join("sources.json");
        let json = serde_json::to_vec_pretty(self).expect("sources serialise");
        ctx(atomic_write(&p, &json), "cannot write", &p)
    }

    /// A one-line description of how the config file's sources differ from the
    /// state's, if they do.
    pub fn differs_from_config(&self, settings: &Settings) -> Option<String> {
        let state: Vec<SourceConfig> = self.sources.iter().map(StoredSource::config).collect();
        if state == settings.sources {
            return None;
        }
        let urls = |v: &[SourceConfig]| {
            v.iter()
                .map(|s| s.url.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let what = if urls(&state) != urls(&settings.sources) {
            format!(
                "urls [{}] in the config, [{}] in the state",
                urls(&settings.sources),
                urls(&state)
            )
        } else {
            "selections or keyrings differ".to_string()
        };
        let file = settings
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "the default config".into());
        Some(format!(
            "boot sources in {file} differ from {}/sources.json ({what}); the state wins: change sources with `rackboot boot-sources` / `boot-source-selections`",
            settings.state_dir.display()
        ))
    }

    pub fn next_source_id(&self) -> u64 {
        self.sources.iter().map(|s| s.id).max().unwrap_or(0) + 1
    }

    pub fn next_selection_id(&self) -> u64 {
        self.sources
            .iter()
            .flat_map(|s| s.selections.iter().map(|x| x.id))
            .max()
            .unwrap_or(0)
            + 1
    }
}
