//! A content-addressed image store without a registry.
//!
//! `ployzctl deploy --image <path>` hands ployzd a `docker save` tarball, an
//! OCI image-layout tarball or an OCI image-layout directory. The store keeps
//! the archive once, named by the sha256 of its bytes (a directory is first
//! packed into a deterministic tar), with a small JSON file of metadata next
//! to it. Other machines receive the same bytes over the mesh and insert them
//! with [`ImageStore::insert_received`]; the host runtime gets a root
//! filesystem from [`ImageStore::rootfs`], the docker runtime feeds
//! [`ImageStore::blob_path`] to `docker load`.
//!
//! Layout under the store root (all directories 0700):
//! - `blobs/<hex>`: the archive; `blobs/<hex>.json`: its [`ImageInfo`].
//!   The metadata is written before the blob is renamed in, and removed after
//!   it, so a present blob always has metadata (it is rebuilt if lost).
//! - `rootfs/<hex>`: the unpacked root filesystem, built in `tmp/` and renamed.
//! - `tmp/`: downloads and builds in progress (same filesystem, so renames are
//!   atomic); entries older than a day are removed by [`ImageStore::open`].
//!
//! Archives are read by scanning the tar once and recording where each member
//! lies (`ArchiveIndex`); metadata members are read into memory (at most
//! 16 MiB each), layers are streamed from their offsets.
//!
//! Every function blocks: call them from `spawn_blocking`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Tar's block size: headers and padded member data.
const TAR_BLOCK: u64 = 512;
/// Largest metadata member (manifest, index, config) read into memory.
const MAX_JSON: u64 = 16 << 20;
/// Symlinks followed while resolving one path inside a root filesystem (as Linux).
const MAX_LINK_HOPS: usize = 40;
/// Nested OCI indexes followed before giving up.
const MAX_INDEX_DEPTH: usize = 4;
/// Temp entries older than this are leftovers of a crash.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

const EXPECTED: &str = "expected a `docker save` tarball or an OCI image layout (directory or tar)";

/// Why an image operation failed. Messages say what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {} does not exist: give the path of a `docker save` tarball or an OCI image layout", .0.display())]
    NotFound(PathBuf),

    #[error("{} is not a usable image: {why}; {EXPECTED}", path.display())]
    NotAnImage { path: PathBuf, why: String },

    #[error(
        "{} is truncated or corrupt: {why}; nothing was stored: save the image again \
         (docker save -o FILE IMAGE) and copy it whole",
        path.display()
    )]
    Corrupt { path: PathBuf, why: String },

    #[error(
        "image archive has digest {actual}, expected {expected}: the copy is corrupt or \
         incomplete and was discarded (nothing stored); fetch it again"
    )]
    DigestMismatch { expected: String, actual: String },

    #[error("`{digest}` is not an image digest: use sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String },

    #[error(
        "`{query}` is not an image reference: {why} \
         (use a name such as busybox:latest, or sha256: and at least 12 hex digits)"
    )]
    InvalidReference { query: String, why: &'static str },

    #[error(
        "image {digest} is not in this machine's store: import it or fetch it from a peer first"
    )]
    UnknownImage { digest: String },

    #[error("`{query}` matches several different images ({}): give more digits", .matches.join(", "))]
    Ambiguous { query: String, matches: Vec<String> },

    #[error(
        "image layer entry `{entry}` {why}: refusing to unpack a malformed or malicious image \
         (nothing was written outside the store); rebuild the image from a trusted source"
    )]
    UnsafePath { entry: String, why: &'static str },

    #[error("image layer {layer} cannot be unpacked: {why}; rebuild or re-save the image")]
    BadLayer { layer: String, why: String },

    #[error("image store: cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The archive format an image was stored as.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    /// `docker save` (has `manifest.json`; newer docker also adds an OCI index).
    DockerArchive,
    /// OCI image layout (`oci-layout`, `index.json`, `blobs/`).
    OciArchive,
}

/// What the image config says to run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `Env` split at the first `=` (an entry without `=` gets an empty value).
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
}

/// One stored image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:<hex>` of the stored archive bytes.
    pub digest: String,
    /// Archive size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the image config JSON (docker's image ID after `docker load`).
    pub image_id: String,
    /// RepoTags (docker save) or the index annotations' names (OCI), as written; may be empty.
    pub names: Vec<String>,
    pub format: ImageFormat,
    pub config: ImageConfig,
}

/// Bytes written between two [`start_writeback`] calls by the writers of
/// large files (archives, blobs received from peers).
pub const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts writing `file`'s dirty pages to disk without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the `fsync` that must
/// come before the file is stored finds little left to write, instead of
/// the whole file at once at the end of a transfer. Best effort: an error
/// only means the final `fsync` does all the work.
pub fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// `sha256:<hex>` of a file, read in 64 KiB pieces.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

/// `sha256:<hex>` and length of everything `r` yields.
fn hash_reader(r: &mut impl Read) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((format!("sha256:{:x}", h.finalize()), total))
}

fn sha256_bytes(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// The 64 hex digits of `sha256:<hex>` (or of a bare `<hex>`), if well formed.
fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    (hex.len() == 64 && is_lower_hex(hex)).then_some(hex)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos}", std::process::id())
}

