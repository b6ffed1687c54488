//! The tool inventory: every tool seen in upstream `tools/list` results, one
//! entry per server and tool with its last listed definition, for the
//! controller's `discoveredTools` status; and the per-server definition store
//! that calls are held to where pins are enforced.
//!
//! Definitions are hashed when a list passes (never per call): each listed
//! tool's [`tool_definition_hash`], for servers whose `toolPinning` is not
//! `off`. A call looks its tool's hash up ([`ToolInventory::current_hash`]),
//! a map lookup. A tool missing from a later list keeps its last definition:
//! an omission never unpins or unblocks it. The controller stream subscribes
//! with [`ToolInventory::subscribe`] and reports the set when it changes,
//! a new hash included.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use chaperone_audit::{canonical, tool_definition, tool_definition_hash};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

/// The longest definition JSON reported; a longer one is reported by its
/// hash only.
pub const MAX_DEFINITION_JSON_BYTES: usize = 64 * 1024;

/// A tool an upstream listed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct DiscoveredTool {
    /// Tool server name.
    pub server: String,
    /// Tool name.
    pub name: String,
    /// Whether the policy in force when it was seen lets the agent see it.
    pub governed: bool,
    /// Its last listed definition; `None` while its server's `toolPinning`
    /// is `off` (not hashed).
    pub definition: Option<ToolDefinition>,
}

/// A tool's definition as a list showed it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ToolDefinition {
    /// `sha256:<hex>` of its canonical JSON ([`tool_definition_hash`]).
    pub hash: String,
    /// That canonical JSON; `None` when longer than
    /// [`MAX_DEFINITION_JSON_BYTES`].
    pub json: Option<String>,
    /// When this sidecar first saw this hash for this tool (unix seconds).
    pub seen_at: i64,
}

impl ToolDefinition {
    /// The definition of the `tools/list` entry `tool`, whose hash is `hash`,
    /// seen at `seen_at`.
    fn of(tool: &Value, hash: &str, seen_at: i64) -> Self {
        let json = canonical(&tool_definition(tool));
        Self {
            hash: hash.to_owned(),
            json: (json.len() <= MAX_DEFINITION_JSON_BYTES).then_some(json),
            seen_at,
        }
    }
}

/// One entry of a list, as [`ToolInventory::record_list`] takes it.
#[derive(Debug)]
pub struct ListedTool<'a> {
    /// Tool name.
    pub name: &'a str,
    /// Whether the policy lets the agent see it.
    pub governed: bool,
    /// The list entry and its hash; `None` where pinning is off.
    pub definition: Option<(&'a Value, Arc<str>)>,
}

/// Definition hashes by server, then tool.
type HashStore = HashMap<Box<str>, HashMap<Box<str>, Arc<str>>>;

/// The tools seen, and their current definitions.
#[derive(Debug)]
pub struct ToolInventory {
    tools: watch::Sender<BTreeSet<DiscoveredTool>>,
    hashes: RwLock<HashStore>,
}

impl Default for ToolInventory {
    fn default() -> Self {
        Self {
            tools: watch::Sender::new(BTreeSet::new()),
            hashes: RwLock::new(HashMap::new()),
        }
    }
}

impl ToolInventory {
    /// The definition hash of a `tools/list` entry: hashed once per list.
    pub fn hash_of(tool: &Value) -> Arc<str> {
        Arc::from(tool_definition_hash(tool))
    }

    /// The current definition hash of `server`'s `tool`: the last one listed,
    /// `None` before any list showed it (or while pinning is off).
    pub fn current_hash(&self, server: &str, tool: &str) -> Option<Arc<str>> {
        let hashes = self.hashes.read().unwrap_or_else(|p| p.into_inner());
        hashes.get(server)?.get(tool).cloned()
    }

