use super::*;

fn ask() -> ApprovalAsk {
    ApprovalAsk {
        policy: ObjectKey::new("shop", "refunds"),
        rule: "approve-mid-refunds".to_owned(),
        server: "billing".to_owned(),
        tool: "refund".to_owned(),
        arguments: json!({"amount": 500, "card": "[redacted]"}),
        redacted: vec!["/card".to_owned()],
        args_digest: "ab".repeat(32),
        scope: "task",
        scope_key: "t-1".to_owned(),
        initiator: Some("alice".to_owned()),
        chain: vec![("shop/front".to_owned(), "shop/front-to-billing".to_owned())],
        timeout_seconds: 600,
        valid_for_seconds: 300,
    }
}

fn status(ticket: u64, phase: approval_status::Phase) -> ApprovalStatus {
    ApprovalStatus {
        ticket,
        name: "agent-x7k2p".to_owned(),
        phase: phase as i32,
        reason: "TooMuch".to_owned(),
        message: "not this one".to_owned(),
        decided_by: "bob".to_owned(),
        expires_at: 2_000_000_000,
    }
}

/// Approvals connected to a stream whose messages the test reads.
fn connected() -> (Arc<Approvals>, StreamLink, mpsc::Receiver<SidecarMessage>) {
    let approvals = Arc::new(Approvals::new());
    let (tx, rx) = mpsc::channel(8);
    let link = approvals.connect(tx);
    (approvals, link, rx)
}

fn sent(rx: &mut mpsc::Receiver<SidecarMessage>) -> sidecar_message::Message {
    rx.try_recv().expect("a message was sent").message.unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_millis(100)
}

#[tokio::test]
async fn refuses_to_ask_without_a_controller_stream() {
    let approvals = Arc::new(Approvals::new());
    assert!(!approvals.is_connected());
    assert_eq!(approvals.request(&ask()).await.unwrap_err(), NoController);
    let (tx, rx) = mpsc::channel(1);
    let link = approvals.connect(tx);
    drop(link);
    drop(rx);
    assert_eq!(approvals.request(&ask()).await.unwrap_err(), NoController);
}

#[tokio::test]
async fn sends_the_request_and_hands_the_final_answer_to_its_ticket() {
    let (approvals, _link, mut rx) = connected();
    let mut ticket = approvals.request(&ask()).await.unwrap();
    let sidecar_message::Message::ApprovalRequest(request) = sent(&mut rx) else {
        panic!("not an approval request");
    };
    assert_eq!(request, ask().to_wire(ticket.id()));
    assert_eq!(request.policy_namespace, "shop");
    assert_eq!(
        request.arguments_json,
        r#"{"amount":500,"card":"[redacted]"}"#
    );
    assert_eq!(request.chain[0].grant, "shop/front-to-billing");
    approvals.on_status(status(ticket.id(), approval_status::Phase::Pending));
    approvals.on_status(status(ticket.id(), approval_status::Phase::Granted));
    let Waited::Decided(update) = ticket.wait(soon()).await else {
        panic!("not decided");
    };
    assert_eq!(update.phase, ApprovalPhase::Granted);
    assert_eq!(update.decided_by, "bob");
    assert_eq!(approvals.waiting(), 0);
    drop(ticket);
    assert!(rx.try_recv().is_err(), "a decided ticket is not released");
}

#[tokio::test]
async fn a_ticket_still_pending_at_the_deadline_is_released_when_dropped() {
    let (approvals, _link, mut rx) = connected();
    let mut ticket = approvals.request(&ask()).await.unwrap();
    sent(&mut rx);
    approvals.on_status(status(ticket.id(), approval_status::Phase::Pending));
    let Waited::StillPending(Some(last)) = ticket.wait(soon()).await else {
        panic!("not pending");
    };
    assert_eq!(last.name, "agent-x7k2p");
    let id = ticket.id();
    drop(ticket);
    assert!(matches!(
        sent(&mut rx),
        sidecar_message::Message::ApprovalRelease(ApprovalRelease { ticket }) if ticket == id
    ));
    assert_eq!(approvals.waiting(), 0);
    // A late answer for it goes nowhere.
    approvals.on_status(status(id, approval_status::Phase::Granted));
}

