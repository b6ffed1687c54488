//! `chaperonectl approval`: people's side of human approval, on the cluster.
//!
//! - `list [--all] [-A] [-o wide|json|yaml]`: the ToolCallApprovals waiting for
//!   a decision (every phase with `--all`), with each call's arguments (as
//!   stored: redacted ones read `[redacted]`) and delegation chain.
//! - `approve NAME` / `deny NAME [--reason R] [--message M]`: prints the call
//!   (tool, arguments, chain, session) and adds the `Approved` or `Denied`
//!   condition through the status subresource, as the kubeconfig's user or the
//!   one named by `--as`. The controller's admission webhook decides whether
//!   that user may, and records who decided (`decidedBy`): the CLI never
//!   writes it. A request that is no longer pending is refused here, before
//!   anything is sent.
//!
//! The status update is a merge patch that carries the resourceVersion read,
//! so a decision made by someone else in between makes it conflict instead of
//! being overwritten; the CLI then reads the object again and refuses if it is
//! no longer pending.

use anyhow::{Context, Result, bail};
use chaperone_api::approval::{
    ApprovalPhase, CONDITION_APPROVED, CONDITION_DENIED, CONDITION_EXPIRED, ToolCallApproval,
    ToolCallApprovalStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::cluster::{ClusterArgs, api_error, on_cluster};

/// Condition reason written by `approve` unless `--reason` names another.
pub const DEFAULT_APPROVE_REASON: &str = "ApprovedByUser";
/// Condition reason written by `deny` unless `--reason` names another.
pub const DEFAULT_DENY_REASON: &str = "DeniedByUser";

/// How many times a decision is retried when the object changed between the
/// read and the update.
const CONFLICT_ATTEMPTS: usize = 3;
/// Longest arguments text in the plain table's second line.
const COMPACT_ARGUMENTS: usize = 100;
/// Longest condition reason Kubernetes accepts.
const MAX_REASON: usize = 1024;
/// Longest condition message Kubernetes accepts.
const MAX_MESSAGE: usize = 32768;

/// Arguments of `chaperonectl approval`.
#[derive(clap::Args)]
pub struct ApprovalArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: ApprovalCommand,
}

#[derive(clap::Subcommand)]
enum ApprovalCommand {
    /// List tool calls waiting for a person's decision.
    ///
    /// One row per ToolCallApproval: NAME, AGENT, TOOL, PHASE, REQUESTED (how
    /// long ago), EXPIRES (how long a pending request can still be decided, or
    /// an approval still used), DECIDED-BY; under each row the call's
    /// arguments as stored (redacted ones read "[redacted]") and its
    /// delegation chain. A pending request whose time is up shows as Expired
    /// before the controller records it.
    List(ListArgs),
    /// Approve a pending tool call: the agent's retry of exactly this call (same
    /// session, tool and arguments) is then forwarded, once.
    ///
    /// Prints the call first (tool, arguments, delegation chain, session), then
    /// adds the Approved condition to the object's status. The API server's
    /// admission webhook admits it only for a user allowed the `approve` verb
    /// on the ToolPolicy whose rule asked, never for the agent's own
    /// ServiceAccount, and records that user as the approver.
    Approve(DecideArgs),
    /// Deny a pending tool call: the agent's call is refused with the reason and
    /// message.
    ///
    /// Prints the call first, then adds the Denied condition to the object's
    /// status; the same rules as for approve decide who may.
    Deny(DecideArgs),
}

/// Arguments of `approval list`.
#[derive(clap::Args)]
struct ListArgs {
    /// Every phase (Approved, Consumed, Denied, Expired too), not only Pending.
    #[arg(long)]
    all: bool,
    /// Every namespace (adds a NAMESPACE column).
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// `wide` adds SERVER, SESSION, POLICY and RULE and prints the arguments
    /// in full; `json` and `yaml` print the objects as a List.
    #[arg(short = 'o', long, value_enum)]
    output: Option<OutputFormat>,
}

/// `approval list -o`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    Wide,
    Json,
    Yaml,
}

/// Arguments of `approval approve` and `approval deny`.
#[derive(clap::Args)]
struct DecideArgs {
    /// The ToolCallApproval's name.
    name: String,
    /// The condition's reason: CamelCase, as Kubernetes requires (letters,
    /// digits, `_`, `,`, `:`; a letter first), e.g. `RefundVerified`.
    /// Default: ApprovedByUser / DeniedByUser. Free text goes in --message.
    #[arg(long, value_name = "REASON")]
    reason: Option<String>,
    /// Free text for the condition's message (the agent sees it with a denial).
    #[arg(long, short = 'm', value_name = "TEXT", default_value = "")]
    message: String,
}

