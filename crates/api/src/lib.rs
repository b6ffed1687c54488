//! Chaperone's custom resources (`chaperone.dev/v1alpha1`) as Kubernetes types.
//!
//! The specs are the policy model of `chaperone-policy` (so the sidecar and CLI read
//! the same types without kube); this crate wraps them into CRDs with status,
//! printer columns, short names and categories, and generates their YAML.

#![forbid(unsafe_code)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use chaperone_policy::model;

pub mod approval;
pub use approval::{ToolCallApproval, ToolCallApprovalSpec, ToolCallApprovalStatus};
pub mod audit_keys;
pub mod replica_state;
pub mod tool_definitions;

/// The API group of every Chaperone resource.
pub const GROUP: &str = "chaperone.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Spec of an [`AgentIdentity`]: who an agent is and which tool servers it reaches.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaperone.dev",
    version = "v1alpha1",
    kind = "AgentIdentity",
    doc = "An AI agent known to Chaperone: the pods that are it, the tool servers it reaches, and how its sessions and assertions behave.",
    plural = "agentidentities",
    singular = "agentidentity",
    shortname = "agentid",
    shortname = "aid",
    category = "chaperone",
    namespaced,
    status = "AgentIdentityStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"integer","jsonPath":".status.snapshotVersion"}"#,
    printcolumn = r#"{"name":"Sidecars","type":"integer","jsonPath":".status.sidecarsConnected"}"#,
    printcolumn = r#"{"name":"In-Sync","type":"integer","jsonPath":".status.sidecarsInSync"}"#,
    printcolumn = r#"{"name":"Tools","type":"integer","jsonPath":".status.governedToolCount","description":"Discovered tools that some rule governs"}"#,
    printcolumn = r#"{"name":"Pinned","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"ToolDefinitionsPinned\")].status","description":"False while tool definition pinning blocks some tool"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct AgentIdentitySpecV1(pub model::AgentIdentitySpec);

/// Spec of a [`ToolPolicy`]: rules on tool names, arguments, sessions, delegation.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaperone.dev",
    version = "v1alpha1",
    kind = "ToolPolicy",
    doc = "Rules on what agents may do with tools: tool names and arguments, session history, delegation. Any matching deny wins, then any matching requireApproval (a person approves the call), then any matching allow; otherwise the call is denied. Tools can carry effects and pinned definitions.",
    plural = "toolpolicies",
    singular = "toolpolicy",
    shortname = "tpol",
    category = "chaperone",
    namespaced,
    status = "ToolPolicyStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.ruleCount"}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.targetAgentCount"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct ToolPolicySpecV1(pub model::ToolPolicySpec);

/// Spec of a [`DelegationGrant`]: what authority one agent may hand another.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaperone.dev",
    version = "v1alpha1",
    kind = "DelegationGrant",
    doc = "Authority one agent (from) may hand to another (to): which tools, in which argument scope, how many further hops, until when.",
    plural = "delegationgrants",
    singular = "delegationgrant",
    shortname = "dgrant",
    category = "chaperone",
    namespaced,
    status = "DelegationGrantStatus",
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".spec.from.name"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.to.name"}"#,
    printcolumn = r#"{"name":"Max-Depth","type":"integer","jsonPath":".spec.maxDepth"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expiresAt","description":"When the grant expires (RFC 3339)"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct DelegationGrantSpecV1(pub model::DelegationGrantSpec);

/// Observed state of an [`AgentIdentity`], written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentityStatus {
    /// `Ready` (the snapshot compiled and is served) and problems, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Version of the snapshot currently served to this agent's sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_version: Option<i64>,
    /// Content hash (SHA-256, hex) of that snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_hash: Option<String>,
    /// Sidecars currently connected to a controller for this agent.
    #[serde(default)]
    pub sidecars_connected: i32,
    /// Connected sidecars that acknowledged the current snapshot.
    #[serde(default)]
    pub sidecars_in_sync: i32,
    /// Pods whose sidecar runs an older snapshot or rejected the current one:
    /// at most 20 are listed (`sidecarsConnected` − `sidecarsInSync` counts
    /// them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub out_of_sync_pods: Vec<OutOfSyncPod>,
    /// Tools the sidecars saw in `tools/list` results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discovered_tools: Vec<DiscoveredTool>,
    /// How many discovered tools some rule governs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governed_tool_count: Option<i32>,
}

