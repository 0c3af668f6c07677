//! Services: desired state in the store, instances run by each machine.
//!
//! - `deploy` (any machine) imports the image into its own image store,
//!   places the replicas on active machines ([`crate::placement`]) and writes
//!   the [`ServiceRecord`] with compare-and-set; then it waits for the
//!   machines to report their instances.
//! - Every machine runs a reconciler ([`reconcile_loop`]): it reads the
//!   services, runs what is placed on it (fetching the image archive over the
//!   peer channel from a machine that has it, checksummed), removes what is
//!   no longer placed on it, restarts what exited, and reports each instance
//!   in the `instances` bucket. Only the machine running an instance writes
//!   its record.
//! - `migrate` moves one instance with its volumes: pause it on the source,
//!   copy the volumes (tar, sha256-checked), place it on the target, and drop
//!   the source placement only once the target runs it. On failure the
//!   target placement is withdrawn and the source resumes.

use crate::daemon::{internal, invalid, refused, Daemon, CAS_RETRIES};
use crate::peer::{self, BlobRequest, BlobSource, PeerRequest, PeerResponse};
use crate::placement::{self, Candidate};
use crate::provisioning::ProgressSink;
use crate::store::{self, put};
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::{Expect, Rejection};
use ployz_runtime::image::{ImageInfo, ImageStore};
use ployz_runtime::{
    AnyRuntime, BridgeNetwork, Image, NetworkAttachment, Runtime, RuntimeKind, State, VolumeMount,
    WorkloadSpec,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long `deploy` waits for instances by default.
const DEFAULT_DEPLOY_WAIT: Duration = Duration::from_secs(120);
/// How often the reconciler runs without being woken.
const RECONCILE_EVERY: Duration = Duration::from_secs(3);
/// Grace period between SIGTERM and SIGKILL when stopping an instance.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often stored images nothing refers to are removed.
const IMAGE_GC_EVERY: Duration = Duration::from_secs(60);
/// A stored image younger than this is kept even if nothing refers to it:
/// a deploy imports its image before it writes the service record, a
/// machine fetches one before its instance starts. `PLOYZ_IMAGE_GC_GRACE_SECS`
/// overrides it (tests).
const IMAGE_GC_GRACE: Duration = Duration::from_secs(600);
/// How long a replaced instance must run unchanged before a rolling update
/// moves on to the next: two reconciler passes, so one that exits at once
/// has been seen exiting (its machine reports it within a pass).
const ROLLOUT_STEADY: Duration = Duration::from_secs(2 * RECONCILE_EVERY.as_secs());
/// Shortest pause before an exited instance is started again.
const RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// Longest service name (keeps workload ids within 64 characters).
const MAX_SERVICE_NAME: usize = 40;
const MAX_REPLICAS: u32 = 100;
const DEFAULT_LOG_TAIL: usize = 200;
const MAX_LOG_TAIL: usize = 10_000;
/// Logs cross machines in one control-plane message (NATS max payload 1 MiB).
const MAX_LOG_BYTES: usize = 512 * 1024;

/// The last `n` lines of `s`, at most `max_bytes` of them (cut at a line
/// start, or at a character boundary for one huge line).
pub fn last_lines(s: &str, n: usize, max_bytes: usize) -> String {
    let mut start = s.len();
    let mut lines = 0;
    let body = s.strip_suffix('\n').unwrap_or(s);
    for (i, _) in body.match_indices('\n').rev() {
        lines += 1;
        if lines == n {
            start = i + 1;
            break;
        }
    }
    if lines < n {
        start = 0;
    }
    let mut out = &s[start..];
    if out.len() > max_bytes {
        let mut cut = out.len() - max_bytes;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = &out[cut..];
        if let Some(nl) = out.find('\n') {
            if nl + 1 < out.len() {
                out = &out[nl + 1..];
            }
        }
    }
    out.to_string()
}

// ---------------------------------------------------------------------------
// Validation (pure)

pub fn validate_service_name(name: &str) -> Result<(), ApiError> {
    crate::daemon::validate_label("service name", name, MAX_SERVICE_NAME)
}

fn no_such_service(name: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no service named `{name}`"))
        .with_hint("`ployzctl service ls` lists the services")
}

pub fn validate_volume_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid volume name `{name}`: use 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit"
        )))
    }
}

/// `KEY=VALUE` pairs.
pub fn parse_env(env: &[String]) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in env {
        let Some((k, v)) = e.split_once('=') else {
            return Err(invalid(format!(
                "-e `{e}` is not KEY=VALUE (for example -e PORT=8080)"
            )));
        };
        let ok = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(invalid(format!(
                "-e `{e}`: `{k}` is not a variable name (letters, digits and '_', not starting with a digit)"
            )));
        }
        out.retain(|(old, _)| old != k);
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// A memory size: bytes, or with a K, M or G suffix (powers of 1024).
pub fn parse_memory(s: &str) -> Result<u64, ApiError> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            invalid(format!(
                "--memory `{s}` is not a size: use bytes or a number with K, M or G (e.g. 64M)"
            ))
        })?;
    if bytes < 4 << 20 {
        return Err(invalid(format!(
            "--memory `{s}` is below 4M: a workload needs at least that much"
        )));
    }
    Ok(bytes)
}

/// `volume:/path` pairs.
pub fn parse_volumes(vols: &[String]) -> Result<Vec<VolumeSpec>, ApiError> {
    let mut out: Vec<VolumeSpec> = Vec::new();
    for v in vols {
        let Some((name, target)) = v.split_once(':') else {
            return Err(invalid(format!(
                "-v `{v}` is not VOLUME:/PATH (for example -v data:/var/lib/data)"
            )));
        };
        validate_volume_name(name)?;
        if !target.starts_with('/') || target.split('/').any(|c| c == "..") {
            return Err(invalid(format!(
                "-v `{v}`: the mount point `{target}` must be an absolute path without '..'"
            )));
        }
        if out.iter().any(|o| o.target == target) {
            return Err(invalid(format!(
                "-v `{v}`: two volumes are mounted at {target}"
            )));
        }
        out.push(VolumeSpec {
            name: name.to_string(),
            target: target.to_string(),
        });
    }
    Ok(out)
}

/// The runtime's id for instance `slot` of `service` on machine `machine`.
/// The machine prefix keeps ids apart when machines share one dockerd.
pub fn workload_id(machine: &str, service: &str, slot: u32) -> String {
    format!("{}{service}-{slot}", workload_prefix(machine))
}

fn workload_prefix(machine: &str) -> String {
    format!("plz-{}-", &machine[..machine.len().min(8)])
}

/// The bridge workloads of a subnet attach to (≤ 15 characters).
pub fn bridge_name(subnet: Ipv4Addr) -> String {
    format!("plz{:08x}", u32::from(subnet))
}

/// First free workload address of a /24 (x.y.z.2 – x.y.z.253; .1 is the
/// machine's own overlay address and the workloads' gateway).
pub fn allocate_ip(subnet: Ipv4Addr, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let base = u32::from(subnet) & 0xffff_ff00;
    (2..=253)
        .map(|h| Ipv4Addr::from(base | h))
        .find(|ip| !used.contains(ip))
}

fn parse_subnet(subnet: &str) -> Result<(Ipv4Addr, u8), ApiError> {
    let (a, p) = subnet
        .split_once('/')
        .ok_or_else(|| internal(format!("machine subnet `{subnet}` is malformed")))?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| internal(format!("machine subnet `{subnet}` is malformed")))?;
    let prefix: u8 = p
        .parse()
        .map_err(|_| internal(format!("machine subnet `{subnet}` is malformed")))?;
    Ok((addr, prefix))
}

// ---------------------------------------------------------------------------
// Local state

/// What this machine remembers about the instances it runs (0600 JSON in the
/// data dir): which generation each runs, its address, restart bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LocalState {
    workloads: BTreeMap<String, LocalWorkload>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LocalWorkload {
    service: String,
    slot: u32,
    generation: u64,
    ip: Option<Ipv4Addr>,
    #[serde(default)]
    started_at_ms: u64,
    /// Digest of the stored image it runs (`None`: a name the runtime has,
    /// or a record from before this field; image GC then keeps everything).
    #[serde(default)]
    image: Option<String>,
    /// Whether `image` was recorded (records from before the field lack it).
    #[serde(default)]
    image_known: bool,
}

const STATE_FILE: &str = "workloads.json";

fn load_state(dir: &Path) -> LocalState {
    match std::fs::read(dir.join(STATE_FILE)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!("{STATE_FILE} is unreadable ({e}); rebuilding it from the runtime");
            LocalState::default()
        }),
        Err(_) => LocalState::default(),
    }
}

fn save_state(dir: &Path, st: &LocalState) -> Result<(), ApiError> {
    let body = serde_json::to_vec_pretty(st).expect("state serialises");
    crate::identity::write_private_atomic(&dir.join(STATE_FILE), &body)
        .map_err(|e| internal(format!("cannot save {STATE_FILE}: {e}")))
}

/// Where named volume `name` lives on this machine.
fn volume_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("volumes").join(name)
}

// ---------------------------------------------------------------------------
// The machine's workload engine

