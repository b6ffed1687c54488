//! `chaperonectl`: Chaperone's command-line tool.

#![forbid(unsafe_code)]

use anyhow::Result;
use clap::{Parser, Subcommand};

mod crds;

/// Chaperone's command-line tool.
#[derive(Parser)]
#[command(name = "chaperonectl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the YAML of all Chaperone CustomResourceDefinitions.
    Crds(crds::CrdsArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crds(args) => crds::run(&args),
    }
}
