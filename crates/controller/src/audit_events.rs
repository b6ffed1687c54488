//! Audit batches from sidecars turned into Kubernetes Events (events.k8s.io/v1):
//! every denial a Warning on the Pod and on the AgentIdentity (`ToolCallDenied`,
//! or `ToolCallWouldDeny` in dryRun), allowed calls summarised per agent per
//! minute (`ToolCallsAllowed`). Event creation is rate-limited so a flood of
//! denials cannot overload the API server; what is suppressed or dropped is
//! counted in metrics and in the next summary, never silent.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use chaperone_api::AgentIdentity;
use chaperone_policy::AgentKey;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{auth::SidecarIdentity, metrics::Metrics};

/// Longest Event note the API server accepts.
const MAX_NOTE: usize = 1024;
/// Longest Event action the API server accepts.
const MAX_ACTION: usize = 128;
/// How often allowed calls are summarised.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// The fields of an audit record that Events show.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AuditFields {
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
    /// Not a decision record this reads.
    Unreadable,
}

/// Classifies one JSON audit line.
pub fn classify(record: &str) -> AuditOutcome {
    let Ok(fields) = serde_json::from_str::<AuditFields>(record) else {
        return AuditOutcome::Unreadable;
    };
    let reason = match fields.decision.as_str() {
        "allow" => {
            return AuditOutcome::Allowed {
                tool: format!("{}/{}", fields.server, fields.tool),
            };
        }
        "deny" => "ToolCallDenied",
        "wouldDeny" => "ToolCallWouldDeny",
        _ => return AuditOutcome::Unreadable,
    };
    let chain = if fields.chain.is_empty() {
        "none".to_owned()
    } else {
        fields.chain.join(" -> ")
    };
    let mut note = format!(
        "tool {}/{} denied by {}: {} (session {}, chain {}, correlation {})",
        fields.server,
        fields.tool,
        fields.rule,
        fields.reason,
        fields.session.chaperone,
        chain,
        fields.correlation
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

struct Batch {
    identity: SidecarIdentity,
    records: Vec<String>,
}

/// Per-agent counts between two summaries.
#[derive(Default)]
struct Summary {
    allowed: u64,
    tools: BTreeSet<String>,
    suppressed_denials: u64,
}

/// Accepts audit batches from the snapshot streams and writes Events.
pub struct AuditEvents {
    tx: mpsc::Sender<Batch>,
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
    pub fn submit(&self, identity: &SidecarIdentity, records: Vec<String>) {
        let count = records.len() as u64;
        if self
            .tx
            .try_send(Batch {
                identity: identity.clone(),
                records,
            })
            .is_err()
        {
            self.metrics.events_dropped(count);
        }
    }
}

async fn run(
    client: Client,
    recorder: Recorder,
    mut rx: mpsc::Receiver<Batch>,
    metrics: Arc<Metrics>,
) {
    let mut budget = EventBudget::new(20.0, 100.0);
    let mut summaries: BTreeMap<AgentKey, Summary> = BTreeMap::new();
    let mut uids: HashMap<AgentKey, String> = HashMap::new();
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { return };
                for record in &batch.records {
                    match classify(record) {
                        AuditOutcome::Allowed { tool } => {
                            let summary = summaries.entry(batch.identity.agent.clone()).or_default();
                            summary.allowed += 1;
                            if summary.tools.len() < 20 {
                                summary.tools.insert(tool);
                            }
                        }
                        AuditOutcome::Denied { reason, action, note } => {
                            if !budget.try_take(2.0, Instant::now()) {
                                summaries.entry(batch.identity.agent.clone()).or_default().suppressed_denials += 1;
                                metrics.events_suppressed(1);
                                continue;
                            }
                            let event = Event { type_: EventType::Warning, reason: reason.into(), note: Some(note), action, secondary: None };
                            let agent_ref = agent_reference(&client, &mut uids, &batch.identity.agent).await;
                            publish(&recorder, &metrics, &event, &pod_reference(&batch.identity)).await;
                            publish(&recorder, &metrics, &event, &agent_ref).await;
                        }
                        AuditOutcome::Unreadable => metrics.audit_unreadable(),
                    }
                }
            }
            _ = tick.tick() => {
                for (agent, summary) in std::mem::take(&mut summaries) {
                    if summary.allowed == 0 && summary.suppressed_denials == 0 {
                        continue;
                    }
                    let mut note = format!(
                        "{} tool calls allowed in the last minute ({}); {} denials not shown as separate Events (rate limit)",
                        summary.allowed,
                        summary.tools.iter().cloned().collect::<Vec<_>>().join(", "),
                        summary.suppressed_denials
                    );
                    truncate(&mut note, MAX_NOTE);
                    let event = Event { type_: EventType::Normal, reason: "ToolCallsAllowed".into(), note: Some(note), action: "Authorize".into(), secondary: None };
                    let agent_ref = agent_reference(&client, &mut uids, &agent).await;
                    publish(&recorder, &metrics, &event, &agent_ref).await;
                }
            }
        }
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

fn pod_reference(identity: &SidecarIdentity) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(identity.pod.clone()),
        namespace: Some(identity.agent.namespace.clone()),
        uid: Some(identity.pod_uid.clone()),
        ..Default::default()
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
mod tests {
    use super::*;

    #[test]
    fn denials_name_tool_rule_session_and_chain() {
        let record = r#"{"decision":"deny","rule":"support/no-refunds","server":"orders","tool":"refund","reason":"a deny rule matched","correlation":"c1","chain":["ns/planner","ns/worker"],"session":{"chaperone":"s1","mcp":""}}"#;
        let AuditOutcome::Denied {
            reason,
            action,
            note,
        } = classify(record)
        else {
            panic!("not a denial")
        };
        assert_eq!(reason, "ToolCallDenied");
        assert_eq!(action, "Call orders/refund (support/no-refunds)");
        for part in [
            "orders/refund",
            "support/no-refunds",
            "session s1",
            "ns/planner -> ns/worker",
            "c1",
        ] {
            assert!(note.contains(part), "{note} lacks {part}");
        }
    }

    #[test]
    fn dry_run_denials_and_allows_are_told_apart() {
        assert!(matches!(
            classify(r#"{"decision":"wouldDeny"}"#),
            AuditOutcome::Denied {
                reason: "ToolCallWouldDeny",
                ..
            }
        ));
        assert_eq!(
            classify(r#"{"decision":"allow","server":"a","tool":"b"}"#),
            AuditOutcome::Allowed { tool: "a/b".into() }
        );
        assert_eq!(classify("not json"), AuditOutcome::Unreadable);
        assert_eq!(
            classify(r#"{"decision":"maybe"}"#),
            AuditOutcome::Unreadable
        );
    }

    #[test]
    fn long_notes_are_cut_at_a_character_boundary() {
        let mut text = "é".repeat(600);
        truncate(&mut text, MAX_NOTE);
        assert!(text.len() <= MAX_NOTE && text.ends_with("..."));
    }

    #[test]
    fn the_budget_limits_bursts_and_refills() {
        let start = Instant::now();
        let mut budget = EventBudget::new(10.0, 4.0);
        assert!((0..4).all(|_| budget.try_take(1.0, start)));
        assert!(!budget.try_take(1.0, start));
        assert!(budget.try_take(1.0, start + Duration::from_millis(150)));
    }
}
