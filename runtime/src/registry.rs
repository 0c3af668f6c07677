//! Images from OCI registries.
//!
//! [`ImageRef::parse`] reads `[host[:port]/]repo[:tag][@sha256:digest]` with
//! Docker's defaults (`busybox` is `docker.io/library/busybox:latest`); it is
//! pure and tested without a registry. [`pull`] resolves a reference to one
//! image manifest (an index picks linux/amd64), fetches its config and layers
//! through `oci-client` (OCI and Docker v2 schema 2 manifests, plain, gzip
//! or zstd layers, told apart by their bytes by the store; basic and
//! bearer auth), checks the sha256 of every blob, and stores the result in the
//! [`ImageStore`] as a `docker save` archive: from then on the image is an
//! ordinary stored image (shipped between machines by digest, unpacked by the
//! host runtime, `docker load`ed by the docker runtime). Nothing is stored
//! unless every blob arrived whole and matched its digest.

use crate::image::{ImageError, ImageInfo, ImageStore};
use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

/// Docker Hub, the registry of a reference without a host.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]`; [`DOCKER_HUB`] when the reference names none.
    pub host: String,
    /// Repository path (`library/busybox` on Docker Hub for `busybox`).
    pub repository: String,
    /// Tag; `latest` when neither a tag nor a digest is given.
    pub tag: Option<String>,
    /// `sha256:<hex>` when the reference pins one.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses a reference the way Docker normalises it. The first path
    /// component is a host when it contains `.` or `:` or is `localhost`.
    pub fn parse(s: &str) -> Result<ImageRef, RegistryError> {
        let bad = |why: &'static str| RegistryError::InvalidReference {
            reference: s.to_string(),
            why,
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains whitespace"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or(bad("the digest must be sha256:<64 hex digits>"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("the digest must be sha256:<64 hex digits>"));
                }
                (rest, Some(format!("sha256:{}", hex.to_ascii_lowercase())))
            }
            None => (s, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), rest.to_string()),
        };
        if host.is_empty() {
            return Err(bad("the registry host is empty"));
        }
        if let Some((_, port)) = host.rsplit_once(':') {
            if port.parse::<u16>().is_err() {
                return Err(bad("the registry port is not a number"));
            }
        }
        // A tag follows the last `:` of the last path component.
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p.to_string(), Some(t.to_string())),
            _ => (path, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad("a tag is 1-128 letters, digits, `_`, `.` or `-`"));
            }
        }
        if path.is_empty()
            || path.split('/').any(|c| {
                c.is_empty()
                    || !c.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'_' | b'.' | b'-')
                    })
            })
        {
            return Err(bad(
                "a repository is lowercase letters, digits, `_`, `.`, `-` in `/`-separated parts",
            ));
        }
        let repository = if host == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(ImageRef {
            host,
            repository,
            tag,
            digest,
        })
    }

    /// Whether `s` names a registry explicitly (a host, or a digest):
    /// such a reference is always pulled, never looked up by name locally.
    pub fn names_registry(s: &str) -> bool {
        if s.contains('@') {
            return true;
        }
        matches!(s.split_once('/'), Some((first, _))
            if first.contains('.') || first.contains(':') || first == "localhost")
    }

    /// The canonical form: `host/repo[:tag][@digest]`.
    pub fn canonical(&self) -> String {
        let mut s = format!("{}/{}", self.host, self.repository);
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }

    /// The same image pinned to `digest` (what every machine runs).
    pub fn pinned(&self, digest: &str) -> ImageRef {
        ImageRef {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    fn oci(&self) -> Reference {
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(
                self.host.clone(),
                self.repository.clone(),
                t.clone(),
                d.clone(),
            ),
            (_, Some(d)) => {
                Reference::with_digest(self.host.clone(), self.repository.clone(), d.clone())
            }
            (t, None) => Reference::with_tag(
                self.host.clone(),
                self.repository.clone(),
                t.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }
}

/// How to reach one registry.
#[derive(Clone, Default)]
pub struct Access {
    /// Plain HTTP (only for hosts the user named insecure).
    pub insecure: bool,
    /// `(username, password)` for basic auth or the token flow.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("insecure", &self.insecure)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why a pull failed. Nothing was stored in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "`{reference}` is not an image reference: {why} \
         (use [host[:port]/]repo[:tag][@sha256:digest])"
    )]
    InvalidReference {
        reference: String,
        why: &'static str,
    },

    #[error("{reference} not found: registry {host} says: {message}")]
    NotFound {
        reference: String,
        host: String,
        message: String,
    },

    #[error(
        "registry {host} refused access to {reference}: {message}; check the credentials \
         (ployzctl registry login {host} --username U --password-stdin)"
    )]
    Unauthorized {
        reference: String,
        host: String,
        message: String,
    },

    #[error(
        "registry {host} is unreachable at {address}: {why}; check the address, or name a \
         plain-HTTP registry with `ployzctl registry add {host} --insecure`"
    )]
    Unreachable {
        host: String,
        address: String,
        why: String,
    },

    #[error(
        "{what} from registry {host} does not match its digest ({why}): refused, nothing stored"
    )]
    DigestMismatch {
        host: String,
        what: String,
        why: String,
    },

    #[error("registry {host}: {why}")]
    Protocol { host: String, why: String },

    #[error(transparent)]
    Store(#[from] ImageError),
}

