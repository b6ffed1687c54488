//! Audit batches from sidecars turned into Kubernetes Events (events.k8s.io/v1):
//! every denial a Warning on the Pod and on the AgentIdentity (`ToolCallDenied`,
//! or `ToolCallWouldDeny` in dryRun) naming the tool, the rule, the session and
//! the delegation chain; allowed calls summarised per agent per minute
//! (`ToolCallsAllowed`, with counts per tool). Event creation is rate-limited so
//! a flood of denials cannot overload the API server; what is summarised,
//! suppressed or dropped is counted in metrics (and suppressed denials in the
//! next summary), never silent.
//!
//! The approval flow's Events (ApprovalRequested, ApprovalGranted, …) go
//! through the same writer ([`AuditEvents::record`]), on the Pod and the
//! AgentIdentity; they are not rate-limited (there is at most one of each per
//! ToolCallApproval, and the number of those waiting per agent is capped).
//!
//! Tool-mode sidecars have no AgentIdentity: their denials and summaries go on
//! their Pod only. The audit trail's signed checkpoints (`kind` `checkpoint`)
//! come in the same batches; they are for offline verification and make no
//! Event.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use chaperone_api::AgentIdentity;
use chaperone_policy::AgentKey;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Api, Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::{
    auth::{SidecarIdentity, ToolSidecarIdentity},
    metrics::Metrics,
};

/// Longest Event note the API server accepts.
const MAX_NOTE: usize = 1024;
/// Longest Event action the API server accepts.
const MAX_ACTION: usize = 128;
/// How often allowed calls are summarised.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// Distinct tools a summary counts by name; the rest are counted as "others".
const SUMMARY_TOOLS: usize = 20;

/// The fields of an audit record that Events show.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AuditFields {
    /// Absent for a decision; `checkpoint` for a checkpoint of the trail.
    pub kind: String,
    /// `allow`, `deny` or `wouldDeny`.
    pub decision: String,
    /// The deciding rule.
    pub rule: String,
    /// Tool server.
    pub server: String,
    /// Tool.
    pub tool: String,
    /// Why.
    pub reason: String,
    /// Correlation id (also in the denied call's error).
    pub correlation: String,
    /// Delegation chain, origin first.
    pub chain: Vec<String>,
    /// Session ids.
    pub session: AuditSessionFields,
}

/// Session ids of an audit record.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AuditSessionFields {
    /// Chaperone session id.
    pub chaperone: String,
}

/// What one audit record turns into. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditOutcome {
    /// A denial (or would-deny): Warning Events with this reason and note.
    Denied {
        /// `ToolCallDenied` or `ToolCallWouldDeny`.
        reason: &'static str,
        /// The Event action: the tool and the deciding rule. The API server (and
        /// kube's recorder) fold Events with the same action into one series with
        /// a count, so repeats of one denial do not flood, and different denials
        /// stay apart.
        action: String,
        /// The Event note.
        note: String,
    },
    /// An allowed call, counted into the summary.
    Allowed {
        /// `server/tool`.
        tool: String,
    },
    /// A checkpoint of the sidecar's audit trail: nothing to show.
    Checkpoint,
    /// Not a decision record this reads.
    Unreadable,
}

