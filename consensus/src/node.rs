//! [`Node`]: one member of the replicated store, as the daemon uses it.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use openraft::error::ChangeMembershipError;
use openraft::error::CheckIsLeaderError;
use openraft::error::ClientWriteError;
use openraft::error::Fatal;
use openraft::error::ForwardToLeader;
use openraft::error::InitializeError;
use openraft::error::QuorumNotEnough;
use openraft::error::RaftError;
use openraft::Config;
use openraft::RaftNetworkFactory;
use openraft::ServerState;
use openraft::SnapshotPolicy;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use ployz_api::time::human;

use crate::gate::GroupGate;
use crate::kv::BucketInfo;
use crate::kv::Entry;
use crate::kv::KvEvent;
use crate::kv::Txn;
use crate::kv::TxnResult;
use crate::network::serve_raft;
use crate::network::FeatureProbe;
use crate::network::TcpNetworkFactory;
use crate::store;
use crate::store::StateMachineStore;
use crate::store::StoreError;
use crate::NodeId;
use crate::PloyzNode;
use crate::Raft;

/// How long [`Node::write`] and the linearizable reads wait for a leader and a quorum.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Node::shutdown`] waits for openraft's tasks to release the database.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Logs kept after a snapshot, at most, so a briefly lagging follower catches up from the log
/// instead of receiving a whole snapshot.
const MAX_LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1000;

/// How a node is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// This node as known at open time (identifies it in logs). The cluster membership records
    /// what [`Node::initialize_single`] or the leader's [`Node::add_learner`] were given, and
    /// peers dial that `addr`.
    pub node: PloyzNode,
    /// The store lives here: sled database, `raft-wal/` log segments, `raft-snapshots/`.
    pub dir: PathBuf,
    /// Snapshot policy (`SnapshotPolicy::LogsSinceLast`): build a snapshot once this many logs
    /// were applied since the last one; the log is then purged up to the snapshot, keeping
    /// `min(snapshot_logs_since_last, 1000)` entries for lagging followers. Must be > 0.
    pub snapshot_logs_since_last: u64,
}

impl NodeConfig {
    pub const DEFAULT_SNAPSHOT_LOGS_SINCE_LAST: u64 = 5000;

    pub fn new(node_id: NodeId, node: PloyzNode, dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            node,
            dir: dir.into(),
            snapshot_logs_since_last: Self::DEFAULT_SNAPSHOT_LOGS_SINCE_LAST,
        }
    }

    /// The openraft configuration derived from this config.
    ///
    /// Timing is sized for a WAN overlay: 300 ms heartbeats (also the AppendEntries timeout),
    /// elections after 1.5–3 s of silence, 1 MiB snapshot chunks with 5 s each.
    pub fn raft_config(&self) -> Result<Config, Box<openraft::ConfigError>> {
        Config {
            cluster_name: "ployz".to_string(),
            heartbeat_interval: 300,
            election_timeout_min: 1500,
            election_timeout_max: 3000,
            install_snapshot_timeout: 5000,
            // 1 MiB of snapshot per RPC (about 4 MiB of JSON), well within the 5 s chunk timeout.
            snapshot_max_chunk_size: 1024 * 1024,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: self
                .snapshot_logs_since_last
                .min(MAX_LOGS_KEPT_AFTER_SNAPSHOT),
            ..Config::default()
        }
        .validate()
        .map_err(Box::new)
    }
}

/// Opening a node failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid node config: {0}")]
    InvalidConfig(String),
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the raft database in {path} (is another ployzd using it?): {source}")]
    Store { path: PathBuf, source: StoreError },
    #[error("invalid raft config: {0}")]
    RaftConfig(Box<openraft::ConfigError>),
    #[error("raft failed to start: {0}")]
    Raft(Box<Fatal<NodeId>>),
}

/// [`Node::initialize_single`] failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("this node is already initialized (it has a log or has voted); nothing to do")]
    AlreadyInitialized,
    #[error("initialized, but this node did not become leader within {}", human(*timeout))]
    Timeout { timeout: Duration },
    #[error("raft refused to initialize: {0}")]
    Refused(String),
    #[error("raft stopped: {0}")]
    Fatal(Box<Fatal<NodeId>>),
}

