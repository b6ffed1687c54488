//! A real, local Kubernetes control plane for Chaperone's tests and demo.
//!
//! [`ControlPlane::start`] runs etcd and kube-apiserver (built by `make tools`) on
//! free loopback ports, the way controller-runtime's envtest does: a generated CA
//! and serving certificate (IP SAN 127.0.0.1), an admin client certificate in
//! `system:masters`, a service-account signing key and issuer (so TokenRequest and
//! TokenReview work), RBAC authorisation, and the ServiceAccount admission plugin
//! off (no controller-manager creates default ServiceAccounts). There is no
//! kubelet: pods stay Pending.
//!
//! Each process runs under a small supervisor shell that holds a pipe from the test
//! process: when the test process ends in any way (normal exit, panic, Ctrl-C,
//! SIGKILL) the pipe closes and the supervisor stops the process and removes its
//! files (`CHAPERONE_KEEP_FILES=1` keeps them, logs included, for debugging).
//! [`ControlPlane::shared`] gives one control plane per test binary.

#![forbid(unsafe_code)]

pub mod chart;
pub mod kube_fixtures;
pub mod mcp_fixtures;
pub mod mcp_servers;
pub mod otlp_receiver;
pub mod pki;
pub mod sidecar_fixtures;
pub mod tools;

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client, api::PostParams};

pub use tools::Tool;

/// How long etcd and kube-apiserver may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// How many times [`ControlPlane::start`] tries when a port it chose was taken.
const START_ATTEMPTS: u32 = 3;

/// Stops its process when the pipe to it closes; see the module docs.
const SUPERVISOR: &str = r#"
own="$1"; log="$2"; shift 2
"$@" >"$log" 2>&1 </dev/null &
child=$!
echo "$child" >"$log.pid"
stop() {
  kill -TERM "$child" 2>/dev/null
  i=0
  while kill -0 "$child" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$child" 2>/dev/null
  wait "$child" 2>/dev/null
  [ -n "${CHAPERONE_KEEP_FILES:-}" ] || rm -rf "$own"
  exit 0
}
trap stop INT TERM HUP
while read -r _; do :; done
stop
"#;

/// A process started under the supervisor shell.
struct Supervised {
    name: &'static str,
    shell: Child,
    pipe: Option<ChildStdin>,
    log: PathBuf,
}

impl Supervised {
    /// Starts `program` with its log in `own`, a directory removed when it stops.
    fn spawn(name: &'static str, own: &Path, program: &Path, args: &[String]) -> Result<Self> {
        fs::create_dir_all(own)?;
        let log = own.join(format!("{name}.log"));
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("chaperone-supervisor")
            .arg(own)
            .arg(&log)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pipe = shell.stdin.take();
        Ok(Self {
            name,
            shell,
            pipe,
            log,
        })
    }

    /// The last lines of the process's log, for error messages.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Fails, with the end of its log, when the process (or its supervisor)
    /// has exited: a process that failed at once (a port taken between
    /// [`free_port`] and its bind) is seen at once, not at the timeout.
    fn ensure_running(&mut self) -> Result<()> {
        if self.shell.try_wait()?.is_some() || self.program_exited() {
            bail!(
                "{} exited; its log ends with:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Whether the supervised program has exited: its supervisor, blocked on
    /// the pipe, has not reaped it, so it is a zombie (`Z`) until then.
    fn program_exited(&self) -> bool {
        let pid_file = self.log.with_extension("log.pid");
        // Not written yet (or caught mid-write, empty): not known to have exited.
        let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        else {
            return false;
        };
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name, which ends with ')'.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.pipe.take();
        let _ = self.shell.wait();
    }
}

/// A running etcd + kube-apiserver pair.
pub struct ControlPlane {
    root: PathBuf,
    server: String,
    kubeconfig: PathBuf,
    ca_pem: String,
    // Field order is drop order: the API server stops before its store.
    apiserver: Supervised,
    etcd: Supervised,
}

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on
    /// first use. Panics with the reason when it cannot start (tools missing, a
    /// process failing).
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| match ControlPlane::start() {
            Ok(cp) => cp,
            Err(err) => panic!("could not start the test control plane: {err:#}"),
        })
    }