/// A pod whose sidecar is not running the current snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutOfSyncPod {
    /// Pod name.
    pub name: String,
    /// Snapshot version the sidecar last acknowledged, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_version: Option<i64>,
    /// Why the sidecar rejected the current snapshot, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A tool a sidecar saw in an upstream `tools/list` result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveredTool {
    /// Tool server name.
    pub server: String,
    /// Tool name.
    pub name: String,
    /// Whether some rule of this agent's policies is about this tool; an
    /// ungoverned tool is denied by default and hidden from `tools/list`.
    pub governed: bool,
    /// The tool's current definition: `sha256:` and the hex SHA-256 of the
    /// RFC 8785 canonical JSON of its name, title, description, inputSchema,
    /// outputSchema and annotations, as the sidecars last listed it (the
    /// newest when sidecars disagree). Absent when the server's
    /// `toolPinning` is `off`. Pin it with a ToolPolicy's
    /// `spec.tools[].definition` (`chaperonectl tools pin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition_hash: Option<String>,
    /// When this definition was first reported (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    /// How the definition stands against its pin: `Matches`, `Differs`,
    /// `Unpinned`, `Conflicting` (the agent's policies pin it to different
    /// definitions), `Unknown` (no definition reported) or `Off` (the
    /// server's `toolPinning` is off). Where the server's `toolPinning` is
    /// `enforce`, a governed tool that does not match is hidden from lists
    /// and its calls are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<PinState>,
    /// The definition the agent's policies pin the tool to, when it differs
    /// from the current one (the text of both is in the ConfigMap
    /// `<agent>-tool-definitions`: `chaperonectl tools diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_hash: Option<String>,
}

/// How a discovered tool's definition stands against its pin (the status
/// form of `chaperone_policy::PinVerdict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PinState {
    /// The current definition is the pinned one.
    Matches,
    /// The current definition differs from the pinned one.
    Differs,
    /// No ToolPolicy of the agent pins the tool.
    Unpinned,
    /// The agent's ToolPolicies pin the tool to different definitions: none
    /// matches.
    Conflicting,
    /// No definition has been reported.
    Unknown,
    /// The server's `toolPinning` is `off`: nothing is compared.
    Off,
}

impl PinState {
    /// The state of a verdict.
    pub fn of(verdict: &chaperone_policy::PinVerdict) -> Self {
        use chaperone_policy::PinVerdict;
        match verdict {
            PinVerdict::Matches => PinState::Matches,
            PinVerdict::Differs { .. } => PinState::Differs,
            PinVerdict::Unpinned { .. } => PinState::Unpinned,
            PinVerdict::Conflicting { .. } => PinState::Conflicting,
            PinVerdict::Unknown => PinState::Unknown,
            PinVerdict::Unchecked => PinState::Off,
        }
    }

    /// Its name, as the status and the metric labels write it.
    pub fn as_str(self) -> &'static str {
        match self {
            PinState::Matches => "Matches",
            PinState::Differs => "Differs",
            PinState::Unpinned => "Unpinned",
            PinState::Conflicting => "Conflicting",
            PinState::Unknown => "Unknown",
            PinState::Off => "Off",
        }
    }
}

/// Observed state of a [`ToolPolicy`], written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolPolicyStatus {
    /// `Ready`, or not ready with the failing rule's name and the error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of rules compiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_count: Option<i32>,
    /// Number of AgentIdentities this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_agent_count: Option<i32>,
}

/// Observed state of a [`DelegationGrant`], written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegationGrantStatus {
    /// `Ready`, `Expired` or `Invalid`, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the grant expires (RFC 3339), resolved from `expiresAt` or `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// The CustomResourceDefinitions of all Chaperone kinds, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    [
        AgentIdentity::crd(),
        ToolPolicy::crd(),
        DelegationGrant::crd(),
        ToolCallApproval::crd(),
    ]
    .into_iter()
    .map(without_unknown_formats)
    .map(without_doc_links)
    .collect()
}

