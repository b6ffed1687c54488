//! The audit trail of a real sidecar (rmcp client → sidecar → rmcp server):
//! one sequence across sessions, checkpoints by count, by the timer and at
//! shutdown, signed with the key the sidecar registers, and verified with it.

mod common;

use std::time::{Duration, Instant};

use chaperone_audit::{SidecarKeys, VerifyError, VerifyOptions, verify_log_signed};
use chaperone_sidecar::Settings;
use common::{Harness, call, post_raw, raw_initialize};
use serde_json::{Value, json};

const STRICT: VerifyOptions = VerifyOptions {
    strict: true,
    skip_other_lines: false,
};

fn keys_of(harness: &Harness) -> SidecarKeys {
    let jwks = json!({"keys": [harness.sidecar.key_registration().jwk]});
    SidecarKeys::from_jwks(jwks.to_string().as_bytes()).unwrap()
}

fn is_checkpoint(line: &str) -> bool {
    serde_json::from_str::<Value>(line).unwrap()["kind"] == "checkpoint"
}

#[tokio::test]
async fn the_trail_of_a_real_sidecar_proves_itself_complete() {
    let settings = Settings {
        audit_checkpoint_every: 3,
        audit_checkpoint_interval: Duration::from_millis(50),
        ..Settings::default()
    };
    let harness = Harness::start_with(false, true, settings).await;
    let keys = keys_of(&harness);

    // Two sessions, interleaved: one sequence, a checkpoint after 3 decisions.
    let a = harness.client().await;
    let b = harness.client().await;
    call(&a, "get_order", json!({})).await.unwrap();
    call(&b, "get_order", json!({})).await.unwrap();
    call(&a, "delete_all", json!({})).await.unwrap_err();
    call(&b, "read_customer", json!({"id": 2})).await.unwrap();
    call(&a, "get_order", json!({})).await.unwrap();

    let kinds: Vec<bool> = harness.audit.text().lines().map(is_checkpoint).collect();
    assert_eq!(kinds, [false, false, false, true, false, false]);

    // The timer (`maintain`) covers the last two within its interval.
    let maintained = harness.sidecar.clone();
    let maintain = tokio::spawn(async move { maintained.maintain(Duration::from_secs(1)).await });
    let started = Instant::now();
    let text = loop {
        let text = harness.audit.text();
        if text.lines().last().is_some_and(is_checkpoint) {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no timer checkpoint: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(text.lines().count(), 7);
    let summary = verify_log_signed(&text, STRICT, &keys).unwrap();
    assert_eq!((summary.records, summary.sessions), (5, 2));
    assert_eq!(summary.sidecars[0].verified, 2);
    assert_eq!(
        summary.sidecars[0].kid,
        harness.sidecar.key_registration().kid
    );
    maintain.abort();

    // Shutdown: the final checkpoint, and no decision after it: a call that
    // can no longer be audited is refused.
    let sid = raw_initialize(&harness.url()).await.unwrap();
    harness.sidecar.close_audit().unwrap();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order"}}"#;
    let headers = [
        ("mcp-session-id", sid.as_str()),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    let refused = post_raw(&harness.url(), &headers, body).await;
    assert_eq!(refused.status, http::StatusCode::SERVICE_UNAVAILABLE);
    let text = harness.audit.text();
    let summary = verify_log_signed(&text, STRICT, &keys).unwrap();
    assert_eq!((summary.records, summary.checkpoints), (5, 3));
    assert!(summary.sidecars[0].closed);

    // Each line is covered: deleting or editing any one of them is caught.
    let lines: Vec<&str> = text.lines().collect();
    for victim in 0..lines.len() {
        let mut deleted = lines.clone();
        deleted.remove(victim);
        let deleted = deleted.join("\n");
        let verified = verify_log_signed(&deleted, VerifyOptions::default(), &keys);
        if victim + 1 == lines.len() {
            // The final checkpoint is after the last one before it: without
            // it the trail is whole up to line 7, but no longer closed.
            assert!(!verified.unwrap().sidecars[0].closed);
        } else {
            assert!(verified.is_err(), "line {} deleted unnoticed", victim + 1);
        }
        let mut edited = lines.clone();
        let changed = lines[victim].replacen("\"seq\":", "\"seq\": ", 1).replacen(
            "\"time\":\"",
            "\"time\":\"1",
            1,
        );
        edited[victim] = &changed;
        assert!(
            verify_log_signed(&edited.join("\n"), VerifyOptions::default(), &keys).is_err(),
            "line {} edited unnoticed",
            victim + 1
        );
    }
    // Only the keys the sidecar registered verify it.
    let other = SidecarKeys::from_jwks(
        json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519",
            "kid": harness.sidecar.key_registration().kid,
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
        }]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    assert!(matches!(
        verify_log_signed(&text, VerifyOptions::default(), &other),
        Err(VerifyError::BadSignature { line: 4, .. })
    ));
}
