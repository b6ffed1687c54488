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
//!
//! A call a `requireApproval` rule matched is held while the controller asks a
//! person ([`crate::approvals`]), up to the hold time, and forwarded once if
//! granted; only a message sent alone can be held (in a batch it is refused).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chaperone_policy::{ScopeHints, ScopeKind, resolve_scope, trace_id_of};

use bytes::Bytes;
use chaperone_json::JsonError;
use chaperone_telemetry::trace_context::request_parent;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpListener;
use tracing::Instrument as _;

use crate::approvals::{
    ApprovalPhase, ApprovalUpdate, Approvals, HeldRefusal, NoController, Waited,
};
use crate::assertion::ASSERTION_HEADER;
use crate::assertion::random_id;
use crate::audit::AuditApproval;
use crate::authz::{
    CallOutcome, CallRequest, Enforcer, Governed, HeldCall, PROTOCOL_VERSION_META, RefusedMessage,
    classify, may_hold_list, message_era,
};
use crate::client::UpstreamClient;
use crate::delegated::DelegatedSessions;
use crate::intake::{
    BodyRouting, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, TRACEPARENT, check_body_headers,
    check_header_binding, check_path_suffix, forward_headers, is_encoded, single_header,
    strip_hop_by_hop,
};
use crate::jsonrpc::{
    self, Id, Message, ParseError, Payload, forwarded_body, parse_body, parse_strict,
};
use crate::listener::{ConnectionLimits, serve_connections};
use crate::methods::Era;
use crate::metrics::{ApprovalLabels, Metrics, RefusalLabels, Stage};
use crate::outcome::{CallWatch, PendingCall, WatchedBody};
use crate::refusal::{
    AuditUnavailable, MethodNotAllowed, Refusal, SlowBody, UnknownDelegatedSession, UnknownServer,
    UnknownSession, UpstreamResponseRefused, UpstreamUnavailable,
};
use crate::session::{
    AGENT_SPACE, SessionKey, SessionState, SessionStore, SharedSession, TRACE_SPACE, lock,
};
use crate::settings::Settings;
use crate::snapshot::{ActivePolicy, SnapshotSource, Upstream};
use crate::spans::{
    Direction, message_span, outgoing_traceparent, record_upstream, record_upstream_failure,
};
use crate::sse::{EventRewrite, RewritingSseBody};
use crate::upstream_secrets::UpstreamSecrets;

/// Errors of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the proxy sends.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// The header that names an inbound-opened session to the agent, which sends
/// it back with the calls it makes for that task.
pub const CHAPERONE_SESSION: HeaderName =
    HeaderName::from_static(chaperone_wire::sidecar_env::SESSION_HEADER);
/// Key space of inbound-opened sessions in their store.
const DELEGATED: &str = "chaperone-session";
/// The rule name of refusals made before policy (malformed or unknown
/// messages, unreadable requests) in audit records and errors.
pub(crate) const PROTOCOL_RULE: &str = "protocol";

