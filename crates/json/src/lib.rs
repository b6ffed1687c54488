//! Strict JSON: a document is read only when every mainstream JSON reader reads
//! it the same way, else it is refused with the reason.
//!
//! A gateway that reads a message differently from the server behind it is a
//! bypass (a "parser differential"). Readers disagree on:
//! - repeated keys (first wins, last wins, error);
//! - keys equal under Unicode simple case folding (`amount`/`AMOUNT`,
//!   `params`/`paramſ`, `k`/Kelvin sign): distinct to JavaScript and Python, one
//!   field to Go's `encoding/json` and to case-insensitive binders;
//! - numbers whose text is not the shortest text of the nearest double
//!   (`100.000000000000001` is 100 to JavaScript and Go, more than 100 to a
//!   decimal reader), and integers beyond 2^53 (exact to Go's `int64`, rounded
//!   by JavaScript). An accepted number's text lies in its double's rounding
//!   interval, so comparing doubles orders numbers as comparing their decimal
//!   texts does: `100.00000000000001` is above 100 for every reader;
//! - invalid UTF-8, lone surrogates, a byte-order mark, trailing data, NUL
//!   characters (which C-string code truncates at), and `__proto__` keys (which
//!   JavaScript object copies turn into a prototype).
//!
//! [`parse`] refuses all of these, so the [`serde_json::Value`] it returns is the
//! meaning of the bytes for any of those readers, and comparisons on its numbers
//! (as doubles or integers) are exact comparisons of the decimal text. Nesting is
//! bounded ([`Limits::max_depth`]). The parser is hand-written because the number
//! rule needs each number's decimal text, which `serde_json` discards.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::ops::Range;

use serde_json::{Map, Number, Value};
use thiserror::Error;

/// The length of the longest prefix of `bytes` that a JSON string holds as
/// it is: no `"`, no `\` and no control byte (below 0x20), the bytes a
/// reader stops at and a writer escapes. Reads eight bytes at a time.
pub fn plain_string_len(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH_BITS: u64 = ONES << 7;
    // Whether some byte of `word` is below `n` (n ≤ 0x80): a byte below `n`
    // borrows into its own high bit, which `!word` keeps only for bytes
    // below 0x80. Exact as a yes/no for the whole word.
    let has_below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let Ok(eight) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(eight);
        let special = has_below(word, 0x20)
            | has_below(word ^ (ONES * u64::from(b'"')), 1)
            | has_below(word ^ (ONES * u64::from(b'\\')), 1);
        if special & HIGH_BITS != 0 {
            break;
        }
        at += 8;
    }
    at + bytes[at..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(bytes.len() - at)
}

/// Bounds on what [`parse`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest document, in bytes.
    pub max_bytes: usize,
    /// The deepest nesting of arrays and objects.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 20,
            max_depth: 64,
        }
    }
}

impl Limits {
    /// `max_bytes` with the default depth.
    pub fn bytes(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            ..Self::default()
        }
    }
}

/// Why a document was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum JsonError {
    /// The document is larger than the limit.
    #[error("message body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The document is not UTF-8.
    #[error("message body is not valid UTF-8")]
    InvalidUtf8,
    /// The document is not JSON.
    #[error("message body is not valid JSON: {what} at byte {offset}")]
    Syntax {
        /// What was wrong.
        what: &'static str,
        /// Where, in bytes from the start.
        offset: usize,
    },
    /// Arrays and objects nest deeper than the limit.
    #[error("message nests deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// An object repeats a key.
    #[error("duplicate object key {key:?} in message")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// Two keys of one object are equal under Unicode case folding (named in
    /// byte order).
    #[error(
        "object keys {first:?} and {second:?} differ only by letter case; readers that fold case see one key"
    )]
    CaseCollision {
        /// One key.
        first: String,
        /// The other.
        second: String,
    },
    /// A number that readers hold differently (not exactly a double, or an
    /// integer beyond 2^53, or out of range).
    #[error(
        "number {text} is read differently by different JSON readers (not exactly representable)"
    )]
    AmbiguousNumber {
        /// The number's text (shortened when long).
        text: String,
    },
    /// A string holds U+0000.
    #[error("a string holds a NUL character (\\u0000)")]
    NulCharacter,
    /// An object has a `__proto__` key, which JavaScript code that copies
    /// objects with assignment reads as the object's prototype.
    #[error(
        "an object has a \"__proto__\" key, which JavaScript object copies read as a prototype"
    )]
    ProtoKey,
}

