//! Real sidecars (the `chaperone-sidecar` library, in this process) for tests on
//! the local control plane: the MCP proxy, the admin endpoints and, when the
//! settings name an inbound upstream, the inbound side, each on a free loopback
//! port; in controller mode the snapshot stream with a quick reconnect. Audit
//! records go to an in-memory "stdout" ([`AuditBuffer`]). Plus the small HTTP and
//! polling helpers the sidecar tests share.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaperone_sidecar::{
    AuditOutput, Settings, Sidecar, SnapshotStream,
    backoff::Backoff,
    settings::{CaSource, ControllerSettings},
};

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("condition not reached within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw HTTP/1.0 request on loopback (blocking; for status codes and small
/// bodies). Returns the whole response, status line first; empty when nothing
/// listens.
pub fn http_request(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(request.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// [`http_request`] off the async runtime's worker threads.
pub async fn http_request_async(port: u16, request: String) -> String {
    tokio::task::spawn_blocking(move || http_request(port, &request))
        .await
        .unwrap_or_default()
}

/// A `GET` of `path` (blocking).
pub fn http_get(port: u16, path: &str) -> String {
    http_request(port, &format!("GET {path} HTTP/1.0\r\n\r\n"))
}

/// A `GET` of `path` off the async runtime's worker threads.
pub async fn http_get_async(port: u16, path: &str) -> String {
    http_request_async(port, format!("GET {path} HTTP/1.0\r\n\r\n")).await
}

/// A JSON `POST` of `body` to `path` with extra `headers` (`name: value`
/// lines), as an MCP client would send it.
pub fn json_post(path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut request = format!(
        "POST {path} HTTP/1.0\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    request
}

/// The status code of a raw response (0 when there is none).
pub fn status_code(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// What a sidecar wrote to its audit log, in memory.
pub use chaperone_sidecar::audit::AuditBuffer;

/// Controller-mode settings: dial the snapshot server at `address` (TLS name
/// `localhost`, CA in `ca_file`) with the pod token in `token_file`.
pub fn controller_settings(
    address: String,
    token_file: &Path,
    ca_file: PathBuf,
) -> ControllerSettings {
    ControllerSettings {
        address,
        server_name: "localhost".into(),
        token_file: token_file.to_owned(),
        ca: CaSource::File(ca_file),
    }
}

/// Writes `token` to `dir/token`, replacing it atomically as the kubelet does
/// on rotation; returns the file's path.
pub fn write_token(dir: &Path, token: &str) -> Result<PathBuf> {
    let path = dir.join("token");
    let tmp = dir.join("token.tmp");
    std::fs::write(&tmp, token)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// A sidecar running in this process.
pub struct TestSidecar {
    /// The library handle (seams: snapshots, peer keys, key registration).
    pub sidecar: Sidecar,
    /// The MCP proxy (what the agent calls as `127.0.0.1:15001`).
    pub proxy_port: u16,
    /// `/ready`, `/metrics`.
    pub admin_port: u16,
    /// The inbound side (`:15006`), when the settings name an inbound upstream.
    pub inbound_port: Option<u16>,
    /// What it wrote to its audit log.
    pub audit: AuditBuffer,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for TestSidecar {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl TestSidecar {
    /// Waits (up to 10 s) until this sidecar holds `of`'s signing key, as the
    /// controller's key set delivers it.
    pub async fn wait_for_key_of(&self, of: &TestSidecar) -> Result<()> {
        let keys = std::sync::Arc::clone(self.sidecar.peer_keys());
        let kid = of.sidecar.key_registration().kid.clone();
        eventually(Duration::from_secs(10), async || {
            Ok(keys.current().get(&kid).map(|_| ()))
        })
        .await
        .with_context(|| {
            format!(
                "{} never got the key of {}",
                self.sidecar.pod_name(),
                of.sidecar.pod_name()
            )
        })
    }

    /// Starts a sidecar with `settings` on free loopback ports. With
    /// `settings.controller` it runs the snapshot stream (reconnecting after
    /// 50 ms doubling up to 500 ms) and ships its audit records; with
    /// `settings.inbound_upstream` it serves the inbound side too.
    pub async fn start(settings: Settings) -> Result<Self> {
        let audit = AuditBuffer::default();
        let sidecar = Sidecar::new(
            settings.clone(),
            AuditOutput::Writer(Box::new(audit.clone())),
            settings.controller.is_some(),
        )?;
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (proxy_port, admin_port) = (proxy.local_addr()?.port(), admin.local_addr()?.port());
        let mut tasks = Vec::new();
        let s = sidecar.clone();
        tasks.push(tokio::spawn(async move {
            s.serve_proxy(proxy, std::future::pending()).await
        }));
        let s = sidecar.clone();
        tasks.push(tokio::spawn(async move {
            s.serve_admin(admin, std::future::pending()).await
        }));
        let mut inbound_port = None;
        if settings.inbound_upstream.is_some() {
            let inbound = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            inbound_port = Some(inbound.local_addr()?.port());
            let s = sidecar.clone();
            tasks.push(tokio::spawn(async move {
                s.serve_inbound(inbound, std::future::pending()).await
            }));
        }
        let s = sidecar.clone();
        tasks.push(tokio::spawn(async move {
            s.maintain(Duration::from_secs(1)).await
        }));
        if let Some(controller) = settings.controller.clone() {
            tasks.push(tokio::spawn(
                SnapshotStream::new(sidecar.clone(), controller)
                    .with_backoff(Backoff::new(
                        Duration::from_millis(50),
                        Duration::from_millis(500),
                    ))
                    .run(),
            ));
        }
        Ok(Self {
            sidecar,
            proxy_port,
            admin_port,
            inbound_port,
            audit,
            tasks,
        })
    }

    /// The inbound side's port; fails for a sidecar without one.
    pub fn inbound(&self) -> Result<u16> {
        self.inbound_port
            .context("this sidecar has no inbound side")
    }

    /// The HTTP status of `GET /readyz`.
    pub async fn ready_status(&self) -> u16 {
        status_code(
            &http_get_async(self.admin_port, chaperone_wire::sidecar_env::READYZ_PATH).await,
        )
    }

    /// The HTTP status of `GET /livez`.
    pub async fn live_status(&self) -> u16 {
        status_code(&http_get_async(self.admin_port, chaperone_wire::sidecar_env::LIVEZ_PATH).await)
    }

    /// Waits until the sidecar holds a snapshot newer than `newer_than`; returns
    /// its version.
    pub async fn wait_for_version(&self, newer_than: u64, timeout: Duration) -> Result<u64> {
        let source = Arc::clone(self.sidecar.snapshots());
        eventually(timeout, async || {
            Ok(source
                .current()
                .map(|c| c.version())
                .filter(|v| *v > newer_than))
        })
        .await
    }
}
