//! A fake controller: the server side of the snapshot stream
//! (`SnapshotService/Watch`) over TLS, for tests that run a real
//! [`SnapshotStream`](chaperone_sidecar::SnapshotStream) against it.
//!
//! It sends no snapshot (tests load policy directories), records what
//! sidecars send (audit records included), ends a stream once the sidecar has
//! closed its side (as the controller does), and answers approval requests the way the controller does:
//! one approval object per agent call (tool, argument digest, session key),
//! found again by a retry while it is pending or approved and unused;
//! PENDING at once, then the decision the test makes ([`FakeController::decide`]),
//! or at once when the test chose one for every new request
//! ([`FakeController::decide_every_request`]). An approval is used once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chaperone_sidecar::settings::{CaSource, ControllerSettings};
use chaperone_wire::v1::{
    ApprovalRequest, ApprovalStatus, ControllerMessage, SidecarMessage, approval_status,
    controller_message, sidecar_message,
    snapshot_service_server::{SnapshotService, SnapshotServiceServer},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// What a person decides about an approval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Approved by this user.
    Approve(&'static str),
    /// Denied by this user, with a reason and a message.
    Deny(&'static str, &'static str, &'static str),
    /// Nobody decided in time.
    Expire,
}

/// One approval object of the fake.
#[derive(Debug)]
struct FakeApproval {
    name: String,
    tool: String,
    args_digest: String,
    scope_key: String,
    decision: Option<Decision>,
    consumed: bool,
}

impl FakeApproval {
    /// Whether a new request for the same call finds this object again.
    fn reusable(&self) -> bool {
        match &self.decision {
            None => true,
            Some(Decision::Approve(_)) => !self.consumed,
            Some(_) => false,
        }
    }
}

#[derive(Default)]
struct State {
    /// Approval requests received, in order.
    requests: Vec<ApprovalRequest>,
    /// Tickets released, in order.
    releases: Vec<u64>,
    objects: Vec<FakeApproval>,
    /// The decision every new object gets at once.
    decide_every: Option<Decision>,
    /// Tickets waiting on an object: (stream, ticket) → object index.
    waiting: HashMap<(usize, u64), usize>,
    /// Each stream's outbound queue, by stream number.
    streams: Vec<mpsc::Sender<Result<ControllerMessage, Status>>>,
    /// Audit records received, in order.
    audit: Vec<String>,
    /// Streams the sidecar closed its side of cleanly (the fake then ended
    /// them).
    closed_by_sidecar: usize,
}

/// The reconnect backoff of streams under test: 20 ms doubling to 100 ms.
pub fn short_backoff() -> chaperone_sidecar::backoff::Backoff {
    chaperone_sidecar::backoff::Backoff::new(Duration::from_millis(20), Duration::from_millis(100))
}

/// Until when a person could decide (unix seconds): fixed, for assertions.
pub const EXPIRES_AT: i64 = 2_000_000_000;

impl State {
    fn send(&self, stream: usize, status: ApprovalStatus) {
        let message = ControllerMessage {
            message: Some(controller_message::Message::Approval(status)),
        };
        // A closed stream has nobody to tell.
        let _ = self.streams[stream].try_send(Ok(message));
    }

    fn status(&self, object: usize, ticket: u64) -> ApprovalStatus {
        let object = &self.objects[object];
        let (phase, reason, message, decided_by) = match &object.decision {
            None => (approval_status::Phase::Pending, "Pending", "waiting", ""),
            Some(Decision::Approve(by)) => (
                approval_status::Phase::Granted,
                "Approved",
                "approved and used for this call",
                *by,
            ),
            Some(Decision::Deny(by, reason, message)) => {
                (approval_status::Phase::Denied, *reason, *message, *by)
            }
            Some(Decision::Expire) => (
                approval_status::Phase::Expired,
                "Expired",
                "nobody decided in time",
                "",
            ),
        };
        ApprovalStatus {
            ticket,
            name: object.name.clone(),
            phase: phase as i32,
            reason: reason.to_owned(),
            message: message.to_owned(),
            decided_by: decided_by.to_owned(),
            expires_at: EXPIRES_AT,
        }
    }

    /// Answers a ticket waiting on a decided object (and consumes an
    /// approval for it).
    fn settle(&mut self, stream: usize, ticket: u64, object: usize) {
        let Some(decision) = self.objects[object].decision.clone() else {
            return;
        };
        if matches!(decision, Decision::Approve(_)) {
            if self.objects[object].consumed {
                return;
            }
            self.objects[object].consumed = true;
        }
        self.waiting.remove(&(stream, ticket));
        self.send(stream, self.status(object, ticket));
    }

    fn on_request(&mut self, stream: usize, request: ApprovalRequest) {
        let found = self.objects.iter().position(|o| {
            o.reusable()
                && o.tool == request.tool
                && o.args_digest == request.args_digest
                && o.scope_key == request.scope_key
        });
        let object = found.unwrap_or_else(|| {
            self.objects.push(FakeApproval {
                name: format!("agent-{}", self.objects.len() + 1),
                tool: request.tool.clone(),
                args_digest: request.args_digest.clone(),
                scope_key: request.scope_key.clone(),
                decision: self.decide_every.clone(),
                consumed: false,
            });
            self.objects.len() - 1
        });
        let ticket = request.ticket;
        self.requests.push(request);
        self.waiting.insert((stream, ticket), object);
        let mut pending = self.status(object, ticket);
        pending.phase = approval_status::Phase::Pending as i32;
        pending.decided_by.clear();
        self.send(stream, pending);
        self.settle(stream, ticket, object);
    }
}

/// A running fake controller.
pub struct FakeController {
    /// Where it listens.
    pub address: SocketAddr,
    ca_pem: String,
    token: tempfile::TempDir,
    state: Arc<Mutex<State>>,
}

#[derive(Clone)]
struct Service {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

#[tonic::async_trait]
impl SnapshotService for Service {
    type WatchStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let stream = {
            let mut state = lock(&self.state);
            state.streams.push(tx);
            state.streams.len() - 1
        };
        let mut inbound = request.into_inner();
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            let closed = loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break true,
                    Err(_) => break false,
                };
                let mut state = lock(&state);
                match message.message {
                    Some(sidecar_message::Message::ApprovalRequest(request)) => {
                        state.on_request(stream, request);
                    }
                    Some(sidecar_message::Message::ApprovalRelease(release)) => {
                        state.releases.push(release.ticket);
                        state.waiting.remove(&(stream, release.ticket));
                    }
                    Some(sidecar_message::Message::Audit(batch)) => {
                        state.audit.extend(batch.records);
                    }
                    _ => {}
                }
            };
            let mut state = lock(&state);
            state.waiting.retain(|(s, _), _| *s != stream);
            // Everything the sidecar sent is read: end the stream (dropping its
            // queue's sender; a closed one takes its place).
            state.streams[stream] = mpsc::channel(1).0;
            state.closed_by_sidecar += usize::from(closed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl FakeController {
    /// Starts it on a loopback port with a fresh self-signed certificate.
    pub async fn start() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca_pem = certified.cert.pem();
        let key_pem = certified.signing_key.serialize_pem();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let service = Service {
            state: Arc::clone(&state),
        };
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&ca_pem, &key_pem));
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(SnapshotServiceServer::new(service));
        tokio::spawn(async move {
            server
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        let token = tempfile::tempdir().unwrap();
        std::fs::write(token.path().join("token"), "test-token\n").unwrap();
        Self {
            address,
            ca_pem,
            token,
            state,
        }
    }

    /// Settings a sidecar dials it with.
    pub fn settings(&self) -> ControllerSettings {
        let mut settings = ControllerSettings::new(self.address.to_string()).unwrap();
        settings.server_name = "localhost".to_owned();
        settings.token_file = self.token.path().join("token");
        settings.ca = CaSource::Pem(self.ca_pem.clone());
        settings
    }

    /// Every new approval object gets `decision` at once.
    pub fn decide_every_request(&self, decision: Decision) {
        lock(&self.state).decide_every = Some(decision);
    }

    /// A person decides approval `name`; tickets waiting on it are answered.
    pub fn decide(&self, name: &str, decision: Decision) {
        let mut state = lock(&self.state);
        let object = state
            .objects
            .iter()
            .position(|o| o.name == name)
            .unwrap_or_else(|| panic!("no approval {name}"));
        state.objects[object].decision = Some(decision);
        let waiting: Vec<(usize, u64)> = state
            .waiting
            .iter()
            .filter(|(_, o)| **o == object)
            .map(|(key, _)| *key)
            .collect();
        for (stream, ticket) in waiting {
            state.settle(stream, ticket, object);
        }
    }

    /// The approval requests received so far.
    pub fn requests(&self) -> Vec<ApprovalRequest> {
        lock(&self.state).requests.clone()
    }

    /// The tickets released so far.
    pub fn releases(&self) -> Vec<u64> {
        lock(&self.state).releases.clone()
    }

    /// The audit records received so far, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        lock(&self.state)
            .audit
            .iter()
            .map(|line| serde_json::from_str(line).expect("an audit record is JSON"))
            .collect()
    }

    /// Streams whose sidecar closed its side cleanly (not dropped).
    pub fn closed_by_sidecar(&self) -> usize {
        lock(&self.state).closed_by_sidecar
    }

    /// Waits until `sidecar`'s snapshot stream is connected (at most 5 s).
    pub async fn wait_for_connection(&self, sidecar: &chaperone_sidecar::Sidecar) {
        let approvals = sidecar.approvals();
        self.wait_for("the sidecar connect", |_| approvals.is_connected())
            .await;
    }

    /// Waits until `check` holds of what was received (at most 5 s).
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        for _ in 0..500 {
            if check(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the fake controller never saw {what}");
    }
}
