//! Every setting of the sidecar, read from environment variables in one place.
//! The injection webhook sets them; defaults suit the injected pod.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use chaperone_wire::sidecar_env::*;

/// Default of [`ENV_TOKEN_FILE`]: where the injected token volume is mounted.
pub const DEFAULT_TOKEN_FILE: &str = TOKEN_FILE;
/// Default of [`ENV_APPROVAL_HOLD_SECONDS`]: below the 30 to 60 s after which
/// common MCP clients give up on a call.
pub const DEFAULT_APPROVAL_HOLD: Duration = Duration::from_secs(20);
/// [`DEFAULT_SHUTDOWN_GRACE_MS`] as a duration.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_millis(DEFAULT_SHUTDOWN_GRACE_MS);
/// Default of [`ENV_CA_FILE`].
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/chaperone/ca.crt";

/// The sidecar's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// MCP proxy address; default `127.0.0.1:15001`.
    pub listen: SocketAddr,
    /// Admin address; default `0.0.0.0:15090` (the kubelet probes it).
    pub admin_listen: SocketAddr,
    /// Largest request body; default 1 MiB.
    pub max_body_bytes: usize,
    /// Largest buffered response or SSE event; default 16 MiB.
    pub max_response_bytes: usize,
    /// Most sessions; default 100,000.
    pub max_sessions: usize,
    /// Audit shipping queue capacity; default 4,096.
    pub audit_queue: usize,
    /// A signed audit checkpoint after at most this many decisions; default 100.
    pub audit_checkpoint_every: u64,
    /// A signed audit checkpoint this often when decisions were written since
    /// the last one; default 5 s.
    pub audit_checkpoint_interval: Duration,
    /// Pod name; default empty.
    pub pod_name: String,
    /// Pod namespace; default empty.
    pub pod_namespace: String,
    /// Connect timeout to tool servers; default 5 s.
    pub connect_timeout: Duration,
    /// The controller's snapshot stream; `None` (no [`ENV_CONTROLLER_ADDRESS`])
    /// means standalone mode.
    pub controller: Option<ControllerSettings>,
    /// In front of an agent or of a tool server.
    pub mode: SidecarMode,
    /// Inbound listener address; default `0.0.0.0:15006`.
    pub inbound_listen: SocketAddr,
    /// The pod's own MCP endpoint behind the inbound side; `None`: no inbound
    /// side (agent mode only; tool mode requires it).
    pub inbound_upstream: Option<http::Uri>,
    /// Extra audiences the inbound side accepts.
    pub inbound_audiences: Vec<String>,
    /// Extra CA bundle for HTTPS upstreams.
    pub upstream_ca_file: Option<PathBuf>,
    /// Where tool servers' `upstreamSecret`s are mounted, one folder per
    /// server; default `/var/run/secrets/chaperone/upstreams`.
    pub upstream_secrets_dir: PathBuf,
    /// Time a request's head may take on the proxy and inbound listeners;
    /// default 10 s.
    pub header_read_timeout: Duration,
    /// Time a proxy or inbound connection may stay open with no request in
    /// flight; default 60 s.
    pub connection_idle_timeout: Duration,
    /// Connections the proxy holds at once; default 1,024.
    pub max_connections: usize,
    /// Connections the inbound side holds at once; default 512.
    pub inbound_max_connections: usize,
    /// Unexpired assertion ids remembered per issuing agent; default 10,000.
    pub replay_cache_per_issuer: usize,
    /// Inbound-opened sessions held per calling agent or initiating user;
    /// default 10,000 ([`Settings::max_sessions`] bounds them all together).
    pub max_delegated_sessions_per_caller: usize,
    /// Longest validity of an initiator token; default 1 h.
    pub initiator_max_token_lifetime: Duration,
    /// Longest a call needing a person's approval is held before it is
    /// refused as pending (to be retried); default 20 s.
    pub approval_hold: Duration,
    /// Longest calls in flight may take to finish after shutdown begins;
    /// default 10 s.
    pub shutdown_grace: Duration,
    /// Runtime worker threads; default 1 (a single-threaded runtime).
    pub worker_threads: NonZeroUsize,
    /// Signing nonces kept made ahead ([`crate::signing_nonces`]); default
    /// [`crate::signing_nonces::DEFAULT_CAPACITY`], 0 for none.
    pub signing_nonces: usize,
}

