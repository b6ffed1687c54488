//! `chaperonectl`: Chaperone's command-line tool.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod approval;
mod audit;
mod cluster;
mod crds;
mod jwks;
mod policy;
mod tools;

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
    /// Print the YAML of all Chaperone CustomResourceDefinitions.
    Crds(crds::CrdsArgs),
    /// Test and explain policies offline against CR YAML files.
    Policy(policy::PolicyArgs),
    /// Review and pin the definitions (descriptions, schemas) of the tools an
    /// agent discovered (AgentIdentity status, on the cluster).
    Tools(tools::ToolsArgs),
}

/// Runs the command; an error is printed as one line of causes
/// (`error: what failed: why`), never as a backtrace, and exits with 1.
fn main() -> ExitCode {
    let done: Result<()> = match Cli::parse().command {
        Command::Approval(args) => approval::run(&args),
        Command::Audit(args) => audit::run(&args),
        Command::Crds(args) => crds::run(&args),
        Command::Policy(args) => policy::run(&args),
        Command::Tools(args) => tools::run(&args),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
