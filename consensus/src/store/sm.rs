//! The state machine, in memory: applies [`Txn`]s with the [`kv`](crate::kv) rules, builds and
//! installs snapshots (its only persistence besides the Raft log), publishes [`KvEvent`]s.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Read;
use std::io::Seek;
use std::io::SeekFrom;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::RwLockReadGuard;
use std::sync::RwLockWriteGuard;

use openraft::storage::RaftStateMachine;
use openraft::AnyError;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::RaftSnapshotBuilder;
use openraft::Snapshot;
use openraft::SnapshotMeta;
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::StoredMembership;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::broadcast;

use super::decode;
use super::encode;
use super::keys;
use super::snapshot;
use super::snapshot::Record;
use super::tree::MemTree;
use super::tree::Ops;
use super::DbHandle;
use super::StoreError;
use crate::kv;
use crate::kv::AppliedTxn;
use crate::kv::BucketInfo;
use crate::kv::BucketState;
use crate::kv::Entry;
use crate::kv::EntryMeta;
use crate::kv::KvEvent;
use crate::kv::KvView;
use crate::kv::Mutation;
use crate::kv::Txn;
use crate::kv::TxnResult;
use crate::NodeId;
use crate::PloyzNode;
use crate::TypeConfig;

type LogEntry = openraft::Entry<TypeConfig>;
type Membership = StoredMembership<NodeId, PloyzNode>;
type Meta = SnapshotMeta<NodeId, PloyzNode>;

/// How many events a slow subscriber may fall behind before it gets `RecvError::Lagged`.
const EVENT_CAPACITY: usize = 4096;

/// The replicated key-value state machine.
///
/// Cloning is cheap; clones share the database, the apply lock (with the state in memory) and
/// the event channel, so a clone kept outside openraft serves local reads.
#[derive(Clone)]
pub struct StateMachineStore {
    handle: Arc<DbHandle>,
    shared: Arc<Shared>,
}

struct Shared {
    /// The state. Writers (apply, install's swap, snapshot publish) take it exclusively;
    /// readers shared, so a read never observes half of an applied transaction. Installing a
    /// snapshot fills a fresh tree and swaps it in here.
    lock: RwLock<MemTree>,
    events: broadcast::Sender<KvEvent>,
    /// Snapshot files live here, beside the database.
    snap_dir: PathBuf,
    /// Files being received from a leader (`begin_receiving_snapshot`), by inode, so an
    /// install can keep the very file it was given as the new current snapshot.
    receiving: Mutex<HashMap<u64, PathBuf>>,
    /// While a snapshot is being dumped: the value at the snapshot's cut of every key an apply
    /// changed since (`None`: absent at the cut), recorded by the apply before it writes.
    cut: Mutex<Option<PreImages>>,
    /// Held by a dump for its whole run; an install takes it before filling and swapping trees,
    /// so the tree a dump reads is never dropped under it.
    dumping: tokio::sync::Mutex<()>,
}

/// Values of keys at a snapshot's cut, for keys changed after it.
type PreImages = BTreeMap<Vec<u8>, Option<sled::IVec>>;

/// The key prefixes a snapshot file holds, in file order.
const DUMPED: [&[u8]; 3] = [keys::BUCKETS, keys::HISTORY, keys::TXNS];

/// Keys a dump reads per hold of the read lock (applies wait at most one chunk).
const DUMP_CHUNK: usize = 1024;

fn view(tree: &MemTree) -> TreeView<'_> {
    TreeView {
        tree,
        pending: None,
    }
}

/// The committed state as `pending` will leave it (reads see its writes first).
fn view_with<'a>(tree: &'a MemTree, pending: &'a PendingBatch) -> TreeView<'a> {
    TreeView {
        tree,
        pending: Some(pending),
    }
}

/// Per-bucket statistics kept on every apply (under [`keys::counters`]), so
/// [`StateMachineStore::bucket_info`] never scans the bucket.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BucketCounters {
    /// Stored entries, history and tombstones included.
    entries: u64,
    /// Keys whose latest entry is a put.
    live_keys: u64,
    /// Value bytes of the stored entries.
    bytes: u64,
}

impl BucketCounters {
    /// The counters of a bucket's stored entries and the latest entry of each key.
    fn of<'a>(
        stored: impl Iterator<Item = &'a Entry>,
        latest: impl Iterator<Item = &'a Entry>,
    ) -> Self {
        let mut c = BucketCounters::default();
        for e in stored {
            c.entries += 1;
            c.bytes += e.value.len() as u64;
        }
        c.live_keys = latest.filter(|e| e.is_live()).count() as u64;
        c
    }
}

/// Snapshot data of releases before the binary snapshot files: the whole state machine as one
/// JSON value. Still installed (from a leader running such a release), never built.
#[derive(Serialize, Deserialize)]
struct JsonSnapshotPayload {
    buckets: BTreeMap<String, BucketState>,
    /// Every stored entry (history and tombstones included), in key order.
    entries: Vec<Entry>,
    /// The remembered outcomes of transactions with an id (absent in snapshots built before
    /// ids existed).
    #[serde(default)]
    txns: Vec<AppliedTxn>,
}

