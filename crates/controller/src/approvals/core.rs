//! The pure core of the approval flow: a sidecar's request as a checked
//! [`ApprovalCall`], the ToolCallApproval built from it ([`new_approval`]),
//! where an object stands ([`standing`]), which object a repeated request
//! reuses ([`pick_reusable`]), the status writes the controller makes (consume
//! and expire) and what the leader's sweep does with an object
//! ([`sweep_action`]). No I/O; the caller passes the clock.
//!
//! An object's standing is read from its conditions and `consumedAt`, not
//! from `phase` alone: `phase` can only make an object more final (Consumed,
//! Denied, Expired), never approve it. Without an `Approved` condition of
//! status `True` nothing is granted.

use chaperone_api::approval::{
    ApprovalDelegationLink, ApprovalPhase, ApprovalPolicyRef, ApprovalSession, CONDITION_APPROVED,
    CONDITION_DENIED, CONDITION_EXPIRED, REDACTED, ToolCallApproval, ToolCallApprovalSpec,
    ToolCallApprovalStatus,
};
use chaperone_policy::ScopeKind;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::api::ObjectMeta;
use serde_json::Value;
use std::{collections::BTreeMap, time::Duration};

use crate::auth::SidecarIdentity;

/// Label with the agent's name (when it fits a label value).
pub const LABEL_AGENT: &str = "chaperone.dev/agent";
/// Label with the first 63 hex digits of the argument digest.
pub const LABEL_ARGS_DIGEST: &str = "chaperone.dev/args-digest";
/// The argument digest algorithm the sidecars use (RFC 8785 canonical JSON,
/// SHA-256).
pub const ARGS_ALG: &str = "sha256-rfc8785";
/// Longest `timeoutSeconds` / `validForSeconds` (one day), as the policy
/// allows.
pub const MAX_APPROVAL_SECONDS: u32 = 86_400;
/// Largest arguments (JSON bytes) shown in an approval: the object must stay
/// far below etcd's object size limit.
pub const MAX_ARGUMENTS_BYTES: usize = 128 * 1024;
/// Most redacted pointers in one request (as the policy allows per rule).
pub const MAX_REDACTED: usize = 32;
/// Condition reason: nobody decided before `spec.expiresAt`.
pub const REASON_NOT_DECIDED: &str = "NotDecided";
/// Condition reason: an approval was not used before `status.validUntil`.
pub const REASON_NOT_USED: &str = "NotUsed";

/// A sidecar's approval request, checked: what a ToolCallApproval's spec is
/// made from (with the stream's identity).
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalCall {
    /// The sidecar's ticket (unique on its stream).
    pub ticket: u64,
    /// The ToolPolicy whose rule asked.
    pub policy: ApprovalPolicyRef,
    /// The rule's name.
    pub rule: String,
    /// The tool server.
    pub server: String,
    /// The tool.
    pub tool: String,
    /// The arguments, redactions applied.
    pub arguments: Value,
    /// The redacted JSON pointers.
    pub redacted: Vec<String>,
    /// SHA-256 (lowercase hex) of the unredacted arguments.
    pub args_digest: String,
    /// The session scope and key.
    pub session: ApprovalSession,
    /// The verified initiator, if any.
    pub initiator: Option<String>,
    /// The delegation chain, outermost delegator first.
    pub chain: Vec<ApprovalDelegationLink>,
    /// How long a person may take (seconds).
    pub timeout_seconds: u32,
    /// How long an approval stays usable (seconds).
    pub valid_for_seconds: u32,
}

