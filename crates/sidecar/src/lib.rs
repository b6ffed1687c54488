//! Chaperone's gateway sidecar: what every injected agent pod runs.
//!
//! The agent talks MCP (Streamable HTTP) to `http://127.0.0.1:15001/<server>`;
//! the sidecar parses each message strictly, decides governed calls with
//! `chaperone_policy` against the latest snapshot, forwards allowed calls with a
//! signed per-call assertion, filters list results by the same rules, and writes
//! one hash-linked audit record per decision. It never depends on kube.
//!
//! Seams for the controller stream:
//! - snapshots in: [`Sidecar::snapshots`] → [`SnapshotSource::update`] (ACK on
//!   `Ok(version)`, NACK on `Err`);
//! - key registration out: [`Sidecar::key_registration`];
//! - tool inventory out: [`Sidecar::tool_inventory`] (a `watch` of the set,
//!   each tool with its last listed definition hash and JSON);
//! - audit batches out: [`Sidecar::take_audit_records`] (bounded queue, drops
//!   counted in `chaperone_sidecar_audit_dropped_total`);
//! - peer keys in: [`Sidecar::peer_keys`] (the live sidecars' JWKS);
//! - approvals of held calls out and their answers in: [`Sidecar::approvals`]
//!   ([`approvals::Approvals::connect`] with the stream's sender,
//!   [`approvals::Approvals::on_status`] with each `ApprovalStatus`).
//!
//! [`snapshot_stream`] is the controller-mode client that drives these seams;
//! [`standalone`] compiles a policy directory instead.

#![forbid(unsafe_code)]

pub mod admin;
pub mod approvals;
pub mod assertion;
pub mod audit;
pub mod authz;
pub mod backoff;
pub mod canonical;
pub mod client;
pub mod delegated;
pub mod inbound;
pub mod initiator;
pub mod intake;
pub mod inventory;
pub mod jsonrpc;
pub mod listener;
pub mod methods;
pub mod metrics;
pub mod oauth;
pub mod outcome;
pub mod peer_keys;
pub mod proxy;
pub mod ratelimit;
pub mod refusal;
pub mod run;
pub mod runtime;
pub mod session;
pub mod settings;
pub mod signing_nonces;
pub mod snapshot;
pub mod snapshot_stream;
pub mod spans;
pub mod sse;
pub mod standalone;
pub mod upstream_secrets;
pub mod verify;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use assertion::KeyRegistration;
pub use audit::AuditOutput;
pub use inventory::DiscoveredTool;
pub use peer_keys::{PeerKeyStore, PeerKeys};
pub use run::{Listeners, SnapshotFeed, TaskEnded};
pub use settings::{Settings, SidecarMode};
pub use snapshot::{SnapshotRejected, SnapshotSource};
pub use snapshot_stream::SnapshotStream;

use crate::assertion::AssertionSigner;
use crate::audit::AuditLog;
use crate::authz::{Enforcer, PodIdentity};
use crate::inventory::ToolInventory;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::ratelimit::AgentRateLimits;
use crate::upstream_secrets::{ScopedCaVerifier, UpstreamSecrets};

