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
    assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
    assert_eq!(
        rfc3339_millis(253_402_300_799_999),
        "9999-12-31T23:59:59.999Z"
    );
    // Past the four-digit years the text grows, as `format!` writes it.
    assert_eq!(
        rfc3339_millis(253_402_300_800_000),
        "10000-01-01T00:00:00.000Z"
    );
}

#[test]
fn rfc3339_digits_written_in_place_match_format() {
    // Every field through its whole range: a step prime to the lengths of
    // seconds, minutes, hours and days, over 0000-01-01 to 9999-12-31.
    let first = -62_167_219_200_000_i64;
    let last = 253_402_300_799_999_i64;
    let mut unix_ms = first;
    while unix_ms <= last {
        let time = CivilTime::of(unix_ms);
        assert_eq!(rfc3339_millis(unix_ms), time.formatted(), "{unix_ms}");
        unix_ms += 1_234_567_891_i64 * 97 + 7;
    }
    assert_eq!(rfc3339_millis(first), "0000-01-01T00:00:00.000Z");
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
    log.track_request(async { log.settled().await.unwrap() })
        .await;
    // One that appended a record waits for it.
    let waiting = log.track_request(async {
        log.write(&record("mine", None, "b")).unwrap();
        log.settled().await
    });
    tokio::pin!(waiting);
    assert_still_waiting(waiting.as_mut(), "settled before its record was written").await;
    output.open(true);
    waiting.await.unwrap();
    assert_eq!(output.buffer.records().len(), 2);
}

/// A log writing to a pipe, the pipe's reading end, a second handle on its
/// writing end (to fill it), and the keys that verify the log.
fn log_to_pipe() -> (AuditLog, std::io::PipeReader, std::fs::File, SidecarKeys) {
    let (reader, writer) = std::io::pipe().unwrap();
    let writer = std::fs::File::from(std::os::fd::OwnedFd::from(writer));
    let filler = writer.try_clone().unwrap();
    let signer = AssertionSigner::generate().unwrap();
    let mut keys = SidecarKeys::new();
    let registration = signer.registration();
    keys.insert(registration.kid.clone(), registration.public_key);
    let log = AuditLog::new(AuditOutput::File(writer), None, Counter::default(), signer);
    (log, reader, filler, keys)
}

/// Copies everything `reader` gives into a buffer, on its own thread.
fn drain(mut reader: std::io::PipeReader) -> AuditBuffer {
    let buffer = AuditBuffer::default();
    let mut out = buffer.clone();
    std::thread::spawn(move || std::io::copy(&mut reader, &mut out));
    buffer
}

