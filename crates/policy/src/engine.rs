//! The evaluator: a [`Snapshot`] turned into indexes, compiled matchers, regexes
//! and CEL programs, answering [`Engine::decide`] and [`Engine::visible`].
//!
//! How a call is decided is stated once, on [`Engine::decide`]. Tool
//! definition pins are looked up here ([`Engine::tool_pin`],
//! [`Engine::tool_pinning`]) and judged by [`crate::pin_verdict`].
//!
//! Rules are indexed by (server, tool): for every known server and every tool name
//! a rule or classification names exactly, the candidate rules of each action are
//! precomputed (globs and effect matches resolved in), so a decision never looks
//! at a rule about another tool. Names no rule spells out fall back to the short
//! list of glob and effect rules of that server.
//!
//! The candidates of every tool sit in one shared list, and the conditions
//! that are argument matchers only (the common case) are read from a flat copy
//! in rule order ([`RuleArena`]), so deciding a call touches a few contiguous
//! runs of memory rather than several heap allocations per rule: with 100,000
//! rules the latter no longer fit in the caches.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use thiserror::Error;

use crate::approval::{ApprovalError, check_approval_settings};
use crate::conditions::arena::RuleArena;
use crate::conditions::{CompiledConditions, ConditionError, EvalContext, Initiator, Truth};
use crate::decision::{
    AgentKey, ApprovalRequirement, DecidingRule, Decision, DecisionRequest, DelegationChain,
    DelegationLink, GrantKey, ObjectKey, RateLimitRef, Reason, Verdict,
};
use crate::glob::Glob;
use crate::model::{
    Effect, EnforcementMode, MAX_DELEGATION_DEPTH, RuleAction, ToolClassification, ToolMatch,
    ToolPinning,
};
use crate::pinning::{CurrentDefinition, PinVerdict, ToolPin, pin_verdict};
use crate::session::EffectSet;
use crate::snapshot::{AgentAuthority, SNAPSHOT_FORMAT, Snapshot, SnapshotGrant, SnapshotRule};

/// The index's hasher: FxHash-style multiply-rotate, several times faster than
/// SipHash on short names. Safe here: the maps are built from policy names, so a
/// caller choosing the looked-up name cannot make chains long.
#[derive(Clone, Copy, Default)]
struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0xf135_7aea_2e62_a9c5;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        for &byte in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(K);
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.write(&[byte]);
    }

    fn finish(&self) -> u64 {
        // Spread the high bits (the multiply's best) into the low ones hashbrown uses.
        self.0.rotate_left(26)
    }
}

type NameMap<V> = HashMap<Box<str>, V, std::hash::BuildHasherDefault<NameHasher>>;

/// Why a tool match is malformed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ToolMatchError {
    /// Neither or both of `name` and `effect` are set.
    #[error("tool match #{index} must set exactly one of name or effect")]
    NameXorEffect {
        /// Position in `tools`.
        index: usize,
    },
    /// `server` or `name` is empty.
    #[error("tool match #{index} has an empty server or name")]
    Empty {
        /// Position in `tools`.
        index: usize,
    },
    /// `tools` is empty.
    #[error("tools is empty: the rule or grant would match no tool")]
    NoTools,
}

/// Why one rule or grant does not compile.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RuleError {
    /// A `when` condition is invalid.
    #[error(transparent)]
    Condition(Box<ConditionError>),
    /// A tool match is invalid.
    #[error(transparent)]
    ToolMatch(#[from] ToolMatchError),
    /// A requireApproval rule's approval settings are invalid.
    #[error(transparent)]
    Approval(#[from] ApprovalError),
}

impl From<ConditionError> for RuleError {
    fn from(error: ConditionError) -> Self {
        RuleError::Condition(Box::new(error))
    }
}

/// A snapshot a sidecar cannot use; it keeps its last good one (or denies all).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum InvalidSnapshot {
    /// Produced by an incompatible controller.
    #[error("snapshot format {found} is not supported (this build reads format {supported})")]
    UnsupportedFormat {
        /// Format of the snapshot.
        found: u32,
        /// Format this build reads.
        supported: u32,
    },
    /// The content does not hash to the snapshot's hash.
    #[error("snapshot hash {claimed} does not match its content (hash {actual})")]
    HashMismatch {
        /// The hash the snapshot carries.
        claimed: String,
        /// The hash of its content.
        actual: String,
    },
    /// A rule does not compile.
    #[error("rule {rule} of agent {agent}: {error}")]
    Rule {
        /// Whose rule.
        agent: AgentKey,
        /// `policy/rule`.
        rule: String,
        /// What is wrong.
        error: RuleError,
    },
    /// A grant does not compile.
    #[error("grant {grant}: {error}")]
    Grant {
        /// The grant.
        grant: GrantKey,
        /// What is wrong.
        error: RuleError,
    },
}

/// A tool match, compiled.
#[derive(Debug)]
enum CompiledToolMatch {
    Name { server: Glob, name: Glob },
    Effect { server: Glob, effect: Effect },
}

impl CompiledToolMatch {
    fn new(index: usize, tool: &ToolMatch) -> Result<Self, ToolMatchError> {
        if tool.server.is_empty() || tool.name.as_deref() == Some("") {
            return Err(ToolMatchError::Empty { index });
        }
        let server = Glob::new(&tool.server);
        match (&tool.name, tool.effect) {
            (Some(name), None) => Ok(CompiledToolMatch::Name {
                server,
                name: Glob::new(name),
            }),
            (None, Some(effect)) => Ok(CompiledToolMatch::Effect { server, effect }),
            _ => Err(ToolMatchError::NameXorEffect { index }),
        }
    }

