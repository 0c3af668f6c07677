//! The mesh as ployzd sees it: start the device and interface, hand it the
//! full list of peers whenever membership changes, read their status.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::netconfig::{self, NetConfig, NetConfigError, Rtnetlink};
use crate::overlay::Ipv4Net;
use crate::wg::allowed::AllowedIp;
use crate::wg::device::{ApplyError, Device, DeviceConfig, DeviceError};
use crate::wg::tun::MAX_IFNAME;
use crate::wg::uapi::{self, PeerInfo, PeerUpdate, SetRequest};

/// Default WireGuard UDP port of a ployz machine.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Default MTU: 1500 underlay minus the 80 bytes WireGuard over IPv6 costs.
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub ifname: String,
    pub private_key: [u8; 32],
    /// 0 picks a free port.
    pub listen_port: u16,
    /// This machine's overlay address (assigned as a /32).
    pub address: Ipv4Addr,
    /// The cluster range, routed into the interface.
    pub cluster: Ipv4Net,
    pub mtu: u16,
}

impl std::fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConfig")
            .field("ifname", &self.ifname)
            .field("private_key", &"<redacted>")
            .field("listen_port", &self.listen_port)
            .field("address", &self.address)
            .field("cluster", &self.cluster)
            .field("mtu", &self.mtu)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    /// `None`: wait for the peer to reach us (it roams in).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Ipv4Net>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: [u8; 32],
    /// Where packets go now: the configured endpoint or the last one the
    /// peer was authenticated from.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<AllowedIp>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("invalid mesh config: {0}")]
    Config(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("configuring interface: {0}")]
    NetConfig(#[from] NetConfigError),
    #[error("invalid peer list: {0}")]
    InvalidPeers(String),
    #[error("device refused the peer update: {0}")]
    Refused(#[from] ApplyError),
}

/// A running mesh interface. `stop` (or drop) deletes the interface.
pub struct Mesh {
    device: Device,
    public_key: [u8; 32],
    /// What the last `set_peers` asked for: tells a changed endpoint apart
    /// from one the peer roamed to.
    applied: Mutex<HashMap<[u8; 32], PeerConfig>>,
}

impl Mesh {
    /// Create the TUN, bind the port, configure the interface (rtnetlink).
    pub fn start(cfg: MeshConfig) -> Result<Mesh, MeshError> {
        Mesh::start_with(cfg, &Rtnetlink, Path::new(uapi::SOCKET_DIR))
    }

    /// As [`Mesh::start`], with the interface configurator and the control
    /// socket directory given.
    pub fn start_with(
        cfg: MeshConfig,
        net: &dyn NetConfig,
        socket_dir: &Path,
    ) -> Result<Mesh, MeshError> {
        validate(&cfg)?;
        let device = Device::start(DeviceConfig {
            ifname: cfg.ifname.clone(),
            private_key: cfg.private_key,
            listen_port: cfg.listen_port,
            socket_dir: socket_dir.to_owned(),
        })?;
        for op in netconfig::plan(&cfg.ifname, cfg.address, cfg.cluster, cfg.mtu) {
            // On error the device drops here: threads stop, TUN goes away.
            net.apply(&op)?;
        }
        tracing::info!(ifname = %cfg.ifname, port = device.listen_port(), address = %cfg.address, "mesh up");
        Ok(Mesh {
            public_key: device.public_key(),
            device,
            applied: Mutex::default(),
        })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    pub fn listen_port(&self) -> u16 {
        self.device.listen_port()
    }

    /// Make the device's peers exactly `peers`: adds, updates in place
    /// (sessions survive), removes. Calling it twice with the same list
    /// changes nothing.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<(), MeshError> {
        validate_peers(&peers, &self.public_key)?;
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.device.info().peers;
        let updates = plan_peer_changes(&current, &applied, &peers);
        if !updates.is_empty() {
            self.device.apply(SetRequest {
                peers: updates,
                ..SetRequest::default()
            })?;
        }
        *applied = peers.into_iter().map(|p| (p.public_key, p)).collect();
        Ok(())
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.device
            .info()
            .peers
            .into_iter()
            .map(|p| PeerStatus {
                public_key: p.public_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips,
                last_handshake: p.last_handshake,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect()
    }

    pub fn stop(self) {
        self.device.stop();
    }
}

fn validate(cfg: &MeshConfig) -> Result<(), MeshError> {
    if cfg.ifname.is_empty() || cfg.ifname.len() > MAX_IFNAME {
        return Err(MeshError::Config(format!(
            "interface name `{}` must be 1-{MAX_IFNAME} bytes",
            cfg.ifname
        )));
    }
    if !(576..=9000).contains(&cfg.mtu) {
        return Err(MeshError::Config(format!(
            "MTU {} is outside 576-9000 (default {DEFAULT_MTU})",
            cfg.mtu
        )));
    }
    if !cfg.cluster.contains(cfg.address) {
        return Err(MeshError::Config(format!(
            "overlay address {} is outside the cluster range {}",
            cfg.address, cfg.cluster
        )));
    }
    Ok(())
}

fn validate_peers(peers: &[PeerConfig], own: &[u8; 32]) -> Result<(), MeshError> {
    let mut keys = HashSet::new();
    let mut ips = HashMap::new();
    for p in peers {
        let short = crate::keys::encode_public(&p.public_key);
        if p.public_key == *own {
            return Err(MeshError::InvalidPeers(format!(
                "{short} is this machine's own key"
            )));
        }
        if !keys.insert(p.public_key) {
            return Err(MeshError::InvalidPeers(format!("{short} is listed twice")));
        }
        for ip in &p.allowed_ips {
            if let Some(other) = ips.insert(AllowedIp::from(*ip), short.clone()) {
                return Err(MeshError::InvalidPeers(format!(
                    "{ip} is allowed for both {other} and {short}"
                )));
            }
        }
    }
    Ok(())
}

fn sorted_ips(ips: impl IntoIterator<Item = AllowedIp>) -> Vec<AllowedIp> {
    let mut v: Vec<AllowedIp> = ips.into_iter().collect();
    v.sort();
    v.dedup();
    v
}

/// The device changes that turn `current` (the device's view) into
/// `desired`. `previous` is what the last call asked for: an endpoint only
/// counts as changed if the desired one differs from what we asked before,
/// so an endpoint the peer roamed to is not overwritten with a stale one.
pub fn plan_peer_changes(
    current: &[PeerInfo],
    previous: &HashMap<[u8; 32], PeerConfig>,
    desired: &[PeerConfig],
) -> Vec<PeerUpdate> {
    let wanted: HashSet<[u8; 32]> = desired.iter().map(|p| p.public_key).collect();
    let mut out: Vec<PeerUpdate> = current
        .iter()
        .filter(|c| !wanted.contains(&c.public_key))
        .map(|c| PeerUpdate {
            remove: true,
            ..PeerUpdate::new(c.public_key)
        })
        .collect();
    for d in desired {
        let want_ips = sorted_ips(d.allowed_ips.iter().map(|n| AllowedIp::from(*n)));
        let keepalive = d.persistent_keepalive.unwrap_or(0);
        let Some(c) = current.iter().find(|c| c.public_key == d.public_key) else {
            out.push(PeerUpdate {
                endpoint: d.endpoint,
                persistent_keepalive: Some(keepalive),
                replace_allowed_ips: true,
                allowed_ips: want_ips,
                ..PeerUpdate::new(d.public_key)
            });
            continue;
        };
        let mut u = PeerUpdate {
            update_only: true,
            ..PeerUpdate::new(d.public_key)
        };
        let mut changed = false;
        if sorted_ips(c.allowed_ips.iter().copied()) != want_ips {
            u.replace_allowed_ips = true;
            u.allowed_ips = want_ips;
            changed = true;
        }
        if c.persistent_keepalive.unwrap_or(0) != keepalive {
            u.persistent_keepalive = Some(keepalive);
            changed = true;
        }
        if let Some(ep) = d.endpoint {
            let asked_before = previous.get(&d.public_key).and_then(|p| p.endpoint);
            if asked_before != Some(ep) || c.endpoint.is_none() {
                u.endpoint = Some(ep);
                changed = true;
            }
        }
        if changed {
            out.push(u);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(k: u8, ep: Option<&str>, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: [k; 32],
            endpoint: ep.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    fn info(p: &PeerConfig, endpoint: Option<&str>) -> PeerInfo {
        PeerInfo {
            public_key: p.public_key,
            preshared_key: None,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: p.persistent_keepalive,
            allowed_ips: p.allowed_ips.iter().map(|n| AllowedIp::from(*n)).collect(),
        }
    }

    fn prev(ps: &[&PeerConfig]) -> HashMap<[u8; 32], PeerConfig> {
        ps.iter().map(|p| (p.public_key, (*p).clone())).collect()
    }

    #[test]
    fn adds_new_and_removes_gone() {
        let a = peer(1, Some("10.0.0.1:51820"), &["10.101.1.0/24"]);
        let b = peer(2, None, &["10.101.2.0/24"]);
        let out = plan_peer_changes(&[info(&b, None)], &prev(&[&b]), std::slice::from_ref(&a));
        assert_eq!(out.len(), 2);
        assert!(out[0].remove && out[0].public_key == [2; 32]);
        assert_eq!(out[1].public_key, [1; 32]);
        assert!(!out[1].update_only && out[1].replace_allowed_ips);
        assert_eq!(out[1].endpoint, a.endpoint);
        assert_eq!(out[1].persistent_keepalive, Some(0));
    }

    #[test]
    fn same_list_twice_is_a_no_op() {
        let a = peer(1, Some("10.0.0.1:51820"), &["10.101.1.0/24"]);
        let out = plan_peer_changes(
            &[info(&a, Some("10.0.0.1:51820"))],
            &prev(&[&a]),
            std::slice::from_ref(&a),
        );
        assert_eq!(out, vec![]);
    }

    #[test]
    fn roamed_endpoint_survives_but_a_new_one_is_applied() {
        let a = peer(1, Some("10.0.0.1:51820"), &["10.101.1.0/24"]);
        // The peer roamed to .9: the same desired list leaves it alone.
        let roamed = [info(&a, Some("10.0.0.9:40000"))];
        assert!(plan_peer_changes(&roamed, &prev(&[&a]), std::slice::from_ref(&a)).is_empty());
        // The control plane learned a new endpoint: applied, in place.
        let moved = peer(1, Some("10.0.0.2:51820"), &["10.101.1.0/24"]);
        let out = plan_peer_changes(&roamed, &prev(&[&a]), &[moved]);
        assert_eq!(out.len(), 1);
        assert!(out[0].update_only && !out[0].replace_allowed_ips);
        assert_eq!(out[0].endpoint, Some("10.0.0.2:51820".parse().unwrap()));
    }

    #[test]
    fn allowed_ips_and_keepalive_changes_update_in_place() {
        let a = peer(1, None, &["10.101.1.0/24"]);
        let mut b = peer(1, None, &["10.101.1.0/24", "10.101.9.0/24"]);
        b.persistent_keepalive = Some(25);
        let out = plan_peer_changes(&[info(&a, None)], &prev(&[&a]), &[b]);
        assert_eq!(out.len(), 1);
        assert!(out[0].update_only && out[0].replace_allowed_ips);
        assert_eq!(out[0].allowed_ips.len(), 2);
        assert_eq!(out[0].persistent_keepalive, Some(25));
        assert_eq!(out[0].endpoint, None);
    }

    #[test]
    fn peer_list_validation() {
        let own = [9; 32];
        let a = peer(1, None, &["10.101.1.0/24"]);
        assert!(validate_peers(std::slice::from_ref(&a), &own).is_ok());
        let e = validate_peers(&[a.clone(), a.clone()], &own).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let b = peer(2, None, &["10.101.1.0/24"]);
        let e = validate_peers(&[a, b], &own).unwrap_err();
        assert!(e.to_string().contains("allowed for both"), "{e}");
        let e = validate_peers(&[peer(9, None, &[])], &own).unwrap_err();
        assert!(e.to_string().contains("own key"), "{e}");
    }

    #[test]
    fn config_validation() {
        let cfg = MeshConfig {
            ifname: "plz0".into(),
            private_key: [1; 32],
            listen_port: 0,
            address: Ipv4Addr::new(10, 101, 1, 1),
            cluster: "10.101.0.0/16".parse().unwrap(),
            mtu: DEFAULT_MTU,
        };
        assert!(validate(&cfg).is_ok());
        assert!(!format!("{cfg:?}").contains("[1, 1"));
        let bad = MeshConfig {
            address: Ipv4Addr::new(10, 102, 1, 1),
            ..cfg.clone()
        };
        assert!(validate(&bad)
            .unwrap_err()
            .to_string()
            .contains("outside the cluster"));
        let bad = MeshConfig {
            ifname: "a-very-long-interface".into(),
            ..cfg
        };
        assert!(validate(&bad).is_err());
    }
}
