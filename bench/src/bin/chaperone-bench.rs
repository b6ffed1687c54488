//! `chaperone-bench`: runs the sidecar benchmark end to end and prints the
//! "Sidecar" section of `bench/RESULTS.md`.
//!
//! Starts `mcp-echo` (upstream), `bare-proxy` (baseline) and `chaperone-sidecar`
//! from the directory of this binary, then alternates targets (direct, bare
//! proxy, Chaperone) for each run: fixed rate (1 KB `tools/call`, keep-alive,
//! several connections each with its own MCP session) with p50/p99/p99.9,
//! proxy CPU per call and RSS; closed loop (32 connections) throughput; and
//! the sidecar's RSS with a 1,000-tool snapshot and 10,000 sessions. Medians
//! over the runs. For the proxies it also prints where a call's time went
//! inside them (the bare proxy's own timings, the sidecar's
//! `chaperone_sidecar_stage_duration_seconds` means).
//!
//! What is exercised, as in production:
//! - Controller mode. The sidecar gets its snapshot from the controller's
//!   stream (`SnapshotService/Watch`, gRPC over TLS, a bearer token read from
//!   its token file, the CA given inline in `CHAPERONE_CA_PEM`), served by a
//!   fake controller running in this process on a thread of its own
//!   ([`chaperone_bench::fake_controller`]). The policy's CR YAML is compiled
//!   by the policy core, the update is built and the sidecar's messages are
//!   decoded by the controller's own code, and the bench waits for the
//!   sidecar's ACK of that snapshot before measuring. The RSS measurement
//!   (1,000-tool snapshot, 10,000 sessions) is in controller mode too, against
//!   a second fake serving that snapshot.
//! - Per call: a decision by a policy whose deny rules have session
//!   conditions (`anyEffectSeen`), evaluated on every call (and false: the
//!   calls stay allowed); an audit record written as one line to the
//!   sidecar's stdout, a pipe this process reads to the end (as the container
//!   runtime does), and also queued and shipped to the controller in
//!   `AuditBatch`es over the snapshot stream, which the fake reads and
//!   counts; the call forwarded with a freshly signed assertion (its nonce
//!   made ahead by the sidecar's nonce thread, whose CPU is in the sidecar's
//!   figures; `CHAPERONE_SIGNING_NONCES=0` in this process's environment,
//!   which the sidecar inherits, signs on the call's path instead). The signed
//!   audit checkpoints (every 100 decisions, and on the sidecar's timer) are
//!   written and shipped alike.
//! - The printed audit counts check it: `tools/call`s made, lines read from
//!   the stdout pipe, records (and batches, and drops) the fake controller
//!   received, and the sidecar's `chaperone_sidecar_decisions_total` (every
//!   call allowed by rule `echo-short-text`) and snapshot version.
//! - The log level of an injected sidecar: `RUST_LOG` is `info` (the default
//!   the webhook leaves in place) unless this process's environment sets it;
//!   logs go to a file. No OTLP endpoint (traces off, the chart's default).
//!
//! What is not exercised: Kubernetes (the fake compares the token, it does not
//! review it; no pod, no kubelet, no Service: the sidecar dials the fake's
//! loopback address and verifies its certificate against the Service's name);
//! a controller's own work (one snapshot, never edited; no key set updates;
//! no status; audit records are counted, not turned into Events); delegation,
//! approvals, tool pinning and inventory reports, rate limits, `tools/list`
//! filtering and SSE responses (the calls are plain JSON `tools/call`s of one
//! allowed tool); TLS to the tool server (the upstream is plain HTTP on
//! loopback). Every process (load generator, fake controller, sidecar,
//! upstream) shares the same machine's CPUs; the fake's work (TLS, decoding
//! the audit batches) is in this process, not the sidecar's CPU figures.
//!
//! `--standalone` adds the sidecar in standalone mode (`--policy-dir`, a
//! directory of the same policy written here: no controller stream, so no
//! audit shipping and no gRPC connection) as a fourth target, and to the RSS
//! measurement, for comparison; it is not part of the default run.
//!
//! `--rss-only` runs only the RSS measurement. `CHAPERONE_BENCH_WRAP`, when
//! set, is a command each sidecar runs under (`heaptrack -o FILE`, to find
//! where its memory goes; the RSS printed is then the wrapper's too).
//!
//! `--instructions` counts instead the user-space instructions per call of
//! the bare proxy and the sidecar, each run under `valgrind
//! --tool=callgrind` (instrumentation on only while the measured calls are
//! made): RATE × FIXED_SECONDS calls over CONNECTIONS, RUNS times. Latency
//! and CPU time on a shared machine move with its load; this count does
//! not, so one run shows what a change to the call path costs or saves (the
//! kernel's share is not in it). Use a low rate: under callgrind a call
//! takes milliseconds (`chaperone-bench --instructions 3 10 20 2`).
//!
//! `--workers N` gives both proxies N runtime worker threads
//! (`CHAPERONE_WORKER_THREADS`, default 1: what the injection webhook gives
//! a sidecar whose CPU limit, else request, is at most one core).
//!
//! Usage: `chaperone-bench [--standalone] [--rss-only | --instructions] [--workers N] [RUNS] [FIXED_SECONDS] [RATE] [CONNECTIONS] [CLOSED_SECONDS]`
//! (defaults 3 20 1000 8 10).

#![forbid(unsafe_code)]

use std::io::Read as _;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use chaperone_bench::fake_controller::{FakeController, Received, THREAD_NAME, compile_snapshot};
use chaperone_bench::instructions::{Callgrind, callgrind_wrapper};
use chaperone_bench::{BARE_STATS_PATH, INITIALIZE, tools_call_body};
use chaperone_wire::sidecar_env::{ENV_ADMIN_LISTEN, ENV_LISTEN, ENV_WORKER_THREADS};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

