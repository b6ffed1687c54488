//! The controller's Prometheus metrics (served at /metrics on the admin port).
//!
//! Counters and histograms are updated where things happen. Gauges of what
//! exists (connected sidecars, per agent and in sync; ToolCallApprovals by
//! phase) are not kept by `inc`/`dec` pairs: [`SidecarGauges`] and
//! [`ApprovalGauges`] read the one record of that state (the sidecar
//! registry, the index, the approvals' watch cache) at each scrape, so they
//! are exact by construction and a deleted agent's series go with it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{approvals::ApprovalDesk, index::SharedIndex, sidecars::SidecarRegistry};

/// The prefix of every controller metric but `chaperone_build_info`.
const PREFIX: &str = "chaperone_controller";

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

/// Labels of approval answers and of approvals by phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

/// Labels of reconciles.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    kind: &'static str,
    result: &'static str,
}

/// Labels of reconcile durations and watch errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Labels of snapshot pushes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// How one snapshot sent to a sidecar ended: each push is counted once, by
/// the first of these that happens to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushResult {
    /// The sidecar acknowledged it.
    Ack,
    /// The sidecar rejected it.
    Nack,
    /// A newer snapshot went out on the stream before the sidecar answered.
    Superseded,
    /// The stream ended before the sidecar answered.
    Unanswered,
}

impl PushResult {
    fn as_str(self) -> &'static str {
        match self {
            PushResult::Ack => "ack",
            PushResult::Nack => "nack",
            PushResult::Superseded => "superseded",
            PushResult::Unanswered => "unanswered",
        }
    }
}

/// Whether applying watch events changed the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconcileResult {
    /// The index changed (snapshots recompiled where affected).
    Changed,
    /// Nothing changed (e.g. our own status write coming back).
    Unchanged,
}

impl ReconcileResult {
    fn as_str(self) -> &'static str {
        match self {
            ReconcileResult::Changed => "changed",
            ReconcileResult::Unchanged => "unchanged",
        }
    }
}

/// Buckets of the reconcile duration, in seconds.
const RECONCILE_BUCKETS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

fn reconcile_histogram() -> Histogram {
    Histogram::new(RECONCILE_BUCKETS)
}

/// Every metric of the controller.
pub struct Metrics {
    registry: Mutex<Registry>,
    index_updates: Counter,
    status_patches: Counter,
    status_errors: Counter,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_duration: Family<KindLabel, Histogram, fn() -> Histogram>,
    watch_errors: Family<KindLabel, Counter>,
    streams_refused: Family<CodeLabel, Counter>,
    snapshot_version: Gauge,
    push_latency: Histogram,
    pushes: Family<ResultLabel, Counter>,
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
    audit_keys_archived: Counter,
    audit_keys_refused: Counter,
    signing_keys_refused: Counter,
    audit_key_archive_errors: Counter,
}

impl Metrics {
    /// Creates and registers every metric (`chaperone_build_info` too); the
    /// gauges of what exists come with [`Metrics::register_collector`].
    pub fn new() -> Arc<Self> {
        let mut root = Registry::default();
        chaperone_wire::build_info::register_build_info(&mut root, "controller");
        let registry = root.sub_registry_with_prefix(PREFIX);
        let metrics = Self {
            index_updates: Counter::default(),
            status_patches: Counter::default(),
            status_errors: Counter::default(),
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_histogram),
            watch_errors: Family::default(),
            streams_refused: Family::default(),
            snapshot_version: Gauge::default(),
            push_latency: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            pushes: Family::default(),
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
            audit_keys_archived: Counter::default(),
            audit_keys_refused: Counter::default(),
            signing_keys_refused: Counter::default(),
            audit_key_archive_errors: Counter::default(),
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
            "reconciles",
            "Batches of watch events applied to the index, by kind (AgentIdentity, ToolPolicy, DelegationGrant) and result (changed: snapshots recompiled where affected; unchanged)",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to apply one batch of watch events to the index (recompiling the affected agents), by kind",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch failures (retried with backoff), by kind",
            metrics.watch_errors.clone(),
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
            "snapshot_pushes",
            "Snapshots sent to agent sidecars, each counted once by how it ended: ack, nack, superseded (a newer one went out before the answer) or unanswered (the stream ended first)",
            metrics.pushes.clone(),
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
        registry.register(
            "audit_keys_archived",
            "Sidecar keys written into the audit-key archive (once per key and UTC month)",
            metrics.audit_keys_archived.clone(),
        );
        registry.register(
            "audit_keys_refused",
            "Sidecar keys not archived: not Ed25519, a kid not derived from the key, a key the archive holds for another pod, or past the keys one pod may archive in a month",
            metrics.audit_keys_refused.clone(),
        );
        registry.register(
            "signing_keys_refused",
            "Signing keys sidecars registered and the controller refused (neither in the JWKS nor archived): not Ed25519, a kid not derived from the key, or no valid proof that the sidecar holds the key",
            metrics.signing_keys_refused.clone(),
        );
        registry.register(
            "audit_key_archive_errors",
            "Failed writes to the audit-key archive and failed deletions of its expired days (retried)",
            metrics.audit_key_archive_errors.clone(),
        );
        *metrics.registry.lock().unwrap_or_else(|p| p.into_inner()) = root;
        Arc::new(metrics)
    }

