//! A test binary of its own: tracing caches each callsite's interest over
//! every subscriber alive in the process, so next to other tests'
//! subscribers (unit tests run in parallel threads) whether the span below
//! is disabled would depend on timing.

use chaperone_telemetry::log::LogFormat;
use chaperone_telemetry::{TRACE_ONLY_TARGET, subscriber};

#[test]
fn trace_only_spans_are_not_created_without_an_exporter() {
    // The subscriber the binaries install when no OTLP endpoint is set.
    let subscriber = subscriber(LogFormat::Json, false, std::io::sink, None);
    tracing::subscriber::with_default(subscriber, || {
        let traced = tracing::info_span!(target: TRACE_ONLY_TARGET, "mcp");
        assert!(traced.is_disabled());
        let logged = tracing::info_span!("reconcile");
        assert!(!logged.is_disabled());
    });
}
