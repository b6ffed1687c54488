//! `chaperone-bench`: runs the sidecar benchmark end to end and prints the
//! "Sidecar" section of `bench/RESULTS.md`.
//!
//! Starts `mcp-echo` (upstream), `bare-proxy` (baseline) and `chaperone-sidecar`
//! (standalone, a policy directory written here) from the directory of this
//! binary, then alternates targets (direct, bare proxy, Chaperone) for each run:
//! fixed rate (1 KB `tools/call`, keep-alive, several connections each with its
//! own MCP session) with p50/p99/p99.9, proxy CPU per call and RSS; closed loop
//! (32 connections) throughput; and the sidecar's RSS with a 1,000-tool snapshot
//! and 10,000 sessions. Medians over the runs. For the proxies it also prints
//! where a call's time went inside them (the bare proxy's own timings, the
//! sidecar's `chaperone_sidecar_stage_duration_seconds` means).
//!
//! What the sidecar does per call here, as in production: every call is
//! decided by a policy whose deny rule has a session condition evaluated on
//! that call, audited with one line written to the sidecar's stdout, a pipe
//! this process reads (as the container runtime does), and forwarded with a
//! freshly signed assertion. What differs from production: the snapshot comes
//! from a policy directory (standalone mode), not the controller's stream, so
//! audit lines are not also shipped to a controller.
//!
//! Usage: `chaperone-bench [RUNS] [FIXED_SECONDS] [RATE] [CONNECTIONS] [CLOSED_SECONDS]`
//! (defaults 3 20 1000 8 10).

#![forbid(unsafe_code)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use chaperone_bench::{BARE_STATS_PATH, INITIALIZE, tools_call_body};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

const ECHO: &str = "127.0.0.1:18080";
const BARE: &str = "127.0.0.1:18081";
const SIDECAR: &str = "127.0.0.1:18082";
const SIDECAR_ADMIN: &str = "127.0.0.1:18090";
const SIDECAR_RSS: &str = "127.0.0.1:18083";
const SIDECAR_RSS_ADMIN: &str = "127.0.0.1:18091";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("binary has no directory")?.to_owned())
}

