//! Sidecar state shared between controller replicas through ConfigMaps.
//!
//! A sidecar streams from one replica and registers its signing key there, but
//! a sidecar verifying a delegated call may stream from another, and only the
//! leader writes status. So each replica publishes its agent sidecars in one
//! ConfigMap `chaperone-replica-<pod name>` in its own namespace, labelled
//! `app.kubernetes.io/component=replica-state`:
//!
//! - `keys.json`: the JWKS entries of its sidecars' keys (the objects of
//!   [`crate::sidecars::jwk_of`], with `kid`, `chaperone.dev/agent`,
//!   `chaperone.dev/pod`);
//! - `sidecars.json`: what the status writer reads of each sidecar (agent, pod,
//!   acknowledged and rejected snapshot, tools seen and their definitions'
//!   hashes);
//! - `tool-sidecars.json`: its tool-mode sidecars (pod, build, since when),
//!   for `chaperonectl status` (replicas do not share them);
//! - `definitions.json`: the texts of those definitions, by hash, each once
//!   (for the leader's `<agent>-tool-definitions` ConfigMaps);
//! - `heartbeat`: when it was written, in unix seconds.
//!
//! It writes by server-side apply (field manager `chaperone-controller`) on
//! startup, [`DEBOUNCE`] after a change, and every [`REFRESH`]. The ConfigMap
//! is owned by the replica's Pod when the replica can read it, so deleting the
//! pod deletes it.
//!
//! Every replica watches these ConfigMaps and hands the other replicas'
//! sidecars to [`SidecarRegistry::set_peers`]: the JWKS (and its `KeySet`
//! pushes) and the leader's status counts are the union over all replicas. A
//! ConfigMap whose heartbeat is older than [`MAX_AGE`] (its writer stopped
//! without its pod being deleted) counts for nothing; heartbeats are compared
//! with the reader's clock, so replicas' clocks must agree to well within that.
//! A pod seen deleted leaves the union at once
//! ([`SidecarRegistry::forget_peer_pod`]).
//!
//! Size: a ConfigMap holds at most 1 MiB, and one sidecar takes about 500 bytes
//! (more with a long tool inventory), so one replica can publish a few thousand
//! sidecars. Above the limit it leaves out the definitions' texts, then the
//! tool inventories, and warns; the keys and counts still go through up to
//! about 2,000 sidecars per replica.
//!
//! The pure parts ([`publish`], [`config_map`], [`read_replica`],
//! [`peer_sidecars`]) are separate from the two loops doing I/O ([`run`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use chaperone_api::replica_state::{
    DEFINITIONS_KEY, HEARTBEAT_KEY, KEYS_KEY, PublishedSidecar, PublishedToolSidecar, SIDECARS_KEY,
    TOOL_SIDECARS_KEY, VERSION_KEY,
};
use chaperone_policy::ObjectKey;
use futures_util::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::Value;

use crate::{
    sidecars::{SidecarRegistry, SidecarState, jwk_of},
    tool_definitions::{Inventory, ReportedDefinition},
};

pub use chaperone_api::replica_state::{COMPONENT_LABEL, MAX_AGE, config_map_name};
/// How long after a change a replica writes its ConfigMap (changes in between
/// are written together).
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// How often a replica rewrites its ConfigMap with a new heartbeat, and how
/// often readers drop stale ones.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The most a ConfigMap's data may hold.
pub const MAX_BYTES: usize = 1024 * 1024;

/// (namespace, pod).
type PodKey = (String, String);

/// What a replica publishes, without its heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// `keys.json`.
    pub keys_json: String,
    /// `sidecars.json`.
    pub sidecars_json: String,
    /// `tool-sidecars.json`.
    pub tool_sidecars_json: String,
    /// `definitions.json`: the texts of the tool definitions its sidecars
    /// reported, by hash (each once).
    pub definitions_json: String,
}

impl Published {
    fn len(&self) -> usize {
        self.keys_json.len()
            + self.sidecars_json.len()
            + self.tool_sidecars_json.len()
            + self.definitions_json.len()
    }
}

/// How much of the sidecars' tool inventories a replica publishes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// Tools, definitions and their texts.
    Texts,
    /// Tools and definitions, without texts.
    Hashes,
    /// Neither.
    Nothing,
}

