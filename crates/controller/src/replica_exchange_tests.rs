use serde_json::json;

use super::*;

fn sidecar(pod: &str, kid: Option<&str>) -> SidecarState {
    SidecarState {
        agent: Some(ObjectKey::new("ns", "planner")),
        pod_uid: format!("uid-{pod}"),
        connection: 7,
        acked: Some((3, "h3".into())),
        acked_at: Some(1_700_000_100),
        rejected: Some((4, "bad rule".into())),
        key: kid.map(|k| {
            (
                k.to_owned(),
                json!({"kty": "OKP", "crv": "Ed25519", "x": "abc"}),
            )
        }),
        inventory: Inventory::from([
            (("orders".into(), "refund".into()), Some(definition("a"))),
            (("orders".into(), "get_order".into()), None),
        ]),
        sidecar_version: "0.3.0".into(),
        connected_at: 1_700_000_000,
    }
}

fn definition(letter: &str) -> ReportedDefinition {
    ReportedDefinition {
        hash: format!("sha256:{}", letter.repeat(64)),
        json: Some(format!(r#"{{"name":"{letter}"}}"#).into()),
        seen_at: 1_700_000_000,
    }
}

fn own(pods: &[(&str, Option<&str>)]) -> BTreeMap<PodKey, SidecarState> {
    pods.iter()
        .map(|(pod, kid)| (("ns".to_owned(), (*pod).to_owned()), sidecar(pod, *kid)))
        .collect()
}

fn replica_of(pods: &[(&str, Option<&str>)], heartbeat: i64) -> Replica {
    let object = config_map(
        "cm",
        "chaperone-system",
        &publish(&own(pods)),
        heartbeat,
        None,
    );
    read_replica(&object).unwrap()
}

#[test]
fn what_a_replica_publishes_reads_back_as_the_same_sidecars() {
    let replica = replica_of(&[("p1", Some("k1")), ("p2", None)], 100);
    assert_eq!(replica.heartbeat, 100);
    let p1 = &replica.sidecars[&("ns".to_owned(), "p1".to_owned())];
    let expected = sidecar("p1", Some("k1"));
    assert_eq!(p1.agent, expected.agent);
    assert_eq!(p1.pod_uid, "uid-p1");
    assert_eq!(p1.acked, expected.acked);
    assert_eq!(p1.rejected, expected.rejected);
    assert_eq!(p1.inventory, expected.inventory);
    assert_eq!(p1.acked_at, Some(1_700_000_100));
    assert_eq!(p1.sidecar_version, "0.3.0");
    assert_eq!(p1.connected_at, 1_700_000_000);
    let (kid, jwk) = p1.key.as_ref().unwrap();
    assert_eq!(kid, "k1");
    assert_eq!(jwk["chaperone.dev/pod"], "ns/p1");
    assert_eq!(jwk["chaperone.dev/agent"], "ns/planner");
    assert!(
        replica.sidecars[&("ns".to_owned(), "p2".to_owned())]
            .key
            .is_none()
    );
}

#[test]
fn tool_mode_sidecars_are_published_apart_and_not_read_as_peers() {
    let mut sidecars = own(&[("p1", Some("k1"))]);
    let tool = SidecarState {
        pod_uid: "uid-t".into(),
        sidecar_version: "0.3.0".into(),
        connected_at: 1_700_000_000,
        ..Default::default()
    };
    sidecars.insert(("tools".to_owned(), "orders-0".to_owned()), tool);
    let published = publish(&sidecars);
    let tools: Vec<Value> = serde_json::from_str(&published.tool_sidecars_json).unwrap();
    assert_eq!(
        tools,
        vec![
            json!({"namespace": "tools", "pod": "orders-0", "podUid": "uid-t", "sidecarVersion": "0.3.0", "connectedAt": 1_700_000_000})
        ]
    );
    let agents: Vec<Value> = serde_json::from_str(&published.sidecars_json).unwrap();
    assert_eq!(agents.len(), 1, "{agents:?}");
    let replica = read_replica(&config_map("cm", "ns", &published, 1, None)).unwrap();
    assert_eq!(
        replica.sidecars.keys().cloned().collect::<Vec<_>>(),
        vec![("ns".to_owned(), "p1".to_owned())]
    );
}

#[test]
fn keys_json_holds_the_jwks_entries() {
    let published = publish(&own(&[("p1", Some("k1"))]));
    let keys: Vec<Value> = serde_json::from_str(&published.keys_json).unwrap();
    assert_eq!(
        keys,
        vec![jwk_of("ns", "p1", &sidecar("p1", Some("k1"))).unwrap()]
    );
}

#[test]
fn the_config_map_is_labelled_and_owned_when_the_pod_is_known() {
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: "controller-0".into(),
        uid: "u".into(),
        ..Default::default()
    };
    let published = publish(&BTreeMap::new());
    let object = config_map("cm", "ns", &published, 1, Some(owner.clone()));
    let labels = object.metadata.labels.unwrap();
    assert_eq!(labels[COMPONENT_LABEL.0], COMPONENT_LABEL.1);
    assert_eq!(labels["app.kubernetes.io/part-of"], "chaperone");
    assert_eq!(object.metadata.owner_references, Some(vec![owner]));
    let without = config_map("cm", "ns", &published, 1, None);
    assert_eq!(without.metadata.owner_references, None);
    assert_eq!(
        without.data.unwrap()["version"],
        chaperone_wire::build_info::VERSION,
        "the replica's build, for chaperonectl version"
    );
}

#[test]
fn a_config_map_without_heartbeat_is_refused() {
    let mut object = config_map("cm", "ns", &publish(&BTreeMap::new()), 1, None);
    object.data.as_mut().unwrap().remove("heartbeat");
    assert!(matches!(
        read_replica(&object),
        Err(InvalidReplicaState::Missing("heartbeat"))
    ));
}

#[test]
fn peers_leave_out_this_replica_and_stale_replicas() {
    let replicas = BTreeMap::from([
        ("mine".to_owned(), replica_of(&[("a", Some("ka"))], 1000)),
        ("fresh".to_owned(), replica_of(&[("b", Some("kb"))], 1000)),
        (
            "stale".to_owned(),
            replica_of(&[("c", Some("kc"))], 1000 - MAX_AGE - 1),
        ),
    ]);
    let peers = peer_sidecars(&replicas, "mine", 1000);
    let pods: Vec<&str> = peers.keys().map(|(_, p)| p.as_str()).collect();
    assert_eq!(pods, ["b"]);
}

#[test]
fn a_pod_listed_by_two_replicas_is_taken_from_the_later_heartbeat() {
    let mut older = replica_of(&[("a", Some("old"))], 990);
    older.sidecars.values_mut().for_each(|s| s.acked = None);
    let replicas = BTreeMap::from([
        ("r1".to_owned(), replica_of(&[("a", Some("new"))], 1000)),
        ("r2".to_owned(), older),
    ]);
    let peers = peer_sidecars(&replicas, "mine", 1000);
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers.values().next().unwrap().key.as_ref().unwrap().0,
        "new"
    );
}

