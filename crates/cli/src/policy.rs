//! `chaperonectl policy`: decide tool calls offline against CR YAML files, or
//! against the objects on the cluster (`--from-cluster`).
//!
//! - `explain`: one call (agent, tool, JSON arguments, optional session history
//!   and delegation chain) → the decision, the deciding rule, and why every other
//!   rule did not match; for a call needing approval, who must approve and what
//!   the approver is shown.
//! - `test FILE`: a YAML list of calls with expected decisions (`allow`, `deny`
//!   or `approval`; `approved: true` for a call a person approved), like `opa
//!   test`; exits non-zero on a mismatch or on a policy that does not compile.
//!
//! `--from-cluster` reads the AgentIdentities, ToolPolicies and
//! DelegationGrants of every namespace (or, where listing across namespaces is
//! forbidden, of the `-n` namespace) through the kubeconfig, and hands each to
//! the same loader as a file (`chaperone_policy::DocumentSet`), named
//! `cluster:<Kind> <namespace>/<name>` in messages; one that the loader
//! refuses is left out with a warning, as the controller leaves it out.
//!
//! `explain --exit-code` exits 2 on deny and 3 on a call held for approval;
//! `test --format json|junit` prints the results for CI.
//!
//! A call may state its tool's current definition hash (`--definition`,
//! `definition:`): the tool server's `toolPinning` then applies as in the
//! sidecar (in `enforce`, a definition that is not the pinned one is denied
//! by `toolPinning`). Without one, pins are not checked.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use chaperone_api::{AgentIdentity, DelegationGrant, ToolPolicy};
use chaperone_policy::model::{RuleAction, ToolPinning};
use chaperone_policy::{
    CompileError, CompileOptions, CurrentDefinition, DOCUMENT_FILE_EXTENSIONS, Decision,
    DecisionRequest, DelegationChain, DelegationLink, DocumentSet, Engine, ObjectKey, Reason,
    ScopeHints, ScopeKind, SessionHistory, Snapshot, ToolPin, Verdict, compile_all,
    parse_documents, redact, resolve_scope, trace_id_of,
};
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cluster::{ClusterArgs, api_error, on_cluster};
use crate::output::{self, unix_now};

/// Arguments of `chaperonectl policy`.
#[derive(clap::Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(clap::Subcommand)]
enum PolicyCommand {
    /// Decide one call and explain every rule.
    Explain(ExplainArgs),
    /// Check the decisions listed in a test file.
    Test(TestArgs),
}

/// Arguments of `chaperonectl policy explain`.
#[derive(clap::Args)]
struct ExplainArgs {
    /// CR YAML files (AgentIdentity, ToolPolicy, DelegationGrant; multi-document).
    #[arg(
        short = 'f',
        long = "file",
        required_unless_present = "from_cluster",
        conflicts_with = "from_cluster"
    )]
    files: Vec<PathBuf>,
    /// Read the AgentIdentities, ToolPolicies and DelegationGrants from the
    /// cluster (kubeconfig, --context, --as) instead of files.
    #[arg(long)]
    from_cluster: bool,
    /// Exit 2 when the call is denied and 3 when it is held for approval
    /// (0 when allowed; 1 stays an error), for scripts.
    #[arg(long)]
    exit_code: bool,
    /// `json` or `yaml`: the decision and every rule's outcome as data.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: ExplainOutput,
    /// The calling agent, `namespace/name` (or `name` when only one
    /// AgentIdentity has that name); may be omitted when the files hold one
    /// AgentIdentity.
    #[arg(long)]
    agent: Option<String>,
    /// The tool server; may be omitted with `--tool server/tool` or when the
    /// agent has one tool server.
    #[arg(long)]
    server: Option<String>,
    /// The tool's name (or `server/tool`).
    #[arg(long)]
    tool: String,
    /// The call's arguments as JSON.
    #[arg(long = "args", default_value = "{}")]
    arguments: String,
    /// Calls made earlier in the session, as JSON:
    /// `[{"server": "orders", "tool": "get_order"}]`.
    #[arg(long, default_value = "[]")]
    session: String,
    /// One delegation hop, origin first: `DELEGATOR:GRANT`, both as
    /// `namespace/name`. Repeat for longer chains.
    #[arg(long = "chain")]
    chain: Vec<String>,
    /// The task's initiator (a user).
    #[arg(long)]
    initiator: Option<String>,
    /// The decision time, unix seconds (default: now).
    #[arg(long)]
    now: Option<i64>,
    /// Decide as if a person had approved exactly this call: a call a
    /// requireApproval rule holds is allowed (a deny still denies).
    #[arg(long)]
    approved: bool,
    /// The tool's current definition hash (`sha256:<hex>`, as the sidecar
    /// reports it): checked against the tool's pin where the server's
    /// `toolPinning` is `enforce`.
    #[arg(long)]
    definition: Option<String>,
}