/// Why an approval request cannot be handled (answered FAILED with this).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidApprovalRequest {
    /// A field that must be set is empty.
    #[error("approval request field {0} is empty")]
    Empty(&'static str),
    /// The session scope is not one the sidecar knows.
    #[error("approval request scope {0:?} is not task, trace, mcpSession or agent")]
    UnknownScope(String),
    /// The digest is not 64 lowercase hex digits.
    #[error("approval request args_digest {0:?} is not a SHA-256 in lowercase hex")]
    BadDigest(String),
    /// The arguments are not JSON.
    #[error("approval request arguments are not JSON: {0}")]
    ArgumentsNotJson(String),
    /// The arguments are too large to show in an approval.
    #[error(
        "the call's arguments ({bytes} bytes of JSON) are too large to ask for an approval (at most {MAX_ARGUMENTS_BYTES})"
    )]
    ArgumentsTooLarge {
        /// Their size.
        bytes: usize,
    },
    /// Too many redacted pointers.
    #[error("approval request names {0} redacted pointers (at most {MAX_REDACTED})")]
    TooManyRedactions(usize),
    /// A redacted pointer is not an RFC 6901 JSON pointer.
    #[error("redacted pointer {0:?} is not a JSON pointer (RFC 6901)")]
    BadPointer(String),
    /// A redacted pointer still points at a value: the arguments would show
    /// what the rule asked to hide.
    #[error("argument {0} was to be redacted but is not \"[redacted]\"; refusing to show it")]
    NotRedacted(String),
    /// A duration out of range.
    #[error("approval request {field} {value} is not between 1 and {MAX_APPROVAL_SECONDS}")]
    OutOfRange {
        /// `timeout_seconds` or `valid_for_seconds`.
        field: &'static str,
        /// The value sent.
        value: u32,
    },
}

/// The parts of a wire request, before they are checked ([`ApprovalCall::check`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawApprovalRequest {
    /// See [`ApprovalCall`]; strings as sent.
    pub ticket: u64,
    /// ToolPolicy namespace.
    pub policy_namespace: String,
    /// ToolPolicy name.
    pub policy: String,
    /// Rule name.
    pub rule: String,
    /// Tool server.
    pub server: String,
    /// Tool.
    pub tool: String,
    /// Arguments, JSON text (empty: `{}`).
    pub arguments_json: String,
    /// Redacted pointers.
    pub redacted: Vec<String>,
    /// Argument digest.
    pub args_digest: String,
    /// Session scope.
    pub scope: String,
    /// Session key.
    pub scope_key: String,
    /// Initiator (empty: none).
    pub initiator: String,
    /// Delegation chain: (agent, grant).
    pub chain: Vec<(String, String)>,
    /// Decision timeout.
    pub timeout_seconds: u32,
    /// Validity of an approval.
    pub valid_for_seconds: u32,
}

