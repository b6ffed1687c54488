//! Stand-ins for what a cluster would run around the controller, for tests and
//! benchmarks on the local control plane: the CRDs, ServiceAccounts and pods
//! (they stay Pending: no kubelet), pod-bound ServiceAccount tokens from the
//! TokenRequest API, and a sidecar stand-in that is a real gRPC client of the
//! controller's snapshot stream.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use chaperone_wire::v1::{
    Ack, ApprovalStatus, ControllerMessage, SidecarMessage, SnapshotUpdate, controller_message,
    sidecar_message, snapshot_service_client::SnapshotServiceClient,
};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::ControlPlane;

/// The audience the controller accepts sidecar tokens for.
pub const SIDECAR_AUDIENCE: &str = "chaperone";

/// The repository's generated CRDs (`crds/`).
pub fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

/// Applies `crds/` to `cp` (server-side) and waits until every CRD is Established.
pub fn install_crds(cp: &ControlPlane) -> Result<()> {
    let crds = crds_dir();
    let crds = crds.to_str().context("crds path is not UTF-8")?;
    for args in [
        &["apply", "--server-side", "-f", crds][..],
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds,
        ],
    ] {
        let out = cp.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Creates ServiceAccount `name` in `ns`; one that already exists is fine.
pub async fn ensure_service_account(client: &Client, ns: &str, name: &str) -> Result<()> {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates pod `name` running as `service_account`, annotated for injection.
pub async fn create_agent_pod(
    client: &Client,
    ns: &str,
    service_account: &str,
    name: &str,
) -> Result<Pod> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "annotations": { "chaperone.dev/inject": "true" } },
        "spec": {
            "serviceAccountName": service_account,
            "containers": [{ "name": "agent", "image": "agent:latest" }]
        }
    }))?;
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?)
}

/// Creates pod `name` running as `service_account`, annotated for a tool-mode
/// sidecar in front of an MCP server on port 8080 with audience `orders` (what
/// the webhook requires of such pods).
pub async fn create_tool_pod(
    client: &Client,
    ns: &str,
    service_account: &str,
    name: &str,
) -> Result<Pod> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "annotations": {
                "chaperone.dev/inject": "tool",
                "chaperone.dev/inbound-port": "8080",
                "chaperone.dev/audience": "orders",
            }
        },
        "spec": {
            "serviceAccountName": service_account,
            "containers": [{ "name": "mcp", "image": "orders-mcp:latest" }]
        }
    }))?;
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?)
}

/// A ServiceAccount, a tool-mode pod running as it ([`create_tool_pod`]), and
/// a token bound to that pod.
pub async fn tool_pod_token(
    client: &Client,
    ns: &str,
    service_account: &str,
    pod: &str,
    audience: &str,
) -> Result<String> {
    ensure_service_account(client, ns, service_account).await?;
    let pod = create_tool_pod(client, ns, service_account, pod).await?;
    bound_token(client, &pod, audience).await
}

/// A token of `pod`'s ServiceAccount bound to `pod` (name and uid) for
/// `audience`, valid for ten minutes: what a projected token volume holds.
pub async fn bound_token(client: &Client, pod: &Pod, audience: &str) -> Result<String> {
    let ns = pod.metadata.namespace.as_deref().context("pod namespace")?;
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .context("pod has no serviceAccountName")?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(600),
        },
        ..Default::default()
    };
    let response = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    Ok(response
        .status
        .context("token request has no status")?
        .token)
}

/// A ServiceAccount, a pod running as it, and a token bound to that pod.
pub async fn pod_token(
    client: &Client,
    ns: &str,
    service_account: &str,
    pod: &str,
    audience: &str,
) -> Result<String> {
    ensure_service_account(client, ns, service_account).await?;
    let pod = create_agent_pod(client, ns, service_account, pod).await?;
    bound_token(client, &pod, audience).await
}

