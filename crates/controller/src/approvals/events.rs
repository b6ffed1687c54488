//! The approval flow's Events, built from a ToolCallApproval (pure): what
//! [`crate::audit_events::AuditEvents::record`] writes on the Pod and the
//! AgentIdentity. Each names the object, the tool and, once decided, the
//! person who decided.

use chaperone_api::approval::ToolCallApproval;
use chaperone_policy::AgentKey;

use super::core::{call_name, object_name};
use crate::audit_events::AgentCallEvent;

/// Which Event of the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalEventKind {
    /// A new ToolCallApproval waits for a person.
    Requested,
    /// An approval was used for a call (the call is forwarded).
    Granted,
    /// A person denied the call.
    Denied,
    /// Nobody decided in time, or the approval was not used in time.
    Expired,
}

impl ApprovalEventKind {
    /// The Event reason.
    pub fn reason(self) -> &'static str {
        match self {
            ApprovalEventKind::Requested => "ApprovalRequested",
            ApprovalEventKind::Granted => "ApprovalGranted",
            ApprovalEventKind::Denied => "ApprovalDenied",
            ApprovalEventKind::Expired => "ApprovalExpired",
        }
    }
}

fn decided_by(object: &ToolCallApproval) -> String {
    object
        .status
        .as_ref()
        .and_then(|s| s.decided_by.as_ref())
        .map(|d| d.username.clone())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The Event `kind` about `object`, on `pod` (uid if known; the object's
/// requesting pod when `None`) and the object's AgentIdentity. `detail` adds
/// the expiry's or denial's message.
pub fn approval_event(
    kind: ApprovalEventKind,
    object: &ToolCallApproval,
    pod: Option<(&str, &str)>,
    detail: &str,
) -> AgentCallEvent {
    let name = object_name(object);
    let namespace = object.metadata.namespace.clone().unwrap_or_default();
    let spec = &object.spec;
    let call = call_name(object);
    let rule = format!(
        "{}/{} rule {}",
        spec.policy.namespace, spec.policy.name, spec.rule
    );
    let session = format!("{} {}", spec.session.scope, spec.session.key);
    let (warning, note) = match kind {
        ApprovalEventKind::Requested => (
            false,
            format!(
                "tool {call} needs a person's approval: ToolCallApproval {name} ({rule}; session {session}); approve or deny it with `chaperonectl approval approve|deny {name} -n {namespace}` before {}",
                spec.expires_at
            ),
        ),
        ApprovalEventKind::Granted => (
            false,
            format!(
                "tool {call} approved by {}: ToolCallApproval {name} used for the call ({rule}; session {session})",
                decided_by(object)
            ),
        ),
        ApprovalEventKind::Denied => (
            true,
            format!(
                "tool {call} denied by {}: ToolCallApproval {name} ({rule}; session {session}): {detail}",
                decided_by(object)
            ),
        ),
        ApprovalEventKind::Expired => (
            true,
            format!(
                "tool {call}: ToolCallApproval {name} expired ({rule}; session {session}): {detail}"
            ),
        ),
    };
    let (pod, pod_uid) = match pod {
        Some((pod, uid)) => (pod.to_owned(), Some(uid.to_owned())),
        None => (spec.pod.clone(), None),
    };
    AgentCallEvent {
        agent: AgentKey::new(namespace, spec.agent.clone()),
        pod,
        pod_uid,
        warning,
        reason: kind.reason(),
        action: format!("Approve {call}"),
        note,
    }
}
