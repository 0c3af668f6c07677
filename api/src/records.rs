//! Records kept in the replicated store, one JSON document per key.
//!
//! | bucket      | key            | value             |
//! |-------------|----------------|-------------------|
//! | `network`   | `config`       | [`NetworkRecord`] |
//! | `machines`  | machine id     | [`MachineRecord`] |
//! | `subnets`   | `10-101-3-0`   | [`SubnetClaim`]   |
//! | `invites`   | invite id      | [`InviteRecord`]  |
//! | `services`  | service name   | [`ServiceRecord`] |
//! | `instances` | `svc.machine.n`| [`InstanceRecord`]|
//! | `operations`| operation id   | [`OperationRecord`]|
//!
//! Keys are valid JetStream KV keys so a standard NATS client can read them.

use serde::{Deserialize, Serialize};
use std::fmt;

pub const BUCKET_NETWORK: &str = "network";
pub const BUCKET_MACHINES: &str = "machines";
pub const BUCKET_SUBNETS: &str = "subnets";
pub const BUCKET_INVITES: &str = "invites";
pub const BUCKET_INSTANCES: &str = "instances";
pub const BUCKET_SERVICES: &str = "services";
pub const BUCKET_OPERATIONS: &str = "operations";
/// Registry settings and credentials; never served over NATS.
pub const BUCKET_REGISTRIES: &str = "registries";
pub const NETWORK_KEY: &str = "config";

// --- NATS users and the protected buckets (issue 17) ---
/// App users of the NATS control plane ([`NatsUserRecord`]); never served
/// over NATS.
pub const BUCKET_NATS_USERS: &str = "nats_users";
/// The network's NATS CA ([`NatsCaRecord`], key [`NATS_CA_KEY`]); never
/// served over NATS.
pub const BUCKET_PKI: &str = "pki";
pub const NATS_CA_KEY: &str = "nats-ca";
/// The key every NATS password derives from ([`NatsCredentialsRecord`]), in
/// the `pki` bucket; rotated by `machine rm`.
pub const NATS_CREDENTIALS_KEY: &str = "nats-credentials";
/// The cluster's own buckets: only ployzd writes them (through its API,
/// which checks the rules). NATS users other than ployzd's own may read and
/// watch them, never write them (`$KV.<b>.>`, stream create/update/purge/
/// delete, message delete). **A bucket a later feature adds for the cluster
/// goes here.**
pub const CLUSTER_BUCKETS: &[&str] = &[
    BUCKET_NETWORK,
    BUCKET_MACHINES,
    BUCKET_SUBNETS,
    BUCKET_INVITES,
    BUCKET_INSTANCES,
    BUCKET_SERVICES,
    BUCKET_OPERATIONS,
    BUCKET_REGISTRIES,
    BUCKET_NATS_USERS,
    BUCKET_PKI,
    // The gateway (issue 14): written only through ployzd's API.
    crate::gateway::BUCKET_ROUTES,
    crate::gateway::BUCKET_ACME,
    crate::gateway::BUCKET_ACME_CHALLENGES,
    crate::gateway::BUCKET_CERTIFICATES,
    // Published ports' claims (issue 14).
    crate::ports::BUCKET_PORT_CLAIMS,
];
/// Buckets that NATS never serves to anyone (secrets): reads, writes,
/// watches and the bucket list leave them out.
pub const HIDDEN_BUCKETS: &[&str] = &[
    BUCKET_REGISTRIES,
    BUCKET_NATS_USERS,
    BUCKET_PKI,
    // The gateway's certificates and their keys (issue 14).
    crate::gateway::BUCKET_CERTIFICATES,
];

/// The network's CA for NATS TLS listeners: each machine signs its own
/// server certificate with it. Its `Debug` never shows the key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatsCaRecord {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for NatsCaRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsCaRecord")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The NATS credential key: every NATS password (ployzd's own, the
/// operator's, app users') is derived from it together with the network
/// secret. `machine rm` replaces it with a fresh one of the next
/// generation, so a removed machine's passwords stop working. Its `Debug`
/// never shows the key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatsCredentialsRecord {
    pub generation: u64,
    /// 32 random bytes, base64url.
    pub key: String,
}

impl fmt::Debug for NatsCredentialsRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsCredentialsRecord")
            .field("generation", &self.generation)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// An app user of the NATS control plane (`nats user add`). Its password is
