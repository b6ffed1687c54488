//! Delegation end to end on a real API server: user → planner → worker → a
//! verifying tool, with the in-process controller.
//!
//! ```text
//!  user token (test issuer, JWKS served here)
//!      │
//!      ▼ A's inbound ─► planner app ─► A's sidecar ─► B's inbound ─► worker app ─► B's sidecar ─► billing tool sidecar (tool mode) ─► billing
//!        (initiator)    (WorkerApp)    (15001)        (grant A→B)    (WorkerApp)    (15001) ├──► mail (direct)
//!                                                                                        └──► C's inbound (helper: refused at B's side while the grant A→B has maxDepth 0)
//! ```
//!
//! The controller runs in-process; the planner (A), the worker (B) and the
//! helper (C) each run a real sidecar (library API) in controller mode with a
//! pod-bound ServiceAccount token, in front of a `chaperone_demo::WorkerApp`
//! whose tools call through the agent's own sidecar with the
//! `Chaperone-Session` it was handed. The billing tool server sits behind a
//! tool-mode sidecar whose pod is annotated `chaperone.dev/inject: tool`: the
//! controller streams it the agent sidecars' keys (no snapshot), and its
//! denials become Events on its pod.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chaperone_api::{AgentIdentity, DelegationGrant, ToolPolicy};
use chaperone_demo::{SeenAssertions, ToolServer, ToolSet, WorkerApp};
use chaperone_sidecar::{Settings, SidecarMode};
use chaperone_testenv::{
    ControlPlane, create_namespace,
    kube_fixtures::{self, agent_identity, agent_subject, delegation_grant, tool_policy},
    mcp_fixtures::{
        McpClient, assert_tampering_detected, call, claims_of, jwks_of, last_assertion,
        loopback_listener, mcp_session, object, serve_mcp, verify_strict,
    },
    sidecar_fixtures::{
        TestSidecar, controller_settings, eventually, http_request_async, json_post, status_code,
        write_token,
    },
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::DeleteParams};
use serde_json::{Value, json};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------
// The controller: one per test binary, on its own thread and runtime.

fn controller() -> &'static kube_fixtures::InProcessController {
    static CONTROLLER: OnceLock<kube_fixtures::InProcessController> = OnceLock::new();
    CONTROLLER.get_or_init(|| {
        kube_fixtures::start_controller(
            ControlPlane::shared(),
            &format!("delegation-test-controller-{}", std::process::id()),
        )
    })
}

// ---------------------------------------------------------------------------
// The initiator issuer: an Ed25519 key, its JWKS served over HTTP, user tokens.

const ISSUER: &str = "https://idp.chaperone.test";
const USER_AUDIENCE: &str = "planner-frontend";
const USER_KID: &str = "idp-key-1";

struct Issuer {
    key: EncodingKey,
    jwks_port: u16,
}

/// An Ed25519 key pair: its PKCS#8 DER and raw public key.
fn ed25519() -> Result<(Vec<u8>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    Ok((key.serialize_der(), key.public_key_raw().to_vec()))
}

impl Issuer {
    async fn start() -> Result<Self> {
        let (der, public) = ed25519()?;
        let jwks = json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
            "kid": USER_KID, "x": URL_SAFE_NO_PAD.encode(public),
        }]})
        .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let jwks_port = listener.local_addr()?.port();
        tokio::spawn(serve_static_json(listener, jwks));
        Ok(Self {
            key: EncodingKey::from_ed_der(&der),
            jwks_port,
        })
    }

    fn jwks_url(&self) -> String {
        format!("http://127.0.0.1:{}/jwks.json", self.jwks_port)
    }

    /// A token naming `user`, valid for ten minutes.
    fn token(&self, user: &str) -> Result<String> {
        sign_user_token(&self.key, user)
    }
}