/// The content-addressed store. Cheap to clone the path out of; all methods take `&self`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens (creating) the store at `root`: `root/{blobs,rootfs,tmp}`, mode 0700.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        for dir in [
            root.clone(),
            root.join("blobs"),
            root.join("rootfs"),
            root.join("tmp"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err("create directory", &dir))?;
        }
        let store = ImageStore { root };
        store.remove_stale_temps();
        Ok(store)
    }

    /// Best effort: leftovers of a crash (downloads, half-built rootfs) older than a day.
    fn remove_stale_temps(&self) {
        let Ok(dir) = fs::read_dir(self.tmp_dir()) else {
            return;
        };
        let now = SystemTime::now();
        for entry in dir.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > STALE_TMP);
            if old {
                let _ = remove_any(&entry.path());
            }
        }
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn blob_file(&self, hex: &str) -> PathBuf {
        self.root.join("blobs").join(hex)
    }

    fn meta_file(&self, hex: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{hex}.json"))
    }

    fn rootfs_dir(&self, hex: &str) -> PathBuf {
        self.root.join("rootfs").join(hex)
    }

    /// A fresh path inside the store (same filesystem as the blobs) for a download in progress.
    pub fn temp_path(&self) -> PathBuf {
        self.tmp_dir().join(format!("incoming-{}", unique_suffix()))
    }

    /// Imports a `docker save` tarball, an OCI layout tarball or an OCI layout
    /// directory (an unpacked `docker save` directory works too) from this
    /// machine. The archive is verified before it is stored: read to tar's
    /// end-of-archive marker, every member whole, manifest, config and every
    /// layer present, and every blob matching its digest and size. Importing the same bytes
    /// again stores nothing new and returns the same [`ImageInfo`]; when several
    /// stored images carry the same name, the most recently imported one wins
    /// in [`ImageStore::resolve`].
    pub fn import_path(&self, path: &Path) -> Result<ImageInfo, ImageError> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(path.to_path_buf()))
            }
            Err(e) => return Err(io_err("read", path)(e)),
        };
        if !meta.is_dir() && !meta.is_file() {
            // A FIFO, socket or device: reading it could block forever or
            // never end; it is not an image either way.
            return Err(ImageError::NotAnImage {
                path: path.to_path_buf(),
                why: "it is not a regular file or a directory (a FIFO, socket or device)".into(),
            });
        }
        let tmp = self.temp_path();
        if meta.is_dir() {
            if !path.join("index.json").is_file() && !path.join("manifest.json").is_file() {
                return Err(ImageError::NotAnImage {
                    path: path.to_path_buf(),
                    why: "the directory has neither index.json (OCI image layout) nor \
                          manifest.json (unpacked docker save)"
                        .into(),
                });
            }
            if let Err(e) = pack_layout_dir(path, &tmp) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        } else {
            // Already stored? Then there is nothing to copy.
            let digest = sha256_file(path).map_err(io_err("read", path))?;
            if let Some(hex) = digest_hex(&digest) {
                if self.blob_file(hex).is_file() {
                    if let Some(info) = self.touch(hex)? {
                        return Ok(info);
                    }
                }
            }
            if let Err(e) = copy_new(path, &tmp) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        self.store_temp(&tmp, None, path, None)
    }

    /// Moves a downloaded archive at `tmp` into the store after checking that
    /// its sha256 is `expected_digest` and that it is an image. On any failure
    /// `tmp` is removed and nothing is stored.
    pub fn insert_verified(
        &self,
        tmp: &Path,
        expected_digest: &str,
    ) -> Result<ImageInfo, ImageError> {
        if digest_hex(expected_digest).is_none() || !expected_digest.starts_with("sha256:") {
            let _ = fs::remove_file(tmp);
            return Err(ImageError::InvalidDigest {
                digest: expected_digest.to_string(),
            });
        }
        self.store_temp(tmp, Some(expected_digest), tmp, None)
    }

    /// Stores an archive received from another machine at `tmp`, whose
    /// sha256 the caller computed while receiving it and found equal to
    /// `digest`: the digest a service record names, of an archive the
    /// machine that stored it first verified whole (blob digests and
    /// diff_ids, as [`ImageStore::import_path`]). The same bytes need no
    /// second reading: the archive is parsed (an image, every layer
    /// present), not re-hashed. `tmp` is removed whatever happens.
    pub fn insert_received(&self, tmp: &Path, digest: &str) -> Result<ImageInfo, ImageError> {
        if digest_hex(digest).is_none() || !digest.starts_with("sha256:") {
            let _ = fs::remove_file(tmp);
            return Err(ImageError::InvalidDigest {
                digest: digest.to_string(),
            });
        }
        self.store_temp(tmp, None, tmp, Some((digest.to_string(), Verify::NONE)))
    }

    /// Stores an archive this machine built at `tmp` (a registry pull) after
    /// the same checks as an import; `tmp` is removed whatever happens.
    pub fn insert_archive(&self, tmp: &Path) -> Result<ImageInfo, ImageError> {
        self.store_temp(tmp, None, tmp, None)
    }

    /// [`ImageStore::insert_archive`] for an archive whose sha256 the caller
    /// computed while writing it (`digest`), packed from blobs whose own
    /// digests were checked as they arrived. The layers' diff_ids are checked
    /// here (one decompression of each layer) unless `diff_ids_checked`: the
    /// caller decompressed every layer as it arrived ([`layer_diff_id`]) and
    /// found each equal to the config's.
    pub fn insert_packed(
        &self,
        tmp: &Path,
        digest: &str,
        diff_ids_checked: bool,
    ) -> Result<ImageInfo, ImageError> {
        if digest_hex(digest).is_none() || !digest.starts_with("sha256:") {
            let _ = fs::remove_file(tmp);
            return Err(ImageError::InvalidDigest {
                digest: digest.to_string(),
            });
        }
        let verify = if diff_ids_checked {
            Verify::NONE
        } else {
            Verify::DIFF_IDS
        };
        self.store_temp(tmp, None, tmp, Some((digest.to_string(), verify)))
    }

    /// Stores the archive at `tmp` (removing `tmp` whatever happens).
    /// `shown` is the path named in errors; `known`: the archive's digest as
    /// the caller computed it, and what is left to verify (else the file is
    /// hashed here and verified whole).
    fn store_temp(
        &self,
        tmp: &Path,
        expected: Option<&str>,
        shown: &Path,
        known: Option<(String, Verify)>,
    ) -> Result<ImageInfo, ImageError> {
        let res = self.store_temp_inner(tmp, expected, shown, known);
        // Renamed away on success; a leftover on failure or when already stored.
        let _ = fs::remove_file(tmp);
        res
    }

    fn store_temp_inner(
        &self,
        tmp: &Path,
        expected: Option<&str>,
        shown: &Path,
        known: Option<(String, Verify)>,
    ) -> Result<ImageInfo, ImageError> {
        let (digest, verify) = match known {
            Some(k) => k,
            None => (sha256_file(tmp).map_err(io_err("read", tmp))?, Verify::ALL),
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(ImageError::DigestMismatch {
                    expected: expected.to_string(),
                    actual: digest,
                });
            }
        }
        let hex = digest["sha256:".len()..].to_string();
        if self.blob_file(&hex).is_file() {
            if let Some(info) = self.touch(&hex)? {
                return Ok(info);
            }
        }
        let info = inspect_archive(tmp, shown, digest, verify)?;
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", tmp))?;
        self.write_meta(&hex, &info)?;
        let blob = self.blob_file(&hex);
        match fs::rename(tmp, &blob) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                // `tmp` was not from temp_path(): copy it in first, then rename.
                let local = self.temp_path();
                let res = copy_new(tmp, &local)
                    .and_then(|()| fs::rename(&local, &blob).map_err(io_err("store blob", &blob)));
                if res.is_err() {
                    let _ = fs::remove_file(&local);
                }
                res?;
            }
            Err(e) => return Err(io_err("store blob", &blob)(e)),
        }
        Ok(info)
    }

    /// Rewrites the metadata of a stored image (its mtime orders same-named
    /// images in `resolve`). `None` if the blob disappeared meanwhile.
    fn touch(&self, hex: &str) -> Result<Option<ImageInfo>, ImageError> {
        let Some(info) = self.info(hex)? else {
            return Ok(None);
        };
        self.write_meta(hex, &info)?;
        Ok(Some(info))
    }

    fn write_meta(&self, hex: &str, info: &ImageInfo) -> Result<(), ImageError> {
        let path = self.meta_file(hex);
        let tmp = self.tmp_dir().join(format!("meta-{}", unique_suffix()));
        let json = serde_json::to_vec_pretty(info).map_err(|e| ImageError::Io {
            what: "encode metadata",
            path: path.clone(),
            source: e.into(),
        })?;
        let res = fs::write(&tmp, json).map_err(io_err("write metadata", &tmp));
        let res = res.and_then(|()| fs::rename(&tmp, &path).map_err(io_err("write", &path)));
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// The stored archive of `digest`, if any.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let path = self.blob_file(digest_hex(digest)?);
        path.is_file().then_some(path)
    }

    /// The metadata of a stored image; `None` if it is not stored. Lost or
    /// damaged metadata is rebuilt from the archive.
    pub fn info(&self, digest: &str) -> Result<Option<ImageInfo>, ImageError> {
        let hex = digest_hex(digest).ok_or_else(|| ImageError::InvalidDigest {
            digest: digest.to_string(),
        })?;
        let blob = self.blob_file(hex);
        if !blob.is_file() {
            return Ok(None);
        }
        let meta = self.meta_file(hex);
        match fs::read(&meta) {
            Ok(bytes) => {
                if let Ok(info) = serde_json::from_slice::<ImageInfo>(&bytes) {
                    return Ok(Some(info));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read", &meta)(e)),
        }
        let info = inspect_archive(&blob, &blob, format!("sha256:{hex}"), Verify::ALL)?;
        self.write_meta(hex, &info)?;
        Ok(Some(info))
    }

    /// Stored images with their metadata mtime (newest import last written).
    fn entries(&self) -> Result<Vec<(ImageInfo, SystemTime)>, ImageError> {
        let dir = self.root.join("blobs");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(digest_hex) else {
                continue;
            };
            if let Some(info) = self.info(hex)? {
                let mtime = fs::metadata(self.meta_file(hex))
                    .and_then(|m| m.modified())
                    .unwrap_or(UNIX_EPOCH);
                out.push((info, mtime));
            }
        }
        out.sort_by(|a, b| a.0.digest.cmp(&b.0.digest));
        Ok(out)
    }

    /// All stored images, sorted by digest.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        Ok(self.entries()?.into_iter().map(|(i, _)| i).collect())
    }

    /// Finds an image by archive digest or image ID (`sha256:` and at least 12
    /// hex digits; bare hex of 12+ digits also works), or by name: `busybox`,
    /// `busybox:latest` and `docker.io/library/busybox:latest` are the same.
    /// When several stored images share a name, the most recently imported wins.
    pub fn resolve(&self, name_or_digest: &str) -> Result<Option<ImageInfo>, ImageError> {
        let query = name_or_digest.trim();
        let invalid = |why| ImageError::InvalidReference {
            query: query.to_string(),
            why,
        };
        if query.is_empty() {
            return Err(invalid("it is empty"));
        }
        let (prefix, explicit) = match query.strip_prefix("sha256:") {
            Some(hex) => {
                if hex.len() < 12 || hex.len() > 64 || !is_lower_hex(hex) {
                    return Err(invalid("a digest needs 12 to 64 lowercase hex digits"));
                }
                (Some(hex), true)
            }
            None if query.len() >= 12 && query.len() <= 64 && is_lower_hex(query) => {
                (Some(query), false)
            }
            None => (None, false),
        };
        let mut all = self.entries()?;
        // Newest first, so ties below go to the latest import.
        all.sort_by_key(|e| std::cmp::Reverse(e.1));
        if let Some(prefix) = prefix {
            let hits: Vec<&ImageInfo> = all
                .iter()
                .map(|(i, _)| i)
                .filter(|i| {
                    i.digest["sha256:".len()..].starts_with(prefix)
                        || i.image_id
                            .strip_prefix("sha256:")
                            .is_some_and(|id| id.starts_with(prefix))
                })
                .collect();
            if let Some(first) = hits.first() {
                // Several archives of one image (same config) are not ambiguous.
                let distinct: HashSet<&str> = hits.iter().map(|i| i.image_id.as_str()).collect();
                if distinct.len() > 1 {
                    let mut matches: Vec<String> = hits.iter().map(|i| i.digest.clone()).collect();
                    matches.sort();
                    return Err(ImageError::Ambiguous {
                        query: query.to_string(),
                        matches,
                    });
                }
                return Ok(Some((*first).clone()));
            }
            if explicit {
                return Ok(None);
            }
        }
        let Some(want) = normalize_name(query) else {
            return Err(invalid("it is not a valid image name"));
        };
        Ok(all.into_iter().map(|(i, _)| i).find(|i| {
            i.names
                .iter()
                .any(|n| normalize_name(n).as_deref() == Some(want.as_str()))
        }))
    }

    /// The root filesystem of a stored image, unpacked on first use into
    /// `root/rootfs/<hex>` (built in `tmp/` and renamed, so it is either
    /// complete or absent; concurrent callers may both build, one rename wins).
    ///
    /// Layers are applied in order: plain, gzip or zstd tar (by magic bytes), OCI
    /// whiteouts, hard links and symlinks inside the root, modes, owners (when
    /// running as root) and file mtimes. Entries that would land outside the
    /// root (`..`, a symlink leading out) fail with [`ImageError::UnsafePath`];
    /// absolute entry paths and absolute symlinks are taken relative to the
    /// root, as the container sees them. Device nodes and FIFOs are skipped
    /// (the runtime provides /dev); extended attributes are not restored.
    ///
    /// The directory is shared by every caller: do not write into it.
    pub fn rootfs(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest).ok_or_else(|| ImageError::InvalidDigest {
            digest: digest.to_string(),
        })?;
        let dest = self.rootfs_dir(hex);
        if dest.is_dir() {
            return Ok(dest);
        }
        let blob = self.blob_file(hex);
        if !blob.is_file() {
            return Err(ImageError::UnknownImage {
                digest: format!("sha256:{hex}"),
            });
        }
        let index = ArchiveIndex::build(&blob, &blob)?;
        // Verified when it was stored: unpack without reading every layer
        // twice.
        let image = parse_image(&index, Verify::NONE)?;
        let work = self.rootfs_work_dir()?;
        let built = image
            .layers
            .iter()
            .try_for_each(|layer| unpack_layer(&index, layer, &work));
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&work);
            return Err(e);
        }
        install_rootfs(&work, dest)
    }

    /// A fresh directory in the store's temp area for a root filesystem
    /// under construction (by `rootfs`, or while its image arrives: see
    /// [`layer_diff_id_unpacking`]).
    pub fn rootfs_work_dir(&self) -> Result<PathBuf, ImageError> {
        let work = self.tmp_dir().join(format!("rootfs-{}", unique_suffix()));
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&work)
            .map_err(io_err("create directory", &work))?;
        Ok(work)
    }

    /// Makes `work`, a root filesystem built from every layer of the stored
    /// image `digest` in order, that image's root filesystem (what
    /// [`ImageStore::rootfs`] would have unpacked), unless it has one.
    /// `work` is gone afterwards either way.
    pub fn adopt_rootfs(&self, digest: &str, work: &Path) -> Result<PathBuf, ImageError> {
        let stored = digest_hex(digest)
            .ok_or_else(|| ImageError::InvalidDigest {
                digest: digest.to_string(),
            })
            .and_then(|hex| match self.blob_file(hex).is_file() {
                true => Ok(self.rootfs_dir(hex)),
                false => Err(ImageError::UnknownImage {
                    digest: digest.to_string(),
                }),
            });
        match stored {
            Ok(dest) => install_rootfs(work, dest),
            Err(e) => {
                let _ = fs::remove_dir_all(work);
                Err(e)
            }
        }
    }

    /// Removes an image's archive, metadata and root filesystem. Removing an
    /// image that is not stored does nothing.
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        let hex = digest_hex(digest).ok_or_else(|| ImageError::InvalidDigest {
            digest: digest.to_string(),
        })?;
        let rootfs = self.rootfs_dir(hex);
        if rootfs.symlink_metadata().is_ok() {
            // Rename first so nobody sees a half-deleted tree.
            let trash = self
                .tmp_dir()
                .join(format!("trash-{hex}-{}", unique_suffix()));
            fs::rename(&rootfs, &trash).map_err(io_err("remove", &rootfs))?;
            fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))?;
        }
        for path in [self.blob_file(hex), self.meta_file(hex)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        }
        Ok(())
    }
}

