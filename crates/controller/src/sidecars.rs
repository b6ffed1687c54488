//! What this replica knows of the sidecars connected to it: which snapshot each
//! runs (ACK) or rejected (NACK), its public signing key, the tools it saw
//! (with their definitions), and how much audit it shipped. Feeds the AgentIdentity status and the JWKS.
//!
//! Tool-mode sidecars are recorded too (without an agent), so that deleting
//! their pod ends their stream; they count for no AgentIdentity and their
//! entries never carry a key.
//!
//! It also holds what the other controller replicas published of their agent
//! sidecars ([`crate::replica_exchange`]): the JWKS and the status counts are
//! the union of this replica's sidecars and theirs.
//!
//! The JWKS JSON is built once per change of the key set and shared by every
//! stream that sends it ([`SidecarRegistry::jwks_json`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use chaperone_policy::AgentKey;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    auth::{SidecarIdentity, ToolSidecarIdentity},
    tool_definitions::Inventory,
};

/// One connected sidecar.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SidecarState {
    /// The agent it is; `None` for a tool-mode sidecar.
    pub agent: Option<AgentKey>,
    /// Pod uid.
    pub pod_uid: String,
    /// Which stream of this pod (a reconnect replaces the entry).
    pub connection: u64,
    /// Last acknowledged (version, hash).
    pub acked: Option<(u64, String)>,
    /// When it last acknowledged a snapshot, unix seconds.
    pub acked_at: Option<i64>,
    /// Last rejected version and why.
    pub rejected: Option<(u64, String)>,
    /// Its signing key: (kid, public JWK).
    pub key: Option<(String, Value)>,
    /// Tools it saw in tools/list, by (server, tool), with their
    /// definitions where the server's pinning is not off.
    pub inventory: Inventory,
    /// Its build, from its hello (empty until then).
    pub sidecar_version: String,
    /// When its stream opened, unix seconds.
    pub connected_at: i64,
}

/// This replica's sidecars, counted ([`SidecarRegistry::own_tally`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnTally {
    /// Agent sidecars (pods).
    pub agent_sidecars: usize,
    /// Tool-mode sidecars (pods).
    pub tool_sidecars: usize,
    /// Per agent with at least one sidecar here.
    pub per_agent: BTreeMap<AgentKey, AgentTally>,
}

/// One agent's sidecars on this replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentTally {
    /// Connected.
    pub connected: usize,
    /// Connected and ACKed the agent's current snapshot.
    pub in_sync: usize,
}

/// (namespace, pod).
type PodKey = (String, String);
/// A stream's connection number and the signal that ends it.
type StreamCloser = (u64, Arc<tokio::sync::Notify>);

/// The connected sidecars of this replica, by (namespace, pod).
#[derive(Default)]
pub struct SidecarRegistry {
    sidecars: Mutex<BTreeMap<(String, String), SidecarState>>,
    changed: watch::Sender<u64>,
    keys_changed: watch::Sender<u64>,
    connections: std::sync::atomic::AtomicU64,
    /// Per open stream: its connection number and how to end it.
    closers: Mutex<BTreeMap<PodKey, StreamCloser>>,
    /// The agent sidecars of the other replicas.
    peers: Mutex<PeerView>,
    /// [`SidecarRegistry::jwks`] as JSON; `None` after the key set changed,
    /// until the next read rebuilds it.
    jwks_json: Mutex<Option<Arc<str>>>,
    /// Agents whose sidecars changed since the status writer last took them
    /// ([`SidecarRegistry::take_status_dirty`]).
    status_dirty: Mutex<BTreeSet<AgentKey>>,
}

/// What the other replicas published, less the pods deleted since.
#[derive(Default)]
struct PeerView {
    /// Their agent sidecars by (namespace, pod); `connection` is meaningless.
    sidecars: BTreeMap<PodKey, SidecarState>,
    /// Uids of pods seen deleted, with when (unix seconds): their entries are
    /// dropped at once, before the replica holding them publishes again.
    deleted: BTreeMap<String, i64>,
}

