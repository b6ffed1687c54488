//! `chaperonectl audit`: check sidecar audit logs offline.
//!
//! - `verify FILE [--jwks FILE_OR_URL] [--strict]`: each sidecar's sequence
//!   and signed checkpoints, the hash chain of every session, and the links
//!   between the trails of delegating and delegated agents; exits non-zero at
//!   the first record that is missing, modified, out of order, replayed,
//!   ambiguous or made up, and warns of what it cannot prove.
//! - `keys [-n NAMESPACE]`: the audit-key archive (the keys of every sidecar
//!   the controller saw, kept for its retention, see
//!   [`chaperone_api::audit_keys`]) as one JWKS for `verify --jwks`.

use std::fs;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use chaperone_audit::{
    NoKey, SidecarKeys, SidecarTrail, VerifyError, VerifyOptions, VerifySummary, verify_log_signed,
    verify_log_with,
};

use std::collections::BTreeMap;

use chaperone_api::audit_keys;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::ListParams;

use crate::cluster::{ClusterArgs, api_error, on_cluster};
use crate::control_plane::ControllerArgs;
use crate::jwks;

/// Arguments of `chaperonectl audit`.
#[derive(clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(clap::Subcommand)]
enum AuditCommand {
    /// Verify that an audit log is complete and unmodified.
    ///
    /// FILE holds sidecar audit lines, e.g. `kubectl logs POD -c chaperone-proxy`,
    /// possibly the logs of several sidecars concatenated. Audit records are the
    /// JSON objects with a `session.chaperone` string and a `decision`, and the
    /// checkpoints (`"kind":"checkpoint"`); every other line (the sidecar's
    /// tracing lines, plain text) is skipped and counted as skipped. Lines
    /// prefixed by `kubectl logs --timestamps` are not records: leave that flag
    /// out. Every record is read as strict JSON: a duplicate or case-colliding
    /// key is an error.
    ///
    /// Each sidecar numbers its records 1, 2, 3, … (`seq`, across its sessions)
    /// and links each to its previous one (`prevSeq`, a SHA-256); every 100
    /// records, every few seconds and at shutdown it writes a checkpoint signed
    /// with its Ed25519 key (`kid`). Each record's `prev` must be the SHA-256 of
    /// its session's previous record; a session's first record has `prev` null,
    /// or the hash of a record of another session in FILE (a cross-agent link:
    /// the delegating agent's record), or a hash of no record in FILE (an
    /// external link: the delegating agent's log is not part of FILE).
    ///
    /// With --jwks (the sidecars' public keys: the controller serves them at
    /// `/.well-known/jwks.json` while the sidecars run), the checkpoints'
    /// signatures are checked: then every record up to a sidecar's last
    /// checkpoint is proven present, unmodified and in order. Without it only
    /// the structure is checked.
    ///
    /// Prints a summary (one line, then one per sidecar) and exits 0 when
    /// everything holds; warns on stderr of what is not proven: records after a
    /// sidecar's last checkpoint (which could be cut off or added without a
    /// trace), checkpoints not verified (no key), external links. Exits
    /// non-zero naming the first line where a record is missing, modified, out
    /// of order, replayed, ambiguous, or a checkpoint is forged — and, with
    /// --strict, where anything is not proven.
    Verify(VerifyArgs),
    /// Print the audit-key archive as a JWKS, for `verify --jwks`.
    ///
    /// The controller keeps the public key of every sidecar connected to it,
    /// agent and tool mode, in ConfigMaps in its own namespace, for its
    /// `--audit-key-retention-days` after the sidecar last ran; its JWKS at
    /// `/.well-known/jwks.json` lists only the agent sidecars running now.
    /// So, to verify the trail of pods that are gone:
    /// `chaperonectl audit keys -n team > keys.json` then
    /// `chaperonectl audit verify trail.log --jwks keys.json --strict`.
    /// Every namespace's keys unless -n is given (a delegated task's trail
    /// spans the namespaces of its agents). Reads the ConfigMaps through the
    /// kubeconfig: you need `list` on ConfigMaps in the controller's
    /// namespace. Warns (stderr) of entries it cannot use and of a kid
    /// archived for two pods.
    Keys(KeysArgs),
}

/// Arguments of `chaperonectl audit keys`.
#[derive(clap::Args)]
struct KeysArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    controller: ControllerArgs,
}

/// Arguments of `chaperonectl audit verify`.
#[derive(clap::Args)]
struct VerifyArgs {
    /// The audit log; `-` reads standard input.
    file: PathBuf,
    /// The sidecars' public keys (JWKS): a file, such as the output of
    /// `chaperonectl audit keys` (every sidecar's key for the retention), or
    /// an http(s) URL such as the controller's `/.well-known/jwks.json` (the
    /// agent sidecars running now only). Repeat for several.
    #[arg(long, value_name = "FILE_OR_URL")]
    jwks: Vec<String>,
    /// Accept only what is proven: records after a sidecar's last checkpoint,
    /// checkpoints whose signature was not checked (no --jwks, or no key for
    /// the sidecar) and external links (a session's first record linking to a
    /// record not in FILE) are errors.
    #[arg(long)]
    strict: bool,
}

/// Runs `chaperonectl audit`.
pub fn run(args: &AuditArgs) -> Result<()> {
    match &args.command {
        AuditCommand::Verify(args) => verify(args),
        AuditCommand::Keys(args) => keys(args),
    }
}

