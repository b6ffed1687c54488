//! Tests of the injection patch: what a pod gets, in which mode, and why it is refused.

use std::sync::Arc;

use chaperone_api::{AgentIdentitySpecV1, model};

use super::*;
use crate::webhook::{Bounds, FailurePolicy};

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
        run_as_user: Some(65532),
        failure_policy: FailurePolicy::Fail,
        approval_hold_seconds: 35,
        otel_env: Vec::new(),
        otel_headers_secret: None,
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

fn identity(name: &str, namespace: &str, sa: &str, labels: &[(&str, &str)]) -> Arc<AgentIdentity> {
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
    assert_eq!(
        env_value(sidecar, "CHAPERONE_APPROVAL_HOLD_SECONDS").as_deref(),
        Some("35")
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
    assert_eq!(security.run_as_user, Some(65532));
    assert_eq!(security.run_as_group, Some(65532));
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
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    let liveness = sidecar
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(liveness.path.as_deref(), Some("/livez"));
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

/// The value of the environment variable `name` of the sidecar injected into
/// the annotated pod that `patch` makes of the test pod.
fn injected_env(patch: Value, name: &str) -> Option<String> {
    let mut spec = annotated("true");
    merge(&mut spec, patch);
    let pod = pod(spec);
    let outcome = injection_patch(&pod, &no_labels(), &settings(), &default_identity()).unwrap();
    env_value(sidecars(&apply(&pod, &outcome))[0], name)
}

/// `CHAPERONE_WORKER_THREADS` of the sidecar injected into a pod with `annotations`.
fn worker_threads_of(annotations: Value) -> Option<String> {
    injected_env(
        json!({"metadata": {"annotations": annotations}}),
        "CHAPERONE_WORKER_THREADS",
    )
}

#[test]
fn the_sidecar_gets_a_worker_thread_per_core_it_may_use() {
    // The default request (50m), no limit: one thread.
    assert_eq!(worker_threads_of(json!({})).as_deref(), Some("1"));
    // The limit, rounded up to whole cores.
    assert_eq!(
        worker_threads_of(json!({CPU_ANNOTATION: "250m", CPU_LIMIT_ANNOTATION: "2500m"}))
            .as_deref(),
        Some("3")
    );
    assert_eq!(
        worker_threads_of(json!({CPU_LIMIT_ANNOTATION: "1"})).as_deref(),
        Some("1")
    );
    // Without a limit, the request.
    assert_eq!(
        worker_threads_of(json!({CPU_ANNOTATION: "2"})).as_deref(),
        Some("2")
    );
}

/// `CHAPERONE_SHUTDOWN_GRACE_MS` of the sidecar injected into a pod whose
/// `terminationGracePeriodSeconds` is `seconds`.
fn shutdown_grace_of(seconds: Option<i64>) -> Option<String> {
    let patch = match seconds {
        Some(seconds) => json!({"spec": {"terminationGracePeriodSeconds": seconds}}),
        None => json!({}),
    };
    injected_env(patch, "CHAPERONE_SHUTDOWN_GRACE_MS")
}

#[test]
fn the_sidecar_drains_for_a_third_of_the_pods_grace_period() {
    // The API server's default of 30 s, set or not: the sidecar's own default.
    assert_eq!(shutdown_grace_of(None).as_deref(), Some("10000"));
    assert_eq!(shutdown_grace_of(Some(30)).as_deref(), Some("10000"));
    // A short grace period leaves the checkpoint time before SIGKILL.
    assert_eq!(shutdown_grace_of(Some(5)).as_deref(), Some("1666"));
    // A long one: the agent may have used most of it before the sidecar's
    // turn, so never more than the sidecar's default.
    assert_eq!(shutdown_grace_of(Some(120)).as_deref(), Some("10000"));
    assert_eq!(shutdown_grace_of(Some(i64::MAX)).as_deref(), Some("10000"));
    // None at all: the least the sidecar takes (it refuses 0).
    assert_eq!(shutdown_grace_of(Some(0)).as_deref(), Some("100"));
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
    let err = resources_of(json!({MEMORY_ANNOTATION: "512Mi", MEMORY_LIMIT_ANNOTATION: "256Mi"}))
        .unwrap_err();
    assert!(
        err.to_string().contains("below the memory request"),
        "{err}"
    );
}

#[test]
fn without_a_uid_the_platform_assigns_one() {
    let pod = pod(annotated("true"));
    let settings = InjectionSettings {
        run_as_user: None,
        ..settings()
    };
    let outcome =
        injection_patch(&pod, &no_labels(), &settings, &default_identity()).expect("injection");
    let injected = apply(&pod, &outcome);
    let security = sidecars(&injected)[0].security_context.clone().unwrap();
    assert_eq!(security.run_as_user, None);
    assert_eq!(security.run_as_group, None);
    assert_eq!(
        security.run_as_non_root,
        Some(true),
        "still refused as root"
    );
}

#[test]
fn sidecar_gets_the_trace_exporter_settings_and_headers_from_a_secret() {
    let mut settings = settings();
    settings.otel_env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            "http://collector.observability:4317".to_owned(),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(), "grpc".to_owned()),
    ];
    settings.otel_headers_secret = Some("otlp-credentials".to_owned());
    let pod = pod(annotated("true"));
    let outcome =
        injection_patch(&pod, &no_labels(), &settings, &default_identity()).expect("injection");
    let injected = apply(&pod, &outcome);
    let sidecar = sidecars(&injected)[0];
    assert_eq!(
        env_value(sidecar, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
        Some("http://collector.observability:4317")
    );
    assert_eq!(
        env_value(sidecar, "OTEL_EXPORTER_OTLP_PROTOCOL").as_deref(),
        Some("grpc")
    );
    let headers = sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "OTEL_EXPORTER_OTLP_HEADERS")
        .expect("headers variable");
    assert_eq!(headers.value, None, "never the credentials themselves");
    let secret = headers
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("a Secret reference");
    assert_eq!(secret.name, "otlp-credentials");
    assert_eq!(secret.key, "headers");
    assert_eq!(secret.optional, Some(true));
}

