//! Peers fetch a registry image while the deploying machine still pulls it.
//!
//! A deploy of a registry image pulls it on the deploying machine, stores
//! it, and only then writes the service record that sends the machines
//! placed to fetch it: pull, then fetch, one after the other. Instead, when
//! the pull starts, the deploying machine asks the machines the deploy will
//! likely place instances on (placement computed from the records read now)
//! to follow the archive while the pull writes it (`Prefetch`, then a `blob`
//! session `Pulling`: see `peer::blob`).
//!
//! Invariants:
//! - A peer keeps what it received only when the pull ended well (the
//!   archive stored on the deploying machine, its layers checked) and the
//!   bytes it received hash to that archive's digest; anything else is
//!   removed, as after a failed fetch.
//! - Nothing in the cluster store changes before the deploy writes its
//!   record: a deploy that fails after its pull leaves at most an image in
//!   the local store of a peer (as on the deploying machine), referenced by
//!   nothing, and collected as any such image (`gc_images`).
//! - A prefetch is an optimisation only: when it fails or is not taken (an
//!   earlier version, a machine placed later), the record's arrival fetches
//!   the image as before. `prepare_image` waits for a prefetch of the
//!   service's deploy still running rather than fetching a second copy.

use super::pulls::PullSource;
use super::*;
use ployz_runtime::registry::ArchiveState;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a pull stays followable after it ended, and a prefetch's outcome
/// is remembered after it ended.
const KEEP: Duration = Duration::from_secs(60);
/// Longest wait for a peer to take a `Prefetch`.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// A prefetch's outcome: the digest stored, or why nothing was.
type Outcome = Option<Result<String, String>>;

/// Both sides of prefetching on this machine, by the deploy's operation id.
#[derive(Default)]
pub(crate) struct Prefetches {
    /// Pulls of deploys running here, followed by peers.
    serving: Mutex<HashMap<String, watch::Receiver<ArchiveState>>>,
    /// This machine's fetches of pulls running on other machines.
    fetching: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Prefetches {
    /// The archive of pull `id`, as it is written (a `blob` session's source).
    pub(crate) fn serving(&self, id: &str) -> Result<watch::Receiver<ArchiveState>, ApiError> {
        lock(&self.serving).get(id).cloned().ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no image pull {id} runs on this machine"),
            )
        })
    }
}