/// How far a pull got, for progress reports: bytes of the image's blobs
/// received so far and their total (0 until the manifest is known); and the
/// archive as it is written, for readers that follow it (peers fetching the
/// image while it is still being pulled).
#[derive(Debug)]
pub struct PullProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub archive: Arc<tokio::sync::watch::Sender<ArchiveState>>,
}

impl Default for PullProgress {
    fn default() -> Self {
        PullProgress {
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            archive: Arc::new(tokio::sync::watch::Sender::new(ArchiveState::Waiting)),
        }
    }
}

/// A pull's archive seen from outside while it is written. The archive is
/// written front to back once: the first `written` bytes of `file` never
/// change again, so a reader may copy them (with `read_at`) at once.
#[derive(Debug, Clone)]
pub enum ArchiveState {
    /// Not started (the manifest comes first).
    Waiting,
    /// The first `written` bytes are in `file`. `layers`: the hex digests
    /// of the image's layers in order (members `blobs/sha256/<hex>`), for a
    /// reader that unpacks as it goes.
    Writing {
        file: Arc<File>,
        written: u64,
        layers: Arc<[String]>,
    },
    /// Whole, and stored as `digest`: `size` bytes, all in `file`.
    Done {
        file: Arc<File>,
        size: u64,
        digest: String,
        layers: Arc<[String]>,
    },
    /// The pull failed (nothing was stored): why.
    Failed(String),
}

/// A writer that counts what passes through it into `n`.
struct Counting<'a, W> {
    inner: W,
    n: &'a AtomicU64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.n.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A pulled image.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The reference pinned to the image manifest's digest.
    pub pinned: ImageRef,
    /// `sha256:` of the image manifest (linux/amd64 for an index).
    pub manifest_digest: String,
    /// The stored archive.
    pub info: ImageInfo,
    /// Bytes fetched from the registry (manifest excluded).
    pub fetched_bytes: u64,
    /// Time spent fetching (manifest and blobs) and storing (archive, checks).
    pub fetch_time: Duration,
    pub store_time: Duration,
    /// Whether the image's root filesystem was built on the way (see
    /// [`pull`]'s `unpack`).
    pub unpacked: bool,
}

fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first: keep that one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn client(r: &ImageRef, access: &Access) -> Client {
    install_crypto();
    Client::new(ClientConfig {
        protocol: if access.insecure {
            ClientProtocol::HttpsExcept(vec![r.host.clone()])
        } else {
            ClientProtocol::Https
        },
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    })
}

fn auth(access: &Access) -> RegistryAuth {
    match &access.credentials {
        Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        None => RegistryAuth::Anonymous,
    }
}

fn address(r: &ImageRef, access: &Access) -> String {
    let scheme = if access.insecure { "http" } else { "https" };
    let host = if r.host == DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        &r.host
    };
    format!("{scheme}://{host}/v2/")
}

