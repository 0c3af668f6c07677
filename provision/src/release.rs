//! Release locations: where `ployzd-<target>` binaries and their checksums
//! are published, and how to lay one out ([`pack_release`]).
//!
//! Layout (identical for `file://` and `http(s)://`):
//!
//! ```text
//! <url>/latest                                  the newest version, one line
//! <url>/<version>/ployzd-<target>               e.g. ployzd-x86_64-unknown-linux-musl
//! <url>/<version>/ployzd-<target>.sha256        "<hex>  ployzd-<target>" (sha256sum format)
//! <url>/<version>/ployzctl-<target>[.sha256]
//! ```
//!
//! Everything is fetched on the initiating machine (HTTP with `reqwest`,
//! rustls + ring, the system's CA roots; `file://` read locally), verified against its sha256, and
//! only then uploaded to targets: targets need no HTTP client and no route to
//! the release server.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Used when neither `--release-url` nor `PLOYZ_RELEASE_URL` is set.
pub const DEFAULT_RELEASE_URL: &str = "https://github.com/ployz/ployz/releases/download";
/// The environment variable overriding the release location.
pub const RELEASE_URL_ENV: &str = "PLOYZ_RELEASE_URL";
/// Artifacts larger than this are refused (a release binary is ~10 MB).
pub const MAX_ARTIFACT_BYTES: u64 = 512 << 20;

/// Where releases are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseLocation {
    /// A directory on the initiating machine (`file:///srv/ployz`).
    File(PathBuf),
    /// A base URL (`https://example.com/ployz`), no trailing slash.
    Http(String),
}

impl fmt::Display for ReleaseLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReleaseLocation::File(p) => write!(f, "file://{}", p.display()),
            ReleaseLocation::Http(u) => f.write_str(u),
        }
    }
}

impl FromStr for ReleaseLocation {
    type Err = ReleaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(ReleaseError::BadUrl {
                    url: s.into(),
                    reason: "a file:// URL needs an absolute path (file:///srv/ployz)",
                });
            }
            return Ok(ReleaseLocation::File(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(ReleaseLocation::File(PathBuf::from(s)));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(ReleaseLocation::Http(s.trim_end_matches('/').to_string()));
        }
        Err(ReleaseError::BadUrl {
            url: s.into(),
            reason: "use file:///path, http://... or https://...",
        })
    }
}

impl ReleaseLocation {
    /// `--release-url` if given, else `$PLOYZ_RELEASE_URL`, else the default.
    pub fn from_flag_or_env(flag: Option<&str>) -> Result<ReleaseLocation, ReleaseError> {
        match flag {
            Some(f) => f.parse(),
            None => match std::env::var(RELEASE_URL_ENV) {
                Ok(v) if !v.trim().is_empty() => v.parse(),
                _ => DEFAULT_RELEASE_URL.parse(),
            },
        }
    }

    fn describe(&self, rel: &str) -> String {
        match self {
            ReleaseLocation::File(p) => p.join(rel).display().to_string(),
            ReleaseLocation::Http(u) => format!("{u}/{rel}"),
        }
    }

    /// Read one file of the release location. `Ok(None)` when it does not
    /// exist (404 / no such file).
    pub async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, ReleaseError> {
        match self {
            ReleaseLocation::File(dir) => match tokio::fs::read(dir.join(rel)).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ReleaseError::Fetch {
                    url: self.describe(rel),
                    reason: e.to_string(),
                }),
            },
            ReleaseLocation::Http(base) => {
                let url = format!("{base}/{rel}");
                http_get(&url).await
            }
        }
    }
}

