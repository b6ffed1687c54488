//! The HTTP envelope of what the sidecar forwards: which requests it reads at
//! all, and the headers a forwarded request carries.
//!
//! The rule (shared with [`crate::jsonrpc`]): a message is forwarded only in a
//! form every mainstream reader reads the same way, and that form is the one
//! that was decided. At the HTTP level that means:
//! - a request body is `application/json` in UTF-8, uncompressed: any other
//!   charset (a server honouring `charset=utf-7` reads other characters than
//!   the sidecar did) or a `Content-Encoding` is refused with 415, and the
//!   forwarded request says `Content-Type: application/json` exactly;
//! - tool servers are asked for `Accept-Encoding: identity`, so list results the
//!   sidecar filters are never compressed past it;
//! - a header the sidecar decides on (`Mcp-Session-Id`,
//!   `MCP-Protocol-Version`) appears at most once;
//! - the path after the tool server's name has no dot segments, encoded
//!   separators or backslashes (the URL the server resolves is the one named);
//! - no header the agent sends can pose as one of the sidecar's: every
//!   `Chaperone-*` header is dropped, and so is every header with an
//!   underscore in its name (`Chaperone_Assertion`), which some servers and
//!   proxies read as the dashed name.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::jsonrpc::Id;
use crate::methods::{Era, era_of};
use crate::refusal::{AmbiguousRequest, HeaderMismatch, UnsupportedMediaType};

/// `Mcp-Session-Id` (protocol revisions up to 2025-11-25).
pub const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// `MCP-Protocol-Version`.
pub const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");

/// Refuses a request body the sidecar would read differently from a server:
/// not `application/json`, a charset other than UTF-8, a repeated
/// `Content-Type`, or any `Content-Encoding`.
pub fn check_body_headers(headers: &HeaderMap) -> Result<(), UnsupportedMediaType> {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = types.next() else {
        return Err(UnsupportedMediaType("no Content-Type".to_owned()));
    };
    if types.next().is_some() {
        return Err(UnsupportedMediaType("Content-Type repeated".to_owned()));
    }
    check_media_type(value)?;
    for encoding in headers.get_all(header::CONTENT_ENCODING) {
        let identity = encoding
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"));
        if !identity {
            return Err(UnsupportedMediaType(format!(
                "Content-Encoding {:?}",
                String::from_utf8_lossy(encoding.as_bytes())
            )));
        }
    }
    Ok(())
}

fn check_media_type(value: &HeaderValue) -> Result<(), UnsupportedMediaType> {
    let text = value
        .to_str()
        .map_err(|_| UnsupportedMediaType("Content-Type is not ASCII".to_owned()))?;
    let mut parts = text.split(';');
    let media = parts.next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return Err(UnsupportedMediaType(format!("Content-Type {text:?}")));
    }
    for param in parts {
        let Some((name, value)) = param.split_once('=') else {
            if param.trim().is_empty() {
                continue;
            }
            return Err(UnsupportedMediaType(format!(
                "Content-Type parameter {param:?}"
            )));
        };
        if !name.trim().eq_ignore_ascii_case("charset") {
            continue;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if !(value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")) {
            return Err(UnsupportedMediaType(format!("charset {value:?}")));
        }
    }
    Ok(())
}

/// The value of `name`, which must appear at most once and be visible ASCII.
pub fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a str>, AmbiguousRequest> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AmbiguousRequest(format!("header {name} repeated")));
    }
    value
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| AmbiguousRequest(format!("header {name} is not ASCII")))
}

/// W3C `traceparent`: the trace a request belongs to (a session scope).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `Mcp-Method` (protocol revision 2026-07-28): the request's method.
pub const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
/// `Mcp-Name` (protocol revision 2026-07-28): the tool, resource or prompt
/// the request names.
pub const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

/// What a body says that MCP's request headers mirror (see
/// [`check_header_binding`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct BodyRouting<'a> {
    /// The single message's method; `None` for a batch.
    pub method: Option<&'a str>,
    /// Its `params.name` (tools, prompts), `params.uri` (resources) or
    /// `params.taskId` (the tasks extension's `tasks/*`).
    pub name: Option<&'a str>,
    /// Its id when it is a request (the error answers it); `None` for a
    /// notification, a response or a batch.
    pub id: Option<&'a Id>,
    /// The protocol revision its `_meta` declares
    /// (`io.modelcontextprotocol/protocolVersion`); for a batch, the first
    /// any member declares.
    pub meta_version: Option<&'a str>,
}