/// The audit-key archive the controller in `controller_namespace` keeps of
/// the sidecars of pods in `namespace`, as one JWKS (what `chaperonectl
/// audit keys -n NAMESPACE` prints); an error if anything in it is unusable
/// or conflicting.
pub async fn archived_keys(
    client: &Client,
    controller_namespace: &str,
    namespace: &str,
) -> Result<serde_json::Value> {
    use chaperone_api::audit_keys::{COMPONENT_LABEL, NAMESPACE_LABEL, archive_jwks};
    let selector = format!(
        "{}={},{NAMESPACE_LABEL}={namespace}",
        COMPONENT_LABEL.0, COMPONENT_LABEL.1
    );
    let listed = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
        client.clone(),
        controller_namespace,
    )
    .list(&kube::api::ListParams::default().labels(&selector))
    .await?;
    let empty = std::collections::BTreeMap::new();
    let archived = archive_jwks(listed.items.iter().map(|cm| {
        (
            cm.metadata.name.as_deref().unwrap_or_default(),
            cm.data.as_ref().unwrap_or(&empty),
        )
    }));
    if !archived.problems.is_empty() {
        bail!("the audit-key archive: {}", archived.problems.join("; "));
    }
    Ok(archived.jwks)
}

/// Server-side applies `object` (a namespaced object of kind `K` with a
/// `metadata.name`) in `ns`, forcing conflicts: create or update in one call.
pub async fn apply<K>(client: &Client, ns: &str, object: serde_json::Value) -> Result<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = object["metadata"]["name"]
        .as_str()
        .context("the object has no metadata.name")?
        .to_owned();
    Ok(Api::<K>::namespaced(client.clone(), ns)
        .patch(
            &name,
            &PatchParams::apply("chaperone-testenv").force(),
            &Patch::Apply(&object),
        )
        .await?)
}

fn chaperone_object(kind: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": kind,
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// A client of the shared control plane's admin that acts as `user` in
/// `groups` (impersonation, as `kubectl --as`).
pub async fn client_as(user: &str, groups: &[&str]) -> Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(ControlPlane::shared().kubeconfig())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.auth_info.impersonate = Some(user.to_owned());
    if !groups.is_empty() {
        config.auth_info.impersonate_groups =
            Some(groups.iter().map(|g| (*g).to_owned()).collect());
    }
    Ok(Client::try_from(config)?)
}

/// An AgentIdentity named `name` with `spec`, for [`apply`].
pub fn agent_identity(name: &str, spec: serde_json::Value) -> serde_json::Value {
    chaperone_object("AgentIdentity", name, spec)
}

/// A ToolPolicy named `name` with `spec`, for [`apply`].
pub fn tool_policy(name: &str, spec: serde_json::Value) -> serde_json::Value {
    chaperone_object("ToolPolicy", name, spec)
}

/// A DelegationGrant named `name` with `spec`, for [`apply`].
pub fn delegation_grant(name: &str, spec: serde_json::Value) -> serde_json::Value {
    chaperone_object("DelegationGrant", name, spec)
}

/// The Events (events.k8s.io/v1) in `ns` with `reason`, as listed now.
pub async fn events_with_reason(
    client: &Client,
    ns: &str,
    reason: &str,
) -> Result<Vec<k8s_openapi::api::events::v1::Event>> {
    let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect())
}

/// The subject that assertions name AgentIdentity `qualified` (`ns/name`) by.
pub fn agent_subject(qualified: &str) -> String {
    format!("chaperone:agent:{qualified}")
}

/// Where the controller's snapshot server listens and the CA to trust for it
/// (the controller's `--ca-file`; its certificate must name `localhost`).
#[derive(Clone, Debug)]
pub struct SnapshotEndpoint {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// CA bundle, PEM.
    pub ca_pem: String,
}

impl SnapshotEndpoint {
    /// A new TLS connection to the server (each sidecar has its own).
    pub async fn channel(&self) -> Result<Channel, tonic::Status> {
        let unavailable = |e: tonic::transport::Error| tonic::Status::unavailable(e.to_string());
        // Dial 127.0.0.1 and verify the certificate's `localhost` name.
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))
            .map_err(unavailable)?
            .connect_timeout(Duration::from_secs(10))
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&self.ca_pem))
                    .domain_name("localhost"),
            )
            .map_err(unavailable)?
            .connect()
            .await
            .map_err(unavailable)
    }
}

