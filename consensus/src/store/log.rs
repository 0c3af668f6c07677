//! The Raft log (segment files, `store/wal.rs`) and its vote, committed and purge points (sled).

use std::fmt::Debug;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;

use openraft::storage::LogFlushed;
use openraft::storage::RaftLogStorage;
use openraft::AnyError;
use openraft::LogId;
use openraft::LogState;
use openraft::RaftLogReader;
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::Vote;

use super::decode;
use super::encode;
use super::wal::Wal;
use super::DbHandle;
use super::StoreError;
use crate::NodeId;
use crate::TypeConfig;

type LogEntry = openraft::Entry<TypeConfig>;

const VOTE: &[u8] = b"vote";
const LAST_PURGED: &[u8] = b"last_purged";
const COMMITTED: &[u8] = b"committed";

/// Raft log storage: entries (in segment files), vote, last purged log id and committed log id
/// (in sled).
///
/// Cloning is cheap; clones share the files and database (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    handle: Arc<DbHandle>,
    meta: sled::Tree,
    wal: Arc<Mutex<Wal>>,
    syncer: Arc<SyncerHandle>,
    tail: Arc<Mutex<Tail>>,
    /// This node's Raft id, once known ([`LogStore::set_node_id`]): entries another node's
    /// leadership made are a follower's, whose sync may run inline.
    me: Arc<std::sync::OnceLock<NodeId>>,
}

/// Entries kept decoded in [`Tail`] at most, and their encoded bytes at most.
const TAIL_ENTRIES: usize = 4096;
const TAIL_BYTES: usize = 8 << 20;

/// The newest log entries, decoded, exactly as they are in the segment files: a contiguous run
/// of indexes ending at the last appended entry. A leader's replication streams and every
/// node's apply read the entries just appended; from here that is a clone, not a file read and
/// a JSON decode per entry and per reader.
///
/// Invariant: every entry held here is the entry the files hold at its index. `append` adds
/// after writing the files, `truncate` and `purge` drop before changing them; a read the tail
/// does not wholly cover goes to the files.
#[derive(Default)]
struct Tail {
    entries: std::collections::VecDeque<(LogEntry, usize)>,
    bytes: usize,
}

