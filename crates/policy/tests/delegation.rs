//! Delegated calls: the delegate's own rules, every grant of the chain
//! (coverage, expiry, depth) and every delegator's own rules must all allow.

mod support;

use chaperone_policy::{
    CompileErrorReason, CompileOptions, DecidingRule, DecisionRequest, DelegationChain, Reason,
    SessionHistory, Verdict, compile_all,
};
use serde_json::{Value, json};
use support::*;

/// planner (team) → worker (team, requireDelegation) → helper (other,
/// requireDelegation).
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
kind: AgentIdentity
metadata: {name: helper, namespace: other}
spec:
  selector: {serviceAccountName: helper}
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
      when:
        args: [{pointer: /amount, lessThanOrEqual: 500}]
    - name: allow-lookups
      action: allow
      tools: [{server: orders, name: get_order}]
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
    - name: deny-vip
      action: deny
      tools: [{server: orders, name: "*"}]
      when:
        # Without `exists: true` a call lacking /customer would match too: deny
        # rules fail closed on missing fields.
        args: [{pointer: /customer, exists: true}, {pointer: /customer, equals: vip}]
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: helper, namespace: other}
spec:
  targetRefs: [{name: helper}]
  rules:
    - name: allow-orders
      action: allow
      tools: [{server: orders, name: "*"}]
---
apiVersion: chaperone.dev/v1alpha1
kind: DelegationGrant
metadata: {name: planner-to-worker, namespace: team}
spec:
  from: {name: planner}
  to: {name: worker}
  tools: [{server: orders, name: refund}, {server: orders, name: get_order}, {server: orders, name: delete_order}]
  when:
    expression: "tool != 'refund' || args.amount <= 100"
  maxDepth: 1
  expiresAt: "2023-11-15T00:00:00Z"
---
apiVersion: chaperone.dev/v1alpha1
kind: DelegationGrant
metadata: {name: worker-to-helper, namespace: team}
spec:
  from: {name: worker}
  to: {name: helper, namespace: other}
  tools: [{server: orders, name: get_order}, {server: orders, name: refund}]
  ttl: 1h
"#;

fn delegated<'a>(
    tool: &'a str,
    args: &'a Value,
    session: &'a SessionHistory,
    chain: &'a DelegationChain,
) -> DecisionRequest<'a> {
    DecisionRequest {
        delegation: Some(chain),
        ..request("orders", tool, args, session)
    }
}

#[test]
fn require_delegation_allows_nothing_outside_a_delegated_session() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let args = json!({"amount": 5});
    let decision = worker.decide(&request("orders", "refund", &args, &session));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.rule, DecidingRule::RequireDelegation);
    assert!(!worker.visible("orders", "refund"));
}

#[test]
fn delegated_call_within_every_scope_is_allowed() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let chain = chain(&[("team/planner", "team/planner-to-worker")]);
    let args = json!({"amount": 100});
    let decision = worker.decide(&delegated("refund", &args, &session, &chain));
    assert_eq!(decision.verdict, Verdict::Allow, "{}", decision.reason);
    assert_eq!(decision.rule.as_str(), "worker/allow-orders");
    assert!(worker.visible_in("orders", "refund", Some(&chain), NOW));
}

#[test]
fn grant_scope_narrows_the_delegate() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let chain = chain(&[("team/planner", "team/planner-to-worker")]);
    // The planner could refund 300, the worker could too, but the grant stops at 100.
    let args = json!({"amount": 300});
    let decision = worker.decide(&delegated("refund", &args, &session, &chain));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert!(matches!(decision.reason, Reason::GrantDoesNotCover { .. }));
    // A tool outside the grant.
    let args = json!({});
    let decision = worker.decide(&delegated("cancel_order", &args, &session, &chain));
    assert!(matches!(decision.reason, Reason::GrantDoesNotCover { .. }));
    assert!(!worker.visible_in("orders", "cancel_order", Some(&chain), NOW));
}

#[test]
fn delegator_must_itself_be_allowed() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let chain = chain(&[("team/planner", "team/planner-to-worker")]);
    // Granted, and the worker may, but the planner has no rule for delete_order.
    let args = json!({});
    let decision = worker.decide(&delegated("delete_order", &args, &session, &chain));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(
        decision.reason,
        Reason::DelegatorNotAllowed {
            delegator: "team/planner".parse_key(),
            rule: DecidingRule::NoRuleAllows
        }
    );
}

#[test]
fn delegates_own_deny_rules_still_apply() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let chain = chain(&[("team/planner", "team/planner-to-worker")]);
    let args = json!({"amount": 10, "customer": "vip"});
    let decision = worker.decide(&delegated("refund", &args, &session, &chain));
    assert_eq!(decision.rule.as_str(), "worker/deny-vip");
}

#[test]
fn expired_grant_denies_at_decision_time() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let chain = chain(&[("team/planner", "team/planner-to-worker")]);
    let args = json!({"amount": 1});
    let later = DecisionRequest {
        now: 1_700_006_400, // 2023-11-15T00:00:00Z
        ..delegated("refund", &args, &session, &chain)
    };
    let decision = worker.decide(&later);
    assert_eq!(decision.rule, DecidingRule::GrantExpired);
}

