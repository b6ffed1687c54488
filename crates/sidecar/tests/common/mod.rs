//! Test harness: a real rmcp MCP server (JSON or SSE responses), the sidecar in
//! front of it with a policy directory, rmcp clients and a raw HTTP client;
//! [`controller`] is a fake controller for the snapshot stream.

#![allow(dead_code, missing_docs)]

pub mod controller;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chaperone_sidecar::{AuditOutput, Settings, Sidecar, standalone};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ContentBlock,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt};

/// Tools of the test server, in listing order.
pub const TOOLS: [&str; 5] = [
    "get_order",
    "read_customer",
    "send_email",
    "refund",
    "delete_all",
];

/// Headers each `tools/call` carried to the server.
pub type SeenHeaders = Arc<Mutex<Vec<http::HeaderMap>>>;

#[derive(Clone)]
pub struct ShopServer {
    seen: SeenHeaders,
}

impl ServerHandler for ShopServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        // Two tools per page: pagination through the sidecar is exercised.
        let start: usize = request
            .and_then(|r| r.cursor)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let schema: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({"type": "object"})).unwrap();
        let schema = Arc::new(schema);
        let tools: Vec<Tool> = TOOLS
            .iter()
            .skip(start)
            .take(2)
            .map(|name| Tool::new(*name, format!("the {name} tool"), Arc::clone(&schema)))
            .collect();
        let mut result = ListToolsResult::with_all_items(tools);
        if start + 2 < TOOLS.len() {
            result.next_cursor = Some((start + 2).to_string());
        }
        Ok(result)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if let Some(parts) = context.extensions.get::<http::request::Parts>() {
            self.seen.lock().unwrap().push(parts.headers.clone());
        }
        let args = serde_json::Value::Object(request.arguments.unwrap_or_default());
        Ok(CallToolResult::success(vec![ContentBlock::text(format!(
            "{} done with {args}",
            request.name
        ))])
        .into())
    }
}

/// A running MCP server.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: SeenHeaders,
}