impl Tail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: LogEntry, size: usize) {
        if self
            .last_index()
            .is_some_and(|last| last.checked_add(1) != Some(entry.log_id.index))
        {
            // Not contiguous (never from openraft, which truncates first): start over.
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.entries.len() > TAIL_ENTRIES || self.bytes > TAIL_BYTES {
            match self.entries.pop_front() {
                Some((_, size)) => self.bytes -= size,
                None => break,
            }
        }
    }

    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.entries.back().map(|(e, _)| e.log_id)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops the entries at and after `index`.
    fn truncate(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops the entries at and before `index`.
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// The entries `[start, end)`, if the tail holds every one of them.
    fn get(&self, start: u64, end: u64) -> Option<Vec<LogEntry>> {
        let (first, last) = (self.first_index()?, self.last_index()?);
        if start < first || end > last.checked_add(1)? {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end.max(start) - first).ok()?;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// A sync's completion: told whether the writes before it are durable.
type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Group commit of the log's syncs, on a thread of its own: an append, once its records are in
/// the files, queues what to do when they are durable; the thread takes everything queued,
/// syncs the active segment once (a sync covers every write made before it started, and a
/// segment is synced before the next one is started), and completes all of it. Appends that
/// arrive while one sync runs thus share the next one. A thread rather than a task per append:
/// the sync is one handoff from the appender, with no async task and blocking-pool thread in
/// between, which a follower pays on every AppendEntries it answers.
///
/// A follower's append that finds nothing queued or syncing is synced on the caller's thread
/// instead ([`Syncer::try_inline`]): its core waits for that sync before it answers the
/// leader anyway, and two thread wake-ups (to the syncer and back) cost more than the
/// handoff saves.
struct Syncer {
    queue: Mutex<SyncQueue>,
    ready: std::sync::Condvar,
    wal: Arc<Mutex<Wal>>,
    fsync: prometheus_client::metrics::histogram::Histogram,
}

#[derive(Default)]
struct SyncQueue {
    waiting: Vec<Done>,
    /// A sync and its completions are running (on the thread or inline). Completions run in
    /// the order their writes were made: one sync with its completions at a time.
    busy: bool,
    closed: bool,
}

impl Syncer {
    fn queue(&self) -> MutexGuard<'_, SyncQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&self, done: Done) {
        self.queue().waiting.push(done);
        self.ready.notify_one();
    }

    /// Syncs the active segment: every write made before this call is durable when it
    /// returns `Ok`.
    fn sync(&self) -> Result<(), String> {
        let started = std::time::Instant::now();
        let active = self.wal.lock().unwrap_or_else(|e| e.into_inner()).active();
        let res = match active {
            Some(file) => file.sync_data().map_err(|e| e.to_string()),
            None => Ok(()),
        };
        self.fsync.observe(started.elapsed().as_secs_f64());
        res
    }

    /// Syncs and completes `done` on the caller's thread when no sync is queued or running;
    /// gives `done` back otherwise (queue it: it must complete after those).
    fn try_inline(&self, done: Done) -> Option<Done> {
        {
            let mut q = self.queue();
            if q.busy || q.closed || !q.waiting.is_empty() {
                return Some(done);
            }
            q.busy = true;
        }
        done(self.sync());
        let mut q = self.queue();
        q.busy = false;
        if !q.waiting.is_empty() || q.closed {
            self.ready.notify_one();
        }
        None
    }

    /// The thread's loop: until closed and drained.
    fn run(&self) {
        loop {
            let waiting = {
                let mut q = self.queue();
                while q.busy || (q.waiting.is_empty() && !q.closed) {
                    q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                if q.waiting.is_empty() {
                    return;
                }
                q.busy = true;
                std::mem::take(&mut q.waiting)
            };
            // Synced after the queue was taken: every write whose completion was queued is in
            // the active file, or in one synced when the next segment was started.
            let res = self.sync();
            for done in waiting {
                done(res.clone());
            }
            self.queue().busy = false;
        }
    }
}

/// Owns the [`Syncer`]'s thread: dropping the last clone of the log store closes the queue and
/// waits for the thread, which completes what was queued first.
struct SyncerHandle {
    syncer: Arc<Syncer>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SyncerHandle {
    fn start(
        wal: Arc<Mutex<Wal>>,
        fsync: prometheus_client::metrics::histogram::Histogram,
    ) -> Result<Self, StoreError> {
        let syncer = Arc::new(Syncer {
            queue: Mutex::default(),
            ready: std::sync::Condvar::new(),
            wal,
            fsync,
        });
        let s = syncer.clone();
        let thread = std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || s.run())?;
        Ok(SyncerHandle {
            syncer,
            thread: Some(thread),
        })
    }
}

impl Drop for SyncerHandle {
    fn drop(&mut self) {
        self.syncer.queue().closed = true;
        self.syncer.ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the segment files live, inside the database directory.
pub(crate) const WAL_DIR: &str = "raft-wal";

impl LogStore {
    /// Opens the log in `dir`'s [`WAL_DIR`]. A log an older release kept in sled's `legacy`
    /// tree is first copied into the files (synced), then the tree is dropped; a copy a crash
    /// interrupted is started over, since the tree goes only once the copy is whole.
    pub(crate) fn open(
        handle: Arc<DbHandle>,
        dir: &Path,
        meta: sled::Tree,
        legacy: Option<sled::Tree>,
    ) -> Result<Self, StoreError> {
        let last_purged: Option<LogId<NodeId>> = meta
            .get(LAST_PURGED)?
            .map(|v| decode("last purged log id", &v))
            .transpose()?;
        let floor = last_purged.map_or(0, |p| p.index.saturating_add(1));
        let mut wal = Wal::open(&dir.join(WAL_DIR), super::wal::SEGMENT_BYTES, floor)?;
        if let Some(tree) = legacy {
            wal.clear()?;
            let mut batch: Vec<(u64, sled::IVec)> = Vec::new();
            for item in tree.range(floor.to_be_bytes()..) {
                let (k, v) = item?;
                batch.push((index_of(&k)?, v));
                if batch.len() == 1024 {
                    wal.append(batch.iter().map(|(i, v)| (*i, v.as_ref())))?;
                    batch.clear();
                }
            }
            wal.append(batch.iter().map(|(i, v)| (*i, v.as_ref())))?;
            if let Some(file) = wal.active() {
                file.sync_data()?;
            }
            let name = tree.name();
            drop(tree);
            handle.db.drop_tree(name)?;
            handle.db.flush()?;
        }
        let wal = Arc::new(Mutex::new(wal));
        let syncer = Arc::new(SyncerHandle::start(
            wal.clone(),
            handle.timings.fsync.clone(),
        )?);
        Ok(Self {
            handle,
            meta,
            wal,
            syncer,
            tail: Arc::default(),
            me: Arc::default(),
        })
    }

    /// Tells the log which Raft node it belongs to (once; later calls change nothing). Until
    /// then every sync runs on the syncer's thread.
    pub(crate) fn set_node_id(&self, id: NodeId) {
        let _ = self.me.set(id);
    }

    fn wal(&self) -> MutexGuard<'_, Wal> {
        // A failed write leaves the files as open would find them: a poisoned guard is usable.
        self.wal.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        // Every change to the tail completes before its guard drops: a poisoned one is whole.
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the vote, committed and purge points written so far durable.
    async fn flush_meta(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        self.handle.db.flush_async().await?;
        self.handle
            .timings
            .fsync
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        self.meta.get(key)?.map(|v| decode(what, &v)).transpose()
    }

    fn last_purged(&self) -> Result<Option<LogId<NodeId>>, StoreError> {
        self.read_meta(LAST_PURGED, "last purged log id")
    }

    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, StoreError> {
        if let Some(id) = self.tail().last_log_id() {
            return Ok(Some(id));
        }
        let wal = self.wal();
        let Some(last) = wal.last_index() else {
            return Ok(None);
        };
        let bytes = wal.read_any(last)?;
        drop(wal);
        Ok(Some(decode::<LogEntry>("log entry", &bytes)?.log_id))
    }

    fn entries(&self, start: u64, end: Option<u64>) -> Result<Vec<LogEntry>, StoreError> {
        if let Some(end) = end {
            if let Some(hit) = self.tail().get(start, end) {
                return Ok(hit);
            }
        }
        let payloads = {
            let wal = self.wal();
            let Some((_, last)) = wal.bounds() else {
                return Ok(Vec::new());
            };
            let end = end.map_or(last + 1, |end| end.min(last + 1));
            wal.read(start, end)?
        };
        payloads
            .iter()
            .map(|p| decode::<LogEntry>("log entry", p))
            .collect()
    }
}

fn index_of(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("log key of {} bytes, expected 8", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

fn read_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<LogEntry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(&n) => n,
            Bound::Excluded(&n) => match n.checked_add(1) {
                Some(n) => n,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&n) => n.checked_add(1),
            Bound::Excluded(&n) => Some(n),
            Bound::Unbounded => None,
        };
        self.entries(start, end).map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id = self.last_purged().map_err(read_err)?;
        let last_log_id = match self.last_log_id().map_err(read_err)? {
            Some(id) if last_purged_log_id.is_none_or(|p| id.index > p.index) => Some(id),
            _ => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let res: Result<(), StoreError> = async {
            self.meta.insert(VOTE, encode("vote", vote)?)?;
            self.flush_meta().await
        }
        .await;
        res.map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.read_meta(VOTE, "vote")
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    /// Persisted without a flush: a committed id lost in a crash only makes Raft re-learn it.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let res: Result<(), StoreError> = (|| {
            match &committed {
                Some(c) => self.meta.insert(COMMITTED, encode("committed", c)?)?,
                None => self.meta.remove(COMMITTED)?,
            };
            Ok(())
        })();
        res.map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        self.read_meta(COMMITTED, "committed log id")
            .map_err(read_err)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = LogEntry> + Send,
        I::IntoIter: Send,
    {
        let started = std::time::Instant::now();
        let mut encoded = Vec::new();
        let mut leader = None;
        for entry in entries {
            leader = Some(entry.log_id.leader_id.node_id);
            let bytes = encode("log entry", &entry).map_err(write_err)?;
            encoded.push((entry, bytes));
        }
        {
            let mut wal = self.wal();
            wal.append(encoded.iter().map(|(e, b)| (e.log_id.index, b.as_slice())))
                .map_err(write_err)?;
        }
        {
            let mut tail = self.tail();
            for (entry, bytes) in encoded {
                tail.push(entry, bytes.len());
            }
        }
        // The entries are readable now (a leader's replication streams send them from here), but
        // durable only once synced; only then is Raft told, through the callback, and only then
        // may it count this node's ack. A leader's sync runs on the syncer's thread: its core
        // goes on to send the entries (our openraft patch, `consensus/vendor/README.md`).
        // A follower's core waits for the callback before it answers, so its sync runs right
        // here when none is queued or running. Appends that overlap share one sync.
        let append = self.handle.timings.append.clone();
        let done: Done = Box::new(move |res| match res {
            Ok(()) => {
                append.observe(started.elapsed().as_secs_f64());
                callback.log_io_completed(Ok(()));
            }
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e))),
        });
        let follower = matches!((leader, self.me.get()), (Some(l), Some(me)) if l != *me);
        let queued = match follower {
            true => self.syncer.syncer.try_inline(done),
            false => Some(done),
        };
        if let Some(done) = queued {
            self.syncer.syncer.submit(done);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.tail().truncate(log_id.index);
        self.wal().truncate(log_id.index).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let res: Result<(), StoreError> = async {
            // Record the purge point first: a crash in between leaves extra entries below it,
            // which are never read (the log starts after `last_purged`), never a hole.
            self.tail().purge(log_id.index);
            self.meta
                .insert(LAST_PURGED, encode("last purged log id", &log_id)?)?;
            self.flush_meta().await?;
            self.wal().purge(log_id.index)
        }
        .await;
        res.map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;
    use openraft::EntryPayload;

    use super::*;

    fn entry(index: u64) -> LogEntry {
        openraft::Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(entries: Option<Vec<LogEntry>>) -> Option<Vec<u64>> {
        entries.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn tail_answers_only_ranges_it_wholly_holds() {
        let mut t = Tail::default();
        assert_eq!(indexes(t.get(0, 1)), None);
        for i in 5..10 {
            t.push(entry(i), 10);
        }
        assert_eq!(indexes(t.get(5, 10)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(t.get(7, 9)), Some(vec![7, 8]));
        assert_eq!(indexes(t.get(7, 7)), Some(vec![]));
        assert_eq!(indexes(t.get(4, 6)), None, "starts before the tail");
        assert_eq!(indexes(t.get(8, 11)), None, "ends after the last entry");

        t.truncate(8);
        assert_eq!(indexes(t.get(5, 8)), Some(vec![5, 6, 7]));
        assert_eq!(indexes(t.get(5, 9)), None);
        t.purge(5);
        assert_eq!(indexes(t.get(5, 6)), None);
        assert_eq!(indexes(t.get(6, 8)), Some(vec![6, 7]));
        assert_eq!(t.bytes, 20);

        // A gap starts the tail over instead of holding a hole.
        t.push(entry(12), 10);
        assert_eq!(indexes(t.get(6, 8)), None);
        assert_eq!(indexes(t.get(12, 13)), Some(vec![12]));
        assert_eq!(t.bytes, 10);
    }

    #[test]
    fn tail_keeps_the_newest_within_its_budget() {
        let mut t = Tail::default();
        for i in 1..=(TAIL_ENTRIES as u64 + 10) {
            t.push(entry(i), 1);
        }
        assert_eq!(t.entries.len(), TAIL_ENTRIES);
        assert_eq!(t.first_index(), Some(11));
        t.push(entry(TAIL_ENTRIES as u64 + 11), TAIL_BYTES);
        assert_eq!(t.entries.len(), 1, "one big entry evicts the rest");
        assert_eq!(t.bytes, TAIL_BYTES);
    }

    /// Writes a log the way releases before the segment files did: JSON entries in sled's
    /// `raft_log` tree under big-endian indexes, the purge point in `raft_meta`.
    fn legacy_log(dir: &Path, entries: std::ops::RangeInclusive<u64>, purged: Option<u64>) {
        let db = sled::open(dir).unwrap();
        let log = db.open_tree(super::super::LOG_TREE).unwrap();
        for i in entries {
            log.insert(i.to_be_bytes(), encode("log entry", &entry(i)).unwrap())
                .unwrap();
        }
        let meta = db.open_tree(super::super::META_TREE).unwrap();
        if let Some(p) = purged {
            let id = LogId::new(CommittedLeaderId::new(1, 1), p);
            meta.insert(LAST_PURGED, encode("last purged", &id).unwrap())
                .unwrap();
        }
        meta.insert(VOTE, encode("vote", &Vote::new(2, 1)).unwrap())
            .unwrap();
        db.flush().unwrap();
    }

    /// An empty log in a temporary directory and its syncer thread.
    fn syncer_on_a_fresh_log() -> (tempfile::TempDir, Arc<Mutex<Wal>>, SyncerHandle) {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), super::super::wal::SEGMENT_BYTES, 0).unwrap();
        let wal = Arc::new(Mutex::new(wal));
        let fsync = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 4),
        );
        let syncer = SyncerHandle::start(wal.clone(), fsync).unwrap();
        (dir, wal, syncer)
    }

    #[test]
    fn the_syncer_completes_every_append_once_in_order_also_when_closed() {
        let (_dir, wal, syncer) = syncer_on_a_fresh_log();
        let done = Arc::new(Mutex::new(Vec::new()));
        for i in 1..=200u64 {
            wal.lock().unwrap().append([(i, b"x".as_slice())]).unwrap();
            let done = done.clone();
            syncer.syncer.submit(Box::new(move |res| {
                assert_eq!(res, Ok(()));
                done.lock().unwrap().push(i);
            }));
        }
        // Dropped with completions still queued: the thread syncs and completes them first.
        drop(syncer);
        assert_eq!(*done.lock().unwrap(), (1..=200).collect::<Vec<_>>());
    }

    #[test]
    fn an_inline_sync_runs_only_when_nothing_is_queued_and_keeps_the_order() {
        let (_dir, wal, syncer) = syncer_on_a_fresh_log();
        let done = Arc::new(Mutex::new(Vec::new()));
        let completion = |i: u64| -> Done {
            let done = done.clone();
            Box::new(move |res| {
                assert_eq!(res, Ok(()));
                done.lock().unwrap().push(i);
            })
        };
        // Idle: synced and completed before `try_inline` returns, on this thread.
        wal.lock().unwrap().append([(1, b"x".as_slice())]).unwrap();
        assert!(syncer.syncer.try_inline(completion(1)).is_none());
        assert_eq!(*done.lock().unwrap(), vec![1]);
        // Something queued: handed back, to be queued behind it.
        {
            let mut q = syncer.syncer.queue();
            q.busy = true; // hold the thread off while we queue
        }
        wal.lock().unwrap().append([(2, b"x".as_slice())]).unwrap();
        syncer.syncer.submit(completion(2));
        wal.lock().unwrap().append([(3, b"x".as_slice())]).unwrap();
        let back = syncer.syncer.try_inline(completion(3));
        assert!(back.is_some(), "a busy syncer must not be bypassed");
        syncer.syncer.submit(back.unwrap());
        {
            let mut q = syncer.syncer.queue();
            q.busy = false;
            assert_eq!(q.waiting.len(), 2);
        }
        syncer.syncer.ready.notify_one();
        drop(syncer);
        assert_eq!(*done.lock().unwrap(), vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_sled_log_of_an_older_release_moves_into_the_segment_files() {
        let dir = tempfile::tempdir().unwrap();
        // Entries 1..=3 are at or below the purge point (a crash left them): not copied.
        legacy_log(dir.path(), 1..=3000, Some(3));
        let (mut log, _sm) = super::super::open(dir.path()).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(3));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3000));
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
        let got = log.try_get_log_entries(0..).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            (4..=3000).collect::<Vec<_>>()
        );
        let names = log.handle.db.tree_names();
        assert!(
            !names.iter().any(|n| n == super::super::LOG_TREE.as_bytes()),
            "the sled log tree is dropped"
        );
        drop((log, _sm));

        // Reopened: the files alone hold the log.
        let (mut log, _sm) = super::super::open(dir.path()).unwrap();
        let got = log.try_get_log_entries(2990..).await.unwrap();
        assert_eq!(got.len(), 11);
        assert_eq!(got[0], entry(2990));
    }

    #[tokio::test]
    async fn an_interrupted_migration_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        legacy_log(dir.path(), 0..=50, None);
        // A crash mid-copy left part of the log in the files, the tree still whole.
        {
            let mut wal = Wal::open(&dir.path().join(WAL_DIR), 4096, 0).unwrap();
            let bytes = encode("log entry", &entry(0)).unwrap();
            wal.append([(0, bytes.as_slice())]).unwrap();
        }
        let (mut log, _sm) = super::super::open(dir.path()).unwrap();
        let got = log.try_get_log_entries(0..).await.unwrap();
        assert_eq!(got, (0..=50).map(entry).collect::<Vec<_>>());
    }
}
