//! Session context: per MCP session (the upstream's `Mcp-Session-Id`, per tool
//! server) the ordered steps taken, the history session conditions read, the
//! per-session rate-limit counters and the audit hash chain, under a Chaperone
//! session id of its own.
//!
//! The store is bounded: sessions idle longer than the agent's idle timeout are
//! forgotten, and beyond the configured maximum (100,000 by default) the least
//! recently used session is evicted. Sessions are created only when the upstream
//! issues an id in answer to `initialize` through the sidecar, so an agent cannot
//! start a fresh, empty history by inventing an id.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chaperone_policy::{DelegationChain, EffectSet, GrantKey, SessionHistory};

use crate::assertion::{Actor, random_id};
use crate::ratelimit::TokenBucket;

/// Steps kept per session for inspection; the counts in [`SessionHistory`] stay
/// exact beyond it.
pub const MAX_STEPS_KEPT: usize = 256;

/// The key of a session: tool server and its `Mcp-Session-Id` (empty for servers
/// that do not issue one).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    /// The tool server's name.
    pub server: Arc<str>,
    /// The upstream's session id; empty for a stateless server.
    pub mcp_session_id: Arc<str>,
}

impl SessionKey {
    /// The key of `server`'s session `mcp_session_id`.
    pub fn new(server: &str, mcp_session_id: &str) -> Self {
        Self {
            server: Arc::from(server),
            mcp_session_id: Arc::from(mcp_session_id),
        }
    }
}

/// One step a session took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `server/tool`.
    pub tool: String,
    /// `allow`, `deny` or `wouldDeny`.
    pub decision: &'static str,
    /// The tool's effects.
    pub effects: EffectSet,
    /// When, unix milliseconds.
    pub at_unix_ms: i64,
}

/// Everything the sidecar knows about one session.
#[derive(Debug)]
pub struct SessionState {
    /// The Chaperone session id (assertions' `sid`, audit records).
    pub chaperone_id: String,
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
    /// A new, empty session with a fresh Chaperone session id.
    pub fn new() -> Self {
        Self {
            chaperone_id: random_id(),
            history: SessionHistory::new(),
            steps: VecDeque::new(),
            last_audit_hash: None,
            rate_limits: Vec::new(),
            handle: None,
            delegation: None,
        }
    }

    /// Appends a step, forgetting the oldest beyond [`MAX_STEPS_KEPT`].
    pub fn push_step(&mut self, step: Step) {
        if self.steps.len() == MAX_STEPS_KEPT {
            self.steps.pop_front();
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

#[derive(Default)]
struct Inner {
    slots: HashMap<SessionKey, Slot>,
    /// Least recently used first.
    order: BTreeMap<u64, SessionKey>,
    next_tick: u64,
}

impl Inner {
    fn touch(&mut self, key: &SessionKey, now: Instant) -> Option<SharedSession> {
        let tick = self.next_tick;
        let slot = self.slots.get_mut(key)?;
        self.order.remove(&slot.tick);
        slot.tick = tick;
        slot.last_used = now;
        self.order.insert(tick, key.clone());
        self.next_tick += 1;
        Some(Arc::clone(&slot.session))
    }

    fn remove(&mut self, key: &SessionKey) -> bool {
        match self.slots.remove(key) {
            Some(slot) => {
                self.order.remove(&slot.tick);
                true
            }
            None => false,
        }
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

    /// Creates (or resets) the session `key`, evicting the least recently used
    /// session if the store is full.
    pub fn create(&self, key: SessionKey, now: Instant) -> SharedSession {
        self.insert(key, SessionState::new(), now)
    }

    /// Stores `state` under `key` (replacing any session there), evicting the
    /// least recently used session when full.
    pub fn insert(&self, key: SessionKey, state: SessionState, now: Instant) -> SharedSession {
        self.insert_shared(key, Arc::new(Mutex::new(state)), now)
    }

    /// Stores a session already shared elsewhere under `key` as well.
    pub fn insert_shared(
        &self,
        key: SessionKey,
        session: SharedSession,
        now: Instant,
    ) -> SharedSession {
        let mut inner = self.inner();
        inner.remove(&key);
        while inner.slots.len() >= self.max_sessions {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.slots.remove(&oldest);
        }
        let tick = inner.next_tick;
        inner.next_tick += 1;
        inner.order.insert(tick, key.clone());
        inner.slots.insert(
            key,
            Slot {
                session: Arc::clone(&session),
                last_used: now,
                tick,
            },
        );
        session
    }

    /// The live session `key`, marked used; `None` if unknown or idle longer than
    /// `idle_timeout` (then it is forgotten).
    pub fn get(
        &self,
        key: &SessionKey,
        now: Instant,
        idle_timeout: Duration,
    ) -> Option<SharedSession> {
        let mut inner = self.inner();
        let expired = match inner.slots.get(key) {
            None => return None,
            Some(slot) => now.saturating_duration_since(slot.last_used) > idle_timeout,
        };
        if expired {
            inner.remove(key);
            return None;
        }
        inner.touch(key, now)
    }

    /// The session `key`, created if unknown or expired (for servers that issue
    /// no session id).
    pub fn get_or_create(
        &self,
        key: &SessionKey,
        now: Instant,
        idle_timeout: Duration,
    ) -> SharedSession {
        match self.get(key, now, idle_timeout) {
            Some(session) => session,
            None => self.create(key.clone(), now),
        }
    }

    /// Forgets session `key` (the client ended it); whether it existed.
    pub fn remove(&self, key: &SessionKey) -> bool {
        self.inner().remove(key)
    }

    /// Forgets every session idle longer than `idle_timeout`; how many.
    pub fn sweep(&self, now: Instant, idle_timeout: Duration) -> usize {
        let mut inner = self.inner();
        let expired: Vec<SessionKey> = inner
            .slots
            .iter()
            .filter(|(_, slot)| now.saturating_duration_since(slot.last_used) > idle_timeout)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &expired {
            inner.remove(key);
        }
        expired.len()
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.inner().slots.len()
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
                .get(&SessionKey::new("s", "x"), Instant::now(), IDLE)
                .is_none()
        );
        assert!(store.is_empty());
    }

    #[test]
    fn evicts_the_least_recently_used_session() {
        let store = SessionStore::new(2);
        let now = Instant::now();
        store.create(SessionKey::new("s", "a"), now);
        store.create(SessionKey::new("s", "b"), now);
        // Touch "a" so that "b" is the least recently used.
        assert!(store.get(&SessionKey::new("s", "a"), now, IDLE).is_some());
        store.create(SessionKey::new("s", "c"), now);
        assert_eq!(store.len(), 2);
        assert!(store.get(&SessionKey::new("s", "b"), now, IDLE).is_none());
        assert!(store.get(&SessionKey::new("s", "a"), now, IDLE).is_some());
    }

    #[test]
    fn forgets_idle_sessions() {
        let store = SessionStore::new(10);
        let now = Instant::now();
        store.create(SessionKey::new("s", "a"), now);
        let later = now + Duration::from_secs(61);
        assert!(store.get(&SessionKey::new("s", "a"), later, IDLE).is_none());
        assert!(store.is_empty());
    }

    #[test]
    fn sessions_get_distinct_chaperone_ids() {
        let store = SessionStore::new(10);
        let now = Instant::now();
        let a = store.create(SessionKey::new("s", "a"), now);
        let b = store.create(SessionKey::new("s", "b"), now);
        assert_ne!(lock(&a).chaperone_id, lock(&b).chaperone_id);
    }
}