fn keys(args: &KeysArgs) -> Result<()> {
    let controller_namespace = &args.controller.controller_namespace;
    let pods_namespace = args.cluster.namespace.as_deref();
    let config_maps = on_cluster(&args.cluster, async |client, _| {
        let mut selector = format!(
            "{}={}",
            audit_keys::COMPONENT_LABEL.0,
            audit_keys::COMPONENT_LABEL.1
        );
        if let Some(namespace) = pods_namespace {
            selector.push_str(&format!(",{}={namespace}", audit_keys::NAMESPACE_LABEL));
        }
        Api::<ConfigMap>::namespaced(client, controller_namespace)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                api_error(
                    e,
                    &format!("listing the audit-key archive in namespace {controller_namespace}"),
                )
            })
    })?;
    let whose = pods_namespace.map_or_else(String::new, |ns| format!(" of pods in {ns}"));
    if config_maps.items.is_empty() {
        bail!(
            "no audit keys{whose} in namespace {controller_namespace}: no sidecar{whose} connected to a controller there within its retention, or the controller runs elsewhere (--controller-namespace)"
        );
    }
    let empty = BTreeMap::new();
    let archived = audit_keys::archive_jwks(config_maps.items.iter().map(|cm| {
        (
            cm.metadata.name.as_deref().unwrap_or_default(),
            cm.data.as_ref().unwrap_or(&empty),
        )
    }));
    let keys = archived.jwks["keys"].as_array().map_or(0, Vec::len);
    println!("{:#}", archived.jwks);
    eprintln!(
        "{}{whose} from {} of namespace {controller_namespace}",
        count(keys, "archived key"),
        count(config_maps.items.len(), "ConfigMap"),
    );
    for problem in &archived.problems {
        eprintln!("warning: {problem}");
    }
    Ok(())
}

fn verify(args: &VerifyArgs) -> Result<()> {
    let keys = if args.jwks.is_empty() {
        None
    } else {
        Some(jwks::load(&args.jwks)?)
    };
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
    // skipped, or it breaks its sidecar's next link.
    let text = String::from_utf8_lossy(&bytes);
    let options = VerifyOptions {
        strict: args.strict,
        skip_other_lines: true,
    };
    let verified = match &keys {
        Some(keys) => verify_log_signed(&text, options, keys),
        None => verify_log_with(&text, options),
    };
    let summary = match verified {
        Ok(summary) => summary,
        Err(
            error @ VerifyError::Unverified {
                why: NoKey::NoKeys, ..
            },
        ) => bail!("{name}: {error}; pass the sidecars' keys with --jwks"),
        Err(error) => bail!("{name}: {error}"),
    };
    if summary.records == 0 && summary.checkpoints == 0 {
        bail!(
            "{name}: no audit records ({} skipped)",
            count(summary.skipped, "other line")
        );
    }
    println!("ok: {}", describe(&summary));
    for trail in &summary.sidecars {
        println!("{}", describe_trail(trail, keys.as_ref()));
    }
    for warning in warnings(&summary, keys.as_ref(), &name) {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// What the log does not prove, one line each.
fn warnings(summary: &VerifySummary, keys: Option<&SidecarKeys>, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if keys.is_none() && summary.checkpoints > 0 {
        out.push(
            "checkpoint signatures not checked (no --jwks): the structure holds, but whoever \
             could write the log could have rewritten it"
                .to_owned(),
        );
    }
    for trail in &summary.sidecars {
        let sidecar = sidecar_name(trail, keys);
        if keys.is_some() && trail.unverified > 0 {
            out.push(format!(
                "{sidecar}: no key for it in the JWKS: {} not verified",
                count(trail.unverified, "checkpoint")
            ));
        }
        if let Some(line) = trail.first_uncovered_line {
            out.push(format!(
                "{sidecar}: {} from line {line} on not covered by a checkpoint: records after \
                 a sidecar's last checkpoint can be cut off or added without a trace",
                count(trail.uncovered, "record")
            ));
        }
    }
    for link in &summary.external_links {
        out.push(format!(
            "external link: line {}: session {} starts from {}, a record not in {name}",
            link.line, link.session, link.prev
        ));
    }
    out
}

/// The summary line after `ok: `.
fn describe(summary: &VerifySummary) -> String {
    format!(
        "{}, {}, {}, {}, {}, {}, {} skipped",
        count(summary.records, "record"),
        count(summary.checkpoints, "checkpoint"),
        count(summary.sessions, "session"),
        count(summary.sidecars.len(), "sidecar"),
        count(summary.cross_session_links, "cross-agent link"),
        count(summary.external_links.len(), "external link"),
        count(summary.skipped, "other line"),
    )
}

/// `sidecar KID (POD)`.
fn sidecar_name(trail: &SidecarTrail, keys: Option<&SidecarKeys>) -> String {
    let pod = trail
        .pod
        .as_deref()
        .or_else(|| keys.and_then(|keys| keys.pod_of(&trail.kid)));
    match pod {
        Some(pod) => format!("sidecar {} ({pod})", trail.kid),
        None => format!("sidecar {}", trail.kid),
    }
}

/// One sidecar's line of the summary.
fn describe_trail(trail: &SidecarTrail, keys: Option<&SidecarKeys>) -> String {
    let seq = match trail.last_seq {
        1 => "seq 1".to_owned(),
        last => format!("seq 1-{last}"),
    };
    let mut line = format!(
        "{}: {seq}, {}, {}",
        sidecar_name(trail, keys),
        count(trail.records, "record"),
        count(trail.checkpoints, "checkpoint"),
    );
    if trail.checkpoints > 0 {
        if trail.unverified == 0 {
            line.push_str(" (signatures verified)");
        } else if keys.is_none() {
            line.push_str(" (signatures not checked)");
        } else {
            line.push_str(" (no key: not verified)");
        }
    }
    if trail.uncovered > 0 {
        line.push_str(&format!(
            ", {} not covered",
            count(trail.uncovered, "record")
        ));
    } else if trail.closed {
        line.push_str(", closed by its final checkpoint");
    } else {
        line.push_str(", all covered");
    }
    line
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