fn spawn(bin: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Proc> {
    let mut command = Command::new(bin);
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
/// container's output; the count of lines read goes to `lines`.
fn spawn_sidecar(
    bin: &Path,
    args: &[&str],
    env: &[(&str, String)],
    lines: Arc<AtomicU64>,
) -> anyhow::Result<Proc> {
    let mut command = Command::new(bin);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
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
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
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
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0.0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
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
    let mut sessions = Vec::new();
    for _ in 0..conns {
        sessions.push(open_session(addr).await?);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let total = rate * seconds;
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

/// Closed-loop load: completed calls per second.
async fn closed_loop(addr: &str, seconds: u64, conns: u64) -> anyhow::Result<f64> {
    let mut sessions = Vec::new();
    for _ in 0..conns {
        sessions.push(open_session(addr).await?);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (mut sender, sid) in sessions {
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let body = Bytes::from(tools_call_body(1, 1024));
            while Instant::now() < deadline {
                post(&mut sender, &addr, sid.as_deref(), body.clone()).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += task.await??;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
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

fn write_policy(dir: &Path, extra_tools: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let identity = format!(
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentity\nmetadata:\n  name: bench-agent\n  namespace: bench\nspec:\n  selector:\n    serviceAccountName: bench-agent\n  toolServers:\n    - name: echo\n      url: http://{ECHO}/mcp\n  session:\n    idleTimeoutSeconds: 3600\n    maxCalls: 1000000\n"
    );
    std::fs::write(dir.join("identity.yaml"), identity)?;
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
    std::fs::write(dir.join("policy.yaml"), policy)?;
    Ok(())
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
    for _ in 0..100 {
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

/// The sidecar's stage histograms (sums and counts).
async fn sidecar_timings() -> anyhow::Result<Timings> {
    const FAMILY: &str = "chaperone_sidecar_stage_duration_seconds";
    let text = get_text(SIDECAR_ADMIN, "/metrics").await?;
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
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (runs, seconds, rate, conns, closed_seconds) =
        (arg(1, 3), arg(2, 20), arg(3, 1000), arg(4, 8), arg(5, 10));
    let bins = bin_dir()?;
    let work = std::env::temp_dir().join(format!("chaperone-bench-{}", std::process::id()));
    let policy_dir = work.join("policy");
    write_policy(&policy_dir, 0)?;
    let big_dir = work.join("policy-1000");
    write_policy(&big_dir, 999)?;

    let _echo = spawn(&bins.join("mcp-echo"), &[ECHO], &[])?;
    wait_listening(ECHO).await?;
    let bare = spawn(&bins.join("bare-proxy"), &[BARE, ECHO], &[])?;
    wait_listening(BARE).await?;
    let policy = policy_dir.to_string_lossy().into_owned();
    let audit_lines = Arc::new(AtomicU64::new(0));
    let sidecar = spawn_sidecar(
        &bins.join("chaperone-sidecar"),
        &["--policy-dir", &policy],
        &[
            ("CHAPERONE_LISTEN", SIDECAR.to_owned()),
            ("CHAPERONE_ADMIN_LISTEN", SIDECAR_ADMIN.to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ],
        Arc::clone(&audit_lines),
    )?;
    wait_ready(&format!("http://{SIDECAR_ADMIN}/ready")).await?;

    let targets: [(&str, &str, Option<u32>); 3] = [
        ("direct", ECHO, None),
        ("bare proxy", BARE, Some(bare.pid())),
        ("Chaperone", SIDECAR, Some(sidecar.pid())),
    ];
    // Warm up every path.
    for (_, addr, _) in &targets {
        fixed_rate(addr, 1000, 1, conns).await?;
    }
    let mut samples: Vec<Samples> = (0..targets.len()).map(|_| Samples::default()).collect();
    for run in 0..runs {
        for (t, (name, addr, pid)) in targets.iter().enumerate() {
            let timings = match t {
                1 => Some(bare_timings().await?),
                2 => Some(sidecar_timings().await?),
                _ => None,
            };
            let cpu_before = pid.map(cpu_seconds);
            let switches_before = pid.map(context_switches);
            let latencies = fixed_rate(addr, rate, seconds, conns).await?;
            let s = &mut samples[t];
            if let Some(before) = timings {
                let after = if t == 1 {
                    bare_timings().await?
                } else {
                    sidecar_timings().await?
                };
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
            if let (Some(pid), Some(before)) = (pid, cpu_before) {
                let cpu = cpu_seconds(*pid) - before;
                s.cpu_us.push(cpu * 1e6 / latencies.len() as f64);
                if let Some((vol, invol)) = switches_before {
                    let (vol2, invol2) = context_switches(*pid);
                    let calls = latencies.len() as f64;
                    eprintln!(
                        "run {run} fixed {name}: context switches per call: {:.2} voluntary, {:.2} involuntary",
                        (vol2 - vol) as f64 / calls,
                        (invol2 - invol) as f64 / calls
                    );
                }
                s.rss.push(rss_mib(*pid));
            }
            eprintln!(
                "run {run} fixed {name}: p50 {} p99 {} p99.9 {} µs",
                percentile(&latencies, 50.0),
                percentile(&latencies, 99.0),
                percentile(&latencies, 99.9)
            );
        }
        for (t, (name, addr, _)) in targets.iter().enumerate() {
            let rps = closed_loop(addr, closed_seconds, 32).await?;
            samples[t].rps.push(rps);
            eprintln!("run {run} closed {name}: {rps:.0} calls/s");
        }
    }
    drop(sidecar);
    let audit_read = audit_lines.load(Ordering::Relaxed);

    // RSS with a 1,000-tool snapshot and 10,000 sessions.
    let big = big_dir.to_string_lossy().into_owned();
    let rss_sidecar = spawn_sidecar(
        &bins.join("chaperone-sidecar"),
        &["--policy-dir", &big],
        &[
            ("CHAPERONE_LISTEN", SIDECAR_RSS.to_owned()),
            ("CHAPERONE_ADMIN_LISTEN", SIDECAR_RSS_ADMIN.to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ],
        Arc::new(AtomicU64::new(0)),
    )?;
    wait_ready(&format!("http://{SIDECAR_RSS_ADMIN}/ready")).await?;
    let rss_idle = rss_mib(rss_sidecar.pid());
    let mut sender = connect(SIDECAR_RSS).await?;
    for i in 0..10_000u64 {
        let (status, sid) = post(
            &mut sender,
            SIDECAR_RSS,
            None,
            Bytes::from_static(INITIALIZE.as_bytes()),
        )
        .await?;
        if !status.is_success() {
            bail!("initialize {i}: {status}");
        }
        let body = Bytes::from(tools_call_body(i, 256));
        post(&mut sender, SIDECAR_RSS, sid.as_deref(), body).await?;
    }
    let rss_loaded = rss_mib(rss_sidecar.pid());
    drop(rss_sidecar);
    let _ = std::fs::remove_dir_all(&work);

    let bare_p50 = median(&mut samples[1].p50.clone());
    let bare_p99 = median(&mut samples[1].p99.clone());
    let bare_cpu = median(&mut samples[1].cpu_us.clone());
    let bare_rps = median(&mut samples[1].rps.clone());
    println!(
        "Fixed rate: {rate} calls/s of 1 KB `tools/call` for {seconds} s over {conns} keep-alive connections (one MCP session each); medians of {runs} runs, targets alternated within each run.\n"
    );
    println!(
        "| target | p50 µs | p99 µs | p99.9 µs | CPU µs/call | RSS MiB | closed-loop calls/s (32 conns, {closed_seconds} s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (t, (name, _, _)) in targets.iter().enumerate() {
        let s = &mut samples[t];
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
            "| {name} | {:.0} | {:.0} | {:.0} | {cpu} | {rss} | {:.0} |",
            median(&mut s.p50),
            median(&mut s.p99),
            median(&mut s.p999),
            median(&mut s.rps)
        );
    }
    let c = &mut samples[2];
    println!(
        "\nChaperone over the bare hop: p50 +{:.0} µs (goal ≤ 25), p99 +{:.0} µs (goal ≤ 100); CPU/call {:.2}× bare (goal ≤ 1.5×); throughput {:.0} % of bare (goal ≥ 90 %).",
        median(&mut c.p50) - bare_p50,
        median(&mut c.p99) - bare_p99,
        median(&mut c.cpu_us) / bare_cpu.max(f64::MIN_POSITIVE),
        100.0 * median(&mut c.rps) / bare_rps.max(f64::MIN_POSITIVE)
    );
    println!(
        "\nInside the proxies, fixed rate (mean µs per call, medians of runs; the sidecar's from `chaperone_sidecar_stage_duration_seconds`):\n"
    );
    println!("| measure | bare proxy | Chaperone |");
    println!("|---|---:|---:|");
    let show = |value: Option<f64>| value.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
    let (bare, chaperone) = (&samples[1], &samples[2]);
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
    ] {
        println!(
            "| {label} | {} | {} |",
            show(bare.inside_median(stage)),
            show(chaperone.inside_median(stage))
        );
    }
    let named: f64 = [
        "body_read",
        "parse",
        "decide",
        "audit",
        "sign",
        "upstream",
        "respond",
    ]
    .iter()
    .filter_map(|stage| chaperone.inside_median(stage))
    .sum();
    let between = chaperone
        .inside_median("request")
        .map(|whole| whole - named);
    let bare_between = match (
        bare.inside_median("request"),
        bare.inside_median("upstream"),
    ) {
        (Some(whole), Some(upstream)) => Some(whole - upstream),
        _ => None,
    };
    println!(
        "| between the stages (whole − named stages; bare: whole − upstream) | {} | {} |",
        show(bare_between),
        show(between)
    );
    println!(
        "\nAudit lines read from the sidecar's stdout pipe: {audit_read}. Snapshot source: a policy directory (standalone mode; no controller stream, no audit shipping)."
    );
    println!(
        "\nSidecar RSS with a 1,000-tool snapshot: {rss_idle:.1} MiB idle, {rss_loaded:.1} MiB with 10,000 sessions (goal ≤ 20 MB)."
    );
    Ok(())
}
