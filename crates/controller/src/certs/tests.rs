//! Tests of the certificates without a cluster: issuing, renewal plans, external Secrets.

use std::time::UNIX_EPOCH;

use super::{
    pki::{BACKDATE, normalise_sans, signed_by},
    *,
};

fn sans() -> Vec<String> {
    vec![
        "chaperone-controller.chaperone-system.svc".to_string(),
        "127.0.0.1".to_string(),
    ]
}

fn day() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn fresh(now: SystemTime) -> (StoredCerts, TlsMaterial) {
    match plan(&StoredCerts::default(), &sans(), Lifetimes::default(), now).unwrap() {
        Plan::Replace {
            stored, material, ..
        } => (stored, material),
        Plan::Keep(_) => panic!("an empty Secret cannot be kept"),
    }
}

#[test]
fn issues_a_serving_cert_with_the_configured_sans_and_lifetime() {
    let now = SystemTime::now();
    let ca = issue_ca(Lifetimes::default().ca, now).unwrap();
    let cert = issue_serving_cert(&ca, &sans(), 90 * day(), now).unwrap();
    let info = inspect(&cert.cert).unwrap();
    assert_eq!(info.sans, normalise_sans(&sans()));
    let lifetime = info.not_after.duration_since(info.not_before).unwrap();
    assert!(lifetime >= 90 * day());
    assert!(lifetime <= 90 * day() + BACKDATE + Duration::from_secs(2));
    assert!(signed_by(&cert.cert, &ca.cert));
}

#[test]
fn a_cert_from_another_ca_is_not_signed_by_ours() {
    let now = SystemTime::now();
    let ours = issue_ca(day(), now).unwrap();
    let theirs = issue_ca(day(), now).unwrap();
    let cert = issue_serving_cert(&theirs, &sans(), day(), now).unwrap();
    assert!(!signed_by(&cert.cert, &ours.cert));
}

#[test]
fn renews_when_a_third_of_the_lifetime_is_left() {
    let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let info = CertInfo {
        not_before: start,
        not_after: start + 90 * day(),
        sans: normalise_sans(&sans()),
        common_name: None,
    };
    assert_eq!(needs_renewal(&info, &sans(), start + 59 * day()), None);
    assert_eq!(
        needs_renewal(&info, &sans(), start + 61 * day()),
        Some(RenewalReason::ExpiresSoon)
    );
    assert_eq!(
        needs_renewal(&info, &sans(), start + 100 * day()),
        Some(RenewalReason::ExpiresSoon)
    );
}

#[test]
fn renews_when_the_sans_change() {
    let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let info = CertInfo {
        not_before: start,
        not_after: start + 90 * day(),
        sans: normalise_sans(&sans()),
        common_name: None,
    };
    let mut more = sans();
    more.push("webhook.example".into());
    assert_eq!(
        needs_renewal(&info, &more, start + day()),
        Some(RenewalReason::SansChanged)
    );
}

#[test]
fn an_empty_secret_gets_a_ca_and_a_serving_cert() {
    let (stored, material) = fresh(SystemTime::now());
    assert!(stored.ca_cert.is_some() && stored.ca_key.is_some());
    assert_eq!(stored.tls_cert.as_ref(), Some(&material.cert_pem));
    assert_eq!(stored.ca_cert.as_ref(), Some(&material.ca_pem));
}

#[test]
fn a_good_secret_is_kept() {
    let now = SystemTime::now();
    let (stored, material) = fresh(now);
    match plan(&stored, &sans(), Lifetimes::default(), now + day()).unwrap() {
        Plan::Keep(kept) => assert_eq!(kept, material),
        Plan::Replace { reason, .. } => panic!("replaced: {reason}"),
    }
}

#[test]
fn an_aging_cert_is_reissued_from_the_same_ca() {
    let now = SystemTime::now();
    let (stored, material) = fresh(now);
    match plan(&stored, &sans(), Lifetimes::default(), now + 61 * day()).unwrap() {
        Plan::Replace {
            stored: next,
            material: renewed,
            ..
        } => {
            assert_eq!(renewed.ca_pem, material.ca_pem);
            assert_eq!(next.ca_key, stored.ca_key);
            assert_ne!(renewed.cert_pem, material.cert_pem);
            assert!(signed_by(&renewed.cert_pem, &material.ca_pem));
        }
        Plan::Keep(_) => panic!("kept a certificate with less than a third left"),
    }
}

#[test]
fn a_cert_for_other_sans_is_reissued() {
    let now = SystemTime::now();
    let (stored, _) = fresh(now);
    let mut more = sans();
    more.push("10.0.0.7".into());
    match plan(&stored, &more, Lifetimes::default(), now).unwrap() {
        Plan::Replace { material, .. } => {
            let info = inspect(&material.cert_pem).unwrap();
            assert!(info.sans.contains("10.0.0.7"));
        }
        Plan::Keep(_) => panic!("kept a certificate without the new SAN"),
    }
}

