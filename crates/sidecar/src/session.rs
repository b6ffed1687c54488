//! Session context: per session scope (a delegated task, a W3C trace, an MCP
//! session of one tool server, or the agent pod: see
//! [`chaperone_policy::resolve_scope`]) the ordered steps taken, the history
//! session conditions read, the per-session rate-limit counters, the tasks it
//! created and the audit hash chain, under a Chaperone session id of its own.
//!
//! The store is bounded: sessions idle longer than the agent's idle timeout are
//! forgotten, and beyond the configured maximum (100,000 by default) the least
//! recently used session is evicted. MCP sessions are created only when the
//! upstream issues an id in answer to `initialize` through the sidecar, so an
//! agent cannot start a fresh, empty history by inventing an MCP session id;
//! trace sessions are created by the first call of a trace (an agent that must
//! not start fresh histories has `session.scope: agent`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chaperone_policy::{DelegationChain, EffectSet, GrantKey, ScopeKind, SessionHistory};

use crate::assertion::{Actor, HexId};
use crate::ratelimit::TokenBucket;

/// Steps kept per session for inspection; the counts in [`SessionHistory`] stay
/// exact beyond it.
pub const MAX_STEPS_KEPT: usize = 256;

/// Task ids kept per session (tasks it created that it may poll); the oldest
/// is forgotten beyond it.
pub const MAX_TASKS_KEPT: usize = 256;

/// Key space of trace sessions in the store (not a DNS label, so never a tool
/// server's name).
pub const TRACE_SPACE: &str = ":trace";
/// Key space of the agent pod's own session.
pub const AGENT_SPACE: &str = ":agent";

/// The key of a session: a key space (a tool server's name for its MCP
/// sessions, [`TRACE_SPACE`], [`AGENT_SPACE`]) and the key in it (the
/// `Mcp-Session-Id`, the trace id, empty for the agent). Borrowed: looking a
/// session up allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey<'a> {
    /// The tool server's name.
    pub server: &'a str,
    /// The upstream's session id; empty for a stateless server.
    pub mcp_session_id: &'a str,
}

impl<'a> SessionKey<'a> {
    /// The key of `server`'s session `mcp_session_id`.
    pub fn new(server: &'a str, mcp_session_id: &'a str) -> Self {
        Self {
            server,
            mcp_session_id,
        }
    }
}

/// One step a session took (32 bytes plus the name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `server/tool`.
    pub tool: Box<str>,
    /// What was decided.
    pub decision: StepDecision,
    /// The tool's effects.
    pub effects: EffectSet,
    /// When, unix milliseconds.
    pub at_unix_ms: i64,
}

/// The decision of a [`Step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepDecision {
    /// Allowed and forwarded.
    Allow,
    /// Denied, but forwarded (dry run).
    WouldDeny,
    /// Denied.
    Deny,
    /// Refused for want of a person's approval (denied, expired, still
    /// pending at the end of the hold, or not askable).
    Approval,
    /// Needed a person's approval, but forwarded without one (dry run).
    WouldRequireApproval,
}

impl StepDecision {
    /// `allow`, `wouldDeny`, `deny`, `approval` or `wouldRequireApproval`, as
    /// in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            StepDecision::Allow => "allow",
            StepDecision::WouldDeny => "wouldDeny",
            StepDecision::Deny => "deny",
            StepDecision::Approval => "approval",
            StepDecision::WouldRequireApproval => "wouldRequireApproval",
        }
    }
}

/// Everything the sidecar knows about one session.
#[derive(Debug)]
pub struct SessionState {
    /// The Chaperone session id (assertions' `sid`, audit records).
    pub chaperone_id: HexId,
    /// What session conditions read.
    pub history: SessionHistory,
    /// The most recent steps, oldest first.
    pub steps: VecDeque<Step>,
    /// SHA-256 of this session's last audit record.
    pub last_audit_hash: Option<[u8; 32]>,
    /// Per-session rate-limit counters, by limit id.
    pub rate_limits: Vec<(Arc<str>, TokenBucket)>,
    /// The `Chaperone-Session` token of a session opened at the inbound side.
    pub handle: Option<String>,
    /// For a session another agent delegated (or a user initiated) at the
    /// inbound side: who, under which grants. `None` for the agent's own.
    pub delegation: Option<Arc<Delegation>>,
    /// The kind of scope this session is ([`ScopeKind`]).
    pub scope: ScopeKind,
    /// Its key in that scope: the trace id, the MCP session id, the task's
    /// Chaperone session id; empty for the agent scope.
    pub scope_key: Box<str>,
    /// Tasks created by calls of this session (tasks extension or 2025-11-25
    /// tasks), newest last: the ones it may poll, update or cancel.
    pub tasks: VecDeque<Box<str>>,
    /// For a session opened at the inbound side: the trace span of the call
    /// that last joined it, the parent of the calls the agent makes for it
    /// without a trace context of their own (so one trace crosses the hop
    /// whether or not the agent's app propagates it).
    pub trace: Option<chaperone_telemetry::TraceParent>,
}

