//! The injection itself, as a pure function: a pod, its namespace's labels, the
//! injection settings and the AgentIdentities of the cluster in, a JSON patch and
//! admission warnings out. No I/O; the server only moves bytes to and from it.

use std::{collections::BTreeMap, fmt};

use chaperone_api::AgentIdentity;
use k8s_openapi::api::core::v1::Pod;

use crate::InvalidSetting;
use serde_json::{Value, json};

/// Pod annotation that asks for injection: `"true"` (an agent), `"tool"` (inbound
/// only, in front of a tool server) or `"false"` (never, even when the namespace
/// asks for it).
pub const INJECT_ANNOTATION: &str = "chaperone.dev/inject";
/// Namespace label that turns injection on for every pod that does not say
/// `"false"`: value `enabled`.
pub const INJECTION_LABEL: &str = "chaperone.dev/injection";
/// Name of the injected sidecar (an init container with `restartPolicy: Always`).
pub const SIDECAR_NAME: &str = "chaperone-proxy";
/// Name of the projected ServiceAccount token volume.
pub const TOKEN_VOLUME: &str = "chaperone-token";
/// Where the sidecar finds its ServiceAccount token (audience `chaperone`).
pub const TOKEN_DIR: &str = "/var/run/secrets/chaperone";
/// The variable that tells app containers where their MCP proxy is.
pub const MCP_URL_ENV: &str = "CHAPERONE_MCP_URL";
/// Its value: the sidecar's outbound port on loopback.
pub const MCP_URL: &str = "http://127.0.0.1:15001";
/// The sidecar's outbound MCP port (agent → tools).
pub const OUTBOUND_PORT: i32 = 15001;
/// The sidecar's inbound port (delegated calls, or calls to a tool server).
pub const INBOUND_PORT: i32 = 15006;
/// The sidecar's admin port (`/ready`, `/metrics`).
pub const ADMIN_PORT: i32 = 15090;

/// Annotation naming the pod's own MCP port (1–65535) that the sidecar's
/// inbound listener (:15006) fronts: delegated calls (agent mode) or calls to the
/// tool server (tool mode) are verified there and forwarded to
/// `http://127.0.0.1:<port>` (the sidecar's `CHAPERONE_INBOUND_UPSTREAM`).
/// Required in tool mode.
pub const INBOUND_PORT_ANNOTATION: &str = "chaperone.dev/inbound-port";
/// Annotation listing extra `aud` values the sidecar's inbound side accepts in
/// assertions (comma-separated, passed verbatim as
/// `CHAPERONE_INBOUND_AUDIENCES`): the audience the calling agents'
/// AgentIdentities name for this server. Required in tool mode.
pub const AUDIENCE_ANNOTATION: &str = "chaperone.dev/audience";
/// Sidecar variable: where the inbound listener forwards verified calls.
pub const INBOUND_UPSTREAM_ENV: &str = "CHAPERONE_INBOUND_UPSTREAM";
/// Sidecar variable: extra audiences the inbound listener accepts.
pub const INBOUND_AUDIENCES_ENV: &str = "CHAPERONE_INBOUND_AUDIENCES";

/// Annotation overriding the sidecar's CPU request.
pub const CPU_ANNOTATION: &str = "chaperone.dev/proxy-cpu";
/// Annotation overriding the sidecar's CPU limit.
pub const CPU_LIMIT_ANNOTATION: &str = "chaperone.dev/proxy-cpu-limit";
/// Annotation overriding the sidecar's memory request.
pub const MEMORY_ANNOTATION: &str = "chaperone.dev/proxy-memory";
/// Annotation overriding the sidecar's memory limit.
pub const MEMORY_LIMIT_ANNOTATION: &str = "chaperone.dev/proxy-memory-limit";

/// Namespaces the webhook never injects into (besides the controller's own).
pub const NEVER_INJECTED: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// How the sidecar runs in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In front of an agent: outbound calls through 15001, delegated calls on 15006.
    Agent,
    /// In front of a tool server: inbound verification only.
    Tool,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Agent => "agent",
            Mode::Tool => "tool",
        }
    }
}

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

/// The default sidecar resources of the controller's flags, each quantity
/// checked on its own (so the error names its variable), then together.
fn sidecar_resources(args: &crate::Args) -> Result<ProxyResources, InvalidSetting> {
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
    /// UID and GID the sidecar runs as.
    pub run_as_user: i64,
    /// What to do when the webhook cannot decide.
    pub failure_policy: FailurePolicy,
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
    /// Settings from the controller's flags (the chart's
    /// `CHAPERONE_SIDECAR_*` and `CHAPERONE_WEBHOOK_FAILURE_POLICY`); `ca_pem`
    /// is filled in from the controller's current certificate. A value that
    /// cannot be used is an error naming its variable, so that the controller
    /// refuses to start rather than inject sidecars it was not asked for.
    pub fn from_args(args: &crate::Args) -> Result<Self, InvalidSetting> {
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
            token_audience: "chaperone".to_string(),
            token_expiration_seconds: 600,
            resources: ProxyResources::default(),
            bounds: Bounds::default(),
            run_as_user: 65532,
            failure_policy: FailurePolicy::Fail,
        }
    }
}

/// What the webhook answers for a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectionOutcome {
    /// The patch to apply (empty: admit unchanged).
    pub patch: json_patch::Patch,
    /// Admission warnings for the client that created the pod.
    pub warnings: Vec<String>,
    /// What was decided, for logs and metrics.
    pub decision: Decision,
}

/// What the webhook decided for a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The sidecar was added in this mode.
    Injected(Mode),
    /// The pod already has the sidecar: unchanged.
    AlreadyInjected,
    /// Neither the pod nor its namespace asks for injection, or the pod opts out.
    NotRequested,
    /// Injection is asked for in a namespace that is never injected.
    ExcludedNamespace,
    /// The namespace asks for injection, but the pod uses the host network.
    HostNetwork,
}

