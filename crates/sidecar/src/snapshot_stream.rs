//! Controller mode: the client of the controller's snapshot stream
//! (`chaperone.snapshot.v1.SnapshotService/Watch`).
//!
//! The sidecar dials the controller over TLS (the controller's own CA), presents
//! its pod's projected ServiceAccount token (re-read on every connect, so
//! rotation works), and then, on one long-lived stream:
//! - takes each `SnapshotUpdate`, converts it at the edge ([`wire`]) and puts it
//!   in force, answering ACK, or NACK with the typed error (the last good
//!   snapshot stays in force);
//! - keeps its callers' sidecars' keys from snapshots and `KeySet` updates
//!   ([`crate::peer_keys`]) for delegation verification;
//! - sends its signing key once per stream, its tool inventory when it changes
//!   (a tool's definition hash included; at most every [`INVENTORY_INTERVAL`];
//!   [`wire::inventory_report`]), and its audit records in batches with
//!   the count of records dropped since the last batch;
//! - carries the approval requests of held calls out and their answers back
//!   ([`crate::approvals`]): connected while the stream lasts.
//!
//! Stopping ([`SnapshotStream::run_until`]): every audit record still queued
//! (after the trail's final checkpoint) is sent at once, the sidecar closes its
//! side of the stream, and waits for the controller to end it, which the
//! controller does only after reading everything sent before the close. With
//! no stream open at that moment the sidecar connects once more, at once;
//! records that still cannot go are counted in the log (they are in the audit
//! trail on stdout, written before their calls went on).
//!
//! Fail closed: before the first snapshot every call is refused (503, not
//! ready). When the controller is away the last good snapshot stays in force and
//! the sidecar reconnects with jittered exponential backoff; when the snapshot
//! sets `maxDisconnectedSeconds` (its AgentIdentity's), it is withdrawn once
//! that long has passed without a stream ([`withdraw_when_disconnected`]), and
//! every call is refused until the sidecar is connected again. When the
//! controller says the AgentIdentity is gone (`NOT_FOUND` on the stream, or
//! `FAILED_PRECONDITION` "no AgentIdentity selects this pod" at connect) the
//! snapshot is dropped and every call is refused until a new one arrives.

