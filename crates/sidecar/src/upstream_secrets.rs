//! Per-tool-server credentials and CAs (`toolServers[].upstreamSecret`).
//!
//! The injection webhook mounts each such Secret into the sidecar alone, at
//! `<dir>/<server>/` (`CHAPERONE_UPSTREAM_SECRETS_DIR`). Key `ca.crt` holds PEM
//! certificates trusted for that server's host only, besides the system's
//! roots; key `authorization` holds the `Authorization` header value sent to
//! that server in place of any the agent sent. The files are read when first
//! needed and again after [`REFRESH`], so a rotated Secret (the kubelet
//! updates the files in place) is used within that time.
//!
//! Fail closed: a server that names a Secret whose folder has neither key (not
//! mounted: the pod predates the setting, or the Secret does not exist yet),
//! an unreadable file, a CA bundle without a certificate, or an
//! `authorization` that is not a valid header value refuses the call
//! ([`UpstreamSecretUnusable`]); nothing is sent without them.
//!
//! TLS: [`ScopedCaVerifier`] checks each tool server's certificate against the
//! system roots plus the CA of every tool server with that host in the policy
//! in force, and every other host against the system roots only, so one
//! server's private CA can never vouch for another host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaperone_wire::sidecar_env::{UPSTREAM_AUTHORIZATION_KEY, UPSTREAM_CA_KEY};
use http::HeaderValue;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::refusal::UpstreamSecretUnusable;
use crate::snapshot::{SnapshotSource, Upstream};

/// How long read files are used before they are read again.
pub const REFRESH: Duration = Duration::from_secs(30);

/// What a mounted `upstreamSecret` holds, as the sidecar uses it.
pub struct UpstreamMaterial {
    /// The `Authorization` value to send, if the Secret has one.
    pub authorization: Option<HeaderValue>,
    /// The system roots plus the Secret's CA, if it has one.
    pub verifier: Option<Arc<WebPkiServerVerifier>>,
}

struct Cached {
    read_at: Instant,
    material: Result<Arc<UpstreamMaterial>, String>,
}

/// The mounted `upstreamSecret`s, read on demand and cached for [`REFRESH`].
pub struct UpstreamSecrets {
    dir: PathBuf,
    base_roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl UpstreamSecrets {
    /// Secrets mounted under `dir`; `base_roots` are trusted for every server
    /// (the system's and the sidecar-wide extra bundle).
    pub fn new(
        dir: PathBuf,
        base_roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            dir,
            base_roots,
            provider,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The material of `upstream`'s Secret; `None` when it names none.
    pub fn material(
        &self,
        upstream: &Upstream,
    ) -> Result<Option<Arc<UpstreamMaterial>>, UpstreamSecretUnusable> {
        let Some(secret) = &upstream.secret else {
            return Ok(None);
        };
        let unusable = |reason: String| UpstreamSecretUnusable {
            server: upstream.name.clone(),
            secret: secret.clone(),
            reason,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = cache
            .get(&upstream.name)
            .is_some_and(|c| c.read_at.elapsed() < REFRESH);
        if !fresh {
            let material = self.read(&self.dir.join(&upstream.name)).map(Arc::new);
            if let Err(reason) = &material {
                tracing::warn!(server = %upstream.name, %secret, %reason, "upstream secret unusable");
            }
            cache.insert(
                upstream.name.clone(),
                Cached {
                    read_at: Instant::now(),
                    material,
                },
            );
        }
        match &cache[&upstream.name].material {
            Ok(material) => Ok(Some(Arc::clone(material))),
            Err(reason) => Err(unusable(reason.clone())),
        }
    }

    /// Sets `headers`' `Authorization` from `upstream`'s Secret, if it has
    /// one (replacing the agent's).
    pub fn apply(
        &self,
        upstream: &Upstream,
        headers: &mut http::HeaderMap,
    ) -> Result<(), UpstreamSecretUnusable> {
        if let Some(material) = self.material(upstream)?
            && let Some(value) = &material.authorization
        {
            headers.insert(http::header::AUTHORIZATION, value.clone());
        }
        Ok(())
    }

    fn read(&self, folder: &Path) -> Result<UpstreamMaterial, String> {
        let ca_file = folder.join(UPSTREAM_CA_KEY);
        let authorization_file = folder.join(UPSTREAM_AUTHORIZATION_KEY);
        let ca = read_optional(&ca_file)?;
        let authorization = read_optional(&authorization_file)?;
        if ca.is_none() && authorization.is_none() {
            return Err(format!(
                "is not mounted (no {UPSTREAM_CA_KEY} or {UPSTREAM_AUTHORIZATION_KEY} in {}): create the Secret with either key, and recreate pods that started before the AgentIdentity named it",
                folder.display()
            ));
        }
        let authorization = authorization
            .map(|bytes| {
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("{UPSTREAM_AUTHORIZATION_KEY} is not UTF-8"))?;
                let mut value = HeaderValue::from_str(text.trim()).map_err(|_| {
                    format!("{UPSTREAM_AUTHORIZATION_KEY} is not a valid header value")
                })?;
                if value.is_empty() {
                    return Err(format!("{UPSTREAM_AUTHORIZATION_KEY} is empty"));
                }
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let verifier = ca
            .map(|pem| {
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("{UPSTREAM_CA_KEY}: {e}"))?;
                if certs.is_empty() {
                    return Err(format!("{UPSTREAM_CA_KEY} holds no PEM certificate"));
                }
                let mut roots = (*self.base_roots).clone();
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{UPSTREAM_CA_KEY}: {e}"))?;
                }
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&self.provider),
                )
                .build()
                .map_err(|e| format!("{UPSTREAM_CA_KEY}: {e}"))
            })
            .transpose()?;
        Ok(UpstreamMaterial {
            authorization,
            verifier,
        })
    }
}

/// The file's bytes; `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Verifies a server's certificate against the system roots, plus the CAs of
/// the tool servers of the policy in force that have its host.
pub struct ScopedCaVerifier {
    default: Arc<WebPkiServerVerifier>,
    source: Arc<SnapshotSource>,
    secrets: Arc<UpstreamSecrets>,
}

impl std::fmt::Debug for ScopedCaVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedCaVerifier").finish_non_exhaustive()
    }
}

impl ScopedCaVerifier {
    /// `default` for every host without a tool server CA.
    pub fn new(
        default: Arc<WebPkiServerVerifier>,
        source: Arc<SnapshotSource>,
        secrets: Arc<UpstreamSecrets>,
    ) -> Self {
        Self {
            default,
            source,
            secrets,
        }
    }

    /// The verifiers of the CAs scoped to `host`.
    fn scoped(&self, host: &str) -> Vec<Arc<WebPkiServerVerifier>> {
        let Some(active) = self.source.current() else {
            return Vec::new();
        };
        active
            .upstreams
            .values()
            .filter(|u| {
                u.secret.is_some()
                    && u.authority
                        .host()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .eq_ignore_ascii_case(host)
            })
            .filter_map(|u| self.secrets.material(u).ok().flatten())
            .filter_map(|m| m.verifier.clone())
            .collect()
    }
}

impl ServerCertVerifier for ScopedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let host = server_name.to_str();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let scoped = self.scoped(host);
        let mut last = None;
        for verifier in &scoped {
            match verifier.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Ok(verified) => return Ok(verified),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(error) => Err(error),
            None => self.default.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.default.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.default.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.default.supported_verify_schemes()
    }
}
