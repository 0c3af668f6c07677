//! Blobs between machines over the peer channel's `blob` service: image
//! archives and packed volumes, each checked against its size and sha256.

use super::*;

impl Workloads {
    /// Serve an image archive or a packed volume to a peer.
    pub(crate) async fn serve_blob(&self, req: BlobRequest) -> Result<Blob, ApiError> {
        match req {
            BlobRequest::Pulling { id } => self.prefetch.serving(&id).map(Blob::Growing),
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
                Ok(Blob::File(BlobSource {
                    path,
                    size: info.size,
                    sha256: info.digest,
                    temporary: false,
                }))
            }
            BlobRequest::Volume { name } => {
                validate_volume_name(&name)?;
                let dir = volume_dir(&self.cfg.data_dir, &name);
                let tmp_dir = self.cfg.data_dir.join("tmp");
                tokio::task::spawn_blocking(move || pack_volume(&dir, &tmp_dir, &name))
                    .await
                    .map_err(blocking_err)?
                    .map(Blob::File)
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
        let w = self.engine()?;
        // Refuse to clobber a volume a workload here uses.
        {
            let st = w.state.lock().await;
            let services = self.store.list::<ServiceRecord>(BUCKET_SERVICES).await?;
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
        let src = self.store.resolve_machine(from).await?.value;
        let secret = self.store.secret()?;
        let tmp_dir = self.cfg.data_dir.join("tmp");
        tokio::fs::create_dir_all(&tmp_dir)
            .await
            .map_err(|e| internal(format!("cannot create {}: {e}", tmp_dir.display())))?;
        let tar = tmp_dir.join(format!(
            "pull-{name}-{}.tar",
            crate::identity::random_hex(6)
        ));
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

    /// Bytes a running [`Self::pull_volume`] of `name` received so far
    /// (the size of its download file); `None` when none is running.
    pub(crate) async fn volume_pull_progress(&self, name: &str) -> Option<u64> {
        validate_volume_name(name).ok()?;
        let prefix = format!("pull-{name}-");
        let mut dir = tokio::fs::read_dir(self.cfg.data_dir.join("tmp"))
            .await
            .ok()?;
        let mut found = None;
        while let Ok(Some(e)) = dir.next_entry().await {
            let file = e.file_name();
            let Some(rand) = file
                .to_str()
                .and_then(|f| f.strip_prefix(&prefix))
                .and_then(|f| f.strip_suffix(".tar"))
            else {
                continue;
            };
            if rand.len() == 12 && rand.bytes().all(|b| b.is_ascii_hexdigit()) {
                let len = e.metadata().await.map_or(0, |m| m.len());
                found = Some(found.unwrap_or(0) + len);
            }
        }
        found
    }

    /// Delete this machine's copy of a volume if no instance here uses it.
    pub(crate) async fn drop_volume(&self, name: &str) -> Result<bool, ApiError> {
        validate_volume_name(name)?;
        let services = self.store.list::<ServiceRecord>(BUCKET_SERVICES).await?;
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
}

/// Pack a volume directory into a tar file under `tmp_dir` (blocking).
pub(super) fn pack_volume(dir: &Path, tmp_dir: &Path, name: &str) -> Result<BlobSource, ApiError> {
    if !dir.is_dir() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("volume {name} does not exist here ({})", dir.display()),
        ));
    }
    std::fs::create_dir_all(tmp_dir)
        .map_err(|e| internal(format!("cannot create {}: {e}", tmp_dir.display())))?;
    let path = tmp_dir.join(format!("vol-{name}-{}.tar", crate::identity::random_hex(6)));
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
pub(super) fn unpack_volume(tar_path: &Path, dest: &Path) -> Result<(), ApiError> {
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
    let incoming = parent.join(format!(
        ".incoming-{name}-{}",
        crate::identity::random_hex(4)
    ));
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
    let old = parent.join(format!(".old-{name}-{}", crate::identity::random_hex(4)));
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

#[cfg(test)]
mod tests {
    use super::*;

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