/// A parsed document: its value, and for a top-level array the byte range of
/// each item in the input (so items can be forwarded byte for byte).
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// The value.
    pub value: Value,
    /// For a top-level array, each item's bytes in the input; else empty.
    pub item_spans: Vec<Range<usize>>,
}

/// Parses `bytes` strictly (see the module docs).
pub fn parse(bytes: &[u8], limits: Limits) -> Result<Value, JsonError> {
    parse_document(bytes, limits).map(|doc| doc.value)
}

/// Parses `bytes` strictly and keeps the spans of a top-level array's items.
pub fn parse_document(bytes: &[u8], limits: Limits) -> Result<Document, JsonError> {
    if bytes.len() > limits.max_bytes {
        return Err(JsonError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| JsonError::InvalidUtf8)?;
    let mut parser = Parser {
        text,
        bytes,
        at: 0,
        max_depth: limits.max_depth,
        spans: Vec::new(),
    };
    parser.skip_ws();
    let value = parser.value(0)?;
    parser.skip_ws();
    if parser.at != bytes.len() {
        return Err(parser.syntax("trailing data after the JSON value"));
    }
    Ok(Document {
        value,
        item_spans: parser.spans,
    })
}

/// `key` folded for case-insensitive comparison: equal for any two keys that
/// Go's `encoding/json` matches case-insensitively (Unicode simple case
/// folding), and for some more (full case mappings, e.g. `ß` and `ss`), which
/// only makes the collision check stricter.
pub fn fold_key(key: &str) -> Cow<'_, str> {
    if key.is_ascii() {
        return if key.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(key.to_ascii_lowercase())
        } else {
            Cow::Borrowed(key)
        };
    }
    // Lowercase of uppercase joins a simple-fold orbit (ſ → S → s, K → k);
    // repeating until stable joins mappings that expand (ẞ → ß → SS → ss).
    let mut folded: String = fold_once(key);
    for _ in 0..3 {
        let next = fold_once(&folded);
        if next == folded {
            break;
        }
        folded = next;
    }
    Cow::Owned(folded)
}

fn fold_once(s: &str) -> String {
    s.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether `a` and `b` mean the same to a JSON reader: equal structure, with
/// numbers compared as numbers (integers exactly, others as doubles), so
/// `100`, `100.0` and `1e2` are one value.
pub fn same_meaning(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => same_number(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_meaning(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_meaning(v, w)))
        }
        _ => a == b,
    }
}

fn same_number(a: &Number, b: &Number) -> bool {
    match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Some(x), Some(y)) => x == y,
        _ => a.as_f64() == b.as_f64(),
    }
}

/// Refuses an object two of whose keys fold alike. Folding borrows for the
/// common all-lowercase ASCII key, so this allocates one small list per object
/// of two or more keys.
fn check_case_collisions(object: &Map<String, Value>) -> Result<(), JsonError> {
    if object.len() < 2 {
        return Ok(());
    }
    let mut folds: Vec<(Cow<'_, str>, &str)> = object
        .keys()
        .map(|key| (fold_key(key), key.as_str()))
        .collect();
    folds.sort_unstable();
    match folds.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        Some(pair) => Err(JsonError::CaseCollision {
            first: pair[0].1.to_owned(),
            second: pair[1].1.to_owned(),
        }),
        None => Ok(()),
    }
}

