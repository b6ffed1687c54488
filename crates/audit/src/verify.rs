//! Verification of audit logs: the hash chain of every session, and the links
//! from one agent's trail to another's.
//!
//! A log is the records of one or several sessions, interleaved, one JSON object
//! a line (the logs of several agents may be concatenated). A record is any JSON
//! object with a `session.chaperone` string and a `prev` (`null` or a lowercase
//! hex SHA-256); its hash is the SHA-256 of its canonical form ([`record_hash`]),
//! so key order and whitespace do not matter, every value does.
//!
//! Rules, checked line by line:
//! - a record that is not its session's first in the log must have as `prev` the
//!   hash of its session's previous record;
//! - a session's first record has `prev` null (an own session), or the hash of a
//!   record of another session of the log (a cross-session link: the delegating
//!   agent's record), or a hash of no record of the log (an external link: the
//!   delegating agent's log is not part of this one; an error only in strict
//!   mode);
//! - no record appears twice.
//!
//! Cross-session links may point forwards: the order in which logs of several
//! agents were concatenated says nothing about integrity, the order of one
//! session's records does.

use std::collections::HashMap;

use serde_json::Value;
use thiserror::Error;

use crate::canonical::{canonical, hex, sha256};

/// How [`verify_log_with`] reads a log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// An external link (a session's first record whose `prev` is the hash of no
    /// record of the log) is an error instead of being counted.
    pub strict: bool,
    /// Skip lines that are not audit records (plain text, or JSON objects
    /// without a `session.chaperone` string and a `decision`, such as the
    /// sidecar's tracing lines in a Kubernetes log) instead of failing on them.
    pub skip_other_lines: bool,
}

/// What a verified log holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifySummary {
    /// Audit records verified.
    pub records: usize,
    /// Distinct Chaperone sessions among them.
    pub sessions: usize,
    /// Sessions whose first record links to a record of another session of
    /// the log (delegated sessions whose delegating record is in the log).
    pub cross_session_links: usize,
    /// Sessions whose first record links to a record that is not in the log, in
    /// line order.
    pub external_links: Vec<ExternalLink>,
    /// Non-blank lines that are not audit records (only with
    /// [`VerifyOptions::skip_other_lines`]).
    pub skipped: usize,
}

/// A session's first record whose `prev` is the hash of no record of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalLink {
    /// 1-based line number of the record.
    pub line: usize,
    /// Its Chaperone session id.
    pub session: String,
    /// Its `prev`: hex SHA-256 of a record of another log.
    pub prev: String,
}

/// Why a line is not a well-formed audit record.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum Malformed {
    /// Not JSON, or JSON but not an object.
    #[error("not a JSON object")]
    NotJsonObject,
    /// No `session.chaperone` string.
    #[error("no `session.chaperone` string")]
    NoSession,
    /// `prev` is absent, or neither `null` nor a string.
    #[error("`prev` is missing or neither null nor a string")]
    NoPrev,
    /// `prev` is a string but not 64 lowercase hex digits.
    #[error("`prev` is not a lowercase hex SHA-256")]
    PrevNotSha256,
}