/// Copies `from` to a new file `to` (mode 0600).
fn copy_new(from: &Path, to: &Path) -> Result<(), ImageError> {
    let mut src = File::open(from).map_err(io_err("read", from))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io_err("create", to))?;
    io::copy(&mut src, &mut dst).map_err(io_err("copy into", to))?;
    Ok(())
}

fn remove_any(path: &Path) -> io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Packing an OCI layout directory

/// Packs `dir` into a tar at `out` that depends only on the file names and
/// contents: entries sorted by path, mode 0755/0644, mtime 0, owner 0:0.
/// Symlinks are followed (the archive must be self-contained).
fn pack_layout_dir(dir: &Path, out: &Path) -> Result<(), ImageError> {
    let mut entries = Vec::new();
    collect_tree(dir, PathBuf::new(), 0, &mut entries)?;
    entries.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io_err("create", out))?;
    let mut builder = tar::Builder::new(BufWriter::new(file));
    for (rel, is_dir) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        let abs = dir.join(&rel);
        if is_dir {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(io_err("write", out))?;
        } else {
            let f = File::open(&abs).map_err(io_err("read", &abs))?;
            let size = f.metadata().map_err(io_err("read", &abs))?.len();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(size);
            builder
                .append_data(&mut header, &rel, f.take(size))
                .map_err(io_err("write", out))?;
        }
    }
    let mut w = builder.into_inner().map_err(io_err("write", out))?;
    w.flush().map_err(io_err("write", out))?;
    Ok(())
}

fn collect_tree(
    base: &Path,
    rel: PathBuf,
    depth: usize,
    out: &mut Vec<(PathBuf, bool)>,
) -> Result<(), ImageError> {
    if depth > 32 {
        return Err(ImageError::NotAnImage {
            path: base.to_path_buf(),
            why: format!("{} is nested too deep (a symlink loop?)", rel.display()),
        });
    }
    let dir = base.join(&rel);
    let mut names: Vec<OsString> = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
        names.push(entry.map_err(io_err("read directory", &dir))?.file_name());
    }
    for name in names {
        let child = rel.join(&name);
        let meta = fs::metadata(base.join(&child)).map_err(io_err("read", &base.join(&child)))?;
        if meta.is_dir() {
            out.push((child.clone(), true));
            collect_tree(base, child, depth + 1, out)?;
        } else if meta.is_file() {
            out.push((child, false));
        }
        // Sockets, FIFOs and devices are not part of an image layout.
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Reading an archive

/// One member of the outer (image) tar.
#[derive(Debug)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// Target relative to the member's directory (docker save shares layers this way).
    Symlink(Vec<u8>),
    /// Target relative to the archive root.
    HardLink(Vec<u8>),
}

/// Where each member of an image tar lies, from one scan of the file.
struct ArchiveIndex {
    file: PathBuf,
    /// The path named in errors (the user's path, not our temp copy).
    shown: PathBuf,
    members: HashMap<String, Member>,
}

