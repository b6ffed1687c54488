use chaperone_audit::{SidecarKeys, VerifyOptions, verify_log_signed};
use serde_json::Value;

use super::*;
use crate::canonical::canonical;

const STRICT: VerifyOptions = VerifyOptions {
    strict: true,
    skip_other_lines: false,
};

fn record<'a>(session: &'a str, prev: Option<&'a str>, tool: &'a str) -> AuditRecord<'a> {
    AuditRecord {
        agent: AuditAgent {
            name: "a",
            namespace: "ns",
            pod: "p",
        },
        approval: None,
        args: "sha256:00",
        chain: &[],
        correlation: "c",
        decision: "allow",
        definition: None,
        initiator: None,
        latency_us: 3,
        method: "tools/call",
        prev,
        reason: "an allow rule matched \"x\"",
        rule: "p/r",
        server: "s",
        session: AuditSession {
            chaperone: session,
            mcp: "m",
            scope: "mcpSession",
            key: "m",
        },
        snapshot: 1,
        time: "2026-01-01T00:00:00.000Z",
        tool,
    }
}

/// A log writing to a buffer, and the keys that verify it.
fn log_to_buffer(every: u64) -> (AuditLog, AuditBuffer, SidecarKeys) {
    let buffer = AuditBuffer::default();
    let signer = AssertionSigner::generate().unwrap();
    let mut keys = SidecarKeys::new();
    let registration = signer.registration();
    keys.insert(registration.kid.clone(), registration.public_key);
    let log = AuditLog::new(
        AuditOutput::Writer(Box::new(buffer.clone())),
        None,
        Counter::default(),
        signer,
    )
    .with_checkpoint_every(every);
    (log, buffer, keys)
}

#[test]
fn written_lines_are_canonical() {
    let (log, buffer, _) = log_to_buffer(100);
    let mut with_initiator = record("s1", None, "t");
    with_initiator.initiator = Some("alice");
    with_initiator.chain = &[];
    log.write(&with_initiator).unwrap();
    let mut with_approval = record("s3", None, "t");
    with_approval.decision = "approval";
    with_approval.approval = Some(AuditApproval {
        decided_by: Some("bob"),
        name: Some("agent-x7k2p"),
        phase: "Denied",
    });
    log.write(&with_approval).unwrap();
    let mut unnamed = record("s4", None, "t");
    unnamed.approval = Some(AuditApproval {
        decided_by: None,
        name: None,
        phase: "Pending",
    });
    log.write(&unnamed).unwrap();
    log.write(&record("s2", None, "t")).unwrap();
    log.close().unwrap();
    let text = buffer.text();
    for line in text.lines() {
        let value: Value = serde_json::from_str(line).unwrap();
        assert_eq!(canonical(&value), line);
    }
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["kind"], "checkpoint");
    assert_eq!(
        (last["seq"].as_u64(), last["records"].as_u64()),
        (Some(5), Some(4))
    );
    let approval: Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
    assert_eq!(
        approval["approval"],
        serde_json::json!({"decidedBy": "bob", "name": "agent-x7k2p", "phase": "Denied"})
    );
    let plain: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(plain.get("approval").is_none(), "{plain}");
    assert_eq!(last["kid"], log.kid());
}

#[test]
fn records_chain_per_session_and_per_sidecar_and_verify() {
    let (log, buffer, keys) = log_to_buffer(100);
    let h1 = hex(&log.write(&record("s1", None, "a")).unwrap());
    log.write(&record("s2", None, "b")).unwrap();
    log.write(&record("s1", Some(&h1), "c")).unwrap();
    log.close().unwrap();
    let text = buffer.text();
    let summary = verify_log_signed(&text, STRICT, &keys).unwrap();
    assert_eq!((summary.records, summary.checkpoints), (3, 1));
    assert!(summary.sidecars[0].closed);
    let tampered = text.replacen("\"tool\":\"a\"", "\"tool\":\"x\"", 1);
    assert!(matches!(
        verify_log_signed(&tampered, STRICT, &keys),
        Err(VerifyError::BrokenSeqLink { line: 2, .. })
    ));
}

