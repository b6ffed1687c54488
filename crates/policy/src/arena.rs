//! One authority's rule conditions laid out flat for the decision loop.
//!
//! A [`CompiledConditions`] keeps its argument matchers behind several heap
//! pointers (rule → matcher `Vec` → pointer tokens → key and expected
//! string). With 100,000 rules those allocations spread over tens of
//! megabytes, and each rule a decision evaluates costs a cache miss or two per
//! pointer. [`RuleArena`] copies what argument-only conditions need into a few
//! flat arrays in rule order (the rules of one policy, so of one tool, sit next
//! to each other): a fixed-size record per rule, a 16-byte record per matcher,
//! every key and string constant in one text buffer. JSON pointers are
//! interned, so the rules of one decision that read the same argument resolve
//! it once ([`ArenaEvaluation`]).
//!
//! The semantics are the compiled conditions' own, not a copy of them: the
//! operators' meaning is [`TestRef::apply`] and the pointer walk
//! [`resolve_tokens`], both shared with [`CompiledArgMatcher`]. A rule with any
//! other condition (delegation, session, CEL expression), or one whose offsets
//! do not fit in 32 bits, is not flattened: [`ArenaEvaluation::truth`] answers
//! `None` and the caller evaluates its [`CompiledConditions`].

use std::collections::HashMap;

use serde_json::Value;

use super::{
    ArgTest, Comparison, CompiledArgMatcher, CompiledConditions, JsonNumber, JsonType, TestRef,
    Truth, resolve_tokens,
};

/// How many distinct pointers one evaluation remembers; later ones are walked
/// each time they are read (correct, just not cached).
const CACHED_PATHS: usize = 8;

/// `start..start + len` of one of the arena's arrays (or of its text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        let start = self.start as usize;
        start..start + self.len as usize
    }
}

/// A matcher's test with its constants in the arena.
#[derive(Clone, Copy, Debug)]
enum FlatTest {
    EqualsString(Span),
    Prefix(Span),
    /// The bound is `bounds[index]`.
    Compare(Comparison, u32),
    Exists(bool),
    Type(JsonType),
    /// `equals` a non-string, `in`, `regex`: `others[index]`.
    Other(u32),
}

/// One argument matcher: an interned pointer and a test.
#[derive(Clone, Copy, Debug)]
struct FlatMatcher {
    /// Index into `paths`.
    path: u32,
    test: FlatTest,
}

/// One parsed pointer token: the object key (in the text) and, when the token
/// is a canonical array index, that index.
#[derive(Clone, Copy, Debug)]
struct FlatToken {
    key: Span,
    index: Option<usize>,
}

/// How one rule's conditions are evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlatRule {
    /// Argument matchers only: `matchers[span]` (none: always true).
    Args(Span),
    /// Not flattened: evaluate the rule's [`CompiledConditions`].
    General,
}

/// The argument-only conditions of one authority's rules, by rule index, in
/// flat arrays (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct RuleArena {
    rules: Vec<FlatRule>,
    matchers: Vec<FlatMatcher>,
    /// Interned pointers, each a run of `tokens`.
    paths: Vec<Span>,
    tokens: Vec<FlatToken>,
    /// Pointer keys and string constants.
    text: String,
    bounds: Vec<JsonNumber>,
    others: Vec<ArgTest>,
}

fn small(n: usize) -> Option<u32> {
    u32::try_from(n).ok()
}

/// Builds a [`RuleArena`]. A rule that fails half-way (an offset beyond 32
/// bits) leaves entries no rule refers to: wasted, never read.
#[derive(Default)]
struct Builder<'c> {
    arena: RuleArena,
    interned: HashMap<&'c str, u32>,
}

impl<'c> Builder<'c> {
    fn text(&mut self, s: &str) -> Option<Span> {
        let start = small(self.arena.text.len())?;
        let len = small(s.len())?;
        start.checked_add(len)?;
        self.arena.text.push_str(s);
        Some(Span { start, len })
    }

    fn path(&mut self, matcher: &'c CompiledArgMatcher) -> Option<u32> {
        if let Some(&path) = self.interned.get(matcher.pointer.as_str()) {
            return Some(path);
        }
        let start = small(self.arena.tokens.len())?;
        let len = small(matcher.tokens.len())?;
        for token in &matcher.tokens {
            let key = self.text(&token.key)?;
            self.arena.tokens.push(FlatToken {
                key,
                index: token.index,
            });
        }
        let path = small(self.arena.paths.len())?;
        self.arena.paths.push(Span { start, len });
        self.interned.insert(&matcher.pointer, path);
        Some(path)
    }

    fn test(&mut self, test: &ArgTest) -> Option<FlatTest> {
        Some(match test {
            ArgTest::EqualsString(s) => FlatTest::EqualsString(self.text(s)?),
            ArgTest::Prefix(p) => FlatTest::Prefix(self.text(p)?),
            ArgTest::Compare(comparison, bound) => {
                let index = small(self.arena.bounds.len())?;
                self.arena.bounds.push(*bound);
                FlatTest::Compare(*comparison, index)
            }
            ArgTest::Exists(b) => FlatTest::Exists(*b),
            ArgTest::Type(t) => FlatTest::Type(*t),
            ArgTest::Equals(_) | ArgTest::In(_) | ArgTest::Regex(_) => {
                let index = small(self.arena.others.len())?;
                self.arena.others.push(test.clone());
                FlatTest::Other(index)
            }
        })
    }

