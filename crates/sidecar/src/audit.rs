//! Audit: one JSON line per decision, written to stdout before the response goes
//! back, hash-linked per session, and queued (bounded) for shipping to the
//! controller.
//!
//! Canonical form: the record's fields are declared in byte order of their names
//! and nothing in it is a float, so the line as written is the canonical JSON of
//! the record ([`crate::canonical`]); `prev` is the SHA-256 of the previous line
//! of the same session. [`verify_log`] (from `chaperone_audit`, also behind
//! `chaperonectl audit verify`) checks a log.

use std::io::Write;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::canonical::sha256;

/// The agent a record is about.
#[derive(Clone, Debug, Serialize)]
pub struct AuditAgent<'a> {
    /// AgentIdentity name.
    pub name: &'a str,
    /// AgentIdentity namespace.
    pub namespace: &'a str,
    /// Pod name.
    pub pod: &'a str,
}

/// The session a record belongs to.
#[derive(Clone, Debug, Serialize)]
pub struct AuditSession<'a> {
    /// Chaperone session id.
    pub chaperone: &'a str,
    /// The upstream's `Mcp-Session-Id` (empty if none).
    pub mcp: &'a str,
}

/// One decision. Fields are declared in byte order of their JSON names (see the
/// module docs); keep it so.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// Who decided.
    pub agent: AuditAgent<'a>,
    /// SHA-256 of the canonical arguments (`sha256:<hex>`).
    pub args: &'a str,
    /// The delegation chain, origin first (`namespace/name`); empty for own sessions.
    pub chain: &'a [String],
    /// Correlation id, also in the error returned for a denied call.
    pub correlation: &'a str,
    /// `allow`, `deny` or `wouldDeny`.
    pub decision: &'a str,
    /// The verified user who initiated the task; absent when the chain's origin
    /// agent did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator: Option<&'a str>,
    /// Time the decision took, in microseconds.
    #[serde(rename = "latencyUs")]
    pub latency_us: u64,
    /// The JSON-RPC method (`tools/call`, `resources/read`, …).
    pub method: &'a str,
    /// Hex SHA-256 of the previous record of this session; `null` for the first.
    pub prev: Option<&'a str>,
    /// Why.
    pub reason: &'a str,
    /// The rule that decided (`policy/rule`) or a fixed reason.
    pub rule: &'a str,
    /// Tool server name.
    pub server: &'a str,
    /// The session.
    pub session: AuditSession<'a>,
    /// Snapshot version that decided.
    pub snapshot: u64,
    /// When, RFC 3339 UTC with milliseconds.
    pub time: &'a str,
    /// Tool (or `resource:<uri>`, `prompt:<name>`).
    pub tool: &'a str,
}

/// Where audit lines go besides the shipping queue.
pub enum AuditOutput {
    /// The process's standard output (the Kubernetes log).
    Stdout,
    /// Any writer (tests, benchmarks).
    Writer(Box<dyn Write + Send>),
}

/// The audit line could not be written: the call is refused (fail closed).
#[derive(Debug, Error)]
#[error("audit record could not be written: {0}")]
pub struct AuditWriteError(#[from] std::io::Error);

/// Writes and ships audit records.
pub struct AuditLog {
    out: Mutex<Box<dyn Write + Send>>,
    ship: Option<mpsc::Sender<Arc<str>>>,
    dropped: Counter,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("shipping", &self.ship.is_some())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// An audit log writing to `output`; with `ship`, every line is also queued
    /// there (a full queue drops the line and counts it in `dropped`).
    pub fn new(
        output: AuditOutput,
        ship: Option<mpsc::Sender<Arc<str>>>,
        dropped: Counter,
    ) -> Self {
        let out: Box<dyn Write + Send> = match output {
            AuditOutput::Stdout => Box::new(std::io::stdout()),
            AuditOutput::Writer(writer) => writer,
        };
        Self {
            out: Mutex::new(out),
            ship,
            dropped,
        }
    }

    /// Writes `record` and returns its hash (the next record's `prev`).
    pub fn write(&self, record: &AuditRecord<'_>) -> Result<[u8; 32], AuditWriteError> {
        let mut line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        let hash = sha256(line.as_bytes());
        line.push('\n');
        {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            out.write_all(line.as_bytes())?;
            out.flush()?;
        }
        if let Some(ship) = &self.ship {
            line.pop();
            if ship.try_send(Arc::from(line)).is_err() {
                self.dropped.inc();
            }
        }
        Ok(hash)
    }
}

pub use chaperone_audit::{VerifyError, verify_log};

/// RFC 3339 UTC time with milliseconds of `unix_ms`.
pub fn rfc3339_millis(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let millis = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let day_secs = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        day_secs / 3600,
        (day_secs / 60) % 60,
        day_secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::{canonical, hex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record<'a>(session: &'a str, prev: Option<&'a str>, tool: &'a str) -> AuditRecord<'a> {
        AuditRecord {
            agent: AuditAgent {
                name: "a",
                namespace: "ns",
                pod: "p",
            },
            args: "sha256:00",
            chain: &[],
            correlation: "c",
            decision: "allow",
            initiator: None,
            latency_us: 3,
            method: "tools/call",
            prev,
            reason: "an allow rule matched \"x\"",
            rule: "p/r",
            server: "s",
            session: AuditSession {
                chaperone: session,
                mcp: "m",
            },
            snapshot: 1,
            time: "2026-01-01T00:00:00.000Z",
            tool,
        }
    }

    #[test]
    fn the_written_line_is_canonical() {
        let line = serde_json::to_string(&record("s1", None, "t")).unwrap();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(canonical(&value), line);
    }

    #[test]
    fn records_chain_per_session_and_verify() {
        let buffer = Shared::default();
        let log = AuditLog::new(
            AuditOutput::Writer(Box::new(buffer.clone())),
            None,
            Counter::default(),
        );
        let h1 = hex(&log.write(&record("s1", None, "a")).unwrap());
        log.write(&record("s2", None, "b")).unwrap();
        log.write(&record("s1", Some(&h1), "c")).unwrap();
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(verify_log(&text).map(|summary| summary.records), Ok(3));
        let tampered = text.replacen("\"tool\":\"a\"", "\"tool\":\"x\"", 1);
        assert!(matches!(
            verify_log(&tampered),
            Err(VerifyError::BrokenLink {
                line: 3,
                previous: 1,
                ..
            })
        ));
    }

    #[test]
    fn full_shipping_queue_counts_drops() {
        let (tx, _rx) = mpsc::channel(1);
        let dropped = Counter::default();
        let log = AuditLog::new(
            AuditOutput::Writer(Box::new(std::io::sink())),
            Some(tx),
            dropped.clone(),
        );
        log.write(&record("s", None, "a")).unwrap();
        log.write(&record("s", None, "b")).unwrap();
        assert_eq!(dropped.get(), 1);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
    }
}
