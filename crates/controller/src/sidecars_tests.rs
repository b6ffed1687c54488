use chaperone_policy::ObjectKey;

use super::*;

fn identity(pod: &str) -> SidecarIdentity {
    SidecarIdentity {
        agent: ObjectKey::new("ns", "planner"),
        pod: pod.into(),
        pod_uid: format!("uid-{pod}"),
        service_account: "planner".into(),
    }
}

#[test]
fn connects_updates_and_disconnects_mark_the_agent_for_the_status_writer() {
    let registry = SidecarRegistry::new();
    let planner = BTreeSet::from([ObjectKey::new("ns", "planner")]);

    let guard = registry.connect(&identity("p1"));
    assert_eq!(registry.take_status_dirty(), planner);
    assert!(registry.take_status_dirty().is_empty(), "taken once");

    registry.update("ns", "p1", |s| s.acked = Some((1, "h".into())));
    assert_eq!(registry.take_status_dirty(), planner);

    drop(guard);
    assert_eq!(registry.take_status_dirty(), planner);
}

#[test]
fn keys_of_disconnected_sidecars_disappear_from_the_jwks() {
    let registry = SidecarRegistry::new();
    let guard = registry.connect(&identity("p1"));
    registry.update("ns", "p1", |s| {
        s.key = Some((
            "k1".into(),
            json!({"kty": "OKP", "crv": "Ed25519", "x": "abc"}),
        ))
    });
    let jwks = registry.jwks();
    assert_eq!(jwks["keys"][0]["kid"], "k1");
    assert_eq!(jwks["keys"][0]["chaperone.dev/agent"], "ns/planner");
    let mut key_changes = registry.key_changes();
    key_changes.borrow_and_update();
    drop(guard);
    assert!(key_changes.has_changed().unwrap());
    assert_eq!(registry.jwks()["keys"].as_array().unwrap().len(), 0);
}

