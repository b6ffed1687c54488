//! The compiler: AgentIdentities, ToolPolicies and DelegationGrants in, one
//! [`Snapshot`] per agent and per-object errors out.
//!
//! Errors are per object: a ToolPolicy with one rule that does not compile is
//! left out whole and reported (object, rule, reason); every other policy still
//! compiles. A grant that names an unknown agent, is malformed or has expired is
//! left out and reported, so the controller can set its Invalid/Expired status.
//! A tool definition pin (`tools[].definition`) must name one tool (no globs)
//! and be a `sha256:` hash, or its policy is left out too; pins of one tool
//! that contradict each other across an agent's policies are reported on each
//! policy involved, which stay in: the tool's pin is conflicting and matches
//! no definition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use thiserror::Error;

use crate::decision::{AgentKey, GrantKey, ObjectKey};
use crate::engine::{RuleError, check_grant_scope, check_rule};
use crate::expiry::{ExpiryError, grant_expires_at};
use crate::glob::is_glob;
use crate::model::{
    AgentIdentitySpec, Conditions, DelegationGrantSpec, Document, MAX_DELEGATION_DEPTH, Object,
    RuleAction, ToolClassification, ToolPolicySpec,
};
use crate::pinning::is_definition_hash;
use crate::snapshot::{
    AgentAuthority, SNAPSHOT_FORMAT, Snapshot, SnapshotContent, SnapshotGrant, SnapshotPin,
    SnapshotRateLimit, SnapshotRule,
};

/// Everything the compiler reads: all objects of the cluster (or of a set of
/// files). Other agents' objects are needed for delegation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inventory<'a> {
    /// Every AgentIdentity.
    pub identities: &'a [Object<AgentIdentitySpec>],
    /// Every ToolPolicy.
    pub policies: &'a [Object<ToolPolicySpec>],
    /// Every DelegationGrant.
    pub grants: &'a [Object<DelegationGrantSpec>],
}

/// Owned objects sorted by kind, e.g. read from YAML files; lend them to the
/// compiler with [`ObjectSet::inventory`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectSet {
    /// AgentIdentities.
    pub identities: Vec<Object<AgentIdentitySpec>>,
    /// ToolPolicies.
    pub policies: Vec<Object<ToolPolicySpec>>,
    /// DelegationGrants.
    pub grants: Vec<Object<DelegationGrantSpec>>,
}

impl ObjectSet {
    /// Sorts documents by kind.
    pub fn from_documents(documents: impl IntoIterator<Item = Document>) -> Self {
        let mut set = Self::default();
        set.extend(documents);
        set
    }

    /// Adds documents.
    pub fn extend(&mut self, documents: impl IntoIterator<Item = Document>) {
        for document in documents {
            match document {
                Document::AgentIdentity(o) => self.identities.push(o),
                Document::ToolPolicy(o) => self.policies.push(o),
                Document::DelegationGrant(o) => self.grants.push(o),
            }
        }
    }

    /// The objects as an [`Inventory`].
    pub fn inventory(&self) -> Inventory<'_> {
        Inventory {
            identities: &self.identities,
            policies: &self.policies,
            grants: &self.grants,
        }
    }
}

/// Settings of one compilation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// Version to stamp on the snapshots (the controller's monotonic counter).
    pub version: u64,
    /// Current unix time: grants expired by then are left out and reported; a
    /// `ttl` grant without `creationTimestamp` (read from a file) counts from it.
    pub now: i64,
}

/// The kind of a Chaperone object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// An AgentIdentity.
    AgentIdentity,
    /// A ToolPolicy.
    ToolPolicy,
    /// A DelegationGrant.
    DelegationGrant,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::AgentIdentity => "AgentIdentity",
            ObjectKind::ToolPolicy => "ToolPolicy",
            ObjectKind::DelegationGrant => "DelegationGrant",
        })
    }
}

/// An object by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Its kind.
    pub kind: ObjectKind,
    /// Its namespace and name.
    pub key: ObjectKey,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key)
    }
}

