//! OAuth-protected tool servers through the proxy (MCP authorization, OAuth
//! 2.0 Protected Resource Metadata, RFC 9728).
//!
//! The agent's `Authorization` passes to the tool server unchanged, and the
//! tool server's `401`/`403` comes back with its `WWW-Authenticate`. What
//! would send the agent past the sidecar is mapped onto it:
//! - a challenge's `resource_metadata` parameter becomes the sidecar's URL of
//!   the same document, `http://<Host>/.well-known/oauth-protected-resource`
//!   followed by the route's path (`/<server>[/<rest>]`): RFC 9728's
//!   well-known form of the URL the agent used, so a client that derives it
//!   without the header finds the same document. A server name is one path
//!   segment (a DNS label), so the mapping is unambiguous. Every other byte of
//!   the header is kept; a header with a `resource_metadata` the sidecar
//!   cannot read safely is dropped (a client never sees the tool server's own
//!   URL, nor a value two readers would read differently);
//! - the sidecar serves that document: fetched from where the tool server's
//!   challenge said (remembered per route), else from the RFC 9728 well-known
//!   URL of the tool server's endpoint (then its root form), without any of
//!   the agent's headers, bounded in size and time; its `resource` becomes
//!   the URL the agent uses (a client checks that they match, RFC 9728
//!   §3.3), every other member is kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use chaperone_json::Limits;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;

use crate::client::UpstreamClient;
use crate::intake::check_path_suffix;
use crate::proxy::{Gateway, ResponseBody, json_response};
use crate::refusal::{Refusal, UnknownServer, UpstreamResponseRefused};
use crate::snapshot::{ActivePolicy, Upstream};

/// The RFC 9728 well-known path prefix of protected resource metadata.
pub const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";
/// The largest metadata document the sidecar reads.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// How long fetching one metadata document may take, body included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How many routes' metadata locations are remembered (the oldest one goes).
const MAX_REMEMBERED: usize = 1024;
/// The challenge parameter naming the metadata document (RFC 9728 §5.1).
const RESOURCE_METADATA: &str = "resource_metadata";

/// The server and path suffix of a metadata request,
/// `/.well-known/oauth-protected-resource/<server>[/<rest>]`; `None` for
/// any other path (the root form names no server).
pub fn metadata_route(path: &str) -> Option<(&str, &str)> {
    let route = path.strip_prefix(WELL_KNOWN)?.strip_prefix('/')?;
    let (server, rest) = match route.find('/') {
        Some(at) => route.split_at(at),
        None => (route, ""),
    };
    (!server.is_empty()).then_some((server, rest))
}

/// The authority the agent addressed: its `Host` (or the request target's
/// authority, HTTP/2) when that is a plain `host[:port]`, else the proxy's
/// listen address.
pub fn agent_authority(host: Option<&HeaderValue>, uri: &Uri, listen: SocketAddr) -> String {
    // Only what a `host[:port]` holds (IP literals included): the result
    // goes into URLs and quoted header parameters as it is.
    let plain = |text: &str| {
        let safe = !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~:[]".contains(&b));
        safe.then(|| text.parse::<http::uri::Authority>().ok())
            .flatten()
            .map(|a| a.as_str().to_owned())
    };
    host.and_then(|h| h.to_str().ok())
        .and_then(plain)
        .or_else(|| uri.authority().and_then(|a| plain(a.as_str())))
        .unwrap_or_else(|| listen.to_string())
}

/// Whether `path` holds only RFC 3986 path characters (so it can be quoted
/// in a header and read back the same by every client).
fn is_plain_path(path: &str) -> bool {
    path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~%!$&'()*+,;=:@".contains(&b))
}

/// The URL the agent uses for `route` (`/<server>[/<rest>]`) at the sidecar:
/// the `resource` of the documents it serves.
pub fn sidecar_resource_url(authority: &str, route: &str) -> String {
    format!("http://{authority}{route}")
}

/// The sidecar's URL of `route`'s metadata document; `None` when the route
/// has characters a header could not carry safely.
pub fn sidecar_metadata_url(authority: &str, route: &str) -> Option<String> {
    is_plain_path(route).then(|| format!("http://{authority}{WELL_KNOWN}{route}"))
}

