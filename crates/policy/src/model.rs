//! The policy model: the `spec` of Chaperone's three custom resources as plain data.
//!
//! These types are what users write (`kubectl apply`) and what the compiler reads.
//! They live here, free of kube, so that the sidecar and the CLI can read CR YAML
//! without compiling a Kubernetes client; `chaperone-api` wraps them into CRDs.
//! Every `///` line becomes `kubectl explain` text, and every
//! `x-kubernetes-validations` rule is checked by the API server on admission.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

/// Upper bound of list lengths; keeps the API server's CEL cost estimate bounded.
pub const MAX_LIST_ITEMS: usize = 256;
/// Default lifetime of a per-call identity assertion.
pub const DEFAULT_ASSERTION_LIFETIME_SECONDS: u32 = 60;
/// Longest allowed lifetime of a per-call identity assertion (5 minutes).
pub const MAX_ASSERTION_LIFETIME_SECONDS: u32 = 300;
/// Default idle timeout of a session.
pub const DEFAULT_SESSION_IDLE_TIMEOUT_SECONDS: u32 = 900;
/// Default number of calls a session may make.
pub const DEFAULT_SESSION_MAX_CALLS: u32 = 1000;
/// Deepest delegation chain a grant may allow beyond its delegate.
pub const MAX_DELEGATION_DEPTH: u32 = 8;

// ---------------------------------------------------------------------------
// AgentIdentity
// ---------------------------------------------------------------------------

/// Who an agent is, which tool servers it reaches through its sidecar, and how its
/// sessions and assertions behave.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentitySpec {
    /// The pods that are this agent.
    pub selector: AgentSelector,

    /// Upstream MCP servers this agent reaches through its sidecar at
    /// `http://127.0.0.1:15001/<name>`. Names are unique (a list map keyed
    /// by name: server-side apply merges entries by name).
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tool_servers: Vec<ToolServer>,

    /// Per-call identity assertions minted by the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion: Option<AssertionSettings>,

    /// Session limits enforced by the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionSettings>,

    /// `enforce` (default) blocks denied calls; `dryRun` decides and audits every
    /// call as it would, but forwards denied calls (audited as would-deny).
    #[serde(default)]
    pub mode: EnforcementMode,

    /// How this agent takes part in delegation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<DelegationSettings>,

    /// Trusted issuers of initiator (end-user) tokens. A request at this agent's
    /// inbound side carrying a bearer token of one of them names the user who
    /// initiated the task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub initiators: Vec<InitiatorIssuer>,

    /// JSON-RPC methods the sidecar forwards ungoverned besides the MCP methods
    /// it knows (for a tool server's own extension methods). Every other
    /// unknown method is refused. Methods the sidecar governs (`tools/call`,
    /// the list methods, `resources/read`, `prompts/get`, …) cannot be listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 128)))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(m, !(m in ['tools/call', 'tools/list', 'resources/read', 'resources/list', 'resources/templates/list', 'resources/subscribe', 'resources/unsubscribe', 'prompts/get', 'prompts/list']))",
        "message": "passthroughMethods cannot list a method the sidecar governs (tools/call, the list methods, resources/read|subscribe|unsubscribe, prompts/get)"
    }]))]
    pub passthrough_methods: Vec<String>,

    /// Seconds the sidecar keeps enforcing its last policy snapshot while it
    /// cannot reach the controller: 5 to 86400. After that it withdraws the
    /// snapshot and refuses every call (503, not ready) until it is connected
    /// again, so a deleted grant or a tightened policy reaches a sidecar cut
    /// off from the controller at the latest then. Counted from when the
    /// sidecar notices the loss: at once when the connection ends, within 30 s
    /// when the network drops it silently (HTTP/2 keepalive). Unset (default):
    /// the last snapshot stays in force until the controller is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 86400))]
    pub max_disconnected_seconds: Option<u32>,
}