/// Lexically normalises `rel` (relative to `base`; `/`-rooted if absolute)
/// into a member key, `None` if it climbs above the archive root.
fn archive_key(base: &str, rel: &[u8]) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    if !rel.starts_with(b"/") {
        parts.extend(base.split('/').filter(|p| !p.is_empty()));
    }
    let rel = std::str::from_utf8(rel).ok()?;
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl ArchiveIndex {
    fn bad(&self, why: impl Into<String>) -> ImageError {
        ImageError::NotAnImage {
            path: self.shown.clone(),
            why: why.into(),
        }
    }

    fn corrupt(&self, why: impl Into<String>) -> ImageError {
        ImageError::Corrupt {
            path: self.shown.clone(),
            why: why.into(),
        }
    }

    fn build(file: &Path, shown: &Path) -> Result<Self, ImageError> {
        let mut index = ArchiveIndex {
            file: file.to_path_buf(),
            shown: shown.to_path_buf(),
            members: HashMap::new(),
        };
        let mut f = File::open(file).map_err(io_err("open", shown))?;
        let mut head = [0u8; 6];
        let n = read_up_to(&mut f, &mut head).map_err(io_err("read", shown))?;
        match compression(&head[..n]) {
            Compression::Plain => {}
            Compression::Gzip => {
                return Err(index
                    .bad("the archive itself is gzip-compressed; decompress it first (gunzip)"))
            }
            Compression::Zstd => {
                return Err(index
                    .bad("the archive itself is zstd-compressed; decompress it first (unzstd)"))
            }
            Compression::Other(kind) => {
                return Err(index.bad(format!(
                    "the archive itself is {kind}-compressed; decompress it first"
                )))
            }
        }
        let len = f.metadata().map_err(io_err("read", shown))?.len();
        f.seek(SeekFrom::Start(0)).map_err(io_err("read", shown))?;
        let mut archive = tar::Archive::new(f);
        let entries = archive
            .entries_with_seek()
            .map_err(|e| index.bad(format!("it is not a tar archive ({e})")))?;
        // Where the last member's data (padded to 512) ends: the end-of-archive
        // marker follows.
        let mut end = 0;
        for (seen, entry) in entries.enumerate() {
            // Garbage from the start is not a tar; after good members, a
            // broken header is damage.
            let entry = entry.map_err(|e| match seen {
                0 => index.bad(format!("it is not a readable tar archive ({e})")),
                n => index.corrupt(format!("the tar header after member {n} is damaged ({e})")),
            })?;
            let (offset, size) = (entry.raw_file_position(), entry.size());
            if offset.saturating_add(size) > len {
                // Seeking past the end of a file succeeds: only the sizes tell.
                return Err(index.corrupt(format!(
                    "member `{}` needs {size} bytes from offset {offset} but the file ends at \
                     {len}",
                    String::from_utf8_lossy(&entry.path_bytes())
                )));
            }
            end = offset + size.div_ceil(TAR_BLOCK) * TAR_BLOCK;
            let Some(key) = archive_key("", &entry.path_bytes()) else {
                continue;
            };
            let member = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => Member::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
                tar::EntryType::Symlink => match entry.link_name_bytes() {
                    Some(t) => Member::Symlink(t.into_owned()),
                    None => continue,
                },
                tar::EntryType::Link => match entry.link_name_bytes() {
                    Some(t) => Member::HardLink(t.into_owned()),
                    None => continue,
                },
                _ => continue,
            };
            // As in tar, a later member of the same name replaces an earlier one.
            index.members.insert(key, member);
        }
        index.check_end(end, len)?;
        Ok(index)
    }

    /// Every tar writer (docker save, Go's archive/tar, the tar crate, GNU
    /// tar) ends the archive with two zero blocks: without them the copy
    /// stopped early, maybe exactly between two members.
    fn check_end(&self, end: u64, len: u64) -> Result<(), ImageError> {
        let missing = || {
            self.corrupt(format!(
                "the tar end-of-archive marker (1024 zero bytes after the last member, at \
                 offset {end}) is missing; the file is {len} bytes"
            ))
        };
        if len < end + 2 * TAR_BLOCK {
            return Err(missing());
        }
        let mut f = File::open(&self.file).map_err(io_err("open", &self.shown))?;
        f.seek(SeekFrom::Start(end))
            .map_err(io_err("read", &self.shown))?;
        let mut marker = [0u8; 2 * TAR_BLOCK as usize];
        f.read_exact(&mut marker)
            .map_err(io_err("read", &self.shown))?;
        if marker.iter().any(|b| *b != 0) {
            return Err(missing());
        }
        Ok(())
    }

    /// `sha256:<hex>` and length of a member's bytes as stored.
    fn hash_member(&self, name: &str) -> Result<(String, u64), ImageError> {
        let mut r = self.open_member(name)?;
        hash_reader(&mut r).map_err(io_err("read", &self.shown))
    }

    /// Offset and size of a member, following links between members.
    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let mut key = archive_key("", name.as_bytes())?;
        for _ in 0..8 {
            match self.members.get(&key)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::HardLink(target) => key = archive_key("", target)?,
                Member::Symlink(target) => {
                    let base = key.rsplit_once('/').map_or("", |(dir, _)| dir).to_string();
                    key = archive_key(&base, target)?;
                }
            }
        }
        None
    }

    fn open_member(&self, name: &str) -> Result<io::Take<File>, ImageError> {
        let (offset, size) = self
            .locate(name)
            .ok_or_else(|| self.bad(format!("`{name}` is missing from the archive")))?;
        let mut f = File::open(&self.file).map_err(io_err("open", &self.shown))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(io_err("read", &self.shown))?;
        Ok(f.take(size))
    }

    fn read_member(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let (_, size) = self
            .locate(name)
            .ok_or_else(|| self.bad(format!("`{name}` is missing from the archive")))?;
        if size > MAX_JSON {
            return Err(self.bad(format!(
                "`{name}` is {size} bytes, too large for image metadata"
            )));
        }
        let mut buf = Vec::with_capacity(size as usize);
        self.open_member(name)?
            .read_to_end(&mut buf)
            .map_err(io_err("read", &self.shown))?;
        if buf.len() as u64 != size {
            return Err(self.corrupt(format!(
                "`{name}` is cut off ({} of {size} bytes)",
                buf.len()
            )));
        }
        Ok(buf)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Compression {
    Plain,
    Gzip,
    Zstd,
    Other(&'static str),
}

/// Detects compression from the first (up to 6) bytes.
fn compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(b"BZh") {
        Compression::Other("bzip2")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Other("xz")
    } else {
        Compression::Plain
    }
}

/// What an archive says about its image.
#[derive(Debug)]
struct ParsedImage {
    format: ImageFormat,
    names: Vec<String>,
    image_id: String,
    config: ImageConfig,
    /// Archive members of the layers, bottom first.
    layers: Vec<String>,
    /// What each layer's bytes must hash to, same order as `layers`.
    checks: Vec<LayerCheck>,
}

/// The digests a layer is checked against before the image is stored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct LayerCheck {
    /// `sha256:<hex>` of the member's bytes as stored (OCI descriptors,
    /// `blobs/sha256/<hex>` names).
    raw: Option<String>,
    /// `sha256:<hex>` of the uncompressed tar stream (the config's `diff_ids`).
    diff_id: Option<String>,
}

/// The sha256 digest a member name promises: `blobs/sha256/<hex>` (OCI
/// layout, newer docker save) or `<hex>.json` (older docker save configs).
fn digest_in_name(name: &str) -> Option<String> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json").filter(|n| !n.contains('/')))?;
    (hex.len() == 64 && is_lower_hex(hex)).then(|| format!("sha256:{hex}"))
}

/// Reads every layer to its end and checks it against `check`.
/// Which of a layer's digests [`parse_image`] checks (reading the layer
/// to its end, decompressing it for the diff_id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verify {
    /// The member's bytes as stored against their blob digest.
    raw: bool,
    /// The uncompressed stream against the config's diff_id.
    diff_ids: bool,
}

impl Verify {
    /// Bytes nobody here has checked: an import, or metadata rebuilt.
    const ALL: Verify = Verify {
        raw: true,
        diff_ids: true,
    };
    /// An archive packed from blobs whose digests were checked as they
    /// arrived (a registry pull): only the diff_ids remain.
    const DIFF_IDS: Verify = Verify {
        raw: false,
        diff_ids: true,
    };
    /// An archive in the store, or one whose sha256 equals the digest of an
    /// archive that was verified with [`Verify::ALL`] when it was first
    /// stored (the same bytes, received from a peer).
    const NONE: Verify = Verify {
        raw: false,
        diff_ids: false,
    };
}

fn verify_layer(
    index: &ArchiveIndex,
    member: &str,
    check: &LayerCheck,
    verify: Verify,
) -> Result<(), ImageError> {
    if let (true, Some(want)) = (verify.raw, &check.raw) {
        let (got, _) = index.hash_member(member)?;
        if &got != want {
            return Err(index.corrupt(format!(
                "layer `{member}` has sha256 {got} but the manifest says {want}"
            )));
        }
    }
    if let (true, Some(want)) = (verify.diff_ids, &check.diff_id) {
        let mut r = open_layer(index, member)?;
        let (got, _) = hash_reader(&mut r).map_err(|e| {
            index.corrupt(format!("layer `{member}` cannot be read to its end ({e})"))
        })?;
        if &got != want {
            return Err(index.corrupt(format!(
                "layer `{member}` unpacks to sha256 {got} but the image config's diff_ids say \
                 {want}"
            )));
        }
    }
    Ok(())
}

/// Scans and validates the archive at `file`; `digest` is its sha256.
fn inspect_archive(
    file: &Path,
    shown: &Path,
    digest: String,
    verify: Verify,
) -> Result<ImageInfo, ImageError> {
    let size = fs::metadata(file).map_err(io_err("read", shown))?.len();
    let index = ArchiveIndex::build(file, shown)?;
    let image = parse_image(&index, verify)?;
    Ok(ImageInfo {
        digest,
        size,
        image_id: image.image_id,
        names: image.names,
        format: image.format,
        config: image.config,
    })
}

