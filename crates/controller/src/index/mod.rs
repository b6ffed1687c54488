//! The index: every Chaperone object the controller has seen, compiled into one
//! snapshot per AgentIdentity with `chaperone-policy`.
//!
//! A synchronous state machine (`apply_*` / `delete_*` / `reset_*`) with no I/O:
//! the watch tasks feed it, and it publishes each agent's latest snapshot on a
//! `tokio::sync::watch` channel that the snapshot server's streams subscribe to.
//! A change recomputes only the agents it can affect (its namespace, plus the
//! delegates downstream of grants from there), and a snapshot is republished only
//! when its content hash changes.
//!
//! A published snapshot is kept as its wire bytes only (plus version, hash and
//! the two counts the status shows), encoded once when it is published and
//! shared by every stream of that agent. The compiled form is about three times
//! larger than its JSON and is dropped after encoding; the status writer decodes
//! the bytes on the rare occasions it needs the rules themselves.
//!
//! [`SharedIndex`] (in `shared`) is the one instance the controller's tasks
//! share: the index behind a lock, with a channel that ticks on every change.

mod shared;

pub use shared::SharedIndex;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use bytes::Bytes;

use chaperone_policy::{
    AgentKey, CompileError, CompileOptions, Inventory, ObjectKey, ObjectKind, ObjectRef, ObjectSet,
    Snapshot, SnapshotBytesError,
    model::{AgentIdentitySpec, DelegationGrantSpec, Object, ToolPolicySpec},
};
use tokio::sync::watch;

/// The latest snapshot of one agent; `None` until it is first compiled, or after
/// the AgentIdentity was deleted.
pub type SnapshotRx = watch::Receiver<Option<Arc<PublishedSnapshot>>>;

/// A snapshot as the index publishes it: its wire bytes (what every stream of
/// the agent sends), its version and hash, and the counts the status reports.
#[derive(Debug)]
pub struct PublishedSnapshot {
    /// [`Snapshot::version`].
    pub version: u64,
    /// [`Snapshot::hash`].
    pub hash: String,
    /// Rules in the agent's own authority.
    pub rules: usize,
    /// Distinct ToolPolicies those rules come from.
    pub policies: usize,
    bytes: Bytes,
}

impl PublishedSnapshot {
    /// Encodes `snapshot` ([`Snapshot::to_bytes`]) and keeps what the status needs.
    pub fn new(snapshot: &Snapshot) -> Self {
        let rules = &snapshot.content.authority.rules;
        let policies: BTreeSet<&str> = rules.iter().map(|r| r.policy.as_str()).collect();
        Self {
            version: snapshot.version,
            hash: snapshot.hash.clone(),
            rules: rules.len(),
            policies: policies.len(),
            bytes: Bytes::from(snapshot.to_bytes()),
        }
    }

    /// The wire bytes, shared (cloning is a reference count).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The snapshot decoded from its bytes.
    pub fn decode(&self) -> Result<Snapshot, SnapshotBytesError> {
        Snapshot::from_bytes(&self.bytes)
    }
}

/// Every object seen, the per-agent snapshots and the per-object errors.
pub struct Index {
    objects: ObjectSet,
    positions: HashMap<ObjectRef, usize>,
    agents: BTreeMap<AgentKey, AgentEntry>,
    /// Errors of the last compilation, by the object they are about.
    errors: BTreeMap<ObjectRef, Vec<CompileError>>,
    /// Errors of the objects each agent's snapshot reads (left out of it).
    agent_errors: BTreeMap<AgentKey, Vec<CompileError>>,
    last_version: u64,
    /// Bumped on every change that can alter a status.
    generation: u64,
    /// Namespaces whose objects' statuses may have changed since the status
    /// writer last took them ([`Index::take_status_dirty`]).
    status_dirty: BTreeSet<String>,
    /// Inside [`Index::batch`]: the namespaces to recompile at its end.
    deferred: Option<BTreeSet<String>>,
    /// Ticks whenever the AgentIdentities change, hence possibly who calls
    /// whom ([`Index::callers_of`]).
    identities_changed: watch::Sender<u64>,
}

