//! The composition root: builds each subsystem once, hands it the handles
//! it needs, and runs the machine's upkeep. Requests reach the subsystems
//! through [`crate::api`].
//!
//! Who depends on whom (arrows point down, never up or sideways back):
//!
//! ```text
//!   api (routing) ─▶ provisioning ─▶ cluster ─▶ workloads ─▶ ingress, ops, overlay ─▶ control ─▶ store ─▶ peer
//! ```

use crate::cluster::{Cluster, ClusterConfig};
use crate::control::ControlPlane;
use crate::gateway::{Gateway, GatewayConfig};
use crate::identity::Identity;
use crate::ingress::Ingress;
use crate::ops::Operations;
use crate::overlay::{Overlay, OverlayConfig};
use crate::provisioning::Provisioning;
use crate::store::{Store, StoreConfig};
use crate::workloads::{Workloads, WorkloadsConfig};
use ployz_api::*;
use ployz_runtime::RuntimeKind;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How often the storage leader looks for operations to take over.
const JANITOR_EVERY: Duration = Duration::from_secs(5);

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
    /// The HTTP(S) gateway's ports (0: off).
    pub gateway: GatewayConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Store(#[from] crate::store::OpenError),
}

/// One machine's daemon: its subsystems, each owning its own state.
pub struct Daemon {
    pub(crate) identity: Arc<Identity>,
    /// Where this machine keeps its state (for `status`'s disk check).
    pub(crate) data_dir: std::path::PathBuf,
    /// The advertised underlay address (NATS without a mesh).
    pub(crate) advertise_ip: IpAddr,
    /// The TCP port peers reach this ployzd on.
    pub(crate) peer_port: u16,
    pub(crate) store: Arc<Store>,
    pub(crate) ops: Arc<Operations>,
    pub(crate) control: Arc<ControlPlane>,
    pub(crate) overlay: Arc<Overlay>,
    pub(crate) workloads: Arc<Workloads>,
    /// Published ports and internal DNS.
    pub(crate) ingress: Arc<Ingress>,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) provisioning: Provisioning,
    /// The HTTP(S) gateway: routes, certificates, forwarding.
    pub(crate) gateway: Arc<Gateway>,
    /// Logins and sessions of the web dashboard.
    pub(crate) dashboard: crate::dashboard::Dashboard,
}

impl Daemon {
    pub async fn open(cfg: DaemonConfig) -> Result<Daemon, StartError> {
        let identity = Arc::new(Identity::load_or_create(&cfg.data_dir)?);
        let store = Arc::new(
            Store::open(StoreConfig {
                machine_id: identity.machine_id.clone(),
                node_id: identity.node_id,
                data_dir: cfg.data_dir.clone(),
                peer_addr: cfg.peer_addr.clone(),
                snapshot_every: cfg.snapshot_every,
            })
            .await?,
        );
        let ops = Arc::new(Operations::new(store.clone()));
        let gateway = Arc::new(Gateway::new(cfg.gateway, store.clone()));
        let control = Arc::new(ControlPlane::new(
            store.clone(),
            cfg.nats_port,
            cfg.nats_listen.clone(),
        ));
        let overlay = Arc::new(Overlay::new(
            OverlayConfig {
                ifname: cfg.wg_interface.clone(),
                wg_port: cfg.wg_port,
            },
            identity.clone(),
            store.clone(),
            control.clone(),
        ));
        let ingress = Arc::new(Ingress::new(store.clone()));
        let workloads = Arc::new(Workloads::new(
            WorkloadsConfig {
                data_dir: cfg.data_dir.clone(),
                runtime: cfg.runtime,
            },
            store.clone(),
            control.clone(),
            overlay.clone(),
            ops.clone(),
            ingress.clone(),
        ));
        let cluster = Arc::new(Cluster::new(
            ClusterConfig {
                region: cfg.region.clone(),
                runtime: cfg.runtime,
                peer_addr: cfg.peer_addr.clone(),
                mesh: cfg.mesh,
            },
            identity.clone(),
            store.clone(),
            control.clone(),
            overlay.clone(),
            workloads.clone(),
            ops.clone(),
        ));
        let provisioning = Provisioning::new(
            cfg.data_dir.clone(),
            cfg.region,
            store.clone(),
            cluster.clone(),
            ops.clone(),
        );
        let peer = cfg.peer_addr.parse::<std::net::SocketAddr>().ok();
        let advertise_ip = peer
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let peer_port = peer
            .map(|a| a.port())
            .unwrap_or(crate::peer::DEFAULT_PEER_PORT);
        Ok(Daemon {
            identity,
            data_dir: cfg.data_dir.clone(),
            advertise_ip,
            peer_port,
            store,
            ops,
            control,
            overlay,
            workloads,
            ingress,
            cluster,
            provisioning,
            gateway,
            dashboard: Default::default(),
        })
    }

    pub fn machine_id(&self) -> &str {
        &self.identity.machine_id
    }

    /// Resolves when the network has asked this machine to leave.
    pub fn exit_requested(&self) -> tokio::sync::watch::Receiver<bool> {
        self.cluster.exit_requested()
    }

    /// The address NATS clients and routes use: the overlay's once it is
    /// up, else the advertised underlay.
    pub(crate) fn nats_address(&self) -> IpAddr {
        self.overlay
            .address()
            .map(IpAddr::V4)
            .unwrap_or(self.advertise_ip)
    }

    pub async fn shutdown(&self) {
        self.control.shutdown().await;
        self.store.shutdown().await;
    }

