//! Human approval of held calls: the tickets of calls that wait for a
//! person's decision, sent to the controller over the snapshot stream.
//!
//! When a `requireApproval` rule matches a call, the proxy asks here
//! ([`Approvals::request`]): the ask goes out as an `ApprovalRequest` under a
//! ticket unique to this sidecar, and the controller answers with
//! `ApprovalStatus` messages for that ticket ([`Approvals::on_status`]):
//! PENDING at once, then GRANTED, DENIED, EXPIRED or FAILED. The proxy waits on
//! its [`Ticket`] up to the hold time; a ticket dropped before its final
//! answer (hold time over, agent gone) sends `ApprovalRelease`, so that a
//! later approval is not consumed for a call nobody waits for.
//!
//! Fail closed: with no controller stream nothing can be asked and the call is
//! refused; when the stream ends, every waiting ticket is lost (the controller
//! forgets them too) and its call is refused, to be retried.
//!
//! The `ApprovalStatus` wire message is converted at the edge into an
//! [`ApprovalUpdate`]; [`HeldRefusal`] is every way a held call ends refused,
//! with its JSON-RPC code and error data in one place.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chaperone_policy::ObjectKey;
use chaperone_wire::v1::{
    ApprovalLink, ApprovalRelease, ApprovalRequest, ApprovalStatus, SidecarMessage,
    approval_status, sidecar_message,
};
use serde_json::{Value, json};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::audit::{AuditApproval, rfc3339_millis};
use crate::jsonrpc;

/// Where a request for approval stands, as the controller last said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalPhase {
    /// A person has not decided yet.
    Pending,
    /// Approved, and the approval was used for this call: forward it once.
    Granted,
    /// A person denied it.
    Denied,
    /// Nobody decided in time, or the approval was not used in time.
    Expired,
    /// The controller could not handle the request, or another call used
    /// the approval.
    Failed,
}

impl ApprovalPhase {
    /// `Pending`, `Granted`, `Denied`, `Expired` or `Failed`: as in audit
    /// records and the `phase` of a refused call's error data.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalPhase::Pending => "Pending",
            ApprovalPhase::Granted => "Granted",
            ApprovalPhase::Denied => "Denied",
            ApprovalPhase::Expired => "Expired",
            ApprovalPhase::Failed => "Failed",
        }
    }

    /// Whether no further answer follows.
    pub fn is_final(self) -> bool {
        self != ApprovalPhase::Pending
    }
}

/// One answer of the controller about a ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalUpdate {
    /// The ToolCallApproval's name (in the agent's namespace); empty when the
    /// controller failed before it had one.
    pub name: String,
    /// Where it stands.
    pub phase: ApprovalPhase,
    /// The decider's reason, or a short cause.
    pub reason: String,
    /// For people: why.
    pub message: String,
    /// The approver's or denier's username (empty when none).
    pub decided_by: String,
    /// Until when a person can decide, unix seconds (0 when unknown).
    pub expires_at: i64,
}

/// An `ApprovalStatus` the sidecar cannot use.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("approval status for ticket {ticket} has no known phase ({phase})")]
pub struct InvalidApprovalStatus {
    /// The ticket it was for.
    pub ticket: u64,
    /// The phase number it carried.
    pub phase: i32,
}

impl ApprovalUpdate {
    /// Converts an `ApprovalStatus` off the wire: its ticket and the update.
    pub fn from_wire(status: ApprovalStatus) -> Result<(u64, Self), InvalidApprovalStatus> {
        use approval_status::Phase;
        let phase = match Phase::try_from(status.phase) {
            Ok(Phase::Pending) => ApprovalPhase::Pending,
            Ok(Phase::Granted) => ApprovalPhase::Granted,
            Ok(Phase::Denied) => ApprovalPhase::Denied,
            Ok(Phase::Expired) => ApprovalPhase::Expired,
            Ok(Phase::Failed) => ApprovalPhase::Failed,
            Ok(Phase::Unspecified) | Err(_) => {
                return Err(InvalidApprovalStatus {
                    ticket: status.ticket,
                    phase: status.phase,
                });
            }
        };
        Ok((
            status.ticket,
            ApprovalUpdate {
                name: status.name,
                phase,
                reason: status.reason,
                message: status.message,
                decided_by: status.decided_by,
                expires_at: status.expires_at,
            },
        ))
    }
}

