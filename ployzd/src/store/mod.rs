//! Store access: the one way every subsystem reads and writes cluster
//! state. Served by the local Raft replica when it can, otherwise
//! forwarded over the peer channel to the leader (or, on a machine without
//! a replica, to any storage machine, which forwards in turn; see
//! [`forward`]). Records are typed JSON documents ([`records`]).

pub mod events;
pub mod forward;
pub mod local;
pub mod records;

pub use local::{ClusterFile, LocalFile, CLUSTER_FILE};
pub use records::{decode, delete, no_network, put, unavailable, Versioned};

use crate::errors::{internal, invalid};
use crate::peer::{self, KvRead, KvReadResult};
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::{
    Entry, Expect, Node, NodeConfig, PloyzNode, Rejection, TcpNetworkFactory, Txn, TxnResult,
};
use std::path::PathBuf;

/// Compare-and-set retries before a contended update gives up.
pub(crate) const CAS_RETRIES: usize = 16;

/// What the store needs to open.
pub struct StoreConfig {
    pub machine_id: String,
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// Where peers reach this machine's Raft (advertised in the membership).
    pub peer_addr: String,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        dir: PathBuf,
        source: ployz_consensus::OpenError,
    },
    #[error(transparent)]
    ClusterFile(#[from] local::CorruptClusterFile),
}

/// The replicated store as this machine reaches it.
pub struct Store {
    node: Node,
    machine_id: String,
    node_id: u64,
    local: LocalFile,
    /// Store change events relayed from a storage machine, for a machine
    /// without a replica of its own.
    remote_events: tokio::sync::broadcast::Sender<ployz_consensus::KvEvent>,
    /// The storage machine `remote_events` are relayed from, while relaying.
    events_from: std::sync::Mutex<Option<String>>,
    /// Who [`Store::watch_bucket`] wakes, by bucket.
    bucket_watchers: std::sync::Arc<events::BucketWatchers>,
    /// How long this machine's writes and reads took, end to end.
    latency: Latency,
}

/// Store request latency histograms (seconds), shared with `/metrics`.
#[derive(Clone)]
pub struct Latency {
    pub writes: prometheus_client::metrics::histogram::Histogram,
    pub reads: prometheus_client::metrics::histogram::Histogram,
}

impl Latency {
    fn new() -> Latency {
        // 100 µs .. ~3.3 s.
        let buckets =
            || prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16);
        Latency {
            writes: prometheus_client::metrics::histogram::Histogram::new(buckets()),
            reads: prometheus_client::metrics::histogram::Histogram::new(buckets()),
        }
    }
}

impl Store {
    pub async fn open(cfg: StoreConfig) -> Result<Store, OpenError> {
        let local = LocalFile::load(&cfg.data_dir)?;
        let store_dir = cfg.data_dir.join("store");
        let network = TcpNetworkFactory::with_dialer(
            cfg.node_id,
            peer::RaftDialer {
                secret: local.secret().clone(),
                me: cfg.machine_id.clone(),
            },
        );
        let node = Node::open_with_network(
            NodeConfig {
                node_id: cfg.node_id,
                node: PloyzNode {
                    machine_id: cfg.machine_id.clone(),
                    addr: cfg.peer_addr.clone(),
                },
                dir: store_dir.clone(),
                snapshot_logs_since_last: cfg.snapshot_every,
            },
            network,
        )
        .await
        .map_err(|source| OpenError::Store {
            dir: store_dir,
            source,
        })?;
        if local.get().and_then(|c| c.network).is_some_and(|n| n.mesh) {
            // Peers are reached over the mesh, which comes up a moment after
            // start: no election until then, or a restarted follower would
            // depose a healthy leader it simply had not heard from yet.
            // The overlay turns elections back on (`Overlay::ensure`).
            node.raft().runtime_config().elect(false);
        }
        let (remote_events, _) = tokio::sync::broadcast::channel(4096);
        Ok(Store {
            node,
            machine_id: cfg.machine_id,
            node_id: cfg.node_id,
            local,
            remote_events,
            events_from: std::sync::Mutex::default(),
            bucket_watchers: std::sync::Arc::default(),
            latency: Latency::new(),
        })
    }

