//! Services: desired state in the store, instances run by each machine.
//!
//! - `deploy` ([`deploy`]) imports the image into this machine's image
//!   store, places the replicas on active machines ([`placement`]) and
//!   writes the [`ServiceRecord`] with compare-and-set; then it rolls the
//!   instances and waits for the machines to report them.
//! - Every machine runs a reconciler ([`reconcile`]): it reads the
//!   services, runs what is placed on it (fetching the image archive over
//!   the peer channel from a machine that has it, checksummed), removes
//!   what is no longer placed on it, restarts what exited, and reports each
//!   instance in the `instances` bucket. Only the machine running an
//!   instance writes its record.
//! - Health checks: [`health`] decides (pure), [`probe`] probes this
//!   machine's instances and wakes the reconciler, which records health in
//!   each instance's record and restarts unhealthy instances.
//! - `migrate` ([`migrate`]) moves one instance with its volumes.
//! - [`transfer`] serves and fetches blobs (images, volumes) between
//!   machines; [`images`] prepares and collects images; [`prefetch`] lets
//!   the machines a deploy will likely place instances on fetch a registry
//!   image from the deploying machine while it is still being pulled.
//!
//! State: the engine (runtime, image store, local workload state), opened
//! on first use; everything else lives in the store.

mod deploy;
mod engine;
pub mod health;
mod images;
mod migrate;
pub mod placement;
mod prefetch;
mod probe;
mod publish;
pub mod pulls;
mod reconcile;
mod registries;
mod rollout;
mod services;
pub mod spec;
mod transfer;

use crate::control::ControlPlane;
use crate::errors::{internal, invalid, note, note_bytes, refused, ProgressSink};
use crate::ops::{OpHandle, Operations};
use crate::overlay::Overlay;
use crate::peer::{self, Blob, BlobRequest, BlobSource, PeerRequest, PeerResponse};
use crate::store::{self, put, Store, Versioned, CAS_RETRIES};
use engine::*;
use placement::candidates;
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::{Expect, Rejection};
use ployz_runtime::image::{ImageInfo, ImageStore};
use ployz_runtime::{
    AnyRuntime, BridgeNetwork, Image, NetworkAttachment, Runtime, RuntimeKind, State, VolumeMount,
    WorkloadSpec,
};
use serde::{Deserialize, Serialize};
use spec::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
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
/// Lines of an exited instance's output kept in its record.
const EXIT_OUTPUT_LINES: usize = 10;
/// Longest line of output kept in an instance record (longer ones are cut).
const EXIT_OUTPUT_LINE_CHARS: usize = 200;
/// Longest service name (keeps workload ids within 64 characters).
const MAX_SERVICE_NAME: usize = 40;
const MAX_REPLICAS: u32 = 100;
const DEFAULT_LOG_TAIL: usize = 200;
const MAX_LOG_TAIL: usize = 10_000;
/// Logs cross machines in one control-plane message (NATS max payload 1 MiB).
const MAX_LOG_BYTES: usize = 512 * 1024;

/// What the workload subsystem needs to know about this machine.
pub struct WorkloadsConfig {
    pub data_dir: PathBuf,
    pub runtime: RuntimeKind,
}

/// This machine's services and instances.
pub struct Workloads {
    cfg: WorkloadsConfig,
    store: Arc<Store>,
    control: Arc<ControlPlane>,
    overlay: Arc<Overlay>,
    ops: Arc<Operations>,
    /// Published ports and internal DNS of this machine (port checks, the
    /// resolver address workloads use).
    ingress: Arc<crate::ingress::Ingress>,
    /// The runtime and image store, opened on first use.
    engine: OnceLock<Engine>,
    engine_init: std::sync::Mutex<()>,
    /// The image store before the runtime is needed (a deploy's import).
    images: std::sync::Mutex<Option<Arc<ImageStore>>>,
    /// The health of this machine's instances (probes in memory).
    health: probe::HealthMonitor,
    /// Wakes the reconciler (a service changed, an instance's health did).
    kick: Arc<tokio::sync::Notify>,
    /// Image pulls this machine made, for `/metrics`.
    pulls: pulls::PullMetrics,
    /// Pulls here that peers follow, and peers' pulls followed from here.
    prefetch: Arc<prefetch::Prefetches>,
    /// This machine is leaving the network (`machine rm`): the reconciler
    /// starts nothing any more, whatever is still placed here.
    leaving: std::sync::atomic::AtomicBool,
}

impl Workloads {
    pub fn new(
        cfg: WorkloadsConfig,
        store: Arc<Store>,
        control: Arc<ControlPlane>,
        overlay: Arc<Overlay>,
        ops: Arc<Operations>,
        ingress: Arc<crate::ingress::Ingress>,
    ) -> Workloads {
        Workloads {
            cfg,
            store,
            control,
            overlay,
            ops,
            ingress,
            engine: OnceLock::new(),
            engine_init: std::sync::Mutex::new(()),
            images: std::sync::Mutex::new(None),
            health: probe::HealthMonitor::new(),
            kick: Arc::new(tokio::sync::Notify::new()),
            pulls: pulls::PullMetrics::default(),
            prefetch: Arc::default(),
            leaving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The image pull counters (shared: registering them exports live values).
    pub(crate) fn pull_metrics(&self) -> pulls::PullMetrics {
        self.pulls.clone()
    }

    fn machine_id(&self) -> &str {
        self.store.machine_id()
    }

    /// This machine's workload engine, opened on first use.
    fn engine(&self) -> Result<&Engine, ApiError> {
        if let Some(w) = self.engine.get() {
            return Ok(w);
        }
        let _guard = self.engine_init.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = self.engine.get() {
            return Ok(w);
        }
        let w = Engine::open(&self.cfg.data_dir, self.cfg.runtime, self.image_store()?)?;
        let _ = self.engine.set(w);
        Ok(self.engine.get().expect("just set"))
    }

    /// This machine's instances as the store records them: (state,
    /// restarts since its deploy, health).
    pub(crate) async fn local_instances(
        &self,
    ) -> Result<Vec<(InstanceState, u32, InstanceHealth)>, ApiError> {
        let me = self.machine_id().to_string();
        Ok(self
            .instances()
            .await?
            .into_values()
            .filter(|i| i.machine == me)
            .map(|i| (i.state, i.restarts, i.health))
            .collect())
    }

    /// Whether this machine's runtime answers: what it runs, or why not.
    pub(crate) async fn runtime_check(&self) -> Result<String, String> {
        let engine = self.engine().map_err(|e| e.message)?;
        let kind = self.cfg.runtime;
        match engine.runtime.list().await {
            Ok(list) => Ok(format!(
                "{kind} runtime answers; {} workload(s)",
                list.len()
            )),
            Err(e) => Err(format!("the {kind} runtime does not answer: {e}")),
        }
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
}
