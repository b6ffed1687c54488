//! A minimal fake of chaperone-controller for the sidecar benchmark: the
//! server side of the snapshot stream (`chaperone.snapshot.v1.SnapshotService/Watch`,
//! gRPC over TLS), so that the sidecar under test runs in controller mode, as
//! in production.
//!
//! What it shares with the real controller: the snapshot is compiled from CR
//! YAML by the policy core (`chaperone_policy::compile`, then
//! `Snapshot::new` with the controller's version, as the controller's index
//! does) and sent as the controller sends it (`PublishedSnapshot::new` and
//! `snapshot_server::wire::snapshot_message` of `chaperone-controller`, with
//! the empty key set the controller sends an agent nobody may call); what the
//! sidecar sends is decoded by the controller's own `SidecarReport::try_from`.
//! The TLS server certificate is signed by a CA generated at start
//! (`chaperone_testenv::pki`, rcgen on aws-lc-rs), which the sidecar is told to
//! trust, and the stream is refused without the bearer token the sidecar
//! reads from its token file.
//!
//! What it leaves out: no Kubernetes (the token is compared, not reviewed;
//! the pod is whatever the caller says), one snapshot only (no edits, no key
//! set updates), no status, and audit records are counted, not turned into
//! Events. It runs on a runtime and thread of its own, so that reading the
//! sidecar's audit batches does not delay the load generator's event loop
//! (it still shares the machine's CPUs, as a controller on the same node
//! would).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chaperone_controller::auth::SidecarIdentity;
use chaperone_controller::index::PublishedSnapshot;
use chaperone_controller::snapshot_server::wire::{SidecarReport, snapshot_message};
use chaperone_policy::{
    AgentChoiceError, AgentKey, CompileError, CompileOptions, DocumentError, DocumentSet, Snapshot,
    compile,
};
use chaperone_wire::sidecar_env;
use chaperone_wire::v1::{
    ControllerMessage, SidecarMessage,
    snapshot_service_server::{SnapshotService, SnapshotServiceServer},
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// The TLS name of the fake's certificate, which the sidecar verifies
/// (`CHAPERONE_CONTROLLER_SERVER_NAME`): the controller Service's name.
pub const SERVER_NAME: &str = "chaperone-controller.chaperone-system.svc";

/// The name of the fake's runtime thread (so its CPU time can be told apart).
pub const THREAD_NAME: &str = "fake-controller";

/// The key set the controller sends an agent that no other agent may call
/// (`Sidecars::jwks_json_of` of no agents).
const NO_CALLER_KEYS: &str = r#"{"keys":[]}"#;

/// The bearer token the fake accepts (written to the sidecar's token file).
const TOKEN: &str = "chaperone-bench-token";

/// The CR documents could not be compiled into a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A document was refused by the policy core's loader.
    #[error("reading the policy documents: {0}")]
    Documents(#[from] DocumentError),
    /// No AgentIdentity, or several.
    #[error("choosing the AgentIdentity: {0}")]
    Agent(#[from] AgentChoiceError),
    /// Objects were left out of the snapshot (a benchmark of a partial
    /// policy would measure something else).
    #[error("the policy does not compile cleanly: {}", list(.0))]
    Compile(Vec<CompileError>),
}

fn list(errors: &[CompileError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The fake controller could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The CA or the serving certificate could not be generated.
    #[error("generating the fake controller's certificates: {0}")]
    Certificates(anyhow::Error),
    /// The token file could not be written.
    #[error("writing the token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The listener or the runtime could not be set up.
    #[error("setting up the fake controller's {what}: {source}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS configuration was refused.
    #[error("the fake controller's TLS configuration: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// The sidecar did not put the snapshot in force.
#[derive(Debug, Error)]
pub enum AckError {
    /// It answered with a NACK.
    #[error("the sidecar refused snapshot {version}: {error}")]
    Nacked {
        /// The snapshot's version.
        version: u64,
        /// The sidecar's reason.
        error: String,
    },
    /// No answer in time.
    #[error(
        "no ACK of snapshot {version} within {timeout:?} ({streams} streams opened, {refused} refused)"
    )]
    TimedOut {
        /// The snapshot's version.
        version: u64,
        /// How long it waited.
        timeout: Duration,
        /// Streams the sidecar opened.
        streams: u64,
        /// Streams refused (wrong token).
        refused: u64,
    },
}

/// Compiles CR documents (`(file name, YAML text)`) into the snapshot of
/// their only AgentIdentity at `version`, as the controller does; any object
/// left out is an error.
pub fn compile_snapshot(files: &[(&str, &str)], version: u64) -> Result<Snapshot, SnapshotError> {
    let mut documents = DocumentSet::new();
    for (file, text) in files {
        documents.add(file, text)?;
    }
    let identity = documents.agent(None)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    // The controller compiles at version 0 and stamps its own version on
    // the content (crates/controller/src/index).
    let compilation = compile(
        identity,
        &documents.inventory(),
        &CompileOptions { version: 0, now },
    );
    if !compilation.errors.is_empty() {
        return Err(SnapshotError::Compile(compilation.errors));
    }
    Ok(Snapshot::new(version, compilation.snapshot.content))
}

/// What the fake has received so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Streams opened with the right token.
    pub streams: u64,
    /// Streams refused (no or wrong token).
    pub refused: u64,
    /// `Hello` messages.
    pub hellos: u64,
    /// Signing key registrations.
    pub signing_keys: u64,
    /// Audit batches.
    pub audit_batches: u64,
    /// Audit records (lines) in those batches.
    pub audit_records: u64,
    /// Bytes of those records.
    pub audit_bytes: u64,
    /// Records the sidecar reported dropped (its shipping queue was full).
    pub audit_dropped: u64,
    /// Tool inventory reports.
    pub inventories: u64,
    /// Any other message (approval requests, releases, messages the
    /// controller's decoder refuses).
    pub other: u64,
}

#[derive(Debug, Default)]
struct Counters {
    streams: AtomicU64,
    refused: AtomicU64,
    hellos: AtomicU64,
    signing_keys: AtomicU64,
    audit_batches: AtomicU64,
    audit_records: AtomicU64,
    audit_bytes: AtomicU64,
    audit_dropped: AtomicU64,
    inventories: AtomicU64,
    other: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn read(&self) -> Received {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Received {
            streams: get(&self.streams),
            refused: get(&self.refused),
            hellos: get(&self.hellos),
            signing_keys: get(&self.signing_keys),
            audit_batches: get(&self.audit_batches),
            audit_records: get(&self.audit_records),
            audit_bytes: get(&self.audit_bytes),
            audit_dropped: get(&self.audit_dropped),
            inventories: get(&self.inventories),
            other: get(&self.other),
        }
    }
}

/// The sidecar's answer to the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    None,
    Acked,
    Nacked(String),
}

