//! The snapshot source: the policy in force, swapped atomically.
//!
//! Whatever delivers snapshots (the controller's stream, or the standalone
//! `--policy-dir` loader) calls [`SnapshotSource::update`]; every request reads
//! [`SnapshotSource::current`] when it is decided, so an update applies to the next
//! call on every open connection and SSE stream. Until the first snapshot there is
//! none: the sidecar answers 503 and is not ready (fail closed). A snapshot that
//! does not convert is refused with a typed error (the stream's NACK) and the last
//! good one stays in force.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use chaperone_policy::{Engine, InvalidSnapshot, Snapshot};
use thiserror::Error;
use tokio::sync::watch;

use crate::metrics::LabelVocabulary;
use crate::refusal::NoSnapshot;

/// An upstream tool server as the proxy uses it.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The server's name (first path segment).
    pub name: String,
    /// The MCP endpoint URL without a trailing `/`.
    pub base_url: String,
    /// `aud` of assertions sent to it.
    pub audience: String,
    /// `host[:port]`, sent as `Host`.
    pub authority: http::uri::Authority,
    /// The AgentIdentity behind this endpoint, when it is another agent.
    pub agent: Option<String>,
    /// The Secret holding its CA and `Authorization` (`upstreamSecret`),
    /// mounted by the webhook; see [`crate::upstream_secrets`].
    pub secret: Option<String>,
}

/// Prefix of an agent's identity in assertions (`iss`, `sub`, `act.sub`).
pub const AGENT_ISSUER_PREFIX: &str = "chaperone:agent:";

/// The identity of agent `namespace/name` in assertions:
/// `chaperone:agent:<namespace>/<name>`.
pub fn agent_issuer(namespace: &str, name: &str) -> String {
    format!("{AGENT_ISSUER_PREFIX}{namespace}/{name}")
}

/// The policy in force: the snapshot, its engine and its routes.
#[derive(Debug)]
pub struct ActivePolicy {
    /// The snapshot as received, less the rules and tool classifications of
    /// the agent and its delegators and the tool definition pins: the engine
    /// holds those, compiled, and a second copy of a 1,000-tool policy would
    /// cost megabytes.
    pub snapshot: Snapshot,
    /// The compiled evaluator.
    pub engine: Engine,
    /// Tool servers by name.
    pub upstreams: HashMap<String, Upstream>,
    /// `chaperone:agent:<namespace>/<name>`: the `iss` of assertions.
    pub issuer: String,
    /// The server, tool and rule names metrics may use as label values.
    pub labels: LabelVocabulary,
}

impl ActivePolicy {
    /// Version of the snapshot.
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }
}

/// A snapshot was refused; the previous one stays in force.
#[derive(Debug, Error)]
pub enum SnapshotRejected {
    /// The engine could not be built from it.
    #[error(transparent)]
    Invalid(#[from] InvalidSnapshot),
    /// Its version is not newer than the one in force.
    #[error("snapshot version {offered} is not newer than version {current} in force")]
    Stale {
        /// The version offered.
        offered: u64,
        /// The version in force.
        current: u64,
    },
    /// A tool server URL cannot be used.
    #[error("tool server {server}: url {url:?} is not usable: {reason}")]
    BadUpstream {
        /// The server.
        server: String,
        /// Its URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
}

/// Why no snapshot is in force (what a refused call and `/ready` say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Absence {
    /// None has arrived yet.
    #[default]
    NotYet,
    /// The controller said no AgentIdentity selects this pod.
    AgentGone,
    /// Withdrawn after the controller was unreachable for longer than the
    /// agent's `maxDisconnectedSeconds`.
    ControllerLost {
        /// The limit that passed, in seconds.
        limit_seconds: u32,
    },
}

impl std::fmt::Display for Absence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Absence::NotYet => f.write_str("no policy snapshot yet"),
            Absence::AgentGone => f.write_str(
                "policy snapshot dropped: the controller says no AgentIdentity selects this pod",
            ),
            Absence::ControllerLost { limit_seconds } => write!(
                f,
                "policy snapshot withdrawn: the controller has been unreachable for more than {limit_seconds} s (the AgentIdentity's maxDisconnectedSeconds)"
            ),
        }
    }
}

