//! Per-call identity assertions: compact JWS (EdDSA over Ed25519) minted for each
//! allowed `tools/call` and sent to the tool server in `Chaperone-Assertion`.
//!
//! The key pair is generated at start, parsed once, and never leaves the process;
//! its public half is registered with the controller ([`KeyRegistration`]), which
//! serves it in a JWKS. The JWS is written by hand: a JWT library would re-encode
//! the header and re-parse the key on every call. Assertions are signed with a
//! nonce made ahead of the call ([`crate::signing_nonces`]), or by aws-lc-rs the
//! RFC 8032 way when none is ready; either verifies with any Ed25519 verifier.
//! The same key signs the audit trail's checkpoints
//! ([`AssertionSigner::sign_detached`], always RFC 8032), so the JWKS that
//! verifies assertions also verifies audit logs.

use std::sync::Arc;

use aws_lc_rs::rand;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chaperone_policy::EffectSet;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::signing_nonces::Presigner;

/// What `argsAlg` says: `args` is SHA-256 of the RFC 8785 form of the
/// arguments.
pub use crate::canonical::ARGS_DIGEST_ALG;
/// The header carrying the assertion to the tool server.
pub use chaperone_wire::sidecar_env::ASSERTION_HEADER;

/// The claim naming how `args` was computed.
pub const ARGS_ALG_CLAIM: &str = "argsAlg";

/// The signing key could not be created.
#[derive(Debug, Error)]
#[error("could not generate the Ed25519 assertion key")]
pub struct KeyGenerationError;

/// What the controller needs to verify this sidecar's assertions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyRegistration {
    /// Key id: the `kid` of every assertion signed with this key (base64url of
    /// the first 16 bytes of the SHA-256 of the public key).
    pub kid: String,
    /// The raw 32-byte Ed25519 public key.
    #[serde(skip)]
    pub public_key: [u8; 32],
    /// The public key as a JWK (`kty` OKP, `crv` Ed25519).
    pub jwk: serde_json::Value,
}

/// One actor of a delegation chain, nested as RFC 8693 §4.1 `act` claims
/// (current actor outermost).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's identity (`chaperone:agent:<namespace>/<name>`).
    pub sub: String,
    /// The DelegationGrant (`namespace/name`) under which this actor holds the
    /// authority of the actor before it; absent for the chain's origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// The actor before it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The actors from the current one (outermost) to the origin.
    pub fn iter(&self) -> impl Iterator<Item = &Actor> {
        std::iter::successors(Some(self), |actor| actor.act.as_deref())
    }

    /// How many actors the chain holds.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Always false: a chain holds at least the current actor.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What the caller's session had done when it made the call: a delegated
/// session continues from it, so session conditions and the audit trail span
/// agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskContext {
    /// Effects the caller's session has seen.
    pub effects: EffectSet,
    /// Calls the caller's session has made, this one included.
    pub steps: u32,
    /// Hex SHA-256 of the caller's audit record of this call: the link from the
    /// callee's first audit record back to it.
    pub prev: String,
}

/// The claims of one assertion. Serialised in this order, with `argsAlg`
/// ([`ARGS_DIGEST_ALG`]) after `args`: how `args` was computed, so a tool
/// server knows to recompute it as SHA-256 of the RFC 8785 form of the call's
/// arguments ([`crate::canonical::args_digest`], the only digest this sidecar
/// makes).
#[derive(Clone, Debug)]
pub struct Claims<'a> {
    /// The agent's identity (`chaperone:agent:<namespace>/<name>`).
    pub iss: &'a str,
    /// The initiating principal (a user, or the chain's first agent).
    pub sub: &'a str,
    /// The delegation chain, current actor outermost; absent for own sessions.
    pub act: Option<&'a Actor>,
    /// The tool server's audience.
    pub aud: &'a str,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Unique id of this assertion.
    pub jti: &'a str,
    /// The Chaperone session id.
    pub sid: &'a str,
    /// The tool called.
    pub tool: &'a str,
    /// SHA-256 of the canonical arguments (`sha256:<hex>`), from
    /// [`crate::canonical::args_digest`].
    pub args: &'a str,
    /// The snapshot version that allowed the call.
    pub snap: u64,
    /// The caller's session so far.
    pub ctx: &'a TaskContext,
}

