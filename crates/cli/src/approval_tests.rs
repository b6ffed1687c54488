//! The pure parts of `chaperonectl approval`: where an object stands, the
//! status patch a decision sends, the reason check and the table.

use chaperone_api::approval::{
    ApprovalDecider, ApprovalDelegationLink, ApprovalPhase, ApprovalPolicyRef, ApprovalSession,
    ToolCallApproval, ToolCallApprovalSpec, ToolCallApprovalStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::*;

fn now() -> Timestamp {
    "2026-03-01T12:00:00Z".parse().unwrap()
}

fn at(offset_seconds: i64) -> String {
    (now() + SignedDuration::from_secs(offset_seconds)).to_string()
}

/// A request made 3 minutes ago that expires in 7, status Pending.
fn pending() -> ToolCallApproval {
    let mut object = ToolCallApproval::new(
        "refunder-x7k2p",
        ToolCallApprovalSpec {
            agent: "refunder".into(),
            service_account: "refunder".into(),
            pod: "refunder-6c9f".into(),
            session: ApprovalSession {
                scope: "task".into(),
                key: "t-42".into(),
            },
            initiator: Some("alice@example.com".into()),
            delegation_chain: vec![ApprovalDelegationLink {
                agent: "shop/planner".into(),
                grant: "shop/planner-refunds".into(),
            }],
            server: "payments".into(),
            tool: "refund".into(),
            arguments: json!({"amount": 250, "card": "[redacted]"}),
            redacted_arguments: vec!["/card".into()],
            args_digest: "ab".repeat(32),
            args_alg: "sha256-rfc8785".into(),
            policy: ApprovalPolicyRef {
                namespace: "shop".into(),
                name: "refunds".into(),
            },
            rule: "mid-refunds".into(),
            requested_at: at(-180),
            expires_at: at(420),
            valid_for_seconds: 300,
        },
    );
    object.metadata.namespace = Some("shop".into());
    object.metadata.resource_version = Some("1234".into());
    object.metadata.generation = Some(1);
    object.status = Some(ToolCallApprovalStatus {
        phase: Some(ApprovalPhase::Pending),
        ..Default::default()
    });
    object
}

fn condition(type_: &str, seconds_ago: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: "ByTest".into(),
        message: String::new(),
        last_transition_time: Time(now() - SignedDuration::from_secs(seconds_ago)),
        observed_generation: None,
    }
}

fn with_condition(type_: &str, seconds_ago: i64) -> ToolCallApproval {
    let mut object = pending();
    let status = object.status.as_mut().unwrap();
    status.conditions.push(condition(type_, seconds_ago));
    object
}

#[test]
fn a_pending_request_in_time_is_pending() {
    assert_eq!(effective_phase(&pending(), now()), ApprovalPhase::Pending);
}

#[test]
fn an_object_without_status_is_pending() {
    let mut object = pending();
    object.status = None;
    assert_eq!(effective_phase(&object, now()), ApprovalPhase::Pending);
}

#[test]
fn a_pending_request_past_its_expiry_is_expired_before_the_controller_records_it() {
    let later = now() + SignedDuration::from_secs(421);
    assert_eq!(effective_phase(&pending(), later), ApprovalPhase::Expired);
}

#[test]
fn a_decision_condition_counts_even_while_the_phase_still_says_pending() {
    assert_eq!(
        effective_phase(&with_condition("Approved", 10), now()),
        ApprovalPhase::Approved
    );
    assert_eq!(
        effective_phase(&with_condition("Denied", 10), now()),
        ApprovalPhase::Denied
    );
    assert_eq!(
        effective_phase(&with_condition("Expired", 10), now()),
        ApprovalPhase::Expired
    );
}

#[test]
fn a_condition_that_is_not_true_decides_nothing() {
    let mut object = with_condition("Approved", 10);
    object.status.as_mut().unwrap().conditions[0].status = "False".into();
    assert_eq!(effective_phase(&object, now()), ApprovalPhase::Pending);
}

#[test]
fn an_approval_not_used_within_valid_for_seconds_is_expired() {
    assert_eq!(
        effective_phase(&with_condition("Approved", 301), now()),
        ApprovalPhase::Expired
    );
    let mut object = with_condition("Approved", 10);
    object.status.as_mut().unwrap().valid_until = Some(at(-1));
    assert_eq!(effective_phase(&object, now()), ApprovalPhase::Expired);
}

