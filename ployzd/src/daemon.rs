//! The daemon core: one [`Request`] in, one reply out. Everything the socket
//! (and later the control plane) asks of a machine goes through
//! [`Daemon::handle`].

use crate::identity::Identity;
use crate::rules;
use crate::store::{self, put, Store, Versioned};
use ployz_api::invite::{self, InviteClaims};
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::kv::{Expect, Rejection};
use ployz_consensus::{InitError, Node, NodeConfig, PloyzNode};
use ployz_mesh::overlay::ClusterRange;
use ployz_runtime::RuntimeKind;
use rand::RngCore;
use std::net::IpAddr;
use std::path::PathBuf;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Raft traffic port on a machine's overlay address.
pub const RAFT_PORT: u16 = 7101;
/// Longest invite lifetime accepted (7 days).
pub const MAX_INVITE_TTL_SECS: u64 = 7 * 24 * 3600;
/// Compare-and-set retries before a contended update gives up.
const CAS_RETRIES: usize = 8;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub runtime: RuntimeKind,
    pub region: String,
    pub wg_port: u16,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
}

pub struct Daemon {
    cfg: DaemonConfig,
    identity: Identity,
    store: Store,
    hostname: String,
    /// Serialises `mesh init` so two concurrent calls cannot both found.
    init_lock: tokio::sync::Mutex<()>,
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
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

fn internal(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Internal, msg)
}

/// Network names: DNS-label-like, so they fit in hostnames and KV keys.
pub fn validate_network_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid network name `{name}`: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
        )))
    }
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

fn random_hex(bytes: usize) -> String {
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
        let store_dir = cfg.data_dir.join("store");
        let node = Node::open(NodeConfig {
            node_id: identity.node_id,
            node: PloyzNode {
                machine_id: identity.machine_id.clone(),
                addr: String::new(),
            },
            dir: store_dir.clone(),
            snapshot_logs_since_last: cfg.snapshot_every,
        })
        .await
        .map_err(|source| StartError::Store {
            dir: store_dir,
            source,
        })?;
        Ok(Daemon {
            cfg,
            identity,
            store: Store::new(node),
            hostname: hostname(),
            init_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn machine_id(&self) -> &str {
        &self.identity.machine_id
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.store.node().shutdown().await {
            tracing::warn!("store shutdown: {e}");
        }
    }

    pub async fn handle(&self, req: Request) -> Result<Response, ApiError> {
        match req {
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
        }
    }

    async fn network(&self) -> Result<Option<NetworkRecord>, ApiError> {
        if !self.store.node().is_initialized().await {
            return Ok(None);
        }
        Ok(self
            .store
            .get::<NetworkRecord>(BUCKET_NETWORK, NETWORK_KEY)
            .await?
            .map(|v| v.value))
    }

    async fn require_network(&self) -> Result<NetworkRecord, ApiError> {
        self.network().await?.ok_or_else(store::no_network)
    }

    fn endpoints(&self, range: &ClusterRange) -> Vec<String> {
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
        let node = self.store.node();
        match node
            .initialize_single(PloyzNode {
                machine_id: self.identity.machine_id.clone(),
                addr: format!("{overlay_ip}:{RAFT_PORT}"),
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
        if let Err((i, why)) = self.store.txn(ops).await? {
            return Err(internal(format!(
                "founding the network was rejected by the store at step {i}: {why}"
            )));
        }
        tracing::info!(network = %net.name, machine = %id, "founded network");
        self.mesh_status()
            .await
            .map(|s| Response::Status(Box::new(s)))
    }

    async fn mesh_status(&self) -> Result<MeshStatus, ApiError> {
        let network = self.network().await?;
        let machine = match &network {
            Some(_) => self
                .store
                .get::<MachineRecord>(BUCKET_MACHINES, &self.identity.machine_id)
                .await?
                .map(|v| MachineView::from(&v.value)),
            None => None,
        };
        Ok(MeshStatus {
            machine_id: self.identity.machine_id.clone(),
            version: VERSION.to_string(),
            network: network.as_ref().map(NetworkView::from),
            machine,
            store: self.store_status(),
        })
    }

    fn store_status(&self) -> StoreStatus {
        let m = self.store.node().raft().metrics().borrow().clone();
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
        }
    }

    async fn machines(&self) -> Result<Vec<Versioned<MachineRecord>>, ApiError> {
        self.require_network().await?;
        let mut ms = self.store.list::<MachineRecord>(BUCKET_MACHINES).await?;
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
    async fn resolve_machine(&self, wanted: &str) -> Result<Versioned<MachineRecord>, ApiError> {
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
            .store
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

    async fn invite_create(&self, ttl_secs: u64) -> Result<InviteCreated, ApiError> {
        if ttl_secs == 0 || ttl_secs > MAX_INVITE_TTL_SECS {
            return Err(invalid(format!(
                "--ttl-secs {ttl_secs} is out of range: use 1 to {MAX_INVITE_TTL_SECS} (7 days)"
            )));
        }
        let net = self.require_network().await?;
        let me = self
            .store
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
        };
        let token = invite::encode(&claims, &self.identity.signing_key);
        let record = InviteRecord {
            invite_id: invite_id.clone(),
            issuer: me.id.clone(),
            nonce_sha256: sha256_hex(nonce.as_bytes()),
            created_at_ms: now,
            expires_at_ms,
            revoked_at_ms: None,
            consumed_by: None,
            consumed_at_ms: None,
        };
        match self
            .store
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
            .store
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

    async fn invite_revoke(&self, invite_id: &str) -> Result<InviteView, ApiError> {
        self.require_network().await?;
        for _ in 0..CAS_RETRIES {
            let Some(cur) = self
                .store
                .get::<InviteRecord>(BUCKET_INVITES, invite_id)
                .await?
            else {
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
                .store
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

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
