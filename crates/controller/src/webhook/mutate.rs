//! The injection itself, as a pure function: a pod, its namespace's labels, the
//! injection settings and the AgentIdentities of the cluster in, a JSON patch and
//! admission warnings out. No I/O; the server only moves bytes to and from it.
//!
//! The settings come from [`super::injection_settings`]; the quantities of
//! the resource annotations are read by [`super::quantity`].

use chaperone_wire::sidecar_env;
use std::collections::BTreeMap;

use chaperone_api::AgentIdentity;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::{
    injection_settings::{InjectionSettings, ProxyResources},
    quantity::{parse_cpu, parse_memory},
};
pub use crate::pod_selection::INJECT_ANNOTATION;
use crate::pod_selection::inject_annotation;

/// Namespace label that turns injection on for every pod that does not say
/// `"false"`: value `enabled`.
pub const INJECTION_LABEL: &str = "chaperone.dev/injection";
/// Name of the injected sidecar (an init container with `restartPolicy: Always`).
pub const SIDECAR_NAME: &str = chaperone_api::replica_state::SIDECAR_CONTAINER;
/// Name of the projected ServiceAccount token volume.
pub const TOKEN_VOLUME: &str = "chaperone-token";
/// The variable that tells app containers where their MCP proxy is.
pub use chaperone_wire::sidecar_env::ENV_MCP_URL as MCP_URL_ENV;
/// Its value: the sidecar's outbound port on loopback.
pub use chaperone_wire::sidecar_env::MCP_URL;
/// Where the sidecar finds its ServiceAccount token (audience `chaperone`).
pub use chaperone_wire::sidecar_env::TOKEN_DIR;
/// The sidecar's outbound MCP port (agent → tools).
pub const OUTBOUND_PORT: i32 = sidecar_env::OUTBOUND_PORT as i32;
/// The sidecar's inbound port (delegated calls, or calls to a tool server).
pub const INBOUND_PORT: i32 = sidecar_env::INBOUND_PORT as i32;
/// The sidecar's admin port (`/ready`, `/metrics`).
pub const ADMIN_PORT: i32 = sidecar_env::ADMIN_PORT as i32;

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
/// Sidecar variable: extra audiences the inbound listener accepts.
pub use chaperone_wire::sidecar_env::ENV_INBOUND_AUDIENCES as INBOUND_AUDIENCES_ENV;
/// Sidecar variable: where the inbound listener forwards verified calls.
pub use chaperone_wire::sidecar_env::ENV_INBOUND_UPSTREAM as INBOUND_UPSTREAM_ENV;

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
    let annotation = inject_annotation(annotations);
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

    // The AgentIdentities that select this pod (an agent is expected to have
    // one), for the warning below and their tool servers' upstream Secrets.
    let service_account = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut selecting: Vec<&AgentIdentity> = match mode {
        Mode::Agent => identities
            .iter()
            .map(AsRef::as_ref)
            .filter(|identity| {
                identity.metadata.namespace.as_deref() == Some(namespace)
                    && identity.spec.0.selector.selects(service_account, &labels)
            })
            .collect(),
        Mode::Tool => Vec::new(),
    };
    selecting.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let secrets = upstream_secrets(&selecting);

    // The sidecar goes first so that it is up before the other init containers run
    // (they may already call tools).
    let grace_ms = shutdown_grace_ms(spec.termination_grace_period_seconds);
    let mut sidecar = sidecar_container(mode, settings, resources, &inbound, grace_ms);
    if let Some(mounts) = sidecar["volumeMounts"].as_array_mut() {
        for (i, (server, _)) in secrets.iter().enumerate() {
            mounts.push(json!({
                "name": upstream_volume_name(i),
                "mountPath": format!("{}/{server}", sidecar_env::UPSTREAM_SECRETS_DIR),
                "readOnly": true,
            }));
        }
    }
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
    // Each upstream Secret, for the sidecar alone. Optional: a Secret created
    // later is filled in by the kubelet; until then the sidecar refuses calls
    // to that server, naming the Secret.
    let mut volumes = vec![volume];
    volumes.extend(secrets.iter().enumerate().map(|(i, (_, secret))| {
        json!({
            "name": upstream_volume_name(i),
            "secret": {"secretName": secret, "optional": true, "defaultMode": 0o440},
        })
    }));
    let existing = spec.volumes.as_deref();
    for volume in &volumes {
        let name = volume["name"].as_str().unwrap_or_default();
        if existing.is_some_and(|v| v.iter().any(|v| v.name == name)) {
            return Err(InjectionError::InvalidPod(format!(
                "it already has a volume named {name}"
            )));
        }
    }
    match existing {
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes})),
        Some(_) => ops.extend(
            volumes
                .into_iter()
                .map(|v| json!({"op": "add", "path": "/spec/volumes/-", "value": v})),
        ),
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
    if mode == Mode::Agent && selecting.is_empty() {
        warnings.push(format!(
            "no AgentIdentity in namespace {namespace} selects this pod: create one with spec.selector.serviceAccountName: {service_account}; until then its chaperone sidecar denies every call"
        ));
    }

    let patch = serde_json::from_value(Value::Array(ops))
        .map_err(|e| InjectionError::InvalidPod(format!("building the patch: {e}")))?;
    Ok(InjectionOutcome {
        patch,
        warnings,
        decision: Decision::Injected(mode),
    })
}

