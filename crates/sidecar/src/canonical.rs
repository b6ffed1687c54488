//! Canonical JSON (RFC 8785) and SHA-256 digests of it: re-exported from
//! [`chaperone_audit`], where the audit chain and its verification live.

pub use chaperone_audit::{ARGS_DIGEST_ALG, args_digest, canonical, hex, sha256, write_canonical};