/// Classifies one JSON audit line.
pub fn classify(record: &str) -> AuditOutcome {
    let Ok(fields) = serde_json::from_str::<AuditFields>(record) else {
        return AuditOutcome::Unreadable;
    };
    if fields.kind == "checkpoint" {
        return AuditOutcome::Checkpoint;
    }
    let (reason, verdict) = match fields.decision.as_str() {
        "allow" => {
            return AuditOutcome::Allowed {
                tool: format!("{}/{}", fields.server, fields.tool),
            };
        }
        "deny" => ("ToolCallDenied", "denied"),
        "wouldDeny" => ("ToolCallWouldDeny", "would be denied (dryRun: forwarded)"),
        // Held for a person's approval and refused (pending at the end of
        // the hold, denied, expired); the ToolCallApproval has its own Events.
        "approval" => ("ToolCallNotApproved", "was refused for want of approval"),
        "wouldRequireApproval" => (
            "ToolCallWouldRequireApproval",
            "would need a person's approval (dryRun: forwarded)",
        ),
        _ => return AuditOutcome::Unreadable,
    };
    let or_none = |text: &str| {
        if text.is_empty() {
            "none".to_owned()
        } else {
            text.to_owned()
        }
    };
    // Origin first; an empty chain is the agent's own session.
    let chain = if fields.chain.is_empty() {
        "none (own session)".to_owned()
    } else {
        fields.chain.join(" → ")
    };
    // Rules are `policy/rule`; anything else is a fixed reason of the engine
    // or the sidecar (`no rule allows`, `session.maxCalls`, …), not a rule name.
    let decided_by = if fields.rule.contains('/') {
        format!("by rule {}", fields.rule)
    } else {
        format!("({})", or_none(&fields.rule))
    };
    let mut note = format!(
        "tool {}/{} {verdict} {decided_by}: {}; session {}; chain: {chain}; correlation {}",
        fields.server,
        fields.tool,
        fields.reason,
        or_none(&fields.session.chaperone),
        or_none(&fields.correlation),
    );
    truncate(&mut note, MAX_NOTE);
    let mut action = format!("Call {}/{} ({})", fields.server, fields.tool, fields.rule);
    truncate(&mut action, MAX_ACTION);
    AuditOutcome::Denied {
        reason,
        action,
        note,
    }
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
}

/// A token bucket: at most `rate` Events per second, bursts of `burst`.
#[derive(Debug)]
pub struct EventBudget {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl EventBudget {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            rate,
            burst,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens at `now` if there are enough.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// The sidecar a batch of audit records came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditSource {
    /// An agent's sidecar: Events on its Pod and its AgentIdentity.
    Agent(SidecarIdentity),
    /// A tool-mode sidecar: Events on its Pod only (it has no AgentIdentity).
    Tool(ToolSidecarIdentity),
}

impl AuditSource {
    /// (namespace, pod, pod uid).
    fn pod(&self) -> PodKey {
        let (namespace, pod, uid) = match self {
            AuditSource::Agent(s) => (&s.agent.namespace, &s.pod, &s.pod_uid),
            AuditSource::Tool(s) => (&s.namespace, &s.pod, &s.pod_uid),
        };
        (namespace.clone(), pod.clone(), uid.clone())
    }

    /// What its allowed calls are summarised on.
    fn summary_target(&self) -> SummaryTarget {
        match self {
            AuditSource::Agent(s) => SummaryTarget::Agent(s.agent.clone()),
            AuditSource::Tool(_) => SummaryTarget::Pod(self.pod()),
        }
    }
}

/// (namespace, pod, uid).
type PodKey = (String, String, String);

/// Where a summary Event goes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SummaryTarget {
    /// An AgentIdentity.
    Agent(AgentKey),
    /// A tool-mode sidecar's Pod.
    Pod(PodKey),
}

struct Batch {
    source: AuditSource,
    records: Vec<String>,
}

/// An Event about an agent's call that does not come from an audit batch
/// (the approval flow): written on the agent's Pod and its AgentIdentity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCallEvent {
    /// The AgentIdentity.
    pub agent: AgentKey,
    /// The pod (same namespace).
    pub pod: String,
    /// The pod's uid; `None`: looked up (a pod that is gone gets no Event).
    pub pod_uid: Option<String>,
    /// Warning (`true`) or Normal.
    pub warning: bool,
    /// The Event reason.
    pub reason: &'static str,
    /// The Event action (at most 128 bytes; longer is cut).
    pub action: String,
    /// The Event note (at most 1024 bytes; longer is cut).
    pub note: String,
}

/// What the Event writer works on.
enum Job {
    Batch(Batch),
    Event(AgentCallEvent),
    /// Publish the summaries gathered so far, then answer.
    Flush(oneshot::Sender<()>),
}

/// Counts between two summaries of one agent (or tool pod). Pure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Allowed calls.
    pub allowed: u64,
    /// Allowed calls per `server/tool`, for the first 20 tools.
    pub tools: BTreeMap<String, u64>,
    /// Allowed calls of further tools.
    pub other_tools: u64,
    /// Denials not written as Events of their own (rate limit).
    pub suppressed_denials: u64,
}

