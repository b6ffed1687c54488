//! The admin server: /metrics, /livez (and its older name /healthz), /readyz and the sidecars' JWKS at
//! /.well-known/jwks.json. Plain HTTP on the admin port.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use chaperone_wire::sidecar_env::{LIVEZ_PATH, READYZ_PATH};

use crate::{index::SharedIndex, metrics::Metrics, sidecars::SidecarRegistry};

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// Ready once all kinds are listed.
    pub index: Arc<SharedIndex>,
    /// Keys for the JWKS.
    pub sidecars: Arc<SidecarRegistry>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(LIVEZ_PATH, get(|| async { "ok" }))
        .route("/healthz", get(|| async { "ok" }))
        .route(READYZ_PATH, get(readyz))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state)
}

/// Serves the admin routes on `addr`.
pub async fn serve(addr: SocketAddr, state: AdminState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(state)).await
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.index.is_synced() {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the custom resources are still being listed",
        )
    }
}

async fn jwks(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [("content-type", "application/jwk-set+json")],
        state.sidecars.jwks_json().to_string(),
    )
}
