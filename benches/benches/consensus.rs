//! Consensus latency on one machine: a replicated, durable (flushed) KV put
//! through openraft + sled, a linearizable read, and the pure kv rules.

use criterion::{criterion_group, criterion_main, Criterion};
use ployz_consensus::kv::{BucketConfig, Expect, MemState, Op, Txn};
use ployz_consensus::{Node, NodeConfig, PloyzNode};
use std::hint::black_box;

fn put(key: &str, value: &[u8]) -> Txn {
    Txn {
        ops: vec![Op::Put {
            bucket: "bench".into(),
            key: key.into(),
            value: value.to_vec(),
            expect: Expect::Any,
        }],
        now_ms: 1,
        id: None,
        group: Vec::new(),
    }
}

fn single_node(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let me = PloyzNode {
        machine_id: "000000000001".into(),
        addr: "127.0.0.1:0".into(),
    };
    let node = rt.block_on(async {
        let node = Node::open(NodeConfig {
            node_id: 1,
            node: me.clone(),
            dir: dir.path().join("store"),
            snapshot_logs_since_last: 5000,
        })
        .await
        .unwrap();
        node.initialize_single(me).await.unwrap();
        node.write(Txn {
            ops: vec![Op::CreateBucket {
                bucket: "bench".into(),
                config: BucketConfig::default(),
            }],
            now_ms: 1,
            id: None,
            group: Vec::new(),
        })
        .await
        .unwrap();
        node
    });
    let value = vec![7u8; 256];
    let mut i = 0u64;
    c.bench_function("raft_put_256B_durable", |b| {
        b.iter(|| {
            i += 1;
            let key = format!("k{}", i % 1000);
            rt.block_on(node.write(put(&key, &value))).unwrap()
        })
    });
    c.bench_function("linearizable_get", |b| {
        b.iter(|| rt.block_on(node.get("bench", black_box("k1"))).unwrap())
    });
    rt.block_on(node.shutdown()).unwrap();
}

fn kv_rules(c: &mut Criterion) {
    let mut state = MemState::default();
    state.apply(&Txn {
        ops: vec![Op::CreateBucket {
            bucket: "bench".into(),
            config: BucketConfig {
                history: 5,
                max_value_size: None,
            },
        }],
        now_ms: 1,
        id: None,
        group: Vec::new(),
    });
    let value = vec![7u8; 256];
    let mut i = 0u64;
    c.bench_function("kv_apply_put_in_memory", |b| {
        b.iter(|| {
            i += 1;
            state.apply(&put(&format!("k{}", i % 1000), black_box(&value)))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = single_node, kv_rules
}
criterion_main!(benches);
