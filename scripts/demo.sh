#!/usr/bin/env bash
# `make demo`: a real local control plane (etcd + kube-apiserver from `make tools`),
# Chaperone's CRDs, the controller, two MCP tool servers and the support agent's
# sidecar as local processes with real ServiceAccount tokens, then a scripted
# agent session whose calls are allowed or denied by examples/basic's policy,
# a refund held until a person approves it (chaperonectl approval, as a user
# with the chart's approver role); then examples/delegation: planner → billing worker → billing through both
# agents' sidecars, and `chaperonectl audit verify` over their joined audit logs; last, tool
# definition pinning: a changed tool hidden and refused until `chaperonectl tools pin` accepts it.
# Everything it starts stops when it ends or on Ctrl-C.
# DEMO_HOLD=1 keeps everything up until Ctrl-C so you can explore with
# `KUBECONFIG=.tmp/demo/kubeconfig kubectl …`. Logs: .tmp/demo/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
eval "$(bash scripts/tools.sh env)"
kubectl() { "$CHAPERONE_KUBECTL" "$@"; }

bins=(chaperone-cli chaperone-testenv chaperone-controller chaperone-sidecar chaperone-demo)
target="${CARGO_TARGET_DIR:-target}"
bin="$target/debug"
say "Building chaperonectl, the control plane runner, the controller, the sidecar and the demo"
if [ ! -x "$bin/chaperone-demo" ]; then
  echo "  (the first build compiles the whole workspace: several minutes; later runs take seconds)"
fi
# Cargo's own progress (one line per crate) shows during the first, slow build.
cargo build $(printf -- '-p %s ' "${bins[@]}") --bins 2>&1 | sed 's/^ */  /' \
  || { echo "error: cargo build failed (see above)" >&2; exit 1; }

work=.tmp/demo
rm -rf "$work"; mkdir -p "$work"
export KUBECONFIG="$PWD/$work/kubeconfig"

# Processes started below, stopped in reverse order on exit (TERM, then KILL).
pids=()
names=()
start() { # start NAME LOG CMD…: runs CMD in the background, stdout+stderr to LOG
  local name=$1 log=$2; shift 2
  "$@" > "$log" 2>&1 &
  pids+=("$!"); names+=("$name")
}

# The runner stops the control plane when this script's end of the FIFO closes,
# however the script ends.
mkfifo "$work/hold"
"$bin/chaperone-testenv" up --kubeconfig "$KUBECONFIG" < "$work/hold" &
runner=$!
exec 9> "$work/hold"
cleanup() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  exec 9>&-; wait "$runner" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# fail MESSAGE [LOG]: says what failed and where its log is, with the log's tail.
fail() {
  echo "error: $1" >&2
  if [ -n "${2:-}" ] && [ -f "$2" ]; then
    echo "--- last lines of $2:" >&2; tail -n 20 "$2" | sed 's/^/  /' >&2
  fi
  exit 1
}
# wait_until DESCRIPTION SECONDS PID LOG CMD…: polls CMD until it succeeds; fails
# when PID exits or time runs out.
wait_until() {
  local what=$1 secs=$2 pid=$3 log=$4; shift 4
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || fail "$what: the process exited (log: $log)" "$log"
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${secs}s (log: $log)" "$log"
    sleep 0.2
  done
}
# Free loopback ports for the controller, the tool servers and the sidecar.
read -r grpc_port admin_port webhook_port orders_port mail_port sidecar_port sidecar_admin_port \
  billing_port worker_app_port worker_port worker_inbound_port worker_admin_port planner_port planner_admin_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(14)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

say "Starting etcd and kube-apiserver on loopback"
for _ in $(seq 1 600); do
  [ -s "$KUBECONFIG" ] && break
  kill -0 "$runner" 2>/dev/null || { echo "the control plane failed to start (see above)" >&2; exit 1; }
  sleep 0.2
