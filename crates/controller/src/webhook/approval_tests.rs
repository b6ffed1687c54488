//! Tests of the approval webhook's decision: who may create a ToolCallApproval,
//! what the controller's own updates may change, and when a person's decision
//! is admitted and what the patch records.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;

const CONTROLLER: &str = "system:serviceaccount:chaperone-system:chaperone-controller";
const AGENT_SA: &str = "system:serviceaccount:agents:support-bot";
const NOW: &str = "2026-03-01T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().expect("a timestamp")
}

fn user(name: &str, groups: &[&str]) -> UserInfo {
    UserInfo {
        username: Some(name.to_owned()),
        groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
        uid: Some(format!("uid-{name}")),
        extra: Some(BTreeMap::from([(
            "scopes".to_owned(),
            vec!["approvals".to_owned()],
        )])),
    }
}

fn alice() -> UserInfo {
    user("alice", &["payments-oncall", "system:authenticated"])
}

fn object_json(status: Value) -> Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1",
        "kind": "ToolCallApproval",
        "metadata": {"name": "support-bot-x7k2p", "namespace": "agents", "generation": 1},
        "spec": {
            "agent": "support-bot",
            "serviceAccount": "support-bot",
            "pod": "support-bot-5d9f-abcde",
            "session": {"scope": "task", "key": "task-1"},
            "server": "billing",
            "tool": "refund",
            "arguments": {"amount": 500, "card": "[redacted]"},
            "redactedArguments": ["/card"],
            "argsDigest": "ab".repeat(32),
            "argsAlg": "sha256-rfc8785",
            "policy": {"namespace": "agents", "name": "refunds"},
            "rule": "large-refunds",
            "requestedAt": "2026-03-01T11:58:00Z",
            "expiresAt": "2026-03-01T12:08:00Z",
            "validForSeconds": 300
        },
        "status": status
    })
}

fn object(status: Value) -> ApprovalObject {
    ApprovalObject::from_json(&object_json(status), None).expect("a readable object")
}

fn pending() -> ApprovalObject {
    object(json!({"phase": "Pending"}))
}

fn condition(type_: &str, status: &str) -> Value {
    json!({
        "type": type_,
        "status": status,
        "reason": "Reviewed",
        "message": "refund checked against the ticket",
        "lastTransitionTime": "2026-03-01T11:59:00Z"
    })
}

fn approved_status() -> Value {
    json!({
        "phase": "Approved",
        "conditions": [{
            "type": "Approved", "status": "True", "reason": "Reviewed", "message": "ok",
            "lastTransitionTime": "2026-03-01T11:59:00Z", "observedGeneration": 1
        }],
        "decidedBy": {"username": "alice", "groups": ["payments-oncall"]},
        "decidedAt": "2026-03-01T11:59:00Z",
        "validUntil": "2026-03-01T12:04:00Z"
    })
}

fn with_status(
    base: &ApprovalObject,
    change: impl FnOnce(&mut Map<String, Value>),
) -> ApprovalObject {
    let mut next = base.clone();
    change(&mut next.status);
    next
}

fn screen_update(
    old: &ApprovalObject,
    new: &ApprovalObject,
    user: &UserInfo,
) -> Result<Screened, ApprovalRefusal> {
    screen(
        ApprovalWrite::StatusUpdate { old, new },
        user,
        CONTROLLER,
        now(),
    )
}

fn decision(old: &ApprovalObject, new: &ApprovalObject, user: &UserInfo) -> PersonDecision {
    match screen_update(old, new, user) {
        Ok(Screened::Decision(decision)) => decision,
        other => panic!("expected a person's decision, got {other:?}"),
    }
}

fn refusal(old: &ApprovalObject, new: &ApprovalObject, user: &UserInfo) -> ApprovalRefusal {
    match screen_update(old, new, user) {
        Err(refusal) => refusal,
        Ok(other) => panic!("expected a refusal, got {other:?}"),
    }
}

fn allowed() -> AccessAnswer {
    AccessAnswer {
        allowed: true,
        reason: "RBAC: allowed by RoleBinding \"approvers/agents\"".into(),
    }
}

/// `new` after the admitted patch.
fn patched(new: &ApprovalObject, patch: &json_patch::Patch) -> Value {
    let mut doc = json!({"status": Value::Object(new.status.clone())});
    json_patch::patch(&mut doc, patch).expect("the patch applies");
    doc["status"].clone()
}

fn add_condition(base: &ApprovalObject, condition: Value) -> ApprovalObject {
    with_status(base, |s| {
        s.entry("conditions")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .expect("a list")
            .push(condition);
    })
}

