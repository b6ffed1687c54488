//! Tool definition pins: compiled into the agent's snapshot, judged against a
//! tool's current definition, refused first in `enforce`, never in `observe`;
//! conflicting pins and pins with globs reported at compile time.

mod support;

use chaperone_policy::model::ToolPinning;
use chaperone_policy::{
    CompileErrorReason, CompileOptions, CurrentDefinition, DecidingRule, DecisionRequest, Engine,
    ObjectKind, PinVerdict, Reason, SessionHistory, SnapshotPin, ToolPin, Verdict, check_policy,
    compile, compile_all,
};
use serde_json::json;
use support::*;

const OLD: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const NEW: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// A clerk whose `orders` server enforces pins and whose `search` server only
/// observes; `refund` is pinned to OLD, `get_order` is not pinned, and a
/// deny rule governs `purge`.
fn clerk_yaml(orders: &str, mode: &str) -> String {
    format!(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: clerk, namespace: shop}}
spec:
  selector: {{serviceAccountName: clerk}}
  mode: {mode}
  toolServers:
    - {{name: orders, url: "http://orders", toolPinning: "{orders}"}}
    - {{name: search, url: "http://search"}}
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {{name: orders, namespace: shop}}
spec:
  targetRefs: [{{name: clerk}}]
  tools:
    - {{server: orders, name: refund, effects: [financial], definition: "{OLD}"}}
    - {{server: search, name: find, definition: "{OLD}"}}
  rules:
    - name: allow-all
      action: allow
      tools: [{{server: "*", name: "*"}}]
    - name: deny-purge
      action: deny
      tools: [{{server: orders, name: purge}}]
"#
    )
}

fn clerk(orders: &str) -> Engine {
    engine(&objects(&clerk_yaml(orders, "enforce")), "shop/clerk")
}

fn call<'a>(
    tool: &'a str,
    definition: Option<&'a str>,
    args: &'a serde_json::Value,
    session: &'a SessionHistory,
) -> DecisionRequest<'a> {
    DecisionRequest {
        definition: CurrentDefinition::of(definition),
        ..request("orders", tool, args, session)
    }
}

#[test]
fn pins_are_compiled_into_the_snapshot_and_off_the_classifications() {
    let set = objects(&clerk_yaml("enforce", "enforce"));
    let compiled = compile(
        &set.identities[0],
        &set.inventory(),
        &CompileOptions::default(),
    );
    assert!(compiled.errors.is_empty(), "{:#?}", compiled.errors);
    let content = &compiled.snapshot.content;
    assert_eq!(
        content.pins,
        vec![
            SnapshotPin {
                server: "orders".into(),
                tool: "refund".into(),
                definitions: vec![OLD.into()],
            },
            SnapshotPin {
                server: "search".into(),
                tool: "find".into(),
                definitions: vec![OLD.into()],
            },
        ]
    );
    // The classification keeps its effects; the pin-only entry is left out.
    let classifications = &content.authority.classifications;
    assert_eq!(classifications.len(), 1, "{classifications:?}");
    assert_eq!(classifications[0].definition, None);
    assert_eq!(classifications[0].name, "refund");
}

#[test]
fn snapshots_without_pins_serialise_as_before() {
    let snapshot = compile_all(&basic_example().inventory(), &CompileOptions::default())
        .snapshots
        .remove(0);
    let bytes = String::from_utf8(snapshot.to_bytes()).unwrap();
    assert!(!bytes.contains("\"pins\""), "{bytes}");
}

#[test]
fn engine_reports_pins_and_pinning_modes() {
    let engine = clerk("enforce");
    assert_eq!(engine.tool_pinning("orders"), ToolPinning::Enforce);
    assert_eq!(engine.tool_pinning("search"), ToolPinning::Observe);
    assert_eq!(engine.tool_pinning("elsewhere"), ToolPinning::Off);
    assert_eq!(engine.tool_pin("orders", "refund"), ToolPin::Pinned(OLD));
    assert_eq!(engine.tool_pin("orders", "get_order"), ToolPin::Unpinned);
    assert_eq!(
        engine.pin_verdict("orders", "refund", Some(NEW)),
        PinVerdict::Differs {
            pinned: OLD.into(),
            current: NEW.into()
        }
    );
    assert_eq!(
        engine.pin_verdict("search", "find", Some(NEW)).as_str(),
        "Differs"
    );
    assert!(engine.pin_blocks("orders", "refund", Some(NEW)));
    assert!(!engine.pin_blocks("orders", "refund", Some(OLD)));
    // Observe reports, never blocks.
    assert!(!engine.pin_blocks("search", "find", Some(NEW)));
    assert_eq!(
        clerk("off").pin_verdict("orders", "refund", Some(NEW)),
        PinVerdict::Unchecked
    );
}

