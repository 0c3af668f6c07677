//! The machine's place in the WireGuard mesh: bring up `plz0` with the
//! overlay address from its record, and keep its peers equal to the other
//! machine records (a join adds a peer everywhere, `rm` removes it, an
//! endpoint change is picked up). The QUIC RTT prober rides the overlay.
//!
//! State: the running mesh and prober, set once when the machine first has
//! an overlay address (and never on a network without a mesh).

use crate::control::ControlPlane;
use crate::identity::Identity;
use crate::peer::{PeerRequest, PeerResponse};
use crate::store::Store;
use ployz_api::{MachineRecord, NetworkRecord};
use ployz_mesh::overlay::{ClusterRange, Ipv4Net};
use ployz_mesh::{Mesh, MeshConfig, PeerConfig, Prober};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// UDP port of the RTT prober on overlay addresses.
pub const PROBE_PORT: u16 = 7102;
/// WireGuard MTU on the overlay.
pub const MTU: u16 = 1420;
/// After the mesh comes up, how long a restarted machine listens for a
/// leader before it may call an election.
const ELECTION_GRACE: Duration = Duration::from_secs(3);
/// Keepalive so NAT mappings and handshakes stay fresh.
pub const KEEPALIVE_SECS: u16 = 5;

/// The running mesh of this machine.
struct Running {
    mesh: Mesh,
    prober: Option<Prober>,
    address: Ipv4Addr,
}

/// The WireGuard interface of this machine (whether a network runs a mesh
/// is the network record's `mesh`).
pub struct OverlayConfig {
    pub ifname: String,
    pub wg_port: u16,
}

/// What the control-plane guard was written for: ports, the cluster's
/// range, the machines' overlay addresses.
type Guard = (Vec<u16>, String, Vec<Ipv4Addr>);

/// Another machine's WireGuard link.
pub(crate) struct PeerLink {
    pub id: String,
    /// Since its last handshake (`None`: never).
    pub handshake_age: Option<std::time::Duration>,
    /// Where packets to it go.
    pub endpoint: Option<SocketAddr>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// This machine's place in the mesh.
pub struct Overlay {
    cfg: OverlayConfig,
    identity: Arc<Identity>,
    store: Arc<Store>,
    control: Arc<ControlPlane>,
    running: OnceLock<Running>,
    starting: tokio::sync::Mutex<()>,
    /// The control-plane guard last written.
    guarded: std::sync::Mutex<Option<Guard>>,
}

/// Peer configuration for every other machine.
pub fn peers_of(me: &str, machines: &[MachineRecord]) -> Vec<PeerConfig> {
    machines
        .iter()
        .filter(|m| m.id != me)
        .filter_map(|m| {
            let key = ployz_mesh::keys::decode_public(&m.wg_public_key)?;
            let subnet: Ipv4Net = m.subnet.parse().ok()?;
            let endpoint = m
                .endpoints
                .iter()
                .find_map(|e| e.parse::<SocketAddr>().ok());
            Some(PeerConfig {
                public_key: key,
                endpoint,
                allowed_ips: vec![subnet],
                persistent_keepalive: Some(KEEPALIVE_SECS),
            })
        })
        .collect()
}

/// Probe targets: every other machine's overlay address.
pub fn probe_targets(me: &str, machines: &[MachineRecord]) -> Vec<(String, SocketAddr)> {
    machines
        .iter()
        .filter(|m| m.id != me)
        .filter_map(|m| {
            let ip: Ipv4Addr = m.overlay_ip.parse().ok()?;
            Some((m.id.clone(), SocketAddr::new(ip.into(), PROBE_PORT)))
        })
        .collect()
}

impl Overlay {
    pub fn new(
        cfg: OverlayConfig,
        identity: Arc<Identity>,
        store: Arc<Store>,
        control: Arc<ControlPlane>,
    ) -> Overlay {
        Overlay {
            cfg,
            identity,
            store,
            control,
            running: OnceLock::new(),
            starting: tokio::sync::Mutex::new(()),
            guarded: std::sync::Mutex::new(None),
        }
    }