/// [`Node::write`] failed. On `Timeout` (and when a `ForwardToLeader` follows a lost leadership)
/// the outcome is unknown: the transaction may still commit. Retrying the same `Txn` (same id)
/// is safe: it is applied at most once.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("this node is not part of a cluster yet: initialize it or add it to one")]
    NotInitialized,
    #[error("this node is not the leader; send the write to node {leader_id}")]
    ForwardToLeader {
        leader_id: NodeId,
        leader_node: Option<PloyzNode>,
    },
    #[error(
        "no leader or no quorum within {}; the write may or may not be applied",
        human(*timeout)
    )]
    Timeout { timeout: Duration },
    #[error("raft refused the write: {0}")]
    Refused(String),
    #[error("the local store failed: {0}")]
    Store(#[from] StoreError),
    #[error("raft stopped: {0}")]
    Fatal(Box<Fatal<NodeId>>),
}

/// A read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("this node is not part of a cluster yet: initialize it or add it to one")]
    NotInitialized,
    #[error("linearizable reads are served by the leader, node {leader_id}")]
    ForwardToLeader {
        leader_id: NodeId,
        leader_node: Option<PloyzNode>,
    },
    #[error("{0}")]
    NoQuorum(NoQuorum),
    #[error("no leader or no quorum within {}", human(*timeout))]
    Timeout { timeout: Duration },
    #[error("no such bucket: {bucket}")]
    NoSuchBucket { bucket: String },
    #[error("reading the local state machine failed: {0}")]
    Store(#[from] StoreError),
    #[error("raft stopped: {0}")]
    Fatal(Box<Fatal<NodeId>>),
}

/// The leader could not reach a majority of the voters: who answered and
/// who did not, by machine id, for a message people can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoQuorum {
    /// Voters that answered (the leader counts itself).
    pub reachable: usize,
    pub voters: usize,
    /// Voters a quorum needs.
    pub needed: usize,
    /// Machine ids (node ids where unknown) of the voters that did not answer.
    pub unreachable: Vec<String>,
}

impl NoQuorum {
    /// From openraft's report and the voters with their nodes.
    pub fn new(got: &BTreeSet<NodeId>, voters: &[(NodeId, Option<&PloyzNode>)]) -> NoQuorum {
        let name = |id: &NodeId, node: &Option<&PloyzNode>| match node {
            Some(n) => n.machine_id.clone(),
            None => format!("node {id}"),
        };
        NoQuorum {
            reachable: voters.iter().filter(|(id, _)| got.contains(id)).count(),
            voters: voters.len(),
            needed: voters.len() / 2 + 1,
            unreachable: voters
                .iter()
                .filter(|(id, _)| !got.contains(id))
                .map(|(id, n)| name(id, n))
                .collect(),
        }
    }
}

impl std::fmt::Display for NoQuorum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no quorum: the leader reaches {} of {} storage voters and needs {}",
            self.reachable, self.voters, self.needed
        )?;
        if !self.unreachable.is_empty() {
            write!(f, "; not reachable: {}", self.unreachable.join(", "))?;
        }
        Ok(())
    }
}

/// A membership change failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("this node is not part of a cluster yet: initialize it first")]
    NotInitialized,
    #[error("membership changes are made on the leader, node {leader_id}")]
    ForwardToLeader {
        leader_id: NodeId,
        leader_node: Option<PloyzNode>,
    },
    #[error("no leader is known right now; retry once one is elected")]
    NoLeader,
    #[error("this node stopped being the leader before the new learner caught up; retry")]
    LostLeadership,
    #[error("{}", change_refused(.0))]
    Change(#[from] ChangeMembershipError<NodeId>),
    #[error("raft stopped: {0}")]
    Fatal(Box<Fatal<NodeId>>),
}

/// Why raft refused a membership change, without its Debug dumps of log ids.
fn change_refused(e: &ChangeMembershipError<NodeId>) -> String {
    match e {
        ChangeMembershipError::InProgress(_) => {
            "another change of the storage set is still being committed; retry in a moment".into()
        }
        ChangeMembershipError::EmptyMembership(_) => "the storage set cannot be empty".into(),
        ChangeMembershipError::LearnerNotFound(l) => format!(
            "node {} has not caught up as a learner yet, so it cannot vote",
            l.node_id
        ),
    }
}

/// [`Node::shutdown`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("raft core task failed while stopping: {0}")]
    Raft(String),
    #[error("raft tasks still hold the database after {} ({users} handles)", human(*timeout))]
    DatabaseBusy { users: usize, timeout: Duration },
    #[error("final flush failed: {0}")]
    Store(#[from] StoreError),
}

macro_rules! from_fatal {
    ($($t:ty),*) => {$(
        impl From<Fatal<NodeId>> for $t {
            fn from(f: Fatal<NodeId>) -> Self {
                Self::Fatal(Box::new(f))
            }
        }
    )*};
}
from_fatal!(InitError, WriteError, ReadError, MembershipError);

