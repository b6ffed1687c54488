//! Traces end to end: real sidecars (library API, in this process) export
//! their spans over OTLP to a loopback receiver ([`OtlpReceiver`]), with the
//! in-process controller on a real API server.
//!
//! ```text
//!  test (traceparent T) ─► planner's sidecar ─► worker's inbound ─► worker app ─► worker's sidecar ─► billing
//!                          span P (client)      span W (server)    (no trace      span O (client)
//!                          parent: T            parent: P           propagation)   parent: W (the task's trace)
//! ```
//!
//! One test binary, one process-wide subscriber: the gRPC exporter is
//! installed once (the first test), and the OTLP/HTTP exporter is tested with
//! a subscriber of its own.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use chaperone_api::{AgentIdentity, DelegationGrant, ToolPolicy};
use chaperone_demo::{ToolServer, ToolSet, WorkerApp};
use chaperone_sidecar::Settings;
use chaperone_sidecar::spans::{Direction, message_span};
use chaperone_telemetry::{LogFormat, OtlpProtocol, OtlpSettings, TelemetryGuard, TraceParent};
use chaperone_testenv::{
    ControlPlane, create_namespace,
    kube_fixtures::{self, agent_identity, delegation_grant, tool_policy},
    mcp_fixtures::{loopback_listener, serve_mcp},
    otlp_receiver::{OtlpReceiver, ReceivedSpan, Transport},
    sidecar_fixtures::{
        TestSidecar, controller_settings, eventually, http_request_async, json_post, status_code,
        write_token,
    },
};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use opentelemetry::trace::TracerProvider as _;
use serde_json::json;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// OTLP span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
/// OTLP status code: error.
const ERROR: i32 = 2;
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The controller and the exporter: one of each per test binary.

fn controller() -> &'static kube_fixtures::InProcessController {
    static CONTROLLER: OnceLock<kube_fixtures::InProcessController> = OnceLock::new();
    CONTROLLER.get_or_init(|| {
        kube_fixtures::start_controller(
            ControlPlane::shared(),
            &format!("tracing-test-controller-{}", std::process::id()),
        )
    })
}

/// A fresh, sampled W3C trace context.
fn fresh_traceparent() -> TraceParent {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos());
    let salt = u128::from(std::process::id()) << 96;
    TraceParent {
        trace_id: (nanos ^ salt) | 1,
        parent_id: (nanos as u64).rotate_left(17) | 1,
        flags: 1,
    }
}

