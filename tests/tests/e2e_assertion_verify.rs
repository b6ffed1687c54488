//! A tool server in another language verifies Chaperone's assertions with
//! off-the-shelf libraries, on a real API server with the in-process
//! controller.
//!
//! ```text
//!  raw JSON-RPC ─► agent sidecar (controller mode) ─► verifying_server.py (Python MCP SDK)
//!                                                 └─► probe (records the assertions it gets)
//!  raw JSON-RPC ──────────────────────────────────────► verifying_server.py (direct: forged headers)
//! ```
//!
//! `tests/servers/python/verifying_server.py` fetches the controller's JWKS
//! (`/.well-known/jwks.json` on its admin port), verifies each call's
//! `Chaperone-Assertion` with PyJWT and recomputes `args` with Python's
//! `rfc8785`: from the arguments as the Python SDK parsed them, spelled
//! differently from what the agent sent (`1e2`, `100.0`, `-0`) and holding
//! keys whose UTF-16 order is not their UTF-8 order. Every call through the
//! sidecar verifies and its digest matches; a tampered, replayed or
//! mismatched assertion sent directly does not.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chaperone_api::{AgentIdentity, ToolPolicy};
use chaperone_demo::{SeenAssertions, ToolServer, ToolSet};
use chaperone_sidecar::{Settings, canonical::args_digest};
use chaperone_testenv::{
    ControlPlane, create_namespace,
    kube_fixtures::{self, agent_identity, agent_subject, tool_policy},
    mcp_fixtures::{claims_of, last_assertion, loopback_listener, serve_mcp},
    mcp_servers::{ListeningProcess, http, install_dir, jsonrpc_answer, start_on_free_port},
    sidecar_fixtures::{TestSidecar, controller_settings, eventually, http_get_async, write_token},
    unique_suffix,
};
use serde_json::{Value, json};

/// The audience the tool servers are known by.
const AUDIENCE: &str = "ledger.tools.chaperone.test";

/// What `argsAlg` names.
const ARGS_ALG: &str = "sha256-rfc8785";

// ---------------------------------------------------------------------------
// The controller: one per test binary, on its own thread and runtime.

fn controller() -> &'static kube_fixtures::InProcessController {
    static CONTROLLER: OnceLock<kube_fixtures::InProcessController> = OnceLock::new();
    CONTROLLER.get_or_init(|| {
        kube_fixtures::start_controller(
            ControlPlane::shared(),
            &format!("assertion-verify-test-controller-{}", std::process::id()),
        )
    })
}

// ---------------------------------------------------------------------------
// The verifying Python tool server.

/// `verifying_server.py` on a free loopback port; killed (and its files
/// removed, unless `CHAPERONE_KEEP_FILES` is set) on drop.
struct VerifyingServer {
    process: ListeningProcess,
    dir: PathBuf,
    exec_log: PathBuf,
}

impl VerifyingServer {
    /// Starts it, verifying against `jwks_url` for [`AUDIENCE`], and waits
    /// until it accepts connections.
    fn spawn(jwks_url: &str) -> Result<Self> {
        let install = install_dir()?;
        let dir = std::env::temp_dir().join(format!("chaperone-verifying-{}", unique_suffix()));
        fs::create_dir_all(&dir)?;
        let exec_log = dir.join("exec.jsonl");
        fs::write(&exec_log, "")?;
        let output = dir.join("server.log");
        let process = start_on_free_port("verifying_server.py", &output, || {
            let mut command = Command::new(install.join("python/venv/bin/python"));
            command
                .arg(install.join("python/verifying_server.py"))
                .env("MCP_EXEC_LOG", &exec_log)
                .env("CHAPERONE_JWKS_URL", jwks_url)
                .env("CHAPERONE_AUDIENCE", AUDIENCE);
            command
        });
        let process = match process {
            Ok(process) => process,
            Err(err) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(err);
            }
        };
        Ok(Self {
            process,
            dir,
            exec_log,
        })
    }

    fn port(&self) -> u16 {
        self.process.port()
    }

    /// Its exec log: one line per call, in order.
    fn lines(&self) -> Result<Vec<Value>> {
        fs::read_to_string(&self.exec_log)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("exec-log line {l:?}")))
            .collect()
    }
}

