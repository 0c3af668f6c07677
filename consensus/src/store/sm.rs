//! The state machine on sled: applies [`Txn`]s with the [`kv`](crate::kv) rules, builds and
//! installs snapshots, publishes [`KvEvent`]s.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
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
use super::DbHandle;
use super::StoreError;
use crate::kv;
use crate::kv::AppliedTxn;
use crate::kv::BucketInfo;
use crate::kv::BucketState;
use crate::kv::Entry;
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
/// Cloning is cheap; clones share the database, the apply lock and the event channel, so a clone
/// kept outside openraft serves local reads.
#[derive(Clone)]
pub struct StateMachineStore {
    handle: Arc<DbHandle>,
    tree: sled::Tree,
    shared: Arc<Shared>,
}

struct Shared {
    /// Writers (apply, install, snapshot persist) take it exclusively; multi-key readers shared,
    /// so a read never observes half of an applied transaction.
    lock: RwLock<()>,
    events: broadcast::Sender<KvEvent>,
}

/// The current snapshot as stored under [`keys::SNAPSHOT`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: Meta,
    #[serde(with = "crate::kv::base64_bytes")]
    data: Vec<u8>,
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

/// Snapshot data: the whole state machine.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    buckets: BTreeMap<String, BucketState>,
    /// Every stored entry (history and tombstones included), in key order.
    entries: Vec<Entry>,
    /// The remembered outcomes of transactions with an id (absent in snapshots built before
    /// ids existed).
    #[serde(default)]
    txns: Vec<AppliedTxn>,
}

