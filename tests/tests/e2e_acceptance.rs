//! End to end on a real API server: the chart installed, the controller as its
//! Deployment's pod, injected sidecars, MCP clients and tools, delegation.
//!
//! ```text
//!  helm template charts/chaperone | kubectl apply        (CRDs, RBAC, Services, Deployment, webhook)
//!  controller: in-process stand-in for the Deployment's pod, with that pod's ServiceAccount token
//!      ▲ webhook (the chart's MutatingWebhookConfiguration, clientConfig pointed at 127.0.0.1)
//!  pods planner-0 (A), worker-0 (B), billing-0 (tool) created through the API server → stored injected
//!
//!  rmcp client ─► A's sidecar ─┬─► orders tool server (direct)
//!                              └─► B's inbound ─► worker app ─► B's sidecar ─► billing's tool-mode sidecar ─► billing
//! ```
//!
//! No kubelet runs the pods: each sidecar runs in this process as its pod's
//! stand-in, configured from the environment the webhook injected into the
//! stored pod and authenticated with a token bound to that pod, requested with
//! the audience of the pod's projected token volume. What differs from a pod
//! is only the network: the sidecars' listeners get free ports, the tool
//! servers' ports are the pods' `chaperone.dev/inbound-port` annotations, and
//! the controller's Service name resolves to 127.0.0.1 (the TLS name checked is
//! still the Service's).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chaperone_api::{
    AgentIdentity, DelegationGrant, ToolCallApproval, ToolPolicy, approval::ApprovalPhase,
};
use chaperone_controller::webhook::mutate;
use chaperone_demo::{SeenAssertions, ToolServer, ToolSet, WorkerApp};
use chaperone_sidecar::{
    Settings,
    settings::{ENV_CONTROLLER_ADDRESS, ENV_TOKEN_FILE},
};
use chaperone_testenv::{
    ControlPlane, chart, create_namespace,
    kube_fixtures::{
        self, ControllerLaunch, InProcessController, agent_identity, agent_subject, client_as,
        delegation_grant, tool_policy,
    },
    mcp_fixtures::{
        McpClient, assert_tampering_detected, call, claims_of, last_assertion, loopback_listener,
        mcp_session, serve_mcp, tool_names, verify_strict,
    },
    sidecar_fixtures::{TestSidecar, eventually, http_get_async, write_token},
};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Container, Pod},
    rbac::v1::RoleBinding,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// The audience agents' AgentIdentities name for the billing tool.
const TOOL_AUDIENCE: &str = "billing.tools.chaperone.test";

/// Helm's cache, config and data, under Cargo's scratch directory.
fn helm_home() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("helm-home")
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = ControlPlane::shared().kubectl_with_stdin(args, stdin)?;
    if !out.status.success() {
        bail!(
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// [`kubectl`] off the async runtime's worker threads.
async fn kubectl_async(args: Vec<String>, stdin: Option<String>) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&args, stdin.as_deref())
    })
    .await?
}

// ---------------------------------------------------------------------------
// 1. The chart, and the controller as its Deployment's stand-in.

/// The chart's rendered objects, applied in `namespace`.
async fn install_chart(namespace: &str) -> Result<Vec<Value>> {
    let home = helm_home();
    std::fs::create_dir_all(&home)?;
    let chart_dir = chart::chart_dir();
    let manifest = chart::helm_ok(
        &home,
        &[
            "template",
            "chaperone",
            chart_dir.to_str().context("chart path")?,
            "--namespace",
            namespace,
            "--include-crds",
        ],
        None,
    )?;
    let objects = chart::manifest_documents(&manifest)?;
    // Server-side: the CRDs are too large for client-side apply's annotation.
    let applied = kubectl_async(
        ["apply", "--server-side", "-f", "-"]
            .map(String::from)
            .into(),
        Some(manifest),
    )
    .await?;
    ensure!(
        applied.lines().count() == objects.len(),
        "kubectl applied {} objects of {}: {applied}",
        applied.lines().count(),
        objects.len()
    );
    kubectl_async(
        [
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/agentidentities.chaperone.dev",
            "crd/toolpolicies.chaperone.dev",
            "crd/delegationgrants.chaperone.dev",
        ]
        .map(String::from)
        .into(),
        None,
    )
    .await?;
    Ok(objects)
}

/// Creates the pod the chart's Deployment would run (its pod template; no
/// ReplicaSet controller runs here) and starts the controller in this process
/// as that pod: the flags from the Deployment's environment (downward-API
/// values from the pod), and a client with a token of the chart's
/// ServiceAccount bound to the pod, so that only the chart's RBAC authorises
/// it. The listen addresses are loopback ports; 127.0.0.1 joins the serving
/// certificate's names, for the API server to call the webhook there.
async fn start_controller(
    client: &Client,
    namespace: &str,
    objects: &[Value],
) -> Result<InProcessController> {
    let deployment = chart::object_of_kind(objects, "Deployment")?;
    let name = deployment["metadata"]["name"].as_str().context("name")?;
    let template = &deployment["spec"]["template"];
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": format!("{name}-standin"),
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
        },
        "spec": template["spec"],
    }))?;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .context("creating the controller's pod")?;
    let pod_json = serde_json::to_value(&pod)?;

    let cp = ControlPlane::shared();
    // The API server's audience (it defaults to the issuer, `<server>/`).
    let token = kube_fixtures::bound_token(client, &pod, &format!("{}/", cp.server())).await?;
    let kubeconfig = cp.kubeconfig_for_token("controller-kubeconfig", &token)?;
    let mut flags: Vec<String> = chart::controller_flags(deployment, Some(&pod_json))?
        .into_iter()
        .filter(|flag| !flag.starts_with("--log-format="))
        .map(|flag| match flag.strip_prefix("--extra-san=") {
            Some(sans) => format!("--extra-san={sans},127.0.0.1"),
            None => flag,
        })
        .collect();
    if !flags.iter().any(|f| f.starts_with("--extra-san=")) {
        flags.push("--extra-san=127.0.0.1".into());
    }
    flags.push("--log-format=text".into());
    tokio::task::spawn_blocking(move || {
        kube_fixtures::start_controller_with(
            ControlPlane::shared(),
            ControllerLaunch {
                flags,
                kubeconfig: Some(kubeconfig),
                create_namespace: None,
            },
        )
    })
    .await?
}