/// The sidecar could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// No signing key.
    #[error(transparent)]
    Key(#[from] assertion::KeyGenerationError),
    /// No TLS client.
    #[error(transparent)]
    Tls(#[from] client::TlsSetupError),
}

/// A running sidecar's shared state: build it, hand out its seams, serve it.
#[derive(Debug, Clone)]
pub struct Sidecar {
    gateway: Arc<Gateway>,
    audit_records: Arc<Mutex<Option<mpsc::Receiver<Arc<str>>>>>,
    peer_keys: Arc<PeerKeyStore>,
}

impl Sidecar {
    /// A sidecar with no snapshot yet (it refuses everything until one arrives).
    /// With `ship_audit`, audit records are also queued for
    /// [`Sidecar::take_audit_records`].
    pub fn new(
        settings: Settings,
        audit: AuditOutput,
        ship_audit: bool,
    ) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let (ship, records) = if ship_audit {
            let (tx, rx) = mpsc::channel(settings.audit_queue);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // One key signs the assertions and the audit trail's checkpoints.
        let signer = AssertionSigner::generate_with_nonces(settings.signing_nonces_kept())?
            .counting_unpooled_signatures(metrics.assertions_signed_unpooled.clone());
        let audit = AuditLog::new(audit, ship, metrics.audit_dropped.clone(), signer.clone())
            .with_checkpoint_every(settings.audit_checkpoint_every);
        let enforcer = Enforcer {
            signer,
            audit,
            agent_limits: AgentRateLimits::default(),
            metrics: Arc::clone(&metrics),
            pod: PodIdentity {
                pod: settings.pod_name.clone(),
            },
            inventory: ToolInventory::default(),
        };
        let source = Arc::new(SnapshotSource::new());
        let roots = Arc::new(client::root_store(settings.upstream_ca_file.as_deref())?);
        let upstream_secrets = Arc::new(UpstreamSecrets::new(
            settings.upstream_secrets_dir.clone(),
            Arc::clone(&roots),
            client::crypto_provider(),
        ));
        let verifier = ScopedCaVerifier::new(
            client::verifier(roots)?,
            Arc::clone(&source),
            Arc::clone(&upstream_secrets),
        );
        let client = client::upstream_client(settings.connect_timeout, Arc::new(verifier))?;
        let gateway = Arc::new(Gateway::new(
            settings,
            source,
            enforcer,
            metrics,
            client,
            upstream_secrets,
        ));
        Ok(Self {
            gateway,
            audit_records: Arc::new(Mutex::new(records)),
            peer_keys: Arc::new(PeerKeyStore::default()),
        })
    }

    /// The snapshot source: call [`SnapshotSource::update`] with each snapshot.
    pub fn snapshots(&self) -> &Arc<SnapshotSource> {
        &self.gateway.source
    }

    /// The public keys of the live sidecars that may call this one, as the
    /// controller last sent them
    /// (for verifying delegated calls' assertions).
    pub fn peer_keys(&self) -> &Arc<PeerKeyStore> {
        &self.peer_keys
    }

    /// The tickets of calls held for a person's approval: the controller
    /// stream connects here and hands it the answers.
    pub fn approvals(&self) -> &Arc<approvals::Approvals> {
        &self.gateway.approvals
    }

    /// The pod this sidecar runs in (empty outside a pod).
    pub fn pod_name(&self) -> &str {
        &self.gateway.enforcer.pod.pod
    }

    /// The public key and key id to register with the controller.
    pub fn key_registration(&self) -> &KeyRegistration {
        self.gateway.enforcer.signer.registration()
    }

    /// The proof that this sidecar holds its signing key, for a snapshot
    /// stream authenticated by `bearer_token` (`SigningKey.proof`).
    pub fn key_registration_proof(&self, bearer_token: &str) -> Vec<u8> {
        self.gateway
            .enforcer
            .signer
            .registration_proof(bearer_token)
    }

    /// The tools seen in `tools/list` results: one entry per server and tool,
    /// with its last listed definition (where `toolPinning` is not `off`).
    pub fn tool_inventory(&self) -> watch::Receiver<BTreeSet<DiscoveredTool>> {
        self.gateway.enforcer.inventory.subscribe()
    }

    /// The receiving end of the audit shipping queue (once; `None` afterwards or
    /// when shipping is off).
    pub fn take_audit_records(&self) -> Option<mpsc::Receiver<Arc<str>>> {
        self.audit_records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The sidecar's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.gateway.metrics
    }

    /// Sessions held now.
    pub fn session_count(&self) -> usize {
        self.gateway.sessions.len()
    }

    /// Serves the MCP proxy on `listener` until `shutdown` resolves.
    pub async fn serve_proxy(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        proxy::serve(Arc::clone(&self.gateway), listener, shutdown).await;
    }

    /// Serves the inbound side (delegated calls, or calls to the tool server in
    /// tool mode) on `listener` until `shutdown` resolves; returns at once when
    /// no inbound upstream is configured.
    pub async fn serve_inbound(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let Some(upstream) = self.gateway.settings.inbound_upstream.clone() else {
            return;
        };
        let inbound = Arc::new(inbound::Inbound::new(
            Arc::clone(&self.gateway),
            Arc::clone(&self.peer_keys),
            upstream,
            self.gateway.settings.mode,
        ));
        inbound.serve(listener, shutdown).await;
    }

    /// The settings the sidecar runs with.
    pub fn settings(&self) -> &Settings {
        &self.gateway.settings
    }

    /// Serves the admin endpoints on `listener` until `shutdown` resolves.
    pub async fn serve_admin(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let readiness = match self.gateway.settings.mode {
            SidecarMode::Agent => admin::Readiness::Snapshot,
            SidecarMode::Tool => admin::Readiness::Keys(Arc::clone(&self.peer_keys)),
        };
        admin::serve(
            Arc::clone(&self.gateway.source),
            Arc::clone(&self.gateway.metrics),
            readiness,
            listener,
            shutdown,
        )
        .await;
    }

    /// Writes a signed audit checkpoint if decisions were written since the
    /// last one; returns whether it did. [`Sidecar::maintain`] calls it every
    /// `audit_checkpoint_interval`.
    pub fn checkpoint_audit(&self) -> Result<bool, audit::AuditWriteError> {
        self.gateway.enforcer.audit.checkpoint()
    }

    /// Writes the final audit checkpoint and closes the audit trail: calls
    /// decided afterwards are refused (they could not be audited). For
    /// shutdown.
    pub fn close_audit(&self) -> Result<(), audit::AuditWriteError> {
        self.gateway.enforcer.audit.close()
    }

    fn set_snapshot_version(&self, version: Option<u64>) {
        let version = i64::try_from(version.unwrap_or(0)).unwrap_or(i64::MAX);
        self.gateway.metrics.snapshot_version.set(version);
    }

    /// Forgets idle sessions every `every`, keeps the snapshot-version and
    /// session gauges current, and writes an audit checkpoint every
    /// `audit_checkpoint_interval` when decisions are uncovered; runs until
    /// dropped.
    pub async fn maintain(&self, every: Duration) {
        let mut versions = self.gateway.source.subscribe();
        // A snapshot put in force before this subscribed (standalone mode
        // loads its policy directory at once) is not a change: set it now.
        self.set_snapshot_version(*versions.borrow_and_update());
        let mut tick = tokio::time::interval(every);
        let mut checkpoint = tokio::time::interval(self.gateway.settings.audit_checkpoint_interval);
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = checkpoint.tick() => {
                    if let Err(err) = self.checkpoint_audit() {
                        tracing::error!(error = %err, "audit checkpoint not written");
                    }
                }
                changed = versions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.set_snapshot_version(*versions.borrow_and_update());
                }
                _ = tick.tick() => {
                    if let Some(active) = self.gateway.source.current() {
                        let idle = Duration::from_secs(u64::from(active.snapshot.content.session.idle_timeout_seconds));
                        self.gateway.sessions.sweep(Instant::now(), idle);
                        self.gateway.delegated.sweep(Instant::now(), idle);
                    }
                    self.gateway.metrics.sessions.set(self.gateway.sessions.len() as i64);
                    self.gateway
                        .metrics
                        .delegated_sessions
                        .set(self.gateway.delegated.len() as i64);
                }
            }
        }
    }
}