#[test]
fn enforce_refuses_a_changed_tool_whatever_the_rules_say() {
    let engine = clerk("enforce");
    let session = SessionHistory::new();
    let args = json!({});
    let decision = engine.decide(&call("refund", Some(NEW), &args, &session));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.rule, DecidingRule::ToolPinning);
    assert_eq!(decision.rule.as_str(), "toolPinning");
    assert_eq!(
        decision.reason.to_string(),
        format!("tool definition changed: pinned {OLD}, now {NEW}")
    );
    // Even an approved call.
    let approved = DecisionRequest {
        approved: true,
        ..call("refund", Some(NEW), &args, &session)
    };
    assert_eq!(engine.decide(&approved).rule, DecidingRule::ToolPinning);
}

#[test]
fn enforce_passes_a_tool_that_matches_its_pin() {
    let engine = clerk("enforce");
    let session = SessionHistory::new();
    let args = json!({});
    let decision = engine.decide(&call("refund", Some(OLD), &args, &session));
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.rule.as_str(), "orders/allow-all");
}

#[test]
fn enforce_refuses_unpinned_and_unseen_tools() {
    let engine = clerk("enforce");
    let session = SessionHistory::new();
    let args = json!({});
    let unpinned = engine.decide(&call("get_order", Some(NEW), &args, &session));
    assert_eq!(unpinned.rule, DecidingRule::ToolPinning);
    assert_eq!(
        unpinned.reason,
        Reason::ToolPinning(PinVerdict::Unpinned {
            current: NEW.into()
        })
    );
    let unseen = engine.decide(&call("refund", None, &args, &session));
    assert_eq!(
        unseen.reason.to_string(),
        "tool definition not yet seen: list the tools first"
    );
}

#[test]
fn an_ungoverned_tool_is_denied_by_the_rules_not_by_its_pin() {
    let engine = clerk("enforce");
    let session = SessionHistory::new();
    let args = json!({});
    let decision = engine.decide(&call("purge", Some(NEW), &args, &session));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.rule.as_str(), "orders/deny-purge");
}

#[test]
fn observe_and_off_never_change_a_decision() {
    for mode in ["observe", "off"] {
        let engine = clerk(mode);
        let session = SessionHistory::new();
        let args = json!({});
        for definition in [Some(NEW), None] {
            let decision = engine.decide(&call("refund", definition, &args, &session));
            assert_eq!(decision.verdict, Verdict::Allow, "{mode}");
        }
    }
}

#[test]
fn dry_run_agents_would_deny_a_changed_tool() {
    let engine = engine(&objects(&clerk_yaml("enforce", "dryRun")), "shop/clerk");
    let session = SessionHistory::new();
    let args = json!({});
    let decision = engine.decide(&call("refund", Some(NEW), &args, &session));
    assert!(decision.would_deny());
    assert!(decision.forwards());
    assert_eq!(decision.rule, DecidingRule::ToolPinning);
}

#[test]
fn explain_names_the_pin_as_what_decided() {
    let engine = clerk("enforce");
    let session = SessionHistory::new();
    let args = json!({});
    let explanation = engine.explain(&call("refund", Some(NEW), &args, &session));
    assert_eq!(explanation.decision.rule, DecidingRule::ToolPinning);
}

const SECOND_PIN: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: more-pins, namespace: shop}
spec:
  targetRefs: [{name: clerk}]
  tools:
    - {server: orders, name: refund, definition: "NEW"}
"#;

