//! Key layout of the state machine's key space (`store/tree.rs`, in memory; the sled
//! `state_machine` tree of older releases had the same, see `store/mod.rs`).
//!
//! Bucket names never contain `\0` or `:`, keys never contain `\0`, so the separators are
//! unambiguous and a prefix scan never crosses into another bucket or key.
//!
//! | key | value |
//! |---|---|
//! | `m:last_applied` | `LogId` |
//! | `m:last_membership` | `StoredMembership` |
//! | `s:current` | releases before the snapshot files kept the snapshot here; removed at open |
//! | `b:{bucket}` | `BucketState` |
//! | `l:{bucket}\0{key}` | latest `Entry` of the key |
//! | `h:{bucket}\0{key}\0{revision u64 BE}` | every stored `Entry` of the key (latest included) |
//! | `t:{txn id}` | `AppliedTxn`: the remembered outcome of a transaction with an id |
//! | `x:{now_ms u64 BE}{txn id}` | empty: the same ids ordered by proposer time, for forgetting |
//! | `c:{bucket}` | `BucketCounters`: stored entries, live keys, value bytes (kept on apply) |
//! | `r:{bucket}\0{revision u64 BE}` | empty: the bucket's stored revisions, for its first one |
//! | `m:counters` | empty: counters and revisions were built for this database |

pub const LAST_APPLIED: &[u8] = b"m:last_applied";
pub const LAST_MEMBERSHIP: &[u8] = b"m:last_membership";
pub const OLD_SNAPSHOT: &[u8] = b"s:current";
pub const BUCKETS: &[u8] = b"b:";
pub const LATEST: &[u8] = b"l:";
pub const HISTORY: &[u8] = b"h:";
pub const TXNS: &[u8] = b"t:";
pub const TXN_TIMES: &[u8] = b"x:";
pub const COUNTERS: &[u8] = b"c:";
pub const REVISIONS: &[u8] = b"r:";
pub const COUNTERS_BUILT: &[u8] = b"m:counters";

/// In the database's default tree, written by older releases: the name of their state-machine
/// tree (absent: `state_machine`); read at open to migrate it, then removed.
pub const SM_TREE_NAME: &[u8] = b"ployz:sm_tree";
/// In the database's default tree: the current snapshot's file name and meta (JSON).
pub const CURRENT_SNAPSHOT: &[u8] = b"ployz:snapshot";

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

pub fn bucket(bucket: &str) -> Vec<u8> {
    join(&[BUCKETS, bucket.as_bytes()])
}

pub fn counters(bucket: &str) -> Vec<u8> {
    join(&[COUNTERS, bucket.as_bytes()])
}

pub fn revisions_prefix(bucket: &str) -> Vec<u8> {
    join(&[REVISIONS, bucket.as_bytes(), b"\0"])
}

pub fn revision(bucket: &str, revision: u64) -> Vec<u8> {
    join(&[REVISIONS, bucket.as_bytes(), b"\0", &revision.to_be_bytes()])
}

pub fn bucket_name(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.strip_prefix(BUCKETS)?).ok()
}

pub fn latest_prefix(bucket: &str) -> Vec<u8> {
    join(&[LATEST, bucket.as_bytes(), b"\0"])
}

pub fn latest(bucket: &str, key: &str) -> Vec<u8> {
    join(&[LATEST, bucket.as_bytes(), b"\0", key.as_bytes()])
}

pub fn history_bucket_prefix(bucket: &str) -> Vec<u8> {
    join(&[HISTORY, bucket.as_bytes(), b"\0"])
}

pub fn history_prefix(bucket: &str, key: &str) -> Vec<u8> {
    join(&[HISTORY, bucket.as_bytes(), b"\0", key.as_bytes(), b"\0"])
}

pub fn history(bucket: &str, key: &str, revision: u64) -> Vec<u8> {
    join(&[
        HISTORY,
        bucket.as_bytes(),
        b"\0",
        key.as_bytes(),
        b"\0",
        &revision.to_be_bytes(),
    ])
}

/// The revision at the end of a `h:` key.
pub fn history_revision(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8).map(|at| &key[at..])?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

pub fn txn(id: &str) -> Vec<u8> {
    join(&[TXNS, id.as_bytes()])
}

pub fn txn_time(now_ms: u64, id: &str) -> Vec<u8> {
    join(&[TXN_TIMES, &now_ms.to_be_bytes(), id.as_bytes()])
}

/// `(now_ms, id)` of an `x:` key.
pub fn txn_time_parts(key: &[u8]) -> Option<(u64, &str)> {
    let rest = key.strip_prefix(TXN_TIMES)?;
    let (time, id) = rest.split_at_checked(8)?;
    Some((
        u64::from_be_bytes(time.try_into().ok()?),
        std::str::from_utf8(id).ok()?,
    ))
}