impl Drop for VerifyingServer {
    fn drop(&mut self) {
        self.process.stop();
        if std::env::var_os("CHAPERONE_KEEP_FILES").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------
// Raw Streamable HTTP sessions: the bytes sent are exactly the ones written.

/// An MCP session on `port` at `path`, opened by hand.
struct RawSession {
    port: u16,
    path: String,
    id: String,
}

impl RawSession {
    fn open(port: u16, path: &str) -> Result<Self> {
        let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "chaperone-test", "version": "0"}}});
        let head = format!(
            "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream"
        );
        let (status, headers, body) = http(port, &head, initialize.to_string().as_bytes())?;
        ensure!(status == 200, "initialize at {path}: {status} {body}");
        let id = headers
            .iter()
            .find(|(k, _)| k == "mcp-session-id")
            .map(|(_, v)| v.clone())
            .context("no Mcp-Session-Id")?;
        let session = Self {
            port,
            path: path.to_owned(),
            id,
        };
        let (status, body) = session.post(
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            None,
        )?;
        ensure!(status == 202, "notifications/initialized: {status} {body}");
        Ok(session)
    }

    /// POSTs `body` (with `assertion` as `Chaperone-Assertion`, if any).
    fn post(&self, body: &str, assertion: Option<&str>) -> Result<(u16, String)> {
        let mut head = format!(
            "POST {} HTTP/1.0\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: {}\r\nMcp-Protocol-Version: 2025-06-18",
            self.path, self.id
        );
        if let Some(assertion) = assertion {
            head.push_str(&format!("\r\nChaperone-Assertion: {assertion}"));
        }
        let (status, _, body) = http(self.port, &head, body.as_bytes())?;
        Ok((status, body))
    }

    /// Calls `tool` with `arguments`, raw JSON text; the JSON-RPC answer.
    fn call(&self, tool: &str, arguments: &str, assertion: Option<&str>) -> Result<Value> {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{arguments}}}}}"#
        );
        let (status, answer) = self.post(&body, assertion)?;
        ensure!(status == 200, "tools/call {tool}: {status} {answer}");
        jsonrpc_answer(&answer)
    }
}

/// Runs blocking `work` off the async runtime's worker threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work).await?
}

/// The text of a tool result, and whether it is an error.
fn outcome(answer: &Value) -> (bool, String) {
    let result = &answer["result"];
    let text = result["content"][0]["text"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| answer.to_string());
    (result["isError"] == json!(true) || result.is_null(), text)
}

// ---------------------------------------------------------------------------
// Assertions edited by hand.

/// `token` with its claims edited by `edit`, keeping its header and signature.
fn tampered(token: &str, edit: impl FnOnce(&mut Value)) -> Result<String> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(signature)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("not a compact JWS: {token}");
    };
    let mut claims = claims_of(token)?;
    edit(&mut claims);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?);
    Ok(format!("{header}.{payload}.{signature}"))
}

// ---------------------------------------------------------------------------
// The cluster.

struct World {
    ledger: VerifyingServer,
    probe_seen: SeenAssertions,
    sidecar: TestSidecar,
    issuer: String,
    _token_dir: tempfile::TempDir,
}

