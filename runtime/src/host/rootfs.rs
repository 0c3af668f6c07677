//! Each workload's own writable root: an overlayfs whose lower layer is the
//! shared, read-only image rootfs and whose upper and work directories live
//! under `<root>/rootfs/<id>/`. When overlayfs is unavailable (no module, an
//! upper filesystem it refuses), the workload runs on the image read-only
//! with tmpfs on /tmp and /run instead.

use crate::RuntimeError;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What the workload's root is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsPlan {
    /// A private overlay mounted at this directory, writable.
    Overlay(PathBuf),
    /// The shared image rootfs itself, read-only, with tmpfs on /tmp and /run.
    ReadOnly(PathBuf),
}

impl RootfsPlan {
    pub fn path(&self) -> &Path {
        match self {
            RootfsPlan::Overlay(p) | RootfsPlan::ReadOnly(p) => p,
        }
    }
}

/// Directory holding one workload's layer (`upper/`, `work/`, `merged/`).
pub fn layer_dir(root: &Path, id: &str) -> PathBuf {
    root.join("rootfs").join(id)
}

/// Mounts the overlay for workload `id` over `image`; on failure returns the
/// read-only plan and the reason overlayfs could not be used.
pub fn prepare(
    root: &Path,
    id: &str,
    image: &Path,
) -> Result<(RootfsPlan, Option<String>), RuntimeError> {
    let dir = layer_dir(root, id);
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).map_err(|source| RuntimeError::Io {
            what: "create workload layer directory",
            path: d.clone(),
            source,
        })?;
    }
    match mount_overlay(image, &upper, &work, &merged) {
        Ok(()) => Ok((RootfsPlan::Overlay(merged), None)),
        Err(reason) => {
            let _ = fs::remove_dir_all(&dir);
            Ok((RootfsPlan::ReadOnly(image.to_path_buf()), Some(reason)))
        }
    }
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Result<(), String> {
    for p in [lower, upper, work] {
        // The option string separates with ',' and ':' (lowerdir lists).
        if p.as_os_str()
            .as_bytes()
            .iter()
            .any(|b| matches!(b, b',' | b':' | b'\\'))
        {
            return Err(format!(
                "{} contains ',', ':' or '\\', which overlayfs options cannot carry",
                p.display()
            ));
        }
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let c = |s: &[u8]| CString::new(s).map_err(|e| e.to_string());
    let target = c(merged.as_os_str().as_bytes())?;
    let data = c(data.as_bytes())?;
    let fstype = c(b"overlay")?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount -t overlay on {}: {}",
            merged.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// Unmounts and removes workload `id`'s layer, if it has one.
pub fn remove(root: &Path, id: &str) -> Result<(), RuntimeError> {
    let dir = layer_dir(root, id);
    let merged = dir.join("merged");
    if !dir.exists() {
        return Ok(());
    }
    let target = CString::new(merged.as_os_str().as_bytes()).map_err(|e| RuntimeError::Io {
        what: "unmount",
        path: merged.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    // Lazy: a mount namespace still holding a reference must not make this fail.
    // SAFETY: target is a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = std::io::Error::last_os_error();
        // EINVAL: not a mount point (never mounted, or already unmounted).
        if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            // Never remove files through a live overlay.
            return Err(RuntimeError::Io {
                what: "unmount the workload layer at",
                path: merged,
                source: err,
            });
        }
    }
    fs::remove_dir_all(&dir).map_err(|source| RuntimeError::Io {
        what: "remove workload layer",
        path: dir,
        source,
    })
}