/// Arguments of `chaperonectl policy test`.
#[derive(clap::Args)]
struct TestArgs {
    /// The test file: a YAML list of calls with expected decisions.
    file: PathBuf,
    /// CR YAML files; default: every other `.yaml`/`.yml`/`.json` file of the
    /// test file's directory that holds Chaperone resources.
    #[arg(short = 'f', long = "file", conflicts_with = "from_cluster")]
    files: Vec<PathBuf>,
    /// Test the AgentIdentities, ToolPolicies and DelegationGrants on the
    /// cluster (kubeconfig, --context, --as) instead of files.
    #[arg(long)]
    from_cluster: bool,
    /// `text` (PASS/FAIL lines), `json`, or `junit` (JUnit XML, for CI).
    #[arg(long, value_enum, default_value = "text")]
    format: TestFormat,
}

/// `policy explain -o`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExplainOutput {
    Text,
    Json,
    Yaml,
}

/// `policy test --format`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TestFormat {
    Text,
    Json,
    Junit,
}

/// Runs `chaperonectl policy`.
pub fn run(args: &PolicyArgs) -> Result<ExitCode> {
    match &args.command {
        PolicyCommand::Explain(explain_args) => {
            let documents = if explain_args.from_cluster {
                load_from_cluster(&args.cluster)?
            } else {
                load(&explain_args.files)?
            };
            let agent = qualified_agent(explain_args.agent.as_deref(), &args.cluster);
            explain(explain_args, documents, agent.as_deref())
        }
        PolicyCommand::Test(test_args) => {
            let documents = if test_args.from_cluster {
                load_from_cluster(&args.cluster)?
            } else if test_args.files.is_empty() {
                load(&cr_files_beside(&test_args.file)?)?
            } else {
                load(&test_args.files)?
            };
            test(test_args, documents).map(|()| ExitCode::SUCCESS)
        }
    }
}

/// A bare agent name qualified with an explicit `-n` (a name alone still
/// means the only AgentIdentity of that name otherwise).
fn qualified_agent(agent: Option<&str>, cluster: &ClusterArgs) -> Option<String> {
    match (agent, &cluster.namespace) {
        (Some(name), Some(namespace)) if !name.contains('/') => Some(format!("{namespace}/{name}")),
        (agent, _) => agent.map(str::to_owned),
    }
}

/// Reads the Chaperone objects on the cluster into one [`DocumentSet`]: every
/// namespace's, or the selected namespace's where listing every namespace is
/// forbidden. An object the loader refuses is left out with a warning.
fn load_from_cluster(cluster: &ClusterArgs) -> Result<DocumentSet> {
    on_cluster(cluster, async |client, namespace| {
        let mut documents = DocumentSet::new();
        let kinds = [
            ApiResource::erase::<AgentIdentity>(&()),
            ApiResource::erase::<ToolPolicy>(&()),
            ApiResource::erase::<DelegationGrant>(&()),
        ];
        let mut scope = None;
        for kind in &kinds {
            for object in list_objects(&client, kind, &namespace, &mut scope).await? {
                let name = format!(
                    "cluster:{} {}/{}",
                    kind.kind,
                    object.namespace().unwrap_or_default(),
                    object.name_any()
                );
                let text = document_of(kind, &object).to_string();
                if let Err(error) = documents.add(&name, &text) {
                    eprintln!("warning: left out: {error}");
                }
            }
        }
        if documents.objects().identities.is_empty() {
            match scope {
                Some(ns) => bail!("no AgentIdentity on the cluster in namespace {ns}"),
                None => bail!("no AgentIdentity on the cluster"),
            }
        }
        Ok(documents)
    })
}

/// The objects of `kind` in every namespace; where that is forbidden (a
/// namespaced RoleBinding only), in `namespace`, which `scope` then records
/// (and warns of once).
async fn list_objects(
    client: &Client,
    kind: &ApiResource,
    namespace: &str,
    scope: &mut Option<String>,
) -> Result<Vec<DynamicObject>> {
    let plural = &kind.plural;
    if scope.is_none() {
        match Api::<DynamicObject>::all_with(client.clone(), kind)
            .list(&ListParams::default())
            .await
        {
            Ok(list) => return Ok(list.items),
            Err(kube::Error::Api(status)) if status.code == 403 => {
                eprintln!(
                    "warning: reading namespace {namespace} only: listing {plural} in every namespace is forbidden ({})",
                    status.message
                );
                *scope = Some(namespace.to_owned());
            }
            Err(err) => return Err(api_error(err, &format!("listing {plural}"))),
        }
    }
    Api::<DynamicObject>::namespaced_with(client.clone(), namespace, kind)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|err| api_error(err, &format!("listing {plural} in {namespace}")))
}

/// A cluster object as the loader reads a file's: its kind, apiVersion,
/// identifying metadata and spec (not its status or server-set fields).
fn document_of(kind: &ApiResource, object: &DynamicObject) -> Value {
    let meta = object.meta();
    json!({
        "apiVersion": kind.api_version,
        "kind": kind.kind,
        "metadata": {
            "name": object.name_any(),
            "namespace": object.namespace(),
            "labels": meta.labels.clone().unwrap_or_default(),
            "generation": meta.generation,
            "creationTimestamp": meta.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        },
        "spec": object.data.get("spec").cloned().unwrap_or(Value::Null),
    })
}

