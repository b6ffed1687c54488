//! `chaperonectl audit`: check sidecar audit logs offline.
//!
//! - `verify FILE`: the hash chain of every session, and the links between the
//!   trails of delegating and delegated agents; exits non-zero at the first
//!   record that is missing, modified, out of order or replayed.

use std::fs;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use chaperone_audit::{VerifyOptions, VerifySummary, verify_log_with};

/// Arguments of `chaperonectl audit`.
#[derive(clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(clap::Subcommand)]
enum AuditCommand {
    /// Verify the hash chains of an audit log.
    ///
    /// FILE holds sidecar audit lines, e.g. `kubectl logs POD -c chaperone-proxy`,
    /// possibly the logs of several agents concatenated. Audit records are the
    /// JSON objects with a `session.chaperone` string and a `decision`; every
    /// other line (the sidecar's tracing lines, plain text) is skipped and
    /// counted as skipped. Lines prefixed by `kubectl logs --timestamps` are not
    /// records: leave that flag out.
    ///
    /// Each record's `prev` must be the SHA-256 of the canonical JSON of its
    /// session's previous record. A session's first record has `prev` null, or
    /// the hash of a record of another session in FILE (a cross-agent link: the
    /// delegating agent's record), or a hash of no record in FILE (an external
    /// link: the delegating agent's log is not part of FILE; listed on stderr,
    /// an error with --strict).
    ///
    /// Prints a one-line summary and exits 0 when every chain holds; otherwise
    /// exits non-zero naming the first line whose link is broken (a record
    /// missing or modified before it), out of order, or replayed.
    Verify(VerifyArgs),
}

/// Arguments of `chaperonectl audit verify`.
#[derive(clap::Args)]
struct VerifyArgs {
    /// The audit log; `-` reads standard input.
    file: PathBuf,
    /// Treat an external link (a session's first record linking to a record
    /// not in FILE) as an error.
    #[arg(long)]
    strict: bool,
}

/// Runs `chaperonectl audit`.
pub fn run(args: &AuditArgs) -> Result<()> {
    match &args.command {
        AuditCommand::Verify(args) => verify(args),
    }
}

fn verify(args: &VerifyArgs) -> Result<()> {
    let (name, bytes) = if args.file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading standard input")?;
        ("<stdin>".to_owned(), bytes)
    } else {
        let name = args.file.display().to_string();
        let bytes = fs::read(&args.file).with_context(|| format!("reading {name}"))?;
        (name, bytes)
    };
    // A line that is not UTF-8 is not a record as written; made lossy, it is
    // skipped, or it fails its session's next link.
    let text = String::from_utf8_lossy(&bytes);
    let options = VerifyOptions {
        strict: args.strict,
        skip_other_lines: true,
    };
    let summary = match verify_log_with(&text, options) {
        Ok(summary) => summary,
        Err(error) => bail!("{name}: {error}"),
    };
    if summary.records == 0 {
        bail!(
            "{name}: no audit records ({} skipped)",
            count(summary.skipped, "other line")
        );
    }
    println!("ok: {}", describe(&summary));
    for link in &summary.external_links {
        eprintln!(
            "external link: line {}: session {} starts from {}, a record not in {name}",
            link.line, link.session, link.prev
        );
    }
    Ok(())
}

/// The summary line after `ok: `.
fn describe(summary: &VerifySummary) -> String {
    format!(
        "{}, {}, {}, {}, {} skipped",
        count(summary.records, "record"),
        count(summary.sessions, "session"),
        count(summary.cross_session_links, "cross-agent link"),
        count(summary.external_links.len(), "external link"),
        count(summary.skipped, "other line"),
    )
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
