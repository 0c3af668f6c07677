//! Multi-machine operations: storage promotion and removal.

use crate::daemon::{internal, invalid, refused, Daemon, CAS_RETRIES, PEER_CALL_TIMEOUT, VERSION};
use crate::identity::{machine_id_of, node_id_of};
use crate::peer::{self, PeerRequest, PeerResponse};
use crate::rules;
use crate::store::{self, put, Versioned};
use ployz_api::*;
use ployz_consensus::{Expect, MembershipError, PloyzNode};
use std::collections::BTreeSet;
use std::time::Duration;

/// Longest a new storage machine may take to catch up as a learner.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// `major.minor` must match for machines to share the storage set.
fn compatible(a: &str, b: &str) -> bool {
    let mm = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    mm(a) == mm(b)
}

fn fail(machine: &str, step: &str, message: impl Into<String>) -> TargetResult {
    TargetResult {
        machine: machine.to_string(),
        ok: false,
        target: None,
        step: Some(step.to_string()),
        message: message.into(),
    }
}

fn ok(machine: &str, message: impl Into<String>) -> TargetResult {
    TargetResult {
        machine: machine.to_string(),
        ok: true,
        target: None,
        step: None,
        message: message.into(),
    }
}

impl Daemon {
    pub(crate) fn is_leader(&self) -> bool {
        let metrics = self.node.raft().metrics();
        let m = metrics.borrow();
        m.current_leader == Some(self.identity.node_id) && m.state.is_leader()
    }

