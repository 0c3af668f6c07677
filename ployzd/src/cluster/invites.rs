//! Invites: single-use, signed tokens that let a machine join
//! (`machine invite create / list / revoke`).

use super::Cluster;
use crate::errors::{internal, invalid};
use crate::identity::{random_hex, sha256_hex};
use crate::store::{self, put, CAS_RETRIES};
use ployz_api::invite::{self, InviteClaims};
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::Expect;
use ployz_mesh::overlay::ClusterRange;
use rand::RngCore;

/// Longest invite lifetime accepted (7 days).
pub const MAX_INVITE_TTL_SECS: u64 = 7 * 24 * 3600;

impl Cluster {
    pub(crate) async fn invite_create(&self, ttl_secs: u64) -> Result<InviteCreated, ApiError> {
        if ttl_secs == 0 || ttl_secs > MAX_INVITE_TTL_SECS {
            return Err(invalid(format!(
                "--ttl-secs {ttl_secs} is out of range: use 1 to {MAX_INVITE_TTL_SECS} (7 days)"
            )));
        }
        let net = self.store.require_network().await?;
        let me = self.store.my_record().await?;
        let range = ClusterRange::parse(&net.cidr).map_err(|e| internal(e.to_string()))?;
        let now = now_ms();
        let expires_at_ms = now + ttl_secs * 1000;
        let invite_id = format!("inv-{}", random_hex(6));
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let nonce = invite::b64url(&nonce);
        let claims = InviteClaims {
            v: invite::TOKEN_VERSION,
            invite_id: invite_id.clone(),
            network_id: net.network_id.clone(),
            network_name: net.name.clone(),
            issuer_id: me.id.clone(),
            issuer_key: self.identity.identity_key_b64(),
            expires_at_ms,
            nonce: nonce.clone(),
            issuer_endpoints: self.overlay.endpoints(&range),
            issuer_overlay_ip: me.overlay_ip.clone(),
            issuer_wg_public_key: self.identity.wg.public_base64(),
            issuer_peer_addrs: self.peer_addrs(&range),
        };
        let token = invite::encode(&claims, &self.identity.signing_key);
        let record = InviteRecord {
            invite_id: invite_id.clone(),
            issuer: me.id.clone(),
            nonce_sha256: sha256_hex(nonce.as_bytes()),
            created_at_ms: now,
            expires_at_ms,
            revoked_at_ms: None,
            consumed_by: None,
            consumed_at_ms: None,
        };
        match self
            .store
            .txn(vec![put(
                BUCKET_INVITES,
                &invite_id,
                &record,
                Expect::Absent,
            )])
            .await?
        {
            Ok(_) => Ok(InviteCreated {
                invite_id,
                token,
                expires_at: time::rfc3339(expires_at_ms),
            }),
            Err((_, why)) => Err(internal(format!("storing the invite was rejected: {why}"))),
        }
    }

    pub(crate) async fn invite_list(&self) -> Result<InviteList, ApiError> {
        self.store.require_network().await?;
        let now = now_ms();
        let mut invites: Vec<InviteRecord> =
            self.store.values::<InviteRecord>(BUCKET_INVITES).await?;
        invites
            .sort_by(|a, b| (a.created_at_ms, &a.invite_id).cmp(&(b.created_at_ms, &b.invite_id)));
        Ok(InviteList {
            invites: invites.iter().map(|r| InviteView::of(r, now)).collect(),
        })
    }

    pub(crate) async fn invite_revoke(&self, invite_id: &str) -> Result<InviteView, ApiError> {
        self.store.require_network().await?;
        for _ in 0..CAS_RETRIES {
            let Some(cur) = self
                .store
                .get::<InviteRecord>(BUCKET_INVITES, invite_id)
                .await?
            else {
                return Err(
                    ApiError::new(ErrorCode::NotFound, format!("no invite `{invite_id}`"))
                        .with_hint("`ployzctl machine invite list` shows the invite ids"),
                );
            };
            let now = now_ms();
            if let Some(by) = &cur.value.consumed_by {
                return Err(ApiError::new(
                    ErrorCode::Refused,
                    format!("invite {invite_id} was already used by machine {by}; revoking it changes nothing"),
                )
                .with_hint(format!("to remove that machine, run `ployzctl machine rm {by}`")));
            }
            if cur.value.revoked_at_ms.is_some() {
                return Ok(InviteView::of(&cur.value, now));
            }
            let mut next = cur.value.clone();
            next.revoked_at_ms = Some(now);
            if self
                .store
                .put_at(BUCKET_INVITES, invite_id, &next, cur.revision)
                .await?
            {
                return Ok(InviteView::of(&next, now));
            }
        }
        Err(store::unavailable(format!(
            "invite {invite_id} kept changing under {CAS_RETRIES} attempts to revoke it"
        )))
    }
}
