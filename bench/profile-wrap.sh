#!/usr/bin/env bash
# Runs a sidecar under a profiler for `make hot-text` (bench/hot-text.sh), as
# chaperone-bench's CHAPERONE_BENCH_WRAP:
#   profile-wrap.sh callgrind|perf OUT PROGRAM [ARGS...]
# callgrind writes OUT.<pid>.<n> (dumped every second: the harness kills
# this wrapper, not the profiler, when it is done with the sidecar); perf
# writes OUT.<pid>.data. When this wrapper is killed, the profile is
# finished and the sidecar stopped.
set -uo pipefail
mode=$1 out=$2
shift 2
case "$mode" in
callgrind)
  valgrind --tool=callgrind --demangle=no --dump-instr=no \
    --callgrind-out-file="$out.%p" "$@" &
  ;;
perf)
  perf record -q -F 20000 -o "$out.$$.data" -- "$@" &
  ;;
*)
  echo "usage: profile-wrap.sh callgrind|perf OUT PROGRAM [ARGS...]" >&2
  exit 2
  ;;
esac
child=$!
wrapper=$$
(
  while kill -0 "$wrapper" 2>/dev/null && kill -0 "$child" 2>/dev/null; do
    [ "$mode" = callgrind ] && callgrind_control -d "$child" >/dev/null 2>&1
    sleep 1
  done
  if [ "$mode" = callgrind ]; then
    callgrind_control -d "$child" >/dev/null 2>&1
    kill -TERM "$child" 2>/dev/null
  else
    # perf stops, writes its file, and ends the sidecar.
    kill -INT "$child" 2>/dev/null
  fi
  for _ in $(seq 100); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$child" 2>/dev/null
) &
wait "$child"
