//! MCP 2026-07-28 through the sidecar, against a scripted stateless tool
//! server: session scopes (trace, agent), the request headers bound to the
//! body (-32020), multi round-trip requests (`input_required`) counted once,
//! tasks reachable only from the scope that created them, and list caching
//! hints. The official SDKs are exercised end to end in
//! `tests/tests/e2e_mcp_2026.rs`; this file pins the sidecar's side exactly.

#![allow(missing_docs)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const T1: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const T1_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const T2: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

const POLICY_2026: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata:
  name: support
  namespace: shop
spec:
  targetRefs:
    - name: support-agent
  tools:
    - name: read_customer
      effects: [sensitiveData]
    - name: send_email
      effects: [externalCommunication]
  rules:
    - name: no-exfiltration
      action: deny
      tools:
        - effect: externalCommunication
      when:
        session:
          anyEffectSeen: [sensitiveData]
    - name: allow-support-tools
      action: allow
      tools:
        - name: read_customer
        - name: send_email
        - name: slow
    - name: ask-twice
      action: allow
      tools:
        - name: ask
      when:
        session:
          toolCallsFewerThan: 2
"#;

/// What the scripted server received: method, params and headers of each
/// request.
type Received = Arc<Mutex<Vec<(Value, http::HeaderMap)>>>;

/// A stateless 2026-07-28 tool server: `ask` answers `input_required` until
/// retried with `inputResponses`; `slow` answers a task handle; `tasks/*`
/// answer the task; `tools/list` lists five tools with long caching hints.
/// An `x-test-sse: 1` request is answered as an event stream, an
/// `x-test-unauthorized: 1` request with an OAuth challenge and a text body.
async fn scripted_server() -> (SocketAddr, Received) {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::clone(&received);
    tokio::spawn(async move {
        let tasks = Arc::new(Mutex::new(0u32));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen);
            let tasks = Arc::clone(&tasks);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        let tasks = Arc::clone(&tasks);
                        async move {
                            let (parts, body) = req.into_parts();
                            let bytes = body.collect().await.unwrap().to_bytes();
                            let message: Value = serde_json::from_slice(&bytes).unwrap();
                            seen.lock()
                                .unwrap()
                                .push((message.clone(), parts.headers.clone()));
                            if parts.headers.get("x-test-unauthorized").is_some() {
                                return Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(401)
                                        .header("www-authenticate", "Bearer realm=\"mcp\"")
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from_static(b"Unauthorized")))
                                        .unwrap(),
                                );
                            }
                            let result = answer(&message, &tasks);
                            let reply =
                                json!({"jsonrpc": "2.0", "id": message["id"], "result": result});
                            let sse = parts.headers.get("x-test-sse").is_some();
                            let response = if sse {
                                http::Response::builder()
                                    .header("content-type", "text/event-stream")
                                    .body(Full::new(Bytes::from(format!(
                                        "event: message\ndata: {reply}\n\n"
                                    ))))
                            } else {
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(reply.to_string())))
                            };
                            Ok::<_, Infallible>(response.unwrap())
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, received)
}