/// Where the sidecar sits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SidecarMode {
    /// In front of an agent: outbound proxy on 15001, delegated calls inbound.
    #[default]
    Agent,
    /// In front of a tool server: inbound only, every call needs a valid
    /// assertion addressed to this tool.
    Tool,
}

/// Where the controller is and how to authenticate to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerSettings {
    /// `host:port` of the snapshot gRPC server (TLS).
    pub address: String,
    /// The TLS server name the controller's certificate must carry.
    pub server_name: String,
    /// The pod's projected ServiceAccount token file (audience `chaperone`).
    pub token_file: PathBuf,
    /// The CA that signs the controller's certificate.
    pub ca: CaSource,
}

/// Where the controller's CA comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// A PEM file, re-read on every (re)connect so a rotated CA is picked up.
    File(PathBuf),
    /// Inline PEM (from [`ENV_CA_PEM`]).
    Pem(String),
}

impl ControllerSettings {
    /// Settings for `address` with the default token and CA files and the
    /// address's host as the server name.
    pub fn new(address: impl Into<String>) -> Result<Self, InvalidSetting> {
        let address = address.into();
        let server_name = host_of(&address)
            .ok_or_else(|| InvalidSetting {
                name: ENV_CONTROLLER_ADDRESS,
                value: address.clone(),
                expected: "host:port, such as chaperone-controller.chaperone-system.svc:9090",
            })?
            .to_owned();
        Ok(Self {
            address,
            server_name,
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            ca: CaSource::File(PathBuf::from(DEFAULT_CA_FILE)),
        })
    }
}

/// The host of `host:port` (IPv6 in brackets: `[::1]:9090` → `::1`); `None`
/// without a port or host.
fn host_of(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty() && !host.contains('/')).then_some(host)
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)),
            max_body_bytes: 1 << 20,
            max_response_bytes: 16 << 20,
            max_sessions: 100_000,
            audit_queue: 4096,
            audit_checkpoint_every: crate::audit::DEFAULT_CHECKPOINT_EVERY,
            audit_checkpoint_interval: Duration::from_secs(5),
            pod_name: String::new(),
            pod_namespace: String::new(),
            connect_timeout: Duration::from_secs(5),
            controller: None,
            mode: SidecarMode::Agent,
            inbound_listen: SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT)),
            inbound_upstream: None,
            inbound_audiences: Vec::new(),
            upstream_ca_file: None,
            upstream_secrets_dir: PathBuf::from(chaperone_wire::sidecar_env::UPSTREAM_SECRETS_DIR),
            header_read_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            inbound_max_connections: 512,
            replay_cache_per_issuer: 10_000,
            max_delegated_sessions_per_caller: 10_000,
            initiator_max_token_lifetime: Duration::from_secs(3600),
            approval_hold: DEFAULT_APPROVAL_HOLD,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            worker_threads: NonZeroUsize::MIN,
            signing_nonces: crate::signing_nonces::DEFAULT_CAPACITY,
        }
    }
}

/// An environment variable holds a value that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("environment variable {name}={value:?} is invalid: {expected}")]
pub struct InvalidSetting {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What was expected.
    pub expected: &'static str,
}

