//! Lifecycle rules as a pure function: `(state, request) -> decision or
//! refusal`. No store, no clock; the daemon reads what the rule needs, asks,
//! and writes the result with compare-and-set.
//!
//! | from \ action | activate | drain    | standby                         |
//! |---------------|----------|----------|---------------------------------|
//! | active        | (same)   | draining | standby, refused if workloads*  |
//! | draining      | active   | (same)   | standby, refused if workloads*  |
//! | standby       | active   | draining | (same)                          |
//! | joining       | refused  | refused  | refused                         |
//! | leaving       | refused  | refused  | refused                         |
//!
//! `*` unless `--force`: workloads are never moved by a lifecycle change,
//! so a plain standby with live workloads names them and stops.

use ployz_api::{Lifecycle, LifecycleAction};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub next: Lifecycle,
    pub changed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("machine {machine} is {state}: it cannot be changed until it has finished {doing}")]
    InTransition {
        machine: String,
        state: Lifecycle,
        doing: &'static str,
    },
    #[error("machine {machine} still has {} instance(s) placed on it: {}; standby does not move workloads", workloads.len(), workloads.join(", "))]
    WorkloadsRunning {
        machine: String,
        workloads: Vec<String>,
    },
}

impl Refusal {
    /// The command that would clear the blocker.
    pub fn hint(&self) -> String {
        match self {
            Refusal::InTransition { machine, state, .. } => match state {
                Lifecycle::Joining => format!(
                    "wait for the join to finish, or remove the half-joined record with `ployzctl machine rm --force {machine}`"
                ),
                _ => format!(
                    "wait for the removal to finish, or finish it with `ployzctl machine rm --force {machine}`"
                ),
            },
            Refusal::WorkloadsRunning { machine, workloads } => format!(
                "migrate or remove them first (`ployzctl service migrate {} --to <machine>`), or keep them running and use `ployzctl machine standby --force {machine}`",
                workloads
                    .first()
                    .and_then(|w| w.split('/').next())
                    .unwrap_or("<service>")
            ),
        }
    }
}

/// The instances that occupy `machine`, as `service/slot`, sorted: those
/// placed there in any state (a failed one is restarted there, a paused one
/// resumes there) and those still reported pending or running there (a
/// placement just withdrawn whose instance has not stopped yet). The
/// standby refusal counts and names exactly these.
pub fn occupying(
    machine: &str,
    placed: &[(String, String, u32)],
    live: &[(String, String, u32)],
) -> Vec<String> {
    let mut out: Vec<String> = placed
        .iter()
        .chain(live)
        .filter(|(_, m, _)| m == machine)
        .map(|(service, _, slot)| format!("{service}/{slot}"))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Decide a lifecycle change for `machine`, currently `current`, with
/// `live_workloads` (its instances, from [`occupying`]).
pub fn decide(
    machine: &str,
    current: Lifecycle,
    action: LifecycleAction,
    force: bool,
    live_workloads: &[String],
) -> Result<Decision, Refusal> {
    let doing = match current {
        Lifecycle::Joining => Some("joining"),
        Lifecycle::Leaving => Some("leaving"),
        _ => None,
    };
    if let Some(doing) = doing {
        return Err(Refusal::InTransition {
            machine: machine.to_string(),
            state: current,
            doing,
        });
    }
    let next = match action {
        LifecycleAction::Activate => Lifecycle::Active,
        LifecycleAction::Drain => Lifecycle::Draining,
        LifecycleAction::Standby => {
            if current != Lifecycle::Standby && !force && !live_workloads.is_empty() {
                return Err(Refusal::WorkloadsRunning {
                    machine: machine.to_string(),
                    workloads: live_workloads.to_vec(),
                });
            }
            Lifecycle::Standby
        }
    };
    Ok(Decision {
        next,
        changed: next != current,
    })
}

/// Why removing a storage machine would endanger the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumRefusal {
    #[error("machine {target} is the last storage machine: removing it would delete the cluster's store")]
    LastStorage { target: String },
    #[error("removing storage machine {target} would leave {remaining} storage machine(s) of which only {live} can be reached ({down} down): no majority could write")]
    NoMajority {
        target: String,
        remaining: usize,
        live: usize,
        down: String,
    },
}

impl QuorumRefusal {
    pub fn hint(&self) -> String {
        match self {
            QuorumRefusal::LastStorage { .. } => {
                "promote other machines first (`ployzctl machine storage promote --replicas 3 <ids>`)".into()
            }
            QuorumRefusal::NoMajority { down, .. } => format!(
                "bring the down storage machine(s) back ({down}), or promote a replacement first (`ployzctl machine storage promote`), then remove"
            ),
        }
    }
}