/// The runtime, image store and volumes of this machine.
pub struct Workloads {
    pub runtime: AnyRuntime,
    pub images: Arc<ImageStore>,
    data_dir: PathBuf,
    state: tokio::sync::Mutex<LocalState>,
    /// Bridges already set up by this process.
    bridges: std::sync::Mutex<HashSet<String>>,
}

impl Workloads {
    fn open(
        data_dir: &Path,
        kind: RuntimeKind,
        images: Arc<ImageStore>,
    ) -> Result<Workloads, ApiError> {
        let runtime = match kind {
            RuntimeKind::Host => AnyRuntime::Host(
                ployz_runtime::HostRuntime::new(data_dir.join("runtime"))
                    .map_err(|e| internal(format!("cannot start the host runtime: {e}")))?,
            ),
            RuntimeKind::Docker => AnyRuntime::Docker(
                ployz_runtime::DockerRuntime::connect()
                    .map_err(|e| internal(format!("cannot reach dockerd: {e}")))?,
            ),
        };
        Ok(Workloads {
            runtime,
            images,
            data_dir: data_dir.to_path_buf(),
            state: tokio::sync::Mutex::new(load_state(data_dir)),
            bridges: Default::default(),
        })
    }

    fn volume_dir(&self, name: &str) -> PathBuf {
        volume_dir(&self.data_dir, name)
    }
}

fn blocking_err(e: tokio::task::JoinError) -> ApiError {
    internal(format!("a background task failed: {e}"))
}

impl Daemon {
    /// This machine's workload engine, opened on first use.
    pub(crate) fn workloads(&self) -> Result<&Workloads, ApiError> {
        if let Some(w) = self.workloads.get() {
            return Ok(w);
        }
        let _guard = self
            .workloads_init
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(w) = self.workloads.get() {
            return Ok(w);
        }
        let w = Workloads::open(&self.cfg.data_dir, self.cfg.runtime, self.image_store()?)?;
        let _ = self.workloads.set(w);
        Ok(self.workloads.get().expect("just set"))
    }

    /// This machine's image store, opened on first use (importing an image
    /// does not need the runtime; the runtime shares this one).
    fn image_store(&self) -> Result<Arc<ImageStore>, ApiError> {
        let mut slot = self.images.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let s = Arc::new(
            ImageStore::open(self.cfg.data_dir.join("images"))
                .map_err(|e| internal(format!("cannot open the image store: {e}")))?,
        );
        *slot = Some(s.clone());
        Ok(s)
    }

    // -----------------------------------------------------------------------
    // deploy / ls / rm

    pub(crate) async fn service_deploy(
        &self,
        req: DeployRequest,
        sink: &ProgressSink,
    ) -> Result<ServiceView, ApiError> {
        validate_service_name(&req.name)?;
        if req.replicas > MAX_REPLICAS {
            return Err(invalid(format!(
                "--replicas {} is too many: use 0 to {MAX_REPLICAS}",
                req.replicas
            )));
        }
        let env = parse_env(&req.env)?;
        let volumes = parse_volumes(&req.volumes)?;
        let memory_limit = req.memory.as_deref().map(parse_memory).transpose()?;
        if let Some(shares) = req.cpu_shares {
            if !(2..=262_144).contains(&shares) {
                return Err(invalid(format!(
                    "--cpu-shares {shares} is out of range: use 2 to 262144 (1024 is the default weight)"
                )));
            }
        }
        if req.image.trim().is_empty() {
            return Err(invalid(
                "--image is empty: give an image archive (`docker save` tarball or OCI layout) or a name",
            ));
        }
        self.require_network().await?;
        let progress = |step: &str, msg: String| {
            let _ = sink.send(Progress {
                target: req.name.clone(),
                step: step.into(),
                message: msg,
            });
        };
        let image = if req.image.starts_with('/') {
            let path = PathBuf::from(&req.image);
            progress("image", format!("importing {}", path.display()));
            let store = self.image_store()?;
            let info = tokio::task::spawn_blocking(move || store.import_path(&path))
                .await
                .map_err(blocking_err)?
                .map_err(|e| invalid(e.to_string()))?;
            progress(
                "image",
                format!("stored {} ({} bytes)", info.digest, info.size),
            );
            shipped_image(&req.image, &info, self.machine_id())
        } else {
            let store = self.image_store()?;
            let name = req.image.clone();
            match tokio::task::spawn_blocking(move || store.resolve(&name))
                .await
                .map_err(blocking_err)?
                .map_err(|e| internal(e.to_string()))?
            {
                Some(info) => shipped_image(&req.image, &info, self.machine_id()),
                None => ServiceImage {
                    reference: req.image.clone(),
                    digest: None,
                    image_id: None,
                    size: 0,
                    sources: Vec::new(),
                },
            }
        };
        // A redeploy rolls: instances running now are pinned to what they
        // run and replaced one at a time below, so the service keeps serving.
        let running: HashMap<String, u64> = self
            .instances()
            .await?
            .into_iter()
            .filter(|(_, i)| i.service == req.name && i.state == InstanceState::Running)
            .map(|(key, i)| (key, i.generation))
            .collect();
        let record = self
            .write_service(&req.name, |cur, machines, load| {
                let mut placements = placement::place(
                    &req.name,
                    req.replicas,
                    cur.map(|c| c.placements.as_slice()).unwrap_or(&[]),
                    &candidates(machines, load),
                )
                .map_err(|e| refused(e.to_string()).with_hint(e.hint()))?;
                for p in &mut placements {
                    let key = InstanceRecord::key(&req.name, &p.machine, p.slot);
                    p.generation = match running.get(&key) {
                        Some(&g) if cur.is_some() && !p.paused => Some(g),
                        _ => None,
                    };
                }
                let now = now_ms();
                Ok(Some(ServiceRecord {
                    name: req.name.clone(),
                    image: image.clone(),
                    replicas: req.replicas,
                    command: req.command.clone(),
                    env: env.clone(),
                    volumes: volumes.clone(),
                    memory_limit,
                    cpu_shares: req.cpu_shares,
                    placements,
                    generation: cur.map_or(1, |c| c.generation + 1),
                    created_at_ms: cur.map_or(now, |c| c.created_at_ms),
                    updated_at_ms: now,
                }))
            })
            .await?
            .expect("deploy always writes");
        for p in &record.placements {
            progress(
                "placed",
                format!("slot {} on machine {}", p.slot, p.machine),
            );
        }
        let wait = req
            .wait_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_DEPLOY_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let view = self
            .wait_for_instances(&record, wait, |i| {
                progress(
                    "instance",
                    format!(
                        "slot {} on {}: {}{}",
                        i.slot,
                        i.machine,
                        i.state,
                        i.error
                            .as_ref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
                )
            })
            .await?;
        let not_running: HashSet<(&str, u32)> = view
            .not_running()
            .iter()
            .map(|i| (i.machine.as_str(), i.slot))
            .collect();
        let down = |p: &Placement| not_running.contains(&(p.machine.as_str(), p.slot));
        let mut pinned: Vec<Placement> = record
            .placements
            .iter()
            .filter(|p| p.generation.is_some())
            .cloned()
            .collect();
        if pinned.is_empty() {
            return Ok(view);
        }
        if record
            .placements
            .iter()
            .any(|p| p.generation.is_none() && down(p))
        {
            progress(
                "rollout",
                format!(
                    "not started: new instances are not all running; {} instance(s) keep their generation",
                    pinned.len()
                ),
            );
            return Ok(view);
        }
        // Pinned instances that stopped running since (a crash loop) go
        // first: replacing them costs no availability.
        pinned.sort_by_key(|p| (!down(p), p.slot));
        self.roll(&record, pinned, deadline, &progress).await
    }

    /// Replaces the `pinned` instances of `record` one at a time: unpin one,
    /// wait until its machine runs it at the new generation steadily, then
    /// the next. Stops at the first that fails (the others keep running
    /// their generation) or when a newer deploy took over.
    async fn roll(
        &self,
        record: &ServiceRecord,
        pinned: Vec<Placement>,
        deadline: tokio::time::Instant,
        progress: &impl Fn(&str, String),
    ) -> Result<ServiceView, ApiError> {
        let name = &record.name;
        let gen = record.generation;
        let mut latest = record.clone();
        for (n, p) in pinned.iter().enumerate() {
            progress(
                "rollout",
                format!(
                    "slot {} on {}: generation {} -> {gen}",
                    p.slot,
                    p.machine,
                    p.generation.unwrap_or(0)
                ),
            );
            let written = self
                .write_service(name, |cur, _, _| {
                    let Some(cur) = cur.filter(|c| c.generation == gen) else {
                        return Err(refused(format!(
                            "service {name} was redeployed or removed during the rollout"
                        )));
                    };
                    let mut next = cur.clone();
                    for q in &mut next.placements {
                        if q.machine == p.machine && q.slot == p.slot {
                            q.generation = None;
                        }
                    }
                    Ok(Some(next))
                })
                .await;
            latest = match written {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    progress("rollout", format!("stopped: {}", e.message));
                    break;
                }
            };
            if let Err(why) = self.wait_steady(name, p, gen, deadline).await {
                progress(
                    "rollout",
                    format!(
                        "stopped at slot {} on {}: {why}; {} instance(s) still run an older generation",
                        p.slot,
                        p.machine,
                        pinned.len() - n - 1
                    ),
                );
                break;
            }
            progress(
                "rollout",
                format!("slot {} on {}: running generation {gen}", p.slot, p.machine),
            );
        }
        Ok(Self::view_of(
            &latest,
            &self.instances().await?,
            &HashSet::new(),
        ))
    }

