//! Chaperone's policy core: the model users write, compiled into per-agent
//! snapshots and evaluated per tool call. No kube, no I/O, no async: the
//! controller, the sidecar and the CLI all call into this crate.
//!
//! - [`compile`] / [`compile_all`]: CRs in, one [`Snapshot`] per agent (plain,
//!   deterministic, hashed data: what the controller sends) and per-object errors.
//! - [`Engine::new`]: a snapshot turned into indexes and compiled matchers.
//! - [`Engine::decide`]: a [`DecisionRequest`] in, a [`Decision`] out;
//!   [`Engine::visible`] for `tools/list` filtering, by the same rules.
//! - [`DocumentSet`]: CR YAML or JSON text in, checked objects out, and the
//!   agent picked: the one loader of policy files.
//!
//! - [`redact`]: the arguments a person approving a call is shown.
//! - [`pin_verdict`]: a tool's current definition hash against its pin
//!   ([`Engine::tool_pin`]) under its server's `toolPinning`.
//!
//! Decision semantics: toolPinning (enforce) before deny > requireApproval >
//! allow > default deny, stated once, with how unevaluable conditions and
//! delegation fit in, on [`Engine::decide`].

#![forbid(unsafe_code)]

mod approval;
mod compile;
mod conditions;
mod decision;
mod documents;
mod engine;
mod expiry;
mod expression;
pub mod glob;
pub mod model;
mod pinning;
mod scope;
mod session;
mod snapshot;

pub use approval::{ApprovalError, REDACTED, check_approval_settings, redact};
pub use compile::{
    Compilation, CompileError, CompileErrorReason, CompileOptions, Inventory, InventoryCompilation,
    ObjectKind, ObjectRef, ObjectSet, check_grant, check_grant_among, check_policy, compile,
    compile_all, compile_each,
};
pub use conditions::{ConditionError, REGEX_SIZE_LIMIT};
pub use decision::{
    AgentKey, ApprovalRequirement, DecidingRule, Decision, DecisionRequest, DelegationChain,
    DelegationLink, GrantKey, ObjectKey, RateLimitRef, Reason, Verdict,
};
pub use documents::{
    AgentChoiceError, DOCUMENT_FILE_EXTENSIONS, DocumentError, DocumentSet, parse_documents,
};
pub use engine::{
    Engine, Explanation, InvalidSnapshot, RuleError, RuleExplanation, RuleOutcome, ToolMatchError,
    decide, visible,
};
pub use expiry::{
    ExpiryError, MAX_GRANT_TTL_SECONDS, grant_expires_at, parse_duration_seconds,
    parse_rfc3339_seconds,
};
pub use expression::CEL_VARIABLES;
pub use glob::{glob_matches, is_glob};
pub use pinning::{CurrentDefinition, PinVerdict, ToolPin, pin_verdict};
pub use scope::{ScopeHints, ScopeKind, resolve_scope, trace_id_of};
pub use session::{EffectSet, SessionHistory};
pub use snapshot::{
    AgentAuthority, SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_JSON, Snapshot, SnapshotBytesError,
    SnapshotContent, SnapshotGrant, SnapshotPin, SnapshotRateLimit, SnapshotRule,
};
