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
mod tests {
    use chaperone_policy::model::{
        AgentRef, DelegationGrantSpec, Rule, RuleAction, ToolMatch, ToolPolicySpec,
    };

    use super::*;
    use crate::test_objects::{grant as grant_to, identity, meta};

    const NOW: i64 = 1_800_000_000;

    /// A grant to an agent of the grant's own namespace.
    fn grant(ns: &str, name: &str, from: &str, to: &str) -> Object<DelegationGrantSpec> {
        grant_to(ns, name, from, None, to)
    }

    fn policy(ns: &str, name: &str, agent: &str, tool: &str) -> Object<ToolPolicySpec> {
        Object {
            api_version: "chaperone.dev/v1alpha1".into(),
            metadata: meta(ns, name),
            spec: ToolPolicySpec {
                target_refs: Some(vec![AgentRef { name: agent.into() }]),
                rules: vec![Rule {
                    name: "allow".into(),
                    action: RuleAction::Allow,
                    tools: vec![ToolMatch {
                        server: "orders".into(),
                        name: Some(tool.into()),
                        effect: None,
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    }

    fn rules_of(index: &Index, agent: &AgentKey) -> Vec<String> {
        index
            .snapshot(agent)
            .map(|s| {
                s.decode()
                    .unwrap()
                    .content
                    .authority
                    .rules
                    .iter()
                    .map(|r| format!("{}/{}", r.policy, r.name))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn publishes_a_snapshot_per_agent_with_only_its_rules() {
        let mut index = Index::new();
        index.apply_identity(identity("a", "planner"), NOW);
        index.apply_identity(identity("a", "worker"), NOW);
        index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
        index.apply_policy(policy("a", "p2", "worker", "refund"), NOW);
        let planner = ObjectKey::new("a", "planner");
        assert_eq!(rules_of(&index, &planner), ["p1/allow"]);
        assert_eq!(
            rules_of(&index, &ObjectKey::new("a", "worker")),
            ["p2/allow"]
        );
    }

    #[test]
    fn subscribers_see_new_versions_and_unchanged_content_is_not_republished() {
        let mut index = Index::new();
        let planner = ObjectKey::new("a", "planner");
        let mut rx = index.subscribe(&planner);
        assert!(rx.borrow_and_update().is_none());
        index.apply_identity(identity("a", "planner"), NOW);
        assert!(rx.has_changed().unwrap());
        let first = rx.borrow_and_update().clone().unwrap();
        // Re-applying the same object changes nothing.
        index.apply_identity(identity("a", "planner"), NOW);
        assert!(!rx.has_changed().unwrap());
        index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
        let second = rx.borrow_and_update().clone().unwrap();
        assert!(second.version > first.version);
        assert_ne!(second.hash, first.hash);
    }

    #[test]
    fn an_unchanged_object_changes_nothing() {
        let mut index = Index::new();
        index.apply_identity(identity("a", "planner"), NOW);
        index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
        let generation = index.generation();
        // What our own status writes look like from the watch: the same object.
        index.apply_identity(identity("a", "planner"), NOW);
        index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
        assert_eq!(index.generation(), generation);
    }

    #[test]
    fn other_namespaces_are_not_recompiled() {
        let mut index = Index::new();
        index.apply_identity(identity("a", "planner"), NOW);
        index.apply_identity(identity("b", "planner"), NOW);
        let mut rx_b = index.subscribe(&ObjectKey::new("b", "planner"));
        rx_b.borrow_and_update();
        index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
        assert!(!rx_b.has_changed().unwrap());
    }

    #[test]
    fn deleting_an_identity_withdraws_its_snapshot() {
        let mut index = Index::new();
        let planner = ObjectKey::new("a", "planner");
        let rx = index.subscribe(&planner);
        index.apply_identity(identity("a", "planner"), NOW);
        assert!(rx.borrow().is_some());
        index.delete_identity(&planner, NOW);
        assert!(rx.borrow().is_none());
    }

    #[test]
    fn deleting_a_grant_is_pushed_to_the_delegate() {
        let mut index = Index::new();
        index.apply_identity(identity("a", "planner"), NOW);
        index.apply_identity(identity("a", "worker"), NOW);
        index.apply_grant(grant("a", "g", "planner", "worker"), NOW);
        let worker = ObjectKey::new("a", "worker");
        let mut rx = index.subscribe(&worker);
        assert_eq!(
            rx.borrow_and_update()
                .as_ref()
                .unwrap()
                .decode()
                .unwrap()
                .content
                .grants_received
                .len(),
            1
        );
        index.delete_grant(&ObjectKey::new("a", "g"), NOW);
        assert!(rx.has_changed().unwrap());
        assert!(
            rx.borrow_and_update()
                .as_ref()
                .unwrap()
                .decode()
                .unwrap()
                .content
                .grants_received
                .is_empty()
        );
    }

    #[test]
    fn delegates_in_other_namespaces_are_recompiled_when_the_delegator_changes() {
        let mut index = Index::new();
        index.apply_identity(identity("a", "planner"), NOW);
        index.apply_identity(identity("b", "worker"), NOW);
        let mut g = grant("a", "g", "planner", "worker");
        g.spec.to.namespace = Some("b".into());
        index.apply_grant(g, NOW);
        let mut rx = index.subscribe(&ObjectKey::new("b", "worker"));
        rx.borrow_and_update();
        index.apply_policy(policy("a", "p1", "planner", "get_order"), NOW);
        assert!(
            rx.has_changed().unwrap(),
            "the worker carries the planner's rules"
        );
    }

    #[test]
    fn a_broken_policy_is_reported_and_the_others_still_served() {
        let mut index = Index::new();
        index.apply_identity(identity("a", "planner"), NOW);
        index.apply_policy(policy("a", "good", "planner", "get_order"), NOW);
        let mut bad = policy("a", "bad", "planner", "refund");
        bad.spec.rules[0].when = Some(chaperone_policy::model::Conditions {
            expression: Some("secrets.all == true".into()),
            ..Default::default()
        });
        index.apply_policy(bad, NOW);
        let bad_ref = ObjectRef {
            kind: ObjectKind::ToolPolicy,
            key: ObjectKey::new("a", "bad"),
        };
        let errors = index.errors_of(&bad_ref);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].rule.as_deref(), Some("allow"));
        assert_eq!(
            rules_of(&index, &ObjectKey::new("a", "planner")),
            ["good/allow"]
        );
        let good_ref = ObjectRef {
            kind: ObjectKind::ToolPolicy,
            key: ObjectKey::new("a", "good"),
        };
        assert!(index.errors_of(&good_ref).is_empty());
    }

    #[test]
    fn callers_are_the_agents_listing_an_agent_as_a_tool_server_in_its_namespace() {
        let mut index = Index::new();
        let calling = |ns: &str, name: &str| {
            let mut caller = identity(ns, name);
            caller.spec.tool_servers[0].agent = Some("worker".into());
            caller
        };
        index.apply_identity(calling("a", "planner"), NOW);
        index.apply_identity(identity("a", "worker"), NOW);
        index.apply_identity(calling("b", "planner"), NOW);
        let worker = ObjectKey::new("a", "worker");
        assert_eq!(
            index.callers_of(&worker),
            BTreeSet::from([ObjectKey::new("a", "planner")])
        );
        assert!(index.callers_of(&ObjectKey::new("a", "planner")).is_empty());
        let changes = index.identity_changes();
        index.delete_identity(&ObjectKey::new("a", "planner"), NOW);
        assert!(
            changes.has_changed().unwrap(),
            "streams re-read their callers"
        );
        assert!(index.callers_of(&worker).is_empty());
    }

    #[test]
    fn swap_remove_keeps_positions_consistent() {
        let mut index = Index::new();
        for name in ["a1", "a2", "a3"] {
            index.apply_identity(identity("a", name), NOW);
        }
        index.delete_identity(&ObjectKey::new("a", "a1"), NOW);
        let mut moved = identity("a", "a3");
        moved.spec.tool_servers[0].name = "billing".into();
        index.apply_identity(moved, NOW);
        assert_eq!(index.objects().identities.len(), 2);
        let a3 = index.snapshot(&ObjectKey::new("a", "a3")).unwrap();
        assert_eq!(a3.decode().unwrap().content.tool_servers[0].name, "billing");
    }

    #[test]
    fn a_published_snapshot_is_its_encoding_shared_by_every_stream() {
        let mut index = Index::new();
        let planner = ObjectKey::new("a", "planner");
        let (first, second) = (index.subscribe(&planner), index.subscribe(&planner));
        index.apply_identity(identity("a", "planner"), NOW);
        let (first, second) = (
            first.borrow().clone().unwrap(),
            second.borrow().clone().unwrap(),
        );
        // Both streams hold the same published value, hence the same bytes.
        assert!(Arc::ptr_eq(&first, &second));
        let decoded = first.decode().unwrap();
        assert!(decoded.hash_is_valid());
        assert_eq!(
            (decoded.version, &decoded.hash),
            (first.version, &first.hash)
        );
        assert_eq!(first.bytes().as_ref(), decoded.to_bytes().as_slice());
        assert_eq!(first.bytes().as_ptr(), second.bytes().as_ptr());
    }

    #[test]
    fn versions_are_monotonic_from_the_clock() {
        assert_eq!(next_version(0, 10), 10_000);
        assert_eq!(next_version(10_000, 10), 10_001);
        assert_eq!(next_version(5, -1), 6);
    }
}
