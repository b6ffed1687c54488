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
//!
//! The parts, each a module: `pki` (keys and certificates, pure), `rotation`
//! (when the serving certificate is replaced, and the tasks that replace it),
//! `secret_store` (the Secret's items, read and written) and `ca_bundle` (the
//! webhook's caBundle). This module keeps their public surface and the
//! settings they share.

mod ca_bundle;
mod pki;
mod rotation;
mod secret_store;

use std::{
    fmt,
    time::{Duration, SystemTime},
};

pub use ca_bundle::{spawn_ca_bundle_sync, sync_ca_bundle};
pub use pki::{CertInfo, Pem, inspect, issue_ca, issue_serving_cert, server_config};
pub use rotation::{
    EXTERNAL_SECRET_WAIT, ExternalCerts, Plan, RenewalReason, ensure, ensure_with, load,
    needs_renewal, plan, read_external, spawn_renewal,
};
pub use secret_store::StoredCerts;

/// Secret key of the CA certificate (PEM); what clients trust.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret key of the CA private key (PEM, PKCS#8).
pub const CA_KEY_KEY: &str = "ca.key";
/// Secret key of the serving certificate (PEM).
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Secret key of the serving certificate's private key (PEM, PKCS#8).
pub const TLS_KEY_KEY: &str = "tls.key";

/// Field manager and `app.kubernetes.io/managed-by` value of what this module writes.
const MANAGER: &str = "chaperone-controller";

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

#[cfg(test)]
mod tests;
