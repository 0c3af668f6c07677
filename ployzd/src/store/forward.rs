//! Store requests this machine's replica cannot serve itself, sent over the
//! peer channel to the Raft leader when this replica knows it, else to the
//! storage machines this machine knows, which forward in turn (at most
//! [`MAX_HOPS`] times).
//!
//! A request made on this machine is retried until it is answered or
//! [`PEER_CALL_TIMEOUT`] has passed: a transport error or a "no leader"
//! answer is not an outcome. Writes are safe to resend because each carries
//! an idempotency key ([`Txn::id`]): the store applies it once and answers
//! every resend with the first outcome, so a write that committed just
//! before its leader died is answered by that outcome, not by the transport
//! error. Reads are idempotent anyway. Every attempt re-resolves the leader
//! from this replica's Raft metrics, and a call in flight to a leader is
//! abandoned as soon as the replica learns of another one. Requests
//! forwarded from another machine are attempted once here: only the machine
//! the request started on retries, so retries never multiply along a chain.

use super::{no_network, records, unavailable, Store};
use crate::peer::{self, KvRead, KvReadResult, PeerRequest, PeerResponse};
use ployz_api::{ApiError, ErrorCode};
use ployz_consensus::{PloyzNode, ReadError, Txn, TxnResult, WriteError};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// Forwarding hops before a request is considered looping.
const MAX_HOPS: u8 = 3;
/// How long a store request made on this machine is retried, overall; also
/// the deadline of one relayed call ([`Store::relay_to_leader`]).
pub(crate) const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two attempts that both failed (not after a leader change).
const RETRY_BACKOFF: Duration = Duration::from_millis(150);
/// A machine that did not answer goes to the back of the line for this long,
/// so an attempt tries a live one first instead of waiting for a connect
/// timeout on a dead one.
const FAILED_COOLDOWN: Duration = Duration::from_secs(3);

/// A store request: a write (whose transaction carries its idempotency key)
/// or a linearizable read.
#[derive(Debug, Clone)]
pub(crate) enum StoreCall {
    Write(Txn),
    Read(KvRead),
}

/// The answer to a [`StoreCall`].
#[derive(Debug)]
pub(crate) enum StoreAnswer {
    Written(TxnResult),
    Read(KvReadResult),
}

impl StoreCall {
    fn to_peer(&self, hops: u8) -> PeerRequest {
        match self {
            StoreCall::Write(txn) => PeerRequest::Write {
                txn: txn.clone(),
                hops,
            },
            StoreCall::Read(read) => PeerRequest::Read {
                read: read.clone(),
                hops,
            },
        }
    }

    /// A peer's answer: `None` when it says to try again (it could not reach
    /// a leader either).
    fn answer(&self, resp: PeerResponse) -> Option<Result<StoreAnswer, ApiError>> {
        Some(match (self, resp) {
            (_, PeerResponse::Error(e)) if e.code == ErrorCode::Unavailable => return None,
            (_, PeerResponse::Error(e)) => Err(e),
            (StoreCall::Write(_), PeerResponse::Written(r)) => Ok(StoreAnswer::Written(r)),
            (StoreCall::Read(_), PeerResponse::Read(r)) => Ok(StoreAnswer::Read(r)),
            (_, other) => Err(crate::errors::internal(format!(
                "unexpected peer answer {other:?}"
            ))),
        })
    }
}

/// What the local replica made of a call.
enum Local {
    /// Served here (or failed for good).
    Answered(Result<StoreAnswer, ApiError>),
    /// Not the leader: this one is.
    Leader(PloyzNode),
    /// No replica here, or it knows no leader's address: any storage machine.
    Anyone,
    /// The replica cannot serve it right now (no leader, no quorum yet).
    NotNow(String),
}

/// How one attempt ended.
enum Step {
    Done(Result<StoreAnswer, ApiError>),
    /// Try again after [`RETRY_BACKOFF`].
    Later,
    /// Try again at once: the leader changed.
    Now,
}

