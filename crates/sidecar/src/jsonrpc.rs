//! Strict JSON-RPC 2.0 parsing of MCP messages.
//!
//! A gateway that reads a message differently from the upstream server is a bypass
//! (a "parser differential"): if the sidecar saw the last of two `name` keys and
//! the server the first, a denied tool could be called under an allowed name. So
//! this parser refuses anything two JSON parsers could disagree on: duplicate
//! object keys (at any depth), invalid UTF-8, lone surrogates, trailing data, and
//! bodies over the configured limit. What it cannot parse is never forwarded.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use thiserror::Error;

/// JSON-RPC error code: the body is not valid JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC error code: the JSON is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC error code: internal error (used for "no snapshot yet" and upstream failures).
pub const INTERNAL_ERROR: i64 = -32603;
/// JSON-RPC error code of a call refused by policy (implementation-defined range).
pub const POLICY_DENIED: i64 = -32001;
/// JSON-RPC error code of a call refused by a rate or session limit.
pub const LIMIT_EXCEEDED: i64 = -32002;
/// JSON-RPC error code while the sidecar has no snapshot (fail closed).
pub const NOT_READY: i64 = -32003;

/// Why a body could not be read as JSON-RPC.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// The body is larger than the configured limit.
    #[error("message body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The body is not UTF-8.
    #[error("message body is not valid UTF-8")]
    InvalidUtf8,
    /// An object repeats a key.
    #[error("duplicate object key {key:?} in message")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// The body is not JSON.
    #[error("message body is not valid JSON: {0}")]
    Syntax(String),
    /// The JSON is not a JSON-RPC 2.0 message.
    #[error("not a JSON-RPC 2.0 message: {0}")]
    InvalidMessage(&'static str),
}

impl ParseError {
    /// The JSON-RPC error code of this refusal.
    pub fn code(&self) -> i64 {
        match self {
            ParseError::InvalidMessage(_) => INVALID_REQUEST,
            _ => PARSE_ERROR,
        }
    }
}

/// Parses `bytes` as one JSON value, refusing duplicate keys anywhere in it.
pub fn parse_strict(bytes: &[u8], limit: usize) -> Result<Value, ParseError> {
    if bytes.len() > limit {
        return Err(ParseError::TooLarge { limit });
    }
    // serde_json checks UTF-8 inside strings only; check the whole body so that
    // no byte outside a string can be read differently either.
    let text = std::str::from_utf8(bytes).map_err(|_| ParseError::InvalidUtf8)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = StrictSeed.deserialize(&mut de).map_err(classify)?;
    de.end().map_err(classify)?;
    Ok(value)
}

const DUPLICATE_MARKER: &str = "chaperone-duplicate-key:";

fn classify(err: serde_json::Error) -> ParseError {
    let text = err.to_string();
    match text.find(DUPLICATE_MARKER) {
        Some(at) => {
            let rest = &text[at + DUPLICATE_MARKER.len()..];
            let key = rest.split(" at line").next().unwrap_or(rest).to_owned();
            ParseError::DuplicateKey { key }
        }
        None => ParseError::Syntax(text),
    }
}

struct StrictSeed;

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(StrictSeed)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE_MARKER}{key}")));
            }
            let value = map.next_value_seed(StrictSeed)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// A JSON-RPC request or notification id.
pub type Id = Value;

/// One JSON-RPC message, classified.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// A request: has `method` and `id`.
    Request {
        /// The id the response will carry.
        id: Id,
        /// The method called.
        method: String,
        /// The whole message object.
        raw: Value,
    },
    /// A notification: has `method`, no `id`.
    Notification {
        /// The method.
        method: String,
        /// The whole message object.
        raw: Value,
    },
    /// A response (to a server-to-client request): has `id` and `result` or `error`.
    Response {
        /// The whole message object.
        raw: Value,
    },
}

impl Message {
    /// The method of a request or notification.
    pub fn method(&self) -> Option<&str> {
        match self {
            Message::Request { method, .. } | Message::Notification { method, .. } => Some(method),
            Message::Response { .. } => None,
        }
    }

    /// The whole message object.
    pub fn raw(&self) -> &Value {
        match self {
            Message::Request { raw, .. }
            | Message::Notification { raw, .. }
            | Message::Response { raw } => raw,
        }
    }

    /// The `params` member, if any.
    pub fn params(&self) -> Option<&Value> {
        self.raw().get("params")
    }
}

