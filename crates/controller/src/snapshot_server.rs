//! The snapshot gRPC server (`chaperone.snapshot.v1.SnapshotService/Watch`):
//! authenticates each sidecar's stream, sends its agent's snapshot on connect and
//! every new version after, and takes ACK/NACK, signing keys, tool inventory and
//! audit batches back. Served by every replica from its own index. What goes
//! over the wire is converted in [`wire`]: sidecar messages into typed
//! reports, snapshots and key sets into messages.
//!
//! A tool-mode sidecar's stream (pod annotated `chaperone.dev/inject: "tool"`)
//! carries only the key set: a `KeySet` on connect and after every change of the
//! live sidecars' keys, never a snapshot. It takes audit batches back, and its
//! signing key (its checkpoints' key) goes to the audit-key archive only,
//! never into the JWKS: it signs no assertions. ACK/NACK and inventory do not
//! apply to it and are ignored.
//!
//! Every signing key a stream registers, agent or tool mode, is held for the
//! [`crate::audit_key_archive`] while the stream lasts.
//!
//! An agent's sidecar may also ask for a person's approval of a call it
//! holds (`ApprovalRequest`, `ApprovalRelease`); [`crate::approvals`] handles
//! those, and its answers (`ApprovalStatus`) go out on the stream ahead of
//! anything else. A tool-mode stream carries no approvals.
//!
//! Each stream is two halves: an [`Outbox`] that builds the next message only
//! when tonic asks for it (so when HTTP/2 flow control lets one through), and a
//! task reading what the sidecar sends. A sidecar that reads slowly therefore
//! holds at most one message in the controller, and it gets the latest snapshot
//! and key set rather than a backlog of every version in between.
//!
//! An agent's sidecar gets only the keys of the agents that may call it (whose
//! AgentIdentity lists it as an `agent:` tool server): its inbound side accepts
//! no other assertion, and a cluster-wide key set would make every message
//! grow with the number of sidecars and every sidecar start a broadcast to all.
//! Tool-mode sidecars get every live key. Key sets change as sidecars come and
//! go, so a stream sends at most one per [`KEY_SET_MIN_INTERVAL`] (the first
//! change after a quiet period at once).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chaperone_api::AgentIdentity;
use chaperone_wire::v1::{
    ControllerMessage, SidecarMessage,
    snapshot_service_server::{SnapshotService, SnapshotServiceServer},
};
use futures_util::Stream;
use kube::{Client, runtime::reflector::Store};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    approvals::{ApprovalDesk, ApprovalStream},
    audit_events::{AuditEvents, AuditSource},
    audit_key_archive::{ArchivedKeyHold, AuditKeyArchive},
    auth::{self, Peer, SidecarIdentity, ToolSidecarIdentity},
    index::{PublishedSnapshot, SharedIndex, SnapshotRx},
    metrics::{Metrics, PushResult},
    sidecars::{ConnectionGuard, SidecarRegistry},
};

pub mod wire;

use wire::{InvalidSidecarMessage, ProvenKey, SidecarReport, SigningKey};

/// The shortest time between two key sets on one stream.
pub const KEY_SET_MIN_INTERVAL: Duration = Duration::from_millis(250);

/// The gRPC service.
#[derive(Clone)]
pub struct SnapshotServer {
    client: Client,
    index: Arc<SharedIndex>,
    sidecars: Arc<SidecarRegistry>,
    metrics: Arc<Metrics>,
    audit: Arc<AuditEvents>,
    identities: Store<AgentIdentity>,
    approvals: Arc<ApprovalDesk>,
    audit_keys: Arc<AuditKeyArchive>,
}