/// Reads the CR files into one [`DocumentSet`] (its rules: foreign kinds
/// skipped, apiVersion checked, each object once).
fn load(files: &[PathBuf]) -> Result<DocumentSet> {
    let mut documents = DocumentSet::new();
    for path in files {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        documents.add(&path.display().to_string(), &text)?;
    }
    if documents.objects().identities.is_empty() {
        bail!("no AgentIdentity in {}", display_paths(files));
    }
    Ok(documents)
}

fn display_paths(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_error(loaded: &DocumentSet, error: &CompileError) -> String {
    match loaded.file_of(&error.object) {
        Some(file) => format!("{file}: {error}"),
        None => error.to_string(),
    }
}

/// The files' objects, their compiled engines by agent, and the compile errors
/// (located).
struct CompiledFiles {
    documents: DocumentSet,
    engines: BTreeMap<ObjectKey, (Snapshot, Engine)>,
    errors: Vec<String>,
}

fn compile_files(documents: DocumentSet, now: i64) -> Result<CompiledFiles> {
    let compiled = compile_all(&documents.inventory(), &CompileOptions { version: 1, now });
    let mut engines = BTreeMap::new();
    for snapshot in compiled.snapshots {
        let engine = Engine::new(&snapshot)
            .map_err(|e| anyhow!("snapshot of {} is invalid: {e}", snapshot.content.agent))?;
        engines.insert(snapshot.content.agent.clone(), (snapshot, engine));
    }
    let errors = compiled
        .errors
        .iter()
        .map(|e| describe_error(&documents, e))
        .collect();
    Ok(CompiledFiles {
        documents,
        engines,
        errors,
    })
}

/// The engine of `agent` (`namespace/name`, or a name only one AgentIdentity
/// has; may be omitted when the files hold one).
fn pick_agent<'a>(
    compiled: &'a CompiledFiles,
    agent: Option<&str>,
) -> Result<(&'a Snapshot, &'a Engine)> {
    let identity = compiled.documents.agent(agent)?;
    let key = ObjectKey::new(
        identity.metadata.namespace_or_default(),
        identity.metadata.name.clone(),
    );
    compiled
        .engines
        .get(&key)
        .map(|(s, e)| (s, e))
        .ok_or_else(|| anyhow!("AgentIdentity {key} did not compile"))
}

/// Splits `server/tool` or fills the server in from the agent's only server.
fn resolve_server(
    snapshot: &Snapshot,
    server: Option<&str>,
    tool: &str,
) -> Result<(String, String)> {
    if let Some(server) = server {
        return Ok((server.to_owned(), tool.to_owned()));
    }
    if let Some((server, name)) = tool.split_once('/')
        && snapshot
            .content
            .tool_servers
            .iter()
            .any(|s| s.name == server)
    {
        return Ok((server.to_owned(), name.to_owned()));
    }
    match snapshot.content.tool_servers.as_slice() {
        [only] => Ok((only.name.clone(), tool.to_owned())),
        _ => bail!("name the tool server (server) or give the tool as server/tool"),
    }
}

/// One earlier call of the session.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SessionStep {
    server: String,
    tool: String,
    /// The trace it was made in (a `traceparent` or any label), if any.
    #[serde(default)]
    trace: Option<String>,
    /// The MCP session it was made in, if any.
    #[serde(default)]
    mcp_session: Option<String>,
}

impl SessionStep {
    fn hints(&self) -> ScopeHints<'_> {
        scope_hints(self.trace.as_deref(), self.mcp_session.as_deref())
    }
}

/// The scope hints of a call made in `trace` and `mcp_session` (a valid
/// `traceparent` stands for its trace id, anything else for itself).
fn scope_hints<'a>(trace: Option<&'a str>, mcp_session: Option<&'a str>) -> ScopeHints<'a> {
    ScopeHints {
        task: None,
        trace: trace.map(|t| trace_id_of(t).unwrap_or(t)),
        mcp_session,
    }
}

/// One hop of a delegation chain.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainHop {
    delegator: String,
    grant: String,
}

fn history(engine: &Engine, steps: &[SessionStep]) -> SessionHistory {
    history_of(engine, steps.iter())
}

fn history_of<'a>(engine: &Engine, steps: impl Iterator<Item = &'a SessionStep>) -> SessionHistory {
    let mut history = SessionHistory::new();
    for step in steps {
        history.record(
            &step.server,
            &step.tool,
            engine.effects_of(&step.server, &step.tool),
        );
    }
    history
}

fn delegation_chain(hops: &[ChainHop]) -> DelegationChain {
    DelegationChain {
        links: hops
            .iter()
            .map(|hop| DelegationLink {
                delegator: ObjectKey::parse(&hop.delegator, "default"),
                grant: ObjectKey::parse(&hop.grant, "default"),
            })
            .collect(),
    }
}

/// What a call states of its tool's current definition: a well-formed hash
/// is checked against the pins; none leaves them unchecked.
fn current_definition(definition: Option<&str>) -> Result<CurrentDefinition<'_>> {
    match definition {
        None => Ok(CurrentDefinition::NotApplicable),
        Some(hash) if is_sha256(hash) => Ok(CurrentDefinition::Hash(hash)),
        Some(other) => bail!("definition {other:?} is not sha256: and 64 lowercase hex digits"),
    }
}

