//! MCP on loopback for the end-to-end tests: rmcp servers (the demo's tool
//! servers and worker app) on free ports, rmcp clients and their calls, the
//! claims of the assertions tool servers record, and the audit trail's
//! verification by the library and by `chaperonectl`.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chaperone_audit::{SidecarKeys, VerifyOptions, VerifySummary, verify_log_signed};
use chaperone_demo::{SeenAssertions, serve_handler};
use rmcp::{
    RoleClient, ServiceExt,
    model::{CallToolRequestParams, ClientConfig, JsonObject},
    service::RunningService,
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::Value;
use tokio::net::TcpListener;

/// An rmcp client session.
pub type McpClient = RunningService<RoleClient, ClientConfig>;

/// A listener on a free loopback port (bind first, serve later: a pod's
/// annotations or a sidecar may need the port before the server exists).
pub async fn loopback_listener() -> Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

/// Serves an MCP `handler` (streamable HTTP, path `/mcp`) on `listener`;
/// returns its port.
pub async fn serve_mcp<H>(listener: TcpListener, handler: H) -> Result<u16>
where
    H: rmcp::ServerHandler + Clone + Send + Sync + 'static,
{
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = serve_handler(listener, handler).await;
    });
    Ok(port)
}

/// An MCP session with `url`, with `authorization` as the bearer token if given.
pub async fn mcp_session(url: &str, authorization: Option<&str>) -> Result<McpClient> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    if let Some(token) = authorization {
        config = config.auth_header(token.to_owned());
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    ClientConfig::default()
        .serve(transport)
        .await
        .with_context(|| format!("opening an MCP session with {url}"))
}

/// `value` as a JSON object (empty when it is none).
pub fn object(value: Value) -> JsonObject {
    match value {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    }
}

/// Calls `tool` with `arguments`: `Ok(text)`, or `Err(text)` for an error
/// result, a JSON-RPC error (a denial) or no answer within 20 s.
pub async fn call(client: &McpClient, tool: &str, arguments: Value) -> Result<String, String> {
    let request = CallToolRequestParams::new(tool.to_owned()).with_arguments(object(arguments));
    match tokio::time::timeout(Duration::from_secs(20), client.call_tool(request)).await {
        Ok(Ok(result)) => {
            let text: Vec<String> = result
                .content
                .iter()
                .filter_map(|c| c.as_text().map(|t| t.text.clone()))
                .collect();
            if result.is_error == Some(true) {
                Err(text.join("\n"))
            } else {
                Ok(text.join("\n"))
            }
        }
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer to {tool} within 20 s")),
    }
}

/// The names `tools/list` gives on `client`'s session, sorted.
pub async fn tool_names(client: &McpClient) -> Result<Vec<String>> {
    let mut names: Vec<String> = client
        .list_all_tools()
        .await?
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    Ok(names)
}

/// The claims of a JWT, unverified.
pub fn claims_of(jwt: &str) -> Result<Value> {
    let payload = jwt.split('.').nth(1).context("not a JWT")?;
    Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?)
}

/// The newest assertion a recording tool server got.
pub fn last_assertion(seen: &SeenAssertions) -> Option<String> {
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .last()
        .cloned()
}

/// Audit verification with nothing left dangling or unproven.
pub const STRICT: VerifyOptions = VerifyOptions {
    strict: true,
    skip_other_lines: false,
};

/// The JWKS of `sidecars`' keys: what verifies their audit checkpoints.
pub fn jwks_of<'a>(sidecars: impl IntoIterator<Item = &'a chaperone_sidecar::Sidecar>) -> Value {
    let keys: Vec<Value> = sidecars
        .into_iter()
        .map(|sidecar| sidecar.key_registration().jwk.clone())
        .collect();
    serde_json::json!({ "keys": keys })
}

/// Verifies `log` strictly with `chaperone_audit` and the keys of `jwks`.
pub fn verify_strict(log: &str, jwks: &Value) -> Result<VerifySummary> {
    let keys = SidecarKeys::from_jwks(jwks.to_string().as_bytes())?;
    verify_log_signed(log, STRICT, &keys).map_err(|e| anyhow!("{e}"))
}

/// Two damaged copies of an audit log: the first allowed record of `tool`
/// turned into a denial, and that record removed.
#[derive(Debug)]
pub struct TamperedLogs {
    /// The decision edited.
    pub edited: String,
    /// The record removed.
    pub removed: String,
}

