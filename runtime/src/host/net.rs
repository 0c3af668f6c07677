//! Workload networking for the host backend: the bridge, one veth pair per
//! workload, addresses and routes.
//!
//! The plan (which changes, in which network namespace, in which order) is
//! pure and tested against [`RecordingNetConfig`]; [`IpCommand`] applies it
//! with iproute2's `ip` (present on every host we target; its errors are
//! what an operator would see typing the same command), `iptables`, one
//! write to `/proc/sys/net/ipv4/ip_forward`, and an ioctl for "link up".
//!
//! A workload's network namespace is the one libcontainer creates for it
//! (the OCI spec asks for a new one). It is configured from outside after
//! `create` and before `start`, through `/proc/<init pid>/ns/net`, like a CNI
//! plugin does with runc: no named namespace under /run/netns (so nothing
//! can collide between two ployzd sharing /run, e.g. in `ip netns exec`
//! test hosts), and the namespace, with the workload's end of the veth,
//! disappears with the workload's processes.

use crate::{BridgeNetwork, NetworkAttachment};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
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
    AddBridge {
        name: String,
    },
    /// Adds the address, or leaves it if it is already there.
    ReplaceAddress {
        ifname: String,
        addr: Ipv4Addr,
        prefix: u8,
    },
    SetUp {
        ifname: String,
    },
    SetMtu {
        ifname: String,
        mtu: u16,
    },
    /// A veth pair: `host` here, `peer` created directly in the namespace of
    /// `pid`, both ends with `mtu` when there is one.
    AddVeth {
        host: String,
        peer: String,
        pid: i32,
        mtu: Option<u16>,
    },
    SetMaster {
        ifname: String,
        master: String,
    },
    ReplaceDefaultRoute {
        via: Ipv4Addr,
    },
    DeleteLink {
        ifname: String,
    },
    /// `net.ipv4.ip_forward=1` (a per-namespace setting).
    EnableIpForward,
    /// iptables FORWARD accept rules for traffic into and out of `bridge`
    /// (a FORWARD policy of DROP, which dockerd sets, would otherwise drop
    /// mesh traffic to workloads). With `from`, traffic into the bridge is
    /// accepted only from that range and dropped from anywhere else (a rule
    /// at the end of the chain). Checked with `-C` first: idempotent.
    AllowForward {
        bridge: String,
        from: Option<String>,
    },
    /// Removes the rules of [`NetOp::AllowForward`], whatever their `from`
    /// (missing rules are fine).
    RemoveAllowForward {
        bridge: String,
    },
}

impl NetOp {
    /// The `ip` arguments for this change, or `None` when it is not an `ip` command.
    pub fn ip_args(&self) -> Option<Vec<String>> {
        let v = |a: &[&str]| Some(a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        match self {
            NetOp::AddBridge { name } => v(&["link", "add", "name", name, "type", "bridge"]),
            NetOp::ReplaceAddress {
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
            NetOp::SetMtu { ifname, mtu } => {
                v(&["link", "set", "dev", ifname, "mtu", &mtu.to_string()])
            }
            NetOp::AddVeth {
                host,
                peer,
                pid,
                mtu,
            } => {
                let pid = pid.to_string();
                let mtu = mtu.map(|m| m.to_string());
                let mtu: Vec<&str> = mtu.iter().flat_map(|m| ["mtu", m.as_str()]).collect();
                let mut a = vec!["link", "add", "name", host];
                a.extend(&mtu);
                a.extend(["type", "veth", "peer", "name", peer]);
                a.extend(&mtu);
                a.extend(["netns", pid.as_str()]);
                v(&a)
            }
            NetOp::SetMaster { ifname, master } => {
                v(&["link", "set", "dev", ifname, "master", master])
            }
            NetOp::ReplaceDefaultRoute { via } => {
                v(&["route", "replace", "default", "via", &via.to_string()])
            }
            NetOp::DeleteLink { ifname } => v(&["link", "del", "dev", ifname]),
            NetOp::EnableIpForward | NetOp::AllowForward { .. } => None,
            NetOp::RemoveAllowForward { .. } => None,
        }
    }
}

impl fmt::Display for NetOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetOp::EnableIpForward => f.write_str("echo 1 > /proc/sys/net/ipv4/ip_forward"),
            NetOp::AllowForward { bridge, from: None } => write!(
                f,
                "iptables -I FORWARD -i {bridge} -j ACCEPT; iptables -I FORWARD -o {bridge} -j ACCEPT"
            ),
            NetOp::AllowForward {
                bridge,
                from: Some(from),
            } => write!(
                f,
                "iptables -I FORWARD -i {bridge} -j ACCEPT; \
                 iptables -I FORWARD -s {from} -o {bridge} -j ACCEPT; \
                 iptables -A FORWARD -o {bridge} -j DROP"
            ),
            NetOp::RemoveAllowForward { bridge } => write!(
                f,
                "iptables -D FORWARD (every -i/-o {bridge} ACCEPT/DROP rule)"
            ),
            op => write!(f, "ip {}", op.ip_args().unwrap_or_default().join(" ")),
        }
    }
}

