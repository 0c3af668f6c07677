//! Workload networking for the host backend: the bridge, one veth pair per
//! workload, addresses and routes.
//!
//! The plan (which changes, in which network namespace, in which order) is
//! pure and tested against [`RecordingNetConfig`]; [`Rtnetlink`] applies it
//! over rtnetlink ([`ployz_netlink`], no iproute2 needed), with the
//! forwarding rules from [`crate::firewall`] and one write to
//! `/proc/sys/net/ipv4/ip_forward`.
//!
//! A workload's network namespace is the one libcontainer creates for it
//! (the OCI spec asks for a new one). It is configured from outside after
//! `create` and before `start`, through `/proc/<init pid>/ns/net`, like a CNI
//! plugin does with runc: no named namespace under /run/netns (so nothing
//! can collide between two ployzd sharing /run, e.g. in `ip netns exec`
//! test hosts), and the namespace, with the workload's end of the veth,
//! disappears with the workload's processes.

use crate::firewall;
use crate::{BridgeNetwork, NetworkAttachment};
use ployz_netlink::{Netlink, Op};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

/// Name of the workload's interface inside its namespace.
pub const WORKLOAD_IFNAME: &str = "eth0";

/// Which network namespace a change applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Netns {
    /// The namespace of the runtime (where the bridge lives).
    Runtime,
    /// The namespace of the process with this pid (a workload's init).
    OfPid(i32),
}

/// One change to a network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetOp {
    /// A link, address or route change (rtnetlink).
    Link(Op),
    /// `net.ipv4.ip_forward=1` (a per-namespace setting).
    EnableIpForward,
    /// The FORWARD rules of [`firewall::bridge_want`] for `bridge`: traffic
    /// out of it accepted, into it accepted (only from `from`, dropping the
    /// rest at the end of the chain, when given). Idempotent.
    AllowForward {
        bridge: String,
        from: Option<String>,
    },
    /// Removes the rules of [`NetOp::AllowForward`], whatever their `from`,
    /// also untagged ones an older ployzd wrote (missing rules are fine).
    RemoveAllowForward { bridge: String },
}

impl From<Op> for NetOp {
    fn from(op: Op) -> Self {
        NetOp::Link(op)
    }
}

/// The equivalent shell commands (for logs and tests).
impl fmt::Display for NetOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetOp::Link(op) => op.fmt(f),
            NetOp::EnableIpForward => f.write_str("echo 1 > /proc/sys/net/ipv4/ip_forward"),
            NetOp::AllowForward { bridge, from } => {
                let want = firewall::bridge_want(bridge, from.as_deref());
                let cmds = firewall::converge(&[], &want, |_| false);
                let shown: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
                f.write_str(&shown.join("; "))
            }
            NetOp::RemoveAllowForward { bridge } => write!(
                f,
                "iptables -D FORWARD (every rule tagged {} or an untagged -i/-o {bridge} ACCEPT/DROP)",
                firewall::tag(bridge)
            ),
        }
    }
}

/// The changes that make `net`'s bridge ready (`exists`: the link is already there).
pub fn bridge_plan(net: &BridgeNetwork, exists: bool) -> Vec<NetOp> {
    let name = net.bridge.clone();
    let mut ops = Vec::new();
    if !exists {
        ops.push(Op::AddBridge { name: name.clone() }.into());
    }
    if let Some(mtu) = net.mtu {
        ops.push(
            Op::SetMtu {
                ifname: name.clone(),
                mtu,
            }
            .into(),
        );
    }
    ops.extend([
        Op::ReplaceAddress {
            ifname: name.clone(),
            addr: net.gateway,
            prefix: net.prefix,
        }
        .into(),
        Op::SetUp {
            ifname: name.clone(),
        }
        .into(),
        NetOp::EnableIpForward,
        NetOp::AllowForward {
            bridge: name,
            from: net.allow_from.clone(),
        },
    ]);
    ops
}