/// Reads the image an archive holds; `verify` says which layer digests to
/// check (every layer's presence and compression is checked always).
fn parse_image(index: &ArchiveIndex, verify: Verify) -> Result<ParsedImage, ImageError> {
    let image = if index.locate("manifest.json").is_some() {
        parse_docker(index)?
    } else if index.locate("index.json").is_some() {
        parse_oci(index)?
    } else {
        return Err(index
            .bad("it has neither manifest.json (docker save) nor index.json (OCI image layout)"));
    };
    for layer in &image.layers {
        let mut r = index.open_member(layer)?;
        let mut head = [0u8; 6];
        let n = read_up_to(&mut r, &mut head).map_err(io_err("read", &index.shown))?;
        if let Compression::Other(kind) = compression(&head[..n]) {
            return Err(index.bad(format!(
                "layer `{layer}` is {kind}-compressed and ployz unpacks only plain, gzip and \
                 zstd layers: save the image with docker save or convert its layers to gzip"
            )));
        }
    }
    for (layer, check) in image.layers.iter().zip(&image.checks) {
        verify_layer(index, layer, check, verify)?;
    }
    Ok(image)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

fn parse_docker(index: &ArchiveIndex) -> Result<ParsedImage, ImageError> {
    let raw = index.read_member("manifest.json")?;
    let manifests: Vec<DockerManifest> = serde_json::from_slice(&raw)
        .map_err(|e| index.bad(format!("manifest.json is not a docker save manifest ({e})")))?;
    let Some(first) = manifests.first() else {
        return Err(index.bad("manifest.json lists no image"));
    };
    if manifests.iter().any(|m| m.config != first.config) {
        return Err(index.bad(format!(
            "it holds {} different images; save one image per archive (docker save IMAGE)",
            manifests.len()
        )));
    }
    let mut names = Vec::new();
    for tag in manifests.iter().flat_map(|m| m.repo_tags.iter().flatten()) {
        if !names.contains(tag) {
            names.push(tag.clone());
        }
    }
    let config_bytes = index.read_member(&first.config)?;
    let image_id = sha256_bytes(&config_bytes);
    if let Some(want) = digest_in_name(&first.config) {
        if image_id != want {
            return Err(index.corrupt(format!(
                "the image config `{}` has sha256 {image_id}, not the one its name says",
                first.config
            )));
        }
    }
    let (config, diff_ids) = parse_config(index, &config_bytes, first.layers.len())?;
    let checks = first
        .layers
        .iter()
        .enumerate()
        .map(|(i, layer)| LayerCheck {
            raw: digest_in_name(layer),
            diff_id: diff_ids
                .get(i)
                .filter(|d| d.starts_with("sha256:"))
                .cloned(),
        })
        .collect();
    Ok(ParsedImage {
        format: ImageFormat::DockerArchive,
        names,
        image_id,
        config,
        layers: first.layers.clone(),
        checks,
    })
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

/// An OCI index or manifest (told apart by which fields are present, not by mediaType).
#[derive(Deserialize)]
struct OciDocument {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// Go's name for this machine's architecture, as OCI platforms spell it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Picks the manifest to run: linux/`arch` if listed, else the first real
/// one (skipping buildkit attestations and `unknown` platforms), else the first.
fn pick_descriptor<'a>(descs: &'a [Descriptor], arch: &str) -> Option<&'a Descriptor> {
    let usable = |d: &&Descriptor| {
        d.annotations
            .get("vnd.docker.reference.type")
            .is_none_or(|t| t != "attestation-manifest")
            && d.platform.as_ref().is_none_or(|p| p.os != "unknown")
    };
    descs
        .iter()
        .filter(usable)
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .or_else(|| descs.iter().find(usable))
        .or_else(|| descs.first())
}

/// Image names from an index entry's annotations.
fn annotation_names(annotations: &HashMap<String, String>) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(name) = annotations.get("io.containerd.image.name") {
        names.push(name.clone());
    }
    if let Some(r) = annotations.get("org.opencontainers.image.ref.name") {
        // Docker writes the bare tag ("latest") here next to the full name above.
        let bare_tag = !r.contains(':') && !r.contains('/');
        let redundant = bare_tag && !names.is_empty();
        if !redundant && !names.contains(r) {
            names.push(r.clone());
        }
    }
    names
}

/// `blobs/<alg>/<hex>` for a descriptor digest, if it is well formed.
fn blob_member(digest: &str) -> Option<String> {
    let (alg, enc) = digest.split_once(':')?;
    let alg_ok = !alg.is_empty()
        && alg
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'+' | b'.' | b'_' | b'-'));
    let enc_ok = !enc.is_empty()
        && enc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
    (alg_ok && enc_ok).then(|| format!("blobs/{alg}/{enc}"))
}

fn descriptor_member(index: &ArchiveIndex, d: &Descriptor) -> Result<String, ImageError> {
    blob_member(&d.digest)
        .ok_or_else(|| index.bad(format!("`{}` is not a valid blob digest", d.digest)))
}

/// Reads a small blob and checks it against its descriptor.
fn read_blob(index: &ArchiveIndex, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let bytes = index.read_member(&descriptor_member(index, d)?)?;
    if d.digest.starts_with("sha256:") && sha256_bytes(&bytes) != d.digest {
        return Err(index.corrupt(format!(
            "blob {} does not match its digest (its sha256 is {})",
            d.digest,
            sha256_bytes(&bytes)
        )));
    }
    if d.size.is_some_and(|s| s != bytes.len() as u64) {
        return Err(index.corrupt(format!(
            "blob {} is {} bytes but its descriptor says {}",
            d.digest,
            bytes.len(),
            d.size.unwrap_or_default()
        )));
    }
    Ok(bytes)
}

fn parse_oci(index: &ArchiveIndex) -> Result<ParsedImage, ImageError> {
    let raw = index.read_member("index.json")?;
    let top: OciDocument = serde_json::from_slice(&raw)
        .map_err(|e| index.bad(format!("index.json is not an OCI image index ({e})")))?;
    let top = top.manifests.unwrap_or_default();
    let arch = host_arch();
    let mut desc = pick_descriptor(&top, arch)
        .ok_or_else(|| index.bad("index.json lists no manifest"))?
        .clone();
    let mut names = Vec::new();
    for d in top.iter().filter(|d| d.digest == desc.digest) {
        for n in annotation_names(&d.annotations) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let mut depth = 0;
    let (config_desc, layer_descs) = loop {
        let bytes = read_blob(index, &desc)?;
        let doc: OciDocument = serde_json::from_slice(&bytes).map_err(|e| {
            index.bad(format!(
                "blob {} is not an OCI manifest or index ({e})",
                desc.digest
            ))
        })?;
        if let Some(config) = doc.config {
            break (config, doc.layers.unwrap_or_default());
        }
        let Some(manifests) = doc.manifests else {
            return Err(index.bad(format!(
                "blob {} is neither an image manifest nor an index",
                desc.digest
            )));
        };
        depth += 1;
        if depth > MAX_INDEX_DEPTH {
            return Err(index.bad("image indexes are nested too deep"));
        }
        desc = pick_descriptor(&manifests, arch)
            .ok_or_else(|| index.bad(format!("index {} lists no manifest", desc.digest)))?
            .clone();
    };
    let config_bytes = read_blob(index, &config_desc)?;
    let (config, _) = parse_config(index, &config_bytes, layer_descs.len())?;
    let mut layers = Vec::new();
    let mut checks = Vec::new();
    for d in &layer_descs {
        let member = descriptor_member(index, d)?;
        let (_, size) = index
            .locate(&member)
            .ok_or_else(|| index.bad(format!("layer `{member}` is missing from the archive")))?;
        if d.size.is_some_and(|s| s != size) {
            return Err(index.corrupt(format!(
                "layer `{member}` is {size} bytes but its manifest says {}",
                d.size.unwrap_or_default()
            )));
        }
        layers.push(member);
        checks.push(LayerCheck {
            raw: d.digest.starts_with("sha256:").then(|| d.digest.clone()),
            diff_id: None,
        });
    }
    Ok(ParsedImage {
        format: ImageFormat::OciArchive,
        names,
        image_id: sha256_bytes(&config_bytes),
        config,
        layers,
        checks,
    })
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootfsSection>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

#[derive(Deserialize, Default)]
struct RootfsSection {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The run configuration and the layers' `diff_ids` (empty when the config
/// has no `rootfs` section).
fn parse_config(
    index: &ArchiveIndex,
    bytes: &[u8],
    layer_count: usize,
) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let file: ConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| index.bad(format!("the image config is not valid JSON ({e})")))?;
    if let Some(rootfs) = &file.rootfs {
        if rootfs.diff_ids.len() != layer_count {
            return Err(index.bad(format!(
                "the image config lists {} layers but the manifest {layer_count}",
                rootfs.diff_ids.len()
            )));
        }
    }
    let diff_ids = file.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    let run = file.config.unwrap_or_default();
    let config = ImageConfig {
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        env: run
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv, String::new()),
            })
            .collect(),
        working_dir: run.working_dir.filter(|w| !w.is_empty()),
    };
    Ok((config, diff_ids))
}