const ECHO: &str = "127.0.0.1:18080";
const BARE: &str = "127.0.0.1:18081";
const SIDECAR: &str = "127.0.0.1:18082";
const SIDECAR_ADMIN: &str = "127.0.0.1:18090";
const SIDECAR_RSS: &str = "127.0.0.1:18083";
const SIDECAR_RSS_ADMIN: &str = "127.0.0.1:18091";
const STANDALONE: &str = "127.0.0.1:18084";
const STANDALONE_ADMIN: &str = "127.0.0.1:18092";
const STANDALONE_RSS: &str = "127.0.0.1:18085";
const STANDALONE_RSS_ADMIN: &str = "127.0.0.1:18093";

/// Environment variable: a command (with arguments) to run each sidecar
/// under, such as a heap profiler.
const ENV_WRAP: &str = "CHAPERONE_BENCH_WRAP";

/// The pod the sidecar says it is (`CHAPERONE_POD_NAME`) and the fake
/// controller names in its updates.
const POD: &str = "bench-agent-0";
/// Longest a sidecar may take to ACK its snapshot and become ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Flags of the harness.
#[derive(Debug, Parser)]
#[command(
    name = "chaperone-bench",
    about = "Benchmarks chaperone-sidecar (controller mode) against a bare proxy and no proxy"
)]
struct Args {
    /// Runs; the medians over them are printed.
    #[arg(default_value_t = 3)]
    runs: u64,
    /// Seconds of each fixed-rate measurement.
    #[arg(default_value_t = 20)]
    fixed_seconds: u64,
    /// Calls per second of the fixed-rate measurement.
    #[arg(default_value_t = 1000)]
    rate: u64,
    /// Connections (one MCP session each) of the fixed-rate measurement.
    #[arg(default_value_t = 8)]
    connections: u64,
    /// Seconds of each closed-loop measurement (32 connections).
    #[arg(default_value_t = 10)]
    closed_seconds: u64,
    /// Also measure the sidecar in standalone mode (a policy directory; no
    /// controller stream, no audit shipping), for comparison.
    #[arg(long)]
    standalone: bool,
    /// Only the RSS measurement (1,000-tool snapshot, 10,000 sessions): no
    /// latency, CPU or throughput runs.
    #[arg(long)]
    rss_only: bool,
    /// Only instructions per call: the bare proxy and the sidecar run under
    /// `valgrind --tool=callgrind`, which counts the user-space instructions
    /// of RATE × FIXED_SECONDS calls over CONNECTIONS, RUNS times each (a
    /// count that does not move with the machine's load).
    #[arg(long, conflicts_with = "rss_only")]
    instructions: bool,
    /// Runtime worker threads of the sidecar and of the bare proxy
    /// (`CHAPERONE_WORKER_THREADS`); 1 is what the injection webhook gives a
    /// sidecar without a CPU limit of more than one core.
    #[arg(long, default_value = "1")]
    workers: NonZeroUsize,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        let _ = self.0.kill();
        let _ = self.0.wait();
        // Killed, valgrind leaves its gdbserver FIFOs behind (named with its
        // pid, which is the proxy's).
        let ours = format!("-{pid}-by-");
        if let Ok(entries) = std::fs::read_dir("/tmp") {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("vgdb-pipe-") && name.contains(&ours) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// The binaries this harness starts (from its own directory), and the
/// runtime the two proxies get.
struct Binaries {
    dir: PathBuf,
    /// `CHAPERONE_WORKER_THREADS` of the sidecar and of the bare proxy.
    worker_threads: NonZeroUsize,
}

impl Binaries {
    fn new(worker_threads: NonZeroUsize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("binary has no directory")?.to_owned();
        Ok(Self {
            dir,
            worker_threads,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The environment giving a proxy [`Self::worker_threads`].
    fn runtime_env(&self) -> (&'static str, String) {
        (ENV_WORKER_THREADS, self.worker_threads.to_string())
    }
}

/// The wrapper of [`ENV_WRAP`], split into words (none when unset): a
/// profiler to run each sidecar under (e.g. `heaptrack -o FILE`); its RSS
/// figures are then the wrapper's, not the sidecar's alone.
fn env_wrapper() -> Vec<String> {
    std::env::var(ENV_WRAP)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A command running `bin` under `wrapper` (a program and its arguments),
/// or `bin` itself when `wrapper` is empty.
fn wrapped_command(wrapper: &[String], bin: &Path) -> Command {
    match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest).arg(bin);
            command
        }
        None => Command::new(bin),
    }
}

fn spawn(bin: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Proc> {
    spawn_wrapped(&[], bin, args, env)
}

fn spawn_wrapped(
    wrapper: &[String],
    bin: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> anyhow::Result<Proc> {
    let mut command = wrapped_command(wrapper, bin);
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    Ok(Proc(
        command
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    ))
}

/// Starts a sidecar whose stdout (its audit trail) is a pipe that a thread
/// of this process reads to the end, as a container runtime reads a
/// container's output; the count of lines read goes to `lines`. Its stderr
/// (logs) goes to the file `stderr`.
fn spawn_sidecar(
    bin: &Path,
    args: &[String],
    env: &[(&str, String)],
    lines: Arc<AtomicU64>,
    stderr: &Path,
    wrapper: &[String],
) -> anyhow::Result<Proc> {
    let log =
        std::fs::File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?;
    let mut command = wrapped_command(wrapper, bin);
    command.args(args).stdout(Stdio::piped()).stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut out = child.stdout.take().context("the sidecar's stdout")?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            let newlines = buf[..n].iter().filter(|&&b| b == b'\n').count();
            lines.fetch_add(newlines as u64, Ordering::Relaxed);
        }
    });
    Ok(Proc(child))
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) so far of the threads of this process named
/// `name` (the fake controller's: its work is not in the sidecar's figures).
fn threads_cpu_seconds(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .map(|task| stat_cpu_seconds(&task.path().join("stat").to_string_lossy()))
        .sum()
}

/// User + system CPU seconds of a `/proc/.../stat` file.
fn stat_cpu_seconds(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Context switches of every thread of a process so far (voluntary: a
/// thread blocked or parked; involuntary: preempted).
fn context_switches(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let mut total = (0, 0);
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let value = |v: &str| v.trim().parse::<u64>().unwrap_or(0);
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                total.0 += value(v);
            } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                total.1 += value(v);
            }
        }
    }
    total
}

