//! Tests of tool definition pinning's pure part: status entries, the
//! condition, changes (Events) and the ConfigMap's data.

use chaperone_policy::{
    ObjectKey,
    model::{
        AgentRef, Object, Rule, RuleAction, ToolClassification, ToolMatch, ToolPinning,
        ToolPolicySpec,
    },
};

use super::*;
use crate::{
    index::Index,
    test_objects::{identity, meta},
};

const NOW: i64 = 1_800_000_000;

fn hash(letter: char) -> String {
    format!("sha256:{}", letter.to_string().repeat(64))
}

/// `orders/refund` and `orders/get_order` allowed; `refund` pinned to
/// `pin` when given; the `orders` server's pinning is `mode`.
fn engine(mode: ToolPinning, pin: Option<String>) -> Engine {
    let mut index = Index::new();
    let mut agent = identity("ns", "planner");
    agent.spec.tool_servers[0].tool_pinning = mode;
    index.apply_identity(agent, NOW);
    let allow = |tool: &str| ToolMatch {
        server: "orders".into(),
        name: Some(tool.into()),
        effect: None,
    };
    let policy = Object {
        api_version: "chaperone.dev/v1alpha1".into(),
        metadata: meta("ns", "pins"),
        spec: ToolPolicySpec {
            target_refs: Some(vec![AgentRef {
                name: "planner".into(),
            }]),
            tools: pin
                .map(|definition| ToolClassification {
                    server: "orders".into(),
                    name: "refund".into(),
                    effects: Vec::new(),
                    definition: Some(definition),
                })
                .into_iter()
                .collect(),
            rules: vec![Rule {
                name: "allow".into(),
                action: RuleAction::Allow,
                tools: vec![allow("refund"), allow("get_order")],
                ..Default::default()
            }],
            ..Default::default()
        },
    };
    index.apply_policy(policy, NOW);
    let snapshot = index
        .snapshot(&ObjectKey::new("ns", "planner"))
        .expect("compiled");
    Engine::new(&snapshot.decode().unwrap()).unwrap()
}

/// A sidecar of pod `pod` that saw `tools`: (name, hash and when, if any).
fn sidecar(pod: &str, tools: &[(&str, Option<(&String, i64)>)]) -> (String, SidecarState) {
    let inventory = tools
        .iter()
        .map(|(name, definition)| {
            let definition = definition.map(|(hash, seen_at)| ReportedDefinition {
                hash: hash.clone(),
                json: Some(format!(r#"{{"name":"{name}","v":"{}"}}"#, &hash[7..8]).into()),
                seen_at,
            });
            (("orders".to_owned(), (*name).to_owned()), definition)
        })
        .collect();
    let state = SidecarState {
        agent: Some(ObjectKey::new("ns", "planner")),
        pod_uid: format!("uid-{pod}"),
        inventory,
        ..Default::default()
    };
    (pod.to_owned(), state)
}

fn tool<'a>(tools: &'a AgentTools, name: &str) -> &'a DiscoveredTool {
    tools
        .tools
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("{name} not discovered: {:?}", tools.tools))
}

fn known(name: &str, hash: &str, first_seen: &str) -> KnownDefinitions {
    KnownDefinitions::from([(
        ("orders".to_owned(), name.to_owned()),
        KnownDefinition {
            hash: hash.to_owned(),
            first_seen: first_seen.to_owned(),
        },
    )])
}

#[test]
fn a_tool_matching_its_pin_shows_its_hash_and_blocks_nothing() {
    let (a, b) = (hash('a'), hash('b'));
    let engine = engine(ToolPinning::Enforce, Some(a.clone()));
    let connected = [sidecar(
        "p1",
        &[
            ("refund", Some((&a, NOW - 60))),
            ("get_order", Some((&b, NOW))),
        ],
    )];

    let tools = agent_tools(&connected, Some(&engine), &KnownDefinitions::new(), NOW);

    let refund = tool(&tools, "refund");
    assert_eq!(refund.definition_hash.as_deref(), Some(a.as_str()));
    assert_eq!(refund.pin, Some(PinState::Matches));
    assert_eq!(refund.pinned_hash, None);
    assert_eq!(refund.first_seen.as_deref(), Some("2027-01-15T07:59:00Z"));
    // get_order is governed and not pinned: blocked in enforce.
    assert_eq!(tool(&tools, "get_order").pin, Some(PinState::Unpinned));
    assert_eq!(tools.blocked.len(), 1);
    assert_eq!(tools.blocked[0].name, "get_order");
    assert!(tools.changes.is_empty(), "first discovery is no change");
}

