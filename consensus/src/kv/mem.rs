//! An in-memory state: the reference executor of [`Mutation`]s, for tests and simulations.

use std::collections::BTreeMap;
use std::convert::Infallible;

use super::rules::plan;
use super::AppliedTxn;
use super::BucketInfo;
use super::BucketState;
use super::Entry;
use super::KvView;
use super::Mutation;
use super::Plan;
use super::Txn;
use super::TxnResult;

/// The whole key-value state in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemState {
    pub buckets: BTreeMap<String, BucketState>,
    /// bucket -> key -> revision -> entry.
    pub entries: BTreeMap<String, BTreeMap<String, BTreeMap<u64, Entry>>>,
    /// Remembered outcomes of transactions with an id, by id.
    pub txns: BTreeMap<String, AppliedTxn>,
}

impl KvView for MemState {
    type Error = Infallible;

    fn applied_txn(&self, id: &str) -> Result<Option<AppliedTxn>, Infallible> {
        Ok(self.txns.get(id).cloned())
    }

    fn applied_txns_before(&self, before_ms: u64) -> Result<Vec<(u64, String)>, Infallible> {
        let mut old: Vec<(u64, String)> = self
            .txns
            .values()
            .filter(|t| t.now_ms < before_ms)
            .map(|t| (t.now_ms, t.id.clone()))
            .collect();
        old.sort();
        Ok(old)
    }

    fn bucket(&self, bucket: &str) -> Result<Option<BucketState>, Infallible> {
        Ok(self.buckets.get(bucket).copied())
    }

    fn latest(&self, bucket: &str, key: &str) -> Result<Option<Entry>, Infallible> {
        Ok(self.history(bucket, key).last().cloned())
    }

    fn revisions(&self, bucket: &str, key: &str) -> Result<Vec<u64>, Infallible> {
        Ok(self
            .history(bucket, key)
            .iter()
            .map(|e| e.revision)
            .collect())
    }
}

impl MemState {
    /// Plans and applies `txn`, returning the plan (result, mutations and events).
    pub fn apply(&mut self, txn: &Txn) -> Plan {
        let p = match plan(self, txn) {
            Ok(p) => p,
            Err(never) => match never {},
        };
        if let TxnResult::Applied { .. } = p.result {
            self.apply_mutations(&p.mutations);
        }
        for (_, id) in &p.forget {
            self.txns.remove(id);
        }
        if let Some(t) = &p.remember {
            self.txns.insert(t.id.clone(), t.clone());
        }
        p
    }

    /// Executes mutations in order.
    pub fn apply_mutations(&mut self, mutations: &[Mutation]) {
        for m in mutations {
            match m {
                Mutation::PutBucket { bucket, state } => {
                    self.buckets.insert(bucket.clone(), *state);
                }
                Mutation::RemoveBucket { bucket } => {
                    self.buckets.remove(bucket);
                    self.entries.remove(bucket);
                }
                Mutation::PutEntry { entry: e, .. } => {
                    self.entries
                        .entry(e.bucket.clone())
                        .or_default()
                        .entry(e.key.clone())
                        .or_default()
                        .insert(e.revision, e.clone());
                }
                Mutation::RemoveHistory {
                    bucket,
                    key,
                    revision,
                    ..
                } => {
                    if let Some(keys) = self.entries.get_mut(bucket) {
                        if let Some(hist) = keys.get_mut(key) {
                            hist.remove(revision);
                            if hist.is_empty() {
                                keys.remove(key);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Stored entries of a key, oldest first.
    pub fn history(&self, bucket: &str, key: &str) -> Vec<Entry> {
        self.entries
            .get(bucket)
            .and_then(|keys| keys.get(key))
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Latest entry per key, live keys only, sorted by key.
    pub fn list(&self, bucket: &str) -> Vec<Entry> {
        self.entries
            .get(bucket)
            .map(|keys| {
                keys.values()
                    .filter_map(|h| h.values().next_back())
                    .filter(|e| !e.is_tombstone())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn bucket_info(&self, bucket: &str) -> Option<BucketInfo> {
        let state = self.buckets.get(bucket)?;
        let keys = self.entries.get(bucket);
        let all = || {
            keys.into_iter()
                .flat_map(|k| k.values())
                .flat_map(|h| h.keys())
        };
        let entries = all().count() as u64;
        let bytes = keys
            .into_iter()
            .flat_map(|k| k.values())
            .flat_map(|h| h.values())
            .map(|e| e.value.len() as u64)
            .sum();
        let first_seq = super::first_seq(all().min().copied(), state.last_seq);
        Some(BucketInfo {
            bucket: bucket.to_string(),
            config: state.config,
            created_ms: state.created_ms,
            first_seq,
            last_seq: state.last_seq,
            live_keys: self.list(bucket).len() as u64,
            entries,
            bytes,
        })
    }
}
