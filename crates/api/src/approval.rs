//! `ToolCallApproval`: a person's decision on one specific tool call.
//!
//! The controller creates one when a sidecar holds a call that a
//! `requireApproval` rule matched. People approve or deny it by updating its
//! status (`chaperonectl approval approve|deny`, or a status patch); the
//! controller's admission webhook admits that update only for users a
//! SubjectAccessReview allows the `approve` verb on the ToolPolicy whose rule
//! asked, and writes `decidedBy` from the request's user info. An approval is
//! used once (`consumedAt`) and expires.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type: a person approved the call.
pub const CONDITION_APPROVED: &str = "Approved";
/// Condition type: a person denied the call.
pub const CONDITION_DENIED: &str = "Denied";
/// Condition type: nobody decided before `spec.expiresAt`, or an approved
/// call was not made before `status.validUntil`.
pub const CONDITION_EXPIRED: &str = "Expired";

/// The value a redacted argument is replaced with in `spec.arguments`.
pub use chaperone_policy::REDACTED;

/// Spec of a [`ToolCallApproval`]: the one call a person is asked to approve.
/// Written once by the controller; immutable.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaperone.dev",
    version = "v1alpha1",
    kind = "ToolCallApproval",
    doc = "A request for a person to approve one specific tool call (this agent, this tool, these arguments, this session or task). Approve or deny it by updating its status (chaperonectl approval approve|deny); the approval is used once and expires.",
    plural = "toolcallapprovals",
    singular = "toolcallapproval",
    shortname = "tca",
    category = "chaperone",
    namespaced,
    status = "ToolCallApprovalStatus",
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".spec.agent"}"#,
    printcolumn = r#"{"name":"Tool","type":"string","jsonPath":".spec.tool"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Requested","type":"date","jsonPath":".spec.requestedAt"}"#,
    printcolumn = r#"{"name":"Decided-By","type":"string","jsonPath":".status.decidedBy.username"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self == oldSelf",
    "message": "spec is immutable: a ToolCallApproval describes one call; decide it in status"
}]))]
pub struct ToolCallApprovalSpec {
    /// The AgentIdentity (same namespace) whose call this is.
    pub agent: String,
    /// The agent's ServiceAccount: it can never approve its own calls.
    pub service_account: String,
    /// The pod whose sidecar asked.
    pub pod: String,
    /// The session the call belongs to: its scope (`task`, `trace`,
    /// `mcpSession`, `agent`) and key. An approval covers this session only.
    pub session: ApprovalSession,
    /// The user who started the task, when a verified initiator token
    /// named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    /// The delegation chain the call was made in, outermost delegator first;
    /// empty for the agent's own call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegation_chain: Vec<ApprovalDelegationLink>,
    /// The tool server (the AgentIdentity's `toolServers[].name`).
    pub server: String,
    /// The tool (or `resource:<uri>`, `prompt:<name>`).
    pub tool: String,
    /// The call's arguments with the rule's `redactArguments` replaced by
    /// `"[redacted]"`.
    #[schemars(schema_with = "any_json")]
    pub arguments: serde_json::Value,
    /// The JSON pointers (RFC 6901) that were redacted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redacted_arguments: Vec<String>,
    /// SHA-256 (hex) of the unredacted arguments' canonical JSON (see
    /// `argsAlg`): the approval covers exactly these arguments.
    pub args_digest: String,
    /// How `argsDigest` was computed (`sha256-rfc8785`).
    pub args_alg: String,
    /// The ToolPolicy (same namespace as the rule's policy) whose rule asked.
    pub policy: ApprovalPolicyRef,
    /// The `requireApproval` rule's name.
    pub rule: String,
    /// When the sidecar asked (RFC 3339).
    pub requested_at: String,
    /// Until when a person can decide (RFC 3339); after it the request expires.
    pub expires_at: String,
    /// How long an approval stays usable after it is given.
    pub valid_for_seconds: u32,
}

/// The session an approval is bound to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSession {
    /// `task`, `trace`, `mcpSession` or `agent`.
    pub scope: String,
    /// The scope's key (task id, trace id, MCP session id, pod).
    pub key: String,
}

/// One hop of a delegation chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalDelegationLink {
    /// The delegating agent, `namespace/name`.
    pub agent: String,
    /// The DelegationGrant it used, `namespace/name`.
    pub grant: String,
}

/// The ToolPolicy whose rule asked for the approval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPolicyRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Where a [`ToolCallApproval`] stands (`status.phase`), derived from its
/// conditions and `consumedAt`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApprovalPhase {
    /// Waiting for a person.
    #[default]
    Pending,
    /// Approved and not yet used.
    Approved,
    /// Approved and used by the call.
    Consumed,
    /// Denied.
    Denied,
    /// Nobody decided in time, or the approval was not used in time.
    Expired,
}

impl ApprovalPhase {
    /// The phase's name, as in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalPhase::Pending => "Pending",
            ApprovalPhase::Approved => "Approved",
            ApprovalPhase::Consumed => "Consumed",
            ApprovalPhase::Denied => "Denied",
            ApprovalPhase::Expired => "Expired",
        }
    }

    /// Whether a person can still decide.
    pub fn is_pending(self) -> bool {
        self == ApprovalPhase::Pending
    }
}

/// Who decided, from the admission request's user info (never from the client).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalDecider {
    /// The user's name as the API server authenticated it.
    pub username: String,
    /// The user's groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// Observed state of a [`ToolCallApproval`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolCallApprovalStatus {
    /// `Approved`, `Denied` or `Expired` (status `True`), with the decider's
    /// reason and message. At most one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pending, Approved, Consumed, Denied or Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ApprovalPhase>,
    /// Who approved or denied (written by the admission webhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<ApprovalDecider>,
    /// When (RFC 3339; written by the admission webhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// Until when an approved call can be made (RFC 3339): `decidedAt` plus
    /// `spec.validForSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<String>,
    /// When the approved call was forwarded (RFC 3339): the approval is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_at: Option<String>,
    /// The pod whose sidecar forwarded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_by: Option<String>,
}

fn any_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
