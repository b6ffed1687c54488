//! Table tests of the argument matchers with adversarial arguments.

use serde_json::{Value, json};

use super::*;

fn matcher(spec: Value) -> CompiledArgMatcher {
    let spec: ArgMatcher = serde_json::from_value(spec).expect("matcher spec");
    CompiledArgMatcher::new(&spec).expect("matcher compiles")
}

/// Checks the matcher, and the same matcher as a rule's only condition in a
/// [`arena::RuleArena`] (the decision loop's copy): both must agree.
fn check(spec: Value, cases: &[(Value, Truth)]) {
    let m = matcher(spec.clone());
    let conditions = CompiledConditions::new(Some(&Conditions {
        args: vec![serde_json::from_value(spec.clone()).expect("matcher spec")],
        ..Conditions::default()
    }))
    .expect("conditions compile");
    let arena = arena::RuleArena::new([&conditions]);
    for (args, expected) in cases {
        assert_eq!(m.evaluate(args), *expected, "matcher {spec} on {args}");
        assert_eq!(
            arena.evaluation(Some(args)).truth(0),
            Some(*expected),
            "arena matcher {spec} on {args}"
        );
    }
}

use Truth::{False as F, True as T, Unknown as U};

#[test]
fn equals_compares_numbers_by_value_and_everything_else_exactly() {
    check(
        json!({"pointer": "/amount", "equals": 100}),
        &[
            (json!({"amount": 100}), T),
            (json!({"amount": 100.0}), T),
            (json!({"amount": 1e2}), T),
            (json!({"amount": 100.000_000_000_1}), F),
            (json!({"amount": "100"}), F),
            (json!({"amount": [100]}), F),
            (json!({"amount": null}), F),
            (json!({}), U),
            (json!(null), U),
            (json!([100]), U),
        ],
    );
    check(
        json!({"pointer": "/to", "equals": {"a": [1, 2.0]}}),
        &[
            (json!({"to": {"a": [1.0, 2]}}), T),
            (json!({"to": {"a": [2, 1]}}), F),
            (json!({"to": {"a": [1, 2], "b": 1}}), F),
        ],
    );
}

#[test]
fn equals_null_is_rejected_rather_than_ignored() {
    // `equals: null` reads as "no operator" (serde cannot tell it from absent);
    // it must fail loudly, pointing users at `type: null`.
    let m: ArgMatcher =
        serde_json::from_value(json!({"pointer": "/flag", "equals": null})).unwrap();
    assert!(matches!(
        CompiledArgMatcher::new(&m),
        Err(ConditionError::OperatorCount { count: 0, .. })
    ));
}

#[test]
fn equals_on_strings_does_not_fold_case_or_normalise_unicode() {
    check(
        json!({"pointer": "/role", "equals": "admin"}),
        &[
            (json!({"role": "admin"}), T),
            (json!({"role": "Admin"}), F),
            (json!({"role": "ADMIN"}), F),
            (json!({"role": "\u{0430}dmin"}), F),  // Cyrillic а
            (json!({"role": "admin\u{200b}"}), F), // zero-width space
            (json!({"role": "ａｄｍｉｎ"}), F),
        ],
    );
}

#[test]
fn in_matches_any_listed_value() {
    check(
        json!({"pointer": "/currency", "in": ["EUR", "USD", 1]}),
        &[
            (json!({"currency": "EUR"}), T),
            (json!({"currency": "eur"}), F),
            (json!({"currency": 1.0}), T),
            (json!({"currency": ["EUR"]}), F),
            (json!({}), U),
        ],
    );
}

#[test]
fn prefix_needs_a_string() {
    check(
        json!({"pointer": "/path", "prefix": "/srv/"}),
        &[
            (json!({"path": "/srv/data"}), T),
            (json!({"path": "/srv"}), F),
            (json!({"path": "/SRV/data"}), F),
            (json!({"path": 5}), U),
            (json!({"path": ["/srv/x"]}), U),
            (json!({"path": null}), U),
            (json!({}), U),
        ],
    );
}

#[test]
fn regex_is_unanchored_unless_anchored() {
    check(
        json!({"pointer": "/to", "regex": "@example\\.com$"}),
        &[
            (json!({"to": "a@example.com"}), T),
            (json!({"to": "a@example.com.evil.org"}), F),
            (json!({"to": "a@EXAMPLE.com"}), F),
            (json!({"to": "a@examplexcom"}), F),
            (json!({"to": "a@example.com\n"}), F),
            (json!({"to": ["a@example.com"]}), U),
            (json!({}), U),
        ],
    );
}