    /// Until `deadline`: the instance of placement `p` runs generation `gen`
    /// and keeps running for [`ROLLOUT_STEADY`] (one that crashes at start
    /// must not pass for running).
    async fn wait_steady(
        &self,
        name: &str,
        p: &Placement,
        gen: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let key = InstanceRecord::key(name, &p.machine, p.slot);
        let mut since: Option<(u64, tokio::time::Instant)> = None;
        loop {
            let now = self.get::<InstanceRecord>(BUCKET_INSTANCES, &key).await;
            let i = match now {
                Ok(i) => i.map(|v| v.value),
                Err(e) => return Err(e.message),
            };
            match i.filter(|i| i.generation >= gen) {
                Some(i) if i.state == InstanceState::Running => match since {
                    Some((at, t)) if at == i.updated_at_ms => {
                        if t.elapsed() >= ROLLOUT_STEADY {
                            return Ok(());
                        }
                    }
                    _ => since = Some((i.updated_at_ms, tokio::time::Instant::now())),
                },
                Some(i) if i.state == InstanceState::Failed => {
                    return Err(format!(
                        "failed{}",
                        i.error.map(|e| format!(" ({e})")).unwrap_or_default()
                    ))
                }
                _ => since = None,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("not steadily running before the deploy's deadline".into());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The stored record of service `name`, or "no such service".
    async fn service_record(
        &self,
        name: &str,
    ) -> Result<crate::store::Versioned<ServiceRecord>, ApiError> {
        self.get::<ServiceRecord>(BUCKET_SERVICES, name)
            .await?
            .ok_or_else(|| no_such_service(name))
    }

    /// Read-modify-write of a service record with compare-and-set. `change`
    /// gets the current record, the machines and their live-instance counts;
    /// it returns the new record, or `None` to delete it.
    async fn write_service(
        &self,
        name: &str,
        mut change: impl FnMut(
            Option<&ServiceRecord>,
            &[MachineRecord],
            &HashMap<String, usize>,
        ) -> Result<Option<ServiceRecord>, ApiError>,
    ) -> Result<Option<ServiceRecord>, ApiError> {
        for _ in 0..CAS_RETRIES {
            let cur = self.get::<ServiceRecord>(BUCKET_SERVICES, name).await?;
            let machines: Vec<MachineRecord> = self
                .list::<MachineRecord>(BUCKET_MACHINES)
                .await?
                .into_iter()
                .map(|m| m.value)
                .collect();
            let mut load: HashMap<String, usize> = HashMap::new();
            for i in self.list::<InstanceRecord>(BUCKET_INSTANCES).await? {
                if i.value.is_live() {
                    *load.entry(i.value.machine).or_default() += 1;
                }
            }
            let next = change(cur.as_ref().map(|c| &c.value), &machines, &load)?;
            let expect = match &cur {
                Some(c) => Expect::Revision(c.revision),
                None => Expect::Absent,
            };
            let mut ops = store::ensure_bucket(BUCKET_SERVICES);
            match &next {
                Some(rec) => ops.push(put(BUCKET_SERVICES, name, rec, expect)),
                None => ops.push(store::delete(BUCKET_SERVICES, name, expect)),
            }
            match self.txn(ops).await? {
                Ok(_) => return Ok(next),
                Err((_, Rejection::WrongLastRevision { .. })) => continue,
                Err((_, other)) => {
                    return Err(internal(format!(
                        "the store rejected the service update: {other}"
                    )))
                }
            }
        }
        Err(store::unavailable(format!(
            "service {name} kept changing under {CAS_RETRIES} attempts to update it; retry"
        )))
    }

    /// Instances of every service, keyed by store key.
    async fn instances(&self) -> Result<HashMap<String, InstanceRecord>, ApiError> {
        Ok(self
            .list_entries(BUCKET_INSTANCES)
            .await?
            .iter()
            .filter(|e| e.is_live())
            .filter_map(|e| {
                store::decode::<InstanceRecord>(e)
                    .ok()
                    .map(|v| (e.key.clone(), v.value))
            })
            .collect())
    }

    /// What `service ls` shows of `svc`; instances on the `unreachable`
    /// machines are flagged (their state is only the last they reported).
    fn view_of(
        svc: &ServiceRecord,
        instances: &HashMap<String, InstanceRecord>,
        unreachable: &HashSet<String>,
    ) -> ServiceView {
        ServiceView {
            name: svc.name.clone(),
            image: svc.image.reference.clone(),
            digest: svc.image.digest.clone(),
            replicas: svc.replicas,
            generation: svc.generation,
            volumes: svc
                .volumes
                .iter()
                .map(|v| format!("{}:{}", v.name, v.target))
                .collect(),
            instances: svc
                .placements
                .iter()
                .map(|p| {
                    let key = InstanceRecord::key(&svc.name, &p.machine, p.slot);
                    match instances.get(&key) {
                        Some(i)
                            if i.generation >= p.target_generation(svc.generation) || p.paused =>
                        {
                            InstanceView {
                                machine: p.machine.clone(),
                                slot: p.slot,
                                state: i.state,
                                overlay_ip: i.overlay_ip.clone(),
                                error: i.error.clone(),
                                unreachable: unreachable.contains(&p.machine),
                                generation: Some(i.generation),
                            }
                        }
                        other => InstanceView {
                            machine: p.machine.clone(),
                            slot: p.slot,
                            state: InstanceState::Pending,
                            overlay_ip: other.and_then(|i| i.overlay_ip.clone()),
                            error: None,
                            unreachable: unreachable.contains(&p.machine),
                            generation: None,
                        },
                    }
                })
                .collect(),
        }
    }

    /// Wait until every placement of `svc` runs its generation (or failed),
    /// reporting each change once.
    async fn wait_for_instances(
        &self,
        svc: &ServiceRecord,
        wait: Duration,
        mut report: impl FnMut(&InstanceView),
    ) -> Result<ServiceView, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen: HashMap<(String, u32), (InstanceState, Option<String>)> = HashMap::new();
        loop {
            let view = Self::view_of(svc, &self.instances().await?, &HashSet::new());
            for i in &view.instances {
                let now = (i.state, i.error.clone());
                if seen.get(&(i.machine.clone(), i.slot)) != Some(&now) {
                    report(i);
                    seen.insert((i.machine.clone(), i.slot), now);
                }
            }
            let settled = view.instances.iter().all(|i| {
                matches!(i.state, InstanceState::Running | InstanceState::Failed)
                    || (i.state == InstanceState::Stopped
                        && svc
                            .placements
                            .iter()
                            .any(|p| p.machine == i.machine && p.slot == i.slot && p.paused))
            });
            if settled || tokio::time::Instant::now() >= deadline {
                return Ok(view);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(crate) async fn service_list(&self) -> Result<ServiceList, ApiError> {
        self.require_network().await?;
        let instances = self.instances().await?;
        // This machine's prober: whose latest probe failed.
        let unreachable: HashSet<String> = self
            .rtt_rows()
            .into_iter()
            .filter(|r| r.error.is_some())
            .map(|r| r.peer)
            .collect();
        let mut services: Vec<ServiceView> = self
            .list::<ServiceRecord>(BUCKET_SERVICES)
            .await?
            .iter()
            .map(|s| Self::view_of(&s.value, &instances, &unreachable))
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ServiceList { services })
    }

    pub(crate) async fn service_rm(
        &self,
        name: &str,
        sink: &ProgressSink,
    ) -> Result<ServiceRemoved, ApiError> {
        validate_service_name(name)?;
        self.require_network().await?;
        let cur = self.service_record(name).await?;
        let machines: Vec<String> = {
            let mut m: Vec<String> = cur
                .value
                .placements
                .iter()
                .map(|p| p.machine.clone())
                .collect();
            m.sort();
            m.dedup();
            m
        };
        self.write_service(name, |_, _, _| Ok(None)).await?;
        let _ = sink.send(Progress {
            target: name.to_string(),
            step: "removed".into(),
            message: format!("waiting for {} machine(s) to stop it", machines.len()),
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left: HashSet<String> = self
                .instances()
                .await?
                .into_values()
                .filter(|i| i.service == name)
                .map(|i| i.machine)
                .collect();
            if left.is_empty() || tokio::time::Instant::now() >= deadline {
                let (pending_on, removed_on) = machines.into_iter().partition(|m| left.contains(m));
                return Ok(ServiceRemoved {
                    name: name.to_string(),
                    removed_on,
                    pending_on,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(crate) async fn service_logs(
        &self,
        name: &str,
        slot: Option<u32>,
        tail: Option<usize>,
    ) -> Result<ServiceLogs, ApiError> {
        validate_service_name(name)?;
        self.require_network().await?;
        let tail = tail.unwrap_or(DEFAULT_LOG_TAIL).clamp(1, MAX_LOG_TAIL);
        let svc = self.service_record(name).await?;
        let placements: Vec<&Placement> = svc
            .value
            .placements
            .iter()
            .filter(|p| slot.is_none_or(|s| p.slot == s))
            .collect();
        if placements.is_empty() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "service `{name}` has no instance with slot {}",
                    slot.unwrap_or(0)
                ),
            )
            .with_hint("`ployzctl service ls` shows the slots"));
        }
        let mut instances = Vec::new();
        for p in placements {
            let got = if p.machine == self.machine_id() {
                self.local_logs(name, p.slot, tail)
                    .await
                    .map_err(|e| e.message)
            } else {
                match self
                    .call_machine(
                        &p.machine,
                        &PeerRequest::Logs {
                            service: name.to_string(),
                            slot: p.slot,
                            tail,
                        },
                        Duration::from_secs(10),
                    )
                    .await
                {
                    Ok(PeerResponse::Logs(l)) => Ok(l),
                    Ok(PeerResponse::Error(e)) => Err(e.message),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(e) => Err(e),
                }
            };
            let (logs, error) = match got {
                Ok(l) => (l, None),
                Err(e) => (String::new(), Some(e)),
            };
            instances.push(InstanceLogs {
                machine: p.machine.clone(),
                slot: p.slot,
                logs,
                error,
            });
        }
        Ok(ServiceLogs {
            name: name.to_string(),
            instances,
        })
    }

    /// The last `tail` lines of an instance running here.
    pub(crate) async fn local_logs(
        &self,
        service: &str,
        slot: u32,
        tail: usize,
    ) -> Result<String, ApiError> {
        validate_service_name(service)?;
        let w = self.workloads()?;
        let id = workload_id(self.machine_id(), service, slot);
        let all = w.runtime.logs(&id).await.map_err(|e| {
            ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no logs for {service} slot {slot} on {}: {e}",
                    self.machine_id()
                ),
            )
        })?;
        Ok(last_lines(&all, tail.clamp(1, MAX_LOG_TAIL), MAX_LOG_BYTES))
    }

    // -----------------------------------------------------------------------
    // migrate

    pub(crate) async fn service_migrate(
        &self,
        name: &str,
        to: &str,
        from: Option<&str>,
        sink: &ProgressSink,
    ) -> Result<ServiceView, ApiError> {
        validate_service_name(name)?;
        self.require_network().await?;
        let progress = |step: &str, msg: String| {
            let _ = sink.send(Progress {
                target: name.to_string(),
                step: step.into(),
                message: msg,
            });
        };
        let target = self.resolve_machine(to).await?.value;
        if target.lifecycle != Lifecycle::Active {
            return Err(refused(format!(
                "machine {} is {}, and only active machines take new placements",
                target.id, target.lifecycle
            ))
            .with_hint(format!(
                "activate it with `ployzctl machine activate {}` or pick another --to",
                target.id
            )));
        }
        let source_id = match from {
            Some(f) => Some(self.resolve_machine(f).await?.value.id),
            None => None,
        };
        let svc = self.service_record(name).await?;
        let candidates: Vec<&Placement> = svc
            .value
            .placements
            .iter()
            .filter(|p| source_id.as_deref().is_none_or(|s| p.machine == s))
            .collect();
        let src = match candidates.as_slice() {
            [] => {
                return Err(refused(match &source_id {
                    Some(s) => format!("service `{name}` has no instance on machine {s}"),
                    None => format!("service `{name}` has no instances to migrate"),
                })
                .with_hint("`ployzctl service ls` shows where it runs"))
            }
            [one] => (*one).clone(),
            many => {
                return Err(invalid(format!(
                    "service `{name}` runs on several machines ({}): say which instance moves with --from <machine>",
                    many.iter()
                        .map(|p| p.machine.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        if src.machine == target.id {
            return Err(invalid(format!(
                "service `{name}` already runs on machine {}: pick another --to",
                target.id
            )));
        }
        if svc.value.placements.iter().any(|p| p.machine == target.id)
            && svc.value.volumes.is_empty()
        {
            // Harmless without volumes, but worth saying.
            progress(
                "note",
                format!("machine {} already runs another instance", target.id),
            );
        }
        // 1. Pause the source so the volume copy is consistent.
        progress(
            "stop",
            format!("stopping slot {} on {}", src.slot, src.machine),
        );
        self.set_paused(name, &src, true).await?;
        let src_key = InstanceRecord::key(name, &src.machine, src.slot);
        let stopped = self
            .wait_instance(&src_key, Duration::from_secs(60), |i| {
                i.state != InstanceState::Running && i.state != InstanceState::Pending
            })
            .await?;
        if !stopped {
            self.set_paused(name, &src, false).await.ok();
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "machine {} did not stop service `{name}` within 60 s; it keeps running there",
                    src.machine
                ),
            )
            .with_hint("check the machine with `ployzctl machine ls` and retry"));
        }
        match self
            .migrate_to(&svc.value, &src, &target.id, &progress)
            .await
        {
            Ok(view) => Ok(view),
            Err((step, e)) => {
                progress("rollback", format!("{step} failed: {}", e.message));
                let undo = self
                    .write_service(name, |cur, _, _| {
                        let Some(cur) = cur else { return Ok(None) };
                        let mut next = cur.clone();
                        next.placements
                            .retain(|p| p.machine != target.id || cur_has(&svc.value, p));
                        for p in &mut next.placements {
                            if p.machine == src.machine && p.slot == src.slot {
                                p.paused = false;
                            }
                        }
                        Ok(Some(next))
                    })
                    .await;
                let resumed = match undo {
                    Ok(_) => format!("; the original keeps running on {}", src.machine),
                    Err(u) => format!("; restoring the original also failed: {}", u.message),
                };
                Err(ApiError::new(
                    e.code,
                    format!(
                        "migrating `{name}` failed at {step}: {}{resumed}",
                        e.message
                    ),
                )
                .with_hint(e.hint.unwrap_or_else(|| "fix the cause and retry".into())))
            }
        }
    }

    /// Steps 2–4 of a migration; errors name the step.
    async fn migrate_to(
        &self,
        svc: &ServiceRecord,
        src: &Placement,
        target: &str,
        progress: &(impl Fn(&str, String) + Sync),
    ) -> Result<ServiceView, (&'static str, ApiError)> {
        let name = svc.name.as_str();
        // 2. Copy the volumes.
        for v in &svc.volumes {
            progress(
                "copy",
                format!("volume {} from {} to {target}", v.name, src.machine),
            );
            let resp = self
                .call_machine(
                    target,
                    &PeerRequest::PullVolume {
                        name: v.name.clone(),
                        from: src.machine.clone(),
                    },
                    Duration::from_secs(600),
                )
                .await
                .map_err(|e| ("copy", ApiError::new(ErrorCode::Unavailable, e)))?;
            match resp {
                PeerResponse::VolumePulled { bytes, sha256 } => progress(
                    "copy",
                    format!("volume {}: {bytes} bytes, {sha256} verified", v.name),
                ),
                PeerResponse::Error(e) => return Err(("copy", e)),
                other => {
                    return Err((
                        "copy",
                        internal(format!("machine {target} answered {other:?}")),
                    ))
                }
            }
        }
        // 3. Place it on the target and wait for it to run.
        progress("start", format!("starting on {target}"));
        let placed = self
            .write_service(name, |cur, _, _| {
                let Some(cur) = cur else {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("service `{name}` was removed during the migration"),
                    ));
                };
                let mut next = cur.clone();
                let slot = next
                    .placements
                    .iter()
                    .map(|p| p.slot + 1)
                    .max()
                    .unwrap_or(0);
                next.placements.push(Placement {
                    machine: target.to_string(),
                    slot,
                    paused: false,
                    generation: None,
                });
                next.updated_at_ms = now_ms();
                Ok(Some(next))
            })
            .await
            .map_err(|e| ("start", e))?
            .expect("kept");
        let new = placed.placements.last().expect("just pushed").clone();
        let key = InstanceRecord::key(name, &new.machine, new.slot);
        let gen = placed.generation;
        let mut last = None;
        let running = self
            .wait_instance(&key, Duration::from_secs(120), |i| {
                last = Some(i.clone());
                i.generation == gen
                    && matches!(i.state, InstanceState::Running | InstanceState::Failed)
            })
            .await
            .map_err(|e| ("start", e))?;
        match last {
            Some(i) if running && i.state == InstanceState::Running => progress(
                "start",
                format!(
                    "running on {target} at {}",
                    i.overlay_ip.as_deref().unwrap_or("-")
                ),
            ),
            Some(i) if running => {
                return Err((
                    "start",
                    ApiError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "the instance on {target} failed: {}",
                            i.error.as_deref().unwrap_or("no reason given")
                        ),
                    ),
                ))
            }
            _ => {
                return Err((
                    "start",
                    ApiError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "machine {target} did not report the instance running within 120 s"
                        ),
                    ),
                ))
            }
        }
        // 4. Only now drop the source.
        progress(
            "cleanup",
            format!("removing slot {} from {}", src.slot, src.machine),
        );
        let done = self
            .write_service(name, |cur, _, _| {
                let Some(cur) = cur else { return Ok(None) };
                let mut next = cur.clone();
                next.placements
                    .retain(|p| !(p.machine == src.machine && p.slot == src.slot));
                next.updated_at_ms = now_ms();
                Ok(Some(next))
            })
            .await
            .map_err(|e| ("cleanup", e))?;
        let src_key = InstanceRecord::key(name, &src.machine, src.slot);
        let gone = self
            .wait_absent(&src_key, Duration::from_secs(30))
            .await
            .unwrap_or(false);
        if !gone {
            progress(
                "cleanup",
                format!("{} has not confirmed removing the old instance yet; it will when it next reconciles", src.machine),
            );
        }
        for v in &svc.volumes {
            match self
                .call_machine(
                    &src.machine,
                    &PeerRequest::DropVolume {
                        name: v.name.clone(),
                    },
                    Duration::from_secs(30),
                )
                .await
            {
                Ok(PeerResponse::VolumeDropped { dropped: true }) => progress(
                    "cleanup",
                    format!("volume {} removed from {}", v.name, src.machine),
                ),
                Ok(_) => progress(
                    "cleanup",
                    format!(
                        "volume {} kept on {} (still in use there)",
                        v.name, src.machine
                    ),
                ),
                Err(e) => progress(
                    "cleanup",
                    format!("volume {} left on {}: {e}", v.name, src.machine),
                ),
            }
        }
        let instances = self.instances().await.map_err(|e| ("cleanup", e))?;
        Ok(Self::view_of(
            done.as_ref().unwrap_or(&placed),
            &instances,
            &HashSet::new(),
        ))
    }

    async fn set_paused(&self, name: &str, at: &Placement, paused: bool) -> Result<(), ApiError> {
        self.write_service(name, |cur, _, _| {
            let Some(cur) = cur else {
                return Err(no_such_service(name));
            };
            let mut next = cur.clone();
            for p in &mut next.placements {
                if p.machine == at.machine && p.slot == at.slot {
                    p.paused = paused;
                }
            }
            Ok(Some(next))
        })
        .await
        .map(|_| ())
    }

    /// Poll one instance record until `done` holds; false at the deadline.
    async fn wait_instance(
        &self,
        key: &str,
        wait: Duration,
        mut done: impl FnMut(&InstanceRecord) -> bool,
    ) -> Result<bool, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.get::<InstanceRecord>(BUCKET_INSTANCES, key).await? {
                if done(&i.value) {
                    return Ok(true);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_absent(&self, key: &str, wait: Duration) -> Result<bool, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self
                .get::<InstanceRecord>(BUCKET_INSTANCES, key)
                .await?
                .is_none()
            {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // -----------------------------------------------------------------------
    // Peer side: blobs and volumes

    /// Serve an image archive or a packed volume to a peer.
    pub(crate) async fn serve_blob(&self, req: BlobRequest) -> Result<BlobSource, ApiError> {
        match req {
            BlobRequest::Image { digest } => {
                let store = self.image_store()?;
                let d = digest.clone();
                let found = tokio::task::spawn_blocking(move || {
                    let info = store.info(&d)?;
                    Ok::<_, ployz_runtime::image::ImageError>(
                        info.and_then(|i| store.blob_path(&d).map(|p| (i, p))),
                    )
                })
                .await
                .map_err(blocking_err)?
                .map_err(|e| internal(e.to_string()))?;
                let Some((info, path)) = found else {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!(
                            "image {digest} is not stored on machine {}",
                            self.machine_id()
                        ),
                    ));
                };
                Ok(BlobSource {
                    path,
                    size: info.size,
                    sha256: info.digest,
                    temporary: false,
                })
            }
            BlobRequest::Volume { name } => {
                validate_volume_name(&name)?;
                let dir = volume_dir(&self.cfg.data_dir, &name);
                let tmp_dir = self.cfg.data_dir.join("tmp");
                tokio::task::spawn_blocking(move || pack_volume(&dir, &tmp_dir, &name))
                    .await
                    .map_err(blocking_err)?
            }
        }
    }

    /// Copy volume `name` from machine `from` (migration, target side).
    pub(crate) async fn pull_volume(
        &self,
        name: &str,
        from: &str,
    ) -> Result<(u64, String), ApiError> {
        validate_volume_name(name)?;
        let w = self.workloads()?;
        // Refuse to clobber a volume a workload here uses.
        {
            let st = w.state.lock().await;
            let services = self.list::<ServiceRecord>(BUCKET_SERVICES).await?;
            for lw in st.workloads.values() {
                if let Some(s) = services.iter().find(|s| s.value.name == lw.service) {
                    if s.value.volumes.iter().any(|v| v.name == name) {
                        return Err(refused(format!(
                            "volume {name} is in use on machine {} by service `{}`",
                            self.machine_id(),
                            lw.service
                        ))
                        .with_hint("migrate to another machine, or remove that service first"));
                    }
                }
            }
        }
        let src = self.resolve_machine(from).await?.value;
        let secret = self.secret.get().ok_or_else(store::no_network)?;
        let tmp_dir = self.cfg.data_dir.join("tmp");
        tokio::fs::create_dir_all(&tmp_dir)
            .await
            .map_err(|e| internal(format!("cannot create {}: {e}", tmp_dir.display())))?;
        let tar = tmp_dir.join(format!("pull-{name}-{}.tar", crate::daemon::random_hex(6)));
        let (bytes, sha) = peer::fetch_blob(
            &src.peer_addr,
            &secret,
            self.machine_id(),
            &BlobRequest::Volume {
                name: name.to_string(),
            },
            None,
            &tar,
        )
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
        let dest = w.volume_dir(name);
        let tar2 = tar.clone();
        let r = tokio::task::spawn_blocking(move || unpack_volume(&tar2, &dest))
            .await
            .map_err(blocking_err)?;
        let _ = tokio::fs::remove_file(&tar).await;
        r?;
        tracing::info!(volume = name, from, bytes, %sha, "volume copied");
        Ok((bytes, sha))
    }

    /// Delete this machine's copy of a volume if no instance here uses it.
    pub(crate) async fn drop_volume(&self, name: &str) -> Result<bool, ApiError> {
        validate_volume_name(name)?;
        let services = self.list::<ServiceRecord>(BUCKET_SERVICES).await?;
        let used = services.iter().any(|s| {
            s.value
                .placements
                .iter()
                .any(|p| p.machine == self.machine_id())
                && s.value.volumes.iter().any(|v| v.name == name)
        });
        if used {
            return Ok(false);
        }
        let dir = volume_dir(&self.cfg.data_dir, name);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(internal(format!("cannot remove {}: {e}", dir.display()))),
        }
    }

    // -----------------------------------------------------------------------
    // The reconciler

    /// One pass: make this machine run exactly what is placed on it.
    pub(crate) async fn reconcile(&self) -> Result<(), ApiError> {
        let me = self.machine_id().to_string();
        let services: Vec<ServiceRecord> = self
            .list::<ServiceRecord>(BUCKET_SERVICES)
            .await?
            .into_iter()
            .map(|s| s.value)
            .collect();
        let mut desired: BTreeMap<String, (ServiceRecord, Placement)> = BTreeMap::new();
        for s in &services {
            for p in s.placements.iter().filter(|p| p.machine == me) {
                desired.insert(workload_id(&me, &s.name, p.slot), (s.clone(), p.clone()));
            }
        }
        if desired.is_empty() && self.workloads.get().is_none() && !self.has_local_workloads() {
            return Ok(());
        }
        let reported: HashMap<String, InstanceRecord> = self
            .instances()
            .await?
            .into_iter()
            .filter(|(_, i)| i.machine == me)
            .collect();
        let w = match self.workloads() {
            Ok(w) => w,
            Err(e) => {
                self.report_failed(&desired, &reported, &e.message).await?;
                return Err(e);
            }
        };
        let prefix = workload_prefix(&me);
        let actual: HashMap<String, State> = match w.runtime.list().await {
            Ok(l) => l
                .into_iter()
                .filter(|s| s.id.starts_with(&prefix))
                .map(|s| (s.id, s.state))
                .collect(),
            Err(e) => {
                let msg = format!("the {} runtime does not answer: {e}", w.runtime.kind());
                self.report_failed(&desired, &reported, &msg).await?;
                return Err(internal(msg));
            }
        };
        let mut st = w.state.lock().await;
        // Remove what is no longer placed here.
        let stale: Vec<String> = actual
            .keys()
            .chain(st.workloads.keys())
            .filter(|id| !desired.contains_key(*id))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for id in stale {
            tracing::info!(workload = %id, "removing an instance no longer placed here");
            if actual.contains_key(&id) {
                let _ = w.runtime.stop(&id, STOP_GRACE).await;
                if let Err(e) = w.runtime.delete(&id).await {
                    tracing::warn!(workload = %id, "delete failed: {e}");
                    continue;
                }
            }
            st.workloads.remove(&id);
            save_state(&w.data_dir, &st)?;
        }
        if desired.is_empty() && st.workloads.is_empty() {
            // Nothing runs here any more: take the workload network down too
            // (a later deploy sets it up again).
            let bridges: Vec<String> = w
                .bridges
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
                .collect();
            for b in bridges {
                if let Err(e) = w.runtime.remove_network(&b).await {
                    tracing::warn!(bridge = %b, "cannot remove the workload network: {e}");
                }
            }
        }
        let mut ops = Vec::new();
        for (key, i) in &reported {
            let placed = desired.values().any(|(s, p)| {
                InstanceRecord::key(&s.name, &me, p.slot) == *key && s.name == i.service
            });
            if !placed {
                ops.push(store::delete(BUCKET_INSTANCES, key, Expect::Any));
            }
        }
        if !ops.is_empty() {
            let _ = self.txn(ops).await?;
        }
        // Run what is placed here.
        // This machine's record (its subnet), read only when something starts.
        let mut mine: Option<MachineRecord> = None;
        for (id, (svc, p)) in &desired {
            let key = InstanceRecord::key(&svc.name, &me, p.slot);
            let local = st.workloads.get(id).cloned();
            let state = actual.get(id).copied();
            // Pinned by a rolling update, an older instance keeps running.
            let current_gen = local
                .as_ref()
                .is_some_and(|l| l.generation >= p.target_generation(svc.generation));
            let (next_state, error) = if p.paused {
                if state == Some(State::Running) {
                    let _ = w.runtime.stop(id, STOP_GRACE).await;
                }
                (InstanceState::Stopped, None)
            } else if current_gen && state == Some(State::Running) {
                (InstanceState::Running, None)
            } else {
                let exited = current_gen && matches!(state, Some(State::Stopped | State::Failed));
                if exited
                    && now_ms().saturating_sub(local.as_ref().map_or(0, |l| l.started_at_ms))
                        < RESTART_BACKOFF.as_millis() as u64
                {
                    let msg = match state {
                        Some(State::Failed) => "exited with an error; restarting",
                        _ => "exited; restarting",
                    };
                    (InstanceState::Failed, Some(msg.to_string()))
                } else {
                    // Report pending before the (possibly slow) start.
                    let pending = InstanceRecord {
                        service: svc.name.clone(),
                        machine: me.clone(),
                        state: InstanceState::Pending,
                        overlay_ip: local.as_ref().and_then(|l| l.ip).map(|ip| ip.to_string()),
                        slot: p.slot,
                        generation: svc.generation,
                        error: None,
                        updated_at_ms: now_ms(),
                    };
                    if reported.get(&key).map(|r| (r.state, r.generation))
                        != Some((InstanceState::Pending, svc.generation))
                    {
                        let _ = self
                            .txn(vec![put(BUCKET_INSTANCES, &key, &pending, Expect::Any)])
                            .await?;
                    }
                    if mine.is_none() {
                        mine = Some(self.my_record().await?);
                    }
                    let me_rec = mine.as_ref().expect("just read");
                    match self
                        .start_instance(w, &mut st, id, svc, p, me_rec, state.is_some())
                        .await
                    {
                        Ok(()) => (InstanceState::Running, None),
                        Err(e) => {
                            tracing::warn!(workload = %id, "cannot start: {}", e.message);
                            (InstanceState::Failed, Some(e.message))
                        }
                    }
                }
            };
            let ip = st
                .workloads
                .get(id)
                .and_then(|l| l.ip)
                .map(|ip| ip.to_string());
            // The generation it actually runs (older while pinned).
            let generation = st
                .workloads
                .get(id)
                .map_or(svc.generation, |l| l.generation);
            let rec = InstanceRecord {
                service: svc.name.clone(),
                machine: me.clone(),
                state: next_state,
                overlay_ip: ip,
                slot: p.slot,
                generation,
                error,
                updated_at_ms: now_ms(),
            };
            let same = reported.get(&key).is_some_and(|r| {
                r.state == rec.state
                    && r.generation == rec.generation
                    && r.overlay_ip == rec.overlay_ip
                    && r.error == rec.error
            });
            if !same {
                let _ = self
                    .txn(vec![put(BUCKET_INSTANCES, &key, &rec, Expect::Any)])
                    .await?;
            }
        }
        Ok(())
    }

    /// Without a working runtime, every instance placed here is failed, with
    /// the reason (rather than pending forever).
    async fn report_failed(
        &self,
        desired: &BTreeMap<String, (ServiceRecord, Placement)>,
        reported: &HashMap<String, InstanceRecord>,
        why: &str,
    ) -> Result<(), ApiError> {
        let me = self.machine_id();
        let mut ops = Vec::new();
        for (svc, p) in desired.values() {
            let key = InstanceRecord::key(&svc.name, me, p.slot);
            let rec = InstanceRecord {
                service: svc.name.clone(),
                machine: me.to_string(),
                state: InstanceState::Failed,
                overlay_ip: None,
                slot: p.slot,
                generation: svc.generation,
                error: Some(why.to_string()),
                updated_at_ms: now_ms(),
            };
            let same = reported.get(&key).is_some_and(|r| {
                r.state == rec.state && r.generation == rec.generation && r.error == rec.error
            });
            if !same {
                ops.push(put(BUCKET_INSTANCES, &key, &rec, Expect::Any));
            }
        }
        if !ops.is_empty() {
            let _ = self.txn(ops).await?;
        }
        Ok(())
    }

    fn has_local_workloads(&self) -> bool {
        !load_state(&self.cfg.data_dir).workloads.is_empty()
    }

    async fn my_record(&self) -> Result<MachineRecord, ApiError> {
        self.get::<MachineRecord>(BUCKET_MACHINES, self.machine_id())
            .await?
            .map(|v| v.value)
            .ok_or_else(|| internal("this machine has no record in the store"))
    }

    /// (Re)create and start one instance.
    #[allow(clippy::too_many_arguments)]
    async fn start_instance(
        &self,
        w: &Workloads,
        st: &mut LocalState,
        id: &str,
        svc: &ServiceRecord,
        p: &Placement,
        mine: &MachineRecord,
        exists: bool,
    ) -> Result<(), ApiError> {
        if exists {
            let _ = w.runtime.stop(id, STOP_GRACE).await;
            w.runtime
                .delete(id)
                .await
                .map_err(|e| internal(format!("cannot remove the old instance: {e}")))?;
        }
        let (image, config) = self.prepare_image(w, svc).await?;
        let (subnet, prefix) = parse_subnet(&mine.subnet)?;
        let gateway = Ipv4Addr::from(u32::from(subnet) | 1);
        let bridge = bridge_name(subnet);
        let ensured = w
            .bridges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&bridge);
        if !ensured {
            // Only the cluster reaches workloads: over the mesh, in packets
            // that fit it.
            let cluster = self.require_network().await?.cidr;
            w.runtime
                .ensure_network(&BridgeNetwork {
                    bridge: bridge.clone(),
                    gateway,
                    prefix,
                    mtu: Some(crate::overlay::MTU),
                    allow_from: Some(cluster),
                })
                .await
                .map_err(|e| internal(format!("cannot set up the workload network: {e}")))?;
            w.bridges
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(bridge.clone());
        }
        let ip = match st.workloads.get(id).and_then(|l| l.ip) {
            Some(ip) => ip,
            None => {
                let used: HashSet<Ipv4Addr> = st.workloads.values().filter_map(|l| l.ip).collect();
                allocate_ip(subnet, &used).ok_or_else(|| {
                    refused(format!(
                        "machine {} has no free workload address left in {}",
                        mine.id, mine.subnet
                    ))
                })?
            }
        };
        let mut mounts = Vec::new();
        for v in &svc.volumes {
            let dir = w.volume_dir(&v.name);
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| internal(format!("cannot create volume {}: {e}", dir.display())))?;
            mounts.push(VolumeMount {
                source: dir,
                target: PathBuf::from(&v.target),
                read_only: false,
            });
        }
        let args = if svc.command.is_empty() {
            config
                .as_ref()
                .map(|c| c.entrypoint.iter().chain(&c.cmd).cloned().collect())
                .unwrap_or_default()
        } else {
            svc.command.clone()
        };
        if args.is_empty() {
            return Err(invalid(format!(
                "service `{}` has no command and its image names none: deploy again with `-- <command>`",
                svc.name
            )));
        }
        let mut env: Vec<(String, String)> =
            config.as_ref().map(|c| c.env.clone()).unwrap_or_default();
        for (k, v) in &svc.env {
            env.retain(|(old, _)| old != k);
            env.push((k.clone(), v.clone()));
        }
        let mut spec = WorkloadSpec::new(id, image, args);
        spec.env = env;
        spec.mounts = mounts;
        spec.hostname = Some(svc.name.clone());
        spec.memory_limit = svc.memory_limit;
        spec.cpu_shares = svc.cpu_shares;
        spec.network = Some(NetworkAttachment {
            bridge,
            address: ip,
            prefix,
            gateway,
            mtu: Some(crate::overlay::MTU),
        });
        st.workloads.insert(
            id.to_string(),
            LocalWorkload {
                service: svc.name.clone(),
                slot: p.slot,
                generation: svc.generation,
                ip: Some(ip),
                started_at_ms: now_ms(),
                image: svc.image.digest.clone(),
                image_known: true,
            },
        );
        save_state(&w.data_dir, st)?;
        w.runtime
            .create(&spec)
            .await
            .map_err(|e| internal(e.to_string()))?;
        if let Err(e) = w.runtime.start(id).await {
            let _ = w.runtime.delete(id).await;
            return Err(internal(e.to_string()));
        }
        tracing::info!(workload = %id, %ip, generation = svc.generation, "instance started");
        Ok(())
    }

    /// Make the service's image available to this machine's runtime.
    async fn prepare_image(
        &self,
        w: &Workloads,
        svc: &ServiceRecord,
    ) -> Result<(Image, Option<ployz_runtime::image::ImageConfig>), ApiError> {
        let store = w.images.clone();
        let info: Option<ImageInfo> = match &svc.image.digest {
            Some(digest) => {
                let d = digest.clone();
                let s = store.clone();
                let have = tokio::task::spawn_blocking(move || s.info(&d))
                    .await
                    .map_err(blocking_err)?
                    .map_err(|e| internal(e.to_string()))?;
                match have {
                    Some(i) => Some(i),
                    None => Some(self.fetch_image(&store, svc).await?),
                }
            }
            None => {
                let name = svc.image.reference.clone();
                let s = store.clone();
                tokio::task::spawn_blocking(move || s.resolve(&name))
                    .await
                    .map_err(blocking_err)?
                    .map_err(|e| internal(e.to_string()))?
            }
        };
        match (&w.runtime, info) {
            (AnyRuntime::Host(_), Some(info)) => {
                let d = info.digest.clone();
                let rootfs = tokio::task::spawn_blocking(move || store.rootfs(&d))
                    .await
                    .map_err(blocking_err)?
                    .map_err(|e| internal(e.to_string()))?;
                Ok((Image::Rootfs(rootfs), Some(info.config)))
            }
            (AnyRuntime::Host(_), None) => Err(ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "image `{}` is not in machine {}'s image store",
                    svc.image.reference,
                    self.machine_id()
                ),
            )
            .with_hint(
                "deploy with --image <archive>: a `docker save` tarball or an OCI image layout",
            )),
            (AnyRuntime::Docker(d), Some(info)) => {
                let present = d
                    .has_image(&info.image_id)
                    .await
                    .map_err(|e| internal(e.to_string()))?;
                if !present {
                    let blob = store.blob_path(&info.digest).ok_or_else(|| {
                        internal(format!("image {} vanished from the store", info.digest))
                    })?;
                    d.load_image(&blob)
                        .await
                        .map_err(|e| internal(e.to_string()))?;
                }
                Ok((Image::Reference(info.image_id.clone()), Some(info.config)))
            }
            (AnyRuntime::Docker(d), None) => {
                let present = d
                    .has_image(&svc.image.reference)
                    .await
                    .map_err(|e| internal(e.to_string()))?;
                if !present {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!(
                            "image `{}` is not in dockerd's store on machine {}",
                            svc.image.reference,
                            self.machine_id()
                        ),
                    )
                    .with_hint(
                        "deploy with --image <archive> so ployz ships it, or load it there first",
                    ));
                }
                Ok((Image::Reference(svc.image.reference.clone()), None))
            }
        }
    }

    /// Download the service's image archive from a machine that has it.
    async fn fetch_image(
        &self,
        store: &Arc<ImageStore>,
        svc: &ServiceRecord,
    ) -> Result<ImageInfo, ApiError> {
        let digest = svc.image.digest.clone().expect("called with a digest");
        let secret = self.secret.get().ok_or_else(store::no_network)?;
        let machines = self.list::<MachineRecord>(BUCKET_MACHINES).await?;
        let mut errors = Vec::new();
        for src in &svc.image.sources {
            let Some(m) = machines.iter().find(|m| &m.value.id == src) else {
                errors.push(format!("{src}: no longer in the network"));
                continue;
            };
            let tmp = store.temp_path();
            match peer::fetch_blob(
                &m.value.peer_addr,
                &secret,
                self.machine_id(),
                &BlobRequest::Image {
                    digest: digest.clone(),
                },
                Some(&digest),
                &tmp,
            )
            .await
            {
                Ok(_) => {
                    let s = store.clone();
                    let d = digest.clone();
                    let t = tmp.clone();
                    let r = tokio::task::spawn_blocking(move || s.insert_verified(&t, &d))
                        .await
                        .map_err(blocking_err)?;
                    match r {
                        Ok(info) => {
                            tracing::info!(%digest, from = %src, "image fetched");
                            return Ok(info);
                        }
                        Err(e) => errors.push(format!("{src}: {e}")),
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "cannot fetch image {digest} ({}): {}",
                svc.image.reference,
                if errors.is_empty() {
                    "no machine is known to have it".to_string()
                } else {
                    errors.join("; ")
                }
            ),
        )
        .with_hint("deploy again from a machine that has the archive"))
    }

    /// `machine rm`: this machine is leaving, stop and delete its instances.
    pub(crate) async fn remove_all_workloads(&self) -> usize {
        let Ok(w) = self.workloads() else { return 0 };
        let prefix = workload_prefix(self.machine_id());
        let ids: Vec<String> = match w.runtime.list().await {
            Ok(l) => l
                .into_iter()
                .map(|s| s.id)
                .filter(|id| id.starts_with(&prefix))
                .collect(),
            Err(e) => {
                tracing::warn!("cannot list workloads to remove: {e}");
                return 0;
            }
        };
        let mut n = 0;
        for id in &ids {
            let _ = w.runtime.stop(id, STOP_GRACE).await;
            match w.runtime.delete(id).await {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!(workload = %id, "cannot delete: {e}"),
            }
        }
        let mut st = w.state.lock().await;
        st.workloads.clear();
        let _ = save_state(&w.data_dir, &st);
        let bridges: Vec<String> = w
            .bridges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for b in bridges {
            let _ = w.runtime.remove_network(&b).await;
        }
        n
    }

    /// Drop a removed machine's placements and instance records.
    pub(crate) async fn forget_machine_workloads(&self, machine: &str) -> Result<(), ApiError> {
        let services = self.list::<ServiceRecord>(BUCKET_SERVICES).await?;
        for s in services {
            if s.value.placements.iter().any(|p| p.machine == machine) {
                self.write_service(&s.value.name, |cur, _, _| {
                    let Some(cur) = cur else { return Ok(None) };
                    let mut next = cur.clone();
                    next.placements.retain(|p| p.machine != machine);
                    Ok(Some(next))
                })
                .await?;
            }
        }
        let ops: Vec<_> = self
            .instances()
            .await?
            .into_iter()
            .filter(|(_, i)| i.machine == machine)
            .map(|(k, _)| store::delete(BUCKET_INSTANCES, &k, Expect::Any))
            .collect();
        if !ops.is_empty() {
            let _ = self.txn(ops).await?;
        }
        Ok(())
    }
}

