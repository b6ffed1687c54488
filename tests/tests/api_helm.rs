//! The Helm chart (`charts/chaperone`): it lints, carries the generated CRDs,
//! renders objects a real API server accepts, installs and uninstalls (keeping
//! the CRDs), grants the controller exactly what it uses, sends only pods that
//! ask for a sidecar to the webhook, and refuses bad values with a message.
//!
//! Helm 4 from the tools cache (and Helm 3 for one test that lints, renders,
//! installs and uninstalls); the cluster tests share one real control plane.
//! No kubelet: nothing becomes Ready, so installs never `--wait`.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Output,
    sync::OnceLock,
};

use anyhow::{Context, Result, bail};
use chaperone_testenv::{
    ControlPlane, Tool,
    chart::{self, chart_dir, repo_root},
    create_namespace, unique_suffix,
};
use serde_json::Value;

/// Helm's cache, config and data directories, under Cargo's scratch directory
/// for integration tests: the tests never read or write the user's Helm setup.
fn helm_home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
        fs::create_dir_all(&dir).expect("creating a Helm home");
        dir
    })
}

fn helm(args: &[&str], cluster: Option<&ControlPlane>) -> Result<Output> {
    chart::helm(helm_home(), args, cluster)
}

fn helm_ok(args: &[&str], cluster: Option<&ControlPlane>) -> Result<String> {
    chart::helm_ok(helm_home(), args, cluster)
}

fn helm_ok_with(tool: Tool, args: &[&str], cluster: Option<&ControlPlane>) -> Result<String> {
    chart::helm_ok_with(tool, helm_home(), args, cluster)
}