/// 2^53: integers up to this magnitude are exact in every reader.
const MAX_SAFE_INTEGER: u64 = 1 << 53;

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    max_depth: usize,
    spans: Vec<Range<usize>>,
}

impl<'a> Parser<'a> {
    fn syntax(&self, what: &'static str) -> JsonError {
        JsonError::Syntax {
            what,
            offset: self.at,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn expect_literal(&mut self, literal: &'static str, value: Value) -> Result<Value, JsonError> {
        if self.bytes[self.at..].starts_with(literal.as_bytes()) {
            self.at += literal.len();
            Ok(value)
        } else {
            Err(self.syntax("invalid literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        match self.peek() {
            None => Err(self.syntax("unexpected end of input")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(|s| Value::String(s.into_owned())),
            Some(b't') => self.expect_literal("true", Value::Bool(true)),
            Some(b'f') => self.expect_literal("false", Value::Bool(false)),
            Some(b'n') => self.expect_literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number().map(Value::Number),
            Some(_) => Err(self.syntax("expected a JSON value")),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, JsonError> {
        if depth > self.max_depth {
            return Err(JsonError::TooDeep {
                limit: self.max_depth,
            });
        }
        let top = depth == 1;
        self.at += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            let start = self.at;
            items.push(self.value(depth)?);
            if top {
                self.spans.push(start..self.at);
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.syntax("expected ',' or ']' in an array")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, JsonError> {
        if depth > self.max_depth {
            return Err(JsonError::TooDeep {
                limit: self.max_depth,
            });
        }
        self.at += 1;
        let mut object = Map::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Value::Object(object));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.syntax("expected a string key in an object"));
            }
            let key = self.string()?.into_owned();
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.syntax("expected ':' after an object key"));
            }
            self.at += 1;
            self.skip_ws();
            let value = self.value(depth)?;
            if key == "__proto__" {
                return Err(JsonError::ProtoKey);
            }
            if object.contains_key(&key) {
                return Err(JsonError::DuplicateKey { key });
            }
            object.insert(key, value);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    check_case_collisions(&object)?;
                    return Ok(Value::Object(object));
                }
                _ => return Err(self.syntax("expected ',' or '}' in an object")),
            }
        }
    }

    /// A string starting at the opening quote; borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.at += 1;
        let start = self.at;
        // Fast path: no escapes.
        self.at += plain_string_len(&self.bytes[self.at..]);
        match self.peek() {
            None => return Err(self.syntax("unterminated string")),
            Some(b'"') => {
                let s = &self.text[start..self.at];
                self.at += 1;
                return Ok(Cow::Borrowed(s));
            }
            Some(b'\\') => {}
            // The scan stops only at a quote, a backslash or a control byte.
            Some(_) => return Err(self.syntax("control character in a string")),
        }
        let mut out = String::from(&self.text[start..self.at]);
        loop {
            match self.peek() {
                None => return Err(self.syntax("unterminated string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.at += 1;
                            let c = self.unicode_escape()?;
                            out.push(c);
                            continue;
                        }
                        _ => return Err(self.syntax("invalid escape in a string")),
                    };
                    self.at += 1;
                    out.push(escaped);
                }
                Some(b) if b < 0x20 => {
                    return Err(self.syntax("control character in a string"));
                }
                Some(_) => {
                    // Copy the run up to the next quote, escape or control byte.
                    let run = self.at;
                    self.at += plain_string_len(&self.bytes[run..]);
                    out.push_str(&self.text[run..self.at]);
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .bytes
            .get(self.at..self.at + 4)
            .ok_or_else(|| self.syntax("truncated \\u escape"))?;
        let mut value = 0u32;
        for &d in digits {
            let nibble = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.syntax("invalid \\u escape")),
            };
            value = value * 16 + u32::from(nibble);
        }
        self.at += 4;
        Ok(value)
    }

