//! Decision semantics for an agent's own calls: deny wins, default deny, fail
//! closed, dry run, rate limits, tools/list filtering, byte-for-byte names.

mod support;

use chaperone_policy::model::Effect;
use chaperone_policy::{DecidingRule, EffectSet, Reason, RuleOutcome, SessionHistory, Verdict};
use serde_json::json;
use support::*;

fn history(calls: &[(&str, &str)], engine: &chaperone_policy::Engine) -> SessionHistory {
    let mut history = SessionHistory::new();
    for (server, tool) in calls {
        history.record(server, tool, engine.effects_of(server, tool));
    }
    history
}

#[test]
fn allows_get_order_by_its_rule() {
    let engine = engine(&basic_example(), "default/support-agent");
    let args = json!({"id": "A-1"});
    let session = SessionHistory::new();
    let decision = engine.decide(&request("orders", "get_order", &args, &session));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.rule.as_str(), "support/allow-get-order");
    assert_eq!(decision.reason, Reason::AllowedByRule);
    assert_eq!(decision.snapshot_version, 7);
    assert!(!decision.dry_run);
    assert!(decision.forwards());
}

#[test]
fn denies_refund_above_limit() {
    let engine = engine(&basic_example(), "default/support-agent");
    let session = history(&[("orders", "get_order")], &engine);
    let args = json!({"amount": 1000.5});
    let decision = engine.decide(&request("orders", "refund", &args, &session));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.rule, DecidingRule::NoRuleAllows);
    let args = json!({"amount": 100});
    let decision = engine.decide(&request("orders", "refund", &args, &session));
    assert_eq!(decision.verdict, Verdict::Allow);
}

#[test]
fn refund_above_100_waits_for_approval() {
    let engine = engine(&basic_example(), "default/support-agent");
    let session = history(&[("orders", "get_order")], &engine);
    for amount in [100.5, 1000.0] {
        let args = json!({"amount": amount});
        let decision = engine.decide(&request("orders", "refund", &args, &session));
        assert_eq!(decision.verdict, Verdict::RequireApproval, "{amount}");
        assert_eq!(decision.rule.as_str(), "support/approve-medium-refunds");
        let approval = decision.approval.expect("approval requirement");
        assert_eq!(
            approval.policy,
            chaperone_policy::ObjectKey::new("default", "support")
        );
    }
}

#[test]
fn refund_reports_its_rate_limit() {
    let engine = engine(&basic_example(), "default/support-agent");
    let session = history(&[("orders", "get_order")], &engine);
    let args = json!({"amount": 10});
    let decision = engine.decide(&request("orders", "refund", &args, &session));
    let limit = decision.rate_limit.expect("rate limit");
    assert_eq!(&*limit.id, "default/support/allow-small-refunds");
    assert_eq!((limit.calls, limit.period_seconds), (5, 3600));
}

#[test]
fn session_conditions_read_history() {
    let engine = engine(&basic_example(), "default/support-agent");
    let args = json!({"amount": 10});
    let fresh = SessionHistory::new();
    let decision = engine.decide(&request("orders", "refund", &args, &fresh));
    assert_eq!(decision.verdict, Verdict::Deny, "refund before get_order");

    let mail = json!({"to": "jo@example.com"});
    let clean = history(&[("orders", "get_order")], &engine);
    assert_eq!(
        engine
            .decide(&request("mail", "send_email", &mail, &clean))
            .verdict,
        Verdict::Allow
    );
    let tainted = history(&[("orders", "get_customer")], &engine);
    let decision = engine.decide(&request("mail", "send_email", &mail, &tainted));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(
        decision.rule.as_str(),
        "support/deny-external-after-sensitive-data"
    );
}

#[test]
fn deny_wins_over_a_matching_allow() {
    let engine = engine(&basic_example(), "default/support-agent");
    let session = SessionHistory::new();
    let args = json!({"to": "x@evil.org"});
    let decision = engine.decide(&request("mail", "send_email", &args, &session));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.reason, Reason::DeniedByRule);
    assert_eq!(
        decision.rule.as_str(),
        "support/deny-email-outside-example-com"
    );
}

#[test]
fn cel_error_fails_closed_for_deny_rules() {
    let engine = engine(&basic_example(), "default/support-agent");
    let session = SessionHistory::new();
    for args in [
        json!({}),
        json!({"to": 5}),
        json!({"to": ["a@example.com"]}),
    ] {
        let decision = engine.decide(&request("mail", "send_email", &args, &session));
        assert_eq!(decision.verdict, Verdict::Deny, "{args}");
    }
}

#[test]
fn unknown_tools_and_servers_are_denied() {
    let engine = engine(&basic_example(), "default/support-agent");
    let session = SessionHistory::new();
    let args = json!({});
    for (server, tool) in [
        ("orders", "delete_order"),
        ("orders", "Get_Order"),
        ("orders", "get_order "),
        ("orders", "get_\u{043e}rder"), // Cyrillic о
        ("orders", "ｇｅｔ_order"),
        ("billing", "get_order"),
        ("Orders", "get_order"),
        ("", ""),
    ] {
        let decision = engine.decide(&request(server, tool, &args, &session));
        assert_eq!(decision.verdict, Verdict::Deny, "{server}/{tool}");
        assert_eq!(decision.rule, DecidingRule::NoRuleAllows);
    }
}