#[test]
fn conflicting_pins_are_reported_on_each_policy_and_match_nothing() {
    let mut set = objects(&clerk_yaml("enforce", "enforce"));
    set.extend(
        objects(&SECOND_PIN.replace("NEW", NEW))
            .policies
            .into_iter()
            .map(chaperone_policy::model::Document::ToolPolicy),
    );
    let compiled = compile(
        &set.identities[0],
        &set.inventory(),
        &CompileOptions::default(),
    );
    let names: Vec<&str> = compiled
        .errors
        .iter()
        .map(|e| e.object.key.name.as_str())
        .collect();
    assert_eq!(names, ["more-pins", "orders"], "{:#?}", compiled.errors);
    for error in &compiled.errors {
        assert_eq!(error.object.kind, ObjectKind::ToolPolicy);
        assert_eq!(
            *error.reason,
            CompileErrorReason::ConflictingPins {
                server: "orders".into(),
                tool: "refund".into(),
                policies: vec!["more-pins".into(), "orders".into()],
                definitions: vec![OLD.into(), NEW.into()],
            }
        );
    }
    // Both policies stay in; the tool matches neither pin.
    let engine = Engine::new(&compiled.snapshot).unwrap();
    let session = SessionHistory::new();
    let args = json!({});
    for current in [OLD, NEW] {
        let decision = engine.decide(&call("refund", Some(current), &args, &session));
        assert_eq!(decision.rule, DecidingRule::ToolPinning);
        assert_eq!(decision.reason.to_string(), "conflicting pins");
    }
    // compile_all reports the conflict too.
    let all = compile_all(&set.inventory(), &CompileOptions::default());
    assert_eq!(all.errors.len(), 2, "{:#?}", all.errors);
}

#[test]
fn the_same_pin_in_two_policies_is_no_conflict() {
    let mut set = objects(&clerk_yaml("enforce", "enforce"));
    set.extend(
        objects(&SECOND_PIN.replace("NEW", OLD))
            .policies
            .into_iter()
            .map(chaperone_policy::model::Document::ToolPolicy),
    );
    let engine = engine(&set, "shop/clerk");
    assert_eq!(engine.tool_pin("orders", "refund"), ToolPin::Pinned(OLD));
}

#[test]
fn pins_with_globs_or_malformed_hashes_leave_the_policy_out() {
    let yaml = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: globbed, namespace: shop}
spec:
  targetRefs: [{name: clerk}]
  tools:
    - {server: "*", name: refund, definition: "OLD"}
    - {server: orders, name: "get_*", definition: "OLD"}
    - {server: orders, name: refund, definition: "sha256:ABC"}
    - {server: orders, name: "*", effects: [read]}
"#
    .replace("OLD", OLD);
    let set = objects(&yaml);
    let errors = check_policy(&set.policies[0]);
    let reasons: Vec<&CompileErrorReason> = errors.iter().map(|e| &*e.reason).collect();
    assert_eq!(
        reasons,
        [
            &CompileErrorReason::PinNotLiteral {
                server: "*".into(),
                tool: "refund".into()
            },
            &CompileErrorReason::PinNotLiteral {
                server: "orders".into(),
                tool: "get_*".into()
            },
            &CompileErrorReason::MalformedPin {
                server: "orders".into(),
                tool: "refund".into(),
                definition: "sha256:ABC".into()
            },
        ]
    );
    let mut with_agent = objects(&clerk_yaml("enforce", "enforce"));
    with_agent.policies.extend(set.policies);
    let compiled = compile(
        &with_agent.identities[0],
        &with_agent.inventory(),
        &CompileOptions::default(),
    );
    assert_eq!(compiled.errors.len(), 3);
    assert!(
        compiled
            .snapshot
            .content
            .authority
            .classifications
            .iter()
            .all(|c| c.name != "*"),
        "the broken policy is left out whole"
    );
}

#[test]
fn calls_pins_do_not_apply_to_are_decided_by_the_rules() {
    let engine = clerk("enforce");
    let session = SessionHistory::new();
    let args = json!({});
    let resource = DecisionRequest {
        definition: CurrentDefinition::NotApplicable,
        ..request("orders", "resource:file:///orders.csv", &args, &session)
    };
    let decision = engine.decide(&resource);
    assert_eq!(decision.verdict, Verdict::Allow);
}
