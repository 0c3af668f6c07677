//! The machine's identity: a stable id, an Ed25519 signing key (invites,
//! join handshakes) and a WireGuard key pair. Generated on first start and
//! kept in `<data-dir>/identity.json`, mode 0600, written atomically.

use ed25519_dalek::SigningKey;
use ployz_api::invite::{b64url, b64url_decode};
use ployz_mesh::keys::WgKeyPair;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const IDENTITY_FILE: &str = "identity.json";

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    machine_id: String,
    ed25519_secret: String,
    wg_secret: String,
}

pub struct Identity {
    pub machine_id: String,
    /// Raft node id: the machine id's 48 bits.
    pub node_id: u64,
    pub signing_key: SigningKey,
    pub wg: WgKeyPair,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({why}); restore it from a backup, or move the data directory away to start this machine afresh")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
}

impl Identity {
    pub fn identity_key_b64(&self) -> String {
        b64url(self.signing_key.verifying_key().as_bytes())
    }

    /// Load the identity from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let path = dir.join(IDENTITY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mode = std::fs::metadata(&path)
                    .map_err(|source| IdentityError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(IdentityError::Permissions {
                        path,
                        mode: mode & 0o777,
                    });
                }
                Self::parse(&path, &bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                id.save(&path)?;
                Ok(id)
            }
            Err(source) => Err(IdentityError::Read { path, source }),
        }
    }

    fn generate() -> Identity {
        let signing_key = SigningKey::generate(&mut rand::rngs::OsRng);
        let vk = signing_key.verifying_key();
        let b = vk.as_bytes();
        let node_id = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
        Identity {
            machine_id: machine_id_of(node_id),
            node_id,
            signing_key,
            wg: WgKeyPair::generate(),
        }
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Identity, IdentityError> {
        let corrupt = |why: String| IdentityError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let f: IdentityFile = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        let sk: [u8; 32] = b64url_decode(&f.ed25519_secret)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| corrupt("bad ed25519_secret".into()))?;
        let wg: [u8; 32] = b64url_decode(&f.wg_secret)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| corrupt("bad wg_secret".into()))?;
        let node_id = node_id_of(&f.machine_id).ok_or_else(|| corrupt("bad machine_id".into()))?;
        Ok(Identity {
            machine_id: f.machine_id,
            node_id,
            signing_key: SigningKey::from_bytes(&sk),
            wg: WgKeyPair::from_secret_bytes(wg),
        })
    }

    fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let file = IdentityFile {
            machine_id: self.machine_id.clone(),
            ed25519_secret: b64url(&self.signing_key.to_bytes()),
            wg_secret: b64url(&self.wg.secret_bytes()),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("identity serialises");
        write_private_atomic(path, &bytes).map_err(|source| IdentityError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Machine ids are 12 lowercase hex digits (48 bits of the identity key).
pub fn machine_id_of(node_id: u64) -> String {
    format!("{node_id:012x}")
}

pub fn node_id_of(machine_id: &str) -> Option<u64> {
    if machine_id.len() != 12 || !machine_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(machine_id, 16).ok()
}

/// `bytes` random bytes from the OS, as lowercase hex (ids, names).
pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::RngCore as _;
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of `data` as lowercase hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Write `bytes` to `path` with mode 0600: temp file, fsync, rename, fsync dir.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.machine_id, b.machine_id);
        assert_eq!(a.node_id, b.node_id);
        assert_eq!(a.identity_key_b64(), b.identity_key_b64());
        assert_eq!(a.wg.public_base64(), b.wg.public_base64());
        assert_eq!(node_id_of(&a.machine_id), Some(a.node_id));
    }

    #[test]
    fn refuses_world_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        let p = dir.path().join(IDENTITY_FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path()),
            Err(IdentityError::Permissions { .. })
        ));
    }

    #[test]
    fn corrupt_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_private_atomic(&dir.path().join(IDENTITY_FILE), b"{nope").unwrap();
        let e = Identity::load_or_create(dir.path()).err().unwrap();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }

    #[test]
    fn sha256_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