fn is_sha256(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn explain(args: &ExplainArgs, documents: DocumentSet, agent: Option<&str>) -> Result<ExitCode> {
    let now = args.now.unwrap_or_else(unix_now);
    let compiled = compile_files(documents, now)?;
    for error in &compiled.errors {
        eprintln!("warning: left out: {error}");
    }
    let (snapshot, engine) = pick_agent(&compiled, agent)?;
    let (server, tool) = resolve_server(snapshot, args.server.as_deref(), &args.tool)?;
    let arguments: Value =
        serde_json::from_str(&args.arguments).context("--args is not valid JSON")?;
    let steps: Vec<SessionStep> = serde_json::from_str(&args.session)
        .context("--session is not a JSON list of {\"server\", \"tool\"}")?;
    let hops = args
        .chain
        .iter()
        .map(|hop| {
            hop.split_once(':')
                .map(|(delegator, grant)| ChainHop {
                    delegator: delegator.to_owned(),
                    grant: grant.to_owned(),
                })
                .ok_or_else(|| anyhow!("--chain {hop:?} is not DELEGATOR:GRANT"))
        })
        .collect::<Result<Vec<_>>>()?;
    let session = history(engine, &steps);
    let chain = delegation_chain(&hops);
    let definition = current_definition(args.definition.as_deref())?;
    let request = DecisionRequest {
        server: &server,
        tool: &tool,
        arguments: &arguments,
        session: &session,
        delegation: (!chain.links.is_empty()).then_some(&chain),
        initiator: args.initiator.as_deref(),
        now,
        approved: args.approved,
        definition,
    };
    let explanation = engine.explain(&request);
    let decision = &explanation.decision;
    let code = if !args.exit_code {
        ExitCode::SUCCESS
    } else {
        match decision.verdict {
            Verdict::Deny => ExitCode::from(2),
            Verdict::RequireApproval => ExitCode::from(3),
            _ => ExitCode::SUCCESS,
        }
    };
    if args.output != ExplainOutput::Text {
        let rules: Vec<Value> = explanation
            .rules
            .iter()
            .map(|rule| {
                json!({
                    "action": action_name(rule.action),
                    "rule": rule.rule,
                    "outcome": rule.outcome.to_string(),
                })
            })
            .collect();
        let data = json!({
            "decision": decision.verdict.to_string(),
            "dryRun": decision.would_deny() || decision.would_require_approval(),
            "rule": decision.rule.to_string(),
            "reason": decision.reason.to_string(),
            "agent": engine.agent().to_string(),
            "snapshotVersion": decision.snapshot_version,
            "snapshotHash": snapshot.hash,
            "call": {"server": server, "tool": tool, "arguments": arguments},
            "effects": explanation.effects.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
            "rules": rules,
        });
        let format = match args.output {
            ExplainOutput::Yaml => output::Format::Yaml,
            _ => output::Format::Json,
        };
        output::print(format, &data, String::new)?;
        return Ok(code);
    }
    println!("decision:   {}", verdict_line(decision));
    println!("rule:       {}", decision.rule);
    println!("reason:     {}", decision.reason);
    println!(
        "agent:      {} (snapshot {}, sha256 {})",
        engine.agent(),
        decision.snapshot_version,
        &snapshot.hash[..12]
    );
    println!("call:       {server}/{tool} {arguments}");
    let effects: Vec<&str> = explanation.effects.iter().map(|e| e.as_str()).collect();
    println!("effects:    [{}]", effects.join(", "));
    let pinning = engine.tool_pinning(&server);
    if pinning != ToolPinning::Off {
        let pin = match engine.tool_pin(&server, &tool) {
            ToolPin::Unpinned => "not pinned".to_owned(),
            ToolPin::Pinned(hash) => format!("pinned {hash}"),
            ToolPin::Conflicting(hashes) => format!("conflicting pins {}", hashes.join(", ")),
        };
        let verdict = match definition {
            CurrentDefinition::Hash(current) => engine
                .pin_verdict(&server, &tool, Some(current))
                .to_string(),
            _ => "not checked (give --definition)".to_owned(),
        };
        let mode = match pinning {
            ToolPinning::Enforce => "enforce",
            ToolPinning::Observe | ToolPinning::Off => "observe",
        };
        println!("pinning:    {mode}, {pin}: {verdict}");
    }
    if let Some(limit) = &decision.rate_limit {
        println!(
            "rate limit: {} calls per {}s per {:?} ({})",
            limit.calls, limit.period_seconds, limit.per, limit.id
        );
    }
    match &decision.approval {
        Some(approval) if decision.verdict == Verdict::RequireApproval => {
            println!(
                "approval:   asked by rule {} of ToolPolicy {}: approvers need the approve verb on it",
                approval.rule, approval.policy
            );
            println!(
                "            decide within {}s; an approval is usable once, within {}s",
                approval.timeout_seconds, approval.valid_for_seconds
            );
            let shown = redact(&arguments, &approval.redact_arguments);
            println!("            the approver sees: {shown}");
        }
        Some(approval) => println!(
            "approval:   approved under rule {} of ToolPolicy {}",
            approval.rule, approval.policy
        ),
        None => {}
    }
    println!("rules:");
    let width = explanation
        .rules
        .iter()
        .map(|r| r.rule.len())
        .max()
        .unwrap_or(0);
    for rule in &explanation.rules {
        let action = action_name(rule.action);
        println!("  {action:<8} {:width$}  {}", rule.rule, rule.outcome);
    }
    Ok(code)
}

fn action_name(action: RuleAction) -> &'static str {
    match action {
        RuleAction::Allow => "allow",
        RuleAction::Deny => "deny",
        RuleAction::RequireApproval => "approval",
    }
}

