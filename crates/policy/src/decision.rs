//! The questions asked of an [`crate::Engine`] and its answers: a tool call
//! ([`DecisionRequest`]) in, a [`Decision`] out. Built to be cheap: the request
//! borrows everything, and an allow decision allocates nothing.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::RateLimitScope;
use crate::pinning::{CurrentDefinition, PinVerdict};
use crate::session::SessionHistory;

/// A namespaced object, written `namespace/name`: an AgentIdentity or a
/// DelegationGrant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
}

impl ObjectKey {
    /// The key of `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `namespace/name`; a bare `name` is in `default_namespace`.
    pub fn parse(text: &str, default_namespace: &str) -> Self {
        match text.split_once('/') {
            Some((namespace, name)) => Self::new(namespace, name),
            None => Self::new(default_namespace, text),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The key of an AgentIdentity.
pub type AgentKey = ObjectKey;
/// The key of a DelegationGrant.
pub type GrantKey = ObjectKey;

/// One hop of a delegation chain: `delegator` handed authority to the next agent
/// (the next link's delegator, or the deciding agent for the last link) under
/// `grant`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DelegationLink {
    /// The agent that delegated.
    pub delegator: AgentKey,
    /// The DelegationGrant it delegated under.
    pub grant: GrantKey,
}

/// The delegation chain of a session, the origin first: for a call by C in a task
/// A handed to B and B to C, `[A (grant A→B), B (grant B→C)]`. Empty for an
/// agent's own sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DelegationChain {
    /// The hops, origin first.
    pub links: Vec<DelegationLink>,
}

impl DelegationChain {
    /// Number of delegation hops (0 for an agent's own session).
    pub fn depth(&self) -> usize {
        self.links.len()
    }
}

/// A tool call to decide.
#[derive(Clone, Copy, Debug)]
pub struct DecisionRequest<'a> {
    /// The tool server's name (the first path segment at the sidecar).
    pub server: &'a str,
    /// The tool's name, compared byte for byte.
    pub tool: &'a str,
    /// The call's `arguments`, parsed.
    pub arguments: &'a Value,
    /// What the session did before this call.
    pub session: &'a SessionHistory,
    /// The delegation chain of the session; `None` or empty for the agent's own.
    pub delegation: Option<&'a DelegationChain>,
    /// The task's initiator (a verified user); `None` makes the chain's origin
    /// agent (`namespace/name`) the initiator.
    pub initiator: Option<&'a str>,
    /// The current time, unix seconds (grant expiry).
    pub now: i64,
    /// A person approved exactly this call (agent, session, server, tool,
    /// argument digest) and the approval was consumed for it: a call whose
    /// strictest outcome is requireApproval is allowed ([`Reason::Approved`]).
    /// A deny still denies.
    pub approved: bool,
    /// The tool's current definition as the sidecar last saw it in a
    /// `tools/list` (its hash, or unseen), or that pins do not apply to this
    /// call (not a tool). Read only where the server's `toolPinning` is
    /// `enforce`.
    pub definition: CurrentDefinition<'a>,
}

/// Whether a call may go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// The call is allowed.
    Allow,
    /// The call is denied.
    Deny,
    /// The call may go ahead only once a person approves it
    /// ([`Decision::approval`] says how). Written `approval`.
    #[serde(rename = "approval", alias = "requireApproval")]
    RequireApproval,
}

impl Verdict {
    /// `allow`, `deny` or `approval`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::RequireApproval => "approval",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What decided: a rule (`policy/rule`) or a fixed reason.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DecidingRule {
    /// A rule, as `policy/rule`.
    Rule(Arc<str>),
    /// No rule matched: `no rule allows`.
    NoRuleAllows,
    /// The agent has no authority of its own: `requireDelegation`.
    RequireDelegation,
    /// A grant of the chain has expired: `grant expired`.
    GrantExpired,
    /// Some other check of the delegation chain failed: `delegation`.
    Delegation,
    /// The tool's definition does not match its pin where the server's
    /// `toolPinning` is `enforce`: `toolPinning`.
    ToolPinning,
}

impl DecidingRule {
    /// `policy/rule`, or the fixed reason.
    pub fn as_str(&self) -> &str {
        match self {
            DecidingRule::Rule(id) => id,
            DecidingRule::NoRuleAllows => "no rule allows",
            DecidingRule::RequireDelegation => "requireDelegation",
            DecidingRule::GrantExpired => "grant expired",
            DecidingRule::Delegation => "delegation",
            DecidingRule::ToolPinning => "toolPinning",
        }
    }
}