struct AgentEntry {
    tx: watch::Sender<Option<Arc<PublishedSnapshot>>>,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            objects: ObjectSet::default(),
            positions: HashMap::new(),
            agents: BTreeMap::new(),
            errors: BTreeMap::new(),
            agent_errors: BTreeMap::new(),
            last_version: 0,
            generation: 0,
            status_dirty: BTreeSet::new(),
            deferred: None,
            identities_changed: watch::channel(0).0,
        }
    }

    /// Adds or replaces an AgentIdentity.
    pub fn apply_identity(&mut self, object: Object<AgentIdentitySpec>, now: i64) {
        let namespace = namespace_of(&object);
        // Our own status writes come back as watch events with an unchanged
        // model object: recompiling for them would feed back into more writes.
        if !upsert(
            &mut self.objects.identities,
            &mut self.positions,
            ObjectKind::AgentIdentity,
            object,
        ) {
            return;
        }
        self.identities_changed.send_modify(|n| *n += 1);
        self.recompute([namespace], now);
    }

    /// Adds or replaces a ToolPolicy.
    pub fn apply_policy(&mut self, object: Object<ToolPolicySpec>, now: i64) {
        let namespace = namespace_of(&object);
        // Our own status writes come back as watch events with an unchanged
        // model object: recompiling for them would feed back into more writes.
        if !upsert(
            &mut self.objects.policies,
            &mut self.positions,
            ObjectKind::ToolPolicy,
            object,
        ) {
            return;
        }
        self.recompute([namespace], now);
    }

    /// Adds or replaces a DelegationGrant.
    pub fn apply_grant(&mut self, object: Object<DelegationGrantSpec>, now: i64) {
        let namespaces = grant_namespaces(&object);
        // Our own status writes come back as watch events with an unchanged
        // model object: recompiling for them would feed back into more writes.
        if !upsert(
            &mut self.objects.grants,
            &mut self.positions,
            ObjectKind::DelegationGrant,
            object,
        ) {
            return;
        }
        self.recompute(namespaces, now);
    }

    /// Removes an AgentIdentity; its sidecars get no snapshot any more.
    pub fn delete_identity(&mut self, key: &ObjectKey, now: i64) {
        remove(
            &mut self.objects.identities,
            &mut self.positions,
            ObjectKind::AgentIdentity,
            key,
        );
        self.identities_changed.send_modify(|n| *n += 1);
        self.recompute([key.namespace.clone()], now);
    }

    /// Removes a ToolPolicy.
    pub fn delete_policy(&mut self, key: &ObjectKey, now: i64) {
        remove(
            &mut self.objects.policies,
            &mut self.positions,
            ObjectKind::ToolPolicy,
            key,
        );
        self.recompute([key.namespace.clone()], now);
    }

    /// Removes a DelegationGrant (revocation: the next snapshot lacks it).
    pub fn delete_grant(&mut self, key: &ObjectKey, now: i64) {
        let namespaces = self
            .position(ObjectKind::DelegationGrant, key)
            .map(|i| grant_namespaces(&self.objects.grants[i]))
            .unwrap_or_else(|| vec![key.namespace.clone()]);
        remove(
            &mut self.objects.grants,
            &mut self.positions,
            ObjectKind::DelegationGrant,
            key,
        );
        self.recompute(namespaces, now);
    }

    /// Replaces every AgentIdentity (after a watch re-list).
    pub fn reset_identities(&mut self, objects: Vec<Object<AgentIdentitySpec>>, now: i64) {
        self.objects.identities = objects;
        self.reindex();
        self.identities_changed.send_modify(|n| *n += 1);
        self.recompute_all(now);
    }

    /// Replaces every ToolPolicy (after a watch re-list).
    pub fn reset_policies(&mut self, objects: Vec<Object<ToolPolicySpec>>, now: i64) {
        self.objects.policies = objects;
        self.reindex();
        self.recompute_all(now);
    }

    /// Replaces every DelegationGrant (after a watch re-list).
    pub fn reset_grants(&mut self, objects: Vec<Object<DelegationGrantSpec>>, now: i64) {
        self.objects.grants = objects;
        self.reindex();
        self.recompute_all(now);
    }

    /// Runs `changes` (any `apply_*`, `delete_*` and `reset_*` calls) and then
    /// recompiles once, the union of what they affect, instead of once per
    /// change: a burst of watch events costs one recompilation.
    pub fn batch(&mut self, now: i64, changes: impl FnOnce(&mut Self)) {
        let outer = self.deferred.replace(BTreeSet::new());
        changes(self);
        let namespaces = std::mem::replace(&mut self.deferred, outer).unwrap_or_default();
        if !namespaces.is_empty() {
            self.recompute(namespaces, now);
        }
    }

    /// Recompiles every agent: grants that expired since are dropped and reported.
    pub fn recompute_all(&mut self, now: i64) {
        let namespaces: BTreeSet<String> = self
            .objects
            .identities
            .iter()
            .map(namespace_of)
            .chain(self.agents.keys().map(|k| k.namespace.clone()))
            .collect();
        self.recompute(namespaces, now);
    }

    /// The latest snapshot of `agent`, as a channel that sees every new version.
    /// Works before the AgentIdentity exists (the channel then holds `None`).
    pub fn subscribe(&mut self, agent: &AgentKey) -> SnapshotRx {
        self.agents
            .entry(agent.clone())
            .or_insert_with(|| AgentEntry {
                tx: watch::channel(None).0,
            })
            .tx
            .subscribe()
    }

    /// The agents whose sidecars may call `agent`'s inbound side: those whose
    /// AgentIdentity lists it as an `agent:` tool server (same namespace).
    /// Their keys are the only ones `agent`'s sidecars need.
    pub fn callers_of(&self, agent: &AgentKey) -> BTreeSet<AgentKey> {
        self.objects
            .identities
            .iter()
            .filter(|caller| {
                caller.metadata.namespace_or_default() == agent.namespace
                    && caller
                        .spec
                        .tool_servers
                        .iter()
                        .any(|server| server.agent.as_deref() == Some(agent.name.as_str()))
            })
            .map(key_of)
            .collect()
    }

    /// Ticks whenever the AgentIdentities change (so may [`Index::callers_of`]).
    pub fn identity_changes(&self) -> watch::Receiver<u64> {
        self.identities_changed.subscribe()
    }

    /// The current snapshot of `agent`.
    pub fn snapshot(&self, agent: &AgentKey) -> Option<Arc<PublishedSnapshot>> {
        self.agents.get(agent).and_then(|e| e.tx.borrow().clone())
    }

    /// All objects, for status computation.
    pub fn objects(&self) -> &ObjectSet {
        &self.objects
    }

    /// The compile errors about `object`.
    pub fn errors_of(&self, object: &ObjectRef) -> &[CompileError] {
        self.errors
            .get(object)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The errors of objects `agent`'s snapshot reads (they are left out of it).
    pub fn agent_errors(&self, agent: &AgentKey) -> &[CompileError] {
        self.agent_errors
            .get(agent)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The highest snapshot version handed out.
    pub fn last_version(&self) -> u64 {
        self.last_version
    }

    /// Changes every time something that a status reads changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The namespaces whose objects' statuses may have changed since the last
    /// call: the ones recompiled, and those of every agent recompiled with them.
    /// A grant's status also reads its target's namespace (see
    /// [`grant_namespaces`]); the status writer checks that one too.
    pub fn take_status_dirty(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.status_dirty)
    }

    /// The AgentIdentity `key`, if the index has it.
    pub fn identity(&self, key: &ObjectKey) -> Option<&Object<AgentIdentitySpec>> {
        self.position(ObjectKind::AgentIdentity, key)
            .map(|i| &self.objects.identities[i])
    }

    /// The ToolPolicy `key`, if the index has it.
    pub fn policy(&self, key: &ObjectKey) -> Option<&Object<ToolPolicySpec>> {
        self.position(ObjectKind::ToolPolicy, key)
            .map(|i| &self.objects.policies[i])
    }

    /// The DelegationGrant `key`, if the index has it.
    pub fn grant(&self, key: &ObjectKey) -> Option<&Object<DelegationGrantSpec>> {
        self.position(ObjectKind::DelegationGrant, key)
            .map(|i| &self.objects.grants[i])
    }

    fn position(&self, kind: ObjectKind, key: &ObjectKey) -> Option<usize> {
        self.positions
            .get(&ObjectRef {
                kind,
                key: key.clone(),
            })
            .copied()
    }

    fn reindex(&mut self) {
        self.positions.clear();
        for (i, o) in self.objects.identities.iter().enumerate() {
            self.positions
                .insert(object_ref(ObjectKind::AgentIdentity, o), i);
        }
        for (i, o) in self.objects.policies.iter().enumerate() {
            self.positions
                .insert(object_ref(ObjectKind::ToolPolicy, o), i);
        }
        for (i, o) in self.objects.grants.iter().enumerate() {
            self.positions
                .insert(object_ref(ObjectKind::DelegationGrant, o), i);
        }
    }

    /// Recompiles the agents of `namespaces` and every agent downstream of them
    /// through grants (a delegate's snapshot carries its delegators' rules).
    fn recompute(&mut self, namespaces: impl IntoIterator<Item = String>, now: i64) {
        if let Some(deferred) = self.deferred.as_mut() {
            deferred.extend(namespaces);
            return;
        }
        self.generation += 1;
        let namespaces: BTreeSet<String> = namespaces.into_iter().collect();
        // One trace span per reconcile of a change (exported over OTLP when
        // configured, see chaperone-telemetry).
        let _span = tracing::info_span!(
            "reconcile",
            otel.name = "chaperone reconcile",
            chaperone.generation = self.generation,
            chaperone.namespaces = %namespaces.iter().cloned().collect::<Vec<_>>().join(","),
        )
        .entered();
        let mut affected: BTreeSet<AgentKey> = self
            .objects
            .identities
            .iter()
            .filter(|o| namespaces.contains(o.metadata.namespace_or_default()))
            .map(key_of)
            .collect();
        affected.extend(
            self.agents
                .keys()
                .filter(|k| namespaces.contains(&k.namespace))
                .cloned(),
        );
        loop {
            let before = affected.len();
            for grant in &self.objects.grants {
                let ns = grant.metadata.namespace_or_default();
                let from = ObjectKey::new(ns, grant.spec.from.name.clone());
                if affected.contains(&from) {
                    let to_ns = grant.spec.to.namespace.as_deref().unwrap_or(ns);
                    affected.insert(ObjectKey::new(to_ns, grant.spec.to.name.clone()));
                }
            }
            if affected.len() == before {
                break;
            }
        }

        self.status_dirty.extend(namespaces.iter().cloned());
        self.status_dirty
            .extend(affected.iter().map(|a| a.namespace.clone()));

        // Errors of objects in these namespaces are recomputed below.
        self.errors
            .retain(|r, _| !namespaces.contains(&r.key.namespace));
        let inventory = self.objects.inventory();
        let options = CompileOptions { version: 0, now };
        let (existing, gone): (Vec<AgentKey>, Vec<AgentKey>) = affected
            .into_iter()
            .partition(|agent| self.position(ObjectKind::AgentIdentity, agent).is_some());
        for agent in gone {
            if let Some(entry) = self.agents.get(&agent) {
                entry
                    .tx
                    .send_if_modified(|current| current.take().is_some());
            }
            self.agent_errors.remove(&agent);
        }
        // One compiler for all the agents of this change: it indexes the
        // inventory once, not once per agent.
        let compilations = chaperone_policy::compile_each(
            existing.iter().filter_map(|agent| {
                self.position(ObjectKind::AgentIdentity, agent)
                    .map(|i| &self.objects.identities[i])
            }),
            &inventory,
            &options,
        );
        for (agent, compilation) in existing.into_iter().zip(compilations) {
            let entry = self
                .agents
                .entry(agent.clone())
                .or_insert_with(|| AgentEntry {
                    tx: watch::channel(None).0,
                });
            self.agent_errors
                .insert(agent.clone(), compilation.errors.clone());
            for error in compilation.errors {
                let list = self.errors.entry(error.object.clone()).or_default();
                if !list.contains(&error) {
                    list.push(error);
                }
            }
            let content = compilation.snapshot.content;
            let unchanged = entry
                .tx
                .borrow()
                .as_ref()
                .is_some_and(|s| s.hash == content.content_hash());
            if !unchanged {
                self.last_version = next_version(self.last_version, now);
                let snapshot = Arc::new(PublishedSnapshot::new(&Snapshot::new(
                    self.last_version,
                    content,
                )));
                entry.tx.send_replace(Some(snapshot));
            }
        }
        // Objects no agent reads still get their errors reported.
        for policy in inventory
            .policies
            .iter()
            .filter(|p| namespaces.contains(p.metadata.namespace_or_default()))
        {
            for error in chaperone_policy::check_policy(policy) {
                let list = self.errors.entry(error.object.clone()).or_default();
                if !list.contains(&error) {
                    list.push(error);
                }
            }
        }
        let known: BTreeSet<AgentKey> = inventory.identities.iter().map(key_of).collect();
        for grant in inventory
            .grants
            .iter()
            .filter(|g| namespaces.contains(g.metadata.namespace_or_default()))
        {
            if let Err(error) = chaperone_policy::check_grant_among(grant, &known, now) {
                let list = self.errors.entry(error.object.clone()).or_default();
                if !list.contains(&error) {
                    list.push(error);
                }
            }
        }
        // Forget agents that no longer exist and that nobody watches.
        self.agents.retain(|key, entry| {
            entry.tx.receiver_count() > 0
                || self.positions.contains_key(&ObjectRef {
                    kind: ObjectKind::AgentIdentity,
                    key: key.clone(),
                })
        });
    }
}