/// Why a pod that asks for injection is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectionError {
    /// An annotation has a value the webhook cannot use.
    #[error("annotation {annotation}={value:?} is invalid: {reason}")]
    InvalidAnnotation {
        /// The annotation.
        annotation: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The pod asks for injection but shares the node's network namespace.
    #[error(
        "pod asks for the chaperone sidecar ({INJECT_ANNOTATION}) but uses hostNetwork: the sidecar's ports would be the node's; remove hostNetwork or the annotation"
    )]
    HostNetwork,
    /// The pod object lacks something the patch needs.
    #[error("pod cannot be injected: {0}")]
    InvalidPod(String),
    /// A tool-mode pod lacks an annotation its sidecar cannot work without.
    #[error(
        "pod asks for a tool-mode chaperone sidecar ({INJECT_ANNOTATION}: \"tool\") but has no {annotation} annotation: add {annotation}: {example}; {why}"
    )]
    MissingAnnotation {
        /// The missing annotation.
        annotation: &'static str,
        /// An example value.
        example: &'static str,
        /// Why the sidecar needs it.
        why: &'static str,
    },
}

/// Decides whether `pod` (in a namespace with `namespace_labels`) gets the
/// sidecar, and returns the JSON patch that adds it: the native sidecar first
/// among the init containers, the token volume, and `CHAPERONE_MCP_URL` in every
/// app container. A pod that already has the sidecar gets an empty patch. A pod
/// that asks for an agent sidecar but is matched by no AgentIdentity of
/// `identities` is injected with a warning naming the AgentIdentity to create.
pub fn injection_patch(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    settings: &InjectionSettings,
    identities: &[impl AsRef<AgentIdentity>],
) -> Result<InjectionOutcome, InjectionError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = annotations
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .map(|v| v.trim().to_ascii_lowercase());
    let explicit = match annotation.as_deref() {
        Some("true") => Some(Mode::Agent),
        Some("tool") => Some(Mode::Tool),
        Some("false") => return Ok(unchanged(Decision::NotRequested, vec![])),
        Some(other) => {
            return Err(InjectionError::InvalidAnnotation {
                annotation: INJECT_ANNOTATION,
                value: other.to_string(),
                reason: "expected \"true\", \"tool\" or \"false\"".to_string(),
            });
        }
        None => None,
    };
    let by_namespace = namespace_labels
        .get(INJECTION_LABEL)
        .is_some_and(|v| v == "enabled");
    let Some(mode) = explicit.or(by_namespace.then_some(Mode::Agent)) else {
        return Ok(unchanged(Decision::NotRequested, vec![]));
    };

    if NEVER_INJECTED.contains(&namespace) || namespace == settings.controller_namespace {
        let warnings = if explicit.is_some() {
            vec![format!(
                "chaperone sidecar not injected: namespace {namespace} is never injected"
            )]
        } else {
            vec![]
        };
        return Ok(unchanged(Decision::ExcludedNamespace, warnings));
    }

    let Some(spec) = pod.spec.as_ref() else {
        return Err(InjectionError::InvalidPod("it has no spec".to_string()));
    };
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    if init_containers.iter().any(|c| c.name == SIDECAR_NAME)
        || spec.containers.iter().any(|c| c.name == SIDECAR_NAME)
    {
        return Ok(unchanged(Decision::AlreadyInjected, vec![]));
    }
    if spec.host_network == Some(true) {
        if explicit.is_some() {
            return Err(InjectionError::HostNetwork);
        }
        return Ok(unchanged(
            Decision::HostNetwork,
            vec![format!(
                "chaperone sidecar not injected: the pod uses hostNetwork (namespace label {INJECTION_LABEL}=enabled ignored)"
            )],
        ));
    }

    let resources = proxy_resources(annotations, settings)?;
    let inbound = inbound_settings(mode, annotations)?;
    let mut ops = Vec::new();

    // The sidecar goes first so that it is up before the other init containers run
    // (they may already call tools).
    let sidecar = sidecar_container(mode, settings, resources, &inbound);
    if spec.init_containers.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [sidecar]}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": sidecar}));
    }

    let volume = json!({
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [{
                "serviceAccountToken": {
                    "audience": settings.token_audience,
                    "expirationSeconds": settings.token_expiration_seconds,
                    "path": "token",
                }
            }]
        }
    });
    match spec.volumes.as_deref() {
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]})),
        Some(volumes) if volumes.iter().any(|v| v.name == TOKEN_VOLUME) => {
            return Err(InjectionError::InvalidPod(format!(
                "it already has a volume named {TOKEN_VOLUME}"
            )));
        }
        Some(_) => ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume})),
    }

    // A projected ServiceAccount token needs a ServiceAccount name. The
    // ServiceAccount admission plugin normally sets `default` before webhooks
    // run; where it is off, set it here as it would.
    if spec
        .service_account_name
        .as_deref()
        .is_none_or(str::is_empty)
    {
        ops.push(json!({"op": "add", "path": "/spec/serviceAccountName", "value": "default"}));
    }

    // Only an agent has an outbound proxy to point at: a tool-mode sidecar
    // serves the inbound side alone (nothing listens on its 15001).
    let mcp_env = json!({"name": MCP_URL_ENV, "value": MCP_URL});
    let app_containers = match mode {
        Mode::Agent => spec.containers.as_slice(),
        Mode::Tool => &[],
    };
    for (i, container) in app_containers.iter().enumerate() {
        match container.env.as_deref() {
            None => ops.push(json!({
                "op": "add", "path": format!("/spec/containers/{i}/env"), "value": [mcp_env]
            })),
            // The pod's own value wins (a test pointing the agent elsewhere).
            Some(env) if env.iter().any(|e| e.name == MCP_URL_ENV) => {}
            Some(_) => ops.push(json!({
                "op": "add", "path": format!("/spec/containers/{i}/env/-"), "value": mcp_env
            })),
        }
    }

    let mut warnings = Vec::new();
    if mode == Mode::Agent {
        let service_account = spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let matched = identities.iter().map(AsRef::as_ref).any(|identity| {
            identity.metadata.namespace.as_deref() == Some(namespace)
                && selects(identity, service_account, &labels)
        });
        if !matched {
            warnings.push(format!(
                "no AgentIdentity in namespace {namespace} selects this pod: create one with spec.selector.serviceAccountName: {service_account}; until then its chaperone sidecar denies every call"
            ));
        }
    }

    let patch = serde_json::from_value(Value::Array(ops))
        .map_err(|e| InjectionError::InvalidPod(format!("building the patch: {e}")))?;
    Ok(InjectionOutcome {
        patch,
        warnings,
        decision: Decision::Injected(mode),
    })
}