/// The methods whose requests must carry `Mcp-Name` (revision 2026-07-28).
const NAMED_METHODS: [&str; 3] = ["tools/call", "resources/read", "prompts/get"];

/// Checks the request headers MCP 2026-07-28 binds to the body, and refuses
/// (`HeaderMismatch`, -32020) a request a server or gateway routing on the
/// headers would read differently from the sidecar, which decides on the body:
/// - `Mcp-Method` and `Mcp-Name` (Base64 sentinel `=?base64?…?=` decoded)
///   must equal the body's method and name/uri whenever they are sent, in
///   either era; a batch carries neither;
/// - when the header `MCP-Protocol-Version` or the body's `_meta` declares
///   2026-07-28 or later, both must be present and equal, `Mcp-Method` is
///   required on every request and `Mcp-Name` on `tools/call`,
///   `resources/read` and `prompts/get`, and the body is a single message.
pub fn check_header_binding(
    headers: &HeaderMap,
    body: &BodyRouting<'_>,
) -> Result<(), HeaderMismatch> {
    let mismatch = |reason: String| HeaderMismatch {
        reason,
        id: body.id.cloned(),
    };
    let single = |name: &HeaderName| single_header(headers, name).map_err(|e| mismatch(e.0));
    let header_version = single(&MCP_PROTOCOL_VERSION)?;
    let stateless = [header_version, body.meta_version]
        .into_iter()
        .flatten()
        .any(|v| era_of(v) == Era::Stateless);
    let header_method = single(&MCP_METHOD)?;
    let header_name = single(&MCP_NAME)?;
    let Some(method) = body.method else {
        if header_method.is_some() || header_name.is_some() {
            return Err(mismatch(
                "a batch carries no Mcp-Method or Mcp-Name header".to_owned(),
            ));
        }
        if stateless {
            return Err(mismatch(
                "revision 2026-07-28 sends one message per POST, not a batch".to_owned(),
            ));
        }
        return Ok(());
    };
    let request = body.id.is_some();
    if stateless {
        match (header_version, body.meta_version) {
            (Some(h), Some(b)) if h != b => {
                return Err(mismatch(format!(
                    "header MCP-Protocol-Version is {h:?} but the body's _meta says {b:?}"
                )));
            }
            (None, _) => {
                return Err(mismatch(
                    "header MCP-Protocol-Version is missing (required from revision 2026-07-28)"
                        .to_owned(),
                ));
            }
            (Some(h), None) if request => {
                return Err(mismatch(format!(
                    "header MCP-Protocol-Version is {h:?} but the body's _meta declares no protocolVersion"
                )));
            }
            _ => {}
        }
    }
    match header_method {
        Some(value) if value != method => {
            return Err(mismatch(format!(
                "header Mcp-Method is {value:?} but the body's method is {method:?}"
            )));
        }
        None if stateless && request => {
            return Err(mismatch(
                "header Mcp-Method is missing (required from revision 2026-07-28)".to_owned(),
            ));
        }
        _ => {}
    }
    match header_name {
        Some(value) => {
            let decoded = decode_header_value(value).ok_or_else(|| {
                mismatch(format!(
                    "header Mcp-Name {value:?} is not valid Base64 UTF-8"
                ))
            })?;
            if body.name != Some(decoded.as_ref()) {
                return Err(mismatch(format!(
                    "header Mcp-Name is {decoded:?} but the body names {}",
                    body.name
                        .map_or_else(|| "nothing".to_owned(), |n| format!("{n:?}"))
                )));
            }
        }
        None if stateless && request && NAMED_METHODS.contains(&method) => {
            return Err(mismatch(format!(
                "header Mcp-Name is missing (required on {method} from revision 2026-07-28)"
            )));
        }
        None => {}
    }
    Ok(())
}

/// A header value in MCP's encoding: as is, or the UTF-8 text of a Base64
/// sentinel `=?base64?…?=` (standard alphabet, padded); `None` when a sentinel
/// does not decode.
pub fn decode_header_value(value: &str) -> Option<std::borrow::Cow<'_, str>> {
    use base64::Engine as _;
    let Some(encoded) = value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="))
    else {
        return Some(std::borrow::Cow::Borrowed(value));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    String::from_utf8(bytes).ok().map(std::borrow::Cow::Owned)
}