async fn flush(guard: &'static TelemetryGuard) -> Result<()> {
    tokio::task::spawn_blocking(|| guard.flush()).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The world: planner → worker (grant) → billing.

struct World {
    ns: String,
    planner: TestSidecar,
    _worker: TestSidecar,
    _token_dir: tempfile::TempDir,
}

async fn agent_sidecar(
    client: &Client,
    ns: &str,
    sa: &str,
    dir: &std::path::Path,
    app: u16,
) -> Result<TestSidecar> {
    kube_fixtures::ensure_service_account(client, ns, sa).await?;
    let pod: Pod = kube_fixtures::create_agent_pod(client, ns, sa, &format!("{sa}-0")).await?;
    let token = kube_fixtures::bound_token(client, &pod, kube_fixtures::SIDECAR_AUDIENCE).await?;
    let name = pod.metadata.name.clone().context("pod name")?;
    let dir = dir.join(&name);
    std::fs::create_dir_all(&dir)?;
    let token_file = write_token(&dir, &token)?;
    let ca_file = tokio::task::spawn_blocking(|| controller().ca_file.clone()).await?;
    let address = format!("127.0.0.1:{}", controller().grpc_port);
    TestSidecar::start(Settings {
        pod_name: name,
        pod_namespace: ns.to_owned(),
        controller: Some(controller_settings(address, &token_file, ca_file)),
        inbound_upstream: Some(format!("http://127.0.0.1:{app}").parse()?),
        ..Settings::default()
    })
    .await
}

async fn setup() -> Result<World> {
    tokio::task::spawn_blocking(controller).await?;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "tracing").await?;
    let token_dir = tempfile::tempdir()?;
    let dir = token_dir.path();
    let billing = serve_mcp(
        loopback_listener().await?,
        ToolServer::new(ToolSet::Billing),
    )
    .await?;
    let (planner_app, worker_app) = (loopback_listener().await?, loopback_listener().await?);
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
    // The worker's app calls billing through the worker's sidecar, with the
    // Chaperone-Session it was handed and no trace context of its own.
    serve_mcp(
        worker_app,
        WorkerApp::new(
            format!("http://127.0.0.1:{}", worker.proxy_port),
            ["billing".into()],
        ),
    )
    .await?;
    let url = |port: u16| format!("http://127.0.0.1:{port}/mcp");
    kube_fixtures::apply::<ToolPolicy>(&client, &ns, tool_policy("planner", json!({
        "targetRefs": [{ "name": "planner" }],
        "rules": [
            { "name": "allow-worker", "action": "allow", "tools": [{ "server": "worker", "name": "*" }] },
            { "name": "allow-invoices", "action": "allow", "tools": [{ "server": "billing", "name": "get_invoice" }] },
            { "name": "no-credits", "action": "deny", "tools": [{ "server": "billing", "name": "issue_credit" }] },
        ]
    }))).await?;
    kube_fixtures::apply::<ToolPolicy>(&client, &ns, tool_policy("worker", json!({
        "targetRefs": [{ "name": "worker" }],
        "rules": [{ "name": "allow-invoices", "action": "allow", "tools": [{ "server": "billing", "name": "get_invoice" }] }]
    }))).await?;
    kube_fixtures::apply::<DelegationGrant>(
        &client,
        &ns,
        delegation_grant(
            "planner-to-worker",
            json!({
                "from": { "name": "planner" }, "to": { "name": "worker" },
                "tools": [{ "server": "billing", "name": "get_invoice" }],
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
            "worker",
            json!({
                "selector": { "serviceAccountName": "worker" },
                "toolServers": [{ "name": "billing", "url": url(billing) }],
                "delegation": { "requireDelegation": true },
            }),
        ),
    )
    .await?;
    kube_fixtures::apply::<AgentIdentity>(
        &client,
        &ns,
        agent_identity(
            "planner",
            json!({
                "selector": { "serviceAccountName": "planner" },
                "toolServers": [
                    { "name": "worker", "url": url(worker.inbound()?), "agent": "worker" },
                    { "name": "billing", "url": url(billing) },
                ],
            }),
        ),
    )
    .await?;
    for (sidecar, grants) in [(&planner, 0), (&worker, 1)] {
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
    worker.wait_for_key_of(&planner).await?;
    Ok(World {
        ns,
        planner,
        _worker: worker,
        _token_dir: token_dir,
    })
}

const PROTOCOL: &str = "2025-06-18";

/// The value of header `name` in a raw response.
fn header_of(response: &str, name: &str) -> Option<String> {
    response.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// Opens an MCP session with `server` through the planner's proxy; returns
/// its `Mcp-Session-Id`.
async fn open_session(world: &World, server: &str) -> Result<String> {
    let port = world.planner.proxy_port;
    let path = format!("/{server}/mcp");
    let initialize = json!({
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": { "protocolVersion": PROTOCOL, "capabilities": {},
                    "clientInfo": { "name": "e2e-tracing", "version": "1" } },
    })
    .to_string();
    let response = http_request_async(port, json_post(&path, &[], &initialize)).await;
    let session = header_of(&response, "mcp-session-id")
        .with_context(|| format!("no Mcp-Session-Id from {server}: {response}"))?;
    let initialized =
        json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }).to_string();
    let headers = [
        ("mcp-session-id", session.as_str()),
        ("mcp-protocol-version", PROTOCOL),
    ];
    let response = http_request_async(port, json_post(&path, &headers, &initialized)).await;
    ensure!(status_code(&response) == 202, "{response}");
    Ok(session)
}

/// Sends one `tools/call` of `server`'s `tool` to the planner's proxy inside
/// the trace `parent` (in MCP session `session`, if any); returns the raw
/// response.
async fn call_in_trace(
    world: &World,
    server: &str,
    session: Option<&str>,
    tool: &str,
    arguments: serde_json::Value,
    parent: &TraceParent,
) -> String {
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": { "name": tool, "arguments": arguments },
    })
    .to_string();
    let traceparent = parent.to_string();
    let mut headers = vec![("traceparent", traceparent.as_str())];
    if let Some(session) = session {
        headers.push(("mcp-session-id", session));
        headers.push(("mcp-protocol-version", PROTOCOL));
    }
    http_request_async(
        world.planner.proxy_port,
        json_post(&format!("/{server}/mcp"), &headers, &body),
    )
    .await
}