/// Maps a client error to ours; `what` names the object fetched.
fn classify(r: &ImageRef, access: &Access, what: &str, e: OciDistributionError) -> RegistryError {
    let host = r.host.clone();
    let reference = r.canonical();
    match e {
        OciDistributionError::RegistryError { envelope, .. } => {
            let message = envelope
                .errors
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            let message = if message.is_empty() {
                envelope.to_string()
            } else {
                message
            };
            let unknown = envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            });
            let denied = envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied));
            if unknown {
                RegistryError::NotFound {
                    reference,
                    host,
                    message,
                }
            } else if denied {
                RegistryError::Unauthorized {
                    reference,
                    host,
                    message,
                }
            } else {
                RegistryError::Protocol {
                    host,
                    why: format!("{what}: {message}"),
                }
            }
        }
        OciDistributionError::ImageManifestNotFoundError(message) => RegistryError::NotFound {
            reference,
            host,
            message,
        },
        OciDistributionError::AuthenticationFailure(message) => RegistryError::Unauthorized {
            reference,
            host,
            message,
        },
        OciDistributionError::UnauthorizedError { url } => RegistryError::Unauthorized {
            reference,
            host,
            message: format!("401 Unauthorized at {url}"),
        },
        OciDistributionError::ServerError {
            code: 404, message, ..
        } => RegistryError::NotFound {
            reference,
            host,
            message,
        },
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        } => RegistryError::Unauthorized {
            reference,
            host,
            message,
        },
        OciDistributionError::DigestError(d) => RegistryError::DigestMismatch {
            host,
            what: what.to_string(),
            why: d.to_string(),
        },
        OciDistributionError::RequestError(req) if req.is_connect() || req.is_timeout() => {
            RegistryError::Unreachable {
                host,
                address: address(r, access),
                why: error_chain(&req),
            }
        }
        other => RegistryError::Protocol {
            host,
            why: format!("{what}: {}", error_chain(&other)),
        },
    }
}

