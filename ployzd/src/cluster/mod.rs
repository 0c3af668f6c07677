//! Membership: founding a network, machine records and their lifecycle,
//! invites and joins ([`join`]), the storage set ([`storage`]) and removal
//! ([`remove`]). Decisions are pure functions in [`rules`]; this module
//! reads, asks them and writes.
//!
//! State: the lock that lets a machine found or join at most one network,
//! and the signal that tells `main` this machine was removed.

mod invites;
mod join;
mod remove;
pub mod rules;
mod storage;

use crate::control::ControlPlane;
use crate::errors::{internal, invalid, validate_network_name, validate_region};
use crate::identity::{random_hex, Identity};
use crate::ops::Operations;
use crate::overlay::Overlay;
use crate::peer::{self, ClusterSecret, LeaveProgress};
use crate::store::{self, put, ClusterFile, Store, CAS_RETRIES};
use crate::workloads::Workloads;
use crate::VERSION;
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::{Expect, InitError, PloyzNode, Rejection};
use ployz_mesh::overlay::ClusterRange;
use ployz_runtime::RuntimeKind;
use std::sync::Arc;

/// How long `mesh status` waits for the store before it shows this
/// machine's last known records and why the store did not answer.
const STATUS_STORE_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// What membership needs to know about this machine.
pub struct ClusterConfig {
    pub region: String,
    pub runtime: RuntimeKind,
    /// Where peers reach this ployzd, `ip:port` (advertised in records).
    pub peer_addr: String,
    /// Whether a network founded here runs the WireGuard mesh.
    pub mesh: bool,
}

