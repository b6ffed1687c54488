//! `chaperone-sidecar`: the gateway sidecar binary. Settings come from the
//! environment ([`chaperone_sidecar::settings`]); the snapshot source is the
//! controller's stream when `CHAPERONE_CONTROLLER_ADDRESS` is set (what the
//! injection webhook does), or a policy directory with `--policy-dir`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chaperone_sidecar::{AuditOutput, Listeners, Settings, Sidecar, SidecarMode, SnapshotFeed};
use clap::Parser;

/// Chaperone's gateway sidecar: MCP-aware enforcement in front of tool servers.
#[derive(Debug, Parser)]
#[command(name = "chaperone-sidecar", version)]
struct Args {
    /// Standalone mode: compile the CR YAML files of this directory (no
    /// controller, no cluster) and reload them when they change.
    #[arg(long, env = "CHAPERONE_POLICY_DIR")]
    policy_dir: Option<PathBuf>,

    /// In standalone mode, the AgentIdentity to act as (needed when the
    /// directory holds several).
    #[arg(long, env = "CHAPERONE_AGENT")]
    agent: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::from_env()?;
    // Sized by CHAPERONE_WORKER_THREADS (one thread unless the webhook gave
    // the sidecar more than a core).
    let runtime = chaperone_sidecar::runtime::build(settings.worker_threads)
        .context("starting the runtime")?;
    // Logs (CHAPERONE_LOG_FORMAT, RUST_LOG) and traces (OTEL_*); the gRPC
    // exporter's channel runs on the runtime.
    let telemetry =
        runtime.block_on(async { chaperone_telemetry::init("chaperone-sidecar", None) })?;
    let served = runtime.block_on(serve(args, settings));
    // Flushing the spans still buffered blocks until the exporter has sent
    // them, which its channel does on the runtime: block another thread and
    // keep this one running the runtime (with one worker it is the only one).
    runtime.block_on(async move {
        if let Err(err) = tokio::task::spawn_blocking(move || drop(telemetry)).await {
            eprintln!("chaperone-sidecar: flushing the spans failed: {err}");
        }
    });
    served
}

async fn serve(args: Args, settings: Settings) -> anyhow::Result<()> {
    // The runtime's own count, not the setting's.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(
        worker_threads = workers,
        signing_nonces = settings.signing_nonces_kept(),
        "chaperone-sidecar starting"
    );
    let tool_mode = settings.mode == SidecarMode::Tool;
    // In front of a tool server there is no agent to proxy for.
    let proxy = if tool_mode {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(settings.listen)
                .await
                .with_context(|| format!("binding the proxy to {}", settings.listen))?,
        )
    };
    let inbound = match &settings.inbound_upstream {
        Some(upstream) => {
            let listener = tokio::net::TcpListener::bind(settings.inbound_listen)
                .await
                .with_context(|| {
                    format!("binding the inbound side to {}", settings.inbound_listen)
                })?;
            tracing::info!(listen = %settings.inbound_listen, upstream = %upstream, "inbound side in front of the pod's own MCP endpoint");
            Some(listener)
        }
        None => None,
    };
    let admin = tokio::net::TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding the admin server to {}", settings.admin_listen))?;
    let controller = settings.controller.clone();
    if controller.is_some() && args.policy_dir.is_some() {
        anyhow::bail!(
            "both CHAPERONE_CONTROLLER_ADDRESS and --policy-dir are set: choose the controller's stream or a policy directory"
        );
    }
    // Audit records are shipped to the controller only in controller mode.
    let sidecar = Sidecar::new(settings, AuditOutput::Stdout, controller.is_some())?;
    let key = sidecar.key_registration();
    tracing::info!(kid = %key.kid, "assertion key generated");
    let feed = match (controller, args.policy_dir) {
        (Some(controller), _) => {
            tracing::info!(
                address = %controller.address,
                server_name = %controller.server_name,
                "controller mode: refusing every call until the first snapshot arrives"
            );
            SnapshotFeed::Controller(controller)
        }
        (None, Some(dir)) => SnapshotFeed::PolicyDir {
            dir,
            agent: args.agent,
        },
        (None, None) => {
            tracing::warn!(
                "neither CHAPERONE_CONTROLLER_ADDRESS nor --policy-dir: refusing every call (not ready)"
            );
            SnapshotFeed::Nothing
        }
    };
    let listeners = Listeners {
        proxy,
        inbound,
        admin,
    };
    sidecar
        .run(
            listeners,
            feed,
            Duration::from_secs(10),
            chaperone_telemetry::stop_requested(),
        )
        .await?;
    Ok(())
}
