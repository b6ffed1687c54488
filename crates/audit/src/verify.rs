//! Verification of audit logs: the trail of every sidecar (one sequence with
//! signed checkpoints), the hash chain of every session, and the links from one
//! agent's trail to another's.
//!
//! A log is the lines of one or several sidecars, one JSON object a line
//! (the logs of several agents may be concatenated, or interleaved). Every
//! line is read strictly ([`chaperone_json`]): a duplicate or case-colliding
//! key, or a number readers disagree on, makes a record malformed, so no
//! reader can see a different record than the verifier did. A record's hash is
//! the SHA-256 of its canonical form ([`record_hash`]), so key order and
//! whitespace do not matter, every value does.
//!
//! Two kinds of record, both carrying the writing sidecar's key id `kid`, its
//! sequence number `seq` (1, 2, … for each sidecar, across all its sessions)
//! and `prevSeq` (the hash of the sidecar's record `seq - 1`; null for seq 1):
//! - a decision: a `session.chaperone` string, a `decision`, and `prev`
//!   (`null` or the hash of the session's previous record);
//! - a checkpoint (`"kind":"checkpoint"`): `records` (the decisions the
//!   sidecar has written so far), `final` (the sidecar was shutting down),
//!   `time`, and `sig`: the sidecar's Ed25519 signature (base64url) of the
//!   canonical JSON of the checkpoint without `sig`
//!   ([`checkpoint_signing_input`]). Its `prevSeq` is the hash of the last
//!   record it covers.
//!
//! Rules, checked line by line (the error names the first offending line):
//! - per sidecar, `seq` runs 1, 2, 3, … in line order with no gap, repeat or
//!   reordering, and every `prevSeq` is the hash of the sidecar's previous
//!   record; the records of different sidecars may interleave freely;
//! - a checkpoint counts exactly the decisions before it, its signature
//!   verifies with the sidecar's key when one is given, and nothing of the
//!   sidecar follows a `final` checkpoint;
//! - a record that is not its session's first in the log has as `prev` the
//!   hash of its session's previous record;
//! - a session's first record has `prev` null (an own session), or the hash of
//!   a record of another session of the log (a cross-session link: the
//!   delegating agent's record), or a hash of no record of the log (an external
//!   link: the delegating agent's log is not part of this one);
//! - no record appears twice.
//!
//! What a checkpoint proves, only a signature can vouch for: anyone can write
//! a checkpoint-shaped line, no one but the sidecar can sign one. So the
//! decisions after a sidecar's last checkpoint (truncatable, or appended by
//! someone else), checkpoints whose signature was not checked (no key), and
//! external links are reported in the [`VerifySummary`]; in strict mode each
//! is an error.
//!
//! Cross-session links may point forwards: the order in which logs of several
//! agents were concatenated says nothing about integrity, the order of one
//! sidecar's records does.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use thiserror::Error;

use crate::canonical::{canonical, hex, sha256};
use crate::keys::SidecarKeys;

/// The `kind` of a checkpoint record (decisions have no `kind`).
pub const CHECKPOINT_KIND: &str = "checkpoint";

/// How [`verify_log_with`] reads a log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Accept only what is proven: an external link (a session's first record
    /// whose `prev` is the hash of no record of the log), a decision after its
    /// sidecar's last checkpoint, and a checkpoint whose signature could not
    /// be checked (no key for its `kid`) are errors instead of being reported
    /// in the summary.
    pub strict: bool,
    /// Skip lines that are not audit records (plain text, or JSON objects that
    /// are neither a checkpoint nor have a `session.chaperone` string and a
    /// `decision`, such as the sidecar's tracing lines in a Kubernetes log)
    /// instead of failing on them.
    pub skip_other_lines: bool,
}

/// What a verified log holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifySummary {
    /// Decision records verified.
    pub records: usize,
    /// Checkpoints verified (their structure; see [`SidecarTrail`] for their
    /// signatures).
    pub checkpoints: usize,
    /// Distinct Chaperone sessions among the decisions.
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
    /// Each sidecar's trail, in the order of their first line.
    pub sidecars: Vec<SidecarTrail>,
}

impl VerifySummary {
    /// Decisions not covered by a checkpoint, all sidecars together.
    pub fn uncovered(&self) -> usize {
        self.sidecars.iter().map(|trail| trail.uncovered).sum()
    }

