//! Diagnostic logs: their format and their filter.
//!
//! Logs go to stderr, one event a line. The format is `CHAPERONE_LOG_FORMAT`
//! (`json` or `text`) when set, else JSON unless stderr is a terminal (a
//! person reading) — so files and container logs get JSON, never colour
//! codes. The filter is `RUST_LOG` (`info` when unset or unreadable).
//!
//! Audit records are not logs: the sidecar writes them to stdout, one JSON
//! object a line, with `seq` and `prevSeq`; every JSON log line has `level`
//! and `target`, which no audit record has.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::registry::LookupSpan;

/// The variable that picks the log format.
pub const LOG_FORMAT_ENV: &str = "CHAPERONE_LOG_FORMAT";

/// How diagnostic logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (fields flattened into it).
    Json,
    /// Human-readable lines (coloured only on a terminal).
    Text,
}

impl LogFormat {
    /// Its name in `CHAPERONE_LOG_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Text => "text",
        }
    }
}

/// A `CHAPERONE_LOG_FORMAT` value that is neither `json` nor `text`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{LOG_FORMAT_ENV} is {0:?}: use json or text")]
pub struct InvalidLogFormat(pub String);

impl std::str::FromStr for LogFormat {
    type Err = InvalidLogFormat;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "text" => Ok(Self::Text),
            _ => Err(InvalidLogFormat(value.to_owned())),
        }
    }
}

/// The format to log in: `configured` (the value of `CHAPERONE_LOG_FORMAT`)
/// when set and not empty, else text on a terminal and JSON anywhere else.
pub fn choose_format(
    configured: Option<&str>,
    terminal: bool,
) -> Result<LogFormat, InvalidLogFormat> {
    match configured.map(str::trim).filter(|v| !v.is_empty()) {
        Some(value) => value.parse(),
        None if terminal => Ok(LogFormat::Text),
        None => Ok(LogFormat::Json),
    }
}

/// Whether stderr, where logs go, is a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// The format from `CHAPERONE_LOG_FORMAT` (read with `env`) and stderr.
pub fn format_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<LogFormat, InvalidLogFormat> {
    choose_format(env(LOG_FORMAT_ENV).as_deref(), stderr_is_terminal())
}

/// The target of spans that exist for traces only (the sidecar's span of
/// each governed message): log lines never carry them, so without an OTLP
/// exporter they are not created at all, and a call does not pay for
/// formatting fields nobody reads.
pub const TRACE_ONLY_TARGET: &str = "chaperone::trace";

/// The `RUST_LOG` filter, `info` when unset or unreadable, without the
/// spans of [`TRACE_ONLY_TARGET`] whatever it says.
pub fn env_filter() -> EnvFilter {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format!("{TRACE_ONLY_TARGET}=off").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// The layer that writes log lines in `format` to `writer`, with ANSI colour
/// codes only when `ansi`.
pub fn fmt_layer<S, W>(format: LogFormat, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .boxed(),
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn logs_json_when_not_on_a_terminal() {
        assert_eq!(choose_format(None, false), Ok(LogFormat::Json));
        assert_eq!(choose_format(Some(""), false), Ok(LogFormat::Json));
    }

    #[test]
    fn logs_text_on_a_terminal() {
        assert_eq!(choose_format(None, true), Ok(LogFormat::Text));
    }

    #[test]
    fn the_variable_wins_over_the_terminal() {
        assert_eq!(choose_format(Some("json"), true), Ok(LogFormat::Json));
        assert_eq!(choose_format(Some(" TEXT "), false), Ok(LogFormat::Text));
    }

    #[test]
    fn refuses_an_unknown_format() {
        assert_eq!(
            choose_format(Some("xml"), false),
            Err(InvalidLogFormat("xml".to_owned()))
        );
    }

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Self;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn log_with(format: LogFormat, ansi: bool) -> String {
        let buffer = Buffer::default();
        let subscriber =
            tracing_subscriber::registry().with(fmt_layer(format, ansi, buffer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("reconcile", agent = "billing");
            let _entered = span.enter();
            tracing::warn!(tool = "refund", "refused a call");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_file_gets_json_lines_without_ansi_codes() {
        let format = choose_format(None, false).unwrap();
        let out = log_with(format, false);
        assert!(!out.contains('\u{1b}'), "ANSI escape in {out:?}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out:?}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["message"], "refused a call");
        assert_eq!(line["tool"], "refund");
        assert_eq!(line["level"], "WARN");
        // What tells a log line from an audit record on a merged stream.
        assert!(line["target"].is_string(), "{line}");
    }

    #[test]
    fn json_has_no_ansi_codes_even_if_asked() {
        assert!(!log_with(LogFormat::Json, true).contains('\u{1b}'));
    }

    #[test]
    fn text_is_coloured_only_when_asked() {
        assert!(log_with(LogFormat::Text, true).contains('\u{1b}'));
        assert!(!log_with(LogFormat::Text, false).contains('\u{1b}'));
    }
}