/// A POST body: one message or a batch (protocol revision 2025-03-26).
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// One message.
    Single(Message),
    /// A non-empty batch.
    Batch(Vec<Message>),
}

/// Parses a POST body into JSON-RPC messages, strictly.
pub fn parse_payload(bytes: &[u8], limit: usize) -> Result<Payload, ParseError> {
    match parse_strict(bytes, limit)? {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ParseError::InvalidMessage("empty batch"));
            }
            let messages = items
                .into_iter()
                .map(classify_message)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Payload::Batch(messages))
        }
        value => Ok(Payload::Single(classify_message(value)?)),
    }
}

/// Classifies one parsed value as a JSON-RPC 2.0 message.
pub fn classify_message(value: Value) -> Result<Message, ParseError> {
    let Value::Object(object) = &value else {
        return Err(ParseError::InvalidMessage(
            "a message must be a JSON object",
        ));
    };
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(ParseError::InvalidMessage("\"jsonrpc\" must be \"2.0\""));
    }
    let id = object.get("id");
    if let Some(id) = id
        && !(id.is_string() || id.is_number() || id.is_null())
    {
        return Err(ParseError::InvalidMessage(
            "\"id\" must be a string or a number",
        ));
    }
    match object.get("method") {
        Some(Value::String(method)) => {
            if let Some(params) = object.get("params")
                && !(params.is_object() || params.is_array())
            {
                return Err(ParseError::InvalidMessage(
                    "\"params\" must be an object or an array",
                ));
            }
            let method = method.clone();
            match id {
                Some(id) => Ok(Message::Request {
                    id: id.clone(),
                    method,
                    raw: value,
                }),
                None => Ok(Message::Notification { method, raw: value }),
            }
        }
        Some(_) => Err(ParseError::InvalidMessage("\"method\" must be a string")),
        None => {
            let has_result = object.contains_key("result");
            let has_error = object.contains_key("error");
            if id.is_none() || has_result == has_error {
                return Err(ParseError::InvalidMessage(
                    "a response carries an id and exactly one of result or error",
                ));
            }
            Ok(Message::Response { raw: value })
        }
    }
}

/// A JSON-RPC error response object for `id` (`null` when unknown).
pub fn error_response(id: Option<&Id>, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = Map::new();
    error.insert("code".to_owned(), Value::from(code));
    error.insert("message".to_owned(), Value::String(message.to_owned()));
    if let Some(data) = data {
        error.insert("data".to_owned(), data);
    }
    let mut response = Map::new();
    response.insert("jsonrpc".to_owned(), Value::String("2.0".to_owned()));
    response.insert("id".to_owned(), id.cloned().unwrap_or(Value::Null));
    response.insert("error".to_owned(), Value::Object(error));
    Value::Object(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    #[test]
    fn parses_a_tools_call_request() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get","arguments":{"a":1}}}"#;
        let Payload::Single(Message::Request { id, method, raw }) =
            parse_payload(body, LIMIT).unwrap()
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
            Err(ParseError::DuplicateKey {
                key: "method".to_owned()
            })
        );
    }

    #[test]
    fn rejects_duplicate_nested_keys() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":1,"x":2}}}"#;
        assert!(matches!(
            parse_payload(body, LIMIT),
            Err(ParseError::DuplicateKey { key }) if key == "x"
        ));
    }

    #[test]
    fn rejects_escaped_duplicate_keys() {
        // "name" and "n\u0061me" are the same key once unescaped.
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","n\u0061me":"b"}}"#;
        assert!(matches!(
            parse_payload(body, LIMIT),
            Err(ParseError::DuplicateKey { .. })
        ));
    }

    #[test]
    fn rejects_invalid_utf8() {
        let body = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"x\":\"\xff\"}";
        assert_eq!(parse_payload(body, LIMIT), Err(ParseError::InvalidUtf8));
    }

    #[test]
    fn rejects_lone_surrogates() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping","x":"\ud800"}"#;
        assert!(matches!(
            parse_payload(body, LIMIT),
            Err(ParseError::Syntax(_))
        ));
    }

    #[test]
    fn rejects_oversize_bodies() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        assert_eq!(
            parse_payload(body, 10),
            Err(ParseError::TooLarge { limit: 10 })
        );
    }

    #[test]
    fn rejects_trailing_data() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping"} {"x":1}"#;
        assert!(matches!(
            parse_payload(body, LIMIT),
            Err(ParseError::Syntax(_))
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
}