#[test]
fn sidecar_without_an_exporter_gets_no_otel_variables() {
    let pod = pod(annotated("true"));
    let injected = apply(&pod, &run(&pod, &no_labels()));
    let sidecar = sidecars(&injected)[0];
    assert!(
        !sidecar
            .env
            .iter()
            .flatten()
            .any(|e| e.name.starts_with("OTEL_")),
        "{:?}",
        sidecar.env
    );
}

#[test]
fn upstream_secrets_are_mounted_into_the_sidecar_only() {
    let pod = pod(json!({
        "metadata": {"annotations": {INJECT_ANNOTATION: "true"}},
        "spec": {"volumes": [{"name": "data", "emptyDir": {}}]},
    }));
    let with_secrets = |name: &str, servers: Value| {
        let mut identity = (*identity(name, NS, "default", &[])).clone();
        identity.spec.0.tool_servers = serde_json::from_value(servers).unwrap();
        Arc::new(identity)
    };
    let identities = vec![
        with_secrets(
            "agent",
            json!([
                {"name": "billing", "url": "https://billing.corp:8443/mcp", "upstreamSecret": "billing-upstream"},
                {"name": "orders", "url": "http://orders:8080/mcp"},
            ]),
        ),
        // A second identity selecting the pod cannot remount billing.
        with_secrets(
            "other",
            json!([{"name": "billing", "url": "https://x/mcp", "upstreamSecret": "stolen"}]),
        ),
    ];
    let outcome = injection_patch(&pod, &no_labels(), &settings(), &identities).expect("injection");
    let injected = apply(&pod, &outcome);
    let spec = injected.spec.as_ref().unwrap();
    let secret_volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref().map(|s| (v.name.clone(), s.clone())))
        .collect();
    assert_eq!(secret_volumes.len(), 1, "{secret_volumes:?}");
    let (volume, secret) = &secret_volumes[0];
    assert_eq!(secret.secret_name.as_deref(), Some("billing-upstream"));
    assert_eq!(secret.optional, Some(true));
    let mount = sidecars(&injected)[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| &m.name == volume)
        .expect("the sidecar mounts it");
    assert_eq!(
        mount.mount_path,
        "/var/run/secrets/chaperone/upstreams/billing"
    );
    assert_eq!(mount.read_only, Some(true));
    // The agent's own containers never see it.
    for container in &spec.containers {
        assert!(
            container
                .volume_mounts
                .iter()
                .flatten()
                .all(|m| &m.name != volume),
            "{}",
            container.name
        );
    }
    // The pod's own volume is kept.
    assert!(spec.volumes.iter().flatten().any(|v| v.name == "data"));
}
