//! The storage set: promoting machines to voters (`machine storage
//! promote`) and dropping one that leaves, only while the rest keeps a
//! reachable majority.

use super::{rules, Cluster};
use crate::errors::{internal, invalid, refused};
use crate::identity::{machine_id_of, node_id_of};
use crate::ops::OpHandle;
use crate::peer::{PeerRequest, PeerResponse};
use crate::store::{self, forward::PEER_CALL_TIMEOUT, Versioned, CAS_RETRIES};
use crate::VERSION;
use ployz_api::*;
use ployz_consensus::{MembershipError, PloyzNode};
use std::collections::BTreeSet;
use std::time::Duration;

/// Longest a new storage machine may take to catch up as a learner.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(3);

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

/// How a promote ended: every target a voter, none (nothing changed), or
/// some.
fn promote_outcome(
    ids: &[String],
    voters: &BTreeSet<u64>,
    results: &[TargetResult],
) -> (OpState, String, i32) {
    let (voting, not): (Vec<&String>, Vec<&String>) = ids
        .iter()
        .partition(|id| node_id_of(id).is_some_and(|n| voters.contains(&n)));
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{} ({})", r.machine, r.message))
        .collect();
    let list = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    if failed.is_empty() && not.is_empty() {
        (
            OpState::Succeeded,
            format!("promoted: {}", list(&voting)),
            0,
        )
    } else if voting.is_empty() {
        (
            OpState::RolledBack,
            format!(
                "nothing promoted, the storage set is unchanged; failed: {}",
                failed.join("; ")
            ),
            9,
        )
    } else {
        (
            OpState::Failed,
            format!(
                "promoted: {}; not promoted: {}; failed: {}",
                list(&voting),
                list(&not),
                failed.join("; ")
            ),
            9,
        )
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

impl Cluster {
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

    /// A peer request to the Raft leader, with time for a learner to catch up.
    async fn relay_peer_to_leader(
        &self,
        req: PeerRequest,
        hops: u8,
    ) -> Result<PeerResponse, ApiError> {
        self.store
            .relay_to_leader(req, hops, CATCH_UP_TIMEOUT + PEER_CALL_TIMEOUT)
            .await
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
        self.store.require_network().await?;
        if !self.store.is_leader() {
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
        let voters: BTreeSet<u64> = self.store.voters().into_iter().map(|(id, _)| id).collect();
        let mut results = Vec::new();
        let mut new: Vec<Versioned<MachineRecord>> = Vec::new();
        for wanted in &targets {
            let m = match self.store.resolve_machine(wanted).await {
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
        let ids: Vec<String> = new.iter().map(|m| m.value.id.clone()).collect();
        let op = self
            .ops
            .begin(
                OpKind::StoragePromote,
                &ids.join(","),
                OpDetail {
                    machines: ids.clone(),
                    ..OpDetail::default()
                },
            )
            .await?;
        let results = self.promote_steps(&op, &new, &voters, results).await;
        let now = self.voter_set();
        let (state, message, code) = promote_outcome(&ids, &now, &results);
        op.finish(state, message, code).await;
        Ok(report(results, &now))
    }

    fn voter_set(&self) -> BTreeSet<u64> {
        self.store.voters().into_iter().map(|(id, _)| id).collect()
    }

    /// Learners first, then one membership change, then the records. A
    /// target that did not become a voter does not stay a learner.
    async fn promote_steps(
        &self,
        op: &OpHandle,
        new: &[Versioned<MachineRecord>],
        voters: &BTreeSet<u64>,
        mut results: Vec<TargetResult>,
    ) -> Vec<TargetResult> {
        if let Err(e) = op.step("catch-up", "adding the targets as learners").await {
            for m in new {
                results.push(fail(&m.value.id, "operation", e.message.clone()));
            }
            return results;
        }
        // Learners first: each catches up before any vote depends on it.
        let mut learned = Vec::new();
        for m in new {
            let node_id = node_id_of(&m.value.id).expect("checked");
            let node = PloyzNode {
                machine_id: m.value.id.clone(),
                addr: m.value.peer_addr.clone(),
            };
            match tokio::time::timeout(
                CATCH_UP_TIMEOUT,
                self.store.node().add_learner(node_id, node, true),
            )
            .await
            {
                Ok(Ok(())) => learned.push(m),
                Ok(Err(e)) => results.push(fail(&m.value.id, "catch-up", e.to_string())),
                Err(_) => results.push(fail(
                    &m.value.id,
                    "catch-up",
                    format!(
                        "did not catch up within {}; is it reachable at {}?",
                        ployz_api::time::human(CATCH_UP_TIMEOUT),
                        m.value.peer_addr
                    ),
                )),
            }
        }
        let step = if learned.len() == new.len() {
            op.step("membership", "making the targets voters").await
        } else {
            Ok(())
        };
        if learned.len() != new.len() || step.is_err() {
            let why = match &step {
                Err(e) => e.message.clone(),
                Ok(()) => "another target failed".into(),
            };
            let dropped = self.drop_learners(new).await;
            for m in learned {
                results.push(fail(
                    &m.value.id,
                    "membership",
                    format!("caught up as a learner, but not made a voter because {why}; {dropped}; fix it and run promote again"),
                ));
            }
            return results;
        }
        let mut next = voters.clone();
        next.extend(
            new.iter()
                .map(|m| node_id_of(&m.value.id).expect("checked")),
        );
        let changed = self.store.node().change_membership(next.clone()).await;
        let _ = op.step("record", "recording the storage set").await;
        // Whatever got through (a change that timed out may still commit),
        // the records say what the voter set now is.
        let recorded = self.record_storage_set().await;
        self.store.refresh_storage_peers();
        let now = self.voter_set();
        for m in new {
            let voter = node_id_of(&m.value.id).is_some_and(|id| now.contains(&id));
            match (&changed, voter, &recorded) {
                (_, true, Ok(())) => results.push(ok(&m.value.id, "promoted to storage")),
                (_, true, Err(e)) => results.push(fail(
                    &m.value.id,
                    "record",
                    format!("it votes, but its record still says otherwise: {e}; run promote again to record it"),
                )),
                (Err(e), false, _) => results.push(fail(&m.value.id, "membership", e.to_string())),
                (Ok(()), false, _) => results.push(fail(
                    &m.value.id,
                    "membership",
                    "the membership change did not make it a voter; run promote again",
                )),
            }
        }
        if new
            .iter()
            .any(|m| !node_id_of(&m.value.id).is_some_and(|id| now.contains(&id)))
        {
            self.drop_learners(new).await;
        }
        results
    }

    /// Remove those of `machines` that are learners (not voters) from the
    /// Raft membership; says what happened, for a result's message.
    async fn drop_learners(&self, machines: &[Versioned<MachineRecord>]) -> String {
        let learners = self.store.node().learners();
        let ids: BTreeSet<u64> = machines
            .iter()
            .filter_map(|m| node_id_of(&m.value.id))
            .filter(|id| learners.contains(id))
            .collect();
        if ids.is_empty() {
            return "it is no learner any more".into();
        }
        match self.store.node().remove_learners(ids).await {
            Ok(()) => {
                self.store.refresh_storage_peers();
                "removed again as a learner".into()
            }
            Err(e) => format!("it could not be removed as a learner ({e})"),
        }
    }

    /// Leader: end the `storage promote` of a leader that stopped running
    /// it. The records are made to match the voter set; targets that are
    /// voters now count as promoted, the rest stop being learners.
    pub(crate) async fn take_over_promote(
        &self,
        op: Versioned<OperationRecord>,
    ) -> Result<(), ApiError> {
        self.ops
            .end_stale(op, |op| async move { self.promote_outcome_now(&op).await })
            .await
    }

    /// Make the records match the voter set, drop targets left as
    /// learners, and say how a stopped promote ended.
    async fn promote_outcome_now(
        &self,
        op: &Versioned<OperationRecord>,
    ) -> Result<(OpState, String, i32), ApiError> {
        if let Err(e) = self.record_storage_set().await {
            return Err(store::unavailable(format!(
                "recording the storage set: {e}"
            )));
        }
        let ids = op.value.detail.machines.clone();
        let mut leftovers = Vec::new();
        for id in &ids {
            if let Some(m) = self.store.get::<MachineRecord>(BUCKET_MACHINES, id).await? {
                leftovers.push(m);
            }
        }
        let now = self.voter_set();
        leftovers.retain(|m| !node_id_of(&m.value.id).is_some_and(|n| now.contains(&n)));
        if !leftovers.is_empty() {
            self.drop_learners(&leftovers).await;
        }
        let results: Vec<TargetResult> = ids
            .iter()
            .map(|id| {
                if node_id_of(id).is_some_and(|n| now.contains(&n)) {
                    ok(id, "promoted to storage")
                } else {
                    fail(id, "membership", "not made a voter; run promote again")
                }
            })
            .collect();
        Ok(promote_outcome(&ids, &now, &results))
    }

    /// Leader: makes the machine records (authority) and the network's
    /// storage size match the Raft voter set, so `machine ls` and `mesh
    /// status` agree with it after any membership change, partial or not.
    pub(crate) async fn record_storage_set(&self) -> Result<(), String> {
        let voters: Vec<String> = self
            .store
            .voters()
            .into_iter()
            .map(|(_, n)| n.machine_id)
            .collect();
        let machines: Vec<(String, Authority)> = self
            .store
            .machines()
            .await
            .map_err(|e| e.message)?
            .into_iter()
            .map(|m| (m.value.id, m.value.authority))
            .collect();
        let recorded = self
            .store
            .require_network()
            .await
            .map_err(|e| e.message)?
            .storage_replicas;
        let fix = rules::storage_record_fix(&voters, &machines, recorded);
        let mut errors = Vec::new();
        for (id, authority) in fix.authority {
            if let Err(e) = self.set_authority(&id, authority).await {
                errors.push(format!("machine {id}: {}", e.message));
            }
        }
        if let Some(n) = fix.replicas {
            if let Err(e) = self.set_replicas(n).await {
                errors.push(format!("storage size: {}", e.message));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    async fn set_authority(&self, id: &str, authority: Authority) -> Result<(), ApiError> {
        self.store
            .update_machine_record(id, |m| {
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
                .store
                .get::<NetworkRecord>(BUCKET_NETWORK, NETWORK_KEY)
                .await?
            else {
                return Err(store::no_network());
            };
            let mut next = cur.value.clone();
            next.storage_replicas = replicas;
            if self
                .store
                .put_at(BUCKET_NETWORK, NETWORK_KEY, &next, cur.revision)
                .await?
            {
                return Ok(());
            }
        }
        Err(store::unavailable("the network record kept changing"))
    }

    /// Whether machine `id` answers over the control plane.
    pub(super) async fn ping(&self, id: &str) -> Result<(), String> {
        self.ping_within(id, PING_TIMEOUT).await
    }

    /// Whether machine `id` answers within `timeout`.
    pub(super) async fn ping_within(&self, id: &str, timeout: Duration) -> Result<(), String> {
        match self
            .control
            .call_machine(id, &PeerRequest::Ping, timeout)
            .await?
        {
            PeerResponse::Pong { machine_id, .. } if machine_id == id => Ok(()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Leader: drop `target` from the voter set if the rest keeps a
    /// reachable majority.
    pub(crate) async fn remove_voter(&self, target: &str, hops: u8) -> Result<bool, ApiError> {
        let node_id = node_id_of(target).ok_or_else(|| invalid("malformed machine id"))?;
        // Only the leader's view of the voter set counts (a machine without
        // a replica has none at all).
        if !self.store.is_leader() {
            let req = PeerRequest::RemoveVoter {
                machine: target.to_string(),
                hops: hops + 1,
            };
            return match self.relay_peer_to_leader(req, hops).await? {
                PeerResponse::VoterRemoved(left) => Ok(left),
                other => Err(internal(format!("unexpected answer {other:?}"))),
            };
        }
        let voters = self.store.voters();
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
        self.store
            .node()
            .change_membership(next)
            .await
            .map_err(|e: MembershipError| store::unavailable(e))?;
        self.store.refresh_storage_peers();
        // The records say what the voter set is.
        if let Err(e) = self.record_storage_set().await {
            tracing::warn!("recording the storage set: {e}");
        }
        Ok(true)
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
