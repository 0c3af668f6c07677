//! Drives a KV store with N concurrent clients, each on its own connection, and prints one
//! line of figures: puts for `--secs`, then linearizable gets of the keys just written.
//!
//!   kvbench nats HOST:PORT CLIENTS SECS   ployzd (or nats-server) JetStream KV, bucket `bench`
//!                                         (credentials in NATS_USER / NATS_PASSWORD)
//!   kvbench etcd HOST:PORT CLIENTS SECS   etcd v3 gRPC (KV/Put, KV/Range, linearizable)
//!
//! Output (one line): `system clients puts/s put_p50_us put_p99_us gets/s get_p50_us get_p99_us
//! cpu_us_per_put switches_per_put`. The last two are the servers' cost of a put, summed over
//! the processes listed in `KVBENCH_PIDS` (comma-separated) during the put phase: CPU time
//! (user + system, from `/proc/PID/stat`) and context switches (voluntary and not, of every
//! thread, from `/proc/PID/task/*/status`); `-` without `KVBENCH_PIDS`. Unlike latency, they
//! hardly move with the load of a shared, noisy box.
//! Values are 128 bytes; client `c` writes keys `c{c}-{0..19}` round robin.

use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;

const VALUE_LEN: usize = 128;
const KEYS_PER_CLIENT: usize = 20;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
enum Conn {
    Nats(Box<async_nats::jetstream::kv::Store>),
    Etcd(h2::client::SendRequest<Bytes>, String),
}

impl Conn {
    async fn put(&mut self, key: &str, value: Bytes) -> Result<(), Error> {
        match self {
            Conn::Nats(kv) => {
                kv.put(key, value).await?;
            }
            Conn::Etcd(h2, authority) => {
                let mut msg = Vec::with_capacity(VALUE_LEN + key.len() + 8);
                field(&mut msg, 0x0a, key.as_bytes());
                field(&mut msg, 0x12, &value);
                grpc(h2, authority, "/etcdserverpb.KV/Put", msg).await?;
            }
        }
        Ok(())
    }

    async fn get(&mut self, key: &str) -> Result<(), Error> {
        match self {
            Conn::Nats(kv) => {
                kv.get(key).await?.ok_or("a written key is missing")?;
            }
            Conn::Etcd(h2, authority) => {
                let mut msg = Vec::new();
                field(&mut msg, 0x0a, key.as_bytes());
                let body = grpc(h2, authority, "/etcdserverpb.KV/Range", msg).await?;
                if body.len() < 5 + VALUE_LEN {
                    return Err("a written key is missing".into());
                }
            }
        }
        Ok(())
    }
}

/// A protobuf length-delimited field.
fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    let mut n = bytes.len();
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(bytes);
}

/// One unary gRPC call; the response message (with its 5-byte frame header).
async fn grpc(
    h2: &mut h2::client::SendRequest<Bytes>,
    authority: &str,
    path: &str,
    msg: Vec<u8>,
) -> Result<Vec<u8>, Error> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let ready = h2.clone().ready().await?;
    *h2 = ready;
    let (resp, mut stream) = h2.send_request(req, false)?;
    let mut frame = Vec::with_capacity(msg.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(msg.len())?.to_be_bytes());
    frame.extend_from_slice(&msg);
    stream.send_data(Bytes::from(frame), true)?;
    let resp = resp.await?;
    let status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    let status = match body.trailers().await? {
        Some(t) => t
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("?").to_string()),
        None => status,
    };
    match status.as_deref() {
        Some("0") => Ok(out),
        other => Err(format!("grpc {path}: status {other:?}").into()),
    }
}

async fn connect(system: &str, target: &str, first: bool) -> Result<Conn, Error> {
    match system {
        "nats" => {
            // Credentials from the environment (`ployzctl nats url --json` prints them).
            let client = match (std::env::var("NATS_USER"), std::env::var("NATS_PASSWORD")) {
                (Ok(user), Ok(password)) => {
                    async_nats::ConnectOptions::with_user_and_password(user, password)
                        .connect(target)
                        .await?
                }
                _ => async_nats::connect(target).await?,
            };
            let js = async_nats::jetstream::new(client);
            let kv = if first {
                js.create_key_value(async_nats::jetstream::kv::Config {
                    bucket: "bench".into(),
                    history: 1,
                    ..Default::default()
                })
                .await?
            } else {
                js.get_key_value("bench").await?
            };
            Ok(Conn::Nats(Box::new(kv)))
        }
        "etcd" => {
            let tcp = tokio::net::TcpStream::connect(target).await?;
            tcp.set_nodelay(true)?;
            let (h2, conn) = h2::client::handshake(tcp).await?;
            tokio::spawn(conn);
            Ok(Conn::Etcd(h2, target.to_string()))
        }
        other => Err(format!("unknown system {other:?}: nats or etcd").into()),
    }
}

