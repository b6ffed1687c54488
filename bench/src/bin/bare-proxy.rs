//! `bare-proxy`: the baseline: a pass-through hyper HTTP/1 reverse proxy with a
//! pooled keep-alive client, no parsing, no policy. `bare-proxy LISTEN UPSTREAM`
//! forwards `/<anything>` to `http://UPSTREAM/mcp`.

#![forbid(unsafe_code)]

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    chaperone_bench::serve(listener, move |req: Request<hyper::body::Incoming>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let (parts, body) = req.into_parts();
            let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
                return error();
            };
            let mut forward = Request::new(Full::new(body));
            *forward.method_mut() = parts.method;
            *forward.uri_mut() = url;
            *forward.headers_mut() = parts.headers;
            forward.headers_mut().remove(http::header::HOST);
            let Ok(response) = client.request(forward).await else {
                return error();
            };
            let (parts, body) = response.into_parts();
            let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
                return error();
            };
            Response::from_parts(parts, Full::new(body))
        }
    })
    .await;
    Ok(())
}

fn error() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
