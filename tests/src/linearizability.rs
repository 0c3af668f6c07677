//! A linearizability checker for KV histories (Wing & Gong's search with Lowe's memoisation,
//! "WGL"), one register per key: linearizability is compositional (Herlihy & Wing, §3.3), so
//! each key's sub-history is checked alone.
//!
//! An operation has a call time and, when its client heard the outcome, a return time. A write
//! whose outcome is unknown (timeout, connection lost, the server killed) is *pending*: it may
//! take effect at any point after its call, or never. A write known to have failed is left out
//! of the history by the recorder.

use std::collections::BTreeMap;
use std::collections::HashSet;

/// What a client did to one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Put a value.
    Put(Vec<u8>),
    /// Read the key: `None` if it had no value.
    Get(Option<Vec<u8>>),
}

/// One operation of a history.
#[derive(Debug, Clone)]
pub struct Op {
    pub key: String,
    pub action: Action,
    /// When the client sent it (any monotonic clock shared by all clients).
    pub call: u64,
    /// When the client heard the answer; `None` for a write whose outcome is unknown.
    pub ret: Option<u64>,
}

/// A key whose operations cannot be linearized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    pub key: String,
    pub ops: usize,
}

/// Checks every key's sub-history; the keys that are not linearizable.
pub fn check(history: &[Op]) -> Vec<Anomaly> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    by_key
        .into_iter()
        .filter(|(_, ops)| !check_register(ops))
        .map(|(key, ops)| Anomaly {
            key: key.to_string(),
            ops: ops.len(),
        })
        .collect()
}

/// One register, initially without a value.
fn check_register(ops: &[&Op]) -> bool {
    // A pending read tells nothing; drop it.
    let ops: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.ret.is_some() || matches!(o.action, Action::Put(_)))
        .collect();
    let n = ops.len();
    let mut seen: HashSet<(Vec<u64>, Option<Vec<u8>>)> = HashSet::new();
    let mut done = vec![0u64; n.div_ceil(64)];
    search(&ops, &mut done, None, &mut seen)
}

fn is_done(done: &[u64], i: usize) -> bool {
    done[i / 64] & (1 << (i % 64)) != 0
}

fn flip(done: &mut [u64], i: usize) {
    done[i / 64] ^= 1 << (i % 64);
}

/// Depth-first: linearize next any undone op whose call precedes every undone op's return.
fn search(
    ops: &[&Op],
    done: &mut Vec<u64>,
    state: Option<Vec<u8>>,
    seen: &mut HashSet<(Vec<u64>, Option<Vec<u8>>)>,
) -> bool {
    let undone = || (0..ops.len()).filter(|&i| !is_done(done, i));
    // Every completed op linearized: the pending writes left may simply never take effect.
    if undone().all(|i| ops[i].ret.is_none()) {
        return true;
    }
    let horizon = undone()
        .filter_map(|i| ops[i].ret)
        .min()
        .unwrap_or(u64::MAX);
    let candidates: Vec<usize> = undone().filter(|&i| ops[i].call < horizon).collect();
    for i in candidates {
        let next = match &ops[i].action {
            Action::Put(v) => Some(v.clone()),
            Action::Get(v) if *v == state => state.clone(),
            Action::Get(_) => continue,
        };
        flip(done, i);
        let fresh = seen.insert((done.clone(), next.clone()));
        if fresh && search(ops, done, next, seen) {
            return true;
        }
        flip(done, i);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, v: &str, call: u64, ret: Option<u64>) -> Op {
        Op {
            key: key.into(),
            action: Action::Put(v.as_bytes().to_vec()),
            call,
            ret,
        }
    }

    fn get(key: &str, v: Option<&str>, call: u64, ret: u64) -> Op {
        Op {
            key: key.into(),
            action: Action::Get(v.map(|v| v.as_bytes().to_vec())),
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            get("k", None, 1, 2),
            put("k", "a", 3, Some(4)),
            get("k", Some("a"), 5, 6),
            put("k", "b", 7, Some(8)),
            get("k", Some("b"), 9, 10),
        ];
        assert!(check(&h).is_empty());
    }

    #[test]
    fn overlapping_writes_may_take_effect_in_either_order() {
        let h = [
            put("k", "a", 1, Some(10)),
            put("k", "b", 2, Some(9)),
            get("k", Some("a"), 11, 12),
        ];
        assert!(check(&h).is_empty());
        let h = [
            put("k", "a", 1, Some(10)),
            put("k", "b", 2, Some(9)),
            get("k", Some("b"), 11, 12),
        ];
        assert!(check(&h).is_empty());
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_an_anomaly() {
        let h = [
            put("k", "a", 1, Some(2)),
            put("k", "b", 3, Some(4)),
            get("k", Some("a"), 5, 6),
        ];
        assert_eq!(
            check(&h),
            [Anomaly {
                key: "k".into(),
                ops: 3
            }]
        );
    }

    #[test]
    fn a_value_never_written_is_an_anomaly() {
        let h = [put("k", "a", 1, Some(2)), get("k", Some("z"), 3, 4)];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn a_lost_acknowledged_write_is_an_anomaly() {
        let h = [put("k", "a", 1, Some(2)), get("k", None, 3, 4)];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn reads_must_not_go_back_in_time() {
        // The write overlaps both reads, but the second read starts after the first saw "b".
        let h = [
            put("k", "a", 1, Some(2)),
            put("k", "b", 3, Some(20)),
            get("k", Some("b"), 4, 5),
            get("k", Some("a"), 6, 7),
        ];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn a_pending_write_may_take_effect_late_or_never() {
        let late = [
            put("k", "a", 1, Some(2)),
            put("k", "b", 3, None),
            get("k", Some("a"), 4, 5),
            get("k", Some("b"), 6, 7),
        ];
        assert!(check(&late).is_empty());
        let never = [
            put("k", "a", 1, Some(2)),
            put("k", "b", 3, None),
            get("k", Some("a"), 10, 11),
        ];
        assert!(check(&never).is_empty());
        // Once seen, it cannot be unseen.
        let flicker = [
            put("k", "a", 1, Some(2)),
            put("k", "b", 3, None),
            get("k", Some("b"), 4, 5),
            get("k", Some("a"), 6, 7),
        ];
        assert_eq!(check(&flicker).len(), 1);
    }

    #[test]
    fn keys_are_checked_apart() {
        let h = [
            put("x", "1", 1, Some(2)),
            put("y", "1", 1, Some(2)),
            get("x", Some("1"), 3, 4),
            get("y", None, 3, 4),
        ];
        assert_eq!(
            check(&h),
            [Anomaly {
                key: "y".into(),
                ops: 2
            }]
        );
    }
}
