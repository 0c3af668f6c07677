//! The state machine executes plans exactly like the reference executor (`MemState`), and a
//! snapshot carries the whole state.

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
use ployz_consensus::TxnResult;
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

async fn snapshot_of(sm: &mut StateMachineStore) -> openraft::Snapshot<TypeConfig> {
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap()
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
        assert!(sm.has_bucket(b).unwrap(), "{b}");
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
    assert!(!sm.has_bucket("c").unwrap());

    let snap = snapshot_of(&mut sm).await;
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

fn put_with_id(id: &str, value: &str, now_ms: u64) -> Txn {
    Txn::new(vec![Op::put("a", "k", value)], now_ms).with_id(id)
}

/// A store with bucket `a` (history 3), applied at index 1.
async fn store_with_bucket(dir: &std::path::Path) -> StateMachineStore {
    let (_log, mut sm) = store::open(dir).unwrap();
    sm.apply([entry(1, Txn::new(vec![Op::create_bucket("a", cfg(3))], 0))])
        .await
        .unwrap();
    sm
}

#[tokio::test]
async fn duplicate_apply_answers_the_first_result_without_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = store_with_bucket(dir.path()).await;
    let first = sm
        .apply([entry(2, put_with_id("w1", "one", 10))])
        .await
        .unwrap();
    assert_eq!(first, [TxnResult::Applied { revisions: vec![1] }]);
    sm.apply([entry(3, Txn::new(vec![Op::put("a", "k", "two")], 11))])
        .await
        .unwrap();
    let mut rx = sm.subscribe();
    // The retry (same id, same ops) lands twice more, once in the same batch as a new write.
    let again = sm
        .apply([
            entry(4, put_with_id("w1", "one", 10)),
            entry(5, put_with_id("w2", "three", 12)),
            entry(6, put_with_id("w1", "one", 10)),
        ])
        .await
        .unwrap();
    assert_eq!(
        again,
        [
            TxnResult::Applied { revisions: vec![1] },
            TxnResult::Applied { revisions: vec![3] },
            TxnResult::Applied { revisions: vec![1] },
        ]
    );
    let hist: Vec<(u64, Vec<u8>)> = sm
        .history("a", "k")
        .unwrap()
        .into_iter()
        .map(|e| (e.revision, e.value))
        .collect();
    assert_eq!(
        hist,
        [
            (1, b"one".to_vec()),
            (2, b"two".to_vec()),
            (3, b"three".to_vec())
        ]
    );
    // Exactly one event: w2's entry. The duplicates published nothing.
    match rx.try_recv().unwrap() {
        ployz_consensus::KvEvent::Entry(e) => assert_eq!(e.revision, 3),
        other => panic!("unexpected {other:?}"),
    }
    assert!(rx.try_recv().is_err());
    // A duplicate still advances last_applied (it is a log entry like any other).
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.unwrap().index, 6);
}

#[tokio::test]
async fn remembered_ids_survive_snapshot_build_and_install() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = store_with_bucket(&dir.path().join("a")).await;
    let rejected =
        Txn::new(vec![Op::put_expect("a", "k", "x", Expect::Revision(9))], 20).with_id("cas");
    let r1 = sm
        .apply([
            entry(2, put_with_id("w1", "one", 10)),
            entry(3, rejected.clone()),
        ])
        .await
        .unwrap();
    let snap = snapshot_of(&mut sm).await;
    let (_log2, mut other) = store::open(&dir.path().join("b")).unwrap();
    other
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    let mut rx = other.subscribe();
    let r2 = other
        .apply([entry(4, put_with_id("w1", "one", 10)), entry(5, rejected)])
        .await
        .unwrap();
    assert_eq!(r2, r1, "the installed replica answers the first outcomes");
    assert!(rx.try_recv().is_err(), "and changes nothing");
    assert_eq!(other.history("a", "k").unwrap().len(), 1);
    // It also survives a reopen (the ids are in sled, not only in memory).
    drop(other);
    drop(_log2);
    let (_log3, mut reopened) = store::open(&dir.path().join("b")).unwrap();
    let r3 = reopened
        .apply([entry(6, put_with_id("w1", "one", 10))])
        .await
        .unwrap();
    assert_eq!(r3[0], r1[0]);
}