/// Whether `identity` selects a pod running as `service_account` with `labels`
/// (same namespace assumed).
pub fn selects(
    identity: &AgentIdentity,
    service_account: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let selector = &identity.spec.0.selector;
    selector.service_account_name == service_account
        && selector
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
}

fn unchanged(decision: Decision, warnings: Vec<String>) -> InjectionOutcome {
    InjectionOutcome {
        patch: json_patch::Patch(Vec::new()),
        warnings,
        decision,
    }
}

/// What the sidecar's inbound listener fronts and accepts, from the pod's
/// annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct InboundSettings {
    /// `http://127.0.0.1:<port>`.
    upstream: Option<String>,
    /// Extra audiences, verbatim.
    audiences: Option<String>,
}

/// Reads [`INBOUND_PORT_ANNOTATION`] and [`AUDIENCE_ANNOTATION`]; both are
/// required in tool mode (fail closed: a tool sidecar that does not know what it
/// fronts or which audience is its own cannot verify anything).
fn inbound_settings(
    mode: Mode,
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<InboundSettings, InjectionError> {
    let get = |name: &str| annotations.and_then(|a| a.get(name));
    let upstream = match get(INBOUND_PORT_ANNOTATION) {
        None => None,
        Some(value) => {
            let port = value
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| InjectionError::InvalidAnnotation {
                    annotation: INBOUND_PORT_ANNOTATION,
                    value: value.clone(),
                    reason: "expected a port number from 1 to 65535 (the pod's own MCP port)"
                        .to_string(),
                })?;
            if [OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT].contains(&i32::from(port)) {
                return Err(InjectionError::InvalidAnnotation {
                    annotation: INBOUND_PORT_ANNOTATION,
                    value: value.clone(),
                    reason: format!(
                        "port {port} is the sidecar's own ({OUTBOUND_PORT}, {INBOUND_PORT} and {ADMIN_PORT} are taken): name the port the pod's MCP server listens on"
                    ),
                });
            }
            Some(format!("http://127.0.0.1:{port}"))
        }
    };
    let audiences = match get(AUDIENCE_ANNOTATION) {
        None => None,
        Some(value)
            if value
                .split(',')
                .map(str::trim)
                .all(|audience| audience.is_empty()) =>
        {
            return Err(InjectionError::InvalidAnnotation {
                annotation: AUDIENCE_ANNOTATION,
                value: value.clone(),
                reason: "expected one or more audiences, comma-separated".to_string(),
            });
        }
        Some(value) => Some(value.clone()),
    };
    if mode == Mode::Tool {
        if upstream.is_none() {
            return Err(InjectionError::MissingAnnotation {
                annotation: INBOUND_PORT_ANNOTATION,
                example: "\"8080\" (the port the tool's MCP server listens on)",
                why: "the tool sidecar forwards verified calls to that port on 127.0.0.1 and must know it to front the server",
            });
        }
        if audiences.is_none() {
            return Err(InjectionError::MissingAnnotation {
                annotation: AUDIENCE_ANNOTATION,
                example: "\"orders\" (the audience agents' AgentIdentities name for this server)",
                why: "the tool sidecar accepts only assertions minted for its audience and cannot verify any without it",
            });
        }
    }
    Ok(InboundSettings {
        upstream,
        audiences,
    })
}

fn sidecar_container(
    mode: Mode,
    settings: &InjectionSettings,
    resources: ProxyResources,
    inbound: &InboundSettings,
) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}});
    let mut limits = serde_json::Map::new();
    if let Some(cpu) = resources.cpu_limit {
        limits.insert("cpu".into(), json!(format!("{cpu}m")));
    }
    limits.insert("memory".into(), json!(resources.memory_limit.to_string()));
    // A tool-mode sidecar has no outbound proxy.
    let ports: Vec<Value> = [
        (mode == Mode::Agent).then_some(("mcp-outbound", OUTBOUND_PORT)),
        Some(("mcp-inbound", INBOUND_PORT)),
        Some(("chaperone-admin", ADMIN_PORT)),
    ]
    .into_iter()
    .flatten()
    .map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"}))
    .collect();
    let mut container = json!({
        "name": SIDECAR_NAME,
        "image": settings.image,
        "restartPolicy": "Always",
        "ports": ports,
        "env": [
            {"name": "CHAPERONE_MODE", "value": mode.as_str()},
            field("CHAPERONE_POD_NAME", "metadata.name"),
            field("CHAPERONE_POD_NAMESPACE", "metadata.namespace"),
            field("CHAPERONE_POD_UID", "metadata.uid"),
            field("CHAPERONE_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            {"name": "CHAPERONE_CONTROLLER_ADDRESS", "value": settings.controller_address},
            {"name": "CHAPERONE_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")},
            {"name": "CHAPERONE_CA_PEM", "value": settings.ca_pem},
        ],
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
        ],
        "resources": {
            "requests": {
                "cpu": format!("{}m", resources.cpu_request),
                "memory": resources.memory_request.to_string(),
            },
            "limits": limits,
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": ADMIN_PORT, "scheme": "HTTP"},
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "failureThreshold": 1,
            "successThreshold": 1,
        },
    });
    if let (Some(policy), Some(obj)) = (&settings.image_pull_policy, container.as_object_mut()) {
        obj.insert("imagePullPolicy".into(), json!(policy));
    }
    if let Some(env) = container["env"].as_array_mut() {
        if let Some(upstream) = &inbound.upstream {
            env.push(json!({"name": INBOUND_UPSTREAM_ENV, "value": upstream}));
        }
        if let Some(audiences) = &inbound.audiences {
            env.push(json!({"name": INBOUND_AUDIENCES_ENV, "value": audiences}));
        }
    }
    container
}