/// not stored: every machine derives it from the network secret, the name
/// and `salt` (so the store alone, or a copy of it, does not reveal it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NatsUserRecord {
    pub name: String,
    /// Random, base64url; a new one on every `add`.
    pub salt: String,
    #[serde(default)]
    pub allow_pub: Vec<String>,
    #[serde(default)]
    pub allow_sub: Vec<String>,
    #[serde(default)]
    pub kv_buckets: Vec<String>,
    #[serde(default)]
    pub created_at_ms: u64,
}
// --- end NATS users ---

/// Default cluster overlay range; each machine gets a /24 out of it.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.101.0.0/16";
/// Default WireGuard listen port.
pub const DEFAULT_WG_PORT: u16 = 51820;
/// Default invite lifetime.
pub const DEFAULT_INVITE_TTL_SECS: u64 = 600;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkRecord {
    pub network_id: String,
    pub name: String,
    /// Overlay range, e.g. `10.101.0.0/16`.
    pub cidr: String,
    /// Machine that created the network.
    pub founder: String,
    /// Size of the storage (Raft voter) set the operator asked for.
    pub storage_replicas: u8,
    pub created_at_ms: u64,
    /// Whether machines talk over the WireGuard mesh (set by the founder;
    /// every machine that joins follows it).
    #[serde(default = "mesh_default")]
    pub mesh: bool,
}

fn mesh_default() -> bool {
    true
}

/// Where a machine is in its lifecycle. Only `active` machines take new
/// placements.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Enrolled in the store, not yet confirmed up (transitional).
    Joining,
    Active,
    Draining,
    Standby,
    /// Being removed (transitional).
    Leaving,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Joining => "joining",
            Lifecycle::Active => "active",
            Lifecycle::Draining => "draining",
            Lifecycle::Standby => "standby",
            Lifecycle::Leaving => "leaving",
        }
    }

    /// Whether the scheduler may place new workloads here.
    pub fn accepts_placements(self) -> bool {
        self == Lifecycle::Active
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the machine holds the store (a Raft voter) or reaches it through
/// a storage machine.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Authority {
    Storage,
    Compute,
}

impl Authority {
    pub fn as_str(self) -> &'static str {
        match self {
            Authority::Storage => "storage",
            Authority::Compute => "compute",
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A machine's role inside its region: the first machine of a region is its
/// `primary`, later ones are `member`s.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RegionRole {
    Primary,
    Member,
}

impl RegionRole {
    pub fn as_str(self) -> &'static str {
        match self {
            RegionRole::Primary => "primary",
            RegionRole::Member => "member",
        }
    }
}

impl fmt::Display for RegionRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineRecord {
    pub id: String,
    pub hostname: String,
    pub lifecycle: Lifecycle,
    pub authority: Authority,
    pub region: String,
    pub region_role: RegionRole,
    pub overlay_ip: String,
    /// The machine's workload slice, e.g. `10.101.1.0/24`.
    pub subnet: String,
    pub version: String,
    pub runtime: String,
    /// Ed25519 identity key (base64url), used to verify what this machine signs.
    pub identity_key: String,
    /// WireGuard public key (standard base64, as `wg` prints it).
    pub wg_public_key: String,
    /// Underlay endpoint candidates `ip:port`, best first.
    pub endpoints: Vec<String>,
    /// Where this machine's ployzd answers peers (Raft, forwarded requests), `ip:port`.
    #[serde(default)]
    pub peer_addr: String,
    /// `user@host[:port]` it was provisioned through (for `machine update`).
    #[serde(default)]
    pub ssh_target: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Claim on one /24 of the cluster range; the key is the subnet with `.` and
/// `/` replaced so it is a single KV token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubnetClaim {
    pub subnet: String,
    pub machine_id: String,
}

/// What the store knows of an invite. The token itself is never stored: only
/// its id and a hash of its nonce, so a leaked store cannot mint joins.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InviteRecord {
    pub invite_id: String,
    pub issuer: String,
    pub nonce_sha256: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    #[serde(default)]
    pub revoked_at_ms: Option<u64>,
    #[serde(default)]
    pub consumed_by: Option<String>,
    #[serde(default)]
    pub consumed_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InviteStatus {
    Active,
    Consumed,
    Revoked,
    Expired,
}

