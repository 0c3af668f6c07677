//! Who may use the peer port (issue 17): every service but `join` is
//! served only to a current member of the network, recognised by where its
//! connection comes from. On a mesh network that is the overlay address of
//! the machine record the hello names: WireGuard's cryptokey routing lets
//! a packet from an overlay address in only through that machine's
//! WireGuard peer, and a removed machine's peer is dropped everywhere with
//! its record. Without a mesh (`--no-mesh`, machines on one private
//! network) it is the address in the record's `peer_addr` or one of its
//! endpoints: weaker (an address, not a key), said so in SECURITY.md.
//!
//! Holding the network secret is needed too (the session keys derive from
//! it) but no longer enough: a removed machine keeps its copy.

use ployz_api::MachineRecord;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Whether machine `from`, connecting from `source`, is a member of the
/// network `machines` describe. `Err` says why not (no secret in it).
pub fn admit(
    mesh: bool,
    machines: &[MachineRecord],
    from: &str,
    source: IpAddr,
) -> Result<(), String> {
    let source = source.to_canonical();
    let Some(m) = machines.iter().find(|m| m.id == from) else {
        return Err(format!("no machine `{from}` in this network's records"));
    };
    if mesh {
        return match m.overlay_ip.parse::<IpAddr>() {
            Ok(ip) if ip == source => Ok(()),
            Ok(ip) => Err(format!(
                "machine {from} talks from its overlay address {ip}, not {source}"
            )),
            Err(_) => Err(format!("machine {from} has no overlay address yet")),
        };
    }
    let known = std::iter::once(m.peer_addr.as_str())
        .chain(m.endpoints.iter().map(String::as_str))
        .filter_map(|a| {
            a.parse::<SocketAddr>()
                .map(|s| s.ip())
                .or_else(|_| a.parse::<IpAddr>())
                .ok()
        })
        .any(|ip| ip.to_canonical() == source);
    if known {
        Ok(())
    } else {
        Err(format!(
            "machine {from} is not known at {source} (its peer address is {})",
            m.peer_addr
        ))
    }
}

/// Connections refused since start (the `ployz_peer_refused` metric).
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// Sources and reasons already logged (once each; bounded).
static LOGGED: Mutex<Option<HashSet<(IpAddr, String)>>> = Mutex::new(None);
const MAX_LOGGED: usize = 4096;

/// Count a refusal and log it once per source and reason.
pub(super) fn note_refusal(source: IpAddr, from: &str, service: &str, why: &str) {
    REFUSED.fetch_add(1, Ordering::Relaxed);
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    let set = logged.get_or_insert_with(HashSet::new);
    if set.len() >= MAX_LOGGED || !set.insert((source, why.to_string())) {
        return;
    }
    tracing::warn!(%source, from, service, "peer connection refused: {why}");
}

/// How many peer connections were refused as not from a member.
pub fn refused_total() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, overlay: &str, peer: &str) -> MachineRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "hostname": id, "lifecycle": "active", "authority": "storage",
            "region": "default", "region_role": "member", "overlay_ip": overlay,
            "subnet": "10.101.1.0/24", "version": "v", "runtime": "host",
            "identity_key": "k", "wg_public_key": "k", "endpoints": ["192.168.7.9:51820"],
            "peer_addr": peer, "created_at_ms": 0, "updated_at_ms": 0
        }))
        .expect("a machine record")
    }

    #[test]
    fn only_a_member_from_its_own_address_is_admitted() {
        let ms = [
            rec("m1", "10.101.1.1", "10.101.1.1:7101"),
            rec("m2", "10.101.2.1", "10.101.2.1:7101"),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(admit(true, &ms, "m1", ip("10.101.1.1")).is_ok());
        assert!(admit(true, &ms, "m1", ip("::ffff:10.101.1.1")).is_ok());
        // Another member's address, an underlay address, a removed machine.
        let e = admit(true, &ms, "m1", ip("10.101.2.1")).unwrap_err();
        assert!(e.contains("overlay address 10.101.1.1"), "{e}");
        assert!(admit(true, &ms, "m1", ip("192.168.7.9")).is_err());
        let e = admit(true, &ms, "m3", ip("10.101.3.1")).unwrap_err();
        assert!(e.contains("no machine `m3`"), "{e}");
        // Without a mesh: the peer address or an endpoint.
        let flat = [rec("m1", "10.101.1.1", "192.168.7.1:7101")];
        assert!(admit(false, &flat, "m1", ip("192.168.7.1")).is_ok());
        assert!(admit(false, &flat, "m1", ip("192.168.7.9")).is_ok());
        assert!(admit(false, &flat, "m1", ip("192.168.7.2")).is_err());
        assert!(admit(false, &flat, "m2", ip("192.168.7.1")).is_err());
    }
}
