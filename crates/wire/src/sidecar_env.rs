//! The injected sidecar's contract with the webhook that injects it and the
//! agent beside it, defined once: the environment variables the sidecar reads
//! (the webhook sets them), its ports, and the HTTP headers it speaks with the
//! agent and the tools.

/// The agent-facing MCP proxy's port (`127.0.0.1:15001`).
pub const OUTBOUND_PORT: u16 = 15001;
/// The inbound side's port (delegated calls, or calls to the tool a tool-mode
/// sidecar fronts).
pub const INBOUND_PORT: u16 = 15006;
/// The admin port (`/metrics`, [`READYZ_PATH`], [`LIVEZ_PATH`]; the kubelet
/// probes it).
pub const ADMIN_PORT: u16 = 15090;
/// Liveness endpoint of both binaries' admin servers: 200 while the process
/// serves.
pub const LIVEZ_PATH: &str = "/livez";
/// Readiness endpoint of both binaries' admin servers: 200 once it can do its
/// work (the sidecar: a snapshot or keys in force; the controller: every kind
/// listed).
pub const READYZ_PATH: &str = "/readyz";

/// The per-call assertion a sidecar sends to the tool (or the next agent).
pub const ASSERTION_HEADER: &str = "chaperone-assertion";
/// The inbound-opened session a sidecar hands to its agent, which sends it
/// back with the calls it makes for that task.
pub const SESSION_HEADER: &str = "chaperone-session";

/// Set in the agent's containers: the URL of the sidecar's MCP proxy.
pub const ENV_MCP_URL: &str = "CHAPERONE_MCP_URL";
/// The value of [`ENV_MCP_URL`]: the proxy on loopback ([`OUTBOUND_PORT`]).
pub const MCP_URL: &str = "http://127.0.0.1:15001";

/// Where the injected projected ServiceAccount token volume is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/chaperone";
/// The token in [`TOKEN_DIR`] (audience `chaperone`); default of
/// [`ENV_TOKEN_FILE`].
pub const TOKEN_FILE: &str = "/var/run/secrets/chaperone/token";

/// Address of the MCP proxy the agent talks to.
pub const ENV_LISTEN: &str = "CHAPERONE_LISTEN";
/// Address of the admin server (`/metrics`, `/ready`).
pub const ENV_ADMIN_LISTEN: &str = "CHAPERONE_ADMIN_LISTEN";
/// Largest accepted request body, bytes.
pub const ENV_MAX_BODY_BYTES: &str = "CHAPERONE_MAX_BODY_BYTES";
/// Largest buffered response (a `tools/list` page) or SSE event, bytes.
pub const ENV_MAX_RESPONSE_BYTES: &str = "CHAPERONE_MAX_RESPONSE_BYTES";
/// Most sessions held at once.
pub const ENV_MAX_SESSIONS: &str = "CHAPERONE_MAX_SESSIONS";
/// Capacity of the audit shipping queue, records.
pub const ENV_AUDIT_QUEUE: &str = "CHAPERONE_AUDIT_QUEUE";
/// Most audit decisions a signed checkpoint follows, records.
pub const ENV_AUDIT_CHECKPOINT_EVERY: &str = "CHAPERONE_AUDIT_CHECKPOINT_EVERY";
/// How often a signed audit checkpoint covers the decisions written since the
/// last one, milliseconds.
pub const ENV_AUDIT_CHECKPOINT_INTERVAL_MS: &str = "CHAPERONE_AUDIT_CHECKPOINT_INTERVAL_MS";
/// The pod's name (downward API).
pub const ENV_POD_NAME: &str = "CHAPERONE_POD_NAME";
/// The pod's namespace (downward API).
pub const ENV_POD_NAMESPACE: &str = "CHAPERONE_POD_NAMESPACE";
/// Timeout for connecting to a tool server, milliseconds.
pub const ENV_CONNECT_TIMEOUT_MS: &str = "CHAPERONE_CONNECT_TIMEOUT_MS";
/// `host:port` of the controller's snapshot server; set → controller mode.
pub const ENV_CONTROLLER_ADDRESS: &str = "CHAPERONE_CONTROLLER_ADDRESS";
/// The projected ServiceAccount token (audience `chaperone`), re-read on every
/// (re)connect so kubelet rotation is picked up.
pub const ENV_TOKEN_FILE: &str = "CHAPERONE_TOKEN_FILE";
/// PEM file of the CA that signs the controller's serving certificate.
pub const ENV_CA_FILE: &str = "CHAPERONE_CA_FILE";
/// The same CA inline (PEM); the injection webhook sets this one. Wins over
/// [`ENV_CA_FILE`] when both are set.
pub const ENV_CA_PEM: &str = "CHAPERONE_CA_PEM";
/// TLS server name to verify the controller's certificate against (default: the
/// host part of [`ENV_CONTROLLER_ADDRESS`]).
pub const ENV_CONTROLLER_SERVER_NAME: &str = "CHAPERONE_CONTROLLER_SERVER_NAME";

/// `agent` (default: outbound proxy, plus the inbound side when
/// [`ENV_INBOUND_UPSTREAM`] is set) or `tool` (inbound only, in front of a tool
/// server).
pub const ENV_MODE: &str = "CHAPERONE_MODE";
/// Address of the inbound listener (calls to this pod's own MCP endpoint).
pub const ENV_INBOUND_LISTEN: &str = "CHAPERONE_INBOUND_LISTEN";
/// The pod's own MCP endpoint the inbound side fronts, e.g.
/// `http://127.0.0.1:8080` (from the `chaperone.dev/inbound-port` annotation).
pub const ENV_INBOUND_UPSTREAM: &str = "CHAPERONE_INBOUND_UPSTREAM";
/// Comma-separated `aud` values the inbound side accepts besides the agent's
/// own identity (from the `chaperone.dev/audience` annotation).
pub const ENV_INBOUND_AUDIENCES: &str = "CHAPERONE_INBOUND_AUDIENCES";

