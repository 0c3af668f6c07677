//! The local API: one JSON object per line over the daemon's Unix socket.
//! The client writes a [`Request`], the daemon answers with a [`Reply`].
//! A connection may carry several request/reply pairs in sequence.

use crate::gateway::*;
use crate::records::*;
use crate::time::rfc3339;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Everything the daemon can be asked, as one enum (the daemon's core
/// dispatches on it; nothing else reaches it from outside).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create a network with this machine as its founder.
    MeshInit {
        network: String,
        #[serde(default)]
        region: Option<String>,
        #[serde(default)]
        cidr: Option<String>,
    },
    MeshStatus,
    MachineList,
    Lifecycle {
        machine: String,
        action: LifecycleAction,
        #[serde(default)]
        force: bool,
    },
    InviteCreate {
        ttl_secs: u64,
    },
    InviteList,
    InviteRevoke {
        invite_id: String,
    },
    /// Join the network an invite token is for (run on the joining machine).
    InviteImport {
        token: String,
    },
    /// Add machines to the storage (Raft voter) set.
    StoragePromote {
        replicas: u8,
        machines: Vec<String>,
    },
    /// Provision machines over SSH and join them (`machine init` / `add`).
    MachineAdd(Box<AddRequest>),
    /// Upgrade ployzd on machines provisioned over SSH.
    MachineUpdate {
        #[serde(default)]
        version: Option<String>,
        #[serde(default)]
        machines: Vec<String>,
        #[serde(default)]
        release_url: Option<String>,
        #[serde(default)]
        identity: Option<String>,
    },
    /// How a standard NATS client connects to this machine's control plane
    /// (the operator user; `admin`: ployzd's own full-rights user).
    NatsUrl {
        #[serde(default)]
        admin: bool,
    },
    /// `nats user add`: an app user with these grants (replaces one of the
    /// same name, with a new password).
    NatsUserAdd {
        name: String,
        #[serde(default)]
        allow_pub: Vec<String>,
        #[serde(default)]
        allow_sub: Vec<String>,
        #[serde(default)]
        kv_buckets: Vec<String>,
    },
    /// `nats user ls` (no passwords).
    NatsUserList,
    /// `nats user rm`: the user's connections are closed on every machine.
    NatsUserRm {
        name: String,
    },
    /// The RTT matrix of the mesh.
    MachineRtt,
    /// Remove a machine from the network.
    MachineRm {
        machine: String,
        #[serde(default)]
        force: bool,
    },
    /// Create or update a service and wait until its instances run.
    ServiceDeploy(Box<DeployRequest>),
    ServiceList,
    /// Delete a service; every machine stops and removes its instances.
    ServiceRm {
        name: String,
    },
    /// What a service's instances wrote to stdout and stderr.
    ServiceLogs {
        name: String,
        /// Only this instance.
        #[serde(default)]
        slot: Option<u32>,
        /// Last lines per instance.
        #[serde(default)]
        tail: Option<usize>,
    },
    /// Move a service's instance (and its volumes) to another machine.
    ServiceMigrate {
        name: String,
        to: String,
        /// The machine to move from, when the service runs on several.
        #[serde(default)]
        from: Option<String>,
    },
    /// Leave the network from this machine alone, once the network has
    /// removed it (`machine rm --force` while it was unreachable): stop and
    /// delete its workloads and state. `force`: even when the network's
    /// store cannot be asked whether it still counts this machine.
    MeshLeave {
        #[serde(default)]
        force: bool,
    },
    /// `op ls`: long operations, newest first.
    OpList,
    /// `op wait`: follow one operation until it ends (or `timeout_secs`).
    OpWait {
        id: String,
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// `status` / `doctor`: check this machine and say what is wrong.
    Doctor,
    /// `dashboard`: a one-time login link to this machine's web UI.
    Dashboard,
    /// `registry add` / `registry login`: how to reach a registry.
    RegistrySet {
        host: String,
        #[serde(default)]
        insecure: bool,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<Secret>,
    },
    /// `registry ls`.
    RegistryList,
    /// `registry rm`.
    RegistryRm {
        host: String,
    },
    // --- gateway (issue 14): routes and ACME ---
    /// `route add`: route `host` + `path` to `service`'s `port`.
    RouteAdd {
        host: String,
        #[serde(default)]
        path: Option<String>,
        service: String,
        port: u16,
        #[serde(default)]
        tls: RouteTls,
    },
    /// `route ls`.
    RouteList,
    /// `route rm`: one path of `host`, or all of them without `path`.
    RouteRm {
        host: String,
        #[serde(default)]
        path: Option<String>,
    },
    /// `acme set`.
    AcmeSet {
        #[serde(default)]
        directory: Option<String>,
        email: String,
        #[serde(default)]
        ca_pem: Option<String>,
        #[serde(default)]
        challenge: AcmeChallenge,
    },
    /// `acme show`.
    AcmeShow,
}

/// `deploy service`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct DeployRequest {
    pub name: String,
    /// An absolute path to an image archive or OCI layout on the machine
    /// running ployzctl, a registry reference, or a name (stored on the
    /// deploying machine under it, else a Docker Hub reference).
    pub image: String,
    pub replicas: u32,
    /// `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// `volume:/path`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Command (after `--`); empty runs the image's default.
    #[serde(default)]
    pub command: Vec<String>,
    /// Seconds to wait for the instances to run (0: do not wait).
    #[serde(default)]
    pub wait_secs: Option<u64>,
    /// Memory limit per instance, e.g. `64M` (K, M, G suffixes; bytes without).
    #[serde(default)]
    pub memory: Option<String>,
    /// Relative CPU weight per instance, 2–262144 (1024 is the default weight).
    #[serde(default)]
    pub cpu_shares: Option<u64>,
    /// The compose project the service belongs to (`deploy -f`); a deploy
    /// without one keeps the service's current project.
    #[serde(default)]
    pub project: Option<String>,
    /// Health check: a shell command run inside each instance.
    #[serde(default)]
    pub health_cmd: Option<String>,
    /// Health check: `PATH[:PORT]` to GET on each instance (port 80 by default).
    #[serde(default)]
    pub health_http: Option<String>,
    /// Health check: a TCP port of each instance to connect to.
    #[serde(default)]
    pub health_tcp: Option<String>,
    /// Durations like `10s`, `500ms`, `1m` (defaults in the README).
    #[serde(default)]
    pub health_interval: Option<String>,
    #[serde(default)]
    pub health_timeout: Option<String>,
    #[serde(default)]
    pub health_retries: Option<u32>,
    #[serde(default)]
    pub health_start_period: Option<String>,
    /// Published ports, `[IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]`.
    #[serde(default)]
    pub publish: Vec<String>,
    /// `--nats-user NAME`: instances get `NATS_URL` with that app user's
    /// credentials and their machine's overlay address.
    #[serde(default)]
    pub nats_user: Option<String>,
}