    fn server(&self) -> &Glob {
        match self {
            CompiledToolMatch::Name { server, .. } | CompiledToolMatch::Effect { server, .. } => {
                server
            }
        }
    }

    fn exact_name(&self) -> Option<&str> {
        match self {
            CompiledToolMatch::Name { name, .. } if name.is_exact() => Some(name.as_str()),
            _ => None,
        }
    }

    fn matches(&self, server: &str, tool: &str, effects: EffectSet) -> bool {
        match self {
            CompiledToolMatch::Name { server: s, name } => s.matches(server) && name.matches(tool),
            CompiledToolMatch::Effect { server: s, effect } => {
                s.matches(server) && effects.contains(*effect)
            }
        }
    }
}

fn compile_tool_matches(tools: &[ToolMatch]) -> Result<Vec<CompiledToolMatch>, ToolMatchError> {
    if tools.is_empty() {
        return Err(ToolMatchError::NoTools);
    }
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| CompiledToolMatch::new(i, t))
        .collect()
}

/// A rule, compiled.
#[derive(Debug)]
struct CompiledRule {
    id: Arc<str>,
    action: RuleAction,
    tools: Vec<CompiledToolMatch>,
    conditions: CompiledConditions,
    rate_limit: Option<RateLimitRef>,
    /// Set on requireApproval rules, on no other.
    approval: Option<ApprovalRequirement>,
}

impl CompiledRule {
    /// Compiles `rule` of a policy in `namespace` (the agent's).
    fn new(rule: &SnapshotRule, namespace: &str) -> Result<Self, RuleError> {
        let approval = match rule.action {
            RuleAction::RequireApproval => {
                // The compiler fills the defaults in; a snapshot without them
                // gets the same defaults rather than being refused.
                let settings = rule.approval.clone().unwrap_or_default();
                check_approval_settings(&settings)?;
                Some(ApprovalRequirement {
                    policy: ObjectKey::new(namespace, rule.policy.as_str()),
                    rule: rule.name.clone(),
                    timeout_seconds: settings.timeout_seconds,
                    valid_for_seconds: settings.valid_for_seconds,
                    redact_arguments: settings.redact_arguments.into(),
                })
            }
            RuleAction::Allow | RuleAction::Deny => None,
        };
        Ok(Self {
            id: Arc::from(format!("{}/{}", rule.policy, rule.name)),
            action: rule.action,
            tools: compile_tool_matches(&rule.tools)?,
            conditions: CompiledConditions::new(rule.when.as_ref())?,
            rate_limit: rule.rate_limit.as_ref().map(|limit| RateLimitRef {
                id: Arc::from(limit.id.as_str()),
                calls: limit.calls,
                period_seconds: limit.period_seconds,
                per: limit.per,
            }),
            approval,
        })
    }

    fn matches_tool(&self, server: &str, tool: &str, effects: EffectSet) -> bool {
        self.tools.iter().any(|m| m.matches(server, tool, effects))
    }
}

/// Checks that a rule compiles (used by the compiler to report per object).
pub(crate) fn check_rule(rule: &SnapshotRule) -> Result<(), RuleError> {
    CompiledRule::new(rule, "").map(|_| ())
}

/// Checks that a grant's tools and conditions compile.
pub(crate) fn check_grant_scope(grant: &SnapshotGrant) -> Result<(), RuleError> {
    CompiledGrant::new(grant).map(|_| ())
}

/// Tool classifications: which effects a (server, tool) has.
#[derive(Debug, Default)]
struct Classifier {
    exact: NameMap<Vec<(Glob, EffectSet)>>,
    globbed: Vec<(Glob, Glob, EffectSet)>,
}

impl Classifier {
    fn new(classifications: &[ToolClassification]) -> Self {
        let mut classifier = Classifier::default();
        for c in classifications {
            let effects = EffectSet::of(&c.effects);
            let name = Glob::new(&c.name);
            if name.is_exact() {
                classifier
                    .exact
                    .entry(c.name.as_str().into())
                    .or_default()
                    .push((Glob::new(&c.server), effects));
            } else {
                classifier
                    .globbed
                    .push((Glob::new(&c.server), name, effects));
            }
        }
        classifier
    }

    fn effects(&self, server: &str, tool: &str) -> EffectSet {
        let mut effects = EffectSet::EMPTY;
        if let Some(entries) = self.exact.get(tool) {
            for (s, e) in entries {
                if s.matches(server) {
                    effects = effects.union(*e);
                }
            }
        }
        for (s, n, e) in &self.globbed {
            if s.matches(server) && n.matches(tool) {
                effects = effects.union(*e);
            }
        }
        effects
    }
}

/// Precomputed candidate rules of one (server, tool): a run of
/// [`ToolIndex::candidates`] holding its deny, then requireApproval, then allow
/// rules, each in rule order.
#[derive(Debug)]
struct Candidates {
    start: usize,
    deny: u32,
    approve: u32,
    allow: u32,
    effects: EffectSet,
}

impl Candidates {
    /// The deny, requireApproval and allow rules, out of the index's list.
    fn split<'a>(&self, all: &'a [u32]) -> (&'a [u32], &'a [u32], &'a [u32]) {
        let run = &all[self.start..][..(self.deny + self.approve + self.allow) as usize];
        let (deny, rest) = run.split_at(self.deny as usize);
        let (approve, allow) = rest.split_at(self.approve as usize);
        (deny, approve, allow)
    }
}

#[derive(Debug, Default)]
struct ServerIndex {
    tools: NameMap<Candidates>,
    /// Rules with a name-glob or effect match for this server: the only ones that
    /// can match a tool name no rule spells out.
    fallback: Box<[u32]>,
}

