//! The snapshot gRPC server (`chaperone.snapshot.v1.SnapshotService/Watch`):
//! authenticates each sidecar's stream, sends its agent's snapshot on connect and
//! every new version after, and takes ACK/NACK, signing keys, tool inventory and
//! audit batches back. Served by every replica from its own index.
//!
//! A tool-mode sidecar's stream (pod annotated `chaperone.dev/inject: "tool"`)
//! carries only the key set: a `KeySet` on connect and after every change of the
//! live sidecars' keys, never a snapshot. It takes audit batches back; ACK/NACK,
//! inventory and signing keys do not apply to it and are ignored.

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Instant};

use chaperone_api::AgentIdentity;
use chaperone_wire::{
    SNAPSHOT_FORMAT_JSON,
    v1::{
        self, ControllerMessage, KeySet, SidecarMessage, SnapshotUpdate, controller_message,
        sidecar_message,
        snapshot_service_server::{SnapshotService, SnapshotServiceServer},
    },
};
use futures_util::Stream;
use kube::{Client, runtime::reflector::Store};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    audit_events::{AuditEvents, AuditSource},
    auth::{self, Peer, SidecarIdentity, ToolSidecarIdentity},
    index::PublishedSnapshot,
    metrics::Metrics,
    object_watch::SharedIndex,
    sidecars::SidecarRegistry,
};

/// The gRPC service.
#[derive(Clone)]
pub struct SnapshotServer {
    client: Client,
    index: Arc<SharedIndex>,
    sidecars: Arc<SidecarRegistry>,
    metrics: Arc<Metrics>,
    audit: Arc<AuditEvents>,
    identities: Store<AgentIdentity>,
}

