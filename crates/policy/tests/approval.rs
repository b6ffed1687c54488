//! requireApproval rules: the decision order (deny > requireApproval > allow >
//! default deny), an approval turning the call into an allow, dry run,
//! tools/list, explain, delegation narrowing, and the compiler's checks.

mod support;

use chaperone_policy::model::RuleAction;
use chaperone_policy::{
    ApprovalError, CompileErrorReason, CompileOptions, DecidingRule, DecisionRequest, Engine,
    InvalidSnapshot, ObjectKey, Reason, RuleError, RuleOutcome, SessionHistory, Verdict,
    check_policy, compile_all,
};
use serde_json::{Value, json};
use support::*;

/// A clerk that may refund up to 1000 (approval above 100, a person must
/// approve; never to a blocked customer) and look orders up.
const CLERK: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {name: clerk, namespace: shop}
spec:
  selector: {serviceAccountName: clerk}
  toolServers: [{name: orders, url: "http://orders"}]
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: refunds, namespace: shop}
spec:
  targetRefs: [{name: clerk}]
  rules:
    - name: allow-refunds
      action: allow
      tools: [{server: orders, name: refund}]
      when:
        args: [{pointer: /amount, lessThanOrEqual: 1000}]
      rateLimit: {calls: 10, periodSeconds: 60}
    - name: approve-large-refunds
      action: requireApproval
      tools: [{server: orders, name: refund}]
      when:
        args: [{pointer: /amount, greaterThan: 100}]
      approval:
        timeoutSeconds: 120
        redactArguments: [/card/number, /iban]
    - name: deny-blocked
      action: deny
      tools: [{server: orders, name: refund}]
      when:
        args: [{pointer: /customer, exists: true}, {pointer: /customer, equals: blocked}]
    - name: approve-deletes
      action: requireApproval
      tools: [{server: orders, name: delete_order}]
    - name: allow-lookups
      action: allow
      tools: [{server: orders, name: get_order}]
"#;

fn clerk() -> Engine {
    engine(&objects(CLERK), "shop/clerk")
}

fn approved(request: DecisionRequest<'_>) -> DecisionRequest<'_> {
    DecisionRequest {
        approved: true,
        ..request
    }
}

#[test]
fn require_approval_holds_a_call_an_allow_rule_would_allow() {
    let clerk = clerk();
    let session = SessionHistory::new();
    let args = json!({"amount": 500});
    let decision = clerk.decide(&request("orders", "refund", &args, &session));
    assert_eq!(decision.verdict, Verdict::RequireApproval);
    assert_eq!(decision.verdict.as_str(), "approval");
    assert_eq!(decision.reason, Reason::ApprovalRequired);
    assert_eq!(decision.rule.as_str(), "refunds/approve-large-refunds");
    assert!(!decision.forwards());
    assert!(!decision.would_deny());
    assert_eq!(decision.rate_limit, None);
    let approval = decision.approval.expect("approval requirement");
    assert_eq!(approval.policy, ObjectKey::new("shop", "refunds"));
    assert_eq!(approval.rule, "approve-large-refunds");
    assert_eq!(approval.timeout_seconds, 120);
    assert_eq!(approval.valid_for_seconds, 300, "default");
    assert_eq!(&*approval.redact_arguments, ["/card/number", "/iban"]);
}

#[test]
fn calls_no_approval_rule_matches_are_decided_as_before() {
    let clerk = clerk();
    let session = SessionHistory::new();
    let args = json!({"amount": 50});
    let decision = clerk.decide(&request("orders", "refund", &args, &session));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.rule.as_str(), "refunds/allow-refunds");
    assert_eq!(decision.approval, None);
    assert!(decision.rate_limit.is_some());
}

