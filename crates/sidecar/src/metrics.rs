//! Prometheus metrics of the sidecar, served on the admin port at `/metrics`.
//!
//! Every name carries the `chaperone_sidecar_` prefix except
//! `chaperone_build_info`, which the controller exports too. Label values are
//! bounded: decisions name a server, tool and rule only when the snapshot in
//! force names it ([`LabelVocabulary`]), anything else is [`OTHER`]; stages and
//! refusal reasons are fixed sets.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaperone_policy::model::ToolMatch;
use chaperone_policy::{DecidingRule, Snapshot};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The label value of a server, tool or rule the snapshot in force does not
/// name (a tool matched only by a glob, a resource URI, a rule of an older
/// snapshot): one value, so an agent cannot grow the series without bound.
pub const OTHER: &str = "_other";

/// Rule names the engine and the sidecar decide with besides a policy's own
/// rules (`policy/rule`) and rate limits.
fn fixed_rules() -> [&'static str; 7] {
    [
        DecidingRule::NoRuleAllows.as_str(),
        DecidingRule::RequireDelegation.as_str(),
        DecidingRule::GrantExpired.as_str(),
        DecidingRule::Delegation.as_str(),
        DecidingRule::ToolPinning.as_str(),
        crate::authz::SESSION_MAX_CALLS_RULE,
        crate::proxy::PROTOCOL_RULE,
    ]
}

/// The server, tool and rule names a snapshot knows: the label values the
/// decision counter may use. Tools are the literal names (no glob) in rules,
/// classifications, grants and pins; rules are `policy/rule` and rate-limit
/// ids, plus the sidecar's fixed ones. Built once per snapshot; looking a
/// name up allocates nothing.
#[derive(Debug, Clone)]
pub struct LabelVocabulary {
    servers: HashSet<Arc<str>>,
    tools: HashSet<Arc<str>>,
    rules: HashSet<Arc<str>>,
    other: Arc<str>,
}

impl Default for LabelVocabulary {
    fn default() -> Self {
        Self {
            servers: HashSet::new(),
            tools: HashSet::new(),
            rules: fixed_rules().into_iter().map(Arc::from).collect(),
            other: Arc::from(OTHER),
        }
    }
}

impl LabelVocabulary {
    /// The names `snapshot` knows (read before its rules are dropped).
    pub fn of(snapshot: &Snapshot) -> Self {
        let mut vocabulary = Self::default();
        let content = &snapshot.content;
        let tools = &mut vocabulary.tools;
        let authorities = || std::iter::once(&content.authority).chain(&content.delegators);
        for authority in authorities() {
            for rule in &authority.rules {
                add_literal_tools(tools, &rule.tools);
                vocabulary
                    .rules
                    .insert(Arc::from(format!("{}/{}", rule.policy, rule.name)));
                if let Some(limit) = &rule.rate_limit {
                    vocabulary.rules.insert(Arc::from(limit.id.as_str()));
                }
            }
            for classification in &authority.classifications {
                add_literal_tool(tools, &classification.name);
            }
        }
        for grant in content.grants_received.iter().chain(&content.grants_given) {
            add_literal_tools(tools, &grant.tools);
        }
        for pin in &content.pins {
            add_literal_tool(tools, &pin.tool);
        }
        for server in &content.tool_servers {
            vocabulary.servers.insert(Arc::from(server.name.as_str()));
        }
        vocabulary
    }

    fn pick(&self, known: &HashSet<Arc<str>>, name: &str) -> Arc<str> {
        Arc::clone(known.get(name).unwrap_or(&self.other))
    }

    /// `server`'s label value.
    pub fn server(&self, server: &str) -> Arc<str> {
        self.pick(&self.servers, server)
    }

    /// `tool`'s label value (the policy name: `tool`, `resource:<uri>`,
    /// `prompt:<name>`).
    pub fn tool(&self, tool: &str) -> Arc<str> {
        self.pick(&self.tools, tool)
    }

    /// `rule`'s label value.
    pub fn rule(&self, rule: &str) -> Arc<str> {
        self.pick(&self.rules, rule)
    }
}

/// Adds `name` unless it is a glob (a glob names no one tool).
fn add_literal_tool(tools: &mut HashSet<Arc<str>>, name: &str) {
    if !name.contains(['*', '?']) && !tools.contains(name) {
        tools.insert(Arc::from(name));
    }
}

fn add_literal_tools(tools: &mut HashSet<Arc<str>>, matches: &[ToolMatch]) {
    for name in matches.iter().filter_map(|m| m.name.as_deref()) {
        add_literal_tool(tools, name);
    }
}

/// Labels of the decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The tool server (or [`OTHER`]).
    pub server: Arc<str>,
    /// The tool's policy name (or [`OTHER`]).
    pub tool: Arc<str>,
    /// `allow`, `deny`, `wouldDeny`, `approval` or `wouldRequireApproval`.
    pub decision: &'static str,
    /// The deciding rule (`policy/rule`, a rate-limit id, a fixed reason such
    /// as `no rule allows`, or [`OTHER`]).
    pub rule: Arc<str>,
}

