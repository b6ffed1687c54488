use super::fixtures::{snapshot, update};
use super::*;

#[test]
fn converts_a_valid_update() {
    let snapshot = snapshot(7);
    let offer = SnapshotOffer::try_from(update(&snapshot)).unwrap();
    assert_eq!(offer.snapshot, snapshot);
    assert_eq!(offer.identity.unwrap().pod, "planner-0");
    assert!(offer.peer_keys.unwrap().get("k1").is_some());
}

#[test]
fn refuses_an_unknown_format() {
    let mut update = update(&snapshot(1));
    update.format = "chaperone.snapshot.v2+cbor".into();
    let err = SnapshotOffer::try_from(update).unwrap_err();
    assert!(matches!(err, InvalidUpdate::UnsupportedFormat(_)));
    assert!(err.to_string().contains("v2+cbor"), "{err}");
}

#[test]
fn refuses_a_payload_that_is_not_json() {
    let mut update = update(&snapshot(1));
    update.payload = bytes::Bytes::from_static(b"{not json");
    assert!(matches!(
        SnapshotOffer::try_from(update),
        Err(InvalidUpdate::Malformed(_))
    ));
}

#[test]
fn refuses_content_that_does_not_match_its_hash() {
    let mut tampered = snapshot(1);
    tampered.content.agent.name = "admin".into();
    let err = SnapshotOffer::try_from(update(&tampered)).unwrap_err();
    assert!(
        matches!(err, InvalidUpdate::ContentHashMismatch { .. }),
        "{err}"
    );
}

#[test]
fn refuses_an_announced_hash_other_than_the_payloads() {
    let mut update = update(&snapshot(1));
    update.hash = "0".repeat(64);
    assert!(matches!(
        SnapshotOffer::try_from(update),
        Err(InvalidUpdate::HashMismatch { .. })
    ));
}

#[test]
fn refuses_an_announced_version_other_than_the_payloads() {
    let mut update = update(&snapshot(1));
    update.version = 2;
    assert!(matches!(
        SnapshotOffer::try_from(update),
        Err(InvalidUpdate::VersionMismatch {
            announced: 2,
            payload: 1
        })
    ));
}

#[test]
fn refuses_a_snapshot_for_another_agent() {
    let mut update = update(&snapshot(1));
    update.identity.as_mut().unwrap().agent = "worker".into();
    let err = SnapshotOffer::try_from(update).unwrap_err();
    assert!(matches!(err, InvalidUpdate::WrongAgent { .. }), "{err}");
}

#[test]
fn refuses_a_bad_jwks() {
    let mut update = update(&snapshot(1));
    update.jwks_json = "[]".into();
    assert!(matches!(
        SnapshotOffer::try_from(update),
        Err(InvalidUpdate::Jwks(InvalidJwks::NoKeys))
    ));
}

#[test]
fn an_empty_jwks_leaves_the_keys_alone() {
    let mut update = update(&snapshot(1));
    update.jwks_json = String::new();
    assert!(SnapshotOffer::try_from(update).unwrap().peer_keys.is_none());
}

/// The golden update of `crates/wire/tests/fixtures/snapshot-v1.json` (the
/// controller's encoder is tested against the same file), as the sidecar
/// receives it. The payload's keys come out sorted: a decoder must not
/// care, and the hash (over the content in its declared order) still pins
/// the layout.
fn golden_update() -> SnapshotUpdate {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../wire/tests/fixtures/snapshot-v1.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let text_of = |pointer: &str| {
        golden
            .pointer(pointer)
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    };
    SnapshotUpdate {
        version: golden["version"].as_u64().unwrap(),
        hash: text_of("/hash"),
        format: text_of("/format"),
        payload: serde_json::to_vec(&golden["payload"]).unwrap().into(),
        identity: Some(v1::Identity {
            namespace: text_of("/identity/namespace"),
            agent: text_of("/identity/agent"),
            pod: text_of("/identity/pod"),
            pod_uid: text_of("/identity/podUid"),
        }),
        jwks_json: golden["jwks"].to_string(),
    }
}