/// Refuses a path suffix (after the tool server's name) that a server could
/// resolve to another resource than the one named: dot segments, encoded
/// slashes, backslashes or dots, and NUL.
pub fn check_path_suffix(rest: &str) -> Result<(), AmbiguousRequest> {
    let lower = rest.to_ascii_lowercase();
    if rest.contains('\\')
        || lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%2e")
        || lower.contains("%00")
    {
        return Err(AmbiguousRequest(format!(
            "path {rest:?} has encoded separators, dots or a backslash"
        )));
    }
    if rest
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(AmbiguousRequest(format!("path {rest:?} has dot segments")));
    }
    Ok(())
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
/// `Host`/`Content-Length` (set anew), no `Chaperone-*` header, no header with
/// an underscore; `Content-Type: application/json` exactly when there is a
/// body, and `Accept-Encoding: identity`.
pub fn forward_headers(
    src: &HeaderMap,
    authority: &http::uri::Authority,
    has_body: bool,
) -> HeaderMap {
    let mut dst = HeaderMap::with_capacity(src.len() + 3);
    for (name, value) in src {
        if is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::CONTENT_TYPE
            || name == header::CONTENT_ENCODING
            || name == header::ACCEPT_ENCODING
            || name.as_str().starts_with("chaperone-")
            || name.as_str().contains('_')
        {
            continue;
        }
        dst.append(name.clone(), value.clone());
    }
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        dst.insert(header::HOST, host);
    }
    if has_body {
        dst.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    dst.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    dst
}