// ---------------------------------------------------------------------------
// Image names

/// Docker's normalisation of an image reference: `busybox` →
/// `docker.io/library/busybox:latest`, `index.docker.io/x/y` →
/// `docker.io/x/y:latest`. A `@digest` suffix is kept (and no tag added).
/// `None` for something that cannot be a reference.
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let (name, digest) = match name.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (name, None),
    };
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => ("docker.io", name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    if path.is_empty() || path.starts_with('/') || path.ends_with('/') || path.starts_with(':') {
        return None;
    }
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    let last = path.rsplit('/').next().unwrap_or(&path);
    let tagged = last.contains(':');
    let mut out = format!("{domain}/{path}");
    match digest {
        Some(d) if !d.is_empty() => {
            out.push('@');
            out.push_str(d);
        }
        Some(_) => return None,
        None if !tagged => out.push_str(":latest"),
        None => {}
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Unpacking layers

/// What a layer entry name means as an OCI whiteout.
#[derive(Debug, PartialEq, Eq)]
enum Whiteout<'a> {
    None,
    /// `.wh..wh..opq`: hide everything lower layers put in this directory.
    Opaque,
    /// `.wh.<name>`: delete `<name>` from lower layers.
    Remove(&'a [u8]),
    /// Other `.wh..wh.` names (aufs bookkeeping): ignored.
    Marker,
}

fn whiteout(name: &[u8]) -> Whiteout<'_> {
    if name == b".wh..wh..opq" {
        Whiteout::Opaque
    } else if name.starts_with(b".wh..wh.") {
        Whiteout::Marker
    } else if let Some(rest) = name.strip_prefix(b".wh.") {
        if rest.is_empty() || rest == b"." || rest == b".." {
            Whiteout::Marker
        } else {
            Whiteout::Remove(rest)
        }
    } else {
        Whiteout::None
    }
}

/// Splits a layer entry path into components: a leading `/` and `.` parts are
/// dropped (absolute paths are relative to the root); `None` if it has `..`.
fn entry_components(path: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return None,
            p => out.push(p),
        }
    }
    Some(out)
}

const WHY_DOTDOT: &str = "has a `..` component";
const WHY_LINK_ESCAPE: &str = "goes through a symlink that leads outside the root filesystem";

fn open_layer(index: &ArchiveIndex, member: &str) -> Result<Box<dyn Read>, ImageError> {
    decompressed(
        index.open_member(member)?,
        member,
        io_err("read", &index.shown),
    )
}

/// The diff_id of a layer blob whose bytes `raw` yields: `sha256:<hex>` of
/// its uncompressed tar stream (plain, gzip or zstd, told apart by the first
/// bytes, as when unpacking). For a pull that checks layers as they arrive.
pub fn layer_diff_id(raw: impl Read + 'static, layer: &str) -> Result<String, ImageError> {
    let unreadable = |e: io::Error| ImageError::BadLayer {
        layer: layer.to_string(),
        why: format!("it cannot be read to its end ({e})"),
    };
    let mut r = decompressed(raw, layer, unreadable)?;
    let (digest, _) = hash_reader(&mut r).map_err(unreadable)?;
    Ok(digest)
}

/// [`layer_diff_id`], and the layer's entries applied to the root
/// filesystem under construction at `root` on the way (the layers of an
/// image in their order, as [`ImageStore::rootfs`] does). Returns the
/// diff_id and whether the layer was applied: a layer that is no readable
/// tar stream (or that cannot be applied) still gets its diff_id, and the
/// caller drops the half-built tree (`rootfs` then reports what is wrong).
pub fn layer_diff_id_unpacking(
    raw: impl Read + 'static,
    layer: &str,
    root: &Path,
) -> Result<(String, bool), ImageError> {
    let unreadable = |e: io::Error| ImageError::BadLayer {
        layer: layer.to_string(),
        why: format!("it cannot be read to its end ({e})"),
    };
    let r = decompressed(raw, layer, unreadable)?;
    let mut tee = HashingReader {
        inner: r,
        sha: Sha256::new(),
    };
    let applied = apply_layer(&mut tee, layer, root).is_ok();
    // Whatever follows the tar stream (its padding) is part of the diff_id.
    io::copy(&mut tee, &mut io::sink()).map_err(unreadable)?;
    Ok((format!("sha256:{:x}", tee.sha.finalize()), applied))
}

/// Moves the finished tree `work` to `dest`, unless another caller finished
/// first (then `work` is dropped and theirs is the image's).
fn install_rootfs(work: &Path, dest: PathBuf) -> Result<PathBuf, ImageError> {
    match fs::rename(work, &dest) {
        Ok(()) => Ok(dest),
        Err(_) if dest.is_dir() => {
            let _ = fs::remove_dir_all(work);
            Ok(dest)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(work);
            Err(io_err("move root filesystem to", &dest)(e))
        }
    }
}

/// Applies the uncompressed layer `r` (member `layer`) to the tree at `root`.
fn apply_layer(r: impl Read, layer: &str, root: &Path) -> Result<(), ImageError> {
    let bad = |e: io::Error| ImageError::BadLayer {
        layer: layer.to_string(),
        why: format!("it is not a readable tar stream ({e})"),
    };
    let mut archive = tar::Archive::new(r);
    let mut unpacker = Unpacker {
        root,
        layer,
        seen: HashSet::new(),
        dir_modes: Vec::new(),
    };
    for entry in archive.entries().map_err(bad)? {
        unpacker.apply(&mut entry.map_err(bad)?)?;
    }
    unpacker.finish()
}

/// Builds the root filesystem of the `docker save` archive whose bytes `r`
/// yields as they arrive (a machine receiving an image from a peer): the
/// blobs named by `layers` (hex digests, in the image's order, as the
/// sender announced them) are applied to `root` as they pass. Returns
/// whether the tree is the image's: every layer applied, in that order, and
/// the archive's own `manifest.json` lists exactly those layers. Reads `r`
/// to its end whatever happens (the caller hashes what it reads).
pub fn unpack_archive_stream(mut r: impl Read, layers: &[String], root: &Path) -> bool {
    let mut next = 0;
    let mut applied = true;
    let mut manifest: Option<Vec<u8>> = None;
    {
        let mut archive = tar::Archive::new(&mut r);
        let Ok(entries) = archive.entries() else {
            return false;
        };
        for entry in entries {
            let Ok(mut entry) = entry else {
                applied = false;
                break;
            };
            let path = entry.path_bytes().into_owned();
            if path == b"manifest.json" {
                let mut m = Vec::new();
                if (&mut entry).take(MAX_JSON).read_to_end(&mut m).is_err() {
                    applied = false;
                }
                manifest = Some(m);
                continue;
            }
            let Some(hex) = path.strip_prefix(b"blobs/sha256/") else {
                continue;
            };
            if applied && layers.get(next).map(String::as_bytes) == Some(hex) {
                let layer = format!("blobs/sha256/{}", layers[next]);
                applied = decompressed(&mut entry, &layer, |_| ImageError::BadLayer {
                    layer: layer.clone(),
                    why: "unreadable".into(),
                })
                .and_then(|d| apply_layer(d, &layer, root))
                .is_ok();
                next += 1;
            }
        }
    }
    let _ = io::copy(&mut r, &mut io::sink());
    let listed = manifest.and_then(|m| {
        #[derive(serde::Deserialize)]
        struct Item {
            #[serde(rename = "Layers")]
            layers: Vec<String>,
        }
        let items: Vec<Item> = serde_json::from_slice(&m).ok()?;
        match items.as_slice() {
            [one] => Some(one.layers.clone()),
            _ => None,
        }
    });
    let want: Vec<String> = layers.iter().map(|h| format!("blobs/sha256/{h}")).collect();
    applied && next == layers.len() && listed.as_ref() == Some(&want)
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    sha: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

/// `raw` decompressed according to its first bytes; `io` maps an error
/// reading them.
fn decompressed<'a>(
    mut raw: impl Read + 'a,
    member: &str,
    io: impl FnOnce(io::Error) -> ImageError,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    let mut head = [0u8; 6];
    let n = read_up_to(&mut raw, &mut head).map_err(io)?;
    let stream = io::Cursor::new(head[..n].to_vec()).chain(raw);
    match compression(&head[..n]) {
        Compression::Plain => Ok(Box::new(BufReader::with_capacity(256 * 1024, stream))),
        Compression::Gzip => Ok(Box::new(flate2::read::MultiGzDecoder::new(
            BufReader::with_capacity(256 * 1024, stream),
        ))),
        Compression::Zstd => Ok(Box::new(BufReader::with_capacity(
            256 * 1024,
            ZstdFrames::new(BufReader::with_capacity(256 * 1024, stream)),
        ))),
        Compression::Other(kind) => Err(ImageError::BadLayer {
            layer: member.to_string(),
            why: format!("it is {kind}-compressed; only plain, gzip and zstd layers are supported"),
        }),
    }
}

