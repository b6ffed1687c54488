//! Session context: per session scope (a delegated task, a W3C trace, an MCP
//! session of one tool server, or the agent pod: see
//! [`chaperone_policy::resolve_scope`]) the history session conditions read
//! (calls per tool, effects seen), the per-session rate-limit counters, the
//! tasks it created and the audit hash chain, under a Chaperone session id of
//! its own. The ordered steps themselves are in the audit trail, not here: a
//! session costs the same memory after its first call and its ten-thousandth.
//!
//! The store is bounded: sessions idle longer than the agent's idle timeout are
//! forgotten, and when the configured maximum (100,000 by default) is reached
//! the least recently used eighth of them is evicted. MCP sessions are created
//! only when the upstream issues an id in answer to `initialize` through the
//! sidecar, so an agent cannot start a fresh, empty history by inventing an
//! MCP session id; trace sessions are created by the first call of a trace (an
//! agent that must not start fresh histories has `session.scope: agent`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chaperone_policy::{DelegationChain, GrantKey, ScopeKind, SessionHistory};

use crate::assertion::{Actor, HexId};
use crate::ratelimit::TokenBucket;

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

/// What was decided about one call of a session, as audit records name it.
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
    /// SHA-256 of this session's last audit record.
    pub last_audit_hash: Option<[u8; 32]>,
    /// The kind of scope this session is ([`ScopeKind`]).
    pub scope: ScopeKind,
    /// Its key in that scope: the trace id, the MCP session id, the task's
    /// Chaperone session id; empty for the agent scope. Shared with the
    /// store's key of the session where they are the same.
    pub scope_key: Arc<str>,
    /// What only some sessions have (rate-limit counters, tasks, a session
    /// opened at the inbound side): boxed, so that the many sessions without
    /// any of it cost a pointer.
    extras: Option<Box<SessionExtras>>,
}

/// The parts of a [`SessionState`] that only some sessions have.
#[derive(Debug, Default)]
pub struct SessionExtras {
    /// Per-session rate-limit counters, by limit id.
    pub rate_limits: Vec<(Arc<str>, TokenBucket)>,
    /// The `Chaperone-Session` token of a session opened at the inbound side.
    pub handle: Option<String>,
    /// For a session another agent delegated (or a user initiated) at the
    /// inbound side: who, under which grants. `None` for the agent's own.
    pub delegation: Option<Arc<Delegation>>,
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
    pub fn scoped(kind: ScopeKind, key: impl Into<Arc<str>>) -> Self {
        Self {
            chaperone_id: HexId::random(),
            history: SessionHistory::new(),
            last_audit_hash: None,
            scope: kind,
            scope_key: key.into(),
            extras: None,
        }
    }

    /// What only some sessions have, if this one has any of it.
    pub fn extras(&self) -> Option<&SessionExtras> {
        self.extras.as_deref()
    }

    /// What only some sessions have, created empty on first use.
    pub fn extras_mut(&mut self) -> &mut SessionExtras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// For a session opened at the inbound side: who delegated it (or which
    /// user initiated it), under which grants.
    pub fn delegation(&self) -> Option<&Arc<Delegation>> {
        self.extras()?.delegation.as_ref()
    }

    /// The `Chaperone-Session` token of a session opened at the inbound side.
    pub fn handle(&self) -> Option<&str> {
        self.extras()?.handle.as_deref()
    }

    /// The trace span the calls of a session opened at the inbound side
    /// continue when they carry no trace context of their own.
    pub fn trace(&self) -> Option<chaperone_telemetry::TraceParent> {
        self.extras()?.trace
    }

    /// Remembers that this session created task `id`.
    pub fn add_task(&mut self, id: &str) {
        if self.owns_task(id) {
            return;
        }
        let tasks = &mut self.extras_mut().tasks;
        if tasks.len() == MAX_TASKS_KEPT {
            tasks.pop_front();
        }
        tasks.push_back(id.into());
    }

