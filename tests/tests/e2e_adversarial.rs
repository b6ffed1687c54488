//! The attacks of the enforcement-integrity review, run against real MCP
//! servers behind a real sidecar: the official TypeScript SDK at 1.17.x (which
//! honours a request's charset) and at its current version, over Streamable
//! HTTP and its legacy SSE transport; mcp-go with typed argument binding (Go's
//! case-insensitive, last-wins field matching); the official Python SDK. Each
//! server writes what it executed, as its SDK bound it, to an exec log: the
//! tests assert that nothing forbidden executed, that the allowed controls did,
//! and that every refusal left an audit record.
//!
//! The servers and their versions come from `tests/servers/` (installed by
//! `make tools`; versions pinned in `scripts/tool-versions.env`).

use std::io::BufReader;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chaperone_sidecar::{Settings, standalone};
use chaperone_testenv::mcp_servers::{
    Answer, RunningServer, ServerKind, Transport, http, jsonrpc_answer, next_event, spawn,
};
use chaperone_testenv::sidecar_fixtures::TestSidecar;
use serde_json::{Value, json};

const IDENTITY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata:
  name: payments-agent
  namespace: pay
spec:
  selector:
    serviceAccountName: payments-agent
  toolServers:
    - name: target
      url: UPSTREAM_URL
"#;

/// `echo` and `transfer` up to 100 are allowed; `delete_user` never.
const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata:
  name: payments
  namespace: pay
spec:
  targetRefs:
    - name: payments-agent
  rules:
    - name: no-deletes
      action: deny
      tools:
        - name: delete_user
    - name: echo
      action: allow
      tools:
        - name: echo
    - name: small-transfers
      action: allow
      tools:
        - name: transfer
      when:
        args:
          - pointer: /amount
            lessThanOrEqual: 100
"#;

/// As UTF-8: an allowed `echo`. As UTF-7 (`+ACIALAAi-` is `","`, `+ACI-` is
/// `"`): a second `name`, `delete_user`, which JavaScript's last-wins reading
/// executes.
const UTF7_SMUGGLED_DELETE: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"id":"u1"},"x":"+ACIALAAi-name+ACI-:+ACI-delete_user"}}"#;

fn call(id: u32, name: &str, arguments: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{name}","arguments":{arguments}}}}}"#
    )
}

/// One client session through the sidecar's proxy port to `/target`, by hand
/// (the bytes sent are exactly the ones written here).
struct Session {
    port: u16,
    post_path: String,
    session_id: Option<String>,
    /// The legacy SSE transport's event stream (held open for the session).
    events: Option<BufReader<TcpStream>>,
}

const ACCEPT: &str = "Accept: application/json, text/event-stream";