impl Settings {
    /// The signing nonces the sidecar keeps made ahead: none in tool mode,
    /// which signs no assertions (its inbound side only verifies them; its
    /// audit checkpoints are signed the RFC 8032 way), else
    /// [`Settings::signing_nonces`].
    pub fn signing_nonces_kept(&self) -> usize {
        match self.mode {
            SidecarMode::Agent => self.signing_nonces,
            SidecarMode::Tool => 0,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, InvalidSetting> {
        let mut settings = Settings::default();
        if let Some(v) = lookup(ENV_LISTEN) {
            settings.listen = parse(ENV_LISTEN, v, "a socket address such as 127.0.0.1:15001")?;
        }
        if let Some(v) = lookup(ENV_ADMIN_LISTEN) {
            settings.admin_listen = parse(
                ENV_ADMIN_LISTEN,
                v,
                "a socket address such as 0.0.0.0:15090",
            )?;
        }
        if let Some(v) = lookup(ENV_MAX_BODY_BYTES) {
            settings.max_body_bytes = positive(ENV_MAX_BODY_BYTES, v)?;
        }
        if let Some(v) = lookup(ENV_MAX_RESPONSE_BYTES) {
            settings.max_response_bytes = positive(ENV_MAX_RESPONSE_BYTES, v)?;
        }
        if let Some(v) = lookup(ENV_MAX_SESSIONS) {
            settings.max_sessions = positive(ENV_MAX_SESSIONS, v)?;
        }
        if let Some(v) = lookup(ENV_AUDIT_QUEUE) {
            settings.audit_queue = positive(ENV_AUDIT_QUEUE, v)?;
        }
        if let Some(v) = lookup(ENV_AUDIT_CHECKPOINT_EVERY) {
            settings.audit_checkpoint_every = positive(ENV_AUDIT_CHECKPOINT_EVERY, v)? as u64;
        }
        if let Some(v) = lookup(ENV_AUDIT_CHECKPOINT_INTERVAL_MS) {
            let ms: usize = positive(ENV_AUDIT_CHECKPOINT_INTERVAL_MS, v)?;
            settings.audit_checkpoint_interval = Duration::from_millis(ms as u64);
        }
        if let Some(v) = lookup(ENV_CONNECT_TIMEOUT_MS) {
            let ms: usize = positive(ENV_CONNECT_TIMEOUT_MS, v)?;
            settings.connect_timeout = Duration::from_millis(ms as u64);
        }
        if let Some(v) = lookup(ENV_HEADER_READ_TIMEOUT_MS) {
            let ms: usize = positive(ENV_HEADER_READ_TIMEOUT_MS, v)?;
            settings.header_read_timeout = Duration::from_millis(ms as u64);
        }
        if let Some(v) = lookup(ENV_CONNECTION_IDLE_TIMEOUT_MS) {
            let ms: usize = positive(ENV_CONNECTION_IDLE_TIMEOUT_MS, v)?;
            settings.connection_idle_timeout = Duration::from_millis(ms as u64);
        }
        if let Some(v) = lookup(ENV_MAX_CONNECTIONS) {
            settings.max_connections = positive(ENV_MAX_CONNECTIONS, v)?;
        }
        if let Some(v) = lookup(ENV_INBOUND_MAX_CONNECTIONS) {
            settings.inbound_max_connections = positive(ENV_INBOUND_MAX_CONNECTIONS, v)?;
        }
        if let Some(v) = lookup(ENV_REPLAY_CACHE_PER_ISSUER) {
            settings.replay_cache_per_issuer = positive(ENV_REPLAY_CACHE_PER_ISSUER, v)?;
        }
        if let Some(v) = lookup(ENV_MAX_DELEGATED_SESSIONS_PER_CALLER) {
            settings.max_delegated_sessions_per_caller =
                positive(ENV_MAX_DELEGATED_SESSIONS_PER_CALLER, v)?;
        }
        if let Some(v) = lookup(ENV_INITIATOR_MAX_TOKEN_LIFETIME_SECONDS) {
            let seconds: usize = positive(ENV_INITIATOR_MAX_TOKEN_LIFETIME_SECONDS, v)?;
            settings.initiator_max_token_lifetime = Duration::from_secs(seconds as u64);
        }
        if let Some(v) = lookup(ENV_APPROVAL_HOLD_SECONDS) {
            let seconds: usize = positive(ENV_APPROVAL_HOLD_SECONDS, v)?;
            settings.approval_hold = Duration::from_secs(seconds as u64);
        }
        if let Some(v) = lookup(ENV_SHUTDOWN_GRACE_MS) {
            let ms: usize = positive(ENV_SHUTDOWN_GRACE_MS, v)?;
            settings.shutdown_grace = Duration::from_millis(ms as u64);
        }
        if let Some(v) = lookup(ENV_WORKER_THREADS) {
            let threads = positive(ENV_WORKER_THREADS, v)?;
            settings.worker_threads = NonZeroUsize::new(threads).unwrap_or(NonZeroUsize::MIN);
        }
        if let Some(v) = lookup(ENV_SIGNING_NONCES) {
            const EXPECTED: &str =
                "a count of nonces from 0 (every assertion signed on the call's path) to 65536";
            settings.signing_nonces = match v.trim().parse::<usize>() {
                Ok(n) if n <= crate::signing_nonces::MAX_CAPACITY => n,
                _ => {
                    return Err(InvalidSetting {
                        name: ENV_SIGNING_NONCES,
                        value: v,
                        expected: EXPECTED,
                    });
                }
            };
        }
        if let Some(v) = lookup(ENV_POD_NAME) {
            settings.pod_name = v;
        }
        if let Some(v) = lookup(ENV_POD_NAMESPACE) {
            settings.pod_namespace = v;
        }
        if let Some(address) = lookup(ENV_CONTROLLER_ADDRESS).filter(|v| !v.trim().is_empty()) {
            let mut controller = ControllerSettings::new(address.trim())?;
            if let Some(v) = lookup(ENV_CONTROLLER_SERVER_NAME).filter(|v| !v.trim().is_empty()) {
                controller.server_name = v.trim().to_owned();
            }
            if let Some(v) = lookup(ENV_TOKEN_FILE).filter(|v| !v.trim().is_empty()) {
                controller.token_file = PathBuf::from(v.trim());
            }
            if let Some(v) = lookup(ENV_CA_FILE).filter(|v| !v.trim().is_empty()) {
                controller.ca = CaSource::File(PathBuf::from(v.trim()));
            }
            if let Some(v) = lookup(ENV_CA_PEM).filter(|v| !v.trim().is_empty()) {
                controller.ca = CaSource::Pem(v);
            }
            settings.controller = Some(controller);
        }
        if let Some(v) = lookup(ENV_UPSTREAM_CA_FILE).filter(|v| !v.trim().is_empty()) {
            settings.upstream_ca_file = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = lookup(ENV_UPSTREAM_SECRETS_DIR).filter(|v| !v.trim().is_empty()) {
            settings.upstream_secrets_dir = PathBuf::from(v.trim());
        }
        if let Some(v) = lookup(ENV_MODE) {
            settings.mode = match v.trim() {
                "" | "agent" => SidecarMode::Agent,
                "tool" => SidecarMode::Tool,
                _ => {
                    return Err(InvalidSetting {
                        name: ENV_MODE,
                        value: v,
                        expected: "agent or tool",
                    });
                }
            };
        }
        if let Some(v) = lookup(ENV_INBOUND_LISTEN) {
            settings.inbound_listen = parse(
                ENV_INBOUND_LISTEN,
                v,
                "a socket address such as 0.0.0.0:15006",
            )?;
        }
        if let Some(v) = lookup(ENV_INBOUND_UPSTREAM).filter(|v| !v.trim().is_empty()) {
            let uri: http::Uri = parse(
                ENV_INBOUND_UPSTREAM,
                v.clone(),
                "an http:// URL such as http://127.0.0.1:8080",
            )?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(InvalidSetting {
                    name: ENV_INBOUND_UPSTREAM,
                    value: v,
                    expected: "an http:// URL such as http://127.0.0.1:8080",
                });
            }
            settings.inbound_upstream = Some(uri);
        }
        if let Some(v) = lookup(ENV_INBOUND_AUDIENCES) {
            settings.inbound_audiences = v
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if settings.mode == SidecarMode::Tool
            && (settings.inbound_upstream.is_none() || settings.inbound_audiences.is_empty())
        {
            return Err(InvalidSetting {
                name: ENV_MODE,
                value: "tool".to_owned(),
                expected: "tool mode also needs CHAPERONE_INBOUND_UPSTREAM (the tool server it fronts) and CHAPERONE_INBOUND_AUDIENCES (the audience callers address)",
            });
        }
        Ok(settings)
    }
}

fn parse<T: std::str::FromStr>(
    name: &'static str,
    value: String,
    expected: &'static str,
) -> Result<T, InvalidSetting> {
    value.trim().parse().map_err(|_| InvalidSetting {
        name,
        value,
        expected,
    })
}

fn positive(name: &'static str, value: String) -> Result<usize, InvalidSetting> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(InvalidSetting {
            name,
            value,
            expected: "a positive integer",
        }),
    }
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
