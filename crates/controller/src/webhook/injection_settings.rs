//! What the injection webhook needs to know besides the pod: the sidecar's
//! image, the controller it dials, its default resources and the range pod
//! annotations may set them in, and what to do when the webhook cannot decide.
//! Built from the controller's flags by [`InjectionSettings::from_args`] (in
//! `args.rs`); [`super::mutate`] only reads them.

use std::fmt;

use super::quantity::{parse_cpu, parse_memory};

/// Requests and limits of the sidecar, CPU in millicores and memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyResources {
    /// CPU request, millicores.
    pub cpu_request: u64,
    /// CPU limit, millicores (`None`: no limit).
    pub cpu_limit: Option<u64>,
    /// Memory request, bytes.
    pub memory_request: u64,
    /// Memory limit, bytes.
    pub memory_limit: u64,
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: 50,
            cpu_limit: None,
            memory_request: 64 << 20,
            memory_limit: 256 << 20,
        }
    }
}

impl ProxyResources {
    /// The sidecar's runtime worker threads (`CHAPERONE_WORKER_THREADS`): the
    /// CPU it may use, whole cores rounded up, at least one. That is its CPU
    /// limit, else its request (without a limit it may burst past the
    /// request, but the scheduler reserved only that much).
    pub fn worker_threads(&self) -> u64 {
        self.cpu_limit
            .unwrap_or(self.cpu_request)
            .div_ceil(1000)
            .max(1)
    }

    /// Defaults from Kubernetes quantities (`50m`, `64Mi`, …; the chart's
    /// `CHAPERONE_SIDECAR_{CPU,MEMORY}_{REQUEST,LIMIT}`); `None` or empty keeps the
    /// built-in default, except a CPU limit, which stays unset.
    pub fn from_quantities(
        cpu_request: Option<&str>,
        cpu_limit: Option<&str>,
        memory_request: Option<&str>,
        memory_limit: Option<&str>,
    ) -> Result<Self, String> {
        fn given(v: Option<&str>) -> Option<&str> {
            v.map(str::trim).filter(|v| !v.is_empty())
        }
        let mut resources = Self::default();
        if let Some(v) = given(cpu_request) {
            resources.cpu_request = parse_cpu(v).map_err(|e| format!("cpu request {v:?}: {e}"))?;
        }
        if let Some(v) = given(cpu_limit) {
            resources.cpu_limit = Some(parse_cpu(v).map_err(|e| format!("cpu limit {v:?}: {e}"))?);
        }
        if let Some(v) = given(memory_request) {
            resources.memory_request =
                parse_memory(v).map_err(|e| format!("memory request {v:?}: {e}"))?;
        }
        if let Some(v) = given(memory_limit) {
            resources.memory_limit =
                parse_memory(v).map_err(|e| format!("memory limit {v:?}: {e}"))?;
        }
        if resources.memory_request > resources.memory_limit {
            return Err("memory request above the memory limit".to_string());
        }
        if resources
            .cpu_limit
            .is_some_and(|limit| resources.cpu_request > limit)
        {
            return Err("cpu request above the cpu limit".to_string());
        }
        Ok(resources)
    }
}

/// The range an annotation may set a value in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Smallest CPU (request or limit), millicores.
    pub min_cpu: u64,
    /// Largest CPU (request or limit), millicores.
    pub max_cpu: u64,
    /// Smallest memory (request or limit), bytes.
    pub min_memory: u64,
    /// Largest memory (request or limit), bytes.
    pub max_memory: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            min_cpu: 10,
            max_cpu: 4000,
            min_memory: 32 << 20,
            max_memory: 2 << 30,
        }
    }
}

/// What the webhook does for an internal error (it cannot tell whether to inject).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Deny the pod with the reason (matches the webhook's `failurePolicy: Fail`).
    #[default]
    Fail,
    /// Admit the pod unchanged with a warning (`failurePolicy: Ignore`).
    Ignore,
}

impl std::str::FromStr for FailurePolicy {
    type Err = String;

    /// `Fail` or `Ignore`, as in the webhook configuration.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim() {
            "Fail" => Ok(Self::Fail),
            "Ignore" => Ok(Self::Ignore),
            other => Err(format!(
                "failure policy must be Fail or Ignore, not {other:?}"
            )),
        }
    }
}

