//! Subjects: validation, matching and an interest index ([`Sublist`]).
//!
//! A subject is a `.`-separated list of non-empty tokens. In a subscription
//! filter, a token that is exactly `*` matches any single token and a final
//! token that is exactly `>` matches one or more tokens. `*` or `>` inside a
//! longer token (`foo*`) is an ordinary character, as in nats-server.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

const PWC: &str = "*";
const FWC: &str = ">";

/// nats-server's `IsValidSubject`: non-empty tokens, `>` only as the last
/// token, no whitespace. Wildcards are allowed (valid as a filter).
pub fn is_valid_subject(subject: &str) -> bool {
    if subject.is_empty() {
        return false;
    }
    let mut seen_fwc = false;
    for t in subject.split('.') {
        if t.is_empty() || seen_fwc {
            return false;
        }
        if t.bytes()
            .any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c))
        {
            return false;
        }
        if t == FWC {
            seen_fwc = true;
        }
    }
    true
}

/// nats-server's `IsValidLiteralSubject`: non-empty tokens and no wildcard
/// token. (Like nats-server it does not look for whitespace: on the wire a
/// subject cannot contain any.) This is the check behind the pedantic
/// `-ERR 'Invalid Publish Subject'`.
pub fn is_valid_literal_subject(subject: &str) -> bool {
    subject
        .split('.')
        .all(|t| !t.is_empty() && t != PWC && t != FWC)
}

/// Whether `filter` is accepted as a subscription subject: nats-server's
/// `Sublist.Insert` rules (no empty token, nothing after a `>` token).
pub fn is_valid_filter(filter: &str) -> bool {
    tokens_of_filter(filter).is_ok()
}

/// A subject that can be published to: valid and literal.
pub fn is_valid_publish_subject(subject: &str) -> bool {
    is_valid_subject(subject) && is_valid_literal_subject(subject)
}

/// Whether the literal `subject` matches `filter` (which may contain
/// wildcards). Invalid inputs never match.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    // Token by token, leaving at the first difference: a permission check runs every filter
    // of a user's lists against every message, and most differ in their first tokens.
    let (f, s) = (filter.as_bytes(), subject.as_bytes());
    let (mut fi, mut si) = (0, 0);
    loop {
        let fe = f[fi..]
            .iter()
            .position(|&b| b == b'.')
            .map_or(f.len(), |p| fi + p);
        let se = s[si..]
            .iter()
            .position(|&b| b == b'.')
            .map_or(s.len(), |p| si + p);
        let (ft, st) = (&f[fi..fe], &s[si..se]);
        if st.is_empty() || ft.is_empty() {
            return false;
        }
        if ft == FWC.as_bytes() {
            // `>` only as the filter's last token; the rest of the subject must be valid.
            return fe == f.len() && s[si..].split(|&b| b == b'.').all(|t| !t.is_empty());
        }
        if ft != PWC.as_bytes() && ft != st {
            return false;
        }
        match (fe == f.len(), se == s.len()) {
            (true, true) => return true,
            (false, false) => (fi, si) = (fe + 1, se + 1),
            _ => return false,
        }
    }
}

/// The filter given to [`Sublist::insert`] is not a valid subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSubject;

impl fmt::Display for InvalidSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid subject")
    }
}

impl std::error::Error for InvalidSubject {}

/// Subscribers interested in one published subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SublistResult<T> {
    /// Plain subscribers: each gets a copy.
    pub plain: Vec<T>,
    /// Queue groups by name (sorted), merged across all matching filters as
    /// nats-server does: each group gets one copy, delivered to one member.
    pub queues: Vec<(String, Vec<T>)>,
}

impl<T> SublistResult<T> {
    /// No subscriber at all.
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.queues.is_empty()
    }
}

#[derive(Debug)]
struct Node<T> {
    next: Option<Box<Level<T>>>,
    plain: BTreeSet<T>,
    queues: BTreeMap<String, BTreeSet<T>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            next: None,
            plain: BTreeSet::new(),
            queues: BTreeMap::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.plain.is_empty()
            && self.queues.is_empty()
            && self.next.as_ref().is_none_or(|l| l.is_empty())
    }
}

