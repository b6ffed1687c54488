//! An OAuth-protected MCP tool server (the official Python SDK as an OAuth
//! resource server, `tests/servers/python/auth_server.py`, installed by
//! `make tools`) behind a real sidecar: the agent's bearer token reaches it,
//! its 401 challenge comes back pointing at the sidecar, and the sidecar
//! serves the server's protected resource metadata (RFC 9728) for the URL
//! the agent uses.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail, ensure};
use chaperone_sidecar::{Settings, standalone};

use chaperone_testenv::mcp_fixtures::{call, mcp_session, tool_names};
use chaperone_testenv::mcp_servers::{
    Answer, ListeningProcess, http, install_dir, jsonrpc_answer, start_on_free_port,
};
use chaperone_testenv::sidecar_fixtures::TestSidecar;
use serde_json::{Value, json};

/// The one token the server accepts.
const TOKEN: &str = "chaperone-test-token-7f3a";
/// The authorization server the server advertises (never contacted).
const ISSUER: &str = "https://auth.example.test";

const IDENTITY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata:
  name: oauth-agent
  namespace: apps
spec:
  selector:
    serviceAccountName: oauth-agent
  toolServers:
    - name: secure
      url: UPSTREAM_URL
"#;

/// `echo` is allowed; `delete_user` is not.
const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata:
  name: oauth
  namespace: apps
spec:
  targetRefs:
    - name: oauth-agent
  rules:
    - name: echo
      action: allow
      tools:
        - name: echo
"#;

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"oauth-test","version":"0"}}}"#;
const TOOLS_LIST: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;

/// The Python OAuth server on a free loopback port; killed on drop.
struct AuthServer {
    process: ListeningProcess,
    /// Its output; removed on drop, after the process is stopped.
    _dir: tempfile::TempDir,
}

impl AuthServer {
    /// Starts it (blocking) and waits for its `ready <port>` line.
    fn spawn() -> Result<Self> {
        let python = install_dir()?.join("python");
        let program: PathBuf = python.join("venv/bin/python");
        let script = python.join("auth_server.py");
        ensure!(
            script.is_file(),
            "{} is missing: run `make tools`",
            script.display()
        );
        let dir = tempfile::tempdir()?;
        let process =
            start_on_free_port("the OAuth server", &dir.path().join("server.log"), || {
                let mut command = Command::new(&program);
                command
                    .arg(&script)
                    .env("MCP_BEARER_TOKEN", TOKEN)
                    .env("MCP_ISSUER_URL", ISSUER);
                command
            })?;
        Ok(Self { process, _dir: dir })
    }

    fn port(&self) -> u16 {
        self.process.port()
    }

    fn mcp_url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port())
    }
}

/// The server, and a standalone sidecar whose tool server `secure` is it.
async fn setup() -> Result<(AuthServer, TestSidecar)> {
    let server = tokio::task::spawn_blocking(AuthServer::spawn).await??;
    let sidecar = TestSidecar::start(Settings::default()).await?;
    let dir = tempfile::tempdir()?;
    fs::write(
        dir.path().join("identity.yaml"),
        IDENTITY.replace("UPSTREAM_URL", &server.mcp_url()),
    )?;
    fs::write(dir.path().join("policy.yaml"), POLICY)?;
    standalone::load(dir.path(), None, 1, sidecar.sidecar.snapshots())?;
    Ok((server, sidecar))
}

/// A JSON-RPC POST to `path` on `port` with extra header lines, off the
/// runtime's worker threads.
async fn post(port: u16, path: &str, headers: &[&str], body: &'static str) -> Result<Answer> {
    let mut head = format!(
        "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream"
    );
    for line in headers {
        head.push_str("\r\n");
        head.push_str(line);
    }
    tokio::task::spawn_blocking(move || http(port, &head, body.as_bytes())).await?
}

/// A GET of `path` on `port`.
async fn get(port: u16, path: &str) -> Result<Answer> {
    let head = format!("GET {path} HTTP/1.0\r\nAccept: application/json");
    tokio::task::spawn_blocking(move || http(port, &head, b"")).await?
}

/// The one `WWW-Authenticate` of an answer.
fn challenge(answer: &Answer) -> Result<&str> {
    let values: Vec<&str> = answer
        .1
        .iter()
        .filter(|(k, _)| k == "www-authenticate")
        .map(|(_, v)| v.as_str())
        .collect();
    match values[..] {
        [one] => Ok(one),
        _ => bail!("expected one WWW-Authenticate, got {values:?} ({answer:?})"),
    }
}

/// The quoted `resource_metadata` URL in a challenge.
fn resource_metadata(challenge: &str) -> Result<&str> {
    let (_, rest) = challenge
        .split_once("resource_metadata=\"")
        .with_context(|| format!("no resource_metadata in {challenge:?}"))?;
    rest.split('"')
        .next()
        .with_context(|| format!("unterminated resource_metadata in {challenge:?}"))
}

/// The path of an `http://127.0.0.1:<port>` URL on `port`.
fn path_on(url: &str, port: u16) -> Result<&str> {
    url.strip_prefix(&format!("http://127.0.0.1:{port}"))
        .with_context(|| format!("{url} is not on port {port}"))
}

