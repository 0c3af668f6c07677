//! The replicated data model: buckets of keys with per-bucket revisions, JetStream KV style.
//!
//! Everything in this module is plain data and pure functions: no IO, and the rules never read a
//! clock (timestamps come from the proposer inside the [`Txn`]). The rules that decide what a
//! [`Txn`] does ([`plan`]) run over a read-only [`KvView`]; they return
//! the [`Mutation`]s to write, which the sled layer (`crate::store`) or the in-memory
//! [`MemState`] execute.
//!
//! # Idempotent transactions
//!
//! A [`Txn`] may carry a client-chosen [`Txn::id`]. The state machine remembers the outcome
//! of every transaction with an id ([`AppliedTxn`]) for [`TXN_ID_RETENTION_MS`] of proposer
//! time: applying a transaction whose id it remembers changes nothing and answers the
//! remembered [`TxnResult`]. So a client that lost the answer to a write (leader killed, a
//! connection dropped) sends the very same transaction again, to whichever node now leads, and
//! gets the outcome of the first attempt instead of a second application. Forgetting is driven
//! by the `now_ms` of the transactions applied, never by a clock, so every replica forgets the
//! same ids at the same log index.

mod mem;
mod names;
mod rules;

#[cfg(test)]
mod tests;

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

pub use mem::MemState;
pub use names::validate_bucket_name;
pub use names::validate_key;
pub use rules::plan;
pub use rules::KvView;
pub use rules::Mutation;
pub use rules::Plan;
pub use rules::TXN_ID_RETENTION_MS;

/// Largest allowed [`BucketConfig::history`] (JetStream's `max_msgs_per_subject` limit for KV).
pub const MAX_HISTORY: u8 = 64;

/// Configuration of a bucket, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// How many entries (puts and tombstones) are kept per key, `1..=64`.
    pub history: u8,
    /// Largest accepted value in bytes for a put, `None` for no limit.
    pub max_value_size: Option<u32>,
}

impl Default for BucketConfig {
    fn default() -> Self {
        Self {
            history: 1,
            max_value_size: None,
        }
    }
}

impl BucketConfig {
    /// Checks the limits; the error says which field is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.history == 0 || self.history > MAX_HISTORY {
            return Err(format!(
                "history must be between 1 and {MAX_HISTORY}, got {}",
                self.history
            ));
        }
        Ok(())
    }
}

/// What an [`Entry`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryOp {
    /// A value was written.
    Put,
    /// The key was deleted; the entry is a tombstone, older history is kept.
    Delete,
    /// The key was purged; the entry is a tombstone and all older history was dropped.
    Purge,
}

/// One stored revision of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub bucket: String,
    pub key: String,
    /// The value; empty for tombstones. Serialized as base64.
    #[serde(with = "base64_bytes")]
    pub value: Vec<u8>,
    /// The bucket sequence at which this entry was written (JetStream stream sequence).
    pub revision: u64,
    /// Proposer's wall clock at the time of the write, milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub op: EntryOp,
}

/// What the rules need of a key's latest entry to plan a write: not its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub revision: u64,
    /// The value's length in bytes.
    pub value_len: u64,
    pub op: EntryOp,
}

impl EntryMeta {
    pub fn of(entry: &Entry) -> Self {
        EntryMeta {
            revision: entry.revision,
            value_len: entry.value.len() as u64,
            op: entry.op,
        }
    }

    /// `true` for puts: the key holds a value.
    pub fn is_live(&self) -> bool {
        self.op == EntryOp::Put
    }

    /// `true` for delete and purge markers.
    pub fn is_tombstone(&self) -> bool {
        self.op != EntryOp::Put
    }

    /// Reads the meta of an [`Entry`] stored as JSON without decoding its (base64) value.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Repr<'a> {
            #[serde(borrow)]
            value: std::borrow::Cow<'a, str>,
            revision: u64,
            op: EntryOp,
        }
        let r: Repr<'_> = serde_json::from_slice(bytes)?;
        Ok(EntryMeta {
            revision: r.revision,
            value_len: base64_bytes::decoded_len(&r.value),
            op: r.op,
        })
    }
}

impl Entry {
    /// `true` for delete and purge markers.
    pub fn is_tombstone(&self) -> bool {
        self.op != EntryOp::Put
    }

    /// `true` for puts: the key holds this value.
    pub fn is_live(&self) -> bool {
        self.op == EntryOp::Put
    }
}