/// The RFC 9728 §3.1 metadata URLs of the resource `resource` (the tool
/// server's endpoint URL): the well-known prefix inserted between authority
/// and path, then (when the path is not empty) the root form.
pub fn upstream_well_known(resource: &str) -> Option<Vec<String>> {
    let uri: Uri = resource.parse().ok()?;
    let scheme = uri
        .scheme_str()
        .filter(|s| matches!(*s, "http" | "https"))?;
    let authority = uri.authority()?;
    let root = format!("{scheme}://{authority}{WELL_KNOWN}");
    // RFC 9728 §3.1: a lone slash after the host is removed first.
    let mut suffix = match uri.path() {
        "/" => String::new(),
        path => path.to_owned(),
    };
    if let Some(query) = uri.query() {
        suffix.push('?');
        suffix.push_str(query);
    }
    Some(if suffix.is_empty() {
        vec![root]
    } else {
        vec![format!("{root}{suffix}"), root]
    })
}

/// Why a metadata URL named by a tool server is not followed.
fn unusable_metadata_url(url: &str, upstream_https: bool) -> Option<&'static str> {
    let Ok(uri) = url.parse::<Uri>() else {
        return Some("resource_metadata is not a URL");
    };
    match (uri.scheme_str(), uri.authority()) {
        (Some("https"), Some(a)) if !a.as_str().contains('@') => None,
        (Some("http"), Some(a)) if !a.as_str().contains('@') && !upstream_https => None,
        (Some("http"), Some(_)) if upstream_https => {
            Some("resource_metadata is http:// for an https:// tool server")
        }
        _ => Some("resource_metadata is not an absolute http(s) URL without userinfo"),
    }
}

// --- WWW-Authenticate ---------------------------------------------------------

/// One auth-param of a challenge: byte ranges into the header value.
#[derive(Debug)]
struct Param {
    name: Range<usize>,
    /// The value as sent (quotes included).
    value: Range<usize>,
}

/// One challenge: its scheme and auth-params (a token68 is kept as bytes
/// and not recorded).
#[derive(Debug)]
struct Challenge {
    params: Vec<Param>,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t') {
        i += 1;
    }
    i
}

fn scan_token(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_tchar(b[i]) {
        i += 1;
    }
    i
}

/// The end of a token68 at `i` (`i` itself when there is none).
fn scan_token68(b: &[u8], mut i: usize) -> usize {
    let start = i;
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b"-._~+/".contains(&b[i])) {
        i += 1;
    }
    if i == start {
        return start;
    }
    while i < b.len() && b[i] == b'=' {
        i += 1;
    }
    i
}

/// Whether a list element ends at `i`: only whitespace, then `,` or the end.
fn element_ends(b: &[u8], i: usize) -> bool {
    let i = skip_ws(b, i);
    i == b.len() || b[i] == b','
}

/// A token or quoted-string at `i`: its range, quotes included.
fn scan_value(b: &[u8], i: usize) -> Result<Range<usize>, &'static str> {
    if b.get(i) != Some(&b'"') {
        let end = scan_token(b, i);
        return if end > i {
            Ok(i..end)
        } else {
            Err("a parameter has no value")
        };
    }
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'"' => return Ok(i..j + 1),
            b'\\' if j + 1 < b.len() => j += 2,
            b'\t' | b' '..=b'~' => j += 1,
            _ => return Err("a quoted-string holds a control character"),
        }
    }
    Err("a quoted-string is not closed")
}

/// A token's or quoted-string's text (escapes undone).
fn unquote(raw: &str) -> String {
    let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return raw.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    out
}