/// `(server, Secret)` of every tool server with an `upstreamSecret` among the
/// AgentIdentities `selecting` the pod (the first one naming a server wins).
fn upstream_secrets(selecting: &[&AgentIdentity]) -> Vec<(String, String)> {
    let mut secrets: Vec<(String, String)> = Vec::new();
    for identity in selecting {
        for server in &identity.spec.0.tool_servers {
            if let Some(secret) = &server.upstream_secret
                && !secrets.iter().any(|(name, _)| *name == server.name)
            {
                secrets.push((server.name.clone(), secret.clone()));
            }
        }
    }
    secrets
}

/// The volume of the `i`th upstream Secret (a DNS label, whatever the
/// server's name).
fn upstream_volume_name(i: usize) -> String {
    format!("chaperone-upstream-{i}")
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

/// The pod's termination grace period when it sets none (the API server's
/// default).
const DEFAULT_TERMINATION_GRACE_SECONDS: i64 = 30;

/// The least time the sidecar is given to let calls in flight finish.
const MIN_SHUTDOWN_GRACE_MS: u64 = 100;

/// How long the sidecar lets calls in flight finish when it stops
/// (`CHAPERONE_SHUTDOWN_GRACE_MS`): a third of the pod's termination grace
/// period, at most the sidecar's default (10 s: a third of the default 30 s)
/// and at least [`MIN_SHUTDOWN_GRACE_MS`]. The pod's grace period is one
/// deadline for all its containers, and a native sidecar is stopped only
/// after the agent's containers have exited, with what is left of it: after
/// the drain come the final audit checkpoint and the shipping of the last
/// records, which a longer drain could lose to the kubelet's SIGKILL.
fn shutdown_grace_ms(termination_grace_period_seconds: Option<i64>) -> u64 {
    let seconds = termination_grace_period_seconds
        .unwrap_or(DEFAULT_TERMINATION_GRACE_SECONDS)
        .max(0)
        .unsigned_abs();
    let default_ms = sidecar_env::DEFAULT_SHUTDOWN_GRACE_MS;
    (seconds.saturating_mul(1000) / 3).clamp(MIN_SHUTDOWN_GRACE_MS, default_ms)
}

fn sidecar_container(
    mode: Mode,
    settings: &InjectionSettings,
    resources: ProxyResources,
    inbound: &InboundSettings,
    shutdown_grace_ms: u64,
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
            {"name": sidecar_env::ENV_MODE, "value": mode.as_str()},
            field(sidecar_env::ENV_POD_NAME, "metadata.name"),
            field(sidecar_env::ENV_POD_NAMESPACE, "metadata.namespace"),
            {"name": sidecar_env::ENV_CONTROLLER_ADDRESS, "value": settings.controller_address},
            {"name": sidecar_env::ENV_TOKEN_FILE, "value": sidecar_env::TOKEN_FILE},
            {"name": sidecar_env::ENV_CA_PEM, "value": settings.ca_pem},
            {"name": sidecar_env::ENV_APPROVAL_HOLD_SECONDS, "value": settings.approval_hold_seconds.to_string()},
            {"name": sidecar_env::ENV_WORKER_THREADS, "value": resources.worker_threads().to_string()},
            {"name": sidecar_env::ENV_SHUTDOWN_GRACE_MS, "value": shutdown_grace_ms.to_string()},
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
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "readinessProbe": {
            "httpGet": {"path": sidecar_env::READYZ_PATH, "port": ADMIN_PORT, "scheme": "HTTP"},
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "failureThreshold": 1,
            "successThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": sidecar_env::LIVEZ_PATH, "port": ADMIN_PORT, "scheme": "HTTP"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
    });
    if let (Some(policy), Some(obj)) = (&settings.image_pull_policy, container.as_object_mut()) {
        obj.insert("imagePullPolicy".into(), json!(policy));
    }
    if let (Some(uid), Some(context)) = (
        settings.run_as_user,
        container["securityContext"].as_object_mut(),
    ) {
        context.insert("runAsUser".into(), json!(uid));
        context.insert("runAsGroup".into(), json!(uid));
    }
    if let Some(env) = container["env"].as_array_mut() {
        if let Some(upstream) = &inbound.upstream {
            env.push(json!({"name": INBOUND_UPSTREAM_ENV, "value": upstream}));
        }
        if let Some(audiences) = &inbound.audiences {
            env.push(json!({"name": INBOUND_AUDIENCES_ENV, "value": audiences}));
        }
        // Traces: the controller's exporter settings, the credentials from a
        // Secret of the pod's own namespace.
        for (name, value) in &settings.otel_env {
            env.push(json!({"name": name, "value": value}));
        }
        if let Some(secret) = &settings.otel_headers_secret {
            env.push(json!({
                "name": chaperone_telemetry::otlp::HEADERS_ENV,
                "valueFrom": {"secretKeyRef": {"name": secret, "key": "headers", "optional": true}},
            }));
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

#[cfg(test)]
#[path = "mutate_tests.rs"]
mod tests;
