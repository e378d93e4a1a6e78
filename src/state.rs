//! Small state files in `state_dir`, each written atomically:
//! `sources.json` (boot sources and selections: seeded from the config on first
//! use, then changed through the CLI/API) and `state.json` (what the last sync saw).
//!
//! `state.json` also remembers the newest `updated` of each signed document per
//! source ([`SyncState::check_updated`]): an older one is refused as a downgrade.
//!
//! Every read-modify-write of `sources.json` or `machines.json` (CLI, API, the
//! first-use seeding) holds [`StateLock`], an exclusive `flock` on
//! `state_dir/state.lock` (not the sync lock: a long sync must not block an edit), so
//! two writers in different processes never overwrite each other's change.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{Selection, Settings, SourceConfig};
use crate::fsutil::{atomic_write, ctx};
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
/// What the last sync saw of every boot source (the Images page reads it).
pub const CATALOG_FILE: &str = "catalog.json";

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
    /// The newest `updated` of each signed document (index, products) per source:
    /// index URL → document path → what it said. An older one is a replay.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seen_updated: BTreeMap<String, BTreeMap<String, SeenUpdated>>,
}

/// An `updated` stamp as read from a signed document.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeenUpdated {
    /// Unix seconds.
    pub unix: i64,
    /// The stamp as the document wrote it.
    pub text: String,
}

/// One signed document of a sync, for [`SyncState::check_updated`].
pub struct SignedDoc {
    /// Path below the stream root (the memory's key).
    pub path: String,
    /// Where it was read (for the error).
    pub url: String,
    /// Its top-level `updated`, if any.
    pub updated: Option<String>,
    /// Its verified text (the re-export's `.json` copies are made from it).
    pub text: String,
}

/// The top-level `updated` string of a (verified) JSON document, if it has one.
pub fn updated_of(json_text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json_text).ok()?;
    v.get("updated")?.as_str().map(String::from)
}

