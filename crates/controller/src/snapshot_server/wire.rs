//! The edge between the wire contract (`chaperone_wire::v1`) and the
//! controller's own types, mirroring the sidecar's `snapshot_stream/wire.rs`:
//! what a sidecar sends becomes a [`SidecarReport`] or a typed
//! [`InvalidSidecarMessage`], and what the controller sends is built here from
//! its own types ([`snapshot_message`], [`key_set_message`]). Pure; no I/O.
//!
//! Audit records travel on as the JSON text the sidecar wrote: the Event
//! writer ([`crate::audit_events`]) reads them, one at a time, so that one bad
//! record costs only itself.

use std::collections::BTreeSet;

use chaperone_policy::SNAPSHOT_FORMAT_JSON;
use chaperone_wire::v1::{self, ControllerMessage, SidecarMessage, controller_message};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::{auth::SidecarIdentity, index::PublishedSnapshot};

/// What a sidecar reported on its stream.
#[derive(Clone, Debug, PartialEq)]
pub enum SidecarReport {
    /// The first message of a stream.
    Hello(Hello),
    /// The sidecar enforces this snapshot now.
    Ack(SnapshotRef),
    /// The sidecar could not use this snapshot and keeps its last good one.
    Nack {
        /// The snapshot refused.
        snapshot: SnapshotRef,
        /// Why.
        error: String,
    },
    /// The public key of the assertions the sidecar signs.
    SigningKey(SigningKey),
    /// The tools the sidecar saw in tools/list results: (server, tool).
    Inventory(BTreeSet<(String, String)>),
    /// Audit records and how many the sidecar dropped.
    Audit(AuditBatch),
}

/// A snapshot by version and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRef {
    /// Its version.
    pub version: u64,
    /// Its content hash.
    pub hash: String,
}

/// What a (re)connecting sidecar runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sidecar's build.
    pub sidecar_version: String,
    /// The snapshot it enforces, if any.
    pub snapshot: Option<SnapshotRef>,
}

/// A sidecar's public signing key.
#[derive(Clone, Debug, PartialEq)]
pub struct SigningKey {
    /// Key id (the assertions' `kid`); never empty.
    pub kid: String,
    /// The public key as a JWK object.
    pub jwk: Map<String, Value>,
}

/// A batch of audit records (each one JSON object, as the sidecar wrote it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditBatch {
    /// The records.
    pub records: Vec<String>,
    /// Records the sidecar dropped since its last batch (its queue was full).
    pub dropped: u64,
}

/// A sidecar message the controller cannot use (logged and ignored).
#[derive(Debug, Error)]
pub enum InvalidSidecarMessage {
    /// No message is set: an empty message, or one of a newer contract.
    #[error("the message is empty or of a kind this controller does not know")]
    Unknown,
    /// A signing key without a key id.
    #[error("the signing key has no kid")]
    KeyWithoutKid,
    /// A signing key that is not a JWK object.
    #[error("signing key {kid:?} is not a JWK object")]
    KeyNotAJwk {
        /// Its key id.
        kid: String,
    },
}

impl TryFrom<SidecarMessage> for SidecarReport {
    type Error = InvalidSidecarMessage;

    fn try_from(message: SidecarMessage) -> Result<Self, InvalidSidecarMessage> {
        use v1::sidecar_message::Message;
        Ok(match message.message {
            Some(Message::Hello(hello)) => Self::Hello(hello.into()),
            Some(Message::Ack(ack)) => Self::Ack(SnapshotRef {
                version: ack.version,
                hash: ack.hash,
            }),
            Some(Message::Nack(nack)) => Self::Nack {
                snapshot: SnapshotRef {
                    version: nack.version,
                    hash: nack.hash,
                },
                error: nack.error,
            },
            Some(Message::SigningKey(key)) => Self::SigningKey(key.try_into()?),
            Some(Message::Inventory(inventory)) => Self::Inventory(
                inventory
                    .tools
                    .into_iter()
                    .map(|t| (t.server, t.name))
                    .collect(),
            ),
            Some(Message::Audit(batch)) => Self::Audit(AuditBatch {
                records: batch.records,
                dropped: batch.dropped,
            }),
            // TODO(#17, helper B1): approval requests; refused until handled.
            Some(Message::ApprovalRequest(_) | Message::ApprovalRelease(_)) | None => {
                return Err(InvalidSidecarMessage::Unknown);
            }
        })
    }
}

impl From<v1::Hello> for Hello {
    fn from(hello: v1::Hello) -> Self {
        // Version 0 and an empty hash: the sidecar runs no snapshot yet.
        let runs_one = hello.snapshot_version != 0 || !hello.snapshot_hash.is_empty();
        let snapshot = runs_one.then_some(SnapshotRef {
            version: hello.snapshot_version,
            hash: hello.snapshot_hash,
        });
        Self {
            sidecar_version: hello.sidecar_version,
            snapshot,
        }
    }
}

impl TryFrom<v1::SigningKey> for SigningKey {
    type Error = InvalidSidecarMessage;

    fn try_from(key: v1::SigningKey) -> Result<Self, InvalidSidecarMessage> {
        if key.kid.is_empty() {
            return Err(InvalidSidecarMessage::KeyWithoutKid);
        }
        match serde_json::from_str::<Value>(&key.jwk_json) {
            Ok(Value::Object(jwk)) => Ok(Self { kid: key.kid, jwk }),
            _ => Err(InvalidSidecarMessage::KeyNotAJwk { kid: key.kid }),
        }
    }
}

/// The update carrying `snapshot` to the sidecar `identity`: the snapshot's
/// shared bytes in [`SNAPSHOT_FORMAT_JSON`], who the sidecar is, and the key
/// set it verifies callers with (nothing is serialised here).
pub fn snapshot_message(
    identity: &SidecarIdentity,
    snapshot: &PublishedSnapshot,
    jwks_json: &str,
) -> ControllerMessage {
    ControllerMessage {
        message: Some(controller_message::Message::Snapshot(v1::SnapshotUpdate {
            version: snapshot.version,
            hash: snapshot.hash.clone(),
            format: SNAPSHOT_FORMAT_JSON.to_owned(),
            payload: snapshot.bytes().clone(),
            identity: Some(v1::Identity {
                namespace: identity.agent.namespace.clone(),
                agent: identity.agent.name.clone(),
                pod: identity.pod.clone(),
                pod_uid: identity.pod_uid.clone(),
            }),
            jwks_json: jwks_json.to_owned(),
        })),
    }
}

/// A key set on its own (a JWKS, JSON).
pub fn key_set_message(jwks_json: String) -> ControllerMessage {
    ControllerMessage {
        message: Some(controller_message::Message::Keys(v1::KeySet { jwks_json })),
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