#[test]
fn deny_wins_over_require_approval_even_when_approved() {
    let clerk = clerk();
    let session = SessionHistory::new();
    let args = json!({"amount": 500, "customer": "blocked"});
    for request in [
        request("orders", "refund", &args, &session),
        approved(request("orders", "refund", &args, &session)),
    ] {
        let decision = clerk.decide(&request);
        assert_eq!(decision.verdict, Verdict::Deny);
        assert_eq!(decision.reason, Reason::DeniedByRule);
        assert_eq!(decision.rule.as_str(), "refunds/deny-blocked");
        assert_eq!(decision.approval, None);
    }
}

#[test]
fn approved_call_is_allowed_and_names_the_approval_rule() {
    let clerk = clerk();
    let session = SessionHistory::new();
    let args = json!({"amount": 500});
    let decision = clerk.decide(&approved(request("orders", "refund", &args, &session)));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.reason, Reason::Approved);
    assert_eq!(decision.rule.as_str(), "refunds/approve-large-refunds");
    assert!(decision.forwards());
    let approval = decision.approval.expect("kept for the audit");
    assert_eq!(approval.rule, "approve-large-refunds");
}

#[test]
fn approval_rule_without_an_allow_rule_still_asks() {
    // Nothing allows delete_order; the requireApproval rule alone makes it
    // approvable.
    let clerk = clerk();
    let session = SessionHistory::new();
    let args = json!({"id": "A-1"});
    let decision = clerk.decide(&request("orders", "delete_order", &args, &session));
    assert_eq!(decision.verdict, Verdict::RequireApproval);
    assert_eq!(decision.rule.as_str(), "refunds/approve-deletes");
    let decision = clerk.decide(&approved(request(
        "orders",
        "delete_order",
        &args,
        &session,
    )));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.reason, Reason::Approved);
}

#[test]
fn approved_flag_changes_nothing_without_a_matching_approval_rule() {
    let clerk = clerk();
    let session = SessionHistory::new();
    // A tool no rule names: default deny.
    let args = json!({});
    let decision = clerk.decide(&approved(request(
        "orders",
        "cancel_order",
        &args,
        &session,
    )));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.rule, DecidingRule::NoRuleAllows);
    let args = json!({"amount": 50});
    let decision = clerk.decide(&approved(request("orders", "refund", &args, &session)));
    assert_eq!(decision.reason, Reason::AllowedByRule);
    assert_eq!(decision.approval, None);
}

#[test]
fn unevaluable_approval_condition_holds_allowed_calls_and_grants_nothing() {
    const UNKNOWN: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {name: a}
spec:
  selector: {serviceAccountName: a}
  toolServers: [{name: s, url: "http://s"}]
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: p}
spec:
  targetRefs: [{name: a}]
  rules:
    - name: allow-pay
      action: allow
      tools: [{server: s, name: pay}]
    - name: approve-big-pay
      action: requireApproval
      tools: [{server: s, name: pay}, {server: s, name: wire}]
      when:
        args: [{pointer: /amount, greaterThan: 100}]
"#;
    let engine = engine(&objects(UNKNOWN), "default/a");
    let session = SessionHistory::new();
    // No amount: the approval rule cannot be evaluated. An allow rule would
    // allow `pay`, so the call is held rather than let past the approval rule.
    let args = json!({"amount": "lots"});
    let decision = engine.decide(&request("s", "pay", &args, &session));
    assert_eq!(decision.verdict, Verdict::RequireApproval);
    assert_eq!(decision.rule.as_str(), "p/approve-big-pay");
    // Nothing allows `wire`: an unevaluable approval rule does not make it
    // approvable.
    let decision = engine.decide(&approved(request("s", "wire", &args, &session)));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.rule, DecidingRule::NoRuleAllows);
    // Evaluable and true: approvable.
    let big = json!({"amount": 500});
    let decision = engine.decide(&request("s", "wire", &big, &session));
    assert_eq!(decision.verdict, Verdict::RequireApproval);
}