impl StateMachineStore {
    /// The state at open: the current snapshot, or the sled tree `legacy` of a release that
    /// kept the state machine in sled, whichever is further along. A legacy tree is written
    /// out as a snapshot here (once: it is dropped after that snapshot is the current one);
    /// openraft then re-applies the log after the snapshot.
    pub(crate) fn load(
        handle: Arc<DbHandle>,
        snap_dir: PathBuf,
        legacy: Option<sled::Tree>,
    ) -> Result<Self, StoreError> {
        let pointer: Option<SnapshotPointer> = handle
            .db
            .get(keys::CURRENT_SNAPSHOT)?
            .map(|v| decode("current snapshot", &v))
            .transpose()?;
        let from_snapshot = |p: &SnapshotPointer| -> Result<MemTree, StoreError> {
            let (tree, records) = Self::fill(&p.meta, &snap_dir.join(&p.file))?;
            tracing::info!(snapshot = %p.meta, records, "loaded the state machine from its snapshot");
            Ok(tree)
        };
        let Some(legacy) = legacy else {
            let tree = match &pointer {
                Some(p) => from_snapshot(p)?,
                None => MemTree::default(),
            };
            return Ok(Self::new(handle, tree, snap_dir));
        };
        let mut tree = MemTree::default();
        for item in legacy.iter() {
            let (k, v) = item?;
            if &*k != keys::OLD_SNAPSHOT {
                tree.insert(k.to_vec(), v);
            }
        }
        Self::build_counters_if_missing(&mut tree)?;
        let (legacy_applied, _) = Self::applied_state_inner(&tree)?;
        let tree = match &pointer {
            Some(p) if p.meta.last_log_id > legacy_applied => from_snapshot(p)?,
            _ => tree,
        };
        let sm = Self::new(handle, tree, snap_dir);
        let (applied, _) = Self::applied_state_inner(&sm.read_lock())?;
        if pointer
            .as_ref()
            .is_none_or(|p| p.meta.last_log_id < applied)
        {
            // Nothing else holds this store yet: no install can run, no `dumping` to take.
            let built = sm.dump_locked(sm.mark_cut()?)?;
            sm.handle.db.insert(
                keys::CURRENT_SNAPSHOT,
                encode("current snapshot", &built.pointer)?,
            )?;
            sm.handle.db.flush()?;
            if let Some(old) = pointer {
                sm.remove_snapshot_file(&old.file);
            }
            tracing::info!(
                snapshot = %built.pointer.meta,
                bytes = built.bytes,
                "wrote the state machine of an older release's sled tree as a snapshot"
            );
        }
        Ok(sm)
    }

    pub(crate) fn new(handle: Arc<DbHandle>, tree: MemTree, snap_dir: PathBuf) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            handle,
            shared: Arc::new(Shared {
                lock: RwLock::new(tree),
                events,
                snap_dir,
                receiving: Mutex::new(HashMap::new()),
                cut: Mutex::new(None),
                dumping: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// How many handles (stores, readers, snapshot builders) still hold the database open.
    pub(crate) fn db_users(&self) -> usize {
        Arc::strong_count(&self.handle)
    }

    /// A number never handed out before by this database, across restarts.
    pub(crate) fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.handle.db.generate_id()?)
    }

