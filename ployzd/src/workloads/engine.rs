//! This machine's workload engine (runtime, image store, volumes) and
//! what it remembers about the instances it runs (`workloads.json`).

use super::*;

/// What this machine remembers about the instances it runs (0600 JSON in the
/// data dir): which generation each runs, its address, restart bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct LocalState {
    pub(super) workloads: BTreeMap<String, LocalWorkload>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LocalWorkload {
    pub(super) service: String,
    pub(super) slot: u32,
    pub(super) generation: u64,
    pub(super) ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub(super) started_at_ms: u64,
    /// Digest of the stored image it runs (`None`: a name the runtime has,
    /// or a record from before this field; image GC then keeps everything).
    #[serde(default)]
    pub(super) image: Option<String>,
    /// Whether `image` was recorded (records from before the field lack it).
    #[serde(default)]
    pub(super) image_known: bool,
    /// How its process last ended in this generation (carried over restarts).
    #[serde(default)]
    pub(super) exit_code: Option<i64>,
    /// When it was last seen exited; at or after `started_at_ms` while the
    /// current run is over.
    #[serde(default)]
    pub(super) exited_at_ms: Option<u64>,
    /// Restarts after an exit in this generation.
    #[serde(default)]
    pub(super) restarts: u32,
    /// The last lines of output before it last exited.
    #[serde(default)]
    pub(super) last_output: Vec<String>,
    /// Its last run was ended by this machine because it was unhealthy.
    #[serde(default)]
    pub(super) killed_unhealthy: bool,
    /// What its last failed health probe said, in this generation.
    #[serde(default)]
    pub(super) health_output: Option<String>,
    /// The NATS credential generation its `NATS_URL` was made with (a
    /// service deployed with `--nats-user`): after a rotation it is
    /// replaced with the new credentials.
    #[serde(default)]
    pub(super) nats_generation: Option<u64>,
}

impl LocalWorkload {
    /// Whether the current run (since `started_at_ms`) has been seen exited.
    pub(super) fn run_exited(&self) -> bool {
        self.exited_at_ms.is_some_and(|t| t >= self.started_at_ms)
    }
}

pub(super) const STATE_FILE: &str = "workloads.json";

pub(super) fn load_state(dir: &Path) -> LocalState {
    match std::fs::read(dir.join(STATE_FILE)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!("{STATE_FILE} is unreadable ({e}); rebuilding it from the runtime");
            LocalState::default()
        }),
        Err(_) => LocalState::default(),
    }
}

pub(super) fn save_state(dir: &Path, st: &LocalState) -> Result<(), ApiError> {
    let body = serde_json::to_vec_pretty(st).expect("state serialises");
    crate::identity::write_private_atomic(&dir.join(STATE_FILE), &body)
        .map_err(|e| internal(format!("cannot save {STATE_FILE}: {e}")))
}

/// Where named volume `name` lives on this machine.
pub(super) fn volume_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("volumes").join(name)
}

/// The runtime, image store and volumes of this machine, opened on first use.
pub struct Engine {
    pub(super) runtime: AnyRuntime,
    pub(super) images: Arc<ImageStore>,
    pub(super) data_dir: PathBuf,
    pub(super) state: tokio::sync::Mutex<LocalState>,
    /// Bridges already set up by this process.
    pub(super) bridges: std::sync::Mutex<HashSet<String>>,
}

impl Engine {
    pub(super) fn open(
        data_dir: &Path,
        kind: RuntimeKind,
        images: Arc<ImageStore>,
    ) -> Result<Engine, ApiError> {
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
        Ok(Engine {
            runtime,
            images,
            data_dir: data_dir.to_path_buf(),
            state: tokio::sync::Mutex::new(load_state(data_dir)),
            bridges: Default::default(),
        })
    }

    /// Take down every workload network this process set up.
    pub(super) async fn remove_networks(&self) {
        let bridges: Vec<String> = self
            .bridges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for b in bridges {
            if let Err(e) = self.runtime.remove_network(&b).await {
                tracing::warn!(bridge = %b, "cannot remove the workload network: {e}");
            }
        }
    }

    pub(super) fn volume_dir(&self, name: &str) -> PathBuf {
        volume_dir(&self.data_dir, name)
    }
}

pub(super) fn blocking_err(e: tokio::task::JoinError) -> ApiError {
    internal(format!("a background task failed: {e}"))
}
