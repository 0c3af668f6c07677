//! Interface configuration (address, MTU, route, link up) behind a small
//! trait, so the plan is tested without a kernel (a recording fake) and the
//! real implementation stays a thin shell.
//!
//! The real implementation speaks rtnetlink ([`ployz_netlink`]): `ployzd` is
//! one static binary and needs no iproute2 on the host. The changes still
//! print as the equivalent `ip` command, which is what an operator would type
//! to check or redo one.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use crate::overlay::Ipv4Net;

/// One change to the host's network configuration.
pub use ployz_netlink::Op as NetOp;

/// The changes that bring up a mesh interface, in order. "Replace" makes
/// them idempotent (a restarted daemon finds its address and route there).
pub fn plan(ifname: &str, address: Ipv4Addr, cluster: Ipv4Net, mtu: u16) -> Vec<NetOp> {
    let ifname = ifname.to_owned();
    vec![
        NetOp::SetMtu {
            ifname: ifname.clone(),
            mtu,
        },
        NetOp::ReplaceAddress {
            ifname: ifname.clone(),
            addr: address,
            prefix: 32,
        },
        NetOp::SetUp {
            ifname: ifname.clone(),
        },
        NetOp::ReplaceRoute {
            dest: cluster.addr,
            prefix: cluster.prefix,
            via: None,
            dev: Some(ifname),
            src: Some(address),
        },
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    #[error(transparent)]
    Netlink(#[from] ployz_netlink::Error),
    #[error("`{op}` failed: {reason}")]
    Failed { op: String, reason: String },
}

pub trait NetConfig: Send + Sync {
    fn apply(&self, op: &NetOp) -> Result<(), NetConfigError>;
}

/// The real thing: rtnetlink, in the namespace of the calling thread. Needs
/// CAP_NET_ADMIN.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rtnetlink;

impl NetConfig for Rtnetlink {
    fn apply(&self, op: &NetOp) -> Result<(), NetConfigError> {
        ployz_netlink::Netlink::open()?.apply(op)?;
        Ok(())
    }
}

/// A fake that records every change and can be told to fail one.
#[derive(Debug, Default)]
pub struct RecordingNetConfig {
    ops: Mutex<Vec<NetOp>>,
    fail_on: Option<usize>,
}

impl RecordingNetConfig {
    /// Fails the `n`th (0-based) change it is asked for.
    pub fn failing_at(n: usize) -> Self {
        RecordingNetConfig {
            ops: Mutex::default(),
            fail_on: Some(n),
        }
    }

    pub fn ops(&self) -> Vec<NetOp> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl NetConfig for RecordingNetConfig {
    fn apply(&self, op: &NetOp) -> Result<(), NetConfigError> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        if self.fail_on == Some(ops.len()) {
            return Err(NetConfigError::Failed {
                op: op.to_string(),
                reason: "injected failure".into(),
            });
        }
        ops.push(op.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_sets_mtu_address_up_route_in_order() {
        let cluster: Ipv4Net = "10.101.0.0/16".parse().unwrap();
        let fake = RecordingNetConfig::default();
        for op in plan("plz0", Ipv4Addr::new(10, 101, 3, 1), cluster, 1420) {
            fake.apply(&op).unwrap();
        }
        let cmds: Vec<String> = fake.ops().iter().map(|o| o.to_string()).collect();
        assert_eq!(
            cmds,
            vec![
                "ip link set dev plz0 mtu 1420",
                "ip addr replace 10.101.3.1/32 dev plz0",
                "ip link set dev plz0 up",
                "ip route replace 10.101.0.0/16 dev plz0 src 10.101.3.1",
            ]
        );
    }

    #[test]
    fn fake_reports_injected_failure() {
        let fake = RecordingNetConfig::failing_at(1);
        let ops = plan(
            "plz0",
            Ipv4Addr::new(10, 1, 1, 1),
            "10.1.0.0/16".parse().unwrap(),
            1420,
        );
        assert!(fake.apply(&ops[0]).is_ok());
        let err = fake.apply(&ops[1]).unwrap_err();
        assert!(err.to_string().contains("ip addr replace"), "{err}");
        assert_eq!(fake.ops().len(), 1);
    }
}
