//! Who is on the other end of a snapshot stream: the pod's projected
//! ServiceAccount token, checked by the API server's TokenReview, mapped to the
//! pod (bound name and uid) and then either to the AgentIdentity whose selector
//! matches it (an agent sidecar) or, for a pod annotated
//! `chaperone.dev/inject: "tool"`, to a tool sidecar that has no AgentIdentity.

use std::{collections::BTreeMap, sync::Arc};

use chaperone_api::AgentIdentity;
use chaperone_policy::{AgentKey, ObjectKey};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams, runtime::reflector::Store};

use crate::pod_selection::inject_annotation;

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

/// An authenticated tool sidecar: a pod annotated `chaperone.dev/inject: "tool"`,
/// in front of a tool server. It verifies other sidecars' assertions, so it gets
/// the live sidecars' keys; it is no agent, signs nothing and gets no snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolSidecarIdentity {
    /// Namespace of the pod.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod uid (the token is bound to it).
    pub pod_uid: String,
    /// The pod's ServiceAccount.
    pub service_account: String,
}

/// Who an authenticated stream belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An agent's sidecar: gets its AgentIdentity's snapshots.
    Agent(SidecarIdentity),
    /// A tool-mode sidecar: gets the key set only.
    Tool(ToolSidecarIdentity),
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

/// Reviews `token` and resolves it to a pod, then to the pod's role
/// ([`peer_of_pod`]) with the controller's AgentIdentity cache `identities`.
pub async fn authenticate(
    client: &Client,
    identities: &Store<AgentIdentity>,
    token: &str,
) -> Result<Peer, AuthError> {
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
    let bound = BoundPod {
        namespace,
        pod,
        pod_uid: uid,
        service_account,
    };
    peer_of_pod(bound, &pod_object, &identities.state())
}

/// The pod a token is bound to, as TokenReview reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod uid.
    pub pod_uid: String,
    /// ServiceAccount.
    pub service_account: String,
}

/// What the stream of the (existing) pod `object`, to which the token is bound,
/// is for: a pod annotated `chaperone.dev/inject: "tool"` is a tool sidecar (even
/// if an AgentIdentity's selector also matches it: it was injected in tool mode
/// and signs nothing); any other pod is the agent of the first (by name)
/// AgentIdentity of its namespace that selects it, or is refused. Pure.
pub fn peer_of_pod(
    bound: BoundPod,
    object: &Pod,
    identities: &[Arc<AgentIdentity>],
) -> Result<Peer, AuthError> {
    let BoundPod {
        namespace,
        pod,
        pod_uid,
        service_account,
    } = bound;
    if is_tool_pod(object.metadata.annotations.as_ref()) {
        return Ok(Peer::Tool(ToolSidecarIdentity {
            namespace,
            pod,
            pod_uid,
            service_account,
        }));
    }
    let labels = object.metadata.labels.clone().unwrap_or_default();
    let agent = identities
        .iter()
        .filter(|identity| identity.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .filter(|identity| identity.spec.0.selector.selects(&service_account, &labels))
        .filter_map(|identity| identity.metadata.name.clone())
        .min()
        .ok_or_else(|| AuthError::NoAgentIdentity {
            namespace: namespace.clone(),
            pod: pod.clone(),
            service_account: service_account.clone(),
        })?;
    Ok(Peer::Agent(SidecarIdentity {
        agent: ObjectKey::new(namespace, agent),
        pod,
        pod_uid,
        service_account,
    }))
}

/// Whether a pod's annotations ask for a tool-mode sidecar (the webhook's
/// reading of `chaperone.dev/inject`: trimmed, case-insensitive).
fn is_tool_pod(annotations: Option<&BTreeMap<String, String>>) -> bool {
    inject_annotation(annotations).as_deref() == Some("tool")
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

    fn bound(pod: &str, service_account: &str) -> BoundPod {
        BoundPod {
            namespace: "ns".into(),
            pod: pod.into(),
            pod_uid: format!("uid-{pod}"),
            service_account: service_account.into(),
        }
    }

    fn pod_object(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ns", "annotations": annotations },
        }))
        .unwrap()
    }

    fn identity(name: &str, service_account: &str) -> Arc<AgentIdentity> {
        use chaperone_api::{AgentIdentitySpecV1, model};
        let mut identity = AgentIdentity::new(
            name,
            AgentIdentitySpecV1(model::AgentIdentitySpec {
                selector: model::AgentSelector {
                    service_account_name: service_account.into(),
                    ..Default::default()
                },
                ..Default::default()
            }),
        );
        identity.metadata.namespace = Some("ns".into());
        Arc::new(identity)
    }

    #[test]
    fn a_tool_pod_is_a_tool_sidecar_without_an_agent_identity() {
        let peer = peer_of_pod(
            bound("mcp-0", "orders-mcp"),
            &pod_object(serde_json::json!({ "chaperone.dev/inject": " Tool " })),
            &[],
        )
        .unwrap();
        assert_eq!(
            peer,
            Peer::Tool(ToolSidecarIdentity {
                namespace: "ns".into(),
                pod: "mcp-0".into(),
                pod_uid: "uid-mcp-0".into(),
                service_account: "orders-mcp".into(),
            })
        );
    }

    #[test]
    fn a_tool_pod_stays_a_tool_sidecar_when_an_agent_identity_selects_it() {
        let peer = peer_of_pod(
            bound("mcp-0", "shared"),
            &pod_object(serde_json::json!({ "chaperone.dev/inject": "tool" })),
            &[identity("planner", "shared")],
        )
        .unwrap();
        assert!(matches!(peer, Peer::Tool(_)), "{peer:?}");
    }

    #[test]
    fn an_agent_pod_maps_to_the_first_selecting_agent_identity_or_is_refused() {
        let agent_pod = pod_object(serde_json::json!({ "chaperone.dev/inject": "true" }));
        let identities = [
            identity("worker", "planner"),
            identity("planner", "planner"),
        ];
        let Ok(Peer::Agent(agent)) = peer_of_pod(bound("p-0", "planner"), &agent_pod, &identities)
        else {
            panic!("not an agent")
        };
        assert_eq!(agent.agent, ObjectKey::new("ns", "planner"));
        let refused = peer_of_pod(bound("s-0", "stranger"), &agent_pod, &identities);
        assert!(
            matches!(refused, Err(AuthError::NoAgentIdentity { .. })),
            "{refused:?}"
        );
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
