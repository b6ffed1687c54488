//! Who may create, approve, deny and update a ToolCallApproval: the pure
//! decision of the approval admission webhook (`POST /approve-toolcallapprovals`,
//! a mutating webhook for CREATE of `toolcallapprovals` and UPDATE of
//! `toolcallapprovals/status`).
//!
//! - CREATE: only the controller (its own username) creates them.
//! - A status UPDATE by the controller is bookkeeping: `phase`, `consumedAt`,
//!   `consumedBy` (of an approved request only) and the `Expired` condition.
//!   It never adds, changes or removes an `Approved` or `Denied` condition and
//!   never touches `decidedBy`, `decidedAt` or `validUntil`.
//! - A status UPDATE by anyone else is a person's decision: the request must
//!   be Pending and not past `spec.expiresAt`; the update adds exactly one
//!   `Approved` or `Denied` condition with status `True` and changes nothing
//!   else; the user is not the agent's own ServiceAccount; and the authorizer
//!   allows the user the `approve` verb on the ToolPolicy whose rule asked
//!   (a SubjectAccessReview, as for signers of certificate signing requests).
//!   The admitted update gets a JSON patch that writes `decidedBy` from the
//!   request's user info (whatever the client wrote there), `decidedAt`,
//!   `validUntil` (approved only), `phase`, and the condition's
//!   `lastTransitionTime` and `observedGeneration`.
//!
//! A status update's checks read the old object's spec: the API server drops
//! spec changes sent to the status subresource only after admission, so the
//! new object's spec is whatever the client wrote.
//!
//! [`screen`] makes every check that needs no API call and says whether the
//! authorizer must be asked; [`access_review`] is that question and
//! [`admit_decision`] turns its answer into the patch. The shell that asks
//! the API server is [`super::approval_review`].

use chaperone_api::approval::{
    ApprovalPhase, ApprovalPolicyRef, CONDITION_APPROVED, CONDITION_DENIED, CONDITION_EXPIRED,
    ToolCallApprovalSpec,
};
use k8s_openapi::{
    api::{
        authentication::v1::UserInfo,
        authorization::v1::{
            ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
            SubjectAccessReviewStatus,
        },
    },
    jiff::{SignedDuration, Timestamp},
};
use serde_json::{Map, Value, json};

/// The webhook's path on the controller's HTTPS server.
pub const APPROVAL_PATH: &str = "/approve-toolcallapprovals";

/// The verb a user needs on the ToolPolicy (`toolpolicies.chaperone.dev`)
/// whose rule asked, to approve or deny one of its calls.
pub const APPROVE_VERB: &str = "approve";

/// Status fields the webhook writes for the person who decided; what a
/// client sends there is overwritten, and the controller never changes them.
const DECIDER_FIELDS: [&str; 3] = ["decidedBy", "decidedAt", "validUntil"];

