//! The controller's side of human approval on a real API server: sidecar
//! stand-ins (real gRPC clients with real pod-bound tokens) send approval
//! requests; the controller creates or reuses ToolCallApprovals, answers
//! PENDING, then GRANTED (the approval consumed once), DENIED, EXPIRED or
//! FAILED; the leader expires and collects them. Decisions are written here
//! as an admin through the status subresource (no admission webhook is
//! registered in this binary, so nothing here depends on it).

use std::{
    collections::BTreeSet,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaperone_api::{
    AgentIdentity,
    approval::{
        ApprovalDecider, ApprovalPhase, ApprovalPolicyRef, ApprovalSession, CONDITION_APPROVED,
        CONDITION_DENIED, CONDITION_EXPIRED, ToolCallApproval, ToolCallApprovalSpec,
    },
};
use chaperone_testenv::{
    ControlPlane, create_namespace,
    kube_fixtures::{
        self, ControllerLaunch, InProcessController, SidecarStandIn, apply, pod_token,
    },
    sidecar_fixtures::eventually,
};
use chaperone_wire::v1::{self, approval_status::Phase, sidecar_message::Message};
use k8s_openapi::{
    api::events::v1::Event,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, PostParams},
};
use serde_json::json;

/// The controller under test, and a second replica sharing its Lease.
fn controllers() -> &'static (InProcessController, InProcessController) {
    static CONTROLLERS: OnceLock<(InProcessController, InProcessController)> = OnceLock::new();
    CONTROLLERS.get_or_init(|| {
        let cp = ControlPlane::shared();
        (
            kube_fixtures::start_controller(cp, "approvals-1"),
            kube_fixtures::start_controller(cp, "approvals-2"),
        )
    })
}

fn controller() -> &'static InProcessController {
    &controllers().0
}

fn replica() -> &'static InProcessController {
    &controllers().1
}

/// A controller of its own (its own Lease, so that stopping it leaves the
/// shared ones' leadership alone), for the restart test.
fn own_controller(pod_name: &str) -> Result<InProcessController> {
    kube_fixtures::start_controller_with(
        ControlPlane::shared(),
        ControllerLaunch {
            flags: vec![
                "--namespace=chaperone-system".into(),
                format!("--pod-name={pod_name}"),
                "--lease-name=approvals-restart".into(),
                "--extra-san=localhost,127.0.0.1".into(),
                "--log-format=text".into(),
            ],
            kubeconfig: None,
            create_namespace: Some("chaperone-system".into()),
        },
    )
}

/// An admin client and a fresh namespace with AgentIdentity `support`.
async fn setup() -> Result<(Client, String)> {
    controllers();
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "appr").await?;
    apply::<AgentIdentity>(
        &client,
        &ns,
        json!({
            "apiVersion": "chaperone.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": { "name": "support" },
            "spec": {
                "selector": { "serviceAccountName": "support" },
                "toolServers": [{ "name": "orders", "url": "http://orders.tools.svc:8080/mcp" }]
            }
        }),
    )
    .await?;
    Ok((client, ns))
}

/// A sidecar stand-in of a new pod `pod` of agent `support`, connected to
/// `controller`, its first snapshot received.
async fn sidecar(
    client: &Client,
    ns: &str,
    pod: &str,
    controller: &InProcessController,
) -> Result<SidecarStandIn> {
    let token = pod_token(client, ns, "support", pod, "chaperone").await?;
    reconnect(&token, controller).await
}

async fn reconnect(token: &str, controller: &InProcessController) -> Result<SidecarStandIn> {
    let endpoint = controller.snapshot_endpoint()?;
    let mut sidecar = eventually(Duration::from_secs(20), async || {
        // The AgentIdentity may not be in the controller's cache yet.
        match SidecarStandIn::connect(&endpoint, token).await {
            Ok(sidecar) => Ok(Some(sidecar)),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => Ok(None),
            Err(status) => bail!("stream refused: {status}"),
        }
    })
    .await?;
    sidecar.next_snapshot(Duration::from_secs(10)).await?;
    Ok(sidecar)
}

