//! Verification of the assertions other sidecars send (the inbound side of
//! delegation, and tool-mode sidecars in front of tool servers).
//!
//! Decision order, first failure wins (each has its own [`AssertionRefused`]):
//! 1. three base64url parts; the header says `alg: EdDSA` and names a `kid`;
//! 2. the `kid` is a live sidecar's key in the JWKS the controller sent, an
//!    Ed25519 JWK that names its agent (`chaperone.dev/agent`);
//! 3. the signature verifies;
//! 4. the claims parse; `argsAlg`, if present, is `sha256-rfc8785` (the
//!    digest the caller of [`verify_assertion`] recomputes and compares with
//!    `args`; an assertion without it is from a sidecar that computed `args`
//!    before the claim existed); `iss` is the key's agent (a sidecar cannot
//!    speak for another agent);
//! 5. `aud` is one this side accepts;
//! 6. not expired, not issued in the future, lifetime within the maximum (a few
//!    seconds of clock skew allowed);
//! 7. the `act` chain, if any, names `iss` as its current actor and is no deeper
//!    than delegation allows;
//! 8. `jti` not seen before (a replay cache bounded per issuing agent;
//!    entries leave when their assertion expires). An agent whose share is
//!    full of unexpired assertions has its new ones refused until some expire;
//!    other agents' shares are untouched.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};

use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chaperone_policy::model::{MAX_ASSERTION_LIFETIME_SECONDS, MAX_DELEGATION_DEPTH};
use serde::Deserialize;
use thiserror::Error;

use crate::assertion::{ARGS_DIGEST_ALG, Actor, TaskContext};
use crate::peer_keys::PeerKeys;
use crate::snapshot::AGENT_ISSUER_PREFIX;

/// Clock skew tolerated between nodes, seconds.
pub const CLOCK_SKEW_SECONDS: i64 = 5;
/// JWK member naming the agent (`namespace/name`) a key belongs to.
pub const JWK_AGENT_MEMBER: &str = "chaperone.dev/agent";

/// Why an assertion was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AssertionRefused {
    /// Not a compact JWS with a readable header.
    #[error("assertion is malformed: {0}")]
    Malformed(&'static str),
    /// The header's algorithm is not EdDSA.
    #[error("assertion algorithm {0:?} is not accepted (EdDSA only)")]
    Algorithm(String),
    /// No live sidecar holds this key.
    #[error("assertion key {0:?} is not a live sidecar's key")]
    UnknownKey(String),
    /// The JWK is not a usable Ed25519 key naming its agent.
    #[error("key {0:?} in the JWKS is not an Ed25519 key of an agent")]
    UnusableKey(String),
    /// The signature does not verify.
    #[error("assertion signature does not verify")]
    BadSignature,
    /// The claims are not an assertion's.
    #[error("assertion claims are malformed: {0}")]
    Claims(String),
    /// `args` was computed some other way than this side recomputes it.
    #[error(
        "assertion argsAlg {0:?} is not accepted: only \"sha256-rfc8785\" (SHA-256 of the RFC 8785 form of the arguments) is recomputed here"
    )]
    ArgsAlgorithm(String),
    /// `iss` is not the agent the key belongs to.
    #[error("assertion issuer {iss:?} is not the key's agent {key_agent:?}")]
    IssuerMismatch {
        /// The claimed issuer.
        iss: String,
        /// The agent the key belongs to.
        key_agent: String,
    },
    /// `aud` is not addressed to this side.
    #[error("assertion audience {0:?} is not this endpoint's")]
    WrongAudience(String),
    /// Expired.
    #[error("assertion expired at {0} (unix seconds)")]
    Expired(i64),
    /// Issued in the future, or valid for longer than the maximum lifetime.
    #[error("assertion validity is out of bounds (iat {iat}, exp {exp})")]
    BadValidity {
        /// Issued at.
        iat: i64,
        /// Expiry.
        exp: i64,
    },
    /// The `act` chain does not name the issuer as the current actor.
    #[error("assertion actor chain does not start with its issuer")]
    ActorMismatch,
    /// The chain is deeper than any grant allows.
    #[error("assertion chain of {0} actors is deeper than delegation allows")]
    ChainTooDeep(usize),
    /// The `jti` was seen before.
    #[error("assertion {0:?} was already used (replay)")]
    Replayed(String),
    /// The issuer's share of the replay cache is full of unexpired
    /// assertions.
    #[error(
        "replay cache share of issuer {issuer:?} is full ({capacity} unexpired assertions); its new assertions are refused until some expire"
    )]
    ReplayShareFull {
        /// The issuing agent.
        issuer: String,
        /// The share's size.
        capacity: usize,
    },
}