impl Session {
    fn open(port: u16, transport: Transport) -> Result<Self> {
        let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "attacker", "version": "0"}}})
        .to_string();
        let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        match transport {
            Transport::StreamableHttp => {
                let mut session = Self {
                    port,
                    post_path: "/target".to_owned(),
                    session_id: None,
                    events: None,
                };
                let (status, headers, body) =
                    session.post_raw(Some("application/json"), initialize.as_bytes(), &[])?;
                ensure!(
                    status == 200,
                    "initialize through the sidecar: {status} {body}"
                );
                session.session_id = headers
                    .iter()
                    .find(|(k, _)| k == "mcp-session-id")
                    .map(|(_, v)| v.clone());
                session.post(initialized.as_bytes())?;
                Ok(session)
            }
            Transport::Sse => {
                use std::io::Write;
                let mut stream = TcpStream::connect(("127.0.0.1", port))?;
                stream.set_read_timeout(Some(Duration::from_secs(20)))?;
                stream
                    .write_all(b"GET /target/sse HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n")?;
                let mut events = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    std::io::BufRead::read_line(&mut events, &mut line)?;
                    if line.trim().is_empty() {
                        break;
                    }
                }
                let (kind, endpoint) = next_event(&mut events)?;
                ensure!(kind == "endpoint", "first event {kind}: {endpoint}");
                let mut session = Self {
                    port,
                    post_path: format!("/target{endpoint}"),
                    session_id: None,
                    events: Some(events),
                };
                session.post(initialize.as_bytes())?;
                session.answer(1)?;
                session.post(initialized.as_bytes())?;
                Ok(session)
            }
        }
    }

    /// POSTs `body` with `content_type` (none when `None`) and extra header
    /// lines.
    fn post_raw(&self, content_type: Option<&str>, body: &[u8], extra: &[&str]) -> Result<Answer> {
        self.post_to(&self.post_path, content_type, body, extra)
    }

    fn post_to(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
        extra: &[&str],
    ) -> Result<Answer> {
        let mut head = format!("POST {path} HTTP/1.0\r\n{ACCEPT}");
        if let Some(content_type) = content_type {
            head.push_str(&format!("\r\nContent-Type: {content_type}"));
        }
        if let Some(session) = &self.session_id {
            head.push_str(&format!(
                "\r\nMcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-06-18"
            ));
        }
        for line in extra {
            head.push_str("\r\n");
            head.push_str(line);
        }
        http(self.port, &head, body)
    }

    /// POSTs a JSON body; (status, body).
    fn post(&self, body: &[u8]) -> Result<(u16, String)> {
        let (status, _, body) = self.post_raw(Some("application/json"), body, &[])?;
        Ok((status, body))
    }

    /// The answer to request `id` on the SSE stream (legacy SSE transport).
    fn answer(&mut self, id: u64) -> Result<Value> {
        let events = self.events.as_mut().context("no event stream")?;
        loop {
            let (kind, data) = next_event(events)?;
            if kind != "message" {
                continue;
            }
            let message: Value = serde_json::from_str(&data)?;
            if message["id"] == json!(id) {
                return Ok(message);
            }
        }
    }
}