pub struct Cluster {
    cfg: ClusterConfig,
    identity: Arc<Identity>,
    hostname: String,
    store: Arc<Store>,
    control: Arc<ControlPlane>,
    overlay: Arc<Overlay>,
    workloads: Arc<Workloads>,
    ops: Arc<Operations>,
    /// This machine's own cleanup once the network asked it to leave.
    leaving: Arc<std::sync::Mutex<Option<LeaveProgress>>>,
    /// Serialises `mesh init` and `invite import` so a machine founds or
    /// joins at most one network.
    init_lock: tokio::sync::Mutex<()>,
    /// Set when the network asked this machine to leave: main exits.
    exit: tokio::sync::watch::Sender<bool>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Where peers reach a machine with `overlay_ip` whose ployzd listens on
/// `underlay`'s port: over the mesh when it runs, else the underlay itself.
fn control_addr(mesh: bool, overlay_ip: &str, underlay: &str) -> String {
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

/// How long `mesh init` / `invite import` wait for the NATS control plane
/// they started to serve.
pub(super) const SERVING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

impl Cluster {
    pub fn new(
        cfg: ClusterConfig,
        identity: Arc<Identity>,
        store: Arc<Store>,
        control: Arc<ControlPlane>,
        overlay: Arc<Overlay>,
        workloads: Arc<Workloads>,
        ops: Arc<Operations>,
    ) -> Cluster {
        let (exit, _) = tokio::sync::watch::channel(false);
        Cluster {
            cfg,
            identity,
            hostname: hostname(),
            store,
            control,
            overlay,
            workloads,
            ops,
            leaving: Arc::default(),
            init_lock: tokio::sync::Mutex::new(()),
            exit,
        }
    }

    fn machine_id(&self) -> &str {
        &self.identity.machine_id
    }

    /// Resolves when the network has asked this machine to leave.
    pub fn exit_requested(&self) -> tokio::sync::watch::Receiver<bool> {
        self.exit.subscribe()
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
        for e in self.overlay.endpoints(range) {
            if let Ok(a) = e.parse::<std::net::SocketAddr>() {
                let s = std::net::SocketAddr::new(a.ip(), port).to_string();
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        out
    }

    pub(crate) async fn mesh_init(
        &self,
        network: String,
        region: Option<String>,
        cidr: Option<String>,
    ) -> Result<MeshStatus, ApiError> {
        validate_network_name(&network)?;
        let region = region.unwrap_or_else(|| self.cfg.region.clone());
        validate_region(&region)?;
        let cidr = cidr.unwrap_or_else(|| DEFAULT_CLUSTER_CIDR.to_string());
        let range = ClusterRange::parse(&cidr).map_err(|e| invalid(e.to_string()))?;

        let _guard = self.init_lock.lock().await;
        // Known locally first: a machine cut off from its network must
        // still be told it is in one (and what to do), not that the store
        // does not answer.
        if let Some(f) = self.store.local().get() {
            return Err(ApiError::new(
                ErrorCode::AlreadyInNetwork,
                format!(
                    "this machine already belongs to network `{}` ({})",
                    f.network_name, f.secret.network_id
                ),
            )
            .with_hint("a machine is in one network at a time; remove it from that network first (`ployzctl machine rm`), or, if the network already removed it, run `ployzctl mesh leave` here"));
        }
        if let Some(existing) = self.store.network().await? {
            return Err(ApiError::new(
                ErrorCode::AlreadyInNetwork,
                format!(
                    "this machine already belongs to network `{}` ({})",
                    existing.name, existing.network_id
                ),
            )
            .with_hint("a machine is in one network at a time; remove it from that network first (`ployzctl machine rm`), or, if the network already removed it, run `ployzctl mesh leave` here"));
        }
        // The founder always takes the first slice: the store is empty.
        let slice = range.slice(1).expect("a valid range has slice 1");
        let overlay_ip = slice.overlay_ip();
        let node = self.store.node();
        let control = control_addr(self.cfg.mesh, &overlay_ip.to_string(), &self.cfg.peer_addr);
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
            endpoints: self.overlay.endpoints(&range),
            peer_addr: control.clone(),
            ssh_target: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let claim = SubnetClaim {
            subnet: slice.net.to_string(),
            machine_id: id.clone(),
        };
        let mut ops = store::records::create_buckets();
        ops.push(put(BUCKET_NETWORK, NETWORK_KEY, &net, Expect::Absent));
        ops.push(put(BUCKET_SUBNETS, &slice.key(), &claim, Expect::Absent));
        ops.push(put(BUCKET_MACHINES, id, &machine, Expect::Absent));
        if let Err((i, why)) = self.store.txn(ops).await? {
            return Err(internal(format!(
                "founding the network was rejected by the store at step {i}: {why}"
            )));
        }
        self.store.local().save(Some(ClusterFile {
            secret: ClusterSecret::generate(net.network_id.clone()),
            network_name: net.name.clone(),
            storage_peers: vec![(id.clone(), control.clone())],
            network: Some(net.clone()),
            machines: vec![machine.clone()],
        }))?;
        self.overlay.ensure(&net, &machine).await.map_err(|e| {
            internal(format!("the network was founded, but {e}"))
                .with_hint("see the ployzd log; ployzd retries bringing the mesh up every second")
        })?;
        tracing::info!(network = %net.name, machine = %id, "founded network");
        // Return once what this started serves: `nats url` right after works.
        if !self.control.wait_serving(SERVING_TIMEOUT).await {
            tracing::warn!("the NATS control plane is not serving yet; ployzd keeps trying");
        }
        self.status_within(None).await
    }

    /// Always answers, within [`STATUS_STORE_BUDGET`] plus a moment, also
    /// without a store majority (it is what one runs to find out why the
    /// store does not answer): then the network and machine records are
    /// this machine's last known copies and `store_error` says why the
    /// store could not be asked.
    pub(crate) async fn mesh_status(&self) -> Result<MeshStatus, ApiError> {
        self.status_within(Some(STATUS_STORE_BUDGET)).await
    }

    /// The status, waiting up to `budget` (`None`: as long as store
    /// requests retry) for the store's records.
    pub(crate) async fn status_within(
        &self,
        budget: Option<std::time::Duration>,
    ) -> Result<MeshStatus, ApiError> {
        let cached = self.store.local().get();
        let fresh = async {
            let network = self.store.network().await?;
            let machine = match &network {
                Some(_) => self
                    .store
                    .get::<MachineRecord>(BUCKET_MACHINES, &self.identity.machine_id)
                    .await?
                    .map(|v| v.value),
                None => None,
            };
            Ok::<_, ApiError>((network, machine))
        };
        // Store requests retry for up to 15 s; a status may answer sooner.
        let fresh = async {
            match budget {
                Some(b) => tokio::time::timeout(b, fresh)
                    .await
                    .unwrap_or_else(|_| Err(store::unavailable(format!("no answer within {b:?}")))),
                None => fresh.await,
            }
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
        let mut store = self.store.status();
        store.error = store_error;
        Ok(MeshStatus {
            machine_id: self.identity.machine_id.clone(),
            version: VERSION.to_string(),
            network: network.as_ref().map(NetworkView::from),
            machine: machine.as_ref().map(MachineView::from),
            store,
        })
    }

    pub(crate) async fn machine_list(&self) -> Result<MachineList, ApiError> {
        Ok(MachineList {
            machines: self
                .store
                .machines()
                .await?
                .iter()
                .map(|m| MachineView::from(&m.value))
                .collect(),
        })
    }

    /// The instances occupying `machine` (see [`rules::occupying`]).
    async fn live_workloads_on(&self, machine: &str) -> Result<Vec<String>, ApiError> {
        let placed: Vec<(String, String, u32)> = self
            .store
            .list::<ServiceRecord>(BUCKET_SERVICES)
            .await?
            .into_iter()
            .flat_map(|v| {
                let name = v.value.name;
                v.value
                    .placements
                    .into_iter()
                    .map(move |p| (name.clone(), p.machine, p.slot))
            })
            .collect();
        let live: Vec<(String, String, u32)> = self
            .store
            .values::<InstanceRecord>(BUCKET_INSTANCES)
            .await?
            .into_iter()
            .filter(|i| i.is_live())
            .map(|i| (i.service, i.machine, i.slot))
            .collect();
        Ok(rules::occupying(machine, &placed, &live))
    }

    pub(crate) async fn lifecycle(
        &self,
        wanted: &str,
        action: LifecycleAction,
        force: bool,
    ) -> Result<LifecycleResult, ApiError> {
        for _ in 0..CAS_RETRIES {
            let current = self.store.resolve_machine(wanted).await?;
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
            match self.store.txn(vec![op]).await? {
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
}
