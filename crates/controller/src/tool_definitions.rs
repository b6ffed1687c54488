//! Tool definition pinning, the controller's side, without I/O: what the
//! sidecars report of each tool's definition becomes the AgentIdentity's
//! `status.discoveredTools[]` (`definitionHash`, `firstSeen`, `pin`,
//! `pinnedHash`), the `ToolDefinitionsPinned` condition, the
//! `ToolDefinitionChanged` Events and the data of the ConfigMap
//! `<agent>-tool-definitions` (the definitions' texts, for
//! `chaperonectl tools diff`).
//!
//! "Changed" is derived from what the status last said of the tool
//! ([`KnownDefinitions`]: read back from the AgentIdentity by a new leader,
//! then remembered), never from one sidecar's or one replica's memory, so a
//! change makes one Event however many sidecars report it and across
//! controller restarts. The pin verdicts are the policy engine's
//! ([`Engine::pin_verdict`]), the same the sidecars enforce.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use chaperone_api::{
    DiscoveredTool, PinState,
    tool_definitions::{
        CONDITION_PINNED, EVENT_DEFINITION_CHANGED, REASON_TOOLS_BLOCKED, config_map_name, data_key,
    },
};
use chaperone_policy::{AgentKey, Engine, PinVerdict, ToolPin, model::ToolPinning};
use k8s_openapi::{
    api::core::v1::ConfigMap,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

use crate::{audit_events::AgentCallEvent, sidecars::SidecarState, status::ConditionSpec};

/// (server, tool).
pub type ToolKey = (String, String);

/// The most the ConfigMap's data may hold (a ConfigMap holds at most 1 MiB).
pub const MAX_CONFIG_MAP_BYTES: usize = 900 * 1024;
/// The longest definition text a sidecar sends (it sends none when larger).
pub const MAX_DEFINITION_BYTES: usize = 64 * 1024;
/// Blocked tools the condition's message names; the rest are counted.
const BLOCKED_LISTED: usize = 10;

/// A tool's definition as one sidecar last listed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedDefinition {
    /// `sha256:<hex>`.
    pub hash: String,
    /// The definition (canonical JSON), when the sidecar sent it.
    pub json: Option<Arc<str>>,
    /// When the sidecar first saw this definition (unix seconds; 0 unknown).
    pub seen_at: i64,
}

/// The tools a sidecar saw in `tools/list` results, each with its definition
/// where the server's `toolPinning` is not `off`.
pub type Inventory = BTreeMap<ToolKey, Option<ReportedDefinition>>;

/// What the status last said of a tool's definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownDefinition {
    /// Its `definitionHash`.
    pub hash: String,
    /// Its `firstSeen` (RFC 3339).
    pub first_seen: String,
}

/// What the status said of each tool's definition (tools that left the
/// status stay while the writer remembers them).
pub type KnownDefinitions = BTreeMap<ToolKey, KnownDefinition>;

/// The known definitions of the `discoveredTools` of a status.
pub fn known_from_status(tools: &[DiscoveredTool]) -> KnownDefinitions {
    tools
        .iter()
        .filter_map(|tool| {
            let hash = tool.definition_hash.clone()?;
            let first_seen = tool.first_seen.clone().unwrap_or_default();
            Some((
                (tool.server.clone(), tool.name.clone()),
                KnownDefinition { hash, first_seen },
            ))
        })
        .collect()
}

/// A governed tool of an `enforce` server whose definition does not match
/// its pin: hidden from lists, its calls refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockedTool {
    /// Tool server.
    pub server: String,
    /// Tool.
    pub name: String,
    /// Why.
    pub verdict: PinVerdict,
}

/// A tool whose definition changed since the status last said, or that
/// first appeared with a definition other than its pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefinitionChange {
    /// Tool server.
    pub server: String,
    /// Tool.
    pub name: String,
    /// The definition before (the status's), or the pin when the tool was
    /// not known.
    pub previous: String,
    /// Whether `previous` is the status's (`false`: the pin's).
    pub was_known: bool,
    /// The definition now.
    pub current: String,
    /// The pod whose sidecar reported it, and the pod's uid.
    pub pod: (String, String),
    /// How the new definition stands against its pin.
    pub verdict: PinVerdict,
    /// The server's `toolPinning`.
    pub mode: ToolPinning,
}