/// What is wrong with an object.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CompileErrorReason {
    /// A rule's (or grant's) tools or conditions do not compile.
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// Two rules of a policy share a name.
    #[error("rule name is used twice in the policy; rename one")]
    DuplicateRule,
    /// A deny rule has a rate limit.
    #[error("rateLimit is only meaningful on an allow rule")]
    RateLimitOnDeny,
    /// A requireApproval rule has a rate limit (not supported: limit the calls
    /// with an allow rule's rateLimit, or a session condition).
    #[error(
        "rateLimit is not supported on a requireApproval rule: put it on an allow rule, or use a session condition"
    )]
    RateLimitOnRequireApproval,
    /// A rule that is not requireApproval has `approval` settings.
    #[error(
        "approval is only meaningful on a requireApproval rule, not on a {action} rule: set action: requireApproval or remove approval"
    )]
    ApprovalOnOtherAction {
        /// The rule's action (`allow` or `deny`).
        action: &'static str,
    },
    /// A rate limit of zero calls or a zero period.
    #[error("rateLimit needs calls >= 1 and periodSeconds >= 1")]
    InvalidRateLimit,
    /// A policy sets both or neither of targetRefs and agentSelector.
    #[error("set exactly one of targetRefs or agentSelector")]
    AmbiguousTargets,
    /// A grant names an AgentIdentity that does not exist.
    #[error("{role} AgentIdentity {agent} does not exist")]
    UnknownAgent {
        /// `from` or `to`.
        role: &'static str,
        /// The missing agent.
        agent: AgentKey,
    },
    /// The grant's expiry cannot be resolved.
    #[error(transparent)]
    Expiry(#[from] ExpiryError),
    /// The grant has expired.
    #[error("the grant expired at unix time {expired_at}")]
    GrantExpired {
        /// When (unix seconds).
        expired_at: i64,
    },
    /// `maxDepth` above the limit.
    #[error("maxDepth {max_depth} is above the limit of 8")]
    MaxDepthTooLarge {
        /// The value.
        max_depth: u32,
    },
    /// A `tools[]` entry pins a definition but names its server or tool by
    /// glob (or `*`): a pin is of one tool.
    #[error(
        "tools[] entry {server}/{tool} pins a definition but uses a glob: a pin names one tool (a literal server and tool name)"
    )]
    PinNotLiteral {
        /// The entry's server.
        server: String,
        /// The entry's tool name.
        tool: String,
    },
    /// A `tools[]` entry's `definition` is not `sha256:` and 64 lowercase
    /// hex digits.
    #[error(
        "tools[] entry {server}/{tool} pins definition {definition:?}, which is not sha256: and 64 lowercase hex digits"
    )]
    MalformedPin {
        /// The entry's server.
        server: String,
        /// The entry's tool name.
        tool: String,
        /// The value given.
        definition: String,
    },
    /// The policies targeting an agent pin one tool to different
    /// definitions. The policies stay in; the tool matches no definition, so
    /// it is blocked where its server's `toolPinning` is `enforce`.
    #[error(
        "tool {server}/{tool} is pinned to different definitions ({}) by ToolPolicies {}: conflicting pins block it where toolPinning is enforce; keep one pin",
        definitions.join(", "),
        policies.join(", ")
    )]
    ConflictingPins {
        /// The tool server.
        server: String,
        /// The tool.
        tool: String,
        /// The policies pinning the tool (names, same namespace), sorted.
        policies: Vec<String>,
        /// The hashes they pin, sorted.
        definitions: Vec<String>,
    },
}

/// An error in one object (and rule), with enough to set its status.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{object}{}: {reason}", rule.as_ref().map(|r| format!(" rule {r:?}")).unwrap_or_default())]
pub struct CompileError {
    /// The object.
    pub object: ObjectRef,
    /// The rule, for ToolPolicy errors about one rule.
    pub rule: Option<String>,
    /// What is wrong.
    pub reason: Box<CompileErrorReason>,
}

/// The snapshot of one agent and the errors of the objects it reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Compilation {
    /// The snapshot (broken objects left out).
    pub snapshot: Snapshot,
    /// Errors of the policies and grants that concern this agent, sorted.
    pub errors: Vec<CompileError>,
}

