//! Real, third-party MCP tool servers (and JSON readers) for the adversarial
//! tests: what a tool server behind the sidecar actually EXECUTED, as its own
//! SDK understood the message.
//!
//! The programs live in `tests/servers/` (see its README) and `make tools`
//! installs them once into `<tools dir>/mcp-servers/<key>/`, `<key>` a hash of
//! their sources and pinned versions (`scripts/tools.sh mcp-servers-key`).
//! [`spawn`] starts one on a free loopback port with a fresh exec log and
//! waits until it is ready; [`RunningServer::executed`] reads what it ran.
//! [`read_with_go`] and [`read_with_js`] show how Go's `encoding/json` and
//! Node's `JSON.parse` read raw bodies.
//!
//! Every server serves `echo {text}`, `delete_user {id}`, `transfer {to,
//! amount}` and `get_order {id}`; each executed call is one exec-log line:
//! `{"tool", "arguments" (as the SDK bound them), "arguments_text" (each bound
//! value as the language holds it), "raw_arguments" (before binding), "sdk"
//! ("typescript@1.17.5", "mcp-go@v1.6.0", "python@2.3.0"), "transport"}`.
//!
//! For MCP 2026-07-28, [`spawn_python_stateless`] runs the Python SDK's server
//! in its stateless mode (JSON or SSE answers) and [`PythonClient`] drives the
//! SDK's own client through a script of steps.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Once, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{
    free_port,
    tools::{pinned, tools_dir},
    unique_suffix,
};

/// How long a server may take to print its readiness line (Python's SDK
/// alone imports in about a second; a busy test machine is slower).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A third-party MCP server `make tools` installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServerKind {
    /// `@modelcontextprotocol/sdk` 1.17.x, Streamable HTTP (`/mcp`); its
    /// transport decodes the body with the request's charset.
    TsStreamable117,
    /// The newest 1.x `@modelcontextprotocol/sdk`, Streamable HTTP (`/mcp`).
    TsStreamableLatest,
    /// The newest 1.x `@modelcontextprotocol/sdk`, legacy HTTP+SSE:
    /// `GET /sse` opens the stream, whose `endpoint` event names
    /// `/messages?sessionId=…` for the POSTs.
    TsSse,
    /// `github.com/mark3labs/mcp-go`, Streamable HTTP (`/mcp`), typed
    /// argument binding (`BindArguments` into Go structs).
    McpGo,
    /// The official Python SDK (`mcp` on PyPI, `MCPServer`), Streamable HTTP (`/mcp`).
    Python,
}

/// How a server carries MCP over HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Streamable HTTP: POST (and GET/DELETE) on one endpoint, `Mcp-Session-Id`.
    StreamableHttp,
    /// The legacy HTTP+SSE transport.
    Sse,
}

impl ServerKind {
    /// Every kind, for tests that run the same attack against each.
    pub const ALL: [ServerKind; 5] = [
        ServerKind::TsStreamable117,
        ServerKind::TsStreamableLatest,
        ServerKind::TsSse,
        ServerKind::McpGo,
        ServerKind::Python,
    ];

