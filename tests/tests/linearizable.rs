//! Concurrent JetStream KV clients on all three storage machines record a history of puts and
//! gets (gets through `$JS.API.DIRECT.GET`, linearizable) while the cluster goes through each
//! fault: calm, kill -9 of the store's leader, kill -9 of all three machines at once, an
//! iptables partition of the leader from its peers (its clients still reach it), and SIGSTOP of
//! the leader for longer than an election timeout. The Wing–Gong–Lowe checker
//! (`ployz_tests::linearizability`) must find no anomaly; each phase ends with reads of every
//! key it wrote, so an acknowledged write that was lost is an anomaly too.
//!
//! A put whose client got an error or no answer is pending: it may or may not have taken
//! effect. A failed get tells nothing and is left out. Each phase uses its own keys.
//!
//! Bounded for CI: `PLOYZ_LIN_SECS` (default 8) seconds of load per phase;
//! `scripts/linearizable-long` runs long phases.

use ployz_tests::linearizability::{self, Action, Op};
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, Machine};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEYS: usize = 6;
const CLIENTS_PER_MACHINE: usize = 3;
/// Longer than the store's largest election timeout (3 s).
const OUTAGE: Duration = Duration::from_secs(5);

fn phase_len() -> Duration {
    let secs = std::env::var("PLOYZ_LIN_SECS")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .unwrap_or_else(|_| panic!("PLOYZ_LIN_SECS must be a number of seconds, got {s:?}"))
        })
        .unwrap_or(8);
    Duration::from_secs(secs.max(2))
}

fn cluster() -> (Testbed, Vec<Machine>) {
    let tb = Testbed::new(3);
    let nats = |i: usize| tb.hosts[i].ip.to_string();
    // Snapshots every 100 entries: every phase builds several while clients write, and a
    // replica that fell behind (restarted, partitioned, stopped) may be brought back by one.
    let args = |i: usize| {
        [
            "--nats-listen".to_string(),
            nats(i),
            "--snapshot-every".into(),
            "100".into(),
        ]
    };
    let founder = Machine::start_in(&tb.hosts[0], &args(0).each_ref().map(String::as_str));
    founder.ctl_json(&["mesh", "init", "lin"]);
    let mut machines = vec![founder];
    for i in 1..3 {
        let m = Machine::start_in(&tb.hosts[i], &args(i).each_ref().map(String::as_str));
        let token = machines[0].ctl_json(&["machine", "invite", "create"])["token"]
            .as_str()
            .unwrap()
            .to_string();
        m.ctl_json(&["machine", "invite", "import", "--token", &token]);
        machines.push(m);
    }
    let ids: Vec<String> = machines.iter().map(|m| m.id()).collect();
    machines[0].promote(&[&ids[1], &ids[2]]);
    (tb, machines)
}

fn leader_of(m: &Machine) -> Option<String> {
    let o = m.ctl(&["--json", "mesh", "status"]);
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v["store"]["leader"].as_str().map(str::to_string)
}

/// The index of the store's leader, as every running machine sees it.
fn leader(machines: &[Machine], ids: &[String]) -> usize {
    let id = eventually(Duration::from_secs(30), || {
        let seen: Vec<Option<String>> = machines.iter().map(leader_of).collect();
        let first = seen[0].clone()?;
        seen.iter()
            .all(|s| s.as_deref() == Some(&first))
            .then_some(first)
    })
    .expect("the three machines agree on a store leader");
    ids.iter()
        .position(|i| *i == id)
        .expect("the leader is one of ours")
}

async fn kv_on(m: &Machine, ip: &str, create: bool) -> async_nats::jetstream::kv::Store {
    let info = m.nats_info();
    let client = ployz_tests::nats_connect(&info, &format!("{ip}:4222")).await;
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client);
    if create {
        js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: "lin".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .expect("create the bucket")
    } else {
        js.get_key_value("lin").await.expect("the bucket")
    }
}