async fn http_get(url: &str) -> Result<Option<Vec<u8>>, ReleaseError> {
    let fetch_err = |reason: String| ReleaseError::Fetch {
        url: url.to_string(),
        reason,
    };
    // rustls' one provider in this process: ring (a no-op when already set).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .connect_timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| fetch_err(error_chain(&e)))?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| fetch_err(error_chain(&e)))?;
    match resp.status().as_u16() {
        200 => {}
        404 => return Ok(None),
        status => return Err(fetch_err(format!("HTTP status {status}"))),
    }
    let too_big = || fetch_err(format!("larger than {MAX_ARTIFACT_BYTES} bytes"));
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ARTIFACT_BYTES)
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fetch_err(error_chain(&e)))? {
        if (body.len() + chunk.len()) as u64 > MAX_ARTIFACT_BYTES {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// An error with its causes (`reqwest` puts the useful part in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("invalid release URL `{url}`: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot fetch {url}: {reason}; check the release URL (--release-url / PLOYZ_RELEASE_URL) and the network")]
    Fetch { url: String, reason: String },
    #[error("{location} has no `latest` file naming the newest version; pass --install-version, or publish one with `ployzctl release pack`")]
    NoLatest { location: String },
    #[error("version `{version}` has no {binary} for {targets} at {location}; check the version, or publish a build for this architecture")]
    NotFound {
        location: String,
        version: String,
        binary: String,
        targets: String,
    },
    #[error("{url} has no checksum file ({url}.sha256); refusing to install an unverified binary — republish the release with its .sha256 files")]
    NoChecksum { url: String },
    #[error(transparent)]
    Checksum(#[from] ChecksumError),
    #[error("invalid version `{0}`: use a name like 0.4.2 (no `/`, not `latest`)")]
    BadVersion(String),
    #[error("cannot write the release at {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot read the binary {path} to pack: {source}; build it first (`cargo build --release`)"
    )]
    ReadBinary {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChecksumError {
    #[error("checksum mismatch for {name}: expected sha256 {expected}, got {actual}; the download is corrupt or was tampered with — nothing was installed, retry or check the release")]
    Mismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error(
        "the checksum file for {name} is malformed (want `<64 hex digits>  {name}`): {line:?}"
    )]
    Malformed { name: String, line: String },
}

/// Lowercase hex sha256 (ring's: assembly even in debug builds, where a
/// pure-Rust digest of a 60 MB debug binary takes seconds).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Check `bytes` against a sha256sum-format checksum file for `name`.
/// Accepts a bare hash, or `hash  name` / `hash *name` lines (the line for
/// `name` is used when there are several).
pub fn verify_sha256(
    name: &str,
    bytes: &[u8],
    checksum_file: &str,
) -> Result<String, ChecksumError> {
    let malformed = |line: &str| ChecksumError::Malformed {
        name: name.to_string(),
        line: line.chars().take(200).collect(),
    };
    let lines: Vec<&str> = checksum_file
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = match lines.as_slice() {
        [] => return Err(malformed("")),
        [one] => *one,
        many => many
            .iter()
            .find(|l| {
                l.split_whitespace()
                    .nth(1)
                    .map(|n| n.trim_start_matches('*'))
                    == Some(name)
            })
            .copied()
            .ok_or_else(|| malformed(many[0]))?,
    };
    let mut parts = line.split_whitespace();
    let expected = parts.next().unwrap_or("").to_ascii_lowercase();
    if expected.len() != 64 || !expected.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(malformed(line));
    }
    if let Some(n) = parts.next() {
        if n.trim_start_matches('*') != name {
            return Err(malformed(line));
        }
    }
    let actual = sha256_hex(bytes);
    if actual != expected {
        return Err(ChecksumError::Mismatch {
            name: name.to_string(),
            expected,
            actual,
        });
    }
    Ok(actual)
}

/// A verified binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// `ployzd-x86_64-unknown-linux-musl`
    pub file_name: String,
    /// The target triple it was built for.
    pub triple: String,
    pub version: String,
    pub bytes: Vec<u8>,
    pub sha256: String,
}

fn check_version(v: &str) -> Result<(), ReleaseError> {
    if v.is_empty()
        || v == "latest"
        || v.starts_with('.')
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
    {
        return Err(ReleaseError::BadVersion(v.to_string()));
    }
    Ok(())
}