impl fmt::Display for DecidingRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the decision is what it is; `Display` gives the human sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An allow rule matched and no deny rule did.
    AllowedByRule,
    /// A deny rule matched.
    DeniedByRule,
    /// No allow rule matched (default deny).
    NoRuleAllows,
    /// The agent has `requireDelegation` and the call is not in a delegated session.
    RequireDelegation,
    /// The chain is deeper than any grant can allow.
    ChainTooDeep {
        /// Hops in the chain.
        depth: usize,
    },
    /// The chain names a grant this agent's snapshot does not hold (deleted,
    /// invalid, or never given to this chain).
    UnknownGrant {
        /// The grant named.
        grant: GrantKey,
    },
    /// The grant exists but is not from the link's delegator to the next agent.
    GrantMismatch {
        /// The grant named.
        grant: GrantKey,
    },
    /// The grant has expired.
    GrantExpired {
        /// The grant.
        grant: GrantKey,
        /// When it expired (unix seconds).
        expired_at: i64,
    },
    /// More hops follow the grant than its `maxDepth` allows.
    DepthExceeded {
        /// The grant.
        grant: GrantKey,
        /// Its `maxDepth`.
        max_depth: u32,
        /// Hops after it in the chain.
        further_hops: usize,
    },
    /// The grant's tools or conditions do not cover the call.
    GrantDoesNotCover {
        /// The grant.
        grant: GrantKey,
    },
    /// A delegator along the chain would not itself have been allowed the call.
    DelegatorNotAllowed {
        /// The delegator.
        delegator: AgentKey,
        /// What denied it in the delegator's rules.
        rule: DecidingRule,
    },
    /// A requireApproval rule matched (the agent's own, or a delegator's) and
    /// no deny rule did: a person must approve this call.
    ApprovalRequired,
    /// A requireApproval rule matched, no deny rule did, and a person approved
    /// exactly this call.
    Approved,
    /// The tool's definition does not pass its pin (`enforce`); the verdict
    /// says how (changed, not pinned, conflicting pins, not yet seen).
    ToolPinning(PinVerdict),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::AllowedByRule => f.write_str("an allow rule matched and no deny rule did"),
            Reason::DeniedByRule => f.write_str("a deny rule matched"),
            Reason::NoRuleAllows => f.write_str("no allow rule matched (default deny)"),
            Reason::RequireDelegation => f.write_str(
                "the agent has requireDelegation: it may act only inside a delegated session",
            ),
            Reason::ChainTooDeep { depth } => {
                write!(
                    f,
                    "delegation chain of {depth} hops is deeper than any grant allows"
                )
            }
            Reason::UnknownGrant { grant } => {
                write!(
                    f,
                    "grant {grant} is not valid for this agent (deleted, invalid or not in its chain)"
                )
            }
            Reason::GrantMismatch { grant } => {
                write!(f, "grant {grant} does not delegate between these agents")
            }
            Reason::GrantExpired { grant, expired_at } => {
                write!(f, "grant {grant} expired at unix time {expired_at}")
            }
            Reason::DepthExceeded {
                grant,
                max_depth,
                further_hops,
            } => write!(
                f,
                "grant {grant} allows {max_depth} further hops but {further_hops} follow it"
            ),
            Reason::GrantDoesNotCover { grant } => {
                write!(
                    f,
                    "grant {grant} does not cover this tool and these arguments"
                )
            }
            Reason::DelegatorNotAllowed { delegator, rule } => {
                write!(
                    f,
                    "delegator {delegator} was not itself allowed this call ({rule})"
                )
            }
            Reason::ApprovalRequired => {
                f.write_str("a requireApproval rule matched: a person must approve this call")
            }
            Reason::Approved => f.write_str("a person approved this call"),
            Reason::ToolPinning(verdict) => verdict.fmt(f),
        }
    }
}

/// The rate limit that applies to an allowed call; the sidecar keeps the counter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RateLimitRef {
    /// Stable id of the limit (`namespace/policy/rule`): the counter's key.
    pub id: Arc<str>,
    /// Calls allowed per period.
    pub calls: u32,
    /// Length of the period in seconds.
    pub period_seconds: u32,
    /// Whether the counter is per session or per agent.
    pub per: RateLimitScope,
}

/// What a requireApproval rule asks for: who must approve (the policy whose
/// rule matched) and how long the request and the approval live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ApprovalRequirement {
    /// The ToolPolicy whose rule asked (approvers need the `approve` verb on it).
    pub policy: ObjectKey,
    /// The rule's name.
    pub rule: String,
    /// Seconds a person has to decide.
    pub timeout_seconds: u32,
    /// Seconds an approval stays usable.
    pub valid_for_seconds: u32,
    /// JSON pointers of the arguments the approver must not see (see
    /// [`crate::redact`]).
    pub redact_arguments: Arc<[String]>,
}

/// The answer for one tool call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allow, deny or require approval, as the policy decides (also in dry-run
    /// mode).
    pub verdict: Verdict,
    /// The rule that decided (`policy/rule`) or a fixed reason.
    pub rule: DecidingRule,
    /// Why, for audit records and error messages.
    pub reason: Reason,
    /// Version of the snapshot that decided.
    pub snapshot_version: u64,
    /// The agent is in `dryRun` mode: a deny is a would-deny and the call is
    /// forwarded.
    pub dry_run: bool,
    /// The rate limit of the allowing rule, if it has one.
    pub rate_limit: Option<RateLimitRef>,
    /// The approval a requireApproval rule asks for: set with
    /// [`Verdict::RequireApproval`], and kept on the allow an approval
    /// produced ([`Reason::Approved`]) so the audit names the rule.
    pub approval: Option<ApprovalRequirement>,
}

impl Decision {
    /// Whether the sidecar forwards the call: allowed, or denied or needing
    /// approval in dry-run mode.
    pub fn forwards(&self) -> bool {
        self.verdict == Verdict::Allow || self.dry_run
    }

    /// Whether this is a call needing approval that dry-run mode lets through
    /// (audited as would-require-approval; no approval is requested).
    pub fn would_require_approval(&self) -> bool {
        self.verdict == Verdict::RequireApproval && self.dry_run
    }

    /// Whether this is a deny that dry-run mode lets through (audited as
    /// would-deny).
    pub fn would_deny(&self) -> bool {
        self.verdict == Verdict::Deny && self.dry_run
    }
}
