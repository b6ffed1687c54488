//! What a sidecar signs to prove that it holds the key it registers
//! (`SigningKey.proof`).
//!
//! A public key is public: without a proof, a pod could register another
//! pod's key as its own and so squat its `kid` in the controller's JWKS and
//! in the audit-key archive. The statement binds the key's id to the stream's
//! bearer token (its SHA-256), which the controller has authenticated as the
//! registering pod: a proof made for one pod's stream is worth nothing on
//! another's, and only the holder of the private key can make one.

/// The statement's first line: names the purpose and its version, so the
/// signature can never be mistaken for a signature of anything else the key
/// signs (assertions are JWS, checkpoints are canonical JSON: neither starts
/// with this).
pub const KEY_REGISTRATION_CONTEXT: &[u8] = b"chaperone key registration v1\n";

/// The bytes a sidecar signs with its key `kid` on a stream whose bearer
/// token has the SHA-256 `token_sha256`: the context line, the kid and a
/// newline, then the 32 bytes of the token's digest.
pub fn key_registration_statement(kid: &str, token_sha256: &[u8; 32]) -> Vec<u8> {
    let mut statement =
        Vec::with_capacity(KEY_REGISTRATION_CONTEXT.len() + kid.len() + 1 + token_sha256.len());
    statement.extend_from_slice(KEY_REGISTRATION_CONTEXT);
    statement.extend_from_slice(kid.as_bytes());
    statement.push(b'\n');
    statement.extend_from_slice(token_sha256);
    statement
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_names_the_purpose_the_kid_and_the_token() {
        let statement = key_registration_statement("k1", &[7; 32]);
        assert!(statement.starts_with(b"chaperone key registration v1\nk1\n"));
        assert_eq!(&statement[statement.len() - 32..], &[7; 32]);
        // Another kid or token is another statement.
        assert_ne!(statement, key_registration_statement("k2", &[7; 32]));
        assert_ne!(statement, key_registration_statement("k1", &[8; 32]));
    }
}
