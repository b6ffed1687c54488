//! Who may approve a tool call, on a real API server: the approval webhook
//! (the controller's HTTPS server at `/approve-toolcallapprovals`) registered
//! with the chart's own entry (its rules: CREATE of `toolcallapprovals`,
//! UPDATE of `toolcallapprovals/status`), and people holding the chart's
//! `approver` ClusterRole through a RoleBinding. Users are impersonated by the
//! admin, so the API server authenticates them and puts them in the
//! AdmissionRequest's user info as it would any user.
//!
//! Only the controller creates ToolCallApprovals; a user without the approver
//! role is refused (even one RBAC lets update the status); one with it
//! approves, and `decidedBy` names that user whatever the request said; the
//! agent's ServiceAccount cannot approve its own call even with the role; a
//! decided request cannot be decided again; the controller's own updates
//! consume but never decide.

use std::{
    net::SocketAddr,
    path::Path,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use chaperone_api::approval::ToolCallApproval;
use chaperone_controller::{
    certs::{self, CertConfig, Lifetimes},
    webhook::{self, ApprovalAdmission, InjectionSettings, WebhookState},
};
use chaperone_testenv::{
    ControlPlane, Tool, chart, create_namespace, kube_fixtures, kube_fixtures::client_as,
    unique_suffix,
};
use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        rbac::v1::{ClusterRole, Role, RoleBinding},
    },
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::reflector,
};
use serde_json::{Value, json};

/// The chart's entry for the approval webhook.
const CHART_ENTRY: &str = "toolcallapprovals.approve.chaperone.dev";

/// What every test of this binary shares: the webhook, registered, and the
/// chart's approver ClusterRole.
struct Shared {
    /// The controller's username (a ServiceAccount of the controller's
    /// namespace), which the webhook admits creations from.
    controller: String,
    /// The name of the approver ClusterRole (the chart's, renamed for this
    /// run).
    approver_role: String,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let cp = ControlPlane::shared();
        kube_fixtures::install_crds(cp).expect("installing the CRDs");
        let rendered = render_chart().expect("rendering the chart");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                match start(cp, &rendered).await {
                    Ok((shared, server)) => {
                        let _ = tx.send(Ok(shared));
                        let _ = server.wait().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                    }
                }
            });
        });
        match rx.recv() {
            Ok(Ok(shared)) => shared,
            Ok(Err(e)) => panic!("could not start the approval webhook: {e}"),
            Err(e) => panic!("webhook thread died: {e}"),
        }
    })
}

/// The chart's objects, rendered with default values.
fn render_chart() -> Result<Vec<Value>> {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-home-approvals");
    std::fs::create_dir_all(&home)?;
    let chart_dir = chart::chart_dir();
    let chart_dir = chart_dir.to_str().context("UTF-8 path")?;
    let manifest = chart::helm_ok_with(
        Tool::Helm,
        &home,
        &[
            "template",
            "chaperone",
            chart_dir,
            "--namespace",
            "chaperone-system",
        ],
        None,
    )?;
    chart::manifest_documents(&manifest)
}

