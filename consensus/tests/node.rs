//! Single-node behaviour of `Node`: persistence, snapshots, watch.

use std::path::Path;
use std::time::Duration;

use ployz_consensus::BucketConfig;
use ployz_consensus::EntryOp;
use ployz_consensus::Expect;
use ployz_consensus::InitError;
use ployz_consensus::KvEvent;
use ployz_consensus::Node;
use ployz_consensus::NodeConfig;
use ployz_consensus::Op;
use ployz_consensus::PloyzNode;
use ployz_consensus::ReadError;
use ployz_consensus::Rejection;
use ployz_consensus::Txn;
use ployz_consensus::TxnResult;
use ployz_consensus::WriteError;

const WAIT: Duration = Duration::from_secs(20);

fn me() -> PloyzNode {
    PloyzNode {
        machine_id: "machine-1".into(),
        addr: "127.0.0.1:1".into(),
    }
}

fn config(dir: &Path, snapshot_logs_since_last: u64) -> NodeConfig {
    NodeConfig {
        node_id: 1,
        node: me(),
        dir: dir.to_path_buf(),
        snapshot_logs_since_last,
    }
}

async fn write(node: &Node, ops: Vec<Op>) -> Vec<u64> {
    match node.write(Txn::new(ops, 42)).await.expect("write") {
        TxnResult::Applied { revisions } => revisions,
        other => panic!("rejected: {other:?}"),
    }
}