/// Resident set size of a process, MiB.
fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// One of the `/proc/PID/status` sizes (`VmRSS:`, `RssAnon:`, …), MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0.0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A process's resident memory: total, anonymous (heap, stacks) and file
/// (the binary's and libraries' pages it touched), MiB.
#[derive(Clone, Copy, Debug)]
struct Rss {
    total: f64,
    anon: f64,
    file: f64,
}

impl Rss {
    fn of(pid: u32) -> Self {
        Self {
            total: status_mib(pid, "VmRSS:"),
            anon: status_mib(pid, "RssAnon:"),
            file: status_mib(pid, "RssFile:"),
        }
    }
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB ({:.1} anonymous, {:.1} file)",
            self.total, self.anon, self.file
        )
    }
}

async fn connect(addr: &str) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn post(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: &str,
    session: Option<&str>,
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, Option<String>)> {
    sender.ready().await?;
    let mut request = http::Request::post(format!("http://{addr}/echo"))
        .header("host", addr)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18");
    if let Some(session) = session {
        request = request.header("mcp-session-id", session);
    }
    let response = sender.send_request(request.body(Full::new(body))?).await?;
    let status = response.status();
    let sid = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    response.into_body().collect().await?;
    Ok((status, sid))
}

async fn open_session(addr: &str) -> anyhow::Result<(SendRequest<Full<Bytes>>, Option<String>)> {
    let mut sender = connect(addr).await?;
    let (status, sid) = post(
        &mut sender,
        addr,
        None,
        Bytes::from_static(INITIALIZE.as_bytes()),
    )
    .await?;
    if !status.is_success() {
        bail!("initialize through {addr}: {status}");
    }
    let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    post(&mut sender, addr, sid.as_deref(), note).await?;
    Ok((sender, sid))
}

/// Fixed-rate load: latencies in microseconds.
async fn fixed_rate(addr: &str, rate: u64, seconds: u64, conns: u64) -> anyhow::Result<Vec<u32>> {
    let sessions = open_sessions(addr, conns).await?;
    calls_at_rate(addr, sessions, rate, rate * seconds).await
}

/// `conns` connections, each with an MCP session opened.
async fn open_sessions(addr: &str, conns: u64) -> anyhow::Result<Vec<Session>> {
    let mut sessions = Vec::new();
    for _ in 0..conns {
        sessions.push(open_session(addr).await?);
    }
    Ok(sessions)
}

/// A connection and the MCP session opened on it.
type Session = (SendRequest<Full<Bytes>>, Option<String>);

/// `total` calls at `rate` per second, spread over `sessions` in turn:
/// latencies in microseconds, sorted.
async fn calls_at_rate(
    addr: &str,
    sessions: Vec<Session>,
    rate: u64,
    total: u64,
) -> anyhow::Result<Vec<u32>> {
    let conns = sessions.len() as u64;
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for (k, (mut sender, sid)) in sessions.into_iter().enumerate() {
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity((total / conns + 1) as usize);
            let mut i = k as u64;
            while i < total {
                let at = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                tokio::time::sleep_until(at).await;
                let body = Bytes::from(tools_call_body(i + 1, 1024));
                let sent = Instant::now();
                let (status, _) = post(&mut sender, &addr, sid.as_deref(), body).await?;
                if !status.is_success() {
                    bail!("tools/call through {addr}: {status}");
                }
                latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                i += conns;
            }
            Ok(latencies)
        }));
    }
    let mut all = Vec::with_capacity(total as usize);
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort_unstable();
    Ok(all)
}

/// Closed-loop load: completed calls, and calls per second.
async fn closed_loop(addr: &str, seconds: u64, conns: u64) -> anyhow::Result<(u64, f64)> {
    let sessions = open_sessions(addr, conns).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (mut sender, sid) in sessions {
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let body = Bytes::from(tools_call_body(1, 1024));
            while Instant::now() < deadline {
                let (status, _) = post(&mut sender, &addr, sid.as_deref(), body.clone()).await?;
                if !status.is_success() {
                    bail!("tools/call through {addr}: {status}");
                }
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += task.await??;
    }
    Ok((done, done as f64 / started.elapsed().as_secs_f64()))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)])
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The benchmark's CR documents (`(file name, YAML)`): AgentIdentity
/// `bench/bench-agent` with tool server `echo` (the `mcp-echo` upstream), and
/// ToolPolicy `bench` whose deny rules have session conditions, evaluated on
/// every call, and whose allow rule has an argument condition; with
/// `extra_tools` more tools, each with an allow rule of its own.
fn policy_files(extra_tools: usize) -> [(&'static str, String); 2] {
    let identity = format!(
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentity\nmetadata:\n  name: bench-agent\n  namespace: bench\nspec:\n  selector:\n    serviceAccountName: bench-agent\n  toolServers:\n    - name: echo\n      url: http://{ECHO}/mcp\n  session:\n    idleTimeoutSeconds: 3600\n    maxCalls: 1000000\n"
    );
    let mut policy = String::from(
        "apiVersion: chaperone.dev/v1alpha1\nkind: ToolPolicy\nmetadata:\n  name: bench\n  namespace: bench\nspec:\n  targetRefs:\n    - name: bench-agent\n  tools:\n    - name: echo\n      effects: [read]\n    - name: send_*\n      effects: [externalCommunication]\n",
    );
    for i in 0..extra_tools {
        policy.push_str(&format!("    - name: tool_{i}\n      effects: [write]\n"));
    }
    policy.push_str(
        "  rules:\n    - name: no-exfiltration\n      action: deny\n      tools:\n        - effect: externalCommunication\n      when:\n        session:\n          anyEffectSeen: [sensitiveData]\n    - name: no-echo-after-sensitive-data\n      action: deny\n      tools:\n        - name: echo\n      when:\n        session:\n          anyEffectSeen: [sensitiveData]\n    - name: echo-short-text\n      action: allow\n      tools:\n        - name: echo\n      when:\n        args:\n          - pointer: /text\n            type: string\n",
    );
    for i in 0..extra_tools {
        policy.push_str(&format!(
            "    - name: tool-{i}\n      action: allow\n      tools:\n        - name: tool_{i}\n      when:\n        args:\n          - pointer: /id\n            lessThan: {i}\n"
        ));
    }
    [("identity.yaml", identity), ("policy.yaml", policy)]
}

/// Where a sidecar under test takes its snapshot from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The (fake) controller's stream: what production runs.
    Controller,
    /// A policy directory (`--policy-dir`).
    Standalone,
}