async fn setup() -> Result<World> {
    tokio::task::spawn_blocking(controller).await?;
    let (admin_port, grpc_port, ca_file) = tokio::task::spawn_blocking(|| {
        let c = controller();
        (c.admin_port, c.grpc_port, c.ca_file.clone())
    })
    .await?;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "jcs").await?;
    let jwks_url = format!("http://127.0.0.1:{admin_port}/.well-known/jwks.json");
    let ledger = blocking(move || VerifyingServer::spawn(&jwks_url)).await?;
    // The probe keeps the assertions it is sent: genuine ones to tamper with.
    let probe_seen = SeenAssertions::default();
    let probe = serve_mcp(
        loopback_listener().await?,
        ToolServer::new(ToolSet::Billing).recording(Arc::clone(&probe_seen)),
    )
    .await?;

    kube_fixtures::apply::<ToolPolicy>(
        &client,
        &ns,
        tool_policy(
            "recorder",
            json!({
                "targetRefs": [{ "name": "recorder" }],
                "rules": [{ "name": "allow-record", "action": "allow", "tools": [
                    { "server": "ledger", "name": "record" },
                    { "server": "probe", "name": "record" },
                ] }],
            }),
        ),
    )
    .await?;
    kube_fixtures::apply::<AgentIdentity>(
        &client,
        &ns,
        agent_identity(
            "recorder",
            json!({
                "selector": { "serviceAccountName": "recorder" },
                "toolServers": [
                    { "name": "ledger", "url": format!("http://127.0.0.1:{}/mcp", ledger.port()), "audience": AUDIENCE },
                    { "name": "probe", "url": format!("http://127.0.0.1:{probe}/mcp"), "audience": AUDIENCE },
                ],
            }),
        ),
    )
    .await?;

    kube_fixtures::ensure_service_account(&client, &ns, "recorder").await?;
    let pod = kube_fixtures::create_agent_pod(&client, &ns, "recorder", "recorder-0").await?;
    let token = kube_fixtures::bound_token(&client, &pod, kube_fixtures::SIDECAR_AUDIENCE).await?;
    let token_dir = tempfile::tempdir()?;
    let token_file = write_token(token_dir.path(), &token)?;
    let sidecar = TestSidecar::start(Settings {
        pod_name: "recorder-0".into(),
        pod_namespace: ns.clone(),
        controller: Some(controller_settings(
            format!("127.0.0.1:{grpc_port}"),
            &token_file,
            ca_file,
        )),
        ..Settings::default()
    })
    .await?;
    sidecar.wait_for_version(0, Duration::from_secs(20)).await?;
    // The controller publishes the sidecar's key before a tool can verify.
    let kid = sidecar.sidecar.key_registration().kid.clone();
    eventually(Duration::from_secs(20), async || {
        let jwks = http_get_async(admin_port, "/.well-known/jwks.json").await;
        Ok(jwks.contains(&kid).then_some(()))
    })
    .await
    .context("the controller's JWKS never listed the sidecar's key")?;
    Ok(World {
        ledger,
        probe_seen,
        sidecar,
        issuer: agent_subject(&format!("{ns}/recorder")),
        _token_dir: token_dir,
    })
}

// ---------------------------------------------------------------------------
// The test.

