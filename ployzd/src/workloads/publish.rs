//! The deploy's check of published ports, before anything changes: no
//! other service publishes the same host port, and no process on a
//! serving machine holds it (each machine tries to bind it, over the
//! machine RPC).

use super::*;
use crate::ingress::table::{claim_changes, clashes, serves};
use ployz_api::ports::{PortClaim, BUCKET_PORT_CLAIMS};

impl Workloads {
    pub(super) async fn check_ports(
        &self,
        service: &str,
        ports: &[PublishedPort],
        sink: &ProgressSink,
    ) -> Result<(), ApiError> {
        if ports.is_empty() {
            return Ok(());
        }
        let services: Vec<ServiceRecord> = self.store.values(BUCKET_SERVICES).await?;
        if let Some((p, owner)) = clashes(&services, service, ports).first() {
            return Err(invalid(format!(
                "host port {}/{} (`--publish {p}`) is already published by service `{owner}`",
                p.host_port, p.protocol
            ))
            .with_hint(format!(
                "pick another host port, or remove it from `{owner}` first"
            )));
        }
        let machines: Vec<MachineRecord> = self.store.values(BUCKET_MACHINES).await?;
        let asks = machines
            .iter()
            .filter(|m| serves(m.lifecycle))
            .map(|m| async move {
                if m.id == self.machine_id() {
                    return (m, Ok(self.ingress.check_ports(service, ports)));
                }
                let req = PeerRequest::CheckPorts {
                    service: service.to_string(),
                    ports: ports.to_vec(),
                };
                let answer = match self
                    .control
                    .call_machine(&m.id, &req, Duration::from_secs(10))
                    .await
                {
                    Ok(PeerResponse::PortOwners(o)) if o.len() == ports.len() => Ok(o),
                    Ok(PeerResponse::Error(e)) => Err(e.message),
                    Ok(_) => Err("it answered something else (an older ployzd?)".into()),
                    Err(e) => Err(e),
                };
                (m, answer)
            });
        for (m, answer) in futures_join_all(asks).await {
            match answer {
                Ok(owners) => {
                    if let Some((p, owner)) = ports
                        .iter()
                        .zip(owners)
                        .find_map(|(p, o)| o.map(|o| (p, o)))
                    {
                        return Err(invalid(format!(
                            "host port {}/{} (`--publish {p}`) is taken by {owner}",
                            p.host_port, p.protocol
                        ))
                        .with_hint("pick another host port, or stop what holds it"));
                    }
                }
                // Cannot tell: the machine will say so in its log when it
                // cannot listen; do not block a deploy on a machine that is down.
                Err(e) => note(
                    sink,
                    service,
                    "ports",
                    format!(
                        "machine {} did not say whether its host ports are free: {e}",
                        m.id
                    ),
                ),
            }
        }
        Ok(())
    }
}

impl Workloads {
    /// The store ops that move `service`'s host-port claims from `old` to
    /// `new` ports, each conditioned on the claim's revision as read here
    /// (a concurrent claim makes the write fail; the caller reads again and
    /// decides again). A port another service claimed is refused, exit 6.
    pub(super) async fn port_claim_ops(
        &self,
        service: &str,
        old: &[PublishedPort],
        new: &[PublishedPort],
    ) -> Result<Vec<ployz_consensus::Op>, ApiError> {
        if old.is_empty() && new.is_empty() {
            return Ok(Vec::new());
        }
        let mut current = HashMap::new();
        let mut revisions = HashMap::new();
        for p in old.iter().chain(new) {
            let key = p.claim_key();
            if revisions.contains_key(&key) {
                continue;
            }
            match self.store.get_entry(BUCKET_PORT_CLAIMS, &key).await? {
                Some(e) if e.is_live() => {
                    let claim = store::decode::<PortClaim>(&e)?;
                    revisions.insert(key.clone(), Some(claim.revision));
                    current.insert(key, claim.value);
                }
                _ => {
                    revisions.insert(key, None);
                }
            }
        }
        let changes = claim_changes(service, old, new, &current).map_err(|(p, owner)| {
            invalid(format!(
                "host port {}/{} (`--publish {p}`) is already published by service `{owner}`",
                p.host_port, p.protocol
            ))
            .with_hint(format!(
                "pick another host port, or remove it from `{owner}` first"
            ))
        })?;
        let mut ops = Vec::new();
        if !changes.is_empty() {
            ops.extend(store::records::ensure_bucket(BUCKET_PORT_CLAIMS));
        }
        for (key, claim) in changes {
            let expect = match revisions.get(&key).copied().flatten() {
                Some(r) => Expect::Revision(r),
                None => Expect::Absent,
            };
            ops.push(match claim {
                Some(c) => put(BUCKET_PORT_CLAIMS, &key, &c, expect),
                None => store::delete(BUCKET_PORT_CLAIMS, &key, expect),
            });
        }
        Ok(ops)
    }
}

/// Runs every future at once, answers in order.
async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    // The futures borrow `self`: poll them concurrently without spawning.
    let mut pending: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in set.iter_mut().enumerate() {
            if pending[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => pending[i] = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(pending.into_iter().map(|v| v.expect("all ready")));
    out
}
