//! `nats user add/ls/rm` and keeping every machine's NATS server on the
//! current users: the records live in the `nats_users` bucket (written only
//! here, never served over NATS); each machine follows the bucket's changes
//! and the NATS credential key (`pki` bucket) and replaces its server's
//! users, closing the connections of users that were removed or changed,
//! and of every user after a credential rotation.

use super::users::{self, all_users};
use super::{credentials, ControlPlane};
use crate::errors::{internal, invalid};
use crate::peer::{KvRead, KvReadResult};
use crate::store::{self, Store};
use ployz_api::*;
use ployz_consensus::{BucketConfig, Expect, KvEvent, Op};
use rand::RngCore;
use std::net::{IpAddr, SocketAddr};
use std::sync::Weak;
use std::time::Duration;

impl ControlPlane {
    /// `nats user add`: store the user (a new salt, so a new password) and
    /// answer its credentials. Its KV buckets are created if missing.
    pub async fn user_add(
        &self,
        advertise: IpAddr,
        name: String,
        allow_pub: Vec<String>,
        allow_sub: Vec<String>,
        kv_buckets: Vec<String>,
    ) -> Result<NatsUserCreated, ApiError> {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let rec = NatsUserRecord {
            name,
            salt: ployz_api::invite::b64url(&salt),
            allow_pub,
            allow_sub,
            kv_buckets,
            created_at_ms: ployz_api::time::now_ms(),
        };
        users::check_user(&rec).map_err(invalid)?;
        let port = self.port().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unavailable,
                "the NATS server on this machine is still starting",
            )
            .with_hint("retry in a moment")
        })?;
        let mut ops = store::records::ensure_bucket(BUCKET_NATS_USERS);
        for b in &rec.kv_buckets {
            let exists = matches!(
                self.store
                    .read(KvRead::Bucket { bucket: b.clone() }, 0)
                    .await?,
                KvReadResult::Bucket(Some(_))
            );
            if !exists {
                ops.push(Op::CreateBucket {
                    bucket: b.clone(),
                    config: BucketConfig::default(),
                });
            }
        }
        ops.push(store::put(BUCKET_NATS_USERS, &rec.name, &rec, Expect::Any));
        self.store
            .txn(ops)
            .await?
            .map_err(|(_, r)| internal(format!("the store rejected the NATS user: {r}")))?;
        let password = self
            .password_for(&users::purpose_app(&rec))
            .ok_or_else(store::no_network)?;
        // This machine serves the user at once (the others within a second).
        if let Some(n) = self.nats.get() {
            refresh(self, &n.server).await;
        }
        let addr = SocketAddr::new(advertise, port);
        Ok(NatsUserCreated {
            url: format!("nats://{}:{password}@{addr}", rec.name),
            user: rec.name,
            password,
        })
    }

    /// `NATS_URL` for a workload of a service deployed with `--nats-user
    /// name`: that user's credentials and this machine's NATS server on its
    /// overlay address, and the credential generation it belongs to.
    /// `NotFound` when the user is gone.
    pub async fn app_url(&self, name: &str) -> Result<(String, u64), ApiError> {
        let Some(rec) = self
            .store
            .get::<NatsUserRecord>(BUCKET_NATS_USERS, name)
            .await?
        else {
            return Err(no_user(name));
        };
        let n = self.nats.get().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unavailable,
                "the NATS server on this machine is still starting",
            )
        })?;
        let keys = self.keys().ok_or_else(store::no_network)?;
        let password = users::derive_password(&keys, &users::purpose_app(&rec.value))
            .ok_or_else(store::no_network)?;
        let addr = SocketAddr::new(n.advertise, n.port);
        Ok((format!("nats://{name}:{password}@{addr}"), keys.generation))
    }

    /// Whether app user `name` exists (deploy checks `--nats-user`).
    pub async fn require_user(&self, name: &str) -> Result<(), ApiError> {
        match self
            .store
            .get::<NatsUserRecord>(BUCKET_NATS_USERS, name)
            .await?
        {
            Some(_) => Ok(()),
            None => Err(no_user(name)),
        }
    }

    /// `nats user ls`.
    pub async fn user_list(&self) -> Result<NatsUserList, ApiError> {
        let mut users: Vec<NatsUserView> = self
            .store
            .values::<NatsUserRecord>(BUCKET_NATS_USERS)
            .await?
            .into_iter()
            .map(|r| NatsUserView {
                user: r.name,
                allow_pub: r.allow_pub,
                allow_sub: r.allow_sub,
                kv_buckets: r.kv_buckets,
            })
            .collect();
        users.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(NatsUserList { users })
    }

    /// `nats user rm`: every machine closes the user's connections.
    pub async fn user_rm(&self, name: &str) -> Result<NatsUserList, ApiError> {
        self.require_user(name).await?;
        self.store
            .txn(vec![store::delete(BUCKET_NATS_USERS, name, Expect::Any)])
            .await?
            .map_err(|(_, r)| internal(format!("the store rejected the removal: {r}")))?;
        if let Some(n) = self.nats.get() {
            refresh(self, &n.server).await;
        }
        self.user_list().await
    }
}