/// Arguments spelled as an agent might send them: numbers in several
/// spellings of the same doubles (the sidecar refuses a number whose text is
/// not exactly its double, such as `333333333.33333329`), strings needing
/// escapes or none, keys whose UTF-16 order differs from their UTF-8 order,
/// nesting.
const CALLS: [&str; 4] = [
    r#"{"payload":{"text":"é 😀 \u2028 \"quoted\" back\\slash \u0007 tab\t","zeta":1,"Alpha":{"\ue000":"private use","😀":"emoji","b":[1e2,0.1,100.0,-0,1e-7,1e21,0.30000000000000004,1E30,4.50]},"B":null,"a":true}}"#,
    r#"{"payload":{"nested":{"z":{"y":{"x":[{"b":2,"a":1},[],{}]}}},"n":-0.0,"max":9007199254740992,"tiny":5e-324,"big":1.7976931348623157e308,"neg":-12.5e-3}}"#,
    r#"{"payload":{"€":"euro","\r":"cr","דּ":"dalet","1":"one","\ud83d\ude00":"surrogate pair","\u0080":"control","ö":"o umlaut"}}"#,
    r#"{"payload":{}}"#,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_tool_server_verifies_assertions_and_digests() -> Result<()> {
    let world = setup().await?;
    let proxy = world.sidecar.proxy_port;

    // Through the sidecar: every call verifies, and Python's RFC 8785 digest
    // of what it got equals the one the sidecar signed.
    let through = blocking(move || RawSession::open(proxy, "/ledger")).await?;
    let through = Arc::new(through);
    for (at, arguments) in CALLS.iter().enumerate() {
        let session = Arc::clone(&through);
        let answer = blocking(move || session.call("record", arguments, None)).await?;
        let (error, text) = outcome(&answer);
        ensure!(!error && text == "recorded", "call {at}: {answer}");
    }
    let lines = world.ledger.lines()?;
    ensure!(lines.len() == CALLS.len(), "exec log: {lines:#?}");
    for (line, arguments) in lines.iter().zip(CALLS) {
        assert_eq!(line["verified"], true, "{line}");
        assert_eq!(line["digest_matches"], true, "{line}");
        let claims = &line["claims"];
        assert_eq!(claims["argsAlg"], ARGS_ALG, "{line}");
        assert_eq!(claims["aud"], AUDIENCE, "{line}");
        assert_eq!(claims["iss"], world.issuer, "{line}");
        assert_eq!(claims["tool"], "record", "{line}");
        assert_eq!(claims["args"], line["recomputed"], "{line}");
        // And both equal the Rust digest of the arguments as the agent
        // spelled them.
        let sent: Value = serde_json::from_str(arguments)?;
        assert_eq!(line["recomputed"], args_digest(Some(&sent)), "{arguments}");
    }
    // Python holds its own values (100.0 for `1e2`, 0 for `-0`): the
    // spelling did not matter.
    assert_eq!(
        lines[0]["arguments"]["payload"]["Alpha"]["b"],
        json!([
            100.0,
            0.1,
            100.0,
            0,
            1e-7,
            1e21,
            0.30000000000000004,
            1e30,
            4.5
        ])
    );

    // Genuine assertions, minted for the probe (same audience, same tool).
    let mint = async |arguments: &'static str| -> Result<String> {
        let before = world
            .probe_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        let answer =
            blocking(move || RawSession::open(proxy, "/probe")?.call("record", arguments, None))
                .await?;
        let seen = world
            .probe_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        ensure!(seen > before, "the probe got no assertion: {answer}");
        last_assertion(&world.probe_seen).context("no assertion")
    };
    let genuine = mint(CALLS[0]).await?;
    let other = mint(CALLS[3]).await?;
    assert_eq!(claims_of(&genuine)?["argsAlg"], ARGS_ALG);

    // Directly at the Python server: the genuine assertion verifies once.
    let port = world.ledger.port();
    let direct = Arc::new(blocking(move || RawSession::open(port, "/mcp")).await?);
    let send =
        async |arguments: &'static str, assertion: Option<String>| -> Result<(Value, Value)> {
            let session = Arc::clone(&direct);
            let answer =
                blocking(move || session.call("record", arguments, assertion.as_deref())).await?;
            let line = world.ledger.lines()?.pop().context("no exec-log line")?;
            Ok((answer, line))
        };
    let (answer, line) = send(CALLS[0], Some(genuine.clone())).await?;
    assert_eq!(outcome(&answer), (false, "recorded".to_owned()), "{line}");
    assert_eq!(
        (&line["verified"], &line["digest_matches"]),
        (&json!(true), &json!(true))
    );

    // The same again is a replay.
    let (answer, line) = send(CALLS[0], Some(genuine.clone())).await?;
    assert!(outcome(&answer).0, "{answer}");
    assert_eq!(line["verified"], false, "{line}");
    assert!(
        line["error"]
            .as_str()
            .unwrap_or_default()
            .contains("replay"),
        "{line}"
    );

    // Claims edited under the original signature: other arguments' digest, so
    // only the signature can tell.
    let forged_args = tampered(&other, |claims| {
        claims["args"] = json!(args_digest(Some(&serde_json::from_str(CALLS[1]).unwrap())));
    })?;
    let (answer, line) = send(CALLS[1], Some(forged_args)).await?;
    assert!(outcome(&answer).0, "{answer}");
    assert_eq!(line["verified"], false, "{line}");
    assert!(
        line["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Signature"),
        "{line}"
    );
    let forged_issuer = tampered(&other, |claims| claims["sub"] = json!("someone-else"))?;
    let (_, line) = send(CALLS[3], Some(forged_issuer)).await?;
    assert_eq!(line["verified"], false, "{line}");

    // A genuine assertion with other arguments than it was signed for.
    let (answer, line) = send(CALLS[1], Some(other)).await?;
    assert!(outcome(&answer).0, "{answer}");
    assert_eq!(
        (&line["verified"], &line["digest_matches"]),
        (&json!(true), &json!(false))
    );

    // No assertion at all.
    let (answer, line) = send(CALLS[3], None).await?;
    assert!(outcome(&answer).0, "{answer}");
    assert_eq!(line["verified"], false, "{line}");
    Ok(())
}
