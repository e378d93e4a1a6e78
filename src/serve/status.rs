//! The status document: what `GET /api/v1/status` answers and `rackboot status` prints
//! (asked from the daemon, or read from the state directory when no daemon answers).
//! One type for both ends, so the CLI reads fields, not string keys.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::SyncStatus;

/// The rack's status. Fields only a running daemon knows are absent otherwise.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    pub state_dir: PathBuf,
    /// The generation served (`current`), if any.
    pub generation: Option<u64>,
    /// Unix seconds.
    pub snapshot_created: Option<u64>,
    pub files: usize,
    pub products: usize,
    /// Unix seconds of the last successful sync.
    pub last_success: Option<u64>,
    /// Source URLs, credentials redacted.
    #[serde(default)]
    pub sources: Vec<String>,
    pub sync_running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_auto: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_interval_s: Option<u64>,
    /// The running sync's progress (the daemon says `null` when none runs).
    #[serde(default, skip_serializing_if = "Progress::absent")]
    pub progress: Progress,
    /// The state file and the config disagree (redacted).
    pub warning: Option<String>,
    /// Added by `rackboot status`: where it looked for the daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<Reach>,
}

/// A running sync's counters; `Idle` is `null` in the daemon's document and absent from
/// the offline one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Progress {
    /// Read from the state directory: unknown.
    #[default]
    #[serde(skip)]
    Unknown,
    Running {
        bytes_done: u64,
        bytes_total: u64,
        files_done: u64,
        files_total: u64,
    },
    Idle,
}

impl Progress {
    fn absent(&self) -> bool {
        matches!(self, Progress::Unknown)
    }
}

/// Whether `rackboot status` reached the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reach {
    pub url: String,
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
