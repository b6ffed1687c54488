//! Logs built with the crate's own hashing and real Ed25519 keys, as sidecars
//! write them, then tampered with.

use std::collections::HashMap;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{Value, json};

use super::*;

/// One sidecar's sequence: its key, its next `seq`, its last record's hash.
struct Writer {
    kid: String,
    key: Ed25519KeyPair,
    seq: u64,
    last: Option<[u8; 32]>,
    records: u64,
}

/// Writes records the way sidecars do: canonical lines, one sequence per
/// sidecar, chained per session, checkpoints signed with the sidecar's key.
struct LogBuilder {
    lines: Vec<String>,
    sessions: HashMap<String, [u8; 32]>,
    writers: Vec<Writer>,
}

impl LogBuilder {
    /// A log of one sidecar, `k1`.
    fn new() -> Self {
        let mut log = Self {
            lines: Vec::new(),
            sessions: HashMap::new(),
            writers: Vec::new(),
        };
        log.sidecar("k1");
        log
    }

    /// Adds a sidecar; returns its index.
    fn sidecar(&mut self, kid: &str) -> usize {
        self.writers.push(Writer {
            kid: kid.to_owned(),
            key: Ed25519KeyPair::generate().unwrap(),
            seq: 0,
            last: None,
            records: 0,
        });
        self.writers.len() - 1
    }

    /// The public keys of every sidecar of the log.
    fn keys(&self) -> SidecarKeys {
        let mut keys = SidecarKeys::new();
        for writer in &self.writers {
            keys.insert(
                writer.kid.clone(),
                writer.key.public_key().as_ref().try_into().unwrap(),
            );
        }
        keys
    }

    /// Appends the next record of `session` by sidecar 0; returns its hash.
    fn push(&mut self, session: &str, tool: &str) -> [u8; 32] {
        self.push_by(0, session, tool)
    }

    /// Appends the next record of `session` by sidecar `by`.
    fn push_by(&mut self, by: usize, session: &str, tool: &str) -> [u8; 32] {
        let prev = self.sessions.get(session).copied();
        self.push_with_prev(by, session, tool, prev)
    }

    /// Appends the first record of a delegated `session` linking to `link`.
    fn push_linked(&mut self, by: usize, session: &str, tool: &str, link: [u8; 32]) -> [u8; 32] {
        assert!(!self.sessions.contains_key(session), "not a first record");
        self.push_with_prev(by, session, tool, Some(link))
    }

    fn push_with_prev(
        &mut self,
        by: usize,
        session: &str,
        tool: &str,
        prev: Option<[u8; 32]>,
    ) -> [u8; 32] {
        let writer = &mut self.writers[by];
        writer.seq += 1;
        writer.records += 1;
        let value = json!({
            "agent": {"name": "a", "namespace": "ns", "pod": format!("pod-{}", writer.kid)},
            "args": "sha256:00",
            "decision": "allow",
            "kid": writer.kid,
            "prev": prev.map(|hash| hex(&hash)),
            "prevSeq": writer.last.map(|hash| hex(&hash)),
            "seq": writer.seq,
            "session": {"chaperone": session, "mcp": ""},
            "tool": tool,
        });
        let hash = record_hash(&value);
        writer.last = Some(hash);
        self.lines.push(canonical(&value));
        self.sessions.insert(session.to_owned(), hash);
        hash
    }

    /// Appends a checkpoint of sidecar `by`, signed with its own key.
    fn checkpoint(&mut self, by: usize, is_final: bool) -> [u8; 32] {
        self.checkpoint_signed_by(by, is_final, None)
    }