async fn start(cp: &ControlPlane, rendered: &[Value]) -> Result<(Shared, webhook::BoundWebhook)> {
    let client = cp.client().await?;
    let suffix = unique_suffix();
    let controller_namespace = create_namespace(&client, "chaperone-system").await?;
    let controller = format!("system:serviceaccount:{controller_namespace}:chaperone-controller");

    let config = CertConfig {
        namespace: controller_namespace.clone(),
        secret_name: "chaperone-controller-tls".to_string(),
        sans: certs::service_sans(
            "chaperone-controller",
            &controller_namespace,
            &["127.0.0.1".to_string()],
        ),
        lifetimes: Lifetimes::default(),
        renew_interval: Duration::from_secs(3600),
        source: certs::CertSource::SelfManaged,
    };
    let material = certs::ensure_with(client.clone(), &config).await?;
    let ca_pem = material.ca_pem.clone();
    let tls = certs::spawn_renewal(client.clone(), config, material);

    let (identities, _writer) = reflector::store();
    let state = WebhookState::new(
        client.clone(),
        InjectionSettings::new(
            "chaperone-sidecar:test",
            format!("chaperone-controller.{controller_namespace}.svc:9090"),
            &controller_namespace,
        ),
        identities,
    )
    .with_approvals(ApprovalAdmission::new(client.clone(), controller.clone()));
    let server = webhook::bind("127.0.0.1:0".parse()?, tls, std::sync::Arc::new(state)).await?;
    register_chart_entry(&client, rendered, server.local_addr, &ca_pem, &suffix).await?;

    // The chart's approver ClusterRole, under a name of this run.
    let mut role = rendered
        .iter()
        .find(|o| {
            o["kind"] == "ClusterRole"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-approver"))
        })
        .context("the chart renders no approver ClusterRole")?
        .clone();
    let approver_role = format!("chaperone-approver-{suffix}");
    role["metadata"] = json!({"name": approver_role});
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(role)?)
        .await
        .context("creating the approver ClusterRole")?;

    let shared = Shared {
        controller,
        approver_role,
    };
    wait_until_admitting(&shared).await?;
    Ok((shared, server))
}

/// Registers the chart's approval entry, pointed at `addr` (a URL and the
/// caBundle instead of the Service, which has no endpoints here).
async fn register_chart_entry(
    client: &Client,
    rendered: &[Value],
    addr: SocketAddr,
    ca_pem: &str,
    suffix: &str,
) -> Result<()> {
    let config = chart::object_of_kind(rendered, "MutatingWebhookConfiguration")?;
    let mut entry = config["webhooks"]
        .as_array()
        .context("webhooks")?
        .iter()
        .find(|w| w["name"] == CHART_ENTRY)
        .with_context(|| format!("the chart has no webhook entry {CHART_ENTRY}"))?
        .clone();
    let path = entry["clientConfig"]["service"]["path"]
        .as_str()
        .context("the entry's path")?
        .to_owned();
    assert_eq!(path, webhook::APPROVAL_PATH);
    entry["clientConfig"] = json!({
        "url": format!("https://{addr}{path}"),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
    });
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": format!("chaperone-approvals-{suffix}")},
        "webhooks": [entry],
    }))?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .context("registering the approval webhook")?;
    Ok(())
}