/// A running sidecar under test.
struct SidecarUnderTest {
    process: Proc,
    /// Lines read so far from its stdout pipe (its audit trail).
    stdout_lines: Arc<AtomicU64>,
    /// Its snapshot source, in controller mode.
    controller: Option<FakeController>,
    /// Its admin address (`/metrics`, `/ready`).
    admin: &'static str,
}

/// The last lines of a log file, for an error.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Starts a sidecar in `mode` with the policy of [`policy_files`]
/// (`extra_tools`), listening on `listen` and `admin`; returns once it has
/// ACKed its snapshot (controller mode) and says it is ready.
async fn start_sidecar(
    bins: &Binaries,
    work: &Path,
    name: &str,
    mode: Mode,
    extra_tools: usize,
    (listen, admin): (&'static str, &'static str),
    wrapper: &[String],
) -> anyhow::Result<SidecarUnderTest> {
    let files = policy_files(extra_tools);
    let mut env = vec![
        (ENV_LISTEN, listen.to_owned()),
        (ENV_ADMIN_LISTEN, admin.to_owned()),
        bins.runtime_env(),
        // The log level of an injected sidecar (none set: `info`), unless
        // this process's environment says otherwise.
        (
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        ),
    ];
    let mut args = Vec::new();
    let controller = match mode {
        Mode::Controller => {
            let documents: Vec<(&str, &str)> =
                files.iter().map(|(f, t)| (*f, t.as_str())).collect();
            let snapshot = compile_snapshot(&documents, 1)
                .with_context(|| format!("{name}: compiling the snapshot"))?;
            let token = work.join(format!("{name}.token"));
            let fake = FakeController::start(&snapshot, POD, &token)
                .with_context(|| format!("{name}: starting the fake controller"))?;
            env.extend(fake.sidecar_env());
            Some(fake)
        }
        Mode::Standalone => {
            let dir = work.join(format!("{name}-policy"));
            std::fs::create_dir_all(&dir)?;
            for (file, text) in &files {
                std::fs::write(dir.join(file), text)?;
            }
            args.push("--policy-dir".to_owned());
            args.push(dir.to_string_lossy().into_owned());
            None
        }
    };
    let stderr = work.join(format!("{name}.stderr"));
    let stdout_lines = Arc::new(AtomicU64::new(0));
    let process = spawn_sidecar(
        &bins.path("chaperone-sidecar"),
        &args,
        &env,
        Arc::clone(&stdout_lines),
        &stderr,
        wrapper,
    )?;
    let started = async {
        if let Some(fake) = &controller {
            fake.wait_for_ack(START_TIMEOUT).await?;
        }
        wait_ready(&format!("http://{admin}/ready")).await
    }
    .await;
    if let Err(error) = started {
        bail!(
            "{name}: {error:#}\nits stderr ends with:\n{}",
            log_tail(&stderr)
        );
    }
    Ok(SidecarUnderTest {
        process,
        stdout_lines,
        controller,
        admin,
    })
}

impl SidecarUnderTest {
    /// Waits (at most 3 s) until the fake controller has received as many
    /// audit records as the stdout pipe has delivered lines: the shipping
    /// queue has drained.
    async fn settle(&self) {
        let Some(fake) = &self.controller else {
            return;
        };
        for _ in 0..30 {
            if fake.received().audit_records >= self.stdout_lines.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the sidecar's `/metrics` says about its decisions, its snapshot,
    /// its audit queue and the assertions it signed without a nonce made
    /// ahead.
    async fn metrics_summary(&self) -> anyhow::Result<Vec<String>> {
        let text = get_text(self.admin, "/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| {
                l.starts_with("chaperone_sidecar_decisions_total{")
                    || l.starts_with("chaperone_sidecar_snapshot_version ")
                    || l.starts_with("chaperone_sidecar_audit_dropped_total ")
                    || l.starts_with("chaperone_sidecar_assertions_signed_unpooled_total ")
            })
            .map(str::to_owned)
            .collect())
    }
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if let Ok(mut sender) = connect(
            url.trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default(),
        )
        .await
        {
            let request = http::Request::get(url).body(Full::new(Bytes::new()))?;
            if let Ok(response) = sender.send_request(request).await
                && response.status().is_success()
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} never became ready")
}

async fn wait_listening(addr: &str) -> anyhow::Result<()> {
    // Up to 10 s: a proxy under valgrind takes seconds to start.
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{addr} never listened")
}

