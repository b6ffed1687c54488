//! Injection webhook latency under a burst of pod creations on a real API server
//! (etcd + kube-apiserver from `make tools`): the time the webhook spends per
//! AdmissionReview (body read → decide → encode), the end-to-end pod creation
//! time seen by the client, and the pure `injection_patch` cost for reference.
//!
//! `cargo bench -p chaperone-controller --bench webhook_latency`
//! (`PODS=1000 CONCURRENCY=64` to change the burst). Prints a Markdown table.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use chaperone_api::{AgentIdentity, AgentIdentitySpecV1, model};
use chaperone_controller::{
    certs::{self, CertConfig, Lifetimes},
    webhook::{self, InjectionSettings, WebhookState, injection_patch, mutate},
};
use chaperone_testenv::{ControlPlane, create_namespace, unique_suffix};
use futures_util::StreamExt as _;
use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Pod};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{reflector, watcher},
};
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn row(name: &str, mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    format!(
        "| {name} | {} | {} | {} | {} | {} |",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 90.0)),
        ms(percentile(&samples, 99.0)),
        ms(samples.last().copied().unwrap_or_default()),
    )
}

fn identity(name: &str, namespace: &str, service_account: &str) -> AgentIdentity {
    let mut identity = AgentIdentity::new(
        name,
        AgentIdentitySpecV1(model::AgentIdentitySpec {
            selector: model::AgentSelector {
                service_account_name: service_account.into(),
                match_labels: [("app".to_string(), "agent".to_string())].into(),
            },
            ..Default::default()
        }),
    );
    identity.metadata.namespace = Some(namespace.into());
    identity
}

fn pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": "agent"},
            "annotations": {mutate::INJECT_ANNOTATION: "true"},
        },
        "spec": {
            "serviceAccountName": "agent",
            "initContainers": [{"name": "setup", "image": "setup:1"}],
            "containers": [
                {"name": "agent", "image": "agent:1", "env": [{"name": "MODEL", "value": "small"}]},
                {"name": "helper", "image": "helper:1"},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }))?)
}

fn pure_injection(identities: &[Arc<AgentIdentity>]) -> Result<Vec<Duration>> {
    let mut pod = pod("pure")?;
    pod.metadata.namespace = Some("bench".into());
    let mut settings = InjectionSettings::new("sidecar:bench", "ctl.sys.svc:9090", "sys");
    settings.ca_pem = "x".repeat(700);
    let labels = Default::default();
    let mut samples = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let start = Instant::now();
        let outcome = injection_patch(&pod, &labels, &settings, identities)?;
        samples.push(start.elapsed());
        std::hint::black_box(outcome);
    }
    Ok(samples)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let pods = env_usize("PODS", 500);
    let concurrency = env_usize("CONCURRENCY", 32);
    let cp = tokio::task::spawn_blocking(ControlPlane::shared).await?;
    let client: Client = cp.client().await?;
    let system = create_namespace(&client, "chaperone-system").await?;
    let ns = create_namespace(&client, "bench").await?;

    let config = CertConfig {
        namespace: system.clone(),
        secret_name: "chaperone-controller-tls".into(),
        sans: certs::service_sans("chaperone-controller", &system, &["127.0.0.1".into()]),
        lifetimes: Lifetimes::default(),
        renew_interval: Duration::from_secs(3600),
        source: certs::CertSource::SelfManaged,
    };
    let material = certs::ensure_with(client.clone(), &config).await?;
    let tls = certs::spawn_renewal(client.clone(), config, material.clone());

    // 200 AgentIdentities in the store, one of which selects the bench pods.
    let (identities, mut writer) = reflector::store::<AgentIdentity>();
    for i in 0..200 {
        let namespace = if i % 2 == 0 { ns.as_str() } else { "elsewhere" };
        writer.apply_watcher_event(&watcher::Event::Apply(identity(
            &format!("agent-{i}"),
            namespace,
            &format!("sa-{i}"),
        )));
    }
    writer.apply_watcher_event(&watcher::Event::Apply(identity("agent", &ns, "agent")));
    let pure = pure_injection(&identities.state())?;

    // The webhook gets a runtime of its own, as in the controller process: the
    // burst's client tasks must not queue in front of it.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("webhook")
        .enable_all()
        .build()?;
    let (namespaces, drive) = webhook::namespace_reflector(client.clone());
    server_rt.spawn(drive);
    let reviews = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let recorder = reviews.clone();
    let state = WebhookState::new(
        client.clone(),
        InjectionSettings::new("sidecar:bench", format!("ctl.{system}.svc:9090"), &system),
        identities,
    )
    .with_namespace_store(namespaces)
    .with_observer(move |record| {
        if let Ok(mut samples) = recorder.lock() {
            samples.push(record.elapsed);
        }
    });
    let server = server_rt
        .spawn(webhook::bind("127.0.0.1:0".parse()?, tls, Arc::new(state)))
        .await??;

    use base64::Engine as _;
    let name = format!("chaperone-bench-{}", unique_suffix());
    let webhook_config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.chaperone.dev",
            "clientConfig": {
                "url": format!("https://{}/inject", server.local_addr),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&material.ca_pem),
            },
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
        }],
    }))?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &webhook_config)
        .await?;

    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Warm-up: wait until the API server calls the webhook, then a few more.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut warm = 0;
    while warm < 20 {
        let created = api
            .create(
                &PostParams::default(),
                &pod(&format!("warm-{}", unique_suffix()))?,
            )
            .await?;
        let injected = created
            .spec
            .and_then(|s| s.init_containers)
            .is_some_and(|c| c.iter().any(|c| c.name == mutate::SIDECAR_NAME));
        if injected {
            warm += 1;
        } else if Instant::now() > deadline {
            anyhow::bail!("the API server never called the webhook");
        }
    }
    reviews
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clear();

    let started = Instant::now();
    let results: Vec<Result<Duration>> = futures_util::stream::iter(0..pods)
        .map(|i| {
            let api = api.clone();
            async move {
                let pod = pod(&format!("burst-{i}"))?;
                let start = Instant::now();
                let created = api.create(&PostParams::default(), &pod).await?;
                let elapsed = start.elapsed();
                let injected = created
                    .spec
                    .and_then(|s| s.init_containers)
                    .is_some_and(|c| c.iter().any(|c| c.name == mutate::SIDECAR_NAME));
                anyhow::ensure!(injected, "pod burst-{i} was not injected");
                Ok(elapsed)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let creations = results
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .context("burst")?;
    let at_webhook = reviews
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    server.shutdown();
    drop(server);
    server_rt.shutdown_background();

    println!(
        "Burst: {pods} pod creations, {concurrency} concurrent, {:.1} s ({:.0} pods/s)\n",
        wall.as_secs_f64(),
        pods as f64 / wall.as_secs_f64()
    );
    println!("| what | samples | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    println!(
        "{}",
        row(
            "at the webhook (AdmissionReview in → response out)",
            at_webhook
        )
    );
    println!(
        "{}",
        row(
            "pod create, client side (API server + etcd + webhook)",
            creations
        )
    );
    println!(
        "{}",
        row("injection_patch alone (pure, 201 AgentIdentities)", pure)
    );
    Ok(())
}