impl SnapshotServer {
    /// A server answering from `index`, recording sidecars in `sidecars`.
    pub fn new(
        client: Client,
        index: Arc<SharedIndex>,
        sidecars: Arc<SidecarRegistry>,
        metrics: Arc<Metrics>,
        audit: Arc<AuditEvents>,
        identities: Store<AgentIdentity>,
    ) -> Self {
        Self {
            client,
            index,
            sidecars,
            metrics,
            audit,
            identities,
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
        let identity = match auth::bearer_token(request.metadata()) {
            Ok(token) => auth::authenticate(&self.client, &self.identities, token).await,
            Err(e) => Err(e),
        };
        let peer = identity.map_err(|e| {
            self.metrics.stream_refused(e.grpc_code());
            tracing::info!(error = %e, "refused a snapshot stream");
            Status::new(e.grpc_code(), e.to_string())
        })?;
        let (tx, rx) = mpsc::channel(8);
        match peer {
            Peer::Agent(identity) => {
                tracing::info!(agent = %identity.agent, pod = %identity.pod, "sidecar connected");
                tokio::spawn(self.clone().stream(identity, request.into_inner(), tx));
            }
            Peer::Tool(identity) => {
                tracing::info!(namespace = %identity.namespace, pod = %identity.pod, "tool-mode sidecar connected (key set only)");
                tokio::spawn(self.clone().tool_stream(identity, request.into_inner(), tx));
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl SnapshotServer {
    /// One sidecar's stream: push snapshots and key sets, take its reports.
    async fn stream(
        self,
        identity: SidecarIdentity,
        mut inbound: Streaming<SidecarMessage>,
        tx: mpsc::Sender<Result<ControllerMessage, Status>>,
    ) {
        let connection = self.sidecars.connect(&identity);
        let _gauge = self.metrics.sidecar_connected();
        let mut snapshots = self.index.lock().subscribe(&identity.agent);
        let mut keys = self.sidecars.key_changes();
        let mut sent_at: Option<(u64, Instant)> = None;
        // The current snapshot first; `changed()` then fires for each new one.
        let mut pending = snapshots.borrow_and_update().clone();
        keys.borrow_and_update();
        loop {
            if let Some(snapshot) = pending.take() {
                let message = self.snapshot_message(&identity, &snapshot);
                sent_at = Some((snapshot.version, Instant::now()));
                if tx.send(Ok(message)).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() { break; }
                    let next = snapshots.borrow_and_update().clone();
                    match next {
                        Some(snapshot) => pending = Some(snapshot),
                        None => {
                            let _ = tx.send(Err(Status::not_found(format!(
                                "AgentIdentity {} was deleted or no longer exists: drop the snapshot and deny every call",
                                identity.agent
                            )))).await;
                            break;
                        }
                    }
                }
                changed = keys.changed() => {
                    if changed.is_err() { break; }
                    let jwks_json = self.sidecars.jwks_json().to_string();
                    let message = ControllerMessage { message: Some(controller_message::Message::Keys(KeySet { jwks_json })) };
                    if tx.send(Ok(message)).await.is_err() { break; }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.on_sidecar_message(&identity, message, &mut sent_at),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(pod = %identity.pod, %status, "sidecar stream error");
                        break;
                    }
                },
                _ = tx.closed() => break,
                () = connection.evicted() => {
                    let _ = tx.send(Err(Status::unauthenticated(format!("pod {} was deleted", identity.pod)))).await;
                    break;
                }
            }
        }
        tracing::info!(agent = %identity.agent, pod = %identity.pod, "sidecar disconnected");
    }

    /// The update for one stream: the snapshot's shared bytes and the shared
    /// JWKS, copied into this stream's message (nothing is serialised here).
    fn snapshot_message(
        &self,
        identity: &SidecarIdentity,
        snapshot: &PublishedSnapshot,
    ) -> ControllerMessage {
        ControllerMessage {
            message: Some(controller_message::Message::Snapshot(SnapshotUpdate {
                version: snapshot.version,
                hash: snapshot.hash.clone(),
                format: SNAPSHOT_FORMAT_JSON.to_owned(),
                payload: snapshot.bytes().to_vec(),
                identity: Some(v1::Identity {
                    namespace: identity.agent.namespace.clone(),
                    agent: identity.agent.name.clone(),
                    pod: identity.pod.clone(),
                    pod_uid: identity.pod_uid.clone(),
                }),
                jwks_json: self.sidecars.jwks_json().to_string(),
            })),
        }
    }

    fn on_sidecar_message(
        &self,
        identity: &SidecarIdentity,
        message: SidecarMessage,
        sent_at: &mut Option<(u64, Instant)>,
    ) {
        let (namespace, pod) = (identity.agent.namespace.as_str(), identity.pod.as_str());
        match message.message {
            Some(sidecar_message::Message::Hello(hello)) => {
                tracing::debug!(pod, version = hello.snapshot_version, "sidecar hello");
            }
            Some(sidecar_message::Message::Ack(ack)) => {
                if let Some((version, at)) = sent_at.take_if(|(v, _)| *v == ack.version) {
                    self.metrics.push_acked(version, at.elapsed());
                }
                self.sidecars.update(namespace, pod, |s| {
                    s.acked = Some((ack.version, ack.hash));
                    s.rejected = None;
                });
            }
            Some(sidecar_message::Message::Nack(nack)) => {
                tracing::warn!(pod, version = nack.version, error = %nack.error, "sidecar rejected a snapshot");
                self.metrics.push_rejected();
                self.sidecars.update(namespace, pod, |s| {
                    s.rejected = Some((nack.version, nack.error))
                });
            }
            Some(sidecar_message::Message::SigningKey(key)) => {
                match serde_json::from_str::<serde_json::Value>(&key.jwk_json) {
                    Ok(jwk) if jwk.is_object() && !key.kid.is_empty() => {
                        self.sidecars
                            .update(namespace, pod, |s| s.key = Some((key.kid, jwk)));
                    }
                    _ => tracing::warn!(
                        pod,
                        "sidecar sent a signing key that is not a JWK object with a kid; ignored"
                    ),
                }
            }
            Some(sidecar_message::Message::Inventory(inventory)) => {
                self.sidecars.update(namespace, pod, |s| {
                    s.inventory = inventory
                        .tools
                        .into_iter()
                        .map(|t| (t.server, t.name))
                        .collect();
                });
            }
            Some(sidecar_message::Message::Audit(batch)) => {
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
                    .submit(AuditSource::Agent(identity.clone()), batch.records);
            }
            None => {}
        }
    }

    /// One tool-mode sidecar's stream: the key set on connect and on every
    /// change, never a snapshot; its audit batches become Events on its pod.
    async fn tool_stream(
        self,
        identity: ToolSidecarIdentity,
        mut inbound: Streaming<SidecarMessage>,
        tx: mpsc::Sender<Result<ControllerMessage, Status>>,
    ) {
        let connection = self.sidecars.connect_tool(&identity);
        let _gauge = self.metrics.tool_sidecar_connected();
        let mut keys = self.sidecars.key_changes();
        // Marked seen before the first read: a change after it is sent again.
        keys.borrow_and_update();
        let mut pending = true;
        let mut sent: Option<Arc<str>> = None;
        let mut told_about_key = false;
        loop {
            if std::mem::take(&mut pending) {
                let jwks_json = self.sidecars.jwks_json();
                if sent.as_deref() != Some(&*jwks_json) {
                    let message = ControllerMessage {
                        message: Some(controller_message::Message::Keys(KeySet {
                            jwks_json: jwks_json.to_string(),
                        })),
                    };
                    sent = Some(jwks_json);
                    if tx.send(Ok(message)).await.is_err() {
                        break;
                    }
                }
            }
            tokio::select! {
                changed = keys.changed() => {
                    if changed.is_err() { break; }
                    keys.borrow_and_update();
                    pending = true;
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.on_tool_message(&identity, message, &mut told_about_key),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(pod = %identity.pod, %status, "tool sidecar stream error");
                        break;
                    }
                },
                _ = tx.closed() => break,
                () = connection.evicted() => {
                    let _ = tx.send(Err(Status::unauthenticated(format!("pod {} was deleted", identity.pod)))).await;
                    break;
                }
            }
        }
        tracing::info!(namespace = %identity.namespace, pod = %identity.pod, "tool-mode sidecar disconnected");
    }

    fn on_tool_message(
        &self,
        identity: &ToolSidecarIdentity,
        message: SidecarMessage,
        told_about_key: &mut bool,
    ) {
        let (namespace, pod) = (identity.namespace.as_str(), identity.pod.as_str());
        match message.message {
            Some(sidecar_message::Message::Hello(hello)) => {
                tracing::debug!(namespace, pod, version = %hello.sidecar_version, "tool sidecar hello");
            }
            // Logged once per stream: a sidecar sends its key on every connect.
            Some(sidecar_message::Message::SigningKey(key))
                if !std::mem::replace(told_about_key, true) =>
            {
                tracing::info!(
                    namespace,
                    pod,
                    kid = %key.kid,
                    "tool-mode sidecar sent a signing key; ignored: tool sidecars verify assertions and sign none, so their keys never enter the JWKS"
                );
            }
            Some(sidecar_message::Message::SigningKey(_)) => {}
            Some(sidecar_message::Message::Ack(_) | sidecar_message::Message::Nack(_)) => {
                tracing::debug!(
                    namespace,
                    pod,
                    "tool-mode sidecar acknowledged a snapshot it was never sent; ignored"
                );
            }
            Some(sidecar_message::Message::Inventory(_)) => {
                tracing::debug!(
                    namespace,
                    pod,
                    "tool-mode sidecar sent a tool inventory; ignored (inventories are per agent)"
                );
            }
            Some(sidecar_message::Message::Audit(batch)) => {
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
            None => {}
        }
    }
}