/// How a session opened at the inbound side came to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delegation {
    /// The chain decisions use, origin first; its last link's grant is the first
    /// of [`Delegation::last_grants`]. Empty for a session a user initiated at
    /// this agent.
    pub chain: DelegationChain,
    /// Every valid grant from the caller to this agent: a call is allowed if one
    /// of them covers it (tried in order).
    pub last_grants: Vec<GrantKey>,
    /// The verified user who initiated the task; `None` makes the chain's
    /// origin agent the initiator.
    pub initiator: Option<String>,
    /// `sub` of this session's assertions: the initiator, or the origin agent's
    /// identity.
    pub subject: String,
    /// The caller's actor chain (current actor outermost); `None` for a
    /// session a user initiated here.
    pub caller: Option<Actor>,
    /// The chain for audit records: `namespace/name` of every agent, origin
    /// first, this agent last.
    pub audit_chain: Vec<String>,
}

impl Delegation {
    /// The chain with `grant` as its last link's grant.
    pub fn chain_with(&self, grant: &GrantKey) -> DelegationChain {
        let mut chain = self.chain.clone();
        if let Some(last) = chain.links.last_mut() {
            last.grant = grant.clone();
        }
        chain
    }
}

impl Default for SessionState {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionState {
    /// A new, empty session of the agent scope with a fresh Chaperone session
    /// id.
    pub fn new() -> Self {
        Self::scoped(ScopeKind::Agent, "")
    }

    /// A new, empty session of scope `kind` under `key`.
    pub fn scoped(kind: ScopeKind, key: &str) -> Self {
        Self {
            chaperone_id: HexId::random(),
            history: SessionHistory::new(),
            steps: VecDeque::new(),
            last_audit_hash: None,
            rate_limits: Vec::new(),
            handle: None,
            delegation: None,
            scope: kind,
            scope_key: key.into(),
            tasks: VecDeque::new(),
            trace: None,
        }
    }

    /// Remembers that this session created task `id`.
    pub fn add_task(&mut self, id: &str) {
        if self.owns_task(id) {
            return;
        }
        if self.tasks.len() == MAX_TASKS_KEPT {
            self.tasks.pop_front();
        }
        self.tasks.push_back(id.into());
    }

    /// Whether this session created task `id` (and still remembers it).
    pub fn owns_task(&self, id: &str) -> bool {
        self.tasks.iter().any(|t| &**t == id)
    }

    /// Appends a step, forgetting the oldest beyond [`MAX_STEPS_KEPT`].
    pub fn push_step(&mut self, step: Step) {
        if self.steps.len() == MAX_STEPS_KEPT {
            self.steps.pop_front();
        } else if self.steps.len() == self.steps.capacity() {
            // Grow by half instead of doubling from four: most sessions take
            // few steps, and 100,000 of them are held at once.
            let more = (self.steps.len() / 2).max(1);
            self.steps
                .reserve_exact(more.min(MAX_STEPS_KEPT - self.steps.len()));
        }
        self.steps.push_back(step);
    }

