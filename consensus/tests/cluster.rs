//! Three nodes in one process over TCP on 127.0.0.1.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ployz_consensus::BucketConfig;
use ployz_consensus::KvEvent;
use ployz_consensus::Node;
use ployz_consensus::NodeConfig;
use ployz_consensus::Op;
use ployz_consensus::PloyzNode;
use ployz_consensus::ReadError;
use ployz_consensus::Txn;
use ployz_consensus::TxnResult;
use ployz_consensus::WriteError;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(30);

async fn start(id: u64, dir: &Path) -> (Node, PloyzNode) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let me = PloyzNode {
        machine_id: format!("machine-{id}"),
        addr: listener.local_addr().unwrap().to_string(),
    };
    let node = Node::open(NodeConfig {
        node_id: id,
        node: me.clone(),
        dir: dir.join(format!("n{id}")),
        // Small, so that a late joiner has to receive a snapshot.
        snapshot_logs_since_last: 20,
    })
    .await
    .unwrap();
    node.serve(listener);
    (node, me)
}

async fn write(node: &Node, ops: Vec<Op>) -> Vec<u64> {
    match node.write(Txn::new(ops, 7)).await.expect("write") {
        TxnResult::Applied { revisions } => revisions,
        other => panic!("rejected: {other:?}"),
    }
}

async fn wait_applied(node: &Node, index: u64) {
    node.raft()
        .wait(Some(WAIT))
        .applied_index_at_least(Some(index), "replicated")
        .await
        .expect("follower catches up");
}

/// The leader's commit index: covers every write it has acknowledged.
async fn leader_committed(node: &Node) -> u64 {
    node.raft()
        .ensure_linearizable()
        .await
        .expect("leader")
        .expect("leader committed something")
        .index
}

/// Waits until the leader `node` groups concurrent writes (it asked every member).
async fn wait_group_commit(node: &Node) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !node.group_commit() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never enabled group commit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three nodes started in `dir`; node 1 initialised alone, node 2 a learner.
async fn three_with_learner(dir: &Path) -> [(Node, PloyzNode); 3] {
    let (n1, m1) = start(1, dir).await;
    let (n2, m2) = start(2, dir).await;
    let (n3, m3) = start(3, dir).await;
    n1.initialize_single(m1.clone()).await.unwrap();
    n1.add_learner(2, m2.clone(), true).await.unwrap();
    [(n1, m1), (n2, m2), (n3, m3)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let [(n1, _), (n2, _), (n3, m3)] = three_with_learner(dir.path()).await;
    n1.change_membership(BTreeSet::from([1, 2])).await.unwrap();

    let mut events3 = n3.subscribe();
    write(&n1, vec![Op::create_bucket("cfg", BucketConfig::default())]).await;
    for i in 0..60u64 {
        let revs = write(
            &n1,
            vec![Op::put("cfg", format!("k{i:02}"), format!("{i}"))],
        )
        .await;
        assert_eq!(revs, [i + 1]);
    }
    let idx = leader_committed(&n1).await;
    wait_applied(&n2, idx).await;
    assert_eq!(n2.list_local("cfg").unwrap().len(), 60);

    // The log was compacted on the leader, so node 3 must be brought up by a snapshot.
    n1.raft()
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some(), "leader purged its log")
        .await
        .unwrap();
    n1.add_learner(3, m3, true).await.unwrap();
    n1.change_membership(BTreeSet::from([1, 2, 3]))
        .await
        .unwrap();
    let voters: BTreeSet<u64> = n1
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));

    let revs = write(&n1, vec![Op::put("cfg", "after", "join")]).await;
    assert_eq!(revs, [61]);
    let idx = leader_committed(&n1).await;
    for n in [&n2, &n3] {
        wait_applied(n, idx).await;
        let e = n.get_local("cfg", "after").unwrap().unwrap();
        assert_eq!((e.value.as_slice(), e.revision), (&b"join"[..], 61));
        assert_eq!(n.list_local("cfg").unwrap().len(), 61);
        assert_eq!(n.bucket_local("cfg").unwrap().unwrap().last_seq, 61);
    }
    // Node 3 started from a snapshot: it saw a reset, then the live entry.
    let mut saw_reset = false;
    let mut saw_after = false;
    while let Ok(ev) = events3.try_recv() {
        match ev {
            KvEvent::Reset => saw_reset = true,
            KvEvent::Entry(e) if e.key == "after" => saw_after = true,
            _ => {}
        }
    }
    assert!(saw_reset && saw_after);

    // Followers redirect writes and linearizable reads to the leader.
    match n2.write(Txn::new(vec![Op::put("cfg", "x", "y")], 0)).await {
        Err(WriteError::ForwardToLeader {
            leader_id,
            leader_node,
        }) => {
            assert_eq!(leader_id, 1);
            assert_eq!(leader_node.unwrap().machine_id, "machine-1");
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    assert!(matches!(
        n3.get("cfg", "after").await,
        Err(ReadError::ForwardToLeader { leader_id: 1, .. })
    ));
    assert_eq!(n1.get("cfg", "after").await.unwrap().unwrap().revision, 61);

    for n in [&n1, &n2, &n3] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_retried_on_the_new_leader_answers_its_first_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let [(n1, _), (n2, _), (n3, m3)] = three_with_learner(dir.path()).await;
    n1.add_learner(3, m3, true).await.unwrap();
    n1.change_membership(BTreeSet::from([1, 2, 3]))
        .await
        .unwrap();
    write(&n1, vec![Op::create_bucket("cfg", BucketConfig::default())]).await;
    // The client's write commits, then the leader dies before the client hears back.
    let txn = Txn::new(vec![Op::put("cfg", "k", "v")], 7).with_id("client-1");
    let first = n1.write(txn.clone()).await.unwrap();
    assert_eq!(first, TxnResult::Applied { revisions: vec![1] });
    let idx = leader_committed(&n1).await;
    wait_applied(&n2, idx).await;
    wait_applied(&n3, idx).await;
    n1.shutdown().await.unwrap();
    drop(n1);
    // The client sends the same txn to whoever leads now.
    let m = n2
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| matches!(m.current_leader, Some(2 | 3)),
            "a new leader among the survivors",
        )
        .await
        .unwrap();
    let new_leader = if m.current_leader == Some(2) {
        &n2
    } else {
        &n3
    };
    let again = new_leader.write(txn).await.unwrap();
    assert_eq!(again, first, "the retry answers the first outcome");
    let info = new_leader.bucket("cfg").await.unwrap().unwrap();
    assert_eq!((info.last_seq, info.entries), (1, 1), "applied once");
    for n in [&n2, &n3] {
        n.shutdown().await.unwrap();
    }
}