/// The MAC address of a workload's interface, derived from its IPv4
/// address (locally administered, `02:42:` + the address, as docker does):
/// a workload started again with the same address keeps its MAC, so the
/// neighbour entries its machine (and bridge) hold stay right. With a random
/// one, traffic to a restarted workload went to the old MAC until the entry
/// expired (seen: health probes timing out for many seconds after a restart).
pub fn workload_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// The changes that plug the workload whose init is `pid` into its bridge:
/// first in the runtime's namespace, then in the workload's.
pub fn attach_plan(pid: i32, host_veth: &str, att: &NetworkAttachment) -> [(Netns, Vec<NetOp>); 2] {
    let eth = WORKLOAD_IFNAME.to_string();
    [
        (
            Netns::Runtime,
            vec![
                Op::AddVeth {
                    host: host_veth.to_string(),
                    peer: eth.clone(),
                    peer_pid: Some(pid),
                    mtu: att.mtu,
                    peer_mac: Some(workload_mac(att.address)),
                }
                .into(),
                Op::SetMaster {
                    ifname: host_veth.to_string(),
                    master: att.bridge.clone(),
                }
                .into(),
                Op::SetUp {
                    ifname: host_veth.to_string(),
                }
                .into(),
            ],
        ),
        (
            Netns::OfPid(pid),
            vec![
                Op::SetUp {
                    ifname: "lo".into(),
                }
                .into(),
                // Up before the address: the on-link route the address
                // brings is then there for the default route's gateway.
                Op::SetUp {
                    ifname: eth.clone(),
                }
                .into(),
                Op::ReplaceAddress {
                    ifname: eth,
                    addr: att.address,
                    prefix: att.prefix,
                }
                .into(),
                Op::ReplaceRoute {
                    dest: Ipv4Addr::UNSPECIFIED,
                    prefix: 0,
                    via: Some(att.gateway),
                    dev: None,
                    src: None,
                }
                .into(),
            ],
        ),
    ]
}

/// A workload without a network: only its loopback, up.
pub fn loopback_plan(pid: i32) -> (Netns, Vec<NetOp>) {
    (
        Netns::OfPid(pid),
        vec![Op::SetUp {
            ifname: "lo".into(),
        }
        .into()],
    )
}

/// The changes that undo [`bridge_plan`].
pub fn remove_bridge_plan(bridge: &str, exists: bool) -> Vec<NetOp> {
    let mut ops = vec![NetOp::RemoveAllowForward {
        bridge: bridge.to_string(),
    }];
    if exists {
        ops.push(
            Op::DeleteLink {
                ifname: bridge.to_string(),
            }
            .into(),
        );
    }
    ops
}

/// The host-side veth name of workload `id` of the runtime rooted at `root`:
/// `plz` + 12 hex digits of a hash of both (15 chars, the kernel's limit), so
/// two runtimes sharing one namespace (tests) never collide and `delete`
/// finds it again after a restart.
pub fn host_veth_name(root: &Path, id: &str) -> String {
    let mut h = Sha256::new();
    h.update(root.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    let digest = h.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("plz{hex}")
}

#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    #[error(transparent)]
    Netlink(#[from] ployz_netlink::Error),
    #[error(transparent)]
    Firewall(#[from] firewall::FirewallError),
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("`{op}` failed: {reason}")]
    Failed { op: String, reason: String },
    #[error("cannot enter the network namespace of pid {pid}: {source}")]
    Enter { pid: i32, source: std::io::Error },
}

/// The kernel seam for workload networking.
pub trait NetConfig: Send + Sync {
    /// Applies `ops` in order inside `netns`; stops at the first failure.
    fn apply(&self, netns: Netns, ops: &[NetOp]) -> Result<(), NetConfigError>;
    /// Whether a link of that name exists in the runtime's namespace.
    fn link_exists(&self, ifname: &str) -> bool;
}

/// The real thing: rtnetlink (one socket per namespace and plan), the
/// firewall module (iptables), procfs. Needs CAP_NET_ADMIN (and
/// CAP_SYS_ADMIN to enter a workload's namespace).
#[derive(Debug, Default, Clone, Copy)]
pub struct Rtnetlink;

impl NetConfig for Rtnetlink {
    fn apply(&self, netns: Netns, ops: &[NetOp]) -> Result<(), NetConfigError> {
        // Under the clone lock: see `host::serialized` for the pipe trap
        // (iptables still runs as a process).
        super::serialized(|| match netns {
            Netns::Runtime => apply_here(ops),
            Netns::OfPid(pid) => in_netns_of(pid, || apply_here(ops))?,
        })
    }

    fn link_exists(&self, ifname: &str) -> bool {
        let Ok(name) = CString::new(ifname) else {
            return false;
        };
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
    }
}

/// Runs `f` on a short-lived thread that joined the network namespace of
/// `pid` (network namespaces are per thread; a netlink socket belongs to the
/// namespace of the thread that opened it). Runs in the runtime's own
/// thread's process, never in the create zygote.
fn in_netns_of<T: Send>(pid: i32, f: impl FnOnce() -> T + Send) -> Result<T, NetConfigError> {
    let enter = |source| NetConfigError::Enter { pid, source };
    let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(enter)?;
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            // SAFETY: setns on a namespace fd we own; it only changes this
            // (short-lived, scoped) thread's network namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(enter(std::io::Error::last_os_error()));
            }
            Ok(f())
        });
        handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Applies `ops` in the calling thread's network namespace: link changes