impl InviteStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InviteStatus::Active => "active",
            InviteStatus::Consumed => "consumed",
            InviteStatus::Revoked => "revoked",
            InviteStatus::Expired => "expired",
        }
    }
}

impl fmt::Display for InviteStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl InviteRecord {
    /// Status at `now_ms`. Consumed and revoked are final and win over expiry.
    pub fn status(&self, now_ms: u64) -> InviteStatus {
        if self.consumed_by.is_some() {
            InviteStatus::Consumed
        } else if self.revoked_at_ms.is_some() {
            InviteStatus::Revoked
        } else if now_ms >= self.expires_at_ms {
            InviteStatus::Expired
        } else {
            InviteStatus::Active
        }
    }
}

/// State of one workload instance, reported by the machine that runs it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pending,
    Running,
    Stopped,
    Failed,
}

/// One placed instance of a service, written by the machine that runs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceRecord {
    pub service: String,
    pub machine: String,
    pub state: InstanceState,
    #[serde(default)]
    pub overlay_ip: Option<String>,
    /// Placement slot within the service (see [`Placement::slot`]).
    #[serde(default)]
    pub slot: u32,
    /// The service generation this instance runs.
    #[serde(default)]
    pub generation: u64,
    /// Why the instance is not running, when it failed.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub updated_at_ms: u64,
    /// How the instance's process last ended in this generation (code, or
    /// 128+signal); `None` if it has not exited (or the runtime could not tell).
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// When its machine first saw it exited, last time; `None` while it has
    /// never exited in this generation.
    #[serde(default)]
    pub exited_at_ms: Option<u64>,
    /// How many times its machine started it again after it exited, in this
    /// generation (a redeploy starts from 0).
    #[serde(default)]
    pub restarts: u32,
    /// The last lines it wrote before it last exited (a few, cut short).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_output: Vec<String>,
    /// What its health check says of its current run (`none`: the service
    /// has no health check). Written, like the rest, only by its machine,
    /// from the probes that machine runs; only `healthy` instances serve.
    #[serde(default)]
    pub health: InstanceHealth,
    /// What the last failed health probe of this generation said (cut short).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_output: Option<String>,
    /// Its last run was ended by its machine because it was unhealthy (not
    /// by an exit of its own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub killed_unhealthy: bool,
}

/// What an instance's health check says (see [`HealthCheck`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum InstanceHealth {
    /// The service has no health check (or the instance does not run).
    #[default]
    None,
    /// Started, no probe has passed yet.
    Starting,
    /// The last probe passed.
    Healthy,
    /// `retries` probes in a row failed after the start period: its machine
    /// restarts it.
    Unhealthy,
}

impl InstanceHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceHealth::None => "none",
            InstanceHealth::Starting => "starting",
            InstanceHealth::Healthy => "healthy",
            InstanceHealth::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for InstanceHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a service's instances are probed, by the machine running each.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    /// Time between two probes (while in its start period and not yet
    /// healthy, an instance is probed at least every second).
    pub interval_ms: u64,
    /// A probe that takes longer fails.
    pub timeout_ms: u64,
    /// Failed probes in a row (after the start period) that make an
    /// instance unhealthy.
    pub retries: u32,
    /// After a start, failed probes do not count for this long (a passing
    /// one makes the instance healthy at once).
    pub start_period_ms: u64,
}

/// What a health probe does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HealthProbe {
    /// `/bin/sh -c COMMAND` inside the instance; exit 0 passes.
    Cmd { command: String },
    /// `GET PATH` on the instance's address and port; 2xx and 3xx pass.
    Http { path: String, port: u16 },
    /// A TCP connection to the instance's address and port.
    Tcp { port: u16 },
}

impl fmt::Display for HealthProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthProbe::Cmd { command } => write!(f, "cmd `{command}`"),
            HealthProbe::Http { path, port } => write!(f, "http GET {path} on port {port}"),
            HealthProbe::Tcp { port } => write!(f, "tcp port {port}"),
        }
    }
}

impl InstanceRecord {
    /// Whether the instance occupies its machine (blocks a plain standby).
    pub fn is_live(&self) -> bool {
        matches!(self.state, InstanceState::Pending | InstanceState::Running)
    }