fn json_body(answer: &Answer) -> Result<Value> {
    serde_json::from_str(&answer.2).with_context(|| format!("not JSON: {answer:?}"))
}

#[tokio::test]
async fn unauthenticated_requests_are_challenged_with_the_sidecars_metadata_url() -> Result<()> {
    let (server, sidecar) = setup().await?;
    let proxy = sidecar.proxy_port;
    let direct = post(server.port(), "/mcp", &[], INITIALIZE).await?;
    ensure!(direct.0 == 401, "the server itself: {direct:?}");
    let upstream_challenge = challenge(&direct)?;
    let upstream_url = resource_metadata(upstream_challenge)?;
    let sidecar_url =
        format!("http://127.0.0.1:{proxy}/.well-known/oauth-protected-resource/secure");

    for body in [INITIALIZE, TOOLS_LIST] {
        let answer = post(proxy, "/secure", &[], body).await?;
        ensure!(answer.0 == 401, "{body}: {answer:?}");
        // Only the URL differs, every other byte is the server's.
        assert_eq!(
            challenge(&answer)?,
            upstream_challenge.replace(upstream_url, &sidecar_url),
            "{body}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn metadata_names_the_sidecar_route_and_the_servers_authorization_servers() -> Result<()> {
    let (server, sidecar) = setup().await?;
    let proxy = sidecar.proxy_port;
    let upstream =
        json_body(&get(server.port(), "/.well-known/oauth-protected-resource/mcp").await?)?;
    assert_eq!(upstream["resource"], server.mcp_url());
    assert_eq!(upstream["authorization_servers"], json!([ISSUER]));

    // Before any challenge: the RFC 9728 well-known URL of the tool server's
    // endpoint. After one: the URL the challenge named. The same document.
    let path = "/.well-known/oauth-protected-resource/secure";
    let derived = get(proxy, path).await?;
    ensure!(derived.0 == 200, "{derived:?}");
    let challenged = post(proxy, "/secure", &[], INITIALIZE).await?;
    let url = resource_metadata(challenge(&challenged)?)?.to_owned();
    let named = get(proxy, path_on(&url, proxy)?).await?;
    ensure!(named.0 == 200, "{named:?}");
    for answer in [&derived, &named] {
        let mut document = json_body(answer)?;
        assert_eq!(
            document["resource"],
            format!("http://127.0.0.1:{proxy}/secure")
        );
        // Every other member is the server's.
        document["resource"] = upstream["resource"].clone();
        assert_eq!(document, upstream);
    }

    // A path the server has no document for: the root form.
    let root = get(proxy, &format!("{path}/v2")).await?;
    ensure!(root.0 == 200, "{root:?}");
    let root = json_body(&root)?;
    assert_eq!(
        root["resource"],
        format!("http://127.0.0.1:{proxy}/secure/v2")
    );
    assert_eq!(root["authorization_servers"], json!([ISSUER]));
    assert_eq!(
        root["resource_name"],
        "chaperone test server (root document)"
    );

    // An unknown server is refused as any request for it is.
    let unknown = get(proxy, "/.well-known/oauth-protected-resource/other").await?;
    assert_eq!(unknown.0, 404, "{unknown:?}");
    Ok(())
}

#[tokio::test]
async fn the_bearer_token_carries_a_full_mcp_session() -> Result<()> {
    let (_server, sidecar) = setup().await?;
    let url = format!("http://127.0.0.1:{}/secure", sidecar.proxy_port);
    let client = mcp_session(&url, Some(TOKEN)).await?;
    // tools/list is filtered by the policy; the server answered it, so it
    // saw the token.
    assert_eq!(tool_names(&client).await?, ["echo"]);
    // The server names the client id of the token the call carried.
    let text = call(&client, "echo", json!({"text": "hi"}))
        .await
        .map_err(|e| anyhow!("echo: {e}"))?;
    assert_eq!(text, "hi (client chaperone-test-client)");
    let denied = call(&client, "delete_user", json!({"id": "u1"})).await;
    ensure!(denied.is_err(), "delete_user: {denied:?}");
    let _ = client.cancel().await;
    Ok(())
}

#[tokio::test]
async fn a_wrong_token_is_challenged_again() -> Result<()> {
    let (_server, sidecar) = setup().await?;
    let proxy = sidecar.proxy_port;
    let good = format!("Authorization: Bearer {TOKEN}");
    let answer = post(proxy, "/secure", &[&good], INITIALIZE).await?;
    ensure!(answer.0 == 200, "the right token: {answer:?}");
    let init = jsonrpc_answer(&answer.2)?;
    assert_eq!(
        init["result"]["serverInfo"]["name"],
        "chaperone-test-python-oauth"
    );

    let answer = post(
        proxy,
        "/secure",
        &["Authorization: Bearer not-the-token"],
        INITIALIZE,
    )
    .await?;
    ensure!(answer.0 == 401, "a wrong token: {answer:?}");
    assert_eq!(
        resource_metadata(challenge(&answer)?)?,
        format!("http://127.0.0.1:{proxy}/.well-known/oauth-protected-resource/secure")
    );
    Ok(())
}
