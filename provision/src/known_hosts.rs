//! Host keys, trusted on first use and remembered in a known-hosts file Ployz
//! owns (OpenSSH syntax, so `ssh-keygen -R host -f FILE` edits it too).
//!
//! The decision is pure ([`KnownHosts::check`]); reading and appending the
//! file are the only IO.

use russh::keys::{HashAlg, PublicKey};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// What we know about the key a host offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The host has this key on record.
    Known,
    /// The host has no key on record: trust it and remember it.
    New,
    /// The host has a different key on record: refuse.
    Changed {
        /// Fingerprint of the remembered key (`SHA256:...`).
        remembered: String,
        /// Line number of the remembered key in the file (1-based).
        line: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    #[error("cannot read the known-hosts file {path}: {source}; fix its permissions or remove it (keys are then trusted again on first use)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot record the host key of {host} in {path}: {source}; check that the directory exists and is writable")]
    Write {
        host: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    hosts: Vec<String>,
    key: PublicKey,
    line: usize,
}

/// The parsed known-hosts file.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

/// How a host is named in the file: `host` on port 22, else `[host]:port`
/// (OpenSSH's convention).
pub fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// `SHA256:...`, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

impl KnownHosts {
    /// Parse the file's text. Lines that are blank, comments, hashed
    /// (`|1|...`), markers (`@revoked`) or unparsable are skipped: they can
    /// never make an unknown key trusted.
    pub fn parse(text: &str) -> KnownHosts {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
                continue;
            }
            let mut parts = line.splitn(2, char::is_whitespace);
            let (Some(hosts), Some(key)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(key) = PublicKey::from_openssh(key.trim()) else {
                continue;
            };
            entries.push(Entry {
                hosts: hosts.split(',').map(str::to_string).collect(),
                key,
                line: i + 1,
            });
        }
        KnownHosts { entries }
    }

    /// Read `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<KnownHosts, KnownHostsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(KnownHosts::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KnownHosts::default()),
            Err(source) => Err(KnownHostsError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Decide about `key` offered by the host named `pattern`
    /// (see [`host_pattern`]). Any remembered key for the host that is not
    /// this one makes it [`Verdict::Changed`], whatever its algorithm: a
    /// server offering a new key type is treated like a new key.
    pub fn check(&self, pattern: &str, key: &PublicKey) -> Verdict {
        let mut other = None;
        for e in self
            .entries
            .iter()
            .filter(|e| e.hosts.iter().any(|h| h == pattern))
        {
            if e.key.key_data() == key.key_data() {
                return Verdict::Known;
            }
            other.get_or_insert(e);
        }
        match other {
            Some(e) => Verdict::Changed {
                remembered: fingerprint(&e.key),
                line: e.line,
            },
            None => Verdict::New,
        }
    }

    /// The line recording `key` for `pattern`.
    pub fn line_for(pattern: &str, key: &PublicKey) -> String {
        let mut k = key.clone();
        k.set_comment("");
        let openssh = k.to_openssh().unwrap_or_default();
        format!("{pattern} {}\n", openssh.trim())
    }

    /// Append `key` for `pattern` to the file at `path` (created 0600, its
    /// directory too). One `write` of one line in append mode, so concurrent
    /// provisioning runs never interleave within a line.
    pub fn remember(path: &Path, pattern: &str, key: &PublicKey) -> Result<(), KnownHostsError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let err = |source| KnownHostsError::Write {
            host: pattern.to_string(),
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(Self::line_for(pattern, key).as_bytes())
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBhrt3QHwqKNypAq2/z0BhIILvDc3MyDtOwlnC7lCT8H";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBWOlvYC36mB5jBKGvn2llAiFdsQ3JSy+40Abbxgi5Q1";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    #[test]
    fn patterns_follow_openssh() {
        assert_eq!(host_pattern("10.0.0.1", 22), "10.0.0.1");
        assert_eq!(host_pattern("10.0.0.1", 2222), "[10.0.0.1]:2222");
    }

    #[test]
    fn unknown_host_is_new_then_known_after_remembering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/known_hosts");
        let kh = KnownHosts::load(&path).unwrap();
        assert_eq!(kh.check("10.0.0.1", &key(A)), Verdict::New);
        KnownHosts::remember(&path, "10.0.0.1", &key(A)).unwrap();
        KnownHosts::remember(&path, "[10.0.0.2]:2222", &key(B)).unwrap();
        let kh = KnownHosts::load(&path).unwrap();
        assert_eq!(kh.check("10.0.0.1", &key(A)), Verdict::Known);
        assert_eq!(kh.check("[10.0.0.2]:2222", &key(B)), Verdict::Known);
        // Same address, other port: a different host.
        assert_eq!(kh.check("10.0.0.2", &key(B)), Verdict::New);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn changed_key_is_refused_with_the_remembered_fingerprint() {
        let kh = KnownHosts::parse(&format!("# ours\n\n10.0.0.1 {A}\n"));
        match kh.check("10.0.0.1", &key(B)) {
            Verdict::Changed { remembered, line } => {
                assert_eq!(remembered, fingerprint(&key(A)));
                assert_eq!(line, 3);
            }
            v => panic!("expected Changed, got {v:?}"),
        }
    }

    #[test]
    fn comma_lists_and_garbage_lines() {
        let kh = KnownHosts::parse(&format!(
            "|1|hashed= {A}\n@revoked 10.0.0.9 {A}\nnot a key line\nhost-a,10.0.0.1 {A}\n"
        ));
        assert_eq!(kh.check("10.0.0.1", &key(A)), Verdict::Known);
        assert_eq!(kh.check("host-a", &key(A)), Verdict::Known);
        assert_eq!(kh.check("10.0.0.9", &key(A)), Verdict::New);
    }

    #[test]
    fn line_has_no_comment() {
        let mut k = key(A);
        k.set_comment("someone@laptop");
        assert_eq!(KnownHosts::line_for("h", &k), format!("h {A}\n"));
    }
}
