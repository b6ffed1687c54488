//! The inbound side on `:15006`, in front of the pod's own MCP endpoint.
//!
//! Agent mode (another agent, or a user's front end, calls this agent):
//! - with `Chaperone-Assertion`: every governed call of the body needs a
//!   verified assertion ([`crate::verify`]) for exactly that tool and those
//!   arguments, all from one caller session; the caller needs a valid
//!   DelegationGrant to this agent, and every earlier hop of its chain must
//!   still be valid and within its grant's depth. Then the call joins (or
//!   opens) the delegated session of that caller session: chain = caller's
//!   chain + this hop, history seeded from the assertion's task context, first
//!   audit record linked to the caller's record. The agent gets the session's
//!   opaque `Chaperone-Session` token in the request headers and sends it back
//!   with the calls it makes for that task.
//! - else with `Authorization: Bearer` of a trusted initiator issuer: a
//!   session whose initiator is that user ([`crate::initiator`]); an invalid
//!   token is refused (401), never ignored.
//! - else the request passes: what the agent does next is its own authority.
//!
//! Tool mode (in front of a tool server): every governed call needs a verified
//! assertion addressed to this tool, for that tool and those arguments.
//!
//! Refusals are HTTP 403 (401 for initiator tokens) with a JSON-RPC error and
//! an audit record; nothing refused reaches the pod's endpoint. Every
//! `Chaperone-*` header the caller sends is dropped before forwarding, except
//! that a verified assertion is passed on.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chaperone_policy::{
    AgentKey, DelegationChain, DelegationLink, GrantKey, ObjectKey, ScopeKind, SessionHistory,
};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::assertion::{ASSERTION_HEADER, Actor};
use crate::authz::{Governed, RecordEntry, classify, message_era};
use crate::canonical::{args_digest, hex};
use crate::initiator::InitiatorVerifier;
use crate::intake::{
    BodyRouting, MCP_PROTOCOL_VERSION, TRACEPARENT, check_body_headers, check_header_binding,
    check_path_suffix, forward_headers, single_header, strip_hop_by_hop,
};
use crate::jsonrpc::{Message, Payload, parse_payload};
use crate::listener::{ConnectionLimits, serve_connections};
use crate::metrics::Stage;
use crate::peer_keys::PeerKeyStore;
use crate::proxy::{
    BoxError, CHAPERONE_SESSION, Gateway, ResponseBody, meta_protocol_version, meta_traceparent,
    read_body, request_id, routed_name,
};
use crate::refusal::{
    AuditUnavailable, InboundRefused, MethodNotAllowed, MethodNotForwarded, NoSnapshot, Refusal,
};
use crate::session::{Delegation, SessionKey, SessionState, SharedSession, lock};
use crate::settings::SidecarMode;
use crate::snapshot::{AGENT_ISSUER_PREFIX, ActivePolicy};
use crate::spans::{
    Direction, message_span, outgoing_traceparent, record_upstream, record_upstream_failure,
};
use crate::verify::{ReplayCache, VerifiedAssertion, verify_assertion};
use chaperone_telemetry::TraceParent;
use chaperone_telemetry::trace_context::request_parent;

/// Key space, in the delegated-session store, of the caller sessions already
/// handed a session here.
const ORIGIN: &str = "chaperone-origin";

/// The inbound side's state.
pub struct Inbound {
    gateway: Arc<Gateway>,
    peer_keys: Arc<PeerKeyStore>,
    replay: ReplayCache,
    initiators: InitiatorVerifier,
    upstream: http::Uri,
    mode: SidecarMode,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("upstream", &self.upstream)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A governed call of an inbound body.
struct InboundCall {
    method: String,
    name: String,
    digest: String,
    /// Its trace span ([`crate::spans`]), entered when it is decided.
    span: tracing::Span,
}

fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn agent_of(identity: &str) -> Option<AgentKey> {
    let rest = identity.strip_prefix(AGENT_ISSUER_PREFIX)?;
    let (namespace, name) = rest.split_once('/')?;
    Some(ObjectKey::new(namespace, name))
}

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

impl Inbound {
    /// The inbound side of `gateway`, forwarding to `upstream`.
    pub fn new(
        gateway: Arc<Gateway>,
        peer_keys: Arc<PeerKeyStore>,
        upstream: http::Uri,
        mode: SidecarMode,
    ) -> Self {
        let settings = &gateway.settings;
        let initiators = InitiatorVerifier::new(gateway.client.clone())
            .with_max_token_lifetime(settings.initiator_max_token_lifetime);
        let replay = ReplayCache::new(settings.replay_cache_per_issuer);
        Self {
            gateway,
            peer_keys,
            replay,
            initiators,
            upstream,
            mode,
        }
    }