/// Damages `log` at the first allowed record of `tool` (see [`TamperedLogs`]);
/// an error when there is none.
pub fn tamper(log: &str, tool: &str) -> Result<TamperedLogs> {
    let allowed = "\"decision\":\"allow\"";
    let named = format!("\"tool\":{}", Value::from(tool));
    let lines: Vec<&str> = log.lines().collect();
    let victim = lines
        .iter()
        .position(|l| l.contains(allowed) && l.contains(&named))
        .with_context(|| format!("no allowed {tool} record in the log"))?;
    let mut edited = String::with_capacity(log.len());
    let mut removed = String::with_capacity(log.len());
    for (i, line) in lines.iter().enumerate() {
        if i == victim {
            edited.push_str(&line.replace(allowed, "\"decision\":\"deny\""));
        } else {
            edited.push_str(line);
            removed.push_str(line);
            removed.push('\n');
        }
        edited.push('\n');
    }
    Ok(TamperedLogs { edited, removed })
}

/// Checks that `log` verifies strictly with the keys of `jwks` and that
/// editing or removing the first allowed record of `tool` is caught, by
/// `chaperone_audit` and by `chaperonectl` when it is built; returns the
/// verifier's complaint about the edited copy.
pub fn assert_tampering_detected(log: &str, tool: &str, jwks: &Value) -> Result<String> {
    verify_strict(log, jwks)?;
    let TamperedLogs { edited, removed } = tamper(log, tool)?;
    let Err(complaint) = verify_strict(&edited, jwks) else {
        bail!("an edited log verified");
    };
    if verify_strict(&removed, jwks).is_ok() {
        bail!("a log missing a record verified");
    }
    match cli_verify_strict(log, jwks)? {
        Some(ok) => {
            if !ok.success {
                bail!("chaperonectl refused the log: {}", ok.output);
            }
            let bad = cli_verify_strict(&edited, jwks)?.context("chaperonectl vanished")?;
            if bad.success {
                bail!("chaperonectl verified an edited log");
            }
            eprintln!("chaperonectl audit verify --strict: {}", ok.output.trim());
        }
        None => eprintln!(
            "chaperonectl not built in this target directory (cargo build -p chaperone-cli); verified with chaperone_audit only"
        ),
    }
    Ok(complaint.to_string())
}

/// `chaperonectl` next to the test binary (`target/debug/chaperonectl`), or
/// `$CHAPERONECTL`; `None` when it is not built.
pub fn chaperonectl() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHAPERONECTL") {
        return Some(path.into());
    }
    in_target_dir("chaperonectl")
}

/// The binary `bin` in the target directory the test binary runs from
/// (`target/debug/bin` beside `target/debug/deps/`), if it is built.
fn in_target_dir(bin: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join(bin);
    path.is_file().then_some(path)
}

/// The workspace's `chaperonectl`, built (once per test binary, always: a
/// stale binary would test old code) with the cargo running the tests, or
/// `$CHAPERONECTL`.
pub fn built_chaperonectl() -> Result<PathBuf> {
    let built = built_binary("chaperone-cli", "chaperonectl")?;
    Ok(chaperonectl().unwrap_or(built))
}

/// The workspace's binary `bin` of `package`, built once per test binary
/// (always: a stale binary would test old code) with the cargo running the
/// tests; it lies in the target directory next to the test binary's folder.
pub fn built_binary(package: &str, bin: &str) -> Result<PathBuf> {
    type Built = std::collections::BTreeMap<String, std::result::Result<PathBuf, String>>;
    static BUILT: std::sync::Mutex<Built> = std::sync::Mutex::new(Built::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    built
        .entry(bin.to_owned())
        .or_insert_with(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "-q", "-p", package, "--bin", bin])
                .status()
                .map_err(|e| format!("running cargo build -p {package}: {e}"))?;
            if !status.success() {
                return Err(format!("cargo build -p {package} --bin {bin} failed"));
            }
            in_target_dir(bin).ok_or_else(|| format!("{bin} not found after building it"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// What `chaperonectl audit verify --strict` said of a log.
#[derive(Debug)]
pub struct CliVerdict {
    /// Whether it exited 0.
    pub success: bool,
    /// Its stdout and stderr.
    pub output: String,
}

/// Runs `chaperonectl audit verify --strict --jwks` on `log` and `jwks`
/// (written to temporary files); `None` when chaperonectl is not built
/// (`cargo build -p chaperone-cli`).
pub fn cli_verify_strict(log: &str, jwks: &Value) -> Result<Option<CliVerdict>> {
    let Some(cli) = chaperonectl() else {
        return Ok(None);
    };
    let dir = std::env::temp_dir().join(format!("chaperone-audit-{}", crate::unique_suffix()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("trail.log");
    std::fs::write(&file, log)?;
    let keys = dir.join("jwks.json");
    std::fs::write(&keys, jwks.to_string())?;
    let out = std::process::Command::new(&cli)
        .args(["audit", "verify", "--strict", "--jwks"])
        .arg(&keys)
        .arg(&file)
        .output()
        .with_context(|| format!("running {}", cli.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    Ok(Some(CliVerdict {
        success: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }))
}
