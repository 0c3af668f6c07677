//! The workload runtime seam. A machine runs its workloads with one runtime,
//! chosen when ployzd starts: `host` (OCI bundles run in-process through
//! youki's libcontainer) or `docker` (the Docker Engine API).

//!
//! # Why the [`Runtime`] trait is async
//! Its caller is ployzd, a tokio program, and the Docker backend is HTTP on a
//! unix socket (`dockerd`, async). The host backend is blocking by nature
//! (libcontainer forks and waits), so it keeps its own dedicated OS thread and
//! the async methods only send it a command and await the reply: no
//! libcontainer call ever runs on a tokio worker (it clones the calling
//! process, which must not be a tokio worker in the middle of a poll), and a
//! slow `stop` never blocks the daemon. The trait uses `impl Future + Send`
//! return types (no boxing); [`AnyRuntime`] picks a backend at run time.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

mod alloc;
pub mod docker;
pub mod dockerd;
mod error;
pub mod fake;
pub mod firewall;
pub mod host;
pub mod image;
pub mod registry;

pub use docker::DockerRuntime;
pub use error::RuntimeError;
pub use fake::{FakeCall, FakeRuntime};
pub use host::HostRuntime;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    #[default]
    Host,
    Docker,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Host => "host",
            RuntimeKind::Docker => "docker",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown runtime `{0}`: use `host` (OCI bundles, no daemon needed) or `docker`")]
pub struct UnknownRuntime(pub String);

impl FromStr for RuntimeKind {
    type Err = UnknownRuntime;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(RuntimeKind::Host),
            "docker" => Ok(RuntimeKind::Docker),
            other => Err(UnknownRuntime(other.into())),
        }
    }
}

/// What a workload runs from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Image {
    /// A root filesystem directory (host runtime). It is used in place, not copied.
    Rootfs(PathBuf),
    /// An image already in dockerd's local store (docker runtime): a name
    /// (`busybox`, `registry/app:1.2`) or an image id (`sha256:<hex>`), e.g.
    /// after [`DockerRuntime::load_image`].
    Reference(String),
}

/// A volume directory on the machine bind-mounted into the workload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMount {
    /// Directory on the machine; must exist.
    pub source: PathBuf,
    /// Absolute path inside the workload.
    pub target: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// Everything a runtime needs to create one workload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Unique on this machine: 1–64 chars of `[A-Za-z0-9_.-]`, starting alphanumeric.
    pub id: String,
    pub image: Image,
    /// argv; must not be empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs; `PATH` defaults to the usual one when absent.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub mounts: Vec<VolumeMount>,
    /// Hard memory limit in bytes.
    #[serde(default)]
    pub memory_limit: Option<u64>,
    /// Relative CPU weight (cgroup v1 `cpu.shares`, 2–262144; docker default 1024).
    #[serde(default)]
    pub cpu_shares: Option<u64>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// Where the workload's `eth0` plugs in. `None`: no network beyond its own
    /// loopback (host: a private network namespace with only `lo`; docker:
    /// network mode `none`).
    #[serde(default)]
    pub network: Option<NetworkAttachment>,
}

impl WorkloadSpec {
    /// A spec with only the required fields set.
    pub fn new(id: impl Into<String>, image: Image, args: Vec<String>) -> Self {
        WorkloadSpec {
            id: id.into(),
            image,
            args,
            env: Vec::new(),
            mounts: Vec::new(),
            memory_limit: None,
            cpu_shares: None,
            hostname: None,
            network: None,
        }
    }

    /// Checks what both backends need before touching the system.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        validate_id(&self.id)?;
        if self.args.is_empty() {
            return Err(RuntimeError::InvalidSpec {
                id: self.id.clone(),
                reason: "args is empty: give the program to run, e.g. [\"sh\", \"-c\", \"...\"]"
                    .into(),
            });
        }
        for m in &self.mounts {
            if !m.target.is_absolute() {
                return Err(RuntimeError::InvalidSpec {
                    id: self.id.clone(),
                    reason: format!("mount target {} is not absolute", m.target.display()),
                });
            }
        }
        if let Some(shares) = self.cpu_shares {
            if !(2..=262_144).contains(&shares) {
                return Err(RuntimeError::InvalidSpec {
                    id: self.id.clone(),
                    reason: format!("cpu_shares {shares} is outside 2..=262144"),
                });
            }
        }
        if let Some(net) = &self.network {
            net.validate().map_err(|reason| RuntimeError::InvalidSpec {
                id: self.id.clone(),
                reason,
            })?;
        }
        Ok(())
    }
}

