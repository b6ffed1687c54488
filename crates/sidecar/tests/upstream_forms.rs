//! What a tool server sees and answers, against a fake server that answers
//! every request one canned way. List results are filtered whatever form the
//! tool server answers in: JSON
//! under any Content-Type or none, SSE with escaped keys; a list response the
//! sidecar cannot read (compressed, not strict JSON, an error page) is refused
//! with 502, never passed to the agent. And what a tool server receives of a
//! batch that lost members is the kept members' bytes as the agent sent them;
//! and a session's history survives whatever the server answers.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chaperone_sidecar::{AuditOutput, Settings, Sidecar, standalone};
use common::{AuditBuffer, IDENTITY, POLICY, post_raw};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// How the fake tool server answers `tools/list`: status, headers, body.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
}

/// A tool server that answers every POST with one canned response and records
/// the headers it was sent.
struct FakeServer {
    url: String,
    seen: Arc<Mutex<Vec<http::HeaderMap>>>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

async fn fake_server(answer: Answer) -> FakeServer {
    let seen: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let recorded = Arc::clone(&seen);
    let recorded_bodies = Arc::clone(&bodies);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            let recorded = Arc::clone(&recorded);
            let recorded_bodies = Arc::clone(&recorded_bodies);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    recorded.lock().unwrap().push(req.headers().clone());
                    let answer = answer.clone();
                    let recorded_bodies = Arc::clone(&recorded_bodies);
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        recorded_bodies.lock().unwrap().push(body);
                        let mut response =
                            http::Response::new(Full::new(Bytes::from(answer.body.clone())));
                        *response.status_mut() = http::StatusCode::from_u16(answer.status).unwrap();
                        for (name, value) in &answer.headers {
                            response
                                .headers_mut()
                                .insert(*name, http::HeaderValue::from_static(value));
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    FakeServer { url, seen, bodies }
}

/// A sidecar in front of `server` with the standard policy (which allows
/// `get_order` and not `delete_all`); returns its URL for the server.
async fn sidecar_for(server: &FakeServer) -> (String, AuditBuffer, tempfile::TempDir) {
    let audit = AuditBuffer::default();
    let sidecar = Sidecar::new(
        Settings::default(),
        AuditOutput::Writer(Box::new(audit.clone())),
        false,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("identity.yaml"),
        IDENTITY.replace("UPSTREAM_URL", &server.url),
    )
    .unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    standalone::load(dir.path(), None, 1, sidecar.snapshots()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { sidecar.serve_proxy(listener, std::future::pending()).await });
    (format!("http://{addr}/shop"), audit, dir)
}

const LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
const LISTED: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"get_order","inputSchema":{"type":"object"}},{"name":"delete_all","inputSchema":{"type":"object"}}]}}"#;

fn answer(status: u16, headers: &[(&'static str, &'static str)], body: &[u8]) -> Answer {
    Answer {
        status,
        headers: headers.to_vec(),
        body: body.to_vec(),
    }
}

#[tokio::test]
async fn filters_json_lists_under_any_content_type() {
    for headers in [
        &[("content-type", "text/plain")][..],
        &[][..],
        &[("content-type", "application/octet-stream")][..],
        &[("content-type", "application/json; charset=utf-8")][..],
    ] {
        let server = fake_server(answer(200, headers, LISTED.as_bytes())).await;
        let (url, _audit, _dir) = sidecar_for(&server).await;
        let response = post_raw(&url, &[], LIST).await;
        assert_eq!(response.status, 200, "{headers:?}: {}", response.body);
        assert!(response.body.contains("get_order"), "{headers:?}");
        assert!(
            !response.body.contains("delete_all"),
            "{headers:?}: unfiltered list reached the agent: {}",
            response.body
        );
        assert_eq!(
            response.headers.get("content-type").unwrap(),
            "application/json"
        );
        // The tool server was asked not to compress.
        let seen = server.seen.lock().unwrap();
        assert_eq!(seen[0].get("accept-encoding").unwrap(), "identity");
    }
}

#[tokio::test]
async fn filters_sse_lists_that_spell_their_keys_with_escapes() {
    let event = format!(
        "event: message\ndata: {}\n\n",
        LISTED.replace("\"tools\"", "\"\\u0074ools\"")
    );
    let server = fake_server(answer(
        200,
        &[("content-type", "text/event-stream")],
        event.as_bytes(),
    ))
    .await;
    let (url, _audit, _dir) = sidecar_for(&server).await;
    let response = post_raw(&url, &[], LIST).await;
    assert_eq!(response.status, 200);
    assert!(response.body.contains("get_order"), "{}", response.body);
    assert!(
        !response.body.contains("delete_all"),
        "unfiltered list: {}",
        response.body
    );
}

#[tokio::test]
async fn refuses_list_responses_it_cannot_read() {
    let cases: Vec<(&str, Answer)> = vec![
        (
            "gzip",
            answer(
                200,
                &[("content-type", "application/json"), ("content-encoding", "gzip")],
                b"\x1f\x8b\x08\x00garbage",
            ),
        ),
        (
            "gzip sse",
            answer(
                200,
                &[("content-type", "text/event-stream"), ("content-encoding", "gzip")],
                b"\x1f\x8b\x08\x00garbage",
            ),
        ),
        (
            "error page",
            answer(500, &[("content-type", "text/html")], b"<html>oops</html>"),
        ),
        (
            "case-colliding keys",
            answer(
                200,
                &[("content-type", "application/json")],
                br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[],"Tools":[{"name":"delete_all"}]}}"#,
            ),
        ),
        (
            "list key in another case",
            answer(
                200,
                &[("content-type", "application/json")],
                br#"{"jsonrpc":"2.0","id":1,"result":{"TOOLS":[{"name":"delete_all"}]}}"#,
            ),
        ),
        (
            "result key in another case",
            answer(
                200,
                &[("content-type", "text/plain")],
                br#"{"jsonrpc":"2.0","id":1,"Result":{"tools":[{"name":"delete_all"}]}}"#,
            ),
        ),
        (
            "duplicate keys",
            answer(
                200,
                &[("content-type", "application/json")],
                br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"delete_all"}]}}"#,
            ),
        ),
    ];
    for (name, answer) in cases {
        let server = fake_server(answer).await;
        let (url, audit, _dir) = sidecar_for(&server).await;
        let response = post_raw(&url, &[], LIST).await;
        assert_eq!(response.status, 502, "{name}: {}", response.body);
        assert!(!response.body.contains("delete_all"), "{name}");
        let records = audit.records();
        assert!(
            records
                .iter()
                .any(|r| r["rule"] == "protocol/upstream_response_refused"),
            "{name}: no audit record of the refusal: {records:?}"
        );
    }
}

