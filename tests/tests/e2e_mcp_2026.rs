//! MCP 2026-07-28 end to end: the official Python SDK's server in its
//! stateless mode (once answering with JSON, once with SSE streams) behind a
//! controller-mode sidecar on the real API server, called by the SDK's own
//! client in `auto`, pinned `2026-07-28` and `legacy` modes.
//!
//! What the sidecar must do with the stateless revision (DESIGN.md, "Protocol
//! eras and session scope"): filter lists and decide calls as before; keep
//! session history per *scope* (a delegated task, else the W3C trace, else
//! the MCP session, else the pod; `spec.session.scope: agent` forces the pod);
//! refuse requests whose `Mcp-Method`/`Mcp-Name`/`MCP-Protocol-Version`
//! headers disagree with the body (-32020) before they reach the server;
//! decide each round of an `input_required` exchange and count the call once;
//! decide a task-augmented call when the task is created and pass tasks/*
//! only for tasks it saw created in the same scope.
//!
//! One control plane, one controller and the two servers serve every test;
//! each test has its own namespace, agent and sidecar, and marks what it sends
//! with a unique value so it reads only its own lines of the shared exec logs.

use std::{
    path::Path,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use chaperone_api::{AgentIdentity, ToolPolicy};
use chaperone_sidecar::{
    Settings,
    intake::{MCP_METHOD, MCP_NAME, MCP_PROTOCOL_VERSION},
    jsonrpc::{HEADER_MISMATCH, POLICY_DENIED},
};
use chaperone_testenv::{
    ControlPlane, create_namespace,
    kube_fixtures::{self, InProcessController, agent_identity, apply, tool_policy},
    mcp_servers::{
        ClientMode, ClientRun, PythonClient, PythonResponses, RunningServer, ServerKind, http,
        jsonrpc_answer, spawn, spawn_python_stateless,
    },
    sidecar_fixtures::{TestSidecar, controller_settings, write_token},
    unique_suffix,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Shared: the controller and the two servers.

fn controller() -> &'static InProcessController {
    static CONTROLLER: OnceLock<InProcessController> = OnceLock::new();
    CONTROLLER.get_or_init(|| {
        kube_fixtures::start_controller(
            ControlPlane::shared(),
            &format!("mcp-2026-controller-{}", std::process::id()),
        )
    })
}

/// The Python SDK server, stateless, answering with JSON (`json`) and with
/// SSE streams (`sse`), and in its default stateful mode (`stateful`: MCP
/// sessions); the agents name them as tool servers by these names.
struct Servers {
    json: RunningServer,
    sse: RunningServer,
    stateful: RunningServer,
}

fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let sse = std::thread::spawn(|| spawn_python_stateless(PythonResponses::Sse));
        let stateful = std::thread::spawn(|| spawn(ServerKind::Python));
        let json = spawn_python_stateless(PythonResponses::Json);
        let sse = sse.join().expect("starting the SSE server panicked");
        let stateful = stateful
            .join()
            .expect("starting the stateful server panicked");
        match (json, sse, stateful) {
            (Ok(json), Ok(sse), Ok(stateful)) => Servers {
                json,
                sse,
                stateful,
            },
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                panic!("could not start the Python SDK server: {e:#}")
            }
        }
    })
}

impl Servers {
    fn get(&self, name: &str) -> &RunningServer {
        match name {
            "json" => &self.json,
            "sse" => &self.sse,
            _ => &self.stateful,
        }
    }
}

// ---------------------------------------------------------------------------
// One governed agent per test.

