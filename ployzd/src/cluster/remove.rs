//! Leaving the network: `machine rm` on the remover's side (a recorded
//! operation the storage leader finishes if the remover stops running it),
//! and the cleanup the removed machine runs when asked to leave.
//!
//! Steps, each recorded: `storage` (leave the voter set, only if the rest
//! keeps a reachable majority), `leaving` (its record says so), `cleanup`
//! (the machine stops and deletes its workloads and exits; waited for as
//! long as it makes progress), `records` (placements, instance records,
//! machine record and subnet claim deleted).

use super::Cluster;
use crate::errors::{internal, refused};
use crate::ops::OpHandle;
use crate::peer::{LeaveProgress, PeerRequest, PeerResponse};
use crate::store::{self, Versioned};
use ployz_api::*;
use ployz_consensus::Expect;
use std::time::Duration;

/// A leaving machine that reports no progress for this long is given up on.
const CLEANUP_STALL: Duration = Duration::from_secs(30);
/// How long to wait for the first answer of a machine asked to leave.
const LEAVE_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `mesh leave` asks the store whether this machine is a member.
const MEMBERSHIP_CHECK: Duration = Duration::from_secs(5);
/// Whether a machine removed with `--force` is still there to clean up.
const FORCE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The subnet claim key of a machine's subnet (`10.101.3.0/24` → `10-101-3-0`).
fn subnet_key(subnet: &str) -> String {
    subnet.split('/').next().unwrap_or("").replace('.', "-")
}

