//! Command-line flags and environment of `chaperone-controller`, in one place,
//! and the settings built from them: the webhook's
//! [`InjectionSettings::from_args`], the certificates' [`CertConfig::from_args`]
//! and the approval flow's [`Args::approval_settings`].
//! The modules they configure take those settings and never read [`Args`].
//!
//! Values clap cannot check alone (quantities, policies spelled as Kubernetes
//! spells them) are kept as text in [`Args`] and checked at startup when the
//! settings are built, with an [`InvalidSetting`] error that names the
//! variable, the flag and the reason.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    approvals::ApprovalSettings,
    certs::{CertConfig, CertSource, Lifetimes, service_sans},
    webhook::{
        InjectionSettings, ProxyResources,
        quantity::{parse_cpu, parse_memory},
    },
};

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

    /// Address of the admin server: /metrics, /livez, /readyz,
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

    /// How long a decided ToolCallApproval (used, denied or expired) is kept
    /// before it is deleted: a duration like `90s`, `15m` or `1h30m`, at
    /// least one second.
    #[arg(
        long,
        env = "CHAPERONE_APPROVAL_RETENTION",
        default_value = "1h",
        value_parser = parse_retention
    )]
    pub approval_retention: Duration,

    /// How many days the audit-key archive keeps a sidecar's public key
    /// after the last UTC day the sidecar was connected (1 to 3650): audit
    /// trails older than that no longer verify strictly with the archive.
    #[arg(
        long,
        env = "CHAPERONE_AUDIT_KEY_RETENTION_DAYS",
        default_value_t = 400,
        value_parser = clap::value_parser!(u16).range(1..=3650)
    )]
    pub audit_key_retention_days: u16,

    /// How long injected sidecars hold a call that needs a person's approval
    /// before answering that it is pending (seconds, 1 to 3600); the
    /// sidecar's `CHAPERONE_APPROVAL_HOLD_SECONDS`.
    #[arg(
        long,
        env = "CHAPERONE_SIDECAR_APPROVAL_HOLD_SECONDS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..=3600)
    )]
    pub sidecar_approval_hold_seconds: u32,

    /// A Secret, in each injected pod's namespace, whose key `headers` the
    /// sidecar reads as `OTEL_EXPORTER_OTLP_HEADERS` (optional: a pod
    /// without it exports without headers). The controller's own `OTEL_*`
    /// variables, but for the headers and the service name, are copied into
    /// every injected sidecar.
    #[arg(long, env = "CHAPERONE_SIDECAR_OTEL_HEADERS_SECRET")]
    pub sidecar_otel_headers_secret: Option<String>,

    /// UID and GID injected sidecars run as; empty (default): none set, so
    /// the image's numeric non-root USER (65532) applies, or the one the
    /// platform assigns (OpenShift's restricted profiles).
    #[arg(long, env = "CHAPERONE_SIDECAR_RUN_AS_USER", default_value = "")]
    pub sidecar_run_as_user: String,

    /// The controller's own ServiceAccount (in --namespace): the approval
    /// webhook admits creations of ToolCallApprovals, and status updates that
    /// never decide, from `system:serviceaccount:<namespace>:<this>` only. The
    /// chart sets it from the pod's `spec.serviceAccountName`; unset or empty,
    /// the controller asks the API server who it is (SelfSubjectReview).
    #[arg(long, env = "CHAPERONE_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// Log format: `json` or `text`; unset, JSON unless stderr is a
    /// terminal.
    #[arg(long, env = chaperone_telemetry::LOG_FORMAT_ENV, value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,
}

pub use chaperone_telemetry::LogFormat;