    /// Starts etcd and kube-apiserver and waits until the API server is ready and
    /// namespace `default` exists. A port taken by another process between
    /// [`free_port`] and the bind (an outgoing connection of a test running
    /// beside, say) starts both again on new ports, up to
    /// [`START_ATTEMPTS`] times.
    pub fn start() -> Result<ControlPlane> {
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Err(err)
                    if attempt < START_ATTEMPTS
                        && format!("{err:#}").contains("address already in use") =>
                {
                    eprintln!("test control plane: a port was taken, starting again: {err:#}");
                    attempt += 1;
                }
                started => return started,
            }
        }
    }

    fn start_once() -> Result<ControlPlane> {
        let etcd_bin = Tool::Etcd.path()?;
        let apiserver_bin = Tool::KubeApiserver.path()?;
        let root = std::env::temp_dir().join(format!(
            "chaperone-cp-{}-{}",
            std::process::id(),
            unique_suffix()
        ));
        fs::create_dir_all(&root)?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let etcd_dir = root.join("etcd");
        let mut etcd = Supervised::spawn(
            "etcd",
            &etcd_dir,
            &etcd_bin,
            &[
                format!("--data-dir={}", etcd_dir.join("data").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        )?;
        if let Err(err) = wait_until(&mut etcd, || etcd_healthy(etcd_port)) {
            drop(etcd);
            let _ = fs::remove_dir_all(&root);
            return Err(err);
        }

        let api_dir = root.join("apiserver");
        fs::create_dir_all(&api_dir)?;
        let ca = pki::TestCa::generate("chaperone-test-ca")?;
        let serving = ca.serving_cert(&["localhost"])?;
        let admin = ca.client_cert("chaperone-test-admin", &["system:masters"])?;
        let (sa_key, sa_pub) = pki::signing_key()?;
        let file = |name: &str, content: &str| -> Result<String> {
            let path = api_dir.join(name);
            fs::write(&path, content)?;
            Ok(path.display().to_string())
        };
        let ca_file = file("ca.pem", &ca.cert_pem())?;
        let tls_cert = file("serving.pem", &serving.cert_pem)?;
        let tls_key = file("serving-key.pem", &serving.key_pem)?;
        let admin_cert = file("admin.pem", &admin.cert_pem)?;
        let admin_key = file("admin-key.pem", &admin.key_pem)?;
        let sa_key_file = file("sa.key", &sa_key)?;
        let sa_pub_file = file("sa.pub", &sa_pub)?;

        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        // The API server's supervisor owns the whole directory: it removes it last.
        let apiserver = Supervised::spawn(
            "kube-apiserver",
            &root,
            &apiserver_bin,
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--secure-port={port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--tls-cert-file={tls_cert}"),
                format!("--tls-private-key-file={tls_key}"),
                format!("--client-ca-file={ca_file}"),
                format!("--cert-dir={}", api_dir.join("certs").display()),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--authorization-mode=RBAC".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                format!("--service-account-issuer={server}/"),
                format!("--service-account-key-file={sa_pub_file}"),
                format!("--service-account-signing-key-file={sa_key_file}"),
                "--v=1".into(),
            ],
        )?;

        let kubeconfig = root.join("kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: chaperone-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca_file}\nusers:\n- name: admin\n  user:\n    client-certificate: {admin_cert}\n    client-key: {admin_key}\ncontexts:\n- name: chaperone-test\n  context:\n    cluster: chaperone-test\n    user: admin\n    namespace: default\ncurrent-context: chaperone-test\n"
            ),
        )?;

        let mut cp = ControlPlane {
            root,
            server,
            kubeconfig,
            ca_pem: ca.cert_pem(),
            apiserver,
            etcd,
        };
        cp.wait_ready()?;
        Ok(cp)
    }

    /// Waits for `/readyz` and namespace `default`, on a thread with its own
    /// runtime so that this works from sync and async callers alike.
    fn wait_ready(&mut self) -> Result<()> {
        let kubeconfig = self.kubeconfig.clone();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.etcd.ensure_running()?;
            self.apiserver.ensure_running()?;
            let path = kubeconfig.clone();
            let ready = std::thread::spawn(move || -> Result<bool> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let client = client_from_kubeconfig(&path).await?;
                    let req = http_get("/readyz")?;
                    if client.request_text(req).await.is_err() {
                        return Ok(false);
                    }
                    Ok(Api::<Namespace>::all(client)
                        .get_opt("default")
                        .await
                        .ok()
                        .flatten()
                        .is_some())
                })
            })
            .join()
            .map_err(|_| anyhow!("readiness probe thread panicked"))??;
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {:?}; its log ends with:\n{}",
                    START_TIMEOUT,
                    self.apiserver.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The API server URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A kubeconfig file for the admin user.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for a client authenticating with the bearer
    /// `token` (a ServiceAccount's, say) to the scratch directory as `name`;
    /// returns its path.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let ca_file = self.root.join("apiserver").join("ca.pem");
        let path = self.root.join(name);
        fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: chaperone-test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: chaperone-test\n    user: {name}\n    namespace: default\ncurrent-context: {name}\n",
                self.server,
                ca_file.display()
            ),
        )?;
        Ok(path)
    }

    /// The CA that signed the API server's serving certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A scratch directory that lives as long as the control plane.
    pub fn scratch_dir(&self) -> &Path {
        &self.root
    }

    /// A new admin client, bound to the caller's tokio runtime.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Runs kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_with_stdin(args, None)
    }

    /// Runs kubectl against this control plane, feeding `stdin` to it.
    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut child = Command::new(Tool::Kubectl.path()?)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }
}