    /// Flushes the whole database to disk.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.handle.db.flush_async().await?;
        Ok(())
    }

    /// The storage latency histograms of this replica (log and state machine).
    pub fn timings(&self) -> super::Timings {
        self.handle.timings.clone()
    }

    /// Subscribes to changes applied from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<KvEvent> {
        self.shared.events.subscribe()
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, MemTree> {
        // A poisoned lock still holds a whole state: an apply computes its writes first and
        // only then applies them, with nothing in between that can panic.
        self.shared.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, MemTree> {
        self.shared.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    // ---- local reads (not linearizable by themselves) ----

    /// The key's latest entry, tombstones included.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        let g = self.read_lock();
        view(&g).latest(bucket, key)
    }

    /// Latest entry per key, live keys only, sorted by key.
    pub fn list(&self, bucket: &str) -> Result<Vec<Entry>, StoreError> {
        let g = self.read_lock();
        let mut out = Vec::new();
        for (_, v) in g.scan_prefix(&keys::latest_prefix(bucket)) {
            let e: Entry = decode("entry", v)?;
            if !e.is_tombstone() {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Latest entry of every key of a bucket, tombstones included, sorted by key.
    pub fn list_all(&self, bucket: &str) -> Result<Vec<Entry>, StoreError> {
        let g = self.read_lock();
        g.scan_prefix(&keys::latest_prefix(bucket))
            .map(|(_, v)| decode("entry", v))
            .collect()
    }

    /// Stored entries of a key, oldest first.
    pub fn history(&self, bucket: &str, key: &str) -> Result<Vec<Entry>, StoreError> {
        let g = self.read_lock();
        g.scan_prefix(&keys::history_prefix(bucket, key))
            .map(|(_, v)| decode("entry", v))
            .collect()
    }

    /// Names of all buckets, sorted.
    pub fn buckets(&self) -> Result<Vec<String>, StoreError> {
        let g = self.read_lock();
        let mut out = Vec::new();
        for (k, _) in g.scan_prefix(keys::BUCKETS) {
            let name = keys::bucket_name(k)
                .ok_or_else(|| StoreError::Corrupt("bucket key is not UTF-8".into()))?;
            out.push(name.to_string());
        }
        Ok(out)
    }

    /// Bucket statistics; scans the bucket, so cost is linear in its stored entries.
    /// Whether `bucket` exists: one lookup ([`Self::bucket_info`] counts every entry).
    pub fn has_bucket(&self, bucket: &str) -> Result<bool, StoreError> {
        let g = self.read_lock();
        Ok(view(&g).bucket(bucket)?.is_some())
    }

    /// Bucket statistics: the bucket record, its counters and its first stored revision, three
    /// lookups whatever the bucket's size.
    pub fn bucket_info(&self, bucket: &str) -> Result<Option<BucketInfo>, StoreError> {
        let g = self.read_lock();
        let Some(state) = view(&g).bucket(bucket)? else {
            return Ok(None);
        };
        let counters: BucketCounters = g
            .get(&keys::counters(bucket))
            .map(|v| decode("bucket counters", &v))
            .transpose()?
            .unwrap_or_default();
        let first = match g
            .scan_prefix(&keys::revisions_prefix(bucket))
            .map(|(k, _)| k)
            .next()
        {
            Some(k) => Some(
                keys::history_revision(k)
                    .ok_or_else(|| StoreError::Corrupt("short revision key".into()))?,
            ),
            None => None,
        };
        Ok(Some(BucketInfo {
            bucket: bucket.to_string(),
            config: state.config,
            created_ms: state.created_ms,
            first_seq: kv::first_seq(first, state.last_seq),
            last_seq: state.last_seq,
            live_keys: counters.live_keys,
            entries: counters.entries,
            bytes: counters.bytes,
        }))
    }

    /// Builds the bucket counters and revision index of a state written before they existed
    /// (one scan, once: afterwards every apply keeps them).
    pub(crate) fn build_counters_if_missing(tree: &mut MemTree) -> Result<(), StoreError> {
        if tree.contains_key(keys::COUNTERS_BUILT) {
            return Ok(());
        }
        let mut batch = PendingBatch::default();
        for prefix in [keys::COUNTERS, keys::REVISIONS] {
            for (k, _) in tree.scan_prefix(prefix) {
                batch.remove(k.to_vec());
            }
        }
        for (k, _) in tree.scan_prefix(keys::BUCKETS) {
            let name = keys::bucket_name(k)
                .ok_or_else(|| StoreError::Corrupt("bucket key is not UTF-8".into()))?;
            let stored = tree
                .scan_prefix(&keys::history_bucket_prefix(name))
                .map(|(_, v)| decode::<Entry>("entry", v))
                .collect::<Result<Vec<_>, _>>()?;
            let latest = tree
                .scan_prefix(&keys::latest_prefix(name))
                .map(|(_, v)| decode::<Entry>("entry", v))
                .collect::<Result<Vec<_>, _>>()?;
            for e in &stored {
                batch.put(keys::revision(name, e.revision), sled::IVec::default());
            }
            let counters = BucketCounters::of(stored.iter(), latest.iter());
            batch.put(keys::counters(name), encode("bucket counters", &counters)?);
        }
        batch.put(keys::COUNTERS_BUILT.to_vec(), sled::IVec::default());
        tree.apply(batch.into_ops()?);
        Ok(())
    }

    // ---- apply ----

    fn applied_state_inner(
        tree: &MemTree,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StoreError> {
        let last_applied = tree
            .get(keys::LAST_APPLIED)
            .map(|v| decode("last applied log id", &v))
            .transpose()?;
        let membership = tree
            .get(keys::LAST_MEMBERSHIP)
            .map(|v| decode("last membership", &v))
            .transpose()?
            .unwrap_or_default();
        Ok((last_applied, membership))
    }

    /// Adds one log entry's writes to `batch` (which holds the writes of the entries before it
    /// in the same apply call, not yet in the tree: reads see them first); returns the result
    /// and the events to publish once the batch is applied.
    fn plan_entry(
        tree: &MemTree,
        batch: &mut PendingBatch,
        entry: &LogEntry,
    ) -> Result<(TxnResult, Vec<KvEvent>), StoreError> {
        let out = match &entry.payload {
            EntryPayload::Blank => (TxnResult::Applied { revisions: vec![] }, vec![]),
            EntryPayload::Membership(m) => {
                let stored = Membership::new(Some(entry.log_id), m.clone());
                batch.put(
                    keys::LAST_MEMBERSHIP.to_vec(),
                    encode("last membership", &stored)?,
                );
                (TxnResult::Applied { revisions: vec![] }, vec![])
            }
            EntryPayload::Normal(group) if !group.group.is_empty() => {
                Self::plan_group(tree, batch, entry, &group.group)?
            }
            EntryPayload::Normal(txn) => {
                let plan = kv::plan(&view_with(tree, batch), txn)?;
                if plan.duplicate {
                    tracing::info!(
                        log_id = %entry.log_id,
                        txn_id = txn.id.as_deref().unwrap_or_default(),
                        "transaction already applied: answering its first outcome"
                    );
                }
                batch.plan(tree, &plan)?;
                (plan.result, plan.events)
            }
        };
        Ok(out)
    }

    /// Adds a group entry's members to `batch`, in order: each member is planned against the
    /// state its predecessors leave (a rejected member adds nothing). The whole apply call is
    /// one atomic sled batch, so a crash leaves either none or all of the group, with
    /// `last_applied`; a replay after a snapshot or a re-apply answers each member's first
    /// outcome (remembered by id) and changes nothing.
    fn plan_group(
        tree: &MemTree,
        batch: &mut PendingBatch,
        entry: &LogEntry,
        members: &[Txn],
    ) -> Result<(TxnResult, Vec<KvEvent>), StoreError> {
        if members
            .iter()
            .any(|txn| txn.id.is_none() || !txn.group.is_empty())
        {
            return Err(StoreError::Corrupt(format!(
                "log entry {} groups a transaction without an id or a nested group",
                entry.log_id
            )));
        }
        let mut events = Vec::new();
        for txn in members {
            let plan = kv::plan(&view_with(tree, batch), txn)?;
            batch.plan(tree, &plan)?;
            events.extend(plan.events);
        }
        Ok((TxnResult::Applied { revisions: vec![] }, events))
    }

    /// The remembered outcome of the transaction with idempotency key `id`.
    pub fn applied_txn(&self, id: &str) -> Result<Option<AppliedTxn>, StoreError> {
        let g = self.read_lock();
        view(&g).applied_txn(id)
    }

    // ---- snapshots ----

    /// Marks the snapshot cut: the state as it is now, at `last_applied`. From here until the
    /// dump ends, every apply first records the old value of each key it changes (see
    /// [`Self::dump`]). Called by openraft on its state-machine task, the only one that applies,
    /// so nothing is applied between reading `last_applied` and starting the recording.
    fn mark_cut(&self) -> Result<Cut, StoreError> {
        let id = self.generate_id()?;
        let g = self.read_lock();
        let (last_applied, last_membership) = Self::applied_state_inner(&g)?;
        *self.cut() = Some(PreImages::new());
        let snapshot_id = match &last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, id),
            None => format!("none-{id}"),
        };
        Ok(Cut {
            meta: Meta {
                last_log_id: last_applied,
                last_membership,
                snapshot_id,
            },
            file: format!("{id}.snap"),
        })
    }

    /// Records, while a dump runs, the value before this batch of every dumped key it changes
    /// that no earlier batch since the cut changed. Called under the write lock, before the
    /// batch is applied.
    fn keep_pre_images(&self, tree: &MemTree, ops: &Ops) {
        let mut cut = self.cut();
        let Some(pre) = cut.as_mut() else {
            return;
        };
        for k in ops.keys() {
            if DUMPED.iter().any(|p| k.starts_with(p)) && !pre.contains_key(k) {
                pre.insert(k.clone(), tree.get(k));
            }
        }
    }

    fn cut(&self) -> std::sync::MutexGuard<'_, Option<PreImages>> {
        self.shared.cut.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams the state at `cut` to a new snapshot file (record by record, never whole in
    /// memory) while applies go on; returns the file's pointer and size.
    ///
    /// Consistent cut: the tree is read in key order, a chunk at a time under the read lock,
    /// while applies change it between chunks, and every key is written with its value at the
    /// cut. An apply records a key's old value before it first changes it after the cut (under
    /// the write lock, so a value the dump reads is either from before the batch, or the
    /// batch's pre-image is already recorded). The dump uses the
    /// recorded value for any key that has one (skipping keys absent at the cut), and also
    /// writes recorded keys the tree no longer holds, in order. Keys no apply touched since the
    /// cut are read as they were at the cut.
    fn dump(&self, cut: Cut) -> Result<Built, StoreError> {
        let _dumping = self.shared.dumping.blocking_lock();
        self.dump_locked(cut)
    }

    /// [`Self::dump`], with `dumping` held by the caller.
    fn dump_locked(&self, cut: Cut) -> Result<Built, StoreError> {
        let started = std::time::Instant::now();
        let path = self.shared.snap_dir.join(&cut.file);
        let pre_between = |from: &[u8], to: Option<&[u8]>| -> Vec<(Vec<u8>, sled::IVec)> {
            let cut = self.cut();
            let Some(pre) = cut.as_ref() else {
                return Vec::new();
            };
            pre.range::<[u8], _>((
                std::ops::Bound::Excluded(from),
                match to {
                    Some(to) => std::ops::Bound::Excluded(to),
                    None => std::ops::Bound::Unbounded,
                },
            ))
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect()
        };
        let written = (|| {
            let mut w = snapshot::Writer::create(&path, &cut.meta)?;
            let emit = |w: &mut snapshot::Writer, k: &[u8], v: &[u8]| {
                if k.starts_with(keys::HISTORY) {
                    w.entry(&decode("entry", v)?)
                } else {
                    w.raw(k, v)
                }
            };
            for prefix in DUMPED {
                // Just below every key with `prefix`.
                let mut last: Vec<u8> = prefix[..prefix.len() - 1].to_vec();
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let chunk = self.read_lock().chunk(prefix, after.as_deref(), DUMP_CHUNK);
                    let Some((end, _)) = chunk.last() else {
                        break;
                    };
                    after = Some(end.clone());
                    for (k, live) in chunk {
                        for (pk, pv) in pre_between(&last, Some(&k)) {
                            if pk.starts_with(prefix) {
                                emit(&mut w, &pk, &pv)?;
                            }
                        }
                        let at_cut = match self.cut().as_ref().and_then(|p| p.get(&k)) {
                            Some(recorded) => recorded.clone(),
                            None => Some(live),
                        };
                        if let Some(v) = at_cut {
                            emit(&mut w, &k, &v)?;
                        }
                        last = k;
                    }
                }
                for (pk, pv) in pre_between(&last, None) {
                    if pk.starts_with(prefix) {
                        emit(&mut w, &pk, &pv)?;
                    }
                }
            }
            w.finish()
        })();
        *self.cut() = None;
        match written.and_then(|bytes| {
            sync_dir(&self.shared.snap_dir)?;
            Ok(bytes)
        }) {
            Ok(bytes) => Ok(Built {
                pointer: SnapshotPointer {
                    file: cut.file,
                    meta: cut.meta,
                },
                bytes,
                took: started.elapsed(),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// The current snapshot's file and meta, as recorded in the database.
    fn current_pointer(&self) -> Result<Option<SnapshotPointer>, StoreError> {
        self.handle
            .db
            .get(keys::CURRENT_SNAPSHOT)?
            .map(|v| decode("current snapshot", &v))
            .transpose()
    }

    fn remove_snapshot_file(&self, file: &str) {
        if let Err(e) = std::fs::remove_file(self.shared.snap_dir.join(file)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file, error = %e, "could not remove an old snapshot file");
            }
        }
    }

    /// Makes a built snapshot the current one, unless a newer one (installed meanwhile) is.
    async fn publish_built(&self, built: &SnapshotPointer) -> Result<(), StoreError> {
        let replaced = {
            let _g = self.write_lock();
            let cur = self.current_pointer()?;
            if cur
                .as_ref()
                .is_some_and(|c| c.meta.last_log_id > built.meta.last_log_id)
            {
                Some(built.file.clone())
            } else {
                self.handle
                    .db
                    .insert(keys::CURRENT_SNAPSHOT, encode("current snapshot", built)?)?;
                cur.map(|c| c.file)
            }
        };
        self.flush().await?;
        if let Some(file) = replaced {
            self.remove_snapshot_file(&file);
        }
        Ok(())
    }

    /// Installs a snapshot: streams it into a fresh tree, then swaps that tree in and makes the
    /// file the current snapshot (flushed before this returns, so before openraft purges the
    /// log it covers; a crash before the flush leaves the previous snapshot current, and the
    /// log after it).
    async fn install(&self, meta: &Meta, file: tokio::fs::File) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let _no_dump = self.shared.dumping.lock().await;
        let mut file = file.into_std().await;
        let ino = file.metadata().map_err(StoreError::Io)?.ino();
        let received = self.receiving().remove(&ino);
        let path = match received {
            Some(path) => path,
            None => {
                // Not a file we are receiving (handed to us directly): keep a copy of it.
                let path = self
                    .shared
                    .snap_dir
                    .join(format!("{}.snap", self.generate_id()?));
                file.seek(SeekFrom::Start(0)).map_err(StoreError::Io)?;
                let mut copy = std::fs::File::create(&path).map_err(StoreError::Io)?;
                std::io::copy(&mut file, &mut copy).map_err(StoreError::Io)?;
                path
            }
        };
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| StoreError::Corrupt("snapshot file name is not UTF-8".into()))?
            .to_string();
        let (meta2, path2) = (meta.clone(), path.clone());
        let filled = tokio::task::spawn_blocking(move || Self::fill(&meta2, &path2))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Corrupt(format!(
                    "snapshot install task failed: {e}"
                )))
            });
        let (tree, records) = match filled {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let pointer = SnapshotPointer {
            file: file_name,
            meta: meta.clone(),
        };
        let (old, old_file) = {
            let mut g = self.write_lock();
            let old_file = self.current_pointer()?.map(|p| p.file);
            self.handle.db.insert(
                keys::CURRENT_SNAPSHOT,
                encode("current snapshot", &pointer)?,
            )?;
            (std::mem::replace(&mut *g, tree), old_file)
        };
        self.flush().await?;
        // The replaced state can be large: freed off the async runtime.
        tokio::task::spawn_blocking(move || drop(old));
        if let Some(f) = old_file.filter(|f| *f != pointer.file) {
            self.remove_snapshot_file(&f);
        }
        tracing::info!(
            snapshot = %meta,
            records,
            took_ms = started.elapsed().as_millis() as u64,
            "installed snapshot"
        );
        let _ = self.shared.events.send(KvEvent::Reset);
        Ok(())
    }

    /// Streams the snapshot file at `path` into a new tree; returns the tree and how many
    /// records it read. The file is read to its end (count and CRC checked) before this
    /// returns, so a damaged file leaves nothing to swap in.
    fn fill(meta: &Meta, path: &Path) -> Result<(MemTree, u64), StoreError> {
        let mut file = std::fs::File::open(path).map_err(StoreError::Io)?;
        file.sync_all().map_err(StoreError::Io)?;
        let mut head = [0u8; 8];
        let n = file.read(&mut head).map_err(StoreError::Io)?;
        file.seek(SeekFrom::Start(0)).map_err(StoreError::Io)?;
        let mut tree = MemTree::default();
        let mut filler = Filler::new(&mut tree);
        let mut records = 0;
        if snapshot::is_binary(&head[..n]) {
            let (mut reader, file_meta) = snapshot::Reader::open(file)?;
            if file_meta.last_log_id != meta.last_log_id
                || file_meta.snapshot_id != meta.snapshot_id
            {
                return Err(StoreError::Corrupt(format!(
                    "snapshot file is {file_meta}, expected {meta}"
                )));
            }
            while let Some(record) = reader.next_record()? {
                filler.record(record)?;
                records += 1;
            }
        } else {
            // A snapshot from a release before the binary files: one JSON value.
            let mut data = Vec::new();
            file.read_to_end(&mut data).map_err(StoreError::Io)?;
            let payload: JsonSnapshotPayload = decode("snapshot", &data)?;
            drop(data);
            let mut entries = payload.entries;
            entries.sort_by(|a, b| {
                (&a.bucket, &a.key, a.revision).cmp(&(&b.bucket, &b.key, b.revision))
            });
            for (name, state) in &payload.buckets {
                filler.record(Record::Raw {
                    key: keys::bucket(name),
                    value: encode("bucket", state)?,
                })?;
            }
            for e in entries {
                filler.record(Record::Entry(e))?;
            }
            for t in &payload.txns {
                filler.record(Record::Raw {
                    key: keys::txn(&t.id),
                    value: encode("applied txn", t)?,
                })?;
            }
            records = filler.records;
        }
        filler.finish(meta)?;
        Ok((tree, records))
    }

    fn receiving(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PathBuf>> {
        self.shared
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Fsyncs a directory, so the files created in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::Io)
}

/// The current snapshot, as recorded in the database's default tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotPointer {
    /// File name in the snapshot directory.
    file: String,
    meta: Meta,
}

