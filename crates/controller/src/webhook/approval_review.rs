//! The approval webhook's shell: an AdmissionRequest for a ToolCallApproval
//! in, [`approval::screen`], a SubjectAccessReview when a person decides
//! ([`approval::access_review`], [`approval::admit_decision`]), an
//! AdmissionResponse out. Also learns the controller's own username when no
//! flag names it ([`own_username`]).

use k8s_openapi::{
    api::{authentication::v1::SelfSubjectReview, authorization::v1::SubjectAccessReview},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, PostParams},
    core::admission::{AdmissionRequest, AdmissionResponse, Operation},
};

use super::approval::{
    self, AccessAnswer, ApprovalObject, ApprovalRefusal, ApprovalWrite, Screened,
};

/// Reviews writes of ToolCallApprovals: the controller's own username (the
/// only one that creates them) and a client for SubjectAccessReviews.
pub struct ApprovalAdmission {
    client: Client,
    controller_username: String,
}

impl ApprovalAdmission {
    /// Admission for a controller authenticated as `controller_username`,
    /// asking the authorizer with `client`.
    pub fn new(client: Client, controller_username: impl Into<String>) -> Self {
        Self {
            client,
            controller_username: controller_username.into(),
        }
    }

    /// The username whose writes are the controller's.
    pub fn controller_username(&self) -> &str {
        &self.controller_username
    }

    /// Answers one admission request. A request for anything but a CREATE of
    /// a ToolCallApproval or an UPDATE of its status is admitted unchanged
    /// (the webhook configuration sends none).
    pub async fn review(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let response = AdmissionResponse::from(request);
        if request.kind.group != "chaperone.dev" || request.kind.kind != "ToolCallApproval" {
            return response;
        }
        let status_update = match (request.operation.clone(), request.sub_resource.as_deref()) {
            (Operation::Create, None) => false,
            (Operation::Update, Some("status")) => true,
            _ => return response,
        };
        let user = &request.user_info;
        match self.decide(request, status_update, Timestamp::now()).await {
            Ok(None) => response,
            Ok(Some(patch)) => match response.clone().with_patch(patch) {
                Ok(patched) => patched,
                Err(e) => response.deny(format!("chaperone approval webhook: {e}")),
            },
            Err(refusal) => {
                tracing::info!(
                    user = approval::username(user),
                    namespace = request.namespace.as_deref().unwrap_or_default(),
                    name = %request.name,
                    reason = %refusal,
                    "approval write refused"
                );
                let (code, reason) = refusal.status();
                let mut response = response.deny(refusal.to_string());
                response.result.code = code;
                response.result.reason = reason.to_owned();
                response
            }
        }
    }

    /// The patch to admit `request` with (`None`: unchanged), or why not.
    async fn decide(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        status_update: bool,
        now: Timestamp,
    ) -> Result<Option<json_patch::Patch>, ApprovalRefusal> {
        let user = &request.user_info;
        let read = |object: Option<&DynamicObject>, which: &str| {
            let object = object.ok_or_else(|| ApprovalRefusal::Malformed {
                what: format!("the request carries no {which}"),
            })?;
            let json = serde_json::to_value(object).map_err(|e| ApprovalRefusal::Malformed {
                what: e.to_string(),
            })?;
            ApprovalObject::from_json(&json, request.namespace.as_deref())
        };
        let new = read(request.object.as_ref(), "object")?;
        let old = if status_update {
            Some(read(request.old_object.as_ref(), "oldObject")?)
        } else {
            None
        };
        let write = match &old {
            Some(old) => ApprovalWrite::StatusUpdate { old, new: &new },
            None => ApprovalWrite::Create { object: &new },
        };
        match approval::screen(write, user, &self.controller_username, now)? {
            Screened::ControllerWrite => Ok(None),
            Screened::Decision(decision) => {
                let access = self.ask(&decision, user).await?;
                let patch = approval::admit_decision(&new, &decision, user, &access, now)?;
                tracing::info!(
                    approval = %decision.object,
                    decision = decision.kind.condition_type(),
                    user = approval::username(user),
                    policy = %format!("{}/{}", decision.policy.namespace, decision.policy.name),
                    "a person decided a tool call"
                );
                Ok(Some(patch))
            }
        }
    }

    /// Asks the API server whether `user` may `approve` the decision's
    /// policy.
    async fn ask(
        &self,
        decision: &approval::PersonDecision,
        user: &k8s_openapi::api::authentication::v1::UserInfo,
    ) -> Result<AccessAnswer, ApprovalRefusal> {
        let review = approval::access_review(decision, user);
        let answered = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApprovalRefusal::AccessCheckFailed {
                user: approval::username(user).to_owned(),
                object: decision.object.clone(),
                policy: format!("{}/{}", decision.policy.namespace, decision.policy.name),
                error: e.to_string(),
            })?;
        Ok(answered.status.map(AccessAnswer::from).unwrap_or_default())
    }
}

/// The username `client` authenticates as, from a SelfSubjectReview (for a
/// controller whose ServiceAccount no flag names: a local run, a test).
pub async fn own_username(client: &Client) -> Result<String, kube::Error> {
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    Ok(review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default())
}