/// Would the voter set keep a reachable majority without `target`?
/// `reachable` are the voters known to be up right now.
pub fn removal_keeps_quorum(
    voters: &[String],
    target: &str,
    reachable: &[String],
) -> Result<(), QuorumRefusal> {
    let remaining: Vec<&String> = voters.iter().filter(|v| *v != target).collect();
    if remaining.is_empty() {
        return Err(QuorumRefusal::LastStorage {
            target: target.into(),
        });
    }
    let live = remaining.iter().filter(|v| reachable.contains(v)).count();
    if live * 2 <= remaining.len() {
        let down: Vec<&str> = remaining
            .iter()
            .filter(|v| !reachable.contains(v))
            .map(|v| v.as_str())
            .collect();
        return Err(QuorumRefusal::NoMajority {
            target: target.into(),
            remaining: remaining.len(),
            live,
            down: down.join(", "),
        });
    }
    Ok(())
}

/// What the records must change so that `machine ls` (each machine's
/// authority) and `mesh status` (the network's storage size) say what the
/// Raft voter set is, whatever part of a promote or removal got through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorageRecordFix {
    /// Machines whose recorded authority is wrong, with the right one.
    pub authority: Vec<(String, ployz_api::Authority)>,
    /// The storage size to record, when the recorded one is wrong.
    pub replicas: Option<u8>,
}

pub fn storage_record_fix(
    voters: &[String],
    machines: &[(String, ployz_api::Authority)],
    recorded_replicas: u8,
) -> StorageRecordFix {
    use ployz_api::Authority;
    let authority = machines
        .iter()
        .filter_map(|(id, a)| {
            let want = if voters.contains(id) {
                Authority::Storage
            } else {
                Authority::Compute
            };
            (*a != want).then(|| (id.clone(), want))
        })
        .collect();
    let size = voters.len().min(u8::MAX as usize) as u8;
    StorageRecordFix {
        authority,
        replicas: (size != recorded_replicas).then_some(size),
    }
}

#[cfg(test)]
mod occupying_tests {
    use super::*;

    #[test]
    fn the_refusal_counts_what_it_names() {
        let t = |s: &str, m: &str, n: u32| (s.to_string(), m.to_string(), n);
        // web/0 failed (placed, no live record), web/1 running, db/3 placed
        // elsewhere, old/7 withdrawn but still running here.
        let placed = [t("web", "a", 0), t("web", "a", 1), t("db", "b", 3)];
        let live = [t("web", "a", 1), t("old", "a", 7), t("db", "b", 3)];
        let on_a = occupying("a", &placed, &live);
        assert_eq!(on_a, ["old/7", "web/0", "web/1"]);
        let e = decide(
            "a",
            Lifecycle::Active,
            LifecycleAction::Standby,
            false,
            &on_a,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("3 instance(s) placed on it: old/7, web/0, web/1"),
            "{msg}"
        );
        assert!(
            e.hint().contains("service migrate old --to"),
            "{}",
            e.hint()
        );
        assert!(occupying("c", &placed, &live).is_empty());
    }
}

#[cfg(test)]
mod storage_record_tests {
    use super::*;
    use ployz_api::Authority::{Compute, Storage};

    #[test]
    fn records_follow_the_voter_set() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // A promote to 3 whose membership change got through but whose
        // record writes did not: c is a voter recorded as compute.
        let machines = [
            ("a".to_string(), Storage),
            ("b".to_string(), Storage),
            ("c".to_string(), Compute),
            ("d".to_string(), Compute),
        ];
        let fix = storage_record_fix(&v(&["a", "b", "c"]), &machines, 1);
        assert_eq!(fix.authority, [("c".to_string(), Storage)]);
        assert_eq!(fix.replicas, Some(3));
        // A promote that failed before the change: nothing moved, but a
        // replicas count already written ahead is put back.
        let fix = storage_record_fix(&v(&["a", "b"]), &machines[..2], 3);
        assert!(fix.authority.is_empty());
        assert_eq!(fix.replicas, Some(2));
        // A storage record for a machine that left the voter set.
        let fix = storage_record_fix(&v(&["a"]), &machines[..2], 1);
        assert_eq!(fix.authority, [("b".to_string(), Compute)]);
        assert_eq!(fix.replicas, None);
    }
}