/// The search domain written next to [`NetworkAttachment::dns`].
pub const DNS_SEARCH: &str = "internal";

/// The `/etc/resolv.conf` of a workload whose resolver is `dns`.
pub fn resolv_conf(dns: Ipv4Addr) -> String {
    format!("nameserver {dns}\nsearch {DNS_SEARCH}\noptions ndots:1\n")
}

/// The machine's workload bridge: it holds `gateway/prefix` (e.g. 10.101.3.1/24,
/// the machine's slice of the cluster range; the mesh interface may hold the
/// same address) and the kernel forwards between it and the mesh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BridgeNetwork {
    /// Interface name (1-15 chars of `[A-Za-z0-9_.-]`), e.g. `plzbr0`. The
    /// docker backend also uses it as the docker network's name.
    pub bridge: String,
    pub gateway: Ipv4Addr,
    /// Prefix length of the bridge subnet, 8..=30 (usually 24).
    pub prefix: u8,
    /// MTU of the bridge (docker: of the network) and, through
    /// [`NetworkAttachment::mtu`], of each workload's interface; `None`: the
    /// kernel's 1500. ployzd uses the mesh's, so a workload's packets fit the
    /// tunnel without relying on path-MTU discovery.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Forwarded traffic into the subnet is accepted only from this IPv4
    /// range (`a.b.c.d/n`; ployzd: the cluster's overlay range) and dropped
    /// from anywhere else, e.g. an underlay neighbour that routes to the
    /// subnet through this machine. `None`: accepted from anywhere.
    #[serde(default)]
    pub allow_from: Option<String>,
}

impl BridgeNetwork {
    /// The subnet's network address (`10.101.3.0` for `10.101.3.1/24`).
    pub fn network_address(&self) -> Ipv4Addr {
        network_address(self.gateway, self.prefix)
    }

    /// The subnet in CIDR notation, e.g. `10.101.3.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}/{}", self.network_address(), self.prefix)
    }

    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |reason: String| RuntimeError::InvalidNetwork {
            bridge: self.bridge.clone(),
            reason,
        };
        validate_ifname(&self.bridge).map_err(bad)?;
        check_prefix(self.prefix).map_err(bad)?;
        check_host_address(self.gateway, self.prefix, "gateway").map_err(bad)?;
        check_mtu(self.mtu).map_err(bad)?;
        if let Some(range) = &self.allow_from {
            check_cidr(range).map_err(bad)?;
        }
        Ok(())
    }
}

/// 576 (the least every IPv4 host must accept) ..= 9000 (jumbo frames).
fn check_mtu(mtu: Option<u16>) -> Result<(), String> {
    match mtu {
        Some(m) if !(576..=9000).contains(&m) => Err(format!("MTU {m} is outside 576..=9000")),
        _ => Ok(()),
    }
}

/// An IPv4 range in CIDR notation, with no host bits set (`10.101.0.0/16`).
fn check_cidr(range: &str) -> Result<(), String> {
    let bad = || format!("`{range}` is not an IPv4 range like 10.101.0.0/16");
    let (addr, prefix) = range.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 || network_address(addr, prefix) != addr {
        return Err(bad());
    }
    Ok(())
}

/// How one workload plugs into a [`BridgeNetwork`]: `eth0` with
/// `address/prefix` and a default route via `gateway`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkAttachment {
    /// The bridge (see [`BridgeNetwork::bridge`]); it must exist
    /// ([`Runtime::ensure_network`]) before the workload is created.
    pub bridge: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// MTU of the workload's interface (usually its bridge's
    /// [`BridgeNetwork::mtu`]); `None`: the kernel's 1500. The docker
    /// backend takes the network's instead.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// The resolver the workload uses (host: its `/etc/resolv.conf`, with
    /// `search internal`; docker: `--dns`). `None`: the image's own file
    /// (host) or docker's default.
    #[serde(default)]
    pub dns: Option<Ipv4Addr>,
}