/// Maps an error of a blob stream: a digest mismatch found at its end, or
/// the transfer breaking off.
fn classify_stream(r: &ImageRef, access: &Access, what: &str, e: io::Error) -> RegistryError {
    if let Some(d) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>())
    {
        return RegistryError::DigestMismatch {
            host: r.host.clone(),
            what: what.to_string(),
            why: d.to_string(),
        };
    }
    RegistryError::Protocol {
        host: r.host.clone(),
        why: format!(
            "{what}: the transfer from {} broke off: {}",
            address(r, access),
            error_chain(&e)
        ),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Tries `access` against the registry `host` without fetching anything
/// (`registry login`): `GET /v2/` with the credentials (basic), or the
/// token flow its `WWW-Authenticate` challenge names (bearer). A registry
/// that needs no credentials accepts any.
pub async fn check_login(host: &str, access: &Access) -> Result<(), RegistryError> {
    install_crypto();
    // A reference only to name the host (and a repository for the token scope).
    let r = ImageRef {
        host: host.to_string(),
        repository: "library/busybox".to_string(),
        tag: Some("latest".to_string()),
        digest: None,
    };
    let url = address(&r, access);
    let unreachable = |e: reqwest::Error| RegistryError::Unreachable {
        host: host.to_string(),
        address: url.clone(),
        why: error_chain(&e),
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| RegistryError::Protocol {
            host: host.to_string(),
            why: error_chain(&e),
        })?;
    let res = http.get(&url).send().await.map_err(unreachable)?;
    if res.status().is_success() {
        return Ok(());
    }
    let challenge = res
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let refused = |message: String| RegistryError::Unauthorized {
        reference: format!("{host}/v2/"),
        host: host.to_string(),
        message,
    };
    let Some((user, password)) = &access.credentials else {
        return Err(refused(format!("{} without credentials", res.status())));
    };
    if challenge.to_ascii_lowercase().starts_with("bearer") {
        // The token endpoint checks the credentials.
        return client(&r, access)
            .auth(&r.oci(), &auth(access), oci_client::RegistryOperation::Pull)
            .await
            .map(|_| ())
            .map_err(|e| classify(&r, access, "login", e));
    }
    let res = http
        .get(&url)
        .basic_auth(user, Some(password))
        .send()
        .await
        .map_err(unreachable)?;
    match res.status() {
        s if s.is_success() => Ok(()),
        s if s == reqwest::StatusCode::UNAUTHORIZED || s == reqwest::StatusCode::FORBIDDEN => {
            Err(refused(format!("{s} for user {user}")))
        }
        s => Err(RegistryError::Protocol {
            host: host.to_string(),
            why: format!("GET {url} answered {s}"),
        }),
    }
}

/// Resolves `r` to the digest of its image manifest (an index picks
/// linux/amd64) without fetching any layer.
pub async fn resolve(r: &ImageRef, access: &Access) -> Result<String, RegistryError> {
    let c = client(r, access);
    let (_, digest) = c
        .pull_image_manifest(&r.oci(), &auth(access))
        .await
        .map_err(|e| classify(r, access, "manifest", e))?;
    Ok(digest)
}

/// Pulls `r` into `store` (see the module docs). The archive is written in
/// the store's temp directory and removed on any failure.
pub async fn pull(
    store: &ImageStore,
    r: &ImageRef,
    access: &Access,
    progress: &PullProgress,
    unpack: bool,
) -> Result<Pulled, RegistryError> {
    match pull_and_store(store, r, access, progress, unpack).await {
        Ok((pulled, file, layers)) => {
            progress.archive.send_replace(ArchiveState::Done {
                file,
                size: pulled.info.size,
                digest: pulled.info.digest.clone(),
                layers,
            });
            Ok(pulled)
        }
        Err(e) => {
            progress
                .archive
                .send_replace(ArchiveState::Failed(e.to_string()));
            Err(e)
        }
    }
}

async fn pull_and_store(
    store: &ImageStore,
    r: &ImageRef,
    access: &Access,
    progress: &PullProgress,
    unpack: bool,
) -> Result<(Pulled, Arc<File>, Arc<[String]>), RegistryError> {
    let started = std::time::Instant::now();
    let c = client(r, access);
    let a = auth(access);
    let (manifest, digest) = c
        .pull_image_manifest(&r.oci(), &a)
        .await
        .map_err(|e| classify(r, access, "manifest", e))?;
    let pinned = r.pinned(&digest);
    let oref = pinned.oci();
    let total: i64 = std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        .map(|d| d.size.max(0))
        .sum();
    progress.total.store(total as u64, Ordering::Relaxed);
    let dir = store.temp_path();
    fs::create_dir(&dir).map_err(|e| store_io("create", &dir, e))?;
    let res = fetch_and_pack(
        store,
        &c,
        &oref,
        r,
        access,
        &manifest.config,
        &manifest.layers,
        &dir,
        &pinned,
        progress,
        unpack,
    )
    .await;
    let _ = fs::remove_dir_all(&dir);
    let (info, file, fetched_bytes, store_time, unpacked) = res?;
    let layers = layer_hexes(&manifest.layers);
    let pulled = Pulled {
        pinned,
        manifest_digest: digest,
        info,
        fetched_bytes,
        fetch_time: started.elapsed().saturating_sub(store_time),
        store_time,
        unpacked,
    };
    Ok((pulled, file, layers))
}

/// The hex digests of `layers` (those that are sha256; a pull refuses others).
fn layer_hexes(layers: &[OciDescriptor]) -> Arc<[String]> {
    layers
        .iter()
        .filter_map(|d| d.digest.strip_prefix("sha256:"))
        .map(str::to_string)
        .collect()
}

/// A directory removed when dropped (unless moved away before).
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One member of the archive, handed to the packing thread in order.
enum Pack {
    /// A blob arriving from the registry: `size` bytes through `rx`.
    Stream {
        hex: String,
        size: u64,
        rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    },
    /// A blob already in a file.
    File { hex: String, path: PathBuf },
    /// Every member was handed over: write `manifest.json`, end the archive.
    Finish { manifest: Vec<u8> },
}

/// Fetches the config and layers and writes the archive while they arrive
/// (one pass over each byte: the layers go from the network into the archive,
/// through the diff_id check, never into a file of their own), then stores it.
/// Returns the stored image, the archive's file (kept open for those
/// following [`PullProgress::archive`]), the bytes fetched, and the time spent
/// storing after the last byte arrived.
#[allow(clippy::too_many_arguments)]
async fn fetch_and_pack(
    store: &ImageStore,
    c: &Client,
    oref: &Reference,
    r: &ImageRef,
    access: &Access,
    config: &OciDescriptor,
    layers: &[OciDescriptor],
    dir: &Path,
    pinned: &ImageRef,
    progress: &PullProgress,
    unpack: bool,
) -> Result<(ImageInfo, Arc<File>, u64, Duration, bool), RegistryError> {
    // The tree built on the way: adopted by the store, else removed here.
    let guard = match unpack {
        true => Some(WorkDir(store.rootfs_work_dir()?)),
        false => None,
    };
    let work = guard.as_ref().map(|w| w.0.as_path());
    let archive = store.temp_path();
    let file = Arc::new(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&archive)
            .map_err(|e| store_io("create", &archive, e))?,
    );
    let (pack_tx, pack_rx) = tokio::sync::mpsc::channel::<Pack>(4);
    let packer = {
        let out = Tapped {
            file: file.clone(),
            written: 0,
            tap: Some((progress.archive.clone(), layer_hexes(layers))),
        };
        tokio::task::spawn_blocking(move || pack(out, pack_rx))
    };
    let fetched = fetch_members(
        c, oref, r, access, config, layers, dir, progress, &pack_tx, work,
    )
    .await;
    let name = match &pinned.tag {
        Some(t) => format!("{}/{}:{t}", pinned.host, pinned.repository),
        None => pinned.canonical(),
    };
    if let Ok((members, ..)) = &fetched {
        let manifest =
            archive_manifest(members, &name).map_err(|e| store_io("write", &archive, e))?;
        // A packer that stopped has its error to tell (below).
        let _ = pack_tx.send(Pack::Finish { manifest }).await;
    }
    drop(pack_tx);
    let packed = packer.await.map_err(|e| RegistryError::Protocol {
        host: r.host.clone(),
        why: format!("writing the image archive failed: {e}"),
    })?;
    let storing = std::time::Instant::now();
    let result = match (fetched, packed) {
        (Err(Some(e)), _) => Err(e),
        (_, Err(e)) => Err(store_io("write", &archive, e)),
        (Err(None), Ok(_)) | (Ok(_), Ok(None)) => Err(store_io(
            "write",
            &archive,
            io::Error::other("the archive writer stopped early"),
        )),
        (Ok((_, fetched, diff_ids_checked, built)), Ok(Some(digest))) => {
            let store2 = store.clone();
            let archive2 = archive.clone();
            let built = work.filter(|_| built).map(Path::to_path_buf);
            tokio::task::spawn_blocking(move || {
                let info = store2.insert_packed(&archive2, &digest, diff_ids_checked)?;
                // Every layer was applied in order on the way in: that tree
                // is the image's root filesystem.
                let unpacked = match built {
                    Some(w) => match store2.adopt_rootfs(&info.digest, &w) {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::debug!(error = %e, "root filesystem built during the pull not kept");
                            false
                        }
                    },
                    None => false,
                };
                Ok::<_, RegistryError>((info, unpacked))
            })
            .await
            .map_err(|e| RegistryError::Protocol {
                host: r.host.clone(),
                why: format!("storing the image failed: {e}"),
            })?
            .map(|(info, unpacked)| (info, fetched, unpacked))
        }
    };
    // Renamed into the store on success; a leftover otherwise.
    let _ = fs::remove_file(&archive);
    let (info, fetched, unpacked) = result?;
    Ok((info, file, fetched, storing.elapsed(), unpacked))
}