struct Recorder {
    epoch: Instant,
    history: Mutex<Vec<Op>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A get; recorded when it answered.
    async fn get(&self, kv: &async_nats::jetstream::kv::Store, key: &str) -> bool {
        let call = self.now();
        let got = kv.get(key).await;
        let ret = self.now();
        let ok = got.is_ok();
        if let Ok(v) = got {
            self.history.lock().unwrap().push(Op {
                key: key.to_string(),
                action: Action::Get(v.map(|b| b.to_vec())),
                call,
                ret: Some(ret),
            });
        }
        ok
    }

    /// A put; pending (unknown outcome) unless acknowledged.
    async fn put(&self, kv: &async_nats::jetstream::kv::Store, key: &str, value: Vec<u8>) -> bool {
        let call = self.now();
        let put = kv.put(key, value.clone().into()).await;
        let ret = self.now();
        self.history.lock().unwrap().push(Op {
            key: key.to_string(),
            action: Action::Put(value),
            call,
            ret: put.is_ok().then_some(ret),
        });
        put.is_ok()
    }
}

/// Client `c`'s mix of puts and gets on phase `phase`'s keys until `stop`. The first client of
/// each machine only reads: a machine whose writes hang (cut off, deposed) must still refuse
/// stale reads, and a reader keeps asking it.
async fn client(
    kv: async_nats::jetstream::kv::Store,
    c: usize,
    phase: usize,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    let reader = c.is_multiple_of(CLIENTS_PER_MACHINE);
    // xorshift64: each client its own sequence of keys and of puts and gets.
    let mut r = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        let key = format!("p{phase}-k{}", r % KEYS as u64);
        let ok = if reader || (r >> 32).is_multiple_of(3) {
            rec.get(&kv, &key).await
        } else {
            let value = format!("c{c}-p{phase}-{i}").into_bytes();
            rec.put(&kv, &key, value).await
        };
        // Do not spin against a machine that is down.
        let pause = if ok { 2 } else { 100 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        i += 1;
    }
}

/// Runs the clients of every machine on phase `phase` while `fault` runs (on a plain thread);
/// then, once a leader is back, reads every key of the phase from each machine.
fn phase(
    rt: &tokio::runtime::Runtime,
    kvs: &[(usize, async_nats::jetstream::kv::Store)],
    phase: usize,
    rec: &Arc<Recorder>,
    fault: impl FnOnce(),
) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (c, (_, kv)) in kvs.iter().enumerate() {
        tasks.push(rt.spawn(client(kv.clone(), c, phase, rec.clone(), stop.clone())));
    }
    fault();
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    // Every key, from each machine: the end state holds every acknowledged write.
    for (_, kv) in kvs.iter().step_by(CLIENTS_PER_MACHINE) {
        for k in 0..KEYS {
            let key = format!("p{phase}-k{k}");
            let read = eventually(Duration::from_secs(20), || {
                rt.block_on(rec.get(kv, &key)).then_some(())
            });
            read.unwrap_or_else(|| panic!("phase {phase}: no machine answers a read of {key}"));
        }
    }
}

/// Checks the history so far (the search recurses once per operation: a big stack).
fn check(rec: &Recorder, what: &str) {
    let all = rec.history.lock().unwrap().clone();
    let pending = all.iter().filter(|o| o.ret.is_none()).count();
    let gets = all
        .iter()
        .filter(|o| matches!(o.action, Action::Get(_)))
        .count();
    eprintln!(
        "{what}: {} operations ({gets} gets), {pending} puts with an unknown outcome",
        all.len()
    );
    let anomalies = std::thread::Builder::new()
        .stack_size(512 << 20)
        .spawn(move || linearizability::check(&all))
        .unwrap()
        .join()
        .unwrap();
    assert!(anomalies.is_empty(), "{what}: {anomalies:?}");
}

/// Waits (during an outage of machine `out`) until the others elected a leader among
/// themselves, so the fault really moved the leadership.
fn wait_new_leader(machines: &[Machine], ids: &[String], out: usize) {
    let others: Vec<&Machine> = (0..3).filter(|&i| i != out).map(|i| &machines[i]).collect();
    eventually(Duration::from_secs(20), || {
        let seen: Vec<Option<String>> = others.iter().map(|m| leader_of(m)).collect();
        let first = seen[0].clone()?;
        (first != ids[out] && seen.iter().all(|s| s.as_deref() == Some(&first))).then_some(())
    })
    .expect("the other two elect a new leader while the old one is cut off");
}

