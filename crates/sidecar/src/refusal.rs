//! Requests the sidecar refuses before (or instead of) forwarding them: one small
//! error type each, and the one place that maps them to an HTTP status and a
//! JSON-RPC error code.

use http::StatusCode;
use thiserror::Error;

use chaperone_json::JsonError;

use crate::jsonrpc::{self, ParseError};
use crate::snapshot::Absence;

/// No snapshot in force: everything is refused until one is (fail closed),
/// saying why there is none.
#[derive(Debug, Error)]
#[error("{0}: the Chaperone sidecar refuses every call until one is in force")]
pub struct NoSnapshot(pub Absence);

/// The first path segment names no tool server of this agent.
#[derive(Debug, Error)]
#[error("no tool server named {0:?} is configured for this agent")]
pub struct UnknownServer(pub String);

/// The `Mcp-Session-Id` was not issued through this sidecar, or has expired.
#[derive(Debug, Error)]
#[error("session not found: initialize a new session")]
pub struct UnknownSession;

/// The `Chaperone-Session` the agent sent names no live inbound session (it
/// ended, expired, or was never issued here).
#[derive(Debug, Error)]
#[error(
    "Chaperone-Session is unknown or expired: the delegated session ended; the task must be handed over again"
)]
pub struct UnknownDelegatedSession;

/// A call at the inbound side was refused: a missing or invalid assertion or
/// initiator token, or no grant from the caller.
#[derive(Debug, Error)]
#[error("Chaperone refused this inbound call: {reason} (correlation id {correlation})")]
pub struct InboundRefused {
    /// Why, naming the failed check.
    pub reason: String,
    /// Correlation id, also in the audit record.
    pub correlation: String,
    /// 401 for a missing or bad initiator token, else 403.
    pub unauthenticated: bool,
}

/// An HTTP method MCP's Streamable HTTP transport does not use.
#[derive(Debug, Error)]
#[error("method not allowed: use POST, GET or DELETE")]
pub struct MethodNotAllowed;

/// The request body was unreadable (too large, not UTF-8, not strict JSON-RPC).
#[derive(Debug, Error)]
#[error(transparent)]
pub struct Unparseable(#[from] pub ParseError);

/// The request body is not `application/json` in UTF-8, or is compressed: a
/// server honouring another charset or encoding would read other bytes than
/// the sidecar decided on.
#[derive(Debug, Error)]
#[error(
    "unsupported media type: {0}; send Content-Type: application/json (UTF-8) without Content-Encoding"
)]
pub struct UnsupportedMediaType(pub String);

/// The request is ambiguous at the HTTP level (a repeated header the sidecar
/// decides on, a path with dot segments or encoded separators).
#[derive(Debug, Error)]
#[error("ambiguous request: {0}")]
pub struct AmbiguousRequest(pub String);

/// A JSON-RPC method the sidecar does not forward (unknown and not in the
/// AgentIdentity's `passthroughMethods`, or not of the request's protocol era).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct MethodNotForwarded(pub String);

/// The request's MCP headers (`MCP-Protocol-Version`, `Mcp-Method`,
/// `Mcp-Name`) are missing or say something else than its body (MCP
/// `HeaderMismatch`, -32020).
#[derive(Debug, Error)]
#[error("header mismatch: {reason}")]
pub struct HeaderMismatch {
    /// What disagrees.
    pub reason: String,
    /// The request's id, answered in the error.
    pub id: Option<jsonrpc::Id>,
}

/// The request body did not arrive in time: a body trickled after its head
/// would hold a connection (and a slot of the listener's cap) for as long as
/// the sender likes.
#[derive(Debug, Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct SlowBody(pub std::time::Duration);

/// The tool server could not be reached.
#[derive(Debug, Error)]
#[error("tool server {0:?} is unavailable")]
pub struct UpstreamUnavailable(pub String);