/// Fetches every blob of the image in archive order and hands each to the
/// packer. Returns the members (hex digests, config first), the bytes
/// fetched and whether every layer's diff_id was checked on the way; `None`
/// as the error when the packer stopped (its own error says why).
#[allow(clippy::too_many_arguments)]
async fn fetch_members(
    c: &Client,
    oref: &Reference,
    r: &ImageRef,
    access: &Access,
    config: &OciDescriptor,
    layers: &[OciDescriptor],
    dir: &Path,
    progress: &PullProgress,
    pack: &tokio::sync::mpsc::Sender<Pack>,
    work: Option<&Path>,
) -> Result<(Vec<String>, u64, bool, bool), Option<RegistryError>> {
    use futures_util::StreamExt;
    let mut fetched = 0u64;
    let mut members = Vec::new();
    let mut diff_ids_checked = true;
    // The config's diff_ids, once it is here: each layer is decompressed and
    // hashed on a blocking thread while it downloads, so the archive needs
    // no second reading before it is stored.
    let mut diff_ids: Option<Vec<String>> = None;
    // Layer blob hex -> the diff_id its bytes unpacked to.
    let mut unpacked_to: std::collections::HashMap<String, String> = Default::default();
    let mut seen = std::collections::HashSet::new();
    // Whether `work` holds every layer so far, applied in order.
    let mut built = work.is_some();
    for (i, (what, desc)) in std::iter::once(("config", config))
        .chain(layers.iter().map(|l| ("layer", l)))
        .enumerate()
    {
        let hex = desc
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| RegistryError::Protocol {
                host: r.host.clone(),
                why: format!("{what} digest `{}` is not sha256", desc.digest),
            })?
            .to_string();
        if seen.insert(hex.clone()) {
            let what_d = format!("{what} {}", desc.digest);
            // The stream checks the blob's digest (once, also when the
            // registry's Docker-Content-Digest header names the same one)
            // and fails at its end on a mismatch.
            let mut stream = c
                .pull_blob_stream(oref, desc)
                .await
                .map_err(|e| classify(r, access, &what_d, e))?
                .stream;
            let (tx, verifier) = match (i, &diff_ids) {
                (1.., Some(_)) => {
                    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
                    let layer = what_d.clone();
                    let reader = ChunkReader {
                        rx,
                        cur: bytes::Bytes::new(),
                    };
                    let root = work.filter(|_| built).map(Path::to_path_buf);
                    let h = tokio::task::spawn_blocking(move || match root {
                        Some(root) => crate::image::layer_diff_id_unpacking(reader, &layer, &root),
                        None => crate::image::layer_diff_id(reader, &layer).map(|d| (d, false)),
                    });
                    (Some(tx), Some(h))
                }
                _ => (None, None),
            };
            if i > 0 && verifier.is_none() {
                built = false;
            }
            let mismatch = |len: u64| RegistryError::DigestMismatch {
                host: r.host.clone(),
                what: what_d.clone(),
                why: format!("{len} bytes, the manifest says {}", desc.size),
            };
            let len = match u64::try_from(desc.size) {
                // A layer of known size: into the archive as it arrives.
                Ok(size) if i > 0 => {
                    let (ptx, prx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
                    pack.send(Pack::Stream {
                        hex: hex.clone(),
                        size,
                        rx: prx,
                    })
                    .await
                    .map_err(|_| None)?;
                    let mut len = 0u64;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| classify_stream(r, access, &what_d, e))?;
                        len += chunk.len() as u64;
                        if len > size {
                            return Err(Some(mismatch(len)));
                        }
                        progress
                            .done
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        if let Some(tx) = &tx {
                            // A verifier that stopped has its error to tell.
                            let _ = tx.send(chunk.clone()).await;
                        }
                        ptx.send(chunk).await.map_err(|_| None)?;
                    }
                    len
                }
                // The config (read for its diff_ids first), or a blob of
                // unknown size: to a file, then into the archive.
                _ => {
                    use tokio::io::AsyncWriteExt;
                    let path = dir.join(&hex);
                    let f = tokio::fs::File::create(&path)
                        .await
                        .map_err(|e| store_io("create", &path, e))?;
                    // Whole megabytes to the file (a tokio file write is a
                    // trip to the blocking pool; the network hands over
                    // ~16 KiB at a time).
                    let mut out = tokio::io::BufWriter::with_capacity(
                        1 << 20,
                        Counting {
                            inner: f,
                            n: &progress.done,
                        },
                    );
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| classify_stream(r, access, &what_d, e))?;
                        if let Some(tx) = &tx {
                            let _ = tx.send(chunk.clone()).await;
                        }
                        out.write_all(&chunk)
                            .await
                            .map_err(|e| store_io("write", &path, e))?;
                    }
                    out.flush().await.map_err(|e| store_io("write", &path, e))?;
                    let len = fs::metadata(&path)
                        .map_err(|e| store_io("read", &path, e))?
                        .len();
                    if i == 0 {
                        diff_ids = config_diff_ids(&path, layers.len());
                    }
                    pack.send(Pack::File {
                        hex: hex.clone(),
                        path,
                    })
                    .await
                    .map_err(|_| None)?;
                    len
                }
            };
            drop(tx);
            if let Some(h) = verifier {
                let got = h
                    .await
                    .map_err(|e| RegistryError::Protocol {
                        host: r.host.clone(),
                        why: format!("checking {what_d} failed: {e}"),
                    })?
                    .map_err(RegistryError::Store)?;
                built &= got.1;
                unpacked_to.insert(hex.clone(), got.0);
            }
            if desc.size >= 0 && len != desc.size as u64 {
                return Err(Some(mismatch(len)));
            }
            fetched += len;
        } else if i > 0 {
            // A layer listed twice is applied twice by `rootfs`.
            built = false;
        }
        if let (1.., Some(want)) = (i, &diff_ids) {
            let want = &want[i - 1];
            match unpacked_to.get(&hex) {
                Some(got) if got == want => {}
                Some(got) => {
                    return Err(Some(RegistryError::DigestMismatch {
                        host: r.host.clone(),
                        what: format!("layer {}", desc.digest),
                        why: format!(
                            "it unpacks to {got} but the image config's diff_ids say {want}"
                        ),
                    }))
                }
                // Not checked on the way in: the store checks it.
                None => diff_ids_checked = false,
            }
        }
        members.push(hex);
    }
    let checked = diff_ids_checked && diff_ids.is_some();
    Ok((members, fetched, checked, built && checked))
}

