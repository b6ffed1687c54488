//! The sidecar-injection webhook on a real API server: registered with a URL
//! client config and the caBundle the controller keeps current, it injects
//! annotated pods exactly once, leaves plain pods alone, follows the namespace
//! label and the opt-out, never touches kube-system or the controller's
//! namespace, leaves an injected spec unchanged, warns about pods no
//! AgentIdentity selects, answers malformed reviews with HTTP 400, and keeps
//! admitting across a certificate rotation.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaperone_api::{AgentIdentity, AgentIdentitySpecV1, model};
use chaperone_controller::{
    certs::{self, CertConfig, Lifetimes, TlsMaterial},
    webhook::{self, InjectionSettings, WebhookState, mutate},
};
use chaperone_testenv::{ControlPlane, create_namespace, unique_suffix};
use futures_util::StreamExt as _;
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::watch,
};

/// Label that keeps a namespace out of the shared webhook (the rotation test
/// registers its own webhook for such namespaces).
const ROTATION_LABEL: &str = "chaperone-test/rotation";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Installs `crds/` once per test binary and waits until they are Established.
fn control_plane() -> &'static ControlPlane {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    INSTALLED.get_or_init(|| {
        let crds = repo_root().join("crds");
        let crds = crds.to_str().expect("UTF-8 path");
        for args in [
            vec!["apply", "--server-side", "-f", crds],
            vec![
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "-f",
                crds,
            ],
        ] {
            let out = cp.kubectl(&args).expect("kubectl runs");
            assert!(
                out.status.success(),
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    cp
}

/// The webhook every test of this binary shares, served from its own thread
/// and runtime so that it outlives each test's runtime.
struct SharedInjector {
    addr: SocketAddr,
    ca_pem: String,
    controller_namespace: String,
}

fn injector() -> &'static SharedInjector {
    static INJECTOR: OnceLock<SharedInjector> = OnceLock::new();
    INJECTOR.get_or_init(|| {
        let cp = control_plane();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                match start_shared(cp).await {
                    Ok((injector, server)) => {
                        let _ = tx.send(Ok(injector));
                        let _ = server.wait().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                    }
                }
            });
        });
        match rx.recv() {
            Ok(Ok(injector)) => injector,
            Ok(Err(e)) => panic!("could not start the webhook: {e}"),
            Err(e) => panic!("webhook thread died: {e}"),
        }
    })
}

