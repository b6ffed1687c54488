//! The third-party MCP servers and JSON readers of `tests/servers/` (installed
//! by `make tools`), spoken to directly, without a sidecar: each server runs a
//! `transfer` and its exec log shows what it executed; the readers read bodies
//! the way Go's `encoding/json` and Node's `JSON.parse` do.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use chaperone_testenv::{
    mcp_fixtures::{call, mcp_session},
    mcp_servers::{
        RunningServer, ServerKind, Transport, http, jsonrpc_answer, next_event, read_with_go,
        read_with_js, spawn, spawn_all,
    },
};
use serde_json::{Value, json};

/// Calls `tool` with `arguments` on `server` over its transport; the text of
/// the result, or an error.
async fn call_tool(server: &RunningServer, tool: &str, arguments: Value) -> Result<String> {
    match server.kind().transport() {
        Transport::StreamableHttp => {
            let client = mcp_session(&server.url(), None).await?;
            let result = call(&client, tool, arguments).await;
            let _ = client.cancel().await;
            result.map_err(|e| anyhow::anyhow!("{tool} failed: {e}"))
        }
        Transport::Sse => {
            let port = server.port();
            let (tool, arguments) = (tool.to_owned(), arguments);
            tokio::task::spawn_blocking(move || sse_call(port, &tool, arguments)).await?
        }
    }
}

/// One MCP session over the legacy HTTP+SSE transport, by hand: GET /sse,
/// the `endpoint` event, POSTs to it, answers as `message` events.
fn sse_call(port: u16, tool: &str, arguments: Value) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    // HTTP/1.0: the event stream comes unchunked.
    stream.write_all(
        format!("GET /sse HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )?;
    let mut events = BufReader::new(stream);
    let mut line = String::new();
    events.read_line(&mut line)?;
    ensure!(line.contains(" 200"), "GET /sse: {line}");
    loop {
        line.clear();
        events.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
    }
    let (kind, endpoint) = next_event(&mut events)?;
    ensure!(kind == "endpoint", "first SSE event is {kind}: {endpoint}");
    let post = |message: Value| -> Result<()> {
        let body = message.to_string();
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(
            format!(
                "POST {endpoint} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        ensure!(
            answer.starts_with("HTTP/1.1 202") || answer.starts_with("HTTP/1.0 202"),
            "POST {endpoint}: {answer}"
        );
        Ok(())
    };
    let mut answer = |id: i64| -> Result<Value> {
        loop {
            let (kind, data) = next_event(&mut events)?;
            if kind != "message" {
                continue;
            }
            let message: Value = serde_json::from_str(&data)?;
            if message["id"] == json!(id) {
                return Ok(message);
            }
        }
    };
    post(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {},
        "clientInfo": {"name": "chaperone-test", "version": "0"}}}),
    )?;
    let init = answer(1)?;
    ensure!(init.get("result").is_some(), "initialize: {init}");
    post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
    post(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": tool, "arguments": arguments}}))?;
    let result = answer(2)?;
    let text = result["result"]["content"][0]["text"].as_str();
    match text {
        Some(text) if result["result"]["isError"] != json!(true) => Ok(text.to_owned()),
        _ => bail!("{tool}: {result}"),
    }
}

/// The one executed call in `server`'s exec log.
fn only_execution(server: &RunningServer) -> Value {
    let executed = server.executed();
    assert_eq!(executed.len(), 1, "{}: {executed:?}", server.kind());
    executed.into_iter().next().unwrap_or_default()
}

async fn transfer_executes(kind: ServerKind) -> Result<()> {
    let server = spawn(kind)?;
    eprintln!(
        "{kind}: ready in {:?} at {}",
        server.startup(),
        server.url()
    );
    let text = call_tool(&server, "transfer", json!({"to": "bob", "amount": 50})).await?;
    assert_eq!(text, "transferred", "{kind}");
    let run = only_execution(&server);
    assert_eq!(run["tool"], "transfer", "{kind}: {run}");
    assert_eq!(run["arguments"]["to"], "bob", "{kind}: {run}");
    assert_eq!(
        run["arguments"]["amount"].as_f64(),
        Some(50.0),
        "{kind}: {run}"
    );
    assert_eq!(run["sdk"], kind.sdk_version().as_str(), "{kind}: {run}");
    let transport = match kind.transport() {
        Transport::StreamableHttp => "streamable-http",
        Transport::Sse => "sse",
    };
    assert_eq!(run["transport"], transport, "{kind}: {run}");
    Ok(())
}

#[tokio::test]
async fn ts_1_17_streamable_http_runs_transfer() -> Result<()> {
    transfer_executes(ServerKind::TsStreamable117).await
}

#[tokio::test]
async fn ts_latest_streamable_http_runs_transfer() -> Result<()> {
    transfer_executes(ServerKind::TsStreamableLatest).await
}

#[tokio::test]
async fn ts_latest_sse_runs_transfer() -> Result<()> {
    transfer_executes(ServerKind::TsSse).await
}

