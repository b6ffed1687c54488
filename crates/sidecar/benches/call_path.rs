//! Where a governed call's CPU goes inside the sidecar, without the network:
//! times each step of the call path on the benchmark's 1 KB `tools/call` and
//! prints p50/p99 per step. `cargo bench -p chaperone-sidecar --bench call_path`.
//!
//! Steps: strict parse of the body, canonical argument digest, the Ed25519
//! assertion alone (with a nonce made ahead, as calls get it while the
//! nonce thread keeps up), the RFC 8032 signature it then no longer makes (and
//! still makes when no nonce is ready), `Enforcer::decide_call` whole
//! (decision, session step, audit record to a sink, assertion), and what one
//! nonce costs the nonce thread.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaperone_sidecar::assertion::{AssertionSigner, Claims, TaskContext};
use chaperone_sidecar::audit::{AuditLog, AuditOutput};
use chaperone_sidecar::authz::{CallRequest, Enforcer, Governed, PodIdentity, classify};
use chaperone_sidecar::canonical::args_digest;
use chaperone_sidecar::inventory::ToolInventory;
use chaperone_sidecar::jsonrpc::{Message, Payload, parse_payload};
use chaperone_sidecar::methods::Era;
use chaperone_sidecar::metrics::Metrics;
use chaperone_sidecar::ratelimit::AgentRateLimits;
use chaperone_sidecar::session::SessionState;
use chaperone_sidecar::signing_nonces::{DEFAULT_CAPACITY, Presigner};
use chaperone_sidecar::{SnapshotSource, standalone};

const SAMPLES: usize = 50_000;
const LIMIT: usize = 1 << 20;

/// The load generator's body: a `tools/call` of `echo` of about 1 KB.
fn body() -> Vec<u8> {
    let text = "x".repeat(1024 - 80);
    format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{text}"}}}}}}"#
    )
    .into_bytes()
}

const IDENTITY: &str = "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentity\nmetadata:\n  name: bench-agent\n  namespace: bench\nspec:\n  selector:\n    serviceAccountName: bench-agent\n  toolServers:\n    - name: echo\n      url: http://127.0.0.1:18080/mcp\n  session:\n    idleTimeoutSeconds: 3600\n    maxCalls: 1000000000\n";
const POLICY: &str = "apiVersion: chaperone.dev/v1alpha1\nkind: ToolPolicy\nmetadata:\n  name: bench\n  namespace: bench\nspec:\n  targetRefs:\n    - name: bench-agent\n  tools:\n    - name: echo\n      effects: [read]\n    - name: send_*\n      effects: [externalCommunication]\n  rules:\n    - name: no-exfiltration\n      action: deny\n      tools:\n        - effect: externalCommunication\n      when:\n        session:\n          anyEffectSeen: [sensitiveData]\n    - name: echo-short-text\n      action: allow\n      tools:\n        - name: echo\n      when:\n        args:\n          - pointer: /text\n            type: string\n";

/// Discards what is written (the benchmark's stdout is `/dev/null` too).
struct Sink;

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn report(step: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |p: f64| {
        let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[index].as_nanos() as f64 / 1000.0
    };
    println!(
        "| {step} | {:.2} | {:.2} | {:.2} |",
        at(0.5),
        at(0.99),
        at(0.999)
    );
}

fn time(step: impl FnMut()) -> Vec<Duration> {
    time_between(step, || {})
}