done
[ -s "$KUBECONFIG" ] || fail "the control plane did not start within 120s"
kubectl version 2>/dev/null | sed 's/^/  /'

say "Installing the CRDs (generated from crates/api by 'make crds')"
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established --timeout=60s -f crds/ >/dev/null

say "Applying examples/basic (tool server URLs pointed at the local tool servers)"
# The example's in-cluster URLs stay as they are; the demo applies a copy.
sed -e "s#http://orders.tools.svc:8080/mcp#http://127.0.0.1:$orders_port/mcp#" \
    -e "s#http://mail.tools.svc:8080/mcp#http://127.0.0.1:$mail_port/mcp#" \
    examples/basic/agentidentity.yaml > "$work/agentidentity.yaml"
grep -q "127.0.0.1:$orders_port" "$work/agentidentity.yaml" \
  || fail "examples/basic/agentidentity.yaml no longer has the URLs this script rewrites"
kubectl apply -f "$work/agentidentity.yaml" -f examples/basic/toolpolicy.yaml

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

if [ -f examples/basic/policy-test.yaml ] && "$bin/chaperonectl" policy --help >/dev/null 2>&1; then
  say "chaperonectl policy test examples/basic/policy-test.yaml (offline, no cluster)"
  "$bin/chaperonectl" policy test examples/basic/policy-test.yaml
fi

say "Starting chaperone-controller (gRPC 127.0.0.1:$grpc_port, admin 127.0.0.1:$admin_port)"
kubectl create namespace chaperone-system >/dev/null
start controller "$work/controller.log" "$bin/chaperone-controller" \
  --namespace chaperone-system --pod-name chaperone-controller-demo \
  --grpc-addr "127.0.0.1:$grpc_port" --admin-addr "127.0.0.1:$admin_port" \
  --webhook-addr "127.0.0.1:$webhook_port" --extra-san localhost,127.0.0.1 \
  --ca-file "$PWD/$work/ca.crt" --log-format text
wait_until "the controller's /readyz" 60 "${pids[-1]}" "$work/controller.log" \
  curl -sf "http://127.0.0.1:$admin_port/readyz"
wait_until "the controller's CA file" 30 "${pids[-1]}" "$work/controller.log" test -s "$work/ca.crt"
echo "  ready; CA for the sidecar in $work/ca.crt, log in $work/controller.log"

say "Starting the MCP tool servers: orders on :$orders_port, mail on :$mail_port"
# --edits: the tool pinning scene changes a tool's definition through this file.
start orders "$work/orders.log" "$bin/chaperone-demo" tool-server --listen "127.0.0.1:$orders_port" --tools orders \
  --edits "$PWD/$work/orders-edits.json"
orders_pid=${pids[-1]}
start mail "$work/mail.log" "$bin/chaperone-demo" tool-server --listen "127.0.0.1:$mail_port" --tools mail
mail_pid=${pids[-1]}
wait_until "the orders tool server" 30 "$orders_pid" "$work/orders.log" grep -q listening "$work/orders.log"
wait_until "the mail tool server" 30 "$mail_pid" "$work/mail.log" grep -q listening "$work/mail.log"

say "The agent's pod and a real token (ServiceAccount token bound to the pod, audience chaperone)"
kubectl create serviceaccount support-agent -n default
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: Pod
metadata:
  name: support-agent-0
  namespace: default
  labels: { app: support-agent }
spec:
  serviceAccountName: support-agent
  containers:
    - name: agent
      image: example.com/support-agent:demo
YAML
pod_uid=$(kubectl get pod support-agent-0 -n default -o jsonpath='{.metadata.uid}')
kubectl create token support-agent -n default --audience chaperone --duration 1h \
  --bound-object-kind Pod --bound-object-name support-agent-0 --bound-object-uid "$pod_uid" \
  > "$work/token"
echo "  pod support-agent-0 (uid $pod_uid) stays Pending: no kubelet here; the sidecar runs locally"
echo "  token in $work/token"

