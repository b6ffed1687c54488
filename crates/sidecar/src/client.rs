//! The HTTP client the sidecar uses towards tool servers, the pod's own MCP
//! endpoint and initiator JWKS URLs: plain HTTP or HTTPS (rustls over aws-lc-rs)
//! trusting the system's roots plus an optional extra CA bundle.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use thiserror::Error;

/// The upstream client type.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The TLS trust could not be set up.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    /// The extra CA bundle could not be read.
    #[error("reading the CA bundle {path}: {reason}")]
    CaBundle {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The roots: the system's (where it has any) and every certificate of
/// `extra_ca` (PEM).
pub fn root_store(extra_ca: Option<&Path>) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs_or_empty();
    roots.add_parsable_certificates(native);
    if let Some(path) = extra_ca {
        let bad = |reason: String| TlsSetupError::CaBundle {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate in it".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    Ok(roots)
}

fn rustls_native_certs_or_empty() -> Vec<CertificateDer<'static>> {
    // The system store may be missing (a distroless image without CA
    // certificates): then only the extra bundle is trusted, and HTTPS to
    // anything else fails closed.
    let loaded = rustls_native_certs::load_native_certs();
    if loaded.certs.is_empty() {
        tracing::debug!(errors = ?loaded.errors, "no system CA certificates found");
    }
    loaded.certs
}

/// The crypto provider of every TLS client of the sidecar (aws-lc-rs).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The default certificate verifier: `roots` (see [`root_store`]).
pub fn verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, TlsSetupError> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, crypto_provider())
        .build()
        .map_err(|e| TlsSetupError::Config(e.to_string()))
}

/// A client for `http://` and `https://` URLs, checking servers' certificates
/// with `verifier` (a [`crate::upstream_secrets::ScopedCaVerifier`] in the
/// sidecar).
pub fn upstream_client(
    connect_timeout: Duration,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> Result<UpstreamClient, TlsSetupError> {
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector))
}
