//! Audit: one JSON line per decision, written to stdout before the response goes
//! back, and queued (bounded) for shipping to the controller.
//!
//! Every line is in two hash chains: its session's (`prev`: the SHA-256 of the
//! session's previous line) and its sidecar's (`seq` 1, 2, 3, … across all
//! sessions, and `prevSeq`: the SHA-256 of the sidecar's previous line). Every
//! `checkpoint_every` decisions, on [`AuditLog::checkpoint`] (the sidecar's
//! timer) and at shutdown ([`AuditLog::close`]) the sidecar appends a
//! checkpoint to its chain: `kind` `checkpoint`, the count of decisions so
//! far, the time, and `sig`, its Ed25519 signature (the assertion key, whose
//! `kid` every line names) over the checkpoint's canonical JSON without `sig`.
//! A verifier with the sidecar's public key (the JWKS) so proves that no line
//! up to the checkpoint was left out, changed, reordered or made up.
//!
//! `seq`, `prevSeq` and `kid` are assigned here under one lock, which also
//! covers writing the line: lines reach the output in `seq` order, whatever
//! the sessions' concurrency.
//!
//! Canonical form: the lines' fields are declared in byte order of their names
//! and nothing in them is a float or an integer beyond 2^53 (RFC 8785 writes
//! numbers as ECMAScript does), so a line as written is the canonical JSON of
//! the record ([`crate::canonical`]), and its SHA-256 is its record hash.
//! [`verify_log`] (from `chaperone_audit`, also behind `chaperonectl audit
//! verify`) checks a log.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use chaperone_audit::CHECKPOINT_KIND;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::assertion::AssertionSigner;
use crate::canonical::{hex, sha256};

/// Default of how many decisions a checkpoint covers at most.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 100;

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
    /// The key of its scope: the trace id, the MCP session id, the task's
    /// Chaperone session id; empty for the agent.
    pub key: &'a str,
    /// The upstream's `Mcp-Session-Id` (empty if none).
    pub mcp: &'a str,
    /// The session scope the decision was made in: `task`, `trace`,
    /// `mcpSession`, `agent` or `unscoped` (see
    /// [`chaperone_policy::resolve_scope`]).
    pub scope: &'a str,
}

/// The person's approval a decision is about (a call a `requireApproval` rule
/// matched). Fields in byte order of their JSON names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AuditApproval<'a> {
    /// The approver's or denier's username, when someone decided.
    #[serde(rename = "decidedBy", skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<&'a str>,
    /// The ToolCallApproval's name (in the agent's namespace), when the
    /// controller named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// `Pending`, `Granted`, `Denied`, `Expired` or `Failed`
    /// ([`crate::approvals::ApprovalPhase`]).
    pub phase: &'a str,
}

/// The definition hashes of a tool whose call pinning refused (or, in dry
/// run, would have refused). Fields in byte order of their JSON names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AuditDefinition<'a> {
    /// The tool's current definition hash, when one has been listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<&'a str>,
    /// The pinned hash, when the tool has exactly one pin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<&'a str>,
}

/// One decision, as the call path knows it; [`AuditLog::write`] adds the
/// sidecar's `kid`, `seq` and `prevSeq`.
#[derive(Clone, Debug)]
pub struct AuditRecord<'a> {
    /// Who decided.
    pub agent: AuditAgent<'a>,
    /// The approval asked for the call, if any: written for calls refused
    /// while or after waiting for one (`decision` `approval`) and for
    /// calls a granted approval let through (`allow`).
    pub approval: Option<AuditApproval<'a>>,
    /// SHA-256 of the canonical arguments (`sha256:<hex>`).
    pub args: &'a str,
    /// The delegation chain, origin first (`namespace/name`); empty for own sessions.
    pub chain: &'a [String],
    /// Correlation id, also in the error returned for a denied call.
    pub correlation: &'a str,
    /// `allow`, `deny`, `wouldDeny`, `approval` (refused for want of a
    /// person's approval) or `wouldRequireApproval` (dry run: forwarded).
    pub decision: &'a str,
    /// The pinned and current definition of a tool whose call tool
    /// definition pinning refused (rule `toolPinning`); absent otherwise.
    pub definition: Option<AuditDefinition<'a>>,
    /// The verified user who initiated the task; absent when the chain's origin
    /// agent did.
    pub initiator: Option<&'a str>,
    /// Time the decision took, in microseconds.
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

