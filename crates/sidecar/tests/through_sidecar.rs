//! Real rmcp MCP servers and clients through the sidecar.

#![allow(missing_docs)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use chaperone_sidecar::audit::verify_log;
use common::*;
use serde_json::json;

fn listed(result: &[rmcp::model::Tool]) -> Vec<String> {
    result.iter().map(|t| t.name.to_string()).collect()
}

async fn lists_only_allowed_tools_across_pages(json: bool) {
    let harness = Harness::start(json, true).await;
    let client = harness.client().await;
    let tools = client.list_all_tools().await.unwrap();
    assert_eq!(
        listed(&tools),
        vec!["get_order", "read_customer", "send_email", "refund"]
    );
    let inventory = harness.sidecar.tool_inventory().borrow().clone();
    assert_eq!(inventory.len(), 5);
    assert!(
        inventory
            .iter()
            .any(|t| t.name == "delete_all" && !t.governed)
    );
}

#[tokio::test]
async fn lists_only_allowed_tools_across_pages_json() {
    lists_only_allowed_tools_across_pages(true).await;
}

#[tokio::test]
async fn lists_only_allowed_tools_across_pages_sse() {
    lists_only_allowed_tools_across_pages(false).await;
}

async fn denies_a_tool_no_rule_allows(json: bool) {
    let harness = Harness::start(json, true).await;
    let client = harness.client().await;
    let error = call(&client, "delete_all", json!({})).await.unwrap_err();
    assert!(error.contains("no rule allows"), "{error}");
    assert!(error.contains("correlation id"), "{error}");
    assert!(!error.contains("get_order"), "{error}");
    assert!(harness.upstream.seen.lock().unwrap().is_empty());
    let records = harness.audit.records();
    let last = records.last().unwrap();
    assert_eq!(last["decision"], "deny");
    assert_eq!(last["tool"], "delete_all");
}

#[tokio::test]
async fn denies_a_tool_no_rule_allows_json() {
    denies_a_tool_no_rule_allows(true).await;
}

#[tokio::test]
async fn denies_a_tool_no_rule_allows_sse() {
    denies_a_tool_no_rule_allows(false).await;
}

#[tokio::test]
async fn forwards_allowed_calls_with_a_verifiable_assertion() {
    let harness = Harness::start(false, true).await;
    let client = harness.client().await;
    let text = call(&client, "get_order", json!({"id": "o-1"}))
        .await
        .unwrap();
    assert!(text.contains("get_order done"), "{text}");
    let seen = harness.upstream.seen.lock().unwrap().clone();
    let token = seen[0]
        .get("chaperone-assertion")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let registration = harness.sidecar.key_registration();
    let x = registration.jwk["x"].as_str().unwrap();
    let key = jsonwebtoken::DecodingKey::from_ed_components(x).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    let audience = format!("http://{}/mcp", harness.upstream.addr);
    validation.set_audience(&[audience.as_str()]);
    validation.set_issuer(&["chaperone:agent:shop/support-agent"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).unwrap();
    assert_eq!(data.header.kid.as_deref(), Some(registration.kid.as_str()));
    let claims = data.claims;
    assert_eq!(claims["tool"], "get_order");
    assert_eq!(claims["snap"], 1);
    assert_eq!(claims["sub"], "chaperone:agent:shop/support-agent");
    assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 60);
    let record = harness.audit.records().pop().unwrap();
    assert_eq!(claims["args"], record["args"]);
    assert_eq!(claims["sid"], record["session"]["chaperone"]);
    // The payload is plain base64url JSON.
    let payload = token.split('.').nth(1).unwrap();
    assert!(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .is_ok()
    );
}