/// Group commit: concurrent writes share log entries, and every acknowledged write is
/// committed on a majority: with the leader gone, the two survivors still have all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_entries_and_survive_the_leader() {
    const WRITES: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let [(n1, _), (n2, _), (n3, m3)] = three_with_learner(dir.path()).await;
    n1.add_learner(3, m3, true).await.unwrap();
    n1.change_membership(BTreeSet::from([1, 2, 3]))
        .await
        .unwrap();
    write(&n1, vec![Op::create_bucket("cfg", BucketConfig::default())]).await;
    wait_group_commit(&n1).await;
    let before = leader_committed(&n1).await;

    let n1 = std::sync::Arc::new(n1);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..WRITES {
        let n1 = n1.clone();
        tasks.spawn(async move {
            let revs = write(&n1, vec![Op::put("cfg", format!("k{i}"), format!("{i}"))]).await;
            (i, revs[0])
        });
    }
    let mut acked = Vec::new();
    while let Some(res) = tasks.join_next().await {
        acked.push(res.unwrap());
    }
    let mut revisions: Vec<u64> = acked.iter().map(|(_, r)| *r).collect();
    revisions.sort_unstable();
    assert_eq!(
        revisions,
        (1..=WRITES).collect::<Vec<_>>(),
        "one revision each"
    );
    let after = leader_committed(&n1).await;
    assert!(
        after - before < WRITES,
        "{WRITES} concurrent writes took {} log entries: no group was formed",
        after - before
    );

    // Concurrent linearizable reads (sharing leadership rounds) see every acknowledged write.
    let mut reads = tokio::task::JoinSet::new();
    for &(i, rev) in &acked {
        let n1 = n1.clone();
        reads.spawn(async move {
            let e = n1.get("cfg", &format!("k{i}")).await.unwrap().unwrap();
            assert_eq!(e.revision, rev);
        });
    }
    while let Some(res) = reads.join_next().await {
        res.unwrap();
    }

    let n1 = std::sync::Arc::into_inner(n1).expect("no write task left");
    n1.shutdown().await.unwrap();
    drop(n1);
    let m = n2
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| matches!(m.current_leader, Some(2 | 3)),
            "a new leader among the survivors",
        )
        .await
        .unwrap();
    let new_leader = if m.current_leader == Some(2) {
        &n2
    } else {
        &n3
    };
    for (i, rev) in &acked {
        let e = new_leader
            .get("cfg", &format!("k{i}"))
            .await
            .unwrap()
            .expect("an acknowledged write survives the leader");
        assert_eq!((e.value, e.revision), (format!("{i}").into_bytes(), *rev));
    }
    for n in [&n2, &n3] {
        n.shutdown().await.unwrap();
    }
}