/// The API server picks up webhook configurations asynchronously: creates
/// probes as the admin until the webhook refuses one.
async fn wait_until_admitting(shared: &Shared) -> Result<()> {
    let admin = ControlPlane::shared().client().await?;
    let ns = create_namespace(&admin, "probe").await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let outcome = create_approval(&admin, &ns, "support-bot").await;
        match outcome {
            Err(e) if e.to_string().contains("only the Chaperone controller") => return Ok(()),
            other => {
                if Instant::now() > deadline {
                    bail!(
                        "the approval webhook never refused the admin's creation (controller {}): {other:?}",
                        shared.controller
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The controller: its ServiceAccount's username; `system:masters` stands in
/// for the chart's controller RBAC, which is not under test here.
async fn controller_client() -> Result<Client> {
    client_as(&shared().controller, &["system:masters"]).await
}

/// A ToolCallApproval for `agent` (ServiceAccount of the same name) whose
/// rule is in ToolPolicy `refunds`, as the controller writes it.
fn approval_object(agent: &str) -> Result<ToolCallApproval> {
    let now = Timestamp::now();
    let rfc3339 = |t: Timestamp| {
        Timestamp::from_second(t.as_second())
            .unwrap_or(t)
            .to_string()
    };
    Ok(serde_json::from_value(json!({
        "apiVersion": "chaperone.dev/v1alpha1",
        "kind": "ToolCallApproval",
        "metadata": {"generateName": format!("{agent}-")},
        "spec": {
            "agent": agent,
            "serviceAccount": agent,
            "pod": format!("{agent}-5d9f-abcde"),
            "session": {"scope": "task", "key": "task-1"},
            "server": "billing",
            "tool": "refund",
            "arguments": {"amount": 500, "card": "[redacted]"},
            "redactedArguments": ["/card"],
            "argsDigest": "ab".repeat(32),
            "argsAlg": "sha256-rfc8785",
            "policy": {"namespace": "placeholder", "name": "refunds"},
            "rule": "large-refunds",
            "requestedAt": rfc3339(now),
            "expiresAt": rfc3339(now + SignedDuration::from_secs(600)),
            "validForSeconds": 300
        }
    }))?)
}

/// Creates a ToolCallApproval in `ns` with `client`.
async fn create_approval(client: &Client, ns: &str, agent: &str) -> Result<ToolCallApproval> {
    let mut object = approval_object(agent)?;
    object.spec.policy.namespace = ns.to_owned();
    Ok(Api::<ToolCallApproval>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await?)
}

/// A namespace with a Pending ToolCallApproval of agent `support-bot`, created
/// and set Pending by the controller. Returns the namespace and the object.
async fn pending_approval() -> Result<(String, ToolCallApproval)> {
    let admin = ControlPlane::shared().client().await?;
    let ns = create_namespace(&admin, "approvals").await?;
    let controller = controller_client().await?;
    let created = create_approval(&controller, &ns, "support-bot").await?;
    let name = created.metadata.name.clone().context("a name")?;
    let mut pending = created.clone();
    pending.status = Some(serde_json::from_value(json!({"phase": "Pending"}))?);
    let pending = Api::<ToolCallApproval>::namespaced(controller, &ns)
        .replace_status(&name, &PostParams::default(), &pending)
        .await
        .context("the controller sets Pending")?;
    Ok((ns, pending))
}

/// Binds the approver ClusterRole to `user` in `ns`.
async fn bind_approver(ns: &str, user: &str) -> Result<()> {
    let admin = ControlPlane::shared().client().await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("approver-{}", unique_suffix())},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": shared().approver_role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))?;
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// Lets `user` read and update the status of ToolCallApprovals in `ns`, but
/// not `approve` any ToolPolicy: RBAC lets the update through to the webhook.
async fn bind_status_writer(ns: &str, user: &str) -> Result<()> {
    let admin = ControlPlane::shared().client().await?;
    let name = format!("status-writer-{}", unique_suffix());
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": ["chaperone.dev"], "resources": ["toolcallapprovals"], "verbs": ["get", "list"]},
            {"apiGroups": ["chaperone.dev"], "resources": ["toolcallapprovals/status"], "verbs": ["get", "update", "patch"]},
        ],
    }))?;
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))?;
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// `client` adds a `type_` condition to the status of `name` (a merge patch
/// of the status subresource, as `kubectl patch --subresource=status` sends),
/// with `extra` status fields.
async fn decide(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    extra: Value,
) -> Result<ToolCallApproval> {
    let mut status = json!({
        "conditions": [{
            "type": type_,
            "status": "True",
            "reason": "Reviewed",
            "message": "checked against the ticket",
        }],
    });
    if let (Some(status), Value::Object(extra)) = (status.as_object_mut(), extra) {
        status.extend(extra);
    }
    Ok(Api::<ToolCallApproval>::namespaced(client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?)
}

fn name_of(object: &ToolCallApproval) -> Result<&str> {
    object.metadata.name.as_deref().context("a name")
}

/// Asserts `result` is the webhook's refusal with HTTP status `code` and its
/// message holds `parts`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T>, code: u16, parts: &[&str]) {
    let error = match result {
        Ok(admitted) => panic!("admitted, expected a refusal: {admitted:?}"),
        Err(e) => e,
    };
    let message = format!("{error:#}");
    match error.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(status)) => assert_eq!(status.code, code, "{message}"),
        _ => panic!("not an API error: {message}"),
    }
    assert!(
        message.contains(CHART_ENTRY),
        "not refused by the approval webhook: {message}"
    );
    for part in parts {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[tokio::test]
async fn only_the_controller_creates_approvals() -> Result<()> {
    let admin = ControlPlane::shared().client().await?;
    let ns = create_namespace(&admin, "create").await?;
    assert_refused(
        create_approval(&admin, &ns, "support-bot").await,
        403,
        &["only the Chaperone controller", "chaperone-test-admin"],
    );
    let user = format!("alice-{}", unique_suffix());
    bind_approver(&ns, &user).await?;
    let alice = client_as(&user, &["system:masters"]).await?;
    assert_refused(
        create_approval(&alice, &ns, "support-bot").await,
        403,
        &["only the Chaperone controller", &user],
    );
    let created = create_approval(&controller_client().await?, &ns, "support-bot").await?;
    assert!(name_of(&created)?.starts_with("support-bot-"));
    Ok(())
}

#[tokio::test]
async fn a_user_without_the_approver_role_is_refused() -> Result<()> {
    let (ns, pending) = pending_approval().await?;
    let name = name_of(&pending)?;
    let user = format!("bob-{}", unique_suffix());
    bind_status_writer(&ns, &user).await?;
    let bob = client_as(&user, &[]).await?;
    for type_ in ["Approved", "Denied"] {
        assert_refused(
            decide(&bob, &ns, name, type_, json!({})).await,
            403,
            &[&user, &format!("{ns}/refunds"), "\"approve\""],
        );
    }
    let stored = Api::<ToolCallApproval>::namespaced(controller_client().await?, &ns)
        .get(name)
        .await?;
    assert_eq!(
        stored.status, pending.status,
        "the refused updates changed nothing"
    );
    Ok(())
}

#[tokio::test]
async fn an_approver_approves_and_decided_by_names_them_not_whom_the_request_named() -> Result<()> {
    let (ns, pending) = pending_approval().await?;
    let name = name_of(&pending)?;
    let user = format!("alice-{}", unique_suffix());
    let group = format!("payments-oncall-{}", unique_suffix());
    bind_approver(&ns, &user).await?;
    let alice = client_as(&user, &[&group]).await?;
    let before = Timestamp::now().as_second();
    let approved = decide(
        &alice,
        &ns,
        name,
        "Approved",
        json!({
            "decidedBy": {"username": "mallory", "groups": ["system:masters"]},
            "decidedAt": "2020-01-01T00:00:00Z",
            "validUntil": "2099-01-01T00:00:00Z",
            "phase": "Denied",
        }),
    )
    .await?;
    let status = approved.status.context("a status")?;
    let decider = status.decided_by.context("decidedBy")?;
    assert_eq!(decider.username, user);
    assert!(decider.groups.contains(&group), "{:?}", decider.groups);
    assert!(!decider.groups.iter().any(|g| g == "system:masters"));
    assert_eq!(status.phase.map(|p| p.as_str()), Some("Approved"));
    let decided_at: Timestamp = status.decided_at.context("decidedAt")?.parse()?;
    assert!(decided_at.as_second() >= before, "decidedAt {decided_at}");
    let valid_until: Timestamp = status.valid_until.context("validUntil")?.parse()?;
    assert_eq!(valid_until, decided_at + SignedDuration::from_secs(300));
    let condition = &status.conditions[0];
    assert_eq!(
        (condition.type_.as_str(), condition.status.as_str()),
        ("Approved", "True")
    );
    assert_eq!(condition.last_transition_time.0, decided_at);
    assert_eq!(condition.observed_generation, pending.metadata.generation);
    Ok(())
}

#[tokio::test]
async fn a_bare_denial_gets_its_time_filled_in_and_no_valid_until() -> Result<()> {
    let (ns, pending) = pending_approval().await?;
    let name = name_of(&pending)?;
    let user = format!("carol-{}", unique_suffix());
    bind_approver(&ns, &user).await?;
    let carol = client_as(&user, &[]).await?;
    // No lastTransitionTime, reason or message: the schema requires them, and
    // the webhook (which runs before validation) fills them in.
    let denied = Api::<ToolCallApproval>::namespaced(carol, &ns)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": [{"type": "Denied", "status": "True"}]}}),
            ),
        )
        .await?;
    let status = denied.status.context("a status")?;
    assert_eq!(status.phase.map(|p| p.as_str()), Some("Denied"));
    assert_eq!(status.valid_until, None);
    assert_eq!(status.decided_by.context("decidedBy")?.username, user);
    assert_eq!(status.conditions[0].reason, "Denied");
    Ok(())
}

