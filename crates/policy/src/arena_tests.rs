//! The flat arena against the compiled conditions it copies.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::conditions::{EvalContext, Initiator};
use crate::decision::AgentKey;
use crate::model::Conditions;
use crate::session::SessionHistory;

fn conditions(spec: Value) -> CompiledConditions {
    let spec: Conditions = serde_json::from_value(spec).expect("conditions spec");
    CompiledConditions::new(Some(&spec)).expect("conditions compile")
}

/// What the rule's own conditions say (the reference).
fn compiled_truth(conditions: &CompiledConditions, arguments: Option<&Value>) -> Truth {
    let agent = AgentKey::new("ns", "agent");
    let session = SessionHistory::new();
    let ctx = EvalContext {
        server: "s",
        tool: "t",
        arguments,
        session: arguments.map(|_| &session),
        agent: &agent,
        depth: 0,
        chain: &[],
        initiator: Initiator::Agent(&agent),
    };
    conditions.evaluate(&ctx).truth
}

/// Evaluates every rule in one evaluation (so pointers are shared across
/// rules, as in a decision) and checks each against its compiled conditions.
fn assert_agrees(rules: &[CompiledConditions], arguments: Option<&Value>) {
    let arena = RuleArena::new(rules);
    let mut evaluation = arena.evaluation(arguments);
    for (i, rule) in rules.iter().enumerate() {
        let flat = evaluation.truth(i as u32);
        match rule.args_only() {
            Some(_) => assert_eq!(
                flat,
                Some(compiled_truth(rule, arguments)),
                "rule {i} on {arguments:?}"
            ),
            None => assert_eq!(flat, None, "rule {i} is not argument-only"),
        }
    }
}

fn mixed_rules() -> Vec<CompiledConditions> {
    vec![
        conditions(json!({"session": {"callsFewerThan": 3}})),
        conditions(json!({})),
        conditions(json!({"args": [
            {"pointer": "/amount", "lessThanOrEqual": 100},
            {"pointer": "/customer", "prefix": "al"},
        ]})),
        conditions(json!({
            "args": [{"pointer": "/customer", "equals": "alice"}],
            "expression": "args.amount < 10",
        })),
        conditions(json!({"args": [{"pointer": "/customer", "equals": "blocked-1"}]})),
        conditions(json!({"args": [{"pointer": "/customer", "in": ["bob", "alice"]}]})),
        conditions(json!({"args": [{"pointer": "/customer", "regex": "^a.*e$"}]})),
        conditions(json!({"args": [{"pointer": "/missing", "exists": false}]})),
        conditions(json!({"args": [{"pointer": "/missing", "equals": 1}]})),
        conditions(json!({"delegation": {"delegated": false}})),
        conditions(json!({"args": [
            {"pointer": "/to/1/email", "equals": {"x": 1}},
            {"pointer": "/amount", "type": "integer"},
            {"pointer": "/amount", "greaterThan": 41.5},
        ]})),
        conditions(json!({"args": [{"pointer": "", "type": "object"}]})),
    ]
}

#[test]
fn argument_only_rules_agree_with_their_conditions_and_the_rest_are_left_to_them() {
    let rules = mixed_rules();
    let arguments = [
        json!({"amount": 42, "customer": "alice", "to": [{}, {"email": {"x": 1.0}}]}),
        json!({"amount": 420, "customer": "alice"}),
        json!({"amount": "42", "customer": 7, "missing": null}),
        json!({"customer": "blocked-1"}),
        json!([1, 2]),
        json!(null),
        json!({}),
    ];
    for args in &arguments {
        assert_agrees(&rules, Some(args));
    }
    // Listing: arguments unknown.
    assert_agrees(&rules, None);
    let arena = RuleArena::new(&rules);
    let mut listing = arena.evaluation(None);
    assert_eq!(listing.truth(1), Some(Truth::True), "no condition: true");
    assert_eq!(listing.truth(2), Some(Truth::Unknown), "matchers: unknown");
    assert_eq!(listing.truth(0), None, "session rule: not flattened");
    assert_eq!(listing.truth(rules.len() as u32), None, "no such rule");
}