impl NetworkAttachment {
    fn validate(&self) -> Result<(), String> {
        validate_ifname(&self.bridge)?;
        check_mtu(self.mtu)?;
        check_prefix(self.prefix)?;
        check_host_address(self.address, self.prefix, "address")?;
        check_host_address(self.gateway, self.prefix, "gateway")?;
        if network_address(self.address, self.prefix) != network_address(self.gateway, self.prefix)
        {
            return Err(format!(
                "gateway {} is outside the subnet of address {}/{}",
                self.gateway, self.address, self.prefix
            ));
        }
        if self.address == self.gateway {
            return Err(format!(
                "address {} is the gateway's: give the workload its own",
                self.address
            ));
        }
        Ok(())
    }
}

fn network_address(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) & mask)
}

fn check_prefix(prefix: u8) -> Result<(), String> {
    if (8..=30).contains(&prefix) {
        Ok(())
    } else {
        Err(format!("prefix /{prefix} is outside /8../30"))
    }
}

/// Neither the network nor the broadcast address of `addr/prefix`.
fn check_host_address(addr: Ipv4Addr, prefix: u8, what: &str) -> Result<(), String> {
    let host_bits = u32::from(addr) & !u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let all_ones = (1u32 << (32 - u32::from(prefix))) - 1;
    if host_bits == 0 || host_bits == all_ones {
        return Err(format!(
            "{what} {addr} is the network or broadcast address of its /{prefix}"
        ));
    }
    Ok(())
}

/// A Linux interface name we create or attach to: 1-15 chars of `[A-Za-z0-9_.-]`.
fn validate_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(format!(
            "bridge name `{name}` is invalid: use 1-15 characters of [A-Za-z0-9_.-]"
        ));
    }
    if matches!(name, "bridge" | "host" | "none" | "default") {
        return Err(format!(
            "bridge name `{name}` is reserved by docker: choose another, e.g. plzbr0"
        ));
    }
    Ok(())
}

/// Checks a workload id: 1–64 chars of `[A-Za-z0-9_.-]`, starting alphanumeric
/// (valid both as a libcontainer id and as a docker container name).
/// The checks every runtime's `exec` makes before it runs anything.
pub fn validate_exec(id: &str, args: &[String]) -> Result<(), RuntimeError> {
    validate_id(id)?;
    if args.is_empty() {
        return Err(RuntimeError::InvalidSpec {
            id: id.to_string(),
            reason: "exec without a command".into(),
        });
    }
    Ok(())
}

pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidId(id.to_string()))
    }
}

/// Lifecycle state of one workload as a runtime sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Created, its process not started yet.
    Created,
    Running,
    /// Exited with status 0, or ended by [`Runtime::stop`].
    Stopped,
    /// Exited on its own with a non-zero status or a signal.
    Failed,
}

impl State {
    /// The project's instance state (`ployz_api::InstanceState`, snake_case):
    /// created → `pending`, running → `running`, stopped → `stopped`, failed → `failed`.
    pub fn instance_state(self) -> &'static str {
        match self {
            State::Created => "pending",
            State::Running => "running",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }

    /// Decides stopped vs failed for an exited process.
    pub fn from_exit(exit_code: Option<i64>, stop_requested: bool) -> State {
        match (stop_requested, exit_code) {
            (true, _) | (false, Some(0)) => State::Stopped,
            // Unknown status (e.g. reaped by someone else): not evidence of failure.
            (false, None) => State::Stopped,
            (false, Some(_)) => State::Failed,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Created => "created",
            State::Running => "running",
            State::Stopped => "stopped",
            State::Failed => "failed",
        })
    }
}

/// One entry of [`Runtime::list`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkloadStatus {
    pub id: String,
    pub state: State,
    /// How its process ended (code, or 128+signal), when it has exited and
    /// the runtime knows; `None` while it runs.
    #[serde(default)]
    pub exit_code: Option<i64>,
}

/// What [`Runtime::exec`] saw of a command run inside a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its exit code (128+signal when killed); `None` when it did not end
    /// within the timeout (it was killed then) or the runtime could not tell.
    pub exit_code: Option<i64>,
    /// The end of what it wrote to stdout and stderr (at most
    /// [`EXEC_OUTPUT_MAX`] bytes, lossy UTF-8).
    pub output: String,
}

/// Most output [`Runtime::exec`] keeps (the end of it).
pub const EXEC_OUTPUT_MAX: usize = 4096;

