//! Delegation across sidecars, in one process: planner A → worker B → billing
//! tool, each behind a real sidecar (A and B in agent mode with their inbound
//! sides, the tool's in tool mode), real rmcp servers behind them, policies from
//! a directory (standalone mode) and the key set the controller would send.
//!
//! The test plays the agent apps itself: it reads the `Chaperone-Session` a
//! sidecar handed to the app behind it and makes the app's onward calls with it.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chaperone_policy::EffectSet;
use chaperone_sidecar::assertion::{Actor, AssertionSigner, Claims, TaskContext};
use chaperone_sidecar::audit::verify_log;
use chaperone_sidecar::peer_keys::PeerKeys;
use chaperone_sidecar::settings::SidecarMode;
use chaperone_sidecar::{AuditOutput, Settings, Sidecar, standalone};
use common::*;
use serde_json::{Value, json};

fn resources(b_inbound: SocketAddr, tool_inbound: SocketAddr, jwks: &str, grant: bool) -> String {
    let mut text = format!(
        r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: planner, namespace: shop}}
spec:
  selector: {{serviceAccountName: planner}}
  toolServers:
    - {{name: worker, url: "http://{b_inbound}/mcp", agent: worker}}
  initiators:
    - issuer: https://login.example
      audience: planner
      jwks: '{jwks}'
      userClaim: email
---
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: worker, namespace: shop}}
spec:
  selector: {{serviceAccountName: worker}}
  toolServers:
    - {{name: billing, url: "http://{tool_inbound}/mcp", audience: billing-tool}}
    - {{name: helper, url: "http://127.0.0.1:9/mcp", agent: helper}}
  delegation: {{requireDelegation: true}}
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {{name: planner, namespace: shop}}
spec:
  targetRefs: [{{name: planner}}]
  tools:
    - {{server: worker, name: lookup_customer, effects: [sensitiveData]}}
  rules:
    - name: use-the-worker
      action: allow
      tools: [{{server: worker, name: "*"}}]
    - name: billing-basics
      action: allow
      tools:
        - {{server: billing, name: get_order}}
        - {{server: billing, name: send_email}}
        - {{server: helper, name: "*"}}
    - name: small-refunds
      action: allow
      tools: [{{server: billing, name: refund}}]
      when:
        args:
          - {{pointer: /amount, lessThanOrEqual: 100}}
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {{name: worker, namespace: shop}}
spec:
  targetRefs: [{{name: worker}}]
  tools:
    - {{server: billing, name: send_email, effects: [externalCommunication]}}
  rules:
    - name: no-exfiltration
      action: deny
      tools: [{{effect: externalCommunication}}]
      when:
        session:
          anyEffectSeen: [sensitiveData]
    - name: everything-on-billing
      action: allow
      tools: [{{server: billing, name: "*"}}, {{server: helper, name: "*"}}]
"#
    );
    if grant {
        text.push_str(
            r#"---
apiVersion: chaperone.dev/v1alpha1
kind: DelegationGrant
metadata: {name: planner-to-worker, namespace: shop}
spec:
  from: {name: planner}
  to: {name: worker}
  tools:
    - {server: billing, name: get_order}
    - {server: billing, name: send_email}
    - {server: billing, name: refund}
    - {server: helper, name: "*"}
  maxDepth: 0
  ttl: 1h
"#,
        );
    }
    text
}

/// One sidecar with its proxy, inbound side and audit buffer.
struct Running {
    sidecar: Sidecar,
    proxy: SocketAddr,
    audit: AuditBuffer,
}

async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn start_sidecar(
    mode: SidecarMode,
    inbound: tokio::net::TcpListener,
    app: SocketAddr,
    audiences: &[&str],
) -> Running {
    let settings = Settings {
        mode,
        inbound_upstream: Some(format!("http://{app}").parse().unwrap()),
        inbound_audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        ..Settings::default()
    };
    let audit = AuditBuffer::default();
    let sidecar = Sidecar::new(
        settings,
        AuditOutput::Writer(Box::new(audit.clone())),
        false,
    )
    .unwrap();
    let proxy = bind().await;
    let proxy_addr = proxy.local_addr().unwrap();
    let s = sidecar.clone();
    tokio::spawn(async move { s.serve_proxy(proxy, std::future::pending()).await });
    let s = sidecar.clone();
    tokio::spawn(async move { s.serve_inbound(inbound, std::future::pending()).await });
    Running {
        sidecar,
        proxy: proxy_addr,
        audit,
    }
}