/// `echo` and `delete_user` allowed; `transfer` and `schedule_transfer` up to
/// 100; no `transfer` after a `delete_user` in the same session; one
/// `close_account` per session; `get_order` allowed by no rule.
fn policy() -> Value {
    tool_policy(
        "payments",
        json!({
            "targetRefs": [{ "name": "agent" }],
            "rules": [
                { "name": "echo", "action": "allow", "tools": [{ "name": "echo" }] },
                { "name": "delete-user", "action": "allow", "tools": [{ "name": "delete_user" }] },
                { "name": "small-transfers", "action": "allow",
                  "tools": [{ "name": "transfer" }, { "name": "schedule_transfer" }],
                  "when": { "args": [{ "pointer": "/amount", "lessThanOrEqual": 100 }] } },
                { "name": "no-transfer-after-delete", "action": "deny",
                  "tools": [{ "name": "transfer" }],
                  "when": { "session": { "toolsCalled": ["delete_user"] } } },
                { "name": "one-close-per-session", "action": "allow",
                  "tools": [{ "name": "close_account" }],
                  "when": { "session": { "toolCallsFewerThan": 2 } } }
            ]
        }),
    )
}

/// An agent (AgentIdentity `agent`, pod `agent-0`) in a fresh namespace with
/// its sidecar, holding a snapshot of [`policy`].
struct Agent {
    sidecar: TestSidecar,
    _token_dir: tempfile::TempDir,
}

impl Agent {
    /// `scope`: the identity's `spec.session.scope`, if any.
    async fn start(scope: Option<&str>) -> Result<Self> {
        tokio::task::spawn_blocking(|| {
            controller();
            servers();
        })
        .await?;
        let client = ControlPlane::shared().client().await?;
        let ns = create_namespace(&client, "mcp26").await?;
        let servers = servers();
        let mut spec = json!({
            "selector": { "serviceAccountName": "agent" },
            "toolServers": [
                { "name": "json", "url": servers.json.url() },
                { "name": "sse", "url": servers.sse.url() },
                { "name": "stateful", "url": servers.stateful.url() }
            ]
        });
        if let Some(scope) = scope {
            spec["session"] = json!({ "scope": scope });
        }
        apply::<AgentIdentity>(&client, &ns, agent_identity("agent", spec)).await?;
        apply::<ToolPolicy>(&client, &ns, policy()).await?;
        let token = kube_fixtures::pod_token(
            &client,
            &ns,
            "agent",
            "agent-0",
            kube_fixtures::SIDECAR_AUDIENCE,
        )
        .await?;
        let token_dir = tempfile::tempdir()?;
        let token_file = write_token(token_dir.path(), &token)?;
        let sidecar = start_sidecar(&token_file).await?;
        sidecar.wait_for_version(0, Duration::from_secs(10)).await?;
        Ok(Self {
            sidecar,
            _token_dir: token_dir,
        })
    }

    /// The sidecar's endpoint for tool server `server`.
    fn url(&self, server: &str) -> String {
        format!("http://127.0.0.1:{}/{server}", self.sidecar.proxy_port)
    }

    /// The audit records of `tool`'s calls (refusals included).
    fn records_of(&self, tool: &str) -> Vec<Value> {
        self.sidecar
            .audit
            .records()
            .into_iter()
            .filter(|r| r["tool"] == tool)
            .collect()
    }
}

async fn start_sidecar(token_file: &Path) -> Result<TestSidecar> {
    let controller = tokio::task::spawn_blocking(controller).await?;
    TestSidecar::start(Settings {
        pod_name: "agent-0".to_owned(),
        controller: Some(controller_settings(
            format!("127.0.0.1:{}", controller.grpc_port),
            token_file,
            controller.ca_file.clone(),
        )),
        ..Settings::default()
    })
    .await
}

// ---------------------------------------------------------------------------
// Steps of the Python client, and what they gave.

fn list_tools() -> Value {
    json!({ "op": "list_tools" })
}

fn call(tool: &str, arguments: Value) -> Value {
    json!({ "op": "call", "tool": tool, "arguments": arguments })
}

/// `step` made inside the W3C trace `traceparent`.
fn traced(mut step: Value, traceparent: &str) -> Value {
    step["traceparent"] = json!(traceparent);
    step
}