#[tokio::test]
async fn passes_compressed_responses_it_need_not_read() {
    // A tool call's result is not read by the sidecar: compression (which the
    // sidecar asked the server not to use) is passed through untouched.
    let body = br#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
    let server = fake_server(answer(
        200,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "br"),
        ],
        body,
    ))
    .await;
    let (url, _audit, _dir) = sidecar_for(&server).await;
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order","arguments":{"id":"1"}}}"#;
    let response = post_raw(&url, &[], call).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.headers.get("content-encoding").unwrap(), "br");
}

#[tokio::test]
async fn keeps_the_allowed_entries_of_a_plain_json_list() {
    let server = fake_server(answer(
        200,
        &[("content-type", "application/json")],
        LISTED.as_bytes(),
    ))
    .await;
    let (url, _audit, _dir) = sidecar_for(&server).await;
    let response = post_raw(&url, &[], LIST).await;
    let value = response.json();
    let names: Vec<&str> = value["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["get_order"]);
}

#[tokio::test]
async fn forwards_the_kept_members_of_a_batch_byte_for_byte() {
    let body = br#"[{"jsonrpc":"2.0","id":1,"result":{"content":[]}}]"#;
    let server = fake_server(answer(200, &[("content-type", "application/json")], body)).await;
    let (url, _audit, _dir) = sidecar_for(&server).await;
    let allowed = r#"{"jsonrpc":"2.0","id":1E2,"method":"tools/call","params":{"name":"get_order","arguments":{"id":"1","n":1.50}}}"#;
    let denied = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_all"}}"#;
    let response = post_raw(&url, &[], format!("[{allowed} , {denied}]")).await;
    assert_eq!(response.status, 200, "{}", response.body);
    let value = response.json();
    let items = value.as_array().unwrap();
    assert!(
        items
            .iter()
            .any(|i| i["error"]["data"]["rule"] == "no rule allows"),
        "{value}"
    );
    let bodies = server.bodies.lock().unwrap();
    assert_eq!(&bodies[0][..], format!("[{allowed}]").as_bytes());
}

#[tokio::test]
async fn keeps_session_history_across_an_initialize_notification() {
    // The server answers everything with success and the same session id, as
    // it would to a real `initialize`.
    let server = fake_server(answer(
        200,
        &[
            ("content-type", "application/json"),
            ("mcp-session-id", "s1"),
        ],
        br#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
    ))
    .await;
    let (url, audit, _dir) = sidecar_for(&server).await;
    let initialize = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"x","version":"1"}}}"#;
    post_raw(&url, &[], initialize).await;
    let headers = [("mcp-session-id", "s1")];
    let read = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"read_customer","arguments":{"id":"c1"}}}"#;
    post_raw(&url, &headers, read).await;
    // A notification named `initialize` once made the sidecar start the
    // session afresh when the server answered with its id.
    let batch = r#"[{"jsonrpc":"2.0","method":"initialize","params":{}},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
    post_raw(&url, &headers, batch).await;
    let mail = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"send_email","arguments":{"to":"x@example.com"}}}"#;
    let response = post_raw(&url, &headers, mail).await;
    assert!(
        response.body.contains("no-exfiltration"),
        "the session guard still sees the earlier read: {}",
        response.body
    );
    assert!(
        audit
            .records()
            .iter()
            .any(|r| r["rule"] == "protocol" && r["method"] == "initialize"),
        "the initialize notification was refused and audited"
    );
}

#[tokio::test]
async fn cuts_sse_lists_spelled_in_another_case() {
    for spelled in [r#""TOOLS""#, "\"tool\u{017f}\"", r#""Tools""#] {
        let event = format!(
            "event: message\ndata: {}\n\n",
            LISTED.replace("\"tools\"", spelled)
        );
        let server = fake_server(answer(
            200,
            &[("content-type", "text/event-stream")],
            event.as_bytes(),
        ))
        .await;
        let (url, _audit, _dir) = sidecar_for(&server).await;
        // The sidecar cuts the stream at the refused event (here the first,
        // so nothing at all arrives): read whatever did.
        let port = url
            .split(':')
            .nth(2)
            .and_then(|p| p.split('/').next())
            .unwrap();
        let received = common_http_post(port.parse().unwrap(), "/shop", LIST).await;
        assert_eq!(
            server.seen.lock().unwrap().len(),
            1,
            "the list was asked for"
        );
        assert!(
            !received.contains("delete_all"),
            "{spelled}: a list a case-folding client reads reached it unfiltered: {received}"
        );
    }
}

/// A raw HTTP/1.0 POST; whatever arrived before the connection ended.
async fn common_http_post(port: u16, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.0\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut received),
    )
    .await;
    String::from_utf8_lossy(&received).into_owned()
}