pub mod wire;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chaperone_wire::v1::{
    Ack, AuditBatch, ControllerMessage, Hello, Nack, SidecarMessage, SigningKey, SnapshotUpdate,
    controller_message, sidecar_message, snapshot_service_client::SnapshotServiceClient,
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::Sidecar;
use crate::backoff::Backoff;
use crate::inventory::DiscoveredTool;
use crate::peer_keys::PeerKeys;
use crate::settings::{CaSource, ControllerSettings};
use crate::snapshot::{Absence, SnapshotSource};
use wire::SnapshotOffer;

/// Least time between two tool inventory reports on a stream.
pub const INVENTORY_INTERVAL: Duration = Duration::from_secs(2);
/// Most audit records in one batch.
pub const AUDIT_BATCH_RECORDS: usize = 512;
/// Most audit bytes in one batch (well below gRPC's 4 MiB message limit).
pub const AUDIT_BATCH_BYTES: usize = 1 << 20;
/// How long a batch waits for more records after its first (unless it is
/// full): audit records reach the controller at most this much later, and a
/// busy sidecar sends one message per this period instead of one every few
/// calls (each an HTTP/2 frame, a TLS record and a `write`).
pub const AUDIT_BATCH_LINGER: Duration = Duration::from_millis(50);
/// How often drops are reported when no record is shipped.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Timeout of the TCP + TLS connect to the controller.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection to the controller could not be opened.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The token file could not be read.
    #[error("reading the ServiceAccount token {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token file is empty or holds characters a header cannot carry.
    #[error("the ServiceAccount token in {0} is empty or not a valid bearer token")]
    BadToken(PathBuf),
    /// The CA file could not be read.
    #[error("reading the controller CA {path}: {source}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The address or TLS settings are unusable, or the connect failed.
    #[error("connecting to the controller at {address}: {source}")]
    Transport {
        /// The address dialled.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The controller refused the stream.
    #[error("the controller refused the stream: {0}")]
    Refused(Status),
}

/// How one stream ended.
#[derive(Debug)]
enum StreamEnd {
    /// It never opened.
    NotOpened(ConnectError),
    /// The controller closed it (cleanly, or with a status).
    Closed(Option<Status>),
    /// The controller stopped reading what the sidecar sends.
    SendFailed,
    /// The sidecar is stopping: its last audit records went out and it closed
    /// its side; `confirmed` when the controller then ended the stream (so it
    /// read them all).
    Finished {
        /// The controller ended the stream cleanly.
        confirmed: bool,
    },
}

/// The client of the controller's snapshot stream; [`SnapshotStream::run`]
/// drives it for the sidecar's lifetime.
#[derive(Debug)]
pub struct SnapshotStream {
    sidecar: Sidecar,
    settings: ControllerSettings,
    backoff: Backoff,
    inventory: watch::Receiver<BTreeSet<DiscoveredTool>>,
    inventory_open: bool,
    audit: Option<mpsc::Receiver<Arc<str>>>,
    /// A batch taken from the queue whose send failed; sent first next time.
    unsent_audit: Option<AuditBatch>,
    /// The first audit record of a batch waiting [`AUDIT_BATCH_LINGER`] for
    /// more (kept across streams, like `unsent_audit`).
    lingering: Option<Arc<str>>,
    /// `chaperone_sidecar_audit_dropped_total` as last reported.
    dropped_reported: u64,
    /// The sidecar is stopping: ship what is queued, then end.
    finishing: bool,
    /// Since when no stream has been open (none while one is).
    disconnected: watch::Sender<Option<Instant>>,
}

impl SnapshotStream {
    /// A stream client for `sidecar`; takes the sidecar's audit queue (build the
    /// sidecar with `ship_audit` to ship audit records).
    pub fn new(sidecar: Sidecar, settings: ControllerSettings) -> Self {
        let inventory = sidecar.tool_inventory();
        let audit = sidecar.take_audit_records();
        let dropped_reported = sidecar.metrics().audit_dropped.get();
        Self {
            sidecar,
            settings,
            backoff: Backoff::default(),
            inventory,
            inventory_open: true,
            audit,
            unsent_audit: None,
            lingering: None,
            dropped_reported,
            finishing: false,
            disconnected: watch::Sender::new(Some(Instant::now())),
        }
    }

    /// Replaces the reconnect backoff (tests use short ones).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Connects, serves the stream, and reconnects with backoff when it ends;
    /// runs until the task is dropped.
    pub async fn run(self) {
        self.run_until(std::future::pending()).await;
    }

    /// Like [`SnapshotStream::run`] until `finish` resolves; then ships every
    /// audit record queued (close the audit trail first, and its final
    /// checkpoint goes too), closes the sidecar's side of the stream and
    /// waits until the controller ends it. Without a stream open it connects
    /// once more, at once. Returns whether every record reached the
    /// controller; never returns while the controller neither ends the
    /// stream nor fails it, so bound it with a timeout.
    pub async fn run_until(mut self, finish: impl Future<Output = ()>) -> bool {
        let withdraw = withdraw_when_disconnected(
            Arc::clone(self.sidecar.snapshots()),
            self.disconnected.subscribe(),
        );
        tokio::select! {
            confirmed = self.serve_until(finish) => confirmed,
            () = withdraw => unreachable!("the withdrawal watch ends only with the stream client"),
        }
    }

    /// [`Self::run_until`]'s loop: serve a stream, reconnect when it ends.
    async fn serve_until(&mut self, finish: impl Future<Output = ()>) -> bool {
        tokio::pin!(finish);
        loop {
            let (end, delivered) = self.serve_once(finish.as_mut()).await;
            self.disconnected.send_if_modified(|since| {
                let was_open = since.is_none();
                if was_open {
                    *since = Some(Instant::now());
                }
                was_open
            });
            if let StreamEnd::Finished { confirmed } = end {
                return confirmed;
            }
            if delivered {
                self.backoff.reset();
            }
            self.on_end(end);
            if self.finishing {
                tracing::error!(
                    unshipped = self.audit_unshipped(),
                    "stopping: audit records not shipped to the controller (they are in the audit trail on stdout)"
                );
                return false;
            }
            let delay = self.backoff.next_delay();
            tracing::debug!(
                ?delay,
                failures = self.backoff.failures(),
                "reconnecting to the controller"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = finish.as_mut() => self.finishing = true,
            }
        }
    }