/// A fresh W3C trace: (`traceparent`, trace id).
fn new_trace() -> (String, String) {
    let trace = format!(
        "4bf92f35{}{}{}",
        unique_suffix(),
        unique_suffix(),
        unique_suffix()
    );
    (format!("00-{trace}-00f067aa0ba902b7-01"), trace)
}

/// Runs `steps` with `client` off the async runtime.
async fn run(client: PythonClient, steps: Vec<Value>) -> Result<ClientRun> {
    let run = tokio::task::spawn_blocking(move || client.run(&steps)).await??;
    ensure!(
        run.connect["ok"] == true,
        "connecting failed: {}",
        run.connect
    );
    Ok(run)
}

/// Runs several clients side by side; their runs in order.
async fn run_all(clients: Vec<(PythonClient, Vec<Value>)>) -> Result<Vec<ClientRun>> {
    let handles: Vec<_> = clients
        .into_iter()
        .map(|(client, steps)| tokio::spawn(run(client, steps)))
        .collect();
    let mut runs = Vec::new();
    for handle in handles {
        runs.push(handle.await??);
    }
    Ok(runs)
}

fn assert_allowed(outcome: &Value, what: &str) {
    assert_eq!(outcome["ok"], true, "{what}: {outcome}");
    assert_eq!(outcome["isError"], false, "{what}: {outcome}");
}

fn assert_denied(outcome: &Value, what: &str) {
    assert_eq!(outcome["ok"], false, "{what} should be denied: {outcome}");
    assert_eq!(outcome["code"], POLICY_DENIED, "{what}: {outcome}");
}

/// The exec-log lines of `server` whose arguments hold `marker`.
fn executed_with(server: &RunningServer, marker: &str) -> Vec<Value> {
    server
        .executed()
        .into_iter()
        .filter(|line| line["raw_arguments"].to_string().contains(marker))
        .collect()
}