/// A sidecar stand-in: a real gRPC client of the snapshot stream that sends
/// what the test tells it to.
pub struct SidecarStandIn {
    to_controller: mpsc::Sender<SidecarMessage>,
    from_controller: Streaming<ControllerMessage>,
    /// The bearer token of its stream (what key proofs are bound to).
    token: String,
}

/// A fresh Ed25519 key registered as a sidecar registers its own on the
/// stream authenticated by `token`: under the kid derived from it, with the
/// proof of possession bound to that token. Returns the kid and the message.
pub fn signing_key_for(token: &str) -> (String, chaperone_wire::v1::SigningKey) {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
    use base64::Engine as _;
    let pair = Ed25519KeyPair::generate().expect("an Ed25519 key");
    let public: [u8; 32] = pair.public_key().as_ref().try_into().expect("32 bytes");
    let kid = chaperone_audit::key_id(&public);
    let statement = chaperone_wire::key_registration::key_registration_statement(
        &kid,
        &chaperone_audit::sha256(token.as_bytes()),
    );
    let jwk = serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public),
    });
    let message = chaperone_wire::v1::SigningKey {
        kid: kid.clone(),
        jwk_json: jwk.to_string(),
        proof: pair.sign(&statement).as_ref().to_vec(),
    };
    (kid, message)
}

impl SidecarStandIn {
    /// Opens a stream on a new connection to `endpoint`, authenticated with
    /// `token`; the controller's refusal comes back as the `Status`.
    pub async fn connect(endpoint: &SnapshotEndpoint, token: &str) -> Result<Self, tonic::Status> {
        let channel = endpoint.channel().await?;
        let (tx, rx) = mpsc::channel(8);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("token is not valid metadata"))?;
        request.metadata_mut().insert("authorization", bearer);
        let response = SnapshotServiceClient::new(channel).watch(request).await?;
        Ok(Self {
            to_controller: tx,
            from_controller: response.into_inner(),
            token: token.to_owned(),
        })
    }

    /// The next snapshot update, skipping key-set updates; fails after `timeout`
    /// or when the stream ends.
    pub async fn next_snapshot(&mut self, timeout: Duration) -> Result<SnapshotUpdate> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.from_controller.message())
                .await
                .context("no snapshot in time")??
                .context("stream ended")?;
            if let Some(controller_message::Message::Snapshot(update)) = message.message {
                return Ok(update);
            }
        }
    }

    /// The JWKS of the first key set (or snapshot update) for which `accept`
    /// holds; fails after `timeout` or when the stream ends.
    pub async fn key_set_where(
        &mut self,
        timeout: Duration,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.from_controller.message())
                .await
                .context("no such key set in time")??
                .context("stream ended")?;
            let jwks_json = match message.message {
                Some(controller_message::Message::Keys(keys)) => keys.jwks_json,
                Some(controller_message::Message::Snapshot(update)) => update.jwks_json,
                Some(controller_message::Message::Approval(_)) | None => continue,
            };
            let jwks: serde_json::Value = serde_json::from_str(&jwks_json)?;
            if accept(&jwks) {
                return Ok(jwks);
            }
        }
    }

    /// The next approval status, skipping snapshots and key sets; fails
    /// after `timeout` or when the stream ends.
    pub async fn next_approval(&mut self, timeout: Duration) -> Result<ApprovalStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.from_controller.message())
                .await
                .context("no approval status in time")??
                .context("stream ended")?;
            if let Some(controller_message::Message::Approval(status)) = message.message {
                return Ok(status);
            }
        }
    }

    /// Registers a fresh signing key of this sidecar, as a sidecar does
    /// ([`signing_key_for`] its stream's token); returns its kid.
    pub async fn send_key(&self) -> Result<String> {
        let (kid, key) = signing_key_for(&self.token);
        self.send(sidecar_message::Message::SigningKey(key)).await?;
        Ok(kid)
    }

    /// Registers `key` as it is (a forged or replayed registration).
    pub async fn send_signing_key(&self, key: chaperone_wire::v1::SigningKey) -> Result<()> {
        self.send(sidecar_message::Message::SigningKey(key)).await
    }

    /// Acknowledges `update` (version and hash).
    pub async fn ack(&self, update: &SnapshotUpdate) -> Result<()> {
        self.send(sidecar_message::Message::Ack(Ack {
            version: update.version,
            hash: update.hash.clone(),
        }))
        .await
    }

    /// Sends any message to the controller.
    pub async fn send(&self, message: sidecar_message::Message) -> Result<()> {
        self.to_controller
            .send(SidecarMessage {
                message: Some(message),
            })
            .await
            .context("the stream to the controller is closed")
    }
}

