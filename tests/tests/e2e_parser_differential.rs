//! The sidecar's reading of a request against the readers behind it: for
//! generated MCP request bodies, either the sidecar refuses the request (at
//! intake, in parsing, or as a malformed or unforwarded message) or what it
//! decided on — each forwarded message's method, tool name and arguments —
//! is what Go's `encoding/json` (a map, and a case-insensitive struct binding
//! like mcp-go's) and Node's `JSON.parse` read from the bytes it forwards.
//!
//! Bodies are generated with proptest strategies (not shrunk: the readers run
//! once per test over the whole batch, since starting them is the slow part)
//! from a fixed seed; `CHAPERONE_DIFF_SEED` and `CHAPERONE_DIFF_CASES`
//! override the seed and the number of cases. They vary key spellings (case,
//! `\u` escapes, `ſ` and the Kelvin sign, which fold to `s` and `k`),
//! envelope members, the `Content-Type` charset, number spellings and string
//! escapes. The readers need `make tools` (see `chaperone_testenv::mcp_servers`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result};
use chaperone_sidecar::authz::{Governed, PROMPT_PREFIX, RESOURCE_PREFIX, classify, message_era};
use chaperone_sidecar::intake::check_body_headers;
use chaperone_sidecar::jsonrpc::{Message, Payload, forwarded_body, parse_body};
use chaperone_testenv::mcp_servers::{read_with_go, read_with_js};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::body::Bytes;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;

/// The sidecar's default body limit.
const LIMIT: usize = 1 << 20;
/// Generated cases per run (the readers read them all in one process each).
const DEFAULT_CASES: usize = 500;
/// The default seed: a fixed one, so a failure reproduces.
const DEFAULT_SEED: u64 = 0x00C4_A9E2_0DE1;

// ---- generation -------------------------------------------------------------
//
// Each way of writing a body comes as a plain spelling and hostile ones
// (weighted so that about half the bodies get through the sidecar, and the
// rest are refused for one reason or a few).

/// `Content-Type` values the sidecar accepts.
const CONTENT_TYPES_OK: &[&str] = &[
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=UTF-8",
    "application/json;charset=\"utf-8\"",
];
/// `Content-Type` values it must refuse (`""`: no header).
const CONTENT_TYPES_HOSTILE: &[&str] = &[
    "application/json; charset=utf-7",
    "application/json; charset=latin1",
    "application/json; charset=iso-8859-1",
    "application/json; charset=utf-16",
    "application/json; charset=utf-16le",
    "application/json; charset=utf-8; charset=utf-7",
    "text/plain; charset=utf-8",
    "",
];

/// Number spellings every reader holds alike (some not the shortest text).
const NUMBERS_OK: &[&str] = &[
    "100",
    "1e2",
    "1E2",
    "1.0e+2",
    "100.0",
    "100.00000000000001",
    "9007199254740992",
    "-0",
    "-0.0",
    "0",
    "0.1",
    "2.5",
    "-1",
    "5e-324",
    "1.7976931348623157e308",
];
/// Number spellings readers hold differently (rounded, beyond 2^53, out of range).
const NUMBERS_HOSTILE: &[&str] = &[
    "100.000000000000001",
    "9007199254740993",
    "-9007199254740993",
    "123456789012345678901234567890",
    "1E400",
    "-1e400",
    "1e-400",
    "4.9406564584124654e-324",
];

/// String values (JSON text) with escapes.
const STRINGS_OK: &[&str] = &[
    r#""abc""#,
    r#""x@example.com""#,
    r#""x@evil.com""#,
    r#""caf\u00e9""#,
    "\"café\"",
    r#""\ud83d\ude00""#,
    r#""a\"b\\c""#,
    r#""\/etc\/passwd""#,
    r#""tab\there""#,
    r#""\u212a""#,
    "\"\u{17f}\"",
    r#""""#,
];
/// Strings readers decode differently: NUL, lone surrogates.
const STRINGS_HOSTILE: &[&str] = &[
    r#""x@example.com\u0000@evil.com""#,
    r#""\ud800""#,
    r#""\udc00x""#,
];

