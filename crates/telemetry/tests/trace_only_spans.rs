//! A test binary of its own: tracing caches each callsite's interest over
//! every subscriber alive in the process, so next to the other tests'
//! subscribers (the crate's unit tests run in parallel threads) whether the
//! span below is disabled would depend on timing.

use chaperone_telemetry::TRACE_ONLY_TARGET;
use chaperone_telemetry::log::{LogFormat, env_filter, fmt_layer};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[test]
fn trace_only_spans_are_not_created_for_logs() {
    let logs = fmt_layer(LogFormat::Json, false, std::io::sink).with_filter(env_filter());
    let subscriber = tracing_subscriber::registry().with(logs);
    tracing::subscriber::with_default(subscriber, || {
        let traced = tracing::info_span!(target: TRACE_ONLY_TARGET, "mcp");
        assert!(traced.is_disabled());
        let logged = tracing::info_span!("reconcile");
        assert!(!logged.is_disabled());
    });
}