fn answer(message: &Value, tasks: &Mutex<u32>) -> Value {
    let params = &message["params"];
    match message["method"].as_str().unwrap_or_default() {
        "tools/list" => {
            let tools: Vec<Value> = ["read_customer", "send_email", "ask", "slow", "secret"]
                .iter()
                .map(|name| json!({"name": name, "inputSchema": {"type": "object"}}))
                .collect();
            json!({"resultType": "complete", "tools": tools, "ttlMs": 3_600_000, "cacheScope": "public"})
        }
        "tools/call" => match params["name"].as_str().unwrap_or_default() {
            "ask" if params.get("inputResponses").is_none() => json!({
                "resultType": "input_required",
                "inputRequests": {"confirm": {"method": "elicitation/create", "params": {
                    "mode": "form", "message": "Sure?",
                    "requestedSchema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}},
                "requestState": "opaque-1",
            }),
            "slow" => {
                let mut n = tasks.lock().unwrap();
                *n += 1;
                json!({"resultType": "task", "taskId": format!("task-{n}"), "status": "working",
                       "createdAt": "2026-12-04T00:00:00Z", "lastUpdatedAt": "2026-12-04T00:00:00Z", "ttl": 60000})
            }
            name => json!({"resultType": "complete", "content": [{"type": "text", "text": name}]}),
        },
        "tasks/get" | "tasks/cancel" | "tasks/update" => json!({
            "resultType": "complete", "taskId": params["taskId"], "status": "completed",
            "createdAt": "2026-12-04T00:00:00Z", "lastUpdatedAt": "2026-12-04T00:00:00Z", "ttl": 60000,
        }),
        _ => json!({"resultType": "complete"}),
    }
}

/// The sidecar in front of the scripted server, with [`POLICY_2026`] and the
/// identity's `session` block replaced by `session`.
async fn harness(session: &str) -> (Harness, Received) {
    let harness = Harness::start(true, false).await;
    let (addr, received) = scripted_server().await;
    let identity = IDENTITY
        .replace("UPSTREAM_URL", &format!("http://{addr}/mcp"))
        .replace(
            "  session:\n    idleTimeoutSeconds: 600\n    maxCalls: 50\n",
            session,
        );
    std::fs::write(harness.policy_dir().join("identity.yaml"), identity).unwrap();
    std::fs::write(harness.policy_dir().join("policy.yaml"), POLICY_2026).unwrap();
    let mut harness = harness;
    harness.reload();
    (harness, received)
}

const AUTO: &str = "  session:\n    idleTimeoutSeconds: 600\n";
const AGENT: &str = "  session:\n    idleTimeoutSeconds: 600\n    scope: agent\n";

/// A 2026-07-28 request: `params` gains `_meta` (protocol version and, when
/// given, `traceparent`); the MCP headers mirror the body.
fn modern(
    id: u64,
    method: &str,
    mut params: Value,
    trace: Option<&str>,
) -> (String, Vec<(String, String)>) {
    let mut meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}},
    });
    if let Some(trace) = trace {
        meta["traceparent"] = json!(trace);
    }
    params["_meta"] = meta;
    let mut headers = vec![
        ("mcp-protocol-version".to_owned(), "2026-07-28".to_owned()),
        ("mcp-method".to_owned(), method.to_owned()),
    ];
    let named = if method.starts_with("tasks/") {
        params.get("taskId")
    } else {
        params.get("name").or_else(|| params.get("uri"))
    };
    if let Some(name) = named.and_then(Value::as_str) {
        headers.push(("mcp-name".to_owned(), name.to_owned()));
    }
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    (body.to_string(), headers)
}

async fn send(
    harness: &Harness,
    request: &(String, Vec<(String, String)>),
    extra: &[(&str, &str)],
) -> Raw {
    let mut headers: Vec<(&str, &str)> = request
        .1
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.extend_from_slice(extra);
    post_raw(&harness.url(), &headers, request.0.clone()).await
}

/// The JSON-RPC message of a response, JSON or a one-event stream.
fn message_of(raw: &Raw) -> Value {
    match raw.body.strip_prefix("event: message\ndata: ") {
        Some(data) => serde_json::from_str(data.trim_end()).unwrap(),
        None => raw.json(),
    }
}

async fn call(harness: &Harness, id: u64, tool: &str, trace: Option<&str>) -> Value {
    let request = modern(
        id,
        "tools/call",
        json!({"name": tool, "arguments": {}}),
        trace,
    );
    message_of(&send(harness, &request, &[]).await)
}

fn denied_by(message: &Value) -> Option<&str> {
    message["error"]["data"]["rule"].as_str()
}