#[test]
fn dry_run_forwards_a_call_needing_approval() {
    let yaml = CLERK.replace(
        "  toolServers: [{name: orders, url: \"http://orders\"}]",
        "  toolServers: [{name: orders, url: \"http://orders\"}]\n  mode: dryRun",
    );
    let clerk = engine(&objects(&yaml), "shop/clerk");
    let session = SessionHistory::new();
    let args = json!({"amount": 500});
    let decision = clerk.decide(&request("orders", "refund", &args, &session));
    assert_eq!(decision.verdict, Verdict::RequireApproval);
    assert!(decision.dry_run);
    assert!(decision.forwards());
    assert!(decision.would_require_approval());
    assert!(!decision.would_deny());
}

#[test]
fn tools_only_reachable_by_approval_are_listed() {
    let clerk = clerk();
    assert!(clerk.visible("orders", "delete_order"));
    assert!(clerk.visible("orders", "refund"));
    assert!(!clerk.visible("orders", "cancel_order"));
}

#[test]
fn explain_reports_the_approval_rule_as_deciding() {
    let clerk = clerk();
    let session = SessionHistory::new();
    let args = json!({"amount": 500});
    let explanation = clerk.explain(&request("orders", "refund", &args, &session));
    assert_eq!(explanation.decision.verdict, Verdict::RequireApproval);
    let outcome = |rule: &str| {
        explanation
            .rules
            .iter()
            .find(|r| r.rule == rule)
            .map(|r| (r.action, r.outcome.clone()))
            .expect("rule explained")
    };
    assert_eq!(
        outcome("refunds/approve-large-refunds"),
        (RuleAction::RequireApproval, RuleOutcome::Decided)
    );
    assert_eq!(
        outcome("refunds/allow-refunds"),
        (RuleAction::Allow, RuleOutcome::Matched)
    );
    assert!(matches!(
        outcome("refunds/deny-blocked").1,
        RuleOutcome::ConditionFalse { .. }
    ));
}

/// planner → worker: the planner's own refunds above 100 need approval.
const TEAM: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {name: planner, namespace: team}
spec:
  selector: {serviceAccountName: planner}
  toolServers: [{name: orders, url: "http://orders"}]
---
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {name: worker, namespace: team}
spec:
  selector: {serviceAccountName: worker}
  toolServers: [{name: orders, url: "http://orders"}]
  delegation: {requireDelegation: true}
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: planner, namespace: team}
spec:
  targetRefs: [{name: planner}]
  rules:
    - name: allow-refunds
      action: allow
      tools: [{server: orders, name: refund}]
    - name: approve-refunds-over-100
      action: requireApproval
      tools: [{server: orders, name: refund}]
      when:
        args: [{pointer: /amount, greaterThan: 100}]
      approval: {validForSeconds: 60}
    - name: deny-huge-refunds
      action: deny
      tools: [{server: orders, name: refund}]
      when:
        args: [{pointer: /amount, greaterThan: 5000}]
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: worker, namespace: team}
spec:
  targetRefs: [{name: worker}]
  rules:
    - name: allow-orders
      action: allow
      tools: [{server: orders, name: "*"}]
      rateLimit: {calls: 3, periodSeconds: 60}
    - name: approve-refunds-over-2000
      action: requireApproval
      tools: [{server: orders, name: refund}]
      when:
        args: [{pointer: /amount, greaterThan: 2000}]
---
apiVersion: chaperone.dev/v1alpha1
kind: DelegationGrant
metadata: {name: planner-to-worker, namespace: team}
spec:
  from: {name: planner}
  to: {name: worker}
  tools: [{server: orders, name: refund}]
  when:
    args: [{pointer: /amount, lessThanOrEqual: 8000}]
  ttl: 1h
"#;

fn delegated<'a>(
    args: &'a Value,
    session: &'a SessionHistory,
    chain: &'a chaperone_policy::DelegationChain,
) -> DecisionRequest<'a> {
    DecisionRequest {
        delegation: Some(chain),
        ..request("orders", "refund", args, session)
    }
}

