//! The compiler: per-object errors, determinism, hashing, snapshot checks.

mod support;

use chaperone_policy::{
    CompileErrorReason, CompileOptions, ConditionError, Engine, InvalidSnapshot, ObjectKind,
    RuleError, Snapshot, check_policy, compile, compile_all,
};
use support::*;

const BROKEN: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: broken-regex}
spec:
  targetRefs: [{name: support-agent}]
  rules:
    - name: fine
      action: allow
      tools: [{name: delete_order}]
    - name: bad-regex
      action: allow
      tools: [{name: "x"}]
      when:
        args: [{pointer: /a, regex: "(unclosed"}]
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: broken-cel}
spec:
  targetRefs: [{name: support-agent}]
  rules:
    - name: typo
      action: allow
      tools: [{name: "y"}]
      when:
        expression: "argz.amount < 10"
"#;

#[test]
fn broken_policies_are_left_out_and_reported_by_rule() {
    let mut set = basic_example();
    set.extend(
        objects(BROKEN)
            .policies
            .into_iter()
            .map(chaperone_policy::model::Document::ToolPolicy),
    );
    let compiled = compile(
        &set.identities[0],
        &set.inventory(),
        &CompileOptions::default(),
    );
    let errors: Vec<String> = compiled.errors.iter().map(ToString::to_string).collect();
    assert_eq!(compiled.errors.len(), 2, "{errors:#?}");
    let cel = &compiled.errors[0];
    assert_eq!(cel.object.kind, ObjectKind::ToolPolicy);
    assert_eq!(cel.object.key.name, "broken-cel");
    assert_eq!(cel.rule.as_deref(), Some("typo"));
    assert_eq!(
        *cel.reason,
        CompileErrorReason::Rule(RuleError::from(ConditionError::UnknownVariable {
            name: "argz".into()
        }))
    );
    assert!(errors[1].starts_with("ToolPolicy default/broken-regex rule \"bad-regex\": regex"));
    // The whole broken policy is left out (its valid rule too); the rest compiles.
    let rules: Vec<&str> = compiled
        .snapshot
        .content
        .authority
        .rules
        .iter()
        .map(|r| r.policy.as_str())
        .collect();
    assert!(rules.iter().all(|p| *p == "support"), "{rules:?}");
    assert!(Engine::new(&compiled.snapshot).is_ok());
}

#[test]
fn check_policy_reports_every_broken_rule() {
    let set = objects(BROKEN);
    assert_eq!(check_policy(&set.policies[0]).len(), 1);
    assert_eq!(check_policy(&set.policies[1]).len(), 1);
    assert!(check_policy(&basic_example().policies[0]).is_empty());
}

#[test]
fn compile_is_deterministic_whatever_the_input_order() {
    let options = CompileOptions {
        version: 3,
        now: NOW,
    };
    let set = basic_example();
    let mut shuffled = set.clone();
    let extra = objects(BROKEN);
    shuffled.policies.extend(extra.policies.iter().cloned());
    shuffled.policies.reverse();
    let mut with_extra = set.clone();
    with_extra.policies.extend(extra.policies);
    let a = compile_all(&with_extra.inventory(), &options);
    let b = compile_all(&shuffled.inventory(), &options);
    assert_eq!(a.snapshots[0].to_bytes(), b.snapshots[0].to_bytes());
    assert_eq!(a.snapshots[0].hash, b.snapshots[0].hash);
    assert_eq!(a.errors, b.errors);
    // The version is not part of the content hash.
    let c = compile_all(
        &with_extra.inventory(),
        &CompileOptions {
            version: 4,
            now: NOW,
        },
    );
    assert_eq!(a.snapshots[0].hash, c.snapshots[0].hash);
    assert_ne!(a.snapshots[0].to_bytes(), c.snapshots[0].to_bytes());
}

#[test]
fn snapshots_round_trip_through_bytes() {
    let compiled = compile_all(&basic_example().inventory(), &CompileOptions::default());
    let bytes = compiled.snapshots[0].to_bytes();
    let read = Snapshot::from_bytes(&bytes).unwrap();
    assert_eq!(read, compiled.snapshots[0]);
    assert!(read.hash_is_valid());
    assert_eq!(read.hash.len(), 64);
}

#[test]
fn engine_rejects_tampered_snapshots() {
    let compiled = compile_all(&basic_example().inventory(), &CompileOptions::default());
    let mut tampered = compiled.snapshots[0].clone();
    tampered
        .content
        .authority
        .rules
        .retain(|r| r.action == chaperone_policy::model::RuleAction::Allow);
    assert!(matches!(
        Engine::new(&tampered),
        Err(InvalidSnapshot::HashMismatch { .. })
    ));
    let mut future = compiled.snapshots[0].clone();
    future.content.format = 99;
    future.hash = future.content.content_hash();
    assert!(matches!(
        Engine::new(&future),
        Err(InvalidSnapshot::UnsupportedFormat { found: 99, .. })
    ));
}

#[test]
fn engine_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<Snapshot>();
}
