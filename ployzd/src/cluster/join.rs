//! Joining a network with an invite: the joiner's side
//! ([`Cluster::invite_import`]) and the issuer's ([`Cluster::accept_join`]).
//!
//! The invite is consumed, the subnet claimed and the machine record
//! created in one compare-and-set transaction, so two machines presenting
//! the same token race on the invite's revision and exactly one wins, and
//! concurrent joiners never share a subnet.

use super::{control_addr, Cluster, SERVING_TIMEOUT};
use crate::errors::{internal, invalid, refused, validate_region};
use crate::identity::sha256_hex;
use crate::peer::{self, JoinAccepted, JoinRequest, JoinResponse, JoinerInfo};
use crate::store::{self, put, ClusterFile, CAS_RETRIES};
use crate::VERSION;
use ed25519_dalek::{Signer, Verifier};
use ployz_api::invite::{self, b64url, b64url_decode};
use ployz_api::time::{now_ms, rfc3339};
use ployz_api::*;
use ployz_consensus::{Expect, Rejection};
use ployz_mesh::overlay::ClusterRange;
use std::time::Duration;

const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

fn proof_message(token: &str, machine_id: &str) -> Vec<u8> {
    use sha2::Digest as _;
    let mut m = sha2::Sha256::digest(token.as_bytes()).to_vec();
    m.extend_from_slice(machine_id.as_bytes());
    m
}