fn in_trace<'a>(
    spans: &'a [ReceivedSpan],
    trace: &TraceParent,
    name: &str,
) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace.trace_id_hex() && s.name == name)
        .collect()
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delegated_call_is_one_trace_from_the_agent_to_the_tool() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    static GUARD: OnceLock<TelemetryGuard> = OnceLock::new();
    let settings = OtlpSettings {
        endpoint: receiver.grpc_url(),
        protocol: OtlpProtocol::Grpc,
        headers: vec![],
        timeout: Duration::from_secs(5),
        sampler: chaperone_telemetry::otlp::SamplerSetting::ParentBasedAlwaysOn,
        service_name: "chaperone-e2e".to_owned(),
        resource: vec![],
    };
    let guard = chaperone_telemetry::init_with(LogFormat::Text, Some(&settings))?;
    ensure!(guard.exporting());
    let guard: &'static TelemetryGuard = GUARD.get_or_init(|| guard);
    let world = setup().await?;
    let ns = &world.ns;

    // An allowed call through the grant: planner → worker → billing.
    let trace = fresh_traceparent();
    let session = open_session(&world, "worker").await?;
    let response = call_in_trace(
        &world,
        "worker",
        Some(&session),
        "run_billing",
        json!({ "tool": "get_invoice", "arguments": { "invoice": "INV-7" } }),
        &trace,
    )
    .await;
    assert_eq!(status_code(&response), 200, "{response}");
    assert!(response.contains("C-42"), "billing answered: {response}");

    // A call the planner's policy denies.
    let denied = fresh_traceparent();
    let response = call_in_trace(
        &world,
        "billing",
        None,
        "issue_credit",
        json!({ "invoice": "INV-7", "amount": 10 }),
        &denied,
    )
    .await;
    assert!(response.contains("no-credits"), "{response}");

    // A tool list is governed too (filtered on the way back): its own span.
    let listed = fresh_traceparent();
    let traceparent = listed.to_string();
    let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string();
    let mut headers = vec![("traceparent", traceparent.as_str())];
    headers.push(("mcp-session-id", session.as_str()));
    headers.push(("mcp-protocol-version", PROTOCOL));
    http_request_async(
        world.planner.proxy_port,
        json_post("/worker/mcp", &headers, &body),
    )
    .await;

    flush(guard).await?;
    let out = receiver
        .wait_for(WAIT, "of the worker's onward call", |s| {
            s.trace_id == trace.trace_id_hex() && s.name == "tools/call get_invoice"
        })
        .await?;
    receiver
        .wait_for(WAIT, "of the denied call", |s| {
            s.trace_id == denied.trace_id_hex()
        })
        .await?;
    let list = receiver
        .wait_for(WAIT, "of the tool list", |s| {
            s.trace_id == listed.trace_id_hex() && s.name == "tools/list"
        })
        .await?;
    assert_eq!(list.parent_span_id, format!("{:016x}", listed.parent_id));
    assert_eq!(list.attribute("chaperone.tool_server"), Some("worker"));
    assert_eq!(list.attribute("chaperone.direction"), Some("outbound"));
    let spans = receiver.spans();
    assert!(spans.iter().all(|s| s.transport == Transport::Grpc));

    // The planner's span: a client span, child of the agent's context.
    let outbound = in_trace(&spans, &trace, "tools/call run_billing");
    let planner = outbound
        .iter()
        .find(|s| s.kind == CLIENT)
        .context("the planner's span")?;
    assert_eq!(planner.parent_span_id, format!("{:016x}", trace.parent_id));
    assert_eq!(planner.service_name, "chaperone-e2e");
    let attr = |s: &ReceivedSpan, k: &str| s.attribute(k).unwrap_or_default().to_owned();
    assert_eq!(attr(planner, "mcp.method.name"), "tools/call");
    assert_eq!(attr(planner, "gen_ai.tool.name"), "run_billing");
    assert_eq!(attr(planner, "gen_ai.operation.name"), "execute_tool");
    assert_eq!(attr(planner, "chaperone.direction"), "outbound");
    assert_eq!(attr(planner, "chaperone.agent"), format!("{ns}/planner"));
    assert_eq!(attr(planner, "k8s.pod.name"), "planner-0");
    assert_eq!(attr(planner, "chaperone.tool_server"), "worker");
    assert_eq!(attr(planner, "chaperone.decision"), "allow");
    assert_eq!(attr(planner, "chaperone.rule"), "planner/allow-worker");
    assert_eq!(attr(planner, "chaperone.session.scope"), "trace");
    assert_eq!(attr(planner, "chaperone.session.key"), trace.trace_id_hex());
    assert_ne!(attr(planner, "chaperone.snapshot.version"), "0");
    assert!(planner.attribute("chaperone.upstream.latency_ms").is_some());
    assert_eq!(attr(planner, "http.response.status_code"), "200");
    assert_ne!(planner.status_code, ERROR);

    // The worker's inbound span: a server span, child of the planner's span
    // (the traceparent header the planner's sidecar sent), in the delegation.
    let inbound = outbound
        .iter()
        .find(|s| s.kind == SERVER)
        .context("the worker's inbound span")?;
    assert_eq!(inbound.parent_span_id, planner.span_id);
    assert_eq!(attr(inbound, "chaperone.direction"), "inbound");
    assert_eq!(
        attr(inbound, "chaperone.tool_server"),
        format!("inbound:chaperone:agent:{ns}/planner")
    );
    assert_eq!(attr(inbound, "chaperone.agent"), format!("{ns}/worker"));
    assert_eq!(attr(inbound, "k8s.pod.name"), "worker-0");
    assert_eq!(attr(inbound, "chaperone.decision"), "allow");
    assert_eq!(
        attr(inbound, "chaperone.delegation.chain"),
        format!("{ns}/planner > {ns}/worker")
    );
    assert_eq!(attr(inbound, "chaperone.session.scope"), "task");

    // The worker's onward call: its app sent no trace context, so the span
    // continues the trace of the task it belongs to.
    assert_eq!(out.kind, CLIENT);
    assert_eq!(out.parent_span_id, inbound.span_id);
    assert_eq!(attr(&out, "chaperone.agent"), format!("{ns}/worker"));
    assert_eq!(attr(&out, "chaperone.tool_server"), "billing");
    assert_eq!(attr(&out, "chaperone.decision"), "allow");
    assert_eq!(
        attr(&out, "chaperone.delegation.chain"),
        format!("{ns}/planner > {ns}/worker")
    );

    for span in [*planner, *inbound, &out] {
        assert!(
            span.repeated_attributes.is_empty(),
            "{}: {:?}",
            span.name,
            span.repeated_attributes
        );
    }

    // The denied call: an error status with the reason, and the rule.
    let refused = in_trace(&spans, &denied, "tools/call issue_credit");
    let [refused] = refused[..] else {
        anyhow::bail!("one span for the denied call, got {refused:#?}");
    };
    assert_eq!(refused.parent_span_id, format!("{:016x}", denied.parent_id));
    assert_eq!(refused.status_code, ERROR);
    assert_eq!(attr(refused, "chaperone.decision"), "deny");
    assert_eq!(attr(refused, "chaperone.rule"), "planner/no-credits");
    let reason = attr(refused, "chaperone.refusal.reason");
    assert!(!reason.is_empty());
    assert_eq!(refused.status_message, reason);
    assert_eq!(attr(refused, "error.type"), "chaperone.refused");
    assert!(refused.attribute("chaperone.upstream.latency_ms").is_none());

    // The controller's spans: its reconciles and the snapshots it pushed.
    receiver
        .wait_for(WAIT, "of a reconcile", |s| s.name == "chaperone reconcile")
        .await?;
    let agent = format!("{ns}/planner");
    receiver
        .wait_for(WAIT, "of the planner's snapshot push", |s| {
            s.name == "chaperone snapshot push"
                && s.attribute("chaperone.agent") == Some(agent.as_str())
                && s.attribute("k8s.pod.name") == Some("planner-0")
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_over_otlp_http_protobuf_with_the_configured_headers() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let base = format!("http://{}", receiver.http);
    let vars = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme%20corp"),
        ("OTEL_SERVICE_NAME", "chaperone-sidecar-http"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e"),
    ];
    let env = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    };
    let settings = OtlpSettings::from_lookup("chaperone-sidecar", &env)?.context("settings")?;
    assert_eq!(settings.endpoint, receiver.http_traces_url());
    let provider = chaperone_telemetry::otlp::tracer_provider(&settings)?;
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("chaperone"))
            .with_filter(chaperone_telemetry::otlp::span_filter()),
    );
    let parent = fresh_traceparent();
    let sent = tracing::subscriber::with_default(subscriber, || {
        let span = message_span(
            Direction::Outbound,
            "tools/call",
            "get_invoice",
            "billing",
            Some(parent),
        );
        let sent = TraceParent::of_span(&span);
        drop(span);
        sent
    })
    .context("the span's traceparent")?;
    // Only the parent span id changes on the way.
    assert_eq!(sent.trace_id, parent.trace_id);
    assert_ne!(sent.parent_id, parent.parent_id);
    tokio::task::spawn_blocking(move || provider.shutdown()).await??;

    let span = receiver
        .wait_for(WAIT, "over OTLP/HTTP", |s| {
            s.trace_id == parent.trace_id_hex()
        })
        .await?;
    assert_eq!(span.transport, Transport::HttpProtobuf);
    assert_eq!(span.name, "tools/call get_invoice");
    assert_eq!(span.kind, CLIENT);
    assert_eq!(span.parent_span_id, format!("{:016x}", parent.parent_id));
    assert_eq!(span.span_id, format!("{:016x}", sent.parent_id));
    assert_eq!(span.service_name, "chaperone-sidecar-http");
    assert_eq!(span.attribute("chaperone.tool_server"), Some("billing"));
    let headers = receiver.last_http_headers();
    assert_eq!(
        headers.get("x-tenant").and_then(|v| v.to_str().ok()),
        Some("acme corp")
    );
    Ok(())
}