#[tokio::test]
async fn a_trace_is_a_session_and_a_new_trace_starts_a_new_one() {
    let (harness, _) = harness(AUTO).await;
    assert!(call(&harness, 1, "read_customer", Some(T1)).await["result"].is_object());
    let second = call(&harness, 2, "send_email", Some(T1)).await;
    assert_eq!(
        denied_by(&second),
        Some("support/no-exfiltration"),
        "{second}"
    );
    // Another trace has its own history.
    assert!(call(&harness, 3, "send_email", Some(T2)).await["result"].is_object());
    // The traceparent header counts when `_meta` has none.
    let request = modern(
        4,
        "tools/call",
        json!({"name": "send_email", "arguments": {}}),
        None,
    );
    let by_header = message_of(&send(&harness, &request, &[("traceparent", T1)]).await);
    assert_eq!(
        denied_by(&by_header),
        Some("support/no-exfiltration"),
        "{by_header}"
    );
    // No trace at all: the pod's own history, which has seen nothing sensitive.
    assert!(call(&harness, 5, "send_email", None).await["result"].is_object());

    let records = harness.audit.records();
    let scopes: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["session"]["scope"].as_str().unwrap(),
                r["session"]["key"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(scopes[0], ("trace", T1_ID));
    assert_eq!(scopes[2], ("trace", "0af7651916cd43dd8448eb211c80319c"));
    assert_eq!(scopes[3], ("trace", T1_ID));
    assert_eq!(scopes[4], ("agent", ""));
    // One trace is one audit chain under one Chaperone session id.
    assert_eq!(
        records[0]["session"]["chaperone"],
        records[1]["session"]["chaperone"]
    );
    assert_ne!(
        records[0]["session"]["chaperone"],
        records[2]["session"]["chaperone"]
    );
}

#[tokio::test]
async fn scope_agent_keeps_one_history_across_traces() {
    let (harness, _) = harness(AGENT).await;
    assert!(call(&harness, 1, "read_customer", Some(T1)).await["result"].is_object());
    let other_trace = call(&harness, 2, "send_email", Some(T2)).await;
    assert_eq!(
        denied_by(&other_trace),
        Some("support/no-exfiltration"),
        "{other_trace}"
    );
    let no_trace = call(&harness, 3, "send_email", None).await;
    assert_eq!(
        denied_by(&no_trace),
        Some("support/no-exfiltration"),
        "{no_trace}"
    );
    for record in harness.audit.records() {
        assert_eq!(record["session"]["scope"], "agent", "{record}");
    }
}

#[tokio::test]
async fn headers_that_disagree_with_the_body_are_refused_and_never_forwarded() {
    let (harness, received) = harness(AUTO).await;
    let request = modern(
        7,
        "tools/call",
        json!({"name": "read_customer", "arguments": {}}),
        None,
    );
    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        ("Mcp-Name", vec![("mcp-name", "send_email")]),
        ("Mcp-Method", vec![("mcp-method", "tools/list")]),
        (
            "MCP-Protocol-Version",
            vec![("mcp-protocol-version", "2026-09-30")],
        ),
        (
            "Mcp-Name",
            vec![("mcp-name", "=?base64?c2VuZF9lbWFpbA==?=")],
        ),
    ];
    for (header, replaced) in cases {
        let headers: Vec<(&str, &str)> = request
            .1
            .iter()
            .filter(|(k, _)| !replaced.iter().any(|(r, _)| r == k))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(replaced.iter().copied())
            .collect();
        let raw = post_raw(&harness.url(), &headers, request.0.clone()).await;
        assert_eq!(raw.status, 400, "{header}: {}", raw.body);
        let error = raw.json();
        assert_eq!(error["error"]["code"], -32020, "{error}");
        assert_eq!(error["id"], 7, "{error}");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(header),
            "{error}"
        );
    }
    // A required header missing.
    let headers: Vec<(&str, &str)> = request
        .1
        .iter()
        .filter(|(k, _)| k != "mcp-name")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let raw = post_raw(&harness.url(), &headers, request.0.clone()).await;
    assert_eq!(
        (raw.status.as_u16(), raw.json()["error"]["code"].as_i64()),
        (400, Some(-32020))
    );
    // The name in Base64 is the same name.
    let encoded: Vec<(&str, &str)> = request
        .1
        .iter()
        .map(|(k, v)| match k.as_str() {
            "mcp-name" => ("mcp-name", "=?base64?cmVhZF9jdXN0b21lcg==?="),
            _ => (k.as_str(), v.as_str()),
        })
        .collect();
    let raw = post_raw(&harness.url(), &encoded, request.0.clone()).await;
    assert!(raw.json()["result"].is_object(), "{}", raw.body);

    assert_eq!(
        received.lock().unwrap().len(),
        1,
        "only the matching request reached the server"
    );
    let refusals: Vec<Value> = harness
        .audit
        .records()
        .into_iter()
        .filter(|r| r["decision"] == "deny")
        .collect();
    assert_eq!(refusals.len(), 5);
    assert!(
        refusals
            .iter()
            .all(|r| r["reason"].as_str().unwrap().contains("header mismatch"))
    );
}

async fn ask_round_trip(harness: &Harness, first: u64, sse: bool) -> Value {
    let extra: &[(&str, &str)] = if sse { &[("x-test-sse", "1")] } else { &[] };
    let ask = modern(
        first,
        "tools/call",
        json!({"name": "ask", "arguments": {}}),
        Some(T1),
    );
    let pending = message_of(&send(harness, &ask, extra).await);
    assert_eq!(
        pending["result"]["resultType"], "input_required",
        "{pending}"
    );
    let retry = modern(
        first + 1,
        "tools/call",
        json!({"name": "ask", "arguments": {}, "inputResponses": {"confirm": {"action": "accept", "content": {"ok": true}}},
               "requestState": pending["result"]["requestState"]}),
        Some(T1),
    );
    message_of(&send(harness, &retry, extra).await)
}