/// A stage of the call path, timed by
/// `chaperone_sidecar_stage_duration_seconds{stage}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Reading the request body, from the request head handed to the
    /// handler to the last byte of its body.
    BodyRead,
    /// Parsing the request body and checking its headers against it.
    Parse,
    /// Deciding a call: the engine, the session's and agent's limits.
    Decide,
    /// Signing a forwarded call's assertion.
    Sign,
    /// Appending a decision's audit record to the trail (hash chain,
    /// serialisation, checkpoint signature every so many records).
    Audit,
    /// From forwarding to the upstream's response headers.
    Upstream,
    /// Reading and filtering a list result (JSON, or one SSE event).
    ResponseFilter,
    /// From the upstream's response headers to the end of the response body
    /// handed to the agent's connection (POSTs answered with a body that is
    /// not an event stream).
    Respond,
    /// Before a call is forwarded and before a response goes back, until
    /// the request's audit records are written: the request's own
    /// non-blocking `write` where the output is a pipe that takes one, else
    /// the wait for the writer thread.
    AuditSettled,
    /// A whole POST, from its head handed to the handler to the end of its
    /// response body (same POSTs as `respond`): what the other stages leave
    /// out of it is time spent between them (scheduling, locks, glue).
    Request,
}

impl Stage {
    /// Every stage, in the order of a call.
    pub const ALL: [Stage; 10] = [
        Stage::BodyRead,
        Stage::Parse,
        Stage::Decide,
        Stage::Sign,
        Stage::Audit,
        Stage::Upstream,
        Stage::ResponseFilter,
        Stage::Respond,
        Stage::AuditSettled,
        Stage::Request,
    ];

    /// The `stage` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::BodyRead => "body_read",
            Stage::Parse => "parse",
            Stage::Decide => "decide",
            Stage::Sign => "sign",
            Stage::Audit => "audit",
            Stage::Upstream => "upstream",
            Stage::ResponseFilter => "response_filter",
            Stage::Respond => "respond",
            Stage::AuditSettled => "audit_settled",
            Stage::Request => "request",
        }
    }
}

/// Label of the stage histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// [`Stage::as_str`].
    pub stage: &'static str,
}