fn sign_user_token(key: &EncodingKey, user: &str) -> Result<String> {
    let now = unix_now();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(USER_KID.into());
    let claims = json!({
        "iss": ISSUER, "aud": USER_AUDIENCE, "sub": user,
        "iat": now, "exp": now + 600, "jti": chaperone_testenv::unique_suffix(),
    });
    Ok(jsonwebtoken::encode(&header, &claims, key)?)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Answers every HTTP request on `listener` with `body` (JSON).
async fn serve_static_json(listener: TcpListener, body: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut stream, _)) = listener.accept().await {
        let body = body.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

// ---------------------------------------------------------------------------
// MCP servers and clients.

/// A user's MCP session with the planner's inbound side, authenticated with
/// `token`.
async fn user_session(inbound: u16, token: &str) -> Result<McpClient> {
    mcp_session(&format!("http://127.0.0.1:{inbound}/mcp"), Some(token)).await
}

/// The planner app's call that has the worker call `server`/`tool`.
async fn via_worker(
    user: &McpClient,
    server: &str,
    tool: &str,
    arguments: Value,
) -> Result<String, String> {
    call(
        user,
        "run_worker",
        json!({"tool": format!("run_{server}"), "arguments": {"tool": tool, "arguments": arguments}}),
    )
    .await
}

// ---------------------------------------------------------------------------
// The cluster objects.

const TOOL_AUDIENCE: &str = "billing.tools.chaperone.test";

/// The mail tools' effects, the same in both agents' policies.
fn mail_effects() -> Value {
    json!([
        { "server": "mail", "name": "read_inbox", "effects": ["sensitiveData"] },
        { "server": "mail", "name": "send_email", "effects": ["externalCommunication"] },
    ])
}

/// What the planner hands the worker: invoice reads, credits up to 200, mail,
/// and the helper's tools; `max_depth` further hops.
fn planner_grant(max_depth: u32) -> Value {
    delegation_grant(
        "planner-to-worker",
        json!({
            "from": { "name": "planner" }, "to": { "name": "worker" },
            "tools": [
                { "server": "billing", "name": "get_invoice" },
                { "server": "billing", "name": "issue_credit" },
                { "server": "mail", "name": "send_email" },
                { "server": "helper", "name": "*" },
            ],
            "when": { "expression": "tool != 'issue_credit' || args.amount <= 200" },
            "maxDepth": max_depth,
            "ttl": "1h",
        }),
    )
}

/// Everything the test needs running.
struct World {
    ns: String,
    planner: TestSidecar,
    worker: TestSidecar,
    helper: TestSidecar,
    tool: TestSidecar,
    billing_seen: SeenAssertions,
    probe_seen: SeenAssertions,
    issuer: Issuer,
    _token_dir: tempfile::TempDir,
}

/// A sidecar in controller mode for `pod` (its token in `dir/<pod>/token`)
/// with `settings`.
async fn controller_mode_sidecar(
    client: &Client,
    pod: &Pod,
    dir: &std::path::Path,
    settings: Settings,
) -> Result<TestSidecar> {
    let token = kube_fixtures::bound_token(client, pod, kube_fixtures::SIDECAR_AUDIENCE).await?;
    let name = pod.metadata.name.clone().context("pod name")?;
    let dir = dir.join(&name);
    std::fs::create_dir_all(&dir)?;
    let token_file = write_token(&dir, &token)?;
    let ca_file = tokio::task::spawn_blocking(|| controller().ca_file.clone()).await?;
    let address = format!("127.0.0.1:{}", controller().grpc_port);
    TestSidecar::start(Settings {
        pod_name: name,
        pod_namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        controller: Some(controller_settings(address, &token_file, ca_file)),
        ..settings
    })
    .await
}

/// The sidecar of agent pod `<sa>-0` (ServiceAccount `sa`), in front of the
/// agent's app on port `app`.
async fn agent_sidecar(
    client: &Client,
    ns: &str,
    sa: &str,
    dir: &std::path::Path,
    app: u16,
) -> Result<TestSidecar> {
    kube_fixtures::ensure_service_account(client, ns, sa).await?;
    let pod = kube_fixtures::create_agent_pod(client, ns, sa, &format!("{sa}-0")).await?;
    let settings = Settings {
        inbound_upstream: Some(format!("http://127.0.0.1:{app}").parse()?),
        ..Settings::default()
    };
    controller_mode_sidecar(client, &pod, dir, settings).await
}

async fn setup() -> Result<(Client, World)> {
    tokio::task::spawn_blocking(controller).await?;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "deleg").await?;
    let token_dir = tempfile::tempdir()?;
    let issuer = Issuer::start().await?;

    // Tool servers: billing (behind a tool-mode sidecar), mail (direct), and a
    // probe that records the assertions the planner's sidecar mints.
    let billing_seen = SeenAssertions::default();
    let billing = serve_mcp(
        loopback_listener().await?,
        ToolServer::new(ToolSet::Billing).recording(Arc::clone(&billing_seen)),
    )
    .await?;
    let mail = serve_mcp(loopback_listener().await?, ToolServer::new(ToolSet::Mail)).await?;
    let probe_seen = SeenAssertions::default();
    let probe = serve_mcp(
        loopback_listener().await?,
        ToolServer::new(ToolSet::Billing).recording(Arc::clone(&probe_seen)),
    )
    .await?;

    // The tool's pod is annotated for a tool-mode sidecar: the controller
    // streams it the agent sidecars' keys, no snapshot.
    let dir = token_dir.path();
    kube_fixtures::ensure_service_account(&client, &ns, "billing").await?;
    let tool_pod = kube_fixtures::create_tool_pod(&client, &ns, "billing", "billing-0").await?;
    let tool_settings = Settings {
        mode: SidecarMode::Tool,
        inbound_upstream: Some(format!("http://127.0.0.1:{billing}").parse()?),
        inbound_audiences: vec![TOOL_AUDIENCE.into()],
        ..Settings::default()
    };
    let tool = controller_mode_sidecar(&client, &tool_pod, dir, tool_settings).await?;

    // The agents' apps listen first: their sidecars need the ports, and the
    // apps need their sidecars' proxy ports.
    let (planner_app, worker_app, helper_app) = (
        loopback_listener().await?,
        loopback_listener().await?,
        loopback_listener().await?,
    );
    let helper =
        agent_sidecar(&client, &ns, "helper", dir, helper_app.local_addr()?.port()).await?;
    let worker =
        agent_sidecar(&client, &ns, "worker", dir, worker_app.local_addr()?.port()).await?;
    let planner = agent_sidecar(
        &client,
        &ns,
        "planner",
        dir,
        planner_app.local_addr()?.port(),
    )
    .await?;
    let proxy = |s: &TestSidecar| format!("http://127.0.0.1:{}", s.proxy_port);
    serve_mcp(
        planner_app,
        WorkerApp::new(proxy(&planner), ["worker".into(), "mail".into()]),
    )
    .await?;
    serve_mcp(
        worker_app,
        WorkerApp::new(
            proxy(&worker),
            ["billing".into(), "mail".into(), "helper".into()],
        ),
    )
    .await?;
    serve_mcp(
        helper_app,
        WorkerApp::new(proxy(&helper), ["billing".into()]),
    )
    .await?;

    let url = |port: u16| format!("http://127.0.0.1:{port}/mcp");
    let tool_url = url(tool.inbound()?);
    // Policies and grants first, identities last: the first snapshots are whole.
    kube_fixtures::apply::<ToolPolicy>(&client, &ns, tool_policy("planner", json!({
        "targetRefs": [{ "name": "planner" }],
        "tools": mail_effects(),
        "rules": [
            { "name": "allow-worker", "action": "allow", "tools": [{ "server": "worker", "name": "*" }] },
            { "name": "allow-probes", "action": "allow", "tools": [{ "server": "probe", "name": "*" }, { "server": "probe-aud", "name": "*" }] },
            { "name": "allow-mail", "action": "allow", "tools": [{ "server": "mail", "name": "*" }] },
            { "name": "allow-helper", "action": "allow", "tools": [{ "server": "helper", "name": "*" }] },
            { "name": "allow-invoice-reads", "action": "allow", "tools": [{ "server": "billing", "name": "get_invoice" }] },
            { "name": "allow-credits-up-to-500", "action": "allow", "tools": [{ "server": "billing", "name": "issue_credit" }],
              "when": { "args": [{ "pointer": "/amount", "lessThanOrEqual": 500 }] } },
        ]
    }))).await?;
    kube_fixtures::apply::<ToolPolicy>(&client, &ns, tool_policy("worker", json!({
        "targetRefs": [{ "name": "worker" }],
        "tools": mail_effects(),
        "rules": [
            // Wider than anything the planner hands over: voiding included.
            { "name": "allow-billing", "action": "allow", "tools": [{ "server": "billing", "name": "get_invoice" }, { "server": "billing", "name": "void_invoice" }] },
            { "name": "allow-credits", "action": "allow", "tools": [{ "server": "billing", "name": "issue_credit" }],
              "when": { "args": [{ "pointer": "/amount", "lessThanOrEqual": 1000 }] } },
            { "name": "allow-mail", "action": "allow", "tools": [{ "server": "mail", "name": "send_email" }] },
            { "name": "allow-helper", "action": "allow", "tools": [{ "server": "helper", "name": "*" }] },
            { "name": "no-external-after-sensitive", "action": "deny", "tools": [{ "effect": "externalCommunication" }],
              "when": { "session": { "anyEffectSeen": ["sensitiveData"] } } },
        ]
    }))).await?;
    kube_fixtures::apply::<ToolPolicy>(&client, &ns, tool_policy("helper", json!({
        "targetRefs": [{ "name": "helper" }],
        "rules": [{ "name": "allow-billing", "action": "allow", "tools": [{ "server": "billing", "name": "*" }] }]
    }))).await?;
    kube_fixtures::apply::<DelegationGrant>(&client, &ns, planner_grant(0)).await?;
    kube_fixtures::apply::<DelegationGrant>(
        &client,
        &ns,
        delegation_grant(
            "worker-to-helper",
            json!({
                "from": { "name": "worker" }, "to": { "name": "helper" },
                "tools": [{ "server": "billing", "name": "*" }],
                "maxDepth": 0,
                "ttl": "1h",
            }),
        ),
    )
    .await?;
    kube_fixtures::apply::<AgentIdentity>(
        &client,
        &ns,
        agent_identity(
            "helper",
            json!({
                "selector": { "serviceAccountName": "helper" },
                "toolServers": [{ "name": "billing", "url": tool_url, "audience": TOOL_AUDIENCE }],
                "delegation": { "requireDelegation": true },
            }),
        ),
    )
    .await?;
    kube_fixtures::apply::<AgentIdentity>(
        &client,
        &ns,
        agent_identity(
            "worker",
            json!({
                "selector": { "serviceAccountName": "worker" },
                "toolServers": [
                    { "name": "billing", "url": tool_url, "audience": TOOL_AUDIENCE },
                    { "name": "mail", "url": url(mail) },
                    { "name": "helper", "url": url(helper.inbound()?), "agent": "helper" },
                ],
                "delegation": { "requireDelegation": true },
            }),
        ),
    )
    .await?;
    kube_fixtures::apply::<AgentIdentity>(&client, &ns, agent_identity("planner", json!({
        "selector": { "serviceAccountName": "planner" },
        "toolServers": [
            { "name": "worker", "url": url(worker.inbound()?), "agent": "worker" },
            { "name": "mail", "url": url(mail) },
            // The probes record what the planner's sidecar sends to the worker.
            { "name": "probe", "url": url(probe), "agent": "worker" },
            { "name": "probe-aud", "url": url(probe), "audience": agent_subject(&format!("{ns}/someone-else")) },
        ],
        // Short-lived assertions: the expiry check below waits them out.
        "assertion": { "lifetimeSeconds": 1 },
        "initiators": [{ "issuer": ISSUER, "audience": USER_AUDIENCE, "jwksUrl": issuer.jwks_url() }],
    }))).await?;

    // Every agent has a snapshot with its grants, every sidecar knows the
    // others' keys.
    for (sidecar, grants) in [(&planner, 0), (&worker, 1), (&helper, 1)] {
        let source = Arc::clone(sidecar.sidecar.snapshots());
        eventually(Duration::from_secs(20), async || {
            Ok(source
                .current()
                .filter(|a| a.snapshot.content.grants_received.len() >= grants)
                .map(|_| ()))
        })
        .await
        .with_context(|| format!("snapshot of {}", sidecar.sidecar.pod_name()))?;
    }
    for (holder, of) in [
        (&worker, &planner),
        (&helper, &worker),
        (&tool, &worker),
        (&tool, &helper),
    ] {
        holder.wait_for_key_of(of).await?;
    }
    Ok((
        client,
        World {
            ns,
            planner,
            worker,
            helper,
            tool,
            billing_seen,
            probe_seen,
            issuer,
            _token_dir: token_dir,
        },
    ))
}

