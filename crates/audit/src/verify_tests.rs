//! Logs built with the crate's own hashing, then tampered with.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::*;

/// Writes records the way the sidecar does: canonical lines, chained per session.
#[derive(Default)]
struct LogBuilder {
    lines: Vec<String>,
    last: HashMap<String, [u8; 32]>,
}

impl LogBuilder {
    /// Appends the next record of `session`; returns its hash.
    fn push(&mut self, session: &str, tool: &str) -> [u8; 32] {
        let prev = self.last.get(session).copied();
        self.push_with_prev(session, tool, prev)
    }

    /// Appends the first record of a delegated `session` linking to `link`.
    fn push_linked(&mut self, session: &str, tool: &str, link: [u8; 32]) -> [u8; 32] {
        assert!(!self.last.contains_key(session), "not a first record");
        self.push_with_prev(session, tool, Some(link))
    }

    fn push_with_prev(&mut self, session: &str, tool: &str, prev: Option<[u8; 32]>) -> [u8; 32] {
        let value = record(session, tool, prev.map(|hash| hex(&hash)));
        let hash = record_hash(&value);
        self.lines.push(canonical(&value));
        self.last.insert(session.to_owned(), hash);
        hash
    }

    fn text(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }
}

fn record(session: &str, tool: &str, prev: Option<String>) -> Value {
    json!({
        "agent": {"name": "a", "namespace": "ns", "pod": "p"},
        "args": "sha256:00",
        "decision": "allow",
        "prev": prev,
        "session": {"chaperone": session, "mcp": ""},
        "tool": tool,
    })
}

/// s1: lines 1, 3, 5; s2: lines 2, 4.
fn two_sessions() -> LogBuilder {
    let mut log = LogBuilder::default();
    log.push("s1", "a");
    log.push("s2", "b");
    log.push("s1", "c");
    log.push("s2", "d");
    log.push("s1", "e");
    log
}

#[test]
fn interleaved_sessions_verify() {
    let summary = verify_log(&two_sessions().text()).unwrap();
    assert_eq!(
        summary,
        VerifySummary {
            records: 5,
            sessions: 2,
            cross_session_links: 0,
            external_links: vec![],
            skipped: 0,
        }
    );
}

#[test]
fn key_order_and_whitespace_do_not_matter() {
    let mut log = two_sessions();
    log.lines[2] =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&log.lines[2]).unwrap())
            .unwrap()
            .replace('\n', " ");
    assert_eq!(verify_log(&log.text()).unwrap().records, 5);
}

#[test]
fn modified_middle_record_breaks_the_next_link_of_its_session() {
    let mut log = two_sessions();
    log.lines[2] = log.lines[2].replace("\"tool\":\"c\"", "\"tool\":\"x\"");
    let error = verify_log(&log.text()).unwrap_err();
    assert_eq!(
        error,
        VerifyError::BrokenLink {
            line: 5,
            session: "s1".into(),
            previous: 3,
        }
    );
    assert!(
        error
            .to_string()
            .contains("record is missing or modified before line 5"),
        "{error}"
    );
}

#[test]
fn deleted_record_is_a_broken_link() {
    let mut log = two_sessions();
    log.lines.remove(2);
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::BrokenLink {
            line: 4,
            session: "s1".into(),
            previous: 1,
        })
    );
}

#[test]
fn swapped_records_of_a_session_are_out_of_order() {
    let mut log = two_sessions();
    log.lines.swap(2, 4);
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::OutOfOrder {
            line: 3,
            session: "s1".into(),
            links_to: 5,
            previous: Some(1),
        })
    );
}

#[test]
fn first_record_after_its_successor_is_out_of_order() {
    let mut log = two_sessions();
    log.lines.swap(0, 2);
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::OutOfOrder {
            line: 1,
            session: "s1".into(),
            links_to: 3,
            previous: None,
        })
    );
}

#[test]
fn duplicated_record_is_replayed() {
    let mut log = two_sessions();
    let copy = log.lines[2].clone();
    log.lines.insert(3, copy);
    let error = verify_log(&log.text()).unwrap_err();
    assert_eq!(
        error,
        VerifyError::Replayed {
            line: 4,
            session: "s1".into(),
            first: 3,
        }
    );
    assert!(error.to_string().starts_with("line 4: replayed"), "{error}");
}

#[test]
fn duplicated_first_record_is_replayed() {
    let mut log = two_sessions();
    let copy = log.lines[0].clone();
    log.lines.push(copy);
    assert!(matches!(
        verify_log(&log.text()),
        Err(VerifyError::Replayed {
            line: 6,
            first: 1,
            ..
        })
    ));
}

