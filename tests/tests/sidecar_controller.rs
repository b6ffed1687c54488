//! The sidecar in controller mode on a real API server: the controller runs
//! in-process, the sidecar (library API) dials its snapshot stream with a real
//! pod-bound ServiceAccount token, and real rmcp MCP clients call a real rmcp
//! tool server through the sidecar.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaperone_api::{AgentIdentity, ToolPolicy};
use chaperone_sidecar::{
    AuditOutput, Settings, Sidecar, SnapshotStream,
    backoff::Backoff,
    settings::{CaSource, ControllerSettings},
};
use chaperone_testenv::{ControlPlane, create_namespace, free_port, kube_fixtures};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
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

/// A raw HTTP/1.0 request on loopback (blocking; for status codes and small
/// bodies). Returns the whole response, status line first.
fn http_request(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(request.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn http_get(port: u16, path: &str) -> String {
    http_request(port, &format!("GET {path} HTTP/1.0\r\n\r\n"))
}

fn status_code(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Kubernetes objects.

async fn setup() -> Result<(Client, String)> {
    tokio::task::spawn_blocking(controller).await?;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "sc").await?;
    Ok((client, ns))
}

async fn apply<K>(client: &Client, ns: &str, object: serde_json::Value) -> Result<()>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = object["metadata"]["name"]
        .as_str()
        .context("name")?
        .to_owned();
    Api::<K>::namespaced(client.clone(), ns)
        .patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&object),
        )
        .await?;
    Ok(())
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

/// A ServiceAccount and a Pod running as it, and a token (audience `chaperone`)
/// bound to that pod.
async fn pod_token(client: &Client, ns: &str, service_account: &str, pod: &str) -> Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let sa = ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some(service_account.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match sas.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let pod_object: Pod = serde_json::from_value(json!({
        "metadata": { "name": pod },
        "spec": { "serviceAccountName": service_account, "containers": [{ "name": "agent", "image": "agent:latest" }] }
    }))?;
    let created = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod_object)
        .await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["chaperone".into()],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: created.metadata.uid.clone(),
            }),
            expiration_seconds: Some(600),
        },
        ..Default::default()
    };
    let response = sas
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    Ok(response
        .status
        .context("token request has no status")?
        .token)
}