/// An agent's discovered tools and what pinning makes of them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentTools {
    /// `status.discoveredTools`, sorted by server and tool.
    pub tools: Vec<DiscoveredTool>,
    /// Governed tools that `enforce` blocks.
    pub blocked: Vec<BlockedTool>,
    /// Tools whose definition differs from their pin on `observe` servers.
    pub observed_differences: usize,
    /// Definitions that changed (one Event each).
    pub changes: Vec<DefinitionChange>,
    /// The definition texts the sidecars sent, by hash.
    pub texts: BTreeMap<String, Arc<str>>,
}

/// The newest definition of one tool among the sidecars.
struct Current<'a> {
    hash: &'a str,
    /// The earliest report of `hash`.
    first_seen: i64,
    /// The latest report of `hash`: which definition is current.
    latest: i64,
    pod: &'a str,
    pod_uid: &'a str,
}

/// The agent's discovered tools from its connected sidecars' inventories
/// (`connected`: pod and state), against the pins of `engine` (the agent's
/// compiled snapshot; `None`: none compiled) and what the status said
/// (`known`). Where sidecars disagree on a definition, the one reported
/// most recently is current.
pub fn agent_tools(
    connected: &[(String, SidecarState)],
    engine: Option<&Engine>,
    known: &KnownDefinitions,
    now: i64,
) -> AgentTools {
    let mut seen: BTreeSet<&ToolKey> = BTreeSet::new();
    // Per tool, per definition: its reports by the sidecars.
    let mut reports: BTreeMap<&ToolKey, BTreeMap<&str, Current<'_>>> = BTreeMap::new();
    let mut texts = BTreeMap::new();
    for (pod, state) in connected {
        for (key, definition) in &state.inventory {
            seen.insert(key);
            let Some(definition) = definition else {
                continue;
            };
            if let Some(json) = &definition.json {
                texts
                    .entry(definition.hash.clone())
                    .or_insert_with(|| json.clone());
            }
            let at = if definition.seen_at > 0 {
                definition.seen_at
            } else {
                now
            };
            let report = Current {
                hash: &definition.hash,
                first_seen: at,
                latest: at,
                pod,
                pod_uid: &state.pod_uid,
            };
            reports
                .entry(key)
                .or_default()
                .entry(&definition.hash)
                .and_modify(|c| {
                    c.first_seen = c.first_seen.min(at);
                    if at > c.latest {
                        (c.latest, c.pod, c.pod_uid) = (at, pod, &state.pod_uid);
                    }
                })
                .or_insert(report);
        }
    }
    let current: BTreeMap<&ToolKey, Current<'_>> = reports
        .into_iter()
        .filter_map(|(key, by_hash)| {
            let newest = by_hash
                .into_values()
                .max_by(|a, b| (a.latest, a.hash).cmp(&(b.latest, b.hash)))?;
            Some((key, newest))
        })
        .collect();
    let mut out = AgentTools {
        texts,
        ..Default::default()
    };
    for key @ (server, name) in seen {
        let definition = current.get(key);
        let hash = definition.map(|c| c.hash);
        let governed = engine.is_some_and(|e| e.visible(server, name));
        let verdict = engine.map(|e| e.pin_verdict(server, name, hash));
        let mode = engine.map_or(ToolPinning::Off, |e| e.tool_pinning(server));
        let pinned_hash = match engine.map(|e| e.tool_pin(server, name)) {
            Some(ToolPin::Pinned(pinned)) if Some(pinned) != hash => Some(pinned.to_owned()),
            _ => None,
        };
        let first_seen = definition.map(|c| match known.get(key) {
            Some(k) if k.hash == c.hash && !k.first_seen.is_empty() => k.first_seen.clone(),
            _ => rfc3339(c.first_seen),
        });
        if let (Some(verdict), true) = (&verdict, governed) {
            if mode == ToolPinning::Enforce && !verdict.passes() {
                out.blocked.push(BlockedTool {
                    server: server.clone(),
                    name: name.clone(),
                    verdict: verdict.clone(),
                });
            } else if mode == ToolPinning::Observe && !verdict.passes() {
                out.observed_differences += 1;
            }
        }
        if let (Some(c), Some(verdict)) = (definition, &verdict) {
            let previous = match known.get(key) {
                Some(k) if k.hash != c.hash => Some((k.hash.clone(), true)),
                Some(_) => None,
                None => verdict.pinned().map(|p| (p.to_owned(), false)),
            };
            if let Some((previous, was_known)) = previous {
                out.changes.push(DefinitionChange {
                    server: server.clone(),
                    name: name.clone(),
                    previous,
                    was_known,
                    current: c.hash.to_owned(),
                    pod: (c.pod.to_owned(), c.pod_uid.to_owned()),
                    verdict: verdict.clone(),
                    mode,
                });
            }
        }
        out.tools.push(DiscoveredTool {
            server: server.clone(),
            name: name.clone(),
            governed,
            definition_hash: hash.map(str::to_owned),
            first_seen,
            pin: verdict.as_ref().map(PinState::of),
            pinned_hash,
        });
    }
    out
}

