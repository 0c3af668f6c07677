//! Interface configuration (address, MTU, route, link up) behind a small
//! trait, so the plan is tested without a kernel (a recording fake) and the
//! real implementation stays a thin shell.
//!
//! The real implementation runs iproute2's `ip`: it is on every host we
//! target (a dependency of the package), it needs no netlink crate, and its
//! error messages are what an operator would see typing the same command.

use std::fmt;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use crate::overlay::Ipv4Net;

/// One change to the host's network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetOp {
    SetMtu {
        ifname: String,
        mtu: u16,
    },
    AddAddress {
        ifname: String,
        addr: Ipv4Addr,
        prefix: u8,
    },
    SetUp {
        ifname: String,
    },
    AddRoute {
        ifname: String,
        net: Ipv4Net,
        src: Ipv4Addr,
    },
}

impl NetOp {
    /// The `ip` arguments doing this change. `replace` makes them idempotent
    /// (a restarted daemon finds its address and route already there).
    pub fn ip_args(&self) -> Vec<String> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            NetOp::SetMtu { ifname, mtu } => {
                v(&["link", "set", "dev", ifname, "mtu", &mtu.to_string()])
            }
            NetOp::AddAddress {
                ifname,
                addr,
                prefix,
            } => v(&[
                "addr",
                "replace",
                &format!("{addr}/{prefix}"),
                "dev",
                ifname,
            ]),
            NetOp::SetUp { ifname } => v(&["link", "set", "dev", ifname, "up"]),
            NetOp::AddRoute { ifname, net, src } => v(&[
                "route",
                "replace",
                &net.to_string(),
                "dev",
                ifname,
                "src",
                &src.to_string(),
            ]),
        }
    }
}

impl fmt::Display for NetOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ip {}", self.ip_args().join(" "))
    }
}

/// The changes that bring up a mesh interface, in order.
pub fn plan(ifname: &str, address: Ipv4Addr, cluster: Ipv4Net, mtu: u16) -> Vec<NetOp> {
    let ifname = ifname.to_owned();
    vec![
        NetOp::SetMtu {
            ifname: ifname.clone(),
            mtu,
        },
        NetOp::AddAddress {
            ifname: ifname.clone(),
            addr: address,
            prefix: 32,
        },
        NetOp::SetUp {
            ifname: ifname.clone(),
        },
        NetOp::AddRoute {
            ifname,
            net: cluster,
            src: address,
        },
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    #[error("could not run `{op}`: {source} (is iproute2 installed?)")]
    Spawn { op: String, source: std::io::Error },
    #[error("`{op}` failed: {stderr}")]
    Failed { op: String, stderr: String },
}

pub trait NetConfig: Send + Sync {
    fn apply(&self, op: &NetOp) -> Result<(), NetConfigError>;
}

/// The real thing: iproute2's `ip`. Needs CAP_NET_ADMIN.
#[derive(Debug, Default, Clone, Copy)]
pub struct IpCommand;

impl NetConfig for IpCommand {
    fn apply(&self, op: &NetOp) -> Result<(), NetConfigError> {
        let out = Command::new("ip")
            .args(op.ip_args())
            .output()
            .map_err(|source| NetConfigError::Spawn {
                op: op.to_string(),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NetConfigError::Failed {
                op: op.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
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
                stderr: "injected failure".into(),
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