    /// Whether this session created task `id` (and still remembers it).
    pub fn owns_task(&self, id: &str) -> bool {
        self.extras()
            .is_some_and(|extras| extras.tasks.iter().any(|t| &**t == id))
    }

    /// The bucket of per-session limit `id`, created full.
    pub fn bucket(&mut self, id: &Arc<str>, calls: u32, period: Duration) -> &mut TokenBucket {
        let rate_limits = &mut self.extras_mut().rate_limits;
        let index = match rate_limits.iter().position(|(k, _)| k == id) {
            Some(index) => index,
            None => {
                rate_limits.push((Arc::clone(id), TokenBucket::new(calls, period)));
                rate_limits.len() - 1
            }
        };
        let bucket = &mut rate_limits[index].1;
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
    /// When it was last used ([`Inner::stamp`]): for idle expiry and the
    /// eviction order.
    last_used: u64,
}

/// The sessions of one tool server, by session id.
type ServerSessions = HashMap<Arc<str>, Slot>;

/// Sessions evicted at once when the store is full: the least recently used
/// `1/EVICT_FRACTION` of it.
const EVICT_FRACTION: usize = 8;

struct Inner {
    /// Sessions by server (each server name stored once), then by session id.
    servers: HashMap<Arc<str>, ServerSessions>,
    len: usize,
    /// The origin of the stamps.
    epoch: Instant,
    /// The last stamp given.
    last_stamp: u64,
}

impl Inner {
    fn new() -> Self {
        Self {
            servers: HashMap::new(),
            len: 0,
            epoch: Instant::now(),
            last_stamp: 0,
        }
    }

    /// Nanoseconds from the epoch to `now`, made strictly greater than every
    /// stamp given before: a time for idle expiry and, unique, the order of
    /// uses for eviction in 8 bytes.
    fn stamp(&mut self, now: Instant) -> u64 {
        let since =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        self.last_stamp = since.max(self.last_stamp.saturating_add(1));
        self.last_stamp
    }

    /// Whether a slot last used at `stamp` (from `epoch`) has been idle
    /// longer than `idle_timeout` at `now`.
    fn idle_at(epoch: Instant, stamp: u64, now: Instant, idle_timeout: Duration) -> bool {
        let since = now.saturating_duration_since(epoch);
        since.saturating_sub(Duration::from_nanos(stamp)) > idle_timeout
    }

    fn slot_mut(&mut self, key: SessionKey<'_>) -> Option<&mut Slot> {
        self.servers
            .get_mut(key.server)?
            .get_mut(key.mcp_session_id)
    }

    fn touch(&mut self, key: SessionKey<'_>, now: Instant) -> Option<SharedSession> {
        let stamp = self.stamp(now);
        let slot = self.slot_mut(key)?;
        slot.last_used = stamp;
        Some(Arc::clone(&slot.session))
    }

    fn remove(&mut self, key: SessionKey<'_>) -> bool {
        let Some(sessions) = self.servers.get_mut(key.server) else {
            return false;
        };
        match sessions.remove(key.mcp_session_id) {
            Some(_) => {
                self.len -= 1;
                true
            }
            None => false,
        }
    }

    /// Makes room for one more session in a store of at most `max`: when
    /// full, forgets the least recently used eighth (at least one). There is no
    /// per-session ordering structure to keep (a B-tree of uses cost ≈ 80
    /// bytes per session, its nodes half empty from the touches); one scan of
    /// the slots per eighth of the store is a few comparisons per new
    /// session.
    fn make_room(&mut self, max: usize) {
        if self.len < max {
            return;
        }
        let evict = (self.len + 1 - max + max / EVICT_FRACTION).clamp(1, self.len);
        let mut uses: Vec<u64> = self
            .servers
            .values()
            .flat_map(|sessions| sessions.values().map(|slot| slot.last_used))
            .collect();
        // Stamps are unique: exactly `evict` are at or below the cutoff.
        let (_, &mut cutoff, _) = uses.select_nth_unstable(evict - 1);
        let mut evicted = 0;
        for sessions in self.servers.values_mut() {
            sessions.retain(|_, slot| {
                let keep = slot.last_used > cutoff;
                evicted += usize::from(!keep);
                keep
            });
        }
        self.len -= evicted;
    }