#[test]
fn inventories_are_left_out_when_they_would_not_fit() {
    let mut big = sidecar("p1", Some("k1"));
    big.inventory = (0..40_000)
        .map(|i| {
            let tool = ("orders".to_owned(), format!("tool-with-a-long-name-{i:08}"));
            (tool, None)
        })
        .collect();
    let published = publish(&BTreeMap::from([(("ns".into(), "p1".into()), big)]));
    assert!(published.sidecars_json.len() < MAX_BYTES);
    assert!(!published.sidecars_json.contains("tool-with-a-long-name"));
    assert!(published.keys_json.contains("k1"));
}

#[test]
fn definition_texts_are_left_out_first_when_they_would_not_fit() {
    let mut big = sidecar("p1", Some("k1"));
    big.inventory = (0..20)
        .map(|i| {
            let tool = ("orders".to_owned(), format!("tool-{i}"));
            let mut definition = definition(&format!("{:x}", i % 16));
            definition.hash = format!("sha256:{i:064}");
            definition.json = Some("x".repeat(60 * 1024).into());
            (tool, Some(definition))
        })
        .collect();
    let published = publish(&BTreeMap::from([(("ns".into(), "p1".into()), big)]));
    assert_eq!(published.definitions_json, "{}");
    let replica = read_replica(&config_map("cm", "ns", &published, 1, None)).unwrap();
    let tools = &replica.sidecars[&("ns".to_owned(), "p1".to_owned())].inventory;
    let tool = tools[&("orders".to_owned(), "tool-3".to_owned())]
        .as_ref()
        .expect("the hash is still published");
    assert_eq!(tool.hash, format!("sha256:{:064}", 3));
    assert_eq!(tool.json, None);
}
