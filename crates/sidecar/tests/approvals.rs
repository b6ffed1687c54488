//! Calls a `requireApproval` rule matched, held through a real sidecar whose
//! controller stream runs against a fake controller that scripts the
//! decisions: granted calls are forwarded once (and recorded), denied ones
//! never reach the tool server, pending ones are refused with the object to
//! approve and released, and nothing is asked without a stream, in a batch,
//! or in dry-run mode.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chaperone_sidecar::canonical::args_digest;
use chaperone_sidecar::{Settings, SnapshotStream};
use common::controller::{Decision, FakeController, short_backoff};
use common::{Harness, IDENTITY, post_raw};
use serde_json::{Value, json};

/// Refunds up to 1,000 are allowed, but those above 100 need a person's
/// approval, and the approver must not see the card number.
const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata:
  name: refunds
  namespace: shop
spec:
  targetRefs:
    - name: support-agent
  rules:
    - name: allow-refunds
      action: allow
      tools:
        - name: refund
      when:
        args:
          - pointer: /amount
            lessThanOrEqual: 1000
    - name: approve-mid-refunds
      action: requireApproval
      tools:
        - name: refund
      when:
        args:
          - pointer: /amount
            greaterThan: 100
      approval:
        timeoutSeconds: 120
        validForSeconds: 60
        redactArguments: [/card/number]
    - name: allow-orders
      action: allow
      tools:
        - name: get_order
"#;

/// The rule that asks, as audit records and errors name it.
const RULE: &str = "refunds/approve-mid-refunds";

fn refund(amount: u32) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "refund",
            "arguments": {"amount": amount, "card": {"number": "4111111111111111"}, "order": "o-1"}
        }
    })
}

fn get_order() -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": 8,
        "method": "tools/call",
        "params": {"name": "get_order", "arguments": {"id": "o-1"}}
    })
}

/// A sidecar holding calls for `hold`, without a controller stream.
async fn sidecar(hold: Duration) -> Harness {
    let settings = Settings {
        approval_hold: hold,
        ..Settings::default()
    };
    let mut harness = Harness::start_with(true, false, settings).await;
    harness.write_policy(POLICY);
    harness.reload();
    harness
}

/// A sidecar holding calls for `hold`, connected to a fake controller.
async fn connected(hold: Duration) -> (Harness, FakeController) {
    let harness = sidecar(hold).await;
    let controller = FakeController::start().await;
    let stream = SnapshotStream::new(harness.sidecar.clone(), controller.settings())
        .with_backoff(short_backoff());
    tokio::spawn(stream.run());
    controller.wait_for_connection(&harness.sidecar).await;
    (harness, controller)
}

