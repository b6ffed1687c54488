//! Unit tests of the approval flow's pure parts: requests checked, objects
//! built and read, the sweep's decisions, the ticket book and the Events.

use std::time::Duration;

use chaperone_api::approval::{
    ApprovalDecider, ApprovalPhase, CONDITION_APPROVED, CONDITION_DENIED, CONDITION_EXPIRED,
    ToolCallApproval,
};
use chaperone_policy::AgentKey;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::{SignedDuration, Timestamp},
};
use serde_json::json;

use super::{
    core::*,
    events::{ApprovalEventKind, approval_event},
    tickets::*,
};
use crate::auth::SidecarIdentity;

const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn identity() -> SidecarIdentity {
    SidecarIdentity {
        agent: AgentKey::new("shop", "support"),
        pod: "support-7d9f".into(),
        pod_uid: "uid-1".into(),
        service_account: "support".into(),
    }
}

fn raw() -> RawApprovalRequest {
    RawApprovalRequest {
        ticket: 7,
        policy_namespace: "shop".into(),
        policy: "refunds".into(),
        rule: "large-refunds".into(),
        server: "orders".into(),
        tool: "refund".into(),
        arguments_json: r#"{"order":"A-1","amount":500,"card":"[redacted]"}"#.into(),
        redacted: vec!["/card".into()],
        args_digest: DIGEST.into(),
        scope: "task".into(),
        scope_key: "task-42".into(),
        initiator: "alice".into(),
        chain: vec![("shop/planner".into(), "shop/planner-to-support".into())],
        timeout_seconds: 600,
        valid_for_seconds: 300,
    }
}

fn call() -> ApprovalCall {
    ApprovalCall::check(raw()).unwrap()
}

/// The object the controller would create at `at(0)`, named `name`.
fn object(name: &str) -> ToolCallApproval {
    let mut object = new_approval(&call(), &identity(), at(0));
    object.metadata.name = Some(name.into());
    object.metadata.generation = Some(1);
    object.metadata.creation_timestamp = Some(Time(at(0)));
    object
}

fn condition(type_: &str, reason: &str, message: &str, when: Timestamp) -> Condition {
    Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(when),
        observed_generation: Some(1),
    }
}

/// `object` approved by `bob` at `at(when)`, usable for 300 s.
fn approved(mut object: ToolCallApproval, when: i64) -> ToolCallApproval {
    let status = object.status.get_or_insert_with(Default::default);
    status
        .conditions
        .push(condition(CONDITION_APPROVED, "Approved", "ok", at(when)));
    status.phase = Some(ApprovalPhase::Approved);
    status.decided_by = Some(ApprovalDecider {
        username: "bob".into(),
        groups: vec!["support-leads".into()],
    });
    status.decided_at = Some(rfc3339(at(when)));
    status.valid_until = Some(rfc3339(at(when + 300)));
    object
}

fn denied(mut object: ToolCallApproval, when: i64) -> ToolCallApproval {
    let status = object.status.get_or_insert_with(Default::default);
    status.conditions.push(condition(
        CONDITION_DENIED,
        "TooLarge",
        "refunds over 400 need a ticket",
        at(when),
    ));
    status.phase = Some(ApprovalPhase::Denied);
    status.decided_by = Some(ApprovalDecider {
        username: "carol".into(),
        groups: vec![],
    });
    status.decided_at = Some(rfc3339(at(when)));
    object
}

// --- requests -------------------------------------------------------------

#[test]
fn a_complete_request_is_accepted_as_sent() {
    let call = call();
    assert_eq!(call.ticket, 7);
    assert_eq!(call.policy.name, "refunds");
    assert_eq!(call.arguments["amount"], 500);
    assert_eq!(call.session.scope, "task");
    assert_eq!(call.initiator.as_deref(), Some("alice"));
    assert_eq!(call.chain[0].grant, "shop/planner-to-support");
}

#[test]
fn empty_arguments_and_initiator_mean_none() {
    let call = ApprovalCall::check(RawApprovalRequest {
        arguments_json: String::new(),
        redacted: vec![],
        initiator: String::new(),
        ..raw()
    })
    .unwrap();
    assert_eq!(call.arguments, json!({}));
    assert_eq!(call.initiator, None);
}