/// A chaperone-controller running in this process (on its own thread and
/// runtime) against the control plane, on free loopback ports.
#[derive(Clone, Debug)]
pub struct InProcessController {
    /// The snapshot gRPC port.
    pub grpc_port: u16,
    /// The admin port (/metrics, /readyz, JWKS).
    pub admin_port: u16,
    /// The injection webhook's port (HTTPS, path `/inject`).
    pub webhook_port: u16,
    /// Where the controller wrote its CA (what sidecars trust).
    pub ca_file: PathBuf,
    /// Stops it ([`InProcessController::stop`]).
    stop: std::sync::Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
}

impl InProcessController {
    /// Starts an in-process sidecar of pod `pod` in controller mode, streaming
    /// from this controller with `token` (kept in a file next to the CA, as
    /// the kubelet mounts it), with the sidecar's defaults otherwise.
    pub async fn sidecar(
        &self,
        pod: &str,
        token: &str,
    ) -> Result<crate::sidecar_fixtures::TestSidecar> {
        static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self
            .ca_file
            .with_file_name(format!("token-{}-{pod}-{n}", self.grpc_port));
        std::fs::create_dir_all(&dir)?;
        let token_file = crate::sidecar_fixtures::write_token(&dir, token)?;
        crate::sidecar_fixtures::TestSidecar::start(chaperone_sidecar::Settings {
            pod_name: pod.to_owned(),
            controller: Some(crate::sidecar_fixtures::controller_settings(
                format!("127.0.0.1:{}", self.grpc_port),
                &token_file,
                self.ca_file.clone(),
            )),
            ..chaperone_sidecar::Settings::default()
        })
        .await
    }

