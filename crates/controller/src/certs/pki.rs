//! Keys and certificates, without I/O: the controller's self-signed CA, the
//! serving certificates it signs, what a certificate says (validity, SANs,
//! issuer), and the rustls configuration that serves one.

use std::{
    collections::BTreeSet,
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{CA_CERT_KEY, CA_KEY_KEY, CertError, TLS_CERT_KEY, TLS_KEY_KEY, TlsMaterial};

/// Common name of the CA the controller generates.
const CA_COMMON_NAME: &str = "chaperone-controller-ca";

/// Certificates start up to this long before they are issued (clock skew between
/// nodes), and at most a tenth of their lifetime.
pub(super) const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A certificate with its private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: String,
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pem").finish_non_exhaustive()
    }
}

/// What [`inspect`] reads from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// DNS names and IP addresses (as text) of its SAN extension.
    pub sans: BTreeSet<String>,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
}

/// A self-signed ECDSA P-256 CA valid from `now` (backdated a little) for
/// `lifetime`.
pub fn issue_ca(lifetime: Duration, now: SystemTime) -> Result<Pem, CertError> {
    let key = KeyPair::generate()?;
    let mut params = ca_params(CA_COMMON_NAME);
    params.not_before = backdated(now, lifetime).into();
    params.not_after = (now + lifetime).into();
    let cert = params.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A serving certificate (ECDSA P-256, not a CA, `serverAuth`) for `sans`, signed
/// by the CA `ca`, valid from `now` (backdated a little) for `lifetime`.
pub fn issue_serving_cert(
    ca: &Pem,
    sans: &[String],
    lifetime: Duration,
    now: SystemTime,
) -> Result<Pem, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|e| CertError::Invalid {
        what: CA_KEY_KEY,
        reason: e.to_string(),
    })?;
    let ca_info = inspect(&ca.cert).map_err(|reason| CertError::Invalid {
        what: CA_CERT_KEY,
        reason,
    })?;
    // The issuer is rebuilt from the CA's subject and key: the leaf's issuer name
    // and authority key identifier then match the stored CA certificate.
    let issuer = Issuer::new(
        ca_params(ca_info.common_name.as_deref().unwrap_or(CA_COMMON_NAME)),
        ca_key,
    );

    let mut params = CertificateParams::default();
    params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        sans.first()
            .map(String::as_str)
            .unwrap_or("chaperone-controller"),
    );
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = backdated(now, lifetime).into();
    params.not_after = (now + lifetime).into();
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn backdated(now: SystemTime, lifetime: Duration) -> SystemTime {
    now.checked_sub(BACKDATE.min(lifetime / 10)).unwrap_or(now)
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn san(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    name.to_string()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| CertError::InvalidSan(name.to_string()))
}

/// Normalises configured SANs the way [`inspect`] reports them (IP addresses in
/// canonical text form).
pub(super) fn normalise_sans(sans: &[String]) -> BTreeSet<String> {
    sans.iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => s.to_ascii_lowercase(),
        })
        .collect()
}

/// Reads validity, SANs and subject common name of the first certificate in `pem`.
pub fn inspect(pem: &str) -> Result<CertInfo, String> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    let cert = block
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let time = |t: &x509_parser::time::ASN1Time| -> SystemTime {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    let validity = cert.validity();
    let mut sans = BTreeSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    sans.insert(dns.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Ok(CertInfo {
        not_before: time(&validity.not_before),
        not_after: time(&validity.not_after),
        sans,
        common_name,
    })
}

/// Whether `cert_pem`'s signature verifies with the public key of `ca_pem`.
pub(super) fn signed_by(cert_pem: &str, ca_pem: &str) -> bool {
    let parse = |pem: &str| x509_parser::pem::parse_x509_pem(pem.as_bytes()).map(|(_, p)| p);
    let (Ok(leaf), Ok(ca)) = (parse(cert_pem), parse(ca_pem)) else {
        return false;
    };
    let (Ok(leaf), Ok(ca)) = (leaf.parse_x509(), ca.parse_x509()) else {
        return false;
    };
    leaf.issuer() == ca.subject() && verify_signature(&leaf, &ca)
}

/// Verifies an ECDSA P-256/SHA-256 signature (the only kind this module issues)
/// with aws-lc-rs.
fn verify_signature(
    leaf: &x509_parser::certificate::X509Certificate<'_>,
    ca: &x509_parser::certificate::X509Certificate<'_>,
) -> bool {
    use aws_lc_rs::signature as sig;
    let key = sig::UnparsedPublicKey::new(
        &sig::ECDSA_P256_SHA256_ASN1,
        ca.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(
        leaf.tbs_certificate.as_ref(),
        leaf.signature_value.data.as_ref(),
    )
    .is_ok()
}

/// A rustls server configuration (aws-lc-rs provider, TLS 1.2 and 1.3, ALPN `h2`
/// and `http/1.1`) serving `material`'s certificate. Callers may change
/// `alpn_protocols` (a gRPC server wants only `h2`).
pub fn server_config(material: &TlsMaterial) -> Result<rustls::ServerConfig, CertError> {
    let chain = CertificateDer::pem_slice_iter(material.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Invalid {
            what: TLS_CERT_KEY,
            reason: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes()).map_err(|e| {
        CertError::Invalid {
            what: TLS_KEY_KEY,
            reason: e.to_string(),
        }
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
