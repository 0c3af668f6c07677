//! Long operations under failure (issue 18): `machine rm` of a machine with
//! several workloads waits for its cleanup and tells the truth; a
//! migration whose machine is killed -9 mid-way is rolled back (or, past
//! the switch, completed) by the storage leader, and `op ls` / `op wait`
//! say which; the CLI's exit codes follow the outcome.

use ployz_tests::images::{busybox_image, padded_busybox_image};
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stderr, stdout, Machine};
use serde_json::Value;
use std::time::{Duration, Instant};

const HTTPD: &[&str] = &["httpd", "-f", "-p", "8080", "-h", "/www"];

fn instances(m: &Machine, service: &str) -> Vec<Value> {
    m.ctl_json(&["service", "ls"])["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["instances"].as_array().unwrap().clone())
        .collect()
}

fn ops(m: &Machine) -> Vec<Value> {
    m.ctl_json(&["op", "ls"])["operations"]
        .as_array()
        .unwrap()
        .clone()
}

/// `op wait ID` (up to 180 s): the operation as it ended, and the exit code.
fn wait_op(m: &Machine, id: &str) -> (Value, Option<i32>) {
    let w = m.ctl(&["--json", "op", "wait", id, "--timeout-secs", "180"]);
    let end = serde_json::from_slice(&w.stdout)
        .unwrap_or_else(|_| panic!("op wait: {}", String::from_utf8_lossy(&w.stderr)));
    (end, w.status.code())
}

fn op_of<'a>(ops: &'a [Value], kind: &str, subject: &str) -> Option<&'a Value> {
    ops.iter()
        .find(|o| o["kind"] == kind && o["subject"] == subject)
}

