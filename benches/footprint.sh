#!/usr/bin/env bash
# Footprint of ployzd: the static binary's size, and idle RSS and CPU per
# machine in local clusters of 3, 10 and 20 machines on this box (release
# build, scripts/local-cluster). Prints one line per cluster size.
#
#   benches/footprint.sh [SIZES…]      default: 3 10 20
#
# Needs root (namespaces). Each cluster settles for $SETTLE s (default 30),
# then CPU is measured over $WINDOW s (default 30) from /proc/PID/stat and
# RSS read from /proc/PID/status at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("${@:-3 10 20}")
# shellcheck disable=SC2206
SIZES=(${SIZES[*]})
SETTLE=${SETTLE:-30}
WINDOW=${WINDOW:-30}
BIN=${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-musl/release
STATE=/var/lib/ployz-local
HZ=$(getconf CLK_TCK)

cargo build --locked --release -p ployzd -p ployzctl >/dev/null 2>&1
size=$(stat -c %s "$BIN/ployzd")
printf 'ployzd binary: %d bytes (%.1f MiB)\n' "$size" "$(echo "$size / 1048576" | bc -l)"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

for n in "${SIZES[@]}"; do
  ./scripts/local-cluster down >/dev/null 2>&1 || true
  PLOYZ_MACHINES=$n ./scripts/local-cluster up >/dev/null
  sleep "$SETTLE"
  pids=()
  for i in $(seq "$n"); do pids+=("$(cat "$STATE/m$i.pid")"); done
  declare -A before=()
  for p in "${pids[@]}"; do before[$p]=$(ticks "$p"); done
  sleep "$WINDOW"
  total_ticks=0
  rss=()
  for p in "${pids[@]}"; do
    total_ticks=$((total_ticks + $(ticks "$p") - before[$p]))
    rss+=("$(rss_kb "$p")")
  done
  sorted=$(printf '%s\n' "${rss[@]}" | sort -n)
  median=$(echo "$sorted" | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
  max=$(echo "$sorted" | tail -1)
  cpu=$(echo "100 * $total_ticks / $HZ / $WINDOW" | bc -l)
  printf '%2d machines: idle RSS per machine median %.1f MiB, max %.1f MiB; CPU of all %d together %.1f %% of one core\n' \
    "$n" "$(echo "$median / 1024" | bc -l)" "$(echo "$max / 1024" | bc -l)" "$n" "$cpu"
  unset before
done
./scripts/local-cluster down >/dev/null 2>&1 || true
