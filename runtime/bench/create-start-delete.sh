#!/usr/bin/env bash
# create+start+wait+delete of one busybox bundle running /bin/true, N times each with
# ployz's host runtime (runtime/examples/rt.rs on libcontainer), crun and runc.
# Prints the median wall time per runtime and the ratios to crun and runc. Runs are
# interleaved (ours, crun, runc, ours, ...) so background load skews none of them.
#
# Two rows for ours:
#   ours      the way ployzd runs it: one long-lived engine (`rt serve`) that creates
#             through its single-threaded zygote helper (RT_HELPER=1), driven over a
#             pipe; the span is from writing the container id to reading the answer.
#   ours-cli  a fresh `rt` process per container (exec, engine set-up, create in
#             process), the way crun and runc are used: like for like with a CLI.
#
# Needs root, busybox-static, runc, crun, python3, and the example built:
#   cargo build --release -p ployz-runtime --example rt
# usage: [GAP_MS=200] runtime/bench/create-start-delete.sh [N]   (RT_BIN=path/to/rt to override)
#
# crun 1.8 refuses this host's hybrid cgroup layout (v1 controllers plus a cgroup2
# mount at /sys/fs/cgroup/unified), so all three runtimes run alike in a private
# mount namespace whose /sys/fs/cgroup holds only the v1 hierarchies.
set -euo pipefail

N=${1:-20}
# Idle time before each run (GAP_MS=200: every run starts from a quiet machine, like a
# daemon creating one workload now and then; 0: back to back, warm).
GAP_MS=${GAP_MS:-0}
HERE=$(cd "$(dirname "$0")" && pwd)
TARGET=${CARGO_TARGET_DIR:-$HERE/../../target}
RT_BIN=${RT_BIN:-$TARGET/x86_64-unknown-linux-musl/release/examples/rt}

if [[ -z "${PLOYZ_BENCH_IN_NS:-}" ]]; then
  [[ $EUID -eq 0 ]] || { echo "run as root" >&2; exit 1; }
  for tool in runc crun python3 /bin/busybox; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y runc crun busybox-static python3" >&2; exit 1; }
  done
  [[ -x $RT_BIN ]] || { echo "missing $RT_BIN: cargo build --release -p ployz-runtime --example rt" >&2; exit 1; }
  export PLOYZ_BENCH_IN_NS=1 RT_BIN GAP_MS
  exec unshare -m --propagation private "$0" "$N"
fi

# Inside the private mount namespace: a fresh /sys/fs/cgroup holding only the v1
# hierarchies (unmounting /sys/fs/cgroup/unified is not enough: crun still sees the
# directory and picks hybrid mode). The original tree is detached first: left shadowed
# under the new tmpfs it would still be listed in mountinfo, and libcontainer would
# bind every hierarchy into each container twice (a real v1 host lists each once).
old=$(mktemp -d /tmp/ployz-bench-cg.XXXXXX)
mount --rbind /sys/fs/cgroup "$old"
umount -l /sys/fs/cgroup
mount -t tmpfs -o mode=755 ployz-bench-cgroup /sys/fs/cgroup
for c in $(awk -v o="$old/" '$3 == "cgroup" && index($2, o) == 1 {print substr($2, length(o) + 1)}' /proc/self/mounts); do
  mkdir -p "/sys/fs/cgroup/$c"
  mount --bind "$old/$c" "/sys/fs/cgroup/$c"
done
umount -l "$old" && rmdir "$old"

work=$(mktemp -d /tmp/ployz-bench.XXXXXX)
# Closing its stdin ends `rt serve` (and its zygote) before the state goes.
trap '[[ -n ${OURS_PID:-} ]] && { exec {OURS[1]}>&-; wait "$OURS_PID"; }; rm -rf "$work"' EXIT
bundle=$work/bundle
mkdir -p "$bundle"/rootfs/{bin,proc,dev,sys,tmp}
cp /bin/busybox "$bundle/rootfs/bin/busybox"
for t in sh true; do ln -s busybox "$bundle/rootfs/bin/$t"; done
(cd "$bundle" && runc spec)
python3 - "$bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["args"] = ["/bin/true"]
c["process"]["terminal"] = False
json.dump(c, open(p, "w"), indent=2)
PY

declare -A times median
# One round runs every runtime once, in a random order: load from other work on the
# machine (a build, say) lands on all of them alike, and none always runs right after
# the same neighbour (the kernel's cgroup-attach lock is cheaper shortly after another
# attach, so a fixed order favours whoever follows a runtime that attaches late).
run_rounds() { # names...
  local i name t0 t1
  for ((i = 0; i < N; i++)); do
    for name in $(shuf -e "$@"); do
      ((GAP_MS > 0)) && sleep "$(awk -v g="$GAP_MS" 'BEGIN {print g / 1000}')"
      # bash's own microsecond clock: no `date` process inside the measured span.
      t0=${EPOCHREALTIME/./}
      "$name" "bench-$name-$i" </dev/null >/dev/null
      t1=${EPOCHREALTIME/./}
      times[$name]+="$((t1 - t0)) "
    done
  done
}
report() { # name
  local name=$1 sorted
  sorted=$(printf '%s\n' ${times[$name]} | sort -n)
  median[$name]=$(awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2] + a[NR/2+1]) / 2)}' <<<"$sorted")
  printf '%-8s median %8.2f ms  (N=%d, min %.2f ms, max %.2f ms)\n' "$name" \
    "$(awk -v m="${median[$name]}" 'BEGIN {print m / 1000}')" "$N" \
    "$(head -1 <<<"$sorted" | awk '{print $1/1000}')" \
    "$(tail -1 <<<"$sorted" | awk '{print $1/1000}')"
}

# The long-lived engine, as in ployzd. Its fds stay in this shell (not a subshell).
coproc OURS { RT_HELPER=1 exec "$RT_BIN" serve "$work/ours" "$bundle"; }
ours() {
  local answer
  echo "$1" >&"${OURS[1]}"
  read -r answer <&"${OURS[0]}" || { echo "rt serve ended" >&2; exit 1; }
  [[ $answer == "ok 0" ]] || { echo "ours: $answer" >&2; exit 1; }
}
ours-cli() { "$RT_BIN" "$work/ours-cli" "$1" "$bundle"; }
crun() { command crun --root "$work/crun" run --bundle "$bundle" "$1"; }
runc() { command runc --root "$work/runc" run --bundle "$bundle" "$1"; }

run_rounds ours ours-cli crun runc
for name in ours ours-cli crun runc; do report "$name"; done

awk -v o="${median[ours]}" -v l="${median[ours-cli]}" -v c="${median[crun]}" -v r="${median[runc]}" \
  'BEGIN { printf "ratio ours/crun %.2f\nratio ours/runc %.2f\nratio ours-cli/crun %.2f\n", o / c, o / r, l / c }'