async fn start_shared(cp: &ControlPlane) -> Result<(SharedInjector, webhook::BoundWebhook)> {
    let client = cp.client().await?;
    let controller_namespace = create_namespace(&client, "chaperone-system").await?;
    let config = cert_config(
        &controller_namespace,
        Lifetimes::default(),
        Duration::from_secs(60),
    );
    let material = certs::ensure_with(client.clone(), &config).await?;
    let ca_pem = material.ca_pem.clone();
    let tls = certs::spawn_renewal(client.clone(), config, material);

    let (identities, writer) = reflector::store::<AgentIdentity>();
    let stream = reflector(
        writer,
        watcher(
            Api::<AgentIdentity>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    let (namespaces, drive) = webhook::namespace_reflector(client.clone());
    tokio::spawn(drive);

    let state = WebhookState::new(client.clone(), settings(&controller_namespace), identities)
        .with_namespace_store(namespaces);
    let server = webhook::bind("127.0.0.1:0".parse()?, tls.clone(), Arc::new(state)).await?;
    let addr = server.local_addr;

    // Registered without a caBundle: the controller's sync fills it in.
    let name = format!("chaperone-injector-{}", unique_suffix());
    register(
        &client,
        &name,
        addr,
        None,
        json!({"matchExpressions": [{"key": ROTATION_LABEL, "operator": "DoesNotExist"}]}),
    )
    .await?;
    certs::spawn_ca_bundle_sync(client.clone(), name.clone(), tls, Duration::from_secs(30));
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let config = api.get(&name).await?;
        let bundle = config
            .webhooks
            .iter()
            .flatten()
            .next()
            .and_then(|w| w.client_config.ca_bundle.clone());
        if bundle.map(|b| b.0) == Some(ca_pem.as_bytes().to_vec()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("caBundle of {name} was never synced");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until_injecting(&client, None).await?;
    Ok((
        SharedInjector {
            addr,
            ca_pem,
            controller_namespace,
        },
        server,
    ))
}

fn settings(controller_namespace: &str) -> InjectionSettings {
    InjectionSettings::new(
        "chaperone-sidecar:test",
        format!("chaperone-controller.{controller_namespace}.svc:9090"),
        controller_namespace,
    )
}

fn cert_config(namespace: &str, lifetimes: Lifetimes, renew_interval: Duration) -> CertConfig {
    CertConfig {
        namespace: namespace.to_string(),
        secret_name: "chaperone-controller-tls".to_string(),
        sans: certs::service_sans(
            "chaperone-controller",
            namespace,
            &["127.0.0.1".to_string()],
        ),
        lifetimes,
        renew_interval,
        source: certs::CertSource::SelfManaged,
    }
}

/// Registers a MutatingWebhookConfiguration for pod creation that calls
/// `https://<addr>/inject`.
async fn register(
    client: &Client,
    name: &str,
    addr: SocketAddr,
    ca_pem: Option<&str>,
    namespace_selector: serde_json::Value,
) -> Result<()> {
    let mut client_config = json!({"url": format!("https://{addr}/inject")});
    if let Some(ca) = ca_pem {
        use base64::Engine as _;
        client_config["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.chaperone.dev",
            "clientConfig": client_config,
            "rules": [{
                "apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE"], "resources": ["pods"],
            }],
            "namespaceSelector": namespace_selector,
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
        }],
    }))?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await?;
    Ok(())
}

/// The API server picks up new webhook configurations asynchronously: creates
/// annotated probe pods (in a namespace labeled `label`, if given) until one
/// comes back injected.
async fn wait_until_injecting(client: &Client, label: Option<(&str, &str)>) -> Result<()> {
    let ns = new_namespace(client, "probe", label).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        let last = match create_pod(client, &ns, &format!("probe-{i}"), annotated("true")).await {
            Ok(pod) if sidecar_count(&pod) == 1 => return Ok(()),
            Ok(_) => "created without the sidecar".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("the webhook never injected a probe pod; the last one: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!()
}

async fn new_namespace(
    client: &Client,
    prefix: &str,
    label: Option<(&str, &str)>,
) -> Result<String> {
    let name = create_namespace(client, prefix).await?;
    if let Some((key, value)) = label {
        let patch = json!({"metadata": {"labels": {key: value}}});
        Api::<Namespace>::all(client.clone())
            .patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await?;
    }
    Ok(name)
}

fn annotated(value: &str) -> serde_json::Value {
    json!({"metadata": {"annotations": {mutate::INJECT_ANNOTATION: value}}})
}

fn pod_object(name: &str, extra: serde_json::Value) -> Result<Pod> {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    });
    merge(&mut pod, extra);
    Ok(serde_json::from_value(pod)?)
}

fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(base), serde_json::Value::Object(patch)) => {
            for (k, v) in patch {
                merge(base.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (base, patch) => *base = patch,
    }
}

async fn create_pod(
    client: &Client,
    ns: &str,
    name: &str,
    extra: serde_json::Value,
) -> Result<Pod> {
    let pod = pod_object(name, extra)?;
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?)
}

fn sidecar_count(pod: &Pod) -> usize {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.map(|s| s.containers.iter()).into_iter().flatten())
        .filter(|c| c.name == mutate::SIDECAR_NAME)
        .count()
}

fn mcp_url(pod: &Pod, container: usize) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .get(container)?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == mutate::MCP_URL_ENV)
        .and_then(|e| e.value.clone())
}

async fn setup() -> Result<(Client, &'static SharedInjector)> {
    let injector = tokio::task::spawn_blocking(injector).await?;
    Ok((control_plane().client().await?, injector))
}