    /// The store key: `<service>.<machine>.<slot>`.
    pub fn key(service: &str, machine: &str, slot: u32) -> String {
        format!("{service}.{machine}.{slot}")
    }
}

/// Where a service's image comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceImage {
    /// What the user asked for (a path or a name), for display.
    pub reference: String,
    /// sha256 of the image archive when ployz ships it between machines;
    /// `None` for a name every machine must already have.
    #[serde(default)]
    pub digest: Option<String>,
    /// sha256 of the image config (docker's image id).
    #[serde(default)]
    pub image_id: Option<String>,
    #[serde(default)]
    pub size: u64,
    /// Machines holding the archive, to fetch it from.
    #[serde(default)]
    pub sources: Vec<String>,
    /// For an image pulled from a registry: the digest of its image manifest
    /// (linux/amd64), pinned at deploy time; `reference` then carries it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
}

/// How to reach one registry (`registry add` / `registry login`). The
/// password never leaves the daemon: not in replies, logs or NATS.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryRecord {
    /// `host[:port]` as in image references.
    pub host: String,
    /// Plain HTTP allowed.
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

impl std::fmt::Debug for RegistryRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryRecord")
            .field("host", &self.host)
            .field("insecure", &self.insecure)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RegistryRecord {
    /// The store key: the host with `:` (not allowed in KV keys) as `_`.
    pub fn key(host: &str) -> String {
        host.replace(':', "_")
    }
}

/// A named volume mounted into a service's workloads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    /// Absolute path inside the workload.
    pub target: String,
}

/// One replica of a service assigned to a machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Placement {
    pub machine: String,
    /// Unique within the service, never reused while the placement exists.
    pub slot: u32,
    /// Stopped on purpose (a migration copies its volumes); not restarted.
    #[serde(default)]
    pub paused: bool,
    /// Pinned by a rolling update that has not reached this placement yet:
    /// its instance of this (older) generation keeps running. `None`: the
    /// service's generation. An instance that must be started anew always
    /// gets the service's current spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

impl Placement {
    /// The generation this placement's instance must run at least.
    pub fn target_generation(&self, service_generation: u64) -> u64 {
        self.generation.unwrap_or(service_generation)
    }
}

/// A service: desired state, written by `deploy`, read by every machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRecord {
    pub name: String,
    pub image: ServiceImage,
    pub replicas: u32,
    /// Command to run; empty means the image's own entrypoint and cmd.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    /// Hard memory limit per instance, bytes.
    #[serde(default)]
    pub memory_limit: Option<u64>,
    /// Relative CPU weight per instance (cgroup cpu.shares, 2–262144).
    #[serde(default)]
    pub cpu_shares: Option<u64>,
    pub placements: Vec<Placement>,
    /// Bumped by every deploy: machines recreate instances of older ones.
    pub generation: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The deploy operation that wrote this generation (so the cluster can
    /// tell, after its machine died, whether it got that far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_by: Option<String>,
    /// Compose project (`deploy -f`), grouping its services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// How its instances are probed; `None`: they are not (health `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Host ports every serving machine forwards to its instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::ports::PublishedPort>,
    /// The NATS app user whose `NATS_URL` its instances get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_user: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_records_from_before_exit_tracking_decode() {
        let old = r#"{"service":"web","machine":"m1","state":"running","slot":1,"generation":2}"#;
        let i: InstanceRecord = serde_json::from_str(old).unwrap();
        assert_eq!((i.exit_code, i.exited_at_ms, i.restarts), (None, None, 0));
        assert!(i.last_output.is_empty());
        assert_eq!(i.health, InstanceHealth::None);
        assert_eq!((i.health_output, i.killed_unhealthy), (None, false));
    }

    #[test]
    fn health_checks_round_trip_and_old_services_decode() {
        let h = HealthCheck {
            probe: HealthProbe::Http {
                path: "/up".into(),
                port: 8080,
            },
            interval_ms: 1000,
            timeout_ms: 500,
            retries: 3,
            start_period_ms: 0,
        };
        let s = serde_json::to_string(&h).unwrap();
        assert!(
            s.contains(r#""probe":{"kind":"http","path":"/up","port":8080}"#),
            "{s}"
        );
        assert_eq!(serde_json::from_str::<HealthCheck>(&s).unwrap(), h);
        let old = r#"{"name":"web","image":{"reference":"b"},"replicas":1,"placements":[],"generation":1,"created_at_ms":0,"updated_at_ms":0}"#;
        let svc: ServiceRecord = serde_json::from_str(old).unwrap();
        assert_eq!(svc.health, None);
        assert_eq!(
            serde_json::to_string(&InstanceHealth::Unhealthy).unwrap(),
            "\"unhealthy\""
        );
    }

    fn invite() -> InviteRecord {
        InviteRecord {
            invite_id: "i1".into(),
            issuer: "m1".into(),
            nonce_sha256: String::new(),
            created_at_ms: 0,
            expires_at_ms: 1000,
            revoked_at_ms: None,
            consumed_by: None,
            consumed_at_ms: None,
        }
    }

    #[test]
    fn invite_status_precedence() {
        let mut i = invite();
        assert_eq!(i.status(999), InviteStatus::Active);
        assert_eq!(i.status(1000), InviteStatus::Expired);
        i.revoked_at_ms = Some(5);
        assert_eq!(i.status(10), InviteStatus::Revoked);
        assert_eq!(i.status(5000), InviteStatus::Revoked);
        i.consumed_by = Some("m2".into());
        assert_eq!(i.status(5000), InviteStatus::Consumed);
    }

    #[test]
    fn enums_are_snake_case() {
        assert_eq!(
            serde_json::to_string(&Lifecycle::Draining).unwrap(),
            "\"draining\""
        );
        assert_eq!(
            serde_json::to_string(&Authority::Storage).unwrap(),
            "\"storage\""
        );
        assert_eq!(
            serde_json::to_string(&InviteStatus::Expired).unwrap(),
            "\"expired\""
        );
    }
}