/// Snapshots of every agent and the errors of every object.
#[derive(Clone, Debug, PartialEq)]
pub struct InventoryCompilation {
    /// One snapshot per AgentIdentity, sorted by agent.
    pub snapshots: Vec<Snapshot>,
    /// Every object error, sorted and without duplicates.
    pub errors: Vec<CompileError>,
}

/// Compiles the snapshot of `identity`.
pub fn compile(
    identity: &Object<AgentIdentitySpec>,
    inventory: &Inventory<'_>,
    options: &CompileOptions,
) -> Compilation {
    let mut compiler = Compiler::new(inventory, options);
    let (snapshot, errors) = compiler.snapshot(identity);
    Compilation { snapshot, errors }
}

/// [`compile`] for each of `identities` with one compiler: the inventory is
/// indexed, and each policy and grant checked, once for all of them rather
/// than once per identity.
pub fn compile_each<'i>(
    identities: impl IntoIterator<Item = &'i Object<AgentIdentitySpec>>,
    inventory: &Inventory<'_>,
    options: &CompileOptions,
) -> Vec<Compilation> {
    let mut compiler = Compiler::new(inventory, options);
    identities
        .into_iter()
        .map(|identity| {
            let (snapshot, errors) = compiler.snapshot(identity);
            Compilation { snapshot, errors }
        })
        .collect()
}

/// Compiles every AgentIdentity of the inventory, and reports every broken
/// object once (also those no agent reads).
pub fn compile_all(inventory: &Inventory<'_>, options: &CompileOptions) -> InventoryCompilation {
    let mut compiler = Compiler::new(inventory, options);
    let mut errors = Vec::new();
    let mut snapshots: Vec<Snapshot> = inventory
        .identities
        .iter()
        .map(|identity| {
            let (snapshot, agent_errors) = compiler.snapshot(identity);
            // Conflicting pins are the only errors that need an agent: the
            // others are each object's own, collected below.
            errors.extend(
                agent_errors
                    .into_iter()
                    .filter(|e| matches!(*e.reason, CompileErrorReason::ConflictingPins { .. })),
            );
            snapshot
        })
        .collect();
    snapshots.sort_by(|a, b| a.content.agent.cmp(&b.content.agent));
    for i in 0..inventory.policies.len() {
        if let Err(e) = compiler.policy_rules(i) {
            errors.extend(e.iter().cloned());
        }
    }
    for i in 0..inventory.grants.len() {
        if let Err(e) = compiler.grant(i) {
            errors.push(e.clone());
        }
    }
    sort_errors(&mut errors);
    InventoryCompilation { snapshots, errors }
}

/// Checks one ToolPolicy on its own: every error of the object (empty when it
/// compiles). For the controller's status.
pub fn check_policy(policy: &Object<ToolPolicySpec>) -> Vec<CompileError> {
    match policy_rules(policy) {
        Ok(_) => Vec::new(),
        Err(errors) => errors,
    }
}

/// Checks one DelegationGrant against the known identities at `now`: its
/// expiry (unix seconds) when valid. For the controller's status.
pub fn check_grant(
    grant: &Object<DelegationGrantSpec>,
    identities: &[Object<AgentIdentitySpec>],
    now: i64,
) -> Result<i64, CompileError> {
    let known: BTreeSet<AgentKey> = identities.iter().map(key_of).collect();
    check_grant_among(grant, &known, now)
}

/// [`check_grant`] against the keys of the known identities, for callers that
/// check many grants: the set is built once, not once per grant.
pub fn check_grant_among(
    grant: &Object<DelegationGrantSpec>,
    known: &BTreeSet<AgentKey>,
    now: i64,
) -> Result<i64, CompileError> {
    snapshot_grant(grant, known, now).map(|g| g.expires_at)
}

/// The namespace and name of an object (`default` when it has no namespace).
pub(crate) fn key_of<S>(object: &Object<S>) -> ObjectKey {
    ObjectKey::new(
        object.metadata.namespace_or_default(),
        object.metadata.name.clone(),
    )
}