fn digest(n: u64) -> String {
    format!("{n:064x}")
}

/// A request for `refund` of order A-1 (the card redacted) in task `task`,
/// with argument digest `digest(args)`.
fn request(ticket: u64, args: u64, task: &str) -> v1::ApprovalRequest {
    v1::ApprovalRequest {
        ticket,
        policy_namespace: "shop".into(),
        policy: "refunds".into(),
        rule: "large-refunds".into(),
        server: "orders".into(),
        tool: "refund".into(),
        arguments_json: json!({"order": "A-1", "amount": 500, "card": "[redacted]"}).to_string(),
        redacted: vec!["/card".into()],
        args_digest: digest(args),
        scope: "task".into(),
        scope_key: task.into(),
        initiator: "alice".into(),
        chain: vec![],
        timeout_seconds: 600,
        valid_for_seconds: 300,
    }
}

async fn ask(sidecar: &SidecarStandIn, request: v1::ApprovalRequest) -> Result<()> {
    sidecar.send(Message::ApprovalRequest(request)).await
}

async fn release(sidecar: &SidecarStandIn, ticket: u64) -> Result<()> {
    sidecar
        .send(Message::ApprovalRelease(v1::ApprovalRelease { ticket }))
        .await
}

/// The next approval status on `sidecar`, which must be for `ticket`.
async fn answer(
    sidecar: &mut SidecarStandIn,
    ticket: u64,
    wait: Duration,
) -> Result<v1::ApprovalStatus> {
    let status = sidecar.next_approval(wait).await?;
    if status.ticket != ticket {
        bail!("expected an answer for ticket {ticket}, got {status:?}");
    }
    Ok(status)
}

/// Asks and returns the PENDING answer.
async fn ask_pending(
    sidecar: &mut SidecarStandIn,
    request: v1::ApprovalRequest,
) -> Result<v1::ApprovalStatus> {
    let ticket = request.ticket;
    ask(sidecar, request).await?;
    let status = answer(sidecar, ticket, Duration::from_secs(10)).await?;
    if status.phase() != Phase::Pending || status.name.is_empty() {
        bail!("expected PENDING with a name, got {status:?}");
    }
    Ok(status)
}

fn approvals(client: &Client, ns: &str) -> Api<ToolCallApproval> {
    Api::namespaced(client.clone(), ns)
}

fn whole_seconds(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).unwrap()
}

/// Approves (`approved`) or denies `name` as `user` with `reason`, writing
/// what the admission webhook would (decidedBy, decidedAt, validUntil).
async fn decide(
    client: &Client,
    ns: &str,
    name: &str,
    approved: bool,
    user: &str,
    reason: &str,
    message: &str,
) -> Result<ToolCallApproval> {
    let api = approvals(client, ns);
    let mut object = api.get(name).await?;
    let now = whole_seconds(Timestamp::now());
    let generation = object.metadata.generation;
    let valid_for = i64::from(object.spec.valid_for_seconds);
    let status = object.status.get_or_insert_with(Default::default);
    status.conditions.push(Condition {
        type_: if approved {
            CONDITION_APPROVED
        } else {
            CONDITION_DENIED
        }
        .into(),
        status: "True".into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(now),
        observed_generation: generation,
    });
    status.phase = Some(if approved {
        ApprovalPhase::Approved
    } else {
        ApprovalPhase::Denied
    });
    status.decided_by = Some(ApprovalDecider {
        username: user.into(),
        groups: vec!["support-leads".into()],
    });
    status.decided_at = Some(now.to_string());
    if approved {
        status.valid_until = Some((now + SignedDuration::from_secs(valid_for)).to_string());
    }
    Ok(api
        .replace_status(name, &PostParams::default(), &object)
        .await?)
}