/// GETs `path` from `addr`: the body as text.
async fn get_text(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut sender = connect(addr).await?;
    let request = http::Request::get(format!("http://{addr}{path}"))
        .header("host", addr)
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A proxy's in-process timings so far: per measure, the sum (µs) and count.
type Timings = Vec<(String, f64, f64)>;

/// The bare proxy's: its whole handler (`request`) and its wait for the
/// upstream's response headers (`upstream`).
async fn bare_timings() -> anyhow::Result<Timings> {
    let stats: serde_json::Value = serde_json::from_str(&get_text(BARE, BARE_STATS_PATH).await?)?;
    let field = |name: &str| stats[name].as_f64().unwrap_or(0.0);
    let n = field("requests");
    Ok(vec![
        ("request".to_owned(), field("handlerNs") / 1e3, n),
        ("upstream".to_owned(), field("upstreamNs") / 1e3, n),
    ])
}

/// A sidecar's stage histograms (sums and counts).
async fn sidecar_timings(admin: &str) -> anyhow::Result<Timings> {
    const FAMILY: &str = "chaperone_sidecar_stage_duration_seconds";
    let text = get_text(admin, "/metrics").await?;
    let mut timings: Timings = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(FAMILY) else {
            continue;
        };
        let (is_sum, rest) = if let Some(rest) = rest.strip_prefix("_sum{stage=\"") {
            (true, rest)
        } else if let Some(rest) = rest.strip_prefix("_count{stage=\"") {
            (false, rest)
        } else {
            continue;
        };
        let Some((stage, value)) = rest.split_once("\"} ") else {
            continue;
        };
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        let at = match timings.iter().position(|(name, _, _)| name == stage) {
            Some(at) => at,
            None => {
                timings.push((stage.to_owned(), 0.0, 0.0));
                timings.len() - 1
            }
        };
        if is_sum {
            timings[at].1 = value * 1e6;
        } else {
            timings[at].2 = value;
        }
    }
    Ok(timings)
}

/// Where a target's in-process timings come from.
#[derive(Clone, Copy, Debug)]
enum TimingSource {
    /// None (no proxy).
    None,
    /// The bare proxy's stats endpoint.
    Bare,
    /// A sidecar's stage histograms, at this admin address.
    Sidecar(&'static str),
}

impl TimingSource {
    async fn read(self) -> anyhow::Result<Option<Timings>> {
        Ok(match self {
            TimingSource::None => None,
            TimingSource::Bare => Some(bare_timings().await?),
            TimingSource::Sidecar(admin) => Some(sidecar_timings(admin).await?),
        })
    }
}

/// Mean µs per measure between two readings (measures with no new sample
/// are left out).
fn mean_between(before: &Timings, after: &Timings) -> Vec<(String, f64)> {
    after
        .iter()
        .filter_map(|(name, sum, count)| {
            let (sum0, count0) = before
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or((0.0, 0.0), |(_, s, c)| (*s, *c));
            let n = count - count0;
            (n > 0.0).then(|| (name.clone(), (sum - sum0) / n))
        })
        .collect()
}

#[derive(Default)]
struct Samples {
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    cpu_us: Vec<f64>,
    rss: Vec<f64>,
    rps: Vec<f64>,
    /// Per measure, the mean µs per call of each fixed-rate run.
    inside: Vec<(String, Vec<f64>)>,
    /// `tools/call`s made through the target (warm-up included).
    calls: u64,
    /// MCP sessions opened through it.
    sessions: u64,
}

impl Samples {
    fn push_inside(&mut self, means: Vec<(String, f64)>) {
        for (name, mean) in means {
            match self.inside.iter_mut().find(|(n, _)| *n == name) {
                Some((_, values)) => values.push(mean),
                None => self.inside.push((name, vec![mean])),
            }
        }
    }

    fn inside_median(&self, name: &str) -> Option<f64> {
        self.inside
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, values)| median(&mut values.clone()))
    }

    fn median_of(values: &[f64]) -> f64 {
        median(&mut values.to_vec())
    }
}

/// One target of the comparison.
struct Target {
    name: &'static str,
    addr: &'static str,
    pid: Option<u32>,
    timings: TimingSource,
}

/// A sidecar's RSS with a 1,000-tool snapshot: idle, then with 10,000
/// sessions (each initialized and one `tools/call` made); and what its
/// controller received, in controller mode.
async fn rss_with_big_snapshot(
    bins: &Binaries,
    work: &Path,
    name: &str,
    mode: Mode,
    addrs: (&'static str, &'static str),
) -> anyhow::Result<RssMeasurement> {
    let sidecar = start_sidecar(bins, work, name, mode, 999, addrs, &env_wrapper()).await?;
    let listen = addrs.0;
    let rss_idle = Rss::of(sidecar.process.pid());
    let mut sender = connect(listen).await?;
    for i in 0..10_000u64 {
        let (status, sid) = post(
            &mut sender,
            listen,
            None,
            Bytes::from_static(INITIALIZE.as_bytes()),
        )
        .await?;
        if !status.is_success() {
            bail!("{name}: initialize {i}: {status}");
        }
        let body = Bytes::from(tools_call_body(i, 256));
        let (status, _) = post(&mut sender, listen, sid.as_deref(), body).await?;
        if !status.is_success() {
            bail!("{name}: tools/call {i}: {status}");
        }
    }
    let rss_loaded = Rss::of(sidecar.process.pid());
    sidecar.settle().await;
    let received = sidecar.controller.as_ref().map(FakeController::received);
    Ok(RssMeasurement {
        idle: rss_idle,
        loaded: rss_loaded,
        received,
    })
}

/// One sidecar's RSS with the 1,000-tool snapshot, and what its controller
/// received (controller mode).
struct RssMeasurement {
    idle: Rss,
    loaded: Rss,
    received: Option<Received>,
}

/// The RSS measurement of each mode.
struct RssReport {
    controller: RssMeasurement,
    standalone: Option<RssMeasurement>,
}

/// RSS with a 1,000-tool snapshot and 10,000 sessions: in controller mode,
/// and in standalone mode too with `--standalone`.
async fn measure_rss(bins: &Binaries, work: &Path, standalone: bool) -> anyhow::Result<RssReport> {
    let controller = rss_with_big_snapshot(
        bins,
        work,
        "sidecar-rss",
        Mode::Controller,
        (SIDECAR_RSS, SIDECAR_RSS_ADMIN),
    )
    .await?;
    let standalone = if standalone {
        Some(
            rss_with_big_snapshot(
                bins,
                work,
                "standalone-rss",
                Mode::Standalone,
                (STANDALONE_RSS, STANDALONE_RSS_ADMIN),
            )
            .await?,
        )
    } else {
        None
    };
    Ok(RssReport {
        controller,
        standalone,
    })
}