#[test]
fn rm_of_a_busy_machine_waits_for_its_cleanup_and_is_recorded() {
    let tb = Testbed::new(2);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-rm");
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let image = image.to_str().unwrap();
    let target = ms[1].id();
    // Four workloads on the machine that leaves: the founder is drained.
    ms[0].ctl_json(&["machine", "drain", &ms[0].id()]);
    for n in 0..4 {
        let name = format!("busy{n}");
        let v = ms[0].ctl_json(&["deploy", "service", &name, "--image", image]);
        assert_eq!(v["instances"][0]["machine"], target.as_str(), "{v:#}");
    }
    ms[0].ctl_json(&["machine", "activate", &ms[0].id()]);

    let started = Instant::now();
    let out = ms[0].ctl(&["--json", "machine", "rm", &target]);
    assert!(
        out.status.success(),
        "rm failed ({}): {}\n{}",
        out.status,
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!(
        "rm of a machine with 4 workloads took {:?}",
        started.elapsed()
    );
    assert_eq!(report["cleaned_up"], true, "{report:#}");
    // It exited by itself after its cleanup.
    assert!(
        ms[1].wait_exit(Duration::from_secs(20)).is_some(),
        "the removed machine still runs"
    );
    let machines = ms[0].ctl_json(&["machine", "ls"]);
    assert!(
        !machines.to_string().contains(&target),
        "its record is gone: {machines:#}"
    );
    let all = ops(&ms[0]);
    let rm = op_of(&all, "machine_rm", &target).expect("the removal is recorded");
    assert_eq!(rm["state"], "succeeded", "{rm:#}");
    assert_eq!(rm["exit_code"], 0, "{rm:#}");
    // `op wait` on a finished operation answers at once, exiting as it did.
    let id = rm["id"].as_str().unwrap();
    let w = ms[0].ctl(&["op", "wait", id]);
    assert!(w.status.success(), "{}", stdout(&w));
    assert!(stdout(&w).contains("succeeded"), "{}", stdout(&w));
    // The deploys were recorded too.
    assert!(op_of(&all, "deploy", "busy0").is_some_and(|o| o["state"] == "succeeded"));
    // Unknown operations are "not found" (exit 4).
    let none = ms[0].ctl(&["op", "wait", "op-000000000000"]);
    assert_eq!(none.status.code(), Some(4), "{}", stdout(&none));
    // No placement of the removed machine is left behind.
    for n in 0..4 {
        assert!(instances(&ms[0], &format!("busy{n}")).is_empty());
    }
}

/// The machine running `service migrate` is killed -9 in the middle of it:
/// the storage leader rolls the migration back (the original runs again,
/// unpaused, and the target placement is withdrawn) or, if the switch had
/// happened, records it as done. Either way exactly one instance runs and
/// nothing stays paused.
#[test]
fn a_migration_whose_machine_dies_is_finished_by_the_leader() {
    let tb = Testbed::new(3);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-mig");
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let image = image.to_str().unwrap();
    // ms[1] only runs the command: nothing is placed on it.
    ms[0].ctl_json(&["machine", "drain", &ms[1].id()]);
    ms[0].ctl_json(&["deploy", "service", "mover", "--image", image]);

    for kill_at in ["stop", "start"] {
        let before = instances(&ms[0], "mover");
        let source = before[0]["machine"].as_str().unwrap().to_string();
        let target = [ms[0].id(), ms[2].id()]
            .into_iter()
            .find(|id| *id != source)
            .unwrap();
        let mut cli = ms[1].ctl_spawn(&["service", "migrate", "mover", "--to", &target]);
        let seen = eventually(Duration::from_secs(60), || {
            let all = ops(&ms[0]);
            op_of(&all, "migrate", "mover")
                .filter(|o| o["state"] == "running" && o["step"] == kill_at)
                .map(|o| o["id"].as_str().unwrap().to_string())
        });
        let Some(id) = seen else {
            let _ = cli.kill();
            let out = cli.wait_with_output().unwrap();
            panic!(
                "the migration never reached step {kill_at}: {:#?}\ncli: {}{}",
                ops(&ms[0]),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ms[1].kill9();
        let _ = cli.wait();
        let healed = Instant::now();
        // `op wait` follows it to its end from another machine; the exit
        // code says how it ended.
        let (end, code) = wait_op(&ms[0], &id);
        println!(
            "killed at {kill_at}: ended {} after {:?}: {}",
            end["state"],
            healed.elapsed(),
            end["message"]
        );
        assert!(
            end["state"] == "rolled_back" || end["state"] == "succeeded",
            "{end:#}"
        );
        let expect_code = if end["state"] == "succeeded" { 0 } else { 7 };
        assert_eq!(code, Some(expect_code), "{end:#}");
        // Converges: exactly one instance, running, where the outcome says.
        let at = if end["state"] == "succeeded" {
            &target
        } else {
            &source
        };
        let one = eventually(Duration::from_secs(60), || {
            let is = instances(&ms[0], "mover");
            (is.len() == 1 && is[0]["state"] == "running" && is[0]["machine"] == at.as_str())
                .then_some(is)
        });
        assert!(
            one.is_some(),
            "after {kill_at}: {:#?}\nops: {:#?}",
            instances(&ms[0], "mover"),
            ops(&ms[0])
        );
        ms[1].restart();
        // Back in the mesh before it runs the next command.
        assert!(
            eventually(Duration::from_secs(30), || ms[1]
                .ctl(&["service", "ls"])
                .status
                .success()
                .then_some(()))
            .is_some(),
            "the restarted machine does not reach the store: {}",
            ms[1].log()
        );
    }
}

/// Item 2 of issue 18: the storage leader is killed -9 in the middle of a
/// migration, once while it is the migration's target and once while it is
/// only the store's leader. The machine running the migration keeps going
/// (its writes retry on the new leader) or rolls back, and after the killed
/// machine comes back the cluster converges: one instance running, nothing
/// paused, the operation ended, and `op wait` exits as it ended.
#[test]
fn a_migration_survives_the_death_of_the_storage_leader() {
    let tb = Testbed::new(3);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-lead");
    let ids: Vec<String> = ms.iter().map(Machine::id).collect();
    ms[0].promote(&[&ids[1], &ids[2]]);
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let image = image.to_str().unwrap();
    let leader = |ms: &[Machine]| -> usize {
        eventually(Duration::from_secs(30), || {
            ms.iter().find_map(|m| {
                let s = m.ctl(&["--json", "mesh", "status"]);
                let v: Value = serde_json::from_slice(&s.stdout).ok()?;
                let l = v["store"]["leader"].as_str()?.to_string();
                ids.iter().position(|i| *i == l)
            })
        })
        .expect("a leader")
    };

    for leader_is_target in [true, false] {
        let l = leader(&ms);
        // The instance runs on a machine that is not the leader.
        ms[(l + 1) % 3].ctl_json(&["machine", "drain", &ids[l]]);
        let _ = ms[(l + 1) % 3].ctl(&["service", "rm", "mover"]);
        let v = ms[(l + 1) % 3].deploy(&["mover", "--image", image]);
        ms[(l + 1) % 3].ctl_json(&["machine", "activate", &ids[l]]);
        let source = v["instances"][0]["machine"].as_str().unwrap().to_string();
        let s = ids.iter().position(|i| *i == source).unwrap();
        assert_ne!(s, l);
        let other = (0..3).find(|i| *i != s && *i != l).unwrap();
        let (target, owner) = if leader_is_target {
            (l, other)
        } else {
            (other, other)
        };
        let cli = ms[owner].ctl_spawn(&[
            "--json",
            "service",
            "migrate",
            "mover",
            "--to",
            &ids[target],
        ]);
        let kill_at = if leader_is_target { "start" } else { "stop" };
        let id = eventually(Duration::from_secs(60), || {
            let all = ops(&ms[owner]);
            op_of(&all, "migrate", "mover")
                .filter(|o| o["state"] == "running" && o["step"] == kill_at)
                .map(|o| o["id"].as_str().unwrap().to_string())
        })
        .unwrap_or_else(|| panic!("never reached {kill_at}: {:#?}", ops(&ms[owner])));
        std::thread::sleep(Duration::from_millis(250));
        ms[l].kill9();
        let killed = Instant::now();
        std::thread::sleep(Duration::from_secs(3));
        ms[l].restart();
        let out = cli.wait_with_output().unwrap();
        println!(
            "leader{} killed at {kill_at}: migrate exited {:?} after {:?}: {}{}",
            if leader_is_target { " (= target)" } else { "" },
            out.status.code(),
            killed.elapsed(),
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        let (end, waited) = wait_op(&ms[other], &id);
        assert!(
            end["state"] == "rolled_back" || end["state"] == "succeeded",
            "{end:#}"
        );
        // The CLI said the truth: it exits as the operation ended.
        let code = end["exit_code"].as_i64().unwrap() as i32;
        assert_eq!(waited, Some(code), "{end:#}");
        assert_eq!(out.status.code(), Some(code), "{end:#}\n{}", stdout(&out));
        let at = if end["state"] == "succeeded" {
            &ids[target]
        } else {
            &source
        };
        let one = eventually(Duration::from_secs(90), || {
            let is = instances(&ms[other], "mover");
            (is.len() == 1 && is[0]["state"] == "running" && is[0]["machine"] == at.as_str())
                .then_some(())
        });
        assert!(
            one.is_some(),
            "{:#?}\n{end:#}",
            instances(&ms[other], "mover")
        );
    }
}

/// `machine rm` while the machine being removed is killed -9 in the middle
/// of its cleanup: the removal still completes and is recorded.
#[test]
fn rm_completes_when_the_target_dies_during_its_cleanup() {
    let tb = Testbed::new(2);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-rmt");
    let ids: Vec<String> = ms.iter().map(Machine::id).collect();
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let image = image.to_str().unwrap();
    ms[0].ctl_json(&["machine", "drain", &ids[0]]);
    for n in 0..3 {
        ms[0].deploy(&[&format!("rmf{n}"), "--image", image]);
    }
    let rm = ms[0].ctl_spawn(&["--json", "machine", "rm", &ids[1]]);
    let seen = eventually(Duration::from_secs(60), || {
        let all = ops(&ms[0]);
        op_of(&all, "machine_rm", &ids[1])
            .filter(|o| o["step"] == "cleanup" || o["step"] == "records")
            .map(|_| ())
    });
    assert!(seen.is_some(), "{:#?}", ops(&ms[0]));
    ms[1].kill9();
    let out = rm.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "rm: {}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("target killed during its cleanup: {report}");
    assert!(!ms[0]
        .ctl_json(&["machine", "ls"])
        .to_string()
        .contains(&ids[1]));
    let rec = op_of(&ops(&ms[0]), "machine_rm", &ids[1]).unwrap().clone();
    assert_eq!(rec["state"], "succeeded", "{rec:#}");
    for n in 0..3 {
        assert!(instances(&ms[0], &format!("rmf{n}")).is_empty());
    }
}

/// `machine rm` of a storage machine whose remover (a compute machine) is
/// killed -9 right after the target left the storage set: the storage
/// leader finishes the removal, and the status shows the real voter set.
#[test]
fn rm_is_finished_by_the_leader_when_the_remover_dies() {
    let tb = Testbed::new(4);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-rmr");
    let ids: Vec<String> = ms.iter().map(Machine::id).collect();
    ms[0].promote(&[&ids[1], &ids[2]]);
    let rm = ms[3].ctl_spawn(&["machine", "rm", &ids[2]]);
    let id = eventually(Duration::from_secs(60), || {
        let all = ops(&ms[0]);
        op_of(&all, "machine_rm", &ids[2])
            .filter(|o| o["step"] != "start" && o["step"] != "storage")
            .map(|o| o["id"].as_str().unwrap().to_string())
    })
    .unwrap_or_else(|| panic!("{:#?}", ops(&ms[0])));
    ms[3].kill9();
    let _ = rm.wait_with_output();
    let (end, code) = wait_op(&ms[0], &id);
    println!("remover killed: {end}");
    assert_eq!(end["state"], "succeeded", "{end:#}");
    assert_eq!(code, Some(0));
    let machines = ms[0].ctl_json(&["machine", "ls"]).to_string();
    assert!(!machines.contains(&ids[2]), "{machines}");
    let st = ms[0].ctl_json(&["mesh", "status"]);
    assert_eq!(st["store"]["voters"].as_array().unwrap().len(), 2, "{st:#}");
    assert_eq!(st["network"]["storage_replicas"], 2, "{st:#}");
}

/// Two deploys of the same new service at once, from two machines: both
/// end well (the second becomes a redeploy of the first), none with an
/// internal error.
#[test]
fn concurrent_deploys_of_one_new_service_both_succeed() {
    let tb = Testbed::new(2);
    let ms = ployz_tests::cluster_on(&tb, "optest-cc");
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let image = image.to_str().unwrap();
    let spawn =
        |m: &Machine| m.ctl_spawn(&["--json", "deploy", "service", "twin", "--image", image]);
    let a = spawn(&ms[0]);
    let b = spawn(&ms[1]);
    for out in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert!(
            out.status.success(),
            "{}{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let is = instances(&ms[0], "twin");
    assert_eq!(is.len(), 1, "{is:#?}");
    assert_eq!(is[0]["state"], "running");
}

/// Item 6: a machine removed with `--force` while it was cut off is not
/// stranded. Back on the network, `invite import` and `mesh init` say it is
/// still in its old network and point at `mesh leave`; `mesh leave`
/// refuses while it cannot ask the store, `--force` cleans it up and stops
/// ployzd, and started again it joins with a new invite.
#[test]
fn a_machine_removed_while_cut_off_can_leave_and_join_again() {
    let tb = Testbed::new(2);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-strand");
    let ids: Vec<String> = ms.iter().map(Machine::id).collect();
    tb.hosts[1].cut();
    let rm = ms[0].ctl_json(&["machine", "rm", "--force", &ids[1]]);
    assert_eq!(rm["cleaned_up"], false, "{rm:#}");
    tb.hosts[1].heal();

    let token = ms[0].ctl_json(&["machine", "invite", "create"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = ms[1].ctl(&["machine", "invite", "import", "--token", &token]);
    assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("mesh leave"),
        "{}",
        stderr(&refused)
    );
    let init = ms[1].ctl(&["mesh", "init", "another"]);
    assert_eq!(init.status.code(), Some(5), "{}", stderr(&init));
    assert!(stderr(&init).contains("mesh leave"), "{}", stderr(&init));

    // Its peers drop it from the mesh, so it usually cannot ask the store
    // any more: then only `--force` leaves. If it still can, the store says
    // it has no record, and a plain `mesh leave` does.
    let plain = ms[1].ctl(&["--json", "mesh", "leave"]);
    let left: Value = if plain.status.success() {
        serde_json::from_slice(&plain.stdout).unwrap()
    } else {
        assert_eq!(plain.status.code(), Some(7), "{}", stdout(&plain));
        assert!(stdout(&plain).contains("--force"), "{}", stdout(&plain));
        ms[1].ctl_json(&["mesh", "leave", "--force"])
    };
    assert_eq!(left["machine"], ids[1].as_str(), "{left:#}");
    assert!(
        ms[1].wait_exit(Duration::from_secs(30)).is_some(),
        "ployzd stops after leaving"
    );
    ms[1].restart();
    ms[1].ctl_json(&["machine", "invite", "import", "--token", &token]);
    let machines = ms[0].ctl_json(&["machine", "ls"]);
    assert_eq!(
        machines["machines"].as_array().unwrap().len(),
        2,
        "{machines:#}"
    );
    // A member is refused: `machine rm` is for that.
    let member = ms[1].ctl(&["mesh", "leave"]);
    assert_eq!(member.status.code(), Some(5), "{}", stderr(&member));
}

/// Wait until `m`'s `op ls` shows a running operation of `kind` on
/// `subject` at `step`; its id.
fn running_at(m: &Machine, kind: &str, subject: &str, step: &str) -> String {
    eventually(Duration::from_secs(60), || {
        let all = ops(m);
        op_of(&all, kind, subject)
            .filter(|o| o["state"] == "running" && o["step"] == step)
            .map(|o| o["id"].as_str().unwrap().to_string())
    })
    .unwrap_or_else(|| panic!("{kind} {subject} never reached {step}: {:#?}", ops(m)))
}

/// The machine running `deploy` is killed -9 before the service record is
/// written (while it imports a large image) and, in a second deploy, after
/// it (while it waits for the instances). The storage leader ends both: the
/// first rolled back (no service), the second succeeded (it runs), and `op
/// wait` exits as each ended.
#[test]
fn a_deploy_whose_machine_dies_is_ended_by_the_leader() {
    let tb = Testbed::new(2);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-dep");
    let tmp = tempfile::tempdir().unwrap();
    // ms[1] only runs the commands; the founder (the storage leader) runs
    // the instances.
    ms[0].ctl_json(&["machine", "drain", &ms[1].id()]);

    let big = padded_busybox_image(tmp.path(), "ployz-big", HTTPD, 384 << 20);
    let cli = ms[1].ctl_spawn(&[
        "deploy",
        "service",
        "early",
        "--image",
        big.to_str().unwrap(),
    ]);
    let id = running_at(&ms[0], "deploy", "early", "image");
    ms[1].kill9();
    let _ = cli.wait_with_output();
    let (end, code) = wait_op(&ms[0], &id);
    println!("owner killed while importing: {end}");
    assert_eq!(end["state"], "rolled_back", "{end:#}");
    assert_eq!(code, Some(7), "{end:#}");
    let services = ms[0].ctl_json(&["service", "ls"]).to_string();
    assert!(!services.contains("\"early\""), "{services}");

    ms[1].restart();
    let image = busybox_image(tmp.path(), "ployz-busybox", HTTPD);
    let cli = ms[1].ctl_spawn(&[
        "deploy",
        "service",
        "late",
        "--image",
        image.to_str().unwrap(),
    ]);
    let id = running_at(&ms[0], "deploy", "late", "instances");
    // Once the instance runs (its machine fetched the image from the owner),
    // while the deploy still watches that it stays up.
    let up = eventually(Duration::from_secs(60), || {
        let is = instances(&ms[0], "late");
        (is.len() == 1 && is[0]["state"] == "running").then_some(())
    });
    assert!(up.is_some(), "{:#?}", instances(&ms[0], "late"));
    ms[1].kill9();
    let _ = cli.wait_with_output();
    let (end, code) = wait_op(&ms[0], &id);
    println!("owner killed while waiting for instances: {end}");
    if end["message"]
        .as_str()
        .unwrap()
        .starts_with("every instance runs")
    {
        // The deploy ended by itself before the kill: the takeover was not
        // exercised, and the test would prove nothing.
        panic!("the deploy ended before its owner was killed: {end:#}");
    }
    assert_eq!(end["state"], "succeeded", "{end:#}");
    assert_eq!(code, Some(0), "{end:#}");
    let is = instances(&ms[0], "late");
    assert!(is.len() == 1 && is[0]["state"] == "running", "{is:#?}");
}

/// The storage leader is killed -9 during `machine storage promote` while a
/// target (cut off the network) cannot catch up. Back up, it rolls the promote back:
/// the storage set is the founder alone again and the targets are no
/// learners, so the same promote succeeds once the target answers again.
#[test]
fn a_promote_whose_leader_dies_is_rolled_back() {
    let tb = Testbed::new(3);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-prom");
    let ids: Vec<String> = ms.iter().map(Machine::id).collect();
    tb.hosts[2].cut();
    let cli = ms[0].ctl_spawn(&[
        "machine",
        "storage",
        "promote",
        "--replicas",
        "3",
        &ids[1],
        &ids[2],
    ]);
    let subject = format!("{},{}", ids[1], ids[2]);
    let id = running_at(&ms[0], "storage_promote", &subject, "catch-up");
    // The first target caught up; the second cannot.
    std::thread::sleep(Duration::from_secs(2));
    ms[0].kill9();
    let _ = cli.wait_with_output();
    ms[0].restart();
    let (end, code) = wait_op(&ms[0], &id);
    println!("leader killed during promote: {end}");
    tb.hosts[2].heal();
    assert_eq!(end["state"], "rolled_back", "{end:#}");
    assert_eq!(code, Some(9), "{end:#}");
    let st = ms[0].ctl_json(&["mesh", "status"]);
    assert_eq!(st["store"]["voters"].as_array().unwrap().len(), 1, "{st:#}");
    assert_eq!(st["network"]["storage_replicas"], 1, "{st:#}");
    ms[0].promote(&[&ids[1], &ids[2]]);
}

/// The machine running `machine add` is killed -9 while it provisions a
/// target (an address that accepts TCP but never speaks SSH). The storage
/// leader ends the operation and revokes the invite issued for the target,
/// so nothing can join with it later.
#[test]
fn an_add_whose_machine_dies_revokes_its_invite() {
    let tb = Testbed::new(2);
    let mut ms = ployz_tests::cluster_on(&tb, "optest-add");
    let silent = std::net::TcpListener::bind((tb.gateway(), 0)).unwrap();
    let target = format!(
        "root@{}:{}",
        tb.gateway(),
        silent.local_addr().unwrap().port()
    );
    let key = tb.dir().join("id_ed25519");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let cli = ms[1].ctl_spawn(&[
        "machine",
        "add",
        "--network",
        "optest-add",
        "--identity",
        key.to_str().unwrap(),
        &target,
    ]);
    let id = running_at(
        &ms[0],
        "machine_add",
        &target,
        &format!("provision {target}"),
    );
    ms[1].kill9();
    let _ = cli.wait_with_output();
    let (end, code) = wait_op(&ms[0], &id);
    println!("owner killed while provisioning: {end}");
    assert_eq!(end["state"], "failed", "{end:#}");
    assert_eq!(code, Some(9), "{end:#}");
    assert!(
        end["message"].as_str().unwrap().contains("none joined"),
        "{end:#}"
    );
    let invites = ms[0].ctl_json(&["machine", "invite", "list"]);
    let all = invites["invites"].as_array().unwrap();
    assert!(
        !all.is_empty() && all.iter().all(|i| i["status"] != "active"),
        "{invites:#}"
    );
    assert!(all.iter().any(|i| i["status"] == "revoked"), "{invites:#}");
    drop(silent);
}
