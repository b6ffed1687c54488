//! The public keys that checkpoint signatures are verified with: sidecars'
//! Ed25519 keys by `kid`, read from a JWKS (what the controller serves at
//! `/.well-known/jwks.json`, and what each sidecar registers). Pure: the JWKS
//! is handed in as bytes; fetching it is the caller's business.

use std::collections::BTreeMap;

use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use thiserror::Error;

/// A JWKS that cannot be used.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum JwksError {
    /// Not strict JSON.
    #[error("the JWKS is not valid JSON: {0}")]
    Json(#[from] chaperone_json::JsonError),
    /// No `keys` array.
    #[error("the JWKS has no `keys` array")]
    NoKeys,
    /// An Ed25519 key without a `kid`, or whose `x` is not 32 bytes of base64url.
    #[error("JWKS key {index}: {what}")]
    BadKey {
        /// 0-based position in `keys`.
        index: usize,
        /// What is wrong with it.
        what: &'static str,
    },
    /// Two keys share a `kid` but differ, or name different pods.
    #[error("JWKS key {index}: kid {kid:?} is also another key's or another pod's")]
    ConflictingKid {
        /// 0-based position in `keys`.
        index: usize,
        /// The shared key id.
        kid: String,
    },
}

/// The key id a Chaperone sidecar gives its Ed25519 public key: base64url
/// (unpadded) of the first 16 bytes of the key's SHA-256. Derived from the
/// key, so one kid names one key: the controller archives only keys whose kid
/// is this.
pub fn key_id(public_key: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(&crate::sha256(public_key)[..16])
}

/// The public key of an Ed25519 JWK (`kty` OKP, `crv` Ed25519, `x` 32 bytes
/// of unpadded base64url); `None` for any other JWK.
pub fn ed25519_public_key(jwk: &Value) -> Option<[u8; 32]> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
        return None;
    }
    URL_SAFE_NO_PAD
        .decode(field("x")?)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
}

/// One sidecar's public key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SidecarKey {
    public_key: [u8; 32],
    /// `chaperone.dev/pod` of the JWK (`namespace/pod`), when it names one.
    pod: Option<String>,
}

/// Sidecars' Ed25519 public keys by `kid`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarKeys {
    keys: BTreeMap<String, SidecarKey>,
}

impl SidecarKeys {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// The Ed25519 keys (`kty` OKP, `crv` Ed25519) of a JWKS; other keys are
    /// left out. Repeating a key is fine, a `kid` naming two keys (or one key
    /// of two pods) is not.
    pub fn from_jwks(bytes: &[u8]) -> Result<Self, JwksError> {
        let mut keys = Self::new();
        keys.add_jwks(bytes)?;
        Ok(keys)
    }