    /// The SDK: `"typescript"`, `"mcp-go"` or `"python"`.
    pub fn sdk(self) -> &'static str {
        match self {
            ServerKind::TsStreamable117 | ServerKind::TsStreamableLatest | ServerKind::TsSse => {
                "typescript"
            }
            ServerKind::McpGo => "mcp-go",
            ServerKind::Python => "python",
        }
    }

    /// The SDK version `scripts/tool-versions.env` pins (and the exec log's
    /// `sdk` field carries after the `@`).
    pub fn version(self) -> &'static str {
        let key = match self {
            ServerKind::TsStreamable117 => "MCP_TS_SDK_117_VERSION",
            ServerKind::TsStreamableLatest | ServerKind::TsSse => "MCP_TS_SDK_LATEST_VERSION",
            ServerKind::McpGo => "MCP_GO_VERSION",
            ServerKind::Python => "MCP_PY_VERSION",
        };
        pinned(key).unwrap_or("unknown")
    }

    /// `"<sdk>@<version>"`, as in the exec log's `sdk` field.
    pub fn sdk_version(self) -> String {
        format!("{}@{}", self.sdk(), self.version())
    }

    /// The transport this kind is spoken to with.
    pub fn transport(self) -> Transport {
        match self {
            ServerKind::TsSse => Transport::Sse,
            _ => Transport::StreamableHttp,
        }
    }

    /// A short name for file names and messages.
    pub fn slug(self) -> &'static str {
        match self {
            ServerKind::TsStreamable117 => "ts-1.17",
            ServerKind::TsStreamableLatest => "ts-latest",
            ServerKind::TsSse => "ts-latest-sse",
            ServerKind::McpGo => "mcp-go",
            ServerKind::Python => "python",
        }
    }

    /// The program and its arguments, from the install directory.
    fn command(self, dir: &Path) -> (PathBuf, Vec<PathBuf>) {
        match self {
            ServerKind::TsStreamable117 => ("node".into(), vec![dir.join("ts-1.17/server.mjs")]),
            ServerKind::TsStreamableLatest | ServerKind::TsSse => {
                ("node".into(), vec![dir.join("ts-latest/server.mjs")])
            }
            ServerKind::McpGo => (dir.join("go/mcp-server"), vec![]),
            ServerKind::Python => (
                dir.join("python/venv/bin/python"),
                vec![dir.join("python/server.py")],
            ),
        }
    }
}

impl std::fmt::Display for ServerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.sdk_version(), self.transport())
    }
}

/// The install directory of the current `tests/servers/` sources:
/// `$CHAPERONE_MCP_SERVERS` if set, else `<tools dir>/mcp-servers/<key>`
/// with `<key>` from `scripts/tools.sh mcp-servers-key`. Fails with a
/// message that says to run `make tools` when it is not (completely) there.
pub fn install_dir() -> Result<PathBuf> {
    static KEY: OnceLock<Result<String, String>> = OnceLock::new();
    let dir = match std::env::var_os("CHAPERONE_MCP_SERVERS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let key = KEY
                .get_or_init(|| install_key().map_err(|e| format!("{e:#}")))
                .as_ref()
                .map_err(|e| anyhow!("{e}"))?;
            tools_dir()?.join("mcp-servers").join(key)
        }
    };
    if !dir.join(".complete").is_file() {
        bail!(
            "the MCP test servers for the current tests/servers/ are not installed at {}: run `make tools` first (it installs them into the tools cache)",
            dir.display()
        );
    }
    Ok(dir)
}

fn install_key() -> Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("mcp-servers-key")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} mcp-servers-key", script.display()))?;
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || key.is_empty() {
        bail!(
            "{} mcp-servers-key failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(key)
}

/// A server started by [`spawn`]; killed (and its files removed, unless
/// `CHAPERONE_KEEP_FILES` is set) on drop.
pub struct RunningServer {
    kind: ServerKind,
    process: ListeningProcess,
    dir: PathBuf,
    exec_log: PathBuf,
    output: PathBuf,
}

/// Starts `kind` on a free loopback port with a fresh, empty exec log in its
/// own temporary directory and waits (blocking, typically 0.1–2 s) until it
/// accepts connections. The server also exits by itself when the test
/// process ends (it watches its stdin).
pub fn spawn(kind: ServerKind) -> Result<RunningServer> {
    spawn_with_env(kind, &[])
}

/// [`spawn`] with extra environment variables for the server.
fn spawn_with_env(kind: ServerKind, env: &[(&str, &str)]) -> Result<RunningServer> {
    let install = install_dir()?;
    remove_leftover_dirs();
    let dir = std::env::temp_dir().join(format!(
        "{SERVER_DIR_PREFIX}{}-{}-{}",
        std::process::id(),
        kind.slug(),
        unique_suffix()
    ));
    fs::create_dir_all(&dir)?;
    let exec_log = dir.join("exec.jsonl");
    let output = dir.join("server.log");
    let (program, args) = kind.command(&install);
    let started = fs::write(&exec_log, "")
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            start_on_free_port(&kind.to_string(), &output, || {
                let mut command = Command::new(&program);
                command
                    .args(&args)
                    .env("MCP_EXEC_LOG", &exec_log)
                    .envs(env.iter().copied());
                command
            })
        });
    match started {
        Ok(process) => Ok(RunningServer {
            kind,
            process,
            dir,
            exec_log,
            output,
        }),
        Err(err) => {
            let _ = fs::remove_dir_all(&dir);
            Err(err)
        }
    }
}