    /// Adds gauges read at each scrape ([`SidecarGauges`], [`ApprovalGauges`]),
    /// named under the controller's prefix.
    pub fn register_collector(&self, collector: impl Collector) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(collector));
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

    /// `count` keys were written into the audit-key archive.
    pub fn audit_keys_archived(&self, count: u64) {
        self.audit_keys_archived.inc_by(count);
    }

    /// A sidecar's registered signing key was refused.
    pub fn signing_key_refused(&self) {
        self.signing_keys_refused.inc();
    }

    /// A sidecar's key was not archived.
    pub fn audit_key_refused(&self) {
        self.audit_keys_refused.inc();
    }

    /// A write to the audit-key archive (or a deletion of its expired days) failed.
    pub fn audit_key_archive_failed(&self) {
        self.audit_key_archive_errors.inc();
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

    /// Watch events of `kind` were applied to the index in `elapsed`.
    pub fn reconciled(&self, kind: &'static str, result: ReconcileResult, elapsed: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind,
                result: result.as_str(),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&KindLabel { kind })
            .observe(elapsed.as_secs_f64());
    }

    /// The watch of `kind` started: its failure count is exported, at 0.
    pub fn watch_started(&self, kind: &'static str) {
        let _created = self.watch_errors.get_or_create(&KindLabel { kind });
    }

    /// The watch of `kind` failed (it retries).
    pub fn watch_failed(&self, kind: &'static str) {
        self.watch_errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// A snapshot push ended with `result`; `elapsed` since it was sent when
    /// the sidecar acknowledged it.
    pub fn push_ended(&self, result: PushResult, elapsed: Duration) {
        if result == PushResult::Ack {
            self.push_latency.observe(elapsed.as_secs_f64());
        }
        self.pushes
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
    }

    /// An audit batch arrived.
    pub fn audit_received(&self, records: u64, dropped: u64) {
        self.audit_records.inc_by(records);
        self.audit_dropped.inc_by(dropped);
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

/// The sidecar gauges, read from the sidecar registry and the index at each
/// scrape: `sidecars_connected` and `tool_sidecars_connected` (this replica's
/// agent and tool-mode sidecars, one per pod however many streams it has
/// open), and per AgentIdentity that exists `agent_sidecars_connected` and
/// `agent_sidecars_in_sync` (ACKed the agent's current snapshot).
pub struct SidecarGauges {
    sidecars: Arc<SidecarRegistry>,
    index: Arc<SharedIndex>,
}

impl SidecarGauges {
    /// Gauges of `sidecars` (this replica's) against `index`.
    pub fn new(sidecars: Arc<SidecarRegistry>, index: Arc<SharedIndex>) -> Self {
        Self { sidecars, index }
    }
}

impl std::fmt::Debug for SidecarGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarGauges").finish_non_exhaustive()
    }
}

impl Collector for SidecarGauges {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        // Every AgentIdentity with its current snapshot hash: one lock at a time.
        let agents: BTreeMap<chaperone_policy::AgentKey, Option<String>> = {
            let index = self.index.lock();
            index
                .objects()
                .identities
                .iter()
                .map(|identity| {
                    let key = crate::index::key_of(identity);
                    let hash = index.snapshot(&key).map(|s| s.hash.clone());
                    (key, hash)
                })
                .collect()
        };
        let tally = self
            .sidecars
            .own_tally(|agent| agents.get(agent).and_then(Option::as_deref));
        encode_gauge(
            &mut encoder,
            "sidecars_connected",
            "Agent sidecars connected to this replica (pods with an open stream; a pod that reconnected counts once)",
            tally.agent_sidecars,
        )?;
        encode_gauge(
            &mut encoder,
            "tool_sidecars_connected",
            "Tool-mode sidecars (key set only) connected to this replica",
            tally.tool_sidecars,
        )?;
        let connected = Family::<AgentLabel, Gauge>::default();
        let in_sync = Family::<AgentLabel, Gauge>::default();
        for agent in agents.keys() {
            let labels = AgentLabel {
                namespace: agent.namespace.clone(),
                agent: agent.name.clone(),
            };
            let counts = tally.per_agent.get(agent).copied().unwrap_or_default();
            connected
                .get_or_create(&labels)
                .set(to_i64(counts.connected));
            in_sync.get_or_create(&labels).set(to_i64(counts.in_sync));
        }
        encode_family(
            &mut encoder,
            "agent_sidecars_connected",
            "Sidecars of each AgentIdentity connected to this replica",
            &connected,
        )?;
        encode_family(
            &mut encoder,
            "agent_sidecars_in_sync",
            "Sidecars of each AgentIdentity connected to this replica that acknowledged its current snapshot",
            &in_sync,
        )
    }
}

/// `approvals{phase}`: the ToolCallApprovals this replica's watch sees, by
/// where each stands now (pending, approved, consumed, denied, expired), read
/// at each scrape.
pub struct ApprovalGauges {
    desk: Arc<ApprovalDesk>,
}

impl ApprovalGauges {
    /// Gauges of the approvals `desk` watches.
    pub fn new(desk: Arc<ApprovalDesk>) -> Self {
        Self { desk }
    }
}

impl std::fmt::Debug for ApprovalGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalGauges").finish_non_exhaustive()
    }
}

impl Collector for ApprovalGauges {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let family = Family::<PhaseLabel, Gauge>::default();
        for (phase, count) in self
            .desk
            .count_by_phase(k8s_openapi::jiff::Timestamp::now())
        {
            family
                .get_or_create(&PhaseLabel { phase })
                .set(to_i64(count));
        }
        encode_family(
            &mut encoder,
            "approvals",
            "ToolCallApprovals by phase (pending, approved and unused, consumed, denied, expired), as this replica's watch sees them",
            &family,
        )
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn encode_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: usize,
) -> std::fmt::Result {
    let gauge = ConstGauge::new(to_i64(value));
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

fn encode_family<L>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    family: &Family<L, Gauge>,
) -> std::fmt::Result
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug,
{
    let metric = encoder.encode_descriptor(name, help, None, family.metric_type())?;
    family.encode(metric)
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