/// Where a request should go when this node cannot serve it.
enum Redirect {
    NotInitialized,
    Leader(NodeId, Option<PloyzNode>),
    /// No leader known (election in progress): wait and retry.
    Wait,
}

/// A member of the replicated store.
///
/// Call [`Node::shutdown`] before dropping it: Raft's tasks keep running (and keep the database
/// open) until then.
pub struct Node {
    id: NodeId,
    raft: Raft,
    sm: StateMachineStore,
    servers: Mutex<Vec<JoinHandle<()>>>,
    proposer: Proposer,
    combiner: Arc<Combiner>,
    reads: Arc<ReadRounds>,
    /// Asks the members which log formats they read (only while leading); aborted on shutdown.
    gate_task: JoinHandle<()>,
}

/// Batched ReadIndex: readers that arrive while a leadership round is in flight wait for the
/// next round, which starts after they arrived (so it covers every write acknowledged before
/// their read began); one round (one heartbeat to a quorum, no disk write) answers them all.
#[derive(Default)]
struct ReadRounds {
    state: Mutex<ReadState>,
}

#[derive(Default)]
struct ReadState {
    waiting: Vec<oneshot::Sender<bool>>,
    running: bool,
}

impl ReadRounds {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reader; `true` when the caller must start the rounds.
    fn push(&self, waiter: oneshot::Sender<bool>) -> bool {
        let mut st = self.lock();
        st.waiting.push(waiter);
        !std::mem::replace(&mut st.running, true)
    }

    /// The readers the next round answers; `None` (rounds stop) when there are none.
    fn take(&self) -> Option<Vec<oneshot::Sender<bool>>> {
        let mut st = self.lock();
        if st.waiting.is_empty() {
            st.running = false;
            return None;
        }
        Some(std::mem::take(&mut st.waiting))
    }
}

/// Runs leadership rounds until no reader waits; each reader learns whether its round passed.
async fn run_read_rounds(raft: Raft, reads: Arc<ReadRounds>) {
    while let Some(waiters) = reads.take() {
        let ok = matches!(
            tokio::time::timeout(DEFAULT_REQUEST_TIMEOUT, raft.ensure_linearizable()).await,
            Ok(Ok(_))
        );
        for w in waiters {
            let _ = w.send(ok);
        }
    }
}

/// Most transactions one group entry carries.
const MAX_GROUP: usize = 1024;
/// Group entries in flight at once: while they replicate, the next group fills up.
const MAX_PROPOSERS: usize = 2;

type Waiter = oneshot::Sender<Result<TxnResult, WriteError>>;

/// Group commit of [`Node::write`]s: concurrent writes queue here and a proposer takes every
/// queued transaction into one log entry ([`Txn::group`]), so one Raft round (one flush on each
/// voter) acknowledges all of them. Each waiter is answered only after its entry is committed
/// (durable on a majority) and applied here.
#[derive(Default)]
struct Combiner {
    state: Mutex<CombinerState>,
}

#[derive(Default)]
struct CombinerState {
    queue: Vec<(Txn, Waiter, Instant)>,
    proposers: usize,
}

impl Combiner {
    fn lock(&self) -> std::sync::MutexGuard<'_, CombinerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `txn`; `true` when the caller must start a proposer.
    fn push(&self, txn: Txn, waiter: Waiter) -> bool {
        let mut st = self.lock();
        st.queue.push((txn, waiter, Instant::now()));
        if st.proposers < MAX_PROPOSERS {
            st.proposers += 1;
            true
        } else {
            false
        }
    }

    /// The next group to propose; `None` (and one proposer fewer) when the queue is empty.
    fn take(&self, timings: &store::Timings) -> Option<Vec<(Txn, Waiter)>> {
        let mut st = self.lock();
        if st.queue.is_empty() {
            st.proposers -= 1;
            return None;
        }
        let n = st.queue.len().min(MAX_GROUP);
        let now = Instant::now();
        Some(
            st.queue
                .drain(..n)
                .map(|(txn, waiter, queued)| {
                    timings
                        .queue
                        .observe(now.duration_since(queued).as_secs_f64());
                    (txn, waiter)
                })
                .collect(),
        )
    }
}

/// What proposing needs, cheap to clone into a task.
#[derive(Clone)]
struct Proposer {
    id: NodeId,
    raft: Raft,
    gate: Arc<GroupGate>,
}

