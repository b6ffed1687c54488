//! The controller's own CA and serving certificate, kept in a Secret shared by
//! the replicas and renewed before expiry.
//!
//! The first replica to start creates the Secret (a self-signed ECDSA P-256 CA and
//! a serving certificate it signs); the others read it (create-or-get, so a race
//! between replicas settles on one Secret). The serving certificate is reissued
//! from the stored CA when a third of its lifetime is left or its SANs changed;
//! replacements use the Secret's `resourceVersion`, so two replicas renewing at
//! once settle on one certificate too. [`spawn_renewal`] repeats that check and
//! publishes every new certificate on a `watch` channel, so servers swap it in
//! without a restart. [`sync_ca_bundle`] keeps the webhook's `caBundle` current.
//!
//! With [`CertSource::External`] (`CHAPERONE_EXTERNAL_TLS=true`: cert-manager
//! issues the certificate into the Secret and injects the webhook's caBundle)
//! the controller only reads the Secret (`ca.crt`, `tls.crt`, `tls.key`): it
//! never creates, renews or replaces it, and the caller does not run the
//! caBundle sync. [`spawn_renewal`] then re-reads the Secret and publishes what
//! cert-manager rotated in.
//!
//! The pure parts ([`issue_ca`], [`issue_serving_cert`], [`inspect`],
//! [`needs_renewal`], [`plan`], [`read_external`]) do no I/O and are
//! unit-tested without a cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::sync::watch;

/// Secret key of the CA certificate (PEM); what clients trust.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret key of the CA private key (PEM, PKCS#8).
pub const CA_KEY_KEY: &str = "ca.key";
/// Secret key of the serving certificate (PEM).
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Secret key of the serving certificate's private key (PEM, PKCS#8).
pub const TLS_KEY_KEY: &str = "tls.key";

/// Common name of the CA the controller generates.
const CA_COMMON_NAME: &str = "chaperone-controller-ca";
/// Field manager and `app.kubernetes.io/managed-by` value of what this module writes.
const MANAGER: &str = "chaperone-controller";
/// Certificates start up to this long before they are issued (clock skew between
/// nodes), and at most a tenth of their lifetime.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// How often [`ensure`] retries after losing a race with another replica.
const RACE_ATTEMPTS: usize = 5;