#[test]
fn a_used_approval_is_consumed() {
    let mut object = with_condition("Approved", 10);
    object.status.as_mut().unwrap().consumed_at = Some(at(-5));
    assert_eq!(effective_phase(&object, now()), ApprovalPhase::Consumed);
}

#[test]
fn approving_adds_the_condition_and_carries_the_resource_version() {
    let patch = decision_patch(
        &pending(),
        Decision::Approve,
        "ApprovedByUser",
        "checked the ticket",
        now(),
    )
    .unwrap();
    assert_eq!(
        patch,
        json!({
            "metadata": { "resourceVersion": "1234" },
            "status": { "conditions": [{
                "type": "Approved",
                "status": "True",
                "reason": "ApprovedByUser",
                "message": "checked the ticket",
                "lastTransitionTime": "2026-03-01T12:00:00Z",
                "observedGeneration": 1,
            }]},
        })
    );
}

#[test]
fn denying_keeps_the_conditions_already_there() {
    let mut object = pending();
    let mut other = condition("Reviewed", 60);
    other.status = "False".into();
    object.status.as_mut().unwrap().conditions.push(other);
    let patch = decision_patch(&object, Decision::Deny, "TooLarge", "", now()).unwrap();
    let conditions = patch["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 2);
    assert_eq!(conditions[0]["type"], "Reviewed");
    assert_eq!(conditions[1]["type"], "Denied");
    assert_eq!(conditions[1]["reason"], "TooLarge");
    // Nothing the webhook or the controller owns is written by the CLI.
    let status = patch["status"].as_object().unwrap();
    assert_eq!(status.keys().collect::<Vec<_>>(), ["conditions"]);
}

#[test]
fn the_patch_needs_the_resource_version_it_is_conditioned_on() {
    let mut object = pending();
    object.metadata.resource_version = None;
    assert!(decision_patch(&object, Decision::Approve, "ApprovedByUser", "", now()).is_err());
}

#[test]
fn camel_case_reasons_are_accepted() {
    for reason in [
        "ApprovedByUser",
        "A",
        "Ticket_1234",
        "Checked,Twice",
        "Ops:Ok",
    ] {
        check_reason(reason).unwrap();
    }
}

#[test]
fn free_text_reasons_are_refused_with_a_pointer_to_message() {
    for reason in ["", "too large", "1Refund", "Refund:", "Über", "a-b"] {
        let err = check_reason(reason).unwrap_err().to_string();
        assert!(
            err.contains("CamelCase") && err.contains("--message"),
            "{err}"
        );
    }
    assert!(check_reason(&"A".repeat(1025)).is_err());
}

#[test]
fn refusing_a_decided_request_names_its_state_and_the_decider() {
    let mut object = with_condition("Approved", 10);
    object.status.as_mut().unwrap().decided_by = Some(ApprovalDecider {
        username: "bob".into(),
        groups: vec![],
    });
    let err = check_pending(&object, now(), Decision::Deny)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot deny toolcallapproval shop/refunder-x7k2p"),
        "{err}"
    );
    assert!(err.contains("already approved by bob"), "{err}");
    assert!(err.contains("Only a Pending request"), "{err}");
    let later = now() + SignedDuration::from_secs(600);
    let err = check_pending(&pending(), later, Decision::Approve)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has expired"), "{err}");
}

#[test]
fn the_chain_ends_at_the_agent_itself() {
    assert_eq!(
        chain_text(&pending(), true),
        "shop/planner (grant shop/planner-refunds) → shop/refunder"
    );
    assert_eq!(
        chain_text(&pending(), false),
        "shop/planner → shop/refunder"
    );
}

#[test]
fn the_description_shows_what_is_approved() {
    let text = describe(&pending(), now());
    for expected in [
        "ToolCallApproval shop/refunder-x7k2p",
        "Tool:      refund",
        "Server:    payments",
        "Session:   task t-42",
        "Initiator: alice@example.com",
        "Chain:     shop/planner (grant shop/planner-refunds) → shop/refunder",
        "Policy:    shop/refunds, rule mid-refunds",
        "(3m ago)",
        "(in 7m)",
        "(redacted: /card)",
        "\"card\": \"[redacted]\"",
        "\"amount\": 250",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from\n{text}");
    }
}