/// Points every webhook of the chart's MutatingWebhookConfiguration at the
/// local controller (`url` instead of the Service, which has no endpoints
/// without a kubelet) and waits until the controller has filled in the
/// caBundle the chart leaves out.
async fn point_webhook_at(
    client: &Client,
    objects: &[Value],
    controller: &InProcessController,
) -> Result<()> {
    let name = chart::object_of_kind(objects, "MutatingWebhookConfiguration")?["metadata"]["name"]
        .as_str()
        .context("name")?
        .to_owned();
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    // Read, modify, replace: the controller may write the caBundle meanwhile
    // (a conflict), so retry. Each entry keeps its path (/inject,
    // /approve-toolcallapprovals).
    for attempt in 0.. {
        let mut config = api.get(&name).await?;
        for webhook in config.webhooks.iter_mut().flatten() {
            let Some(service) = webhook.client_config.service.take() else {
                bail!(
                    "the chart's webhook {} has no Service clientConfig",
                    webhook.name
                );
            };
            let path = service.path.unwrap_or_else(|| "/inject".to_owned());
            webhook.client_config.url = Some(format!(
                "https://127.0.0.1:{}{path}",
                controller.webhook_port
            ));
        }
        match api.replace(&name, &PostParams::default(), &config).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < 10 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let ca = std::fs::read_to_string(&controller.ca_file)?;
    eventually(Duration::from_secs(20), async || {
        let config = api.get(&name).await?;
        let webhooks = config.webhooks.unwrap_or_default();
        Ok((!webhooks.is_empty()
            && webhooks.iter().all(|w| {
                w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(ca.as_bytes())
            }))
        .then_some(()))
    })
    .await
    .context("the controller never set the chart's webhook caBundle")
}

// ---------------------------------------------------------------------------
// 2. Pods through the API server, injected.

/// Creates `pod` through the API server. The API server reloads webhook
/// configurations asynchronously: until it calls the local controller, the
/// chart's failurePolicy Fail refuses annotated pods, so a refusal by the
/// webhook is retried for a while.
async fn create_through_webhook(client: &Client, ns: &str, pod: Value) -> Result<Pod> {
    let pod: Pod = serde_json::from_value(pod)?;
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match api.create(&PostParams::default(), &pod).await {
            Ok(created) => return Ok(created),
            Err(kube::Error::Api(e))
                if e.message.contains("inject.chaperone.dev") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("creating an annotated pod"),
        }
    }
}

fn agent_pod(name: &str, service_account: &str, annotations: Value) -> Value {
    json!({
        "metadata": { "name": name, "annotations": annotations },
        "spec": {
            "serviceAccountName": service_account,
            "containers": [{ "name": "app", "image": format!("registry.example/{service_account}:1") }],
        },
    })
}

fn sidecar_of(pod: &Pod) -> Result<&Container> {
    let spec = pod.spec.as_ref().context("spec")?;
    let init = spec.init_containers.as_deref().unwrap_or_default();
    ensure!(
        init.first().is_some_and(|c| c.name == mutate::SIDECAR_NAME),
        "the stored pod {:?} has no {} first among its init containers",
        pod.metadata.name,
        mutate::SIDECAR_NAME
    );
    ensure!(
        spec.containers
            .iter()
            .all(|c| c.name != mutate::SIDECAR_NAME)
            && init
                .iter()
                .filter(|c| c.name == mutate::SIDECAR_NAME)
                .count()
                == 1,
        "the sidecar is injected more than once"
    );
    Ok(&init[0])
}

/// The sidecar's environment in the stored pod, downward-API values resolved
/// against the pod.
fn sidecar_env(pod: &Pod) -> Result<BTreeMap<String, String>> {
    let pod_json = serde_json::to_value(pod)?;
    let mut env = BTreeMap::new();
    for var in sidecar_of(pod)?.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                let path = &from
                    .field_ref
                    .as_ref()
                    .with_context(|| format!("{} is not a fieldRef", var.name))?
                    .field_path;
                chart::field_path(&pod_json, path)
                    .with_context(|| format!("the pod has no {path} for {}", var.name))?
            }
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

