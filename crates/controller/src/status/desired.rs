//! The status every Chaperone object should have, computed without I/O from
//! the index, the connected sidecars and the time: conditions and fields of
//! AgentIdentities (snapshot served, sidecars in sync, tools seen and their
//! definitions against their pins), ToolPolicies
//! (rules compiled, agents targeted) and DelegationGrants (active, expired),
//! and which objects a change can affect.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
};

use chaperone_api::{AgentIdentityStatus, DelegationGrantStatus, OutOfSyncPod, ToolPolicyStatus};
use chaperone_policy::{
    AgentKey, CompileError, CompileErrorReason, Engine, ObjectKey, ObjectKind, ObjectRef,
    model::{AgentIdentitySpec, DelegationGrantSpec, Object, ToolPolicySpec},
};
use serde_json::{Value, json};

use crate::{
    index::{Index, grant_namespaces, key_of},
    sidecars::SidecarState,
    tool_definitions::{AgentTools, KnownDefinitions, agent_tools, pinned_condition},
};

/// A condition without its transition time (filled in when written).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConditionSpec {
    /// `Ready`, `Expired`, …
    pub type_: &'static str,
    /// `True` or `False`.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What a human needs to know.
    pub message: String,
}

/// The status an object should have.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredStatus {
    /// The object.
    pub object: ObjectRef,
    /// Its `metadata.generation`.
    pub generation: Option<i64>,
    /// Its conditions.
    pub conditions: Vec<ConditionSpec>,
    /// The other status fields (JSON, camelCase), without conditions.
    pub fields: Value,
    /// Of an AgentIdentity: its discovered tools and what pinning makes of
    /// them (the definitions' Events, ConfigMap and metric).
    pub tools: Option<AgentTools>,
}

/// How many pods `outOfSyncPods` lists at most: the count of all of them is
/// `sidecarsConnected - sidecarsInSync`, and a list of a thousand pods would
/// make every status write of a large agent a large one.
pub const OUT_OF_SYNC_PODS_LISTED: usize = 20;

impl DesiredStatus {
    /// A hash of everything written: two statuses with the same fingerprint
    /// need no second patch.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        self.object.hash(&mut hasher);
        self.generation.hash(&mut hasher);
        self.conditions.hash(&mut hasher);
        self.fields.to_string().hash(&mut hasher);
        // A definition's text arriving changes the ConfigMap, not the status.
        if let Some(tools) = &self.tools {
            tools.texts.keys().for_each(|hash| hash.hash(&mut hasher));
        }
        hasher.finish()
    }
}

/// Every object of the index, for a pass that checks them all.
pub fn all_objects(index: &Index) -> BTreeSet<ObjectRef> {
    let objects = index.objects();
    let refs =
        |kind, keys: Vec<ObjectKey>| keys.into_iter().map(move |key| ObjectRef { kind, key });
    refs(
        ObjectKind::AgentIdentity,
        objects.identities.iter().map(key_of).collect(),
    )
    .chain(refs(
        ObjectKind::ToolPolicy,
        objects.policies.iter().map(key_of).collect(),
    ))
    .chain(refs(
        ObjectKind::DelegationGrant,
        objects.grants.iter().map(key_of).collect(),
    ))
    .collect()
}

/// The objects whose status may read what changed: everything in
/// `namespaces` (from [`Index::take_status_dirty`]), the grants that point
/// into them, and the AgentIdentities of `agents` (whose sidecars changed).
pub fn objects_to_check(
    index: &Index,
    namespaces: &BTreeSet<String>,
    agents: &BTreeSet<AgentKey>,
) -> BTreeSet<ObjectRef> {
    let objects = index.objects();
    let in_dirty = |ns: &str| namespaces.contains(ns);
    let mut out: BTreeSet<ObjectRef> = agents
        .iter()
        .map(|agent| ObjectRef {
            kind: ObjectKind::AgentIdentity,
            key: agent.clone(),
        })
        .collect();
    if namespaces.is_empty() {
        return out;
    }
    /// The objects of `kind` in `list` for which `dirty` holds.
    fn dirty_refs<'a, S>(
        kind: ObjectKind,
        list: &'a [Object<S>],
        dirty: impl Fn(&Object<S>) -> bool + 'a,
    ) -> impl Iterator<Item = ObjectRef> + 'a {
        list.iter()
            .filter(move |o| dirty(o))
            .map(move |o| ObjectRef {
                kind,
                key: key_of(o),
            })
    }
    out.extend(dirty_refs(
        ObjectKind::AgentIdentity,
        &objects.identities,
        |o| in_dirty(o.metadata.namespace_or_default()),
    ));
    out.extend(dirty_refs(ObjectKind::ToolPolicy, &objects.policies, |o| {
        in_dirty(o.metadata.namespace_or_default())
    }));
    out.extend(dirty_refs(
        ObjectKind::DelegationGrant,
        &objects.grants,
        |o| grant_namespaces(o).iter().any(|ns| in_dirty(ns)),
    ));
    out
}

