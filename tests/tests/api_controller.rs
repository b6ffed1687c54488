//! The controller on a real API server: status of applied CRs, per-object compile
//! errors, and the snapshot stream to sidecar stand-ins (real gRPC clients with
//! real pod-bound ServiceAccount tokens from the TokenRequest API).

use std::{
    collections::BTreeSet,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaperone_api::{AgentIdentity, DelegationGrant, ToolPolicy};
use chaperone_policy::Snapshot;
use chaperone_testenv::kube_fixtures::apply;
use chaperone_testenv::{
    ControlPlane, create_namespace, kube_fixtures,
    kube_fixtures::{pod_token, tool_pod_token},
    sidecar_fixtures::eventually,
};
use chaperone_wire::v1::{
    Ack, ControllerMessage, SidecarMessage, SnapshotUpdate, controller_message, sidecar_message,
    snapshot_service_client::SnapshotServiceClient,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::DeleteParams};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Streaming,
    transport::{Certificate, Channel, ClientTlsConfig},
};

/// The controller under test: one per test binary, on its own thread and runtime.
type TestController = kube_fixtures::InProcessController;

fn controller() -> &'static TestController {
    static CONTROLLER: OnceLock<TestController> = OnceLock::new();
    CONTROLLER.get_or_init(|| {
        kube_fixtures::start_controller(ControlPlane::shared(), "controller-under-test")
    })
}

/// Two more replicas beside [`controller`], in the same namespace (they share
/// its Lease and exchange sidecar state with it). Every test starts them (in
/// [`setup`]), so no test's timing meets their start-up, and every status
/// assertion holds whichever of the three leads.
fn replicas() -> &'static (TestController, TestController) {
    static REPLICAS: OnceLock<(TestController, TestController)> = OnceLock::new();
    REPLICAS.get_or_init(|| {
        let cp = ControlPlane::shared();
        (
            kube_fixtures::start_controller(cp, "replica-1"),
            kube_fixtures::start_controller(cp, "replica-2"),
        )
    })
}

async fn setup() -> Result<(Client, String)> {
    controller();
    replicas();
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "ctl").await?;
    Ok((client, ns))
}

fn agent(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": { "name": name },
        "spec": {
            "selector": { "serviceAccountName": name },
            "toolServers": [{ "name": "orders", "url": "http://orders.tools.svc:8080/mcp" }]
        }
    })
}

fn policy(name: &str, agent: &str, tool: &str) -> serde_json::Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": { "name": name },
        "spec": {
            "targetRefs": [{ "name": agent }],
            "rules": [{ "name": "allow-tool", "action": "allow", "tools": [{ "server": "orders", "name": tool }] }]
        }
    })
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// A sidecar stand-in: a real gRPC client of the snapshot stream.
struct SidecarStandIn {
    to_controller: mpsc::Sender<SidecarMessage>,
    from_controller: Streaming<ControllerMessage>,
    /// Its bearer token (what key proofs are bound to).
    token: String,
}

async fn connect(token: &str) -> Result<SidecarStandIn, tonic::Status> {
    let c = controller();
    let ca =
        std::fs::read_to_string(&c.ca_file).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let channel = Channel::from_shared(format!("https://localhost:{}", c.grpc_port))
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(8);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let response = SnapshotServiceClient::new(channel).watch(request).await?;
    Ok(SidecarStandIn {
        to_controller: tx,
        from_controller: response.into_inner(),
        token: token.to_owned(),
    })
}

impl SidecarStandIn {
    /// The next snapshot update (skipping key-set updates).
    async fn next_snapshot(&mut self, timeout: Duration) -> Result<(SnapshotUpdate, Snapshot)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.from_controller.message())
                .await
                .context("no snapshot in time")??
                .context("stream ended")?;
            if let Some(controller_message::Message::Snapshot(update)) = message.message {
                let snapshot = Snapshot::from_bytes(&update.payload)?;
                assert!(snapshot.hash_is_valid());
                assert_eq!(snapshot.hash, update.hash);
                return Ok((update, snapshot));
            }
        }
    }

    /// The next message of any kind; fails after `timeout` or when the stream ends.
    async fn next_message(&mut self, timeout: Duration) -> Result<controller_message::Message> {
        tokio::time::timeout(timeout, self.from_controller.message())
            .await
            .context("no message in time")??
            .context("stream ended")?
            .message
            .context("an empty controller message")
    }

    /// Key sets until one contains `kid` (within `timeout`); fails on a
    /// snapshot: tool-mode streams carry key sets only.
    async fn key_set_with(&mut self, kid: &str, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_message(left).await? {
                controller_message::Message::Keys(keys) => {
                    let jwks: serde_json::Value = serde_json::from_str(&keys.jwks_json)?;
                    if jwks_kids(&jwks).iter().any(|k| k == kid) {
                        return Ok(jwks);
                    }
                }
                controller_message::Message::Approval(status) => {
                    bail!("a tool-mode stream received approval {}", status.name)
                }
                controller_message::Message::Snapshot(update) => {
                    bail!("a tool-mode stream received snapshot {}", update.version)
                }
            }
        }
    }

    /// Registers a fresh signing key, as a sidecar does; returns its kid.
    async fn send_key(&self) -> Result<String> {
        let (kid, key) = kube_fixtures::signing_key_for(&self.token);
        self.to_controller
            .send(SidecarMessage {
                message: Some(sidecar_message::Message::SigningKey(key)),
            })
            .await?;
        Ok(kid)
    }

    async fn ack(&self, update: &SnapshotUpdate) -> Result<()> {
        let ack = SidecarMessage {
            message: Some(sidecar_message::Message::Ack(Ack {
                version: update.version,
                hash: update.hash.clone(),
            })),
        };
        self.to_controller.send(ack).await?;
        Ok(())
    }
}