fn no_user(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no NATS user `{name}`: create it with ployzctl nats user add {name} --allow-pub SUBJ …, see ployzctl nats user ls"),
    )
}

/// Reads the credential key and the app users and hands the server the
/// full user list; after a rotation, ployzd's own client logs in again with
/// the new password. Returns `false` when the store could not be read (the
/// caller retries).
pub(super) async fn refresh(cp: &ControlPlane, server: &ployz_natsd::Server) -> bool {
    let store: &Store = &cp.store;
    let Some(secret) = store.local().secret().get() else {
        return false;
    };
    let keys = match credentials::read(store).await {
        Ok(Some(rec)) => credentials::keys_of(&secret, &rec),
        Ok(None) => match cp.keys() {
            Some(k) => k,
            None => return false,
        },
        Err(e) => {
            tracing::debug!("cannot read the NATS credential key: {e}");
            return false;
        }
    };
    let mut recs = match store.values::<NatsUserRecord>(BUCKET_NATS_USERS).await {
        Ok(recs) => recs,
        Err(e) => {
            tracing::debug!("cannot read the NATS users: {}", e.message);
            return false;
        }
    };
    recs.sort_by(|a, b| a.name.cmp(&b.name));
    let rotated = cp.keys().as_ref() != Some(&keys);
    let generation = keys.generation;
    // The new passwords are handed out (`nats url`) only once the server
    // accepts them.
    let closed = server.set_users(all_users(&keys, &recs));
    cp.set_keys(keys);
    if rotated {
        tracing::info!(
            generation,
            closed,
            "NATS credentials rotated: only the new passwords are accepted"
        );
        cp.ensure_bus().await;
    } else if closed > 0 {
        tracing::info!(
            closed,
            "NATS users changed: closed the connections of removed or changed users"
        );
    }
    true
}

/// Keeps `server`'s users on the store's: after every change of the
/// `nats_users` or `pki` bucket (a store reset included), and every 30 s
/// anyway.
pub(super) async fn sync_users(cp: Weak<ControlPlane>, server: ployz_natsd::Server) {
    let Some(mut events) = cp.upgrade().map(|c| c.store.events()) else {
        return;
    };
    loop {
        let ok = match cp.upgrade() {
            Some(c) => refresh(&c, &server).await,
            None => return,
        };
        let wait = if ok {
            Duration::from_secs(30)
        } else {
            Duration::from_millis(500)
        };
        let _ = tokio::time::timeout(wait, async {
            loop {
                match events.recv().await {
                    Ok(KvEvent::Entry(e))
                        if e.bucket != BUCKET_NATS_USERS && e.bucket != BUCKET_PKI =>
                    {
                        continue
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Some(c) = cp.upgrade() {
                            events = c.store.events();
                        }
                        return;
                    }
                }
            }
        })
        .await;
    }
}