    /// Logs how a stream ended and drops the snapshot if the agent is gone.
    fn on_end(&self, end: StreamEnd) {
        let address = &self.settings.address;
        let status = match &end {
            StreamEnd::NotOpened(ConnectError::Refused(status)) => Some(status),
            StreamEnd::Closed(status) => status.as_ref(),
            _ => None,
        };
        if let Some(status) = status
            && agent_is_gone(status)
        {
            let dropped = self.sidecar.snapshots().clear(Absence::AgentGone);
            tracing::warn!(
                code = ?status.code(),
                message = status.message(),
                dropped_version = dropped,
                "the controller says this pod has no AgentIdentity: snapshot dropped, refusing every call"
            );
            return;
        }
        let ready = self.sidecar.snapshots().is_ready();
        match end {
            StreamEnd::NotOpened(error) => tracing::warn!(
                %address, %error, keeping_last_snapshot = ready,
                "no snapshot stream"
            ),
            StreamEnd::Closed(None) => {
                tracing::info!(%address, "the controller closed the snapshot stream")
            }
            StreamEnd::Closed(Some(status)) => tracing::warn!(
                %address, code = ?status.code(), message = status.message(), keeping_last_snapshot = ready,
                "snapshot stream ended"
            ),
            StreamEnd::SendFailed => tracing::warn!(
                %address, keeping_last_snapshot = ready,
                "snapshot stream ended while sending"
            ),
            StreamEnd::Finished { .. } => {}
        }
    }

    /// One stream, from connect to its end (or, once `finish` resolves, to
    /// [`SnapshotStream::finish_stream`]); also says whether the controller
    /// delivered anything (a working connection resets the backoff).
    async fn serve_once<F: Future<Output = ()>>(
        &mut self,
        mut finish: Pin<&mut F>,
    ) -> (StreamEnd, bool) {
        let (tx, mut inbound) = match self.open().await {
            Ok(opened) => opened,
            Err(error) => return (StreamEnd::NotOpened(error), false),
        };
        tracing::info!(address = %self.settings.address, "snapshot stream open");
        self.disconnected.send_replace(None);
        // Calls held for approval ask over this stream while it lasts; its
        // end loses their tickets.
        let approvals = self.sidecar.approvals().connect(tx.clone());
        let mut delivered = false;
        let mut inventory_due = !self.inventory.borrow_and_update().is_empty();
        let mut inventory_sent: Option<Instant> = None;
        let mut drop_tick = tokio::time::interval(DROP_REPORT_INTERVAL);
        drop_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(batch) = self.unsent_audit.take()
            && tx.send(audit_message(batch)).await.is_err()
        {
            return (StreamEnd::SendFailed, delivered);
        }
        if self.finishing {
            drop(approvals);
            return self.finish_stream(tx, inbound, delivered).await;
        }
        // When the batch being gathered goes (one a previous stream left
        // goes at once).
        let mut ship_at = Instant::now();
        loop {
            let inventory_at =
                inventory_sent.map_or_else(Instant::now, |at| at + INVENTORY_INTERVAL);
            tokio::select! {
                () = finish.as_mut(), if !self.finishing => {
                    self.finishing = true;
                    drop(approvals);
                    return self.finish_stream(tx, inbound, delivered).await;
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        delivered = true;
                        if let Some(reply) = self.on_message(message).await
                            && tx.send(reply).await.is_err()
                        {
                            return (StreamEnd::SendFailed, delivered);
                        }
                    }
                    Ok(None) => return (StreamEnd::Closed(None), delivered),
                    Err(status) => return (StreamEnd::Closed(Some(status)), delivered),
                },
                changed = changed_or_pending(&mut self.inventory, self.inventory_open), if !inventory_due => {
                    if changed.is_err() {
                        self.inventory_open = false;
                    } else {
                        inventory_due = true;
                    }
                }
                () = tokio::time::sleep_until(inventory_at), if inventory_due => {
                    let report = wire::inventory_report(self.inventory.borrow_and_update().iter());
                    let message = sidecar_message::Message::Inventory(report);
                    if tx.send(SidecarMessage { message: Some(message) }).await.is_err() {
                        return (StreamEnd::SendFailed, delivered);
                    }
                    inventory_due = false;
                    inventory_sent = Some(Instant::now());
                }
                // Not polled while a batch lingers: records queue up
                // without waking this task.
                record = recv_or_pending(&mut self.audit), if self.lingering.is_none() => match record {
                    Some(first) if self.audit_queued() + 1 < AUDIT_BATCH_RECORDS => {
                        self.lingering = Some(first);
                        ship_at = Instant::now() + AUDIT_BATCH_LINGER;
                    }
                    Some(first) => {
                        let batch = self.audit_batch(first);
                        if !self.send_audit(&tx, batch).await {
                            return (StreamEnd::SendFailed, delivered);
                        }
                    }
                    None => self.audit = None,
                },
                () = tokio::time::sleep_until(ship_at), if self.lingering.is_some() => {
                    if let Some(first) = self.lingering.take() {
                        let batch = self.audit_batch(first);
                        if !self.send_audit(&tx, batch).await {
                            return (StreamEnd::SendFailed, delivered);
                        }
                    }
                }
                _ = drop_tick.tick() => {
                    let dropped = self.dropped_since_report();
                    if dropped > 0 {
                        let batch = AuditBatch { records: Vec::new(), dropped };
                        if !self.send_audit(&tx, batch).await {
                            return (StreamEnd::SendFailed, delivered);
                        }
                    }
                }
            }
        }
    }