/// A password on the wire: serialized as the plain string, but its `Debug`
/// (request logs) never shows it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `machine init` / `machine add`: every flag of the page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct AddRequest {
    /// `user@host[:port]` targets, provisioned in sequence.
    pub targets: Vec<String>,
    /// Name of the network to join: must be this machine's network.
    pub network: String,
    #[serde(default)]
    pub runtime: Option<String>,
    #[serde(default)]
    pub service_mode: Option<String>,
    #[serde(default)]
    pub install_source: Option<String>,
    #[serde(default)]
    pub install_version: Option<String>,
    #[serde(default)]
    pub install_git_url: Option<String>,
    #[serde(default)]
    pub install_git_ref: Option<String>,
    #[serde(default)]
    pub release_url: Option<String>,
    /// SSH private key (absolute path, resolved by ployzctl).
    #[serde(default)]
    pub identity: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleAction {
    Activate,
    Drain,
    Standby,
}

impl LifecycleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleAction::Activate => "activate",
            LifecycleAction::Drain => "drain",
            LifecycleAction::Standby => "standby",
        }
    }
}

impl fmt::Display for LifecycleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The daemon's answer: exactly one of `ok` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(Response),
    Error(ApiError),
    /// Live progress of a long request; more lines follow, the last one is
    /// `ok` or `error`.
    Progress(Progress),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub target: String,
    pub step: String,
    pub message: String,
    /// Bytes moved so far in a transfer (upload, copy, pull); repeated
    /// lines with the same step and message only advance it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    /// The transfer's size, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

