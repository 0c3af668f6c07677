//! The transaction rules: `(view, txn) -> Plan`, a pure function.
//!
//! [`plan`] reads the current state through a [`KvView`], layers the effects of each op over it
//! (so later ops see earlier ones), and returns either the list of [`Mutation`]s and
//! [`KvEvent`]s to execute, or the first op's [`Rejection`] with no mutations at all.
//!
//! Before that, [`plan`] settles idempotency: a transaction whose [`Txn::id`] the view remembers
//! is a duplicate and answers the remembered result; any other transaction forgets the ids
//! older than [`TXN_ID_RETENTION_MS`] (by its own `now_ms`) and, with an id, is remembered.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use super::names::validate_bucket_name;
use super::names::validate_key;
use super::AppliedTxn;
use super::BucketConfig;
use super::BucketState;
use super::Entry;
use super::EntryMeta;
use super::EntryOp;
use super::Expect;
use super::KvEvent;
use super::Op;
use super::Rejection;
use super::Txn;
use super::TxnResult;

/// How long (in proposer time) the outcome of a transaction with an id is remembered: a retry
/// within this window answers the first outcome. Far longer than any client retries (ployzd
/// gives up after 15 s), so clocks that disagree by minutes still dedupe.
pub const TXN_ID_RETENTION_MS: u64 = 10 * 60 * 1000;

/// Read-only access to the committed state the rules run against.
pub trait KvView {
    type Error;

    /// The remembered outcome of the transaction with this id.
    fn applied_txn(&self, id: &str) -> Result<Option<AppliedTxn>, Self::Error>;

    /// `(now_ms, id)` of the remembered transactions with `now_ms < before_ms`.
    fn applied_txns_before(&self, before_ms: u64) -> Result<Vec<(u64, String)>, Self::Error>;

    fn bucket(&self, bucket: &str) -> Result<Option<BucketState>, Self::Error>;

    /// The key's latest entry (a put or a tombstone), if the key has any entry.
    fn latest(&self, bucket: &str, key: &str) -> Result<Option<Entry>, Self::Error>;

    /// What planning a write needs of the key's latest entry. Views that store entries encoded
    /// answer it without decoding the value.
    fn latest_meta(&self, bucket: &str, key: &str) -> Result<Option<EntryMeta>, Self::Error> {
        Ok(self.latest(bucket, key)?.as_ref().map(EntryMeta::of))
    }

    /// Revisions of the key's stored entries, ascending (the last one is the latest).
    fn revisions(&self, bucket: &str, key: &str) -> Result<Vec<u64>, Self::Error>;
}

/// A write to execute, in order. Executors apply a whole plan atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Create or update a bucket record.
    PutBucket { bucket: String, state: BucketState },
    /// Drop the bucket record and every entry of the bucket (as of before this mutation).
    RemoveBucket { bucket: String },
    /// Store an entry in the key's history and make it the key's latest entry.
    PutEntry {
        entry: Entry,
        /// The key's latest entry before this one was a put (executors keep live-key counts
        /// without reading it again).
        replaces_live: bool,
    },
    /// Drop one history entry (never the latest).
    RemoveHistory {
        bucket: String,
        key: String,
        revision: u64,
        /// The dropped entry's value length, when the plan knows it (it was the latest);
        /// `None`: executors read it.
        value_len: Option<u64>,
    },
}

/// What a transaction does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub result: TxnResult,
    /// Data writes; empty for a rejected or duplicate transaction.
    pub mutations: Vec<Mutation>,
    /// Notifications to publish once the mutations are applied; empty when rejected or
    /// duplicate.
    pub events: Vec<KvEvent>,
    /// The outcome to remember under the transaction's id (rejections too); executed in the
    /// same atomic batch as `mutations`.
    pub remember: Option<AppliedTxn>,
    /// `(now_ms, id)` of remembered outcomes to forget, executed in the same batch.
    pub forget: Vec<(u64, String)>,
    /// The transaction's id was already applied: `result` is the first outcome and nothing
    /// changes.
    pub duplicate: bool,
}

/// Decides the outcome of `txn` against `view`. Only a failing read of `view` is an error; a
/// refused op is an `Ok` plan with [`TxnResult::Rejected`].
pub fn plan<V: KvView>(view: &V, txn: &Txn) -> Result<Plan, V::Error> {
    if let Some(id) = &txn.id {
        if let Some(first) = view.applied_txn(id)? {
            return Ok(Plan {
                result: first.result,
                mutations: Vec::new(),
                events: Vec::new(),
                remember: None,
                forget: Vec::new(),
                duplicate: true,
            });
        }
    }
    let (result, out) = plan_ops(view, txn)?;
    let forget = view.applied_txns_before(txn.now_ms.saturating_sub(TXN_ID_RETENTION_MS))?;
    let remember = txn.id.as_ref().map(|id| AppliedTxn {
        id: id.clone(),
        now_ms: txn.now_ms,
        result: result.clone(),
    });
    Ok(Plan {
        result,
        mutations: out.mutations,
        events: out.events,
        remember,
        forget,
        duplicate: false,
    })
}