/// Selects the pods of an agent: by ServiceAccount, optionally narrowed by labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSelector {
    /// Name of the ServiceAccount the agent's pods run as (same namespace).
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: String,

    /// Labels the agent's pods must also carry (all of them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl AgentSelector {
    /// Whether this selector selects a pod running as `service_account` with
    /// `labels` (same namespace assumed): the ServiceAccount matches and the
    /// pod carries every label of `matchLabels`.
    pub fn selects(&self, service_account: &str, labels: &BTreeMap<String, String>) -> bool {
        self.service_account_name == service_account
            && self
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// An upstream MCP server reachable through the sidecar.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.url.startsWith('http://') || self.url.startsWith('https://')",
    "message": "url must start with http:// or https:// (MCP Streamable HTTP endpoint)"
}]))]
pub struct ToolServer {
    /// Name of the server: the first path segment at the sidecar and the `server`
    /// that rules refer to. A DNS label (lowercase letters, digits, '-').
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// The server's MCP endpoint URL (http or https), e.g.
    /// `http://billing.tools.svc:8080/mcp`.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,

    /// Audience (`aud`) of the assertions sent to this server; defaults to the
    /// agent's identity when `agent` is set, else to `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub audience: Option<String>,

    /// When this server is another agent's endpoint (its sidecar's inbound
    /// side), that AgentIdentity's name (same namespace). Calls to it delegate:
    /// the callee's sidecar verifies the assertion (addressed to
    /// `chaperone:agent:<namespace>/<agent>`) and needs a DelegationGrant from
    /// this agent to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub agent: Option<String>,

    /// What the sidecar does when a tool's definition (description, schemas,
    /// annotations) differs from its pin in the ToolPolicies: `off`,
    /// `observe` (default: report the change, calls proceed) or `enforce`
    /// (hide the tool and refuse its calls until the new definition is pinned;
    /// a governed tool with no pin is blocked too).
    #[serde(default, skip_serializing_if = "ToolPinning::is_observe")]
    pub tool_pinning: ToolPinning,

    /// A Secret in the agent's namespace that the injection webhook mounts
    /// into the sidecar only (never the agent's containers) for this server.
    /// Key `ca.crt`: PEM certificates trusted for this server's host alone
    /// (a private CA), besides the system's. Key `authorization`: the
    /// `Authorization` header value the sidecar sends to this server in place
    /// of any the agent sent (the agent never holds the credential). Either
    /// key may be absent, not both. Pods created before it was set have no
    /// mount: calls to the server are refused until they are recreated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub upstream_secret: Option<String>,
}

/// How a tool server's tool definitions are held to their pins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ToolPinning {
    /// Definitions are neither compared nor reported.
    Off,
    /// Changes are reported (status, Event, metric); calls proceed.
    #[default]
    Observe,
    /// A governed tool whose definition differs from its pin (or has none) is
    /// hidden from lists and its calls are refused.
    Enforce,
}

impl ToolPinning {
    /// Whether this is the default, `observe`.
    pub fn is_observe(&self) -> bool {
        *self == ToolPinning::Observe
    }
}

/// Settings of the signed assertions the sidecar sends with each allowed call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssertionSettings {
    /// Lifetime of each assertion in seconds: 1 to 300, default 60.
    #[serde(default = "default_assertion_lifetime")]
    #[schemars(range(min = 1, max = 300))]
    pub lifetime_seconds: u32,
}

impl Default for AssertionSettings {
    fn default() -> Self {
        Self {
            lifetime_seconds: DEFAULT_ASSERTION_LIFETIME_SECONDS,
        }
    }
}

fn default_assertion_lifetime() -> u32 {
    DEFAULT_ASSERTION_LIFETIME_SECONDS
}

