//! The edge between the wire contract (`chaperone_wire::v1`) and the
//! controller's own types, mirroring the sidecar's `snapshot_stream/wire.rs`:
//! what a sidecar sends becomes a [`SidecarReport`] or a typed
//! [`InvalidSidecarMessage`], and what the controller sends is built here from
//! its own types ([`snapshot_message`], [`key_set_message`],
//! [`approval_status_message`]). Pure; no I/O.
//!
//! An approval request is checked here ([`ApprovalCall::check`]); one that
//! cannot be used is an [`InvalidSidecarMessage::ApprovalRequest`] that keeps
//! its ticket, so that the sidecar, which waits on it, is answered FAILED.
//!
//! Audit records travel on as the JSON text the sidecar wrote: the Event
//! writer ([`crate::audit_events`]) reads them, one at a time, so that one bad
//! record costs only itself.

use std::sync::Arc;

use chaperone_api::tool_definitions::is_definition_hash;

use chaperone_policy::SNAPSHOT_FORMAT_JSON;
use chaperone_wire::v1::{self, ControllerMessage, SidecarMessage, controller_message};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::{
    approvals::{
        AnswerPhase, ApprovalAnswer, ApprovalCall, InvalidApprovalRequest, RawApprovalRequest,
    },
    auth::SidecarIdentity,
    index::PublishedSnapshot,
    tool_definitions::{Inventory, MAX_DEFINITION_BYTES, ReportedDefinition},
};

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
    /// The tools the sidecar saw in tools/list results, with their
    /// definitions.
    Inventory(Inventory),
    /// Audit records and how many the sidecar dropped.
    Audit(AuditBatch),
    /// The sidecar holds a call and asks for a person's approval.
    ApprovalRequest(Box<ApprovalCall>),
    /// The sidecar stopped waiting on this ticket.
    ApprovalRelease(u64),
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

/// A sidecar's public signing key, as registered: not yet checked to be
/// the sidecar's own ([`SigningKey::check_possession`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SigningKey {
    /// Key id (the assertions' `kid`); never empty.
    pub kid: String,
    /// The public key as a JWK object.
    pub jwk: Map<String, Value>,
    /// The sidecar's signature of its key registration statement (empty
    /// from a sidecar that predates proofs).
    pub proof: Vec<u8>,
}

/// A key its sidecar proved it holds ([`SigningKey::check_possession`]): an
/// Ed25519 key under the kid derived from it. What the JWKS and the
/// audit-key archive take.
#[derive(Clone, Debug, PartialEq)]
pub struct ProvenKey {
    /// Key id: base64url of the first 16 bytes of the key's SHA-256.
    pub kid: String,
    /// The public key as registered (a JWK object).
    pub jwk: Map<String, Value>,
    /// The public key, unpadded base64url (the JWK's `x`).
    pub x: String,
}

/// Why a registered key is not taken as the sidecar's own.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum KeyRefusal {
    /// Not an Ed25519 JWK with a 32-byte `x`.
    #[error("the key is not an Ed25519 JWK")]
    NotEd25519,
    /// The kid is not the one derived from the key.
    #[error("kid {kid:?} is not the key's own ({derived:?})")]
    ForeignKid {
        /// The kid it was registered under.
        kid: String,
        /// The kid derived from the key.
        derived: String,
    },
    /// No proof that the sidecar holds the key.
    #[error(
        "no proof that the sidecar holds the key (a sidecar older than the controller: upgrade it)"
    )]
    NoProof,
    /// A proof that does not verify for this stream.
    #[error("the proof that the sidecar holds the key does not verify for this stream")]
    BadProof,
}

