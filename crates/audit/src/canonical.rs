//! Canonical JSON (RFC 8785, the JSON Canonicalization Scheme) and SHA-256
//! digests of it.
//!
//! The argument digest in assertions and audit records, and the hash chain of
//! audit records, must not depend on key order, whitespace or how a number was
//! spelled, and a tool server in any language must be able to recompute them
//! with an off-the-shelf JCS library. So the form is exactly RFC 8785:
//! - object members sorted by their names as UTF-16 code units (not UTF-8
//!   bytes: a name with a character above U+FFFF sorts before one in
//!   U+E000..U+FFFF);
//! - every number is the IEEE double it denotes, written as ECMAScript's
//!   `Number.prototype.toString` writes it (`1e2` and `100.0` as `100`, `-0`
//!   as `0`, `1e21` as `1e+21`), integers included;
//! - strings escape only `"`, `\` and the control characters (`\b` `\t` `\n`
//!   `\f` `\r`, the others as lowercase `\u00xx`); everything else is written
//!   as its UTF-8;
//! - no whitespace.
//!
//! This does not rely on `serde_json`'s map order, which a `preserve_order`
//! feature elsewhere in a build could change, nor on its number or string
//! formatting.

use std::fmt::Write as _;
use std::io::{self, Write};

use aws_lc_rs::digest;
use chaperone_json::plain_string_len;
use serde_json::{Number, Value};

/// What the `argsAlg` claim of an assertion names: `args` is [`args_digest`],
/// SHA-256 of the RFC 8785 form of the call's arguments.
pub const ARGS_DIGEST_ALG: &str = "sha256-rfc8785";

/// Writes the canonical form of `value` to `out`.
fn emit<W: Write>(value: &Value, out: &mut W) -> io::Result<()> {
    match value {
        Value::Null => out.write_all(b"null"),
        Value::Bool(true) => out.write_all(b"true"),
        Value::Bool(false) => out.write_all(b"false"),
        Value::Number(number) => emit_number(number, out),
        Value::String(text) => emit_string(text, out),
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
            // Names are unique, so an unstable sort is deterministic.
            entries.sort_unstable_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.write_all(b"{")?;
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.write_all(b",")?;
                }
                emit_string(key, out)?;
                out.write_all(b":")?;
                emit(item, out)?;
            }
            out.write_all(b"}")
        }
    }
}

/// The double a JSON number denotes: integers held as `u64`/`i64` are
/// rounded to the nearest double, as every JCS implementation reads them.
fn as_double(number: &Number) -> f64 {
    if let Some(n) = number.as_u64() {
        n as f64
    } else if let Some(n) = number.as_i64() {
        n as f64
    } else {
        number.as_f64().unwrap_or(f64::NAN)
    }
}

/// Writes `number` as ECMAScript's `Number.prototype.toString` writes the
/// double it denotes (RFC 8785 §3.2.2.3).
fn emit_number<W: Write>(number: &Number, out: &mut W) -> io::Result<()> {
    // Integers up to 2^53 are doubles exactly, and below 10^21 ECMAScript
    // writes them as their digits.
    const EXACT: u64 = 1 << 53;
    if let Some(n) = number.as_u64().filter(|n| *n <= EXACT) {
        return write!(out, "{n}");
    }
    if let Some(n) = number.as_i64().filter(|n| n.unsigned_abs() <= EXACT) {
        return write!(out, "{n}");
    }
    emit_double(as_double(number), out)
}