#[tokio::test]
async fn tickets_are_lost_when_the_stream_ends() {
    let (approvals, link, mut rx) = connected();
    let mut ticket = approvals.request(&ask()).await.unwrap();
    sent(&mut rx);
    drop(link);
    assert!(!approvals.is_connected());
    assert_eq!(ticket.wait(soon()).await, Waited::Lost(None));
    drop(ticket);
    assert!(
        rx.try_recv().is_err(),
        "nothing to release on a closed stream"
    );
}

#[tokio::test]
async fn tickets_are_unique_and_answers_reach_only_their_own() {
    let (approvals, _link, mut rx) = connected();
    let mut first = approvals.request(&ask()).await.unwrap();
    let mut second = approvals.request(&ask()).await.unwrap();
    assert_ne!(first.id(), second.id());
    sent(&mut rx);
    sent(&mut rx);
    approvals.on_status(status(second.id(), approval_status::Phase::Denied));
    assert!(matches!(
        second.wait(soon()).await,
        Waited::Decided(ApprovalUpdate {
            phase: ApprovalPhase::Denied,
            ..
        })
    ));
    assert!(matches!(
        first.wait(soon()).await,
        Waited::StillPending(None)
    ));
}

#[test]
fn ignores_a_status_without_a_known_phase() {
    let unspecified = status(1, approval_status::Phase::Unspecified);
    assert_eq!(
        ApprovalUpdate::from_wire(unspecified).unwrap_err(),
        InvalidApprovalStatus {
            ticket: 1,
            phase: 0
        }
    );
    let mut unknown = status(1, approval_status::Phase::Pending);
    unknown.phase = 42;
    assert!(ApprovalUpdate::from_wire(unknown).is_err());
}

fn update(phase: ApprovalPhase) -> ApprovalUpdate {
    let (_, mut update) =
        ApprovalUpdate::from_wire(status(1, approval_status::Phase::Denied)).unwrap();
    update.phase = phase;
    update
}

#[test]
fn a_denial_names_the_approver_reason_and_object() {
    let refusal = HeldRefusal::Decided(update(ApprovalPhase::Denied));
    let text = refusal.to_string();
    for part in ["agent-x7k2p", "denied by bob", "not this one", "TooMuch"] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert_eq!(refusal.code(), jsonrpc::POLICY_DENIED);
    assert_eq!(
        Value::Object(refusal.data()),
        json!({"approval": "agent-x7k2p", "phase": "Denied", "decidedBy": "bob"})
    );
    assert_eq!(
        refusal.audit(),
        Some(AuditApproval {
            decided_by: Some("bob"),
            name: Some("agent-x7k2p"),
            phase: "Denied",
        })
    );
}

#[test]
fn a_pending_call_is_told_to_retry_and_which_object_waits() {
    let refusal = HeldRefusal::StillPending {
        name: Some("agent-x7k2p".to_owned()),
        namespace: "shop".to_owned(),
        expires_at: 2_000_000_000,
        hold: Duration::from_secs(20),
    };
    let text = refusal.to_string();
    for part in [
        "ToolCallApproval agent-x7k2p in namespace shop is pending",
        "until 2033-05-18T03:33:20.000Z",
        "20 s",
        "Retry the same call",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert_eq!(refusal.code(), jsonrpc::APPROVAL_PENDING);
    assert_eq!(
        Value::Object(refusal.data()),
        json!({"approval": "agent-x7k2p", "phase": "Pending"})
    );
}

#[test]
fn refusals_before_asking_carry_no_approval() {
    for refusal in [
        HeldRefusal::InBatch,
        HeldRefusal::NotARequest,
        HeldRefusal::NoController,
    ] {
        assert_eq!(refusal.audit(), None, "{refusal}");
        assert!(refusal.data().is_empty(), "{refusal}");
        assert_eq!(refusal.code(), jsonrpc::POLICY_DENIED);
    }
    assert!(HeldRefusal::InBatch.to_string().contains("send it alone"));
}

#[test]
fn expired_and_failed_say_what_happened() {
    let expired = HeldRefusal::Decided(update(ApprovalPhase::Expired));
    assert!(expired.to_string().contains("expired"), "{expired}");
    assert_eq!(expired.label(), "expired");
    let failed = HeldRefusal::Decided(update(ApprovalPhase::Failed));
    assert!(failed.to_string().contains("failed"), "{failed}");
    assert_eq!(failed.label(), "failed");
}