/// Waits until `server` executed an `echo` of `marker` (every request sent
/// before it has been handled by then).
fn wait_for_marker(server: &RunningServer, session: &Session, marker: &str) -> Result<()> {
    let body = call(99, "echo", &json!({"text": marker}).to_string());
    let (status, answer) = session.post(body.as_bytes())?;
    ensure!(status == 200 || status == 202, "marker: {status} {answer}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if server
            .executed()
            .iter()
            .any(|run| run["tool"] == "echo" && run["arguments"]["text"] == marker)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{}: the marker echo never executed", server.kind())
}

/// What one attack must come to: the sidecar's HTTP status and, for a
/// JSON-RPC error it answers itself, the rule named.
struct Attack {
    name: &'static str,
    content_type: Option<&'static str>,
    body: String,
    status: u16,
    rule: Option<&'static str>,
}

fn attacks() -> Vec<Attack> {
    let attack = |name, content_type, body: String, status, rule| Attack {
        name,
        content_type,
        body,
        status,
        rule,
    };
    let json = Some("application/json");
    vec![
        attack(
            "charset utf-7 smuggles a second name",
            Some("application/json; charset=utf-7"),
            UTF7_SMUGGLED_DELETE.to_owned(),
            415,
            None,
        ),
        attack(
            "charset utf-16",
            Some("application/json; charset=utf-16"),
            call(8, "echo", r#"{"text":"x"}"#),
            415,
            None,
        ),
        attack(
            "case-variant key binds last (Go)",
            json,
            call(9, "transfer", r#"{"to":"bob","amount":50,"AMOUNT":1000000}"#),
            400,
            None,
        ),
        attack(
            "Method beside method",
            json,
            r#"{"jsonrpc":"2.0","id":10,"method":"ping","Method":"tools/call","params":{"name":"delete_user","arguments":{"id":"u1"}}}"#.to_owned(),
            400,
            None,
        ),
        attack(
            "paramſ beside params",
            json,
            r#"{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}},"paramſ":{"name":"delete_user","arguments":{"id":"u1"}}}"#.to_owned(),
            400,
            None,
        ),
        attack(
            "a hair above the limit",
            json,
            call(12, "transfer", r#"{"to":"bob","amount":100.00000000000001}"#),
            200,
            Some("no rule allows"),
        ),
        attack(
            "above the limit, rounded to it by doubles",
            json,
            call(13, "transfer", r#"{"to":"bob","amount":100.000000000000001}"#),
            400,
            None,
        ),
        attack(
            "integer beyond 2^53",
            json,
            call(14, "transfer", r#"{"to":"bob","amount":9007199254740993}"#),
            400,
            None,
        ),
        attack(
            "a method nobody governs",
            json,
            r#"{"jsonrpc":"2.0","id":15,"method":"tools/execute","params":{"name":"delete_user","arguments":{"id":"u1"}}}"#.to_owned(),
            200,
            Some("protocol"),
        ),
        attack(
            "the denied tool itself",
            json,
            call(16, "delete_user", r#"{"id":"u1"}"#),
            200,
            Some("payments/no-deletes"),
        ),
        attack(
            "duplicate key through an escape",
            json,
            call(17, "echo", r#"{"text":"x"}"#).replace(
                r#""name":"echo""#,
                r#""name":"echo","n\u0061me":"delete_user""#,
            ),
            400,
            None,
        ),
    ]
}

/// The JSON-RPC error rule in a sidecar's answer (JSON or SSE).
fn denied_rule(body: &str) -> Option<String> {
    let answer = jsonrpc_answer(body).ok()?;
    answer["error"]["data"]["rule"].as_str().map(str::to_owned)
}

/// Runs every attack against `kind` behind a real sidecar.
async fn attacks_do_not_execute(kind: ServerKind) -> Result<()> {
    let server = tokio::task::spawn_blocking(move || spawn(kind)).await??;
    let upstream = match kind.transport() {
        Transport::StreamableHttp => server.url(),
        Transport::Sse => server.base_url(),
    };
    let sidecar = TestSidecar::start(Settings::default()).await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("identity.yaml"),
        IDENTITY.replace("UPSTREAM_URL", &upstream),
    )?;
    std::fs::write(dir.path().join("policy.yaml"), POLICY)?;
    standalone::load(dir.path(), None, 1, sidecar.sidecar.snapshots())?;
    let port = sidecar.proxy_port;

    let server = tokio::task::spawn_blocking(move || -> Result<RunningServer> {
        let session = Session::open(port, kind.transport())?;
        // Control: an allowed transfer executes.
        let (status, answer) =
            session.post(call(2, "transfer", r#"{"to":"bob","amount":50}"#).as_bytes())?;
        ensure!(
            status == 200 || status == 202,
            "{kind}: allowed transfer: {status} {answer}"
        );
        for attack in attacks() {
            let (status, _, answer) =
                session.post_raw(attack.content_type, attack.body.as_bytes(), &[])?;
            ensure!(
                status == attack.status,
                "{kind}: {}: expected HTTP {}, got {status}: {answer}",
                attack.name,
                attack.status
            );
            if let Some(rule) = attack.rule {
                let named = denied_rule(&answer);
                ensure!(
                    named.as_deref().is_some_and(|n| n.starts_with(rule)),
                    "{kind}: {}: expected a denial by {rule}, got {answer}",
                    attack.name
                );
            }
        }
        // HTTP-level attacks.
        let body = call(20, "echo", r#"{"text":"x"}"#);
        let (status, _, answer) = session.post_to(
            "/target/../admin",
            Some("application/json"),
            body.as_bytes(),
            &[],
        )?;
        ensure!(status == 400, "{kind}: dot segments: {status} {answer}");
        // Routing headers that name another tool than the body: a server or
        // gateway routing on them would run it.
        let (status, _, answer) = session.post_raw(
            Some("application/json"),
            body.as_bytes(),
            &["Mcp-Method: tools/call", "Mcp-Name: delete_user"],
        )?;
        ensure!(
            status == 400,
            "{kind}: Mcp-Name mismatch: {status} {answer}"
        );
        if let Some(session_id) = &session.session_id {
            let (status, _, answer) = session.post_raw(
                Some("application/json"),
                body.as_bytes(),
                &[&format!("Mcp-Session-Id: {session_id}-other")],
            )?;
            ensure!(
                status == 400,
                "{kind}: repeated Mcp-Session-Id: {status} {answer}"
            );
        }
        wait_for_marker(&server, &session, "after-the-attacks")?;
        Ok(server)
    })
    .await??;

    let executed = server.executed();
    let forbidden: Vec<&Value> = executed
        .iter()
        .filter(|run| {
            run["tool"] == "delete_user"
                || (run["tool"] == "transfer" && run["arguments"]["amount"].as_f64() != Some(50.0))
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "{kind} ({}): forbidden calls executed: {forbidden:?}",
        kind.sdk_version()
    );
    assert!(
        executed
            .iter()
            .any(|run| run["tool"] == "transfer"
                && run["arguments"]["amount"].as_f64() == Some(50.0)),
        "{kind}: the allowed transfer did not execute: {executed:?}"
    );
    // Every refusal is audited: one deny record per attack and per
    // HTTP-level refusal.
    let records = sidecar.audit.records();
    let denials = records.iter().filter(|r| r["decision"] == "deny").count();
    let expected = attacks().len() + 2 + usize::from(kind.transport() == Transport::StreamableHttp);
    assert_eq!(
        denials, expected,
        "{kind}: audit records of denials: {records:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_fail_against_typescript_sdk_1_17_streamable_http() -> Result<()> {
    attacks_do_not_execute(ServerKind::TsStreamable117).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_fail_against_typescript_sdk_latest_streamable_http() -> Result<()> {
    attacks_do_not_execute(ServerKind::TsStreamableLatest).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_fail_against_typescript_sdk_latest_sse_transport() -> Result<()> {
    attacks_do_not_execute(ServerKind::TsSse).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_fail_against_mcp_go_typed_binding() -> Result<()> {
    attacks_do_not_execute(ServerKind::McpGo).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_fail_against_python_sdk() -> Result<()> {
    attacks_do_not_execute(ServerKind::Python).await
}

/// The charset attack is real: sent straight to the TypeScript SDK 1.17.x
/// server (no sidecar), the UTF-7 body deletes the user the sidecar would have
/// read as an `echo`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utf7_body_deletes_at_a_charset_honouring_server_without_the_sidecar() -> Result<()> {
    let server = tokio::task::spawn_blocking(|| spawn(ServerKind::TsStreamable117)).await??;
    let port = server.port();
    let server = tokio::task::spawn_blocking(move || -> Result<RunningServer> {
        const POST: &str = "POST /mcp HTTP/1.0\r\nAccept: application/json, text/event-stream";
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "attacker", "version": "0"}}});
        let (_, headers, _) = http(
            port,
            &format!("{POST}\r\nContent-Type: application/json"),
            init.to_string().as_bytes(),
        )?;
        let session = headers
            .iter()
            .find(|(k, _)| k == "mcp-session-id")
            .map(|(_, v)| v.clone())
            .context("no session")?;
        let head =
            format!("{POST}\r\nMcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-06-18");
        http(
            port,
            &format!("{head}\r\nContent-Type: application/json"),
            br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        )?;
        http(
            port,
            &format!("{head}\r\nContent-Type: application/json; charset=utf-7"),
            UTF7_SMUGGLED_DELETE.as_bytes(),
        )?;
        Ok(server)
    })
    .await??;
    let executed = server.executed();
    assert!(
        executed.iter().any(|run| run["tool"] == "delete_user"),
        "{}: expected the UTF-7 body to run delete_user: {executed:?}",
        ServerKind::TsStreamable117.sdk_version()
    );
    Ok(())
}
