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

use crate::refusal::{AmbiguousRequest, UnsupportedMediaType};

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

/// `Mcp-Method` (protocol revision 2026-07-28): the request's method.
pub const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
/// `Mcp-Name` (protocol revision 2026-07-28): the tool, resource or prompt
/// the request names.
pub const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

/// Refuses routing headers (`Mcp-Method`, `Mcp-Name`) that say something else
/// than the body does: a server or gateway that routes on them would run
/// another method or tool than the sidecar decided on. `method` and `name` are
/// the body's (`None` for a batch, which carries no routing headers).
pub fn check_routing_headers(
    headers: &HeaderMap,
    method: Option<&str>,
    name: Option<&str>,
) -> Result<(), AmbiguousRequest> {
    for (header, body) in [(&MCP_METHOD, method), (&MCP_NAME, name)] {
        let Some(value) = single_header(headers, header)? else {
            continue;
        };
        if body != Some(value) {
            return Err(AmbiguousRequest(format!(
                "header {header} is {value:?} but the body says {}",
                body.map_or_else(|| "nothing".to_owned(), |b| format!("{b:?}"))
            )));
        }
    }
    Ok(())
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

    #[test]
    fn refuses_routing_headers_that_disagree_with_the_body() {
        let mut headers = HeaderMap::new();
        assert!(check_routing_headers(&headers, Some("tools/call"), Some("echo")).is_ok());
        headers.insert(MCP_METHOD, HeaderValue::from_static("tools/call"));
        headers.insert(MCP_NAME, HeaderValue::from_static("echo"));
        assert!(check_routing_headers(&headers, Some("tools/call"), Some("echo")).is_ok());
        assert!(check_routing_headers(&headers, Some("tools/call"), Some("delete")).is_err());
        assert!(check_routing_headers(&headers, Some("ping"), None).is_err());
        assert!(check_routing_headers(&headers, None, None).is_err());
        headers.append(MCP_NAME, HeaderValue::from_static("echo"));
        assert!(check_routing_headers(&headers, Some("tools/call"), Some("echo")).is_err());
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