/// The known definitions after a status with `tools` was written: theirs,
/// and the earlier ones of tools no sidecar reports now.
pub fn remember(known: &mut KnownDefinitions, tools: &[DiscoveredTool]) {
    known.extend(known_from_status(tools));
}

/// The `ToolDefinitionsPinned` condition of an agent whose tool servers'
/// `toolPinning` are `modes`.
pub fn pinned_condition(
    tools: &AgentTools,
    modes: impl IntoIterator<Item = ToolPinning>,
) -> ConditionSpec {
    if tools.blocked.is_empty() {
        let modes: Vec<ToolPinning> = modes.into_iter().collect();
        let observed = if tools.observed_differences > 0 {
            format!(
                "; {} differ from their pins on observe servers (calls proceed)",
                tools_count(tools.observed_differences)
            )
        } else {
            String::new()
        };
        let message = if modes.contains(&ToolPinning::Enforce) {
            format!(
                "no tool is blocked: every governed tool of an enforce server matches its pin{observed}"
            )
        } else if modes.contains(&ToolPinning::Observe) {
            format!("no tool server of this agent enforces pins (toolPinning observe){observed}")
        } else {
            "no tool server of this agent checks tool definitions (toolPinning off)".to_owned()
        };
        return ConditionSpec {
            type_: CONDITION_PINNED,
            status: true,
            reason: "NoneBlocked",
            message,
        };
    }
    let mut listed: Vec<String> = tools
        .blocked
        .iter()
        .take(BLOCKED_LISTED)
        .map(|b| format!("{}/{} ({})", b.server, b.name, b.verdict))
        .collect();
    if tools.blocked.len() > BLOCKED_LISTED {
        listed.push(format!("and {} more", tools.blocked.len() - BLOCKED_LISTED));
    }
    ConditionSpec {
        type_: CONDITION_PINNED,
        status: false,
        reason: REASON_TOOLS_BLOCKED,
        message: format!(
            "{} blocked, hidden from lists and refused until pinned (chaperonectl tools diff|pin): {}",
            tools_count(tools.blocked.len()),
            listed.join("; ")
        ),
    }
}