    /// Appends a checkpoint of sidecar `by` signed with `key` (its own when
    /// `None`).
    fn checkpoint_signed_by(
        &mut self,
        by: usize,
        is_final: bool,
        key: Option<&Ed25519KeyPair>,
    ) -> [u8; 32] {
        let writer = &mut self.writers[by];
        writer.seq += 1;
        let mut value = json!({
            "final": is_final,
            "kid": writer.kid,
            "kind": "checkpoint",
            "prevSeq": writer.last.map(|hash| hex(&hash)),
            "records": writer.records,
            "seq": writer.seq,
            "time": "2026-01-01T00:00:05.000Z",
        });
        let signed = checkpoint_signing_input(&value);
        let signature = key.unwrap_or(&writer.key).sign(signed.as_bytes());
        value["sig"] = URL_SAFE_NO_PAD.encode(signature.as_ref()).into();
        let hash = record_hash(&value);
        writer.last = Some(hash);
        self.lines.push(canonical(&value));
        hash
    }

    fn text(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }

    /// Verifies with every sidecar's key.
    fn verify(&self) -> Result<VerifySummary, VerifyError> {
        verify_log_signed(&self.text(), VerifyOptions::default(), &self.keys())
    }

    /// Verifies strictly with every sidecar's key.
    fn verify_strict(&self) -> Result<VerifySummary, VerifyError> {
        verify_log_signed(&self.text(), STRICT, &self.keys())
    }
}

const STRICT: VerifyOptions = VerifyOptions {
    strict: true,
    skip_other_lines: false,
};

/// s1: lines 1, 3, 5; s2: lines 2, 4; no checkpoint.
fn two_sessions() -> LogBuilder {
    let mut log = LogBuilder::new();
    log.push("s1", "a");
    log.push("s2", "b");
    log.push("s1", "c");
    log.push("s2", "d");
    log.push("s1", "e");
    log
}

/// [`two_sessions`] and a checkpoint (line 6).
fn checkpointed() -> LogBuilder {
    let mut log = two_sessions();
    log.checkpoint(0, false);
    log
}

fn replace_line(log: &mut LogBuilder, index: usize, from: &str, to: &str) {
    assert!(log.lines[index].contains(from), "{}", log.lines[index]);
    log.lines[index] = log.lines[index].replace(from, to);
}

// --- What verifies. -------------------------------------------------------

#[test]
fn interleaved_sessions_with_a_signed_checkpoint_verify() {
    let summary = checkpointed().verify_strict().unwrap();
    assert_eq!(
        summary,
        VerifySummary {
            records: 5,
            checkpoints: 1,
            sessions: 2,
            cross_session_links: 0,
            external_links: vec![],
            skipped: 0,
            sidecars: vec![SidecarTrail {
                kid: "k1".into(),
                pod: Some("ns/pod-k1".into()),
                first_line: 1,
                records: 5,
                last_seq: 6,
                checkpoints: 1,
                verified: 1,
                unverified: 0,
                uncovered: 0,
                first_uncovered_line: None,
                closed: false,
            }],
        }
    );
}

#[test]
fn key_order_and_whitespace_do_not_matter() {
    let mut log = checkpointed();
    log.lines[2] =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&log.lines[2]).unwrap())
            .unwrap()
            .replace('\n', " ");
    assert_eq!(log.verify_strict().unwrap().records, 5);
}

#[test]
fn sidecars_interleave_freely_each_in_its_own_sequence() {
    let mut log = LogBuilder::new();
    let k2 = log.sidecar("k2");
    log.push_by(0, "s1", "a");
    log.push_by(k2, "t1", "b");
    log.push_by(k2, "t1", "c");
    log.push_by(0, "s1", "d");
    log.checkpoint(k2, true);
    log.push_by(0, "s2", "e");
    log.checkpoint(0, false);
    let summary = log.verify_strict().unwrap();
    assert_eq!((summary.records, summary.checkpoints), (5, 2));
    let trails: Vec<(&str, u64, bool)> = summary
        .sidecars
        .iter()
        .map(|t| (t.kid.as_str(), t.last_seq, t.closed))
        .collect();
    assert_eq!(trails, [("k1", 4, false), ("k2", 3, true)]);
}

