//! The controller's mutating admission webhooks: sidecar injection and the
//! approval of single tool calls.
//!
//! [`mutate`] decides and builds the injection JSON patch (pure) with the
//! [`injection_settings`] it is given (built from the flags in `args.rs`);
//! [`quantity`] reads the Kubernetes quantities of resource settings and
//! annotations; [`approval`] decides who may create, approve, deny and update
//! a ToolCallApproval (pure) and [`approval_review`] asks the authorizer for
//! it; [`server`] serves both over HTTPS (`POST /inject`,
//! `POST /approve-toolcallapprovals`) with the controller's self-managed
//! certificate. [`run_webhook`] wires them for the controller binary.

pub mod approval;
pub mod approval_review;
pub mod injection_settings;
pub mod mutate;
pub mod quantity;
pub mod server;

use std::sync::Arc;

use chaperone_api::AgentIdentity;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use tokio::sync::watch;

pub use approval::APPROVAL_PATH;
pub use approval_review::ApprovalAdmission;
pub use injection_settings::{
    Bounds, FailurePolicy, InjectionSettings, ProxyResources, sidecar_otel_env,
};
pub use mutate::{Decision, InjectionError, InjectionOutcome, injection_patch};
pub use server::{BoundWebhook, ReviewRecord, WebhookError, WebhookState, bind, router, serve};

use crate::certs::TlsMaterial;

/// A reflector over Namespaces (for their injection label) and the future that
/// feeds it; poll the future (spawn it) for the store to fill.
pub fn namespace_reflector(
    client: Client,
) -> (
    Store<Namespace>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(Api::<Namespace>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let drive = async move {
        stream
            .for_each(|event| async move {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "namespace watch failed; retrying");
                }
            })
            .await;
    };
    (reader, drive)
}

/// Runs the webhooks until they fail: serves `POST /inject` and
/// `POST /approve-toolcallapprovals` on `addr` with the certificate of `tls`
/// (reloaded on renewal), injecting with `settings`
/// ([`InjectionSettings::from_args`], checked at startup), reads
/// AgentIdentities from `identities`, watches Namespaces for their labels, and
/// reviews ToolCallApprovals with `approvals`. (The caBundle is kept current
/// by [`crate::certs::spawn_ca_bundle_sync`], which the caller runs unless
/// cert-manager does it.)
pub async fn run_webhook(
    addr: std::net::SocketAddr,
    settings: InjectionSettings,
    client: Client,
    identities: Store<AgentIdentity>,
    approvals: ApprovalAdmission,
    tls: watch::Receiver<Arc<TlsMaterial>>,
) -> Result<(), WebhookError> {
    let (namespaces, drive) = namespace_reflector(client.clone());
    let namespace_task = tokio::spawn(drive);
    let state = WebhookState::new(client, settings, identities)
        .with_namespace_store(namespaces)
        .with_approvals(approvals);
    let result = serve(addr, tls, Arc::new(state)).await;
    namespace_task.abort();
    result
}
