//! The webhook's HTTPS server: `POST /inject` turns an AdmissionReview into a
//! response with [`injection_patch`], and `POST /approve-toolcallapprovals`
//! ([`APPROVAL_PATH`]) answers writes of ToolCallApprovals with
//! [`ApprovalAdmission`], over rustls (aws-lc-rs) with a certificate that is
//! swapped in place when [`crate::certs::spawn_renewal`] publishes a new one.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use axum_server::{Handle, tls_rustls::RustlsConfig};
use chaperone_api::AgentIdentity;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, Resource,
    api::DynamicObject,
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    runtime::reflector::{ObjectRef, Store},
};
use tokio::{sync::watch, task::JoinHandle};

use super::{
    approval::APPROVAL_PATH,
    approval_review::ApprovalAdmission,
    injection_settings::{FailurePolicy, InjectionSettings},
    mutate::{Decision, injection_patch},
};
use crate::certs::{self, TlsMaterial};

/// Largest AdmissionReview accepted, bytes (the API server's object limit is
/// about 3 MiB).
const MAX_BODY_BYTES: usize = 4 << 20;

/// Why the webhook server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The listening socket could not be opened.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The serving certificate could not be turned into a TLS configuration.
    #[error(transparent)]
    Tls(#[from] certs::CertError),
    /// The server failed while running.
    #[error("serving: {0}")]
    Serve(#[from] std::io::Error),
    /// The server task panicked or was cancelled.
    #[error("server task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What one review did, for metrics and benchmarks.
#[derive(Clone, Debug)]
pub struct ReviewRecord {
    /// Time from the request reaching the handler to the response being ready
    /// (body read, decode, decide, encode).
    pub elapsed: Duration,
    /// What was decided; `None` when the review was not for a pod creation or
    /// failed.
    pub decision: Option<Decision>,
    /// Whether the pod was admitted.
    pub allowed: bool,
}

type Observer = Arc<dyn Fn(&ReviewRecord) + Send + Sync>;

/// What the handlers need: injection settings (with the current CA), the
/// AgentIdentity store, namespace labels and a client for cache misses; the
/// approval admission, when this server answers for ToolCallApprovals.
pub struct WebhookState {
    client: Client,
    settings: ArcSwap<InjectionSettings>,
    identities: Store<AgentIdentity>,
    namespaces: Option<Store<Namespace>>,
    approvals: Option<ApprovalAdmission>,
    observer: Option<Observer>,
}

impl WebhookState {
    /// State with `settings` (their `ca_pem` is replaced by the served CA), the
    /// AgentIdentities of `identities`, and namespace labels read with `client`.
    pub fn new(
        client: Client,
        settings: InjectionSettings,
        identities: Store<AgentIdentity>,
    ) -> Self {
        Self {
            client,
            settings: ArcSwap::from_pointee(settings),
            identities,
            namespaces: None,
            approvals: None,
            observer: None,
        }
    }

    /// Answers [`APPROVAL_PATH`] with `approvals`; without, every write of a
    /// ToolCallApproval sent there is refused.
    #[must_use]
    pub fn with_approvals(mut self, approvals: ApprovalAdmission) -> Self {
        self.approvals = Some(approvals);
        self
    }

    /// Reads namespace labels from `store` (a Namespace reflector), falling back
    /// to a GET for namespaces it does not hold yet.
    #[must_use]
    pub fn with_namespace_store(mut self, store: Store<Namespace>) -> Self {
        self.namespaces = Some(store);
        self
    }

    /// Calls `observer` after every review (latency metrics, benchmarks).
    #[must_use]
    pub fn with_observer(
        mut self,
        observer: impl Fn(&ReviewRecord) + Send + Sync + 'static,
    ) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The settings currently used.
    pub fn settings(&self) -> Arc<InjectionSettings> {
        self.settings.load_full()
    }

    /// Makes injected sidecars trust `ca_pem` from now on.
    pub fn set_ca(&self, ca_pem: &str) {
        if self.settings.load().ca_pem != ca_pem {
            let mut next = InjectionSettings::clone(&self.settings.load());
            next.ca_pem = ca_pem.to_string();
            self.settings.store(Arc::new(next));
        }
    }

    async fn namespace_labels(&self, name: &str) -> Result<BTreeMap<String, String>, kube::Error> {
        if let Some(ns) = self
            .namespaces
            .as_ref()
            .and_then(|store| store.get(&ObjectRef::new(name)))
        {
            return Ok(ns.metadata.labels.clone().unwrap_or_default());
        }
        let ns = Api::<Namespace>::all(self.client.clone()).get(name).await?;
        Ok(ns.metadata.labels.unwrap_or_default())
    }

    /// Answers one admission request. `Err` carries the reason a request is
    /// malformed (the handler answers HTTP 400 with it).
    pub async fn review(
        &self,
        request: &AdmissionRequest<Pod>,
    ) -> Result<(AdmissionResponse, Option<Decision>), String> {
        let response = AdmissionResponse::from(request);
        if request.operation != Operation::Create
            || request.kind.kind != "Pod"
            || request.sub_resource.is_some()
        {
            return Ok((response, None));
        }
        let Some(pod) = request.object.as_ref() else {
            return Err("AdmissionRequest for a pod CREATE carries no object".to_string());
        };
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_default();
        let settings = self.settings.load();

        let labels = match self.namespace_labels(&namespace).await {
            Ok(labels) => labels,
            Err(e) => {
                let reason = format!(
                    "chaperone injection webhook could not read namespace {namespace}: {e}"
                );
                tracing::warn!(%reason, "internal error");
                return Ok((
                    internal_error(response, settings.failure_policy, reason),
                    None,
                ));
            }
        };
        let identities: Vec<Arc<AgentIdentity>> = self
            .identities
            .state()
            .into_iter()
            .filter(|identity| identity.metadata.namespace.as_deref() == Some(namespace.as_str()))
            .collect();

        let outcome = if pod.metadata.namespace.as_deref() == Some(namespace.as_str()) {
            injection_patch(pod, &labels, &settings, &identities)
        } else {
            let mut pod = pod.clone();
            pod.metadata.namespace = Some(namespace.clone());
            injection_patch(&pod, &labels, &settings, &identities)
        };
        match outcome {
            Ok(outcome) => {
                let mut response = if outcome.patch.0.is_empty() {
                    response
                } else {
                    match response.clone().with_patch(outcome.patch) {
                        Ok(patched) => patched,
                        Err(e) => {
                            let reason = format!("chaperone injection webhook: {e}");
                            return Ok((
                                internal_error(response, settings.failure_policy, reason),
                                None,
                            ));
                        }
                    }
                };
                if !outcome.warnings.is_empty() {
                    response.warnings = Some(outcome.warnings);
                }
                tracing::debug!(
                    namespace = %namespace,
                    pod = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or_default(),
                    decision = ?outcome.decision,
                    "reviewed pod"
                );
                Ok((response, Some(outcome.decision)))
            }
            Err(e) => {
                tracing::info!(namespace = %namespace, reason = %e, "pod refused");
                Ok((response.deny(e.to_string()), None))
            }
        }
    }
}

fn internal_error(
    response: AdmissionResponse,
    policy: FailurePolicy,
    reason: String,
) -> AdmissionResponse {
    match policy {
        FailurePolicy::Fail => response.deny(reason),
        FailurePolicy::Ignore => {
            let mut response = response;
            response.warnings = Some(vec![format!("{reason}; admitted without the sidecar")]);
            response
        }
    }
}

/// The webhook's routes: `POST /inject` and `POST /approve-toolcallapprovals`.
pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route(APPROVAL_PATH, post(approve))
        .with_state(state)
}

async fn approve(State(state): State<Arc<WebhookState>>, request: Request<Body>) -> Response {
    let request = match decode::<DynamicObject>(request).await {
        Ok(request) => request,
        Err(reason) => return plain(StatusCode::BAD_REQUEST, reason),
    };
    let response = match &state.approvals {
        Some(approvals) => approvals.review(&request).await,
        None => AdmissionResponse::from(&request)
            .deny("this chaperone webhook server does not review ToolCallApprovals"),
    };
    match serde_json::to_vec(&response.into_review()) {
        Ok(body) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the AdmissionReview: {e}"),
        ),
    }
}