    /// Whether the mesh is up.
    pub fn is_up(&self) -> bool {
        self.running.get().is_some()
    }

    /// This machine's overlay address, once the mesh is up.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.running.get().map(|r| r.address)
    }

    fn machine_id(&self) -> &str {
        &self.identity.machine_id
    }

    /// This host's WireGuard endpoint candidates (its addresses outside
    /// the cluster's range, best first).
    pub fn endpoints(&self, range: &ClusterRange) -> Vec<String> {
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

    /// Start the mesh for this machine's record if it is not up yet.
    pub(crate) async fn ensure(
        &self,
        net: &NetworkRecord,
        me: &MachineRecord,
    ) -> Result<(), String> {
        if !net.mesh || self.is_up() {
            return Ok(());
        }
        let _guard = self.starting.lock().await;
        if self.is_up() {
            return Ok(());
        }
        let address: Ipv4Addr = me
            .overlay_ip
            .parse()
            .map_err(|e| format!("bad overlay address {}: {e}", me.overlay_ip))?;
        let cluster: Ipv4Net = net
            .cidr
            .parse()
            .map_err(|e| format!("bad cluster range {}: {e}", net.cidr))?;
        let cfg = MeshConfig {
            ifname: self.cfg.ifname.clone(),
            private_key: self.identity.wg.secret_bytes(),
            listen_port: self.cfg.wg_port,
            address,
            cluster,
            mtu: MTU,
        };
        let mesh = tokio::task::spawn_blocking(move || Mesh::start(cfg))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot bring up the WireGuard interface: {e}"))?;
        let prober = match Prober::start(SocketAddr::new(address.into(), PROBE_PORT)) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("RTT prober not started: {e}");
                None
            }
        };
        tracing::info!(%address, interface = %self.cfg.ifname, "mesh up");
        // Elections resume once the leader's heartbeats could have arrived
        // over the new tunnels (see Store::open).
        let raft = self.store.node().raft().clone();
        tokio::spawn(async move {
            tokio::time::sleep(ELECTION_GRACE).await;
            raft.runtime_config().elect(true);
        });
        let _ = self.running.set(Running {
            mesh,
            prober,
            address,
        });
        Ok(())
    }

    /// Keep workloads (here and on other machines) off this machine's
    /// control-plane `ports` (peer port, NATS): over the overlay only the
    /// machines' own addresses reach them. Rewritten only when something
    /// changed; nothing without a mesh (machines sharing a host).
    pub(crate) async fn guard_control(
        &self,
        net: &NetworkRecord,
        machines: &[MachineRecord],
        ports: Vec<u16>,
    ) {
        if !net.mesh || !self.is_up() {
            return;
        }
        let mut ips: Vec<Ipv4Addr> = machines
            .iter()
            .filter_map(|m| m.overlay_ip.parse().ok())
            .collect();
        ips.sort();
        let want = (ports, net.cidr.clone(), ips);
        if self
            .guarded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            == Some(&want)
        {
            return;
        }
        let w = want.clone();
        let done = tokio::task::spawn_blocking(move || {
            ployz_runtime::firewall::guard_control(&w.0, &w.1, &w.2)
        })
        .await;
        match done {
            Ok(Ok(())) => {
                tracing::info!(ports = ?want.0, machines = want.2.len(), "control plane guarded from workloads");
                *self.guarded.lock().unwrap_or_else(|e| e.into_inner()) = Some(want);
            }
            Ok(Err(e)) => tracing::warn!("cannot guard the control plane from workloads: {e}"),
            Err(e) => tracing::warn!("cannot guard the control plane from workloads: {e}"),
        }
    }

    /// Make the mesh's peers match `machines`.
    pub(crate) fn sync(&self, machines: &[MachineRecord]) {
        let Some(o) = self.running.get() else { return };
        if let Err(e) = o.mesh.set_peers(peers_of(self.machine_id(), machines)) {
            tracing::warn!("updating mesh peers: {e}");
        }
        if let Some(p) = &o.prober {
            p.set_targets(probe_targets(self.machine_id(), machines));
        }
    }

    /// Per other machine: its WireGuard link as the mesh sees it. `None`
    /// when the mesh is not up.
    pub(crate) fn links(&self, machines: &[MachineRecord]) -> Option<Vec<PeerLink>> {
        let o = self.running.get()?;
        let peers = o.mesh.peers();
        let now = std::time::SystemTime::now();
        Some(
            machines
                .iter()
                .filter(|m| m.id != self.machine_id())
                .map(|m| {
                    let key = ployz_mesh::keys::decode_public(&m.wg_public_key);
                    let peer = peers.iter().find(|p| Some(p.public_key) == key);
                    PeerLink {
                        id: m.id.clone(),
                        handshake_age: peer
                            .and_then(|p| p.last_handshake)
                            .map(|t| now.duration_since(t).unwrap_or_default()),
                        endpoint: peer.and_then(|p| p.endpoint),
                        rx_bytes: peer.map_or(0, |p| p.rx_bytes),
                        tx_bytes: peer.map_or(0, |p| p.tx_bytes),
                    }
                })
                .collect(),
        )
    }

    /// This machine's RTT rows (to every peer it probes).
    pub(crate) fn rtt_rows(&self) -> Vec<ployz_api::RttRow> {
        let Some(p) = self.running.get().and_then(|o| o.prober.as_ref()) else {
            return Vec::new();
        };
        p.snapshot()
            .into_iter()
            .map(|r| ployz_api::RttRow {
                machine: self.machine_id().to_string(),
                peer: r.peer,
                median_ms: r.median_ms,
                stddev_ms: r.stddev_ms,
                samples: r.samples,
                error: r.last_error,
            })
            .collect()
    }

    /// The full matrix: every machine's rows, collected over the control plane.
    pub(crate) async fn machine_rtt(&self) -> Result<ployz_api::RttReport, ployz_api::ApiError> {
        let machines = self.store.machines().await?;
        let mut rows = Vec::new();
        let mut warnings = Vec::new();
        for m in &machines {
            let id = &m.value.id;
            let got = if id == self.machine_id() {
                Ok(self.rtt_rows())
            } else {
                match self
                    .control
                    .call_machine(id, &PeerRequest::Rtt, Duration::from_secs(3))
                    .await
                {
                    Ok(PeerResponse::Rtt(r)) => Ok(r),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(e) => Err(e),
                }
            };
            match got {
                Ok(rs) => {
                    for other in machines.iter().filter(|o| o.value.id != *id) {
                        match rs.iter().find(|r| r.peer == other.value.id) {
                            Some(r) if r.samples > 0 && r.error.is_none() => rows.push(r.clone()),
                            // The latest probe failed: the pair is down now,
                            // whatever older samples say.
                            Some(r) if r.samples > 0 => warnings.push(format!(
                                "{id} -> {}: unreachable now ({}); last median {:.1}ms over {} samples",
                                other.value.id,
                                r.error.clone().unwrap_or_default(),
                                r.median_ms.unwrap_or(0.0),
                                r.samples
                            )),
                            Some(r) => warnings.push(format!(
                                "{id} -> {}: no RTT samples ({})",
                                other.value.id,
                                r.error.clone().unwrap_or_else(|| "not probed yet".into())
                            )),
                            None => warnings.push(format!(
                                "{id} -> {}: not probed yet",
                                other.value.id
                            )),
                        }
                    }
                }
                Err(e) => {
                    for other in machines.iter().filter(|o| o.value.id != *id) {
                        warnings.push(format!(
                            "{id} -> {}: machine {id} did not report ({e})",
                            other.value.id
                        ));
                    }
                }
            }
        }
        Ok(ployz_api::RttReport { rows, warnings })
    }
}