/// The parts of a ToolCallApproval the webhook reads: its spec (typed) and its
/// status as sent (kept as JSON, so that a condition missing fields the
/// webhook fills in is still readable).
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalObject {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name` (`generateName` + `*` before the API server names it).
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The spec.
    pub spec: ToolCallApprovalSpec,
    status: Map<String, Value>,
}

impl ApprovalObject {
    /// Reads a ToolCallApproval from its JSON (`metadata`, `spec`, `status`);
    /// `namespace` is used where the object names none.
    pub fn from_json(object: &Value, namespace: Option<&str>) -> Result<Self, ApprovalRefusal> {
        let malformed = |what: String| ApprovalRefusal::Malformed { what };
        let metadata = &object["metadata"];
        let name = match (metadata["name"].as_str(), metadata["generateName"].as_str()) {
            (Some(name), _) if !name.is_empty() => name.to_owned(),
            (_, Some(prefix)) => format!("{prefix}*"),
            _ => String::new(),
        };
        let namespace = metadata["namespace"]
            .as_str()
            .filter(|ns| !ns.is_empty())
            .or(namespace)
            .unwrap_or_default()
            .to_owned();
        let spec = serde_json::from_value(object.get("spec").cloned().unwrap_or(Value::Null))
            .map_err(|e| malformed(format!("spec of {namespace}/{name}: {e}")))?;
        let status = match object.get("status") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(status)) => status.clone(),
            Some(_) => {
                return Err(malformed(format!(
                    "status of {namespace}/{name} is not an object"
                )));
            }
        };
        if let Some(conditions) = status.get("conditions")
            && !conditions.is_null()
            && !conditions
                .as_array()
                .is_some_and(|list| list.iter().all(|c| c["type"].is_string()))
        {
            return Err(malformed(format!(
                "status.conditions of {namespace}/{name} is not a list of conditions with a type"
            )));
        }
        Ok(Self {
            namespace,
            name,
            generation: metadata["generation"].as_i64(),
            spec,
            status,
        })
    }

    /// `status.conditions`, as sent.
    fn conditions(&self) -> &[Value] {
        self.status
            .get("conditions")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    fn condition(&self, type_: &str) -> Option<&Value> {
        self.conditions().iter().find(|c| c["type"] == type_)
    }

    /// `status.phase`, as sent.
    fn phase(&self) -> Option<&str> {
        self.status.get("phase").and_then(Value::as_str)
    }

    fn field(&self, name: &str) -> Option<&Value> {
        self.status.get(name).filter(|v| !v.is_null())
    }

    /// `ToolCallApproval <namespace>/<name>`, for messages.
    fn describe(&self) -> String {
        format!("ToolCallApproval {}/{}", self.namespace, self.name)
    }
}

/// The write under review.
#[derive(Clone, Copy, Debug)]
pub enum ApprovalWrite<'a> {
    /// A CREATE of `object`.
    Create {
        /// The object to create.
        object: &'a ApprovalObject,
    },
    /// An UPDATE of the status subresource from `old` to `new`.
    StatusUpdate {
        /// The stored object.
        old: &'a ApprovalObject,
        /// The object as the client sent it.
        new: &'a ApprovalObject,
    },
}

/// Approved or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionKind {
    /// An `Approved` condition.
    Approve,
    /// A `Denied` condition.
    Deny,
}

impl DecisionKind {
    /// The condition type that records it.
    pub fn condition_type(self) -> &'static str {
        match self {
            DecisionKind::Approve => CONDITION_APPROVED,
            DecisionKind::Deny => CONDITION_DENIED,
        }
    }

    /// The phase it leads to.
    pub fn phase(self) -> ApprovalPhase {
        match self {
            DecisionKind::Approve => ApprovalPhase::Approved,
            DecisionKind::Deny => ApprovalPhase::Denied,
        }
    }
}

/// A person's decision that passed every check but the authorizer's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersonDecision {
    /// Approve or deny.
    pub kind: DecisionKind,
    /// Where the new condition is in the new object's `status.conditions`.
    pub condition: usize,
    /// The ToolPolicy whose rule asked (from the stored spec).
    pub policy: ApprovalPolicyRef,
    /// `spec.validForSeconds` (stored).
    pub valid_for_seconds: u32,
    /// `metadata.generation` (stored).
    pub generation: Option<i64>,
    /// The object, for messages.
    pub object: String,
}

/// What [`screen`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Screened {
    /// The controller's own write: admitted unchanged.
    ControllerWrite,
    /// A person's decision, admitted if the authorizer allows it
    /// ([`access_review`], [`admit_decision`]).
    Decision(PersonDecision),
}

/// Why a write is refused; the message is the admission response's, so it
/// names the check, the user and the object (and the policy where it matters).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalRefusal {
    /// The admission request's object is unreadable.
    #[error("malformed ToolCallApproval in the admission request: {what}")]
    Malformed {
        /// What is wrong.
        what: String,
    },
    /// Someone other than the controller creates one.
    #[error(
        "only the Chaperone controller ({controller}) creates ToolCallApprovals; user {user:?} may not create {object} (approve or deny an existing one by updating its status)"
    )]
    CreateByOther {
        /// The user.
        user: String,
        /// The controller's username.
        controller: String,
        /// The object.
        object: String,
    },
    /// The controller's update adds, changes or removes a decision.
    #[error(
        "user {user:?} is the Chaperone controller, which never approves or denies: its status update of {object} may not add, change or remove an Approved or Denied condition"
    )]
    ControllerDecides {
        /// The user.
        user: String,
        /// The object.
        object: String,
    },
    /// The controller's update changes who decided.
    #[error(
        "user {user:?} is the Chaperone controller: its status update of {object} may not change status.{field}, which the admission webhook writes for the person who decided"
    )]
    ControllerChangesDecider {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// The field.
        field: &'static str,
    },
    /// The controller's update consumes a request nobody approved.
    #[error(
        "user {user:?} is the Chaperone controller: it may not set status.consumedAt of {object}, which nobody approved (or which was denied)"
    )]
    ConsumesUnapproved {
        /// The user.
        user: String,
        /// The object.
        object: String,
    },
    /// The request was decided (or expired) already.
    #[error(
        "user {user:?} may not approve or deny {object}: it is {standing} already, and only a Pending request can be decided"
    )]
    NotPending {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// Its phase or decided condition.
        standing: String,
    },
    /// Nobody decided in time.
    #[error(
        "user {user:?} may not approve or deny {object}: nobody decided it before spec.expiresAt ({expires_at}); a retry of the call asks again"
    )]
    PastExpiry {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// `spec.expiresAt`.
        expires_at: String,
    },
    /// The update is not a decision.
    #[error(
        "user {user:?}'s status update of {object} neither approves nor denies it: add one Approved or Denied condition with status True"
    )]
    NoDecision {
        /// The user.
        user: String,
        /// The object.
        object: String,
    },
    /// The update adds more than one condition.
    #[error(
        "user {user:?}'s status update of {object} adds {count} conditions: add exactly one, Approved or Denied"
    )]
    SeveralConditions {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// How many.
        count: usize,
    },
    /// The update adds a condition that is not a person's.
    #[error(
        "user {user:?} may not add a {type_:?} condition to {object}: a person adds Approved or Denied (Expired is the controller's)"
    )]
    NotADecision {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// The condition's type.
        type_: String,
    },
    /// The decision's condition is not `True`.
    #[error(
        "user {user:?}'s {type_} condition on {object} has status {status:?}: a decision is a condition with status \"True\""
    )]
    NotTrue {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// The condition's type.
        type_: String,
        /// Its status.
        status: String,
    },
    /// The update changes something besides adding the decision.
    #[error(
        "user {user:?} may only add an Approved or Denied condition to {object}; the update also changes status.{field}"
    )]
    OtherChange {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// What else it changes.
        field: String,
    },
    /// The agent decides its own call.
    #[error(
        "user {user:?} is the ServiceAccount of agent {agent:?}, whose call {object} is: an agent cannot approve or deny its own calls"
    )]
    OwnCall {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// The agent.
        agent: String,
    },
    /// The authorizer does not allow the user `approve` on the policy.
    #[error(
        "user {user:?} may not approve or deny {object}: deciding calls of ToolPolicy {ns}/{name} needs the \"approve\" verb on toolpolicies.chaperone.dev {name:?} in namespace {ns:?} (the chart's approver ClusterRole, bound with a RoleBinding there){reason}",
        ns = policy.namespace,
        name = policy.name
    )]
    NotAllowed {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// The policy.
        policy: ApprovalPolicyRef,
        /// `: <the authorizer's reason>`, or empty.
        reason: String,
    },
    /// The authorizer could not be asked.
    #[error(
        "could not check whether user {user:?} may approve or deny calls of ToolPolicy {policy} ({object}): {error}"
    )]
    AccessCheckFailed {
        /// The user.
        user: String,
        /// The object.
        object: String,
        /// `namespace/name` of the policy.
        policy: String,
        /// The error.
        error: String,
    },
}