/// Keys inside `arguments` that never fold together.
const ARGUMENT_KEYS_OK: &[&str] = &[
    r#""amount""#,
    r#""to""#,
    r#""id""#,
    r#""note""#,
    r#""list""#,
    r#""am\u006funt""#,
    "\"\u{212a}ind\"",
    "\"a\u{17f}k\"",
];
/// Keys that fold onto the ones above, or that JavaScript treats specially.
const ARGUMENT_KEYS_HOSTILE: &[&str] = &[
    r#""AMOUNT""#,
    r#""Amount""#,
    r#""TO""#,
    r#""kind""#,
    r#""\u212aind""#,
    r#""ask""#,
    r#""a\u017fk""#,
    r#""__proto__""#,
];

/// Spellings of the `name` member of `params` other than `name`.
const NAME_KEYS: &[&str] = &[
    r#""Name""#,
    r#""NAME""#,
    r#""nam\u0065""#,
    r#""n\u0061me""#,
    r#""\u004eame""#,
    r#""nAme""#,
];

/// Tool names.
const TOOL_NAMES_OK: &[&str] = &[
    r#""transfer""#,
    r#""tr\u0061nsfer""#,
    r#""delete_user""#,
    r#""Delete_User""#,
    r#""get_order""#,
    r#""\u0074ransfer""#,
    r#""transfer ""#,
    "\"tran\u{17f}fer\"",
    r#""""#,
];
/// Tool names the sidecar refuses (not strings, NUL).
const TOOL_NAMES_HOSTILE: &[&str] = &[r#""transfer\u0000x""#, "1", "null"];

/// Spellings of the `arguments` member of `params` other than `arguments`.
const ARGUMENTS_KEYS: &[&str] = &[
    r#""Arguments""#,
    r#""ARGUMENTS""#,
    "\"argument\u{17f}\"",
    r#""argument\u017f""#,
    r#""\u0061rguments""#,
];

/// Other members of `params`.
const EXTRA_PARAM_KEYS: &[&str] = &[
    r#""_meta""#,
    r#""extra""#,
    r#""Params""#,
    r#""URI""#,
    r#""Uri""#,
];

/// `uri` values (for `resources/read`).
const URIS: &[&str] = &[
    r#""file:///etc/passwd""#,
    r#""file:\/\/\/etc\/passwd""#,
    r#""file:///tmp/x""#,
    r#""FILE:///etc/passwd""#,
];

/// Spellings of the envelope's `method` member other than `method`.
const METHOD_KEYS: &[&str] = &[r#""Method""#, r#""METHOD""#, r#""m\u0065thod""#];

/// Methods (JSON text).
const METHODS_OK: &[&str] = &[
    r#""tools/call""#,
    r#""tools/call""#,
    r#""tools/call""#,
    r#""tools/call""#,
    r#""tools\/call""#,
    r#""tools\u002fcall""#,
    r#""tools/list""#,
    r#""prompts/get""#,
    r#""resources/read""#,
    r#""ping""#,
    r#""notifications/initialized""#,
];
/// Methods the sidecar does not forward.
const METHODS_HOSTILE: &[&str] = &[r#""Tools/Call""#, r#""tools/call ""#, r#""vendor/x""#];

/// Spellings of the envelope's `params` member other than `params`.
const PARAMS_KEYS: &[&str] = &[r#""Params""#, "\"param\u{17f}\"", r#""p\u0061rams""#];

/// Extra envelope members (`key:value`).
const EXTRA_ENVELOPE: &[&str] = &[
    r#""extra":1"#,
    r#""Id":2"#,
    r#""ID":3"#,
    r#""__proto__":{}"#,
    r#""result":{}"#,
    r#""JSONRPC":"2.0""#,
];

/// `id` values.
const IDS_OK: &[&str] = &["1", "2", "\"a\"", "null", "1.5", "1e2"];
/// `id` values the sidecar refuses.
const IDS_HOSTILE: &[&str] = &["9007199254740993", "{}", "[]"];

/// White space between tokens.
const SPACES: &[&str] = &["", "", "", " ", "\n", "\t", "\r\n  "];

fn pick(options: &'static [&'static str]) -> BoxedStrategy<String> {
    prop::sample::select(options)
        .prop_map(str::to_owned)
        .boxed()
}

/// Mostly a plain spelling, sometimes a hostile one.
fn mostly(ok: &'static [&'static str], hostile: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![12 => pick(ok), 1 => pick(hostile)].boxed()
}

/// A key: mostly `plain`, sometimes one of `variants`.
fn key(plain: &'static str, variants: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![14 => Just(plain.to_owned()), 1 => pick(variants)].boxed()
}

/// Usually one of `item`, sometimes none or two.
fn usually_one<T: std::fmt::Debug + Clone + 'static>(
    item: BoxedStrategy<T>,
) -> BoxedStrategy<Vec<T>> {
    prop_oneof![
        24 => prop::collection::vec(item.clone(), 1..=1),
        1 => Just(Vec::new()),
        1 => prop::collection::vec(item, 2..=2),
    ]
    .boxed()
}

/// Rarely one of `item`.
fn rarely<T: std::fmt::Debug + Clone + 'static>(item: BoxedStrategy<T>) -> BoxedStrategy<Vec<T>> {
    prop_oneof![12 => Just(Vec::new()), 1 => prop::collection::vec(item, 1..=1)].boxed()
}