    fn rule(&mut self, matchers: &'c [CompiledArgMatcher]) -> Option<FlatRule> {
        let first = self.arena.matchers.len();
        let flat = self.matchers(first, matchers);
        if flat.is_none() {
            self.arena.matchers.truncate(first);
        }
        flat
    }

    fn matchers(&mut self, first: usize, matchers: &'c [CompiledArgMatcher]) -> Option<FlatRule> {
        let start = small(first)?;
        let len = small(matchers.len())?;
        start.checked_add(len)?;
        for matcher in matchers {
            let path = self.path(matcher)?;
            let test = self.test(&matcher.test)?;
            self.arena.matchers.push(FlatMatcher { path, test });
        }
        Some(FlatRule::Args(Span { start, len }))
    }
}

impl RuleArena {
    /// Flattens the conditions of every rule, in rule order: rule `i` of the
    /// arena is the `i`-th item.
    pub(crate) fn new<'c>(rules: impl IntoIterator<Item = &'c CompiledConditions>) -> Self {
        let mut builder = Builder::default();
        for conditions in rules {
            let flat = conditions
                .args_only()
                .and_then(|matchers| builder.rule(matchers))
                .unwrap_or(FlatRule::General);
            builder.arena.rules.push(flat);
        }
        let mut arena = builder.arena;
        arena.rules.shrink_to_fit();
        arena.matchers.shrink_to_fit();
        arena.paths.shrink_to_fit();
        arena.tokens.shrink_to_fit();
        arena.text.shrink_to_fit();
        arena.bounds.shrink_to_fit();
        arena.others.shrink_to_fit();
        arena
    }

    /// Starts evaluating rules against one call's arguments (`None` while
    /// listing tools: not known yet).
    pub(crate) fn evaluation<'a, 'v>(
        &'a self,
        arguments: Option<&'v Value>,
    ) -> ArenaEvaluation<'a, 'v> {
        ArenaEvaluation {
            arena: self,
            arguments,
            paths: [0; CACHED_PATHS],
            values: [None; CACHED_PATHS],
            cached: 0,
        }
    }

    #[inline]
    fn text(&self, span: Span) -> &str {
        &self.text[span.range()]
    }

    #[inline]
    fn test(&self, test: FlatTest) -> TestRef<'_> {
        match test {
            FlatTest::EqualsString(span) => TestRef::EqualsString(self.text(span)),
            FlatTest::Prefix(span) => TestRef::Prefix(self.text(span)),
            FlatTest::Compare(comparison, bound) => {
                TestRef::Compare(comparison, self.bounds[bound as usize])
            }
            FlatTest::Exists(b) => TestRef::Exists(b),
            FlatTest::Type(t) => TestRef::Type(t),
            FlatTest::Other(index) => self.others[index as usize].as_ref(),
        }
    }
}

/// Rules of one [`RuleArena`] evaluated against one call's arguments; each
/// interned pointer is walked once (up to [`CACHED_PATHS`] of them).
pub(crate) struct ArenaEvaluation<'a, 'v> {
    arena: &'a RuleArena,
    arguments: Option<&'v Value>,
    paths: [u32; CACHED_PATHS],
    values: [Option<&'v Value>; CACHED_PATHS],
    cached: usize,
}

impl<'v> ArenaEvaluation<'_, 'v> {
    /// The truth of rule `rule`'s conditions, exactly as
    /// [`CompiledConditions::evaluate`] gives it; `None` for a rule the arena
    /// did not flatten: evaluate its compiled conditions instead.
    #[inline]
    pub(crate) fn truth(&mut self, rule: u32) -> Option<Truth> {
        let arena = self.arena;
        let FlatRule::Args(span) = *arena.rules.get(rule as usize)? else {
            return None;
        };
        let Some(arguments) = self.arguments else {
            // Arguments not known yet: matchers are unknown.
            return Some(if span.len == 0 {
                Truth::True
            } else {
                Truth::Unknown
            });
        };
        let mut truth = Truth::True;
        for matcher in &arena.matchers[span.range()] {
            let value = self.resolve(matcher.path, arguments);
            match arena.test(matcher.test).apply(value) {
                Truth::True => {}
                Truth::False => return Some(Truth::False),
                Truth::Unknown => truth = Truth::Unknown,
            }
        }
        Some(truth)
    }

    #[inline]
    fn resolve(&mut self, path: u32, arguments: &'v Value) -> Option<&'v Value> {
        if let Some(at) = self.paths[..self.cached].iter().position(|&p| p == path) {
            return self.values[at];
        }
        let arena = self.arena;
        let tokens = &arena.tokens[arena.paths[path as usize].range()];
        let value = resolve_tokens(
            arguments,
            tokens.iter().map(|t| (arena.text(t.key), t.index)),
        );
        if self.cached < CACHED_PATHS {
            self.paths[self.cached] = path;
            self.values[self.cached] = value;
            self.cached += 1;
        }
        value
    }
}

#[cfg(test)]
#[path = "arena_tests.rs"]
mod tests;