/// Limits on the sessions the sidecar tracks for this agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSettings {
    /// Seconds without a call after which a session is forgotten: 10 to 86400,
    /// default 900.
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 10, max = 86400))]
    pub idle_timeout_seconds: u32,

    /// Calls one session may make before every further call is denied: 1 to
    /// 1000000, default 1000.
    #[serde(default = "default_max_calls")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_calls: u32,

    /// Which calls share one session history (session conditions, session
    /// rate limits, `maxCalls`, audit chains). `auto` (default): a delegated
    /// task (`Chaperone-Session`), else the W3C trace (`traceparent` in the
    /// request's `_meta` or header), else the MCP session (`Mcp-Session-Id`),
    /// else the pod. `agent`: every call of the pod outside a delegated task
    /// shares the pod's one history, so an agent cannot start an empty history
    /// by starting a new trace or MCP session.
    #[serde(default, skip_serializing_if = "SessionScopeMode::is_auto")]
    pub scope: SessionScopeMode,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            idle_timeout_seconds: DEFAULT_SESSION_IDLE_TIMEOUT_SECONDS,
            max_calls: DEFAULT_SESSION_MAX_CALLS,
            scope: SessionScopeMode::Auto,
        }
    }
}

/// How the sidecar picks the session a call belongs to (see
/// [`SessionSettings::scope`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SessionScopeMode {
    /// Task, else trace, else MCP session, else the pod.
    #[default]
    Auto,
    /// Task, else the pod: one history for all of the pod's own calls.
    Agent,
}

impl SessionScopeMode {
    /// Whether this is the default, [`SessionScopeMode::Auto`].
    pub fn is_auto(&self) -> bool {
        *self == SessionScopeMode::Auto
    }
}

fn default_idle_timeout() -> u32 {
    DEFAULT_SESSION_IDLE_TIMEOUT_SECONDS
}

fn default_max_calls() -> u32 {
    DEFAULT_SESSION_MAX_CALLS
}

/// Whether decisions block calls or are only observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EnforcementMode {
    /// Denied calls are refused.
    #[default]
    Enforce,
    /// Denied calls are audited as would-deny and forwarded.
    DryRun,
}

/// How an agent takes part in delegation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegationSettings {
    /// When true the agent has no authority of its own: it may call tools only
    /// inside sessions delegated to it under a DelegationGrant (worker agents).
    #[serde(default)]
    pub require_delegation: bool,
}

/// A trusted issuer of initiator (end-user) tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.jwks) != has(self.jwksUrl)",
    "message": "set exactly one of jwks (inline JWKS JSON) or jwksUrl for each initiator issuer"
}, {
    "rule": "!has(self.jwksUrl) || self.jwksUrl.startsWith('https://') || self.jwksUrl.startsWith('http://')",
    "message": "jwksUrl must start with https:// (or http:// inside the cluster)"
}]))]
pub struct InitiatorIssuer {
    /// Expected `iss` claim of the token.
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: String,

    /// Expected `aud` claim of the token.
    #[schemars(length(min = 1, max = 2048))]
    pub audience: String,

    /// Inline JWKS (JSON) holding the issuer's public keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub jwks: Option<String>,

    /// URL the issuer's JWKS is fetched from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub jwks_url: Option<String>,

    /// Claim that names the user; default `sub`.
    #[serde(default = "default_user_claim")]
    #[schemars(length(min = 1, max = 253))]
    pub user_claim: String,
}

fn default_user_claim() -> String {
    "sub".to_owned()
}

// ---------------------------------------------------------------------------
// ToolPolicy
// ---------------------------------------------------------------------------

/// What agents may do with tools: classifications of tools by business effect
/// (and pinned definitions), and rules on tool names, arguments, session history
/// and delegation. Decision order: any matching deny, then any matching
/// requireApproval, then any matching allow, else deny (see `Engine::decide`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.targetRefs) != has(self.agentSelector)",
    "message": "set exactly one of targetRefs (AgentIdentity names) or agentSelector (AgentIdentity labels)"
}, {
    "rule": "(has(self.rules) && size(self.rules) > 0) || (has(self.tools) && size(self.tools) > 0)",
    "message": "a ToolPolicy has rules, tools (classifications or definition pins), or both"
}]))]
pub struct ToolPolicySpec {
    /// AgentIdentities (same namespace) this policy applies to, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub target_refs: Option<Vec<AgentRef>>,

