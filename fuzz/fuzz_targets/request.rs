//! Fuzz target `request`: one agent POST through the sidecar's intake —
//! `check_body_headers`, `parse_body`, `classify`, `forwarded_body` — and
//! the properties that make the forwarded bytes mean what was decided:
//!
//! - nothing panics, whatever the bytes and the `Content-Type`;
//! - an accepted body, re-parsed from the bytes that are forwarded (all
//!   members, or the members policy kept), gives the same messages and the
//!   same classification;
//! - `serde_json` reads an accepted body to an equal value (numbers compared
//!   numerically), so the strict parser never accepts what a lenient reader
//!   reads otherwise;
//! - no accepted object has two keys with equal `fold_key`.
//!
//! Input layout: byte 0 picks the `Content-Type` (from [`CONTENT_TYPES`], or
//! at 0xE0 and above the bytes up to the next NUL, as sent), byte 1 the
//! `MCP-Protocol-Version` header, byte 2 which governed calls policy denies
//! (bit `i % 8` for member `i`); the rest is the body.

#![no_main]

use bytes::Bytes;
use chaperone_json::{Limits, fold_key};
use chaperone_sidecar::authz::{Governed, classify, message_era};
use chaperone_sidecar::intake::check_body_headers;
use chaperone_sidecar::jsonrpc::{Message, Payload, forwarded_body, parse_body};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The sidecar's default body limit.
const LIMIT: usize = 1 << 20;

/// `Content-Type` values byte 0 picks from (index `byte % len` below 0xE0).
const CONTENT_TYPES: &[Option<&str>] = &[
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("Application/JSON;charset=\"UTF-8\""),
    Some("application/json; charset=utf-7"),
    Some("application/json; charset=latin1"),
    Some("application/json; charset=utf-16"),
    Some("application/json; charset=utf-8; charset=utf-16le"),
    Some("text/plain"),
    None,
];

/// `MCP-Protocol-Version` values byte 1 picks from.
const VERSIONS: &[Option<&str>] = &[None, Some("2025-06-18"), Some("2026-07-28"), Some("x")];

/// Methods forwarded ungoverned as if an AgentIdentity listed them.
fn passthrough() -> Vec<String> {
    vec!["vendor/extension".to_owned()]
}

struct Input<'a> {
    headers: HeaderMap,
    version: Option<&'static str>,
    deny_mask: u8,
    body: &'a [u8],
}

fn split_input(data: &[u8]) -> Option<Input<'_>> {
    let (&selector, rest) = data.split_first()?;
    let mut headers = HeaderMap::new();
    let rest = if selector >= 0xE0 {
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        if let Ok(value) = HeaderValue::from_bytes(&rest[..end]) {
            headers.insert(CONTENT_TYPE, value);
        }
        rest.get(end + 1..).unwrap_or_default()
    } else {
        if let Some(value) = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()] {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
        }
        rest
    };
    let (&version, rest) = rest.split_first()?;
    let (&deny_mask, body) = rest.split_first()?;
    Some(Input {
        headers,
        version: VERSIONS[usize::from(version) % VERSIONS.len()],
        deny_mask,
        body,
    })
}

/// Panics if any object in `value` has two keys with equal `fold_key`.
fn assert_no_folded_collisions(value: &Value) {
    match value {
        Value::Array(items) => items.iter().for_each(assert_no_folded_collisions),
        Value::Object(map) => {
            let mut folded: Vec<String> = map.keys().map(|k| fold_key(k).into_owned()).collect();
            folded.sort();
            if let Some(pair) = folded.windows(2).find(|w| w[0] == w[1]) {
                panic!(
                    "accepted object has keys folding to {:?}: {:?}",
                    pair[0],
                    map.keys().collect::<Vec<_>>()
                );
            }
            map.values().for_each(assert_no_folded_collisions);
        }
        _ => {}
    }
}

fn messages(payload: &Payload) -> &[Message] {
    match payload {
        Payload::Single(message) => std::slice::from_ref(message),
        Payload::Batch(messages) => messages,
    }
}

fn document(payload: &Payload) -> Value {
    match payload {
        Payload::Single(message) => message.raw().clone(),
        Payload::Batch(messages) => {
            Value::Array(messages.iter().map(|m| m.raw().clone()).collect())
        }
    }
}

fn run(data: &[u8]) {
    let Some(input) = split_input(data) else {
        return;
    };
    // Intake: only "never panics" is checked here (the forwarded request's
    // Content-Type is set anew); the body properties below hold for every body.
    let _ = check_body_headers(&input.headers);
    let bytes = Bytes::copy_from_slice(input.body);
    let Ok(parsed) = parse_body(&bytes, LIMIT) else {
        return;
    };

    // The strict reading is the lenient reading, and case-fold unambiguous.
    let value = chaperone_json::parse(&bytes, Limits::bytes(LIMIT))
        .expect("parse_body accepted a body chaperone_json::parse refuses");
    assert_eq!(
        value,
        document(&parsed.payload),
        "parse_body's messages are not the document"
    );
    let lenient: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("accepted, but serde_json refuses it: {e}"));
    assert!(
        chaperone_json::same_meaning(&value, &lenient),
        "accepted, but serde_json reads another value:\nstrict  {value}\nserde   {lenient}"
    );
    assert_no_folded_collisions(&value);

    // Decide as the proxy does: Pass and List are forwarded, Malformed and
    // NotForwarded refused, Call forwarded unless "policy" (the mask) denies.
    let passthrough = passthrough();
    let all = messages(&parsed.payload);
    let decisions: Vec<Governed<'_>> = all
        .iter()
        .map(|m| classify(m, message_era(m, input.version), &passthrough))
        .collect();
    let kept: Vec<usize> = decisions
        .iter()
        .enumerate()
        .filter(|(i, governed)| match governed {
            Governed::Pass | Governed::List => true,
            Governed::Call { .. } => input.deny_mask & (1 << (i % 8)) == 0,
            Governed::Malformed(_) | Governed::NotForwarded(_) => false,
        })
        .map(|(i, _)| i)
        .collect();
    if kept.is_empty() {
        return;
    }

    let forwarded = forwarded_body(&bytes, &parsed, &kept);
    let reparsed = parse_body(&forwarded, LIMIT).unwrap_or_else(|e| {
        panic!(
            "the forwarded body is refused ({e}): {:?}",
            String::from_utf8_lossy(&forwarded)
        )
    });
    if kept.len() == all.len() {
        assert_eq!(
            reparsed.payload, parsed.payload,
            "the forwarded body reads differently"
        );
    } else {
        let expected: Vec<Message> = kept.iter().map(|i| all[*i].clone()).collect();
        assert_eq!(
            reparsed.payload,
            Payload::Batch(expected),
            "the kept members read differently"
        );
    }
    for (message, index) in messages(&reparsed.payload).iter().zip(&kept) {
        let again = classify(message, message_era(message, input.version), &passthrough);
        assert_eq!(
            again, decisions[*index],
            "a forwarded member classifies differently"
        );
    }
    let lenient_forwarded: Value = serde_json::from_slice(&forwarded)
        .unwrap_or_else(|e| panic!("serde_json refuses the forwarded body: {e}"));
    assert!(
        chaperone_json::same_meaning(&document(&reparsed.payload), &lenient_forwarded),
        "serde_json reads the forwarded body otherwise"
    );
}

fuzz_target!(|data: &[u8]| run(data));
