//! Command-line flags and environment of `chaperone-controller`, in one place.

use std::{net::SocketAddr, path::PathBuf};

/// Settings of the controller; every flag can also be given as an environment
/// variable (the Helm chart uses both).
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "chaperone-controller", version, about)]
pub struct Args {
    /// Namespace the controller runs in (its Secret, Lease and Services live here).
    #[arg(long, env = "CHAPERONE_NAMESPACE", default_value = "chaperone-system")]
    pub namespace: String,

    /// This replica's name (the leader-election identity); the pod name in-cluster.
    #[arg(long, env = "POD_NAME", default_value = "chaperone-controller")]
    pub pod_name: String,

    /// Address of the snapshot gRPC server (TLS).
    #[arg(long, env = "CHAPERONE_GRPC_ADDR", default_value = "0.0.0.0:9090")]
    pub grpc_addr: SocketAddr,

    /// Address of the injection webhook (HTTPS, path /inject).
    #[arg(long, env = "CHAPERONE_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,

    /// Address of the admin server: /metrics, /healthz, /readyz,
    /// /.well-known/jwks.json (plain HTTP).
    #[arg(long, env = "CHAPERONE_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    pub admin_addr: SocketAddr,

    /// Name of the Secret (in --namespace) holding the controller's CA and serving
    /// certificate; created when absent, shared by the replicas.
    #[arg(
        long,
        env = "CHAPERONE_TLS_SECRET",
        default_value = "chaperone-controller-tls"
    )]
    pub tls_secret: String,

    /// Name of the controller's Service: its DNS names go into the serving
    /// certificate, and sidecars dial `<service>.<namespace>.svc:<grpc port>`.
    #[arg(
        long,
        env = "CHAPERONE_SERVICE_NAME",
        default_value = "chaperone-controller"
    )]
    pub service_name: String,

    /// Extra DNS names or IP addresses for the serving certificate (repeatable).
    #[arg(
        long = "extra-san",
        env = "CHAPERONE_EXTRA_SANS",
        value_delimiter = ','
    )]
    pub extra_sans: Vec<String>,

    /// MutatingWebhookConfiguration whose caBundle the controller keeps current.
    #[arg(
        long,
        env = "CHAPERONE_WEBHOOK_CONFIG",
        default_value = "chaperone-injector"
    )]
    pub webhook_config: String,

    /// Name of the coordination.k8s.io Lease used for leader election.
    #[arg(
        long,
        env = "CHAPERONE_LEASE_NAME",
        default_value = "chaperone-controller"
    )]
    pub lease_name: String,

    /// Image of the injected sidecar.
    #[arg(
        long,
        env = "CHAPERONE_SIDECAR_IMAGE",
        default_value = "ghcr.io/chaperone-dev/chaperone-sidecar:0.1.0"
    )]
    pub sidecar_image: String,

    /// Address sidecars dial for snapshots (default `<service>.<namespace>.svc:<grpc port>`).
    #[arg(long, env = "CHAPERONE_CONTROLLER_ADDRESS")]
    pub controller_address: Option<String>,

    /// Write the CA bundle sidecars trust into this file as well (local runs).
    #[arg(long, env = "CHAPERONE_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Log format: `json` (default, for Kubernetes) or `text`.
    #[arg(long, env = "CHAPERONE_LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

impl Args {
    /// The address injected sidecars dial for snapshots.
    pub fn controller_address(&self) -> String {
        self.controller_address.clone().unwrap_or_else(|| {
            format!(
                "{}.{}.svc:{}",
                self.service_name,
                self.namespace,
                self.grpc_addr.port()
            )
        })
    }
}
