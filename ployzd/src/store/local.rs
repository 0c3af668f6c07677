//! What a machine keeps about its network outside the store
//! (`cluster.json`, 0600): the network secret, the storage machines to
//! forward to, and the last known network and machine records, enough to
//! bring the mesh up after a restart before the store (reached over the
//! mesh) answers.

use crate::errors::internal;
use crate::peer::{ClusterSecret, SecretSlot};
use ployz_api::{ApiError, MachineRecord, NetworkRecord};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// File with the network secret and the storage machines, 0600.
pub const CLUSTER_FILE: &str = "cluster.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub secret: ClusterSecret,
    pub network_name: String,
    /// Storage machines as `(machine_id, peer_addr)`, refreshed as they change.
    pub storage_peers: Vec<(String, String)>,
    /// Last known network record and machines.
    #[serde(default)]
    pub network: Option<NetworkRecord>,
    #[serde(default)]
    pub machines: Vec<MachineRecord>,
}

/// `cluster.json` on disk is corrupt.
#[derive(Debug, thiserror::Error)]
#[error("{path} is corrupt ({why}); restore it or remove the data directory to start afresh")]
pub struct CorruptClusterFile {
    pub path: PathBuf,
    pub why: String,
}

/// The cluster file and the secret slot the peer channel reads: one
/// writer ([`LocalFile::save`]) keeps them equal.
pub struct LocalFile {
    path: PathBuf,
    file: RwLock<Option<ClusterFile>>,
    secret: SecretSlot,
}

impl LocalFile {
    pub fn load(data_dir: &Path) -> Result<LocalFile, CorruptClusterFile> {
        let path = data_dir.join(CLUSTER_FILE);
        let file: Option<ClusterFile> = match std::fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes).map_err(|e| CorruptClusterFile {
                    path: path.clone(),
                    why: e.to_string(),
                })?,
            ),
            Err(_) => None,
        };
        let secret = SecretSlot::default();
        secret.set(file.as_ref().map(|c| c.secret.clone()));
        Ok(LocalFile {
            path,
            file: RwLock::new(file),
            secret,
        })
    }

    /// The file's current contents; `None` before this machine is in a network.
    pub fn get(&self) -> Option<ClusterFile> {
        self.file.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The network secret, shared with whoever dials peers.
    pub fn secret(&self) -> &SecretSlot {
        &self.secret
    }

    /// Replace the file (`None`: delete it).
    pub fn save(&self, file: Option<ClusterFile>) -> Result<(), ApiError> {
        match &file {
            Some(f) => crate::identity::write_private_atomic(
                &self.path,
                &serde_json::to_vec_pretty(f).expect("cluster file serialises"),
            )
            .map_err(|e| internal(format!("cannot write {}: {e}", self.path.display())))?,
            None => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        self.secret.set(file.as_ref().map(|f| f.secret.clone()));
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = file;
        Ok(())
    }

    /// Remember the machines (for the mesh after a restart).
    pub fn cache_machines(&self, net: Option<NetworkRecord>, machines: Vec<MachineRecord>) {
        let Some(mut file) = self.get() else {
            return;
        };
        let net = net.or(file.network.clone());
        if file.machines == machines && file.network == net {
            return;
        }
        file.machines = machines;
        file.network = net;
        if let Err(e) = self.save(Some(file)) {
            tracing::warn!("{e}");
        }
    }

    /// Remember the current storage machines (for forwarding from a
    /// machine that holds no replica).
    pub fn set_storage_peers(&self, peers: Vec<(String, String)>) {
        let mut file = match self.get() {
            Some(f) if f.storage_peers != peers && !peers.is_empty() => f,
            _ => return,
        };
        file.storage_peers = peers;
        if let Err(e) = self.save(Some(file)) {
            tracing::warn!("{e}");
        }
    }
}