    /// Stops the controller as a crash or a restart would (its runtime and
    /// every task on it are dropped, its listeners closed) and waits until its
    /// ports are closed. Its clones see it stopped too.
    pub fn stop(&self) -> Result<()> {
        let sender = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(sender) = sender {
            let _ = sender.send(());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while admin_ready(self.admin_port)
            || std::net::TcpStream::connect(("127.0.0.1", self.grpc_port)).is_ok()
        {
            if Instant::now() > deadline {
                bail!("the controller did not stop within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Its snapshot endpoint, trusting the CA it wrote.
    pub fn snapshot_endpoint(&self) -> Result<SnapshotEndpoint> {
        Ok(SnapshotEndpoint {
            port: self.grpc_port,
            ca_pem: std::fs::read_to_string(&self.ca_file)
                .with_context(|| format!("reading {}", self.ca_file.display()))?,
        })
    }
}

/// How [`start_controller_with`] runs the controller.
#[derive(Clone, Debug, Default)]
pub struct ControllerLaunch {
    /// Its flags (`--name=value`); the listen addresses and `--ca-file` are
    /// the launcher's (any given here are dropped).
    pub flags: Vec<String>,
    /// The kubeconfig its client uses; `None`: the control plane's admin.
    pub kubeconfig: Option<PathBuf>,
    /// A namespace to create first (with the admin's client), if any.
    pub create_namespace: Option<String>,
}

/// Installs the CRDs, starts the controller (`pod_name` is its leader-election
/// identity) and waits until it is ready. Panics with the reason on failure.
pub fn start_controller(cp: &ControlPlane, pod_name: &str) -> InProcessController {
    install_crds(cp).expect("installing the CRDs");
    start_controller_with(
        cp,
        ControllerLaunch {
            flags: vec![
                "--namespace=chaperone-system".into(),
                format!("--pod-name={pod_name}"),
                "--extra-san=localhost,127.0.0.1".into(),
                "--log-format=text".into(),
            ],
            kubeconfig: None,
            create_namespace: Some("chaperone-system".into()),
        },
    )
    .expect("starting the controller")
}

/// Starts the controller with `launch` on free loopback ports and waits until
/// it is ready (its CA written, `/readyz` answering 200). The CRDs must be
/// installed. Fails with the controller's error when it stops first. A port
/// taken between picking and binding it (by a test running alongside) is
/// picked again, twice at most.
pub fn start_controller_with(
    cp: &ControlPlane,
    launch: ControllerLaunch,
) -> Result<InProcessController> {
    let mut tries = 0;
    loop {
        tries += 1;
        match start_controller_once(cp, launch.clone()) {
            Err(error) if tries < 3 && format!("{error:#}").contains("Address already in use") => {
                eprintln!("{error:#}; trying other ports");
            }
            started => return started,
        }
    }
}

fn start_controller_once(
    cp: &ControlPlane,
    launch: ControllerLaunch,
) -> Result<InProcessController> {
    let grpc_port = crate::free_port()?;
    let admin_port = crate::free_port()?;
    let webhook_port = crate::free_port()?;
    let ca_file = cp
        .scratch_dir()
        .join(format!("controller-ca-{grpc_port}.pem"));
    // The launcher picks these; a caller's (e.g. the chart's) are replaced.
    let picked = [
        "--grpc-addr=",
        "--admin-addr=",
        "--webhook-addr=",
        "--ca-file=",
    ];
    let mut flags = vec!["chaperone-controller".to_owned()];
    flags.extend(
        launch
            .flags
            .into_iter()
            .filter(|f| !picked.iter().any(|p| f.starts_with(p))),
    );
    flags.extend([
        format!("--grpc-addr=127.0.0.1:{grpc_port}"),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        format!("--ca-file={}", ca_file.display()),
    ]);
    let args = <chaperone_controller::Args as clap::Parser>::try_parse_from(&flags)
        .with_context(|| format!("controller flags {flags:?}"))?;
    let admin_kubeconfig = cp.kubeconfig().to_path_buf();
    let kubeconfig = launch
        .kubeconfig
        .unwrap_or_else(|| admin_kubeconfig.clone());
    let create_namespace = launch.create_namespace;
    let (stopped_tx, stopped) = std::sync::mpsc::channel::<String>();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let result = rt.block_on(async move {
            if let Some(name) = create_namespace {
                let admin = crate::client_from_kubeconfig(&admin_kubeconfig).await?;
                let ns: k8s_openapi::api::core::v1::Namespace =
                    serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))?;
                let _ = kube::Api::all(admin)
                    .create(&PostParams::default(), &ns)
                    .await;
            }
            let client = crate::client_from_kubeconfig(&kubeconfig).await?;
            tokio::select! {
                result = chaperone_controller::run_until(args, client, std::future::pending()) => result,
                // Only an explicit stop: a dropped handle leaves it running.
                Ok(()) = stop_rx => Ok(()),
            }
        });
        // Shutting the runtime down ends every task the controller spawned.
        rt.shutdown_timeout(Duration::from_secs(5));
        let reason = match result {
            Ok(()) => "the controller stopped".to_owned(),
            Err(e) => format!("the controller stopped: {e:#}"),
        };
        eprintln!("{reason}");
        let _ = stopped_tx.send(reason);
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(ca_file.exists() && admin_ready(admin_port)) {
        if let Ok(reason) = stopped.try_recv() {
            bail!("{reason}");
        }
        if Instant::now() > deadline {
            bail!("the controller did not become ready within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(InProcessController {
        grpc_port,
        admin_port,
        webhook_port,
        ca_file,
        stop: std::sync::Arc::new(std::sync::Mutex::new(Some(stop))),
    })
}

fn admin_ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
}
