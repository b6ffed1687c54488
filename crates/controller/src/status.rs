//! Status of every Chaperone object, computed from the index and the connected
//! sidecars by a pure function, and written by server-side apply (field manager
//! `chaperone-controller`) by the leader only.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use chaperone_api::{
    AgentIdentity, AgentIdentityStatus, DelegationGrant, DelegationGrantStatus, DiscoveredTool,
    OutOfSyncPod, ToolPolicy, ToolPolicyStatus,
};
use chaperone_policy::{
    CompileError, CompileErrorReason, Engine, ObjectKind, ObjectRef,
    model::{Object, ToolPolicySpec},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{index::Index, metrics::Metrics, object_watch::SharedIndex, sidecars::SidecarRegistry};

/// The field manager of every status the controller writes.
pub const FIELD_MANAGER: &str = "chaperone-controller";

/// A condition without its transition time (filled in when written).
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

/// Computes every object's status. Pure: the index, the sidecars of this replica
/// and the time in, statuses out.
pub fn desired_statuses(index: &Index, sidecars: &SidecarRegistry, now: i64) -> Vec<DesiredStatus> {
    let objects = index.objects();
    let mut out = Vec::new();

    for identity in &objects.identities {
        let key = crate::index::key_of(identity);
        let object = ObjectRef {
            kind: ObjectKind::AgentIdentity,
            key: key.clone(),
        };
        let snapshot = index.snapshot(&key);
        let mut status = AgentIdentityStatus::default();
        let mut conditions = Vec::new();
        match &snapshot {
            Some(s) => {
                status.snapshot_version = i64::try_from(s.version).ok();
                status.snapshot_hash = Some(s.hash.clone());
                let rules = s.content.authority.rules.len();
                let policies: BTreeSet<&str> = s
                    .content
                    .authority
                    .rules
                    .iter()
                    .map(|r| r.policy.as_str())
                    .collect();
                conditions.push(ConditionSpec {
                    type_: "Ready",
                    status: true,
                    reason: "SnapshotServed",
                    message: format!(
                        "snapshot v{} serves {rules} rules from {} policies",
                        s.version,
                        policies.len()
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

        let connected = sidecars.of_agent(&key);
        let current_hash = snapshot.as_ref().map(|s| s.hash.as_str());
        status.sidecars_connected = connected.len() as i32;
        let mut inventory = BTreeSet::new();
        for (pod, state) in &connected {
            let in_sync = state
                .acked
                .as_ref()
                .is_some_and(|(_, h)| Some(h.as_str()) == current_hash);
            if in_sync {
                status.sidecars_in_sync += 1;
            } else {
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
            inventory.extend(state.inventory.iter().cloned());
        }
        if !inventory.is_empty() {
            let engine = snapshot.as_ref().and_then(|s| Engine::new(s).ok());
            status.discovered_tools = inventory
                .into_iter()
                .map(|(server, name)| {
                    let governed = engine.as_ref().is_some_and(|e| e.visible(&server, &name));
                    DiscoveredTool {
                        server,
                        name,
                        governed,
                    }
                })
                .collect();
            status.governed_tool_count = Some(
                status
                    .discovered_tools
                    .iter()
                    .filter(|t| t.governed)
                    .count() as i32,
            );
        }
        out.push(DesiredStatus {
            object,
            generation: identity.metadata.generation,
            conditions,
            fields: to_fields(&status),
        });
    }

    for policy in &objects.policies {
        let key = crate::index::key_of(policy);
        let object = ObjectRef {
            kind: ObjectKind::ToolPolicy,
            key,
        };
        let errors = index.errors_of(&object);
        let status = ToolPolicyStatus {
            rule_count: Some(policy.spec.rules.len() as i32),
            target_agent_count: Some(target_count(policy, &objects.identities) as i32),
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
        out.push(DesiredStatus {
            object,
            generation: policy.metadata.generation,
            conditions: vec![ready],
            fields: to_fields(&status),
        });
    }

    for grant in &objects.grants {
        let key = crate::index::key_of(grant);
        let object = ObjectRef {
            kind: ObjectKind::DelegationGrant,
            key,
        };
        let expires_at = chaperone_policy::grant_expires_at(&grant.spec, &grant.metadata, now).ok();
        let status = DelegationGrantStatus {
            expires_at: expires_at.map(rfc3339),
            ..Default::default()
        };
        let conditions = match chaperone_policy::check_grant(grant, &objects.identities, now) {
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
        out.push(DesiredStatus {
            object,
            generation: grant.metadata.generation,
            conditions,
            fields: to_fields(&status),
        });
    }
    out
}

/// The next instant (unix seconds) a status changes by itself: the earliest
/// future grant expiry.
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

fn target_count(
    policy: &Object<ToolPolicySpec>,
    identities: &[Object<chaperone_policy::model::AgentIdentitySpec>],
) -> usize {
    let ns = policy.metadata.namespace_or_default();
    identities
        .iter()
        .filter(|i| i.metadata.namespace_or_default() == ns)
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

/// Writes statuses while `leader` is true; every replica runs it, only the
/// leader writes.
pub async fn run_writer(
    client: Client,
    index: Arc<SharedIndex>,
    sidecars: Arc<SidecarRegistry>,
    metrics: Arc<Metrics>,
    mut leader: watch::Receiver<bool>,
) {
    let mut written: BTreeMap<ObjectRef, (DesiredStatus, Vec<Condition>)> = BTreeMap::new();
    let mut index_changes = index.changes();
    let mut sidecar_changes = sidecars.changes();
    loop {
        if *leader.borrow_and_update() && index.is_synced() {
            let now = crate::unix_now();
            let desired = desired_statuses(&index.lock(), &sidecars, now);
            let live: BTreeSet<ObjectRef> = desired.iter().map(|d| d.object.clone()).collect();
            written.retain(|k, _| live.contains(k));
            for status in desired {
                if written
                    .get(&status.object)
                    .is_some_and(|(prev, _)| *prev == status)
                {
                    continue;
                }
                let previous = written
                    .get(&status.object)
                    .map(|(_, c)| c.as_slice())
                    .unwrap_or_default();
                let conditions = with_transition_times(&status, previous);
                match patch_status(&client, &status, &conditions).await {
                    Ok(()) => {
                        metrics.status_patched(true);
                        written.insert(status.object.clone(), (status, conditions));
                    }
                    Err(error) => {
                        metrics.status_patched(false);
                        tracing::warn!(object = %status.object, %error, "writing status failed; will retry");
                    }
                }
            }
        } else if !*leader.borrow() {
            // A new leader starts from the API server's view.
            written.clear();
        }
        let wake = {
            let index = index.lock();
            let now = crate::unix_now();
            next_expiry(&index, now).map(|at| Duration::from_secs((at - now).max(0) as u64 + 1))
        }
        .unwrap_or(Duration::from_secs(30))
        .min(Duration::from_secs(30));
        tokio::select! {
            _ = index_changes.changed() => {}
            _ = sidecar_changes.changed() => {}
            _ = leader.changed() => {}
            _ = tokio::time::sleep(wake) => {}
        }
        // Coalesce bursts of changes into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn with_transition_times(status: &DesiredStatus, previous: &[Condition]) -> Vec<Condition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    status
        .conditions
        .iter()
        .map(|c| {
            let status_text = if c.status { "True" } else { "False" };
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status_text)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.to_owned(),
                status: status_text.to_owned(),
                reason: c.reason.to_owned(),
                message: c.message.clone(),
                observed_generation: status.generation,
                last_transition_time,
            }
        })
        .collect()
}

async fn patch_status(
    client: &Client,
    status: &DesiredStatus,
    conditions: &[Condition],
) -> Result<(), kube::Error> {
    let mut body = status.fields.clone();
    if let Some(map) = body.as_object_mut() {
        map.insert(
            "conditions".into(),
            serde_json::to_value(conditions).unwrap_or_default(),
        );
        if let Some(generation) = status.generation {
            map.insert("observedGeneration".into(), json!(generation));
        }
    }
    let key = &status.object.key;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    macro_rules! apply {
        ($kind:ty, $name:literal) => {{
            let patch = json!({ "apiVersion": chaperone_policy::model::API_VERSION, "kind": $name, "status": body });
            Api::<$kind>::namespaced(client.clone(), &key.namespace)
                .patch_status(&key.name, &params, &Patch::Apply(&patch))
                .await
                .map(|_| ())
        }};
    }
    match status.object.kind {
        ObjectKind::AgentIdentity => apply!(AgentIdentity, "AgentIdentity"),
        ObjectKind::ToolPolicy => apply!(ToolPolicy, "ToolPolicy"),
        ObjectKind::DelegationGrant => apply!(DelegationGrant, "DelegationGrant"),
    }
}

/// Recompiles every agent when a grant expires, on every replica, so expired
/// grants leave the snapshots at that instant.
pub async fn run_expiry_ticker(index: Arc<SharedIndex>) {
    let mut changes = index.changes();
    loop {
        let wait = {
            let now = crate::unix_now();
            next_expiry(&index.lock(), now)
                .map(|at| (at - now).max(0) as u64 + 1)
                .unwrap_or(60)
                .min(60)
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(wait)) => {
                let now = crate::unix_now();
                index.update(|i| i.recompute_all(now));
            }
            // A new or changed grant may expire sooner: compute the wait again.
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}