impl Cluster {
    /// Joiner: present `token` to its issuer and become a member.
    pub(crate) async fn invite_import(&self, token: &str) -> Result<MeshStatus, ApiError> {
        let _guard = self.init_lock.lock().await;
        if self.store.in_network().await {
            let name = self
                .store
                .local()
                .get()
                .map(|c| c.network_name)
                .unwrap_or_default();
            return Err(ApiError::new(
                ErrorCode::AlreadyInNetwork,
                format!("this machine already belongs to network `{name}`"),
            )
            .with_hint("a machine is in one network at a time; remove it from that network first (`ployzctl machine rm <id>` from another machine), or, if the network already removed it, run `ployzctl mesh leave` here"));
        }
        let claims = invite::decode(token).map_err(|e| invalid(e.to_string()))?;
        if now_ms() >= claims.expires_at_ms {
            return Err(refused(format!(
                "invite {} expired at {}",
                claims.invite_id,
                rfc3339(claims.expires_at_ms)
            ))
            .with_hint(
                "ask for a new one: `ployzctl machine invite create` on a machine of the network",
            ));
        }
        let issuer_wg = ployz_mesh::keys::decode_public(&claims.issuer_wg_public_key)
            .ok_or_else(|| invalid("the invite token carries a malformed issuer key"))?;
        let me = &self.identity;
        let req = JoinRequest {
            token: token.trim().to_string(),
            joiner: JoinerInfo {
                machine_id: me.machine_id.clone(),
                hostname: self.hostname.clone(),
                identity_key: me.identity_key_b64(),
                wg_public_key: me.wg.public_base64(),
                endpoints: self
                    .overlay
                    .endpoints(&ClusterRange::parse(DEFAULT_CLUSTER_CIDR).expect("default range")),
                peer_addr: self.cfg.peer_addr.clone(),
                version: VERSION.to_string(),
                runtime: self.cfg.runtime.to_string(),
                region: self.cfg.region.clone(),
            },
            proof: b64url(
                &me.signing_key
                    .sign(&proof_message(token.trim(), &me.machine_id))
                    .to_bytes(),
            ),
        };
        let mut errors = Vec::new();
        let mut accepted = None;
        for addr in &claims.issuer_peer_addrs {
            match peer::join(addr, issuer_wg, &me.machine_id, &req, JOIN_TIMEOUT).await {
                Ok(JoinResponse::Accepted(a)) => {
                    accepted = Some(a);
                    break;
                }
                Ok(JoinResponse::Refused(e)) => return Err(e),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        let Some(a) = accepted else {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "cannot reach the invite's issuer {} [{}]",
                    claims.issuer_id,
                    errors.join("; ")
                ),
            )
            .with_hint("check that the issuing machine's ployzd runs and that this machine can reach it; nothing was changed"));
        };
        if a.network.network_id != claims.network_id || a.machine.id != me.machine_id {
            return Err(internal(
                "the issuer answered for another network or machine; nothing was saved",
            ));
        }
        self.store.local().save(Some(ClusterFile {
            secret: a.secret.clone(),
            network_name: a.network.name.clone(),
            storage_peers: a.storage_peers.clone(),
            network: Some(a.network.clone()),
            machines: a.machines.clone(),
        }))?;
        self.overlay
            .ensure(&a.network, &a.machine)
            .await
            .map_err(|e| {
                internal(format!("joined, but {e}")).with_hint(
                    "see the ployzd log; ployzd retries bringing the mesh up every second",
                )
            })?;
        self.overlay.sync(&a.machines);
        tracing::info!(network = %a.network.name, "joined; confirming");
        self.confirm_active().await?;
        // Return once what this started serves: `nats url` right after works.
        if !self.control.wait_serving(SERVING_TIMEOUT).await {
            tracing::warn!("the NATS control plane is not serving yet; ployzd keeps trying");
        }
        self.status_within(None).await
    }

    /// Joiner, after enrolment: flip its own record from `joining` to
    /// `active` through the store, which proves it can reach it.
    async fn confirm_active(&self) -> Result<(), ApiError> {
        let id = self.machine_id().to_string();
        let mut last = None;
        // The first handshakes over the new mesh take a moment.
        for attempt in 0..60 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let cur = match self.store.get::<MachineRecord>(BUCKET_MACHINES, &id).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    return Err(internal(
                        "the issuer enrolled this machine but its record is missing",
                    ))
                }
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            if cur.value.lifecycle != Lifecycle::Joining {
                return Ok(());
            }
            let mut next = cur.value.clone();
            next.lifecycle = Lifecycle::Active;
            next.updated_at_ms = now_ms();
            match self
                .store
                .txn(vec![put(
                    BUCKET_MACHINES,
                    &id,
                    &next,
                    Expect::Revision(cur.revision),
                )])
                .await
            {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(_)) => continue,
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| store::unavailable("could not confirm the join")))
    }

    /// Issuer: vet a join request and enrol the machine.
    pub async fn accept_join(&self, req: JoinRequest) -> Result<JoinAccepted, ApiError> {
        let claims = invite::decode(&req.token).map_err(|e| invalid(e.to_string()))?;
        let net = self.store.require_network().await?;
        if claims.network_id != net.network_id {
            return Err(refused(format!(
                "the invite is for network `{}` ({}), this machine is in `{}` ({})",
                claims.network_name, claims.network_id, net.name, net.network_id
            )));
        }
        if claims.issuer_key != self.identity.identity_key_b64() {
            return Err(refused(format!(
                "the invite was issued by machine {}, not by this machine",
                claims.issuer_id
            )));
        }
        let j = &req.joiner;
        let key = invite::verifying_key(&j.identity_key)
            .ok_or_else(|| invalid("the joiner's identity key is malformed"))?;
        let sig = b64url_decode(&req.proof)
            .ok()
            .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
            .ok_or_else(|| invalid("the joiner's proof is malformed"))?;
        key.verify(&proof_message(&req.token, &j.machine_id), &sig)
            .map_err(|_| refused("the joiner could not prove it holds its identity key"))?;
        let kb = key.as_bytes();
        let derived = crate::identity::machine_id_of(u64::from_be_bytes([
            0, 0, kb[0], kb[1], kb[2], kb[3], kb[4], kb[5],
        ]));
        if derived != j.machine_id {
            return Err(refused(
                "the joiner's machine id does not match its identity key",
            ));
        }
        validate_region(&j.region)?;
        let now = now_ms();
        if now >= claims.expires_at_ms {
            return Err(refused(format!(
                "invite {} expired at {}",
                claims.invite_id,
                rfc3339(claims.expires_at_ms)
            ))
            .with_hint("ask for a new one: `ployzctl machine invite create`"));
        }
        let range = ClusterRange::parse(&net.cidr).map_err(|e| internal(e.to_string()))?;

        for _ in 0..CAS_RETRIES {
            let inv = self
                .store
                .get::<InviteRecord>(BUCKET_INVITES, &claims.invite_id)
                .await?
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::NotFound,
                        format!("invite {} is unknown to this network", claims.invite_id),
                    )
                })?;
            if inv.value.nonce_sha256 != sha256_hex(claims.nonce.as_bytes()) {
                return Err(refused("the token does not match the invite record"));
            }
            let machines = self.store.list::<MachineRecord>(BUCKET_MACHINES).await?;
            let existing = machines.iter().find(|m| m.value.id == j.machine_id);
            match inv.value.status(now) {
                InviteStatus::Active => {}
                InviteStatus::Consumed if inv.value.consumed_by.as_deref() == Some(&j.machine_id) => {
                    // The same joiner retrying after a lost answer: answer again.
                    if let Some(m) = existing {
                        let all = machines.iter().map(|m| m.value.clone()).collect();
                        return Ok(self.accepted(net, m.value.clone(), all));
                    }
                }
                InviteStatus::Consumed => {
                    return Err(refused(format!(
                        "invite {} was already used by machine {}",
                        claims.invite_id,
                        inv.value.consumed_by.clone().unwrap_or_default()
                    ))
                    .with_hint("invites are single-use: ask for a new one with `ployzctl machine invite create`"))
                }
                InviteStatus::Revoked => {
                    return Err(refused(format!("invite {} was revoked", claims.invite_id))
                        .with_hint("ask for a new one with `ployzctl machine invite create`"))
                }
                InviteStatus::Expired => {
                    return Err(refused(format!(
                        "invite {} expired at {}",
                        claims.invite_id,
                        rfc3339(inv.value.expires_at_ms)
                    )))
                }
            }
            if existing.is_some() {
                return Err(ApiError::new(
                    ErrorCode::AlreadyInNetwork,
                    format!(
                        "machine {} is already a member of this network",
                        j.machine_id
                    ),
                ));
            }
            let taken: std::collections::HashSet<String> = self
                .store
                .list::<SubnetClaim>(BUCKET_SUBNETS)
                .await?
                .into_iter()
                .map(|c| c.value.subnet)
                .collect();
            let slice = (1..=range.slices())
                .filter_map(|n| range.slice(n))
                .find(|s| !taken.contains(&s.net.to_string()))
                .ok_or_else(|| {
                    refused(format!(
                        "the network's range {} has no free /24 left",
                        net.cidr
                    ))
                })?;
            let region_role = if machines.iter().any(|m| m.value.region == j.region) {
                RegionRole::Member
            } else {
                RegionRole::Primary
            };
            let record = MachineRecord {
                id: j.machine_id.clone(),
                hostname: j.hostname.clone(),
                lifecycle: Lifecycle::Joining,
                authority: Authority::Compute,
                region: j.region.clone(),
                region_role,
                overlay_ip: slice.overlay_ip().to_string(),
                subnet: slice.net.to_string(),
                version: j.version.clone(),
                runtime: j.runtime.clone(),
                identity_key: j.identity_key.clone(),
                wg_public_key: j.wg_public_key.clone(),
                endpoints: j.endpoints.clone(),
                // The network decides: on a mesh network peers reach the
                // joiner on its overlay address.
                peer_addr: control_addr(net.mesh, &slice.overlay_ip().to_string(), &j.peer_addr),
                ssh_target: None,
                created_at_ms: now,
                updated_at_ms: now,
            };
            let mut consumed = inv.value.clone();
            consumed.consumed_by = Some(j.machine_id.clone());
            consumed.consumed_at_ms = Some(now);
            let claim = SubnetClaim {
                subnet: slice.net.to_string(),
                machine_id: j.machine_id.clone(),
            };
            let ops = vec![
                put(
                    BUCKET_INVITES,
                    &claims.invite_id,
                    &consumed,
                    Expect::Revision(inv.revision),
                ),
                put(BUCKET_SUBNETS, &slice.key(), &claim, Expect::Absent),
                put(BUCKET_MACHINES, &j.machine_id, &record, Expect::Absent),
            ];
            match self.store.txn(ops).await? {
                Ok(_) => {
                    tracing::info!(machine = %record.id, subnet = %record.subnet, invite = %claims.invite_id, "enrolled");
                    // Peer with the joiner at once: it is about to call in over the mesh.
                    let mut all: Vec<MachineRecord> =
                        machines.into_iter().map(|m| m.value).collect();
                    all.push(record.clone());
                    self.overlay.sync(&all);
                    return Ok(self.accepted(net, record, all));
                }
                // Lost a race on the invite, the subnet or the id: look again.
                Err((_, Rejection::WrongLastRevision { .. } | Rejection::KeyExists { .. })) => {
                    continue
                }
                Err((_, other)) => return Err(internal(format!("enrolment rejected: {other}"))),
            }
        }
        Err(store::unavailable("too many concurrent joins; retry"))
    }

    fn accepted(
        &self,
        network: NetworkRecord,
        machine: MachineRecord,
        machines: Vec<MachineRecord>,
    ) -> JoinAccepted {
        JoinAccepted {
            network,
            secret: self
                .store
                .local()
                .secret()
                .get()
                .expect("a member has the cluster secret"),
            machine,
            machines,
            storage_peers: self
                .store
                .voters()
                .into_iter()
                .map(|(_, n)| (n.machine_id, n.addr))
                .collect(),
        }
    }
}