impl Proposer {
    /// Whether a group entry may be proposed now: every voter and learner recently said its
    /// binary reads them (see [`crate::gate`]).
    fn groups_allowed(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let members = m.membership_config.membership().nodes();
        self.gate
            .allows(self.id, members.map(|(id, n)| (*id, n)), Instant::now())
    }

    /// Proposes `txn` (its id already set, if any) and waits until it is applied here.
    async fn propose(&self, txn: Txn, timeout: Duration) -> Result<TxnResult, WriteError> {
        let deadline = Instant::now() + timeout;
        loop {
            let res = tokio::time::timeout_at(deadline, self.raft.client_write(txn.clone()))
                .await
                .map_err(|_| WriteError::Timeout { timeout })?;
            let forward = match res {
                Ok(resp) => return Ok(resp.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => f,
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    return Err(WriteError::Refused(e.to_string()))
                }
                Err(RaftError::Fatal(f)) => return Err(f.into()),
            };
            match self.redirect(forward).await {
                Redirect::NotInitialized => return Err(WriteError::NotInitialized),
                Redirect::Leader(leader_id, leader_node) => {
                    return Err(WriteError::ForwardToLeader {
                        leader_id,
                        leader_node,
                    })
                }
                Redirect::Wait => {
                    if !self.wait_for_leader(deadline).await {
                        return Err(WriteError::Timeout { timeout });
                    }
                }
            }
        }
    }

    async fn redirect(&self, f: ForwardToLeader<NodeId, PloyzNode>) -> Redirect {
        match f.leader_id {
            Some(id) if id != self.id => Redirect::Leader(id, f.leader_node),
            _ if !self.raft.is_initialized().await.unwrap_or(false) => Redirect::NotInitialized,
            _ => Redirect::Wait,
        }
    }

    /// Waits until a leader is known (and, if it is us, until we act as leader). `false` when
    /// the deadline passed first.
    async fn wait_for_leader(&self, deadline: Instant) -> bool {
        let id = self.id;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let ok = self
            .raft
            .wait(Some(remaining))
            .metrics(
                move |m| match m.current_leader {
                    Some(l) if l == id => m.state == ServerState::Leader,
                    Some(_) => true,
                    None => false,
                },
                "leader known",
            )
            .await
            .is_ok();
        // Metrics can run slightly ahead of the core; do not spin.
        tokio::time::sleep(Duration::from_millis(10)).await;
        ok && Instant::now() < deadline
    }
}

/// The same error for every member of a failed group, when it says nothing about one member
/// (no leader here, timeout); `None` when each member must be retried alone.
fn shared_error(e: &WriteError) -> Option<WriteError> {
    match e {
        WriteError::NotInitialized => Some(WriteError::NotInitialized),
        WriteError::ForwardToLeader {
            leader_id,
            leader_node,
        } => Some(WriteError::ForwardToLeader {
            leader_id: *leader_id,
            leader_node: leader_node.clone(),
        }),
        WriteError::Timeout { timeout } => Some(WriteError::Timeout { timeout: *timeout }),
        _ => None,
    }
}

/// What a group's member gets: its answer, or itself to be proposed again alone.
fn member_answer(
    sm: &StateMachineStore,
    group: &Result<TxnResult, WriteError>,
    txn: Txn,
) -> Result<Result<TxnResult, WriteError>, Txn> {
    match group {
        // Committed and applied here: each member's outcome is remembered by its id.
        Ok(_) => match sm.applied_txn(txn.id.as_deref().unwrap_or_default()) {
            Ok(Some(applied)) => Ok(Ok(applied.result)),
            Ok(None) => Err(txn),
            Err(e) => Ok(Err(e.into())),
        },
        Err(e) => shared_error(e).map(Err).ok_or(txn),
    }
}

