//! The Helm chart (`charts/chaperone`): it lints, carries the generated CRDs as
//! templates, renders objects a real API server accepts, installs, upgrades the
//! CRDs from the previous chart version and uninstalls (keeping the CRDs),
//! grants the controller exactly what it uses, sends only pods that ask for a
//! sidecar to the webhook, and refuses bad values with a message.
//!
//! Helm 4 from the tools cache (and Helm 3 for one test that lints, renders,
//! installs and uninstalls). The cluster tests share one real control plane
//! whose CRDs are applied once by kubectl (releases there set
//! `crds.install=false`: CRDs are cluster-wide and one release owns them);
//! the tests of the CRDs' own lifecycle each start a control plane of their
//! own. No kubelet: nothing becomes Ready, so installs never `--wait`.

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

/// The shared control plane, with the generated CRDs applied (once).
fn shared_plane() -> &'static ControlPlane {
    static CRDS: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    CRDS.get_or_init(|| {
        let crds = repo_root().join("crds");
        kubectl_on(
            cp,
            &["apply", "--server-side", "-f", crds.to_str().unwrap()],
        )
        .expect("applying crds/ to the shared control plane");
    });
    cp
}

fn kubectl_ok(args: &[&str]) -> Result<String> {
    kubectl_on(shared_plane(), args)
}