#[derive(Debug, Default)]
struct ToolIndex {
    servers: NameMap<ServerIndex>,
    /// Every tool's candidate rules, one run per tool ([`Candidates`]).
    candidates: Vec<u32>,
    /// Rules with any match that is not an exact (server, name): the only ones
    /// that can match on a server no rule or tool server names.
    inexact: Box<[u32]>,
}

/// One agent's rules, compiled and indexed.
#[derive(Debug)]
struct CompiledAuthority {
    require_delegation: bool,
    rules: Vec<CompiledRule>,
    /// The rules' conditions, flattened for [`CompiledAuthority::evaluate_candidates`].
    arena: RuleArena,
    classifier: Classifier,
    index: ToolIndex,
}

/// What an agent's own rules say about a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RulesOutcome {
    Allowed(u32),
    /// A requireApproval rule holds the call.
    Approval(u32),
    Denied(u32),
    NoAllow,
}

/// Deciding a call, or listing a tool (arguments and session unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Decide,
    List,
}

impl Mode {
    /// Whether a rule with conditions of this value applies. Deciding fails closed
    /// (unknown denies, never allows); listing is optimistic about what the
    /// arguments could be (unknown allows, never denies). An unknown
    /// requireApproval rule while deciding is handled by
    /// [`CompiledAuthority::evaluate_candidates`]: it holds what an allow rule
    /// would allow.
    fn applies(self, action: RuleAction, truth: Truth) -> bool {
        match (self, action) {
            (Mode::Decide, RuleAction::Deny)
            | (Mode::List, RuleAction::Allow | RuleAction::RequireApproval) => {
                truth != Truth::False
            }
            (Mode::Decide, RuleAction::Allow | RuleAction::RequireApproval)
            | (Mode::List, RuleAction::Deny) => truth == Truth::True,
        }
    }
}