/// Why the controller's certificates could not be made, read or stored.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Generating a key or signing a certificate failed.
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A stored certificate or key could not be read.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which item (`ca.crt`, `tls.key`, …).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A SAN is neither a DNS name nor an IP address.
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    /// The Kubernetes API refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Other replicas kept changing the Secret while this one tried to settle it.
    #[error("Secret {0} kept changing under concurrent updates")]
    Contended(String),
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The Secret an external issuer should write does not exist (yet).
    #[error(
        "Secret {namespace}/{name} does not exist: with external TLS (CHAPERONE_EXTERNAL_TLS=true) the controller only reads it and cert-manager must issue it; is cert-manager installed and the Certificate for this Secret Ready?"
    )]
    ExternalSecretMissing {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
    },
    /// The externally written Secret cannot be served.
    #[error(
        "Secret {namespace}/{name} (external TLS: written by cert-manager, only read by the controller) cannot be served: {reason}"
    )]
    ExternalSecretInvalid {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Who issues the serving certificate in the Secret.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CertSource {
    /// The controller: it creates the Secret with its own CA, renews the serving
    /// certificate, and keeps the webhook's caBundle current.
    #[default]
    SelfManaged,
    /// Someone else (cert-manager): the controller only reads the Secret and
    /// leaves the caBundle to cert-manager's CA injector.
    External,
}

/// The CA and serving certificate the controller serves with (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The CA certificate: what webhook clients and sidecars trust (the caBundle).
    pub ca_pem: String,
    /// The serving certificate, signed by the CA.
    pub cert_pem: String,
    /// The serving certificate's private key (PKCS#8).
    pub key_pem: String,
    /// When the serving certificate became valid.
    pub not_before: SystemTime,
    /// When the serving certificate expires.
    pub not_after: SystemTime,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// How long generated certificates live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// Lifetime of a generated CA (default ten years).
    pub ca: Duration,
    /// Lifetime of a serving certificate (default 90 days); it is reissued when
    /// a third of it is left.
    pub serving: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            ca: Duration::from_secs(10 * 365 * 24 * 3600),
            serving: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// Where the certificates live and how they are renewed.
#[derive(Clone, Debug)]
pub struct CertConfig {
    /// Namespace of the Secret (the controller's namespace).
    pub namespace: String,
    /// Name of the Secret shared by the replicas.
    pub secret_name: String,
    /// SANs of the serving certificate: DNS names or IP addresses.
    pub sans: Vec<String>,
    /// Certificate lifetimes.
    pub lifetimes: Lifetimes,
    /// How often [`spawn_renewal`] re-checks the Secret.
    pub renew_interval: Duration,
    /// Who issues the certificate.
    pub source: CertSource,
}

impl CertConfig {
    /// The configuration the controller's flags describe: SANs for its Service
    /// ([`service_sans`]) plus `--extra-san`, default lifetimes, hourly checks;
    /// with `--external-tls`, an externally issued Secret re-read every five
    /// minutes (one GET) so that cert-manager's rotations are picked up soon.
    pub fn from_args(args: &crate::Args) -> Self {
        let source = if args.external_tls {
            CertSource::External
        } else {
            CertSource::SelfManaged
        };
        Self {
            namespace: args.namespace.clone(),
            secret_name: args.tls_secret.clone(),
            sans: service_sans(&args.service_name, &args.namespace, &args.extra_sans),
            lifetimes: Lifetimes::default(),
            renew_interval: match source {
                CertSource::SelfManaged => Duration::from_secs(3600),
                CertSource::External => Duration::from_secs(300),
            },
            source,
        }
    }
}

/// The DNS names of a Service (`svc`, `svc.ns`, `svc.ns.svc`,
/// `svc.ns.svc.cluster.local`) followed by `extra`, without duplicates.
pub fn service_sans(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    for name in extra {
        let name = name.trim();
        if !name.is_empty() && !sans.iter().any(|s| s == name) {
            sans.push(name.to_string());
        }
    }
    sans
}

// ---------------------------------------------------------------------------
// Pure parts: issue, inspect, decide.
// ---------------------------------------------------------------------------

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

/// Why a serving certificate must be reissued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenewalReason {
    /// A third or less of its lifetime is left (or it has expired).
    ExpiresSoon,
    /// Its SANs are not the configured ones.
    SansChanged,
    /// It was not signed by the stored CA.
    WrongIssuer,
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
fn normalise_sans(sans: &[String]) -> BTreeSet<String> {
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

/// Whether a serving certificate described by `info` must be reissued at `now`
/// for the configured `sans`: when a third or less of its lifetime is left, or
/// its SANs differ.
pub fn needs_renewal(info: &CertInfo, sans: &[String], now: SystemTime) -> Option<RenewalReason> {
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let renew_at = info
        .not_after
        .checked_sub(lifetime / 3)
        .unwrap_or(info.not_before);
    if now >= renew_at {
        return Some(RenewalReason::ExpiresSoon);
    }
    if info.sans != normalise_sans(sans) {
        return Some(RenewalReason::SansChanged);
    }
    None
}

/// The four PEM items of the Secret, as stored.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StoredCerts {
    /// `ca.crt`.
    pub ca_cert: Option<String>,
    /// `ca.key`.
    pub ca_key: Option<String>,
    /// `tls.crt`.
    pub tls_cert: Option<String>,
    /// `tls.key`.
    pub tls_key: Option<String>,
}

impl fmt::Debug for StoredCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredCerts")
            .field("ca_cert", &self.ca_cert.is_some())
            .field("ca_key", &self.ca_key.is_some())
            .field("tls_cert", &self.tls_cert.is_some())
            .field("tls_key", &self.tls_key.is_some())
            .finish()
    }
}

