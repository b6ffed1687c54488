//! `chaperone-telemetry`: the logs and traces of Chaperone's binaries, set up
//! the same way in the controller and the sidecar.
//!
//! - [`log`]: which format diagnostic logs take (`CHAPERONE_LOG_FORMAT`, else
//!   JSON unless stderr is a terminal) and the `RUST_LOG`-style filter.
//! - [`otlp`]: the OTLP trace exporter (gRPC or HTTP/protobuf) configured by
//!   the standard `OTEL_*` variables; off when no endpoint is set.
//! - [`trace_context`]: W3C trace context (`traceparent`) read from a header
//!   or MCP's `params._meta`, and written for the next hop.
//!
//! [`init`] installs both as the process's `tracing` subscriber and returns a
//! [`TelemetryGuard`] that flushes the spans still buffered when dropped.
//! [`stop_requested`] is when both binaries begin to stop.

#![forbid(unsafe_code)]

pub mod log;
pub mod otlp;
pub mod trace_context;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use log::{InvalidLogFormat, LOG_FORMAT_ENV, LogFormat, TRACE_ONLY_TARGET};
pub use otlp::{OtlpProtocol, OtlpSettings};
pub use trace_context::TraceParent;

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `CHAPERONE_LOG_FORMAT` is neither `json` nor `text`.
    #[error(transparent)]
    LogFormat(#[from] InvalidLogFormat),
    /// An `OTEL_*` variable has a value this exporter cannot use.
    #[error("{variable}: {why}")]
    OtelSetting {
        /// The variable.
        variable: &'static str,
        /// What is wrong with its value.
        why: String,
    },
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A `tracing` subscriber is already installed in this process.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the trace exporter alive; dropping it flushes and shuts it down
/// (spans still buffered are sent, within the exporter's timeout).
#[must_use = "dropping the guard shuts the trace exporter down"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends every finished span now (tests call it before asserting on what
    /// a receiver got).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(err) = provider.force_flush()
        {
            tracing::warn!(error = %err, "flushing spans to the OTLP endpoint failed");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            // The subscriber may be the one shutting down: stderr directly.
            eprintln!("chaperone-telemetry: shutting the OTLP exporter down failed: {err}");
        }
    }
}

/// Installs logs and traces for the binary `service` from the environment:
/// `format` (a flag) or else `CHAPERONE_LOG_FORMAT` and the terminal, and
/// `RUST_LOG`, for logs; `OTEL_*` for traces. Call it once, inside the Tokio
/// runtime (the gRPC exporter runs on it).
pub fn init(service: &str, format: Option<LogFormat>) -> Result<TelemetryGuard, TelemetryError> {
    let env = |name: &str| std::env::var(name).ok();
    let format = match format {
        Some(format) => format,
        None => log::format_from_env(&env)?,
    };
    let otlp = OtlpSettings::from_lookup(service, &env)?;
    init_with(format, otlp.as_ref())
}

/// The subscriber [`init_with`] installs: log lines in `format` to `writer`
/// (filtered by `RUST_LOG`, default `info`) and, with `provider`, spans
/// exported through it. Without an exporter no layer stands in for it: an
/// absent layer (`Option::None`) counts as one that wants every span, so
/// trace-only spans would be built on every call and only then left out of
/// the logs.
pub fn subscriber<W>(
    format: LogFormat,
    ansi: bool,
    writer: W,
    provider: Option<&SdkTracerProvider>,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let logs = log::fmt_layer(format, ansi, writer).with_filter(log::env_filter());
    let registry = tracing_subscriber::registry().with(logs);
    match provider {
        Some(provider) => Box::new(
            registry.with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("chaperone"))
                    .with_filter(otlp::span_filter()),
            ),
        ),
        None => Box::new(registry),
    }
}

/// Installs logs in `format` (filtered by `RUST_LOG`, default `info`) and,
/// when `otlp` is given, exports spans there. Tests call it with settings of
/// their own receiver.
pub fn init_with(
    format: LogFormat,
    otlp: Option<&OtlpSettings>,
) -> Result<TelemetryGuard, TelemetryError> {
    let ansi = format == LogFormat::Text && log::stderr_is_terminal();
    let provider = otlp.map(otlp::tracer_provider).transpose()?;
    subscriber(format, ansi, std::io::stderr, provider.as_ref()).try_init()?;
    if let Some(settings) = otlp {
        tracing::info!(
            endpoint = %settings.endpoint,
            protocol = settings.protocol.as_str(),
            service = %settings.service_name,
            "exporting traces over OTLP"
        );
    }
    Ok(TelemetryGuard { provider })
}

/// Resolves on SIGTERM (how the kubelet stops a container) or Ctrl-C. A
/// process that is its container's PID 1 and has no SIGTERM handler ignores
/// the signal and is killed only when the grace period ends: both binaries
/// wait on this instead.
pub async fn stop_requested() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