/// The diff_ids of the image config at `path`, when it lists one per layer
/// (else the store checks the layers after the pull, and reports what is
/// wrong with the config).
fn config_diff_ids(path: &Path, layers: usize) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    // Image metadata is small; the store refuses a config this large itself.
    if fs::metadata(path).ok()?.len() > 16 << 20 {
        return None;
    }
    let c: Config = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    (c.rootfs.diff_ids.len() == layers).then_some(c.rootfs.diff_ids)
}

/// The bytes of a blob as they download, for a blocking reader.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

fn store_io(what: &'static str, path: &Path, source: io::Error) -> RegistryError {
    RegistryError::Store(ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The archive's file as its writer sees it: every write is told to
/// [`PullProgress::archive`]'s followers (whole buffers of the `BufWriter`
/// above it, so about once per MiB).
struct Tapped {
    file: Arc<File>,
    written: u64,
    /// Where to tell, and the layers to tell with it.
    tap: Option<(ArchiveTap, Arc<[String]>)>,
}

type ArchiveTap = Arc<tokio::sync::watch::Sender<ArchiveState>>;

impl Write for Tapped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&*self.file).write(buf)?;
        self.written += n as u64;
        if let Some((tap, layers)) = &self.tap {
            tap.send_replace(ArchiveState::Writing {
                file: self.file.clone(),
                written: self.written,
                layers: layers.clone(),
            });
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer to a file that hashes what passes through it and starts the
/// file's writeback every [`crate::image::WRITEBACK_EVERY`] bytes.
struct Hashing {
    inner: BufWriter<Tapped>,
    sha: sha2::Sha256,
    unsynced: u64,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.unsynced += n as u64;
        if self.unsynced >= crate::image::WRITEBACK_EVERY {
            self.inner.flush()?;
            crate::image::start_writeback(&self.inner.get_ref().file);
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that counts what it hands out.
struct Measured<R> {
    inner: R,
    n: u64,
}

impl<R: io::Read> io::Read for Measured<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

fn blob_member(hex: &str) -> String {
    format!("blobs/sha256/{hex}")
}

fn member_header(size: u64, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// `manifest.json` of the archive: the config and the layers (in order).
fn archive_manifest(members: &[String], name: &str) -> io::Result<Vec<u8>> {
    let manifest = serde_json::json!([{
        "Config": blob_member(&members[0]),
        "RepoTags": [name],
        "Layers": members[1..].iter().map(|h| blob_member(h)).collect::<Vec<_>>(),
    }]);
    Ok(serde_json::to_vec(&manifest)?)
}

/// Writes a `docker save` archive front to back: the `blobs/` directories,
/// each blob once as `blobs/sha256/<hex>` (in the order given), then
/// `manifest.json`; every member 0644, mtime 0. Every machine that packs the
/// same image writes the same bytes (the service record pins the archive's
/// digest, and a machine that pulls it itself must arrive at that digest).
struct Packer {
    tar: tar::Builder<Hashing>,
    written: std::collections::HashSet<String>,
}

impl Packer {
    fn new(out: Tapped) -> io::Result<Packer> {
        use sha2::Digest;
        let mut tar = tar::Builder::new(Hashing {
            inner: BufWriter::with_capacity(1 << 20, out),
            sha: sha2::Sha256::new(),
            unsynced: 0,
        });
        for d in ["blobs/", "blobs/sha256/"] {
            let mut h = member_header(0, tar::EntryType::Directory);
            tar.append_data(&mut h, d, io::empty())?;
        }
        Ok(Packer {
            tar,
            written: Default::default(),
        })
    }

    /// Appends blob `hex` (`size` bytes from `data`) unless it is in already.
    fn member(&mut self, hex: &str, size: u64, data: impl io::Read) -> io::Result<()> {
        if !self.written.insert(hex.to_string()) {
            return Ok(());
        }
        let mut data = Measured { inner: data, n: 0 };
        let mut h = member_header(size, tar::EntryType::Regular);
        self.tar.append_data(&mut h, blob_member(hex), &mut data)?;
        if data.n != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("blob {hex}: {} bytes, the manifest says {size}", data.n),
            ));
        }
        Ok(())
    }

    /// Ends the archive, makes it durable and returns its `sha256:<hex>`.
    fn finish(mut self, manifest: &[u8]) -> io::Result<String> {
        use sha2::Digest;
        let mut h = member_header(manifest.len() as u64, tar::EntryType::Regular);
        self.tar.append_data(&mut h, "manifest.json", manifest)?;
        let mut w = self.tar.into_inner()?;
        w.flush()?;
        let digest = format!("sha256:{:x}", w.sha.finalize());
        let out = w.inner.into_inner().map_err(|e| e.into_error())?;
        out.file.sync_all()?;
        Ok(digest)
    }
}

/// The packing thread of a pull: members as they come, `Ok(None)` when the
/// pull stopped before [`Pack::Finish`].
fn pack(out: Tapped, mut rx: tokio::sync::mpsc::Receiver<Pack>) -> io::Result<Option<String>> {
    let mut p = Packer::new(out)?;
    while let Some(m) = rx.blocking_recv() {
        match m {
            Pack::Stream { hex, size, rx } => p.member(
                &hex,
                size,
                ChunkReader {
                    rx,
                    cur: bytes::Bytes::new(),
                },
            )?,
            Pack::File { hex, path } => {
                let f = File::open(&path)?;
                let size = f.metadata()?.len();
                p.member(&hex, size, f)?
            }
            Pack::Finish { manifest } => return p.finish(&manifest).map(Some),
        }
    }
    Ok(None)
}

/// Packs the blobs in `dir` (named by hex) into an archive at `out`, as a
/// pull does; returns its digest.
#[cfg(test)]
fn write_archive(out: &Path, dir: &Path, members: &[String], name: &str) -> io::Result<String> {
    let mut p = Packer::new(Tapped {
        file: Arc::new(File::create(out)?),
        written: 0,
        tap: None,
    })?;
    for hex in members {
        let f = File::open(dir.join(hex))?;
        let size = f.metadata()?.len();
        p.member(hex, size, f)?;
    }
    p.finish(&archive_manifest(members, name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("busybox");
        assert_eq!(r.host, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.canonical(), "docker.io/library/busybox:latest");
        assert_eq!(p("nginx:1.25").canonical(), "docker.io/library/nginx:1.25");
        assert_eq!(
            p("bitnami/redis").canonical(),
            "docker.io/bitnami/redis:latest"
        );
    }

    #[test]
    fn hosts_ports_tags_and_digests() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = p(&format!("10.0.0.1:5000/team/app:v1@{d}"));
        assert_eq!(r.host, "10.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        let r = p(&format!("ghcr.io/o/app@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.canonical(), format!("ghcr.io/o/app@{d}"));
        let r = p("localhost/app");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str()),
            ("localhost", "app")
        );
        assert_eq!(p("localhost:5000/a/b:c").tag.as_deref(), Some("c"));
        // A host with a port but no tag: the `:` belongs to the host.
        assert_eq!(p("reg.example:443/app").tag.as_deref(), Some("latest"));
    }

    #[test]
    fn names_registry_only_with_a_host_or_digest() {
        assert!(!ImageRef::names_registry("busybox"));
        assert!(!ImageRef::names_registry("library/busybox:1"));
        assert!(ImageRef::names_registry("127.0.0.1:5000/busybox"));
        assert!(ImageRef::names_registry("localhost/busybox"));
        assert!(ImageRef::names_registry("docker.io/library/busybox"));
        assert!(ImageRef::names_registry(&format!(
            "busybox@sha256:{}",
            "0".repeat(64)
        )));
    }

    #[test]
    fn refuses_malformed_references() {
        for bad in [
            "",
            "Upper/case",
            "a b",
            "host:port/app",
            "app@sha256:123",
            "app@md5:0123",
            "app:",
            "app:-x",
            "reg.io//app",
            "reg.io/",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    /// The digest written along is the archive's, and the archive is what
    /// `insert_packed` stores under it.
    #[test]
    fn packed_archive_digest_is_computed_while_writing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        fs::create_dir(&blobs).unwrap();
        let layer = {
            let mut t = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(5);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
            t.into_inner().unwrap()
        };
        let hex = |b: &[u8]| {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(b))
        };
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", hex(&layer))]},
        })
        .to_string()
        .into_bytes();
        fs::write(blobs.join(hex(&config)), &config).unwrap();
        fs::write(blobs.join(hex(&layer)), &layer).unwrap();
        let out = dir.path().join("image.tar");
        let members = [hex(&config), hex(&layer)];
        let digest = write_archive(&out, &blobs, &members, "reg.example/app:1").unwrap();
        assert_eq!(digest, crate::image::sha256_file(&out).unwrap());
        // The archive's bytes are part of the protocol between machines:
        // one that pulls a pinned image itself must arrive at the digest the
        // service record names (this one was written by the packer before
        // pulls streamed into the archive).
        assert_eq!(
            digest,
            "sha256:903749fc2961b15e1e0d0f99878e47f83f78d0e3c235d6d583818bfa1e978a71"
        );
        let store = ImageStore::open(dir.path().join("store")).unwrap();
        let tmp = store.temp_path();
        fs::copy(&out, &tmp).unwrap();
        let info = store.insert_packed(&tmp, &digest, false).unwrap();
        assert_eq!(info.digest, digest);
        assert_eq!(info.names, ["reg.example/app:1"]);
    }

    #[test]
    fn access_debug_hides_the_password() {
        let a = Access {
            insecure: true,
            credentials: Some(("u".into(), "hunter2".into())),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