impl ApprovalCall {
    /// Checks a request as it came off the wire.
    pub fn check(raw: RawApprovalRequest) -> Result<Self, InvalidApprovalRequest> {
        let required = [
            ("policy_namespace", &raw.policy_namespace),
            ("policy", &raw.policy),
            ("rule", &raw.rule),
            ("server", &raw.server),
            ("tool", &raw.tool),
            ("scope_key", &raw.scope_key),
        ];
        if let Some((field, _)) = required.iter().find(|(_, value)| value.is_empty()) {
            return Err(InvalidApprovalRequest::Empty(field));
        }
        let known = [
            ScopeKind::Task,
            ScopeKind::Trace,
            ScopeKind::McpSession,
            ScopeKind::Agent,
        ];
        if !known.iter().any(|kind| kind.as_str() == raw.scope) {
            return Err(InvalidApprovalRequest::UnknownScope(raw.scope));
        }
        let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        if raw.args_digest.len() != 64 || !raw.args_digest.bytes().all(hex) {
            return Err(InvalidApprovalRequest::BadDigest(raw.args_digest));
        }
        for (field, value) in [
            ("timeout_seconds", raw.timeout_seconds),
            ("valid_for_seconds", raw.valid_for_seconds),
        ] {
            if value == 0 || value > MAX_APPROVAL_SECONDS {
                return Err(InvalidApprovalRequest::OutOfRange { field, value });
            }
        }
        if raw.arguments_json.len() > MAX_ARGUMENTS_BYTES {
            return Err(InvalidApprovalRequest::ArgumentsTooLarge {
                bytes: raw.arguments_json.len(),
            });
        }
        let arguments = if raw.arguments_json.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_str(&raw.arguments_json)
                .map_err(|e| InvalidApprovalRequest::ArgumentsNotJson(e.to_string()))?
        };
        if raw.redacted.len() > MAX_REDACTED {
            return Err(InvalidApprovalRequest::TooManyRedactions(
                raw.redacted.len(),
            ));
        }
        for pointer in &raw.redacted {
            if !pointer.is_empty() && !pointer.starts_with('/') {
                return Err(InvalidApprovalRequest::BadPointer(pointer.clone()));
            }
            // A pointer that no longer resolves was absent from the call; one
            // that resolves must hold the placeholder.
            if let Some(value) = arguments.pointer(pointer)
                && value.as_str() != Some(REDACTED)
            {
                return Err(InvalidApprovalRequest::NotRedacted(pointer.clone()));
            }
        }
        let chain = raw
            .chain
            .into_iter()
            .map(|(agent, grant)| {
                if agent.is_empty() {
                    Err(InvalidApprovalRequest::Empty("chain.agent"))
                } else if grant.is_empty() {
                    Err(InvalidApprovalRequest::Empty("chain.grant"))
                } else {
                    Ok(ApprovalDelegationLink { agent, grant })
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            ticket: raw.ticket,
            policy: ApprovalPolicyRef {
                namespace: raw.policy_namespace,
                name: raw.policy,
            },
            rule: raw.rule,
            server: raw.server,
            tool: raw.tool,
            arguments,
            redacted: raw.redacted,
            args_digest: raw.args_digest,
            session: ApprovalSession {
                scope: raw.scope,
                key: raw.scope_key,
            },
            initiator: Some(raw.initiator).filter(|i| !i.is_empty()),
            chain,
            timeout_seconds: raw.timeout_seconds,
            valid_for_seconds: raw.valid_for_seconds,
        })
    }
}

/// The labels an approval for `agent` and `args_digest` carries (and is
/// found by): the digest's first 63 hex digits, and the agent's name when it
/// fits a label value (names longer than 63 characters are compared on the
/// spec only).
pub fn approval_labels(agent: &str, args_digest: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert(
        LABEL_ARGS_DIGEST.to_owned(),
        args_digest.chars().take(63).collect(),
    );
    if agent.len() <= 63 {
        labels.insert(LABEL_AGENT.to_owned(), agent.to_owned());
    }
    labels
}

