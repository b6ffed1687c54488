//! Tool definition pinning on the cluster: the names the controller writes and
//! `chaperonectl tools` reads, defined once.
//!
//! The controller keeps the text of each discovered tool's current and pinned
//! definitions in a ConfigMap [`config_map_name`]`(agent)` in the agent's
//! namespace, owned by the AgentIdentity; its data key for one definition is
//! [`data_key`]`(server, tool, hash)` and its value the definition JSON
//! (`chaperone_audit::tool_definition` of the `tools/list` entry, canonical).
//! A definition whose text is not there (too large, or never reported while
//! the controller was keeping it) is known by its hash only.

/// The AgentIdentity condition saying whether pinning blocks any tool.
pub const CONDITION_PINNED: &str = "ToolDefinitionsPinned";
/// Reason of a False [`CONDITION_PINNED`]: some governed tool of an `enforce`
/// server does not match its pin (hidden, its calls refused).
pub const REASON_TOOLS_BLOCKED: &str = "ToolsBlocked";
/// The Event (Warning, on the AgentIdentity and the reporting pod) of a
/// discovered tool whose definition changed.
pub const EVENT_DEFINITION_CHANGED: &str = "ToolDefinitionChanged";
/// The field manager of `chaperonectl tools pin`.
pub const PIN_FIELD_MANAGER: &str = "chaperonectl-tools-pin";

/// How many hex digits of a definition hash a data key carries.
pub const KEY_HASH_DIGITS: usize = 16;

/// Longest data key Kubernetes accepts.
const MAX_KEY: usize = 253;

/// The ConfigMap holding the definition texts of `agent`'s tools.
pub fn config_map_name(agent: &str) -> String {
    format!("{agent}-tool-definitions")
}

/// The ConfigMap data key of one definition: `<server>.<tool>.<first 16 hex
/// digits of the hash>`. Characters a data key cannot hold become `_`, and
/// long names are cut; the hash (of a definition that includes the tool's
/// name) keeps keys of different tools apart.
pub fn data_key(server: &str, tool: &str, hash: &str) -> String {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    let digits: String = hex.chars().take(KEY_HASH_DIGITS).collect();
    let clean = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    // Room for both names: the hash and two dots take the rest.
    let room = (MAX_KEY - KEY_HASH_DIGITS - 2) / 2;
    let cut = |text: String| -> String { text.chars().take(room).collect() };
    format!("{}.{}.{digits}", cut(clean(server)), cut(clean(tool)))
}

/// The pin of a ToolPolicy's `spec.tools[]` entry must be `sha256:` and 64
/// lowercase hex digits; whether `hash` is one.
pub fn is_definition_hash(hash: &str) -> bool {
    hash.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keys_carry_server_tool_and_sixteen_hash_digits() {
        let hash = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert_eq!(
            data_key("orders", "refund", &hash),
            "orders.refund.0123456789abcdef"
        );
    }

    #[test]
    fn data_keys_hold_only_characters_kubernetes_accepts() {
        let key = data_key("orders", "refund money/now ü", "sha256:ab");
        assert_eq!(key, "orders.refund_money_now__.ab");
        let long = data_key(&"s".repeat(300), &"t".repeat(300), "sha256:ab");
        assert!(long.len() <= MAX_KEY, "{}", long.len());
    }

    #[test]
    fn pins_are_sha256_and_lowercase_hex() {
        assert!(is_definition_hash(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_definition_hash(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_definition_hash("sha256:abc"));
    }
}