/// What the sidecar asks a person to approve: one call, as the controller's
/// `ApprovalRequest` carries it (without the ticket).
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalAsk {
    /// The ToolPolicy whose rule asked.
    pub policy: ObjectKey,
    /// The rule's name.
    pub rule: String,
    /// The tool server.
    pub server: String,
    /// The tool's policy name.
    pub tool: String,
    /// The arguments with the rule's `redactArguments` replaced by
    /// `"[redacted]"`.
    pub arguments: Value,
    /// The pointers that were redacted.
    pub redacted: Vec<String>,
    /// SHA-256 (lowercase hex) of the unredacted arguments' canonical JSON:
    /// the digest assertions carry, without its `sha256:` prefix.
    pub args_digest: String,
    /// The session scope (`task`, `trace`, `mcpSession`, `agent`).
    pub scope: &'static str,
    /// The scope's key.
    pub scope_key: String,
    /// The verified initiator, if any.
    pub initiator: Option<String>,
    /// The delegation chain, outermost delegator first: (agent, grant), each
    /// `namespace/name`.
    pub chain: Vec<(String, String)>,
    /// How long a person may take, seconds.
    pub timeout_seconds: u32,
    /// How long an approval stays usable, seconds.
    pub valid_for_seconds: u32,
}

impl ApprovalAsk {
    /// The wire request under `ticket`.
    pub fn to_wire(&self, ticket: u64) -> ApprovalRequest {
        ApprovalRequest {
            ticket,
            policy_namespace: self.policy.namespace.clone(),
            policy: self.policy.name.clone(),
            rule: self.rule.clone(),
            server: self.server.clone(),
            tool: self.tool.clone(),
            arguments_json: self.arguments.to_string(),
            redacted: self.redacted.clone(),
            args_digest: self.args_digest.clone(),
            scope: self.scope.to_owned(),
            scope_key: self.scope_key.clone(),
            initiator: self.initiator.clone().unwrap_or_default(),
            chain: self
                .chain
                .iter()
                .map(|(agent, grant)| ApprovalLink {
                    agent: agent.clone(),
                    grant: grant.clone(),
                })
                .collect(),
            timeout_seconds: self.timeout_seconds,
            valid_for_seconds: self.valid_for_seconds,
        }
    }
}

/// No controller stream is connected: nobody can be asked.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the sidecar has no connection to the controller")]
pub struct NoController;

/// The tickets of held calls and the controller stream they go out on.
#[derive(Debug, Default)]
pub struct Approvals {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The last ticket handed out (tickets start at 1).
    last_ticket: u64,
    /// The last stream generation handed out.
    last_generation: u64,
    /// The stream connected now.
    link: Option<Link>,
    /// The latest answer of each ticket still waiting for its final one.
    waiting: HashMap<u64, watch::Sender<Option<ApprovalUpdate>>>,
}

#[derive(Debug)]
struct Link {
    generation: u64,
    tx: mpsc::Sender<SidecarMessage>,
}

impl Approvals {
    /// No stream, no tickets.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A controller stream opened: requests go out on `tx` until the
    /// returned [`StreamLink`] is dropped (the stream ended), which loses
    /// every ticket still waiting.
    pub fn connect(self: &Arc<Self>, tx: mpsc::Sender<SidecarMessage>) -> StreamLink {
        let mut inner = self.lock();
        inner.last_generation += 1;
        let generation = inner.last_generation;
        // Tickets of an earlier stream are unknown to this one.
        inner.waiting.clear();
        inner.link = Some(Link { generation, tx });
        StreamLink {
            approvals: Arc::clone(self),
            generation,
        }
    }

    /// Whether a controller stream is connected.
    pub fn is_connected(&self) -> bool {
        self.lock().link.is_some()
    }

