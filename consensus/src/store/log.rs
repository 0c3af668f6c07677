//! The Raft log and vote on sled.

use std::fmt::Debug;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
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
use super::DbHandle;
use super::StoreError;
use crate::NodeId;
use crate::TypeConfig;

type LogEntry = openraft::Entry<TypeConfig>;

const VOTE: &[u8] = b"vote";
const LAST_PURGED: &[u8] = b"last_purged";
const COMMITTED: &[u8] = b"committed";

/// Raft log storage: entries, vote, last purged log id and committed log id.
///
/// Cloning is cheap; clones share the database (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    handle: Arc<DbHandle>,
    log: sled::Tree,
    meta: sled::Tree,
    flushes: Arc<GroupFlush>,
    tail: Arc<Mutex<Tail>>,
}

/// Entries kept decoded in [`Tail`] at most, and their encoded bytes at most.
const TAIL_ENTRIES: usize = 4096;
const TAIL_BYTES: usize = 8 << 20;

/// The newest log entries, decoded, exactly as they are in the `log` tree: a contiguous run of
/// indexes ending at the last appended entry. A leader's replication streams and every node's
/// apply read the entries just appended; from here that is a clone, not a sled range scan and
/// a JSON decode per entry and per reader.
///
/// Invariant: every entry held here is the entry the `log` tree holds at its index. `append`
/// adds after writing sled, `truncate` and `purge` drop before changing sled; a read the tail
/// does not wholly cover goes to sled.
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

/// Group commit of the log's flushes: at most one sled flush runs at a time, and a flush
/// covers every write made before it started, so the writes that arrive while one flush runs
/// share the next one. (Many concurrent `flush_async` calls can also exhaust sled 0.34's IO
/// thread pool while a batch waits for its global lock, and hang.)
#[derive(Default)]
struct GroupFlush {
    /// Writes made so far (a write takes its number once sled has it).
    written: AtomicU64,
    /// Held while flushing; the number of the last write known durable.
    durable: tokio::sync::Mutex<u64>,
}

impl LogStore {
    pub(crate) fn new(handle: Arc<DbHandle>, log: sled::Tree, meta: sled::Tree) -> Self {
        Self {
            handle,
            log,
            meta,
            flushes: Arc::default(),
            tail: Arc::default(),
        }
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        // Every change to the tail completes before its guard drops: a poisoned one is whole.
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers a write sled already holds, for [`LogStore::flush_upto`].
    fn written(&self) -> u64 {
        self.flushes.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once write number `seq` is durable: at once when a flush that started after it
    /// has completed, else after a flush of its own (one at a time).
    async fn flush_upto(&self, seq: u64) -> Result<(), StoreError> {
        let mut durable = self.flushes.durable.lock().await;
        if *durable >= seq {
            return Ok(());
        }
        let covers = self.flushes.written.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        self.handle.db.flush_async().await?;
        self.handle
            .timings
            .fsync
            .observe(started.elapsed().as_secs_f64());
        *durable = covers;
        Ok(())
    }

    /// Makes every write made so far durable.
    async fn flush(&self) -> Result<(), StoreError> {
        let seq = self.written();
        self.flush_upto(seq).await
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

    fn last_entry(&self) -> Result<Option<LogEntry>, StoreError> {
        self.log
            .last()?
            .map(|(_, v)| decode("log entry", &v))
            .transpose()
    }

    fn entries(&self, start: u64, end: Option<u64>) -> Result<Vec<LogEntry>, StoreError> {
        if let Some(end) = end {
            if let Some(hit) = self.tail().get(start, end) {
                return Ok(hit);
            }
        }
        let mut out = Vec::new();
        for item in self.log.range(start.to_be_bytes()..) {
            let (k, v) = item?;
            let index = index_of(&k)?;
            if end.is_some_and(|end| index >= end) {
                break;
            }
            out.push(decode::<LogEntry>("log entry", &v)?);
        }
        Ok(out)
    }

    /// Removes every entry with index `>= from` (`None` = up to the end) and `< to`.
    fn remove_range(&self, from: u64, to: Option<u64>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(from.to_be_bytes()..) {
            let (k, _) = item?;
            if to.is_some_and(|to| index_of(&k).is_ok_and(|i| i >= to)) {
                break;
            }
            batch.remove(k);
        }
        self.log.apply_batch(batch)?;
        Ok(())
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
        let last_log_id = match self.last_entry().map_err(read_err)? {
            Some(e) => Some(e.log_id),
            None => last_purged_log_id,
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
            self.flush().await
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
        let mut batch = sled::Batch::default();
        let mut decoded = Vec::new();
        for entry in entries {
            let bytes = encode("log entry", &entry).map_err(write_err)?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes.as_slice());
            decoded.push((entry, bytes.len()));
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| write_err(e.into()))?;
        {
            let mut tail = self.tail();
            for (entry, size) in decoded {
                tail.push(entry, size);
            }
        }
        // The entries are readable now (a leader's replication streams send them from here), but
        // durable only once sled has flushed; only then is Raft told, through the callback, and
        // only then may it count this node's ack. The flush runs in the background: a leader's
        // core goes on (our openraft patch, `consensus/vendor/README.md`) while a follower's core
        // waits for the callback before it answers. Flushes that overlap share sled's fsyncs.
        let (store, seq) = (self.clone(), self.written());
        tokio::spawn(async move {
            match store.flush_upto(seq).await {
                Ok(()) => {
                    store
                        .handle
                        .timings
                        .append
                        .observe(started.elapsed().as_secs_f64());
                    callback.log_io_completed(Ok(()));
                }
                Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
            }
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.tail().truncate(log_id.index);
        let res: Result<(), StoreError> = async {
            self.remove_range(log_id.index, None)?;
            self.flush().await
        }
        .await;
        res.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let res: Result<(), StoreError> = async {
            // Record the purge point first: a crash in between leaves extra entries below it,
            // which are never read (the log starts after `last_purged`), never a hole.
            self.tail().purge(log_id.index);
            self.meta
                .insert(LAST_PURGED, encode("last purged log id", &log_id)?)?;
            self.remove_range(0, log_id.index.checked_add(1))?;
            self.flush().await
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
}