/// A precondition on a key's latest entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// No precondition.
    #[default]
    Any,
    /// Create-if-absent (JetStream `create`): the key never existed or its latest entry is a
    /// delete/purge tombstone.
    Absent,
    /// Compare-and-set: the key's latest revision (tombstones included) must equal this value;
    /// `0` means the key must have no entry at all.
    Revision(u64),
}

/// One operation of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a bucket. Idempotent when it exists with the same config.
    CreateBucket {
        bucket: String,
        config: BucketConfig,
    },
    /// Delete a bucket with all its entries; its sequence restarts if it is created again.
    DeleteBucket { bucket: String },
    /// Write a value.
    Put {
        bucket: String,
        key: String,
        #[serde(with = "base64_bytes")]
        value: Vec<u8>,
        expect: Expect,
    },
    /// Write a delete (or, with `purge`, a purge) tombstone.
    Delete {
        bucket: String,
        key: String,
        expect: Expect,
        purge: bool,
    },
}

impl Op {
    pub fn create_bucket(bucket: impl Into<String>, config: BucketConfig) -> Self {
        Op::CreateBucket {
            bucket: bucket.into(),
            config,
        }
    }

    pub fn delete_bucket(bucket: impl Into<String>) -> Self {
        Op::DeleteBucket {
            bucket: bucket.into(),
        }
    }

    /// Unconditional put.
    pub fn put(
        bucket: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) -> Self {
        Self::put_expect(bucket, key, value, Expect::Any)
    }

    pub fn put_expect(
        bucket: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        expect: Expect,
    ) -> Self {
        Op::Put {
            bucket: bucket.into(),
            key: key.into(),
            value: value.into(),
            expect,
        }
    }

    /// Unconditional delete (tombstone, history kept).
    pub fn delete(bucket: impl Into<String>, key: impl Into<String>) -> Self {
        Op::Delete {
            bucket: bucket.into(),
            key: key.into(),
            expect: Expect::Any,
            purge: false,
        }
    }

    /// Unconditional purge (tombstone, older history dropped).
    pub fn purge(bucket: impl Into<String>, key: impl Into<String>) -> Self {
        Op::Delete {
            bucket: bucket.into(),
            key: key.into(),
            expect: Expect::Any,
            purge: true,
        }
    }
}

/// The replicated command: applied all-or-nothing, in order; later ops see earlier ops' effects.
///
/// Wire and log format (JSON): `{"ops": [...], "now_ms": .., "id": ..}`. A group entry
/// ([`Txn::group`]) is written **without** `ops`: `{"now_ms": .., "group": [...]}`. A binary from
/// before group commit requires `ops`, so it refuses to decode a group entry (the Raft RPC
/// carrying it fails and is retried) instead of applying it as an empty transaction. Leaders
/// propose group entries only once every member said it reads them (see `Node::write`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Txn {
    #[serde(default)]
    pub ops: Vec<Op>,
    /// Proposer's wall clock, milliseconds since the Unix epoch; becomes `Entry::created_ms`.
    /// Carried in the command so that applying it is deterministic on every node.
    pub now_ms: u64,
    /// Client-chosen idempotency key, unique per logical write (a retry reuses it, with the
    /// same `ops` and `now_ms`). A transaction whose id was applied less than
    /// [`TXN_ID_RETENTION_MS`] (proposer time) before is not applied again: it answers the first
    /// outcome. Absent in entries written before ids existed.
    #[serde(default)]
    pub id: Option<String>,
    /// Group commit: independent transactions proposed as one log entry (then `ops` is empty
    /// and `id` is `None`). Each member is applied on its own, in order, all-or-nothing by
    /// itself; every member carries an id, so its outcome is remembered and a replay of a
    /// partly applied group (crash between members) answers the first outcomes. Absent in
    /// entries written before group commit existed.
    #[serde(default)]
    pub group: Vec<Txn>,
}

impl Serialize for Txn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let grouped = !self.group.is_empty();
        let fields = 2 + usize::from(self.id.is_some()) + usize::from(grouped);
        let mut st = s.serialize_struct("Txn", fields)?;
        if grouped {
            // No `ops`: older binaries must fail to decode a group (see the type's docs).
            st.skip_field("ops")?;
        } else {
            st.serialize_field("ops", &self.ops)?;
        }
        st.serialize_field("now_ms", &self.now_ms)?;
        match &self.id {
            Some(id) => st.serialize_field("id", id)?,
            None => st.skip_field("id")?,
        }
        if grouped {
            st.serialize_field("group", &self.group)?;
        } else {
            st.skip_field("group")?;
        }
        st.end()
    }
}

