//! Strict JSON-RPC 2.0 parsing of MCP messages.
//!
//! A gateway that reads a message differently from the upstream server is a bypass
//! (a "parser differential"): if the sidecar saw the last of two `name` keys and
//! the server the first, a denied tool could be called under an allowed name. So
//! bodies are read with [`chaperone_json`], which refuses anything two mainstream
//! JSON readers could disagree on (duplicate or case-colliding keys, inexact
//! numbers, invalid UTF-8, lone surrogates, trailing data, oversize bodies), and
//! messages must be plain JSON-RPC 2.0 envelopes: no members besides `jsonrpc`,
//! `id`, `method`, `params` (requests and notifications) or `jsonrpc`, `id`,
//! `result`, `error` (responses). What it cannot parse is never forwarded.

use std::ops::Range;

use chaperone_json::{JsonError, Limits};
use serde_json::{Map, Value};
use thiserror::Error;

/// JSON-RPC error code: the body is not valid JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC error code: the JSON is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC error code: the method does not exist (or is not forwarded).
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC error code: the params of a known method cannot be read.
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC error code: internal error (used for "no snapshot yet" and upstream failures).
pub const INTERNAL_ERROR: i64 = -32603;
/// JSON-RPC error code of a call refused by policy (implementation-defined range).
pub const POLICY_DENIED: i64 = -32001;
/// JSON-RPC error code of a call refused by a rate or session limit.
pub const LIMIT_EXCEEDED: i64 = -32002;
/// JSON-RPC error code while the sidecar has no snapshot (fail closed).
pub const NOT_READY: i64 = -32003;
/// JSON-RPC error code of a call that waits for a person's approval (or lost
/// its wait): retry the same call (the error data names the approval).
pub const APPROVAL_PENDING: i64 = -32004;
/// MCP `HeaderMismatch` (revision 2026-07-28): the request's MCP headers are
/// missing or disagree with its body.
pub const HEADER_MISMATCH: i64 = -32020;

/// Why a body could not be read as JSON-RPC.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// The body is not strict JSON (see [`chaperone_json`]).
    #[error(transparent)]
    Json(#[from] JsonError),
    /// The JSON is not a JSON-RPC 2.0 message.
    #[error("not a JSON-RPC 2.0 message: {0}")]
    InvalidMessage(&'static str),
    /// The message has a member JSON-RPC 2.0 does not define.
    #[error("not a JSON-RPC 2.0 message: unknown member {0:?}")]
    UnknownMember(String),
}

impl ParseError {
    /// The JSON-RPC error code of this refusal.
    pub fn code(&self) -> i64 {
        match self {
            ParseError::InvalidMessage(_) | ParseError::UnknownMember(_) => INVALID_REQUEST,
            ParseError::Json(_) => PARSE_ERROR,
        }
    }

    /// A short label for metrics and audit records.
    pub fn label(&self) -> &'static str {
        match self {
            ParseError::Json(JsonError::TooLarge { .. }) => "too_large",
            ParseError::Json(JsonError::DuplicateKey { .. }) => "duplicate_key",
            ParseError::Json(JsonError::CaseCollision { .. }) => "case_colliding_keys",
            ParseError::Json(JsonError::AmbiguousNumber { .. }) => "ambiguous_number",
            ParseError::Json(_) => "unparseable",
            ParseError::InvalidMessage(_) | ParseError::UnknownMember(_) => "invalid_message",
        }
    }
}

/// Parses `bytes` as one JSON value, strictly (see [`chaperone_json`]).
pub fn parse_strict(bytes: &[u8], limit: usize) -> Result<Value, ParseError> {
    Ok(chaperone_json::parse(bytes, Limits::bytes(limit))?)
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

/// A POST body, parsed: its messages and, for a batch, each message's bytes
/// in the body (so a batch that loses members is forwarded as the remaining
/// members' original bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct Body {
    /// The messages.
    pub payload: Payload,
    /// For a batch, each message's byte range in the body.
    pub spans: Vec<Range<usize>>,
}

/// Parses a POST body into JSON-RPC messages, strictly.
pub fn parse_payload(bytes: &[u8], limit: usize) -> Result<Payload, ParseError> {
    parse_body(bytes, limit).map(|body| body.payload)
}

/// Parses a POST body into JSON-RPC messages, strictly, keeping batch spans.
pub fn parse_body(bytes: &[u8], limit: usize) -> Result<Body, ParseError> {
    let document = chaperone_json::parse_document(bytes, Limits::bytes(limit))?;
    let payload = match document.value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ParseError::InvalidMessage("empty batch"));
            }
            let messages = items
                .into_iter()
                .map(classify_message)
                .collect::<Result<Vec<_>, _>>()?;
            Payload::Batch(messages)
        }
        value => Payload::Single(classify_message(value)?),
    };
    Ok(Body {
        payload,
        spans: document.item_spans,
    })
}

/// The body that forwards the members `kept` (indices into the batch) of a
/// body parsed by [`parse_body`]: the original bytes when all are kept, else a
/// batch of the kept members' original bytes.
pub fn forwarded_body(bytes: &bytes::Bytes, body: &Body, kept: &[usize]) -> bytes::Bytes {
    let total = match &body.payload {
        Payload::Single(_) => 1,
        Payload::Batch(messages) => messages.len(),
    };
    if kept.len() == total || body.spans.is_empty() {
        return bytes.clone();
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.push(b'[');
    for (n, index) in kept.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        if let Some(span) = body.spans.get(*index) {
            out.extend_from_slice(&bytes[span.clone()]);
        }
    }
    out.push(b']');
    bytes::Bytes::from(out)
}

/// Classifies one parsed value as a JSON-RPC 2.0 message.
pub fn classify_message(value: Value) -> Result<Message, ParseError> {
    let Value::Object(object) = &value else {
        return Err(ParseError::InvalidMessage(
            "a message must be a JSON object",
        ));
    };
    let is_call = object.contains_key("method");
    if is_call && (object.contains_key("result") || object.contains_key("error")) {
        return Err(ParseError::InvalidMessage(
            "a message cannot carry both a method and a result or error",
        ));
    }
    let defined = |key: &str| match key {
        "jsonrpc" | "id" => true,
        "method" | "params" => is_call,
        "result" | "error" => !is_call,
        _ => false,
    };
    if let Some(unknown) = object.keys().find(|key| !defined(key)) {
        return Err(ParseError::UnknownMember(unknown.clone()));
    }
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
#[path = "jsonrpc_tests.rs"]
mod tests;