    /// AgentIdentities (same namespace) this policy applies to, by their labels.
    /// An empty `matchLabels` selects every AgentIdentity of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_selector: Option<LabelSelector>,

    /// Business effects of tools, read by effect-based tool matches and session
    /// conditions (e.g. "no externalCommunication after sensitiveData").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub tools: Vec<ToolClassification>,

    /// The rules. Names are unique within the policy (a list map keyed by
    /// name: server-side apply merges rules by name). A policy may have none
    /// and only classify or pin tools (`tools`).
    #[serde(default)]
    #[schemars(length(max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub rules: Vec<Rule>,
}

/// A reference to an AgentIdentity by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRef {
    /// Name of the AgentIdentity.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A label selector over AgentIdentity objects (equality only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels the AgentIdentity must carry (all of them).
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Classifies the tools matching `server`/`name` with business effects, and
/// can pin one tool's definition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "size(self.effects) > 0 || has(self.definition)",
    "message": "a tool classification names effects, a definition pin, or both"
}, {
    "rule": "!has(self.definition) || (self.server != '*' && !self.server.contains('*') && !self.name.contains('*') && !self.name.contains('?'))",
    "message": "a definition pin names one tool: a literal server and tool name, no globs"
}]))]
pub struct ToolClassification {
    /// Tool server name, or `*` for any (default).
    #[serde(default = "any_server")]
    #[schemars(length(min = 1, max = 63))]
    pub server: String,

    /// Tool name; `*` and `?` are globs, compared byte for byte.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,

    /// The effects calling this tool has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub effects: Vec<Effect>,

    /// The tool's pinned definition: `sha256:` and the hex SHA-256 of the
    /// RFC 8785 canonical JSON of its `name`, `title`, `description`,
    /// `inputSchema`, `outputSchema` and `annotations` (as the sidecar reports
    /// it in the AgentIdentity's `status.discoveredTools[].definitionHash`).
    /// Where the agent's `toolServers[].toolPinning` is `enforce`, a tool whose
    /// current definition differs is hidden and its calls refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub definition: Option<String>,
}

/// The business effect of a tool call.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Effect {
    /// Reads data without changing it.
    Read,
    /// Creates or changes data.
    Write,
    /// Deletes data or makes an irreversible change.
    Destructive,
    /// Moves money or changes financial state.
    Financial,
    /// Sends data outside the organisation (mail, chat, web).
    ExternalCommunication,
    /// Reads personal, secret or regulated data.
    SensitiveData,
    /// Runs code or commands.
    CodeExecution,
    /// Changes permissions, identities or credentials.
    Privileged,
}

impl Effect {
    /// Every effect, in declaration order.
    pub const ALL: [Effect; 8] = [
        Effect::Read,
        Effect::Write,
        Effect::Destructive,
        Effect::Financial,
        Effect::ExternalCommunication,
        Effect::SensitiveData,
        Effect::CodeExecution,
        Effect::Privileged,
    ];

    /// The name used in YAML, CEL and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Read => "read",
            Effect::Write => "write",
            Effect::Destructive => "destructive",
            Effect::Financial => "financial",
            Effect::ExternalCommunication => "externalCommunication",
            Effect::SensitiveData => "sensitiveData",
            Effect::CodeExecution => "codeExecution",
            Effect::Privileged => "privileged",
        }
    }
}

