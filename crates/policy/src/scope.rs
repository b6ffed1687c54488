//! Which session a call belongs to: the unit session conditions, session rate
//! limits, `maxCalls` and audit chains apply to.
//!
//! MCP before 2026-07-28 has protocol sessions (`Mcp-Session-Id`); from
//! 2026-07-28 calls are stateless and carry no session at all. The sidecar
//! picks a scope per call, in this order (first that applies):
//!
//! 1. **task**: a `Chaperone-Session` the call names (a task another agent
//!    delegated, or a user initiated, at this agent's inbound side). Always
//!    first: it carries a different authority, not only a history.
//! 2. **trace**: the W3C trace id of the call (`traceparent` in the request's
//!    `_meta`, else the HTTP header), shared across tool servers.
//! 3. **mcpSession**: the tool server's `Mcp-Session-Id` (handshake era).
//! 4. **agent**: the pod itself, one rolling history across tool servers,
//!    forgotten after the identity's idle timeout.
//!
//! With [`SessionScopeMode::Agent`] steps 2 and 3 are skipped: an agent cannot
//! escape a guard by starting a new trace or MCP session.

use crate::model::SessionScopeMode;

/// The kind of scope a call's session history is kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    /// A delegated or user-initiated task (`Chaperone-Session`).
    Task,
    /// A W3C trace.
    Trace,
    /// An MCP protocol session.
    McpSession,
    /// The agent pod.
    Agent,
    /// No session: a request refused before one could be chosen.
    Unscoped,
}

impl ScopeKind {
    /// The name in audit records: `task`, `trace`, `mcpSession`, `agent` or
    /// `unscoped`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Task => "task",
            ScopeKind::Trace => "trace",
            ScopeKind::McpSession => "mcpSession",
            ScopeKind::Agent => "agent",
            ScopeKind::Unscoped => "unscoped",
        }
    }
}

/// What a call says about the session it belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeHints<'a> {
    /// The key of the delegated task it names, if any.
    pub task: Option<&'a str>,
    /// Its W3C trace id (32 lowercase hex digits), if any.
    pub trace: Option<&'a str>,
    /// Its MCP session id, if any.
    pub mcp_session: Option<&'a str>,
}

/// The scope of a call: its kind and key (the task key, trace id or MCP
/// session id; empty for the agent scope).
pub fn resolve_scope(mode: SessionScopeMode, hints: ScopeHints<'_>) -> (ScopeKind, &str) {
    if let Some(task) = hints.task {
        return (ScopeKind::Task, task);
    }
    if mode == SessionScopeMode::Auto {
        if let Some(trace) = hints.trace {
            return (ScopeKind::Trace, trace);
        }
        if let Some(id) = hints.mcp_session.filter(|id| !id.is_empty()) {
            return (ScopeKind::McpSession, id);
        }
    }
    (ScopeKind::Agent, "")
}

/// The trace id of a W3C `traceparent` value
/// (`version-traceid-parentid-flags`), or `None` when it is not a valid one:
/// a version other than two lowercase hex digits or `ff`, a trace id that is
/// not 32 lowercase hex digits or is all zeros, a parent id that is not 16.
/// Version 00 allows nothing after the flags; later versions may append
/// `-…` fields.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let value = traceparent.trim_matches([' ', '\t']);
    let mut parts = value.splitn(5, '-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && (rest.is_none() || version != "00");
    valid.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn task_wins_then_trace_then_mcp_session_then_agent() {
        let all = ScopeHints {
            task: Some("t1"),
            trace: Some(TRACE),
            mcp_session: Some("m1"),
        };
        let auto = SessionScopeMode::Auto;
        assert_eq!(resolve_scope(auto, all), (ScopeKind::Task, "t1"));
        let no_task = ScopeHints { task: None, ..all };
        assert_eq!(resolve_scope(auto, no_task), (ScopeKind::Trace, TRACE));
        let mcp = ScopeHints {
            trace: None,
            ..no_task
        };
        assert_eq!(resolve_scope(auto, mcp), (ScopeKind::McpSession, "m1"));
        let empty_mcp = ScopeHints {
            mcp_session: Some(""),
            ..mcp
        };
        assert_eq!(resolve_scope(auto, empty_mcp), (ScopeKind::Agent, ""));
        assert_eq!(
            resolve_scope(auto, ScopeHints::default()),
            (ScopeKind::Agent, "")
        );
    }

    #[test]
    fn agent_mode_ignores_traces_and_mcp_sessions_but_not_tasks() {
        let mode = SessionScopeMode::Agent;
        let hints = ScopeHints {
            task: None,
            trace: Some(TRACE),
            mcp_session: Some("m1"),
        };
        assert_eq!(resolve_scope(mode, hints), (ScopeKind::Agent, ""));
        let task = ScopeHints {
            task: Some("t1"),
            ..hints
        };
        assert_eq!(resolve_scope(mode, task), (ScopeKind::Task, "t1"));
    }

    #[test]
    fn reads_valid_traceparents_only() {
        let ok = format!("00-{TRACE}-00f067aa0ba902b7-01");
        assert_eq!(trace_id_of(&ok), Some(TRACE));
        assert_eq!(trace_id_of(&format!(" {ok}\t")), Some(TRACE));
        // A later version may carry more fields.
        assert_eq!(
            trace_id_of(&format!("01-{TRACE}-00f067aa0ba902b7-01-extra")),
            Some(TRACE)
        );
        for bad in [
            format!("00-{TRACE}-00f067aa0ba902b7-01-extra"),
            format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase()),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
            format!("00-{TRACE}-0000000000000000-01"),
            format!("00-{TRACE}-00f067aa0ba902b7"),
            format!("00-{TRACE}x-00f067aa0ba902b7-01"),
            String::new(),
        ] {
            assert_eq!(trace_id_of(&bad), None, "{bad:?}");
        }
    }
}