/// A kube client for a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Creates a namespace with a fresh random name starting with `prefix` and
/// returns its name. Tests never delete namespaces: without a
/// controller-manager they would stay Terminating.
pub async fn create_namespace(client: &Client, prefix: &str) -> Result<String> {
    let name = format!("{prefix}-{}", unique_suffix());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name }
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(name)
}

/// A short random-enough lowercase suffix for names (time, pid, counter).
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mixed = (nanos as u64)
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:08x}", (mixed ^ (mixed >> 29)) as u32)
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get(path: &str) -> Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}

fn etcd_healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

fn wait_until(process: &mut Supervised, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready() {
        process.ensure_running()?;
        if Instant::now() > deadline {
            bail!(
                "{} not ready after {:?}; its log ends with:\n{}",
                process.name,
                START_TIMEOUT,
                process.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supervised(args: &[&str]) -> Result<Supervised> {
        let own = std::env::temp_dir().join(format!("chaperone-supervised-{}", unique_suffix()));
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Supervised::spawn("probe", &own, Path::new("/bin/sh"), &args)
    }

    #[test]
    fn a_program_that_exits_is_seen_while_its_supervisor_waits() -> Result<()> {
        let mut failed = supervised(&["-c", "echo bind: address already in use; exit 1"])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            if let Err(err) = failed.ensure_running() {
                break err;
            }
            assert!(Instant::now() < deadline, "the exit was not seen");
            std::thread::sleep(Duration::from_millis(20));
        };
        let message = format!("{err:#}");
        assert!(message.contains("probe exited"), "{message}");
        assert!(message.contains("address already in use"), "{message}");

        let mut running = supervised(&["-c", "sleep 30"])?;
        std::thread::sleep(Duration::from_millis(300));
        running.ensure_running()?;
        Ok(())
    }
}
