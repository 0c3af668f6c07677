//! Storage implementing openraft's v2 storage traits: the log in segment files, the state
//! machine in memory, snapshot files; sled for the few small records beside them.
//!
//! In the store's directory:
//!
//! * `raft-wal/{first}.wal`: the Raft log's segment files (format and crash rules in
//!   `store/wal.rs`);
//! * sled's database: the `raft_meta` tree (`vote`, `last_purged`, `committed`) and, in the
//!   default tree, which file is the current snapshot;
//! * `raft-snapshots/{n}.snap`: snapshot files (format in `store/snapshot.rs`). Only the one
//!   the default tree names is current; any other is an unfinished build or receive, removed
//!   at open.
//!
//! The state machine (the key-value state, `last_applied`, `last_membership`; key layout in
//! `store/keys.rs`) is held in memory (`store/tree.rs`) and loaded at open from the current
//! snapshot; openraft re-applies the committed log after it. Releases before kept it in a sled
//! tree (`state_machine`, or `state_machine.{n}` after an install, named in the default tree),
//! and the log in a sled tree (`raft_log`, JSON entries under big-endian indexes); the first
//! open by this release writes the state tree out as a snapshot and copies the log into the
//! segment files, then drops both trees.

pub(crate) mod keys;
mod log;
mod sm;
mod snapshot;
mod tree;
mod wal;

use std::path::Path;
use std::sync::Arc;

pub use log::LogStore;
pub use sm::SnapshotBuilder;
pub use sm::StateMachineStore;

const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";
const SM_TREE: &str = "state_machine";
/// Snapshot files, inside the database directory.
const SNAPSHOT_DIR: &str = "raft-snapshots";

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("failed to encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("corrupt {what} record in the database (decode failed: {source}); restore this node from a snapshot or re-join it")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("corrupt database: {0}")]
    Corrupt(String),
    #[error("snapshot file I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) fn encode<T: serde::Serialize>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { what, source })
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// Shared ownership of the database; its strong count tells when every user is gone.
pub(crate) struct DbHandle {
    pub(crate) db: sled::Db,
    pub(crate) timings: Timings,
}

/// Latency histograms (seconds) of this replica's storage, shared with whoever
/// exports them (ployzd's `/metrics`): Raft log appends (encode, write, fsync),
/// fsyncs of the log (appends, truncations, purges), and state machine applies;
/// and the write path above the log on this node: time a write waits for a proposer,
/// time from proposing a log entry until it is applied here, and writes per entry.
#[derive(Clone, Debug)]
pub struct Timings {
    pub append: prometheus_client::metrics::histogram::Histogram,
    pub fsync: prometheus_client::metrics::histogram::Histogram,
    pub apply: prometheus_client::metrics::histogram::Histogram,
    pub queue: prometheus_client::metrics::histogram::Histogram,
    pub propose: prometheus_client::metrics::histogram::Histogram,
    pub group_size: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        // 50 µs .. ~1.6 s.
        let h = || Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        Timings {
            append: h(),
            fsync: h(),
            apply: h(),
            queue: h(),
            propose: h(),
            // 1 .. 1024 writes.
            group_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
        }
    }
}

/// How long an open waits for the previous owner's file lock: sled's
/// flusher thread of a database just dropped in this process lets go of the
/// lock only at its next wake-up (up to its 500 ms flush interval).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens sled in `dir`, waiting up to [`LOCK_WAIT`] for its file lock.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(dir).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

/// Opens (or creates) the database in `dir` and returns the log store and the state machine,
/// loaded from the current snapshot.
///
/// Cleans up what a crash may have left: snapshot files other than the current one, and the
/// state-machine trees of older releases (other than the current one, which is first written
/// out as a snapshot).
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let db = open_db(dir)?;
    let snap_dir = dir.join(SNAPSHOT_DIR);
    std::fs::create_dir_all(&snap_dir)?;
    let sm_name = match db.get(keys::SM_TREE_NAME)? {
        Some(v) => String::from_utf8(v.to_vec())
            .map_err(|_| StoreError::Corrupt("state machine tree name is not UTF-8".into()))?,
        None => SM_TREE.to_string(),
    };
    let mut legacy = None;
    for name in db.tree_names() {
        if !name.starts_with(SM_TREE.as_bytes()) {
            continue;
        }
        if name == sm_name.as_bytes() {
            let tree = db.open_tree(&name)?;
            if !tree.is_empty() {
                legacy = Some(tree);
                continue;
            }
        }
        db.drop_tree(&name)?;
    }
    let current: Option<String> = db
        .get(keys::CURRENT_SNAPSHOT)?
        .map(|v| decode::<serde_json::Value>("current snapshot", &v))
        .transpose()?
        .and_then(|p| p.get("file")?.as_str().map(str::to_string));
    for entry in std::fs::read_dir(&snap_dir)? {
        let entry = entry?;
        if Some(entry.file_name().to_string_lossy().as_ref()) != current.as_deref() {
            std::fs::remove_file(entry.path())?;
        }
    }
    let handle = Arc::new(DbHandle {
        db,
        timings: Timings::default(),
    });
    let meta = handle.db.open_tree(META_TREE)?;
    let legacy_log = match handle
        .db
        .tree_names()
        .iter()
        .any(|n| n == LOG_TREE.as_bytes())
    {
        true => Some(handle.db.open_tree(LOG_TREE)?),
        false => None,
    };
    let log = LogStore::open(handle.clone(), dir, meta, legacy_log)?;
    let migrated = legacy.is_some();
    let sm = StateMachineStore::load(handle.clone(), snap_dir, legacy)?;
    if migrated {
        // The tree is in the current snapshot now (flushed by `load`).
        handle.db.drop_tree(sm_name.as_bytes())?;
        handle.db.remove(keys::SM_TREE_NAME)?;
        handle.db.flush()?;
    }
    Ok((log, sm))
}