/// The `ToolDefinitionChanged` Event of `change` for `agent`.
pub fn change_event(agent: &AgentKey, change: &DefinitionChange) -> AgentCallEvent {
    let tool = format!("{}/{}", change.server, change.name);
    let what = if change.was_known {
        format!(
            "tool {tool} changed its definition: was {}, now {}",
            change.previous, change.current
        )
    } else {
        format!(
            "tool {tool} was listed with a definition other than its pin: pinned {}, now {}",
            change.previous, change.current
        )
    };
    let mode = match change.mode {
        ToolPinning::Enforce => {
            "toolPinning enforce: hidden and refused until the new definition is pinned"
        }
        _ => "toolPinning observe: calls proceed",
    };
    let standing = match &change.verdict {
        PinVerdict::Matches | PinVerdict::Unchecked => "it matches its pin".to_owned(),
        PinVerdict::Differs { pinned, .. } if *pinned == change.previous => mode.to_owned(),
        PinVerdict::Differs { pinned, .. } => format!("{mode} (pinned {pinned})"),
        PinVerdict::Unpinned { .. } => format!("{mode} (not pinned)"),
        other => format!("{mode} ({other})"),
    };
    let short = change
        .current
        .strip_prefix("sha256:")
        .unwrap_or(&change.current);
    AgentCallEvent {
        agent: agent.clone(),
        pod: change.pod.0.clone(),
        pod_uid: Some(change.pod.1.clone()),
        warning: true,
        reason: EVENT_DEFINITION_CHANGED,
        // One series per tool and definition: the recorder folds Events
        // with the same action, and a later change must not fold into this.
        action: format!("List {tool} {}", &short[..short.len().min(16)]),
        note: format!(
            "{what}; {standing}; review with `chaperonectl tools diff {} -n {}`",
            agent.name, agent.namespace
        ),
    }
}

/// The data of the ConfigMap `<agent>-tool-definitions`: for each tool
/// discovered now, its current definition and the one it is pinned to
/// (others are dropped); a tool no sidecar reports now keeps its entries of
/// `previous`. A text comes from the sidecars (`tools.texts`) or from
/// `previous`; one that is neither is left out (known by its hash only),
/// and so is what would not fit in [`MAX_CONFIG_MAP_BYTES`]: the texts of
/// tools that differ from their pins first, then the current ones, then
/// those kept.
pub fn definitions_data(
    tools: &AgentTools,
    previous: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    // (priority, key, text); lower priority first.
    let mut wanted: Vec<(u8, String, &str)> = Vec::new();
    let mut discovered_prefixes = Vec::new();
    for tool in &tools.tools {
        discovered_prefixes.push(data_key(&tool.server, &tool.name, ""));
        let Some(hash) = &tool.definition_hash else {
            continue;
        };
        // What `tools diff` shows first: both texts of a tool that differs.
        let priority = if tool.pinned_hash.is_some() { 0 } else { 1 };
        for hash in std::iter::once(hash).chain(&tool.pinned_hash) {
            let key = data_key(&tool.server, &tool.name, hash);
            let text = tools
                .texts
                .get(hash)
                .map(|t| &**t)
                .or_else(|| previous.get(&key).map(String::as_str));
            if let Some(text) = text {
                wanted.push((priority, key, text));
            }
        }
    }
    for (key, text) in previous {
        let of_discovered = discovered_prefixes.iter().any(|prefix| {
            key.strip_prefix(prefix.as_str())
                .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        if !of_discovered {
            wanted.push((2, key.clone(), text));
        }
    }
    wanted.sort();
    let mut data = BTreeMap::new();
    let mut size = 0;
    for (_, key, text) in wanted {
        if data.contains_key(&key) {
            continue;
        }
        let bytes = key.len() + text.len();
        if size + bytes > MAX_CONFIG_MAP_BYTES {
            continue;
        }
        size += bytes;
        data.insert(key, text.to_owned());
    }
    data
}

/// The ConfigMap of `agent`'s definition texts, owned by the AgentIdentity
/// (uid `owner_uid`) so that deleting the agent deletes it.
pub fn definitions_config_map(
    agent: &AgentKey,
    owner_uid: &str,
    data: BTreeMap<String, String>,
) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(&agent.name)),
            namespace: Some(agent.namespace.clone()),
            labels: Some(crate::config_map_labels(
                "tool-definitions",
                [("chaperone.dev/agent", &agent.name)],
            )),
            owner_references: Some(vec![OwnerReference {
                api_version: chaperone_policy::model::API_VERSION.to_owned(),
                kind: "AgentIdentity".to_owned(),
                name: agent.name.clone(),
                uid: owner_uid.to_owned(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

/// "1 governed tool", "3 governed tools".
fn tools_count(n: usize) -> String {
    format!("{n} governed tool{}", if n == 1 { "" } else { "s" })
}

fn rfc3339(unix: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
#[path = "tool_definitions_tests.rs"]
mod tests;
