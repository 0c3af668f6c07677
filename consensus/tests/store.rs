//! The sled state machine executes plans exactly like the in-memory reference, and a snapshot
//! carries the whole state.

use openraft::storage::RaftStateMachine;
use openraft::CommittedLeaderId;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::RaftSnapshotBuilder;
use ployz_consensus::kv::MemState;
use ployz_consensus::store;
use ployz_consensus::BucketConfig;
use ployz_consensus::Expect;
use ployz_consensus::Op;
use ployz_consensus::StateMachineStore;
use ployz_consensus::Txn;
use ployz_consensus::TypeConfig;

fn cfg(history: u8) -> BucketConfig {
    BucketConfig {
        history,
        max_value_size: Some(64),
    }
}

fn script() -> Vec<Txn> {
    let t = |ops: Vec<Op>| Txn::new(ops, 5);
    let mut txns = vec![
        t(vec![
            Op::create_bucket("a", cfg(3)),
            Op::create_bucket("b", cfg(1)),
        ]),
        t(vec![
            Op::put("a", "x", "1"),
            Op::put("a", "y", "1"),
            Op::put("b", "x", "1"),
        ]),
    ];
    for i in 0..6 {
        txns.push(t(vec![
            Op::put("a", "x", format!("v{i}")),
            Op::put("b", "x", format!("v{i}")),
        ]));
    }
    txns.extend([
        t(vec![Op::delete("a", "y")]),
        t(vec![Op::put_expect("a", "y", "again", Expect::Absent)]),
        t(vec![Op::purge("a", "x")]),
        // Rejected: the second op fails, the first must not stick.
        t(vec![
            Op::put("a", "z", "1"),
            Op::put_expect("a", "y", "no", Expect::Revision(1)),
        ]),
        t(vec![Op::put("a", "big", vec![0u8; 65])]),
        t(vec![
            Op::put("b", "gone", "1"),
            Op::delete_bucket("b"),
            Op::create_bucket("b", cfg(2)),
        ]),
        t(vec![
            Op::put("b", "fresh", "1"),
            Op::put("b", "fresh", "2"),
            Op::put("b", "fresh", "3"),
        ]),
        t(vec![
            Op::create_bucket("c", cfg(1)),
            Op::put("c", "k", "v"),
            Op::delete_bucket("c"),
        ]),
    ]);
    txns
}

fn entry(index: u64, txn: Txn) -> openraft::Entry<TypeConfig> {
    openraft::Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(txn),
    }
}

fn assert_same(sm: &StateMachineStore, mem: &MemState) {
    let names: Vec<String> = mem.buckets.keys().cloned().collect();
    assert_eq!(sm.buckets().unwrap(), names);
    for b in &names {
        assert_eq!(sm.list(b).unwrap(), mem.list(b), "list {b}");
        assert_eq!(sm.bucket_info(b).unwrap(), mem.bucket_info(b), "info {b}");
        for key in ["x", "y", "z", "big", "gone", "fresh", "k"] {
            assert_eq!(
                sm.history(b, key).unwrap(),
                mem.history(b, key),
                "{b}/{key}"
            );
            assert_eq!(
                sm.get(b, key).unwrap(),
                mem.history(b, key).last().cloned(),
                "{b}/{key}"
            );
        }
    }
}

#[tokio::test]
async fn sled_matches_reference_and_snapshot_roundtrips() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = store::open(&dir.path().join("a")).unwrap();
    let mut mem = MemState::default();

    for (i, txn) in script().into_iter().enumerate() {
        let expected = mem.apply(&txn).result;
        let got = sm.apply([entry(i as u64 + 1, txn)]).await.unwrap();
        assert_eq!(got, [expected], "txn {i}");
    }
    assert_same(&sm, &mem);
    assert!(sm.bucket_info("c").unwrap().is_none());

    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let (_log2, mut other) = store::open(&dir.path().join("b")).unwrap();
    // Pre-existing state on the receiver must vanish.
    other
        .apply([entry(
            1,
            Txn::new(vec![Op::create_bucket("stale", cfg(1))], 0),
        )])
        .await
        .unwrap();
    let mut rx = other.subscribe();
    other
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_same(&other, &mem);
    assert_eq!(rx.try_recv().unwrap(), ployz_consensus::KvEvent::Reset);
    let (applied, _) = other.applied_state().await.unwrap();
    assert_eq!(applied, snap.meta.last_log_id);
    let current = other.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
}