#[cfg(test)]
mod quorum_tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn healthy_three_can_lose_one() {
        assert!(removal_keeps_quorum(&s(&["a", "b", "c"]), "c", &s(&["a", "b", "c"])).is_ok());
        // Removing the down one is how you recover.
        assert!(removal_keeps_quorum(&s(&["a", "b", "c"]), "c", &s(&["a", "b"])).is_ok());
    }

    #[test]
    fn refuses_when_the_rest_has_no_majority() {
        let e = removal_keeps_quorum(&s(&["a", "b", "c"]), "a", &s(&["a", "b"])).unwrap_err();
        assert!(matches!(
            e,
            QuorumRefusal::NoMajority {
                remaining: 2,
                live: 1,
                ..
            }
        ));
        assert!(e.to_string().contains("(c down)"), "{e}");
        assert!(e.hint().contains("bring the down"));
        let e = removal_keeps_quorum(&s(&["a", "b", "c", "d", "e"]), "a", &s(&["a", "b", "c"]))
            .unwrap_err();
        assert!(matches!(
            e,
            QuorumRefusal::NoMajority {
                remaining: 4,
                live: 2,
                ..
            }
        ));
        assert!(
            removal_keeps_quorum(&s(&["a", "b", "c", "d", "e"]), "a", &s(&["b", "c", "d"])).is_ok()
        );
    }

    #[test]
    fn never_removes_the_last_storage_machine() {
        let e = removal_keeps_quorum(&s(&["a"]), "a", &s(&["a"])).unwrap_err();
        assert!(matches!(e, QuorumRefusal::LastStorage { .. }));
        assert!(e.hint().contains("promote"));
    }

    #[test]
    fn two_to_one_is_allowed_when_the_survivor_is_up() {
        assert!(removal_keeps_quorum(&s(&["a", "b"]), "b", &s(&["a"])).is_ok());
        assert!(removal_keeps_quorum(&s(&["a", "b"]), "b", &s(&[])).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Lifecycle::{Active, Draining, Joining, Leaving};
    use LifecycleAction::{Activate, Drain};

    const ALL_STATES: [Lifecycle; 5] = [Joining, Active, Draining, Lifecycle::Standby, Leaving];
    const ALL_ACTIONS: [LifecycleAction; 3] = [Activate, Drain, LifecycleAction::Standby];

    fn ok(from: Lifecycle, a: LifecycleAction) -> Decision {
        decide("m1", from, a, false, &[]).unwrap()
    }

    #[test]
    fn allowed_transitions_without_workloads() {
        let table = [
            (Active, Activate, Active, false),
            (Active, Drain, Draining, true),
            (Active, LifecycleAction::Standby, Lifecycle::Standby, true),
            (Draining, Activate, Active, true),
            (Draining, Drain, Draining, false),
            (Draining, LifecycleAction::Standby, Lifecycle::Standby, true),
            (Lifecycle::Standby, Activate, Active, true),
            (Lifecycle::Standby, Drain, Draining, true),
            (
                Lifecycle::Standby,
                LifecycleAction::Standby,
                Lifecycle::Standby,
                false,
            ),
        ];
        for (from, action, next, changed) in table {
            assert_eq!(
                ok(from, action),
                Decision { next, changed },
                "{from} --{action}-->"
            );
        }
    }

    #[test]
    fn transitional_states_refuse_everything() {
        for from in [Joining, Leaving] {
            for action in ALL_ACTIONS {
                for force in [false, true] {
                    let e = decide("m1", from, action, force, &[]).unwrap_err();
                    assert!(matches!(e, Refusal::InTransition { .. }));
                    assert!(e.to_string().contains("m1"), "{e}");
                    assert!(e.to_string().contains(from.as_str()), "{e}");
                    assert!(e.hint().contains("machine rm --force m1"));
                }
            }
        }
    }

    #[test]
    fn standby_with_workloads_is_refused_naming_them() {
        let w = vec!["web".to_string(), "db".to_string()];
        for from in [Active, Draining] {
            let e = decide("m1", from, LifecycleAction::Standby, false, &w).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("web") && msg.contains("db") && msg.contains("m1"),
                "{msg}"
            );
            assert!(e.hint().contains("standby --force m1"), "{}", e.hint());
            assert!(e.hint().contains("service migrate web"), "{}", e.hint());
        }
    }

    #[test]
    fn force_standby_keeps_workloads_running() {
        let w = vec!["web".to_string()];
        let d = decide("m1", Active, LifecycleAction::Standby, true, &w).unwrap();
        assert_eq!(
            d,
            Decision {
                next: Lifecycle::Standby,
                changed: true
            }
        );
    }

    #[test]
    fn workloads_do_not_block_placement_only_changes() {
        let w = vec!["web".to_string()];
        for from in [Active, Draining, Lifecycle::Standby] {
            assert!(decide("m1", from, Drain, false, &w).is_ok());
            assert!(decide("m1", from, Activate, false, &w).is_ok());
        }
        // Already in standby: nothing to refuse.
        assert!(decide(
            "m1",
            Lifecycle::Standby,
            LifecycleAction::Standby,
            false,
            &w
        )
        .is_ok());
    }

    #[test]
    fn every_pair_has_an_answer() {
        for from in ALL_STATES {
            for action in ALL_ACTIONS {
                let r = decide("m1", from, action, false, &[]);
                match from {
                    Joining | Leaving => assert!(r.is_err()),
                    _ => assert!(r.is_ok()),
                }
            }
        }
    }
}