#[test]
fn a_checkpoint_follows_every_n_decisions() {
    let (log, buffer, keys) = log_to_buffer(2);
    for tool in ["a", "b", "c", "d", "e"] {
        log.write(&record(tool, None, tool)).unwrap();
    }
    log.flush().unwrap();
    let text = buffer.text();
    let kinds: Vec<bool> = text
        .lines()
        .map(|l| l.contains("\"kind\":\"checkpoint\""))
        .collect();
    assert_eq!(kinds, [false, false, true, false, false, true, false]);
    let summary = verify_log_signed(&text, VerifyOptions::default(), &keys).unwrap();
    assert_eq!((summary.checkpoints, summary.uncovered()), (2, 1));
    assert_eq!(summary.sidecars[0].verified, 2);
}

#[test]
fn timer_checkpoints_only_cover_something() {
    let (log, buffer, keys) = log_to_buffer(100);
    assert!(!log.checkpoint().unwrap());
    log.write(&record("s", None, "a")).unwrap();
    assert!(log.checkpoint().unwrap());
    assert!(!log.checkpoint().unwrap());
    log.flush().unwrap();
    let summary = verify_log_signed(&buffer.text(), STRICT, &keys).unwrap();
    assert_eq!((summary.records, summary.checkpoints), (1, 1));
}

#[test]
fn closing_ends_the_trail_and_refuses_later_records() {
    let (log, buffer, keys) = log_to_buffer(100);
    log.close().unwrap();
    log.close().unwrap();
    assert!(log.write(&record("s", None, "a")).is_err());
    assert!(!log.checkpoint().unwrap());
    let summary = verify_log_signed(&buffer.text(), STRICT, &keys).unwrap();
    assert_eq!((summary.records, summary.checkpoints), (0, 1));
    assert!(summary.sidecars[0].closed);
}

#[test]
fn concurrent_sessions_form_one_sequence_in_line_order() {
    let (log, buffer, keys) = log_to_buffer(7);
    let log = Arc::new(log);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let session = format!("s{t}");
                let mut prev: Option<String> = None;
                for _ in 0..50 {
                    let hash = log.write(&record(&session, prev.as_deref(), "t")).unwrap();
                    prev = Some(hex(&hash));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    log.close().unwrap();
    let summary = verify_log_signed(&buffer.text(), STRICT, &keys).unwrap();
    assert_eq!((summary.records, summary.sessions), (400, 8));
    assert_eq!(summary.checkpoints, 400 / 7 + 1);
}

#[test]
fn lines_are_shipped_in_sequence_order() {
    let (tx, mut rx) = mpsc::channel(16);
    let buffer = AuditBuffer::default();
    let log = AuditLog::new(
        AuditOutput::Writer(Box::new(buffer.clone())),
        Some(tx),
        Counter::default(),
        AssertionSigner::generate().unwrap(),
    );
    log.write(&record("s", None, "a")).unwrap();
    log.close().unwrap();
    let mut shipped = String::new();
    while let Ok(line) = rx.try_recv() {
        shipped.push_str(&line);
        shipped.push('\n');
    }
    assert_eq!(shipped, buffer.text());
}

#[test]
fn full_shipping_queue_counts_drops() {
    let (tx, _rx) = mpsc::channel(1);
    let dropped = Counter::default();
    let log = AuditLog::new(
        AuditOutput::Writer(Box::new(std::io::sink())),
        Some(tx),
        dropped.clone(),
        AssertionSigner::generate().unwrap(),
    );
    log.write(&record("s", None, "a")).unwrap();
    log.write(&record("s", None, "b")).unwrap();
    log.flush().unwrap();
    assert_eq!(dropped.get(), 1);
}

#[test]
fn formats_rfc3339() {
    assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        rfc3339_millis(1_700_000_000_123),
        "2023-11-14T22:13:20.123Z"
    );
}

#[test]
fn pinning_refusals_name_both_hashes_in_canonical_order() {
    let (log, buffer, _) = log_to_buffer(100);
    let mut refused = record("s1", None, "refund");
    refused.decision = "deny";
    refused.rule = "toolPinning";
    refused.definition = Some(AuditDefinition {
        current: Some("sha256:22"),
        pinned: Some("sha256:11"),
    });
    log.write(&refused).unwrap();
    let mut unseen = record("s2", None, "refund");
    unseen.definition = Some(AuditDefinition {
        current: None,
        pinned: None,
    });
    log.write(&unseen).unwrap();
    log.write(&record("s3", None, "t")).unwrap();
    log.flush().unwrap();
    let text = buffer.text();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap();
            assert_eq!(canonical(&value), line);
            value
        })
        .collect();
    assert_eq!(
        lines[0]["definition"],
        serde_json::json!({"current": "sha256:22", "pinned": "sha256:11"})
    );
    assert_eq!(lines[1]["definition"], serde_json::json!({}));
    assert!(lines[2].get("definition").is_none(), "{}", lines[2]);
}