impl CompiledAuthority {
    fn new(authority: &AgentAuthority, extra_servers: &[String]) -> Result<Self, InvalidSnapshot> {
        let rules = authority
            .rules
            .iter()
            .map(|rule| {
                CompiledRule::new(rule, &authority.agent.namespace).map_err(|error| {
                    InvalidSnapshot::Rule {
                        agent: authority.agent.clone(),
                        rule: format!("{}/{}", rule.policy, rule.name),
                        error,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let classifier = Classifier::new(&authority.classifications);
        let index = build_index(&rules, &classifier, authority, extra_servers);
        let arena = RuleArena::new(rules.iter().map(|rule| &rule.conditions));
        Ok(Self {
            require_delegation: authority.require_delegation,
            rules,
            arena,
            classifier,
            index,
        })
    }

    fn effects(&self, server: &str, tool: &str) -> EffectSet {
        match self
            .index
            .servers
            .get(server)
            .and_then(|s| s.tools.get(tool))
        {
            Some(candidates) => candidates.effects,
            None => self.classifier.effects(server, tool),
        }
    }

    fn evaluate(&self, ctx: &EvalContext<'_>, mode: Mode) -> RulesOutcome {
        if let Some(candidates) = self
            .index
            .servers
            .get(ctx.server)
            .and_then(|s| s.tools.get(ctx.tool))
        {
            let (deny, approve, allow) = candidates.split(&self.index.candidates);
            return self.evaluate_candidates(deny, approve, allow, ctx, mode);
        }
        // Slow path: a name no rule spells out.
        let effects = self.classifier.effects(ctx.server, ctx.tool);
        let pool: &[u32] = match self.index.servers.get(ctx.server) {
            Some(server) => &server.fallback,
            None => &self.index.inexact,
        };
        let (mut deny, mut approve, mut allow) = (Vec::new(), Vec::new(), Vec::new());
        for &i in pool {
            let rule = &self.rules[i as usize];
            if rule.matches_tool(ctx.server, ctx.tool, effects) {
                match rule.action {
                    RuleAction::Deny => deny.push(i),
                    RuleAction::RequireApproval => approve.push(i),
                    RuleAction::Allow => allow.push(i),
                }
            }
        }
        self.evaluate_candidates(&deny, &approve, &allow, ctx, mode)
    }

    /// The decision order of [`Engine::decide`], over one tool's candidates.
    fn evaluate_candidates(
        &self,
        deny: &[u32],
        approve: &[u32],
        allow: &[u32],
        ctx: &EvalContext<'_>,
        mode: Mode,
    ) -> RulesOutcome {
        // Argument-only conditions from the flat arena (each pointer walked
        // once), any others from the rule itself: the same truth either way.
        let mut flat = self.arena.evaluation(ctx.arguments);
        let mut truth_of = |i: u32| match flat.truth(i) {
            Some(truth) => truth,
            None => self.rules[i as usize].conditions.evaluate(ctx).truth,
        };
        for &i in deny {
            let truth = truth_of(i);
            if mode.applies(RuleAction::Deny, truth) {
                return RulesOutcome::Denied(i);
            }
        }
        // A requireApproval rule that cannot be evaluated restricts (an allow
        // rule cannot get past it) but never grants (no allow, no approval).
        let mut unknown_approval = None;
        for &i in approve {
            let truth = truth_of(i);
            if mode.applies(RuleAction::RequireApproval, truth) {
                return RulesOutcome::Approval(i);
            }
            if mode == Mode::Decide && truth == Truth::Unknown && unknown_approval.is_none() {
                unknown_approval = Some(i);
            }
        }
        for &i in allow {
            let truth = truth_of(i);
            if mode.applies(RuleAction::Allow, truth) {
                return match unknown_approval {
                    Some(held) => RulesOutcome::Approval(held),
                    None => RulesOutcome::Allowed(i),
                };
            }
        }
        RulesOutcome::NoAllow
    }

    fn deciding_rule(&self, outcome: RulesOutcome) -> DecidingRule {
        match outcome {
            RulesOutcome::Allowed(i) | RulesOutcome::Approval(i) | RulesOutcome::Denied(i) => {
                DecidingRule::Rule(Arc::clone(&self.rules[i as usize].id))
            }
            RulesOutcome::NoAllow => DecidingRule::NoRuleAllows,
        }
    }
}

fn build_index(
    rules: &[CompiledRule],
    classifier: &Classifier,
    authority: &AgentAuthority,
    extra_servers: &[String],
) -> ToolIndex {
    let mut servers: BTreeSet<&str> = authority.tool_servers.iter().map(String::as_str).collect();
    servers.extend(extra_servers.iter().map(String::as_str));
    for rule in rules {
        for m in &rule.tools {
            if m.server().is_exact() {
                servers.insert(m.server().as_str());
            }
        }
    }
    for c in &authority.classifications {
        if Glob::new(&c.server).is_exact() {
            servers.insert(c.server.as_str());
        }
    }
    let inexact: Box<[u32]> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.tools
                .iter()
                .any(|m| !(m.server().is_exact() && m.exact_name().is_some()))
        })
        .map(|(i, _)| i as u32)
        .collect();

    let mut index = ToolIndex {
        servers: NameMap::default(),
        candidates: Vec::new(),
        inexact,
    };
    for server in servers {
        let mut by_name: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut fallback = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let mut in_fallback = false;
            for m in &rule.tools {
                if !m.server().matches(server) {
                    continue;
                }
                match m.exact_name() {
                    Some(name) => by_name.entry(name).or_default().push(i as u32),
                    None => in_fallback = true,
                }
            }
            if in_fallback {
                fallback.push(i as u32);
            }
        }
        for (name, entries) in &classifier.exact {
            if entries.iter().any(|(s, _)| s.matches(server)) {
                by_name.entry(name).or_default();
            }
        }
        let mut tools = NameMap::default();
        tools.reserve(by_name.len());
        for (name, mut matched) in by_name {
            let effects = classifier.effects(server, name);
            matched.extend(
                fallback
                    .iter()
                    .copied()
                    .filter(|&i| rules[i as usize].matches_tool(server, name, effects)),
            );
            matched.sort_unstable();
            matched.dedup();
            let start = index.candidates.len();
            let mut push = |action: RuleAction| -> u32 {
                let before = index.candidates.len();
                index.candidates.extend(
                    matched
                        .iter()
                        .copied()
                        .filter(|&i| rules[i as usize].action == action),
                );
                // At most `rules.len()`, itself indexed by u32.
                (index.candidates.len() - before) as u32
            };
            let deny = push(RuleAction::Deny);
            let approve = push(RuleAction::RequireApproval);
            let allow = push(RuleAction::Allow);
            tools.insert(
                Box::from(name),
                Candidates {
                    start,
                    deny,
                    approve,
                    allow,
                    effects,
                },
            );
        }
        index.servers.insert(
            Box::from(server),
            ServerIndex {
                tools,
                fallback: fallback.into(),
            },
        );
    }
    index.candidates.shrink_to_fit();
    index
}

/// A received grant, compiled.
#[derive(Debug)]
struct CompiledGrant {
    from: AgentKey,
    to: AgentKey,
    tools: Vec<CompiledToolMatch>,
    conditions: CompiledConditions,
    max_depth: u32,
    expires_at: i64,
}

impl CompiledGrant {
    fn new(grant: &SnapshotGrant) -> Result<Self, RuleError> {
        Ok(Self {
            from: grant.from.clone(),
            to: grant.to.clone(),
            tools: compile_tool_matches(&grant.tools)?,
            conditions: CompiledConditions::new(grant.when.as_ref())?,
            max_depth: grant.max_depth,
            expires_at: grant.expires_at,
        })
    }
}

/// A failed check: what decided and why.
struct Denial {
    rule: DecidingRule,
    reason: Reason,
}

/// A call that passed every check: allowed, or allowed once a person approves.
struct Permit<'e> {
    /// The agent's own rule that allowed the call or asked for approval.
    own: &'e CompiledRule,
    /// The requireApproval rule the call needs approval from: the agent's own,
    /// else the first delegator's (origin first) whose rules ask for it.
    approval: Option<&'e CompiledRule>,
}

/// One question to [`Engine::judge`].
struct Query<'a> {
    server: &'a str,
    tool: &'a str,
    arguments: Option<&'a serde_json::Value>,
    session: Option<&'a crate::session::SessionHistory>,
    links: &'a [DelegationLink],
    initiator: Option<&'a str>,
    now: i64,
    mode: Mode,
}

/// The compiled policy of one agent: decides its calls and filters its tool lists.
/// Cheap to share (`Send + Sync`); build a new one per snapshot.
#[derive(Debug)]
pub struct Engine {
    version: u64,
    hash: String,
    agent: AgentKey,
    dry_run: bool,
    own: CompiledAuthority,
    delegators: HashMap<AgentKey, CompiledAuthority>,
    grants: HashMap<GrantKey, CompiledGrant>,
    has_expressions: bool,
    /// `toolPinning` of each of the agent's tool servers.
    pinning: NameMap<ToolPinning>,
    /// Pinned definitions by server, then tool: one hash, or conflicting ones.
    pins: NameMap<NameMap<Box<[String]>>>,
}

