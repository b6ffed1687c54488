//! The controller's Prometheus metrics (served at /metrics on the admin port).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of refused streams.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// Labels of per-agent gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    namespace: String,
    agent: String,
}

/// Labels of approval answers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

/// Every metric of the controller.
pub struct Metrics {
    registry: Mutex<Registry>,
    index_updates: Counter,
    status_patches: Counter,
    status_errors: Counter,
    sidecars_connected: Gauge,
    tool_sidecars_connected: Gauge,
    streams_refused: Family<CodeLabel, Counter>,
    snapshot_version: Gauge,
    push_latency: Histogram,
    nacks: Counter,
    audit_records: Counter,
    audit_dropped: Counter,
    audit_unreadable: Counter,
    events_published: Counter,
    allowed_summarised: Counter,
    events_suppressed: Counter,
    events_dropped: Counter,
    approvals_created: Counter,
    approval_answers: Family<PhaseLabel, Counter>,
    tools_blocked: Family<AgentLabel, Gauge>,
    tool_definition_changes: Counter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("chaperone_controller");
        let metrics = Self {
            index_updates: Counter::default(),
            status_patches: Counter::default(),
            status_errors: Counter::default(),
            sidecars_connected: Gauge::default(),
            tool_sidecars_connected: Gauge::default(),
            streams_refused: Family::default(),
            snapshot_version: Gauge::default(),
            push_latency: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            nacks: Counter::default(),
            audit_records: Counter::default(),
            audit_dropped: Counter::default(),
            audit_unreadable: Counter::default(),
            events_published: Counter::default(),
            allowed_summarised: Counter::default(),
            events_suppressed: Counter::default(),
            approvals_created: Counter::default(),
            approval_answers: Family::default(),
            events_dropped: Counter::default(),
            tools_blocked: Family::default(),
            tool_definition_changes: Counter::default(),
            registry: Mutex::new(Registry::default()),
        };
        registry.register(
            "index_updates",
            "Changes that altered the index (watch events and expiry recomputes; an unchanged object coming back, such as our own status write, is not counted)",
            metrics.index_updates.clone(),
        );
        registry.register(
            "status_patches",
            "Status patches written",
            metrics.status_patches.clone(),
        );
        registry.register(
            "status_errors",
            "Status patches that failed",
            metrics.status_errors.clone(),
        );
        registry.register(
            "sidecars_connected",
            "Agent sidecar streams open on this replica",
            metrics.sidecars_connected.clone(),
        );
        registry.register(
            "tool_sidecars_connected",
            "Tool-mode sidecar streams (key set only) open on this replica",
            metrics.tool_sidecars_connected.clone(),
        );
        registry.register(
            "streams_refused",
            "Sidecar streams refused, by gRPC code",
            metrics.streams_refused.clone(),
        );
        registry.register(
            "snapshot_version",
            "Highest snapshot version published by the index (versions start from the wall clock in milliseconds)",
            metrics.snapshot_version.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "From sending a snapshot to the sidecar's ACK",
            metrics.push_latency.clone(),
        );
        registry.register(
            "snapshot_nacks",
            "Snapshots sidecars rejected",
            metrics.nacks.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records received from sidecars",
            metrics.audit_records.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit records sidecars reported as dropped (queue full)",
            metrics.audit_dropped.clone(),
        );
        registry.register(
            "audit_unreadable",
            "Audit records that were not decision records",
            metrics.audit_unreadable.clone(),
        );
        registry.register(
            "events_published",
            "Kubernetes Events written from audit records",
            metrics.events_published.clone(),
        );
        registry.register(
            "audit_allowed_summarised",
            "Allowed calls counted into ToolCallsAllowed summaries instead of Events of their own",
            metrics.allowed_summarised.clone(),
        );
        registry.register(
            "events_suppressed",
            "Denials not written as separate Events because of the Event rate limit (counted in the summaries)",
            metrics.events_suppressed.clone(),
        );
        registry.register(
            "events_dropped",
            "Audit records or Events lost (queue full or API error)",
            metrics.events_dropped.clone(),
        );
        registry.register(
            "approvals_created",
            "ToolCallApprovals created for sidecars' approval requests",
            metrics.approvals_created.clone(),
        );
        registry.register(
            "approval_answers",
            "ApprovalStatus answers sent to sidecars, by phase",
            metrics.approval_answers.clone(),
        );
        registry.register(
            "tools_blocked",
            "Governed tools that tool definition pinning blocks (enforce: definition not matching its pin), per agent (written by the leader)",
            metrics.tools_blocked.clone(),
        );
        registry.register(
            "tool_definition_changes",
            "Tool definition changes reported as ToolDefinitionChanged Events (written by the leader)",
            metrics.tool_definition_changes.clone(),
        );
        *metrics.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        Arc::new(metrics)
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = encode(&mut out, &registry);
        out
    }

    /// A change altered the index; `highest_version` is the highest snapshot
    /// version it has published so far.
    pub fn index_updated(&self, highest_version: u64) {
        self.index_updates.inc();
        self.snapshot_version
            .set(i64::try_from(highest_version).unwrap_or(i64::MAX));
    }

    /// A status patch was written (or failed).
    pub fn status_patched(&self, ok: bool) {
        if ok {
            self.status_patches.inc()
        } else {
            self.status_errors.inc()
        };
    }

    /// A stream was refused with `code`.
    pub fn stream_refused(&self, code: tonic::Code) {
        self.streams_refused
            .get_or_create(&CodeLabel {
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// A sidecar connected; the gauge goes down when the guard drops.
    pub fn sidecar_connected(self: &Arc<Self>) -> GaugeGuard {
        self.sidecars_connected.inc();
        GaugeGuard(self.sidecars_connected.clone())
    }

    /// A tool-mode sidecar connected; the gauge goes down when the guard drops.
    pub fn tool_sidecar_connected(self: &Arc<Self>) -> GaugeGuard {
        self.tool_sidecars_connected.inc();
        GaugeGuard(self.tool_sidecars_connected.clone())
    }

    /// A sidecar acknowledged `version` `elapsed` after it was sent.
    pub fn push_acked(&self, _version: u64, elapsed: Duration) {
        self.push_latency.observe(elapsed.as_secs_f64());
    }

    /// A sidecar rejected a snapshot.
    pub fn push_rejected(&self) {
        self.nacks.inc();
    }

    /// An audit batch arrived.
    pub fn audit_received(&self, records: u64, dropped: u64) {
        self.audit_records.inc_by(records);
        self.audit_dropped.inc_by(dropped);
    }
}

/// Decrements its gauge when dropped (a connection counted while it lasts).
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// An Event was written.
    pub fn event_published(&self) {
        self.events_published.inc();
    }

    /// Allowed calls counted into a summary.
    pub fn allowed_summarised(&self, n: u64) {
        self.allowed_summarised.inc_by(n);
    }

    /// Denials summarised instead of written as Events.
    pub fn events_suppressed(&self, n: u64) {
        self.events_suppressed.inc_by(n);
    }

    /// Audit records or Events lost.
    pub fn events_dropped(&self, n: u64) {
        self.events_dropped.inc_by(n);
    }

    /// An audit record that is not a decision record.
    pub fn audit_unreadable(&self) {
        self.audit_unreadable.inc();
    }
}

impl Metrics {
    /// A ToolCallApproval was created.
    pub fn approval_created(&self) {
        self.approvals_created.inc();
    }

    /// An ApprovalStatus went out with `phase` (`pending`, `granted`, …).
    pub fn approval_answered(&self, phase: &'static str) {
        self.approval_answers
            .get_or_create(&PhaseLabel { phase })
            .inc();
    }
}

impl Metrics {
    /// `agent` has `blocked` tools blocked by pinning; `None`: the agent is
    /// gone.
    pub fn tools_blocked(&self, agent: &chaperone_policy::AgentKey, blocked: Option<i64>) {
        let labels = AgentLabel {
            namespace: agent.namespace.clone(),
            agent: agent.name.clone(),
        };
        match blocked {
            Some(n) => {
                self.tools_blocked.get_or_create(&labels).set(n);
            }
            None => {
                self.tools_blocked.remove(&labels);
            }
        }
    }

    /// A `ToolDefinitionChanged` Event was queued.
    pub fn tool_definition_changed(&self) {
        self.tool_definition_changes.inc();
    }
}
