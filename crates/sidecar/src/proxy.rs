//! The MCP proxy on `127.0.0.1:15001`: `/<toolServer>[/…]` goes to that tool
//! server's URL from the snapshot, over MCP's Streamable HTTP transport.
//!
//! POST bodies (bounded) are parsed strictly and every governed message decided
//! on its own; what is allowed is forwarded byte for byte (re-encoded only when a
//! batch loses denied members), with one assertion per allowed call. Responses are
//! streamed: SSE events pass through as they come unless they carry a list result
//! (filtered by the same rules), and JSON bodies are buffered only when a list
//! must be filtered or denials merged. GET streams and DELETE pass through with
//! the same session checks. Every `Chaperone-*` header the agent sends is
//! dropped.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::assertion::ASSERTION_HEADER;
use crate::assertion::random_id;
use crate::authz::{CallRequest, Enforcer, Governed, classify};
use crate::client::UpstreamClient;
use crate::jsonrpc::{self, Message, ParseError, Payload, parse_payload, parse_strict};
use crate::metrics::{Metrics, RefusalLabels};
use crate::refusal::{
    MethodNotAllowed, NoSnapshot, Refusal, UnknownDelegatedSession, UnknownServer, UnknownSession,
    UpstreamResponseRefused, UpstreamUnavailable,
};
use crate::session::{SessionKey, SessionState, SessionStore, SharedSession, lock};
use crate::settings::Settings;
use crate::snapshot::{ActivePolicy, SnapshotSource, Upstream};
use crate::sse::{EventRewrite, RewritingSseBody};

/// Errors of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the proxy sends.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// The header that names an inbound-opened session to the agent, which sends
/// it back with the calls it makes for that task.
pub const CHAPERONE_SESSION: HeaderName = HeaderName::from_static("chaperone-session");
/// Key space of inbound-opened sessions in their store.
const DELEGATED: &str = "chaperone-session";
const JSON_RPC_INVALID_PARAMS: i64 = -32602;

/// The proxy: snapshot, sessions, enforcement and the upstream client.
pub struct Gateway {
    /// Settings.
    pub settings: Settings,
    /// The policy in force.
    pub source: Arc<SnapshotSource>,
    /// Sessions.
    pub sessions: SessionStore,
    /// Sessions opened at the inbound side (delegated or user-initiated), by
    /// their `Chaperone-Session` token.
    pub delegated: SessionStore,
    /// Decisions, audit, assertions.
    pub enforcer: Enforcer,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The HTTP(S) client towards tool servers and the pod's own endpoint.
    pub client: UpstreamClient,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Copies the agent's headers for the upstream: no hop-by-hop headers, no
/// `Host`/`Content-Length` (set anew), and none of the `Chaperone-*` headers.
pub(crate) fn forward_headers(src: &HeaderMap, authority: &http::uri::Authority) -> HeaderMap {
    let mut dst = HeaderMap::with_capacity(src.len() + 2);
    for (name, value) in src {
        if is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name.as_str().starts_with("chaperone-")
        {
            continue;
        }
        dst.append(name.clone(), value.clone());
    }
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        dst.insert(header::HOST, host);
    }
    dst
}

fn content_type_is(headers: &HeaderMap, prefix: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with(prefix))
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(&MCP_SESSION_ID).and_then(|v| v.to_str().ok())
}

/// Splits `/<server>/<rest>` into the server and `/<rest>` (possibly empty).
fn split_path(path: &str) -> (&str, &str) {
    let path = path.strip_prefix('/').unwrap_or(path);
    match path.find('/') {
        Some(at) => (&path[..at], &path[at..]),
        None => (path, ""),
    }
}

impl Gateway {
    /// A gateway with its upstream client.
    pub fn new(
        settings: Settings,
        source: Arc<SnapshotSource>,
        enforcer: Enforcer,
        metrics: Arc<Metrics>,
        client: UpstreamClient,
    ) -> Self {
        Self {
            sessions: SessionStore::new(settings.max_sessions),
            delegated: SessionStore::new(settings.max_sessions),
            settings,
            source,
            enforcer,
            metrics,
            client,
        }
    }

