//! Chaperone's audit trail core: the canonical JSON and SHA-256 digests that
//! argument digests and audit hash chains are built on, and the verification of
//! audit logs. Pure: no I/O, no async. The sidecar writes records with it and
//! `chaperonectl audit verify` checks them with it.
//!
//! - [`canonical`], [`sha256`], [`hex`], [`args_digest`]: canonical JSON (RFC
//!   8785, the JSON Canonicalization Scheme) and digests of it;
//!   [`ARGS_DIGEST_ALG`] names the argument digest in assertions.
//! - [`record_hash`]: the hash the next record of a session carries in `prev`,
//!   and the next record of its sidecar in `prevSeq`;
//!   [`checkpoint_signing_input`]: what a checkpoint's signature signs.
//! - [`verify_log`] / [`verify_log_with`] / [`verify_log_signed`]: check a log
//!   holding the records of one or several sidecars (and sessions),
//!   interleaved: each sidecar's sequence and signed checkpoints (with
//!   [`SidecarKeys`] from a JWKS), each session's hash chain.

#![forbid(unsafe_code)]

mod canonical;
mod keys;
mod verify;

pub use canonical::{
    ARGS_DIGEST_ALG, TOOL_DEFINITION_MEMBERS, args_digest, canonical, hex, sha256, tool_definition,
    tool_definition_hash, write_canonical,
};
pub use keys::{JwksError, SidecarKeys, ed25519_public_key, key_id};
pub use verify::{
    CHECKPOINT_KIND, ExternalLink, Malformed, NoKey, SidecarTrail, VerifyError, VerifyOptions,
    VerifySummary, checkpoint_signing_input, record_hash, verify_log, verify_log_signed,
    verify_log_with,
};