async fn post(harness: &Harness, body: &Value) -> Value {
    let response = post_raw(&harness.url(), &[], body.to_string()).await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

/// The tool calls the tool server received.
fn calls_seen(harness: &Harness) -> usize {
    harness.upstream.seen.lock().unwrap().len()
}

/// The claims of the assertion the tool server received with call `index`.
fn assertion_claims(harness: &Harness, index: usize) -> Value {
    let seen = harness.upstream.seen.lock().unwrap();
    let assertion = seen[index]["chaperone-assertion"].to_str().unwrap();
    let payload = assertion.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// The audit records of `tool`.
fn audited(harness: &Harness, tool: &str) -> Vec<Value> {
    harness
        .audit
        .records()
        .into_iter()
        .filter(|r| r["tool"] == tool)
        .collect()
}

fn approvals_counted(harness: &Harness, outcome: &str) -> bool {
    harness.sidecar.metrics().encode().contains(&format!(
        "chaperone_sidecar_approvals_total{{outcome=\"{outcome}\"}} 1"
    ))
}

#[tokio::test]
async fn a_granted_call_is_forwarded_once_and_recorded_in_the_session() {
    let (harness, controller) = connected(Duration::from_secs(5)).await;
    controller.decide_every_request(Decision::Approve("bob"));

    let answer = post(&harness, &refund(500)).await;
    assert!(answer.get("error").is_none(), "{answer}");
    assert!(
        answer["result"].to_string().contains("refund done"),
        "{answer}"
    );
    assert_eq!(calls_seen(&harness), 1, "forwarded exactly once");
    assert_eq!(controller.requests().len(), 1);

    let records = audited(&harness, "refund");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["decision"], "allow");
    assert_eq!(records[0]["rule"], RULE);
    assert_eq!(records[0]["reason"], "a person approved this call");
    assert_eq!(
        records[0]["approval"],
        json!({"decidedBy": "bob", "name": "agent-1", "phase": "Granted"})
    );
    assert!(approvals_counted(&harness, "granted"));

    // The approved call counts in the session: the next call is its second.
    post(&harness, &get_order()).await;
    assert_eq!(assertion_claims(&harness, 0)["ctx"]["steps"], 1);
    assert_eq!(assertion_claims(&harness, 1)["ctx"]["steps"], 2);
}

#[tokio::test]
async fn a_denied_call_never_reaches_the_tool_server() {
    let (harness, controller) = connected(Duration::from_secs(5)).await;
    controller.decide_every_request(Decision::Deny(
        "carol",
        "TooRisky",
        "refunds over 100 need a support ticket",
    ));

    let answer = post(&harness, &refund(500)).await;
    let error = &answer["error"];
    assert_eq!(error["code"], -32001, "{answer}");
    let message = error["message"].as_str().unwrap();
    for part in [
        "agent-1",
        "denied by carol",
        "refunds over 100 need a support ticket",
        "TooRisky",
        RULE,
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    assert_eq!(error["data"]["approval"], "agent-1");
    assert_eq!(error["data"]["phase"], "Denied");
    assert_eq!(error["data"]["decidedBy"], "carol");
    assert_eq!(error["data"]["rule"], RULE);
    assert_eq!(calls_seen(&harness), 0, "the tool server never saw it");

    let records = audited(&harness, "refund");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["decision"], "approval");
    assert_eq!(
        records[0]["approval"],
        json!({"decidedBy": "carol", "name": "agent-1", "phase": "Denied"})
    );
    assert_eq!(records[0]["correlation"], error["data"]["correlationId"]);
    assert!(approvals_counted(&harness, "denied"));
}

#[tokio::test]
async fn an_expired_approval_refuses_the_call() {
    let (harness, controller) = connected(Duration::from_secs(5)).await;
    controller.decide_every_request(Decision::Expire);
    let answer = post(&harness, &refund(500)).await;
    assert_eq!(answer["error"]["data"]["phase"], "Expired", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("approval agent-1 expired"),
        "{answer}"
    );
    assert_eq!(calls_seen(&harness), 0);
}

#[tokio::test]
async fn a_call_still_pending_at_the_end_of_the_hold_is_refused_and_released() {
    let (harness, controller) = connected(Duration::from_millis(300)).await;

    let answer = post(&harness, &refund(500)).await;
    let error = &answer["error"];
    assert_eq!(error["code"], -32004, "{answer}");
    let message = error["message"].as_str().unwrap();
    for part in [
        "ToolCallApproval agent-1 in namespace shop is pending",
        "Retry the same call",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    assert_eq!(error["data"]["approval"], "agent-1");
    assert_eq!(error["data"]["phase"], "Pending");
    assert_eq!(calls_seen(&harness), 0);

    let ticket = controller.requests()[0].ticket;
    controller
        .wait_for("the release", |c| c.releases() == [ticket])
        .await;
    assert_eq!(harness.sidecar.approvals().waiting(), 0);
    let records = audited(&harness, "refund");
    assert_eq!(records[0]["decision"], "approval");
    assert_eq!(
        records[0]["approval"],
        json!({"name": "agent-1", "phase": "Pending"})
    );
    assert!(approvals_counted(&harness, "pending"));
}

#[tokio::test]
async fn a_retry_after_the_approval_is_granted_and_the_next_one_waits_again() {
    let (harness, controller) = connected(Duration::from_millis(300)).await;
    let first = post(&harness, &refund(500)).await;
    assert_eq!(first["error"]["data"]["phase"], "Pending", "{first}");

    controller.decide("agent-1", Decision::Approve("bob"));
    let retry = post(&harness, &refund(500)).await;
    assert!(retry.get("error").is_none(), "{retry}");
    assert_eq!(calls_seen(&harness), 1);
    let requests = controller.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].args_digest, requests[1].args_digest);
    assert_eq!(requests[0].scope_key, requests[1].scope_key);

    // An approval covers one call: the same call again asks anew.
    let again = post(&harness, &refund(500)).await;
    assert_eq!(again["error"]["data"]["approval"], "agent-2", "{again}");
    assert_eq!(calls_seen(&harness), 1);
}