#[test]
fn delegators_require_approval_makes_the_delegated_call_need_approval() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let chain = chain(&[("team/planner", "team/planner-to-worker")]);
    // The worker's own rules allow a refund of 500; the planner's ask.
    let args = json!({"amount": 500});
    let decision = worker.decide(&delegated(&args, &session, &chain));
    assert_eq!(
        decision.verdict,
        Verdict::RequireApproval,
        "{}",
        decision.reason
    );
    assert_eq!(decision.reason, Reason::ApprovalRequired);
    assert_eq!(decision.rule.as_str(), "planner/approve-refunds-over-100");
    let approval = decision.approval.expect("approval requirement");
    assert_eq!(approval.policy, ObjectKey::new("team", "planner"));
    assert_eq!(approval.valid_for_seconds, 60);

    let decision = worker.decide(&approved(delegated(&args, &session, &chain)));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.reason, Reason::Approved);
    // The worker's own allow rule still counts the call.
    let limit = decision.rate_limit.expect("worker's rate limit");
    assert_eq!(&*limit.id, "team/worker/allow-orders");

    // Below the planner's threshold: allowed outright.
    let small = json!({"amount": 50});
    let decision = worker.decide(&delegated(&small, &session, &chain));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.rule.as_str(), "worker/allow-orders");
}

#[test]
fn delegates_own_approval_rule_is_named_first() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let chain = chain(&[("team/planner", "team/planner-to-worker")]);
    let args = json!({"amount": 3000});
    let decision = worker.decide(&delegated(&args, &session, &chain));
    assert_eq!(decision.verdict, Verdict::RequireApproval);
    assert_eq!(decision.rule.as_str(), "worker/approve-refunds-over-2000");
    assert_eq!(
        decision.approval.map(|a| a.policy),
        Some(ObjectKey::new("team", "worker"))
    );
}

#[test]
fn deny_anywhere_in_the_chain_wins_over_approval() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let chain = chain(&[("team/planner", "team/planner-to-worker")]);
    // The worker's own rules ask for approval; the planner denies.
    let args = json!({"amount": 6000});
    let decision = worker.decide(&approved(delegated(&args, &session, &chain)));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(
        decision.reason,
        Reason::DelegatorNotAllowed {
            delegator: ObjectKey::new("team", "planner"),
            rule: DecidingRule::Rule("planner/deny-huge-refunds".into()),
        }
    );
    // The grant stops at 8000: an approval of the worker's own rule does not
    // widen it.
    let args = json!({"amount": 9000});
    let decision = worker.decide(&approved(delegated(&args, &session, &chain)));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert!(matches!(decision.reason, Reason::GrantDoesNotCover { .. }));
}

#[test]
fn planner_itself_needs_approval_for_its_own_large_refunds() {
    let planner = engine(&objects(TEAM), "team/planner");
    let session = SessionHistory::new();
    let args = json!({"amount": 500});
    let decision = planner.decide(&request("orders", "refund", &args, &session));
    assert_eq!(decision.verdict, Verdict::RequireApproval);
    let args = json!({"amount": 6000});
    let decision = planner.decide(&approved(request("orders", "refund", &args, &session)));
    assert_eq!(decision.verdict, Verdict::Deny);
}

// ---------------------------------------------------------------------------
// The compiler
// ---------------------------------------------------------------------------

fn policy_with_rule(rule: &str) -> String {
    format!(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {{name: p, namespace: shop}}
spec:
  targetRefs: [{{name: clerk}}]
  rules:
    - {rule}
"#
    )
}

fn policy_errors(rule: &str) -> Vec<CompileErrorReason> {
    let set = objects(&policy_with_rule(rule));
    check_policy(&set.policies[0])
        .into_iter()
        .map(|e| *e.reason)
        .collect()
}

