//! Growth figures for benches/growth.sh, through a standard client (async-nats JetStream KV):
//!
//!   kvgrowth fill URL FROM TO CLIENTS   puts keys g{FROM}..g{TO} (128-byte values) into the
//!                                       bucket `growth` with CLIENTS connections; prints
//!                                       `fill FROM TO SECS puts/s`
//!   kvgrowth fanout URL WATCHERS PUTS   WATCHERS connections each watch the key `fan`; then
//!                                       PUTS puts, one at a time; for each, the time until every
//!                                       watcher saw it; prints `fanout WATCHERS p50_us max_us`
//!   kvgrowth snapshot DIR               opens a stopped replica's store (a copy of its raft
//!                                       directory), times opening it and building a snapshot;
//!                                       prints `snapshot open_ms build_ms bytes`
//!
//!   kvgrowth synth DIR KEYS             writes a store of KEYS keys (128-byte values, the
//!                                       bucket `growth`, one remembered id per put, 256 puts
//!                                       per log entry) straight through the state machine,
//!                                       then a snapshot (what persists it); prints
//!                                       `synth KEYS SECS`
//!
//!   kvgrowth install SRC DST            installs SRC's current snapshot into a new store DST;
//!                                       prints `install ms`
//!
//! `snapshot` and `install` also print `rss open_kib peak_kib` (VmRSS after opening, VmHWM after building).
//!
//! NATS credentials come from NATS_USER / NATS_PASSWORD.

use std::time::Duration;
use std::time::Instant;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

const VALUE_LEN: usize = 128;
const BUCKET: &str = "growth";