/// `latest` → the version named by the location's `latest` file; anything
/// else is returned as given (after validation).
pub async fn resolve_version(loc: &ReleaseLocation, version: &str) -> Result<String, ReleaseError> {
    if version != "latest" {
        check_version(version)?;
        return Ok(version.to_string());
    }
    let bytes = loc
        .get("latest")
        .await?
        .ok_or_else(|| ReleaseError::NoLatest {
            location: loc.to_string(),
        })?;
    let v = String::from_utf8_lossy(&bytes).trim().to_string();
    check_version(&v)?;
    Ok(v)
}

/// Fetch `binary` (e.g. `ployzd`) of `version` for the first of `triples`
/// that the release has, and verify it against its `.sha256`.
pub async fn fetch_binary(
    loc: &ReleaseLocation,
    version: &str,
    binary: &str,
    triples: &[String],
) -> Result<Artifact, ReleaseError> {
    check_version(version)?;
    for triple in triples {
        let file_name = format!("{binary}-{triple}");
        let rel = format!("{version}/{file_name}");
        let Some(bytes) = loc.get(&rel).await? else {
            continue;
        };
        let sum =
            loc.get(&format!("{rel}.sha256"))
                .await?
                .ok_or_else(|| ReleaseError::NoChecksum {
                    url: loc.describe(&rel),
                })?;
        let sha256 = verify_sha256(&file_name, &bytes, &String::from_utf8_lossy(&sum))?;
        return Ok(Artifact {
            file_name,
            triple: triple.clone(),
            version: version.to_string(),
            bytes,
            sha256,
        });
    }
    Err(ReleaseError::NotFound {
        location: loc.to_string(),
        version: version.to_string(),
        binary: binary.to_string(),
        targets: triples.join(" or "),
    })
}

/// What [`pack_release`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRelease {
    /// `file://<out_dir>`, usable as a release URL.
    pub url: String,
    pub version: String,
    /// Binaries and checksum files written.
    pub files: Vec<PathBuf>,
    /// Whether `latest` now names this version.
    pub latest: bool,
}

/// The target triple of this build of Ployz (what `ployzctl release pack`
/// labels local binaries with).
pub fn host_triple() -> String {
    let env = if cfg!(target_env = "musl") {
        "musl"
    } else {
        "gnu"
    };
    format!("{}-unknown-linux-{env}", std::env::consts::ARCH)
}