#[test]
fn the_table_has_one_row_and_one_detail_line_per_object() {
    let mut decided = with_condition("Denied", 30);
    decided.metadata.name = Some("refunder-aaaaa".into());
    decided.spec.delegation_chain.clear();
    decided.status.as_mut().unwrap().decided_by = Some(ApprovalDecider {
        username: "bob".into(),
        groups: vec![],
    });
    let table = render_table(&[pending(), decided], now(), TableOptions::default());
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "NAME             AGENT      TOOL     PHASE     REQUESTED   EXPIRES   DECIDED-BY"
    );
    assert_eq!(
        lines[1],
        "refunder-x7k2p   refunder   refund   Pending   3m          in 7m     -"
    );
    assert_eq!(
        lines[2],
        r#"    args: {"amount":250,"card":"[redacted]"}  chain: shop/planner → shop/refunder"#
    );
    assert_eq!(
        lines[3],
        "refunder-aaaaa   refunder   refund   Denied    3m          -         bob"
    );
    assert_eq!(lines[4], r#"    args: {"amount":250,"card":"[redacted]"}"#);
    assert_eq!(lines.len(), 5);
}

#[test]
fn the_wide_table_adds_columns_and_namespaces_come_first() {
    let table = render_table(
        &[pending()],
        now(),
        TableOptions {
            wide: true,
            namespaces: true,
        },
    );
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAMESPACE",
            "NAME",
            "AGENT",
            "TOOL",
            "PHASE",
            "REQUESTED",
            "EXPIRES",
            "DECIDED-BY",
            "SERVER",
            "SESSION",
            "POLICY",
            "RULE"
        ]
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[0], "shop");
    // EXPIRES ("in 7m") is two words.
    assert_eq!(
        &row[9..],
        ["payments", "task/t-42", "shop/refunds", "mid-refunds"]
    );
    assert!(table.contains("(grant shop/planner-refunds)"));
}

#[test]
fn long_arguments_are_cut_short_unless_wide() {
    let mut object = pending();
    object.spec.arguments = json!({ "note": "x".repeat(300) });
    let plain = render_table(&[object.clone()], now(), TableOptions::default());
    let detail = plain.lines().nth(2).unwrap();
    let shown = detail
        .strip_prefix("    args: ")
        .and_then(|rest| rest.split("  chain: ").next())
        .unwrap();
    assert!(shown.ends_with('…'), "{detail}");
    assert_eq!(shown.chars().count(), 100, "{detail}");
    let wide = render_table(
        &[object],
        now(),
        TableOptions {
            wide: true,
            namespaces: false,
        },
    );
    assert!(wide.contains(&"x".repeat(300)));
}

#[test]
fn durations_read_like_kubectl_ages() {
    let d = SignedDuration::from_secs;
    assert_eq!(short_duration(d(0)), "0s");
    assert_eq!(short_duration(d(119)), "119s");
    assert_eq!(short_duration(d(120)), "2m");
    assert_eq!(short_duration(d(3 * 3600 - 1)), "179m");
    assert_eq!(short_duration(d(3 * 3600)), "3h");
    assert_eq!(short_duration(d(48 * 3600)), "2d");
    assert_eq!(short_duration(d(-5)), "0s");
}

#[test]
fn the_outcome_names_the_approver_the_webhook_recorded() {
    let mut object = with_condition("Approved", 0);
    assert_eq!(
        outcome(&object, Decision::Approve),
        "toolcallapproval.chaperone.dev/refunder-x7k2p approved"
    );
    let status = object.status.as_mut().unwrap();
    status.decided_by = Some(ApprovalDecider {
        username: "alice".into(),
        groups: vec!["approvers".into()],
    });
    status.valid_until = Some(at(300));
    assert_eq!(
        outcome(&object, Decision::Approve),
        "toolcallapproval.chaperone.dev/refunder-x7k2p approved (decided by alice; usable until 2026-03-01T12:05:00Z)"
    );
}
