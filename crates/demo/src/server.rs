//! The demo's MCP tool server: an rmcp streamable-HTTP server (sessions, SSE
//! responses) answering `tools/list` and `tools/call` for one [`ToolSet`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tokio::net::TcpListener;

use crate::assertion;
use crate::catalog::ToolSet;

/// The `Chaperone-Assertion` header values a tool server received, in order
/// (for tests that check what a governed tool sees).
pub type SeenAssertions = Arc<Mutex<Vec<String>>>;

/// The MCP handler of one demo tool server.
#[derive(Clone, Debug)]
pub struct ToolServer {
    set: ToolSet,
    seen: Option<SeenAssertions>,
}

impl ToolServer {
    /// A server offering the tools of `set`.
    pub fn new(set: ToolSet) -> Self {
        Self { set, seen: None }
    }

    /// The same server, also keeping every `Chaperone-Assertion` it receives
    /// with a `tools/call` in `seen`.
    pub fn recording(mut self, seen: SeenAssertions) -> Self {
        self.seen = Some(seen);
        self
    }
}

impl ServerHandler for ToolServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(
            Implementation::new(
                format!("chaperone-demo-{}", self.set.server_name()),
                env!("CARGO_PKG_VERSION"),
            ),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let tools = self.set.tools().iter().map(|tool| tool.to_mcp()).collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let server = self.set.server_name();
        let assertion = context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.headers.get(assertion::HEADER))
            .and_then(|value| value.to_str().ok());
        let call = format!("{server}/{}", request.name);
        if let (Some(seen), Some(jwt)) = (&self.seen, assertion) {
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(jwt.to_owned());
        }
        match assertion.map(|jwt| (jwt, assertion::unverified_claims(jwt))) {
            Some((_, Some(claims))) => {
                tracing::info!(
                    "tools/call {call} with Chaperone-Assertion {}",
                    assertion::summary(&claims)
                )
            }
            Some((jwt, None)) => tracing::warn!(
                "tools/call {call} with a Chaperone-Assertion that is not a JWT ({} bytes)",
                jwt.len()
            ),
            None => tracing::warn!(
                "tools/call {call} WITHOUT a Chaperone-Assertion (not through a sidecar?)"
            ),
        }
        let Some(tool) = self.set.tool(&request.name) else {
            return Err(ErrorData::invalid_params(
                format!("{server} has no tool {:?}", request.name),
                None,
            ));
        };
        let args = request.arguments.unwrap_or_default();
        let missing = tool.missing_arguments(&args);
        if !missing.is_empty() {
            return Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "missing arguments: {}",
                missing.join(", ")
            ))])
            .into());
        }
        let answer = tool.answer(&args);
        Ok(CallToolResult::success(vec![ContentBlock::text(answer.to_string())]).into())
    }
}

/// Serves `set` over MCP streamable HTTP on `listener` (any path) until the task
/// is dropped. Connection errors are logged and do not stop the server.
pub async fn serve(listener: TcpListener, set: ToolSet) -> std::io::Result<()> {
    serve_handler(listener, ToolServer::new(set)).await
}

/// Serves `handler` (a [`ToolServer`], a [`crate::WorkerApp`], …) over MCP
/// streamable HTTP on `listener` (any path) until the task is dropped.
/// Connection errors are logged and do not stop the server.
pub async fn serve_handler<H>(listener: TcpListener, handler: H) -> std::io::Result<()>
where
    H: ServerHandler + Clone + Send + Sync + 'static,
{
    let config = StreamableHttpServerConfig::default().with_sse_keep_alive(None);
    let service: StreamableHttpService<H, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(handler.clone()), Default::default(), config);
    let service = Arc::new(service);
    loop {
        let (stream, peer) = listener.accept().await?;
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let service = Arc::clone(&service);
                async move { Ok::<_, Infallible>(service.handle(req).await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
}
