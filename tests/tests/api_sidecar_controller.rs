//! The sidecar in controller mode on a real API server: the controller runs
//! in-process, the sidecar (library API) dials its snapshot stream with a real
//! pod-bound ServiceAccount token, and real rmcp MCP clients call a real rmcp
//! tool server through the sidecar.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use chaperone_api::{AgentIdentity, ToolPolicy};
use chaperone_sidecar::Settings;
use chaperone_testenv::kube_fixtures::apply;
use chaperone_testenv::{
    ControlPlane, create_namespace, free_port, kube_fixtures,
    sidecar_fixtures::{
        TestSidecar, controller_settings, eventually, http_get_async, http_request_async,
        json_post, status_code, write_token,
    },
};
use kube::{Api, Client, api::DeleteParams};
use rmcp::{
    ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ContentBlock,
        ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    },
    service::{RequestContext, RunningService},
    transport::{
        StreamableHttpClientTransport,
        streamable_http_client::StreamableHttpClientTransportConfig,
        streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
        },
    },
};
use serde_json::json;

// ---------------------------------------------------------------------------
// The controller under test: one per test binary, on its own thread and runtime.

type TestController = kube_fixtures::InProcessController;

fn controller() -> &'static TestController {
    static CONTROLLER: OnceLock<TestController> = OnceLock::new();
    CONTROLLER.get_or_init(|| {
        kube_fixtures::start_controller(
            ControlPlane::shared(),
            &format!("sidecar-test-controller-{}", std::process::id()),
        )
    })
}

// ---------------------------------------------------------------------------
// Kubernetes objects.

async fn setup() -> Result<(Client, String)> {
    tokio::task::spawn_blocking(controller).await?;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "sc").await?;
    Ok((client, ns))
}

fn agent(name: &str, upstream: SocketAddr) -> serde_json::Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": { "name": name },
        "spec": {
            "selector": { "serviceAccountName": name },
            "toolServers": [{ "name": "shop", "url": format!("http://{upstream}/mcp") }]
        }
    })
}

fn policy(name: &str, agent: &str, tool: &str) -> serde_json::Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": { "name": name },
        "spec": {
            "targetRefs": [{ "name": agent }],
            "rules": [{ "name": format!("allow-{}", tool.replace('_', "-")), "action": "allow", "tools": [{ "server": "shop", "name": tool }] }]
        }
    })
}

// ---------------------------------------------------------------------------
// A real MCP tool server.

const TOOLS: [&str; 3] = ["get_order", "refund", "delete_all"];

#[derive(Clone)]
struct ShopServer;

impl ServerHandler for ShopServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(json!({"type": "object"})).unwrap();
        let schema = Arc::new(schema);
        Ok(ListToolsResult::with_all_items(
            TOOLS
                .iter()
                .map(|name| Tool::new(*name, format!("the {name} tool"), Arc::clone(&schema)))
                .collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        Ok(
            CallToolResult::success(vec![ContentBlock::text(format!("{} done", request.name))])
                .into(),
        )
    }
}

