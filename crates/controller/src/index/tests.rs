//! Tests of the index as a state machine: what each change recompiles and publishes.

use chaperone_policy::model::{
    AgentRef, DelegationGrantSpec, Rule, RuleAction, ToolMatch, ToolPolicySpec,
};

use super::*;
use crate::test_objects::{grant as grant_to, identity, meta};

const NOW: i64 = 1_800_000_000;

/// A grant to an agent of the grant's own namespace.
fn grant(ns: &str, name: &str, from: &str, to: &str) -> Object<DelegationGrantSpec> {
    grant_to(ns, name, from, None, to)
}

fn policy(ns: &str, name: &str, agent: &str, tool: &str) -> Object<ToolPolicySpec> {
    Object {
        api_version: "chaperone.dev/v1alpha1".into(),
        metadata: meta(ns, name),
        spec: ToolPolicySpec {
            target_refs: Some(vec![AgentRef { name: agent.into() }]),
            rules: vec![Rule {
                name: "allow".into(),
                action: RuleAction::Allow,
                tools: vec![ToolMatch {
                    server: "orders".into(),
                    name: Some(tool.into()),
                    effect: None,
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    }
}

fn rules_of(index: &Index, agent: &AgentKey) -> Vec<String> {
    index
        .snapshot(agent)
        .map(|s| {
            s.decode()
                .unwrap()
                .content
                .authority
                .rules
                .iter()
                .map(|r| format!("{}/{}", r.policy, r.name))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn publishes_a_snapshot_per_agent_with_only_its_rules() {
    let mut index = Index::new();
    index.apply_identity(identity("a", "planner"), NOW);
    index.apply_identity(identity("a", "worker"), NOW);
    index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
    index.apply_policy(policy("a", "p2", "worker", "refund"), NOW);
    let planner = ObjectKey::new("a", "planner");
    assert_eq!(rules_of(&index, &planner), ["p1/allow"]);
    assert_eq!(
        rules_of(&index, &ObjectKey::new("a", "worker")),
        ["p2/allow"]
    );
}

#[test]
fn subscribers_see_new_versions_and_unchanged_content_is_not_republished() {
    let mut index = Index::new();
    let planner = ObjectKey::new("a", "planner");
    let mut rx = index.subscribe(&planner);
    assert!(rx.borrow_and_update().is_none());
    index.apply_identity(identity("a", "planner"), NOW);
    assert!(rx.has_changed().unwrap());
    let first = rx.borrow_and_update().clone().unwrap();
    // Re-applying the same object changes nothing.
    index.apply_identity(identity("a", "planner"), NOW);
    assert!(!rx.has_changed().unwrap());
    index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
    let second = rx.borrow_and_update().clone().unwrap();
    assert!(second.version > first.version);
    assert_ne!(second.hash, first.hash);
}

#[test]
fn an_unchanged_object_changes_nothing() {
    let mut index = Index::new();
    index.apply_identity(identity("a", "planner"), NOW);
    index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
    let generation = index.generation();
    // What our own status writes look like from the watch: the same object.
    index.apply_identity(identity("a", "planner"), NOW);
    index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
    assert_eq!(index.generation(), generation);
}

#[test]
fn other_namespaces_are_not_recompiled() {
    let mut index = Index::new();
    index.apply_identity(identity("a", "planner"), NOW);
    index.apply_identity(identity("b", "planner"), NOW);
    let mut rx_b = index.subscribe(&ObjectKey::new("b", "planner"));
    rx_b.borrow_and_update();
    index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
    assert!(!rx_b.has_changed().unwrap());
}

#[test]
fn deleting_an_identity_withdraws_its_snapshot() {
    let mut index = Index::new();
    let planner = ObjectKey::new("a", "planner");
    let rx = index.subscribe(&planner);
    index.apply_identity(identity("a", "planner"), NOW);
    assert!(rx.borrow().is_some());
    index.delete_identity(&planner, NOW);
    assert!(rx.borrow().is_none());
}

#[test]
fn deleting_a_grant_is_pushed_to_the_delegate() {
    let mut index = Index::new();
    index.apply_identity(identity("a", "planner"), NOW);
    index.apply_identity(identity("a", "worker"), NOW);
    index.apply_grant(grant("a", "g", "planner", "worker"), NOW);
    let worker = ObjectKey::new("a", "worker");
    let mut rx = index.subscribe(&worker);
    assert_eq!(
        rx.borrow_and_update()
            .as_ref()
            .unwrap()
            .decode()
            .unwrap()
            .content
            .grants_received
            .len(),
        1
    );
    index.delete_grant(&ObjectKey::new("a", "g"), NOW);
    assert!(rx.has_changed().unwrap());
    assert!(
        rx.borrow_and_update()
            .as_ref()
            .unwrap()
            .decode()
            .unwrap()
            .content
            .grants_received
            .is_empty()
    );
}

#[test]
fn delegates_in_other_namespaces_are_recompiled_when_the_delegator_changes() {
    let mut index = Index::new();
    index.apply_identity(identity("a", "planner"), NOW);
    index.apply_identity(identity("b", "worker"), NOW);
    let mut g = grant("a", "g", "planner", "worker");
    g.spec.to.namespace = Some("b".into());
    index.apply_grant(g, NOW);
    let mut rx = index.subscribe(&ObjectKey::new("b", "worker"));
    rx.borrow_and_update();
    index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
    assert!(
        rx.has_changed().unwrap(),
        "the worker carries the planner's rules"
    );
}

#[test]
fn a_broken_policy_is_reported_and_the_others_still_served() {
    let mut index = Index::new();
    index.apply_identity(identity("a", "planner"), NOW);
    index.apply_policy(policy("a", "good", "planner", "get_order"), NOW);
    let mut bad = policy("a", "bad", "planner", "refund");
    bad.spec.rules[0].when = Some(chaperone_policy::model::Conditions {
        expression: Some("secrets.all == true".into()),
        ..Default::default()
    });
    index.apply_policy(bad, NOW);
    let bad_ref = ObjectRef {
        kind: ObjectKind::ToolPolicy,
        key: ObjectKey::new("a", "bad"),
    };
    let errors = index.errors_of(&bad_ref);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].rule.as_deref(), Some("allow"));
    assert_eq!(
        rules_of(&index, &ObjectKey::new("a", "planner")),
        ["good/allow"]
    );
    let good_ref = ObjectRef {
        kind: ObjectKind::ToolPolicy,
        key: ObjectKey::new("a", "good"),
    };
    assert!(index.errors_of(&good_ref).is_empty());
}

#[test]
fn callers_are_the_agents_listing_an_agent_as_a_tool_server_in_its_namespace() {
    let mut index = Index::new();
    let calling = |ns: &str, name: &str| {
        let mut caller = identity(ns, name);
        caller.spec.tool_servers[0].agent = Some("worker".into());
        caller
    };
    index.apply_identity(calling("a", "planner"), NOW);
    index.apply_identity(identity("a", "worker"), NOW);
    index.apply_identity(calling("b", "planner"), NOW);
    let worker = ObjectKey::new("a", "worker");
    assert_eq!(
        index.callers_of(&worker),
        BTreeSet::from([ObjectKey::new("a", "planner")])
    );
    assert!(index.callers_of(&ObjectKey::new("a", "planner")).is_empty());
    let changes = index.identity_changes();
    index.delete_identity(&ObjectKey::new("a", "planner"), NOW);
    assert!(
        changes.has_changed().unwrap(),
        "streams re-read their callers"
    );
    assert!(index.callers_of(&worker).is_empty());
}

#[test]
fn swap_remove_keeps_positions_consistent() {
    let mut index = Index::new();
    for name in ["a1", "a2", "a3"] {
        index.apply_identity(identity("a", name), NOW);
    }
    index.delete_identity(&ObjectKey::new("a", "a1"), NOW);
    let mut moved = identity("a", "a3");
    moved.spec.tool_servers[0].name = "billing".into();
    index.apply_identity(moved, NOW);
    assert_eq!(index.objects().identities.len(), 2);
    let a3 = index.snapshot(&ObjectKey::new("a", "a3")).unwrap();
    assert_eq!(a3.decode().unwrap().content.tool_servers[0].name, "billing");
}

#[test]
fn a_published_snapshot_is_its_encoding_shared_by_every_stream() {
    let mut index = Index::new();
    let planner = ObjectKey::new("a", "planner");
    let (first, second) = (index.subscribe(&planner), index.subscribe(&planner));
    index.apply_identity(identity("a", "planner"), NOW);
    let (first, second) = (
        first.borrow().clone().unwrap(),
        second.borrow().clone().unwrap(),
    );
    // Both streams hold the same published value, hence the same bytes.
    assert!(Arc::ptr_eq(&first, &second));
    let decoded = first.decode().unwrap();
    assert!(decoded.hash_is_valid());
    assert_eq!(
        (decoded.version, &decoded.hash),
        (first.version, &first.hash)
    );
    assert_eq!(first.bytes().as_ref(), decoded.to_bytes().as_slice());
    assert_eq!(first.bytes().as_ptr(), second.bytes().as_ptr());
}

#[test]
fn versions_are_monotonic_from_the_clock() {
    assert_eq!(next_version(0, 10), 10_000);
    assert_eq!(next_version(10_000, 10), 10_001);
    assert_eq!(next_version(5, -1), 6);
}