impl StoredCerts {
    /// Reads the items from a Secret's data (missing or non-UTF-8 items are `None`).
    pub fn from_secret(secret: &Secret) -> Self {
        let item = |key: &str| {
            secret
                .data
                .as_ref()
                .and_then(|data| data.get(key))
                .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
                .filter(|s| !s.trim().is_empty())
        };
        Self {
            ca_cert: item(CA_CERT_KEY),
            ca_key: item(CA_KEY_KEY),
            tls_cert: item(TLS_CERT_KEY),
            tls_key: item(TLS_KEY_KEY),
        }
    }

    fn into_data(self) -> BTreeMap<String, ByteString> {
        [
            (CA_CERT_KEY, self.ca_cert),
            (CA_KEY_KEY, self.ca_key),
            (TLS_CERT_KEY, self.tls_cert),
            (TLS_KEY_KEY, self.tls_key),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), ByteString(v.into_bytes()))))
        .collect()
    }
}

/// What to do with the stored certificates.
#[derive(Debug)]
pub enum Plan {
    /// They are good: serve with these.
    Keep(TlsMaterial),
    /// Store these instead (then serve with them); `reason` says why.
    Replace {
        /// The new Secret content.
        stored: StoredCerts,
        /// What the new content serves with.
        material: TlsMaterial,
        /// Why, for the log.
        reason: String,
    },
}

/// Decides, without I/O, whether the stored certificates can be served at `now`
/// for `sans`, or what should replace them: a new serving certificate from the
/// stored CA when it expires soon, has other SANs, or is unreadable; a new CA
/// and certificate when the CA is missing, unreadable or itself a third from
/// expiry.
pub fn plan(
    stored: &StoredCerts,
    sans: &[String],
    lifetimes: Lifetimes,
    now: SystemTime,
) -> Result<Plan, CertError> {
    let ca = match (&stored.ca_cert, &stored.ca_key) {
        (Some(cert), Some(key)) => match inspect(cert) {
            Ok(info) if needs_renewal_ca(&info, now) => Err("the CA expires soon".to_string()),
            Ok(_) if KeyPair::from_pem(key).is_err() => Err("the CA key is unreadable".into()),
            Ok(_) => Ok(Pem {
                cert: cert.clone(),
                key: key.clone(),
            }),
            Err(e) => Err(format!("the CA certificate is unreadable: {e}")),
        },
        _ => Err("no CA stored".to_string()),
    };
    let ca = match ca {
        Ok(ca) => ca,
        Err(reason) => {
            let ca = issue_ca(lifetimes.ca, now)?;
            return replace(ca, sans, lifetimes, now, reason);
        }
    };
    let serving = match (&stored.tls_cert, &stored.tls_key) {
        (Some(cert), Some(key)) => match inspect(cert) {
            Ok(info) => {
                match needs_renewal(&info, sans, now).or_else(|| {
                    (!signed_by(cert, &ca.cert) || KeyPair::from_pem(key).is_err())
                        .then_some(RenewalReason::WrongIssuer)
                }) {
                    None => Ok((cert.clone(), key.clone(), info)),
                    Some(reason) => Err(format!("serving certificate: {reason:?}")),
                }
            }
            Err(e) => Err(format!("serving certificate unreadable: {e}")),
        },
        _ => Err("no serving certificate stored".to_string()),
    };
    match serving {
        Ok((cert, key, info)) => Ok(Plan::Keep(TlsMaterial {
            ca_pem: ca.cert,
            cert_pem: cert,
            key_pem: key,
            not_before: info.not_before,
            not_after: info.not_after,
        })),
        Err(reason) => replace(ca, sans, lifetimes, now, reason),
    }
}

fn needs_renewal_ca(info: &CertInfo, now: SystemTime) -> bool {
    needs_renewal(
        &CertInfo {
            sans: BTreeSet::new(),
            ..info.clone()
        },
        &[],
        now,
    )
    .is_some()
}