#[tokio::test]
async fn mcp_go_runs_transfer() -> Result<()> {
    transfer_executes(ServerKind::McpGo).await
}

#[tokio::test]
async fn python_runs_transfer() -> Result<()> {
    transfer_executes(ServerKind::Python).await
}

/// Initializes a Streamable HTTP session on `port` by hand, then POSTs the
/// raw `body` in it; the JSON-RPC answer.
fn streamable_raw(port: u16, body: &[u8]) -> Result<Value> {
    const POST: &str = "POST /mcp HTTP/1.0\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream";
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "chaperone-test", "version": "0"}}});
    let (status, headers, answer) = http(port, POST, init.to_string().as_bytes())?;
    ensure!(status == 200, "initialize: {status} {answer}");
    let session = headers
        .iter()
        .find(|(k, _)| k == "mcp-session-id")
        .map(|(_, v)| v.clone())
        .context("no Mcp-Session-Id")?;
    let post = format!("{POST}\r\nMcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-06-18");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, answer) = http(port, &post, initialized.to_string().as_bytes())?;
    ensure!(
        status == 202,
        "notifications/initialized: {status} {answer}"
    );
    let (_, _, answer) = http(port, &post, body)?;
    jsonrpc_answer(&answer)
}

/// Why the exec log matters: `amount` and `AMOUNT` are two keys to an exact
/// reader, and each SDK binds them its own way. The TypeScript (zod) and
/// Python (pydantic) SDKs take `amount`; mcp-go's `BindArguments` matches Go
/// struct fields case-insensitively and the last key wins. (Raw bytes: a
/// serde_json map would reorder the keys.)
#[tokio::test]
async fn case_variant_keys_bind_per_sdk() -> Result<()> {
    let body = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"transfer","arguments":{"to":"bob","amount":50,"AMOUNT":1000}}}"#;
    let expected = [
        (ServerKind::TsStreamable117, 50.0),
        (ServerKind::TsStreamableLatest, 50.0),
        (ServerKind::McpGo, 1000.0),
        (ServerKind::Python, 50.0),
    ];
    let servers = spawn_all(&expected.map(|(kind, _)| kind))?;
    for ((kind, bound), server) in expected.into_iter().zip(servers) {
        let port = server.port();
        let answer = tokio::task::spawn_blocking(move || streamable_raw(port, body)).await??;
        assert_eq!(
            answer["result"]["content"][0]["text"], "transferred",
            "{kind}: {answer}"
        );
        let run = only_execution(&server);
        assert_eq!(
            run["arguments"]["amount"].as_f64(),
            Some(bound),
            "{kind}: {run}"
        );
        assert_eq!(
            run["raw_arguments"],
            json!({"to": "bob", "amount": 50, "AMOUNT": 1000}),
            "{kind}: {run}"
        );
    }
    Ok(())
}

#[test]
fn readers_read_like_go_and_node() -> Result<()> {
    let bodies: Vec<Vec<u8>> = vec![
        br#"{"method":"ping","Method":"tools/call"}"#.to_vec(),
        br#"{"method":"tools/call","params":{"name":"transfer","arguments":{"amount":100.00000000000001}}}"#.to_vec(),
        br#"{"method":"tools/call","params":{"name":"transfer","arguments":{"amount":1e400}}}"#.to_vec(),
        Vec::new(),
    ];
    let go = read_with_go(&bodies)?;
    let js = read_with_js(&bodies)?;
    eprintln!("go: {go:#?}\njs: {js:#?}");

    // Keys differing by case: Go's struct binding takes the last match, the
    // map and JSON.parse keep both, JSON.parse's `method` is the exact key.
    assert_eq!(go[0]["struct"]["ok"], true);
    assert_eq!(go[0]["struct"]["method"], "tools/call");
    assert_eq!(
        go[0]["map"]["value"],
        json!({"method": "ping", "Method": "tools/call"})
    );
    assert_eq!(js[0]["method"], "ping");
    assert_eq!(js[0]["value"]["Method"], "tools/call");

    // A number beyond f64's precision: every reader keeps its own text of it.
    assert_eq!(
        go[1]["map"]["numbers"]["/params/arguments/amount"],
        "100.00000000000001"
    );
    assert_eq!(go[1]["struct"]["numbers"]["/amount"], "100.00000000000001");
    assert_eq!(
        js[1]["numbers"]["/params/arguments/amount"],
        "100.00000000000001"
    );
    assert_eq!(go[1]["struct"]["name"], "transfer");

    // Out of f64's range: Go's map keeps the text, its struct binding refuses,
    // JSON.parse reads Infinity.
    assert_eq!(go[2]["map"]["numbers"]["/params/arguments/amount"], "1e400");
    assert_eq!(go[2]["struct"]["ok"], false);
    assert_eq!(js[2]["numbers"]["/params/arguments/amount"], "Infinity");

    // An empty body reads as nothing anywhere.
    assert_eq!(go[3]["map"]["ok"], false);
    assert_eq!(go[3]["struct"]["ok"], false);
    assert_eq!(js[3]["ok"], false);
    Ok(())
}