/// A zstd stream of one or more frames (skippable frames are skipped), as
/// `zstd -d` reads it. Decoding errors are `io::Error`s (`InvalidData`).
struct ZstdFrames<R: io::BufRead> {
    src: R,
    dec: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: io::BufRead> ZstdFrames<R> {
    fn new(src: R) -> Self {
        ZstdFrames {
            src,
            dec: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: io::BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        use ruzstd::decoding::BlockDecodingStrategy;
        let bad = |e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
        };
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.dec.can_collect() == 0 && !self.dec.is_finished() {
                    self.dec
                        .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1))
                        .map_err(|e| bad(&e))?;
                }
                let n = self.dec.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if self.dec.is_finished() && self.dec.can_collect() == 0 {
                    self.in_frame = false;
                }
                continue;
            }
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.dec.reset(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let want = u64::from(length);
                    let got = io::copy(&mut (&mut self.src).take(want), &mut io::sink())?;
                    if got < want {
                        return Err(bad(&"a skippable frame is cut short"));
                    }
                }
                Err(e) => return Err(bad(&e)),
            }
        }
    }
}

fn unpack_layer(index: &ArchiveIndex, member: &str, root: &Path) -> Result<(), ImageError> {
    apply_layer(open_layer(index, member)?, member, root)
}

/// Applies one layer's entries to a root filesystem under construction.
struct Unpacker<'a> {
    root: &'a Path,
    layer: &'a str,
    /// Paths (relative to root) this layer created, and their parents: an
    /// opaque whiteout must not hide them.
    seen: HashSet<PathBuf>,
    /// Directory modes, applied when the layer is done so a read-only
    /// directory does not block its own contents.
    dir_modes: Vec<(PathBuf, u32)>,
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Ownership is kept only when running as root; elsewhere chown fails with EPERM.
fn owner_result(res: io::Result<()>, path: &Path) -> Result<(), ImageError> {
    match res {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == io::ErrorKind::PermissionDenied
                || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            Ok(())
        }
        Err(e) => Err(io_err("set the owner of", path)(e)),
    }
}