/// Buckets of the stage histogram, seconds: 5 µs (a decision) to 10 s (a
/// slow tool server).
const STAGE_BUCKETS: [f64; 20] = [
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

/// Every approval outcome, each series created at start (at 0) so a rate
/// reads 0, not nothing, before the first hold.
const APPROVAL_OUTCOMES: [&str; 8] = [
    "granted",
    "denied",
    "expired",
    "failed",
    "pending",
    "lost",
    "unavailable",
    "not_held",
];

/// Every pinning block and reason, created at start like
/// [`APPROVAL_OUTCOMES`].
const PINNING_BLOCKS: [&str; 2] = ["call", "listed"];
/// See [`PINNING_BLOCKS`].
const PINNING_REASONS: [&str; 4] = ["changed", "unpinned", "conflicting", "unseen"];

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
    /// Decisions by server, tool, decision and rule (label values bounded by
    /// the snapshot's [`LabelVocabulary`]).
    pub decisions: Family<DecisionLabels, Counter>,
    /// Time spent in each stage of the call path, seconds.
    pub stage_duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    /// The stages' histograms, resolved once ([`Stage`] order).
    stages: [Histogram; Stage::ALL.len()],
    /// The names known without a snapshot (the fixed rules only).
    no_snapshot: LabelVocabulary,
    /// Time to decide a call, seconds (also `stage="decide"`).
    pub decision_seconds: Histogram,
    /// Time from forwarding to the upstream's response headers, seconds
    /// (also `stage="upstream"`).
    pub upstream_seconds: Histogram,
    /// Version of the snapshot in force (0: none).
    pub snapshot_version: Gauge,
    /// Sessions held on the agent's side (MCP, trace and agent scopes).
    pub sessions: Gauge,
    /// Sessions opened at the inbound side (delegated or user-initiated
    /// tasks).
    pub delegated_sessions: Gauge,
    /// Audit records dropped from the full shipping queue.
    pub audit_dropped: Counter,
    /// Assertions signed on the call's path because no signing nonce made
    /// ahead was ready ([`crate::signing_nonces`]).
    pub assertions_signed_unpooled: Counter,
    /// Requests refused before any decision (parse errors, limits, no
    /// snapshot), by [`crate::refusal::Refusal::label`] (a fixed set).
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
        let mut root = Registry::default();
        chaperone_wire::build_info::register_build_info(&mut root, "sidecar");
        let registry = root.sub_registry_with_prefix("chaperone_sidecar");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Tool-call decisions by server, tool, decision and rule (names the snapshot does not know are _other)",
            decisions.clone(),
        );
        let stage_duration: Family<StageLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(stage_histogram);
        let stages = Stage::ALL.map(|stage| {
            stage_duration
                .get_or_create(&StageLabels {
                    stage: stage.as_str(),
                })
                .clone()
        });
        registry.register_with_unit(
            "stage_duration",
            "Time spent in each stage of the call path (body_read, parse, decide, sign, audit, upstream, response_filter, respond, request)",
            Unit::Seconds,
            stage_duration.clone(),
        );
        let decision_seconds = Histogram::new([5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2]);
        registry.register_with_unit(
            "decision_duration",
            "Time to decide a tool call",
            Unit::Seconds,
            decision_seconds.clone(),
        );
        let upstream_seconds =
            Histogram::new([1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0]);
        registry.register_with_unit(
            "upstream_duration",
            "Time from forwarding a request to the upstream's response headers",
            Unit::Seconds,
            upstream_seconds.clone(),
        );
        let snapshot_version = Gauge::default();
        registry.register(
            "snapshot_version",
            "Version of the policy snapshot in force (0: none yet)",
            snapshot_version.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "sessions",
            "Sessions held on the agent's side (MCP sessions, traces, the agent scope)",
            sessions.clone(),
        );
        let delegated_sessions = Gauge::default();
        registry.register(
            "delegated_sessions",
            "Sessions opened at the inbound side for delegated or user-initiated tasks",
            delegated_sessions.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit records dropped because the shipping queue was full",
            audit_dropped.clone(),
        );
        let assertions_signed_unpooled = Counter::default();
        registry.register(
            "assertions_signed_unpooled",
            "Assertions signed on the call's path because no signing nonce made ahead was ready (just after start, or calls outpacing the nonce thread)",
            assertions_signed_unpooled.clone(),
        );
        let refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests refused before a decision, by reason",
            refused.clone(),
        );
        let approvals = Family::<ApprovalLabels, Counter>::default();
        for outcome in APPROVAL_OUTCOMES {
            drop(approvals.get_or_create(&ApprovalLabels { outcome }));
        }
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
        for blocked in PINNING_BLOCKS {
            for reason in PINNING_REASONS {
                drop(tool_pinning_blocked.get_or_create(&PinningLabels { blocked, reason }));
            }
        }
        registry.register(
            "tool_pinning_blocked",
            "Calls refused (blocked=call) and tools hidden from lists (blocked=listed) because a tool's definition does not match its pin, by reason",
            tool_pinning_blocked.clone(),
        );
        Self {
            registry: root,
            decisions,
            stage_duration,
            stages,
            no_snapshot: LabelVocabulary::default(),
            decision_seconds,
            upstream_seconds,
            snapshot_version,
            sessions,
            delegated_sessions,
            audit_dropped,
            assertions_signed_unpooled,
            refused,
            approvals,
            connections_open,
            connections_refused,
            connections_timed_out,
            tool_pinning_blocked,
        }
    }

    /// Records `elapsed` in `stage`'s histogram.
    pub fn observe_stage(&self, stage: Stage, elapsed: Duration) {
        // `Stage`'s discriminants are its indices in `Stage::ALL`.
        self.stages[stage as usize].observe(elapsed.as_secs_f64());
    }

    /// Records the time since `started` in `stage`'s histogram.
    pub fn stage_since(&self, stage: Stage, started: Instant) {
        self.observe_stage(stage, started.elapsed());
    }

    /// Counts one decision of `decision` by `rule` on `server`'s `tool`, with
    /// the names `vocabulary` (the snapshot's) does not know as [`OTHER`].
    pub fn count_decision(
        &self,
        vocabulary: Option<&LabelVocabulary>,
        server: &str,
        tool: &str,
        decision: &'static str,
        rule: &str,
    ) {
        let vocabulary = vocabulary.unwrap_or(&self.no_snapshot);
        self.decisions
            .get_or_create(&DecisionLabels {
                server: vocabulary.server(server),
                tool: vocabulary.tool(tool),
                decision,
                rule: vocabulary.rule(rule),
            })
            .inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_index_their_histograms_in_order() {
        for (index, stage) in Stage::ALL.iter().enumerate() {
            assert_eq!(*stage as usize, index, "{stage:?}");
        }
    }

    #[test]
    fn without_a_snapshot_only_the_fixed_rules_are_known() {
        let vocabulary = LabelVocabulary::default();
        assert_eq!(&*vocabulary.server("shop"), OTHER);
        assert_eq!(&*vocabulary.tool("refund"), OTHER);
        assert_eq!(&*vocabulary.rule("support/allow"), OTHER);
        assert_eq!(&*vocabulary.rule("no rule allows"), "no rule allows");
        assert_eq!(&*vocabulary.rule("session.maxCalls"), "session.maxCalls");
    }

    #[test]
    fn every_stage_and_the_build_are_exposed_before_any_call() {
        let text = Metrics::new().encode();
        for stage in Stage::ALL {
            let series = format!(
                "chaperone_sidecar_stage_duration_seconds_count{{stage=\"{}\"}} 0",
                stage.as_str()
            );
            assert!(text.contains(&series), "{series}: {text}");
        }
        assert!(text.contains("chaperone_build_info{version=\""), "{text}");
        assert!(text.contains("component=\"sidecar\"} 1"), "{text}");
    }
}