#[test]
fn agent_without_policy_can_call_nothing() {
    let set = objects(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {name: lonely}
spec:
  selector: {serviceAccountName: lonely}
  toolServers: [{name: orders, url: "http://orders"}]
"#,
    );
    let engine = engine(&set, "default/lonely");
    let session = SessionHistory::new();
    let args = json!({});
    assert_eq!(
        engine
            .decide(&request("orders", "get_order", &args, &session))
            .verdict,
        Verdict::Deny
    );
    assert!(!engine.visible("orders", "get_order"));
}

const GLOBS: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {name: ops, labels: {team: ops}}
spec:
  selector: {serviceAccountName: ops}
  mode: dryRun
  toolServers: [{name: infra, url: "http://infra"}, {name: wiki, url: "http://wiki"}]
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: ops}
spec:
  agentSelector: {matchLabels: {team: ops}}
  tools:
    - {server: infra, name: "delete_*", effects: [destructive]}
    - {name: "read_*", effects: [read]}
  rules:
    - name: allow-reads
      action: allow
      tools: [{effect: read}]
    - name: allow-infra
      action: allow
      tools: [{server: infra, name: "*"}]
    - name: deny-destructive
      action: deny
      tools: [{effect: destructive}]
    - name: deny-prod-scale
      action: deny
      tools: [{server: infra, name: scale}]
      when:
        args: [{pointer: /env, equals: prod}]
"#;

#[test]
fn globs_and_effects_match_tools_no_rule_names() {
    let engine = engine(&objects(GLOBS), "default/ops");
    let session = SessionHistory::new();
    let args = json!({});
    let cases = [
        ("wiki", "read_page", Verdict::Allow, "ops/allow-reads"),
        ("infra", "restart", Verdict::Allow, "ops/allow-infra"),
        (
            "infra",
            "delete_cluster",
            Verdict::Deny,
            "ops/deny-destructive",
        ),
        ("wiki", "delete_page", Verdict::Deny, "no rule allows"),
        ("unknown", "read_x", Verdict::Allow, "ops/allow-reads"),
        ("unknown", "write_x", Verdict::Deny, "no rule allows"),
    ];
    for (server, tool, verdict, rule) in cases {
        let decision = engine.decide(&request(server, tool, &args, &session));
        assert_eq!(
            (decision.verdict, decision.rule.as_str()),
            (verdict, rule),
            "{server}/{tool}"
        );
    }
    assert_eq!(
        engine.effects_of("infra", "delete_cluster"),
        EffectSet::of(&[Effect::Destructive])
    );
}

#[test]
fn dry_run_marks_would_deny_and_forwards() {
    let engine = engine(&objects(GLOBS), "default/ops");
    let session = SessionHistory::new();
    let args = json!({"env": "prod"});
    let decision = engine.decide(&request("infra", "scale", &args, &session));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert!(decision.dry_run);
    assert!(decision.would_deny());
    assert!(decision.forwards());
    let args = json!({"env": "dev"});
    let decision = engine.decide(&request("infra", "scale", &args, &session));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert!(!decision.would_deny());
}

#[test]
fn tools_list_shows_what_some_arguments_could_allow() {
    let engine = engine(&basic_example(), "default/support-agent");
    // Allowed outright, or allowed for some arguments and sessions.
    assert!(engine.visible("orders", "get_order"));
    assert!(engine.visible("orders", "refund"));
    assert!(engine.visible("mail", "send_email"));
    // No allow rule.
    assert!(!engine.visible("orders", "delete_order"));
    assert!(!engine.visible("orders", "GET_ORDER"));

    let ops = engine_for_globs();
    assert!(ops.visible("infra", "scale"), "denied only for env=prod");
    assert!(
        !ops.visible("infra", "delete_cluster"),
        "denied unconditionally"
    );
    assert!(ops.visible("wiki", "read_page"));
}

fn engine_for_globs() -> chaperone_policy::Engine {
    engine(&objects(GLOBS), "default/ops")
}

#[test]
fn explain_says_why_each_rule_did_not_match() {
    let engine = engine(&basic_example(), "default/support-agent");
    let session = history(&[("orders", "get_order")], &engine);
    let args = json!({"amount": 2500});
    let explanation = engine.explain(&request("orders", "refund", &args, &session));
    assert_eq!(explanation.decision.verdict, Verdict::Deny);
    let approval = explanation
        .rules
        .iter()
        .find(|r| r.rule == "support/approve-medium-refunds")
        .unwrap();
    assert_eq!(
        approval.outcome,
        RuleOutcome::ConditionFalse {
            condition: "/amount lessThanOrEqual 1000".into()
        }
    );
    let refund = explanation
        .rules
        .iter()
        .find(|r| r.rule == "support/allow-small-refunds")
        .unwrap();
    assert_eq!(
        refund.outcome,
        RuleOutcome::ConditionFalse {
            condition: "/amount lessThanOrEqual 100".into()
        }
    );
    let get_order = explanation
        .rules
        .iter()
        .find(|r| r.rule == "support/allow-get-order")
        .unwrap();
    assert_eq!(get_order.outcome, RuleOutcome::ToolDoesNotMatch);
}