impl ApprovalRefusal {
    /// The HTTP status and reason the API server answers the client with:
    /// 403 Forbidden for who may do what, 409 Conflict for a request decided
    /// or expired already, 422 Invalid for an update that is not one
    /// decision, 400 for an unreadable object, 500 when the authorizer could
    /// not be asked.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            ApprovalRefusal::CreateByOther { .. }
            | ApprovalRefusal::ControllerDecides { .. }
            | ApprovalRefusal::ControllerChangesDecider { .. }
            | ApprovalRefusal::ConsumesUnapproved { .. }
            | ApprovalRefusal::OwnCall { .. }
            | ApprovalRefusal::NotAllowed { .. } => (403, "Forbidden"),
            ApprovalRefusal::NotPending { .. } | ApprovalRefusal::PastExpiry { .. } => {
                (409, "Conflict")
            }
            ApprovalRefusal::NoDecision { .. }
            | ApprovalRefusal::SeveralConditions { .. }
            | ApprovalRefusal::NotADecision { .. }
            | ApprovalRefusal::NotTrue { .. }
            | ApprovalRefusal::OtherChange { .. } => (422, "Invalid"),
            ApprovalRefusal::Malformed { .. } => (400, "BadRequest"),
            ApprovalRefusal::AccessCheckFailed { .. } => (500, "InternalError"),
        }
    }
}