impl std::fmt::Display for RssReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let RssMeasurement {
            idle,
            loaded,
            received,
        } = &self.controller;
        writeln!(
            f,
            "Sidecar RSS with a 1,000-tool snapshot (controller mode): {idle} idle, {loaded} with 10,000 sessions (goal ≤ 20 MB); the fake controller received {} audit records.",
            received.as_ref().map_or(0, |r| r.audit_records)
        )?;
        if let Some(RssMeasurement { idle, loaded, .. }) = &self.standalone {
            writeln!(
                f,
                "Sidecar RSS with a 1,000-tool snapshot (standalone mode): {idle} idle, {loaded} with 10,000 sessions."
            )?;
        }
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Args {
        runs,
        fixed_seconds: seconds,
        rate,
        connections: conns,
        closed_seconds,
        standalone,
        rss_only,
        instructions,
        workers,
    } = Args::parse();
    let bins = &Binaries::new(workers)?;
    if !rss_only {
        println!(
            "Both proxies run {workers} runtime worker thread(s) (`{ENV_WORKER_THREADS}`; 1: a current-thread runtime).\n"
        );
    }
    let work = std::env::temp_dir().join(format!("chaperone-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let outcome = if rss_only {
        async {
            let _echo = spawn(&bins.path("mcp-echo"), &[ECHO], &[])?;
            wait_listening(ECHO).await?;
            let rss = measure_rss(bins, &work, standalone).await?;
            print!("{rss}");
            Ok(())
        }
        .await
    } else if instructions {
        count_instructions(bins, &work, (runs, seconds, rate, conns)).await
    } else {
        run(
            bins,
            &work,
            (runs, seconds, rate, conns, closed_seconds),
            standalone,
        )
        .await
    };
    // The callgrind dumps are left for `callgrind_annotate`.
    if !instructions {
        let _ = std::fs::remove_dir_all(&work);
    }
    outcome
}

/// Starts the upstream (`mcp-echo`), the bare proxy (under `bare_wrapper`)
/// and the sidecar in controller mode (under `sidecar_wrapper`), each once
/// it listens or is ready.
async fn start_targets(
    bins: &Binaries,
    work: &Path,
    bare_wrapper: &[String],
    sidecar_wrapper: &[String],
) -> anyhow::Result<(Proc, Proc, SidecarUnderTest)> {
    let echo = spawn(&bins.path("mcp-echo"), &[ECHO], &[])?;
    wait_listening(ECHO).await?;
    let bare = spawn_wrapped(
        bare_wrapper,
        &bins.path("bare-proxy"),
        &[BARE, ECHO],
        &[bins.runtime_env()],
    )?;
    wait_listening(BARE).await?;
    let sidecar = start_sidecar(
        bins,
        work,
        "sidecar",
        Mode::Controller,
        0,
        (SIDECAR, SIDECAR_ADMIN),
        sidecar_wrapper,
    )
    .await?;
    Ok((echo, bare, sidecar))
}

/// The `--instructions` mode: user-space instructions per call of the bare
/// proxy and the sidecar (controller mode, as in [`run`]), each under
/// callgrind, counted over `rate × seconds` calls after as many calls of
/// warm-up, `runs` times; every run's count is printed.
async fn count_instructions(
    bins: &Binaries,
    work: &Path,
    (runs, seconds, rate, conns): (u64, u64, u64, u64),
) -> anyhow::Result<()> {
    let calls = rate * seconds;
    let valgrind = Command::new("valgrind").arg("--version").output();
    if !valgrind.is_ok_and(|out| out.status.success()) {
        bail!("--instructions runs the proxies under valgrind, which is not installed here");
    }
    let bare_out = work.join("bare.callgrind");
    let sidecar_out = work.join("sidecar.callgrind");
    let (_echo, bare, sidecar) = start_targets(
        bins,
        work,
        &callgrind_wrapper(&bare_out),
        &callgrind_wrapper(&sidecar_out),
    )
    .await?;
    let mut targets = [
        ("bare proxy", BARE, Callgrind::new(bare.pid(), &bare_out)),
        (
            "Chaperone",
            SIDECAR,
            Callgrind::new(sidecar.process.pid(), &sidecar_out),
        ),
    ];
    for (name, addr, _) in &targets {
        let warm = fixed_rate(addr, rate, seconds, conns).await?;
        eprintln!("warm-up {name}: {} calls", warm.len());
    }
    let mut per_call: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for run in 0..runs {
        for (t, (name, addr, callgrind)) in targets.iter_mut().enumerate() {
            let sessions = open_sessions(addr, conns).await?;
            callgrind.start()?;
            let latencies = calls_at_rate(addr, sessions, rate, calls).await?;
            let total = callgrind.finish()?;
            let count = total as f64 / latencies.len() as f64;
            eprintln!(
                "run {run} {name}: {total} instructions over {} calls: {count:.0} per call",
                latencies.len()
            );
            per_call[t].push(count);
        }
    }
    println!(
        "User-space instructions per call (callgrind, every thread; the kernel's work is not counted): {calls} calls of 1 KB `tools/call` at {rate}/s over {conns} connections, {runs} run(s) each after as many calls of warm-up; Chaperone in controller mode with audit to a stdout pipe and shipping.\n"
    );
    println!("| target | instructions per call (each run) | median |");
    println!("|---|---|---:|");
    let medians: Vec<f64> = per_call.iter().map(|c| median(&mut c.clone())).collect();
    for ((name, _, _), (counts, m)) in targets.iter().zip(per_call.iter().zip(&medians)) {
        let shown: Vec<String> = counts.iter().map(|c| format!("{c:.0}")).collect();
        println!("| {name} | {} | {m:.0} |", shown.join(", "));
    }
    println!(
        "\nChaperone over the bare proxy: {:.0} instructions per call ({:.2}×).",
        medians[1] - medians[0],
        medians[1] / medians[0]
    );
    println!(
        "Where they go (the last run's calls): `callgrind_annotate {}` and `callgrind_annotate {}`; remove {} when done.",
        targets[0].2.last_dump().display(),
        targets[1].2.last_dump().display(),
        work.display()
    );
    drop(sidecar);
    Ok(())
}

