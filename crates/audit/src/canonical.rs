//! Canonical JSON and SHA-256 digests of it.
//!
//! The argument digest in assertions and audit records, and the hash chain of
//! audit records, must not depend on key order or whitespace: object keys are
//! sorted by their UTF-8 bytes, no whitespace is written, strings and numbers are
//! written as `serde_json` writes them. This does not rely on `serde_json`'s map
//! order, which a `preserve_order` feature elsewhere in a build could change.

use std::fmt::Write as _;

use aws_lc_rs::digest;
use serde_json::Value;

/// Appends the canonical form of `value` to `out`.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(number) => {
            let _ = write!(out, "{number}");
        }
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(object) => {
            let mut entries: Vec<(&String, &Value)> = object.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
    }
}

fn write_string(text: &str, out: &mut String) {
    // Serialising a string cannot fail; fall back to an empty string regardless.
    match serde_json::to_string(text) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// The canonical form of `value`.
pub fn canonical(value: &Value) -> String {
    let mut out = String::with_capacity(128);
    write_canonical(value, &mut out);
    out
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = digest::digest(&digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// `sha256:` and the lowercase hex SHA-256 of the canonical form of `value`
/// (`arguments` absent counts as `{}`).
pub fn args_digest(value: Option<&Value>) -> String {
    let empty = Value::Object(serde_json::Map::new());
    let canonical = canonical(value.unwrap_or(&empty));
    format!("sha256:{}", hex(&sha256(canonical.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_at_every_depth() {
        let value = json!({"b": 1, "a": {"d": [1, {"z": null, "y": true}], "c": "x"}});
        assert_eq!(
            canonical(&value),
            r#"{"a":{"c":"x","d":[1,{"y":true,"z":null}]},"b":1}"#
        );
    }

    #[test]
    fn digest_ignores_key_order() {
        let a = json!({"amount": 10, "order": "o-1"});
        let b = json!({"order": "o-1", "amount": 10});
        assert_eq!(args_digest(Some(&a)), args_digest(Some(&b)));
        assert_ne!(args_digest(Some(&a)), args_digest(None));
        assert!(args_digest(None).starts_with("sha256:"));
    }
}