fn kubectl_ok(args: &[&str]) -> Result<String> {
    let out = ControlPlane::shared().kubectl(args)?;
    if !out.status.success() {
        bail!(
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn kubectl_json(args: &[&str]) -> Result<Value> {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    Ok(serde_json::from_str(&kubectl_ok(&args)?)?)
}

/// Whether `kind/name` exists (in `namespace` when it is namespaced).
fn exists(kind: &str, name: &str, namespace: &str) -> Result<bool> {
    let out = ControlPlane::shared().kubectl(&[
        "get",
        &format!("{kind}/{name}"),
        "-n",
        namespace,
        "--ignore-not-found",
        "-o",
        "name",
    ])?;
    if !out.status.success() {
        bail!(
            "kubectl get {kind}/{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(!out.stdout.trim_ascii().is_empty())
}

fn new_namespace(prefix: &str) -> Result<String> {
    let cp = ControlPlane::shared();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async { create_namespace(&cp.client().await?, prefix).await })
}

/// The objects of a multi-document manifest, as `(kind, name)`.
fn manifest_objects(manifest: &str) -> Result<Vec<(String, String)>> {
    Ok(chart::manifest_documents(manifest)?
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect())
}

const CRD_NAMES: [&str; 4] = [
    "agentidentities.chaperone.dev",
    "toolpolicies.chaperone.dev",
    "delegationgrants.chaperone.dev",
    "toolcallapprovals.chaperone.dev",
];

/// A release installed once and left in place, for the tests that inspect a
/// live install. Its webhook uses failurePolicy Fail.
struct Installed {
    release: String,
    namespace: String,
}

fn installed() -> &'static Installed {
    static INSTALLED: OnceLock<Installed> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let namespace = new_namespace("chaperone-system").unwrap();
        let release = format!("chaperone-{}", unique_suffix());
        helm_ok(
            &[
                "install",
                &release,
                chart_dir().to_str().unwrap(),
                "--namespace",
                &namespace,
            ],
            Some(ControlPlane::shared()),
        )
        .unwrap();
        Installed { release, namespace }
    })
}

#[test]
fn chart_lints_cleanly_with_every_option() -> Result<()> {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    for extra in [
        &[][..],
        &[
            "--set",
            "certManager.enabled=true",
            "--set",
            "serviceMonitor.enabled=true",
        ],
        &[
            "--set",
            "replicas=1",
            "--set",
            "webhook.failurePolicy=Ignore",
        ],
    ] {
        let mut args = vec!["lint", "--strict", chart];
        args.extend_from_slice(extra);
        let out = helm_ok(&args, None)?;
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
    Ok(())
}

#[test]
fn chart_crds_are_a_fresh_copy_of_the_generated_crds() -> Result<()> {
    let read_dir = |dir: &Path| -> Result<BTreeMap<String, Vec<u8>>> {
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.insert(name, fs::read(&path)?);
        }
        Ok(files)
    };
    let generated = read_dir(&repo_root().join("crds"))?;
    let copied = read_dir(&chart_dir().join("crds"))?;
    let stale: Vec<&String> = generated
        .keys()
        .chain(copied.keys())
        .filter(|name| generated.get(*name) != copied.get(*name))
        .collect();
    assert!(
        stale.is_empty(),
        "charts/chaperone/crds/ differs from crds/ in {stale:?}: run `make crds` (it copies \
         crds/*.yaml into the chart) and commit both"
    );
    assert_eq!(generated.len(), CRD_NAMES.len(), "{:?}", generated.keys());
    Ok(())
}

#[test]
fn rendered_chart_passes_server_side_validation() -> Result<()> {
    let cp = ControlPlane::shared();
    let namespace = new_namespace("chaperone-render")?;
    let chart = chart_dir();
    for extra in [
        &[][..],
        &[
            "--set",
            "replicas=3",
            "--set",
            "webhook.failurePolicy=Ignore",
            "--set",
            "webhook.excludedNamespaces={monitoring,cert-manager}",
            "--set",
            "podDisruptionBudget.minAvailable=50%",
        ],
    ] {
        let mut args = vec![
            "template",
            "chaperone",
            chart.to_str().unwrap(),
            "--namespace",
            &namespace,
            "--include-crds",
        ];
        args.extend_from_slice(extra);
        let manifest = helm_ok(&args, None)?;
        let out =
            cp.kubectl_with_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&manifest))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the API server refused the rendered chart ({extra:?}):\n{}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let objects = manifest_objects(&manifest)?;
        assert_eq!(
            stdout.matches("(server dry run)").count(),
            objects.len(),
            "{stdout}"
        );
        for kind in [
            "CustomResourceDefinition",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "PodDisruptionBudget",
            "MutatingWebhookConfiguration",
        ] {
            assert!(
                objects.iter().any(|(k, _)| k == kind),
                "no {kind} rendered: {objects:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn install_creates_the_controller_and_uninstall_keeps_only_the_crds() -> Result<()> {
    install_then_uninstall(Tool::Helm)
}

#[test]
fn helm_3_lints_renders_installs_and_uninstalls_the_chart() -> Result<()> {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let version = helm_ok_with(Tool::Helm3, &["version", "--short"], None)?;
    assert!(version.starts_with("v3."), "{version}");
    let out = helm_ok_with(Tool::Helm3, &["lint", "--strict", chart], None)?;
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let namespace = new_namespace("chaperone-helm3-render")?;
    let manifest = helm_ok_with(
        Tool::Helm3,
        &["template", "chaperone", chart, "--namespace", &namespace],
        None,
    )?;
    let file = helm_home().join(format!("helm3-{namespace}.yaml"));
    std::fs::write(&file, manifest)?;
    kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-n",
        &namespace,
        "-f",
        file.to_str().unwrap(),
    ])?;
    install_then_uninstall(Tool::Helm3)
}