async fn run(
    bins: &Binaries,
    work: &Path,
    (runs, seconds, rate, conns, closed_seconds): (u64, u64, u64, u64, u64),
    standalone: bool,
) -> anyhow::Result<()> {
    let (_echo, bare, sidecar) = start_targets(bins, work, &[], &env_wrapper()).await?;
    let standalone_sidecar = if standalone {
        Some(
            start_sidecar(
                bins,
                work,
                "standalone",
                Mode::Standalone,
                0,
                (STANDALONE, STANDALONE_ADMIN),
                &env_wrapper(),
            )
            .await?,
        )
    } else {
        None
    };

    let mut targets = vec![
        Target {
            name: "direct",
            addr: ECHO,
            pid: None,
            timings: TimingSource::None,
        },
        Target {
            name: "bare proxy",
            addr: BARE,
            pid: Some(bare.pid()),
            timings: TimingSource::Bare,
        },
        Target {
            name: "Chaperone",
            addr: SIDECAR,
            pid: Some(sidecar.process.pid()),
            timings: TimingSource::Sidecar(SIDECAR_ADMIN),
        },
    ];
    if let Some(s) = &standalone_sidecar {
        targets.push(Target {
            name: "Chaperone standalone",
            addr: STANDALONE,
            pid: Some(s.process.pid()),
            timings: TimingSource::Sidecar(STANDALONE_ADMIN),
        });
    }
    let mut samples: Vec<Samples> = targets.iter().map(|_| Samples::default()).collect();
    // Warm up every path.
    for (t, target) in targets.iter().enumerate() {
        let calls = fixed_rate(target.addr, 1000, 1, conns).await?;
        samples[t].calls += calls.len() as u64;
        samples[t].sessions += conns;
    }
    for run in 0..runs {
        for (t, target) in targets.iter().enumerate() {
            let name = target.name;
            let timings = target.timings.read().await?;
            let cpu_before = target.pid.map(cpu_seconds);
            let switches_before = target.pid.map(context_switches);
            let latencies = fixed_rate(target.addr, rate, seconds, conns).await?;
            let s = &mut samples[t];
            s.calls += latencies.len() as u64;
            s.sessions += conns;
            if let (Some(before), Some(after)) = (timings, target.timings.read().await?) {
                let means = mean_between(&before, &after);
                let shown: Vec<String> = means
                    .iter()
                    .map(|(name, mean)| format!("{name} {mean:.1}"))
                    .collect();
                eprintln!(
                    "run {run} fixed {name}: in-process µs/call: {}",
                    shown.join(", ")
                );
                s.push_inside(means);
            }
            s.p50.push(percentile(&latencies, 50.0));
            s.p99.push(percentile(&latencies, 99.0));
            s.p999.push(percentile(&latencies, 99.9));
            if let (Some(pid), Some(before)) = (target.pid, cpu_before) {
                let cpu = cpu_seconds(pid) - before;
                s.cpu_us.push(cpu * 1e6 / latencies.len() as f64);
                if let Some((vol, invol)) = switches_before {
                    let (vol2, invol2) = context_switches(pid);
                    let calls = latencies.len() as f64;
                    eprintln!(
                        "run {run} fixed {name}: context switches per call: {:.2} voluntary, {:.2} involuntary",
                        (vol2 - vol) as f64 / calls,
                        (invol2 - invol) as f64 / calls
                    );
                }
                s.rss.push(rss_mib(pid));
            }
            eprintln!(
                "run {run} fixed {name}: p50 {} p99 {} p99.9 {} µs",
                percentile(&latencies, 50.0),
                percentile(&latencies, 99.0),
                percentile(&latencies, 99.9)
            );
        }
        for (t, target) in targets.iter().enumerate() {
            let (done, rps) = closed_loop(target.addr, closed_seconds, 32).await?;
            samples[t].calls += done;
            samples[t].sessions += 32;
            samples[t].rps.push(rps);
            eprintln!("run {run} closed {}: {rps:.0} calls/s", target.name);
        }
    }

    // What each sidecar wrote, shipped and decided.
    let mut trails = Vec::new();
    for (t, under_test) in [Some(&sidecar), standalone_sidecar.as_ref()]
        .into_iter()
        .enumerate()
    {
        let Some(under_test) = under_test else {
            continue;
        };
        under_test.settle().await;
        let metrics = under_test.metrics_summary().await?;
        let received = under_test
            .controller
            .as_ref()
            .map(|fake| (fake.received(), threads_cpu_seconds(THREAD_NAME)));
        trails.push((2 + t, metrics, received));
    }
    let sidecar_lines = Arc::clone(&sidecar.stdout_lines);
    let standalone_lines = standalone_sidecar
        .as_ref()
        .map(|s| Arc::clone(&s.stdout_lines));
    // Stopped here (SIGKILL: no final checkpoint) so that their stdout
    // pipes reach their end.
    drop(sidecar);
    drop(standalone_sidecar);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stdout_lines = |t: usize| {
        let lines = if t == 2 {
            Some(&sidecar_lines)
        } else {
            standalone_lines.as_ref()
        };
        lines.map_or(0, |l| l.load(Ordering::Relaxed))
    };

    let rss = measure_rss(bins, work, standalone).await?;

    print_results(
        &targets,
        &mut samples,
        (runs, seconds, rate, conns, closed_seconds),
    );
    println!();
    for (t, metrics, received) in &trails {
        let s = &samples[*t];
        println!(
            "Audit trail of {} ({}): {} `tools/call`s made over {} MCP sessions; {} lines read from its stdout pipe.",
            targets[*t].name,
            if received.is_some() {
                "controller mode, snapshot from the fake controller's stream"
            } else {
                "standalone mode, snapshot from a policy directory: no stream, no audit shipping"
            },
            s.calls,
            s.sessions,
            stdout_lines(*t)
        );
        if let Some((r, cpu)) = received {
            println!(
                "  Received by the fake controller over the snapshot stream: {} audit records in {} batches ({:.2} records, {:.0} bytes per batch), {} reported dropped; {} stream(s), {} refused, {} signing key(s), {} other message(s).",
                r.audit_records,
                r.audit_batches,
                r.audit_records as f64 / (r.audit_batches.max(1)) as f64,
                r.audit_bytes as f64 / (r.audit_batches.max(1)) as f64,
                r.audit_dropped,
                r.streams,
                r.refused,
                r.signing_keys,
                r.other
            );
            println!(
                "  The fake controller's thread used {cpu:.2} s of CPU ({:.1} µs per audit record received): work a real controller does elsewhere, on this machine here.",
                cpu * 1e6 / r.audit_records.max(1) as f64
            );
        }
        for line in metrics {
            println!("  {line}");
        }
    }
    println!();
    print!("{rss}");
    Ok(())
}