    /// Tickets waiting for their final answer.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Hands a controller answer to the call waiting on its ticket (an answer
    /// for a ticket nobody waits on any more is dropped).
    pub fn on_status(&self, status: ApprovalStatus) {
        let (ticket, update) = match ApprovalUpdate::from_wire(status) {
            Ok(converted) => converted,
            Err(error) => {
                tracing::warn!(%error, "ignoring an approval status");
                return;
            }
        };
        let mut inner = self.lock();
        let Some(waiter) = inner.waiting.get(&ticket) else {
            tracing::debug!(ticket, name = %update.name, "approval status for a ticket nobody waits on");
            return;
        };
        let last = update.phase.is_final();
        waiter.send_replace(Some(update));
        if last {
            // Dropping the sender after the final answer: the waiter reads
            // the answer, never a lost stream.
            inner.waiting.remove(&ticket);
        }
    }

    /// Asks the controller for a person's approval of `ask` and returns the
    /// ticket to wait on; [`NoController`] when no stream is connected (or it
    /// ended while the request was being sent).
    pub async fn request(self: &Arc<Self>, ask: &ApprovalAsk) -> Result<Ticket, NoController> {
        let (ticket, generation, tx, rx) = {
            let mut inner = self.lock();
            let Some(link) = &inner.link else {
                return Err(NoController);
            };
            let (generation, tx) = (link.generation, link.tx.clone());
            inner.last_ticket += 1;
            let ticket = inner.last_ticket;
            let (sender, rx) = watch::channel(None);
            inner.waiting.insert(ticket, sender);
            (ticket, generation, tx, rx)
        };
        // From here on, dropping the ticket forgets (and releases) it.
        let ticket = Ticket {
            approvals: Arc::clone(self),
            id: ticket,
            generation,
            rx,
            settled: false,
        };
        let message = sidecar_message::Message::ApprovalRequest(ask.to_wire(ticket.id));
        if tx
            .send(SidecarMessage {
                message: Some(message),
            })
            .await
            .is_err()
        {
            let mut ticket = ticket;
            ticket.settled = true;
            self.lock().waiting.remove(&ticket.id);
            return Err(NoController);
        }
        Ok(ticket)
    }

    /// Forgets `ticket` (dropped before its final answer) and tells the
    /// controller, when the stream it was sent on is still connected.
    fn release(&self, ticket: u64, generation: u64) {
        let mut inner = self.lock();
        if inner.waiting.remove(&ticket).is_none() {
            return;
        }
        let Some(link) = inner.link.as_ref().filter(|l| l.generation == generation) else {
            return;
        };
        let message = sidecar_message::Message::ApprovalRelease(ApprovalRelease { ticket });
        if link
            .tx
            .try_send(SidecarMessage {
                message: Some(message),
            })
            .is_err()
        {
            // The stream is full or closing; the controller forgets the
            // ticket when the stream ends.
            tracing::warn!(ticket, "approval release not sent");
        }
    }

    /// The stream of `generation` ended: its tickets are lost.
    fn disconnect(&self, generation: u64) {
        let mut inner = self.lock();
        if inner
            .link
            .as_ref()
            .is_some_and(|l| l.generation == generation)
        {
            inner.link = None;
            inner.waiting.clear();
        }
    }
}

/// A connected controller stream, as [`Approvals`] sees it; dropping it
/// disconnects.
#[derive(Debug)]
pub struct StreamLink {
    approvals: Arc<Approvals>,
    generation: u64,
}

impl Drop for StreamLink {
    fn drop(&mut self) {
        self.approvals.disconnect(self.generation);
    }
}

/// How waiting on a ticket ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waited {
    /// The final answer (granted, denied, expired or failed).
    Decided(ApprovalUpdate),
    /// The hold time ended first; the last answer, if any (dropping the
    /// ticket releases it).
    StillPending(Option<ApprovalUpdate>),
    /// The controller stream ended first; the last answer, if any.
    Lost(Option<ApprovalUpdate>),
}

/// One call's request for approval, waiting for the controller's answers.
/// Dropped before its final answer, it is released.
#[derive(Debug)]
pub struct Ticket {
    approvals: Arc<Approvals>,
    id: u64,
    generation: u64,
    rx: watch::Receiver<Option<ApprovalUpdate>>,
    /// A final answer came, or the stream ended: nothing to release.
    settled: bool,
}