impl Unpacker<'_> {
    fn bad_entry(&self, entry: &str, why: impl std::fmt::Display) -> ImageError {
        ImageError::BadLayer {
            layer: self.layer.to_string(),
            why: format!("entry `{entry}`: {why}"),
        }
    }

    /// Resolves directory components below the root the way the container
    /// will see them: symlinks are followed (absolute targets start again at
    /// the root), and one that would climb above the root is refused. Missing
    /// directories are created when `create`, else the result is `None`.
    /// Returns the real path relative to the root (no symlinks in it).
    fn resolve_dir(
        &self,
        components: &[&[u8]],
        create: bool,
        entry: &str,
    ) -> Result<Option<PathBuf>, ImageError> {
        let mut real: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> =
            components.iter().map(|c| os(c).to_os_string()).collect();
        let mut hops = 0;
        while let Some(part) = pending.pop_front() {
            match part.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    if real.pop().is_none() {
                        return Err(ImageError::UnsafePath {
                            entry: entry.to_string(),
                            why: WHY_LINK_ESCAPE,
                        });
                    }
                    continue;
                }
                _ => {}
            }
            let mut path = self.root.to_path_buf();
            path.extend(&real);
            path.push(&part);
            match path.symlink_metadata() {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(self.bad_entry(entry, "too many levels of symlinks"));
                    }
                    let target = fs::read_link(&path).map_err(io_err("read symlink", &path))?;
                    let target = target.as_os_str().as_bytes();
                    if target.starts_with(b"/") {
                        real.clear();
                    }
                    let mut next: VecDeque<OsString> = target
                        .split(|&b| b == b'/')
                        .map(|c| os(c).to_os_string())
                        .collect();
                    next.extend(pending.drain(..));
                    pending = next;
                }
                Ok(m) if m.is_dir() => real.push(part),
                Ok(_) => {
                    return Err(
                        self.bad_entry(entry, format!("{} is not a directory", path.display()))
                    )
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .map_err(io_err("create directory", &path))?;
                    real.push(part);
                }
                Err(e) => return Err(io_err("inspect", &path)(e)),
            }
        }
        Ok(Some(real.iter().collect()))
    }

    fn record(&mut self, rel: &Path) {
        for a in rel.ancestors() {
            if !self.seen.insert(a.to_path_buf()) {
                break;
            }
        }
    }

    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let components = entry_components(&raw).ok_or_else(|| ImageError::UnsafePath {
            entry: shown.clone(),
            why: WHY_DOTDOT,
        })?;
        let Some((name, parents)) = components.split_last() else {
            return Ok(()); // the root itself
        };
        match whiteout(name) {
            Whiteout::None => {}
            Whiteout::Marker => return Ok(()),
            Whiteout::Opaque => {
                if let Some(dir) = self.resolve_dir(parents, false, &shown)? {
                    self.clear_dir(&dir)?;
                }
                return Ok(());
            }
            Whiteout::Remove(target) => {
                if let Some(dir) = self.resolve_dir(parents, false, &shown)? {
                    let path = self.root.join(dir).join(os(target));
                    remove_any(&path).map_err(io_err("remove", &path))?;
                }
                return Ok(());
            }
        }
        let header = entry.header();
        let kind = header.entry_type();
        use tar::EntryType as T;
        if !matches!(
            kind,
            T::Directory | T::Regular | T::Continuous | T::GNUSparse | T::Symlink | T::Link
        ) {
            // Devices and FIFOs (the runtime provides /dev), pax globals, unknown types.
            return Ok(());
        }
        // Blank or garbled numeric fields read as 0, as Go's archive/tar (docker) reads them.
        let number = |v: io::Result<u64>| v.unwrap_or(0);
        let mode = match header.mode() {
            Ok(m) => m & 0o7777,
            Err(_) if kind == T::Directory => 0o755,
            Err(_) => 0o644,
        };
        let uid = u32::try_from(number(header.uid()))
            .map_err(|_| self.bad_entry(&shown, "uid out of range"))?;
        let gid = u32::try_from(number(header.gid()))
            .map_err(|_| self.bad_entry(&shown, "gid out of range"))?;
        let mtime = number(header.mtime());
        let link = entry.link_name_bytes().map(|l| l.into_owned());

        let parent = self
            .resolve_dir(parents, true, &shown)?
            .ok_or_else(|| self.bad_entry(&shown, "its directory cannot be created"))?;
        let rel = parent.join(os(name));
        let dst = self.root.join(&rel);
        match kind {
            T::Directory => {
                match dst.symlink_metadata() {
                    Ok(m) if m.is_dir() => {}
                    other => {
                        if other.is_ok() {
                            remove_any(&dst).map_err(io_err("replace", &dst))?;
                        }
                        fs::DirBuilder::new()
                            .mode(0o755)
                            .create(&dst)
                            .map_err(io_err("create directory", &dst))?;
                    }
                }
                owner_result(std::os::unix::fs::lchown(&dst, Some(uid), Some(gid)), &dst)?;
                self.dir_modes.push((dst, mode));
            }
            T::Symlink => {
                let target = link
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| self.bad_entry(&shown, "symlink without a target"))?;
                remove_any(&dst).map_err(io_err("replace", &dst))?;
                std::os::unix::fs::symlink(os(&target), &dst)
                    .map_err(io_err("create symlink", &dst))?;
                owner_result(std::os::unix::fs::lchown(&dst, Some(uid), Some(gid)), &dst)?;
            }
            T::Link => {
                let target = link
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| self.bad_entry(&shown, "hard link without a target"))?;
                let target_shown = String::from_utf8_lossy(&target).into_owned();
                let parts = entry_components(&target).ok_or_else(|| ImageError::UnsafePath {
                    entry: format!("{shown} (hard link to {target_shown})"),
                    why: WHY_DOTDOT,
                })?;
                let Some((tname, tparents)) = parts.split_last() else {
                    return Err(self.bad_entry(&shown, "hard link to the root directory"));
                };
                let missing = || {
                    self.bad_entry(
                        &shown,
                        format!("hard link target `{target_shown}` does not exist"),
                    )
                };
                let tdir = self
                    .resolve_dir(tparents, false, &shown)?
                    .ok_or_else(missing)?;
                let src = self.root.join(tdir).join(os(tname));
                match src.symlink_metadata() {
                    Ok(m) if m.is_dir() => {
                        return Err(self.bad_entry(&shown, "hard link to a directory"))
                    }
                    Ok(_) => {}
                    Err(_) => return Err(missing()),
                }
                if src != dst {
                    remove_any(&dst).map_err(io_err("replace", &dst))?;
                    // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                    fs::hard_link(&src, &dst).map_err(io_err("create hard link", &dst))?;
                }
            }
            _ => {
                remove_any(&dst).map_err(io_err("replace", &dst))?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dst)
                    .map_err(io_err("create", &dst))?;
                io::copy(entry, &mut file).map_err(io_err("write", &dst))?;
                owner_result(std::os::unix::fs::fchown(&file, Some(uid), Some(gid)), &dst)?;
                // After chown, which clears set-id bits.
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err("set the mode of", &dst))?;
                file.set_modified(UNIX_EPOCH + Duration::from_secs(mtime))
                    .map_err(io_err("set the mtime of", &dst))?;
            }
        }
        self.record(&rel);
        Ok(())
    }

    /// Removes what lower layers put in `dir` (relative to root), keeping this layer's entries.
    fn clear_dir(&self, dir: &Path) -> Result<(), ImageError> {
        let abs = self.root.join(dir);
        let listing = fs::read_dir(&abs).map_err(io_err("read directory", &abs))?;
        for child in listing {
            let child = child.map_err(io_err("read directory", &abs))?;
            let rel = dir.join(child.file_name());
            if !self.seen.contains(&rel) {
                let path = self.root.join(&rel);
                remove_any(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ImageError> {
        for (dir, mode) in &self.dir_modes {
            fs::set_permissions(dir, fs::Permissions::from_mode(*mode))
                .map_err(io_err("set the mode of", dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_like_docker() {
        let full = Some("docker.io/library/busybox:latest".to_string());
        for n in [
            "busybox",
            "busybox:latest",
            "library/busybox",
            "docker.io/library/busybox:latest",
            "index.docker.io/library/busybox",
            " busybox ",
        ] {
            assert_eq!(normalize_name(n), full, "{n}");
        }
        assert_eq!(
            normalize_name("ployz/web:v1").as_deref(),
            Some("docker.io/ployz/web:v1")
        );
        assert_eq!(
            normalize_name("localhost:5000/web").as_deref(),
            Some("localhost:5000/web:latest")
        );
        assert_eq!(
            normalize_name("ghcr.io/a/b/c:1.2").as_deref(),
            Some("ghcr.io/a/b/c:1.2")
        );
        assert_eq!(
            normalize_name("localhost/web").as_deref(),
            Some("localhost/web:latest")
        );
        assert_eq!(
            normalize_name("busybox@sha256:abc").as_deref(),
            Some("docker.io/library/busybox@sha256:abc")
        );
        for bad in ["", "  ", "a b", "busybox@", "ghcr.io/", ":tag", "x/"] {
            assert_eq!(normalize_name(bad), None, "{bad:?}");
        }
        assert_ne!(normalize_name("busybox:1.36"), full);
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(whiteout(b".wh..wh..opq"), Whiteout::Opaque);
        assert_eq!(whiteout(b".wh.motd"), Whiteout::Remove(b"motd"));
        assert_eq!(whiteout(b".wh..hidden"), Whiteout::Remove(b".hidden"));
        assert_eq!(whiteout(b".wh..wh.plnk"), Whiteout::Marker);
        assert_eq!(whiteout(b".wh.."), Whiteout::Marker);
        assert_eq!(whiteout(b".wh."), Whiteout::Marker);
        assert_eq!(whiteout(b"motd"), Whiteout::None);
        assert_eq!(whiteout(b"x.wh.y"), Whiteout::None);
    }

    #[test]
    fn entry_paths() {
        let c = entry_components(b"/./etc//passwd").unwrap();
        assert_eq!(c, vec![&b"etc"[..], &b"passwd"[..]]);
        assert_eq!(entry_components(b"./"), Some(vec![]));
        assert_eq!(entry_components(b"a/../b"), None);
        assert_eq!(entry_components(b"../../escape"), None);
    }

    #[test]
    fn archive_keys() {
        assert_eq!(
            archive_key("", b"./manifest.json").as_deref(),
            Some("manifest.json")
        );
        assert_eq!(
            archive_key("a", b"../b/layer.tar").as_deref(),
            Some("b/layer.tar")
        );
        assert_eq!(archive_key("a", b"/b").as_deref(), Some("b"));
        assert_eq!(archive_key("", b"../x"), None);
        assert_eq!(
            blob_member("sha256:ab12").as_deref(),
            Some("blobs/sha256/ab12")
        );
        assert_eq!(blob_member("sha256:../x"), None);
        assert_eq!(blob_member("nocolon"), None);
    }

    #[test]
    fn compression_magic() {
        assert_eq!(compression(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(compression(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(compression(b"bin/\0\0"), Compression::Plain);
        assert_eq!(compression(b""), Compression::Plain);
    }

    fn desc(digest: &str, os: &str, arch: &str) -> Descriptor {
        Descriptor {
            digest: digest.into(),
            size: None,
            annotations: HashMap::new(),
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
            }),
        }
    }

    #[test]
    fn platform_choice() {
        let mut attest = desc("sha256:att", "unknown", "unknown");
        attest.annotations.insert(
            "vnd.docker.reference.type".into(),
            "attestation-manifest".into(),
        );
        let list = vec![
            attest.clone(),
            desc("sha256:arm", "linux", "arm64"),
            desc("sha256:amd", "linux", "amd64"),
        ];
        assert_eq!(
            pick_descriptor(&list, "amd64").unwrap().digest,
            "sha256:amd"
        );
        assert_eq!(
            pick_descriptor(&list, "arm64").unwrap().digest,
            "sha256:arm"
        );
        assert_eq!(
            pick_descriptor(&list, "s390x").unwrap().digest,
            "sha256:arm"
        );
        assert_eq!(
            pick_descriptor(&[attest], "amd64").unwrap().digest,
            "sha256:att"
        );
        assert!(pick_descriptor(&[], "amd64").is_none());
    }

    #[test]
    fn names_from_annotations() {
        let mut a = HashMap::new();
        a.insert("org.opencontainers.image.ref.name".into(), "latest".into());
        assert_eq!(annotation_names(&a), vec!["latest"]);
        a.insert(
            "io.containerd.image.name".into(),
            "docker.io/library/busybox:latest".into(),
        );
        assert_eq!(
            annotation_names(&a),
            vec!["docker.io/library/busybox:latest"]
        );
        a.insert("org.opencontainers.image.ref.name".into(), "web:v1".into());
        assert_eq!(
            annotation_names(&a),
            vec!["docker.io/library/busybox:latest", "web:v1"]
        );
    }

    /// Whiteouts against a real directory: `.wh.x` deletes a lower file, an
    /// opaque marker empties a directory but keeps what this layer added.
    #[test]
    fn whiteouts_apply_to_lower_layers_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/gone"), "x").unwrap();
        fs::write(root.join("etc/kept"), "x").unwrap();
        fs::create_dir_all(root.join("data/sub")).unwrap();
        fs::write(root.join("data/old"), "x").unwrap();
        fs::write(root.join("data/sub/old"), "x").unwrap();

        let mut layer = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            layer.append_data(&mut h, path, data).unwrap();
        };
        add("etc/.wh.gone", b"");
        add("data/new", b"n");
        add("data/.wh..wh..opq", b"");
        add("missing/.wh.nothing", b"");
        let bytes = layer.into_inner().unwrap();

        let mut unpacker = Unpacker {
            root,
            layer: "test",
            seen: HashSet::new(),
            dir_modes: Vec::new(),
        };
        let mut archive = tar::Archive::new(&bytes[..]);
        for e in archive.entries().unwrap() {
            unpacker.apply(&mut e.unwrap()).unwrap();
        }
        unpacker.finish().unwrap();
        assert!(!root.join("etc/gone").exists());
        assert!(root.join("etc/kept").exists());
        assert!(root.join("data/new").exists());
        assert!(!root.join("data/old").exists());
        assert!(!root.join("data/sub").exists());
        assert!(!root.join("missing").exists());
    }

    #[test]
    fn digests() {
        let hex = "a".repeat(64);
        assert_eq!(digest_hex(&format!("sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(digest_hex(&hex), Some(hex.as_str()));
        assert_eq!(digest_hex("sha256:abc"), None);
        assert_eq!(digest_hex(&format!("sha256:{}", "A".repeat(64))), None);
        assert_eq!(digest_hex(&format!("sha256:../{}", "a".repeat(61))), None);
    }
}