/// Parses an RFC 2822 date as SimpleStreams writes it (`Mon, 24 Nov 2026 12:00:00
/// +0000`; the weekday is optional, the zone may be `GMT`/`UTC`/`Z`) to Unix seconds.
pub fn parse_rfc2822(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = match s.split_once(',') {
        Some((_, rest)) => rest.trim(),
        None => s,
    };
    let f: Vec<&str> = s.split_whitespace().collect();
    let [day, mon, year, time, zone] = f.as_slice() else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let mon = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ]
    .iter()
    .position(|m| mon.eq_ignore_ascii_case(m))? as i64
        + 1;
    let year: i64 = year.parse().ok()?;
    let t: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (h, m, sec) = match t.as_slice() {
        [h, m] => (*h, *m, 0),
        [h, m, s] => (*h, *m, *s),
        _ => return None,
    };
    let offset = match *zone {
        "GMT" | "UTC" | "UT" | "Z" => 0,
        z if z.len() == 5 && (z.starts_with('+') || z.starts_with('-')) => {
            let n: i64 = z[1..].parse().ok()?;
            let secs = (n / 100) * 3600 + (n % 100) * 60;
            if z.starts_with('-') {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    if !(1..=31).contains(&day)
        || !(0..24).contains(&h)
        || !(0..60).contains(&m)
        || !(0..61).contains(&sec)
    {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's method).
    let y = if mon <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mon + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec - offset)
}

impl SyncState {
    /// Refuses a signed document whose `updated` is older than the newest this
    /// source's same document had before (a man in the middle replaying an old,
    /// validly signed stream would roll the images back), unless `allow_downgrade`.
    /// Then remembers this sync's stamps (saved with the state after a successful
    /// sync only). Documents without a readable stamp are not compared.
    pub fn check_updated(
        &mut self,
        source: &str,
        docs: &[SignedDoc],
        allow_downgrade: bool,
    ) -> anyhow::Result<()> {
        let before = self.seen_updated.get(source);
        let mut now = BTreeMap::new();
        for d in docs {
            let Some(text) = &d.updated else { continue };
            let Some(unix) = parse_rfc2822(text) else {
                tracing::warn!(
                    "{}: cannot read updated {text:?}; not checked for a downgrade",
                    d.url
                );
                continue;
            };
            if let Some(old) = before.and_then(|b| b.get(&d.path)) {
                if unix < old.unix && !allow_downgrade {
                    anyhow::bail!(
                        "{}: updated {text:?} is older than {:?}, seen before: refusing to go back to an older stream (a replayed document?); run `rackboot sync --allow-downgrade` to accept it",
                        d.url,
                        old.text
                    );
                }
            }
            now.insert(
                d.path.clone(),
                SeenUpdated {
                    unix,
                    text: text.clone(),
                },
            );
        }
        self.seen_updated.insert(source.to_string(), now);
        Ok(())
    }
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

    // The edits the CLI (`key=value`) and the API (JSON) share: each changes a copy, so
    // a refused change leaves nothing half-applied, and names what it did not find.

    /// Adds a source made by `fill` from an empty one with the next id.
    pub fn add_source<E>(
        &mut self,
        fill: impl FnOnce(&mut StoredSource) -> Result<(), E>,
    ) -> Result<&StoredSource, E> {
        let mut s = StoredSource {
            id: self.next_source_id(),
            url: String::new(),
            keyring_filename: None,
            keyring_data: None,
            unsigned: false,
            selections: vec![],
        };
        fill(&mut s)?;
        self.sources.push(s);
        Ok(self.sources.last().expect("just pushed"))
    }

    /// Changes source `id` with `edit`.
    pub fn edit_source<E: From<EditError>>(
        &mut self,
        id: u64,
        edit: impl FnOnce(&mut StoredSource) -> Result<(), E>,
    ) -> Result<&StoredSource, E> {
        let i = self.source_index(id)?;
        let mut s = self.sources[i].clone();
        edit(&mut s)?;
        self.sources[i] = s;
        Ok(&self.sources[i])
    }

    /// Removes source `id`.
    pub fn delete_source(&mut self, id: u64) -> Result<StoredSource, EditError> {
        let i = self.source_index(id)?;
        Ok(self.sources.remove(i))
    }

    /// Adds `selection` to source `id`, with the next selection id.
    pub fn add_selection(
        &mut self,
        id: u64,
        selection: Selection,
    ) -> Result<&StoredSelection, EditError> {
        let next = self.next_selection_id();
        let i = self.source_index(id)?;
        let list = &mut self.sources[i].selections;
        list.push(StoredSelection {
            id: next,
            selection,
        });
        Ok(list.last().expect("just pushed"))
    }

    /// Changes selection `sid` of source `id` with `edit`.
    pub fn edit_selection<E: From<EditError>>(
        &mut self,
        id: u64,
        sid: u64,
        edit: impl FnOnce(&mut Selection) -> Result<(), E>,
    ) -> Result<&StoredSelection, E> {
        let i = self.source_index(id)?;
        let sel = self.sources[i]
            .selections
            .iter_mut()
            .find(|s| s.id == sid)
            .ok_or(EditError::NoSelection {
                in_source: id,
                selection: sid,
            })?;
        let mut changed = sel.selection.clone();
        edit(&mut changed)?;
        sel.selection = changed;
        Ok(sel)
    }

    /// Removes selection `sid` of source `id`.
    pub fn delete_selection(&mut self, id: u64, sid: u64) -> Result<(), EditError> {
        let i = self.source_index(id)?;
        let list = &mut self.sources[i].selections;
        let before = list.len();
        list.retain(|s| s.id != sid);
        if list.len() == before {
            return Err(EditError::NoSelection {
                in_source: id,
                selection: sid,
            });
        }
        Ok(())
    }

    fn source_index(&self, id: u64) -> Result<usize, EditError> {
        self.sources
            .iter()
            .position(|s| s.id == id)
            .ok_or(EditError::NoSource(id))
    }
}

/// An edit of `sources.json` that found nothing to edit.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("no boot source {0}")]
    NoSource(u64),
    #[error("no selection {selection} in boot source {in_source}")]
    NoSelection { in_source: u64, selection: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2822_dates() {
        assert_eq!(parse_rfc2822("Thu, 01 Jan 1970 00:00:00 +0000"), Some(0));
        assert_eq!(
            parse_rfc2822("Mon, 24 Nov 2026 12:00:00 +0000"),
            Some(1_795_521_600)
        );
        assert_eq!(
            parse_rfc2822("24 Nov 2026 13:00:00 +0100"),
            parse_rfc2822("Mon, 24 Nov 2026 12:00:00 GMT")
        );
        assert_eq!(
            parse_rfc2822("Tue, 29 Feb 2000 00:00:00 +0000"),
            Some(951_782_400)
        );
        assert_eq!(parse_rfc2822("yesterday"), None);
        assert_eq!(parse_rfc2822("Mon, 24 Foo 2026 12:00:00 +0000"), None);
    }

    fn doc(path: &str, updated: &str) -> SignedDoc {
        SignedDoc {
            path: path.into(),
            url: format!("http://up/{path}"),
            updated: Some(updated.into()),
            text: String::new(),
        }
    }

    #[test]
    fn older_updated_is_refused_unless_allowed() {
        let mut st = SyncState::default();
        let new = "Tue, 25 Nov 2026 12:00:00 +0000";
        let old = "Mon, 24 Nov 2026 12:00:00 +0000";
        st.check_updated("src", &[doc("streams/v1/index.sjson", new)], false)
            .unwrap();
        let e = st
            .check_updated("src", &[doc("streams/v1/index.sjson", old)], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("http://up/streams/v1/index.sjson") && e.contains("--allow-downgrade"),
            "{e}"
        );
        // Same stamp again, another source, or allowed: fine.
        st.check_updated("src", &[doc("streams/v1/index.sjson", new)], false)
            .unwrap();
        st.check_updated("other", &[doc("streams/v1/index.sjson", old)], false)
            .unwrap();
        st.check_updated("src", &[doc("streams/v1/index.sjson", old)], true)
            .unwrap();
        assert_eq!(st.seen_updated["src"]["streams/v1/index.sjson"].text, old);
    }
}
