//! The MCP methods a client may send, per protocol era, and what the sidecar
//! does with each: decide it as a call, filter its list result, or forward it
//! ungoverned. A method in no row is refused unless the AgentIdentity lists it
//! in `passthroughMethods`: a method the sidecar does not know could do
//! anything at the server.

/// The protocol revisions a method exists in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Era {
    /// Revisions up to 2025-11-25 (`initialize` handshake, `Mcp-Session-Id`).
    Legacy,
    /// Revision 2026-07-28 and later (stateless, `server/discover`).
    Stateless,
    /// Both.
    Both,
}

/// What the sidecar does with a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Decided by policy: `tools/call`, reads of resources and prompts.
    Call,
    /// Forwarded; its result list is filtered by policy.
    List,
    /// Forwarded ungoverned: lifecycle, utilities, notifications.
    Pass,
    /// Forwarded when it names (`params.taskId`) a task a call of the same
    /// session created through the sidecar.
    Task,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownMethod {
    /// The JSON-RPC method.
    pub name: &'static str,
    /// The revisions it exists in.
    pub era: Era,
    /// What the sidecar does with it.
    pub handling: Handling,
}

const fn row(name: &'static str, era: Era, handling: Handling) -> KnownMethod {
    KnownMethod {
        name,
        era,
        handling,
    }
}

/// Every client-to-server method the sidecar knows.
pub const CLIENT_METHODS: &[KnownMethod] = &[
    // Governed.
    row("tools/call", Era::Both, Handling::Call),
    row("resources/read", Era::Both, Handling::Call),
    row("resources/subscribe", Era::Legacy, Handling::Call),
    row("resources/unsubscribe", Era::Legacy, Handling::Call),
    row("prompts/get", Era::Both, Handling::Call),
    row("tools/list", Era::Both, Handling::List),
    row("resources/list", Era::Both, Handling::List),
    row("resources/templates/list", Era::Both, Handling::List),
    row("prompts/list", Era::Both, Handling::List),
    // Lifecycle and discovery.
    row("initialize", Era::Legacy, Handling::Pass),
    row("notifications/initialized", Era::Legacy, Handling::Pass),
    // Filtered like a list: a server may list its tools in its answer.
    row("server/discover", Era::Both, Handling::List),
    row("subscriptions/listen", Era::Stateless, Handling::Pass),
    // Utilities.
    row("ping", Era::Legacy, Handling::Pass),
    row("completion/complete", Era::Both, Handling::Pass),
    row("logging/setLevel", Era::Legacy, Handling::Pass),
    row("notifications/cancelled", Era::Both, Handling::Pass),
    row("notifications/progress", Era::Both, Handling::Pass),
    row(
        "notifications/roots/list_changed",
        Era::Legacy,
        Handling::Pass,
    ),
    // Tasks (2025-11-25 core; the `io.modelcontextprotocol/tasks` extension
    // from 2026-07-28, which drops `tasks/list` and `tasks/result` and adds
    // `tasks/update`): the task's call was decided when it was created; a
    // session may only reach the tasks its own calls created.
    row("tasks/get", Era::Both, Handling::Task),
    row("tasks/update", Era::Stateless, Handling::Task),
    row("tasks/result", Era::Legacy, Handling::Task),
    row("tasks/cancel", Era::Both, Handling::Task),
    row("tasks/list", Era::Legacy, Handling::Pass),
];

/// The row of `method`, if the sidecar knows it.
pub fn lookup(method: &str) -> Option<&'static KnownMethod> {
    CLIENT_METHODS.iter().find(|m| m.name == method)
}

/// The first protocol revision of the stateless era.
pub const STATELESS_SINCE: &str = "2026-07-28";

/// The era a protocol version string (`YYYY-MM-DD`) belongs to.
pub fn era_of(version: &str) -> Era {
    // Revision names are dates: they order as strings.
    if version >= STATELESS_SINCE {
        Era::Stateless
    } else {
        Era::Legacy
    }
}

impl KnownMethod {
    /// Whether the method exists in `era`.
    pub fn exists_in(&self, era: Era) -> bool {
        self.era == Era::Both || era == Era::Both || self.era == era
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_each_method_once() {
        for (i, a) in CLIENT_METHODS.iter().enumerate() {
            assert!(
                CLIENT_METHODS[i + 1..].iter().all(|b| b.name != a.name),
                "{} listed twice",
                a.name
            );
        }
    }

    #[test]
    fn places_methods_in_their_eras() {
        assert_eq!(era_of("2025-06-18"), Era::Legacy);
        assert_eq!(era_of("2026-07-28"), Era::Stateless);
        let initialize = lookup("initialize").unwrap();
        assert!(initialize.exists_in(Era::Legacy));
        assert!(!initialize.exists_in(Era::Stateless));
        assert!(lookup("tools/call").unwrap().exists_in(Era::Stateless));
        assert_eq!(lookup("tools/delete"), None);
    }
}