/// Starts the MCP server (JSON responses, stateless) on loopback.
async fn start_upstream() -> Result<SocketAddr> {
    let config = StreamableHttpServerConfig::default()
        .with_sse_keep_alive(None)
        .with_legacy_session_mode(false)
        .with_json_response(true);
    let service: StreamableHttpService<ShopServer, LocalSessionManager> =
        StreamableHttpService::new(|| Ok(ShopServer), Default::default(), config);
    let service = Arc::new(service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = Arc::clone(&service);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let service = Arc::clone(&service);
                    async move { Ok::<_, std::convert::Infallible>(service.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------
// The sidecar under test.

/// A sidecar for `pod` dialling the controller at `address` with the token in
/// `token_file`; it reconnects quickly (50 ms doubling up to 500 ms).
async fn start_sidecar(pod: &str, address: String, token_file: &Path) -> Result<TestSidecar> {
    let ca_file = tokio::task::spawn_blocking(|| controller().ca_file.clone()).await?;
    TestSidecar::start(Settings {
        pod_name: pod.to_owned(),
        controller: Some(controller_settings(address, token_file, ca_file)),
        ..Settings::default()
    })
    .await
}

/// The HTTP status of a raw `tools/call` (no MCP session) through `sidecar`.
async fn raw_call_status(sidecar: &TestSidecar) -> u16 {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order","arguments":{}}}"#;
    status_code(&http_request_async(sidecar.proxy_port, json_post("/shop", &[], body)).await)
}

/// An MCP session with the `shop` server through `sidecar`.
async fn mcp_client(sidecar: &TestSidecar) -> Result<RunningService<RoleClient, ClientConfig>> {
    let transport =
        StreamableHttpClientTransport::from_config(StreamableHttpClientTransportConfig::with_uri(
            format!("http://127.0.0.1:{}/shop", sidecar.proxy_port),
        ));
    Ok(ClientConfig::default().serve(transport).await?)
}

/// Calls `tool`; `Ok(text)` or `Err(error message)`.
async fn call(
    client: &RunningService<RoleClient, ClientConfig>,
    tool: &'static str,
) -> Result<String, String> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        client.call_tool(CallToolRequestParams::new(tool)),
    )
    .await
    {
        Ok(Ok(result)) => Ok(format!("{:?}", result.content)),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer to {tool} within 10 s")),
    }
}

fn grpc_address() -> String {
    format!("127.0.0.1:{}", controller().grpc_port)
}

/// A TCP relay to the controller's snapshot port that a test can cut (every
/// connection through it dropped, new ones closed at once: what a sidecar
/// partitioned from the controller sees) and restore. TLS runs end to end
/// through it.
struct Relay {
    address: String,
    open: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn to_controller() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let target = grpc_address();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accepting, tracked) = (Arc::clone(&open), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let target = target.clone();
                let relayed = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(relayed.abort_handle());
            }
        });
        Ok(Self {
            address,
            open,
            connections,
        })
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforces_the_controllers_snapshot_and_follows_policy_edits() -> Result<()> {
    let (client, ns) = setup().await?;
    let upstream = start_upstream().await?;
    let token = kube_fixtures::pod_token(
        &client,
        &ns,
        "planner",
        "planner-0",
        kube_fixtures::SIDECAR_AUDIENCE,
    )
    .await?;
    // First a token the API server rejects: the sidecar retries and re-reads the
    // file on each attempt, so the real token (a "rotation") is picked up.
    let dir = tempfile::tempdir()?;
    let token_file = write_token(dir.path(), "not-a-token")?;
    let sidecar = start_sidecar("planner-0", grpc_address(), &token_file).await?;

    // No snapshot yet (bad token, then no AgentIdentity): closed and not ready.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(raw_call_status(&sidecar).await, 503);
    assert_eq!(sidecar.ready_status().await, 503);
    assert_eq!(sidecar.live_status().await, 200, "alive though not ready");
    write_token(dir.path(), &token)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(raw_call_status(&sidecar).await, 503);

    apply::<AgentIdentity>(&client, &ns, agent("planner", upstream)).await?;
    apply::<ToolPolicy>(&client, &ns, policy("shop", "planner", "get_order")).await?;
    sidecar.wait_for_version(0, Duration::from_secs(10)).await?;
    assert_eq!(sidecar.ready_status().await, 200);

    // The controller may see the AgentIdentity before the ToolPolicy and push
    // a snapshot without its rule first: wait for the one that allows.
    let mcp = mcp_client(&sidecar).await?;
    let allowed = eventually(Duration::from_secs(10), async || {
        Ok(call(&mcp, "get_order").await.ok())
    })
    .await?;
    assert!(allowed.contains("get_order done"), "{allowed}");
    let first = sidecar.audit.records().pop().context("no audit record")?["snapshot"]
        .as_u64()
        .context("the audit record names no snapshot")?;
    let denied = call(&mcp, "delete_all").await.unwrap_err();
    assert!(denied.contains("no rule allows"), "{denied}");

    // The controller's view: the sidecar is connected and in sync.
    let agents: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(10), async || {
        let status = agents.get("planner").await?.status.unwrap_or_default();
        Ok((status.sidecars_connected == 1 && status.sidecars_in_sync == 1).then_some(()))
    })
    .await?;

    // A policy edit: the next call is decided on the new version.
    let edited = Instant::now();
    apply::<ToolPolicy>(&client, &ns, policy("shop", "planner", "delete_all")).await?;
    let second = sidecar
        .wait_for_version(first, Duration::from_secs(5))
        .await?;
    assert!(
        edited.elapsed() < Duration::from_millis(1500),
        "the edit took {:?} to reach the sidecar",
        edited.elapsed()
    );
    let allowed = call(&mcp, "delete_all").await;
    assert!(allowed.is_ok(), "{allowed:?}");
    let denied = call(&mcp, "get_order").await.unwrap_err();
    assert!(denied.contains("no rule allows"), "{denied}");
    let last = sidecar.audit.records().pop().context("no audit record")?;
    assert_eq!(last["snapshot"], second);
    assert_eq!(last["decision"], "deny");
    eventually(Duration::from_secs(10), async || {
        let status = agents.get("planner").await?.status.unwrap_or_default();
        Ok(
            (status.sidecars_in_sync == 1 && status.snapshot_version == i64::try_from(second).ok())
                .then_some(()),
        )
    })
    .await?;
    let _ = mcp.cancel().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_its_key_and_reports_tools_and_audit() -> Result<()> {
    let (client, ns) = setup().await?;
    let upstream = start_upstream().await?;
    apply::<AgentIdentity>(&client, &ns, agent("lister", upstream)).await?;
    apply::<ToolPolicy>(&client, &ns, policy("shop", "lister", "get_order")).await?;
    let token = kube_fixtures::pod_token(
        &client,
        &ns,
        "lister",
        "lister-0",
        kube_fixtures::SIDECAR_AUDIENCE,
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let token_file = write_token(dir.path(), &token)?;
    let sidecar = start_sidecar("lister-0", grpc_address(), &token_file).await?;
    sidecar.wait_for_version(0, Duration::from_secs(10)).await?;

    // The controller's JWKS serves the sidecar's key.
    let kid = sidecar.sidecar.key_registration().kid.clone();
    let admin = controller().admin_port;
    let jwks = eventually(Duration::from_secs(5), async || {
        let response = http_get_async(admin, "/.well-known/jwks.json").await;
        Ok(response.contains(&kid).then_some(response))
    })
    .await?;
    assert!(jwks.contains("Ed25519"), "{jwks}");
    // The stream hands the sidecar the keys of the agents that may call it,
    // and only those: a caller's sidecar (a stand-in) registers its key.
    let mut caller = agent("caller", upstream);
    caller["spec"]["toolServers"]
        .as_array_mut()
        .context("toolServers")?
        .push(json!({ "name": "lister", "url": "http://lister.agents.svc:15006/mcp", "agent": "lister" }));
    apply::<AgentIdentity>(&client, &ns, caller).await?;
    let caller_token = kube_fixtures::pod_token(
        &client,
        &ns,
        "caller",
        "caller-0",
        kube_fixtures::SIDECAR_AUDIENCE,
    )
    .await?;
    let caller_sidecar =
        kube_fixtures::SidecarStandIn::connect(&controller().snapshot_endpoint()?, &caller_token)
            .await?;
    let caller_kid = caller_sidecar.send_key().await?;
    let peer_keys = Arc::clone(sidecar.sidecar.peer_keys());
    eventually(Duration::from_secs(5), async || {
        Ok(peer_keys.current().get(&caller_kid).map(|_| ()))
    })
    .await?;
    assert!(
        peer_keys.current().get(&kid).is_none(),
        "the lister does not call itself: its own key is not among its peers'"
    );

    // tools/list through the sidecar: every tool ends up in discoveredTools.
    let mcp = mcp_client(&sidecar).await?;
    let listed = mcp.list_all_tools().await?;
    assert_eq!(
        listed
            .iter()
            .map(|t| t.name.to_string())
            .collect::<Vec<_>>(),
        ["get_order"]
    );
    let agents: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns);
    let discovered = eventually(Duration::from_secs(10), async || {
        let status = agents.get("lister").await?.status.unwrap_or_default();
        let tools: BTreeSet<String> = status
            .discovered_tools
            .iter()
            .map(|t| format!("{}/{}", t.server, t.name))
            .collect();
        Ok((tools.len() == TOOLS.len()).then_some(status.discovered_tools))
    })
    .await?;
    assert!(
        discovered
            .iter()
            .any(|t| t.name == "get_order" && t.governed),
        "{discovered:?}"
    );
    assert!(
        discovered
            .iter()
            .any(|t| t.name == "delete_all" && !t.governed),
        "{discovered:?}"
    );

    // Audit records reach the controller.
    call(&mcp, "get_order").await.map_err(anyhow::Error::msg)?;
    eventually(Duration::from_secs(10), async || {
        let metrics = http_get_async(admin, "/metrics").await;
        let received = metrics
            .lines()
            .find(|l| l.starts_with("chaperone_controller_audit_records_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        Ok((received >= 1.0).then_some(()))
    })
    .await?;
    let _ = mcp.cancel().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_just_before_the_sidecar_stops_still_becomes_an_event() -> Result<()> {
    let (client, ns) = setup().await?;
    let upstream = start_upstream().await?;
    apply::<AgentIdentity>(&client, &ns, agent("closer", upstream)).await?;
    apply::<ToolPolicy>(&client, &ns, policy("shop", "closer", "get_order")).await?;
    let token = kube_fixtures::pod_token(
        &client,
        &ns,
        "closer",
        "closer-0",
        kube_fixtures::SIDECAR_AUDIENCE,
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let token_file = write_token(dir.path(), &token)?;
    let ca_file = tokio::task::spawn_blocking(|| controller().ca_file.clone()).await?;
    let controller_at = controller_settings(grpc_address(), &token_file, ca_file);
    let settings = Settings {
        pod_name: "closer-0".to_owned(),
        controller: Some(controller_at.clone()),
        shutdown_grace: Duration::from_secs(3),
        ..Settings::default()
    };
    // The sidecar as its binary runs it: `Sidecar::run`, stopped by a signal.
    let audit = chaperone_sidecar::audit::AuditBuffer::default();
    let sidecar = chaperone_sidecar::Sidecar::new(
        settings,
        chaperone_sidecar::AuditOutput::Writer(Box::new(audit.clone())),
        true,
    )?;
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_port = proxy.local_addr()?.port();
    let listeners = chaperone_sidecar::Listeners {
        proxy: Some(proxy),
        inbound: None,
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = sidecar.clone();
    let run = tokio::spawn(async move {
        running
            .run(
                listeners,
                chaperone_sidecar::SnapshotFeed::Controller(controller_at),
                Duration::from_secs(1),
                async {
                    let _ = stopped.await;
                },
            )
            .await
    });
    let source = Arc::clone(sidecar.snapshots());
    eventually(Duration::from_secs(10), async || {
        Ok(source.current().map(|_| ()))
    })
    .await?;

    // `refund` is not allowed: denied (a stateless 2026-07-28 call on a
    // connection that closes after it), and the record still lingers in its
    // batch when the sidecar is told to stop right after.
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {
            "name": "refund", "arguments": {},
            "_meta": { "io.modelcontextprotocol/protocolVersion": "2026-07-28" }
        }
    })
    .to_string();
    let headers = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "refund"),
    ];
    let denied = http_request_async(proxy_port, json_post("/shop", &headers, &body)).await;
    assert!(denied.contains("Chaperone denied this call"), "{denied}");
    let stopping = Instant::now();
    stop.send(())
        .map_err(|()| anyhow::anyhow!("the sidecar stopped early"))?;
    let outcome = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .context("the sidecar did not stop")??;
    assert!(outcome.is_ok(), "{outcome:?}");
    // No connection was open: nothing to wait for but the controller.
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    let last = audit.records().pop().context("no audit record")?;
    assert_eq!(last["final"], true, "{last}");

    let denial = eventually(Duration::from_secs(10), async || {
        let denials = kube_fixtures::events_with_reason(&client, &ns, "ToolCallDenied").await?;
        Ok(denials.into_iter().next())
    })
    .await
    .context("the denial's record never reached the controller")?;
    let note = denial.note.unwrap_or_default();
    assert!(note.contains("refund"), "{note}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_controller_means_503_and_not_ready() -> Result<()> {
    setup().await?;
    let dir = tempfile::tempdir()?;
    let token_file = write_token(dir.path(), "unused")?;
    // Nothing listens on this port.
    let dead = format!("127.0.0.1:{}", free_port()?);
    let sidecar = start_sidecar("lonely-0", dead, &token_file).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sidecar.ready_status().await, 503);
    assert_eq!(raw_call_status(&sidecar).await, 503);
    assert!(!sidecar.sidecar.snapshots().is_ready());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_agent_identity_refuses_every_call() -> Result<()> {
    let (client, ns) = setup().await?;
    let upstream = start_upstream().await?;
    apply::<AgentIdentity>(&client, &ns, agent("worker", upstream)).await?;
    apply::<ToolPolicy>(&client, &ns, policy("shop", "worker", "get_order")).await?;
    let token = kube_fixtures::pod_token(
        &client,
        &ns,
        "worker",
        "worker-0",
        kube_fixtures::SIDECAR_AUDIENCE,
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let token_file = write_token(dir.path(), &token)?;
    let sidecar = start_sidecar("worker-0", grpc_address(), &token_file).await?;
    sidecar.wait_for_version(0, Duration::from_secs(10)).await?;
    let mcp = mcp_client(&sidecar).await?;
    call(&mcp, "get_order").await.map_err(anyhow::Error::msg)?;

    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .delete("worker", &DeleteParams::default())
        .await?;
    let source = Arc::clone(sidecar.sidecar.snapshots());
    eventually(Duration::from_secs(5), async || {
        Ok((!source.is_ready()).then_some(()))
    })
    .await?;
    assert_eq!(sidecar.ready_status().await, 503);
    assert_eq!(raw_call_status(&sidecar).await, 503);
    let _ = mcp.cancel().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cut_off_from_the_controller_withdraws_its_snapshot_after_max_disconnected_seconds()
-> Result<()> {
    let (client, ns) = setup().await?;
    let upstream = start_upstream().await?;
    let mut strict = agent("strict", upstream);
    strict["spec"]["maxDisconnectedSeconds"] = json!(5);
    apply::<AgentIdentity>(&client, &ns, strict).await?;
    apply::<AgentIdentity>(&client, &ns, agent("lenient", upstream)).await?;
    for name in ["strict", "lenient"] {
        apply::<ToolPolicy>(&client, &ns, policy(name, name, "get_order")).await?;
    }
    let relay = Relay::to_controller().await?;
    let dir = tempfile::tempdir()?;
    let mut sidecars = Vec::new();
    for name in ["strict", "lenient"] {
        let pod = format!("{name}-0");
        let token =
            kube_fixtures::pod_token(&client, &ns, name, &pod, kube_fixtures::SIDECAR_AUDIENCE)
                .await?;
        let token_dir = dir.path().join(name);
        std::fs::create_dir(&token_dir)?;
        let token_file = write_token(&token_dir, &token)?;
        let sidecar = start_sidecar(&pod, relay.address.clone(), &token_file).await?;
        sidecar.wait_for_version(0, Duration::from_secs(10)).await?;
        let mcp = mcp_client(&sidecar).await?;
        call(&mcp, "get_order").await.map_err(anyhow::Error::msg)?;
        sidecars.push((sidecar, mcp));
    }
    let [(strict, strict_mcp), (lenient, lenient_mcp)] = &sidecars[..] else {
        unreachable!()
    };

    let cut_at = Instant::now();
    relay.cut();
    // Within the limit the last snapshot is enforced as before.
    tokio::time::sleep(Duration::from_secs(1)).await;
    call(strict_mcp, "get_order")
        .await
        .map_err(anyhow::Error::msg)?;
    let source = Arc::clone(strict.sidecar.snapshots());
    eventually(Duration::from_secs(15), async || {
        Ok((!source.is_ready()).then_some(()))
    })
    .await?;
    let withdrawn_after = cut_at.elapsed();
    assert!(
        withdrawn_after >= Duration::from_secs(5),
        "withdrawn {withdrawn_after:?} after the cut, before maxDisconnectedSeconds"
    );
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order","arguments":{}}}"#;
    let refused = http_request_async(strict.proxy_port, json_post("/shop", &[], body)).await;
    assert_eq!(status_code(&refused), 503, "{refused}");
    assert!(
        refused.contains("unreachable for more than 5 s"),
        "the refusal does not say why: {refused}"
    );
    assert_eq!(strict.ready_status().await, 503);
    let ready = http_get_async(strict.admin_port, chaperone_wire::sidecar_env::READYZ_PATH).await;
    assert!(ready.contains("withdrawn"), "{ready}");
    // The agent without the setting keeps its last snapshot.
    assert!(lenient.sidecar.snapshots().is_ready());
    call(lenient_mcp, "get_order")
        .await
        .map_err(anyhow::Error::msg)?;

    // Back in touch: the controller's snapshot is in force again.
    relay.restore();
    strict.wait_for_version(0, Duration::from_secs(10)).await?;
    call(strict_mcp, "get_order")
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(strict.ready_status().await, 200);
    for (_, mcp) in sidecars {
        let _ = mcp.cancel().await;
    }
    Ok(())
}