/// How long a deleted pod's uid is remembered: longer than a replica takes
/// to publish that its stream ended.
const DELETED_POD_MEMORY_SECS: i64 = 300;

impl SidecarRegistry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records a new stream; the returned guard removes the sidecar (and its key)
    /// when the stream ends.
    pub fn connect(self: &Arc<Self>, identity: &SidecarIdentity) -> ConnectionGuard {
        self.register(
            &identity.agent.namespace,
            &identity.pod,
            &identity.pod_uid,
            Some(identity.agent.clone()),
        )
    }

    /// Records a tool-mode sidecar's stream: no agent, never a key.
    pub fn connect_tool(self: &Arc<Self>, identity: &ToolSidecarIdentity) -> ConnectionGuard {
        self.register(&identity.namespace, &identity.pod, &identity.pod_uid, None)
    }

    fn register(
        self: &Arc<Self>,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
        agent: Option<AgentKey>,
    ) -> ConnectionGuard {
        let key = (namespace.to_owned(), pod.to_owned());
        let connection = self
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let had_key = self.modify(&key, |map| {
            map.insert(
                key.clone(),
                SidecarState {
                    agent,
                    pod_uid: pod_uid.to_owned(),
                    connection,
                    connected_at: crate::unix_now(),
                    ..Default::default()
                },
            )
            .is_some_and(|previous| previous.key.is_some())
        });
        if had_key {
            // A reconnect replaced an entry with a key: the key set changed.
            self.keys_changed();
        }
        let closer = Arc::new(tokio::sync::Notify::new());
        self.closers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), (connection, closer.clone()));
        ConnectionGuard {
            registry: self.clone(),
            key,
            connection,
            closer,
        }
    }

    /// Ends the stream of `namespace/pod` (its pod was deleted): its key leaves
    /// the JWKS at once.
    pub fn evict(&self, namespace: &str, pod: &str) {
        let closer = self
            .closers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(namespace.to_owned(), pod.to_owned()))
            .map(|(_, c)| c.clone());
        if let Some(closer) = closer {
            closer.notify_one();
        }
    }

    /// Applies `change` to one sidecar's state. A tool-mode sidecar's entry
    /// keeps no key whatever `change` does.
    pub fn update(&self, namespace: &str, pod: &str, change: impl FnOnce(&mut SidecarState)) {
        self.update_where(namespace, pod, None, change);
    }

    /// [`SidecarRegistry::update`] on behalf of stream `connection`
    /// ([`ConnectionGuard::id`]): ignored once a reconnect of the same pod
    /// replaced its entry, so a stream left over from before the reconnect
    /// cannot overwrite what the live one reported (its ACK of an older
    /// snapshot, say).
    pub fn update_stream(
        &self,
        namespace: &str,
        pod: &str,
        connection: u64,
        change: impl FnOnce(&mut SidecarState),
    ) {
        self.update_where(namespace, pod, Some(connection), change);
    }

    fn update_where(
        &self,
        namespace: &str,
        pod: &str,
        connection: Option<u64>,
        change: impl FnOnce(&mut SidecarState),
    ) {
        let key = (namespace.to_owned(), pod.to_owned());
        let key_changed = self.modify(&key, |map| {
            let state = map
                .get_mut(&key)
                .filter(|state| connection.is_none_or(|c| c == state.connection));
            state.is_some_and(|state| {
                let before = state.key.clone();
                change(state);
                if state.agent.is_none() {
                    state.key = None;
                }
                before != state.key
            })
        });
        if key_changed {
            self.keys_changed();
        }
    }

    /// Replaces the other replicas' agent sidecars (by namespace and pod) with
    /// `sidecars`, leaving out pods seen deleted. Ticks [`Self::changes`] if
    /// anything changed and [`Self::key_changes`] if their keys did.
    pub fn set_peers(&self, sidecars: BTreeMap<PodKey, SidecarState>, now: i64) {
        let (changed, keys_changed) = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers
                .deleted
                .retain(|_, at| now - *at < DELETED_POD_MEMORY_SECS);
            let deleted = &peers.deleted;
            let sidecars: BTreeMap<PodKey, SidecarState> = sidecars
                .into_iter()
                .filter(|(_, s)| s.agent.is_some() && !deleted.contains_key(&s.pod_uid))
                .collect();
            let before = std::mem::replace(&mut peers.sidecars, sidecars);
            self.mark_changed_agents(&before, &peers.sidecars);
            peers_differ(before, &peers.sidecars)
        };
        self.notify_peer_change(changed, keys_changed);
    }

    /// Forgets the other replicas' entry of a deleted pod (by uid) now, and
    /// ignores it in what they publish for a while.
    pub fn forget_peer_pod(&self, pod_uid: &str, now: i64) {
        let (changed, keys_changed) = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers.deleted.insert(pod_uid.to_owned(), now);
            let before = peers.sidecars.clone();
            peers.sidecars.retain(|_, s| s.pod_uid != pod_uid);
            self.mark_changed_agents(&before, &peers.sidecars);
            peers_differ(before, &peers.sidecars)
        };
        self.notify_peer_change(changed, keys_changed);
    }

    fn notify_peer_change(&self, changed: bool, keys_changed: bool) {
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
        if keys_changed {
            self.keys_changed();
        }
    }

    /// This replica's own sidecars, agent and tool-mode, by (namespace, pod):
    /// what it publishes ([`crate::replica_exchange`]).
    pub fn own_sidecars(&self) -> BTreeMap<PodKey, SidecarState> {
        let map = self.sidecars.lock().unwrap_or_else(|p| p.into_inner());
        map.clone()
    }

    /// This replica's own agent sidecars, by (namespace, pod): what the
    /// other replicas take from it.
    pub fn own_agent_sidecars(&self) -> BTreeMap<PodKey, SidecarState> {
        let map = self.sidecars.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, s)| s.agent.is_some())
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// Ticks on every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Ticks when the set of signing keys changes.
    pub fn key_changes(&self) -> watch::Receiver<u64> {
        self.keys_changed.subscribe()
    }

    /// The sidecars of `agent`, on this replica or another: (pod, state). A pod
    /// both here and in another replica's (older) view counts once, as here.
    pub fn of_agent(&self, agent: &AgentKey) -> Vec<(String, SidecarState)> {
        self.of_agents(&BTreeSet::from([agent.clone()]))
            .remove(agent)
            .unwrap_or_default()
    }

    /// [`SidecarRegistry::of_agent`] for several agents in one pass over the
    /// registry; agents without a sidecar are left out.
    pub fn of_agents(
        &self,
        agents: &BTreeSet<AgentKey>,
    ) -> BTreeMap<AgentKey, Vec<(String, SidecarState)>> {
        let wanted = |s: &SidecarState| s.agent.as_ref().is_some_and(|a| agents.contains(a));
        let mut all: BTreeMap<PodKey, SidecarState> = {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers
                .sidecars
                .iter()
                .filter(|(_, s)| wanted(s))
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect()
        };
        {
            let own = self.sidecars.lock().unwrap_or_else(|p| p.into_inner());
            all.extend(
                own.iter()
                    .filter(|(_, s)| wanted(s))
                    .map(|(k, s)| (k.clone(), s.clone())),
            );
        }
        let mut by_agent: BTreeMap<AgentKey, Vec<(String, SidecarState)>> = BTreeMap::new();
        for ((_, pod), state) in all {
            if let Some(agent) = state.agent.clone() {
                by_agent.entry(agent).or_default().push((pod, state));
            }
        }
        by_agent
    }

    /// The agents whose sidecars (here or on another replica) changed since
    /// the last call: the status writer recomputes only their statuses.
    pub fn take_status_dirty(&self) -> BTreeSet<AgentKey> {
        std::mem::take(&mut *self.status_dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn mark_status_dirty(&self, agents: impl IntoIterator<Item = AgentKey>) {
        self.status_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(agents);
    }

    /// Marks the agents of the peer entries that differ between `before` and
    /// `after`.
    fn mark_changed_agents(
        &self,
        before: &BTreeMap<PodKey, SidecarState>,
        after: &BTreeMap<PodKey, SidecarState>,
    ) {
        let changed = before
            .iter()
            .filter(|(k, s)| after.get(*k) != Some(*s))
            .chain(after.iter().filter(|(k, s)| before.get(*k) != Some(*s)))
            .filter_map(|(_, s)| s.agent.clone());
        self.mark_status_dirty(changed);
    }

    /// Number of sidecars connected to this replica (agent and tool mode).
    pub fn len(&self) -> usize {
        self.sidecars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether no sidecar is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This replica's sidecars counted for the gauges: one per pod (the
    /// registry holds one entry per pod, from whichever of its streams
    /// registered last), agents' and tool-mode ones apart, and per agent how
    /// many ACKed the hash `current_hash` gives for it.
    pub fn own_tally<'a>(&self, current_hash: impl Fn(&AgentKey) -> Option<&'a str>) -> OwnTally {
        let map = self.sidecars.lock().unwrap_or_else(|p| p.into_inner());
        let mut tally = OwnTally::default();
        for state in map.values() {
            let Some(agent) = &state.agent else {
                tally.tool_sidecars += 1;
                continue;
            };
            tally.agent_sidecars += 1;
            let counts = tally.per_agent.entry(agent.clone()).or_default();
            counts.connected += 1;
            let current = current_hash(agent);
            if state
                .acked
                .as_ref()
                .is_some_and(|(_, hash)| current == Some(hash.as_str()))
            {
                counts.in_sync += 1;
            }
        }
        tally
    }

    /// The public keys of the live agent sidecars of every replica as a JWKS,
    /// one per kid; each key names its agent and pod so a verifier knows whose
    /// assertion it checks. The one place the JWKS is built.
    pub fn jwks(&self) -> Value {
        self.jwks_where(|_| true)
    }

    /// [`SidecarRegistry::jwks`] of the sidecars of `agents` only, serialised:
    /// what one agent's sidecars need to verify their callers.
    pub fn jwks_json_of(&self, agents: &BTreeSet<AgentKey>) -> String {
        if agents.is_empty() {
            return json!({ "keys": [] }).to_string();
        }
        self.jwks_where(|agent| agents.contains(agent)).to_string()
    }

    /// The keys of the agent sidecars (this replica's first, then the other
    /// replicas' not also here) whose agent passes `wanted`, one per kid.
    fn jwks_where(&self, wanted: impl Fn(&AgentKey) -> bool) -> Value {
        let mut kids = BTreeSet::new();
        let mut keys = Vec::new();
        let mut add = |(namespace, pod): &PodKey, state: &SidecarState| {
            if state.agent.as_ref().is_some_and(&wanted)
                && let Some(jwk) = jwk_of(namespace, pod, state)
                && kids.insert(jwk["kid"].as_str().unwrap_or_default().to_owned())
            {
                keys.push(jwk);
            }
        };
        // One lock at a time; this replica's view of a pod wins.
        let own: BTreeSet<PodKey> = {
            let map = self.sidecars.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().for_each(|(pod, state)| add(pod, state));
            map.keys().cloned().collect()
        };
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .sidecars
            .iter()
            .filter(|(pod, _)| !own.contains(*pod))
            .for_each(|(pod, state)| add(pod, state));
        drop(peers);
        keys.sort_by(|a, b| {
            a["chaperone.dev/pod"]
                .as_str()
                .cmp(&b["chaperone.dev/pod"].as_str())
        });
        json!({ "keys": keys })
    }

    /// [`SidecarRegistry::jwks`] serialised, rebuilt only after the key set
    /// changed: every stream sending the key set shares this one string.
    pub fn jwks_json(&self) -> Arc<str> {
        // Built under the cache's lock: an invalidation that lands meanwhile
        // waits for it and then clears it, so a stale set is never kept.
        let mut cached = self.jwks_json.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .get_or_insert_with(|| self.jwks().to_string().into())
            .clone()
    }

    /// The key set changed: drop the cached JWKS, then wake the streams.
    fn keys_changed(&self) {
        *self.jwks_json.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.keys_changed.send_modify(|n| *n += 1);
    }

    /// Applies `change`, which touches the entry of `pod` only, marks the
    /// agent it had and the one it has for the status writer, and ticks
    /// [`Self::changes`].
    fn modify<T>(
        &self,
        pod: &PodKey,
        change: impl FnOnce(&mut BTreeMap<(String, String), SidecarState>) -> T,
    ) -> T {
        let (result, agents) = {
            let mut map = self.sidecars.lock().unwrap_or_else(|p| p.into_inner());
            let agent = |map: &BTreeMap<PodKey, SidecarState>| map.get(pod)?.agent.clone();
            let before = agent(&map);
            let result = change(&mut map);
            (result, [before, agent(&map)])
        };
        self.mark_status_dirty(agents.into_iter().flatten());
        self.changed.send_modify(|n| *n += 1);
        result
    }
}

/// The JWKS entry of a sidecar's key: the public JWK with its `kid`, `use`,
/// and the agent and pod it belongs to; `None` without a key or an agent.
pub fn jwk_of(namespace: &str, pod: &str, state: &SidecarState) -> Option<Value> {
    let (kid, jwk) = state.key.as_ref()?;
    let agent = state.agent.as_ref()?;
    let mut jwk = jwk.clone();
    let object = jwk.as_object_mut()?;
    object.insert("kid".into(), json!(kid));
    object.insert("use".into(), json!("sig"));
    object.insert(
        "chaperone.dev/agent".into(),
        json!(format!("{}/{}", agent.namespace, agent.name)),
    );
    object.insert(
        "chaperone.dev/pod".into(),
        json!(format!("{namespace}/{pod}")),
    );
    Some(jwk)
}

/// Whether the peer view changed at all, and whether its keys did.
fn peers_differ(
    before: BTreeMap<PodKey, SidecarState>,
    after: &BTreeMap<PodKey, SidecarState>,
) -> (bool, bool) {
    let keys = |m: &BTreeMap<PodKey, SidecarState>| -> Vec<(PodKey, Option<(String, Value)>)> {
        m.iter().map(|(k, s)| (k.clone(), s.key.clone())).collect()
    };
    (before != *after, keys(&before) != keys(after))
}

/// Removes a sidecar from the registry when its stream ends.
pub struct ConnectionGuard {
    registry: Arc<SidecarRegistry>,
    key: (String, String),
    connection: u64,
    closer: Arc<tokio::sync::Notify>,
}

impl ConnectionGuard {
    /// The stream's connection number (for [`SidecarRegistry::update_stream`]).
    pub fn id(&self) -> u64 {
        self.connection
    }

    /// Resolves when the registry ends this stream ([`SidecarRegistry::evict`]).
    pub async fn evicted(&self) {
        self.closer.notified().await
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let had_key = self.registry.modify(&self.key, |map| {
            // A reconnect of the same pod may already have replaced the entry.
            if map
                .get(&self.key)
                .is_some_and(|s| s.connection == self.connection)
            {
                map.remove(&self.key).is_some_and(|s| s.key.is_some())
            } else {
                false
            }
        });
        let mut closers = self
            .registry
            .closers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if closers
            .get(&self.key)
            .is_some_and(|(c, _)| *c == self.connection)
        {
            closers.remove(&self.key);
        }
        drop(closers);
        if had_key {
            self.registry.keys_changed();
        }
    }
}

#[cfg(test)]
#[path = "sidecars_tests.rs"]
mod tests;