/// Drops hop-by-hop headers from a response.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Whether a response's body is compressed (any `Content-Encoding` but
/// `identity`): the sidecar cannot read such a body where it must.
pub fn is_encoded(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        !v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_type(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn accepts_json_in_utf8_only() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/json; charset=utf8; profile=x",
        ] {
            assert!(check_body_headers(&with_type(ok)).is_ok(), "{ok}");
        }
        for refused in [
            "application/json; charset=utf-7",
            "application/json; charset=utf-16le",
            "application/json; charset=utf-8; charset=utf-7",
            "text/plain",
            "application/json-seq",
            "application/x-www-form-urlencoded",
        ] {
            assert!(
                check_body_headers(&with_type(refused)).is_err(),
                "{refused}"
            );
        }
        assert!(check_body_headers(&HeaderMap::new()).is_err());
        let mut headers = with_type("application/json");
        headers.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-7"),
        );
        assert!(check_body_headers(&headers).is_err());
        let mut headers = with_type("application/json");
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(check_body_headers(&headers).is_err());
    }

    #[test]
    fn refuses_repeated_decision_headers() {
        let mut headers = HeaderMap::new();
        headers.append(MCP_SESSION_ID, HeaderValue::from_static("a"));
        assert_eq!(single_header(&headers, &MCP_SESSION_ID).unwrap(), Some("a"));
        headers.append(MCP_SESSION_ID, HeaderValue::from_static("b"));
        assert!(single_header(&headers, &MCP_SESSION_ID).is_err());
    }

    fn routing<'a>(method: &'a str, name: Option<&'a str>, id: Option<&'a Id>) -> BodyRouting<'a> {
        BodyRouting {
            method: Some(method),
            name,
            id,
            meta_version: None,
        }
    }

    #[test]
    fn refuses_routing_headers_that_disagree_with_the_body() {
        let id = serde_json::json!(1);
        let call = routing("tools/call", Some("echo"), Some(&id));
        let mut headers = HeaderMap::new();
        assert!(check_header_binding(&headers, &call).is_ok());
        headers.insert(MCP_METHOD, HeaderValue::from_static("tools/call"));
        headers.insert(MCP_NAME, HeaderValue::from_static("echo"));
        assert!(check_header_binding(&headers, &call).is_ok());
        let other = routing("tools/call", Some("delete"), Some(&id));
        let refused = check_header_binding(&headers, &other).unwrap_err();
        assert_eq!(refused.id, Some(id.clone()));
        assert!(refused.reason.contains("Mcp-Name"), "{}", refused.reason);
        assert!(check_header_binding(&headers, &routing("ping", None, Some(&id))).is_err());
        assert!(check_header_binding(&headers, &BodyRouting::default()).is_err());
        headers.append(MCP_NAME, HeaderValue::from_static("echo"));
        assert!(check_header_binding(&headers, &call).is_err());
    }

    #[test]
    fn decodes_base64_names_before_comparing() {
        let id = serde_json::json!(1);
        let mut headers = HeaderMap::new();
        headers.insert(MCP_METHOD, HeaderValue::from_static("tools/call"));
        // "héllo" in the sentinel form.
        headers.insert(MCP_NAME, HeaderValue::from_static("=?base64?aMOpbGxv?="));
        assert!(
            check_header_binding(&headers, &routing("tools/call", Some("héllo"), Some(&id)))
                .is_ok()
        );
        assert!(
            check_header_binding(
                &headers,
                &routing("tools/call", Some("=?base64?aMOpbGxv?="), Some(&id))
            )
            .is_err()
        );
        headers.insert(MCP_NAME, HeaderValue::from_static("=?base64?!!?="));
        assert!(
            check_header_binding(&headers, &routing("tools/call", Some("x"), Some(&id))).is_err()
        );
    }

    #[test]
    fn binds_headers_and_body_from_revision_2026_07_28() {
        let id = serde_json::json!(7);
        let modern = |method: &'static str, name: Option<&'static str>| BodyRouting {
            method: Some(method),
            name,
            id: Some(&id),
            meta_version: Some("2026-07-28"),
        };
        let mut headers = HeaderMap::new();
        // Nothing mirrored: every required header is missing.
        let refused =
            check_header_binding(&headers, &modern("tools/call", Some("echo"))).unwrap_err();
        assert!(
            refused.reason.contains("MCP-Protocol-Version"),
            "{}",
            refused.reason
        );
        headers.insert(MCP_PROTOCOL_VERSION, HeaderValue::from_static("2026-07-28"));
        let refused =
            check_header_binding(&headers, &modern("tools/call", Some("echo"))).unwrap_err();
        assert!(
            refused.reason.contains("Mcp-Method is missing"),
            "{}",
            refused.reason
        );
        headers.insert(MCP_METHOD, HeaderValue::from_static("tools/call"));
        let refused =
            check_header_binding(&headers, &modern("tools/call", Some("echo"))).unwrap_err();
        assert!(
            refused.reason.contains("Mcp-Name is missing"),
            "{}",
            refused.reason
        );
        headers.insert(MCP_NAME, HeaderValue::from_static("echo"));
        assert!(check_header_binding(&headers, &modern("tools/call", Some("echo"))).is_ok());
        // Versions must agree, and a modern header needs a modern body.
        headers.insert(MCP_PROTOCOL_VERSION, HeaderValue::from_static("2026-09-01"));
        assert!(check_header_binding(&headers, &modern("tools/call", Some("echo"))).is_err());
        headers.insert(MCP_PROTOCOL_VERSION, HeaderValue::from_static("2026-07-28"));
        let legacy_body = BodyRouting {
            meta_version: None,
            ..modern("tools/call", Some("echo"))
        };
        assert!(check_header_binding(&headers, &legacy_body).is_err());
        // tools/list needs Mcp-Method only.
        headers.remove(MCP_NAME);
        headers.insert(MCP_METHOD, HeaderValue::from_static("tools/list"));
        assert!(check_header_binding(&headers, &modern("tools/list", None)).is_ok());
        // A legacy request needs none of them.
        let mut legacy = HeaderMap::new();
        legacy.insert(MCP_PROTOCOL_VERSION, HeaderValue::from_static("2025-06-18"));
        assert!(
            check_header_binding(&legacy, &routing("tools/call", Some("echo"), Some(&id))).is_ok()
        );
        // No modern batches.
        let batch = BodyRouting {
            meta_version: Some("2026-07-28"),
            ..BodyRouting::default()
        };
        assert!(check_header_binding(&headers, &batch).is_err());
    }

    #[test]
    fn refuses_paths_that_resolve_elsewhere() {
        for ok in ["", "/mcp", "/a/b.json", "/v1/..x"] {
            assert!(check_path_suffix(ok).is_ok(), "{ok}");
        }
        for refused in [
            "/../admin",
            "/a/./b",
            "/..",
            "/%2e%2e/admin",
            "/a%2Fb",
            "/a\\..\\b",
            "/a%00",
        ] {
            assert!(check_path_suffix(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn forwards_no_header_that_poses_as_the_sidecars() {
        let mut src = HeaderMap::new();
        src.insert("chaperone-assertion", HeaderValue::from_static("x"));
        src.insert("chaperone_assertion", HeaderValue::from_static("x"));
        src.insert("mcp_session_id", HeaderValue::from_static("x"));
        src.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        src.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        src.insert("mcp-session-id", HeaderValue::from_static("s"));
        let authority: http::uri::Authority = "tool:8080".parse().unwrap();
        let out = forward_headers(&src, &authority, true);
        assert_eq!(out.get("mcp-session-id").unwrap(), "s");
        assert_eq!(out.get(header::CONTENT_TYPE).unwrap(), "application/json");
        assert_eq!(out.get(header::ACCEPT_ENCODING).unwrap(), "identity");
        assert!(out.keys().all(|k| !k.as_str().contains('_')));
        assert!(out.get("chaperone-assertion").is_none());
    }
}
