//! Redaction and approval-settings checks.

use serde_json::json;

use super::*;

fn pointers(list: &[&str]) -> Vec<String> {
    list.iter().map(|p| (*p).to_owned()).collect()
}

#[test]
fn redact_replaces_nested_values_and_array_items() {
    let arguments = json!({
        "orderId": "A-1001",
        "card": {"number": "4111 1111 1111 1111", "expiry": "12/30"},
        "notes": ["first", "second"],
        "amount": 250
    });
    let redacted = redact(&arguments, &pointers(&["/card/number", "/notes/1"]));
    assert_eq!(
        redacted,
        json!({
            "orderId": "A-1001",
            "card": {"number": "[redacted]", "expiry": "12/30"},
            "notes": ["first", "[redacted]"],
            "amount": 250
        })
    );
}

#[test]
fn redact_replaces_whole_objects_and_non_string_values() {
    let arguments = json!({"card": {"number": "4111"}, "amount": 250, "ok": true});
    let redacted = redact(&arguments, &pointers(&["/card", "/amount", "/ok"]));
    assert_eq!(
        redacted,
        json!({"card": "[redacted]", "amount": "[redacted]", "ok": "[redacted]"})
    );
}

#[test]
fn redact_reads_escaped_names() {
    // `~1` is '/', `~0` is '~' (RFC 6901), in that order: `~01` is "~1".
    let arguments = json!({"a/b": 1, "m~n": 2, "~1": 3, "a": {"b": 4}});
    let redacted = redact(&arguments, &pointers(&["/a~1b", "/m~0n", "/~01"]));
    assert_eq!(
        redacted,
        json!({"a/b": "[redacted]", "m~n": "[redacted]", "~1": "[redacted]", "a": {"b": 4}})
    );
}

#[test]
fn redact_ignores_pointers_that_name_nothing() {
    let arguments = json!({"card": {"number": "4111"}, "notes": ["x"]});
    let redacted = redact(
        &arguments,
        &pointers(&[
            "/missing",
            "/card/cvc",
            "/notes/1",
            "/notes/01",
            "/card/number/deeper",
        ]),
    );
    assert_eq!(redacted, arguments);
}

#[test]
fn redact_leaves_its_input_alone() {
    let arguments = json!({"secret": "s3cr3t"});
    let redacted = redact(&arguments, &pointers(&["/secret"]));
    assert_eq!(arguments, json!({"secret": "s3cr3t"}));
    assert_eq!(redacted, json!({"secret": REDACTED}));
}

#[test]
fn redact_of_a_non_object_only_follows_what_exists() {
    assert_eq!(redact(&json!(5), &pointers(&["/a"])), json!(5));
    assert_eq!(
        redact(&json!(["a", "b"]), &pointers(&["/0"])),
        json!(["[redacted]", "b"])
    );
}

fn settings(redact_arguments: &[&str]) -> ApprovalSettings {
    ApprovalSettings {
        redact_arguments: pointers(redact_arguments),
        ..ApprovalSettings::default()
    }
}

#[test]
fn valid_settings_pass() {
    assert_eq!(
        check_approval_settings(&ApprovalSettings::default()),
        Ok(())
    );
    assert_eq!(
        check_approval_settings(&settings(&["/card/number", "/a~1b", "/m~0n", "/", "/0"])),
        Ok(())
    );
}

#[test]
fn pointers_that_are_not_argument_pointers_are_refused() {
    for bad in ["", "card", "card/number", "/a~2", "/a~", "~1/a", "/~x"] {
        assert_eq!(
            check_approval_settings(&settings(&["/fine", bad])),
            Err(ApprovalError::InvalidPointer {
                pointer: bad.to_owned()
            }),
            "{bad:?}"
        );
    }
    let long = format!("/{}", "a".repeat(512));
    assert!(matches!(
        check_approval_settings(&settings(&[&long])),
        Err(ApprovalError::InvalidPointer { .. })
    ));
}

#[test]
fn more_than_32_pointers_are_refused() {
    let many: Vec<String> = (0..33).map(|i| format!("/a{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        check_approval_settings(&settings(&refs)),
        Err(ApprovalError::TooManyRedactions { count: 33 })
    );
    assert_eq!(check_approval_settings(&settings(&refs[..32])), Ok(()));
}

#[test]
fn durations_outside_one_second_to_one_day_are_refused() {
    for (timeout, valid_for, field, value) in [
        (0, 300, "timeoutSeconds", 0),
        (86_401, 300, "timeoutSeconds", 86_401),
        (600, 0, "validForSeconds", 0),
        (600, 86_401, "validForSeconds", 86_401),
    ] {
        let s = ApprovalSettings {
            timeout_seconds: timeout,
            valid_for_seconds: valid_for,
            redact_arguments: Vec::new(),
        };
        assert_eq!(
            check_approval_settings(&s),
            Err(ApprovalError::OutOfRange { field, value })
        );
    }
    let edges = ApprovalSettings {
        timeout_seconds: 1,
        valid_for_seconds: 86_400,
        redact_arguments: Vec::new(),
    };
    assert_eq!(check_approval_settings(&edges), Ok(()));
}

#[test]
fn settings_default_when_absent_in_yaml() {
    let parsed: ApprovalSettings =
        serde_json::from_value(json!({"redactArguments": ["/card"]})).unwrap();
    assert_eq!(parsed.timeout_seconds, 600);
    assert_eq!(parsed.valid_for_seconds, 300);
    assert_eq!(parsed.redact_arguments, ["/card"]);
}