#[test]
fn a_changed_definition_is_one_change_and_blocks_in_enforce() {
    let (a, b) = (hash('a'), hash('b'));
    let engine = engine(ToolPinning::Enforce, Some(a.clone()));
    // Two sidecars report the new definition.
    let connected = [
        sidecar("p1", &[("refund", Some((&b, NOW - 5)))]),
        sidecar("p2", &[("refund", Some((&b, NOW - 2)))]),
    ];
    let before = known("refund", &a, "2026-01-01T00:00:00Z");

    let tools = agent_tools(&connected, Some(&engine), &before, NOW);

    let refund = tool(&tools, "refund");
    assert_eq!(refund.pin, Some(PinState::Differs));
    assert_eq!(refund.pinned_hash.as_deref(), Some(a.as_str()));
    assert_eq!(
        refund.first_seen.as_deref(),
        Some("2027-01-15T07:59:55Z"),
        "the earliest report of the new definition"
    );
    assert_eq!(tools.changes.len(), 1);
    let change = &tools.changes[0];
    assert_eq!((&change.previous, &change.current), (&a, &b));
    assert!(change.was_known);
    assert_eq!(change.pod, ("p2".to_owned(), "uid-p2".to_owned()));
    let condition = pinned_condition(&tools, [engine.tool_pinning("orders")]);
    assert!(!condition.status);
    assert_eq!(condition.reason, REASON_TOOLS_BLOCKED);
    assert!(
        condition
            .message
            .contains("orders/refund (tool definition changed"),
        "{}",
        condition.message
    );

    // Written, the status says b: the next computation is no change.
    let mut after = before.clone();
    remember(&mut after, &tools.tools);
    let again = agent_tools(&connected, Some(&engine), &after, NOW + 30);
    assert!(again.changes.is_empty());
    assert_eq!(
        tool(&again, "refund").first_seen,
        refund.first_seen,
        "first seen stays"
    );
}

#[test]
fn observe_reports_the_change_and_blocks_nothing() {
    let (a, b) = (hash('a'), hash('b'));
    let engine = engine(ToolPinning::Observe, Some(a.clone()));
    let connected = [sidecar("p1", &[("refund", Some((&b, NOW)))])];

    let tools = agent_tools(&connected, Some(&engine), &known("refund", &a, ""), NOW);

    assert_eq!(tool(&tools, "refund").pin, Some(PinState::Differs));
    assert!(tools.blocked.is_empty());
    assert_eq!(tools.changes.len(), 1);
    let condition = pinned_condition(&tools, [engine.tool_pinning("orders")]);
    assert!(condition.status);
    assert!(
        condition.message.contains("observe"),
        "{}",
        condition.message
    );
    let event = change_event(&ObjectKey::new("ns", "planner"), &tools.changes[0]);
    assert_eq!(event.reason, "ToolDefinitionChanged");
    assert!(event.warning);
    assert!(
        event.note.contains(&a) && event.note.contains(&b),
        "{}",
        event.note
    );
    assert!(event.note.contains("calls proceed"), "{}", event.note);
    assert_eq!(event.action, "List orders/refund bbbbbbbbbbbbbbbb");
}

#[test]
fn a_tool_first_listed_other_than_its_pin_is_a_change_against_the_pin() {
    let (a, b) = (hash('a'), hash('b'));
    let engine = engine(ToolPinning::Enforce, Some(a.clone()));
    let connected = [sidecar("p1", &[("refund", Some((&b, NOW)))])];

    let tools = agent_tools(&connected, Some(&engine), &KnownDefinitions::new(), NOW);

    assert_eq!(tools.changes.len(), 1);
    assert!(!tools.changes[0].was_known);
    assert_eq!(tools.changes[0].previous, a);
}