impl Summary {
    /// Counts one allowed call of `tool`.
    pub fn allowed(&mut self, tool: String) {
        self.allowed += 1;
        if let Some(count) = self.tools.get_mut(&tool) {
            *count += 1;
        } else if self.tools.len() < SUMMARY_TOOLS {
            self.tools.insert(tool, 1);
        } else {
            self.other_tools += 1;
        }
    }

    /// The `ToolCallsAllowed` note, or `None` when there is nothing to say.
    pub fn note(&self) -> Option<String> {
        if self.allowed == 0 && self.suppressed_denials == 0 {
            return None;
        }
        let mut counts: Vec<String> = self
            .tools
            .iter()
            .map(|(tool, n)| format!("{tool} {n}"))
            .collect();
        if self.other_tools > 0 {
            counts.push(format!("others {}", self.other_tools));
        }
        let mut note = format!(
            "{} tool calls allowed in the last {} s{}{}; {} denials not shown as Events of their own (rate limit)",
            self.allowed,
            SUMMARY_INTERVAL.as_secs(),
            if counts.is_empty() { "" } else { ": " },
            counts.join(", "),
            self.suppressed_denials
        );
        truncate(&mut note, MAX_NOTE);
        Some(note)
    }
}

/// Accepts audit batches from the snapshot streams and writes Events.
pub struct AuditEvents {
    tx: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl AuditEvents {
    /// Starts the Event writer.
    pub fn spawn(client: Client, reporter_instance: String, metrics: Arc<Metrics>) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(1024);
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "chaperone-controller".into(),
                instance: Some(reporter_instance),
            },
        );
        tokio::spawn(run(client, recorder, rx, metrics.clone()));
        Arc::new(Self { tx, metrics })
    }

    /// Queues a sidecar's batch; a full queue drops it and counts the records.
    pub fn submit(&self, source: AuditSource, records: Vec<String>) {
        let count = records.len() as u64;
        if self
            .tx
            .try_send(Job::Batch(Batch { source, records }))
            .is_err()
        {
            self.metrics.events_dropped(count);
            tracing::warn!(
                records = count,
                "the Event writer's queue is full; audit records dropped (counted in events_dropped)"
            );
        }
    }
}

impl AuditEvents {
    /// Waits until everything queued before it is written, the summaries of
    /// the allowed calls so far included (for a stopping controller: they
    /// would otherwise wait for the next [`SUMMARY_INTERVAL`]). Bound it
    /// with a timeout: Event writes can be slow.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Job::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// Queues an Event about an agent's call; a full queue drops it and
    /// counts it.
    pub fn record(&self, event: AgentCallEvent) {
        let reason = event.reason;
        if self.tx.try_send(Job::Event(event)).is_err() {
            self.metrics.events_dropped(1);
            tracing::warn!(
                reason,
                "the Event writer's queue is full; an Event was dropped (counted in events_dropped)"
            );
        }
    }
}

async fn run(
    client: Client,
    recorder: Recorder,
    mut rx: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let mut budget = EventBudget::new(20.0, 100.0);
    let mut summaries: BTreeMap<SummaryTarget, Summary> = BTreeMap::new();
    let mut uids: HashMap<AgentKey, String> = HashMap::new();
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            job = rx.recv() => {
                let batch = match job {
                    None => return,
                    Some(Job::Batch(batch)) => batch,
                    Some(Job::Event(event)) => {
                        publish_agent_event(&client, &recorder, &metrics, &mut uids, event).await;
                        continue;
                    }
                    Some(Job::Flush(done)) => {
                        publish_summaries(&client, &recorder, &metrics, &mut uids, &mut summaries).await;
                        let _ = done.send(());
                        continue;
                    }
                };
                let target = batch.source.summary_target();
                for record in &batch.records {
                    match classify(record) {
                        AuditOutcome::Allowed { tool } => {
                            summaries.entry(target.clone()).or_default().allowed(tool);
                            metrics.allowed_summarised(1);
                        }
                        AuditOutcome::Denied { reason, action, note } => {
                            // One Event per object it is written on.
                            let cost = match &batch.source {
                                AuditSource::Agent(_) => 2.0,
                                AuditSource::Tool(_) => 1.0,
                            };
                            if !budget.try_take(cost, Instant::now()) {
                                summaries.entry(target.clone()).or_default().suppressed_denials += 1;
                                metrics.events_suppressed(1);
                                continue;
                            }
                            let event = Event { type_: EventType::Warning, reason: reason.into(), note: Some(note), action, secondary: None };
                            publish(&recorder, &metrics, &event, &pod_reference(&batch.source.pod())).await;
                            if let AuditSource::Agent(identity) = &batch.source {
                                let agent_ref = agent_reference(&client, &mut uids, &identity.agent).await;
                                publish(&recorder, &metrics, &event, &agent_ref).await;
                            }
                        }
                        AuditOutcome::Checkpoint => {}
                        AuditOutcome::Unreadable => metrics.audit_unreadable(),
                    }
                }
            }
            _ = tick.tick() => {
                publish_summaries(&client, &recorder, &metrics, &mut uids, &mut summaries).await;
            }
        }
    }
}

