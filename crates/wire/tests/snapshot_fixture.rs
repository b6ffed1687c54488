//! The golden snapshot update (`fixtures/snapshot-v1.json`) is one consistent
//! `SnapshotUpdate`: what the controller's encoder and the sidecar's decoder
//! are each tested against (see `fixtures/README.md`). This crate knows no
//! snapshot type, so it checks what the contract itself says.

use chaperone_wire::v1::{Identity, SnapshotUpdate};
use prost::Message as _;
use serde_json::Value;

fn golden() -> Value {
    let text = include_str!("fixtures/snapshot-v1.json");
    serde_json::from_str(text).expect("the fixture is JSON")
}

fn text(value: &Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("the fixture has no string at {pointer}"))
        .to_owned()
}

#[test]
fn the_format_label_names_the_payloads_format_version() {
    let golden = golden();
    let version = golden
        .pointer("/payload/content/format")
        .and_then(Value::as_u64)
        .expect("content.format is a number");
    assert_eq!(version, 1, "this is the fixture of format version 1");
    assert_eq!(
        text(&golden, "/format"),
        format!("chaperone.snapshot.v{version}+json")
    );
}

#[test]
fn the_update_announces_its_payloads_version_and_hash() {
    let golden = golden();
    assert_eq!(golden["version"], golden["payload"]["version"]);
    assert_eq!(golden["hash"], golden["payload"]["hash"]);
    let hash = text(&golden, "/hash");
    assert!(
        hash.len() == 64
            && hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "the hash is SHA-256 in lowercase hex: {hash}"
    );
}

#[test]
fn the_update_survives_the_protobuf_encoding() {
    let golden = golden();
    let update = SnapshotUpdate {
        version: golden["version"].as_u64().expect("version is a number"),
        hash: text(&golden, "/hash"),
        format: text(&golden, "/format"),
        payload: serde_json::to_vec(&golden["payload"]).unwrap().into(),
        identity: Some(Identity {
            namespace: text(&golden, "/identity/namespace"),
            agent: text(&golden, "/identity/agent"),
            pod: text(&golden, "/identity/pod"),
            pod_uid: text(&golden, "/identity/podUid"),
        }),
        jwks_json: golden["jwks"].to_string(),
    };
    let decoded = SnapshotUpdate::decode(update.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, update);
    let identity = golden["identity"].as_object().unwrap();
    assert_eq!(
        identity.len(),
        4,
        "identity has the four fields of Identity"
    );
}