/// A snapshot's cut: its meta and the file it goes to.
struct Cut {
    meta: Meta,
    file: String,
}

/// A snapshot file written by [`StateMachineStore::dump`].
struct Built {
    pointer: SnapshotPointer,
    bytes: u64,
    took: std::time::Duration,
}

/// Writes snapshot records into a fresh tree, deriving what the snapshot leaves out: the
/// latest entry of each key (the last of its adjacent entries), the revision index, the
/// bucket counters, the remembered ids' time index.
struct Filler<'a> {
    tree: &'a mut MemTree,
    records: u64,
    buckets: BTreeMap<String, BucketCounters>,
    latest: Option<(Entry, sled::IVec)>,
}

impl<'a> Filler<'a> {
    fn new(tree: &'a mut MemTree) -> Self {
        Filler {
            tree,
            records: 0,
            buckets: BTreeMap::new(),
            latest: None,
        }
    }

    fn put(&mut self, key: Vec<u8>, value: impl Into<sled::IVec>) -> Result<(), StoreError> {
        self.tree.insert(key, value);
        Ok(())
    }

    fn record(&mut self, record: Record) -> Result<(), StoreError> {
        self.records += 1;
        match record {
            Record::Raw { key, value } if key.starts_with(keys::BUCKETS) => {
                let name = keys::bucket_name(&key)
                    .ok_or_else(|| StoreError::Corrupt("bucket key is not UTF-8".into()))?;
                decode::<BucketState>("bucket", &value)?;
                self.buckets.entry(name.to_string()).or_default();
                self.put(key, value)
            }
            Record::Raw { key, value } if key.starts_with(keys::TXNS) => {
                let t: AppliedTxn = decode("applied txn", &value)?;
                self.put(keys::txn_time(t.now_ms, &t.id), Vec::new())?;
                self.put(keys::txn(&t.id), value)
            }
            Record::Raw { key, .. } => Err(StoreError::Corrupt(format!(
                "snapshot holds an unexpected key {:?}",
                String::from_utf8_lossy(&key)
            ))),
            Record::Entry(e) => {
                let c = self.buckets.get_mut(&e.bucket).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "snapshot holds an entry of bucket {:?}, which it does not hold",
                        e.bucket
                    ))
                })?;
                c.entries += 1;
                c.bytes += e.value.len() as u64;
                match &self.latest {
                    Some((prev, _)) if prev.bucket == e.bucket && prev.key == e.key => {
                        if e.revision <= prev.revision {
                            return Err(StoreError::Corrupt(
                                "snapshot entries of a key are not in revision order".into(),
                            ));
                        }
                    }
                    _ => self.close_latest()?,
                }
                // One buffer for the entry, shared with its `l:` key if it is the latest.
                let bytes = sled::IVec::from(encode("entry", &e)?);
                self.put(keys::history(&e.bucket, &e.key, e.revision), bytes.clone())?;
                self.put(keys::revision(&e.bucket, e.revision), Vec::new())?;
                self.latest = Some((e, bytes));
                Ok(())
            }
        }
    }

    /// Writes the latest entry of the key whose entries were just read.
    fn close_latest(&mut self) -> Result<(), StoreError> {
        if let Some((e, bytes)) = self.latest.take() {
            if e.is_live() {
                if let Some(c) = self.buckets.get_mut(&e.bucket) {
                    c.live_keys += 1;
                }
            }
            self.put(keys::latest(&e.bucket, &e.key), bytes)?;
        }
        Ok(())
    }

    fn finish(mut self, meta: &Meta) -> Result<(), StoreError> {
        self.close_latest()?;
        for (name, c) in std::mem::take(&mut self.buckets) {
            self.put(keys::counters(&name), encode("bucket counters", &c)?)?;
        }
        self.put(keys::COUNTERS_BUILT.to_vec(), Vec::new())?;
        // The meta is authoritative for the log position of the snapshot.
        if let Some(last) = &meta.last_log_id {
            self.put(
                keys::LAST_APPLIED.to_vec(),
                encode("last applied log id", last)?,
            )?;
        }
        self.put(
            keys::LAST_MEMBERSHIP.to_vec(),
            encode("last membership", &meta.last_membership)?,
        )?;
        Ok(())
    }
}