/// An output that takes nothing until the test opens it, then writes to a
/// buffer (or fails, when told to).
#[derive(Clone, Default)]
struct GatedOutput {
    open: Arc<(Mutex<Option<bool>>, std::sync::Condvar)>,
    buffer: AuditBuffer,
}

impl GatedOutput {
    /// Lets writes through (`true`) or makes them fail (`false`).
    fn open(&self, succeed: bool) {
        *self.open.0.lock().unwrap() = Some(succeed);
        self.open.1.notify_all();
    }
}

impl Write for GatedOutput {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut open = self.open.0.lock().unwrap();
        while open.is_none() {
            open = self.open.1.wait(open).unwrap();
        }
        if *open == Some(false) {
            return Err(std::io::Error::other("pipe closed"));
        }
        self.buffer.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fails with `why` if `waiting` completes within 50 ms.
async fn assert_still_waiting<F: Future>(waiting: std::pin::Pin<&mut F>, why: &str) {
    let done = tokio::time::timeout(Duration::from_millis(50), waiting).await;
    assert!(done.is_err(), "{why}");
}

fn gated_log() -> (AuditLog, GatedOutput) {
    let output = GatedOutput::default();
    let log = AuditLog::new(
        AuditOutput::Writer(Box::new(output.clone())),
        None,
        Counter::default(),
        AssertionSigner::generate().unwrap(),
    );
    (log, output)
}

#[tokio::test]
async fn responses_wait_until_their_records_are_written() {
    let (log, output) = gated_log();
    log.write(&record("s", None, "a")).unwrap();
    let settled = log.settled();
    tokio::pin!(settled);
    assert_still_waiting(
        settled.as_mut(),
        "settled before the output took the record",
    )
    .await;
    assert_eq!(output.buffer.text(), "");
    output.open(true);
    settled.await.unwrap();
    assert_eq!(output.buffer.records().len(), 1);
    // Nothing new appended: settled at once.
    log.settled().await.unwrap();
}

#[tokio::test]
async fn a_failed_output_refuses_waiting_responses_and_every_later_record() {
    let (log, output) = gated_log();
    log.write(&record("s", None, "a")).unwrap();
    output.open(false);
    let err = log.settled().await.unwrap_err();
    assert!(err.to_string().contains("pipe closed"), "{err}");
    let err = log.write(&record("s", None, "b")).unwrap_err();
    assert!(err.to_string().contains("pipe closed"), "{err}");
    assert!(log.checkpoint().is_err());
    assert!(log.close().is_err());
}

#[test]
fn a_stalled_output_refuses_records_beyond_the_bound() {
    let (log, output) = gated_log();
    let log = log.with_max_pending_bytes(1000);
    // The writer takes the first record and blocks in `write`; the next
    // ones wait for it until more than 1000 bytes are pending.
    let mut appended = 0;
    let err = loop {
        match log.write(&record("s", None, "a")) {
            Ok(_) => appended += 1,
            Err(err) => break err,
        }
        assert!(appended < 100, "never refused");
    };
    assert!(err.to_string().contains("not taking lines"), "{err}");
    assert!(appended >= 2, "refused too early: {appended}");
    output.open(true);
    log.flush().unwrap();
    log.write(&record("s", None, "b")).unwrap();
    log.close().unwrap();
    let records = output.buffer.records();
    assert_eq!(
        records.len(),
        appended + 2,
        "every appended record and the final checkpoint"
    );
}

#[tokio::test]
async fn a_request_waits_for_its_own_records_only() {
    let (log, output) = gated_log();
    // Another request's record, stuck behind an output that takes nothing.
    log.write(&record("other", None, "a")).unwrap();
    // A request that appended nothing is answered at once.
    track_request(async { log.settled().await.unwrap() }).await;
    // One that appended a record waits for it.
    let waiting = track_request(async {
        log.write(&record("mine", None, "b")).unwrap();
        log.settled().await
    });
    tokio::pin!(waiting);
    assert_still_waiting(waiting.as_mut(), "settled before its record was written").await;
    output.open(true);
    waiting.await.unwrap();
    assert_eq!(output.buffer.records().len(), 2);
}
