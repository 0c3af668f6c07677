//! Where a service's replicas run: a pure function of the desired replica
//! count, the current placements and the machines. No IO; `deploy` calls it
//! inside a compare-and-set loop.
//!
//! Rules:
//! - Only `active` machines receive new placements. `draining` and `standby`
//!   machines keep what already runs there until a deploy of that service
//!   (an explicit user action) moves it, or it is migrated or removed.
//! - Existing placements on active machines are kept (their slot too), so a
//!   redeploy updates instances in place instead of reshuffling them.
//! - New replicas go to the active machine with the fewest replicas of this
//!   service, then the fewest live instances overall, then the lowest id:
//!   replicas spread before any machine gets a second one.
//! - Scaling down drops the highest slots first.

use ployz_api::{Lifecycle, MachineRecord, Placement};
use std::collections::HashMap;

/// One candidate machine as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub lifecycle: Lifecycle,
    /// Live instances of any service on it.
    pub load: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no machine is active, so service `{service}` has nowhere to run{detail}")]
    NoActiveMachine { service: String, detail: String },
}

impl PlacementError {
    pub fn hint(&self) -> String {
        match self {
            PlacementError::NoActiveMachine { .. } => {
                "activate a machine with `ployzctl machine activate <id>` (see `ployzctl machine ls`)"
                    .into()
            }
        }
    }
}

/// The placements a service with `replicas` replicas should have.
pub fn place(
    service: &str,
    replicas: u32,
    current: &[Placement],
    machines: &[Candidate],
) -> Result<Vec<Placement>, PlacementError> {
    let active: Vec<&Candidate> = machines
        .iter()
        .filter(|m| m.lifecycle == Lifecycle::Active)
        .collect();
    let mut kept: Vec<Placement> = current
        .iter()
        .filter(|p| active.iter().any(|m| m.id == p.machine))
        .cloned()
        .collect();
    kept.sort_by_key(|p| p.slot);
    kept.truncate(replicas as usize);
    if kept.len() == replicas as usize {
        return Ok(kept);
    }
    if active.is_empty() {
        let others: Vec<String> = machines
            .iter()
            .map(|m| format!("{} is {}", m.id, m.lifecycle))
            .collect();
        let detail = if others.is_empty() {
            String::new()
        } else {
            format!(" ({})", others.join(", "))
        };
        return Err(PlacementError::NoActiveMachine {
            service: service.to_string(),
            detail,
        });
    }
    let mut next_slot = current
        .iter()
        .map(|p| p.slot + 1)
        .max()
        .unwrap_or(0)
        .max(kept.iter().map(|p| p.slot + 1).max().unwrap_or(0));
    let mut mine: HashMap<String, usize> = HashMap::new();
    for p in &kept {
        *mine.entry(p.machine.clone()).or_default() += 1;
    }
    let mut load: HashMap<&str, usize> = active.iter().map(|m| (m.id.as_str(), m.load)).collect();
    while kept.len() < replicas as usize {
        let best = active
            .iter()
            .min_by_key(|m| {
                (
                    mine.get(m.id.as_str()).copied().unwrap_or(0),
                    load.get(m.id.as_str()).copied().unwrap_or(0),
                    m.id.as_str(),
                )
            })
            .expect("active is not empty");
        kept.push(Placement {
            machine: best.id.clone(),
            slot: next_slot,
            paused: false,
            generation: None,
        });
        next_slot += 1;
        *mine.entry(best.id.clone()).or_default() += 1;
        *load.entry(best.id.as_str()).or_default() += 1;
    }
    Ok(kept)
}

/// Placement candidates: the machines with how many instances each runs.
pub fn candidates(machines: &[MachineRecord], load: &HashMap<String, usize>) -> Vec<Candidate> {
    machines
        .iter()
        .map(|m| Candidate {
            id: m.id.clone(),
            lifecycle: m.lifecycle,
            load: load.get(&m.id).copied().unwrap_or(0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, lifecycle: Lifecycle, load: usize) -> Candidate {
        Candidate {
            id: id.into(),
            lifecycle,
            load,
        }
    }

    fn p(machine: &str, slot: u32) -> Placement {
        Placement {
            machine: machine.into(),
            slot,
            paused: false,
            generation: None,
        }
    }

    fn machines_of(ps: &[Placement]) -> Vec<&str> {
        ps.iter().map(|p| p.machine.as_str()).collect()
    }

    #[test]
    fn spreads_over_active_machines_only() {
        let ms = [
            m("a", Lifecycle::Active, 0),
            m("b", Lifecycle::Draining, 0),
            m("c", Lifecycle::Active, 0),
            m("d", Lifecycle::Standby, 0),
        ];
        let got = place("web", 2, &[], &ms).unwrap();
        assert_eq!(machines_of(&got), ["a", "c"]);
        assert_eq!(got.iter().map(|p| p.slot).collect::<Vec<_>>(), [0, 1]);
        // More replicas than active machines: they double up, still never on b or d.
        let got = place("web", 5, &[], &ms).unwrap();
        assert!(got.iter().all(|p| p.machine == "a" || p.machine == "c"));
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn prefers_less_loaded_machines() {
        let ms = [
            m("a", Lifecycle::Active, 3),
            m("b", Lifecycle::Active, 0),
            m("c", Lifecycle::Active, 1),
        ];
        assert_eq!(machines_of(&place("web", 2, &[], &ms).unwrap()), ["b", "c"]);
    }

    #[test]
    fn keeps_existing_placements_and_slots() {
        let ms = [
            m("a", Lifecycle::Active, 1),
            m("b", Lifecycle::Active, 0),
            m("c", Lifecycle::Active, 0),
        ];
        let cur = [p("a", 4)];
        let got = place("web", 2, &cur, &ms).unwrap();
        assert_eq!(got[0], p("a", 4));
        assert_eq!(got[1].slot, 5);
        assert_ne!(got[1].machine, "a");
        // Scale down drops the highest slots.
        let got = place("web", 1, &[p("a", 4), p("b", 7)], &ms).unwrap();
        assert_eq!(got, [p("a", 4)]);
    }

    #[test]
    fn redeploy_moves_placements_off_non_active_machines() {
        let ms = [m("a", Lifecycle::Draining, 1), m("b", Lifecycle::Active, 0)];
        let got = place("web", 1, &[p("a", 0)], &ms).unwrap();
        assert_eq!(got, [p("b", 1)]);
    }

    #[test]
    fn no_active_machine_is_a_clear_error() {
        let ms = [
            m("a", Lifecycle::Draining, 0),
            m("b", Lifecycle::Standby, 0),
        ];
        let e = place("web", 1, &[], &ms).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("a is draining") && msg.contains("b is standby"),
            "{msg}"
        );
        assert!(e.hint().contains("machine activate"));
        // Nothing to place needs no machine.
        assert_eq!(place("web", 0, &[], &ms).unwrap(), []);
    }
}