#[derive(Clone)]
struct Service {
    /// `Bearer <token>`.
    bearer: Arc<str>,
    /// The update every stream gets first.
    update: ControllerMessage,
    version: u64,
    hash: Arc<str>,
    counters: Arc<Counters>,
    answer: Arc<watch::Sender<Answer>>,
}

#[tonic::async_trait]
impl SnapshotService for Service {
    type WatchStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if authorization != Some(&*self.bearer) {
            Counters::add(&self.counters.refused, 1);
            return Err(Status::unauthenticated("not the benchmark's token"));
        }
        Counters::add(&self.counters.streams, 1);
        let (tx, rx) = mpsc::channel(4);
        // The stream is new and its queue empty: this cannot fail.
        let _ = tx.try_send(Ok(self.update.clone()));
        let service = self.clone();
        let inbound = request.into_inner();
        // The reader holds `tx`: the stream stays open until the sidecar
        // goes away.
        tokio::spawn(async move { service.read(inbound, tx).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Service {
    /// Reads one stream's messages until it ends, decoding each as the
    /// controller does.
    async fn read(
        self,
        mut inbound: Streaming<SidecarMessage>,
        _open: mpsc::Sender<Result<ControllerMessage, Status>>,
    ) {
        let c = &self.counters;
        while let Ok(Some(message)) = inbound.message().await {
            match SidecarReport::try_from(message) {
                Ok(SidecarReport::Audit(batch)) => {
                    let bytes: usize = batch.records.iter().map(String::len).sum();
                    Counters::add(&c.audit_batches, 1);
                    Counters::add(&c.audit_records, batch.records.len() as u64);
                    Counters::add(&c.audit_bytes, bytes as u64);
                    Counters::add(&c.audit_dropped, batch.dropped);
                }
                Ok(SidecarReport::Ack(snapshot)) => {
                    if snapshot.version == self.version && *snapshot.hash == *self.hash {
                        self.answer.send_replace(Answer::Acked);
                    }
                }
                Ok(SidecarReport::Nack { snapshot, error }) => {
                    if snapshot.version == self.version {
                        self.answer.send_replace(Answer::Nacked(error));
                    }
                }
                Ok(SidecarReport::Hello(_)) => Counters::add(&c.hellos, 1),
                Ok(SidecarReport::SigningKey(_)) => Counters::add(&c.signing_keys, 1),
                Ok(SidecarReport::Inventory(_)) => Counters::add(&c.inventories, 1),
                Ok(_) | Err(_) => Counters::add(&c.other, 1),
            }
        }
    }
}

/// A running fake controller: serves one snapshot to the sidecars that
/// present its token, and counts what they send. Stops when dropped.
pub struct FakeController {
    address: SocketAddr,
    ca_pem: String,
    token_file: PathBuf,
    pod: String,
    namespace: String,
    version: u64,
    counters: Arc<Counters>,
    answer: watch::Receiver<Answer>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for FakeController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeController")
            .field("address", &self.address)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl FakeController {
    /// Starts serving `snapshot` on a loopback port, on a runtime of its own,
    /// to the sidecar of pod `pod` (in the snapshot's agent's namespace); the
    /// token it accepts is written to `token_file`.
    pub fn start(snapshot: &Snapshot, pod: &str, token_file: &Path) -> Result<Self, StartError> {
        let ca = chaperone_testenv::pki::TestCa::generate("chaperone-bench-ca")
            .map_err(StartError::Certificates)?;
        let serving = ca
            .serving_cert(&[SERVER_NAME])
            .map_err(StartError::Certificates)?;
        std::fs::write(token_file, format!("{TOKEN}\n")).map_err(|source| StartError::Token {
            path: token_file.to_owned(),
            source,
        })?;
        let io = |what| move |source| StartError::Io { what, source };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("listener"))?;
        listener.set_nonblocking(true).map_err(io("listener"))?;
        let address = listener.local_addr().map_err(io("listener"))?;

        let agent: &AgentKey = &snapshot.content.agent;
        let identity = SidecarIdentity {
            agent: agent.clone(),
            pod: pod.to_owned(),
            pod_uid: format!("uid-{pod}"),
            service_account: agent.name.clone(),
        };
        let published = PublishedSnapshot::new(snapshot);
        let counters = Arc::new(Counters::default());
        let (answer_tx, answer) = watch::channel(Answer::None);
        let service = Service {
            bearer: Arc::from(format!("Bearer {TOKEN}")),
            update: snapshot_message(&identity, &published, NO_CALLER_KEYS),
            version: published.version,
            hash: Arc::from(published.hash.as_str()),
            counters: Arc::clone(&counters),
            answer: Arc::new(answer_tx),
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&serving.cert_pem, &serving.key_pem));
        let router = Server::builder()
            .tls_config(tls)?
            .add_service(SnapshotServiceServer::new(service));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(THREAD_NAME)
            .enable_all()
            .build()
            .map_err(io("runtime"))?;
        runtime.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(error) => {
                    eprintln!("fake controller: listener: {error}");
                    return;
                }
            };
            if let Err(error) = router
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
            {
                eprintln!("fake controller: {error}");
            }
        });
        Ok(Self {
            address,
            ca_pem: ca.cert_pem(),
            token_file: token_file.to_owned(),
            pod: pod.to_owned(),
            namespace: agent.namespace.clone(),
            version: snapshot.version,
            counters,
            answer,
            runtime: Some(runtime),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The environment that puts a sidecar in controller mode against this
    /// fake, as the injection webhook sets it (plus the TLS server name, since
    /// the sidecar dials an IP address here, not the controller's Service).
    pub fn sidecar_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                sidecar_env::ENV_CONTROLLER_ADDRESS,
                self.address.to_string(),
            ),
            (
                sidecar_env::ENV_CONTROLLER_SERVER_NAME,
                SERVER_NAME.to_owned(),
            ),
            (sidecar_env::ENV_CA_PEM, self.ca_pem.clone()),
            (
                sidecar_env::ENV_TOKEN_FILE,
                self.token_file.display().to_string(),
            ),
            (sidecar_env::ENV_POD_NAME, self.pod.clone()),
            (sidecar_env::ENV_POD_NAMESPACE, self.namespace.clone()),
        ]
    }

    /// Waits until the sidecar ACKs the snapshot (it is in force), at most
    /// `timeout`.
    pub async fn wait_for_ack(&self, timeout: Duration) -> Result<(), AckError> {
        let mut answer = self.answer.clone();
        let answered = tokio::time::timeout(timeout, answer.wait_for(|a| *a != Answer::None)).await;
        match answered.ok().and_then(Result::ok).map(|a| a.clone()) {
            Some(Answer::Acked) => Ok(()),
            Some(Answer::Nacked(error)) => Err(AckError::Nacked {
                version: self.version,
                error,
            }),
            _ => {
                let received = self.received();
                Err(AckError::TimedOut {
                    version: self.version,
                    timeout,
                    streams: received.streams,
                    refused: received.refused,
                })
            }
        }
    }

    /// What it has received so far.
    pub fn received(&self) -> Received {
        self.counters.read()
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use chaperone_sidecar::Settings;
    use chaperone_testenv::sidecar_fixtures::{
        TestSidecar, eventually, http_request_async, json_post,
    };

    use super::*;

    const IDENTITY: &str = "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentity\nmetadata:\n  name: planner\n  namespace: shop\nspec:\n  selector:\n    serviceAccountName: planner\n  toolServers:\n    - name: echo\n      url: http://127.0.0.1:9/mcp\n";

    fn policy(action: &str) -> String {
        format!(
            "apiVersion: chaperone.dev/v1alpha1\nkind: ToolPolicy\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  targetRefs:\n    - name: planner\n  rules:\n    - name: echo\n      action: {action}\n      tools:\n        - name: echo\n      rateLimit:\n        calls: 10\n        periodSeconds: 60\n"
        )
    }

    #[test]
    fn compiles_the_only_agent_at_the_given_version() {
        let policy = policy("allow");
        let snapshot =
            compile_snapshot(&[("a.yaml", IDENTITY), ("p.yaml", policy.as_str())], 7).unwrap();
        assert_eq!(snapshot.version, 7);
        assert!(snapshot.hash_is_valid());
        assert_eq!(snapshot.content.agent, AgentKey::new("shop", "planner"));
        assert_eq!(snapshot.content.authority.rules.len(), 1);
    }

    #[test]
    fn refuses_a_policy_that_does_not_compile_cleanly() {
        // A rate limit on a deny rule is an error of the rule.
        let policy = policy("deny");
        let compiled = compile_snapshot(&[("a.yaml", IDENTITY), ("p.yaml", policy.as_str())], 1);
        assert!(
            matches!(compiled, Err(SnapshotError::Compile(ref e)) if !e.is_empty()),
            "{compiled:?}"
        );
    }

    #[tokio::test]
    async fn a_sidecar_set_up_by_its_environment_acks_and_ships_every_audit_line() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy("allow");
        let snapshot =
            compile_snapshot(&[("a.yaml", IDENTITY), ("p.yaml", policy.as_str())], 3).unwrap();
        let fake =
            FakeController::start(&snapshot, "planner-0", &dir.path().join("token")).unwrap();
        let env = fake.sidecar_env();
        let settings = Settings::from_lookup(|name| {
            env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        })
        .unwrap();
        assert!(settings.controller.is_some(), "controller mode");
        let sidecar = TestSidecar::start(settings).await.unwrap();
        fake.wait_for_ack(Duration::from_secs(10)).await.unwrap();
        assert_eq!(sidecar.sidecar.snapshots().current().unwrap().version(), 3);

        let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
        http_request_async(sidecar.proxy_port, json_post("/echo", &[], call)).await;
        let written = sidecar.audit.records().len() as u64;
        assert!(written > 0, "the call was audited");
        eventually(Duration::from_secs(5), async || {
            Ok((fake.received().audit_records >= written).then_some(()))
        })
        .await
        .unwrap();
        let received = fake.received();
        assert_eq!(received.audit_records, written);
        assert_eq!((received.streams, received.refused), (1, 0));
        assert_eq!((received.hellos, received.signing_keys), (1, 1));
    }
}