    /// The write and read latency histograms.
    pub fn latency(&self) -> Latency {
        self.latency.clone()
    }

    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// The local Raft node: membership changes and metrics (cluster
    /// subsystem), never for reads or writes of records.
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    /// `cluster.json` and the network secret.
    pub fn local(&self) -> &LocalFile {
        &self.local
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.node.shutdown().await {
            tracing::warn!("store shutdown: {e}");
        }
    }

    // -----------------------------------------------------------------------
    // Reads and writes

    /// Apply `txn`, here or on the leader, retried on transport errors and
    /// leader changes (see [`forward`]). A `txn` without an idempotency key
    /// gets one first, so every resend of it is the same write.
    pub(crate) async fn write_txn(&self, mut txn: Txn, hops: u8) -> Result<TxnResult, ApiError> {
        if txn.id.is_none() {
            txn.id = Some(forward::new_txn_id(&self.machine_id));
        }
        let started = std::time::Instant::now();
        let answer = self.call(forward::StoreCall::Write(txn), hops).await?;
        self.latency.writes.observe(started.elapsed().as_secs_f64());
        match answer {
            forward::StoreAnswer::Written(r) => Ok(r),
            other => Err(internal(format!("unexpected store answer {other:?}"))),
        }
    }

    /// A linearizable read, from the local replica when it can serve it,
    /// else forwarded towards the leader; retried like writes.
    pub(crate) async fn read(&self, read: KvRead, hops: u8) -> Result<KvReadResult, ApiError> {
        let started = std::time::Instant::now();
        let answer = self.call(forward::StoreCall::Read(read), hops).await?;
        self.latency.reads.observe(started.elapsed().as_secs_f64());
        match answer {
            forward::StoreAnswer::Read(r) => Ok(r),
            other => Err(internal(format!("unexpected store answer {other:?}"))),
        }
    }