/// over one netlink socket (opened when the first is due), the rest as
/// described on [`NetOp`].
fn apply_here(ops: &[NetOp]) -> Result<(), NetConfigError> {
    let mut nl: Option<Netlink> = None;
    for op in ops {
        match op {
            NetOp::Link(op) => {
                let nl = match &mut nl {
                    Some(nl) => nl,
                    None => nl.insert(Netlink::open()?),
                };
                nl.apply(op)?;
            }
            NetOp::EnableIpForward => {
                // /proc/sys/net resolves to the namespace of the thread opening it.
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| {
                    NetConfigError::Io {
                        what: "enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)",
                        source,
                    }
                })?
            }
            NetOp::AllowForward { bridge, from } => {
                firewall::allow_bridge(&firewall::System, bridge, from.as_deref())?
            }
            NetOp::RemoveAllowForward { bridge } => {
                firewall::remove_bridge(&firewall::System, bridge)?
            }
        }
    }
    Ok(())
}

/// A fake that records every change with its namespace, tracks the links it
/// created in the runtime's namespace, and can be told to fail one change.
#[derive(Debug, Default)]
pub struct RecordingNetConfig {
    ops: Mutex<Vec<(Netns, NetOp)>>,
    links: Mutex<HashSet<String>>,
    fail_on: Option<usize>,
}

impl RecordingNetConfig {
    /// Fails the `n`th (0-based) change it is asked for.
    pub fn failing_at(n: usize) -> Self {
        RecordingNetConfig {
            fail_on: Some(n),
            ..Default::default()
        }
    }

    pub fn ops(&self) -> Vec<(Netns, NetOp)> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The recorded changes as the commands they stand for.
    pub fn commands(&self) -> Vec<String> {
        self.ops()
            .iter()
            .map(|(ns, op)| match ns {
                Netns::Runtime => op.to_string(),
                Netns::OfPid(pid) => format!("[pid {pid}] {op}"),
            })
            .collect()
    }
}