impl Engine {
    /// Compiles a snapshot: checks its format and hash, compiles every rule,
    /// regex and CEL expression, and builds the indexes.
    pub fn new(snapshot: &Snapshot) -> Result<Self, InvalidSnapshot> {
        let content = &snapshot.content;
        if content.format != SNAPSHOT_FORMAT {
            return Err(InvalidSnapshot::UnsupportedFormat {
                found: content.format,
                supported: SNAPSHOT_FORMAT,
            });
        }
        let actual = content.content_hash();
        if actual != snapshot.hash {
            return Err(InvalidSnapshot::HashMismatch {
                claimed: snapshot.hash.clone(),
                actual,
            });
        }
        Self::from_parts(snapshot)
    }

    /// Like [`Engine::new`] without the hash check (the compiler's own output).
    pub(crate) fn from_parts(snapshot: &Snapshot) -> Result<Self, InvalidSnapshot> {
        let content = &snapshot.content;
        let own_servers: Vec<String> = content
            .tool_servers
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let own = CompiledAuthority::new(&content.authority, &own_servers)?;
        let delegators = content
            .delegators
            .iter()
            .map(|authority| {
                CompiledAuthority::new(authority, &own_servers)
                    .map(|compiled| (authority.agent.clone(), compiled))
            })
            .collect::<Result<HashMap<_, _>, _>>()?;
        let grants = content
            .grants_received
            .iter()
            .map(|grant| {
                CompiledGrant::new(grant)
                    .map(|compiled| (grant.grant.clone(), compiled))
                    .map_err(|error| InvalidSnapshot::Grant {
                        grant: grant.grant.clone(),
                        error,
                    })
            })
            .collect::<Result<HashMap<_, _>, _>>()?;
        let has_expressions = own.rules.iter().any(|r| r.conditions.has_expression());
        let pinning = content
            .tool_servers
            .iter()
            .map(|s| (Box::from(s.name.as_str()), s.tool_pinning))
            .collect();
        let mut pins: NameMap<NameMap<Box<[String]>>> = NameMap::default();
        for pin in &content.pins {
            pins.entry(Box::from(pin.server.as_str()))
                .or_default()
                .insert(Box::from(pin.tool.as_str()), pin.definitions.clone().into());
        }
        Ok(Self {
            version: snapshot.version,
            hash: snapshot.hash.clone(),
            agent: content.agent.clone(),
            dry_run: content.mode == EnforcementMode::DryRun,
            own,
            delegators,
            grants,
            has_expressions,
            pinning,
            pins,
        })
    }

    /// Version of the snapshot this engine was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Hash of the snapshot this engine was built from.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The agent whose calls this engine decides.
    pub fn agent(&self) -> &AgentKey {
        &self.agent
    }

    /// Whether any of the agent's own rules has a CEL expression.
    pub fn has_expressions(&self) -> bool {
        self.has_expressions
    }

    /// The effects of a tool by the agent's classifications; the sidecar records
    /// them in the session after the call ([`crate::SessionHistory::record`]).
    pub fn effects_of(&self, server: &str, tool: &str) -> EffectSet {
        self.own.effects(server, tool)
    }

    /// `toolPinning` of `server` (`toolServers[]`); `off` for a server the
    /// agent does not have.
    pub fn tool_pinning(&self, server: &str) -> ToolPinning {
        self.pinning
            .get(server)
            .copied()
            .unwrap_or(ToolPinning::Off)
    }