/// The sidecar's resources: defaults, overridden by the pod's annotations within
/// the bounds.
fn proxy_resources(
    annotations: Option<&BTreeMap<String, String>>,
    settings: &InjectionSettings,
) -> Result<ProxyResources, InjectionError> {
    let mut resources = settings.resources;
    let bounds = settings.bounds;
    let get = |name: &'static str| annotations.and_then(|a| a.get(name)).map(|v| (name, v));
    let check = |name: &'static str, value: &str, parsed: u64, min: u64, max: u64, unit: &str| {
        if parsed < min || parsed > max {
            Err(InjectionError::InvalidAnnotation {
                annotation: name,
                value: value.to_string(),
                reason: format!("must be between {min}{unit} and {max}{unit}"),
            })
        } else {
            Ok(parsed)
        }
    };
    let invalid =
        |name: &'static str, value: &str, reason: String| InjectionError::InvalidAnnotation {
            annotation: name,
            value: value.to_string(),
            reason,
        };
    if let Some((name, value)) = get(CPU_ANNOTATION) {
        let parsed = parse_cpu(value).map_err(|r| invalid(name, value, r))?;
        resources.cpu_request = check(name, value, parsed, bounds.min_cpu, bounds.max_cpu, "m")?;
    }
    if let Some((name, value)) = get(CPU_LIMIT_ANNOTATION) {
        let parsed = parse_cpu(value).map_err(|r| invalid(name, value, r))?;
        resources.cpu_limit = Some(check(
            name,
            value,
            parsed,
            bounds.min_cpu,
            bounds.max_cpu,
            "m",
        )?);
    }
    if let Some((name, value)) = get(MEMORY_ANNOTATION) {
        let parsed = parse_memory(value).map_err(|r| invalid(name, value, r))?;
        resources.memory_request = check(
            name,
            value,
            parsed,
            bounds.min_memory,
            bounds.max_memory,
            " bytes",
        )?;
    }
    if let Some((name, value)) = get(MEMORY_LIMIT_ANNOTATION) {
        let parsed = parse_memory(value).map_err(|r| invalid(name, value, r))?;
        resources.memory_limit = check(
            name,
            value,
            parsed,
            bounds.min_memory,
            bounds.max_memory,
            " bytes",
        )?;
    }
    // A request raised above the default limit raises the limit with it; an
    // explicit limit below the request is an error.
    if resources.memory_request > resources.memory_limit {
        if get(MEMORY_LIMIT_ANNOTATION).is_some() {
            let value = get(MEMORY_LIMIT_ANNOTATION).map(|(_, v)| v.clone());
            return Err(invalid(
                MEMORY_LIMIT_ANNOTATION,
                value.as_deref().unwrap_or_default(),
                format!(
                    "is below the memory request ({} bytes)",
                    resources.memory_request
                ),
            ));
        }
        resources.memory_limit = resources.memory_request;
    }
    if let Some(limit) = resources.cpu_limit
        && resources.cpu_request > limit
    {
        if get(CPU_LIMIT_ANNOTATION).is_some() {
            let value = get(CPU_LIMIT_ANNOTATION).map(|(_, v)| v.clone());
            return Err(invalid(
                CPU_LIMIT_ANNOTATION,
                value.as_deref().unwrap_or_default(),
                format!("is below the CPU request ({}m)", resources.cpu_request),
            ));
        }
        resources.cpu_limit = Some(resources.cpu_request);
    }
    Ok(resources)
}

/// Parses a Kubernetes CPU quantity (`250m`, `0.5`, `2`) into millicores.
pub fn parse_cpu(value: &str) -> Result<u64, String> {
    let value = value.trim();
    if let Some(milli) = value.strip_suffix('m') {
        return milli
            .parse::<u64>()
            .map_err(|_| "expected millicores such as 250m or cores such as 0.5".to_string());
    }
    let cores: f64 = value
        .parse()
        .map_err(|_| "expected millicores such as 250m or cores such as 0.5".to_string())?;
    if !cores.is_finite() || !(0.0..=1e6).contains(&cores) {
        return Err("out of range".to_string());
    }
    Ok((cores * 1000.0).round() as u64)
}