/// Whether `cert_pem`'s signature verifies with the public key of `ca_pem`.
fn signed_by(cert_pem: &str, ca_pem: &str) -> bool {
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

fn replace(
    ca: Pem,
    sans: &[String],
    lifetimes: Lifetimes,
    now: SystemTime,
    reason: String,
) -> Result<Plan, CertError> {
    let serving = issue_serving_cert(&ca, sans, lifetimes.serving, now)?;
    let info = inspect(&serving.cert).map_err(|reason| CertError::Invalid {
        what: TLS_CERT_KEY,
        reason,
    })?;
    Ok(Plan::Replace {
        material: TlsMaterial {
            ca_pem: ca.cert.clone(),
            cert_pem: serving.cert.clone(),
            key_pem: serving.key.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
        },
        stored: StoredCerts {
            ca_cert: Some(ca.cert),
            ca_key: Some(ca.key),
            tls_cert: Some(serving.cert),
            tls_key: Some(serving.key),
        },
        reason,
    })
}

/// What an externally issued Secret serves with, and what looks wrong with it
/// (logged, not fatal: cert-manager may fix it on its next issue).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalCerts {
    /// The CA (`ca.crt`), serving certificate and key.
    pub material: TlsMaterial,
    /// Expiry and SAN problems.
    pub warnings: Vec<String>,
}

/// Reads an externally issued Secret's items without changing anything: all of
/// `ca.crt` (what sidecars and the API server trust), `tls.crt` and `tls.key`
/// must be there and readable, and the key must belong to the certificate.
/// A certificate outside its validity at `now`, or one that does not name all
/// of `sans`, is served with a warning. Pure.
pub fn read_external(
    stored: &StoredCerts,
    sans: &[String],
    now: SystemTime,
) -> Result<ExternalCerts, String> {
    let missing: Vec<&str> = [
        (CA_CERT_KEY, &stored.ca_cert),
        (TLS_CERT_KEY, &stored.tls_cert),
        (TLS_KEY_KEY, &stored.tls_key),
    ]
    .into_iter()
    .filter(|(_, item)| item.is_none())
    .map(|(key, _)| key)
    .collect();
    let (Some(ca_pem), Some(cert_pem), Some(key_pem)) =
        (&stored.ca_cert, &stored.tls_cert, &stored.tls_key)
    else {
        return Err(format!(
            "it has no {} (sidecars and the webhook's caBundle need ca.crt: issue the certificate from a CA or self-signed Issuer, as the chart does by default)",
            missing.join(", ")
        ));
    };
    inspect(ca_pem).map_err(|e| format!("{CA_CERT_KEY} is unreadable: {e}"))?;
    let info = inspect(cert_pem).map_err(|e| format!("{TLS_CERT_KEY} is unreadable: {e}"))?;
    let material = TlsMaterial {
        ca_pem: ca_pem.clone(),
        cert_pem: cert_pem.clone(),
        key_pem: key_pem.clone(),
        not_before: info.not_before,
        not_after: info.not_after,
    };
    server_config(&material)
        .map_err(|e| format!("{TLS_CERT_KEY} and {TLS_KEY_KEY} cannot be served together: {e}"))?;
    let mut warnings = Vec::new();
    if now >= info.not_after {
        warnings.push(
            "its serving certificate has expired: cert-manager has not renewed it (check the Certificate's status)"
                .to_string(),
        );
    } else if now < info.not_before {
        warnings.push("its serving certificate is not valid yet (clock skew?)".to_string());
    }
    let unnamed: Vec<String> = normalise_sans(sans)
        .into_iter()
        .filter(|san| !info.sans.contains(san))
        .collect();
    if !unnamed.is_empty() {
        warnings.push(format!(
            "its serving certificate does not name {}: clients dialling those names will fail TLS verification (add them to the Certificate's dnsNames)",
            unnamed.join(", ")
        ));
    }
    Ok(ExternalCerts { material, warnings })
}

// ---------------------------------------------------------------------------
// The Secret on the API server.
// ---------------------------------------------------------------------------

/// How long [`load`] waits at startup for an externally issued Secret to
/// appear (cert-manager issues it shortly after the chart is installed); less
/// than the chart's startup probe allows.
pub const EXTERNAL_SECRET_WAIT: Duration = Duration::from_secs(45);

