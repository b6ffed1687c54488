//! `chaperonectl audit verify` on logs written by the sidecar's own audit
//! writer (`chaperone_sidecar::audit::AuditLog`, with its real Ed25519 key and
//! checkpoints), then tampered with: exit status and output, with the keys
//! from a JWKS file or URL, and without.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use chaperone_audit::checkpoint_signing_input;
use chaperone_sidecar::assertion::AssertionSigner;
use chaperone_sidecar::audit::{
    AuditAgent, AuditBuffer, AuditLog, AuditOutput, AuditRecord, AuditSession,
};
use chaperone_sidecar::canonical::{canonical, hex, sha256};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};

/// One sidecar's audit log, written by the sidecar's writer.
struct TestSidecar {
    pod: &'static str,
    log: AuditLog,
    jwk: Value,
    out: AuditBuffer,
    sessions: HashMap<String, String>,
}

impl TestSidecar {
    fn new(pod: &'static str, checkpoint_every: u64) -> Self {
        let out = AuditBuffer::default();
        let signer = AssertionSigner::generate().unwrap();
        let jwk = signer.registration().jwk.clone();
        let log = AuditLog::new(
            AuditOutput::Writer(Box::new(out.clone())),
            None,
            Counter::default(),
            signer,
        )
        .with_checkpoint_every(checkpoint_every);
        Self {
            pod,
            log,
            jwk,
            out,
            sessions: HashMap::new(),
        }
    }

    /// Audits a decision in `session` (its first record links to `link`);
    /// returns the record's hash.
    fn decide(&mut self, session: &str, tool: &str, decision: &str, link: Option<&str>) -> String {
        let prev = link
            .map(str::to_owned)
            .or_else(|| self.sessions.get(session).cloned());
        let record = AuditRecord {
            agent: AuditAgent {
                name: "agent",
                namespace: "shop",
                pod: self.pod,
            },
            approval: None,
            args: "sha256:00",
            chain: &[],
            correlation: "c",
            decision,
            definition: None,
            initiator: None,
            latency_us: 1,
            method: "tools/call",
            prev: prev.as_deref(),
            reason: "test",
            rule: "p/r",
            server: "s",
            session: AuditSession {
                chaperone: session,
                mcp: "",
                scope: "agent",
                key: "",
            },
            snapshot: 1,
            time: "2026-01-01T00:00:00.000Z",
            tool,
        };
        let hash = hex(&self.log.write(&record).unwrap());
        self.sessions.insert(session.to_owned(), hash.clone());
        hash
    }

    /// What the sidecar's writer has written once every record so far is.
    fn text(&self) -> String {
        self.log.flush().unwrap();
        self.out.text()
    }
}

/// A planner and the worker it delegates to, both shut down, their logs
/// concatenated with a tracing line and a text line, and their JWKS.
/// Lines: 1 tracing, 2 plan, 3 delegate, 4 report, 5 planner's final
/// checkpoint, 6 text, 7 refund (links to 3), 8 mail, 9 worker's final
/// checkpoint.
fn delegation_log() -> (Vec<String>, Value) {
    let mut planner = TestSidecar::new("planner-0", 100);
    let mut worker = TestSidecar::new("worker-0", 100);
    planner.decide("orchestrator", "plan", "allow", None);
    let delegate = planner.decide("orchestrator", "delegate", "allow", None);
    worker.decide("worker", "refund", "allow", Some(&delegate));
    planner.decide("orchestrator", "report", "allow", None);
    worker.decide("worker", "mail", "deny", None);
    planner.log.close().unwrap();
    worker.log.close().unwrap();
    let mut lines = vec![
        r#"{"timestamp":"2026-01-01T00:00:00Z","level":"INFO","fields":{"message":"snapshot applied"}}"#
            .to_owned(),
    ];
    lines.extend(planner.text().lines().map(str::to_owned));
    lines.push("chaperone-proxy listening on 0.0.0.0:15001".into());
    lines.extend(worker.text().lines().map(str::to_owned));
    (lines, json!({"keys": [planner.jwk, worker.jwk]}))
}