#[test]
fn chains_respect_max_depth_and_narrow_at_every_hop() {
    let helper = engine(&objects(TEAM), "other/helper");
    let session = SessionHistory::new();
    let two_hops = chain(&[
        ("team/planner", "team/planner-to-worker"),
        ("team/worker", "team/worker-to-helper"),
    ]);
    let args = json!({"amount": 50});
    let decision = helper.decide(&delegated("refund", &args, &session, &two_hops));
    assert_eq!(decision.verdict, Verdict::Allow, "{}", decision.reason);
    // Narrowed by the first grant even two hops down.
    let args = json!({"amount": 150});
    let decision = helper.decide(&delegated("refund", &args, &session, &two_hops));
    assert!(matches!(decision.reason, Reason::GrantDoesNotCover { .. }));
    // The worker alone cannot start a chain: it has no authority of its own.
    let from_worker = chain(&[("team/worker", "team/worker-to-helper")]);
    let args = json!({"amount": 50});
    let decision = helper.decide(&delegated("refund", &args, &session, &from_worker));
    assert_eq!(
        decision.reason,
        Reason::DelegatorNotAllowed {
            delegator: "team/worker".parse_key(),
            rule: DecidingRule::RequireDelegation
        }
    );
}

#[test]
fn grant_max_depth_zero_forbids_further_hops() {
    let mut set = objects(TEAM);
    // Make planner→worker non-transferable.
    set.grants[0].spec.max_depth = 0;
    let compiled = compile_all(
        &set.inventory(),
        &CompileOptions {
            version: 1,
            now: NOW,
        },
    );
    let helper = engine_of(&compiled.snapshots, "other/helper");
    let session = SessionHistory::new();
    let two_hops = chain(&[
        ("team/planner", "team/planner-to-worker"),
        ("team/worker", "team/worker-to-helper"),
    ]);
    let args = json!({"amount": 50});
    let decision = helper.decide(&delegated("refund", &args, &session, &two_hops));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert!(
        matches!(
            decision.reason,
            Reason::UnknownGrant { .. } | Reason::DepthExceeded { .. }
        ),
        "{:?}",
        decision.reason
    );
}

#[test]
fn forged_chains_are_denied() {
    let worker = engine(&objects(TEAM), "team/worker");
    let session = SessionHistory::new();
    let args = json!({"amount": 1});
    let unknown = chain(&[("team/planner", "team/no-such-grant")]);
    let decision = worker.decide(&delegated("refund", &args, &session, &unknown));
    assert!(matches!(decision.reason, Reason::UnknownGrant { .. }));
    let wrong_delegator = chain(&[("team/helper", "team/planner-to-worker")]);
    let decision = worker.decide(&delegated("refund", &args, &session, &wrong_delegator));
    assert!(matches!(decision.reason, Reason::GrantMismatch { .. }));
}

#[test]
fn snapshots_hold_only_what_the_agent_needs() {
    let compiled = compile_all(
        &objects(TEAM).inventory(),
        &CompileOptions {
            version: 1,
            now: NOW,
        },
    );
    let snapshot = |agent: &str| {
        compiled
            .snapshots
            .iter()
            .find(|s| s.content.agent.to_string() == agent)
            .unwrap()
    };
    let planner = snapshot("team/planner");
    assert!(planner.content.delegators.is_empty());
    assert!(planner.content.grants_received.is_empty());
    assert_eq!(planner.content.grants_given.len(), 1);
    assert!(
        planner
            .content
            .authority
            .rules
            .iter()
            .all(|r| r.policy == "planner")
    );

    let helper = snapshot("other/helper");
    let delegators: Vec<String> = helper
        .content
        .delegators
        .iter()
        .map(|a| a.agent.to_string())
        .collect();
    assert_eq!(delegators, ["team/planner", "team/worker"]);
    assert_eq!(helper.content.grants_received.len(), 2);
}

#[test]
fn expired_and_dangling_grants_are_reported() {
    let mut set = objects(TEAM);
    let mut dangling = set.grants[1].clone();
    dangling.metadata.name = "to-nobody".into();
    dangling.spec.to.name = "nobody".into();
    set.grants.push(dangling);
    let compiled = compile_all(
        &set.inventory(),
        &CompileOptions {
            version: 1,
            now: 1_700_006_400,
        },
    );
    let reasons: Vec<(String, &CompileErrorReason)> = compiled
        .errors
        .iter()
        .map(|e| (e.object.to_string(), &*e.reason))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|(o, r)| o == "DelegationGrant team/planner-to-worker"
                && matches!(r, CompileErrorReason::GrantExpired { .. }))
    );
    assert!(
        reasons
            .iter()
            .any(|(o, r)| o == "DelegationGrant team/to-nobody"
                && matches!(r, CompileErrorReason::UnknownAgent { role: "to", .. }))
    );
    let worker = engine_of(&compiled.snapshots, "team/worker");
    let _ = worker;
    let snapshot = compiled
        .snapshots
        .iter()
        .find(|s| s.content.agent.to_string() == "team/worker")
        .unwrap();
    assert!(snapshot.content.grants_received.is_empty());
}

trait ParseKey {
    fn parse_key(&self) -> chaperone_policy::AgentKey;
}

impl ParseKey for str {
    fn parse_key(&self) -> chaperone_policy::AgentKey {
        chaperone_policy::ObjectKey::parse(self, "default")
    }
}