/// Holds the current snapshot and tells subscribers about new versions.
#[derive(Debug)]
pub struct SnapshotSource {
    current: ArcSwapOption<ActivePolicy>,
    versions: watch::Sender<Option<u64>>,
    /// Why `current` is empty; read only when it is.
    absence: std::sync::Mutex<Absence>,
}

impl Default for SnapshotSource {
    fn default() -> Self {
        Self::new()
    }
}

impl SnapshotSource {
    /// A source with no snapshot yet.
    pub fn new() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            versions: watch::Sender::new(None),
            absence: std::sync::Mutex::new(Absence::NotYet),
        }
    }

    /// The policy in force, if any.
    pub fn current(&self) -> Option<Arc<ActivePolicy>> {
        self.current.load_full()
    }

    /// The policy in force, or the refusal that says why there is none.
    pub fn in_force(&self) -> Result<Arc<ActivePolicy>, NoSnapshot> {
        self.current().ok_or_else(|| NoSnapshot(self.absence()))
    }

    /// Whether a snapshot is in force.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Versions put in force, for the stream's ACKs and for metrics.
    pub fn subscribe(&self) -> watch::Receiver<Option<u64>> {
        self.versions.subscribe()
    }

    /// Why no snapshot is in force (meaningful while [`Self::current`] is
    /// none).
    pub fn absence(&self) -> Absence {
        *self.absence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the snapshot in force for the reason `why` (its AgentIdentity was
    /// deleted, or the controller was away too long): from now on every call
    /// is refused, saying why, and the sidecar is not ready until a new one
    /// arrives. Returns the version dropped, if any.
    pub fn clear(&self, why: Absence) -> Option<u64> {
        *self.absence.lock().unwrap_or_else(|e| e.into_inner()) = why;
        let dropped = self.current.swap(None).map(|active| active.version());
        self.versions.send_replace(None);
        dropped
    }

    /// Converts `snapshot` and puts it in force; refuses (NACK) a snapshot that
    /// does not convert or is not newer than the one in force.
    pub fn update(&self, snapshot: Snapshot) -> Result<u64, SnapshotRejected> {
        if let Some(current) = self.current.load().as_ref()
            && snapshot.version <= current.version()
        {
            return Err(SnapshotRejected::Stale {
                offered: snapshot.version,
                current: current.version(),
            });
        }
        let active = convert(snapshot)?;
        let version = active.version();
        self.current.store(Some(Arc::new(active)));
        self.versions.send_replace(Some(version));
        Ok(version)
    }
}

fn convert(mut snapshot: Snapshot) -> Result<ActivePolicy, SnapshotRejected> {
    let engine = Engine::new(&snapshot)?;
    let labels = LabelVocabulary::of(&snapshot);
    for authority in std::iter::once(&mut snapshot.content.authority)
        .chain(snapshot.content.delegators.iter_mut())
    {
        authority.rules = Vec::new();
        authority.classifications = Vec::new();
    }
    snapshot.content.pins = Vec::new();
    let mut upstreams = HashMap::new();
    for server in &snapshot.content.tool_servers {
        let bad = |reason| SnapshotRejected::BadUpstream {
            server: server.name.clone(),
            url: server.url.clone(),
            reason,
        };
        let uri: http::Uri = server.url.parse().map_err(|_| bad("not a URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(bad("only http:// and https:// tool servers are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        let base_url = server.url.trim_end_matches('/').to_owned();
        upstreams.insert(
            server.name.clone(),
            Upstream {
                name: server.name.clone(),
                audience: server
                    .audience
                    .clone()
                    .unwrap_or_else(|| match &server.agent {
                        Some(callee) => agent_issuer(&snapshot.content.agent.namespace, callee),
                        None => server.url.clone(),
                    }),
                agent: server.agent.clone(),
                secret: server.upstream_secret.clone(),
                base_url,
                authority,
            },
        );
    }
    let agent = &snapshot.content.agent;
    let issuer = agent_issuer(&agent.namespace, &agent.name);
    Ok(ActivePolicy {
        snapshot,
        engine,
        upstreams,
        issuer,
        labels,
    })
}
