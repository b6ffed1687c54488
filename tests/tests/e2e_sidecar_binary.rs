//! The `chaperone-sidecar` binary itself, as a container runs it: settings
//! from the environment, one runtime worker thread (the webhook's default)
//! and the thread that makes signing nonces, a policy directory, the audit
//! trail on stdout, spans over OTLP/gRPC, and SIGTERM to stop.
//!
//! The other sidecar tests drive the library in their own process; this one
//! covers what only `main` does: the runtime it builds and what it flushes
//! on the way out.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chaperone_demo::{ToolServer, ToolSet};
use chaperone_sidecar::settings::READYZ_PATH;
use chaperone_testenv::{
    mcp_fixtures::{built_binary, call, loopback_listener, mcp_session, serve_mcp},
    otlp_receiver::{OtlpReceiver, Transport},
    sidecar_fixtures::{eventually, http_get_async, status_code},
};
use serde_json::json;
use tokio::io::AsyncReadExt as _;

const IDENTITY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata:
  name: accountant
  namespace: finance
spec:
  selector:
    serviceAccountName: accountant
  toolServers:
    - name: billing
      url: BILLING_URL
"#;

const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata:
  name: accountant
  namespace: finance
spec:
  targetRefs:
    - name: accountant
  rules:
    - name: read-invoices
      action: allow
      tools:
        - server: billing
          name: get_invoice
"#;

/// Longest the sidecar may take to become ready, and to stop.
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_thread_the_binary_serves_calls_and_on_sigterm_flushes_its_trail_and_spans()
-> Result<()> {
    let sidecar =
        tokio::task::spawn_blocking(|| built_binary("chaperone-sidecar", "chaperone-sidecar"))
            .await??;
    let receiver = OtlpReceiver::start().await?;
    let billing = serve_mcp(
        loopback_listener().await?,
        ToolServer::new(ToolSet::Billing),
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let url = format!("http://127.0.0.1:{billing}/mcp");
    std::fs::write(
        dir.path().join("identity.yaml"),
        IDENTITY.replace("BILLING_URL", &url),
    )?;
    std::fs::write(dir.path().join("policy.yaml"), POLICY)?;
    // Free ports for the proxy and the admin server (taken back just before
    // the sidecar binds them).
    let (proxy, admin) = {
        let (proxy, admin) = (loopback_listener().await?, loopback_listener().await?);
        (proxy.local_addr()?.port(), admin.local_addr()?.port())
    };
    let mut child = tokio::process::Command::new(&sidecar)
        .arg("--policy-dir")
        .arg(dir.path())
        .env("CHAPERONE_LISTEN", format!("127.0.0.1:{proxy}"))
        .env("CHAPERONE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("CHAPERONE_WORKER_THREADS", "1")
        .env("CHAPERONE_SIGNING_NONCES", "64")
        // gRPC: the exporter whose channel runs on the sidecar's runtime.
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_url())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        // No batch is due before the stop: the spans arrive only if the
        // stop flushes them.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting chaperone-sidecar")?;
    let pid = child.id().context("the sidecar's pid")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let trail = tokio::spawn(async move {
        let mut text = String::new();
        stdout.read_to_string(&mut text).await.map(|_| text)
    });
    let mut stderr = child.stderr.take().context("stderr")?;
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    let ready = eventually(WAIT, async || {
        Ok((status_code(&http_get_async(admin, READYZ_PATH).await) == 200).then_some(()))
    })
    .await;
    if let Err(err) = ready {
        let _ = child.kill().await;
        anyhow::bail!(
            "{err}: the sidecar never became ready; its logs:\n{}",
            logs.await?
        );
    }
    // The thread that makes the assertions' signing nonces runs (Linux
    // names threads in /proc).
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    ensure!(
        threads.iter().any(|name| name == "chaperone-nonce"),
        "no signing-nonce thread among {threads:?}"
    );
    let client = mcp_session(&format!("http://127.0.0.1:{proxy}/billing"), None).await?;
    let answer = call(&client, "get_invoice", json!({"invoice": "INV-7"}))
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(answer.contains("INV-7"), "answer: {answer}");
    let refused = call(
        &client,
        "issue_credit",
        json!({"invoice": "INV-7", "amount": 5}),
    )
    .await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("rule \"no rule allows\"")),
        "issue_credit was not refused with its reason: {refused:?}"
    );
    drop(client);
    assert!(
        receiver.spans().is_empty(),
        "spans were exported before the stop: the test would not show the flush"
    );

    let stopped_at = Instant::now();
    let signal = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(signal.success(), "kill -TERM {pid} failed");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .context("the sidecar did not stop within 20 s of SIGTERM")??;
    let logs = logs.await?;
    assert!(status.success(), "exit status {status}; logs:\n{logs}");
    // Well inside the flush timeouts: nothing waited for a timer to give up.
    assert!(
        stopped_at.elapsed() < Duration::from_secs(5),
        "stopping took {:?}; logs:\n{logs}",
        stopped_at.elapsed()
    );

    // The runtime the binary built: one worker, as set.
    let started = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "chaperone-sidecar starting")
        .with_context(|| format!("no start line in the logs:\n{logs}"))?;
    assert_eq!(started["worker_threads"], 1, "{started}");
    assert_eq!(started["signing_nonces"], 64, "{started}");

    // The spans buffered until the stop reached the receiver.
    let span = receiver
        .wait_for(Duration::from_secs(2), "the allowed call's span", |s| {
            s.name == "tools/call get_invoice"
        })
        .await?;
    assert_eq!(span.transport, Transport::Grpc);
    assert_eq!(span.service_name, "chaperone-sidecar");
    assert_eq!(span.attribute("chaperone.tool_server"), Some("billing"));
    receiver
        .wait_for(Duration::from_secs(2), "the refused call's span", |s| {
            s.name == "tools/call issue_credit"
        })
        .await?;

    // The trail: both decisions, closed by the final checkpoint.
    let trail = trail.await??;
    let lines: Vec<serde_json::Value> = trail
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("the trail's lines are JSON")?;
    let tools: Vec<&str> = lines.iter().filter_map(|l| l["tool"].as_str()).collect();
    assert_eq!(tools, ["get_invoice", "issue_credit"], "trail:\n{trail}");
    assert_eq!(
        lines.last().and_then(|l| l["kind"].as_str()),
        Some("checkpoint"),
        "trail:\n{trail}"
    );
    Ok(())
}