/// Reads the committed state for [`kv::plan`], seen through the writes pending in a batch of
/// the same apply call (they win over the tree).
struct TreeView<'a> {
    tree: &'a MemTree,
    pending: Option<&'a PendingBatch>,
}

impl TreeView<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        if let Some(v) = self.pending.and_then(|p| p.ops.get(key)) {
            return Ok(v.clone());
        }
        Ok(self.tree.get(key))
    }

    /// Keys in `[start, end)` (`end = None`: every key with prefix `start`), in order.
    fn keys(&self, start: &[u8], end: Option<&[u8]>) -> Result<Vec<Vec<u8>>, StoreError> {
        let in_range = |k: &[u8]| match end {
            Some(end) => k < end,
            None => k.starts_with(start),
        };
        let mut out: std::collections::BTreeSet<Vec<u8>> = match end {
            Some(end) => self
                .tree
                .range_keys(start, end)
                .map(<[u8]>::to_vec)
                .collect(),
            None => self
                .tree
                .scan_prefix(start)
                .map(|(k, _)| k.to_vec())
                .collect(),
        };
        if let Some(p) = self.pending {
            for (k, v) in p.ops.range(start.to_vec()..) {
                if !in_range(k) {
                    break;
                }
                match v {
                    Some(_) => out.insert(k.clone()),
                    None => out.remove(k),
                };
            }
        }
        Ok(out.into_iter().collect())
    }
}

