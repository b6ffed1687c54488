//! The admin server (port 15090): `/metrics` (Prometheus text), `/readyz` (200
//! only with a snapshot in force: the pod's readiness probe) and `/livez` (the
//! liveness probe). `/ready` and `/live` answer as before for older probes.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use chaperone_wire::sidecar_env::{LIVEZ_PATH, READYZ_PATH};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::peer_keys::PeerKeyStore;

/// What makes the sidecar ready.
#[derive(Clone, Debug)]
pub enum Readiness {
    /// A policy snapshot in force (agent mode).
    Snapshot,
    /// The live sidecars' keys received (tool mode: it only verifies).
    Keys(Arc<PeerKeyStore>),
}
use crate::snapshot::SnapshotSource;

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn handle(
    req: &Request<Incoming>,
    source: &SnapshotSource,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        READYZ_PATH | "/ready" => match (readiness, source.current()) {
            (Readiness::Keys(keys), _) if keys.loaded() => respond(
                StatusCode::OK,
                "text/plain",
                format!("ready: {} sidecar keys\n", keys.current().len()),
            ),
            (Readiness::Keys(_), _) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: no sidecar keys from the controller yet\n".to_owned(),
            ),
            (Readiness::Snapshot, Some(active)) => respond(
                StatusCode::OK,
                "text/plain",
                format!("ready: snapshot version {}\n", active.version()),
            ),
            (Readiness::Snapshot, None) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", source.absence()),
            ),
        },
        LIVEZ_PATH | "/live" => respond(StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    source: Arc<SnapshotSource>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let source = Arc::clone(&source);
        let metrics = Arc::clone(&metrics);
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = handle(&req, &source, &metrics, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