/// Writes an object of `members` (key text, value text) with `space` around tokens.
fn object(members: &[(String, String)], space: &str) -> String {
    let mut out = String::from("{");
    for (n, (key, value)) in members.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let _ = write!(out, "{space}{key}{space}:{space}{value}{space}");
    }
    out.push('}');
    out
}

/// Members in an arbitrary order, written as an object.
fn shuffled_object(parts: Vec<Vec<(String, String)>>) -> impl Strategy<Value = String> {
    let members: Vec<(String, String)> = parts.into_iter().flatten().collect();
    (Just(members).prop_shuffle(), pick(SPACES))
        .prop_map(|(members, space)| object(&members, &space))
}

/// An object of up to `max` members with (mostly) distinct keys.
fn argument_object(value: BoxedStrategy<String>, max: usize) -> BoxedStrategy<String> {
    let member = (mostly(ARGUMENT_KEYS_OK, ARGUMENT_KEYS_HOSTILE), value);
    (prop::collection::vec(member, 0..=max), pick(SPACES))
        .prop_map(|(mut members, space)| {
            // Repeats of a plain key are left to the hostile keys' collisions.
            let mut seen = std::collections::HashSet::new();
            members.retain(|(key, _)| seen.insert(key.clone()));
            object(&members, &space)
        })
        .boxed()
}

/// Any JSON value text, nested up to depth 2.
fn json_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        3 => mostly(NUMBERS_OK, NUMBERS_HOSTILE),
        3 => mostly(STRINGS_OK, STRINGS_HOSTILE),
        1 => pick(&["true", "false", "null"]),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            argument_object(inner.clone().boxed(), 2),
            prop::collection::vec(inner, 0..3).prop_map(|items| format!("[{}]", items.join(","))),
        ]
    })
    .boxed()
}

/// An `arguments` value: usually an object.
fn arguments_value() -> BoxedStrategy<String> {
    prop_oneof![
        20 => argument_object(json_value(), 3),
        1 => json_value(),
    ]
    .boxed()
}