#[test]
fn garbage_is_replaced_with_a_new_ca() {
    let stored = StoredCerts {
        ca_cert: Some("not a cert".into()),
        ca_key: Some("not a key".into()),
        tls_cert: None,
        tls_key: None,
    };
    assert!(matches!(
        plan(&stored, &sans(), Lifetimes::default(), SystemTime::now()).unwrap(),
        Plan::Replace { .. }
    ));
}

#[test]
fn a_serving_cert_from_a_foreign_ca_is_reissued() {
    let now = SystemTime::now();
    let (mut stored, _) = fresh(now);
    let foreign = issue_ca(day(), now).unwrap();
    let cert = issue_serving_cert(&foreign, &sans(), 90 * day(), now).unwrap();
    stored.tls_cert = Some(cert.cert);
    stored.tls_key = Some(cert.key);
    assert!(matches!(
        plan(&stored, &sans(), Lifetimes::default(), now).unwrap(),
        Plan::Replace { .. }
    ));
}

#[test]
fn builds_a_rustls_server_config() {
    let (_, material) = fresh(SystemTime::now());
    let config = server_config(&material).unwrap();
    assert_eq!(config.alpn_protocols[0], b"h2");
}

/// What cert-manager writes: the issuing CA's certificate (no CA key), the
/// serving certificate and its key.
fn external(now: SystemTime, lifetime: Duration, sans: &[String]) -> StoredCerts {
    let ca = issue_ca(Lifetimes::default().ca, now).unwrap();
    let serving = issue_serving_cert(&ca, sans, lifetime, now).unwrap();
    StoredCerts {
        ca_cert: Some(ca.cert),
        ca_key: None,
        tls_cert: Some(serving.cert),
        tls_key: Some(serving.key),
    }
}

#[test]
fn an_external_secret_is_served_as_it_is() {
    let now = SystemTime::now();
    let stored = external(now, 90 * day(), &sans());
    let read = read_external(&stored, &sans(), now).unwrap();
    assert!(read.warnings.is_empty(), "{:?}", read.warnings);
    assert_eq!(Some(&read.material.ca_pem), stored.ca_cert.as_ref());
    assert_eq!(Some(&read.material.cert_pem), stored.tls_cert.as_ref());
    assert_eq!(Some(&read.material.key_pem), stored.tls_key.as_ref());
    // Even when it is old: renewing is cert-manager's business.
    let later = now + 80 * day();
    let read = read_external(&stored, &sans(), later).unwrap();
    assert!(read.warnings.is_empty(), "{:?}", read.warnings);
}

#[test]
fn an_incomplete_external_secret_is_refused_naming_what_is_missing() {
    let now = SystemTime::now();
    let mut stored = external(now, day(), &sans());
    stored.ca_cert = None;
    stored.tls_key = None;
    let err = read_external(&stored, &sans(), now).unwrap_err();
    assert!(err.contains("no ca.crt, tls.key"), "{err}");
    let err = read_external(&StoredCerts::default(), &sans(), now).unwrap_err();
    assert!(err.contains("ca.crt, tls.crt, tls.key"), "{err}");
}

#[test]
fn an_external_key_of_another_certificate_is_refused() {
    let now = SystemTime::now();
    let mut stored = external(now, day(), &sans());
    stored.tls_key = external(now, day(), &sans()).tls_key;
    let err = read_external(&stored, &sans(), now).unwrap_err();
    assert!(err.contains("cannot be served together"), "{err}");
    stored.tls_cert = Some("garbage".into());
    let err = read_external(&stored, &sans(), now).unwrap_err();
    assert!(err.contains("tls.crt is unreadable"), "{err}");
}

#[test]
fn an_expired_or_misnamed_external_certificate_is_served_with_warnings() {
    let now = SystemTime::now();
    let stored = external(now, day(), &sans()[..1]);
    let read = read_external(&stored, &sans(), now + 2 * day()).unwrap();
    assert_eq!(read.warnings.len(), 2, "{:?}", read.warnings);
    assert!(read.warnings[0].contains("expired"), "{:?}", read.warnings);
    assert!(
        read.warnings[1].contains("127.0.0.1"),
        "{:?}",
        read.warnings
    );
}

#[test]
fn service_sans_cover_the_service_dns_names_and_extras() {
    let sans = service_sans("ctl", "sys", &["127.0.0.1".into(), "ctl".into()]);
    assert_eq!(
        sans,
        [
            "ctl",
            "ctl.sys",
            "ctl.sys.svc",
            "ctl.sys.svc.cluster.local",
            "127.0.0.1"
        ]
    );
}
