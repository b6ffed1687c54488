//! `chaperone-demo`: the processes of `make demo` that stand in for the world
//! around Chaperone — an MCP tool server (`tool-server`), a scripted agent
//! (`agent`) that calls the tool servers through its sidecar and prints what the
//! sidecar decided, and a worker agent app (`worker`) whose tools call tool
//! servers through its sidecar inside the session it was handed.

#![forbid(unsafe_code)]

mod agent;
mod calls;
mod delegate;
mod list;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use chaperone_demo::ToolSet;
use clap::{Parser, Subcommand};

/// The demo's tool servers and scripted agent.
#[derive(Debug, Parser)]
#[command(name = "chaperone-demo", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one set of demo tools over MCP streamable HTTP.
    ToolServer {
        /// Address to listen on, e.g. 127.0.0.1:18080.
        #[arg(long)]
        listen: SocketAddr,
        /// Which tools to serve.
        #[arg(long, value_enum)]
        tools: ToolSet,
        /// Changed tool definitions, followed while the server runs: a JSON
        /// object `{"TOOL": {"description": "…", "inputSchema": {…}}}` (a
        /// missing file is no change).
        #[arg(long, value_name = "FILE")]
        edits: Option<PathBuf>,
    },
    /// Serve the worker agent app: one tool `run_<server>` {tool, arguments}
    /// per `--server`, calling `<sidecar>/<server>` through the agent's own
    /// sidecar with the `Chaperone-Session` of the incoming request.
    Worker {
        /// Address to listen on (the agent's own MCP port, behind the sidecar's
        /// inbound side), e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: SocketAddr,
        /// A tool server to offer (repeatable), e.g. `billing`.
        #[arg(long = "server", required = true)]
        servers: Vec<String>,
        /// The sidecar's MCP proxy.
        #[arg(long, env = "CHAPERONE_MCP_URL", default_value = chaperone_demo::worker::DEFAULT_SIDECAR_URL)]
        sidecar: String,
    },
    /// Run the scripted agent session through the sidecar and print a table of
    /// its calls with the sidecar's decisions.
    Agent {
        /// The sidecar's MCP proxy; tool server `<name>` is at `<sidecar>/<name>`.
        #[arg(long, default_value = "http://127.0.0.1:15001")]
        sidecar: String,
        /// The sidecar's audit log (its standard output), read for the decisions.
        #[arg(long)]
        audit_log: PathBuf,
    },
    /// List a tool server's tools through the sidecar (what the agent's model
    /// would be offered), with the first line of each description.
    List {
        /// The sidecar's MCP proxy.
        #[arg(long, default_value = "http://127.0.0.1:15001")]
        sidecar: String,
        /// The tool server (its name at the sidecar).
        #[arg(long)]
        server: String,
    },
    /// Make a few tool calls in one MCP session through the sidecar and print
    /// each outcome and how long it took.
    Calls {
        /// The sidecar's MCP proxy.
        #[arg(long, default_value = "http://127.0.0.1:15001")]
        sidecar: String,
        /// The tool server (its name at the sidecar).
        #[arg(long)]
        server: String,
        /// Calls in order: `TOOL` or `TOOL {"json": "arguments"}`.
        #[arg(required = true)]
        calls: Vec<String>,
    },
    /// Run the delegated calls of examples/delegation through the planner's
    /// sidecar and print the billing worker's decisions with the chain.
    Delegate {
        /// The planner's sidecar MCP proxy.
        #[arg(long)]
        sidecar: String,
        /// The billing worker sidecar's audit log (its standard output).
        #[arg(long)]
        worker_audit_log: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::ToolServer {
            listen,
            tools,
            edits,
        } => {
            init_logging();
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the {tools:?} tool server to {listen}"))?;
            let changes = chaperone_demo::ToolEdits::new();
            if let Some(path) = edits {
                tokio::spawn(chaperone_demo::follow_edits_file(path, changes.clone()));
            }
            let server = chaperone_demo::ToolServer::new(tools).with_edits(changes);
            tracing::info!(%listen, server = tools.server_name(), "MCP tool server listening");
            tokio::select! {
                served = chaperone_demo::serve_handler(listener, server) => served.context("accepting connections")?,
                _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
            }
            Ok(())
        }
        Command::Worker {
            listen,
            servers,
            sidecar,
        } => {
            init_logging();
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the worker to {listen}"))?;
            tracing::info!(%listen, %sidecar, ?servers, "worker agent app listening");
            let worker = chaperone_demo::WorkerApp::new(sidecar, servers);
            tokio::select! {
                served = chaperone_demo::serve_handler(listener, worker) => served.context("accepting connections")?,
                _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
            }
            Ok(())
        }
        Command::Agent { sidecar, audit_log } => agent::run(&sidecar, &audit_log).await,
        Command::List { sidecar, server } => list::run(&sidecar, &server).await,
        Command::Calls {
            sidecar,
            server,
            calls,
        } => calls::run(&sidecar, &server, &calls).await,
        Command::Delegate {
            sidecar,
            worker_audit_log,
        } => delegate::run(&sidecar, &worker_audit_log).await,
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}