/// A log that does not verify: the first offending line and what is wrong.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum VerifyError {
    /// A line is not a well-formed audit record.
    #[error("line {line}: malformed audit record: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: Malformed,
    },
    /// `prev` is the hash of no record of the log, though the session has
    /// earlier records: a record is missing, or one was modified.
    #[error(
        "line {line}: broken link in session {session}: prev matches no record of this log; \
         a record is missing or modified before line {line} (the session's previous record \
         is line {previous})"
    )]
    BrokenLink {
        /// 1-based line number of the record whose `prev` does not match.
        line: usize,
        /// The Chaperone session id.
        session: String,
        /// 1-based line number of the session's previous record in the log.
        previous: usize,
    },
    /// `prev` is the hash of a record of the log, but not of the session's
    /// previous record.
    #[error(
        "line {line}: out of order in session {session}: prev is the hash of line {links_to}, {}",
        expected_phrase(*.previous)
    )]
    OutOfOrder {
        /// 1-based line number.
        line: usize,
        /// The Chaperone session id.
        session: String,
        /// 1-based line number of the record `prev` is the hash of.
        links_to: usize,
        /// 1-based line number of the session's previous record; `None` when
        /// this is the session's first record in the log (and it links to a
        /// later record of its own session).
        previous: Option<usize>,
    },
    /// `prev` is null (a session's first record), but the session has earlier
    /// records in the log.
    #[error(
        "line {line}: out of order in session {session}: prev is null (a session's first \
         record) but the session already has a record at line {previous}"
    )]
    Restarted {
        /// 1-based line number.
        line: usize,
        /// The Chaperone session id.
        session: String,
        /// 1-based line number of the session's previous record.
        previous: usize,
    },
    /// The same record appears twice.
    #[error("line {line}: replayed record in session {session}: the same record as line {first}")]
    Replayed {
        /// 1-based line number of the repetition.
        line: usize,
        /// The Chaperone session id.
        session: String,
        /// 1-based line number of the first occurrence.
        first: usize,
    },
    /// Strict mode: a session's first record links to a record not in the log.
    #[error(
        "line {line}: external link in session {session}: prev {prev} is the hash of no record \
         of this log (strict)"
    )]
    ExternalLink {
        /// 1-based line number.
        line: usize,
        /// The Chaperone session id.
        session: String,
        /// The `prev` that matches no record.
        prev: String,
    },
}

impl VerifyError {
    /// 1-based line number of the offending line.
    pub fn line(&self) -> usize {
        match self {
            Self::Malformed { line, .. }
            | Self::BrokenLink { line, .. }
            | Self::OutOfOrder { line, .. }
            | Self::Restarted { line, .. }
            | Self::Replayed { line, .. }
            | Self::ExternalLink { line, .. } => *line,
        }
    }
}

/// The end of [`VerifyError::OutOfOrder`]'s message.
fn expected_phrase(previous: Option<usize>) -> String {
    match previous {
        Some(previous) => format!("not of the session's previous record (line {previous})"),
        None => "a later record of the same session".to_owned(),
    }
}

/// SHA-256 of the canonical form of `record`: what the next record of its
/// session (or the first record of a delegated session) carries in `prev`.
pub fn record_hash(record: &Value) -> [u8; 32] {
    sha256(canonical(record).as_bytes())
}

/// Verifies a log whose every non-blank line is an audit record; external
/// links are counted, not errors. Same as [`verify_log_with`] with
/// [`VerifyOptions::default`].
pub fn verify_log(log: &str) -> Result<VerifySummary, VerifyError> {
    verify_log_with(log, VerifyOptions::default())
}