    /// Relay a request to the Raft leader (through a storage machine when
    /// this one holds no replica).
    async fn relay_to_leader(&self, request: Request, hops: u8) -> Result<Response, ApiError> {
        let req = PeerRequest::Api {
            request,
            hops: hops + 1,
        };
        match self.relay_peer_to_leader(req, hops).await? {
            PeerResponse::Api(Reply::Ok(r)) => Ok(r),
            PeerResponse::Api(Reply::Error(e)) => Err(e),
            other => Err(internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Send a peer request to the Raft leader (through a storage machine
    /// when this one holds no replica). A `PeerResponse::Error` is returned
    /// as the error.
    async fn relay_peer_to_leader(
        &self,
        req: PeerRequest,
        hops: u8,
    ) -> Result<PeerResponse, ApiError> {
        if hops >= 3 {
            return Err(store::unavailable(
                "no stable storage leader to run this on; retry",
            ));
        }
        let m = self.node.raft().metrics().borrow().clone();
        let leader = m
            .current_leader
            .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
        let secret = self.secret.get().ok_or_else(store::no_network)?;
        let targets: Vec<String> = match leader {
            Some(n) if n.machine_id != self.identity.machine_id => vec![n.addr],
            _ => self
                .cluster_file()
                .map(|f| f.storage_peers.into_iter().map(|(_, a)| a).collect())
                .unwrap_or_default(),
        };
        let mut errors = Vec::new();
        for addr in targets {
            match peer::call(
                &addr,
                &secret,
                self.machine_id(),
                &req,
                CATCH_UP_TIMEOUT + PEER_CALL_TIMEOUT,
            )
            .await
            {
                Ok(PeerResponse::Error(e)) => return Err(e),
                Ok(r) => return Ok(r),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(store::unavailable(format!(
            "cannot reach the storage leader [{}]",
            errors.join("; ")
        )))
    }

    pub(crate) async fn storage_promote(
        &self,
        replicas: u8,
        targets: Vec<String>,
        hops: u8,
    ) -> Result<PromoteReport, ApiError> {
        if replicas != 3 && replicas != 5 {
            return Err(invalid(format!(
                "--replicas {replicas}: use 3 or 5 (an odd-sized storage set keeps a majority through failures)"
            )));
        }
        if targets.is_empty() {
            return Err(invalid("name the machines to promote"));
        }
        self.require_network().await?;
        if !self.is_leader() {
            return match self
                .relay_to_leader(
                    Request::StoragePromote {
                        replicas,
                        machines: targets,
                    },
                    hops,
                )
                .await?
            {
                Response::Promoted(r) => Ok(r),
                other => Err(internal(format!("unexpected answer {other:?}"))),
            };
        }
        let voters: BTreeSet<u64> = self.voters().into_iter().map(|(id, _)| id).collect();
        let mut results = Vec::new();
        let mut new: Vec<Versioned<MachineRecord>> = Vec::new();
        for wanted in &targets {
            let m = match self.resolve_machine(wanted).await {
                Ok(m) => m,
                Err(e) => {
                    results.push(fail(wanted, "resolve", e.message));
                    continue;
                }
            };
            let id = m.value.id.clone();
            let Some(node_id) = node_id_of(&id) else {
                results.push(fail(&id, "check", "malformed machine id"));
                continue;
            };
            if voters.contains(&node_id) {
                results.push(ok(&id, "already a storage machine"));
            } else if m.value.lifecycle != Lifecycle::Active {
                results.push(fail(
                    &id,
                    "check",
                    format!(
                        "machine is {}; only active machines can be promoted (`ployzctl machine activate {id}`)",
                        m.value.lifecycle
                    ),
                ));
            } else if !compatible(&m.value.version, VERSION) {
                results.push(fail(
                    &id,
                    "check",
                    format!(
                        "runs ployzd {} but the storage set runs {VERSION}; update it first (`ployzctl machine update --version {VERSION} {id}`)",
                        m.value.version
                    ),
                ));
            } else if m.value.peer_addr.is_empty() {
                results.push(fail(&id, "check", "its record has no peer address"));
            } else if new.iter().any(|n| n.value.id == id) {
                results.push(fail(&id, "check", "named twice"));
            } else {
                new.push(m);
            }
        }
        let report = |results: Vec<TargetResult>, voters: &BTreeSet<u64>| PromoteReport {
            replicas,
            voters: voters.iter().map(|v| machine_id_of(*v)).collect(),
            results,
        };
        if results.iter().any(|r| !r.ok) {
            // Nothing changes unless every target qualifies.
            for m in &new {
                results.push(fail(
                    &m.value.id,
                    "check",
                    "not promoted: another target failed its checks",
                ));
            }
            return Ok(report(results, &voters));
        }
        if voters.len() + new.len() != replicas as usize {
            return Err(refused(format!(
                "the storage set has {} machine(s); with {} new target(s) it would have {}, not --replicas {replicas}",
                voters.len(),
                new.len(),
                voters.len() + new.len()
            ))
            .with_hint(format!(
                "name exactly {} machine(s) that are not storage machines yet",
                (replicas as usize).saturating_sub(voters.len())
            )));
        }
        // Learners first: each catches up before any vote depends on it.
        let mut learned = Vec::new();
        for m in &new {
            let node_id = node_id_of(&m.value.id).expect("checked");
            let node = PloyzNode {
                machine_id: m.value.id.clone(),
                addr: m.value.peer_addr.clone(),
            };
            match tokio::time::timeout(CATCH_UP_TIMEOUT, self.node.add_learner(node_id, node, true))
                .await
            {
                Ok(Ok(())) => learned.push(m),
                Ok(Err(e)) => results.push(fail(&m.value.id, "catch-up", e.to_string())),
                Err(_) => results.push(fail(
                    &m.value.id,
                    "catch-up",
                    format!(
                        "did not catch up within {CATCH_UP_TIMEOUT:?}; is it reachable at {}?",
                        m.value.peer_addr
                    ),
                )),
            }
        }
        if learned.len() != new.len() {
            for m in learned {
                results.push(fail(
                    &m.value.id,
                    "membership",
                    "caught up as a learner, but not made a voter because another target failed; fix it and run promote again",
                ));
            }
            return Ok(report(results, &voters));
        }
        let mut next = voters.clone();
        next.extend(
            new.iter()
                .map(|m| node_id_of(&m.value.id).expect("checked")),
        );
        if let Err(e) = self.node.change_membership(next.clone()).await {
            for m in &new {
                results.push(fail(&m.value.id, "membership", e.to_string()));
            }
            return Ok(report(results, &voters));
        }
        for m in &new {
            match self.set_authority(&m.value.id, Authority::Storage).await {
                Ok(()) => results.push(ok(&m.value.id, "promoted to storage")),
                Err(e) => results.push(fail(&m.value.id, "record", e.message)),
            }
        }
        self.set_replicas(replicas).await?;
        self.refresh_storage_peers();
        Ok(report(results, &next))
    }

    pub(crate) fn refresh_storage_peers(&self) {
        let peers: Vec<(String, String)> = self
            .voters()
            .into_iter()
            .map(|(_, n)| (n.machine_id, n.addr))
            .collect();
        self.set_storage_peers(peers);
    }

    async fn set_authority(&self, id: &str, authority: Authority) -> Result<(), ApiError> {
        self.update_machine_record(id, |m| {
            let changed = m.authority != authority;
            m.authority = authority;
            changed
        })
        .await?
        .map(|_| ())
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no machine `{id}`")))
    }

    async fn set_replicas(&self, replicas: u8) -> Result<(), ApiError> {
        for _ in 0..CAS_RETRIES {
            let Some(cur) = self
                .get::<NetworkRecord>(BUCKET_NETWORK, NETWORK_KEY)
                .await?
            else {
                return Err(store::no_network());
            };
            let mut next = cur.value.clone();
            next.storage_replicas = replicas;
            if self
                .txn(vec![put(
                    BUCKET_NETWORK,
                    NETWORK_KEY,
                    &next,
                    Expect::Revision(cur.revision),
                )])
                .await?
                .is_ok()
            {
                return Ok(());
            }
        }
        Err(store::unavailable("the network record kept changing"))
    }

    /// Whether machine `id` answers over the control plane.
    async fn ping(&self, id: &str) -> Result<(), String> {
        match self
            .call_machine(id, &PeerRequest::Ping, PING_TIMEOUT)
            .await?
        {
            PeerResponse::Pong { machine_id } if machine_id == id => Ok(()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Leader: drop `target` from the voter set if the rest keeps a
    /// reachable majority.
    pub(crate) async fn remove_voter(&self, target: &str, hops: u8) -> Result<bool, ApiError> {
        let node_id = node_id_of(target).ok_or_else(|| invalid("malformed machine id"))?;
        // Only the leader's view of the voter set counts (a machine without
        // a replica has none at all).
        if !self.is_leader() {
            let req = PeerRequest::RemoveVoter {
                machine: target.to_string(),
                hops: hops + 1,
            };
            return match self.relay_peer_to_leader(req, hops).await? {
                PeerResponse::VoterRemoved(left) => Ok(left),
                other => Err(internal(format!("unexpected answer {other:?}"))),
            };
        }
        let voters = self.voters();
        if !voters.iter().any(|(id, _)| *id == node_id) {
            return Ok(false);
        }
        let mut reachable = vec![self.machine_id().to_string()];
        for (id, n) in &voters {
            if *id == self.identity.node_id || *id == node_id {
                continue;
            }
            if self.ping(&n.machine_id).await.is_ok() {
                reachable.push(n.machine_id.clone());
            }
        }
        let names: Vec<String> = voters.iter().map(|(_, n)| n.machine_id.clone()).collect();
        rules::removal_keeps_quorum(&names, target, &reachable)
            .map_err(|r| refused(r.to_string()).with_hint(r.hint()))?;
        let next: BTreeSet<u64> = voters
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| *id != node_id)
            .collect();
        self.node
            .change_membership(next)
            .await
            .map_err(|e: MembershipError| store::unavailable(e))?;
        self.refresh_storage_peers();
        Ok(true)
    }

    pub(crate) async fn machine_rm(
        &self,
        wanted: &str,
        force: bool,
        hops: u8,
    ) -> Result<RemoveReport, ApiError> {
        let target = self.resolve_machine(wanted).await?;
        let id = target.value.id.clone();
        if id == self.machine_id() {
            return Err(refused(format!(
                "machine {id} is the machine this command runs on; it cannot remove itself"
            ))
            .with_hint(format!(
                "run `ployzctl machine rm {id}` on another machine of the network"
            )));
        }
        if !force {
            if let Err(e) = self.ping(&id).await {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("machine {id} is unreachable ({e}), so it cannot clean itself up"),
                )
                .with_hint(format!(
                    "bring it back and retry, or delete only its membership record with `ployzctl machine rm --force {id}`"
                )));
            }
        }
        let left_storage = self.remove_voter(&id, hops).await?;
        // Show the removal honestly while it runs.
        self.update_machine_record(&id, |m| {
            m.lifecycle = Lifecycle::Leaving;
            true
        })
        .await?;
        let mut cleaned_up = false;
        if !force {
            match self
                .call_machine(
                    &id,
                    &PeerRequest::Leave {
                        by: self.machine_id().to_string(),
                    },
                    PEER_CALL_TIMEOUT,
                )
                .await
            {
                Ok(PeerResponse::Left) => cleaned_up = true,
                Ok(other) => {
                    return Err(
                        internal(format!("machine {id} answered {other:?} to leave")).with_hint(
                            format!("`ployzctl machine rm --force {id}` deletes its record"),
                        ),
                    )
                }
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        format!("machine {id} did not confirm its cleanup: {e}"),
                    )
                    .with_hint(format!(
                        "`ployzctl machine rm --force {id}` deletes its record"
                    )))
                }
            }
        }
        // Its placements go with it (workloads are never moved automatically).
        if let Err(e) = self.forget_machine_workloads(&id).await {
            tracing::warn!(machine = %id, "cannot drop its placements: {}", e.message);
        }
        let subnet_key = target
            .value
            .subnet
            .split('/')
            .next()
            .unwrap_or("")
            .replace('.', "-");
        let mut ops = vec![store::delete(BUCKET_MACHINES, &id, Expect::Any)];
        if !subnet_key.is_empty() {
            ops.push(store::delete(BUCKET_SUBNETS, &subnet_key, Expect::Any));
        }
        if let Err((_, why)) = self.txn(ops).await? {
            return Err(internal(format!(
                "deleting the records was rejected: {why}"
            )));
        }
        tracing::info!(machine = %id, force, "removed");
        let storage_set = self
            .list::<MachineRecord>(BUCKET_MACHINES)
            .await?
            .into_iter()
            .filter(|m| m.value.authority == Authority::Storage)
            .map(|m| m.value.id)
            .collect();
        let storage_replicas = self.require_network().await?.storage_replicas;
        Ok(RemoveReport {
            machine: id,
            cleaned_up,
            left_storage,
            storage_set,
            storage_replicas,
        })
    }
}

impl peer::PeerHandler for Daemon {
    fn machine_id(&self) -> &str {
        &self.identity.machine_id
    }

    fn secret(&self) -> Option<peer::ClusterSecret> {
        self.secret.get()
    }

    fn wg_secret(&self) -> &x25519_dalek::StaticSecret {
        self.identity.wg.static_secret()
    }

    fn raft(&self) -> &ployz_consensus::Raft {
        self.node.raft()
    }

    async fn join(&self, req: peer::JoinRequest) -> peer::JoinResponse {
        match self.accept_join(req).await {
            Ok(a) => peer::JoinResponse::Accepted(Box::new(a)),
            Err(e) => peer::JoinResponse::Refused(e),
        }
    }

    async fn rpc(&self, req: PeerRequest) -> PeerResponse {
        self.peer_rpc(req).await
    }

    fn route(&self, stream: tokio::io::DuplexStream, from: String) {
        self.accept_route(stream, from);
    }

    fn raft_events(&self) -> tokio::sync::broadcast::Receiver<ployz_consensus::KvEvent> {
        self.node.subscribe()
    }

    async fn blob(&self, req: peer::BlobRequest) -> Result<peer::BlobSource, ApiError> {
        self.serve_blob(req).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_compatibility_is_major_minor() {
        assert!(super::compatible("0.1.0", "0.1.7"));
        assert!(!super::compatible("0.2.0", "0.1.0"));
        assert!(!super::compatible("1.1.0", "0.1.0"));
    }
}