#[derive(Debug)]
struct Level<T> {
    nodes: BTreeMap<String, Node<T>>,
    pwc: Option<Box<Node<T>>>,
    fwc: Option<Box<Node<T>>>,
}

impl<T> Default for Level<T> {
    fn default() -> Self {
        Level {
            nodes: BTreeMap::new(),
            pwc: None,
            fwc: None,
        }
    }
}

impl<T> Level<T> {
    fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.pwc.is_none() && self.fwc.is_none()
    }
}

/// An interest index over subject filters: a token trie like nats-server's
/// `Sublist` (literal children, a `*` child and a `>` child per level),
/// without its result cache.
///
/// `T` identifies a subscription, e.g. `(connection id, sid)`.
#[derive(Debug)]
pub struct Sublist<T> {
    root: Level<T>,
    count: usize,
}

impl<T: Ord + Clone> Default for Sublist<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn tokens_of_filter(filter: &str) -> Result<Vec<&str>, InvalidSubject> {
    // nats-server's Sublist.Insert rules: no empty token, nothing after `>`.
    let toks: Vec<&str> = filter.split('.').collect();
    for (i, t) in toks.iter().enumerate() {
        if t.is_empty() || (*t == FWC && i + 1 != toks.len()) {
            return Err(InvalidSubject);
        }
    }
    Ok(toks)
}

impl<T: Ord + Clone> Sublist<T> {
    /// An empty index.
    pub fn new() -> Self {
        Sublist {
            root: Level::default(),
            count: 0,
        }
    }