    /// Handles one request; never fails (refusals become responses).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        self.gateway
            .enforcer
            .audit
            .track_request(async {
                let response = match self.route(req).await {
                    Ok(response) => response,
                    Err(refusal) => {
                        // Inbound refusals audit themselves, with the caller.
                        if !matches!(refusal, Refusal::InboundRefused(_)) {
                            self.gateway.audit_refusal("inbound", &refusal);
                        }
                        self.gateway.refuse(&refusal)
                    }
                };
                self.gateway.after_audit(response).await
            })
            .await
    }

    fn target(&self, path_and_query: Option<&http::uri::PathAndQuery>) -> http::Uri {
        let mut parts = self.upstream.clone().into_parts();
        parts.path_and_query = path_and_query.cloned();
        http::Uri::from_parts(parts).unwrap_or_else(|_| self.upstream.clone())
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<ResponseBody>, Refusal> {
        let active = self.gateway.source.current();
        if self.mode == SidecarMode::Agent && active.is_none() {
            return Err(NoSnapshot(self.gateway.source.absence()).into());
        }
        let (parts, body) = req.into_parts();
        check_path_suffix(parts.uri.path())?;
        let uri = self.target(parts.uri.path_and_query());
        let authority = self.upstream.authority().cloned().ok_or(MethodNotAllowed)?;
        let mut headers = forward_headers(&parts.headers, &authority, parts.method == Method::POST);
        // The trace spans of the governed calls forwarded.
        let mut spans: Vec<tracing::Span> = Vec::new();
        let body = match parts.method {
            Method::POST => {
                check_body_headers(&parts.headers)?;
                let limit = self.gateway.settings.max_body_bytes;
                let bytes = read_body(
                    &parts.headers,
                    body,
                    limit,
                    self.gateway.settings.header_read_timeout,
                )
                .await?;
                let passthrough = active
                    .as_deref()
                    .map_or(&[][..], |a| &a.snapshot.content.passthrough_methods[..]);
                let parsing = Instant::now();
                let calls = governed_calls(&bytes, limit, &parts.headers, passthrough)?;
                self.gateway.metrics.stage_since(Stage::Parse, parsing);
                self.admit(active.as_deref(), &parts.headers, &calls, &mut headers)
                    .await?;
                spans = calls.into_iter().map(|call| call.span).collect();
                // The pod's parent is this sidecar's span, in the same trace.
                if let Some(traceparent) = outgoing_traceparent(&spans) {
                    headers.insert(TRACEPARENT, traceparent);
                }
                bytes
            }
            Method::GET | Method::DELETE => Bytes::new(),
            _ => return Err(MethodNotAllowed.into()),
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        self.gateway.audit_settled().await?;
        let forwarding = Instant::now();
        let response = self.gateway.client.request(request).await.map_err(|err| {
            tracing::warn!(error = %err, "the pod's own MCP endpoint is unavailable");
            record_upstream_failure(&spans, &err.to_string());
            crate::refusal::UpstreamUnavailable("inbound".to_owned())
        })?;
        record_upstream(&spans, forwarding.elapsed(), response.status().as_u16());
        self.gateway
            .metrics
            .stage_since(Stage::Upstream, forwarding);
        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        Ok(Response::from_parts(
            rparts,
            rbody.map_err(BoxError::from).boxed_unsync(),
        ))
    }

    /// Decides whether the governed `calls` may reach the pod; adds the headers
    /// the pod gets (`Chaperone-Session`, the verified assertion).
    async fn admit(
        &self,
        active: Option<&ActivePolicy>,
        headers: &http::HeaderMap,
        calls: &[InboundCall],
        forward: &mut http::HeaderMap,
    ) -> Result<(), Refusal> {
        let now_ms = unix_now_ms();
        let now = now_ms.div_euclid(1000);
        let tokens: Vec<&str> = headers
            .get_all(HeaderName::from_static(ASSERTION_HEADER))
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if tokens.is_empty() {
            if self.mode == SidecarMode::Tool {
                if calls.is_empty() {
                    return Ok(());
                }
                return Err(self.refuse(
                    active,
                    calls,
                    None,
                    "assertion",
                    "no Chaperone-Assertion: this tool accepts calls only through an authorised agent's sidecar".to_owned(),
                    false,
                ));
            }
            let Some(token) = bearer(headers) else {
                return Ok(());
            };
            let Some(active) = active else {
                return Err(NoSnapshot(self.gateway.source.absence()).into());
            };
            return self
                .admit_initiator(active, token, calls, forward, now_ms)
                .await;
        }
        let mut audiences = self.gateway.settings.inbound_audiences.clone();
        if let Some(active) = active {
            audiences.push(active.issuer.clone());
        }
        let keys = self.peer_keys.current();
        let mut verified = Vec::with_capacity(tokens.len());
        for token in &tokens {
            match verify_assertion(token, &keys, &audiences, &self.replay, now) {
                Ok(claims) => verified.push(claims),
                Err(err) => {
                    return Err(self.refuse(
                        active,
                        calls,
                        None,
                        "assertion",
                        err.to_string(),
                        false,
                    ));
                }
            }
        }
        let first = &verified[0];
        if verified
            .iter()
            .any(|c| c.iss != first.iss || c.sid != first.sid)
        {
            return Err(self.refuse(
                active,
                calls,
                Some(first),
                "assertion",
                "the assertions of one request come from different callers or sessions".to_owned(),
                false,
            ));
        }
        let mut unused: Vec<&VerifiedAssertion> = verified.iter().collect();
        for call in calls {
            match unused
                .iter()
                .position(|c| c.tool == call.name && c.args == call.digest)
            {
                Some(at) => {
                    unused.swap_remove(at);
                }
                None => {
                    return Err(self.refuse(
                        active,
                        calls,
                        Some(first),
                        "assertion",
                        format!(
                            "no assertion covers the call of {:?} with these arguments",
                            call.name
                        ),
                        false,
                    ));
                }
            }
        }
        if let Ok(value) = HeaderValue::from_str(&tokens.join(", ")) {
            forward.insert(HeaderName::from_static(ASSERTION_HEADER), value);
        }
        match (self.mode, active) {
            (SidecarMode::Tool, _) | (_, None) => {
                // In front of a tool: one audit trail per caller session.
                let session = self.origin_session(first, || {
                    let mut state = SessionState::new();
                    state.last_audit_hash = parse_hash(first);
                    state
                });
                self.audit_calls(
                    None,
                    &session,
                    calls,
                    "allow",
                    "inbound/assertion",
                    "the assertion verified",
                    now_ms,
                    &first.iss,
                )?;
                Ok(())
            }
            (SidecarMode::Agent, Some(active)) => {
                self.admit_delegated(active, first, calls, forward, now_ms)
            }
        }
    }

    /// A caller agent's verified call: checks its grants and chain, and joins or
    /// opens its delegated session.
    fn admit_delegated(
        &self,
        active: &ActivePolicy,
        claims: &VerifiedAssertion,
        calls: &[InboundCall],
        forward: &mut http::HeaderMap,
        now_ms: i64,
    ) -> Result<(), Refusal> {
        let now = now_ms.div_euclid(1000);
        let content = &active.snapshot.content;
        let refuse = |reason: String| {
            self.refuse(
                Some(active),
                calls,
                Some(claims),
                "delegation",
                reason,
                false,
            )
        };
        let caller = agent_of(&claims.iss)
            .ok_or_else(|| refuse(format!("caller {:?} is not an agent", claims.iss)))?;
        let last_grants: Vec<GrantKey> = content
            .grants_received
            .iter()
            .filter(|g| g.from == caller && g.to == content.agent && now < g.expires_at)
            .map(|g| g.grant.clone())
            .collect();
        if last_grants.is_empty() {
            return Err(refuse(format!(
                "no valid DelegationGrant from {caller} to {}",
                content.agent
            )));
        }
        // The caller's own chain, origin first, from its nested actors.
        let actors: Vec<&Actor> = match &claims.act {
            Some(act) => act.iter().collect(),
            None => Vec::new(),
        };
        let mut links = Vec::with_capacity(actors.len() + 1);
        for pair in actors.windows(2).rev() {
            let (current, previous) = (pair[0], pair[1]);
            let delegator = agent_of(&previous.sub)
                .ok_or_else(|| refuse(format!("actor {:?} is not an agent", previous.sub)))?;
            let grant = current
                .grant
                .as_deref()
                .map(|g| ObjectKey::parse(g, &caller.namespace))
                .ok_or_else(|| refuse(format!("actor {:?} names no grant", current.sub)))?;
            links.push(DelegationLink { delegator, grant });
        }
        links.push(DelegationLink {
            delegator: caller.clone(),
            grant: last_grants[0].clone(),
        });
        let hops = links.len();
        for (i, link) in links[..hops - 1].iter().enumerate() {
            let Some(grant) = content
                .grants_received
                .iter()
                .find(|g| g.grant == link.grant)
            else {
                return Err(refuse(format!(
                    "grant {} of the caller's chain is not valid",
                    link.grant
                )));
            };
            let further = hops - 1 - i;
            if further > grant.max_depth as usize || now >= grant.expires_at {
                return Err(refuse(format!(
                    "depth limit: grant {} allows {} further hop(s), the chain needs {further}",
                    link.grant, grant.max_depth
                )));
            }
        }
        let initiator = (!claims.sub.starts_with(AGENT_ISSUER_PREFIX)).then(|| claims.sub.clone());
        let mut audit_chain: Vec<String> = actors
            .iter()
            .rev()
            .filter_map(|a| a.sub.strip_prefix(AGENT_ISSUER_PREFIX).map(str::to_owned))
            .collect();
        if audit_chain.is_empty() {
            audit_chain.push(caller.to_string());
        }
        audit_chain.push(content.agent.to_string());
        let delegation = Delegation {
            chain: DelegationChain { links },
            last_grants,
            initiator,
            subject: claims.sub.clone(),
            caller: Some(claims.act.clone().unwrap_or(Actor {
                sub: claims.iss.clone(),
                grant: None,
                act: None,
            })),
            audit_chain,
        };
        let (steps, effects) = claims
            .ctx
            .as_ref()
            .map_or((0, Default::default()), |c| (c.steps, c.effects));
        let session = self.origin_session(claims, || {
            let mut state = SessionState::new();
            state.history = SessionHistory::inherited(steps, effects);
            state.last_audit_hash = parse_hash(claims);
            state
        });
        {
            let mut state = lock(&session);
            state.history.absorb(steps, effects);
            state.extras_mut().delegation = Some(Arc::new(delegation));
        }
        self.audit_calls(
            Some(active),
            &session,
            calls,
            "allow",
            "inbound/delegation",
            "the assertion verified and a DelegationGrant covers the caller",
            now_ms,
            &claims.iss,
        )?;
        let token = Self::token_for(&session);
        if let Ok(value) = HeaderValue::from_str(&token) {
            forward.insert(CHAPERONE_SESSION, value);
        }
        Ok(())
    }

    /// A user's token at this agent: a session with that initiator.
    async fn admit_initiator(
        &self,
        active: &ActivePolicy,
        token: &str,
        calls: &[InboundCall],
        forward: &mut http::HeaderMap,
        now_ms: i64,
    ) -> Result<(), Refusal> {
        let issuers = &active.snapshot.content.initiators;
        let user = match self.initiators.verify(token, issuers).await {
            Ok(user) => user,
            Err(err) => {
                return Err(self.refuse(
                    Some(active),
                    calls,
                    None,
                    "initiator",
                    err.to_string(),
                    true,
                ));
            }
        };
        let origin = format!(
            "user:{}:{}",
            user.issuer,
            hex(&crate::canonical::sha256(token.as_bytes()))
        );
        let key = SessionKey::new(ORIGIN, &origin);
        let idle = idle_timeout(active);
        let session = match self.gateway.delegated.get(key, Instant::now(), idle) {
            Some(session) => session,
            None => {
                let mut state = SessionState::new();
                state.extras_mut().delegation = Some(Arc::new(Delegation {
                    chain: DelegationChain::default(),
                    last_grants: Vec::new(),
                    initiator: Some(user.user.clone()),
                    subject: user.user.clone(),
                    caller: None,
                    audit_chain: Vec::new(),
                }));
                // The user's share of the store: one user cannot push
                // another's (or a calling agent's) sessions out.
                let caller = format!("user:{}:{}", user.issuer, user.user);
                let (_, session) = self.gateway.open_delegated(&caller, Some(key), state);
                session
            }
        };
        self.audit_calls(
            Some(active),
            &session,
            calls,
            "allow",
            "inbound/initiator",
            "the initiator token verified",
            now_ms,
            &user.user,
        )?;
        let token = Self::token_for(&session);
        if let Ok(value) = HeaderValue::from_str(&token) {
            forward.insert(CHAPERONE_SESSION, value);
        }
        Ok(())
    }

    /// The session handed to caller session (`iss`, `sid`), opened with
    /// `open` the first time.
    fn origin_session(
        &self,
        claims: &VerifiedAssertion,
        open: impl FnOnce() -> SessionState,
    ) -> SharedSession {
        let origin = format!("{} {}", claims.iss, claims.sid);
        let key = SessionKey::new(ORIGIN, &origin);
        let idle = self
            .gateway
            .source
            .current()
            .map_or(Duration::from_secs(900), |a| idle_timeout(&a));
        if let Some(session) = self.gateway.delegated.get(key, Instant::now(), idle) {
            return session;
        }
        // The calling agent's share of the store: a peer opening many
        // sessions forgets only its own oldest ones.
        let (_, session) = self.gateway.open_delegated(&claims.iss, Some(key), open());
        session
    }

    /// The `Chaperone-Session` token `session` was opened under.
    fn token_for(session: &SharedSession) -> String {
        lock(session).handle().unwrap_or_default().to_owned()
    }

    /// Writes one audit record per call into `session`.
    #[allow(clippy::too_many_arguments)]
    fn audit_calls(
        &self,
        active: Option<&ActivePolicy>,
        session: &SharedSession,
        calls: &[InboundCall],
        decision: &str,
        rule: &str,
        reason: &str,
        now_ms: i64,
        caller: &str,
    ) -> Result<(), AuditUnavailable> {
        let mut state = lock(session);
        for call in calls {
            self.write_record(
                active, &mut state, call, decision, rule, reason, now_ms, caller,
            )?;
            if let Some(trace) = TraceParent::of_span(&call.span) {
                state.extras_mut().trace = Some(trace);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn write_record(
        &self,
        active: Option<&ActivePolicy>,
        state: &mut SessionState,
        call: &InboundCall,
        decision: &str,
        rule: &str,
        reason: &str,
        now_ms: i64,
        caller: &str,
    ) -> Result<String, AuditUnavailable> {
        let server = format!("inbound:{caller}");
        call.span
            .in_scope(|| {
                self.gateway.enforcer.write_record(
                    active,
                    &self.gateway.settings.pod_namespace,
                    state,
                    &RecordEntry {
                        method: &call.method,
                        tool: &call.name,
                        server: &server,
                        args_digest: &call.digest,
                        decision,
                        rule,
                        reason,
                        mcp_session_id: "",
                        latency_us: 0,
                        now_ms,
                        approval: None,
                        definition: None,
                    },
                )
            })
            .map(|(correlation, _)| correlation)
    }

    fn refuse(
        &self,
        active: Option<&ActivePolicy>,
        calls: &[InboundCall],
        claims: Option<&VerifiedAssertion>,
        rule: &str,
        reason: String,
        unauthenticated: bool,
    ) -> Refusal {
        let mut state = SessionState::scoped(ScopeKind::Unscoped, "");
        state.last_audit_hash = claims.and_then(parse_hash);
        let caller = claims.map_or("unverified", |c| c.iss.as_str());
        let rule = format!("inbound/{rule}");
        let fallback = InboundCall {
            method: "request".to_owned(),
            name: String::new(),
            digest: args_digest(None),
            span: tracing::Span::none(),
        };
        let mut correlation = String::new();
        let listed: Vec<&InboundCall> = if calls.is_empty() {
            vec![&fallback]
        } else {
            calls.iter().collect()
        };
        for call in listed {
            match self.write_record(
                active,
                &mut state,
                call,
                "deny",
                &rule,
                &reason,
                unix_now_ms(),
                caller,
            ) {
                Ok(id) => correlation = id,
                Err(err) => return err.into(),
            }
        }
        tracing::info!(rule = %rule, reason = %reason, "inbound call refused");
        InboundRefused {
            reason: format!("{rule}: {reason}"),
            correlation,
            unauthenticated,
        }
        .into()
    }

    /// Serves the inbound side on `listener` until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let limits = ConnectionLimits::inbound(&self.gateway.settings);
        let metrics = Arc::clone(&self.gateway.metrics);
        serve_connections("inbound", limits, metrics, listener, shutdown, move |req| {
            let inbound = Arc::clone(&self);
            async move { inbound.handle(req).await }
        })
        .await;
    }
}

fn idle_timeout(active: &ActivePolicy) -> Duration {
    Duration::from_secs(u64::from(
        active.snapshot.content.session.idle_timeout_seconds,
    ))
}

/// The caller's audit record hash from the assertion's task context.
fn parse_hash(claims: &VerifiedAssertion) -> Option<[u8; 32]> {
    let prev = &claims.ctx.as_ref()?.prev;
    if prev.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(prev.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The governed calls of a body (parsed strictly).
fn governed_calls(
    bytes: &[u8],
    limit: usize,
    headers: &http::HeaderMap,
    passthrough: &[String],
) -> Result<Vec<InboundCall>, Refusal> {
    let header_version = single_header(headers, &MCP_PROTOCOL_VERSION)?;
    // Only a trace's parent: an unreadable or repeated header is ignored.
    let header_traceparent = single_header(headers, &TRACEPARENT).ok().flatten();
    let (messages, batch) = match parse_payload(bytes, limit)? {
        Payload::Single(message) => (vec![message], false),
        Payload::Batch(messages) => (messages, true),
    };
    let routed = (!batch).then(|| &messages[0]);
    check_header_binding(
        headers,
        &BodyRouting {
            method: routed.and_then(Message::method),
            name: routed.and_then(routed_name),
            id: routed.and_then(request_id),
            meta_version: messages.iter().find_map(meta_protocol_version),
        },
    )?;
    let mut calls = Vec::new();
    for message in &messages {
        match classify(message, message_era(message, header_version), passthrough) {
            Governed::Call { name, arguments } => calls.push(InboundCall {
                method: message.method().unwrap_or_default().to_owned(),
                span: message_span(
                    Direction::Inbound,
                    message.method().unwrap_or_default(),
                    &name,
                    "inbound",
                    request_parent(header_traceparent, meta_traceparent(message)),
                ),
                name,
                digest: args_digest(arguments),
            }),
            Governed::Malformed(why) => {
                return Err(crate::jsonrpc::ParseError::InvalidMessage(why).into());
            }
            Governed::NotForwarded(why) => return Err(MethodNotForwarded(why).into()),
            // A task's call was decided (and verified) when it was created.
            Governed::List | Governed::Pass | Governed::Task { .. } => {}
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_agents_and_hashes_from_claims() {
        assert_eq!(
            agent_of("chaperone:agent:shop/planner"),
            Some(ObjectKey::new("shop", "planner"))
        );
        assert_eq!(agent_of("alice@example.com"), None);
        assert_eq!(agent_of("chaperone:agent:no-namespace"), None);
        let mut claims: VerifiedAssertion = serde_json::from_value(serde_json::json!({
            "iss": "chaperone:agent:shop/planner", "sub": "u", "aud": "a", "exp": 2, "iat": 1,
            "jti": "j", "sid": "s", "tool": "t", "args": "sha256:00", "snap": 1,
            "ctx": {"effects": ["sensitiveData"], "steps": 2, "prev": "ab".repeat(32)}
        }))
        .unwrap();
        assert_eq!(parse_hash(&claims), Some([0xab; 32]));
        claims.ctx.as_mut().unwrap().prev = "zz".repeat(32);
        assert_eq!(parse_hash(&claims), None);
        claims.ctx = None;
        assert_eq!(parse_hash(&claims), None);
    }

    #[test]
    fn governed_calls_carry_their_argument_digests() {
        let body = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":1}}},
            {"jsonrpc":"2.0","id":2,"method":"tools/list"},
            {"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
        let calls = governed_calls(body, 1 << 20, &http::HeaderMap::new(), &[]).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "a");
        assert_eq!(
            calls[0].digest,
            args_digest(Some(&serde_json::json!({"x": 1})))
        );
        let malformed = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":1}}"#;
        assert!(governed_calls(malformed, 1 << 20, &http::HeaderMap::new(), &[]).is_err());
        let unknown = br#"{"jsonrpc":"2.0","id":1,"method":"admin/drop"}"#;
        assert!(governed_calls(unknown, 1 << 20, &http::HeaderMap::new(), &[]).is_err());
    }

    #[test]
    fn bearer_tokens_are_read_from_authorization() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }
}
