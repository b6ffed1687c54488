//! Tests of the controller's wire edge, and the encoder against the golden
//! snapshot update of `crates/wire/tests/fixtures/snapshot-v1.json`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use chaperone_policy::{CompileOptions, DocumentSet, ObjectKey, Snapshot, compile};
use chaperone_wire::v1::sidecar_message::Message;
use serde::Serialize;
use serde_json::{Value, json};

use super::*;
use crate::sidecars::SidecarRegistry;

fn message(message: Message) -> SidecarMessage {
    SidecarMessage {
        message: Some(message),
    }
}

#[test]
fn converts_a_signing_key() {
    let report = SidecarReport::try_from(message(Message::SigningKey(v1::SigningKey {
        kid: "k1".into(),
        jwk_json: r#"{"kty":"OKP","crv":"Ed25519","x":"abc"}"#.into(),
        proof: vec![1, 2],
    })))
    .unwrap();
    let SidecarReport::SigningKey(key) = report else {
        panic!("{report:?}");
    };
    assert_eq!(key.kid, "k1");
    assert_eq!(key.jwk["crv"], "Ed25519");
    assert_eq!(key.proof, [1, 2]);
}

/// A fresh key registered as a sidecar registers it on the stream of
/// `token`: its own kid, its JWK, its proof.
fn registered(token: &str) -> (SigningKey, aws_lc_rs::signature::Ed25519KeyPair) {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let pair = Ed25519KeyPair::generate().unwrap();
    let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
    let kid = chaperone_audit::key_id(&public);
    let statement = chaperone_wire::key_registration::key_registration_statement(
        &kid,
        &chaperone_audit::sha256(token.as_bytes()),
    );
    let key = SigningKey {
        jwk: serde_json::from_value(
            json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(public)}),
        )
        .unwrap(),
        proof: pair.sign(&statement).as_ref().to_vec(),
        kid,
    };
    (key, pair)
}

#[test]
fn a_key_is_taken_only_with_its_own_kid_and_a_proof_for_this_stream() {
    let token = chaperone_audit::sha256(b"victim-token");
    let (key, _) = registered("victim-token");
    let proven = key.check_possession(&token).unwrap();
    assert_eq!((&proven.kid, &proven.jwk), (&key.kid, &key.jwk));
    assert_eq!(proven.x, key.jwk["x"]);
    // The same registration replayed on another pod's stream.
    assert_eq!(
        key.check_possession(&chaperone_audit::sha256(b"attacker-token")),
        Err(KeyRefusal::BadProof)
    );
    // The victim's public key without its proof, or with the attacker's.
    let (attacker, _) = registered("attacker-token");
    let unproven = SigningKey {
        proof: Vec::new(),
        ..key.clone()
    };
    assert_eq!(unproven.check_possession(&token), Err(KeyRefusal::NoProof));
    let borrowed_proof = SigningKey {
        proof: attacker.proof.clone(),
        ..key.clone()
    };
    assert_eq!(
        borrowed_proof.check_possession(&token),
        Err(KeyRefusal::BadProof)
    );
    // The attacker's own key under the victim's kid.
    let squatting = SigningKey {
        kid: key.kid.clone(),
        ..attacker
    };
    assert!(matches!(
        squatting.check_possession(&token),
        Err(KeyRefusal::ForeignKid { .. })
    ));
    let not_ed25519 = SigningKey {
        jwk: serde_json::from_value(json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})).unwrap(),
        ..key
    };
    assert_eq!(
        not_ed25519.check_possession(&token),
        Err(KeyRefusal::NotEd25519)
    );
}

#[test]
fn refuses_a_signing_key_without_a_kid() {
    let key = v1::SigningKey {
        kid: String::new(),
        jwk_json: r#"{"kty":"OKP"}"#.into(),
        proof: Vec::new(),
    };
    assert!(matches!(
        SigningKey::try_from(key),
        Err(InvalidSidecarMessage::KeyWithoutKid)
    ));
}

