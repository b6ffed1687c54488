//! Chaperone's audit trail core: the canonical JSON and SHA-256 digests that
//! argument digests and audit hash chains are built on, and the verification of
//! audit logs. Pure: no I/O, no async. The sidecar writes records with it and
//! `chaperonectl audit verify` checks them with it.
//!
//! - [`canonical`], [`sha256`], [`hex`], [`args_digest`]: canonical JSON (sorted
//!   keys, no whitespace) and digests of it.
//! - [`record_hash`]: the hash the next record of a chain carries in `prev`.
//! - [`verify_log`] / [`verify_log_with`]: check the hash chains of a log holding
//!   the records of one or several sessions (and agents), interleaved.

#![forbid(unsafe_code)]

mod canonical;
mod verify;

pub use canonical::{args_digest, canonical, hex, sha256, write_canonical};
pub use verify::{
    ExternalLink, Malformed, VerifyError, VerifyOptions, VerifySummary, record_hash, verify_log,
    verify_log_with,
};