/// The data of this replica's ConfigMap from its own sidecars (agent
/// sidecars in `sidecars.json`, tool-mode ones in `tool-sidecars.json`); the
/// definition texts, then the tool inventories, are left out (with a
/// warning) if they would not fit.
pub fn publish(own: &BTreeMap<PodKey, SidecarState>) -> Published {
    let fits = |p: &Published| p.len() < MAX_BYTES - 1024;
    let published = publish_with(own, Detail::Texts);
    if fits(&published) {
        return published;
    }
    let published = publish_with(own, Detail::Hashes);
    if fits(&published) {
        tracing::warn!(
            sidecars = own.len(),
            "the sidecars of this replica do not fit in one ConfigMap with their tool definitions' texts; publishing them without (tool-definitions ConfigMaps lack these texts)"
        );
        return published;
    }
    tracing::warn!(
        sidecars = own.len(),
        "the sidecars of this replica do not fit in one ConfigMap with their tool inventories; publishing them without (other replicas' statuses lack these tools)"
    );
    publish_with(own, Detail::Nothing)
}

fn publish_with(own: &BTreeMap<PodKey, SidecarState>, detail: Detail) -> Published {
    let tools = detail != Detail::Nothing;
    let mut texts: BTreeMap<&str, &str> = BTreeMap::new();
    let keys: Vec<Value> = own
        .iter()
        .filter_map(|((namespace, pod), state)| jwk_of(namespace, pod, state))
        .collect();
    let sidecars: Vec<PublishedSidecar> = own
        .iter()
        .filter_map(|((namespace, pod), state)| {
            let agent = state.agent.as_ref()?;
            Some(PublishedSidecar {
                namespace: namespace.clone(),
                pod: pod.clone(),
                pod_uid: state.pod_uid.clone(),
                agent: format!("{}/{}", agent.namespace, agent.name),
                acked_version: state.acked.as_ref().map(|(v, _)| *v),
                acked_hash: state.acked.as_ref().map(|(_, h)| h.clone()),
                acked_at: state.acked_at,
                rejected_version: state.rejected.as_ref().map(|(v, _)| *v),
                rejected_error: state.rejected.as_ref().map(|(_, e)| e.clone()),
                sidecar_version: (!state.sidecar_version.is_empty())
                    .then(|| state.sidecar_version.clone()),
                connected_at: (state.connected_at != 0).then_some(state.connected_at),
                tools: if tools {
                    state.inventory.keys().cloned().collect()
                } else {
                    BTreeSet::new()
                },
                definitions: if tools {
                    state
                        .inventory
                        .iter()
                        .filter_map(|((server, tool), definition)| {
                            let definition = definition.as_ref()?;
                            if detail == Detail::Texts
                                && let Some(json) = &definition.json
                            {
                                texts.insert(&definition.hash, json);
                            }
                            Some((
                                server.clone(),
                                tool.clone(),
                                definition.hash.clone(),
                                definition.seen_at,
                            ))
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            })
        })
        .collect();
    let tool_sidecars: Vec<PublishedToolSidecar> = own
        .iter()
        .filter(|(_, state)| state.agent.is_none())
        .map(|((namespace, pod), state)| PublishedToolSidecar {
            namespace: namespace.clone(),
            pod: pod.clone(),
            pod_uid: state.pod_uid.clone(),
            sidecar_version: (!state.sidecar_version.is_empty())
                .then(|| state.sidecar_version.clone()),
            connected_at: (state.connected_at != 0).then_some(state.connected_at),
        })
        .collect();
    Published {
        keys_json: serde_json::to_string(&keys).unwrap_or_else(|_| "[]".into()),
        tool_sidecars_json: serde_json::to_string(&tool_sidecars).unwrap_or_else(|_| "[]".into()),
        sidecars_json: serde_json::to_string(&sidecars).unwrap_or_else(|_| "[]".into()),
        definitions_json: serde_json::to_string(&texts).unwrap_or_else(|_| "{}".into()),
    }
}

/// The ConfigMap `name` in `namespace` to apply: `published`, the heartbeat,
/// the labels, and the owner (the replica's Pod) if known.
pub fn config_map(
    name: &str,
    namespace: &str,
    published: &Published,
    heartbeat: i64,
    owner: Option<OwnerReference>,
) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(crate::config_map_labels(COMPONENT_LABEL.1, [])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (KEYS_KEY.to_owned(), published.keys_json.clone()),
            (SIDECARS_KEY.to_owned(), published.sidecars_json.clone()),
            (
                TOOL_SIDECARS_KEY.to_owned(),
                published.tool_sidecars_json.clone(),
            ),
            (
                DEFINITIONS_KEY.to_owned(),
                published.definitions_json.clone(),
            ),
            (HEARTBEAT_KEY.to_owned(), heartbeat.to_string()),
            (
                VERSION_KEY.to_owned(),
                chaperone_wire::build_info::VERSION.to_owned(),
            ),
        ])),
        ..Default::default()
    }
}

/// What one replica published.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replica {
    /// When it last wrote, unix seconds.
    pub heartbeat: i64,
    /// Its agent sidecars, with their keys.
    pub sidecars: BTreeMap<PodKey, SidecarState>,
}