#[test]
fn decodes_the_golden_snapshot_update() {
    use chaperone_policy::model::EnforcementMode;

    let offer = SnapshotOffer::try_from(golden_update()).unwrap();
    let snapshot = &offer.snapshot;
    assert_eq!(snapshot.version, 7);
    let content = &snapshot.content;
    assert_eq!(content.format, chaperone_policy::SNAPSHOT_FORMAT);
    assert_eq!(content.agent.to_string(), "shop/planner");
    assert_eq!(content.mode, EnforcementMode::DryRun);
    let servers: Vec<_> = content
        .tool_servers
        .iter()
        .map(|s| (s.name.as_str(), s.agent.as_deref()))
        .collect();
    assert_eq!(servers, [("orders", None), ("worker", Some("worker"))]);
    assert_eq!(content.assertion.lifetime_seconds, 30);
    assert_eq!(
        (
            content.session.idle_timeout_seconds,
            content.session.max_calls
        ),
        (600, 50)
    );
    assert_eq!(content.initiators[0].issuer, "https://login.example.com");
    assert_eq!(content.passthrough_methods, ["acme/ping", "acme/stats"]);
    let rules: Vec<_> = content
        .authority
        .rules
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        rules,
        [
            "call-worker",
            "no-refund-after-export",
            "read-orders",
            "small-refunds",
            "users-only"
        ]
    );
    let limit = content.authority.rules[3].rate_limit.as_ref().unwrap();
    assert_eq!(
        (limit.id.as_str(), limit.calls, limit.period_seconds),
        ("shop/planner/small-refunds", 5, 60)
    );
    assert_eq!(
        content.grants_received[0].grant.to_string(),
        "shop/frontdesk-to-planner"
    );
    assert_eq!(
        content.grants_given[0].grant.to_string(),
        "shop/planner-to-worker"
    );
    assert_eq!(content.delegators[0].agent.to_string(), "shop/frontdesk");
    let identity = offer.identity.unwrap();
    assert_eq!(
        (identity.pod.as_str(), identity.pod_uid.as_str()),
        ("planner-0", "0c6f8e2e-planner-0")
    );
    let keys = offer.peer_keys.unwrap();
    let key = keys.get("frontdesk-0-1").unwrap();
    assert_eq!(key["chaperone.dev/agent"], "shop/frontdesk");
    chaperone_policy::Engine::new(snapshot).expect("the golden snapshot can be put in force");
}

fn discovered(name: &str, definition: Option<(&str, usize, i64)>) -> DiscoveredTool {
    DiscoveredTool {
        server: "orders".into(),
        name: name.into(),
        governed: true,
        definition: definition.map(
            |(hash, json_len, seen_at)| crate::inventory::ToolDefinition {
                hash: hash.into(),
                json: Some("x".repeat(json_len)),
                seen_at,
            },
        ),
    }
}

#[test]
fn inventory_reports_carry_definition_hash_json_and_time() {
    let tools = [
        discovered("refund", Some(("sha256:aa", 12, 1_700_000_000))),
        discovered("lookup", None),
    ];
    let report = inventory_report(&tools);
    assert_eq!(report.tools.len(), 2);
    let refund = &report.tools[0];
    assert_eq!(
        (
            refund.definition_hash.as_str(),
            refund.definition_json.len(),
            refund.definition_seen_at
        ),
        ("sha256:aa", 12, 1_700_000_000)
    );
    let lookup = &report.tools[1];
    assert_eq!(lookup.definition_hash, "");
    assert_eq!(lookup.definition_json, "");
    assert_eq!(lookup.definition_seen_at, 0);
}

#[test]
fn inventory_reports_keep_the_newest_definitions_within_budget() {
    let big = crate::inventory::MAX_DEFINITION_JSON_BYTES;
    let tools: Vec<DiscoveredTool> = (0..40)
        .map(|i| discovered(&format!("t{i:02}"), Some(("sha256:aa", big, i))))
        .collect();
    let report = inventory_report(&tools);
    let total: usize = report.tools.iter().map(|t| t.definition_json.len()).sum();
    assert!(total <= INVENTORY_JSON_BUDGET, "{total}");
    // The newest keep their text; every tool keeps its hash.
    assert_eq!(report.tools[39].definition_json.len(), big);
    assert_eq!(report.tools[0].definition_json, "");
    assert!(
        report
            .tools
            .iter()
            .all(|t| t.definition_hash == "sha256:aa")
    );
}