/// A person's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Let the call through, once.
    Approve,
    /// Refuse the call.
    Deny,
}

impl Decision {
    /// The condition type it adds.
    pub fn condition_type(self) -> &'static str {
        match self {
            Decision::Approve => CONDITION_APPROVED,
            Decision::Deny => CONDITION_DENIED,
        }
    }

    fn default_reason(self) -> &'static str {
        match self {
            Decision::Approve => DEFAULT_APPROVE_REASON,
            Decision::Deny => DEFAULT_DENY_REASON,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Deny => "deny",
        }
    }

    fn past(self) -> &'static str {
        match self {
            Decision::Approve => "approved",
            Decision::Deny => "denied",
        }
    }
}

/// Runs `chaperonectl approval`.
pub fn run(args: &ApprovalArgs) -> Result<()> {
    // Checked before connecting: a malformed reason never reaches the cluster.
    if let ApprovalCommand::Approve(decide) | ApprovalCommand::Deny(decide) = &args.command {
        if let Some(reason) = &decide.reason {
            check_reason(reason)?;
        }
        check_message(&decide.message)?;
    }
    on_cluster(&args.cluster, async |client, namespace| {
        match &args.command {
            ApprovalCommand::List(list_args) => list(client, &namespace, list_args).await,
            ApprovalCommand::Approve(decide) => {
                decide_call(client, &namespace, decide, Decision::Approve).await
            }
            ApprovalCommand::Deny(decide) => {
                decide_call(client, &namespace, decide, Decision::Deny).await
            }
        }
    })
}

async fn list(client: Client, namespace: &str, args: &ListArgs) -> Result<()> {
    let api: Api<ToolCallApproval> = if args.all_namespaces {
        Api::all(client)
    } else {
        Api::namespaced(client, namespace)
    };
    let mut objects = api
        .list(&ListParams::default())
        .await
        .map_err(|err| api_error(err, "listing toolcallapprovals"))?
        .items;
    let now = Timestamp::now();
    if !args.all {
        objects.retain(|object| effective_phase(object, now).is_pending());
    }
    objects.sort_by(|a, b| {
        (a.namespace(), &a.spec.requested_at, a.name_any()).cmp(&(
            b.namespace(),
            &b.spec.requested_at,
            b.name_any(),
        ))
    });
    match args.output {
        Some(OutputFormat::Json) => {
            println!("{}", serde_json::to_string_pretty(&as_list(&objects)?)?);
        }
        Some(OutputFormat::Yaml) => {
            print!("{}", serde_saphyr::to_string(&as_list(&objects)?)?);
        }
        format => {
            if objects.is_empty() {
                let what = if args.all { "" } else { "pending " };
                if args.all_namespaces {
                    eprintln!("No {what}tool call approvals in any namespace.");
                } else {
                    eprintln!("No {what}tool call approvals in namespace {namespace}.");
                }
            } else {
                let table = TableOptions {
                    wide: format == Some(OutputFormat::Wide),
                    namespaces: args.all_namespaces,
                };
                print!("{}", render_table(&objects, now, table));
            }
        }
    }
    Ok(())
}

/// `objects` as a `v1` `List`, the shape `kubectl get -o json` prints (and,
/// as it does by default, without `managedFields`).
fn as_list(objects: &[ToolCallApproval]) -> Result<Value> {
    let items: Vec<ToolCallApproval> = objects
        .iter()
        .cloned()
        .map(|mut object| {
            object.metadata.managed_fields = None;
            object
        })
        .collect();
    Ok(json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {},
        "items": serde_json::to_value(items)?,
    }))
}

