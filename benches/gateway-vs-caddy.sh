#!/usr/bin/env bash
# The gateway (ployzd) against Caddy 2 (`reverse_proxy`), in front of the same backend, on the
# same box, in the same run: plain HTTP and TLS, wrk's requests/s and p50/p99 latency.
#
#   benches/gateway-vs-caddy.sh                     (root; release binaries built if missing)
#   SECS=10 CONNS=64 THREADS=2 RUNS=3 benches/gateway-vs-caddy.sh
#
# One namespace host runs: ployzd (host runtime) with one service instance on 8080 and the
# routes plain.test (HTTP) and bench.test (HTTPS, a certificate from pebble) → it, Caddy with
# `reverse_proxy` to the same instance (plain on :8081, `tls internal` on :8443), and wrk.
# The instance runs benches/keepalive-backend.c (built static with musl-gcc here): a tiny
# keep-alive HTTP/1.1 server, so both proxies reuse their backend connections and the figures
# measure the proxies, not TCP setup. BACKEND=busybox keeps the old busybox httpd (closes every
# connection). Each round runs gateway and Caddy back to back, alternating which goes first, so
# background load hits both; it prints every run, the per-round ratios and their medians.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-10}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
RUNS=${RUNS:-5}
BACKEND_KIND=${BACKEND:-keepalive}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$TARGET/x86_64-unknown-linux-musl/release
NS=plzgwbench
W=$(mktemp -d /tmp/ployz-gw-bench.XXXXXX)
IP=10.239.77.2

for c in caddy wrk pebble openssl jq musl-gcc; do command -v $c >/dev/null || { echo "$c missing: scripts/setup" >&2; exit 1; }; done
[ -x "$BIN/ployzd" ] || cargo build --locked --release -p ployzd -p ployzctl

pids=()
cleanup() {
  [ -S "$W/ployzd.sock" ] && timeout 60 "$BIN/ployzctl" --socket "$W/ployzd.sock" service rm web >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del $NS 2>/dev/null || true
  ip link del plzgwb0 2>/dev/null || true
  rm -rf "/etc/netns/$NS"
  rm -rf "$W"
}
trap cleanup EXIT

ip netns add $NS
ip link add plzgwb0 type veth peer name eth0 netns $NS
ip addr add 10.239.77.1/24 dev plzgwb0 && ip link set plzgwb0 up
ip netns exec $NS sh -c "ip link set lo up && ip addr add $IP/24 dev eth0 && ip link set eth0 up"
mkdir -p /etc/netns/$NS && printf '127.0.0.1 localhost\n%s bench.test\n' $IP >/etc/netns/$NS/hosts
inns() { ip netns exec $NS "$@"; }
ctl() { "$BIN/ployzctl" --socket "$W/ployzd.sock" "$@"; }

# ployzd (as scripts/local-cluster starts it: its own /run/wireguard).
nsenter --net=/run/netns/$NS unshare --mount --propagation private \
  sh -c 'mkdir -p /run/wireguard && mount -t tmpfs ployz-wg /run/wireguard && exec "$0" "$@"' \
  "$BIN/ployzd" --data-dir "$W/data" --socket "$W/ployzd.sock" run --advertise-ip $IP \
  --metrics-listen off --ui-listen off >"$W/ployzd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$W/ployzd.sock" ] && break; sleep 0.1; done
ctl mesh init gwbench >/dev/null
if [ "$BACKEND_KIND" = busybox ]; then
  ./scripts/busybox-image "$W/busybox.tar" >/dev/null
else
  musl-gcc -static -O2 -pthread -o "$W/keepalive-backend" benches/keepalive-backend.c
  EXTRA_BIN=$W/keepalive-backend ./scripts/busybox-image "$W/busybox.tar" keepalive-backend 8080 >/dev/null
fi
ctl deploy service web --image "$W/busybox.tar" --wait-secs 120 >/dev/null
BACKEND=$(ctl --json service ls | jq -r '.services[0].instances[0].overlay_ip'):8080

# pebble (validation skipped: PEBBLE_VA_ALWAYS_VALID) for the gateway's certificate.
(cd "$W" && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
   -out ca.pem -days 1 -subj /CN=bench-ca 2>/dev/null &&
 openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout leaf.key -out leaf.csr \
   -subj /CN=pebble 2>/dev/null &&
 printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' $IP >ext &&
 openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 1 \
   -extfile ext 2>/dev/null)
cat >"$W/pebble.json" <<JSON
{"pebble": {"listenAddress": "$IP:14000", "managementListenAddress": "$IP:15000",
 "certificate": "$W/leaf.pem", "privateKey": "$W/leaf.key", "httpPort": 80, "tlsPort": 443,
 "ocspResponderURL": "", "externalAccountBindingRequired": false}}
JSON
PEBBLE_VA_ALWAYS_VALID=1 PEBBLE_VA_NOSLEEP=1 inns pebble -config "$W/pebble.json" >"$W/pebble.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do inns curl -s --cacert "$W/ca.pem" "https://$IP:14000/dir" >/dev/null && break; sleep 0.1; done
ctl acme set --directory "https://$IP:14000/dir" --email bench@example.test --ca-file "$W/ca.pem" >/dev/null
ctl route add bench.test --service web --port 8080 --tls acme >/dev/null
ctl route add plain.test --service web --port 8080 >/dev/null
for _ in $(seq 120); do
  [ "$(ctl --json route ls | jq -r '.routes[0].certificate_expires')" != null ] && break; sleep 1