/// Times `step`, calling `between` (untimed) before each sample.
fn time_between(mut step: impl FnMut(), mut between: impl FnMut()) -> Vec<Duration> {
    for _ in 0..SAMPLES / 10 {
        between();
        step();
    }
    (0..SAMPLES)
        .map(|_| {
            between();
            let started = Instant::now();
            step();
            started.elapsed()
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let body = body();
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("identity.yaml"), IDENTITY)?;
    std::fs::write(dir.path().join("policy.yaml"), POLICY)?;
    let source = SnapshotSource::new();
    standalone::load(dir.path(), None, 1, &source)?;
    let active = source
        .current()
        .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
    let upstream = active
        .upstreams
        .get("echo")
        .ok_or_else(|| anyhow::anyhow!("no echo server"))?;
    let pooled_enforcer = enforcer(AssertionSigner::generate()?);
    let rfc8032_enforcer = enforcer(AssertionSigner::generate_with_nonces(0)?);
    let Payload::Single(message) = parse_payload(&body, LIMIT)? else {
        anyhow::bail!("not a single message");
    };
    let Governed::Call { name, arguments } = classify(&message, Era::Both, &[]) else {
        anyhow::bail!("not a call");
    };
    let id = match &message {
        Message::Request { id, .. } => Some(id),
        _ => None,
    };

    println!("| step | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---:|---:|---:|");
    report(
        "strict parse of the 1 KB body",
        time(|| {
            black_box(parse_payload(black_box(&body), LIMIT).ok());
        }),
    );
    report(
        "argument digest (canonical JSON, SHA-256)",
        time(|| {
            black_box(args_digest(black_box(arguments)));
        }),
    );
    let digest = args_digest(arguments);
    let ctx = TaskContext {
        effects: Default::default(),
        steps: 1,
        prev: "0".repeat(64),
    };
    let signer = pooled_enforcer.signer.clone();
    // Samples wait (untimed) for a nonce: a call that finds none signs the
    // RFC 8032 way, timed by the step after this one.
    let nonce_ready = || {
        while signer.nonces_ready() == 0 {
            std::thread::yield_now();
        }
    };
    report(
        "assertion (claims JSON, base64, Ed25519 with a nonce made ahead)",
        time_between(
            || {
                black_box(signer.sign(&Claims {
                    iss: &active.issuer,
                    sub: &active.issuer,
                    act: None,
                    aud: &upstream.audience,
                    exp: 2_000_000_060,
                    iat: 2_000_000_000,
                    jti: "0123456789abcdef0123456789abcdef",
                    sid: "0123456789abcdef0123456789abcdef",
                    tool: "echo",
                    args: &digest,
                    snap: 1,
                    ctx: &ctx,
                }));
            },
            nonce_ready,
        ),
    );
    // The assertion's signing input is ≈ 700 bytes.
    let signing_input = vec![b'e'; 700];
    report(
        "Ed25519 signature of 700 bytes, RFC 8032 (when no nonce is ready)",
        time(|| {
            black_box(signer.sign_detached(black_box(&signing_input)));
        }),
    );
    for (step, enforcer) in [
        (
            "decide_call whole (decision, step, audit, assertion)",
            &pooled_enforcer,
        ),
        (
            "decide_call whole, RFC 8032 signature (CHAPERONE_SIGNING_NONCES=0)",
            &rfc8032_enforcer,
        ),
    ] {
        let mut session = SessionState::new();
        report(
            step,
            time_between(
                || {
                    let outcome = enforcer.decide_call(
                        &active,
                        upstream,
                        &mut session,
                        &CallRequest {
                            method: "tools/call",
                            id,
                            name: &name,
                            arguments,
                            mcp_session_id: "s-1",
                            approval: None,
                        },
                    );
                    black_box(outcome.ok());
                },
                nonce_ready,
            ),
        );
    }
    report("one nonce, made ahead by the nonce thread", nonce_cost());
    Ok(())
}

/// The enforcer the sidecar builds, signing with `signer`, its audit
/// records written to a sink.
fn enforcer(signer: AssertionSigner) -> Enforcer {
    let metrics = Arc::new(Metrics::new());
    Enforcer {
        audit: AuditLog::new(
            AuditOutput::Writer(Box::new(Sink)),
            None,
            metrics.audit_dropped.clone(),
            signer.clone(),
        ),
        signer,
        agent_limits: AgentRateLimits::default(),
        metrics,
        pod: PodIdentity {
            pod: "bench-pod".to_owned(),
        },
        inventory: ToolInventory::default(),
    }
}

/// What one nonce costs the nonce thread: a fresh key's pool filled from
/// empty, timed and divided by its size, 20 times (the thread has a core of
/// its own: nothing else runs).
fn nonce_cost() -> Vec<Duration> {
    (0..20u8)
        .map(|round| {
            let started = Instant::now();
            let presigner =
                Presigner::start(&[round; 32], DEFAULT_CAPACITY).expect("aws-lc takes any seed");
            while !presigner.filled_once() {
                std::thread::sleep(Duration::from_micros(200));
            }
            started.elapsed() / DEFAULT_CAPACITY as u32
        })
        .collect()
}