/// The authorizer's answer to an [`access_review`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessAnswer {
    /// Whether the user may.
    pub allowed: bool,
    /// The authorizer's reason and evaluation error, if any.
    pub reason: String,
}

impl From<SubjectAccessReviewStatus> for AccessAnswer {
    fn from(status: SubjectAccessReviewStatus) -> Self {
        let reason = [status.reason, status.evaluation_error]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            allowed: status.allowed && status.denied != Some(true),
            reason,
        }
    }
}

/// The username of a request's user info (empty when it names none).
pub fn username(user: &UserInfo) -> &str {
    user.username.as_deref().unwrap_or_default()
}

/// The username of ServiceAccount `name` in `namespace`.
pub fn service_account_username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// Checks `write` by `user` (`controller` is the controller's own username)
/// at `now`, everything but the authorizer: the controller's writes are
/// decided here, a person's decision needs [`access_review`] next.
pub fn screen(
    write: ApprovalWrite<'_>,
    user: &UserInfo,
    controller: &str,
    now: Timestamp,
) -> Result<Screened, ApprovalRefusal> {
    let who = username(user);
    // An unknown controller username matches nobody: every write is refused.
    let is_controller = !controller.is_empty() && who == controller;
    match write {
        ApprovalWrite::Create { .. } if is_controller => Ok(Screened::ControllerWrite),
        ApprovalWrite::Create { object } => Err(ApprovalRefusal::CreateByOther {
            user: who.to_owned(),
            controller: controller.to_owned(),
            object: object.describe(),
        }),
        ApprovalWrite::StatusUpdate { old, new } if is_controller => {
            screen_controller_update(old, new, who)?;
            Ok(Screened::ControllerWrite)
        }
        ApprovalWrite::StatusUpdate { old, new } => {
            screen_person_decision(old, new, who, now).map(Screened::Decision)
        }
    }
}

/// The controller's status update: bookkeeping only.
fn screen_controller_update(
    old: &ApprovalObject,
    new: &ApprovalObject,
    user: &str,
) -> Result<(), ApprovalRefusal> {
    let decisions = |object: &ApprovalObject| -> Vec<Condition> {
        object
            .conditions()
            .iter()
            .filter(|c| c["type"] == CONDITION_APPROVED || c["type"] == CONDITION_DENIED)
            .map(Condition::of)
            .collect()
    };
    if decisions(old) != decisions(new) {
        return Err(ApprovalRefusal::ControllerDecides {
            user: user.to_owned(),
            object: old.describe(),
        });
    }
    for field in DECIDER_FIELDS {
        if !same_field(field, old.field(field), new.field(field)) {
            return Err(ApprovalRefusal::ControllerChangesDecider {
                user: user.to_owned(),
                object: old.describe(),
                field,
            });
        }
    }
    let consumes =
        new.field("consumedAt").is_some() && new.field("consumedAt") != old.field("consumedAt");
    let approved =
        is_true(old.condition(CONDITION_APPROVED)) && old.condition(CONDITION_DENIED).is_none();
    if consumes && !approved {
        return Err(ApprovalRefusal::ConsumesUnapproved {
            user: user.to_owned(),
            object: old.describe(),
        });
    }
    Ok(())
}

