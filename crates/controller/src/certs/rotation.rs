//! When the serving certificate is replaced, and the replacing: a pure
//! decision over the Secret's items ([`plan`], or [`read_external`] for a
//! Secret cert-manager writes), [`ensure_with`] applying it to the Secret, and
//! [`spawn_renewal`] repeating that and publishing each new certificate.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rcgen::KeyPair;
use tokio::sync::watch;

use super::{
    CA_CERT_KEY, CertConfig, CertError, CertSource, Lifetimes, TLS_CERT_KEY, TLS_KEY_KEY,
    TlsMaterial,
    pki::{
        CertInfo, Pem, inspect, issue_ca, issue_serving_cert, normalise_sans, server_config,
        signed_by,
    },
    secret_store::{self, StoredCerts},
};

/// How often [`ensure`] retries after losing a race with another replica.
const RACE_ATTEMPTS: usize = 5;

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
        let (existing, stored) = secret_store::read(&api, config).await?;
        let (stored, material, reason) =
            match plan(&stored, &config.sans, config.lifetimes, SystemTime::now())? {
                Plan::Keep(material) => return Ok(material),
                Plan::Replace {
                    stored,
                    material,
                    reason,
                } => (stored, material, reason),
            };
        match secret_store::write(&api, config, existing, stored).await {
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
    let (existing, stored) = secret_store::read(&api, config).await?;
    if existing.is_none() {
        return Err(CertError::ExternalSecretMissing {
            namespace: config.namespace.clone(),
            name: config.secret_name.clone(),
        });
    }
    let external = read_external(&stored, &config.sans, SystemTime::now()).map_err(|reason| {
        CertError::ExternalSecretInvalid {
            namespace: config.namespace.clone(),
            name: config.secret_name.clone(),
            reason,
        }
    })?;
    for warning in &external.warnings {
        tracing::warn!(secret = %config.secret_name, namespace = %config.namespace, "external TLS Secret: {warning}");
    }
    Ok(external.material)
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