impl SnapshotServer {
    /// A server answering from `index`, recording sidecars in `sidecars`,
    /// handing approval requests to `approvals` and every sidecar's key to
    /// `audit_keys`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        index: Arc<SharedIndex>,
        sidecars: Arc<SidecarRegistry>,
        metrics: Arc<Metrics>,
        audit: Arc<AuditEvents>,
        identities: Store<AgentIdentity>,
        approvals: Arc<ApprovalDesk>,
        audit_keys: Arc<AuditKeyArchive>,
    ) -> Self {
        Self {
            client,
            index,
            sidecars,
            metrics,
            audit,
            identities,
            approvals,
            audit_keys,
        }
    }

    /// Serves on `addr`, restarting the listener with the new certificate each
    /// time `tls` publishes one (sidecars reconnect with backoff).
    pub async fn serve_rotating(
        self,
        addr: SocketAddr,
        mut tls: tokio::sync::watch::Receiver<Arc<crate::certs::TlsMaterial>>,
    ) -> Result<(), tonic::transport::Error> {
        loop {
            let material = tls.borrow_and_update().clone();
            let mut changes = tls.clone();
            let rotated = async move {
                let _ = changes.changed().await;
            };
            self.clone()
                .serve(addr, &material.cert_pem, &material.key_pem, rotated)
                .await?;
            tracing::info!("serving certificate rotated; restarting the snapshot server");
        }
    }

    /// Serves on `addr` with TLS (`cert_pem`/`key_pem`) until `shutdown` resolves.
    pub async fn serve(
        self,
        addr: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
        tonic::transport::Server::builder()
            .tls_config(tls)?
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
            .add_service(SnapshotServiceServer::new(self))
            .serve_with_shutdown(addr, shutdown)
            .await
    }
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotService for SnapshotServer {
    type WatchStream = MessageStream;

    async fn watch(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<MessageStream>, Status> {
        // What the sidecar's proof of key possession is bound to.
        let mut token_sha256 = [0; 32];
        let identity = match auth::bearer_token(request.metadata()) {
            Ok(token) => {
                token_sha256 = chaperone_audit::sha256(token.as_bytes());
                auth::authenticate(&self.client, &self.identities, token).await
            }
            Err(e) => Err(e),
        };
        let peer = identity.map_err(|e| {
            self.metrics.stream_refused(e.grpc_code());
            tracing::info!(error = %e, "refused a snapshot stream");
            Status::new(e.grpc_code(), e.to_string())
        })?;
        let (reader_alive, reader_done) = oneshot::channel();
        let inbound = request.into_inner();
        let outbox = match peer {
            Peer::Agent(identity) => {
                tracing::info!(agent = %identity.agent, pod = %identity.pod, "sidecar connected");
                let identity = Arc::new(identity);
                let sent_at = Arc::new(Mutex::new(None));
                let agent = AgentSnapshots::new(
                    self.index.lock().subscribe(&identity.agent),
                    Arc::clone(&identity),
                    Arc::clone(&sent_at),
                );
                let (approvals, answers) = self.approvals.open_stream(Arc::clone(&identity));
                let connection = self.sidecars.connect(&identity);
                let connection_id = connection.id();
                let mut outbox = Outbox::new(
                    self.clone(),
                    connection,
                    Some(agent),
                    reader_done,
                    &identity.pod,
                );
                outbox.approvals = Some(answers);
                tokio::spawn(self.clone().read_agent_stream(
                    AgentStream {
                        identity,
                        connection: connection_id,
                        token_sha256,
                        sent_at,
                        approvals,
                        archived: None,
                    },
                    inbound,
                    reader_alive,
                ));
                outbox
            }
            Peer::Tool(identity) => {
                tracing::info!(namespace = %identity.namespace, pod = %identity.pod, "tool-mode sidecar connected (key set only)");
                let outbox = Outbox::new(
                    self.clone(),
                    self.sidecars.connect_tool(&identity),
                    None,
                    reader_done,
                    &identity.pod,
                );
                tokio::spawn(self.clone().read_tool_stream(
                    identity,
                    token_sha256,
                    inbound,
                    reader_alive,
                ));
                outbox
            }
        };
        let stream = futures_util::stream::unfold(outbox, |mut outbox| async move {
            outbox.next().await.map(|message| (message, outbox))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// What the task reading an agent sidecar's messages keeps of its stream.
struct AgentStream {
    identity: Arc<SidecarIdentity>,
    /// Its registration in the [`SidecarRegistry`] ([`ConnectionGuard::id`]).
    connection: u64,
    /// The SHA-256 of the stream's bearer token (what key proofs are bound to).
    token_sha256: [u8; 32],
    /// The snapshot version last sent and when.
    sent_at: Arc<Mutex<Option<(u64, Instant)>>>,
    approvals: ApprovalStream,
    /// The key this stream registered, held for the audit-key archive until
    /// the stream ends.
    archived: Option<ArchivedKeyHold>,
}

/// One agent's snapshots as one stream sees them.
struct AgentSnapshots {
    rx: SnapshotRx,
    identity: Arc<SidecarIdentity>,
    /// Not yet sent.
    pending: Option<Arc<PublishedSnapshot>>,
    /// The version last sent and when (for the push latency on its ACK).
    sent_at: Arc<Mutex<Option<(u64, Instant)>>>,
}

impl AgentSnapshots {
    fn new(
        mut rx: SnapshotRx,
        identity: Arc<SidecarIdentity>,
        sent_at: Arc<Mutex<Option<(u64, Instant)>>>,
    ) -> Self {
        // The current snapshot first; `changed()` then fires for each new one.
        let pending = rx.borrow_and_update().clone();
        Self {
            rx,
            identity,
            pending,
            sent_at,
        }
    }

    /// The next snapshot: `Ok(None)` when the AgentIdentity is gone, `Err` when
    /// the index is.
    async fn changed(
        this: &mut Option<Self>,
    ) -> Result<Option<Arc<PublishedSnapshot>>, watch::error::RecvError> {
        match this {
            Some(agent) => {
                agent.rx.changed().await?;
                Ok(agent.rx.borrow_and_update().clone())
            }
            None => std::future::pending().await,
        }
    }
}

/// When a stream may send the key set: at once after a quiet period, otherwise
/// [`KEY_SET_MIN_INTERVAL`] after the previous one, with every change in
/// between folded into that one.
#[derive(Debug)]
struct KeySetPacer {
    /// The key set changed since it was last sent.
    pending: bool,
    /// No key set before this instant.
    not_before: Instant,
}

impl KeySetPacer {
    fn new(pending: bool, now: Instant) -> Self {
        Self {
            pending,
            not_before: now,
        }
    }

    /// The key set changed.
    fn changed(&mut self) {
        self.pending = true;
    }

    /// The key set went out (alone or inside a snapshot update) at `now`.
    fn sent(&mut self, now: Instant) {
        self.pending = false;
        self.not_before = now + KEY_SET_MIN_INTERVAL;
    }

    /// Whether a key set is due at `now`.
    fn due(&self, now: Instant) -> bool {
        self.pending && now >= self.not_before
    }

    /// When the pending key set will be due; `None` when none is pending.
    fn wake_at(&self) -> Option<Instant> {
        self.pending.then_some(self.not_before)
    }
}

/// What one stream sends, built when tonic asks for the next message (see the
/// module documentation). Holds the stream's registration: dropping it (the
/// stream ended or the sidecar went away) unregisters the sidecar.
struct Outbox {
    server: SnapshotServer,
    /// `None` on a tool-mode stream (key sets only).
    agent: Option<AgentSnapshots>,
    keys: watch::Receiver<u64>,
    /// Ticks when the AgentIdentities (hence who calls this agent) change.
    callers: watch::Receiver<u64>,
    /// The key set last sent, alone or inside a snapshot update.
    keys_sent: Option<String>,
    keys_pacer: KeySetPacer,
    connection: ConnectionGuard,
    /// Resolves when the task reading the sidecar's messages has ended.
    reader_done: oneshot::Receiver<()>,
    /// Answers to the sidecar's approval requests (agent streams only).
    approvals: Option<mpsc::UnboundedReceiver<ControllerMessage>>,
    pod: String,
    finished: bool,
}

impl Outbox {
    /// The outbox of a stream registered as `connection`: an agent's snapshots
    /// and key sets, or (with `agent` `None`) key sets only, the first at once.
    fn new(
        server: SnapshotServer,
        connection: ConnectionGuard,
        agent: Option<AgentSnapshots>,
        reader_done: oneshot::Receiver<()>,
        pod: &str,
    ) -> Self {
        let mut keys = server.sidecars.key_changes();
        keys.borrow_and_update();
        let mut callers = server.index.lock().identity_changes();
        callers.borrow_and_update();
        Self {
            callers,
            keys_pacer: KeySetPacer::new(agent.is_none(), Instant::now()),
            server,
            agent,
            keys,
            keys_sent: None,
            connection,
            reader_done,
            approvals: None,
            pod: pod.to_owned(),
            finished: false,
        }
    }

    /// The next message to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Result<ControllerMessage, Status>> {
        if self.finished {
            return None;
        }
        loop {
            // A sidecar holds a call on an approval answer: those go first.
            if let Some(answers) = self.approvals.as_mut()
                && let Ok(answer) = answers.try_recv()
            {
                return Some(Ok(answer));
            }
            if let Some(agent) = self.agent.as_mut()
                && let Some(snapshot) = agent.pending.take()
            {
                // One trace span per snapshot pushed to a sidecar.
                let _span = tracing::info_span!(
                    "snapshot push",
                    otel.name = "chaperone snapshot push",
                    chaperone.agent = %agent.identity.agent,
                    k8s.pod.name = %self.pod,
                    chaperone.snapshot.version = snapshot.version,
                )
                .entered();
                // The update carries the current key set: nothing else is due.
                self.keys.borrow_and_update();
                self.keys_pacer.sent(Instant::now());
                let jwks_json = self.server.jwks_json_for(Some(&agent.identity.agent));
                let message = wire::snapshot_message(&agent.identity, &snapshot, &jwks_json);
                self.keys_sent = Some(jwks_json);
                // The one sent before, if still unanswered, is superseded.
                let superseded = agent
                    .sent_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace((snapshot.version, Instant::now()));
                if superseded.is_some() {
                    self.server
                        .metrics
                        .push_ended(PushResult::Superseded, Duration::ZERO);
                }
                return Some(Ok(message));
            }
            let now = Instant::now();
            if self.keys_pacer.due(now) {
                let agent = self.agent.as_ref().map(|a| &a.identity.agent);
                let jwks_json = self.server.jwks_json_for(agent);
                self.keys_pacer.sent(now);
                if self.keys_sent.as_ref() != Some(&jwks_json) {
                    self.keys_sent = Some(jwks_json.clone());
                    return Some(Ok(wire::key_set_message(jwks_json)));
                }
            }
            let keys_due = self.keys_pacer.wake_at();
            tokio::select! {
                changed = AgentSnapshots::changed(&mut self.agent) => match (changed, self.agent.as_mut()) {
                    (Ok(Some(snapshot)), Some(agent)) => agent.pending = Some(snapshot),
                    (Ok(None), Some(agent)) => {
                        self.finished = true;
                        return Some(Err(Status::not_found(format!(
                            "AgentIdentity {} was deleted or no longer exists: drop the snapshot and deny every call",
                            agent.identity.agent
                        ))));
                    }
                    _ => {
                        self.finished = true;
                        return None;
                    }
                },
                changed = self.keys.changed() => {
                    if changed.is_err() {
                        self.finished = true;
                        return None;
                    }
                    self.keys.borrow_and_update();
                    self.keys_pacer.changed();
                }
                changed = self.callers.changed(), if self.agent.is_some() => {
                    if changed.is_err() {
                        self.finished = true;
                        return None;
                    }
                    self.callers.borrow_and_update();
                    self.keys_pacer.changed();
                }
                () = sleep_until_some(keys_due) => {}
                answer = recv_some(&mut self.approvals) => match answer {
                    Some(answer) => return Some(Ok(answer)),
                    None => self.approvals = None,
                },
                () = self.connection.evicted() => {
                    self.finished = true;
                    return Some(Err(Status::unauthenticated(format!("pod {} was deleted", self.pod))));
                }
                _ = &mut self.reader_done => {
                    self.finished = true;
                    return None;
                }
            }
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        match &self.agent {
            Some(agent) => {
                // A snapshot sent and never answered: the stream ended first
                // (taken, so that an ACK the reader is still handling does
                // not count it again).
                if agent
                    .sent_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .is_some()
                {
                    self.server
                        .metrics
                        .push_ended(PushResult::Unanswered, Duration::ZERO);
                }
                tracing::info!(agent = %agent.identity.agent, pod = %self.pod, "sidecar disconnected")
            }
            None => tracing::info!(pod = %self.pod, "tool-mode sidecar disconnected"),
        }
    }
}

/// The next message of `rx`, or never when there is no `rx`.
async fn recv_some(
    rx: &mut Option<mpsc::UnboundedReceiver<ControllerMessage>>,
) -> Option<ControllerMessage> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves at `at`, or never when there is no `at`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl SnapshotServer {
    /// Reads one sidecar's messages (ACK/NACK, key, inventory, audit,
    /// approval requests) until the sidecar stops sending or its outbox is
    /// dropped; then `approvals` drops, and the stream's tickets with it.
    async fn read_agent_stream(
        self,
        mut stream: AgentStream,
        mut inbound: Streaming<SidecarMessage>,
        mut alive: oneshot::Sender<()>,
    ) {
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.on_sidecar_message(&mut stream, message),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(pod = %stream.identity.pod, %status, "sidecar stream error");
                        break;
                    }
                },
                () = alive.closed() => break,
            }
        }
    }

    /// The key set a stream carries: for an agent's sidecar the keys of the
    /// agents that may call it ([`crate::index::Index::callers_of`]), the only
    /// assertions its inbound side accepts; for a tool-mode sidecar (`None`),
    /// which any agent may call, every live key.
    fn jwks_json_for(&self, agent: Option<&chaperone_policy::AgentKey>) -> String {
        match agent {
            Some(agent) => {
                let callers = self.index.lock().callers_of(agent);
                self.sidecars.jwks_json_of(&callers)
            }
            None => self.sidecars.jwks_json().to_string(),
        }
    }

    /// `key` if the registering sidecar proved it holds it
    /// ([`SigningKey::check_possession`]); a refusal is logged and counted.
    fn possession_checked(
        &self,
        key: &SigningKey,
        token_sha256: &[u8; 32],
        namespace: &str,
        pod: &str,
    ) -> Option<ProvenKey> {
        key.check_possession(token_sha256)
            .inspect_err(|refusal| {
                self.metrics.signing_key_refused();
                tracing::warn!(namespace, pod, kid = %key.kid, %refusal, "sidecar signing key refused: not in the JWKS, not archived");
            })
            .ok()
    }

    /// Holds a key a stream registered for the audit-key archive; `None`
    /// (logged) when the archive refuses it.
    fn archive_key(
        &self,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
        agent: Option<&chaperone_policy::AgentKey>,
        key: &ProvenKey,
    ) -> Option<ArchivedKeyHold> {
        self.audit_keys
            .register(namespace, pod, pod_uid, agent, key)
            .inspect_err(|error| {
                tracing::warn!(namespace, pod, kid = %key.kid, %error, "sidecar key not archived: its audit checkpoints will not verify with the audit-key archive");
            })
            .ok()
    }

    /// Handles one message of stream `connection` (its reports update the
    /// registry only while that stream is the pod's latest).
    fn on_sidecar_message(&self, stream: &mut AgentStream, message: SidecarMessage) {
        let AgentStream {
            identity,
            connection,
            token_sha256,
            sent_at,
            approvals,
            archived,
        } = stream;
        let connection = *connection;
        let (namespace, pod) = (identity.agent.namespace.as_str(), identity.pod.as_str());
        let report = match SidecarReport::try_from(message) {
            Ok(report) => report,
            Err(error) => {
                match &error {
                    InvalidSidecarMessage::Unknown => {
                        tracing::debug!(pod, %error, "sidecar message ignored")
                    }
                    InvalidSidecarMessage::ApprovalRequest { ticket, error: why } => {
                        tracing::warn!(pod, %error, "approval request refused");
                        approvals.refuse(*ticket, why);
                    }
                    _ => tracing::warn!(pod, %error, "sidecar message ignored"),
                }
                return;
            }
        };
        match report {
            SidecarReport::Hello(hello) => {
                let version = hello.snapshot.map_or(0, |s| s.version);
                tracing::debug!(pod, version, sidecar_version = %hello.sidecar_version, "sidecar hello");
                self.sidecars
                    .update_stream(namespace, pod, connection, |s| {
                        s.sidecar_version = hello.sidecar_version
                    });
            }
            SidecarReport::Ack(ack) => {
                let acked = sent_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take_if(|(v, _)| *v == ack.version);
                if let Some((_, at)) = acked {
                    self.metrics.push_ended(PushResult::Ack, at.elapsed());
                }
                self.sidecars
                    .update_stream(namespace, pod, connection, |s| {
                        s.acked = Some((ack.version, ack.hash));
                        s.acked_at = Some(crate::unix_now());
                        s.rejected = None;
                    });
            }
            SidecarReport::Nack { snapshot, error } => {
                tracing::warn!(pod, version = snapshot.version, %error, "sidecar rejected a snapshot");
                let rejected = sent_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take_if(|(v, _)| *v == snapshot.version);
                if let Some((_, at)) = rejected {
                    self.metrics.push_ended(PushResult::Nack, at.elapsed());
                }
                self.sidecars
                    .update_stream(namespace, pod, connection, |s| {
                        s.rejected = Some((snapshot.version, error))
                    });
            }
            SidecarReport::SigningKey(key) => {
                let Some(key) = self.possession_checked(&key, token_sha256, namespace, pod) else {
                    return;
                };
                *archived = self.archive_key(
                    namespace,
                    pod,
                    &identity.pod_uid,
                    Some(&identity.agent),
                    &key,
                );
                self.sidecars
                    .update_stream(namespace, pod, connection, |s| {
                        s.key = Some((key.kid, serde_json::Value::Object(key.jwk)))
                    });
            }
            SidecarReport::Inventory(inventory) => {
                self.sidecars
                    .update_stream(namespace, pod, connection, |s| s.inventory = inventory);
            }
            SidecarReport::Audit(batch) => {
                self.metrics
                    .audit_received(batch.records.len() as u64, batch.dropped);
                if batch.dropped > 0 {
                    tracing::warn!(
                        pod,
                        dropped = batch.dropped,
                        "sidecar dropped audit records (its queue was full)"
                    );
                }
                self.audit
                    .submit(AuditSource::Agent((**identity).clone()), batch.records);
            }
            SidecarReport::ApprovalRequest(call) => {
                tracing::debug!(pod, ticket = call.ticket, tool = %call.tool, "approval requested");
                approvals.request(*call);
            }
            SidecarReport::ApprovalRelease(ticket) => {
                tracing::debug!(pod, ticket, "approval ticket released");
                approvals.release(ticket);
            }
        }
    }

    /// Reads one tool-mode sidecar's messages (audit batches; the rest is
    /// ignored) until it stops sending or its outbox is dropped.
    async fn read_tool_stream(
        self,
        identity: ToolSidecarIdentity,
        token_sha256: [u8; 32],
        mut inbound: Streaming<SidecarMessage>,
        mut alive: oneshot::Sender<()>,
    ) {
        let mut archived = None;
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.on_tool_message(&identity, token_sha256, message, &mut archived),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(pod = %identity.pod, %status, "tool sidecar stream error");
                        break;
                    }
                },
                () = alive.closed() => break,
            }
        }
    }

    fn on_tool_message(
        &self,
        identity: &ToolSidecarIdentity,
        token_sha256: [u8; 32],
        message: SidecarMessage,
        archived: &mut Option<ArchivedKeyHold>,
    ) {
        let (namespace, pod) = (identity.namespace.as_str(), identity.pod.as_str());
        let report = match SidecarReport::try_from(message) {
            Ok(report) => report,
            Err(error) => {
                tracing::debug!(namespace, pod, %error, "tool sidecar message ignored");
                return;
            }
        };
        match report {
            SidecarReport::Hello(hello) => {
                tracing::debug!(namespace, pod, version = %hello.sidecar_version, "tool sidecar hello");
                self.sidecars.update(namespace, pod, |s| {
                    s.sidecar_version = hello.sidecar_version
                });
            }
            // Its checkpoints' key: archived, never in the JWKS (a tool-mode
            // sidecar verifies assertions and signs none).
            SidecarReport::SigningKey(key) => {
                if let Some(key) = self.possession_checked(&key, &token_sha256, namespace, pod) {
                    *archived = self.archive_key(namespace, pod, &identity.pod_uid, None, &key);
                }
            }
            SidecarReport::Ack(_) | SidecarReport::Nack { .. } => {
                tracing::debug!(
                    namespace,
                    pod,
                    "tool-mode sidecar acknowledged a snapshot it was never sent; ignored"
                );
            }
            SidecarReport::Inventory(_) => {
                tracing::debug!(
                    namespace,
                    pod,
                    "tool-mode sidecar sent a tool inventory; ignored (inventories are per agent)"
                );
            }
            SidecarReport::ApprovalRequest(_) | SidecarReport::ApprovalRelease(_) => {
                tracing::debug!(
                    namespace,
                    pod,
                    "tool-mode sidecar sent an approval message; ignored (approvals are for agents' calls)"
                );
            }
            SidecarReport::Audit(batch) => {
                self.metrics
                    .audit_received(batch.records.len() as u64, batch.dropped);
                if batch.dropped > 0 {
                    tracing::warn!(
                        namespace,
                        pod,
                        dropped = batch.dropped,
                        "tool sidecar dropped audit records (its queue was full)"
                    );
                }
                self.audit
                    .submit(AuditSource::Tool(identity.clone()), batch.records);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sets_go_out_at_once_after_a_quiet_period_and_bursts_fold_into_one() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut pacer = KeySetPacer::new(false, t0);
        assert!(!pacer.due(t0), "nothing changed");
        assert_eq!(pacer.wake_at(), None);
        // A change after a quiet period goes out at once.
        pacer.changed();
        assert!(pacer.due(t0));
        pacer.sent(t0);
        // A burst right after waits for the interval, as one key set.
        for n in [10, 20, 30] {
            pacer.changed();
            assert!(!pacer.due(ms(n)), "sent {n} ms after the previous one");
        }
        assert_eq!(pacer.wake_at(), Some(t0 + KEY_SET_MIN_INTERVAL));
        let at = t0 + KEY_SET_MIN_INTERVAL;
        assert!(pacer.due(at));
        pacer.sent(at);
        assert!(
            !pacer.due(at + KEY_SET_MIN_INTERVAL),
            "the burst went out once"
        );
        // A tool-mode stream starts with its key set due.
        assert!(KeySetPacer::new(true, t0).due(t0));
    }
}
