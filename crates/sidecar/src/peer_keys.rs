//! The public keys of the live sidecars that may call this one (a JWKS the
//! controller sends in each snapshot update and in `KeySet` updates: the
//! sidecars of agents listing this agent as an `agent:` tool server, or every
//! agent sidecar for a tool-mode sidecar), kept so that inbound delegated calls
//! can have their assertions verified. Parsed at the edge into
//! [`PeerKeys`]; a JWKS that does not parse is refused with [`InvalidJwks`] and the
//! previous key set stays.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use thiserror::Error;
use tokio::sync::watch;

/// A JWKS that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidJwks {
    /// Not JSON.
    #[error("JWKS is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not `{"keys": [...]}`.
    #[error("JWKS has no \"keys\" array")]
    NoKeys,
    /// A key is not an object with a string `kid`.
    #[error("JWKS key #{0} is not a JSON object with a \"kid\"")]
    KeyWithoutKid(usize),
}

/// Public keys by `kid`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerKeys {
    keys: BTreeMap<String, Value>,
}

impl PeerKeys {
    /// Parses a JWKS (`{"keys": [{"kid": …, …}, …]}`).
    pub fn from_json(jwks: &str) -> Result<Self, InvalidJwks> {
        let value: Value =
            serde_json::from_str(jwks).map_err(|e| InvalidJwks::NotJson(e.to_string()))?;
        let keys = value
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(InvalidJwks::NoKeys)?;
        let mut by_kid = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            let kid = key
                .as_object()
                .and_then(|o| o.get("kid"))
                .and_then(Value::as_str)
                .filter(|kid| !kid.is_empty())
                .ok_or(InvalidJwks::KeyWithoutKid(i))?;
            by_kid.insert(kid.to_owned(), key.clone());
        }
        Ok(Self { keys: by_kid })
    }

    /// The JWK with key id `kid`.
    pub fn get(&self, kid: &str) -> Option<&Value> {
        self.keys.get(kid)
    }

    /// The key ids.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The latest [`PeerKeys`], shared between the stream that writes it and the
/// verifiers that read it.
#[derive(Debug)]
pub struct PeerKeyStore {
    keys: watch::Sender<Arc<PeerKeys>>,
    loaded: AtomicBool,
}

impl Default for PeerKeyStore {
    fn default() -> Self {
        Self {
            keys: watch::Sender::new(Arc::new(PeerKeys::default())),
            loaded: AtomicBool::new(false),
        }
    }
}

impl PeerKeyStore {
    /// Replaces the key set (subscribers are woken only if it changed).
    pub fn replace(&self, keys: PeerKeys) {
        self.loaded.store(true, Ordering::Release);
        self.keys.send_if_modified(|current| {
            if **current == keys {
                return false;
            }
            *current = Arc::new(keys);
            true
        });
    }

    /// Whether a key set was ever received.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The key set now.
    pub fn current(&self) -> Arc<PeerKeys> {
        Arc::clone(&self.keys.borrow())
    }

    /// A receiver marked changed whenever the key set changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PeerKeys>> {
        self.keys.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_by_kid() {
        let keys = PeerKeys::from_json(
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"abc","kid":"k1"},{"kid":"k2"}]}"#,
        )
        .unwrap();
        assert_eq!(keys.kids().collect::<Vec<_>>(), ["k1", "k2"]);
        assert_eq!(keys.get("k1").unwrap()["x"], "abc");
        assert!(PeerKeys::from_json(r#"{"keys":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn refuses_what_is_not_a_jwks() {
        assert!(matches!(
            PeerKeys::from_json("{"),
            Err(InvalidJwks::NotJson(_))
        ));
        assert_eq!(PeerKeys::from_json("{}"), Err(InvalidJwks::NoKeys));
        assert_eq!(
            PeerKeys::from_json(r#"{"keys":[{"kid":"a"},{"x":"no kid"}]}"#),
            Err(InvalidJwks::KeyWithoutKid(1))
        );
    }

    #[test]
    fn store_wakes_subscribers_only_on_change() {
        let store = PeerKeyStore::default();
        let mut rx = store.subscribe();
        let keys = PeerKeys::from_json(r#"{"keys":[{"kid":"a"}]}"#).unwrap();
        store.replace(keys.clone());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        store.replace(keys);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(store.current().len(), 1);
    }
}