// --- CREATE ---

#[test]
fn the_controller_creates_approvals() {
    let object = pending();
    let screened = screen(
        ApprovalWrite::Create { object: &object },
        &user(CONTROLLER, &["system:serviceaccounts"]),
        CONTROLLER,
        now(),
    );
    assert_eq!(screened, Ok(Screened::ControllerWrite));
}

#[test]
fn nobody_else_creates_approvals_not_even_an_admin() {
    let object = pending();
    let err = screen(
        ApprovalWrite::Create { object: &object },
        &user("cluster-admin", &["system:masters"]),
        CONTROLLER,
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(err, ApprovalRefusal::CreateByOther { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("\"cluster-admin\""), "{message}");
    assert!(message.contains(CONTROLLER), "{message}");
    assert!(message.contains("agents/support-bot-x7k2p"), "{message}");
}

#[test]
fn an_unknown_controller_username_matches_nobody() {
    let object = pending();
    let err = screen(
        ApprovalWrite::Create { object: &object },
        &UserInfo::default(),
        "",
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(err, ApprovalRefusal::CreateByOther { .. }),
        "{err:?}"
    );
}

#[test]
fn a_created_object_named_by_the_server_is_described_by_its_prefix() {
    let mut json = object_json(json!({}));
    json["metadata"] = json!({"generateName": "support-bot-"});
    let object = ApprovalObject::from_json(&json, Some("agents")).expect("readable");
    assert_eq!(object.namespace, "agents");
    assert_eq!(object.describe(), "ToolCallApproval agents/support-bot-*");
}

#[test]
fn an_unreadable_spec_is_refused_as_malformed() {
    let mut json = object_json(json!({}));
    json["spec"] = json!({"agent": 7});
    let err = ApprovalObject::from_json(&json, None).unwrap_err();
    assert!(matches!(err, ApprovalRefusal::Malformed { .. }), "{err:?}");
}

// --- the controller's status updates ---

fn controller() -> UserInfo {
    user(CONTROLLER, &["system:serviceaccounts"])
}

#[test]
fn the_controller_writes_the_pending_phase() {
    let old = object(json!(null));
    let new = pending();
    assert_eq!(
        screen_update(&old, &new, &controller()),
        Ok(Screened::ControllerWrite)
    );
}

#[test]
fn the_controller_consumes_an_approved_request() {
    let old = object(approved_status());
    let new = with_status(&old, |s| {
        s.insert("consumedAt".into(), json!("2026-03-01T12:00:00Z"));
        s.insert("consumedBy".into(), json!("support-bot-5d9f-abcde"));
        s.insert("phase".into(), json!("Consumed"));
    });
    assert_eq!(
        screen_update(&old, &new, &controller()),
        Ok(Screened::ControllerWrite)
    );
}

#[test]
fn the_controller_cannot_consume_a_request_nobody_approved() {
    let old = pending();
    let new = with_status(&old, |s| {
        s.insert("consumedAt".into(), json!("2026-03-01T12:00:00Z"));
        s.insert("phase".into(), json!("Consumed"));
    });
    let err = refusal(&old, &new, &controller());
    assert!(
        matches!(err, ApprovalRefusal::ConsumesUnapproved { .. }),
        "{err:?}"
    );
}

#[test]
fn the_controller_expires_pending_and_approved_requests() {
    for old in [pending(), object(approved_status())] {
        let new = add_condition(&old, condition("Expired", "True"));
        let new = with_status(&new, |s| {
            s.insert("phase".into(), json!("Expired"));
        });
        assert_eq!(
            screen_update(&old, &new, &controller()),
            Ok(Screened::ControllerWrite)
        );
    }
}

#[test]
fn the_controller_never_approves_or_denies() {
    let old = pending();
    for type_ in ["Approved", "Denied"] {
        let new = add_condition(&old, condition(type_, "True"));
        let err = refusal(&old, &new, &controller());
        assert!(
            matches!(err, ApprovalRefusal::ControllerDecides { .. }),
            "{type_}: {err:?}"
        );
        assert!(err.to_string().contains(CONTROLLER), "{err}");
    }
}

#[test]
fn the_controller_cannot_remove_or_change_a_decision() {
    let old = object(approved_status());
    let removed = with_status(&old, |s| {
        s.insert("conditions".into(), json!([]));
    });
    let changed = with_status(&old, |s| {
        s["conditions"][0]["message"] = json!("something else");
    });
    for new in [removed, changed] {
        let err = refusal(&old, &new, &controller());
        assert!(
            matches!(err, ApprovalRefusal::ControllerDecides { .. }),
            "{err:?}"
        );
    }
}

#[test]
fn the_controller_cannot_change_who_decided() {
    let old = object(approved_status());
    for (field, value) in [
        ("decidedBy", json!({"username": "controller"})),
        ("decidedAt", json!("2026-03-01T11:00:00Z")),
        ("validUntil", json!("2026-03-02T12:00:00Z")),
    ] {
        let new = with_status(&old, |s| {
            s.insert(field.into(), value);
        });
        let err = refusal(&old, &new, &controller());
        assert_eq!(
            err,
            ApprovalRefusal::ControllerChangesDecider {
                user: CONTROLLER.into(),
                object: "ToolCallApproval agents/support-bot-x7k2p".into(),
                field,
            }
        );
    }
}

#[test]
fn the_controller_may_write_back_what_it_read_in_another_spelling() {
    // A typed client writes times as `…Z` and drops empty group lists.
    let mut stored = approved_status();
    stored["conditions"][0]["lastTransitionTime"] = json!("2026-03-01T11:59:00.000+00:00");
    stored["decidedBy"] = json!({"username": "alice", "groups": []});
    stored["validUntil"] = json!("2026-03-01T12:04:00+00:00");
    let old = object(stored);
    let new = with_status(&old, |s| {
        s["conditions"][0]["lastTransitionTime"] = json!("2026-03-01T11:59:00Z");
        s.insert("decidedBy".into(), json!({"username": "alice"}));
        s.insert("validUntil".into(), json!("2026-03-01T12:04:00Z"));
        s.insert("phase".into(), json!("Consumed"));
        s.insert("consumedAt".into(), json!("2026-03-01T12:00:00Z"));
    });
    assert_eq!(
        screen_update(&old, &new, &controller()),
        Ok(Screened::ControllerWrite)
    );
}

// --- a person's decision ---

#[test]
fn a_person_approves_a_pending_request_of_the_policy() {
    let old = pending();
    let new = add_condition(&old, condition("Approved", "True"));
    let decision = decision(&old, &new, &alice());
    assert_eq!(decision.kind, DecisionKind::Approve);
    assert_eq!(decision.condition, 0);
    assert_eq!(
        decision.policy,
        ApprovalPolicyRef {
            namespace: "agents".into(),
            name: "refunds".into()
        }
    );
}

#[test]
fn the_access_review_asks_for_approve_on_the_policy_as_the_user() {
    let old = pending();
    let new = add_condition(&old, condition("Denied", "True"));
    let user = alice();
    let review = access_review(&decision(&old, &new, &user), &user);
    assert_eq!(review.spec.user.as_deref(), Some("alice"));
    assert_eq!(review.spec.groups, user.groups);
    assert_eq!(review.spec.uid.as_deref(), Some("uid-alice"));
    assert_eq!(review.spec.extra, user.extra);
    let attributes = review
        .spec
        .resource_attributes
        .expect("resource attributes");
    assert_eq!(attributes.verb.as_deref(), Some("approve"));
    assert_eq!(attributes.group.as_deref(), Some("chaperone.dev"));
    assert_eq!(attributes.resource.as_deref(), Some("toolpolicies"));
    assert_eq!(attributes.name.as_deref(), Some("refunds"));
    assert_eq!(attributes.namespace.as_deref(), Some("agents"));
    assert_eq!(attributes.subresource, None);
}

#[test]
fn an_admitted_approval_records_the_requesting_user_not_the_one_it_names() {
    let old = pending();
    let new = add_condition(&old, condition("Approved", "True"));
    let new = with_status(&new, |s| {
        s.insert(
            "decidedBy".into(),
            json!({"username": "mallory", "groups": ["system:masters"]}),
        );
        s.insert("decidedAt".into(), json!("2020-01-01T00:00:00Z"));
        s.insert("validUntil".into(), json!("2099-01-01T00:00:00Z"));
        s.insert("phase".into(), json!("Denied"));
    });
    let user = alice();
    let decision = decision(&old, &new, &user);
    let patch = admit_decision(&new, &decision, &user, &allowed(), now()).expect("admitted");
    let status = patched(&new, &patch);
    assert_eq!(
        status["decidedBy"],
        json!({"username": "alice", "groups": ["payments-oncall", "system:authenticated"]})
    );
    assert_eq!(status["decidedAt"], NOW);
    assert_eq!(status["validUntil"], "2026-03-01T12:05:00Z");
    assert_eq!(status["phase"], "Approved");
    let condition = &status["conditions"][0];
    assert_eq!(condition["lastTransitionTime"], NOW);
    assert_eq!(condition["observedGeneration"], 1);
    assert_eq!(condition["reason"], "Reviewed");
    assert_eq!(condition["message"], "refund checked against the ticket");
}

#[test]
fn an_admitted_denial_has_no_valid_until() {
    let old = pending();
    let new = add_condition(&old, condition("Denied", "True"));
    let new = with_status(&new, |s| {
        s.insert("validUntil".into(), json!("2099-01-01T00:00:00Z"));
    });
    let user = alice();
    let decision = decision(&old, &new, &user);
    let patch = admit_decision(&new, &decision, &user, &allowed(), now()).expect("admitted");
    let status = patched(&new, &patch);
    assert_eq!(status["phase"], "Denied");
    assert_eq!(status.get("validUntil"), None);
    assert_eq!(status["decidedBy"]["username"], "alice");
}

#[test]
fn a_bare_decision_gets_its_time_reason_and_message_filled_in() {
    let old = pending();
    let new = add_condition(&old, json!({"type": "Approved", "status": "True"}));
    let user = user("bob", &[]);
    let decision = decision(&old, &new, &user);
    let patch = admit_decision(&new, &decision, &user, &allowed(), now()).expect("admitted");
    let status = patched(&new, &patch);
    let condition = &status["conditions"][0];
    assert_eq!(condition["lastTransitionTime"], NOW);
    assert_eq!(condition["reason"], "Approved");
    assert_eq!(condition["message"], "");
    assert_eq!(condition["observedGeneration"], 1);
    assert_eq!(status["decidedBy"], json!({"username": "bob"}));
}

#[test]
fn a_person_without_approve_on_the_policy_is_refused_with_the_reason() {
    let old = pending();
    let new = add_condition(&old, condition("Approved", "True"));
    let user = user("eve", &["system:authenticated"]);
    let decision = decision(&old, &new, &user);
    let denied = AccessAnswer {
        allowed: false,
        reason: "no RBAC policy matched".into(),
    };
    let err = admit_decision(&new, &decision, &user, &denied, now()).unwrap_err();
    assert!(matches!(err, ApprovalRefusal::NotAllowed { .. }), "{err:?}");
    let message = err.to_string();
    for part in [
        "\"eve\"",
        "agents/refunds",
        "\"approve\"",
        "no RBAC policy matched",
    ] {
        assert!(message.contains(part), "{part} missing from: {message}");
    }
}

#[test]
fn an_explicit_deny_of_the_authorizer_wins_over_allowed() {
    let answer = AccessAnswer::from(SubjectAccessReviewStatus {
        allowed: true,
        denied: Some(true),
        reason: Some("webhook authorizer".into()),
        evaluation_error: Some("partial".into()),
    });
    assert!(!answer.allowed);
    assert_eq!(answer.reason, "webhook authorizer; partial");
}

#[test]
fn the_agents_own_service_account_cannot_decide_its_call() {
    let old = pending();
    for type_ in ["Approved", "Denied"] {
        let new = add_condition(&old, condition(type_, "True"));
        let err = refusal(&old, &new, &user(AGENT_SA, &["system:serviceaccounts"]));
        assert!(matches!(err, ApprovalRefusal::OwnCall { .. }), "{err:?}");
        assert!(err.to_string().contains(AGENT_SA), "{err}");
    }
}

#[test]
fn the_checks_read_the_stored_spec_not_the_one_sent() {
    // Spec changes sent to /status are dropped only after admission: a
    // client must not pick the policy it is asked about, nor hide the agent.
    let old = pending();
    let mut new = add_condition(&old, condition("Approved", "True"));
    new.spec.policy.name = "one-i-may-approve".into();
    new.spec.service_account = "someone-else".into();
    new.spec.valid_for_seconds = 86_400;
    let err = refusal(&old, &new, &user(AGENT_SA, &[]));
    assert!(matches!(err, ApprovalRefusal::OwnCall { .. }), "{err:?}");
    let decision = decision(&old, &new, &alice());
    assert_eq!(decision.policy.name, "refunds");
    assert_eq!(decision.valid_for_seconds, 300);
}

#[test]
fn a_decided_request_cannot_be_decided_again() {
    let mut expired = pending();
    expired = add_condition(&expired, condition("Expired", "True"));
    let consumed = object(json!({"phase": "Consumed"}));
    let denied = add_condition(&pending(), condition("Denied", "True"));
    for old in [object(approved_status()), expired, consumed, denied] {
        for type_ in ["Approved", "Denied"] {
            let mut new = old.clone();
            new.status
                .insert("conditions".into(), json!([condition(type_, "True")]));
            let err = refusal(&old, &new, &alice());
            assert!(matches!(err, ApprovalRefusal::NotPending { .. }), "{err:?}");
            assert!(err.to_string().contains("only a Pending request"), "{err}");
        }
    }
}

#[test]
fn a_request_past_its_expiry_cannot_be_decided() {
    let mut old = pending();
    old.spec.expires_at = "2026-03-01T11:59:59Z".into();
    let new = add_condition(&old, condition("Approved", "True"));
    let err = refusal(&old, &new, &alice());
    assert!(matches!(err, ApprovalRefusal::PastExpiry { .. }), "{err:?}");
    assert!(err.to_string().contains("2026-03-01T11:59:59Z"), "{err}");
}

#[test]
fn an_update_that_decides_nothing_is_refused() {
    let old = pending();
    let new = with_status(&old, |s| {
        s.insert("phase".into(), json!("Approved"));
    });
    let err = refusal(&old, &new, &alice());
    assert!(matches!(err, ApprovalRefusal::NoDecision { .. }), "{err:?}");
}

#[test]
fn approving_and_denying_at_once_is_refused() {
    let old = pending();
    let new = add_condition(&old, condition("Approved", "True"));
    let new = add_condition(&new, condition("Denied", "True"));
    let err = refusal(&old, &new, &alice());
    assert!(
        matches!(err, ApprovalRefusal::SeveralConditions { count: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn two_conditions_of_one_type_are_refused() {
    let old = pending();
    let new = add_condition(&old, condition("Approved", "True"));
    let new = add_condition(&new, condition("Approved", "True"));
    let err = refusal(&old, &new, &alice());
    assert!(
        matches!(err, ApprovalRefusal::OtherChange { .. }),
        "{err:?}"
    );
}

#[test]
fn a_person_cannot_expire_a_request() {
    let old = pending();
    let new = add_condition(&old, condition("Expired", "True"));
    let err = refusal(&old, &new, &alice());
    assert!(
        matches!(err, ApprovalRefusal::NotADecision { .. }),
        "{err:?}"
    );
}

#[test]
fn a_decision_is_a_true_condition() {
    let old = pending();
    let new = add_condition(&old, condition("Approved", "False"));
    let err = refusal(&old, &new, &alice());
    assert!(matches!(err, ApprovalRefusal::NotTrue { .. }), "{err:?}");
}

#[test]
fn a_person_cannot_touch_what_the_controller_records() {
    let old = pending();
    for (field, value) in [
        ("consumedAt", json!("2026-03-01T12:00:00Z")),
        ("consumedBy", json!("some-pod")),
    ] {
        let new = add_condition(&old, condition("Approved", "True"));
        let new = with_status(&new, |s| {
            s.insert(field.into(), value);
        });
        let err = refusal(&old, &new, &alice());
        assert_eq!(
            err,
            ApprovalRefusal::OtherChange {
                user: "alice".into(),
                object: "ToolCallApproval agents/support-bot-x7k2p".into(),
                field: field.into(),
            }
        );
    }
}

#[test]
fn the_patch_points_at_the_added_condition() {
    // An unknown condition kept unchanged before the decision.
    let old = add_condition(&pending(), condition("Reviewing", "True"));
    let new = add_condition(
        &old,
        json!({"type": "Denied", "status": "True", "reason": "TooLarge"}),
    );
    let user = alice();
    let decision = decision(&old, &new, &user);
    assert_eq!(decision.condition, 1);
    let patch = admit_decision(&new, &decision, &user, &allowed(), now()).expect("admitted");
    let status = patched(&new, &patch);
    assert_eq!(status["conditions"][0], condition("Reviewing", "True"));
    assert_eq!(status["conditions"][1]["lastTransitionTime"], NOW);
    assert_eq!(status["conditions"][1]["reason"], "TooLarge");
}

#[test]
fn refusals_answer_forbidden_conflict_or_invalid() {
    let old = pending();
    let own = refusal(
        &old,
        &add_condition(&old, condition("Approved", "True")),
        &user(AGENT_SA, &[]),
    );
    assert_eq!(own.status(), (403, "Forbidden"));
    let decided = object(approved_status());
    let again = refusal(
        &decided,
        &add_condition(&decided, condition("Denied", "True")),
        &alice(),
    );
    assert_eq!(again.status(), (409, "Conflict"));
    let nothing = refusal(&old, &old, &alice());
    assert_eq!(nothing.status(), (422, "Invalid"));
}