/// The ops' outcome and, when they all apply, their writes and events.
fn plan_ops<V: KvView>(view: &V, txn: &Txn) -> Result<(TxnResult, Output), V::Error> {
    let mut ov = Overlay {
        view,
        buckets: BTreeMap::new(),
        wiped: BTreeSet::new(),
        keys: BTreeMap::new(),
    };
    let mut out = Output::default();
    let mut revisions = Vec::with_capacity(txn.ops.len());
    for (op_index, op) in txn.ops.iter().enumerate() {
        match apply_op(&mut ov, op, txn.now_ms, &mut out)? {
            Ok(revision) => revisions.push(revision),
            Err(reason) => {
                return Ok((TxnResult::Rejected { op_index, reason }, Output::default()))
            }
        }
    }
    Ok((TxnResult::Applied { revisions }, out))
}

#[derive(Default)]
struct Output {
    mutations: Vec<Mutation>,
    events: Vec<KvEvent>,
}

#[derive(Debug, Clone, Default)]
struct KeyState {
    latest: Option<EntryMeta>,
    /// Revisions of the key's stored entries, ascending; `None` until a write needs them.
    revisions: Option<Vec<u64>>,
}

/// The view plus the effects of the ops planned so far.
struct Overlay<'v, V> {
    view: &'v V,
    /// Buckets touched by this transaction; `None` = deleted (its old entries are gone too).
    buckets: BTreeMap<String, Option<BucketState>>,
    /// Buckets deleted earlier in this transaction: the view's entries of these buckets no
    /// longer exist, even if the bucket was created again since.
    wiped: BTreeSet<String>,
    /// Keys touched by this transaction.
    keys: BTreeMap<(String, String), KeyState>,
}

impl<V: KvView> Overlay<'_, V> {
    fn bucket(&self, bucket: &str) -> Result<Option<BucketState>, V::Error> {
        match self.buckets.get(bucket) {
            Some(state) => Ok(*state),
            None => self.view.bucket(bucket),
        }
    }

    /// The key's state; with `revisions`, its stored revisions loaded too.
    fn key(&mut self, bucket: &str, key: &str, revisions: bool) -> Result<&mut KeyState, V::Error> {
        let id = (bucket.to_string(), key.to_string());
        if !self.keys.contains_key(&id) {
            let state = if self.wiped.contains(bucket) {
                KeyState {
                    latest: None,
                    revisions: Some(Vec::new()),
                }
            } else {
                KeyState {
                    latest: self.view.latest_meta(bucket, key)?,
                    revisions: None,
                }
            };
            self.keys.insert(id.clone(), state);
        }
        let ks = self.keys.entry(id).or_default();
        if revisions && ks.revisions.is_none() {
            ks.revisions = Some(self.view.revisions(bucket, key)?);
        }
        Ok(ks)
    }

    fn delete_bucket(&mut self, bucket: &str) {
        self.buckets.insert(bucket.to_string(), None);
        self.keys.retain(|(b, _), _| b != bucket);
        self.wiped.insert(bucket.to_string());
    }
}

fn apply_op<V: KvView>(
    ov: &mut Overlay<'_, V>,
    op: &Op,
    now_ms: u64,
    out: &mut Output,
) -> Result<Result<u64, Rejection>, V::Error> {
    match op {
        Op::CreateBucket { bucket, config } => create_bucket(ov, bucket, config, now_ms, out),
        Op::DeleteBucket { bucket } => {
            if let Err(e) = validate_bucket_name(bucket) {
                return Ok(Err(Rejection::InvalidName(e)));
            }
            if ov.bucket(bucket)?.is_none() {
                return Ok(Err(Rejection::NoSuchBucket));
            }
            ov.delete_bucket(bucket);
            out.mutations.push(Mutation::RemoveBucket {
                bucket: bucket.clone(),
            });
            out.events.push(KvEvent::BucketDeleted {
                bucket: bucket.clone(),
            });
            Ok(Ok(0))
        }
        Op::Put {
            bucket,
            key,
            value,
            expect,
        } => write_entry(
            ov,
            Write {
                bucket,
                key,
                value,
                op: EntryOp::Put,
                expect: *expect,
                now_ms,
            },
            out,
        ),
        Op::Delete {
            bucket,
            key,
            expect,
            purge,
        } => write_entry(
            ov,
            Write {
                bucket,
                key,
                value: &[],
                op: if *purge {
                    EntryOp::Purge
                } else {
                    EntryOp::Delete
                },
                expect: *expect,
                now_ms,
            },
            out,
        ),
    }
}