#[test]
fn concatenated_logs_may_link_forwards_across_sessions() {
    let mut orchestrator = LogBuilder::new();
    let delegate = orchestrator.push("orchestrator", "delegate");
    orchestrator.push("orchestrator", "report");
    orchestrator.checkpoint(0, true);
    let mut worker = LogBuilder::new();
    worker.writers[0].kid = "k2".into();
    worker.push_linked(0, "worker", "refund", delegate);
    worker.push("worker", "mail");
    worker.checkpoint(0, true);
    let text = worker.text() + &orchestrator.text();
    let mut keys = orchestrator.keys();
    keys.insert(
        "k2",
        worker.writers[0]
            .key
            .public_key()
            .as_ref()
            .try_into()
            .unwrap(),
    );
    let summary = verify_log_signed(&text, STRICT, &keys).unwrap();
    assert_eq!((summary.records, summary.cross_session_links), (4, 1));
    assert_eq!(summary.sidecars.len(), 2);
}

#[test]
fn delegated_session_links_to_the_delegating_record() {
    let mut log = LogBuilder::new();
    log.push("orchestrator", "plan");
    let delegate = log.push("orchestrator", "delegate");
    log.push_linked(0, "worker", "refund", delegate);
    log.push("orchestrator", "report");
    log.push("worker", "mail");
    log.checkpoint(0, false);
    let summary = log.verify_strict().unwrap();
    assert_eq!((summary.records, summary.sessions), (5, 2));
    assert_eq!(summary.cross_session_links, 1);
    assert!(summary.external_links.is_empty());
}

#[test]
fn a_sidecar_that_decided_nothing_may_close_its_trail() {
    let mut log = LogBuilder::new();
    log.checkpoint(0, true);
    let summary = log.verify_strict().unwrap();
    assert_eq!((summary.records, summary.checkpoints), (0, 1));
    assert!(summary.sidecars[0].closed);
}

// --- The attack: each tampering is an error naming the first bad line. ----

#[test]
fn deleted_last_record_of_a_session_is_a_gap() {
    // s2's last record (line 4, seq 4): the sidecar's next record shows it.
    let mut log = checkpointed();
    log.lines.remove(3);
    let error = log.verify().unwrap_err();
    assert_eq!(
        error,
        VerifyError::SeqGap {
            line: 4,
            kid: "k1".into(),
            seq: 5,
            expected: 4,
        }
    );
    assert!(
        error.to_string().contains("1 record missing before line 4"),
        "{error}"
    );
}

#[test]
fn edited_last_record_of_a_session_breaks_the_sidecar_link() {
    let mut log = checkpointed();
    replace_line(
        &mut log,
        3,
        "\"decision\":\"allow\"",
        "\"decision\":\"deny\"",
    );
    let error = log.verify().unwrap_err();
    assert_eq!(
        error,
        VerifyError::BrokenSeqLink {
            line: 5,
            kid: "k1".into(),
            previous: Some(4),
        }
    );
    assert!(error.to_string().contains("before line 5"), "{error}");
}

#[test]
fn edited_last_record_before_a_checkpoint_breaks_the_checkpoint_link() {
    let mut log = checkpointed();
    replace_line(&mut log, 4, "\"tool\":\"e\"", "\"tool\":\"x\"");
    assert!(matches!(
        log.verify(),
        Err(VerifyError::BrokenSeqLink { line: 6, .. })
    ));
}

#[test]
fn deleted_one_record_session_is_a_gap() {
    let mut log = LogBuilder::new();
    log.push("s1", "a");
    log.push("lonely", "b");
    log.push("s1", "c");
    log.checkpoint(0, false);
    log.lines.remove(1);
    assert!(matches!(
        log.verify(),
        Err(VerifyError::SeqGap {
            line: 2,
            seq: 3,
            expected: 2,
            ..
        })
    ));
}

#[test]
fn deleted_whole_trail_head_is_a_gap() {
    let mut log = checkpointed();
    log.lines.remove(0);
    assert!(matches!(
        log.verify(),
        Err(VerifyError::SeqGap {
            line: 1,
            seq: 2,
            expected: 1,
            ..
        })
    ));
}

