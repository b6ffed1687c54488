//! Initiator tokens: a bearer token of a trusted issuer (the AgentIdentity's
//! `spec.initiators`) arriving at an agent's inbound side names the user who
//! initiated the task.
//!
//! Order: the token's `iss` (read before verification only to pick the issuer)
//! must be a trusted issuer; the header's algorithm must be asymmetric; the
//! `kid` must be in that issuer's JWKS (inline, or fetched from its URL, cached
//! and refetched at most every [`JWKS_REFETCH_INTERVAL`] when a key is
//! unknown); the signature, `exp` and `aud` must verify; `nbf` and `iat`, when
//! present, must not lie in the future (beyond [`INITIATOR_CLOCK_SKEW_SECONDS`]);
//! the token's lifetime (`exp - iat`, or `exp - now` without `iat`) must not
//! exceed the sidecar's maximum; the user claim must be a non-empty string.
//! Any failure refuses the request, naming its reason: an invalid initiator
//! token is never ignored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use chaperone_policy::model::InitiatorIssuer;
use http_body_util::{BodyExt, Full, Limited};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use thiserror::Error;

use crate::client::UpstreamClient;
use crate::snapshot::AGENT_ISSUER_PREFIX;
use crate::verify::CLOCK_SKEW_SECONDS;

/// Shortest time between two fetches of one JWKS URL.
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Clock skew tolerated between an initiator issuer and this node for `nbf`
/// and `iat`, seconds (`exp` keeps the sidecars' own, smaller skew).
pub const INITIATOR_CLOCK_SKEW_SECONDS: i64 = 30;
/// Longest lifetime of an initiator token unless the sidecar is told
/// otherwise ([`crate::settings::ENV_INITIATOR_MAX_TOKEN_LIFETIME_SECONDS`]).
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Why an initiator token was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InitiatorRefused {
    /// Not a JWT.
    #[error("initiator token is malformed: {0}")]
    Malformed(&'static str),
    /// `iss` is not one of the agent's trusted initiator issuers.
    #[error("initiator token issuer {0:?} is not trusted by this agent")]
    UntrustedIssuer(String),
    /// A symmetric or unknown algorithm.
    #[error("initiator token algorithm {0} is not accepted")]
    Algorithm(String),
    /// The issuer's keys could not be had.
    #[error("keys of initiator issuer {issuer:?} unavailable: {reason}")]
    KeysUnavailable {
        /// The issuer.
        issuer: String,
        /// Why.
        reason: String,
    },
    /// No key of the issuer has the token's `kid`.
    #[error("initiator token key {0:?} is not in the issuer's JWKS")]
    UnknownKey(String),
    /// Signature, expiry, audience or issuer did not verify.
    #[error("initiator token does not verify: {0}")]
    Invalid(String),
    /// `nbf` lies in the future.
    #[error("initiator token is not valid yet (nbf {nbf}, now {now}, unix seconds)")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// This node's time.
        now: i64,
    },
    /// `iat` lies in the future.
    #[error("initiator token is issued in the future (iat {iat}, now {now}, unix seconds)")]
    IssuedInFuture {
        /// The token's `iat`.
        iat: i64,
        /// This node's time.
        now: i64,
    },
    /// Valid for longer than the maximum.
    #[error("initiator token lifetime of {lifetime} s exceeds the maximum of {max} s")]
    LifetimeTooLong {
        /// `exp - iat` (or `exp - now` without `iat`), seconds.
        lifetime: i64,
        /// The maximum, seconds.
        max: u64,
    },
    /// A time claim that is not a NumericDate, or `exp` before `iat`.
    #[error("initiator token time claims are invalid: {0}")]
    BadTimeClaim(&'static str),
    /// The user claim is missing or empty.
    #[error("initiator token has no user in claim {0:?}")]
    NoUser(String),
    /// The user is written like an agent identity: as `sub` of onward
    /// assertions it would read as that agent.
    #[error(
        "initiator token user {0:?} starts with {prefix:?}, which names agents; a user cannot take an agent's name",
        prefix = AGENT_ISSUER_PREFIX
    )]
    AgentName(String),
}

/// The verified user of an initiator token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedInitiator {
    /// The issuer.
    pub issuer: String,
    /// The user (value of the issuer's user claim).
    pub user: String,
}

struct CachedJwks {
    keys: JwkSet,
    fetched: Instant,
}

/// Verifies initiator tokens; caches fetched JWKS per URL.
pub struct InitiatorVerifier {
    client: UpstreamClient,
    fetched: Mutex<HashMap<String, CachedJwks>>,
    max_lifetime: Duration,
}

impl std::fmt::Debug for InitiatorVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitiatorVerifier").finish_non_exhaustive()
    }
}

