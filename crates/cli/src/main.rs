//! `chaperonectl`: Chaperone's command-line tool.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory as _, Parser, Subcommand};

mod approval;
mod audit;
mod check;
mod cluster;
mod control_plane;
mod crds;
mod jwks;
mod output;
mod policy;
mod status;
mod tools;
mod version;

/// Chaperone's command-line tool.
#[derive(Parser)]
#[command(name = "chaperonectl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List, approve and deny tool calls waiting for a person (ToolCallApprovals
    /// on the cluster, through the kubeconfig).
    Approval(approval::ApprovalArgs),
    /// Verify sidecar audit logs offline: complete, unmodified, in order.
    Audit(audit::AuditArgs),
    /// Check that Chaperone is installed and working on the cluster (CRDs,
    /// controller, webhook, TLS, RBAC, agents, sidecars); exits 1 if not.
    Check(check::CheckArgs),
    /// Print a shell completion script: `source <(chaperonectl completion bash)`.
    Completion(CompletionArgs),
    /// Print the YAML of all Chaperone CustomResourceDefinitions.
    Crds(crds::CrdsArgs),
    /// Test and explain policies against CR YAML files or the cluster's.
    Policy(policy::PolicyArgs),
    /// The sidecars and the snapshot each runs (in sync or not), from the
    /// controller replicas; `status POD` for one in full.
    Status(status::StatusArgs),
    /// Review and pin the definitions (descriptions, schemas) of the tools an
    /// agent discovered (AgentIdentity status, on the cluster).
    Tools(tools::ToolsArgs),
    /// This client's version, the controller replicas' and the sidecars',
    /// with a warning for each skew.
    Version(version::VersionArgs),
}

/// Arguments of `chaperonectl completion`.
#[derive(clap::Args)]
struct CompletionArgs {
    /// The shell.
    shell: clap_complete::Shell,
}

/// Runs the command; an error is printed as one line of causes
/// (`error: what failed: why`), never as a backtrace, and exits with 1.
fn main() -> ExitCode {
    let success = |done: Result<()>| done.map(|()| ExitCode::SUCCESS);
    let done: Result<ExitCode> = match Cli::parse().command {
        Command::Approval(args) => success(approval::run(&args)),
        Command::Audit(args) => success(audit::run(&args)),
        Command::Check(args) => check::run(&args),
        Command::Completion(args) => {
            let mut command = Cli::command();
            clap_complete::generate(
                args.shell,
                &mut command,
                "chaperonectl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Crds(args) => success(crds::run(&args)),
        Command::Policy(args) => policy::run(&args),
        Command::Status(args) => success(status::run(&args)),
        Command::Tools(args) => tools::run(&args),
        Command::Version(args) => success(version::run(&args)),
    };
    match done {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
