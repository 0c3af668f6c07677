#!/usr/bin/env bash
# ployzd's JetStream KV against etcd, side by side in one run on this box.
#
#   benches/kv-vs-etcd.sh            3-machine local cluster (scripts/local-cluster up) and a
#                                    3-member etcd on loopback; 1, 8, 64, 256 clients each
#   CLIENTS="1 64" SECS=5 RUNS=3 benches/kv-vs-etcd.sh
#
# Standard clients only: async-nats JetStream KV against ployzd machine 1 (the founder, the
# Raft leader), etcd's v3 gRPC API against the etcd leader. 128-byte values, each client on its
# own connection, puts for SECS then linearizable gets for SECS/2 (benches/src/bin/kvbench.rs).
# Prints every run, then medians per client count and the ratio ployzd/etcd, and what a put
# costs the servers: CPU µs and context switches per put, summed over the three ployzd
# processes or the three etcd members during the put phase (kvbench, KVBENCH_PIDS). On this
# shared 2-CPU box latency moves with the neighbours' load; the cost per put hardly does.
# Needs root (namespaces) and etcd-server (installed here with apt if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-"1 8 64 256"}
SECS=${SECS:-5}
RUNS=${RUNS:-3}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/x86_64-unknown-linux-musl/release
ETCD_DIR=$(mktemp -d /tmp/ployz-etcd-bench.XXXXXX)
OUT=$(mktemp /tmp/ployz-kv-bench.XXXXXX)

command -v etcd >/dev/null || { apt-get install -y --no-install-recommends etcd-server etcd-client >/dev/null; }
# Two builds, not one: built together, kvbench's dependencies would change ployzd's features,
# and scripts/local-cluster (which builds -p ployzd -p ployzctl) would build it again.
# NO_BUILD=1 runs the binaries already in $BIN (A/B runs of two builds, each in its own target dir).
if [ "${NO_BUILD:-}" != 1 ]; then
  cargo build --locked --release -p ployzd -p ployzctl
  cargo build --locked --release -p ployz-benches --bin kvbench
fi

etcd_pids=()
cleanup() {
  for p in "${etcd_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$ETCD_DIR"
  ./scripts/local-cluster down >/dev/null 2>&1 || true
}
trap cleanup EXIT

# --- etcd: 3 members on loopback ---
cluster=""
for i in 1 2 3; do cluster+="${cluster:+,}e$i=http://127.0.0.1:2390$i"; done
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$ETCD_DIR/e$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2390$i" --initial-advertise-peer-urls "http://127.0.0.1:2390$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token ployz-bench \
    >"$ETCD_DIR/e$i.log" 2>&1 &
  etcd_pids+=($!)
done
endpoints=http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793
for _ in $(seq 100); do
  ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
etcd_leader=$(ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint status -w simple |
  awk -F', ' '$5 == "true" { sub("http://", "", $1); print $1 }')
[ -n "$etcd_leader" ] || { echo "etcd has no leader; see $ETCD_DIR/e*.log" >&2; exit 1; }

# --- ployzd: 3 storage machines ---
./scripts/local-cluster up >/dev/null
nats_json=$(./scripts/local-cluster ctl 1 --json nats url)
field() { python3 -c 'import json,sys; v=json.load(sys.stdin)[sys.argv[1]]; print(v[0] if isinstance(v,list) else v)' "$1" <<<"$nats_json"; }
nats_server=$(field servers)
export NATS_USER NATS_PASSWORD
NATS_USER=$(field user)
NATS_PASSWORD=$(field password)

ployzd_pids=$(cat /var/lib/ployz-local/m{1,2,3}.pid | paste -sd,)
etcd_pid_list=$(IFS=,; echo "${etcd_pids[*]}")
echo "# system clients puts/s put_p50_us put_p99_us gets/s get_p50_us get_p99_us cpu_us_per_put switches_per_put" | tee "$OUT"
for run in $(seq "$RUNS"); do
  for n in $CLIENTS; do
    ./scripts/local-cluster sh 1 env NATS_USER="$NATS_USER" NATS_PASSWORD="$NATS_PASSWORD" \
      KVBENCH_PIDS="$ployzd_pids" "$BIN/kvbench" nats "$nats_server" "$n" "$SECS" | tee -a "$OUT"
    KVBENCH_PIDS="$etcd_pid_list" "$BIN/kvbench" etcd "$etcd_leader" "$n" "$SECS" | tee -a "$OUT"
  done
done

echo
echo "medians of $RUNS runs (ployzd = JetStream KV via async-nats, etcd = v3 gRPC; ratio = ployzd/etcd)"
python3 - "$OUT" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if not l.startswith('#') and l.strip()]
by = {}
for r in rows:
    by.setdefault((r[0], int(r[1])), []).append([float('nan') if x == '-' else float(x) for x in r[2:]])
def med(k):
    runs = by.get(k, [])
    return [statistics.median(c) for c in zip(*runs)] if runs else None
print(f"{'clients':>7} | {'ployzd puts/s':>13} {'p50 µs':>7} {'p99 µs':>7} {'get p50':>7} | {'etcd puts/s':>11} {'p50 µs':>7} {'p99 µs':>7} {'get p50':>7} | {'puts ×':>6} {'p50 ×':>6}")
for n in sorted({k[1] for k in by}):
    p, e = med(('nats', n)), med(('etcd', n))
    if not p or not e:
        continue
    print(f"{n:>7} | {p[0]:>13.0f} {p[1]:>7.0f} {p[2]:>7.0f} {p[4]:>7.0f} | {e[0]:>11.0f} {e[1]:>7.0f} {e[2]:>7.0f} {e[4]:>7.0f} | {p[0]/e[0]:>6.2f} {p[1]/e[1]:>6.2f}")
print()
print("servers' cost per put, medians (CPU µs and context switches, all three processes)")
print(f"{'clients':>7} | {'ployzd cpu µs':>13} {'switches':>8} | {'etcd cpu µs':>11} {'switches':>8} | {'cpu ×':>6}")
for n in sorted({k[1] for k in by}):
    p, e = med(('nats', n)), med(('etcd', n))
    if not p or not e or len(p) < 8 or len(e) < 8:
        continue
    print(f"{n:>7} | {p[6]:>13.0f} {p[7]:>8.1f} | {e[6]:>11.0f} {e[7]:>8.1f} | {p[6]/e[6]:>6.2f}")
PY