/// What a long operation (`machine rm`, `service migrate`, `deploy`) is
/// doing, so that it can be followed (`ployzctl op ls / op wait`) and, when
/// the machine running it disappears, finished or rolled back by the
/// cluster. Written by the machine running it (its owner) at every step
/// and at least every few seconds; by the storage leader only when the
/// owner stopped writing it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperationRecord {
    /// `op-<hex>`.
    pub id: String,
    pub kind: OpKind,
    /// What it acts on: a machine id or a service name.
    pub subject: String,
    /// The machine running it.
    pub owner: String,
    pub state: OpState,
    /// The step it is at (or ended at).
    pub step: String,
    /// What happened last, in words.
    #[serde(default)]
    pub message: String,
    /// What the cluster needs to finish or roll it back.
    #[serde(default)]
    pub detail: OpDetail,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    /// The `ployzctl` exit code the operation ended with (0: success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    MachineRm,
    Migrate,
    Deploy,
    MachineAdd,
    MachineUpdate,
    StoragePromote,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::MachineRm => "machine-rm",
            OpKind::Migrate => "migrate",
            OpKind::Deploy => "deploy",
            OpKind::MachineAdd => "machine-add",
            OpKind::MachineUpdate => "machine-update",
            OpKind::StoragePromote => "storage-promote",
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    /// Its owner is working on it.
    Running,
    /// It did what was asked.
    Succeeded,
    /// It stopped without finishing; what it changed was undone.
    RolledBack,
    /// It stopped without finishing; `message` says what is left.
    Failed,
}

impl OpState {
    pub fn is_done(self) -> bool {
        self != OpState::Running
    }
}

impl fmt::Display for OpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpState::Running => "running",
            OpState::Succeeded => "succeeded",
            OpState::RolledBack => "rolled-back",
            OpState::Failed => "failed",
        })
    }
}

/// Per-kind facts a takeover needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpDetail {
    /// `machine rm`: the subnet claim key to delete with the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_key: Option<String>,
    /// `migrate`: the instance that moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Placement>,
    /// `migrate`: where it moves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `migrate`: the slot it gets there (recorded before it is placed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_slot: Option<u32>,
    /// `machine add`: the invite issued for each SSH target (recorded
    /// before the target gets it), so a takeover revokes the unused ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invites: Vec<OpInvite>,
    /// `machine update`, `storage promote`: the machines it works on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
    /// `machine update`: the version asked for (none: the latest release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// An invite a `machine add` issued for one SSH target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpInvite {
    /// The target as given (`user@host[:port]`).
    pub target: String,
    pub invite_id: String,
}