/// The proxy: snapshot, sessions, enforcement and the upstream client.
pub struct Gateway {
    /// Settings.
    pub settings: Settings,
    /// The policy in force.
    pub source: Arc<SnapshotSource>,
    /// Sessions.
    pub sessions: SessionStore,
    /// Sessions opened at the inbound side (delegated or user-initiated), by
    /// their `Chaperone-Session` token, in shares per caller.
    pub delegated: DelegatedSessions,
    /// Decisions, audit, assertions.
    pub enforcer: Enforcer,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The HTTP(S) client towards tool servers and the pod's own endpoint.
    pub client: UpstreamClient,
    /// Tool servers' mounted credentials and CAs (`upstreamSecret`).
    pub upstream_secrets: Arc<UpstreamSecrets>,
    /// The audit chain of requests refused before any session was known
    /// (unreadable bodies, unknown servers, unsupported media types).
    pub refusals: SharedSession,
    /// Where tool servers said their OAuth protected resource metadata is.
    pub metadata_locations: crate::oauth::MetadataLocations,
    /// Calls held for a person's approval, asked over the controller stream.
    pub approvals: Arc<Approvals>,
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

/// Whether the `Content-Type` starts with `prefix` (lowercase), in any case.
pub(crate) fn content_type_is(headers: &HeaderMap, prefix: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().as_bytes().get(..prefix.len()))
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes()))
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
        upstream_secrets: Arc<UpstreamSecrets>,
    ) -> Self {
        Self {
            upstream_secrets,
            sessions: SessionStore::new(settings.max_sessions),
            delegated: DelegatedSessions::new(
                settings.max_sessions,
                settings.max_delegated_sessions_per_caller,
            ),
            settings,
            source,
            enforcer,
            metrics,
            client,
            refusals: Arc::new(std::sync::Mutex::new(SessionState::scoped(
                ScopeKind::Unscoped,
                "",
            ))),
            metadata_locations: Default::default(),
            approvals: Arc::new(Approvals::new()),
        }
    }

    /// Handles one request; never fails (refusals become responses).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        self.enforcer
            .audit
            .track_request(async {
                let started = Instant::now();
                let server = split_path(req.uri().path()).0.to_owned();
                let response = match self.route(req, started).await {
                    Ok(response) => response,
                    Err(refusal) => {
                        self.audit_refusal(&server, &refusal);
                        self.refuse(&refusal)
                    }
                };
                self.after_audit(response).await
            })
            .await
    }

    /// Lets `response` go back once the audit records of its request are
    /// written; when the audit output failed, the response is withheld and
    /// the request refused instead.
    pub(crate) async fn after_audit(
        &self,
        response: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        match self.audit_settled().await {
            Ok(()) => response,
            Err(refusal) => self.refuse(&refusal.into()),
        }
    }

    /// Waits until the audit records this request appended are written
    /// ([`crate::audit::AuditLog::track_request`]; outside a request, every
    /// record so far): before a call is forwarded and before a response goes
    /// back, so no call is forwarded or answered unrecorded. Where the output
    /// takes non-blocking writes the request writes them here itself.
    pub(crate) async fn audit_settled(&self) -> Result<(), AuditUnavailable> {
        let waiting = Instant::now();
        let settled = self.enforcer.audit.settled().await;
        self.metrics.stage_since(Stage::AuditSettled, waiting);
        settled.map_err(|err| {
            tracing::error!(error = %err, "audit record not written; refusing the call");
            AuditUnavailable
        })
    }

    /// Writes the audit record of a request refused as a whole (every refusal
    /// is audited; a failing audit log is logged, the refusal stands).
    pub(crate) fn audit_refusal(&self, server: &str, refusal: &Refusal) {
        if matches!(refusal, Refusal::AuditUnavailable(_)) {
            return;
        }
        let active = self.source.current();
        let reason = refusal.to_string();
        let rule = format!("{PROTOCOL_RULE}/{}", refusal.label());
        let mut state = lock(&self.refusals);
        // The error it returns is already logged; the request is refused anyway.
        let _ = self.enforcer.refuse_message(
            active.as_deref(),
            &self.settings.pod_namespace,
            &mut state,
            &RefusedMessage {
                id: None,
                method: "",
                tool: "",
                server,
                mcp_session_id: "",
                rule: &rule,
                reason: &reason,
                code: refusal.code(),
            },
        );
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
        started: Instant,
    ) -> Result<Response<ResponseBody>, Refusal> {
        let active = self.source.in_force()?;
        if req.method() == Method::GET
            && let Some((server, rest)) = crate::oauth::metadata_route(req.uri().path())
        {
            return Ok(Box::pin(crate::oauth::serve_metadata(
                self, &active, &req, server, rest,
            ))
            .await);
        }
        let (server, rest) = split_path(req.uri().path());
        let upstream = active
            .upstreams
            .get(server)
            .ok_or_else(|| UnknownServer(server.to_owned()))?;
        check_path_suffix(rest)?;
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
        let requested = crate::oauth::RequestedUrl::of(&req);
        let mut response = match *req.method() {
            Method::POST => self.post(req, &active, upstream, uri, started).await,
            Method::GET => Box::pin(self.get(req, &active, upstream, uri)).await,
            Method::DELETE => Box::pin(self.delete(req, &active, upstream, uri)).await,
            _ => Err(MethodNotAllowed.into()),
        }?;
        crate::oauth::map_challenges(self, &requested, upstream, response.headers_mut());
        Ok(response)
    }

    fn idle_timeout(active: &ActivePolicy) -> Duration {
        Duration::from_secs(u64::from(
            active.snapshot.content.session.idle_timeout_seconds,
        ))
    }

    /// The MCP session a request names with `Mcp-Session-Id`, which must be
    /// one the upstream issued through the sidecar (`None` when it names
    /// none).
    fn mcp_session(
        &self,
        active: &ActivePolicy,
        upstream: &Upstream,
        mcp_session_id: Option<&str>,
    ) -> Result<Option<(SharedSession, String)>, Refusal> {
        let Some(id) = mcp_session_id else {
            return Ok(None);
        };
        let session = self
            .sessions
            .get(
                SessionKey::new(&upstream.name, id),
                Instant::now(),
                Self::idle_timeout(active),
            )
            .ok_or(UnknownSession)?;
        Ok(Some((session, id.to_owned())))
    }

    /// The session a message outside any delegated task is decided in, by the
    /// agent's scope mode: its trace, else its MCP session, else the pod
    /// (see [`chaperone_policy::resolve_scope`]).
    fn scoped_session(
        &self,
        active: &ActivePolicy,
        mcp: Option<&(SharedSession, String)>,
        trace: Option<&str>,
    ) -> SharedSession {
        let hints = ScopeHints {
            task: None,
            trace,
            mcp_session: mcp.map(|(_, id)| id.as_str()),
        };
        let (kind, key) = resolve_scope(active.snapshot.content.session.scope, hints);
        let (space, key) = match (kind, mcp) {
            (ScopeKind::McpSession, Some((session, _))) => return Arc::clone(session),
            (ScopeKind::Trace, _) => (TRACE_SPACE, key),
            _ => (AGENT_SPACE, ""),
        };
        let kind = if space == TRACE_SPACE {
            ScopeKind::Trace
        } else {
            ScopeKind::Agent
        };
        let session = self.sessions.get_or_create(
            SessionKey::new(space, key),
            kind,
            Instant::now(),
            Self::idle_timeout(active),
        );
        self.metrics.sessions.set(self.sessions.len() as i64);
        session
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

    /// Opens a session at the inbound side for `caller` (the calling agent or
    /// the initiating user, whose share of the store it counts against), also
    /// filed under `origin` when given, and returns its `Chaperone-Session`
    /// token (unguessable: 128 random bits).
    pub fn open_delegated(
        &self,
        caller: &str,
        origin: Option<SessionKey<'_>>,
        mut state: SessionState,
    ) -> (String, SharedSession) {
        let token = random_id();
        state.extras_mut().handle = Some(token.clone());
        // Its scope key is its Chaperone session id: the token is a secret and
        // is never written down.
        state.scope = ScopeKind::Task;
        state.scope_key = state.chaperone_id.as_str().into();
        let token_key = SessionKey::new(DELEGATED, &token);
        let with_origin;
        let keys: &[SessionKey<'_>] = match origin {
            Some(origin) => {
                with_origin = [token_key, origin];
                &with_origin
            }
            None => std::slice::from_ref(&token_key),
        };
        let shared = self.delegated.open(caller, keys, state, Instant::now());
        self.metrics
            .delegated_sessions
            .set(self.delegated.len() as i64);
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
        started: Instant,
    ) -> Result<Response<ResponseBody>, Refusal> {
        let limit = self.settings.max_body_bytes;
        let (parts, body) = req.into_parts();
        check_body_headers(&parts.headers)?;
        let mcp_session_id = single_header(&parts.headers, &MCP_SESSION_ID)?;
        let header_version = single_header(&parts.headers, &MCP_PROTOCOL_VERSION)?;
        let bytes = read_body(
            &parts.headers,
            body,
            limit,
            self.settings.header_read_timeout,
        )
        .await?;
        self.metrics.stage_since(Stage::BodyRead, started);
        let parsing = Instant::now();
        let parsed = parse_body(&bytes, limit)?;
        let (messages, batch) = match &parsed.payload {
            Payload::Single(message) => (std::slice::from_ref(message), false),
            Payload::Batch(messages) => (&messages[..], true),
        };
        let routed = (!batch).then(|| &messages[0]);
        check_header_binding(
            &parts.headers,
            &BodyRouting {
                method: routed.and_then(Message::method),
                name: routed.and_then(routed_name),
                id: routed.and_then(request_id),
                meta_version: messages.iter().find_map(meta_protocol_version),
            },
        )?;
        self.metrics.stage_since(Stage::Parse, parsing);
        let initializing = messages
            .iter()
            .any(|m| matches!(m, Message::Request { method, .. } if method == "initialize"));
        if initializing && batch {
            return Err(ParseError::InvalidMessage(
                "initialize must be sent alone, not in a batch",
            )
            .into());
        }
        let mcp = self.mcp_session(active, upstream, mcp_session_id)?;
        let mcp_id = mcp.as_ref().map_or("", |(_, id)| id.as_str());
        let delegated = self.delegated_session(active, &parts.headers)?;
        let header_traceparent = single_header(&parts.headers, &TRACEPARENT)?;
        let header_trace = header_traceparent.and_then(trace_id_of);
        let passthrough = &active.snapshot.content.passthrough_methods;

        let mut forwarded: Vec<usize> = Vec::with_capacity(messages.len());
        let mut local: Vec<Value> = Vec::new();
        let mut assertions: Vec<String> = Vec::new();
        let mut watch = CallWatch::default();
        let mut lists = false;
        // The trace spans of the governed messages forwarded.
        let mut spans: Vec<tracing::Span> = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            let id = request_id(message);
            let era = message_era(message, header_version);
            let governed = classify(message, era, passthrough);
            if matches!(governed, Governed::Pass | Governed::List) {
                if governed == Governed::List {
                    // A list is governed too (filtered on the way back): its
                    // span carries the trace on and the upstream latency.
                    lists = true;
                    let parent = request_parent(header_traceparent, meta_traceparent(message))
                        .or_else(|| delegated.as_ref().and_then(|task| lock(task).trace()));
                    spans.push(message_span(
                        Direction::Outbound,
                        message.method().unwrap_or_default(),
                        "",
                        &upstream.name,
                        parent,
                    ));
                }
                forwarded.push(index);
                continue;
            }
            // Without a trace context of its own, a call of a task opened at
            // the inbound side continues the trace of the call that opened it.
            let parent = request_parent(header_traceparent, meta_traceparent(message))
                .or_else(|| delegated.as_ref().and_then(|task| lock(task).trace()));
            let span = message_span(
                Direction::Outbound,
                message.method().unwrap_or_default(),
                param_name(message),
                &upstream.name,
                parent,
            );
            // Inside a delegated (or user-initiated) task the task's history
            // decides; otherwise the scope the agent's mode picks.
            let shared = match &delegated {
                Some(task) => Arc::clone(task),
                None => {
                    let trace = meta_traceparent(message)
                        .and_then(trace_id_of)
                        .or(header_trace);
                    self.scoped_session(active, mcp.as_ref(), trace)
                }
            };
            let method = message.method().unwrap_or_default();
            let (code, reason) = match governed {
                Governed::Call { name, arguments } => {
                    let call = CallRequest {
                        method,
                        id,
                        name: &name,
                        arguments,
                        mcp_session_id: mcp_id,
                        approval: None,
                    };
                    let mut outcome = span.in_scope(|| {
                        let mut state = lock(&shared);
                        self.enforcer
                            .decide_call(active, upstream, &mut state, &call)
                    })?;
                    if let Some(held) = outcome.held.take() {
                        outcome = Box::pin(
                            self.hold_for_approval(active, upstream, &shared, &call, held, batch)
                                .instrument(span.clone()),
                        )
                        .await?;
                    }
                    if outcome.forward {
                        forwarded.push(index);
                        spans.push(span);
                        assertions.extend(outcome.assertion);
                        // Results that change the session: `input_required`
                        // (2026-07-28) and task handles (both eras).
                        if let Some(id) = id
                            && (era == Era::Stateless || has_param(message, "task"))
                        {
                            watch.push(PendingCall {
                                id: id.clone(),
                                session: Arc::clone(&shared),
                                server: upstream.name.clone(),
                                tool: name,
                            });
                        }
                    } else if let Some(error) = outcome.error
                        && id.is_some()
                    {
                        local.push(error);
                    }
                    continue;
                }
                Governed::Task { task_id } => {
                    if lock(&shared).owns_task(task_id) {
                        forwarded.push(index);
                        spans.push(span);
                        continue;
                    }
                    (
                        jsonrpc::INVALID_PARAMS,
                        format!(
                            "task {task_id:?} was not created through this sidecar in this session (scope {})",
                            lock(&shared).scope.as_str()
                        ),
                    )
                }
                Governed::Malformed(why) => (jsonrpc::INVALID_PARAMS, why.to_owned()),
                Governed::NotForwarded(why) => (jsonrpc::METHOD_NOT_FOUND, why),
                Governed::Pass | Governed::List => continue,
            };
            let tool = param_name(message);
            let error = span.in_scope(|| {
                self.enforcer.refuse_message(
                    Some(active),
                    "",
                    &mut lock(&shared),
                    &RefusedMessage {
                        id,
                        method,
                        tool,
                        server: &upstream.name,
                        mcp_session_id: mcp_id,
                        rule: PROTOCOL_RULE,
                        reason: &reason,
                        code,
                    },
                )
            })?;
            if id.is_some() {
                local.push(error);
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
        let body = forwarded_body(&bytes, &parsed, &forwarded);

        let mut headers = forward_headers(&parts.headers, &upstream.authority, true);
        // The tool server's parent is this sidecar's span, in the same trace.
        // The body (`params._meta.traceparent` included) is forwarded as it
        // was decided, byte for byte.
        if let Some(traceparent) = outgoing_traceparent(&spans) {
            headers.insert(TRACEPARENT, traceparent);
        }
        if !assertions.is_empty()
            && let Ok(value) = HeaderValue::from_str(&assertions.join(", "))
        {
            headers.insert(HeaderName::from_static(ASSERTION_HEADER), value);
        }
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let sending = Instant::now();
        let response = match self.send(request, upstream).await {
            Ok(response) => response,
            Err(refusal) => {
                record_upstream_failure(&spans, &refusal.to_string());
                return Err(refusal);
            }
        };
        record_upstream(&spans, sending.elapsed(), response.status().as_u16());
        let timing = ResponseTiming {
            metrics: Arc::clone(&self.metrics),
            request: started,
            headers: Instant::now(),
        };

        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        if initializing
            && rparts.status.is_success()
            && let Ok(Some(id)) = single_header(&rparts.headers, &MCP_SESSION_ID)
        {
            // An existing session of that id keeps its history.
            self.sessions.get_or_create(
                SessionKey::new(&upstream.name, id),
                ScopeKind::McpSession,
                Instant::now(),
                Self::idle_timeout(active),
            );
            self.metrics.sessions.set(self.sessions.len() as i64);
        }
        let sse = content_type_is(&rparts.headers, "text/event-stream");
        if (sse || lists) && is_encoded(&rparts.headers) {
            return Err(UpstreamResponseRefused(format!(
                "tool server {:?} compressed a response the sidecar must read (it was asked for Accept-Encoding: identity)",
                upstream.name
            ))
            .into());
        }
        if sse {
            let mut prefix = String::new();
            for error in &local {
                prefix.push_str("event: message\ndata: ");
                prefix.push_str(&error.to_string());
                prefix.push_str("\n\n");
            }
            rparts.headers.remove(header::CONTENT_LENGTH);
            let body = self.rewrite_sse(rbody, &upstream.name, prefix, watch);
            return Ok(Response::from_parts(rparts, body));
        }
        // A list result is filtered whatever the Content-Type says (a client
        // may read JSON from `text/plain` or no type at all); a list response
        // the sidecar cannot read is refused, never passed.
        if lists || (!local.is_empty() && content_type_is(&rparts.headers, "application/json")) {
            let limit = self.settings.max_response_bytes;
            let status = rparts.status;
            let unreadable = |why: String| {
                UpstreamResponseRefused(format!(
                    "tool server {:?} answered HTTP {status} with a body the sidecar cannot read: {why}",
                    upstream.name
                ))
            };
            let bytes = match Limited::new(rbody, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) => return Err(unreadable(err.to_string()).into()),
            };
            let challenge = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
                && rparts.headers.contains_key(header::WWW_AUTHENTICATE);
            if challenge && parse_strict(&bytes, limit).is_err() {
                // An authentication challenge (OAuth 401/403) whose body the
                // sidecar cannot read: its status and `WWW-Authenticate` are
                // the answer, the body goes (no reader can take a list from
                // it), and local denials are answered too.
                return Ok(if local.is_empty() {
                    rparts.headers.remove(header::CONTENT_LENGTH);
                    rparts.headers.remove(header::CONTENT_ENCODING);
                    rparts.headers.remove(header::CONTENT_TYPE);
                    Response::from_parts(rparts, full(Bytes::new()))
                } else {
                    with_local_denials(local, &forwarded, messages, batch, &upstream.name, status)
                });
            }
            let filtering = Instant::now();
            let mut value =
                parse_strict(&bytes, limit).map_err(|err| unreadable(err.to_string()))?;
            watch.observe(&value);
            let filter = |message: &mut Value| {
                self.enforcer
                    .filter_response(active, &upstream.name, message)
                    .map_err(&unreadable)
            };
            match &mut value {
                Value::Array(items) => {
                    for item in items.iter_mut() {
                        filter(item)?;
                    }
                    items.extend(local);
                }
                single => {
                    filter(single)?;
                    if !local.is_empty() {
                        let mut items = vec![single.take()];
                        items.extend(local);
                        value = Value::Array(items);
                    }
                }
            }
            self.metrics.stage_since(Stage::ResponseFilter, filtering);
            rparts.headers.remove(header::CONTENT_LENGTH);
            rparts.headers.remove(header::CONTENT_ENCODING);
            rparts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(Response::from_parts(
                rparts,
                timing.wrap(full(value.to_string())),
            ));
        }
        if !local.is_empty() && rparts.status == StatusCode::ACCEPTED {
            // Only notifications and responses were forwarded: the denials are
            // the whole answer.
            return Ok(json_response(StatusCode::OK, &Value::Array(local)));
        }
        if !local.is_empty() {
            // The tool server answered something that is neither JSON nor SSE
            // (an HTTP error page): the local denials must not be lost with it.
            return Ok(with_local_denials(
                local,
                &forwarded,
                messages,
                batch,
                &upstream.name,
                rparts.status,
            ));
        }
        if !watch.is_empty() {
            let body = WatchedBody::new(rbody, watch);
            return Ok(Response::from_parts(
                rparts,
                timing.wrap(body.map_err(BoxError::from).boxed_unsync()),
            ));
        }
        Ok(Response::from_parts(
            rparts,
            timing.wrap(rbody.map_err(BoxError::from).boxed_unsync()),
        ))
    }

    /// Holds a call that needs a person's approval (a single message only):
    /// asks the controller, waits up to the hold time, and on GRANTED decides
    /// it again as approved (recording it and minting its assertion); every
    /// other ending refuses it with an error naming the approval.
    async fn hold_for_approval(
        &self,
        active: &ActivePolicy,
        upstream: &Upstream,
        shared: &SharedSession,
        call: &CallRequest<'_>,
        held: HeldCall,
        batch: bool,
    ) -> Result<CallOutcome, AuditUnavailable> {
        let refusal = if batch {
            HeldRefusal::InBatch
        } else if call.id.is_none() {
            HeldRefusal::NotARequest
        } else {
            match self.await_approval(active, &held).await {
                Ok(granted) => {
                    return self.decide_approved(active, upstream, shared, call, &held, granted);
                }
                Err(refusal) => refusal,
            }
        };
        self.count_approval(refusal.label());
        let error = self.enforcer.refuse_held(
            active,
            upstream,
            &mut lock(shared),
            call,
            &held,
            &refusal,
        )?;
        Ok(CallOutcome {
            forward: false,
            assertion: None,
            error: Some(error),
            held: None,
        })
    }

    /// Asks for the approval of `held` and waits for its final answer, up
    /// to the hold time: the GRANTED answer, or why the call is refused.
    async fn await_approval(
        &self,
        active: &ActivePolicy,
        held: &HeldCall,
    ) -> Result<ApprovalUpdate, HeldRefusal> {
        let hold = self.settings.approval_hold;
        let deadline = tokio::time::Instant::now() + hold;
        let pending = |last: Option<ApprovalUpdate>| HeldRefusal::StillPending {
            name: last
                .as_ref()
                .map(|u| u.name.clone())
                .filter(|n| !n.is_empty()),
            namespace: active.engine.agent().namespace.clone(),
            expires_at: last.map_or(0, |u| u.expires_at),
            hold,
        };
        let mut ticket =
            match tokio::time::timeout_at(deadline, self.approvals.request(&held.ask)).await {
                Ok(Ok(ticket)) => ticket,
                Ok(Err(NoController)) => return Err(HeldRefusal::NoController),
                // The stream did not take the request in time.
                Err(_) => return Err(pending(None)),
            };
        tracing::debug!(ticket = ticket.id(), rule = %held.rule, "call held for approval");
        match ticket.wait(deadline).await {
            Waited::Decided(update) if update.phase == ApprovalPhase::Granted => Ok(update),
            Waited::Decided(update) => Err(HeldRefusal::Decided(update)),
            Waited::StillPending(last) => Err(pending(last)),
            Waited::Lost(last) => Err(HeldRefusal::StreamLost {
                name: last.map(|u| u.name).filter(|n| !n.is_empty()),
            }),
        }
        // Dropping a ticket still pending releases it.
    }

    /// Decides a granted call again, as approved, against the policy in
    /// force now (a deny added meanwhile still wins): records it and mints
    /// its assertion, or refuses it.
    fn decide_approved(
        &self,
        active: &ActivePolicy,
        upstream: &Upstream,
        shared: &SharedSession,
        call: &CallRequest<'_>,
        held: &HeldCall,
        granted: ApprovalUpdate,
    ) -> Result<CallOutcome, AuditUnavailable> {
        let now = self.source.current();
        let latest = now.as_deref().and_then(|latest| {
            latest
                .upstreams
                .get(&held.ask.server)
                .map(|upstream| (latest, upstream))
        });
        let Some((latest, latest_upstream)) = latest else {
            let refusal = HeldRefusal::ServerGone {
                name: granted.name,
                server: held.ask.server.clone(),
            };
            self.count_approval(refusal.label());
            let error = self.enforcer.refuse_held(
                active,
                upstream,
                &mut lock(shared),
                call,
                held,
                &refusal,
            )?;
            return Ok(CallOutcome {
                forward: false,
                assertion: None,
                error: Some(error),
                held: None,
            });
        };
        self.count_approval("granted");
        let approval = AuditApproval {
            decided_by: Some(granted.decided_by.as_str()).filter(|d| !d.is_empty()),
            name: Some(granted.name.as_str()).filter(|n| !n.is_empty()),
            phase: ApprovalPhase::Granted.as_str(),
        };
        let approved = CallRequest {
            approval: Some(&approval),
            ..*call
        };
        let mut state = lock(shared);
        let mut outcome =
            self.enforcer
                .decide_call(latest, latest_upstream, &mut state, &approved)?;
        // Never held twice (decide_call refuses instead); belt and braces.
        outcome.held = None;
        Ok(outcome)
    }

    fn count_approval(&self, outcome: &'static str) {
        self.metrics
            .approvals
            .get_or_create(&ApprovalLabels { outcome })
            .inc();
    }

    async fn get(
        self: &Arc<Self>,
        req: Request<Incoming>,
        active: &Arc<ActivePolicy>,
        upstream: &Upstream,
        uri: http::Uri,
    ) -> Result<Response<ResponseBody>, Refusal> {
        if let Some(id) = single_header(req.headers(), &MCP_SESSION_ID)? {
            let key = SessionKey::new(&upstream.name, id);
            self.sessions
                .get(key, Instant::now(), Self::idle_timeout(active))
                .ok_or(UnknownSession)?;
        }
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        *request.headers_mut() = forward_headers(req.headers(), &upstream.authority, false);
        let response = self.send(request, upstream).await?;
        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        if content_type_is(&rparts.headers, "text/event-stream") {
            if is_encoded(&rparts.headers) {
                return Err(UpstreamResponseRefused(format!(
                    "tool server {:?} compressed an event stream the sidecar must read",
                    upstream.name
                ))
                .into());
            }
            rparts.headers.remove(header::CONTENT_LENGTH);
            let body = self.rewrite_sse(rbody, &upstream.name, String::new(), CallWatch::default());
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
        let sid = single_header(req.headers(), &MCP_SESSION_ID)?.map(str::to_owned);
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.method_mut() = Method::DELETE;
        *request.uri_mut() = uri;
        *request.headers_mut() = forward_headers(req.headers(), &upstream.authority, false);
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
        mut request: Request<Full<Bytes>>,
        upstream: &Upstream,
    ) -> Result<Response<Incoming>, Refusal> {
        self.upstream_secrets
            .apply(upstream, request.headers_mut())?;
        self.audit_settled().await?;
        let started = Instant::now();
        let response = self.client.request(request).await.map_err(|err| {
            tracing::warn!(server = %upstream.name, error = %err, "tool server unavailable");
            UpstreamUnavailable(upstream.name.clone())
        })?;
        let elapsed = started.elapsed();
        self.metrics.observe_stage(Stage::Upstream, elapsed);
        self.metrics.upstream_seconds.observe(elapsed.as_secs_f64());
        Ok(response)
    }

    fn rewrite_sse(
        self: &Arc<Self>,
        body: Incoming,
        server: &str,
        prefix: String,
        watch: CallWatch,
    ) -> ResponseBody {
        let rewriter = ListRewriter {
            gateway: Arc::clone(self),
            server: server.to_owned(),
            watch,
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

/// The answer to a body some of whose messages the sidecar denied, when the
/// tool server answered the rest with HTTP `status` and nothing JSON-RPC:
/// the denials, and for each forwarded request an error naming that status.
fn with_local_denials(
    mut local: Vec<Value>,
    forwarded: &[usize],
    messages: &[Message],
    batch: bool,
    server: &str,
    status: StatusCode,
) -> Response<ResponseBody> {
    let message = format!("tool server {server:?} answered HTTP {status} to this batch");
    for index in forwarded {
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
    json_response(StatusCode::OK, &body)
}

/// The name `Mcp-Name` carries for `message`: `params.taskId` on the tasks
/// extension's methods (`tasks/get`, …), otherwise `params.name` (tools,
/// prompts) or `params.uri` (resources).
pub(crate) fn routed_name(message: &Message) -> Option<&str> {
    let params = message.params()?;
    let named = if message.method().is_some_and(|m| m.starts_with("tasks/")) {
        params.get("taskId")
    } else {
        params.get("name").or_else(|| params.get("uri"))
    };
    named.and_then(Value::as_str)
}

/// The id of `message` when it is a request.
pub(crate) fn request_id(message: &Message) -> Option<&Id> {
    match message {
        Message::Request { id, .. } => Some(id),
        _ => None,
    }
}

/// A string member of `message`'s `params._meta`.
fn meta_str<'a>(message: &'a Message, key: &str) -> Option<&'a str> {
    message
        .params()?
        .get("_meta")?
        .get(key)
        .and_then(Value::as_str)
}

/// The protocol revision `message`'s `_meta` declares (2026-07-28).
pub(crate) fn meta_protocol_version(message: &Message) -> Option<&str> {
    meta_str(message, PROTOCOL_VERSION_META)
}

/// `params.name` of `message` (the tool or prompt), empty when it has none.
fn param_name(message: &Message) -> &str {
    message
        .params()
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The W3C `traceparent` in `message`'s `_meta` (2026-07-28, SEP-414).
pub(crate) fn meta_traceparent(message: &Message) -> Option<&str> {
    meta_str(message, "traceparent")
}

/// Whether `message`'s params have a member `key`.
fn has_param(message: &Message, key: &str) -> bool {
    message.params().is_some_and(|p| p.get(key).is_some())
}

/// Reads a request body of at most `limit` bytes that arrives within `within`.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
    within: Duration,
) -> Result<Bytes, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || ParseError::Json(JsonError::TooLarge { limit });
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large().into());
    }
    let read = tokio::time::timeout(within, Limited::new(body, limit).collect())
        .await
        .map_err(|_| SlowBody(within))?;
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large().into()),
        Err(_) => Err(ParseError::InvalidMessage("the request body could not be read").into()),
    }
}

