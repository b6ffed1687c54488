//! Sessions opened at the inbound side — delegated by another agent, or
//! initiated by a user — held in shares per caller (the calling agent, or the
//! initiating user) so that no caller can push another's sessions out.
//!
//! A session is reachable under several keys (its `Chaperone-Session` token,
//! and the caller session it was opened for) and counts once. Bounds:
//! - per caller: opening a session beyond the caller's share forgets that
//!   caller's least recently used session, never anyone else's;
//! - overall: beyond the store's maximum, the least recently used session of
//!   the caller holding the most is forgotten.
//!
//! Sessions idle longer than the agent's idle timeout are forgotten as in
//! [`crate::session::SessionStore`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::session::{SessionKey, SessionState, SharedSession};

/// One session and where it is filed.
struct Entry {
    session: SharedSession,
    caller: Arc<str>,
    keys: Vec<(Arc<str>, Arc<str>)>,
    last_used: Instant,
    tick: u64,
}

#[derive(Default)]
struct Inner {
    /// Sessions by their internal id.
    entries: HashMap<u64, Entry>,
    /// Key space, then id within it → internal id.
    keys: HashMap<Arc<str>, HashMap<Arc<str>, u64>>,
    /// Per caller, least recently used first: tick → internal id.
    callers: HashMap<Arc<str>, BTreeMap<u64, u64>>,
    /// Callers by the size of their share, smallest first.
    by_size: BTreeSet<(usize, Arc<str>)>,
    next_id: u64,
    next_tick: u64,
}

impl Inner {
    fn find(&self, key: SessionKey<'_>) -> Option<u64> {
        self.keys.get(key.server)?.get(key.mcp_session_id).copied()
    }

    fn share_len(&self, caller: &str) -> usize {
        self.callers.get(caller).map_or(0, BTreeMap::len)
    }

    fn resized(&mut self, caller: &Arc<str>, before: usize, after: usize) {
        if before > 0 {
            self.by_size.remove(&(before, Arc::clone(caller)));
        }
        if after > 0 {
            self.by_size.insert((after, Arc::clone(caller)));
        } else {
            self.callers.remove(caller);
        }
    }

    fn touch(&mut self, id: u64, now: Instant) -> Option<SharedSession> {
        let tick = self.next_tick;
        self.next_tick += 1;
        let entry = self.entries.get_mut(&id)?;
        let old = std::mem::replace(&mut entry.tick, tick);
        entry.last_used = now;
        let session = Arc::clone(&entry.session);
        if let Some(share) = self.callers.get_mut(&entry.caller) {
            share.remove(&old);
            share.insert(tick, id);
        }
        Some(session)
    }

    fn remove(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        for (space, key) in &entry.keys {
            if let Some(ids) = self.keys.get_mut(space)
                && ids.get(key) == Some(&id)
            {
                ids.remove(key);
            }
        }
        let before = self.share_len(&entry.caller);
        if let Some(share) = self.callers.get_mut(&entry.caller) {
            share.remove(&entry.tick);
        }
        let after = self.share_len(&entry.caller);
        self.resized(&entry.caller, before, after);
    }

    /// Forgets `caller`'s least recently used session; whether there was one.
    fn evict_oldest_of(&mut self, caller: &str) -> bool {
        let oldest = self
            .callers
            .get(caller)
            .and_then(|share| share.first_key_value())
            .map(|(_, id)| *id);
        match oldest {
            Some(id) => {
                self.remove(id);
                true
            }
            None => false,
        }
    }

    /// Forgets the least recently used session of the largest share.
    fn evict_from_largest(&mut self) -> bool {
        let Some((_, caller)) = self.by_size.last().cloned() else {
            return false;
        };
        self.evict_oldest_of(&caller)
    }
}

/// The bounded store of inbound-opened sessions.
pub struct DelegatedSessions {
    inner: Mutex<Inner>,
    max_sessions: usize,
    per_caller: usize,
}

impl std::fmt::Debug for DelegatedSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelegatedSessions")
            .field("len", &self.len())
            .field("max_sessions", &self.max_sessions)
            .field("per_caller", &self.per_caller)
            .finish()
    }
}

