#!/usr/bin/env bash
# The sidecar benchmark on a quiet machine with more cores (issue #21's
# goals), as one prepared script for the session's device machine.
#
# Here:   bash bench/device.sh stage
#           builds the release binaries as the image builds them and copies
#           the four the harness starts into .tmp/bench-bin (ignored by git,
#           ≈ 45 MB: carry it).
# There:  bash bench/device.sh run [RUNS FIXED_SECONDS CLOSED_SECONDS]
#           (device tool: command "bash bench/device.sh run", carry
#           [".tmp/bench-bin"], timeout_s 600) runs chaperone-bench with
#           both proxies on one runtime worker (the injected default) and on
#           one per core (what both ran before 15419e5), at 1,000 calls/s
#           over 8 connections and 5,000 calls/s over 16, and writes each
#           pass's tables and log to $OUT (defaults 2 10 4: ≈ 7 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=.tmp/bench-bin

case "${1:-}" in
stage)
  # The sidecar last, on its own: built with the harness, it would get the
  # features the harness's other dependencies switch on.
  cargo build --release --locked -p chaperone-bench
  cargo build --release --locked -p chaperone-sidecar --bin chaperone-sidecar
  mkdir -p "$bins"
  for bin in chaperone-bench chaperone-sidecar bare-proxy mcp-echo; do
    cp target/release/$bin "$bins/"
  done
  du -sh "$bins"
  ;;
run)
  runs=${2:-2} fixed=${3:-10} closed=${4:-4}
  out=${OUT:-.tmp/bench-out}
  mkdir -p "$out"
  cores=$(nproc)
  {
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "date: $(date -u +%FT%TZ)"
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\))'
    uptime
  } > "$out/machine.txt"
  for pass in "1 1000 8" "$cores 1000 8" "1 5000 16" "$cores 5000 16"; do
    read -r workers rate conns <<<"$pass"
    file="$out/workers${workers}-rate${rate}.md"
    echo "== chaperone-bench --workers $workers $runs $fixed $rate $conns $closed" | tee "$file"
    "$bins/chaperone-bench" --workers "$workers" "$runs" "$fixed" "$rate" "$conns" "$closed" \
      >>"$file" 2>&1 || echo "chaperone-bench failed: $?" >>"$file"
    grep -E '^Chaperone over the bare hop' "$file" || true
  done
  ;;
*)
  echo "usage: bash bench/device.sh stage | run [RUNS FIXED_SECONDS CLOSED_SECONDS]" >&2
  exit 2
  ;;
esac