impl Progress {
    pub fn line(target: &str, step: &str, message: impl Into<String>) -> Progress {
        Progress {
            target: target.to_string(),
            step: step.to_string(),
            message: message.into(),
            done: None,
            total: None,
        }
    }
}

impl From<Result<Response, ApiError>> for Reply {
    fn from(r: Result<Response, ApiError>) -> Self {
        match r {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::Error(e),
        }
    }
}

/// Successful answers. `ployzctl --json` prints the inner value as it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Box<MeshStatus>),
    Machines(MachineList),
    Machine(Box<LifecycleResult>),
    InviteCreated(InviteCreated),
    Invites(InviteList),
    Invite(InviteView),
    Promoted(PromoteReport),
    Removed(RemoveReport),
    Nats(NatsInfo),
    Rtt(RttReport),
    /// `machine init/add/update --json`: one result per target.
    Targets(TargetsReport),
    Services(ServiceList),
    Logs(ServiceLogs),
    Service(Box<ServiceView>),
    ServiceRemoved(ServiceRemoved),
    Operations(OpList),
    Operation(Box<OpView>),
    Left(LeftNetwork),
    Doctor(DoctorReport),
    Dashboard(DashboardLink),
    Registries(RegistryList),
    Routes(RouteList),
    Acme(AcmeView),
    NatsUser(NatsUserCreated),
    NatsUsers(NatsUserList),
}

/// `nats user add --json`: the one answer that carries the password.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatsUserCreated {
    pub user: String,
    pub password: String,
    /// `nats://user:password@host:port` (`tls://` where the listener is TLS).
    pub url: String,
}

impl std::fmt::Debug for NatsUserCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsUserCreated")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// `nats user ls --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatsUserList {
    pub users: Vec<NatsUserView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatsUserView {
    pub user: String,
    pub allow_pub: Vec<String>,
    pub allow_sub: Vec<String>,
    pub kv_buckets: Vec<String>,
}

/// `registry ls --json` (no secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryList {
    pub registries: Vec<RegistryView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryView {
    pub host: String,
    pub insecure: bool,
    /// `null` without credentials.
    #[serde(default)]
    pub username: Option<String>,
}

/// `dashboard --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DashboardLink {
    /// Opens a session once, within 5 minutes.
    pub url: String,
}

/// `status --json`: one line per check of this machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DoctorReport {
    pub machine_id: String,
    pub version: String,
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// Whether every check passed.
    pub fn all_ok(&self) -> bool {
        self.checks.iter().all(|c| c.status == CheckStatus::Ok)
    }
}

/// One check of `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Check {
    /// What was checked: `network`, `store`, `mesh <peer>`, `nats`, `runtime`, `clock <peer>`, `disk`.
    pub check: String,
    pub status: CheckStatus,
    pub message: String,
    /// How to fix it (absent when ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    pub fn ok(check: impl Into<String>, message: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            status: CheckStatus::Ok,
            message: message.into(),
            hint: None,
        }
    }

    pub fn warn(
        check: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check {
            check: check.into(),
            status: CheckStatus::Warn,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn fail(
        check: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check {
            check: check.into(),
            status: CheckStatus::Fail,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Ok,
    Warn,
    Fail,
}

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        })
    }
}

/// `mesh leave --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeftNetwork {
    pub machine: String,
    pub network: String,
    /// Workloads stopped and deleted.
    pub removed_workloads: usize,
}

/// `op ls --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpList {
    pub operations: Vec<OpView>,
}

