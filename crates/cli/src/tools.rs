//! `chaperonectl tools`: accepting a changed tool definition, on the cluster.
//!
//! - `diff AGENT [TOOL…]`: for each discovered tool whose current definition
//!   differs from its pin (or that has none, or conflicting ones), the pinned
//!   and the current definition as a unified diff of pretty JSON, from the
//!   AgentIdentity's `status.discoveredTools` and the texts the controller
//!   keeps in the ConfigMap `<agent>-tool-definitions`. A text that is not
//!   there is named by its hash.
//! - `pin AGENT [TOOL…] [--policy NAME] [-o yaml]`: writes the current hashes
//!   of those tools (default: every discovered tool with a definition that
//!   does not match its pin) as `spec.tools[]` pins (`server`, `name`,
//!   `definition`) into ToolPolicy NAME (default `<agent>-tool-pins`,
//!   targeting the agent) by server-side apply with its own field manager
//!   (`chaperonectl-tools-pin`), or prints the resulting ToolPolicy for
//!   review in git. A pin another ToolPolicy of the agent gives the same tool
//!   is refused: two pins of one tool conflict, and conflicting pins block it.
//!
//! `TOOL` is `server/tool`, or a tool name that one server has.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Result, bail};
use chaperone_api::{
    AgentIdentity, DiscoveredTool, PinState, ToolPolicy, ToolPolicySpecV1,
    model::{AgentRef, ToolClassification, ToolPolicySpec},
    tool_definitions::{PIN_FIELD_MANAGER, config_map_name, data_key, is_definition_hash},
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::cluster::{ClusterArgs, api_error, on_cluster};

/// Lines of context around each change in a diff.
const CONTEXT: usize = 3;
/// Above this many line pairs a diff is not computed: both texts are shown.
const MAX_DIFF_CELLS: usize = 16_000_000;

/// Arguments of `chaperonectl tools`.
#[derive(clap::Args)]
pub struct ToolsArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: ToolsCommand,
}

#[derive(clap::Subcommand)]
enum ToolsCommand {
    /// Show how the agent's tools differ from their pinned definitions.
    ///
    /// For each discovered tool whose current definition differs from its
    /// pin (or that is not pinned, or pinned to conflicting definitions):
    /// both hashes and a unified diff of the pinned and the current
    /// definition as pretty JSON (name, title, description, inputSchema,
    /// outputSchema, annotations). The controller keeps the texts in the
    /// ConfigMap <AGENT>-tool-definitions; a text it does not have (too large,
    /// or never reported since it was pinned) is named by its hash only.
    ///
    /// Exits 1 when a tool it shows differs from its pin, is not pinned, or is
    /// pinned to conflicting definitions (a CI check), 0 when none does.
    Diff(DiffArgs),
    /// Pin the agent's tools to their current definitions.
    ///
    /// Writes `spec.tools[]` entries {server, name, definition} with the
    /// current hashes into a ToolPolicy (default <AGENT>-tool-pins, targeting
    /// the agent) by server-side apply (field manager chaperonectl-tools-pin),
    /// keeping its other entries. With -o yaml nothing is written: the
    /// resulting ToolPolicy is printed, for review and commit in git.
    Pin(PinArgs),
}

/// Arguments of `tools diff`.
#[derive(clap::Args)]
struct DiffArgs {
    /// The AgentIdentity.
    agent: String,
    /// Only these tools: `server/tool`, or a tool name.
    tools: Vec<String>,
}

/// Arguments of `tools pin`.
#[derive(clap::Args)]
struct PinArgs {
    /// The AgentIdentity.
    agent: String,
    /// The tools to pin: `server/tool`, or a tool name. Default: every
    /// discovered tool with a definition that does not match its pin.
    tools: Vec<String>,
    /// The ToolPolicy to write the pins into (created when missing, targeting
    /// the agent). Default: <AGENT>-tool-pins.
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// `yaml`: print the resulting ToolPolicy instead of writing it.
    #[arg(short = 'o', long, value_enum)]
    output: Option<PinOutput>,
    /// Take over `spec.tools` from another field manager (kubectl apply, a
    /// GitOps tool) instead of refusing.
    #[arg(long)]
    force_conflicts: bool,
}