#[tokio::test]
async fn an_input_required_round_trip_is_decided_twice_and_counted_once() {
    let (harness, received) = harness(AUTO).await;
    // `ask` is allowed while called fewer than twice: two complete round
    // trips (four requests) fit, a third call does not.
    for (first, sse) in [(1, false), (3, true)] {
        let done = ask_round_trip(&harness, first, sse).await;
        assert_eq!(done["result"]["resultType"], "complete", "{done}");
    }
    let third = call(&harness, 5, "ask", Some(T1)).await;
    assert_eq!(denied_by(&third), Some("no rule allows"), "{third}");
    assert_eq!(received.lock().unwrap().len(), 4);
    let decided = harness
        .audit
        .records()
        .iter()
        .filter(|r| r["tool"] == "ask" && r["decision"] == "allow")
        .count();
    assert_eq!(decided, 4, "every round is decided on its own");
}

#[tokio::test]
async fn tasks_are_reachable_only_from_the_scope_that_created_them() {
    let (harness, received) = harness(AUTO).await;
    let created = call(&harness, 1, "slow", Some(T1)).await;
    assert_eq!(created["result"]["taskId"], "task-1", "{created}");
    let get = |id, task: &str, trace| modern(id, "tasks/get", json!({"taskId": task}), trace);
    let same = message_of(&send(&harness, &get(2, "task-1", Some(T1)), &[]).await);
    assert_eq!(same["result"]["status"], "completed", "{same}");
    let update = modern(
        3,
        "tasks/update",
        json!({"taskId": "task-1", "inputResponses": {}}),
        Some(T1),
    );
    assert!(message_of(&send(&harness, &update, &[]).await)["result"].is_object());
    // Another trace, the pod scope, or a task never created here: refused.
    for (id, task, trace) in [
        (4, "task-1", Some(T2)),
        (5, "task-1", None),
        (6, "task-9", Some(T1)),
    ] {
        let refused = message_of(&send(&harness, &get(id, task, trace), &[]).await);
        assert_eq!(refused["error"]["code"], -32602, "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap()
                .contains("was not created"),
            "{refused}"
        );
    }
    // A case-variant taskId a folding server would read is refused as such.
    let variant = modern(7, "tasks/get", json!({"TaskId": "task-1"}), Some(T1));
    let refused = message_of(&send(&harness, &variant, &[]).await);
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    // Mcp-Name carries the task id: naming another task is a mismatch.
    let mut renamed = get(8, "task-1", Some(T1));
    for (name, value) in &mut renamed.1 {
        if name == "mcp-name" {
            *value = "task-2".to_owned();
        }
    }
    let refused = message_of(&send(&harness, &renamed, &[]).await);
    assert_eq!(refused["error"]["code"], -32020, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"task-2\""),
        "{refused}"
    );
    assert_eq!(
        received.lock().unwrap().len(),
        3,
        "refused task requests never reach the server"
    );
}

#[tokio::test]
async fn filtered_lists_are_private_and_not_cached() {
    let (harness, _) = harness(AUTO).await;
    for sse in [false, true] {
        let extra: &[(&str, &str)] = if sse { &[("x-test-sse", "1")] } else { &[] };
        let list =
            message_of(&send(&harness, &modern(1, "tools/list", json!({}), None), extra).await);
        let names: Vec<&str> = list["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["read_customer", "send_email", "ask", "slow"],
            "sse {sse}"
        );
        assert_eq!(list["result"]["ttlMs"], 0, "{list}");
        assert_eq!(list["result"]["cacheScope"], "private", "{list}");
    }
}

#[tokio::test]
async fn an_auth_challenge_without_json_passes_with_its_status_and_headers() {
    let (harness, _) = harness(AUTO).await;
    let unauthorized = [("x-test-unauthorized", "1")];
    let list = modern(1, "tools/list", json!({}), None);
    let raw = send(&harness, &list, &unauthorized).await;
    assert_eq!(raw.status, 401, "{raw:?}");
    assert_eq!(raw.body, "", "a body the sidecar cannot read goes");
    assert_eq!(
        raw.headers.get("www-authenticate").unwrap(),
        "Bearer realm=\"mcp\""
    );
    // A legacy batch with a denied call: the denial is answered, the
    // forwarded request gets an error naming the server's status.
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "secret", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
    ]);
    let raw = post_raw(
        &harness.url(),
        &[("x-test-unauthorized", "1")],
        batch.to_string(),
    )
    .await;
    assert_eq!(raw.status, 200, "{raw:?}");
    let answers = raw.json();
    let by_id = |id: u64| {
        answers
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no answer {id}: {answers}"))
    };
    assert!(denied_by(&by_id(1)).is_some(), "{answers}");
    assert!(
        by_id(2)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{answers}"
    );
}