    /// The bucket of per-session limit `id`, created full.
    pub fn bucket(&mut self, id: &Arc<str>, calls: u32, period: Duration) -> &mut TokenBucket {
        let index = match self.rate_limits.iter().position(|(k, _)| k == id) {
            Some(index) => index,
            None => {
                self.rate_limits
                    .push((Arc::clone(id), TokenBucket::new(calls, period)));
                self.rate_limits.len() - 1
            }
        };
        let bucket = &mut self.rate_limits[index].1;
        bucket.reconfigure(calls, period);
        bucket
    }
}

/// A shared handle on one session.
pub type SharedSession = Arc<Mutex<SessionState>>;

/// Locks a session, recovering from a poisoned lock (a panic elsewhere must not
/// take every later call of the session down with it).
pub fn lock(session: &SharedSession) -> MutexGuard<'_, SessionState> {
    session
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Slot {
    session: SharedSession,
    last_used: Instant,
    tick: u64,
}

/// The sessions of one tool server, by session id.
type ServerSessions = HashMap<Arc<str>, Slot>;

#[derive(Default)]
struct Inner {
    /// Sessions by server (each server name stored once), then by session id.
    servers: HashMap<Arc<str>, ServerSessions>,
    /// Least recently used first: server and session id of each tick.
    order: BTreeMap<u64, (Arc<str>, Arc<str>)>,
    len: usize,
    next_tick: u64,
}

impl Inner {
    fn slot_mut(&mut self, key: SessionKey<'_>) -> Option<&mut Slot> {
        self.servers
            .get_mut(key.server)?
            .get_mut(key.mcp_session_id)
    }

    fn touch(&mut self, key: SessionKey<'_>, now: Instant) -> Option<SharedSession> {
        let tick = self.next_tick;
        let slot = self.slot_mut(key)?;
        let old = std::mem::replace(&mut slot.tick, tick);
        slot.last_used = now;
        let session = Arc::clone(&slot.session);
        if let Some(entry) = self.order.remove(&old) {
            self.order.insert(tick, entry);
        }
        self.next_tick += 1;
        Some(session)
    }

    fn remove(&mut self, key: SessionKey<'_>) -> bool {
        let Some(sessions) = self.servers.get_mut(key.server) else {
            return false;
        };
        match sessions.remove(key.mcp_session_id) {
            Some(slot) => {
                self.order.remove(&slot.tick);
                self.len -= 1;
                true
            }
            None => false,
        }
    }

    fn evict_oldest(&mut self) -> bool {
        let Some((_, (server, id))) = self.order.pop_first() else {
            return false;
        };
        if let Some(sessions) = self.servers.get_mut(&server)
            && sessions.remove(&id).is_some()
        {
            self.len -= 1;
        }
        true
    }

    fn insert(&mut self, key: SessionKey<'_>, session: SharedSession, now: Instant) {
        let tick = self.next_tick;
        self.next_tick += 1;
        let server = match self.servers.get_key_value(key.server) {
            Some((server, _)) => Arc::clone(server),
            None => Arc::from(key.server),
        };
        let id: Arc<str> = Arc::from(key.mcp_session_id);
        self.order
            .insert(tick, (Arc::clone(&server), Arc::clone(&id)));
        self.servers.entry(server).or_default().insert(
            id,
            Slot {
                session,
                last_used: now,
                tick,
            },
        );
        self.len += 1;
    }
}

/// The bounded session store.
pub struct SessionStore {
    inner: Mutex<Inner>,
    max_sessions: usize,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("len", &self.len())
            .field("max_sessions", &self.max_sessions)
            .finish()
    }
}