/// A leader still on a release before the snapshot files sends the whole state as one JSON
/// value (and, before idempotency keys, without `txns`): it still installs.
#[tokio::test]
async fn json_snapshot_of_an_older_release_still_installs() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = store_with_bucket(&dir.path().join("a")).await;
    sm.apply([entry(2, put_with_id("w1", "one", 10))])
        .await
        .unwrap();
    let snap = snapshot_of(&mut sm).await;
    let info = sm.bucket_info("a").unwrap().unwrap();
    let payload = serde_json::json!({
        "last_applied": snap.meta.last_log_id,
        "last_membership": snap.meta.last_membership,
        "buckets": {"a": {
            "config": info.config,
            "last_seq": info.last_seq,
            "created_ms": info.created_ms,
        }},
        "entries": sm.history("a", "k").unwrap(),
    });
    let path = dir.path().join("old.json");
    std::fs::write(&path, serde_json::to_vec(&payload).unwrap()).unwrap();
    let old = tokio::fs::File::open(&path).await.unwrap();
    let (_log2, mut other) = store::open(&dir.path().join("b")).unwrap();
    other
        .install_snapshot(&snap.meta, Box::new(old))
        .await
        .unwrap();
    assert_eq!(
        other.history("a", "k").unwrap(),
        sm.history("a", "k").unwrap()
    );
    assert_eq!(
        other.bucket_info("a").unwrap(),
        sm.bucket_info("a").unwrap()
    );
    // Without the remembered id, the same txn is a new write.
    let r = other
        .apply([entry(3, put_with_id("w1", "one", 10))])
        .await
        .unwrap();
    assert_eq!(r, [TxnResult::Applied { revisions: vec![2] }]);
}

/// A damaged snapshot (cut short, or one byte changed) is refused and leaves the receiver's
/// state, applied position and current snapshot as they were; leftovers go at the next open.
#[tokio::test]
async fn damaged_snapshot_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = store_with_bucket(&dir.path().join("a")).await;
    for i in 0..200u64 {
        sm.apply([entry(
            i + 2,
            Txn::new(vec![Op::put("a", format!("k{i}"), "v")], 0),
        )])
        .await
        .unwrap();
    }
    let snap = snapshot_of(&mut sm).await;
    let mut good = Vec::new();
    {
        use tokio::io::AsyncReadExt;
        let mut f = snap.snapshot;
        f.read_to_end(&mut good).await.unwrap();
    }
    let rdir = dir.path().join("b");
    let (_log2, mut other) = store::open(&rdir).unwrap();
    other
        .apply([entry(
            1,
            Txn::new(vec![Op::create_bucket("mine", cfg(1))], 0),
        )])
        .await
        .unwrap();
    let mine = snapshot_of(&mut other).await.meta;
    let mut cut = good.clone();
    cut.truncate(good.len() / 2);
    let mut flipped = good.clone();
    let at = good.len() * 2 / 3;
    flipped[at] ^= 0x20;
    for (what, bytes) in [("cut", cut), ("flipped", flipped)] {
        let path = dir.path().join(what);
        std::fs::write(&path, &bytes).unwrap();
        let f = tokio::fs::File::open(&path).await.unwrap();
        let err = other.install_snapshot(&snap.meta, Box::new(f)).await;
        assert!(err.is_err(), "{what} installed");
        assert_eq!(other.buckets().unwrap(), ["mine"], "{what}");
        let (applied, _) = other.applied_state().await.unwrap();
        assert_eq!(applied.unwrap().index, 1, "{what}");
        let current = other.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, mine, "{what}");
    }
    // The good one installs.
    let path = dir.path().join("good");
    std::fs::write(&path, &good).unwrap();
    let f = tokio::fs::File::open(&path).await.unwrap();
    other
        .install_snapshot(&snap.meta, Box::new(f))
        .await
        .unwrap();
    assert_eq!(other.list("a").unwrap().len(), 200);
    assert!(!other.has_bucket("mine").unwrap());
    // Exactly one snapshot file is left, the current one, and it survives a reopen.
    drop((other, _log2));
    let (_log3, mut reopened) = store::open(&rdir).unwrap();
    let files = std::fs::read_dir(rdir.join("raft-snapshots"))
        .unwrap()
        .count();
    assert_eq!(files, 1);
    assert_eq!(
        reopened.get_current_snapshot().await.unwrap().unwrap().meta,
        snap.meta
    );
    assert_eq!(reopened.list("a").unwrap().len(), 200);
}