done

# Caddy in front of the same instance (its log: warnings only).
cat >"$W/Caddyfile" <<CADDY
{
	admin off
	http_port 8082
	https_port 8443
	auto_https disable_redirects
	skip_install_trust
	storage file_system $W/caddy
}
# Caddy keeps 32 idle backend connections per host by default; the gateway
# keeps 256. Both get 256 so neither reconnects under -c64.
(pool) {
	transport http {
		keepalive 90s
		keepalive_idle_conns_per_host 256
	}
}
:8081 {
	reverse_proxy $BACKEND {
		import pool
	}
}
bench.test:8443 {
	tls internal
	reverse_proxy $BACKEND {
		import pool
	}
}
CADDY
HOME=$W inns caddy run --config "$W/Caddyfile" --adapter caddyfile >"$W/caddy.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do inns curl -s -o /dev/null "http://$IP:8081/" && break; sleep 0.1; done
for url in "-H Host:plain.test http://$IP/index.html" "http://$IP:8081/index.html" \
           "-k https://bench.test/index.html" "-k https://bench.test:8443/index.html"; do
  # shellcheck disable=SC2086
  body=$(inns curl -sf $url) || { echo "no answer from $url" >&2; tail -5 "$W"/*.log >&2; exit 1; }
  [ "$body" = "hello from a ployz workload" ] || { echo "$url: $body" >&2; exit 1; }
done

# wrk: "Requests/sec", and the 50% / 99% lines of --latency (converted to ms).
bench() { # name, wrk args...
  local name=$1; shift
  inns wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency "$@" >"$W/wrk.out"
  local rps p50 p99
  rps=$(awk '/^Requests\/sec/ {print $2}' "$W/wrk.out")
  ms() { awk -v k="$1" '$1==k {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}' "$W/wrk.out"; }
  p50=$(ms 50%); p99=$(ms 99%)
  echo "$name $rps $p50 $p99" | tee -a "$W/results"
  # Errors and non-2xx answers make a figure suspect: shown on stderr.
  if grep -E 'Socket errors|Non-2xx' "$W/wrk.out" >&2; then echo "  ^ $name: wrk saw errors" >&2; fi
}
echo "run name requests/s p50_ms p99_ms"
pair() { # round, proto, gateway wrk args | caddy wrk args (gateway first on odd rounds)
  local r=$1 proto=$2; shift 2
  local g=() c=() side=g
  for a in "$@"; do
    if [ "$a" = "|" ]; then side=c; elif [ $side = g ]; then g+=("$a"); else c+=("$a"); fi
  done
  if [ $((r % 2)) = 1 ]; then
    echo -n "$r "; bench "$proto-gateway" "${g[@]}"; echo -n "$r "; bench "$proto-caddy" "${c[@]}"
  else
    echo -n "$r "; bench "$proto-caddy" "${c[@]}"; echo -n "$r "; bench "$proto-gateway" "${g[@]}"
  fi
}
# One warm-up second each (connections, pools, TLS sessions), not counted.
for u in "-H Host:plain.test http://$IP/index.html" "http://$IP:8081/index.html" \
         "https://bench.test/index.html" "https://bench.test:8443/index.html"; do
  # shellcheck disable=SC2086
  inns wrk -t"$THREADS" -c"$CONNS" -d1s $u >/dev/null
done
for r in $(seq "$RUNS"); do
  pair "$r" http -H "Host: plain.test" "http://$IP/index.html" "|" "http://$IP:8081/index.html"
  pair "$r" tls "https://bench.test/index.html" "|" "https://bench.test:8443/index.html"
done
echo
echo "medians over $RUNS rounds (wrk -t$THREADS -c$CONNS -d${SECS}s, backend $BACKEND_KIND):"
med() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for proto in http tls; do
  g=$(awk -v n=$proto-gateway '$1==n' "$W/results"); c=$(awk -v n=$proto-caddy '$1==n' "$W/results")
  grps=$(awk '{print $2}' <<<"$g" | med); gp50=$(awk '{print $3}' <<<"$g" | med); gp99=$(awk '{print $4}' <<<"$g" | med)
  crps=$(awk '{print $2}' <<<"$c" | med); cp50=$(awk '{print $3}' <<<"$c" | med); cp99=$(awk '{print $4}' <<<"$c" | med)
  # Per-round ratios (gateway/caddy of the same round), then their medians.
  ratios=$(paste <(awk '{print $2, $4}' <<<"$g") <(awk '{print $2, $4}' <<<"$c") |
    awk '{printf "%.3f %.3f\n", $1/$3, $2/$4}')
  rr=$(awk '{print $1}' <<<"$ratios" | med); pr=$(awk '{print $2}' <<<"$ratios" | med)
  printf '%-4s gateway %10s req/s  p50 %7s ms  p99 %7s ms\n' $proto "$grps" "$gp50" "$gp99"
  printf '%-4s caddy   %10s req/s  p50 %7s ms  p99 %7s ms\n' $proto "$crps" "$cp50" "$cp99"
  echo "$proto per-round ratios gateway/caddy, req/s:p99:" $(awk '{printf "%s:%s ", $1, $2}' <<<"$ratios")
  printf '%-4s median of per-round ratios: requests/s %.2fx (target >= 1.0), p99 %.2fx (target <= 1.0)\n' $proto "$rr" "$pr"
done