/// The tool server's `upstreamSecret` is not mounted or not usable: the call
/// is not sent without the credential or CA it asks for.
#[derive(Debug, Error)]
#[error("tool server {server:?}: its upstreamSecret {secret:?} {reason}")]
pub struct UpstreamSecretUnusable {
    /// The tool server.
    pub server: String,
    /// The Secret the AgentIdentity names.
    pub secret: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The tool server's answer could not be read where the sidecar must read it
/// (a `tools/list` page); it is not passed on.
#[derive(Debug, Error)]
#[error("tool server response refused: {0}")]
pub struct UpstreamResponseRefused(pub String);

/// The audit record could not be written; the call is refused.
#[derive(Debug, Error)]
#[error("the audit log is unavailable; the call is refused")]
pub struct AuditUnavailable;

/// Every refusal.
#[derive(Debug, Error)]
pub enum Refusal {
    /// See [`NoSnapshot`].
    #[error(transparent)]
    NoSnapshot(#[from] NoSnapshot),
    /// See [`UnknownServer`].
    #[error(transparent)]
    UnknownServer(#[from] UnknownServer),
    /// See [`UnknownSession`].
    #[error(transparent)]
    UnknownSession(#[from] UnknownSession),
    /// See [`MethodNotAllowed`].
    #[error(transparent)]
    MethodNotAllowed(#[from] MethodNotAllowed),
    /// See [`Unparseable`].
    #[error(transparent)]
    Unparseable(#[from] Unparseable),
    /// See [`UpstreamUnavailable`].
    #[error(transparent)]
    UpstreamUnavailable(#[from] UpstreamUnavailable),
    /// See [`UpstreamSecretUnusable`].
    #[error(transparent)]
    UpstreamSecretUnusable(#[from] UpstreamSecretUnusable),
    /// See [`UpstreamResponseRefused`].
    #[error(transparent)]
    UpstreamResponseRefused(#[from] UpstreamResponseRefused),
    /// See [`AuditUnavailable`].
    #[error(transparent)]
    AuditUnavailable(#[from] AuditUnavailable),
    /// See [`UnknownDelegatedSession`].
    #[error(transparent)]
    UnknownDelegatedSession(#[from] UnknownDelegatedSession),
    /// See [`InboundRefused`].
    #[error(transparent)]
    InboundRefused(#[from] InboundRefused),
    /// See [`UnsupportedMediaType`].
    #[error(transparent)]
    UnsupportedMediaType(#[from] UnsupportedMediaType),
    /// See [`AmbiguousRequest`].
    #[error(transparent)]
    AmbiguousRequest(#[from] AmbiguousRequest),
    /// See [`MethodNotForwarded`].
    #[error(transparent)]
    MethodNotForwarded(#[from] MethodNotForwarded),
    /// See [`SlowBody`].
    #[error(transparent)]
    SlowBody(#[from] SlowBody),
    /// See [`HeaderMismatch`].
    #[error(transparent)]
    HeaderMismatch(#[from] HeaderMismatch),
}

impl From<ParseError> for Refusal {
    fn from(err: ParseError) -> Self {
        Refusal::Unparseable(Unparseable(err))
    }
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NoSnapshot(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UnknownServer(_) | Refusal::UnknownSession(_) => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Unparseable(Unparseable(ParseError::Json(JsonError::TooLarge { .. }))) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Refusal::Unparseable(_)
            | Refusal::AmbiguousRequest(_)
            | Refusal::MethodNotForwarded(_)
            | Refusal::HeaderMismatch(_) => StatusCode::BAD_REQUEST,
            Refusal::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::UpstreamUnavailable(_)
            | Refusal::UpstreamSecretUnusable(_)
            | Refusal::UpstreamResponseRefused(_) => StatusCode::BAD_GATEWAY,
            Refusal::AuditUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UnknownDelegatedSession(_) => StatusCode::FORBIDDEN,
            Refusal::InboundRefused(r) if r.unauthenticated => StatusCode::UNAUTHORIZED,
            Refusal::InboundRefused(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The JSON-RPC error code of the refusal.
    pub fn code(&self) -> i64 {
        match self {
            Refusal::NoSnapshot(_) => jsonrpc::NOT_READY,
            Refusal::UnknownServer(_)
            | Refusal::UnknownSession(_)
            | Refusal::MethodNotAllowed(_)
            | Refusal::UnsupportedMediaType(_)
            | Refusal::AmbiguousRequest(_)
            | Refusal::SlowBody(_) => jsonrpc::INVALID_REQUEST,
            Refusal::MethodNotForwarded(_) => jsonrpc::METHOD_NOT_FOUND,
            Refusal::HeaderMismatch(_) => jsonrpc::HEADER_MISMATCH,
            Refusal::Unparseable(Unparseable(err)) => err.code(),
            Refusal::UpstreamUnavailable(_)
            | Refusal::UpstreamSecretUnusable(_)
            | Refusal::UpstreamResponseRefused(_)
            | Refusal::AuditUnavailable(_) => jsonrpc::INTERNAL_ERROR,
            Refusal::UnknownDelegatedSession(_) | Refusal::InboundRefused(_) => {
                jsonrpc::POLICY_DENIED
            }
        }
    }

    /// A short label for the `refused` metric.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoSnapshot(NoSnapshot(Absence::ControllerLost { .. })) => "snapshot_withdrawn",
            Refusal::NoSnapshot(_) => "no_snapshot",
            Refusal::UnknownServer(_) => "unknown_server",
            Refusal::UnknownSession(_) => "unknown_session",
            Refusal::MethodNotAllowed(_) => "method_not_allowed",
            Refusal::Unparseable(Unparseable(err)) => err.label(),
            Refusal::UnsupportedMediaType(_) => "unsupported_media_type",
            Refusal::AmbiguousRequest(_) => "ambiguous_request",
            Refusal::MethodNotForwarded(_) => "method_not_forwarded",
            Refusal::SlowBody(_) => "slow_body",
            Refusal::HeaderMismatch(_) => "header_mismatch",
            Refusal::UpstreamUnavailable(_) => "upstream_unavailable",
            Refusal::UpstreamSecretUnusable(_) => "upstream_secret_unusable",
            Refusal::UpstreamResponseRefused(_) => "upstream_response_refused",
            Refusal::AuditUnavailable(_) => "audit_unavailable",
            Refusal::UnknownDelegatedSession(_) => "unknown_delegated_session",
            Refusal::InboundRefused(_) => "inbound_refused",
        }
    }

    /// The JSON-RPC error body of the refusal (id unknown: `null`).
    pub fn body(&self) -> serde_json::Value {
        let id = match self {
            Refusal::HeaderMismatch(m) => m.id.as_ref(),
            _ => None,
        };
        jsonrpc::error_response(id, self.code(), &self.to_string(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_refusals_to_statuses_and_codes() {
        let r = Refusal::from(NoSnapshot(Absence::NotYet));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.label(), "no_snapshot");
        let r = Refusal::from(NoSnapshot(Absence::ControllerLost { limit_seconds: 30 }));
        assert_eq!(
            (r.status(), r.code(), r.label()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                jsonrpc::NOT_READY,
                "snapshot_withdrawn"
            )
        );
        assert!(r.to_string().contains("more than 30 s"), "{r}");
        let r = Refusal::from(ParseError::Json(JsonError::TooLarge { limit: 1 }));
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let r = Refusal::from(ParseError::Json(JsonError::DuplicateKey {
            key: "a".into(),
        }));
        assert_eq!(
            (r.status(), r.code()),
            (StatusCode::BAD_REQUEST, jsonrpc::PARSE_ERROR)
        );
        let r = Refusal::from(ParseError::InvalidMessage("x"));
        assert_eq!(r.code(), jsonrpc::INVALID_REQUEST);
        let r = Refusal::from(UnsupportedMediaType("charset utf-7".into()));
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
