//! The state machine's key space, held in memory.
//!
//! Same keys and values as the sled tree releases before this one kept the state machine in
//! (layout in `store/keys.rs`), in an ordered map. Applying a write is a map insert: no page
//! copy-on-write, no page cache, nothing for sled's flusher to write. What makes the state
//! durable is the Raft log (every applied entry is in it, fsynced before it was acknowledged)
//! and the snapshot files: the log is purged only up to a snapshot whose file, and the pointer
//! to it, are on disk (see `ARCHITECTURE.md`). At open the state is the current snapshot;
//! openraft then re-applies the log after it.

use std::collections::BTreeMap;
use std::ops::Bound;

use sled::IVec;

/// An ordered map of byte keys to shared byte values (`IVec` clones share one buffer).
#[derive(Debug, Default)]
pub(crate) struct MemTree {
    map: BTreeMap<Vec<u8>, IVec>,
}

/// Writes to apply together: `None` removes the key.
pub(crate) type Ops = BTreeMap<Vec<u8>, Option<IVec>>;

impl MemTree {
    pub(crate) fn get(&self, key: &[u8]) -> Option<IVec> {
        self.map.get(key).cloned()
    }

    pub(crate) fn contains_key(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    pub(crate) fn insert(&mut self, key: Vec<u8>, value: impl Into<IVec>) {
        self.map.insert(key, value.into());
    }

    /// Every pair whose key starts with `prefix`, in key order.
    pub(crate) fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a [u8], &'a IVec)> + 'a {
        self.map
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_slice(), v))
    }

    /// Keys in `[start, end)`, in order.
    pub(crate) fn range_keys<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.map
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .map(|(k, _)| k.as_slice())
    }

    /// Up to `max` pairs with `prefix` after `after` (from the first with `None`), in order:
    /// a long scan reads the map a piece at a time, letting writers in between.
    pub(crate) fn chunk(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        max: usize,
    ) -> Vec<(Vec<u8>, IVec)> {
        let from = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Included(prefix),
        };
        self.map
            .range::<[u8], _>((from, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(max)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Applies every write of `ops`.
    pub(crate) fn apply(&mut self, ops: Ops) {
        for (k, v) in ops {
            match v {
                Some(v) => {
                    self.map.insert(k, v);
                }
                None => {
                    self.map.remove(&k);
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(keys: &[&str]) -> MemTree {
        let mut t = MemTree::default();
        for k in keys {
            t.insert(k.as_bytes().to_vec(), k.as_bytes());
        }
        t
    }

    #[test]
    fn prefix_scans_stop_at_the_prefix_end() {
        let t = tree(&["a", "b:", "b:1", "b:2", "b;", "c"]);
        let got: Vec<&[u8]> = t.scan_prefix(b"b:").map(|(k, _)| k).collect();
        assert_eq!(got, [&b"b:"[..], b"b:1", b"b:2"]);
        assert_eq!(t.scan_prefix(b"z").count(), 0);
        let keys: Vec<&[u8]> = t.range_keys(b"b:1", b"c").collect();
        assert_eq!(keys, [&b"b:1"[..], b"b:2", b"b;"]);
    }

    #[test]
    fn chunks_cover_a_prefix_once_in_order() {
        let names: Vec<String> = (0..10).map(|i| format!("p:{i}")).collect();
        let mut t = tree(&names.iter().map(String::as_str).collect::<Vec<_>>());
        t.insert(b"q".to_vec(), &b"q"[..]);
        let mut seen = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let c = t.chunk(b"p:", after.as_deref(), 3);
            if c.is_empty() {
                break;
            }
            assert!(c.len() <= 3);
            after = Some(c.last().unwrap().0.clone());
            seen.extend(c.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()));
        }
        assert_eq!(seen, names);
    }

    #[test]
    fn apply_puts_and_removes() {
        let mut t = tree(&["a", "b"]);
        let mut ops = Ops::new();
        ops.insert(b"a".to_vec(), None);
        ops.insert(b"c".to_vec(), Some(IVec::from(&b"3"[..])));
        t.apply(ops);
        assert!(!t.contains_key(b"a"));
        assert_eq!(t.get(b"c").as_deref(), Some(&b"3"[..]));
        assert_eq!(t.len(), 2);
    }
}