    /// The pin of a tool by the agent's own ToolPolicies.
    pub fn tool_pin(&self, server: &str, tool: &str) -> ToolPin<'_> {
        self.pins
            .get(server)
            .and_then(|tools| tools.get(tool))
            .map_or(ToolPin::Unpinned, |definitions| ToolPin::of(definitions))
    }

    /// How the tool's current definition hash (`None`: none seen) stands
    /// against its pin under its server's `toolPinning` ([`pin_verdict`]).
    pub fn pin_verdict(&self, server: &str, tool: &str, current: Option<&str>) -> PinVerdict {
        pin_verdict(
            self.tool_pinning(server),
            self.tool_pin(server, tool),
            current,
        )
    }

    /// Whether `enforce` blocks the tool: its server enforces pins and the
    /// verdict does not pass. Rules aside: [`Engine::decide`] refuses a
    /// blocked tool that some rule governs, and `tools/list` hides it.
    pub fn pin_blocks(&self, server: &str, tool: &str, current: Option<&str>) -> bool {
        self.tool_pinning(server) == ToolPinning::Enforce
            && !self.pin_verdict(server, tool, current).passes()
    }

    /// Decides a tool call.
    ///
    /// # Decision order
    ///
    /// The one statement of how a call is decided (everything else refers here):
    ///
    /// 0. **toolPinning**: where the server's `toolPinning` is `enforce`, a
    ///    governed tool (one [`Engine::visible_in`] shows: some rule could let
    ///    the call through) whose definition does not match its pin
    ///    ([`DecisionRequest::definition`] against [`Engine::tool_pin`]:
    ///    changed, not pinned, conflicting pins, or not yet seen; resources
    ///    and prompts are not pinned) is denied
    ///    ([`DecidingRule::ToolPinning`], [`Reason::ToolPinning`]), whatever
    ///    the rules below say and even when approved. A tool no rule governs
    ///    is decided by the rules (and denied by them). `observe` and `off`
    ///    never change a decision.
    /// 1. **deny**: any matching deny rule denies. A deny rule whose conditions
    ///    cannot be evaluated (missing or mistyped arguments, failing CEL) matches:
    ///    deny rules fail closed.
    /// 2. **requireApproval**: else any matching requireApproval rule holds the
    ///    call until a person approves exactly this call
    ///    ([`Verdict::RequireApproval`], [`Decision::approval`]). With
    ///    [`DecisionRequest::approved`] the call is allowed instead
    ///    ([`Reason::Approved`]). A requireApproval rule whose conditions cannot
    ///    be evaluated holds a call that an allow rule would allow, and never
    ///    makes approvable a call that no allow rule allows.
    /// 3. **allow**: else any matching allow rule allows (its conditions must be
    ///    true).
    /// 4. **default deny**: else the call is denied.
    ///
    /// A delegated call must also be covered by every grant of its chain
    /// (unexpired, within depth), and every delegator must itself get allow or
    /// requireApproval from its own rules by the same order: a delegator's deny
    /// denies the call, and a delegator's requireApproval makes the whole call
    /// need approval. Any deny, anywhere, wins over any approval.
    pub fn decide(&self, request: &DecisionRequest<'_>) -> Decision {
        if let Some(denial) = self.pin_denial(request) {
            return Decision {
                verdict: Verdict::Deny,
                rule: denial.rule,
                reason: denial.reason,
                snapshot_version: self.version,
                dry_run: self.dry_run,
                rate_limit: None,
                approval: None,
            };
        }
        let query = Query {
            server: request.server,
            tool: request.tool,
            arguments: Some(request.arguments),
            session: Some(request.session),
            links: request.delegation.map_or(&[][..], |c| &c.links),
            initiator: request.initiator,
            now: request.now,
            mode: Mode::Decide,
        };
        let (verdict, rule, reason, rate_limit, approval) = match self.judge(&query) {
            Ok(Permit {
                own,
                approval: None,
            }) => (
                Verdict::Allow,
                DecidingRule::Rule(Arc::clone(&own.id)),
                Reason::AllowedByRule,
                own.rate_limit.clone(),
                None,
            ),
            Ok(Permit {
                own,
                approval: Some(asking),
            }) => {
                let (verdict, reason, rate_limit) = if request.approved {
                    // The agent's own allow rule (when a delegator asked for
                    // the approval) still counts the call against its limit.
                    (Verdict::Allow, Reason::Approved, own.rate_limit.clone())
                } else {
                    (Verdict::RequireApproval, Reason::ApprovalRequired, None)
                };
                let rule = DecidingRule::Rule(Arc::clone(&asking.id));
                (verdict, rule, reason, rate_limit, asking.approval.clone())
            }
            Err(denial) => (Verdict::Deny, denial.rule, denial.reason, None, None),
        };
        Decision {
            verdict,
            rule,
            reason,
            snapshot_version: self.version,
            dry_run: self.dry_run,
            rate_limit,
            approval,
        }
    }

    /// Step 0 of the decision order: the refusal of a governed tool whose
    /// definition `enforce` blocks. A map lookup and a comparison per call;
    /// the governed check runs only for a blocked tool.
    fn pin_denial(&self, request: &DecisionRequest<'_>) -> Option<Denial> {
        if request.definition == CurrentDefinition::NotApplicable
            || self.tool_pinning(request.server) != ToolPinning::Enforce
        {
            return None;
        }
        let verdict = pin_verdict(
            ToolPinning::Enforce,
            self.tool_pin(request.server, request.tool),
            request.definition.hash(),
        );
        if verdict.passes()
            || !self.visible_in(
                request.server,
                request.tool,
                request.delegation,
                request.now,
            )
        {
            return None;
        }
        Some(Denial {
            rule: DecidingRule::ToolPinning,
            reason: Reason::ToolPinning(verdict),
        })
    }

    /// Whether `tools/list` shows the tool in the agent's own sessions: some
    /// arguments and session could make a call allowed, or approvable. The same
    /// rules as
    /// [`Engine::decide`], read optimistically about what is not known yet.
    /// The rules only (whether the tool is governed): a list also hides a tool
    /// [`Engine::pin_blocks`], which needs the definition in that list.
    pub fn visible(&self, server: &str, tool: &str) -> bool {
        self.visible_in(server, tool, None, 0)
    }

    /// Like [`Engine::visible`] inside a (possibly) delegated session at time
    /// `now`.
    pub fn visible_in(
        &self,
        server: &str,
        tool: &str,
        delegation: Option<&DelegationChain>,
        now: i64,
    ) -> bool {
        let links = delegation.map_or(&[][..], |c| &c.links);
        let query = Query {
            server,
            tool,
            arguments: None,
            session: None,
            links,
            initiator: None,
            // Grant expiry is only checked for delegated listings.
            now: if links.is_empty() { i64::MIN } else { now },
            mode: Mode::List,
        };
        self.judge(&query).is_ok()
    }

    fn context<'a>(
        &self,
        query: &Query<'a>,
        agent: &'a AgentKey,
        depth: usize,
        initiator: Initiator<'a>,
    ) -> EvalContext<'a> {
        EvalContext {
            server: query.server,
            tool: query.tool,
            arguments: query.arguments,
            session: query.session,
            agent,
            depth,
            chain: &query.links[..depth],
            initiator,
        }
    }

    /// The whole decision.
    fn judge(&self, query: &Query<'_>) -> Result<Permit<'_>, Denial> {
        let links = query.links;
        let depth = links.len();
        if depth == 0 && self.own.require_delegation {
            return Err(Denial {
                rule: DecidingRule::RequireDelegation,
                reason: Reason::RequireDelegation,
            });
        }
        if depth > MAX_DELEGATION_DEPTH as usize + 1 {
            return Err(Denial {
                rule: DecidingRule::Delegation,
                reason: Reason::ChainTooDeep { depth },
            });
        }
        let initiator = match (query.initiator, query.mode) {
            (Some(user), _) => Initiator::User(user),
            (None, Mode::List) => Initiator::Unknown,
            (None, Mode::Decide) => {
                Initiator::Agent(links.first().map_or(&self.agent, |l| &l.delegator))
            }
        };
        // Ownership of `self.agent` outlives the query.
        let own_ctx = self.context(query, &self.agent, depth, initiator);
        let mut permit = match self.own.evaluate(&own_ctx, query.mode) {
            RulesOutcome::Allowed(i) => Permit {
                own: &self.own.rules[i as usize],
                approval: None,
            },
            RulesOutcome::Approval(i) => Permit {
                own: &self.own.rules[i as usize],
                approval: Some(&self.own.rules[i as usize]),
            },
            denied => {
                return Err(Denial {
                    rule: self.own.deciding_rule(denied),
                    reason: match denied {
                        RulesOutcome::Denied(_) => Reason::DeniedByRule,
                        _ => Reason::NoRuleAllows,
                    },
                });
            }
        };
        // Every link is checked before any approval is asked for: a deny
        // anywhere in the chain wins.
        for (i, link) in links.iter().enumerate() {
            let asking = self.check_link(query, i, link, initiator)?;
            permit.approval = permit.approval.or(asking);
        }
        Ok(permit)
    }

    /// Checks hop `i` of the chain: its grant, and its delegator's own rules.
    /// `Ok` holds the delegator's requireApproval rule when its rules ask for
    /// approval rather than allow.
    fn check_link(
        &self,
        query: &Query<'_>,
        i: usize,
        link: &DelegationLink,
        initiator: Initiator<'_>,
    ) -> Result<Option<&CompiledRule>, Denial> {
        let links = query.links;
        let delegation_denial = |reason| Denial {
            rule: DecidingRule::Delegation,
            reason,
        };
        let Some(grant) = self.grants.get(&link.grant) else {
            return Err(delegation_denial(Reason::UnknownGrant {
                grant: link.grant.clone(),
            }));
        };
        let next = links.get(i + 1).map_or(&self.agent, |l| &l.delegator);
        if grant.from != link.delegator || grant.to != *next {
            return Err(delegation_denial(Reason::GrantMismatch {
                grant: link.grant.clone(),
            }));
        }
        if query.now >= grant.expires_at {
            return Err(Denial {
                rule: DecidingRule::GrantExpired,
                reason: Reason::GrantExpired {
                    grant: link.grant.clone(),
                    expired_at: grant.expires_at,
                },
            });
        }
        let further_hops = links.len() - 1 - i;
        if further_hops > grant.max_depth as usize {
            return Err(delegation_denial(Reason::DepthExceeded {
                grant: link.grant.clone(),
                max_depth: grant.max_depth,
                further_hops,
            }));
        }
        let Some(delegator) = self.delegators.get(&link.delegator) else {
            return Err(delegation_denial(Reason::DelegatorNotAllowed {
                delegator: link.delegator.clone(),
                rule: DecidingRule::NoRuleAllows,
            }));
        };
        // The grant is written in the delegator's namespace: its effect matches
        // read the delegator's classifications.
        let effects = delegator.effects(query.server, query.tool);
        let grant_ctx = self.context(query, next, i + 1, initiator);
        let covered = grant
            .tools
            .iter()
            .any(|m| m.matches(query.server, query.tool, effects))
            && query.mode.applies(
                RuleAction::Allow,
                grant.conditions.evaluate(&grant_ctx).truth,
            );
        if !covered {
            return Err(delegation_denial(Reason::GrantDoesNotCover {
                grant: link.grant.clone(),
            }));
        }
        if i == 0 && delegator.require_delegation {
            return Err(delegation_denial(Reason::DelegatorNotAllowed {
                delegator: link.delegator.clone(),
                rule: DecidingRule::RequireDelegation,
            }));
        }
        let delegator_ctx = self.context(query, &link.delegator, i, initiator);
        match delegator.evaluate(&delegator_ctx, query.mode) {
            RulesOutcome::Allowed(_) => Ok(None),
            RulesOutcome::Approval(j) => Ok(Some(&delegator.rules[j as usize])),
            denied => Err(delegation_denial(Reason::DelegatorNotAllowed {
                delegator: link.delegator.clone(),
                rule: delegator.deciding_rule(denied),
            })),
        }
    }

    /// Decides the call and says, for every rule of the agent, whether it matched
    /// and if not why: for `chaperonectl policy explain`.
    pub fn explain(&self, request: &DecisionRequest<'_>) -> Explanation {
        let decision = self.decide(request);
        let links = request.delegation.map_or(&[][..], |c| &c.links);
        let initiator = match request.initiator {
            Some(user) => Initiator::User(user),
            None => Initiator::Agent(links.first().map_or(&self.agent, |l| &l.delegator)),
        };
        let ctx = EvalContext {
            server: request.server,
            tool: request.tool,
            arguments: Some(request.arguments),
            session: Some(request.session),
            agent: &self.agent,
            depth: links.len(),
            chain: links,
            initiator,
        };
        let effects = self.own.effects(request.server, request.tool);
        // A delegator's requireApproval rule may share its `policy/rule` with
        // one of the agent's own (another namespace): it is not an own rule.
        let deciding = match &decision.approval {
            Some(asked) if asked.policy.namespace != self.agent.namespace => "",
            _ => decision.rule.as_str(),
        };
        let rules = self
            .own
            .rules
            .iter()
            .map(|rule| {
                let outcome = if !rule.matches_tool(request.server, request.tool, effects) {
                    RuleOutcome::ToolDoesNotMatch
                } else {
                    let evaluation = rule.conditions.evaluate(&ctx);
                    let decided = &*rule.id == deciding;
                    // An unknown requireApproval rule decides only by holding
                    // what an allow rule would allow.
                    let applies = Mode::Decide.applies(rule.action, evaluation.truth)
                        || (decided && rule.action == RuleAction::RequireApproval);
                    let condition = evaluation
                        .part
                        .map(|p| rule.conditions.describe(p))
                        .unwrap_or_default();
                    match (applies, evaluation.truth) {
                        (true, _) if decided => RuleOutcome::Decided,
                        (true, Truth::Unknown) => RuleOutcome::MatchedFailClosed { condition },
                        (true, _) => RuleOutcome::Matched,
                        (false, Truth::False) => RuleOutcome::ConditionFalse { condition },
                        (false, _) => RuleOutcome::ConditionUnknown { condition },
                    }
                };
                RuleExplanation {
                    rule: rule.id.to_string(),
                    action: rule.action,
                    outcome,
                }
            })
            .collect();
        Explanation {
            decision,
            effects,
            rules,
        }
    }
}