/// Prints the tables: latency, CPU, RSS and throughput per target; the
/// sidecar over the bare hop; time inside the proxies.
fn print_results(
    targets: &[Target],
    samples: &mut [Samples],
    (runs, seconds, rate, conns, closed_seconds): (u64, u64, u64, u64, u64),
) {
    println!(
        "Fixed rate: {rate} calls/s of 1 KB `tools/call` for {seconds} s over {conns} keep-alive connections (one MCP session each); medians of {runs} runs, targets alternated within each run. Chaperone runs in controller mode (snapshot from a fake controller's stream, audit to a stdout pipe and shipped over the stream).\n"
    );
    println!(
        "| target | p50 µs | p99 µs | p99.9 µs | CPU µs/call | RSS MiB | closed-loop calls/s (32 conns, {closed_seconds} s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (target, s) in targets.iter().zip(samples.iter_mut()) {
        let cpu = if s.cpu_us.is_empty() {
            "–".to_owned()
        } else {
            format!("{:.1}", median(&mut s.cpu_us))
        };
        let rss = if s.rss.is_empty() {
            "–".to_owned()
        } else {
            format!("{:.1}", median(&mut s.rss))
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {cpu} | {rss} | {:.0} |",
            target.name,
            median(&mut s.p50),
            median(&mut s.p99),
            median(&mut s.p999),
            median(&mut s.rps)
        );
    }
    let bare = &samples[1];
    for (t, target) in targets.iter().enumerate().skip(2) {
        let c = &samples[t];
        let over = |a: &[f64], b: &[f64]| Samples::median_of(a) - Samples::median_of(b);
        println!(
            "\n{} over the bare hop: p50 +{:.0} µs (goal ≤ 25), p99 +{:.0} µs (goal ≤ 100); CPU/call {:.2}× bare (goal ≤ 1.5×); throughput {:.0} % of bare (goal ≥ 90 %).",
            target.name,
            over(&c.p50, &bare.p50),
            over(&c.p99, &bare.p99),
            Samples::median_of(&c.cpu_us) / Samples::median_of(&bare.cpu_us).max(f64::MIN_POSITIVE),
            100.0 * Samples::median_of(&c.rps)
                / Samples::median_of(&bare.rps).max(f64::MIN_POSITIVE)
        );
    }
    if let [.., controller, standalone] = &samples[..]
        && targets.len() == 4
    {
        println!(
            "\nController mode over standalone: p50 {:+.0} µs, p99 {:+.0} µs, CPU {:+.1} µs/call, RSS {:+.1} MiB, throughput {:.0} % of standalone.",
            Samples::median_of(&controller.p50) - Samples::median_of(&standalone.p50),
            Samples::median_of(&controller.p99) - Samples::median_of(&standalone.p99),
            Samples::median_of(&controller.cpu_us) - Samples::median_of(&standalone.cpu_us),
            Samples::median_of(&controller.rss) - Samples::median_of(&standalone.rss),
            100.0 * Samples::median_of(&controller.rps)
                / Samples::median_of(&standalone.rps).max(f64::MIN_POSITIVE)
        );
    }
    println!(
        "\nInside the proxies, fixed rate (mean µs per call, medians of runs; the sidecar's from `chaperone_sidecar_stage_duration_seconds`):\n"
    );
    let proxies = &targets[1..];
    let header: Vec<&str> = proxies.iter().map(|t| t.name).collect();
    println!("| measure | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(proxies.len()));
    let show = |value: Option<f64>| value.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
    let row = |label: &str, values: Vec<Option<f64>>| {
        let cells: Vec<String> = values.into_iter().map(show).collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    // `audit_settled` is left out of the named stages: its two waits per
    // call fall between them, so "between the stages" includes them.
    const NAMED: [&str; 7] = [
        "body_read",
        "parse",
        "decide",
        "audit",
        "sign",
        "upstream",
        "respond",
    ];
    for (label, stage) in [
        (
            "whole request (head handed to the handler → response body ended)",
            "request",
        ),
        ("read the request body", "body_read"),
        ("parse", "parse"),
        ("decide (engine, limits)", "decide"),
        ("audit record", "audit"),
        ("sign the assertion", "sign"),
        ("upstream (request sent → response headers)", "upstream"),
        ("respond (response headers → body ended)", "respond"),
        (
            "audit records written (audit_settled: the request's own write, or the wait for the writer thread; mean per wait, one before forwarding, one before answering; not in the sum below)",
            "audit_settled",
        ),
    ] {
        row(
            label,
            samples[1..]
                .iter()
                .map(|s| s.inside_median(stage))
                .collect(),
        );
    }
    let between: Vec<Option<f64>> = samples[1..]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let whole = s.inside_median("request")?;
            if i == 0 {
                // The bare proxy: whole − upstream.
                return Some(whole - s.inside_median("upstream")?);
            }
            let named: f64 = NAMED
                .iter()
                .filter_map(|stage| s.inside_median(stage))
                .sum();
            Some(whole - named)
        })
        .collect();
    row(
        "between the stages (whole − named stages; bare: whole − upstream)",
        between,
    );
}