#[tokio::test]
async fn arguments_are_redacted_in_the_request_and_the_digest_covers_them_all() {
    let (harness, controller) = connected(Duration::from_secs(5)).await;
    controller.decide_every_request(Decision::Approve("bob"));
    let call = refund(500);
    post(&harness, &call).await;

    let request = controller.requests().remove(0);
    let shown: Value = serde_json::from_str(&request.arguments_json).unwrap();
    assert_eq!(
        shown,
        json!({"amount": 500, "card": {"number": "[redacted]"}, "order": "o-1"})
    );
    assert!(!request.arguments_json.contains("4111"));
    assert_eq!(request.redacted, ["/card/number"]);
    let unredacted = &call["params"]["arguments"];
    let digest = args_digest(Some(unredacted));
    assert_eq!(format!("sha256:{}", request.args_digest), digest);
    assert_eq!(assertion_claims(&harness, 0)["args"], digest.as_str());
    assert_eq!(
        (
            request.policy_namespace.as_str(),
            request.policy.as_str(),
            request.rule.as_str(),
        ),
        ("shop", "refunds", "approve-mid-refunds")
    );
    assert_eq!(
        (request.server.as_str(), request.tool.as_str()),
        ("shop", "refund")
    );
    assert_eq!(request.scope, "agent");
    assert!(!request.scope_key.is_empty());
    assert_eq!(
        (request.timeout_seconds, request.valid_for_seconds),
        (120, 60)
    );
    assert!(request.chain.is_empty() && request.initiator.is_empty());
}

#[tokio::test]
async fn without_a_controller_stream_the_call_is_refused() {
    let harness = sidecar(Duration::from_secs(5)).await;
    let answer = post(&harness, &refund(500)).await;
    let error = &answer["error"];
    assert_eq!(error["code"], -32001, "{answer}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("no connection to the controller"),
        "{answer}"
    );
    assert!(error["data"].get("approval").is_none(), "{answer}");
    assert_eq!(calls_seen(&harness), 0);
    let records = audited(&harness, "refund");
    assert_eq!(records[0]["decision"], "approval");
    assert!(records[0].get("approval").is_none());
    assert!(approvals_counted(&harness, "unavailable"));
    // Calls no rule holds go through as ever.
    let small = post(&harness, &refund(50)).await;
    assert!(small.get("error").is_none(), "{small}");
}

#[tokio::test]
async fn a_call_needing_approval_in_a_batch_is_refused() {
    let (harness, controller) = connected(Duration::from_secs(5)).await;
    controller.decide_every_request(Decision::Approve("bob"));
    // Even a batch of one: only a message sent alone can be held.
    let answer = post(&harness, &json!([refund(500)])).await;
    let refused = &answer[0];
    assert_eq!(refused["id"], 7, "{answer}");
    assert_eq!(refused["error"]["code"], -32001);
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("send it alone"),
        "{refused}"
    );
    // With other members, the rest goes on (the test server answers
    // batches with HTTP 415, which the sidecar reports for them).
    let answer = post(&harness, &json!([refund(500), get_order()])).await;
    let answers = answer.as_array().unwrap();
    assert_eq!(answers.len(), 2, "{answer}");
    let refused = answers.iter().find(|a| a["id"] == 7).unwrap();
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("send it alone"),
        "{refused}"
    );
    assert_eq!(calls_seen(&harness), 0);
    let records = audited(&harness, "refund");
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["decision"] == "approval"));
    assert!(controller.requests().is_empty(), "nobody was asked");
}

#[tokio::test]
async fn dry_run_forwards_without_asking_and_audits_would_require_approval() {
    let (mut harness, controller) = connected(Duration::from_secs(5)).await;
    let url = format!("http://{}/mcp", harness.upstream.addr);
    let identity = IDENTITY
        .replace("UPSTREAM_URL", &url)
        .replace("  session:", "  mode: dryRun\n  session:");
    std::fs::write(harness.policy_dir().join("identity.yaml"), identity).unwrap();
    harness.reload();

    let answer = post(&harness, &refund(500)).await;
    assert!(answer.get("error").is_none(), "{answer}");
    assert_eq!(calls_seen(&harness), 1);
    assert!(controller.requests().is_empty(), "nobody was asked");
    let records = audited(&harness, "refund");
    assert_eq!(records[0]["decision"], "wouldRequireApproval");
    assert_eq!(records[0]["rule"], RULE);
    assert!(records[0].get("approval").is_none());
}