/// The verdict as `explain` prints it: dry run says what is forwarded anyway.
fn verdict_line(decision: &Decision) -> String {
    if decision.would_deny() {
        "deny (dry run: would-deny, forwarded)".to_owned()
    } else if decision.would_require_approval() {
        "approval (dry run: would require approval, forwarded without asking)".to_owned()
    } else if decision.verdict == Verdict::RequireApproval {
        "approval (held until a person approves this exact call)".to_owned()
    } else if decision.reason == Reason::Approved {
        "allow (a person approved this call)".to_owned()
    } else {
        decision.verdict.to_string()
    }
}

/// One test case of a `policy test` file.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyTestCase {
    /// What the case checks.
    name: String,
    /// The calling agent, `namespace/name` or a name only one AgentIdentity
    /// has (optional with one agent).
    #[serde(default)]
    agent: Option<String>,
    /// The tool server (optional: `tool: server/tool`, or the agent's only one).
    #[serde(default)]
    server: Option<String>,
    /// The tool.
    tool: String,
    /// The call's arguments.
    #[serde(default)]
    arguments: Option<Value>,
    /// Earlier calls of the agent, each optionally in a `trace` or
    /// `mcpSession`: the ones in the same session scope as this call (by the
    /// agent's `session.scope`) make its history.
    #[serde(default)]
    session: Vec<SessionStep>,
    /// The trace this call is made in (a `traceparent` or any label).
    #[serde(default)]
    trace: Option<String>,
    /// The MCP session this call is made in.
    #[serde(default)]
    mcp_session: Option<String>,
    /// The expected session scope: `task`, `trace`, `mcpSession` or `agent`.
    #[serde(default)]
    scope: Option<String>,
    /// The delegation chain, origin first.
    #[serde(default)]
    delegation: Vec<ChainHop>,
    /// The task's initiator.
    #[serde(default)]
    initiator: Option<String>,
    /// Decision time, unix seconds (default: now).
    #[serde(default)]
    now: Option<i64>,
    /// A person approved exactly this call: a call a requireApproval rule
    /// holds is allowed (a deny still denies).
    #[serde(default)]
    approved: bool,
    /// The tool's current definition hash (`sha256:<hex>`): checked against
    /// its pin where the server's `toolPinning` is `enforce` (a mismatch is
    /// denied by `toolPinning`). Without it, pins are not checked.
    #[serde(default)]
    definition: Option<String>,
    /// `allow`, `deny` or `approval` (a requireApproval rule holds the call).
    expect: Verdict,
    /// The expected deciding rule (`policy/rule` or a fixed reason).
    #[serde(default)]
    rule: Option<String>,
}

fn cr_files_beside(test_file: &Path) -> Result<Vec<PathBuf>> {
    let dir = match test_file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let is_cr_file = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| DOCUMENT_FILE_EXTENSIONS.contains(&e));
        let same = fs::canonicalize(&path).ok() == fs::canonicalize(test_file).ok();
        if is_cr_file && !same && holds_chaperone_documents(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Whether `path` is a CR file with at least one Chaperone document (a file
/// that cannot be read or is refused counts as none).
fn holds_chaperone_documents(path: &Path) -> bool {
    fs::read_to_string(path).is_ok_and(|text| {
        parse_documents(&path.display().to_string(), &text).is_ok_and(|d| !d.is_empty())
    })
}

fn test(args: &TestArgs, documents: DocumentSet) -> Result<()> {
    let text = fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let cases: Vec<PolicyTestCase> = serde_saphyr::from_str(&text)
        .with_context(|| format!("{}: not a YAML list of test cases", args.file.display()))?;
    let now = unix_now();
    let compiled = compile_files(documents, now)?;
    let file = args.file.display().to_string();
    let results: Vec<CaseResult> = cases
        .iter()
        .enumerate()
        .map(|(index, case)| {
            let failure = match run_case(&compiled, case, now) {
                Ok(None) => None,
                Ok(Some(mismatch)) => Some(mismatch),
                Err(error) => Some(format!("{error:#}")),
            };
            CaseResult {
                name: case.name.clone(),
                index: index + 1,
                passed: failure.is_none(),
                failure,
            }
        })
        .collect();
    let failures = results.iter().filter(|r| !r.passed).count();
    let report = TestReport {
        file: file.clone(),
        passed: results.len() - failures,
        failed: failures,
        object_errors: compiled.errors.clone(),
        cases: results,
    };
    match args.format {
        TestFormat::Text => {
            for error in &report.object_errors {
                eprintln!("error: {error}");
            }
            for case in &report.cases {
                match &case.failure {
                    None => println!("PASS {}", case.name),
                    Some(why) => {
                        println!("FAIL {}", case.name);
                        eprintln!("{file}: test {:?} (#{}): {why}", case.name, case.index);
                    }
                }
            }
            println!("{} passed, {failures} failed", report.passed);
        }
        TestFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        TestFormat::Junit => print!("{}", junit(&report)),
    }
    match (failures, report.object_errors.len()) {
        (0, 0) => Ok(()),
        (0, broken) => bail!("{broken} object error(s) in the policies under test"),
        (failed, _) => bail!("{failed} of {} test(s) failed", cases.len()),
    }
}

/// The outcome of one test case.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CaseResult {
    name: String,
    /// Its position in the file, from 1.
    index: usize,
    passed: bool,
    /// Why it failed: the mismatch or the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
}

/// What `policy test --format json` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TestReport {
    file: String,
    passed: usize,
    failed: usize,
    /// Objects that did not compile (each fails the run).
    object_errors: Vec<String>,
    cases: Vec<CaseResult>,
}