/// What the webhook must have stored: a native sidecar in `mode`, the
/// projected token volume, the controller's address and CA, the inbound
/// upstream exactly when the pod names its port, and `CHAPERONE_MCP_URL` for
/// an agent's containers.
fn assert_injected(
    pod: &Pod,
    mode: &str,
    upstream: Option<u16>,
    controller_address: &str,
    ca: &str,
) -> Result<()> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let sidecar = sidecar_of(pod)?;
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "{name}: not a native sidecar"
    );
    let probe = sidecar
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .context("no readiness probe")?;
    assert_eq!(probe.path.as_deref(), Some("/readyz"), "{name}");
    let env = sidecar_env(pod)?;
    assert_eq!(
        env.get("CHAPERONE_MODE").map(String::as_str),
        Some(mode),
        "{name}"
    );
    assert_eq!(
        env.get(mutate::INBOUND_UPSTREAM_ENV),
        upstream.map(|p| format!("http://127.0.0.1:{p}")).as_ref(),
        "{name}"
    );
    assert_eq!(
        env.get(ENV_CONTROLLER_ADDRESS).map(String::as_str),
        Some(controller_address),
        "{name}"
    );
    assert_eq!(
        env.get("CHAPERONE_CA_PEM").map(String::as_str),
        Some(ca),
        "{name}"
    );
    assert_eq!(env.get("CHAPERONE_POD_NAME"), Some(&name), "{name}");
    let (_, audience) = token_source(pod)?;
    assert_eq!(audience, kube_fixtures::SIDECAR_AUDIENCE, "{name}");
    // An agent's containers are told where its proxy is; a tool server has none.
    for container in &pod.spec.as_ref().context("spec")?.containers {
        let url = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == mutate::MCP_URL_ENV)
            .and_then(|e| e.value.as_deref());
        let expected = (mode == "agent").then_some(mutate::MCP_URL);
        assert_eq!(url, expected, "{name}/{}", container.name);
    }
    Ok(())
}

/// Where the sidecar reads its token (mount path / file of the projected
/// token volume) and the audience the volume requests.
fn token_source(pod: &Pod) -> Result<(String, String)> {
    let spec = pod.spec.as_ref().context("spec")?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mutate::TOKEN_VOLUME)
        .context("no token volume")?;
    let token = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .into_iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .context("the token volume projects no ServiceAccount token")?;
    let mount = sidecar_of(pod)?
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == mutate::TOKEN_VOLUME)
        .context("the sidecar does not mount the token volume")?;
    Ok((
        format!("{}/{}", mount.mount_path, token.path),
        token.audience.clone().unwrap_or_default(),
    ))
}

// ---------------------------------------------------------------------------
// 3. The sidecars, as their pods' stand-ins.

/// Runs `pod`'s sidecar in this process: settings from the injected
/// environment (`Settings::from_lookup`), the token file replaced by a local
/// file holding a token bound to the pod for the volume's audience, and the
/// controller's Service name resolved to 127.0.0.1.
async fn stand_in(client: &Client, pod: &Pod, tokens: &Path) -> Result<TestSidecar> {
    let mut env = sidecar_env(pod)?;
    let (token_file, audience) = token_source(pod)?;
    assert_eq!(
        env.get(ENV_TOKEN_FILE),
        Some(&token_file),
        "the sidecar reads its token where the volume is mounted"
    );
    let token = kube_fixtures::bound_token(client, pod, &audience).await?;
    let dir = tokens.join(pod.metadata.name.as_deref().context("name")?);
    std::fs::create_dir_all(&dir)?;
    env.insert(
        ENV_TOKEN_FILE.into(),
        write_token(&dir, &token)?.display().to_string(),
    );
    let mut settings = Settings::from_lookup(|name| env.get(name).cloned())
        .map_err(|e| anyhow::anyhow!("the injected environment: {e}"))?;
    let controller = settings
        .controller
        .as_mut()
        .context("the injected environment names no controller")?;
    let port = controller
        .address
        .rsplit_once(':')
        .map(|(_, port)| port.to_owned())
        .context("controller address")?;
    controller.address = format!("127.0.0.1:{port}");
    TestSidecar::start(settings).await
}

// ---------------------------------------------------------------------------
// Helpers for the assertions.

/// Decision, rule and reason of the newest record of `sidecar` for `tool`.
fn last_decision(sidecar: &TestSidecar, tool: &str) -> Result<(String, String, String)> {
    let record = sidecar
        .audit
        .records()
        .into_iter()
        .rfind(|r| r["tool"] == tool)
        .with_context(|| format!("no record for {tool}"))?;
    let field = |name: &str| record[name].as_str().unwrap_or_default().to_owned();
    Ok((field("decision"), field("rule"), field("reason")))
}

/// The planner's policy: order reads and refunds up to 100 EUR on `orders`,
/// everything on the worker, invoice reads and credits up to 500 on billing
/// (what it may hand over); `extra` rules appended.
fn planner_policy(extra: &[Value]) -> Value {
    let mut rules = vec![
        json!({ "name": "allow-order-reads", "action": "allow", "tools": [{ "server": "orders", "name": "get_order" }] }),
        json!({ "name": "allow-refunds", "action": "allow", "tools": [{ "server": "orders", "name": "refund" }] }),
        json!({ "name": "deny-large-refunds", "action": "deny", "tools": [{ "server": "orders", "name": "refund" }],
                "when": { "args": [{ "pointer": "/amount", "greaterThan": 100 }] } }),
        json!({ "name": "allow-worker", "action": "allow", "tools": [{ "server": "worker", "name": "*" }] }),
        json!({ "name": "allow-invoice-reads", "action": "allow", "tools": [{ "server": "billing", "name": "get_invoice" }] }),
        json!({ "name": "allow-credits-up-to-500", "action": "allow", "tools": [{ "server": "billing", "name": "issue_credit" }],
                "when": { "args": [{ "pointer": "/amount", "lessThanOrEqual": 500 }] } }),
    ];
    rules.extend(extra.iter().cloned());
    tool_policy(
        "planner",
        json!({ "targetRefs": [{ "name": "planner" }], "rules": rules }),
    )
}

