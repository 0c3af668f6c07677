//! The daemon core: one [`Request`] in, one reply out. Everything the socket
//! and the peers ask of a machine goes through [`Daemon::handle`].
//!
//! Store access goes through [`Daemon::write`], [`Daemon::get`] and
//! [`Daemon::list`]: served by the local Raft replica when it can, otherwise
//! forwarded over the peer channel to the leader (or, on a compute machine,
//! to any storage machine, which forwards in turn).

use crate::identity::Identity;
use crate::peer::{
    self, ClusterSecret, KvRead, KvReadResult, PeerRequest, PeerResponse, SecretSlot,
};
use crate::rules;
use crate::store::{self, put, Versioned};
use ployz_api::invite::{self, InviteClaims};
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::{
    Entry, Expect, InitError, Node, NodeConfig, PloyzNode, ReadError, Rejection, TcpNetworkFactory,
    Txn, TxnResult, WriteError,
};
use ployz_mesh::overlay::ClusterRange;
use ployz_runtime::RuntimeKind;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Longest invite lifetime accepted (7 days).
pub const MAX_INVITE_TTL_SECS: u64 = 7 * 24 * 3600;
/// Compare-and-set retries before a contended update gives up.
pub(crate) const CAS_RETRIES: usize = 16;
/// Forwarding hops before a request is considered looping.
const MAX_HOPS: u8 = 3;
/// Deadline of one forwarded call.
pub(crate) const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// File with the network secret and the storage machines, 0600.
pub const CLUSTER_FILE: &str = "cluster.json";

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub runtime: RuntimeKind,
    pub region: String,
    pub wg_port: u16,
    /// Where peers reach this ployzd, `ip:port` (advertised in records).
    pub peer_addr: String,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
    /// NATS client port (0: any free one).
    pub nats_port: u16,
    /// Run the WireGuard mesh (off only where machines already share a
    /// private network, e.g. several daemons on one test host).
    pub mesh: bool,
    pub wg_interface: String,
    /// Addresses the NATS server listens on besides loopback and the overlay.
    pub nats_listen: Vec<IpAddr>,
}

/// What a machine keeps about its network outside the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ClusterFile {
    pub secret: ClusterSecret,
    pub network_name: String,
    /// Storage machines as `(machine_id, peer_addr)`, refreshed as they change.
    pub storage_peers: Vec<(String, String)>,
    /// Last known network record and machines: enough to bring the mesh up
    /// after a restart before the store (reached over the mesh) answers.
    #[serde(default)]
    pub network: Option<NetworkRecord>,
    #[serde(default)]
    pub machines: Vec<MachineRecord>,
}

pub struct Daemon {
    pub(crate) cfg: DaemonConfig,
    pub(crate) identity: Identity,
    pub(crate) node: Node,
    pub(crate) secret: SecretSlot,
    pub(crate) cluster: RwLock<Option<ClusterFile>>,
    pub(crate) hostname: String,
    /// Serialises `mesh init` and `invite import` so a machine founds or
    /// joins at most one network.
    pub(crate) init_lock: tokio::sync::Mutex<()>,
    /// Set when the network asked this machine to leave: main exits.
    pub(crate) exit: tokio::sync::watch::Sender<bool>,
    /// The embedded NATS server, started once the machine is in a network.
    pub(crate) nats: std::sync::OnceLock<crate::nats::Nats>,
    /// This daemon's own client of the control plane.
    pub(crate) bus: std::sync::OnceLock<std::sync::Arc<crate::bus::Bus>>,
    /// Store change events relayed from a storage machine, for a machine
    /// without a replica of its own.
    pub(crate) remote_events: tokio::sync::broadcast::Sender<ployz_consensus::KvEvent>,
    /// The WireGuard mesh, once this machine has an overlay address.
    pub(crate) overlay: std::sync::OnceLock<crate::overlay::Overlay>,
    pub(crate) mesh_lock: tokio::sync::Mutex<()>,
    /// The workload runtime and image store, opened on first use.
    pub(crate) workloads: std::sync::OnceLock<crate::workloads::Workloads>,
    pub(crate) workloads_init: std::sync::Mutex<()>,
    /// The image store before the runtime is needed (a deploy's import).
    pub(crate) images: std::sync::Mutex<Option<std::sync::Arc<ployz_runtime::image::ImageStore>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        dir: PathBuf,
        source: ployz_consensus::OpenError,
    },
    #[error("{path} is corrupt ({why}); restore it or remove the data directory to start afresh")]
    ClusterFile { path: PathBuf, why: String },
}

pub(crate) fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

pub(crate) fn internal(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Internal, msg)
}

pub(crate) fn refused(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Refused, msg)
}

/// A DNS-label-like name of at most `max` bytes: lowercase letters, digits
/// and '-', not at either end. Fits hostnames and KV keys.
pub(crate) fn validate_label(what: &str, name: &str, max: usize) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid {what} `{name}`: use 1-{max} lowercase letters, digits and '-', not starting or ending with '-'"
        )))
    }
}

/// Network names: DNS-label-like, so they fit in hostnames and KV keys.
pub fn validate_network_name(name: &str) -> Result<(), ApiError> {
    validate_label("network name", name, 63)
}