/// `tools pin -o`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PinOutput {
    Yaml,
}

/// Runs `chaperonectl tools`: 1 when `diff` showed a tool to review.
pub fn run(args: &ToolsArgs) -> Result<ExitCode> {
    on_cluster(&args.cluster, async |client, namespace| {
        match &args.command {
            ToolsCommand::Diff(diff_args) => {
                let to_review = diff(client, &namespace, diff_args).await?;
                Ok(if to_review {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                })
            }
            ToolsCommand::Pin(pin_args) => pin(client, &namespace, pin_args)
                .await
                .map(|()| ExitCode::SUCCESS),
        }
    })
}

async fn read_agent(client: &Client, namespace: &str, name: &str) -> Result<AgentIdentity> {
    let api: Api<AgentIdentity> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(agent)) => Ok(agent),
        Ok(None) => bail!("agentidentity {namespace}/{name} not found"),
        Err(err) => Err(api_error(
            err,
            &format!("reading agentidentity {namespace}/{name}"),
        )),
    }
}

fn discovered(agent: &AgentIdentity) -> &[DiscoveredTool] {
    agent
        .status
        .as_ref()
        .map(|s| s.discovered_tools.as_slice())
        .unwrap_or_default()
}

/// Prints the diffs; says whether one of the tools shown [`needs_review`].
async fn diff(client: Client, namespace: &str, args: &DiffArgs) -> Result<bool> {
    let agent = read_agent(&client, namespace, &args.agent).await?;
    let tools = if args.tools.is_empty() {
        discovered(&agent)
            .iter()
            .filter(|t| needs_review(t))
            .collect()
    } else {
        select(discovered(&agent), &args.tools)?
    };
    if tools.is_empty() {
        println!(
            "No discovered tool of agentidentity {namespace}/{} differs from its pin.",
            args.agent
        );
        return Ok(false);
    }
    let texts = Api::<ConfigMap>::namespaced(client, namespace)
        .get_opt(&config_map_name(&args.agent))
        .await
        .map_err(|err| {
            api_error(
                err,
                &format!(
                    "reading configmap {namespace}/{}",
                    config_map_name(&args.agent)
                ),
            )
        })?
        .and_then(|c| c.data)
        .unwrap_or_default();
    let mut out = String::new();
    for (i, tool) in tools.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&render_tool_diff(tool, &texts));
    }
    print!("{out}");
    Ok(tools.iter().any(|tool| needs_review(tool)))
}

/// Whether `diff` shows the tool unasked: it has a definition that does not
/// match its pin.
fn needs_review(tool: &DiscoveredTool) -> bool {
    matches!(
        tool.pin,
        Some(PinState::Differs | PinState::Unpinned | PinState::Conflicting)
    )
}