#[tokio::test]
async fn strips_chaperone_headers_the_agent_sends() {
    let harness = Harness::start(false, true).await;
    let mut headers = std::collections::HashMap::new();
    headers.insert(
        http::HeaderName::from_static("chaperone-assertion"),
        http::HeaderValue::from_static("forged"),
    );
    headers.insert(
        http::HeaderName::from_static("chaperone-trace"),
        http::HeaderValue::from_static("x"),
    );
    let client = harness.client_with_headers(headers).await;
    call(&client, "get_order", json!({})).await.unwrap();
    let seen = harness.upstream.seen.lock().unwrap().clone();
    let assertions: Vec<_> = seen[0].get_all("chaperone-assertion").iter().collect();
    assert_eq!(assertions.len(), 1);
    assert_ne!(assertions[0], "forged");
    assert!(seen[0].get("chaperone-trace").is_none());
}

#[tokio::test]
async fn an_unknown_chaperone_session_is_refused_not_ignored() {
    // A made-up or expired delegated-session token must not fall back to the
    // agent's own (possibly wider) authority.
    let harness = Harness::start(true, true).await;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "get_order", "arguments": {}}});
    let raw = post_raw(
        &harness.url(),
        &[("chaperone-session", "stolen")],
        body.to_string(),
    )
    .await;
    assert_eq!(raw.status, http::StatusCode::FORBIDDEN);
    assert!(
        raw.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Chaperone-Session is unknown or expired")
    );
    assert!(harness.upstream.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn argument_rules_decide_refunds() {
    let harness = Harness::start(true, true).await;
    let client = harness.client().await;
    assert!(call(&client, "refund", json!({"amount": 50})).await.is_ok());
    let error = call(&client, "refund", json!({"amount": 500}))
        .await
        .unwrap_err();
    assert!(error.contains("no rule allows"), "{error}");
}

#[tokio::test]
async fn no_external_communication_after_sensitive_data_in_a_session() {
    let harness = Harness::start(false, true).await;
    let first = harness.client().await;
    assert!(
        call(&first, "send_email", json!({"to": "a@b"}))
            .await
            .is_ok()
    );
    assert!(
        call(&first, "read_customer", json!({"id": 1}))
            .await
            .is_ok()
    );
    let error = call(&first, "send_email", json!({"to": "a@b"}))
        .await
        .unwrap_err();
    assert!(error.contains("support/no-exfiltration"), "{error}");
    // Another session has its own history.
    let second = harness.client().await;
    assert!(
        call(&second, "send_email", json!({"to": "a@b"}))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn rate_limits_per_session() {
    let harness = Harness::start(false, true).await;
    let client = harness.client().await;
    for _ in 0..3 {
        call(&client, "refund", json!({"amount": 1})).await.unwrap();
    }
    let error = call(&client, "refund", json!({"amount": 1}))
        .await
        .unwrap_err();
    assert!(error.contains("small-refunds"), "{error}");
    let record = harness.audit.records().pop().unwrap();
    assert!(record["reason"].as_str().unwrap().contains("rate limit"));
    let other = harness.client().await;
    assert!(call(&other, "refund", json!({"amount": 1})).await.is_ok());
}

#[tokio::test]
async fn a_snapshot_update_mid_session_applies_to_the_next_call() {
    let mut harness = Harness::start(false, true).await;
    let client = harness.client().await;
    assert!(call(&client, "get_order", json!({})).await.is_ok());
    harness.write_policy(&POLICY.replace("        - name: get_order\n", ""));
    harness.reload();
    let error = call(&client, "get_order", json!({})).await.unwrap_err();
    assert!(error.contains("no rule allows"), "{error}");
    assert_eq!(harness.audit.records().pop().unwrap()["snapshot"], 2);
}

#[tokio::test]
async fn the_policy_directory_watcher_reloads_changed_files() {
    let harness = Harness::start(true, false).await;
    let watcher = tokio::spawn(chaperone_sidecar::standalone::watch(
        harness.policy_dir(),
        None,
        std::sync::Arc::clone(harness.sidecar.snapshots()),
        Duration::from_millis(50),
    ));
    let mut versions = harness.sidecar.snapshots().subscribe();
    versions.wait_for(|v| *v == Some(1)).await.unwrap();
    let client = harness.client().await;
    assert!(call(&client, "get_order", json!({})).await.is_ok());
    tokio::time::sleep(Duration::from_millis(20)).await;
    harness.write_policy(&POLICY.replace("        - name: get_order\n", ""));
    tokio::time::timeout(Duration::from_secs(5), versions.wait_for(|v| *v == Some(2)))
        .await
        .unwrap()
        .unwrap();
    assert!(call(&client, "get_order", json!({})).await.is_err());
    watcher.abort();
}

#[tokio::test]
async fn cold_start_without_a_snapshot_is_503_and_not_ready() {
    let mut harness = Harness::start(true, false).await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let response = post_raw(&harness.url(), &[], body).await;
    assert_eq!(response.status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers.get("retry-after").unwrap(), "1");
    assert_eq!(response.json()["error"]["code"], -32003);
    let ready = get_raw(&format!("http://{}/ready", harness.admin)).await;
    assert_eq!(ready.status, http::StatusCode::SERVICE_UNAVAILABLE);
    harness.reload();
    let ready = get_raw(&format!("http://{}/ready", harness.admin)).await;
    assert_eq!(ready.status, http::StatusCode::OK);
    let metrics = get_raw(&format!("http://{}/metrics", harness.admin)).await;
    assert!(metrics.body.contains("chaperone_sidecar_refused_total"));
}

#[tokio::test]
async fn refuses_oversize_bodies_with_413() {
    let settings = chaperone_sidecar::Settings {
        max_body_bytes: 512,
        ..Default::default()
    };
    let harness = Harness::start_with(true, true, settings).await;
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"get_order","arguments":{{"pad":"{}"}}}}}}"#,
        "x".repeat(1024)
    );
    let response = post_raw(&harness.url(), &[], big).await;
    assert_eq!(response.status, http::StatusCode::PAYLOAD_TOO_LARGE);
    assert!(response.json()["error"]["code"].is_i64());
    assert!(harness.upstream.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn refuses_invalid_utf8_and_invalid_json() {
    let harness = Harness::start(true, true).await;
    let response = post_raw(
        &harness.url(),
        &[],
        &b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"get_\xff\"}}"[..],
    )
    .await;
    assert_eq!(response.status, http::StatusCode::BAD_REQUEST);
    assert_eq!(response.json()["error"]["code"], -32700);
    let response = post_raw(&harness.url(), &[], "{not json").await;
    assert_eq!(response.status, http::StatusCode::BAD_REQUEST);
    assert!(harness.upstream.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn refuses_duplicate_keys_without_forwarding() {
    let harness = Harness::start(true, true).await;
    raw_initialize(&harness.url()).await;
    // The sidecar would read "get_order"; a first-key-wins upstream "delete_all".
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all","name":"get_order","arguments":{}}}"#;
    let response = post_raw(
        &harness.url(),
        &[("mcp-protocol-version", "2025-06-18")],
        body,
    )
    .await;
    assert_eq!(response.status, http::StatusCode::BAD_REQUEST);
    assert!(response.body.contains("duplicate"), "{}", response.body);
    assert!(harness.upstream.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn decides_every_call_of_a_batch_on_its_own() {
    let harness = Harness::start(true, true).await;
    raw_initialize(&harness.url()).await;
    let body = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all"}},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"refund","arguments":{"amount":1000}}}]"#;
    let response = post_raw(
        &harness.url(),
        &[("mcp-protocol-version", "2025-03-26")],
        body,
    )
    .await;
    assert_eq!(response.status, http::StatusCode::OK);
    let answers = response.json();
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0]["id"], 1);
    assert_eq!(answers[1]["id"], 2);
    assert!(answers.iter().all(|a| a["error"]["code"] == -32001));
    // A batch with one allowed call: it alone is forwarded.
    let body = r#"[{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"delete_all"}},{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"get_order","arguments":{}}}]"#;
    // rmcp's server does not take batches (2025-03-26 only): whatever it answers
    // is passed on; the decisions are what this test is about.
    post_raw(
        &harness.url(),
        &[("mcp-protocol-version", "2025-03-26")],
        body,
    )
    .await;
    let decisions: Vec<String> = harness
        .audit
        .records()
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["tool"].as_str().unwrap(),
                r["decision"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        decisions,
        vec![
            "delete_all:deny",
            "refund:deny",
            "delete_all:deny",
            "get_order:allow"
        ]
    );
}

#[tokio::test]
async fn unknown_session_ids_are_refused() {
    let harness = Harness::start(false, true).await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order"}}"#;
    let response = post_raw(&harness.url(), &[("mcp-session-id", "invented")], body).await;
    assert_eq!(response.status, http::StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn audit_records_chain_per_session_and_verify() {
    let harness = Harness::start(false, true).await;
    let a = harness.client().await;
    let b = harness.client().await;
    call(&a, "get_order", json!({})).await.unwrap();
    call(&b, "get_order", json!({})).await.unwrap();
    call(&a, "delete_all", json!({})).await.unwrap_err();
    call(&b, "read_customer", json!({"id": 2})).await.unwrap();
    let text = harness.audit.text();
    assert_eq!(
        verify_log(&text).map(|summary| (summary.records, summary.sessions)),
        Ok((4, 2))
    );
    let records = harness.audit.records();
    assert!(records[0]["prev"].is_null());
    assert!(records[2]["prev"].is_string());
    assert_eq!(records[0]["agent"]["namespace"], "shop");
    // Records are also queued for shipping.
    let mut shipped = harness.sidecar.take_audit_records().unwrap();
    assert!(shipped.try_recv().is_ok());
}

#[tokio::test]
async fn unknown_tool_servers_are_404() {
    let harness = Harness::start(true, true).await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let response = post_raw(&format!("http://{}/nope", harness.addr), &[], body).await;
    assert_eq!(response.status, http::StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn delete_ends_the_session() {
    let harness = Harness::start(false, true).await;
    let sid = raw_initialize(&harness.url()).await.unwrap();
    assert_eq!(harness.sidecar.session_count(), 1);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let request = http::Request::delete(harness.url())
        .header("mcp-session-id", sid.as_str())
        .header("mcp-protocol-version", "2025-06-18")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(harness.sidecar.session_count(), 0);
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order"}}"#;
    let response = post_raw(&harness.url(), &[("mcp-session-id", sid.as_str())], body).await;
    assert_eq!(response.status, http::StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn agents_may_speak_http2_with_prior_knowledge() {
    use http_body_util::BodyExt as _;
    let harness = Harness::start(true, true).await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let call = |tool: &str| {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": {}}});
        http::Request::post(harness.url())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap()
    };
    for (tool, allowed) in [("get_order", true), ("delete_all", false)] {
        let response = client.request(call(tool)).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value.get("result").is_some(), allowed, "{tool}: {value}");
    }
}

#[tokio::test]
async fn local_denials_survive_an_upstream_error_page() {
    // A tool server that answers every POST with an HTML error page.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let mut response = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"<html>bad gateway</html>"),
                    ));
                    *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                    response
                        .headers_mut()
                        .insert("content-type", http::HeaderValue::from_static("text/html"));
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let mut harness = Harness::start(true, false).await;
    std::fs::write(
        harness.dir.path().join("identity.yaml"),
        IDENTITY.replace("UPSTREAM_URL", &format!("http://{addr}/mcp")),
    )
    .unwrap();
    harness.reload();
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_order", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_all", "arguments": {}}},
    ]);
    let raw = post_raw(&harness.url(), &[], batch.to_string()).await;
    let answers = raw.json();
    let answers = answers.as_array().expect("a JSON-RPC batch answer");
    let by_id = |id: i64| answers.iter().find(|a| a["id"] == id).unwrap();
    assert!(
        by_id(2)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Chaperone denied"),
        "{answers:?}"
    );
    assert!(
        by_id(1)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("answered HTTP 502"),
        "{answers:?}"
    );
}
