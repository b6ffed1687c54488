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

impl From<&DiscoveredTool> for v1::DiscoveredTool {
    fn from(tool: &DiscoveredTool) -> Self {
        Self {
            server: tool.server.clone(),
            name: tool.name.clone(),
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
mod tests {
    use super::fixtures::{snapshot, update};
    use super::*;

    #[test]
    fn converts_a_valid_update() {
        let snapshot = snapshot(7);
        let offer = SnapshotOffer::try_from(update(&snapshot)).unwrap();
        assert_eq!(offer.snapshot, snapshot);
        assert_eq!(offer.identity.unwrap().pod, "planner-0");
        assert!(offer.peer_keys.unwrap().get("k1").is_some());
    }

    #[test]
    fn refuses_an_unknown_format() {
        let mut update = update(&snapshot(1));
        update.format = "chaperone.snapshot.v2+cbor".into();
        let err = SnapshotOffer::try_from(update).unwrap_err();
        assert!(matches!(err, InvalidUpdate::UnsupportedFormat(_)));
        assert!(err.to_string().contains("v2+cbor"), "{err}");
    }

    #[test]
    fn refuses_a_payload_that_is_not_json() {
        let mut update = update(&snapshot(1));
        update.payload = bytes::Bytes::from_static(b"{not json");
        assert!(matches!(
            SnapshotOffer::try_from(update),
            Err(InvalidUpdate::Malformed(_))
        ));
    }

    #[test]
    fn refuses_content_that_does_not_match_its_hash() {
        let mut tampered = snapshot(1);
        tampered.content.agent.name = "admin".into();
        let err = SnapshotOffer::try_from(update(&tampered)).unwrap_err();
        assert!(
            matches!(err, InvalidUpdate::ContentHashMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_an_announced_hash_other_than_the_payloads() {
        let mut update = update(&snapshot(1));
        update.hash = "0".repeat(64);
        assert!(matches!(
            SnapshotOffer::try_from(update),
            Err(InvalidUpdate::HashMismatch { .. })
        ));
    }

    #[test]
    fn refuses_an_announced_version_other_than_the_payloads() {
        let mut update = update(&snapshot(1));
        update.version = 2;
        assert!(matches!(
            SnapshotOffer::try_from(update),
            Err(InvalidUpdate::VersionMismatch {
                announced: 2,
                payload: 1
            })
        ));
    }

    #[test]
    fn refuses_a_snapshot_for_another_agent() {
        let mut update = update(&snapshot(1));
        update.identity.as_mut().unwrap().agent = "worker".into();
        let err = SnapshotOffer::try_from(update).unwrap_err();
        assert!(matches!(err, InvalidUpdate::WrongAgent { .. }), "{err}");
    }

    #[test]
    fn refuses_a_bad_jwks() {
        let mut update = update(&snapshot(1));
        update.jwks_json = "[]".into();
        assert!(matches!(
            SnapshotOffer::try_from(update),
            Err(InvalidUpdate::Jwks(InvalidJwks::NoKeys))
        ));
    }

    #[test]
    fn an_empty_jwks_leaves_the_keys_alone() {
        let mut update = update(&snapshot(1));
        update.jwks_json = String::new();
        assert!(SnapshotOffer::try_from(update).unwrap().peer_keys.is_none());
    }

    /// The golden update of `crates/wire/tests/fixtures/snapshot-v1.json` (the
    /// controller's encoder is tested against the same file), as the sidecar
    /// receives it. The payload's keys come out sorted: a decoder must not
    /// care, and the hash (over the content in its declared order) still pins
    /// the layout.
    fn golden_update() -> SnapshotUpdate {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../wire/tests/fixtures/snapshot-v1.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
        let text_of = |pointer: &str| {
            golden
                .pointer(pointer)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        };
        SnapshotUpdate {
            version: golden["version"].as_u64().unwrap(),
            hash: text_of("/hash"),
            format: text_of("/format"),
            payload: serde_json::to_vec(&golden["payload"]).unwrap().into(),
            identity: Some(v1::Identity {
                namespace: text_of("/identity/namespace"),
                agent: text_of("/identity/agent"),
                pod: text_of("/identity/pod"),
                pod_uid: text_of("/identity/podUid"),
            }),
            jwks_json: golden["jwks"].to_string(),
        }
    }

    #[test]
    fn decodes_the_golden_snapshot_update() {
        use chaperone_policy::model::EnforcementMode;

        let offer = SnapshotOffer::try_from(golden_update()).unwrap();
        let snapshot = &offer.snapshot;
        assert_eq!(snapshot.version, 7);
        let content = &snapshot.content;
        assert_eq!(content.format, chaperone_policy::SNAPSHOT_FORMAT);
        assert_eq!(content.agent.to_string(), "shop/planner");
        assert_eq!(content.mode, EnforcementMode::DryRun);
        let servers: Vec<_> = content
            .tool_servers
            .iter()
            .map(|s| (s.name.as_str(), s.agent.as_deref()))
            .collect();
        assert_eq!(servers, [("orders", None), ("worker", Some("worker"))]);
        assert_eq!(content.assertion.lifetime_seconds, 30);
        assert_eq!(
            (
                content.session.idle_timeout_seconds,
                content.session.max_calls
            ),
            (600, 50)
        );
        assert_eq!(content.initiators[0].issuer, "https://login.example.com");
        assert_eq!(content.passthrough_methods, ["acme/ping", "acme/stats"]);
        let rules: Vec<_> = content
            .authority
            .rules
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(
            rules,
            [
                "call-worker",
                "no-refund-after-export",
                "read-orders",
                "small-refunds",
                "users-only"
            ]
        );
        let limit = content.authority.rules[3].rate_limit.as_ref().unwrap();
        assert_eq!(
            (limit.id.as_str(), limit.calls, limit.period_seconds),
            ("shop/planner/small-refunds", 5, 60)
        );
        assert_eq!(
            content.grants_received[0].grant.to_string(),
            "shop/frontdesk-to-planner"
        );
        assert_eq!(
            content.grants_given[0].grant.to_string(),
            "shop/planner-to-worker"
        );
        assert_eq!(content.delegators[0].agent.to_string(), "shop/frontdesk");
        let identity = offer.identity.unwrap();
        assert_eq!(
            (identity.pod.as_str(), identity.pod_uid.as_str()),
            ("planner-0", "0c6f8e2e-planner-0")
        );
        let keys = offer.peer_keys.unwrap();
        let key = keys.get("frontdesk-0-1").unwrap();
        assert_eq!(key["chaperone.dev/agent"], "shop/frontdesk");
        chaperone_policy::Engine::new(snapshot).expect("the golden snapshot can be put in force");
    }
}
