//! Who is on the other end of a snapshot stream: the pod's projected
//! ServiceAccount token, checked by the API server's TokenReview, mapped to the
//! pod (bound name and uid) and to the AgentIdentity whose selector matches it.

use chaperone_api::AgentIdentity;
use chaperone_policy::{AgentKey, ObjectKey};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams, runtime::reflector::Store};

/// The audience sidecar tokens must be minted for.
pub const TOKEN_AUDIENCE: &str = "chaperone";

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// An authenticated sidecar: its pod and the agent it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarIdentity {
    /// The AgentIdentity (namespace/name) the pod matches.
    pub agent: AgentKey,
    /// Pod name.
    pub pod: String,
    /// Pod uid (the token is bound to it).
    pub pod_uid: String,
    /// The pod's ServiceAccount.
    pub service_account: String,
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer …` metadata.
    #[error(
        "missing bearer token: send the pod's projected ServiceAccount token (audience {TOKEN_AUDIENCE})"
    )]
    MissingToken,
    /// The API server rejected the token.
    #[error("token rejected by TokenReview: {0}")]
    Rejected(String),
    /// The token is valid but not for our audience.
    #[error("token audience is not {TOKEN_AUDIENCE}")]
    WrongAudience,
    /// The token is not a pod-bound ServiceAccount token.
    #[error("token is not bound to a pod (user {0}); mount a projected ServiceAccount token")]
    NotPodBound(String),
    /// The bound pod does not exist (any more), or is a different pod.
    #[error("pod {namespace}/{pod} (uid {uid}) does not exist")]
    PodGone {
        /// Namespace.
        namespace: String,
        /// Pod name.
        pod: String,
        /// uid from the token.
        uid: String,
    },
    /// No AgentIdentity selects the pod.
    #[error(
        "no AgentIdentity in namespace {namespace} selects pod {pod} (serviceAccount {service_account}); create one with spec.selector.serviceAccountName: {service_account}"
    )]
    NoAgentIdentity {
        /// Namespace.
        namespace: String,
        /// Pod name.
        pod: String,
        /// The pod's ServiceAccount.
        service_account: String,
    },
    /// The API server could not be asked.
    #[error("checking the token failed: {0}")]
    Kube(#[from] kube::Error),
}

impl AuthError {
    /// Whether the caller's credentials are at fault (`UNAUTHENTICATED`), or the
    /// cluster's state (`FAILED_PRECONDITION`) or an outage (`UNAVAILABLE`).
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            AuthError::MissingToken
            | AuthError::Rejected(_)
            | AuthError::WrongAudience
            | AuthError::NotPodBound(_)
            | AuthError::PodGone { .. } => tonic::Code::Unauthenticated,
            AuthError::NoAgentIdentity { .. } => tonic::Code::FailedPrecondition,
            AuthError::Kube(_) => tonic::Code::Unavailable,
        }
    }
}

/// Extracts the token from `authorization: Bearer <token>`.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, AuthError> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::MissingToken)
}

/// Reviews `token` and resolves it to a pod and its AgentIdentity (read from the
/// controller's AgentIdentity cache `identities`).
pub async fn authenticate(
    client: &Client,
    identities: &Store<AgentIdentity>,
    token: &str,
) -> Result<SidecarIdentity, AuthError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
        },
        ..Default::default()
    };
    let review = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = review.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(AuthError::Rejected(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == TOKEN_AUDIENCE)
    {
        return Err(AuthError::WrongAudience);
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let (Some((namespace, service_account)), Some(pod), Some(uid)) = (
        parse_service_account(&username),
        first(POD_NAME_EXTRA),
        first(POD_UID_EXTRA),
    ) else {
        return Err(AuthError::NotPodBound(username));
    };

    let pod_object = Api::<Pod>::namespaced(client.clone(), &namespace)
        .get_opt(&pod)
        .await?;
    let Some(pod_object) = pod_object.filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
    else {
        return Err(AuthError::PodGone {
            namespace,
            pod,
            uid,
        });
    };
    let labels = pod_object.metadata.labels.clone().unwrap_or_default();
    let agent = identities
        .state()
        .iter()
        .filter(|identity| identity.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .filter(|identity| crate::webhook::mutate::selects(identity, &service_account, &labels))
        .filter_map(|identity| identity.metadata.name.clone())
        .min()
        .ok_or_else(|| AuthError::NoAgentIdentity {
            namespace: namespace.clone(),
            pod: pod.clone(),
            service_account: service_account.clone(),
        })?;
    Ok(SidecarIdentity {
        agent: ObjectKey::new(namespace, agent),
        pod,
        pod_uid: uid,
        service_account,
    })
}

/// `system:serviceaccount:<namespace>:<name>` → (namespace, name).
pub fn parse_service_account(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty()).then(|| (namespace.to_owned(), name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_account_usernames() {
        assert_eq!(
            parse_service_account("system:serviceaccount:ns:planner"),
            Some(("ns".into(), "planner".into()))
        );
        assert_eq!(parse_service_account("system:serviceaccount:ns"), None);
        assert_eq!(parse_service_account("alice"), None);
        assert_eq!(parse_service_account("system:serviceaccount::x"), None);
    }

    #[test]
    fn bearer_token_needs_the_scheme() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert!(matches!(bearer_token(&md), Err(AuthError::MissingToken)));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer_token(&md).is_err());
        md.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&md).unwrap(), "abc");
    }
}
