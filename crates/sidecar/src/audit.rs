//! Audit: one JSON line per decision, written to stdout before the call is
//! forwarded or answered, and queued (bounded) for shipping to the controller
//! once written.
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
//! `seq`, `prevSeq` and `kid` are assigned here under one lock, and one
//! writer at a time writes all the lines waiting, in that order: lines reach
//! the output in `seq` order, whatever the sessions' concurrency. A call's
//! records are written before the call is forwarded or answered
//! ([`AuditLog::settled`]), by the request itself where the output takes
//! non-blocking writes, else by a writer thread (see [`AuditLog`]).
//!
//! Canonical form: the lines' fields are declared in byte order of their names
//! and nothing in them is a float or an integer beyond 2^53 (RFC 8785 writes
//! numbers as ECMAScript does), so a line as written is the canonical JSON of
//! the record ([`crate::canonical`]), and its SHA-256 is its record hash.
//! [`verify_log`] (from `chaperone_audit`, also behind `chaperonectl audit
//! verify`) checks a log.

use std::cell::Cell;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// The process's standard output (the Kubernetes log), as a
    /// [`AuditOutput::File`] of its own descriptor.
    Stdout,
    /// A pipe or file: requests write their lines to it themselves without
    /// blocking where the kernel allows that (`RWF_NOWAIT`, Linux), the
    /// writer thread otherwise.
    File(std::fs::File),
    /// Any writer (tests, benchmarks): the writer thread writes every line.
    Writer(Box<dyn Write + Send>),
}

