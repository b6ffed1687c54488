//! `mcp-echo`: a minimal MCP Streamable HTTP server for benchmarks. Answers
//! `initialize` with a session id, `tools/call` with a small text result, and
//! notifications with 202, all as `application/json`.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let sessions = Arc::new(AtomicU64::new(0));
    chaperone_bench::serve(listener, move |req: http::Request<hyper::body::Incoming>| {
        let sessions = Arc::clone(&sessions);
        async move {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let Ok(message) = serde_json::from_slice::<serde_json::Value>(&body) else {
                let mut r = Response::new(Full::new(Bytes::from_static(b"bad request")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            };
            let Some(id) = message.get("id").cloned() else {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::ACCEPTED;
                return r;
            };
            let method = message["method"].as_str().unwrap_or_default();
            let mut builder = Response::builder().header("content-type", "application/json");
            let result = if method == "initialize" {
                let n = sessions.fetch_add(1, Ordering::Relaxed);
                builder = builder.header("mcp-session-id", format!("s-{n}"));
                serde_json::json!({"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"mcp-echo","version":"0"}})
            } else if method == "tools/list" {
                serde_json::json!({"tools":[{"name":"echo","inputSchema":{"type":"object"}}]})
            } else {
                serde_json::json!({"content":[{"type":"text","text":"ok"}],"isError":false})
            };
            let answer = serde_json::json!({"jsonrpc":"2.0","id":id,"result":result});
            builder
                .body(Full::new(Bytes::from(answer.to_string())))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
        }
    })
    .await;
    Ok(())
}