#[test]
fn a_request_missing_a_field_is_refused_naming_it() {
    for (field, request) in [
        (
            "policy",
            RawApprovalRequest {
                policy: String::new(),
                ..raw()
            },
        ),
        (
            "rule",
            RawApprovalRequest {
                rule: String::new(),
                ..raw()
            },
        ),
        (
            "tool",
            RawApprovalRequest {
                tool: String::new(),
                ..raw()
            },
        ),
        (
            "scope_key",
            RawApprovalRequest {
                scope_key: String::new(),
                ..raw()
            },
        ),
    ] {
        assert_eq!(
            ApprovalCall::check(request),
            Err(InvalidApprovalRequest::Empty(field))
        );
    }
}

#[test]
fn a_request_with_an_unknown_scope_or_bad_digest_is_refused() {
    let scope = ApprovalCall::check(RawApprovalRequest {
        scope: "user".into(),
        ..raw()
    });
    assert!(matches!(
        scope,
        Err(InvalidApprovalRequest::UnknownScope(_))
    ));
    for digest in [
        "abc",
        &DIGEST.to_uppercase(),
        &format!("{DIGEST}00"),
        &DIGEST.replace('0', "g"),
    ] {
        let request = RawApprovalRequest {
            args_digest: digest.to_string(),
            ..raw()
        };
        assert!(
            matches!(
                ApprovalCall::check(request),
                Err(InvalidApprovalRequest::BadDigest(_))
            ),
            "{digest}"
        );
    }
}

#[test]
fn durations_must_be_between_a_second_and_a_day() {
    for (timeout, valid_for) in [(0, 300), (86_401, 300), (600, 0), (600, 86_401)] {
        let request = RawApprovalRequest {
            timeout_seconds: timeout,
            valid_for_seconds: valid_for,
            ..raw()
        };
        assert!(
            matches!(
                ApprovalCall::check(request),
                Err(InvalidApprovalRequest::OutOfRange { .. })
            ),
            "{timeout} {valid_for}"
        );
    }
    let longest = RawApprovalRequest {
        timeout_seconds: 86_400,
        valid_for_seconds: 1,
        ..raw()
    };
    assert!(ApprovalCall::check(longest).is_ok());
}

#[test]
fn arguments_must_be_json_and_not_too_large() {
    let not_json = RawApprovalRequest {
        arguments_json: "{order".into(),
        redacted: vec![],
        ..raw()
    };
    assert!(matches!(
        ApprovalCall::check(not_json),
        Err(InvalidApprovalRequest::ArgumentsNotJson(_))
    ));
    let large = RawApprovalRequest {
        arguments_json: format!(r#"{{"note":"{}"}}"#, "x".repeat(MAX_ARGUMENTS_BYTES)),
        redacted: vec![],
        ..raw()
    };
    assert!(matches!(
        ApprovalCall::check(large),
        Err(InvalidApprovalRequest::ArgumentsTooLarge { .. })
    ));
}

#[test]
fn a_redacted_argument_that_still_holds_its_value_is_refused() {
    let leaked = RawApprovalRequest {
        arguments_json: r#"{"order":"A-1","card":"4111111111111111"}"#.into(),
        ..raw()
    };
    assert_eq!(
        ApprovalCall::check(leaked),
        Err(InvalidApprovalRequest::NotRedacted("/card".into()))
    );
    // A pointer to an argument the call did not have is fine.
    let absent = RawApprovalRequest {
        redacted: vec!["/card".into(), "/cvv".into()],
        ..raw()
    };
    assert!(ApprovalCall::check(absent).is_ok());
    let not_a_pointer = RawApprovalRequest {
        redacted: vec!["card".into()],
        ..raw()
    };
    assert!(matches!(
        ApprovalCall::check(not_a_pointer),
        Err(InvalidApprovalRequest::BadPointer(_))
    ));
    let too_many = RawApprovalRequest {
        redacted: (0..=MAX_REDACTED).map(|i| format!("/a{i}")).collect(),
        ..raw()
    };
    assert!(matches!(
        ApprovalCall::check(too_many),
        Err(InvalidApprovalRequest::TooManyRedactions(_))
    ));
}

#[test]
fn a_chain_link_must_name_agent_and_grant() {
    let request = RawApprovalRequest {
        chain: vec![("shop/planner".into(), String::new())],
        ..raw()
    };
    assert_eq!(
        ApprovalCall::check(request),
        Err(InvalidApprovalRequest::Empty("chain.grant"))
    );
}

// --- the object -----------------------------------------------------------

#[test]
fn the_created_object_describes_the_call_and_is_found_by_its_labels() {
    let object = new_approval(&call(), &identity(), at(0));
    let meta = &object.metadata;
    assert_eq!(meta.generate_name.as_deref(), Some("support-"));
    assert_eq!(meta.namespace.as_deref(), Some("shop"));
    assert_eq!(meta.owner_references, None, "it outlives the pod");
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels[LABEL_AGENT], "support");
    assert_eq!(labels[LABEL_ARGS_DIGEST], DIGEST[..63]);
    assert_eq!(
        label_selector("support", DIGEST),
        format!(
            "{LABEL_AGENT}=support,{LABEL_ARGS_DIGEST}={}",
            &DIGEST[..63]
        )
    );
    let spec = &object.spec;
    assert_eq!(
        (
            spec.agent.as_str(),
            spec.service_account.as_str(),
            spec.pod.as_str()
        ),
        ("support", "support", "support-7d9f")
    );
    assert_eq!(spec.arguments["card"], "[redacted]");
    assert_eq!(spec.redacted_arguments, vec!["/card".to_string()]);
    assert_eq!(spec.args_alg, ARGS_ALG);
    assert_eq!(spec.requested_at, rfc3339(at(0)));
    assert_eq!(spec.expires_at, rfc3339(at(600)));
    assert_eq!(spec.valid_for_seconds, 300);
    assert_eq!(spec.initiator.as_deref(), Some("alice"));
    assert_eq!(object.status, None);
}

