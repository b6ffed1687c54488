//! `bare-proxy`: the baseline: a pass-through hyper HTTP/1 reverse proxy with a
//! pooled keep-alive client, no parsing, no policy. `bare-proxy LISTEN UPSTREAM`
//! forwards `/<anything>` to `http://UPSTREAM/mcp`, except `GET /_bench/stats`:
//! the time its handler spent per forwarded request so far, whole and waiting
//! for the upstream's response headers (what `chaperone-bench` compares with
//! the sidecar's `request` and `upstream` stages).

#![forbid(unsafe_code)]

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use chaperone_wire::sidecar_env::ENV_WORKER_THREADS;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Sums over the forwarded requests, nanoseconds.
#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    handler_ns: AtomicU64,
    upstream_ns: AtomicU64,
}

/// Runs on the runtime the sidecar would (`CHAPERONE_WORKER_THREADS`, default
/// 1), so that the two are compared on the same footing.
fn main() -> anyhow::Result<()> {
    let worker_threads = match std::env::var(ENV_WORKER_THREADS) {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("{ENV_WORKER_THREADS}={value:?}: a positive integer"))?,
        Err(_) => NonZeroUsize::MIN,
    };
    chaperone_sidecar::runtime::build(worker_threads)?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".to_owned());
    let upstream = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "127.0.0.1:18080".to_owned());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let url: http::Uri = format!("http://{upstream}/mcp").parse()?;
    let stats = Arc::new(Stats::default());
    chaperone_bench::serve(listener, move |req: Request<hyper::body::Incoming>| {
        let client = client.clone();
        let url = url.clone();
        let stats = Arc::clone(&stats);
        async move {
            let started = Instant::now();
            if req.uri().path() == chaperone_bench::BARE_STATS_PATH {
                return stats_response(&stats);
            }
            let (parts, body) = req.into_parts();
            let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
                return error();
            };
            let mut forward = Request::new(Full::new(body));
            *forward.method_mut() = parts.method;
            *forward.uri_mut() = url;
            *forward.headers_mut() = parts.headers;
            forward.headers_mut().remove(http::header::HOST);
            let sending = Instant::now();
            let Ok(response) = client.request(forward).await else {
                return error();
            };
            let upstream = sending.elapsed();
            let (parts, body) = response.into_parts();
            let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
                return error();
            };
            let nanos = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            stats.requests.fetch_add(1, Ordering::Relaxed);
            stats
                .upstream_ns
                .fetch_add(nanos(upstream), Ordering::Relaxed);
            stats
                .handler_ns
                .fetch_add(nanos(started.elapsed()), Ordering::Relaxed);
            Response::from_parts(parts, Full::new(body))
        }
    })
    .await;
    Ok(())
}

fn stats_response(stats: &Stats) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "requests": stats.requests.load(Ordering::Relaxed),
        "handlerNs": stats.handler_ns.load(Ordering::Relaxed),
        "upstreamNs": stats.upstream_ns.load(Ordering::Relaxed),
    });
    Response::new(Full::new(Bytes::from(body.to_string())))
}

fn error() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