async fn decide_call(
    client: Client,
    namespace: &str,
    args: &DecideArgs,
    decision: Decision,
) -> Result<()> {
    let api: Api<ToolCallApproval> = Api::namespaced(client, namespace);
    let reason = args
        .reason
        .clone()
        .unwrap_or_else(|| decision.default_reason().to_owned());
    let qualified = format!("{namespace}/{}", args.name);
    for attempt in 1..=CONFLICT_ATTEMPTS {
        let object = match api.get_opt(&args.name).await {
            Ok(Some(object)) => object,
            Ok(None) => bail!("toolcallapproval {qualified} not found"),
            Err(err) => {
                return Err(api_error(
                    err,
                    &format!("reading toolcallapproval {qualified}"),
                ));
            }
        };
        let now = Timestamp::now();
        check_pending(&object, now, decision)?;
        if attempt == 1 {
            print!("{}", describe(&object, now));
        }
        let patch = decision_patch(&object, decision, &reason, &args.message, now)?;
        match api
            .patch_status(&args.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(updated) => {
                println!("{}", outcome(&updated, decision));
                return Ok(());
            }
            Err(kube::Error::Api(status)) if status.is_conflict() => continue,
            Err(err) => {
                return Err(api_error(
                    err,
                    &format!("{} toolcallapproval {qualified}", decision.verb()),
                ));
            }
        }
    }
    bail!(
        "toolcallapproval {qualified} kept changing while it was being {}; try again",
        decision.past()
    )
}

/// The line printed once the decision is stored: the webhook's answer
/// (`decidedBy`, `validUntil`) when it wrote one.
fn outcome(updated: &ToolCallApproval, decision: Decision) -> String {
    let mut line = format!(
        "toolcallapproval.chaperone.dev/{} {}",
        updated.name_any(),
        decision.past()
    );
    let status = updated.status.as_ref();
    if let Some(by) = status.and_then(|s| s.decided_by.as_ref()) {
        line.push_str(&format!(" (decided by {}", by.username));
        if let Some(until) = status.and_then(|s| s.valid_until.as_deref()) {
            line.push_str(&format!("; usable until {until}"));
        }
        line.push(')');
    }
    line
}

/// The merge patch of the status subresource that records `decision`: the
/// object's conditions plus the new one, conditioned on the resourceVersion
/// they were read at (a merge patch replaces the whole list).
pub fn decision_patch(
    object: &ToolCallApproval,
    decision: Decision,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Result<Value> {
    let resource_version = object
        .metadata
        .resource_version
        .as_deref()
        .context("the object read has no resourceVersion")?;
    let mut conditions = object
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    conditions.push(Condition {
        type_: decision.condition_type().to_owned(),
        status: "True".to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: Time(now),
        observed_generation: object.metadata.generation,
    });
    Ok(json!({
        "metadata": { "resourceVersion": resource_version },
        "status": { "conditions": conditions },
    }))
}

/// Where `object` stands at `now`, as a person deciding sees it: the recorded
/// phase, or what its conditions and times already say when the controller
/// has not recorded it yet (a decision without the webhook's phase, a pending
/// request or an approval whose time is up).
pub fn effective_phase(object: &ToolCallApproval, now: Timestamp) -> ApprovalPhase {
    let empty = ToolCallApprovalStatus::default();
    let status = object.status.as_ref().unwrap_or(&empty);
    let recorded = status.phase;
    if status.consumed_at.is_some() || recorded == Some(ApprovalPhase::Consumed) {
        return ApprovalPhase::Consumed;
    }
    if true_condition(status, CONDITION_DENIED).is_some() || recorded == Some(ApprovalPhase::Denied)
    {
        return ApprovalPhase::Denied;
    }
    if true_condition(status, CONDITION_EXPIRED).is_some()
        || recorded == Some(ApprovalPhase::Expired)
    {
        return ApprovalPhase::Expired;
    }
    let approved = true_condition(status, CONDITION_APPROVED);
    if approved.is_some() || recorded == Some(ApprovalPhase::Approved) {
        return match usable_until(object, approved) {
            Some(until) if now >= until => ApprovalPhase::Expired,
            _ => ApprovalPhase::Approved,
        };
    }
    match parse_time(&object.spec.expires_at) {
        Some(expires) if now >= expires => ApprovalPhase::Expired,
        _ => ApprovalPhase::Pending,
    }
}

fn true_condition<'a>(status: &'a ToolCallApprovalStatus, type_: &str) -> Option<&'a Condition> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// Until when an approved call can be made: `status.validUntil`, else the
/// decision time plus `spec.validForSeconds`.
fn usable_until(object: &ToolCallApproval, approved: Option<&Condition>) -> Option<Timestamp> {
    let status = object.status.as_ref()?;
    if let Some(until) = status.valid_until.as_deref() {
        return parse_time(until);
    }
    let decided = status
        .decided_at
        .as_deref()
        .and_then(parse_time)
        .or_else(|| approved.map(|c| c.last_transition_time.0))?;
    Some(decided + SignedDuration::from_secs(i64::from(object.spec.valid_for_seconds)))
}

fn parse_time(text: &str) -> Option<Timestamp> {
    text.parse().ok()
}