/// Waits (briefly) until `server` has executed `count` calls marked `marker`:
/// a call's line is written before its answer goes out, so this only guards
/// against a slow file system.
async fn executed_eventually(server: &RunningServer, marker: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let lines = executed_with(server, marker);
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_lists_and_decides_by_arguments_in_every_mode() -> Result<()> {
    let agent = Agent::start(None).await?;
    let combinations: Vec<(&str, ClientMode)> = ["json", "sse"]
        .into_iter()
        .flat_map(|server| ClientMode::ALL.map(|mode| (server, mode)))
        .collect();
    let markers: Vec<String> = combinations
        .iter()
        .map(|(server, mode)| format!("{server}-{}-{}", mode.as_str(), unique_suffix()))
        .collect();
    let clients = combinations
        .iter()
        .zip(&markers)
        .map(|(&(server, mode), marker)| {
            (
                PythonClient::new(mode, agent.url(server)),
                vec![
                    list_tools(),
                    call("echo", json!({ "text": marker })),
                    call("transfer", json!({ "to": marker, "amount": 50 })),
                    call("transfer", json!({ "to": marker, "amount": 500 })),
                    call("get_order", json!({ "id": marker })),
                ],
            )
        })
        .collect();
    let runs = run_all(clients).await?;

    for ((&(server, mode), marker), run) in combinations.iter().zip(&markers).zip(&runs) {
        let what = format!("{server} server, {} client", mode.as_str());
        let version = run.connect["protocolVersion"].as_str().unwrap_or_default();
        if mode.is_stateless() {
            assert_eq!(version, "2026-07-28", "{what}: {}", run.connect);
        } else {
            assert_ne!(version, "2026-07-28", "{what}: {}", run.connect);
        }
        let [listed, echo, small, large, unlisted] = &run.steps[..] else {
            bail!("{what}: {:?}", run.steps);
        };
        assert_eq!(listed["ok"], true, "{what}: {listed}");
        let tools: Vec<&str> = listed["tools"]
            .as_array()
            .context("tools")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            tools.contains(&"echo") && tools.contains(&"transfer"),
            "{what}: {tools:?}"
        );
        assert!(
            !tools.contains(&"get_order"),
            "{what}: no rule allows get_order: {tools:?}"
        );
        if mode.is_stateless() {
            // The server says 60 s and public; a list the sidecar filtered is
            // this agent's alone and changes with policy.
            assert_eq!(listed["ttlMs"], 0, "{what}: {listed}");
            assert_eq!(listed["cacheScope"], "private", "{what}: {listed}");
        }
        assert_allowed(echo, &what);
        assert_eq!(echo["text"], marker.as_str(), "{what}: {echo}");
        assert_allowed(small, &what);
        assert_denied(large, &what);
        assert_denied(unlisted, &what);

        let executed = executed_eventually(servers().get(server), marker, 2).await;
        let tools: Vec<(&str, Option<f64>)> = executed
            .iter()
            .map(|l| {
                (
                    l["tool"].as_str().unwrap_or(""),
                    l["arguments"]["amount"].as_f64(),
                )
            })
            .collect();
        assert_eq!(
            tools,
            [("echo", None), ("transfer", Some(50.0))],
            "{what}: only the allowed calls ran"
        );
    }
    // No trace and no MCP session (the servers are stateless): the pod's history.
    for record in agent.records_of("transfer") {
        assert_eq!(record["session"]["scope"], "agent", "{record}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_guard_holds_within_a_trace_and_not_across_traces() -> Result<()> {
    let agent = Agent::start(None).await?;
    let marker = format!("trace-{}", unique_suffix());
    let (t1, id1) = new_trace();
    let (t2, id2) = new_trace();
    let (t3, id3) = new_trace();
    let (t4, id4) = new_trace();
    let delete = call("delete_user", json!({ "id": marker }));
    let transfer = call("transfer", json!({ "to": marker, "amount": 10 }));
    let runs = run_all(vec![
        // The trace in each request's _meta (the SDK propagates the ambient one).
        (
            PythonClient::new(ClientMode::Stateless, agent.url("json")),
            vec![
                traced(delete.clone(), &t1),
                traced(transfer.clone(), &t1),
                traced(transfer.clone(), &t2),
            ],
        ),
        // Handshake era: the trace in the HTTP header, unless _meta names one.
        (
            PythonClient::new(ClientMode::Legacy, agent.url("sse")).header("traceparent", &t3),
            vec![
                delete.clone(),
                transfer.clone(),
                traced(transfer.clone(), &t4),
            ],
        ),
        // No trace, a server with MCP sessions: the MCP session.
        (
            PythonClient::new(ClientMode::Legacy, agent.url("stateful")),
            vec![delete.clone(), transfer.clone()],
        ),
    ])
    .await?;
    let [deleted, same_trace, other_trace] = &runs[0].steps[..] else {
        bail!("{:?}", runs[0].steps);
    };
    assert_allowed(deleted, "delete_user in trace 1");
    assert_denied(same_trace, "transfer after delete_user in the same trace");
    assert_allowed(other_trace, "transfer in another trace");
    let [deleted, same_trace, other_trace] = &runs[1].steps[..] else {
        bail!("{:?}", runs[1].steps);
    };
    assert_allowed(deleted, "delete_user in the header's trace");
    assert_denied(
        same_trace,
        "transfer after delete_user in the header's trace",
    );
    assert_allowed(other_trace, "transfer in the trace _meta names");
    let [deleted, same_session] = &runs[2].steps[..] else {
        bail!("{:?}", runs[2].steps);
    };
    assert_allowed(deleted, "delete_user in an MCP session");
    assert_denied(
        same_session,
        "transfer after delete_user in the same MCP session",
    );

    // Each decision was made and audited in its trace.
    let scopes = |tool: &str| -> Vec<(String, String, String)> {
        agent
            .records_of(tool)
            .iter()
            .map(|r| {
                let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
                (
                    s(&r["session"]["scope"]),
                    s(&r["session"]["key"]),
                    s(&r["decision"]),
                )
            })
            .collect()
    };
    let trace = |id: &str, decision: &str| ("trace".to_owned(), id.to_owned(), decision.to_owned());
    // The MCP session's records: scope mcpSession, one key (the session id).
    let (in_traces, in_session): (Vec<_>, Vec<_>) = scopes("delete_user")
        .into_iter()
        .chain(scopes("transfer"))
        .partition(|(scope, _, _)| scope == "trace");
    let keys: Vec<&str> = in_session.iter().map(|(_, key, _)| key.as_str()).collect();
    assert!(
        in_session.len() == 2
            && in_session.iter().all(|(scope, _, _)| scope == "mcpSession")
            && !keys[0].is_empty()
            && keys[0] == keys[1],
        "{in_session:?}"
    );
    let mut in_traces = in_traces;
    in_traces.sort();
    let mut expected = vec![
        trace(&id1, "allow"),
        trace(&id3, "allow"),
        trace(&id1, "deny"),
        trace(&id2, "allow"),
        trace(&id3, "deny"),
        trace(&id4, "allow"),
    ];
    expected.sort();
    assert_eq!(in_traces, expected);
    let executed = executed_eventually(&servers().json, &marker, 2).await;
    assert_eq!(
        executed.len(),
        2,
        "delete and one transfer on json: {executed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_scope_carries_the_guard_across_traces() -> Result<()> {
    let agent = Agent::start(Some("agent")).await?;
    let marker = format!("agent-{}", unique_suffix());
    let (t1, _) = new_trace();
    let (t2, _) = new_trace();
    let run = run(
        PythonClient::new(ClientMode::Auto, agent.url("json")),
        vec![
            traced(call("delete_user", json!({ "id": marker })), &t1),
            traced(call("transfer", json!({ "to": marker, "amount": 10 })), &t2),
        ],
    )
    .await?;
    let [deleted, transfer] = &run.steps[..] else {
        bail!("{:?}", run.steps);
    };
    assert_allowed(deleted, "delete_user");
    assert_denied(
        transfer,
        "transfer in a new trace after delete_user, scope agent",
    );
    for tool in ["delete_user", "transfer"] {
        let records = agent.records_of(tool);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0]["session"]["scope"], "agent", "{}", records[0]);
    }
    assert_eq!(
        agent.records_of("delete_user")[0]["session"]["key"],
        agent.records_of("transfer")[0]["session"]["key"],
        "one history for the pod"
    );
    Ok(())
}

/// HTTP headers, `(name, value)`.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// A 2026-07-28 `tools/call` of `echo` with `text` (id 41) through the
/// sidecar to `json`, as raw HTTP with `headers`: (status, JSON-RPC answer).
fn raw_call(agent: &Agent, text: &str, headers: Headers<'_>) -> Result<(u16, Value)> {
    let body = json!({
        "jsonrpc": "2.0", "id": 41, "method": "tools/call",
        "params": {
            "name": "echo", "arguments": { "text": text },
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}
            }
        }
    })
    .to_string();
    let mut head = "POST /json HTTP/1.0\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream".to_owned();
    for (name, value) in headers {
        head.push_str(&format!("\r\n{name}: {value}"));
    }
    let (status, _, answer) = http(agent.sidecar.proxy_port, &head, body.as_bytes())?;
    Ok((status, jsonrpc_answer(&answer)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_mismatches_are_refused_before_the_server() -> Result<()> {
    let agent = Agent::start(None).await?;
    let marker = format!("headers-{}", unique_suffix());
    let headers = [MCP_PROTOCOL_VERSION, MCP_METHOD, MCP_NAME];
    let [version, method, name] = headers.each_ref().map(|h| h.as_str());
    let cases: [(&str, Headers<'_>); 5] = [
        (
            "Mcp-Name names another tool",
            &[
                (version, "2026-07-28"),
                (method, "tools/call"),
                (name, "delete_user"),
            ],
        ),
        (
            "Mcp-Name in Base64 names another tool",
            // "delete_user"
            &[
                (version, "2026-07-28"),
                (method, "tools/call"),
                (name, "=?base64?ZGVsZXRlX3VzZXI=?="),
            ],
        ),
        (
            "Mcp-Method missing",
            &[(version, "2026-07-28"), (name, "echo")],
        ),
        (
            "Mcp-Name missing",
            &[(version, "2026-07-28"), (method, "tools/call")],
        ),
        (
            "MCP-Protocol-Version differs from _meta",
            &[
                (version, "2025-11-25"),
                (method, "tools/call"),
                (name, "echo"),
            ],
        ),
    ];
    let mut refused = 0;
    for (i, (what, headers)) in cases.into_iter().enumerate() {
        let text = format!("{marker}-{i}");
        let (status, answer) = raw_call(&agent, &text, headers)?;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], HEADER_MISMATCH, "{what}: {answer}");
        assert_eq!(
            answer["id"], 41,
            "{what}: the error answers the request: {answer}"
        );
        refused += 1;
    }
    // The same call with headers that agree (the name in Base64) runs.
    let text = format!("{marker}-ok");
    let (status, answer) = raw_call(
        &agent,
        &text,
        &[
            (version, "2026-07-28"),
            (method, "tools/call"),
            (name, "=?base64?ZWNobw==?="),
        ],
    )?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["result"]["content"][0]["text"],
        text.as_str(),
        "{answer}"
    );

    let executed = executed_eventually(&servers().json, &marker, 1).await;
    assert_eq!(
        executed.len(),
        1,
        "only the agreeing call ran: {executed:?}"
    );
    assert_eq!(executed[0]["arguments"]["text"], text.as_str());
    let audited = agent
        .sidecar
        .audit
        .records()
        .into_iter()
        .filter(|r| r["rule"] == "protocol/header_mismatch" && r["decision"] == "deny")
        .count();
    assert_eq!(audited, refused, "every refusal is audited");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_required_rounds_are_decided_each_and_counted_once() -> Result<()> {
    let agent = Agent::start(None).await?;
    let runs: Vec<(&str, ClientMode, String, (String, String))> = vec![
        (
            "json",
            ClientMode::Stateless,
            format!("mrtr-json-{}", unique_suffix()),
            new_trace(),
        ),
        (
            "sse",
            ClientMode::Auto,
            format!("mrtr-sse-{}", unique_suffix()),
            new_trace(),
        ),
    ];
    let confirm = json!({ "action": "accept", "content": { "confirm": true } });
    let clients = runs
        .iter()
        .map(|(server, mode, marker, (traceparent, _))| {
            let close = |n: u32| {
                let mut step = traced(
                    call("close_account", json!({ "id": format!("{marker}-{n}") })),
                    traceparent,
                );
                step["answer"] = confirm.clone();
                step
            };
            (
                PythonClient::new(*mode, agent.url(server)),
                vec![close(1), close(2), close(3)],
            )
        })
        .collect();
    let outcomes = run_all(clients).await?;
    for ((server, mode, marker, (_, trace)), run) in runs.iter().zip(&outcomes) {
        let what = format!("{server} server, {} client", mode.as_str());
        let [first, second, third] = &run.steps[..] else {
            bail!("{what}: {:?}", run.steps);
        };
        // Each call: input_required (the question), then the retry with the
        // answer, both passed; the history counts it once, when it completes.
        for (n, outcome) in [first, second].into_iter().enumerate() {
            assert_allowed(outcome, &format!("{what}: close_account {}", n + 1));
            assert_eq!(outcome["text"], "closed", "{what}: {outcome}");
            assert_eq!(outcome["inputRounds"], 1, "{what}: {outcome}");
        }
        assert_denied(third, &format!("{what}: a third close_account"));
        assert_eq!(
            third["inputRounds"], 0,
            "{what}: denied before any question: {third}"
        );

        let decisions: Vec<String> = agent
            .records_of("close_account")
            .iter()
            .filter(|r| r["session"]["key"] == trace.as_str())
            .map(|r| r["decision"].as_str().unwrap_or("?").to_owned())
            .collect();
        assert_eq!(
            decisions,
            ["allow", "allow", "allow", "allow", "deny"],
            "{what}: every round decided, in trace {trace}"
        );
        let executed = executed_eventually(servers().get(server), marker, 2).await;
        let ids: Vec<&str> = executed
            .iter()
            .filter_map(|l| l["arguments"]["id"].as_str())
            .collect();
        assert_eq!(
            ids,
            [format!("{marker}-1"), format!("{marker}-2")],
            "{what}: each confirmed call ran once"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_augmented_calls_are_decided_at_creation() -> Result<()> {
    let agent = Agent::start(None).await?;
    let runs: Vec<(&str, ClientMode, String)> = vec![
        (
            "json",
            ClientMode::Stateless,
            format!("task-json-{}", unique_suffix()),
        ),
        (
            "sse",
            ClientMode::Auto,
            format!("task-sse-{}", unique_suffix()),
        ),
    ];
    let clients = runs
        .iter()
        .map(|(server, mode, marker)| {
            let (mine, _) = new_trace();
            let (other, _) = new_trace();
            let schedule = |amount: u32| {
                traced(
                    call("schedule_transfer", json!({ "to": marker, "amount": amount })),
                    &mine,
                )
            };
            let task = |op: &str, id: &str, traceparent: &str| {
                json!({ "op": op, "taskId": id, "traceparent": traceparent })
            };
            (
                PythonClient::new(*mode, agent.url(server)).with_tasks(),
                vec![
                    schedule(500),
                    schedule(50),
                    task("task_get", "@last", &mine),
                    task("task_get", "@last", &other),
                    task("task_cancel", "@last", &other),
                    task("task_get", "0123456789abcdef0123456789abcdef", &mine),
                    task("task_cancel", "@last", &mine),
                ],
            )
        })
        .collect();
    let outcomes = run_all(clients).await?;
    for ((server, mode, marker), run) in runs.iter().zip(&outcomes) {
        let what = format!("{server} server, {} client", mode.as_str());
        let [
            large,
            small,
            get,
            foreign_get,
            foreign_cancel,
            forged,
            cancel,
        ] = &run.steps[..]
        else {
            bail!("{what}: {:?}", run.steps);
        };
        assert_denied(large, &format!("{what}: a task for 500"));
        assert_allowed(small, &format!("{what}: a task for 50"));
        assert!(
            small["taskId"].is_string(),
            "{what}: it ran as a task: {small}"
        );
        assert_eq!(
            small["text"],
            format!("scheduled 50.0 to {marker}"),
            "{what}: {small}"
        );
        assert_eq!(get["ok"], true, "{what}: {get}");
        assert_eq!(get["result"]["status"], "completed", "{what}: {get}");
        for (refused, case) in [
            (foreign_get, "tasks/get from another trace"),
            (foreign_cancel, "tasks/cancel from another trace"),
            (forged, "tasks/get of a task the sidecar never saw created"),
        ] {
            assert_eq!(refused["ok"], false, "{what}: {case}: {refused}");
            assert!(refused["code"].is_i64(), "{what}: {case}: {refused}");
            let message = refused["message"].as_str().unwrap_or_default();
            assert!(
                !message.contains("unknown task"),
                "{what}: {case} must be refused by the sidecar, not answered by the server: {refused}"
            );
        }
        assert_eq!(cancel["ok"], true, "{what}: {cancel}");

        let executed = executed_eventually(servers().get(server), marker, 1).await;
        let amounts: Vec<Option<f64>> = executed
            .iter()
            .map(|l| l["arguments"]["amount"].as_f64())
            .collect();
        assert_eq!(
            amounts,
            [Some(50.0)],
            "{what}: the denied task never reached the server"
        );
    }
    Ok(())
}