/// Order versions: dot/dash-separated parts, numerically where both are
/// numbers. Enough for `latest` bookkeeping (0.10.0 > 0.9.1).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<String> {
        s.trim_start_matches('v')
            .split(['.', '-', '+'])
            .map(str::to_string)
            .collect()
    };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Lay out a release location in `out_dir`: for each `(name, path)` (name
/// e.g. `ployzd`) write `<version>/<name>-<triple>` (mode 0755) and its
/// `.sha256`, each through a temporary file and a rename; point `latest` at
/// `version` unless it names a newer one.
pub fn pack_release(
    out_dir: &Path,
    version: &str,
    triple: &str,
    binaries: &[(&str, &Path)],
) -> Result<PackedRelease, ReleaseError> {
    use std::os::unix::fs::PermissionsExt as _;
    check_version(version)?;
    let vdir = out_dir.join(version);
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReleaseError::Write { path, source }
    };
    std::fs::create_dir_all(&vdir).map_err(werr(&vdir))?;
    let write_atomic = |path: &Path, bytes: &[u8], mode: u32| -> Result<(), ReleaseError> {
        let tmp = path.with_extension("tmp-pack");
        std::fs::write(&tmp, bytes).map_err(werr(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(werr(&tmp))?;
        std::fs::rename(&tmp, path).map_err(werr(path))
    };
    let mut files = Vec::new();
    for (name, src) in binaries {
        let bytes = std::fs::read(src).map_err(|source| ReleaseError::ReadBinary {
            path: src.to_path_buf(),
            source,
        })?;
        let file_name = format!("{name}-{triple}");
        let bin = vdir.join(&file_name);
        write_atomic(&bin, &bytes, 0o755)?;
        let sum = vdir.join(format!("{file_name}.sha256"));
        write_atomic(
            &sum,
            format!("{}  {file_name}\n", sha256_hex(&bytes)).as_bytes(),
            0o644,
        )?;
        files.push(bin);
        files.push(sum);
    }
    let latest_path = out_dir.join("latest");
    let current = std::fs::read_to_string(&latest_path)
        .ok()
        .map(|s| s.trim().to_string());
    let latest = match &current {
        Some(c) if !c.is_empty() => version_cmp(version, c) != std::cmp::Ordering::Less,
        _ => true,
    };
    if latest {
        write_atomic(&latest_path, format!("{version}\n").as_bytes(), 0o644)?;
    }
    Ok(PackedRelease {
        url: format!("file://{}", out_dir.display()),
        version: version.to_string(),
        files,
        latest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};

    #[test]
    fn locations_parse() {
        assert_eq!(
            "file:///srv/ployz".parse::<ReleaseLocation>().unwrap(),
            ReleaseLocation::File("/srv/ployz".into())
        );
        assert_eq!(
            "https://x.example/r/".parse::<ReleaseLocation>().unwrap(),
            ReleaseLocation::Http("https://x.example/r".into())
        );
        assert!("file://rel".parse::<ReleaseLocation>().is_err());
        assert!("ftp://x".parse::<ReleaseLocation>().is_err());
        assert_eq!(
            ReleaseLocation::from_flag_or_env(Some("/tmp/r")).unwrap(),
            ReleaseLocation::File("/tmp/r".into())
        );
    }

    #[test]
    fn sha256_verification() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let data = b"ployzd";
        let hex = sha256_hex(data);
        assert_eq!(
            verify_sha256("ployzd-x", data, &format!("{hex}  ployzd-x\n")).unwrap(),
            hex
        );
        assert_eq!(
            verify_sha256("ployzd-x", data, &hex.to_uppercase()).unwrap(),
            hex
        );
        let other = sha256_hex(b"y");
        let multi = format!("{other}  ployzctl-x\n{hex} *ployzd-x\n");
        verify_sha256("ployzd-x", data, &multi).unwrap();
        let e = verify_sha256("ployzd-x", b"tampered", &hex).unwrap_err();
        assert!(matches!(e, ChecksumError::Mismatch { .. }));
        assert!(e.to_string().contains("nothing was installed"));
        assert!(matches!(
            verify_sha256("ployzd-x", data, "zz  ployzd-x").unwrap_err(),
            ChecksumError::Malformed { .. }
        ));
        assert!(matches!(
            verify_sha256("ployzd-x", data, &format!("{hex}  ployzctl-x")).unwrap_err(),
            ChecksumError::Malformed { .. }
        ));
    }

    #[test]
    fn versions_order() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("0.10.0", "0.9.1"), Greater);
        assert_eq!(version_cmp("0.4.2", "0.4.2"), Equal);
        assert_eq!(version_cmp("v1.0.0", "0.99"), Greater);
        assert!(check_version("latest").is_err());
        assert!(check_version("../x").is_err());
        assert!(check_version("0.4.2-rc.1").is_ok());
    }

    fn fake_bins(dir: &Path) -> (PathBuf, PathBuf) {
        let d = dir.join("ployzd");
        let c = dir.join("ployzctl");
        std::fs::write(&d, b"daemon-bytes").unwrap();
        std::fs::write(&c, b"ctl-bytes").unwrap();
        (d, c)
    }

    #[tokio::test]
    async fn pack_then_fetch_from_file_url() {
        let dir = tempfile::tempdir().unwrap();
        let (d, c) = fake_bins(dir.path());
        let out = dir.path().join("rel");
        let t = "x86_64-unknown-linux-gnu";
        let p = pack_release(&out, "0.2.0", t, &[("ployzd", &d), ("ployzctl", &c)]).unwrap();
        assert!(p.latest);
        assert!(out.join("0.2.0/ployzd-x86_64-unknown-linux-gnu").exists());
        assert_eq!(
            std::fs::read_to_string(out.join("0.2.0/ployzctl-x86_64-unknown-linux-gnu.sha256"))
                .unwrap(),
            format!(
                "{}  ployzctl-x86_64-unknown-linux-gnu\n",
                sha256_hex(b"ctl-bytes")
            )
        );
        // An older version does not move `latest`.
        let p = pack_release(&out, "0.1.9", t, &[("ployzd", &d)]).unwrap();
        assert!(!p.latest);
        let loc: ReleaseLocation = p.url.parse().unwrap();
        assert_eq!(resolve_version(&loc, "latest").await.unwrap(), "0.2.0");
        assert_eq!(resolve_version(&loc, "0.1.9").await.unwrap(), "0.1.9");

        // musl is preferred but absent: falls back to gnu.
        let triples = vec!["x86_64-unknown-linux-musl".to_string(), t.to_string()];
        let a = fetch_binary(&loc, "0.2.0", "ployzd", &triples)
            .await
            .unwrap();
        assert_eq!(a.bytes, b"daemon-bytes");
        assert_eq!(a.triple, t);

        let e = fetch_binary(&loc, "0.3.0", "ployzd", &triples)
            .await
            .unwrap_err();
        assert!(matches!(e, ReleaseError::NotFound { .. }), "{e}");

        // Tampered binary: refused.
        std::fs::write(out.join("0.2.0/ployzd-x86_64-unknown-linux-gnu"), b"evil").unwrap();
        let e = fetch_binary(&loc, "0.2.0", "ployzd", &triples)
            .await
            .unwrap_err();
        assert!(
            matches!(e, ReleaseError::Checksum(ChecksumError::Mismatch { .. })),
            "{e}"
        );
        // Missing checksum: refused.
        std::fs::remove_file(out.join("0.2.0/ployzd-x86_64-unknown-linux-gnu.sha256")).unwrap();
        let e = fetch_binary(&loc, "0.2.0", "ployzd", &triples)
            .await
            .unwrap_err();
        assert!(matches!(e, ReleaseError::NoChecksum { .. }), "{e}");

        let empty = ReleaseLocation::File(dir.path().join("nothing"));
        let e = resolve_version(&empty, "latest").await.unwrap_err();
        assert!(matches!(e, ReleaseError::NoLatest { .. }));
    }

    /// A minimal HTTP/1.1 file server over a release directory.
    fn serve(root: PathBuf) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                let _ = r.read_line(&mut first);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                let resp = match std::fs::read(root.join(path.trim_start_matches('/'))) {
                    Ok(b) => {
                        let mut v = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        )
                        .into_bytes();
                        v.extend_from_slice(&b);
                        v
                    }
                    Err(_) => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = s.write_all(&resp);
                let mut sink = [0u8; 1];
                let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
                let _ = s.read(&mut sink);
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn fetch_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let (d, c) = fake_bins(dir.path());
        let out = dir.path().join("rel");
        let t = "aarch64-unknown-linux-musl";
        pack_release(&out, "1.0.0", t, &[("ployzd", &d), ("ployzctl", &c)]).unwrap();
        let loc: ReleaseLocation = serve(out).parse().unwrap();
        assert_eq!(resolve_version(&loc, "latest").await.unwrap(), "1.0.0");
        let a = fetch_binary(&loc, "1.0.0", "ployzctl", &[t.to_string()])
            .await
            .unwrap();
        assert_eq!(a.bytes, b"ctl-bytes");
        let e = fetch_binary(&loc, "1.0.1", "ployzctl", &[t.to_string()])
            .await
            .unwrap_err();
        assert!(matches!(e, ReleaseError::NotFound { .. }), "{e}");
    }
}
