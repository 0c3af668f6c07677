//! Concurrent JetStream KV clients on all three storage machines record a history of puts and
//! gets (gets through `$JS.API.DIRECT.GET`, linearizable), calm and then across a kill -9 of
//! the store's leader; the Wing–Gong–Lowe checker (`ployz_tests::linearizability`) finds no
//! anomaly. A put whose client got an error or no answer is pending: it may or may not have
//! taken effect. Bounded for CI: a few hundred operations on a few keys.

use ployz_tests::linearizability::{self, Action, Op};
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, Machine};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEYS: usize = 4;
const CLIENTS_PER_MACHINE: usize = 2;
/// Operations per client in each phase.
const OPS: usize = 40;

fn cluster() -> (Testbed, Vec<Machine>) {
    let tb = Testbed::new(3);
    let nats = |i: usize| tb.hosts[i].ip.to_string();
    let founder = Machine::start_in(&tb.hosts[0], &["--nats-listen", &nats(0)]);
    founder.ctl_json(&["mesh", "init", "lin"]);
    let mut machines = vec![founder];
    for i in 1..3 {
        let m = Machine::start_in(&tb.hosts[i], &["--nats-listen", &nats(i)]);
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

async fn kv_on(m: &Machine, ip: &str, create: bool) -> async_nats::jetstream::kv::Store {
    let info = m.nats_info();
    let client = ployz_tests::nats_connect(&info, &format!("{ip}:4222")).await;
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(25))
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

/// `OPS` random-ish puts and gets of client `c` (phase `phase`), recorded into `history`.
async fn client(
    kv: async_nats::jetstream::kv::Store,
    c: usize,
    phase: usize,
    epoch: Instant,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let now = || u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    for i in 0..OPS {
        let key = format!("k{}", (c * 7 + i * 3) % KEYS);
        let call = now();
        let op = if (c + i).is_multiple_of(3) {
            let got = kv.get(&key).await;
            let ret = now();
            match got {
                Ok(v) => Some(Op {
                    key,
                    action: Action::Get(v.map(|b| b.to_vec())),
                    call,
                    ret: Some(ret),
                }),
                // A failed read tells nothing.
                Err(_) => None,
            }
        } else {
            let value = format!("c{c}-p{phase}-{i}").into_bytes();
            let put = kv.put(&key, value.clone().into()).await;
            let ret = now();
            Some(Op {
                key,
                action: Action::Put(value),
                call,
                // An error may hide a write that took effect: unknown outcome.
                ret: put.is_ok().then_some(ret),
            })
        };
        history.lock().unwrap().extend(op);
    }
}

async fn phase(
    kvs: &[async_nats::jetstream::kv::Store],
    phase: usize,
    epoch: Instant,
    history: &Arc<Mutex<Vec<Op>>>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for (c, kv) in kvs.iter().enumerate() {
        tasks.spawn(client(kv.clone(), c, phase, epoch, history.clone()));
    }
    while let Some(res) = tasks.join_next().await {
        res.unwrap();
    }
}

#[test]
fn kv_history_is_linearizable_calm_and_across_a_leader_kill() {
    let (tb, mut machines) = cluster();
    let ids: Vec<String> = machines.iter().map(|m| m.id()).collect();
    let leader = eventually(Duration::from_secs(20), || leader_of(&machines[0])).expect("a leader");
    let li = ids.iter().position(|i| *i == leader).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let epoch = Instant::now();
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();

    // Calm: clients on every machine (followers forward to the leader).
    let mut kvs = Vec::new();
    for (m, machine) in machines.iter().enumerate() {
        for k in 0..CLIENTS_PER_MACHINE {
            let ip = tb.hosts[m].ip.to_string();
            kvs.push(rt.block_on(kv_on(machine, &ip, m == 0 && k == 0)));
        }
    }
    rt.block_on(phase(&kvs, 0, epoch, &history));
    let calm = history.lock().unwrap().clone();
    let anomalies = linearizability::check(&calm);
    assert!(anomalies.is_empty(), "calm: {anomalies:?} in {calm:#?}");

    // kill -9 of the leader while the survivors' clients keep going.
    let survivors: Vec<usize> = (0..3).filter(|&m| m != li).collect();
    let kvs: Vec<_> = kvs
        .into_iter()
        .enumerate()
        .filter(|(c, _)| survivors.contains(&(c / CLIENTS_PER_MACHINE)))
        .map(|(_, kv)| kv)
        .collect();
    let running = rt.spawn({
        let (kvs, history) = (kvs.clone(), history.clone());
        async move { phase(&kvs, 1, epoch, &history).await }
    });
    std::thread::sleep(Duration::from_millis(200));
    machines[li].kill9();
    rt.block_on(running).unwrap();
    rt.block_on(phase(&kvs, 2, epoch, &history));

    let all = history.lock().unwrap().clone();
    let pending = all.iter().filter(|o| o.ret.is_none()).count();
    eprintln!(
        "{} operations, {pending} with an unknown outcome",
        all.len()
    );
    let anomalies = linearizability::check(&all);
    assert!(anomalies.is_empty(), "across the kill: {anomalies:?}");
    drop(rt);
}