/// Parses a `WWW-Authenticate` value (RFC 9110 §11.6.1: `1#challenge`,
/// `challenge = auth-scheme [ 1*SP ( token68 / #auth-param ) ]`) strictly:
/// anything two readers could split differently is an error.
fn parse_challenges(s: &str) -> Result<Vec<Challenge>, &'static str> {
    let b = s.as_bytes();
    let mut challenges: Vec<Challenge> = Vec::new();
    let mut i = 0;
    // Right after `scheme 1*SP`: an auth-param must follow, not a scheme.
    let mut after_scheme = false;
    loop {
        while !after_scheme && i < b.len() && matches!(b[i], b' ' | b'\t' | b',') {
            i += 1;
        }
        if i == b.len() {
            return if challenges.is_empty() {
                Err("no challenge")
            } else {
                Ok(challenges)
            };
        }
        let start = i;
        let end = scan_token(b, i);
        if end == start {
            return Err("expected an auth-scheme or a parameter name");
        }
        let eq = skip_ws(b, end);
        if b.get(eq) == Some(&b'=') {
            let challenge = challenges
                .last_mut()
                .ok_or("a parameter before any auth-scheme")?;
            let value = scan_value(b, skip_ws(b, eq + 1))?;
            if !element_ends(b, value.end) {
                return Err("a parameter is not followed by a comma");
            }
            i = skip_ws(b, value.end);
            challenge.params.push(Param {
                name: start..end,
                value,
            });
            after_scheme = false;
            continue;
        }
        if after_scheme {
            return Err("a token after an auth-scheme is neither token68 nor a parameter");
        }
        challenges.push(Challenge { params: Vec::new() });
        if element_ends(b, end) {
            i = end;
            continue;
        }
        if !matches!(b[end], b' ' | b'\t') {
            return Err("an auth-scheme is followed by neither a space nor a comma");
        }
        let next = skip_ws(b, end);
        let token68 = scan_token68(b, next);
        if token68 > next && element_ends(b, token68) {
            i = token68;
            continue;
        }
        i = next;
        after_scheme = true;
    }
}

