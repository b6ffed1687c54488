//! Human approval of single tool calls, the controller's side: a sidecar
//! holding a call that a `requireApproval` rule matched sends an
//! `ApprovalRequest` on its stream; the controller finds the ToolCallApproval
//! for the same call (pending, or approved and unused) or creates one, answers
//! PENDING at once, and answers again when a person decides: GRANTED once the
//! approval is consumed for that ticket, DENIED, EXPIRED, or FAILED.
//!
//! The parts: [`core`] (the request checked, the object built, where an
//! object stands, the status writes, the sweep's decision; pure),
//! [`tickets`] (which ticket waits on which object; a pure state machine),
//! [`events`] (the Events' notes; pure) and [`ApprovalDesk`], the thin shell
//! that moves them to and from the API server.
//!
//! Every replica watches ToolCallApprovals and serves the tickets of its own
//! streams. An approval is consumed by a status update conditioned on the
//! resourceVersion the replica saw (`consumedAt`, `consumedBy`,
//! `phase: Consumed`), so of all the replicas and tickets that try, exactly
//! one wins; the others see it Consumed and answer FAILED. All state that
//! matters is in the objects: a controller that restarts finds the pending
//! approval again when the sidecar retries.
//!
//! The leader also sweeps ([`ApprovalDesk::run`]): an object still pending
//! after `spec.expiresAt`, or approved and unused after `status.validUntil`,
//! gets an `Expired` condition and phase; decided objects are deleted once
//! they were decided longer ago than `--approval-retention`.
//!
//! The controller never writes `decidedBy`, `decidedAt` or an Approved or
//! Denied condition: people decide through the status subresource, and the
//! admission webhook records who.

pub mod core;
pub mod events;
pub mod tickets;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chaperone_api::approval::ToolCallApproval;
use futures_util::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tokio::sync::{mpsc, watch};

pub use self::core::{
    AnswerPhase, ApprovalAnswer, ApprovalCall, InvalidApprovalRequest, LABEL_AGENT,
    LABEL_ARGS_DIGEST, RawApprovalRequest, Standing, SweepAction,
};
use self::{
    core::{
        consumed, expired, label_selector, new_approval, pending_count, pick_reusable, standing,
        sweep_action, with_pending_phase,
    },
    events::{ApprovalEventKind, approval_event},
    tickets::{ConsumeResult, ObjectName, StreamId, TicketBook, TicketKey, TicketStep},
};
use crate::{
    audit_events::AuditEvents, auth::SidecarIdentity, metrics::Metrics,
    snapshot_server::wire::approval_status_message,
};
use chaperone_wire::v1::ControllerMessage;

/// How often the leader sweeps (expiry and garbage collection).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Most approvals one agent may have waiting for a person: a flood of calls
/// with ever different arguments cannot fill the cluster with objects.
pub const MAX_PENDING_PER_AGENT: usize = 100;

/// Settings of the approval flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalSettings {
    /// How long decided objects are kept (`--approval-retention`).
    pub retention: Duration,
    /// How often the leader sweeps.
    pub sweep_interval: Duration,
    /// Most approvals waiting per agent.
    pub max_pending_per_agent: usize,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(3600),
            sweep_interval: SWEEP_INTERVAL,
            max_pending_per_agent: MAX_PENDING_PER_AGENT,
        }
    }
}

/// Why a request could not be given an object.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(
        "agent {agent} already has {count} approvals waiting for a person; decide or let some expire first"
    )]
    TooManyPending { agent: String, count: usize },
    #[error("the Kubernetes API failed: {0}")]
    Kube(#[from] kube::Error),
}

/// One sidecar stream's outbox for approval answers.
struct StreamEntry {
    identity: Arc<SidecarIdentity>,
    tx: mpsc::UnboundedSender<ControllerMessage>,
}

/// What the lock guards.
#[derive(Default)]
struct DeskState {
    book: TicketBook,
    streams: HashMap<StreamId, StreamEntry>,
    /// Whether each object was last seen undecided (pending or approved): a
    /// change to Denied is then a decision to announce.
    undecided: HashMap<ObjectName, bool>,
}

/// The approval flow of this replica: tickets of its streams, the watch that
/// drives them, and (when leading) the sweep.
pub struct ApprovalDesk {
    client: Client,
    store: Store<ToolCallApproval>,
    state: Mutex<DeskState>,
    events: Arc<AuditEvents>,
    metrics: Arc<Metrics>,
    settings: ApprovalSettings,
    /// One find-or-create at a time on this replica, so that two requests for
    /// the same call do not both create an object.
    find_or_create: tokio::sync::Mutex<()>,
    next_stream: AtomicU64,
}