fn create_bucket<V: KvView>(
    ov: &mut Overlay<'_, V>,
    bucket: &str,
    config: &BucketConfig,
    now_ms: u64,
    out: &mut Output,
) -> Result<Result<u64, Rejection>, V::Error> {
    if let Err(e) = validate_bucket_name(bucket) {
        return Ok(Err(Rejection::InvalidName(e)));
    }
    if let Err(e) = config.validate() {
        return Ok(Err(Rejection::InvalidConfig(e)));
    }
    match ov.bucket(bucket)? {
        Some(existing) if existing.config == *config => Ok(Ok(0)),
        Some(existing) => Ok(Err(Rejection::BucketConfigMismatch {
            existing: existing.config,
        })),
        None => {
            let state = BucketState {
                config: *config,
                last_seq: 0,
                created_ms: now_ms,
            };
            ov.buckets.insert(bucket.to_string(), Some(state));
            out.mutations.push(Mutation::PutBucket {
                bucket: bucket.to_string(),
                state,
            });
            out.events.push(KvEvent::BucketCreated {
                bucket: bucket.to_string(),
                config: *config,
            });
            Ok(Ok(0))
        }
    }
}

struct Write<'a> {
    bucket: &'a str,
    key: &'a str,
    value: &'a [u8],
    op: EntryOp,
    expect: Expect,
    now_ms: u64,
}

fn write_entry<V: KvView>(
    ov: &mut Overlay<'_, V>,
    w: Write<'_>,
    out: &mut Output,
) -> Result<Result<u64, Rejection>, V::Error> {
    if let Err(e) = validate_bucket_name(w.bucket) {
        return Ok(Err(Rejection::InvalidName(e)));
    }
    if let Err(e) = validate_key(w.key) {
        return Ok(Err(Rejection::InvalidName(e)));
    }
    let Some(mut state) = ov.bucket(w.bucket)? else {
        return Ok(Err(Rejection::NoSuchBucket));
    };
    if let Some(max) = state.config.max_value_size {
        if w.value.len() > max as usize {
            return Ok(Err(Rejection::ValueTooLarge {
                size: w.value.len() as u64,
                max,
            }));
        }
    }

    // A key of a bucket that keeps one entry per key stores exactly its latest entry (every
    // write trims to the limit), so its revisions need no scan.
    let limit = usize::from(state.config.history.max(1));
    let ks = ov.key(w.bucket, w.key, limit > 1)?;
    if let Err(r) = check_expect(w.expect, ks.latest.as_ref()) {
        return Ok(Err(r));
    }
    let latest_revision = ks.latest.as_ref().map(|e| e.revision);
    let revisions = ks
        .revisions
        .get_or_insert_with(|| latest_revision.into_iter().collect());

    let revision = state.last_seq + 1;
    let previous = ks
        .latest
        .as_ref()
        .map(|e| (e.revision, e.value_len, e.is_live()));
    let entry = Entry {
        bucket: w.bucket.to_string(),
        key: w.key.to_string(),
        value: w.value.to_vec(),
        revision,
        created_ms: w.now_ms,
        op: w.op,
    };

    let mut dropped = if w.op == EntryOp::Purge {
        std::mem::take(revisions)
    } else {
        Vec::new()
    };
    revisions.push(revision);
    if revisions.len() > limit {
        let excess = revisions.len() - limit;
        dropped.extend(revisions.drain(..excess));
    }
    ks.latest = Some(EntryMeta::of(&entry));

    for old in dropped {
        out.mutations.push(Mutation::RemoveHistory {
            bucket: w.bucket.to_string(),
            key: w.key.to_string(),
            revision: old,
            value_len: previous.and_then(|(rev, len, _)| (rev == old).then_some(len)),
        });
    }
    out.mutations.push(Mutation::PutEntry {
        entry: entry.clone(),
        replaces_live: previous.is_some_and(|(_, _, live)| live),
    });

    state.last_seq = revision;
    ov.buckets.insert(w.bucket.to_string(), Some(state));
    out.mutations.push(Mutation::PutBucket {
        bucket: w.bucket.to_string(),
        state,
    });
    out.events.push(KvEvent::Entry(entry));
    Ok(Ok(revision))
}

fn check_expect(expect: Expect, latest: Option<&EntryMeta>) -> Result<(), Rejection> {
    match expect {
        Expect::Any => Ok(()),
        Expect::Absent => match latest {
            Some(e) if !e.is_tombstone() => Err(Rejection::KeyExists {
                revision: e.revision,
            }),
            _ => Ok(()),
        },
        Expect::Revision(expected) => {
            let current = latest.map_or(0, |e| e.revision);
            if current == expected {
                Ok(())
            } else {
                Err(Rejection::WrongLastRevision { expected, current })
            }
        }
    }
}