    /// Checkpoints whose signature was not checked, all sidecars together.
    pub fn unverified(&self) -> usize {
        self.sidecars.iter().map(|trail| trail.unverified).sum()
    }
}

/// One sidecar's records in a verified log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarTrail {
    /// The sidecar's key id.
    pub kid: String,
    /// `namespace/pod` (or the pod) its decisions name, if any.
    pub pod: Option<String>,
    /// 1-based line of its first record.
    pub first_line: usize,
    /// Its decisions.
    pub records: usize,
    /// Its last `seq`.
    pub last_seq: u64,
    /// Its checkpoints.
    pub checkpoints: usize,
    /// Checkpoints whose signature verified with its key.
    pub verified: usize,
    /// Checkpoints whose signature was not checked: no key for `kid`.
    pub unverified: usize,
    /// Decisions after its last checkpoint: nothing proves that none followed
    /// them, nor that they are the sidecar's.
    pub uncovered: usize,
    /// 1-based line of the first of those.
    pub first_uncovered_line: Option<usize>,
    /// Whether its trail ends with a `final` checkpoint (the sidecar shut down
    /// and wrote nothing after it).
    pub closed: bool,
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
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Malformed {
    /// Not JSON, or JSON but not an object.
    #[error("not a JSON object")]
    NotJsonObject,
    /// JSON that readers disagree on (a duplicate or case-colliding key, an
    /// inexact number, …): not the record any one reader would see.
    #[error("ambiguous JSON: {0}")]
    Ambiguous(chaperone_json::JsonError),
    /// A `kind` other than a checkpoint's.
    #[error("unknown record `kind`")]
    UnknownKind,
    /// No `session.chaperone` string.
    #[error("no `session.chaperone` string")]
    NoSession,
    /// `prev` is absent, or neither `null` nor a string.
    #[error("`prev` is missing or neither null nor a string")]
    NoPrev,
    /// `prev` is a string but not 64 lowercase hex digits.
    #[error("`prev` is not a lowercase hex SHA-256")]
    PrevNotSha256,
    /// No `kid` string (the writing sidecar's key id).
    #[error("no `kid` string")]
    NoKid,
    /// `seq` is absent or not a positive integer.
    #[error("`seq` is missing or not a positive integer")]
    NoSeq,
    /// `prevSeq` is absent, or neither `null` nor a lowercase hex SHA-256.
    #[error("`prevSeq` is missing or neither null nor a lowercase hex SHA-256")]
    NoPrevSeq,
    /// A checkpoint lacks a field or has one of the wrong type.
    #[error("checkpoint: {0}")]
    Checkpoint(&'static str),
}

/// Why a checkpoint's signature could not be checked (strict mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoKey {
    /// No keys were given at all.
    NoKeys,
    /// The keys given have none for this `kid`.
    UnknownKid,
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
    /// The sidecar's records skip sequence numbers: records were deleted.
    #[error(
        "line {line}: gap in the trail of sidecar {kid}: seq {seq} where {expected} was due; \
         {} missing before line {line}",
        records_phrase(*.seq - *.expected)
    )]
    SeqGap {
        /// 1-based line number.
        line: usize,
        /// The sidecar's key id.
        kid: String,
        /// The record's `seq`.
        seq: u64,
        /// The `seq` due.
        expected: u64,
    },
    /// A record comes before one that the sidecar wrote earlier.
    #[error(
        "line {line}: out of order in the trail of sidecar {kid}: seq {seq} comes before seq \
         {expected} (line {expected_at})"
    )]
    SeqOutOfOrder {
        /// 1-based line number.
        line: usize,
        /// The sidecar's key id.
        kid: String,
        /// The record's `seq`.
        seq: u64,
        /// The `seq` due.
        expected: u64,
        /// 1-based line of the record with the `seq` due.
        expected_at: usize,
    },
    /// A `seq` the sidecar already used: a replayed or forged record.
    #[error(
        "line {line}: seq {seq} of sidecar {kid} repeats line {first}: a replayed or forged record"
    )]
    SeqRepeated {
        /// 1-based line number.
        line: usize,
        /// The sidecar's key id.
        kid: String,
        /// The repeated `seq`.
        seq: u64,
        /// 1-based line of its first use.
        first: usize,
    },
    /// `prevSeq` is not the hash of the sidecar's previous record: that record
    /// was modified, or this one forged.
    #[error(
        "line {line}: broken link in the trail of sidecar {kid}: prevSeq is not the hash of {}; \
         a record was modified or forged before line {line}",
        previous_phrase(*.previous)
    )]
    BrokenSeqLink {
        /// 1-based line number.
        line: usize,
        /// The sidecar's key id.
        kid: String,
        /// 1-based line of the sidecar's previous record; `None` for its
        /// first (`seq` 1, whose `prevSeq` must be null).
        previous: Option<usize>,
    },
    /// A record of a sidecar after its final checkpoint.
    #[error(
        "line {line}: record of sidecar {kid} after its final checkpoint (line {final_line}): \
         forged, or copied from another log"
    )]
    AfterFinal {
        /// 1-based line number.
        line: usize,
        /// The sidecar's key id.
        kid: String,
        /// 1-based line of the final checkpoint.
        final_line: usize,
    },
    /// A checkpoint's count of decisions differs from the trail's.
    #[error(
        "line {line}: checkpoint of sidecar {kid} counts {claimed} records, its trail holds \
         {counted}"
    )]
    CountMismatch {
        /// 1-based line number.
        line: usize,
        /// The sidecar's key id.
        kid: String,
        /// The checkpoint's `records`.
        claimed: u64,
        /// The decisions of the sidecar before it.
        counted: u64,
    },
    /// A checkpoint's signature does not verify with its sidecar's key.
    #[error(
        "line {line}: checkpoint of sidecar {kid}: the signature does not verify with the \
         sidecar's key: a forged or modified checkpoint"
    )]
    BadSignature {
        /// 1-based line number.
        line: usize,
        /// The sidecar's key id.
        kid: String,
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
    #[error("line {line}: replayed record: the same record as line {first}")]
    Replayed {
        /// 1-based line number of the repetition.
        line: usize,
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
    /// Strict mode: decisions after their sidecar's last checkpoint.
    #[error(
        "line {line}: {} of sidecar {kid} from line {line} on not covered by a checkpoint \
         (strict): they could be cut off or forged without a trace",
        records_phrase(*.records as u64)
    )]
    Uncovered {
        /// 1-based line of the first uncovered decision.
        line: usize,
        /// The sidecar's key id.
        kid: String,
        /// How many decisions are not covered.
        records: usize,
    },
    /// Strict mode: a checkpoint whose signature could not be checked.
    #[error(
        "line {line}: checkpoint of sidecar {kid} cannot be verified: {} (strict)",
        match .why { NoKey::NoKeys => "no keys given", NoKey::UnknownKid => "no key for this kid" }
    )]
    Unverified {
        /// 1-based line number of the sidecar's first such checkpoint.
        line: usize,
        /// The sidecar's key id.
        kid: String,
        /// Why.
        why: NoKey,
    },
}