/// Waits up to five seconds for `buffer` to hold `n` records.
fn wait_for_records(buffer: &AuditBuffer, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let records = buffer.records();
        if records.len() >= n || std::time::Instant::now() > deadline {
            assert_eq!(records.len(), n, "{}", buffer.text());
            return records;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Fills `pipe` with 4 KiB filler lines (not JSON) until it takes no more.
#[cfg(target_os = "linux")]
fn fill(pipe: &std::fs::File) {
    let mut line = vec![b'x'; 4095];
    line.push(b'\n');
    loop {
        match write_nowait(pipe, &[String::from_utf8(line.clone()).unwrap()]) {
            Ok(n) => assert_eq!(n, line.len(), "pipe slots hold whole pages"),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(err) => panic!("{err}"),
        }
    }
}

/// The JSON lines of `text` (dropping the filler), verified as one log.
fn verify_json_lines(text: &str, keys: &SidecarKeys) -> usize {
    let log: String = text
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| format!("{line}\n"))
        .collect();
    verify_log_signed(&log, VerifyOptions::default(), keys).unwrap();
    log.lines().count()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn requests_write_their_own_records_to_a_pipe() {
    let (log, reader, _, keys) = log_to_pipe();
    let buffer = drain(reader);
    let mut prev = None;
    for tool in ["a", "b", "c"] {
        let hash = log
            .track_request(async {
                let hash = log.write(&record("s", prev.as_deref(), tool)).unwrap();
                log.settled().await.unwrap();
                hash
            })
            .await;
        prev = Some(hex(&hash));
    }
    assert_eq!(log.thread_batches(), 0, "no record went through the thread");
    // The final checkpoint is appended outside any request: the thread's.
    log.close().unwrap();
    assert_eq!(log.thread_batches(), 1);
    wait_for_records(&buffer, 4);
    assert_eq!(verify_json_lines(&buffer.text(), &keys), 4);
}

/// Runs a request appending `record` on a current-thread runtime of its own
/// thread (a write that blocked would hang that thread, not the test),
/// checks that it waits with the runtime going on, then lets `reader`
/// drain the pipe and waits for the request.
#[cfg(target_os = "linux")]
fn request_behind_a_full_pipe(
    log: &Arc<AuditLog>,
    record: AuditRecord<'static>,
    reader: std::io::PipeReader,
) -> AuditBuffer {
    let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
    let request = std::thread::spawn({
        let log = Arc::clone(log);
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                let waiting = log.track_request(async {
                    log.write(&record).unwrap();
                    log.settled().await
                });
                tokio::pin!(waiting);
                assert_still_waiting(waiting.as_mut(), "settled with its record unwritten").await;
                waiting_tx.send(()).unwrap();
                waiting.await
            })
        }
    });
    waiting_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the request's runtime went on while the pipe was full");
    let buffer = drain(reader);
    request.join().unwrap().unwrap();
    buffer
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_pipe_leaves_the_write_to_the_thread_and_never_blocks_the_runtime() {
    let (log, reader, filler, keys) = log_to_pipe();
    fill(&filler);
    let log = Arc::new(log);
    let buffer = request_behind_a_full_pipe(&log, record("s", None, "a"), reader);
    assert_eq!(log.thread_batches(), 1, "the thread wrote the record");
    // With the pipe read to the end, requests write their own records again.
    wait_for_records(&buffer, 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(log.track_request(async {
        log.write(&record("t", None, "b")).unwrap();
        log.settled().await.unwrap();
    }));
    assert_eq!(log.thread_batches(), 1);
    wait_for_records(&buffer, 2);
    assert_eq!(verify_json_lines(&buffer.text(), &keys), 2);
}

#[cfg(target_os = "linux")]
#[test]
fn a_record_the_pipe_takes_in_part_is_finished_by_the_thread_in_order() {
    let (log, mut reader, filler, keys) = log_to_pipe();
    fill(&filler);
    // One page read back: the pipe takes 4 KiB more, less than the record.
    let mut page = vec![0; 4096];
    std::io::Read::read_exact(&mut reader, &mut page).unwrap();
    let tool: &'static str = "t".repeat(6000).leak();
    let log = Arc::new(log);
    let buffer = request_behind_a_full_pipe(&log, record("s", None, tool), reader);
    assert_eq!(log.thread_batches(), 1);
    let records = wait_for_records(&buffer, 1);
    assert_eq!(records[0]["tool"], tool);
    assert_eq!(verify_json_lines(&buffer.text(), &keys), 1);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn records_of_a_dropped_request_and_outside_requests_reach_the_pipe() {
    let (log, reader, _, _) = log_to_pipe();
    let buffer = drain(reader);
    {
        // Appends, then never settles: dropped like a request whose client
        // went away.
        let request = log.track_request(async {
            log.write(&record("s", None, "a")).unwrap();
            std::future::pending::<()>().await;
        });
        tokio::pin!(request);
        assert_still_waiting(request.as_mut(), "a pending future completed").await;
    }
    wait_for_records(&buffer, 1);
    wait_for_thread_batches(&log, 1);
    // Outside a request (a checkpoint on the timer): written unasked.
    assert!(log.checkpoint().unwrap());
    wait_for_records(&buffer, 2);
    wait_for_thread_batches(&log, 2);
}

/// Waits up to five seconds for the writer thread to have written `n`
/// batches (it counts a batch just after the pipe took it).
fn wait_for_thread_batches(log: &AuditLog, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.thread_batches() < n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(log.thread_batches(), n);
}

#[tokio::test]
async fn an_output_refusing_nonblocking_writes_is_written_by_the_thread() {
    // Regular files take no RWF_NOWAIT write at the file position.
    let file = tempfile::NamedTempFile::new().unwrap();
    let log = AuditLog::new(
        AuditOutput::File(file.reopen().unwrap()),
        None,
        Counter::default(),
        AssertionSigner::generate().unwrap(),
    );
    for tool in ["a", "b"] {
        log.track_request(async {
            log.write(&record("s", None, tool)).unwrap();
            log.settled().await.unwrap();
        })
        .await;
    }
    assert!(
        !log.inline_writes(),
        "this test needs a temporary directory that refuses RWF_NOWAIT buffered writes (ext4, tmpfs)"
    );
    assert_eq!(log.thread_batches(), 2);
    let text = std::fs::read_to_string(file.path()).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_pipe_nobody_reads_fails_the_trail() {
    let (log, reader, _, _) = log_to_pipe();
    drop(reader);
    let err = log
        .track_request(async {
            log.write(&record("s", None, "a")).unwrap();
            log.settled().await
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Broken pipe"), "{err}");
    let err = log.write(&record("s", None, "b")).unwrap_err();
    assert!(err.to_string().contains("Broken pipe"), "{err}");
}