    pub(crate) async fn get_entry(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Entry>, ApiError> {
        let read = KvRead::Get {
            bucket: bucket.into(),
            key: key.into(),
        };
        match self.read(read, 0).await? {
            KvReadResult::Entry(e) => Ok(e),
            KvReadResult::NoSuchBucket(_) => Ok(None),
            other => Err(internal(format!("unexpected read result {other:?}"))),
        }
    }

    pub(crate) async fn list_entries(&self, bucket: &str) -> Result<Vec<Entry>, ApiError> {
        let read = KvRead::List {
            bucket: bucket.into(),
        };
        match self.read(read, 0).await? {
            KvReadResult::Entries(e) => Ok(e),
            KvReadResult::NoSuchBucket(_) => Ok(Vec::new()),
            other => Err(internal(format!("unexpected read result {other:?}"))),
        }
    }

    /// Apply `ops` atomically, as one write with a fresh idempotency key
    /// (however often it is resent, it is applied once). `Ok(Err(..))` is a
    /// replicated rejection: the store is fine, a precondition did not
    /// hold, nothing changed.
    pub(crate) async fn txn(
        &self,
        ops: Vec<ployz_consensus::Op>,
    ) -> Result<Result<Vec<u64>, (usize, Rejection)>, ApiError> {
        let txn = Txn::new(ops, now_ms()).with_id(forward::new_txn_id(&self.machine_id));
        match self.write_txn(txn, 0).await? {
            TxnResult::Applied { revisions } => Ok(Ok(revisions)),
            TxnResult::Rejected { op_index, reason } => Ok(Err((op_index, reason))),
        }
    }

    pub(crate) async fn get<T: serde::de::DeserializeOwned>(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Versioned<T>>, ApiError> {
        match self.get_entry(bucket, key).await? {
            Some(e) if e.is_live() => decode(&e).map(Some),
            _ => Ok(None),
        }
    }

    pub(crate) async fn list<T: serde::de::DeserializeOwned>(
        &self,
        bucket: &str,
    ) -> Result<Vec<Versioned<T>>, ApiError> {
        self.list_entries(bucket)
            .await?
            .iter()
            .filter(|e| e.is_live())
            .map(decode)
            .collect()
    }

    /// Every live record of `bucket`, without revisions.
    pub(crate) async fn values<T: serde::de::DeserializeOwned>(
        &self,
        bucket: &str,
    ) -> Result<Vec<T>, ApiError> {
        Ok(self
            .list::<T>(bucket)
            .await?
            .into_iter()
            .map(|v| v.value)
            .collect())
    }

    /// Write `value` at `bucket/key` if it is still at `revision`:
    /// `Ok(false)` when someone changed it since (read again, decide again).
    pub(crate) async fn put_at<T: serde::Serialize>(
        &self,
        bucket: &str,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<bool, ApiError> {
        match self
            .txn(vec![put(bucket, key, value, Expect::Revision(revision))])
            .await?
        {
            Ok(_) => Ok(true),
            Err((_, Rejection::WrongLastRevision { .. })) => Ok(false),
            Err((_, other)) => Err(internal(format!(
                "the store rejected the update of {bucket}/{key}: {other}"
            ))),
        }
    }

    /// The network's secret, needed to talk to peers.
    pub(crate) fn secret(&self) -> Result<peer::ClusterSecret, ApiError> {
        self.local.secret().get().ok_or_else(no_network)
    }

    /// The machine records of this replica's own copy, without asking the
    /// leader (`None` without a replica): what voters keep their tunnels
    /// up from, so no election waits on the store.
    pub(crate) fn local_machines(&self) -> Option<Vec<MachineRecord>> {
        if !self.has_replica() {
            return None;
        }
        self.node.list_local(BUCKET_MACHINES).ok().map(|es| {
            es.iter()
                .filter(|e| e.is_live())
                .filter_map(|e| decode::<MachineRecord>(e).ok())
                .map(|v| v.value)
                .collect()
        })
    }

    /// Read-modify-write of machine `id`'s record, compare-and-set on the
    /// revision read and retried on conflict. `change` edits the record and
    /// says whether anything changed. `Ok(None)`: no such machine.
    pub(crate) async fn update_machine_record(
        &self,
        id: &str,
        mut change: impl FnMut(&mut MachineRecord) -> bool,
    ) -> Result<Option<MachineRecord>, ApiError> {
        for _ in 0..CAS_RETRIES {
            let Some(cur) = self.get::<MachineRecord>(BUCKET_MACHINES, id).await? else {
                return Ok(None);
            };
            let mut next = cur.value.clone();
            if !change(&mut next) {
                return Ok(Some(next));
            }
            next.updated_at_ms = now_ms();
            let op = put(BUCKET_MACHINES, id, &next, Expect::Revision(cur.revision));
            match self.txn(vec![op]).await? {
                Ok(_) => return Ok(Some(next)),
                Err((_, Rejection::WrongLastRevision { .. })) => continue,
                Err((_, other)) => {
                    return Err(internal(format!(
                        "updating machine {id} was rejected: {other}"
                    )))
                }
            }
        }
        Err(unavailable(format!(
            "machine {id} kept changing under {CAS_RETRIES} attempts to update it"
        )))
    }

    // -----------------------------------------------------------------------
    // The cluster's records

    /// Whether this machine is in a network (founded or joined).
    pub(crate) async fn in_network(&self) -> bool {
        self.local.get().is_some() || self.node.is_initialized().await
    }

    pub(crate) async fn network(&self) -> Result<Option<NetworkRecord>, ApiError> {
        if !self.in_network().await {
            return Ok(None);
        }
        Ok(self
            .get::<NetworkRecord>(BUCKET_NETWORK, NETWORK_KEY)
            .await?
            .map(|v| v.value))
    }

    pub(crate) async fn require_network(&self) -> Result<NetworkRecord, ApiError> {
        self.network().await?.ok_or_else(no_network)
    }

    /// Every machine of the network, oldest first.
    pub(crate) async fn machines(&self) -> Result<Vec<Versioned<MachineRecord>>, ApiError> {
        self.require_network().await?;
        let mut ms = self.list::<MachineRecord>(BUCKET_MACHINES).await?;
        ms.sort_by(|a, b| {
            (a.value.created_at_ms, &a.value.id).cmp(&(b.value.created_at_ms, &b.value.id))
        });
        Ok(ms)
    }

    /// This machine's own record.
    pub(crate) async fn my_record(&self) -> Result<MachineRecord, ApiError> {
        self.get::<MachineRecord>(BUCKET_MACHINES, &self.machine_id)
            .await?
            .map(|v| v.value)
            .ok_or_else(|| internal("this machine has no record in its own network's store"))
    }

    /// Resolve a machine by its id or a unique prefix of it.
    pub(crate) async fn resolve_machine(
        &self,
        wanted: &str,
    ) -> Result<Versioned<MachineRecord>, ApiError> {
        if wanted.is_empty() {
            return Err(invalid("a machine id is required"));
        }
        let all = self.machines().await?;
        if let Some(m) = all.iter().find(|m| m.value.id == wanted) {
            return Ok(m.clone());
        }
        let matching: Vec<_> = all
            .iter()
            .filter(|m| m.value.id.starts_with(wanted))
            .collect();
        match matching.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no machine `{wanted}` in this network"),
            )
            .with_hint("`ployzctl machine ls` lists the machine ids")),
            many => Err(invalid(format!(
                "`{wanted}` matches {} machines ({}); give more of the id",
                many.len(),
                many.iter()
                    .map(|m| m.value.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    // -----------------------------------------------------------------------
    // This replica's view of the Raft group

    /// The Raft voters as `(node_id, node)`, from this replica's view.
    pub(crate) fn voters(&self) -> Vec<(u64, PloyzNode)> {
        let metrics = self.node.raft().metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone())))
            .collect()
    }

    /// Whether this machine holds a replica of the store (voter or learner).
    pub(crate) fn has_replica(&self) -> bool {
        let metrics = self.node.raft().metrics();
        let found = metrics
            .borrow()
            .membership_config
            .membership()
            .get_node(&self.node_id)
            .is_some();
        found
    }

    pub(crate) fn is_leader(&self) -> bool {
        let metrics = self.node.raft().metrics();
        let m = metrics.borrow();
        m.current_leader == Some(self.node_id) && m.state.is_leader()
    }

    /// Remember the current voters as the storage machines to forward to.
    pub(crate) fn refresh_storage_peers(&self) {
        let peers: Vec<(String, String)> = self
            .voters()
            .into_iter()
            .map(|(_, n)| (n.machine_id, n.addr))
            .collect();
        self.local.set_storage_peers(peers);
    }

    /// Raft's state as `mesh status` shows it.
    pub(crate) fn status(&self) -> StoreStatus {
        let m = self.node.raft().metrics().borrow().clone();
        let name = |id: u64| crate::identity::machine_id_of(id);
        StoreStatus {
            role: format!("{:?}", m.state).to_lowercase(),
            leader: m.current_leader.map(name),
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            voters: m
                .membership_config
                .membership()
                .voter_ids()
                .map(name)
                .collect(),
            storage_peers: self
                .local
                .get()
                .map(|f| f.storage_peers.into_iter().map(|(id, _)| id).collect())
                .unwrap_or_default(),
            events_from: self.events_from(),
            error: None,
        }
    }
}