impl VerifyError {
    /// 1-based line number of the offending line.
    pub fn line(&self) -> usize {
        match self {
            Self::Malformed { line, .. }
            | Self::SeqGap { line, .. }
            | Self::SeqOutOfOrder { line, .. }
            | Self::SeqRepeated { line, .. }
            | Self::BrokenSeqLink { line, .. }
            | Self::AfterFinal { line, .. }
            | Self::CountMismatch { line, .. }
            | Self::BadSignature { line, .. }
            | Self::BrokenLink { line, .. }
            | Self::OutOfOrder { line, .. }
            | Self::Restarted { line, .. }
            | Self::Replayed { line, .. }
            | Self::ExternalLink { line, .. }
            | Self::Uncovered { line, .. }
            | Self::Unverified { line, .. } => *line,
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

/// The middle of [`VerifyError::BrokenSeqLink`]'s message.
fn previous_phrase(previous: Option<usize>) -> String {
    match previous {
        Some(previous) => format!("the sidecar's previous record (line {previous})"),
        None => "nothing: seq 1 must have prevSeq null".to_owned(),
    }
}

fn records_phrase(n: u64) -> String {
    if n == 1 {
        "1 record".to_owned()
    } else {
        format!("{n} records")
    }
}

/// SHA-256 of the canonical form of `record`: what the next record of its
/// session (or the first record of a delegated session) carries in `prev`, and
/// the next record of its sidecar in `prevSeq`.
pub fn record_hash(record: &Value) -> [u8; 32] {
    sha256(canonical(record).as_bytes())
}

/// What a checkpoint's `sig` signs: the canonical JSON of `checkpoint`
/// without its `sig` field.
pub fn checkpoint_signing_input(checkpoint: &Value) -> String {
    match checkpoint {
        Value::Object(object) if object.contains_key("sig") => {
            let mut unsigned = object.clone();
            unsigned.remove("sig");
            canonical(&Value::Object(unsigned))
        }
        other => canonical(other),
    }
}

/// Verifies a log whose every non-blank line is an audit record; what is not
/// proven (external links, uncovered decisions, unsigned checkpoints) is
/// reported, not an error. Same as [`verify_log_with`] with
/// [`VerifyOptions::default`].
pub fn verify_log(log: &str) -> Result<VerifySummary, VerifyError> {
    verify_log_with(log, VerifyOptions::default())
}

/// Verifies `log` (see the module docs for the rules) without keys: the
/// checkpoints' signatures are not checked (each is counted in
/// [`SidecarTrail::unverified`], an error in strict mode). Returns what the log
/// holds, or the first offending line in line order.
pub fn verify_log_with(log: &str, options: VerifyOptions) -> Result<VerifySummary, VerifyError> {
    verify(log, options, None)
}

/// Verifies `log` and the checkpoints' signatures with `keys`.
pub fn verify_log_signed(
    log: &str,
    options: VerifyOptions,
    keys: &SidecarKeys,
) -> Result<VerifySummary, VerifyError> {
    verify(log, options, Some(keys))
}

/// One sidecar's trail so far, in the second pass.
struct Chain {
    /// Position in the summary's `sidecars`.
    slot: usize,
    next_seq: u64,
    /// Hash and line of the sidecar's previous record.
    last: Option<([u8; 32], usize)>,
    /// 1-based line of its first checkpoint that could not be checked.
    first_unverified: Option<(usize, NoKey)>,
    final_line: Option<usize>,
}

fn verify(
    log: &str,
    options: VerifyOptions,
    keys: Option<&SidecarKeys>,
) -> Result<VerifySummary, VerifyError> {
    // First pass: every record's hash and place in its sidecar's sequence, so
    // that a `prev` can be told apart as a link to a record elsewhere in the
    // log (out of order, cross-session) or to no record of it (missing or
    // modified, external), and a sequence number out of place as early
    // (reordered) or missing.
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
    // (kid, seq) → line of its first occurrence.
    let mut by_seq: HashMap<(&str, u64), usize> = HashMap::with_capacity(records.len());
    for (position, record) in records.iter().enumerate() {
        index.entry(record.hash).or_insert(position);
        by_seq
            .entry((record.kid.as_str(), record.seq))
            .or_insert(record.line);
    }
    // Only decisions are what a session's `prev` links to.
    let linked = |hash: &[u8; 32]| {
        index
            .get(hash)
            .map(|&at| &records[at])
            .filter(|record| matches!(record.body, Body::Decision { .. }))
    };

    // Second pass, in line order; a malformed line is reported where it is.
    let mut summary = VerifySummary {
        skipped,
        ..VerifySummary::default()
    };
    let mut chains: HashMap<&str, Chain> = HashMap::new();
    // Per session: hash and line of its latest record so far.
    let mut last: HashMap<&str, ([u8; 32], usize)> = HashMap::new();
    for record in &records {
        if let Some(error) = malformed.take_if(|error| error.line() < record.line) {
            return Err(error);
        }
        let (line, kid) = (record.line, record.kid.as_str());
        if let Some(first) = index
            .get(&record.hash)
            .map(|&at| records[at].line)
            .filter(|&first| first != line)
        {
            return Err(VerifyError::Replayed { line, first });
        }

        // The sidecar's sequence.
        let chain = chains.entry(kid).or_insert_with(|| {
            summary.sidecars.push(SidecarTrail {
                kid: kid.to_owned(),
                first_line: line,
                ..SidecarTrail::default()
            });
            Chain {
                slot: summary.sidecars.len() - 1,
                next_seq: 1,
                last: None,
                first_unverified: None,
                final_line: None,
            }
        });
        if let Some(final_line) = chain.final_line {
            return Err(VerifyError::AfterFinal {
                line,
                kid: kid.to_owned(),
                final_line,
            });
        }
        let expected = chain.next_seq;
        if record.seq < expected {
            return Err(VerifyError::SeqRepeated {
                line,
                kid: kid.to_owned(),
                seq: record.seq,
                first: by_seq.get(&(kid, record.seq)).copied().unwrap_or(line),
            });
        }
        if record.seq > expected {
            return Err(match by_seq.get(&(kid, expected)) {
                Some(&expected_at) if expected_at > line => VerifyError::SeqOutOfOrder {
                    line,
                    kid: kid.to_owned(),
                    seq: record.seq,
                    expected,
                    expected_at,
                },
                _ => VerifyError::SeqGap {
                    line,
                    kid: kid.to_owned(),
                    seq: record.seq,
                    expected,
                },
            });
        }
        if record.prev_seq != chain.last.map(|(hash, _)| hash) {
            return Err(VerifyError::BrokenSeqLink {
                line,
                kid: kid.to_owned(),
                previous: chain.last.map(|(_, line)| line),
            });
        }
        let slot = chain.slot;
        match &record.body {
            Body::Checkpoint {
                records: claimed,
                is_final,
                signed,
                signature,
            } => {
                let trail = &mut summary.sidecars[slot];
                let counted = trail.records as u64;
                if *claimed != counted {
                    return Err(VerifyError::CountMismatch {
                        line,
                        kid: kid.to_owned(),
                        claimed: *claimed,
                        counted,
                    });
                }
                match keys.map(|keys| keys.verify(kid, signed.as_bytes(), signature)) {
                    Some(Some(true)) => trail.verified += 1,
                    Some(Some(false)) => {
                        return Err(VerifyError::BadSignature {
                            line,
                            kid: kid.to_owned(),
                        });
                    }
                    unchecked => {
                        trail.unverified += 1;
                        let why = match unchecked {
                            None => NoKey::NoKeys,
                            _ => NoKey::UnknownKid,
                        };
                        chain.first_unverified.get_or_insert((line, why));
                    }
                }
                trail.checkpoints += 1;
                trail.uncovered = 0;
                trail.first_uncovered_line = None;
                if *is_final {
                    trail.closed = true;
                    chain.final_line = Some(line);
                }
                summary.checkpoints += 1;
            }
            Body::Decision { session, prev, pod } => {
                let session = session.as_str();
                match (last.get(session), prev) {
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
                        Some(target) if target.session() == Some(session) => {
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
                let trail = &mut summary.sidecars[slot];
                if trail.pod.is_none() {
                    trail.pod.clone_from(pod);
                }
                trail.records += 1;
                trail.uncovered += 1;
                trail.first_uncovered_line.get_or_insert(line);
                summary.records += 1;
            }
        }
        summary.sidecars[slot].last_seq = record.seq;
        chain.next_seq = record.seq + 1;
        chain.last = Some((record.hash, line));
    }
    if let Some(error) = malformed {
        return Err(error);
    }
    summary.sessions = last.len();
    if options.strict {
        // What only the end of the log shows, first line first.
        let mut unproven: Vec<VerifyError> = Vec::new();
        for chain in chains.values() {
            let trail = &summary.sidecars[chain.slot];
            if let Some(line) = trail.first_uncovered_line {
                unproven.push(VerifyError::Uncovered {
                    line,
                    kid: trail.kid.clone(),
                    records: trail.uncovered,
                });
            }
            if let Some((line, why)) = chain.first_unverified {
                unproven.push(VerifyError::Unverified {
                    line,
                    kid: trail.kid.clone(),
                    why,
                });
            }
        }
        if let Some(error) = unproven.into_iter().min_by_key(VerifyError::line) {
            return Err(error);
        }
    }
    Ok(summary)
}

/// One audit record of a log, reduced to what verification needs.
struct Record {
    /// 1-based line number.
    line: usize,
    hash: [u8; 32],
    kid: String,
    seq: u64,
    prev_seq: Option<[u8; 32]>,
    body: Body,
}

impl Record {
    fn session(&self) -> Option<&str> {
        match &self.body {
            Body::Decision { session, .. } => Some(session),
            Body::Checkpoint { .. } => None,
        }
    }
}

/// What kind of record, and what verification needs of it.
enum Body {
    Decision {
        session: String,
        prev: Option<[u8; 32]>,
        /// `namespace/pod` of `agent`, if it names a pod.
        pod: Option<String>,
    },
    Checkpoint {
        records: u64,
        is_final: bool,
        /// What the signature signs ([`checkpoint_signing_input`]).
        signed: String,
        signature: Vec<u8>,
    },
}

/// Whether `value` is what the sidecar writes as an audit record: a
/// checkpoint, or a decision (a `session.chaperone` string and a `decision`).
fn is_record(value: &Value) -> bool {
    value.get("kind").and_then(Value::as_str) == Some(CHECKPOINT_KIND)
        || (value
            .pointer("/session/chaperone")
            .is_some_and(Value::is_string)
            && value.get("decision").is_some())
}

/// The record on a line; `None` for a line skipped as not an audit record.
fn parse_line(
    line: usize,
    text: &str,
    skip_other_lines: bool,
) -> Result<Option<Record>, Malformed> {
    let value = match chaperone_json::parse(text.as_bytes(), chaperone_json::Limits::default()) {
        Ok(value @ Value::Object(_)) => value,
        Ok(_) if skip_other_lines => return Ok(None),
        Ok(_) => return Err(Malformed::NotJsonObject),
        Err(error) => {
            // What a lenient reader takes for an audit record is one, refused;
            // in a Kubernetes log anything else is another line.
            let lenient = serde_json::from_str::<Value>(text).ok();
            return match lenient {
                Some(value) if value.is_object() && (is_record(&value) || !skip_other_lines) => {
                    Err(Malformed::Ambiguous(error))
                }
                _ if skip_other_lines => Ok(None),
                _ => Err(Malformed::NotJsonObject),
            };
        }
    };
    if skip_other_lines && !is_record(&value) {
        return Ok(None);
    }
    let body = match value.get("kind") {
        None => decision_body(&value)?,
        Some(Value::String(kind)) if kind == CHECKPOINT_KIND => checkpoint_body(&value)?,
        Some(_) => return Err(Malformed::UnknownKind),
    };
    let kid = match value.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => return Err(Malformed::NoKid),
    };
    let seq = value
        .get("seq")
        .and_then(Value::as_u64)
        .filter(|&seq| seq > 0)
        .ok_or(Malformed::NoSeq)?;
    let prev_seq = match value.get("prevSeq") {
        Some(Value::Null) => None,
        Some(Value::String(hash)) => Some(parse_sha256(hash).ok_or(Malformed::NoPrevSeq)?),
        _ => return Err(Malformed::NoPrevSeq),
    };
    Ok(Some(Record {
        line,
        hash: record_hash(&value),
        kid,
        seq,
        prev_seq,
        body,
    }))
}

fn decision_body(value: &Value) -> Result<Body, Malformed> {
    let session = value
        .pointer("/session/chaperone")
        .and_then(Value::as_str)
        .ok_or(Malformed::NoSession)?;
    let prev = match value.get("prev") {
        Some(Value::Null) => None,
        Some(Value::String(prev)) => Some(parse_sha256(prev).ok_or(Malformed::PrevNotSha256)?),
        _ => return Err(Malformed::NoPrev),
    };
    let field = |pointer| {
        value
            .pointer(pointer)
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
    };
    let pod = match (field("/agent/namespace"), field("/agent/pod")) {
        (Some(namespace), Some(pod)) => Some(format!("{namespace}/{pod}")),
        (None, Some(pod)) => Some(pod.to_owned()),
        _ => None,
    };
    Ok(Body::Decision {
        session: session.to_owned(),
        prev,
        pod,
    })
}

fn checkpoint_body(value: &Value) -> Result<Body, Malformed> {
    let records = value
        .get("records")
        .and_then(Value::as_u64)
        .ok_or(Malformed::Checkpoint("`records` is not a count"))?;
    let is_final = value
        .get("final")
        .and_then(Value::as_bool)
        .ok_or(Malformed::Checkpoint("`final` is not a boolean"))?;
    if !value.get("time").is_some_and(Value::is_string) {
        return Err(Malformed::Checkpoint("no `time` string"));
    }
    let signature = value
        .get("sig")
        .and_then(Value::as_str)
        .and_then(|sig| URL_SAFE_NO_PAD.decode(sig).ok())
        .ok_or(Malformed::Checkpoint("`sig` is not a base64url signature"))?;
    Ok(Body::Checkpoint {
        records,
        is_final,
        signed: checkpoint_signing_input(value),
        signature,
    })
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