/// Makes sure the Secret `secret_name` in `namespace` holds a CA and a serving
/// certificate for `sans` that is not close to expiry, creating or renewing it as
/// needed, and returns what to serve with. Default lifetimes.
pub async fn ensure(
    client: Client,
    namespace: &str,
    secret_name: &str,
    sans: &[String],
) -> Result<TlsMaterial, CertError> {
    ensure_with(
        client,
        &CertConfig {
            namespace: namespace.to_string(),
            secret_name: secret_name.to_string(),
            sans: sans.to_vec(),
            lifetimes: Lifetimes::default(),
            renew_interval: Duration::from_secs(3600),
            source: CertSource::SelfManaged,
        },
    )
    .await
}

/// The certificate to start with: [`ensure_with`], except that an externally
/// issued Secret that does not exist yet is waited for (up to
/// [`EXTERNAL_SECRET_WAIT`]) before giving up with the reason.
pub async fn load(client: Client, config: &CertConfig) -> Result<TlsMaterial, CertError> {
    let deadline = tokio::time::Instant::now() + EXTERNAL_SECRET_WAIT;
    loop {
        match ensure_with(client.clone(), config).await {
            Err(e @ CertError::ExternalSecretMissing { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(error = %e, "waiting for the TLS Secret");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            other => return other,
        }
    }
}

/// [`ensure`] with explicit lifetimes (tests use short ones). With
/// [`CertSource::External`] it only reads the Secret ([`read_external`]).
pub async fn ensure_with(client: Client, config: &CertConfig) -> Result<TlsMaterial, CertError> {
    if config.source == CertSource::External {
        return read_external_secret(client, config).await;
    }
    let api: Api<Secret> = Api::namespaced(client, &config.namespace);
    for _ in 0..RACE_ATTEMPTS {
        let existing = api.get_opt(&config.secret_name).await?;
        let stored = existing
            .as_ref()
            .map(StoredCerts::from_secret)
            .unwrap_or_default();
        let (stored, material, reason) =
            match plan(&stored, &config.sans, config.lifetimes, SystemTime::now())? {
                Plan::Keep(material) => return Ok(material),
                Plan::Replace {
                    stored,
                    material,
                    reason,
                } => (stored, material, reason),
            };
        let result = match existing {
            None => {
                let secret = new_secret(config, stored);
                api.create(&PostParams::default(), &secret)
                    .await
                    .map(|_| ())
            }
            Some(mut secret) => {
                // Keeps the resourceVersion: a concurrent writer makes this fail
                // with a conflict instead of being overwritten.
                secret.data = Some(stored.into_data());
                secret.string_data = None;
                secret.metadata.managed_fields = None;
                api.replace(&config.secret_name, &PostParams::default(), &secret)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(
                    secret = %config.secret_name,
                    namespace = %config.namespace,
                    %reason,
                    "stored a new serving certificate"
                );
                return Ok(material);
            }
            Err(kube::Error::Api(status)) if status.is_already_exists() || status.is_conflict() => {
                tracing::debug!(secret = %config.secret_name, "another replica wrote the Secret first; re-reading");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(CertError::Contended(config.secret_name.clone()))
}

/// Reads (one GET, never a write) an externally issued Secret.
async fn read_external_secret(
    client: Client,
    config: &CertConfig,
) -> Result<TlsMaterial, CertError> {
    let api: Api<Secret> = Api::namespaced(client, &config.namespace);
    let Some(secret) = api.get_opt(&config.secret_name).await? else {
        return Err(CertError::ExternalSecretMissing {
            namespace: config.namespace.clone(),
            name: config.secret_name.clone(),
        });
    };
    let external = read_external(
        &StoredCerts::from_secret(&secret),
        &config.sans,
        SystemTime::now(),
    )
    .map_err(|reason| CertError::ExternalSecretInvalid {
        namespace: config.namespace.clone(),
        name: config.secret_name.clone(),
        reason,
    })?;
    for warning in &external.warnings {
        tracing::warn!(secret = %config.secret_name, namespace = %config.namespace, "external TLS Secret: {warning}");
    }
    Ok(external.material)
}

fn new_secret(config: &CertConfig, stored: StoredCerts) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(config.secret_name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                MANAGER.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(stored.into_data()),
        ..Default::default()
    }
}

/// Re-runs [`ensure_with`] every `config.renew_interval` and publishes each new
/// certificate (renewed here, by another replica, or by cert-manager with
/// [`CertSource::External`]) on the returned channel,
/// starting with `initial`. Failures are logged and retried at the next tick; the
/// last good certificate stays published. The task ends when every receiver is
/// dropped.
pub fn spawn_renewal(
    client: Client,
    config: CertConfig,
    initial: TlsMaterial,
) -> watch::Receiver<Arc<TlsMaterial>> {
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(config.renew_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = tx.closed() => return,
            }
            match ensure_with(client.clone(), &config).await {
                Ok(material) => {
                    tx.send_if_modified(|current| {
                        if **current == material {
                            false
                        } else {
                            tracing::info!(not_after = ?material.not_after, "serving certificate changed");
                            *current = Arc::new(material);
                            true
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "checking the serving certificate failed; retrying later")
                }
            }
        }
    });
    rx
}

/// Keeps the caBundle of the MutatingWebhookConfiguration `webhook_config_name`
/// equal to the CA `tls` publishes: at start, on every change, and every
/// `interval` (a reinstalled configuration comes back without it). Every replica
/// may run it: they share the CA, and an up-to-date bundle is not written again.
pub fn spawn_ca_bundle_sync(
    client: Client,
    webhook_config_name: String,
    mut tls: watch::Receiver<Arc<TlsMaterial>>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ca = tls.borrow_and_update().ca_pem.clone();
            if let Err(e) = sync_ca_bundle(client.clone(), &webhook_config_name, &ca).await {
                tracing::warn!(config = %webhook_config_name, error = %e, "syncing the caBundle failed; retrying later");
            }
            tokio::select! {
                changed = tls.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(interval) => {}
            }
        }
    })
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

/// Sets `caBundle` of every webhook of the MutatingWebhookConfiguration
/// `webhook_config_name` to `ca_pem` (one JSON patch, guarded by each webhook's
/// name). Does nothing when they already carry it; logs and returns `Ok` when the
/// configuration does not exist (not installed yet, or managed elsewhere).
pub async fn sync_ca_bundle(
    client: Client,
    webhook_config_name: &str,
    ca_pem: &str,
) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let Some(config) = api.get_opt(webhook_config_name).await? else {
        tracing::info!(
            config = webhook_config_name,
            "MutatingWebhookConfiguration not found; caBundle not synced"
        );
        return Ok(());
    };
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let mut ops = Vec::new();
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref() == Some(&bundle) {
            continue;
        }
        ops.push(serde_json::json!({
            "op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook.name
        }));
        ops.push(serde_json::json!({
            "op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded
        }));
    }
    if ops.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).map_err(|e| CertError::Invalid {
            what: "caBundle patch",
            reason: e.to_string(),
        })?;
    api.patch(
        webhook_config_name,
        &PatchParams {
            field_manager: Some(MANAGER.to_string()),
            ..PatchParams::default()
        },
        &Patch::Json::<()>(patch),
    )
    .await?;
    tracing::info!(config = webhook_config_name, "caBundle updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn parse(args: &[&str]) -> crate::Args {
        <crate::Args as clap::Parser>::try_parse_from(
            std::iter::once("chaperone-controller").chain(args.iter().copied()),
        )
        .unwrap()
    }

    #[test]
    fn external_tls_comes_from_the_flag() {
        assert_eq!(
            CertConfig::from_args(&parse(&[])).source,
            CertSource::SelfManaged
        );
        for flag in ["--external-tls", "--external-tls=true", "--external-tls=1"] {
            let config = CertConfig::from_args(&parse(&[flag]));
            assert_eq!(config.source, CertSource::External, "{flag}");
            assert!(config.renew_interval <= Duration::from_secs(300));
        }
        assert_eq!(
            CertConfig::from_args(&parse(&["--external-tls=false"])).source,
            CertSource::SelfManaged
        );
        let err = <crate::Args as clap::Parser>::try_parse_from([
            "chaperone-controller",
            "--external-tls=maybe",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("CHAPERONE_EXTERNAL_TLS"), "{err}");
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
}