/// One allow, deny or requireApproval rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.rateLimit) || self.action == 'allow'",
    "message": "rateLimit is only meaningful on an allow rule: move it to the allow rule it limits"
}, {
    "rule": "!has(self.approval) || self.action == 'requireApproval'",
    "message": "approval settings are only meaningful on a requireApproval rule: set action: requireApproval or remove approval"
}]))]
pub struct Rule {
    /// Name of the rule, unique in the policy; decisions and audit records name it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// `allow`, `deny` or `requireApproval`. Order: any matching deny denies;
    /// else any matching requireApproval holds the call for a person's
    /// approval; else any matching allow allows; else deny.
    pub action: RuleAction,

    /// The tools this rule is about; a call matches when any entry matches.
    #[schemars(length(min = 1, max = 256))]
    pub tools: Vec<ToolMatch>,

    /// Conditions that must all hold for the rule to match; none means always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Conditions>,

    /// Limits how often calls allowed by this rule may happen (allow rules only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// How the approval a requireApproval rule asks for works (only on
    /// requireApproval rules; defaults apply when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSettings>,
}

/// What a matching rule does with the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RuleAction {
    /// Allow the call (unless a deny or requireApproval rule also matches).
    Allow,
    /// Deny the call.
    #[default]
    Deny,
    /// Hold the call until a person approves exactly this call (agent,
    /// session, server, tool, arguments); a matching deny rule still denies.
    RequireApproval,
}

impl RuleAction {
    /// The name used in YAML and audit records: `allow`, `deny` or
    /// `requireApproval`.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Allow => "allow",
            RuleAction::Deny => "deny",
            RuleAction::RequireApproval => "requireApproval",
        }
    }
}

/// Default time a person has to decide on a held call: 10 minutes.
pub const DEFAULT_APPROVAL_TIMEOUT_SECONDS: u32 = 600;
/// Default time an approved call may be made after the approval: 5 minutes.
pub const DEFAULT_APPROVAL_VALID_FOR_SECONDS: u32 = 300;
/// Longest `timeoutSeconds` and `validForSeconds`: one day.
pub const MAX_APPROVAL_SECONDS: u32 = 86_400;
/// Most `redactArguments` pointers a rule may list.
pub const MAX_REDACT_ARGUMENTS: usize = 32;

/// Settings of the approval a requireApproval rule asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSettings {
    /// Seconds a person has to approve or deny the call before the request
    /// expires: 1 to 86400, default 600.
    #[serde(default = "default_approval_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,

    /// Seconds after the approval within which the approved call must be made
    /// (once): 1 to 86400, default 300.
    #[serde(default = "default_approval_valid_for")]
    #[schemars(range(min = 1, max = 86400))]
    pub valid_for_seconds: u32,

    /// Arguments the approver must not see, as JSON pointers (RFC 6901, e.g.
    /// `/card/number`): replaced by `"[redacted]"` in the approval request.
    /// The approval still binds the full arguments (by digest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 512), regex(pattern = r"^(/([^~]|~[01])*)+$"))
    )]
    pub redact_arguments: Vec<String>,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        Self {
            timeout_seconds: DEFAULT_APPROVAL_TIMEOUT_SECONDS,
            valid_for_seconds: DEFAULT_APPROVAL_VALID_FOR_SECONDS,
            redact_arguments: Vec::new(),
        }
    }
}

fn default_approval_timeout() -> u32 {
    DEFAULT_APPROVAL_TIMEOUT_SECONDS
}

fn default_approval_valid_for() -> u32 {
    DEFAULT_APPROVAL_VALID_FOR_SECONDS
}

/// Matches tools by server and name glob, or by effect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.name) != has(self.effect)",
    "message": "a tool match sets exactly one of name (a glob such as 'refund_*') or effect (such as 'financial')"
}]))]
pub struct ToolMatch {
    /// Tool server name, or `*` for any (default).
    #[serde(default = "any_server")]
    #[schemars(length(min = 1, max = 63))]
    pub server: String,

    /// Tool name; `*` and `?` are globs, compared byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub name: Option<String>,

    /// Matches every tool classified with this effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<Effect>,
}