#[test]
fn null_prev_after_the_first_record_is_out_of_order() {
    let mut log = two_sessions();
    log.push_with_prev("s2", "again", None);
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::Restarted {
            line: 6,
            session: "s2".into(),
            previous: 4,
        })
    );
}

#[test]
fn delegated_session_links_to_the_delegating_record() {
    let mut log = LogBuilder::default();
    log.push("orchestrator", "plan");
    let delegate = log.push("orchestrator", "delegate");
    log.push_linked("worker", "refund", delegate);
    log.push("orchestrator", "report");
    log.push("worker", "mail");
    let summary = verify_log(&log.text()).unwrap();
    assert_eq!(summary.records, 5);
    assert_eq!(summary.sessions, 2);
    assert_eq!(summary.cross_session_links, 1);
    assert!(summary.external_links.is_empty());
}

#[test]
fn concatenated_logs_may_link_forwards_across_sessions() {
    let mut orchestrator = LogBuilder::default();
    let delegate = orchestrator.push("orchestrator", "delegate");
    orchestrator.push("orchestrator", "report");
    let mut worker = LogBuilder::default();
    worker.push_linked("worker", "refund", delegate);
    worker.push("worker", "mail");
    let text = worker.text() + &orchestrator.text();
    let summary = verify_log(&text).unwrap();
    assert_eq!((summary.records, summary.cross_session_links), (4, 1));
}

#[test]
fn link_to_another_log_is_external_and_counted() {
    let mut log = two_sessions();
    log.push_linked("worker", "refund", [7; 32]);
    log.push("worker", "mail");
    let summary = verify_log(&log.text()).unwrap();
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
}

#[test]
fn strict_mode_refuses_external_links() {
    let mut log = two_sessions();
    log.push_linked("worker", "refund", [7; 32]);
    let strict = VerifyOptions {
        strict: true,
        ..VerifyOptions::default()
    };
    assert!(matches!(
        verify_log_with(&log.text(), strict),
        Err(VerifyError::ExternalLink { line: 6, .. })
    ));
    assert!(verify_log_with(&two_sessions().text(), strict).is_ok());
}

#[test]
fn other_lines_are_malformed_by_default() {
    let mut log = two_sessions();
    log.lines.insert(1, "starting sidecar".into());
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::Malformed {
            line: 2,
            reason: Malformed::NotJsonObject,
        })
    );
    let mut log = two_sessions();
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
fn malformed_line_is_reported_before_later_link_errors() {
    let mut log = two_sessions();
    log.lines[4] = log.lines[4].replace("\"tool\":\"e\"", "\"tool\":\"x\"");
    log.lines.push("{".into());
    log.lines.insert(1, "{".into());
    assert_eq!(verify_log(&log.text()).unwrap_err().line(), 2);
}

#[test]
fn skip_mode_skips_text_and_tracing_lines() {
    let mut log = two_sessions();
    log.lines.insert(0, "plain text".into());
    log.lines.insert(
        3,
        r#"{"level":"INFO","fields":{"message":"x"},"session":{"chaperone":"s1"}}"#.into(),
    );
    log.lines.insert(4, String::new());
    let skip = VerifyOptions {
        skip_other_lines: true,
        ..VerifyOptions::default()
    };
    let summary = verify_log_with(&log.text(), skip).unwrap();
    assert_eq!((summary.records, summary.skipped), (5, 2));
}

#[test]
fn record_without_a_valid_prev_is_malformed() {
    let mut log = two_sessions();
    log.lines[1] = log.lines[1].replace("\"prev\":null,", "");
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::Malformed {
            line: 2,
            reason: Malformed::NoPrev,
        })
    );
    let mut log = two_sessions();
    log.lines[1] = log.lines[1].replace("\"prev\":null", "\"prev\":\"ABC\"");
    assert_eq!(
        verify_log(&log.text()),
        Err(VerifyError::Malformed {
            line: 2,
            reason: Malformed::PrevNotSha256,
        })
    );
}

#[test]
fn blank_lines_count_in_line_numbers() {
    let mut log = two_sessions();
    log.lines.insert(0, String::new());
    log.lines[3] = log.lines[3].replace("\"tool\":\"c\"", "\"tool\":\"x\"");
    assert!(matches!(
        verify_log(&log.text()),
        Err(VerifyError::BrokenLink {
            line: 6,
            previous: 4,
            ..
        })
    ));
}

#[test]
fn parses_what_hex_writes() {
    let digest = sha256(b"x");
    assert_eq!(parse_sha256(&hex(&digest)), Some(digest));
    assert_eq!(parse_sha256(&hex(&digest).to_uppercase()), None);
    assert_eq!(parse_sha256("00"), None);
}