fn plain(status: StatusCode, reason: String) -> Response {
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        reason,
    )
        .into_response()
}

async fn inject(State(state): State<Arc<WebhookState>>, request: Request<Body>) -> Response {
    let started = Instant::now();
    let (status, body, decision, allowed) = match decode::<Pod>(request).await {
        Err(reason) => (StatusCode::BAD_REQUEST, reason.into_bytes(), None, false),
        Ok(request) => match state.review(&request).await {
            Err(reason) => (StatusCode::BAD_REQUEST, reason.into_bytes(), None, false),
            Ok((response, decision)) => {
                let allowed = response.allowed;
                match serde_json::to_vec(&response.into_review()) {
                    Ok(body) => (StatusCode::OK, body, decision, allowed),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding the AdmissionReview: {e}").into_bytes(),
                        None,
                        false,
                    ),
                }
            }
        },
    };
    let record = ReviewRecord {
        elapsed: started.elapsed(),
        decision,
        allowed,
    };
    if let Some(observer) = &state.observer {
        observer(&record);
    }
    let content_type = if status == StatusCode::OK {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    (
        status,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        body,
    )
        .into_response()
}

async fn decode<K>(request: Request<Body>) -> Result<AdmissionRequest<K>, String>
where
    K: Resource + serde::de::DeserializeOwned,
{
    let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| format!("reading the AdmissionReview: {e}"))?;
    let review: AdmissionReview<K> =
        serde_json::from_slice(&bytes).map_err(|e| format!("malformed AdmissionReview: {e}"))?;
    review
        .try_into()
        .map_err(|_| "malformed AdmissionReview: it has no request".to_string())
}