impl Ticket {
    /// The ticket number on the stream.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the final answer until `deadline`.
    pub async fn wait(&mut self, deadline: Instant) -> Waited {
        loop {
            if let Some(done) = self.final_answer() {
                return Waited::Decided(done);
            }
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    // The sender is gone: after a final answer, or because
                    // the stream ended.
                    if let Some(done) = self.final_answer() {
                        return Waited::Decided(done);
                    }
                    self.settled = true;
                    return Waited::Lost(self.rx.borrow().clone());
                }
                Err(_) => {
                    if let Some(done) = self.final_answer() {
                        return Waited::Decided(done);
                    }
                    return Waited::StillPending(self.rx.borrow().clone());
                }
            }
        }
    }

    fn final_answer(&mut self) -> Option<ApprovalUpdate> {
        let update = self
            .rx
            .borrow_and_update()
            .clone()
            .filter(|u| u.phase.is_final())?;
        self.settled = true;
        Some(update)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.approvals.release(self.id, self.generation);
        }
    }
}

/// `text`, or `fallback` when it is empty.
fn or<'a>(text: &'a str, fallback: &'a str) -> &'a str {
    if text.is_empty() { fallback } else { text }
}

/// Why a call that needed a person's approval was refused. Each maps to its
/// JSON-RPC code, its error data and its audit record's `approval` here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeldRefusal {
    /// It came in a batch: only a message sent alone can be held.
    InBatch,
    /// It is a notification: there is no response to answer it with.
    NotARequest,
    /// No controller stream to ask over (fail closed).
    NoController,
    /// A person denied it, it expired, or the controller failed it.
    Decided(ApprovalUpdate),
    /// Nobody decided within the hold time.
    StillPending {
        /// The approval's name, when the controller named it.
        name: Option<String>,
        /// The agent's namespace, where the object is.
        namespace: String,
        /// Until when a person can decide, unix seconds (0: unknown).
        expires_at: i64,
        /// The hold time that ended.
        hold: Duration,
    },
    /// The controller stream ended while the call waited.
    StreamLost {
        /// The approval's name, when the controller named it.
        name: Option<String>,
    },
    /// The approval was granted, but the policy snapshot no longer has the
    /// call's tool server.
    ServerGone {
        /// The approval's name.
        name: String,
        /// The tool server.
        server: String,
    },
}

impl HeldRefusal {
    /// The JSON-RPC error code: [`jsonrpc::APPROVAL_PENDING`] when the same
    /// call should be retried, else [`jsonrpc::POLICY_DENIED`].
    pub fn code(&self) -> i64 {
        match self {
            HeldRefusal::StillPending { .. } | HeldRefusal::StreamLost { .. } => {
                jsonrpc::APPROVAL_PENDING
            }
            _ => jsonrpc::POLICY_DENIED,
        }
    }

    /// The approval's name, when there is one.
    pub fn name(&self) -> Option<&str> {
        let name = match self {
            HeldRefusal::Decided(update) => Some(update.name.as_str()),
            HeldRefusal::StillPending { name, .. } | HeldRefusal::StreamLost { name } => {
                name.as_deref()
            }
            HeldRefusal::ServerGone { name, .. } => Some(name.as_str()),
            HeldRefusal::InBatch | HeldRefusal::NotARequest | HeldRefusal::NoController => None,
        };
        name.filter(|n| !n.is_empty())
    }

    /// The phase the refusal leaves the approval in, when one was asked for.
    pub fn phase(&self) -> Option<ApprovalPhase> {
        match self {
            HeldRefusal::Decided(update) => Some(update.phase),
            HeldRefusal::StillPending { .. } | HeldRefusal::StreamLost { .. } => {
                Some(ApprovalPhase::Pending)
            }
            HeldRefusal::ServerGone { .. } => Some(ApprovalPhase::Granted),
            HeldRefusal::InBatch | HeldRefusal::NotARequest | HeldRefusal::NoController => None,
        }
    }

    /// Who decided, when someone did.
    pub fn decided_by(&self) -> Option<&str> {
        match self {
            HeldRefusal::Decided(update) if !update.decided_by.is_empty() => {
                Some(&update.decided_by)
            }
            _ => None,
        }
    }