/// A person's decision: everything but the authorizer.
fn screen_person_decision(
    old: &ApprovalObject,
    new: &ApprovalObject,
    user: &str,
    now: Timestamp,
) -> Result<PersonDecision, ApprovalRefusal> {
    let object = old.describe();
    let refuse_user = user.to_owned();

    // Only a Pending request can be decided.
    let decided = [CONDITION_APPROVED, CONDITION_DENIED, CONDITION_EXPIRED]
        .into_iter()
        .find(|type_| old.condition(type_).is_some());
    let phase = old
        .phase()
        .filter(|p| *p != ApprovalPhase::Pending.as_str());
    if let Some(standing) = decided.or(phase) {
        return Err(ApprovalRefusal::NotPending {
            user: refuse_user,
            object,
            standing: standing.to_owned(),
        });
    }
    let expires_at = &old.spec.expires_at;
    if expires_at.parse::<Timestamp>().map_or(true, |at| now >= at) {
        return Err(ApprovalRefusal::PastExpiry {
            user: refuse_user,
            object,
            expires_at: expires_at.clone(),
        });
    }

    // Exactly one new condition, Approved or Denied, status True; the old
    // conditions unchanged; nothing else changed.
    let mut added = Vec::new();
    for (index, condition) in new.conditions().iter().enumerate() {
        let type_ = condition["type"].as_str().unwrap_or_default();
        if new.conditions()[..index].iter().any(|c| c["type"] == type_) {
            return Err(ApprovalRefusal::OtherChange {
                user: refuse_user,
                object,
                field: format!("conditions (two of type {type_:?})"),
            });
        }
        match old.condition(type_) {
            Some(before) if Condition::of(before) == Condition::of(condition) => {}
            Some(_) => {
                return Err(ApprovalRefusal::OtherChange {
                    user: refuse_user,
                    object,
                    field: format!("conditions (the {type_} condition)"),
                });
            }
            None => added.push((index, type_, condition)),
        }
    }
    if let Some(gone) = old.conditions().iter().find(|c| {
        new.condition(c["type"].as_str().unwrap_or_default())
            .is_none()
    }) {
        return Err(ApprovalRefusal::OtherChange {
            user: refuse_user,
            object,
            field: format!("conditions (removes the {} condition)", gone["type"]),
        });
    }
    let (index, type_, condition) = match added.as_slice() {
        [] => {
            return Err(ApprovalRefusal::NoDecision {
                user: refuse_user,
                object,
            });
        }
        [one] => *one,
        several => {
            return Err(ApprovalRefusal::SeveralConditions {
                user: refuse_user,
                object,
                count: several.len(),
            });
        }
    };
    let kind = match type_ {
        CONDITION_APPROVED => DecisionKind::Approve,
        CONDITION_DENIED => DecisionKind::Deny,
        other => {
            return Err(ApprovalRefusal::NotADecision {
                user: refuse_user,
                object,
                type_: other.to_owned(),
            });
        }
    };
    if condition["status"] != "True" {
        return Err(ApprovalRefusal::NotTrue {
            user: refuse_user,
            object,
            type_: type_.to_owned(),
            status: condition["status"].as_str().unwrap_or_default().to_owned(),
        });
    }
    let owned = |key: &str| key == "conditions" || key == "phase" || DECIDER_FIELDS.contains(&key);
    let keys = old.status.keys().chain(new.status.keys());
    if let Some(field) = keys
        .filter(|key| !owned(key))
        .find(|key| old.field(key) != new.field(key))
    {
        return Err(ApprovalRefusal::OtherChange {
            user: refuse_user,
            object,
            field: field.clone(),
        });
    }

    // The agent never decides its own calls.
    if user == service_account_username(&old.namespace, &old.spec.service_account) {
        return Err(ApprovalRefusal::OwnCall {
            user: refuse_user,
            object,
            agent: format!("{}/{}", old.namespace, old.spec.agent),
        });
    }

    Ok(PersonDecision {
        kind,
        condition: index,
        policy: old.spec.policy.clone(),
        valid_for_seconds: old.spec.valid_for_seconds,
        generation: old.generation,
        object,
    })
}