#[tokio::test]
async fn sled_forgets_ids_like_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = store_with_bucket(dir.path()).await;
    let mut mem = MemState::default();
    mem.apply(&Txn::new(vec![Op::create_bucket("a", cfg(3))], 0));
    let window = ployz_consensus::kv::TXN_ID_RETENTION_MS;
    let script = [
        put_with_id("t0", "a", 1_000),
        put_with_id("t1", "b", 5_000),
        put_with_id("t2", "c", 5_000),
        // Forgets t0 (and nothing else): 1_000 < 1_001 + window - window.
        Txn::new(vec![], 1_001 + window),
        // t0 is new again; t1 still dedupes.
        put_with_id("t0", "d", 1_000),
        put_with_id("t1", "b", 5_000),
        // Forgets everything but the t3 it remembers.
        put_with_id("t3", "e", 100 * window),
        put_with_id("t1", "b", 5_000),
        put_with_id("t3", "e", 100 * window),
    ];
    let mut results = Vec::new();
    for (i, txn) in script.into_iter().enumerate() {
        let expected = mem.apply(&txn).result;
        let got = sm.apply([entry(i as u64 + 2, txn)]).await.unwrap();
        assert_eq!(got, std::slice::from_ref(&expected), "txn {i}");
        results.push(expected);
    }
    let revs: Vec<Option<Vec<u64>>> = results
        .iter()
        .map(|r| r.revisions().map(<[u64]>::to_vec))
        .collect();
    assert_eq!(
        revs,
        [
            Some(vec![1]),
            Some(vec![2]),
            Some(vec![3]),
            Some(vec![]),
            Some(vec![4]),
            Some(vec![2]),
            Some(vec![5]),
            Some(vec![6]),
            Some(vec![5]),
        ]
    );
    assert_eq!(mem.txns.keys().collect::<Vec<_>>(), ["t1", "t3"]);
    assert_eq!(sm.history("a", "k").unwrap().len(), 3);
}

/// One apply call is one sled batch: each entry (and each group member) reads the writes of
/// the entries before it in the same call, so the whole script applied at once, or as one
/// group, ends exactly like the reference applying it one transaction at a time.
#[tokio::test]
async fn one_apply_call_or_one_group_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut mem = MemState::default();
    let mut expected = Vec::new();
    for txn in script() {
        expected.push(mem.apply(&txn).result);
    }

    let (_log, mut sm) = store::open(&dir.path().join("entries")).unwrap();
    let entries: Vec<_> = script()
        .into_iter()
        .enumerate()
        .map(|(i, txn)| entry(i as u64 + 1, txn))
        .collect();
    let got = sm.apply(entries).await.unwrap();
    assert_eq!(got, expected);
    assert_same(&sm, &mem);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(script().len() as u64));

    let (_log, mut grouped) = store::open(&dir.path().join("group")).unwrap();
    let members: Vec<Txn> = script()
        .into_iter()
        .enumerate()
        .map(|(i, txn)| txn.with_id(format!("m{i}")))
        .collect();
    grouped
        .apply([entry(1, Txn::group(members))])
        .await
        .unwrap();
    for (i, want) in expected.iter().enumerate() {
        let first = grouped.applied_txn(&format!("m{i}")).unwrap().unwrap();
        assert_eq!(&first.result, want, "member {i}");
    }
    assert_same(&grouped, &mem);
}

/// Group commit: members of one entry apply in order, each all-or-nothing by itself (a
/// rejected member changes nothing and does not stop the others), and each outcome is
/// remembered by id, so replaying the entry (crash before `last_applied`) answers the first
/// outcomes and changes nothing.
#[tokio::test]
async fn a_group_entry_applies_members_in_order_and_replays_as_first_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = store_with_bucket(dir.path()).await;
    let group = Txn::group(vec![
        put_with_id("g1", "one", 10),
        // Sees g1's revision 1: the CAS holds.
        Txn::new(
            vec![Op::put_expect("a", "k", "two", Expect::Revision(1))],
            11,
        )
        .with_id("g2"),
        // Expects revision 1 again: g2 moved it to 2, refused alone.
        Txn::new(
            vec![Op::put_expect("a", "k", "bad", Expect::Revision(1))],
            12,
        )
        .with_id("g3"),
        Txn::new(vec![Op::put("a", "other", "x")], 13).with_id("g4"),
    ]);
    let mut rx = sm.subscribe();
    sm.apply([entry(2, group.clone())]).await.unwrap();
    let outcome =
        |sm: &StateMachineStore, id: &str| sm.applied_txn(id).unwrap().expect("remembered").result;
    assert_eq!(
        outcome(&sm, "g1"),
        TxnResult::Applied { revisions: vec![1] }
    );
    assert_eq!(
        outcome(&sm, "g2"),
        TxnResult::Applied { revisions: vec![2] }
    );
    assert!(!outcome(&sm, "g3").is_applied());
    assert_eq!(
        outcome(&sm, "g4"),
        TxnResult::Applied { revisions: vec![3] }
    );
    let mut seen = 0;
    while rx.try_recv().is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 3, "one event per applied member");
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));

    // Raft applies the entry again (as after a crash before last_applied was written).
    sm.apply([entry(3, group)]).await.unwrap();
    assert_eq!(
        outcome(&sm, "g2"),
        TxnResult::Applied { revisions: vec![2] }
    );
    let hist: Vec<(u64, Vec<u8>)> = sm
        .history("a", "k")
        .unwrap()
        .into_iter()
        .map(|e| (e.revision, e.value))
        .collect();
    assert_eq!(hist, [(1, b"one".to_vec()), (2, b"two".to_vec())]);
    assert!(rx.try_recv().is_err(), "a replay publishes nothing");
}

