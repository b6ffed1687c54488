//! chaperone-controller: watches AgentIdentity, ToolPolicy, DelegationGrant;
//! compiles per-agent snapshots with `chaperone-policy`; writes status (leader
//! only); pushes snapshots to sidecars over an authenticated gRPC stream; serves
//! the injection webhook and the sidecars' JWKS.
//!
//! The pieces, each a module: [`index`] (a pure state machine from objects to
//! snapshots), [`object_watch`] (the watches feeding it), [`snapshot_server`]
//! (gRPC), [`auth`] (TokenReview → pod → AgentIdentity, or a tool-mode
//! sidecar), [`pod_selection`] (which agent a pod is, for the webhook and
//! [`auth`]), [`sidecars`] (what the connected sidecars run), [`status`] (pure
//! status computation + the leader's writer), [`leader`] (Lease), [`admin`]
//! (/metrics, /livez, /readyz, JWKS), [`replica_exchange`] (the replicas
//! share their sidecars' keys and state through ConfigMaps),
//! [`audit_key_archive`] (every sidecar's key kept for the retention, so
//! audit trails verify after their pods are gone),
//! [`tool_definitions`] (tool definition pinning: discovered definitions
//! against their pins, the Events and texts of changes), [`approvals`]
//! (people's approvals of single tool calls: ToolCallApprovals, the tickets
//! of the sidecars waiting on them, expiry and collection), [`webhook`]
//! (sidecar injection; who may create, approve and deny ToolCallApprovals),
//! [`certs`] (the controller's CA and serving
//! certificate). [`Args`] holds the flags and builds the settings of the
//! webhook and the certificates from them.

#![forbid(unsafe_code)]

pub mod admin;
pub mod approvals;
mod args;
pub mod audit_events;
pub mod audit_key_archive;
pub mod auth;
pub mod certs;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod object_watch;
pub mod pod_selection;
pub mod replica_exchange;
pub mod sidecars;
pub mod snapshot_server;
pub mod status;
#[cfg(test)]
mod test_objects;
pub mod tool_definitions;
pub mod webhook;

use std::sync::Arc;

pub use args::{Args, InvalidSetting, LogFormat};
use futures_util::StreamExt as _;
use kube::runtime::WatchStreamExt as _;
use tokio::sync::watch;

/// Errors that stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CRD is not installed.
    #[error(
        "CRD {0} is not installed: install the CRDs first (kubectl apply -f crds/, or the Helm chart)"
    )]
    CrdMissing(String),
    /// The API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// The labels of a ConfigMap the controller writes: `component`
/// (`app.kubernetes.io/component`), `app.kubernetes.io/part-of=chaperone`,
/// and `extra`.
pub fn config_map_labels<const N: usize>(
    component: &str,
    extra: [(&str, &str); N],
) -> std::collections::BTreeMap<String, String> {
    [
        ("app.kubernetes.io/component", component),
        ("app.kubernetes.io/part-of", "chaperone"),
    ]
    .into_iter()
    .chain(extra)
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Current unix time in seconds.
pub fn unix_now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

/// Sets up logs (`format`, else `CHAPERONE_LOG_FORMAT`, else JSON off a
/// terminal; filtered by `RUST_LOG`, default `info`) and, when `OTEL_*`
/// names an endpoint, exports spans over OTLP; dropping the guard flushes
/// them. Call it once, inside the Tokio runtime.
pub fn init_telemetry(
    format: Option<LogFormat>,
) -> Result<chaperone_telemetry::TelemetryGuard, chaperone_telemetry::TelemetryError> {
    chaperone_telemetry::init("chaperone-controller", format)
}

/// Sets up logs only, in `format` (tests that start a controller
/// in-process); does nothing when a subscriber is already installed.
pub fn init_logging(format: LogFormat) {
    // The guard holds no exporter: nothing to keep.
    let _ = chaperone_telemetry::init_with(format, None);
}

/// The running parts of a controller, for tests that start one in-process.
pub struct Controller {
    /// The index.
    pub index: Arc<SharedIndex>,
    /// The sidecars connected to this replica (and the other replicas').
    pub sidecars: Arc<sidecars::SidecarRegistry>,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
}

pub use index::SharedIndex;

/// How long a stopping controller waits for the Events of the audit records
/// it received (and the summaries of allowed calls) to be written.
pub const EVENT_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a stopping leader tries to hand its Lease over.
pub const LEASE_RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the controller until it fails or SIGTERM (or Ctrl-C) stops it.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    run_until(args, client, chaperone_telemetry::stop_requested()).await
}