    /// Number of (filter, queue, id) entries.
    pub fn len(&self) -> usize {
        self.count
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds interest of `id` in `filter`, in queue group `queue` if given.
    /// Returns `Ok(false)` if this exact entry already existed.
    pub fn insert(
        &mut self,
        filter: &str,
        queue: Option<&str>,
        id: T,
    ) -> Result<bool, InvalidSubject> {
        let toks = tokens_of_filter(filter)?;
        let mut level = &mut self.root;
        let last = toks.len() - 1;
        let mut node_slot: Option<&mut Node<T>> = None;
        for (i, t) in toks.iter().enumerate() {
            let node: &mut Node<T> = match *t {
                PWC => level.pwc.get_or_insert_with(Box::default),
                FWC => level.fwc.get_or_insert_with(Box::default),
                lit => level.nodes.entry(lit.to_string()).or_default(),
            };
            if i == last {
                node_slot = Some(node);
                break;
            }
            level = node.next.get_or_insert_with(Box::default);
        }
        let Some(node) = node_slot else {
            return Err(InvalidSubject);
        };
        let added = match queue {
            None => node.plain.insert(id),
            Some(q) => node.queues.entry(q.to_string()).or_default().insert(id),
        };
        if added {
            self.count += 1;
        }
        Ok(added)
    }

    /// Removes one entry. Returns whether it existed. Empty trie nodes are
    /// pruned.
    pub fn remove(&mut self, filter: &str, queue: Option<&str>, id: &T) -> bool {
        let Ok(toks) = tokens_of_filter(filter) else {
            return false;
        };
        let removed = remove_rec(&mut self.root, &toks, queue, id);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Whether anything matches `subject`.
    pub fn has_interest(&self, subject: &str) -> bool {
        !self.matches(subject).is_empty()
    }

    /// Whether a plain (non-queue) entry was inserted with exactly `filter`:
    /// wildcard filters that merely match it do not count. This is
    /// nats-server's interest *notification* rule (`registerNotification`),
    /// which decides when a push consumer is active: a consumer whose deliver
    /// subject is `_INBOX.x` starts delivering once someone subscribes to
    /// `_INBOX.x` itself, not because a `>` subscription exists.
    pub fn has_exact_interest(&self, filter: &str) -> bool {
        let Ok(toks) = tokens_of_filter(filter) else {
            return false;
        };
        let mut level = Some(&self.root);
        let mut node = None;
        for t in toks {
            let Some(l) = level else {
                return false;
            };
            let n = match t {
                PWC => l.pwc.as_deref(),
                FWC => l.fwc.as_deref(),
                lit => l.nodes.get(lit),
            };
            let Some(n) = n else {
                return false;
            };
            node = Some(n);
            level = n.next.as_deref();
        }
        node.is_some_and(|n| !n.plain.is_empty())
    }

    /// All subscribers whose filter matches the literal `subject`. A subject
    /// with an empty token matches nothing (as in nats-server). A wildcard
    /// token in `subject` is treated literally: it only matches filters with
    /// a wildcard in that position.
    pub fn matches(&self, subject: &str) -> SublistResult<T> {
        let mut acc = Acc {
            plain: Vec::new(),
            queues: BTreeMap::new(),
        };
        let toks: Vec<&str> = subject.split('.').collect();
        if toks.iter().any(|t| t.is_empty()) {
            return SublistResult {
                plain: Vec::new(),
                queues: Vec::new(),
            };
        }
        match_level(Some(&self.root), &toks, &mut acc);
        SublistResult {
            plain: acc.plain,
            queues: acc.queues.into_iter().collect(),
        }
    }
}

struct Acc<T> {
    plain: Vec<T>,
    queues: BTreeMap<String, Vec<T>>,
}

fn add_node<T: Clone>(n: &Node<T>, acc: &mut Acc<T>) {
    acc.plain.extend(n.plain.iter().cloned());
    for (q, members) in &n.queues {
        acc.queues
            .entry(q.clone())
            .or_default()
            .extend(members.iter().cloned());
    }
}

/// nats-server's `matchLevel`, including its handling of the last token.
fn match_level<T: Clone>(mut level: Option<&Level<T>>, toks: &[&str], acc: &mut Acc<T>) {
    let mut pwc: Option<&Node<T>> = None;
    let mut node: Option<&Node<T>> = None;
    for (i, t) in toks.iter().enumerate() {
        let Some(l) = level else {
            return;
        };
        if let Some(f) = &l.fwc {
            add_node(f, acc);
        }
        pwc = l.pwc.as_deref();
        if let Some(p) = pwc {
            match_level(p.next.as_deref(), &toks[i + 1..], acc);
        }
        node = l.nodes.get(*t);
        level = node.and_then(|n| n.next.as_deref());
    }
    if let Some(n) = node {
        add_node(n, acc);
    }
    if let Some(p) = pwc {
        add_node(p, acc);
    }
}

fn remove_rec<T: Ord>(level: &mut Level<T>, toks: &[&str], queue: Option<&str>, id: &T) -> bool {
    let Some((first, rest)) = toks.split_first() else {
        return false;
    };
    let node: &mut Node<T> = match *first {
        PWC => match level.pwc.as_deref_mut() {
            Some(n) => n,
            None => return false,
        },
        FWC => match level.fwc.as_deref_mut() {
            Some(n) => n,
            None => return false,
        },
        lit => match level.nodes.get_mut(lit) {
            Some(n) => n,
            None => return false,
        },
    };
    let removed = if rest.is_empty() {
        match queue {
            None => node.plain.remove(id),
            Some(q) => match node.queues.get_mut(q) {
                Some(members) => {
                    let r = members.remove(id);
                    if members.is_empty() {
                        node.queues.remove(q);
                    }
                    r
                }
                None => false,
            },
        }
    } else {
        match node.next.as_deref_mut() {
            Some(next) => {
                let r = remove_rec(next, rest, queue, id);
                if next.is_empty() {
                    node.next = None;
                }
                r
            }
            None => false,
        }
    };
    if removed && node.is_empty() {
        match *first {
            PWC => level.pwc = None,
            FWC => level.fwc = None,
            lit => {
                level.nodes.remove(lit);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        for ok in [
            "foo", "foo.bar", "foo.*", "*.bar", ">", "foo.>", "foo*.b>r", "*",
        ] {
            assert!(is_valid_subject(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "foo.",
            ".foo",
            "foo..bar",
            "foo.>.bar",
            ">.foo",
            "foo bar",
            "a.\tb",
        ] {
            assert!(!is_valid_subject(bad), "{bad:?}");
        }
        for ok in ["foo", "foo.bar", "foo*.b>r", "_INBOX.abc"] {
            assert!(is_valid_literal_subject(ok), "{ok}");
            assert!(is_valid_publish_subject(ok), "{ok}");
        }
        for bad in ["", "foo.*", ">", "foo.>", "foo..bar", "foo."] {
            assert!(!is_valid_literal_subject(bad), "{bad:?}");
            assert!(!is_valid_publish_subject(bad), "{bad:?}");
        }
    }

    #[test]
    fn matching() {
        let cases = [
            ("foo", "foo", true),
            ("foo", "foo.bar", false),
            ("foo.*", "foo.bar", true),
            ("foo.*", "foo", false),
            ("foo.*", "foo.bar.baz", false),
            ("foo.>", "foo.bar", true),
            ("foo.>", "foo.bar.baz", true),
            ("foo.>", "foo", false),
            (">", "foo", true),
            (">", "a.b.c", true),
            ("*.*", "a.b", true),
            ("*.b.>", "a.b.c.d", true),
            ("*.b.>", "a.c.c", false),
            ("foo*", "foo", false),
            ("foo", "foo..bar", false),
            ("foo..bar", "foo..bar", false),
            ("foo.>", "foo.bar.", false),
            ("foo.>", "foo..bar", false),
            ("foo.>", "foo.", false),
            ("*", "", false),
            (">", "", false),
            ("", "", false),
            ("a.b", "a.b.", false),
            ("a.*", "a.", false),
            (">.a", "x.a", false),
            ("a.>.b", "a.x.b", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("$KV.machines.>", "$KV.machines.m1", true),
            ("$KV.machines.>", "$KV.machine.m1", false),
            ("a.b.c", "a.b", false),
        ];
        for (f, s, want) in cases {
            assert_eq!(subject_matches(f, s), want, "{f} vs {s}");
        }
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn sublist_plain_and_wildcards() {
        let mut sl = Sublist::new();
        assert_eq!(sl.insert("foo.bar", None, 1), Ok(true));
        assert_eq!(sl.insert("foo.*", None, 2), Ok(true));
        assert_eq!(sl.insert("foo.>", None, 3), Ok(true));
        assert_eq!(sl.insert(">", None, 4), Ok(true));
        assert_eq!(sl.insert("*.bar", None, 5), Ok(true));
        assert_eq!(sl.insert("foo.bar.baz", None, 6), Ok(true));
        assert_eq!(sl.insert("foo.bar", None, 1), Ok(false));
        assert_eq!(sl.len(), 6);

        assert_eq!(sorted(sl.matches("foo.bar").plain), vec![1, 2, 3, 4, 5]);
        assert_eq!(sorted(sl.matches("foo.bar.baz").plain), vec![3, 4, 6]);
        assert_eq!(sorted(sl.matches("foo").plain), vec![4]);
        assert_eq!(sorted(sl.matches("x.bar").plain), vec![4, 5]);
        assert!(sl.matches("foo..bar").is_empty());
        // A wildcard in the published subject only meets wildcards.
        assert_eq!(sorted(sl.matches("foo.*").plain), vec![2, 3, 4]);

        assert!(sl.remove("foo.*", None, &2));
        assert!(!sl.remove("foo.*", None, &2));
        assert!(!sl.remove("foo.bar", Some("q"), &1));
        assert_eq!(sorted(sl.matches("foo.bar").plain), vec![1, 3, 4, 5]);
        for (f, id) in [
            ("foo.bar", 1),
            ("foo.>", 3),
            (">", 4),
            ("*.bar", 5),
            ("foo.bar.baz", 6),
        ] {
            assert!(sl.remove(f, None, &id));
        }
        assert!(sl.is_empty());
        assert!(sl.root.is_empty(), "trie pruned");
        assert!(!sl.has_interest("foo.bar"));
    }

    #[test]
    fn exact_interest_ignores_wildcards_and_queues() {
        let mut sl = Sublist::new();
        sl.insert(">", None, 1u32).unwrap_or_default();
        sl.insert("_INBOX.*", None, 2).unwrap_or_default();
        sl.insert("_INBOX.q", Some("g"), 3).unwrap_or_default();
        sl.insert("_INBOX.x.y", None, 4).unwrap_or_default();
        // Matched by `>` and `_INBOX.*`, but nobody subscribed to it literally.
        assert!(sl.has_interest("_INBOX.x"));
        assert!(!sl.has_exact_interest("_INBOX.x"));
        // A queue subscription is not plain interest.
        assert!(!sl.has_exact_interest("_INBOX.q"));
        // A longer literal below it does not count either.
        assert!(sl.has_exact_interest("_INBOX.x.y"));
        assert!(!sl.has_exact_interest("_INBOX.x.y.z"));
        sl.insert("_INBOX.x", None, 5).unwrap_or_default();
        assert!(sl.has_exact_interest("_INBOX.x"));
        // Filters are looked up as written.
        assert!(sl.has_exact_interest(">"));
        assert!(sl.has_exact_interest("_INBOX.*"));
        assert!(!sl.has_exact_interest("*"));
        assert!(!sl.has_exact_interest("a..b"));
        sl.remove("_INBOX.x", None, &5);
        assert!(!sl.has_exact_interest("_INBOX.x"));
    }

    #[test]
    fn sublist_rejects_invalid_filters() {
        let mut sl: Sublist<u32> = Sublist::new();
        for bad in ["", "foo.", ".foo", "a..b", "foo.>.bar", ">.x"] {
            assert_eq!(sl.insert(bad, None, 1), Err(InvalidSubject), "{bad:?}");
        }
        // `*` or `>` inside a token is literal.
        assert_eq!(sl.insert("foo*.b>r", None, 1), Ok(true));
        assert_eq!(sl.matches("foo*.b>r").plain, vec![1]);
        assert!(sl.matches("fooX.b>r").is_empty());
    }

    #[test]
    fn sublist_queue_groups_merge_across_filters() {
        let mut sl = Sublist::new();
        sl.insert("work.*", Some("workers"), 1u32)
            .unwrap_or_default();
        sl.insert("work.a", Some("workers"), 2).unwrap_or_default();
        sl.insert("work.>", Some("audit"), 3).unwrap_or_default();
        sl.insert("work.a", None, 4).unwrap_or_default();
        sl.insert("work.b", Some("workers"), 5).unwrap_or_default();
        let r = sl.matches("work.a");
        assert_eq!(r.plain, vec![4]);
        assert_eq!(r.queues.len(), 2);
        assert_eq!(r.queues[0], ("audit".to_string(), vec![3]));
        assert_eq!(r.queues[1].0, "workers");
        assert_eq!(sorted(r.queues[1].1.clone()), vec![1, 2]);
        assert!(sl.remove("work.*", Some("workers"), &1));
        assert!(sl.remove("work.a", Some("workers"), &2));
        let r = sl.matches("work.a");
        assert_eq!(r.queues, vec![("audit".to_string(), vec![3])]);
        assert_eq!(sl.len(), 3);
    }

    #[test]
    fn sublist_agrees_with_subject_matches() {
        let filters = [
            "a", "a.b", "a.*", "*.b", "a.>", ">", "*.*", "a.b.c", "*.b.>", "a.*.c",
        ];
        let subjects = [
            "a", "b", "a.b", "a.c", "b.b", "a.b.c", "a.x.c", "x.b.y.z", "a.b.c.d",
        ];
        let mut sl = Sublist::new();
        for (i, f) in filters.iter().enumerate() {
            sl.insert(f, None, i).unwrap_or_default();
        }
        for s in subjects {
            let mut got = sl.matches(s).plain;
            got.sort_unstable();
            let want: Vec<usize> = (0..filters.len())
                .filter(|&i| subject_matches(filters[i], s))
                .collect();
            assert_eq!(got, want, "{s}");
        }
    }
}