/// A group whose member has no id could be applied twice on replay: refused as corrupt.
#[tokio::test]
async fn a_group_member_without_an_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = store_with_bucket(dir.path()).await;
    let group = Txn::group(vec![
        put_with_id("g1", "one", 10),
        Txn::new(vec![Op::put("a", "k", "two")], 11),
    ]);
    assert!(sm.apply([entry(2, group)]).await.is_err());
}

/// A snapshot is the state at its cut (when openraft asked for the builder) even though
/// applies go on while it is dumped: keys written, overwritten, deleted and whole buckets
/// dropped after the cut are dumped with their values at the cut.
#[tokio::test]
async fn snapshot_is_the_state_at_its_cut_while_applies_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = store::open(&dir.path().join("a")).unwrap();
    let mut mem = MemState::default();
    let txns = script();
    let half = txns.len() / 2;
    let mut index = 0;
    for txn in &txns[..half] {
        mem.apply(txn);
        index += 1;
        sm.apply([entry(index, txn.clone())]).await.unwrap();
    }
    let mut builder = sm.get_snapshot_builder().await;
    // After the cut: the rest of the script, then every bucket of the cut dropped.
    for txn in &txns[half..] {
        index += 1;
        sm.apply([entry(index, txn.clone())]).await.unwrap();
    }
    for b in sm.buckets().unwrap() {
        index += 1;
        sm.apply([entry(index, Txn::new(vec![Op::delete_bucket(b)], 0))])
            .await
            .unwrap();
    }
    assert!(sm.buckets().unwrap().is_empty());
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.unwrap().index, half as u64);
    let (_log2, mut other) = store::open(&dir.path().join("b")).unwrap();
    other
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_same(&other, &mem);
    // And the cut ended with the dump: a later snapshot is the state as it is then.
    let snap = snapshot_of(&mut sm).await;
    let (_log3, mut third) = store::open(&dir.path().join("c")).unwrap();
    third
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert!(third.buckets().unwrap().is_empty());
}

/// A dump reads the state a chunk at a time and lets applies in between: a store larger than
/// many chunks, changed by applies running while the dump runs (updates, deletes, new keys,
/// across every chunk), still gives exactly the state at the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_across_many_chunks_is_the_state_at_its_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = store::open(&dir.path().join("a")).unwrap();
    let mut index = 1;
    sm.apply([entry(
        index,
        Txn::new(vec![Op::create_bucket("a", cfg(1))], 0),
    )])
    .await
    .unwrap();
    const KEYS: usize = 8_000;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
        index += 1;
        let ops = chunk
            .iter()
            .map(|i| Op::put("a", format!("k{i:05}"), format!("v{i}")))
            .collect();
        sm.apply([entry(index, Txn::new(ops, 0))]).await.unwrap();
    }
    let at_cut = sm.list("a").unwrap();
    let cut_index = index;
    let mut builder = sm.get_snapshot_builder().await;
    let build = tokio::spawn(async move { builder.build_snapshot().await.unwrap() });
    let mut round = 0;
    while !build.is_finished() && round < 2_000 {
        round += 1;
        index += 1;
        // Spread over the whole key range: keys the dump has read and keys it has not.
        let i = (round * 7_919) % KEYS;
        let ops = vec![
            Op::put("a", format!("k{i:05}"), format!("changed {round}")),
            Op::delete("a", format!("k{:05}", (i + 1) % KEYS)),
            Op::put("a", format!("new{round:05}"), "n"),
        ];
        sm.apply([entry(index, Txn::new(ops, 0))]).await.unwrap();
        tokio::task::yield_now().await;
    }
    let snap = build.await.unwrap();
    assert!(round > 0, "no apply ran during the dump");
    assert_eq!(snap.meta.last_log_id.unwrap().index, cut_index);
    let (_log2, mut other) = store::open(&dir.path().join("b")).unwrap();
    other
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(other.list("a").unwrap(), at_cut);
}