impl KvView for TreeView<'_> {
    type Error = StoreError;

    fn applied_txn(&self, id: &str) -> Result<Option<AppliedTxn>, StoreError> {
        self.get(&keys::txn(id))?
            .map(|v| decode("applied txn", &v))
            .transpose()
    }

    fn applied_txns_before(&self, before_ms: u64) -> Result<Vec<(u64, String)>, StoreError> {
        let end = keys::txn_time(before_ms, "");
        self.keys(keys::TXN_TIMES, Some(&end))?
            .into_iter()
            .map(|k| {
                keys::txn_time_parts(&k)
                    .map(|(t, id)| (t, id.to_string()))
                    .ok_or_else(|| StoreError::Corrupt("malformed txn time key".into()))
            })
            .collect()
    }

    fn bucket(&self, bucket: &str) -> Result<Option<BucketState>, StoreError> {
        match self.pending {
            Some(p) => p.bucket(self.tree, bucket),
            None => self
                .get(&keys::bucket(bucket))?
                .map(|v| decode("bucket", &v))
                .transpose(),
        }
    }

    fn latest(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        self.get(&keys::latest(bucket, key))?
            .map(|v| decode("entry", &v))
            .transpose()
    }

    fn latest_meta(&self, bucket: &str, key: &str) -> Result<Option<EntryMeta>, StoreError> {
        self.get(&keys::latest(bucket, key))?
            .map(|v| {
                EntryMeta::from_json(&v).map_err(|source| StoreError::Decode {
                    what: "entry",
                    source,
                })
            })
            .transpose()
    }

    fn revisions(&self, bucket: &str, key: &str) -> Result<Vec<u64>, StoreError> {
        self.keys(&keys::history_prefix(bucket, key), None)?
            .into_iter()
            .map(|k| {
                keys::history_revision(&k)
                    .ok_or_else(|| StoreError::Corrupt("short history key".into()))
            })
            .collect()
    }
}

/// Writes accumulated in key order, last write per key wins, applied as one sled batch.
///
/// Bucket records and counters change with every put; the batch keeps them decoded
/// (`buckets`, `counters`) and encodes each once, when sealed, instead of once per put.
#[derive(Default)]
struct PendingBatch {
    ops: Ops,
    /// Bucket records this batch writes (`None`: removes); not in `ops` until [`Self::seal`].
    buckets: BTreeMap<String, Option<BucketState>>,
    /// Bucket counters this batch writes (`None`: removes); not in `ops` until [`Self::seal`].
    counters: BTreeMap<String, Option<BucketCounters>>,
}

impl PendingBatch {
    fn put(&mut self, key: Vec<u8>, value: impl Into<sled::IVec>) {
        self.ops.insert(key, Some(value.into()));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.ops.insert(key, None);
    }

    /// Removes every key with `prefix`, both in the tree and pending in this batch.
    fn remove_prefix(&mut self, tree: &MemTree, prefix: &[u8]) -> Result<(), StoreError> {
        for k in self
            .ops
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect::<Vec<_>>()
        {
            self.ops.insert(k, None);
        }
        for (k, _) in tree.scan_prefix(prefix) {
            self.ops.insert(k.to_vec(), None);
        }
        Ok(())
    }

    /// Adds a plan's writes: its mutations, the remembered ids it forgets, its own outcome.
    fn plan(&mut self, tree: &MemTree, plan: &kv::Plan) -> Result<(), StoreError> {
        for m in &plan.mutations {
            self.execute(tree, m)?;
        }
        for (now_ms, id) in &plan.forget {
            self.remove(keys::txn(id));
            self.remove(keys::txn_time(*now_ms, id));
        }
        if let Some(t) = &plan.remember {
            self.remember(t)?;
        }
        Ok(())
    }

