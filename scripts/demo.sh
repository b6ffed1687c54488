#!/usr/bin/env bash
# `make demo`: a real local control plane (etcd + kube-apiserver from `make tools`),
# Chaperone's CRDs, the examples applied, and what kubectl shows of them.
# Everything it starts stops when it ends or on Ctrl-C.
# DEMO_HOLD=1 keeps the control plane up until Ctrl-C so you can explore with
# `KUBECONFIG=.tmp/demo/kubeconfig kubectl …`.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
eval "$(bash scripts/tools.sh env)"
kubectl() { "$CHAPERONE_KUBECTL" "$@"; }

say "Building chaperonectl and the local control plane runner"
cargo build -q -p chaperone-cli -p chaperone-testenv --bins
bin=target/debug

work=.tmp/demo
rm -rf "$work"; mkdir -p "$work"
export KUBECONFIG="$PWD/$work/kubeconfig"

# The runner stops the control plane when this script's end of the FIFO closes,
# however the script ends.
mkfifo "$work/hold"
"$bin/chaperone-testenv" up --kubeconfig "$KUBECONFIG" < "$work/hold" &
runner=$!
exec 9> "$work/hold"
cleanup() { exec 9>&-; wait "$runner" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Starting etcd and kube-apiserver on loopback"
for _ in $(seq 1 600); do
  [ -s "$KUBECONFIG" ] && break
  kill -0 "$runner" 2>/dev/null || { echo "the control plane failed to start (see above)" >&2; exit 1; }
  sleep 0.2
done
kubectl version 2>/dev/null | sed 's/^/  /'

say "Installing the CRDs (generated from crates/api by 'make crds')"
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established --timeout=60s -f crds/ >/dev/null

say "Applying examples/basic"
kubectl apply -f examples/basic/agentidentity.yaml -f examples/basic/toolpolicy.yaml

say "An invalid ToolPolicy is refused by the API server, naming the rule it breaks"
kubectl apply -f - <<'YAML' || true
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: { name: broken, namespace: default }
spec:
  targetRefs: [{ name: support-agent }]
  rules:
  - name: refunds
    action: deny
    tools: [{ server: orders, name: refund }]
    rateLimit: { calls: 5, periodSeconds: 60 }
YAML

say "kubectl get chaperone (the category of all three kinds)"
kubectl get agentidentities,toolpolicies,delegationgrants -A

say "kubectl explain toolpolicy.spec.rules.when.args"
kubectl explain toolpolicy.spec.rules.when.args | sed -n '1,25p'

if [ -f examples/basic/policy-test.yaml ] && "$bin/chaperonectl" policy --help >/dev/null 2>&1; then
  say "chaperonectl policy test examples/basic/policy-test.yaml"
  "$bin/chaperonectl" policy test examples/basic/policy-test.yaml
fi

if [ -n "${DEMO_HOLD:-}" ]; then
  say "Control plane is up: KUBECONFIG=$KUBECONFIG kubectl get chaperone -A   (Ctrl-C to stop)"
  wait "$runner"
fi
say "Done; stopping the control plane"
