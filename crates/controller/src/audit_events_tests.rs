use super::*;

#[test]
fn denials_name_tool_rule_session_and_chain() {
    let record = r#"{"decision":"deny","rule":"support/no-refunds","server":"orders","tool":"refund","reason":"a deny rule matched","correlation":"c1","chain":["ns/planner","ns/worker"],"session":{"chaperone":"s1","mcp":""}}"#;
    let AuditOutcome::Denied {
        reason,
        action,
        note,
    } = classify(record)
    else {
        panic!("not a denial")
    };
    assert_eq!(reason, "ToolCallDenied");
    assert_eq!(action, "Call orders/refund (support/no-refunds)");
    for part in [
        "orders/refund",
        "denied by rule support/no-refunds",
        "session s1",
        "chain: ns/planner → ns/worker",
        "c1",
    ] {
        assert!(note.contains(part), "{note} lacks {part}");
    }
}

#[test]
fn a_delegated_denial_shows_the_chain_origin_first() {
    let record = serde_json::json!({
        "decision": "deny", "rule": "billing/no-refunds", "server": "payments",
        "tool": "refund", "reason": "a deny rule matched", "correlation": "c2",
        "chain": ["default/planner", "default/billing-worker"],
        "session": { "chaperone": "s2" }
    });
    let AuditOutcome::Denied { note, .. } = classify(&record.to_string()) else {
        panic!("not a denial")
    };
    assert!(
        note.contains("chain: default/planner → default/billing-worker"),
        "{note}"
    );
}

#[test]
fn a_default_denial_is_not_called_a_rule() {
    let record = r#"{"decision":"deny","rule":"no rule allows","server":"s","tool":"t","reason":"no rule allows this call","chain":[],"session":{"chaperone":"s4"}}"#;
    let AuditOutcome::Denied { note, .. } = classify(record) else {
        panic!("not a denial")
    };
    assert!(
        note.starts_with("tool s/t denied (no rule allows): no rule allows this call;"),
        "{note}"
    );
    assert!(!note.contains("by rule"), "{note}");
}

#[test]
fn an_own_session_denial_says_so() {
    let record = r#"{"decision":"deny","rule":"r","server":"s","tool":"t","chain":[],"session":{"chaperone":"s3"}}"#;
    let AuditOutcome::Denied { note, .. } = classify(record) else {
        panic!("not a denial")
    };
    assert!(note.contains("chain: none (own session)"), "{note}");
}

#[test]
fn summaries_count_allowed_calls_per_tool() {
    let mut summary = Summary::default();
    assert_eq!(summary.note(), None);
    for _ in 0..3 {
        summary.allowed("orders/get_order".into());
    }
    summary.allowed("orders/list_orders".into());
    summary.suppressed_denials = 2;
    let note = summary.note().unwrap();
    assert!(
        note.starts_with(
            "4 tool calls allowed in the last 60 s: orders/get_order 3, orders/list_orders 1;"
        ),
        "{note}"
    );
    assert!(note.contains("2 denials not shown"), "{note}");
}

#[test]
fn summaries_name_a_bounded_number_of_tools() {
    let mut summary = Summary::default();
    for i in 0..(SUMMARY_TOOLS + 5) {
        summary.allowed(format!("s/tool-{i:02}"));
    }
    assert_eq!(summary.tools.len(), SUMMARY_TOOLS);
    assert_eq!(summary.other_tools, 5);
    assert_eq!(summary.allowed, (SUMMARY_TOOLS + 5) as u64);
    assert!(summary.note().unwrap().contains("others 5"));
}

#[test]
fn dry_run_denials_and_allows_are_told_apart() {
    assert!(matches!(
        classify(r#"{"decision":"wouldDeny"}"#),
        AuditOutcome::Denied {
            reason: "ToolCallWouldDeny",
            ..
        }
    ));
    assert_eq!(
        classify(r#"{"decision":"allow","server":"a","tool":"b"}"#),
        AuditOutcome::Allowed { tool: "a/b".into() }
    );
    assert_eq!(classify("not json"), AuditOutcome::Unreadable);
    assert_eq!(
        classify(r#"{"final":false,"kid":"k","kind":"checkpoint","records":3,"seq":4}"#),
        AuditOutcome::Checkpoint
    );
    assert_eq!(
        classify(r#"{"decision":"maybe"}"#),
        AuditOutcome::Unreadable
    );
}

#[test]
fn calls_refused_for_want_of_approval_are_warnings_of_their_own() {
    for (decision, expected) in [
        ("approval", "ToolCallNotApproved"),
        ("wouldRequireApproval", "ToolCallWouldRequireApproval"),
    ] {
        let record = format!(
            r#"{{"decision":"{decision}","rule":"support/large-refunds","server":"orders","tool":"refund"}}"#
        );
        let AuditOutcome::Denied { reason, note, .. } = classify(&record) else {
            panic!("{decision}: not a warning")
        };
        assert_eq!(reason, expected);
        assert!(note.contains("support/large-refunds"), "{note}");
    }
}

#[test]
fn long_notes_are_cut_at_a_character_boundary() {
    let mut text = "é".repeat(600);
    truncate(&mut text, MAX_NOTE);
    assert!(text.len() <= MAX_NOTE && text.ends_with("..."));
}

#[test]
fn the_budget_limits_bursts_and_refills() {
    let start = Instant::now();
    let mut budget = EventBudget::new(10.0, 4.0);
    assert!((0..4).all(|_| budget.try_take(1.0, start)));
    assert!(!budget.try_take(1.0, start));
    assert!(budget.try_take(1.0, start + Duration::from_millis(150)));
}