/// Writes the summaries gathered since the last ones (`ToolCallsAllowed`) and
/// starts new ones.
async fn publish_summaries(
    client: &Client,
    recorder: &Recorder,
    metrics: &Metrics,
    uids: &mut HashMap<AgentKey, String>,
    summaries: &mut BTreeMap<SummaryTarget, Summary>,
) {
    for (target, summary) in std::mem::take(summaries) {
        let Some(note) = summary.note() else { continue };
        let event = Event {
            type_: EventType::Normal,
            reason: "ToolCallsAllowed".into(),
            note: Some(note),
            action: "Authorize".into(),
            secondary: None,
        };
        let reference = match &target {
            SummaryTarget::Agent(agent) => agent_reference(client, uids, agent).await,
            SummaryTarget::Pod(pod) => pod_reference(pod),
        };
        publish(recorder, metrics, &event, &reference).await;
    }
}

/// Writes `event` on its Pod (when it still exists) and its AgentIdentity.
async fn publish_agent_event(
    client: &Client,
    recorder: &Recorder,
    metrics: &Metrics,
    uids: &mut HashMap<AgentKey, String>,
    event: AgentCallEvent,
) {
    let AgentCallEvent {
        agent,
        pod,
        pod_uid,
        warning,
        reason,
        mut action,
        mut note,
    } = event;
    truncate(&mut action, MAX_ACTION);
    truncate(&mut note, MAX_NOTE);
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action,
        secondary: None,
    };
    let pod_uid = match pod_uid {
        Some(uid) => Some(uid),
        None => Api::<Pod>::namespaced(client.clone(), &agent.namespace)
            .get_metadata_opt(&pod)
            .await
            .ok()
            .flatten()
            .and_then(|p| p.metadata.uid),
    };
    if let Some(uid) = pod_uid {
        let key = (agent.namespace.clone(), pod, uid);
        publish(recorder, metrics, &event, &pod_reference(&key)).await;
    }
    let agent_ref = agent_reference(client, uids, &agent).await;
    publish(recorder, metrics, &event, &agent_ref).await;
}

fn pod_reference((namespace, pod, uid): &PodKey) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.clone()),
        namespace: Some(namespace.clone()),
        uid: Some(uid.clone()),
        ..Default::default()
    }
}

async fn publish(
    recorder: &Recorder,
    metrics: &Metrics,
    event: &Event,
    reference: &ObjectReference,
) {
    match recorder.publish(event, reference).await {
        Ok(()) => metrics.event_published(),
        Err(error) => {
            metrics.events_dropped(1);
            tracing::warn!(%error, reason = %event.reason, "writing an Event failed");
        }
    }
}

/// The AgentIdentity's reference, with its uid (so `kubectl describe` finds the
/// Event); the uid is looked up once per agent.
async fn agent_reference(
    client: &Client,
    uids: &mut HashMap<AgentKey, String>,
    agent: &AgentKey,
) -> ObjectReference {
    if !uids.contains_key(agent) {
        let api: Api<AgentIdentity> = Api::namespaced(client.clone(), &agent.namespace);
        if let Ok(Some(object)) = api.get_opt(&agent.name).await
            && let Some(uid) = object.metadata.uid
        {
            uids.insert(agent.clone(), uid);
        }
    }
    ObjectReference {
        api_version: Some(chaperone_policy::model::API_VERSION.into()),
        kind: Some("AgentIdentity".into()),
        name: Some(agent.name.clone()),
        namespace: Some(agent.namespace.clone()),
        uid: uids.get(agent).cloned(),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "audit_events_tests.rs"]
mod tests;