/// A sidecar stream's handle on the desk: requests and releases go through
/// it; dropping it (the stream ended) forgets the stream's tickets.
pub struct ApprovalStream {
    desk: Arc<ApprovalDesk>,
    id: StreamId,
    identity: Arc<SidecarIdentity>,
}

impl ApprovalDesk {
    /// A desk and the writer of its ToolCallApproval cache (give it to
    /// [`ApprovalDesk::run`]).
    pub fn new(
        client: Client,
        events: Arc<AuditEvents>,
        metrics: Arc<Metrics>,
        settings: ApprovalSettings,
    ) -> (Arc<Self>, Writer<ToolCallApproval>) {
        let (store, writer) = reflector::store();
        let desk = Arc::new(Self {
            client,
            store,
            state: Mutex::new(DeskState::default()),
            events,
            metrics,
            settings,
            find_or_create: tokio::sync::Mutex::new(()),
            next_stream: AtomicU64::new(1),
        });
        (desk, writer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an agent sidecar's stream: its handle, and the receiver of
    /// the answers to send on it.
    pub fn open_stream(
        self: &Arc<Self>,
        identity: Arc<SidecarIdentity>,
    ) -> (ApprovalStream, mpsc::UnboundedReceiver<ControllerMessage>) {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().streams.insert(
            id,
            StreamEntry {
                identity: Arc::clone(&identity),
                tx,
            },
        );
        let stream = ApprovalStream {
            desk: Arc::clone(self),
            id,
            identity,
        };
        (stream, rx)
    }

    /// Sends `answer` on `stream` (if it is still open).
    fn send(&self, state: &DeskState, stream: StreamId, answer: &ApprovalAnswer) {
        self.metrics.approval_answered(answer.phase.as_str());
        if let Some(entry) = state.streams.get(&stream) {
            let _ = entry.tx.send(approval_status_message(answer));
        }
    }

    fn api(&self, namespace: &str) -> Api<ToolCallApproval> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The latest version of `name` this replica has seen.
    fn cached(&self, (namespace, name): &ObjectName) -> Option<ToolCallApproval> {
        self.store
            .get(&ObjectRef::new(name).within(namespace))
            .map(|o| (*o).clone())
    }

    /// Handles one request: open the ticket, find or create the object,
    /// answer PENDING, then whatever the object's standing calls for.
    async fn request(
        self: Arc<Self>,
        stream: StreamId,
        identity: Arc<SidecarIdentity>,
        call: ApprovalCall,
    ) {
        let key = TicketKey {
            stream,
            ticket: call.ticket,
        };
        {
            let mut state = self.lock();
            if let Err(refused) = state.book.open(key, &identity.pod) {
                let answer =
                    ApprovalAnswer::failed(call.ticket, "", "InvalidRequest", refused.to_string());
                self.send(&state, stream, &answer);
                return;
            }
        }
        let (object, created) = match self.find_or_create(&call, &identity).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(pod = %identity.pod, ticket = call.ticket, %error, "approval request failed");
                let mut state = self.lock();
                if state.book.close(key) {
                    let answer = ApprovalAnswer::failed(
                        call.ticket,
                        "",
                        "RequestFailed",
                        format!("the controller could not record the approval request: {error}"),
                    );
                    self.send(&state, stream, &answer);
                }
                return;
            }
        };
        let name: ObjectName = (object.namespace().unwrap_or_default(), object.name_any());
        if created {
            self.metrics.approval_created();
            tracing::info!(approval = %name.1, namespace = %name.0, tool = %call.tool, pod = %identity.pod, "approval requested");
            self.events.record(approval_event(
                ApprovalEventKind::Requested,
                &object,
                Some((&identity.pod, &identity.pod_uid)),
                "",
            ));
        }
        let (current, consume) = {
            let mut state = self.lock();
            if !state.book.attach(key, name.clone()) {
                return;
            }
            // The cache's version when it has one, read under the lock after
            // attaching: a watch event handled before saw no ticket but had
            // updated the cache; one handled after sees this ticket. (It may
            // be newer than what was just listed; if it is older, the watch
            // brings the newer one to this ticket.)
            let current = self.cached(&name).unwrap_or(object);
            let now = Timestamp::now();
            let standing = standing(&current, now);
            let pending = if standing.is_reusable() {
                ApprovalAnswer::for_standing(call.ticket, &current, &standing)
            } else {
                ApprovalAnswer::for_standing(
                    call.ticket,
                    &current,
                    &Standing::Pending {
                        expires_at: Timestamp::MIN,
                    },
                )
            };
            self.send(&state, stream, &pending);
            let consume = self.step(&mut state, &name, &current, &standing);
            (current, consume)
        };
        if let Some((ticket, pod)) = consume {
            self.consume(current, ticket, pod).await;
        }
    }