/// What became of one `WWW-Authenticate` value.
#[derive(Debug, PartialEq, Eq)]
pub enum ChallengeRewrite {
    /// No `resource_metadata` in it: passed as it came, parsed or not.
    Unchanged,
    /// Each `resource_metadata` now names the sidecar; `upstream` is the one
    /// URL the tool server named.
    Rewritten {
        /// The new value.
        value: String,
        /// The tool server's metadata URL.
        upstream: String,
    },
    /// It has a `resource_metadata` the sidecar cannot map safely: dropped.
    Dropped(&'static str),
}

fn count_resource_metadata(bytes: &[u8]) -> usize {
    let needle = RESOURCE_METADATA.as_bytes();
    bytes
        .windows(needle.len())
        .filter(|w| w.eq_ignore_ascii_case(needle))
        .count()
}

/// Rewrites the `resource_metadata` parameters of one `WWW-Authenticate`
/// value to `sidecar_url` (`None`: the route cannot be named safely), every
/// other byte kept. The tool server's URL must be one absolute http(s) URL
/// (https when the tool server is), and the parameter's name may appear
/// nowhere but as a parameter name (a sloppy client must not find another).
pub fn rewrite_challenge(
    value: &HeaderValue,
    sidecar_url: Option<&str>,
    upstream_https: bool,
) -> ChallengeRewrite {
    let mentions = count_resource_metadata(value.as_bytes());
    if mentions == 0 {
        return ChallengeRewrite::Unchanged;
    }
    let Ok(text) = value.to_str() else {
        return ChallengeRewrite::Dropped("the header is not visible ASCII");
    };
    let challenges = match parse_challenges(text) {
        Ok(challenges) => challenges,
        Err(why) => return ChallengeRewrite::Dropped(why),
    };
    let mut found: Vec<&Param> = Vec::new();
    for challenge in &challenges {
        let mut named = challenge
            .params
            .iter()
            .filter(|p| text[p.name.clone()].eq_ignore_ascii_case(RESOURCE_METADATA));
        if let Some(param) = named.next() {
            if named.next().is_some() {
                return ChallengeRewrite::Dropped("resource_metadata repeated in one challenge");
            }
            found.push(param);
        }
    }
    if found.len() != mentions {
        return ChallengeRewrite::Dropped("resource_metadata appears inside another parameter");
    }
    let upstream = unquote(&text[found[0].value.clone()]);
    if found
        .iter()
        .any(|p| unquote(&text[p.value.clone()]) != upstream)
    {
        return ChallengeRewrite::Dropped("challenges name different resource_metadata URLs");
    }
    if let Some(why) = unusable_metadata_url(&upstream, upstream_https) {
        return ChallengeRewrite::Dropped(why);
    }
    let Some(sidecar_url) = sidecar_url else {
        return ChallengeRewrite::Dropped("the route's path cannot be named in a header");
    };
    let mut out = String::with_capacity(text.len() + sidecar_url.len());
    let mut copied = 0;
    for param in &found {
        out.push_str(&text[copied..param.value.start]);
        out.push('"');
        out.push_str(sidecar_url);
        out.push('"');
        copied = param.value.end;
    }
    out.push_str(&text[copied..]);
    ChallengeRewrite::Rewritten {
        value: out,
        upstream,
    }
}

/// Rewrites every `WWW-Authenticate` of a response (see
/// [`rewrite_challenge`]), in order; values that name different tool-server
/// URLs are all dropped. Returns the tool server's metadata URL, if one was
/// named, and the reasons of what was dropped.
pub fn rewrite_challenges(
    headers: &mut HeaderMap,
    sidecar_url: Option<&str>,
    upstream_https: bool,
) -> (Option<String>, Vec<&'static str>) {
    let mut results: Vec<(HeaderValue, ChallengeRewrite)> = headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .map(|v| (v.clone(), rewrite_challenge(v, sidecar_url, upstream_https)))
        .collect();
    let mut named: Option<String> = None;
    let mut conflict = false;
    for (_, result) in &results {
        if let ChallengeRewrite::Rewritten { upstream, .. } = result {
            conflict |= named.as_ref().is_some_and(|n| n != upstream);
            named.get_or_insert_with(|| upstream.clone());
        }
    }
    if conflict {
        named = None;
        for (_, result) in &mut results {
            if matches!(result, ChallengeRewrite::Rewritten { .. }) {
                *result = ChallengeRewrite::Dropped(
                    "WWW-Authenticate headers name different resource_metadata URLs",
                );
            }
        }
    }
    let mut dropped = Vec::new();
    headers.remove(header::WWW_AUTHENTICATE);
    for (original, result) in results {
        let value = match result {
            ChallengeRewrite::Unchanged => original,
            ChallengeRewrite::Rewritten { value, .. } => match HeaderValue::from_str(&value) {
                Ok(value) => value,
                Err(_) => {
                    dropped.push("the rewritten header is not a header value");
                    continue;
                }
            },
            ChallengeRewrite::Dropped(why) => {
                dropped.push(why);
                continue;
            }
        };
        headers.append(header::WWW_AUTHENTICATE, value);
    }
    (named, dropped)
}

// --- Metadata documents ------------------------------------------------------

/// `body`, a protected resource metadata document, with `resource` set to
/// `resource`: a JSON object (read strictly: no repeated or case-colliding
/// keys) whose `resource` is a string; every other member kept.
pub fn rewrite_metadata(body: &[u8], resource: &str) -> Result<Value, String> {
    let mut value = chaperone_json::parse(body, Limits::bytes(MAX_METADATA_BYTES))
        .map_err(|e| e.to_string())?;
    let Some(object) = value.as_object_mut() else {
        return Err("the document is not a JSON object".to_owned());
    };
    match object.get_mut("resource") {
        Some(Value::String(named)) => *named = resource.to_owned(),
        Some(_) => return Err("its \"resource\" is not a string".to_owned()),
        None => return Err("it has no \"resource\"".to_owned()),
    }
    Ok(value)
}

/// Where each route's tool server said its metadata document is (from its
/// `WWW-Authenticate`), for the URL of the tool server it was seen for.
#[derive(Debug, Default)]
pub struct MetadataLocations {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    by_route: HashMap<String, Location>,
    /// Insertion counter: the smallest `order` is the oldest entry.
    next: u64,
}

#[derive(Debug)]
struct Location {
    base_url: String,
    url: String,
    order: u64,
}

impl MetadataLocations {
    /// Remembers `url` for `route` of the tool server at `base_url`.
    pub fn remember(&self, route: &str, base_url: &str, url: String) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.by_route.len() >= MAX_REMEMBERED && !seen.by_route.contains_key(route) {
            let oldest = seen
                .by_route
                .iter()
                .min_by_key(|(_, l)| l.order)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                seen.by_route.remove(&oldest);
            }
        }
        seen.next += 1;
        let order = seen.next;
        seen.by_route.insert(
            route.to_owned(),
            Location {
                base_url: base_url.to_owned(),
                url,
                order,
            },
        );
    }

    /// The URL remembered for `route` of the tool server at `base_url`.
    pub fn get(&self, route: &str, base_url: &str) -> Option<String> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.by_route
            .get(route)
            .filter(|l| l.base_url == base_url)
            .map(|l| l.url.clone())
    }
}

// --- The proxy's side ----------------------------------------------------------

/// The URL the agent requested at the sidecar (its `Host` and path), kept
/// while the request is forwarded.
#[derive(Debug)]
pub struct RequestedUrl {
    host: Option<HeaderValue>,
    uri: Uri,
}

