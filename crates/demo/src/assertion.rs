//! Reads the claims of a `Chaperone-Assertion` for logging. The demo servers do
//! not verify the signature (the sidecar's JWKS is served by the controller);
//! they show what the assertion claims.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

/// The assertion header the sidecar attaches to every forwarded call.
pub const HEADER: &str = "chaperone-assertion";

/// The claims of a compact JWT, decoded without verification; `None` when it is
/// not a JWT.
pub fn unverified_claims(jwt: &str) -> Option<Value> {
    let mut parts = jwt.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// One line summarising the claims a tool server cares about.
pub fn summary(claims: &Value) -> String {
    let field = |name: &str| match claims.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    };
    let (iss, sub) = (field("iss"), field("sub"));
    // The subject (the initiating principal) is the agent itself unless a user
    // or a delegating agent started the task: shown only when it differs.
    let sub = if sub == iss {
        String::new()
    } else {
        format!(" sub={sub}")
    };
    format!(
        "iss={iss}{sub} aud={} tool={} snap={} sid={}",
        field("aud"),
        field("tool"),
        field("snap"),
        field("sid"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_payload_of_a_compact_jwt() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"iss":"default/support-agent","snap":3}"#);
        let claims = unverified_claims(&format!("e30.{payload}.c2ln")).unwrap();
        assert_eq!(
            summary(&claims),
            "iss=default/support-agent sub=- aud=- tool=- snap=3 sid=-"
        );
    }

    #[test]
    fn omits_a_subject_equal_to_the_issuer() {
        let claims = serde_json::json!({"iss": "a", "sub": "a", "aud": "b", "tool": "t", "snap": 1, "sid": "s"});
        assert_eq!(summary(&claims), "iss=a aud=b tool=t snap=1 sid=s");
    }

    #[test]
    fn rejects_what_is_not_a_jwt() {
        assert_eq!(unverified_claims("not-a-jwt"), None);
        assert_eq!(unverified_claims("a.b.c.d"), None);
    }
}