fn unverified_issuer(token: &str) -> Result<String, InitiatorRefused> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or(InitiatorRefused::Malformed("not a JWT"))?;
    let claims: Value = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(InitiatorRefused::Malformed("unreadable claims"))?;
    claims
        .get("iss")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(InitiatorRefused::Malformed("no iss claim"))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A NumericDate claim: `Ok(None)` when absent; whole seconds (fractions cut).
fn numeric_date(
    claims: &Value,
    name: &str,
    bad: &'static str,
) -> Result<Option<i64>, InitiatorRefused> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value
            .as_i64()
            .or_else(|| value.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or(InitiatorRefused::BadTimeClaim(bad)),
    }
}

/// The checks of a token's validity period that the JWT library leaves out:
/// `nbf` and `iat` not in the future (beyond the skew), and a lifetime
/// within `max_lifetime`. `exp` itself was verified with the signature.
fn check_validity(
    claims: &Value,
    now: i64,
    max_lifetime: Duration,
) -> Result<(), InitiatorRefused> {
    let exp = numeric_date(claims, "exp", "exp is not a NumericDate")?
        .ok_or(InitiatorRefused::BadTimeClaim("exp is missing"))?;
    let nbf = numeric_date(claims, "nbf", "nbf is not a NumericDate")?;
    let iat = numeric_date(claims, "iat", "iat is not a NumericDate")?;
    if let Some(nbf) = nbf
        && nbf > now.saturating_add(INITIATOR_CLOCK_SKEW_SECONDS)
    {
        return Err(InitiatorRefused::NotYetValid { nbf, now });
    }
    if let Some(iat) = iat {
        if iat > now.saturating_add(INITIATOR_CLOCK_SKEW_SECONDS) {
            return Err(InitiatorRefused::IssuedInFuture { iat, now });
        }
        if exp < iat {
            return Err(InitiatorRefused::BadTimeClaim("exp is before iat"));
        }
    }
    let lifetime = exp.saturating_sub(iat.unwrap_or(now));
    let max = max_lifetime.as_secs();
    if lifetime > i64::try_from(max).unwrap_or(i64::MAX) {
        return Err(InitiatorRefused::LifetimeTooLong { lifetime, max });
    }
    Ok(())
}

impl InitiatorVerifier {
    /// A verifier fetching JWKS URLs with `client`, accepting tokens valid
    /// for at most [`DEFAULT_MAX_TOKEN_LIFETIME`].
    pub fn new(client: UpstreamClient) -> Self {
        Self {
            client,
            fetched: Mutex::new(HashMap::new()),
            max_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
        }
    }

    /// The same verifier accepting tokens valid for at most `max_lifetime`.
    pub fn with_max_token_lifetime(mut self, max_lifetime: Duration) -> Self {
        self.max_lifetime = max_lifetime;
        self
    }