fn any_server() -> String {
    "*".to_owned()
}

/// Conditions of a rule or a grant; all that are set must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Conditions {
    /// Matchers on the call's arguments; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub args: Vec<ArgMatcher>,

    /// Conditions on what the session has done before this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionCondition>,

    /// Conditions on the delegation chain the call is made in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<DelegationCondition>,

    /// A CEL expression that must evaluate to true, for what matchers cannot say.
    /// Variables: `args` (map), `tool` (string), `server` (string), `agent`
    /// (`name`, `namespace`), `session` (`calls`, `effects`, `tools`),
    /// `delegation` (`depth`, `initiator`, `chain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub expression: Option<String>,
}

/// A matcher on one argument, addressed by JSON pointer (RFC 6901). Exactly one
/// operator is set. A matcher on a missing argument, or on a value of the wrong
/// type (a string for `lessThan`, a number for `prefix`), fails closed: it never
/// lets an allow rule match and always lets a deny rule match. Only `exists`
/// reads absence; add `exists: true` to a deny rule to scope it to calls that
/// carry the argument.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
// `equals` and `in` hold any JSON value, which CEL cannot see; `oneOf` over
// `required` makes the API server count them too, and the CEL rule gives the
// readable message when two typed operators are combined.
#[schemars(extend(
    "oneOf" = [
        {"required": ["equals"]}, {"required": ["in"]}, {"required": ["prefix"]},
        {"required": ["regex"]}, {"required": ["lessThan"]}, {"required": ["lessThanOrEqual"]},
        {"required": ["greaterThan"]}, {"required": ["greaterThanOrEqual"]},
        {"required": ["exists"]}, {"required": ["type"]}
    ],
    "x-kubernetes-validations" = [{
        "rule": "[has(self.prefix), has(self.regex), has(self.lessThan), has(self.lessThanOrEqual), has(self.greaterThan), has(self.greaterThanOrEqual), has(self.exists), has(self.type)].filter(x, x).size() <= 1",
        "message": "an argument matcher sets exactly one operator (equals, in, prefix, regex, lessThan, lessThanOrEqual, greaterThan, greaterThanOrEqual, exists or type): split it into several matchers"
    }]
))]
pub struct ArgMatcher {
    /// JSON pointer into the arguments, e.g. `/amount` or `/to/0/email`.
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^(/([^~]|~[01])*)+$"))]
    pub pointer: String,

    /// The value equals this JSON value (numbers compare numerically).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json_value")]
    pub equals: Option<Value>,

    /// The value equals one of these JSON values.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[schemars(schema_with = "list_of_any_json_values")]
    pub in_: Option<Vec<Value>>,

    /// The value is a string that starts with this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub prefix: Option<String>,

    /// The value is a string matching this regular expression (RE2 syntax,
    /// unanchored; use `^…$` to match the whole string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,

    /// The value is a number strictly less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub less_than: Option<Number>,

    /// The value is a number less than or equal to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub less_than_or_equal: Option<Number>,

    /// The value is a number strictly greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greater_than: Option<Number>,

    /// The value is a number greater than or equal to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greater_than_or_equal: Option<Number>,

    /// `true`: the argument is present; `false`: it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,

    /// The value has this JSON type.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<JsonType>,
}

/// A JSON value type, for `type` matchers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum JsonType {
    /// A string.
    String,
    /// Any number.
    Number,
    /// A number without a fractional part.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// An array.
    Array,
    /// An object.
    Object,
    /// `null`.
    Null,
}

/// Conditions on the session's history before this call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionCondition {
    /// Holds when the session already made a call with any of these effects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub any_effect_seen: Vec<Effect>,

    /// Holds when the session already called every one of these tools (names,
    /// compared byte for byte; `server/name` to name the server too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tools_called: Vec<String>,

    /// Holds while the session has made fewer than this many calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub calls_fewer_than: Option<u32>,

    /// Holds while the session has called this tool fewer than this many times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tool_calls_fewer_than: Option<u32>,
}