#[test]
fn an_agent_name_too_long_for_a_label_is_left_to_the_spec() {
    let long = "a".repeat(64);
    let labels = approval_labels(&long, DIGEST);
    assert!(!labels.contains_key(LABEL_AGENT));
    assert!(labels.contains_key(LABEL_ARGS_DIGEST));
}

#[test]
fn times_are_written_in_whole_seconds() {
    let now = at(0) + SignedDuration::from_millis(1500);
    assert_eq!(rfc3339(now), rfc3339(at(1)));
    assert!(rfc3339(now).ends_with('Z'));
}

// --- standing -------------------------------------------------------------

#[test]
fn a_new_object_is_pending_until_it_expires() {
    let object = object("a");
    assert_eq!(
        standing(&object, at(10)),
        Standing::Pending {
            expires_at: at(600)
        }
    );
    assert!(matches!(
        standing(&with_pending_phase(&object), at(600)),
        Standing::Expired { recorded: false, ref reason, .. } if reason == REASON_NOT_DECIDED
    ));
}

#[test]
fn an_approval_is_usable_until_valid_until() {
    let object = approved(object("a"), 100);
    assert_eq!(
        standing(&object, at(399)),
        Standing::Approved {
            decided_by: "bob".into(),
            valid_until: at(400)
        }
    );
    let lapsed = standing(&object, at(400));
    assert!(
        matches!(&lapsed, Standing::Expired { recorded: false, reason, message } if reason == REASON_NOT_USED && message.contains("bob")),
        "{lapsed:?}"
    );
}

#[test]
fn without_valid_until_an_approval_lasts_valid_for_seconds_from_its_decision() {
    let mut object = approved(object("a"), 100);
    object.status.as_mut().unwrap().valid_until = None;
    assert!(matches!(
        standing(&object, at(399)),
        Standing::Approved { .. }
    ));
    assert!(matches!(
        standing(&object, at(400)),
        Standing::Expired { .. }
    ));
    // Nor a decidedAt: the condition's transition time counts.
    object.status.as_mut().unwrap().decided_at = None;
    assert!(matches!(
        standing(&object, at(399)),
        Standing::Approved { .. }
    ));
    assert!(matches!(
        standing(&object, at(400)),
        Standing::Expired { .. }
    ));
    // An unreadable validUntil makes it unusable.
    object.status.as_mut().unwrap().valid_until = Some("soon".into());
    assert!(matches!(
        standing(&object, at(101)),
        Standing::Expired { .. }
    ));
}

