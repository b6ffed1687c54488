#!/usr/bin/env bash
# Regenerates crates/sidecar/hot-text.ld, the sidecar's code layout
# (bench/src/hot_text.rs): `make hot-text`.
#
# 1. Builds the release sidecar with a link map (CHAPERONE_LINK_MAP) and the
#    harness binaries.
# 2. Profiles chaperone-bench's workloads (start, controller stream and a
#    1,000-tool snapshot, 10,000 sessions, tools/call with the assertion and
#    audit shipping, /metrics) twice: under callgrind, which sees every
#    function that runs, even once; and natively under perf, which sees the
#    CPU-specific code callgrind's emulated CPU never selects.
# 3. Writes the script, rebuilds the sidecar with it, and prints the RSS.
# Needs valgrind; perf where installed (without it the native-only functions
# are missing from the layout, and the script says so). ≈ 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$PWD/.tmp/hot-text
bins=$work/bin
script=crates/sidecar/hot-text.ld

command -v valgrind >/dev/null && command -v callgrind_control >/dev/null || {
  echo "hot-text: needs valgrind (Debian: apt-get install valgrind)" >&2
  exit 1
}
rm -rf "$work"
mkdir -p "$bins"

cargo build --release --locked -p chaperone-bench
CHAPERONE_LINK_MAP=$work/sidecar.map \
  cargo build --release --locked -p chaperone-sidecar --bin chaperone-sidecar
for bin in chaperone-bench chaperone-sidecar bare-proxy mcp-echo hot-text; do
  cp target/release/$bin "$bins/"
done

# The harness stops a wrapper, not the sidecar under it: wait for the last
# one to end before the next run takes its ports.
wait_for_sidecars() {
  for _ in $(seq 300); do
    pgrep -f "$bins/chaperone-sidecar" >/dev/null || return 0
    sleep 0.1
  done
  pkill -KILL -f "$bins/chaperone-sidecar" || true
}

profile() { # MODE, then chaperone-bench's arguments
  local mode=$1
  shift
  echo "== $mode: chaperone-bench $*" >>"$work/runs.log"
  CHAPERONE_BENCH_WRAP="bash $PWD/bench/profile-wrap.sh $mode $work/$mode" \
    "$bins/chaperone-bench" "$@" >>"$work/runs.log" 2>&1 || {
    echo "hot-text: chaperone-bench $* under $mode failed; the end of $work/runs.log:" >&2
    tail -20 "$work/runs.log" >&2
    exit 1
  }
  wait_for_sidecars
}

echo "hot-text: profiling under callgrind (slow)…"
slow_run=(1 2 50 2 1)
native_run=(1 5 1000 8 2)
profile callgrind --rss-only
profile callgrind "${slow_run[@]}"
perf_inputs=()
if command -v perf >/dev/null && perf record -q -o /dev/null true 2>/dev/null; then
  echo "hot-text: profiling natively under perf…"
  profile perf --rss-only
  profile perf "${native_run[@]}"
  for data in "$work"/perf.*.data; do
    perf script -i "$data" -F ip,sym --no-demangle 2>/dev/null >"$data.syms"
    perf_inputs+=("$data.syms")
  done
  native="perf samples (20 kHz) of --rss-only and chaperone-bench ${native_run[*]} run natively"
else
  native="no perf here: CPU-specific code chosen at run time is not in this layout"
fi

provenance="From: commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo ' + working tree'), $(date -u +%F), $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs).
Runs: chaperone-bench --rss-only and chaperone-bench ${slow_run[*]} under
callgrind (every function run); ${native}."
"$bins/hot-text" --map "$work/sidecar.map" \
  --callgrind "$work"/callgrind.* ${perf_inputs[@]+--perf "${perf_inputs[@]}"} \
  --provenance "$provenance" --out "$script"

cargo build --release --locked -p chaperone-sidecar --bin chaperone-sidecar
cp target/release/chaperone-sidecar "$bins/"
"$bins/chaperone-bench" --rss-only | grep -E '^Sidecar RSS'
