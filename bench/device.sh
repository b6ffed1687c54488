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
#           over 8 connections and 5,000 calls/s over 16, plus one worker
#           with every assertion signed on the call's path
#           (CHAPERONE_SIGNING_NONCES=0, as before 6fc4ec6) at both rates,
#           and writes each pass's tables and log to $OUT (defaults 2 8 3:
#           ≈ 8 minutes).
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
  runs=${2:-2} fixed=${3:-8} closed=${4:-3}
  out=${OUT:-.tmp/bench-out}
  mkdir -p "$out"
  cores=$(nproc)
  {
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "date: $(date -u +%FT%TZ)"
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\))'
    uptime
  } > "$out/machine.txt"
  # workers, rate, connections, signing nonces kept ahead (1024: the default)
  # (most telling first: a run cut short still leaves the passes before)
  for pass in "1 1000 8 1024" "$cores 1000 8 1024" "1 1000 8 0" \
    "1 5000 16 1024" "$cores 5000 16 1024" "1 5000 16 0"; do
    read -r workers rate conns nonces <<<"$pass"
    file="$out/workers${workers}-rate${rate}-nonces${nonces}.md"
    echo "== CHAPERONE_SIGNING_NONCES=$nonces chaperone-bench --workers $workers $runs $fixed $rate $conns $closed" | tee "$file"
    CHAPERONE_SIGNING_NONCES=$nonces \
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