// ---------------------------------------------------------------------------
// Raw assertions at the worker's inbound side.

/// Sends `tools/call` of `tool` with `arguments` to the worker's inbound side
/// with `assertion`; returns the raw response.
async fn raw_call(inbound: u16, assertion: &str, tool: &str, arguments: &Value) -> String {
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": { "name": tool, "arguments": arguments },
    })
    .to_string();
    http_request_async(
        inbound,
        json_post("/mcp", &[("chaperone-assertion", assertion)], &body),
    )
    .await
}

/// Has the planner's sidecar mint an assertion (in its own session) by calling
/// `server` (a probe) with `run_billing`; returns the assertion the probe got.
async fn mint_assertion(world: &World, server: &str, arguments: &Value) -> Result<String> {
    let before = world.probe_seen.lock().unwrap().len();
    let proxy = format!("http://127.0.0.1:{}", world.planner.proxy_port);
    // The probe has no tool of that name: the call fails after it recorded the
    // assertion.
    let _ = chaperone_demo::worker::call_through_sidecar(
        &proxy,
        server,
        "run_billing",
        object(arguments.clone()),
        None,
    )
    .await;
    let seen = world.probe_seen.lock().unwrap();
    ensure!(
        seen.len() > before,
        "the probe got no assertion from {server}"
    );
    Ok(seen[seen.len() - 1].clone())
}