/// Conditions on the delegation chain of the call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegationCondition {
    /// `true`: the call is made inside a delegated session; `false`: it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegated: Option<bool>,

    /// Holds while the chain has at most this many delegation hops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 8))]
    pub max_depth: Option<u32>,

    /// Holds when the task's initiator (a user, or the first agent) is one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub initiators: Vec<String>,
}

/// How often calls allowed by a rule may happen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Calls allowed per period.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub calls: u32,

    /// Length of the period in seconds: 1 to 86400.
    #[schemars(range(min = 1, max = 86400))]
    pub period_seconds: u32,

    /// Whether the counter is kept per session (default) or per agent pod.
    #[serde(default)]
    pub per: RateLimitScope,
}

/// What a rate limit's counter counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitScope {
    /// One counter per session.
    #[default]
    Session,
    /// One counter per agent (sidecar).
    Agent,
}

// ---------------------------------------------------------------------------
// DelegationGrant
// ---------------------------------------------------------------------------

/// What authority one agent (`from`) may hand to another (`to`): the tools and
/// argument scope, how many further hops, and until when.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.expiresAt) != has(self.ttl)",
    "message": "set exactly one of expiresAt (RFC 3339 time) or ttl (duration such as '1h'): a grant must expire"
}]))]
pub struct DelegationGrantSpec {
    /// The delegating AgentIdentity (same namespace as the grant).
    pub from: AgentRef,

    /// The delegate AgentIdentity (any namespace).
    pub to: NamespacedAgentRef,

    /// The tools the delegate may call for `from`; a call must match one.
    #[schemars(length(min = 1, max = 256))]
    pub tools: Vec<ToolMatch>,

    /// Conditions that narrow the handed-over scope (same language as rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Conditions>,

    /// How many further hops the delegate may pass this authority on: 0 (default,
    /// no re-delegation) to 8.
    #[serde(default)]
    #[schemars(range(max = 8))]
    pub max_depth: u32,

    /// When the grant stops being valid (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub expires_at: Option<String>,

    /// How long after its creation the grant stays valid, as a Go-style duration
    /// (`90s`, `15m`, `1h30m`, at most `8760h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(h|m|s))+$"), length(max = 32))]
    pub ttl: Option<String>,
}

/// A reference to an AgentIdentity that may live in another namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedAgentRef {
    /// Name of the AgentIdentity.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Namespace of the AgentIdentity; defaults to the grant's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

fn any_json_value(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Any JSON value.",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn list_of_any_json_values(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_LIST_ITEMS,
        "items": { "x-kubernetes-preserve-unknown-fields": true }
    })
}

// ---------------------------------------------------------------------------
// Documents: CR YAML read without kube
// ---------------------------------------------------------------------------

/// The identifying part of a custom resource's `metadata`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    pub name: String,
    /// Object namespace; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels of the object.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Generation of the spec (set by the API server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Creation time (RFC 3339, set by the API server); `ttl` grants count from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// The namespace, defaulting to `default` as kubectl does.
    pub fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// One Chaperone custom resource as read from YAML or JSON, without kube.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Document {
    /// An `AgentIdentity`.
    AgentIdentity(Object<AgentIdentitySpec>),
    /// A `ToolPolicy`.
    ToolPolicy(Object<ToolPolicySpec>),
    /// A `DelegationGrant`.
    DelegationGrant(Object<DelegationGrantSpec>),
}

/// A custom resource: metadata and spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object<S> {
    /// `chaperone.dev/v1alpha1`.
    pub api_version: String,
    /// Name, namespace, labels.
    pub metadata: ObjectMeta,
    /// The desired state.
    pub spec: S,
}

/// The API group and version of every Chaperone resource.
pub const API_VERSION: &str = "chaperone.dev/v1alpha1";