    /// Remembers a transaction's outcome under its id, with its time index.
    fn remember(&mut self, t: &AppliedTxn) -> Result<(), StoreError> {
        self.put(keys::txn(&t.id), encode("applied txn", t)?);
        self.put(keys::txn_time(t.now_ms, &t.id), sled::IVec::default());
        Ok(())
    }

    /// `key`'s value as this batch leaves it (not for bucket records or counters).
    fn get(&self, tree: &MemTree, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        match self.ops.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(tree.get(key)),
        }
    }

    /// A bucket's record as this batch leaves it.
    fn bucket(&self, tree: &MemTree, bucket: &str) -> Result<Option<BucketState>, StoreError> {
        match self.buckets.get(bucket) {
            Some(state) => Ok(*state),
            None => tree
                .get(&keys::bucket(bucket))
                .map(|v| decode("bucket", &v))
                .transpose(),
        }
    }

    /// A bucket's counters as this batch leaves them, read into the batch.
    fn counters_mut(
        &mut self,
        tree: &MemTree,
        bucket: &str,
    ) -> Result<&mut Option<BucketCounters>, StoreError> {
        if !self.counters.contains_key(bucket) {
            let stored = tree
                .get(&keys::counters(bucket))
                .map(|v| decode("bucket counters", &v))
                .transpose()?;
            self.counters.insert(bucket.to_string(), stored);
        }
        Ok(self.counters.entry(bucket.to_string()).or_default())
    }

    /// Changes a bucket's counters as this batch leaves them (absent ones start at zero).
    fn count(
        &mut self,
        tree: &MemTree,
        bucket: &str,
        change: impl FnOnce(&mut BucketCounters),
    ) -> Result<(), StoreError> {
        change(
            self.counters_mut(tree, bucket)?
                .get_or_insert_with(Default::default),
        );
        Ok(())
    }

    fn execute(&mut self, tree: &MemTree, m: &Mutation) -> Result<(), StoreError> {
        match m {
            Mutation::PutBucket { bucket, state } => {
                self.buckets.insert(bucket.clone(), Some(*state));
                self.count(tree, bucket, |_| {})?;
            }
            Mutation::RemoveBucket { bucket } => {
                self.buckets.insert(bucket.clone(), None);
                self.counters.insert(bucket.clone(), None);
                self.remove_prefix(tree, &keys::latest_prefix(bucket))?;
                self.remove_prefix(tree, &keys::history_bucket_prefix(bucket))?;
                self.remove_prefix(tree, &keys::revisions_prefix(bucket))?;
            }
            Mutation::PutEntry {
                entry: e,
                replaces_live,
            } => {
                // One shared buffer for both keys.
                let bytes = sled::IVec::from(encode("entry", e)?);
                self.put(keys::history(&e.bucket, &e.key, e.revision), bytes.clone());
                self.put(keys::latest(&e.bucket, &e.key), bytes);
                self.put(keys::revision(&e.bucket, e.revision), sled::IVec::default());
                let (len, live, was_live) = (e.value.len() as u64, e.is_live(), *replaces_live);
                self.count(tree, &e.bucket, |c| {
                    c.entries += 1;
                    c.bytes += len;
                    match (was_live, live) {
                        (false, true) => c.live_keys += 1,
                        (true, false) => c.live_keys = c.live_keys.saturating_sub(1),
                        _ => {}
                    }
                })?;
            }
            Mutation::RemoveHistory {
                bucket,
                key,
                revision,
                value_len,
            } => {
                let at = keys::history(bucket, key, *revision);
                let len = match value_len {
                    Some(len) => Some(*len),
                    None => self
                        .get(tree, &at)?
                        .map(|v| decode::<Entry>("entry", &v))
                        .transpose()?
                        .map(|e| e.value.len() as u64),
                };
                if let Some(len) = len {
                    self.count(tree, bucket, |c| {
                        c.entries = c.entries.saturating_sub(1);
                        c.bytes = c.bytes.saturating_sub(len);
                    })?;
                }
                self.remove(at);
                self.remove(keys::revision(bucket, *revision));
            }
        }
        Ok(())
    }

    /// Encodes the decoded bucket records and counters into `ops`; before the batch's keys are
    /// read as a whole (pre-images) or applied.
    fn seal(&mut self) -> Result<(), StoreError> {
        for (name, state) in std::mem::take(&mut self.buckets) {
            match state {
                Some(state) => self.put(keys::bucket(&name), encode("bucket", &state)?),
                None => self.remove(keys::bucket(&name)),
            }
        }
        for (name, counters) in std::mem::take(&mut self.counters) {
            match counters {
                Some(c) => self.put(keys::counters(&name), encode("bucket counters", &c)?),
                None => self.remove(keys::counters(&name)),
            }
        }
        Ok(())
    }

    fn into_ops(mut self) -> Result<Ops, StoreError> {
        self.seal()?;
        Ok(self.ops)
    }
}