impl StateMachineStore {
    pub(crate) fn new(handle: Arc<DbHandle>, tree: sled::Tree) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            handle,
            tree,
            shared: Arc::new(Shared {
                lock: RwLock::new(()),
                events,
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

    /// Subscribes to changes applied from now on.
    /// The storage latency histograms of this replica (log and state machine).
    pub fn timings(&self) -> super::Timings {
        self.handle.timings.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<KvEvent> {
        self.shared.events.subscribe()
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, ()> {
        // The lock guards no data, so a poisoned lock is still usable.
        self.shared.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, ()> {
        self.shared.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    fn view(&self) -> SledView<'_> {
        SledView {
            tree: &self.tree,
            pending: None,
        }
    }

    /// The committed state as `pending` will leave it (reads see its writes first).
    fn view_with<'a>(&'a self, pending: &'a PendingBatch) -> SledView<'a> {
        SledView {
            tree: &self.tree,
            pending: Some(pending),
        }
    }

    // ---- local reads (not linearizable by themselves) ----

    /// The key's latest entry, tombstones included.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        let _g = self.read_lock();
        self.view().latest(bucket, key)
    }

    /// Latest entry per key, live keys only, sorted by key.
    pub fn list(&self, bucket: &str) -> Result<Vec<Entry>, StoreError> {
        let _g = self.read_lock();
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(keys::latest_prefix(bucket)) {
            let (_, v) = item?;
            let e: Entry = decode("entry", &v)?;
            if !e.is_tombstone() {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Latest entry of every key of a bucket, tombstones included, sorted by key.
    pub fn list_all(&self, bucket: &str) -> Result<Vec<Entry>, StoreError> {
        let _g = self.read_lock();
        self.tree
            .scan_prefix(keys::latest_prefix(bucket))
            .map(|item| decode("entry", &item?.1))
            .collect()
    }

    /// Stored entries of a key, oldest first.
    pub fn history(&self, bucket: &str, key: &str) -> Result<Vec<Entry>, StoreError> {
        let _g = self.read_lock();
        self.tree
            .scan_prefix(keys::history_prefix(bucket, key))
            .map(|item| decode("entry", &item?.1))
            .collect()
    }

    /// Names of all buckets, sorted.
    pub fn buckets(&self) -> Result<Vec<String>, StoreError> {
        let _g = self.read_lock();
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(keys::BUCKETS) {
            let (k, _) = item?;
            let name = keys::bucket_name(&k)
                .ok_or_else(|| StoreError::Corrupt("bucket key is not UTF-8".into()))?;
            out.push(name.to_string());
        }
        Ok(out)
    }

    /// Bucket statistics; scans the bucket, so cost is linear in its stored entries.
    /// Whether `bucket` exists: one lookup ([`Self::bucket_info`] counts every entry).
    pub fn has_bucket(&self, bucket: &str) -> Result<bool, StoreError> {
        let _g = self.read_lock();
        Ok(self.view().bucket(bucket)?.is_some())
    }

    /// Bucket statistics: the bucket record, its counters and its first stored revision, three
    /// lookups whatever the bucket's size.
    pub fn bucket_info(&self, bucket: &str) -> Result<Option<BucketInfo>, StoreError> {
        let _g = self.read_lock();
        let Some(state) = self.view().bucket(bucket)? else {
            return Ok(None);
        };
        let counters: BucketCounters = self
            .tree
            .get(keys::counters(bucket))?
            .map(|v| decode("bucket counters", &v))
            .transpose()?
            .unwrap_or_default();
        let first = match self
            .tree
            .scan_prefix(keys::revisions_prefix(bucket))
            .keys()
            .next()
        {
            Some(k) => Some(
                keys::history_revision(&k?)
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

    /// Builds the bucket counters and revision index of a database written before they existed
    /// (one scan, once: afterwards every apply keeps them).
    pub(crate) fn build_counters_if_missing(&self) -> Result<(), StoreError> {
        let _g = self.write_lock();
        if self.tree.contains_key(keys::COUNTERS_BUILT)? {
            return Ok(());
        }
        let mut batch = PendingBatch::default();
        for prefix in [keys::COUNTERS, keys::REVISIONS] {
            for k in self.tree.scan_prefix(prefix).keys() {
                batch.remove(k?.to_vec());
            }
        }
        for item in self.tree.scan_prefix(keys::BUCKETS) {
            let (k, _) = item?;
            let name = keys::bucket_name(&k)
                .ok_or_else(|| StoreError::Corrupt("bucket key is not UTF-8".into()))?;
            let stored = self
                .tree
                .scan_prefix(keys::history_bucket_prefix(name))
                .values()
                .map(|v| decode::<Entry>("entry", &v?))
                .collect::<Result<Vec<_>, _>>()?;
            let latest = self
                .tree
                .scan_prefix(keys::latest_prefix(name))
                .values()
                .map(|v| decode::<Entry>("entry", &v?))
                .collect::<Result<Vec<_>, _>>()?;
            for e in &stored {
                batch.put(keys::revision(name, e.revision), Vec::new());
            }
            let counters = BucketCounters::of(stored.iter(), latest.iter());
            batch.put(keys::counters(name), encode("bucket counters", &counters)?);
        }
        batch.put(keys::COUNTERS_BUILT.to_vec(), Vec::new());
        self.tree.apply_batch(batch.into_batch())?;
        Ok(())
    }

    // ---- apply ----

    fn applied_state_inner(&self) -> Result<(Option<LogId<NodeId>>, Membership), StoreError> {
        let last_applied = self
            .tree
            .get(keys::LAST_APPLIED)?
            .map(|v| decode("last applied log id", &v))
            .transpose()?;
        let membership = self
            .tree
            .get(keys::LAST_MEMBERSHIP)?
            .map(|v| decode("last membership", &v))
            .transpose()?
            .unwrap_or_default();
        Ok((last_applied, membership))
    }

    /// Adds one log entry's writes to `batch` (which holds the writes of the entries before it
    /// in the same apply call, not yet in the tree: reads see them first); returns the result
    /// and the events to publish once the batch is applied.
    fn plan_entry(
        &self,
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
                self.plan_group(batch, entry, &group.group)?
            }
            EntryPayload::Normal(txn) => {
                let plan = kv::plan(&self.view_with(batch), txn)?;
                if plan.duplicate {
                    tracing::info!(
                        log_id = %entry.log_id,
                        txn_id = txn.id.as_deref().unwrap_or_default(),
                        "transaction already applied: answering its first outcome"
                    );
                }
                batch.plan(&self.tree, &plan)?;
                (plan.result, plan.events)
            }
        };
        batch.put(
            keys::LAST_APPLIED.to_vec(),
            encode("last applied log id", &entry.log_id)?,
        );
        Ok(out)
    }

    /// Adds a group entry's members to `batch`, in order: each member is planned against the
    /// state its predecessors leave (a rejected member adds nothing). The whole apply call is
    /// one atomic sled batch, so a crash leaves either none or all of the group, with
    /// `last_applied`; a replay after a snapshot or a re-apply answers each member's first
    /// outcome (remembered by id) and changes nothing.
    fn plan_group(
        &self,
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
            let plan = kv::plan(&self.view_with(batch), txn)?;
            batch.plan(&self.tree, &plan)?;
            events.extend(plan.events);
        }
        Ok((TxnResult::Applied { revisions: vec![] }, events))
    }

    /// The remembered outcome of the transaction with idempotency key `id`.
    pub fn applied_txn(&self, id: &str) -> Result<Option<AppliedTxn>, StoreError> {
        let _g = self.read_lock();
        self.view().applied_txn(id)
    }

    // ---- snapshots ----

    fn capture(&self) -> Result<Captured, StoreError> {
        let _g = self.read_lock();
        let (last_applied, last_membership) = self.applied_state_inner()?;
        let mut buckets = BTreeMap::new();
        for item in self.tree.scan_prefix(keys::BUCKETS) {
            let (k, v) = item?;
            let name = keys::bucket_name(&k)
                .ok_or_else(|| StoreError::Corrupt("bucket key is not UTF-8".into()))?;
            buckets.insert(name.to_string(), decode("bucket", &v)?);
        }
        let entries = self
            .tree
            .scan_prefix(keys::HISTORY)
            .map(|item| decode("entry", &item?.1))
            .collect::<Result<Vec<Entry>, _>>()?;
        let txns = self
            .tree
            .scan_prefix(keys::TXNS)
            .map(|item| decode("applied txn", &item?.1))
            .collect::<Result<Vec<AppliedTxn>, _>>()?;
        let payload = SnapshotPayload {
            last_applied,
            last_membership,
            buckets,
            entries,
            txns,
        };
        let data = encode("snapshot", &payload)?;
        Ok(Captured {
            last_applied: payload.last_applied,
            last_membership: payload.last_membership,
            data,
        })
    }

    fn current_snapshot(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        self.tree
            .get(keys::SNAPSHOT)?
            .map(|v| decode("snapshot", &v))
            .transpose()
    }

    /// Stores a freshly built snapshot unless a newer one (e.g. installed meanwhile) is there.
    async fn persist_built(&self, snap: &StoredSnapshot) -> Result<(), StoreError> {
        {
            let _g = self.write_lock();
            let newer_exists = self
                .current_snapshot()?
                .is_some_and(|cur| cur.meta.last_log_id > snap.meta.last_log_id);
            if !newer_exists {
                self.tree
                    .insert(keys::SNAPSHOT, encode("snapshot", snap)?)?;
            }
        }
        self.flush().await
    }

    async fn install(&self, meta: &Meta, data: Vec<u8>) -> Result<(), StoreError> {
        let payload: SnapshotPayload = decode("snapshot", &data)?;
        {
            let _g = self.write_lock();
            let mut batch = PendingBatch::default();
            for item in self.tree.iter() {
                batch.remove(item?.0.to_vec());
            }
            for (name, state) in &payload.buckets {
                batch.put(keys::bucket(name), encode("bucket", state)?);
            }
            let mut latest: BTreeMap<(&str, &str), &Entry> = BTreeMap::new();
            for e in &payload.entries {
                batch.put(
                    keys::history(&e.bucket, &e.key, e.revision),
                    encode("entry", e)?,
                );
                let slot = latest.entry((&e.bucket, &e.key)).or_insert(e);
                if e.revision > slot.revision {
                    *slot = e;
                }
            }
            for e in &payload.entries {
                batch.put(keys::revision(&e.bucket, e.revision), Vec::new());
            }
            for name in payload.buckets.keys() {
                let counters = BucketCounters::of(
                    payload.entries.iter().filter(|e| &e.bucket == name),
                    latest
                        .iter()
                        .filter(|((b, _), _)| b == name)
                        .map(|(_, e)| *e),
                );
                batch.put(keys::counters(name), encode("bucket counters", &counters)?);
            }
            batch.put(keys::COUNTERS_BUILT.to_vec(), Vec::new());
            for ((bucket, key), e) in latest {
                batch.put(keys::latest(bucket, key), encode("entry", e)?);
            }
            for t in &payload.txns {
                batch.remember(t)?;
            }
            // The meta is authoritative for the log position of the snapshot.
            if let Some(last) = &meta.last_log_id {
                batch.put(
                    keys::LAST_APPLIED.to_vec(),
                    encode("last applied log id", last)?,
                );
            }
            batch.put(
                keys::LAST_MEMBERSHIP.to_vec(),
                encode("last membership", &meta.last_membership)?,
            );
            let stored = StoredSnapshot {
                meta: meta.clone(),
                data,
            };
            batch.put(keys::SNAPSHOT.to_vec(), encode("snapshot", &stored)?);
            self.tree.apply_batch(batch.into_batch())?;
        }
        self.flush().await?;
        let _ = self.shared.events.send(KvEvent::Reset);
        Ok(())
    }
}

/// Reads the committed state for [`kv::plan`], seen through the writes pending in a batch of
/// the same apply call (they win over the tree).
struct SledView<'a> {
    tree: &'a sled::Tree,
    pending: Option<&'a PendingBatch>,
}

impl SledView<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        if let Some(v) = self.pending.and_then(|p| p.ops.get(key)) {
            return Ok(v.as_deref().map(sled::IVec::from));
        }
        Ok(self.tree.get(key)?)
    }

    /// Keys in `[start, end)` (`end = None`: every key with prefix `start`), in order.
    fn keys(&self, start: &[u8], end: Option<&[u8]>) -> Result<Vec<Vec<u8>>, StoreError> {
        let in_range = |k: &[u8]| match end {
            Some(end) => k < end,
            None => k.starts_with(start),
        };
        let mut out: std::collections::BTreeSet<Vec<u8>> = match end {
            Some(end) => self.tree.range(start..end).keys(),
            None => self.tree.scan_prefix(start).keys(),
        }
        .map(|k| k.map(|k| k.to_vec()))
        .collect::<Result<_, _>>()?;
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

impl KvView for SledView<'_> {
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
        self.get(&keys::bucket(bucket))?
            .map(|v| decode("bucket", &v))
            .transpose()
    }

    fn latest(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        self.get(&keys::latest(bucket, key))?
            .map(|v| decode("entry", &v))
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
#[derive(Default)]
struct PendingBatch {
    ops: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl PendingBatch {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.ops.insert(key, None);
    }

    /// Removes every key with `prefix`, both in the tree and pending in this batch.
    fn remove_prefix(&mut self, tree: &sled::Tree, prefix: &[u8]) -> Result<(), StoreError> {
        for k in self
            .ops
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect::<Vec<_>>()
        {
            self.ops.insert(k, None);
        }
        for k in tree.scan_prefix(prefix).keys() {
            self.ops.insert(k?.to_vec(), None);
        }
        Ok(())
    }

    /// Adds a plan's writes: its mutations, the remembered ids it forgets, its own outcome.
    fn plan(&mut self, tree: &sled::Tree, plan: &kv::Plan) -> Result<(), StoreError> {
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
        self.put(keys::txn_time(t.now_ms, &t.id), Vec::new());
        Ok(())
    }

    /// `key`'s value as this batch leaves it.
    fn get(&self, tree: &sled::Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.ops.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Changes a bucket's counters as this batch leaves them.
    fn count(
        &mut self,
        tree: &sled::Tree,
        bucket: &str,
        change: impl FnOnce(&mut BucketCounters),
    ) -> Result<(), StoreError> {
        let key = keys::counters(bucket);
        let mut c: BucketCounters = self
            .get(tree, &key)?
            .map(|v| decode("bucket counters", &v))
            .transpose()?
            .unwrap_or_default();
        change(&mut c);
        self.put(key, encode("bucket counters", &c)?);
        Ok(())
    }

    fn execute(&mut self, tree: &sled::Tree, m: &Mutation) -> Result<(), StoreError> {
        match m {
            Mutation::PutBucket { bucket, state } => {
                self.put(keys::bucket(bucket), encode("bucket", state)?);
                if self.get(tree, &keys::counters(bucket))?.is_none() {
                    self.count(tree, bucket, |_| {})?;
                }
            }
            Mutation::RemoveBucket { bucket } => {
                self.remove(keys::bucket(bucket));
                self.remove(keys::counters(bucket));
                self.remove_prefix(tree, &keys::latest_prefix(bucket))?;
                self.remove_prefix(tree, &keys::history_bucket_prefix(bucket))?;
                self.remove_prefix(tree, &keys::revisions_prefix(bucket))?;
            }
            Mutation::PutEntry(e) => {
                let was_live = self
                    .get(tree, &keys::latest(&e.bucket, &e.key))?
                    .map(|v| decode::<Entry>("entry", &v))
                    .transpose()?
                    .is_some_and(|prev| prev.is_live());
                let bytes = encode("entry", e)?;
                self.put(keys::history(&e.bucket, &e.key, e.revision), bytes.clone());
                self.put(keys::latest(&e.bucket, &e.key), bytes);
                self.put(keys::revision(&e.bucket, e.revision), Vec::new());
                let (len, live) = (e.value.len() as u64, e.is_live());
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
            } => {
                let at = keys::history(bucket, key, *revision);
                if let Some(v) = self.get(tree, &at)? {
                    let len = decode::<Entry>("entry", &v)?.value.len() as u64;
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

    fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in self.ops {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }
}

fn sm_read_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}

fn sm_write_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let _g = self.read_lock();
        self.applied_state_inner().map_err(sm_read_err)
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
            // Every committed entry of this call in one sled batch, under one write lock.
            let _g = self.write_lock();
            let mut batch = PendingBatch::default();
            let mut last = None;
            for entry in entries {
                let (result, evs) = self
                    .plan_entry(&mut batch, &entry)
                    .map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?;
                events.extend(evs);
                results.push(result);
                last = Some(entry.log_id);
            }
            if let Some(last) = last {
                self.tree
                    .apply_batch(batch.into_batch())
                    .map_err(|e| StorageIOError::apply(last, AnyError::new(&e)))?;
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

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            sm: self.clone(),
            captured: Some(self.capture()),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        tracing::info!(snapshot = %meta, "installing snapshot");
        self.install(meta, snapshot.into_inner())
            .await
            .map_err(|e| {
                StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)).into()
            })
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let cur = {
            let _g = self.read_lock();
            self.current_snapshot()
        }
        .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        Ok(cur.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// Builds a snapshot from the state captured when openraft asked for the builder, so the
/// snapshot is consistent even though applies continue while it is being written.
pub struct SnapshotBuilder {
    sm: StateMachineStore,
    captured: Option<Result<Captured, StoreError>>,
}

/// The state captured for a snapshot: its log position and the serialized payload.
struct Captured {
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    data: Vec<u8>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let captured = match self.captured.take() {
            Some(c) => c,
            None => self.sm.capture(),
        };
        let Captured {
            last_applied,
            last_membership,
            data,
        } = captured.map_err(sm_read_err)?;
        let id = self
            .sm
            .handle
            .db
            .generate_id()
            .map_err(|e| sm_write_err(e.into()))?;
        let snapshot_id = match &last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, id),
            None => format!("none-{id}"),
        };
        let meta = Meta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot { meta, data };
        self.sm.persist_built(&stored).await.map_err(|e| {
            StorageIOError::write_snapshot(Some(stored.meta.signature()), AnyError::new(&e))
        })?;
        tracing::info!(snapshot = %stored.meta, bytes = stored.data.len(), "built snapshot");
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
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

    /// A database from before the counters (no `c:`, `r:` keys, no marker) gets them built at
    /// open, equal to what applying keeps.
    #[tokio::test]
    async fn counters_missing_from_an_older_database_are_built_at_open() {
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

        for prefix in [keys::COUNTERS, keys::REVISIONS] {
            for k in sm.tree.scan_prefix(prefix).keys() {
                sm.tree.remove(k.unwrap()).unwrap();
            }
        }
        sm.tree.remove(keys::COUNTERS_BUILT).unwrap();
        sm.flush().await.unwrap();
        drop((log, sm));

        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(sm.bucket_info("a").unwrap().unwrap(), kept);
    }
}