say "Starting the agent's sidecar (MCP on 127.0.0.1:$sidecar_port, controller mode)"
# Standard output is the audit log (one JSON line per decision); logs go to stderr.
CHAPERONE_LISTEN="127.0.0.1:$sidecar_port" CHAPERONE_ADMIN_LISTEN="127.0.0.1:$sidecar_admin_port" \
CHAPERONE_CONTROLLER_ADDRESS="127.0.0.1:$grpc_port" CHAPERONE_CONTROLLER_SERVER_NAME=localhost \
CHAPERONE_TOKEN_FILE="$PWD/$work/token" CHAPERONE_CA_FILE="$PWD/$work/ca.crt" \
CHAPERONE_POD_NAME=support-agent-0 CHAPERONE_POD_NAMESPACE=default \
  "$bin/chaperone-sidecar" > "$work/sidecar-audit.log" 2> "$work/sidecar.log" &
pids+=("$!"); names+=(sidecar)
wait_until "the sidecar's first snapshot (/ready on its admin port)" 60 "${pids[-1]}" "$work/sidecar.log" \
  curl -sf "http://127.0.0.1:$sidecar_admin_port/ready"
echo "  $(curl -s "http://127.0.0.1:$sidecar_admin_port/ready")"

say "A scripted agent session through the sidecar (decisions from $work/sidecar-audit.log)"
"$bin/chaperone-demo" agent --sidecar "http://127.0.0.1:$sidecar_port" --audit-log "$work/sidecar-audit.log" \
  || fail "the agent session failed (logs: $work/sidecar.log, $work/orders.log, $work/mail.log)" "$work/sidecar.log"

say "What the tool servers saw: only allowed calls, each with a signed Chaperone-Assertion"
grep -h 'tools/call' "$work/orders.log" "$work/mail.log" \
  | sed -E 's/^.*(INFO|WARN) .*tools\/call /  /' || echo "  (no calls arrived)"

say "Human approval: a refund of 250 waits for a person (examples/basic: approve-medium-refunds)"
# The chart's approval webhook entry, pointed at the local controller: the API
# server asks it whether a user may decide, and it records who did.
kubectl apply -f - <<YAML
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: { name: chaperone-demo-approvals }
webhooks:
  - name: toolcallapprovals.approve.chaperone.dev
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Fail
    clientConfig:
      url: https://127.0.0.1:$webhook_port/approve-toolcallapprovals
      caBundle: $(base64 -w0 < "$work/ca.crt")
    rules:
      - { apiGroups: [chaperone.dev], apiVersions: [v1alpha1], operations: [CREATE], resources: [toolcallapprovals] }
      - { apiGroups: [chaperone.dev], apiVersions: [v1alpha1], operations: [UPDATE], resources: [toolcallapprovals/status] }
YAML
# The chart's RBAC, for its approver ClusterRole; alice may approve in default.
"$CHAPERONE_HELM" template chaperone charts/chaperone --namespace chaperone-system \
  --show-only templates/rbac.yaml | kubectl apply -f - >/dev/null
approver_role=$(kubectl get clusterroles -o name | sed -n 's#^clusterrole.rbac.authorization.k8s.io/\(.*-approver\)$#\1#p' | head -n 1)
[ -n "$approver_role" ] || fail "the chart rendered no approver ClusterRole"
kubectl create rolebinding refund-approvers -n default --clusterrole="$approver_role" --user=alice
# calls_in_background LOG: the agent looks the order up, then refunds 250.
calls_in_background() {
  "$bin/chaperone-demo" calls --sidecar "http://127.0.0.1:$sidecar_port" --server orders \
    'get_order {"id": "A-1001"}' 'refund {"orderId": "A-1001", "amount": 250}' > "$1" 2>&1 &
  call_pid=$!
}
# pending_approval: the name of the Pending ToolCallApproval, if any.
pending_approval() {
  kubectl get toolcallapprovals -n default \
    -o jsonpath='{range .items[?(@.status.phase=="Pending")]}{.metadata.name}{"\n"}{end}' | head -n 1
}
calls_in_background "$work/approval-1.log"
wait_until "the ToolCallApproval of the held refund" 15 "$call_pid" "$work/approval-1.log" \
  bash -c '[ -n "$("$0" get toolcallapprovals -n default -o name)" ]' "$CHAPERONE_KUBECTL"