/// The same claims with a fresh `jti`, signed with a key that is not the
/// planner's, under the planner's `kid`.
fn forge(genuine: &str, kid: &str) -> Result<String> {
    let mut claims = claims_of(genuine)?;
    claims["jti"] = json!(format!("forged-{}", chaperone_testenv::unique_suffix()));
    let (der, _) = ed25519()?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_ed_der(&der),
    )?)
}

fn assert_refused(response: &str, status: u16, reason: &str) {
    assert_eq!(status_code(response), status, "{response}");
    assert!(
        response.contains(reason),
        "expected {reason:?} in {response}"
    );
}

/// Decision, rule and reason of the newest record of `sidecar` for `tool`.
fn last_decision(sidecar: &TestSidecar, tool: &str) -> Result<(String, String, String)> {
    let record = records_for(sidecar, tool)
        .pop()
        .with_context(|| format!("no record for {tool}"))?;
    let field = |name: &str| record[name].as_str().unwrap_or_default().to_owned();
    Ok((field("decision"), field("rule"), field("reason")))
}

/// The records of `sidecar` for `tool`, newest last.
fn records_for(sidecar: &TestSidecar, tool: &str) -> Vec<Value> {
    sidecar
        .audit
        .records()
        .into_iter()
        .filter(|r| r["tool"] == tool)
        .collect()
}