/// Starts `kinds` side by side (a test that needs several servers waits
/// for the slowest, not the sum); in the order given.
pub fn spawn_all(kinds: &[ServerKind]) -> Result<Vec<RunningServer>> {
    std::thread::scope(|scope| {
        let starts: Vec<_> = kinds
            .iter()
            .map(|&kind| scope.spawn(move || spawn(kind)))
            .collect();
        starts
            .into_iter()
            .map(|start| {
                start
                    .join()
                    .map_err(|_| anyhow!("starting a server panicked"))?
            })
            .collect()
    })
}

/// A test server process that listens on a loopback port: started by
/// [`start_on_free_port`], killed on drop.
pub struct ListeningProcess {
    port: u16,
    child: Child,
    stdin: Option<ChildStdin>,
    startup: Duration,
}

impl ListeningProcess {
    /// Its loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long it took from spawn to its readiness line.
    pub fn startup(&self) -> Duration {
        self.startup
    }

    /// Closes its stdin, kills it and waits for it (again: nothing).
    pub fn stop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ListeningProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How many ports [`start_on_free_port`] tries.
const PORT_ATTEMPTS: usize = 3;

/// Starts the command `command` builds with a free loopback port as its last
/// argument (and in `PORT`), `MCP_EXIT_ON_STDIN_EOF=1`, a piped stdin and
/// its output in `output`, and waits (blocking, up to 30 s) until it prints
/// a line starting with `ready `. A process that exits saying its port was
/// taken (`cannot listen`, `address already in use`: another process bound
/// it after [`free_port`] let it go) is started again on another port, up to
/// three times; any other exit fails at once with its output. `label` names
/// it in errors.
pub fn start_on_free_port(
    label: &str,
    output: &Path,
    command: impl Fn() -> Command,
) -> Result<ListeningProcess> {
    let mut port_taken = None;
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port()?;
        let log = fs::File::create(output)?;
        let started = Instant::now();
        let mut child = command()
            .arg(port.to_string())
            .env("PORT", port.to_string())
            .env("MCP_EXIT_ON_STDIN_EOF", "1")
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {label}"))?;
        let stdin = child.stdin.take();
        let mut process = ListeningProcess {
            port,
            child,
            stdin,
            startup: Duration::ZERO,
        };
        let deadline = started + START_TIMEOUT;
        loop {
            let printed = fs::read_to_string(output).unwrap_or_default();
            if printed.lines().any(|l| l.starts_with("ready ")) {
                process.startup = started.elapsed();
                return Ok(process);
            }
            if let Some(status) = process.child.try_wait()? {
                let exited = anyhow!(
                    "{label} exited ({status}) before it was ready; its output:\n{printed}"
                );
                if !(printed.contains("cannot listen")
                    || printed
                        .to_ascii_lowercase()
                        .contains("address already in use"))
                {
                    return Err(exited);
                }
                port_taken = Some(exited);
                break;
            }
            if Instant::now() > deadline {
                bail!("{label} not ready after {START_TIMEOUT:?}; its output:\n{printed}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Err(port_taken.unwrap_or_else(|| anyhow!("{label} did not start")))
}

/// How the folders of started servers (exec log, output) are named in the
/// temp folder: then the test process's pid, the kind and a suffix.
const SERVER_DIR_PREFIX: &str = "chaperone-mcp-";

/// Removes, once per process, the server folders of test processes that have
/// ended: a server kept for a whole test binary (in a static) is never
/// dropped, so its folder outlives the process. Kept, like the folders
/// themselves, when `CHAPERONE_KEEP_FILES` is set.
fn remove_leftover_dirs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CHAPERONE_KEEP_FILES").is_some() {
            return;
        }
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix(SERVER_DIR_PREFIX))
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            if let Some(pid) = pid
                && !Path::new("/proc").join(pid.to_string()).exists()
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
}

impl RunningServer {
    /// Which server this is.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// Its loopback port.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// The MCP endpoint: `…/mcp` (Streamable HTTP), or `…/sse` (the SSE
    /// stream, for [`Transport::Sse`]; POST to [`Self::message_path`]).
    pub fn url(&self) -> String {
        match self.kind.transport() {
            Transport::StreamableHttp => format!("{}/mcp", self.base_url()),
            Transport::Sse => format!("{}/sse", self.base_url()),
        }
    }