sleep 1
echo "  the agent's call is held by its sidecar; a person is asked:"
"$bin/chaperonectl" approval list -n default | sed 's/^/  /'
name=$(pending_approval)
[ -n "$name" ] || fail "no Pending ToolCallApproval" "$work/controller.log"
echo; echo "  bob (no approver role) tries to approve it:"
"$bin/chaperonectl" approval approve "$name" -n default --as bob 2>&1 | sed 's/^/    /' || true
echo; echo "  alice (bound to $approver_role) approves it:"
"$bin/chaperonectl" approval approve "$name" -n default --as alice --message "customer called, ticket 4711" \
  | sed 's/^/    /'
wait "$call_pid" || true
echo; echo "  the agent's calls:"; cat "$work/approval-1.log"
grep -q "ok after" <(grep -A1 refund "$work/approval-1.log") \
  || fail "the approved refund did not run" "$work/sidecar.log"

echo; echo "  The same call again asks again (an approval is used once); alice denies this one:"
calls_in_background "$work/approval-2.log"
wait_until "a second ToolCallApproval" 15 "$call_pid" "$work/approval-2.log" \
  bash -c '[ "$("$0" get toolcallapprovals -n default -o name | wc -l)" -ge 2 ]' "$CHAPERONE_KUBECTL"
sleep 1
"$bin/chaperonectl" approval deny "$(pending_approval)" -n default --as alice \
  --reason AlreadyRefunded --message "this order was refunded today" | sed 's/^/    /'
wait "$call_pid" || true
echo; echo "  the agent's calls:"; cat "$work/approval-2.log"
echo
kubectl get toolcallapprovals -n default

say "Delegation (examples/delegation): the planner hands billing work to the billing worker"
# The planner reaches the worker's sidecar (inbound side); the worker reaches billing.
sed -e "s#http://billing-worker.default.svc:8080/mcp#http://127.0.0.1:$worker_inbound_port/mcp#" \
    -e "s#http://billing.tools.svc:8080/mcp#http://127.0.0.1:$billing_port/mcp#" \
    examples/delegation/agentidentities.yaml > "$work/delegation-identities.yaml"
grep -q "127.0.0.1:$worker_inbound_port" "$work/delegation-identities.yaml" \
  || fail "examples/delegation/agentidentities.yaml no longer has the URLs this script rewrites"
kubectl apply -f "$work/delegation-identities.yaml" -f examples/delegation/toolpolicies.yaml \
  -f examples/delegation/delegationgrant.yaml
