//! Images on this machine: making a service's image available to the
//! runtime (fetched from a machine that has it), and collecting stored
//! images nothing needs any more.

use super::pulls::PullSource;
use super::*;

impl Workloads {
    /// Make the service's image available to this machine's runtime.
    pub(super) async fn prepare_image(
        &self,
        w: &Engine,
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
                let started = std::time::Instant::now();
                let rootfs = tokio::task::spawn_blocking(move || store.rootfs(&d))
                    .await
                    .map_err(blocking_err)?
                    .map_err(|e| internal(e.to_string()))?;
                tracing::info!(
                    digest = %info.digest,
                    took_ms = started.elapsed().as_millis() as u64,
                    "root filesystem ready"
                );
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
    pub(super) async fn fetch_image(
        &self,
        store: &Arc<ImageStore>,
        svc: &ServiceRecord,
    ) -> Result<ImageInfo, ApiError> {
        let digest = svc.image.digest.clone().expect("called with a digest");
        if let Some(info) = self.prefetched(store, svc, &digest).await {
            return Ok(info);
        }
        let secret = self.store.secret()?;
        let machines = self.store.list::<MachineRecord>(BUCKET_MACHINES).await?;
        let mut errors = Vec::new();
        // Peers that hold the archive: where it was stored first, then the
        // machines already running this generation (they fetched it).
        let mut holders: Vec<String> = svc.image.sources.clone();
        let me = self.machine_id().to_string();
        let mut running: Vec<String> = self
            .instances()
            .await?
            .into_values()
            .filter(|i| {
                i.service == svc.name
                    && i.generation == svc.generation
                    && i.state == InstanceState::Running
            })
            .map(|i| i.machine)
            .collect();
        running.sort();
        for m in running {
            if !holders.contains(&m) {
                holders.push(m);
            }
        }
        holders.retain(|m| *m != me);
        for src in &holders {
            let Some(m) = machines.iter().find(|m| &m.value.id == src) else {
                errors.push(format!("{src}: no longer in the network"));
                continue;
            };
            let tmp = store.temp_path();
            let started = std::time::Instant::now();
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
                Ok((bytes, _)) => {
                    let fetch_ms = started.elapsed().as_millis() as u64;
                    let s = store.clone();
                    let d = digest.clone();
                    let t = tmp.clone();
                    // fetch_blob checked the sha256 of what arrived
                    // against `digest`: the same bytes its first machine
                    // verified whole.
                    let r = tokio::task::spawn_blocking(move || s.insert_received(&t, &d))
                        .await
                        .map_err(blocking_err)?;
                    match r {
                        Ok(info) => {
                            self.pulls
                                .succeeded(PullSource::Peer, bytes, started.elapsed());
                            tracing::info!(
                                %digest,
                                from = %src,
                                bytes,
                                fetch_ms,
                                store_ms = started.elapsed().as_millis() as u64 - fetch_ms,
                                "image fetched"
                            );
                            return Ok(info);
                        }
                        Err(e) => {
                            self.pulls.failed(PullSource::Peer);
                            errors.push(format!("{src}: {e}"))
                        }
                    }
                }
                Err(e) => {
                    self.pulls.failed(PullSource::Peer);
                    errors.push(e.to_string())
                }
            }
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        // No peer could serve it: an image pulled at deploy time comes from
        // its registry, pinned to the manifest digest, and must pack into
        // the very archive the service record names.
        if svc.image.manifest_digest.is_some() {
            match self.pull_pinned(store, svc, &digest).await {
                Ok(info) => return Ok(info),
                Err(e) => errors.push(e.message),
            }
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
        for s in self.store.list::<ServiceRecord>(BUCKET_SERVICES).await? {
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

/// The stored images to remove: neither in `keep` nor stored less than
/// `grace` ago (`stored`: digest and when it was stored).
pub(super) fn collectable(
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
}