/// The changes that make `net`'s bridge ready (`exists`: the link is already there).
pub fn bridge_plan(net: &BridgeNetwork, exists: bool) -> Vec<NetOp> {
    let name = net.bridge.clone();
    let mut ops = Vec::new();
    if !exists {
        ops.push(NetOp::AddBridge { name: name.clone() });
    }
    if let Some(mtu) = net.mtu {
        ops.push(NetOp::SetMtu {
            ifname: name.clone(),
            mtu,
        });
    }
    ops.extend([
        NetOp::ReplaceAddress {
            ifname: name.clone(),
            addr: net.gateway,
            prefix: net.prefix,
        },
        NetOp::SetUp {
            ifname: name.clone(),
        },
        NetOp::EnableIpForward,
        NetOp::AllowForward {
            bridge: name,
            from: net.allow_from.clone(),
        },
    ]);
    ops
}

/// The changes that plug the workload whose init is `pid` into its bridge:
/// first in the runtime's namespace, then in the workload's.
pub fn attach_plan(pid: i32, host_veth: &str, att: &NetworkAttachment) -> [(Netns, Vec<NetOp>); 2] {
    let eth = WORKLOAD_IFNAME.to_string();
    [
        (
            Netns::Runtime,
            vec![
                NetOp::AddVeth {
                    host: host_veth.to_string(),
                    peer: eth.clone(),
                    pid,
                    mtu: att.mtu,
                },
                NetOp::SetMaster {
                    ifname: host_veth.to_string(),
                    master: att.bridge.clone(),
                },
                NetOp::SetUp {
                    ifname: host_veth.to_string(),
                },
            ],
        ),
        (
            Netns::OfPid(pid),
            vec![
                NetOp::SetUp {
                    ifname: "lo".into(),
                },
                // Up before the address: the address and the route then
                // go in one `ip` batch.
                NetOp::SetUp {
                    ifname: eth.clone(),
                },
                NetOp::ReplaceAddress {
                    ifname: eth,
                    addr: att.address,
                    prefix: att.prefix,
                },
                NetOp::ReplaceDefaultRoute { via: att.gateway },
            ],
        ),
    ]
}

/// A workload without a network: only its loopback, up.
pub fn loopback_plan(pid: i32) -> (Netns, Vec<NetOp>) {
    (
        Netns::OfPid(pid),
        vec![NetOp::SetUp {
            ifname: "lo".into(),
        }],
    )
}