fn kubectl_on(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = cp.kubectl(args)?;
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

/// Whether `kind/name` exists on `cp` (in `namespace` when it is namespaced).
fn exists_on(cp: &ControlPlane, kind: &str, name: &str, namespace: &str) -> Result<bool> {
    let out = cp.kubectl(&[
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
    new_namespace_on(shared_plane(), prefix)
}

fn new_namespace_on(cp: &ControlPlane, prefix: &str) -> Result<String> {
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
                "--set",
                "crds.install=false",
            ],
            Some(shared_plane()),
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
            "--set",
            "podMonitor.enabled=true",
            "--set",
            "dashboards.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
        ],
        &[
            "--set",
            "replicas=1",
            "--set",
            "webhook.failurePolicy=Ignore",
        ],
        &[
            "--set",
            "crds.install=false",
            "--set",
            "fullnameOverride=acme-gov",
            "--set",
            "serviceAccount.create=false",
            "--set",
            "serviceAccount.name=platform-sa",
            "--set",
            "rbac.create=false",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "helmTest.enabled=false",
            "--set",
            "podSecurityContext.runAsUser=1000",
            "--set",
            "sidecar.runAsUser=1000",
            "--set-json",
            r#"extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"}]"#,
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
fn chart_templates_the_generated_crds_behind_crds_install() -> Result<()> {
    let mut generated = BTreeMap::new();
    for entry in fs::read_dir(repo_root().join("crds"))? {
        let path = entry?.path();
        let crd: Value = serde_saphyr::from_str(&fs::read_to_string(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        generated.insert(crd["metadata"]["name"].as_str().unwrap().to_owned(), crd);
    }
    assert_eq!(generated.len(), CRD_NAMES.len(), "{:?}", generated.keys());
    let crds_of = |sets: &[&str]| -> Result<Vec<Value>> {
        Ok(rendered(sets)?
            .into_iter()
            .filter(|o| o["kind"] == "CustomResourceDefinition")
            .collect())
    };
    let rendered_crds = crds_of(&[])?;
    assert_eq!(rendered_crds.len(), generated.len());
    for crd in &rendered_crds {
        let name = crd["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            crd["spec"], generated[name]["spec"],
            "the chart's {name} differs from crds/: run `make crds`"
        );
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{name}"
        );
        assert_eq!(
            crd["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm",
            "{name}"
        );
    }
    for crd in crds_of(&["crds.keep=false"])? {
        assert!(crd["metadata"]["annotations"].is_null(), "{crd}");
    }
    assert!(crds_of(&["crds.install=false"])?.is_empty());
    Ok(())
}

#[test]
fn rendered_chart_passes_server_side_validation() -> Result<()> {
    let cp = shared_plane();
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
        &[
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "fullnameOverride=acme-gov",
            "--set",
            "podSecurityContext.runAsUser=1000",
            "--set",
            "sidecar.runAsUser=1000",
            "--set-json",
            r#"extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"}]"#,
            "--set-json",
            r#"extraVolumes=[{"name":"ca","configMap":{"name":"corp-ca"}}]"#,
            "--set-json",
            r#"extraVolumeMounts=[{"name":"ca","mountPath":"/etc/corp-ca"}]"#,
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

/// The chart as it was released before its CRDs became templates (0.1.0,
/// `crds/` folder), packaged from git (7df2094) into tests/fixtures.
fn previous_chart() -> PathBuf {
    repo_root().join("tests/fixtures/chaperone-0.1.0.tgz")
}

#[test]
fn upgrade_from_the_previous_chart_upgrades_the_crds_and_keeps_the_objects() -> Result<()> {
    let cp = ControlPlane::start()?;
    let namespace = new_namespace_on(&cp, "chaperone-upgrade")?;
    let objects_ns = new_namespace_on(&cp, "shop")?;
    let release = "chaperone";
    let install = |chart: &Path, extra: &[&str]| -> Result<String> {
        let mut args = vec![
            "upgrade",
            "--install",
            release,
            chart.to_str().unwrap(),
            "--namespace",
            &namespace,
            "--set",
            "webhook.failurePolicy=Ignore",
        ];
        args.extend_from_slice(extra);
        helm_ok(&args, Some(&cp))
    };
    install(&previous_chart(), &[])?;
    let crd_json = |name: &str| -> Result<Value> {
        Ok(serde_json::from_str(&kubectl_on(
            &cp,
            &["get", "crd", name, "-o", "json"],
        )?)?)
    };
    let rules = |crd: &Value| -> Value {
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["rules"]
            .clone()
    };
    let old = crd_json("toolpolicies.chaperone.dev")?;
    assert!(rules(&old)["x-kubernetes-list-type"].is_null(), "{old}");
    // Objects made with the old CRDs.
    let objects = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: { name: planner }
spec:
  selector: { serviceAccountName: planner }
  toolServers: [{ name: orders, url: "http://orders:8080/mcp" }]
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: { name: planner-reads }
spec:
  targetRefs: [{ name: planner }]
  rules: [{ name: read, action: allow, tools: [{ server: orders, name: get_order }] }]
"#;
    let out = cp.kubectl_with_stdin(&["apply", "-n", &objects_ns, "-f", "-"], Some(objects))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 0.1.0 installed its CRDs from crds/, outside the release: the first
    // upgrade takes them over (README: "Upgrading from 0.1.0").
    let refused = helm(
        &[
            "upgrade",
            release,
            chart_dir().to_str().unwrap(),
            "--namespace",
            &namespace,
            "--set",
            "webhook.failurePolicy=Ignore",
        ],
        Some(&cp),
    )?;
    assert!(
        !refused.status.success(),
        "an upgrade without --take-ownership adopted the CRDs"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("take-ownership")
            || String::from_utf8_lossy(&refused.stderr).contains("ownership"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    install(&chart_dir(), &["--take-ownership"])?;
    for name in CRD_NAMES {
        let crd = crd_json(name)?;
        assert_eq!(
            crd["metadata"]["labels"]["helm.sh/chart"], "chaperone-0.2.0",
            "{name}"
        );
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{name}"
        );
    }
    let new = crd_json("toolpolicies.chaperone.dev")?;
    assert_eq!(rules(&new)["x-kubernetes-list-type"], "map", "{new}");
    // Later upgrades need no flag; the objects are still there and valid.
    install(&chart_dir(), &["--set", "replicas=1"])?;
    let policy = kubectl_on(
        &cp,
        &[
            "get",
            "toolpolicy",
            "planner-reads",
            "-n",
            &objects_ns,
            "-o",
            "json",
        ],
    )?;
    assert!(policy.contains("get_order"), "{policy}");
    // A duplicate rule name is now refused by the list map the upgrade brought.
    let duplicate = objects.replace(
        "rules: [{ name: read, action: allow, tools: [{ server: orders, name: get_order }] }]",
        "rules: [{ name: read, action: allow, tools: [{ name: a }] }, { name: read, action: deny, tools: [{ name: b }] }]",
    );
    let out = cp.kubectl_with_stdin(&["apply", "-n", &objects_ns, "-f", "-"], Some(&duplicate))?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Duplicate value"));

    // Uninstalling keeps the CRDs and the objects (resource-policy keep).
    helm_ok(
        &["uninstall", release, "--namespace", &namespace],
        Some(&cp),
    )?;
    for name in CRD_NAMES {
        assert!(
            exists_on(&cp, "crd", name, "default")?,
            "helm uninstall removed {name}"
        );
    }
    assert!(exists_on(&cp, "agentidentity", "planner", &objects_ns)?);
    Ok(())
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
    // The release installs the CRDs: a control plane of its own.
    let cp = &ControlPlane::start()?;
    let namespace = new_namespace_on(cp, "chaperone-uninstall")?;
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
        assert!(
            exists_on(cp, kind, name, &namespace)?,
            "{kind}/{name} not created"
        );
    }
    for crd in CRD_NAMES {
        assert!(
            exists_on(cp, "crd", crd, "default")?,
            "{crd} not installed by the release"
        );
    }

    let out = helm_ok_with(tool, &["uninstall", &release, "-n", &namespace], Some(cp))?;
    assert!(out.contains("uninstalled"), "{out}");
    for (kind, name) in objects
        .iter()
        .filter(|(k, _)| k != "CustomResourceDefinition")
    {
        assert!(
            !exists_on(cp, kind, name, &namespace)?,
            "{kind}/{name} left behind by helm uninstall"
        );
    }
    for crd in CRD_NAMES {
        assert!(
            exists_on(cp, "crd", crd, "default")?,
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
    // No fixed UID (OpenShift's restricted profiles assign one); the image's
    // numeric USER is non-root.
    assert!(pod["securityContext"]["runAsUser"].is_null(), "{pod}");
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
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
    let out = shared_plane().kubectl(&args)?;
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
        // The leader deletes the audit-key archive's expired months.
        ("delete", "configmaps", ns),
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
    let out =
        shared_plane().kubectl_with_stdin(&["create", "-n", namespace, "-f", "-"], Some(&pod))?;
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
        (
            "telemetry.otlp.protocol=http/json",
            "at '/telemetry/otlp/protocol'",
        ),
        (
            "telemetry.otlp.endpoint=collector:4317",
            "at '/telemetry/otlp/endpoint'",
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
                "sidecar.runAsUser=2000",
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
            assert_eq!(settings.run_as_user, Some(2000));
        } else {
            assert_eq!(settings.run_as_user, None, "no fixed UID for OpenShift");
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

/// The objects of `kind` that `helm template` renders with `sets`.
fn rendered_of_kind(sets: &[&str], kind: &str) -> Result<Vec<Value>> {
    Ok(rendered(sets)?
        .into_iter()
        .filter(|o| o["kind"] == kind)
        .collect())
}

#[test]
fn sidecar_pod_monitor_renders_only_when_enabled_and_scrapes_the_admin_port() -> Result<()> {
    assert!(rendered_of_kind(&[], "PodMonitor")?.is_empty());
    let monitors = rendered_of_kind(
        &[
            "podMonitor.enabled=true",
            "podMonitor.labels.release=prometheus",
        ],
        "PodMonitor",
    )?;
    assert_eq!(monitors.len(), 1, "{monitors:?}");
    let monitor = &monitors[0];
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["namespaceSelector"]["any"], true);
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    // The port the webhook gives the injected sidecar's admin server.
    assert_eq!(endpoint["port"], "chaperone-admin");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "30s");
    Ok(())
}

#[test]
fn prometheus_rule_renders_only_when_enabled_and_carries_the_alerts_file() -> Result<()> {
    assert!(rendered_of_kind(&[], "PrometheusRule")?.is_empty());
    let rules = rendered_of_kind(
        &[
            "prometheusRule.enabled=true",
            "prometheusRule.labels.release=prometheus",
        ],
        "PrometheusRule",
    )?;
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["metadata"]["labels"]["release"], "prometheus");
    let file: Value = serde_saphyr::from_str(&fs::read_to_string(
        chart_dir().join("alerts/chaperone.rules.yaml"),
    )?)?;
    assert_eq!(rules[0]["spec"], file, "the rules differ from the file");
    // Prometheus templates reach the rule as written (Helm does not expand them).
    let summary = &rules[0]["spec"]["groups"][0]["rules"][0]["annotations"]["summary"];
    assert!(
        summary
            .as_str()
            .is_some_and(|s| s.contains("{{ $labels.pod }}")),
        "{summary}"
    );
    // The controller's per-agent `namespace` label survives the scrape.
    let monitors = rendered_of_kind(&["serviceMonitor.enabled=true"], "ServiceMonitor")?;
    assert_eq!(monitors[0]["spec"]["endpoints"][0]["honorLabels"], true);
    Ok(())
}

#[test]
fn grafana_dashboard_config_map_carries_the_dashboard_and_the_sidecar_label() -> Result<()> {
    let dashboards = |sets: &[&str]| -> Result<Vec<Value>> {
        Ok(rendered_of_kind(sets, "ConfigMap")?
            .into_iter()
            .filter(|c| c["data"]["chaperone.json"].is_string())
            .collect())
    };
    assert!(dashboards(&[])?.is_empty());
    let maps = dashboards(&["dashboards.enabled=true"])?;
    assert_eq!(maps.len(), 1, "{maps:?}");
    assert_eq!(maps[0]["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(maps[0]["data"]["chaperone.json"].as_str().unwrap())?;
    let file: Value = serde_json::from_str(&fs::read_to_string(
        chart_dir().join("dashboards/chaperone.json"),
    )?)?;
    assert_eq!(shipped, file);
    assert_eq!(shipped["uid"], "chaperone");
    let maps = dashboards(&[
        "dashboards.enabled=true",
        "dashboards.label=dashboards",
        "dashboards.labelValue=chaperone",
        "dashboards.namespace=monitoring",
    ])?;
    assert_eq!(maps[0]["metadata"]["labels"]["dashboards"], "chaperone");
    assert!(maps[0]["metadata"]["labels"]["grafana_dashboard"].is_null());
    assert_eq!(maps[0]["metadata"]["namespace"], "monitoring");
    Ok(())
}

/// `helm template` with `args` (`--set`, `--set-json`, ...), as objects.
fn rendered_with(args: &[&str]) -> Result<Vec<Value>> {
    let chart = chart_dir();
    let mut all = vec!["template", "chaperone", chart.to_str().unwrap()];
    all.extend_from_slice(args);
    chart::manifest_documents(&helm_ok(&all, None)?)
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

#[test]
fn chart_adapts_without_forking() -> Result<()> {
    // Names, ServiceAccount and RBAC brought by the platform team.
    let objects = rendered_with(&[
        "--set",
        "fullnameOverride=acme-gov",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=platform-sa",
        "--set",
        "rbac.create=false",
    ])?;
    let deployment = object(&objects, "Deployment")?;
    assert_eq!(deployment["metadata"]["name"], "acme-gov-controller");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "platform-sa"
    );
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        assert!(
            objects.iter().all(|o| o["kind"] != kind),
            "{kind} rendered with rbac.create=false / serviceAccount.create=false"
        );
    }
    let objects = rendered_with(&[
        "--set",
        "nameOverride=gov",
        "--set",
        "serviceAccount.name=platform-sa",
    ])?;
    let binding = named(&objects, "RoleBinding", "chaperone-gov-controller")
        .context("RoleBinding named after nameOverride")?;
    assert_eq!(binding["subjects"][0]["name"], "platform-sa");
    assert_eq!(
        object(&objects, "Deployment")?["metadata"]["labels"]["app.kubernetes.io/name"],
        "gov"
    );
    assert!(named(&objects, "ServiceAccount", "platform-sa").is_some());

    // Aggregated roles for the users of the CRDs, by default.
    let objects = rendered(&[])?;
    let view = named(&objects, "ClusterRole", "chaperone-view").context("view role")?;
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    assert_eq!(
        view["rules"][0]["verbs"],
        serde_json::json!(["get", "list", "watch"])
    );
    let edit = named(&objects, "ClusterRole", "chaperone-edit").context("edit role")?;
    assert_eq!(
        edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert!(
        !edit["rules"][0]["resources"]
            .to_string()
            .contains("toolcallapprovals")
    );
    assert!(
        named(
            &rendered(&["rbac.aggregateClusterRoles=false"])?,
            "ClusterRole",
            "chaperone-view"
        )
        .is_none()
    );

    // OpenShift's restricted profile: by default no fixed UID anywhere.
    let objects = rendered(&[])?;
    let pod = &object(&objects, "Deployment")?["spec"]["template"]["spec"];
    assert!(pod["securityContext"]["runAsUser"].is_null(), "{pod}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let env = &pod["containers"][0]["env"];
    let uid = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "CHAPERONE_SIDECAR_RUN_AS_USER");
    assert_eq!(uid.context("CHAPERONE_SIDECAR_RUN_AS_USER")?["value"], "");
    // Pinned where a platform wants one.
    let objects = rendered(&[
        "podSecurityContext.runAsUser=1000",
        "sidecar.runAsUser=1000",
    ])?;
    let pod = &object(&objects, "Deployment")?["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 1000);
    assert!(
        pod["containers"][0]["env"]
            .to_string()
            .contains(r#"{"name":"CHAPERONE_SIDECAR_RUN_AS_USER","value":"1000"}"#)
    );

    // Extra flags, environment and volumes.
    let objects = rendered_with(&[
        "--set-json",
        r#"extraArgs=["--approval-retention=2h"]"#,
        "--set-json",
        r#"extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"}]"#,
        "--set-json",
        r#"extraVolumes=[{"name":"ca","configMap":{"name":"corp-ca"}}]"#,
        "--set-json",
        r#"extraVolumeMounts=[{"name":"ca","mountPath":"/etc/corp-ca","readOnly":true}]"#,
        "--set",
        "networkPolicy.enabled=true",
    ])?;
    let pod = &object(&objects, "Deployment")?["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["args"],
        serde_json::json!(["--approval-retention=2h"])
    );
    assert!(container["env"].to_string().contains("HTTPS_PROXY"));
    assert!(pod["volumes"].to_string().contains("corp-ca"));
    assert!(
        container["volumeMounts"]
            .to_string()
            .contains("/etc/corp-ca")
    );
    let policy = object(&objects, "NetworkPolicy")?;
    let ports: Vec<&str> = policy["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| rule["ports"][0]["port"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["grpc", "webhook", "admin"]);
    Ok(())
}

/// The controller container's environment variables named `OTEL_*` or
/// `CHAPERONE_SIDECAR_OTEL_*`, as rendered with `sets`.
fn otel_env(sets: &[&str]) -> Result<Vec<Value>> {
    let objects = rendered(sets)?;
    let deployment = object(&objects, "Deployment")?;
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .context("the controller's env")?;
    Ok(env
        .iter()
        .filter(|e| {
            let name = e["name"].as_str().unwrap_or_default();
            name.starts_with("OTEL_") || name.starts_with("CHAPERONE_SIDECAR_OTEL_")
        })
        .cloned()
        .collect())
}

#[test]
fn traces_are_off_until_an_otlp_endpoint_is_set() -> Result<()> {
    assert_eq!(otel_env(&[])?, Vec::<Value>::new());
    // Settings without an endpoint stay off too.
    assert_eq!(
        otel_env(&[
            "telemetry.sampler=always_on",
            "telemetry.otlp.headersSecret=otlp"
        ])?,
        Vec::<Value>::new()
    );
    Ok(())
}

#[test]
fn chart_passes_the_otlp_settings_and_reads_the_headers_from_a_secret() -> Result<()> {
    let env = otel_env(&[
        "telemetry.otlp.endpoint=http://otel-collector.observability:4318",
        "telemetry.otlp.protocol=http/protobuf",
        "telemetry.otlp.headersSecret=otlp-credentials",
        "telemetry.sampler=parentbased_traceidratio",
        "telemetry.samplerArg=0.25",
        "telemetry.resourceAttributes=deployment.environment=prod",
    ])?;
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        value("OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some(serde_json::json!(
            "http://otel-collector.observability:4318"
        ))
    );
    assert_eq!(
        value("OTEL_EXPORTER_OTLP_PROTOCOL"),
        Some(serde_json::json!("http/protobuf"))
    );
    assert_eq!(
        value("OTEL_TRACES_SAMPLER"),
        Some(serde_json::json!("parentbased_traceidratio"))
    );
    assert_eq!(
        value("OTEL_TRACES_SAMPLER_ARG"),
        Some(serde_json::json!("0.25"))
    );
    assert_eq!(
        value("OTEL_RESOURCE_ATTRIBUTES"),
        Some(serde_json::json!("deployment.environment=prod"))
    );
    // The credentials come from the Secret, never as a value in the spec;
    // the webhook names the same Secret in each sidecar's namespace.
    let headers = env
        .iter()
        .find(|e| e["name"] == "OTEL_EXPORTER_OTLP_HEADERS")
        .context("OTEL_EXPORTER_OTLP_HEADERS")?;
    assert!(headers["value"].is_null(), "{headers}");
    assert_eq!(
        headers["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "otlp-credentials", "key": "headers"})
    );
    assert_eq!(
        value("CHAPERONE_SIDECAR_OTEL_HEADERS_SECRET"),
        Some(serde_json::json!("otlp-credentials"))
    );
    // The controller accepts what the chart passes.
    let objects = rendered(&[
        "telemetry.otlp.endpoint=http://otel-collector.observability:4318",
        "telemetry.otlp.headersSecret=otlp-credentials",
    ])?;
    let flags = controller_flags(object(&objects, "Deployment")?)?;
    let args = <chaperone_controller::Args as clap::Parser>::try_parse_from(&flags)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let settings = chaperone_controller::webhook::InjectionSettings::from_args(&args)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(
        settings.otel_headers_secret.as_deref(),
        Some("otlp-credentials")
    );
    Ok(())
}