#[tokio::test]
async fn annotated_pod_is_stored_with_the_sidecar_exactly_once() -> Result<()> {
    let (client, injector) = setup().await?;
    let ns = new_namespace(&client, "inject", None).await?;
    let pod = create_pod(
        &client,
        &ns,
        "agent",
        json!({
            "metadata": {"annotations": {mutate::INJECT_ANNOTATION: "true"}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "migrate:1"}],
                "containers": [
                    {"name": "agent", "image": "agent:1", "env": [{"name": "A", "value": "1"}]},
                    {"name": "helper", "image": "helper:1"},
                ],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        }),
    )
    .await?;
    let stored = Api::<Pod>::namespaced(client, &ns).get("agent").await?;
    assert_eq!(stored, pod);
    assert_eq!(sidecar_count(&stored), 1);
    let spec = stored.spec.as_ref().context("spec")?;
    let init = spec.init_containers.as_ref().context("init containers")?;
    assert_eq!(init[0].name, mutate::SIDECAR_NAME);
    assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
    assert_eq!(init[1].name, "migrate");
    let env = |name: &str| {
        let var = init[0].env.iter().flatten().find(|e| e.name == name);
        var.and_then(|e| e.value.clone())
    };
    assert_eq!(env("CHAPERONE_CA_PEM"), Some(injector.ca_pem.clone()));
    // The API server set the pod's default grace period (30 s) before the
    // webhook ran: the sidecar drains for a third of it.
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    assert_eq!(env("CHAPERONE_SHUTDOWN_GRACE_MS").as_deref(), Some("10000"));
    assert_eq!(mcp_url(&stored, 0).as_deref(), Some(mutate::MCP_URL));
    assert_eq!(mcp_url(&stored, 1).as_deref(), Some(mutate::MCP_URL));
    let volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["data", mutate::TOKEN_VOLUME]);
    Ok(())
}

#[tokio::test]
async fn plain_pod_is_untouched() -> Result<()> {
    let (client, _) = setup().await?;
    let ns = new_namespace(&client, "plain", None).await?;
    let pod = create_pod(&client, &ns, "plain", json!({})).await?;
    assert_eq!(sidecar_count(&pod), 0);
    assert!(pod.spec.as_ref().context("spec")?.init_containers.is_none());
    assert_eq!(mcp_url(&pod, 0), None);
    Ok(())
}

#[tokio::test]
async fn namespace_label_injects_unless_the_pod_opts_out() -> Result<()> {
    let (client, _) = setup().await?;
    let ns = new_namespace(
        &client,
        "labeled",
        Some((mutate::INJECTION_LABEL, "enabled")),
    )
    .await?;
    let injected = create_pod(&client, &ns, "by-label", json!({})).await?;
    assert_eq!(sidecar_count(&injected), 1);
    let opted_out = create_pod(&client, &ns, "opted-out", annotated("false")).await?;
    assert_eq!(sidecar_count(&opted_out), 0);
    Ok(())
}

#[tokio::test]
async fn kube_system_and_the_controller_namespace_are_never_injected() -> Result<()> {
    let (client, injector) = setup().await?;
    let name = format!("never-{}", unique_suffix());
    let pod = create_pod(&client, "kube-system", &name, annotated("true")).await?;
    assert_eq!(sidecar_count(&pod), 0);
    let pod = create_pod(
        &client,
        &injector.controller_namespace,
        &name,
        annotated("true"),
    )
    .await?;
    assert_eq!(sidecar_count(&pod), 0);
    Ok(())
}

#[tokio::test]
async fn already_injected_spec_comes_back_unchanged() -> Result<()> {
    let (client, _) = setup().await?;
    let ns = new_namespace(&client, "again", None).await?;
    let first = create_pod(&client, &ns, "first", annotated("true")).await?;
    let spec = first.spec.clone().context("spec")?;
    let second = create_pod(
        &client,
        &ns,
        "second",
        json!({
            "metadata": {"annotations": {mutate::INJECT_ANNOTATION: "true"}},
            "spec": serde_json::to_value(&spec)?,
        }),
    )
    .await?;
    assert_eq!(sidecar_count(&second), 1);
    assert_eq!(second.spec, Some(spec));
    Ok(())
}

