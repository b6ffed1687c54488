//! W3C trace context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` a request carries, in its HTTP header or, in MCP
//! 2026-07-28, in `params._meta.traceparent`; the parent of the span the
//! receiver makes; and the value it sends on, which keeps the trace id and
//! names its own span as the parent.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (and `_meta` key) that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A valid `traceparent`: the trace, the parent span, the flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (never zero).
    pub trace_id: u128,
    /// The span id of the sender (never zero).
    pub parent_id: u64,
    /// The trace flags (`01`: sampled).
    pub flags: u8,
}

fn hex_field(text: &str, len: usize) -> Option<&str> {
    (text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some(text)
}

impl TraceParent {
    /// Reads a `traceparent` value: `00-<32 hex>-<16 hex>-<2 hex>` in lower
    /// case (a later version may append fields), ids not all zero; `None`
    /// for anything else, which the receiver then ignores.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim_matches([' ', '\t']);
        let mut fields = value.split('-');
        let version = hex_field(fields.next()?, 2)?;
        let trace = hex_field(fields.next()?, 32)?;
        let parent = hex_field(fields.next()?, 16)?;
        let flags = hex_field(fields.next()?, 2)?;
        if version == "ff" || (version == "00" && fields.next().is_some()) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
        let parent_id = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The remote span context it names, for a span's parent.
    pub fn span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.parent_id.to_be_bytes()),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        )
    }

    /// The `traceparent` of `span` as the next hop's parent, when spans are
    /// exported (else `None`: nothing to send on).
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        let context = span.context();
        let span_ref = context.span();
        let current = span_ref.span_context();
        current.is_valid().then(|| Self {
            trace_id: u128::from_be_bytes(current.trace_id().to_bytes()),
            parent_id: u64::from_be_bytes(current.span_id().to_bytes()),
            flags: current.trace_flags().to_u8(),
        })
    }

    /// Makes it the parent of `span` (which must not have been entered yet).
    pub fn adopt(&self, span: &tracing::Span) {
        let context = opentelemetry::Context::new().with_remote_span_context(self.span_context());
        // Fails only when the span already started: it keeps its own parent.
        let _ = span.set_parent(context);
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// The trace context of a request that may carry it twice: in the
/// `traceparent` header and in `params._meta.traceparent` (MCP 2026-07-28).
/// When both are valid and name the same trace, the header wins: a hop on
/// the way (a Chaperone sidecar) updated it to its own span while the body
/// was forwarded untouched. When they name different traces, `_meta` wins:
/// it is what the MCP client itself declared.
pub fn request_parent(header: Option<&str>, meta: Option<&str>) -> Option<TraceParent> {
    let header = header.and_then(TraceParent::parse);
    let meta = meta.and_then(TraceParent::parse);
    match (header, meta) {
        (Some(h), Some(m)) if h.trace_id == m.trace_id => Some(h),
        (_, Some(m)) => Some(m),
        (h, None) => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const HOP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01";
    const OTHER: &str = "00-0af7651916cd43dd8448eb211c80319c-b9c7c989f97918e1-00";

    #[test]
    fn reads_and_writes_the_same_value() {
        let tp = TraceParent::parse(AGENT).unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), AGENT);
    }

    #[test]
    fn ignores_invalid_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn the_updated_header_wins_within_one_trace() {
        let chosen = request_parent(Some(HOP), Some(AGENT)).unwrap();
        assert_eq!(chosen.to_string(), HOP);
    }

    #[test]
    fn meta_wins_across_traces_and_when_alone() {
        assert_eq!(
            request_parent(Some(OTHER), Some(AGENT))
                .unwrap()
                .to_string(),
            AGENT
        );
        assert_eq!(
            request_parent(None, Some(AGENT)).unwrap().to_string(),
            AGENT
        );
        assert_eq!(
            request_parent(Some("junk"), Some(AGENT))
                .unwrap()
                .to_string(),
            AGENT
        );
        assert_eq!(
            request_parent(Some(AGENT), Some("junk"))
                .unwrap()
                .to_string(),
            AGENT
        );
        assert_eq!(request_parent(None, None), None);
    }

    #[test]
    fn a_span_without_an_exporter_has_nothing_to_send() {
        let span = tracing::info_span!("call");
        assert_eq!(TraceParent::of_span(&span), None);
    }
}