#[test]
fn deleted_checkpoint_is_a_gap() {
    let mut log = checkpointed();
    log.push("s1", "f");
    log.lines.remove(5);
    assert!(matches!(
        log.verify(),
        Err(VerifyError::SeqGap {
            line: 6,
            seq: 7,
            expected: 6,
            ..
        })
    ));
}

#[test]
fn fabricated_session_after_a_final_checkpoint_is_refused() {
    let mut log = two_sessions();
    log.checkpoint(0, true);
    log.push("fabricated", "refund");
    assert_eq!(
        log.verify(),
        Err(VerifyError::AfterFinal {
            line: 7,
            kid: "k1".into(),
            final_line: 6,
        })
    );
}

#[test]
fn fabricated_session_after_the_last_checkpoint_is_uncovered() {
    let mut log = checkpointed();
    log.push("fabricated", "refund");
    log.push("fabricated", "mail");
    let summary = log.verify().unwrap();
    assert_eq!(summary.uncovered(), 2);
    assert_eq!(summary.sidecars[0].first_uncovered_line, Some(7));
    assert_eq!(
        log.verify_strict(),
        Err(VerifyError::Uncovered {
            line: 7,
            kid: "k1".into(),
            records: 2,
        })
    );
}

#[test]
fn fabricated_session_of_an_invented_sidecar_is_unproven() {
    let mut log = checkpointed();
    let keys = log.keys();
    let forger = log.sidecar("invented");
    log.push_by(forger, "fabricated", "refund");
    // Without a checkpoint its records are uncovered…
    let summary = verify_log_signed(&log.text(), VerifyOptions::default(), &keys).unwrap();
    assert_eq!(summary.uncovered(), 1);
    assert!(matches!(
        verify_log_signed(&log.text(), STRICT, &keys),
        Err(VerifyError::Uncovered { line: 7, .. })
    ));
    // …and with one it signed itself, its key is nobody's.
    log.checkpoint(forger, true);
    let summary = verify_log_signed(&log.text(), VerifyOptions::default(), &keys).unwrap();
    assert_eq!((summary.uncovered(), summary.unverified()), (0, 1));
    assert_eq!(
        verify_log_signed(&log.text(), STRICT, &keys),
        Err(VerifyError::Unverified {
            line: 8,
            kid: "invented".into(),
            why: NoKey::UnknownKid,
        })
    );
}

#[test]
fn fabricated_session_inside_the_trail_fails_the_checkpoint_signature() {
    // The forger rewrites the sequence around an inserted session but cannot
    // sign: the checkpoint it copies no longer matches.
    let original = checkpointed();
    let mut forged = two_sessions();
    forged.writers[0].key = Ed25519KeyPair::generate().unwrap();
    forged.push("fabricated", "refund");
    forged.writers[0].records -= 1;
    forged.checkpoint(0, false);
    let keys = original.keys();
    assert!(matches!(
        verify_log_signed(&forged.text(), VerifyOptions::default(), &keys),
        Err(VerifyError::CountMismatch { line: 7, .. })
    ));
    forged.lines[6] = original.lines[5].replace("\"seq\":6", "\"seq\":7");
    assert!(matches!(
        verify_log_signed(&forged.text(), VerifyOptions::default(), &keys),
        Err(VerifyError::BrokenSeqLink { line: 7, .. })
    ));
}

#[test]
fn duplicate_decision_key_is_malformed() {
    let mut log = checkpointed();
    replace_line(
        &mut log,
        2,
        "\"decision\":\"allow\"",
        "\"decision\":\"deny\",\"decision\":\"allow\"",
    );
    let error = log.verify().unwrap_err();
    assert!(
        matches!(
            &error,
            VerifyError::Malformed {
                line: 3,
                reason: Malformed::Ambiguous(chaperone_json::JsonError::DuplicateKey { .. }),
            }
        ),
        "{error}"
    );
    // Also where other lines are skipped: it is no other line.
    let skip = VerifyOptions {
        skip_other_lines: true,
        ..VerifyOptions::default()
    };
    assert!(matches!(
        verify_log_with(&log.text(), skip),
        Err(VerifyError::Malformed { line: 3, .. })
    ));
}

