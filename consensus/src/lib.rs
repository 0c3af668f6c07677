//! Ployz's Raft-replicated key-value store: openraft over our own log files, an in-memory
//! state machine and snapshot files.
//!
//! # Data model ([`kv`])
//!
//! JetStream-KV shaped: named **buckets**, each with a [`kv::BucketConfig`] (history depth, max
//! value size) and its own monotonically increasing sequence. Every write to a bucket (put,
//! delete or purge tombstone) gets the next sequence number as its **revision**, across all keys
//! of the bucket, like a JetStream stream sequence. A key keeps at most `history` entries;
//! a purge also drops all of the key's older entries. The single replicated command is a
//! [`kv::Txn`]: a list of ops applied all-or-nothing, with compare-and-set
//! ([`kv::Expect::Revision`]) and create-if-absent ([`kv::Expect::Absent`]) preconditions.
//! A refused op is a normal replicated outcome ([`kv::TxnResult::Rejected`]) that changes
//! nothing. The rules are a pure function ([`kv::plan`]) from a read-only view to a list of
//! mutations; the state machine only executes them.
//!
//! A transaction may carry an idempotency key ([`kv::Txn::id`]): the state machine remembers
//! the outcome of each id for ten minutes of proposer time, and a transaction whose id it
//! remembers answers that outcome and changes nothing. A client that lost an answer (leader
//! killed, connection dropped) retries the very same transaction anywhere; it is applied at most
//! once. [`Node::write`] gives an id to a transaction without one.
//!
//! # Durability invariant
//!
//! * A log append is reported durable to Raft only after an `fdatasync` of its segment file
//!   (`store/wal.rs`) that started after its write returned, a vote only after sled's flush,
//!   so an acknowledged entry survives a crash. Appends are synced in groups (one sync at a
//!   time, covering every append before it).
//!   The leader sends AppendEntries while its own flush runs (openraft patched in
//!   `consensus/vendor/openraft`), but counts itself towards the commit quorum only once that
//!   flush is done; followers flush before they answer.
//! * Group commit: [`Node::write`]s that arrive while an entry is in flight are proposed
//!   together as one entry ([`Txn::group`]); each is answered only once that entry is committed
//!   (durable on a majority) and applied. Members apply one after the other, each in its own
//!   atomic batch with its remembered id, then `last_applied`: a replay after a crash in between
//!   answers the members' first outcomes and changes nothing.
//! * The state machine is held in memory. Applying an entry writes its data mutations, the
//!   remembered transaction ids **and** `last_applied`/`last_membership` in one batch under
//!   the write lock: a reader sees the state after some applied prefix of the log.
//! * A snapshot is a file beside the database, the state at exactly its `last_applied`
//!   (dumped at a point-in-time cut while applies go on), fsynced and recorded as current in
//!   the database before it is reported; installing one fills a fresh tree, records the file
//!   as current and swaps the tree in. Logs are purged only up to a persisted snapshot (see
//!   [`NodeConfig`] for the policy), so the current snapshot plus the log after it are the
//!   whole state: at open the state machine is loaded from the snapshot and Raft re-applies
//!   the rest from the (durable) log.
//!
//! # Layout
//!
//! [`kv`] (pure rules), [`store`] (the log in segment files, the state machine in memory and snapshot
//! files, implementing openraft's v2 storage traits),
//! [`network`] (length-prefixed JSON over TCP), [`Node`] (the facade the daemon uses).

mod gate;
pub mod kv;
pub mod network;
mod node;
pub mod store;

use serde::Deserialize;
use serde::Serialize;

pub use kv::AppliedTxn;
pub use kv::BucketConfig;
pub use kv::BucketInfo;
pub use kv::Entry;
pub use kv::EntryOp;
pub use kv::Expect;
pub use kv::KvEvent;
pub use kv::Op;
pub use kv::Rejection;
pub use kv::Txn;
pub use kv::TxnResult;
pub use network::serve_raft;
pub use network::Dialer;
pub use network::FeatureProbe;
pub use network::Features;
pub use network::FrameConn;
pub use network::PlainTcp;
pub use network::TcpNetworkFactory;
pub use node::InitError;
pub use node::MembershipError;
pub use node::NoQuorum;
pub use node::Node;
pub use node::NodeConfig;
pub use node::OpenError;
pub use node::ReadError;
pub use node::ShutdownError;
pub use node::WriteError;
pub use node::DEFAULT_REQUEST_TIMEOUT;
pub use store::LogStore;
pub use store::StateMachineStore;
pub use store::StoreError;
pub use store::Timings;

/// Raft node id.
pub type NodeId = u64;

/// What the cluster knows about a member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PloyzNode {
    /// The machine's stable identity.
    pub machine_id: String,
    /// Raft RPC address, `ip:port`.
    pub addr: String,
}

openraft::declare_raft_types!(
    /// openraft type configuration of the Ployz store.
    pub TypeConfig:
        D = Txn,
        R = TxnResult,
        NodeId = NodeId,
        Node = PloyzNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Raft handle of this store.
pub type Raft = openraft::Raft<TypeConfig>;