/// A running webhook server.
pub struct BoundWebhook {
    /// The address it listens on (the actual port when bound to port 0).
    pub local_addr: SocketAddr,
    handle: Handle<SocketAddr>,
    server: JoinHandle<std::io::Result<()>>,
    reloader: JoinHandle<()>,
}

impl BoundWebhook {
    /// Waits until the server stops.
    pub async fn wait(mut self) -> Result<(), WebhookError> {
        let result = (&mut self.server).await;
        self.reloader.abort();
        Ok(result??)
    }

    /// Stops the server (open connections are closed).
    pub fn shutdown(&self) {
        self.handle.shutdown();
        self.reloader.abort();
    }
}

impl Drop for BoundWebhook {
    fn drop(&mut self) {
        self.reloader.abort();
    }
}

/// Binds `addr` and serves the webhook with the certificate of `tls`, swapping
/// in each new certificate the channel publishes (and the CA injected sidecars
/// trust) without a restart. Returns once listening.
pub async fn bind(
    addr: SocketAddr,
    mut tls: watch::Receiver<Arc<TlsMaterial>>,
    state: Arc<WebhookState>,
) -> Result<BoundWebhook, WebhookError> {
    let material = tls.borrow_and_update().clone();
    let config = RustlsConfig::from_config(Arc::new(certs::server_config(&material)?));
    state.set_ca(&material.ca_pem);

    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| WebhookError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| WebhookError::Bind { addr, source })?;
    let handle = Handle::new();
    let server = axum_server::from_tcp_rustls(listener, config.clone())
        .map_err(|source| WebhookError::Bind { addr, source })?
        .handle(handle.clone());
    let app = router(state.clone());
    let server = tokio::spawn(async move { server.serve(app.into_make_service()).await });

    let reloader = tokio::spawn(async move {
        while tls.changed().await.is_ok() {
            let material = tls.borrow_and_update().clone();
            match certs::server_config(&material) {
                Ok(next) => {
                    config.reload_from_config(Arc::new(next));
                    state.set_ca(&material.ca_pem);
                    tracing::info!(not_after = ?material.not_after, "webhook serving certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new serving certificate unusable; keeping the old one")
                }
            }
        }
    });
    tracing::info!(%local_addr, "injection and approval webhook listening");
    Ok(BoundWebhook {
        local_addr,
        handle,
        server,
        reloader,
    })
}

/// [`bind`] and serve until the server fails.
pub async fn serve(
    addr: SocketAddr,
    tls: watch::Receiver<Arc<TlsMaterial>>,
    state: Arc<WebhookState>,
) -> Result<(), WebhookError> {
    bind(addr, tls, state).await?.wait().await
}