fn history3() -> BucketConfig {
    BucketConfig {
        history: 3,
        max_value_size: Some(1024),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_writes_reads_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path(), 5000)).await.unwrap();
    assert!(!node.is_initialized().await);
    let err = node
        .write_timeout(Txn::new(vec![], 0), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, WriteError::NotInitialized), "{err:?}");

    node.initialize_single(me()).await.unwrap();
    assert!(node.is_initialized().await);
    assert!(matches!(
        node.initialize_single(me()).await,
        Err(InitError::AlreadyInitialized)
    ));

    assert_eq!(
        write(&node, vec![Op::create_bucket("nodes", history3())]).await,
        [0]
    );
    assert_eq!(
        write(
            &node,
            vec![Op::put("nodes", "a", "1"), Op::put("nodes", "b", "1")]
        )
        .await,
        [1, 2]
    );
    assert_eq!(
        write(
            &node,
            vec![Op::put_expect("nodes", "a", "2", Expect::Revision(1))]
        )
        .await,
        [3]
    );
    assert_eq!(write(&node, vec![Op::delete("nodes", "b")]).await, [4]);

    // A rejection is replicated and changes nothing.
    let res = node
        .write(Txn::new(
            vec![
                Op::put("nodes", "c", "x"),
                Op::put_expect("nodes", "a", "3", Expect::Revision(1)),
            ],
            42,
        ))
        .await
        .unwrap();
    assert_eq!(
        res,
        TxnResult::Rejected {
            op_index: 1,
            reason: Rejection::WrongLastRevision {
                expected: 1,
                current: 3
            }
        }
    );

    let a = node.get("nodes", "a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.revision, a.created_ms),
        (&b"2"[..], 3, 42)
    );
    let b = node.get("nodes", "b").await.unwrap().unwrap();
    assert_eq!(b.op, EntryOp::Delete);
    assert!(node.get("nodes", "c").await.unwrap().is_none());
    let listed: Vec<String> = node
        .list("nodes")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(listed, ["a"]);
    let hist: Vec<u64> = node
        .history("nodes", "a")
        .await
        .unwrap()
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(hist, [1, 3]);
    let info = node.bucket("nodes").await.unwrap().unwrap();
    assert_eq!(
        (info.first_seq, info.last_seq, info.live_keys, info.entries),
        (1, 4, 1, 4)
    );
    assert!(node.bucket("missing").await.unwrap().is_none());
    assert!(matches!(
        node.list("missing").await,
        Err(ReadError::NoSuchBucket { .. })
    ));

    node.shutdown().await.unwrap();
    drop(node);

    let node = Node::open(config(dir.path(), 5000)).await.unwrap();
    assert!(node.is_initialized().await);
    let a = node.get("nodes", "a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.revision), (&b"2"[..], 3));
    let info = node.bucket("nodes").await.unwrap().unwrap();
    assert_eq!((info.last_seq, info.entries), (4, 4));
    assert_eq!(info.config, history3());
    // The bucket sequence continues where it was.
    assert_eq!(
        write(&node, vec![Op::put("nodes", "b", "again")]).await,
        [5]
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_built_and_logs_purged() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path(), 20)).await.unwrap();
    node.initialize_single(me()).await.unwrap();
    write(&node, vec![Op::create_bucket("b", BucketConfig::default())]).await;
    for i in 0..100 {
        let revs = write(
            &node,
            vec![Op::put("b", format!("k{i:03}"), format!("v{i}"))],
        )
        .await;
        assert_eq!(revs, [i + 1]);
    }
    let m = node
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some() && m.purged.is_some(),
            "snapshot built and log purged",
        )
        .await
        .expect("snapshot and purge");
    let snap = m.snapshot.unwrap().index;
    let purged = m.purged.unwrap().index;
    assert!(snap >= 20, "snapshot at {snap}");
    assert!(
        purged > 0 && purged <= snap,
        "purged {purged}, snapshot {snap}"
    );
    node.shutdown().await.unwrap();
    drop(node);

    let node = Node::open(config(dir.path(), 20)).await.unwrap();
    let m = node
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.last_applied.is_some(), "restarted")
        .await
        .unwrap();
    assert!(m.snapshot.is_some_and(|s| s.index >= snap), "{m:?}");
    assert!(m.purged.is_some_and(|p| p.index >= purged), "{m:?}");
    let all = node.list("b").await.unwrap();
    assert_eq!(all.len(), 100);
    assert_eq!(all[42].key, "k042");
    assert_eq!(all[42].revision, 43);
    assert_eq!(node.bucket("b").await.unwrap().unwrap().last_seq, 100);
    assert_eq!(write(&node, vec![Op::put("b", "k000", "new")]).await, [101]);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_applied_changes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path(), 5000)).await.unwrap();
    node.initialize_single(me()).await.unwrap();
    let mut rx = node.subscribe();

    write(&node, vec![Op::create_bucket("w", BucketConfig::default())]).await;
    write(
        &node,
        vec![Op::put("w", "x.y", "hello"), Op::purge("w", "x.y")],
    )
    .await;
    write(&node, vec![Op::delete_bucket("w")]).await;

    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(
        got[0],
        KvEvent::BucketCreated {
            bucket: "w".into(),
            config: BucketConfig::default()
        }
    );
    match (&got[1], &got[2]) {
        (KvEvent::Entry(put), KvEvent::Entry(purge)) => {
            assert_eq!(
                (put.key.as_str(), put.value.as_slice(), put.revision, put.op),
                ("x.y", &b"hello"[..], 1, EntryOp::Put)
            );
            assert_eq!((purge.revision, purge.op), (2, EntryOp::Purge));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(got[3], KvEvent::BucketDeleted { bucket: "w".into() });
    // A rejected write publishes nothing.
    let res = node
        .write(Txn::new(vec![Op::put("w", "k", "v")], 0))
        .await
        .unwrap();
    assert!(!res.is_applied());
    assert!(rx.try_recv().is_err());
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_txn_id_is_applied_once_and_answers_its_first_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path(), 5000)).await.unwrap();
    node.initialize_single(me()).await.unwrap();
    write(&node, vec![Op::create_bucket("d", history3())]).await;
    let mut rx = node.subscribe();
    let put = Txn::new(vec![Op::put("d", "k", "first")], 42).with_id("client-1");
    let first = node.write(put.clone()).await.unwrap();
    assert_eq!(first, TxnResult::Applied { revisions: vec![1] });
    assert!(matches!(rx.recv().await.unwrap(), KvEvent::Entry(e) if e.revision == 1));
    assert_eq!(write(&node, vec![Op::put("d", "k", "second")]).await, [2]);
    assert!(matches!(rx.recv().await.unwrap(), KvEvent::Entry(e) if e.revision == 2));
    // The retry commits as a log entry of its own, but changes nothing.
    assert_eq!(node.write(put.clone()).await.unwrap(), first);
    let hist: Vec<u64> = node
        .history("d", "k")
        .await
        .unwrap()
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(hist, [1, 2]);
    assert!(rx.try_recv().is_err(), "a duplicate publishes nothing");
    // A rejected txn answers its rejection again, even once the precondition would hold.
    let cas =
        Txn::new(vec![Op::put_expect("d", "k", "x", Expect::Revision(3))], 42).with_id("client-2");
    let rejected = node.write(cas.clone()).await.unwrap();
    assert!(!rejected.is_applied());
    assert_eq!(write(&node, vec![Op::put("d", "k", "third")]).await, [3]);
    assert_eq!(node.write(cas).await.unwrap(), rejected);
    assert_eq!(node.bucket("d").await.unwrap().unwrap().last_seq, 3);
    // The ids are state: they survive a restart (and replay of the log).
    node.shutdown().await.unwrap();
    drop(node);
    let node = Node::open(config(dir.path(), 5000)).await.unwrap();
    node.raft()
        .wait(Some(WAIT))
        .metrics(|m| m.current_leader == Some(1), "leader again")
        .await
        .unwrap();
    assert_eq!(node.write(put).await.unwrap(), first);
    assert_eq!(node.bucket("d").await.unwrap().unwrap().last_seq, 3);
    node.shutdown().await.unwrap();
}
