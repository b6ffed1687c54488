//! When a DelegationGrant stops being valid: `expiresAt` (RFC 3339) or `ttl` (a
//! Go-style duration such as `1h30m`, counted from the grant's creation), resolved
//! to unix seconds. Pure functions: the caller passes the clock.

use thiserror::Error;

use crate::model::{DelegationGrantSpec, ObjectMeta};

/// Longest `ttl` a grant may have: one year (`8760h`).
pub const MAX_GRANT_TTL_SECONDS: u64 = 8760 * 3600;

/// Why a grant's expiry could not be resolved.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ExpiryError {
    /// `ttl` is not a Go-style duration of hours, minutes and seconds.
    #[error("ttl {value:?} is not a duration like '90s', '15m' or '1h30m'")]
    InvalidDuration {
        /// The text as written.
        value: String,
    },
    /// `ttl` is longer than a year.
    #[error("ttl {value:?} is longer than 8760h (one year)")]
    DurationTooLong {
        /// The text as written.
        value: String,
    },
    /// `expiresAt` or `creationTimestamp` is not an RFC 3339 time.
    #[error("{field} {value:?} is not an RFC 3339 time such as 2026-01-31T12:00:00Z")]
    InvalidTimestamp {
        /// Which field held it.
        field: &'static str,
        /// The text as written.
        value: String,
    },
    /// Neither `expiresAt` nor `ttl` is set, or both are.
    #[error("set exactly one of expiresAt or ttl: a grant must expire")]
    AmbiguousExpiry,
}

/// Parses a Go-style duration made of `<digits>h`, `<digits>m` and `<digits>s`
/// parts (e.g. `90s`, `15m`, `1h30m`) into seconds.
pub fn parse_duration_seconds(text: &str) -> Result<u64, ExpiryError> {
    let invalid = || ExpiryError::InvalidDuration {
        value: text.to_owned(),
    };
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    let mut digits: Option<u64> = None;
    for byte in text.bytes() {
        match byte {
            b'0'..=b'9' => {
                let value = digits
                    .unwrap_or(0)
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(byte - b'0')))
                    .ok_or_else(invalid)?;
                digits = Some(value);
            }
            b'h' | b'm' | b's' => {
                let count = digits.take().ok_or_else(invalid)?;
                let unit = match byte {
                    b'h' => 3600,
                    b'm' => 60,
                    _ => 1,
                };
                total = count
                    .checked_mul(unit)
                    .and_then(|v| total.checked_add(v))
                    .ok_or_else(invalid)?;
            }
            _ => return Err(invalid()),
        }
    }
    if digits.is_some() {
        return Err(invalid());
    }
    if total > MAX_GRANT_TTL_SECONDS {
        return Err(ExpiryError::DurationTooLong {
            value: text.to_owned(),
        });
    }
    Ok(total)
}

/// Parses an RFC 3339 time (with offset or `Z`) into unix seconds.
pub fn parse_rfc3339_seconds(field: &'static str, text: &str) -> Result<i64, ExpiryError> {
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|_| ExpiryError::InvalidTimestamp {
            field,
            value: text.to_owned(),
        })
}

/// The unix time at which a grant expires. A `ttl` counts from the object's
/// `creationTimestamp`; objects read from files have none, and then `now` stands
/// in for it (the grant is as fresh as the file).
pub fn grant_expires_at(
    spec: &DelegationGrantSpec,
    metadata: &ObjectMeta,
    now: i64,
) -> Result<i64, ExpiryError> {
    match (&spec.expires_at, &spec.ttl) {
        (Some(at), None) => parse_rfc3339_seconds("expiresAt", at),
        (None, Some(ttl)) => {
            let seconds = parse_duration_seconds(ttl)?;
            let created = match &metadata.creation_timestamp {
                Some(created) => parse_rfc3339_seconds("metadata.creationTimestamp", created)?,
                None => now,
            };
            // At most a year added to a parsed timestamp: cannot overflow i64.
            Ok(created.saturating_add(seconds as i64))
        }
        _ => Err(ExpiryError::AmbiguousExpiry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration_seconds("90s"), Ok(90));
        assert_eq!(parse_duration_seconds("15m"), Ok(900));
        assert_eq!(parse_duration_seconds("1h30m"), Ok(5400));
        assert_eq!(parse_duration_seconds("1h1m1s"), Ok(3661));
        assert_eq!(parse_duration_seconds("8760h"), Ok(MAX_GRANT_TTL_SECONDS));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "",
            "h",
            "1",
            "1d",
            "1.5h",
            "-1h",
            "1h 30m",
            "99999999999999999999s",
        ] {
            assert!(parse_duration_seconds(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_duration_seconds("8761h"),
            Err(ExpiryError::DurationTooLong { .. })
        ));
    }

    #[test]
    fn parses_rfc3339() {
        assert_eq!(
            parse_rfc3339_seconds("expiresAt", "1970-01-01T00:01:00Z"),
            Ok(60)
        );
        assert_eq!(
            parse_rfc3339_seconds("expiresAt", "1970-01-01T01:00:00+01:00"),
            Ok(0)
        );
        assert!(parse_rfc3339_seconds("expiresAt", "tomorrow").is_err());
    }

    #[test]
    fn ttl_counts_from_creation_or_now() {
        let spec = DelegationGrantSpec {
            ttl: Some("1h".into()),
            ..Default::default()
        };
        let mut meta = ObjectMeta::default();
        assert_eq!(grant_expires_at(&spec, &meta, 1000), Ok(4600));
        meta.creation_timestamp = Some("1970-01-01T00:00:10Z".into());
        assert_eq!(grant_expires_at(&spec, &meta, 1000), Ok(3610));
    }

    #[test]
    fn grant_needs_exactly_one_expiry() {
        let spec = DelegationGrantSpec::default();
        assert_eq!(
            grant_expires_at(&spec, &ObjectMeta::default(), 0),
            Err(ExpiryError::AmbiguousExpiry)
        );
    }
}