/// What was tried, for choosing the next target and for the final error.
#[derive(Default)]
struct Tried {
    attempts: u32,
    /// Last failure per target (machine id, or "local replica").
    errors: BTreeMap<String, String>,
    /// When each machine last failed to answer.
    failed_at: BTreeMap<String, Instant>,
}

impl Tried {
    fn note(&mut self, target: &str, why: impl std::fmt::Display) {
        self.errors.insert(target.to_string(), why.to_string());
    }

    fn unreachable(&mut self, id: &str, addr: &str, why: impl std::fmt::Display) {
        self.note(id, format!("{addr}: {why}"));
        self.failed_at.insert(id.to_string(), Instant::now());
    }

    fn recently_failed(&self, now: Instant) -> BTreeSet<String> {
        self.failed_at
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) < FAILED_COOLDOWN)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn give_up(&self, started: Instant) -> ApiError {
        let tried: Vec<String> = self
            .errors
            .iter()
            .map(|(target, why)| format!("{target}: {why}"))
            .collect();
        unavailable(format!(
            "no answer after {} attempt(s) in {:.1?} [{}]",
            self.attempts,
            started.elapsed(),
            tried.join("; ")
        ))
    }
}

/// Where to send a call, best first: the leader this replica knows, then
/// (when `fan_out`, or when no leader is known) the other storage machines;
/// machines that failed lately go last, in the same order. Never this
/// machine itself.
pub(crate) fn candidates(
    leader: Option<&PloyzNode>,
    storage: &[(String, String)],
    me: &str,
    recently_failed: &BTreeSet<String>,
    fan_out: bool,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let usable_leader = leader.filter(|l| l.machine_id != me && !l.addr.is_empty());
    if let Some(l) = usable_leader {
        out.push((l.machine_id.clone(), l.addr.clone()));
    }
    if usable_leader.is_none() || fan_out {
        for (id, addr) in storage {
            if id != me && !addr.is_empty() && !out.iter().any(|(o, _)| o == id) {
                out.push((id.clone(), addr.clone()));
            }
        }
    }
    // Stable: the order above holds within each group.
    out.sort_by_key(|(id, _)| recently_failed.contains(id));
    out
}