fn sm_read_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let g = self.read_lock();
        Self::applied_state_inner(&g).map_err(sm_read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<TxnResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = LogEntry> + Send,
        I::IntoIter: Send,
    {
        let started = std::time::Instant::now();
        let mut results = Vec::new();
        let mut events = Vec::new();
        {
            // Every committed entry of this call planned into one batch under the read lock
            // (this task is the only writer: nothing changes the state until the write lock
            // below), then applied at once under the write lock.
            let mut batch = PendingBatch::default();
            let mut last = None;
            {
                let g = self.read_lock();
                for entry in entries {
                    let (result, evs) = Self::plan_entry(&g, &mut batch, &entry)
                        .map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?;
                    events.extend(evs);
                    results.push(result);
                    last = Some(entry.log_id);
                }
            }
            if let Some(last) = last {
                let apply_err = |e: StoreError| StorageIOError::apply(last, AnyError::new(&e));
                batch.put(
                    keys::LAST_APPLIED.to_vec(),
                    encode("last applied log id", &last).map_err(apply_err)?,
                );
                batch.seal().map_err(apply_err)?;
                let ops = batch.into_ops().map_err(apply_err)?;
                let mut g = self.write_lock();
                self.keep_pre_images(&g, &ops);
                g.apply(ops);
            }
        }
        for ev in events {
            // No subscriber is not an error.
            let _ = self.shared.events.send(ev);
        }
        self.handle
            .timings
            .apply
            .observe(started.elapsed().as_secs_f64());
        Ok(results)
    }

    /// Marks the snapshot's cut right here, on openraft's state-machine task, between two
    /// applies; the builder (run in its own task while applies go on) dumps the state at that
    /// cut (see [`StateMachineStore::dump`]).
    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            sm: self.clone(),
            cut: Some(self.mark_cut()),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let receive = || -> Result<tokio::fs::File, StoreError> {
            // openraft receives one snapshot at a time: files of streams it gave up are left.
            for (_, path) in self.receiving().drain() {
                let _ = std::fs::remove_file(path);
            }
            let path = self
                .shared
                .snap_dir
                .join(format!("{}.snap", self.generate_id()?));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(StoreError::Io)?;
            let ino = file.metadata().map_err(StoreError::Io)?.ino();
            self.receiving().insert(ino, path);
            Ok(tokio::fs::File::from_std(file))
        };
        receive()
            .map(Box::new)
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)).into())
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        tracing::info!(snapshot = %meta, "installing snapshot");
        self.install(meta, *snapshot).await.map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)).into()
        })
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let current = || -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
            // Under the read lock: a publish or install replaces the pointer under the write
            // lock and deletes the file it replaced only afterwards.
            let _g = self.read_lock();
            let Some(p) = self.current_pointer()? else {
                return Ok(None);
            };
            let file =
                std::fs::File::open(self.shared.snap_dir.join(&p.file)).map_err(StoreError::Io)?;
            Ok(Some(Snapshot {
                meta: p.meta,
                snapshot: Box::new(tokio::fs::File::from_std(file)),
            }))
        };
        current().map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)).into())
    }
}

async fn dump_blocking(sm: StateMachineStore, cut: Cut) -> Result<Built, StoreError> {
    tokio::task::spawn_blocking(move || sm.dump(cut))
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Corrupt(format!(
                "snapshot build task failed: {e}"
            )))
        })
}

/// Dumps the state at the cut marked when openraft asked for the builder, and publishes it.
pub struct SnapshotBuilder {
    sm: StateMachineStore,
    cut: Option<Result<Cut, StoreError>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // A builder builds once: openraft asks for a new one (a new cut) every time.
        let cut = self
            .cut
            .take()
            .unwrap_or_else(|| Err(StoreError::Corrupt("snapshot builder used twice".into())))
            .map_err(sm_read_err)?;
        let built = dump_blocking(self.sm.clone(), cut)
            .await
            .map_err(sm_read_err)?;
        let Built {
            pointer,
            bytes,
            took,
        } = built;
        let write_err = |e: StoreError| -> StorageError<NodeId> {
            StorageIOError::write_snapshot(Some(pointer.meta.signature()), AnyError::new(&e)).into()
        };
        // Opened before publishing: a newer snapshot may replace (and delete) it meanwhile.
        let file = tokio::fs::File::open(self.sm.shared.snap_dir.join(&pointer.file))
            .await
            .map_err(|e| write_err(StoreError::Io(e)))?;
        self.sm.publish_built(&pointer).await.map_err(write_err)?;
        tracing::info!(
            snapshot = %pointer.meta,
            bytes,
            dump_ms = took.as_millis() as u64,
            "built snapshot"
        );
        Ok(Snapshot {
            meta: pointer.meta,
            snapshot: Box::new(file),
        })
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::kv::BucketConfig;
    use crate::kv::Op;

    fn entry(index: u64, txn: Txn) -> LogEntry {
        openraft::Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(txn),
        }
    }

    /// A database of a release that kept the state machine in a sled tree, from before the
    /// counters (no `c:`, `r:` keys, no marker): the first open writes the tree out as the
    /// current snapshot, with the counters built, equal to what applying keeps; drops the tree;
    /// and a second open loads the same state from that snapshot.
    #[tokio::test]
    async fn a_legacy_sled_tree_is_migrated_to_a_snapshot_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BucketConfig {
            history: 2,
            max_value_size: None,
        };
        let (log, mut sm) = super::super::open(dir.path()).unwrap();
        let txns = [
            Txn::new(vec![Op::create_bucket("a", cfg)], 1),
            Txn::new(vec![Op::put("a", "x", "1"), Op::put("a", "y", "22")], 2),
            Txn::new(vec![Op::put("a", "x", "333"), Op::put("a", "x", "4444")], 3),
            Txn::new(vec![Op::delete("a", "y")], 4),
        ];
        for (i, t) in txns.into_iter().enumerate() {
            sm.apply([entry(i as u64 + 1, t)]).await.unwrap();
        }
        let kept = sm.bucket_info("a").unwrap().unwrap();
        assert_eq!((kept.entries, kept.live_keys, kept.bytes), (4, 1, 9));
        assert_eq!(kept.first_seq, 2);
        let history = sm.history("a", "x").unwrap();

        // The same state as an older release's tree, without the counters.
        {
            let g = sm.read_lock();
            let legacy = sm.handle.db.open_tree(super::super::SM_TREE).unwrap();
            for (k, v) in g.scan_prefix(b"") {
                if ![keys::COUNTERS, keys::REVISIONS, keys::COUNTERS_BUILT]
                    .iter()
                    .any(|p| k.starts_with(p))
                {
                    legacy.insert(k, v.clone()).unwrap();
                }
            }
        }
        sm.flush().await.unwrap();
        assert!(sm.current_pointer().unwrap().is_none());
        drop((log, sm));

        let (log, mut sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(sm.bucket_info("a").unwrap().unwrap(), kept);
        assert_eq!(sm.history("a", "x").unwrap(), history);
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.unwrap().index, 4);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id.unwrap().index, 4);
        assert!(!sm
            .handle
            .db
            .tree_names()
            .iter()
            .any(|n| n.starts_with(super::super::SM_TREE.as_bytes())));
        drop((log, sm, current));

        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(sm.bucket_info("a").unwrap().unwrap(), kept);
        assert_eq!(sm.history("a", "x").unwrap(), history);
    }
}