impl SigningKey {
    /// Checks that the key is the registering sidecar's own: an Ed25519 key,
    /// registered under the kid derived from it, with a proof that verifies
    /// over [`chaperone_wire::key_registration::key_registration_statement`]
    /// for the stream whose bearer token has the SHA-256 `token_sha256`.
    /// Without this a pod could register another pod's public key, or its
    /// own under another's kid, and so squat that kid.
    pub fn check_possession(&self, token_sha256: &[u8; 32]) -> Result<ProvenKey, KeyRefusal> {
        use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
        let public_key = chaperone_audit::ed25519_public_key(&Value::Object(self.jwk.clone()))
            .ok_or(KeyRefusal::NotEd25519)?;
        let derived = chaperone_audit::key_id(&public_key);
        if derived != self.kid {
            return Err(KeyRefusal::ForeignKid {
                kid: self.kid.clone(),
                derived,
            });
        }
        if self.proof.is_empty() {
            return Err(KeyRefusal::NoProof);
        }
        let statement =
            chaperone_wire::key_registration::key_registration_statement(&self.kid, token_sha256);
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&statement, &self.proof)
            .map_err(|_| KeyRefusal::BadProof)?;
        Ok(ProvenKey {
            kid: self.kid.clone(),
            jwk: self.jwk.clone(),
            x: self
                .jwk
                .get("x")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }
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
    /// An approval request that cannot be used (answered FAILED).
    #[error("approval request (ticket {ticket}): {error}")]
    ApprovalRequest {
        /// Its ticket.
        ticket: u64,
        /// What is wrong with it.
        error: InvalidApprovalRequest,
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
            Some(Message::Inventory(inventory)) => {
                Self::Inventory(inventory.tools.into_iter().map(reported_tool).collect())
            }
            Some(Message::Audit(batch)) => Self::Audit(AuditBatch {
                records: batch.records,
                dropped: batch.dropped,
            }),
            Some(Message::ApprovalRequest(request)) => {
                let ticket = request.ticket;
                Self::ApprovalRequest(Box::new(
                    ApprovalCall::check(request.into()).map_err(|error| {
                        InvalidSidecarMessage::ApprovalRequest { ticket, error }
                    })?,
                ))
            }
            Some(Message::ApprovalRelease(release)) => Self::ApprovalRelease(release.ticket),
            None => return Err(InvalidSidecarMessage::Unknown),
        })
    }
}

/// One tool of an inventory: its definition when the sidecar sent a
/// well-formed hash (none where the server's pinning is off, or from a
/// sidecar that predates pinning); a text over [`MAX_DEFINITION_BYTES`] is
/// dropped (the sidecar sends none that large).
fn reported_tool(tool: v1::DiscoveredTool) -> ((String, String), Option<ReportedDefinition>) {
    let definition = is_definition_hash(&tool.definition_hash).then(|| ReportedDefinition {
        json: (!tool.definition_json.is_empty()
            && tool.definition_json.len() <= MAX_DEFINITION_BYTES)
            .then(|| Arc::from(tool.definition_json)),
        hash: tool.definition_hash,
        seen_at: tool.definition_seen_at,
    });
    ((tool.server, tool.name), definition)
}

impl From<v1::ApprovalRequest> for RawApprovalRequest {
    fn from(request: v1::ApprovalRequest) -> Self {
        Self {
            ticket: request.ticket,
            policy_namespace: request.policy_namespace,
            policy: request.policy,
            rule: request.rule,
            server: request.server,
            tool: request.tool,
            arguments_json: request.arguments_json,
            redacted: request.redacted,
            args_digest: request.args_digest,
            scope: request.scope,
            scope_key: request.scope_key,
            initiator: request.initiator,
            chain: request
                .chain
                .into_iter()
                .map(|link| (link.agent, link.grant))
                .collect(),
            timeout_seconds: request.timeout_seconds,
            valid_for_seconds: request.valid_for_seconds,
        }
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
            Ok(Value::Object(jwk)) => Ok(Self {
                kid: key.kid,
                jwk,
                proof: key.proof,
            }),
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

/// An approval ticket's status.
pub fn approval_status_message(answer: &ApprovalAnswer) -> ControllerMessage {
    use v1::approval_status::Phase;
    let phase = match answer.phase {
        AnswerPhase::Pending => Phase::Pending,
        AnswerPhase::Granted => Phase::Granted,
        AnswerPhase::Denied => Phase::Denied,
        AnswerPhase::Expired => Phase::Expired,
        AnswerPhase::Failed => Phase::Failed,
    };
    ControllerMessage {
        message: Some(controller_message::Message::Approval(v1::ApprovalStatus {
            ticket: answer.ticket,
            name: answer.name.clone(),
            phase: phase.into(),
            reason: answer.reason.clone(),
            message: answer.message.clone(),
            decided_by: answer.decided_by.clone(),
            expires_at: answer.expires_at,
        })),
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
