//! Requests the sidecar would read differently from a tool server are refused
//! (and audited), never forwarded: other charsets and encodings, case-colliding
//! or unknown members, ambiguous numbers, unknown methods, repeated decision
//! headers, paths that resolve elsewhere. What is forwarded is what was decided.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Harness, post_raw, raw_initialize};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A POST with exactly `headers` (no default Content-Type).
async fn post_exact(url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut request =
        http::Request::post(url).header("accept", "application/json, text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(
            request
                .body(Full::new(Bytes::copy_from_slice(body)))
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn call(name: &str, arguments: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}","arguments":{arguments}}}}}"#
    )
}

/// The number of `tools/call` requests the tool server received.
fn calls_seen(harness: &Harness) -> usize {
    calls_seen_by(&harness.upstream)
}

/// The audit records whose rule starts with `prefix`.
fn audited(harness: &Harness, prefix: &str) -> Vec<serde_json::Value> {
    harness
        .audit
        .records()
        .into_iter()
        .filter(|r| {
            r["rule"]
                .as_str()
                .is_some_and(|rule| rule.starts_with(prefix))
        })
        .collect()
}

#[tokio::test]
async fn refuses_bodies_in_other_charsets_or_encodings() {
    let harness = Harness::start(true, true).await;
    // As UTF-8 this reads as an allowed `get_order`; a server honouring UTF-7
    // decodes `+ACI-` as a quote and sees another `name`.
    let utf7 = call(
        "get_order",
        r#"{"id":"1+ACIAfQAsACI-name+ACI-:+ACI-delete_all"}"#,
    );
    for content_type in [
        "application/json; charset=utf-7",
        "application/json; charset=UTF-16",
        "application/json;charset=iso-8859-1",
        "text/plain",
    ] {
        let (status, body) = post_exact(
            &harness.url(),
            &[("content-type", content_type)],
            utf7.as_bytes(),
        )
        .await;
        assert_eq!(status, 415, "{content_type}: {body}");
        assert!(body.contains("unsupported media type"), "{body}");
    }
    let (status, _) = post_exact(&harness.url(), &[], utf7.as_bytes()).await;
    assert_eq!(status, 415, "no Content-Type");
    let (status, _) = post_exact(
        &harness.url(),
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        utf7.as_bytes(),
    )
    .await;
    assert_eq!(status, 415, "Content-Encoding");
    assert_eq!(calls_seen(&harness), 0, "nothing reached the tool server");
    let records = audited(&harness, "protocol/unsupported_media_type");
    assert_eq!(records.len(), 6, "every refusal is audited");
    assert_eq!(records[0]["decision"], "deny");
}