#[test]
fn the_jwks_json_is_shared_until_the_key_set_changes() {
    let registry = SidecarRegistry::new();
    let guard = registry.connect(&identity("p1"));
    let empty = registry.jwks_json();
    assert_eq!(&*empty, r#"{"keys":[]}"#);
    // An inventory report changes no key: the same string is handed out.
    registry.update("ns", "p1", |s| {
        s.inventory.insert(("orders".into(), "get".into()), None);
    });
    assert!(Arc::ptr_eq(&empty, &registry.jwks_json()));
    registry.update("ns", "p1", |s| {
        s.key = Some(("k1".into(), json!({"kty": "OKP"})))
    });
    let with_key = registry.jwks_json();
    assert_eq!(&*with_key, registry.jwks().to_string());
    assert!(with_key.contains("\"k1\""));
    assert!(Arc::ptr_eq(&with_key, &registry.jwks_json()));
    drop(guard);
    assert_eq!(&*registry.jwks_json(), r#"{"keys":[]}"#);
}

#[tokio::test]
async fn evicting_a_pod_ends_its_stream() {
    let registry = SidecarRegistry::new();
    let guard = registry.connect(&identity("p1"));
    registry.evict("ns", "p1");
    tokio::time::timeout(std::time::Duration::from_secs(1), guard.evicted())
        .await
        .unwrap();
}

fn tool(pod: &str) -> ToolSidecarIdentity {
    ToolSidecarIdentity {
        namespace: "ns".into(),
        pod: pod.into(),
        pod_uid: format!("uid-{pod}"),
        service_account: "orders-mcp".into(),
    }
}

#[test]
fn tool_sidecars_count_for_no_agent_and_never_carry_a_key() {
    let registry = SidecarRegistry::new();
    let _agent = registry.connect(&identity("p1"));
    let _tool = registry.connect_tool(&tool("mcp-0"));
    assert_eq!(registry.len(), 2);
    assert_eq!(registry.of_agent(&ObjectKey::new("ns", "planner")).len(), 1);
    let mut key_changes = registry.key_changes();
    key_changes.borrow_and_update();
    registry.update("ns", "mcp-0", |s| {
        s.key = Some(("tool-key".into(), json!({"kty": "OKP"})))
    });
    assert!(!key_changes.has_changed().unwrap());
    assert_eq!(registry.jwks(), json!({ "keys": [] }));
}

#[tokio::test]
async fn evicting_a_tool_pod_ends_its_stream() {
    let registry = SidecarRegistry::new();
    let guard = registry.connect_tool(&tool("mcp-0"));
    registry.evict("ns", "mcp-0");
    tokio::time::timeout(std::time::Duration::from_secs(1), guard.evicted())
        .await
        .unwrap();
    drop(guard);
    assert!(registry.is_empty());
}

#[test]
fn an_old_stream_closing_keeps_the_reconnected_sidecar() {
    let registry = SidecarRegistry::new();
    let old = registry.connect(&identity("p1"));
    let _new = registry.connect(&identity("p1"));
    drop(old);
    assert_eq!(registry.of_agent(&ObjectKey::new("ns", "planner")).len(), 1);
}

fn peer(pod: &str, kid: &str) -> SidecarState {
    SidecarState {
        agent: Some(ObjectKey::new("ns", "planner")),
        pod_uid: format!("uid-{pod}"),
        key: Some((kid.into(), json!({"kty": "OKP", "kid": kid}))),
        ..Default::default()
    }
}

fn peers(entries: &[(&str, &str)]) -> BTreeMap<PodKey, SidecarState> {
    entries
        .iter()
        .map(|(pod, kid)| (("ns".to_owned(), (*pod).to_owned()), peer(pod, kid)))
        .collect()
}

fn kids(registry: &SidecarRegistry) -> Vec<String> {
    registry.jwks()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_jwks_is_the_union_of_own_and_peer_keys_once_per_kid() {
    let registry = SidecarRegistry::new();
    let _own = registry.connect(&identity("p1"));
    registry.update("ns", "p1", |s| {
        s.key = Some(("k1".into(), json!({"kty": "OKP"})))
    });
    let mut key_changes = registry.key_changes();
    key_changes.borrow_and_update();
    registry.set_peers(peers(&[("p2", "k2"), ("p3", "k1")]), 0);
    assert!(key_changes.has_changed().unwrap());
    assert_eq!(kids(&registry), ["k1", "k2"]);
    assert_eq!(registry.of_agent(&ObjectKey::new("ns", "planner")).len(), 3);
    assert_eq!(registry.len(), 1, "len counts this replica's streams only");
}

#[test]
fn a_pod_here_and_in_a_peers_view_counts_once() {
    let registry = SidecarRegistry::new();
    let _own = registry.connect(&identity("p1"));
    registry.set_peers(peers(&[("p1", "k-old")]), 0);
    let of_agent = registry.of_agent(&ObjectKey::new("ns", "planner"));
    assert_eq!(of_agent.len(), 1);
    assert_eq!(of_agent[0].1.key, None, "this replica's entry wins");
}

#[test]
fn an_unchanged_peer_view_fires_no_key_change() {
    let registry = SidecarRegistry::new();
    registry.set_peers(peers(&[("p2", "k2")]), 0);
    let mut key_changes = registry.key_changes();
    key_changes.borrow_and_update();
    registry.set_peers(peers(&[("p2", "k2")]), 1);
    assert!(!key_changes.has_changed().unwrap());
}

#[test]
fn a_deleted_peer_pod_leaves_at_once_and_stays_out() {
    let registry = SidecarRegistry::new();
    registry.set_peers(peers(&[("p2", "k2")]), 0);
    let mut key_changes = registry.key_changes();
    key_changes.borrow_and_update();
    registry.forget_peer_pod("uid-p2", 10);
    assert!(key_changes.has_changed().unwrap());
    assert!(kids(&registry).is_empty());
    // The replica holding it has not published the end of its stream yet.
    registry.set_peers(peers(&[("p2", "k2")]), 20);
    assert!(kids(&registry).is_empty());
    // Long after, a pod with that uid (impossible) would count again.
    registry.set_peers(peers(&[("p2", "k2")]), 10 + DELETED_POD_MEMORY_SECS);
    assert_eq!(kids(&registry), ["k2"]);
}

#[test]
fn a_stream_left_over_from_before_a_reconnect_no_longer_updates_the_pod() {
    let registry = SidecarRegistry::new();
    let old = registry.connect(&identity("p1"));
    let new = registry.connect(&identity("p1"));
    registry.update_stream("ns", "p1", new.id(), |s| s.acked = Some((2, "new".into())));
    registry.update_stream("ns", "p1", old.id(), |s| s.acked = Some((1, "old".into())));
    let sidecars = registry.of_agent(&ObjectKey::new("ns", "planner"));
    assert_eq!(sidecars.len(), 1);
    assert_eq!(sidecars[0].1.acked, Some((2, "new".into())));
}

#[test]
fn the_tally_counts_each_pod_once_and_in_sync_by_the_current_hash() {
    let registry = SidecarRegistry::new();
    let _old = registry.connect(&identity("p1"));
    let _p1 = registry.connect(&identity("p1"));
    let _p2 = registry.connect(&identity("p2"));
    let _tool = registry.connect_tool(&tool("mcp-0"));
    registry.update("ns", "p1", |s| s.acked = Some((2, "current".into())));
    registry.update("ns", "p2", |s| s.acked = Some((1, "older".into())));
    let planner = ObjectKey::new("ns", "planner");
    let tally = registry.own_tally(|agent| (agent == &planner).then_some("current"));
    assert_eq!(
        tally,
        OwnTally {
            agent_sidecars: 2,
            tool_sidecars: 1,
            per_agent: BTreeMap::from([(
                planner,
                AgentTally {
                    connected: 2,
                    in_sync: 1
                }
            )]),
        }
    );
}
