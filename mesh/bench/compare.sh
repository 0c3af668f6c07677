#!/usr/bin/env bash
# Throughput and latency between the same two namespace hosts over
#   (1) the raw veth/bridge underlay, (2) the ployz mesh (meshnode, release
#   build), (3) stock wireguard-go + wg;
# prints each figure (median of the runs) and the ratios.
# Needs root, iproute2, iptables, iperf3, ping, wireguard-go, wg, nsenter.
#
#   mesh/bench/compare.sh            # RUNS=3 SECS=8 by default
#   RUNS=5 SECS=10 mesh/bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
SECS=${SECS:-8}
PINGS=${PINGS:-200}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
MESHNODE=${MESHNODE:-$TARGET/x86_64-unknown-linux-musl/release/examples/meshnode}
if [[ ! -x $MESHNODE ]]; then
    cargo build --release -p ployz-mesh --example meshnode
fi

BR=pzbcmp
NS=(pzcmp0 pzcmp1)
UND=(10.233.9.1 10.233.9.2)
WORK=$(mktemp -d /tmp/ployz-compare.XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in "${NS[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    ip link del pzcmph0 2>/dev/null || true
    ip link del pzcmph1 2>/dev/null || true
    ip link del $BR 2>/dev/null || true
    while iptables -D FORWARD -i $BR -o $BR -j ACCEPT 2>/dev/null; do :; done
    # A deleted namespace does not end its processes: stop the iperf3 daemon.
    [[ -s $WORK/iperf3.pid ]] && kill "$(cat "$WORK/iperf3.pid")" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

in_ns() { local n=$1; shift; ip netns exec "$n" "$@"; }
# Run a WireGuard daemon with a private /run/wireguard (both name their
# interface the same way in both namespaces).
spawn_private() {
    local n=$1 log=$2; shift 2
    WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 ip netns exec "$n" \
        unshare --mount --propagation private sh -c \
        'mount -t tmpfs tmpfs /run/wireguard && exec "$0" "$@"' "$@" >"$log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) {print "nan"} else if (NR%2) {print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }

# iperf3 TCP from host 0 to host 1's address $1: median Mbit/s over RUNS.
throughput() {
    local dst=$1 i
    for ((i = 0; i < RUNS; i++)); do
        in_ns ${NS[0]} iperf3 -c "$dst" -t "$SECS" -f m 2>/dev/null | awk '/receiver/ {print $(NF-2)}'
    done | median
}

# ping from host 0 to $1 every ${2:-0.01} s: median RTT in ms over PINGS
# echoes. The 10 ms interval is the headline figure; at 1 ms the vCPUs of a
# small VM stay awake between echoes, which shows what is left once idle
# wake-ups are out of the picture.
latency() {
    in_ns ${NS[0]} ping -c "$PINGS" -i "${2:-0.01}" "$1" 2>/dev/null |
        sed -n 's/.*time=\([0-9.]*\) ms/\1/p' | median
}

mkdir -p /run/wireguard
ip link add $BR type bridge && ip link set $BR up
iptables -I FORWARD -i $BR -o $BR -j ACCEPT
for i in 0 1; do
    ip netns add ${NS[$i]}
    ip link add pzcmph$i type veth peer name pzcmpn$i
    ip link set pzcmpn$i netns ${NS[$i]}
    ip link set pzcmph$i master $BR up
    ip -n ${NS[$i]} link set pzcmpn$i name eth0
    ip -n ${NS[$i]} addr add ${UND[$i]}/24 dev eth0
    ip -n ${NS[$i]} link set eth0 up
    ip -n ${NS[$i]} link set lo up
done
in_ns ${NS[1]} iperf3 -s -D -I "$WORK/iperf3.pid"
sleep 0.5

declare -A TP LAT LATF
echo "== raw veth"
TP[raw]=$(throughput ${UND[1]}); LAT[raw]=$(latency ${UND[1]}); LATF[raw]=$(latency ${UND[1]} 0.001)
echo "   ${TP[raw]} Mbit/s, ping p50 ${LAT[raw]} ms (1 ms interval: ${LATF[raw]} ms)"

echo "== ployz mesh ($MESHNODE)"
K=($(wg genkey) $(wg genkey)); P=($(echo "${K[0]}" | wg pubkey) $(echo "${K[1]}" | wg pubkey))
for i in 0 1; do
    j=$((1 - i))
    spawn_private ${NS[$i]} "$WORK/mesh$i.log" "$MESHNODE" run --key "${K[$i]}" \
        --address 10.234.$((i + 1)).1 --cluster 10.234.0.0/16 \
        --peer "${P[$j]}@${UND[$j]}:51820/10.234.$((j + 1)).0/24"
done
for _ in $(seq 50); do in_ns ${NS[0]} ping -c1 -W1 10.234.2.1 >/dev/null 2>&1 && break; sleep 0.2; done
TP[mesh]=$(throughput 10.234.2.1); LAT[mesh]=$(latency 10.234.2.1); LATF[mesh]=$(latency 10.234.2.1 0.001)
echo "   ${TP[mesh]} Mbit/s, ping p50 ${LAT[mesh]} ms (1 ms interval: ${LATF[mesh]} ms)"
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()

echo "== wireguard-go $(wireguard-go --version | head -1 | awk '{print $2}')"
K=($(wg genkey) $(wg genkey)); P=($(echo "${K[0]}" | wg pubkey) $(echo "${K[1]}" | wg pubkey))
for i in 0 1; do
    j=$((1 - i))
    spawn_private ${NS[$i]} "$WORK/wggo$i.log" wireguard-go -f wg0
    pid=$LAST_PID
    for _ in $(seq 50); do nsenter -t "$pid" --mount --net wg show wg0 >/dev/null 2>&1 && break; sleep 0.1; done
    printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\n[Peer]\nPublicKey = %s\nEndpoint = %s:51820\nAllowedIPs = 10.235.%d.0/24\n' \
        "${K[$i]}" "${P[$j]}" "${UND[$j]}" $((j + 1)) >"$WORK/wg$i.conf"
    nsenter -t "$pid" --mount --net wg setconf wg0 "$WORK/wg$i.conf"
    ip -n ${NS[$i]} addr add 10.235.$((i + 1)).1/32 dev wg0
    ip -n ${NS[$i]} link set wg0 mtu 1420 up
    ip -n ${NS[$i]} route add 10.235.0.0/16 dev wg0
done
for _ in $(seq 50); do in_ns ${NS[0]} ping -c1 -W1 10.235.2.1 >/dev/null 2>&1 && break; sleep 0.2; done
TP[wggo]=$(throughput 10.235.2.1); LAT[wggo]=$(latency 10.235.2.1); LATF[wggo]=$(latency 10.235.2.1 0.001)
echo "   ${TP[wggo]} Mbit/s, ping p50 ${LAT[wggo]} ms (1 ms interval: ${LATF[wggo]} ms)"

echo
echo "== summary (medians; $RUNS x ${SECS}s iperf3 TCP, $PINGS pings)"
printf '%-14s %12s %14s %20s\n' path "Mbit/s" "ping p50 ms" "p50 ms @1ms interval"
for k in raw mesh wggo; do printf '%-14s %12s %14s %20s\n' $k "${TP[$k]}" "${LAT[$k]}" "${LATF[$k]}"; done
awk -v m="${TP[mesh]}" -v g="${TP[wggo]}" -v r="${TP[raw]}" \
    -v lm="${LAT[mesh]}" -v lg="${LAT[wggo]}" -v lr="${LAT[raw]}" \
    -v fm="${LATF[mesh]}" -v fg="${LATF[wggo]}" -v fr="${LATF[raw]}" 'BEGIN {
    printf "throughput mesh/wireguard-go = %.2fx   mesh/raw = %.2fx   wireguard-go/raw = %.2fx\n", m/g, m/r, g/r
    printf "latency added over raw: mesh %+.0f us, wireguard-go %+.0f us\n", (lm-lr)*1000, (lg-lr)*1000
    printf "  at 1 ms ping interval: mesh %+.0f us, wireguard-go %+.0f us\n", (fm-fr)*1000, (fg-fr)*1000
}'