/// One long operation as `op ls` / `op wait` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpView {
    pub id: String,
    pub kind: OpKind,
    pub subject: String,
    pub owner: String,
    pub state: OpState,
    pub step: String,
    pub message: String,
    pub started_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

impl From<&OperationRecord> for OpView {
    fn from(r: &OperationRecord) -> Self {
        OpView {
            id: r.id.clone(),
            kind: r.kind,
            subject: r.subject.clone(),
            owner: r.owner.clone(),
            state: r.state,
            step: r.step.clone(),
            message: r.message.clone(),
            started_at: crate::time::rfc3339(r.started_at_ms),
            updated_at: crate::time::rfc3339(r.updated_at_ms),
            exit_code: r.exit_code,
        }
    }
}

/// `service ls --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceList {
    pub services: Vec<ServiceView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    /// Compose project (`deploy -f`); `null` for a service deployed alone.
    #[serde(default)]
    pub project: Option<String>,
    pub image: String,
    /// `null` for an image given by name (not shipped between machines).
    #[serde(default)]
    pub digest: Option<String>,
    /// Image manifest digest of an image pulled from a registry.
    #[serde(default)]
    pub manifest_digest: Option<String>,
    pub replicas: u32,
    pub generation: u64,
    #[serde(default)]
    pub volumes: Vec<String>,
    /// How its instances are probed (`null`: they are not).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Published ports as `[IP:]HOST_PORT:CONTAINER_PORT/PROTO`.
    #[serde(default)]
    pub ports: Vec<String>,
    pub instances: Vec<InstanceView>,
}

impl ServiceView {
    /// Instances that are not running (a deploy or migration reports them).
    pub fn not_running(&self) -> Vec<&InstanceView> {
        self.instances
            .iter()
            .filter(|i| i.state != InstanceState::Running)
            .collect()
    }

    /// Instances that do not serve: not running, or running but not
    /// healthy while the service has a health check.
    pub fn not_ready(&self) -> Vec<&InstanceView> {
        self.instances.iter().filter(|i| !i.ready()).collect()
    }
}

impl InstanceView {
    /// Running, and healthy if its service has a health check.
    pub fn ready(&self) -> bool {
        self.state == InstanceState::Running
            && matches!(self.health, InstanceHealth::None | InstanceHealth::Healthy)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceView {
    pub machine: String,
    pub slot: u32,
    pub state: InstanceState,
    pub overlay_ip: Option<String>,
    /// Why the instance failed; `null` otherwise (always present, as the
    /// README lists it).
    #[serde(default)]
    pub error: Option<String>,
    /// How its process last ended in this generation (`null`: it has not
    /// exited): a crash loop shows here while `state` flips.
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// When it last exited (RFC 3339 UTC), `null` if it has not.
    #[serde(default)]
    pub exited_at: Option<String>,
    /// How often its machine started it again after it exited, in this
    /// generation.
    #[serde(default)]
    pub restarts: u32,
    /// The instance's machine did not answer the last RTT probe of the
    /// machine that answered this request: `state` is the last it reported.
    #[serde(default)]
    pub unreachable: bool,
    /// The service generation the instance runs (older than the service's
    /// while a rolling update has not reached it); `null` while pending.
    #[serde(default)]
    pub generation: Option<u64>,
    /// `starting`, `healthy`, `unhealthy`, or `none` (no health check).
    #[serde(default)]
    pub health: InstanceHealth,
    /// What its last failed health probe said (`null`: none failed).
    #[serde(default)]
    pub health_output: Option<String>,
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
        })
    }
}