    /// Every long-running task of the machine, until `stop`: the
    /// reconciler, the relay of store events, and the upkeep loop.
    pub async fn run(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let reconciler = tokio::spawn(self.workloads.clone().run(stop.clone()));
        let ingress = tokio::spawn(self.ingress.clone().run(stop.clone()));
        let gateway = tokio::spawn(self.gateway.clone().run(stop.clone()));
        self.upkeep(stop).await;
        let _ = reconciler.await;
        let _ = ingress.await;
        let _ = gateway.await;
    }

    /// Periodic upkeep: bring the mesh up and keep its peers equal to the
    /// machine records, start the NATS server once in a network and keep
    /// its routes, keep the list of storage machines fresh, and relay store
    /// events to a machine without a replica.
    async fn upkeep(self: &Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let relay = tokio::spawn(self.store.clone().relay_events());
        // A change to the machines bucket (a join, a removal, a new endpoint)
        // runs the loop at once instead of at the next tick.
        let changed = Arc::new(tokio::sync::Notify::new());
        let watcher = tokio::spawn(
            self.store
                .clone()
                .watch_bucket(BUCKET_MACHINES, changed.clone()),
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_janitor = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => {}
                _ = changed.notified() => {}
            }
            // A pass waits on the store (retrying for a while when it does
            // not answer): a stop must not wait for it.
            let pass = async {
                self.upkeep_once().await;
                if last_janitor.elapsed() >= JANITOR_EVERY {
                    last_janitor = tokio::time::Instant::now();
                    self.take_over_stale_operations().await;
                }
            };
            tokio::select! {
                _ = stop.changed() => break,
                _ = pass => {}
            }
        }
        relay.abort();
        watcher.abort();
    }

    /// Leader only: finish or roll back operations whose owner stopped
    /// running them (see [`crate::ops`]).
    async fn take_over_stale_operations(&self) {
        if !self.store.is_leader() {
            return;
        }
        let stale = match self.ops.stale().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("operations: {}", e.message);
                return;
            }
        };
        for op in stale {
            let id = op.value.id.clone();
            let done = match op.value.kind {
                OpKind::MachineRm => self.cluster.take_over_rm(op).await,
                OpKind::Migrate => self.workloads.take_over_migrate(op).await,
                OpKind::Deploy => self.workloads.take_over_deploy(op).await,
                OpKind::MachineAdd => self.provisioning.take_over_add(op).await,
                OpKind::MachineUpdate => self.provisioning.take_over_update(op).await,
                OpKind::StoragePromote => self.cluster.take_over_promote(op).await,
            };
            if let Err(e) = done {
                tracing::warn!(op = %id, "taking over: {}", e.message);
            }
        }
    }

    async fn upkeep_once(self: &Arc<Self>) {
        let Some(file) = self.store.local().get() else {
            return;
        };
        // The mesh first: on a machine without a replica the store is only
        // reachable through it. Cached records bring it up after a restart.
        if !self.overlay.is_up() {
            if let (Some(net), Some(me)) = (
                &file.network,
                file.machines.iter().find(|m| m.id == self.machine_id()),
            ) {
                if let Err(e) = self.overlay.ensure(net, me).await {
                    tracing::warn!("{e}");
                }
                self.overlay.sync(&file.machines);
            }
        }
        let mesh = file.network.as_ref().is_none_or(|n| n.mesh);
        if !mesh || self.overlay.is_up() {
            self.control.ensure_started(self.nats_address(), self).await;
        }
        // The mesh follows this replica's own copy when it has one: that
        // needs no leader, so voters keep (and re-establish) their tunnels
        // to each other exactly when an election needs them.
        if let Some(records) = self.store.local_machines() {
            self.overlay.sync(&records);
        }
        let ms = match self.store.list::<MachineRecord>(BUCKET_MACHINES).await {
            Ok(ms) => ms,
            Err(e) => {
                tracing::debug!("upkeep: cannot list machines: {}", e.message);
                return;
            }
        };
        let records: Vec<MachineRecord> = ms.iter().map(|m| m.value.clone()).collect();
        if !self.overlay.is_up() {
            let net = self
                .store
                .get::<NetworkRecord>(BUCKET_NETWORK, NETWORK_KEY)
                .await;
            if let (Ok(Some(net)), Some(me)) =
                (net, records.iter().find(|m| m.id == self.machine_id()))
            {
                if let Err(e) = self.overlay.ensure(&net.value, me).await {
                    tracing::warn!("{e}");
                }
            }
        }
        self.overlay.sync(&records);
        if let Some(net) = &file.network {
            // The peer port only: NATS is open to workloads (issue 17), which
            // need credentials there and get only their users' permissions.
            let ports = vec![self.peer_port];
            self.overlay.guard_control(net, &records, ports).await;
        }
        self.store.local().cache_machines(None, records.clone());
        let peers: Vec<(String, String)> = records
            .iter()
            .filter(|m| m.id != self.machine_id())
            .map(|m| (m.id.clone(), m.peer_addr.clone()))
            .collect();
        self.control.sync_routes(&peers);
        if self.store.has_replica() {
            self.store.refresh_storage_peers();
        } else {
            let peers: Vec<(String, String)> = records
                .into_iter()
                .filter(|m| m.authority == Authority::Storage && !m.peer_addr.is_empty())
                .map(|m| (m.id, m.peer_addr))
                .collect();
            self.store.local().set_storage_peers(peers);
        }
    }
}
