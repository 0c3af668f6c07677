//! The workload runtime seam. A machine runs its workloads with one runtime,
//! chosen when ployzd starts: `host` (OCI bundles run in-process through
//! youki's libcontainer) or `docker` (the Docker Engine API).

//!
//! # Why the [`Runtime`] trait is async
//! Its caller is ployzd, a tokio program, and the Docker backend is HTTP on a
//! unix socket (bollard, async). The host backend is blocking by nature
//! (libcontainer forks and waits), so it keeps its own dedicated OS thread and
//! the async methods only send it a command and await the reply: no
//! libcontainer call ever runs on a tokio worker (it clones the calling
//! process, which must not be a tokio worker in the middle of a poll), and a
//! slow `stop` never blocks the daemon. The trait uses `impl Future + Send`
//! return types (no boxing); [`AnyRuntime`] picks a backend at run time.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub mod docker;
mod error;
pub mod fake;
pub mod host;

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
    /// An image reference already in dockerd's local store (docker runtime).
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
        Ok(())
    }
}

/// Checks a workload id: 1–64 chars of `[A-Za-z0-9_.-]`, starting alphanumeric
/// (valid both as a libcontainer id and as a docker container name).
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
    fn exit_mapping() {
        assert_eq!(State::from_exit(Some(0), false), State::Stopped);
        assert_eq!(State::from_exit(Some(1), false), State::Failed);
        assert_eq!(State::from_exit(Some(137), true), State::Stopped);
        assert_eq!(State::from_exit(None, false), State::Stopped);
        assert_eq!(State::Created.instance_state(), "pending");
        assert_eq!(State::Failed.instance_state(), "failed");
    }
}