/// CPU time in µs and context switches so far of `pids`, all threads; threads that already
/// exited count only in the CPU time.
fn server_cost(pids: &[u32]) -> Result<(f64, u64), Error> {
    // /proc reports CPU time in USER_HZ ticks, 100 per second on Linux.
    const TICK_US: f64 = 10_000.0;
    let (mut cpu_us, mut switches) = (0.0, 0u64);
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name (which may hold spaces) start with the state.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64, Error> {
            Ok(fields
                .get(i)
                .ok_or_else(|| format!("/proc/{pid}/stat has no field {}", i + 3))?
                .parse::<f64>()?)
        };
        // utime and stime: fields 14 and 15 of the line.
        cpu_us += (ticks(11)? + ticks(12)?) * TICK_US;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
                continue; // the thread exited meanwhile
            };
            for line in status.lines() {
                if let Some(v) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    switches += v.trim().parse::<u64>()?;
                }
            }
        }
    }
    Ok((cpu_us, switches))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Runs `clients` loops for `secs`; all latencies (µs) and the elapsed time.
async fn phase(conns: &[Conn], secs: f64, get: bool) -> Result<(Vec<u64>, f64), Error> {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for (c, conn) in conns.iter().enumerate() {
        let mut conn = conn.clone();
        tasks.spawn(async move {
            let value = Bytes::from(vec![b'v'; VALUE_LEN]);
            let mut lat = Vec::new();
            let mut i = 0usize;
            while Instant::now() < until {
                let key = format!("c{c}-{}", i % KEYS_PER_CLIENT);
                let t = Instant::now();
                if get {
                    conn.get(&key).await?;
                } else {
                    conn.put(&key, value.clone()).await?;
                }
                lat.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                i += 1;
            }
            Ok::<_, Error>(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(res) = tasks.join_next().await {
        all.extend(res??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok((all, elapsed))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, system, target, clients, secs] = args.as_slice() else {
        return Err("usage: kvbench nats|etcd URL|HOST:PORT CLIENTS SECS".into());
    };
    let clients: usize = clients.parse()?;
    let secs: f64 = secs.parse()?;
    let mut conns = Vec::with_capacity(clients);
    for c in 0..clients {
        conns.push(connect(system, target, c == 0).await?);
    }
    // Every client's keys exist before the timed phases (also the warm-up).
    let mut fill = tokio::task::JoinSet::new();
    for (c, conn) in conns.iter().enumerate() {
        let mut conn = conn.clone();
        fill.spawn(async move {
            for i in 0..KEYS_PER_CLIENT {
                conn.put(&format!("c{c}-{i}"), Bytes::from(vec![b'v'; VALUE_LEN]))
                    .await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(res) = fill.join_next().await {
        res??;
    }
    let pids: Vec<u32> = match std::env::var("KVBENCH_PIDS") {
        Ok(list) => list
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("KVBENCH_PIDS must be comma-separated process ids: {e}"))?,
        Err(_) => Vec::new(),
    };
    let before = server_cost(&pids)?;
    let (puts, put_secs) = phase(&conns, secs, false).await?;
    let after = server_cost(&pids)?;
    let cost = match (pids.is_empty(), puts.len()) {
        (false, n) if n > 0 => format!(
            "{:.0} {:.1}",
            (after.0 - before.0) / n as f64,
            after.1.saturating_sub(before.1) as f64 / n as f64
        ),
        _ => "- -".to_string(),
    };
    let (gets, get_secs) = phase(&conns, secs / 2.0, true).await?;
    println!(
        "{system} {clients} {:.0} {} {} {:.0} {} {} {cost}",
        puts.len() as f64 / put_secs,
        percentile(&puts, 0.5),
        percentile(&puts, 0.99),
        gets.len() as f64 / get_secs,
        percentile(&gets, 0.5),
        percentile(&gets, 0.99),
    );
    Ok(())
}
