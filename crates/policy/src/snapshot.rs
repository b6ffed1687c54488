//! The compiled policy of one agent as plain, serialisable data: what the
//! controller sends to that agent's sidecars. Deterministic: every collection is a
//! sorted `Vec` (no hash-map order leaks), so the same inputs give the same bytes
//! and the same [`Snapshot::hash`]. The sidecar turns it into an
//! [`crate::Engine`] to decide calls.

use chaperone_audit::{hex, sha256};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::decision::{AgentKey, GrantKey};
use crate::model::{
    ApprovalSettings, AssertionSettings, Conditions, EnforcementMode, InitiatorIssuer,
    RateLimitScope, RuleAction, SessionSettings, ToolClassification, ToolMatch, ToolServer,
};

/// The snapshot format version as a literal: the one definition that both
/// [`SNAPSHOT_FORMAT`] and [`SNAPSHOT_FORMAT_JSON`] are built from (`concat!`
/// takes literals only).
macro_rules! snapshot_format_version {
    () => {
        1
    };
}

/// Version of the snapshot's data format; bumped on incompatible changes. The
/// compiler stamps it into [`SnapshotContent::format`] and
/// [`crate::Engine::new`] refuses any other. The single home of the snapshot
/// contract's version: `chaperone-wire` carries the bytes and depends on no
/// policy type, and this crate must not depend on gRPC.
pub const SNAPSHOT_FORMAT: u32 = snapshot_format_version!();

/// The name of [`Snapshot::to_bytes`]'s format (JSON of this version) in the
/// wire contract's `SnapshotUpdate.format`: the controller sends it and the
/// sidecar refuses an update with any other. Pinned, with the bytes, by
/// `crates/wire/tests/fixtures/snapshot-v1.json`.
pub const SNAPSHOT_FORMAT_JSON: &str =
    concat!("chaperone.snapshot.v", snapshot_format_version!(), "+json");

/// A versioned, content-hashed snapshot of one agent's policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Monotonic version assigned by the controller.
    pub version: u64,
    /// SHA-256 (lowercase hex) of the canonical bytes of `content`. The version is
    /// not hashed, so the controller can tell "nothing changed" and keep it.
    pub hash: String,
    /// What the snapshot holds.
    pub content: SnapshotContent,
}

/// The hashed part of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotContent {
    /// [`SNAPSHOT_FORMAT`] of the producer.
    pub format: u32,
    /// The agent the snapshot is for.
    pub agent: AgentKey,
    /// `enforce` or `dryRun`.
    pub mode: EnforcementMode,
    /// The agent's tool servers, sorted by name.
    pub tool_servers: Vec<ToolServer>,
    /// Assertion settings, defaults filled in.
    pub assertion: AssertionSettings,
    /// Session settings, defaults filled in.
    pub session: SessionSettings,
    /// Trusted issuers of initiator tokens.
    pub initiators: Vec<InitiatorIssuer>,
    /// Extra JSON-RPC methods forwarded ungoverned (the AgentIdentity's
    /// `passthroughMethods`), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough_methods: Vec<String>,
    /// The agent's own rules and classifications.
    pub authority: AgentAuthority,
    /// Valid grants to this agent, and (transitively, up to the deepest chain
    /// they allow) the grants to its delegators: every grant a chain ending here
    /// may use. Sorted by grant.
    pub grants_received: Vec<SnapshotGrant>,
    /// Valid grants from this agent to others. Sorted by grant.
    pub grants_given: Vec<SnapshotGrant>,
    /// The own authority of every agent that may appear in a chain ending here,
    /// so the sidecar can check "the delegator was itself allowed it" without
    /// the delegator's snapshot. Sorted by agent.
    pub delegators: Vec<AgentAuthority>,
    /// Tool definition pins of the policies targeting the agent (their
    /// `tools[].definition`), sorted by server, then tool. Held to by each
    /// tool server's `toolPinning`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<SnapshotPin>,
    /// The AgentIdentity's `maxDisconnectedSeconds`: how long the sidecar may
    /// enforce this snapshot without a connection to the controller (none:
    /// until it reconnects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disconnected_seconds: Option<u32>,
}