pub fn validate_region(region: &str) -> Result<(), ApiError> {
    let ok = !region.is_empty()
        && region.len() <= 63
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid region `{region}`: use 1-63 letters, digits, '-' or '_'"
        )))
    }
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Daemon {
    pub async fn open(cfg: DaemonConfig) -> Result<Daemon, StartError> {
        let identity = Identity::load_or_create(&cfg.data_dir)?;
        let cluster_path = cfg.data_dir.join(CLUSTER_FILE);
        let cluster: Option<ClusterFile> = match std::fs::read(&cluster_path) {
            Ok(bytes) => {
                Some(
                    serde_json::from_slice(&bytes).map_err(|e| StartError::ClusterFile {
                        path: cluster_path.clone(),
                        why: e.to_string(),
                    })?,
                )
            }
            Err(_) => None,
        };
        let secret = SecretSlot::default();
        secret.set(cluster.as_ref().map(|c| c.secret.clone()));
        let store_dir = cfg.data_dir.join("store");
        let network = TcpNetworkFactory::with_dialer(
            identity.node_id,
            peer::RaftDialer {
                secret: secret.clone(),
                me: identity.machine_id.clone(),
            },
        );
        let node = Node::open_with_network(
            NodeConfig {
                node_id: identity.node_id,
                node: PloyzNode {
                    machine_id: identity.machine_id.clone(),
                    addr: cfg.peer_addr.clone(),
                },
                dir: store_dir.clone(),
                snapshot_logs_since_last: cfg.snapshot_every,
            },
            network,
        )
        .await
        .map_err(|source| StartError::Store {
            dir: store_dir,
            source,
        })?;
        if cluster
            .as_ref()
            .and_then(|c| c.network.as_ref())
            .is_some_and(|n| n.mesh)
        {
            // Peers are reached over the mesh, which comes up a moment after
            // start: no election until then, or a restarted follower would
            // depose a healthy leader it simply had not heard from yet.
            node.raft().runtime_config().elect(false);
        }
        let (exit, _) = tokio::sync::watch::channel(false);
        let (remote_events, _) = tokio::sync::broadcast::channel(4096);
        Ok(Daemon {
            cfg,
            identity,
            node,
            secret,
            cluster: RwLock::new(cluster),
            hostname: hostname(),
            init_lock: tokio::sync::Mutex::new(()),
            exit,
            nats: std::sync::OnceLock::new(),
            bus: std::sync::OnceLock::new(),
            remote_events,
            overlay: std::sync::OnceLock::new(),
            mesh_lock: tokio::sync::Mutex::new(()),
            workloads: std::sync::OnceLock::new(),
            workloads_init: std::sync::Mutex::new(()),
            images: std::sync::Mutex::new(None),
        })
    }

    pub fn machine_id(&self) -> &str {
        &self.identity.machine_id
    }

    /// Resolves when the network has asked this machine to leave.
    pub fn exit_requested(&self) -> tokio::sync::watch::Receiver<bool> {
        self.exit.subscribe()
    }

    pub async fn shutdown(&self) {
        if let Some(n) = self.nats.get() {
            n.shutdown().await;
        }
        if let Err(e) = self.node.shutdown().await {
            tracing::warn!("store shutdown: {e}");
        }
    }

    pub(crate) fn cluster_file(&self) -> Option<ClusterFile> {
        self.cluster
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn save_cluster_file(&self, file: Option<ClusterFile>) -> Result<(), ApiError> {
        let path = self.cfg.data_dir.join(CLUSTER_FILE);
        match &file {
            Some(f) => crate::identity::write_private_atomic(
                &path,
                &serde_json::to_vec_pretty(f).expect("cluster file serialises"),
            )
            .map_err(|e| internal(format!("cannot write {}: {e}", path.display())))?,
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        self.secret.set(file.as_ref().map(|f| f.secret.clone()));
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = file;
        Ok(())
    }

    /// Where peers reach a machine with `overlay_ip` whose ployzd listens on
    /// `port`: over the mesh when it runs, else the advertised underlay.
    pub(crate) fn control_addr(&self, mesh: bool, overlay_ip: &str, underlay: &str) -> String {
        if mesh {
            let port = underlay
                .parse::<std::net::SocketAddr>()
                .map(|a| a.port())
                .unwrap_or(peer::DEFAULT_PEER_PORT);
            format!("{overlay_ip}:{port}")
        } else {
            underlay.to_string()
        }
    }

    /// Remember the machines (for the mesh after a restart).
    pub(crate) fn cache_machines(&self, net: Option<NetworkRecord>, machines: Vec<MachineRecord>) {
        let Some(mut file) = self.cluster_file() else {
            return;
        };
        let net = net.or(file.network.clone());
        if file.machines == machines && file.network == net {
            return;
        }
        file.machines = machines;
        file.network = net;
        if let Err(e) = self.save_cluster_file(Some(file)) {
            tracing::warn!("{e}");
        }
    }

    /// Remember the current storage machines (for forwarding from a
    /// machine that holds no replica).
    pub(crate) fn set_storage_peers(&self, peers: Vec<(String, String)>) {
        let mut file = match self.cluster_file() {
            Some(f) if f.storage_peers != peers && !peers.is_empty() => f,
            _ => return,
        };
        file.storage_peers = peers;
        if let Err(e) = self.save_cluster_file(Some(file)) {
            tracing::warn!("{e}");
        }
    }

    pub async fn handle(&self, req: Request) -> Result<Response, ApiError> {
        let (sink, _) = tokio::sync::mpsc::unbounded_channel();
        self.handle_with(req, 0, &sink).await
    }

    pub(crate) async fn handle_hops(&self, req: Request, hops: u8) -> Result<Response, ApiError> {
        let (sink, _) = tokio::sync::mpsc::unbounded_channel();
        self.handle_with(req, hops, &sink).await
    }

    /// Handle a request, sending live progress of long ones to `sink`.
    pub async fn handle_with(
        &self,
        req: Request,
        hops: u8,
        sink: &crate::provisioning::ProgressSink,
    ) -> Result<Response, ApiError> {
        match req {
            Request::MachineAdd(add) => self.machine_add(*add, sink).await.map(Response::Targets),
            Request::MachineUpdate {
                version,
                machines,
                release_url,
                identity,
            } => self
                .machine_update(version, machines, release_url, identity, sink)
                .await
                .map(Response::Targets),
            Request::MeshInit {
                network,
                region,
                cidr,
            } => self.mesh_init(network, region, cidr).await,
            Request::MeshStatus => self
                .mesh_status()
                .await
                .map(|s| Response::Status(Box::new(s))),
            Request::MachineList => self.machine_list().await.map(Response::Machines),
            Request::Lifecycle {
                machine,
                action,
                force,
            } => self
                .lifecycle(&machine, action, force)
                .await
                .map(|r| Response::Machine(Box::new(r))),
            Request::InviteCreate { ttl_secs } => self
                .invite_create(ttl_secs)
                .await
                .map(Response::InviteCreated),
            Request::InviteList => self.invite_list().await.map(Response::Invites),
            Request::InviteRevoke { invite_id } => {
                self.invite_revoke(&invite_id).await.map(Response::Invite)
            }
            Request::InviteImport { token } => self
                .invite_import(&token)
                .await
                .map(|s| Response::Status(Box::new(s))),
            Request::StoragePromote { replicas, machines } => self
                .storage_promote(replicas, machines, hops)
                .await
                .map(Response::Promoted),
            Request::NatsUrl => self.nats_url().map(Response::Nats),
            Request::MachineRtt => self.machine_rtt().await.map(Response::Rtt),
            Request::MachineRm { machine, force } => self
                .machine_rm(&machine, force, hops)
                .await
                .map(Response::Removed),
            Request::ServiceDeploy(req) => self
                .service_deploy(*req, sink)
                .await
                .map(|v| Response::Service(Box::new(v))),
            Request::ServiceList => self.service_list().await.map(Response::Services),
            Request::ServiceLogs { name, slot, tail } => self
                .service_logs(&name, slot, tail)
                .await
                .map(Response::Logs),
            Request::ServiceRm { name } => self
                .service_rm(&name, sink)
                .await
                .map(Response::ServiceRemoved),
            Request::ServiceMigrate { name, to, from } => self
                .service_migrate(&name, &to, from.as_deref(), sink)
                .await
                .map(|v| Response::Service(Box::new(v))),
        }
    }

    // -----------------------------------------------------------------------
    // Store access with forwarding

    async fn forward(&self, addr: &str, req: PeerRequest) -> Result<PeerResponse, ApiError> {
        let secret = self.secret.get().ok_or_else(store::no_network)?;
        peer::call(addr, &secret, self.machine_id(), &req, PEER_CALL_TIMEOUT)
            .await
            .map_err(|e| store::unavailable(format!("forwarding to {addr} failed: {e}")))
    }

    /// Forward to the storage machines this one knows, first answer wins.
    async fn forward_any(&self, req: PeerRequest) -> Result<PeerResponse, ApiError> {
        let peers = match self.cluster_file() {
            Some(f) => f.storage_peers,
            None => return Err(store::no_network()),
        };
        let mut errors = Vec::new();
        for (id, addr) in peers.iter().filter(|(id, _)| id != self.machine_id()) {
            match self.forward(addr, req.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) => errors.push(format!("{id} ({addr}): {}", e.message)),
            }
        }
        Err(store::unavailable(format!(
            "no storage machine answered [{}]",
            errors.join("; ")
        )))
    }

    async fn route(
        &self,
        leader: Option<PloyzNode>,
        req: PeerRequest,
        hops: u8,
    ) -> Result<PeerResponse, ApiError> {
        if hops >= MAX_HOPS {
            return Err(store::unavailable(
                "the request was forwarded too many times (leadership is changing); retry",
            ));
        }
        match leader {
            Some(n) if !n.addr.is_empty() && n.machine_id != self.identity.machine_id => {
                self.forward(&n.addr, req).await
            }
            Some(_) => Err(store::unavailable(
                "no storage leader is elected right now (an election is in progress, or a majority of storage machines is unreachable)",
            )),
            None => self.forward_any(req).await,
        }
    }

    pub(crate) async fn write_txn(&self, txn: Txn, hops: u8) -> Result<TxnResult, ApiError> {
        let leader = match self.node.write(txn.clone()).await {
            Ok(r) => return Ok(r),
            Err(WriteError::ForwardToLeader { leader_node, .. }) => {
                Some(leader_node.unwrap_or_default())
            }
            Err(WriteError::NotInitialized) => None,
            Err(e) => return Err(store::map_write(e)),
        };
        match self
            .route(
                leader,
                PeerRequest::Write {
                    txn,
                    hops: hops + 1,
                },
                hops,
            )
            .await?
        {
            PeerResponse::Written(r) => Ok(r),
            PeerResponse::Error(e) => Err(e),
            other => Err(internal(format!("unexpected peer answer {other:?}"))),
        }
    }

    /// A linearizable read, from the local replica when it can serve it,
    /// else forwarded towards the leader.
    pub(crate) async fn read(&self, read: KvRead, hops: u8) -> Result<KvReadResult, ApiError> {
        let local = match &read {
            KvRead::Get { bucket, key } => {
                self.node.get(bucket, key).await.map(KvReadResult::Entry)
            }
            KvRead::List { bucket } => self.node.list(bucket).await.map(KvReadResult::Entries),
            KvRead::ListAll { bucket } => {
                self.node.list_all(bucket).await.map(KvReadResult::Entries)
            }
            KvRead::History { bucket, key } => self
                .node
                .history(bucket, key)
                .await
                .map(KvReadResult::Entries),
            KvRead::Bucket { bucket } => self.node.bucket(bucket).await.map(KvReadResult::Bucket),
            KvRead::Buckets => {
                if self.node.is_initialized().await {
                    self.node.buckets_local().map(KvReadResult::Buckets)
                } else {
                    Err(ReadError::NotInitialized)
                }
            }
        };
        let leader = match local {
            Ok(r) => return Ok(r),
            Err(ReadError::NoSuchBucket { bucket }) => {
                return Ok(KvReadResult::NoSuchBucket(bucket))
            }
            Err(ReadError::ForwardToLeader { leader_node, .. }) => {
                Some(leader_node.unwrap_or_default())
            }
            Err(ReadError::NotInitialized) => None,
            Err(e) => return Err(store::map_read(e)),
        };
        let req = PeerRequest::Read {
            read,
            hops: hops + 1,
        };
        match self.route(leader, req, hops).await? {
            PeerResponse::Read(r) => Ok(r),
            PeerResponse::Error(e) => Err(e),
            other => Err(internal(format!("unexpected peer answer {other:?}"))),
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
        match self
            .read(
                KvRead::List {
                    bucket: bucket.into(),
                },
                0,
            )
            .await?
        {
            KvReadResult::Entries(e) => Ok(e),
            KvReadResult::NoSuchBucket(_) => Ok(Vec::new()),
            other => Err(internal(format!("unexpected read result {other:?}"))),
        }
    }

    /// Apply `ops` atomically. `Ok(Err(..))` is a replicated rejection: the
    /// store is fine, a precondition did not hold, nothing changed.
    pub(crate) async fn txn(
        &self,
        ops: Vec<ployz_consensus::Op>,
    ) -> Result<Result<Vec<u64>, (usize, Rejection)>, ApiError> {
        let txn = Txn {
            ops,
            now_ms: now_ms(),
        };
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
            Some(e) if e.is_live() => store::decode(&e).map(Some),
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
            .map(store::decode)
            .collect()
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
        Err(store::unavailable(format!(
            "machine {id} kept changing under {CAS_RETRIES} attempts to update it"
        )))
    }

    /// Whether this machine is in a network (founded or joined).
    pub(crate) async fn in_network(&self) -> bool {
        self.cluster_file().is_some() || self.node.is_initialized().await
    }

    /// The Raft voters as `(machine_id, peer_addr)`, from this replica's view.
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
        let id = self.identity.node_id;
        let found = metrics
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some();
        found
    }

    /// Store change events: the local replica's, or those relayed from a
    /// storage machine.
    pub(crate) fn kv_events(&self) -> tokio::sync::broadcast::Receiver<ployz_consensus::KvEvent> {
        if self.has_replica() {
            self.node.subscribe()
        } else {
            self.remote_events.subscribe()
        }
    }

    /// The network's NATS password, derived from its secret.
    pub(crate) fn nats_password(&self) -> Option<String> {
        use hkdf::Hkdf;
        let secret = self.secret.get()?;
        let key = ployz_api::invite::b64url_decode(&secret.key).ok()?;
        let mut out = [0u8; 24];
        Hkdf::<sha2::Sha256>::new(Some(secret.network_id.as_bytes()), &key)
            .expand(b"ployz nats password v1", &mut out)
            .ok()?;
        Some(ployz_api::invite::b64url(&out))
    }

    fn nats_url(&self) -> Result<NatsInfo, ApiError> {
        let n = self.nats.get().ok_or_else(|| {
            if self.cluster_file().is_none() {
                store::no_network()
            } else {
                store::unavailable("the NATS server is starting; retry in a moment")
            }
        })?;
        let password = self.nats_password().ok_or_else(store::no_network)?;
        let mut servers = vec![format!("127.0.0.1:{}", n.port)];
        let mut ips = vec![self
            .overlay
            .get()
            .map(|o| IpAddr::V4(o.address))
            .unwrap_or_else(|| self.advertise_ip())];
        ips.extend_from_slice(&self.cfg.nats_listen);
        for ip in ips {
            let s = std::net::SocketAddr::new(ip, n.port).to_string();
            if !ip.is_loopback() && !servers.contains(&s) {
                servers.push(s);
            }
        }
        Ok(NatsInfo {
            url: format!(
                "nats://{}:{password}@127.0.0.1:{}",
                crate::nats::NATS_USER,
                n.port
            ),
            user: crate::nats::NATS_USER.into(),
            password,
            servers,
        })
    }

    pub(crate) fn advertise_ip(&self) -> IpAddr {
        self.cfg
            .peer_addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    }

    /// Ask machine `id` something over the control plane (request/reply).
    pub(crate) async fn call_machine(
        &self,
        id: &str,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let body = serde_json::to_vec(req).expect("requests serialise");
        let subject = crate::bus::subject_for(id);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Right after start or join the client and the routes take a
            // moment; "nobody answers" is only final at the deadline.
            let not_yet = match self.bus.get() {
                None => "this machine's control plane is still starting".to_string(),
                Some(bus) => match bus.request(&subject, &body, left).await {
                    Ok(answer) => {
                        return serde_json::from_slice(&answer)
                            .map_err(|e| format!("malformed answer: {e}"))
                    }
                    Err(e @ crate::bus::BusError::NoResponders(_)) => e.to_string(),
                    Err(e) => return Err(e.to_string()),
                },
            };
            if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                return Err(not_yet);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Accept a NATS route that arrived over the peer channel.
    pub(crate) fn accept_route(&self, stream: tokio::io::DuplexStream, from: String) {
        match self.nats.get() {
            Some(n) => {
                n.server.attach_route(stream, from);
            }
            None => tracing::debug!(%from, "route refused: NATS not started yet"),
        }
    }

    /// Answer a peer's `rpc` request.
    pub async fn peer_rpc(&self, req: PeerRequest) -> PeerResponse {
        match req {
            PeerRequest::Ping => PeerResponse::Pong {
                machine_id: self.machine_id().to_string(),
            },
            PeerRequest::Write { txn, hops } => match self.write_txn(txn, hops).await {
                Ok(r) => PeerResponse::Written(r),
                Err(e) => PeerResponse::Error(e),
            },
            PeerRequest::Read { read, hops } => match self.read(read, hops).await {
                Ok(r) => PeerResponse::Read(r),
                Err(e) => PeerResponse::Error(e),
            },
            PeerRequest::Api { request, hops } => {
                PeerResponse::Api(Reply::from(Box::pin(self.handle_hops(request, hops)).await))
            }
            PeerRequest::Leave { by } => self.leave(&by).await,
            PeerRequest::Rtt => PeerResponse::Rtt(self.rtt_rows()),
            PeerRequest::RemoveVoter { machine, hops } => {
                match Box::pin(self.remove_voter(&machine, hops)).await {
                    Ok(left) => PeerResponse::VoterRemoved(left),
                    Err(e) => PeerResponse::Error(e),
                }
            }
            PeerRequest::PullVolume { name, from } => {
                match Box::pin(self.pull_volume(&name, &from)).await {
                    Ok((bytes, sha256)) => PeerResponse::VolumePulled { bytes, sha256 },
                    Err(e) => PeerResponse::Error(e),
                }
            }
            PeerRequest::Logs {
                service,
                slot,
                tail,
            } => match self.local_logs(&service, slot, tail).await {
                Ok(l) => PeerResponse::Logs(l),
                Err(e) => PeerResponse::Error(e),
            },
            PeerRequest::DropVolume { name } => match self.drop_volume(&name).await {
                Ok(dropped) => PeerResponse::VolumeDropped { dropped },
                Err(e) => PeerResponse::Error(e),
            },
        }
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
        self.network().await?.ok_or_else(store::no_network)
    }

    pub(crate) fn endpoints(&self, range: &ClusterRange) -> Vec<String> {
        let addrs = match ployz_mesh::endpoints::local_addrs() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("cannot list local addresses: {e}");
                return Vec::new();
            }
        };
        let net = range.net();
        ployz_mesh::endpoints::candidates(&addrs, self.cfg.wg_port, |ip| match ip {
            IpAddr::V4(v4) => net.contains(v4),
            IpAddr::V6(_) => false,
        })
    }

    /// Addresses a joiner may use to reach this machine's peer port: the
    /// advertised one first, then the other endpoint candidates.
    fn peer_addrs(&self, range: &ClusterRange) -> Vec<String> {
        let port = self
            .cfg
            .peer_addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.port())
            .unwrap_or(peer::DEFAULT_PEER_PORT);
        let mut out = vec![self.cfg.peer_addr.clone()];
        for e in self.endpoints(range) {
            if let Ok(a) = e.parse::<std::net::SocketAddr>() {
                let s = std::net::SocketAddr::new(a.ip(), port).to_string();
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        out
    }

    async fn mesh_init(
        &self,
        network: String,
        region: Option<String>,
        cidr: Option<String>,
    ) -> Result<Response, ApiError> {
        validate_network_name(&network)?;
        let region = region.unwrap_or_else(|| self.cfg.region.clone());
        validate_region(&region)?;
        let cidr = cidr.unwrap_or_else(|| DEFAULT_CLUSTER_CIDR.to_string());
        let range = ClusterRange::parse(&cidr).map_err(|e| invalid(e.to_string()))?;

        let _guard = self.init_lock.lock().await;
        if let Some(existing) = self.network().await? {
            return Err(ApiError::new(
                ErrorCode::AlreadyInNetwork,
                format!(
                    "this machine already belongs to network `{}` ({})",
                    existing.name, existing.network_id
                ),
            )
            .with_hint("a machine is in one network at a time; remove it from that network first (`ployzctl machine rm`)"));
        }
        // The founder always takes the first slice: the store is empty.
        let slice = range.slice(1).expect("a valid range has slice 1");
        let overlay_ip = slice.overlay_ip();
        let node = &self.node;
        let control =
            self.control_addr(self.cfg.mesh, &overlay_ip.to_string(), &self.cfg.peer_addr);
        match node
            .initialize_single(PloyzNode {
                machine_id: self.identity.machine_id.clone(),
                addr: control.clone(),
            })
            .await
        {
            // A crash after initialising but before the records were
            // written leaves an initialised, empty store: finish the job.
            Ok(()) | Err(InitError::AlreadyInitialized) => {}
            Err(e) => return Err(store::unavailable(e)),
        }

        let now = now_ms();
        let id = &self.identity.machine_id;
        let net = NetworkRecord {
            network_id: format!("net-{}", random_hex(8)),
            name: network,
            cidr: range.net().to_string(),
            founder: id.clone(),
            storage_replicas: 1,
            created_at_ms: now,
            mesh: self.cfg.mesh,
        };
        let machine = MachineRecord {
            id: id.clone(),
            hostname: self.hostname.clone(),
            lifecycle: Lifecycle::Active,
            authority: Authority::Storage,
            region,
            region_role: RegionRole::Primary,
            overlay_ip: overlay_ip.to_string(),
            subnet: slice.net.to_string(),
            version: VERSION.to_string(),
            runtime: self.cfg.runtime.to_string(),
            identity_key: self.identity.identity_key_b64(),
            wg_public_key: self.identity.wg.public_base64(),
            endpoints: self.endpoints(&range),
            peer_addr: control.clone(),
            ssh_target: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let claim = SubnetClaim {
            subnet: slice.net.to_string(),
            machine_id: id.clone(),
        };
        let mut ops = store::create_buckets();
        ops.push(put(BUCKET_NETWORK, NETWORK_KEY, &net, Expect::Absent));
        ops.push(put(BUCKET_SUBNETS, &slice.key(), &claim, Expect::Absent));
        ops.push(put(BUCKET_MACHINES, id, &machine, Expect::Absent));
        if let Err((i, why)) = self.txn(ops).await? {
            return Err(internal(format!(
                "founding the network was rejected by the store at step {i}: {why}"
            )));
        }
        self.save_cluster_file(Some(ClusterFile {
            secret: ClusterSecret::generate(net.network_id.clone()),
            network_name: net.name.clone(),
            storage_peers: vec![(id.clone(), control.clone())],
            network: Some(net.clone()),
            machines: vec![machine.clone()],
        }))?;
        self.ensure_mesh(&net, &machine).await.map_err(|e| {
            internal(format!("the network was founded, but {e}"))
                .with_hint("see the ployzd log; ployzd retries bringing the mesh up every second")
        })?;
        tracing::info!(network = %net.name, machine = %id, "founded network");
        self.mesh_status()
            .await
            .map(|s| Response::Status(Box::new(s)))
    }

    /// Always answers, also without a store majority (it is what one runs
    /// to find out why the store does not answer): then the network and
    /// machine records are this machine's last known copies and
    /// `store_error` says why the store could not be asked.
    pub(crate) async fn mesh_status(&self) -> Result<MeshStatus, ApiError> {
        let cached = self.cluster_file();
        let fresh = async {
            let network = self.network().await?;
            let machine = match &network {
                Some(_) => self
                    .get::<MachineRecord>(BUCKET_MACHINES, &self.identity.machine_id)
                    .await?
                    .map(|v| v.value),
                None => None,
            };
            Ok::<_, ApiError>((network, machine))
        };
        let (network, machine, store_error) = match fresh.await {
            Ok((n, m)) => (n, m, None),
            Err(e) => {
                let n = cached.as_ref().and_then(|c| c.network.clone());
                let m = cached.as_ref().and_then(|c| {
                    c.machines
                        .iter()
                        .find(|m| m.id == self.identity.machine_id)
                        .cloned()
                });
                (n, m, Some(e.message))
            }
        };
        let mut store = self.store_status();
        store.error = store_error;
        Ok(MeshStatus {
            machine_id: self.identity.machine_id.clone(),
            version: VERSION.to_string(),
            network: network.as_ref().map(NetworkView::from),
            machine: machine.as_ref().map(MachineView::from),
            store,
        })
    }

    fn store_status(&self) -> StoreStatus {
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
                .cluster_file()
                .map(|f| f.storage_peers.into_iter().map(|(id, _)| id).collect())
                .unwrap_or_default(),
            error: None,
        }
    }

    pub(crate) async fn machines(&self) -> Result<Vec<Versioned<MachineRecord>>, ApiError> {
        self.require_network().await?;
        let mut ms = self.list::<MachineRecord>(BUCKET_MACHINES).await?;
        ms.sort_by(|a, b| {
            (a.value.created_at_ms, &a.value.id).cmp(&(b.value.created_at_ms, &b.value.id))
        });
        Ok(ms)
    }

    async fn machine_list(&self) -> Result<MachineList, ApiError> {
        Ok(MachineList {
            machines: self
                .machines()
                .await?
                .iter()
                .map(|m| MachineView::from(&m.value))
                .collect(),
        })
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

    async fn live_workloads_on(&self, machine: &str) -> Result<Vec<String>, ApiError> {
        let mut names: Vec<String> = self
            .list::<InstanceRecord>(BUCKET_INSTANCES)
            .await?
            .into_iter()
            .map(|v| v.value)
            .filter(|i| i.machine == machine && i.is_live())
            .map(|i| i.service)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn lifecycle(
        &self,
        wanted: &str,
        action: LifecycleAction,
        force: bool,
    ) -> Result<LifecycleResult, ApiError> {
        for _ in 0..CAS_RETRIES {
            let current = self.resolve_machine(wanted).await?;
            let workloads = self.live_workloads_on(&current.value.id).await?;
            let decision = rules::decide(
                &current.value.id,
                current.value.lifecycle,
                action,
                force,
                &workloads,
            )
            .map_err(|r| ApiError::new(ErrorCode::Refused, r.to_string()).with_hint(r.hint()))?;
            let previous = current.value.lifecycle;
            if !decision.changed {
                return Ok(LifecycleResult {
                    machine: MachineView::from(&current.value),
                    previous,
                    changed: false,
                    workloads,
                });
            }
            let mut next = current.value.clone();
            next.lifecycle = decision.next;
            next.updated_at_ms = now_ms();
            let op = put(
                BUCKET_MACHINES,
                &next.id,
                &next,
                Expect::Revision(current.revision),
            );
            match self.txn(vec![op]).await? {
                Ok(_) => {
                    tracing::info!(machine = %next.id, from = %previous, to = %next.lifecycle, "lifecycle changed");
                    return Ok(LifecycleResult {
                        machine: MachineView::from(&next),
                        previous,
                        changed: true,
                        workloads,
                    });
                }
                // Someone else changed the record meanwhile: decide again.
                Err((_, Rejection::WrongLastRevision { .. })) => continue,
                Err((_, other)) => {
                    return Err(internal(format!("lifecycle update rejected: {other}")))
                }
            }
        }
        Err(store::unavailable(format!(
            "machine {wanted} kept changing under {CAS_RETRIES} attempts to update it"
        )))
    }

    pub(crate) async fn invite_create(&self, ttl_secs: u64) -> Result<InviteCreated, ApiError> {
        if ttl_secs == 0 || ttl_secs > MAX_INVITE_TTL_SECS {
            return Err(invalid(format!(
                "--ttl-secs {ttl_secs} is out of range: use 1 to {MAX_INVITE_TTL_SECS} (7 days)"
            )));
        }
        let net = self.require_network().await?;
        let me = self
            .get::<MachineRecord>(BUCKET_MACHINES, &self.identity.machine_id)
            .await?
            .ok_or_else(|| internal("this machine has no record in its own network's store"))?
            .value;
        let range = ClusterRange::parse(&net.cidr).map_err(|e| internal(e.to_string()))?;
        let now = now_ms();
        let expires_at_ms = now + ttl_secs * 1000;
        let invite_id = format!("inv-{}", random_hex(6));
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let nonce = invite::b64url(&nonce);
        let claims = InviteClaims {
            v: invite::TOKEN_VERSION,
            invite_id: invite_id.clone(),
            network_id: net.network_id.clone(),
            network_name: net.name.clone(),
            issuer_id: me.id.clone(),
            issuer_key: self.identity.identity_key_b64(),
            expires_at_ms,
            nonce: nonce.clone(),
            issuer_endpoints: self.endpoints(&range),
            issuer_overlay_ip: me.overlay_ip.clone(),
            issuer_wg_public_key: self.identity.wg.public_base64(),
            issuer_peer_addrs: self.peer_addrs(&range),
        };
        let token = invite::encode(&claims, &self.identity.signing_key);
        let record = InviteRecord {
            invite_id: invite_id.clone(),
            issuer: me.id.clone(),
            nonce_sha256: crate::join::sha256_hex(nonce.as_bytes()),
            created_at_ms: now,
            expires_at_ms,
            revoked_at_ms: None,
            consumed_by: None,
            consumed_at_ms: None,
        };
        match self
            .txn(vec![put(
                BUCKET_INVITES,
                &invite_id,
                &record,
                Expect::Absent,
            )])
            .await?
        {
            Ok(_) => Ok(InviteCreated {
                invite_id,
                token,
                expires_at: time::rfc3339(expires_at_ms),
            }),
            Err((_, why)) => Err(internal(format!("storing the invite was rejected: {why}"))),
        }
    }

    async fn invite_list(&self) -> Result<InviteList, ApiError> {
        self.require_network().await?;
        let now = now_ms();
        let mut invites: Vec<InviteRecord> = self
            .list::<InviteRecord>(BUCKET_INVITES)
            .await?
            .into_iter()
            .map(|v| v.value)
            .collect();
        invites
            .sort_by(|a, b| (a.created_at_ms, &a.invite_id).cmp(&(b.created_at_ms, &b.invite_id)));
        Ok(InviteList {
            invites: invites.iter().map(|r| InviteView::of(r, now)).collect(),
        })
    }

    pub(crate) async fn invite_revoke(&self, invite_id: &str) -> Result<InviteView, ApiError> {
        self.require_network().await?;
        for _ in 0..CAS_RETRIES {
            let Some(cur) = self.get::<InviteRecord>(BUCKET_INVITES, invite_id).await? else {
                return Err(
                    ApiError::new(ErrorCode::NotFound, format!("no invite `{invite_id}`"))
                        .with_hint("`ployzctl machine invite list` shows the invite ids"),
                );
            };
            let now = now_ms();
            if let Some(by) = &cur.value.consumed_by {
                return Err(ApiError::new(
                    ErrorCode::Refused,
                    format!("invite {invite_id} was already used by machine {by}; revoking it changes nothing"),
                )
                .with_hint(format!("to remove that machine, run `ployzctl machine rm {by}`")));
            }
            if cur.value.revoked_at_ms.is_some() {
                return Ok(InviteView::of(&cur.value, now));
            }
            let mut next = cur.value.clone();
            next.revoked_at_ms = Some(now);
            match self
                .txn(vec![put(
                    BUCKET_INVITES,
                    invite_id,
                    &next,
                    Expect::Revision(cur.revision),
                )])
                .await?
            {
                Ok(_) => return Ok(InviteView::of(&next, now)),
                Err((_, Rejection::WrongLastRevision { .. })) => continue,
                Err((_, other)) => {
                    return Err(internal(format!(
                        "revoking the invite was rejected: {other}"
                    )))
                }
            }
        }
        Err(store::unavailable(format!(
            "invite {invite_id} kept changing under {CAS_RETRIES} attempts to revoke it"
        )))
    }
}

/// Periodic upkeep: start the NATS server once in a network, keep its
/// routes and the list of storage machines fresh, and relay store events to
/// a machine without a replica.
pub async fn background(
    daemon: std::sync::Arc<Daemon>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let relay = tokio::spawn(relay_events(daemon.clone()));
    // A change to the machines bucket (a join, a removal, a new endpoint)
    // runs the loop at once instead of at the next tick.
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let watcher = tokio::spawn(watch_bucket(
        daemon.clone(),
        BUCKET_MACHINES,
        changed.clone(),
    ));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
            _ = changed.notified() => {}
        }
        let Some(file) = daemon.cluster_file() else {
            continue;
        };
        // The mesh first: on a machine without a replica the store is only
        // reachable through it. Cached records bring it up after a restart.
        if daemon.overlay.get().is_none() {
            if let (Some(net), Some(me)) = (
                &file.network,
                file.machines.iter().find(|m| m.id == daemon.machine_id()),
            ) {
                if let Err(e) = daemon.ensure_mesh(net, me).await {
                    tracing::warn!("{e}");
                }
                daemon.sync_mesh(&file.machines);
            }
        }
        let mesh = file.network.as_ref().is_none_or(|n| n.mesh);
        if daemon.nats.get().is_none() && (!mesh || daemon.overlay.get().is_some()) {
            if let Some(password) = daemon.nats_password() {
                match crate::nats::Nats::start(
                    std::sync::Arc::downgrade(&daemon),
                    daemon.machine_id().to_string(),
                    password,
                    daemon.cfg.nats_port,
                    daemon
                        .overlay
                        .get()
                        .map(|o| std::net::IpAddr::V4(o.address))
                        .unwrap_or_else(|| daemon.advertise_ip()),
                    &daemon.cfg.nats_listen,
                )
                .await
                {
                    Ok(n) => {
                        tracing::info!(port = n.port, "NATS control plane listening");
                        let _ = daemon.nats.set(n);
                    }
                    Err(e) => tracing::warn!("cannot start the NATS server: {e}"),
                }
            }
        }
        if daemon.bus.get().is_none() {
            if let (Some(n), Some(password)) = (daemon.nats.get(), daemon.nats_password()) {
                match crate::bus::Bus::connect(&n.server, crate::nats::NATS_USER, &password).await {
                    Ok(bus) => match serve_machine_rpc(daemon.clone(), bus.clone()).await {
                        Ok(()) => {
                            let _ = daemon.bus.set(bus);
                        }
                        Err(e) => tracing::warn!("cannot subscribe to machine requests: {e}"),
                    },
                    Err(e) => tracing::warn!("cannot connect to the control plane: {e}"),
                }
            }
        }
        // The mesh follows this replica's own copy when it has one: that
        // needs no leader, so voters keep (and re-establish) their tunnels
        // to each other exactly when an election needs them.
        let local = if daemon.has_replica() {
            daemon.node.list_local(BUCKET_MACHINES).ok().map(|es| {
                es.iter()
                    .filter(|e| e.is_live())
                    .filter_map(|e| store::decode::<MachineRecord>(e).ok())
                    .collect::<Vec<_>>()
            })
        } else {
            None
        };
        if let Some(ms) = &local {
            let records: Vec<MachineRecord> = ms.iter().map(|m| m.value.clone()).collect();
            daemon.sync_mesh(&records);
        }
        let ms = match daemon.list::<MachineRecord>(BUCKET_MACHINES).await {
            Ok(ms) => ms,
            Err(e) => {
                tracing::debug!("background: cannot list machines: {}", e.message);
                continue;
            }
        };
        let records: Vec<MachineRecord> = ms.iter().map(|m| m.value.clone()).collect();
        if daemon.overlay.get().is_none() {
            let net = daemon
                .get::<NetworkRecord>(BUCKET_NETWORK, NETWORK_KEY)
                .await;
            if let (Ok(Some(net)), Some(me)) =
                (net, records.iter().find(|m| m.id == daemon.machine_id()))
            {
                if let Err(e) = daemon.ensure_mesh(&net.value, me).await {
                    tracing::warn!("{e}");
                }
            }
        }
        daemon.sync_mesh(&records);
        daemon.cache_machines(None, records);
        if let Some(n) = daemon.nats.get() {
            let peers: Vec<(String, String)> = ms
                .iter()
                .filter(|m| m.value.id != daemon.machine_id())
                .map(|m| (m.value.id.clone(), m.value.peer_addr.clone()))
                .collect();
            n.sync_routes(&daemon, &peers);
        }
        if daemon.has_replica() {
            daemon.refresh_storage_peers();
        } else {
            let peers: Vec<(String, String)> = ms
                .into_iter()
                .filter(|m| {
                    m.value.authority == Authority::Storage && !m.value.peer_addr.is_empty()
                })
                .map(|m| (m.value.id, m.value.peer_addr))
                .collect();
            daemon.set_storage_peers(peers);
        }
    }
    relay.abort();
    watcher.abort();
}

/// Wake a loop on every change to `bucket` (from the local replica, or
/// relayed from a storage machine).
pub(crate) async fn watch_bucket(
    daemon: std::sync::Arc<Daemon>,
    bucket: &'static str,
    changed: std::sync::Arc<tokio::sync::Notify>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        // Re-subscribe now and then: the event source changes when this
        // machine gains or loses its replica.
        let replica = daemon.has_replica();
        let mut rx = daemon.kv_events();
        while daemon.has_replica() == replica {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Ok(ployz_consensus::KvEvent::Entry(e))) if e.bucket == bucket => {
                    changed.notify_one()
                }
                Ok(Ok(ployz_consensus::KvEvent::Reset)) | Ok(Err(RecvError::Lagged(_))) => {
                    changed.notify_one()
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(RecvError::Closed)) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Answer requests addressed to this machine over the control plane.
async fn serve_machine_rpc(
    daemon: std::sync::Arc<Daemon>,
    bus: std::sync::Arc<crate::bus::Bus>,
) -> Result<(), crate::bus::BusError> {
    let (_, mut rx) = bus
        .subscribe(&crate::bus::subject_for(daemon.machine_id()))
        .await?;
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let Some(reply) = msg.reply else { continue };
            let daemon = daemon.clone();
            let bus = bus.clone();
            tokio::spawn(async move {
                let resp = match serde_json::from_slice::<PeerRequest>(&msg.payload) {
                    Ok(req) => daemon.peer_rpc(req).await,
                    Err(e) => {
                        PeerResponse::Error(invalid(format!("malformed machine request: {e}")))
                    }
                };
                let body = serde_json::to_vec(&resp).expect("responses serialise");
                if let Err(e) = bus.publish(&reply, None, &body).await {
                    tracing::debug!("answering a machine request: {e}");
                }
            });
        }
    });
    Ok(())
}