/// The label selector (`k=v,k=v`) of [`approval_labels`].
pub fn label_selector(agent: &str, args_digest: &str) -> String {
    approval_labels(agent, args_digest)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The ToolCallApproval to create for `call` from the sidecar `identity` at
/// `now`: named `<agent>-<random>` by the API server, no owner (it outlives
/// the pod until the sweep collects it), no status (written next).
pub fn new_approval(
    call: &ApprovalCall,
    identity: &SidecarIdentity,
    now: Timestamp,
) -> ToolCallApproval {
    let expires_at = now + SignedDuration::from_secs(i64::from(call.timeout_seconds));
    let spec = ToolCallApprovalSpec {
        agent: identity.agent.name.clone(),
        service_account: identity.service_account.clone(),
        pod: identity.pod.clone(),
        session: call.session.clone(),
        initiator: call.initiator.clone(),
        delegation_chain: call.chain.clone(),
        server: call.server.clone(),
        tool: call.tool.clone(),
        arguments: call.arguments.clone(),
        redacted_arguments: call.redacted.clone(),
        args_digest: call.args_digest.clone(),
        args_alg: ARGS_ALG.to_owned(),
        policy: call.policy.clone(),
        rule: call.rule.clone(),
        requested_at: rfc3339(now),
        expires_at: rfc3339(expires_at),
        valid_for_seconds: call.valid_for_seconds,
    };
    let mut object = ToolCallApproval::new("", spec);
    object.metadata = ObjectMeta {
        generate_name: Some(format!("{}-", identity.agent.name)),
        namespace: Some(identity.agent.namespace.clone()),
        labels: Some(approval_labels(&identity.agent.name, &call.args_digest)),
        ..Default::default()
    };
    object
}

/// `at` as RFC 3339 in UTC with whole seconds (as Kubernetes writes times).
pub fn rfc3339(at: Timestamp) -> String {
    Timestamp::from_second(at.as_second())
        .unwrap_or(at)
        .to_string()
}

fn parse_time(text: &str) -> Option<Timestamp> {
    text.parse().ok()
}

/// Where a ToolCallApproval stands at a given time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Waiting for a person until `expires_at`.
    Pending {
        /// `spec.expiresAt`.
        expires_at: Timestamp,
    },
    /// Approved and unused; usable until `valid_until`.
    Approved {
        /// The approver's username (empty when none was recorded).
        decided_by: String,
        /// Until when.
        valid_until: Timestamp,
    },
    /// Used by a call.
    Consumed {
        /// The pod whose call used it.
        by: String,
    },
    /// Denied.
    Denied {
        /// The condition's reason.
        reason: String,
        /// The condition's message.
        message: String,
        /// The denier's username (empty when none was recorded).
        decided_by: String,
    },
    /// Expired: not decided in time, or approved and not used in time.
    Expired {
        /// Whether the object says so already (an `Expired` condition or
        /// phase); `false`: it lapsed and the sweep has yet to record it.
        recorded: bool,
        /// [`REASON_NOT_DECIDED`] or [`REASON_NOT_USED`] (or the recorded
        /// condition's reason).
        reason: String,
        /// Why, for people.
        message: String,
    },
}

impl Standing {
    /// Whether nothing can change it any more (used, denied, expired).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Standing::Consumed { .. } | Standing::Denied { .. } | Standing::Expired { .. }
        )
    }

    /// Whether a request for the same call may wait on it.
    pub fn is_reusable(&self) -> bool {
        matches!(self, Standing::Pending { .. } | Standing::Approved { .. })
    }
}

fn condition<'a>(status: &'a ToolCallApprovalStatus, type_: &str) -> Option<&'a Condition> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// When an approved object stops being usable: `status.validUntil`, or
/// (when nobody wrote it) the decision time plus `spec.validForSeconds`. An
/// approval with no readable time is already unusable (fail closed).
fn valid_until(object: &ToolCallApproval, approved: &Condition) -> Timestamp {
    let status = object.status.as_ref();
    if let Some(until) = status.and_then(|s| s.valid_until.as_deref()) {
        return parse_time(until).unwrap_or(Timestamp::MIN);
    }
    let decided = status
        .and_then(|s| s.decided_at.as_deref())
        .and_then(parse_time)
        .unwrap_or(approved.last_transition_time.0);
    decided + SignedDuration::from_secs(i64::from(object.spec.valid_for_seconds))
}