impl Cluster {
    pub(crate) async fn machine_rm(
        &self,
        wanted: &str,
        force: bool,
        hops: u8,
    ) -> Result<RemoveReport, ApiError> {
        let target = self.store.resolve_machine(wanted).await?;
        let id = target.value.id.clone();
        if id == self.machine_id() {
            return Err(refused(format!(
                "machine {id} is the machine this command runs on; it cannot remove itself"
            ))
            .with_hint(format!(
                "run `ployzctl machine rm {id}` on another machine of the network"
            )));
        }
        let reachable = match self
            .ping_within(
                &id,
                if force {
                    FORCE_PING_TIMEOUT
                } else {
                    super::storage::PING_TIMEOUT
                },
            )
            .await
        {
            Ok(()) => true,
            Err(e) if !force => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("machine {id} is unreachable ({e}), so it cannot clean itself up"),
                )
                .with_hint(format!(
                    "bring it back and retry, or delete only its membership record with `ployzctl machine rm --force {id}`"
                )));
            }
            Err(_) => false,
        };
        let op = self
            .ops
            .begin(
                OpKind::MachineRm,
                &id,
                OpDetail {
                    subnet_key: Some(subnet_key(&target.value.subnet)),
                    ..OpDetail::default()
                },
            )
            .await?;
        let op_id = op.id().to_string();
        match self.rm_steps(&op, &target, reachable, hops).await {
            Ok(report) => {
                let msg = if report.cleaned_up {
                    "removed; the machine cleaned up and exited"
                } else {
                    "removed; the machine itself was not cleaned up"
                };
                op.finish(OpState::Succeeded, msg, 0).await;
                Ok(report)
            }
            Err((changed, e)) => {
                op.end_with(changed, &e).await;
                let e = if changed {
                    let hint = e.hint.clone().unwrap_or_default();
                    e.with_hint(format!(
                        "{hint}{}the storage leader finishes the removal if this machine cannot (`ployzctl op wait {op_id}`)",
                        if hint.is_empty() { "" } else { "; " }
                    ))
                } else {
                    e
                };
                Err(e)
            }
        }
    }

    /// The steps of `machine rm`; an error says whether anything changed.
    async fn rm_steps(
        &self,
        op: &OpHandle,
        target: &Versioned<MachineRecord>,
        reachable: bool,
        hops: u8,
    ) -> Result<RemoveReport, (bool, ApiError)> {
        let id = target.value.id.clone();
        op.step("storage", "leaving the storage set if it is in it")
            .await
            .map_err(|e| (false, e))?;
        let left_storage = self.remove_voter(&id, hops).await.map_err(|e| (false, e))?;
        op.step("leaving", "marking the machine leaving")
            .await
            .map_err(|e| (true, e))?;
        self.store
            .update_machine_record(&id, |m| {
                m.lifecycle = Lifecycle::Leaving;
                true
            })
            .await
            .map_err(|e| (true, e))?;
        let cleaned_up = if reachable {
            self.await_cleanup(op, &id).await
        } else {
            false
        };
        op.step("records", "deleting its records")
            .await
            .map_err(|e| (true, e))?;
        self.delete_machine(&id, &subnet_key(&target.value.subnet))
            .await
            .map_err(|e| (true, e))?;
        tracing::info!(machine = %id, cleaned_up, "removed");
        self.remove_report(id, cleaned_up, left_storage)
            .await
            .map_err(|e| (true, e))
    }

    /// Ask `id` to leave and follow its cleanup for as long as it makes
    /// progress. Whether it confirmed the end of its cleanup.
    async fn await_cleanup(&self, op: &OpHandle, id: &str) -> bool {
        let by = PeerRequest::Leave {
            by: self.machine_id().to_string(),
        };
        let mut last = match self.control.call_machine(id, &by, LEAVE_CALL_TIMEOUT).await {
            Ok(PeerResponse::Leaving(p)) => p,
            Ok(other) => {
                tracing::warn!(machine = %id, "answered {other:?} when asked to leave");
                return false;
            }
            Err(e) => {
                tracing::warn!(machine = %id, "did not answer when asked to leave: {e}");
                return false;
            }
        };
        let mut progressed = tokio::time::Instant::now();
        let mut recorded = None;
        loop {
            if last.finished {
                return true;
            }
            if progressed.elapsed() >= CLEANUP_STALL {
                tracing::warn!(machine = %id, removed = last.removed, total = last.total, "its cleanup made no progress; removing its records anyway");
                return false;
            }
            if Some(last) != recorded {
                recorded = Some(last);
                let _ = op
                    .step(
                        "cleanup",
                        format!(
                            "{} of {} workloads stopped and deleted",
                            last.removed, last.total
                        ),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            // A machine that stopped answering may have exited right after its
            // last workload; a lost answer is no proof it finished.
            if let Ok(PeerResponse::Leaving(p)) = self
                .control
                .call_machine(id, &PeerRequest::LeaveStatus, Duration::from_secs(3))
                .await
            {
                if p != last {
                    progressed = tokio::time::Instant::now();
                }
                last = p;
            }
        }
    }

    /// Delete a removed machine's placements, instance records, record and
    /// subnet claim (its placements go with it: workloads are never moved
    /// automatically), then rotate the NATS credential key: the removed
    /// machine keeps the network secret, and with the old key it would know
    /// every NATS password (issue 17, SECURITY.md).
    async fn delete_machine(&self, id: &str, subnet_key: &str) -> Result<(), ApiError> {
        self.delete_records(id, subnet_key).await?;
        let mut rotated = self.control.rotate_credentials().await;
        for _ in 0..3 {
            if rotated.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            rotated = self.control.rotate_credentials().await;
        }
        let generation = rotated.map_err(|e| {
            let msg = format!(
                "machine {id}'s records are deleted but the NATS credentials were not rotated: {}",
                e.message
            );
            ApiError::new(e.code, msg).with_hint(
                "until a later removal rotates them, the removed machine's copy of the network secret still opens NATS: check `ployzctl status` and see SECURITY.md",
            )
        })?;
        tracing::info!(machine = %id, generation, "NATS credentials rotated after the removal");
        Ok(())
    }

    async fn delete_records(&self, id: &str, subnet_key: &str) -> Result<(), ApiError> {
        self.workloads.forget_machine(id).await?;
        let mut ops = vec![store::delete(BUCKET_MACHINES, id, Expect::Any)];
        if !subnet_key.is_empty() {
            ops.push(store::delete(BUCKET_SUBNETS, subnet_key, Expect::Any));
        }
        if let Err((_, why)) = self.store.txn(ops).await? {
            return Err(internal(format!(
                "deleting the records was rejected: {why}"
            )));
        }
        Ok(())
    }

    async fn remove_report(
        &self,
        id: String,
        cleaned_up: bool,
        left_storage: bool,
    ) -> Result<RemoveReport, ApiError> {
        let storage_set = self
            .store
            .list::<MachineRecord>(BUCKET_MACHINES)
            .await?
            .into_iter()
            .filter(|m| m.value.authority == Authority::Storage)
            .map(|m| m.value.id)
            .collect();
        let storage_replicas = self.store.require_network().await?.storage_replicas;
        Ok(RemoveReport {
            machine: id,
            cleaned_up,
            left_storage,
            storage_set,
            storage_replicas,
        })
    }

    /// Leader: finish the `machine rm` of an owner that stopped running it.
    /// Past the voter removal the machine is removed (its cleanup is not
    /// waited for); before it nothing changed and the operation ends.
    pub(crate) async fn take_over_rm(
        &self,
        op: Versioned<OperationRecord>,
    ) -> Result<(), ApiError> {
        let id = op.value.subject.clone();
        let is_voter = crate::identity::node_id_of(&id)
            .is_some_and(|n| self.store.voters().iter().any(|(v, _)| *v == n));
        if is_voter {
            self.ops
                .take_over(
                    &op,
                    OpState::RolledBack,
                    format!(
                        "its owner {} stopped before machine {id} left the storage set; nothing changed: run `ployzctl machine rm {id}` again",
                        op.value.owner
                    ),
                    ErrorCode::Unavailable.exit_code(),
                )
                .await?;
            return Ok(());
        }
        let owner = op.value.owner.clone();
        let Some(op) = self.ops.claim(&op).await? else {
            return Ok(());
        };
        let still_there = self
            .store
            .get::<MachineRecord>(BUCKET_MACHINES, &id)
            .await?
            .is_some();
        if still_there {
            let key = op.value.detail.subnet_key.clone().unwrap_or_default();
            self.store
                .update_machine_record(&id, |m| {
                    let changed = m.lifecycle != Lifecycle::Leaving;
                    m.lifecycle = Lifecycle::Leaving;
                    changed
                })
                .await?;
            self.delete_machine(&id, &key).await?;
        } else {
            // The owner stopped between deleting the records and rotating.
            self.control.rotate_credentials().await?;
        }
        self.ops
            .take_over(
                &op,
                OpState::Succeeded,
                format!(
                    "machine {id} removed by the storage leader after its owner {owner} stopped; the machine itself was not asked to clean up"
                ),
                0,
            )
            .await?;
        Ok(())
    }

    /// The network asked this machine to leave: stop and delete its
    /// workloads (in the background, once), then exit, which wipes the data
    /// directory. Answers with the progress so far.
    pub(crate) fn leave(&self, by: &str) -> PeerResponse {
        let mut slot = self.leaving.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = *slot {
            return PeerResponse::Leaving(p);
        }
        tracing::warn!(by, "asked to leave the network: cleaning up");
        *slot = Some(LeaveProgress::default());
        drop(slot);
        let leaving = self.leaving.clone();
        let workloads = self.workloads.clone();
        let exit = self.exit.clone();
        tokio::spawn(async move {
            let set = |p: LeaveProgress| {
                *leaving.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            };
            let removed = workloads
                .remove_all(|removed, total| {
                    set(LeaveProgress {
                        removed,
                        total,
                        finished: false,
                    })
                })
                .await;
            let total = leaving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map_or(removed, |p| p.total);
            set(LeaveProgress {
                removed,
                total,
                finished: true,
            });
            tracing::info!(removed, "workloads stopped and deleted");
            // Time for the remover to read the final progress.
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let _ = exit.send(true);
        });
        PeerResponse::Leaving(LeaveProgress::default())
    }

    /// `mesh leave`: this machine leaves on its own, once the network has
    /// removed it. Refused while the store still has its record (that is
    /// `machine rm`'s job), and, without `force`, when the store cannot be
    /// asked. Answers after the cleanup; ployzd then exits and wipes its
    /// state.
    pub(crate) async fn mesh_leave(&self, force: bool) -> Result<LeftNetwork, ApiError> {
        let Some(file) = self.store.local().get() else {
            return Err(store::no_network());
        };
        let id = self.machine_id().to_string();
        let asked = tokio::time::timeout(
            MEMBERSHIP_CHECK,
            self.store.get::<MachineRecord>(BUCKET_MACHINES, &id),
        )
        .await;
        match asked {
            Ok(Ok(Some(_))) => {
                return Err(refused(format!(
                    "machine {id} is still a member of network `{}`",
                    file.network_name
                ))
                .with_hint(format!(
                    "remove it from another machine of the network: `ployzctl machine rm {id}`"
                )))
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) if !force => {
                return Err(e.with_hint(
                    "if the network removed this machine (`machine rm --force` while it was unreachable), run `ployzctl mesh leave --force`",
                ))
            }
            Err(_) if !force => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the store of network `{}` did not answer within {}, so this machine cannot tell whether it was removed",
                        file.network_name,
                        ployz_api::time::human(MEMBERSHIP_CHECK)
                    ),
                )
                .with_hint("if it was (`machine rm --force` elsewhere), run `ployzctl mesh leave --force`"))
            }
            _ => {}
        }
        tracing::warn!(network = %file.network_name, force, "leaving the network on this machine's own");
        let _ = self.leave("this machine (mesh leave)");
        loop {
            let p = self
                .leaving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_default();
            if p.finished {
                return Ok(LeftNetwork {
                    machine: id,
                    network: file.network_name,
                    removed_workloads: p.removed,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How far this machine's cleanup got (`LeaveStatus`).
    pub(crate) fn leave_status(&self) -> PeerResponse {
        PeerResponse::Leaving(
            self.leaving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_default(),
        )
    }
}
