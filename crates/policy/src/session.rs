//! What a session has done so far, in the shape session conditions read: total
//! calls, the set of effects seen, and per-tool call counts. The sidecar keeps one
//! per session and updates it incrementally with [`SessionHistory::record`] after
//! each allowed call; decisions only read it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::Effect;

/// A set of [`Effect`]s as a bitset: copying, union and membership are one
/// instruction each.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EffectSet(u8);

impl EffectSet {
    /// The empty set.
    pub const EMPTY: EffectSet = EffectSet(0);

    fn bit(effect: Effect) -> u8 {
        1 << (effect as u8)
    }

    /// A set holding `effects`.
    pub fn of(effects: &[Effect]) -> Self {
        effects.iter().fold(Self::EMPTY, |set, e| set.with(*e))
    }

    /// This set plus `effect`.
    #[must_use]
    pub fn with(self, effect: Effect) -> Self {
        EffectSet(self.0 | Self::bit(effect))
    }

    /// Adds `effect`.
    pub fn insert(&mut self, effect: Effect) {
        self.0 |= Self::bit(effect);
    }

    /// Whether `effect` is in the set.
    pub fn contains(self, effect: Effect) -> bool {
        self.0 & Self::bit(effect) != 0
    }

    /// Whether the two sets share an effect.
    pub fn intersects(self, other: EffectSet) -> bool {
        self.0 & other.0 != 0
    }

    /// The union of both sets.
    #[must_use]
    pub fn union(self, other: EffectSet) -> Self {
        EffectSet(self.0 | other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The effects in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Effect> {
        Effect::ALL.into_iter().filter(move |e| self.contains(*e))
    }
}

impl fmt::Debug for EffectSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for EffectSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for EffectSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let effects = Vec::<Effect>::deserialize(deserializer)?;
        Ok(EffectSet::of(&effects))
    }
}

/// The history of one session, kept incrementally by the sidecar.
///
/// A delegated session starts from what the delegator's session had done (carried
/// in its assertion) with [`SessionHistory::inherited`], so conditions such as "no
/// external communication after sensitive data" hold across agents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionHistory {
    calls: u32,
    effects: EffectSet,
    /// Calls per (server, tool), sorted by server then tool. A session calls
    /// few distinct tools: a sorted `Vec` is smaller than maps and as fast.
    tools: Vec<ToolCalls>,
}

/// Calls of one tool of one server: server and tool names in one allocation
/// (`server` is the first `server_len` bytes of `names`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct ToolCalls {
    names: Box<str>,
    server_len: u32,
    calls: u32,
}

impl ToolCalls {
    fn new(server: &str, tool: &str) -> Self {
        let mut names = String::with_capacity(server.len() + tool.len());
        names.push_str(server);
        names.push_str(tool);
        Self {
            names: names.into_boxed_str(),
            // Server names are DNS labels (≤ 63 bytes); saturate for safety.
            server_len: u32::try_from(server.len()).unwrap_or(u32::MAX),
            calls: 1,
        }
    }

    fn split(&self) -> (&str, &str) {
        let at = usize::try_from(self.server_len).unwrap_or(usize::MAX);
        self.names.split_at_checked(at).unwrap_or((&self.names, ""))
    }

    fn server(&self) -> &str {
        self.split().0
    }

    fn tool(&self) -> &str {
        self.split().1
    }
}

impl SessionHistory {
    /// An empty history: a new session.
    pub fn new() -> Self {
        Self::default()
    }

    /// A delegated session's history seeded with the delegator's step count and
    /// effects seen.
    pub fn inherited(calls: u32, effects: EffectSet) -> Self {
        Self {
            calls,
            effects,
            ..Self::default()
        }
    }

    /// Takes in more of a delegator's history (a later delegating call of the
    /// same task): its effects join this session's, and the step count never
    /// goes below the delegator's.
    pub fn absorb(&mut self, calls: u32, effects: EffectSet) {
        self.calls = self.calls.max(calls);
        self.effects = self.effects.union(effects);
    }

    /// Records a call that was made (forwarded) with the effects of its tool
    /// ([`crate::Engine::effects_of`]).
    pub fn record(&mut self, server: &str, tool: &str, effects: EffectSet) {
        self.calls = self.calls.saturating_add(1);
        self.effects = self.effects.union(effects);
        match self.find(server, tool) {
            Ok(at) => bump(&mut self.tools[at].calls),
            Err(at) => {
                if self.tools.len() == self.tools.capacity() {
                    // Grow by half, not from four: many sessions call one tool.
                    self.tools.reserve_exact((self.tools.len() / 2).max(1));
                }
                self.tools.insert(at, ToolCalls::new(server, tool));
            }
        }
    }

    /// Takes back one call of `tool` on `server` that did not happen after all
    /// (the server answered `input_required`; the retry is recorded when it is
    /// made). The effects seen stay: they only make later decisions stricter.
    /// A call not recorded is not taken back.
    pub fn unrecord(&mut self, server: &str, tool: &str) {
        let Ok(at) = self.find(server, tool) else {
            return;
        };
        self.calls = self.calls.saturating_sub(1);
        let entry = &mut self.tools[at];
        entry.calls = entry.calls.saturating_sub(1);
        if entry.calls == 0 {
            self.tools.remove(at);
        }
    }