fn params_value() -> BoxedStrategy<String> {
    let name = (
        key(r#""name""#, NAME_KEYS),
        mostly(TOOL_NAMES_OK, TOOL_NAMES_HOSTILE),
    )
        .boxed();
    let arguments = (key(r#""arguments""#, ARGUMENTS_KEYS), arguments_value()).boxed();
    let extra = (pick(EXTRA_PARAM_KEYS), json_value()).boxed();
    let uri = (Just(r#""uri""#.to_owned()), pick(URIS)).boxed();
    prop_oneof![
        30 => (usually_one(name), usually_one(arguments), rarely(uri), rarely(extra))
            .prop_flat_map(|(names, arguments, uri, extra)| {
                shuffled_object(vec![names, arguments, uri, extra])
            }),
        1 => json_value(),
    ]
    .boxed()
}

fn message() -> BoxedStrategy<String> {
    let jsonrpc = prop_oneof![
        20 => Just((r#""jsonrpc""#.to_owned(), r#""2.0""#.to_owned())),
        1 => Just((r#""jsonrpc""#.to_owned(), r#""2\u002e0""#.to_owned())),
    ];
    let id = (Just(r#""id""#.to_owned()), mostly(IDS_OK, IDS_HOSTILE)).boxed();
    let method = (
        key(r#""method""#, METHOD_KEYS),
        mostly(METHODS_OK, METHODS_HOSTILE),
    )
        .boxed();
    let params = (key(r#""params""#, PARAMS_KEYS), params_value()).boxed();
    let extra = pick(EXTRA_ENVELOPE)
        .prop_map(|member| {
            let (key, value) = member.split_once(':').expect("key:value");
            (key.to_owned(), value.to_owned())
        })
        .boxed();
    let notification = prop_oneof![10 => Just(false), 1 => Just(true)];
    (
        jsonrpc,
        id,
        notification,
        usually_one(method),
        usually_one(params),
        rarely(extra),
    )
        .prop_flat_map(|(jsonrpc, id, notification, method, params, extra)| {
            let id = if notification { Vec::new() } else { vec![id] };
            shuffled_object(vec![vec![jsonrpc], id, method, params, extra])
        })
        .boxed()
}

/// How the body's bytes are spoiled, if at all.
#[derive(Clone, Copy, Debug)]
enum Bytewise {
    AsWritten,
    LeadingBom,
    Latin1,
    Utf16Le,
    TrailingValue,
}

/// A generated request: `Content-Type` (`None`: no header) and body.
#[derive(Clone, Debug)]
struct Case {
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

fn case() -> impl Strategy<Value = Case> {
    let content_type = prop_oneof![
        10 => prop::sample::select(CONTENT_TYPES_OK),
        1 => prop::sample::select(CONTENT_TYPES_HOSTILE),
    ]
    .prop_map(|t| (!t.is_empty()).then_some(t));
    let text = prop_oneof![
        5 => message(),
        1 => prop::collection::vec(message(), 1..=3).prop_map(|items| format!("[{}]", items.join(", "))),
    ];
    let bytewise = prop_oneof![
        40 => Just(Bytewise::AsWritten),
        1 => Just(Bytewise::LeadingBom),
        1 => Just(Bytewise::Latin1),
        1 => Just(Bytewise::Utf16Le),
        1 => Just(Bytewise::TrailingValue),
    ];
    (content_type, text, bytewise).prop_map(|(content_type, text, bytewise)| {
        let body = match bytewise {
            Bytewise::AsWritten => text.into_bytes(),
            Bytewise::LeadingBom => [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat(),
            // Characters up to U+00FF as one byte each, as a latin1 client sends them.
            Bytewise::Latin1 => text
                .chars()
                .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
                .collect(),
            Bytewise::Utf16Le => text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
            Bytewise::TrailingValue => format!("{text} {{}}").into_bytes(),
        };
        Case { content_type, body }
    })
}

/// Hand-written cases: each spelling the brief names, whether or not a run
/// generates it.
fn fixed_cases() -> Vec<Case> {
    let call = |params: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#)
    };
    let bodies = [
        call(r#"{"name":"transfer","arguments":{"to":"a","amount":1e2}}"#),
        call(r#"{"name":"transfer","arguments":{"amount":100.0}}"#),
        call(r#"{"name":"transfer","arguments":{"amount":100.00000000000001}}"#),
        call(r#"{"name":"transfer","arguments":{"amount":100.000000000000001}}"#),
        call(r#"{"name":"transfer","arguments":{"amount":9007199254740993}}"#),
        call(r#"{"name":"transfer","arguments":{"amount":-0}}"#),
        call(r#"{"name":"transfer","arguments":{"amount":1E400}}"#),
        call(r#"{"name":"transfer","Name":"delete_user","arguments":{}}"#),
        call(r#"{"Name":"delete_user","name":"transfer"}"#),
        call(r#"{"name":"transfer","nam\u0065":"delete_user"}"#),
        call(r#"{"NAME":"delete_user"}"#),
        call(r#"{"name":"transfer","arguments":{"amount":50},"Arguments":{"amount":5000}}"#),
        call(r#"{"name":"transfer","Arguments":{"amount":5000}}"#),
        call("{\"name\":\"transfer\",\"argument\u{17f}\":{\"amount\":5000}}"),
        call("{\"name\":\"transfer\",\"arguments\":{\"kind\":1,\"\u{212a}ind\":2}}"),
        call("{\"name\":\"transfer\",\"arguments\":{\"ask\":1,\"a\u{17f}k\":2}}"),
        call(r#"{"name":"tr\u0061nsfer","arguments":{"to":"x@example.com\u0000@evil.com"}}"#),
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"delete_user"}}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"delete_user"}}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer"},"Params":{"name":"delete_user"}}"#.to_owned(),
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":1}}},{"jsonrpc":"2.0","id":2,"method":"nope"}]"#.to_owned(),
    ];
    let mut cases: Vec<Case> = bodies
        .into_iter()
        .map(|body| Case {
            content_type: Some("application/json"),
            body: body.into_bytes(),
        })
        .collect();
    let plain = call(r#"{"name":"transfer","arguments":{"to":"caf\u00e9"}}"#);
    for content_type in CONTENT_TYPES_OK.iter().chain(CONTENT_TYPES_HOSTILE) {
        cases.push(Case {
            content_type: (!content_type.is_empty()).then_some(*content_type),
            body: plain.clone().into_bytes(),
        });
    }
    cases
}

fn generated_cases() -> Result<(u64, Vec<Case>)> {
    let seed = match std::env::var("CHAPERONE_DIFF_SEED") {
        Ok(text) => text.parse().context("CHAPERONE_DIFF_SEED must be a u64")?,
        Err(_) => DEFAULT_SEED,
    };
    let count = match std::env::var("CHAPERONE_DIFF_CASES") {
        Ok(text) => text
            .parse()
            .context("CHAPERONE_DIFF_CASES must be a number")?,
        Err(_) => DEFAULT_CASES,
    };
    let seed_bytes: Vec<u8> = (0..4).flat_map(|_| seed.to_le_bytes()).collect();
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = case();
    let cases = (0..count)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .map(|tree| tree.current())
                .map_err(|e| anyhow::anyhow!("generating a case: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((seed, cases))
}

// ---- the sidecar's side ----------------------------------------------------

/// What the sidecar decided on for one forwarded message.
#[derive(Debug)]
struct Decided {
    /// The whole message as the sidecar holds it.
    raw: Value,
    method: String,
    /// For a governed call, what the rules saw.
    call: Option<Call>,
}

/// The decision input of a governed call.
#[derive(Debug)]
struct Call {
    /// The `params` member naming the target: `name` (tools, prompts) or
    /// `uri` (resources).
    field: &'static str,
    /// Its value (without the policy prefix `prompt:` or `resource:`).
    target: String,
    /// The arguments the rules saw; `None` for resources, which have none.
    arguments: Option<Option<Value>>,
}

/// The sidecar's outcome for a case.
#[derive(Debug)]
enum Outcome {
    /// Refused: where (`intake`, `parse <label>`, `classify`).
    Refused(String),
    Forwarded {
        bytes: Bytes,
        batch: bool,
        messages: Vec<Decided>,
        /// For a batch, each forwarded member's bytes (what a Go server
        /// decodes after splitting the array).
        members: Vec<Bytes>,
    },
}

/// The sidecar's intake, parse and classification of `case`, as the proxy
/// runs them (every governed call taken as allowed: the decision's input is
/// what is compared, not the policy).
fn sidecar(case: &Case) -> Outcome {
    let mut headers = HeaderMap::new();
    if let Some(content_type) = case.content_type {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if check_body_headers(&headers).is_err() {
        return Outcome::Refused("intake".to_owned());
    }
    let bytes = Bytes::from(case.body.clone());
    let parsed = match parse_body(&bytes, LIMIT) {
        Ok(parsed) => parsed,
        Err(err) => return Outcome::Refused(format!("parse {}", err.label())),
    };
    let (messages, batch): (&[Message], bool) = match &parsed.payload {
        Payload::Single(message) => (std::slice::from_ref(message), false),
        Payload::Batch(messages) => (messages, true),
    };
    let mut kept = Vec::new();
    let mut decided = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        let method = message.method().unwrap_or_default().to_owned();
        let call = match classify(message, message_era(message, None), &[]) {
            Governed::Malformed(_) | Governed::NotForwarded(_) => continue,
            Governed::Pass | Governed::List | Governed::Task { .. } => None,
            Governed::Call { name, arguments } => Some(match method.as_str() {
                "prompts/get" => Call {
                    field: "name",
                    target: name.strip_prefix(PROMPT_PREFIX).unwrap_or(&name).to_owned(),
                    arguments: Some(arguments.cloned()),
                },
                "tools/call" => Call {
                    field: "name",
                    target: name,
                    arguments: Some(arguments.cloned()),
                },
                _ => Call {
                    field: "uri",
                    target: name
                        .strip_prefix(RESOURCE_PREFIX)
                        .unwrap_or(&name)
                        .to_owned(),
                    arguments: None,
                },
            }),
        };
        kept.push(index);
        decided.push(Decided {
            raw: message.raw().clone(),
            method,
            call,
        });
    }
    if kept.is_empty() {
        return Outcome::Refused("classify".to_owned());
    }
    let forwarded = forwarded_body(&bytes, &parsed, &kept);
    let members = if batch {
        let again = parse_body(&forwarded, LIMIT).expect("the sidecar re-reads what it forwards");
        again
            .spans
            .iter()
            .map(|span| forwarded.slice(span.clone()))
            .collect()
    } else {
        Vec::new()
    };
    Outcome::Forwarded {
        bytes: forwarded,
        batch,
        messages: decided,
        members,
    }
}

// ---- comparison -------------------------------------------------------------

/// Every number a reader reported (`numbers`: JSON pointer → its text) is,
/// read as a double, the sidecar's number at that pointer in `held`.
fn numbers_agree(numbers: &Value, held: &Value, reader: &str, problems: &mut Vec<String>) {
    let Some(numbers) = numbers.as_object() else {
        return;
    };
    for (pointer, text) in numbers {
        let text = text.as_str().unwrap_or_default();
        let theirs: Option<f64> = match text {
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => text.parse().ok(),
        };
        let ours = held.pointer(pointer).and_then(Value::as_f64);
        if theirs.is_none() || theirs != ours {
            problems.push(format!(
                "{reader}: the number at {pointer:?} is {text} there, {ours:?} in the sidecar"
            ));
        }
    }
}

/// A reading of the whole message (Node's, or Go's map) against the sidecar's.
fn compare_document(
    reader: &str,
    value: &Value,
    numbers: Option<&Value>,
    decided: &Decided,
    problems: &mut Vec<String>,
) {
    if !chaperone_json::same_meaning(value, &decided.raw) {
        problems.push(format!(
            "{reader} reads {value} where the sidecar read {}",
            decided.raw
        ));
    }
    if let Some(numbers) = numbers {
        numbers_agree(numbers, &decided.raw, reader, problems);
    }
    let method = value.get("method").and_then(Value::as_str);
    if method != Some(decided.method.as_str()) {
        problems.push(format!(
            "{reader} method {method:?}, sidecar {:?}",
            decided.method
        ));
    }
    if let Some(call) = &decided.call {
        let params = value.get("params");
        let theirs = params.and_then(|p| p.get(call.field));
        if theirs.and_then(Value::as_str) != Some(call.target.as_str()) {
            problems.push(format!(
                "{reader} params.{} {theirs:?}, sidecar {:?}",
                call.field, call.target
            ));
        }
        let Some(arguments) = &call.arguments else {
            return;
        };
        let their_arguments = params.and_then(|p| p.get("arguments"));
        let agree = match (their_arguments, arguments) {
            (None, None) => true,
            (Some(a), Some(b)) => chaperone_json::same_meaning(a, b),
            _ => false,
        };
        if !agree {
            problems.push(format!(
                "{reader} arguments {their_arguments:?}, sidecar {arguments:?}"
            ));
        }
    }
}

/// Go's struct binding (`{"ok","method","name","arguments","numbers"}`).
fn compare_go_struct(reading: &Value, decided: &Decided, problems: &mut Vec<String>) {
    if reading["ok"] != Value::Bool(true) {
        // Go refuses to bind it: a Go server executes nothing.
        return;
    }
    let method = reading["method"].as_str().unwrap_or_default();
    if method != decided.method {
        problems.push(format!(
            "go struct binds method {method:?}, sidecar {:?}",
            decided.method
        ));
    }
    // The struct binds `name` and `arguments` (not a resource's `uri`).
    let Some(Call {
        field: "name",
        target: name,
        arguments: Some(arguments),
    }) = &decided.call
    else {
        return;
    };
    let bound_name = reading["name"].as_str().unwrap_or_default();
    if bound_name != name {
        problems.push(format!(
            "go struct binds name {bound_name:?}, sidecar {name:?}"
        ));
    }
    let bound = &reading["arguments"];
    let agree = match arguments {
        None => bound.is_null(),
        Some(ours) => chaperone_json::same_meaning(bound, ours),
    };
    if !agree {
        problems.push(format!(
            "go struct binds arguments {bound}, sidecar {arguments:?}"
        ));
    }
    if let Some(ours) = arguments {
        numbers_agree(&reading["numbers"], ours, "go struct (arguments)", problems);
    }
}

/// Go's two readings of one message's bytes.
fn compare_go(reading: &Value, decided: &Decided, problems: &mut Vec<String>) {
    let map = &reading["map"];
    if map["ok"] == Value::Bool(true) {
        compare_document(
            "go map",
            &map["value"],
            Some(&map["numbers"]),
            decided,
            problems,
        );
    } else {
        problems.push(format!(
            "go map refuses what the sidecar forwarded: {}",
            map["error"]
        ));
    }
    compare_go_struct(&reading["struct"], decided, problems);
}

fn describe(case: &Case) -> String {
    format!(
        "Content-Type {:?}, body {:?}",
        case.content_type,
        String::from_utf8_lossy(&case.body)
    )
}

/// What a run of cases found.
#[derive(Default)]
struct Report {
    /// Refusals by where the sidecar refused.
    refused: BTreeMap<String, usize>,
    forwarded: usize,
    /// Forwarded messages by method.
    methods: BTreeMap<String, usize>,
    /// Cases read differently, with what differs.
    disagreeing: Vec<String>,
}

/// Runs `cases` through the sidecar, then every forwarded body through the
/// Go and Node readers (one process each), and compares.
fn differential(cases: &[Case]) -> Result<Report> {
    let outcomes: Vec<Outcome> = cases.iter().map(sidecar).collect();
    // Go reads single bodies and each forwarded batch member (a Go server
    // splits a batch into raw members first); Node reads every forwarded body.
    let mut go_bodies: Vec<Bytes> = Vec::new();
    let mut js_bodies: Vec<Bytes> = Vec::new();
    for outcome in &outcomes {
        if let Outcome::Forwarded {
            bytes,
            batch,
            members,
            ..
        } = outcome
        {
            js_bodies.push(bytes.clone());
            if *batch {
                go_bodies.extend(members.iter().cloned());
            } else {
                go_bodies.push(bytes.clone());
            }
        }
    }
    let go = read_with_go(&go_bodies)?;
    let js = read_with_js(&js_bodies)?;

    let mut report = Report::default();
    let (mut go_at, mut js_at) = (0, 0);
    for (case, outcome) in cases.iter().zip(&outcomes) {
        let (batch, messages) = match outcome {
            Outcome::Refused(stage) => {
                *report.refused.entry(stage.clone()).or_default() += 1;
                continue;
            }
            Outcome::Forwarded {
                batch, messages, ..
            } => (*batch, messages),
        };
        report.forwarded += 1;
        for decided in messages {
            *report.methods.entry(decided.method.clone()).or_default() += 1;
        }
        let mut problems = Vec::new();
        let js_reading = &js[js_at];
        js_at += 1;
        if js_reading["ok"] != Value::Bool(true) {
            problems.push(format!(
                "node refuses what the sidecar forwarded: {}",
                js_reading["error"]
            ));
        } else if batch {
            let items = js_reading["value"].as_array().cloned().unwrap_or_default();
            if items.len() != messages.len() {
                problems.push(format!(
                    "node reads {} batch members, the sidecar forwarded {}",
                    items.len(),
                    messages.len()
                ));
            }
            for (item, decided) in items.iter().zip(messages) {
                compare_document("node", item, None, decided, &mut problems);
            }
        } else {
            compare_document(
                "node",
                &js_reading["value"],
                Some(&js_reading["numbers"]),
                &messages[0],
                &mut problems,
            );
        }
        for decided in messages {
            compare_go(&go[go_at], decided, &mut problems);
            go_at += 1;
        }
        if !problems.is_empty() {
            report.disagreeing.push(format!(
                "{}\n    {}",
                describe(case),
                problems.join("\n    ")
            ));
        }
    }
    Ok(report)
}

#[test]
fn sidecar_decides_on_what_go_and_node_read() -> Result<()> {
    let started = Instant::now();
    let (seed, generated) = generated_cases()?;
    let cases: Vec<Case> = fixed_cases().into_iter().chain(generated).collect();
    let report = differential(&cases)?;
    eprintln!(
        "parser differential: {} cases (seed {seed}) in {:.1?}: {} forwarded ({:?}), refused {:?}; {} disagreeing",
        cases.len(),
        started.elapsed(),
        report.forwarded,
        report.methods,
        report.refused,
        report.disagreeing.len(),
    );
    assert!(
        report.disagreeing.is_empty(),
        "{} forwarded bodies are read differently by Go or Node than the sidecar decided them (seed {seed}); the first ones:\n{}",
        report.disagreeing.len(),
        report
            .disagreeing
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Enough bodies get through for the comparison to mean something.
    assert!(
        report.forwarded * 4 >= cases.len(),
        "only {} of {} cases forwarded: the generator is too hostile",
        report.forwarded,
        cases.len()
    );
    Ok(())
}

/// A `params` member that only folds to `arguments` (which Go's binding reads
/// as the arguments) is refused, or is what the sidecar decided on.
#[test]
fn go_binds_no_arguments_the_sidecar_did_not_decide_on() -> Result<()> {
    let cases: Vec<Case> = [
        r#"{"name":"transfer","Arguments":{"amount":5000}}"#,
        r#"{"name":"transfer","ARGUMENTS":{"amount":5000}}"#,
        "{\"name\":\"transfer\",\"argument\u{17f}\":{\"amount\":5000}}",
    ]
    .into_iter()
    .map(|params| Case {
        content_type: Some("application/json"),
        body: format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#)
            .into_bytes(),
    })
    .collect();
    let report = differential(&cases)?;
    assert_eq!(report.forwarded, 0, "refused: {:?}", report.refused);
    assert!(
        report.disagreeing.is_empty(),
        "{}",
        report.disagreeing.join("\n")
    );
    Ok(())
}