impl Txn {
    pub fn new(ops: Vec<Op>, now_ms: u64) -> Self {
        Self {
            ops,
            now_ms,
            id: None,
            group: Vec::new(),
        }
    }

    /// One log entry carrying `members` (each with an id), applied one after the other.
    pub fn group(members: Vec<Txn>) -> Self {
        let now_ms = members.iter().map(|t| t.now_ms).max().unwrap_or(0);
        Self {
            ops: Vec::new(),
            now_ms,
            id: None,
            group: members,
        }
    }

    /// The same transaction with idempotency key `id`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// A transaction stamped with this machine's wall clock (call it on the proposer only).
    pub fn now(ops: Vec<Op>) -> Self {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self::new(ops, now_ms)
    }
}

/// The remembered outcome of a transaction with an id: what a retry of it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedTxn {
    pub id: String,
    /// The transaction's `now_ms`; the id is forgotten once a transaction more than
    /// [`TXN_ID_RETENTION_MS`] younger is applied.
    pub now_ms: u64,
    pub result: TxnResult,
}

/// Outcome of a [`Txn`]. A rejection is a normal, replicated outcome that changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnResult {
    /// All ops were applied. One revision per op; `0` for bucket create/delete.
    Applied { revisions: Vec<u64> },
    /// Op `op_index` was refused; no op of the transaction was applied.
    Rejected { op_index: usize, reason: Rejection },
}

impl TxnResult {
    pub fn is_applied(&self) -> bool {
        matches!(self, TxnResult::Applied { .. })
    }

    /// The revisions of an applied transaction.
    pub fn revisions(&self) -> Option<&[u64]> {
        match self {
            TxnResult::Applied { revisions } => Some(revisions),
            TxnResult::Rejected { .. } => None,
        }
    }
}

/// Why an op was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("no such bucket")]
    NoSuchBucket,
    #[error("bucket exists with a different config: {existing:?}")]
    BucketConfigMismatch { existing: BucketConfig },
    #[error("wrong last revision: expected {expected}, current {current}")]
    WrongLastRevision { expected: u64, current: u64 },
    #[error("key exists at revision {revision}")]
    KeyExists { revision: u64 },
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("invalid bucket config: {0}")]
    InvalidConfig(String),
    #[error("value of {size} bytes exceeds the bucket's max_value_size of {max}")]
    ValueTooLarge { size: u64, max: u32 },
}

/// Persistent per-bucket record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketState {
    pub config: BucketConfig,
    /// The bucket sequence: revision of the last entry written, `0` before the first.
    pub last_seq: u64,
    /// `now_ms` of the transaction that created the bucket.
    pub created_ms: u64,
}

/// Bucket statistics, JetStream `StreamInfo` style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketInfo {
    pub bucket: String,
    pub config: BucketConfig,
    pub created_ms: u64,
    /// Lowest stored revision; `last_seq + 1` when nothing is stored (`0` for a new bucket).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Keys whose latest entry is a put.
    pub live_keys: u64,
    /// Stored entries, history and tombstones included.
    pub entries: u64,
    /// Value bytes of the stored entries (JetStream's `bytes`, counting payloads only).
    #[serde(default)]
    pub bytes: u64,
}

/// JetStream's first sequence: the lowest stored revision, or `last_seq + 1` when nothing is
/// stored (`0` for a bucket that was never written).
pub(crate) fn first_seq(lowest_stored: Option<u64>, last_seq: u64) -> u64 {
    match lowest_stored {
        Some(first) => first,
        None if last_seq == 0 => 0,
        None => last_seq + 1,
    }
}

/// A change notification, sent after the change is applied to the local state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvEvent {
    /// An entry was written (put or tombstone).
    Entry(Entry),
    BucketCreated {
        bucket: String,
        config: BucketConfig,
    },
    BucketDeleted {
        bucket: String,
    },
    /// The whole state was replaced by a snapshot from the leader: watchers must re-read.
    Reset,
}

impl fmt::Display for EntryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            EntryOp::Put => "PUT",
            EntryOp::Delete => "DEL",
            EntryOp::Purge => "PURGE",
        };
        f.write_str(s)
    }
}

/// Serde helper: `Vec<u8>` as a standard base64 string.
pub(crate) mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::Deserialize;
    use serde::Deserializer;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    /// The length of what the (well-formed, standard alphabet) base64 text `s` decodes to.
    pub fn decoded_len(s: &str) -> u64 {
        let pad = s.bytes().rev().take_while(|&b| b == b'=').count();
        ((s.len() - pad) * 3 / 4) as u64
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}
