#!/usr/bin/env bash
# Internal DNS query latency on the workload bridge, against the same query relayed to an
# upstream resolver and that upstream asked directly, from inside a workload.
#
#   benches/dns-latency.sh          N=2000 queries each, one at a time (benches/dnsq.py)
#
# One namespace host runs a release ployzd (host runtime, mesh) with one busybox workload;
# the host's /etc/resolv.conf is replaced (in ployzd's mount namespace only) by one naming a
# stub upstream (dnsq.py --serve) on the host's own underlay address. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/x86_64-unknown-linux-musl/release
NS=plzdnsbench
DIR=$(mktemp -d /tmp/ployz-dns-bench.XXXXXX)
cargo build --locked --release -p ployzd -p ployzctl

pids=()
cleanup() {
  ployzctl_ mesh leave --force >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for s in "$DIR"/data/runtime/state/*/state.json; do
    [ -e "$s" ] && kill -9 "$(sed 's/.*"pid":\([0-9]*\).*/\1/' "$s")" 2>/dev/null || true
  done
  ip netns del "$NS" 2>/dev/null || true
  ip link del plzdnsb0 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
ployzctl_() { "$BIN/ployzctl" --socket "$DIR/ployzd.sock" "$@"; }

ip netns del "$NS" 2>/dev/null || true
ip link del plzdnsb0 2>/dev/null || true
ip netns add "$NS"
ip link add plzdnsb0 type veth peer name eth0 netns "$NS"
ip addr add 10.233.77.254/24 dev plzdnsb0
ip link set plzdnsb0 up
ip -n "$NS" addr add 10.233.77.1/24 dev eth0
ip -n "$NS" link set eth0 up
ip -n "$NS" link set lo up
echo "nameserver 10.233.77.1" >"$DIR/resolv.conf"

ip netns exec "$NS" python3 benches/dnsq.py --serve 10.233.77.1 &
pids+=($!)
nsenter --net=/run/netns/$NS unshare --mount --propagation private sh -c \
  "mount --bind $DIR/resolv.conf /etc/resolv.conf && mkdir -p /run/wireguard && \
   mount -t tmpfs ployz-wg /run/wireguard && exec $BIN/ployzd --data-dir $DIR/data \
   --socket $DIR/ployzd.sock run --advertise-ip 10.233.77.1" >"$DIR/ployzd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$DIR/ployzd.sock" ] && break; sleep 0.1; done
ployzctl_ mesh init dnsbench >/dev/null

# A busybox image (docker save layout) whose workload just sleeps.
img=$DIR/img
mkdir -p "$img/layer/bin" "$img/layer/etc" "$img/layer/tmp" "$img/layer/proc" \
  "$img/layer/dev" "$img/layer/sys" "$img/out"
cp /usr/bin/busybox "$img/layer/bin/busybox"
for t in sh sleep; do ln -s busybox "$img/layer/bin/$t"; done
tar -C "$img/layer" -cf "$img/layer.tar" .
lh=$(sha256sum "$img/layer.tar" | cut -d' ' -f1)
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sleep","3600"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$lh" >"$img/config.json"
ch=$(sha256sum "$img/config.json" | cut -d' ' -f1)
mkdir -p "$img/out/$lh"
mv "$img/layer.tar" "$img/out/$lh/layer.tar"
mv "$img/config.json" "$img/out/$ch.json"
printf '[{"Config":"%s.json","RepoTags":["dnsbench:latest"],"Layers":["%s/layer.tar"]}]' \
  "$ch" "$lh" >"$img/out/manifest.json"
tar -C "$img/out" -cf "$DIR/image.tar" .

ployzctl_ --json deploy service web --image "$DIR/image.tar" >"$DIR/web.json"
gateway=$(ployzctl_ --json mesh status | python3 -c \
  'import json,sys; s=json.load(sys.stdin)["machine"]["subnet"].split("/")[0].split("."); s[3]="1"; print(".".join(s))')
pid=$(sed 's/.*"pid":\([0-9]*\).*/\1/' "$DIR"/data/runtime/state/*/state.json | head -1)
echo "workload pid $pid, resolver $gateway, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
run() { nsenter -t "$pid" -n python3 benches/dnsq.py "$@" "$N"; }
run "$gateway" web.internal
run "$gateway" example.test
run 10.233.77.1 example.test