impl RequestedUrl {
    /// What `req` addressed.
    pub fn of<B>(req: &Request<B>) -> Self {
        Self {
            host: req.headers().get(header::HOST).cloned(),
            uri: req.uri().clone(),
        }
    }
}

/// Maps the `WWW-Authenticate` of `upstream`'s response onto the sidecar
/// and remembers where the tool server said its metadata is.
pub fn map_challenges(
    gateway: &Gateway,
    requested: &RequestedUrl,
    upstream: &Upstream,
    headers: &mut HeaderMap,
) {
    if !headers.contains_key(header::WWW_AUTHENTICATE) {
        return;
    }
    let route = requested.uri.path();
    let authority = agent_authority(
        requested.host.as_ref(),
        &requested.uri,
        gateway.settings.listen,
    );
    let sidecar_url = sidecar_metadata_url(&authority, route);
    let https = upstream.base_url.starts_with("https://");
    let (named, dropped) = rewrite_challenges(headers, sidecar_url.as_deref(), https);
    for why in dropped {
        tracing::warn!(
            server = %upstream.name,
            reason = why,
            "dropped a WWW-Authenticate header of the tool server: its resource_metadata cannot be mapped onto the sidecar safely"
        );
    }
    if let Some(url) = named {
        gateway
            .metadata_locations
            .remember(route, &upstream.base_url, url);
    }
}

/// Why a metadata document could not be fetched.
enum FetchError {
    NotFound,
    Failed(String),
}

async fn fetch(client: &UpstreamClient, url: &str) -> Result<Bytes, FetchError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| FetchError::Failed("not a URL".to_owned()))?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    // Nothing of the agent's request: its credentials are not the sidecar's
    // to present elsewhere.
    let headers = request.headers_mut();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let read = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| FetchError::Failed(format!("unreachable: {e}")))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(FetchError::NotFound),
            status => return Err(FetchError::Failed(format!("HTTP {status}"))),
        }
        if crate::intake::is_encoded(response.headers()) {
            return Err(FetchError::Failed("a compressed body".to_owned()));
        }
        Limited::new(response.into_body(), MAX_METADATA_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| {
                FetchError::Failed(format!(
                    "the body is unreadable or over {MAX_METADATA_BYTES} bytes: {e}"
                ))
            })
    };
    tokio::time::timeout(FETCH_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(FetchError::Failed(format!(
                "no answer within {FETCH_TIMEOUT:?}"
            )))
        })
}

/// Answers `GET /.well-known/oauth-protected-resource/<server><rest>`: the
/// tool server's metadata with `resource` the URL the agent uses; a refusal
/// (audited) when the server is unknown or its document cannot be had.
pub async fn serve_metadata<B>(
    gateway: &Gateway,
    active: &ActivePolicy,
    req: &Request<B>,
    server: &str,
    rest: &str,
) -> http::Response<ResponseBody> {
    match metadata_document(gateway, active, req, server, rest).await {
        Ok(document) => json_response(StatusCode::OK, &document),
        Err(refusal) => {
            gateway.audit_refusal(server, &refusal);
            gateway.refuse(&refusal)
        }
    }
}

