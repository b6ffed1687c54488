//! `chaperonectl audit verify` on logs written with chaperone-audit's own
//! canonical hashing: exit status and output for good, tampered and
//! externally linked logs.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use chaperone_audit::{canonical, hex, record_hash};
use serde_json::json;

/// Audit lines chained per session as the sidecar writes them, with a tracing
/// line and a plain-text line in between as in a Kubernetes log.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    last: HashMap<String, [u8; 32]>,
}

impl Log {
    fn record(&mut self, session: &str, tool: &str, link: Option<[u8; 32]>) -> [u8; 32] {
        let prev = link.or_else(|| self.last.get(session).copied());
        let value = json!({
            "agent": {"name": "support", "namespace": "shop", "pod": "support-0"},
            "decision": "allow",
            "prev": prev.map(|hash| hex(&hash)),
            "session": {"chaperone": session, "mcp": "m"},
            "time": "2026-01-01T00:00:00.000Z",
            "tool": tool,
        });
        let hash = record_hash(&value);
        self.lines.push(canonical(&value));
        self.last.insert(session.to_owned(), hash);
        hash
    }

    fn text(&self) -> String {
        self.lines.join("\n") + "\n"
    }
}

/// Orchestrator lines 2, 4, 6; its delegated worker lines 5 (linked to
/// line 4), 7; a tracing line 1 and a text line 3.
fn delegation_log() -> Log {
    let mut log = Log::default();
    log.lines.push(
        r#"{"timestamp":"2026-01-01T00:00:00Z","level":"INFO","fields":{"message":"snapshot applied"}}"#
            .into(),
    );
    log.record("orchestrator", "plan", None);
    log.lines
        .push("chaperone-proxy listening on 0.0.0.0:15001".into());
    let delegate = log.record("orchestrator", "delegate", None);
    log.record("worker", "refund", Some(delegate));
    log.record("orchestrator", "report", None);
    log.record("worker", "mail", None);
    log
}

fn write_fixture(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("audit_verify_{name}.log"));
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

fn verify_file(name: &str, text: &str, extra: &[&str]) -> (bool, String, String) {
    let path = write_fixture(name, text);
    let path = path.to_str().expect("UTF-8 path");
    let mut args = vec!["audit", "verify", path];
    args.extend_from_slice(extra);
    let output = chaperonectl(&args, None);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn good_log_prints_a_summary() {
    let (ok, stdout, stderr) = verify_file("good", &delegation_log().text(), &[]);
    assert!(ok, "stderr: {stderr}");
    assert_eq!(
        stdout,
        "ok: 5 records, 2 sessions, 1 cross-agent link, 0 external links, 2 other lines skipped\n"
    );
}

#[test]
fn reads_standard_input() {
    let output = chaperonectl(&["audit", "verify", "-"], Some(&delegation_log().text()));
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("ok: 5 records"));
}

#[test]
fn tampered_record_fails_naming_the_broken_link() {
    let mut log = delegation_log();
    // The orchestrator's `plan` (line 2): its next record, line 4, no longer links.
    log.lines[1] = log.lines[1].replace("\"tool\":\"plan\"", "\"tool\":\"refund_all\"");
    let (ok, stdout, stderr) = verify_file("tampered", &log.text(), &[]);
    assert!(!ok, "stdout: {stdout}");
    assert!(stdout.is_empty(), "stdout: {stdout}");
    assert!(
        stderr.contains("line 4: broken link in session orchestrator")
            && stderr.contains("missing or modified before line 4"),
        "stderr: {stderr}"
    );
}

#[test]
fn deleted_delegating_record_makes_an_external_link_refused_by_strict() {
    let mut log = delegation_log();
    log.lines.truncate(3);
    log.record("worker", "refund", Some([9; 32]));
    let (ok, stdout, stderr) = verify_file("external", &log.text(), &[]);
    assert!(ok, "stderr: {stderr}");
    assert!(stdout.contains("1 external link,"), "stdout: {stdout}");
    assert!(
        stderr.contains("external link: line 4: session worker"),
        "stderr: {stderr}"
    );
    let (ok, _, stderr) = verify_file("external_strict", &log.text(), &["--strict"]);
    assert!(!ok);
    assert!(stderr.contains("line 4: external link"), "stderr: {stderr}");
}

#[test]
fn log_without_records_fails() {
    let (ok, _, stderr) = verify_file("empty", "just text\n", &[]);
    assert!(!ok);
    assert!(stderr.contains("no audit records"), "stderr: {stderr}");
}
