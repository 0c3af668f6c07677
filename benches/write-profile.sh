#!/usr/bin/env bash
# Where a put spends its time: runs kvbench (async-nats JetStream KV puts) against the
# 3-machine local cluster and prints, per stage, the mean and the approximate median of the
# timing histograms ployzd exports on /metrics, taken as the difference between a scrape
# before and one after each run. Machine 1 is the founder (the Raft leader); machine 2 is a
# follower.
#
#   benches/write-profile.sh                 1 and 64 clients, 5 s each
#   CLIENTS="1 8 64 256" SECS=10 benches/write-profile.sh
#
# Stages (see ployzd/src/metrics.rs): ployz_store_write_duration (ployzd's store call, end to
# end), ployz_store_queue_duration (waiting for a proposer), ployz_store_propose_duration
# (client_write of one entry until applied here), ployz_raft_append_duration (log append +
# fsync, leader and follower), ployz_store_fsync_duration, ployz_raft_apply_duration,
# ployz_store_group_size. kvbench's put p50 minus the store write is NATS parsing, the KV
# handler and the client.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-"1 64"}
SECS=${SECS:-5}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/x86_64-unknown-linux-musl/release
WORK=$(mktemp -d /tmp/ployz-write-profile.XXXXXX)

# NO_BUILD=1 profiles the binaries already in $BIN (A/B of two builds, each in its own target dir).
if [ "${NO_BUILD:-}" != 1 ]; then
  cargo build --locked --release -p ployzd -p ployzctl
  cargo build --locked --release -p ployz-benches --bin kvbench
fi

cleanup() {
  rm -rf "$WORK"
  ./scripts/local-cluster down >/dev/null 2>&1 || true
}
trap cleanup EXIT

./scripts/local-cluster up >/dev/null
nats_json=$(./scripts/local-cluster ctl 1 --json nats url)
field() { python3 -c 'import json,sys; v=json.load(sys.stdin)[sys.argv[1]]; print(v[0] if isinstance(v,list) else v)' "$1" <<<"$nats_json"; }
nats_server=$(field servers)
user=$(field user)
password=$(field password)

scrape() { # machine file
  ./scripts/local-cluster sh "$1" curl -fsS "http://10.232.0.1$1:9101/metrics" >"$2"
}

for n in $CLIENTS; do
  for m in 1 2; do scrape "$m" "$WORK/before$m"; done
  line=$(./scripts/local-cluster sh 1 env NATS_USER="$user" NATS_PASSWORD="$password" \
    "$BIN/kvbench" nats "$nats_server" "$n" "$SECS")
  for m in 1 2; do scrape "$m" "$WORK/after$m"; done
  echo
  echo "== $n clients: kvbench: $line"
  echo "   (system clients puts/s put_p50_us put_p99_us gets/s get_p50_us get_p99_us)"
  python3 - "$WORK" <<'PY'
import re, sys
work = sys.argv[1]
names = ["ployz_store_write_duration_seconds", "ployz_store_queue_duration_seconds",
         "ployz_store_propose_duration_seconds", "ployz_raft_append_duration_seconds",
         "ployz_store_fsync_duration_seconds", "ployz_raft_apply_duration_seconds",
         "ployz_store_read_duration_seconds", "ployz_store_group_size"]
def parse(path):
    h = {}
    for line in open(path):
        m = re.match(r'^(\w+?)_(bucket|sum|count)(\{[^}]*\})? (\S+)$', line.strip())
        if not m or m.group(1) not in names:
            continue
        d = h.setdefault(m.group(1), {"b": {}})
        if m.group(2) == "bucket":
            le = re.search(r'le="([^"]+)"', m.group(3)).group(1)
            d["b"][float("inf") if le == "+Inf" else float(le)] = float(m.group(4))
        else:
            d[m.group(2)] = float(m.group(4))
    return h
for machine in ("1", "2"):
    b, a = parse(f"{work}/before{machine}"), parse(f"{work}/after{machine}")
    role = "leader" if machine == "1" else "follower"
    print(f"   machine {machine} ({role}):")
    for n in names:
        if n not in a:
            continue
        cnt = a[n].get("count", 0) - b.get(n, {}).get("count", 0)
        if cnt <= 0:
            continue
        s = a[n].get("sum", 0) - b.get(n, {}).get("sum", 0)
        les = sorted(a[n]["b"])
        cum = [a[n]["b"][le] - b.get(n, {"b": {}})["b"].get(le, 0) for le in les]
        p50 = next((le for le, c in zip(les, cum) if c >= cnt / 2), float("inf"))
        p99 = next((le for le, c in zip(les, cum) if c >= cnt * 0.99), float("inf"))
        short = n.replace("ployz_", "").replace("_seconds", "")
        if n.endswith("group_size"):
            print(f"     {short:<26} n={cnt:>7.0f}  mean {s/cnt:>8.1f}        p50 <= {p50:>6.0f}     p99 <= {p99:>6.0f}")
        else:
            print(f"     {short:<26} n={cnt:>7.0f}  mean {s/cnt*1e6:>8.0f} µs  p50 <= {p50*1e6:>6.0f} µs  p99 <= {p99*1e6:>7.0f} µs")
PY
done
