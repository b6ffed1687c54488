//! Where `audit verify --jwks` gets the sidecars' public keys: a JWKS file, or
//! an `http://` / `https://` URL such as the controller's
//! `/.well-known/jwks.json` (HTTPS trusts the system's roots).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use chaperone_audit::SidecarKeys;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The largest JWKS read.
const MAX_JWKS_BYTES: usize = 4 << 20;
/// How long fetching a JWKS may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The Ed25519 keys of every JWKS in `sources` (files or URLs).
pub fn load(sources: &[String]) -> Result<SidecarKeys> {
    let mut keys = SidecarKeys::new();
    for source in sources {
        let bytes = if source.starts_with("http://") || source.starts_with("https://") {
            fetch(source).with_context(|| format!("fetching the JWKS {source}"))?
        } else {
            std::fs::read(source).with_context(|| format!("reading the JWKS {source}"))?
        };
        keys.add_jwks(&bytes)
            .with_context(|| format!("reading the JWKS {source}"))?;
    }
    Ok(keys)
}

/// GETs `url` and returns the body of a 2xx response.
fn fetch(url: &str) -> Result<Vec<u8>> {
    let uri: hyper::Uri = url.parse().context("not a URL")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP client")?;
    runtime.block_on(async {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let connector = HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .context("loading the system's CA certificates")?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
        let response = tokio::time::timeout(FETCH_TIMEOUT, client.get(uri))
            .await
            .context("no response within 30 s")??;
        let status = response.status();
        if !status.is_success() {
            bail!("HTTP {status}");
        }
        let body = tokio::time::timeout(
            FETCH_TIMEOUT,
            Limited::new(response.into_body(), MAX_JWKS_BYTES).collect(),
        )
        .await
        .context("the body did not arrive within 30 s")?
        .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?;
        Ok(body.to_bytes().to_vec())
    })
}
