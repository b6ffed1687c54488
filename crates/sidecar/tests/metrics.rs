//! The sidecar's `/metrics` after real MCP calls: decisions labelled by
//! server, tool, decision and rule (a tool the snapshot does not name counted
//! as `_other`), every stage of the call path timed, `chaperone_build_info`,
//! the snapshot version of a standalone sidecar (its policy directory
//! loaded before anything subscribed), and assertions signed without a nonce
//! made ahead.

#![allow(missing_docs)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chaperone_sidecar::metrics::OTHER;
use chaperone_sidecar::{AuditOutput, Listeners, Settings, Sidecar, SnapshotFeed};
use common::*;
use serde_json::json;

/// The value of the sample written exactly as `series` (name and labels).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

async fn scrape(harness: &Harness) -> String {
    get_raw(&format!("http://{}/metrics", harness.admin))
        .await
        .body
}

#[tokio::test]
async fn decisions_are_counted_by_server_tool_decision_and_rule() {
    let harness = Harness::start(true, true).await;
    let client = harness.client().await;
    call(&client, "get_order", json!({"id": "o-1"}))
        .await
        .unwrap();
    call(&client, "send_email", json!({})).await.unwrap();
    call(&client, "delete_all", json!({})).await.unwrap_err();
    let metrics = scrape(&harness).await;
    let allowed = "chaperone_sidecar_decisions_total{server=\"shop\",tool=\"get_order\",decision=\"allow\",rule=\"support/allow-support-tools\"}";
    assert_eq!(sample(&metrics, allowed), Some(1.0), "{metrics}");
    let denied = format!(
        "chaperone_sidecar_decisions_total{{server=\"shop\",tool=\"{OTHER}\",decision=\"deny\",rule=\"no rule allows\"}}"
    );
    assert_eq!(sample(&metrics, &denied), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn tools_the_snapshot_does_not_name_share_one_label_value() {
    let harness = Harness::start(true, true).await;
    let client = harness.client().await;
    for tool in ["delete_all", "drop_tables", "format_disk"] {
        call(&client, tool, json!({})).await.unwrap_err();
    }
    let metrics = scrape(&harness).await;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("chaperone_sidecar_decisions_total{"))
        .collect();
    assert_eq!(series.len(), 1, "{series:?}");
    assert!(
        series[0].contains(&format!("tool=\"{OTHER}\"")),
        "{series:?}"
    );
    assert!(series[0].ends_with(" 3"), "{series:?}");
}

#[tokio::test]
async fn assertions_signed_on_the_calls_path_are_counted_and_all_verify() {
    const UNPOOLED: &str = "chaperone_sidecar_assertions_signed_unpooled_total";
    // With no pool (0) every assertion is counted; with the default pool
    // some may be, right after start, never more than were signed.
    for (nonces, counted) in [(0, 3.0..=3.0), (1024, 0.0..=3.0)] {
        let settings = Settings {
            signing_nonces: nonces,
            ..Settings::default()
        };
        let harness = Harness::start_with(true, true, settings).await;
        let client = harness.client().await;
        for id in ["o-1", "o-2", "o-3"] {
            call(&client, "get_order", json!({"id": id})).await.unwrap();
        }
        let metrics = scrape(&harness).await;
        let count = sample(&metrics, UNPOOLED).unwrap_or(f64::NAN);
        assert!(
            counted.contains(&count),
            "{nonces} nonces: {count}: {metrics}"
        );
        let key = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            harness.sidecar.key_registration().public_key,
        );
        let seen = harness.upstream.seen.lock().unwrap().clone();
        let assertions: Vec<&str> = seen
            .iter()
            .filter_map(|headers| headers.get("chaperone-assertion")?.to_str().ok())
            .collect();
        assert_eq!(assertions.len(), 3, "{nonces} nonces");
        for token in assertions {
            let (signed, signature) = token.rsplit_once('.').unwrap();
            let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
            key.verify(signed.as_bytes(), &signature)
                .unwrap_or_else(|_| panic!("{nonces} nonces: {token} does not verify"));
        }
    }
}

#[tokio::test]
async fn every_stage_of_an_allowed_call_is_timed() {
    let harness = Harness::start(true, true).await;
    let client = harness.client().await;
    client.list_all_tools().await.unwrap();
    call(&client, "get_order", json!({"id": "o-1"}))
        .await
        .unwrap();
    let metrics = scrape(&harness).await;
    for stage in [
        "body_read",
        "parse",
        "decide",
        "sign",
        "audit",
        "upstream",
        "response_filter",
    ] {
        let count = sample(
            &metrics,
            &format!("chaperone_sidecar_stage_duration_seconds_count{{stage=\"{stage}\"}}"),
        );
        assert!(count.is_some_and(|c| c >= 1.0), "stage {stage}: {metrics}");
    }
}

#[tokio::test]
async fn build_info_names_the_version_and_component() {
    let harness = Harness::start(true, false).await;
    let metrics = scrape(&harness).await;
    let series = format!(
        "chaperone_build_info{{version=\"{}\",component=\"sidecar\"}}",
        chaperone_wire::build_info::VERSION
    );
    assert_eq!(sample(&metrics, &series), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn refusals_are_counted_by_a_fixed_reason() {
    let harness = Harness::start(true, true).await;
    let response = post_raw(&harness.url(), &[], "{not json").await;
    assert!(response.status.is_client_error(), "{}", response.status);
    let metrics = scrape(&harness).await;
    let refused: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("chaperone_sidecar_refused_total{reason="))
        .collect();
    assert_eq!(refused.len(), 1, "{metrics}");
    assert!(refused[0].ends_with(" 1"), "{refused:?}");
}

#[tokio::test]
async fn a_standalone_sidecar_reports_the_version_of_its_policy_directory() {
    // The directory the harness writes, served by a sidecar of its own that
    // loads it as the binary does (`--policy-dir`).
    let harness = Harness::start(true, false).await;
    let sidecar = Sidecar::new(
        Settings::default(),
        AuditOutput::Writer(Box::new(AuditBuffer::default())),
        false,
    )
    .unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let listeners = Listeners {
        proxy: None,
        inbound: None,
        admin,
    };
    let feed = SnapshotFeed::PolicyDir {
        dir: harness.policy_dir(),
        agent: None,
    };
    let running = sidecar.clone();
    let task = tokio::spawn(async move {
        let _ = running
            .run(
                listeners,
                feed,
                Duration::from_secs(60),
                std::future::pending(),
            )
            .await;
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let version = loop {
        let body = get_raw(&format!("http://{admin_addr}/metrics")).await.body;
        let version = sample(&body, "chaperone_sidecar_snapshot_version").unwrap_or(0.0);
        if version > 0.0 || tokio::time::Instant::now() > deadline {
            break version;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    task.abort();
    assert_eq!(version, 1.0);
}