#[test]
fn case_colliding_key_is_malformed() {
    let mut log = checkpointed();
    replace_line(
        &mut log,
        1,
        "\"tool\":\"b\"",
        "\"tool\":\"b\",\"TOOL\":\"x\"",
    );
    assert!(matches!(
        log.verify(),
        Err(VerifyError::Malformed {
            line: 2,
            reason: Malformed::Ambiguous(chaperone_json::JsonError::CaseCollision { .. }),
        })
    ));
}

#[test]
fn reordered_records_are_out_of_order() {
    let mut log = checkpointed();
    log.lines.swap(1, 2);
    let error = log.verify().unwrap_err();
    assert_eq!(
        error,
        VerifyError::SeqOutOfOrder {
            line: 2,
            kid: "k1".into(),
            seq: 3,
            expected: 2,
            expected_at: 3,
        }
    );
    assert!(
        error.to_string().starts_with("line 2: out of order"),
        "{error}"
    );
}

#[test]
fn truncation_after_the_last_checkpoint_is_counted() {
    let mut log = checkpointed();
    log.push("s1", "f");
    log.push("s2", "g");
    log.push("s1", "h");
    let whole = log.verify().unwrap();
    assert_eq!(whole.uncovered(), 3);
    // Cut two of them off: still verifies, with the one left counted.
    log.lines.truncate(7);
    let summary = log.verify().unwrap();
    assert_eq!(summary.uncovered(), 1);
    assert_eq!(summary.sidecars[0].first_uncovered_line, Some(7));
    let error = log.verify_strict().unwrap_err();
    assert_eq!(
        error,
        VerifyError::Uncovered {
            line: 7,
            kid: "k1".into(),
            records: 1,
        }
    );
    assert!(
        error.to_string().contains("1 record of sidecar k1"),
        "{error}"
    );
}

#[test]
fn checkpoint_signed_with_another_key_is_forged() {
    let mut log = two_sessions();
    let other = Ed25519KeyPair::generate().unwrap();
    log.checkpoint_signed_by(0, false, Some(&other));
    let error = log.verify().unwrap_err();
    assert_eq!(
        error,
        VerifyError::BadSignature {
            line: 6,
            kid: "k1".into(),
        }
    );
    assert!(error.to_string().contains("forged"), "{error}");
}

#[test]
fn checkpoint_with_an_edited_field_is_forged() {
    let mut log = checkpointed();
    replace_line(&mut log, 5, "2026-01-01T00:00:05", "2027-01-01T00:00:05");
    assert!(matches!(
        log.verify(),
        Err(VerifyError::BadSignature { line: 6, .. })
    ));
}

#[test]
fn checkpoint_count_must_match_the_trail() {
    let mut log = two_sessions();
    log.writers[0].records += 1;
    log.checkpoint(0, false);
    assert_eq!(
        log.verify(),
        Err(VerifyError::CountMismatch {
            line: 6,
            kid: "k1".into(),
            claimed: 6,
            counted: 5,
        })
    );
}

#[test]
fn unsigned_checkpoints_are_reported_and_refused_by_strict() {
    let log = checkpointed();
    let summary = verify_log(&log.text()).unwrap();
    assert_eq!((summary.unverified(), summary.uncovered()), (1, 0));
    assert_eq!(
        verify_log_with(&log.text(), STRICT),
        Err(VerifyError::Unverified {
            line: 6,
            kid: "k1".into(),
            why: NoKey::NoKeys,
        })
    );
    let summary =
        verify_log_signed(&log.text(), VerifyOptions::default(), &SidecarKeys::new()).unwrap();
    assert_eq!(summary.sidecars[0].unverified, 1);
}

#[test]
fn duplicated_record_is_replayed() {
    let mut log = checkpointed();
    let copy = log.lines[2].clone();
    log.lines.insert(3, copy);
    let error = log.verify().unwrap_err();
    assert_eq!(error, VerifyError::Replayed { line: 4, first: 3 });
    assert!(error.to_string().starts_with("line 4: replayed"), "{error}");
}