#[test]
fn rules_on_the_same_pointer_share_one_interned_path() {
    let mut rules = vec![conditions(json!({"args": [
        {"pointer": "/amount", "lessThanOrEqual": 100},
        {"pointer": "/customer", "prefix": "al"},
    ]}))];
    for k in 1..10 {
        rules.push(conditions(
            json!({"args": [{"pointer": "/customer", "equals": format!("blocked-{k}")}]}),
        ));
    }
    let arena = RuleArena::new(&rules);
    assert_eq!(arena.paths.len(), 2);
    assert_eq!(arena.tokens.len(), 2);
    assert_eq!(arena.matchers.len(), 11);
    assert_eq!(arena.text.matches("customer").count(), 1);
    // The rules' matchers follow each other in rule order.
    let spans: Vec<Span> = arena
        .rules
        .iter()
        .map(|r| match r {
            FlatRule::Args(span) => *span,
            FlatRule::General => panic!("argument-only rule not flattened"),
        })
        .collect();
    assert_eq!(spans[0], Span { start: 0, len: 2 });
    for (k, span) in spans.iter().enumerate().skip(1) {
        assert_eq!(
            *span,
            Span {
                start: k as u32 + 1,
                len: 1
            }
        );
    }
    // One decision walks each pointer once.
    let args = json!({"amount": 42, "customer": "alice"});
    let mut evaluation = arena.evaluation(Some(&args));
    for i in (1..10).chain([0]) {
        let expected = if i == 0 { Truth::True } else { Truth::False };
        assert_eq!(evaluation.truth(i), Some(expected), "rule {i}");
    }
    assert_eq!(evaluation.cached, 2);
}

#[test]
fn more_pointers_than_the_cache_holds_are_still_resolved() {
    let rules: Vec<CompiledConditions> = (0..3 * CACHED_PATHS)
        .map(|k| conditions(json!({"args": [{"pointer": format!("/k{k}"), "equals": k}]})))
        .collect();
    let mut args = serde_json::Map::new();
    for k in (0..3 * CACHED_PATHS).step_by(2) {
        args.insert(format!("k{k}"), json!(k));
    }
    let args = Value::Object(args);
    let arena = RuleArena::new(&rules);
    let mut evaluation = arena.evaluation(Some(&args));
    for round in 0..2 {
        for k in 0..3 * CACHED_PATHS {
            let expected = if k % 2 == 0 {
                Truth::True
            } else {
                Truth::Unknown
            };
            assert_eq!(
                evaluation.truth(k as u32),
                Some(expected),
                "rule {k}, round {round}"
            );
        }
    }
    assert_eq!(evaluation.cached, CACHED_PATHS);
    assert_agrees(&rules, Some(&args));
}

fn matcher_spec() -> impl Strategy<Value = Value> {
    let pointer = prop::sample::select(vec!["", "/a", "/a/0", "/a/b", "/b", "/a~1b", "/0"]);
    let test = prop_oneof![
        Just(json!({"equals": "x"})),
        Just(json!({"equals": 1})),
        Just(json!({"equals": [1]})),
        Just(json!({"in": ["x", 2.0]})),
        Just(json!({"prefix": "x"})),
        Just(json!({"regex": "^x?$"})),
        Just(json!({"lessThan": 2})),
        Just(json!({"greaterThanOrEqual": 1.5})),
        Just(json!({"exists": true})),
        Just(json!({"exists": false})),
        Just(json!({"type": "array"})),
        Just(json!({"type": "integer"})),
    ];
    (pointer, test).prop_map(|(pointer, mut test)| {
        test["pointer"] = json!(pointer);
        test
    })
}

fn leaf() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!(null),
        json!("x"),
        json!(""),
        json!(1),
        json!(1.0),
        json!(1.5),
        json!(2),
        json!([1]),
        json!(true),
    ])
}

fn arguments() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec!["a", "b", "0", "a/b"]).prop_map(str::to_owned),
                inner,
                0..3,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn random_rules_agree_with_their_conditions(
        rules in prop::collection::vec(prop::collection::vec(matcher_spec(), 0..4), 1..6),
        args in arguments(),
    ) {
        let rules: Vec<CompiledConditions> = rules
            .into_iter()
            .map(|matchers| conditions(json!({ "args": matchers })))
            .collect();
        assert_agrees(&rules, Some(&args));
        assert_agrees(&rules, None);
    }
}