/// A fresh idempotency key: this machine's id prefix and 128 random bits.
pub(crate) fn new_txn_id(machine_id: &str) -> String {
    let prefix: String = machine_id.chars().take(12).collect();
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

impl Store {
    /// Serve `call` here or forward it; retried until [`PEER_CALL_TIMEOUT`]
    /// when it started on this machine (`hops == 0`).
    pub(crate) async fn call(&self, call: StoreCall, hops: u8) -> Result<StoreAnswer, ApiError> {
        let started = Instant::now();
        let deadline = started + PEER_CALL_TIMEOUT;
        let mut tried = Tried::default();
        loop {
            tried.attempts += 1;
            match self.attempt(&call, hops, deadline, &mut tried).await {
                Step::Done(r) => {
                    if tried.attempts > 1 {
                        tracing::info!(
                            attempts = tried.attempts,
                            elapsed = ?started.elapsed(),
                            ok = r.is_ok(),
                            "store request answered after retrying"
                        );
                    }
                    return r;
                }
                Step::Later if hops == 0 => {
                    if Instant::now() + RETRY_BACKOFF >= deadline {
                        return Err(tried.give_up(started));
                    }
                    tokio::time::sleep(RETRY_BACKOFF).await;
                }
                // Also for a forwarded request: only a new leader causes it.
                Step::Now if Instant::now() < deadline => {}
                _ => return Err(tried.give_up(started)),
            }
        }
    }

    /// One attempt: the local replica, else the leader or the storage
    /// machines, first live answer wins.
    async fn attempt(
        &self,
        call: &StoreCall,
        hops: u8,
        deadline: Instant,
        tried: &mut Tried,
    ) -> Step {
        let mut metrics = self.node.raft().metrics();
        let known_leader = metrics.borrow_and_update().current_leader;
        let leader = match self.try_local(call, deadline).await {
            Local::Answered(r) => return Step::Done(r),
            Local::NotNow(why) => {
                tried.note("local replica", why);
                return Step::Later;
            }
            Local::Leader(n) => Some(n),
            Local::Anyone => None,
        };
        if hops >= MAX_HOPS {
            tried.note(
                "forwarding",
                "the request was forwarded too many times (leadership is changing)",
            );
            return Step::Later;
        }
        let Some(secret) = self.local.secret().get() else {
            return Step::Done(Err(no_network()));
        };
        let storage = self.storage_targets();
        let targets = candidates(
            leader.as_ref(),
            &storage,
            &self.machine_id,
            &tried.recently_failed(Instant::now()),
            hops == 0,
        );
        if targets.is_empty() {
            tried.note(
                "forwarding",
                "no storage machine known to forward to (an election may be in progress)",
            );
            return Step::Later;
        }
        let req = call.to_peer(hops + 1);
        for (id, addr) in targets {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let sent = peer::call(&addr, &secret, &self.machine_id, &req, remaining);
            // Re-route at once when this replica learns of a new leader
            // while waiting on the old one (kill -9: its connection hangs).
            let changed = async {
                let new_leader = metrics
                    .wait_for(|m| m.current_leader.is_some() && m.current_leader != known_leader);
                if new_leader.await.is_err() {
                    // Raft stopped: no news will come, wait for the call.
                    std::future::pending::<()>().await;
                }
            };
            let resp = tokio::select! {
                r = sent => r,
                _ = changed => {
                    tried.note(&id, format!("{addr}: abandoned, the leader changed"));
                    return Step::Now;
                }
            };
            match resp {
                Ok(resp) => match call.answer(resp) {
                    Some(r) => return Step::Done(r),
                    None => {
                        tried.note(&id, format!("{addr}: could not reach a leader either"));
                        return Step::Later;
                    }
                },
                Err(e) => tried.unreachable(&id, &addr, e),
            }
        }
        Step::Later
    }

    /// The storage machines as `(machine_id, peer_addr)`: this replica's
    /// voters, then the ones remembered in `cluster.json`.
    fn storage_targets(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .voters()
            .into_iter()
            .map(|(_, n)| (n.machine_id, n.addr))
            .collect();
        if let Some(f) = self.local.get() {
            for p in f.storage_peers {
                if !all.iter().any(|(id, _)| *id == p.0) {
                    all.push(p);
                }
            }
        }
        all
    }

    /// Try `call` on the local replica.
    async fn try_local(&self, call: &StoreCall, deadline: Instant) -> Local {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match call {
            StoreCall::Write(txn) => match self.node.write_timeout(txn.clone(), remaining).await {
                Ok(r) => Local::Answered(Ok(StoreAnswer::Written(r))),
                Err(WriteError::ForwardToLeader {
                    leader_node: Some(n),
                    ..
                }) if !n.addr.is_empty() => Local::Leader(n),
                Err(WriteError::ForwardToLeader { .. } | WriteError::NotInitialized) => {
                    Local::Anyone
                }
                Err(e @ WriteError::Timeout { .. }) => Local::NotNow(e.to_string()),
                Err(e) => Local::Answered(Err(records::map_write(e))),
            },
            StoreCall::Read(read) => {
                match tokio::time::timeout_at(deadline, self.read_local(read)).await {
                    Err(_) => Local::NotNow(format!("no leader or no quorum within {remaining:?}")),
                    Ok(Ok(r)) => Local::Answered(Ok(StoreAnswer::Read(r))),
                    Ok(Err(ReadError::NoSuchBucket { bucket })) => {
                        Local::Answered(Ok(StoreAnswer::Read(KvReadResult::NoSuchBucket(bucket))))
                    }
                    Ok(Err(ReadError::ForwardToLeader {
                        leader_node: Some(n),
                        ..
                    })) if !n.addr.is_empty() => Local::Leader(n),
                    Ok(Err(ReadError::ForwardToLeader { .. } | ReadError::NotInitialized)) => {
                        Local::Anyone
                    }
                    Ok(Err(e @ (ReadError::NoQuorum(_) | ReadError::Timeout { .. }))) => {
                        Local::NotNow(e.to_string())
                    }
                    Ok(Err(e)) => Local::Answered(Err(records::map_read(e))),
                }
            }
        }
    }

    /// A linearizable read from the local replica.
    async fn read_local(&self, read: &KvRead) -> Result<KvReadResult, ReadError> {
        match read {
            KvRead::Get { bucket, key } => {
                self.node.get(bucket, key).await.map(KvReadResult::Entry)
            }
            KvRead::List { bucket } => self.node.list(bucket).await.map(KvReadResult::Entries),
            KvRead::ListAll { bucket } => {
                self.node.list_all(bucket).await.map(KvReadResult::Entries)
            }
            KvRead::History { bucket, key } => self
                .node
                .history(bucket, key)
                .await
                .map(KvReadResult::Entries),
            KvRead::Bucket { bucket } => self.node.bucket(bucket).await.map(KvReadResult::Bucket),
            KvRead::Buckets => {
                if self.node.is_initialized().await {
                    self.node.buckets_local().map(KvReadResult::Buckets)
                } else {
                    Err(ReadError::NotInitialized)
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> PloyzNode {
        PloyzNode {
            machine_id: id.into(),
            addr: format!("{id}:7000"),
        }
    }

    fn storage() -> Vec<(String, String)> {
        ["a", "b", "c"]
            .iter()
            .map(|id| (id.to_string(), format!("{id}:7000")))
            .collect()
    }

    fn ids(c: &[(String, String)]) -> Vec<&str> {
        c.iter().map(|(id, _)| id.as_str()).collect()
    }

    #[test]
    fn the_leader_first_and_the_others_only_when_fanning_out() {
        let none = BTreeSet::new();
        let l = node("c");
        assert_eq!(
            ids(&candidates(Some(&l), &storage(), "a", &none, true)),
            ["c", "b"]
        );
        assert_eq!(
            ids(&candidates(Some(&l), &storage(), "a", &none, false)),
            ["c"]
        );
    }

    #[test]
    fn without_a_leader_every_other_storage_machine() {
        let none = BTreeSet::new();
        assert_eq!(
            ids(&candidates(None, &storage(), "b", &none, false)),
            ["a", "c"]
        );
        // A leader without an address, or this machine itself, is no leader.
        let blank = PloyzNode {
            machine_id: "c".into(),
            addr: String::new(),
        };
        assert_eq!(
            ids(&candidates(Some(&blank), &storage(), "b", &none, false)),
            ["a", "c"]
        );
        assert_eq!(
            ids(&candidates(Some(&node("b")), &storage(), "b", &none, false)),
            ["a", "c"]
        );
        assert!(candidates(None, &[], "b", &none, true).is_empty());
    }

    #[test]
    fn machines_that_just_failed_go_last() {
        let failed: BTreeSet<String> = ["c".to_string()].into();
        // The dead leader is still tried, but after the live machines.
        assert_eq!(
            ids(&candidates(
                Some(&node("c")),
                &storage(),
                "a",
                &failed,
                true
            )),
            ["b", "c"]
        );
        let failed: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        assert_eq!(
            ids(&candidates(None, &storage(), "x", &failed, true)),
            ["c", "a", "b"]
        );
    }

    #[test]
    fn txn_ids_are_unique_and_name_the_machine() {
        let a = new_txn_id("0123456789abcdef");
        let b = new_txn_id("0123456789abcdef");
        assert_ne!(a, b);
        assert!(a.starts_with("0123456789ab-"), "{a}");
        assert_eq!(a.len(), 12 + 1 + 32);
    }
}
