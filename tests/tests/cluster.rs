//! A real multi-machine cluster on namespace hosts: joins by invite, storage
//! promotion, removal, and faults (kill -9, partitions, full restarts).

use ployz_tests::netns::Testbed;
use ployz_tests::{cluster_on, eventually, stderr, stdout, Machine};
use serde_json::Value;
use std::time::Duration;

/// Founder on host 0, the rest joined by invite.
struct Cluster {
    machines: Vec<Machine>,
    // Dropped last: the machines die with their namespaces.
    tb: Testbed,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        let tb = Testbed::new(n);
        let machines = cluster_on(&tb, "test");
        Cluster { machines, tb }
    }

    fn ids(&self) -> Vec<String> {
        self.machines.iter().map(|m| m.id()).collect()
    }

    fn promote_all(&self) {
        self.promote(&self.ids()[1..]);
    }

    /// Machine 0 promotes `ids` to a storage set of three.
    fn promote(&self, ids: &[String]) {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.machines[0].promote(&ids);
    }
}

#[test]
fn three_machines_join_by_invite_and_promote_to_three_replicas() {
    let c = Cluster::new(3);
    let ids = c.ids();
    let mut ips = std::collections::HashSet::new();
    for m in &c.machines {
        let list = m.machines();
        assert_eq!(list.len(), 3, "{list:?}");
        for x in &list {
            assert_eq!(x["lifecycle"], "active");
            ips.insert(x["overlay_ip"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(ips.len(), 3, "distinct overlay IPs");
    // Without a replica, a machine follows the founder's change events.
    let relayed = eventually(Duration::from_secs(15), || {
        let s = c.machines[1].ctl_json(&["mesh", "status"]);
        (s["store"]["events_from"] == ids[0].as_str()).then_some(())
    });
    assert!(
        relayed.is_some(),
        "machine 1 never followed the founder's events: {}",
        c.machines[1].ctl_json(&["mesh", "status"])
    );
    c.promote_all();
    for m in &c.machines {
        for x in m.machines() {
            assert_eq!(x["authority"], "storage", "{x}");
        }
        let s = m.ctl_json(&["mesh", "status"]);
        assert_eq!(s["network"]["storage_replicas"], 3);
    }
    // Once promoted, each has its own replica's events and drops the relay
    // (a storage machine would otherwise send it every change, forever).
    for m in &c.machines {
        let dropped = eventually(Duration::from_secs(15), || {
            try_invite(&c.machines[0]);
            let s = m.ctl_json(&["mesh", "status"]);
            s["store"]["events_from"].is_null().then_some(())
        });
        assert!(
            dropped.is_some(),
            "a promoted machine still relays events: {}",
            m.ctl_json(&["mesh", "status"])
        );
    }
    // Lifecycle commands work from any machine on any machine.
    let r = c.machines[2].ctl_json(&["machine", "drain", &ids[0]]);
    assert_eq!(r["machine"]["lifecycle"], "draining");
    let list = c.machines[1].machines();
    assert!(list
        .iter()
        .any(|x| x["id"] == ids[0].as_str() && x["lifecycle"] == "draining"));
    c.machines[1].ctl_json(&["machine", "activate", &ids[0]]);
    // Promoting again to a size that does not add up is refused, nothing changes.
    let o = c.machines[1].ctl(&["machine", "storage", "promote", "--replicas", "5", &ids[1]]);
    assert!(!o.status.success());
}

/// The store's leader as seen by `m`.
fn leader_of(m: &Machine) -> Option<String> {
    m.ctl_json(&["mesh", "status"])["store"]["leader"]
        .as_str()
        .map(str::to_string)
}

/// Create an invite through `m`; `Some(id)` when the write was acknowledged.
fn try_invite(m: &Machine) -> Option<String> {
    let o = m.ctl(&["--json", "machine", "invite", "create"]);
    if !o.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v["invite_id"].as_str().map(str::to_string)
}

fn assert_all_present(m: &Machine, acked: &[String]) {
    // Right after restarts the store may still be electing: wait for it.
    let list = eventually(Duration::from_secs(30), || {
        let o = m.ctl(&["--json", "machine", "invite", "list"]);
        o.status
            .success()
            .then(|| serde_json::from_slice::<Value>(&o.stdout).unwrap())
    })
    .unwrap_or_else(|| m.ctl_json(&["machine", "invite", "list"]));
    let have: std::collections::HashSet<&str> = list["invites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["invite_id"].as_str().unwrap())
        .collect();
    for id in acked {
        assert!(have.contains(id.as_str()), "acknowledged invite {id} lost");
    }
}

#[test]
fn writes_survive_killing_the_leader() {
    let mut c = Cluster::new(3);
    c.promote_all();
    let ids = c.ids();
    let leader = leader_of(&c.machines[0]).expect("a leader");
    let li = ids.iter().position(|i| *i == leader).unwrap();
    let writer = (li + 1) % 3;
    let mut acked = Vec::new();
    for _ in 0..10 {
        acked.extend(try_invite(&c.machines[writer]));
    }
    assert_eq!(acked.len(), 10, "healthy cluster acknowledges every write");
    c.machines[li].kill9();
    // Keep writing through a survivor until writes flow again after the election.
    let mut failed = 0;
    let after = eventually(Duration::from_secs(30), || {
        match try_invite(&c.machines[writer]) {
            Some(id) => {
                acked.push(id);
                (acked.len() >= 20).then_some(())
            }
            None => {
                failed += 1;
                None
            }
        }
    });
    if after.is_none() {
        let last = c.machines[writer].ctl(&["machine", "invite", "create"]);
        let others: Vec<String> = (0..3)
            .filter(|i| *i != li)
            .map(|i| c.machines[i].ctl_json(&["mesh", "status"])["store"].to_string())
            .collect();
        panic!(
            "writes did not resume after the leader died ({failed} failed); last error: {}\nsurvivors' stores: {others:?}",
            stderr(&last)
        );
    }
    let new_leader = leader_of(&c.machines[writer]).expect("new leader");
    assert_ne!(new_leader, leader);
    c.machines[li].restart();
    for m in &c.machines {
        assert_all_present(m, &acked);
    }
}

#[test]
fn minority_refuses_majority_writes_and_healed_machine_catches_up() {
    let c = Cluster::new(3);
    c.promote_all();
    let ids = c.ids();
    let leader = leader_of(&c.machines[0]).expect("leader");
    let cut = (0..3).find(|i| ids[*i] != leader).unwrap();
    let majority = (0..3).find(|i| *i != cut).unwrap();
    c.tb.hosts[cut].cut();
    let mut acked = Vec::new();
    for _ in 0..5 {
        acked.push(try_invite(&c.machines[majority]).expect("majority keeps writing"));
    }
    let o = c.machines[cut].ctl(&["machine", "invite", "create"]);
    assert_eq!(
        o.status.code(),
        Some(7),
        "minority must refuse: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("cannot serve"), "{}", stderr(&o));
    c.tb.hosts[cut].heal();
    // The healed machine's own replica catches up with the leader's.
    let caught_up = eventually(Duration::from_secs(20), || {
        let l =
            c.machines[majority].ctl_json(&["mesh", "status"])["store"]["last_applied"].as_u64()?;
        let s = c.machines[cut].ctl_json(&["mesh", "status"])["store"]["last_applied"].as_u64()?;
        (s >= l).then_some(())
    });
    assert!(caught_up.is_some(), "healed machine did not catch up");
    assert_all_present(&c.machines[cut], &acked);
}

#[test]
fn killing_every_storage_machine_loses_no_acknowledged_write() {
    let mut c = Cluster::new(3);
    c.promote_all();
    let mut acked = Vec::new();
    for i in 0..15 {
        acked.extend(try_invite(&c.machines[i % 3]));
    }
    assert_eq!(acked.len(), 15);
    for m in c.machines.iter_mut() {
        m.kill9();
    }
    for m in c.machines.iter_mut() {
        m.restart();
    }
    let back = eventually(Duration::from_secs(30), || leader_of(&c.machines[0]));
    assert!(back.is_some(), "no leader after restart");
    for m in &c.machines {
        assert_all_present(m, &acked);
    }
}

#[test]
fn one_token_two_importers_exactly_one_joins() {
    let tb = Testbed::new(3);
    let founder = Machine::start_in(&tb.hosts[0], &[]);
    founder.ctl_json(&["mesh", "init", "race"]);
    let token = founder.invite();
    let a = Machine::start_in(&tb.hosts[1], &[]);
    let b = Machine::start_in(&tb.hosts[2], &[]);
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| a.ctl(&["machine", "invite", "import", "--token", &token]));
        let hb = s.spawn(|| b.ctl(&["machine", "invite", "import", "--token", &token]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let oks = [&ra, &rb].iter().filter(|o| o.status.success()).count();
    assert_eq!(
        oks,
        1,
        "a: {} {}\nb: {} {}",
        stdout(&ra),
        stderr(&ra),
        stdout(&rb),
        stderr(&rb)
    );
    let loser = if ra.status.success() { &rb } else { &ra };
    assert!(stderr(loser).contains("already used"), "{}", stderr(loser));
    assert_eq!(founder.machines().len(), 2);
    // The loser changed nothing on its side either: it is in no network.
    let lm = if ra.status.success() { &b } else { &a };
    assert!(lm.ctl_json(&["mesh", "status"])["network"].is_null());
}

#[test]
fn five_concurrent_joins_get_distinct_addresses() {
    let tb = Testbed::new(6);
    let founder = Machine::start_in(&tb.hosts[0], &[]);
    founder.ctl_json(&["mesh", "init", "five"]);
    let joiners: Vec<Machine> = tb.hosts[1..]
        .iter()
        .map(|h| Machine::start_in(h, &[]))
        .collect();
    let tokens: Vec<String> = joiners.iter().map(|_| founder.invite()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = joiners
            .iter()
            .zip(&tokens)
            .map(|(m, t)| s.spawn(move || m.ctl(&["machine", "invite", "import", "--token", t])))
            .collect();
        for h in handles {
            let o = h.join().unwrap();
            assert!(o.status.success(), "{}", stderr(&o));
        }
    });
    let list = founder.machines();
    assert_eq!(list.len(), 6);
    let ips: std::collections::HashSet<_> =
        list.iter().map(|m| m["overlay_ip"].to_string()).collect();
    let subnets: std::collections::HashSet<_> =
        list.iter().map(|m| m["subnet"].to_string()).collect();
    assert_eq!(ips.len(), 6, "{list:?}");
    assert_eq!(subnets.len(), 6, "{list:?}");
    for m in &list {
        assert_eq!(m["lifecycle"], "active");
    }
}

#[test]
fn rm_cleans_up_the_target_and_force_only_deletes_the_record() {
    let mut c = Cluster::new(3);
    let ids = c.ids();
    // Removing yourself is refused.
    let o = c.machines[0].ctl(&["machine", "rm", &ids[0]]);
    assert_eq!(o.status.code(), Some(5));
    assert!(
        stderr(&o).contains("cannot remove itself"),
        "{}",
        stderr(&o)
    );

    // Plain rm: machine 1 cleans up, exits and forgets everything.
    let r = c.machines[0].ctl_json(&["machine", "rm", &ids[1]]);
    assert_eq!(r["cleaned_up"], true);
    assert!(
        c.machines[1].wait_exit(Duration::from_secs(10)).is_some(),
        "removed ployzd kept running"
    );
    assert!(
        !c.machines[1].data_dir().join("identity.json").exists(),
        "state left behind"
    );
    for m in [&c.machines[0], &c.machines[2]] {
        let list = m.machines();
        assert_eq!(list.len(), 2);
        assert!(list.iter().all(|x| x["id"] != ids[1].as_str()));
    }

    // An unreachable machine: plain rm refuses and points at --force.
    let key2 = c.machines[0]
        .machines()
        .into_iter()
        .find(|m| m["id"] == ids[2].as_str())
        .and_then(|m| m["wg_public_key"].as_str().map(str::to_string))
        .expect("machine 2's WireGuard key");
    assert!(stdout(&c.machines[0].exec("wg", &["show", "plz0", "peers"])).contains(&key2));
    c.tb.hosts[2].cut();
    let o = c.machines[0].ctl(&["machine", "rm", &ids[2]]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(c.machines[0].machines().len(), 2, "nothing removed");
    let r = c.machines[0].ctl_json(&["machine", "rm", "--force", &ids[2]]);
    assert_eq!(r["cleaned_up"], false);
    assert_eq!(c.machines[0].machines().len(), 1);
    // Its WireGuard key is dropped: no longer a peer (issue 17).
    let dropped = eventually(Duration::from_secs(10), || {
        let peers = stdout(&c.machines[0].exec("wg", &["show", "plz0", "peers"]));
        (!peers.contains(&key2)).then_some(())
    });
    assert!(
        dropped.is_some(),
        "the removed machine is still a WireGuard peer: {}",
        stdout(&c.machines[0].exec("wg", &["show", "plz0", "peers"]))
    );
    // Its subnet is free again for the next joiner.
    c.tb.hosts[2].heal();
}

#[test]
fn removal_that_would_break_storage_quorum_is_refused() {
    let mut c = Cluster::new(3);
    c.promote_all();
    let ids = c.ids();
    // Machine 2 goes down; removing machine 1 would leave {0, 2} with 2 down.
    c.machines[2].kill9();
    let dead = ids[2].clone();
    let live_leader = eventually(Duration::from_secs(20), || {
        leader_of(&c.machines[0]).filter(|l| *l != dead)
    });
    assert!(live_leader.is_some(), "no leader among the survivors");
    let o = c.machines[0].ctl(&["machine", "rm", "--force", &ids[1]]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("no majority") && e.contains(&ids[2]), "{e}");
    assert!(e.contains("bring the down"), "{e}");
    assert_eq!(c.machines[0].machines().len(), 3, "nothing removed");
    // Removing the dead machine itself is the way out, and keeps quorum.
    let r = c.machines[0].ctl_json(&["machine", "rm", "--force", &ids[2]]);
    assert_eq!(r["left_storage"], true);
    let s = c.machines[1].ctl_json(&["mesh", "status"]);
    assert_eq!(s["store"]["voters"].as_array().unwrap().len(), 2, "{s}");
    // The two survivors still write.
    assert!(try_invite(&c.machines[1]).is_some());
}

#[test]
fn compute_machine_fails_over_between_storage_machines() {
    let mut c = Cluster::new(4);
    let ids = c.ids();
    c.promote(&ids[1..3]);
    let compute = &c.machines[3];
    let me = compute.machines();
    let mine = me.iter().find(|m| m["id"] == ids[3].as_str()).unwrap();
    assert_eq!(mine["authority"], "compute");
    assert!(try_invite(compute).is_some());
    // It learns the new storage set in the background.
    let learned = eventually(Duration::from_secs(15), || {
        let s = compute.ctl_json(&["mesh", "status"]);
        (s["store"]["storage_peers"].as_array()?.len() == 3).then_some(())
    });
    assert!(
        learned.is_some(),
        "compute machine never learned the storage set: {}\nlog:\n{}",
        compute.ctl_json(&["mesh", "status"]),
        compute.log()
    );
    // Kill storage machines one at a time (never two: that would lose quorum);
    // the compute machine keeps writing through whichever is left.
    for victim in [0usize, 1] {
        c.machines[victim].kill9();
        let ok = eventually(Duration::from_secs(30), || try_invite(&c.machines[3]));
        assert!(
            ok.is_some(),
            "compute machine lost the store after machine {victim} died"
        );
        c.machines[victim].restart();
        let back = eventually(Duration::from_secs(30), || {
            let s = c.machines[victim].ctl_json(&["mesh", "status"]);
            s["store"]["leader"].as_str().map(|_| ())
        });
        assert!(back.is_some());
    }
}

#[test]
fn removing_a_storage_machine_from_a_compute_machine_changes_the_voter_set() {
    let mut c = Cluster::new(4);
    let ids = c.ids();
    c.promote(&ids[1..3]);
    // Machine 3 holds no replica: the voter change must run on the leader.
    let r = c.machines[3].ctl_json(&["machine", "rm", &ids[2]]);
    assert_eq!(r["left_storage"], true, "{r}");
    assert!(
        c.machines[2].wait_exit(Duration::from_secs(10)).is_some(),
        "the removed machine did not exit; its log:\n{}",
        c.machines[2].log()
    );
    let s = c.machines[0].ctl_json(&["mesh", "status"]);
    let voters = s["store"]["voters"].as_array().unwrap();
    assert_eq!(voters.len(), 2, "{s}");
    assert!(!voters.iter().any(|v| *v == ids[2].as_str()), "{s}");
    assert!(try_invite(&c.machines[3]).is_some());
}

/// `invite import --token-stdin`: the token never appears on a command
/// line (`machine add` joins this way); an empty stdin is an invalid
/// argument and changes nothing.
#[test]
fn join_with_the_token_on_stdin() {
    use std::io::Write as _;
    let tb = Testbed::new(2);
    let founder = Machine::start_in(&tb.hosts[0], &[]);
    founder.ctl_json(&["mesh", "init", "stdinnet"]);
    let joiner = Machine::start_in(&tb.hosts[1], &[]);
    let import = |input: &str| {
        let mut c = std::process::Command::new(ployz_tests::bin("ployzctl"))
            .arg("--socket")
            .arg(joiner.socket())
            .args(["--json", "machine", "invite", "import", "--token-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let empty = import("\n");
    assert_eq!(empty.status.code(), Some(6), "{}", stderr(&empty));
    assert!(stdout(&joiner.ctl(&["--json", "mesh", "status"])).contains("\"network\": null"));
    let token = founder.invite();
    let out = import(&format!("{token}\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["machine"]["lifecycle"], "active", "{v}");
    // Neither --token nor --token-stdin: a usage error.
    let neither = joiner.ctl(&["machine", "invite", "import"]);
    assert_eq!(neither.status.code(), Some(2));
}
