//! Model objects the controller's unit tests build (test builds only).

use chaperone_policy::model::{
    API_VERSION, AgentIdentitySpec, AgentRef, AgentSelector, DelegationGrantSpec,
    NamespacedAgentRef, Object, ObjectMeta, ToolMatch, ToolServer,
};

/// Metadata of `ns/name` at generation 1.
pub fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: Some(ns.into()),
        generation: Some(1),
        ..Default::default()
    }
}

/// AgentIdentity `ns/name` selecting ServiceAccount `name`, with one tool
/// server `orders`.
pub fn identity(ns: &str, name: &str) -> Object<AgentIdentitySpec> {
    Object {
        api_version: API_VERSION.into(),
        metadata: meta(ns, name),
        spec: AgentIdentitySpec {
            selector: AgentSelector {
                service_account_name: name.into(),
                ..Default::default()
            },
            tool_servers: vec![ToolServer {
                name: "orders".into(),
                url: "http://o".into(),
                audience: None,
                agent: None,
                tool_pinning: Default::default(),
                upstream_secret: None,
            }],
            ..Default::default()
        },
    }
}

/// DelegationGrant `ns/name` from `from` to `to` (in `to_ns`, or the grant's
/// own namespace when `None`) of every tool, expiring in 2030.
pub fn grant(
    ns: &str,
    name: &str,
    from: &str,
    to_ns: Option<&str>,
    to: &str,
) -> Object<DelegationGrantSpec> {
    Object {
        api_version: API_VERSION.into(),
        metadata: meta(ns, name),
        spec: DelegationGrantSpec {
            from: AgentRef { name: from.into() },
            to: NamespacedAgentRef {
                name: to.into(),
                namespace: to_ns.map(Into::into),
            },
            tools: vec![ToolMatch {
                server: "*".into(),
                name: Some("*".into()),
                effect: None,
            }],
            expires_at: Some("2030-01-01T00:00:00Z".into()),
            ..Default::default()
        },
    }
}