/// Proposes queued writes as groups until the queue is empty.
async fn run_proposer(proposer: Proposer, sm: StateMachineStore, combiner: Arc<Combiner>) {
    let timings = sm.timings();
    while let Some(mut batch) = combiner.take(&timings) {
        timings.group_size.observe(batch.len() as f64);
        let started = Instant::now();
        if batch.len() == 1 {
            if let Some((txn, waiter)) = batch.pop() {
                let answer = proposer.propose(txn, DEFAULT_REQUEST_TIMEOUT).await;
                timings.propose.observe(started.elapsed().as_secs_f64());
                let _ = waiter.send(answer);
            }
            continue;
        }
        if !proposer.groups_allowed() {
            // A member may not read group entries (older binary, not asked yet): one entry
            // per write, proposed concurrently, as before group commit.
            for (txn, waiter) in batch {
                let proposer = proposer.clone();
                tokio::spawn(async move {
                    let answer = proposer.propose(txn, DEFAULT_REQUEST_TIMEOUT).await;
                    let _ = waiter.send(answer);
                });
            }
            continue;
        }
        let (txns, waiters): (Vec<Txn>, Vec<Waiter>) = batch.into_iter().unzip();
        let res = proposer
            .propose(Txn::group(txns.clone()), DEFAULT_REQUEST_TIMEOUT)
            .await;
        timings.propose.observe(started.elapsed().as_secs_f64());
        for (txn, waiter) in txns.into_iter().zip(waiters) {
            match member_answer(&sm, &res, txn) {
                Ok(answer) => {
                    let _ = waiter.send(answer);
                }
                // Alone, with its id: applied at most once.
                Err(txn) => {
                    let proposer = proposer.clone();
                    tokio::spawn(async move {
                        let answer = proposer.propose(txn, DEFAULT_REQUEST_TIMEOUT).await;
                        let _ = waiter.send(answer);
                    });
                }
            }
        }
    }
}

/// How often the leader looks for members to ask about their features.
const GATE_TICK: Duration = Duration::from_millis(200);
/// How long a member has to answer the features request.
const FEATURES_TIMEOUT: Duration = Duration::from_secs(1);

/// While this node leads, asks the members that are due which features they support.
async fn run_gate<P: FeatureProbe + Clone>(probe: P, raft: Raft, gate: Arc<GroupGate>, me: NodeId) {
    let mut tick = tokio::time::interval(GATE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if m.state != ServerState::Leader {
                continue;
            }
            let members = m.membership_config.membership().nodes();
            gate.due(me, members.map(|(id, n)| (*id, n)), Instant::now())
        };
        let mut asks = tokio::task::JoinSet::new();
        for (id, node) in due {
            let (probe, gate) = (probe.clone(), gate.clone());
            asks.spawn(async move {
                let answer = probe.features(id, &node, FEATURES_TIMEOUT).await;
                if !answer.is_some_and(|f| f.group_commit) {
                    tracing::debug!(
                        node_id = id,
                        machine_id = %node.machine_id,
                        "member does not read group entries (yet): one log entry per write"
                    );
                }
                gate.record(id, &node.addr, answer, Instant::now());
            });
        }
        while asks.join_next().await.is_some() {}
    }
}

impl Node {
    /// Opens the database in `cfg.dir` and starts Raft with the TCP network.
    pub async fn open(cfg: NodeConfig) -> Result<Node, OpenError> {
        let network = TcpNetworkFactory::new(cfg.node_id);
        Self::open_with_network(cfg, network).await
    }