start billing "$work/billing.log" "$bin/chaperone-demo" tool-server --listen "127.0.0.1:$billing_port" --tools billing
wait_until "the billing tool server" 30 "${pids[-1]}" "$work/billing.log" grep -q listening "$work/billing.log"
# pod_and_token NAME: a ServiceAccount, a pod NAME-0 and a token bound to it.
pod_and_token() {
  kubectl create serviceaccount "$1" -n default >/dev/null
  kubectl run "$1-0" -n default --image "example.com/$1:demo" --restart Never \
    --overrides "{\"apiVersion\":\"v1\",\"spec\":{\"serviceAccountName\":\"$1\"}}" >/dev/null
  local uid
  uid=$(kubectl get pod "$1-0" -n default -o jsonpath='{.metadata.uid}')
  kubectl create token "$1" -n default --audience chaperone --duration 1h \
    --bound-object-kind Pod --bound-object-name "$1-0" --bound-object-uid "$uid" > "$work/$1.token"
}
pod_and_token planner
pod_and_token billing-worker
# sidecar NAME PROXY_PORT ADMIN_PORT [INBOUND_PORT APP_PORT]: the pod's sidecar in controller mode.
sidecar() {
  local inbound=()
  [ -n "${4:-}" ] && inbound=(CHAPERONE_INBOUND_LISTEN="127.0.0.1:$4" CHAPERONE_INBOUND_UPSTREAM="http://127.0.0.1:$5")
  env CHAPERONE_LISTEN="127.0.0.1:$2" CHAPERONE_ADMIN_LISTEN="127.0.0.1:$3" "${inbound[@]}" \
    CHAPERONE_CONTROLLER_ADDRESS="127.0.0.1:$grpc_port" CHAPERONE_CONTROLLER_SERVER_NAME=localhost \
    CHAPERONE_TOKEN_FILE="$PWD/$work/$1.token" CHAPERONE_CA_FILE="$PWD/$work/ca.crt" \
    CHAPERONE_POD_NAME="$1-0" CHAPERONE_POD_NAMESPACE=default \
    "$bin/chaperone-sidecar" > "$work/$1-audit.log" 2> "$work/$1-sidecar.log" &
  pids+=("$!"); names+=("$1-sidecar")
  wait_until "the $1 sidecar's first snapshot" 60 "${pids[-1]}" "$work/$1-sidecar.log" \
    curl -sf "http://127.0.0.1:$3/ready"
}
sidecar billing-worker "$worker_port" "$worker_admin_port" "$worker_inbound_port" "$worker_app_port"
sidecar planner "$planner_port" "$planner_admin_port"
start worker-app "$work/worker-app.log" "$bin/chaperone-demo" worker \
  --listen "127.0.0.1:$worker_app_port" --server billing --sidecar "http://127.0.0.1:$worker_port"
wait_until "the billing worker app" 30 "${pids[-1]}" "$work/worker-app.log" grep -q listening "$work/worker-app.log"
echo "  planner sidecar :$planner_port → worker sidecar inbound :$worker_inbound_port → worker app :$worker_app_port"
echo "  → worker sidecar :$worker_port → billing :$billing_port"
"$bin/chaperone-demo" delegate --sidecar "http://127.0.0.1:$planner_port" \
  --worker-audit-log "$work/billing-worker-audit.log" \
  || fail "the delegated calls failed (logs: $work/billing-worker-sidecar.log, $work/worker-app.log)" "$work/billing-worker-sidecar.log"
echo
echo "  What billing saw: the worker's assertions name the planner (sub; the act chain holds both agents):"
grep -h 'tools/call' "$work/billing.log" | sed -E 's/^.*(INFO|WARN) .*tools\/call /  /' | head -n 4
if "$bin/chaperonectl" audit --help >/dev/null 2>&1; then
  say "chaperonectl audit verify: the planner's and the worker's audit logs form one proven trail"
  # Both sidecars stop: each ends its trail with a signed final checkpoint,
  # and their keys leave the controller's JWKS. The audit-key archive keeps
  # them: `chaperonectl audit keys` gives what verifies the trail.
  for i in "${!names[@]}"; do
    case "${names[$i]}" in
      planner-sidecar|billing-worker-sidecar)
        kill -TERM "${pids[$i]}" 2>/dev/null || true
        wait "${pids[$i]}" 2>/dev/null || true ;;
    esac
  done
  cat "$work/planner-audit.log" "$work/billing-worker-audit.log" > "$work/delegation-trail.log"
  # The controller archives a key within about a second of its registration;
  # this scene can be faster than that.
  trail_kids=$(grep -o '"kid":"[^"]*"' "$work/delegation-trail.log" | cut -d'"' -f4 | sort -u)
  archived() {
    "$bin/chaperonectl" audit keys -n default --controller-namespace chaperone-system \
      > "$work/audit-keys.json" || return 1
    local kid
    for kid in $trail_kids; do grep -q "\"$kid\"" "$work/audit-keys.json" || return 1; done
  }
  wait_until "the audit-key archive (chaperonectl audit keys) holds both sidecars' keys" 20 \
    "${pids[0]}" "$work/controller.log" archived
  "$bin/chaperonectl" audit keys -n default --controller-namespace chaperone-system > "$work/audit-keys.json"
  "$bin/chaperonectl" audit verify --strict --jwks "$work/audit-keys.json" "$work/delegation-trail.log"