/// The pin of one tool: the definition hashes the agent's policies pin it to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPin {
    /// The tool server's name (literal).
    pub server: String,
    /// The tool's name (literal).
    pub tool: String,
    /// `sha256:<hex>` hashes, sorted and deduplicated: one is the pin; more
    /// are conflicting pins, which no definition matches.
    pub definitions: Vec<String>,
}

/// One agent's own authority: its rules and tool classifications.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentAuthority {
    /// The agent.
    pub agent: AgentKey,
    /// The agent may act only inside delegated sessions.
    pub require_delegation: bool,
    /// Names of the agent's tool servers, sorted.
    pub tool_servers: Vec<String>,
    /// Tool classifications of the policies targeting the agent, in policy
    /// order: their effects (pins are in [`SnapshotContent::pins`], and a
    /// classification that only pins is left out).
    pub classifications: Vec<ToolClassification>,
    /// The rules of the (valid) policies targeting the agent, sorted by policy,
    /// then rule name.
    pub rules: Vec<SnapshotRule>,
}

/// A rule, normalised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRule {
    /// The ToolPolicy the rule comes from (same namespace as the agent).
    pub policy: String,
    /// The rule's name.
    pub name: String,
    /// `allow`, `deny` or `requireApproval`.
    pub action: RuleAction,
    /// Tool matches; `server` defaulted to `*`.
    pub tools: Vec<ToolMatch>,
    /// Conditions, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Conditions>,
    /// Rate limit of an allow rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<SnapshotRateLimit>,
    /// Approval settings of a requireApproval rule, defaults filled in (set
    /// on every requireApproval rule, on no other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSettings>,
}

/// A rate limit with the stable id its counters are kept under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRateLimit {
    /// `namespace/policy/rule`.
    pub id: String,
    /// Calls allowed per period.
    pub calls: u32,
    /// Length of the period in seconds.
    pub period_seconds: u32,
    /// Per session or per agent.
    pub per: RateLimitScope,
}

/// A valid, unexpired (at compile time) DelegationGrant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotGrant {
    /// The grant object.
    pub grant: GrantKey,
    /// The delegator.
    pub from: AgentKey,
    /// The delegate.
    pub to: AgentKey,
    /// The tools handed over.
    pub tools: Vec<ToolMatch>,
    /// Conditions narrowing the scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Conditions>,
    /// Further hops the delegate may pass the authority on.
    pub max_depth: u32,
    /// Expiry, unix seconds.
    pub expires_at: i64,
}

/// A snapshot that could not be read.
#[derive(Debug, Error)]
pub enum SnapshotBytesError {
    /// The bytes are not a snapshot.
    #[error("snapshot is not valid JSON of the expected shape: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl SnapshotContent {
    /// The canonical bytes of the content (compact JSON, fields in declaration
    /// order, collections sorted by the compiler).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising plain data (strings, numbers, derived structs) cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// SHA-256 of the canonical bytes, lowercase hex.
    pub fn content_hash(&self) -> String {
        hex(&sha256(&self.canonical_bytes()))
    }
}

impl Snapshot {
    /// A snapshot of `content` at `version`, hashed.
    pub fn new(version: u64, content: SnapshotContent) -> Self {
        Self {
            version,
            hash: content.content_hash(),
            content,
        }
    }

    /// Whether `hash` is the hash of `content`.
    pub fn hash_is_valid(&self) -> bool {
        self.hash == self.content.content_hash()
    }

    /// The wire bytes (JSON; deterministic).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads wire bytes. Check the result with [`crate::Engine::new`], which also
    /// verifies the hash.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SnapshotBytesError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}