#[test]
fn reused_seq_is_a_repeat() {
    let mut log = checkpointed();
    let copy = log.lines[2].replace("\"tool\":\"c\"", "\"tool\":\"x\"");
    log.lines.insert(3, copy);
    assert!(matches!(
        log.verify(),
        Err(VerifyError::SeqRepeated {
            line: 4,
            seq: 3,
            first: 3,
            ..
        })
    ));
}

#[test]
fn first_record_with_a_prev_seq_is_broken() {
    let mut log = checkpointed();
    let forged = log.lines[0].replace(
        "\"prevSeq\":null",
        &format!("\"prevSeq\":\"{}\"", hex(&[1; 32])),
    );
    log.lines[0] = forged;
    assert_eq!(
        log.verify(),
        Err(VerifyError::BrokenSeqLink {
            line: 1,
            kid: "k1".into(),
            previous: None,
        })
    );
}

// --- Session links (records a sidecar writes, wrongly linked). -----------

#[test]
fn session_link_to_no_record_is_broken() {
    let mut log = LogBuilder::new();
    log.push("s1", "a");
    log.push_with_prev(0, "s1", "b", Some([3; 32]));
    assert_eq!(
        log.verify(),
        Err(VerifyError::BrokenLink {
            line: 2,
            session: "s1".into(),
            previous: 1,
        })
    );
}

#[test]
fn session_link_to_another_record_is_out_of_order() {
    let mut log = LogBuilder::new();
    let first = log.push("s1", "a");
    log.push("s1", "b");
    log.push_with_prev(0, "s1", "c", Some(first));
    assert_eq!(
        log.verify(),
        Err(VerifyError::OutOfOrder {
            line: 3,
            session: "s1".into(),
            links_to: 1,
            previous: Some(2),
        })
    );
}

#[test]
fn null_prev_after_the_first_record_is_out_of_order() {
    let mut log = two_sessions();
    log.push_with_prev(0, "s2", "again", None);
    assert_eq!(
        log.verify(),
        Err(VerifyError::Restarted {
            line: 6,
            session: "s2".into(),
            previous: 4,
        })
    );
}

#[test]
fn link_to_another_log_is_external_and_counted() {
    let mut log = two_sessions();
    log.push_linked(0, "worker", "refund", [7; 32]);
    log.push("worker", "mail");
    log.checkpoint(0, false);
    let summary = log.verify().unwrap();
    assert_eq!(summary.records, 7);
    assert_eq!(summary.cross_session_links, 0);
    assert_eq!(
        summary.external_links,
        vec![ExternalLink {
            line: 6,
            session: "worker".into(),
            prev: hex(&[7; 32]),
        }]
    );
    assert!(matches!(
        log.verify_strict(),
        Err(VerifyError::ExternalLink { line: 6, .. })
    ));
}

#[test]
fn session_link_to_a_checkpoint_is_no_link() {
    let mut log = LogBuilder::new();
    log.push("s1", "a");
    let checkpoint = log.checkpoint(0, false);
    log.push_linked(0, "worker", "refund", checkpoint);
    let summary = log.verify().unwrap();
    assert_eq!(summary.external_links.len(), 1);
}

// --- Lines that are not records. ------------------------------------------

#[test]
fn other_lines_are_malformed_by_default() {
    let mut log = checkpointed();
    log.lines.insert(1, "starting sidecar".into());
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::Malformed {
            line: 2,
            reason: Malformed::NotJsonObject,
        })
    );
    let mut log = checkpointed();
    log.lines
        .insert(3, r#"{"level":"INFO","fields":{"message":"hi"}}"#.into());
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::Malformed {
            line: 4,
            reason: Malformed::NoSession,
        })
    );
}

#[test]
fn malformed_line_is_reported_before_later_errors() {
    let mut log = checkpointed();
    log.lines[4] = log.lines[4].replace("\"tool\":\"e\"", "\"tool\":\"x\"");
    log.lines.push("{".into());
    log.lines.insert(1, "{".into());
    assert_eq!(log.verify().unwrap_err().line(), 2);
}