/// Everything the injection needs to know besides the pod.
#[derive(Clone, PartialEq, Eq)]
pub struct InjectionSettings {
    /// Image of the sidecar.
    pub image: String,
    /// `imagePullPolicy` of the sidecar (`None`: the cluster default).
    pub image_pull_policy: Option<String>,
    /// Address the sidecar dials for snapshots.
    pub controller_address: String,
    /// The controller's namespace (never injected).
    pub controller_namespace: String,
    /// PEM of the CA that signed the controller's certificate, for the sidecar.
    pub ca_pem: String,
    /// Audience of the projected ServiceAccount token.
    pub token_audience: String,
    /// Lifetime of the projected token, seconds (Kubernetes' minimum is 600).
    pub token_expiration_seconds: i64,
    /// Default sidecar resources.
    pub resources: ProxyResources,
    /// Range the resource annotations may use.
    pub bounds: Bounds,
    /// UID and GID the sidecar runs as; `None`: not set, the platform (or the
    /// image's numeric USER) decides.
    pub run_as_user: Option<i64>,
    /// What to do when the webhook cannot decide.
    pub failure_policy: FailurePolicy,
    /// How long the sidecar holds a call awaiting approval (seconds).
    pub approval_hold_seconds: u32,
    /// `OTEL_*` variables the sidecar gets (see [`sidecar_otel_env`]).
    pub otel_env: Vec<(String, String)>,
    /// The Secret (in the pod's namespace, optional) whose key `headers` the
    /// sidecar reads as `OTEL_EXPORTER_OTLP_HEADERS`.
    pub otel_headers_secret: Option<String>,
}

/// The `OTEL_*` variables of the controller's environment `vars` that
/// injected sidecars get too, sorted by name: the exporter's endpoint,
/// protocol, sampler, resource attributes and the like. Not copied:
/// `OTEL_SERVICE_NAME` (a sidecar is `chaperone-sidecar`) and the export
/// headers, which hold credentials and would land in every pod's spec: a
/// sidecar reads those from a Secret of its own namespace
/// ([`InjectionSettings::otel_headers_secret`]).
pub fn sidecar_otel_env(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    use chaperone_telemetry::otlp::{HEADERS_ENV, SERVICE_NAME_ENV, TRACES_HEADERS_ENV};
    const NOT_COPIED: [&str; 3] = [SERVICE_NAME_ENV, HEADERS_ENV, TRACES_HEADERS_ENV];
    let mut env: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(name, _)| name.starts_with("OTEL_") && !NOT_COPIED.contains(&name.as_str()))
        .collect();
    env.sort();
    env
}

impl fmt::Debug for InjectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InjectionSettings")
            .field("image", &self.image)
            .field("controller_address", &self.controller_address)
            .field("controller_namespace", &self.controller_namespace)
            .field("ca_pem_len", &self.ca_pem.len())
            .field("resources", &self.resources)
            .field("failure_policy", &self.failure_policy)
            .finish_non_exhaustive()
    }
}

impl InjectionSettings {
    /// Default settings for `image`, a controller at `controller_address` in
    /// `controller_namespace`; `ca_pem` empty until the server fills it in.
    pub fn new(
        image: impl Into<String>,
        controller_address: impl Into<String>,
        controller_namespace: impl Into<String>,
    ) -> Self {
        Self {
            image: image.into(),
            image_pull_policy: None,
            controller_address: controller_address.into(),
            controller_namespace: controller_namespace.into(),
            ca_pem: String::new(),
            token_audience: crate::auth::TOKEN_AUDIENCE.to_string(),
            token_expiration_seconds: 600,
            resources: ProxyResources::default(),
            bounds: Bounds::default(),
            run_as_user: None,
            failure_policy: FailurePolicy::Fail,
            approval_hold_seconds: 20,
            otel_env: Vec::new(),
            otel_headers_secret: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_get_the_exporter_settings_but_not_its_credentials_or_name() {
        let vars = [
            ("OTEL_SERVICE_NAME", "chaperone-controller"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer secret"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x=y"),
            ("RUST_LOG", "debug"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(
            sidecar_otel_env(vars),
            vec![
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                    "http://collector:4317".to_owned()
                ),
                ("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(), "grpc".to_owned()),
            ]
        );
    }

    #[test]
    fn default_resources_come_from_quantities() {
        let r =
            ProxyResources::from_quantities(Some("100m"), Some("1"), Some("128Mi"), None).unwrap();
        assert_eq!(r.cpu_request, 100);
        assert_eq!(r.cpu_limit, Some(1000));
        assert_eq!(r.memory_request, 128 << 20);
        assert_eq!(r.memory_limit, ProxyResources::default().memory_limit);
        assert_eq!(
            ProxyResources::from_quantities(None, Some(""), None, None),
            Ok(ProxyResources::default())
        );
        assert!(ProxyResources::from_quantities(None, None, Some("1Gi"), Some("64Mi")).is_err());
        assert!(ProxyResources::from_quantities(Some("lots"), None, None, None).is_err());
        assert_eq!("Ignore".parse(), Ok(FailurePolicy::Ignore));
        assert!("fail".parse::<FailurePolicy>().is_err());
    }
}