/// `helm install` with `tool` creates every object; `helm uninstall` removes
/// them all but the CRDs.
fn install_then_uninstall(tool: Tool) -> Result<()> {
    let cp = ControlPlane::shared();
    let namespace = new_namespace("chaperone-uninstall")?;
    let release = format!("chaperone-{}", unique_suffix());
    // Ignore: this release's webhook must never refuse another test's pods.
    helm_ok_with(
        tool,
        &[
            "install",
            &release,
            chart_dir().to_str().unwrap(),
            "--namespace",
            &namespace,
            "--set",
            "webhook.failurePolicy=Ignore",
        ],
        Some(cp),
    )?;
    let manifest = helm_ok_with(
        tool,
        &["get", "manifest", &release, "-n", &namespace],
        Some(cp),
    )?;
    let objects = manifest_objects(&manifest)?;
    assert!(objects.len() >= 11, "{objects:?}");
    for (kind, name) in &objects {
        assert!(exists(kind, name, &namespace)?, "{kind}/{name} not created");
    }
    for crd in CRD_NAMES {
        assert!(
            exists("crd", crd, "default")?,
            "{crd} not installed from crds/"
        );
    }

    let out = helm_ok_with(tool, &["uninstall", &release, "-n", &namespace], Some(cp))?;
    assert!(out.contains("uninstalled"), "{out}");
    for (kind, name) in &objects {
        assert!(
            !exists(kind, name, &namespace)?,
            "{kind}/{name} left behind by helm uninstall"
        );
    }
    for crd in CRD_NAMES {
        assert!(
            exists("crd", crd, "default")?,
            "helm uninstall removed {crd}"
        );
    }
    let releases = helm_ok_with(tool, &["list", "-n", &namespace, "-q"], Some(cp))?;
    assert!(releases.trim().is_empty(), "{releases}");
    Ok(())
}

#[test]
fn controller_runs_two_hardened_replicas() -> Result<()> {
    let Installed { release, namespace } = installed();
    let deployment = kubectl_json(&[
        "get",
        "deployment",
        &format!("{release}-controller"),
        "-n",
        namespace,
    ])?;
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(
        pod["affinity"]["podAntiAffinity"].is_object(),
        "{}",
        pod["affinity"]
    );
    let env: BTreeMap<&str, &Value> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or_default(), e))
        .collect();
    assert_eq!(
        env["CHAPERONE_WEBHOOK_CONFIG"]["value"],
        format!("{release}-injector")
    );
    assert_eq!(
        env["CHAPERONE_SERVICE_NAME"]["value"],
        format!("{release}-controller")
    );
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );

    let pdb = kubectl_json(&[
        "get",
        "pdb",
        &format!("{release}-controller"),
        "-n",
        namespace,
    ])?;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    for (service, port) in [
        ("controller", 9090),
        ("webhook", 443),
        ("controller-metrics", 9091),
    ] {
        let svc = kubectl_json(&[
            "get",
            "service",
            &format!("{release}-{service}"),
            "-n",
            namespace,
        ])?;
        assert_eq!(svc["spec"]["ports"][0]["port"], port, "{service}");
    }
    Ok(())
}

#[test]
fn webhook_configuration_excludes_system_namespaces() -> Result<()> {
    let Installed { release, namespace } = installed();
    let config = kubectl_json(&[
        "get",
        "mutatingwebhookconfiguration",
        &format!("{release}-injector"),
    ])?;
    let webhooks = config["webhooks"].as_array().context("webhooks")?;
    assert_eq!(webhooks.len(), 3);
    let (injection, approval): (Vec<&Value>, Vec<&Value>) = webhooks.iter().partition(|w| {
        w["name"]
            .as_str()
            .is_some_and(|n| n.ends_with(".inject.chaperone.dev"))
    });
    assert_eq!(injection.len(), 2);
    // Who may approve a tool call: every namespace, always Fail.
    let [approval] = approval.as_slice() else {
        panic!("one approval entry expected: {approval:?}");
    };
    assert_eq!(approval["failurePolicy"], "Fail");
    assert_eq!(approval["sideEffects"], "None");
    assert_eq!(
        approval["clientConfig"]["service"]["path"],
        "/approve-toolcallapprovals"
    );
    assert_eq!(
        approval["rules"],
        serde_json::json!([
            {"operations": ["CREATE"], "apiGroups": ["chaperone.dev"], "apiVersions": ["*"],
             "resources": ["toolcallapprovals"], "scope": "Namespaced"},
            {"operations": ["UPDATE"], "apiGroups": ["chaperone.dev"], "apiVersions": ["*"],
             "resources": ["toolcallapprovals/status"], "scope": "Namespaced"},
        ])
    );
    for webhook in injection {
        assert_eq!(webhook["failurePolicy"], "Fail");
        assert_eq!(webhook["timeoutSeconds"], 5);
        assert_eq!(webhook["sideEffects"], "None");
        assert_eq!(
            webhook["clientConfig"]["service"]["name"],
            format!("{release}-webhook")
        );
        assert_eq!(webhook["clientConfig"]["service"]["path"], "/inject");
        let excluded = webhook["namespaceSelector"]["matchExpressions"]
            .as_array()
            .context("matchExpressions")?
            .iter()
            .find(|e| e["key"] == "kubernetes.io/metadata.name")
            .context("no namespace name expression")?;
        assert_eq!(excluded["operator"], "NotIn");
        let values = excluded["values"].as_array().context("values")?;
        for ns in ["kube-system", namespace.as_str()] {
            assert!(
                values.iter().any(|v| v == ns),
                "{ns} not excluded: {values:?}"
            );
        }
    }
    Ok(())
}