/// A replica's ConfigMap that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InvalidReplicaState {
    /// A data key is missing.
    #[error("data key {0} is missing")]
    Missing(&'static str),
    /// A data key is not what the writer writes.
    #[error("data key {key} is invalid: {reason}")]
    Invalid {
        /// The data key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// Reads a replica's ConfigMap. A key in `keys.json` joins the sidecar of the
/// pod it names (`chaperone.dev/pod`); a key without one is ignored.
pub fn read_replica(config_map: &ConfigMap) -> Result<Replica, InvalidReplicaState> {
    let empty = BTreeMap::new();
    let data = config_map.data.as_ref().unwrap_or(&empty);
    let get = |key: &'static str| data.get(key).ok_or(InvalidReplicaState::Missing(key));
    let invalid = |key: &'static str, reason: String| InvalidReplicaState::Invalid { key, reason };
    let heartbeat = get(HEARTBEAT_KEY)?
        .parse::<i64>()
        .map_err(|e| invalid(HEARTBEAT_KEY, e.to_string()))?;
    let published: Vec<PublishedSidecar> = serde_json::from_str(get(SIDECARS_KEY)?)
        .map_err(|e| invalid(SIDECARS_KEY, e.to_string()))?;
    let keys: Vec<Value> =
        serde_json::from_str(get(KEYS_KEY)?).map_err(|e| invalid(KEYS_KEY, e.to_string()))?;
    // Absent from a replica that predates definitions.
    let texts: BTreeMap<String, String> = match data.get(DEFINITIONS_KEY) {
        Some(text) => {
            serde_json::from_str(text).map_err(|e| invalid(DEFINITIONS_KEY, e.to_string()))?
        }
        None => BTreeMap::new(),
    };
    let texts: BTreeMap<String, Arc<str>> = texts
        .into_iter()
        .map(|(hash, text)| (hash, Arc::from(text)))
        .collect();
    let mut sidecars = BTreeMap::new();
    for sidecar in published {
        let Some((agent_ns, agent_name)) = sidecar.agent.split_once('/') else {
            return Err(invalid(
                SIDECARS_KEY,
                format!("agent {:?} is not namespace/name", sidecar.agent),
            ));
        };
        sidecars.insert(
            (sidecar.namespace, sidecar.pod),
            SidecarState {
                agent: Some(ObjectKey::new(agent_ns, agent_name)),
                pod_uid: sidecar.pod_uid,
                connection: 0,
                acked: sidecar.acked_version.zip(sidecar.acked_hash),
                acked_at: sidecar.acked_at,
                rejected: sidecar.rejected_version.zip(sidecar.rejected_error),
                sidecar_version: sidecar.sidecar_version.unwrap_or_default(),
                connected_at: sidecar.connected_at.unwrap_or(0),
                key: None,
                inventory: inventory_of(sidecar.tools, sidecar.definitions, &texts),
            },
        );
    }
    for jwk in keys {
        let (Some(kid), Some((namespace, pod))) = (
            jwk["kid"].as_str(),
            jwk["chaperone.dev/pod"]
                .as_str()
                .and_then(|p| p.split_once('/')),
        ) else {
            continue;
        };
        if let Some(state) = sidecars.get_mut(&(namespace.to_owned(), pod.to_owned())) {
            state.key = Some((kid.to_owned(), jwk.clone()));
        }
    }
    Ok(Replica {
        heartbeat,
        sidecars,
    })
}

/// A published sidecar's inventory: its tools, with the definitions (and
/// their texts, where published) of those that have one.
fn inventory_of(
    tools: BTreeSet<(String, String)>,
    definitions: Vec<(String, String, String, i64)>,
    texts: &BTreeMap<String, Arc<str>>,
) -> Inventory {
    let mut inventory: Inventory = tools.into_iter().map(|tool| (tool, None)).collect();
    for (server, tool, hash, seen_at) in definitions {
        let definition = ReportedDefinition {
            json: texts.get(&hash).cloned(),
            hash,
            seen_at,
        };
        inventory.insert((server, tool), Some(definition));
    }
    inventory
}

/// The other replicas' sidecars: every replica's but `own_config_map`'s,
/// leaving out replicas whose heartbeat is older than [`MAX_AGE`] at `now`. A
/// pod two replicas list (it reconnected) is taken from the later heartbeat.
pub fn peer_sidecars(
    replicas: &BTreeMap<String, Replica>,
    own_config_map: &str,
    now: i64,
) -> BTreeMap<PodKey, SidecarState> {
    let mut live: Vec<&Replica> = replicas
        .iter()
        .filter(|(name, r)| name.as_str() != own_config_map && now - r.heartbeat <= MAX_AGE)
        .map(|(_, r)| r)
        .collect();
    live.sort_by_key(|r| r.heartbeat);
    let mut out = BTreeMap::new();
    for replica in live {
        out.extend(replica.sidecars.clone());
    }
    out
}

/// Publishes this replica's sidecars and follows the other replicas', until
/// the process ends.
pub async fn run(
    client: Client,
    namespace: String,
    pod_name: String,
    sidecars: Arc<SidecarRegistry>,
) {
    tokio::join!(
        publish_own(
            client.clone(),
            namespace.clone(),
            pod_name.clone(),
            sidecars.clone()
        ),
        follow_peers(client, namespace, pod_name, sidecars),
    );
}

async fn publish_own(
    client: Client,
    namespace: String,
    pod_name: String,
    sidecars: Arc<SidecarRegistry>,
) {
    let api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let name = config_map_name(&pod_name);
    let params = PatchParams::apply(crate::status::FIELD_MANAGER).force();
    // Outer None: not looked up yet (or the lookup failed).
    let mut owner: Option<Option<OwnerReference>> = None;
    let mut changes = sidecars.changes();
    let mut written: Option<Published> = None;
    let mut next_write = tokio::time::Instant::now();
    loop {
        if owner.is_none() {
            owner = own_pod(&client, &namespace, &pod_name).await;
        }
        changes.borrow_and_update();
        let published = publish(&sidecars.own_sidecars());
        if written.as_ref() != Some(&published) || tokio::time::Instant::now() >= next_write {
            let object = config_map(
                &name,
                &namespace,
                &published,
                crate::unix_now(),
                owner.clone().flatten(),
            );
            match api.patch(&name, &params, &Patch::Apply(&object)).await {
                Ok(_) => {
                    written = Some(published);
                    next_write = tokio::time::Instant::now() + REFRESH;
                }
                Err(error) => {
                    tracing::warn!(configmap = %name, %error, "publishing this replica's sidecars failed; retrying");
                    written = None;
                    next_write = tokio::time::Instant::now() + Duration::from_secs(1);
                }
            }
        }
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep_until(next_write) => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
    }
}

/// This replica's Pod as an owner: `Some(None)` when it does not exist (a
/// controller run outside a cluster), `None` when the lookup failed.
async fn own_pod(
    client: &Client,
    namespace: &str,
    pod_name: &str,
) -> Option<Option<OwnerReference>> {
    match Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(pod_name)
        .await
    {
        Ok(Some(pod)) => Some(pod.metadata.uid.map(|uid| OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: pod_name.to_owned(),
            uid,
            ..Default::default()
        })),
        Ok(None) => {
            tracing::info!(
                pod = pod_name,
                "no Pod of this replica; its ConfigMap has no owner"
            );
            Some(None)
        }
        Err(error) => {
            tracing::warn!(pod = pod_name, %error, "reading this replica's Pod failed; will retry");
            None
        }
    }
}

async fn follow_peers(
    client: Client,
    namespace: String,
    pod_name: String,
    sidecars: Arc<SidecarRegistry>,
) {
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let own = config_map_name(&pod_name);
    let config =
        watcher::Config::default().labels(&format!("{}={}", COMPONENT_LABEL.0, COMPONENT_LABEL.1));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut replicas: BTreeMap<String, Replica> = BTreeMap::new();
    let mut listing: BTreeMap<String, Replica> = BTreeMap::new();
    let mut refresh = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            event = stream.next() => match event {
                None => return,
                Some(Ok(watcher::Event::Init)) => listing.clear(),
                Some(Ok(watcher::Event::InitApply(object))) => {
                    insert(&mut listing, &object);
                    continue;
                }
                Some(Ok(watcher::Event::InitDone)) => replicas = std::mem::take(&mut listing),
                Some(Ok(watcher::Event::Apply(object))) => insert(&mut replicas, &object),
                Some(Ok(watcher::Event::Delete(object))) => {
                    replicas.remove(&object.metadata.name.unwrap_or_default());
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "watching the replicas' ConfigMaps failed; retrying with backoff");
                    continue;
                }
            },
            _ = refresh.tick() => {}
        }
        let now = crate::unix_now();
        sidecars.set_peers(peer_sidecars(&replicas, &own, now), now);
    }
}

fn insert(replicas: &mut BTreeMap<String, Replica>, object: &ConfigMap) {
    let name = object.metadata.name.clone().unwrap_or_default();
    match read_replica(object) {
        Ok(replica) => {
            replicas.insert(name, replica);
        }
        Err(error) => {
            tracing::warn!(configmap = %name, %error, "ignoring a replica's unreadable ConfigMap");
            replicas.remove(&name);
        }
    }
}

#[cfg(test)]
#[path = "replica_exchange_tests.rs"]
mod tests;
