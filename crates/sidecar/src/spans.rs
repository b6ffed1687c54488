//! The trace span of each governed message, and what it records.
//!
//! One span per governed message (a `tools/call`, `resources/read`,
//! `prompts/get`, a task's call, or a message refused before policy), on the
//! outbound side (kind client) and the inbound side (kind server). Its parent
//! is the caller's W3C trace context ([`chaperone_telemetry::trace_context`]);
//! the sidecar sends its own span on as the tool server's parent in the
//! `traceparent` header, keeping the trace id (which also keys trace-scoped
//! sessions) and changing only the parent span id.
//!
//! Names follow the OpenTelemetry semantic conventions for MCP and GenAI
//! where they exist: span name `{mcp.method.name} {gen_ai.tool.name}`,
//! `mcp.method.name`, `gen_ai.tool.name`, `gen_ai.operation.name`
//! (`execute_tool`), `jsonrpc.request.id`, `mcp.session.id`,
//! `mcp.protocol.version`, `error.type`; Kubernetes' `k8s.pod.name` and
//! `k8s.namespace.name`. Chaperone's own are under `chaperone.*`: see
//! [`record_decision`] and the README's Observability section.
//!
//! The decision's attributes are recorded where its audit record is written
//! ([`crate::authz::Enforcer::write_record`]), on the span then current: the
//! callers enter the message's span around every decision. The spans'
//! target is [`TRACE_ONLY_TARGET`], which log lines leave out: without an
//! exporter no span is created and all of this costs a few branches.

use std::time::Duration;

use chaperone_telemetry::{TRACE_ONLY_TARGET, TraceParent};
use opentelemetry::trace::Status;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::audit::AuditRecord;

/// Which side of the sidecar a message crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the agent to a tool server (span kind client).
    Outbound,
    /// From a caller to the pod's own endpoint or a tool (span kind server).
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// The span of one governed message `method` naming `tool` (may be empty),
/// to `server` (outbound; inbound the decision names the caller), child of
/// `parent` when the caller sent a trace context. Enter it around the
/// decision of that message.
pub fn message_span(
    direction: Direction,
    method: &str,
    tool: &str,
    server: &str,
    parent: Option<TraceParent>,
) -> tracing::Span {
    let kind = match direction {
        Direction::Outbound => "client",
        Direction::Inbound => "server",
    };
    // Field values are evaluated only when the span is enabled: with no
    // exporter it is not (log lines never carry these spans), and this
    // function costs a branch.
    let span = tracing::info_span!(
        target: TRACE_ONLY_TARGET,
        "mcp",
        otel.name = %SpanName { method, tool },
        otel.kind = kind,
        mcp.method.name = %method,
        gen_ai.tool.name = %tool,
        chaperone.direction = direction.as_str(),
    );
    if span.is_disabled() {
        return span;
    }
    // Inbound, the caller is known only once its assertion is verified: the
    // decision names it (`inbound:<caller>`).
    if direction == Direction::Outbound {
        span.set_attribute("chaperone.tool_server", server.to_owned());
    }
    if method == "tools/call" {
        span.set_attribute("gen_ai.operation.name", "execute_tool");
    }
    if let Some(parent) = parent {
        parent.adopt(&span);
    }
    span
}

/// Records one decision (its audit record) on the current span, a message's
/// span (see [`message_span`]): who decided
/// (`chaperone.agent`, `k8s.pod.name`, `k8s.namespace.name`), what
/// (`chaperone.decision`, `chaperone.rule`, `chaperone.snapshot.version`,
/// `chaperone.correlation_id`), in which session
/// (`chaperone.session.scope`, `chaperone.session.key`, `mcp.session.id`), for
/// whom (`chaperone.delegation.chain`, `chaperone.initiator`); a refusal also
/// sets the span's status to error with the reason
/// (`chaperone.refusal.reason`, `error.type` = `chaperone.refused`).
pub fn record_decision(record: &AuditRecord<'_>) {
    let span = tracing::Span::current();
    // Only on a message's span: without an exporter none is created, and
    // another span that happens to be current (a log span) gets nothing.
    if span.is_disabled() || span.metadata().map(|m| m.target()) != Some(TRACE_ONLY_TARGET) {
        return;
    }
    span.set_attribute(
        "chaperone.agent",
        format!("{}/{}", record.agent.namespace, record.agent.name),
    );
    span.set_attribute("k8s.pod.name", record.agent.pod.to_owned());
    span.set_attribute("k8s.namespace.name", record.agent.namespace.to_owned());
    if record.server.starts_with("inbound") {
        span.set_attribute("chaperone.tool_server", record.server.to_owned());
    }
    span.set_attribute("chaperone.decision", record.decision.to_owned());
    span.set_attribute("chaperone.rule", record.rule.to_owned());
    span.set_attribute(
        "chaperone.snapshot.version",
        i64::try_from(record.snapshot).unwrap_or(i64::MAX),
    );
    span.set_attribute("chaperone.correlation_id", record.correlation.to_owned());
    span.set_attribute("chaperone.session.scope", record.session.scope.to_owned());
    span.set_attribute("chaperone.session.key", record.session.key.to_owned());
    if !record.session.mcp.is_empty() {
        span.set_attribute("mcp.session.id", record.session.mcp.to_owned());
    }
    if !record.chain.is_empty() {
        span.set_attribute("chaperone.delegation.chain", record.chain.join(" > "));
    }
    if let Some(initiator) = record.initiator {
        span.set_attribute("chaperone.initiator", initiator.to_owned());
    }
    if refused(record.decision) {
        span.set_attribute("chaperone.refusal.reason", record.reason.to_owned());
        span.set_attribute("error.type", "chaperone.refused");
        span.set_status(Status::error(record.reason.to_owned()));
    }
}

/// A message span's name: `{method} {tool}`, or the method alone.
struct SpanName<'a> {
    method: &'a str,
    tool: &'a str,
}

impl std::fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tool.is_empty() {
            f.write_str(self.method)
        } else {
            write!(f, "{} {}", self.method, self.tool)
        }
    }
}

/// Whether a decision kept the message from its destination.
fn refused(decision: &str) -> bool {
    matches!(decision, "deny" | "approval")
}

/// Records how long the tool server (or the pod's endpoint) took to answer
/// the headers of the forwarded request, and its HTTP status, on each of
/// `spans`.
pub fn record_upstream(spans: &[tracing::Span], latency: Duration, status: u16) {
    let ms = latency.as_secs_f64() * 1000.0;
    for span in spans {
        span.set_attribute("chaperone.upstream.latency_ms", ms);
        span.set_attribute("http.response.status_code", i64::from(status));
    }
}

/// Marks `spans` failed: the request never got an answer from upstream.
pub fn record_upstream_failure(spans: &[tracing::Span], why: &str) {
    for span in spans {
        span.set_attribute("error.type", "chaperone.upstream_unavailable");
        span.set_status(Status::error(why.to_owned()));
    }
}

/// The `traceparent` to send upstream: the first of `spans` (the span of
/// the first governed message forwarded), when spans are exported.
pub fn outgoing_traceparent(spans: &[tracing::Span]) -> Option<http::HeaderValue> {
    let parent = TraceParent::of_span(spans.first()?)?;
    http::HeaderValue::from_str(&parent.to_string()).ok()
}
