#!/usr/bin/env bash
# Median command-to-active time of provisioning one fresh host (system mode,
# file:// release of the built binaries), over $RUNS runs (default 5).
# Each run boots a new fresh container (not timed), creates an invite on a
# founder ployzd running on this host, and times `provision_tool init` —
# connect, preflight, fetch+verify, upload, unit, start, join — until it
# returns, which is once the machine is active.
#
# Needs root and docker (scripts/fresh-host-image prepares both).
# Usage: provision/bench/init-time.sh [RUNS]   (env: PLOYZ_BIN_DIR, CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS="${1:-5}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="${PLOYZ_BIN_DIR:-$TARGET_DIR/debug}"

cargo build -q --bins
cargo build -q -p ployz-provision --example provision_tool
TOOL="$TARGET_DIR/debug/examples/provision_tool"
KEY="$(scripts/fresh-host-image | tail -n1)"

WORK="$(mktemp -d /tmp/ployz-bench-init.XXXXXX)"
CONTAINERS=()
FOUNDER=""
cleanup() {
  [ -n "$FOUNDER" ] && kill "$FOUNDER" 2>/dev/null && wait "$FOUNDER" 2>/dev/null
  for c in "${CONTAINERS[@]}"; do docker rm -f -v "$c" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

VERSION="$("$BIN/ployzd" --version | awk '{print $2}')"
URL="$("$TOOL" pack --out "$WORK/release" --version "$VERSION" ployzd="$BIN/ployzd" ployzctl="$BIN/ployzctl")"

run_container() {
  local name="ployz-bench-$$-$1"
  docker run -d --name "$name" --label ployz.test=fresh-host --cap-add SYS_ADMIN --cap-add NET_ADMIN \
    --device /dev/net/tun --security-opt seccomp=unconfined --cgroupns=host \
    -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
    ployz-fresh-host /sbin/init >/dev/null
  CONTAINERS+=("$name")
  echo "$name"
}

first="$(run_container 0)"
GW="$(docker inspect -f '{{.NetworkSettings.Gateway}}' "$first")"
SOCK="$WORK/founder/run/ployzd.sock"
"$BIN/ployzd" --data-dir "$WORK/founder/data" --socket "$SOCK" run --peer-port 0 --nats-port 0 \
  --advertise-ip "$GW" >"$WORK/founder.log" 2>&1 &
FOUNDER=$!
for _ in $(seq 1 150); do [ -S "$SOCK" ] && break; sleep 0.2; done
"$BIN/ployzctl" --socket "$SOCK" mesh init bench >/dev/null

times=()
for i in $(seq 1 "$RUNS"); do
  if [ "$i" = 1 ]; then name="$first"; else name="$(run_container "$i")"; fi
  ip="$(docker inspect -f '{{.NetworkSettings.IPAddress}}' "$name")"
  for _ in $(seq 1 100); do timeout 1 bash -c "exec 3<>/dev/tcp/$ip/22" 2>/dev/null && break; sleep 0.2; done
  token="$("$BIN/ployzctl" --socket "$SOCK" --json machine invite create | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')"
  start=$(date +%s%N)
  "$TOOL" init --target "root@$ip" --token "$token" --release-url "$URL" \
    --identity "$KEY" --known-hosts "$WORK/known_hosts" 2>"$WORK/run-$i.log" >/dev/null \
    || { echo "run $i failed:"; cat "$WORK/run-$i.log"; exit 1; }
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  times+=("$ms")
  echo "run $i: ${ms} ms ($(tr '\n' ' ' <"$WORK/run-$i.log"))"
  docker rm -f -v "$name" >/dev/null
done
median="$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}')"
echo "median command-to-active over $RUNS runs: ${median} ms"
