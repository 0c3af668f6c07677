//! Long operations (`machine rm`, `machine add`, `machine update`,
//! `machine storage promote`, `service migrate`, `deploy`) as records
//! in the store, so that they can be followed from any machine (`op ls`,
//! `op wait`) and so that the cluster finishes or rolls back one whose
//! machine stopped running it.
//!
//! The machine running an operation (its owner) writes its record at every
//! step and renews it every [`RENEW_EVERY`]; when it cannot write it for
//! [`OWNER_LEASE`] it stops acting on the operation. The storage leader
//! takes over an operation only after it saw no change to its record for
//! [`stale_after`] by its own clock (longer than the lease plus a
//! forwarded call's deadline), so the owner and the leader never act on
//! the same operation at once; each takeover is a compare-and-set on the
//! revision the leader saw.
//!
//! State: the leader's observations of running operations (local only).

use crate::errors::internal;
use crate::identity::random_hex;
use crate::store::{self, put, Store, Versioned};
use ployz_api::time::now_ms;
use ployz_api::*;
use ployz_consensus::{Expect, Rejection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How often a running operation's owner renews its record.
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// An owner that could not write its record for this long stops acting.
const OWNER_LEASE: Duration = Duration::from_secs(20);
/// Finished operations are kept this long for `op ls`.
const KEEP_DONE: Duration = Duration::from_secs(24 * 3600);
/// At most this many finished operations are kept.
const KEEP_DONE_COUNT: usize = 200;

/// How long the leader waits, seeing no change to a running operation,
/// before it takes over: the owner's lease plus a forwarded call's deadline
/// plus a margin (40 s). `PLOYZ_OP_STALE_SECS` may make it longer.
fn stale_after() -> Duration {
    let min = OWNER_LEASE + store::forward::PEER_CALL_TIMEOUT + Duration::from_secs(5);
    std::env::var("PLOYZ_OP_STALE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(min)
        .max(min)
}

/// Operations of this cluster, as this machine sees and runs them.
pub struct Operations {
    store: Arc<Store>,
    /// Leader only: per running operation, the revision last seen and when
    /// (local monotonic clock) it was first seen at that revision.
    seen: Mutex<HashMap<String, (u64, Instant)>>,
}

/// An operation this machine runs. Dropping it stops the renewals; call
/// [`OpHandle::finish`] to record the outcome.
pub struct OpHandle {
    id: String,
    store: Arc<Store>,
    cur: Arc<tokio::sync::Mutex<Versioned<OperationRecord>>>,
    renewed: Arc<Mutex<Instant>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for OpHandle {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Why an owner may not go on with its operation.
fn lost(id: &str, why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("operation {id} stopped: {why}"),
    )
    .with_hint(format!(
        "the cluster finishes or rolls it back once the store answers again; `ployzctl op wait {id}` follows it"
    ))
}

/// Write `next` over `cur` with compare-and-set; `Ok(false)`: someone else
/// changed the record.
async fn write(
    store: &Store,
    cur: &mut Versioned<OperationRecord>,
    mut next: OperationRecord,
) -> Result<bool, ApiError> {
    next.updated_at_ms = now_ms().max(cur.value.updated_at_ms);
    let mut ops = store::records::ensure_bucket(BUCKET_OPERATIONS);
    ops.push(put(
        BUCKET_OPERATIONS,
        &next.id,
        &next,
        Expect::Revision(cur.revision),
    ));
    match store.txn(ops).await? {
        Ok(revs) => {
            *cur = Versioned {
                value: next,
                revision: *revs.last().unwrap_or(&cur.revision),
            };
            Ok(true)
        }
        Err((_, Rejection::WrongLastRevision { .. })) => Ok(false),
        Err((_, other)) => Err(internal(format!("operation record rejected: {other}"))),
    }
}

impl OpHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Record that the operation reached `step`. Fails when the owner lost
    /// its lease or the cluster took the operation over: stop then.
    pub async fn step(&self, step: &str, message: impl Into<String>) -> Result<(), ApiError> {
        self.check_lease()?;
        let mut cur = self.cur.lock().await;
        if cur.value.state.is_done() {
            return Err(lost(&self.id, "the cluster took it over"));
        }
        let mut next = cur.value.clone();
        next.step = step.to_string();
        next.message = message.into();
        if write(&self.store, &mut cur, next).await? {
            *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            Ok(())
        } else {
            Err(lost(&self.id, "the cluster took it over"))
        }
    }

    /// What the record says a takeover needs.
    pub async fn detail(&self) -> OpDetail {
        self.cur.lock().await.value.detail.clone()
    }

    /// Record the slot a migration places on its target (before placing it).
    pub async fn set_target_slot(&self, slot: u32) -> Result<(), ApiError> {
        self.record_detail(|d| d.target_slot = Some(slot)).await
    }

    /// Change what the record says a takeover needs (before acting on it).
    pub async fn record_detail(&self, change: impl FnOnce(&mut OpDetail)) -> Result<(), ApiError> {
        self.check_lease()?;
        let mut cur = self.cur.lock().await;
        if cur.value.state.is_done() {
            return Err(lost(&self.id, "the cluster took it over"));
        }
        let mut next = cur.value.clone();
        change(&mut next.detail);
        if write(&self.store, &mut cur, next).await? {
            *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            Ok(())
        } else {
            Err(lost(&self.id, "the cluster took it over"))
        }
    }

    /// Whether the owner still holds its lease.
    pub fn check_lease(&self) -> Result<(), ApiError> {
        let at = *self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        if at.elapsed() >= OWNER_LEASE {
            return Err(lost(
                &self.id,
                &format!(
                    "this machine could not record its progress for {}s",
                    OWNER_LEASE.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Record a failure: `RolledBack` when nothing was changed, else
    /// `Failed`, with the error's message and exit code.
    pub async fn end_with(self, changed: bool, e: &ApiError) {
        let state = if changed {
            OpState::Failed
        } else {
            OpState::RolledBack
        };
        self.finish(state, e.message.clone(), e.code.exit_code())
            .await
    }

    /// Record the outcome, retrying while the store is unavailable (up to
    /// the lease). `exit_code` is what `ployzctl` exits with for it.
    pub async fn finish(self, state: OpState, message: impl Into<String>, exit_code: i32) {
        let message = message.into();
        let deadline = Instant::now() + OWNER_LEASE;
        loop {
            let mut cur = self.cur.lock().await;
            if cur.value.state.is_done() {
                return;
            }
            let mut next = cur.value.clone();
            next.state = state;
            next.message = message.clone();
            next.exit_code = Some(exit_code);
            match write(&self.store, &mut cur, next).await {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(op = %self.id, "recording the outcome: {}", e.message);
                }
                Err(e) => {
                    tracing::warn!(op = %self.id, "cannot record the outcome ({}); the cluster will", e.message);
                    return;
                }
            }
            drop(cur);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Operations {
    pub fn new(store: Arc<Store>) -> Operations {
        Operations {
            store,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Start recording an operation run by this machine.
    pub async fn begin(
        &self,
        kind: OpKind,
        subject: &str,
        detail: OpDetail,
    ) -> Result<OpHandle, ApiError> {
        let now = now_ms();
        let rec = OperationRecord {
            id: format!("op-{}", random_hex(6)),
            kind,
            subject: subject.to_string(),
            owner: self.store.machine_id().to_string(),
            state: OpState::Running,
            step: "start".into(),
            message: String::new(),
            detail,
            started_at_ms: now,
            updated_at_ms: now,
            exit_code: None,
        };
        let mut ops = store::records::ensure_bucket(BUCKET_OPERATIONS);
        ops.push(put(BUCKET_OPERATIONS, &rec.id, &rec, Expect::Absent));
        let revs =
            self.store.txn(ops).await?.map_err(|(_, why)| {
                internal(format!("recording the operation was rejected: {why}"))
            })?;
        let cur = Arc::new(tokio::sync::Mutex::new(Versioned {
            revision: *revs.last().unwrap_or(&0),
            value: rec.clone(),
        }));
        let renewed = Arc::new(Mutex::new(Instant::now()));
        let renewer = tokio::spawn(renew(self.store.clone(), cur.clone(), renewed.clone()));
        tracing::info!(op = %rec.id, kind = %kind, subject, "operation started");
        Ok(OpHandle {
            id: rec.id,
            store: self.store.clone(),
            cur,
            renewed,
            renewer,
        })
    }

    pub(crate) async fn records(&self) -> Result<Vec<Versioned<OperationRecord>>, ApiError> {
        let mut all = self
            .store
            .list::<OperationRecord>(BUCKET_OPERATIONS)
            .await?;
        all.sort_by(|a, b| {
            (b.value.started_at_ms, &b.value.id).cmp(&(a.value.started_at_ms, &a.value.id))
        });
        Ok(all)
    }

    /// `op ls`: newest first.
    pub async fn list(&self) -> Result<OpList, ApiError> {
        self.store.require_network().await?;
        Ok(OpList {
            operations: self
                .records()
                .await?
                .iter()
                .map(|r| OpView::from(&r.value))
                .collect(),
        })
    }

    /// `op wait`: until the operation ends or `timeout` passes.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<OpView, ApiError> {
        self.store.require_network().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let rec = self
                .store
                .get::<OperationRecord>(BUCKET_OPERATIONS, id)
                .await?
                .ok_or_else(|| {
                    ApiError::new(ErrorCode::NotFound, format!("no operation `{id}`"))
                        .with_hint("`ployzctl op ls` lists the operations")
                })?;
            if rec.value.state.is_done() {
                return Ok(OpView::from(&rec.value));
            }
            if Instant::now() >= deadline {
                return Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!(
                        "operation {id} ({} {}) is still running after {}s, at step {}",
                        rec.value.kind,
                        rec.value.subject,
                        timeout.as_secs(),
                        rec.value.step
                    ),
                )
                .with_hint(format!(
                    "wait longer: `ployzctl op wait {id} --timeout-secs 600`"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Leader only: running operations whose record did not change for
    /// [`stale_after`] as seen from here, oldest first; and drop finished
    /// ones past their keep time.
    pub(crate) async fn stale(&self) -> Result<Vec<Versioned<OperationRecord>>, ApiError> {
        let all = self.records().await?;
        let now = Instant::now();
        let limit = stale_after();
        let mut out = Vec::new();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.retain(|id, _| {
                all.iter()
                    .any(|r| r.value.id == *id && !r.value.state.is_done())
            });
            for r in all.iter().filter(|r| !r.value.state.is_done()) {
                let e = seen.entry(r.value.id.clone()).or_insert((r.revision, now));
                if e.0 != r.revision {
                    *e = (r.revision, now);
                } else if now.duration_since(e.1) >= limit {
                    out.push(r.clone());
                }
            }
        }
        out.reverse();
        let wall = now_ms();
        let done: Vec<&Versioned<OperationRecord>> =
            all.iter().filter(|r| r.value.state.is_done()).collect();
        let old: Vec<_> = done
            .iter()
            .enumerate()
            .filter(|(n, r)| {
                *n >= KEEP_DONE_COUNT
                    || wall.saturating_sub(r.value.updated_at_ms) > KEEP_DONE.as_millis() as u64
            })
            .map(|(_, r)| {
                store::delete(BUCKET_OPERATIONS, &r.value.id, Expect::Revision(r.revision))
            })
            .collect();
        if !old.is_empty() {
            let _ = self.store.txn(old).await?;
        }
        Ok(out)
    }

    /// Leader: record the outcome of an operation it took over, if nobody
    /// changed it since `seen`. `Ok(false)`: it changed; look again later.
    pub(crate) async fn take_over(
        &self,
        seen: &Versioned<OperationRecord>,
        state: OpState,
        message: String,
        exit_code: i32,
    ) -> Result<bool, ApiError> {
        let mut cur = seen.clone();
        let mut next = cur.value.clone();
        next.state = state;
        next.message = message;
        next.exit_code = Some(exit_code);
        let done = write(&self.store, &mut cur, next).await?;
        if done {
            tracing::warn!(op = %seen.value.id, kind = %seen.value.kind, subject = %seen.value.subject, owner = %seen.value.owner, %state, "took over an operation its owner stopped running");
        }
        Ok(done)
    }

    /// Leader: claim a stale operation, let `decide` work out (and do) what
    /// ends it, and record that outcome, naming the owner that stopped.
    pub(crate) async fn end_stale<Fut>(
        &self,
        op: Versioned<OperationRecord>,
        decide: impl FnOnce(Versioned<OperationRecord>) -> Fut,
    ) -> Result<(), ApiError>
    where
        Fut: std::future::Future<Output = Result<(OpState, String, i32), ApiError>>,
    {
        let owner = op.value.owner.clone();
        let Some(op) = self.claim(&op).await? else {
            return Ok(());
        };
        let (state, message, code) = decide(op.clone()).await?;
        let message = format!("{message} (its owner {owner} stopped; ended by the storage leader)");
        self.take_over(&op, state, message, code).await?;
        Ok(())
    }

    /// Leader: claim a stale operation before acting on it (so a late
    /// owner's next step fails), returning the claimed record.
    pub(crate) async fn claim(
        &self,
        seen: &Versioned<OperationRecord>,
    ) -> Result<Option<Versioned<OperationRecord>>, ApiError> {
        let mut cur = seen.clone();
        let mut next = cur.value.clone();
        next.owner = self.store.machine_id().to_string();
        next.message = format!(
            "taken over from {} (no progress for {}s)",
            seen.value.owner,
            stale_after().as_secs()
        );
        Ok(if write(&self.store, &mut cur, next).await? {
            Some(cur)
        } else {
            None
        })
    }
}

/// Renew the record every [`RENEW_EVERY`] while the operation runs.
async fn renew(
    store: Arc<Store>,
    cur: Arc<tokio::sync::Mutex<Versioned<OperationRecord>>>,
    renewed: Arc<Mutex<Instant>>,
) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        // A step written since counts as a renewal.
        let fresh = renewed.lock().unwrap_or_else(|e| e.into_inner()).elapsed() < RENEW_EVERY;
        let mut c = cur.lock().await;
        if c.value.state.is_done() {
            return;
        }
        if fresh {
            continue;
        }
        let next = c.value.clone();
        match write(&store, &mut c, next).await {
            Ok(true) => *renewed.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now(),
            Ok(false) => return,
            Err(e) => tracing::debug!(op = %c.value.id, "renewing: {}", e.message),
        }
    }
}