    /// For SSE, the path the stream's `endpoint` event will name (with
    /// `?sessionId=…` appended by the server); `None` for Streamable HTTP.
    pub fn message_path(&self) -> Option<&'static str> {
        (self.kind.transport() == Transport::Sse).then_some("/messages")
    }

    /// How long the server took from spawn to its readiness line.
    pub fn startup(&self) -> Duration {
        self.process.startup
    }

    /// The exec log: one JSON value per executed tool call, in order. A
    /// line that is not JSON (never expected) comes back as a JSON string.
    pub fn executed(&self) -> Vec<Value> {
        fs::read_to_string(&self.exec_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.to_owned())))
            .collect()
    }

    /// The exec log's path.
    pub fn exec_log_path(&self) -> &Path {
        &self.exec_log
    }

    /// What the server printed so far (stdout and stderr), for messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.process.stop();
        if std::env::var_os("CHAPERONE_KEEP_FILES").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// How Go's `encoding/json` reads each body: one JSON value per body,
/// `{"map": R, "struct": R}` where `map` is a decode into `map[string]any`
/// with `UseNumber` (`{"ok":true,"value":V,"numbers":{POINTER:TEXT}}`) and
/// `struct` a decode into `struct{Method string; Params struct{Name string;
/// Arguments map[string]any}}` (`{"ok":true,"method","name","arguments",
/// "numbers"}`: case-insensitive field names, the last matching key wins);
/// a failed reading is `{"ok":false,"error":E}`. `numbers` maps the JSON
/// pointer of every number (from the document, or from `arguments`) to its
/// text as Go holds it (the `json.Number` text; float64 by `strconv` 'g' -1).
pub fn read_with_go<B: AsRef<[u8]>>(bodies: &[B]) -> Result<Vec<Value>> {
    let program = install_dir()?.join("readers/go-reader");
    run_reader(Command::new(program), bodies)
}

/// How Node reads each body (`TextDecoder` UTF-8, as the TypeScript SDK
/// does, then `JSON.parse`): one JSON value per body,
/// `{"ok":true,"value":V,"method":M,"name":N,"arguments":A,"numbers":{POINTER:TEXT}}`
/// (`M` = `V.method`, `N` = `V.params.name`, `A` = `V.params.arguments`, null
/// when absent; numbers by `String(n)`) or `{"ok":false,"error":E}`.
pub fn read_with_js<B: AsRef<[u8]>>(bodies: &[B]) -> Result<Vec<Value>> {
    let mut command = Command::new("node");
    command.arg(install_dir()?.join("readers/reader.mjs"));
    run_reader(command, bodies)
}