impl Serialize for Claims<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let fields = if self.act.is_some() { 13 } else { 12 };
        let mut claims = serializer.serialize_struct("Claims", fields)?;
        claims.serialize_field("iss", self.iss)?;
        claims.serialize_field("sub", self.sub)?;
        match self.act {
            Some(act) => claims.serialize_field("act", act)?,
            None => claims.skip_field("act")?,
        }
        claims.serialize_field("aud", self.aud)?;
        claims.serialize_field("exp", &self.exp)?;
        claims.serialize_field("iat", &self.iat)?;
        claims.serialize_field("jti", self.jti)?;
        claims.serialize_field("sid", self.sid)?;
        claims.serialize_field("tool", self.tool)?;
        claims.serialize_field("args", self.args)?;
        claims.serialize_field(ARGS_ALG_CLAIM, ARGS_DIGEST_ALG)?;
        claims.serialize_field("snap", &self.snap)?;
        claims.serialize_field("ctx", self.ctx)?;
        claims.end()
    }
}

/// Signs assertions (and audit checkpoints) with this sidecar's Ed25519 key.
/// Clones share the key.
#[derive(Clone)]
pub struct AssertionSigner {
    key_pair: Arc<Ed25519KeyPair>,
    /// Signs with nonces made ahead of the call; its thread stops with the
    /// last clone.
    presigner: Arc<Presigner>,
    /// Assertions signed the RFC 8032 way because no nonce was ready.
    signed_without_pooled_nonce: Counter,
    /// base64url of the JOSE header, with a trailing `.`.
    encoded_header: String,
    registration: KeyRegistration,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("kid", &self.registration.kid)
            .finish_non_exhaustive()
    }
}

impl AssertionSigner {
    /// Generates a fresh key pair and starts making signing nonces for it
    /// ([`crate::signing_nonces::DEFAULT_CAPACITY`] ahead).
    pub fn generate() -> Result<Self, KeyGenerationError> {
        Self::generate_with_nonces(crate::signing_nonces::DEFAULT_CAPACITY)
    }

    /// Generates a fresh key pair and keeps `nonces` signing nonces made
    /// ahead for it (0: every assertion is signed the RFC 8032 way).
    pub fn generate_with_nonces(nonces: usize) -> Result<Self, KeyGenerationError> {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed).map_err(|_| KeyGenerationError)?;
        let signer = Self::from_seed(&seed, nonces);
        zeroize::Zeroize::zeroize(&mut seed);
        signer
    }

    /// The signer of the key of `seed`, `nonces` signing nonces made ahead.
    fn from_seed(seed: &[u8; 32], nonces: usize) -> Result<Self, KeyGenerationError> {
        let key_pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| KeyGenerationError)?;
        let presigner = Presigner::start(seed, nonces).ok_or(KeyGenerationError)?;
        let public_key = presigner.public_key();
        if key_pair.public_key().as_ref() != public_key {
            return Err(KeyGenerationError);
        }
        let kid = chaperone_audit::key_id(&public_key);
        let x = URL_SAFE_NO_PAD.encode(public_key);
        let jwk = serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid, "x": x,
        });
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
        let mut encoded_header = URL_SAFE_NO_PAD.encode(header.to_string());
        encoded_header.push('.');
        Ok(Self {
            key_pair: Arc::new(key_pair),
            presigner: Arc::new(presigner),
            signed_without_pooled_nonce: Counter::default(),
            encoded_header,
            registration: KeyRegistration {
                kid,
                public_key,
                jwk,
            },
        })
    }

    /// Counts in `counter` the assertions signed without a pooled nonce
    /// (the pool was empty: just after start, or calls outpacing its thread).
    pub fn counting_unpooled_signatures(mut self, counter: Counter) -> Self {
        self.signed_without_pooled_nonce = counter;
        self
    }

    /// How many signing nonces are ready now (benchmarks and tests).
    pub fn nonces_ready(&self) -> usize {
        self.presigner.ready()
    }

    /// The public key and key id to register with the controller.
    pub fn registration(&self) -> &KeyRegistration {
        &self.registration
    }

    /// Mints the compact JWS of `claims`.
    pub fn sign(&self, claims: &Claims<'_>) -> String {
        // Serialising borrowed strings and integers cannot fail.
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut token = String::with_capacity(self.encoded_header.len() + payload.len() * 2 + 90);
        token.push_str(&self.encoded_header);
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let signature = match self.presigner.sign(token.as_bytes()) {
            Some(signature) => signature,
            None => {
                self.signed_without_pooled_nonce.inc();
                let mut signature = [0u8; 64];
                signature.copy_from_slice(self.key_pair.sign(token.as_bytes()).as_ref());
                signature
            }
        };
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        token
    }

    /// The Ed25519 signature of `bytes`, base64url without padding: a detached
    /// signature (audit checkpoints sign their canonical JSON with it). A JSON
    /// text starts with `{`, which no compact JWS signing input does, so the
    /// two uses cannot stand in for each other.
    pub fn sign_detached(&self, bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(self.key_pair.sign(bytes).as_ref())
    }

    /// The proof that this sidecar holds its key, for registering it on a
    /// stream authenticated by `bearer_token`: the signature of
    /// [`chaperone_wire::key_registration::key_registration_statement`] (which
    /// starts with a context line no JWS or JSON text starts with).
    pub fn registration_proof(&self, bearer_token: &str) -> Vec<u8> {
        let statement = chaperone_wire::key_registration::key_registration_statement(
            &self.registration.kid,
            &crate::canonical::sha256(bearer_token.as_bytes()),
        );
        self.key_pair.sign(&statement).as_ref().to_vec()
    }
}

