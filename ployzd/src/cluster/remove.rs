//! Leaving the network: `machine rm` on the remover's side, and the
//! cleanup the removed machine runs when asked to leave.

use super::Cluster;
use crate::errors::{internal, refused};
use crate::peer::{self, PeerRequest, PeerResponse};
use crate::store::{self, forward::PEER_CALL_TIMEOUT};
use ployz_api::*;
use ployz_consensus::Expect;
use std::time::Duration;

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
        self.store
            .update_machine_record(&id, |m| {
                m.lifecycle = Lifecycle::Leaving;
                true
            })
            .await?;
        let mut cleaned_up = false;
        if !force {
            match self
                .control
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
        if let Err(e) = self.workloads.forget_machine(&id).await {
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
        if let Err((_, why)) = self.store.txn(ops).await? {
            return Err(internal(format!(
                "deleting the records was rejected: {why}"
            )));
        }
        tracing::info!(machine = %id, force, "removed");
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

    /// The network asked this machine to leave: stop, forget the network,
    /// wipe the data directory, exit.
    pub(crate) async fn leave(&self, by: &str) -> peer::PeerResponse {
        tracing::warn!(by, "asked to leave the network: cleaning up");
        let removed = self.workloads.remove_all().await;
        tracing::info!(removed, "workloads stopped and deleted");
        let exit = self.exit.clone();
        // Answer first; the cleanup runs after the reply is on its way.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = exit.send(true);
        });
        peer::PeerResponse::Left
    }
}
