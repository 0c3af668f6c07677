#!/usr/bin/env bash
# How the store behaves as it grows: a long-running script (not CI). On the 3-machine local
# cluster, fills the bucket `growth` to each size in SIZES (128-byte values, through async-nats
# JetStream KV, 256 clients), and at each size measures:
#   - put and linearizable get latency, p50/p99, 1 and 64 clients (kvbench, bucket `bench`);
#   - ployzd's RSS on machine 1 (the leader) and the store's size on disk;
#   - watch fan-out: 100 watchers (each its own connection) on one key, one put at a time, the
#     time until all 100 saw it (p50 and max of 20 puts);
#   - restart of a replica: kill -9 of machine 3 (a follower), start, time until its applied
#     index is back at the leader's (no writes meanwhile);
#   - snapshot: on a copy of machine 3's stopped store, time to open it and to build a
#     snapshot, and the snapshot's size.
#
#   benches/growth.sh                       SIZES="10000 100000 1000000"
#   SIZES="10000 100000" SECS=5 benches/growth.sh
#   NO_BUILD=1 benches/growth.sh            the binaries already built in target/
#
# Prints one line per size. Needs root (namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"10000 100000 1000000"}
SECS=${SECS:-5}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/x86_64-unknown-linux-musl/release
STATE=/var/lib/ployz-local
WORK=$(mktemp -d /tmp/ployz-growth.XXXXXX)

# Separate builds: the bench tools' dependencies must not change ployzd's features.
# NO_BUILD=1: measure the binaries already in target/.
if [ "${NO_BUILD:-}" != 1 ]; then
  cargo build --locked --release -p ployzd -p ployzctl
  cargo build --locked --release -p ployz-benches --bin kvbench --bin kvgrowth
fi

cleanup() {
  rm -rf "$WORK"
  ./scripts/local-cluster down >/dev/null 2>&1 || true
}
trap cleanup EXIT

./scripts/local-cluster up >/dev/null
nats_json=$(./scripts/local-cluster ctl 1 --json nats url)
field() { python3 -c 'import json,sys; v=json.load(sys.stdin)[sys.argv[1]]; print(v[0] if isinstance(v,list) else v)' "$1" <<<"$nats_json"; }
url=$(field servers)
user=$(field user)
password=$(field password)
in1() { ./scripts/local-cluster sh 1 env NATS_USER="$user" NATS_PASSWORD="$password" "$@"; }
metric() { # machine name
  ./scripts/local-cluster sh "$1" curl -fsS "http://10.232.0.1$1:9101/metrics" 2>/dev/null |
    awk -v n="$2" '$1 == n { print int($2) }'
}
ms() { date +%s%3N; }

printf '%-8s %-22s %-22s %-22s %-22s %9s %9s %-16s %9s %-22s\n' \
  keys "put1 p50/p99 µs" "get1 p50/p99 µs" "put64 p50/p99 µs" "get64 p50/p99 µs" \
  "rss MiB" "disk MiB" "fanout100 p50/max" "restart" "snapshot open/build/MB"
prev=0
for size in $SIZES; do
  in1 "$BIN/kvgrowth" fill "$url" "$prev" "$size" 256 >"$WORK/fill" || { cat "$WORK/fill"; exit 1; }
  prev=$size
  one=$(in1 "$BIN/kvbench" nats "$url" 1 "$SECS")
  many=$(in1 "$BIN/kvbench" nats "$url" 64 "$SECS")
  rss=$(awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$(cat "$STATE/m1.pid")/status")
  disk=$(du -sm "$STATE/m1/store" | cut -f1)
  fan=$(in1 "$BIN/kvgrowth" fanout "$url" 100 20)

  # Restart of a follower with the whole store.
  applied=$(metric 1 ployz_raft_applied_index)
  pid=$(cat "$STATE/m3.pid")
  kill -9 "$pid"
  # Dead once gone or a zombie (its parent, the shell that started it, is gone and nothing
  # may reap it); without its pid file `local-cluster start` does not take it for running.
  while [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; do sleep 0.05; done
  rm -f "$STATE/m3.pid"
  cp -a "$STATE/m3/store" "$WORK/store3"
  t0=$(ms)
  ./scripts/local-cluster start 3
  until [ "$(metric 3 ployz_raft_applied_index || echo 0)" -ge "$applied" ] 2>/dev/null; do
    sleep 0.05
    [ $(($(ms) - t0)) -lt 600000 ] || { echo "machine 3 did not catch up in 10 min; see $STATE/m3.log" >&2; exit 1; }
  done
  restart=$(($(ms) - t0))
  snap=$("$BIN/kvgrowth" snapshot "$WORK/store3")
  rm -rf "$WORK/store3"

  read -r _ _ _ p1 p99 _ g1 g99 <<<"$one"
  read -r _ _ _ m1 m99 _ h1 h99 <<<"$many"
  read -r _ _ f50 fmax <<<"$fan"
  read -r _ sopen sbuild sbytes <<<"$snap"
  printf '%-8s %-22s %-22s %-22s %-22s %9s %9s %-16s %7sms %-22s\n' \
    "$size" "$p1/$p99" "$g1/$g99" "$m1/$m99" "$h1/$h99" "$rss" "$disk" \
    "$f50/$fmax µs" "$restart" "${sopen}ms/${sbuild}ms/$((sbytes / 1048576))"
  echo "  ($(cat "$WORK/fill"))"
done