/// Descriptions come from doc comments; `kubectl explain` shows them as text,
/// so rustdoc links (`` [`ToolPolicy`] ``, `[text](target)`) become their
/// text (`ToolPolicy`, `text`).
fn without_doc_links(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(text)) = map.get_mut("description") {
                    *text = plain_text(text);
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut json = serde_json::to_value(&crd).expect("a CRD serialises to JSON");
    walk(&mut json);
    serde_json::from_value(json).expect("rewriting descriptions keeps a valid CRD")
}

/// `text` with each rustdoc link replaced by what it shows: `` [`X`] `` and
/// `` [`X`](target) `` by `X`, `[words](target)` by `words`. Brackets that are
/// not a link (`rules[]`, `[a, b]`) stay.
fn plain_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let inner = &after[..close];
        let tail = &after[close + 1..];
        let code = inner.len() >= 2 && inner.starts_with('`') && inner.ends_with('`');
        let target_end = tail
            .strip_prefix('(')
            .and_then(|t| t.find(')'))
            .map(|end| end + 2);
        match (code, target_end) {
            (true, Some(end)) => {
                out.push_str(&inner[1..inner.len() - 1]);
                rest = &tail[end..];
            }
            (true, None) => {
                out.push_str(&inner[1..inner.len() - 1]);
                rest = tail;
            }
            (false, Some(end)) if !inner.is_empty() => {
                out.push_str(inner);
                rest = &tail[end..];
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Formats the API server understands; schemars also emits `uint32` and the
/// like, which the API server ignores with a warning on every apply.
const KNOWN_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "date",
    "date-time",
    "password",
];

fn without_unknown_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                let unknown = map
                    .get("format")
                    .and_then(|f| f.as_str())
                    .is_some_and(|f| !KNOWN_FORMATS.contains(&f));
                if unknown {
                    map.remove("format");
                }
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut json = serde_json::to_value(&crd).expect("a CRD serialises to JSON");
    strip(&mut json);
    serde_json::from_value(json).expect("stripping formats keeps a valid CRD")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_links_become_their_text() {
        assert_eq!(
            plain_text("Spec of an [`AgentIdentity`]: who"),
            "Spec of an AgentIdentity: who"
        );
        assert_eq!(
            plain_text("see [`Rule::name`](crate::Rule) and [the docs](https://x.y/z)."),
            "see Rule::name and the docs."
        );
        assert_eq!(
            plain_text("rules[].name and [a, b] and [`x`"),
            "rules[].name and [a, b] and [`x`"
        );
        assert_eq!(plain_text("a ] b [ c"), "a ] b [ c");
        for crd in crds() {
            let json = serde_json::to_string(&crd).unwrap();
            assert!(
                !json.contains("[`"),
                "{} keeps a doc link",
                crd.spec.names.kind
            );
        }
    }

    #[test]
    fn crds_have_status_subresource_and_category() {
        for crd in crds() {
            let version = &crd.spec.versions[0];
            assert!(
                version.subresources.as_ref().unwrap().status.is_some(),
                "{}",
                crd.spec.names.kind
            );
            assert_eq!(
                crd.spec.names.categories.as_deref(),
                Some(&["chaperone".to_owned()][..])
            );
            assert_eq!(crd.spec.scope, "Namespaced");
        }
    }

    #[test]
    fn spec_schema_is_inlined_and_documented() {
        let crd = AgentIdentity::crd();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let text = schema.to_string();
        assert!(
            !text.contains("$ref"),
            "CRD schemas must be inlined: {text}"
        );
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert!(
            spec["properties"]["toolServers"]["description"]
                .as_str()
                .unwrap()
                .contains("sidecar")
        );
    }

    #[test]
    fn crds_carry_only_formats_the_api_server_knows() {
        for crd in crds() {
            let text = serde_json::to_string(&crd).unwrap();
            assert!(!text.contains("uint32"), "{}", crd.spec.names.kind);
        }
    }

    #[test]
    fn spec_wrapper_serialises_transparently() {
        let spec = AgentIdentitySpecV1(model::AgentIdentitySpec {
            selector: model::AgentSelector {
                service_account_name: "planner".into(),
                ..Default::default()
            },
            ..Default::default()
        });
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["selector"]["serviceAccountName"], "planner");
    }
}
