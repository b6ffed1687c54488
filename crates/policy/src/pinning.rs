//! Tool definition pinning: how a tool's current definition (the hash the
//! sidecar computes from a `tools/list` entry, `chaperone_audit::tool_definition_hash`)
//! stands against the pin its ToolPolicies give it. One pure function,
//! [`pin_verdict`], answers for the sidecar (lists and calls), the engine
//! (the decision order), the controller (status) and the CLI (`policy test`).

use std::fmt;

use crate::model::ToolPinning;

/// A tool's pin in an agent's compiled policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolPin<'a> {
    /// No ToolPolicy of the agent pins the tool.
    Unpinned,
    /// Pinned to this hash (`sha256:<hex>`).
    Pinned(&'a str),
    /// Two or more policies pin it to different hashes (sorted): no definition
    /// matches them all.
    Conflicting(&'a [String]),
}

impl<'a> ToolPin<'a> {
    /// The pin of a tool pinned to `definitions` (sorted, deduplicated): none,
    /// one, or conflicting.
    pub fn of(definitions: &'a [String]) -> Self {
        match definitions {
            [] => ToolPin::Unpinned,
            [one] => ToolPin::Pinned(one),
            many => ToolPin::Conflicting(many),
        }
    }
}

/// What a decision's caller knows of the called tool's current definition
/// ([`crate::DecisionRequest::definition`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CurrentDefinition<'a> {
    /// Pins do not apply: the call is not a `tools/call` (a resource or a
    /// prompt), or the caller keeps no definitions (a test without pins).
    #[default]
    NotApplicable,
    /// A tool whose definition has not been seen in any list yet.
    Unseen,
    /// A tool whose last listed definition has this hash (`sha256:<hex>`).
    Hash(&'a str),
}

impl<'a> CurrentDefinition<'a> {
    /// `Unseen` for `None`, `Hash` for a hash.
    pub fn of(hash: Option<&'a str>) -> Self {
        hash.map_or(CurrentDefinition::Unseen, CurrentDefinition::Hash)
    }

    /// The hash, when one has been seen.
    pub fn hash(self) -> Option<&'a str> {
        match self {
            CurrentDefinition::Hash(hash) => Some(hash),
            CurrentDefinition::NotApplicable | CurrentDefinition::Unseen => None,
        }
    }
}

/// How a tool's current definition stands against its pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinVerdict {
    /// The server's `toolPinning` is `off`: nothing is compared.
    Unchecked,
    /// The current definition is the pinned one.
    Matches,
    /// The current definition differs from the pinned one.
    Differs {
        /// The pinned hash.
        pinned: String,
        /// The current hash.
        current: String,
    },
    /// No policy pins the tool.
    Unpinned {
        /// The current hash.
        current: String,
    },
    /// The agent's policies pin the tool to different definitions.
    Conflicting {
        /// The current hash, when one has been seen.
        current: Option<String>,
    },
    /// No definition of the tool has been seen yet (no list passed).
    Unknown,
}

impl PinVerdict {
    /// `Off` (for [`PinVerdict::Unchecked`]), `Matches`, `Differs`, `Unpinned`,
    /// `Conflicting` or `Unknown`: the AgentIdentity status value and the
    /// metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            PinVerdict::Unchecked => "Off",
            PinVerdict::Matches => "Matches",
            PinVerdict::Differs { .. } => "Differs",
            PinVerdict::Unpinned { .. } => "Unpinned",
            PinVerdict::Conflicting { .. } => "Conflicting",
            PinVerdict::Unknown => "Unknown",
        }
    }

    /// Whether `enforce` lets the tool through: unchecked, or matching its pin.
    pub fn passes(&self) -> bool {
        matches!(self, PinVerdict::Unchecked | PinVerdict::Matches)
    }

    /// The pinned hash, where there is exactly one.
    pub fn pinned(&self) -> Option<&str> {
        match self {
            PinVerdict::Differs { pinned, .. } => Some(pinned),
            _ => None,
        }
    }

    /// The current hash, where one has been seen and it is not the pinned one.
    pub fn current(&self) -> Option<&str> {
        match self {
            PinVerdict::Differs { current, .. } | PinVerdict::Unpinned { current } => Some(current),
            PinVerdict::Conflicting { current } => current.as_deref(),
            _ => None,
        }
    }
}

/// The refusal text of a verdict that does not pass (audit reason, error
/// message); a passing verdict says so.
impl fmt::Display for PinVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinVerdict::Unchecked => f.write_str("tool definition pinning is off"),
            PinVerdict::Matches => f.write_str("tool definition matches its pin"),
            PinVerdict::Differs { pinned, current } => {
                write!(f, "tool definition changed: pinned {pinned}, now {current}")
            }
            PinVerdict::Unpinned { current } => {
                write!(f, "tool definition is not pinned (now {current})")
            }
            PinVerdict::Conflicting { .. } => f.write_str("conflicting pins"),
            PinVerdict::Unknown => {
                f.write_str("tool definition not yet seen: list the tools first")
            }
        }
    }
}

/// How a tool's current definition hash (`current`, `None` when none has
/// been seen) stands against its `pin` under its server's pinning `mode`.
///
/// `off` checks nothing; otherwise conflicting pins come first (no
/// definition can match), then an unseen definition, then the comparison.
/// `observe` and `enforce` give the same verdict: what `enforce` does with
/// one that does not [pass](PinVerdict::passes) is the caller's part.
pub fn pin_verdict(mode: ToolPinning, pin: ToolPin<'_>, current: Option<&str>) -> PinVerdict {
    if mode == ToolPinning::Off {
        return PinVerdict::Unchecked;
    }
    match (pin, current) {
        (ToolPin::Conflicting(_), current) => PinVerdict::Conflicting {
            current: current.map(str::to_owned),
        },
        (_, None) => PinVerdict::Unknown,
        (ToolPin::Pinned(pinned), Some(current)) if pinned == current => PinVerdict::Matches,
        (ToolPin::Pinned(pinned), Some(current)) => PinVerdict::Differs {
            pinned: pinned.to_owned(),
            current: current.to_owned(),
        },
        (ToolPin::Unpinned, Some(current)) => PinVerdict::Unpinned {
            current: current.to_owned(),
        },
    }
}

/// Whether `definition` is a well-formed pin: `sha256:` and 64 lowercase hex
/// digits.
pub(crate) fn is_definition_hash(definition: &str) -> bool {
    definition.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[cfg(test)]
#[path = "pinning_tests.rs"]
mod tests;
