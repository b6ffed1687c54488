//! The worker app: an agent's own MCP endpoint (what its sidecar's inbound side
//! fronts) whose tools do their work by calling tool servers THROUGH the
//! agent's sidecar.
//!
//! For every tool server it is configured with, it offers one tool
//! `run_<server>` taking `{"tool": <name>, "arguments": {...}}`; a call opens an
//! MCP session with `<sidecar>/<server>` (the sidecar's outbound proxy,
//! `CHAPERONE_MCP_URL`, default `http://127.0.0.1:15001`), calls `<tool>` with
//! those arguments and answers with the result's text, or with an error result
//! holding the error's text (a denial by a sidecar included).
//!
//! The `Chaperone-Session` header the sidecar's inbound side put on the incoming
//! request (the delegated or user-initiated session of this task) is sent back
//! on the onward calls, so the sidecar decides them inside that session; a
//! request without it makes calls on the agent's own authority. Nothing else of
//! the incoming request (no `Authorization`) is passed on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
    ContentBlock, Implementation, JsonObject, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};

/// The header naming the task's session, from the sidecar's inbound side.
pub const SESSION_HEADER: &str = "chaperone-session";
/// Where the sidecar's outbound proxy listens in an injected pod.
pub const DEFAULT_SIDECAR_URL: &str = "http://127.0.0.1:15001";
/// Prefix of the worker's tool names: `run_<server>`.
pub const TOOL_PREFIX: &str = "run_";
/// How long one onward call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The worker app's MCP handler.
#[derive(Clone, Debug)]
pub struct WorkerApp {
    sidecar: Arc<str>,
    servers: Arc<[String]>,
}

impl WorkerApp {
    /// A worker calling `servers` through the sidecar proxy at `sidecar`
    /// (e.g. `http://127.0.0.1:15001`).
    pub fn new(sidecar: impl Into<String>, servers: impl IntoIterator<Item = String>) -> Self {
        let sidecar: String = sidecar.into();
        Self {
            sidecar: Arc::from(sidecar.trim_end_matches('/')),
            servers: servers.into_iter().collect(),
        }
    }

    fn tool(&self, server: &str) -> Tool {
        let schema: JsonObject = match json!({
            "type": "object",
            "properties": {
                "tool": {"type": "string", "description": format!("the {server} tool to call")},
                "arguments": {"type": "object", "description": "its arguments"},
            },
            "required": ["tool"],
        }) {
            Value::Object(schema) => schema,
            _ => unreachable!("json! of an object literal is an object"),
        };
        Tool::new(
            format!("{TOOL_PREFIX}{server}"),
            format!("Call a tool of {server} through this agent's sidecar."),
            Arc::new(schema),
        )
    }
}

impl ServerHandler for WorkerApp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(
            Implementation::new("chaperone-demo-worker", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(
            self.servers.iter().map(|s| self.tool(s)).collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let Some(server) = request
            .name
            .strip_prefix(TOOL_PREFIX)
            .filter(|s| self.servers.iter().any(|known| known == s))
        else {
            return Err(ErrorData::invalid_params(
                format!("the worker has no tool {:?}", request.name),
                None,
            ));
        };
        let args = request.arguments.unwrap_or_default();
        let Some(tool) = args.get("tool").and_then(Value::as_str) else {
            return Err(ErrorData::invalid_params("`tool` must be a string", None));
        };
        let arguments = match args.get("arguments") {
            None | Some(Value::Null) => JsonObject::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(_) => {
                return Err(ErrorData::invalid_params(
                    "`arguments` must be an object",
                    None,
                ));
            }
        };
        let session = context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.headers.get(SESSION_HEADER))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        tracing::info!(
            server,
            tool,
            delegated = session.is_some(),
            "worker calls through its sidecar"
        );
        let result =
            call_through_sidecar(&self.sidecar, server, tool, arguments, session.as_deref()).await;
        Ok(match result {
            Ok(text) => CallToolResult::success(vec![ContentBlock::text(text)]),
            Err(text) => CallToolResult::error(vec![ContentBlock::text(text)]),
        }
        .into())
    }
}

/// Calls `server`/`tool` with `arguments` through the sidecar proxy at
/// `sidecar` in a fresh MCP session, sending `session` as `Chaperone-Session`.
/// `Ok` holds the text of a successful result; `Err` the text of an error
/// result or of the error (transport, JSON-RPC denial, timeout).
pub async fn call_through_sidecar(
    sidecar: &str,
    server: &str,
    tool: &str,
    arguments: JsonObject,
    session: Option<&str>,
) -> Result<String, String> {
    let url = format!("{}/{server}", sidecar.trim_end_matches('/'));
    let mut headers = HashMap::new();
    if let Some(token) = session {
        let value = HeaderValue::from_str(token).map_err(|_| "invalid Chaperone-Session")?;
        headers.insert(HeaderName::from_static(SESSION_HEADER), value);
    }
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url.clone()).custom_headers(headers),
    );
    let info = ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("chaperone-demo-worker", env!("CARGO_PKG_VERSION")),
    );
    let call = async {
        let client = info
            .serve(transport)
            .await
            .map_err(|e| format!("opening an MCP session with {url}: {e}"))?;
        let result = client
            .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
            .await;
        let _ = client.cancel().await;
        let result = result.map_err(|e| format!("{server}/{tool}: {e}"))?;
        let text = text_of(&result.content);
        if result.is_error == Some(true) {
            Err(text)
        } else {
            Ok(text)
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{server}/{tool}: no answer within {CALL_TIMEOUT:?}"
            ))
        })
}

/// The text blocks of a result, one per line.
fn text_of(content: &[ContentBlock]) -> String {
    content
        .iter()
        .filter_map(|block| block.as_text().map(|t| t.text.as_str()))
        .collect::<Vec<_>>()
        .join("\n")
}
