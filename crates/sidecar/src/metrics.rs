//! Prometheus metrics of the sidecar, served on the admin port at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label of a decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny`, `wouldDeny`, `approval` or `wouldRequireApproval`.
    pub result: &'static str,
}

/// Label of the approval outcome counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApprovalLabels {
    /// `granted`, `denied`, `expired`, `failed`, `pending` (nobody decided
    /// within the hold time), `lost` (the controller stream ended),
    /// `unavailable` (no controller stream) or `not_held` (in a batch, or a
    /// notification).
    pub outcome: &'static str,
}

/// Labels of the tool definition pinning counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PinningLabels {
    /// `call` (a call refused) or `listed` (a tool hidden from a list).
    pub blocked: &'static str,
    /// `changed`, `unpinned`, `conflicting` or `unseen`.
    pub reason: &'static str,
}

/// Label of a refused-request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The refusal's kind.
    pub reason: &'static str,
}

/// Label of the per-listener connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `proxy` (the agent's side) or `inbound`.
    pub listener: &'static str,
}

/// Labels of a connection closed by a timeout.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionTimeoutLabels {
    /// `proxy` or `inbound`.
    pub listener: &'static str,
    /// `header` (a request's head too slow), `idle` (no request in flight for
    /// too long) or `keepalive` (an HTTP/2 peer that stopped answering pings).
    pub timeout: &'static str,
}

/// Every metric the sidecar exports.
#[derive(Debug)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Decisions by result.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Time to decide a call, seconds.
    pub decision_seconds: Histogram,
    /// Time from forwarding to the upstream's response headers, seconds.
    pub upstream_seconds: Histogram,
    /// Version of the snapshot in force (0: none).
    pub snapshot_version: Gauge,
    /// Sessions held.
    pub sessions: Gauge,
    /// Audit records dropped from the full shipping queue.
    pub audit_dropped: Counter,
    /// Requests refused before any decision (parse errors, limits, no snapshot).
    pub refused: Family<RefusalLabels, Counter>,
    /// Calls held for a person's approval, by how the hold ended.
    pub approvals: Family<ApprovalLabels, Counter>,
    /// Connections open now, per listener.
    pub connections_open: Family<ListenerLabels, Gauge>,
    /// Connections closed at once because the listener held its maximum.
    pub connections_refused: Family<ListenerLabels, Counter>,
    /// Connections closed by a timeout, per listener and timeout.
    pub connections_timed_out: Family<ConnectionTimeoutLabels, Counter>,
    /// Calls refused and tools hidden because a tool's definition does not
    /// match its pin (`enforce`), by reason.
    pub tool_pinning_blocked: Family<PinningLabels, Counter>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chaperone_sidecar");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Tool-call decisions by result",
            decisions.clone(),
        );
        let decision_seconds = Histogram::new([5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2]);
        registry.register(
            "decision_seconds",
            "Time to decide a tool call",
            decision_seconds.clone(),
        );
        let upstream_seconds =
            Histogram::new([1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "upstream_seconds",
            "Time from forwarding a request to the upstream's response headers",
            upstream_seconds.clone(),
        );
        let snapshot_version = Gauge::default();
        registry.register(
            "snapshot_version",
            "Version of the policy snapshot in force (0: none yet)",
            snapshot_version.clone(),
        );
        let sessions = Gauge::default();
        registry.register("sessions", "MCP sessions held", sessions.clone());
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit records dropped because the shipping queue was full",
            audit_dropped.clone(),
        );
        let refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests refused before a decision, by reason",
            refused.clone(),
        );
        let approvals = Family::<ApprovalLabels, Counter>::default();
        registry.register(
            "approvals",
            "Calls that needed a person's approval, by outcome",
            approvals.clone(),
        );
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Connections open now, per listener",
            connections_open.clone(),
        );
        let connections_refused = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed on accept because the listener held its maximum",
            connections_refused.clone(),
        );
        let connections_timed_out = Family::<ConnectionTimeoutLabels, Counter>::default();
        registry.register(
            "connections_timed_out",
            "Connections closed by a timeout, per listener and timeout (header, idle, keepalive)",
            connections_timed_out.clone(),
        );
        let tool_pinning_blocked = Family::<PinningLabels, Counter>::default();
        registry.register(
            "tool_pinning_blocked",
            "Calls refused (blocked=call) and tools hidden from lists (blocked=listed) because a tool's definition does not match its pin, by reason",
            tool_pinning_blocked.clone(),
        );
        Self {
            registry,
            decisions,
            decision_seconds,
            upstream_seconds,
            snapshot_version,
            sessions,
            audit_dropped,
            refused,
            approvals,
            connections_open,
            connections_refused,
            connections_timed_out,
            tool_pinning_blocked,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