// ---------------------------------------------------------------------------
// Human approval (section 7 of the test).

/// The approval rule of the planner's policy: refunds above 100 (up to the
/// 1,000 that stays denied) need a person; the note is redacted.
fn approval_policy() -> Value {
    let mut policy = planner_policy(&[json!({
        "name": "large-refunds-need-approval", "action": "requireApproval",
        "tools": [{ "server": "orders", "name": "refund" }],
        "when": { "args": [{ "pointer": "/amount", "greaterThan": 100 }] },
        "approval": { "timeoutSeconds": 120, "validForSeconds": 60, "redactArguments": ["/note"] },
    })]);
    for rule in policy["spec"]["rules"].as_array_mut().into_iter().flatten() {
        if rule["name"] == "deny-large-refunds" {
            rule["when"]["args"][0]["greaterThan"] = json!(1000);
        }
    }
    policy
}

/// A person's decision as a status merge patch: `condition` (`Approved` or
/// `Denied`), and a `decidedBy` the webhook must overwrite.
async fn decide(
    client: Client,
    ns: &str,
    name: &str,
    condition: &str,
    reason: &str,
) -> kube::Result<ToolCallApproval> {
    let patch = json!({"status": {
        "conditions": [{"type": condition, "status": "True", "reason": reason, "message": "checked with the customer"}],
        "decidedBy": {"username": "somebody-else"},
    }});
    Api::<ToolCallApproval>::namespaced(client, ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

/// The newest pending ToolCallApproval for `refund` other than `except`.
async fn pending_refund(client: &Client, ns: &str, except: &str) -> Result<ToolCallApproval> {
    let api = Api::<ToolCallApproval>::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(15), async || {
        let list = api.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().find(|a| {
            a.spec.tool == "refund"
                && a.metadata.name.as_deref() != Some(except)
                && a.status.as_ref().and_then(|s| s.phase) == Some(ApprovalPhase::Pending)
        }))
    })
    .await
    .context("no pending ToolCallApproval for the held refund")
}