fn cur_has(svc: &ServiceRecord, p: &Placement) -> bool {
    svc.placements
        .iter()
        .any(|q| q.machine == p.machine && q.slot == p.slot)
}

fn shipped_image(reference: &str, info: &ImageInfo, me: &str) -> ServiceImage {
    ServiceImage {
        reference: reference.to_string(),
        digest: Some(info.digest.clone()),
        image_id: Some(info.image_id.clone()),
        size: info.size,
        sources: vec![me.to_string()],
    }
}

fn candidates(machines: &[MachineRecord], load: &HashMap<String, usize>) -> Vec<Candidate> {
    machines
        .iter()
        .map(|m| Candidate {
            id: m.id.clone(),
            lifecycle: m.lifecycle,
            load: load.get(&m.id).copied().unwrap_or(0),
        })
        .collect()
}

/// Pack a volume directory into a tar file under `tmp_dir` (blocking).
fn pack_volume(dir: &Path, tmp_dir: &Path, name: &str) -> Result<BlobSource, ApiError> {
    if !dir.is_dir() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("volume {name} does not exist here ({})", dir.display()),
        ));
    }
    std::fs::create_dir_all(tmp_dir)
        .map_err(|e| internal(format!("cannot create {}: {e}", tmp_dir.display())))?;
    let path = tmp_dir.join(format!("vol-{name}-{}.tar", crate::daemon::random_hex(6)));
    let pack = || -> std::io::Result<()> {
        let f = std::fs::File::create(&path)?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        b.append_dir_all(".", dir)?;
        let w = b.into_inner()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    if let Err(e) = pack() {
        let _ = std::fs::remove_file(&path);
        return Err(internal(format!("cannot pack volume {name}: {e}")));
    }
    let sha256 = ployz_runtime::image::sha256_file(&path)
        .map_err(|e| internal(format!("cannot checksum volume {name}: {e}")))?;
    let size = std::fs::metadata(&path)
        .map_err(|e| internal(format!("cannot stat {}: {e}", path.display())))?
        .len();
    Ok(BlobSource {
        path,
        size,
        sha256,
        temporary: true,
    })
}