/// A random 128-bit identifier as 32 lowercase hex digits, held inline (no
/// allocation): session ids, correlation ids, `jti`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HexId([u8; 32]);

impl HexId {
    /// 16 fresh bytes from the system RNG (drawn a block at a time per
    /// thread: [`RandomBlock`]).
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        if RANDOM_BLOCK
            .with_borrow_mut(|block| block.take(&mut bytes))
            .is_err()
        {
            // The system RNG failing is not recoverable in a meaningful way; fall
            // back to a time-derived id so ids stay unique within this process.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            bytes = nanos.to_le_bytes();
        }
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 32];
        for (pair, byte) in text.chunks_exact_mut(2).zip(bytes) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        Self(text)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for HexId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for HexId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HexId({})", self.as_str())
    }
}

/// Bytes from the system RNG drawn 512 at a time, for ids: each draw is a
/// DRBG generate with its own re-keying (≈ 2.3k instructions whatever its
/// length), and a call takes two ids (`jti`, correlation id). Bytes handed
/// out are erased from the block; none is handed out twice.
struct RandomBlock {
    bytes: [u8; 512],
    used: usize,
}

thread_local! {
    static RANDOM_BLOCK: std::cell::RefCell<RandomBlock> = const {
        std::cell::RefCell::new(RandomBlock { bytes: [0; 512], used: 512 })
    };
}

impl RandomBlock {
    /// Fills `out` (at most a block) with bytes not handed out before.
    fn take(&mut self, out: &mut [u8]) -> Result<(), aws_lc_rs::error::Unspecified> {
        if self.bytes.len() - self.used < out.len() {
            rand::fill(&mut self.bytes)?;
            self.used = 0;
        }
        let taken = &mut self.bytes[self.used..self.used + out.len()];
        out.copy_from_slice(taken);
        taken.fill(0);
        self.used += out.len();
        Ok(())
    }
}