/// On a machine without a replica: follow a storage machine's change events
/// (failing over between them) and republish them locally. Every
/// (re)connection first announces `Reset`, so watchers re-read.
async fn relay_events(daemon: std::sync::Arc<Daemon>) {
    use ployz_consensus::FrameConn as _;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if daemon.has_replica() {
            continue;
        }
        let (Some(secret), Some(file)) = (daemon.secret.get(), daemon.cluster_file()) else {
            continue;
        };
        for (_, addr) in file.storage_peers {
            let Ok(mut conn) =
                peer::dial(&addr, peer::Service::Watch, &secret, daemon.machine_id()).await
            else {
                continue;
            };
            let _ = daemon.remote_events.send(ployz_consensus::KvEvent::Reset);
            while let Ok(Some(frame)) = conn.recv().await {
                match serde_json::from_slice::<ployz_consensus::KvEvent>(&frame) {
                    Ok(ev) => {
                        let _ = daemon.remote_events.send(ev);
                    }
                    Err(_) => break,
                }
            }
            let _ = daemon.remote_events.send(ployz_consensus::KvEvent::Reset);
            if daemon.has_replica() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_names() {
        for ok in ["demo", "my-cluster", "a", "x1-2"] {
            validate_network_name(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "My", "a_b", "a.b", &"a".repeat(64)] {
            let e = validate_network_name(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
        }
    }

    #[test]
    fn regions() {
        validate_region("eu-west_1").unwrap();
        assert!(validate_region("eu west").is_err());
        assert!(validate_region("").is_err());
    }

    #[test]
    fn sha256_known_vector() {
        assert_eq!(
            crate::join::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