/// Unpack a volume archive into `dest`, replacing it atomically (blocking).
fn unpack_volume(tar_path: &Path, dest: &Path) -> Result<(), ApiError> {
    let parent = dest
        .parent()
        .ok_or_else(|| internal("volume directory has no parent"))?;
    std::fs::create_dir_all(parent)
        .map_err(|e| internal(format!("cannot create {}: {e}", parent.display())))?;
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("volume")
        .to_string();
    let incoming = parent.join(format!(".incoming-{name}-{}", crate::daemon::random_hex(4)));
    let unpack = || -> std::io::Result<()> {
        std::fs::create_dir_all(&incoming)?;
        let mut a = tar::Archive::new(std::fs::File::open(tar_path)?);
        a.set_preserve_permissions(true);
        a.set_preserve_ownerships(true);
        a.set_overwrite(true);
        // `unpack` refuses entries that would land outside `incoming`.
        a.unpack(&incoming)
    };
    if let Err(e) = unpack() {
        let _ = std::fs::remove_dir_all(&incoming);
        return Err(internal(format!("cannot unpack volume {name}: {e}")));
    }
    let old = parent.join(format!(".old-{name}-{}", crate::daemon::random_hex(4)));
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(dest, &old)
            .map_err(|e| internal(format!("cannot replace {}: {e}", dest.display())))?;
    }
    if let Err(e) = std::fs::rename(&incoming, dest) {
        if had_old {
            let _ = std::fs::rename(&old, dest);
        }
        let _ = std::fs::remove_dir_all(&incoming);
        return Err(internal(format!("cannot install {}: {e}", dest.display())));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Wake the reconciler on every change to the services bucket.
pub async fn reconcile_loop(daemon: Arc<Daemon>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut last_gc = tokio::time::Instant::now();
    let kick = Arc::new(tokio::sync::Notify::new());
    let watcher = tokio::spawn(crate::daemon::watch_bucket(
        daemon.clone(),
        BUCKET_SERVICES,
        kick.clone(),
    ));
    loop {
        let kicked = tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(RECONCILE_EVERY) => false,
            _ = kick.notified() => true,
        };
        if daemon.cluster_file().is_none() {
            continue;
        }
        if let Err(e) = daemon.reconcile().await {
            tracing::debug!("reconcile: {}", e.message);
        }
        // Also right after services changed: a removed service's image may
        // go once its instances are gone (and the grace period is over).
        if kicked || last_gc.elapsed() >= IMAGE_GC_EVERY {
            last_gc = tokio::time::Instant::now();
            if let Err(e) = daemon.gc_images().await {
                tracing::warn!("image garbage collection: {}", e.message);
            }
        }
    }
    watcher.abort();
}