/// The last [`EXEC_OUTPUT_MAX`] bytes of `out`, as lossy UTF-8.
pub(crate) fn exec_output_tail(out: &[u8]) -> String {
    let start = out.len().saturating_sub(EXEC_OUTPUT_MAX);
    String::from_utf8_lossy(&out[start..]).into_owned()
}

/// The kernel/daemon seam for workloads. See the crate docs for why it is async.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    /// Prepares the workload without starting it (state [`State::Created`]).
    fn create(&self, spec: &WorkloadSpec) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// SIGTERM, then SIGKILL once `timeout` has passed. Stopping a stopped workload is a no-op.
    fn stop(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes the workload (killing it if it still runs) and its logs.
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn state(&self, id: &str) -> impl Future<Output = Result<State, RuntimeError>> + Send;
    /// Workloads this runtime manages (created by ployz), in no particular order.
    fn list(&self) -> impl Future<Output = Result<Vec<WorkloadStatus>, RuntimeError>> + Send;
    /// Everything the workload wrote to stdout and stderr so far (lossy UTF-8).
    fn logs(&self, id: &str) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Runs `args` inside the running workload `id` (its namespaces and root
    /// filesystem), killing it after `timeout`. An error means it could not
    /// be started at all (the workload does not run, no such program).
    fn exec(
        &self,
        id: &str,
        args: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<ExecOutput, RuntimeError>> + Send;
    /// Creates the workload bridge if it is missing and makes sure it holds the
    /// gateway address, is up, and that the kernel forwards to and from it
    /// (ip_forward, firewall accept rules). Idempotent: call it at every start.
    fn ensure_network(
        &self,
        net: &BridgeNetwork,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes the bridge and the forwarding rules [`Runtime::ensure_network`]
    /// added. Best effort (for tests and cleanup): a missing bridge is not an error.
    fn remove_network(&self, bridge: &str)
        -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

/// Either backend, chosen when ployzd starts.
pub enum AnyRuntime {
    Host(HostRuntime),
    Docker(DockerRuntime),
}

macro_rules! dispatch {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            AnyRuntime::Host($r) => $e,
            AnyRuntime::Docker($r) => $e,
        }
    };
}

impl Runtime for AnyRuntime {
    fn kind(&self) -> RuntimeKind {
        dispatch!(self, r => r.kind())
    }
    async fn create(&self, spec: &WorkloadSpec) -> Result<(), RuntimeError> {
        dispatch!(self, r => r.create(spec).await)
    }
    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        dispatch!(self, r => r.start(id).await)
    }
    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        dispatch!(self, r => r.stop(id, timeout).await)
    }
    async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        dispatch!(self, r => r.delete(id).await)
    }
    async fn state(&self, id: &str) -> Result<State, RuntimeError> {
        dispatch!(self, r => r.state(id).await)
    }
    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        dispatch!(self, r => r.list().await)
    }
    async fn logs(&self, id: &str) -> Result<String, RuntimeError> {
        dispatch!(self, r => r.logs(id).await)
    }
    async fn exec(
        &self,
        id: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        dispatch!(self, r => r.exec(id, args, timeout).await)
    }
    async fn ensure_network(&self, net: &BridgeNetwork) -> Result<(), RuntimeError> {
        dispatch!(self, r => r.ensure_network(net).await)
    }
    async fn remove_network(&self, bridge: &str) -> Result<(), RuntimeError> {
        dispatch!(self, r => r.remove_network(bridge).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!("host".parse::<RuntimeKind>().unwrap(), RuntimeKind::Host);
        assert_eq!(
            "docker".parse::<RuntimeKind>().unwrap(),
            RuntimeKind::Docker
        );
        let e = "podman".parse::<RuntimeKind>().unwrap_err();
        assert!(e.to_string().contains("`podman`"));
    }

    #[test]
    fn ids() {
        for ok in ["a", "web-1", "A_b.c", &"x".repeat(64)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "a b", &"x".repeat(65)] {
            let e = validate_id(bad).unwrap_err();
            assert!(matches!(e, RuntimeError::InvalidId(_)), "{bad}");
        }
    }

    #[test]
    fn spec_validation() {
        let mut s = WorkloadSpec::new("w", Image::Rootfs("/r".into()), vec![]);
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("args is empty"));
        s.args = vec!["true".into()];
        s.validate().unwrap();
        s.cpu_shares = Some(1);
        assert!(s.validate().unwrap_err().to_string().contains("cpu_shares"));
        s.cpu_shares = Some(512);
        s.mounts.push(VolumeMount {
            source: "/v".into(),
            target: "rel".into(),
            read_only: false,
        });
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not absolute"));
    }

    #[test]
    fn network_validation() {
        let net = BridgeNetwork {
            bridge: "plzbr0".into(),
            gateway: Ipv4Addr::new(10, 101, 3, 1),
            prefix: 24,
            mtu: Some(1420),
            allow_from: Some("10.101.0.0/16".into()),
        };
        net.validate().unwrap();
        assert_eq!(net.subnet(), "10.101.3.0/24");
        for (mtu, allow_from, why) in [
            (Some(100), None, "MTU 100"),
            (Some(9001), None, "MTU 9001"),
            (None, Some("10.101.0.1/16"), "not an IPv4 range"),
            (None, Some("10.101.0.0/33"), "not an IPv4 range"),
            (None, Some("10.101.0.0"), "not an IPv4 range"),
            (None, Some("any"), "not an IPv4 range"),
        ] {
            let n = BridgeNetwork {
                mtu,
                allow_from: allow_from.map(String::from),
                ..net.clone()
            };
            let e = n.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        for ok in ["0.0.0.0/0", "10.0.0.0/8", "10.101.3.7/32"] {
            BridgeNetwork {
                allow_from: Some(ok.into()),
                ..net.clone()
            }
            .validate()
            .unwrap();
        }
        // Records from before the fields still parse.
        let json = r#"{"bridge":"plzbr0","gateway":"10.101.3.1","prefix":24}"#;
        let old: BridgeNetwork = serde_json::from_str(json).unwrap();
        assert_eq!((old.mtu, old.allow_from), (None, None));
        for (bridge, prefix, gw) in [
            ("plzbr0-too-long!", 24, [10, 101, 3, 1]),
            ("bridge", 24, [10, 101, 3, 1]),
            ("a/b", 24, [10, 101, 3, 1]),
            ("plzbr0", 31, [10, 101, 3, 1]),
            ("plzbr0", 24, [10, 101, 3, 0]),
            ("plzbr0", 24, [10, 101, 3, 255]),
        ] {
            let n = BridgeNetwork {
                bridge: bridge.into(),
                gateway: Ipv4Addr::from(gw),
                prefix,
                mtu: None,
                allow_from: None,
            };
            assert!(
                matches!(n.validate(), Err(RuntimeError::InvalidNetwork { .. })),
                "{n:?}"
            );
        }

        let mut s = WorkloadSpec::new("w", Image::Rootfs("/r".into()), vec!["true".into()]);
        let att = NetworkAttachment {
            bridge: "plzbr0".into(),
            address: Ipv4Addr::new(10, 101, 3, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 101, 3, 1),
            mtu: Some(1420),
            dns: None,
        };
        s.network = Some(att.clone());
        s.validate().unwrap();
        s.network = Some(NetworkAttachment {
            mtu: Some(70),
            ..att.clone()
        });
        assert!(s.validate().unwrap_err().to_string().contains("MTU 70"));
        for (addr, gw, why) in [
            ([10, 101, 3, 1], [10, 101, 3, 1], "gateway's"),
            ([10, 101, 3, 2], [10, 101, 4, 1], "outside the subnet"),
            ([10, 101, 3, 255], [10, 101, 3, 1], "broadcast"),
        ] {
            s.network = Some(NetworkAttachment {
                address: Ipv4Addr::from(addr),
                gateway: Ipv4Addr::from(gw),
                ..att.clone()
            });
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        // Old records without the field still parse.
        let json = r#"{"id":"w","image":{"rootfs":"/r"},"args":["true"]}"#;
        let old: WorkloadSpec = serde_json::from_str(json).unwrap();
        assert_eq!(old.network, None);
    }

    #[test]
    fn exit_mapping() {
        assert_eq!(State::from_exit(Some(0), false), State::Stopped);
        assert_eq!(State::from_exit(Some(1), false), State::Failed);
        assert_eq!(State::from_exit(Some(137), true), State::Stopped);
        assert_eq!(State::from_exit(None, false), State::Stopped);
        assert_eq!(State::Created.instance_state(), "pending");
        assert_eq!(State::Failed.instance_state(), "failed");
    }
}