// ---------------------------------------------------------------------------
// The test.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planner_worker_billing_end_to_end() -> Result<()> {
    let (client, world) = setup().await?;
    let started = Instant::now();
    let ns = world.ns.clone();
    let (planner_id, worker_id) = (
        agent_subject(&format!("{ns}/planner")),
        agent_subject(&format!("{ns}/worker")),
    );
    let planner_in = world.planner.inbound()?;
    let worker_in = world.worker.inbound()?;

    // Assertions for the raw checks at the end, minted now: the expired one
    // needs time to expire (lifetime 1 s + 5 s of tolerated skew).
    let probe_args = json!({"tool": "get_invoice", "arguments": {"invoice": "INV-9"}});
    let to_expire = mint_assertion(&world, "probe", &probe_args).await?;
    let expire_minted = Instant::now();

    // --- A user at the planner: the initiator reaches the tool. ------------
    let alice = world.issuer.token("alice@example.test")?;
    let user = user_session(planner_in, &alice).await?;
    let invoice = via_worker(
        &user,
        "billing",
        "get_invoice",
        json!({"invoice": "INV-1001"}),
    )
    .await;
    assert!(
        invoice.as_ref().is_ok_and(|t| t.contains("INV-1001")),
        "{invoice:?}"
    );
    let jwt = last_assertion(&world.billing_seen).context("the billing tool got no assertion")?;
    let claims = claims_of(&jwt)?;
    assert_eq!(claims["sub"], "alice@example.test", "{claims}");
    assert_eq!(claims["iss"], worker_id, "{claims}");
    assert_eq!(claims["aud"], TOOL_AUDIENCE, "{claims}");
    assert_eq!(claims["tool"], "get_invoice", "{claims}");
    assert_eq!(claims["act"]["sub"], worker_id, "{claims}");
    assert_eq!(
        claims["act"]["grant"],
        format!("{ns}/planner-to-worker"),
        "{claims}"
    );
    assert_eq!(claims["act"]["act"]["sub"], planner_id, "{claims}");
    assert!(claims["act"]["act"].get("act").is_none(), "{claims}");
    // The worker's record names the chain and the user.
    let record = records_for(&world.worker, "get_invoice")
        .pop()
        .context("no worker record")?;
    assert_eq!(record["decision"], "allow", "{record}");
    assert_eq!(
        record["chain"],
        json!([format!("{ns}/planner"), format!("{ns}/worker")]),
        "{record}"
    );
    assert_eq!(record["initiator"], "alice@example.test", "{record}");

    // A token the issuer did not sign: 401, never ignored.
    let (other, _) = ed25519()?;
    let forged_user = sign_user_token(&EncodingKey::from_ed_der(&other), "mallory")?;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run_mail","arguments":{"tool":"read_inbox"}}}"#;
    let response = http_request_async(
        planner_in,
        json_post(
            "/mcp",
            &[("authorization", &format!("Bearer {forged_user}"))],
            body,
        ),
    )
    .await;
    assert_refused(&response, 401, "initiator");

    // --- Scope: the grant, not the worker's own wider authority. ----------
    let credit = via_worker(
        &user,
        "billing",
        "issue_credit",
        json!({"invoice": "INV-1001", "amount": 150}),
    )
    .await;
    assert!(
        credit.as_ref().is_ok_and(|t| t.contains("CR-3301")),
        "{credit:?}"
    );
    // 300: the planner could (≤ 500), the worker could (≤ 1000), the grant
    // cannot (≤ 200).
    let credit = via_worker(
        &user,
        "billing",
        "issue_credit",
        json!({"invoice": "INV-1001", "amount": 300}),
    )
    .await;
    assert!(
        credit.as_ref().is_err_and(|e| e.contains("\"delegation\"")),
        "{credit:?}"
    );
    let (decision, rule, reason) = last_decision(&world.worker, "issue_credit")?;
    assert_eq!(
        (decision.as_str(), rule.as_str()),
        ("deny", "delegation"),
        "{reason}"
    );
    assert!(reason.contains("planner-to-worker"), "{reason}");
    // Voiding: the worker's own rules allow it, the grant does not hand it over.
    let void = via_worker(
        &user,
        "billing",
        "void_invoice",
        json!({"invoice": "INV-1001"}),
    )
    .await;
    assert!(
        void.as_ref().is_err_and(|e| e.contains("\"delegation\"")),
        "{void:?}"
    );
    let (decision, rule, reason) = last_decision(&world.worker, "void_invoice")?;
    assert_eq!(
        (decision.as_str(), rule.as_str()),
        ("deny", "delegation"),
        "{reason}"
    );
    // Without a delegated session the worker has no authority at all.
    let worker_proxy = format!("http://127.0.0.1:{}", world.worker.proxy_port);
    let own = chaperone_demo::worker::call_through_sidecar(
        &worker_proxy,
        "billing",
        "get_invoice",
        object(json!({"invoice": "INV-1001"})),
        None,
    )
    .await;
    assert!(
        own.as_ref().is_err_and(|e| e.contains("requireDelegation")),
        "{own:?}"
    );
    eprintln!(
        "credit of 300 in the planner's session: {credit:?}\nvoid: {void:?}\nthe worker on its own: {own:?}"
    );

    // --- A session condition crosses the hop. ------------------------------
    let mail_args = json!({"to": "jo@example.com", "subject": "Your credit"});
    let sent = via_worker(&user, "mail", "send_email", mail_args.clone()).await;
    assert!(
        sent.is_ok(),
        "before any sensitive data the worker may mail: {sent:?}"
    );
    let inbox = call(&user, "run_mail", json!({"tool": "read_inbox"})).await;
    assert!(inbox.is_ok(), "{inbox:?}");
    let sent = via_worker(&user, "mail", "send_email", mail_args.clone()).await;
    assert!(
        sent.as_ref()
            .is_err_and(|e| e.contains("no-external-after-sensitive")),
        "the planner's session read the inbox; the worker must not mail out: {sent:?}"
    );
    let (decision, rule, reason) = last_decision(&world.worker, "send_email")?;
    assert_eq!(decision, "deny", "{rule}: {reason}");
    assert!(
        rule.ends_with("no-external-after-sensitive"),
        "{rule}: {reason}"
    );
    let _ = user.cancel().await;

    // --- Depth: maxDepth 0, so the worker cannot hand on to the helper. ----
    // The worker's own sidecar refuses the hop before it leaves: the grant
    // covers helper/*, but handing the task to another agent would need one
    // more hop than the planner's grant allows.
    let bob = user_session(planner_in, &world.issuer.token("bob@example.test")?).await?;
    let hop_args = json!({"tool": "get_invoice", "arguments": {"invoice": "INV-7"}});
    let hop = via_worker(&bob, "helper", "run_billing", hop_args.clone()).await;
    assert!(hop.is_err(), "{hop:?}");
    let refusal = world
        .worker
        .audit
        .records()
        .into_iter()
        .rfind(|r| r["decision"] == "deny" && r["server"] == "helper")
        .context("the worker refused nothing")?;
    assert_eq!(refusal["rule"], "delegation", "{refusal}");
    assert!(
        refusal["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!(
                "depth limit: grant {ns}/planner-to-worker allows 0"
            ))),
        "{refusal}"
    );
    assert_eq!(
        refusal["chain"],
        json!([format!("{ns}/planner"), format!("{ns}/worker")]),
        "{refusal}"
    );
    // With maxDepth 1 the same hop goes through, and the tool sees all three
    // actors, the helper outermost.
    kube_fixtures::apply::<DelegationGrant>(&client, &ns, planner_grant(1)).await?;
    let source = Arc::clone(world.helper.sidecar.snapshots());
    eventually(Duration::from_secs(10), async || {
        Ok(source
            .current()
            .filter(|a| a.snapshot.content.grants_received.len() == 2)
            .map(|_| ()))
    })
    .await
    .context("the helper never got the planner's grant")?;
    let source = Arc::clone(world.worker.sidecar.snapshots());
    eventually(Duration::from_secs(10), async || {
        Ok(source
            .current()
            .filter(|a| {
                a.snapshot
                    .content
                    .grants_received
                    .iter()
                    .any(|g| g.grant.name == "planner-to-worker" && g.max_depth == 1)
            })
            .map(|_| ()))
    })
    .await
    .context("the worker never got the widened grant")?;
    let hop = via_worker(&bob, "helper", "run_billing", hop_args).await;
    assert!(hop.as_ref().is_ok_and(|t| t.contains("INV-7")), "{hop:?}");
    let claims = claims_of(&last_assertion(&world.billing_seen).context("no assertion")?)?;
    assert_eq!(claims["sub"], "bob@example.test", "{claims}");
    assert_eq!(
        claims["act"]["sub"],
        agent_subject(&format!("{ns}/helper")),
        "{claims}"
    );
    assert_eq!(
        claims["act"]["grant"],
        format!("{ns}/worker-to-helper"),
        "{claims}"
    );
    assert_eq!(claims["act"]["act"]["sub"], worker_id, "{claims}");
    assert_eq!(
        claims["act"]["act"]["grant"],
        format!("{ns}/planner-to-worker"),
        "{claims}"
    );
    assert_eq!(claims["act"]["act"]["act"]["sub"], planner_id, "{claims}");
    kube_fixtures::apply::<DelegationGrant>(&client, &ns, planner_grant(0)).await?;

    // --- Raw calls at the tool: only through an agent's sidecar. ---------
    let response = http_request_async(
        world.tool.inbound()?,
        json_post(
            "/mcp",
            &[],
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"void_invoice","arguments":{"invoice":"INV-1001"}}}"#,
        ),
    )
    .await;
    assert_refused(&response, 403, "no Chaperone-Assertion");

    // --- Raw assertions at the worker's inbound side. ----------------------
    let genuine = mint_assertion(&world, "probe", &probe_args).await?;
    let first = raw_call(worker_in, &genuine, "run_billing", &probe_args).await;
    assert_ne!(
        status_code(&first),
        403,
        "a fresh genuine assertion is admitted: {first}"
    );
    let replayed = raw_call(worker_in, &genuine, "run_billing", &probe_args).await;
    assert_refused(&replayed, 403, "already used");
    let planner_kid = world.planner.sidecar.key_registration().kid.clone();
    let forged = forge(&genuine, &planner_kid)?;
    assert_refused(
        &raw_call(worker_in, &forged, "run_billing", &probe_args).await,
        403,
        "signature does not verify",
    );
    let elsewhere = mint_assertion(&world, "probe-aud", &probe_args).await?;
    assert_refused(
        &raw_call(worker_in, &elsewhere, "run_billing", &probe_args).await,
        403,
        "audience",
    );
    let wait = Duration::from_secs(8).saturating_sub(expire_minted.elapsed());
    tokio::time::sleep(wait).await;
    assert_refused(
        &raw_call(worker_in, &to_expire, "run_billing", &probe_args).await,
        403,
        "expired",
    );

    // --- Revocation: deleting the grant denies the next call within 1 s. ---
    let ok = via_worker(&bob, "billing", "get_invoice", json!({"invoice": "INV-2"})).await;
    assert!(ok.is_ok(), "{ok:?}");
    let deleted = Instant::now();
    Api::<DelegationGrant>::namespaced(client.clone(), &ns)
        .delete("planner-to-worker", &DeleteParams::default())
        .await?;
    let denied = loop {
        let outcome = via_worker(&bob, "billing", "get_invoice", json!({"invoice": "INV-2"})).await;
        if let Err(err) = outcome {
            break err;
        }
        if deleted.elapsed() > Duration::from_secs(5) {
            bail!(
                "calls are still allowed {:?} after deleting the grant",
                deleted.elapsed()
            );
        }
    };
    let took = deleted.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "revocation took {took:?}: {denied}"
    );
    // Refused at the worker's inbound side: no grant from the planner any more.
    let refusal = world
        .worker
        .audit
        .records()
        .into_iter()
        .rfind(|r| r["decision"] == "deny")
        .context("the worker refused nothing")?;
    assert_eq!(refusal["rule"], "inbound/delegation", "{refusal}");
    assert!(
        refusal["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no valid DelegationGrant")),
        "{refusal}"
    );
    eprintln!("revoked after {took:?}: {denied}");
    let _ = bob.cancel().await;

    // --- Events with the chain, through kubectl. ---------------------------
    let chain = format!("chain: {ns}/planner → {ns}/worker");
    let events = eventually(Duration::from_secs(15), async || {
        let ns = ns.clone();
        let out = tokio::task::spawn_blocking(move || {
            ControlPlane::shared().kubectl(&["get", "events", "-n", &ns, "-o", "wide"])
        })
        .await??;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let tool_pod = text
            .lines()
            .any(|l| l.contains("ToolCallDenied") && l.contains("pod/billing-0"));
        Ok((text.contains("ToolCallDenied") && text.contains(&chain) && tool_pod).then_some(text))
    })
    .await
    .context("no ToolCallDenied Events naming the chain and on the tool's pod")?;
    assert!(events.contains("issue_credit"), "{events}");

    // --- One verifiable trail across the agents. ---------------------------
    // Each sidecar ends its trail with a signed final checkpoint (what it
    // does at shutdown). Callers first; every delegated session's first
    // record links to its caller's record, so with all four logs nothing may
    // dangle or be unproven (strict).
    let sidecars = [&world.planner, &world.worker, &world.helper, &world.tool];
    for s in sidecars {
        s.sidecar.close_audit()?;
    }
    let combined = sidecars.iter().map(|s| s.audit.text()).collect::<String>();
    let jwks = jwks_of(sidecars.iter().map(|s| &s.sidecar));
    let summary = verify_strict(&combined, &jwks)?;
    assert_eq!(
        summary.records + summary.checkpoints,
        combined.lines().count(),
        "{summary:?}"
    );
    // Worker from planner (alice, bob, the probe), helper from worker (the
    // refusal and the hop), tool from worker and from helper.
    assert!(summary.cross_session_links >= 6, "{summary:?}");
    // The worker's log alone links out to the planner's.
    let alone = chaperone_audit::verify_log(&world.worker.audit.text())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(!alone.external_links.is_empty(), "{alone:?}");
    // Tampering with a record that has a successor breaks the chain: the
    // decision of the worker's allowed credit turned into a denial, or the
    // record removed.
    let edit = assert_tampering_detected(&combined, "issue_credit", &jwks)?;
    assert!(edit.contains("before line"), "{edit}");
    eprintln!(
        "delegation end to end: {} audit records, {:?}",
        summary.records,
        started.elapsed()
    );
    Ok(())
}