    /// Finds the object a request for `call` waits on, or creates it (status
    /// `phase: Pending`). `true` with a created one.
    async fn find_or_create(
        &self,
        call: &ApprovalCall,
        identity: &SidecarIdentity,
    ) -> Result<(ToolCallApproval, bool), RequestError> {
        let _one_at_a_time = self.find_or_create.lock().await;
        let api = self.api(&identity.agent.namespace);
        let selector = label_selector(&identity.agent.name, &call.args_digest);
        let candidates = api.list(&ListParams::default().labels(&selector)).await?;
        let now = Timestamp::now();
        if let Some(found) = pick_reusable(&candidates.items, call, identity, now) {
            return Ok((found.clone(), false));
        }
        let cached = self.store.state();
        let count = pending_count(
            cached.iter().map(|o| o.as_ref()),
            &identity.agent.namespace,
            &identity.agent.name,
            now,
        );
        if count >= self.settings.max_pending_per_agent {
            return Err(RequestError::TooManyPending {
                agent: identity.agent.to_string(),
                count,
            });
        }
        let created = api
            .create(&PostParams::default(), &new_approval(call, identity, now))
            .await?;
        let name = created.name_any();
        match api
            .replace_status(&name, &PostParams::default(), &with_pending_phase(&created))
            .await
        {
            Ok(object) => Ok((object, true)),
            Err(error) => {
                // Without a phase it stands Pending all the same.
                tracing::warn!(approval = %name, %error, "writing phase Pending failed");
                Ok((created, true))
            }
        }
    }

    /// What `object`'s new standing means for the tickets waiting on it:
    /// final answers are sent here; a consume to make is returned.
    fn step(
        &self,
        state: &mut DeskState,
        name: &ObjectName,
        object: &ToolCallApproval,
        standing: &Standing,
    ) -> Option<(TicketKey, String)> {
        match state.book.on_standing(name, standing) {
            TicketStep::Wait => None,
            TicketStep::Consume { ticket, pod } => Some((ticket, pod)),
            TicketStep::Finish(tickets) => {
                for key in tickets {
                    let answer = ApprovalAnswer::for_standing(key.ticket, object, standing);
                    self.send(state, key.stream, &answer);
                }
                None
            }
        }
    }