    /// Handles one request; never fails (refusals become responses).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        match self.route(req).await {
            Ok(response) => response,
            Err(refusal) => self.refuse(&refusal),
        }
    }

    /// The response of a refusal (counted by reason).
    pub(crate) fn refuse(&self, refusal: &Refusal) -> Response<ResponseBody> {
        self.metrics
            .refused
            .get_or_create(&RefusalLabels {
                reason: refusal.label(),
            })
            .inc();
        let mut response = json_response(refusal.status(), &refusal.body());
        if matches!(refusal, Refusal::NoSnapshot(_)) {
            // Not ready yet: tell clients when to try again rather than fail.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    async fn route(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Refusal> {
        let active = self.source.current().ok_or(NoSnapshot)?;
        let (server, rest) = split_path(req.uri().path());
        let upstream = active
            .upstreams
            .get(server)
            .ok_or_else(|| UnknownServer(server.to_owned()))?;
        let mut url = String::with_capacity(upstream.base_url.len() + rest.len() + 16);
        url.push_str(&upstream.base_url);
        url.push_str(rest);
        if let Some(query) = req.uri().query() {
            url.push('?');
            url.push_str(query);
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|_| UpstreamUnavailable(upstream.name.clone()))?;
        match *req.method() {
            Method::POST => self.post(req, &active, upstream, uri).await,
            Method::GET => self.get(req, &active, upstream, uri).await,
            Method::DELETE => self.delete(req, &active, upstream, uri).await,
            _ => Err(MethodNotAllowed.into()),
        }
    }

    fn idle_timeout(active: &ActivePolicy) -> Duration {
        Duration::from_secs(u64::from(
            active.snapshot.content.session.idle_timeout_seconds,
        ))
    }

    /// The session a request with `headers` belongs to: `Ok(None)` for an
    /// `initialize` without a session id (created when the upstream answers).
    fn session_for(
        &self,
        active: &ActivePolicy,
        upstream: &Upstream,
        headers: &HeaderMap,
        initializing: bool,
    ) -> Result<Option<(SharedSession, String)>, Refusal> {
        let now = Instant::now();
        let idle = Self::idle_timeout(active);
        match session_id(headers) {
            Some(id) => {
                let session = self
                    .sessions
                    .get(SessionKey::new(&upstream.name, id), now, idle)
                    .ok_or(UnknownSession)?;
                Ok(Some((session, id.to_owned())))
            }
            None if initializing => Ok(None),
            None => {
                let session =
                    self.sessions
                        .get_or_create(SessionKey::new(&upstream.name, ""), now, idle);
                self.metrics.sessions.set(self.sessions.len() as i64);
                Ok(Some((session, String::new())))
            }
        }
    }

    /// The session named by the agent's `Chaperone-Session` header, if it sent
    /// one; an unknown or expired token is refused (never silently the agent's
    /// own authority).
    fn delegated_session(
        &self,
        active: &ActivePolicy,
        headers: &HeaderMap,
    ) -> Result<Option<SharedSession>, Refusal> {
        let Some(value) = headers.get(CHAPERONE_SESSION) else {
            return Ok(None);
        };
        let token = value.to_str().map_err(|_| UnknownDelegatedSession)?;
        self.delegated
            .get(
                SessionKey::new(DELEGATED, token.trim()),
                Instant::now(),
                Self::idle_timeout(active),
            )
            .map(Some)
            .ok_or_else(|| UnknownDelegatedSession.into())
    }

    /// Opens a session at the inbound side and returns its `Chaperone-Session`
    /// token (unguessable: 128 random bits).
    pub fn open_delegated(&self, mut state: SessionState) -> (String, SharedSession) {
        let token = random_id();
        state.handle = Some(token.clone());
        let shared =
            self.delegated
                .insert(SessionKey::new(DELEGATED, &token), state, Instant::now());
        (token, shared)
    }

    /// The inbound session `token`, if it is live.
    pub fn find_delegated(&self, token: &str, idle: Duration) -> Option<SharedSession> {
        self.delegated
            .get(SessionKey::new(DELEGATED, token), Instant::now(), idle)
    }

    async fn post(
        self: &Arc<Self>,
        req: Request<Incoming>,
        active: &Arc<ActivePolicy>,
        upstream: &Upstream,
        uri: http::Uri,
    ) -> Result<Response<ResponseBody>, Refusal> {
        let limit = self.settings.max_body_bytes;
        let (parts, body) = req.into_parts();
        let bytes = read_body(&parts.headers, body, limit).await?;
        let payload = parse_payload(&bytes, limit)?;
        let (messages, batch) = match payload {
            Payload::Single(message) => (vec![message], false),
            Payload::Batch(messages) => (messages, true),
        };
        let initializing = messages.iter().any(|m| m.method() == Some("initialize"));
        let mut session = self.session_for(active, upstream, &parts.headers, initializing)?;
        let delegated = self.delegated_session(active, &parts.headers)?;

        let mut forwarded: Vec<usize> = Vec::with_capacity(messages.len());
        let mut local: Vec<Value> = Vec::new();
        let mut assertions: Vec<String> = Vec::new();
        let mut lists = false;
        for (index, message) in messages.iter().enumerate() {
            let id = match message {
                Message::Request { id, .. } => Some(id),
                _ => None,
            };
            match classify(message) {
                Governed::Pass => forwarded.push(index),
                Governed::List => {
                    lists = true;
                    forwarded.push(index);
                }
                Governed::Malformed(why) => {
                    if id.is_some() {
                        local.push(jsonrpc::error_response(
                            id,
                            JSON_RPC_INVALID_PARAMS,
                            why,
                            None,
                        ));
                    }
                }
                Governed::Call { name, arguments } => {
                    if session.is_none() {
                        // A call batched with `initialize`: decide it in the
                        // server's session-less context.
                        let now = Instant::now();
                        let shared = self.sessions.get_or_create(
                            SessionKey::new(&upstream.name, ""),
                            now,
                            Self::idle_timeout(active),
                        );
                        session = Some((shared, String::new()));
                    }
                    let Some((mcp_shared, mcp_id)) = session.as_ref() else {
                        continue;
                    };
                    // Inside a delegated (or user-initiated) session the task's
                    // history decides, not the connection's.
                    let shared = delegated.as_ref().unwrap_or(mcp_shared);
                    let outcome = {
                        let mut state = lock(shared);
                        self.enforcer.decide_call(
                            active,
                            upstream,
                            &mut state,
                            &CallRequest {
                                method: message.method().unwrap_or_default(),
                                id,
                                name: &name,
                                arguments,
                                mcp_session_id: mcp_id,
                            },
                        )?
                    };
                    if outcome.forward {
                        forwarded.push(index);
                        assertions.extend(outcome.assertion);
                    } else if let Some(error) = outcome.error
                        && id.is_some()
                    {
                        local.push(error);
                    }
                }
            }
        }

        if forwarded.is_empty() {
            return Ok(if local.is_empty() {
                let mut response = Response::new(full(Bytes::new()));
                *response.status_mut() = StatusCode::ACCEPTED;
                response
            } else if batch {
                json_response(StatusCode::OK, &Value::Array(local))
            } else {
                let first = local.into_iter().next().unwrap_or(Value::Null);
                json_response(StatusCode::OK, &first)
            });
        }
        let body = if forwarded.len() == messages.len() {
            bytes
        } else {
            let kept: Vec<&Value> = forwarded.iter().map(|i| messages[*i].raw()).collect();
            Bytes::from(serde_json::to_vec(&kept).unwrap_or_default())
        };

        let mut headers = forward_headers(&parts.headers, &upstream.authority);
        if !assertions.is_empty()
            && let Ok(value) = HeaderValue::from_str(&assertions.join(", "))
        {
            headers.insert(HeaderName::from_static(ASSERTION_HEADER), value);
        }
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let response = self.send(request, upstream).await?;

        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        if initializing
            && rparts.status.is_success()
            && let Some(id) = session_id(&rparts.headers)
        {
            self.sessions
                .create(SessionKey::new(&upstream.name, id), Instant::now());
            self.metrics.sessions.set(self.sessions.len() as i64);
        }
        if content_type_is(&rparts.headers, "text/event-stream") {
            let mut prefix = String::new();
            for error in &local {
                prefix.push_str("event: message\ndata: ");
                prefix.push_str(&error.to_string());
                prefix.push_str("\n\n");
            }
            rparts.headers.remove(header::CONTENT_LENGTH);
            let body = self.rewrite_sse(rbody, &upstream.name, prefix);
            return Ok(Response::from_parts(rparts, body));
        }
        if content_type_is(&rparts.headers, "application/json") && (lists || !local.is_empty()) {
            let limit = self.settings.max_response_bytes;
            let bytes = match Limited::new(rbody, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) => return Err(UpstreamResponseRefused(err.to_string()).into()),
            };
            let mut value = parse_strict(&bytes, limit)
                .map_err(|err| UpstreamResponseRefused(err.to_string()))?;
            match &mut value {
                Value::Array(items) => {
                    for item in items.iter_mut() {
                        self.enforcer.filter_response(active, &upstream.name, item);
                    }
                    items.extend(local);
                }
                single => {
                    self.enforcer
                        .filter_response(active, &upstream.name, single);
                    if !local.is_empty() {
                        let mut items = vec![single.take()];
                        items.extend(local);
                        value = Value::Array(items);
                    }
                }
            }
            rparts.headers.remove(header::CONTENT_LENGTH);
            return Ok(Response::from_parts(rparts, full(value.to_string())));
        }
        if !local.is_empty() && rparts.status == StatusCode::ACCEPTED {
            // Only notifications and responses were forwarded: the denials are
            // the whole answer.
            return Ok(json_response(StatusCode::OK, &Value::Array(local)));
        }
        if !local.is_empty() {
            // The tool server answered something that is neither JSON nor SSE
            // (an HTTP error page): the local denials must not be lost with it.
            // Each forwarded request gets an error naming the server's status.
            let message = format!(
                "tool server {:?} answered HTTP {} to this batch",
                upstream.name, rparts.status
            );
            for index in &forwarded {
                if let Message::Request { id, .. } = &messages[*index] {
                    local.push(jsonrpc::error_response(
                        Some(id),
                        jsonrpc::INTERNAL_ERROR,
                        &message,
                        None,
                    ));
                }
            }
            let body = if batch {
                Value::Array(local)
            } else {
                local.into_iter().next().unwrap_or(Value::Null)
            };
            return Ok(json_response(StatusCode::OK, &body));
        }
        Ok(Response::from_parts(
            rparts,
            rbody.map_err(BoxError::from).boxed_unsync(),
        ))
    }

    async fn get(
        self: &Arc<Self>,
        req: Request<Incoming>,
        active: &Arc<ActivePolicy>,
        upstream: &Upstream,
        uri: http::Uri,
    ) -> Result<Response<ResponseBody>, Refusal> {
        if let Some(id) = session_id(req.headers()) {
            let key = SessionKey::new(&upstream.name, id);
            self.sessions
                .get(key, Instant::now(), Self::idle_timeout(active))
                .ok_or(UnknownSession)?;
        }
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        *request.headers_mut() = forward_headers(req.headers(), &upstream.authority);
        let response = self.send(request, upstream).await?;
        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        if content_type_is(&rparts.headers, "text/event-stream") {
            rparts.headers.remove(header::CONTENT_LENGTH);
            let body = self.rewrite_sse(rbody, &upstream.name, String::new());
            return Ok(Response::from_parts(rparts, body));
        }
        Ok(Response::from_parts(
            rparts,
            rbody.map_err(BoxError::from).boxed_unsync(),
        ))
    }

    async fn delete(
        self: &Arc<Self>,
        req: Request<Incoming>,
        _active: &Arc<ActivePolicy>,
        upstream: &Upstream,
        uri: http::Uri,
    ) -> Result<Response<ResponseBody>, Refusal> {
        let sid = session_id(req.headers()).map(str::to_owned);
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.method_mut() = Method::DELETE;
        *request.uri_mut() = uri;
        *request.headers_mut() = forward_headers(req.headers(), &upstream.authority);
        let response = self.send(request, upstream).await?;
        if let Some(id) = sid
            && response.status().is_success()
        {
            self.sessions.remove(SessionKey::new(&upstream.name, &id));
            self.metrics.sessions.set(self.sessions.len() as i64);
        }
        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        Ok(Response::from_parts(
            rparts,
            rbody.map_err(BoxError::from).boxed_unsync(),
        ))
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
        upstream: &Upstream,
    ) -> Result<Response<Incoming>, Refusal> {
        let started = Instant::now();
        let response = self.client.request(request).await.map_err(|err| {
            tracing::warn!(server = %upstream.name, error = %err, "tool server unavailable");
            UpstreamUnavailable(upstream.name.clone())
        })?;
        self.metrics
            .upstream_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(response)
    }

    fn rewrite_sse(self: &Arc<Self>, body: Incoming, server: &str, prefix: String) -> ResponseBody {
        let rewriter = ListRewriter {
            gateway: Arc::clone(self),
            server: server.to_owned(),
        };
        let body = RewritingSseBody::new(body, rewriter, self.settings.max_response_bytes)
            .map_err(BoxError::from);
        if prefix.is_empty() {
            body.boxed_unsync()
        } else {
            let prefix = Full::new(Bytes::from(prefix)).map_err(|never| match never {});
            Prefixed {
                prefix: Some(prefix),
                rest: body,
            }
            .boxed_unsync()
        }
    }
}