fi

# The sidecar reports the tools it saw in tools/list; wait until both servers' are in.
wait_until "discoveredTools of both tool servers in the status" 20 "${pids[0]}" "$work/controller.log" \
  bash -c '"$0" get agentidentity support-agent -n default -o jsonpath="{.status.discoveredTools}" | grep -q read_inbox' "$CHAPERONE_KUBECTL"
say "kubectl get agentidentities,toolpolicies,delegationgrants -A"
kubectl get agentidentities,toolpolicies,delegationgrants -A

denials=$(grep -c '"decision":"deny"' "$work/sidecar-audit.log" || true)
say "kubectl get events -n default: the sidecar's $denials denials as Warnings (from its audit batches)"
# Events arrive in the sidecar's next audit batch; kube's event recorder counts
# repeats of the same reason on an object in one Event (COUNT).
events_counted() {
  kubectl get events -n default --field-selector type=Warning,involvedObject.kind=AgentIdentity \
    -o jsonpath='{range .items[*]}{"x"}{.series.count}{" "}{end}' 2>/dev/null \
    | awk -v want="$denials" '{ for (i = 1; i <= NF; i++) { c = substr($i, 2); n += (c == "" ? 1 : c) } }
        END { exit !(n >= want && want > 0) }'
}
wait_until "Warning events for the $denials denials" 30 "${pids[0]}" "$work/controller.log" events_counted
kubectl get events -n default --sort-by=.metadata.creationTimestamp \
  -o custom-columns='TYPE:.type,REASON:.reason,OBJECT:.involvedObject.kind,NAME:.involvedObject.name,COUNT:.series.count,MESSAGE:.message'

say "kubectl describe agentidentity support-agent (status: snapshot, sidecars in sync, tools seen)"
kubectl describe agentidentity support-agent -n default | sed -n '/^Status:/,$p'

say "Tool definition pinning: a tool whose definition changed is hidden until a person accepts it"
# The sidecar fingerprints each listed tool (SHA-256 of its canonical name,
# description, schemas, annotations); the status shows it against its pin.
pins() {
  kubectl get agentidentity support-agent -n default -o jsonpath='{range .status.discoveredTools[?(@.server=="orders")]}{"    "}{.server}/{.name}{"  "}{.pin}{"  "}{.definitionHash}{"\n"}{end}'
}
echo "  the definitions the sidecar saw (status.discoveredTools: pin, definitionHash):"
pins
echo; echo "  trust on first use: pin them (chaperonectl tools pin; -o yaml prints the ToolPolicy for git instead):"
"$bin/chaperonectl" tools pin support-agent -n default | sed 's/^/    /'
[ "$(kubectl get agentidentity support-agent -n default -o jsonpath='{.spec.toolServers[0].name}')" = orders ] \
  || fail "examples/basic/agentidentity.yaml no longer lists orders first"
kubectl patch agentidentity support-agent -n default --type json \
  -p '[{"op": "add", "path": "/spec/toolServers/0/toolPinning", "value": "enforce"}]' | sed 's/^/  /'
wait_until "the orders tools pinned in the status" 20 "${pids[0]}" "$work/controller.log" \
  bash -c '! "$0" get agentidentity support-agent -n default -o jsonpath="{.status.discoveredTools[?(@.server==\"orders\")].pin}" | grep -qv Matches' "$CHAPERONE_KUBECTL"