/// Refuses, naming why, to decide an object that is no longer pending.
fn check_pending(object: &ToolCallApproval, now: Timestamp, decision: Decision) -> Result<()> {
    let phase = effective_phase(object, now);
    if phase.is_pending() {
        return Ok(());
    }
    let name = qualified_name(object);
    let by = object
        .status
        .as_ref()
        .and_then(|s| s.decided_by.as_ref())
        .map(|d| format!(" by {}", d.username))
        .unwrap_or_default();
    let state = match phase {
        ApprovalPhase::Approved => format!("was already approved{by}"),
        ApprovalPhase::Consumed => format!("was already approved{by} and used"),
        ApprovalPhase::Denied => format!("was already denied{by}"),
        ApprovalPhase::Expired
            if object
                .status
                .as_ref()
                .is_some_and(|s| true_condition(s, CONDITION_APPROVED).is_some()) =>
        {
            format!("was approved{by} but not used in time: it has expired")
        }
        ApprovalPhase::Expired => format!(
            "has expired (nobody decided before {}); the agent's next attempt at the \
             call creates a new request",
            object.spec.expires_at
        ),
        ApprovalPhase::Pending => unreachable!("checked above"),
    };
    bail!(
        "cannot {} toolcallapproval {name}: it {state}. Only a Pending request can be \
         approved or denied (nothing was changed)",
        decision.verb()
    )
}

/// Refuses a condition reason the API conventions do not allow, before
/// anything is sent.
pub fn check_reason(reason: &str) -> Result<()> {
    let mut chars = reason.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && reason
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | ':'))
        && reason
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && reason.len() <= MAX_REASON;
    if !well_formed {
        bail!(
            "--reason {reason:?} is not a condition reason: Kubernetes requires CamelCase \
             (a letter, then letters, digits, '_', ',' or ':'; at most {MAX_REASON} characters), \
             e.g. RefundVerified. Put free text in --message"
        );
    }
    Ok(())
}

fn check_message(message: &str) -> Result<()> {
    if message.len() > MAX_MESSAGE {
        bail!("--message is longer than Kubernetes accepts ({MAX_MESSAGE} bytes)");
    }
    Ok(())
}

fn qualified_name(object: &ToolCallApproval) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// The delegation chain, outermost delegator first, ending at the agent
/// itself; with the grant of each hop when `grants`.
pub fn chain_text(object: &ToolCallApproval, grants: bool) -> String {
    let namespace = object.namespace().unwrap_or_default();
    let mut hops: Vec<String> = object
        .spec
        .delegation_chain
        .iter()
        .map(|link| {
            if grants {
                format!("{} (grant {})", link.agent, link.grant)
            } else {
                link.agent.clone()
            }
        })
        .collect();
    hops.push(format!("{namespace}/{}", object.spec.agent));
    hops.join(" → ")
}

/// What a person is asked to decide, printed before the decision is sent.
pub fn describe(object: &ToolCallApproval, now: Timestamp) -> String {
    let spec = &object.spec;
    let mut out = format!("ToolCallApproval {}\n", qualified_name(object));
    let mut field = |label: &str, value: &str| {
        out.push_str(&format!("  {:<11}{value}\n", format!("{label}:")));
    };
    field(
        "Agent",
        &format!(
            "{} (pod {}, ServiceAccount {})",
            spec.agent, spec.pod, spec.service_account
        ),
    );
    field("Server", &spec.server);
    field("Tool", &spec.tool);
    field(
        "Session",
        &format!("{} {}", spec.session.scope, spec.session.key),
    );
    if let Some(initiator) = &spec.initiator {
        field("Initiator", initiator);
    }
    if spec.delegation_chain.is_empty() {
        field("Chain", "none (the agent's own call)");
    } else {
        field("Chain", &chain_text(object, true));
    }
    field(
        "Policy",
        &format!(
            "{}/{}, rule {}",
            spec.policy.namespace, spec.policy.name, spec.rule
        ),
    );
    field(
        "Requested",
        &format!(
            "{} ({})",
            spec.requested_at,
            relative(&spec.requested_at, now)
        ),
    );
    field(
        "Expires",
        &format!("{} ({})", spec.expires_at, relative(&spec.expires_at, now)),
    );
    field("Phase", effective_phase(object, now).as_str());
    if spec.redacted_arguments.is_empty() {
        field("Arguments", "");
    } else {
        field(
            "Arguments",
            &format!("(redacted: {})", spec.redacted_arguments.join(", ")),
        );
    }
    let arguments = serde_json::to_string_pretty(&spec.arguments)
        .unwrap_or_else(|_| spec.arguments.to_string());
    for line in arguments.lines() {
        out.push_str(&format!("    {line}\n"));
    }
    out
}