impl SessionStore {
    /// A store holding at most `max_sessions` sessions.
    pub fn new(max_sessions: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_sessions: max_sessions.max(1),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates (or resets) the session `key`, of scope `kind` keyed by
    /// `key.mcp_session_id`, evicting the least recently used session if the
    /// store is full.
    pub fn create(&self, key: SessionKey<'_>, kind: ScopeKind, now: Instant) -> SharedSession {
        self.insert(key, SessionState::scoped(kind, key.mcp_session_id), now)
    }

    /// Stores `state` under `key` (replacing any session there), evicting the
    /// least recently used session when full.
    pub fn insert(&self, key: SessionKey<'_>, state: SessionState, now: Instant) -> SharedSession {
        self.insert_shared(key, Arc::new(Mutex::new(state)), now)
    }

    /// Stores a session already shared elsewhere under `key` as well.
    pub fn insert_shared(
        &self,
        key: SessionKey<'_>,
        session: SharedSession,
        now: Instant,
    ) -> SharedSession {
        let mut inner = self.inner();
        inner.remove(key);
        while inner.len >= self.max_sessions {
            if !inner.evict_oldest() {
                break;
            }
        }
        inner.insert(key, Arc::clone(&session), now);
        session
    }

    /// The live session `key`, marked used; `None` if unknown or idle longer than
    /// `idle_timeout` (then it is forgotten).
    pub fn get(
        &self,
        key: SessionKey<'_>,
        now: Instant,
        idle_timeout: Duration,
    ) -> Option<SharedSession> {
        let mut inner = self.inner();
        let expired = now.saturating_duration_since(inner.slot_mut(key)?.last_used) > idle_timeout;
        if expired {
            inner.remove(key);
            return None;
        }
        inner.touch(key, now)
    }

    /// The session `key`, created (of scope `kind`) if unknown or expired.
    pub fn get_or_create(
        &self,
        key: SessionKey<'_>,
        kind: ScopeKind,
        now: Instant,
        idle_timeout: Duration,
    ) -> SharedSession {
        match self.get(key, now, idle_timeout) {
            Some(session) => session,
            None => self.create(key, kind, now),
        }
    }

    /// Forgets session `key` (the client ended it); whether it existed.
    pub fn remove(&self, key: SessionKey<'_>) -> bool {
        self.inner().remove(key)
    }

    /// Forgets every session idle longer than `idle_timeout`; how many.
    pub fn sweep(&self, now: Instant, idle_timeout: Duration) -> usize {
        let mut inner = self.inner();
        let mut expired_ticks = Vec::new();
        for sessions in inner.servers.values_mut() {
            sessions.retain(|_, slot| {
                let keep = now.saturating_duration_since(slot.last_used) <= idle_timeout;
                if !keep {
                    expired_ticks.push(slot.tick);
                }
                keep
            });
        }
        for tick in &expired_ticks {
            inner.order.remove(tick);
        }
        inner.len -= expired_ticks.len();
        expired_ticks.len()
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.inner().len
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    #[test]
    fn unknown_sessions_are_not_created_by_lookup() {
        let store = SessionStore::new(10);
        assert!(
            store
                .get(SessionKey::new("s", "x"), Instant::now(), IDLE)
                .is_none()
        );
        assert!(store.is_empty());
    }

    #[test]
    fn evicts_the_least_recently_used_session() {
        let store = SessionStore::new(2);
        let now = Instant::now();
        store.create(SessionKey::new("s", "a"), ScopeKind::McpSession, now);
        store.create(SessionKey::new("s", "b"), ScopeKind::McpSession, now);
        // Touch "a" so that "b" is the least recently used.
        assert!(store.get(SessionKey::new("s", "a"), now, IDLE).is_some());
        store.create(SessionKey::new("s", "c"), ScopeKind::McpSession, now);
        assert_eq!(store.len(), 2);
        assert!(store.get(SessionKey::new("s", "b"), now, IDLE).is_none());
        assert!(store.get(SessionKey::new("s", "a"), now, IDLE).is_some());
    }

    #[test]
    fn forgets_idle_sessions() {
        let store = SessionStore::new(10);
        let now = Instant::now();
        store.create(SessionKey::new("s", "a"), ScopeKind::McpSession, now);
        let later = now + Duration::from_secs(61);
        assert!(store.get(SessionKey::new("s", "a"), later, IDLE).is_none());
        assert!(store.is_empty());
    }

    #[test]
    fn sessions_get_distinct_chaperone_ids() {
        let store = SessionStore::new(10);
        let now = Instant::now();
        let a = store.create(SessionKey::new("s", "a"), ScopeKind::McpSession, now);
        let b = store.create(SessionKey::new("s", "b"), ScopeKind::McpSession, now);
        assert_ne!(lock(&a).chaperone_id, lock(&b).chaperone_id);
        assert_eq!(lock(&a).scope, ScopeKind::McpSession);
        assert_eq!(&*lock(&a).scope_key, "a");
    }

    #[test]
    fn remembers_its_newest_tasks() {
        let mut state = SessionState::new();
        for n in 0..=MAX_TASKS_KEPT {
            state.add_task(&format!("t{n}"));
        }
        state.add_task("t1");
        assert_eq!(state.tasks.len(), MAX_TASKS_KEPT);
        assert!(!state.owns_task("t0"), "the oldest is forgotten");
        assert!(state.owns_task("t1") && state.owns_task(&format!("t{MAX_TASKS_KEPT}")));
        assert!(!state.owns_task("other"));
    }
}