echo; echo "  the orders server is updated: refund has a new description and a new argument"
echo "  (had it slipped in \"pass the customer's IBAN\", the agent would not see it either: nobody would pin that)"
cat > "$work/orders-edits.json" <<'JSON'
{"refund": {
  "description": "Refund part of an order, in EUR, with a reason the customer sees.",
  "inputSchema": {"type": "object", "required": ["orderId", "amount"], "properties": {
    "orderId": {"type": "string"}, "amount": {"type": "number"},
    "reason": {"type": "string", "description": "Shown on the customer's credit note"}}}}}
JSON
wait_until "the orders server to take the change" 10 "$orders_pid" "$work/orders.log" \
  grep -q "tool definitions changed.*refund" "$work/orders.log"
echo "  the agent lists its tools: refund is no longer offered"
"$bin/chaperone-demo" list --sidecar "http://127.0.0.1:$sidecar_port" --server orders
echo "  and a call to it is refused:"
"$bin/chaperone-demo" calls --sidecar "http://127.0.0.1:$sidecar_port" --server orders \
  'get_order {"id": "A-1001"}' 'refund {"orderId": "A-1001", "amount": 20}'
wait_until "the ToolDefinitionsPinned condition to turn False" 20 "${pids[0]}" "$work/controller.log" \
  bash -c '"$0" get agentidentity support-agent -n default -o jsonpath="{.status.conditions[?(@.type==\"ToolDefinitionsPinned\")].status}" | grep -q False' "$CHAPERONE_KUBECTL"
echo; echo "  the AgentIdentity says why (condition ToolDefinitionsPinned) and an Event names both hashes:"
kubectl get agentidentity support-agent -n default \
  -o jsonpath='{range .status.conditions[?(@.type=="ToolDefinitionsPinned")]}    {.status} {.reason}: {.message}{"\n"}{end}'
wait_until "the ToolDefinitionChanged Event" 20 "${pids[0]}" "$work/controller.log" \
  bash -c '[ -n "$("$0" get events -n default --field-selector reason=ToolDefinitionChanged -o name)" ]' "$CHAPERONE_KUBECTL"
kubectl get events -n default --field-selector reason=ToolDefinitionChanged,involvedObject.kind=AgentIdentity \
  -o custom-columns='TYPE:.type,REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message' | sed 's/^/    /'
echo; echo "  a person reviews the change (chaperonectl tools diff; the controller keeps both texts in ConfigMap support-agent-tool-definitions):"
# It exits 1 when it shows a tool to review (as here), so CI can fail on drift.
diff_status=0
"$bin/chaperonectl" tools diff support-agent -n default > "$work/tools-diff.txt" || diff_status=$?
sed 's/^/    /' "$work/tools-diff.txt"
[ "$diff_status" -eq 1 ] \
  || fail "chaperonectl tools diff exited $diff_status, not 1 (a tool differs from its pin)" "$work/controller.log"
echo; echo "  and accepts it: the new hash goes into the pin policy (server-side apply, field manager chaperonectl-tools-pin)"
"$bin/chaperonectl" tools pin support-agent refund -n default | sed 's/^/    /'
wait_until "refund offered again" 20 "${pids[0]}" "$work/controller.log" \
  bash -c '"$0" list --sidecar "http://127.0.0.1:$1" --server orders | grep -q orders/refund' "$bin/chaperone-demo" "$sidecar_port"
"$bin/chaperone-demo" list --sidecar "http://127.0.0.1:$sidecar_port" --server orders
"$bin/chaperone-demo" calls --sidecar "http://127.0.0.1:$sidecar_port" --server orders \
  'get_order {"id": "A-1001"}' 'refund {"orderId": "A-1001", "amount": 20}'

if [ -n "${DEMO_HOLD:-}" ]; then
  say "Everything is up: KUBECONFIG=$KUBECONFIG kubectl get chaperone -A   (Ctrl-C to stop)"
  echo "  the sidecar: http://127.0.0.1:$sidecar_port/{orders,mail}; logs in $work/*.log"
  wait "$runner"
fi
say "Done; stopping the sidecar, the tool servers, the controller and the control plane"