/// A refund of 250 is held until a person with the chart's approver role
/// approves it (not a user without it, not the agent's own ServiceAccount
/// even with the role); it then runs once, and the same call again waits
/// again; denied, it never reaches the tool.
async fn approval_scene(
    client: &Client,
    ns: &str,
    objects: &[Value],
    planner: &TestSidecar,
    agent: &McpClient,
    orders_seen: &SeenAssertions,
) -> Result<()> {
    let role = objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .find(|n| n.ends_with("-approver"))
        .context("the chart has no approver ClusterRole")?;
    for (name, subject) in [
        (
            "alice",
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}),
        ),
        (
            "planner",
            json!({"kind": "ServiceAccount", "name": "planner", "namespace": ns}),
        ),
    ] {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("approver-{name}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject],
        }))?;
        Api::<RoleBinding>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &binding)
            .await?;
    }
    let version = planner.sidecar.snapshots().current().map(|a| a.version());
    kube_fixtures::apply::<ToolPolicy>(client, ns, approval_policy()).await?;
    eventually(Duration::from_secs(10), async || {
        Ok((planner.sidecar.snapshots().current().map(|a| a.version()) > version).then_some(()))
    })
    .await
    .context("the approval rule never reached the planner's sidecar")?;

    let arguments = json!({"orderId": "ord-1001", "amount": 250, "note": "card ending 4242"});
    let before = orders_seen.lock().unwrap().len();
    let approve = async {
        let pending = pending_refund(client, ns, "").await?;
        let name = pending.metadata.name.clone().context("name")?;
        let spec = &pending.spec;
        assert_eq!(
            (
                spec.agent.as_str(),
                spec.service_account.as_str(),
                spec.pod.as_str()
            ),
            ("planner", "planner", "planner-0")
        );
        assert_eq!(spec.arguments["note"], "[redacted]", "{:?}", spec.arguments);
        assert_eq!(spec.arguments["amount"], 250);
        assert_eq!(spec.redacted_arguments, ["/note"]);
        assert_eq!(spec.rule, "large-refunds-need-approval");
        assert_eq!(spec.session.scope, "mcpSession");
        let without_role = decide(
            client_as("mallory", &[]).await?,
            ns,
            &name,
            "Approved",
            "Ok",
        )
        .await;
        ensure!(
            matches!(&without_role, Err(kube::Error::Api(e)) if e.code == 403),
            "a user without the approver role: {without_role:?}"
        );
        let agent_itself = client_as(&format!("system:serviceaccount:{ns}:planner"), &[]).await?;
        let own = decide(agent_itself, ns, &name, "Approved", "Ok").await;
        ensure!(
            matches!(&own, Err(kube::Error::Api(e)) if e.code == 403),
            "the agent's own ServiceAccount, though bound to the role: {own:?}"
        );
        let approved = decide(client_as("alice", &[]).await?, ns, &name, "Approved", "Ok").await?;
        let status = approved.status.context("status")?;
        assert_eq!(
            status.decided_by.map(|d| d.username).as_deref(),
            Some("alice"),
            "decidedBy is who approved, not what the request said"
        );
        anyhow::Ok(name)
    };
    let (result, approved) = tokio::join!(call(agent, "refund", arguments.clone()), approve);
    let approved = approved?;
    assert!(result.is_ok(), "the approved refund runs: {result:?}");
    assert_eq!(
        orders_seen.lock().unwrap().len(),
        before + 1,
        "exactly once"
    );
    let record = planner
        .audit
        .records()
        .into_iter()
        .rfind(|r| r["tool"] == "refund")
        .context("no refund record")?;
    assert_eq!(record["decision"], "allow", "{record}");
    assert_eq!(record["approval"]["name"], approved.as_str(), "{record}");
    assert_eq!(record["approval"]["decidedBy"], "alice", "{record}");
    let api = Api::<ToolCallApproval>::namespaced(client.clone(), ns);
    let used = eventually(Duration::from_secs(10), async || {
        let object = api.get(&approved).await?;
        Ok(object
            .status
            .filter(|s| s.phase == Some(ApprovalPhase::Consumed))
            .map(|s| s.consumed_by))
    })
    .await
    .context("the approval was never marked used")?;
    assert_eq!(used.as_deref(), Some("planner-0"));

    // The same call again waits again: a new request, denied this time.
    let deny = async {
        let pending = pending_refund(client, ns, &approved).await?;
        let name = pending.metadata.name.clone().context("name")?;
        decide(
            client_as("alice", &[]).await?,
            ns,
            &name,
            "Denied",
            "NotThisTime",
        )
        .await?;
        anyhow::Ok(name)
    };
    let (result, denied) = tokio::join!(call(agent, "refund", arguments), deny);
    let denied = denied?;
    let error = result.err().context("a denied call is refused")?;
    assert!(
        error.contains("NotThisTime") && error.contains("alice") && error.contains(&denied),
        "the refusal names the reason, the denier and the object: {error}"
    );
    assert_eq!(
        orders_seen.lock().unwrap().len(),
        before + 1,
        "a denied call never reaches the tool"
    );
    // The decisions as Events on the agent's pod.
    eventually(Duration::from_secs(15), async || {
        let text = kubectl_async(
            ["get", "events", "-n", ns, "-o", "wide"]
                .map(String::from)
                .into(),
            None,
        )
        .await?;
        let on_pod = |reason: &str| {
            text.lines()
                .any(|l| l.contains(reason) && l.contains("pod/planner-0"))
        };
        Ok(["ApprovalRequested", "ApprovalGranted", "ApprovalDenied"]
            .into_iter()
            .all(on_pod)
            .then_some(()))
    })
    .await
    .context("no ApprovalRequested/Granted/Denied Events on planner-0")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The test.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_chain_on_the_real_api_server() -> Result<()> {
    let started = Instant::now();
    // RUST_LOG=warn (say) shows what the controller and the sidecars log.
    if std::env::var_os("RUST_LOG").is_some() {
        chaperone_controller::init_logging(chaperone_controller::LogFormat::Text);
    }
    let cp = tokio::task::spawn_blocking(ControlPlane::shared).await?;
    let client = cp.client().await?;
    let release_ns = create_namespace(&client, "chaperone-system").await?;
    let ns = create_namespace(&client, "acceptance").await?;
    let tokens = tempfile::tempdir()?;

    // --- 1. The chart's manifests; the controller as the Deployment's pod. --
    let objects = install_chart(&release_ns).await?;
    let controller = start_controller(&client, &release_ns, &objects).await?;
    point_webhook_at(&client, &objects, &controller).await?;
    let ca = std::fs::read_to_string(&controller.ca_file)?;
    eprintln!(
        "chart applied, controller and webhook up: {:?}",
        started.elapsed()
    );

    // --- 2. Annotated pods through the API server, stored injected. --------
    // The tool server and the worker app listen first: their ports are the
    // pods' inbound-port annotations.
    let billing_listener = loopback_listener().await?;
    let worker_app_listener = loopback_listener().await?;
    let billing_port = billing_listener.local_addr()?.port();
    let worker_app_port = worker_app_listener.local_addr()?.port();
    for sa in ["planner", "worker", "billing"] {
        kube_fixtures::ensure_service_account(&client, &ns, sa).await?;
    }
    let planner_created = create_through_webhook(
        &client,
        &ns,
        agent_pod(
            "planner-0",
            "planner",
            json!({ mutate::INJECT_ANNOTATION: "true" }),
        ),
    )
    .await?;
    let worker_created = create_through_webhook(
        &client,
        &ns,
        agent_pod(
            "worker-0",
            "worker",
            json!({
                mutate::INJECT_ANNOTATION: "true",
                mutate::INBOUND_PORT_ANNOTATION: worker_app_port.to_string(),
            }),
        ),
    )
    .await?;
    let billing_created = create_through_webhook(
        &client,
        &ns,
        agent_pod(
            "billing-0",
            "billing",
            json!({
                mutate::INJECT_ANNOTATION: "tool",
                mutate::INBOUND_PORT_ANNOTATION: billing_port.to_string(),
                mutate::AUDIENCE_ANNOTATION: TOOL_AUDIENCE,
            }),
        ),
    )
    .await?;
    // What the API server stored, read back.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let (planner_pod, worker_pod, billing_pod) = (
        pods.get("planner-0").await?,
        pods.get("worker-0").await?,
        pods.get("billing-0").await?,
    );
    for (stored, created) in [
        (&planner_pod, &planner_created),
        (&worker_pod, &worker_created),
        (&billing_pod, &billing_created),
    ] {
        assert_eq!(
            stored.spec, created.spec,
            "the create response is what is stored"
        );
    }
    let service = chart::object_of_kind(&objects, "Deployment")?["metadata"]["name"]
        .as_str()
        .context("name")?
        .to_owned();
    let controller_address = format!("{service}.{release_ns}.svc:{}", controller.grpc_port);
    assert_injected(&planner_pod, "agent", None, &controller_address, &ca)?;
    assert_injected(
        &worker_pod,
        "agent",
        Some(worker_app_port),
        &controller_address,
        &ca,
    )?;
    assert_injected(
        &billing_pod,
        "tool",
        Some(billing_port),
        &controller_address,
        &ca,
    )?;

    // --- 3. The sidecars, configured from the stored pods. -----------------
    let planner = stand_in(&client, &planner_pod, tokens.path()).await?;
    let worker = stand_in(&client, &worker_pod, tokens.path()).await?;
    let tool = stand_in(&client, &billing_pod, tokens.path()).await?;
    assert!(planner.inbound_port.is_none(), "A names no inbound port");
    // No AgentIdentity yet: closed, and not ready (the injected readiness probe).
    assert_eq!(
        planner.ready_status().await,
        503,
        "ready without a snapshot"
    );

    // The tool servers and the worker's app.
    let billing_seen = SeenAssertions::default();
    serve_mcp(
        billing_listener,
        ToolServer::new(ToolSet::Billing).recording(Arc::clone(&billing_seen)),
    )
    .await?;
    let orders_seen = SeenAssertions::default();
    let orders = serve_mcp(
        loopback_listener().await?,
        ToolServer::new(ToolSet::Orders).recording(Arc::clone(&orders_seen)),
    )
    .await?;
    serve_mcp(
        worker_app_listener,
        WorkerApp::new(
            format!("http://127.0.0.1:{}", worker.proxy_port),
            ["billing".to_owned()],
        ),
    )
    .await?;

    // Policies and the grant first, identities last: the first snapshots are whole.
    let url = |port: u16| format!("http://127.0.0.1:{port}/mcp");
    kube_fixtures::apply::<ToolPolicy>(&client, &ns, planner_policy(&[])).await?;
    kube_fixtures::apply::<ToolPolicy>(
        &client,
        &ns,
        tool_policy(
            "worker",
            json!({
                "targetRefs": [{ "name": "worker" }],
                "rules": [
                    { "name": "allow-invoice-reads", "action": "allow", "tools": [{ "server": "billing", "name": "get_invoice" }] },
                    { "name": "allow-credits", "action": "allow", "tools": [{ "server": "billing", "name": "issue_credit" }],
                      "when": { "args": [{ "pointer": "/amount", "lessThanOrEqual": 1000 }] } },
                ],
            }),
        ),
    )
    .await?;
    kube_fixtures::apply::<DelegationGrant>(
        &client,
        &ns,
        delegation_grant(
            "planner-to-worker",
            json!({
                "from": { "name": "planner" }, "to": { "name": "worker" },
                "tools": [
                    { "server": "billing", "name": "get_invoice" },
                    { "server": "billing", "name": "issue_credit" },
                ],
                "when": { "expression": "tool != 'issue_credit' || args.amount <= 200" },
                "maxDepth": 0,
                "ttl": "1h",
            }),
        ),
    )
    .await?;
    kube_fixtures::apply::<AgentIdentity>(
        &client,
        &ns,
        agent_identity(
            "worker",
            json!({
                "selector": { "serviceAccountName": "worker" },
                "toolServers": [
                    { "name": "billing", "url": url(tool.inbound()?), "audience": TOOL_AUDIENCE },
                ],
                "delegation": { "requireDelegation": true },
            }),
        ),
    )
    .await?;
    kube_fixtures::apply::<AgentIdentity>(
        &client,
        &ns,
        agent_identity(
            "planner",
            json!({
                "selector": { "serviceAccountName": "planner" },
                "toolServers": [
                    { "name": "orders", "url": url(orders) },
                    { "name": "worker", "url": url(worker.inbound()?), "agent": "worker" },
                ],
            }),
        ),
    )
    .await?;
    for (sidecar, grants) in [(&planner, 0), (&worker, 1)] {
        let source = Arc::clone(sidecar.sidecar.snapshots());
        eventually(Duration::from_secs(20), async || {
            Ok(source
                .current()
                .filter(|a| a.snapshot.content.grants_received.len() >= grants)
                .map(|_| ()))
        })
        .await
        .with_context(|| format!("no snapshot for {}", sidecar.sidecar.pod_name()))?;
    }
    for (holder, of) in [(&worker, &planner), (&tool, &worker)] {
        holder.wait_for_key_of(of).await?;
    }
    for sidecar in [&planner, &worker] {
        assert_eq!(sidecar.ready_status().await, 200, "ready with a snapshot");
    }
    eprintln!("pods injected, sidecars in sync: {:?}", started.elapsed());

    // --- 4. An MCP client at A's sidecar, calling the orders server. -------
    let (planner_id, worker_id) = (
        agent_subject(&format!("{ns}/planner")),
        agent_subject(&format!("{ns}/worker")),
    );
    let agent = mcp_session(
        &format!("http://127.0.0.1:{}/orders", planner.proxy_port),
        None,
    )
    .await?;
    // Filtered: only the tools some call could be allowed.
    assert_eq!(tool_names(&agent).await?, ["get_order", "refund"]);
    let order = call(&agent, "get_order", json!({"id": "ord-1001"})).await;
    assert!(
        order.as_ref().is_ok_and(|t| t.contains("ord-1001")),
        "{order:?}"
    );
    let claims = claims_of(&last_assertion(&orders_seen).context("orders got no assertion")?)?;
    assert_eq!(claims["iss"], planner_id, "{claims}");
    assert_eq!(claims["tool"], "get_order", "{claims}");
    let refund = call(
        &agent,
        "refund",
        json!({"orderId": "ord-1001", "amount": 40}),
    )
    .await;
    assert!(refund.is_ok(), "a refund of 40 is allowed: {refund:?}");
    let before = orders_seen.lock().unwrap().len();
    let refund = call(
        &agent,
        "refund",
        json!({"orderId": "ord-1001", "amount": 400}),
    )
    .await;
    assert!(
        refund
            .as_ref()
            .is_err_and(|e| e.contains("deny-large-refunds")),
        "a refund of 400 is denied by its amount: {refund:?}"
    );
    assert_eq!(
        orders_seen.lock().unwrap().len(),
        before,
        "a denied call never reaches the tool"
    );
    let (decision, rule, _) = last_decision(&planner, "refund")?;
    assert_eq!(decision, "deny");
    assert!(rule.ends_with("deny-large-refunds"), "{rule}");
    let deleted = call(&agent, "delete_order", json!({"id": "ord-1001"})).await;
    assert!(deleted.is_err(), "not listed, not callable: {deleted:?}");

    // --- 5. Delegation A → B: B's worker app calls billing in A's session. -
    let delegate = mcp_session(
        &format!("http://127.0.0.1:{}/worker", planner.proxy_port),
        None,
    )
    .await?;
    assert_eq!(tool_names(&delegate).await?, ["run_billing"]);
    let via_worker = async |tool: &str, arguments: Value| {
        call(
            &delegate,
            "run_billing",
            json!({"tool": tool, "arguments": arguments}),
        )
        .await
    };
    let invoice = via_worker("get_invoice", json!({"invoice": "INV-1001"})).await;
    assert!(
        invoice.as_ref().is_ok_and(|t| t.contains("INV-1001")),
        "{invoice:?}"
    );
    // The tool's assertion: the worker acts, for the planner, under the grant.
    let claims = claims_of(&last_assertion(&billing_seen).context("billing got no assertion")?)?;
    eprintln!("the billing tool's assertion: {claims}");
    assert_eq!(claims["iss"], worker_id, "{claims}");
    assert_eq!(claims["aud"], TOOL_AUDIENCE, "{claims}");
    assert_eq!(claims["tool"], "get_invoice", "{claims}");
    assert_eq!(claims["act"]["sub"], worker_id, "{claims}");
    assert_eq!(
        claims["act"]["grant"],
        format!("{ns}/planner-to-worker"),
        "{claims}"
    );
    assert_eq!(claims["act"]["act"]["sub"], planner_id, "{claims}");
    assert!(claims["act"]["act"].get("act").is_none(), "{claims}");
    let (decision, _, _) = last_decision(&worker, "get_invoice")?;
    assert_eq!(decision, "allow");
    let record = worker
        .audit
        .records()
        .into_iter()
        .rfind(|r| r["tool"] == "get_invoice")
        .context("no worker record")?;
    assert_eq!(
        record["chain"],
        json!([format!("{ns}/planner"), format!("{ns}/worker")]),
        "{record}"
    );
    // Beyond the grant (credits ≤ 200), though both agents' own policies allow it.
    let credit = via_worker(
        "issue_credit",
        json!({"invoice": "INV-1001", "amount": 300}),
    )
    .await;
    assert!(
        credit.as_ref().is_err_and(|e| e.contains("delegation")),
        "{credit:?}"
    );
    let (decision, rule, reason) = last_decision(&worker, "issue_credit")?;
    assert_eq!(
        (decision.as_str(), rule.as_str()),
        ("deny", "delegation"),
        "{reason}"
    );
    let credit = via_worker(
        "issue_credit",
        json!({"invoice": "INV-1001", "amount": 150}),
    )
    .await;
    assert!(credit.is_ok(), "{credit:?}");
    // The denial as an Event, read through kubectl, with the chain.
    let chain = format!("chain: {ns}/planner → {ns}/worker");
    let events = eventually(Duration::from_secs(15), async || {
        let text = kubectl_async(
            ["get", "events", "-n", &ns, "-o", "wide"]
                .map(String::from)
                .into(),
            None,
        )
        .await?;
        let found = text.lines().any(|l| {
            l.contains("ToolCallDenied")
                && l.contains("pod/worker-0")
                && l.contains("issue_credit")
                && l.contains(&chain)
        });
        Ok(found.then_some(text))
    })
    .await
    .context("no ToolCallDenied Event on worker-0 naming the chain")?;
    assert!(
        events.lines().any(|l| l.contains("ToolCallDenied")
            && l.contains("pod/planner-0")
            && l.contains("refund")),
        "the planner's own denial is an Event too:\n{events}"
    );

    eprintln!("events:\n{events}");
    // The status the leader writes (the chart's Lease and RBAC): A's sidecar
    // connected and in sync, the tools it saw, governed or not.
    let status = eventually(Duration::from_secs(20), async || {
        let text = kubectl_async(
            ["get", "agentidentity", "planner", "-n", &ns, "-o", "json"]
                .map(String::from)
                .into(),
            None,
        )
        .await?;
        let status = serde_json::from_str::<Value>(&text)?["status"].clone();
        let ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let orders = status["discoveredTools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["server"] == "orders")
            .count();
        Ok((ready && status["sidecarsInSync"] == 1 && orders == 4).then_some(status))
    })
    .await
    .context("the planner's status never showed its sidecar in sync and its tools")?;
    let governed = |name: &str| {
        status["discoveredTools"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["server"] == "orders" && t["name"] == name)
            .map(|t| t["governed"] == true)
    };
    assert_eq!(governed("get_order"), Some(true), "{status}");
    assert_eq!(governed("delete_order"), Some(false), "{status}");
    eprintln!("the planner's status: {status}");

    // --- 6. A policy change mid-session, enforced on the next call. --------
    let order = call(&agent, "get_order", json!({"id": "ord-1002"})).await;
    assert!(order.is_ok(), "{order:?}");
    let version = planner
        .sidecar
        .snapshots()
        .current()
        .map(|a| a.version())
        .context("no snapshot")?;
    let changed = Instant::now();
    kube_fixtures::apply::<ToolPolicy>(
        &client,
        &ns,
        planner_policy(&[json!({
            "name": "freeze-order-reads", "action": "deny",
            "tools": [{ "server": "orders", "name": "get_order" }],
        })]),
    )
    .await?;
    let denied = loop {
        match call(&agent, "get_order", json!({"id": "ord-1002"})).await {
            Err(err) => break err,
            Ok(_) if changed.elapsed() > Duration::from_secs(5) => {
                bail!("get_order still allowed 5 s after the policy change")
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    eprintln!(
        "policy change enforced after {:?}: {denied}",
        changed.elapsed()
    );
    assert!(denied.contains("freeze-order-reads"), "{denied}");
    assert!(
        planner.sidecar.snapshots().current().map(|a| a.version()) > Some(version),
        "a new snapshot version"
    );
    assert_eq!(tool_names(&agent).await?, ["refund"], "the listing follows");

    // --- 7. A refund above 100 waits for a person's approval. --------------
    approval_scene(&client, &ns, &objects, &planner, &agent, &orders_seen).await?;
    eprintln!("approvals granted and denied: {:?}", started.elapsed());
    let _ = agent.cancel().await;
    let _ = delegate.cancel().await;

    // --- 8. The trail across the three sidecars verifies. ------------------
    // Each sidecar ends its trail with a signed final checkpoint (what it
    // does at shutdown). Callers first: B's delegated session links to A's
    // records, the tool's records to B's; strict, so nothing may dangle or be
    // unproven.
    let sidecars = [&planner, &worker, &tool];
    for s in sidecars {
        s.sidecar.close_audit()?;
    }
    let combined: String = sidecars.iter().map(|s| s.audit.text()).collect();
    // With the keys the controller archived (what `chaperonectl audit keys`
    // prints, and what outlives the pods): the tool-mode sidecar's is among
    // them, although the controller's JWKS never lists it.
    let kids: Vec<String> = sidecars
        .iter()
        .map(|s| s.sidecar.key_registration().kid.clone())
        .collect();
    let jwks = eventually(Duration::from_secs(20), async || {
        let jwks = kube_fixtures::archived_keys(&client, &release_ns, &ns).await?;
        let text = jwks.to_string();
        Ok(kids.iter().all(|kid| text.contains(kid)).then_some(jwks))
    })
    .await
    .context("the audit-key archive never held the three sidecars' keys")?;
    let live = http_get_async(controller.admin_port, "/.well-known/jwks.json").await;
    assert!(
        !live.contains(&tool.sidecar.key_registration().kid),
        "a tool-mode sidecar's key never verifies assertions: {live}"
    );
    let summary = verify_strict(&combined, &jwks)?;
    assert_eq!(
        summary.records + summary.checkpoints,
        combined.lines().count(),
        "{summary:?}"
    );
    assert!(summary.sidecars.iter().all(|t| t.closed), "{summary:?}");
    assert!(summary.cross_session_links >= 2, "{summary:?}");
    // Tampering with a record breaks its sidecar's chain: A's first allowed
    // order read, turned into a denial.
    let broken = assert_tampering_detected(&combined, "get_order", &jwks)?;
    eprintln!("the tampered trail: {broken}");
    eprintln!(
        "acceptance: {} audit records, {:?} in all",
        summary.records,
        started.elapsed()
    );
    Ok(())
}