    fn find(&self, server: &str, tool: &str) -> Result<usize, usize> {
        self.tools
            .binary_search_by(|t| t.split().cmp(&(server, tool)))
    }

    /// Calls made so far.
    pub fn calls(&self) -> u32 {
        self.calls
    }

    /// Effects of the calls made so far.
    pub fn effects_seen(&self) -> EffectSet {
        self.effects
    }

    /// Calls of `tool` on `server` so far.
    pub fn tool_calls(&self, server: &str, tool: &str) -> u32 {
        self.find(server, tool).map_or(0, |at| self.tools[at].calls)
    }

    /// Calls of a tool of this name on any server so far.
    pub fn tool_name_calls(&self, tool: &str) -> u32 {
        self.tools
            .iter()
            .filter(|t| t.tool() == tool)
            .fold(0u32, |sum, t| sum.saturating_add(t.calls))
    }

    /// Names of the tools called so far, sorted, as `server/name`.
    pub fn tools_called(&self) -> Vec<String> {
        // Sorted by (server, tool) already; `/` sorts below the characters of
        // DNS-label server names, so the joined strings keep that order.
        let mut names: Vec<String> = self
            .tools
            .iter()
            .map(|t| format!("{}/{}", t.server(), t.tool()))
            .collect();
        names.sort();
        names
    }

    /// Names of the tools called so far, sorted, without their servers.
    pub fn tool_names_called(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tools.iter().map(|t| t.tool().to_owned()).collect();
        names.sort();
        names.dedup();
        names
    }
}

fn bump(count: &mut u32) {
    *count = count.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unrecords_a_call_that_did_not_happen() {
        let mut history = SessionHistory::new();
        let effects = EffectSet::of(&[Effect::Destructive]);
        history.record("s", "a", effects);
        history.record("s", "a", EffectSet::EMPTY);
        history.unrecord("s", "a");
        assert_eq!((history.calls(), history.tool_calls("s", "a")), (1, 1));
        history.unrecord("s", "a");
        assert_eq!((history.calls(), history.tool_calls("s", "a")), (0, 0));
        assert!(history.tools_called().is_empty());
        assert_eq!(history.effects_seen(), effects, "effects seen stay");
        // Nothing recorded: nothing taken back.
        history.record("s", "b", EffectSet::EMPTY);
        history.unrecord("s", "a");
        assert_eq!(history.calls(), 1);
    }

    #[test]
    fn counts_tools_per_server_even_when_names_concatenate_alike() {
        let mut history = SessionHistory::new();
        history.record("ab", "c", EffectSet::EMPTY);
        history.record("a", "bc", EffectSet::EMPTY);
        history.record("a", "bc", EffectSet::EMPTY);
        assert_eq!(history.tool_calls("ab", "c"), 1);
        assert_eq!(history.tool_calls("a", "bc"), 2);
        assert_eq!(history.tool_calls("abc", ""), 0);
        assert_eq!(history.tool_name_calls("bc"), 2);
        assert_eq!(history.tools_called(), vec!["a/bc", "ab/c"]);
        assert_eq!(history.calls(), 3);
    }

    #[test]
    fn absorbing_a_delegators_history_only_widens_it() {
        let mut history = SessionHistory::inherited(3, EffectSet::of(&[Effect::Read]));
        history.absorb(2, EffectSet::of(&[Effect::SensitiveData]));
        assert_eq!(history.calls(), 3);
        assert!(history.effects_seen().contains(Effect::Read));
        assert!(history.effects_seen().contains(Effect::SensitiveData));
        history.absorb(7, EffectSet::EMPTY);
        assert_eq!(history.calls(), 7);
    }

    #[test]
    fn effect_set_holds_what_was_inserted() {
        let set = EffectSet::of(&[Effect::Read, Effect::Privileged]);
        assert!(set.contains(Effect::Read));
        assert!(set.contains(Effect::Privileged));
        assert!(!set.contains(Effect::Write));
        assert_eq!(set.iter().count(), 2);
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, r#"["read","privileged"]"#);
        assert_eq!(serde_json::from_str::<EffectSet>(&json).unwrap(), set);
    }

    #[test]
    fn history_counts_calls_per_tool_and_server() {
        let mut history = SessionHistory::new();
        history.record("orders", "get_order", EffectSet::of(&[Effect::Read]));
        history.record("orders", "get_order", EffectSet::EMPTY);
        history.record("mail", "get_order", EffectSet::of(&[Effect::SensitiveData]));
        assert_eq!(history.calls(), 3);
        assert_eq!(history.tool_calls("orders", "get_order"), 2);
        assert_eq!(history.tool_calls("mail", "get_order"), 1);
        assert_eq!(history.tool_calls("mail", "send"), 0);
        assert_eq!(history.tool_name_calls("get_order"), 3);
        assert!(history.effects_seen().contains(Effect::SensitiveData));
        assert_eq!(
            history.tools_called(),
            vec!["mail/get_order".to_owned(), "orders/get_order".to_owned()]
        );
    }
}