async fn metadata_document<B>(
    gateway: &Gateway,
    active: &ActivePolicy,
    req: &Request<B>,
    server: &str,
    rest: &str,
) -> Result<Value, Refusal> {
    let upstream = active
        .upstreams
        .get(server)
        .ok_or_else(|| UnknownServer(server.to_owned()))?;
    check_path_suffix(rest)?;
    let route = format!("/{server}{rest}");
    let failed = |url: &str, why: String| {
        UpstreamResponseRefused(format!(
            "the protected resource metadata of tool server {server:?} could not be read from {url}: {why}"
        ))
    };
    let urls = match gateway.metadata_locations.get(&route, &upstream.base_url) {
        Some(url) => vec![url],
        None => upstream_well_known(&format!("{}{rest}", upstream.base_url))
            .ok_or_else(|| failed(&upstream.base_url, "no well-known URL".to_owned()))?,
    };
    let mut last = None;
    for url in &urls {
        match fetch(&gateway.client, url).await {
            Ok(body) => {
                let authority = agent_authority(
                    req.headers().get(header::HOST),
                    req.uri(),
                    gateway.settings.listen,
                );
                let resource = sidecar_resource_url(&authority, &route);
                return rewrite_metadata(&body, &resource).map_err(|why| failed(url, why).into());
            }
            Err(FetchError::NotFound) => last = Some(failed(url, "HTTP 404 Not Found".to_owned())),
            Err(FetchError::Failed(why)) => return Err(failed(url, why).into()),
        }
    }
    Err(last
        .unwrap_or_else(|| failed(&upstream.base_url, "no URL to try".to_owned()))
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM_DOC: &str = "http://tool:8080/.well-known/oauth-protected-resource/mcp";
    const SIDECAR_DOC: &str = "http://127.0.0.1:15001/.well-known/oauth-protected-resource/billing";

    fn rewrite(value: &'static str) -> ChallengeRewrite {
        rewrite_challenge(&HeaderValue::from_static(value), Some(SIDECAR_DOC), false)
    }

    #[test]
    fn finds_the_server_and_rest_of_a_metadata_path() {
        assert_eq!(
            metadata_route("/.well-known/oauth-protected-resource/billing"),
            Some(("billing", ""))
        );
        assert_eq!(
            metadata_route("/.well-known/oauth-protected-resource/billing/v1/mcp"),
            Some(("billing", "/v1/mcp"))
        );
        for other in [
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-protected-resource/",
            "/.well-known/oauth-protected-resourcex/billing",
            "/billing",
            "/.well-known/openid-configuration",
        ] {
            assert_eq!(metadata_route(other), None, "{other}");
        }
    }

    #[test]
    fn names_the_sidecar_by_the_host_the_agent_used() {
        let uri: Uri = "/billing".parse().unwrap();
        let listen: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let host = HeaderValue::from_static("localhost:15001");
        assert_eq!(
            agent_authority(Some(&host), &uri, listen),
            "localhost:15001"
        );
        assert_eq!(agent_authority(None, &uri, listen), "127.0.0.1:15001");
        for bad in ["evil@localhost", "a/b", "", "a\"b", "a\\b", "a,b"] {
            let host = HeaderValue::from_static(bad);
            assert_eq!(
                agent_authority(Some(&host), &uri, listen),
                "127.0.0.1:15001"
            );
        }
        let absolute: Uri = "http://[::1]:15001/billing".parse().unwrap();
        assert_eq!(agent_authority(None, &absolute, listen), "[::1]:15001");
    }

    #[test]
    fn maps_routes_onto_well_known_urls() {
        assert_eq!(
            sidecar_metadata_url("127.0.0.1:15001", "/billing/v1").as_deref(),
            Some("http://127.0.0.1:15001/.well-known/oauth-protected-resource/billing/v1")
        );
        assert_eq!(sidecar_metadata_url("h", "/billing/\"x"), None);
        assert_eq!(sidecar_metadata_url("h", "/billing/a\\b"), None);
        assert_eq!(
            sidecar_resource_url("127.0.0.1:15001", "/billing"),
            "http://127.0.0.1:15001/billing"
        );
        assert_eq!(
            upstream_well_known("https://tool.example/public/mcp").unwrap(),
            [
                "https://tool.example/.well-known/oauth-protected-resource/public/mcp",
                "https://tool.example/.well-known/oauth-protected-resource",
            ]
        );
        assert_eq!(
            upstream_well_known("http://tool:8080").unwrap(),
            ["http://tool:8080/.well-known/oauth-protected-resource"]
        );
        assert_eq!(
            upstream_well_known("http://tool:8080/").unwrap(),
            ["http://tool:8080/.well-known/oauth-protected-resource"]
        );
        assert_eq!(
            upstream_well_known("http://tool/mcp/").unwrap()[0],
            "http://tool/.well-known/oauth-protected-resource/mcp/"
        );
        assert_eq!(
            upstream_well_known("http://tool/mcp?tenant=a").unwrap()[0],
            "http://tool/.well-known/oauth-protected-resource/mcp?tenant=a"
        );
        assert_eq!(upstream_well_known("ftp://tool/mcp"), None);
    }

    #[test]
    fn rewrites_resource_metadata_and_keeps_every_other_byte() {
        let rewritten = rewrite(
            "Bearer error=\"invalid_token\", error_description=\"Authentication required\", resource_metadata=\"http://tool:8080/.well-known/oauth-protected-resource/mcp\", scope=\"files:read  files:write\"",
        );
        assert_eq!(
            rewritten,
            ChallengeRewrite::Rewritten {
                value: format!(
                    "Bearer error=\"invalid_token\", error_description=\"Authentication required\", resource_metadata=\"{SIDECAR_DOC}\", scope=\"files:read  files:write\""
                ),
                upstream: UPSTREAM_DOC.to_owned(),
            }
        );
    }

    #[test]
    fn rewrites_every_challenge_naming_the_same_document() {
        let rewritten = rewrite(
            "DPoP algs=\"ES256\" , Bearer realm=x,RESOURCE_METADATA = \"http://tool:8080/.well-known/oauth-protected-resource/mcp\", Basic abc==",
        );
        let ChallengeRewrite::Rewritten { value, upstream } = rewritten else {
            panic!("{rewritten:?}");
        };
        assert_eq!(upstream, UPSTREAM_DOC);
        assert_eq!(
            value,
            format!(
                "DPoP algs=\"ES256\" , Bearer realm=x,RESOURCE_METADATA = \"{SIDECAR_DOC}\", Basic abc=="
            )
        );
        let two = rewrite(
            "Bearer resource_metadata=\"http://tool:8080/.well-known/oauth-protected-resource/mcp\", DPoP resource_metadata=\"http://tool:8080/.well-known/oauth-protected-resource/mcp\"",
        );
        assert!(
            matches!(two, ChallengeRewrite::Rewritten { ref value, .. }
            if value.matches(SIDECAR_DOC).count() == 2),
            "{two:?}"
        );
    }

    #[test]
    fn unescapes_a_quoted_url() {
        let rewritten = rewrite(
            "Bearer resource_metadata=\"http://tool:8080/.well-known/oauth\\-protected-resource/mcp\"",
        );
        assert!(
            matches!(rewritten, ChallengeRewrite::Rewritten { ref upstream, .. } if upstream == UPSTREAM_DOC),
            "{rewritten:?}"
        );
    }

    #[test]
    fn passes_headers_without_resource_metadata_as_they_came() {
        for value in [
            "Bearer error=\"invalid_token\"",
            "Negotiate YIIBxw==",
            "Bearer realm=\"a\" broken \"",
            "Basic",
        ] {
            assert_eq!(rewrite(value), ChallengeRewrite::Unchanged, "{value}");
        }
    }

    #[test]
    fn drops_resource_metadata_it_cannot_map_safely() {
        for value in [
            // Unclosed quote, unquoted URL, token after the scheme.
            "Bearer resource_metadata=\"http://tool:8080/x",
            "Bearer resource_metadata=http://tool:8080/x",
            "Bearer foo resource_metadata=\"http://tool/x\"",
            "Bearer realm=\"a\" resource_metadata=\"http://tool/x\"",
            // Repeated, or named differently by two challenges.
            "Bearer resource_metadata=\"http://tool/a\", resource_metadata=\"http://tool/a\"",
            "Bearer resource_metadata=\"http://tool/a\", DPoP resource_metadata=\"http://tool/b\"",
            // Hidden inside another parameter, where a sloppy reader finds it.
            "Bearer error_description=\"resource_metadata=http://evil/\", resource_metadata=\"http://tool/a\"",
            "Bearer error_description=\"see resource_metadata=\\\"http://evil/\\\"\"",
            // Not a usable URL.
            "Bearer resource_metadata=\"/relative\"",
            "Bearer resource_metadata=\"http://user@tool/a\"",
            "Bearer resource_metadata=\"file:///etc/passwd\"",
            // A parameter with no scheme before it.
            "resource_metadata=\"http://tool/a\"",
        ] {
            assert!(
                matches!(rewrite(value), ChallengeRewrite::Dropped(_)),
                "{value}: {:?}",
                rewrite(value)
            );
        }
        let downgrade = rewrite_challenge(
            &HeaderValue::from_static("Bearer resource_metadata=\"http://tool/a\""),
            Some(SIDECAR_DOC),
            true,
        );
        assert!(matches!(downgrade, ChallengeRewrite::Dropped(_)));
        let unnameable = rewrite_challenge(
            &HeaderValue::from_static("Bearer resource_metadata=\"http://tool/a\""),
            None,
            false,
        );
        assert!(matches!(unnameable, ChallengeRewrite::Dropped(_)));
        let opaque =
            HeaderValue::from_bytes(b"Bearer resource_metadata=\"http://t/\xff\"").unwrap();
        assert!(matches!(
            rewrite_challenge(&opaque, Some(SIDECAR_DOC), false),
            ChallengeRewrite::Dropped(_)
        ));
    }

    #[test]
    fn rewrites_each_header_line_and_drops_lines_that_disagree() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"x\""),
        );
        headers.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer resource_metadata=\"http://tool:8080/.well-known/oauth-protected-resource/mcp\""),
        );
        let (named, dropped) = rewrite_challenges(&mut headers, Some(SIDECAR_DOC), false);
        assert_eq!(named.as_deref(), Some(UPSTREAM_DOC));
        assert!(dropped.is_empty());
        let values: Vec<_> = headers.get_all(header::WWW_AUTHENTICATE).iter().collect();
        assert_eq!(values.len(), 2);
        assert_eq!(values[0], "Basic realm=\"x\"");
        assert_eq!(
            values[1].to_str().unwrap(),
            format!("Bearer resource_metadata=\"{SIDECAR_DOC}\"")
        );

        headers.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("DPoP resource_metadata=\"http://other/doc\""),
        );
        let (named, dropped) = rewrite_challenges(&mut headers, Some(SIDECAR_DOC), false);
        assert_eq!(named, None);
        assert_eq!(dropped.len(), 2);
        let values: Vec<_> = headers.get_all(header::WWW_AUTHENTICATE).iter().collect();
        assert_eq!(values, ["Basic realm=\"x\""]);
    }

    #[test]
    fn sets_resource_and_keeps_every_other_member() {
        let doc = br#"{"resource":"http://tool:8080/mcp","authorization_servers":["https://as.example"],"scopes_supported":["a","b"],"bearer_methods_supported":["header"],"x":{"y":1}}"#;
        let out = rewrite_metadata(doc, "http://127.0.0.1:15001/billing").unwrap();
        assert_eq!(
            out,
            serde_json::json!({
                "resource": "http://127.0.0.1:15001/billing",
                "authorization_servers": ["https://as.example"],
                "scopes_supported": ["a", "b"],
                "bearer_methods_supported": ["header"],
                "x": {"y": 1},
            })
        );
    }

    #[test]
    fn refuses_documents_without_a_resource_string() {
        for doc in [
            &br#"["resource"]"#[..],
            br#"{"authorization_servers":[]}"#,
            br#"{"resource":7}"#,
            br#"{"resource":"a","resource":"b"}"#,
            br#"{"resource":"a","Resource":"b"}"#,
            b"not json",
        ] {
            assert!(
                rewrite_metadata(doc, "http://s/x").is_err(),
                "{}",
                String::from_utf8_lossy(doc)
            );
        }
        let big = format!(
            r#"{{"resource":"a","pad":"{}"}}"#,
            "x".repeat(MAX_METADATA_BYTES)
        );
        assert!(rewrite_metadata(big.as_bytes(), "http://s/x").is_err());
    }

    #[test]
    fn remembers_locations_per_route_and_tool_server_url() {
        let locations = MetadataLocations::default();
        locations.remember("/billing", "http://tool/mcp", UPSTREAM_DOC.to_owned());
        assert_eq!(
            locations.get("/billing", "http://tool/mcp").as_deref(),
            Some(UPSTREAM_DOC)
        );
        assert_eq!(locations.get("/billing", "http://moved/mcp"), None);
        assert_eq!(locations.get("/billing/v2", "http://tool/mcp"), None);
        for n in 0..MAX_REMEMBERED {
            locations.remember(&format!("/s/{n}"), "http://tool/mcp", "u".to_owned());
        }
        assert_eq!(locations.get("/billing", "http://tool/mcp"), None);
        assert!(locations.get("/s/0", "http://tool/mcp").is_some());
    }

    /// The agent's token reaches the tool server: `Authorization` is not one
    /// of the headers the proxy drops.
    #[test]
    fn forwards_the_agents_authorization_unchanged() {
        let mut src = HeaderMap::new();
        src.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.def-ghi"),
        );
        let authority: http::uri::Authority = "tool:8080".parse().unwrap();
        let out = crate::intake::forward_headers(&src, &authority, true);
        assert_eq!(
            out.get_all(header::AUTHORIZATION)
                .iter()
                .collect::<Vec<_>>(),
            ["Bearer abc.def-ghi"]
        );
    }
}