    /// Like [`Node::open`] with another transport.
    pub async fn open_with_network<N>(cfg: NodeConfig, network: N) -> Result<Node, OpenError>
    where
        N: RaftNetworkFactory<crate::TypeConfig> + FeatureProbe + Clone,
    {
        if cfg.snapshot_logs_since_last == 0 {
            return Err(OpenError::InvalidConfig(
                "snapshot_logs_since_last must be > 0".to_string(),
            ));
        }
        let config = cfg.raft_config().map_err(OpenError::RaftConfig)?;
        std::fs::create_dir_all(&cfg.dir).map_err(|source| OpenError::CreateDir {
            path: cfg.dir.clone(),
            source,
        })?;
        let (log, sm) = store::open(&cfg.dir).map_err(|source| OpenError::Store {
            path: cfg.dir.clone(),
            source,
        })?;
        let probe = network.clone();
        log.set_node_id(cfg.node_id);
        let raft = Raft::new(cfg.node_id, Arc::new(config), network, log, sm.clone())
            .await
            .map_err(|f| OpenError::Raft(Box::new(f)))?;
        tracing::info!(
            node_id = cfg.node_id,
            machine_id = %cfg.node.machine_id,
            dir = %cfg.dir.display(),
            "raft node opened"
        );
        let gate = Arc::new(GroupGate::default());
        let gate_task = tokio::spawn(run_gate(probe, raft.clone(), gate.clone(), cfg.node_id));
        Ok(Node {
            id: cfg.node_id,
            raft: raft.clone(),
            sm,
            servers: Mutex::new(Vec::new()),
            proposer: Proposer {
                id: cfg.node_id,
                raft: raft.clone(),
                gate,
            },
            combiner: Arc::new(Combiner::default()),
            reads: Arc::new(ReadRounds::default()),
            gate_task,
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// This replica's storage latency histograms (log append, fsync, apply).
    pub fn timings(&self) -> crate::Timings {
        self.sm.timings()
    }

    /// Answers Raft RPCs on `listener` (bound to this node's `addr`) until shutdown.
    pub fn serve(&self, listener: TcpListener) {
        let task = tokio::spawn(serve_raft(listener, self.raft.clone()));
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// Founds a cluster whose only member is this node, advertised as `me` (its address may
    /// only be known now, e.g. once the overlay is up), and waits until it leads.
    pub async fn initialize_single(&self, me: PloyzNode) -> Result<(), InitError> {
        let members = BTreeMap::from([(self.id, me)]);
        match self.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                return Err(InitError::AlreadyInitialized)
            }
            Err(RaftError::APIError(e @ InitializeError::NotInMembers(_))) => {
                return Err(InitError::Refused(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => return Err(f.into()),
        }
        let timeout = DEFAULT_REQUEST_TIMEOUT;
        self.raft
            .wait(Some(timeout))
            // Leading is not enough: its first entry of the term (and so the initial
            // membership) must be committed, or a membership change right after this returns
            // is refused as in progress. The leader's own flush completes in the background.
            .metrics(
                |m| {
                    m.state == ServerState::Leader
                        && m.last_applied
                            .is_some_and(|l| l.leader_id.term == m.current_term)
                },
                "founder leads and has committed its first entry",
            )
            .await
            .map_err(|_| InitError::Timeout { timeout })?;
        Ok(())
    }

    /// Whether concurrent writes proposed here share log entries now: every voter and learner
    /// recently said it reads group entries (asked while this node leads; see [`Txn::group`]).
    pub fn group_commit(&self) -> bool {
        self.proposer.groups_allowed()
    }

    /// Whether this node belongs to a cluster (it has a log or a vote).
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// Proposes `txn` and waits until it is applied here, up to [`DEFAULT_REQUEST_TIMEOUT`].
    ///
    /// A `txn` without an [`id`](Txn::id) gets one (unique to this node, across restarts): when
    /// this node loses leadership while the write is in flight, it proposes the same
    /// transaction again once a new leader (itself) is elected, and the id makes sure it is
    /// applied at most once. A caller that may retry elsewhere (another node, after
    /// [`WriteError::ForwardToLeader`] or [`WriteError::Timeout`]) sets the id itself and sends
    /// the very same `Txn` each time.
    pub async fn write(&self, txn: Txn) -> Result<TxnResult, WriteError> {
        self.write_timeout(txn, DEFAULT_REQUEST_TIMEOUT).await
    }

    /// [`Node::write`] with an explicit timeout; waits for a leader election if needed.
    ///
    /// Concurrent writes share log entries (group commit, see [`Txn::group`]): each is answered
    /// once the entry carrying it is committed (durable on a majority) and applied here.
    pub async fn write_timeout(
        &self,
        mut txn: Txn,
        timeout: Duration,
    ) -> Result<TxnResult, WriteError> {
        self.assign_id(&mut txn)?;
        let (tx, rx) = oneshot::channel();
        if self.combiner.push(txn, tx) {
            tokio::spawn(run_proposer(
                self.proposer.clone(),
                self.sm.clone(),
                self.combiner.clone(),
            ));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(WriteError::Refused(
                "the proposer stopped before answering; the write may or may not be applied"
                    .to_string(),
            )),
            Err(_) => Err(WriteError::Timeout { timeout }),
        }
    }

    fn assign_id(&self, txn: &mut Txn) -> Result<(), WriteError> {
        if txn.id.is_none() {
            let n = self.sm.generate_id()?;
            txn.id = Some(format!("node{}-{n}", self.id));
        }
        Ok(())
    }

    /// Linearizable read of a key's latest entry (a tombstone if it was deleted last).
    pub async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, ReadError> {
        self.linearize().await?;
        self.get_local(bucket, key)
    }

    /// Linearizable list of the latest entry of every live key, sorted by key.
    pub async fn list(&self, bucket: &str) -> Result<Vec<Entry>, ReadError> {
        self.linearize().await?;
        self.list_local(bucket)
    }

    /// Linearizable list of the latest entry of every key, tombstones included, sorted by key
    /// (what a JetStream `last_per_subject` consumer delivers).
    pub async fn list_all(&self, bucket: &str) -> Result<Vec<Entry>, ReadError> {
        self.linearize().await?;
        self.require_bucket(bucket)?;
        Ok(self.sm.list_all(bucket)?)
    }

    /// Linearizable history of a key, oldest first.
    pub async fn history(&self, bucket: &str, key: &str) -> Result<Vec<Entry>, ReadError> {
        self.linearize().await?;
        self.history_local(bucket, key)
    }

    /// Linearizable bucket statistics; `None` if the bucket does not exist.
    pub async fn bucket(&self, bucket: &str) -> Result<Option<BucketInfo>, ReadError> {
        self.linearize().await?;
        self.bucket_local(bucket)
    }

    /// Reads this node's state machine without asking the leader (may be stale).
    pub fn get_local(&self, bucket: &str, key: &str) -> Result<Option<Entry>, ReadError> {
        self.require_bucket(bucket)?;
        Ok(self.sm.get(bucket, key)?)
    }

    /// Local, possibly stale [`Node::list`].
    pub fn list_local(&self, bucket: &str) -> Result<Vec<Entry>, ReadError> {
        self.require_bucket(bucket)?;
        Ok(self.sm.list(bucket)?)
    }

    /// Local, possibly stale [`Node::history`].
    pub fn history_local(&self, bucket: &str, key: &str) -> Result<Vec<Entry>, ReadError> {
        self.require_bucket(bucket)?;
        Ok(self.sm.history(bucket, key)?)
    }

    /// Local, possibly stale [`Node::bucket`].
    pub fn bucket_local(&self, bucket: &str) -> Result<Option<BucketInfo>, ReadError> {
        Ok(self.sm.bucket_info(bucket)?)
    }

    /// Local list of bucket names.
    pub fn buckets_local(&self) -> Result<Vec<String>, ReadError> {
        Ok(self.sm.buckets()?)
    }

    /// Changes applied on this node from now on. A receiver that falls more than 4096 events
    /// behind gets `RecvError::Lagged` and should re-read; [`KvEvent::Reset`] means the state
    /// was replaced by a snapshot.
    pub fn subscribe(&self) -> broadcast::Receiver<KvEvent> {
        self.sm.subscribe()
    }

    /// Adds a non-voting member; with `blocking`, waits until it has caught up with the log.
    pub async fn add_learner(
        &self,
        node_id: NodeId,
        node: PloyzNode,
        blocking: bool,
    ) -> Result<(), MembershipError> {
        let res = self.raft.add_learner(node_id, node, false).await;
        let entry = res.as_ref().ok().map(|r| r.log_id.index);
        self.membership_result(res).await?;
        let Some(entry) = entry.filter(|_| blocking && node_id != self.id) else {
            return Ok(());
        };
        // openraft's own blocking wait counts a learner that never answered as caught up
        // while the log is shorter than its lag threshold: wait until the learner has
        // acknowledged the entry that added it.
        let caught_up = |m: &openraft::RaftMetrics<NodeId, PloyzNode>| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(&node_id).cloned().flatten())
                .is_some_and(|matched| matched.index >= entry)
        };
        let _ = self
            .raft
            .wait(None)
            .metrics(
                |m| m.replication.is_none() || caught_up(m),
                "learner caught up",
            )
            .await;
        if caught_up(&self.raft.metrics().borrow()) {
            Ok(())
        } else {
            Err(MembershipError::LostLeadership)
        }
    }

    /// Makes `voters` the voting members (they must be learners or voters already); removed
    /// voters leave the cluster entirely.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), MembershipError> {
        let res = self.raft.change_membership(voters, false).await;
        self.membership_result(res).await
    }

    /// Drops non-voting members (a promote that did not finish); voters among `ids` are
    /// refused with an error and nothing changes.
    pub async fn remove_learners(&self, ids: BTreeSet<NodeId>) -> Result<(), MembershipError> {
        let res = self
            .raft
            .change_membership(openraft::ChangeMembers::RemoveNodes(ids), false)
            .await;
        self.membership_result(res).await
    }

    /// Non-voting members now.
    pub fn learners(&self) -> BTreeSet<NodeId> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().learner_ids().collect()
    }

    /// Stops serving RPCs, stops Raft, waits for its tasks to release the database and flushes
    /// it. After this the node only answers local reads; drop it to reopen the directory.
    pub async fn shutdown(&self) -> Result<(), ShutdownError> {
        for task in self
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        self.gate_task.abort();
        self.raft
            .shutdown()
            .await
            .map_err(|e| ShutdownError::Raft(e.to_string()))?;
        // Our own handle is the one left once openraft's tasks (core, state machine worker,
        // replication, snapshot builds) have dropped theirs.
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        while self.sm.db_users() > 1 {
            if Instant::now() >= deadline {
                return Err(ShutdownError::DatabaseBusy {
                    users: self.sm.db_users() - 1,
                    timeout: RELEASE_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.sm.flush().await?;
        tracing::info!(node_id = self.id, "raft node shut down");
        Ok(())
    }

    // ---- helpers ----

    /// One lookup: a get must not cost a scan of its bucket.
    fn require_bucket(&self, bucket: &str) -> Result<(), ReadError> {
        if self.sm.has_bucket(bucket)? {
            Ok(())
        } else {
            Err(ReadError::NoSuchBucket {
                bucket: bucket.to_string(),
            })
        }
    }

    async fn redirect(&self, f: ForwardToLeader<NodeId, PloyzNode>) -> Redirect {
        self.proposer.redirect(f).await
    }

    async fn wait_for_leader(&self, deadline: Instant) -> bool {
        self.proposer.wait_for_leader(deadline).await
    }

    /// openraft's quorum report with the voters named.
    fn no_quorum(&self, q: &QuorumNotEnough<NodeId>) -> NoQuorum {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<(NodeId, Option<&PloyzNode>)> = membership
            .voter_ids()
            .map(|id| (id, membership.get_node(&id)))
            .collect();
        NoQuorum::new(&q.got, &voters)
    }

    /// Waits until this node may answer a linearizable read: it leads, a quorum confirmed it
    /// after the call began, and it applied everything committed then. Concurrent readers share
    /// one such round ([`ReadRounds`]); on any failure each reader runs its own, which says why.
    async fn linearize(&self) -> Result<(), ReadError> {
        let (tx, rx) = oneshot::channel();
        if self.reads.push(tx) {
            tokio::spawn(run_read_rounds(self.raft.clone(), self.reads.clone()));
        }
        match rx.await {
            Ok(true) => Ok(()),
            _ => self.linearize_alone().await,
        }
    }

    async fn linearize_alone(&self) -> Result<(), ReadError> {
        let timeout = DEFAULT_REQUEST_TIMEOUT;
        let deadline = Instant::now() + timeout;
        loop {
            let res = tokio::time::timeout_at(deadline, self.raft.ensure_linearizable())
                .await
                .map_err(|_| ReadError::Timeout { timeout })?;
            let forward = match res {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => f,
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                    return Err(ReadError::NoQuorum(self.no_quorum(&q)))
                }
                Err(RaftError::Fatal(f)) => return Err(f.into()),
            };
            match self.redirect(forward).await {
                Redirect::NotInitialized => return Err(ReadError::NotInitialized),
                Redirect::Leader(leader_id, leader_node) => {
                    return Err(ReadError::ForwardToLeader {
                        leader_id,
                        leader_node,
                    })
                }
                Redirect::Wait => {
                    if !self.wait_for_leader(deadline).await {
                        return Err(ReadError::Timeout { timeout });
                    }
                }
            }
        }
    }

    async fn membership_result<T>(
        &self,
        res: Result<T, RaftError<NodeId, ClientWriteError<NodeId, PloyzNode>>>,
    ) -> Result<(), MembershipError> {
        let forward = match res {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => f,
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                return Err(e.into())
            }
            Err(RaftError::Fatal(f)) => return Err(f.into()),
        };
        Err(match self.redirect(forward).await {
            Redirect::NotInitialized => MembershipError::NotInitialized,
            Redirect::Leader(leader_id, leader_node) => MembershipError::ForwardToLeader {
                leader_id,
                leader_node,
            },
            Redirect::Wait => MembershipError::NoLeader,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for task in self
            .servers
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        self.gate_task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_quorum_names_the_voters_it_cannot_reach() {
        let node = |m: &str| PloyzNode {
            machine_id: m.into(),
            addr: "10.0.0.1:7101".into(),
        };
        let (a, b, c) = (node("aaaa"), node("bbbb"), node("cccc"));
        let voters = [(1, Some(&a)), (2, Some(&b)), (3, Some(&c)), (4, None)];
        let q = NoQuorum::new(&BTreeSet::from([1]), &voters[..3]);
        assert_eq!(
            q.to_string(),
            "no quorum: the leader reaches 1 of 3 storage voters and needs 2; not reachable: bbbb, cccc"
        );
        let q = NoQuorum::new(&BTreeSet::from([1, 2]), &voters);
        assert_eq!((q.reachable, q.voters, q.needed), (2, 4, 3));
        assert_eq!(q.unreachable, ["cccc", "node 4"]);
        let msg = ReadError::NoQuorum(q).to_string();
        assert!(!msg.contains('{') && !msg.contains("BTreeSet"), "{msg}");
    }
}