    /// Sends what the audit queue holds (the lingering batch's first record,
    /// a batch a failed stream left, the drops since the last report), closes
    /// the sidecar's side of the stream (`tx` is its last sender) and waits
    /// for the controller to end it.
    async fn finish_stream(
        &mut self,
        tx: mpsc::Sender<SidecarMessage>,
        mut inbound: tonic::Streaming<ControllerMessage>,
        delivered: bool,
    ) -> (StreamEnd, bool) {
        tracing::info!(
            records = self.audit_unshipped(),
            "stopping: shipping the last audit records to the controller"
        );
        let mut next = self.lingering.take();
        loop {
            let first = match next.take() {
                Some(first) => first,
                None => match self.audit.as_mut().map(mpsc::Receiver::try_recv) {
                    Some(Ok(record)) => record,
                    _ => break,
                },
            };
            let batch = self.audit_batch(first);
            if !self.send_audit(&tx, batch).await {
                return (StreamEnd::SendFailed, delivered);
            }
        }
        let dropped = self.dropped_since_report();
        if dropped > 0 {
            let batch = AuditBatch {
                records: Vec::new(),
                dropped,
            };
            if !self.send_audit(&tx, batch).await {
                return (StreamEnd::SendFailed, delivered);
            }
        }
        drop(tx);
        // The controller ends the stream once it has read the close; what it
        // sends meanwhile is not applied any more.
        loop {
            match inbound.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return (StreamEnd::Finished { confirmed: true }, delivered),
                Err(status) => {
                    tracing::warn!(
                        code = ?status.code(),
                        message = status.message(),
                        "stopping: the snapshot stream failed after the last audit records were sent"
                    );
                    return (StreamEnd::Finished { confirmed: false }, delivered);
                }
            }
        }
    }

    /// Connects, authenticates and opens `Watch`, queueing the hello and the
    /// signing key as its first messages.
    async fn open(
        &self,
    ) -> Result<
        (
            mpsc::Sender<SidecarMessage>,
            tonic::Streaming<ControllerMessage>,
        ),
        ConnectError,
    > {
        let settings = &self.settings;
        let token = read_token(&settings.token_file)?;
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| ConnectError::BadToken(settings.token_file.clone()))?;
        let ca = match &settings.ca {
            CaSource::Pem(pem) => pem.clone(),
            CaSource::File(path) => {
                std::fs::read_to_string(path).map_err(|source| ConnectError::Ca {
                    path: path.clone(),
                    source,
                })?
            }
        };
        let transport = |source| ConnectError::Transport {
            address: settings.address.clone(),
            source,
        };
        let channel = Endpoint::from_shared(format!("https://{}", settings.address))
            .map_err(transport)?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(settings.server_name.clone()),
            )
            .map_err(transport)?
            .connect_timeout(CONNECT_TIMEOUT)
            // Find a controller that vanished without closing the connection.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(transport)?;

        let (tx, rx) = mpsc::channel(64);
        let current = self.sidecar.snapshots().current();
        let hello = Hello {
            sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
            snapshot_version: current.as_ref().map_or(0, |c| c.version()),
            snapshot_hash: current
                .as_ref()
                .map(|c| c.snapshot.hash.clone())
                .unwrap_or_default(),
        };
        let key = self.sidecar.key_registration();
        let signing_key = SigningKey {
            kid: key.kid.clone(),
            jwk_json: key.jwk.to_string(),
            proof: self.sidecar.key_registration_proof(&token),
        };
        for message in [
            sidecar_message::Message::Hello(hello),
            sidecar_message::Message::SigningKey(signing_key),
        ] {
            // The channel is new and empty: these cannot fail.
            let _ = tx.try_send(SidecarMessage {
                message: Some(message),
            });
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("authorization", bearer);
        let response = SnapshotServiceClient::new(channel)
            .watch(request)
            .await
            .map_err(ConnectError::Refused)?;
        Ok((tx, response.into_inner()))
    }

    /// Applies one controller message; returns the reply (ACK/NACK), if any.
    async fn on_message(&self, message: ControllerMessage) -> Option<SidecarMessage> {
        match message.message? {
            controller_message::Message::Snapshot(update) => {
                // Checking and indexing a snapshot takes milliseconds (tens
                // for 10,000 policies): on a blocking thread, not on the
                // runtime's, which may be the only one serving calls.
                let sidecar = self.sidecar.clone();
                crate::runtime::off_worker(move || apply_snapshot(&sidecar, update)).await
            }
            controller_message::Message::Keys(keys) => {
                match PeerKeys::from_json(&keys.jwks_json) {
                    Ok(keys) => {
                        tracing::debug!(keys = keys.len(), "peer keys updated");
                        self.sidecar.peer_keys().replace(keys);
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        "the controller sent peer keys that do not parse; keeping the previous ones"
                    ),
                }
                None
            }
            controller_message::Message::Approval(status) => {
                self.sidecar.approvals().on_status(status);
                None
            }
        }
    }

    /// Sends `batch` on the stream; when the stream is gone, keeps it for
    /// the next one and returns false.
    async fn send_audit(&mut self, tx: &mpsc::Sender<SidecarMessage>, batch: AuditBatch) -> bool {
        if tx.send(audit_message(batch.clone())).await.is_err() {
            self.unsent_audit = Some(batch);
            return false;
        }
        true
    }

    /// Audit records not yet handed to a stream: queued, lingering, or in a
    /// batch a failed stream left.
    fn audit_unshipped(&self) -> usize {
        self.audit_queued()
            + usize::from(self.lingering.is_some())
            + self
                .unsent_audit
                .as_ref()
                .map_or(0, |batch| batch.records.len())
    }

    /// Records waiting in the audit queue.
    fn audit_queued(&self) -> usize {
        self.audit.as_ref().map_or(0, mpsc::Receiver::len)
    }

    /// `first` and what else is queued, up to the batch limits, with the drops
    /// since the last report.
    fn audit_batch(&mut self, first: Arc<str>) -> AuditBatch {
        let mut bytes = first.len();
        let mut records = vec![first.to_string()];
        if let Some(queue) = self.audit.as_mut() {
            while records.len() < AUDIT_BATCH_RECORDS && bytes < AUDIT_BATCH_BYTES {
                let Ok(record) = queue.try_recv() else {
                    break;
                };
                bytes += record.len();
                records.push(record.to_string());
            }
        }
        AuditBatch {
            records,
            dropped: self.dropped_since_report(),
        }
    }

    /// Records dropped since the last call (counted by the audit log).
    fn dropped_since_report(&mut self) -> u64 {
        let total = self.sidecar.metrics().audit_dropped.get();
        let dropped = total.saturating_sub(self.dropped_reported);
        self.dropped_reported = total;
        dropped
    }
}