#[test]
fn numeric_bounds_compare_exactly_across_integers_and_floats() {
    check(
        json!({"pointer": "/amount", "lessThanOrEqual": 100}),
        &[
            (json!({"amount": 100}), T),
            (json!({"amount": 100.0}), T),
            (json!({"amount": 100.000_001}), F),
            (json!({"amount": 99.999_999}), T),
            (json!({"amount": -1e300}), T),
            (json!({"amount": 1e300}), F),
            (json!({"amount": u64::MAX}), F),
            (json!({"amount": i64::MIN}), T),
            (json!({"amount": "50"}), U),
            (json!({"amount": null}), U),
            (json!({"amount": true}), U),
            (json!({"amount": [50]}), U),
            (json!({}), U),
        ],
    );
    check(
        json!({"pointer": "/n", "lessThan": 9_007_199_254_740_993_u64}),
        &[
            // 2^53 + 1 is not representable as f64: comparing through floats
            // would call these equal.
            (json!({"n": 9_007_199_254_740_992_u64}), T),
            (json!({"n": 9_007_199_254_740_993_u64}), F),
            (json!({"n": 9_007_199_254_740_992.0}), T),
        ],
    );
    check(
        json!({"pointer": "/n", "greaterThan": 0.5}),
        &[
            (json!({"n": 1}), T),
            (json!({"n": 0}), F),
            (json!({"n": 0.5}), F),
            (json!({"n": -0.0}), F),
        ],
    );
    check(
        json!({"pointer": "/n", "greaterThanOrEqual": -3}),
        &[
            (json!({"n": -3.0}), T),
            (json!({"n": -3.5}), F),
            (json!({"n": i64::MAX}), T),
        ],
    );
}

#[test]
fn huge_integers_parse_as_floats_and_still_compare() {
    let args: Value =
        serde_json::from_str(r#"{"amount": 100000000000000000000000000000}"#).unwrap();
    check(
        json!({"pointer": "/amount", "lessThan": 100}),
        &[(args.clone(), F)],
    );
    check(
        json!({"pointer": "/amount", "greaterThan": u64::MAX}),
        &[(args, T)],
    );
}

#[test]
fn exists_is_the_only_matcher_that_reads_absence() {
    check(
        json!({"pointer": "/override", "exists": false}),
        &[
            (json!({}), T),
            (json!({"override": null}), F),
            (json!({"override": false}), F),
        ],
    );
    check(
        json!({"pointer": "/a/b", "exists": true}),
        &[
            (json!({"a": {"b": null}}), T),
            (json!({"a": {}}), F),
            (json!({"a": "b"}), F),
            (json!({"a": ["b"]}), F),
        ],
    );
}

#[test]
fn type_checks() {
    let cases = [
        ("string", json!("x"), T),
        ("string", json!(1), F),
        ("number", json!(1.5), T),
        ("number", json!("1.5"), F),
        ("integer", json!(3), T),
        ("integer", json!(3.0), T),
        ("integer", json!(3.5), F),
        ("integer", json!(u64::MAX), T),
        ("boolean", json!(false), T),
        ("boolean", json!(0), F),
        ("array", json!([]), T),
        ("object", json!({}), T),
        ("object", json!([]), F),
        ("null", json!(null), T),
        ("null", json!(0), F),
    ];
    for (t, value, expected) in cases {
        check(
            json!({"pointer": "/v", "type": t}),
            &[(json!({ "v": value }), expected)],
        );
    }
    check(json!({"pointer": "/v", "type": "null"}), &[(json!({}), U)]);
}

#[test]
fn pointers_walk_nested_arrays_and_escapes() {
    check(
        json!({"pointer": "/to/1/email", "equals": "b@x"}),
        &[
            (json!({"to": [{"email": "a@x"}, {"email": "b@x"}]}), T),
            (json!({"to": [{"email": "a@x"}]}), U),
            (json!({"to": {"1": {"email": "b@x"}}}), T),
        ],
    );
    check(
        json!({"pointer": "/a~1b/~0c", "equals": 1}),
        &[
            (json!({"a/b": {"~c": 1}}), T),
            (json!({"a": {"b": {"~c": 1}}}), U),
        ],
    );
    // Array indexes are canonical: no leading zeros, no '-'.
    check(
        json!({"pointer": "/xs/01", "equals": 1}),
        &[(json!({"xs": [0, 1]}), U), (json!({"xs": {"01": 1}}), T)],
    );
    check(
        json!({"pointer": "/xs/-", "exists": true}),
        &[(json!({"xs": [1]}), F)],
    );
    // Nested arrays.
    check(
        json!({"pointer": "/m/0/0/0", "equals": 7}),
        &[(json!({"m": [[[7]]]}), T), (json!({"m": [[7]]}), U)],
    );
}

#[test]
fn deep_nesting_is_handled() {
    let mut value = json!(1);
    let mut pointer = String::new();
    for _ in 0..200 {
        value = json!({ "a": value });
        pointer.push_str("/a");
    }
    check(
        json!({"pointer": pointer, "equals": 1}),
        &[(value.clone(), T)],
    );
    check(
        json!({"pointer": "/a/a/a", "type": "object"}),
        &[(value, T)],
    );
}

#[test]
fn malformed_matchers_do_not_compile() {
    let errors = [
        (json!({"pointer": "/a"}), "OperatorCount"),
        (
            json!({"pointer": "/a", "equals": 1, "prefix": "x"}),
            "OperatorCount",
        ),
        (json!({"pointer": "a", "equals": 1}), "InvalidPointer"),
        (json!({"pointer": "/a~2", "equals": 1}), "InvalidPointer"),
        (json!({"pointer": "/a", "regex": "("}), "InvalidRegex"),
        (
            json!({"pointer": "/a", "regex": "\\w{1000}{1000}"}),
            "RegexTooBig",
        ),
        (json!({"pointer": "/a", "in": []}), "EmptyIn"),
    ];
    for (spec, kind) in errors {
        let m: ArgMatcher = serde_json::from_value(spec.clone()).unwrap();
        let err = CompiledArgMatcher::new(&m).unwrap_err();
        assert!(format!("{err:?}").starts_with(kind), "{spec}: {err:?}");
    }
}