/// The tools of `discovered` that `wanted` names (`server/tool` or a tool
/// name one server has), in the order named.
pub fn select<'a>(
    discovered: &'a [DiscoveredTool],
    wanted: &[String],
) -> Result<Vec<&'a DiscoveredTool>> {
    let mut out: Vec<&DiscoveredTool> = Vec::new();
    for name in wanted {
        let matching: Vec<&DiscoveredTool> = match name.split_once('/') {
            Some((server, tool)) => discovered
                .iter()
                .filter(|t| t.server == server && t.name == tool)
                .collect(),
            None => discovered.iter().filter(|t| t.name == *name).collect(),
        };
        match matching.as_slice() {
            [] => bail!(
                "no discovered tool {name:?}: the agent's sidecars have not listed it (see status.discoveredTools)"
            ),
            [one] => {
                if !out.iter().any(|t| std::ptr::eq(*t, *one)) {
                    out.push(one);
                }
            }
            several => bail!(
                "tool name {name:?} is ambiguous: {}; name it as server/tool",
                several
                    .iter()
                    .map(|t| format!("{}/{}", t.server, t.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(out)
}

/// One tool's section of `tools diff`: its hashes, then the diff of the
/// pinned and the current definition (or the current one alone when there
/// is no single pin), from the ConfigMap's `texts`.
pub fn render_tool_diff(tool: &DiscoveredTool, texts: &BTreeMap<String, String>) -> String {
    let name = format!("{}/{}", tool.server, tool.name);
    let state = tool.pin.map_or("unknown", PinState::as_str);
    let mut out = format!("{name}: {}\n", describe_state(tool.pin));
    let Some(current) = &tool.definition_hash else {
        out.push_str(&format!(
            "  no definition reported (pin: {state}; is the server's toolPinning off?)\n"
        ));
        return out;
    };
    let pinned = match tool.pin {
        Some(PinState::Matches) => Some(current),
        _ => tool.pinned_hash.as_ref(),
    };
    if let Some(pinned) = pinned {
        out.push_str(&format!("  pinned:  {pinned}\n"));
    }
    let since = tool
        .first_seen
        .as_deref()
        .map(|at| format!(" (since {at})"))
        .unwrap_or_default();
    out.push_str(&format!("  current: {current}{since}\n"));
    let text_of = |hash: &str| {
        texts
            .get(&data_key(&tool.server, &tool.name, hash))
            .map(|text| pretty(text))
    };
    let current_text = text_of(current);
    match pinned.filter(|p| *p != current) {
        Some(pinned) => match (text_of(pinned), &current_text) {
            (Some(old), Some(new)) => {
                out.push_str(&unified_diff(
                    &old,
                    new,
                    &format!("pinned {pinned}"),
                    &format!("current {current}"),
                ));
            }
            (old, new) => {
                for (label, hash, text) in [("pinned", pinned, &old), ("current", current, new)] {
                    match text {
                        Some(text) => {
                            out.push_str(&format!("  {label} definition:\n"));
                            out.push_str(&indent(text));
                        }
                        None => out.push_str(&unavailable(label, hash)),
                    }
                }
            }
        },
        None => match &current_text {
            Some(text) => {
                out.push_str("  current definition:\n");
                out.push_str(&indent(text));
            }
            None => out.push_str(&unavailable("current", current)),
        },
    }
    out
}

fn describe_state(pin: Option<PinState>) -> &'static str {
    match pin {
        Some(PinState::Differs) => "definition differs from its pin",
        Some(PinState::Unpinned) => "not pinned",
        Some(PinState::Conflicting) => {
            "pinned to conflicting definitions by several ToolPolicies (none matches)"
        }
        Some(PinState::Matches) => "matches its pin",
        Some(PinState::Unknown) => "no definition reported yet",
        Some(PinState::Off) => "toolPinning off: definitions are not compared",
        None => "no pin information (is the controller up to date?)",
    }
}

fn unavailable(label: &str, hash: &str) -> String {
    format!(
        "  {label} definition {hash}: text not available (the controller keeps the texts it was sent; this one was too large, or not reported since)\n"
    )
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}

/// A definition (JSON text) pretty-printed, keys in order; a text that is not
/// JSON as it is.
pub fn pretty(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_owned())
}

/// A unified diff (`---`/`+++`, `@@` hunks with [`CONTEXT`] lines) of two
/// texts, line by line; empty when they are equal.
pub fn unified_diff(old: &str, new: &str, old_label: &str, new_label: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a == b {
        return String::new();
    }
    let Some(ops) = line_ops(&a, &b) else {
        let mut out = format!("--- {old_label}\n+++ {new_label}\n");
        out.extend(a.iter().map(|l| format!("-{l}\n")));
        out.extend(b.iter().map(|l| format!("+{l}\n")));
        return out;
    };
    let mut out = format!("--- {old_label}\n+++ {new_label}\n");
    // Hunks: runs of changes with up to 2×CONTEXT equal lines between them.
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| !matches!(op, Op::Same(..)))
        .map(|(i, _)| i)
        .collect();
    let mut start = 0;
    while start < changed.len() {
        let mut end = start;
        while end + 1 < changed.len() && changed[end + 1] - changed[end] <= 2 * CONTEXT + 1 {
            end += 1;
        }
        let from = changed[start].saturating_sub(CONTEXT);
        let to = (changed[end] + CONTEXT + 1).min(ops.len());
        let hunk = &ops[from..to];
        let (old_start, new_start) = position(&ops[..from]);
        let old_len = hunk.iter().filter(|op| !matches!(op, Op::Add(_))).count();
        let new_len = hunk
            .iter()
            .filter(|op| !matches!(op, Op::Remove(_)))
            .count();
        out.push_str(&format!(
            "@@ -{} +{} @@\n",
            range(old_start, old_len),
            range(new_start, new_len)
        ));
        for op in hunk {
            match op {
                Op::Same(line) => out.push_str(&format!(" {line}\n")),
                Op::Remove(line) => out.push_str(&format!("-{line}\n")),
                Op::Add(line) => out.push_str(&format!("+{line}\n")),
            }
        }
        start = end + 1;
    }
    out
}

/// One line of a diff.
#[derive(Debug, PartialEq, Eq)]
enum Op<'a> {
    Same(&'a str),
    Remove(&'a str),
    Add(&'a str),
}

/// The lines of `a` and `b` as an edit script of a longest common
/// subsequence; `None` when the texts are too long to compare.
fn line_ops<'a>(a: &[&'a str], b: &[&'a str]) -> Option<Vec<Op<'a>>> {
    let (n, m) = (a.len(), b.len());
    if n.saturating_mul(m) > MAX_DIFF_CELLS {
        return None;
    }
    // lcs[i][j]: the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![0u32; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[at(i, j)] = if a[i] == b[j] {
                lcs[at(i + 1, j + 1)] + 1
            } else {
                lcs[at(i + 1, j)].max(lcs[at(i, j + 1)])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::with_capacity(n + m);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push(Op::Same(a[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < m && (i == n || lcs[at(i, j + 1)] >= lcs[at(i + 1, j)]) {
            ops.push(Op::Add(b[j]));
            j += 1;
        } else {
            ops.push(Op::Remove(a[i]));
            i += 1;
        }
    }
    // Removals before additions within a run of changes, as diff prints them.
    let mut k = 0;
    while k < ops.len() {
        if matches!(ops[k], Op::Same(_)) {
            k += 1;
            continue;
        }
        let end = ops[k..]
            .iter()
            .position(|op| matches!(op, Op::Same(_)))
            .map_or(ops.len(), |p| k + p);
        ops[k..end].sort_by_key(|op| matches!(op, Op::Add(_)));
        k = end;
    }
    Some(ops)
}

/// Lines of the old and the new text before `ops`.
fn position(ops: &[Op<'_>]) -> (usize, usize) {
    let old = ops.iter().filter(|op| !matches!(op, Op::Add(_))).count();
    let new = ops.iter().filter(|op| !matches!(op, Op::Remove(_))).count();
    (old, new)
}

/// A hunk range: 1-based start and length (an empty range starts before).
fn range(before: usize, len: usize) -> String {
    match len {
        0 => format!("{before},0"),
        1 => format!("{}", before + 1),
        _ => format!("{},{len}", before + 1),
    }
}

/// A tool to pin at its current definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// Tool server.
    pub server: String,
    /// Tool.
    pub name: String,
    /// `sha256:<hex>`.
    pub definition: String,
}

/// The pins `pin` writes: `wanted` tools (default: every tool with a
/// definition that does not match its pin), at their current definitions.
pub fn pins_of(discovered: &[DiscoveredTool], wanted: &[String]) -> Result<Vec<Pin>> {
    let tools = if wanted.is_empty() {
        discovered
            .iter()
            .filter(|t| t.definition_hash.is_some() && t.pin != Some(PinState::Matches))
            .collect()
    } else {
        select(discovered, wanted)?
    };
    tools
        .into_iter()
        .map(|tool| {
            let name = format!("{}/{}", tool.server, tool.name);
            let Some(hash) = &tool.definition_hash else {
                bail!(
                    "tool {name} has no definition hash in the status: its server's toolPinning is off, or no sidecar has listed it since pinning was turned on"
                );
            };
            if !is_definition_hash(hash) {
                bail!("tool {name} has a malformed definition hash {hash:?} in the status");
            }
            Ok(Pin {
                server: tool.server.clone(),
                name: tool.name.clone(),
                definition: hash.clone(),
            })
        })
        .collect()
}

/// `tools` with each pin set: an entry for the same literal server and tool
/// gets the new definition (keeping its effects), others are added at the
/// end; every other entry is kept as it is.
pub fn merge_pins(tools: &[ToolClassification], pins: &[Pin]) -> Vec<ToolClassification> {
    let mut merged = tools.to_vec();
    for pin in pins {
        match merged
            .iter_mut()
            .find(|t| t.server == pin.server && t.name == pin.name)
        {
            Some(entry) => entry.definition = Some(pin.definition.clone()),
            None => merged.push(ToolClassification {
                server: pin.server.clone(),
                name: pin.name.clone(),
                effects: Vec::new(),
                definition: Some(pin.definition.clone()),
            }),
        }
    }
    merged
}

/// Whether ToolPolicy `spec` applies to the agent named `agent` with
/// `labels`.
fn targets(spec: &ToolPolicySpec, agent: &str, labels: &BTreeMap<String, String>) -> bool {
    match (&spec.target_refs, &spec.agent_selector) {
        (Some(refs), _) => refs.iter().any(|r| r.name == agent),
        (None, Some(selector)) => selector
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v)),
        (None, None) => false,
    }
}

/// Pins of the same tools by the agent's other ToolPolicies (`policies`:
/// name and spec) to other definitions: "policy: server/tool sha256:…".
pub fn other_pins(
    policies: &[(String, ToolPolicySpec)],
    target: &str,
    agent: &str,
    labels: &BTreeMap<String, String>,
    pins: &[Pin],
) -> Vec<String> {
    let mut found = Vec::new();
    for (name, spec) in policies {
        if name == target || !targets(spec, agent, labels) {
            continue;
        }
        for entry in &spec.tools {
            let Some(definition) = &entry.definition else {
                continue;
            };
            if let Some(pin) = pins.iter().find(|p| {
                p.server == entry.server && p.name == entry.name && &p.definition != definition
            }) {
                found.push(format!(
                    "ToolPolicy {name} pins {}/{} to {definition}",
                    pin.server, pin.name
                ));
            }
        }
    }
    found
}

/// The ToolPolicy `pin` applies: `existing` (its spec, or a new policy
/// targeting `agent`) with `pins` merged into `spec.tools`.
pub fn pinned_policy(
    name: &str,
    namespace: &str,
    agent: &str,
    existing: Option<&ToolPolicySpec>,
    pins: &[Pin],
) -> ToolPolicy {
    let mut spec = existing.cloned().unwrap_or_else(|| ToolPolicySpec {
        target_refs: Some(vec![AgentRef {
            name: agent.to_owned(),
        }]),
        ..Default::default()
    });
    spec.tools = merge_pins(&spec.tools, pins);
    ToolPolicy {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: ToolPolicySpecV1(spec),
        status: None,
    }
}

async fn pin(client: Client, namespace: &str, args: &PinArgs) -> Result<()> {
    let agent = read_agent(&client, namespace, &args.agent).await?;
    let pins = pins_of(discovered(&agent), &args.tools)?;
    if pins.is_empty() {
        eprintln!(
            "Nothing to pin: every discovered tool of agentidentity {namespace}/{} with a definition matches its pin.",
            args.agent
        );
        return Ok(());
    }
    let target = args
        .policy
        .clone()
        .unwrap_or_else(|| format!("{}-tool-pins", args.agent));
    let api: Api<ToolPolicy> = Api::namespaced(client.clone(), namespace);
    let policies = api
        .list(&ListParams::default())
        .await
        .map_err(|err| api_error(err, &format!("listing toolpolicies in {namespace}")))?;
    let specs: Vec<(String, ToolPolicySpec)> = policies
        .items
        .iter()
        .map(|p| (p.name_any(), p.spec.0.clone()))
        .collect();
    let labels = agent.labels().clone();
    let conflicts = other_pins(&specs, &target, &args.agent, &labels, &pins);
    if !conflicts.is_empty() {
        bail!(
            "not pinning: {}. Two pins of one tool conflict and block it; pin it in that policy (--policy NAME) or remove its pin there",
            conflicts.join("; ")
        );
    }
    let existing = specs.iter().find(|(n, _)| *n == target).map(|(_, s)| s);
    if let Some(spec) = existing
        && !targets(spec, &args.agent, &labels)
    {
        bail!(
            "ToolPolicy {namespace}/{target} does not apply to agentidentity {}: its pins would not count. Name a policy that targets it, or leave out --policy",
            args.agent
        );
    }
    let policy = pinned_policy(&target, namespace, &args.agent, existing, &pins);
    if args.output == Some(PinOutput::Yaml) {
        print!("{}", manifest_yaml(&policy)?);
        return Ok(());
    }
    // Only what this command owns: the pins and the policy's target (as it
    // is: applied unchanged it is shared with its other managers, and left
    // out it would be removed where this command created it); the rest stays
    // with its managers.
    let mut spec = json!({ "tools": policy.spec.0.tools });
    if let Some(refs) = &policy.spec.0.target_refs {
        spec["targetRefs"] = json!(refs);
    }
    let patch = json!({
        "apiVersion": chaperone_api::model::API_VERSION,
        "kind": "ToolPolicy",
        "metadata": { "name": target, "namespace": namespace },
        "spec": spec,
    });
    let mut params = PatchParams::apply(PIN_FIELD_MANAGER);
    if args.force_conflicts {
        params = params.force();
    }
    match api.patch(&target, &params, &Patch::Apply(&patch)).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_conflict() => bail!(
            "ToolPolicy {namespace}/{target}: spec.tools is managed by someone else ({}). Print the change with -o yaml and apply it where the policy is kept (git), or take it over with --force-conflicts",
            status.message
        ),
        Err(err) => {
            return Err(api_error(
                err,
                &format!("applying toolpolicy {namespace}/{target}"),
            ));
        }
    }
    println!(
        "toolpolicy.chaperone.dev/{target} pinned {} tool{} of agentidentity {}:",
        pins.len(),
        if pins.len() == 1 { "" } else { "s" },
        args.agent
    );
    for pin in &pins {
        println!("  {}/{}  {}", pin.server, pin.name, pin.definition);
    }
    Ok(())
}

/// `policy` as YAML for git: apiVersion, kind, name, namespace and spec.
fn manifest_yaml(policy: &ToolPolicy) -> Result<String> {
    let manifest = json!({
        "apiVersion": chaperone_api::model::API_VERSION,
        "kind": "ToolPolicy",
        "metadata": {
            "name": policy.metadata.name,
            "namespace": policy.metadata.namespace,
        },
        "spec": serde_json::to_value(&policy.spec)?,
    });
    Ok(serde_saphyr::to_string(&manifest)?)
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;