/// Starts the MCP server; `json` selects JSON responses (stateless), otherwise
/// SSE responses with sessions.
pub async fn start_upstream(json: bool) -> Upstream {
    let seen: SeenHeaders = Arc::default();
    let handler = ShopServer {
        seen: Arc::clone(&seen),
    };
    let config = StreamableHttpServerConfig::default()
        .with_sse_keep_alive(None)
        .with_legacy_session_mode(!json)
        .with_json_response(json);
    let service: StreamableHttpService<ShopServer, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(handler.clone()), Default::default(), config);
    let service = Arc::new(service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = Arc::clone(&service);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let service = Arc::clone(&service);
                    async move { Ok::<_, Infallible>(service.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, seen }
}

pub const IDENTITY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata:
  name: support-agent
  namespace: shop
spec:
  selector:
    serviceAccountName: support-agent
  toolServers:
    - name: shop
      url: UPSTREAM_URL
  session:
    idleTimeoutSeconds: 600
    maxCalls: 50
"#;

pub const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata:
  name: support
  namespace: shop
spec:
  targetRefs:
    - name: support-agent
  tools:
    - name: read_customer
      effects: [sensitiveData]
    - name: send_email
      effects: [externalCommunication]
  rules:
    - name: no-exfiltration
      action: deny
      tools:
        - effect: externalCommunication
      when:
        session:
          anyEffectSeen: [sensitiveData]
    - name: allow-support-tools
      action: allow
      tools:
        - name: get_order
        - name: read_customer
        - name: send_email
    - name: small-refunds
      action: allow
      tools:
        - name: refund
      when:
        args:
          - pointer: /amount
            lessThanOrEqual: 100
      rateLimit:
        calls: 3
        periodSeconds: 60
"#;

/// A shared, inspectable audit sink.
pub use chaperone_sidecar::audit::AuditBuffer;

/// The sidecar under test.
pub struct Harness {
    pub sidecar: Sidecar,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: Upstream,
    pub audit: AuditBuffer,
    pub dir: tempfile::TempDir,
    pub version: u64,
}

impl Harness {
    /// Sidecar and server; with `load`, the standard policy is in force.
    pub async fn start(json: bool, load: bool) -> Self {
        Self::start_with(json, load, Settings::default()).await
    }

    pub async fn start_with(json: bool, load: bool, settings: Settings) -> Self {
        let audit = AuditBuffer::default();
        let output = AuditOutput::Writer(Box::new(audit.clone()));
        Self::start_with_output(json, load, settings, output, audit).await
    }

    /// Like [`Harness::start_with`], writing the audit trail to `output`
    /// (`audit` is what the harness reports as written).
    pub async fn start_with_output(
        json: bool,
        load: bool,
        settings: Settings,
        output: AuditOutput,
        audit: AuditBuffer,
    ) -> Self {
        let upstream = start_upstream(json).await;
        let sidecar = Sidecar::new(settings, output, true).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let s = sidecar.clone();
        tokio::spawn(async move { s.serve_proxy(listener, std::future::pending()).await });
        let s = sidecar.clone();
        tokio::spawn(async move { s.serve_admin(admin_listener, std::future::pending()).await });
        let dir = tempfile::tempdir().unwrap();
        let mut harness = Self {
            sidecar,
            addr,
            admin,
            upstream,
            audit,
            dir,
            version: 0,
        };
        harness.write_policy(POLICY);
        if load {
            harness.reload();
        }
        harness
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn write_policy(&self, policy: &str) {
        let url = format!("http://{}/mcp", self.upstream.addr);
        std::fs::write(
            self.dir.path().join("identity.yaml"),
            IDENTITY.replace("UPSTREAM_URL", &url),
        )
        .unwrap();
        std::fs::write(self.dir.path().join("policy.yaml"), policy).unwrap();
    }

    /// Compiles the directory into a new snapshot version.
    pub fn reload(&mut self) {
        self.version += 1;
        standalone::load(
            &self.policy_dir(),
            None,
            self.version,
            self.sidecar.snapshots(),
        )
        .unwrap();
    }

    pub fn url(&self) -> String {
        format!("http://{}/shop", self.addr)
    }

    /// An rmcp client session through the sidecar.
    pub async fn client(&self) -> RunningService<RoleClient, ClientConfig> {
        self.client_with_headers(Default::default()).await
    }

    pub async fn client_with_headers(
        &self,
        headers: std::collections::HashMap<http::HeaderName, http::HeaderValue>,
    ) -> RunningService<RoleClient, ClientConfig> {
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(self.url()).custom_headers(headers),
        );
        ClientConfig::default().serve(transport).await.unwrap()
    }
}

/// Calls `tool` with `args`; `Ok(text)` or `Err(error message)`.
pub async fn call(
    client: &RunningService<RoleClient, ClientConfig>,
    tool: &'static str,
    args: serde_json::Value,
) -> Result<String, String> {
    let args: serde_json::Map<String, serde_json::Value> = serde_json::from_value(args).unwrap();
    match client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(args))
        .await
    {
        Ok(result) => Ok(format!("{:?}", result.content)),
        Err(err) => Err(err.to_string()),
    }
}

/// A raw HTTP response.
#[derive(Debug)]
pub struct Raw {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Raw {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// Sends a raw POST through the sidecar.
pub async fn post_raw(url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Raw {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut request = http::Request::post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(request.body(Full::new(body.into())).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Raw {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A raw GET.
pub async fn get_raw(url: &str) -> Raw {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let response = client
        .request(
            http::Request::get(url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Raw {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Initializes a raw session; returns its `Mcp-Session-Id` (if the server issues one).
pub async fn raw_initialize(url: &str) -> Option<String> {
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
    let response = post_raw(url, &[], init).await;
    assert!(
        response.status.is_success(),
        "initialize: {}",
        response.status
    );
    let sid = response
        .headers
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut headers = vec![("mcp-protocol-version", "2025-06-18")];
    if let Some(sid) = sid.as_deref() {
        headers.push(("mcp-session-id", sid));
    }
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    post_raw(url, &headers, initialized).await;
    sid
}
