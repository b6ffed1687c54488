//! Command-line flags and environment of `chaperone-controller`, in one place.
//!
//! Values clap cannot check alone (quantities, policies spelled as Kubernetes
//! spells them) are kept as text here and checked at startup by the settings
//! they feed ([`crate::webhook::InjectionSettings::from_args`]), with an
//! [`InvalidSetting`] error that names the variable, the flag and the reason.

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

    /// `imagePullPolicy` of injected sidecars: `Always`, `IfNotPresent` or
    /// `Never`; unset or empty: the cluster's default.
    #[arg(long, env = "CHAPERONE_SIDECAR_IMAGE_PULL_POLICY")]
    pub sidecar_image_pull_policy: Option<String>,

    /// Default CPU request of injected sidecars, a quantity (`50m`, `0.1`);
    /// unset or empty: 50m.
    #[arg(long, env = "CHAPERONE_SIDECAR_CPU_REQUEST")]
    pub sidecar_cpu_request: Option<String>,

    /// Default CPU limit of injected sidecars; unset or empty: none.
    #[arg(long, env = "CHAPERONE_SIDECAR_CPU_LIMIT")]
    pub sidecar_cpu_limit: Option<String>,

    /// Default memory request of injected sidecars, a quantity (`64Mi`); unset
    /// or empty: 64Mi.
    #[arg(long, env = "CHAPERONE_SIDECAR_MEMORY_REQUEST")]
    pub sidecar_memory_request: Option<String>,

    /// Default memory limit of injected sidecars, a quantity (`256Mi`); unset or
    /// empty: 256Mi.
    #[arg(long, env = "CHAPERONE_SIDECAR_MEMORY_LIMIT")]
    pub sidecar_memory_limit: Option<String>,

    /// What the webhook answers when it cannot decide (e.g. a namespace it
    /// cannot read): `Fail` denies the pod with the reason, `Ignore` admits it
    /// unchanged with a warning. Keep it equal to the webhook configuration's
    /// `failurePolicy`.
    #[arg(long, env = "CHAPERONE_WEBHOOK_FAILURE_POLICY", default_value = "Fail")]
    pub webhook_failure_policy: String,

    /// The TLS Secret is written by someone else (cert-manager): read it
    /// (`ca.crt`, `tls.crt`, `tls.key`), never create or renew it, and leave the
    /// webhook's caBundle alone (cert-manager's CA injector keeps it).
    /// `true` or `false`; the bare flag means `true`.
    #[arg(
        long,
        env = "CHAPERONE_EXTERNAL_TLS",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_external_tls
    )]
    pub external_tls: bool,

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

fn parse_external_tls(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" | "" => Ok(false),
        _ => Err(format!(
            "CHAPERONE_EXTERNAL_TLS (--external-tls) must be true or false, not {value:?}"
        )),
    }
}

/// A setting the controller cannot start with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {env} (--{flag}) {value:?}: {reason}")]
pub struct InvalidSetting {
    /// The environment variable.
    pub env: &'static str,
    /// The flag (without `--`).
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidSetting {
    /// An error for the setting `env` / `--flag` with `value`.
    pub fn new(
        env: &'static str,
        flag: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            env,
            flag,
            value: value.into(),
            reason: reason.into(),
        }
    }
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