fn signal(m: &Machine, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(m.pid() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", m.pid());
}

/// Drops all traffic between `host` and the other machines (not the test's clients).
fn partition(tb: &Testbed, host: usize, on: bool) {
    let flag = if on { "-A" } else { "-D" };
    for (i, peer) in tb.hosts.iter().enumerate().filter(|(i, _)| *i != host) {
        let peer = peer.ip.to_string();
        for rule in [["INPUT", "-s"], ["OUTPUT", "-d"]] {
            let o = tb.hosts[host]
                .command("iptables")
                .args(["-w", flag, rule[0], rule[1], &peer, "-j", "DROP"])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "iptables {flag} {rule:?} {peer} (peer {i}): {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

#[test]
fn kv_history_is_linearizable_under_each_fault() {
    let len = phase_len();
    let (tb, mut machines) = cluster();
    let ids: Vec<String> = machines.iter().map(|m| m.id()).collect();
    leader(&machines, &ids);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rec = Arc::new(Recorder {
        epoch: Instant::now(),
        history: Mutex::default(),
    });
    let mut kvs = Vec::new();
    for (m, machine) in machines.iter().enumerate() {
        for k in 0..CLIENTS_PER_MACHINE {
            let ip = tb.hosts[m].ip.to_string();
            kvs.push((m, rt.block_on(kv_on(machine, &ip, m == 0 && k == 0))));
        }
    }

    // Calm: clients on every machine (followers forward to the leader).
    phase(&rt, &kvs, 0, &rec, || std::thread::sleep(len));
    check(&rec, "calm");

    // kill -9 of the leader; it comes back (same data) before the phase ends.
    let li = leader(&machines, &ids);
    phase(&rt, &kvs, 1, &rec, || {
        std::thread::sleep(len / 4);
        machines[li].kill9();
        std::thread::sleep(len / 2);
        machines[li].restart();
        std::thread::sleep(len / 4);
    });
    check(&rec, "kill -9 of the leader");

    // kill -9 of all three at once, then all restart.
    leader(&machines, &ids);
    phase(&rt, &kvs, 2, &rec, || {
        std::thread::sleep(len / 4);
        for m in machines.iter_mut() {
            m.kill9();
        }
        for m in machines.iter_mut() {
            m.restart();
        }
        std::thread::sleep(len * 3 / 4);
    });
    check(&rec, "kill -9 of all three");

    // The leader cut off from its peers (its own clients still reach it) past an election.
    let li = leader(&machines, &ids);
    phase(&rt, &kvs, 3, &rec, || {
        std::thread::sleep(len / 4);
        partition(&tb, li, true);
        let cut = Instant::now();
        wait_new_leader(&machines, &ids, li);
        std::thread::sleep(OUTAGE.max(len / 2).saturating_sub(cut.elapsed()));
        partition(&tb, li, false);
        std::thread::sleep(len / 4);
    });
    check(&rec, "partition of the leader");

    // SIGSTOP of the leader past an election timeout; it resumes believing it leads.
    let li = leader(&machines, &ids);
    phase(&rt, &kvs, 4, &rec, || {
        std::thread::sleep(len / 4);
        signal(&machines[li], libc::SIGSTOP);
        let stopped = Instant::now();
        wait_new_leader(&machines, &ids, li);
        std::thread::sleep(OUTAGE.max(len / 2).saturating_sub(stopped.elapsed()));
        signal(&machines[li], libc::SIGCONT);
        std::thread::sleep(len / 4);
    });
    check(&rec, "SIGSTOP of the leader");
    drop(rt);

    // The snapshot path ran under these faults (builds while clients write; installs when a
    // replica fell more than 100 entries behind).
    let count =
        |what: &str| -> usize { machines.iter().map(|m| m.log().matches(what).count()).sum() };
    let (built, installed) = (count("built snapshot"), count("installed snapshot"));
    eprintln!("snapshots: {built} built, {installed} installed");
    assert!(
        built > 0,
        "no snapshot was built: this test would not exercise them"
    );
}