    /// Consumes `object` for `ticket` (of `pod`) by a status update
    /// conditioned on its resourceVersion; on a conflict, re-reads the object
    /// and acts on its new standing.
    async fn consume(&self, mut object: ToolCallApproval, mut ticket: TicketKey, mut pod: String) {
        loop {
            let name: ObjectName = (object.namespace().unwrap_or_default(), object.name_any());
            let api = self.api(&name.0);
            let body = consumed(&object, &pod, Timestamp::now());
            match api
                .replace_status(&name.1, &PostParams::default(), &body)
                .await
            {
                Ok(updated) => {
                    let state = &mut *self.lock();
                    let outcome = state.book.consume_done(&name, ticket, ConsumeResult::Won);
                    let used = Standing::Consumed { by: pod.clone() };
                    for key in outcome.failed {
                        let answer = ApprovalAnswer::for_standing(key.ticket, &updated, &used);
                        self.send(state, key.stream, &answer);
                    }
                    let identity = state
                        .streams
                        .get(&ticket.stream)
                        .map(|s| Arc::clone(&s.identity));
                    if outcome.granted.is_some() {
                        self.send(
                            state,
                            ticket.stream,
                            &ApprovalAnswer::granted(ticket.ticket, &updated),
                        );
                    } else {
                        tracing::warn!(approval = %name.1, namespace = %name.0, "the ticket an approval was consumed for stopped waiting meanwhile; the approval is used");
                    }
                    tracing::info!(approval = %name.1, namespace = %name.0, pod = %pod, "approval consumed");
                    let on = identity
                        .as_ref()
                        .map(|i| (i.pod.as_str(), i.pod_uid.as_str()));
                    self.events.record(approval_event(
                        ApprovalEventKind::Granted,
                        &updated,
                        on,
                        "",
                    ));
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    self.lock()
                        .book
                        .consume_done(&name, ticket, ConsumeResult::Conflict);
                    match api.get_opt(&name.1).await {
                        Ok(Some(fresh)) => {
                            let next = {
                                let mut state = self.lock();
                                let standing = standing(&fresh, Timestamp::now());
                                self.step(&mut state, &name, &fresh, &standing)
                            };
                            match next {
                                Some((next_ticket, next_pod)) => {
                                    (object, ticket, pod) = (fresh, next_ticket, next_pod);
                                }
                                None => return,
                            }
                        }
                        Ok(None) => {
                            self.deleted(&name);
                            return;
                        }
                        Err(error) => {
                            // The tickets keep waiting; the watch brings the
                            // object's next change to them.
                            tracing::warn!(approval = %name.1, %error, "re-reading an approval after a conflict failed");
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(approval = %name.1, namespace = %name.0, %error, "consuming an approval failed");
                    self.consume_failed(&name, ticket, &error.to_string());
                    return;
                }
            }
        }
    }

    fn consume_failed(&self, name: &ObjectName, ticket: TicketKey, error: &str) {
        let state = &mut *self.lock();
        let outcome = state.book.consume_done(name, ticket, ConsumeResult::Failed);
        for key in outcome.failed {
            let answer = ApprovalAnswer::failed(
                key.ticket,
                &name.1,
                "ConsumeFailed",
                format!(
                    "ToolCallApproval {} is approved but using it failed ({error}); retry the call",
                    name.1
                ),
            );
            self.send(state, key.stream, &answer);
        }
    }

    /// `name` was deleted: its waiting tickets fail.
    fn deleted(&self, name: &ObjectName) {
        let state = &mut *self.lock();
        state.undecided.remove(name);
        for key in state.book.on_deleted(name) {
            let answer = ApprovalAnswer::failed(
                key.ticket,
                &name.1,
                "Deleted",
                format!(
                    "ToolCallApproval {} was deleted before it was decided",
                    name.1
                ),
            );
            self.send(state, key.stream, &answer);
        }
    }

    /// A watched object changed (`live`: not part of a re-list). Leading,
    /// an undecided object that turned Denied is announced by an Event.
    fn on_object(
        &self,
        object: &ToolCallApproval,
        live: bool,
        leading: bool,
    ) -> Option<(TicketKey, String)> {
        let name: ObjectName = (object.namespace().unwrap_or_default(), object.name_any());
        let standing = standing(object, Timestamp::now());
        let mut state = self.lock();
        let was_undecided = state.undecided.insert(name.clone(), standing.is_reusable());
        if let Standing::Denied { message, .. } = &standing {
            let decided_now = match was_undecided {
                Some(undecided) => undecided,
                None => live,
            };
            if leading && decided_now {
                self.events.record(approval_event(
                    ApprovalEventKind::Denied,
                    object,
                    None,
                    message,
                ));
            }
        }
        self.step(&mut state, &name, object, &standing)
    }

    /// Watches ToolCallApprovals (answering the tickets waiting on them) and,
    /// while `leader` is true, sweeps every [`ApprovalSettings::sweep_interval`].
    pub async fn run(
        self: Arc<Self>,
        writer: Writer<ToolCallApproval>,
        leader: watch::Receiver<bool>,
    ) {
        tokio::join!(
            Arc::clone(&self).watch(writer, leader.clone()),
            self.sweep_loop(leader)
        );
    }

    async fn watch(
        self: Arc<Self>,
        writer: Writer<ToolCallApproval>,
        leader: watch::Receiver<bool>,
    ) {
        let api = Api::<ToolCallApproval>::all(self.client.clone());
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).modify(|object| {
                object.metadata.managed_fields = None;
            }),
        )
        .default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let leading = *leader.borrow();
            let (object, live) = match event {
                Ok(watcher::Event::Apply(object)) => (object, true),
                Ok(watcher::Event::InitApply(object)) => (object, false),
                Ok(watcher::Event::Delete(object)) => {
                    self.deleted(&(object.namespace().unwrap_or_default(), object.name_any()));
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    // Forget what a re-list no longer has.
                    let present: std::collections::HashSet<ObjectName> = self
                        .store
                        .state()
                        .iter()
                        .map(|o| (o.namespace().unwrap_or_default(), o.name_any()))
                        .collect();
                    self.lock()
                        .undecided
                        .retain(|name, _| present.contains(name));
                    continue;
                }
                Ok(watcher::Event::Init) => continue,
                Err(error) => {
                    tracing::warn!(%error, "ToolCallApproval watch failed; retrying with backoff");
                    continue;
                }
            };
            if let Some((ticket, pod)) = self.on_object(&object, live, leading) {
                tokio::spawn({
                    let desk = Arc::clone(&self);
                    async move { desk.consume(object, ticket, pod).await }
                });
            }
        }
    }

    async fn sweep_loop(self: Arc<Self>, mut leader: watch::Receiver<bool>) {
        if self.store.wait_until_ready().await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(self.settings.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if *leader.borrow_and_update() {
                self.sweep().await;
            }
        }
    }

    /// One pass of the leader's sweep over the cached objects.
    async fn sweep(&self) {
        let now = Timestamp::now();
        for object in self.store.state() {
            let action = sweep_action(&object, now, self.settings.retention);
            let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
            let api = self.api(&namespace);
            match action {
                SweepAction::Keep => {}
                SweepAction::Expire { reason, message } => {
                    let body = expired(&object, &reason, &message, now);
                    match api
                        .replace_status(&name, &PostParams::default(), &body)
                        .await
                    {
                        Ok(updated) => {
                            tracing::info!(approval = %name, %namespace, %reason, "approval expired");
                            self.events.record(approval_event(
                                ApprovalEventKind::Expired,
                                &updated,
                                None,
                                &message,
                            ));
                            // This replica's tickets need not wait for the
                            // watch; an expired object is final (no consume).
                            let _ = self.on_object(&updated, true, false);
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                        Err(error) => {
                            tracing::warn!(approval = %name, %namespace, %error, "expiring an approval failed")
                        }
                    }
                }
                SweepAction::Delete => {
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            uid: object.uid(),
                            resource_version: object.resource_version(),
                        }),
                        ..Default::default()
                    };
                    match api.delete(&name, &params).await {
                        Ok(_) => {
                            tracing::info!(approval = %name, %namespace, "decided approval deleted (retention passed)")
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                        Err(error) => {
                            tracing::warn!(approval = %name, %namespace, %error, "deleting a decided approval failed")
                        }
                    }
                }
            }
        }
    }

    fn close_stream(&self, stream: StreamId) {
        let mut state = self.lock();
        state.book.close_stream(stream);
        state.streams.remove(&stream);
    }
}