/// Where `object` stands at `now` (see the module documentation for what is
/// read).
pub fn standing(object: &ToolCallApproval, now: Timestamp) -> Standing {
    let empty = ToolCallApprovalStatus::default();
    let status = object.status.as_ref().unwrap_or(&empty);
    let phase = status.phase;
    let decided_by = status
        .decided_by
        .as_ref()
        .map(|d| d.username.clone())
        .unwrap_or_default();
    if status.consumed_at.is_some() || phase == Some(ApprovalPhase::Consumed) {
        return Standing::Consumed {
            by: status.consumed_by.clone().unwrap_or_default(),
        };
    }
    if let Some(denied) = condition(status, CONDITION_DENIED) {
        return Standing::Denied {
            reason: denied.reason.clone(),
            message: denied.message.clone(),
            decided_by,
        };
    }
    if phase == Some(ApprovalPhase::Denied) {
        return Standing::Denied {
            reason: CONDITION_DENIED.to_owned(),
            message: String::new(),
            decided_by,
        };
    }
    if let Some(expired) = condition(status, CONDITION_EXPIRED) {
        return Standing::Expired {
            recorded: true,
            reason: expired.reason.clone(),
            message: expired.message.clone(),
        };
    }
    if phase == Some(ApprovalPhase::Expired) {
        return Standing::Expired {
            recorded: true,
            reason: CONDITION_EXPIRED.to_owned(),
            message: format!("approval {} expired", object_name(object)),
        };
    }
    if let Some(approved) = condition(status, CONDITION_APPROVED) {
        let valid_until = valid_until(object, approved);
        if now >= valid_until {
            return Standing::Expired {
                recorded: false,
                reason: REASON_NOT_USED.to_owned(),
                message: format!(
                    "approval {} (by {}) was not used before {}",
                    object_name(object),
                    or_unknown(&decided_by),
                    rfc3339(valid_until)
                ),
            };
        }
        return Standing::Approved {
            decided_by,
            valid_until,
        };
    }
    let expires_at = parse_time(&object.spec.expires_at).unwrap_or(Timestamp::MIN);
    if now >= expires_at {
        return Standing::Expired {
            recorded: false,
            reason: REASON_NOT_DECIDED.to_owned(),
            message: format!(
                "nobody approved or denied {} before {}",
                object_name(object),
                object.spec.expires_at
            ),
        };
    }
    Standing::Pending { expires_at }
}

fn or_unknown(user: &str) -> &str {
    if user.is_empty() { "unknown" } else { user }
}

/// `metadata.name`, or empty.
pub fn object_name(object: &ToolCallApproval) -> &str {
    object.metadata.name.as_deref().unwrap_or_default()
}

/// Whether `object` is an approval of exactly `call` by the agent of
/// `identity`: same namespace, agent, session, server, tool, argument digest,
/// and the same policy and rule (an approver's authority is over one policy).
pub fn same_call(
    object: &ToolCallApproval,
    call: &ApprovalCall,
    identity: &SidecarIdentity,
) -> bool {
    let spec = &object.spec;
    object.metadata.namespace.as_deref() == Some(identity.agent.namespace.as_str())
        && spec.agent == identity.agent.name
        && spec.session == call.session
        && spec.server == call.server
        && spec.tool == call.tool
        && spec.args_digest == call.args_digest
        && spec.args_alg == ARGS_ALG
        && spec.policy == call.policy
        && spec.rule == call.rule
}

/// The object a request for `call` waits on instead of creating one: an
/// approval of the same call that is approved and unused (preferred: a retry
/// uses it), or else the oldest pending one.
pub fn pick_reusable<'a>(
    objects: impl IntoIterator<Item = &'a ToolCallApproval>,
    call: &ApprovalCall,
    identity: &SidecarIdentity,
    now: Timestamp,
) -> Option<&'a ToolCallApproval> {
    let mut pending: Option<&ToolCallApproval> = None;
    for object in objects {
        if !same_call(object, call, identity) {
            continue;
        }
        match standing(object, now) {
            Standing::Approved { .. } => return Some(object),
            Standing::Pending { .. } => {
                let older = pending.is_none_or(|p| {
                    (&object.spec.requested_at, object_name(object))
                        < (&p.spec.requested_at, object_name(p))
                });
                if older {
                    pending = Some(object);
                }
            }
            _ => {}
        }
    }
    pending
}

/// How many approvals of `agent` in `namespace` wait for a person at `now`.
pub fn pending_count<'a>(
    objects: impl IntoIterator<Item = &'a ToolCallApproval>,
    namespace: &str,
    agent: &str,
    now: Timestamp,
) -> usize {
    objects
        .into_iter()
        .filter(|o| {
            o.metadata.namespace.as_deref() == Some(namespace)
                && o.spec.agent == agent
                && matches!(standing(o, now), Standing::Pending { .. })
        })
        .count()
}