#[test]
fn refuses_a_signing_key_that_is_not_a_jwk_object() {
    for jwk_json in ["not json", "[]", r#""OKP""#] {
        let key = v1::SigningKey {
            kid: "k1".into(),
            jwk_json: jwk_json.into(),
            proof: Vec::new(),
        };
        assert!(
            matches!(
                SigningKey::try_from(key),
                Err(InvalidSidecarMessage::KeyNotAJwk { .. })
            ),
            "{jwk_json}"
        );
    }
}

#[test]
fn an_empty_message_is_unknown() {
    assert!(matches!(
        SidecarReport::try_from(SidecarMessage { message: None }),
        Err(InvalidSidecarMessage::Unknown)
    ));
}

#[test]
fn a_hello_without_a_snapshot_names_none() {
    let hello = Hello::from(v1::Hello {
        sidecar_version: "0.1.0".into(),
        snapshot_version: 0,
        snapshot_hash: String::new(),
    });
    assert_eq!(hello.snapshot, None);
    let hello = Hello::from(v1::Hello {
        sidecar_version: "0.1.0".into(),
        snapshot_version: 3,
        snapshot_hash: "ab".into(),
    });
    assert_eq!(
        hello.snapshot,
        Some(SnapshotRef {
            version: 3,
            hash: "ab".into()
        })
    );
}

#[test]
fn an_inventory_is_deduplicated() {
    let tool = |server: &str, name: &str| v1::DiscoveredTool {
        server: server.into(),
        name: name.into(),
        ..Default::default()
    };
    let report = SidecarReport::try_from(message(Message::Inventory(v1::ToolInventory {
        tools: vec![
            tool("orders", "refund"),
            tool("orders", "get_order"),
            tool("orders", "refund"),
        ],
    })))
    .unwrap();
    let expected = Inventory::from([
        (("orders".to_owned(), "get_order".to_owned()), None),
        (("orders".to_owned(), "refund".to_owned()), None),
    ]);
    assert_eq!(report, SidecarReport::Inventory(expected));
}