/// Computes the statuses of `objects`; `None` for an object the index no
/// longer has. Pure: the index, the sidecars of the AgentIdentities among
/// `objects` ([`crate::sidecars::SidecarRegistry::of_agents`]), what their
/// statuses said of their tools' definitions (`definitions`; an agent missing
/// from it is taken to have said nothing) and the time in, statuses out.
pub fn desired_statuses(
    index: &Index,
    sidecars: &BTreeMap<AgentKey, Vec<(String, SidecarState)>>,
    definitions: &BTreeMap<AgentKey, KnownDefinitions>,
    objects: &[ObjectRef],
    now: i64,
) -> Vec<(ObjectRef, Option<DesiredStatus>)> {
    let identities = &index.objects().identities;
    // Built once for all the policies and grants among `objects`.
    let mut by_namespace: BTreeMap<&str, Vec<&Object<AgentIdentitySpec>>> = BTreeMap::new();
    let mut known: BTreeSet<AgentKey> = BTreeSet::new();
    if objects.iter().any(|o| o.kind != ObjectKind::AgentIdentity) {
        for identity in identities {
            by_namespace
                .entry(identity.metadata.namespace_or_default())
                .or_default()
                .push(identity);
            known.insert(key_of(identity));
        }
    }
    objects
        .iter()
        .map(|object| {
            let key = &object.key;
            let status = match object.kind {
                ObjectKind::AgentIdentity => index.identity(key).map(|identity| {
                    let connected = sidecars.get(key).map(Vec::as_slice).unwrap_or_default();
                    let nothing = KnownDefinitions::new();
                    let known = definitions.get(key).unwrap_or(&nothing);
                    identity_status(index, identity, connected, known, now)
                }),
                ObjectKind::ToolPolicy => index.policy(key).map(|policy| {
                    let candidates = by_namespace
                        .get(key.namespace.as_str())
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    policy_status(index, policy, candidates)
                }),
                ObjectKind::DelegationGrant => index
                    .grant(key)
                    .map(|grant| grant_status(grant, &known, now)),
            };
            (object.clone(), status)
        })
        .collect()
}

fn identity_status(
    index: &Index,
    identity: &Object<AgentIdentitySpec>,
    connected: &[(String, SidecarState)],
    known: &KnownDefinitions,
    now: i64,
) -> DesiredStatus {
    let key = key_of(identity);
    let snapshot = index.snapshot(&key);
    let mut status = AgentIdentityStatus::default();
    let mut conditions = Vec::new();
    match &snapshot {
        Some(s) => {
            status.snapshot_version = i64::try_from(s.version).ok();
            status.snapshot_hash = Some(s.hash.clone());
            let (rules, policies) = (s.rules, s.policies);
            conditions.push(ConditionSpec {
                type_: "Ready",
                status: true,
                reason: "SnapshotServed",
                message: format!(
                    "snapshot v{} serves {rules} rules from {} policies",
                    s.version, policies
                ),
            });
        }
        None => conditions.push(ConditionSpec {
            type_: "Ready",
            status: false,
            reason: "NotCompiled",
            message: "no snapshot compiled yet".into(),
        }),
    }
    let errors = index.agent_errors(&key);
    conditions.push(if errors.is_empty() {
        ConditionSpec {
            type_: "PoliciesValid",
            status: true,
            reason: "AllCompiled",
            message: "every policy and grant of this agent compiled".into(),
        }
    } else {
        ConditionSpec {
            type_: "PoliciesValid",
            status: false,
            reason: "ObjectsLeftOut",
            message: describe_errors(errors),
        }
    });

    let current_hash = snapshot.as_ref().map(|s| s.hash.as_str());
    status.sidecars_connected = connected.len() as i32;
    for (pod, state) in connected {
        let in_sync = state
            .acked
            .as_ref()
            .is_some_and(|(_, h)| Some(h.as_str()) == current_hash);
        if in_sync {
            status.sidecars_in_sync += 1;
        } else if status.out_of_sync_pods.len() < OUT_OF_SYNC_PODS_LISTED {
            status.out_of_sync_pods.push(OutOfSyncPod {
                name: pod.clone(),
                acked_version: state
                    .acked
                    .as_ref()
                    .and_then(|(v, _)| i64::try_from(*v).ok()),
                error: state
                    .rejected
                    .as_ref()
                    .map(|(v, e)| format!("rejected v{v}: {e}")),
            });
        }
    }
    let any_tools = connected.iter().any(|(_, s)| !s.inventory.is_empty());
    // The rules and pins are needed here only: decoded from the published
    // bytes, and only for an agent whose sidecars saw tools.
    let engine = snapshot
        .as_ref()
        .filter(|_| any_tools)
        .and_then(|s| s.decode().ok())
        .and_then(|s| Engine::new(&s).ok());
    let tools = agent_tools(connected, engine.as_ref(), known, now);
    let modes = identity.spec.tool_servers.iter().map(|s| s.tool_pinning);
    conditions.push(pinned_condition(&tools, modes));
    if !tools.tools.is_empty() {
        status.discovered_tools = tools.tools.clone();
        status.governed_tool_count = Some(
            status
                .discovered_tools
                .iter()
                .filter(|t| t.governed)
                .count() as i32,
        );
    }
    DesiredStatus {
        object: ObjectRef {
            kind: ObjectKind::AgentIdentity,
            key,
        },
        generation: identity.metadata.generation,
        conditions,
        fields: to_fields(&status),
        tools: Some(tools),
    }
}

