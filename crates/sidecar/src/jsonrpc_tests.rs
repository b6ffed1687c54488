use super::*;

const LIMIT: usize = 1 << 20;

#[test]
fn parses_a_tools_call_request() {
    let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get","arguments":{"a":1}}}"#;
    let Payload::Single(Message::Request { id, method, raw }) = parse_payload(body, LIMIT).unwrap()
    else {
        panic!("not a request");
    };
    assert_eq!(id, Value::from(7));
    assert_eq!(method, "tools/call");
    assert_eq!(raw["params"]["name"], "get");
}

#[test]
fn rejects_duplicate_top_level_keys() {
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}"#;
    assert_eq!(
        parse_payload(body, LIMIT),
        Err(ParseError::Json(JsonError::DuplicateKey {
            key: "method".to_owned()
        }))
    );
}

#[test]
fn rejects_duplicate_nested_keys() {
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":1,"x":2}}}"#;
    assert!(matches!(
        parse_payload(body, LIMIT),
        Err(ParseError::Json(JsonError::DuplicateKey { key })) if key == "x"
    ));
}

#[test]
fn rejects_escaped_duplicate_keys() {
    // "name" and "n\u0061me" are the same key once unescaped.
    let body =
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","n\u0061me":"b"}}"#;
    assert!(matches!(
        parse_payload(body, LIMIT),
        Err(ParseError::Json(JsonError::DuplicateKey { .. }))
    ));
}

#[test]
fn rejects_invalid_utf8() {
    let body = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"x\":\"\xff\"}";
    assert_eq!(
        parse_payload(body, LIMIT),
        Err(ParseError::Json(JsonError::InvalidUtf8))
    );
}

#[test]
fn rejects_lone_surrogates() {
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping","x":"\ud800"}"#;
    assert!(matches!(
        parse_payload(body, LIMIT),
        Err(ParseError::Json(JsonError::Syntax { .. }))
    ));
}

#[test]
fn rejects_oversize_bodies() {
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    assert_eq!(
        parse_payload(body, 10),
        Err(ParseError::Json(JsonError::TooLarge { limit: 10 }))
    );
}

#[test]
fn rejects_trailing_data() {
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping"} {"x":1}"#;
    assert!(matches!(
        parse_payload(body, LIMIT),
        Err(ParseError::Json(JsonError::Syntax { .. }))
    ));
}

#[test]
fn rejects_empty_batches_and_non_objects() {
    assert!(matches!(
        parse_payload(b"[]", LIMIT),
        Err(ParseError::InvalidMessage(_))
    ));
    assert!(matches!(
        parse_payload(b"[1]", LIMIT),
        Err(ParseError::InvalidMessage(_))
    ));
    assert!(matches!(
        parse_payload(br#"{"jsonrpc":"1.0","id":1,"method":"x"}"#, LIMIT),
        Err(ParseError::InvalidMessage(_))
    ));
}

#[test]
fn classifies_batches() {
    let body = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":"s1","result":{}}]"#;
    let Payload::Batch(messages) = parse_payload(body, LIMIT).unwrap() else {
        panic!("not a batch");
    };
    assert!(matches!(messages[0], Message::Request { .. }));
    assert!(matches!(messages[1], Message::Notification { .. }));
    assert!(matches!(messages[2], Message::Response { .. }));
}

#[test]
fn rejects_case_colliding_keys_and_unknown_members() {
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}"#;
    assert!(matches!(
        parse_payload(body, LIMIT),
        Err(ParseError::Json(JsonError::CaseCollision { .. }))
    ));
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"amount":50,"AMOUNT":1000000}}}"#;
    assert!(matches!(
        parse_payload(body, LIMIT),
        Err(ParseError::Json(JsonError::CaseCollision { .. }))
    ));
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping","paramſ":{}}"#;
    assert!(matches!(
        parse_payload(body.as_bytes(), LIMIT),
        Err(ParseError::UnknownMember(m)) if m == "paramſ"
    ));
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}"#;
    assert!(matches!(
        parse_payload(body, LIMIT),
        Err(ParseError::InvalidMessage(_))
    ));
    let body = br#"{"jsonrpc":"2.0","id":1,"result":{},"params":{}}"#;
    assert!(matches!(
        parse_payload(body, LIMIT),
        Err(ParseError::UnknownMember(m)) if m == "params"
    ));
}

#[test]
fn forwards_the_kept_members_of_a_batch_byte_for_byte() {
    let text = br#"[ {"jsonrpc":"2.0","id":123456789,"method":"a"} , {"jsonrpc":"2.0","id":2.50,"method":"b"},{"jsonrpc":"2.0","id":"x","method":"c"}]"#;
    let bytes = bytes::Bytes::from_static(text);
    let body = parse_body(text, LIMIT).unwrap();
    assert_eq!(forwarded_body(&bytes, &body, &[0, 1, 2]), bytes);
    assert_eq!(
        &forwarded_body(&bytes, &body, &[1, 2])[..],
        &br#"[{"jsonrpc":"2.0","id":2.50,"method":"b"},{"jsonrpc":"2.0","id":"x","method":"c"}]"#[..]
    );
}