/// `service logs --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceLogs {
    pub name: String,
    pub instances: Vec<InstanceLogs>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceLogs {
    pub machine: String,
    pub slot: u32,
    /// The last lines the instance wrote (stdout and stderr interleaved).
    pub logs: String,
    /// Why the logs could not be read (the machine is unreachable, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `service rm --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRemoved {
    pub name: String,
    /// Machines that removed their instances.
    pub removed_on: Vec<String>,
    /// Machines that had not confirmed before the deadline (they remove the
    /// instances when they next reach the store).
    pub pending_on: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetsReport {
    pub results: Vec<TargetResult>,
}

/// `machine rtt --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RttReport {
    pub rows: Vec<RttRow>,
    /// Every pair that could not be probed, never a silent gap.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RttRow {
    pub machine: String,
    pub peer: String,
    pub median_ms: Option<f64>,
    pub stddev_ms: Option<f64>,
    pub samples: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `nats url --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatsInfo {
    /// `nats://user:password@127.0.0.1:4222`.
    pub url: String,
    pub user: String,
    pub password: String,
    /// Addresses this machine's server listens on.
    pub servers: Vec<String>,
    /// The network CA's certificate (PEM), when the server has TLS
    /// listeners (`--nats-listen`): `url` is then `tls://` on the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

/// `machine storage promote --json`: one result per target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PromoteReport {
    pub replicas: u8,
    pub voters: Vec<String>,
    pub results: Vec<TargetResult>,
}

/// Outcome for one target of a multi-target command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetResult {
    pub machine: String,
    pub ok: bool,
    /// The SSH target, for provisioning results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The step that failed (absent on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// What happened, or why it failed.
    pub message: String,
}

/// `machine rm --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoveReport {
    pub machine: String,
    /// Whether the machine itself cleaned up (false with `--force`).
    pub cleaned_up: bool,
    /// Whether it was a storage machine and left the voter set.
    pub left_storage: bool,
    /// The storage set afterwards (machine ids).
    #[serde(default)]
    pub storage_set: Vec<String>,
    /// The storage set size the network asks for (`storage promote --replicas`).
    #[serde(default)]
    pub storage_replicas: u8,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshStatus {
    pub machine_id: String,
    pub version: String,
    pub network: Option<NetworkView>,
    pub machine: Option<MachineView>,
    pub store: StoreStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkView {
    pub network_id: String,
    pub name: String,
    pub cidr: String,
    pub founder: String,
    pub storage_replicas: u8,
    pub created_at: String,
}

impl From<&NetworkRecord> for NetworkView {
    fn from(n: &NetworkRecord) -> Self {
        NetworkView {
            network_id: n.network_id.clone(),
            name: n.name.clone(),
            cidr: n.cidr.clone(),
            founder: n.founder.clone(),
            storage_replicas: n.storage_replicas,
            created_at: rfc3339(n.created_at_ms),
        }
    }
}

/// The local replica's view of the Raft group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreStatus {
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    pub leader: Option<String>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub voters: Vec<String>,
    /// Storage machines this machine sends store requests to when its own
    /// replica cannot serve them (all of them on a compute machine).
    #[serde(default)]
    pub storage_peers: Vec<String>,
    /// The storage machine whose change events this machine follows (a
    /// machine without a replica of its own); none on a storage machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_from: Option<String>,
    /// Why the store could not be asked (then `network` and `machine` are
    /// this machine's last known copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `machine ls --json`: `{"machines":[...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineList {
    pub machines: Vec<MachineView>,
}

/// One machine as `machine ls` shows it. Field names are a stable contract.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineView {
    pub id: String,
    pub hostname: String,
    pub lifecycle: Lifecycle,
    pub authority: Authority,
    pub region: String,
    pub region_role: RegionRole,
    pub overlay_ip: String,
    pub subnet: String,
    pub version: String,
    pub runtime: String,
    pub endpoints: Vec<String>,
    pub peer_addr: String,
    pub wg_public_key: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&MachineRecord> for MachineView {
    fn from(m: &MachineRecord) -> Self {
        MachineView {
            id: m.id.clone(),
            hostname: m.hostname.clone(),
            lifecycle: m.lifecycle,
            authority: m.authority,
            region: m.region.clone(),
            region_role: m.region_role,
            overlay_ip: m.overlay_ip.clone(),
            subnet: m.subnet.clone(),
            version: m.version.clone(),
            runtime: m.runtime.clone(),
            endpoints: m.endpoints.clone(),
            peer_addr: m.peer_addr.clone(),
            wg_public_key: m.wg_public_key.clone(),
            created_at: rfc3339(m.created_at_ms),
            updated_at: rfc3339(m.updated_at_ms),
        }
    }
}