    /// The audit record's `approval`, when one was asked for.
    pub fn audit(&self) -> Option<AuditApproval<'_>> {
        Some(AuditApproval {
            decided_by: self.decided_by(),
            name: self.name(),
            phase: self.phase()?.as_str(),
        })
    }

    /// What the error's `data` adds to `rule` and `correlationId`:
    /// `approval` (the object's name) and `phase`, where known.
    pub fn data(&self) -> serde_json::Map<String, Value> {
        let mut data = serde_json::Map::new();
        if let Some(phase) = self.phase() {
            data.insert("approval".to_owned(), json!(self.name()));
            data.insert("phase".to_owned(), json!(phase.as_str()));
        }
        if let Some(by) = self.decided_by() {
            data.insert("decidedBy".to_owned(), json!(by));
        }
        data
    }

    /// The metric label of the outcome.
    pub fn label(&self) -> &'static str {
        match self {
            HeldRefusal::InBatch | HeldRefusal::NotARequest => "not_held",
            HeldRefusal::NoController => "unavailable",
            HeldRefusal::Decided(update) => match update.phase {
                ApprovalPhase::Denied => "denied",
                ApprovalPhase::Expired => "expired",
                _ => "failed",
            },
            HeldRefusal::StillPending { .. } => "pending",
            HeldRefusal::StreamLost { .. } => "lost",
            HeldRefusal::ServerGone { .. } => "failed",
        }
    }
}

impl fmt::Display for HeldRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeldRefusal::InBatch => f.write_str(
                "this call needs a person's approval, and a call that needs approval cannot be held inside a batch: send it alone",
            ),
            HeldRefusal::NotARequest => f.write_str(
                "this call needs a person's approval, and a notification cannot wait for one: send it as a request (with an id)",
            ),
            HeldRefusal::NoController => f.write_str(
                "this call needs a person's approval, and the sidecar has no connection to the controller to ask for it",
            ),
            HeldRefusal::Decided(update) => {
                let name = or(&update.name, "(unnamed)");
                match update.phase {
                    ApprovalPhase::Denied => write!(
                        f,
                        "approval {name} was denied by {}: {}",
                        or(&update.decided_by, "an unknown user"),
                        or(&update.message, &update.reason),
                    )?,
                    ApprovalPhase::Expired => write!(
                        f,
                        "approval {name} expired: {}; calling again asks anew",
                        or(&update.message, "nobody decided in time"),
                    )?,
                    _ => write!(
                        f,
                        "approval {name} failed: {}",
                        or(&update.message, &update.reason),
                    )?,
                }
                if update.phase == ApprovalPhase::Denied && !update.reason.is_empty() {
                    write!(f, " (reason {})", update.reason)?;
                }
                Ok(())
            }
            HeldRefusal::StillPending {
                name,
                namespace,
                expires_at,
                hold,
            } => {
                let what = match name {
                    Some(name) => format!("ToolCallApproval {name} in namespace {namespace}"),
                    None => format!("a ToolCallApproval in namespace {namespace}"),
                };
                write!(
                    f,
                    "this call waits for a person's approval: {what} is pending"
                )?;
                if *expires_at > 0 {
                    write!(
                        f,
                        " until {}",
                        rfc3339_millis(expires_at.saturating_mul(1000))
                    )?;
                }
                write!(
                    f,
                    "; nobody decided within the {} s the call is held. Retry the same call (same arguments, same session) once it is approved",
                    hold.as_secs()
                )?;
                if let Some(name) = name {
                    write!(f, " (chaperonectl approval approve {name} -n {namespace})")?;
                }
                Ok(())
            }
            HeldRefusal::StreamLost { name } => {
                write!(
                    f,
                    "the connection to the controller ended while this call waited for approval"
                )?;
                if let Some(name) = name {
                    write!(f, " {name}")?;
                }
                f.write_str("; retry the same call")
            }
            HeldRefusal::ServerGone { name, server } => write!(
                f,
                "approval {name} was granted, but tool server {server:?} is no longer configured for this agent"
            ),
        }
    }
}

#[cfg(test)]
#[path = "approvals_tests.rs"]
mod tests;