#[tokio::test]
async fn refuses_case_colliding_keys_at_any_depth() {
    let harness = Harness::start(true, true).await;
    for body in [
        call("refund", r#"{"amount":50,"AMOUNT":1000000}"#),
        call("get_order", r#"{"id":"1","k":1,"KELVIN":2}"#).replace("KELVIN", "\u{212a}"),
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"delete_all"}}"#.to_owned(),
        call("get_order", r#"{"q":{"name":"a","Name":"b"}}"#),
    ] {
        let response = post_raw(&harness.url(), &[], body.clone()).await;
        assert_eq!(response.status, 400, "{body}: {}", response.body);
        assert!(response.body.contains("differ only by letter case"), "{}", response.body);
    }
    assert_eq!(calls_seen(&harness), 0);
    assert_eq!(audited(&harness, "protocol/case_colliding_keys").len(), 4);
}

#[tokio::test]
async fn refuses_unknown_envelope_members_and_ambiguous_numbers() {
    let harness = Harness::start(true, true).await;
    for (body, label) in [
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","paramſ":{"name":"delete_all"}}"#.to_owned(),
            "protocol/invalid_message",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","result":{},"params":{"name":"get_order"}}"#.to_owned(),
            "protocol/invalid_message",
        ),
        (call("refund", r#"{"amount":100.000000000000001}"#), "protocol/ambiguous_number"),
        (call("refund", r#"{"amount":9007199254740993}"#), "protocol/ambiguous_number"),
        (call("refund", r#"{"amount":1e400}"#), "protocol/ambiguous_number"),
    ] {
        let response = post_raw(&harness.url(), &[], body.clone()).await;
        assert_eq!(response.status, 400, "{body}: {}", response.body);
        assert_eq!(audited(&harness, label).len(), 1, "{body}");
        harness.audit.clear();
    }
    assert_eq!(calls_seen(&harness), 0);
}

#[tokio::test]
async fn compares_numbers_as_every_reader_reads_them() {
    let harness = Harness::start(true, true).await;
    // Above 100 for every reader: denied by `lessThanOrEqual: 100`.
    let response = post_raw(
        &harness.url(),
        &[],
        call("refund", r#"{"amount":100.00000000000001}"#),
    )
    .await;
    assert_eq!(
        response.json()["error"]["data"]["rule"],
        "no rule allows",
        "{}",
        response.body
    );
    assert_eq!(calls_seen(&harness), 0);
    // Exactly 100, however written: allowed, forwarded as written.
    for amount in ["100", "100.0", "1.00E+2"] {
        let response = post_raw(
            &harness.url(),
            &[],
            call("refund", &format!(r#"{{"amount":{amount}}}"#)),
        )
        .await;
        assert!(
            response.json()["result"].is_object(),
            "{amount}: {}",
            response.body
        );
    }
    assert_eq!(calls_seen(&harness), 3, "the rate limit allows three");
}

#[tokio::test]
async fn refuses_and_audits_methods_it_does_not_know() {
    let harness = Harness::start(true, true).await;
    let body = r#"{"jsonrpc":"2.0","id":9,"method":"admin/drop_tables","params":{}}"#;
    let response = post_raw(&harness.url(), &[], body).await;
    let value = response.json();
    assert_eq!(value["id"], 9);
    assert_eq!(value["error"]["code"], -32601);
    assert!(
        value["error"]["message"]
            .as_str()
            .unwrap()
            .contains("passthroughMethods"),
        "{value}"
    );
    let records = audited(&harness, "protocol");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["method"], "admin/drop_tables");
}

#[tokio::test]
async fn forwards_methods_the_identity_lists() {
    let mut harness = Harness::start(true, false).await;
    let identity = std::fs::read_to_string(harness.policy_dir().join("identity.yaml")).unwrap();
    std::fs::write(
        harness.policy_dir().join("identity.yaml"),
        identity.replace(
            "  session:\n",
            "  passthroughMethods: [\"vendor/stats\"]\n  session:\n",
        ),
    )
    .unwrap();
    harness.reload();
    let body = r#"{"jsonrpc":"2.0","id":9,"method":"vendor/stats"}"#;
    let response = post_raw(&harness.url(), &[], body).await;
    // rmcp answers an unknown method itself: the sidecar forwarded it.
    assert_eq!(
        response.json()["error"]["code"],
        -32601,
        "{}",
        response.body
    );
    assert!(audited(&harness, "protocol").is_empty());
}

#[tokio::test]
async fn audits_malformed_calls() {
    let harness = Harness::start(true, true).await;
    let body = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":7}}"#;
    let response = post_raw(&harness.url(), &[], body).await;
    assert_eq!(response.json()["error"]["code"], -32602);
    let records = audited(&harness, "protocol");
    assert_eq!(records.len(), 1, "a malformed call is audited");
    assert_eq!(records[0]["method"], "tools/call");
    assert_eq!(calls_seen(&harness), 0);
}

#[tokio::test]
async fn refuses_repeated_session_headers_and_batched_initialize() {
    let harness = Harness::start(false, true).await;
    let sid = raw_initialize(&harness.url()).await.unwrap();
    let body = call("get_order", r#"{"id":"1"}"#);
    let response = post_raw(
        &harness.url(),
        &[("mcp-session-id", &sid), ("mcp-session-id", "other")],
        body,
    )
    .await;
    assert_eq!(response.status, 400, "{}", response.body);
    assert!(response.body.contains("repeated"));
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"x","version":"1"}}},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#;
    let response = post_raw(&harness.url(), &[("mcp-session-id", &sid)], batch).await;
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(calls_seen(&harness), 0);
}

#[tokio::test]
async fn refuses_paths_that_resolve_elsewhere() {
    let harness = Harness::start(true, true).await;
    let body = call("get_order", r#"{"id":"1"}"#);
    for suffix in ["/../admin", "/%2e%2e/admin", "/a%2fb", "/./x"] {
        let response = post_raw(&format!("{}{suffix}", harness.url()), &[], body.clone()).await;
        assert_eq!(response.status, 400, "{suffix}: {}", response.body);
    }
    assert_eq!(calls_seen(&harness), 0);
}

#[tokio::test]
async fn forwards_no_header_posing_as_the_sidecars() {
    let harness = Harness::start(true, true).await;
    let body = call("get_order", r#"{"id":"1"}"#);
    let response = post_raw(
        &harness.url(),
        &[
            ("chaperone_assertion", "forged"),
            ("chaperone-assertion", "forged"),
            ("accept-encoding", "gzip"),
        ],
        body,
    )
    .await;
    assert!(response.json()["result"].is_object(), "{}", response.body);
    let seen = harness.upstream.seen.lock().unwrap();
    let headers = &seen[0];
    assert!(headers.get("chaperone_assertion").is_none());
    assert_ne!(headers.get("chaperone-assertion").unwrap(), "forged");
    assert_eq!(headers.get("accept-encoding").unwrap(), "identity");
    assert_eq!(headers.get("content-type").unwrap(), "application/json");
}

#[tokio::test]
async fn a_tool_mode_sidecar_reads_what_its_tool_reads() {
    use chaperone_sidecar::{AuditOutput, Settings, Sidecar, SidecarMode};
    let tool = common::start_upstream(true).await;
    let audit = common::AuditBuffer::default();
    let settings = Settings {
        mode: SidecarMode::Tool,
        inbound_upstream: Some(format!("http://{}", tool.addr).parse().unwrap()),
        inbound_audiences: vec!["billing-tool".to_owned()],
        ..Settings::default()
    };
    let sidecar = Sidecar::new(
        settings,
        AuditOutput::Writer(Box::new(audit.clone())),
        false,
    )
    .unwrap();
    let inbound = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", inbound.local_addr().unwrap());
    tokio::spawn(async move { sidecar.serve_inbound(inbound, std::future::pending()).await });

    // A `ping` in UTF-8 needs no assertion; in UTF-7 it hides a call.
    let ping =
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","x":"+ACIALAAi-method+ACI-:+ACI-tools/call"}"#;
    let (status, body) = post_exact(
        &url,
        &[("content-type", "application/json; charset=utf-7")],
        ping.as_bytes(),
    )
    .await;
    assert_eq!(status, 415, "{body}");
    let unknown =
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/execute","params":{"name":"delete_all"}}"#;
    let (status, body) = post_exact(
        &url,
        &[("content-type", "application/json")],
        unknown.as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("passthroughMethods"), "{body}");
    let call = call("delete_all", "{}");
    let (status, body) = post_exact(
        &url,
        &[("content-type", "application/json")],
        call.as_bytes(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(calls_seen_by(&tool), 0, "nothing reached the tool");
    let records = audit.records();
    assert_eq!(records.len(), 3, "every refusal audited: {records:#?}");
}

fn calls_seen_by(upstream: &common::Upstream) -> usize {
    upstream.seen.lock().unwrap().len()
}