/// The changes that undo [`bridge_plan`].
pub fn remove_bridge_plan(bridge: &str, exists: bool) -> Vec<NetOp> {
    let mut ops = vec![NetOp::RemoveAllowForward {
        bridge: bridge.to_string(),
    }];
    if exists {
        ops.push(NetOp::DeleteLink {
            ifname: bridge.to_string(),
        });
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
    #[error("could not run `{op}`: {source} (is iproute2/iptables installed?)")]
    Spawn { op: String, source: std::io::Error },
    #[error("`{op}` failed: {stderr}")]
    Failed { op: String, stderr: String },
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

/// The real thing: iproute2 (`ip -batch`, one process per namespace and
/// plan), iptables, procfs. Needs CAP_NET_ADMIN (and CAP_SYS_ADMIN to enter
/// a workload's namespace).
#[derive(Debug, Default, Clone, Copy)]
pub struct IpCommand;

impl NetConfig for IpCommand {
    fn apply(&self, netns: Netns, ops: &[NetOp]) -> Result<(), NetConfigError> {
        // Under the clone lock: see `host::serialized` for the pipe trap.
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
/// `pid` (network namespaces are per thread; processes it spawns inherit it).
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

/// Applies `ops` in the calling thread's network namespace, batching
/// consecutive `ip` commands into one `ip -batch -`. Setting a link up is an
/// ioctl here, so a workload without a network (only `lo` to bring up) costs
/// no process at all.
fn apply_here(ops: &[NetOp]) -> Result<(), NetConfigError> {
    let mut batch: Vec<&NetOp> = Vec::new();
    for op in ops {
        if op.ip_args().is_some() && !matches!(op, NetOp::SetUp { .. }) {
            batch.push(op);
            continue;
        }
        run_ip_batch(&batch)?;
        batch.clear();
        match op {
            NetOp::SetUp { ifname } => set_link_up(ifname).map_err(|e| NetConfigError::Failed {
                op: op.to_string(),
                stderr: e.to_string(),
            })?,
            NetOp::EnableIpForward => enable_ip_forward(op)?,
            NetOp::AllowForward { bridge, from } => {
                // A rule from another `from` (or none) would let more in.
                iptables_remove_matching("FORWARD", |rule| {
                    is_bridge_rule(rule, "-o", bridge)
                        && rule != accept_into(bridge, from.as_deref()).as_slice()
                        && (from.is_none() || rule != drop_into(bridge).as_slice())
                })?;
                iptables_ensure("FORWARD", &["-i", bridge, "-j", "ACCEPT"])?;
                iptables_ensure("FORWARD", &accept_into(bridge, from.as_deref()))?;
                if from.is_some() {
                    iptables_ensure_last("FORWARD", &drop_into(bridge))?;
                }
            }
            NetOp::RemoveAllowForward { bridge } => {
                iptables_remove_matching("FORWARD", |rule| {
                    is_bridge_rule(rule, "-i", bridge) || is_bridge_rule(rule, "-o", bridge)
                })?;
            }
            _ => unreachable!("ip commands are batched above"),
        }
    }
    run_ip_batch(&batch)
}

fn run_ip_batch(ops: &[&NetOp]) -> Result<(), NetConfigError> {
    if ops.is_empty() {
        return Ok(());
    }
    let script: String = ops
        .iter()
        .map(|op| op.ip_args().unwrap_or_default().join(" ") + "\n")
        .collect();
    let shown = || {
        ops.iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetConfigError::Spawn {
            op: shown(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means ip exited early: its status and stderr say why.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetConfigError::Spawn {
            op: shown(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetConfigError::Failed {
            op: shown(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip link set dev <ifname> up` as SIOCGIFFLAGS/SIOCSIFFLAGS on a socket of
/// the calling thread's network namespace.
fn set_link_up(ifname: &str) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`, ours.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled.
    unsafe {
        if req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, ours.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn enable_ip_forward(op: &NetOp) -> Result<(), NetConfigError> {
    // /proc/sys/net resolves to the namespace of the thread opening it.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| NetConfigError::Failed {
        op: op.to_string(),
        stderr: e.to_string(),
    })
}

/// Outcome of one iptables run: `None` when iptables is not installed.
fn iptables(args: &[&str]) -> Result<Option<std::process::Output>, NetConfigError> {
    match Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => Ok(Some(out)),
        // No iptables, no firewall of its making to open.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NetConfigError::Spawn {
            op: format!("iptables {}", args.join(" ")),
            source,
        }),
    }
}

/// Inserts `rule` at the top of `chain` unless it is already there. Callers
/// outside [`IpCommand`] hold `host::serialized`.
pub(crate) fn iptables_ensure(chain: &str, rule: &[&str]) -> Result<(), NetConfigError> {
    iptables_ensure_at(chain, rule, "-I")
}

/// Appends `rule` to `chain` unless it is already there. Callers outside
/// [`IpCommand`] hold `host::serialized`.
pub(crate) fn iptables_ensure_last(chain: &str, rule: &[&str]) -> Result<(), NetConfigError> {
    iptables_ensure_at(chain, rule, "-A")
}

/// `rule` in `chain` unless it is already there, added with `add` (`-I`: at
/// the top, `-A`: at the end).
fn iptables_ensure_at(chain: &str, rule: &[&str], add: &'static str) -> Result<(), NetConfigError> {
    let with = |flag: &'static str| {
        let mut a = vec![flag, chain];
        a.extend_from_slice(rule);
        a
    };
    match iptables(&with("-C"))? {
        None => return Ok(()),
        Some(out) if out.status.success() => return Ok(()),
        Some(_) => {}
    }
    let args = with(add);
    match iptables(&args)? {
        Some(out) if !out.status.success() => Err(NetConfigError::Failed {
            op: format!("iptables {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The rule accepting forwarded traffic into `bridge` (from `from`, if any).
fn accept_into<'a>(bridge: &'a str, from: Option<&'a str>) -> Vec<&'a str> {
    let mut rule = Vec::new();
    if let Some(from) = from {
        rule.extend(["-s", from]);
    }
    rule.extend(["-o", bridge, "-j", "ACCEPT"]);
    rule
}

/// The rule dropping forwarded traffic into `bridge` that no accept took.
fn drop_into(bridge: &str) -> Vec<&str> {
    vec!["-o", bridge, "-j", "DROP"]
}

/// Whether `rule` (as `iptables -S` prints it, without `-A CHAIN`) is one of
/// ours for `bridge` in direction `dir` ("-i" or "-o").
fn is_bridge_rule(rule: &[&str], dir: &str, bridge: &str) -> bool {
    rule.windows(2).any(|w| w == [dir, bridge])
        && matches!(rule.last(), Some(&"ACCEPT") | Some(&"DROP"))
        && rule.iter().all(|a| {
            matches!(*a, "-s" | "-i" | "-o" | "-j" | "ACCEPT" | "DROP")
                || *a == bridge
                || a.contains('/')
        })
}

/// Deletes every rule of `chain` for which `pick` holds (given the rule's
/// arguments as `iptables -S` prints them, after `-A CHAIN`).
pub(crate) fn iptables_remove_matching(
    chain: &str,
    pick: impl Fn(&[&str]) -> bool,
) -> Result<(), NetConfigError> {
    let Some(out) = iptables(&["-S", chain])? else {
        return Ok(());
    };
    if !out.status.success() {
        // No such chain: nothing of ours in it.
        return Ok(());
    }
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["-A", c, rule @ ..] = words.as_slice() else {
            continue;
        };
        if *c == chain && pick(rule) {
            iptables_remove(chain, rule)?;
        }
    }
    Ok(())
}

/// Deletes every copy of `rule` from `chain` (none is fine).
pub(crate) fn iptables_remove(chain: &str, rule: &[&str]) -> Result<(), NetConfigError> {
    let mut args = vec!["-D", chain];
    args.extend_from_slice(rule);
    // -D removes one copy per run; a copy left by a crash mid-way makes two.
    for _ in 0..8 {
        match iptables(&args)? {
            Some(out) if out.status.success() => continue,
            _ => return Ok(()),
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
                    stderr: "injected failure".into(),
                });
            }
            rec.push((netns, op.clone()));
            if netns == Netns::Runtime {
                match op {
                    NetOp::AddBridge { name } => {
                        links.insert(name.clone());
                    }
                    NetOp::AddVeth { host, .. } => {
                        links.insert(host.clone());
                    }
                    NetOp::DeleteLink { ifname } => {
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
            "iptables -I FORWARD -i plzbr0 -j ACCEPT; iptables -I FORWARD -o plzbr0 -j ACCEPT",
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
                "iptables -D FORWARD (every -i/-o plzbr0 ACCEPT/DROP rule)",
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
        };
        let fake = RecordingNetConfig::default();
        for (ns, ops) in attach_plan(4242, "plzabcdef012345", &att) {
            fake.apply(ns, &ops).unwrap();
        }
        assert_eq!(
            fake.commands(),
            [
                "ip link add name plzabcdef012345 type veth peer name eth0 netns 4242",
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
                .contains("-s 10.101.0.0/16 -o plzbr0 -j ACCEPT")
                && cmds
                    .last()
                    .unwrap()
                    .contains("iptables -A FORWARD -o plzbr0 -j DROP"),
            "{cmds:?}"
        );
        let att = NetworkAttachment {
            bridge: "plzbr0".into(),
            address: Ipv4Addr::new(10, 101, 3, 7),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 101, 3, 1),
            mtu: Some(1420),
        };
        let [(_, host), _] = attach_plan(4242, "plzabcdef012345", &att);
        assert_eq!(
            host[0].to_string(),
            "ip link add name plzabcdef012345 mtu 1420 type veth peer name eth0 mtu 1420 netns 4242"
        );
    }

    #[test]
    fn only_our_bridge_rules_are_picked_for_removal() {
        let ours = [
            "-i plzbr0 -j ACCEPT",
            "-o plzbr0 -j ACCEPT",
            "-s 10.101.0.0/16 -o plzbr0 -j ACCEPT",
            "-o plzbr0 -j DROP",
        ];
        let theirs = [
            "-o plzbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-o plzbr01 -j ACCEPT",
            "-i docker0 -o plzbr0 -j DOCKER",
            "-d 10.101.3.0/24 -j ACCEPT",
        ];
        let split = |r: &str| r.split(' ').map(String::from).collect::<Vec<_>>();
        for r in ours {
            let w = split(r);
            let w: Vec<&str> = w.iter().map(String::as_str).collect();
            assert!(
                is_bridge_rule(&w, "-i", "plzbr0") || is_bridge_rule(&w, "-o", "plzbr0"),
                "{r}"
            );
        }
        for r in theirs {
            let w = split(r);
            let w: Vec<&str> = w.iter().map(String::as_str).collect();
            assert!(
                !is_bridge_rule(&w, "-i", "plzbr0") && !is_bridge_rule(&w, "-o", "plzbr0"),
                "{r}"
            );
        }
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