/// The payload of a log entry as a binary from before group commit decodes it.
#[derive(serde::Deserialize)]
#[allow(dead_code)] // decoded only
struct PreGroupTxn {
    ops: Vec<serde_json::Value>,
    now_ms: u64,
}

/// Relays Raft frames to `upstream` like a binary from before group commit would take them:
/// it closes the connection on a features request (it does not know it) and on an
/// AppendEntries with an entry it cannot decode (counted in `unreadable`). Once `upgraded`,
/// a plain relay.
async fn pre_group_binary(
    listener: TcpListener,
    upstream: String,
    upgraded: Arc<AtomicBool>,
    unreadable: Arc<AtomicUsize>,
) {
    use ployz_consensus::network::read_frame;
    use ployz_consensus::network::write_frame;
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        let (upstream, upgraded, unreadable) =
            (upstream.clone(), upgraded.clone(), unreadable.clone());
        tokio::spawn(async move {
            let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            while let Ok(Some(frame)) = read_frame(&mut client).await {
                if !upgraded.load(Ordering::SeqCst) {
                    let req: serde_json::Value = serde_json::from_slice(&frame).unwrap();
                    if req == "Features" {
                        return;
                    }
                    let entries = req.pointer("/AppendEntries/entries");
                    for e in entries.and_then(|e| e.as_array()).into_iter().flatten() {
                        if let Some(txn) = e.pointer("/payload/Normal") {
                            if serde_json::from_value::<PreGroupTxn>(txn.clone()).is_err() {
                                unreadable.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                }
                if write_frame(&mut server, &frame).await.is_err() {
                    return;
                }
                let Ok(Some(resp)) = read_frame(&mut server).await else {
                    return;
                };
                if write_frame(&mut client, &resp).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// `n` concurrent puts on `leader`; how many log entries they took.
async fn concurrent_puts(leader: &Arc<Node>, round: u64, n: u64) -> u64 {
    let before = leader_committed(leader).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let leader = leader.clone();
        tasks.spawn(async move {
            write(
                &leader,
                vec![Op::put("cfg", format!("k{i}"), format!("{round}-{i}"))],
            )
            .await
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.unwrap();
    }
    leader_committed(leader).await - before
}

/// Rolling upgrade: while one member runs a binary that cannot read group entries, the
/// leader proposes one entry per write (that member stays in step); once it is upgraded,
/// writes share entries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_group_entries_while_a_member_cannot_read_them() {
    const WRITES: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let [(n1, _), (n2, _), (n3, m3)] = three_with_learner(dir.path()).await;
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old3 = PloyzNode {
        machine_id: m3.machine_id.clone(),
        addr: proxy.local_addr().unwrap().to_string(),
    };
    let (upgraded, unreadable) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let relay = tokio::spawn(pre_group_binary(
        proxy,
        m3.addr.clone(),
        upgraded.clone(),
        Arc::clone(&unreadable),
    ));
    n1.add_learner(3, old3, true).await.unwrap();
    n1.change_membership(BTreeSet::from([1, 2, 3]))
        .await
        .unwrap();
    write(&n1, vec![Op::create_bucket("cfg", BucketConfig::default())]).await;
    let n1 = Arc::new(n1);

    // Give the leader time to ask (and to be refused) more than once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!n1.group_commit());
    let entries = concurrent_puts(&n1, 1, WRITES).await;
    assert!(
        entries >= WRITES,
        "{WRITES} writes in {entries} entries: a group was proposed"
    );
    assert_eq!(
        unreadable.load(Ordering::SeqCst),
        0,
        "the old member got a group entry"
    );
    let committed = leader_committed(&n1).await;
    wait_applied(&n3, committed).await;
    assert_eq!(n3.list_local("cfg").unwrap(), n1.list("cfg").await.unwrap());

    // Upgraded: within a few retries the leader groups again, and everyone stays in step.
    upgraded.store(true, Ordering::SeqCst);
    wait_group_commit(&n1).await;
    let entries = concurrent_puts(&n1, 2, WRITES).await;
    assert!(
        entries < WRITES,
        "no group after the upgrade ({entries} entries)"
    );
    let committed = leader_committed(&n1).await;
    wait_applied(&n2, committed).await;
    wait_applied(&n3, committed).await;
    let all = n1.list("cfg").await.unwrap();
    assert_eq!(all.len() as u64, WRITES);
    assert_eq!(n3.list_local("cfg").unwrap(), all);
    assert_eq!(n2.list_local("cfg").unwrap(), all);

    relay.abort();
    let n1 = Arc::into_inner(n1).expect("no write task left");
    for n in [&n1, &n2, &n3] {
        n.shutdown().await.unwrap();
    }
}

/// A new replica joins after the leader purged its log: it is brought up by a snapshot file of
/// several 1 MiB chunks (openraft's chunked streaming), installed into a fresh tree, and keeps
/// that state across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_replica_installs_a_snapshot_of_several_chunks() {
    const KEYS: usize = 5000;
    const PER_TXN: usize = 250;
    let dir = tempfile::tempdir().unwrap();
    let (n1, m1) = start(1, dir.path()).await;
    n1.initialize_single(m1).await.unwrap();
    write(&n1, vec![Op::create_bucket("big", BucketConfig::default())]).await;
    let value = |i: usize| format!("{i:06}").repeat(170).into_bytes();
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(PER_TXN) {
        let ops = chunk
            .iter()
            .map(|&i| Op::put("big", format!("k{i:05}"), value(i)))
            .collect();
        write(&n1, ops).await;
    }
    // Small writes until the leader snapshotted past the big ones and purged its log (a
    // snapshot is triggered by a commit 20 entries past the last one, and builds while writes
    // go on, so keep committing).
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut i = 0;
    while n1
        .raft()
        .metrics()
        .borrow()
        .purged
        .is_none_or(|p| p.index <= 22)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never purged past the big writes"
        );
        write(&n1, vec![Op::put("big", "tick", format!("{i}"))]).await;
        i += 1;
    }
    let snap_dir = dir.path().join("n1/raft-snapshots");
    let size: u64 = std::fs::read_dir(&snap_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    assert!(
        size > 4 * 1024 * 1024,
        "the snapshot should span several 1 MiB chunks, it is {size} bytes"
    );

    let (n2, m2) = start(2, dir.path()).await;
    let mut events2 = n2.subscribe();
    n1.add_learner(2, m2, true).await.unwrap();
    let idx = leader_committed(&n1).await;
    wait_applied(&n2, idx).await;
    assert!(
        std::iter::from_fn(|| events2.try_recv().ok()).any(|e| e == KvEvent::Reset),
        "node 2 was brought up by a snapshot"
    );
    let check = |n: &Node| {
        let all = n.list_local("big").unwrap();
        assert_eq!(all.len(), KEYS + 1);
        for e in all.iter().filter(|e| e.key != "tick") {
            let i: usize = e.key[1..].parse().unwrap();
            assert_eq!(e.value, value(i), "{}", e.key);
        }
        assert_eq!(
            n.bucket_local("big").unwrap(),
            n1.bucket_local("big").unwrap()
        );
    };
    check(&n2);

    // After a restart node 2 reopens the installed tree and snapshot.
    n2.shutdown().await.unwrap();
    drop(n2);
    let (n2, _) = start(2, dir.path()).await;
    check(&n2);
    let files = std::fs::read_dir(dir.path().join("n2/raft-snapshots"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "only the current snapshot file is kept");
    n2.shutdown().await.unwrap();
    n1.shutdown().await.unwrap();
}