/// The report as JUnit XML: one testsuite named after the test file, one
/// testcase per case, and one erroring testcase `policies compile` when an
/// object did not compile.
fn junit(report: &TestReport) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let errors = usize::from(!report.object_errors.is_empty());
    out.push_str(&format!(
        "<testsuites tests=\"{}\" failures=\"{}\" errors=\"{errors}\">\n",
        report.cases.len() + errors,
        report.failed
    ));
    out.push_str(&format!(
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{errors}\">\n",
        xml_escape(&report.file),
        report.cases.len() + errors,
        report.failed
    ));
    if errors > 0 {
        let text = report.object_errors.join("\n");
        out.push_str(&format!(
            "    <testcase name=\"policies compile\" classname=\"{}\">\n      <error message=\"{} object error(s)\">{}</error>\n    </testcase>\n",
            xml_escape(&report.file),
            report.object_errors.len(),
            xml_escape(&text)
        ));
    }
    for case in &report.cases {
        let open = format!(
            "    <testcase name=\"{}\" classname=\"{}\"",
            xml_escape(&case.name),
            xml_escape(&report.file)
        );
        match &case.failure {
            None => out.push_str(&format!("{open}/>\n")),
            Some(why) => out.push_str(&format!(
                "{open}>\n      <failure message=\"{}\"/>\n    </testcase>\n",
                xml_escape(why)
            )),
        }
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

/// `text` for an XML attribute or element.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            c if c.is_control() => out.push_str(&format!("&#{};", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// `Ok(None)` when the decision is as expected; `Ok(Some(why))` when not.
fn run_case(compiled: &CompiledFiles, case: &PolicyTestCase, now: i64) -> Result<Option<String>> {
    let (snapshot, engine) = pick_agent(compiled, case.agent.as_deref())?;
    let (server, tool) = resolve_server(snapshot, case.server.as_deref(), &case.tool)?;
    let empty = Value::Object(serde_json::Map::new());
    let arguments = case.arguments.as_ref().unwrap_or(&empty);
    let chain = delegation_chain(&case.delegation);
    // A delegated call is made in its task, which every step of the case
    // belongs to; otherwise the steps in the call's own scope count.
    let mode = snapshot.content.session.scope;
    let (kind, key) = if chain.links.is_empty() {
        resolve_scope(
            mode,
            scope_hints(case.trace.as_deref(), case.mcp_session.as_deref()),
        )
    } else {
        (ScopeKind::Task, "")
    };
    if let Some(expected) = &case.scope
        && expected != kind.as_str()
    {
        return Ok(Some(format!(
            "expected session scope {expected}, got {}{}",
            kind.as_str(),
            if key.is_empty() {
                String::new()
            } else {
                format!(" {key:?}")
            }
        )));
    }
    let session = history_of(
        engine,
        case.session.iter().filter(|step| {
            kind == ScopeKind::Task || resolve_scope(mode, step.hints()) == (kind, key)
        }),
    );
    let request = DecisionRequest {
        server: &server,
        tool: &tool,
        arguments,
        session: &session,
        delegation: (!chain.links.is_empty()).then_some(&chain),
        initiator: case.initiator.as_deref(),
        now: case.now.unwrap_or(now),
        approved: case.approved,
        definition: current_definition(case.definition.as_deref())?,
    };
    let decision = engine.decide(&request);
    let rule_matches = case
        .rule
        .as_deref()
        .is_none_or(|expected| expected == decision.rule.as_str());
    if decision.verdict == case.expect && rule_matches {
        return Ok(None);
    }
    let expected = match &case.rule {
        Some(rule) => format!("{} by {rule}", case.expect),
        None => case.expect.to_string(),
    };
    Ok(Some(format!(
        "expected {expected}, got {} by {} ({})",
        decision.verdict, decision.rule, decision.reason
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `policy test` on files, as `run` does without --from-cluster.
    fn run_test(args: &TestArgs) -> Result<()> {
        let files = if args.files.is_empty() {
            cr_files_beside(&args.file)?
        } else {
            args.files.clone()
        };
        test(args, load(&files)?)
    }

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/basic")
            .join(name)
    }

    #[test]
    fn basic_example_tests_pass() {
        let args = TestArgs {
            file: example("policy-test.yaml"),
            files: Vec::new(),
            from_cluster: false,
            format: TestFormat::Text,
        };
        run_test(&args).expect("examples/basic/policy-test.yaml passes");
    }

    #[test]
    fn wrong_expectation_fails() {
        let dir = std::env::temp_dir().join(format!("chaperonectl-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("wrong.yaml");
        fs::write(
            &file,
            "- {name: wrong, tool: orders/get_order, expect: deny}\n",
        )
        .unwrap();
        let args = TestArgs {
            file,
            files: vec![example("agentidentity.yaml"), example("toolpolicy.yaml")],
            from_cluster: false,
            format: TestFormat::Text,
        };
        let error = run_test(&args).unwrap_err();
        assert_eq!(error.to_string(), "1 of 1 test(s) failed");
        fs::remove_dir_all(&dir).ok();
    }

    /// A clerk whose refunds above 100 need approval, and never for a blocked
    /// customer.
    const APPROVAL_POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {name: clerk}
spec:
  selector: {serviceAccountName: clerk}
  toolServers: [{name: orders, url: "http://orders"}]
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: refunds}
spec:
  targetRefs: [{name: clerk}]
  rules:
    - name: allow-refunds
      action: allow
      tools: [{server: orders, name: refund}]
    - name: approve-large-refunds
      action: requireApproval
      tools: [{server: orders, name: refund}]
      when:
        args: [{pointer: /amount, greaterThan: 100}]
      approval: {redactArguments: [/iban]}
    - name: deny-blocked
      action: deny
      tools: [{server: orders, name: refund}]
      when:
        args: [{pointer: /customer, exists: true}, {pointer: /customer, equals: blocked}]
"#;

    /// Writes the approval policy and `cases` into a fresh directory; the
    /// test file's path.
    fn approval_fixture(name: &str, cases: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "chaperonectl-approval-{name}-{}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("policy.yaml"), APPROVAL_POLICY).unwrap();
        let file = dir.join("cases.test");
        fs::write(&file, cases).unwrap();
        file
    }

    fn run_cases(file: PathBuf) -> Result<()> {
        let dir = file.parent().unwrap().to_path_buf();
        let result = run_test(&TestArgs {
            files: vec![dir.join("policy.yaml")],
            file,
            from_cluster: false,
            format: TestFormat::Text,
        });
        fs::remove_dir_all(&dir).ok();
        result
    }

    #[test]
    fn cases_expect_approval_and_approved_calls_are_allowed() {
        let file = approval_fixture(
            "pass",
            r#"
- name: a large refund waits for a person
  tool: refund
  arguments: {amount: 500, iban: DE89}
  expect: approval
  rule: refunds/approve-large-refunds
- name: once approved it is allowed by the approval rule
  tool: refund
  arguments: {amount: 500}
  approved: true
  expect: allow
  rule: refunds/approve-large-refunds
- name: a small refund needs nobody
  tool: refund
  arguments: {amount: 50}
  expect: allow
  rule: refunds/allow-refunds
- name: an approval does not lift a deny
  tool: refund
  arguments: {amount: 500, customer: blocked}
  approved: true
  expect: deny
  rule: refunds/deny-blocked
"#,
        );
        run_cases(file).expect("every approval case passes");
    }

    #[test]
    fn expecting_approval_of_a_call_that_needs_none_fails() {
        let file = approval_fixture(
            "fail",
            r#"
- name: wrong
  tool: refund
  arguments: {amount: 50}
  expect: approval
"#,
        );
        let error = run_cases(file).unwrap_err();
        assert_eq!(error.to_string(), "1 of 1 test(s) failed");
    }

    /// What `run_case` says of the first case of `file` (beside its
    /// `policy.yaml`); removes the fixture's folder.
    fn first_case_mismatch(file: &std::path::Path) -> Option<String> {
        let dir = file.parent().unwrap().to_path_buf();
        let documents = load(&[dir.join("policy.yaml")]).unwrap();
        let compiled = compile_files(documents, unix_now()).unwrap();
        let text = fs::read_to_string(file).unwrap();
        let cases: Vec<PolicyTestCase> = serde_saphyr::from_str(&text).unwrap();
        let mismatch = run_case(&compiled, &cases[0], unix_now()).unwrap();
        fs::remove_dir_all(&dir).ok();
        mismatch
    }

    #[test]
    fn run_case_reports_the_approval_verdict() {
        let file = approval_fixture(
            "mismatch",
            "- {name: m, tool: refund, arguments: {amount: 500}, expect: allow}\n",
        );
        let mismatch = first_case_mismatch(&file);
        assert_eq!(
            mismatch.as_deref(),
            Some(
                "expected allow, got approval by refunds/approve-large-refunds (a requireApproval rule matched: a person must approve this call)"
            )
        );
    }

    const PINNED: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const CHANGED: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    /// A clerk whose `orders` server enforces pins (`search` only observes);
    /// `refund` is pinned.
    const PINNING_POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {name: clerk}
spec:
  selector: {serviceAccountName: clerk}
  toolServers:
    - {name: orders, url: "http://orders", toolPinning: enforce}
    - {name: search, url: "http://search"}
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: orders}
spec:
  targetRefs: [{name: clerk}]
  tools:
    - {server: orders, name: refund, definition: "PINNED"}
    - {server: search, name: find, definition: "PINNED"}
  rules:
    - name: allow-all
      action: allow
      tools: [{server: "*", name: "*"}]
"#;

    /// Writes the pinning policy and `cases` into a fresh directory; the
    /// test file's path.
    fn pinning_fixture(name: &str, cases: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "chaperonectl-pinning-{name}-{}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("policy.yaml"),
            PINNING_POLICY.replace("PINNED", PINNED),
        )
        .unwrap();
        let file = dir.join("cases.test");
        fs::write(
            &file,
            cases.replace("PINNED", PINNED).replace("CHANGED", CHANGED),
        )
        .unwrap();
        file
    }

    #[test]
    fn cases_state_a_definition_and_the_servers_pinning_applies() {
        let file = pinning_fixture(
            "pass",
            r#"
- name: the pinned definition passes
  tool: orders/refund
  definition: PINNED
  expect: allow
  rule: orders/allow-all
- name: a changed definition is blocked in enforce
  tool: orders/refund
  definition: CHANGED
  expect: deny
  rule: toolPinning
- name: an unpinned tool is blocked in enforce
  tool: orders/lookup
  definition: CHANGED
  expect: deny
  rule: toolPinning
- name: observe lets a changed definition through
  tool: search/find
  definition: CHANGED
  expect: allow
- name: without a definition pins are not checked
  tool: orders/refund
  expect: allow
"#,
        );
        run_cases(file).expect("every pinning case passes");
    }

    #[test]
    fn run_case_reports_the_pinning_refusal() {
        let file = pinning_fixture(
            "mismatch",
            "- {name: m, tool: orders/refund, definition: CHANGED, expect: allow}\n",
        );
        let mismatch = first_case_mismatch(&file);
        assert_eq!(
            mismatch,
            Some(format!(
                "expected allow, got deny by toolPinning (tool definition changed: pinned {PINNED}, now {CHANGED})"
            ))
        );
    }

    #[test]
    fn a_malformed_definition_fails_its_case() {
        let file = pinning_fixture(
            "malformed",
            "- {name: m, tool: orders/refund, definition: sha256:ABC, expect: allow}\n",
        );
        let error = run_cases(file).unwrap_err();
        assert_eq!(error.to_string(), "1 of 1 test(s) failed");
    }

    #[test]
    fn verdict_line_says_what_an_approval_does() {
        let compiled = {
            let mut documents = DocumentSet::new();
            documents.add("policy.yaml", APPROVAL_POLICY).unwrap();
            compile_files(documents, unix_now()).unwrap()
        };
        let (_, engine) = pick_agent(&compiled, None).unwrap();
        let session = SessionHistory::new();
        let arguments = serde_json::json!({"amount": 500});
        let mut request = DecisionRequest {
            server: "orders",
            tool: "refund",
            arguments: &arguments,
            session: &session,
            delegation: None,
            initiator: None,
            now: unix_now(),
            approved: false,
            definition: Default::default(),
        };
        let held = engine.decide(&request);
        assert!(
            verdict_line(&held).starts_with("approval (held"),
            "{held:?}"
        );
        request.approved = true;
        let approved = engine.decide(&request);
        assert_eq!(
            verdict_line(&approved),
            "allow (a person approved this call)"
        );
    }

    #[test]
    fn junit_names_each_case_and_escapes_the_failure() {
        let report = TestReport {
            file: "cases.yaml".into(),
            passed: 1,
            failed: 1,
            object_errors: vec!["policy.yaml: ToolPolicy a/b: rule <x> is invalid".into()],
            cases: vec![
                CaseResult {
                    name: "allowed".into(),
                    index: 1,
                    passed: true,
                    failure: None,
                },
                CaseResult {
                    name: "refund \"large\"".into(),
                    index: 2,
                    passed: false,
                    failure: Some("expected deny, got allow by a/<b> & c".into()),
                },
            ],
        };
        let xml = junit(&report);
        assert!(
            xml.contains(r#"<testsuite name="cases.yaml" tests="3" failures="1" errors="1">"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<testcase name="allowed" classname="cases.yaml"/>"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<testcase name="refund &quot;large&quot;" classname="cases.yaml">"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<failure message="expected deny, got allow by a/&lt;b&gt; &amp; c"/>"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<error message="1 object error(s)">policy.yaml: ToolPolicy a/b: rule &lt;x&gt; is invalid</error>"#),
            "{xml}"
        );
    }

    #[test]
    fn an_explicit_namespace_qualifies_a_bare_agent_name() {
        let cluster = ClusterArgs {
            kubeconfig: None,
            context: None,
            namespace: Some("shop".into()),
            as_user: None,
            as_group: Vec::new(),
        };
        assert_eq!(
            qualified_agent(Some("clerk"), &cluster).as_deref(),
            Some("shop/clerk")
        );
        assert_eq!(
            qualified_agent(Some("ops/clerk"), &cluster).as_deref(),
            Some("ops/clerk")
        );
        assert_eq!(qualified_agent(None, &cluster), None);
    }
}
