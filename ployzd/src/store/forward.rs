//! Forwarding store requests over the peer channel: to the Raft leader
//! when this replica knows it, else to any storage machine this machine
//! knows, which forwards in turn (at most [`MAX_HOPS`] times).

use super::{no_network, unavailable, Store};
use crate::peer::{self, PeerRequest, PeerResponse};
use ployz_api::ApiError;
use ployz_consensus::PloyzNode;
use std::time::Duration;

/// Forwarding hops before a request is considered looping.
const MAX_HOPS: u8 = 3;
/// Deadline of one forwarded call.
pub(crate) const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(15);

impl Store {
    async fn forward(&self, addr: &str, req: PeerRequest) -> Result<PeerResponse, ApiError> {
        let secret = self.local.secret().get().ok_or_else(no_network)?;
        peer::call(addr, &secret, &self.machine_id, &req, PEER_CALL_TIMEOUT)
            .await
            .map_err(|e| unavailable(format!("forwarding to {addr} failed: {e}")))
    }

    /// Forward to the storage machines this one knows, first answer wins.
    async fn forward_any(&self, req: PeerRequest) -> Result<PeerResponse, ApiError> {
        let peers = match self.local.get() {
            Some(f) => f.storage_peers,
            None => return Err(no_network()),
        };
        let mut errors = Vec::new();
        for (id, addr) in peers.iter().filter(|(id, _)| *id != self.machine_id) {
            match self.forward(addr, req.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) => errors.push(format!("{id} ({addr}): {}", e.message)),
            }
        }
        Err(unavailable(format!(
            "no storage machine answered [{}]",
            errors.join("; ")
        )))
    }

    /// Send `req` to `leader` (or, not knowing one, to any storage machine).
    pub(super) async fn route(
        &self,
        leader: Option<PloyzNode>,
        req: PeerRequest,
        hops: u8,
    ) -> Result<PeerResponse, ApiError> {
        if hops >= MAX_HOPS {
            return Err(unavailable(
                "the request was forwarded too many times (leadership is changing); retry",
            ));
        }
        match leader {
            Some(n) if !n.addr.is_empty() && n.machine_id != self.machine_id => {
                self.forward(&n.addr, req).await
            }
            Some(_) => Err(unavailable(
                "no storage leader is elected right now (an election is in progress, or a majority of storage machines is unreachable)",
            )),
            None => self.forward_any(req).await,
        }
    }

    /// Send a peer request to the Raft leader (through a storage machine
    /// when this one holds no replica), waiting up to `timeout`. A
    /// `PeerResponse::Error` is returned as the error.
    pub(crate) async fn relay_to_leader(
        &self,
        req: PeerRequest,
        hops: u8,
        timeout: Duration,
    ) -> Result<PeerResponse, ApiError> {
        if hops >= MAX_HOPS {
            return Err(unavailable(
                "no stable storage leader to run this on; retry",
            ));
        }
        let m = self.node.raft().metrics().borrow().clone();
        let leader = m
            .current_leader
            .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
        let secret = self.local.secret().get().ok_or_else(no_network)?;
        let targets: Vec<String> = match leader {
            Some(n) if n.machine_id != self.machine_id => vec![n.addr],
            _ => self
                .local
                .get()
                .map(|f| f.storage_peers.into_iter().map(|(_, a)| a).collect())
                .unwrap_or_default(),
        };
        let mut errors = Vec::new();
        for addr in targets {
            match peer::call(&addr, &secret, &self.machine_id, &req, timeout).await {
                Ok(PeerResponse::Error(e)) => return Err(e),
                Ok(r) => return Ok(r),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(unavailable(format!(
            "cannot reach the storage leader [{}]",
            errors.join("; ")
        )))
    }
}