/// Whether a status from the controller means "this pod has no AgentIdentity".
fn agent_is_gone(status: &Status) -> bool {
    matches!(status.code(), Code::NotFound | Code::FailedPrecondition)
}

/// `Bearer <token>` from the token file, as gRPC metadata.
/// The token in `path`, trimmed (as the controller reads it).
fn read_token(path: &std::path::Path) -> Result<String, ConnectError> {
    let token = std::fs::read_to_string(path).map_err(|source| ConnectError::Token {
        path: path.to_owned(),
        source,
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(ConnectError::BadToken(path.to_owned()));
    }
    Ok(token.to_owned())
}

fn audit_message(batch: AuditBatch) -> SidecarMessage {
    SidecarMessage {
        message: Some(sidecar_message::Message::Audit(batch)),
    }
}

/// `rx.changed()`, or never when the sender is gone.
async fn changed_or_pending<T>(
    rx: &mut watch::Receiver<T>,
    open: bool,
) -> Result<(), watch::error::RecvError> {
    if open {
        rx.changed().await
    } else {
        std::future::pending().await
    }
}

/// The next queued record; never resolves without a queue.
async fn recv_or_pending(queue: &mut Option<mpsc::Receiver<Arc<str>>>) -> Option<Arc<str>> {
    match queue {
        Some(queue) => queue.recv().await,
        None => std::future::pending().await,
    }
}

/// Withdraws the snapshot in force once no stream has been open for its
/// `maxDisconnectedSeconds` (`disconnected` says since when; none while a
/// stream is open). A snapshot without the setting is kept until the
/// controller is back. Returns only when `disconnected`'s sender is dropped.
async fn withdraw_when_disconnected(
    source: Arc<SnapshotSource>,
    mut disconnected: watch::Receiver<Option<Instant>>,
) {
    loop {
        let since = *disconnected.borrow_and_update();
        let limit = source
            .current()
            .and_then(|active| active.snapshot.content.max_disconnected_seconds);
        if let (Some(since), Some(limit_seconds)) = (since, limit) {
            let deadline = since + Duration::from_secs(u64::from(limit_seconds));
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    let withdrawn = source.clear(Absence::ControllerLost { limit_seconds });
                    tracing::warn!(
                        withdrawn_version = withdrawn,
                        limit_seconds,
                        "no connection to the controller for maxDisconnectedSeconds: snapshot withdrawn, refusing every call until it is back"
                    );
                }
                changed = disconnected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if disconnected.changed().await.is_err() {
            return;
        }
    }
}

/// Converts and applies a snapshot update to `sidecar`: the ACK or NACK to
/// send.
fn apply_snapshot(sidecar: &Sidecar, update: SnapshotUpdate) -> SidecarMessage {
    let (version, hash) = (update.version, update.hash.clone());
    let outcome = SnapshotOffer::try_from(update)
        .map_err(|e| e.to_string())
        .and_then(|offer| {
            if let Some(keys) = offer.peer_keys {
                sidecar.peer_keys().replace(keys);
            }
            if let Some(identity) = &offer.identity
                && !sidecar.pod_name().is_empty()
                && identity.pod != sidecar.pod_name()
            {
                tracing::warn!(
                    stream_pod = %identity.pod,
                    "the controller identifies this sidecar's token with another pod"
                );
            }
            let source = sidecar.snapshots();
            // After a reconnect the controller resends what is in force.
            let in_force = source.current().is_some_and(|current| {
                current.snapshot.hash == offer.snapshot.hash
                    && current.version() >= offer.snapshot.version
            });
            if in_force {
                return Ok(());
            }
            source
                .update(offer.snapshot)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    let message = match outcome {
        Ok(()) => {
            tracing::info!(version, %hash, "snapshot in force");
            sidecar_message::Message::Ack(Ack { version, hash })
        }
        Err(error) => {
            tracing::warn!(version, %hash, %error, "snapshot rejected; keeping the last good one");
            sidecar_message::Message::Nack(Nack {
                version,
                hash,
                error,
            })
        }
    };
    SidecarMessage {
        message: Some(message),
    }
}

#[cfg(test)]
mod tests {
    use chaperone_policy::Snapshot;

    use super::wire::fixtures::{snapshot, update};
    use super::*;
    use crate::{AuditOutput, Settings};

    fn stream() -> SnapshotStream {
        let sidecar = Sidecar::new(
            Settings::default(),
            AuditOutput::Writer(Box::new(std::io::sink())),
            true,
        )
        .unwrap();
        SnapshotStream::new(sidecar, ControllerSettings::new("controller:9090").unwrap())
    }

    fn reply(message: SidecarMessage) -> sidecar_message::Message {
        message.message.unwrap()
    }

    /// The same content as `snapshot(version)` but a different hash.
    fn changed(version: u64) -> Snapshot {
        let mut content = snapshot(version).content;
        content.session.idle_timeout_seconds += 1;
        Snapshot::new(version, content)
    }

    #[test]
    fn acks_a_good_snapshot_and_puts_it_in_force() {
        let stream = stream();
        let s = snapshot(10);
        let ack = reply(apply_snapshot(&stream.sidecar, update(&s)));
        assert!(
            matches!(ack, sidecar_message::Message::Ack(Ack { version: 10, ref hash }) if *hash == s.hash)
        );
        assert_eq!(stream.sidecar.snapshots().current().unwrap().version(), 10);
        assert!(stream.sidecar.peer_keys().current().get("k1").is_some());
    }

    #[test]
    fn nacks_a_bad_update_and_keeps_the_last_good_snapshot() {
        let stream = stream();
        apply_snapshot(&stream.sidecar, update(&snapshot(10)));
        let mut bad = update(&changed(11));
        bad.hash = "0".repeat(64);
        let nack = reply(apply_snapshot(&stream.sidecar, bad));
        let sidecar_message::Message::Nack(nack) = nack else {
            panic!("not a NACK: {nack:?}");
        };
        assert_eq!(nack.version, 11);
        assert!(nack.error.contains("announces hash"), "{}", nack.error);
        assert_eq!(stream.sidecar.snapshots().current().unwrap().version(), 10);
    }

    #[test]
    fn acks_the_snapshot_in_force_again_after_a_reconnect() {
        let stream = stream();
        apply_snapshot(&stream.sidecar, update(&snapshot(10)));
        let again = reply(apply_snapshot(&stream.sidecar, update(&snapshot(10))));
        assert!(
            matches!(again, sidecar_message::Message::Ack(_)),
            "{again:?}"
        );
    }

    #[test]
    fn nacks_an_older_version_with_other_content() {
        let stream = stream();
        apply_snapshot(&stream.sidecar, update(&snapshot(10)));
        let older = reply(apply_snapshot(&stream.sidecar, update(&changed(9))));
        assert!(
            matches!(older, sidecar_message::Message::Nack(ref n) if n.error.contains("not newer")),
            "{older:?}"
        );
    }

    #[test]
    fn dropping_the_snapshot_closes_the_sidecar() {
        let stream = stream();
        apply_snapshot(&stream.sidecar, update(&snapshot(10)));
        assert_eq!(
            stream.sidecar.snapshots().clear(Absence::AgentGone),
            Some(10)
        );
        assert!(!stream.sidecar.snapshots().is_ready());
        // A new snapshot after the drop is taken whatever its version.
        let ack = reply(apply_snapshot(&stream.sidecar, update(&changed(3))));
        assert!(matches!(ack, sidecar_message::Message::Ack(_)), "{ack:?}");
    }

    #[tokio::test]
    async fn routes_approval_statuses_to_the_waiting_call() {
        use crate::approvals::{ApprovalAsk, ApprovalPhase, Waited};
        use chaperone_wire::v1::{ApprovalStatus, approval_status};

        let stream = stream();
        let approvals = stream.sidecar.approvals();
        let (tx, mut rx) = mpsc::channel(4);
        let _link = approvals.connect(tx);
        let ask = ApprovalAsk {
            policy: chaperone_policy::ObjectKey::new("shop", "refunds"),
            rule: "r".to_owned(),
            server: "billing".to_owned(),
            tool: "refund".to_owned(),
            arguments: serde_json::json!({}),
            redacted: Vec::new(),
            args_digest: "0".repeat(64),
            scope: "agent",
            scope_key: "pod-0".to_owned(),
            initiator: None,
            chain: Vec::new(),
            timeout_seconds: 60,
            valid_for_seconds: 60,
        };
        let mut ticket = approvals.request(&ask).await.unwrap();
        assert!(matches!(
            rx.try_recv().unwrap().message,
            Some(sidecar_message::Message::ApprovalRequest(_))
        ));
        let status = ApprovalStatus {
            ticket: ticket.id(),
            name: "agent-1".to_owned(),
            phase: approval_status::Phase::Granted as i32,
            ..Default::default()
        };
        let reply = stream
            .on_message(ControllerMessage {
                message: Some(controller_message::Message::Approval(status)),
            })
            .await;
        assert!(reply.is_none());
        let waited = ticket.wait(Instant::now() + Duration::from_secs(1)).await;
        assert!(
            matches!(waited, Waited::Decided(ref u) if u.phase == ApprovalPhase::Granted && u.name == "agent-1"),
            "{waited:?}"
        );
    }

    #[test]
    fn audit_batches_carry_queued_records_and_drops() {
        let mut stream = stream();
        let batch = stream.audit_batch(Arc::from("{\"n\":1}"));
        assert_eq!(batch.records, ["{\"n\":1}"]);
        assert_eq!(batch.dropped, 0);
        stream.sidecar.metrics().audit_dropped.inc_by(3);
        assert_eq!(stream.dropped_since_report(), 3);
        assert_eq!(stream.dropped_since_report(), 0);
    }

    #[test]
    fn only_not_found_and_no_identity_drop_the_snapshot() {
        assert!(agent_is_gone(&Status::not_found("deleted")));
        assert!(agent_is_gone(&Status::failed_precondition(
            "no AgentIdentity"
        )));
        for code in [Code::Unavailable, Code::Unauthenticated, Code::Internal] {
            assert!(!agent_is_gone(&Status::new(code, "x")), "{code:?}");
        }
    }

    #[test]
    fn token_is_read_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc.def\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc.def");
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(read_token(&path), Err(ConnectError::BadToken(_))));
        assert!(matches!(
            read_token(&dir.path().join("missing")),
            Err(ConnectError::Token { .. })
        ));
    }

    /// A source with `snapshot(1)` in force, withdrawn after `limit` seconds
    /// without a stream, and the sender that says since when.
    fn withdrawal(
        limit: Option<u32>,
    ) -> (
        Arc<SnapshotSource>,
        watch::Sender<Option<Instant>>,
        tokio::task::JoinHandle<()>,
    ) {
        let source = Arc::new(SnapshotSource::new());
        let mut content = snapshot(1).content;
        content.max_disconnected_seconds = limit;
        source.update(Snapshot::new(1, content)).unwrap();
        let disconnected = watch::Sender::new(None);
        let guard = tokio::spawn(withdraw_when_disconnected(
            Arc::clone(&source),
            disconnected.subscribe(),
        ));
        (source, disconnected, guard)
    }

    /// Lets the guard task run, then moves the paused clock on by `secs`.
    async fn after(secs: u64) {
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(secs)).await;
        tokio::task::yield_now().await;
    }

    #[tokio::test(start_paused = true)]
    async fn withdraws_the_snapshot_once_the_controller_was_away_its_max_disconnected_seconds() {
        let (source, disconnected, _guard) = withdrawal(Some(30));
        after(3600).await;
        assert!(source.is_ready(), "withdrawn while connected");
        disconnected.send_replace(Some(Instant::now()));
        after(29).await;
        assert!(source.is_ready(), "withdrawn before the limit");
        after(2).await;
        assert!(!source.is_ready(), "still in force after the limit");
        assert_eq!(
            source.absence(),
            Absence::ControllerLost { limit_seconds: 30 }
        );
        let refusal = source.in_force().unwrap_err().to_string();
        assert!(
            refusal.contains("unreachable for more than 30 s"),
            "{refusal}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_before_the_limit_keeps_the_snapshot_and_restarts_the_count() {
        let (source, disconnected, _guard) = withdrawal(Some(30));
        disconnected.send_replace(Some(Instant::now()));
        after(20).await;
        disconnected.send_replace(None);
        after(20).await;
        disconnected.send_replace(Some(Instant::now()));
        after(20).await;
        assert!(
            source.is_ready(),
            "the count did not restart at the reconnect"
        );
        after(11).await;
        assert!(!source.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn without_max_disconnected_seconds_the_snapshot_stays_while_the_controller_is_away() {
        let (source, disconnected, guard) = withdrawal(None);
        disconnected.send_replace(Some(Instant::now()));
        after(7 * 24 * 3600).await;
        assert!(source.is_ready());
        drop(disconnected);
        tokio::task::yield_now().await;
        assert!(guard.is_finished(), "the guard outlived its stream client");
    }
}