/// The stored images to remove: neither in `keep` nor stored less than
/// `grace` ago (`stored`: digest and when it was stored).
fn collectable(
    stored: &[(String, std::time::SystemTime)],
    keep: &HashSet<String>,
    now: std::time::SystemTime,
    grace: Duration,
) -> Vec<String> {
    stored
        .iter()
        .filter(|(digest, _)| !keep.contains(digest))
        .filter(|(_, at)| now.duration_since(*at).is_ok_and(|age| age >= grace))
        .map(|(digest, _)| digest.clone())
        .collect()
}

impl Daemon {
    /// Removes stored images nothing here needs any more: not run by a local
    /// workload (an older generation may still run one), not the image of a
    /// service placed here, not one this machine serves to others (a source),
    /// and stored at least [`IMAGE_GC_GRACE`] ago. Returns the removed digests.
    /// Images in dockerd (docker runtime) are left to docker.
    pub(crate) async fn gc_images(&self) -> Result<Vec<String>, ApiError> {
        let me = self.machine_id().to_string();
        let mut keep: HashSet<String> = HashSet::new();
        for l in load_state(&self.cfg.data_dir).workloads.values() {
            match (&l.image, l.image_known) {
                (Some(d), _) => {
                    keep.insert(d.clone());
                }
                (None, true) => {}
                // A workload from before images were recorded: keep all.
                (None, false) => return Ok(Vec::new()),
            }
        }
        for s in self.list::<ServiceRecord>(BUCKET_SERVICES).await? {
            let s = s.value;
            let used_here =
                s.placements.iter().any(|p| p.machine == me) || s.image.sources.contains(&me);
            if let (true, Some(d)) = (used_here, s.image.digest) {
                keep.insert(d);
            }
        }
        let grace = std::env::var("PLOYZ_IMAGE_GC_GRACE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(IMAGE_GC_GRACE);
        let store = self.image_store()?;
        tokio::task::spawn_blocking(move || {
            let stored: Vec<(String, std::time::SystemTime)> = store
                .list()
                .map_err(|e| internal(e.to_string()))?
                .into_iter()
                .filter_map(|i| {
                    let at = store
                        .blob_path(&i.digest)?
                        .metadata()
                        .ok()?
                        .modified()
                        .ok()?;
                    Some((i.digest, at))
                })
                .collect();
            let mut removed = Vec::new();
            for digest in collectable(&stored, &keep, std::time::SystemTime::now(), grace) {
                match store.remove(&digest) {
                    Ok(()) => {
                        tracing::info!(%digest, "removed an image nothing uses any more");
                        removed.push(digest);
                    }
                    Err(e) => tracing::warn!(%digest, "cannot remove an unused image: {e}"),
                }
            }
            Ok(removed)
        })
        .await
        .map_err(|e| internal(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_gc_keeps_what_is_used_and_what_is_young() {
        use std::time::UNIX_EPOCH;
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let stored = vec![
            ("sha256:used".to_string(), t(0)),
            ("sha256:old".to_string(), t(0)),
            ("sha256:young".to_string(), t(950)),
            ("sha256:future".to_string(), t(2000)),
        ];
        let keep: HashSet<String> = ["sha256:used".to_string()].into();
        let grace = Duration::from_secs(100);
        assert_eq!(collectable(&stored, &keep, t(1000), grace), ["sha256:old"]);
        // Nothing is old enough yet.
        assert!(collectable(&stored, &keep, t(50), grace).is_empty());
    }

    #[test]
    fn names_and_ids() {
        validate_service_name("web-1").unwrap();
        for bad in ["", "-a", "a-", "Web", "a_b", &"x".repeat(41)] {
            assert!(validate_service_name(bad).is_err(), "{bad}");
        }
        let id = workload_id("0123456789ab", &"x".repeat(40), u32::MAX);
        assert!(id.len() <= 64, "{id}");
        ployz_runtime::validate_id(&id).unwrap();
        assert_eq!(workload_id("0123456789ab", "web", 3), "plz-01234567-web-3");
        assert_eq!(bridge_name(Ipv4Addr::new(10, 101, 3, 0)), "plz0a650300");
    }

    #[test]
    fn env_and_volumes() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "A=2".into()]).unwrap();
        assert_eq!(env, [("B".into(), "x=y".into()), ("A".into(), "2".into())]);
        assert!(parse_env(&["NOEQ".into()])
            .unwrap_err()
            .message
            .contains("KEY=VALUE"));
        assert!(parse_env(&["1A=x".into()]).is_err());
        let v = parse_volumes(&["data:/var/data".into()]).unwrap();
        assert_eq!(v[0].name, "data");
        assert!(parse_volumes(&["data".into()]).is_err());
        assert!(parse_volumes(&["data:rel".into()]).is_err());
        assert!(parse_volumes(&["../x:/a".into()]).is_err());
        assert!(parse_volumes(&["a:/x".into(), "b:/x".into()]).is_err());
    }

    #[test]
    fn log_tails() {
        assert_eq!(last_lines("a\nb\nc\n", 2, 100), "b\nc\n");
        assert_eq!(last_lines("a\nb\nc", 2, 100), "b\nc");
        assert_eq!(last_lines("a\nb\n", 5, 100), "a\nb\n");
        assert_eq!(last_lines("", 5, 100), "");
        assert_eq!(last_lines("aaaa\nbbbb\ncccc\n", 10, 7), "cccc\n");
        assert_eq!(last_lines("ééééé", 1, 3).len(), 2);
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("64M").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("8388608").unwrap(), 8 << 20);
        assert!(parse_memory("1M").unwrap_err().message.contains("below 4M"));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("99999999999G").is_err());
    }

    #[test]
    fn ip_allocation() {
        let net = Ipv4Addr::new(10, 101, 3, 0);
        let mut used = HashSet::new();
        assert_eq!(allocate_ip(net, &used), Some(Ipv4Addr::new(10, 101, 3, 2)));
        used.insert(Ipv4Addr::new(10, 101, 3, 2));
        assert_eq!(allocate_ip(net, &used), Some(Ipv4Addr::new(10, 101, 3, 3)));
        for h in 2..=253 {
            used.insert(Ipv4Addr::new(10, 101, 3, h));
        }
        assert_eq!(allocate_ip(net, &used), None);
    }

    #[test]
    fn volume_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/file"), b"hello volume").unwrap();
        std::os::unix::fs::symlink("sub/file", src.join("link")).unwrap();
        let blob = pack_volume(&src, &tmp.path().join("tmp"), "v").unwrap();
        assert!(blob.sha256.starts_with("sha256:"));
        let dest = tmp.path().join("vols/v");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("stale"), b"old").unwrap();
        unpack_volume(&blob.path, &dest).unwrap();
        assert_eq!(
            std::fs::read(dest.join("sub/file")).unwrap(),
            b"hello volume"
        );
        assert_eq!(
            std::fs::read_link(dest.join("link")).unwrap(),
            Path::new("sub/file")
        );
        assert!(!dest.join("stale").exists(), "the old copy is replaced");
        assert!(pack_volume(&tmp.path().join("nope"), tmp.path(), "nope").is_err());
    }
}