/// `object` with `status.phase: Pending` (written right after creation).
pub fn with_pending_phase(object: &ToolCallApproval) -> ToolCallApproval {
    let mut object = object.clone();
    object.status.get_or_insert_with(Default::default).phase = Some(ApprovalPhase::Pending);
    object
}

/// `object` used by `pod`'s call at `now`: `consumedAt`, `consumedBy`,
/// `phase: Consumed`. Written conditioned on the object's resourceVersion,
/// so of all the replicas and tickets that try, one wins.
pub fn consumed(object: &ToolCallApproval, pod: &str, now: Timestamp) -> ToolCallApproval {
    let mut object = object.clone();
    let status = object.status.get_or_insert_with(Default::default);
    status.consumed_at = Some(rfc3339(now));
    status.consumed_by = Some(pod.to_owned());
    status.phase = Some(ApprovalPhase::Consumed);
    object
}

/// `object` expired at `now` for `reason` (`message` says why): an `Expired`
/// condition and `phase: Expired`.
pub fn expired(
    object: &ToolCallApproval,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> ToolCallApproval {
    let mut object = object.clone();
    let generation = object.metadata.generation;
    let status = object.status.get_or_insert_with(Default::default);
    status.conditions.retain(|c| c.type_ != CONDITION_EXPIRED);
    status.conditions.push(Condition {
        type_: CONDITION_EXPIRED.to_owned(),
        status: "True".to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
        observed_generation: generation,
    });
    status.phase = Some(ApprovalPhase::Expired);
    object
}

/// When `object` reached its final standing: `consumedAt`, the latest of the
/// Denied/Expired conditions' transitions and `decidedAt`; the creation time
/// when none is readable.
pub fn decided_at(object: &ToolCallApproval) -> Option<Timestamp> {
    let created = object.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let Some(status) = object.status.as_ref() else {
        return created;
    };
    if let Some(at) = status.consumed_at.as_deref().and_then(parse_time) {
        return Some(at);
    }
    status
        .conditions
        .iter()
        .filter(|c| c.type_ == CONDITION_DENIED || c.type_ == CONDITION_EXPIRED)
        .map(|c| c.last_transition_time.0)
        .chain(status.decided_at.as_deref().and_then(parse_time))
        .max()
        .or(created)
}

/// What the leader's sweep does with one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SweepAction {
    /// Nothing yet.
    Keep,
    /// Record that it expired (condition and phase).
    Expire {
        /// [`REASON_NOT_DECIDED`] or [`REASON_NOT_USED`].
        reason: String,
        /// Why.
        message: String,
    },
    /// Decided longer ago than the retention: delete it.
    Delete,
}

/// What the sweep does with `object` at `now`, keeping decided objects for
/// `retention` after their decision.
pub fn sweep_action(object: &ToolCallApproval, now: Timestamp, retention: Duration) -> SweepAction {
    match standing(object, now) {
        Standing::Expired {
            recorded: false,
            reason,
            message,
        } => SweepAction::Expire { reason, message },
        s if s.is_final() => {
            let retention = SignedDuration::try_from(retention).unwrap_or(SignedDuration::MAX);
            match decided_at(object) {
                Some(at) if at.checked_add(retention).is_ok_and(|end| end > now) => {
                    SweepAction::Keep
                }
                _ => SweepAction::Delete,
            }
        }
        _ => SweepAction::Keep,
    }
}

/// A short description of the call an approval is for: `server/tool`.
pub fn call_name(object: &ToolCallApproval) -> String {
    format!("{}/{}", object.spec.server, object.spec.tool)
}

/// What a ticket is told (`ApprovalStatus` on the wire).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalAnswer {
    /// The sidecar's ticket.
    pub ticket: u64,
    /// The ToolCallApproval's name (empty when none was found or created).
    pub name: String,
    /// Where the request stands.
    pub phase: AnswerPhase,
    /// The decider's reason (Denied), or a short cause.
    pub reason: String,
    /// For people: why.
    pub message: String,
    /// The approver's or denier's username.
    pub decided_by: String,
    /// Until when a person can decide (unix seconds; 0 when unknown).
    pub expires_at: i64,
}