#[test]
fn the_phase_alone_never_approves() {
    let mut object = object("a");
    object.status.get_or_insert_with(Default::default).phase = Some(ApprovalPhase::Approved);
    assert!(matches!(standing(&object, at(1)), Standing::Pending { .. }));
}

#[test]
fn the_phase_alone_can_deny_or_expire() {
    for (phase, denied) in [
        (ApprovalPhase::Denied, true),
        (ApprovalPhase::Expired, false),
    ] {
        let mut object = approved(object("a"), 1);
        object.status.as_mut().unwrap().phase = Some(phase);
        let standing = standing(&object, at(2));
        assert_eq!(
            matches!(standing, Standing::Denied { .. }),
            denied,
            "{standing:?}"
        );
        assert_eq!(
            matches!(standing, Standing::Expired { recorded: true, .. }),
            !denied,
            "{standing:?}"
        );
    }
}

#[test]
fn a_denial_carries_its_reason_message_and_decider() {
    assert_eq!(
        standing(&denied(object("a"), 5), at(6)),
        Standing::Denied {
            reason: "TooLarge".into(),
            message: "refunds over 400 need a ticket".into(),
            decided_by: "carol".into(),
        }
    );
    // Approved and Denied both: denied (fail closed).
    assert!(matches!(
        standing(&denied(approved(object("a"), 5), 6), at(7)),
        Standing::Denied { .. }
    ));
}

#[test]
fn a_used_approval_is_consumed_whatever_else_it_says() {
    let used = consumed(&approved(object("a"), 5), "support-7d9f", at(6));
    let status = used.status.as_ref().unwrap();
    assert_eq!(status.phase, Some(ApprovalPhase::Consumed));
    assert_eq!(status.consumed_at.as_deref(), Some(rfc3339(at(6)).as_str()));
    assert_eq!(status.consumed_by.as_deref(), Some("support-7d9f"));
    assert_eq!(
        status.decided_by.as_ref().unwrap().username,
        "bob",
        "untouched"
    );
    assert_eq!(
        standing(&used, at(7)),
        Standing::Consumed {
            by: "support-7d9f".into()
        }
    );
    assert!(standing(&used, at(7)).is_final());
}

#[test]
fn expiring_adds_the_condition_and_phase_and_keeps_the_decision() {
    let object = approved(object("a"), 5);
    let expired = expired(&object, REASON_NOT_USED, "not used", at(400));
    let status = expired.status.as_ref().unwrap();
    assert_eq!(status.phase, Some(ApprovalPhase::Expired));
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_EXPIRED)
        .unwrap();
    assert_eq!(
        (
            condition.status.as_str(),
            condition.reason.as_str(),
            condition.message.as_str()
        ),
        ("True", REASON_NOT_USED, "not used")
    );
    assert_eq!(condition.last_transition_time, Time(at(400)));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == CONDITION_APPROVED)
    );
    assert_eq!(
        standing(&expired, at(401)),
        Standing::Expired {
            recorded: true,
            reason: REASON_NOT_USED.into(),
            message: "not used".into()
        }
    );
}

// --- reuse ----------------------------------------------------------------

#[test]
fn a_repeated_request_reuses_the_oldest_pending_approval_of_the_same_call() {
    let mut newer = object("b");
    newer.spec.requested_at = rfc3339(at(5));
    let older = object("a");
    let objects = [newer, older];
    let picked = pick_reusable(&objects, &call(), &identity(), at(10)).unwrap();
    assert_eq!(object_name(picked), "a");
}

#[test]
fn an_approved_unused_approval_is_preferred_to_a_pending_one() {
    let objects = [object("a"), approved(object("b"), 5)];
    let picked = pick_reusable(&objects, &call(), &identity(), at(10)).unwrap();
    assert_eq!(object_name(picked), "b");
}

#[test]
fn only_an_approval_of_exactly_this_call_is_reused() {
    let other = |change: fn(&mut ToolCallApproval)| {
        let mut object = object("x");
        change(&mut object);
        object
    };
    let others = [
        other(|o| o.spec.args_digest = "f".repeat(64)),
        other(|o| o.spec.session.key = "task-43".into()),
        other(|o| o.spec.session.scope = "trace".into()),
        other(|o| o.spec.tool = "cancel".into()),
        other(|o| o.spec.server = "billing".into()),
        other(|o| o.spec.agent = "planner".into()),
        other(|o| o.spec.policy.name = "other".into()),
        other(|o| o.spec.rule = "other".into()),
        other(|o| o.metadata.namespace = Some("elsewhere".into())),
    ];
    for object in &others {
        assert!(
            pick_reusable([object], &call(), &identity(), at(10)).is_none(),
            "{:?}",
            object.spec
        );
    }
}

