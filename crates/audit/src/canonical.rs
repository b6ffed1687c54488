//! Canonical JSON and SHA-256 digests of it.
//!
//! The argument digest in assertions and audit records, and the hash chain of
//! audit records, must not depend on key order or whitespace: object keys are
//! sorted by their UTF-8 bytes, no whitespace is written, strings and numbers are
//! written as `serde_json` writes them. This does not rely on `serde_json`'s map
//! order, which a `preserve_order` feature elsewhere in a build could change.

use std::io::{self, Write};

use aws_lc_rs::digest;
use serde_json::Value;

/// Writes the canonical form of `value` to `out`.
fn emit<W: Write>(value: &Value, out: &mut W) -> io::Result<()> {
    match value {
        Value::Null => out.write_all(b"null"),
        Value::Bool(true) => out.write_all(b"true"),
        Value::Bool(false) => out.write_all(b"false"),
        Value::Number(number) => write!(out, "{number}"),
        // Escaped exactly as `serde_json::to_string` escapes it.
        Value::String(text) => serde_json::to_writer(&mut *out, text).map_err(io::Error::from),
        Value::Array(items) => {
            out.write_all(b"[")?;
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.write_all(b",")?;
                }
                emit(item, out)?;
            }
            out.write_all(b"]")
        }
        Value::Object(object) => {
            let mut entries: Vec<(&String, &Value)> = object.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.write_all(b"{")?;
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.write_all(b",")?;
                }
                serde_json::to_writer(&mut *out, key).map_err(io::Error::from)?;
                out.write_all(b":")?;
                emit(item, out)?;
            }
            out.write_all(b"}")
        }
    }
}

/// Appends the canonical form of `value` to `out`.
pub fn write_canonical(value: &Value, out: &mut String) {
    let mut bytes = Vec::with_capacity(128);
    // Writing to a `Vec` cannot fail, and what is written is UTF-8 (JSON text
    // produced from Rust strings).
    if emit(value, &mut bytes).is_ok() {
        out.push_str(&String::from_utf8_lossy(&bytes));
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
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(bytes, &mut out);
    out
}

fn push_hex(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
}

/// Feeds what is written into a SHA-256 computation.
struct Sha256Writer(digest::Context);

impl Write for Sha256Writer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `sha256:` and the lowercase hex SHA-256 of the canonical form of `value`
/// (`arguments` absent counts as `{}`). The canonical form is hashed as it is
/// written, never held whole.
pub fn args_digest(value: Option<&Value>) -> String {
    let mut hasher = Sha256Writer(digest::Context::new(&digest::SHA256));
    match value {
        // Hashing cannot fail.
        Some(value) => {
            let _ = emit(value, &mut hasher);
        }
        None => hasher.0.update(b"{}"),
    }
    let digest = hasher.0.finish();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    push_hex(digest.as_ref(), &mut out);
    out
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
        // Streamed hashing gives the digest of the canonical text.
        let expected = format!("sha256:{}", hex(&sha256(canonical(&a).as_bytes())));
        assert_eq!(args_digest(Some(&a)), expected);
        let empty = format!("sha256:{}", hex(&sha256(b"{}")));
        assert_eq!(args_digest(None), empty);
        let escaped = json!({"k\u{1}\"": "line\nbreak \u{2028} é"});
        assert_eq!(
            canonical(&escaped),
            serde_json::to_string(&escaped).unwrap()
        );
    }
}