/// Extra CA bundle (PEM) trusted for `https://` tool servers and initiator
/// JWKS URLs, besides the system's roots.
pub const ENV_UPSTREAM_CA_FILE: &str = "CHAPERONE_UPSTREAM_CA_FILE";
/// Where the webhook mounts each tool server's `upstreamSecret`, one folder
/// per server: `<dir>/<server>/ca.crt`, `<dir>/<server>/authorization`;
/// default [`UPSTREAM_SECRETS_DIR`].
pub const ENV_UPSTREAM_SECRETS_DIR: &str = "CHAPERONE_UPSTREAM_SECRETS_DIR";
/// Default of [`ENV_UPSTREAM_SECRETS_DIR`].
pub const UPSTREAM_SECRETS_DIR: &str = "/var/run/secrets/chaperone/upstreams";
/// The key of an `upstreamSecret` holding the CA bundle for that server.
pub const UPSTREAM_CA_KEY: &str = "ca.crt";
/// The key of an `upstreamSecret` holding the `Authorization` header value.
pub const UPSTREAM_AUTHORIZATION_KEY: &str = "authorization";

/// Longest a request's head may take to arrive on the proxy or inbound
/// listener, counted from the connection's accept (first request) or from the
/// first byte of a later one, milliseconds. Slower connections are closed.
pub const ENV_HEADER_READ_TIMEOUT_MS: &str = "CHAPERONE_HEADER_READ_TIMEOUT_MS";
/// Longest a proxy or inbound connection may stay open with no request in
/// flight, milliseconds (a streaming response is in flight until it ends).
pub const ENV_CONNECTION_IDLE_TIMEOUT_MS: &str = "CHAPERONE_CONNECTION_IDLE_TIMEOUT_MS";
/// Most connections the agent-facing proxy holds at once.
pub const ENV_MAX_CONNECTIONS: &str = "CHAPERONE_MAX_CONNECTIONS";
/// Most connections the inbound side holds at once.
pub const ENV_INBOUND_MAX_CONNECTIONS: &str = "CHAPERONE_INBOUND_MAX_CONNECTIONS";
/// Most unexpired assertion ids the inbound side remembers per issuing agent
/// (replay detection); beyond it that agent's new assertions are refused.
pub const ENV_REPLAY_CACHE_PER_ISSUER: &str = "CHAPERONE_REPLAY_CACHE_PER_ISSUER";
/// Most sessions the inbound side holds per calling agent (or initiating
/// user); beyond it that caller's least recently used session is forgotten.
pub const ENV_MAX_DELEGATED_SESSIONS_PER_CALLER: &str =
    "CHAPERONE_MAX_DELEGATED_SESSIONS_PER_CALLER";
/// Longest validity an initiator token may have (`exp - iat`, or `exp - now`
/// without `iat`), seconds.
pub const ENV_INITIATOR_MAX_TOKEN_LIFETIME_SECONDS: &str =
    "CHAPERONE_INITIATOR_MAX_TOKEN_LIFETIME_SECONDS";
/// Longest the sidecar holds a call that a `requireApproval` rule matched
/// while a person decides, seconds (default 20: below common MCP client
/// timeouts). A call still pending then is refused with the approval's name,
/// to be retried.
pub const ENV_APPROVAL_HOLD_SECONDS: &str = "CHAPERONE_APPROVAL_HOLD_SECONDS";
/// Longest the sidecar lets calls in flight finish after SIGTERM before it
/// closes its audit trail, milliseconds (default
/// [`DEFAULT_SHUTDOWN_GRACE_MS`]; the injection webhook sets a third of the
/// pod's `terminationGracePeriodSeconds`, at most that). New connections are
/// refused at once; the audit records are shipped to the controller after.
pub const ENV_SHUTDOWN_GRACE_MS: &str = "CHAPERONE_SHUTDOWN_GRACE_MS";
/// Default of [`ENV_SHUTDOWN_GRACE_MS`]: with the audit flush after it, well
/// inside a pod's default 30 s termination grace period.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Runtime worker threads (default 1). With one, the sidecar runs on a single
/// thread that also polls the sockets (no work stealing, no wake-ups across
/// threads); the injection webhook sets it to the CPU the sidecar is given.
pub const ENV_WORKER_THREADS: &str = "CHAPERONE_WORKER_THREADS";
/// How many Ed25519 signing nonces the sidecar keeps made ahead of the calls
/// that sign assertions with them (default 1,024; refilled by a thread of its
/// own each time 32 are used; at most 65,536). 0: every assertion is signed the
/// RFC 8032 way on the call's path. A tool-mode sidecar, which signs no
/// assertions, makes none.
pub const ENV_SIGNING_NONCES: &str = "CHAPERONE_SIGNING_NONCES";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelled_out_values_agree_with_their_parts() {
        assert_eq!(MCP_URL, format!("http://127.0.0.1:{OUTBOUND_PORT}"));
        assert_eq!(TOKEN_FILE, format!("{TOKEN_DIR}/token"));
    }
}