/// Verifies the hash chains of `log` (see the module docs for the rules);
/// returns what it holds, or the first offending line in line order.
pub fn verify_log_with(log: &str, options: VerifyOptions) -> Result<VerifySummary, VerifyError> {
    // First pass: every record's hash, so that a `prev` can be told apart as a
    // link to a record elsewhere in the log (out of order, cross-session) or to
    // no record of it (missing or modified, external).
    let mut records = Vec::new();
    let mut malformed = None;
    let mut skipped = 0;
    for (number, text) in log.lines().enumerate() {
        let line = number + 1;
        if text.trim().is_empty() {
            continue;
        }
        match parse_line(line, text, options.skip_other_lines) {
            Ok(Some(record)) => records.push(record),
            Ok(None) => skipped += 1,
            Err(reason) => {
                malformed.get_or_insert(VerifyError::Malformed { line, reason });
            }
        }
    }
    // Hash → the record's position in `records`, first occurrence.
    let mut index: HashMap<[u8; 32], usize> = HashMap::with_capacity(records.len());
    for (position, record) in records.iter().enumerate() {
        index.entry(record.hash).or_insert(position);
    }
    let linked = |hash: &[u8; 32]| index.get(hash).map(|&at| &records[at]);

    // Second pass, in line order; a malformed line is reported where it is.
    let mut summary = VerifySummary {
        skipped,
        ..VerifySummary::default()
    };
    // Per session: hash and line of its latest record so far.
    let mut last: HashMap<&str, ([u8; 32], usize)> = HashMap::new();
    for record in &records {
        if let Some(error) = malformed.take_if(|error| error.line() < record.line) {
            return Err(error);
        }
        let (line, session) = (record.line, record.session.as_str());
        if let Some(first) = linked(&record.hash).filter(|first| first.line != line) {
            return Err(VerifyError::Replayed {
                line,
                session: session.to_owned(),
                first: first.line,
            });
        }
        match (last.get(session), &record.prev) {
            (Some(&(expected, _)), Some(prev)) if *prev == expected => {}
            (Some(&(_, previous)), Some(prev)) => {
                return Err(match linked(prev) {
                    Some(target) => VerifyError::OutOfOrder {
                        line,
                        session: session.to_owned(),
                        links_to: target.line,
                        previous: Some(previous),
                    },
                    None => VerifyError::BrokenLink {
                        line,
                        session: session.to_owned(),
                        previous,
                    },
                });
            }
            (Some(&(_, previous)), None) => {
                return Err(VerifyError::Restarted {
                    line,
                    session: session.to_owned(),
                    previous,
                });
            }
            (None, None) => {}
            (None, Some(prev)) => match linked(prev) {
                Some(target) if target.session == session => {
                    return Err(VerifyError::OutOfOrder {
                        line,
                        session: session.to_owned(),
                        links_to: target.line,
                        previous: None,
                    });
                }
                Some(_) => summary.cross_session_links += 1,
                None if options.strict => {
                    return Err(VerifyError::ExternalLink {
                        line,
                        session: session.to_owned(),
                        prev: hex(prev),
                    });
                }
                None => summary.external_links.push(ExternalLink {
                    line,
                    session: session.to_owned(),
                    prev: hex(prev),
                }),
            },
        }
        last.insert(session, (record.hash, line));
        summary.records += 1;
    }
    if let Some(error) = malformed {
        return Err(error);
    }
    summary.sessions = last.len();
    Ok(summary)
}

/// One audit record of a log, reduced to what verification needs.
struct Record {
    /// 1-based line number.
    line: usize,
    session: String,
    prev: Option<[u8; 32]>,
    hash: [u8; 32],
}

/// The record on a line; `None` for a line skipped as not an audit record.
fn parse_line(
    line: usize,
    text: &str,
    skip_other_lines: bool,
) -> Result<Option<Record>, Malformed> {
    let value = match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => value,
        _ if skip_other_lines => return Ok(None),
        _ => return Err(Malformed::NotJsonObject),
    };
    let session = value.pointer("/session/chaperone").and_then(Value::as_str);
    let session = match session {
        Some(session) if !skip_other_lines || value.get("decision").is_some() => session,
        _ if skip_other_lines => return Ok(None),
        _ => return Err(Malformed::NoSession),
    };
    let prev = match value.get("prev") {
        Some(Value::Null) => None,
        Some(Value::String(prev)) => Some(parse_sha256(prev).ok_or(Malformed::PrevNotSha256)?),
        _ => return Err(Malformed::NoPrev),
    };
    Ok(Some(Record {
        line,
        session: session.to_owned(),
        prev,
        hash: record_hash(&value),
    }))
}

/// The digest written as 64 lowercase hex digits (as [`hex`] writes it).
fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    fn digit(byte: u8) -> Option<u8> {
        match byte {
            b'0'..=b'9' => Some(byte - b'0'),
            b'a'..=b'f' => Some(byte - b'a' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *slot = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