impl ApprovalStream {
    /// Handles a checked request (in the background: it calls the API
    /// server); its answers go out on this stream.
    pub fn request(&self, call: ApprovalCall) {
        let desk = Arc::clone(&self.desk);
        tokio::spawn(desk.request(self.id, Arc::clone(&self.identity), call));
    }

    /// The sidecar stopped waiting on `ticket`: an approval is no longer
    /// consumed for it.
    pub fn release(&self, ticket: u64) {
        self.desk.lock().book.close(TicketKey {
            stream: self.id,
            ticket,
        });
    }

    /// Answers `ticket` FAILED at once: the request could not be used.
    pub fn refuse(&self, ticket: u64, error: &InvalidApprovalRequest) {
        let state = self.desk.lock();
        let answer = ApprovalAnswer::failed(ticket, "", "InvalidRequest", error.to_string());
        self.desk.send(&state, self.id, &answer);
    }
}

impl Drop for ApprovalStream {
    fn drop(&mut self) {
        self.desk.close_stream(self.id);
    }
}

impl ApprovalDesk {
    /// How many ToolCallApprovals the watch holds, by where each stands at
    /// `now`: every phase, zeros included (for `chaperone_controller_approvals`).
    pub fn count_by_phase(&self, now: Timestamp) -> [(&'static str, usize); 5] {
        let mut counts = [
            ("pending", 0),
            ("approved", 0),
            ("consumed", 0),
            ("denied", 0),
            ("expired", 0),
        ];
        for object in self.store.state() {
            let slot = match standing(&object, now) {
                Standing::Pending { .. } => 0,
                Standing::Approved { .. } => 1,
                Standing::Consumed { .. } => 2,
                Standing::Denied { .. } => 3,
                Standing::Expired { .. } => 4,
            };
            counts[slot].1 += 1;
        }
        counts
    }
}
