//! Shared pieces of Chaperone's sidecar benchmarks: a tiny HTTP/1 server loop,
//! the bodies the load generator sends, and [`fake_controller`], the snapshot
//! stream's server side that puts the sidecar under test in controller mode.

#![forbid(unsafe_code)]

pub mod fake_controller;
pub mod hot_text;
pub mod instructions;

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves `handler` on `listener` forever (HTTP/1.1, keep-alive, no Nagle).
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A `tools/call` of tool `echo` whose body is about `size` bytes.
pub fn tools_call_body(id: u64, size: usize) -> String {
    let head = format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":""#
    );
    let tail = r#""}}}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad))
}

/// The path at which `bare-proxy` answers with its own timings instead of
/// forwarding.
pub const BARE_STATS_PATH: &str = "/_bench/stats";

/// An `initialize` request.
pub const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"chaperone-bench","version":"0"}}}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_call_bodies_are_about_the_asked_size() {
        let body = tools_call_body(7, 1024);
        assert_eq!(body.len(), 1024);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["params"]["name"], "echo");
    }
}