impl NetConfig for RecordingNetConfig {
    fn apply(&self, netns: Netns, ops: &[NetOp]) -> Result<(), NetConfigError> {
        let mut rec = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for op in ops {
            if self.fail_on == Some(rec.len()) {
                return Err(NetConfigError::Failed {
                    op: op.to_string(),
                    reason: "injected failure".into(),
                });
            }
            rec.push((netns, op.clone()));
            if netns == Netns::Runtime {
                match op {
                    NetOp::Link(Op::AddBridge { name }) => {
                        links.insert(name.clone());
                    }
                    NetOp::Link(Op::AddVeth { host, .. }) => {
                        links.insert(host.clone());
                    }
                    NetOp::Link(Op::DeleteLink { ifname }) => {
                        links.remove(ifname);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn link_exists(&self, ifname: &str) -> bool {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(ifname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> BridgeNetwork {
        BridgeNetwork {
            bridge: "plzbr0".into(),
            gateway: Ipv4Addr::new(10, 101, 3, 1),
            prefix: 24,
            mtu: None,
            allow_from: None,
        }
    }

    #[test]
    fn bridge_plan_is_idempotent_and_ordered() {
        let fake = RecordingNetConfig::default();
        for _ in 0..2 {
            let exists = fake.link_exists("plzbr0");
            fake.apply(Netns::Runtime, &bridge_plan(&net(), exists))
                .unwrap();
        }
        let one = [
            "ip addr replace 10.101.3.1/24 dev plzbr0",
            "ip link set dev plzbr0 up",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
            "iptables -I FORWARD -i plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT; \
             iptables -I FORWARD -o plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT",
        ];
        let mut want = vec!["ip link add name plzbr0 type bridge"];
        want.extend(one);
        want.extend(one); // second run: the bridge exists, no add
        assert_eq!(fake.commands(), want);

        fake.apply(Netns::Runtime, &remove_bridge_plan("plzbr0", true))
            .unwrap();
        assert!(!fake.link_exists("plzbr0"));
        assert_eq!(
            fake.commands()[want.len()..],
            [
                "iptables -D FORWARD (every rule tagged ployz:plzbr0 or an untagged -i/-o plzbr0 ACCEPT/DROP)",
                "ip link del dev plzbr0"
            ]
        );
    }

    #[test]
    fn attach_plan_configures_both_ends() {
        let att = NetworkAttachment {
            bridge: "plzbr0".into(),
            address: Ipv4Addr::new(10, 101, 3, 7),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 101, 3, 1),
            mtu: None,
            dns: None,
        };
        let fake = RecordingNetConfig::default();
        for (ns, ops) in attach_plan(4242, "plzabcdef012345", &att) {
            fake.apply(ns, &ops).unwrap();
        }
        assert_eq!(
            fake.commands(),
            [
                "ip link add name plzabcdef012345 type veth peer name eth0 address 02:42:0a:65:03:07 netns 4242",
                "ip link set dev plzabcdef012345 master plzbr0",
                "ip link set dev plzabcdef012345 up",
                "[pid 4242] ip link set dev lo up",
                "[pid 4242] ip link set dev eth0 up",
                "[pid 4242] ip addr replace 10.101.3.7/24 dev eth0",
                "[pid 4242] ip route replace default via 10.101.3.1",
            ]
        );
        assert!(fake.link_exists("plzabcdef012345"));
        let (ns, ops) = loopback_plan(7);
        assert_eq!(ns, Netns::OfPid(7));
        assert_eq!(ops[0].to_string(), "ip link set dev lo up");
    }

    #[test]
    fn mesh_mtu_and_trusted_sources_reach_bridge_and_veth() {
        let net = BridgeNetwork {
            mtu: Some(1420),
            allow_from: Some("10.101.0.0/16".into()),
            ..net()
        };
        let cmds: Vec<String> = bridge_plan(&net, false)
            .iter()
            .map(|o| o.to_string())
            .collect();
        assert_eq!(
            cmds[..2],
            [
                "ip link add name plzbr0 type bridge",
                "ip link set dev plzbr0 mtu 1420"
            ]
        );
        assert!(
            cmds.last()
                .unwrap()
                .contains("-s 10.101.0.0/16 -o plzbr0 -m comment --comment ployz:plzbr0 -j ACCEPT")
                && cmds.last().unwrap().contains(
                    "iptables -A FORWARD -o plzbr0 -m comment --comment ployz:plzbr0 -j DROP"
                ),
            "{cmds:?}"
        );
        let att = NetworkAttachment {
            bridge: "plzbr0".into(),
            address: Ipv4Addr::new(10, 101, 3, 7),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 101, 3, 1),
            mtu: Some(1420),
            dns: None,
        };
        let [(_, host), _] = attach_plan(4242, "plzabcdef012345", &att);
        assert_eq!(
            host[0].to_string(),
            "ip link add name plzabcdef012345 mtu 1420 type veth peer name eth0 mtu 1420 address 02:42:0a:65:03:07 netns 4242"
        );
    }

    #[test]
    fn fake_reports_injected_failure() {
        let fake = RecordingNetConfig::failing_at(1);
        let e = fake
            .apply(Netns::Runtime, &bridge_plan(&net(), false))
            .unwrap_err();
        assert!(e.to_string().contains("ip addr replace"), "{e}");
        assert_eq!(fake.ops().len(), 1);
    }

    #[test]
    fn veth_names_fit_and_differ() {
        let a = host_veth_name(Path::new("/var/lib/ployz/runtime"), "web-1");
        let b = host_veth_name(Path::new("/var/lib/ployz/runtime"), "web-2");
        let c = host_veth_name(Path::new("/tmp/other"), "web-1");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("plz"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            host_veth_name(Path::new("/var/lib/ployz/runtime"), "web-1")
        );
    }
}