/// Decides a call against an engine (see [`Engine::decide`]).
pub fn decide(engine: &Engine, request: &DecisionRequest<'_>) -> Decision {
    engine.decide(request)
}

/// Whether `tools/list` shows a tool (see [`Engine::visible`]).
pub fn visible(engine: &Engine, server: &str, tool: &str) -> bool {
    engine.visible(server, tool)
}

/// A decision with the story of every rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The decision.
    pub decision: Decision,
    /// Effects of the tool by the agent's classifications.
    pub effects: EffectSet,
    /// Every rule of the agent, in rule order.
    pub rules: Vec<RuleExplanation>,
}

/// What one rule did with the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleExplanation {
    /// `policy/rule`.
    pub rule: String,
    /// `allow`, `deny` or `requireApproval`.
    pub action: RuleAction,
    /// What happened.
    pub outcome: RuleOutcome,
}

/// What one rule did with the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleOutcome {
    /// This rule decided.
    Decided,
    /// The rule matched, but another decided (a deny, a requireApproval, an
    /// earlier allow, or a delegation check).
    Matched,
    /// A deny rule matched because a condition could not be evaluated (missing
    /// field, wrong type, CEL error): deny rules fail closed.
    MatchedFailClosed {
        /// The condition.
        condition: String,
    },
    /// The rule is about other tools.
    ToolDoesNotMatch,
    /// A condition is false.
    ConditionFalse {
        /// The condition.
        condition: String,
    },
    /// A condition could not be evaluated (missing field, wrong type, CEL
    /// error), so the allow (or requireApproval) rule does not match.
    ConditionUnknown {
        /// The condition.
        condition: String,
    },
}

