use super::*;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

/// A fresh Ed25519 key, as the snapshot server hands it on once its sidecar
/// proved it holds it.
fn key() -> ProvenKey {
    let pair = Ed25519KeyPair::generate().unwrap();
    let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
    let kid = chaperone_audit::key_id(&public);
    let x = URL_SAFE_NO_PAD.encode(public);
    ProvenKey {
        jwk: serde_json::from_value(json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x}))
            .unwrap(),
        kid,
        x,
    }
}

fn agent() -> AgentKey {
    AgentKey {
        namespace: "team".into(),
        name: "planner".into(),
    }
}

fn date(text: &str) -> Date {
    text.parse().unwrap()
}

#[test]
fn months_are_utc() {
    // 2026-12-31T23:59:59Z and a second later.
    assert_eq!(month_of(1_798_761_599), "2026-12");
    assert_eq!(month_of(1_798_761_600), "2027-01");
    assert_eq!(day_of(1_798_761_600), date("2027-01-01"));
}

#[test]
fn a_month_expires_once_its_last_day_is_older_than_the_retention() {
    // November's last day is 2026-11-30: kept while it is within 7 days.
    assert!(!expired("2026-11", date("2026-12-07"), 7));
    assert!(expired("2026-11", date("2026-12-08"), 7));
    assert!(!expired("2026-12", date("2026-12-31"), 1));
    assert!(expired("2025-11", date("2026-12-07"), 365));
    assert!(!expired("2025-12", date("2026-12-07"), 400));
    // What is not ours to read is never deleted.
    assert!(!expired("", date("2026-12-07"), 1));
    assert!(!expired("2026-13", date("2030-01-01"), 1));
    assert!(!expired("latest", date("2030-01-01"), 1));
}

#[test]
fn another_pod_cannot_take_over_a_held_key() {
    let archive = AuditKeyArchive::new(Metrics::new());
    let key = key();
    let _hold = archive
        .register("team", "victim", "u1", Some(&agent()), &key)
        .unwrap();
    let claimed = archive.register("team", "claimant", "u2", None, &key);
    assert_eq!(
        claimed.err(),
        Some(Unarchivable::ClaimedByAnotherPod("team/victim".into()))
    );
    let due = archive.due("2026-12");
    assert_eq!(due["team"].len(), 1);
    assert_eq!(due["team"][0].pod, "team/victim");
}

#[test]
fn a_key_is_written_once_a_month_while_held_and_once_after() {
    let archive = AuditKeyArchive::new(Metrics::new());
    let agent_key = key();
    let tool_key = key();
    let (kid, tool_kid) = (agent_key.kid.clone(), tool_key.kid.clone());
    let first = archive
        .register("team", "p-0", "u0", Some(&agent()), &agent_key)
        .unwrap();
    // A reconnect of the same sidecar holds the same key twice.
    let second = archive
        .register("team", "p-0", "u0", Some(&agent()), &agent_key)
        .unwrap();
    let tool = archive
        .register("tools", "orders-0", "u1", None, &tool_key)
        .unwrap();
    let due = archive.due("2026-12");
    assert_eq!(due.keys().collect::<Vec<_>>(), ["team", "tools"]);
    assert_eq!(due["tools"][0].agent, None);
    assert_eq!(due["team"][0].agent.as_deref(), Some("team/planner"));
    archive.written("2026-12", &[kid.clone(), tool_kid.clone()]);
    assert!(archive.due("2026-12").is_empty());
    // A new month: everything held is due again.
    assert_eq!(archive.due("2027-01").len(), 2);
    // Dropped in a month it was written in: done.
    drop(tool);
    archive.written("2026-12", &[]);
    assert_eq!(archive.due("2027-01").keys().collect::<Vec<_>>(), ["team"]);
    // Dropped (both streams) before this month's write: written once more.
    drop(first);
    drop(second);
    assert_eq!(archive.due("2027-01")["team"][0].kid, kid);
    archive.written("2027-01", std::slice::from_ref(&kid));
    assert!(archive.due("2027-01").is_empty());
    assert!(archive.due("2027-02").is_empty(), "forgotten once written");
}

#[test]
fn a_shard_adds_what_fits_and_never_replaces_an_entry() {
    let key_of = |kid: &str, pod: &str| ArchivedKey::new(kid, "xx", "team", pod, "u", None);
    let existing = BTreeMap::from([
        ("k1".to_owned(), key_of("k1", "p-1").to_json()),
        ("k2".to_owned(), key_of("k2", "p-2").to_json()),
    ]);
    let plan = plan_write(
        &existing,
        vec![
            key_of("k1", "p-1"),
            key_of("k2", "intruder"),
            key_of("k3", "p-3"),
        ],
    );
    assert_eq!(plan.present, ["k1"]);
    assert_eq!(plan.claimed, [("k2".to_owned(), "team/p-2".to_owned())]);
    assert_eq!(plan.add.keys().collect::<Vec<_>>(), ["k3"]);
    assert!(plan.overflow.is_empty());
    // A full shard sends the rest to the next one.
    let entry = key_of("k4", "p-4").to_json();
    let full = BTreeMap::from([("big".to_owned(), "x".repeat(MAX_DATA_BYTES - entry.len()))]);
    let plan = plan_write(&full, vec![key_of("k4", "p-4"), key_of("k5", "p-5")]);
    assert!(plan.add.is_empty(), "{:?}", plan.add);
    assert_eq!(plan.overflow.len(), 2);
}

#[test]
fn a_pod_reconnecting_with_fresh_keys_cannot_grow_the_archive_without_bound() {
    let archive = AuditKeyArchive::new(Metrics::new());
    let keys: Vec<ProvenKey> = (0..MAX_KEYS_PER_POD).map(|_| key()).collect();
    let _holds: Vec<ArchivedKeyHold> = keys
        .iter()
        .map(|key| archive.register("team", "p-0", "u0", None, key).unwrap())
        .collect();
    let extra = key();
    assert_eq!(
        archive.register("team", "p-0", "u0", None, &extra).err(),
        Some(Unarchivable::TooManyKeys("team/p-0".into()))
    );
    // Another pod is not held back, and a key already held is held again
    // (a reconnect) without counting.
    assert!(archive.register("team", "p-1", "u1", None, &extra).is_ok());
    assert!(
        archive
            .register("team", "p-0", "u0", None, &keys[0])
            .is_ok()
    );
    assert!(
        archive
            .metrics
            .render()
            .contains("chaperone_controller_audit_keys_refused_total 1"),
        "{}",
        archive.metrics.render()
    );
}
