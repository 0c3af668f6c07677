//! Which members read group entries ([`crate::Txn::group`]): a leader proposes one only when
//! every voter and learner answered, recently and at the address the membership records, that
//! its binary reads them ([`crate::network::RaftRequest::Features`]). Until then it proposes one
//! entry per write, as binaries from before group commit do, so a cluster in the middle of a
//! rolling upgrade keeps working.
//!
//! The gate is for liveness; safety does not depend on it: a binary from before group commit
//! cannot decode a group entry at all (see [`crate::Txn`]'s wire format), so it never applies
//! one as something else, it only stops accepting entries until it is upgraded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::network::Features;
use crate::NodeId;
use crate::PloyzNode;

/// A "reads groups" answer older than this no longer counts (the member may have been
/// restarted with an older binary since).
pub(crate) const VALID: Duration = Duration::from_secs(30);
/// Members that said they read groups are asked again after this, well before [`VALID`] ends.
pub(crate) const REFRESH: Duration = Duration::from_secs(10);
/// Members that did not say so (no answer, an older binary) are asked again after this.
pub(crate) const RETRY: Duration = Duration::from_secs(1);

struct Answer {
    addr: String,
    at: Instant,
    group_commit: bool,
}

/// The members' last answers.
#[derive(Default)]
pub(crate) struct GroupGate {
    answers: Mutex<HashMap<NodeId, Answer>>,
}

impl GroupGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Answer>> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a group entry may be proposed: every member but `me` answered within [`VALID`],
    /// at its current address, that it reads groups.
    pub(crate) fn allows<'a>(
        &self,
        me: NodeId,
        members: impl IntoIterator<Item = (NodeId, &'a PloyzNode)>,
        now: Instant,
    ) -> bool {
        let answers = self.lock();
        members
            .into_iter()
            .filter(|(id, _)| *id != me)
            .all(|(id, node)| {
                answers.get(&id).is_some_and(|a| {
                    a.group_commit && a.addr == node.addr && now.duration_since(a.at) < VALID
                })
            })
    }

    /// The members to ask now: never asked, moved, or asked longer ago than [`REFRESH`]
    /// ([`RETRY`] for those that did not say they read groups).
    pub(crate) fn due<'a>(
        &self,
        me: NodeId,
        members: impl IntoIterator<Item = (NodeId, &'a PloyzNode)>,
        now: Instant,
    ) -> Vec<(NodeId, PloyzNode)> {
        let answers = self.lock();
        members
            .into_iter()
            .filter(|(id, node)| {
                *id != me
                    && answers.get(id).is_none_or(|a| {
                        let every = if a.group_commit { REFRESH } else { RETRY };
                        a.addr != node.addr || now.duration_since(a.at) >= every
                    })
            })
            .map(|(id, node)| (id, node.clone()))
            .collect()
    }

    /// Records what member `id` at `addr` answered (`None`: nothing).
    pub(crate) fn record(&self, id: NodeId, addr: &str, answer: Option<Features>, now: Instant) {
        self.lock().insert(
            id,
            Answer {
                addr: addr.to_string(),
                at: now,
                group_commit: answer.is_some_and(|f| f.group_commit),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addr: &str) -> PloyzNode {
        PloyzNode {
            machine_id: format!("m-{addr}"),
            addr: addr.to_string(),
        }
    }

    const YES: Option<Features> = Some(Features { group_commit: true });

    #[test]
    fn groups_only_when_every_other_member_said_it_reads_them_recently() {
        let gate = GroupGate::default();
        let (a, b, c) = (node("a:1"), node("b:1"), node("c:1"));
        let members = || [(1, &a), (2, &b), (3, &c)];
        let t0 = Instant::now();
        // Alone: nothing to ask.
        assert!(gate.allows(1, [(1, &a)], t0));
        assert!(gate.due(1, [(1, &a)], t0).is_empty());
        // Nobody asked yet: no groups, ask 2 and 3.
        assert!(!gate.allows(1, members(), t0));
        let due: Vec<NodeId> = gate
            .due(1, members(), t0)
            .into_iter()
            .map(|d| d.0)
            .collect();
        assert_eq!(due, [2, 3]);
        // 3 is an older binary (no answer): still no groups, and it is asked again soon.
        gate.record(2, "b:1", YES, t0);
        gate.record(3, "c:1", None, t0);
        assert!(!gate.allows(1, members(), t0));
        assert!(gate.due(1, members(), t0 + RETRY / 2).is_empty());
        let due: Vec<NodeId> = gate
            .due(1, members(), t0 + RETRY)
            .into_iter()
            .map(|d| d.0)
            .collect();
        assert_eq!(due, [3]);
        // 3 upgraded: groups.
        let t1 = t0 + RETRY;
        gate.record(3, "c:1", YES, t1);
        assert!(gate.allows(1, members(), t1));
        // An answer from an old binary that knows the request but not the feature counts as no.
        gate.record(3, "c:1", Some(Features::default()), t1);
        assert!(!gate.allows(1, members(), t1));
        gate.record(3, "c:1", YES, t1);
        // A new learner that was not asked closes the gate.
        let d = node("d:1");
        assert!(!gate.allows(1, [(1, &a), (2, &b), (3, &c), (4, &d)], t1));
        // A member that moved to another address is another process: ask it again.
        let c2 = node("c:2");
        assert!(!gate.allows(1, [(1, &a), (2, &b), (3, &c2)], t1));
        assert_eq!(gate.due(1, [(3, &c2)], t1).len(), 1);
        // Answers expire: 2 was last asked at t0.
        assert!(gate.allows(1, members(), t0 + VALID - Duration::from_millis(1)));
        assert!(!gate.allows(1, members(), t0 + VALID));
        assert_eq!(gate.due(1, [(2, &b)], t0 + REFRESH).len(), 1);
    }
}