fn jwk_of(signer_jwk: &Value, agent: &str) -> Value {
    let mut jwk = signer_jwk.clone();
    jwk["chaperone.dev/agent"] = json!(agent);
    jwk
}

fn load(dir: &Path, agent: &str, version: u64, sidecar: &Sidecar) {
    standalone::load(dir, Some(agent), version, sidecar.snapshots()).unwrap();
}

fn tools_call(tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args}})
    .to_string()
}

fn claims_of(assertion: &str) -> Value {
    let payload = assertion.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn error_of(raw: &Raw) -> String {
    raw.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// An Ed25519 user-token issuer: its JWKS and a way to mint tokens.
struct Issuer {
    key: jsonwebtoken::EncodingKey,
    jwks: String,
}

impl Issuer {
    fn new() -> Self {
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use aws_lc_rs::signature::KeyPair as _;
        let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "login-1", "x": x}]});
        Self {
            key: jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwks: jwks.to_string(),
        }
    }

    fn token(&self, email: &str, audience: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = json!({"iss": "https://login.example", "aud": audience, "email": email,
            "sub": "u-1", "iat": now, "exp": now + 300});
        self.sign(&claims)
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("login-1".into());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

#[tokio::test]
async fn a_task_delegated_from_planner_to_worker_to_a_verifying_tool() {
    // The apps behind the sidecars: rmcp servers recording what reached them.
    let a_app = start_upstream(true).await;
    let b_app = start_upstream(true).await;
    let tool = start_upstream(true).await;
    let (a_in, b_in, t_in) = (bind().await, bind().await, bind().await);
    let (a_in_addr, b_in_addr, t_in_addr) = (
        a_in.local_addr().unwrap(),
        b_in.local_addr().unwrap(),
        t_in.local_addr().unwrap(),
    );
    let a = start_sidecar(SidecarMode::Agent, a_in, a_app.addr, &[]).await;
    let b = start_sidecar(SidecarMode::Agent, b_in, b_app.addr, &[]).await;
    let t = start_sidecar(SidecarMode::Tool, t_in, tool.addr, &["billing-tool"]).await;

    // A rogue key the test holds, registered as the planner's (to craft
    // assertions a real planner sidecar could have sent).
    let rogue = AssertionSigner::generate().unwrap();
    let keys = json!({"keys": [
        jwk_of(&a.sidecar.key_registration().jwk, "shop/planner"),
        jwk_of(&b.sidecar.key_registration().jwk, "shop/worker"),
        jwk_of(&rogue.registration().jwk, "shop/planner"),
    ]});
    for s in [&a, &b, &t] {
        s.sidecar
            .peer_keys()
            .replace(PeerKeys::from_json(&keys.to_string()).unwrap());
    }
    let issuer = Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("all.yaml"),
        resources(b_in_addr, t_in_addr, &issuer.jwks, true),
    )
    .unwrap();
    load(dir.path(), "planner", 1, &a.sidecar);
    load(dir.path(), "worker", 1, &b.sidecar);

    // 1. Alice starts the task at the planner's inbound side with her token.
    let a_inbound = format!("http://{a_in_addr}/mcp");
    let raw = post_raw(
        &a_inbound,
        &[(
            "authorization",
            &format!("Bearer {}", issuer.token("alice@example.com", "planner")),
        )],
        tools_call("plan", json!({"goal": "refund order 7"})),
    )
    .await;
    assert!(raw.status.is_success(), "{}: {}", raw.status, raw.body);
    let a_session = a_app.seen.lock().unwrap()[0]
        .get("chaperone-session")
        .expect("the planner app gets a Chaperone-Session")
        .to_str()
        .unwrap()
        .to_owned();
    // A token of an untrusted audience is refused, not ignored.
    let raw = post_raw(
        &a_inbound,
        &[(
            "authorization",
            &format!("Bearer {}", issuer.token("alice@example.com", "elsewhere")),
        )],
        tools_call("plan", json!({})),
    )
    .await;
    assert_eq!(raw.status, http::StatusCode::UNAUTHORIZED, "{}", raw.body);
    assert!(error_of(&raw).contains("inbound/initiator"), "{}", raw.body);
    // A user named like an agent would read as that agent in onward
    // assertions: refused, with the reason.
    let raw = post_raw(
        &a_inbound,
        &[(
            "authorization",
            &format!(
                "Bearer {}",
                issuer.token("chaperone:agent:shop/worker", "planner")
            ),
        )],
        tools_call("plan", json!({})),
    )
    .await;
    assert_eq!(raw.status, http::StatusCode::UNAUTHORIZED, "{}", raw.body);
    assert!(error_of(&raw).contains("names agents"), "{}", raw.body);
    // Tokens valid only later, issued a day ahead, or living longer than the
    // sidecar's maximum (1 h) are refused, each with its reason.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let user = |extra: Value| {
        let mut claims = json!({"iss": "https://login.example", "aud": "planner",
            "email": "alice@example.com", "iat": now, "exp": now + 300});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        format!("Bearer {}", issuer.sign(&claims))
    };
    for (extra, reason) in [
        (json!({"nbf": now + 120}), "not valid yet"),
        (
            json!({"iat": now + 86_400, "exp": now + 86_400 + 300}),
            "issued in the future",
        ),
        (json!({"exp": now + 86_400}), "exceeds the maximum"),
    ] {
        let raw = post_raw(
            &a_inbound,
            &[("authorization", &user(extra))],
            tools_call("plan", json!({})),
        )
        .await;
        assert_eq!(raw.status, http::StatusCode::UNAUTHORIZED, "{}", raw.body);
        assert!(error_of(&raw).contains(reason), "{reason}: {}", raw.body);
    }

    // 2. The planner app hands work to the worker through its sidecar.
    let a_out = format!("http://{}/worker", a.proxy);
    let raw = post_raw(
        &a_out,
        &[("chaperone-session", &a_session)],
        tools_call("handle_refund", json!({"order": 7})),
    )
    .await;
    assert!(raw.status.is_success(), "{}: {}", raw.status, raw.body);
    assert!(raw.json().get("result").is_some(), "{}", raw.body);
    let b_headers = b_app.seen.lock().unwrap()[0].clone();
    let b_session = b_headers
        .get("chaperone-session")
        .expect("the worker app gets a Chaperone-Session")
        .to_str()
        .unwrap()
        .to_owned();
    let planner_assertion = b_headers
        .get("chaperone-assertion")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let planner_claims = claims_of(&planner_assertion);
    assert_eq!(planner_claims["sub"], "alice@example.com");
    assert_eq!(planner_claims["aud"], "chaperone:agent:shop/worker");
    assert_eq!(planner_claims["act"]["sub"], "chaperone:agent:shop/planner");

    // 3. Inside the delegated session the worker may do what all three allow.
    let b_out = format!("http://{}/billing", b.proxy);
    let delegated = [("chaperone-session", b_session.as_str())];
    let raw = post_raw(
        &b_out,
        &delegated,
        tools_call("get_order", json!({"id": 7})),
    )
    .await;
    assert!(raw.json().get("result").is_some(), "{}", raw.body);
    let tool_headers = tool.seen.lock().unwrap()[0].clone();
    let tool_claims = claims_of(
        tool_headers
            .get("chaperone-assertion")
            .unwrap()
            .to_str()
            .unwrap(),
    );
    assert_eq!(tool_claims["iss"], "chaperone:agent:shop/worker");
    assert_eq!(
        tool_claims["sub"], "alice@example.com",
        "the initiator reaches the tool"
    );
    assert_eq!(tool_claims["aud"], "billing-tool");
    assert_eq!(tool_claims["act"]["sub"], "chaperone:agent:shop/worker");
    assert_eq!(tool_claims["act"]["grant"], "shop/planner-to-worker");
    assert_eq!(
        tool_claims["act"]["act"]["sub"],
        "chaperone:agent:shop/planner"
    );

    // The worker's own wider authority does not apply inside the planner's
    // session: a refund of 500 is beyond what the planner may do.
    let raw = post_raw(
        &b_out,
        &delegated,
        tools_call("refund", json!({"amount": 500})),
    )
    .await;
    assert!(error_of(&raw).contains("Chaperone denied"), "{}", raw.body);
    let raw = post_raw(
        &b_out,
        &delegated,
        tools_call("refund", json!({"amount": 50})),
    )
    .await;
    assert!(raw.json().get("result").is_some(), "{}", raw.body);
    // Outside the grant's scope.
    let raw = post_raw(&b_out, &delegated, tools_call("delete_all", json!({}))).await;
    assert!(error_of(&raw).contains("\"delegation\""), "{}", raw.body);
    // Handing the task one hop further (to another agent) is beyond the
    // grant's maxDepth 0: refused at the worker's side, before it leaves.
    let helper_out = format!("http://{}/helper", b.proxy);
    let raw = post_raw(&helper_out, &delegated, tools_call("assist", json!({}))).await;
    assert!(error_of(&raw).contains("\"delegation\""), "{}", raw.body);
    assert!(
        b.audit
            .text()
            .contains("depth limit: grant shop/planner-to-worker allows 0"),
        "{}",
        b.audit.text()
    );
    // Without the session the worker has no authority of its own.
    let raw = post_raw(&b_out, &[], tools_call("get_order", json!({"id": 7}))).await;
    assert!(error_of(&raw).contains("requireDelegation"), "{}", raw.body);

    // 4. A session condition spans agents: the planner reads sensitive data,
    // after which the worker may not send e-mail in that task.
    let raw = post_raw(
        &b_out,
        &delegated,
        tools_call("send_email", json!({"to": "x"})),
    )
    .await;
    assert!(raw.json().get("result").is_some(), "{}", raw.body);
    let raw = post_raw(
        &a_out,
        &[("chaperone-session", &a_session)],
        tools_call("lookup_customer", json!({"id": 7})),
    )
    .await;
    assert!(raw.json().get("result").is_some(), "{}", raw.body);
    let raw = post_raw(
        &b_out,
        &delegated,
        tools_call("send_email", json!({"to": "x"})),
    )
    .await;
    assert!(error_of(&raw).contains("no-exfiltration"), "{}", raw.body);

    // 5. The tool accepts only calls with a valid assertion for it.
    let t_url = format!("http://{t_in_addr}/mcp");
    let raw = post_raw(&t_url, &[], tools_call("get_order", json!({"id": 7}))).await;
    assert_eq!(raw.status, http::StatusCode::FORBIDDEN, "{}", raw.body);
    assert!(
        error_of(&raw).contains("no Chaperone-Assertion"),
        "{}",
        raw.body
    );

    // 6. Bad assertions at the worker's inbound side.
    let b_inbound = format!("http://{b_in_addr}/mcp");
    let call = tools_call("handle_refund", json!({"order": 7}));
    let replay = post_raw(
        &b_inbound,
        &[("chaperone-assertion", &planner_assertion)],
        call.clone(),
    )
    .await;
    assert_eq!(replay.status, http::StatusCode::FORBIDDEN);
    assert!(
        error_of(&replay).contains("already used"),
        "{}",
        replay.body
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let args = chaperone_sidecar::canonical::args_digest(Some(&json!({"order": 7})));
    let ctx = TaskContext {
        effects: EffectSet::EMPTY,
        steps: 1,
        prev: "00".repeat(32),
    };
    let craft = |signer: &AssertionSigner, aud: &str, iat: i64, jti: &str, act: Option<&Actor>| {
        signer.sign(&Claims {
            iss: "chaperone:agent:shop/planner",
            sub: "chaperone:agent:shop/planner",
            act,
            aud,
            exp: iat + 30,
            iat,
            jti,
            sid: "crafted",
            tool: "handle_refund",
            args: &args,
            snap: 1,
            ctx: &ctx,
        })
    };
    let forger = AssertionSigner::generate().unwrap();
    let cases = [
        (
            craft(&forger, "chaperone:agent:shop/worker", now, "f1", None),
            "not a live sidecar's key",
        ),
        (
            craft(&rogue, "chaperone:agent:shop/worker", now - 120, "f2", None),
            "expired",
        ),
        (craft(&rogue, "billing-tool", now, "f3", None), "audience"),
    ];
    for (token, reason) in &cases {
        let raw = post_raw(&b_inbound, &[("chaperone-assertion", token)], call.clone()).await;
        assert_eq!(
            raw.status,
            http::StatusCode::FORBIDDEN,
            "{reason}: {}",
            raw.body
        );
        assert!(error_of(&raw).contains(reason), "{reason}: {}", raw.body);
    }
    // Depth: a chain in which the planner itself acts for someone else under a
    // grant this side does not know (or that allows no further hop).
    let deeper = Actor {
        sub: "chaperone:agent:shop/planner".into(),
        grant: Some("shop/boss-to-planner".into()),
        act: Some(Box::new(Actor {
            sub: "chaperone:agent:shop/boss".into(),
            grant: None,
            act: None,
        })),
    };
    let token = craft(
        &rogue,
        "chaperone:agent:shop/worker",
        now,
        "f4",
        Some(&deeper),
    );
    let raw = post_raw(&b_inbound, &[("chaperone-assertion", &token)], call.clone()).await;
    assert_eq!(raw.status, http::StatusCode::FORBIDDEN, "{}", raw.body);
    assert!(error_of(&raw).contains("boss-to-planner"), "{}", raw.body);
    // The same call with a good assertion and arguments that differ from the
    // signed ones is refused too (the assertion binds tool and arguments).
    let token = craft(&rogue, "chaperone:agent:shop/worker", now, "f5", None);
    let raw = post_raw(
        &b_inbound,
        &[("chaperone-assertion", &token)],
        tools_call("handle_refund", json!({"order": 8})),
    )
    .await;
    assert!(
        error_of(&raw).contains("no assertion covers"),
        "{}",
        raw.body
    );

    // 7. Revocation: without the grant the next delegated call is denied.
    std::fs::write(
        dir.path().join("all.yaml"),
        resources(b_in_addr, t_in_addr, &issuer.jwks, false),
    )
    .unwrap();
    load(dir.path(), "worker", 2, &b.sidecar);
    let raw = post_raw(
        &b_out,
        &delegated,
        tools_call("get_order", json!({"id": 7})),
    )
    .await;
    assert!(error_of(&raw).contains("\"delegation\""), "{}", raw.body);

    // 8. One verifiable trail across the three sidecars.
    let mut trail = a.audit.text();
    trail.push_str(&b.audit.text());
    trail.push_str(&t.audit.text());
    let records: Vec<Value> = trail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let worker_first = records
        .iter()
        .find(|r| r["agent"]["name"] == "worker" && r["decision"] == "allow")
        .unwrap();
    assert_eq!(
        worker_first["chain"],
        json!(["shop/planner", "shop/worker"])
    );
    assert_eq!(worker_first["initiator"], "alice@example.com");
    let linked = records.iter().any(|r| {
        r["agent"]["name"] == "planner"
            && verify_hash(r) == worker_first["prev"].as_str().unwrap_or_default()
    });
    assert!(
        linked,
        "the worker's first record links to the planner's record"
    );
    verify_log(&trail).expect("the combined trail verifies");
    let tampered = trail.replacen("handle_refund", "handle_refunx", 1);
    assert!(
        verify_log(&tampered).is_err(),
        "a tampered trail does not verify"
    );
}

fn verify_hash(record: &Value) -> String {
    let canonical = chaperone_sidecar::canonical::canonical(record);
    chaperone_sidecar::canonical::hex(&chaperone_sidecar::canonical::sha256(canonical.as_bytes()))
}