    /// Records the tools of one list of `server` at `now` (unix seconds):
    /// their hashes for calls, and the set's entries (one per tool: the
    /// newest replaces the last), waking subscribers only when an entry
    /// changed. A definition's JSON is made only when its hash is new.
    pub fn record_list(&self, server: &str, listed: &[ListedTool<'_>], now: i64) {
        if listed.is_empty() {
            return;
        }
        self.store_hashes(server, listed);
        self.tools.send_if_modified(|set| {
            let mut changed = false;
            for tool in listed {
                let start = DiscoveredTool {
                    server: server.to_owned(),
                    name: tool.name.to_owned(),
                    governed: false,
                    definition: None,
                };
                let existing: Vec<DiscoveredTool> = set
                    .range(&start..)
                    .take_while(|t| t.server == server && t.name == tool.name)
                    .cloned()
                    .collect();
                let same_hash = |entry: &DiscoveredTool| {
                    entry.definition.as_ref().map(|d| d.hash.as_str())
                        == tool.definition.as_ref().map(|(_, h)| &**h)
                };
                if let [only] = &existing[..]
                    && only.governed == tool.governed
                    && same_hash(only)
                {
                    continue;
                }
                let definition = tool.definition.as_ref().map(|(value, hash)| {
                    // The same hash keeps its JSON and when it was first seen.
                    existing
                        .iter()
                        .filter(|e| same_hash(e))
                        .find_map(|e| e.definition.clone())
                        .unwrap_or_else(|| ToolDefinition::of(value, hash, now))
                });
                for entry in &existing {
                    set.remove(entry);
                }
                set.insert(DiscoveredTool {
                    definition,
                    governed: tool.governed,
                    ..start
                });
                changed = true;
            }
            changed
        });
    }

    fn store_hashes(&self, server: &str, listed: &[ListedTool<'_>]) {
        let differs = |hashes: &HashStore| {
            listed.iter().any(|tool| {
                tool.definition.as_ref().is_some_and(|(_, hash)| {
                    hashes
                        .get(server)
                        .and_then(|tools| tools.get(tool.name))
                        .is_none_or(|known| known != hash)
                })
            })
        };
        // Lists mostly repeat what is known: the write lock only for news.
        if !differs(&self.hashes.read().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let mut hashes = self.hashes.write().unwrap_or_else(|p| p.into_inner());
        let tools = hashes.entry(Box::from(server)).or_default();
        for tool in listed {
            if let Some((_, hash)) = &tool.definition {
                tools.insert(Box::from(tool.name), Arc::clone(hash));
            }
        }
    }

    /// A receiver of the set, marked changed whenever an entry changes.
    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<DiscoveredTool>> {
        self.tools.subscribe()
    }

    /// The set now.
    pub fn snapshot(&self) -> BTreeSet<DiscoveredTool> {
        self.tools.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn listed<'a>(name: &'a str, tool: &'a Value) -> ListedTool<'a> {
        ListedTool {
            name,
            governed: true,
            definition: Some((tool, ToolInventory::hash_of(tool))),
        }
    }

    #[test]
    fn keeps_one_entry_per_tool_with_its_newest_definition() {
        let inventory = ToolInventory::default();
        let old = json!({"name": "refund", "description": "Refund an order"});
        let new = json!({"name": "refund", "description": "Refund the maximum"});
        inventory.record_list("orders", &[listed("refund", &old)], 10);
        let mut changes = inventory.subscribe();
        changes.mark_unchanged();
        inventory.record_list("orders", &[listed("refund", &old)], 20);
        assert!(
            !changes.has_changed().unwrap(),
            "the same list changes nothing"
        );
        inventory.record_list("orders", &[listed("refund", &new)], 30);
        assert!(changes.has_changed().unwrap(), "a new hash is news");
        let set = inventory.snapshot();
        assert_eq!(set.len(), 1);
        let definition = set.first().unwrap().definition.clone().unwrap();
        assert_eq!(definition.hash, tool_definition_hash(&new));
        assert_eq!(definition.seen_at, 30);
        assert_eq!(
            definition.json.as_deref(),
            Some(r#"{"description":"Refund the maximum","name":"refund"}"#)
        );
        assert_eq!(
            inventory.current_hash("orders", "refund").as_deref(),
            Some(definition.hash.as_str())
        );
    }

    #[test]
    fn a_tool_left_out_of_a_list_keeps_its_definition() {
        let inventory = ToolInventory::default();
        let refund = json!({"name": "refund"});
        let lookup = json!({"name": "lookup"});
        inventory.record_list(
            "orders",
            &[listed("refund", &refund), listed("lookup", &lookup)],
            1,
        );
        inventory.record_list("orders", &[listed("lookup", &lookup)], 2);
        assert!(inventory.current_hash("orders", "refund").is_some());
        assert_eq!(inventory.snapshot().len(), 2);
    }

    #[test]
    fn oversized_definitions_are_reported_by_hash_only() {
        let inventory = ToolInventory::default();
        let tool = json!({"name": "big", "description": "x".repeat(MAX_DEFINITION_JSON_BYTES)});
        inventory.record_list("orders", &[listed("big", &tool)], 1);
        let definition = inventory
            .snapshot()
            .first()
            .unwrap()
            .definition
            .clone()
            .unwrap();
        assert_eq!(definition.json, None);
        assert!(definition.hash.starts_with("sha256:"));
    }

    #[test]
    fn unhashed_tools_have_no_definition() {
        let inventory = ToolInventory::default();
        inventory.record_list(
            "orders",
            &[ListedTool {
                name: "refund",
                governed: false,
                definition: None,
            }],
            1,
        );
        assert_eq!(inventory.current_hash("orders", "refund"), None);
        assert_eq!(inventory.snapshot().first().unwrap().definition, None);
    }
}
