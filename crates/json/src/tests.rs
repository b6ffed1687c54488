use proptest::prelude::*;
use serde_json::json;

use super::*;

fn strict(text: &str) -> Result<Value, JsonError> {
    parse(text.as_bytes(), Limits::default())
}

#[test]
fn reads_what_serde_json_reads_for_plain_documents() {
    let text = r#" {"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get","arguments":{"a":[1,-2,0.5,true,null,"x\n\u00e9\ud83d\ude00"]}}} "#;
    assert_eq!(
        strict(text).unwrap(),
        serde_json::from_str::<Value>(text).unwrap()
    );
}

#[test]
fn refuses_duplicate_keys_including_escaped_ones() {
    assert_eq!(
        strict(r#"{"a":1,"a":2}"#),
        Err(JsonError::DuplicateKey { key: "a".into() })
    );
    assert_eq!(
        strict(r#"{"x":{"name":1,"n\u0061me":2}}"#),
        Err(JsonError::DuplicateKey { key: "name".into() })
    );
}

#[test]
fn refuses_keys_equal_under_case_folding() {
    for (first, second) in [
        ("amount", "AMOUNT"),
        ("method", "Method"),
        ("params", "param\u{017f}"),
        ("k", "\u{212a}"),
        ("\u{00e5}", "\u{212b}"),
        ("stra\u{00df}e", "STRASSE"),
        ("\u{00df}", "\u{1e9e}"),
        ("\u{03c3}", "\u{03c2}"),
    ] {
        let text = format!(r#"{{"outer":[{{"{first}":1,"{second}":2}}]}}"#);
        let Err(JsonError::CaseCollision {
            first: a,
            second: b,
        }) = strict(&text)
        else {
            panic!("{first} / {second} not refused");
        };
        let mut named = [a, b];
        named.sort();
        let mut expected = [first.to_owned(), second.to_owned()];
        expected.sort();
        assert_eq!(named, expected);
    }
    assert!(strict(r#"{"a":1,"b":2,"A1":3}"#).is_ok());
}

#[test]
fn refuses_numbers_readers_disagree_on() {
    for text in [
        "100.000000000000001",
        "99.999999999999999",
        "9007199254740993",
        "-9007199254740993",
        "123456789012345678901234567890",
        "1e400",
        "-1e400",
        "1e-400",
        "0.1000000000000000000000000001",
    ] {
        assert!(
            matches!(strict(text), Err(JsonError::AmbiguousNumber { .. })),
            "{text} should be refused"
        );
    }
}

#[test]
fn keeps_numbers_every_reader_holds_exactly() {
    for (text, expected) in [
        ("100", json!(100)),
        ("-0", json!(0)),
        ("9007199254740992", json!(9_007_199_254_740_992_u64)),
        ("-9007199254740992", json!(-9_007_199_254_740_992_i64)),
        ("0.1", json!(0.1)),
        // The nearest double is above 100, and its shortest text is this one.
        ("100.00000000000001", json!(100.00000000000001)),
        ("100.0", json!(100.0)),
        ("1e2", json!(100.0)),
        ("1.5E-3", json!(0.0015)),
        ("0e999999999999999999999", json!(0.0)),
        ("1.7976931348623157e308", json!(f64::MAX)),
        ("5e-324", json!(5e-324)),
    ] {
        assert_eq!(strict(text).unwrap(), expected, "{text}");
    }
}

#[test]
fn refuses_what_some_readers_repair() {
    // Lone surrogates, NUL, a byte-order mark, control characters, trailing data.
    for text in [
        r#"{"x":"\ud800"}"#,
        r#"{"x":"\udc00\ud800"}"#,
        r#"{"x":"a\u0000b"}"#,
        r#"{"arguments":{"__proto__":{"amount":1}}}"#,
        "\u{feff}{}",
        "{\"x\":\"a\tb\"}",
        // A raw control byte after an escape, and strings never closed.
        "{\"x\":\"a\\nb\u{1f}c\"}",
        "{\"x\":\"abcdefghijklmnop",
        "{\"x\":\"a\\nbcdefghijklmnop",
        r#"{"x":1} {"y":2}"#,
        r#"{"x":1,}"#,
        r#"[1,]"#,
        "{'x':1}",
        "01",
        "1.",
        ".5",
        "+1",
        "NaN",
        "",
    ] {
        assert!(strict(text).is_err(), "{text:?} should be refused");
    }
    assert_eq!(
        parse(b"{\"x\":\"\xff\"}", Limits::default()),
        Err(JsonError::InvalidUtf8)
    );
}

#[test]
fn bounds_size_and_depth() {
    assert_eq!(
        parse(b"[1,2,3]", Limits::bytes(3)),
        Err(JsonError::TooLarge { limit: 3 })
    );
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    assert_eq!(strict(&deep), Err(JsonError::TooDeep { limit: 64 }));
    let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
    assert!(strict(&ok).is_ok());
}

#[test]
fn records_the_spans_of_top_level_items() {
    let text = br#"[ {"id":1e2} , 123456 ,"x"]"#;
    let doc = parse_document(text, Limits::default()).unwrap();
    let items: Vec<&[u8]> = doc.item_spans.iter().map(|r| &text[r.clone()]).collect();
    assert_eq!(items, [&br#"{"id":1e2}"#[..], b"123456", br#""x""#]);
    assert!(
        parse_document(br#"{"a":[1]}"#, Limits::default())
            .unwrap()
            .item_spans
            .is_empty()
    );
}

#[test]
fn compares_numbers_by_meaning() {
    assert!(same_meaning(&json!({"a": [100]}), &json!({"a": [100.0]})));
    assert!(same_meaning(&json!(-0), &json!(0.0)));
    assert!(!same_meaning(&json!(100), &json!(100.5)));
    assert!(!same_meaning(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    assert!(!same_meaning(&json!("1"), &json!(1)));
}

#[test]
fn folds_like_go_for_its_special_orbits() {
    assert_eq!(fold_key("Kelvin\u{212a}"), "kelvink");
    assert_eq!(fold_key("param\u{017f}"), "params");
    assert_eq!(fold_key("plain"), Cow::Borrowed("plain"));
}

/// A random JSON document as text, with random case variants of keys, escapes
/// and numbers in several spellings.
fn document() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "amount",
        "AMOUNT",
        "Amount",
        "name",
        "n\\u0061me",
        "param\\u017f",
        "params",
        "\\u212a",
        "k",
        "x",
    ])
    .prop_map(str::to_owned);
    let number = prop::sample::select(vec![
        "1",
        "100",
        "100.0",
        "1e2",
        "100.00000000000001",
        "100.000000000000001",
        "0.1",
        "9007199254740993",
        "1E400",
        "5e-324",
    ])
    .prop_map(str::to_owned);
    let leaf = prop_oneof![
        number,
        Just("\"s\"".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        Just("true".to_owned()),
        Just("null".to_owned()),
    ];
    leaf.prop_recursive(4, 32, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((key.clone(), inner), 0..4).prop_map(|kv| {
                let members: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

/// Whether `value` (as serde_json reads it, keys unescaped) has two keys of one
/// object that fold alike.
fn has_collision(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().any(has_collision),
        Value::Object(map) => {
            let mut folds: Vec<String> = map.keys().map(|k| fold_key(k).into_owned()).collect();
            folds.sort();
            folds.windows(2).any(|w| w[0] == w[1]) || map.values().any(has_collision)
        }
        _ => false,
    }
}

proptest! {
    /// Whatever strict parsing accepts, serde_json reads to the same value, no
    /// object has keys folding alike, and each number re-encodes to a double
    /// whose shortest text is the same value.
    #[test]
    fn accepted_documents_have_one_reading(text in document()) {
        if let Ok(value) = strict(&text) {
            let lenient: Value = serde_json::from_str(&text).expect("serde_json reads it too");
            prop_assert_eq!(&value, &lenient);
            prop_assert!(!has_collision(&value));
            let reencoded = serde_json::to_string(&value).unwrap();
            prop_assert_eq!(strict(&reencoded).unwrap(), value);
        }
    }
}

/// The byte-at-a-time reading of [`plain_string_len`].
fn plain_string_len_bytewise(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(bytes.len())
}

#[test]
fn plain_string_len_stops_at_each_special_byte_in_every_lane() {
    for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
        for len in 0..20 {
            for at in 0..len {
                let mut bytes = vec![b'a'; len];
                bytes[at] = special;
                assert_eq!(
                    plain_string_len(&bytes),
                    at,
                    "{special:#x} at {at} of {len}"
                );
            }
        }
    }
    // Bytes next to the special ones, and UTF-8's high bytes, are plain.
    let plain = "!#[]^ ~\u{7f}é😀 plain text of more than eight bytes";
    assert_eq!(plain_string_len(plain.as_bytes()), plain.len());
}

proptest! {
    /// Eight bytes at a time finds the same first special byte as one at a
    /// time, over bytes drawn near the special ones.
    #[test]
    fn plain_string_len_agrees_with_bytewise(
        bytes in proptest::collection::vec(
            prop_oneof![
                Just(b'"'), Just(b'\\'), Just(b'!'), Just(b'#'), Just(b'[') , Just(b']'),
                0u8..0x21, 0x7eu8..=0xff, any::<u8>()
            ],
            0..64,
        )
    ) {
        prop_assert_eq!(plain_string_len(&bytes), plain_string_len_bytewise(&bytes));
    }
}