    /// Adds the Ed25519 keys of another JWKS (see [`SidecarKeys::from_jwks`]).
    pub fn add_jwks(&mut self, bytes: &[u8]) -> Result<(), JwksError> {
        let jwks = chaperone_json::parse(bytes, chaperone_json::Limits::default())?;
        let entries = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NoKeys)?;
        for (index, jwk) in entries.iter().enumerate() {
            let field = |name: &str| jwk.get(name).and_then(Value::as_str);
            if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
                continue;
            }
            let bad = |what| JwksError::BadKey { index, what };
            let kid = field("kid").ok_or_else(|| bad("no `kid`"))?;
            field("x").ok_or_else(|| bad("no `x`"))?;
            let public_key = ed25519_public_key(jwk)
                .ok_or_else(|| bad("`x` is not a base64url Ed25519 public key (32 bytes)"))?;
            let key = SidecarKey {
                public_key,
                pod: field("chaperone.dev/pod").map(str::to_owned),
            };
            match self.keys.get(kid) {
                Some(known)
                    if known.public_key != public_key
                        || (known.pod.is_some() && key.pod.is_some() && known.pod != key.pod) =>
                {
                    return Err(JwksError::ConflictingKid {
                        index,
                        kid: kid.to_owned(),
                    });
                }
                Some(_) => {}
                None => {
                    self.keys.insert(kid.to_owned(), key);
                }
            }
        }
        Ok(())
    }

    /// Adds one key (tests, and callers that hold the raw key).
    pub fn insert(&mut self, kid: impl Into<String>, public_key: [u8; 32]) {
        self.keys.insert(
            kid.into(),
            SidecarKey {
                public_key,
                pod: None,
            },
        );
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `kid` has a key.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The pod the JWKS names for `kid` (`chaperone.dev/pod`), if any.
    pub fn pod_of(&self, kid: &str) -> Option<&str> {
        self.keys.get(kid).and_then(|key| key.pod.as_deref())
    }

    /// Whether `signature` is `kid`'s Ed25519 signature of `message`; `None`
    /// when there is no key for `kid`.
    pub fn verify(&self, kid: &str, message: &[u8], signature: &[u8]) -> Option<bool> {
        let key = self.keys.get(kid)?;
        let public = UnparsedPublicKey::new(&ED25519, key.public_key);
        Some(public.verify(message, signature).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};

    use super::*;

    fn jwk(kid: &str, key: &Ed25519KeyPair) -> Value {
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref()),
            "chaperone.dev/pod": "ns/p-0",
        })
    }

    #[test]
    fn reads_ed25519_keys_and_verifies_with_them() {
        let key = Ed25519KeyPair::generate().unwrap();
        let jwks = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"},
            jwk("k1", &key),
        ]});
        let keys = SidecarKeys::from_jwks(jwks.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.pod_of("k1"), Some("ns/p-0"));
        let signature = key.sign(b"hello");
        assert_eq!(keys.verify("k1", b"hello", signature.as_ref()), Some(true));
        assert_eq!(keys.verify("k1", b"hullo", signature.as_ref()), Some(false));
        assert_eq!(keys.verify("k2", b"hello", signature.as_ref()), None);
    }

    #[test]
    fn refuses_broken_and_conflicting_keys() {
        assert_eq!(SidecarKeys::from_jwks(b"{}"), Err(JwksError::NoKeys));
        assert!(matches!(
            SidecarKeys::from_jwks(br#"{"keys":[],"keys":[]}"#),
            Err(JwksError::Json(_))
        ));
        let short = br#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"AAAA"}]}"#;
        assert!(matches!(
            SidecarKeys::from_jwks(short),
            Err(JwksError::BadKey { index: 0, .. })
        ));
        let (a, b) = (
            Ed25519KeyPair::generate().unwrap(),
            Ed25519KeyPair::generate().unwrap(),
        );
        let mut keys = SidecarKeys::from_jwks(
            serde_json::json!({"keys": [jwk("k", &a)]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let same = serde_json::json!({"keys": [jwk("k", &a)]}).to_string();
        assert!(keys.add_jwks(same.as_bytes()).is_ok());
        let other = serde_json::json!({"keys": [jwk("k", &b)]}).to_string();
        assert!(matches!(
            keys.add_jwks(other.as_bytes()),
            Err(JwksError::ConflictingKid { index: 0, .. })
        ));
        // The same key claimed by another pod: which pod signed is ambiguous.
        let mut claimed = jwk("k", &a);
        claimed["chaperone.dev/pod"] = "ns/p-1".into();
        let claimed = serde_json::json!({"keys": [claimed]}).to_string();
        assert!(matches!(
            keys.add_jwks(claimed.as_bytes()),
            Err(JwksError::ConflictingKid { index: 0, .. })
        ));
    }

    #[test]
    fn a_key_id_is_derived_from_its_key() {
        let key = Ed25519KeyPair::generate().unwrap();
        let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
        let kid = key_id(&public);
        assert_eq!(kid.len(), 22, "16 bytes, unpadded base64url");
        assert_eq!(kid, URL_SAFE_NO_PAD.encode(&crate::sha256(&public)[..16]));
        assert_eq!(ed25519_public_key(&jwk(&kid, &key)), Some(public));
        let mut rsa = jwk(&kid, &key);
        rsa["kty"] = "RSA".into();
        assert_eq!(ed25519_public_key(&rsa), None);
    }
}