/// Filters list results in SSE events with the snapshot in force when each event
/// arrives, and reads the outcomes of watched calls.
struct ListRewriter {
    gateway: Arc<Gateway>,
    server: String,
    watch: CallWatch,
}

impl EventRewrite for ListRewriter {
    fn wants(&self, raw: &[u8]) -> bool {
        may_hold_list(raw) || self.watch.wants(raw)
    }

    fn rewrite(&mut self, data: &str) -> Result<Option<String>, String> {
        // Read before the event is handed on: a retry cannot overtake it.
        self.watch.observe_bytes(data.as_bytes());
        if !may_hold_list(data.as_bytes()) {
            return Ok(None);
        }
        let active = self
            .gateway
            .source
            .current()
            .ok_or_else(|| "no policy snapshot".to_owned())?;
        let limit = self.gateway.settings.max_response_bytes;
        let filtering = Instant::now();
        let filtered = self
            .gateway
            .enforcer
            .filter_event(&active, &self.server, data, limit);
        self.gateway
            .metrics
            .stage_since(Stage::ResponseFilter, filtering);
        filtered
    }
}

/// When a POST's response began (its handler, the tool server's headers), to
/// time the `respond` and `request` stages when its body ends.
struct ResponseTiming {
    metrics: Arc<Metrics>,
    request: Instant,
    headers: Instant,
}