/// `text` (RFC 3339) relative to `now`: "3m ago", "in 7m".
fn relative(text: &str, now: Timestamp) -> String {
    match parse_time(text) {
        Some(when) if when <= now => format!("{} ago", short_duration(now.duration_since(when))),
        Some(when) => format!("in {}", short_duration(when.duration_since(now))),
        None => "unreadable time".to_owned(),
    }
}

/// A duration in its largest sensible unit, as kubectl's AGE column shows:
/// "45s", "12m", "5h", "3d".
pub fn short_duration(duration: SignedDuration) -> String {
    let seconds = duration.as_secs().max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Layout of the `list` table.
#[derive(Clone, Copy, Debug, Default)]
pub struct TableOptions {
    /// Extra columns and the arguments in full.
    pub wide: bool,
    /// A NAMESPACE column first.
    pub namespaces: bool,
}

/// The `list` table: one row per object and, under it, the call's arguments
/// and (when delegated) its chain.
pub fn render_table(objects: &[ToolCallApproval], now: Timestamp, options: TableOptions) -> String {
    let mut header = Vec::new();
    if options.namespaces {
        header.push("NAMESPACE");
    }
    header.extend([
        "NAME",
        "AGENT",
        "TOOL",
        "PHASE",
        "REQUESTED",
        "EXPIRES",
        "DECIDED-BY",
    ]);
    if options.wide {
        header.extend(["SERVER", "SESSION", "POLICY", "RULE"]);
    }
    let mut rows: Vec<Vec<String>> = vec![header.into_iter().map(str::to_owned).collect()];
    let mut details = vec![None];
    for object in objects {
        let spec = &object.spec;
        let phase = effective_phase(object, now);
        let mut row = Vec::new();
        if options.namespaces {
            row.push(object.namespace().unwrap_or_default());
        }
        row.extend([
            object.name_any(),
            spec.agent.clone(),
            spec.tool.clone(),
            phase.as_str().to_owned(),
            parse_time(&spec.requested_at)
                .map(|when| short_duration(now.duration_since(when)))
                .unwrap_or_else(|| "?".to_owned()),
            expires_column(object, phase, now),
            object
                .status
                .as_ref()
                .and_then(|s| s.decided_by.as_ref())
                .map(|d| d.username.clone())
                .unwrap_or_else(|| "-".to_owned()),
        ]);
        if options.wide {
            row.extend([
                spec.server.clone(),
                format!("{}/{}", spec.session.scope, spec.session.key),
                format!("{}/{}", spec.policy.namespace, spec.policy.name),
                spec.rule.clone(),
            ]);
        }
        rows.push(row);
        details.push(Some(detail_line(object, options.wide)));
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (row, detail) in rows.iter().zip(details) {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[column] - cell.chars().count() + 3;
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if let Some(detail) = detail {
            out.push_str(&detail);
            out.push('\n');
        }
    }
    out
}

/// EXPIRES: how long a pending request can still be decided, or an approval
/// still used; "-" otherwise.
fn expires_column(object: &ToolCallApproval, phase: ApprovalPhase, now: Timestamp) -> String {
    let until = match phase {
        ApprovalPhase::Pending => parse_time(&object.spec.expires_at),
        ApprovalPhase::Approved => usable_until(
            object,
            object
                .status
                .as_ref()
                .and_then(|s| true_condition(s, CONDITION_APPROVED)),
        ),
        _ => return "-".to_owned(),
    };
    match until {
        Some(until) => format!("in {}", short_duration(until.duration_since(now))),
        None => "?".to_owned(),
    }
}

/// The indented line under a row: arguments (cut short unless `wide`) and
/// the delegation chain.
fn detail_line(object: &ToolCallApproval, wide: bool) -> String {
    let mut arguments = object.spec.arguments.to_string();
    if !wide && arguments.chars().count() > COMPACT_ARGUMENTS {
        arguments = arguments.chars().take(COMPACT_ARGUMENTS - 1).collect();
        arguments.push('…');
    }
    let mut line = format!("    args: {arguments}");
    if !object.spec.delegation_chain.is_empty() {
        line.push_str(&format!("  chain: {}", chain_text(object, wide)));
    }
    line
}

#[cfg(test)]
#[path = "approval_tests.rs"]
mod tests;