    /// The character of a `\uXXXX` escape (after the `u`), joining surrogate
    /// pairs; lone surrogates and NUL are refused.
    fn unicode_escape(&mut self) -> Result<char, JsonError> {
        let first = self.hex4()?;
        let code = match first {
            0xD800..=0xDBFF => {
                if !self.bytes[self.at..].starts_with(b"\\u") {
                    return Err(self.syntax("lone surrogate in a \\u escape"));
                }
                self.at += 2;
                let second = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(self.syntax("lone surrogate in a \\u escape"));
                }
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.syntax("lone surrogate in a \\u escape")),
            0 => return Err(JsonError::NulCharacter),
            other => other,
        };
        char::from_u32(code).ok_or_else(|| self.syntax("invalid \\u escape"))
    }

    fn number(&mut self) -> Result<Number, JsonError> {
        let start = self.at;
        let digits = |p: &mut Self| {
            let from = p.at;
            while let Some(b'0'..=b'9') = p.peek() {
                p.at += 1;
            }
            p.at - from
        };
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.syntax("invalid number")),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.at += 1;
            integer = false;
            if digits(self) == 0 {
                return Err(self.syntax("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            integer = false;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if digits(self) == 0 {
                return Err(self.syntax("invalid number"));
            }
        }
        exact_number(&self.text[start..self.at], integer)
    }
}

/// The number `text` (valid JSON number grammar) when every reader holds it
/// alike: an integer of magnitude at most 2^53, or a number whose decimal
/// value is exactly that of the shortest representation of its nearest double.
fn exact_number(text: &str, integer: bool) -> Result<Number, JsonError> {
    let ambiguous = || JsonError::AmbiguousNumber {
        text: if text.len() > 40 {
            format!("{}…", &text[..40])
        } else {
            text.to_owned()
        },
    };
    if integer {
        let magnitude = text.strip_prefix('-').unwrap_or(text);
        let value: u64 = magnitude.parse().map_err(|_| ambiguous())?;
        if value > MAX_SAFE_INTEGER {
            return Err(ambiguous());
        }
        return Ok(if text.starts_with('-') {
            // At most 2^53: fits i64.
            Number::from(-(value as i64))
        } else {
            Number::from(value)
        });
    }
    let value: f64 = text.parse().map_err(|_| ambiguous())?;
    if !value.is_finite() {
        return Err(ambiguous());
    }
    if Decimal::of(text) != Decimal::of(&format!("{value:e}")) {
        return Err(ambiguous());
    }
    Number::from_f64(value).ok_or_else(ambiguous)
}

/// A decimal number as significant digits and an exponent: value =
/// 0.`digits` × 10^`exponent` (zero has no digits and ignores sign).
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

impl Decimal {
    /// Reads a JSON number, or Rust's `{:e}` form of a double.
    fn of(text: &str) -> Self {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, "0"),
        };
        let exp_value: i64 = {
            let (sign, digits) = match exp.as_bytes().first() {
                Some(b'-') => (-1, &exp[1..]),
                Some(b'+') => (1, &exp[1..]),
                _ => (1, exp),
            };
            // Saturate: such exponents make the double 0 or infinite, which
            // never equals a nonzero decimal anyway.
            sign * digits
                .parse::<i64>()
                .unwrap_or(i64::MAX / 4)
                .min(i64::MAX / 4)
        };
        let (whole, fraction) = match mantissa.find('.') {
            Some(at) => (&mantissa[..at], &mantissa[at + 1..]),
            None => (mantissa, ""),
        };
        let all: String = whole.chars().chain(fraction.chars()).collect();
        let leading = all.len() - all.trim_start_matches('0').len();
        let significant = all.trim_start_matches('0').trim_end_matches('0');
        if significant.is_empty() {
            return Self {
                negative: false,
                digits: String::new(),
                exponent: 0,
            };
        }
        // Position of the decimal point relative to the first significant digit.
        let point = whole.len() as i64 - leading as i64;
        Self {
            negative,
            digits: significant.to_owned(),
            exponent: point.saturating_add(exp_value),
        }
    }
}

#[cfg(test)]
mod tests;