/// Waits until Events with `reason` regard both the pod `pod` and the
/// AgentIdentity `support`, with a note containing `note`; returns them.
async fn events_with(
    client: &Client,
    ns: &str,
    reason: &str,
    pod: &str,
    note: &str,
) -> Result<Vec<Event>> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(20), async || {
        let found: Vec<Event> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter(|e| e.note.as_deref().unwrap_or_default().contains(note))
            .collect();
        let on: BTreeSet<(String, String)> = found
            .iter()
            .filter_map(|e| {
                let regarding = e.regarding.as_ref()?;
                Some((regarding.kind.clone()?, regarding.name.clone()?))
            })
            .collect();
        let both = on.contains(&("Pod".into(), pod.into()))
            && on.contains(&("AgentIdentity".into(), "support".into()));
        Ok(both.then_some(found))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_creates_a_pending_approval_and_the_same_call_reuses_it() -> Result<()> {
    let (client, ns) = setup().await?;
    let mut sidecar = sidecar(&client, &ns, "support-0", controller()).await?;
    let before = Timestamp::now().as_second();
    let first = ask_pending(&mut sidecar, request(1, 1, "task-1")).await?;
    assert!(first.name.starts_with("support-"), "{}", first.name);
    assert!(
        (before + 600..=before + 602).contains(&first.expires_at),
        "expires_at {} (asked at {before})",
        first.expires_at
    );

    let object = approvals(&client, &ns).get(&first.name).await?;
    assert_eq!(
        object.status.as_ref().and_then(|s| s.phase),
        Some(ApprovalPhase::Pending)
    );
    let labels = object.labels();
    assert_eq!(labels["chaperone.dev/agent"], "support");
    assert_eq!(labels["chaperone.dev/args-digest"], digest(1)[..63]);
    let spec = &object.spec;
    assert_eq!(
        (spec.agent.as_str(), spec.pod.as_str()),
        ("support", "support-0")
    );
    assert_eq!(spec.service_account, "support");
    assert_eq!(
        (spec.server.as_str(), spec.tool.as_str()),
        ("orders", "refund")
    );
    assert_eq!(
        spec.arguments,
        json!({"order": "A-1", "amount": 500, "card": "[redacted]"})
    );
    assert_eq!(spec.redacted_arguments, vec!["/card".to_string()]);
    assert_eq!(
        (spec.session.scope.as_str(), spec.session.key.as_str()),
        ("task", "task-1")
    );
    assert_eq!(spec.policy.name, "refunds");
    assert_eq!(spec.rule, "large-refunds");
    assert_eq!(spec.initiator.as_deref(), Some("alice"));
    assert!(object.owner_references().is_empty());

    // The same call again: the same object.
    let again = ask_pending(&mut sidecar, request(2, 1, "task-1")).await?;
    assert_eq!(again.name, first.name);
    // Other arguments, or another task: an object of their own.
    let other_args = ask_pending(&mut sidecar, request(3, 2, "task-1")).await?;
    let other_task = ask_pending(&mut sidecar, request(4, 1, "task-2")).await?;
    let names = BTreeSet::from([first.name.clone(), other_args.name, other_task.name]);
    assert_eq!(names.len(), 3, "{names:?}");
    let listed = approvals(&client, &ns).list(&ListParams::default()).await?;
    assert_eq!(listed.items.len(), 3);

    events_with(&client, &ns, "ApprovalRequested", "support-0", &first.name).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_granted_to_exactly_one_ticket_across_replicas_and_used_once() -> Result<()>
{
    let (client, ns) = setup().await?;
    let mut a = sidecar(&client, &ns, "support-a", controller()).await?;
    let mut b = sidecar(&client, &ns, "support-b", replica()).await?;
    let pending = ask_pending(&mut a, request(1, 7, "task-1")).await?;
    let also = ask_pending(&mut b, request(1, 7, "task-1")).await?;
    assert_eq!(also.name, pending.name, "both replicas wait on one object");

    decide(
        &client,
        &ns,
        &pending.name,
        true,
        "alice@example.com",
        "Checked",
        "fine",
    )
    .await?;
    let from_a = answer(&mut a, 1, Duration::from_secs(10)).await?;
    let from_b = answer(&mut b, 1, Duration::from_secs(10)).await?;
    let (winner, loser, winner_pod) = match (from_a.phase(), from_b.phase()) {
        (Phase::Granted, Phase::Failed) => (from_a, from_b, "support-a"),
        (Phase::Failed, Phase::Granted) => (from_b, from_a, "support-b"),
        _ => bail!("expected one GRANTED and one FAILED: {from_a:?} {from_b:?}"),
    };
    assert_eq!(winner.decided_by, "alice@example.com");
    assert_eq!(winner.name, pending.name);
    assert!(
        loser.message.contains("was used by another call"),
        "{}",
        loser.message
    );

    let object = approvals(&client, &ns).get(&pending.name).await?;
    let status = object.status.context("status")?;
    assert_eq!(status.phase, Some(ApprovalPhase::Consumed));
    assert!(status.consumed_at.is_some());
    assert_eq!(status.consumed_by.as_deref(), Some(winner_pod));
    assert_eq!(
        status.decided_by.map(|d| d.username).as_deref(),
        Some("alice@example.com"),
        "the controller never rewrites the decision"
    );

    // The same call again needs a new approval.
    let next = ask_pending(&mut a, request(2, 7, "task-1")).await?;
    assert_ne!(next.name, pending.name);
    let granted = events_with(&client, &ns, "ApprovalGranted", winner_pod, &pending.name).await?;
    let note = granted[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("alice@example.com") && note.contains("orders/refund"),
        "{note}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_call_is_answered_denied_with_the_reason_and_the_denier() -> Result<()> {
    let (client, ns) = setup().await?;
    let mut sidecar = sidecar(&client, &ns, "support-0", controller()).await?;
    let pending = ask_pending(&mut sidecar, request(1, 1, "task-1")).await?;
    decide(
        &client,
        &ns,
        &pending.name,
        false,
        "carol",
        "TooLarge",
        "refunds over 400 need a ticket",
    )
    .await?;
    let denied = answer(&mut sidecar, 1, Duration::from_secs(10)).await?;
    assert_eq!(denied.phase(), Phase::Denied);
    assert_eq!(denied.reason, "TooLarge");
    assert_eq!(denied.message, "refunds over 400 need a ticket");
    assert_eq!(denied.decided_by, "carol");
    // A denied approval is not reused: the same call asks again.
    let again = ask_pending(&mut sidecar, request(2, 1, "task-1")).await?;
    assert_ne!(again.name, pending.name);
    let events = events_with(&client, &ns, "ApprovalDenied", "support-0", &pending.name).await?;
    assert!(events.iter().all(|e| e.type_.as_deref() == Some("Warning")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_approval_expires_and_the_waiting_call_is_told() -> Result<()> {
    let (client, ns) = setup().await?;
    let mut sidecar = sidecar(&client, &ns, "support-0", controller()).await?;
    let pending = ask_pending(
        &mut sidecar,
        v1::ApprovalRequest {
            timeout_seconds: 2,
            ..request(1, 1, "task-1")
        },
    )
    .await?;
    // The leader's sweep runs every 2 s; leadership may take a Lease period.
    let expired = answer(&mut sidecar, 1, Duration::from_secs(40)).await?;
    assert_eq!(expired.phase(), Phase::Expired);
    assert_eq!(expired.reason, "NotDecided");
    let object = approvals(&client, &ns).get(&pending.name).await?;
    let status = object.status.context("status")?;
    assert_eq!(status.phase, Some(ApprovalPhase::Expired));
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_EXPIRED)
        .context("an Expired condition")?;
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("True", "NotDecided")
    );
    events_with(&client, &ns, "ApprovalExpired", "support-0", &pending.name).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_not_used_in_time_expires_and_is_not_reused() -> Result<()> {
    let (client, ns) = setup().await?;
    let mut sidecar = sidecar(&client, &ns, "support-0", controller()).await?;
    let pending = ask_pending(
        &mut sidecar,
        v1::ApprovalRequest {
            valid_for_seconds: 1,
            ..request(1, 1, "task-1")
        },
    )
    .await?;
    // The agent gave up waiting before anyone decided.
    release(&sidecar, 1).await?;
    decide(
        &client,
        &ns,
        &pending.name,
        true,
        "alice",
        "Checked",
        "fine",
    )
    .await?;
    let api = approvals(&client, &ns);
    let status = eventually(Duration::from_secs(40), async || {
        let status = api.get(&pending.name).await?.status.unwrap_or_default();
        Ok((status.phase == Some(ApprovalPhase::Expired)).then_some(status))
    })
    .await?;
    assert_eq!(status.consumed_at, None, "nobody used it");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == CONDITION_EXPIRED && c.reason == "NotUsed")
    );
    let again = ask_pending(&mut sidecar, request(2, 1, "task-1")).await?;
    assert_ne!(again.name, pending.name);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_approval_uses_it_and_a_released_ticket_never_does() -> Result<()> {
    let (client, ns) = setup().await?;
    let mut sidecar = sidecar(&client, &ns, "support-0", controller()).await?;
    let pending = ask_pending(&mut sidecar, request(1, 1, "task-1")).await?;
    // The sidecar's hold ended: it released the ticket and refused the call.
    release(&sidecar, 1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    decide(
        &client,
        &ns,
        &pending.name,
        true,
        "alice",
        "Checked",
        "fine",
    )
    .await?;
    // Nobody waits: the approval stays unused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = approvals(&client, &ns)
        .get(&pending.name)
        .await?
        .status
        .unwrap_or_default();
    assert_eq!(status.phase, Some(ApprovalPhase::Approved));
    assert_eq!(status.consumed_at, None);
    // The agent retries the same call: it waits on the same object and uses it.
    let retry = ask_pending(&mut sidecar, request(2, 1, "task-1")).await?;
    assert_eq!(retry.name, pending.name);
    let granted = answer(&mut sidecar, 2, Duration::from_secs(10)).await?;
    assert_eq!(granted.phase(), Phase::Granted, "{granted:?}");
    let status = approvals(&client, &ns)
        .get(&pending.name)
        .await?
        .status
        .unwrap_or_default();
    assert_eq!(status.phase, Some(ApprovalPhase::Consumed));
    assert_eq!(status.consumed_by.as_deref(), Some("support-0"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_while_a_request_is_pending_loses_nothing() -> Result<()> {
    let (client, ns) = setup().await?;
    let first = own_controller("approvals-restart-1")?;
    let token = pod_token(&client, &ns, "support", "support-0", "chaperone").await?;
    let mut sidecar = reconnect(&token, &first).await?;
    let pending = ask_pending(&mut sidecar, request(1, 1, "task-1")).await?;
    first.stop()?;
    // Decided while no controller serves the sidecar.
    decide(
        &client,
        &ns,
        &pending.name,
        true,
        "alice",
        "Checked",
        "fine",
    )
    .await?;

    let second = own_controller("approvals-restart-2")?;
    let mut sidecar = reconnect(&token, &second).await?;
    let retry = ask_pending(&mut sidecar, request(1, 1, "task-1")).await?;
    assert_eq!(
        retry.name, pending.name,
        "the restarted controller found it"
    );
    let granted = answer(&mut sidecar, 1, Duration::from_secs(10)).await?;
    assert_eq!(granted.phase(), Phase::Granted, "{granted:?}");
    assert_eq!(granted.decided_by, "alice");
    let listed = approvals(&client, &ns).list(&ListParams::default()).await?;
    assert_eq!(listed.items.len(), 1, "no second object was created");
    second.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_request_is_answered_failed_and_creates_nothing() -> Result<()> {
    let (client, ns) = setup().await?;
    let mut sidecar = sidecar(&client, &ns, "support-0", controller()).await?;
    ask(
        &sidecar,
        v1::ApprovalRequest {
            args_digest: "not-a-digest".into(),
            ..request(1, 1, "task-1")
        },
    )
    .await?;
    let failed = answer(&mut sidecar, 1, Duration::from_secs(10)).await?;
    assert_eq!(failed.phase(), Phase::Failed);
    assert!(failed.message.contains("args_digest"), "{}", failed.message);
    // A value the rule asked to redact must never reach the object.
    ask(
        &sidecar,
        v1::ApprovalRequest {
            arguments_json: json!({"order": "A-1", "card": "4111111111111111"}).to_string(),
            ..request(2, 1, "task-1")
        },
    )
    .await?;
    let failed = answer(&mut sidecar, 2, Duration::from_secs(10)).await?;
    assert_eq!(failed.phase(), Phase::Failed);
    assert!(failed.message.contains("/card"), "{}", failed.message);
    assert!(!failed.message.contains("4111"), "{}", failed.message);
    let listed = approvals(&client, &ns).list(&ListParams::default()).await?;
    assert!(listed.items.is_empty());
    Ok(())
}

/// A decided object as an admin writes it, decided `age` ago.
async fn decided_object(
    client: &Client,
    ns: &str,
    name: &str,
    phase: ApprovalPhase,
    age: Duration,
) -> Result<ToolCallApproval> {
    let now = whole_seconds(Timestamp::now());
    let decided = now - SignedDuration::try_from(age)?;
    let spec = ToolCallApprovalSpec {
        agent: "support".into(),
        service_account: "support".into(),
        pod: "support-0".into(),
        session: ApprovalSession {
            scope: "task".into(),
            key: "task-1".into(),
        },
        server: "orders".into(),
        tool: "refund".into(),
        arguments: json!({}),
        args_digest: digest(1),
        args_alg: "sha256-rfc8785".into(),
        policy: ApprovalPolicyRef {
            namespace: ns.into(),
            name: "refunds".into(),
        },
        rule: "large-refunds".into(),
        requested_at: (decided - SignedDuration::from_secs(60)).to_string(),
        expires_at: (now + SignedDuration::from_secs(3600)).to_string(),
        valid_for_seconds: 300,
        ..Default::default()
    };
    let mut object = ToolCallApproval::new(name, spec);
    object.metadata = ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    };
    let api = approvals(client, ns);
    let mut object = api.create(&PostParams::default(), &object).await?;
    let status = object.status.get_or_insert_with(Default::default);
    let condition = |type_: &str| Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: "Test".into(),
        message: String::new(),
        last_transition_time: Time(decided),
        observed_generation: Some(1),
    };
    match phase {
        ApprovalPhase::Denied => status.conditions.push(condition(CONDITION_DENIED)),
        ApprovalPhase::Consumed => {
            status.conditions.push(condition(CONDITION_APPROVED));
            status.consumed_at = Some(decided.to_string());
            status.consumed_by = Some("support-0".into());
        }
        ApprovalPhase::Expired => status.conditions.push(condition(CONDITION_EXPIRED)),
        ApprovalPhase::Pending | ApprovalPhase::Approved => {}
    }
    status.decided_at = Some(decided.to_string());
    status.phase = Some(phase);
    Ok(api
        .replace_status(name, &PostParams::default(), &object)
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decided_approvals_are_deleted_after_the_retention() -> Result<()> {
    let (client, ns) = setup().await?;
    let two_hours = Duration::from_secs(7200);
    let old = [
        decided_object(&client, &ns, "old-denied", ApprovalPhase::Denied, two_hours).await?,
        decided_object(&client, &ns, "old-used", ApprovalPhase::Consumed, two_hours).await?,
        decided_object(
            &client,
            &ns,
            "old-expired",
            ApprovalPhase::Expired,
            two_hours,
        )
        .await?,
    ];
    let recent = decided_object(
        &client,
        &ns,
        "recent-denied",
        ApprovalPhase::Denied,
        Duration::ZERO,
    )
    .await?;
    let waiting =
        decided_object(&client, &ns, "waiting", ApprovalPhase::Pending, two_hours).await?;
    let api = approvals(&client, &ns);
    let started = Instant::now();
    eventually(Duration::from_secs(40), async || {
        let names: BTreeSet<String> = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|o| o.name_any())
            .collect();
        Ok(old
            .iter()
            .all(|o| !names.contains(&o.name_any()))
            .then_some(()))
    })
    .await
    .with_context(|| format!("old objects still there after {:?}", started.elapsed()))?;
    // The default retention is an hour: what was decided just now, or is not
    // decided, stays.
    for kept in [&recent, &waiting] {
        assert!(
            api.get_opt(&kept.name_any()).await?.is_some(),
            "{}",
            kept.name_any()
        );
    }
    Ok(())
}