#[test]
fn skip_mode_skips_text_and_tracing_lines() {
    let mut log = checkpointed();
    log.lines.insert(0, "plain text".into());
    log.lines.insert(
        3,
        r#"{"level":"INFO","fields":{"message":"x"},"session":{"chaperone":"s1"}}"#.into(),
    );
    log.lines.insert(4, String::new());
    log.lines.insert(5, r#"{"a":1,"a":2}"#.into());
    let skip = VerifyOptions {
        skip_other_lines: true,
        ..VerifyOptions::default()
    };
    let summary = verify_log_signed(&log.text(), skip, &log.keys()).unwrap();
    assert_eq!((summary.records, summary.skipped), (5, 3));
}

#[test]
fn record_without_a_valid_prev_is_malformed() {
    let mut log = two_sessions();
    replace_line(&mut log, 1, "\"prev\":null,", "");
    assert_eq!(
        log.verify(),
        Err(VerifyError::Malformed {
            line: 2,
            reason: Malformed::NoPrev,
        })
    );
    let mut log = two_sessions();
    replace_line(&mut log, 1, "\"prev\":null", "\"prev\":\"ABC\"");
    assert_eq!(
        log.verify(),
        Err(VerifyError::Malformed {
            line: 2,
            reason: Malformed::PrevNotSha256,
        })
    );
}

#[test]
fn record_without_its_sidecar_sequence_is_malformed() {
    let cases = [
        ("\"kid\":\"k1\",", "", Malformed::NoKid),
        ("\"seq\":2,", "", Malformed::NoSeq),
        ("\"seq\":2,", "\"seq\":0,", Malformed::NoSeq),
        ("\"seq\":2,", "\"seq\":2.5,", Malformed::NoSeq),
        ("\"prevSeq\":\"", "\"prevSeq\":\"00", Malformed::NoPrevSeq),
        (
            "\"decision\"",
            "\"kind\":\"other\",\"decision\"",
            Malformed::UnknownKind,
        ),
    ];
    for (from, to, reason) in cases {
        let mut log = two_sessions();
        replace_line(&mut log, 1, from, to);
        assert_eq!(
            log.verify(),
            Err(VerifyError::Malformed { line: 2, reason }),
            "{from} → {to}"
        );
    }
}

#[test]
fn checkpoint_without_its_fields_is_malformed() {
    for (from, to) in [
        ("\"records\":5,", ""),
        ("\"final\":false,", ""),
        ("\"time\":", "\"when\":"),
        ("\"sig\":\"", "\"sig\":\"*"),
    ] {
        let mut log = checkpointed();
        replace_line(&mut log, 5, from, to);
        assert!(
            matches!(
                log.verify(),
                Err(VerifyError::Malformed {
                    line: 6,
                    reason: Malformed::Checkpoint(_),
                })
            ),
            "{from} → {to}"
        );
    }
}

#[test]
fn blank_lines_count_in_line_numbers() {
    let mut log = checkpointed();
    log.lines.insert(0, String::new());
    replace_line(&mut log, 3, "\"tool\":\"c\"", "\"tool\":\"x\"");
    assert!(matches!(
        log.verify(),
        Err(VerifyError::BrokenSeqLink {
            line: 5,
            previous: Some(4),
            ..
        })
    ));
}

#[test]
fn signing_input_leaves_out_the_signature_only() {
    let value = json!({"kind": "checkpoint", "seq": 2, "sig": "x"});
    assert_eq!(
        checkpoint_signing_input(&value),
        r#"{"kind":"checkpoint","seq":2}"#
    );
}

#[test]
fn parses_what_hex_writes() {
    let digest = sha256(b"x");
    assert_eq!(parse_sha256(&hex(&digest)), Some(digest));
    assert_eq!(parse_sha256(&hex(&digest).to_uppercase()), None);
    assert_eq!(parse_sha256("00"), None);
}