#[test]
fn used_denied_and_expired_approvals_are_not_reused() {
    let objects = [
        consumed(&approved(object("a"), 5), "p", at(6)),
        denied(object("b"), 5),
        approved(object("c"), 5),
        object("d"),
    ];
    // At 700 the pending one expired and the approved one lapsed.
    assert!(pick_reusable(&objects, &call(), &identity(), at(700)).is_none());
    assert_eq!(
        pending_count(&objects, "shop", "support", at(10)),
        1,
        "only d waits for a person"
    );
    assert_eq!(pending_count(&objects, "shop", "support", at(700)), 0);
    assert_eq!(pending_count(&objects, "shop", "planner", at(10)), 0);
}

// --- sweep ----------------------------------------------------------------

const RETENTION: Duration = Duration::from_secs(3600);

#[test]
fn the_sweep_expires_lapsed_approvals() {
    assert_eq!(
        sweep_action(&object("a"), at(599), RETENTION),
        SweepAction::Keep
    );
    assert!(matches!(
        sweep_action(&object("a"), at(600), RETENTION),
        SweepAction::Expire { reason, .. } if reason == REASON_NOT_DECIDED
    ));
    let approved = approved(object("b"), 100);
    assert_eq!(
        sweep_action(&approved, at(399), RETENTION),
        SweepAction::Keep
    );
    assert!(matches!(
        sweep_action(&approved, at(400), RETENTION),
        SweepAction::Expire { reason, .. } if reason == REASON_NOT_USED
    ));
}

#[test]
fn the_sweep_deletes_decided_approvals_after_the_retention() {
    let used = consumed(&approved(object("a"), 5), "p", at(10));
    assert_eq!(sweep_action(&used, at(3609), RETENTION), SweepAction::Keep);
    assert_eq!(
        sweep_action(&used, at(3610), RETENTION),
        SweepAction::Delete
    );
    let denied = denied(object("b"), 20);
    assert_eq!(
        sweep_action(&denied, at(3619), RETENTION),
        SweepAction::Keep
    );
    assert_eq!(
        sweep_action(&denied, at(3620), RETENTION),
        SweepAction::Delete
    );
    let expired = expired(&object("c"), REASON_NOT_DECIDED, "late", at(600));
    assert_eq!(
        sweep_action(&expired, at(4199), RETENTION),
        SweepAction::Keep
    );
    assert_eq!(
        sweep_action(&expired, at(4200), RETENTION),
        SweepAction::Delete
    );
    assert_eq!(decided_at(&expired), Some(at(600)));
}

#[test]
fn the_sweep_keeps_what_can_still_be_decided_or_used() {
    assert_eq!(
        sweep_action(&object("a"), at(10), Duration::from_secs(1)),
        SweepAction::Keep
    );
    assert_eq!(
        sweep_action(&approved(object("b"), 5), at(10), Duration::from_secs(1)),
        SweepAction::Keep
    );
}

// --- answers --------------------------------------------------------------

#[test]
fn answers_follow_the_standing() {
    let pending = object("a");
    let answer = ApprovalAnswer::for_standing(7, &pending, &standing(&pending, at(1)));
    assert_eq!(
        (answer.phase, answer.name.as_str()),
        (AnswerPhase::Pending, "a")
    );
    assert_eq!(answer.expires_at, at(600).as_second());

    let denied = denied(object("b"), 5);
    let answer = ApprovalAnswer::for_standing(7, &denied, &standing(&denied, at(6)));
    assert_eq!(answer.phase, AnswerPhase::Denied);
    assert_eq!(answer.reason, "TooLarge");
    assert_eq!(answer.message, "refunds over 400 need a ticket");
    assert_eq!(answer.decided_by, "carol");

    let used = consumed(&approved(object("c"), 5), "other-pod", at(6));
    let answer = ApprovalAnswer::for_standing(7, &used, &standing(&used, at(7)));
    assert_eq!(answer.phase, AnswerPhase::Failed);
    assert!(
        answer
            .message
            .contains("was used by another call (pod other-pod)"),
        "{}",
        answer.message
    );

    let answer = ApprovalAnswer::for_standing(7, &pending, &standing(&pending, at(600)));
    assert_eq!(answer.phase, AnswerPhase::Expired);
    assert_eq!(answer.reason, REASON_NOT_DECIDED);

    let answer = ApprovalAnswer::granted(7, &used);
    assert_eq!(answer.phase, AnswerPhase::Granted);
    assert_eq!(answer.decided_by, "bob");
    assert!(
        answer.message.contains("approved by bob"),
        "{}",
        answer.message
    );
}