/// A decision line: the record and its place in the sidecar's chain. Fields
/// are declared in byte order of their JSON names (see the module docs); keep
/// it so.
#[derive(Serialize)]
struct DecisionLine<'r, 'a> {
    agent: &'r AuditAgent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<&'r AuditApproval<'a>>,
    args: &'a str,
    chain: &'a [String],
    correlation: &'a str,
    decision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    definition: Option<&'r AuditDefinition<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initiator: Option<&'a str>,
    /// The sidecar's key id.
    kid: &'r str,
    #[serde(rename = "latencyUs")]
    latency_us: u64,
    method: &'a str,
    prev: Option<&'a str>,
    /// Hex SHA-256 of the sidecar's previous line; `null` for `seq` 1.
    #[serde(rename = "prevSeq")]
    prev_seq: Option<&'r str>,
    reason: &'a str,
    rule: &'a str,
    /// The line's number in the sidecar's chain, from 1.
    seq: u64,
    server: &'a str,
    session: &'r AuditSession<'a>,
    snapshot: u64,
    time: &'a str,
    tool: &'a str,
}

impl<'r, 'a> DecisionLine<'r, 'a> {
    fn new(record: &'r AuditRecord<'a>, kid: &'r str, seq: u64, prev_seq: Option<&'r str>) -> Self {
        Self {
            agent: &record.agent,
            approval: record.approval.as_ref(),
            args: record.args,
            chain: record.chain,
            correlation: record.correlation,
            decision: record.decision,
            definition: record.definition.as_ref(),
            initiator: record.initiator,
            kid,
            latency_us: record.latency_us,
            method: record.method,
            prev: record.prev,
            prev_seq,
            reason: record.reason,
            rule: record.rule,
            seq,
            server: record.server,
            session: &record.session,
            snapshot: record.snapshot,
            time: record.time,
            tool: record.tool,
        }
    }
}

/// A checkpoint line. Fields in byte order of their JSON names; `sig` is left
/// out for the bytes it signs.
#[derive(Serialize)]
struct CheckpointLine<'a> {
    /// Written at shutdown: nothing of this sidecar follows.
    #[serde(rename = "final")]
    is_final: bool,
    kid: &'a str,
    kind: &'static str,
    /// Hex SHA-256 of the last line it covers.
    #[serde(rename = "prevSeq")]
    prev_seq: Option<&'a str>,
    /// Decisions the sidecar has written so far.
    records: u64,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<&'a str>,
    time: &'a str,
}

/// Where audit lines go besides the shipping queue.
pub enum AuditOutput {
    /// The process's standard output (the Kubernetes log).
    Stdout,
    /// Any writer (tests, benchmarks).
    Writer(Box<dyn Write + Send>),
}

/// An in-memory audit output for tests and benchmarks: hand a clone to
/// [`AuditOutput::Writer`], read what was written from another.
#[derive(Clone, Debug, Default)]
pub struct AuditBuffer(Arc<Mutex<Vec<u8>>>);

impl AuditBuffer {
    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// The lines written so far that parse as JSON.
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Forgets what was written.
    pub fn clear(&self) {
        self.bytes().clear();
    }
}