impl ResponseTiming {
    fn wrap(self, body: ResponseBody) -> ResponseBody {
        TimedBody {
            inner: body,
            timing: Some(self),
        }
        .boxed_unsync()
    }
}

/// A response body that records its [`ResponseTiming`] stages once its last
/// frame has been handed to the connection (an empty body or one that fails
/// records nothing).
struct TimedBody {
    inner: ResponseBody,
    timing: Option<ResponseTiming>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended && let Some(timing) = this.timing.take() {
            let now = Instant::now();
            let metrics = &timing.metrics;
            metrics.observe_stage(Stage::Respond, now.duration_since(timing.headers));
            metrics.observe_stage(Stage::Request, now.duration_since(timing.request));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
    let limits = ConnectionLimits::proxy(&gateway.settings);
    let metrics = Arc::clone(&gateway.metrics);
    serve_connections("proxy", limits, metrics, listener, shutdown, move |req| {
        let gateway = Arc::clone(&gateway);
        async move { gateway.handle(req).await }
    })
    .await;
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

    #[test]
    fn content_type_prefix_ignores_case_and_leading_space() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            headers
        };
        let sse = "text/event-stream";
        assert!(content_type_is(&with("text/event-stream"), sse));
        assert!(content_type_is(
            &with(" Text/Event-Stream; charset=utf-8"),
            sse
        ));
        assert!(!content_type_is(&with("text/event"), sse));
        assert!(!content_type_is(&with("application/json"), sse));
        assert!(!content_type_is(&HeaderMap::new(), sse));
    }
}
