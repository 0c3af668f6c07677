//! The NATS credential key (issue 17): every NATS password derives from it
//! and the network secret ([`super::users::derive_password`]). It lives in
//! the hidden `pki` bucket (never served over NATS), is created with the
//! network (generation 1) and replaced by `machine rm` with a fresh key of
//! the next generation: every machine's server then accepts only the new
//! passwords and closes the connections that logged in with the old ones
//! (`app_users::refresh`), so a removed machine, which keeps the network
//! secret, no longer knows any NATS password.

use super::users::Keys;
use super::ControlPlane;
use crate::errors::internal;
use crate::peer::ClusterSecret;
use crate::store::{self, Store};
use ployz_api::{ApiError, NatsCredentialsRecord, BUCKET_PKI, NATS_CREDENTIALS_KEY};
use ployz_consensus::Expect;
use rand::RngCore;

fn fresh(generation: u64) -> NatsCredentialsRecord {
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    NatsCredentialsRecord {
        generation,
        key: ployz_api::invite::b64url(&k),
    }
}

/// The keys passwords derive from.
pub(super) fn keys_of(secret: &ClusterSecret, rec: &NatsCredentialsRecord) -> Keys {
    Keys {
        network_id: secret.network_id.clone(),
        network_key: secret.key.clone(),
        generation: rec.generation,
        credential_key: rec.key.clone(),
    }
}

/// The current credential key, if the network has one yet.
pub(super) async fn read(store: &Store) -> Result<Option<NatsCredentialsRecord>, String> {
    store
        .get::<NatsCredentialsRecord>(BUCKET_PKI, NATS_CREDENTIALS_KEY)
        .await
        .map(|v| v.map(|v| v.value))
        .map_err(|e| e.message)
}

/// The current credential key; the first machine to need one (the
/// founder, or the first of a network from before rotation) creates
/// generation 1 (create-if-absent: everyone ends up with the same).
pub(super) async fn load_or_create(store: &Store) -> Result<NatsCredentialsRecord, String> {
    if let Some(rec) = read(store).await? {
        return Ok(rec);
    }
    let mut ops = store::records::ensure_bucket(BUCKET_PKI);
    ops.push(store::put(
        BUCKET_PKI,
        NATS_CREDENTIALS_KEY,
        &fresh(1),
        Expect::Absent,
    ));
    match store.txn(ops).await.map_err(|e| e.message)? {
        Ok(_) => tracing::info!("created the network's NATS credential key"),
        Err(_) => tracing::debug!("another machine created the NATS credential key first"),
    }
    read(store)
        .await?
        .ok_or_else(|| "the NATS credential key vanished".into())
}

impl ControlPlane {
    /// `machine rm`: replace the credential key with a fresh one of the
    /// next generation (after the removed machine's record is gone) and
    /// apply it here at once; every other machine follows within a second.
    /// Returns the new generation.
    pub async fn rotate_credentials(&self) -> Result<u64, ApiError> {
        let current = self
            .store
            .get::<NatsCredentialsRecord>(BUCKET_PKI, NATS_CREDENTIALS_KEY)
            .await?;
        let (generation, expect) = match &current {
            Some(v) => (v.value.generation + 1, Expect::Revision(v.revision)),
            None => (1, Expect::Absent),
        };
        let mut ops = store::records::ensure_bucket(BUCKET_PKI);
        ops.push(store::put(
            BUCKET_PKI,
            NATS_CREDENTIALS_KEY,
            &fresh(generation),
            expect,
        ));
        if self.store.txn(ops).await?.is_err() {
            // A concurrent rotation won: its key is just as fresh.
            tracing::info!("the NATS credential key was rotated concurrently");
        } else {
            tracing::info!(generation, "rotated the NATS credential key");
        }
        if let Some(n) = self.nats.get() {
            super::app_users::refresh(self, &n.server).await;
        }
        let now = self.keys().map_or(generation, |k| k.generation);
        if now < generation {
            return Err(internal(format!(
                "the NATS credential key of generation {generation} is stored but this machine still applies {now}"
            )));
        }
        Ok(now)
    }
}