#[test]
fn the_newest_report_wins_when_sidecars_disagree() {
    let (a, b) = (hash('a'), hash('b'));
    let engine = engine(ToolPinning::Observe, None);
    let connected = [
        sidecar("old", &[("refund", Some((&a, NOW - 100)))]),
        sidecar("new", &[("refund", Some((&b, NOW - 10)))]),
    ];

    let tools = agent_tools(&connected, Some(&engine), &KnownDefinitions::new(), NOW);

    assert_eq!(
        tool(&tools, "refund").definition_hash.as_deref(),
        Some(b.as_str())
    );
    assert_eq!(tools.texts.len(), 2, "both texts are kept for the diff");
}

#[test]
fn pinning_off_reports_no_hash_and_the_condition_says_so() {
    let engine = engine(ToolPinning::Off, None);
    let connected = [sidecar("p1", &[("refund", None)])];

    let tools = agent_tools(&connected, Some(&engine), &KnownDefinitions::new(), NOW);

    let refund = tool(&tools, "refund");
    assert_eq!(refund.definition_hash, None);
    assert_eq!(refund.pin, Some(PinState::Off));
    let condition = pinned_condition(&tools, [engine.tool_pinning("orders")]);
    assert!(condition.status);
    assert!(condition.message.contains("off"), "{}", condition.message);
}

#[test]
fn the_config_map_keeps_the_current_and_pinned_texts_and_drops_others() {
    let (a, b, c) = (hash('a'), hash('b'), hash('c'));
    let engine = engine(ToolPinning::Enforce, Some(a.clone()));
    let connected = [sidecar("p1", &[("refund", Some((&c, NOW)))])];
    let tools = agent_tools(&connected, Some(&engine), &known("refund", &b, ""), NOW);
    let previous = BTreeMap::from([
        (data_key("orders", "refund", &a), "pinned text".to_owned()),
        (data_key("orders", "refund", &b), "older text".to_owned()),
        (data_key("mail", "send", &b), "undiscovered".to_owned()),
    ]);

    let data = definitions_data(&tools, &previous);

    assert_eq!(
        data,
        BTreeMap::from([
            (data_key("orders", "refund", &a), "pinned text".to_owned()),
            (
                data_key("orders", "refund", &c),
                r#"{"name":"refund","v":"c"}"#.to_owned()
            ),
            (data_key("mail", "send", &b), "undiscovered".to_owned()),
        ])
    );
}

#[test]
fn the_config_map_stays_under_its_size_limit() {
    let engine = engine(ToolPinning::Observe, None);
    let hashes: Vec<String> = (0..20).map(|i| format!("sha256:{i:064}")).collect();
    let names: Vec<String> = (0..20).map(|i| format!("tool{i}")).collect();
    let tools_seen: Vec<(&str, Option<(&String, i64)>)> = names
        .iter()
        .zip(&hashes)
        .map(|(name, hash)| (name.as_str(), Some((hash, NOW))))
        .collect();
    let mut connected = sidecar("p1", &tools_seen);
    for definition in connected.1.inventory.values_mut().flatten() {
        definition.json = Some("x".repeat(60 * 1024).into());
    }

    let tools = agent_tools(&[connected], Some(&engine), &KnownDefinitions::new(), NOW);
    let data = definitions_data(&tools, &BTreeMap::new());

    let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(size <= MAX_CONFIG_MAP_BYTES, "{size}");
    assert_eq!(data.len(), 14, "as many texts as fit");
}

#[test]
fn the_config_map_is_owned_by_the_agent() {
    let object = definitions_config_map(&ObjectKey::new("ns", "planner"), "uid-1", BTreeMap::new());
    assert_eq!(
        object.metadata.name.as_deref(),
        Some("planner-tool-definitions")
    );
    let owner = &object.metadata.owner_references.unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("AgentIdentity", "uid-1")
    );
}

#[test]
fn an_agent_without_discovered_tools_is_not_blocked_and_says_how_it_pins() {
    let nothing = AgentTools::default();
    let enforce = pinned_condition(&nothing, [ToolPinning::Observe, ToolPinning::Enforce]);
    assert!(enforce.status);
    assert!(
        enforce.message.contains("enforce server"),
        "{}",
        enforce.message
    );
    let off = pinned_condition(&nothing, [ToolPinning::Off]);
    assert!(off.message.contains("toolPinning off"), "{}", off.message);
}