/// Whether the controller's ServiceAccount may `verb` `resource`.
fn controller_can(verb: &str, resource: &str, namespace: Option<&str>) -> Result<bool> {
    let Installed {
        release,
        namespace: home,
    } = installed();
    let user = format!("system:serviceaccount:{home}:{release}-controller");
    // `kind/status` is a subresource, not an object named "status".
    let (resource, subresource) = match resource.strip_suffix("/status") {
        Some(kind) => (kind, Some("--subresource=status")),
        None => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource, "--as", &user];
    args.extend(subresource);
    match namespace {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("--all-namespaces"),
    }
    let out = ControlPlane::shared().kubectl(&args)?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => bail!(
            "kubectl auth can-i {verb} {resource}: {other:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn controller_rbac_grants_exactly_what_it_uses() -> Result<()> {
    let Installed { release, namespace } = installed();
    let ns = Some(namespace.as_str());
    let other = Some("default");
    let secret = format!("secrets/{release}-controller-tls");
    let lease = format!("leases.coordination.k8s.io/{release}-controller");
    let webhook = format!("mutatingwebhookconfigurations/{release}-injector");
    let allowed = [
        ("watch", "agentidentities.chaperone.dev", None),
        ("list", "toolpolicies.chaperone.dev", None),
        ("get", "delegationgrants.chaperone.dev", None),
        ("patch", "agentidentities.chaperone.dev/status", None),
        ("patch", "delegationgrants.chaperone.dev/status", None),
        ("watch", "pods", None),
        ("list", "namespaces", None),
        ("create", "tokenreviews.authentication.k8s.io", None),
        ("create", "subjectaccessreviews.authorization.k8s.io", None),
        ("create", "events", other),
        ("patch", "events.events.k8s.io", other),
        ("create", "leases.coordination.k8s.io", ns),
        ("update", lease.as_str(), ns),
        ("create", "secrets", ns),
        ("get", secret.as_str(), ns),
        ("update", secret.as_str(), ns),
        ("patch", webhook.as_str(), None),
        ("list", "configmaps", ns),
        ("watch", "configmaps", ns),
        ("create", "configmaps", ns),
        ("patch", "configmaps", ns),
        ("get", "pods", ns),
        // Agents' tool-definitions ConfigMaps, anywhere.
        ("get", "configmaps", other),
        ("create", "configmaps", other),
        ("patch", "configmaps", other),
    ];
    let denied = [
        ("update", "agentidentities.chaperone.dev", None),
        ("update", "toolpolicies.chaperone.dev/status", None),
        ("delete", "toolpolicies.chaperone.dev", None),
        ("create", "delegationgrants.chaperone.dev", None),
        ("patch", "pods", other),
        ("delete", "pods", other),
        ("get", "secrets", ns),
        ("list", "secrets", ns),
        ("get", "secrets", other),
        ("update", "leases.coordination.k8s.io/someone-else", ns),
        ("create", "leases.coordination.k8s.io", other),
        ("patch", "mutatingwebhookconfigurations/someone-else", None),
        ("create", "mutatingwebhookconfigurations", None),
        ("update", "configmaps", ns),
        ("delete", "configmaps", ns),
        ("list", "configmaps", other),
        ("watch", "configmaps", other),
        ("update", "configmaps", other),
        ("delete", "configmaps", other),
        ("create", "serviceaccounts/token", ns),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, ns) in allowed {
        if !controller_can(verb, resource, ns)? {
            wrong.push(format!("cannot {verb} {resource} in {ns:?}"));
        }
    }
    for (verb, resource, ns) in denied {
        if controller_can(verb, resource, ns)? {
            wrong.push(format!("can {verb} {resource} in {ns:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// Creates a pod in `namespace`; `Err` holds the API server's refusal.
fn create_pod(namespace: &str, annotation: Option<&str>) -> Result<Result<(), String>> {
    let annotations = match annotation {
        Some(value) => format!("annotations: {{chaperone.dev/inject: \"{value}\"}}, "),
        None => String::new(),
    };
    let pod = format!(
        "{{apiVersion: v1, kind: Pod, metadata: {{name: agent-{}, {annotations}}}, \
         spec: {{containers: [{{name: agent, image: registry.example/agent:1}}]}}}}",
        unique_suffix()
    );
    let out = ControlPlane::shared()
        .kubectl_with_stdin(&["create", "-n", namespace, "-f", "-"], Some(&pod))?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

#[test]
fn webhook_is_called_only_for_pods_that_ask_for_a_sidecar() -> Result<()> {
    // No controller runs: every call to the webhook fails, and failurePolicy
    // Fail turns that into a refusal. A refusal proves the webhook was called;
    // an admitted pod proves it was not.
    let Installed { release, namespace } = installed();
    let webhook = format!("{release}-injector");
    let plain = new_namespace("agents")?;
    let enabled = new_namespace("agents-enabled")?;
    kubectl_ok(&[
        "label",
        "namespace",
        &enabled,
        "chaperone.dev/injection=enabled",
    ])?;

    let refused = |result: Result<(), String>, case: &str| match result {
        Err(stderr) if stderr.contains(&webhook) || stderr.contains("inject.chaperone.dev") => {}
        Err(stderr) => panic!("{case}: refused, but not by the webhook: {stderr}"),
        Ok(()) => panic!("{case}: admitted, but the webhook should have been called"),
    };
    let admitted = |result: Result<(), String>, case: &str| {
        if let Err(stderr) = result {
            panic!("{case}: the webhook was called: {stderr}");
        }
    };
    admitted(create_pod(&plain, None)?, "pod without annotation");
    admitted(create_pod(&plain, Some("false"))?, "pod annotated false");
    refused(create_pod(&plain, Some("true"))?, "pod annotated true");
    refused(create_pod(&plain, Some("tool"))?, "pod annotated tool");
    refused(
        create_pod(&enabled, None)?,
        "pod in a namespace labelled enabled",
    );
    admitted(
        create_pod(&enabled, Some("false"))?,
        "pod annotated false in a namespace labelled enabled",
    );
    admitted(
        create_pod(namespace, Some("true"))?,
        "pod annotated true in the release namespace",
    );
    Ok(())
}

#[test]
fn values_schema_refuses_bad_values_with_a_message() -> Result<()> {
    let chart = chart_dir();
    let cases: &[(&str, &str)] = &[
        ("replicas=two", "at '/replicas': got string, want integer"),
        ("replicas=0", "at '/replicas'"),
        (
            "webhook.failurePolicy=Maybe",
            "at '/webhook/failurePolicy': value must be one of 'Fail', 'Ignore'",
        ),
        ("webhook.timeoutSeconds=60", "at '/webhook/timeoutSeconds'"),
        ("replica=2", "additional properties 'replica' not allowed"),
        ("logFormat=xml", "at '/logFormat'"),
        (
            "image.controller.digest=latest",
            "at '/image/controller/digest'",
        ),
        (
            "sidecar.resources.requests.cpu=lots",
            "at '/sidecar/resources/requests/cpu'",
        ),
        (
            "webhook.excludedNamespaces={Not_A_Namespace}",
            "at '/webhook/excludedNamespaces/0'",
        ),
        (
            "certManager.issuerRef.kind=Vault",
            "at '/certManager/issuerRef",
        ),
    ];
    let mut wrong = Vec::new();
    for (set, expected) in cases {
        let out = helm(
            &[
                "template",
                "chaperone",
                chart.to_str().unwrap(),
                "--set",
                set,
            ],
            None,
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            wrong.push(format!("{set}: accepted"));
        } else if !stderr.contains("values don't meet the specifications of the schema")
            || !stderr.contains(expected)
        {
            wrong.push(format!("{set}: refused without {expected:?}: {stderr}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// The objects `helm template` renders with `sets`, as JSON.
fn rendered(sets: &[&str]) -> Result<Vec<Value>> {
    let chart = chart_dir();
    let mut args = vec!["template", "chaperone", chart.to_str().unwrap()];
    for set in sets {
        args.extend(["--set", set]);
    }
    chart::manifest_documents(&helm_ok(&args, None)?)
}

fn object<'a>(objects: &'a [Value], kind: &str) -> Result<&'a Value> {
    chart::object_of_kind(objects, kind)
}

/// The controller's flags for the environment the chart gives it (values
/// from the downward API get a stand-in).
fn controller_flags(deployment: &Value) -> Result<Vec<String>> {
    let mut flags = vec!["chaperone-controller".to_owned()];
    flags.extend(chart::controller_flags(deployment, None)?);
    Ok(flags)
}

#[test]
fn the_controller_reads_and_accepts_every_setting_the_chart_passes() -> Result<()> {
    use chaperone_controller::{
        certs::{CertConfig, CertSource},
        webhook::{FailurePolicy, InjectionSettings},
    };
    for (sets, external, failure_policy) in [
        (&[][..], CertSource::SelfManaged, FailurePolicy::Fail),
        (
            &[
                "certManager.enabled=true",
                "webhook.failurePolicy=Ignore",
                "image.sidecar.pullPolicy=Always",
                "sidecar.resources.requests.cpu=100m",
                "sidecar.resources.limits.cpu=1",
                "sidecar.resources.requests.memory=128Mi",
                "sidecar.resources.limits.memory=1Gi",
            ][..],
            CertSource::External,
            FailurePolicy::Ignore,
        ),
    ] {
        let objects = rendered(sets)?;
        let flags = controller_flags(object(&objects, "Deployment")?)?;
        let args = <chaperone_controller::Args as clap::Parser>::try_parse_from(&flags)
            .map_err(|e| anyhow::anyhow!("{sets:?}: {e}"))?;
        let settings =
            InjectionSettings::from_args(&args).map_err(|e| anyhow::anyhow!("{sets:?}: {e}"))?;
        assert_eq!(settings.failure_policy, failure_policy, "{sets:?}");
        assert_eq!(CertConfig::from_args(&args).source, external, "{sets:?}");
        if external == CertSource::External {
            assert_eq!(settings.image_pull_policy.as_deref(), Some("Always"));
            assert_eq!(settings.resources.cpu_request, 100);
            assert_eq!(settings.resources.cpu_limit, Some(1000));
            assert_eq!(settings.resources.memory_request, 128 << 20);
            assert_eq!(settings.resources.memory_limit, 1 << 30);
        } else {
            // The chart's defaults are the controller's own.
            assert_eq!(settings.resources, Default::default());
            assert_eq!(settings.image_pull_policy, None);
        }
    }
    Ok(())
}

#[test]
fn with_cert_manager_the_controller_only_reads_its_secret() -> Result<()> {
    let objects = rendered(&["certManager.enabled=true"])?;
    let rules = |kind: &str| -> Result<Vec<Value>> {
        Ok(object(&objects, kind)?["rules"]
            .as_array()
            .context("rules")?
            .clone())
    };
    let secrets: Vec<Value> = rules("Role")?
        .into_iter()
        .filter(|r| {
            r["resources"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r == "secrets"))
        })
        .collect();
    assert_eq!(secrets.len(), 1, "{secrets:?}");
    assert_eq!(secrets[0]["verbs"], serde_json::json!(["get"]));
    assert_eq!(
        secrets[0]["resourceNames"],
        serde_json::json!(["chaperone-controller-tls"])
    );
    let webhook_rules: Vec<Value> = rules("ClusterRole")?
        .into_iter()
        .filter(|r| {
            r["apiGroups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g == "admissionregistration.k8s.io"))
        })
        .collect();
    assert!(
        webhook_rules.is_empty(),
        "cert-manager keeps the caBundle; the controller needs no access: {webhook_rules:?}"
    );
    Ok(())
}