/// Parses a Kubernetes memory quantity (`64Mi`, `1Gi`, `128M`, `1000000`) into
/// bytes.
pub fn parse_memory(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let expected = || "expected a quantity such as 64Mi, 1Gi or 128M".to_string();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let number: f64 = number.parse().map_err(|_| expected())?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(expected()),
    };
    let bytes = number * multiplier;
    if !bytes.is_finite() || !(0.0..=1e15).contains(&bytes) {
        return Err("out of range".to_string());
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chaperone_api::{AgentIdentitySpecV1, model};

    use super::*;

    const NS: &str = "agents";

    fn settings() -> InjectionSettings {
        InjectionSettings {
            image: "chaperone-sidecar:test".into(),
            image_pull_policy: None,
            controller_address: "chaperone-controller.chaperone-system.svc:9090".into(),
            controller_namespace: "chaperone-system".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n".into(),
            token_audience: "chaperone".into(),
            token_expiration_seconds: 600,
            resources: ProxyResources::default(),
            bounds: Bounds::default(),
            run_as_user: 65532,
            failure_policy: FailurePolicy::Fail,
        }
    }

    fn pod(value: Value) -> Pod {
        let mut base = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "agent", "namespace": NS},
            "spec": {"containers": [{"name": "app", "image": "agent:1"}]},
        });
        merge(&mut base, value);
        serde_json::from_value(base).expect("test pod")
    }

    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(base), Value::Object(patch)) => {
                for (k, v) in patch {
                    merge(base.entry(k).or_insert(Value::Null), v);
                }
            }
            (base, patch) => *base = patch,
        }
    }

    fn annotated(value: &str) -> Value {
        json!({"metadata": {"annotations": {INJECT_ANNOTATION: value}}})
    }

    fn identity(
        name: &str,
        namespace: &str,
        sa: &str,
        labels: &[(&str, &str)],
    ) -> Arc<AgentIdentity> {
        let mut identity = AgentIdentity::new(
            name,
            AgentIdentitySpecV1(model::AgentIdentitySpec {
                selector: model::AgentSelector {
                    service_account_name: sa.into(),
                    match_labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                },
                ..Default::default()
            }),
        );
        identity.metadata.namespace = Some(namespace.into());
        Arc::new(identity)
    }

    fn default_identity() -> Vec<Arc<AgentIdentity>> {
        vec![identity("agent", NS, "default", &[])]
    }

    fn no_labels() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn enabled() -> BTreeMap<String, String> {
        BTreeMap::from([(INJECTION_LABEL.to_string(), "enabled".to_string())])
    }

    fn run(pod: &Pod, labels: &BTreeMap<String, String>) -> InjectionOutcome {
        injection_patch(pod, labels, &settings(), &default_identity()).expect("injection")
    }

    fn apply(pod: &Pod, outcome: &InjectionOutcome) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, &outcome.patch).expect("patch applies");
        serde_json::from_value(doc).expect("patched pod parses")
    }

    fn sidecars(pod: &Pod) -> Vec<&k8s_openapi::api::core::v1::Container> {
        let spec = pod.spec.as_ref().unwrap();
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .filter(|c| c.name == SIDECAR_NAME)
            .collect()
    }

    fn env_value(container: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn annotated_pod_gets_a_native_sidecar() {
        let pod = pod(annotated("true"));
        let outcome = run(&pod, &no_labels());
        assert_eq!(outcome.decision, Decision::Injected(Mode::Agent));
        assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
        let injected = apply(&pod, &outcome);
        let spec = injected.spec.as_ref().unwrap();
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 1);
        let sidecar = &init[0];
        assert_eq!(sidecar.name, SIDECAR_NAME);
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let ports: Vec<i32> = sidecar
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [15001, 15006, 15090]);
        assert_eq!(
            env_value(sidecar, "CHAPERONE_MODE").as_deref(),
            Some("agent")
        );
        assert_eq!(
            env_value(sidecar, "CHAPERONE_CONTROLLER_ADDRESS").as_deref(),
            Some("chaperone-controller.chaperone-system.svc:9090")
        );
        assert_eq!(
            env_value(sidecar, "CHAPERONE_CA_PEM"),
            Some(settings().ca_pem)
        );
        let downward: Vec<_> = sidecar
            .env
            .iter()
            .flatten()
            .filter_map(|e| {
                let path = &e.value_from.as_ref()?.field_ref.as_ref()?.field_path;
                Some((e.name.as_str(), path.as_str()))
            })
            .collect();
        assert_eq!(
            downward,
            [
                ("CHAPERONE_POD_NAME", "metadata.name"),
                ("CHAPERONE_POD_NAMESPACE", "metadata.namespace"),
                ("CHAPERONE_POD_UID", "metadata.uid"),
                ("CHAPERONE_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            ]
        );
        assert_eq!(
            env_value(&spec.containers[0], MCP_URL_ENV).as_deref(),
            Some(MCP_URL)
        );
    }

    #[test]
    fn sidecar_is_locked_down_and_ready_only_with_a_snapshot() {
        let pod = pod(annotated("true"));
        let injected = apply(&pod, &run(&pod, &no_labels()));
        let sidecar = sidecars(&injected)[0];
        let security = sidecar.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let probe = sidecar
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/ready"));
        assert_eq!(
            probe.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15090)
        );
    }

    #[test]
    fn token_volume_is_projected_for_audience_chaperone() {
        let pod = pod(annotated("true"));
        let injected = apply(&pod, &run(&pod, &no_labels()));
        let spec = injected.spec.as_ref().unwrap();
        let volume = &spec.volumes.as_ref().unwrap()[0];
        assert_eq!(volume.name, TOKEN_VOLUME);
        let token = volume.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(token.audience.as_deref(), Some("chaperone"));
        assert_eq!(token.expiration_seconds, Some(600));
        let mount = &sidecars(&injected)[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.mount_path, TOKEN_DIR);
        assert_eq!(mount.read_only, Some(true));
    }

    #[test]
    fn a_pod_without_service_account_gets_default_for_its_token() {
        let pod = pod(annotated("true"));
        let injected = apply(&pod, &run(&pod, &no_labels()));
        assert_eq!(
            injected.spec.unwrap().service_account_name.as_deref(),
            Some("default")
        );
        let named = pod_with_sa("planner");
        let injected = apply(&named, &run(&named, &no_labels()));
        assert_eq!(
            injected.spec.unwrap().service_account_name.as_deref(),
            Some("planner")
        );
    }

    fn pod_with_sa(sa: &str) -> Pod {
        pod(json!({
            "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"serviceAccountName": sa},
        }))
    }

    #[test]
    fn sidecar_goes_before_existing_init_containers() {
        let pod = pod(json!({
            "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"initContainers": [
                {"name": "migrate", "image": "migrate:1"},
                {"name": "warm", "image": "warm:1"},
            ]},
        }));
        let injected = apply(&pod, &run(&pod, &no_labels()));
        let names: Vec<_> = injected
            .spec
            .unwrap()
            .init_containers
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, [SIDECAR_NAME, "migrate", "warm"]);
    }

    #[test]
    fn every_app_container_gets_the_mcp_url_and_keeps_its_env() {
        let pod = pod(json!({
            "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"containers": [
                {"name": "app", "image": "agent:1", "env": [{"name": "A", "value": "1"}]},
                {"name": "helper", "image": "helper:1"},
                {"name": "custom", "image": "c:1", "env": [{"name": MCP_URL_ENV, "value": "http://elsewhere"}]},
            ]},
        }));
        let injected = apply(&pod, &run(&pod, &no_labels()));
        let containers = injected.spec.unwrap().containers;
        assert_eq!(env_value(&containers[0], "A").as_deref(), Some("1"));
        assert_eq!(
            env_value(&containers[0], MCP_URL_ENV).as_deref(),
            Some(MCP_URL)
        );
        assert_eq!(
            env_value(&containers[1], MCP_URL_ENV).as_deref(),
            Some(MCP_URL)
        );
        assert_eq!(
            env_value(&containers[2], MCP_URL_ENV).as_deref(),
            Some("http://elsewhere")
        );
        assert_eq!(containers[2].env.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn existing_volumes_are_kept() {
        let pod = pod(json!({
            "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"volumes": [{"name": "data", "emptyDir": {}}]},
        }));
        let injected = apply(&pod, &run(&pod, &no_labels()));
        let names: Vec<_> = injected
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["data", TOKEN_VOLUME]);
    }

    #[test]
    fn a_clashing_volume_name_is_refused() {
        let pod = pod(json!({
            "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"volumes": [{"name": TOKEN_VOLUME, "emptyDir": {}}]},
        }));
        let err = injection_patch(&pod, &no_labels(), &settings(), &default_identity());
        assert!(matches!(err, Err(InjectionError::InvalidPod(_))));
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let pod = pod(json!({
            "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"initContainers": [{"name": "migrate", "image": "m:1"}]},
        }));
        let once = apply(&pod, &run(&pod, &no_labels()));
        let again = run(&once, &no_labels());
        assert_eq!(again.decision, Decision::AlreadyInjected);
        assert!(again.patch.0.is_empty());
        assert_eq!(sidecars(&once).len(), 1);
    }

    #[test]
    fn plain_pod_is_untouched() {
        let outcome = run(&pod(json!({})), &no_labels());
        assert_eq!(outcome.decision, Decision::NotRequested);
        assert!(outcome.patch.0.is_empty());
        assert!(outcome.warnings.is_empty());
    }

    #[test]
    fn namespace_label_injects_pods_without_the_annotation() {
        let pod = pod(json!({}));
        let outcome = run(&pod, &enabled());
        assert_eq!(outcome.decision, Decision::Injected(Mode::Agent));
        assert_eq!(sidecars(&apply(&pod, &outcome)).len(), 1);
    }

    #[test]
    fn pod_opts_out_of_namespace_injection() {
        let outcome = run(&pod(annotated("false")), &enabled());
        assert_eq!(outcome.decision, Decision::NotRequested);
        assert!(outcome.patch.0.is_empty());
    }

    #[test]
    fn other_namespace_label_values_do_not_inject() {
        let labels = BTreeMap::from([(INJECTION_LABEL.to_string(), "disabled".to_string())]);
        assert_eq!(
            run(&pod(json!({})), &labels).decision,
            Decision::NotRequested
        );
    }

    #[test]
    fn kube_system_and_the_controller_namespace_are_never_injected() {
        for ns in ["kube-system", "chaperone-system"] {
            let pod = pod(json!({
                "metadata": {"namespace": ns, "annotations": {INJECT_ANNOTATION: "true"}},
            }));
            let outcome = run(&pod, &enabled());
            assert_eq!(outcome.decision, Decision::ExcludedNamespace, "{ns}");
            assert!(outcome.patch.0.is_empty());
            assert!(outcome.warnings[0].contains("never injected"));
        }
    }

    fn tool_pod(extra: Value) -> Pod {
        let mut annotations = json!({
            INJECT_ANNOTATION: "tool",
            INBOUND_PORT_ANNOTATION: "8080",
            AUDIENCE_ANNOTATION: "orders",
        });
        merge(&mut annotations, extra);
        pod(json!({"metadata": {"annotations": annotations}}))
    }

    #[test]
    fn tool_mode_sets_the_mode_and_needs_no_agent_identity() {
        let pod = tool_pod(json!({}));
        let outcome = injection_patch(
            &pod,
            &no_labels(),
            &settings(),
            &Vec::<Arc<AgentIdentity>>::new(),
        )
        .unwrap();
        assert_eq!(outcome.decision, Decision::Injected(Mode::Tool));
        assert!(outcome.warnings.is_empty());
        let injected = apply(&pod, &outcome);
        assert_eq!(
            env_value(sidecars(&injected)[0], "CHAPERONE_MODE").as_deref(),
            Some("tool")
        );
        // No outbound proxy in tool mode: no port for it, no URL of it.
        let ports: Vec<i32> = sidecars(&injected)[0]
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [INBOUND_PORT, ADMIN_PORT]);
        let containers = &injected.spec.as_ref().unwrap().containers;
        assert!(
            containers
                .iter()
                .all(|c| env_value(c, MCP_URL_ENV).is_none()),
            "a tool server is told of a proxy that does not exist"
        );
    }

    #[test]
    fn inbound_annotations_become_the_sidecars_inbound_settings() {
        let pod = tool_pod(json!({AUDIENCE_ANNOTATION: "orders,orders.tools.svc"}));
        let injected = apply(&pod, &run(&pod, &no_labels()));
        let sidecar = sidecars(&injected)[0];
        assert_eq!(
            env_value(sidecar, INBOUND_UPSTREAM_ENV).as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            env_value(sidecar, INBOUND_AUDIENCES_ENV).as_deref(),
            Some("orders,orders.tools.svc")
        );
    }

    #[test]
    fn an_agent_pod_may_name_its_inbound_port_and_audience() {
        let agent = pod(json!({"metadata": {"annotations": {
            INJECT_ANNOTATION: "true", INBOUND_PORT_ANNOTATION: " 9000 ",
        }}}));
        let injected = apply(&agent, &run(&agent, &no_labels()));
        let sidecar = sidecars(&injected)[0];
        assert_eq!(
            env_value(sidecar, INBOUND_UPSTREAM_ENV).as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(env_value(sidecar, INBOUND_AUDIENCES_ENV), None);

        let plain = pod(annotated("true"));
        let injected = apply(&plain, &run(&plain, &no_labels()));
        assert_eq!(
            env_value(sidecars(&injected)[0], INBOUND_UPSTREAM_ENV),
            None
        );
    }

    #[test]
    fn a_tool_pod_without_its_inbound_port_or_audience_is_refused_saying_what_to_add() {
        for (missing, present) in [
            (INBOUND_PORT_ANNOTATION, AUDIENCE_ANNOTATION),
            (AUDIENCE_ANNOTATION, INBOUND_PORT_ANNOTATION),
        ] {
            let pod = pod(json!({"metadata": {"annotations": {
                INJECT_ANNOTATION: "tool", present: "8080",
            }}}));
            let err = injection_patch(
                &pod,
                &no_labels(),
                &settings(),
                &Vec::<Arc<AgentIdentity>>::new(),
            )
            .unwrap_err();
            assert!(
                matches!(err, InjectionError::MissingAnnotation { annotation, .. } if annotation == missing),
                "{err}"
            );
            let message = err.to_string();
            assert!(message.contains(&format!("add {missing}:")), "{message}");
            assert!(message.contains("tool sidecar"), "{message}");
        }
    }

    #[test]
    fn invalid_inbound_annotations_are_refused_naming_the_annotation() {
        for (annotation, value, expected) in [
            (INBOUND_PORT_ANNOTATION, "0", "1 to 65535"),
            (INBOUND_PORT_ANNOTATION, "65536", "1 to 65535"),
            (INBOUND_PORT_ANNOTATION, "-1", "1 to 65535"),
            (INBOUND_PORT_ANNOTATION, "http", "1 to 65535"),
            (INBOUND_PORT_ANNOTATION, "15006", "sidecar's own"),
            (AUDIENCE_ANNOTATION, " , ", "one or more audiences"),
        ] {
            let err = injection_patch(
                &tool_pod(json!({annotation: value})),
                &no_labels(),
                &settings(),
                &default_identity(),
            )
            .unwrap_err();
            assert!(
                matches!(&err, InjectionError::InvalidAnnotation { annotation: a, .. } if *a == annotation),
                "{annotation}={value}: {err}"
            );
            let message = err.to_string();
            assert!(
                message.contains(annotation) && message.contains(expected),
                "{annotation}={value}: {message}"
            );
        }
    }

    #[test]
    fn unknown_annotation_value_is_refused_with_the_reason() {
        let err = injection_patch(
            &pod(annotated("yes")),
            &no_labels(),
            &settings(),
            &default_identity(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("\"true\", \"tool\" or \"false\""),
            "{err}"
        );
    }

    #[test]
    fn host_network_pod_that_asks_is_refused() {
        let pod = pod(json!({
            "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"hostNetwork": true},
        }));
        let err = injection_patch(&pod, &no_labels(), &settings(), &default_identity());
        assert_eq!(err, Err(InjectionError::HostNetwork));
    }

    #[test]
    fn host_network_pod_in_an_injected_namespace_is_skipped_with_a_warning() {
        let outcome = run(&pod(json!({"spec": {"hostNetwork": true}})), &enabled());
        assert_eq!(outcome.decision, Decision::HostNetwork);
        assert!(outcome.patch.0.is_empty());
        assert!(outcome.warnings[0].contains("hostNetwork"));
    }

    #[test]
    fn pod_without_agent_identity_is_injected_with_a_warning() {
        let pod = pod(json!({
            "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"serviceAccountName": "planner"},
        }));
        let outcome = run(&pod, &no_labels());
        assert_eq!(outcome.decision, Decision::Injected(Mode::Agent));
        assert_eq!(outcome.warnings.len(), 1);
        assert!(
            outcome.warnings[0].contains("serviceAccountName: planner"),
            "{}",
            outcome.warnings[0]
        );
    }

    #[test]
    fn agent_identity_must_match_service_account_labels_and_namespace() {
        let pod = pod(json!({
            "metadata": {"labels": {"app": "planner", "tier": "a"}, "annotations": {INJECT_ANNOTATION: "true"}},
            "spec": {"serviceAccountName": "planner"},
        }));
        let cases = [
            (identity("p", NS, "planner", &[("app", "planner")]), true),
            (identity("p", NS, "planner", &[]), true),
            (identity("p", NS, "planner", &[("app", "other")]), false),
            (identity("p", NS, "default", &[]), false),
            (identity("p", "elsewhere", "planner", &[]), false),
        ];
        for (identity, matches) in cases {
            let outcome = injection_patch(
                &pod,
                &no_labels(),
                &settings(),
                std::slice::from_ref(&identity),
            )
            .unwrap();
            assert_eq!(outcome.warnings.is_empty(), matches, "{:?}", identity.spec);
        }
    }

    fn resources_of(
        annotations: Value,
    ) -> Result<k8s_openapi::api::core::v1::ResourceRequirements, InjectionError> {
        let mut annotations = annotations;
        annotations[INJECT_ANNOTATION] = json!("true");
        let pod = pod(json!({"metadata": {"annotations": annotations}}));
        let outcome = injection_patch(&pod, &no_labels(), &settings(), &default_identity())?;
        Ok(sidecars(&apply(&pod, &outcome))[0]
            .resources
            .clone()
            .unwrap())
    }

    fn quantity(
        map: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
        key: &str,
    ) -> Option<String> {
        map.as_ref().and_then(|m| m.get(key)).map(|q| q.0.clone())
    }

    #[test]
    fn default_resources_apply_without_annotations() {
        let r = resources_of(json!({})).unwrap();
        assert_eq!(quantity(&r.requests, "cpu").as_deref(), Some("50m"));
        assert_eq!(quantity(&r.requests, "memory").as_deref(), Some("67108864"));
        assert_eq!(quantity(&r.limits, "memory").as_deref(), Some("268435456"));
        assert_eq!(quantity(&r.limits, "cpu"), None);
    }

    #[test]
    fn annotations_override_resources_within_bounds() {
        let r = resources_of(json!({
            CPU_ANNOTATION: "0.25", CPU_LIMIT_ANNOTATION: "1",
            MEMORY_ANNOTATION: "128Mi", MEMORY_LIMIT_ANNOTATION: "512Mi",
        }))
        .unwrap();
        assert_eq!(quantity(&r.requests, "cpu").as_deref(), Some("250m"));
        assert_eq!(quantity(&r.limits, "cpu").as_deref(), Some("1000m"));
        assert_eq!(
            quantity(&r.requests, "memory").as_deref(),
            Some("134217728")
        );
        assert_eq!(quantity(&r.limits, "memory").as_deref(), Some("536870912"));
    }

    #[test]
    fn a_memory_request_above_the_default_limit_raises_the_limit() {
        let r = resources_of(json!({MEMORY_ANNOTATION: "1Gi"})).unwrap();
        assert_eq!(quantity(&r.limits, "memory").as_deref(), Some("1073741824"));
    }

    #[test]
    fn out_of_bounds_or_unreadable_resources_are_refused() {
        for (annotation, value, expected) in [
            (CPU_ANNOTATION, "64", "between"),
            (MEMORY_ANNOTATION, "1Mi", "between"),
            (MEMORY_LIMIT_ANNOTATION, "100Gi", "between"),
            (CPU_ANNOTATION, "lots", "expected"),
            (MEMORY_ANNOTATION, "12 parsecs", "expected"),
        ] {
            let err = resources_of(json!({annotation: value})).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{annotation}={value}: {err}"
            );
        }
        let err =
            resources_of(json!({MEMORY_ANNOTATION: "512Mi", MEMORY_LIMIT_ANNOTATION: "256Mi"}))
                .unwrap_err();
        assert!(
            err.to_string().contains("below the memory request"),
            "{err}"
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

    fn from_flags(flags: &[&str]) -> Result<InjectionSettings, InvalidSetting> {
        let args = <crate::Args as clap::Parser>::try_parse_from(
            std::iter::once("chaperone-controller").chain(flags.iter().copied()),
        )
        .expect("flags parse");
        InjectionSettings::from_args(&args)
    }

    #[test]
    fn settings_come_from_the_charts_variables() {
        let settings = from_flags(&[
            "--sidecar-image-pull-policy=Always",
            "--sidecar-cpu-request=100m",
            "--sidecar-cpu-limit=1",
            "--sidecar-memory-request=128Mi",
            "--sidecar-memory-limit=512Mi",
            "--webhook-failure-policy=Ignore",
        ])
        .unwrap();
        assert_eq!(settings.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(
            settings.resources,
            ProxyResources {
                cpu_request: 100,
                cpu_limit: Some(1000),
                memory_request: 128 << 20,
                memory_limit: 512 << 20,
            }
        );
        assert_eq!(settings.failure_policy, FailurePolicy::Ignore);
    }

    #[test]
    fn unset_or_empty_settings_keep_the_defaults() {
        for flags in [
            &[][..],
            &[
                "--sidecar-image-pull-policy=",
                "--sidecar-cpu-request=",
                "--sidecar-cpu-limit=",
                "--sidecar-memory-request= ",
                "--sidecar-memory-limit=",
            ],
        ] {
            let settings = from_flags(flags).unwrap();
            assert_eq!(settings.image_pull_policy, None, "{flags:?}");
            assert_eq!(settings.resources, ProxyResources::default(), "{flags:?}");
            assert_eq!(settings.failure_policy, FailurePolicy::Fail, "{flags:?}");
        }
    }

    #[test]
    fn bad_settings_stop_the_controller_naming_the_variable() {
        for (flag, env) in [
            (
                "--sidecar-image-pull-policy=always",
                "CHAPERONE_SIDECAR_IMAGE_PULL_POLICY",
            ),
            (
                "--sidecar-cpu-request=lots",
                "CHAPERONE_SIDECAR_CPU_REQUEST",
            ),
            ("--sidecar-cpu-limit=0", "CHAPERONE_SIDECAR_CPU_LIMIT"),
            (
                "--sidecar-memory-request=1Xi",
                "CHAPERONE_SIDECAR_MEMORY_REQUEST",
            ),
            (
                "--sidecar-memory-limit=-64Mi",
                "CHAPERONE_SIDECAR_MEMORY_LIMIT",
            ),
            (
                "--webhook-failure-policy=fail",
                "CHAPERONE_WEBHOOK_FAILURE_POLICY",
            ),
        ] {
            let err = from_flags(&[flag]).unwrap_err();
            assert_eq!(err.env, env, "{flag}: {err}");
            let message = err.to_string();
            assert!(message.contains(env), "{message}");
        }
        let err = from_flags(&[
            "--sidecar-memory-request=1Gi",
            "--sidecar-memory-limit=512Mi",
        ])
        .unwrap_err();
        assert_eq!(err.env, "CHAPERONE_SIDECAR_MEMORY_LIMIT", "{err}");
        assert!(err.to_string().contains("above the memory limit"), "{err}");
    }

    #[test]
    fn parses_kubernetes_quantities() {
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("0.1"), Ok(100));
        assert!(parse_cpu("-1").is_err());
        assert_eq!(parse_memory("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory("1000"), Ok(1000));
        assert_eq!(parse_memory("1.5Gi"), Ok(3 << 29));
        assert!(parse_memory("Mi").is_err());
        assert!(parse_memory("1Xi").is_err());
    }
}