/// Polls `check` until it returns Some, for at most `timeout`.
async fn eventually<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("condition not reached within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// Audit records the sidecar writes (its "stdout").
#[derive(Clone, Default)]
struct AuditBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for AuditBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AuditBuffer {
    fn records(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

struct TestSidecar {
    sidecar: Sidecar,
    proxy_port: u16,
    admin_port: u16,
    audit: AuditBuffer,
    stream: tokio::task::JoinHandle<()>,
}

impl Drop for TestSidecar {
    fn drop(&mut self) {
        self.stream.abort();
    }
}

impl TestSidecar {
    /// A sidecar for `pod` dialling the controller at `address` with the token
    /// in `token_file`; it reconnects quickly (50 ms doubling up to 500 ms).
    async fn start(pod: &str, address: String, token_file: &Path) -> Result<Self> {
        let ca_file = tokio::task::spawn_blocking(|| controller().ca_file.clone()).await?;
        let settings = Settings {
            pod_name: pod.to_owned(),
            controller: Some(ControllerSettings {
                address,
                server_name: "localhost".into(),
                token_file: token_file.to_owned(),
                ca: CaSource::File(ca_file),
            }),
            ..Settings::default()
        };
        let audit = AuditBuffer::default();
        let sidecar = Sidecar::new(
            settings.clone(),
            AuditOutput::Writer(Box::new(audit.clone())),
            true,
        )?;
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (proxy_port, admin_port) = (proxy.local_addr()?.port(), admin.local_addr()?.port());
        let s = sidecar.clone();
        tokio::spawn(async move { s.serve_proxy(proxy, std::future::pending()).await });
        let s = sidecar.clone();
        tokio::spawn(async move { s.serve_admin(admin, std::future::pending()).await });
        let stream = tokio::spawn(
            SnapshotStream::new(sidecar.clone(), settings.controller.context("controller")?)
                .with_backoff(Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(500),
                ))
                .run(),
        );
        Ok(Self {
            sidecar,
            proxy_port,
            admin_port,
            audit,
            stream,
        })
    }

    async fn ready_status(&self) -> u16 {
        let port = self.admin_port;
        let response = tokio::task::spawn_blocking(move || http_get(port, "/ready"))
            .await
            .unwrap_or_default();
        status_code(&response)
    }

    /// The HTTP status of a raw `tools/call` (no MCP session).
    async fn raw_call_status(&self) -> u16 {
        let port = self.proxy_port;
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order","arguments":{}}}"#;
        let request = format!(
            "POST /shop HTTP/1.0\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let response = tokio::task::spawn_blocking(move || http_request(port, &request))
            .await
            .unwrap_or_default();
        status_code(&response)
    }

    async fn client(&self) -> Result<RunningService<RoleClient, ClientConfig>> {
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(format!(
                "http://127.0.0.1:{}/shop",
                self.proxy_port
            )),
        );
        Ok(ClientConfig::default().serve(transport).await?)
    }

    async fn wait_for_version(&self, newer_than: u64, timeout: Duration) -> Result<u64> {
        let source = Arc::clone(self.sidecar.snapshots());
        eventually(timeout, async || {
            Ok(source
                .current()
                .map(|c| c.version())
                .filter(|v| *v > newer_than))
        })
        .await
    }
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

fn write_token(dir: &tempfile::TempDir, token: &str) -> Result<PathBuf> {
    let path = dir.path().join("token");
    // Replace atomically, as the kubelet does on rotation.
    let tmp = dir.path().join("token.tmp");
    std::fs::write(&tmp, token)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn grpc_address() -> String {
    format!("127.0.0.1:{}", controller().grpc_port)
}

async fn http_get_async(port: u16, path: &'static str) -> String {
    tokio::task::spawn_blocking(move || http_get(port, path))
        .await
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforces_the_controllers_snapshot_and_follows_policy_edits() -> Result<()> {
    let (client, ns) = setup().await?;
    let upstream = start_upstream().await?;
    let token = pod_token(&client, &ns, "planner", "planner-0").await?;
    // First a token the API server rejects: the sidecar retries and re-reads the
    // file on each attempt, so the real token (a "rotation") is picked up.
    let dir = tempfile::tempdir()?;
    let token_file = write_token(&dir, "not-a-token")?;
    let sidecar = TestSidecar::start("planner-0", grpc_address(), &token_file).await?;

    // No snapshot yet (bad token, then no AgentIdentity): closed and not ready.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sidecar.raw_call_status().await, 503);
    assert_eq!(sidecar.ready_status().await, 503);
    write_token(&dir, &token)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sidecar.raw_call_status().await, 503);

    apply::<AgentIdentity>(&client, &ns, agent("planner", upstream)).await?;
    apply::<ToolPolicy>(&client, &ns, policy("shop", "planner", "get_order")).await?;
    let first = sidecar.wait_for_version(0, Duration::from_secs(10)).await?;
    assert_eq!(sidecar.ready_status().await, 200);

    let mcp = sidecar.client().await?;
    let allowed = call(&mcp, "get_order").await;
    assert!(
        allowed.as_ref().is_ok_and(|t| t.contains("get_order done")),
        "{allowed:?}"
    );
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
    let token = pod_token(&client, &ns, "lister", "lister-0").await?;
    let dir = tempfile::tempdir()?;
    let token_file = write_token(&dir, &token)?;
    let sidecar = TestSidecar::start("lister-0", grpc_address(), &token_file).await?;
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
    // And the snapshot stream hands the key set back to the sidecar.
    let peer_keys = Arc::clone(sidecar.sidecar.peer_keys());
    eventually(Duration::from_secs(5), async || {
        Ok(peer_keys.current().get(&kid).map(|_| ()))
    })
    .await?;

    // tools/list through the sidecar: every tool ends up in discoveredTools.
    let mcp = sidecar.client().await?;
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
async fn unreachable_controller_means_503_and_not_ready() -> Result<()> {
    setup().await?;
    let dir = tempfile::tempdir()?;
    let token_file = write_token(&dir, "unused")?;
    // Nothing listens on this port.
    let dead = format!("127.0.0.1:{}", free_port()?);
    let sidecar = TestSidecar::start("lonely-0", dead, &token_file).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sidecar.ready_status().await, 503);
    assert_eq!(sidecar.raw_call_status().await, 503);
    assert!(!sidecar.sidecar.snapshots().is_ready());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_agent_identity_refuses_every_call() -> Result<()> {
    let (client, ns) = setup().await?;
    let upstream = start_upstream().await?;
    apply::<AgentIdentity>(&client, &ns, agent("worker", upstream)).await?;
    apply::<ToolPolicy>(&client, &ns, policy("shop", "worker", "get_order")).await?;
    let token = pod_token(&client, &ns, "worker", "worker-0").await?;
    let dir = tempfile::tempdir()?;
    let token_file = write_token(&dir, &token)?;
    let sidecar = TestSidecar::start("worker-0", grpc_address(), &token_file).await?;
    sidecar.wait_for_version(0, Duration::from_secs(10)).await?;
    let mcp = sidecar.client().await?;
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
    assert_eq!(sidecar.raw_call_status().await, 503);
    let _ = mcp.cancel().await;
    Ok(())
}