/// Outcome of `activate`/`drain`/`standby`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LifecycleResult {
    pub machine: MachineView,
    pub previous: Lifecycle,
    /// False when the machine already was in the requested state.
    pub changed: bool,
    /// Live workloads left running on the machine (for `standby --force`
    /// and `drain`: they keep running until migrated or removed).
    pub workloads: Vec<String>,
}

/// `invite create --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InviteCreated {
    pub invite_id: String,
    pub token: String,
    pub expires_at: String,
}

/// `invite list --json`: `{"invites":[...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InviteList {
    pub invites: Vec<InviteView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InviteView {
    pub invite_id: String,
    pub status: InviteStatus,
    pub issuer: String,
    pub created_at: String,
    pub expires_at: String,
    pub consumed_by: Option<String>,
    pub revoked_at: Option<String>,
}

impl InviteView {
    pub fn of(r: &InviteRecord, now_ms: u64) -> Self {
        InviteView {
            invite_id: r.invite_id.clone(),
            status: r.status(now_ms),
            issuer: r.issuer.clone(),
            created_at: rfc3339(r.created_at_ms),
            expires_at: rfc3339(r.expires_at_ms),
            consumed_by: r.consumed_by.clone(),
            revoked_at: r.revoked_at_ms.map(rfc3339),
        }
    }
}

/// Why a request failed. `ployzctl` maps `code` to its exit status.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong (bad name, bad range, bad flag value).
    InvalidArgument,
    /// A machine, invite or other named thing does not exist.
    NotFound,
    /// The request is valid but the cluster's state forbids it now.
    Refused,
    /// This machine is not in a network yet (run `mesh init` or join).
    NoNetwork,
    /// This machine already belongs to a network.
    AlreadyInNetwork,
    /// The store cannot serve the request now (no leader, no quorum).
    Unavailable,
    /// The caller may not use this socket.
    PermissionDenied,
    /// A bug or an unexpected failure; the daemon log has details.
    Internal,
    /// A long operation did not end within the wait; it goes on (or the
    /// cluster finishes or rolls it back): `ployzctl op wait` follows it.
    Timeout,
}