fn policy_error(
    policy: &Object<ToolPolicySpec>,
    rule: Option<&str>,
    reason: CompileErrorReason,
) -> CompileError {
    CompileError {
        object: ObjectRef {
            kind: ObjectKind::ToolPolicy,
            key: key_of(policy),
        },
        rule: rule.map(str::to_owned),
        reason: Box::new(reason),
    }
}

/// Sorts errors by object and rule (then text, so that equal errors are
/// neighbours) and drops duplicates.
fn sort_errors(errors: &mut Vec<CompileError>) {
    errors.sort_by_cached_key(|e| (e.object.clone(), e.rule.clone(), e.reason.to_string()));
    errors.dedup();
}

/// `None` for conditions that set nothing.
fn normalise_conditions(when: Option<&Conditions>) -> Option<Conditions> {
    when.filter(|c| **c != Conditions::default()).cloned()
}

/// The normalised, checked rules of a policy.
fn policy_rules(policy: &Object<ToolPolicySpec>) -> Result<Vec<SnapshotRule>, Vec<CompileError>> {
    let mut errors = Vec::new();
    let spec = &policy.spec;
    if spec.target_refs.is_some() == spec.agent_selector.is_some() {
        errors.push(policy_error(
            policy,
            None,
            CompileErrorReason::AmbiguousTargets,
        ));
    }
    for tool in &spec.tools {
        if let Some(reason) = pin_error(tool) {
            errors.push(policy_error(policy, None, reason));
        }
    }
    let namespace = policy.metadata.namespace_or_default();
    let mut seen = BTreeSet::new();
    let mut rules = Vec::with_capacity(spec.rules.len());
    for rule in &spec.rules {
        if !seen.insert(rule.name.as_str()) {
            errors.push(policy_error(
                policy,
                Some(&rule.name),
                CompileErrorReason::DuplicateRule,
            ));
            continue;
        }
        if rule.approval.is_some() && rule.action != RuleAction::RequireApproval {
            errors.push(policy_error(
                policy,
                Some(&rule.name),
                CompileErrorReason::ApprovalOnOtherAction {
                    action: rule.action.as_str(),
                },
            ));
            continue;
        }
        if let Some(limit) = &rule.rate_limit {
            let misplaced = match rule.action {
                RuleAction::Allow => None,
                RuleAction::Deny => Some(CompileErrorReason::RateLimitOnDeny),
                RuleAction::RequireApproval => Some(CompileErrorReason::RateLimitOnRequireApproval),
            };
            if let Some(reason) = misplaced {
                errors.push(policy_error(policy, Some(&rule.name), reason));
                continue;
            }
            if limit.calls == 0 || limit.period_seconds == 0 {
                errors.push(policy_error(
                    policy,
                    Some(&rule.name),
                    CompileErrorReason::InvalidRateLimit,
                ));
                continue;
            }
        }
        let normalised = SnapshotRule {
            policy: policy.metadata.name.clone(),
            name: rule.name.clone(),
            action: rule.action,
            tools: rule.tools.clone(),
            when: normalise_conditions(rule.when.as_ref()),
            rate_limit: rule.rate_limit.as_ref().map(|limit| SnapshotRateLimit {
                id: format!("{namespace}/{}/{}", policy.metadata.name, rule.name),
                calls: limit.calls,
                period_seconds: limit.period_seconds,
                per: limit.per,
            }),
            // Defaults filled in, so the snapshot says what the sidecar does.
            approval: match rule.action {
                RuleAction::RequireApproval => Some(rule.approval.clone().unwrap_or_default()),
                RuleAction::Allow | RuleAction::Deny => None,
            },
        };
        match check_rule(&normalised) {
            Ok(()) => rules.push(normalised),
            Err(error) => errors.push(policy_error(policy, Some(&rule.name), error.into())),
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

/// What is wrong with a classification's pin, if it has one.
fn pin_error(tool: &ToolClassification) -> Option<CompileErrorReason> {
    let definition = tool.definition.as_ref()?;
    if is_glob(&tool.server) || is_glob(&tool.name) {
        return Some(CompileErrorReason::PinNotLiteral {
            server: tool.server.clone(),
            tool: tool.name.clone(),
        });
    }
    if !is_definition_hash(definition) {
        return Some(CompileErrorReason::MalformedPin {
            server: tool.server.clone(),
            tool: tool.name.clone(),
            definition: definition.clone(),
        });
    }
    None
}

/// The pins of `policies` (compiled ones, by name), and a
/// [`CompileErrorReason::ConflictingPins`] on each policy pinning a tool
/// that another pin contradicts.
fn collect_pins(policies: &[&Object<ToolPolicySpec>]) -> (Vec<SnapshotPin>, Vec<CompileError>) {
    // (server, tool) → hash → the policies pinning it to that hash.
    let mut pins: BTreeMap<(&str, &str), BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for policy in policies {
        for tool in &policy.spec.tools {
            if let Some(definition) = &tool.definition {
                pins.entry((tool.server.as_str(), tool.name.as_str()))
                    .or_default()
                    .entry(definition.as_str())
                    .or_default()
                    .insert(policy.metadata.name.as_str());
            }
        }
    }
    let mut errors = Vec::new();
    let pins = pins
        .into_iter()
        .map(|((server, tool), by_hash)| {
            if by_hash.len() > 1 {
                let names: BTreeSet<&str> = by_hash.values().flatten().copied().collect();
                let reason = CompileErrorReason::ConflictingPins {
                    server: server.to_owned(),
                    tool: tool.to_owned(),
                    policies: names.iter().map(|n| (*n).to_owned()).collect(),
                    definitions: by_hash.keys().map(|h| (*h).to_owned()).collect(),
                };
                for policy in policies {
                    if names.contains(policy.metadata.name.as_str()) {
                        errors.push(policy_error(policy, None, reason.clone()));
                    }
                }
            }
            SnapshotPin {
                server: server.to_owned(),
                tool: tool.to_owned(),
                definitions: by_hash.keys().map(|h| (*h).to_owned()).collect(),
            }
        })
        .collect();
    (pins, errors)
}

fn snapshot_grant(
    grant: &Object<DelegationGrantSpec>,
    known: &BTreeSet<AgentKey>,
    now: i64,
) -> Result<SnapshotGrant, CompileError> {
    let key = key_of(grant);
    let error = |reason| CompileError {
        object: ObjectRef {
            kind: ObjectKind::DelegationGrant,
            key: key.clone(),
        },
        rule: None,
        reason: Box::new(reason),
    };
    let spec = &grant.spec;
    let from = ObjectKey::new(key.namespace.clone(), spec.from.name.clone());
    let to = ObjectKey::new(
        spec.to
            .namespace
            .clone()
            .unwrap_or_else(|| key.namespace.clone()),
        spec.to.name.clone(),
    );
    for (role, agent) in [("from", &from), ("to", &to)] {
        if !known.contains(agent) {
            return Err(error(CompileErrorReason::UnknownAgent {
                role,
                agent: agent.clone(),
            }));
        }
    }
    if spec.max_depth > MAX_DELEGATION_DEPTH {
        return Err(error(CompileErrorReason::MaxDepthTooLarge {
            max_depth: spec.max_depth,
        }));
    }
    let expires_at = grant_expires_at(spec, &grant.metadata, now).map_err(|e| error(e.into()))?;
    if expires_at <= now {
        return Err(error(CompileErrorReason::GrantExpired {
            expired_at: expires_at,
        }));
    }
    let compiled = SnapshotGrant {
        grant: key.clone(),
        from,
        to,
        tools: spec.tools.clone(),
        when: normalise_conditions(spec.when.as_ref()),
        max_depth: spec.max_depth,
        expires_at,
    };
    check_grant_scope(&compiled).map_err(|e| error(e.into()))?;
    Ok(compiled)
}

/// Caches per-object results across the agents of one compilation.
struct Compiler<'a> {
    inventory: &'a Inventory<'a>,
    options: &'a CompileOptions,
    known_agents: BTreeSet<AgentKey>,
    identities: HashMap<AgentKey, &'a Object<AgentIdentitySpec>>,
    policies: HashMap<usize, Result<Vec<SnapshotRule>, Vec<CompileError>>>,
    grants: HashMap<usize, Result<SnapshotGrant, CompileError>>,
    /// Grant indexes by delegate.
    grants_to: HashMap<AgentKey, Vec<usize>>,
    /// Grant indexes by delegator.
    grants_from: HashMap<AgentKey, Vec<usize>>,
}

impl<'a> Compiler<'a> {
    fn new(inventory: &'a Inventory<'a>, options: &'a CompileOptions) -> Self {
        let identities: HashMap<AgentKey, &Object<AgentIdentitySpec>> = inventory
            .identities
            .iter()
            .map(|i| (key_of(i), i))
            .collect();
        let mut grants_to: HashMap<AgentKey, Vec<usize>> = HashMap::new();
        let mut grants_from: HashMap<AgentKey, Vec<usize>> = HashMap::new();
        for (i, grant) in inventory.grants.iter().enumerate() {
            let namespace = grant.metadata.namespace_or_default();
            let to_namespace = grant.spec.to.namespace.as_deref().unwrap_or(namespace);
            grants_to
                .entry(ObjectKey::new(to_namespace, grant.spec.to.name.clone()))
                .or_default()
                .push(i);
            grants_from
                .entry(ObjectKey::new(namespace, grant.spec.from.name.clone()))
                .or_default()
                .push(i);
        }
        Self {
            inventory,
            options,
            known_agents: identities.keys().cloned().collect(),
            identities,
            policies: HashMap::new(),
            grants: HashMap::new(),
            grants_to,
            grants_from,
        }
    }

    fn policy_rules(&mut self, i: usize) -> &Result<Vec<SnapshotRule>, Vec<CompileError>> {
        let policies = self.inventory.policies;
        self.policies
            .entry(i)
            .or_insert_with(|| policy_rules(&policies[i]))
    }

    fn grant(&mut self, i: usize) -> &Result<SnapshotGrant, CompileError> {
        let grants = self.inventory.grants;
        let known = &self.known_agents;
        let now = self.options.now;
        self.grants
            .entry(i)
            .or_insert_with(|| snapshot_grant(&grants[i], known, now))
    }

    /// Indexes of the policies targeting `identity`, sorted by policy name.
    fn targeting(&self, identity: &Object<AgentIdentitySpec>) -> Vec<usize> {
        let namespace = identity.metadata.namespace_or_default();
        let mut targeting: Vec<usize> =
            self.inventory
                .policies
                .iter()
                .enumerate()
                .filter(|(_, p)| p.metadata.namespace_or_default() == namespace)
                .filter(|(_, p)| {
                    let by_name =
                        p.spec.target_refs.as_ref().is_some_and(|refs| {
                            refs.iter().any(|r| r.name == identity.metadata.name)
                        });
                    let by_labels = p.spec.agent_selector.as_ref().is_some_and(|selector| {
                        selector
                            .match_labels
                            .iter()
                            .all(|(k, v)| identity.metadata.labels.get(k) == Some(v))
                    });
                    by_name || by_labels
                })
                .map(|(i, _)| i)
                .collect();
        targeting.sort_by(|a, b| {
            let (pa, pb) = (&self.inventory.policies[*a], &self.inventory.policies[*b]);
            pa.metadata.name.cmp(&pb.metadata.name).then(a.cmp(b))
        });
        targeting
    }

    /// The agent's own authority and the errors of the policies it reads.
    fn authority(
        &mut self,
        identity: &Object<AgentIdentitySpec>,
    ) -> (AgentAuthority, Vec<CompileError>) {
        let mut rules = Vec::new();
        let mut classifications = Vec::new();
        let mut errors = Vec::new();
        for i in self.targeting(identity) {
            match self.policy_rules(i) {
                Ok(policy_rules) => {
                    rules.extend(policy_rules.iter().cloned());
                    // Pins go to the snapshot's own list (`pins`).
                    classifications.extend(
                        self.inventory.policies[i]
                            .spec
                            .tools
                            .iter()
                            .filter(|c| !c.effects.is_empty())
                            .map(|c| ToolClassification {
                                definition: None,
                                ..c.clone()
                            }),
                    );
                }
                Err(e) => errors.extend(e.iter().cloned()),
            }
        }
        rules.sort_by(|a, b| (&a.policy, &a.name).cmp(&(&b.policy, &b.name)));
        let mut tool_servers: Vec<String> = identity
            .spec
            .tool_servers
            .iter()
            .map(|s| s.name.clone())
            .collect();
        tool_servers.sort();
        tool_servers.dedup();
        let authority = AgentAuthority {
            agent: key_of(identity),
            require_delegation: identity
                .spec
                .delegation
                .as_ref()
                .is_some_and(|d| d.require_delegation),
            tool_servers,
            classifications,
            rules,
        };
        (authority, errors)
    }

    /// The pins of the (compiled) policies targeting `identity`, and their
    /// conflicts.
    fn pins(
        &mut self,
        identity: &Object<AgentIdentitySpec>,
    ) -> (Vec<SnapshotPin>, Vec<CompileError>) {
        let mut compiled = Vec::new();
        for i in self.targeting(identity) {
            if self.policy_rules(i).is_ok() {
                compiled.push(&self.inventory.policies[i]);
            }
        }
        collect_pins(&compiled)
    }

    fn snapshot(&mut self, identity: &Object<AgentIdentitySpec>) -> (Snapshot, Vec<CompileError>) {
        let agent = key_of(identity);
        let (authority, mut errors) = self.authority(identity);
        let (pins, pin_errors) = self.pins(identity);
        errors.extend(pin_errors);

        // Grants a chain ending at this agent may use: those to it, then those to
        // its delegators that allow at least one further hop, and so on.
        let mut received: BTreeMap<GrantKey, SnapshotGrant> = BTreeMap::new();
        let mut delegator_keys: BTreeSet<AgentKey> = BTreeSet::new();
        let mut frontier: Vec<(AgentKey, u32)> = vec![(agent.clone(), 0)];
        let mut visited: BTreeSet<(AgentKey, u32)> = BTreeSet::new();
        while let Some((delegate, further_hops)) = frontier.pop() {
            if !visited.insert((delegate.clone(), further_hops)) {
                continue;
            }
            let indexes = self.grants_to.get(&delegate).cloned().unwrap_or_default();
            for i in indexes {
                match self.grant(i) {
                    Ok(grant) if grant.max_depth >= further_hops => {
                        let grant = grant.clone();
                        delegator_keys.insert(grant.from.clone());
                        if further_hops < MAX_DELEGATION_DEPTH {
                            frontier.push((grant.from.clone(), further_hops + 1));
                        }
                        received.insert(grant.grant.clone(), grant);
                    }
                    Ok(_) => {}
                    Err(e) if further_hops == 0 => errors.push(e.clone()),
                    Err(_) => {}
                }
            }
        }
        let mut given: Vec<SnapshotGrant> = Vec::new();
        for i in self.grants_from.get(&agent).cloned().unwrap_or_default() {
            match self.grant(i) {
                Ok(grant) => given.push(grant.clone()),
                Err(e) => errors.push(e.clone()),
            }
        }
        given.sort_by(|a, b| a.grant.cmp(&b.grant));

        let mut delegators = Vec::with_capacity(delegator_keys.len());
        for key in &delegator_keys {
            if let Some(identity) = self.identities.get(key).copied() {
                delegators.push(self.authority(identity).0);
            }
        }

        let mut tool_servers = identity.spec.tool_servers.clone();
        tool_servers.sort_by(|a, b| a.name.cmp(&b.name));
        let content = SnapshotContent {
            format: SNAPSHOT_FORMAT,
            agent,
            mode: identity.spec.mode,
            tool_servers,
            assertion: identity.spec.assertion.clone().unwrap_or_default(),
            session: identity.spec.session.clone().unwrap_or_default(),
            initiators: identity.spec.initiators.clone(),
            passthrough_methods: {
                let mut methods = identity.spec.passthrough_methods.clone();
                methods.sort();
                methods.dedup();
                methods
            },
            authority,
            grants_received: received.into_values().collect(),
            grants_given: given,
            delegators,
            pins,
            max_disconnected_seconds: identity.spec.max_disconnected_seconds,
        };
        sort_errors(&mut errors);
        (Snapshot::new(self.options.version, content), errors)
    }
}