#[tokio::test]
async fn tool_mode_injects_an_inbound_sidecar() -> Result<()> {
    let (client, _) = setup().await?;
    let ns = new_namespace(&client, "tool", None).await?;
    let pod = create_pod(
        &client,
        &ns,
        "tool",
        json!({"metadata": {"annotations": {
            mutate::INJECT_ANNOTATION: "tool",
            mutate::INBOUND_PORT_ANNOTATION: "8080",
            mutate::AUDIENCE_ANNOTATION: "orders",
        }}}),
    )
    .await?;
    let spec = pod.spec.as_ref().context("spec")?;
    let sidecar = &spec.init_containers.as_ref().context("init")?[0];
    let env = |name: &str| {
        sidecar
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(env("CHAPERONE_MODE").as_deref(), Some("tool"));
    assert_eq!(
        env(mutate::INBOUND_UPSTREAM_ENV).as_deref(),
        Some("http://127.0.0.1:8080")
    );
    assert_eq!(
        env(mutate::INBOUND_AUDIENCES_ENV).as_deref(),
        Some("orders")
    );

    // Without its audience a tool sidecar could verify nothing: refused.
    let err = create_pod(
        &client,
        &ns,
        "tool-without-audience",
        json!({"metadata": {"annotations": {
            mutate::INJECT_ANNOTATION: "tool",
            mutate::INBOUND_PORT_ANNOTATION: "8080",
        }}}),
    )
    .await
    .expect_err("a tool pod without chaperone.dev/audience is refused");
    assert!(
        err.to_string()
            .contains(&format!("add {}:", mutate::AUDIENCE_ANNOTATION)),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_resource_annotation_is_refused_with_the_reason() -> Result<()> {
    let (client, _) = setup().await?;
    let ns = new_namespace(&client, "refused", None).await?;
    let err = create_pod(
        &client,
        &ns,
        "greedy",
        json!({"metadata": {"annotations": {
            mutate::INJECT_ANNOTATION: "true",
            mutate::MEMORY_ANNOTATION: "64Gi",
        }}}),
    )
    .await
    .expect_err("a sidecar above the memory bound is refused");
    assert!(err.to_string().contains(mutate::MEMORY_ANNOTATION), "{err}");
    Ok(())
}

/// Creates a pod with kubectl and returns its stderr, where admission warnings go.
fn kubectl_create_pod(ns: &str, name: &str, service_account: &str) -> Result<String> {
    let yaml = serde_json::to_string(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "planner"},
                     "annotations": {mutate::INJECT_ANNOTATION: "true"}},
        "spec": {"serviceAccountName": service_account,
                 "containers": [{"name": "agent", "image": "agent:1"}]},
    }))?;
    let out = control_plane().kubectl_with_stdin(&["create", "-f", "-"], Some(&yaml))?;
    if !out.status.success() {
        bail!(
            "kubectl create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn warns_when_no_agent_identity_selects_the_pod() -> Result<()> {
    let (client, _) = setup().await?;
    let ns = new_namespace(&client, "warn", None).await?;
    let stderr = kubectl_create_pod(&ns, "lonely", "planner")?;
    assert!(
        stderr.contains("no AgentIdentity") && stderr.contains("serviceAccountName: planner"),
        "expected a warning, got: {stderr}"
    );

    let identity = AgentIdentity::new(
        "planner",
        AgentIdentitySpecV1(model::AgentIdentitySpec {
            selector: model::AgentSelector {
                service_account_name: "planner".into(),
                match_labels: BTreeMap::from([("app".into(), "planner".into())]),
            },
            ..Default::default()
        }),
    );
    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &identity)
        .await?;
    // The webhook's AgentIdentity reflector catches up within moments.
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 0.. {
        let stderr = kubectl_create_pod(&ns, &format!("selected-{i}"), "planner")?;
        if !stderr.contains("no AgentIdentity") {
            break;
        }
        if Instant::now() > deadline {
            bail!("still warned after the AgentIdentity was created: {stderr}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Sends `body` to the webhook over TLS (trusting `ca_pem`) and returns the
/// status code, the response body and the certificate the server presented.
async fn post_inject(
    addr: SocketAddr,
    ca_pem: &str,
    body: &[u8],
) -> Result<(u16, String, Vec<u8>)> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default();
    let head = format!(
        "POST /inject HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body, peer))
}

fn der_of(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?
        .as_ref()
        .to_vec())
}

#[tokio::test]
async fn malformed_review_gets_http_400_with_the_reason() -> Result<()> {
    let (_, injector) = setup().await?;
    let (status, body, _) = post_inject(injector.addr, &injector.ca_pem, b"{not json").await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("malformed AdmissionReview"), "{body}");
    let (status, body, _) = post_inject(
        injector.addr,
        &injector.ca_pem,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no request"), "{body}");
    Ok(())
}

#[tokio::test]
async fn concurrent_replicas_settle_on_one_secret() -> Result<()> {
    let (client, _) = setup().await?;
    let ns = new_namespace(&client, "replicas", None).await?;
    let config = cert_config(&ns, Lifetimes::default(), Duration::from_secs(60));
    let results =
        futures_util::future::join_all((0..4).map(|_| certs::ensure_with(client.clone(), &config)))
            .await;
    let materials: Vec<TlsMaterial> = results.into_iter().collect::<Result<_, _>>()?;
    assert!(
        materials.windows(2).all(|w| w[0] == w[1]),
        "replicas disagree"
    );
    let again = certs::ensure_with(client.clone(), &config).await?;
    assert_eq!(again, materials[0]);

    // Other SANs: the serving certificate is reissued from the same CA.
    let mut more = config.clone();
    more.sans.push("webhook.example".into());
    let reissued = certs::ensure_with(client.clone(), &more).await?;
    assert_eq!(reissued.ca_pem, again.ca_pem);
    assert_ne!(reissued.cert_pem, again.cert_pem);
    let secret = Api::<Secret>::namespaced(client, &ns)
        .get(&config.secret_name)
        .await?;
    let stored = certs::StoredCerts::from_secret(&secret);
    assert_eq!(stored.tls_cert.as_deref(), Some(reissued.cert_pem.as_str()));
    Ok(())
}

/// A Secret as cert-manager writes it: the CA certificate (no CA key), the
/// serving certificate and its key.
fn cert_manager_secret(name: &str, sans: &[String]) -> Result<Secret> {
    let now = std::time::SystemTime::now();
    let ca = certs::issue_ca(Duration::from_secs(24 * 3600), now)?;
    let serving = certs::issue_serving_cert(&ca, sans, Duration::from_secs(3600), now)?;
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "stringData": {"ca.crt": ca.cert, "tls.crt": serving.cert, "tls.key": serving.key},
    }))?)
}