impl Write for AuditBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The audit line could not be written: the call is refused (fail closed).
#[derive(Debug, Error)]
#[error("audit record could not be written: {0}")]
pub struct AuditWriteError(#[from] std::io::Error);

/// The sidecar's chain so far, and where it goes.
struct Trail {
    out: Box<dyn Write + Send>,
    /// `seq` of the last line written (0: none yet).
    seq: u64,
    /// SHA-256 of the last line written.
    last: Option<[u8; 32]>,
    /// Decisions written.
    records: u64,
    /// Decisions written since the last checkpoint.
    uncovered: u64,
    /// The final checkpoint is written: nothing more may be.
    closed: bool,
}

/// Writes and ships audit records and checkpoints.
pub struct AuditLog {
    trail: Mutex<Trail>,
    ship: Option<mpsc::Sender<Arc<str>>>,
    dropped: Counter,
    signer: AssertionSigner,
    checkpoint_every: u64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("kid", &self.kid())
            .field("shipping", &self.ship.is_some())
            .field("checkpoint_every", &self.checkpoint_every)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// An audit log writing to `output` whose checkpoints `signer` signs (one
    /// every [`DEFAULT_CHECKPOINT_EVERY`] decisions at most); with `ship`,
    /// every line is also queued there (a full queue drops the line and counts
    /// it in `dropped`).
    pub fn new(
        output: AuditOutput,
        ship: Option<mpsc::Sender<Arc<str>>>,
        dropped: Counter,
        signer: AssertionSigner,
    ) -> Self {
        let out: Box<dyn Write + Send> = match output {
            AuditOutput::Stdout => Box::new(std::io::stdout()),
            AuditOutput::Writer(writer) => writer,
        };
        Self {
            trail: Mutex::new(Trail {
                out,
                seq: 0,
                last: None,
                records: 0,
                uncovered: 0,
                closed: false,
            }),
            ship,
            dropped,
            signer,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
        }
    }

    /// A checkpoint after at most `every` decisions (at least 1).
    pub fn with_checkpoint_every(mut self, every: u64) -> Self {
        self.checkpoint_every = every.max(1);
        self
    }

    /// The key id every line names.
    pub fn kid(&self) -> &str {
        &self.signer.registration().kid
    }

    fn lock(&self) -> MutexGuard<'_, Trail> {
        self.trail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `record` as the sidecar's next line and returns its hash (the
    /// next record of its session's `prev`); writes a checkpoint after it when
    /// `checkpoint_every` decisions are uncovered. Fails once the log is
    /// closed.
    pub fn write(&self, record: &AuditRecord<'_>) -> Result<[u8; 32], AuditWriteError> {
        let mut trail = self.lock();
        if trail.closed {
            return Err(std::io::Error::other(
                "the audit trail is closed: the sidecar is shutting down",
            )
            .into());
        }
        let seq = trail.seq + 1;
        let prev_seq = trail.last.map(|hash| hex(&hash));
        let line = DecisionLine::new(record, self.kid(), seq, prev_seq.as_deref());
        let line = serde_json::to_string(&line).map_err(std::io::Error::other)?;
        let hash = self.append(&mut trail, line)?;
        trail.records += 1;
        trail.uncovered += 1;
        if trail.uncovered >= self.checkpoint_every
            && let Err(err) = self.append_checkpoint(&mut trail, false)
        {
            // The decision is written; the next checkpoint covers it.
            tracing::error!(error = %err, "audit checkpoint not written");
        }
        Ok(hash)
    }

    /// Writes a checkpoint if decisions were written since the last one;
    /// returns whether it did.
    pub fn checkpoint(&self) -> Result<bool, AuditWriteError> {
        let mut trail = self.lock();
        if trail.closed || trail.uncovered == 0 {
            return Ok(false);
        }
        self.append_checkpoint(&mut trail, false)?;
        Ok(true)
    }

    /// Writes the final checkpoint (also when nothing is uncovered: it says
    /// the trail ends here) and closes the log: later [`AuditLog::write`]s
    /// fail, so their calls are refused. Closing twice does nothing.
    pub fn close(&self) -> Result<(), AuditWriteError> {
        let mut trail = self.lock();
        if trail.closed {
            return Ok(());
        }
        // Closed even if the checkpoint fails: nothing may follow the end.
        let written = self.append_checkpoint(&mut trail, true);
        trail.closed = true;
        written
    }

    /// Signs and appends a checkpoint covering every line so far.
    fn append_checkpoint(&self, trail: &mut Trail, is_final: bool) -> Result<(), AuditWriteError> {
        let prev_seq = trail.last.map(|hash| hex(&hash));
        let time = rfc3339_millis(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        );
        let mut checkpoint = CheckpointLine {
            is_final,
            kid: self.kid(),
            kind: CHECKPOINT_KIND,
            prev_seq: prev_seq.as_deref(),
            records: trail.records,
            seq: trail.seq + 1,
            sig: None,
            time: &time,
        };
        let unsigned = serde_json::to_vec(&checkpoint).map_err(std::io::Error::other)?;
        let sig = self.signer.sign_detached(&unsigned);
        checkpoint.sig = Some(&sig);
        let line = serde_json::to_string(&checkpoint).map_err(std::io::Error::other)?;
        self.append(trail, line)?;
        trail.uncovered = 0;
        Ok(())
    }

    /// Writes `line` as the next of the chain, ships it, and returns its hash.
    fn append(&self, trail: &mut Trail, mut line: String) -> Result<[u8; 32], AuditWriteError> {
        let hash = sha256(line.as_bytes());
        line.push('\n');
        trail.out.write_all(line.as_bytes())?;
        trail.out.flush()?;
        trail.seq += 1;
        trail.last = Some(hash);
        if let Some(ship) = &self.ship {
            line.pop();
            // Queued under the lock too, so the controller gets `seq` order.
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
#[path = "audit_tests.rs"]
mod tests;