impl DelegatedSessions {
    /// A store holding at most `max_sessions` sessions, and at most
    /// `per_caller` of any one caller.
    pub fn new(max_sessions: usize, per_caller: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_sessions: max_sessions.max(1),
            per_caller: per_caller.max(1),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `state` as a session of `caller`, reachable under each of
    /// `keys` (a session already filed under one of them is replaced), making
    /// room first: the caller's own least recently used session when its share
    /// is full, the largest share's when the store is.
    pub fn open(
        &self,
        caller: &str,
        keys: &[SessionKey<'_>],
        state: SessionState,
        now: Instant,
    ) -> SharedSession {
        let session: SharedSession = Arc::new(Mutex::new(state));
        let mut inner = self.inner();
        for key in keys {
            if let Some(id) = inner.find(*key) {
                inner.remove(id);
            }
        }
        while inner.share_len(caller) >= self.per_caller {
            if !inner.evict_oldest_of(caller) {
                break;
            }
        }
        while inner.entries.len() >= self.max_sessions {
            if !inner.evict_from_largest() {
                break;
            }
        }
        let caller: Arc<str> = match inner.callers.get_key_value(caller) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(caller),
        };
        let id = inner.next_id;
        inner.next_id += 1;
        let tick = inner.next_tick;
        inner.next_tick += 1;
        let mut filed = Vec::with_capacity(keys.len());
        for key in keys {
            let space = match inner.keys.get_key_value(key.server) {
                Some((space, _)) => Arc::clone(space),
                None => Arc::from(key.server),
            };
            let name: Arc<str> = Arc::from(key.mcp_session_id);
            inner
                .keys
                .entry(Arc::clone(&space))
                .or_default()
                .insert(Arc::clone(&name), id);
            filed.push((space, name));
        }
        let before = inner.share_len(&caller);
        inner
            .callers
            .entry(Arc::clone(&caller))
            .or_default()
            .insert(tick, id);
        inner.resized(&caller, before, before + 1);
        inner.entries.insert(
            id,
            Entry {
                session: Arc::clone(&session),
                caller,
                keys: filed,
                last_used: now,
                tick,
            },
        );
        session
    }

    /// The live session filed under `key`, marked used; `None` if unknown or
    /// idle longer than `idle_timeout` (then it is forgotten).
    pub fn get(
        &self,
        key: SessionKey<'_>,
        now: Instant,
        idle_timeout: Duration,
    ) -> Option<SharedSession> {
        let mut inner = self.inner();
        let id = inner.find(key)?;
        let last_used = inner.entries.get(&id)?.last_used;
        if now.saturating_duration_since(last_used) > idle_timeout {
            inner.remove(id);
            return None;
        }
        inner.touch(id, now)
    }

    /// Forgets every session idle longer than `idle_timeout`; how many.
    pub fn sweep(&self, now: Instant, idle_timeout: Duration) -> usize {
        let mut inner = self.inner();
        let expired: Vec<u64> = inner
            .entries
            .iter()
            .filter(|(_, entry)| now.saturating_duration_since(entry.last_used) > idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            inner.remove(*id);
        }
        expired.len()
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.inner().entries.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions `caller` holds.
    pub fn held_by(&self, caller: &str) -> usize {
        self.inner().share_len(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    fn open(store: &DelegatedSessions, caller: &str, token: &str, now: Instant) {
        store.open(
            caller,
            &[
                SessionKey::new("token", token),
                SessionKey::new("origin", &format!("{caller} {token}")),
            ],
            SessionState::new(),
            now,
        );
    }

    fn live(store: &DelegatedSessions, token: &str, now: Instant) -> bool {
        store
            .get(SessionKey::new("token", token), now, IDLE)
            .is_some()
    }

    #[test]
    fn a_session_is_found_under_each_of_its_keys_and_counts_once() {
        let store = DelegatedSessions::new(10, 10);
        let now = Instant::now();
        open(&store, "a", "t1", now);
        assert_eq!(store.len(), 1);
        let by_token = store
            .get(SessionKey::new("token", "t1"), now, IDLE)
            .unwrap();
        let by_origin = store
            .get(SessionKey::new("origin", "a t1"), now, IDLE)
            .unwrap();
        assert!(Arc::ptr_eq(&by_token, &by_origin));
    }

    #[test]
    fn a_caller_beyond_its_share_evicts_only_its_own_oldest_sessions() {
        let store = DelegatedSessions::new(100, 3);
        let now = Instant::now();
        open(&store, "victim", "v1", now);
        open(&store, "victim", "v2", now);
        for i in 0..50 {
            open(&store, "attacker", &format!("x{i}"), now);
        }
        assert_eq!(store.held_by("attacker"), 3);
        assert!(live(&store, "v1", now) && live(&store, "v2", now));
        // The attacker's newest survive, its oldest went, keys and all.
        assert!(live(&store, "x49", now));
        assert!(!live(&store, "x0", now));
        assert!(
            store
                .get(SessionKey::new("origin", "attacker x0"), now, IDLE)
                .is_none()
        );
        assert_eq!(store.len(), 5);
    }

    #[test]
    fn a_used_session_outlives_the_callers_newer_idle_ones() {
        let store = DelegatedSessions::new(100, 2);
        let now = Instant::now();
        open(&store, "a", "t1", now);
        open(&store, "a", "t2", now);
        assert!(live(&store, "t1", now));
        open(&store, "a", "t3", now);
        assert!(live(&store, "t1", now));
        assert!(!live(&store, "t2", now));
    }

    #[test]
    fn a_full_store_evicts_from_the_largest_share_first() {
        let store = DelegatedSessions::new(6, 10);
        let now = Instant::now();
        open(&store, "small", "s1", now);
        open(&store, "small", "s2", now);
        for i in 0..4 {
            open(&store, "big", &format!("b{i}"), now);
        }
        assert_eq!(store.len(), 6);
        // A third caller's session makes room at the largest share's expense.
        open(&store, "new", "n1", now);
        assert_eq!(store.len(), 6);
        assert_eq!(store.held_by("big"), 3);
        assert!(!live(&store, "b0", now));
        assert!(live(&store, "s1", now) && live(&store, "s2", now) && live(&store, "n1", now));
    }

    #[test]
    fn reopening_under_a_key_replaces_the_session_there() {
        let store = DelegatedSessions::new(10, 10);
        let now = Instant::now();
        open(&store, "a", "t1", now);
        let first = store
            .get(SessionKey::new("token", "t1"), now, IDLE)
            .unwrap();
        open(&store, "a", "t1", now);
        let second = store
            .get(SessionKey::new("token", "t1"), now, IDLE)
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(store.len(), 1);
        assert_eq!(store.held_by("a"), 1);
    }

    #[test]
    fn idle_sessions_are_forgotten_with_their_share() {
        let store = DelegatedSessions::new(10, 10);
        let now = Instant::now();
        open(&store, "a", "t1", now);
        open(&store, "b", "t2", now + Duration::from_secs(50));
        let later = now + Duration::from_secs(61);
        assert!(!live(&store, "t1", later));
        assert_eq!(store.held_by("a"), 0);
        assert_eq!(store.sweep(now + Duration::from_secs(200), IDLE), 1);
        assert!(store.is_empty());
    }
}