/// Runs the controller with `client` (tests pass their control plane's) until
/// it fails or `stop` resolves. Then it stops serving (sidecars reconnect to
/// another replica, keeping the audit batches they could not send), writes
/// the Events of what it received, summaries included (at most
/// [`EVENT_FLUSH_TIMEOUT`]), and hands its Lease over if it leads (at most
/// [`LEASE_RELEASE_TIMEOUT`]), so that another replica writes status without
/// waiting for the Lease to expire.
pub async fn run_until(
    args: Args,
    client: kube::Client,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // Settings first: a bad value stops the controller before it touches anything.
    let injection = webhook::InjectionSettings::from_args(&args)?;
    object_watch::check_crds_installed(&client).await?;
    let cert_config = certs::CertConfig::from_args(&args);
    let cert_source = cert_config.source;
    let tls = certs::load(client.clone(), &cert_config).await?;
    let tls_rx = certs::spawn_renewal(client.clone(), cert_config, tls.clone());
    // With external TLS, cert-manager's CA injector owns the caBundle.
    let _ca_bundle_sync = (cert_source == certs::CertSource::SelfManaged).then(|| {
        certs::spawn_ca_bundle_sync(
            client.clone(),
            args.webhook_config.clone(),
            tls_rx.clone(),
            std::time::Duration::from_secs(60),
        )
    });
    if let Some(path) = &args.ca_file {
        std::fs::write(path, &tls.ca_pem)?;
    }
    let metrics = metrics::Metrics::new();
    let controller = Controller {
        index: SharedIndex::new(metrics.clone()),
        sidecars: sidecars::SidecarRegistry::new(),
        metrics,
    };
    let (leader_tx, leader_rx) = watch::channel(false);
    // AgentIdentities as Kubernetes objects, for the webhook and stream auth;
    // stored without what neither reads (managed fields, the last-applied
    // annotation, the status this controller writes).
    let (identities, identity_writer) = kube::runtime::reflector::store();
    let identity_reflector = kube::runtime::reflector(
        identity_writer,
        kube::runtime::watcher(
            kube::Api::<chaperone_api::AgentIdentity>::all(client.clone()),
            Default::default(),
        )
        .modify(|identity| {
            identity.metadata.managed_fields = None;
            if let Some(annotations) = identity.metadata.annotations.as_mut() {
                annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
            identity.status = None;
        }),
    )
    .default_backoff()
    .for_each(|_| std::future::ready(()));
    let audit = audit_events::AuditEvents::spawn(
        client.clone(),
        args.pod_name.clone(),
        controller.metrics.clone(),
    );
    let (approvals, approvals_cache) = approvals::ApprovalDesk::new(
        client.clone(),
        audit.clone(),
        controller.metrics.clone(),
        args.approval_settings(),
    );
    // Gauges of what exists, read at each scrape from where it is recorded.
    controller
        .metrics
        .register_collector(metrics::SidecarGauges::new(
            controller.sidecars.clone(),
            controller.index.clone(),
        ));
    controller
        .metrics
        .register_collector(metrics::ApprovalGauges::new(approvals.clone()));
    let audit_keys = audit_key_archive::AuditKeyArchive::new(controller.metrics.clone());
    let server = snapshot_server::SnapshotServer::new(
        client.clone(),
        controller.index.clone(),
        controller.sidecars.clone(),
        controller.metrics.clone(),
        audit.clone(),
        identities.clone(),
        approvals.clone(),
        audit_keys.clone(),
    );
    let admin_state = admin::AdminState {
        metrics: controller.metrics.clone(),
        index: controller.index.clone(),
        sidecars: controller.sidecars.clone(),
    };
    // Whose writes of ToolCallApprovals are the controller's own.
    let own_username = match args.service_account_username() {
        Some(username) => username,
        None => webhook::approval_review::own_username(&client)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "asking the API server who the controller is (SelfSubjectReview; or set CHAPERONE_SERVICE_ACCOUNT): {e}"
                )
            })?,
    };
    let approval_admission = webhook::ApprovalAdmission::new(client.clone(), own_username);
    tracing::info!(grpc = %args.grpc_addr, admin = %args.admin_addr, user = approval_admission.controller_username(), "chaperone-controller starting");
    let events_at_stop = audit.clone();
    tokio::select! {
        () = object_watch::run(client.clone(), controller.index.clone(), controller.metrics.clone()) => anyhow::bail!("object watches ended"),
        () = status::run_writer(client.clone(), controller.index.clone(), controller.sidecars.clone(), controller.metrics.clone(), audit, leader_rx.clone()) => anyhow::bail!("status writer ended"),
        () = approvals.run(approvals_cache, leader_rx.clone()) => anyhow::bail!("approval watch ended"),
        () = audit_keys.run(client.clone(), args.namespace.clone(), args.audit_key_retention_days, leader_rx) => anyhow::bail!("audit-key archive ended"),
        () = object_watch::watch_pod_deletions(client.clone(), controller.sidecars.clone()) => anyhow::bail!("pod watch ended"),
        () = replica_exchange::run(client.clone(), args.namespace.clone(), args.pod_name.clone(), controller.sidecars.clone()) => anyhow::bail!("replica exchange ended"),
        () = status::run_expiry_ticker(controller.index.clone()) => anyhow::bail!("expiry ticker ended"),
        () = leader::run(client.clone(), args.namespace.clone(), args.lease_name.clone(), args.pod_name.clone(), leader_tx) => anyhow::bail!("leader election ended"),
        r = admin::serve(args.admin_addr, admin_state) => { r?; anyhow::bail!("admin server ended") }
        r = server.serve_rotating(args.grpc_addr, tls_rx.clone()) => { r?; anyhow::bail!("snapshot server ended") }
        () = identity_reflector => anyhow::bail!("AgentIdentity reflector ended"),
        r = webhook::run_webhook(args.webhook_addr, injection, client.clone(), identities.clone(), approval_admission, tls_rx.clone()) => { r?; anyhow::bail!("webhook server ended") }
        () = stop => tracing::info!("stopping"),
    }
    // Everything above is dropped: listeners closed, watches and status
    // writes stopped (streams still open end with the process; their
    // sidecars keep what they could not send for the next replica).
    match tokio::time::timeout(EVENT_FLUSH_TIMEOUT, events_at_stop.flush()).await {
        Ok(()) => tracing::info!("stopping: the Events of the audit records received are written"),
        Err(_) => {
            tracing::warn!(timeout = ?EVENT_FLUSH_TIMEOUT, "stopping: Events still unwritten")
        }
    }
    let release = leader::release(client, &args.namespace, &args.lease_name, &args.pod_name);
    match tokio::time::timeout(LEASE_RELEASE_TIMEOUT, release).await {
        Ok(Ok(true)) => {
            tracing::info!(lease = %args.lease_name, "stopping: leadership handed over")
        }
        Ok(Ok(false)) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, lease = %args.lease_name, "stopping: the Lease was not released; another replica takes it when it expires")
        }
        Err(_) => {
            tracing::warn!(lease = %args.lease_name, "stopping: the Lease was not released in time; another replica takes it when it expires")
        }
    }
    Ok(())
}