#[test]
fn an_inventory_carries_well_formed_definitions() {
    let hash = format!("sha256:{}", "ab".repeat(32));
    let tool = |name: &str, hash: &str, json: String| v1::DiscoveredTool {
        server: "orders".into(),
        name: name.into(),
        definition_hash: hash.into(),
        definition_json: json,
        definition_seen_at: 1_800_000_000,
    };
    let report = SidecarReport::try_from(message(Message::Inventory(v1::ToolInventory {
        tools: vec![
            tool("refund", &hash, r#"{"name":"refund"}"#.into()),
            tool("huge", &hash, "x".repeat(MAX_DEFINITION_BYTES + 1)),
            tool("odd", "md5:abc", "{}".into()),
        ],
    })))
    .unwrap();
    let SidecarReport::Inventory(inventory) = report else {
        panic!("{report:?}")
    };
    let of = |name: &str| inventory[&("orders".to_owned(), name.to_owned())].clone();
    let refund = of("refund").expect("a definition");
    assert_eq!(refund.hash, hash);
    assert_eq!(refund.json.as_deref(), Some(r#"{"name":"refund"}"#));
    assert_eq!(refund.seen_at, 1_800_000_000);
    assert_eq!(
        of("huge").expect("a definition").json,
        None,
        "text too large"
    );
    assert_eq!(of("odd"), None, "a malformed hash is no definition");
}

#[test]
fn carries_acks_nacks_and_audit_batches() {
    let ack = SidecarReport::try_from(message(Message::Ack(v1::Ack {
        version: 4,
        hash: "h".into(),
    })))
    .unwrap();
    assert_eq!(
        ack,
        SidecarReport::Ack(SnapshotRef {
            version: 4,
            hash: "h".into()
        })
    );
    let nack = SidecarReport::try_from(message(Message::Nack(v1::Nack {
        version: 5,
        hash: "h".into(),
        error: "bad".into(),
    })))
    .unwrap();
    assert!(
        matches!(nack, SidecarReport::Nack { snapshot, error } if snapshot.version == 5 && error == "bad")
    );
    let audit = SidecarReport::try_from(message(Message::Audit(v1::AuditBatch {
        records: vec!["{}".into()],
        dropped: 2,
    })))
    .unwrap();
    assert_eq!(
        audit,
        SidecarReport::Audit(AuditBatch {
            records: vec!["{}".into()],
            dropped: 2
        })
    );
}

// ---------------------------------------------------------------------------
// The golden snapshot update
// ---------------------------------------------------------------------------

/// `crates/wire/tests/fixtures`: the contract's fixtures live with the contract.
fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../wire/tests/fixtures")
}

/// Compile time of the golden snapshot (2023-11-14T22:13:20Z).
const GOLDEN_NOW: i64 = 1_700_000_000;

/// Agent `shop/planner`'s snapshot of `snapshot-v1.crs.yaml`, version 7.
fn golden_snapshot() -> Snapshot {
    let path = fixtures().join("snapshot-v1.crs.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut documents = DocumentSet::new();
    documents.add(&path.display().to_string(), &text).unwrap();
    let identity = documents.agent(Some("shop/planner")).unwrap();
    let compilation = compile(
        identity,
        &documents.inventory(),
        &CompileOptions {
            version: 7,
            now: GOLDEN_NOW,
        },
    );
    assert_eq!(compilation.errors, [], "the fixture's CRs compile cleanly");
    compilation.snapshot
}

/// The key set the planner's sidecars get: the key of its caller's sidecar
/// (`shop/frontdesk`), as the registry publishes it.
fn golden_jwks() -> String {
    let registry = SidecarRegistry::new();
    let caller = ObjectKey::new("shop", "frontdesk");
    let _connection = registry.connect(&SidecarIdentity {
        agent: caller.clone(),
        pod: "frontdesk-0".into(),
        pod_uid: "7a1f4c52-frontdesk-0".into(),
        service_account: "frontdesk".into(),
    });
    registry.update("shop", "frontdesk-0", |s| {
        s.key = Some((
            "frontdesk-0-1".into(),
            json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
        ));
    });
    registry.jwks_json_of(&BTreeSet::from([caller]))
}

/// The golden file's shape: the fields of a `SnapshotUpdate`, with the JSON
/// that `payload` and `jwks_json` hold written out as JSON.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GoldenUpdate {
    format: String,
    version: u64,
    hash: String,
    identity: GoldenIdentity,
    jwks: Value,
    payload: Snapshot,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GoldenIdentity {
    namespace: String,
    agent: String,
    pod: String,
    pod_uid: String,
}

#[test]
fn encodes_the_golden_snapshot_update() {
    let identity = SidecarIdentity {
        agent: ObjectKey::new("shop", "planner"),
        pod: "planner-0".into(),
        pod_uid: "0c6f8e2e-planner-0".into(),
        service_account: "planner".into(),
    };
    let snapshot = PublishedSnapshot::new(&golden_snapshot());
    let message = snapshot_message(&identity, &snapshot, &golden_jwks());
    let Some(controller_message::Message::Snapshot(update)) = message.message else {
        panic!("not a snapshot update: {message:?}");
    };
    let sent_identity = update.identity.unwrap();
    let encoded = GoldenUpdate {
        format: update.format,
        version: update.version,
        hash: update.hash,
        identity: GoldenIdentity {
            namespace: sent_identity.namespace,
            agent: sent_identity.agent,
            pod: sent_identity.pod,
            pod_uid: sent_identity.pod_uid,
        },
        jwks: serde_json::from_str(&update.jwks_json).unwrap(),
        payload: Snapshot::from_bytes(&update.payload).unwrap(),
    };
    let path = fixtures().join("snapshot-v1.json");
    if std::env::var_os("CHAPERONE_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&encoded).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
    }
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let payload: Value = serde_json::from_slice(&update.payload).unwrap();
    assert_eq!(
        payload,
        golden["payload"],
        "the payload bytes differ from {}",
        path.display()
    );
    let encoded = serde_json::to_value(&encoded).unwrap();
    assert!(
        encoded == golden,
        "the encoded update differs from {}: a change of the snapshot contract. If intended (bump \
         SNAPSHOT_FORMAT and add a new fixture when old sidecars cannot read it), rerun with \
         CHAPERONE_BLESS=1 and review the diff.\nencoded: {}",
        path.display(),
        serde_json::to_string_pretty(&encoded).unwrap()
    );
}

fn approval_request(ticket: u64, args_digest: &str) -> SidecarMessage {
    message(Message::ApprovalRequest(v1::ApprovalRequest {
        ticket,
        policy_namespace: "shop".into(),
        policy: "refunds".into(),
        rule: "large-refunds".into(),
        server: "orders".into(),
        tool: "refund".into(),
        arguments_json: r#"{"amount":500}"#.into(),
        redacted: vec![],
        args_digest: args_digest.into(),
        scope: "task".into(),
        scope_key: "task-42".into(),
        initiator: String::new(),
        chain: vec![v1::ApprovalLink {
            agent: "shop/planner".into(),
            grant: "shop/planner-to-support".into(),
        }],
        timeout_seconds: 600,
        valid_for_seconds: 300,
    }))
}

#[test]
fn converts_an_approval_request_and_a_release() {
    let report = SidecarReport::try_from(approval_request(3, &"a".repeat(64))).unwrap();
    let SidecarReport::ApprovalRequest(call) = report else {
        panic!("{report:?}");
    };
    assert_eq!(call.ticket, 3);
    assert_eq!(call.policy.namespace, "shop");
    assert_eq!(call.arguments["amount"], 500);
    assert_eq!(call.chain[0].agent, "shop/planner");
    let release = message(Message::ApprovalRelease(v1::ApprovalRelease { ticket: 3 }));
    assert_eq!(
        SidecarReport::try_from(release).unwrap(),
        SidecarReport::ApprovalRelease(3)
    );
}

#[test]
fn an_unusable_approval_request_keeps_its_ticket_so_it_can_be_answered() {
    let error = SidecarReport::try_from(approval_request(9, "not-a-digest")).unwrap_err();
    assert!(
        matches!(
            &error,
            InvalidSidecarMessage::ApprovalRequest {
                ticket: 9,
                error: InvalidApprovalRequest::BadDigest(_)
            }
        ),
        "{error:?}"
    );
}

#[test]
fn approval_answers_go_out_with_their_phase() {
    use v1::approval_status::Phase;
    for (phase, wire) in [
        (AnswerPhase::Pending, Phase::Pending),
        (AnswerPhase::Granted, Phase::Granted),
        (AnswerPhase::Denied, Phase::Denied),
        (AnswerPhase::Expired, Phase::Expired),
        (AnswerPhase::Failed, Phase::Failed),
    ] {
        let answer = ApprovalAnswer {
            ticket: 4,
            name: "support-x1".into(),
            phase,
            reason: "TooLarge".into(),
            message: "no".into(),
            decided_by: "carol".into(),
            expires_at: 1_800_000_600,
        };
        let Some(controller_message::Message::Approval(status)) =
            approval_status_message(&answer).message
        else {
            panic!("not an approval status");
        };
        assert_eq!(status.phase(), wire);
        assert_eq!(
            (
                status.ticket,
                status.name.as_str(),
                status.decided_by.as_str()
            ),
            (4, "support-x1", "carol")
        );
        assert_eq!(
            (
                status.reason.as_str(),
                status.message.as_str(),
                status.expires_at
            ),
            ("TooLarge", "no", 1_800_000_600)
        );
    }
}