async fn store(url: &str, create: bool) -> Result<kv::Store, Error> {
    let client = match (std::env::var("NATS_USER"), std::env::var("NATS_PASSWORD")) {
        (Ok(user), Ok(password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
                .connect(url)
                .await?
        }
        _ => async_nats::connect(url).await?,
    };
    let js = async_nats::jetstream::new(client);
    if create {
        if let Ok(kv) = js.get_key_value(BUCKET).await {
            return Ok(kv);
        }
        return Ok(js
            .create_key_value(kv::Config {
                bucket: BUCKET.into(),
                history: 1,
                ..Default::default()
            })
            .await?);
    }
    Ok(js.get_key_value(BUCKET).await?)
}

async fn fill(url: &str, from: u64, to: u64, clients: u64) -> Result<(), Error> {
    store(url, true).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let kv = store(url, false).await?;
        tasks.spawn(async move {
            let value = Bytes::from(vec![b'g'; VALUE_LEN]);
            let mut i = from + c;
            while i < to {
                // A write refused under load (too many pending) is retried.
                let mut tries = 0;
                loop {
                    match kv.put(format!("g{i}"), value.clone()).await {
                        Ok(_) => break,
                        Err(e) if tries < 20 => {
                            tries += 1;
                            eprintln!("put g{i}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err::<(), Error>(e.into()),
                    }
                }
                i += clients;
            }
            Ok(())
        });
    }
    while let Some(res) = tasks.join_next().await {
        res??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fill {from} {to} {secs:.1} {:.0}",
        (to - from) as f64 / secs
    );
    Ok(())
}

async fn fanout(url: &str, watchers: usize, puts: usize) -> Result<(), Error> {
    let writer = store(url, true).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..watchers {
        let kv = store(url, false).await?;
        let mut watch = kv.watch("fan").await?;
        let tx = tx.clone();
        tasks.spawn(async move {
            while let Some(entry) = watch.next().await {
                let entry = entry?;
                let n: u64 = std::str::from_utf8(&entry.value)?.parse()?;
                if tx.send((n, Instant::now())).is_err() {
                    break;
                }
            }
            Ok::<_, Error>(())
        });
    }
    // Let every watcher's consumer start before the first put.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lat = Vec::with_capacity(puts);
    for n in 1..=puts as u64 {
        let t0 = Instant::now();
        writer.put("fan", Bytes::from(n.to_string())).await?;
        let mut seen = 0;
        let mut last = t0;
        while seen < watchers {
            let (got, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .map_err(|_| format!("put {n}: only {seen} of {watchers} watchers saw it"))?
                .ok_or("watchers stopped")?;
            if got == n {
                seen += 1;
                last = last.max(at);
            }
        }
        lat.push(u64::try_from(last.duration_since(t0).as_micros()).unwrap_or(u64::MAX));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.abort_all();
    lat.sort_unstable();
    println!(
        "fanout {watchers} {} {}",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    Ok(())
}

async fn snapshot(dir: &str) -> Result<(), Error> {
    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;
    let started = Instant::now();
    let (_log, mut sm) = ployz_consensus::store::open(std::path::Path::new(dir))?;
    let open_ms = started.elapsed().as_millis();
    let (open_kib, _) = rss_kib();
    let started = Instant::now();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await?;
    let build_ms = started.elapsed().as_millis();
    let bytes = snap.snapshot.metadata().await?.len();
    println!("snapshot {open_ms} {build_ms} {bytes}");
    println!("rss {open_kib} {}", rss_kib().1);
    Ok(())
}

/// Installs the current snapshot of the stopped store SRC into a new store DST (what a
/// replica that fell behind does); prints `install ms`, then `rss open_kib peak_kib`.
async fn install(src: &str, dst: &str) -> Result<(), Error> {
    use openraft::storage::RaftStateMachine;
    let (_log, mut sm) = ployz_consensus::store::open(std::path::Path::new(src))?;
    let snap = sm
        .get_current_snapshot()
        .await?
        .ok_or("the source store has no snapshot")?;
    drop((_log, sm));
    let (_log2, mut other) = ployz_consensus::store::open(std::path::Path::new(dst))?;
    let (open_kib, _) = rss_kib();
    let started = Instant::now();
    other.install_snapshot(&snap.meta, snap.snapshot).await?;
    println!("install {}", started.elapsed().as_millis());
    println!("rss {open_kib} {}", rss_kib().1);
    Ok(())
}

/// `VmRSS` and `VmHWM` of this process, KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn synth(dir: &str, keys: u64) -> Result<(), Error> {
    use openraft::storage::RaftStateMachine;
    use ployz_consensus::kv::BucketConfig;
    use ployz_consensus::kv::Op;
    use ployz_consensus::kv::Txn;
    let (_log, mut sm) = ployz_consensus::store::open(std::path::Path::new(dir))?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let entry = |index: u64, txn: Txn| openraft::Entry::<ployz_consensus::TypeConfig> {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: openraft::EntryPayload::Normal(txn),
    };
    let started = Instant::now();
    let config = BucketConfig {
        history: 1,
        max_value_size: None,
    };
    sm.apply([entry(
        1,
        Txn::new(vec![Op::create_bucket(BUCKET, config)], now_ms),
    )])
    .await?;
    let value = vec![b'g'; VALUE_LEN];
    let mut index = 1;
    let mut i = 0;
    while i < keys {
        let members = (i..keys.min(i + 256))
            .map(|k| {
                let mut t = Txn::new(
                    vec![Op::put(BUCKET, format!("g{k}"), value.clone())],
                    now_ms,
                );
                t.id = Some(format!("synth-{k}"));
                t
            })
            .collect::<Vec<_>>();
        i += members.len() as u64;
        index += 1;
        sm.apply([entry(index, Txn::group(members))]).await?;
    }
    let applied = started.elapsed();
    // The state machine lives in memory and is persisted by snapshots (in a cluster, the log
    // holds what came after the last one): without a snapshot, nothing written here survives.
    {
        use openraft::RaftSnapshotBuilder;
        sm.get_snapshot_builder().await.build_snapshot().await?;
    }
    drop(sm);
    println!(
        "synth {keys} {:.1} (snapshot written after {:.1})",
        started.elapsed().as_secs_f64(),
        applied.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [_, "fill", url, from, to, clients] => {
            fill(url, from.parse()?, to.parse()?, clients.parse()?).await
        }
        [_, "fanout", url, watchers, puts] => fanout(url, watchers.parse()?, puts.parse()?).await,
        [_, "snapshot", dir] => snapshot(dir).await,
        [_, "synth", dir, keys] => synth(dir, keys.parse()?).await,
        [_, "install", src, dst] => install(src, dst).await,
        _ => Err(
            "usage: kvgrowth fill URL FROM TO CLIENTS | fanout URL WATCHERS PUTS | snapshot DIR \
             | synth DIR KEYS | install SRC DST"
                .into(),
        ),
    }
}