fn emit_double<W: Write>(value: f64, out: &mut W) -> io::Result<()> {
    if value == 0.0 {
        // Both zeros.
        return out.write_all(b"0");
    }
    if !value.is_finite() {
        // A `serde_json::Number` cannot hold one; JCS has no form for it.
        return out.write_all(b"null");
    }
    if value < 0.0 {
        out.write_all(b"-")?;
    }
    let (digits, n) = shortest_digits(value.abs());
    // ECMAScript's layout of value = 0.d1…dk × 10^n (k digits, n the position
    // of the decimal point).
    let digits = digits.as_bytes();
    let k = i32::try_from(digits.len()).unwrap_or(0);
    if k <= n && n <= 21 {
        out.write_all(digits)?;
        for _ in 0..n - k {
            out.write_all(b"0")?;
        }
        Ok(())
    } else if 0 < n && n <= 21 {
        let (whole, fraction) = digits.split_at(n.unsigned_abs() as usize);
        out.write_all(whole)?;
        out.write_all(b".")?;
        out.write_all(fraction)
    } else if -6 < n && n <= 0 {
        out.write_all(b"0.")?;
        for _ in 0..-n {
            out.write_all(b"0")?;
        }
        out.write_all(digits)
    } else {
        let (first, rest) = digits.split_at(1);
        out.write_all(first)?;
        if !rest.is_empty() {
            out.write_all(b".")?;
            out.write_all(rest)?;
        }
        let sign = if n - 1 < 0 { '-' } else { '+' };
        write!(out, "e{sign}{}", (n - 1).unsigned_abs())
    }
}

/// The digits ECMAScript picks for the positive finite `value` (the fewest
/// that read back as `value`; of those, the closest to it; of two as close,
/// the even one) and `n`, the position of the decimal point: value =
/// 0.digits × 10^n.
fn shortest_digits(value: f64) -> (Digits, i32) {
    // Rust's `{:e}` without a precision writes the fewest digits that read
    // back as `value`, the closest where several are as short; but of two as
    // close it takes the larger (1424953923781206.25 as …06.3), where
    // ECMAScript takes the even one (…06.2).
    let mut text = Digits::default();
    let _ = write!(text, "{value:e}");
    let (mantissa, exponent) = text
        .as_str()
        .split_once('e')
        .unwrap_or((text.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let mut digits = Digits::default();
    for byte in mantissa.bytes().filter(u8::is_ascii_digit) {
        digits.push(byte);
    }
    let n = exponent + 1;
    if let Some(even) = even_of_a_tie(value, digits.as_str(), n) {
        digits = even;
    }
    (digits, n)
}

/// When `value` lies exactly halfway between the k-digit `digits` (point at
/// `n`) and its neighbour at the last digit, and that neighbour is even and
/// reads back as `value`: the neighbour.
fn even_of_a_tie(value: f64, digits: &str, n: i32) -> Option<Digits> {
    let shortest: u64 = digits.parse().ok()?;
    if shortest.is_multiple_of(2) {
        return None;
    }
    // The exact value's significant digits; where they do not fit 128 bits
    // they are far more than k + 1 ≤ 18.
    let exact = significant_digits(value)?;
    let k = u32::try_from(digits.len()).ok()?;
    // A tie: the exact value has one digit more than the shortest, a 5.
    if exact % 10 != 5 || exact.checked_ilog10()? != k {
        return None;
    }
    let below = u64::try_from(exact / 10).ok()?;
    let other = if shortest == below { below + 1 } else { below };
    let mut candidate = Digits::default();
    let _ = write!(candidate, "{other}");
    // Same length (not 99…9 + 1), and it must read back as `value` (the
    // rounding interval is narrower below a power of two).
    if candidate.as_str().len() != digits.len() {
        return None;
    }
    let point = n - i32::try_from(k).ok()?;
    let mut check = Digits::default();
    let _ = write!(check, "{other}e{point}");
    (check.as_str().parse::<f64>().ok()? == value).then_some(candidate)
}

/// The significant digits of the exact decimal value of `value` (positive,
/// finite) as an integer, when they end in 5 or the value is not an integer;
/// `None` when they would not fit 128 bits, or end in an even digit.
fn significant_digits(value: f64) -> Option<u128> {
    let bits = value.to_bits();
    let biased = i32::try_from((bits >> 52) & 0x7ff).ok()?;
    let fraction = bits & ((1 << 52) - 1);
    let (mut f, mut q) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), biased - 1075)
    };
    // value = f × 2^q, f odd.
    let zeros = f.trailing_zeros();
    f >>= zeros;
    q += i32::try_from(zeros).ok()?;
    let f = u128::from(f);
    if q < 0 {
        // f × 2^q = f × 5^-q × 10^q, and f × 5^-q is odd.
        f.checked_mul(5u128.checked_pow(q.unsigned_abs())?)
    } else {
        // f × 2^q ends in 5 only as (f / 5^q) × 10^q with f / 5^q odd; any
        // other integer's last non-zero digit is even.
        let five = 5u128.checked_pow(q.unsigned_abs())?;
        f.is_multiple_of(five).then(|| f / five)
    }
}