// --- tickets --------------------------------------------------------------

fn key(stream: u64, ticket: u64) -> TicketKey {
    TicketKey { stream, ticket }
}

fn name(n: &str) -> ObjectName {
    ("shop".into(), n.into())
}

fn approved_standing() -> Standing {
    Standing::Approved {
        decided_by: "bob".into(),
        valid_until: at(400),
    }
}

#[test]
fn an_approval_is_consumed_for_the_oldest_ticket_and_the_others_fail() {
    let mut book = TicketBook::default();
    for (k, pod) in [(key(1, 1), "p1"), (key(2, 1), "p2"), (key(1, 2), "p1")] {
        book.open(k, pod).unwrap();
        assert!(book.attach(k, name("a")));
    }
    let pending = Standing::Pending {
        expires_at: at(600),
    };
    assert_eq!(book.on_standing(&name("a"), &pending), TicketStep::Wait);
    assert_eq!(
        book.on_standing(&name("a"), &approved_standing()),
        TicketStep::Consume {
            ticket: key(1, 1),
            pod: "p1".into()
        }
    );
    // The watch sees it again while the consume is in flight: no second one.
    assert_eq!(
        book.on_standing(&name("a"), &approved_standing()),
        TicketStep::Wait
    );
    let outcome = book.consume_done(&name("a"), key(1, 1), ConsumeResult::Won);
    assert_eq!(outcome.granted, Some(key(1, 1)));
    assert_eq!(outcome.failed, vec![key(2, 1), key(1, 2)]);
    assert!(book.is_empty());
}

#[test]
fn after_a_conflict_the_new_version_decides() {
    let mut book = TicketBook::default();
    book.open(key(1, 1), "p1").unwrap();
    book.attach(key(1, 1), name("a"));
    assert!(matches!(
        book.on_standing(&name("a"), &approved_standing()),
        TicketStep::Consume { .. }
    ));
    let outcome = book.consume_done(&name("a"), key(1, 1), ConsumeResult::Conflict);
    assert_eq!(outcome, ConsumeOutcome::default());
    assert!(book.is_open(key(1, 1)));
    // Another replica used it.
    let used = Standing::Consumed { by: "p9".into() };
    assert_eq!(
        book.on_standing(&name("a"), &used),
        TicketStep::Finish(vec![key(1, 1)])
    );
    assert!(book.is_empty());
}

#[test]
fn a_failed_consume_fails_only_its_ticket() {
    let mut book = TicketBook::default();
    for k in [key(1, 1), key(1, 2)] {
        book.open(k, "p1").unwrap();
        book.attach(k, name("a"));
    }
    book.on_standing(&name("a"), &approved_standing());
    let outcome = book.consume_done(&name("a"), key(1, 1), ConsumeResult::Failed);
    assert_eq!(outcome.failed, vec![key(1, 1)]);
    assert_eq!(book.waiting_on(&name("a")), vec![key(1, 2)]);
}

#[test]
fn a_consume_won_for_a_released_ticket_grants_nothing() {
    let mut book = TicketBook::default();
    book.open(key(1, 1), "p1").unwrap();
    book.attach(key(1, 1), name("a"));
    book.on_standing(&name("a"), &approved_standing());
    assert!(book.close(key(1, 1)));
    let outcome = book.consume_done(&name("a"), key(1, 1), ConsumeResult::Won);
    assert_eq!(outcome, ConsumeOutcome::default());
}

