//! `controller_propagation`: how fast a ToolPolicy edit reaches N connected
//! sidecars, and how much memory the controller needs with 10,000 CRs and 1,000
//! connected sidecars.
//!
//! Everything is real and on 127.0.0.1: etcd + kube-apiserver from
//! `chaperone-testenv`, the release `chaperone-controller` binary as its own OS
//! process (so its memory can be read from `/proc/<pid>/status`), pods with
//! pod-bound ServiceAccount tokens from the TokenRequest API, and sidecar
//! stand-ins that are gRPC clients of the snapshot stream, each on its own TLS
//! connection, ACKing every snapshot as soon as it arrives.
//!
//! ```text
//! cargo build --release -p chaperone-controller
//! cargo run --release -p chaperone-bench --bin controller_propagation -- --sidecars 1000
//! ```
//!
//! Phases:
//! 1. Propagation: one AgentIdentity, one ToolPolicy, `--sidecars` pods of that
//!    agent, all connected and ACKed; then `--rounds` edits of the ToolPolicy.
//!    Per edit: each stream's time from the patch call returning to receiving the
//!    new version and to sending its ACK, the time until all N have ACKed, and
//!    the time until the AgentIdentity status shows all N in sync.
//! 2. Memory (`--crs 0` skips it), on a fresh controller process: `--crs`
//!    CRs (10 % AgentIdentities, 80 % ToolPolicies, 10 % DelegationGrants) over
//!    `--namespaces` namespaces, then `--rss-sidecars` sidecars (one pod per
//!    agent, round robin); controller VmRSS / VmHWM after each step, once the
//!    controller's CPU has gone quiet.
//!
//! The controller's log and the control plane's files are removed at exit
//! (`CHAPERONE_KEEP_FILES=1` keeps them).

#![forbid(unsafe_code)]

use std::{
    fmt,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaperone_api::{AgentIdentity, DelegationGrant, ToolPolicy};
use chaperone_testenv::{
    ControlPlane, create_namespace, free_port,
    kube_fixtures::{
        SIDECAR_AUDIENCE, SidecarStandIn, SnapshotEndpoint, bound_token, create_agent_pod,
        ensure_service_account, install_crds,
    },
};
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt, stream};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
    task::JoinHandle,
};

/// Flags of the harness.
#[derive(Debug, Parser)]
#[command(about = "Measures snapshot propagation and memory of chaperone-controller")]
struct Options {
    /// Connected sidecars in the propagation measurement (0 skips it).
    #[arg(long, default_value_t = 100)]
    sidecars: usize,
    /// ToolPolicy edits measured.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// CRs for the memory measurement (0 skips it): 10 % AgentIdentities, 80 %
    /// ToolPolicies, 10 % DelegationGrants.
    #[arg(long, default_value_t = 10_000)]
    crs: usize,
    /// Namespaces the memory measurement's CRs are spread over.
    #[arg(long, default_value_t = 50)]
    namespaces: usize,
    /// Sidecars connected in the memory measurement.
    #[arg(long, default_value_t = 1_000)]
    rss_sidecars: usize,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// API writes (pods, tokens, CRs) in flight at once.
    #[arg(long, default_value_t = 32)]
    create_concurrency: usize,
    /// Seconds an edit may take to reach every sidecar before the run fails.
    #[arg(long, default_value_t = 60)]
    round_timeout: u64,
    /// Seconds to wait for the AgentIdentity status to show every sidecar in
    /// sync after an edit (a miss is reported, not fatal).
    #[arg(long, default_value_t = 30)]
    status_timeout: u64,
    /// The controller binary; default: `chaperone-controller` next to this one.
    #[arg(long, env = "CHAPERONE_CONTROLLER_BIN")]
    controller_bin: Option<PathBuf>,
}

