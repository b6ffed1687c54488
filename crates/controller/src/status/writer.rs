//! The I/O around the desired statuses: the leader's writer, which patches
//! them by server-side apply (field manager [`FIELD_MANAGER`]) when they
//! changed (an agent's tool definitions' ConfigMap first, its
//! `ToolDefinitionChanged` Events after), and the ticker that recompiles
//! every agent when a grant expires.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use chaperone_api::{AgentIdentity, DelegationGrant, ToolPolicy};
use chaperone_policy::{AgentKey, ObjectKind, ObjectRef};
use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::watch;

use super::{
    FIELD_MANAGER,
    definitions::{read_known_definitions, write_definitions},
    desired::{DesiredStatus, all_objects, desired_statuses, next_expiry, objects_to_check},
};
use crate::{
    audit_events::AuditEvents,
    index::SharedIndex,
    metrics::Metrics,
    sidecars::SidecarRegistry,
    tool_definitions::{KnownDefinitions, change_event, remember},
};

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

/// What the writer remembers of an agent's tool definitions (this
/// leadership term only; a new leader reads them back from the API server).
#[derive(Clone, Debug, Default)]
pub(super) struct AgentMemory {
    /// The AgentIdentity's uid (the owner of its definitions' ConfigMap),
    /// once known.
    pub uid: Option<String>,
    /// What its status said of each tool's definition.
    pub known: KnownDefinitions,
    /// Its definitions' ConfigMap data as last read or written; `None`: not
    /// read yet.
    pub config_map: Option<BTreeMap<String, String>>,
}

/// The leader's status writer: it recomputes only the objects that the index
/// or the sidecar registry marked as changed
/// ([`crate::index::Index::take_status_dirty`],
/// [`SidecarRegistry::take_status_dirty`]), and patches only the statuses
/// that differ from what it last wrote.
struct StatusWriter {
    client: Client,
    metrics: Arc<Metrics>,
    events: Arc<AuditEvents>,
    written: HashMap<ObjectRef, Written>,
    /// Per agent: its tool definitions; `None` until read back from the API
    /// server at the start of a leadership term.
    agents: Option<BTreeMap<AgentKey, AgentMemory>>,
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
    events: Arc<AuditEvents>,
    mut leader: watch::Receiver<bool>,
) {
    let mut writer = StatusWriter {
        client,
        metrics,
        events,
        written: HashMap::new(),
        agents: None,
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
            writer.agents = None;
        } else if writer.agents.is_none() {
            // What the statuses say of tool definitions, before any is
            // written: "changed" is derived from it.
            match read_known_definitions(&writer.client).await {
                Ok(agents) => {
                    writer.agents = Some(agents);
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "reading the AgentIdentities' tool definitions failed; will retry");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
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
            let agent_memory = self.agents.get_or_insert_default();
            let known: BTreeMap<AgentKey, KnownDefinitions> = agents
                .iter()
                .filter_map(|a| Some((a.clone(), agent_memory.get(a)?.known.clone())))
                .collect();
            let desired =
                desired_statuses(&index.lock(), &connected, &known, &chunk, crate::unix_now());
            drop(connected);
            let mut patches = Vec::new();
            for (object, status) in desired {
                let Some(status) = status else {
                    self.written.remove(&object);
                    if object.kind == ObjectKind::AgentIdentity {
                        agent_memory.remove(&object.key);
                        self.metrics.tools_blocked(&object.key, None);
                    }
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
            let memory = &*agent_memory;
            let results: Vec<_> = futures_util::stream::iter(patches)
                .map(|(status, conditions, fingerprint)| async move {
                    // The texts first: a status that shows a changed tool
                    // finds both its definitions in the ConfigMap.
                    let definitions = match &status.tools {
                        Some(tools) => {
                            let agent = &status.object.key;
                            let remembered = memory.get(agent).cloned().unwrap_or_default();
                            write_definitions(client, agent, remembered, tools)
                                .await
                                .map(Some)
                        }
                        None => Ok(None),
                    };
                    let result = match definitions {
                        Ok(definitions) => patch_status(client, &status, &conditions)
                            .await
                            .map(|()| definitions),
                        Err(error) => Err(error),
                    };
                    (status, conditions, fingerprint, result)
                })
                .buffer_unordered(PATCHES_IN_FLIGHT)
                .collect()
                .await;
            for (status, conditions, fingerprint, result) in results {
                match result {
                    Ok(definitions) => {
                        self.metrics.status_patched(true);
                        if let (Some(tools), Some(mut memory)) = (&status.tools, definitions) {
                            let agent = &status.object.key;
                            for change in &tools.changes {
                                self.metrics.tool_definition_changed();
                                self.events.record(change_event(agent, change));
                            }
                            self.metrics
                                .tools_blocked(agent, Some(tools.blocked.len() as i64));
                            remember(&mut memory.known, &tools.tools);
                            agent_memory.insert(agent.clone(), memory);
                        }
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
pub(super) fn with_transition_times(
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
///
/// The ticker waits for the first expiry after its last recompile, not after
/// the present: a change to the index only makes it look again, so changes
/// arriving steadily (other agents' objects, status writes) can neither
/// postpone an expiry nor make the ticker skip one that has just passed.
pub async fn run_expiry_ticker(index: Arc<SharedIndex>) {
    let mut changes = index.changes();
    // Nothing recompiled yet: the first look at a grant recompiles at once
    // if its expiry has passed, whenever the index was compiled.
    let mut recompiled_at = i64::MIN;
    loop {
        let wait = {
            let pending = next_expiry(&index.lock(), recompiled_at);
            pending.map_or(MAX_EXPIRY_WAIT, |at| {
                wait_until(at, k8s_openapi::jiff::Timestamp::now())
            })
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {
                let now = crate::unix_now();
                index.update(|i| i.recompute_all(now));
                recompiled_at = now;
            }
            // A new or changed grant may expire sooner: look again.
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// The longest the expiry ticker sleeps without looking at the index again.
const MAX_EXPIRY_WAIT: Duration = Duration::from_secs(60);

/// How long from `now` until the unix second `at` has begun (a grant is
/// expired from its `at` on), at most [`MAX_EXPIRY_WAIT`]; zero once it has.
pub(super) fn wait_until(at: i64, now: k8s_openapi::jiff::Timestamp) -> Duration {
    let nanos = i128::from(at) * 1_000_000_000 - now.as_nanosecond();
    u64::try_from(nanos.clamp(0, MAX_EXPIRY_WAIT.as_nanos() as i128))
        .map_or(MAX_EXPIRY_WAIT, Duration::from_nanos)
}