/// `same_namespace`: the AgentIdentities of the policy's namespace.
pub(super) fn policy_status(
    index: &Index,
    policy: &Object<ToolPolicySpec>,
    same_namespace: &[&Object<AgentIdentitySpec>],
) -> DesiredStatus {
    let object = ObjectRef {
        kind: ObjectKind::ToolPolicy,
        key: key_of(policy),
    };
    let errors = index.errors_of(&object);
    let status = ToolPolicyStatus {
        rule_count: Some(policy.spec.rules.len() as i32),
        target_agent_count: Some(target_count(policy, same_namespace) as i32),
        ..Default::default()
    };
    let ready = if errors.is_empty() {
        ConditionSpec {
            type_: "Ready",
            status: true,
            reason: "Compiled",
            message: format!("{} rules compiled", policy.spec.rules.len()),
        }
    } else {
        ConditionSpec {
            type_: "Ready",
            status: false,
            reason: "RuleInvalid",
            message: describe_errors(errors),
        }
    };
    DesiredStatus {
        object,
        generation: policy.metadata.generation,
        conditions: vec![ready],
        fields: to_fields(&status),
        tools: None,
    }
}

/// `known`: the keys of every AgentIdentity.
fn grant_status(
    grant: &Object<DelegationGrantSpec>,
    known: &BTreeSet<AgentKey>,
    now: i64,
) -> DesiredStatus {
    let expires_at = chaperone_policy::grant_expires_at(&grant.spec, &grant.metadata, now).ok();
    let status = DelegationGrantStatus {
        expires_at: expires_at.map(rfc3339),
        ..Default::default()
    };
    let conditions = match chaperone_policy::check_grant_among(grant, known, now) {
        Ok(at) => vec![
            ConditionSpec {
                type_: "Ready",
                status: true,
                reason: "Active",
                message: format!("active until {}", rfc3339(at)),
            },
            ConditionSpec {
                type_: "Expired",
                status: false,
                reason: "Active",
                message: String::new(),
            },
        ],
        Err(error) if matches!(*error.reason, CompileErrorReason::GrantExpired { .. }) => vec![
            ConditionSpec {
                type_: "Ready",
                status: false,
                reason: "Expired",
                message: error.reason.to_string(),
            },
            ConditionSpec {
                type_: "Expired",
                status: true,
                reason: "Expired",
                message: error.reason.to_string(),
            },
        ],
        Err(error) => vec![ConditionSpec {
            type_: "Ready",
            status: false,
            reason: "Invalid",
            message: error.reason.to_string(),
        }],
    };
    DesiredStatus {
        object: ObjectRef {
            kind: ObjectKind::DelegationGrant,
            key: key_of(grant),
        },
        generation: grant.metadata.generation,
        conditions,
        fields: to_fields(&status),
        tools: None,
    }
}

/// The next instant (unix seconds) a status changes by itself: the earliest
/// grant expiry after `now`.
pub fn next_expiry(index: &Index, now: i64) -> Option<i64> {
    index
        .objects()
        .grants
        .iter()
        .filter_map(|g| chaperone_policy::grant_expires_at(&g.spec, &g.metadata, now).ok())
        .filter(|at| *at > now)
        .min()
}

fn describe_errors(errors: &[CompileError]) -> String {
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    text.join("; ")
}

/// `same_namespace`: the AgentIdentities of the policy's namespace.
fn target_count(
    policy: &Object<ToolPolicySpec>,
    same_namespace: &[&Object<AgentIdentitySpec>],
) -> usize {
    same_namespace
        .iter()
        .filter(
            |i| match (&policy.spec.target_refs, &policy.spec.agent_selector) {
                (Some(refs), _) => refs.iter().any(|r| r.name == i.metadata.name),
                (None, Some(selector)) => selector
                    .match_labels
                    .iter()
                    .all(|(k, v)| i.metadata.labels.get(k) == Some(v)),
                (None, None) => false,
            },
        )
        .count()
}

fn rfc3339(unix: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn to_fields<T: serde::Serialize>(status: &T) -> Value {
    let mut value = serde_json::to_value(status).unwrap_or_else(|_| json!({}));
    if let Some(map) = value.as_object_mut() {
        map.remove("conditions");
        map.remove("observedGeneration");
    }
    value
}
