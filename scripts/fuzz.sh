#!/usr/bin/env bash
# Fuzzes the sidecar's parsing seams with cargo-fuzz (targets in fuzz/, its
# own workspace; see SECURITY.md, "Fuzzing and differential testing"):
#   request   agent POST bodies: intake, strict parse, classify, forwarded bytes
#   sse_list  upstream event streams in arbitrary chunks through list filtering
#
# Usage: scripts/fuzz.sh [TARGET...]        (default: every target)
#   FUZZ_SECONDS   seconds per target (default 20: a smoke run)
#   FUZZ_SANITIZER address (default where it builds) or none
#
# First it replays fuzz/regressions/<target>/* (each must pass), then fuzzes
# with fuzz/seeds/<target> and the working corpus fuzz/corpus/<target>
# (ignored by git). A crash leaves its input in fuzz/artifacts/<target>/ and
# fails the script: copy it into fuzz/regressions/<target>/ with the fix.
#
# Needs a nightly toolchain (used when rustup has one; else the pinned one with
# RUSTC_BOOTSTRAP=1) and cargo-fuzz, installed on first use into
# ${CHAPERONE_TOOLS_DIR:-~/.cache/chaperone/tools}/cargo-fuzz/<version>/.
# Not part of `make test`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR="$ROOT/fuzz"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-20}
CARGO_FUZZ_VERSION=${CARGO_FUZZ_VERSION:-0.13.2}
TOOLS_DIR=${CHAPERONE_TOOLS_DIR:-$HOME/.cache/chaperone/tools}
CARGO_FUZZ_ROOT="$TOOLS_DIR/cargo-fuzz/$CARGO_FUZZ_VERSION"
ALL_TARGETS=(request sse_list)

log() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'fuzz.sh: %s\n' "$*" >&2; exit 1; }

if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi
for target in "${TARGETS[@]}"; do
  [ -f "$FUZZ_DIR/fuzz_targets/$target.rs" ] || fail "no fuzz target $target (have: ${ALL_TARGETS[*]})"
done

# Toolchain: cargo-fuzz needs nightly flags (-Zsanitizer, sancov passes).
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  CARGO=(cargo +nightly)
else
  log "no nightly toolchain: using the pinned one with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  CARGO=(cargo)
fi

if [ ! -x "$CARGO_FUZZ_ROOT/bin/cargo-fuzz" ]; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $CARGO_FUZZ_ROOT"
  "${CARGO[@]}" install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$CARGO_FUZZ_ROOT"
fi
export PATH="$CARGO_FUZZ_ROOT/bin:$PATH"

cd "$FUZZ_DIR"
# Release build with debug assertions (integer overflow panics too).
BUILD_FLAGS=(--release --debug-assertions)
if [ -n "${FUZZ_SANITIZER:-}" ]; then
  BUILD_FLAGS+=(--sanitizer "$FUZZ_SANITIZER")
elif ! nice -n 10 "${CARGO[@]}" fuzz build "${BUILD_FLAGS[@]}" >&2; then
  log "the AddressSanitizer build failed: building without a sanitizer"
  BUILD_FLAGS+=(--sanitizer none)
fi
nice -n 10 "${CARGO[@]}" fuzz build "${BUILD_FLAGS[@]}" >&2

summary=()
for target in "${TARGETS[@]}"; do
  shopt -s nullglob
  regressions=("$FUZZ_DIR/regressions/$target"/*)
  shopt -u nullglob
  if [ "${#regressions[@]}" -gt 0 ]; then
    log "$target: replaying ${#regressions[@]} regression inputs"
    "${CARGO[@]}" fuzz run "${BUILD_FLAGS[@]}" "$target" "${regressions[@]}" >&2 \
      || fail "$target: a regression input fails again (see above)"
  fi
  mkdir -p "corpus/$target"
  log "$target: fuzzing for ${SECONDS_PER_TARGET}s"
  started=$(date +%s)
  stats=$(mktemp)
  set +e
  nice -n 10 "${CARGO[@]}" fuzz run "${BUILD_FLAGS[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -dict=json.dict -max_len=4096 -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 \
    2>&1 | tee "$stats" | grep -E 'ERROR|panicked|Done|SUMMARY' >&2
  status=${PIPESTATUS[0]}
  set -e
  runs=$(grep -oE 'Done [0-9]+ runs' "$stats" | awk '{s += $2} END {print s + 0}')
  rm -f "$stats"
  summary+=("$target: $(( $(date +%s) - started ))s, $runs executions, exit $status")
  if [ "$status" -ne 0 ]; then
    printf '%s\n' "${summary[@]}" >&2
    fail "$target found a failing input: see fuzz/artifacts/$target/"
  fi
done
printf '%s\n' "${summary[@]}"