/// The claims of a verified assertion.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct VerifiedAssertion {
    /// The calling agent's identity.
    pub iss: String,
    /// The task's initiator.
    pub sub: String,
    /// The delegation chain, current actor outermost.
    #[serde(default)]
    pub act: Option<Actor>,
    /// The audience.
    pub aud: String,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Unique id.
    pub jti: String,
    /// The caller's Chaperone session.
    pub sid: String,
    /// The tool called.
    pub tool: String,
    /// SHA-256 of the canonical arguments.
    pub args: String,
    /// How `args` was computed: [`ARGS_DIGEST_ALG`], or absent (the same).
    #[serde(default, rename = "argsAlg")]
    pub args_alg: Option<String>,
    /// The caller's snapshot version.
    pub snap: u64,
    /// The caller's session so far.
    #[serde(default)]
    pub ctx: Option<TaskContext>,
}

impl VerifiedAssertion {
    /// The calling agent as `namespace/name`.
    pub fn caller(&self) -> &str {
        self.iss
            .strip_prefix(AGENT_ISSUER_PREFIX)
            .unwrap_or(&self.iss)
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// Seconds between sweeps of every share (shares of agents that stopped
/// calling are emptied by them).
const REPLAY_SWEEP_SECONDS: i64 = 60;

/// The ids one issuer's accepted assertions used, until they expire.
#[derive(Debug, Default)]
struct IssuerShare {
    /// `jti` → `exp`.
    seen: HashMap<Arc<str>, i64>,
    /// (`exp`, `jti`), soonest expiry first.
    expiries: BinaryHeap<Reverse<(i64, Arc<str>)>>,
}

impl IssuerShare {
    /// Forgets the ids whose assertions can no longer be presented.
    fn forget_expired(&mut self, now: i64) {
        while let Some(Reverse((exp, _))) = self.expiries.peek() {
            if *exp + CLOCK_SKEW_SECONDS >= now {
                break;
            }
            if let Some(Reverse((exp, jti))) = self.expiries.pop()
                && self.seen.get(&jti) == Some(&exp)
            {
                self.seen.remove(&jti);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Shares {
    by_issuer: HashMap<String, IssuerShare>,
    next_sweep: i64,
}

/// Remembers the `jti`s of accepted assertions until they expire, in one
/// bounded share per issuing agent: an agent that fills its share (any holder
/// of a live sidecar key can mint assertions) has its own new assertions
/// refused, never another agent's. Memory stays within the share size times
/// the agents whose keys this side accepts.
#[derive(Debug)]
pub struct ReplayCache {
    shares: Mutex<Shares>,
    per_issuer: usize,
}

impl ReplayCache {
    /// A cache holding at most `per_issuer` unexpired ids of each issuer.
    pub fn new(per_issuer: usize) -> Self {
        Self {
            shares: Mutex::new(Shares::default()),
            per_issuer: per_issuer.max(1),
        }
    }

    fn shares(&self) -> std::sync::MutexGuard<'_, Shares> {
        self.shares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `issuer`'s `jti` (valid until `exp`); refuses one seen before,
    /// and any new one while `issuer`'s share is full of unexpired ids.
    pub fn check_and_record(
        &self,
        issuer: &str,
        jti: &str,
        exp: i64,
        now: i64,
    ) -> Result<(), AssertionRefused> {
        let mut shares = self.shares();
        if now >= shares.next_sweep {
            shares.next_sweep = now + REPLAY_SWEEP_SECONDS;
            shares.by_issuer.retain(|_, share| {
                share.forget_expired(now);
                !share.seen.is_empty()
            });
        }
        if !shares.by_issuer.contains_key(issuer) {
            shares
                .by_issuer
                .insert(issuer.to_owned(), IssuerShare::default());
        }
        let Some(share) = shares.by_issuer.get_mut(issuer) else {
            return Err(AssertionRefused::Replayed(jti.to_owned()));
        };
        share.forget_expired(now);
        if share.seen.contains_key(jti) {
            return Err(AssertionRefused::Replayed(jti.to_owned()));
        }
        if share.seen.len() >= self.per_issuer {
            return Err(AssertionRefused::ReplayShareFull {
                issuer: issuer.to_owned(),
                capacity: self.per_issuer,
            });
        }
        let jti: Arc<str> = Arc::from(jti);
        share.seen.insert(Arc::clone(&jti), exp);
        share.expiries.push(Reverse((exp, jti)));
        Ok(())
    }

    /// Ids held now, of every issuer.
    pub fn len(&self) -> usize {
        self.shares()
            .by_issuer
            .values()
            .map(|share| share.seen.len())
            .sum()
    }

    /// Ids held now of `issuer`.
    pub fn held_by(&self, issuer: &str) -> usize {
        self.shares()
            .by_issuer
            .get(issuer)
            .map_or(0, |share| share.seen.len())
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verifies `token` against `keys` for one of `audiences` at `now` (unix
/// seconds), in the order of the module docs; records its `jti` in `replay`.
pub fn verify_assertion(
    token: &str,
    keys: &PeerKeys,
    audiences: &[String],
    replay: &ReplayCache,
    now: i64,
) -> Result<VerifiedAssertion, AssertionRefused> {
    let token = token.trim();
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AssertionRefused::Malformed("not a compact JWS"));
    };
    let signed = &token.as_bytes()[..header.len() + 1 + payload.len()];
    let header: Header = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(AssertionRefused::Malformed("unreadable header"))?;
    if header.alg != "EdDSA" {
        return Err(AssertionRefused::Algorithm(header.alg));
    }
    let kid = header
        .kid
        .ok_or(AssertionRefused::Malformed("header names no kid"))?;
    let jwk = keys
        .get(&kid)
        .ok_or_else(|| AssertionRefused::UnknownKey(kid.clone()))?;
    let unusable = || AssertionRefused::UnusableKey(kid.clone());
    if jwk.get("kty").and_then(|v| v.as_str()) != Some("OKP")
        || jwk.get("crv").and_then(|v| v.as_str()) != Some("Ed25519")
    {
        return Err(unusable());
    }
    let public = jwk
        .get("x")
        .and_then(|v| v.as_str())
        .and_then(|x| URL_SAFE_NO_PAD.decode(x).ok())
        .filter(|x| x.len() == 32)
        .ok_or_else(unusable)?;
    let key_agent = jwk
        .get(JWK_AGENT_MEMBER)
        .and_then(|v| v.as_str())
        .ok_or_else(unusable)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| AssertionRefused::Malformed("unreadable signature"))?;
    UnparsedPublicKey::new(&ED25519, &public)
        .verify(signed, &signature)
        .map_err(|_| AssertionRefused::BadSignature)?;
    let claims: VerifiedAssertion = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| AssertionRefused::Claims("payload is not base64url".to_owned()))
        .and_then(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| AssertionRefused::Claims(e.to_string()))
        })?;
    if let Some(alg) = claims.args_alg.as_deref()
        && alg != ARGS_DIGEST_ALG
    {
        return Err(AssertionRefused::ArgsAlgorithm(alg.to_owned()));
    }
    if claims.iss.strip_prefix(AGENT_ISSUER_PREFIX) != Some(key_agent) {
        return Err(AssertionRefused::IssuerMismatch {
            iss: claims.iss,
            key_agent: key_agent.to_owned(),
        });
    }
    if !audiences.contains(&claims.aud) {
        return Err(AssertionRefused::WrongAudience(claims.aud));
    }
    if now >= claims.exp + CLOCK_SKEW_SECONDS {
        return Err(AssertionRefused::Expired(claims.exp));
    }
    if claims.iat > now + CLOCK_SKEW_SECONDS
        || claims.exp < claims.iat
        || claims.exp - claims.iat > i64::from(MAX_ASSERTION_LIFETIME_SECONDS)
    {
        return Err(AssertionRefused::BadValidity {
            iat: claims.iat,
            exp: claims.exp,
        });
    }
    if let Some(act) = &claims.act {
        if act.sub != claims.iss {
            return Err(AssertionRefused::ActorMismatch);
        }
        let depth = act.len();
        if depth > MAX_DELEGATION_DEPTH as usize + 1 {
            return Err(AssertionRefused::ChainTooDeep(depth));
        }
    }
    replay.check_and_record(&claims.iss, &claims.jti, claims.exp, now)?;
    Ok(claims)
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