#[test]
fn approval_settings_on_an_allow_or_deny_rule_are_refused() {
    for action in ["allow", "deny"] {
        let errors = policy_errors(&format!(
            "{{name: r, action: {action}, tools: [{{name: t}}], approval: {{timeoutSeconds: 60}}}}"
        ));
        assert_eq!(
            errors,
            [CompileErrorReason::ApprovalOnOtherAction {
                action: if action == "allow" { "allow" } else { "deny" }
            }]
        );
    }
    let message = CompileErrorReason::ApprovalOnOtherAction { action: "allow" }.to_string();
    assert!(message.contains("requireApproval"), "{message}");
}

#[test]
fn rate_limit_on_a_require_approval_rule_is_refused() {
    let errors = policy_errors(
        "{name: r, action: requireApproval, tools: [{name: t}], rateLimit: {calls: 1, periodSeconds: 60}}",
    );
    assert_eq!(errors, [CompileErrorReason::RateLimitOnRequireApproval]);
}

#[test]
fn bad_redaction_pointer_is_refused() {
    let errors = policy_errors(
        "{name: r, action: requireApproval, tools: [{name: t}], approval: {redactArguments: [card/number]}}",
    );
    assert_eq!(
        errors,
        [CompileErrorReason::Rule(RuleError::Approval(
            ApprovalError::InvalidPointer {
                pointer: "card/number".into()
            }
        ))]
    );
    let errors = policy_errors(
        "{name: r, action: requireApproval, tools: [{name: t}], approval: {timeoutSeconds: 0}}",
    );
    assert_eq!(
        errors,
        [CompileErrorReason::Rule(RuleError::Approval(
            ApprovalError::OutOfRange {
                field: "timeoutSeconds",
                value: 0
            }
        ))]
    );
}

#[test]
fn snapshot_carries_approval_defaults_on_approval_rules_only() {
    let compiled = compile_all(&objects(CLERK).inventory(), &CompileOptions::default());
    assert!(compiled.errors.is_empty(), "{:#?}", compiled.errors);
    let rules = &compiled.snapshots[0].content.authority.rules;
    for rule in rules {
        match rule.action {
            RuleAction::RequireApproval => {
                let settings = rule.approval.as_ref().expect("defaults filled in");
                assert_eq!(settings.valid_for_seconds, 300, "{}", rule.name);
            }
            RuleAction::Allow | RuleAction::Deny => {
                assert_eq!(rule.approval, None, "{}", rule.name)
            }
        }
    }
    let deletes = rules.iter().find(|r| r.name == "approve-deletes").unwrap();
    let settings = deletes.approval.as_ref().unwrap();
    assert_eq!(
        (settings.timeout_seconds, settings.valid_for_seconds),
        (600, 300)
    );
}

#[test]
fn engine_refuses_a_snapshot_with_a_bad_redaction_pointer() {
    let compiled = compile_all(&objects(CLERK).inventory(), &CompileOptions::default());
    let mut snapshot = compiled.snapshots[0].clone();
    for rule in &mut snapshot.content.authority.rules {
        if let Some(settings) = &mut rule.approval {
            settings.redact_arguments = vec!["iban".into()];
        }
    }
    let snapshot = chaperone_policy::Snapshot::new(2, snapshot.content);
    assert!(matches!(
        Engine::new(&snapshot),
        Err(InvalidSnapshot::Rule {
            error: RuleError::Approval(ApprovalError::InvalidPointer { .. }),
            ..
        })
    ));
}

#[test]
fn policies_without_approval_rules_snapshot_as_before() {
    // The `approval` field is left out of rules that have none, so snapshots
    // of existing policies keep their bytes and hashes.
    let compiled = compile_all(&basic_example().inventory(), &CompileOptions::default());
    let bytes = String::from_utf8(compiled.snapshots[0].to_bytes()).unwrap();
    let approval_rules = compiled.snapshots[0]
        .content
        .authority
        .rules
        .iter()
        .filter(|r| r.action == RuleAction::RequireApproval)
        .count();
    assert_eq!(
        bytes.matches("\"approval\"").count(),
        approval_rules,
        "{bytes}"
    );
}
