//! The edge between the wire contract (`chaperone_wire::v1`) and the sidecar's
//! own types: a `SnapshotUpdate` becomes a [`SnapshotOffer`] or a typed
//! [`InvalidUpdate`] whose text goes back to the controller as the NACK's error.
//! Pure; no I/O.

use chaperone_policy::{SNAPSHOT_FORMAT_JSON, Snapshot, SnapshotBytesError};
use chaperone_wire::v1::{self, SnapshotUpdate};
use thiserror::Error;

use crate::inventory::DiscoveredTool;
use crate::peer_keys::{InvalidJwks, PeerKeys};

/// Who the controller says this sidecar is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamIdentity {
    /// Namespace of the agent and pod.
    pub namespace: String,
    /// The AgentIdentity.
    pub agent: String,
    /// The pod.
    pub pod: String,
    /// The pod's uid.
    pub pod_uid: String,
}

/// A snapshot update the sidecar can try to put in force.
#[derive(Clone, Debug)]
pub struct SnapshotOffer {
    /// The snapshot (its hash checked against its content and the announced one).
    pub snapshot: Snapshot,
    /// Who the controller says this sidecar is.
    pub identity: Option<StreamIdentity>,
    /// The live sidecars' keys, when the update carried them.
    pub peer_keys: Option<PeerKeys>,
}

/// A snapshot update that cannot be used (sent back as a NACK).
#[derive(Debug, Error)]
pub enum InvalidUpdate {
    /// The payload is in a format this sidecar does not read.
    #[error("unsupported snapshot format {0:?}: this sidecar reads {SNAPSHOT_FORMAT_JSON:?}")]
    UnsupportedFormat(String),
    /// The payload is not a snapshot.
    #[error(transparent)]
    Malformed(#[from] SnapshotBytesError),
    /// The payload's content does not hash to the hash it carries.
    #[error("snapshot content hashes to {computed}, not to the {carried} it carries")]
    ContentHashMismatch {
        /// The hash in the payload.
        carried: String,
        /// The hash of the payload's content.
        computed: String,
    },
    /// The update announces another hash than its payload's.
    #[error("update announces hash {announced} but its snapshot has hash {payload}")]
    HashMismatch {
        /// The update's `hash`.
        announced: String,
        /// The payload's hash.
        payload: String,
    },
    /// The update announces another version than its payload's.
    #[error("update announces version {announced} but its snapshot has version {payload}")]
    VersionMismatch {
        /// The update's `version`.
        announced: u64,
        /// The payload's version.
        payload: u64,
    },
    /// The snapshot is for another agent than the stream's identity.
    #[error("snapshot is for agent {snapshot} but the stream is authenticated as {stream}")]
    WrongAgent {
        /// `namespace/name` of the snapshot's agent.
        snapshot: String,
        /// `namespace/name` of the stream's identity.
        stream: String,
    },
    /// The JWKS it carries does not parse.
    #[error("peer keys: {0}")]
    Jwks(#[from] InvalidJwks),
}

impl TryFrom<SnapshotUpdate> for SnapshotOffer {
    type Error = InvalidUpdate;

    fn try_from(update: SnapshotUpdate) -> Result<Self, InvalidUpdate> {
        if update.format != SNAPSHOT_FORMAT_JSON {
            return Err(InvalidUpdate::UnsupportedFormat(update.format));
        }
        let snapshot = Snapshot::from_bytes(&update.payload)?;
        if !snapshot.hash_is_valid() {
            return Err(InvalidUpdate::ContentHashMismatch {
                computed: snapshot.content.content_hash(),
                carried: snapshot.hash,
            });
        }
        if snapshot.hash != update.hash {
            return Err(InvalidUpdate::HashMismatch {
                announced: update.hash,
                payload: snapshot.hash,
            });
        }
        if snapshot.version != update.version {
            return Err(InvalidUpdate::VersionMismatch {
                announced: update.version,
                payload: snapshot.version,
            });
        }
        let identity = update.identity.map(StreamIdentity::from);
        if let Some(identity) = &identity {
            let agent = &snapshot.content.agent;
            if agent.namespace != identity.namespace || agent.name != identity.agent {
                return Err(InvalidUpdate::WrongAgent {
                    snapshot: format!("{}/{}", agent.namespace, agent.name),
                    stream: format!("{}/{}", identity.namespace, identity.agent),
                });
            }
        }
        let peer_keys = if update.jwks_json.trim().is_empty() {
            None
        } else {
            Some(PeerKeys::from_json(&update.jwks_json)?)
        };
        Ok(Self {
            snapshot,
            identity,
            peer_keys,
        })
    }
}

impl From<v1::Identity> for StreamIdentity {
    fn from(identity: v1::Identity) -> Self {
        Self {
            namespace: identity.namespace,
            agent: identity.agent,
            pod: identity.pod,
            pod_uid: identity.pod_uid,
        }
    }
}

/// Most bytes of definition JSON in one inventory report: the report stays
/// well inside gRPC's 4 MiB message limit whatever the number of tools.
pub const INVENTORY_JSON_BUDGET: usize = 2 << 20;

/// The inventory report of `tools`: every tool with its definition hash;
/// definition JSON for the most recently seen definitions first, while
/// [`INVENTORY_JSON_BUDGET`] lasts (the others by hash only).
pub fn inventory_report<'a>(
    tools: impl IntoIterator<Item = &'a DiscoveredTool>,
) -> v1::ToolInventory {
    let mut tools: Vec<v1::DiscoveredTool> = tools.into_iter().map(Into::into).collect();
    let mut newest_first: Vec<usize> = (0..tools.len()).collect();
    newest_first.sort_by_key(|&i| std::cmp::Reverse(tools[i].definition_seen_at));
    let mut budget = INVENTORY_JSON_BUDGET;
    for i in newest_first {
        let json = &mut tools[i].definition_json;
        match budget.checked_sub(json.len()) {
            Some(left) => budget = left,
            None => json.clear(),
        }
    }
    v1::ToolInventory { tools }
}

impl From<&DiscoveredTool> for v1::DiscoveredTool {
    fn from(tool: &DiscoveredTool) -> Self {
        let definition = tool.definition.as_ref();
        Self {
            server: tool.server.clone(),
            name: tool.name.clone(),
            definition_hash: definition.map(|d| d.hash.clone()).unwrap_or_default(),
            definition_json: definition.and_then(|d| d.json.clone()).unwrap_or_default(),
            definition_seen_at: definition.map_or(0, |d| d.seen_at),
        }
    }
}

/// Snapshots and updates for tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use chaperone_policy::model::{AgentIdentitySpec, Object};
    use chaperone_policy::{CompileOptions, Inventory, SNAPSHOT_FORMAT_JSON, Snapshot, compile};
    use chaperone_wire::v1::{self, SnapshotUpdate};