fn run_reader<B: AsRef<[u8]>>(mut command: Command, bodies: &[B]) -> Result<Vec<Value>> {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    let mut input = String::new();
    for body in bodies {
        input.push_str(&STANDARD.encode(body.as_ref()));
        input.push('\n');
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the JSON reader {:?}", command.get_program()))?;
    let mut stdin = child.stdin.take().context("reader stdin")?;
    // Write from a thread: the reader answers while it reads.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .context("reader stdout")?
        .read_to_string(&mut stdout)?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child.wait()?;
    writer
        .join()
        .map_err(|_| anyhow!("reader input thread panicked"))?
        .context("writing to the JSON reader")?;
    if !status.success() {
        bail!(
            "the JSON reader {:?} failed ({status}): {stderr}",
            command.get_program()
        );
    }
    let readings = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Value>, _>>()
        .context("the JSON reader printed a line that is not JSON")?;
    if readings.len() != bodies.len() {
        bail!(
            "the JSON reader gave {} readings for {} bodies",
            readings.len(),
            bodies.len()
        );
    }
    Ok(readings)
}

// Raw HTTP/1.0 and SSE, by hand: what the adversarial tests send is exactly
// the bytes written here.

/// An HTTP answer: status, headers (lowercase names), body.
pub type Answer = (u16, Vec<(String, String)>, String);

/// One HTTP/1.0 request (no chunking; the answer ends at its
/// Content-Length, else when the server closes): (status, headers with
/// lowercase names, body).
pub fn http(port: u16, request_head: &str, body: &[u8]) -> Result<Answer> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(
        format!(
            "{request_head}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )?;
    stream.write_all(body)?;
    let mut answer = BufReader::new(stream);
    let mut line = String::new();
    answer.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line: {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        answer.read_line(&mut line)?;
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            answer.read_exact(&mut body)?;
        }
        None => {
            answer.read_to_end(&mut body)?;
        }
    }
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// The JSON-RPC message in a Streamable HTTP answer (JSON or an SSE stream).
pub fn jsonrpc_answer(body: &str) -> Result<Value> {
    if let Ok(message) = serde_json::from_str(body) {
        return Ok(message);
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|m| m.get("result").is_some() || m.get("error").is_some())
        .with_context(|| format!("no JSON-RPC answer in {body:?}"))
}

/// The next server-sent event: (event name, data).
pub fn next_event(events: &mut impl BufRead) -> Result<(String, String)> {
    let (mut kind, mut data) = (String::from("message"), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        if events
            .read_line(&mut line)
            .context("reading the SSE stream")?
            == 0
        {
            bail!("the SSE stream ended");
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if !data.is_empty() {
                return Ok((kind, data));
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("event:") {
            kind = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
}

// ---------------------------------------------------------------------------
// MCP 2026-07-28 on the official Python SDK: its stateless server and its
// client (`tests/servers/python/client.py`), for the end-to-end tests of the
// stateless revision.

/// How long one run of the Python client may take (it starts in about a
/// second; each step is a round trip or a few).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How the Python SDK server answers POSTs in stateless mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PythonResponses {
    /// `application/json` bodies (`MCP_JSON_RESPONSE=1`).
    Json,
    /// `text/event-stream` bodies.
    Sse,
}

/// Starts the Python SDK server in its stateless Streamable HTTP mode
/// (`MCP_STATELESS=1`: no `Mcp-Session-Id`; both protocol eras served per
/// request) with `responses`; see [`spawn`].
pub fn spawn_python_stateless(responses: PythonResponses) -> Result<RunningServer> {
    let json = match responses {
        PythonResponses::Json => "1",
        PythonResponses::Sse => "0",
    };
    spawn_with_env(
        ServerKind::Python,
        &[("MCP_STATELESS", "1"), ("MCP_JSON_RESPONSE", json)],
    )
}

/// The Python SDK client's `mode`: how it picks the protocol revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientMode {
    /// `server/discover`, falling back to the `initialize` handshake.
    Auto,
    /// Revision 2026-07-28 without a probe.
    Stateless,
    /// The `initialize` handshake (revisions up to 2025-11-25).
    Legacy,
}

impl ClientMode {
    /// Every mode.
    pub const ALL: [ClientMode; 3] = [ClientMode::Auto, ClientMode::Stateless, ClientMode::Legacy];

    /// The SDK's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientMode::Auto => "auto",
            ClientMode::Stateless => "2026-07-28",
            ClientMode::Legacy => "legacy",
        }
    }

    /// Whether the client speaks revision 2026-07-28 in this mode (to a
    /// server that does).
    pub fn is_stateless(self) -> bool {
        self != ClientMode::Legacy
    }
}

/// One run of the Python SDK client against a Streamable HTTP endpoint: a
/// script of steps (see `tests/servers/python/client.py` for the step and
/// outcome shapes).
#[derive(Clone, Debug)]
pub struct PythonClient {
    mode: ClientMode,
    url: String,
    headers: Vec<(String, String)>,
    tasks: bool,
}

/// What a [`PythonClient`] run printed: the connection line and one outcome
/// per step, in order.
#[derive(Clone, Debug)]
pub struct ClientRun {
    /// `{"op": "connect", "ok", "protocolVersion"}` or the connect failure.
    pub connect: Value,
    /// One outcome per step that ran.
    pub steps: Vec<Value>,
}

impl PythonClient {
    /// A client in `mode` for the endpoint `url`.
    pub fn new(mode: ClientMode, url: impl Into<String>) -> Self {
        Self {
            mode,
            url: url.into(),
            headers: Vec::new(),
            tasks: false,
        }
    }

    /// Sends the HTTP header `name: value` on every request.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Declares the `io.modelcontextprotocol/tasks` extension on every
    /// request, and polls the tasks tools/call creates until they end.
    pub fn with_tasks(mut self) -> Self {
        self.tasks = true;
        self
    }

    /// Runs `steps` (blocking; at most a minute) and returns what the client
    /// printed. Fails when the client cannot run or prints something else
    /// than one JSON line per step after its connection line; a failed
    /// connection is a [`ClientRun`] with no steps.
    pub fn run(&self, steps: &[Value]) -> Result<ClientRun> {
        let python = install_dir()?.join("python");
        let mut command = Command::new(python.join("venv/bin/python"));
        command
            .arg(python.join("client.py"))
            .arg(self.mode.as_str())
            .arg(&self.url);
        for (name, value) in &self.headers {
            command.arg(format!("--header={name}: {value}"));
        }
        if self.tasks {
            command.arg("--tasks");
        }
        command.arg(serde_json::to_string(steps)?);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the Python client {:?}", command.get_program()))?;
        let mut stdout = child.stdout.take().context("client stdout")?;
        let mut stderr = child.stderr.take().context("client stderr")?;
        let out = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let err = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        let Some(status) = status else {
            bail!(
                "the Python client ({}) did not finish within {CLIENT_TIMEOUT:?}; it printed:\n{stdout}\n{stderr}",
                self.mode.as_str()
            );
        };
        let mut lines = stdout
            .lines()
            .map(serde_json::from_str::<Value>)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| {
                format!("the Python client printed a line that is not JSON:\n{stdout}\n{stderr}")
            })?
            .into_iter();
        let Some(connect) = lines.next() else {
            bail!("the Python client printed nothing ({status}):\n{stderr}");
        };
        let outcomes: Vec<Value> = lines.collect();
        if !status.success() || (connect["ok"] == true && outcomes.len() != steps.len()) {
            bail!("the Python client failed ({status}):\n{stdout}\n{stderr}");
        }
        Ok(ClientRun {
            connect,
            steps: outcomes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_pinned() {
        for kind in ServerKind::ALL {
            assert_ne!(kind.version(), "unknown", "{kind:?}");
        }
        assert!(ServerKind::TsStreamable117.version().starts_with("1.17."));
        assert!(ServerKind::McpGo.version().starts_with('v'));
    }

    /// A shell script as a server: each start appends a line to `starts`,
    /// then runs `script` with the port as `$1`.
    fn scripted(starts: &Path, script: &str) -> impl Fn() -> Command {
        let script = format!("echo start >>'{}'; {script}", starts.display());
        move || {
            let mut command = Command::new("/bin/sh");
            command.args(["-c", &script, "server"]);
            command
        }
    }

    #[test]
    fn a_server_whose_port_was_taken_starts_again_on_another() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let starts = dir.path().join("starts");
        let taken_once = format!(
            "if [ -e '{mark}' ]; then echo \"ready $1\"; exec sleep 30; fi; touch '{mark}'; echo \"cannot listen on 127.0.0.1:$1\" >&2; exit 1",
            mark = dir.path().join("mark").display()
        );
        let output = dir.path().join("out.log");
        let process = start_on_free_port("scripted", &output, scripted(&starts, &taken_once))?;
        assert_eq!(fs::read_to_string(&starts)?.lines().count(), 2);
        assert!(fs::read_to_string(&output)?.starts_with(&format!("ready {}", process.port())));
        Ok(())
    }

    #[test]
    fn a_server_that_fails_otherwise_is_not_started_again() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let starts = dir.path().join("starts");
        let output = dir.path().join("out.log");
        let Err(err) = start_on_free_port(
            "scripted",
            &output,
            scripted(&starts, "echo 'no such module' >&2; exit 3"),
        ) else {
            panic!("a failing server was reported started");
        };
        let message = format!("{err:#}");
        assert!(message.contains("scripted exited"), "{message}");
        assert!(message.contains("no such module"), "{message}");
        assert_eq!(fs::read_to_string(&starts)?.lines().count(), 1);
        Ok(())
    }
}