fn parse_log_format(value: &str) -> Result<LogFormat, String> {
    value
        .parse()
        .map_err(|e: chaperone_telemetry::InvalidLogFormat| e.to_string())
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

fn parse_retention(value: &str) -> Result<Duration, String> {
    match chaperone_policy::parse_duration_seconds(value.trim()) {
        Ok(0) => Err(format!(
            "CHAPERONE_APPROVAL_RETENTION (--approval-retention) must be at least 1s, not {value:?}"
        )),
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(error) => Err(format!(
            "CHAPERONE_APPROVAL_RETENTION (--approval-retention): {error}"
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
    /// The approval flow's settings.
    pub fn approval_settings(&self) -> ApprovalSettings {
        ApprovalSettings {
            retention: self.approval_retention,
            ..ApprovalSettings::default()
        }
    }

    /// The username the controller's ServiceAccount authenticates as, when
    /// `--service-account` names it.
    pub fn service_account_username(&self) -> Option<String> {
        self.service_account
            .as_deref()
            .map(str::trim)
            .filter(|sa| !sa.is_empty())
            .map(|sa| crate::webhook::approval::service_account_username(&self.namespace, sa))
    }

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

impl InjectionSettings {
    /// Settings from the controller's flags (the chart's
    /// `CHAPERONE_SIDECAR_*` and `CHAPERONE_WEBHOOK_FAILURE_POLICY`); `ca_pem`
    /// is filled in from the controller's current certificate. A value that
    /// cannot be used is an error naming its variable, so that the controller
    /// refuses to start rather than inject sidecars it was not asked for.
    pub fn from_args(args: &Args) -> Result<Self, InvalidSetting> {
        let mut settings = Self::new(
            &args.sidecar_image,
            args.controller_address(),
            &args.namespace,
        );
        settings.image_pull_policy = args
            .sidecar_image_pull_policy
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| match v {
                "Always" | "IfNotPresent" | "Never" => Ok(v.to_string()),
                _ => Err(InvalidSetting::new(
                    "CHAPERONE_SIDECAR_IMAGE_PULL_POLICY",
                    "sidecar-image-pull-policy",
                    v,
                    "expected Always, IfNotPresent or Never (as Kubernetes spells them), or empty for the cluster's default",
                )),
            })
            .transpose()?;
        settings.resources = sidecar_resources(args)?;
        settings.approval_hold_seconds = args.sidecar_approval_hold_seconds;
        settings.otel_env = crate::webhook::sidecar_otel_env(std::env::vars());
        settings.otel_headers_secret = args
            .sidecar_otel_headers_secret
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        settings.run_as_user = match args.sidecar_run_as_user.trim() {
            "" => None,
            uid => Some(uid.parse::<i64>().ok().filter(|u| *u > 0).ok_or_else(|| {
                InvalidSetting::new(
                    "CHAPERONE_SIDECAR_RUN_AS_USER",
                    "sidecar-run-as-user",
                    uid,
                    "expected a UID above 0, or empty to let the platform assign one",
                )
            })?),
        };
        settings.failure_policy = args.webhook_failure_policy.parse().map_err(|reason| {
            InvalidSetting::new(
                "CHAPERONE_WEBHOOK_FAILURE_POLICY",
                "webhook-failure-policy",
                &args.webhook_failure_policy,
                reason,
            )
        })?;
        Ok(settings)
    }
}

/// The default sidecar resources of the controller's flags, each quantity
/// checked on its own (so the error names its variable), then together.
fn sidecar_resources(args: &Args) -> Result<ProxyResources, InvalidSetting> {
    /// (variable, flag, value, parser).
    type Quantity<'a> = (
        &'static str,
        &'static str,
        Option<&'a str>,
        fn(&str) -> Result<u64, String>,
    );
    let settings: [Quantity<'_>; 4] = [
        (
            "CHAPERONE_SIDECAR_CPU_REQUEST",
            "sidecar-cpu-request",
            args.sidecar_cpu_request.as_deref(),
            parse_cpu,
        ),
        (
            "CHAPERONE_SIDECAR_CPU_LIMIT",
            "sidecar-cpu-limit",
            args.sidecar_cpu_limit.as_deref(),
            parse_cpu,
        ),
        (
            "CHAPERONE_SIDECAR_MEMORY_REQUEST",
            "sidecar-memory-request",
            args.sidecar_memory_request.as_deref(),
            parse_memory,
        ),
        (
            "CHAPERONE_SIDECAR_MEMORY_LIMIT",
            "sidecar-memory-limit",
            args.sidecar_memory_limit.as_deref(),
            parse_memory,
        ),
    ];
    for (env, flag, value, parse) in settings {
        if let Some(value) = value.filter(|v| !v.trim().is_empty()) {
            match parse(value) {
                Ok(0) => {
                    return Err(InvalidSetting::new(env, flag, value, "must be above zero"));
                }
                Ok(_) => {}
                Err(reason) => return Err(InvalidSetting::new(env, flag, value, reason)),
            }
        }
    }
    ProxyResources::from_quantities(
        args.sidecar_cpu_request.as_deref(),
        args.sidecar_cpu_limit.as_deref(),
        args.sidecar_memory_request.as_deref(),
        args.sidecar_memory_limit.as_deref(),
    )
    .map_err(|reason| {
        let (env, flag, value) = if reason.starts_with("memory") {
            (
                "CHAPERONE_SIDECAR_MEMORY_LIMIT",
                "sidecar-memory-limit",
                args.sidecar_memory_limit.clone(),
            )
        } else {
            (
                "CHAPERONE_SIDECAR_CPU_LIMIT",
                "sidecar-cpu-limit",
                args.sidecar_cpu_limit.clone(),
            )
        };
        InvalidSetting::new(env, flag, value.unwrap_or_default(), reason)
    })
}

impl CertConfig {
    /// The configuration the controller's flags describe: SANs for its Service
    /// ([`service_sans`]) plus `--extra-san`, default lifetimes, hourly checks;
    /// with `--external-tls`, an externally issued Secret re-read every five
    /// minutes (one GET) so that cert-manager's rotations are picked up soon.
    pub fn from_args(args: &Args) -> Self {
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

#[cfg(test)]
#[path = "args_tests.rs"]
mod tests;