#[tokio::test]
async fn external_tls_only_reads_the_secret() -> Result<()> {
    let (client, _) = setup().await?;
    let ns = new_namespace(&client, "external-tls", None).await?;
    let mut config = cert_config(&ns, Lifetimes::default(), Duration::from_secs(60));
    config.source = certs::CertSource::External;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // Not issued yet: an error that says so, and no Secret made in its place.
    let err = certs::ensure_with(client.clone(), &config)
        .await
        .expect_err("a missing external Secret is an error");
    assert!(
        matches!(err, certs::CertError::ExternalSecretMissing { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("cert-manager"), "{err}");
    assert!(secrets.get_opt(&config.secret_name).await?.is_none());

    // Issued: served as it is, and never written, even with SANs it lacks.
    let created = secrets
        .create(
            &PostParams::default(),
            &cert_manager_secret(&config.secret_name, &config.sans[..1])?,
        )
        .await?;
    let material = certs::ensure_with(client.clone(), &config).await?;
    let stored = certs::StoredCerts::from_secret(&secrets.get(&config.secret_name).await?);
    assert_eq!(stored.tls_cert.as_deref(), Some(material.cert_pem.as_str()));
    assert_eq!(stored.ca_cert.as_deref(), Some(material.ca_pem.as_str()));
    assert_eq!(stored.ca_key, None);

    // cert-manager rotates it: the renewal loop publishes the new certificate.
    let mut fast = config.clone();
    fast.renew_interval = Duration::from_millis(200);
    let mut tls = certs::spawn_renewal(client.clone(), fast, material.clone());
    let mut rotated = cert_manager_secret(&config.secret_name, &config.sans)?;
    rotated.metadata.resource_version = created.metadata.resource_version.clone();
    secrets
        .replace(&config.secret_name, &PostParams::default(), &rotated)
        .await?;
    let before = secrets.get(&config.secret_name).await?;
    tokio::time::timeout(Duration::from_secs(10), tls.changed())
        .await
        .context("the rotated certificate was not picked up")??;
    let rotated = tls.borrow_and_update().clone();
    assert_ne!(rotated.cert_pem, material.cert_pem);
    assert_eq!(
        Some(rotated.cert_pem.as_str()),
        certs::StoredCerts::from_secret(&before).tls_cert.as_deref()
    );
    // Reading never wrote: the Secret is the version cert-manager left.
    let after = secrets.get(&config.secret_name).await?;
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_keeps_admission_working() -> Result<()> {
    let (client, _) = setup().await?;
    let controller_ns = new_namespace(&client, "rotating-system", None).await?;
    // A 9 s certificate is reissued once a third of it is left: every ~6 s.
    let lifetimes = Lifetimes {
        ca: Duration::from_secs(24 * 3600),
        serving: Duration::from_secs(9),
    };
    let config = cert_config(&controller_ns, lifetimes, Duration::from_millis(500));
    let material = certs::ensure_with(client.clone(), &config).await?;
    let mut tls: watch::Receiver<Arc<TlsMaterial>> =
        certs::spawn_renewal(client.clone(), config, material.clone());
    let (identities, _writer) = reflector::store::<AgentIdentity>();
    let state = WebhookState::new(client.clone(), settings(&controller_ns), identities);
    let server = webhook::bind("127.0.0.1:0".parse()?, tls.clone(), Arc::new(state)).await?;

    let name = format!("chaperone-rotation-{}", unique_suffix());
    register(
        &client,
        &name,
        server.local_addr,
        Some(&material.ca_pem),
        json!({"matchLabels": {ROTATION_LABEL: "true"}}),
    )
    .await?;
    let result = async {
        wait_until_injecting(&client, Some((ROTATION_LABEL, "true"))).await?;
        let (_, _, served) = post_inject(server.local_addr, &material.ca_pem, b"{}").await?;
        assert_eq!(served, der_of(&material.cert_pem)?);

        let ns = new_namespace(&client, "rotating", Some((ROTATION_LABEL, "true"))).await?;
        for round in 0..2 {
            tokio::time::timeout(Duration::from_secs(20), tls.changed())
                .await
                .context("no renewal within 20 s")??;
            let renewed = tls.borrow_and_update().clone();
            assert_eq!(renewed.ca_pem, material.ca_pem, "the CA stays");
            // New connections see the new certificate (the server swaps it in
            // from the same channel, in its own task: allow it a moment).
            let expected = der_of(&renewed.cert_pem)?;
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let (_, _, served) =
                    post_inject(server.local_addr, &material.ca_pem, b"{}").await?;
                if served == expected {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: old certificate served"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Once the first certificate has expired, the API server still gets in.
            let pod =
                create_pod(&client, &ns, &format!("after-{round}"), annotated("true")).await?;
            assert_eq!(sidecar_count(&pod), 1);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await?;
    server.shutdown();
    result
}