impl ErrorCode {
    /// `ployzctl`'s exit status for this error (see the README).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::Internal => 1,
            ErrorCode::NotFound => 4,
            ErrorCode::Refused | ErrorCode::AlreadyInNetwork => 5,
            ErrorCode::InvalidArgument => 6,
            ErrorCode::NoNetwork | ErrorCode::Unavailable => 7,
            ErrorCode::PermissionDenied => 8,
            ErrorCode::Timeout => 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    /// What failed and why.
    pub message: String,
    /// What to do next, when there is something to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\nhint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_travel_plain_but_never_debug_print() {
        let r = Request::RegistrySet {
            host: "reg.example".into(),
            insecure: false,
            username: Some("u".into()),
            password: Some(Secret("hunter2".into())),
        };
        assert!(!format!("{r:?}").contains("hunter2"));
        let wire = serde_json::to_string(&r).unwrap();
        assert!(wire.contains("\"password\":\"hunter2\""), "{wire}");
        assert_eq!(serde_json::from_str::<Request>(&wire).unwrap(), r);
    }

    #[test]
    fn request_wire_shape() {
        let r = Request::Lifecycle {
            machine: "abc".into(),
            action: LifecycleAction::Standby,
            force: true,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"op":"lifecycle","machine":"abc","action":"standby","force":true}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let s = serde_json::to_string(&Request::MachineList).unwrap();
        assert_eq!(s, r#"{"op":"machine_list"}"#);
    }

    /// The keys the README's "JSON output" line for `command` lists.
    fn readme_keys(command: &str) -> std::collections::BTreeSet<String> {
        let readme = include_str!("../../README.md");
        let line = readme
            .lines()
            .find(|l| l.starts_with(&format!("- `{command} --json`")))
            .unwrap_or_else(|| panic!("the README documents `{command} --json`"));
        let sketch = line
            .split('`')
            .nth(3)
            .expect("a `{…}` sketch after the command");
        sketch
            .split('"')
            .skip(1)
            .step_by(2)
            // Keys, not example values like "vol:/path".
            .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .map(String::from)
            .collect()
    }

    /// Every object key in `v`, at any depth.
    fn json_keys(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    out.insert(k.clone());
                    json_keys(v, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| json_keys(v, out)),
            _ => {}
        }
    }

    #[test]
    fn json_output_matches_the_readme() {
        let instance = InstanceView {
            machine: "m".into(),
            slot: 0,
            state: InstanceState::Pending,
            overlay_ip: None,
            error: None,
            exit_code: None,
            exited_at: None,
            restarts: 0,
            unreachable: false,
            generation: None,
            health: InstanceHealth::Starting,
            health_output: None,
        };
        let services = serde_json::json!({"services": [ServiceView {
            name: "web".into(),
            project: None,
            image: "busybox".into(),
            digest: None,
            manifest_digest: None,
            replicas: 1,
            generation: 1,
            volumes: vec![],
            health_check: Some(HealthCheck {
                probe: HealthProbe::Http {
                    path: "/".into(),
                    port: 80,
                },
                interval_ms: 10_000,
                timeout_ms: 5_000,
                retries: 3,
                start_period_ms: 0,
            }),
            ports: vec!["8080:80/tcp".into()],
            instances: vec![instance],
        }]});
        let mut keys = Default::default();
        json_keys(&services, &mut keys);
        assert_eq!(keys, readme_keys("service ls"));

        let machine = MachineView {
            id: "m".into(),
            hostname: "h".into(),
            lifecycle: Lifecycle::Active,
            authority: Authority::Storage,
            region: "r".into(),
            region_role: RegionRole::Primary,
            overlay_ip: "10.101.1.1".into(),
            subnet: "10.101.1.0/24".into(),
            version: "0.1.0".into(),
            runtime: "host".into(),
            endpoints: vec![],
            peer_addr: "10.101.1.1:7101".into(),
            wg_public_key: "k".into(),
            created_at: "t".into(),
            updated_at: "t".into(),
        };
        let mut keys = Default::default();
        json_keys(
            &serde_json::to_value(MachineList {
                machines: vec![machine],
            })
            .unwrap(),
            &mut keys,
        );
        assert_eq!(keys, readme_keys("machine ls"));
    }

    // --- gateway (issue 14) ---
    #[test]
    fn gateway_json_matches_the_readme() {
        let routes = RouteList {
            routes: vec![RouteView {
                host: "a.test".into(),
                path: "/".into(),
                service: "web".into(),
                port: 8080,
                tls: RouteTls::Acme,
                backends: 2,
                certificate_expires: None,
            }],
        };
        let mut keys = Default::default();
        json_keys(&serde_json::to_value(routes).unwrap(), &mut keys);
        assert_eq!(keys, readme_keys("route ls"));
        let acme = AcmeView {
            directory: None,
            email: None,
            custom_ca: false,
            challenge: AcmeChallenge::TlsAlpn01,
            certificates: vec![CertView {
                host: "a.test".into(),
                not_after: "t".into(),
            }],
        };
        let v = serde_json::to_value(&acme).unwrap();
        assert_eq!(v["challenge"], "tls-alpn-01");
        let mut keys = Default::default();
        json_keys(&v, &mut keys);
        assert_eq!(keys, readme_keys("acme show"));
    }

    #[test]
    fn reply_wire_shape() {
        let e = Reply::Error(ApiError::new(ErrorCode::NotFound, "no machine x"));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"error":{"code":"not_found","message":"no machine x"}}"#
        );
        let ok = Reply::Ok(Response::Machines(MachineList { machines: vec![] }));
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"ok":{"machines":{"machines":[]}}}"#
        );
    }
}