fn main() -> Result<()> {
    let options = Options::parse();
    let controller_bin = match &options.controller_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("chaperone-controller"),
    };
    if !controller_bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p chaperone-controller` \
             (same CARGO_TARGET_DIR) or pass --controller-bin",
            controller_bin.display()
        );
    }
    println!("# chaperone-controller propagation and memory");
    println!("{}", machine_summary());
    println!("options: {options:?}");

    let started = Instant::now();
    let cp = ControlPlane::start()?;
    install_crds(&cp)?;
    println!(
        "control plane up and CRDs established in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(&options, &cp, &controller_bin));
    runtime.shutdown_timeout(Duration::from_secs(5));
    println!("(load at the end) {}", machine_summary());
    result
}

async fn run(options: &Options, cp: &ControlPlane, controller_bin: &Path) -> Result<()> {
    let client = cp.client().await?;
    ensure_namespace(&client, "chaperone-system").await?;
    if options.sidecars > 0 {
        let controller = ControllerProcess::start(cp, controller_bin).await?;
        println!(
            "controller pid {} ready; idle: {}",
            controller.pid,
            controller.memory()?
        );
        let propagation = tokio::select! {
            r = propagation(options, &client, &controller) => r?,
            r = tokio::signal::ctrl_c() => { r?; bail!("interrupted") }
        };
        propagation.print(options.sidecars);
        controller.ensure_running()?;
    }
    if options.crs > 0 {
        // A fresh process: memory the allocator kept from the propagation phase
        // would otherwise count here.
        let controller = ControllerProcess::start(cp, controller_bin).await?;
        println!(
            "\ncontroller pid {} ready for the memory phase; idle: {}",
            controller.pid,
            controller.memory()?
        );
        tokio::select! {
            r = memory(options, &client, &controller) => r?,
            r = tokio::signal::ctrl_c() => { r?; bail!("interrupted") }
        };
        println!("metrics after memory:\n{}", controller.metrics().await?);
        controller.ensure_running()?;
    }
    Ok(())
}

// ---------------------------------------------------------------- propagation

/// One stream's receipt of one snapshot.
struct Receipt {
    stream: usize,
    version: u64,
    hash: String,
    received: Instant,
    acked: Instant,
}

/// One edit's timings.
struct Round {
    /// The patch call itself.
    patch: Duration,
    /// Per stream, from the patch returning to receiving the new version.
    received: Vec<Duration>,
    /// Per stream, from the patch returning to sending the ACK.
    acked: Vec<Duration>,
    /// Streams that got the new version before the patch call returned.
    early: usize,
    /// Until every stream has sent its ACK.
    all_acked: Duration,
    /// Until the AgentIdentity status showed every sidecar in sync, if it did.
    status_in_sync: Option<Duration>,
    /// Controller memory after the round.
    memory: Memory,
}

/// Everything the propagation phase measured.
struct Propagation {
    pods_and_tokens: Duration,
    connect: Duration,
    connect_each: Vec<Duration>,
    connect_retries: usize,
    memory_connected: Memory,
    cpu_connect: f64,
    cpu_rounds: f64,
    rounds: Vec<Round>,
}

async fn propagation(
    options: &Options,
    client: &Client,
    controller: &ControllerProcess,
) -> Result<Propagation> {
    let n = options.sidecars;
    let ns = create_namespace(client, "bench-prop").await?;
    apply::<AgentIdentity>(client, &ns, agent_identity("agent")).await?;
    apply::<ToolPolicy>(client, &ns, edited_policy(0)).await?;
    ensure_service_account(client, &ns, "agent").await?;

    let started = Instant::now();
    let pods: Vec<String> = (0..n).map(|i| format!("agent-{i}")).collect();
    let tokens = pods_and_tokens(client, &ns, "agent", &pods, options.create_concurrency).await?;
    let pods_and_tokens = started.elapsed();
    println!(
        "{n} pods and tokens in {:.1} s",
        pods_and_tokens.as_secs_f64()
    );

    let cpu_before = controller.cpu_seconds()?;
    let started = Instant::now();
    let (connected, mut events) =
        connect_all(&controller.endpoint, tokens, options.connect_concurrency).await?;
    let connect = started.elapsed();
    let cpu_connect = controller.cpu_seconds()? - cpu_before;
    let connect_retries = connected.iter().map(|c| c.retries).sum();
    let connect_each: Vec<Duration> = connected.iter().map(|c| c.took).collect();
    let mut baseline = connected.iter().map(|c| c.version).max().unwrap_or(0);
    println!(
        "{n} streams connected and ACKed in {:.1} s ({:.0}/s, {connect_retries} retries)",
        connect.as_secs_f64(),
        n as f64 / connect.as_secs_f64()
    );
    settle(controller, Duration::from_secs(120)).await?;
    let memory_connected = controller.memory()?;
    println!("controller with {n} sidecars: {memory_connected}");

    let agents: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);
    let cpu_before = controller.cpu_seconds()?;
    let mut rounds = Vec::with_capacity(options.rounds);
    for round in 1..=options.rounds {
        let sent = Instant::now();
        apply::<ToolPolicy>(client, &ns, edited_policy(round)).await?;
        let patched = Instant::now();
        let deadline = patched + Duration::from_secs(options.round_timeout);
        let mut seen: Vec<Option<Receipt>> = (0..n).map(|_| None).collect();
        let mut count = 0;
        while count < n {
            let receipt = tokio::time::timeout_at(deadline.into(), events.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "round {round}: only {count} of {n} sidecars received the edit within {} s",
                        options.round_timeout
                    )
                })?
                .context("every stream ended")?;
            if receipt.version > baseline && seen[receipt.stream].is_none() {
                let stream = receipt.stream;
                seen[stream] = Some(receipt);
                count += 1;
            }
        }
        let receipts: Vec<Receipt> = seen.into_iter().flatten().collect();
        let versions: std::collections::BTreeSet<u64> =
            receipts.iter().map(|r| r.version).collect();
        if versions.len() != 1 {
            println!("round {round}: streams saw different first versions: {versions:?}");
        }
        baseline = versions.iter().copied().max().unwrap_or(baseline);
        let hash = receipts[0].hash.clone();
        let since = |t: Instant| t.saturating_duration_since(patched);
        let received: Vec<Duration> = receipts.iter().map(|r| since(r.received)).collect();
        let acked: Vec<Duration> = receipts.iter().map(|r| since(r.acked)).collect();
        let early = receipts.iter().filter(|r| r.received < patched).count();
        let all_acked = acked.iter().copied().max().unwrap_or_default();
        let status_in_sync = wait_in_sync(
            &agents,
            "agent",
            n,
            &hash,
            patched,
            Duration::from_secs(options.status_timeout),
        )
        .await?;
        let memory = controller.memory()?;
        println!(
            "round {round:2}: patch {:6.1} ms, first {:6.1} ms, all {n} ACKed {:7.1} ms, status in sync {}, {memory}",
            ms(patched - sent),
            ms(received.iter().copied().min().unwrap_or_default()),
            ms(all_acked),
            status_in_sync.map_or_else(
                || "not within timeout".into(),
                |d| format!("{:.0} ms", ms(d))
            ),
        );
        rounds.push(Round {
            patch: patched - sent,
            received,
            acked,
            early,
            all_acked,
            status_in_sync,
            memory,
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu_rounds = controller.cpu_seconds()? - cpu_before;
    check_connected_gauge(controller, n).await?;
    println!(
        "metrics with {n} sidecars connected:\n{}",
        controller.metrics().await?
    );
    Ok(Propagation {
        pods_and_tokens,
        connect,
        connect_each,
        connect_retries,
        memory_connected,
        cpu_connect,
        cpu_rounds,
        rounds,
    })
}

impl Propagation {
    fn print(&self, n: usize) {
        let all: Vec<Duration> = self.rounds.iter().map(|r| r.all_acked).collect();
        let received: Vec<Duration> = self
            .rounds
            .iter()
            .flat_map(|r| r.received.iter().copied())
            .collect();
        let acked: Vec<Duration> = self
            .rounds
            .iter()
            .flat_map(|r| r.acked.iter().copied())
            .collect();
        let patch: Vec<Duration> = self.rounds.iter().map(|r| r.patch).collect();
        let status: Vec<Duration> = self
            .rounds
            .iter()
            .filter_map(|r| r.status_in_sync)
            .collect();
        let early: usize = self.rounds.iter().map(|r| r.early).sum();
        let peak = self
            .rounds
            .iter()
            .map(|r| r.memory.hwm_kib)
            .max()
            .unwrap_or(0);
        println!("\n## Propagation, N = {n}, {} edits", self.rounds.len());
        println!(
            "setup: pods+tokens {:.1} s; connect+first ACK {:.1} s ({:.0} streams/s, {} retries, controller CPU {:.1} s = {:.1} ms/stream)",
            self.pods_and_tokens.as_secs_f64(),
            self.connect.as_secs_f64(),
            n as f64 / self.connect.as_secs_f64(),
            self.connect_retries,
            self.cpu_connect,
            self.cpu_connect * 1000.0 / n as f64
        );
        println!("| measure | samples | p50 ms | p99 ms | max ms |");
        println!("|---|---:|---:|---:|---:|");
        for (name, samples) in [
            (
                "one connect (TLS + TokenReview + first snapshot + ACK)",
                &self.connect_each,
            ),
            ("patch call (SSA of the ToolPolicy)", &patch),
            ("all N ACKed, per edit", &all),
            (
                "per stream: patch returned → SnapshotUpdate received",
                &received,
            ),
            ("per stream: patch returned → ACK sent", &acked),
            ("status shows N in sync, per edit", &status),
        ] {
            let p = Percentiles::of(samples);
            println!(
                "| {name} | {} | {:.1} | {:.1} | {:.1} |",
                samples.len(),
                ms(p.p50),
                ms(p.p99),
                ms(p.max)
            );
        }
        println!(
            "status in sync within the timeout in {} of {} edits; {early} of {} receipts came before the patch call returned (counted as 0)",
            status.len(),
            self.rounds.len(),
            received.len()
        );
        println!(
            "controller CPU during the edits: {:.2} s ({:.0} ms per edit); memory with {n} sidecars {}, peak VmHWM {:.1} MiB",
            self.cpu_rounds,
            self.cpu_rounds * 1000.0 / self.rounds.len().max(1) as f64,
            self.memory_connected,
            peak as f64 / 1024.0
        );
    }
}

/// Reads everything a stand-in receives, as a sidecar does, ACKing each
/// snapshot at once and forwarding its receipt (while anyone listens).
async fn listen(
    stream: usize,
    mut sidecar: SidecarStandIn,
    events: mpsc::UnboundedSender<Receipt>,
) -> Result<()> {
    loop {
        let update = sidecar.next_snapshot(Duration::from_secs(3600)).await?;
        let received = Instant::now();
        sidecar.ack(&update).await?;
        let acked = Instant::now();
        let receipt = Receipt {
            stream,
            version: update.version,
            hash: update.hash,
            received,
            acked,
        };
        let _ = events.send(receipt);
    }
}

/// Polls the AgentIdentity status until it shows `n` sidecars in sync on `hash`.
async fn wait_in_sync(
    agents: &Api<AgentIdentity>,
    name: &str,
    n: usize,
    hash: &str,
    since: Instant,
    timeout: Duration,
) -> Result<Option<Duration>> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let status = agents.get(name).await?.status.unwrap_or_default();
        if status.sidecars_in_sync as usize == n && status.snapshot_hash.as_deref() == Some(hash) {
            return Ok(Some(since.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(None)
}

// --------------------------------------------------------------------- memory

async fn memory(options: &Options, client: &Client, controller: &ControllerProcess) -> Result<()> {
    let namespaces = options.namespaces.max(1);
    let per_ns = |share: usize| (options.crs * share / 100).div_ceil(namespaces).max(1);
    let (agents_per_ns, policies_per_ns, grants_per_ns) = (per_ns(10), per_ns(80), per_ns(10));
    let total = namespaces * (agents_per_ns + policies_per_ns + grants_per_ns);
    println!(
        "\n## Memory: {total} CRs ({} AgentIdentities, {} ToolPolicies, {} DelegationGrants in {namespaces} namespaces), {} sidecars",
        namespaces * agents_per_ns,
        namespaces * policies_per_ns,
        namespaces * grants_per_ns,
        options.rss_sidecars
    );

    let mut names = Vec::with_capacity(namespaces);
    for _ in 0..namespaces {
        names.push(create_namespace(client, "bench-rss").await?);
    }
    let started = Instant::now();
    let cpu_before = controller.cpu_seconds()?;
    let identities = names.iter().flat_map(|ns| {
        (0..agents_per_ns).map(move |a| (ns.clone(), agent_identity(&format!("agent-{a}"))))
    });
    let accounts = names
        .iter()
        .flat_map(|ns| (0..agents_per_ns).map(move |a| (ns.clone(), format!("agent-{a}"))));
    stream::iter(accounts)
        .map(|(ns, name)| async move { ensure_service_account(client, &ns, &name).await })
        .buffer_unordered(options.create_concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    stream::iter(identities)
        .map(|(ns, object)| async move { apply::<AgentIdentity>(client, &ns, object).await })
        .buffer_unordered(options.create_concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let policies = names.iter().flat_map(|ns| {
        (0..policies_per_ns).map(move |p| (ns.clone(), load_policy(p, p % agents_per_ns)))
    });
    stream::iter(policies)
        .map(|(ns, object)| async move { apply::<ToolPolicy>(client, &ns, object).await })
        .buffer_unordered(options.create_concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let grants = names.iter().flat_map(|ns| {
        (0..grants_per_ns).map(move |g| {
            (
                ns.clone(),
                grant(g % agents_per_ns, (g + 1) % agents_per_ns, g),
            )
        })
    });
    stream::iter(grants)
        .map(|(ns, object)| async move { apply::<DelegationGrant>(client, &ns, object).await })
        .buffer_unordered(options.create_concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let created = started.elapsed();
    println!(
        "{total} CRs created in {:.1} s ({:.0}/s); controller CPU meanwhile {:.1} s; {}",
        created.as_secs_f64(),
        total as f64 / created.as_secs_f64(),
        controller.cpu_seconds()? - cpu_before,
        controller.memory()?
    );
    let quiet = settle(controller, Duration::from_secs(900)).await?;
    println!(
        "controller quiet {:.1} s after the last create (status writes done); CPU since the first create {:.1} s; with {total} CRs: {}",
        quiet.as_secs_f64(),
        controller.cpu_seconds()? - cpu_before,
        controller.memory()?
    );
    println!("metrics:\n{}", controller.metrics().await?);

    let started = Instant::now();
    let pods: Vec<(String, String, String)> = (0..options.rss_sidecars)
        .map(|i| {
            let ns = names[i % namespaces].clone();
            let agent = format!("agent-{}", (i / namespaces) % agents_per_ns);
            let pod = format!("{agent}-pod-{i}");
            (ns, agent, pod)
        })
        .collect();
    let tokens: Vec<String> = stream::iter(pods)
        .map(|(ns, agent, pod)| async move {
            let pod = create_agent_pod(client, &ns, &agent, &pod).await?;
            bound_token(client, &pod, SIDECAR_AUDIENCE).await
        })
        .buffer_unordered(options.create_concurrency)
        .try_collect()
        .await?;
    println!(
        "{} pods and tokens in {:.1} s",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );
    let cpu_before = controller.cpu_seconds()?;
    let started = Instant::now();
    // The stand-ins keep reading, as sidecars do; nobody needs their receipts.
    let (connected, _) =
        connect_all(&controller.endpoint, tokens, options.connect_concurrency).await?;
    let took = started.elapsed();
    let each: Vec<Duration> = connected.iter().map(|c| c.took).collect();
    let p = Percentiles::of(&each);
    println!(
        "{} streams connected and ACKed in {:.1} s ({:.0}/s; one connect p50 {:.0} ms p99 {:.0} ms; {} retries; controller CPU {:.1} s)",
        connected.len(),
        took.as_secs_f64(),
        connected.len() as f64 / took.as_secs_f64(),
        ms(p.p50),
        ms(p.p99),
        connected.iter().map(|c| c.retries).sum::<usize>(),
        controller.cpu_seconds()? - cpu_before
    );
    let quiet = settle(controller, Duration::from_secs(600)).await?;
    let memory = controller.memory()?;
    println!(
        "controller quiet {:.1} s after the last connect; with {total} CRs and {} sidecars: {memory}",
        quiet.as_secs_f64(),
        connected.len()
    );
    println!(
        "RSS goal ≤ 50 MB (47.7 MiB): VmRSS {:.1} MiB, VmHWM {:.1} MiB → {}",
        memory.rss_kib as f64 / 1024.0,
        memory.hwm_kib as f64 / 1024.0,
        if memory.rss_kib * 1024 <= 50_000_000 {
            "met"
        } else {
            "MISSED"
        }
    );
    check_connected_gauge(controller, connected.len()).await?;
    drop(connected);
    Ok(())
}

/// Prints `chaperone_controller_sidecars_connected` against the `n` streams
/// the stand-ins hold open. Read before they are dropped: a scrape after that
/// races their teardown (how 9,353 of 10,000 came about).
async fn check_connected_gauge(controller: &ControllerProcess, n: usize) -> Result<()> {
    let gauge = controller.sidecars_connected().await?;
    let verdict = if gauge == n as f64 {
        "exact"
    } else {
        "MISMATCH"
    };
    println!("chaperone_controller_sidecars_connected {gauge} with {n} streams open: {verdict}");
    Ok(())
}

// ------------------------------------------------------------------- sidecars

/// A stream that has received and ACKed its first snapshot, read from then on
/// by its [`listen`] task.
struct Connected {
    _listener: AbortOnDrop,
    version: u64,
    took: Duration,
    retries: usize,
}

/// Creates `pods` (running as `service_account`) and a bound token for each.
async fn pods_and_tokens(
    client: &Client,
    ns: &str,
    service_account: &str,
    pods: &[String],
    concurrency: usize,
) -> Result<Vec<String>> {
    stream::iter(pods)
        .map(|pod| async move {
            let pod = create_agent_pod(client, ns, service_account, pod).await?;
            bound_token(client, &pod, SIDECAR_AUDIENCE).await
        })
        .buffered(concurrency)
        .try_collect()
        .await
}

/// Opens a stream per token, `concurrency` at a time, each until its first
/// snapshot is ACKed, then hands it to a [`listen`] task; returns the streams
/// and the receipts of the snapshots they receive after that (stream numbers
/// are the tokens' positions). A refusal the controller calls transient
/// (`UNAVAILABLE`) is retried up to five times.
async fn connect_all(
    endpoint: &SnapshotEndpoint,
    tokens: Vec<String>,
    concurrency: usize,
) -> Result<(Vec<Connected>, mpsc::UnboundedReceiver<Receipt>)> {
    let (events_tx, receipts) = mpsc::unbounded_channel();
    let events = &events_tx;
    let connected = stream::iter(tokens.into_iter().enumerate())
        .map(|(stream, token)| async move {
            let started = Instant::now();
            let mut retries = 0;
            let mut sidecar = loop {
                match SidecarStandIn::connect(endpoint, &token).await {
                    Ok(sidecar) => break sidecar,
                    Err(status) if status.code() == tonic::Code::Unavailable && retries < 5 => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(200 * retries as u64)).await;
                    }
                    Err(status) => bail!("stream refused: {status}"),
                }
            };
            let update = sidecar.next_snapshot(Duration::from_secs(60)).await?;
            sidecar.ack(&update).await?;
            // As a sidecar does: its signing key joins the JWKS every stream
            // carries.
            sidecar.send_key().await?;
            let listener = tokio::spawn(listen(stream, sidecar, events.clone()));
            Ok(Connected {
                _listener: AbortOnDrop(listener),
                version: update.version,
                took: started.elapsed(),
                retries,
            })
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    Ok((connected, receipts))
}

/// Aborts its task when dropped.
struct AbortOnDrop(JoinHandle<Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// -------------------------------------------------------------------- objects

fn agent_identity(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": { "name": name },
        "spec": {
            "selector": { "serviceAccountName": name },
            "toolServers": [
                { "name": "orders", "url": "http://orders.tools.svc:8080/mcp" },
                { "name": "billing", "url": "http://billing.tools.svc:8080/mcp" }
            ]
        }
    })
}

/// The propagation phase's policy; each edit allows a different tool.
fn edited_policy(round: usize) -> serde_json::Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": { "name": "policy" },
        "spec": {
            "targetRefs": [{ "name": "agent" }],
            "rules": [
                { "name": "allow-reads", "action": "allow", "tools": [{ "server": "orders", "name": format!("tool_{round}") }] },
                { "name": "deny-admin", "action": "deny", "tools": [{ "server": "orders", "name": "admin_*" }] }
            ]
        }
    })
}

/// One of the memory phase's policies: two rules, one with an argument matcher.
fn load_policy(index: usize, agent: usize) -> serde_json::Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": { "name": format!("policy-{index}") },
        "spec": {
            "targetRefs": [{ "name": format!("agent-{agent}") }],
            "tools": [{ "server": "billing", "name": format!("credit_{index}"), "effects": ["write", "financial"] }],
            "rules": [
                { "name": "allow-credit", "action": "allow",
                  "tools": [{ "server": "billing", "name": format!("credit_{index}") }],
                  "when": { "args": [{ "pointer": "/amount", "lessThanOrEqual": 500 }] } },
                { "name": "allow-reads", "action": "allow", "tools": [{ "server": "orders", "name": format!("get_{index}_*") }] }
            ]
        }
    })
}

fn grant(from: usize, to: usize, index: usize) -> serde_json::Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": { "name": format!("grant-{index}") },
        "spec": {
            "from": { "name": format!("agent-{from}") },
            "to": { "name": format!("agent-{to}") },
            "tools": [{ "server": "orders", "name": "get_*" }],
            "maxDepth": 1,
            "ttl": "24h"
        }
    })
}

/// Creates or updates `object` by server-side apply.
async fn apply<K>(client: &Client, ns: &str, object: serde_json::Value) -> Result<()>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug,
{
    let name = object["metadata"]["name"]
        .as_str()
        .context("object has no name")?
        .to_owned();
    Api::<K>::namespaced(client.clone(), ns)
        .patch(
            &name,
            &PatchParams::apply("chaperone-bench").force(),
            &Patch::Apply(&object),
        )
        .await?;
    Ok(())
}

async fn ensure_namespace(client: &Client, name: &str) -> Result<()> {
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({ "metadata": { "name": name } }))?;
    match Api::all(client.clone())
        .create(&Default::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// ----------------------------------------------------------------- controller

/// Stops its child when the pipe from this process closes, however this
/// process ends; prints the child's pid first.
const WATCHDOG: &str = r#"
log="$1"; shift
"$@" </dev/null >"$log" 2>&1 &
child=$!
echo "$child"
stop() {
  kill -TERM "$child" 2>/dev/null
  i=0
  while kill -0 "$child" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$child" 2>/dev/null
  wait "$child" 2>/dev/null
  exit 0
}
trap stop INT TERM HUP
while read -r _; do :; done
stop
"#;

/// The controller under test: the release binary as its own OS process.
struct ControllerProcess {
    shell: Child,
    pipe: Option<ChildStdin>,
    pid: u32,
    admin_port: u16,
    endpoint: SnapshotEndpoint,
    log: PathBuf,
    clock_ticks: f64,
}

impl ControllerProcess {
    /// Starts the controller against `cp` and waits until it is ready.
    async fn start(cp: &ControlPlane, binary: &Path) -> Result<Self> {
        let grpc_port = free_port()?;
        let admin_port = free_port()?;
        let ca_file = cp
            .scratch_dir()
            .join(format!("controller-ca-{grpc_port}.pem"));
        let log = cp.scratch_dir().join(format!("controller-{grpc_port}.log"));
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("chaperone-bench-watchdog")
            .arg(&log)
            .arg(binary)
            .args([
                "--namespace=chaperone-system".to_owned(),
                "--pod-name=controller-under-bench".into(),
                format!("--grpc-addr=127.0.0.1:{grpc_port}"),
                format!("--admin-addr=127.0.0.1:{admin_port}"),
                format!("--webhook-addr=127.0.0.1:{}", free_port()?),
                "--extra-san=localhost,127.0.0.1".into(),
                format!("--ca-file={}", ca_file.display()),
                "--log-format=text".into(),
            ])
            .env("KUBECONFIG", cp.kubeconfig())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the controller's watchdog shell")?;
        let pipe = shell.stdin.take();
        let mut first = String::new();
        BufReader::new(shell.stdout.take().context("no stdout")?).read_line(&mut first)?;
        let pid: u32 = first
            .trim()
            .parse()
            .context("watchdog did not print a pid")?;
        let mut controller = Self {
            shell,
            pipe,
            pid,
            admin_port,
            endpoint: SnapshotEndpoint {
                port: grpc_port,
                ca_pem: String::new(),
            },
            log,
            clock_ticks: clock_ticks(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            controller.ensure_running()?;
            if ca_file.exists()
                && controller
                    .admin_get("/readyz")
                    .await
                    .is_ok_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "controller not ready within 60 s; log:\n{}",
                    controller.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        controller.endpoint.ca_pem = std::fs::read_to_string(&ca_file)?;
        Ok(controller)
    }

    fn ensure_running(&self) -> Result<()> {
        if !Path::new(&format!("/proc/{}", self.pid)).exists() {
            bail!(
                "the controller exited; its log ends with:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// VmRSS, VmHWM and thread count from `/proc/<pid>/status`.
    fn memory(&self) -> Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("reading the controller's /proc status (did it exit?)")?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} missing from /proc status"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
            threads: field("Threads:")?,
        })
    }

    /// User + system CPU seconds the controller has used.
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        let after_name = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Fields 14 and 15 of stat(5), counted after the name (field 2).
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        Ok(ticks as f64 / self.clock_ticks)
    }

    /// The controller's `chaperone_controller_*` metric samples.
    async fn metrics(&self) -> Result<String> {
        let response = self.admin_get("/metrics").await?;
        Ok(response
            .lines()
            .filter(|l| l.starts_with("chaperone_controller_") && !l.contains("_bucket"))
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// `chaperone_controller_sidecars_connected`.
    async fn sidecars_connected(&self) -> Result<f64> {
        let text = self.admin_get("/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix("chaperone_controller_sidecars_connected "))
            .context("no chaperone_controller_sidecars_connected")?
            .trim()
            .parse()
            .context("chaperone_controller_sidecars_connected is not a number")
    }

    /// `chaperone_controller_status_patches_total`, all outcomes summed.
    async fn status_patches(&self) -> Result<f64> {
        let text = self.admin_get("/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("chaperone_controller_status_patches_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    async fn admin_get(&self, path: &str) -> Result<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut out)).await??;
        Ok(out)
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        // Closing the pipe makes the watchdog stop the controller (≤ 5 s).
        self.pipe.take();
        let _ = self.shell.wait();
    }
}

/// Waits until the controller uses under 5 % of a core over 2 s and wrote no
/// status meanwhile (its work queue, status writes included, is drained: with
/// several patches in flight the writer waits on the API server, not the CPU);
/// returns how long that took.
async fn settle(controller: &ControllerProcess, max: Duration) -> Result<Duration> {
    let started = Instant::now();
    let window = Duration::from_secs(2);
    loop {
        controller.ensure_running()?;
        let before = controller.cpu_seconds()?;
        let patches_before = controller.status_patches().await?;
        tokio::time::sleep(window).await;
        let used = controller.cpu_seconds()? - before;
        let patched = controller.status_patches().await? != patches_before;
        if used < 0.05 * window.as_secs_f64() && !patched {
            return Ok(started.elapsed().saturating_sub(window));
        }
        if started.elapsed() > max {
            println!("controller still busy after {max:?}; measuring anyway");
            return Ok(started.elapsed());
        }
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The controller's memory at one moment.
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    threads: u64,
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MiB, VmHWM {:.1} MiB, {} threads",
            self.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0,
            self.threads
        )
    }
}

// ---------------------------------------------------------------- reporting

/// Nearest-rank percentiles.
struct Percentiles {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Percentiles {
    fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let rank = |p: f64| {
            if sorted.is_empty() {
                Duration::ZERO
            } else {
                let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
                sorted[i]
            }
        };
        Self {
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU model, core count, memory and load average of this machine.
fn machine_summary() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    format!(
        "machine: {cores} CPUs ({model}); load average {}; date {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        date.trim()
    )
}