/// The phase of an [`ApprovalAnswer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerPhase {
    /// Waiting for a person; more answers follow.
    Pending,
    /// Approved and used for this ticket: forward the call once.
    Granted,
    /// Denied.
    Denied,
    /// Not decided, or not used, in time.
    Expired,
    /// Could not be handled, or another call used the approval.
    Failed,
}

impl AnswerPhase {
    /// Lower-case name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AnswerPhase::Pending => "pending",
            AnswerPhase::Granted => "granted",
            AnswerPhase::Denied => "denied",
            AnswerPhase::Expired => "expired",
            AnswerPhase::Failed => "failed",
        }
    }
}

impl ApprovalAnswer {
    /// A FAILED answer with no object.
    pub fn failed(ticket: u64, name: &str, reason: &str, message: String) -> Self {
        Self {
            ticket,
            name: name.to_owned(),
            phase: AnswerPhase::Failed,
            reason: reason.to_owned(),
            message,
            decided_by: String::new(),
            expires_at: 0,
        }
    }

    /// What `ticket` is told about `object` standing at `standing`: PENDING
    /// while it waits (also while approved, until the consume is done),
    /// DENIED, EXPIRED, or FAILED when another call used it.
    pub fn for_standing(ticket: u64, object: &ToolCallApproval, standing: &Standing) -> Self {
        let name = object_name(object).to_owned();
        let expires_at = parse_time(&object.spec.expires_at).map_or(0, |t| t.as_second());
        let answer = |phase, reason: &str, message: String, decided_by: &str| Self {
            ticket,
            name: name.clone(),
            phase,
            reason: reason.to_owned(),
            message,
            decided_by: decided_by.to_owned(),
            expires_at,
        };
        match standing {
            Standing::Pending { .. } => answer(
                AnswerPhase::Pending,
                "Pending",
                format!(
                    "waiting for a person to approve ToolCallApproval {name} (until {})",
                    object.spec.expires_at
                ),
                "",
            ),
            Standing::Approved { decided_by, .. } => answer(
                AnswerPhase::Pending,
                "Approved",
                format!("ToolCallApproval {name} is approved; using it for this call"),
                decided_by,
            ),
            Standing::Consumed { by } => answer(
                AnswerPhase::Failed,
                "UsedByAnotherCall",
                format!(
                    "approval {name} was used by another call (pod {}); an approval covers one call: retry to ask again",
                    if by.is_empty() { "unknown" } else { by }
                ),
                &object
                    .status
                    .as_ref()
                    .and_then(|s| s.decided_by.as_ref())
                    .map(|d| d.username.clone())
                    .unwrap_or_default(),
            ),
            Standing::Denied {
                reason,
                message,
                decided_by,
            } => answer(AnswerPhase::Denied, reason, message.clone(), decided_by),
            Standing::Expired {
                reason, message, ..
            } => answer(AnswerPhase::Expired, reason, message.clone(), ""),
        }
    }

    /// GRANTED: `object` was consumed for `ticket`.
    pub fn granted(ticket: u64, object: &ToolCallApproval) -> Self {
        let decided_by = object
            .status
            .as_ref()
            .and_then(|s| s.decided_by.as_ref())
            .map(|d| d.username.clone())
            .unwrap_or_default();
        Self {
            ticket,
            name: object_name(object).to_owned(),
            phase: AnswerPhase::Granted,
            reason: "Approved".to_owned(),
            message: format!(
                "approved by {}; ToolCallApproval {} is used for this call",
                or_unknown(&decided_by),
                object_name(object)
            ),
            decided_by,
            expires_at: parse_time(&object.spec.expires_at).map_or(0, |t| t.as_second()),
        }
    }
}