/// Reads a request body of at most `limit` bytes.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ParseError::TooLarge { limit }.into());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ParseError::TooLarge { limit }.into())
        }
        Err(_) => Err(ParseError::Syntax("the request body could not be read".to_owned()).into()),
    }
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Filters list results in SSE events with the snapshot in force when each event
/// arrives.
struct ListRewriter {
    gateway: Arc<Gateway>,
    server: String,
}

/// [`crate::authz::LIST_KEYS`], quoted as they appear in JSON.
const QUOTED_LIST_KEYS: [&[u8]; 4] = [
    b"\"tools\"",
    b"\"resources\"",
    b"\"resourceTemplates\"",
    b"\"prompts\"",
];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl EventRewrite for ListRewriter {
    fn wants(&self, raw: &[u8]) -> bool {
        // Quick scan: a list result names one of the list keys in quotes.
        QUOTED_LIST_KEYS.iter().any(|key| contains(raw, key))
    }

    fn rewrite(&mut self, data: &str) -> Result<Option<String>, String> {
        let active = self
            .gateway
            .source
            .current()
            .ok_or_else(|| "no policy snapshot".to_owned())?;
        let limit = self.gateway.settings.max_response_bytes;
        let mut value = parse_strict(data.as_bytes(), limit).map_err(|e| e.to_string())?;
        let enforcer = &self.gateway.enforcer;
        let changed = match &mut value {
            Value::Array(items) => {
                // Every item is filtered: no short-circuit.
                let mut changed = false;
                for item in items.iter_mut() {
                    changed |= enforcer.filter_response(&active, &self.server, item);
                }
                changed
            }
            single => enforcer.filter_response(&active, &self.server, single),
        };
        Ok(changed.then(|| value.to_string()))
    }
}

