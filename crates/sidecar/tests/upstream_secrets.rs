//! `toolServers[].upstreamSecret` through the sidecar, against HTTPS tool
//! servers with certificates from a private CA: the Secret's `authorization`
//! replaces the agent's `Authorization`, its `ca.crt` is trusted for that
//! server's host and no other, and a Secret that is not mounted refuses the
//! call naming it (nothing is sent).

#![allow(missing_docs)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chaperone_sidecar::{AuditOutput, Settings, Sidecar, standalone};
use common::{AuditBuffer, post_raw};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

/// A private CA and a leaf it signs for `san`.
struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, san: SanType) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![san];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// An HTTPS tool server answering `tools/call`, recording the
/// `Authorization` of each request.
async fn tls_server(
    cert_pem: String,
    key_pem: String,
    seen: Arc<Mutex<Vec<String>>>,
) -> SocketAddr {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            let authorization = req
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default();
                            seen.lock().unwrap().push(authorization);
                            let bytes = req.into_body().collect().await.unwrap().to_bytes();
                            let message: Value = serde_json::from_slice(&bytes).unwrap();
                            let reply = json!({"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": "done"}]}});
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(reply.to_string())))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn call_body() -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "charge", "arguments": {}}}).to_string()
}

#[tokio::test]
async fn the_secret_authorizes_and_its_ca_is_trusted_for_its_host_only() {
    let pki = Pki::new();
    let (billing_cert, billing_key) = pki.leaf(SanType::DnsName("localhost".try_into().unwrap()));
    let (other_cert, other_key) =
        pki.leaf(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let billing_seen = Arc::new(Mutex::new(Vec::new()));
    let other_seen = Arc::new(Mutex::new(Vec::new()));
    let billing = tls_server(billing_cert, billing_key, Arc::clone(&billing_seen)).await;
    let other = tls_server(other_cert, other_key, Arc::clone(&other_seen)).await;

    let secrets = tempfile::tempdir().unwrap();
    std::fs::create_dir(secrets.path().join("billing")).unwrap();
    std::fs::write(secrets.path().join("billing/ca.crt"), &pki.ca_pem).unwrap();
    std::fs::write(
        secrets.path().join("billing/authorization"),
        "Bearer s3cret\n",
    )
    .unwrap();
    // `other` names no Secret; `ledger` names one that is not mounted.
    let settings = Settings {
        upstream_secrets_dir: secrets.path().to_owned(),
        ..Settings::default()
    };
    let audit = AuditBuffer::default();
    let sidecar = Sidecar::new(
        settings,
        AuditOutput::Writer(Box::new(audit.clone())),
        false,
    )
    .unwrap();
    let policy_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        policy_dir.path().join("identity.yaml"),
        format!(
            r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: clerk, namespace: shop}}
spec:
  selector: {{serviceAccountName: clerk}}
  toolServers:
    - {{name: billing, url: "https://localhost:{}/mcp", upstreamSecret: billing-upstream}}
    - {{name: other, url: "https://127.0.0.1:{}/mcp"}}
    - {{name: ledger, url: "https://localhost:{}/mcp", upstreamSecret: ledger-upstream}}
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {{name: all, namespace: shop}}
spec:
  targetRefs: [{{name: clerk}}]
  rules: [{{name: allow-all, action: allow, tools: [{{name: "*"}}]}}]
"#,
            billing.port(),
            other.port(),
            billing.port(),
        ),
    )
    .unwrap();
    standalone::load(policy_dir.path(), None, 1, sidecar.snapshots()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let s = sidecar.clone();
    tokio::spawn(async move { s.serve_proxy(listener, std::future::pending()).await });
    let agent = [("authorization", "Bearer agent-token")];

    // The private CA verifies billing's certificate; the Secret's credential
    // replaces the agent's.
    let ok = post_raw(&format!("{base}/billing"), &agent, call_body()).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("done"), "{}", ok.body);
    assert_eq!(*billing_seen.lock().unwrap(), ["Bearer s3cret"]);

    // The same CA signed `other`'s certificate, but it is trusted for
    // billing's host only: the handshake fails and nothing is served.
    let refused = post_raw(&format!("{base}/other"), &agent, call_body()).await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert!(other_seen.lock().unwrap().is_empty());

    // Not mounted: refused with the Secret's name, nothing sent.
    let refused = post_raw(&format!("{base}/ledger"), &agent, call_body()).await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert!(
        refused
            .body
            .contains("upstreamSecret \\\"ledger-upstream\\\" is not mounted"),
        "{}",
        refused.body
    );
    assert_eq!(
        billing_seen.lock().unwrap().len(),
        1,
        "ledger's call reached the server"
    );
}