/// The SubjectAccessReview that asks whether `user` (name, groups, uid and
/// extra as the API server authenticated them) may `approve` the ToolPolicy
/// of `decision`.
pub fn access_review(decision: &PersonDecision, user: &UserInfo) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(APPROVE_VERB.to_owned()),
                group: Some("chaperone.dev".to_owned()),
                resource: Some("toolpolicies".to_owned()),
                name: Some(decision.policy.name.clone()),
                namespace: Some(decision.policy.namespace.clone()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

/// Admits `decision` (found in `new` by [`screen`]) by `user` at `now` when
/// `access` allows it: the JSON patch writes `decidedBy` (from `user`),
/// `decidedAt`, `validUntil` (approved: `now` + `spec.validForSeconds`;
/// denied: none), `phase`, and the condition's `lastTransitionTime` (=
/// `decidedAt`), `observedGeneration`, and `reason` and `message` where
/// missing.
pub fn admit_decision(
    new: &ApprovalObject,
    decision: &PersonDecision,
    user: &UserInfo,
    access: &AccessAnswer,
    now: Timestamp,
) -> Result<json_patch::Patch, ApprovalRefusal> {
    let who = username(user);
    if !access.allowed {
        let policy = &decision.policy;
        return Err(ApprovalRefusal::NotAllowed {
            user: who.to_owned(),
            object: decision.object.clone(),
            policy: policy.clone(),
            reason: if access.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", access.reason)
            },
        });
    }
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let decided_at = now.to_string();
    let mut decider = json!({ "username": who });
    if let Some(groups) = user.groups.as_ref().filter(|g| !g.is_empty()) {
        decider["groups"] = json!(groups);
    }
    let mut ops = vec![
        json!({"op": "add", "path": "/status/decidedBy", "value": decider}),
        json!({"op": "add", "path": "/status/decidedAt", "value": decided_at}),
    ];
    match decision.kind {
        DecisionKind::Approve => {
            let until = now + SignedDuration::from_secs(i64::from(decision.valid_for_seconds));
            ops.push(
                json!({"op": "add", "path": "/status/validUntil", "value": until.to_string()}),
            );
        }
        DecisionKind::Deny if new.field("validUntil").is_some() => {
            ops.push(json!({"op": "remove", "path": "/status/validUntil"}));
        }
        DecisionKind::Deny => {}
    }
    ops.push(
        json!({"op": "add", "path": "/status/phase", "value": decision.kind.phase().as_str()}),
    );
    let at = format!("/status/conditions/{}", decision.condition);
    let condition = &new.conditions()[decision.condition];
    ops.push(json!({"op": "add", "path": format!("{at}/lastTransitionTime"), "value": decided_at}));
    match decision.generation {
        Some(generation) => ops.push(
            json!({"op": "add", "path": format!("{at}/observedGeneration"), "value": generation}),
        ),
        None if condition.get("observedGeneration").is_some() => {
            ops.push(json!({"op": "remove", "path": format!("{at}/observedGeneration")}));
        }
        None => {}
    }
    if condition["reason"].as_str().is_none_or(str::is_empty) {
        ops.push(json!({"op": "add", "path": format!("{at}/reason"), "value": decision.kind.condition_type()}));
    }
    if !condition["message"].is_string() {
        ops.push(json!({"op": "add", "path": format!("{at}/message"), "value": ""}));
    }
    serde_json::from_value(Value::Array(ops)).map_err(|e| ApprovalRefusal::Malformed {
        what: format!("building the patch: {e}"),
    })
}

fn is_true(condition: Option<&Value>) -> bool {
    condition.is_some_and(|c| c["status"] == "True")
}

/// A condition as compared: type, status, reason, message (missing = empty),
/// observedGeneration, and lastTransitionTime to the second (so that a value
/// written back after a round trip through a typed client compares equal).
#[derive(Debug, PartialEq, Eq)]
struct Condition {
    type_: Value,
    status: Value,
    reason: String,
    message: String,
    observed_generation: Option<i64>,
    last_transition: Moment,
}

#[derive(Debug, PartialEq, Eq)]
enum Moment {
    Second(i64),
    Text(Value),
}

impl Moment {
    fn of(value: Option<&Value>) -> Self {
        match value.and_then(Value::as_str).map(str::parse::<Timestamp>) {
            Some(Ok(at)) => Moment::Second(at.as_second()),
            _ => Moment::Text(value.cloned().unwrap_or(Value::Null)),
        }
    }
}

impl Condition {
    fn of(condition: &Value) -> Self {
        let text = |key: &str| condition[key].as_str().unwrap_or_default().to_owned();
        Self {
            type_: condition["type"].clone(),
            status: condition["status"].clone(),
            reason: text("reason"),
            message: text("message"),
            observed_generation: condition["observedGeneration"].as_i64(),
            last_transition: Moment::of(condition.get("lastTransitionTime")),
        }
    }
}

/// Whether a decider field is unchanged: `decidedBy` as a decider (an empty
/// `groups` list is the same as none), the times to the second.
fn same_field(field: &str, old: Option<&Value>, new: Option<&Value>) -> bool {
    match (field, old, new) {
        (_, None, None) => true,
        ("decidedBy", Some(old), Some(new)) => {
            let decider = |v: &Value| {
                let groups = v["groups"].as_array().cloned().unwrap_or_default();
                (v["username"].clone(), groups)
            };
            decider(old) == decider(new)
        }
        (_, Some(old), Some(new)) => Moment::of(Some(old)) == Moment::of(Some(new)),
        _ => false,
    }
}

#[cfg(test)]
#[path = "approval_tests.rs"]
mod tests;