/// A random identifier: 16 bytes from the system RNG, lowercase hex.
pub fn random_id() -> String {
    HexId::random().as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> TaskContext {
        TaskContext {
            effects: EffectSet::EMPTY,
            steps: 1,
            prev: "00".into(),
        }
    }

    /// Claims of an own call (no `act`), snapshot 3.
    fn claims(ctx: &TaskContext) -> Claims<'_> {
        Claims {
            iss: "chaperone:agent:ns/a",
            sub: "chaperone:agent:ns/a",
            act: None,
            aud: "http://tool",
            exp: 2_000_000_000,
            iat: 1_999_999_940,
            jti: "j",
            sid: "s",
            tool: "t",
            args: "sha256:00",
            snap: 3,
            ctx,
        }
    }

    #[test]
    fn signs_a_verifiable_compact_jws() {
        let signer = AssertionSigner::generate().unwrap();
        let ctx = context();
        let claims = claims(&ctx);
        let token = signer.sign(&claims);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let signed = format!("{}.{}", parts[0], parts[1]);
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            signer.registration().public_key,
        );
        public.verify(signed.as_bytes(), &signature).unwrap();
        let payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(payload["snap"], 3);
        assert_eq!(payload["argsAlg"], "sha256-rfc8785");
        assert!(payload.get("act").is_none());
        // The claims in their documented order, `argsAlg` after `args`.
        let names: Vec<&str> = {
            let text = std::str::from_utf8(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap())
                .unwrap()
                .to_owned();
            let mut at: Vec<(usize, &str)> = [
                "iss", "sub", "aud", "exp", "iat", "jti", "sid", "tool", "args", "argsAlg", "snap",
                "ctx",
            ]
            .into_iter()
            .map(|name| (text.find(&format!("\"{name}\":")).unwrap(), name))
            .collect();
            at.sort();
            at.into_iter().map(|(_, name)| name).collect()
        };
        assert_eq!(
            names,
            [
                "iss", "sub", "aud", "exp", "iat", "jti", "sid", "tool", "args", "argsAlg", "snap",
                "ctx"
            ]
        );
        assert_eq!(signer.registration().jwk["kid"], signer.registration().kid);
    }

    fn verify(signer: &AssertionSigner, token: &str) -> Vec<u8> {
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            signer.registration().public_key,
        )
        .verify(signed.as_bytes(), &signature)
        .expect("the assertion verifies with the registered key");
        signature
    }

    #[test]
    fn assertions_are_signed_with_pooled_nonces_and_without_when_none_is_ready() {
        let unpooled = Counter::default();
        let signer = AssertionSigner::generate()
            .unwrap()
            .counting_unpooled_signatures(unpooled.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !signer.presigner.filled_once() {
            assert!(
                std::time::Instant::now() < deadline,
                "the pool never filled"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let ctx = context();
        let claims = claims(&ctx);
        let first = signer.sign(&claims);
        let second = signer.sign(&claims);
        assert_eq!(unpooled.get(), 0);
        // Pooled nonces: the same claims sign differently, and both verify.
        assert_ne!(verify(&signer, &first), verify(&signer, &second));

        // With no nonce ready, the key signs the RFC 8032 way (the same
        // signature for the same claims) and the fallback is counted.
        let empty = AssertionSigner::generate_with_nonces(0)
            .unwrap()
            .counting_unpooled_signatures(unpooled.clone());
        let first = empty.sign(&claims);
        assert_eq!(verify(&empty, &first), verify(&empty, &empty.sign(&claims)));
        assert_eq!(unpooled.get(), 2);
    }

    #[test]
    fn detached_signatures_verify_with_the_registered_key() {
        let signer = AssertionSigner::generate().unwrap();
        let signature = URL_SAFE_NO_PAD
            .decode(signer.clone().sign_detached(b"{\"kind\":\"checkpoint\"}"))
            .unwrap();
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            signer.registration().public_key,
        );
        public
            .verify(b"{\"kind\":\"checkpoint\"}", &signature)
            .unwrap();
        assert!(public.verify(b"{}", &signature).is_err());
    }

    #[test]
    fn the_registration_proof_signs_the_statement_for_this_token() {
        let signer = AssertionSigner::generate().unwrap();
        let proof = signer.registration_proof("token-a");
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            signer.registration().public_key,
        );
        let statement = |token: &str| {
            chaperone_wire::key_registration::key_registration_statement(
                &signer.registration().kid,
                &crate::canonical::sha256(token.as_bytes()),
            )
        };
        public.verify(&statement("token-a"), &proof).unwrap();
        assert!(public.verify(&statement("token-b"), &proof).is_err());
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_id(), random_id());
        assert_eq!(random_id().len(), 32);
        // Across many refills of the block, and on other threads.
        let mut seen: std::collections::HashSet<HexId> =
            (0..2_000).map(|_| HexId::random()).collect();
        let others = std::thread::spawn(|| (0..2_000).map(|_| HexId::random()).collect::<Vec<_>>());
        seen.extend(others.join().unwrap());
        assert_eq!(seen.len(), 4_000);
        let id = HexId::random();
        assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id.to_string().len(), 32);
    }
}
