//! Status of every Chaperone object, computed from the index and the connected
//! sidecars by a pure function, and written by server-side apply (field manager
//! `chaperone-controller`) by the leader only.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use chaperone_api::{
    AgentIdentity, AgentIdentityStatus, DelegationGrant, DelegationGrantStatus, DiscoveredTool,
    OutOfSyncPod, ToolPolicy, ToolPolicyStatus,
};
use chaperone_policy::{
    AgentKey, CompileError, CompileErrorReason, Engine, ObjectKey, ObjectKind, ObjectRef,
    model::{AgentIdentitySpec, DelegationGrantSpec, Object, ToolPolicySpec},
};
use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    index::{Index, grant_namespaces, key_of},
    metrics::Metrics,
    object_watch::SharedIndex,
    sidecars::{SidecarRegistry, SidecarState},
};

/// The field manager of every status the controller writes.
pub const FIELD_MANAGER: &str = "chaperone-controller";

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
/// `objects` ([`SidecarRegistry::of_agents`]) and the time in, statuses out.
pub fn desired_statuses(
    index: &Index,
    sidecars: &BTreeMap<AgentKey, Vec<(String, SidecarState)>>,
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
                    identity_status(index, identity, connected)
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
    let mut inventory = BTreeSet::new();
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
        inventory.extend(state.inventory.iter().cloned());
    }
    if !inventory.is_empty() {
        // The rules are needed here only: decoded from the published bytes.
        let engine = snapshot
            .as_ref()
            .and_then(|s| s.decode().ok())
            .and_then(|s| Engine::new(&s).ok());
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
    DesiredStatus {
        object: ObjectRef {
            kind: ObjectKind::AgentIdentity,
            key,
        },
        generation: identity.metadata.generation,
        conditions,
        fields: to_fields(&status),
    }
}

/// `same_namespace`: the AgentIdentities of the policy's namespace.
fn policy_status(
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
    }
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

/// Status patches in flight at once: enough to hide the API server's latency,
/// few enough not to crowd out the watches and the sidecars' streams.
const PATCHES_IN_FLIGHT: usize = 8;

/// Objects computed per lock of the index: bounds both how long the snapshot
/// server may wait for the lock and the statuses held at once.
const CHUNK: usize = 256;