impl std::fmt::Display for RuleOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleOutcome::Decided => f.write_str("matched and decided"),
            RuleOutcome::Matched => f.write_str("matched (another rule or check decided)"),
            RuleOutcome::MatchedFailClosed { condition } => write!(
                f,
                "matched: {condition} could not be evaluated (missing or wrong type), and deny rules fail closed"
            ),
            RuleOutcome::ToolDoesNotMatch => f.write_str("not about this tool"),
            RuleOutcome::ConditionFalse { condition } => write!(f, "condition false: {condition}"),
            RuleOutcome::ConditionUnknown { condition } => write!(
                f,
                "condition not evaluable: {condition} (missing or wrong type); allow and requireApproval rules need it true"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_split_their_run_into_deny_approve_and_allow() {
        let all = [9, 9, 1, 2, 3, 4, 9];
        let candidates = Candidates {
            start: 2,
            deny: 1,
            approve: 2,
            allow: 1,
            effects: EffectSet::EMPTY,
        };
        let (deny, approve, allow) = candidates.split(&all);
        assert_eq!((deny, approve, allow), (&[1][..], &[2, 3][..], &[4][..]));
        let empty = Candidates {
            start: all.len(),
            deny: 0,
            approve: 0,
            allow: 0,
            effects: EffectSet::EMPTY,
        };
        assert_eq!(empty.split(&all), (&[][..], &[][..], &[][..]));
    }

    #[test]
    fn each_tool_run_holds_its_rules_by_action_in_rule_order() {
        let rule = |name: &str, action: RuleAction, tool: &str| SnapshotRule {
            policy: "p".into(),
            name: name.into(),
            action,
            tools: vec![ToolMatch {
                server: "s".into(),
                name: Some(tool.into()),
                effect: None,
            }],
            when: None,
            rate_limit: None,
            approval: None,
        };
        let authority = AgentAuthority {
            agent: AgentKey::new("ns", "agent"),
            require_delegation: false,
            tool_servers: vec!["s".into()],
            rules: vec![
                rule("allow-a", RuleAction::Allow, "a"),
                rule("deny-b", RuleAction::Deny, "b"),
                rule("ask-a", RuleAction::RequireApproval, "a"),
                rule("deny-a", RuleAction::Deny, "a"),
                rule("any", RuleAction::Allow, "*"),
                rule("allow-a-2", RuleAction::Allow, "a"),
            ],
            classifications: vec![],
        };
        let compiled = CompiledAuthority::new(&authority, &[]).expect("compiles");
        let run = |tool: &str| {
            let candidates = &compiled.index.servers["s"].tools[tool];
            let (deny, approve, allow) = candidates.split(&compiled.index.candidates);
            (deny.to_vec(), approve.to_vec(), allow.to_vec())
        };
        assert_eq!(run("a"), (vec![3], vec![2], vec![0, 4, 5]));
        assert_eq!(run("b"), (vec![1], vec![], vec![4]));
    }
}