fn rules(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .content
        .authority
        .rules
        .iter()
        .map(|r| format!("{}/{}", r.policy, r.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_crs_become_ready_with_status_columns() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    apply::<ToolPolicy>(&client, &ns, policy("orders", "planner", "get_order")).await?;
    let agents: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);
    let status = eventually(Duration::from_secs(10), async || {
        let status = agents.get("planner").await?.status.unwrap_or_default();
        Ok(condition(&status.conditions, "Ready")
            .filter(|c| c.status == "True")
            .map(|_| status.clone()))
    })
    .await?;
    assert!(status.snapshot_version.is_some_and(|v| v > 0));
    assert_eq!(status.observed_generation, Some(1));
    let policies: Api<ToolPolicy> = Api::namespaced(client.clone(), &ns);
    let policy_status = eventually(Duration::from_secs(10), async || {
        Ok(policies
            .get("orders")
            .await?
            .status
            .filter(|s| !s.conditions.is_empty()))
    })
    .await?;
    assert_eq!(
        condition(&policy_status.conditions, "Ready")
            .unwrap()
            .status,
        "True"
    );
    assert_eq!(policy_status.target_agent_count, Some(1));
    let table = ControlPlane::shared().kubectl(&["get", "agentidentities", "-n", &ns])?;
    let table = String::from_utf8(table.stdout)?;
    assert!(
        table.lines().nth(1).unwrap_or_default().contains("True"),
        "{table}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_cel_rule_makes_only_its_policy_not_ready() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    apply::<ToolPolicy>(&client, &ns, policy("good", "planner", "get_order")).await?;
    let mut broken = policy("broken", "planner", "refund");
    broken["spec"]["rules"][0]["name"] = json!("refund-small");
    broken["spec"]["rules"][0]["when"] = json!({ "expression": "secrets.amount < 100" });
    apply::<ToolPolicy>(&client, &ns, broken).await?;
    let policies: Api<ToolPolicy> = Api::namespaced(client.clone(), &ns);
    let ready = eventually(Duration::from_secs(10), async || {
        let status = policies.get("broken").await?.status.unwrap_or_default();
        Ok(condition(&status.conditions, "Ready").cloned())
    })
    .await?;
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "RuleInvalid");
    assert!(ready.message.contains("refund-small"), "{}", ready.message);
    assert!(ready.message.contains("secrets"), "{}", ready.message);

    // The agent is still served, with the good policy's rule only.
    let token = pod_token(&client, &ns, "planner", "planner-0", "chaperone").await?;
    let mut sidecar = connect(&token).await?;
    let (_, snapshot) = sidecar.next_snapshot(Duration::from_secs(5)).await?;
    assert_eq!(rules(&snapshot), ["good/allow-tool"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_receives_its_snapshot_acks_and_status_shows_it_in_sync() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    apply::<ToolPolicy>(&client, &ns, policy("orders", "planner", "get_order")).await?;
    let token = pod_token(&client, &ns, "planner", "planner-0", "chaperone").await?;
    let mut sidecar = connect(&token).await?;
    let (update, snapshot) = sidecar.next_snapshot(Duration::from_secs(5)).await?;
    let identity = update.identity.clone().unwrap();
    assert_eq!(
        (
            identity.namespace.as_str(),
            identity.agent.as_str(),
            identity.pod.as_str()
        ),
        (ns.as_str(), "planner", "planner-0")
    );
    assert_eq!(rules(&snapshot), ["orders/allow-tool"]);
    sidecar.ack(&update).await?;

    let agents: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(10), async || {
        let status = agents.get("planner").await?.status.unwrap_or_default();
        Ok((status.sidecars_connected == 1
            && status.sidecars_in_sync == 1
            && status.snapshot_hash.as_deref() == Some(&update.hash))
        .then_some(()))
    })
    .await?;

    // A policy edit reaches the connected sidecar within a second.
    let edited = Instant::now();
    apply::<ToolPolicy>(&client, &ns, policy("orders", "planner", "list_orders")).await?;
    let (next, snapshot) = sidecar.next_snapshot(Duration::from_secs(1)).await?;
    assert!(
        edited.elapsed() < Duration::from_secs(1),
        "took {:?}",
        edited.elapsed()
    );
    assert!(next.version > update.version);
    assert_eq!(
        snapshot.content.authority.rules[0].tools[0].name.as_deref(),
        Some("list_orders")
    );

    // Not yet acknowledged: the status shows the pod out of sync.
    eventually(Duration::from_secs(10), async || {
        let status = agents.get("planner").await?.status.unwrap_or_default();
        Ok((status.sidecars_in_sync == 0
            && status
                .out_of_sync_pods
                .iter()
                .any(|p| p.name == "planner-0"))
        .then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_grant_is_pushed_to_the_delegate() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    apply::<AgentIdentity>(&client, &ns, agent("worker")).await?;
    let grant = json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": { "name": "planner-to-worker" },
        "spec": { "from": { "name": "planner" }, "to": { "name": "worker" }, "tools": [{ "server": "orders", "name": "get_order" }], "ttl": "1h" }
    });
    apply::<DelegationGrant>(&client, &ns, grant).await?;
    let token = pod_token(&client, &ns, "worker", "worker-0", "chaperone").await?;
    let mut sidecar = connect(&token).await?;
    let (_, snapshot) = sidecar.next_snapshot(Duration::from_secs(5)).await?;
    // The grant may land in a second snapshot if the stream opened first.
    let snapshot = if snapshot.content.grants_received.is_empty() {
        sidecar.next_snapshot(Duration::from_secs(5)).await?.1
    } else {
        snapshot
    };
    assert_eq!(snapshot.content.grants_received.len(), 1);

    let grants: Api<DelegationGrant> = Api::namespaced(client.clone(), &ns);
    let status = eventually(Duration::from_secs(10), async || {
        Ok(grants
            .get("planner-to-worker")
            .await?
            .status
            .filter(|s| !s.conditions.is_empty()))
    })
    .await?;
    assert_eq!(
        condition(&status.conditions, "Ready").unwrap().status,
        "True"
    );
    assert!(status.expires_at.is_some());

    let deleted = Instant::now();
    grants
        .delete("planner-to-worker", &DeleteParams::default())
        .await?;
    let (_, snapshot) = sidecar.next_snapshot(Duration::from_secs(1)).await?;
    assert!(snapshot.content.grants_received.is_empty());
    assert!(deleted.elapsed() < Duration::from_secs(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_token_gets_only_its_own_agents_snapshot() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    apply::<AgentIdentity>(&client, &ns, agent("worker")).await?;
    apply::<ToolPolicy>(
        &client,
        &ns,
        policy("planner-rules", "planner", "get_order"),
    )
    .await?;
    apply::<ToolPolicy>(&client, &ns, policy("worker-rules", "worker", "refund")).await?;
    let worker_token = pod_token(&client, &ns, "worker", "worker-0", "chaperone").await?;
    let mut worker = connect(&worker_token).await?;
    let (update, snapshot) = worker.next_snapshot(Duration::from_secs(5)).await?;
    assert_eq!(update.identity.unwrap().agent, "worker");
    assert_eq!(snapshot.content.agent.name, "worker");
    assert!(
        rules(&snapshot)
            .iter()
            .all(|r| r.starts_with("worker-rules/")),
        "{:?}",
        rules(&snapshot)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_a_reason() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;

    let garbage = connect("not-a-token")
        .await
        .err()
        .context("garbage token accepted")?;
    assert_eq!(garbage.code(), tonic::Code::Unauthenticated, "{garbage:?}");
    assert!(
        garbage.message().contains("TokenReview"),
        "{}",
        garbage.message()
    );

    let wrong_audience =
        pod_token(&client, &ns, "planner", "planner-a", "some-other-service").await?;
    let refused = connect(&wrong_audience)
        .await
        .err()
        .context("wrong audience accepted")?;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    let missing = connect("").await.err().context("empty token accepted")?;
    assert_eq!(missing.code(), tonic::Code::Unauthenticated);

    // A valid token of a pod no AgentIdentity selects: refused, saying what to create.
    let stranger = pod_token(&client, &ns, "stranger", "stranger-0", "chaperone").await?;
    let refused = connect(&stranger)
        .await
        .err()
        .context("unselected pod accepted")?;
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("serviceAccountName: stranger"),
        "{}",
        refused.message()
    );

    // A token whose pod was deleted: refused.
    let gone = pod_token(&client, &ns, "planner", "planner-gone", "chaperone").await?;
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete("planner-gone", &DeleteParams::default().grace_period(0))
        .await?;
    let refused = connect(&gone)
        .await
        .err()
        .context("token of a deleted pod accepted")?;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let _ = controller().admin_port;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_in_audit_batches_become_warning_events_on_pod_and_agent() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    let token = pod_token(&client, &ns, "planner", "planner-0", "chaperone").await?;
    let mut sidecar = connect(&token).await?;
    sidecar.next_snapshot(Duration::from_secs(5)).await?;
    let deny = json!({
        "decision": "deny", "rule": "orders/no-refunds", "server": "orders", "tool": "refund",
        "reason": "a deny rule matched", "correlation": "corr-1", "chain": [],
        "session": { "chaperone": "sess-1", "mcp": "" }
    });
    let allow = json!({ "decision": "allow", "rule": "orders/read", "server": "orders", "tool": "get_order" });
    let batch = SidecarMessage {
        message: Some(sidecar_message::Message::Audit(
            chaperone_wire::v1::AuditBatch {
                records: vec![deny.to_string(), allow.to_string()],
                dropped: 0,
            },
        )),
    };
    sidecar.to_controller.send(batch).await?;

    let denials = eventually(Duration::from_secs(10), async || {
        let denials = kube_fixtures::events_with_reason(&client, &ns, "ToolCallDenied").await?;
        Ok((denials.len() >= 2).then_some(denials))
    })
    .await?;
    let kinds: BTreeSet<String> = denials
        .iter()
        .filter_map(|e| e.regarding.as_ref()?.kind.clone())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["AgentIdentity".to_owned(), "Pod".to_owned()])
    );
    for event in &denials {
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        let note = event.note.clone().unwrap_or_default();
        assert!(
            note.contains("orders/refund")
                && note.contains("orders/no-refunds")
                && note.contains("sess-1"),
            "{note}"
        );
    }
    let described =
        ControlPlane::shared().kubectl(&["describe", "agentidentity", "planner", "-n", &ns])?;
    let described = String::from_utf8(described.stdout)?;
    assert!(described.contains("ToolCallDenied"), "{described}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecars_key_is_in_the_jwks_until_its_pod_is_deleted() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    let token = pod_token(&client, &ns, "planner", "planner-0", "chaperone").await?;
    let mut sidecar = connect(&token).await?;
    sidecar.next_snapshot(Duration::from_secs(5)).await?;
    let kid = sidecar.send_key().await?;
    let admin = controller().admin_port;
    let jwks = eventually(Duration::from_secs(5), async || {
        let body = http_get(admin, "/.well-known/jwks.json")?;
        Ok(body.contains(&kid).then_some(body))
    })
    .await?;
    assert!(jwks.contains(&format!("{ns}/planner")), "{jwks}");

    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete("planner-0", &DeleteParams::default().grace_period(0))
        .await?;
    eventually(Duration::from_secs(5), async || {
        Ok((!http_get(admin, "/.well-known/jwks.json")?.contains(&kid)).then_some(()))
    })
    .await?;
    // The stream was ended with a reason.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sidecar.from_controller.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await?;
    assert!(
        matches!(&ended, Err(status) if status.code() == tonic::Code::Unauthenticated),
        "{ended:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_registered_with_one_replica_reaches_sidecars_of_another_until_its_pod_is_deleted()
-> Result<()> {
    let (client, ns) = setup().await?;
    let (one, two) = replicas();
    // The planner may call the worker: the worker's sidecars need its keys.
    let mut planner = agent("planner");
    planner["spec"]["toolServers"]
        .as_array_mut()
        .context("toolServers")?
        .push(json!({ "name": "worker", "url": "http://worker.agents.svc:15006/mcp", "agent": "worker" }));
    apply::<AgentIdentity>(&client, &ns, planner).await?;
    apply::<AgentIdentity>(&client, &ns, agent("worker")).await?;

    // Agent sidecar A streams from replica 1 and registers its key there.
    let a_token = pod_token(&client, &ns, "planner", "planner-a", "chaperone").await?;
    let mut a = kube_fixtures::SidecarStandIn::connect(&one.snapshot_endpoint()?, &a_token).await?;
    let update = a.next_snapshot(Duration::from_secs(5)).await?;
    a.ack(&update).await?;
    let a_kid = a.send_key().await?;

    // A tool-mode sidecar, worker sidecar B and a second planner sidecar P
    // stream from replica 2.
    let tool_token =
        tool_pod_token(&client, &ns, "orders-mcp", "orders-mcp-0", "chaperone").await?;
    let mut tool =
        kube_fixtures::SidecarStandIn::connect(&two.snapshot_endpoint()?, &tool_token).await?;
    let b_token = pod_token(&client, &ns, "worker", "worker-b", "chaperone").await?;
    let mut b = kube_fixtures::SidecarStandIn::connect(&two.snapshot_endpoint()?, &b_token).await?;
    let update = b.next_snapshot(Duration::from_secs(5)).await?;
    b.ack(&update).await?;
    let p_token = pod_token(&client, &ns, "planner", "planner-b", "chaperone").await?;
    let mut p = kube_fixtures::SidecarStandIn::connect(&two.snapshot_endpoint()?, &p_token).await?;
    let p_first = p.next_snapshot(Duration::from_secs(5)).await?;
    p.ack(&p_first).await?;

    // The tool sidecar and the worker get A's key from replica 2, named for
    // A's agent and pod.
    let has_a = |jwks: &serde_json::Value| jwks_kids(jwks).contains(&a_kid);
    let jwks = tool.key_set_where(Duration::from_secs(5), has_a).await?;
    let key = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["kid"] == a_kid.as_str())
        .context("A's key")?;
    assert_eq!(key["chaperone.dev/agent"], format!("{ns}/planner"));
    assert_eq!(key["chaperone.dev/pod"], format!("{ns}/planner-a"));
    // B's first snapshot may carry it already; if not, a later key set does.
    let b_first: serde_json::Value = serde_json::from_str(&update.jwks_json)?;
    if !has_a(&b_first) {
        b.key_set_where(Duration::from_secs(5), has_a).await?;
    }
    assert!(http_get(two.admin_port, "/.well-known/jwks.json")?.contains(&a_kid));
    // Nobody lists the planner as an agent to call: its sidecars get no keys.
    let p_keys: serde_json::Value = serde_json::from_str(&p_first.jwks_json)?;
    assert!(jwks_kids(&p_keys).is_empty(), "{p_keys}");

    // Whichever replica leads counts both sidecars, in sync: at most one of them
    // streams from the leader.
    let agents: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);
    let status = eventually(Duration::from_secs(10), async || {
        let status = agents.get("planner").await?.status.unwrap_or_default();
        Ok((status.sidecars_connected == 2 && status.sidecars_in_sync == 2).then_some(status))
    })
    .await?;
    assert!(status.out_of_sync_pods.is_empty(), "{status:?}");

    // A's pod is deleted: its key leaves replica 2's key sets and JWKS.
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete("planner-a", &DeleteParams::default().grace_period(0))
        .await?;
    tool.key_set_where(Duration::from_secs(5), |jwks| !has_a(jwks))
        .await?;
    b.key_set_where(Duration::from_secs(5), |jwks| !has_a(jwks))
        .await?;
    assert!(!http_get(two.admin_port, "/.well-known/jwks.json")?.contains(&a_kid));
    eventually(Duration::from_secs(10), async || {
        let status = agents.get("planner").await?.status.unwrap_or_default();
        Ok((status.sidecars_connected == 1).then_some(()))
    })
    .await?;
    Ok(())
}

fn jwks_kids(jwks: &serde_json::Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["kid"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_pods_token_gets_the_key_set_and_never_a_snapshot() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    // An AgentIdentity also selects the tool pod's ServiceAccount: the pod's
    // tool annotation still wins, and it counts as none of its sidecars.
    apply::<AgentIdentity>(&client, &ns, agent("orders-mcp")).await?;
    apply::<ToolPolicy>(&client, &ns, policy("mcp-rules", "orders-mcp", "get_order")).await?;
    let planner_token = pod_token(&client, &ns, "planner", "planner-0", "chaperone").await?;
    let mut planner = connect(&planner_token).await?;
    planner.next_snapshot(Duration::from_secs(5)).await?;
    let first_kid = planner.send_key().await?;
    let admin = controller().admin_port;
    eventually(Duration::from_secs(5), async || {
        Ok(http_get(admin, "/.well-known/jwks.json")?
            .contains(&first_kid)
            .then_some(()))
    })
    .await?;

    // On connect: a key set with the live agent sidecar's key, first of all.
    let tool_token =
        tool_pod_token(&client, &ns, "orders-mcp", "orders-mcp-0", "chaperone").await?;
    let mut tool = connect(&tool_token).await?;
    let controller_message::Message::Keys(first) =
        tool.next_message(Duration::from_secs(5)).await?
    else {
        bail!("the first message of a tool-mode stream is not a key set");
    };
    let jwks: serde_json::Value = serde_json::from_str(&first.jwks_json)?;
    let key = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["kid"] == first_kid.as_str())
        .with_context(|| format!("{first_kid} not in {jwks}"))?;
    assert_eq!(key["chaperone.dev/agent"], format!("{ns}/planner"));

    // A tool sidecar signs no assertions: its key (its checkpoints') is
    // archived, never in a key set or the JWKS.
    let tool_kid = tool.send_key().await?;

    // A new agent sidecar registers: the tool sidecar gets the new key set.
    let second_token = pod_token(&client, &ns, "planner", "planner-1", "chaperone").await?;
    let mut second = connect(&second_token).await?;
    second.next_snapshot(Duration::from_secs(5)).await?;
    let second_kid = second.send_key().await?;
    let jwks = tool
        .key_set_with(&second_kid, Duration::from_secs(5))
        .await?;
    let kids = jwks_kids(&jwks);
    assert!(kids.contains(&first_kid), "{kids:?}");
    assert!(!kids.contains(&tool_kid), "{kids:?}");
    assert!(!http_get(admin, "/.well-known/jwks.json")?.contains(&tool_kid));

    // Status counts the two agent sidecars and not the tool sidecar, even for
    // the AgentIdentity that selects the tool pod.
    let agents: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(10), async || {
        let status = agents.get("planner").await?.status.unwrap_or_default();
        Ok((status.sidecars_connected == 2).then_some(()))
    })
    .await?;
    let mcp = agents.get("orders-mcp").await?.status.unwrap_or_default();
    assert_eq!(mcp.sidecars_connected, 0, "{mcp:?}");

    // A policy change for that AgentIdentity reaches no tool-mode stream.
    apply::<ToolPolicy>(
        &client,
        &ns,
        policy("mcp-rules", "orders-mcp", "list_orders"),
    )
    .await?;
    let quiet = Instant::now() + Duration::from_secs(2);
    while let Some(left) = quiet.checked_duration_since(Instant::now()) {
        match tool.next_message(left).await {
            Ok(controller_message::Message::Snapshot(update)) => {
                bail!("a tool-mode stream received snapshot {}", update.version)
            }
            Ok(controller_message::Message::Approval(status)) => {
                bail!("a tool-mode stream received approval {}", status.name)
            }
            Ok(controller_message::Message::Keys(_)) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_sidecars_denials_become_warning_events_on_its_pod() -> Result<()> {
    let (client, ns) = setup().await?;
    let token = tool_pod_token(&client, &ns, "orders-mcp", "orders-mcp-0", "chaperone").await?;
    let mut tool = connect(&token).await?;
    tool.next_message(Duration::from_secs(5)).await?;
    let deny = json!({
        "decision": "deny", "rule": "inbound/assertion", "server": "orders", "tool": "refund",
        "reason": "assertion audience is not orders", "correlation": "corr-tool",
        "chain": [format!("{ns}/planner")], "session": { "chaperone": "sess-t" }
    });
    tool.to_controller
        .send(SidecarMessage {
            message: Some(sidecar_message::Message::Audit(
                chaperone_wire::v1::AuditBatch {
                    records: vec![deny.to_string()],
                    dropped: 0,
                },
            )),
        })
        .await?;
    let denial = eventually(Duration::from_secs(10), async || {
        let denials = kube_fixtures::events_with_reason(&client, &ns, "ToolCallDenied").await?;
        Ok(denials.into_iter().next())
    })
    .await?;
    let regarding = denial.regarding.clone().context("regarding")?;
    assert_eq!(regarding.kind.as_deref(), Some("Pod"));
    assert_eq!(regarding.name.as_deref(), Some("orders-mcp-0"));
    let note = denial.note.clone().unwrap_or_default();
    assert!(
        note.contains(&format!("chain: {ns}/planner")) && note.contains("sess-t"),
        "{note}"
    );
    Ok(())
}

fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_turns_expired_at_its_expiry_and_leaves_the_snapshot() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    apply::<AgentIdentity>(&client, &ns, agent("worker")).await?;
    // Far enough ahead (expiresAt has whole seconds) that the grant is still
    // live when the stream opens while the other tests load the machine.
    let expires =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(6);
    let grant = json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": { "name": "short-lived" },
        "spec": {
            "from": { "name": "planner" }, "to": { "name": "worker" },
            "tools": [{ "server": "orders", "name": "get_order" }],
            "expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
        }
    });
    apply::<DelegationGrant>(&client, &ns, grant).await?;
    let token = pod_token(&client, &ns, "worker", "worker-0", "chaperone").await?;
    let mut sidecar = connect(&token).await?;
    let (_, mut snapshot) = sidecar.next_snapshot(Duration::from_secs(5)).await?;
    if snapshot.content.grants_received.is_empty() {
        snapshot = sidecar.next_snapshot(Duration::from_secs(5)).await?.1;
    }
    assert_eq!(snapshot.content.grants_received.len(), 1);

    // At the expiry instant (plus the one-second tick) the grant is withdrawn...
    let (_, snapshot) = sidecar.next_snapshot(Duration::from_secs(10)).await?;
    assert!(snapshot.content.grants_received.is_empty());
    // ...and its status says Expired.
    let grants: Api<DelegationGrant> = Api::namespaced(client.clone(), &ns);
    let expired = eventually(Duration::from_secs(10), async || {
        let status = grants.get("short-lived").await?.status.unwrap_or_default();
        Ok(condition(&status.conditions, "Expired")
            .filter(|c| c.status == "True")
            .cloned())
    })
    .await?;
    assert_eq!(expired.reason, "Expired");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_its_lease_over_at_once() -> Result<()> {
    use chaperone_controller::leader;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "lease").await?;
    // A replica's election for the Lease "handover": its task and whether it leads.
    let elect = |holder: &str| {
        let (leads, leading) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(leader::run(
            client.clone(),
            ns.clone(),
            "handover".to_owned(),
            holder.to_owned(),
            leads,
        ));
        (task, leading)
    };
    let (first, mut first_leads) = elect("first");
    tokio::time::timeout(Duration::from_secs(10), first_leads.wait_for(|l| *l))
        .await
        .context("the first replica never led")??;
    // It stops: its election ends, then it gives the Lease up.
    first.abort();
    let _ = first.await;
    assert!(leader::release(client.clone(), &ns, "handover", "first").await?);
    assert!(
        !leader::release(client.clone(), &ns, "handover", "first").await?,
        "released a Lease it no longer held"
    );
    // The next replica leads at its first try, not when the Lease (15 s)
    // would have expired.
    let (second, mut second_leads) = elect("second");
    tokio::time::timeout(Duration::from_secs(3), second_leads.wait_for(|l| *l))
        .await
        .context("the second replica did not lead at once")??;
    second.abort();
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client, &ns)
        .get("handover")
        .await?;
    let spec = lease.spec.context("a Lease spec")?;
    assert_eq!(spec.holder_identity.as_deref(), Some("second"));
    assert_eq!(spec.lease_transitions, Some(1), "{spec:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_writes_the_summary_of_allowed_calls_at_once() -> Result<()> {
    use chaperone_controller::audit_events::{AuditEvents, AuditSource};
    use chaperone_controller::auth::SidecarIdentity;
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("summarised")).await?;
    let events = AuditEvents::spawn(
        client.clone(),
        "flush-test".to_owned(),
        chaperone_controller::metrics::Metrics::new(),
    );
    let identity = SidecarIdentity {
        agent: chaperone_policy::AgentKey::new(&ns, "summarised"),
        pod: "summarised-0".to_owned(),
        pod_uid: "0f6c9a52-4b1e-4c4e-9d55-2b7f9c1e6a01".to_owned(),
        service_account: "summarised".to_owned(),
    };
    let allowed = json!({ "decision": "allow", "rule": "orders/read", "server": "orders", "tool": "get_order" });
    events.submit(
        AuditSource::Agent(identity),
        vec![allowed.to_string(), allowed.to_string()],
    );
    // A stopping controller flushes: the summary is written now, not when
    // the next minute's summaries are.
    tokio::time::timeout(Duration::from_secs(10), events.flush())
        .await
        .context("the flush did not finish")?;
    let summaries = kube_fixtures::events_with_reason(&client, &ns, "ToolCallsAllowed").await?;
    let summary = summaries
        .first()
        .context("no ToolCallsAllowed Event after the flush")?;
    let note = summary.note.clone().unwrap_or_default();
    assert!(note.starts_with("2 tool calls allowed"), "{note}");
    assert!(note.contains("get_order 2"), "{note}");
    Ok(())
}

/// The audit-key archive's writes and deletions on a real API server (the
/// namespace stands in for the controller's): a month's ConfigMap is created
/// with its labels, added to under its resourceVersion, never has an entry
/// replaced; only archive ConfigMaps of expired months are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_key_archive_adds_never_replaces_and_deletes_only_expired_months() -> Result<()> {
    use chaperone_api::audit_keys::{
        ArchivedKey, COMPONENT_LABEL, MONTH_LABEL, NAMESPACE_LABEL, config_map_name,
    };
    use chaperone_controller::audit_key_archive::{day_of, month_of, prune, write_month};
    use k8s_openapi::api::core::v1::ConfigMap;

    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "archive").await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let month = month_of(now);
    let key = |kid: &str, pod: &str| ArchivedKey::new(kid, "xx", "team", pod, "uid", None);

    let first = write_month(&api, &ns, &month, "team", vec![key("k1", "p-1")]).await?;
    assert_eq!(
        (first.added, first.kids.clone()),
        (1, vec!["k1".to_owned()])
    );
    let second = write_month(
        &api,
        &ns,
        &month,
        "team",
        vec![key("k1", "p-1"), key("k2", "p-2"), key("k1", "intruder")],
    )
    .await?;
    assert_eq!(second.added, 1, "{second:?}");
    assert_eq!(second.claimed, [("k1".to_owned(), "team/p-1".to_owned())]);
    let name = config_map_name(&month, "team", 0);
    let stored = api.get(&name).await?;
    let labels = stored.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(COMPONENT_LABEL.0).map(String::as_str),
        Some(COMPONENT_LABEL.1)
    );
    assert_eq!(labels.get(MONTH_LABEL), Some(&month));
    assert_eq!(
        labels.get(NAMESPACE_LABEL).map(String::as_str),
        Some("team")
    );
    let data = stored.data.unwrap_or_default();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["k1", "k2"]);
    assert!(
        data["k1"].contains("team/p-1"),
        "never replaced: {}",
        data["k1"]
    );

    // An expired month, a label that is not a month, and someone else's
    // ConfigMap with the month label: only the first goes.
    let archive_labels = |month: &str| {
        json!({
            COMPONENT_LABEL.0: COMPONENT_LABEL.1,
            MONTH_LABEL: month,
            NAMESPACE_LABEL: "team",
        })
    };
    for (name, labels) in [
        (
            config_map_name("2020-01", "team", 0),
            archive_labels("2020-01"),
        ),
        (
            "chaperone-audit-keys.latest.team".to_owned(),
            archive_labels("latest"),
        ),
        (
            "someone-elses".to_owned(),
            json!({ MONTH_LABEL: "2020-01" }),
        ),
    ] {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": name, "labels": labels },
            "data": { "k0": "{}" },
        }))?;
        api.create(&Default::default(), &cm).await?;
    }
    let deleted = prune(&api, day_of(now), 30).await?;
    assert_eq!(deleted, [config_map_name("2020-01", "team", 0)]);
    let mut left: Vec<String> = api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|cm| cm.metadata.name)
        .filter(|name| name != "kube-root-ca.crt")
        .collect();
    left.sort();
    let mut expected = vec![
        "chaperone-audit-keys.latest.team".to_owned(),
        name,
        "someone-elses".to_owned(),
    ];
    expected.sort();
    assert_eq!(left, expected);
    Ok(())
}