    /// Verifies `token` against the trusted `issuers`, at `now` (unix seconds).
    pub async fn verify(
        &self,
        token: &str,
        issuers: &[InitiatorIssuer],
    ) -> Result<VerifiedInitiator, InitiatorRefused> {
        let token = token.trim();
        let iss = unverified_issuer(token)?;
        let issuer = issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| InitiatorRefused::UntrustedIssuer(iss.clone()))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| InitiatorRefused::Malformed("unreadable header"))?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(InitiatorRefused::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.clone().unwrap_or_default();
        let keys = self.keys(issuer, &kid).await?;
        let jwk = if kid.is_empty() && keys.keys.len() == 1 {
            keys.keys.first()
        } else {
            keys.find(&kid)
        }
        .ok_or_else(|| InitiatorRefused::UnknownKey(kid.clone()))?;
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| InitiatorRefused::Invalid(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&[&issuer.audience]);
        validation.leeway = CLOCK_SKEW_SECONDS as u64;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| InitiatorRefused::Invalid(e.to_string()))?;
        check_validity(&data.claims, unix_now(), self.max_lifetime)?;
        let user = data
            .claims
            .get(&issuer.user_claim)
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| InitiatorRefused::NoUser(issuer.user_claim.clone()))?;
        if user.starts_with(AGENT_ISSUER_PREFIX) {
            return Err(InitiatorRefused::AgentName(user.to_owned()));
        }
        Ok(VerifiedInitiator {
            issuer: issuer.issuer.clone(),
            user: user.to_owned(),
        })
    }

    /// The issuer's keys: inline, or from its URL (cached; refetched when `kid`
    /// is unknown and the last fetch is old enough).
    async fn keys(&self, issuer: &InitiatorIssuer, kid: &str) -> Result<JwkSet, InitiatorRefused> {
        let unavailable = |reason: String| InitiatorRefused::KeysUnavailable {
            issuer: issuer.issuer.clone(),
            reason,
        };
        if let Some(inline) = &issuer.jwks {
            return serde_json::from_str(inline).map_err(|e| unavailable(e.to_string()));
        }
        let url = issuer
            .jwks_url
            .as_deref()
            .ok_or_else(|| unavailable("neither jwks nor jwksUrl is set".to_owned()))?;
        {
            let cache = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(cached) = cache.get(url)
                && (cached.keys.find(kid).is_some()
                    || cached.fetched.elapsed() < JWKS_REFETCH_INTERVAL)
            {
                return Ok(cached.keys.clone());
            }
        }
        let keys = self.fetch(url).await.map_err(unavailable)?;
        self.fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                url.to_owned(),
                CachedJwks {
                    keys: keys.clone(),
                    fetched: Instant::now(),
                },
            );
        Ok(keys)
    }

    async fn fetch(&self, url: &str) -> Result<JwkSet, String> {
        let uri: http::Uri = url.parse().map_err(|_| "not a URL".to_owned())?;
        let mut request = http::Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        request.headers_mut().insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/json"),
        );
        let response = tokio::time::timeout(Duration::from_secs(5), self.client.request(request))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 2_000_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn accepts_a_token_valid_now_for_less_than_the_maximum() {
        let claims = json!({"iat": NOW, "nbf": NOW, "exp": NOW + 300});
        assert_eq!(check_validity(&claims, NOW, HOUR), Ok(()));
        // A little skew either way is tolerated.
        let claims = json!({"iat": NOW + 20, "nbf": NOW + 25, "exp": NOW + 300});
        assert_eq!(check_validity(&claims, NOW, HOUR), Ok(()));
        let claims = json!({"iat": NOW as f64 + 0.5, "exp": NOW + 60});
        assert_eq!(check_validity(&claims, NOW, HOUR), Ok(()));
    }

    #[test]
    fn refuses_a_token_not_valid_yet() {
        let claims = json!({"iat": NOW, "nbf": NOW + 120, "exp": NOW + 300});
        assert_eq!(
            check_validity(&claims, NOW, HOUR),
            Err(InitiatorRefused::NotYetValid {
                nbf: NOW + 120,
                now: NOW
            })
        );
    }

    #[test]
    fn refuses_a_token_issued_in_the_future() {
        let claims = json!({"iat": NOW + 86_400, "exp": NOW + 86_400 + 60});
        let refused = check_validity(&claims, NOW, HOUR).unwrap_err();
        assert_eq!(
            refused,
            InitiatorRefused::IssuedInFuture {
                iat: NOW + 86_400,
                now: NOW
            }
        );
        assert!(refused.to_string().contains("issued in the future"));
    }

    #[test]
    fn refuses_a_token_living_longer_than_the_maximum() {
        let claims = json!({"iat": NOW, "exp": NOW + 3601});
        let refused = check_validity(&claims, NOW, HOUR).unwrap_err();
        assert_eq!(
            refused,
            InitiatorRefused::LifetimeTooLong {
                lifetime: 3601,
                max: 3600
            }
        );
        assert!(refused.to_string().contains("exceeds the maximum"));
        // Without iat the lifetime left counts.
        let claims = json!({"exp": NOW + 7200});
        assert!(matches!(
            check_validity(&claims, NOW, HOUR),
            Err(InitiatorRefused::LifetimeTooLong { lifetime: 7200, .. })
        ));
        let claims = json!({"exp": NOW + 600});
        assert_eq!(check_validity(&claims, NOW, HOUR), Ok(()));
        // An old iat cannot hide a long lifetime.
        let claims = json!({"iat": NOW - 86_400, "exp": NOW + 60});
        assert!(matches!(
            check_validity(&claims, NOW, HOUR),
            Err(InitiatorRefused::LifetimeTooLong { .. })
        ));
        // The maximum is the sidecar's setting.
        let claims = json!({"iat": NOW, "exp": NOW + 600});
        assert!(check_validity(&claims, NOW, Duration::from_secs(300)).is_err());
    }

    #[test]
    fn refuses_time_claims_that_are_not_numeric_dates() {
        let claims = json!({"iat": "yesterday", "exp": NOW + 60});
        assert_eq!(
            check_validity(&claims, NOW, HOUR),
            Err(InitiatorRefused::BadTimeClaim("iat is not a NumericDate"))
        );
        let claims = json!({"iat": NOW, "exp": NOW - 10});
        assert_eq!(
            check_validity(&claims, NOW, HOUR),
            Err(InitiatorRefused::BadTimeClaim("exp is before iat"))
        );
    }
}