/// Versions are monotonic and start from the wall clock (milliseconds), so a
/// restarted controller never goes back to versions a sidecar has already seen.
fn next_version(last: u64, now_seconds: i64) -> u64 {
    let clock = u64::try_from(now_seconds).unwrap_or(0).saturating_mul(1000);
    (last + 1).max(clock)
}

/// Inserts or replaces `object`; false when an equal object was already there.
fn upsert<S: PartialEq>(
    list: &mut Vec<Object<S>>,
    positions: &mut HashMap<ObjectRef, usize>,
    kind: ObjectKind,
    object: Object<S>,
) -> bool {
    let key = object_ref(kind, &object);
    match positions.get(&key) {
        Some(&i) if list[i] == object => false,
        Some(&i) => {
            list[i] = object;
            true
        }
        None => {
            positions.insert(key, list.len());
            list.push(object);
            true
        }
    }
}

fn remove<S>(
    list: &mut Vec<Object<S>>,
    positions: &mut HashMap<ObjectRef, usize>,
    kind: ObjectKind,
    key: &ObjectKey,
) {
    if let Some(i) = positions.remove(&ObjectRef {
        kind,
        key: key.clone(),
    }) {
        list.swap_remove(i);
        if let Some(moved) = list.get(i) {
            positions.insert(object_ref(kind, moved), i);
        }
    }
}

fn object_ref<S>(kind: ObjectKind, object: &Object<S>) -> ObjectRef {
    ObjectRef {
        kind,
        key: key_of(object),
    }
}

/// The namespace/name key of an object.
pub fn key_of<S>(object: &Object<S>) -> ObjectKey {
    ObjectKey::new(
        object.metadata.namespace_or_default(),
        object.metadata.name.clone(),
    )
}

fn namespace_of<S>(object: &Object<S>) -> String {
    object.metadata.namespace_or_default().to_owned()
}

/// The namespaces a grant's compilation and status read: its own and its
/// target's.
pub fn grant_namespaces(grant: &Object<DelegationGrantSpec>) -> Vec<String> {
    let ns = namespace_of(grant);
    let to = grant
        .spec
        .to
        .namespace
        .clone()
        .unwrap_or_else(|| ns.clone());
    vec![ns, to]
}

/// Borrows the index's objects as the compiler's inventory.
pub fn inventory(objects: &ObjectSet) -> Inventory<'_> {
    objects.inventory()
}

#[cfg(test)]
mod tests;