/// When each condition (type, status) of a written status took that status.
type Transitions = Vec<(&'static str, bool, Time)>;

/// What the writer remembers of a status it wrote.
struct Written {
    fingerprint: u64,
    transitions: Transitions,
}

/// The leader's status writer: it recomputes only the objects that the index
/// or the sidecar registry marked as changed ([`Index::take_status_dirty`],
/// [`SidecarRegistry::take_status_dirty`]), and patches only the statuses
/// that differ from what it last wrote.
struct StatusWriter {
    client: Client,
    metrics: Arc<Metrics>,
    written: HashMap<ObjectRef, Written>,
    /// Objects to compute (and patch if changed), including failed patches.
    pending: BTreeSet<ObjectRef>,
    /// Check every object on the next pass (a new leader; the start).
    everything: bool,
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
    let mut writer = StatusWriter {
        client,
        metrics,
        written: HashMap::new(),
        pending: BTreeSet::new(),
        everything: true,
    };
    let mut index_changes = index.changes();
    let mut sidecar_changes = sidecars.changes();
    loop {
        let leading = *leader.borrow_and_update();
        // Taken on every replica, so a follower's marks do not pile up.
        let namespaces = index.lock().take_status_dirty();
        let agents = sidecars.take_status_dirty();
        if !leading {
            // A new leader starts from the API server's view.
            writer.written.clear();
            writer.pending.clear();
            writer.everything = true;
        } else if index.is_synced() {
            {
                let index = index.lock();
                let objects = if std::mem::take(&mut writer.everything) {
                    all_objects(&index)
                } else {
                    objects_to_check(&index, &namespaces, &agents)
                };
                writer.pending.extend(objects);
            }
            writer.write_pending(&index, &sidecars, &leader).await;
        }
        // Failed patches stay pending and are retried after a pause.
        let wait = if writer.pending.is_empty() {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = index_changes.changed() => {}
            _ = sidecar_changes.changed() => {}
            _ = leader.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        // Coalesce bursts of changes into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl StatusWriter {
    /// Computes the pending objects' statuses a chunk at a time and patches
    /// the changed ones, [`PATCHES_IN_FLIGHT`] at once, while still leader.
    async fn write_pending(
        &mut self,
        index: &SharedIndex,
        sidecars: &SidecarRegistry,
        leader: &watch::Receiver<bool>,
    ) {
        let mut failed = Vec::new();
        while !self.pending.is_empty() && *leader.borrow() {
            let chunk: Vec<ObjectRef> = std::iter::from_fn(|| self.pending.pop_first())
                .take(CHUNK)
                .collect();
            let agents: BTreeSet<AgentKey> = chunk
                .iter()
                .filter(|o| o.kind == ObjectKind::AgentIdentity)
                .map(|o| o.key.clone())
                .collect();
            let connected = if agents.is_empty() {
                BTreeMap::new()
            } else {
                sidecars.of_agents(&agents)
            };
            let desired = desired_statuses(&index.lock(), &connected, &chunk, crate::unix_now());
            drop(connected);
            let mut patches = Vec::new();
            for (object, status) in desired {
                let Some(status) = status else {
                    self.written.remove(&object);
                    continue;
                };
                let fingerprint = status.fingerprint();
                let previous = self.written.get(&object);
                if previous.is_some_and(|w| w.fingerprint == fingerprint) {
                    continue;
                }
                let previous = previous.map(|w| w.transitions.as_slice());
                let conditions = with_transition_times(&status, previous.unwrap_or_default());
                patches.push((status, conditions, fingerprint));
            }
            let client = &self.client;
            let results: Vec<_> = futures_util::stream::iter(patches)
                .map(|(status, conditions, fingerprint)| async move {
                    let result = patch_status(client, &status, &conditions).await;
                    (status, conditions, fingerprint, result)
                })
                .buffer_unordered(PATCHES_IN_FLIGHT)
                .collect()
                .await;
            for (status, conditions, fingerprint, result) in results {
                match result {
                    Ok(()) => {
                        self.metrics.status_patched(true);
                        let transitions = status
                            .conditions
                            .iter()
                            .zip(conditions)
                            .map(|(c, written)| (c.type_, c.status, written.last_transition_time))
                            .collect();
                        self.written.insert(
                            status.object,
                            Written {
                                fingerprint,
                                transitions,
                            },
                        );
                    }
                    Err(error) => {
                        self.metrics.status_patched(false);
                        tracing::warn!(object = %status.object, %error, "writing status failed; will retry");
                        failed.push(status.object);
                    }
                }
            }
        }
        self.pending.extend(failed);
    }
}

/// The conditions to write: a condition keeps its transition time while its
/// type keeps its status.
fn with_transition_times(
    status: &DesiredStatus,
    previous: &[(&'static str, bool, Time)],
) -> Vec<Condition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    status
        .conditions
        .iter()
        .map(|c| {
            let last_transition_time = previous
                .iter()
                .find(|(type_, status, _)| *type_ == c.type_ && *status == c.status)
                .map(|(_, _, at)| at.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.to_owned(),
                status: if c.status { "True" } else { "False" }.to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_objects::{self, identity, meta};

    const NOW: i64 = 1_800_000_000;

    /// A grant in `ns` from `from` to `to_ns/to`.
    fn grant(ns: &str, from: &str, to_ns: &str, to: &str) -> Object<DelegationGrantSpec> {
        test_objects::grant(ns, &format!("{from}-to-{to}"), from, Some(to_ns), to)
    }

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey::new(ns, name)
    }

    #[test]
    fn a_grant_is_checked_again_when_its_target_namespace_changes() {
        let mut index = Index::new();
        index.apply_grant(grant("a", "planner", "b", "worker"), NOW);
        index.take_status_dirty();

        let objects = objects_to_check(&index, &BTreeSet::from(["b".to_owned()]), &BTreeSet::new());

        assert!(objects.contains(&ObjectRef {
            kind: ObjectKind::DelegationGrant,
            key: key("a", "planner-to-worker"),
        }));
    }

    #[test]
    fn changes_mark_only_the_namespaces_they_can_affect() {
        let mut index = Index::new();
        index.apply_identity(identity("a", "planner"), NOW);
        index.apply_identity(identity("b", "worker"), NOW);
        index.take_status_dirty();

        index.apply_identity(identity("a", "reviewer"), NOW);

        assert_eq!(index.take_status_dirty(), BTreeSet::from(["a".to_owned()]));
        assert!(index.take_status_dirty().is_empty(), "taken once");
    }

    #[test]
    fn out_of_sync_pods_are_listed_up_to_the_cap_and_all_counted() {
        let mut index = Index::new();
        index.apply_identity(identity("a", "planner"), NOW);
        let agent = key("a", "planner");
        let pods: Vec<(String, SidecarState)> = (0..OUT_OF_SYNC_PODS_LISTED + 5)
            .map(|i| {
                let state = SidecarState {
                    agent: Some(agent.clone()),
                    acked: Some((1, "an older hash".into())),
                    ..Default::default()
                };
                (format!("pod-{i}"), state)
            })
            .collect();
        let sidecars = BTreeMap::from([(agent.clone(), pods)]);
        let object = ObjectRef {
            kind: ObjectKind::AgentIdentity,
            key: agent,
        };

        let statuses = desired_statuses(&index, &sidecars, &[object], NOW);

        let status = statuses[0].1.as_ref().expect("the identity exists");
        assert_eq!(
            status.fields["sidecarsConnected"],
            json!(OUT_OF_SYNC_PODS_LISTED + 5)
        );
        assert_eq!(status.fields["sidecarsInSync"], json!(0));
        assert_eq!(
            status.fields["outOfSyncPods"].as_array().map(Vec::len),
            Some(OUT_OF_SYNC_PODS_LISTED)
        );
    }

    #[test]
    fn a_deleted_object_has_no_status() {
        let index = Index::new();
        let object = ObjectRef {
            kind: ObjectKind::ToolPolicy,
            key: key("a", "gone"),
        };

        let statuses = desired_statuses(&index, &BTreeMap::new(), &[object], NOW);

        assert!(statuses[0].1.is_none());
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let index = Index::new();
        let status = policy_status(
            &index,
            &Object {
                api_version: chaperone_policy::model::API_VERSION.into(),
                metadata: meta("a", "p"),
                spec: Default::default(),
            },
            &[],
        );
        let then = Time(k8s_openapi::jiff::Timestamp::from_second(NOW).unwrap());
        let ready = status.conditions[0].status;

        let kept = with_transition_times(&status, &[("Ready", ready, then.clone())]);
        let moved = with_transition_times(&status, &[("Ready", !ready, then.clone())]);

        assert_eq!(kept[0].last_transition_time, then);
        assert_ne!(moved[0].last_transition_time, then);
    }
}