    /// Stores `session` as `server`'s session `id` (`id` is the key's
    /// `mcp_session_id`, shared).
    fn insert(&mut self, server: &str, id: Arc<str>, session: SharedSession, now: Instant) {
        let last_used = self.stamp(now);
        let server = match self.servers.get_key_value(server) {
            Some((server, _)) => Arc::clone(server),
            None => Arc::from(server),
        };
        self.servers
            .entry(server)
            .or_default()
            .insert(id, Slot { session, last_used });
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
            inner: Mutex::new(Inner::new()),
            max_sessions: max_sessions.max(1),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates (or resets) the session `key`, of scope `kind` keyed by
    /// `key.mcp_session_id`, evicting the least recently used eighth of the
    /// sessions if the store is full.
    pub fn create(&self, key: SessionKey<'_>, kind: ScopeKind, now: Instant) -> SharedSession {
        // One copy of the id: the store's key and the session's scope key.
        let id: Arc<str> = Arc::from(key.mcp_session_id);
        let state = SessionState::scoped(kind, Arc::clone(&id));
        self.store(key, id, Arc::new(Mutex::new(state)), now)
    }

    /// Stores `state` under `key` (replacing any session there), evicting the
    /// least recently used eighth of the sessions when full.
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
        self.store(key, Arc::from(key.mcp_session_id), session, now)
    }

    /// Stores `session` under `key` (`id` is `key.mcp_session_id`), evicting
    /// the least recently used eighth of the sessions when full.
    fn store(
        &self,
        key: SessionKey<'_>,
        id: Arc<str>,
        session: SharedSession,
        now: Instant,
    ) -> SharedSession {
        let mut inner = self.inner();
        inner.remove(key);
        inner.make_room(self.max_sessions);
        inner.insert(key.server, id, Arc::clone(&session), now);
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
        let last_used = inner.slot_mut(key)?.last_used;
        let expired = Inner::idle_at(inner.epoch, last_used, now, idle_timeout);
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
        let inner = &mut *inner;
        let mut expired = 0;
        for sessions in inner.servers.values_mut() {
            sessions.retain(|_, slot| {
                let keep = !Inner::idle_at(inner.epoch, slot.last_used, now, idle_timeout);
                expired += usize::from(!keep);
                keep
            });
        }
        inner.len -= expired;
        expired
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
    fn a_full_store_evicts_its_least_recently_used_eighth() {
        let store = SessionStore::new(16);
        let now = Instant::now();
        let ids: Vec<String> = (0..16).map(|n| format!("s{n}")).collect();
        for id in &ids {
            store.create(SessionKey::new("a", id), ScopeKind::McpSession, now);
        }
        // The three oldest, used again, are now the most recently used.
        for id in &ids[..3] {
            assert!(store.get(SessionKey::new("a", id), now, IDLE).is_some());
        }
        store.create(SessionKey::new("b", "new"), ScopeKind::McpSession, now);
        // 16 + 1 - 16 + 16/8 = 3 evicted: s3, s4, s5.
        assert_eq!(store.len(), 14);
        for id in &ids[3..6] {
            assert!(
                store.get(SessionKey::new("a", id), now, IDLE).is_none(),
                "{id}"
            );
        }
        for id in ids[..3].iter().chain(&ids[6..]) {
            assert!(
                store.get(SessionKey::new("a", id), now, IDLE).is_some(),
                "{id}"
            );
        }
        assert!(store.get(SessionKey::new("b", "new"), now, IDLE).is_some());
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
        assert_eq!(state.extras().unwrap().tasks.len(), MAX_TASKS_KEPT);
        assert!(!state.owns_task("t0"), "the oldest is forgotten");
        assert!(state.owns_task("t1") && state.owns_task(&format!("t{MAX_TASKS_KEPT}")));
        assert!(!state.owns_task("other"));
    }
}