/// A number's digits, held inline: at most 32 ASCII bytes.
#[derive(Default)]
struct Digits {
    bytes: [u8; 32],
    len: usize,
}

impl Digits {
    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl std::fmt::Write for Digits {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        if self.len + text.len() > self.bytes.len() {
            return Err(std::fmt::Error);
        }
        text.bytes().for_each(|b| self.push(b));
        Ok(())
    }
}

/// Writes `text` as a JSON string the way RFC 8785 (ECMAScript's
/// `JSON.stringify`) escapes it.
fn emit_string<W: Write>(text: &str, out: &mut W) -> io::Result<()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.write_all(b"\"")?;
    let bytes = text.as_bytes();
    let mut plain = 0;
    loop {
        // Every byte of a multi-byte UTF-8 sequence is 0x80 or above: plain.
        let at = plain + plain_string_len(&bytes[plain..]);
        let Some(&byte) = bytes.get(at) else {
            break;
        };
        let short: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            // Other control bytes: `\u00XX`.
            _ => b"",
        };
        out.write_all(&bytes[plain..at])?;
        plain = at + 1;
        if short.is_empty() {
            out.write_all(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ])?;
        } else {
            out.write_all(short)?;
        }
    }
    out.write_all(&bytes[plain..])?;
    out.write_all(b"\"")
}

/// Appends the canonical form of `value` to `out`.
pub fn write_canonical(value: &Value, out: &mut String) {
    let mut bytes = Vec::with_capacity(128);
    // Writing to a `Vec` cannot fail, and what is written is UTF-8 (Rust
    // strings, escapes and ASCII).
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
    // Written into a buffer and appended in one piece: a `push` per digit
    // cost a capacity check and a char encoding each (three hashes a call).
    let mut buffer = [0u8; 128];
    for chunk in bytes.chunks(buffer.len() / 2) {
        let text = &mut buffer[..chunk.len() * 2];
        for (pair, byte) in text.chunks_exact_mut(2).zip(chunk) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0xf)];
        }
        // Only ASCII hex digits were written.
        out.push_str(std::str::from_utf8(text).unwrap_or_default());
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
/// (`arguments` absent counts as `{}`): the algorithm [`ARGS_DIGEST_ALG`]
/// names. The canonical form is hashed as it is written, never held whole.
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

/// The members of an MCP tool (a `tools/list` entry) that make its
/// definition: what the model reads and what the server accepts.
pub const TOOL_DEFINITION_MEMBERS: [&str; 6] = [
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
];

/// A tool's definition: the [`TOOL_DEFINITION_MEMBERS`] present in `tool`
/// (others, such as `_meta` or `icons`, left out), as an object.
pub fn tool_definition(tool: &Value) -> Value {
    let members = TOOL_DEFINITION_MEMBERS
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), tool.get(*name)?.clone())))
        .collect();
    Value::Object(members)
}

/// `sha256:` and the hex SHA-256 of the canonical form of
/// [`tool_definition`]`(tool)`: equal for equal definitions whatever the
/// order of their keys, different when any text, schema or annotation differs.
pub fn tool_definition_hash(tool: &Value) -> String {
    args_digest(Some(&tool_definition(tool)))
}

#[cfg(test)]
#[path = "canonical_tests.rs"]
mod tests;