/// A body that sends `prefix` before `rest`.
struct Prefixed<P, B> {
    prefix: Option<P>,
    rest: B,
}

impl<P, B> http_body::Body for Prefixed<P, B>
where
    P: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.as_mut() {
            match std::pin::Pin::new(prefix).poll_frame(cx) {
                std::task::Poll::Ready(None) => this.prefix = None,
                other => return other,
            }
        }
        std::pin::Pin::new(&mut this.rest).poll_frame(cx)
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_connections("proxy", listener, shutdown, move |req| {
        let gateway = Arc::clone(&gateway);
        async move { gateway.handle(req).await }
    })
    .await;
}

/// Accepts connections on `listener` until `shutdown` resolves and serves each
/// (HTTP/1.1, or HTTP/2 with prior knowledge) with `handle`; `side` names the
/// listener in logs.
pub(crate) async fn serve_connections<H, F>(
    side: &'static str,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    handle: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<ResponseBody>> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(side, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = handle(req);
                async move { Ok::<_, Infallible>(response.await) }
            });
            if let Err(err) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(side, error = %err, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_server_and_rest() {
        assert_eq!(split_path("/billing"), ("billing", ""));
        assert_eq!(split_path("/billing/x/y"), ("billing", "/x/y"));
        assert_eq!(split_path("/"), ("", ""));
    }
}