fn text(lines: &[String]) -> String {
    lines.join("\n") + "\n"
}

fn write_fixture(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("audit_verify_{name}"));
    std::fs::write(&path, text).expect("writing fixture");
    path
}

fn chaperonectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chaperonectl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running chaperonectl");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("writing stdin");
    drop(input);
    child.wait_with_output().expect("waiting for chaperonectl")
}

/// Runs `audit verify` on `text` (with `jwks` as a file when given) and
/// `extra` flags: (success, stdout, stderr).
fn verify(name: &str, text: &str, jwks: Option<&Value>, extra: &[&str]) -> (bool, String, String) {
    let log = write_fixture(&format!("{name}.log"), text);
    let mut args = vec![
        "audit".to_owned(),
        "verify".to_owned(),
        log.display().to_string(),
    ];
    if let Some(jwks) = jwks {
        let file = write_fixture(&format!("{name}.jwks.json"), &jwks.to_string());
        args.extend(["--jwks".to_owned(), file.display().to_string()]);
    }
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = chaperonectl(&args, None);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Verifies strictly with the keys; asserts failure and returns stderr.
fn refused(name: &str, lines: &[String], jwks: &Value) -> String {
    let (ok, stdout, stderr) = verify(name, &text(lines), Some(jwks), &[]);
    assert!(!ok, "verified: {stdout}");
    assert!(stdout.is_empty(), "stdout: {stdout}");
    stderr
}

#[test]
fn complete_log_verifies_strictly_with_the_jwks() {
    let (lines, jwks) = delegation_log();
    let (ok, stdout, stderr) = verify("good", &text(&lines), Some(&jwks), &["--strict"]);
    assert!(ok, "stderr: {stderr}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
    let mut out = stdout.lines();
    assert_eq!(
        out.next(),
        Some(
            "ok: 5 records, 2 checkpoints, 2 sessions, 2 sidecars, 1 cross-agent link, \
             0 external links, 2 other lines skipped"
        )
    );
    let planner = out.next().unwrap();
    assert!(
        planner.contains(
            "(shop/planner-0): seq 1-4, 3 records, 1 checkpoint (signatures verified), closed"
        ),
        "{stdout}"
    );
}

#[test]
fn without_keys_the_structure_is_checked_and_strict_refuses() {
    let (lines, _) = delegation_log();
    let (ok, stdout, stderr) = verify("no_keys", &text(&lines), None, &[]);
    assert!(ok, "stderr: {stderr}");
    assert!(stdout.starts_with("ok: 5 records"), "{stdout}");
    assert!(
        stderr.contains("warning: checkpoint signatures not checked (no --jwks)"),
        "stderr: {stderr}"
    );
    let (ok, _, stderr) = verify("no_keys_strict", &text(&lines), None, &["--strict"]);
    assert!(!ok);
    assert!(
        stderr.contains("line 5: checkpoint of sidecar")
            && stderr.contains(
                "cannot be verified: no keys given (strict); pass the sidecars' keys with --jwks"
            ),
        "stderr: {stderr}"
    );
}

#[test]
fn reads_standard_input() {
    let (lines, _) = delegation_log();
    let output = chaperonectl(&["audit", "verify", "-"], Some(&text(&lines)));
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("ok: 5 records"));
}

#[test]
fn deleted_last_record_of_a_session_is_a_gap() {
    let (mut lines, jwks) = delegation_log();
    lines.remove(3); // the orchestrator's last record, `report`
    let stderr = refused("deleted_last", &lines, &jwks);
    assert!(
        stderr.contains("line 4: gap in the trail of sidecar")
            && stderr.contains("1 record missing before line 4"),
        "stderr: {stderr}"
    );
}

#[test]
fn edited_last_record_of_a_session_breaks_the_trail() {
    let (mut lines, jwks) = delegation_log();
    lines[7] = lines[7].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    let stderr = refused("edited_last", &lines, &jwks);
    assert!(
        stderr.contains("line 9: broken link in the trail of sidecar")
            && stderr.contains("modified or forged before line 9"),
        "stderr: {stderr}"
    );
}

#[test]
fn deleted_one_record_session_is_a_gap() {
    let mut sidecar = TestSidecar::new("agent-0", 100);
    sidecar.decide("s1", "a", "allow", None);
    sidecar.decide("lonely", "b", "deny", None);
    sidecar.decide("s1", "c", "allow", None);
    sidecar.log.close().unwrap();
    let jwks = json!({"keys": [sidecar.jwk]});
    let mut lines: Vec<String> = sidecar.text().lines().map(str::to_owned).collect();
    lines.remove(1);
    let stderr = refused("deleted_session", &lines, &jwks);
    assert!(
        stderr.contains("line 2: gap in the trail"),
        "stderr: {stderr}"
    );
}

#[test]
fn fabricated_session_is_refused_or_unproven() {
    let (lines, jwks) = delegation_log();
    let planner: Value = serde_json::from_str(&lines[4]).unwrap();
    // Appended under the planner's kid, after its final checkpoint.
    let mut forged = lines.clone();
    forged.push(
        json!({
            "agent": {"name": "agent", "namespace": "shop", "pod": "planner-0"},
            "decision": "allow", "kid": planner["kid"], "prev": null,
            "prevSeq": hex(&[0; 32]), "seq": 5,
            "session": {"chaperone": "fabricated", "mcp": ""}, "tool": "refund",
        })
        .to_string(),
    );
    let stderr = refused("fabricated_after_final", &forged, &jwks);
    assert!(
        stderr.contains("line 10: record of sidecar")
            && stderr.contains("after its final checkpoint"),
        "stderr: {stderr}"
    );
    // As a sidecar of its own: nothing signs it.
    let mut invented = TestSidecar::new("planner-0", 100);
    invented.decide("fabricated", "refund", "allow", None);
    let mut forged = lines;
    forged.extend(invented.text().lines().map(str::to_owned));
    let (ok, _, stderr) = verify("fabricated_sidecar", &text(&forged), Some(&jwks), &[]);
    assert!(ok, "stderr: {stderr}");
    assert!(
        stderr.contains("1 record from line 10 on not covered by a checkpoint"),
        "stderr: {stderr}"
    );
    let (ok, _, stderr) = verify(
        "fabricated_strict",
        &text(&forged),
        Some(&jwks),
        &["--strict"],
    );
    assert!(!ok);
    assert!(
        stderr.contains("line 10: 1 record of sidecar") && stderr.contains("not covered"),
        "stderr: {stderr}"
    );
}

#[test]
fn duplicate_decision_key_is_refused() {
    let (mut lines, jwks) = delegation_log();
    lines[7] = lines[7].replace(
        "\"decision\":\"deny\"",
        "\"decision\":\"deny\",\"decision\":\"allow\"",
    );
    let stderr = refused("duplicate_key", &lines, &jwks);
    assert!(
        stderr.contains("line 8: malformed audit record: ambiguous JSON: duplicate object key"),
        "stderr: {stderr}"
    );
}

#[test]
fn reordered_records_are_refused() {
    let (mut lines, jwks) = delegation_log();
    lines.swap(1, 2);
    let stderr = refused("reordered", &lines, &jwks);
    assert!(
        stderr.contains("line 2: out of order in the trail of sidecar"),
        "stderr: {stderr}"
    );
}

#[test]
fn truncation_after_the_last_checkpoint_is_a_warning_with_the_count() {
    // A running sidecar: a checkpoint every 2 records, 5 written, so the
    // last is not covered yet.
    let mut sidecar = TestSidecar::new("agent-0", 2);
    for tool in ["a", "b", "c", "d", "e"] {
        sidecar.decide("s1", tool, "allow", None);
    }
    let jwks = json!({"keys": [sidecar.jwk]});
    let log = sidecar.text();
    let (ok, stdout, stderr) = verify("uncovered", &log, Some(&jwks), &[]);
    assert!(ok, "stderr: {stderr}");
    assert!(stdout.contains("1 record not covered"), "stdout: {stdout}");
    assert!(
        stderr.contains("1 record from line 7 on not covered by a checkpoint"),
        "stderr: {stderr}"
    );
    let (ok, _, stderr) = verify("uncovered_strict", &log, Some(&jwks), &["--strict"]);
    assert!(!ok);
    assert!(
        stderr.contains("line 7: 1 record of sidecar"),
        "stderr: {stderr}"
    );
}

#[test]
fn checkpoint_signed_with_another_key_is_forged() {
    // The worker's `mail` turned into an allow, and its checkpoint rewritten
    // to cover it, signed with a key that is not the worker's.
    let (mut lines, jwks) = delegation_log();
    lines[7] = lines[7].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    let mut checkpoint: Value = serde_json::from_str(&lines[8]).unwrap();
    checkpoint["prevSeq"] = hex(&sha256(lines[7].as_bytes())).into();
    let forger = AssertionSigner::generate().unwrap();
    checkpoint["sig"] = forger
        .sign_detached(checkpoint_signing_input(&checkpoint).as_bytes())
        .into();
    lines[8] = canonical(&checkpoint);
    let stderr = refused("forged_checkpoint", &lines, &jwks);
    assert!(
        stderr.contains("line 9: checkpoint of sidecar")
            && stderr.contains("the signature does not verify"),
        "stderr: {stderr}"
    );
}

#[test]
fn keys_can_come_from_a_url() {
    let (lines, jwks) = delegation_log();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    let body = jwks.to_string();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let read = stream.read(&mut request).unwrap();
        let request = String::from_utf8_lossy(&request[..read]).into_owned();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
        request
    });
    let log = write_fixture("from_url.log", &text(&lines));
    let output = chaperonectl(
        &[
            "audit",
            "verify",
            "--strict",
            "--jwks",
            &url,
            log.to_str().unwrap(),
        ],
        None,
    );
    let request = server.join().unwrap();
    assert!(
        request.starts_with("GET /.well-known/jwks.json "),
        "{request}"
    );
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn unreadable_jwks_fails_before_verifying() {
    let (lines, _) = delegation_log();
    let (ok, _, stderr) = verify("bad_jwks", &text(&lines), Some(&json!({"nokeys": []})), &[]);
    assert!(!ok);
    assert!(
        stderr.contains("the JWKS has no `keys` array"),
        "stderr: {stderr}"
    );
}

#[test]
fn deleted_delegating_record_makes_an_external_link_refused_by_strict() {
    let mut worker = TestSidecar::new("worker-0", 100);
    worker.decide("worker", "refund", "allow", Some(&hex(&[9; 32])));
    worker.log.close().unwrap();
    let jwks = json!({"keys": [worker.jwk]});
    let (ok, stdout, stderr) = verify("external", &worker.text(), Some(&jwks), &[]);
    assert!(ok, "stderr: {stderr}");
    assert!(stdout.contains("1 external link,"), "stdout: {stdout}");
    assert!(
        stderr.contains("external link: line 1: session worker"),
        "stderr: {stderr}"
    );
    let (ok, _, stderr) = verify(
        "external_strict",
        &worker.text(),
        Some(&jwks),
        &["--strict"],
    );
    assert!(!ok);
    assert!(stderr.contains("line 1: external link"), "stderr: {stderr}");
}

#[test]
fn log_without_records_fails() {
    let (ok, _, stderr) = verify("empty", "just text\n", None, &[]);
    assert!(!ok);
    assert!(stderr.contains("no audit records"), "stderr: {stderr}");
}