impl Workloads {
    /// Deploy side, when pull `id` of `service` starts: offers its archive
    /// to peers and asks the machines likely to run its `replicas` to follow
    /// it (the asks run on their own). Failures only cost the overlap
    /// (logged at debug).
    pub(super) async fn offer_pull(
        &self,
        id: &str,
        service: &str,
        replicas: u32,
        archive: watch::Receiver<ArchiveState>,
    ) {
        lock(&self.prefetch.serving).insert(id.to_string(), archive);
        let targets = match self.likely_machines(service, replicas).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(service, error = %e.message, "no prefetch: placement unknown");
                return;
            }
        };
        let Ok(secret) = self.store.secret() else {
            return;
        };
        let me = self.machine_id().to_string();
        // Not awaited: a machine that does not answer must not hold up the
        // deploy (it fetches the image when the record reaches it).
        for (machine, addr) in targets {
            let req = PeerRequest::Prefetch {
                pull: id.to_string(),
                from: me.clone(),
            };
            let (secret, me) = (secret.clone(), me.clone());
            tokio::spawn(async move {
                match peer::call(&addr, &secret, &me, &req, ASK_TIMEOUT).await {
                    Ok(PeerResponse::Prefetching) => {}
                    Ok(other) => tracing::debug!(%machine, ?other, "prefetch not taken"),
                    Err(e) => tracing::debug!(%machine, error = %e, "prefetch not asked"),
                }
            });
        }
    }

    /// Deploy side, when pull `id` ended (well or not): followers still
    /// reading get its end; it is forgotten after [`KEEP`].
    pub(super) fn pull_ended(&self, id: &str) {
        let p = self.prefetch.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(KEEP).await;
            lock(&p.serving).remove(&id);
        });
    }

    /// The machines other than this one that `replicas` of `service` would
    /// be placed on now, with their peer addresses.
    async fn likely_machines(
        &self,
        service: &str,
        replicas: u32,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let cur = self
            .store
            .get::<ServiceRecord>(BUCKET_SERVICES, service)
            .await?;
        let (machines, load) = self.machines_and_load().await?;
        let placed = placement::place(
            service,
            replicas,
            cur.as_ref()
                .map_or(&[][..], |c| c.value.placements.as_slice()),
            &candidates(&machines, &load),
        )
        .map_err(|e| refused(e.to_string()))?;
        let me = self.machine_id();
        let mut out: Vec<(String, String)> = Vec::new();
        for p in placed {
            if p.machine == me || out.iter().any(|(m, _)| *m == p.machine) {
                continue;
            }
            if let Some(m) = machines.iter().find(|m| m.id == p.machine) {
                out.push((m.id.clone(), m.peer_addr.clone()));
            }
        }
        Ok(out)
    }

    /// Peer side of `Prefetch`: follows pull `pull` of machine `from` in the
    /// background (once per pull).
    pub(crate) fn prefetch(self: &Arc<Self>, pull: String, from: String) -> PeerResponse {
        let (tx, rx) = watch::channel(None);
        {
            let mut m = lock(&self.prefetch.fetching);
            if m.contains_key(&pull) {
                return PeerResponse::Prefetching;
            }
            m.insert(pull.clone(), rx);
        }
        let w = self.clone();
        tokio::spawn(async move {
            let outcome = w.follow_pull(&pull, &from).await.map_err(|e| e.message);
            if let Err(e) = &outcome {
                tracing::info!(
                    pull,
                    from,
                    error = %e,
                    "prefetch failed; the image is fetched when its service record arrives"
                );
            }
            tx.send_replace(Some(outcome));
            tokio::time::sleep(KEEP).await;
            lock(&w.prefetch.fetching).remove(&pull);
        });
        PeerResponse::Prefetching
    }

    async fn follow_pull(&self, pull: &str, from: &str) -> Result<String, ApiError> {
        let store = self.image_store()?;
        let secret = self.store.secret()?;
        let addr = self
            .store
            .values::<MachineRecord>(BUCKET_MACHINES)
            .await?
            .into_iter()
            .find(|m| m.id == from)
            .map(|m| m.peer_addr)
            .ok_or_else(|| internal(format!("machine {from} is not in the network")))?;
        let tmp = store.temp_path();
        // The host runtime runs the root filesystem: built as bytes arrive.
        let work = match self.cfg.runtime {
            RuntimeKind::Host => Some(
                store
                    .rootfs_work_dir()
                    .map_err(|e| internal(e.to_string()))?,
            ),
            RuntimeKind::Docker => None,
        };
        let started = Instant::now();
        let fetched = peer::fetch_blob_unpacking(
            &addr,
            &secret,
            self.machine_id(),
            &BlobRequest::Pulling {
                id: pull.to_string(),
            },
            None,
            &tmp,
            work.as_deref(),
        )
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()));
        let fetch_ms = started.elapsed().as_millis() as u64;
        let s = store.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let res = fetched.and_then(|(bytes, digest, unpacked)| {
                // fetch_blob checked that the bytes hash to the digest of the
                // archive the pull stored (after checking its layers) before
                // it ended well.
                let info = s
                    .insert_received(&tmp, &digest)
                    .map_err(|e| internal(e.to_string()))?;
                let unpacked = match (&work, unpacked) {
                    (Some(w), true) => s.adopt_rootfs(&info.digest, w).is_ok(),
                    _ => false,
                };
                Ok((bytes, info, unpacked))
            });
            if let Some(w) = &work {
                // Adopted by the store, or a leftover.
                let _ = std::fs::remove_dir_all(w);
            }
            res
        })
        .await
        .map_err(blocking_err)?;
        let (bytes, info, unpacked) = stored?;
        self.pulls
            .succeeded(PullSource::Peer, bytes, started.elapsed());
        tracing::info!(
            digest = %info.digest,
            %from,
            bytes,
            fetch_ms,
            store_ms = started.elapsed().as_millis() as u64 - fetch_ms,
            unpacked,
            "image fetched while its deploy pulled it"
        );
        Ok(info.digest)
    }

    /// The image `digest` a prefetch for the service's deploy stored here,
    /// waiting for one still running; `None` when there was none or it
    /// stored nothing (the caller fetches it then).
    pub(super) async fn prefetched(
        &self,
        store: &Arc<ImageStore>,
        svc: &ServiceRecord,
        digest: &str,
    ) -> Option<ImageInfo> {
        let pull = svc.deployed_by.as_ref()?;
        let mut rx = lock(&self.prefetch.fetching).get(pull)?.clone();
        let outcome = rx.wait_for(Option::is_some).await.ok()?.clone()?;
        if outcome.ok()? != digest {
            return None;
        }
        let (s, d) = (store.clone(), digest.to_string());
        tokio::task::spawn_blocking(move || s.info(&d))
            .await
            .ok()?
            .ok()?
    }
}