#[test]
fn a_decision_finishes_every_ticket_and_pending_keeps_them() {
    let mut book = TicketBook::default();
    for k in [key(1, 1), key(2, 5)] {
        book.open(k, "p").unwrap();
        book.attach(k, name("a"));
    }
    book.open(key(3, 1), "p").unwrap();
    book.attach(key(3, 1), name("other"));
    let denied = Standing::Denied {
        reason: "No".into(),
        message: String::new(),
        decided_by: "carol".into(),
    };
    assert_eq!(
        book.on_standing(&name("a"), &denied),
        TicketStep::Finish(vec![key(1, 1), key(2, 5)])
    );
    assert_eq!(book.len(), 1, "the other object's ticket waits");
    assert_eq!(book.on_standing(&name("nobody"), &denied), TicketStep::Wait);
}

#[test]
fn a_ticket_released_before_its_object_was_found_is_not_attached() {
    let mut book = TicketBook::default();
    book.open(key(1, 1), "p").unwrap();
    assert!(book.close(key(1, 1)));
    assert!(!book.attach(key(1, 1), name("a")));
    assert!(book.waiting_on(&name("a")).is_empty());
}

#[test]
fn a_stream_that_ends_forgets_only_its_tickets() {
    let mut book = TicketBook::default();
    for k in [key(1, 1), key(1, 2), key(2, 1)] {
        book.open(k, "p").unwrap();
        book.attach(k, name("a"));
    }
    book.close_stream(1);
    assert_eq!(book.waiting_on(&name("a")), vec![key(2, 1)]);
    assert_eq!(book.on_deleted(&name("a")), vec![key(2, 1)]);
    assert!(book.is_empty());
}

#[test]
fn duplicate_tickets_and_too_many_tickets_are_refused() {
    let mut book = TicketBook::default();
    book.open(key(1, 1), "p").unwrap();
    assert_eq!(book.open(key(1, 1), "p"), Err(TicketRefused::Duplicate(1)));
    for ticket in 2..=MAX_TICKETS_PER_STREAM as u64 {
        book.open(key(1, ticket), "p").unwrap();
    }
    assert_eq!(book.open(key(1, 9999), "p"), Err(TicketRefused::TooMany));
    assert!(
        book.open(key(2, 1), "p").is_ok(),
        "other streams are not affected"
    );
    book.close(key(1, 1));
    assert!(book.open(key(1, 9999), "p").is_ok());
}

// --- events ---------------------------------------------------------------

#[test]
fn events_name_the_object_the_tool_and_the_decider() {
    let requested = approval_event(
        ApprovalEventKind::Requested,
        &object("support-x1"),
        Some(("support-7d9f", "uid-1")),
        "",
    );
    assert_eq!(requested.reason, "ApprovalRequested");
    assert!(!requested.warning);
    assert_eq!(requested.agent, AgentKey::new("shop", "support"));
    assert_eq!(requested.pod_uid.as_deref(), Some("uid-1"));
    for part in [
        "orders/refund",
        "support-x1",
        "chaperonectl approval approve|deny support-x1 -n shop",
        "shop/refunds rule large-refunds",
    ] {
        assert!(requested.note.contains(part), "{part}: {}", requested.note);
    }

    let used = consumed(&approved(object("support-x1"), 5), "support-7d9f", at(6));
    let granted = approval_event(ApprovalEventKind::Granted, &used, None, "");
    assert_eq!(granted.reason, "ApprovalGranted");
    assert!(granted.note.contains("approved by bob"), "{}", granted.note);
    assert_eq!(
        (granted.pod.as_str(), granted.pod_uid),
        ("support-7d9f", None)
    );

    let denied = approval_event(
        ApprovalEventKind::Denied,
        &denied(object("support-x2"), 5),
        None,
        "refunds over 400 need a ticket",
    );
    assert!(denied.warning);
    assert!(denied.note.contains("denied by carol"), "{}", denied.note);
    assert!(denied.note.contains("refunds over 400"), "{}", denied.note);

    let expired = approval_event(
        ApprovalEventKind::Expired,
        &object("support-x3"),
        None,
        "late",
    );
    assert_eq!(expired.reason, "ApprovalExpired");
    assert!(expired.warning);
    assert!(
        expired.note.contains("support-x3 expired"),
        "{}",
        expired.note
    );
}