    /// A compiled snapshot of agent `shop/planner` at `version`.
    pub(crate) fn snapshot(version: u64) -> Snapshot {
        let identity: Object<AgentIdentitySpec> = serde_json::from_value(serde_json::json!({
            "apiVersion": "chaperone.dev/v1alpha1",
            "metadata": { "name": "planner", "namespace": "shop" },
            "spec": { "selector": { "serviceAccountName": "planner" } }
        }))
        .unwrap();
        let identities = [identity];
        compile(
            &identities[0],
            &Inventory {
                identities: &identities,
                policies: &[],
                grants: &[],
            },
            &CompileOptions { version, now: 0 },
        )
        .snapshot
    }

    /// The update that carries `snapshot` to sidecar `shop/planner-0`.
    pub(crate) fn update(snapshot: &Snapshot) -> SnapshotUpdate {
        SnapshotUpdate {
            version: snapshot.version,
            hash: snapshot.hash.clone(),
            format: SNAPSHOT_FORMAT_JSON.to_owned(),
            payload: snapshot.to_bytes().into(),
            identity: Some(v1::Identity {
                namespace: "shop".into(),
                agent: "planner".into(),
                pod: "planner-0".into(),
                pod_uid: "uid-1".into(),
            }),
            jwks_json: r#"{"keys":[{"kid":"k1","kty":"OKP"}]}"#.into(),
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
