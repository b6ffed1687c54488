//! The tool inventory: every tool seen in upstream `tools/list` results
//! (deduplicated), for the controller's `discoveredTools` status. The controller
//! stream subscribes with [`ToolInventory::subscribe`] and reports the set when it
//! changes.

use std::collections::BTreeSet;

use serde::Serialize;
use tokio::sync::watch;

/// A tool an upstream listed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct DiscoveredTool {
    /// Tool server name.
    pub server: String,
    /// Tool name.
    pub name: String,
    /// Whether the policy in force when it was seen lets the agent see it.
    pub governed: bool,
}

/// The deduplicated set of tools seen.
#[derive(Debug)]
pub struct ToolInventory {
    tools: watch::Sender<BTreeSet<DiscoveredTool>>,
}

impl Default for ToolInventory {
    fn default() -> Self {
        Self {
            tools: watch::Sender::new(BTreeSet::new()),
        }
    }
}

impl ToolInventory {
    /// Records tools; subscribers are woken only if one is new.
    pub fn record(&self, seen: Vec<DiscoveredTool>) {
        if seen.is_empty() {
            return;
        }
        self.tools.send_if_modified(|set| {
            let mut changed = false;
            for tool in seen {
                changed |= set.insert(tool);
            }
            changed
        });
    }

    /// A receiver of the set, marked changed whenever a new tool is seen.
    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<DiscoveredTool>> {
        self.tools.subscribe()
    }

    /// The set now.
    pub fn snapshot(&self) -> BTreeSet<DiscoveredTool> {
        self.tools.borrow().clone()
    }
}