#[tokio::test]
async fn the_agents_service_account_cannot_approve_its_call_even_with_the_role() -> Result<()> {
    let (ns, pending) = pending_approval().await?;
    let name = name_of(&pending)?;
    let agent = format!("system:serviceaccount:{ns}:support-bot");
    let admin = ControlPlane::shared().client().await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "agent-approves"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": shared().approver_role},
        "subjects": [{"kind": "ServiceAccount", "name": "support-bot", "namespace": ns}],
    }))?;
    Api::<RoleBinding>::namespaced(admin, &ns)
        .create(&PostParams::default(), &binding)
        .await?;
    let agent_client = client_as(&agent, &[]).await?;
    for type_ in ["Approved", "Denied"] {
        assert_refused(
            decide(&agent_client, &ns, name, type_, json!({})).await,
            403,
            &[&agent, "cannot approve or deny its own calls"],
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_decided_request_cannot_be_decided_again() -> Result<()> {
    let (ns, pending) = pending_approval().await?;
    let name = name_of(&pending)?;
    let user = format!("dave-{}", unique_suffix());
    bind_approver(&ns, &user).await?;
    let dave = client_as(&user, &[]).await?;
    let approved = decide(&dave, &ns, name, "Approved", json!({})).await?;
    assert_refused(
        decide(&dave, &ns, name, "Denied", json!({})).await,
        409,
        &[&user, "only a Pending request can be decided"],
    );
    assert_refused(
        decide(&dave, &ns, name, "Approved", json!({})).await,
        409,
        &["only a Pending request can be decided"],
    );
    let stored = Api::<ToolCallApproval>::namespaced(dave, &ns)
        .get(name)
        .await?;
    assert_eq!(stored.status, approved.status);
    Ok(())
}

#[tokio::test]
async fn the_controller_consumes_an_approval_but_never_decides() -> Result<()> {
    let (ns, pending) = pending_approval().await?;
    let name = name_of(&pending)?;
    let controller = Api::<ToolCallApproval>::namespaced(controller_client().await?, &ns);

    let mut self_approved = pending.clone();
    self_approved.status = Some(serde_json::from_value(json!({
        "phase": "Approved",
        "conditions": [{"type": "Approved", "status": "True", "reason": "Auto",
                        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }))?);
    assert_refused(
        controller
            .replace_status(name, &PostParams::default(), &self_approved)
            .await
            .map_err(anyhow::Error::from),
        403,
        &[&shared().controller, "never approves or denies"],
    );

    let user = format!("erin-{}", unique_suffix());
    bind_approver(&ns, &user).await?;
    let approved = decide(
        &client_as(&user, &[]).await?,
        &ns,
        name,
        "Approved",
        json!({}),
    )
    .await?;
    let mut consumed = approved.clone();
    let status = consumed.status.get_or_insert_with(Default::default);
    status.consumed_at = Some(Timestamp::now().to_string());
    status.consumed_by = Some("support-bot-5d9f-abcde".into());
    status.phase = Some(chaperone_api::approval::ApprovalPhase::Consumed);
    let consumed = controller
        .replace_status(name, &PostParams::default(), &consumed)
        .await
        .context("the controller consumes the approval")?;
    let status = consumed.status.context("a status")?;
    assert_eq!(status.phase.map(|p| p.as_str()), Some("Consumed"));
    assert_eq!(status.decided_by.context("decidedBy")?.username, user);
    Ok(())
}