/// A pod cannot take another pod's key: a registration replayed on its own
/// stream (the victim's key, kid and proof) and its own key under the
/// victim's kid are refused and counted; the JWKS keeps naming the victim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cannot_register_another_pods_key_or_kid() -> Result<()> {
    let (client, ns) = setup().await?;
    apply::<AgentIdentity>(&client, &ns, agent("planner")).await?;
    let victim_token = pod_token(&client, &ns, "planner", "victim-0", "chaperone").await?;
    let mut victim = connect(&victim_token).await?;
    victim.next_snapshot(Duration::from_secs(5)).await?;
    let (kid, registration) = kube_fixtures::signing_key_for(&victim_token);
    let send = async |stand_in: &SidecarStandIn, key: chaperone_wire::v1::SigningKey| {
        stand_in
            .to_controller
            .send(SidecarMessage {
                message: Some(sidecar_message::Message::SigningKey(key)),
            })
            .await
    };
    send(&victim, registration.clone()).await?;
    let admin = controller().admin_port;
    let named = |jwks: &str| -> Result<Vec<String>> {
        let jwks: serde_json::Value = serde_json::from_str(jwks)?;
        Ok(jwks["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|k| k["kid"] == kid.as_str())
            .filter_map(|k| k["chaperone.dev/pod"].as_str().map(str::to_owned))
            .collect())
    };
    eventually(Duration::from_secs(5), async || {
        let body = http_get(admin, "/.well-known/jwks.json")?;
        let body = body.split("\r\n\r\n").nth(1).unwrap_or_default();
        Ok((!named(body)?.is_empty()).then_some(()))
    })
    .await?;
    let refused = || -> Result<u64> {
        let metrics = http_get(admin, "/metrics")?;
        Ok(metrics
            .lines()
            .find_map(|l| l.strip_prefix("chaperone_controller_signing_keys_refused_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    };
    let before = refused()?;

    // The attacker's pod (same agent, another pod) replays the registration,
    // then registers its own key under the victim's kid.
    let attacker_token = pod_token(&client, &ns, "planner", "attacker-0", "chaperone").await?;
    let mut attacker = connect(&attacker_token).await?;
    attacker.next_snapshot(Duration::from_secs(5)).await?;
    send(&attacker, registration).await?;
    let (_, mut own) = kube_fixtures::signing_key_for(&attacker_token);
    own.kid = kid.clone();
    send(&attacker, own).await?;
    eventually(Duration::from_secs(5), async || {
        Ok((refused()? >= before + 2).then_some(()))
    })
    .await?;
    let body = http_get(admin, "/.well-known/jwks.json")?;
    let body = body.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(named(body)?, [format!("{ns}/victim-0")], "{body}");
    Ok(())
}