impl AuditOutput {
    /// The output as a file, or as the writer to hand the writer thread.
    fn into_file(self) -> Result<std::fs::File, Box<dyn Write + Send>> {
        match self {
            Self::Stdout => match std::io::stdout().as_fd().try_clone_to_owned() {
                Ok(fd) => Ok(fd.into()),
                Err(err) => {
                    tracing::warn!(error = %err, "standard output not duplicated: the writer thread writes every audit line");
                    Err(Box::new(std::io::stdout()))
                }
            },
            Self::File(file) => Ok(file),
            Self::Writer(writer) => Err(writer),
        }
    }
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

tokio::task_local! {
    /// The `seq` of the last line the current request appended (see
    /// [`AuditLog::track_request`]).
    static REQUEST_LAST_SEQ: Cell<u64>;
}

/// The audit line could not be written: the call is refused (fail closed).
#[derive(Debug, Error)]
#[error("audit record could not be written: {0}")]
pub struct AuditWriteError(#[from] std::io::Error);

/// Default bound of the lines waiting for a writer, in bytes: a
/// stalled output (a log collector that stopped reading) refuses calls once
/// this much is waiting, instead of growing without bound.
pub const DEFAULT_PENDING_BYTES: usize = 8 << 20;

/// How long [`AuditLog::flush`] (and so [`AuditLog::close`]) waits for the
/// output before giving up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The sidecar's chain so far, and the lines not yet written.
struct Trail {
    /// `seq` of the last line appended (0: none yet).
    seq: u64,
    /// SHA-256 of the last line appended.
    last: Option<[u8; 32]>,
    /// Decisions appended.
    records: u64,
    /// Decisions appended since the last checkpoint.
    uncovered: u64,
    /// The final checkpoint is appended: nothing more may be.
    closed: bool,
    /// Lines appended and not yet taken by a writer, in `seq` order, each
    /// ending in its newline.
    pending: Vec<String>,
    /// Bytes in `pending`.
    pending_bytes: usize,
    /// `seq` of the last line the output took (and that was shipped).
    written: u64,
    /// The output failed: what it said. Nothing more is written.
    failed: Option<String>,
    /// Someone writes to the output (a request or the writer thread): the
    /// lines it took go out before anyone takes the next.
    output_busy: bool,
    /// Lines a request's non-blocking write could not finish, left to the
    /// writer thread (which then owns the busy output).
    handoff: Option<Batch>,
    /// Requests write their own lines without blocking (the output takes
    /// `RWF_NOWAIT` writes); false for other outputs and once it refused one.
    inline: bool,
    /// `pending` holds lines that no request will write (appended outside a
    /// request, or left by one that ended first): the writer thread writes them.
    unattended: bool,
    /// The writer thread is waiting for lines (so it must be woken).
    writer_idle: bool,
    /// The log is dropped: the writer drains what is pending and stops.
    dropped: bool,
    /// Threads waiting in [`AuditLog::flush`] (so a batch must wake them).
    flushers: usize,
    /// Batches the writer thread wrote (tests tell the two paths apart).
    thread_batches: u64,
}

/// Lines taken from [`Trail::pending`] by whoever writes them.
struct Batch {
    /// The lines, each ending in its newline, in `seq` order.
    lines: Vec<String>,
    /// Bytes at the start of `lines` that are already written.
    skip: usize,
    /// `seq` of the last of them.
    through: u64,
}

impl Trail {
    /// The error of an output that failed, if it did.
    fn failure(&self) -> Option<AuditWriteError> {
        self.failed
            .as_ref()
            .map(|message| std::io::Error::other(message.clone()).into())
    }

    /// Takes every pending line for the caller to write; the output is busy
    /// until the caller marks them written or hands them off.
    fn take_pending(&mut self) -> Batch {
        self.output_busy = true;
        self.unattended = false;
        self.pending_bytes = 0;
        Batch {
            lines: std::mem::take(&mut self.pending),
            skip: 0,
            through: self.seq,
        }
    }

    /// Whether the idle writer thread has work only it will do (a handoff, or
    /// unattended lines while nobody writes); if so it counts as woken.
    fn writer_needed(&mut self) -> bool {
        let needed = self.writer_idle
            && (self.handoff.is_some()
                || (self.unattended && !self.output_busy && !self.pending.is_empty()));
        if needed {
            self.writer_idle = false;
        }
        needed
    }

    /// Marks `through` written by the current owner of the output, or the
    /// output failed with `result`'s error; the output is free again.
    fn finish_write(&mut self, through: u64, result: std::io::Result<()>) {
        self.output_busy = false;
        match result {
            Ok(()) => self.written = through,
            Err(err) => {
                tracing::error!(error = %err, "audit output failed: refusing every call from now on");
                self.failed = Some(err.to_string());
                self.pending.clear();
                self.pending_bytes = 0;
            }
        }
    }
}

/// What the request path and the writer thread share.
struct Shared {
    trail: Mutex<Trail>,
    /// The output requests write to without blocking (see [`Trail::inline`]).
    inline_output: Option<Arc<std::fs::File>>,
    /// Wakes the writer thread: it has lines to write, or the log is dropped.
    lines_pending: Condvar,
    /// Signalled after each batch written (for [`AuditLog::flush`]).
    batch_written: Condvar,
    /// Wakes the tasks waiting in [`AuditLog::settled`] after each batch.
    settled: tokio::sync::Notify,
    /// Where written lines are queued for shipping.
    ship: Option<mpsc::Sender<Arc<str>>>,
    /// Lines the full shipping queue dropped.
    dropped: Counter,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Trail> {
        self.trail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues written `lines` for shipping (without their newlines).
    fn ship(&self, lines: &mut Vec<String>) {
        if let Some(ship) = &self.ship {
            for line in lines.drain(..) {
                let line = line.strip_suffix('\n').unwrap_or(&line);
                if ship.try_send(Arc::from(line)).is_err() {
                    self.dropped.inc();
                }
            }
        }
    }

    /// Unlocks the trail, then wakes the writer thread if it has work only
    /// it will do (woken under the lock, it would only block on it again),
    /// and, after a batch was written, whoever waits for one.
    fn release(&self, mut trail: MutexGuard<'_, Trail>, batch_written: bool) {
        let wake_writer = trail.writer_needed();
        let flushers = batch_written && trail.flushers > 0;
        drop(trail);
        if wake_writer {
            self.lines_pending.notify_one();
        }
        if flushers {
            self.batch_written.notify_all();
        }
        if batch_written {
            self.settled.notify_waiters();
        }
    }
}

/// Writes and ships audit records and checkpoints.
///
/// Lines get their `seq`, `prevSeq` and hash on the request path, under one
/// lock, and wait in order until one writer at a time takes all that are
/// waiting and writes them in one `write`, then queues them for shipping.
/// The request path appends a call's records before it signs the call's
/// assertion and awaits [`AuditLog::settled`] before it forwards the call or
/// answers: every record is written before its call is forwarded or
/// answered. Where the output is a pipe or file that takes non-blocking
/// writes (`RWF_NOWAIT`, the container runtime's pipe on Linux), the
/// request writes in `settled` itself, with no hand-off to another thread
/// and no wake-up to wait for; what would block (a pipe its reader does not
/// empty), lines appended outside requests, and every line of other outputs
/// go to a writer thread, so a stalled output never blocks the runtime. An
/// output that fails stops the trail: every later call is refused, and so
/// are calls waiting for their records.
pub struct AuditLog {
    shared: Arc<Shared>,
    signer: AssertionSigner,
    checkpoint_every: u64,
    /// Bound of the bytes waiting for a writer.
    max_pending_bytes: usize,
    shipping: bool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("kid", &self.kid())
            .field("shipping", &self.shipping)
            .field("checkpoint_every", &self.checkpoint_every)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// An audit log writing to `output` whose checkpoints `signer` signs (one
    /// every [`DEFAULT_CHECKPOINT_EVERY`] decisions at most); with `ship`,
    /// every line is also queued there once written (a full queue drops the
    /// line and counts it in `dropped`). Starts the writer thread.
    pub fn new(
        output: AuditOutput,
        ship: Option<mpsc::Sender<Arc<str>>>,
        dropped: Counter,
        signer: AssertionSigner,
    ) -> Self {
        let (inline_output, out): (_, Box<dyn Write + Send>) = match output.into_file() {
            Ok(file) => {
                let file = Arc::new(file);
                (Some(Arc::clone(&file)), Box::new(file))
            }
            Err(writer) => (None, writer),
        };
        let shared = Arc::new(Shared {
            trail: Mutex::new(Trail {
                seq: 0,
                last: None,
                records: 0,
                uncovered: 0,
                closed: false,
                pending: Vec::new(),
                pending_bytes: 0,
                written: 0,
                failed: None,
                output_busy: false,
                handoff: None,
                inline: inline_output.is_some() && cfg!(target_os = "linux"),
                unattended: false,
                writer_idle: false,
                dropped: false,
                flushers: 0,
                thread_batches: 0,
            }),
            inline_output,
            lines_pending: Condvar::new(),
            batch_written: Condvar::new(),
            settled: tokio::sync::Notify::new(),
            ship,
            dropped,
        });
        let shipping = shared.ship.is_some();
        let writer = WriterThread {
            shared: Arc::clone(&shared),
            out,
        };
        std::thread::Builder::new()
            .name("chaperone-audit".into())
            .spawn(move || writer.run())
            .expect("the audit writer thread starts");
        Self {
            shared,
            signer,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            max_pending_bytes: DEFAULT_PENDING_BYTES,
            shipping,
        }
    }

    /// Refuses new records while more than `bytes` wait for the output
    /// (default [`DEFAULT_PENDING_BYTES`]).
    pub fn with_max_pending_bytes(mut self, bytes: usize) -> Self {
        self.max_pending_bytes = bytes;
        self
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

    /// Runs `request` (the handling of one HTTP request) so that
    /// [`AuditLog::settled`] inside it waits for the lines it appended itself,
    /// not for those other requests appended meanwhile. Lines it appended and
    /// did not see written (it failed or was dropped first) are left to the
    /// writer thread when it ends.
    pub async fn track_request<F: Future>(&self, request: F) -> F::Output {
        REQUEST_LAST_SEQ
            .scope(Cell::new(0), async {
                let _left = LeftoverLines(self);
                request.await
            })
            .await
    }

    /// Appends `record` as the sidecar's next line and returns its hash (the
    /// next record of its session's `prev`); appends a checkpoint after it
    /// when `checkpoint_every` decisions are uncovered. It is written by
    /// [`AuditLog::settled`] or the writer thread. Fails once the log is
    /// closed, when the output has failed, or when more than the bound of
    /// [`AuditLog::with_max_pending_bytes`] waits for an output that does
    /// not take it.
    pub fn write(&self, record: &AuditRecord<'_>) -> Result<[u8; 32], AuditWriteError> {
        let mut trail = self.shared.lock();
        if trail.closed {
            return Err(std::io::Error::other(
                "the audit trail is closed: the sidecar is shutting down",
            )
            .into());
        }
        if let Some(failed) = trail.failure() {
            return Err(failed);
        }
        if trail.pending_bytes > self.max_pending_bytes {
            return Err(std::io::Error::other(format!(
                "the audit output is not taking lines ({} bytes waiting)",
                trail.pending_bytes
            ))
            .into());
        }
        let seq = trail.seq + 1;
        let prev_seq = trail.last.map(|hash| hex(&hash));
        let line = DecisionLine::new(record, self.kid(), seq, prev_seq.as_deref());
        let line = serde_json::to_string(&line).map_err(std::io::Error::other)?;
        let hash = self.append(&mut trail, line);
        trail.records += 1;
        trail.uncovered += 1;
        if trail.uncovered >= self.checkpoint_every
            && let Err(err) = self.append_checkpoint(&mut trail, false)
        {
            // The decision is appended; the next checkpoint covers it.
            tracing::error!(error = %err, "audit checkpoint not written");
        }
        self.shared.release(trail, false);
        Ok(hash)
    }

    /// Waits until the lines appended by the current request are written
    /// (and queued for shipping): inside [`AuditLog::track_request`] the
    /// lines it appended, elsewhere every line appended so far. Where the
    /// output takes non-blocking writes and nobody else is writing, writes
    /// them itself (with whatever else is pending). The proxy awaits it
    /// before it forwards a call and before a response goes back. Fails when
    /// the output failed.
    pub async fn settled(&self) -> Result<(), AuditWriteError> {
        let tracked = REQUEST_LAST_SEQ.try_with(Cell::get).ok();
        let through = tracked.unwrap_or_else(|| self.shared.lock().seq);
        if self.write_through(through)? {
            return Ok(());
        }
        loop {
            let notified = self.shared.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.write_through(through)? {
                return Ok(());
            }
            notified.await;
        }
    }

    /// Whether every line through `through` is written; first writes what is
    /// pending when that is for this caller to do (see [`AuditLog::settled`]).
    fn write_through(&self, through: u64) -> Result<bool, AuditWriteError> {
        let mut trail = self.shared.lock();
        loop {
            if let Some(failed) = trail.failure() {
                return Err(failed);
            }
            if trail.written >= through {
                return Ok(true);
            }
            // Lines to write, the output free, and the request's to write.
            let ours = trail.inline && !trail.output_busy && !trail.pending.is_empty();
            let Some(file) = self.shared.inline_output.as_deref().filter(|_| ours) else {
                return Ok(false);
            };
            let batch = trail.take_pending();
            drop(trail);
            self.write_inline(file, batch);
            trail = self.shared.lock();
        }
    }

    /// Writes `batch` to `file` (the inline output) without blocking; what
    /// it does not take at once goes to the writer thread.
    fn write_inline(&self, file: &std::fs::File, mut batch: Batch) {
        let total: usize = batch.lines.iter().map(String::len).sum();
        let taken = match write_nowait(file, &batch.lines) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(err) => {
                // The writer thread's ordinary write says whether the output
                // failed or only refuses non-blocking writes (a terminal,
                // a seccomp filter): either way, no more inline writes.
                tracing::info!(error = %err, "the audit output refused a non-blocking write: the writer thread writes every line");
                self.shared.lock().inline = false;
                0
            }
        };
        if taken == total {
            self.shared.ship(&mut batch.lines);
            let mut trail = self.shared.lock();
            trail.finish_write(batch.through, Ok(()));
            self.shared.release(trail, true);
        } else {
            batch.skip = taken;
            let mut trail = self.shared.lock();
            trail.handoff = Some(batch);
            self.shared.release(trail, false);
        }
    }

    /// Blocks until every line appended so far is written (for shutdown,
    /// tests and tools outside an async runtime); fails when the output
    /// failed or did not take the lines within ten seconds.
    pub fn flush(&self) -> Result<(), AuditWriteError> {
        let mut trail = self.shared.lock();
        let through = trail.seq;
        // Lines of requests still running are the writer thread's now.
        trail.unattended |= !trail.pending.is_empty();
        if trail.writer_needed() {
            self.shared.lines_pending.notify_one();
        }
        let deadline = std::time::Instant::now() + FLUSH_TIMEOUT;
        loop {
            if let Some(failed) = trail.failure() {
                return Err(failed);
            }
            if trail.written >= through {
                return Ok(());
            }
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                return Err(std::io::Error::other(format!(
                    "the audit output did not take {} pending lines in {FLUSH_TIMEOUT:?}",
                    trail.pending.len()
                ))
                .into());
            };
            trail.flushers += 1;
            trail = self
                .shared
                .batch_written
                .wait_timeout(trail, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            trail.flushers -= 1;
        }
    }

    /// Appends a checkpoint if decisions were appended since the last one;
    /// returns whether it did.
    pub fn checkpoint(&self) -> Result<bool, AuditWriteError> {
        let mut trail = self.shared.lock();
        if trail.closed || trail.uncovered == 0 {
            return Ok(false);
        }
        if let Some(failed) = trail.failure() {
            return Err(failed);
        }
        let appended = self.append_checkpoint(&mut trail, false);
        self.shared.release(trail, false);
        appended.map(|()| true)
    }

    /// Appends the final checkpoint (also when nothing is uncovered: it says
    /// the trail ends here), closes the log and waits until everything is
    /// written: later [`AuditLog::write`]s fail, so their calls are refused.
    /// Closing twice does nothing more.
    pub fn close(&self) -> Result<(), AuditWriteError> {
        {
            let mut trail = self.shared.lock();
            if trail.closed {
                drop(trail);
                return self.flush();
            }
            // Closed even if the checkpoint fails: nothing may follow the end.
            let appended = self.append_checkpoint(&mut trail, true);
            trail.closed = true;
            self.shared.release(trail, false);
            appended?;
        }
        self.flush()
    }

    /// Batches the writer thread wrote so far.
    #[cfg(test)]
    pub(crate) fn thread_batches(&self) -> u64 {
        self.shared.lock().thread_batches
    }

    /// Whether requests still write their own lines.
    #[cfg(test)]
    pub(crate) fn inline_writes(&self) -> bool {
        self.shared.lock().inline
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
        self.append(trail, line);
        trail.uncovered = 0;
        Ok(())
    }

    /// Appends `line` as the next of the chain and returns its hash. A line
    /// appended inside a tracked request is that request's to write (where
    /// the output allows); any other is the writer thread's.
    fn append(&self, trail: &mut Trail, mut line: String) -> [u8; 32] {
        let hash = sha256(line.as_bytes());
        line.push('\n');
        trail.seq += 1;
        let seq = trail.seq;
        let tracked = REQUEST_LAST_SEQ.try_with(|last| last.set(seq)).is_ok();
        if !(tracked && trail.inline) {
            trail.unattended = true;
        }
        trail.last = Some(hash);
        trail.pending_bytes += line.len();
        trail.pending.push(line);
        hash
    }
}

/// Held while a tracked request runs: when it ends (or is dropped) before
/// its lines are written, they are left to the writer thread.
struct LeftoverLines<'a>(&'a AuditLog);

impl Drop for LeftoverLines<'_> {
    fn drop(&mut self) {
        // Outside the request's scope (not expected): every line so far.
        let last = REQUEST_LAST_SEQ.try_with(Cell::get).unwrap_or(u64::MAX);
        let shared = &self.0.shared;
        let mut trail = shared.lock();
        if trail.written >= last.min(trail.seq) || trail.failed.is_some() {
            return;
        }
        // Lines already taken are being written; pending ones are the thread's.
        trail.unattended |= !trail.pending.is_empty();
        shared.release(trail, false);
    }
}

impl Drop for AuditLog {
    /// Lets the writer thread write what is pending and stop.
    fn drop(&mut self) {
        self.shared.lock().dropped = true;
        self.shared.lines_pending.notify_one();
    }
}

/// Writes as much of `lines` as `file` takes without blocking
/// (`pwritev2` with `RWF_NOWAIT`); returns the bytes written.
#[cfg(target_os = "linux")]
fn write_nowait(file: &std::fs::File, lines: &[String]) -> std::io::Result<usize> {
    let slices: Vec<std::io::IoSlice<'_>> = lines
        .iter()
        .map(|line| std::io::IoSlice::new(line.as_bytes()))
        .collect();
    // Offset -1: at the file's position (a pipe has none).
    rustix::io::pwritev2(file, &slices, u64::MAX, rustix::io::ReadWriteFlags::NOWAIT)
        .map_err(std::io::Error::from)
}

/// Elsewhere requests never write inline (see [`Trail::inline`]).
#[cfg(not(target_os = "linux"))]
fn write_nowait(_file: &std::fs::File, _lines: &[String]) -> std::io::Result<usize> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// The writer thread: writes what requests leave to it (handoffs, lines
/// appended outside requests, every line of an output that does not take
/// non-blocking writes), blocking on the output as long as it takes.
struct WriterThread {
    shared: Arc<Shared>,
    out: Box<dyn Write + Send>,
}

impl WriterThread {
    fn run(mut self) {
        let mut bytes = Vec::new();
        loop {
            let mut batch = {
                let mut trail = self.shared.lock();
                loop {
                    if trail.failed.is_some() {
                        return;
                    }
                    if let Some(batch) = trail.handoff.take() {
                        // The output stays busy: it is this thread's now.
                        break batch;
                    }
                    if !trail.pending.is_empty() && !trail.output_busy {
                        break trail.take_pending();
                    }
                    if trail.dropped && trail.pending.is_empty() && !trail.output_busy {
                        return;
                    }
                    trail.writer_idle = true;
                    trail = self
                        .shared
                        .lines_pending
                        .wait(trail)
                        .unwrap_or_else(|p| p.into_inner());
                }
            };
            bytes.clear();
            for line in &batch.lines {
                bytes.extend_from_slice(line.as_bytes());
            }
            let written = self
                .out
                .write_all(bytes.get(batch.skip..).unwrap_or_default())
                .and_then(|()| self.out.flush());
            if written.is_ok() {
                self.shared.ship(&mut batch.lines);
            }
            let mut trail = self.shared.lock();
            trail.writer_idle = false;
            trail.thread_batches += 1;
            trail.finish_write(batch.through, written);
            self.shared.release(trail, true);
        }
    }
}

pub use chaperone_audit::{VerifyError, verify_log};

/// RFC 3339 UTC time with milliseconds of `unix_ms`.
pub fn rfc3339_millis(unix_ms: i64) -> String {
    let time = CivilTime::of(unix_ms);
    if !(0..=9999).contains(&time.year) {
        return time.formatted();
    }
    // Every audit record carries one: digits written in place, not through
    // `format!` (≈ 3k instructions a call).
    let mut text = *b"0000-00-00T00:00:00.000Z";
    for (range, value) in [
        (0..4, time.year),
        (5..7, time.month),
        (8..10, time.day),
        (11..13, time.hour),
        (14..16, time.minute),
        (17..19, time.second),
        (20..23, time.millis),
    ] {
        let mut rest = value;
        for digit in text[range].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
    }
    // Only ASCII digits and separators were written.
    std::str::from_utf8(&text).unwrap_or_default().to_owned()
}

/// A UTC instant split into civil date and time fields.
struct CivilTime {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
    millis: i64,
}

impl CivilTime {
    fn of(unix_ms: i64) -> Self {
        let secs = unix_ms.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        let day_secs = secs.rem_euclid(86_400);
        // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Self {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day: doy - (153 * mp + 2) / 5 + 1,
            hour: day_secs / 3600,
            minute: (day_secs / 60) % 60,
            second: day_secs % 60,
            millis: unix_ms.rem_euclid(1000),
        }
    }

    /// The RFC 3339 text by `format!` (years outside 0–9999 included).
    fn formatted(&self) -> String {
        let Self {
            year,
            month,
            day,
            hour,
            minute,
            second,
            millis,
        } = self;
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
    }
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
