//! `chaperonectl` against a real API server and a running controller, run as
//! the workspace's binary with the control plane's kubeconfig:
//!
//! - `policy explain|test --from-cluster` read the CRs from the cluster
//!   (every namespace, or the `-n` namespace for a user who may not list
//!   them all); `explain --exit-code` says deny; `test --format junit`.
//! - `status`, `version` and `check` read what the in-process controller's
//!   replica publishes (`chaperone-replica-<pod>`) about sidecar stand-ins
//!   that say hello, ACK or NACK over a real snapshot stream.
//! - `audit keys` reads the controller's audit-key archive: a stopped real
//!   sidecar's trail verifies strictly with it, not with the live JWKS.
//!
//! The tests of one binary share the controller; each asserts on its own
//! namespace's pods and agents only.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chaperone_api::{AgentIdentity, ToolPolicy};
use chaperone_testenv::{
    ControlPlane, chart, create_namespace,
    kube_fixtures::{self, InProcessController, SidecarStandIn, apply, pod_token, tool_pod_token},
    mcp_fixtures,
    sidecar_fixtures::{eventually, http_get_async, http_request_async, json_post},
};
use chaperone_wire::v1::{self, sidecar_message::Message};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

/// The controller under test, and its pod name (its replica ConfigMap is
/// `chaperone-replica-<pod>` in chaperone-system).
fn controller() -> &'static (InProcessController, String) {
    static CONTROLLER: OnceLock<(InProcessController, String)> = OnceLock::new();
    CONTROLLER.get_or_init(|| {
        let pod = format!("cli-test-controller-{}", std::process::id());
        (
            kube_fixtures::start_controller(ControlPlane::shared(), &pod),
            pod,
        )
    })
}

/// The workspace's `chaperonectl`, built once.
fn chaperonectl_binary() -> Result<PathBuf> {
    mcp_fixtures::built_chaperonectl()
}

/// What one run of chaperonectl said.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `chaperonectl ARGS` as the control plane's admin.
async fn chaperonectl(args: &[&str]) -> Result<Run> {
    let kubeconfig = ControlPlane::shared()
        .kubeconfig()
        .to_str()
        .context("path")?;
    chaperonectl_offline(&[args, &["--kubeconfig", kubeconfig]].concat()).await
}

/// Runs `chaperonectl ARGS` without a kubeconfig (`audit verify`).
async fn chaperonectl_offline(args: &[&str]) -> Result<Run> {
    let binary = tokio::task::spawn_blocking(chaperonectl_binary).await??;
    let out = tokio::process::Command::new(binary)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .await?;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// stdout of a run that must succeed.
async fn succeeds(args: &[&str]) -> Result<String> {
    let run = chaperonectl(args).await?;
    if run.code != 0 {
        bail!(
            "chaperonectl {args:?} exited {}: {}{}",
            run.code,
            run.stderr,
            run.stdout
        );
    }
    Ok(run.stdout)
}

/// A fresh namespace with AgentIdentity `clerk` (tool server `orders`) and
/// ToolPolicy `orders`: get_order allowed, refund denied.
async fn setup(prefix: &str) -> Result<(Client, String)> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    tokio::task::spawn_blocking(|| {
        INSTALLED.get_or_init(|| {
            kube_fixtures::install_crds(ControlPlane::shared()).expect("installing the CRDs");
        });
    })
    .await?;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, prefix).await?;
    apply::<AgentIdentity>(
        &client,
        &ns,
        kube_fixtures::agent_identity(
            "clerk",
            json!({
                "selector": { "serviceAccountName": "clerk" },
                "toolServers": [{ "name": "orders", "url": "http://orders.tools.svc:8080/mcp" }]
            }),
        ),
    )
    .await?;
    apply::<ToolPolicy>(
        &client,
        &ns,
        kube_fixtures::tool_policy(
            "orders",
            json!({
                "targetRefs": [{ "name": "clerk" }],
                "rules": [
                    { "name": "read-orders", "action": "allow", "tools": [{ "server": "orders", "name": "get_order" }] },
                    { "name": "no-refunds", "action": "deny", "tools": [{ "server": "orders", "name": "refund" }] }
                ]
            }),
        ),
    )
    .await?;
    Ok((client, ns))
}

// ---------------------------------------------------------------------------
// policy --from-cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_from_cluster_decides_on_the_clusters_policies_and_exit_code_says_deny()
-> Result<()> {
    let (_client, ns) = setup("cli-explain").await?;
    let agent = format!("{ns}/clerk");
    let denied = chaperonectl(&[
        "policy",
        "explain",
        "--from-cluster",
        "--agent",
        &agent,
        "--tool",
        "orders/refund",
        "--exit-code",
    ])
    .await?;
    assert_eq!(
        denied.code, 2,
        "deny exits 2: {}{}",
        denied.stderr, denied.stdout
    );
    assert!(
        denied.stdout.contains("decision:   deny")
            && denied.stdout.contains("rule:       orders/no-refunds"),
        "{}",
        denied.stdout
    );
    // -n qualifies a bare agent name; allowed exits 0; -o json is data.
    let allowed = succeeds(&[
        "policy",
        "explain",
        "--from-cluster",
        "-n",
        &ns,
        "--agent",
        "clerk",
        "--tool",
        "orders/get_order",
        "--exit-code",
        "-o",
        "json",
    ])
    .await?;
    let allowed: Value = serde_json::from_str(&allowed)?;
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["rule"], "orders/read-orders");
    assert_eq!(allowed["agent"], json!(agent));
    // Without --exit-code a deny is a successful explanation.
    succeeds(&[
        "policy",
        "explain",
        "--from-cluster",
        "--agent",
        &agent,
        "--tool",
        "orders/refund",
    ])
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_from_cluster_reports_junit_with_the_failures_reason() -> Result<()> {
    let (_client, ns) = setup("cli-ptest").await?;
    let dir = tempfile::tempdir()?;
    let cases = dir.path().join("cases.yaml");
    std::fs::write(
        &cases,
        format!(
            "- {{name: reads orders, agent: {ns}/clerk, tool: orders/get_order, expect: allow}}\n\
             - {{name: refunds wrongly expected, agent: {ns}/clerk, tool: orders/refund, expect: allow}}\n"
        ),
    )?;
    let cases = cases.display().to_string();
    let run = chaperonectl(&[
        "policy",
        "test",
        &cases,
        "--from-cluster",
        "--format",
        "junit",
    ])
    .await?;
    assert_eq!(run.code, 1, "a failing case fails the run: {}", run.stderr);
    assert!(
        run.stdout
            .contains(r#"<testcase name="reads orders" classname="#),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(
            r#"<failure message="expected allow, got deny by orders/no-refunds (a deny rule matched)"/>"#
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("1 of 2 test(s) failed"),
        "{}",
        run.stderr
    );
    let run = chaperonectl(&[
        "policy",
        "test",
        &cases,
        "--from-cluster",
        "--format",
        "json",
    ])
    .await?;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let report: Value = serde_json::from_str(&run.stdout)?;
    assert_eq!(
        (report["passed"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(report["cases"][1]["passed"], false);
    assert_eq!(
        report["cases"][1]["failure"],
        "expected allow, got deny by orders/no-refunds (a deny rule matched)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_may_read_one_namespace_explains_from_it_and_is_told_so() -> Result<()> {
    let (client, ns) = setup("cli-narrow").await?;
    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "chaperone-reader", "namespace": ns },
        "rules": [{ "apiGroups": ["chaperone.dev"], "resources": ["*"], "verbs": ["get", "list"] }]
    }))?;
    Api::<Role>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "chaperone-reader", "namespace": ns },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "chaperone-reader" },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "auditor" }]
    }))?;
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await?;
    let run = eventually(Duration::from_secs(10), async || {
        let run = chaperonectl(&[
            "policy",
            "explain",
            "--from-cluster",
            "--as",
            "auditor",
            "-n",
            &ns,
            "--agent",
            "clerk",
            "--tool",
            "orders/refund",
        ])
        .await?;
        Ok((run.code == 0).then_some(run))
    })
    .await?;
    assert!(
        run.stderr.contains(&format!(
            "warning: reading namespace {ns} only: listing agentidentities in every namespace is forbidden"
        )),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("decision:   deny"), "{}", run.stdout);
    Ok(())
}

// ---------------------------------------------------------------------------
// status, version, check

/// A sidecar stand-in of a new pod `pod` of agent `clerk` that says hello as
/// build `version` and has received its first snapshot.
async fn sidecar(
    client: &Client,
    ns: &str,
    pod: &str,
    version: &str,
) -> Result<(SidecarStandIn, v1::SnapshotUpdate)> {
    let token = pod_token(client, ns, "clerk", pod, "chaperone").await?;
    let endpoint = controller().0.snapshot_endpoint()?;
    let mut sidecar = eventually(
        Duration::from_secs(20),
        async || match SidecarStandIn::connect(&endpoint, &token).await {
            Ok(sidecar) => Ok(Some(sidecar)),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => Ok(None),
            Err(status) => bail!("stream refused: {status}"),
        },
    )
    .await?;
    sidecar
        .send(Message::Hello(v1::Hello {
            sidecar_version: version.to_owned(),
            snapshot_version: 0,
            snapshot_hash: String::new(),
        }))
        .await?;
    let update = sidecar.next_snapshot(Duration::from_secs(10)).await?;
    Ok((sidecar, update))
}

/// `ns` with one sidecar (`in-sync`, build 0.0.0-test) that ACKed its
/// snapshot and reported a tool, and one (`nacker`) that rejected it.
async fn sidecars(prefix: &str) -> Result<(Client, String, Vec<SidecarStandIn>)> {
    tokio::task::spawn_blocking(controller).await?;
    let (client, ns) = setup(prefix).await?;
    let (good, update) = sidecar(&client, &ns, "in-sync", "0.0.0-test").await?;
    good.ack(&update).await?;
    good.send(Message::Inventory(v1::ToolInventory {
        tools: vec![v1::DiscoveredTool {
            server: "orders".into(),
            name: "get_order".into(),
            ..Default::default()
        }],
    }))
    .await?;
    let (bad, update) = sidecar(&client, &ns, "nacker", "0.0.0-test").await?;
    bad.send(Message::Nack(v1::Nack {
        version: update.version,
        hash: update.hash.clone(),
        error: "rule no-refunds: unknown operator".into(),
    }))
    .await?;
    Ok((client, ns, vec![good, bad]))
}

/// `status -n NS -o json` once both sidecars are published as expected.
async fn status_rows(ns: &str) -> Result<Vec<Value>> {
    eventually(Duration::from_secs(20), async || {
        let out = succeeds(&["status", "-n", ns, "-o", "json"]).await?;
        let rows: Vec<Value> = serde_json::from_str(&out).context("status -o json")?;
        let done = rows.iter().filter(|r| r["mode"] == "agent").count() == 2
            && rows.iter().any(|r| {
                r["pod"] == "in-sync"
                    && r["sync"] == "Synced"
                    && r["tools"] == json!(["orders/get_order"])
            })
            && rows
                .iter()
                .any(|r| r["pod"] == "nacker" && r["sync"] == "Rejected");
        Ok(done.then_some(rows))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_each_sidecar_with_its_snapshot_and_names_a_nack() -> Result<()> {
    let (_client, ns, _sidecars) = sidecars("cli-status").await?;
    let rows = status_rows(&ns).await?;
    // A tool-mode sidecar is listed too, without an agent or a snapshot.
    let client = ControlPlane::shared().client().await?;
    let token = tool_pod_token(&client, &ns, "orders-mcp", "orders-mcp-0", "chaperone").await?;
    let tool = SidecarStandIn::connect(&controller().0.snapshot_endpoint()?, &token).await?;
    tool.send(Message::Hello(v1::Hello {
        sidecar_version: "0.0.1-tool".into(),
        snapshot_version: 0,
        snapshot_hash: String::new(),
    }))
    .await?;
    let tool_row = eventually(Duration::from_secs(20), async || {
        let out = succeeds(&["status", "-n", &ns, "-o", "json"]).await?;
        let rows: Vec<Value> = serde_json::from_str(&out)?;
        Ok(rows
            .into_iter()
            .find(|r| r["pod"] == "orders-mcp-0" && r["sidecarVersion"] == "0.0.1-tool"))
    })
    .await?;
    assert_eq!(tool_row["mode"], "tool", "{tool_row}");
    let yaml = succeeds(&["status", "-n", &ns, "-o", "yaml"]).await?;
    assert!(
        yaml.contains("mode: tool") && yaml.contains("pod: orders-mcp-0"),
        "{yaml}"
    );
    assert_eq!(tool_row["sync"], "NotApplicable", "{tool_row}");
    assert!(tool_row.get("agent").is_none(), "{tool_row}");
    let replica = &controller().1;
    let good = rows.iter().find(|r| r["pod"] == "in-sync").unwrap();
    assert_eq!(good["agent"], json!(format!("{ns}/clerk")));
    assert_eq!(good["sidecarVersion"], "0.0.0-test");
    assert_eq!(good["replica"], json!(replica));
    assert_eq!(good["snapshotVersion"], good["latestVersion"]);
    assert!(good["ackedAt"].is_i64(), "{good}");
    let bad = rows.iter().find(|r| r["pod"] == "nacker").unwrap();
    let nack = bad["nack"].as_str().unwrap_or_default();
    assert!(
        nack.ends_with(": rule no-refunds: unknown operator"),
        "{bad}"
    );

    let table = succeeds(&["status", "-n", &ns]).await?;
    eprintln!("chaperonectl status -n {ns}:\n{table}");
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NAMESPACE") && header.contains("SYNC") && header.contains("ERROR"),
        "{table}"
    );
    let nacker = table
        .lines()
        .find(|l| l.contains("nacker"))
        .unwrap_or_default();
    assert!(
        nacker.contains("NACKED") && nacker.contains("unknown operator"),
        "{table}"
    );
    let in_sync = table
        .lines()
        .find(|l| l.contains("in-sync"))
        .unwrap_or_default();
    assert!(in_sync.contains("SYNCED"), "{table}");
    let tool = table
        .lines()
        .find(|l| l.contains("orders-mcp-0"))
        .unwrap_or_default();
    let cells: Vec<&str> = tool.split_whitespace().collect();
    assert_eq!(
        cells.get(2..9),
        Some(&["-", "tool", "-", "-", "-", "-", "0.0.1-tool"][..]),
        "AGENT MODE SNAPSHOT LATEST SYNC ACKED SIDECAR:\n{table}"
    );

    let details = succeeds(&["status", &format!("{ns}/in-sync")]).await?;
    eprintln!("chaperonectl status {ns}/in-sync:\n{details}");
    assert!(
        details.contains("Tools:     1 seen in tools/list\n  orders/get_order\n"),
        "{details}"
    );
    let missing = chaperonectl(&["status", "-n", &ns, "no-such-pod"]).await?;
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains(&format!(
            "no sidecar of pod {ns}/no-such-pod is connected to a live controller replica"
        )),
        "{}",
        missing.stderr
    );

    // An injected pod whose sidecar never connected is listed as such.
    let lost: Pod = serde_json::from_value(json!({
        "metadata": { "name": "lost-0" },
        "spec": {
            "initContainers": [{ "name": "chaperone-proxy", "image": "chaperone-sidecar:test", "restartPolicy": "Always" }],
            "containers": [{ "name": "agent", "image": "agent:test" }],
        }
    }))?;
    Api::<Pod>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &lost)
        .await?;
    let out = succeeds(&["status", "-n", &ns, "-o", "json"]).await?;
    let rows: Vec<Value> = serde_json::from_str(&out)?;
    let lost = rows
        .iter()
        .find(|r| r["pod"] == "lost-0")
        .with_context(|| format!("no row for the disconnected pod: {out}"))?;
    assert_eq!(lost["sync"], "Disconnected", "{lost}");
    assert_eq!(lost["mode"], "agent", "{lost}");
    let table = succeeds(&["status", "-n", &ns]).await?;
    assert!(
        table
            .lines()
            .any(|l| l.contains("lost-0") && l.contains("DISCONNECTED")),
        "{table}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_reports_the_replica_and_sidecar_builds_and_warns_of_skew() -> Result<()> {
    let (_client, ns, _sidecars) = sidecars("cli-version").await?;
    status_rows(&ns).await?;
    let out = succeeds(&["version", "-o", "json"]).await?;
    let versions: Value = serde_json::from_str(&out)?;
    let workspace = env!("CARGO_PKG_VERSION");
    assert_eq!(versions["client"], workspace);
    let replica = &controller().1;
    let ours = versions["controllers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["pod"] == json!(replica)))
        .with_context(|| format!("replica {replica} in {versions}"))?;
    assert_eq!(ours["version"], workspace, "{versions}");
    assert_eq!(ours["stale"], false);
    assert!(
        versions["sidecars"]["0.0.0-test"].as_u64() >= Some(2),
        "{versions}"
    );
    let warnings = versions["warnings"].to_string();
    assert!(
        warnings.contains("sidecar(s) run 0.0.0-test, not the controller's minor version"),
        "{warnings}"
    );
    let table = chaperonectl(&["version"]).await?;
    eprintln!("chaperonectl version:\n{}{}", table.stdout, table.stderr);
    assert!(
        table
            .stdout
            .starts_with(&format!("Client: {workspace}\nController replicas: ")),
        "{}",
        table.stdout
    );
    assert!(table.stderr.contains("warning: "), "{}", table.stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_sidecar_shows_its_own_build_in_sync_with_no_skew() -> Result<()> {
    tokio::task::spawn_blocking(controller).await?;
    let (client, ns) = setup("cli-real").await?;
    let token = pod_token(&client, &ns, "clerk", "real-0", "chaperone").await?;
    let _sidecar = controller().0.sidecar("real-0", &token).await?;
    let workspace = env!("CARGO_PKG_VERSION");
    let row = eventually(Duration::from_secs(20), async || {
        let out = succeeds(&["status", &format!("{ns}/real-0"), "-o", "json"]).await;
        let Ok(out) = out else { return Ok(None) };
        let row: Value = serde_json::from_str(&out)?;
        Ok((row["sync"] == "Synced").then_some(row))
    })
    .await?;
    assert_eq!(row["sidecarVersion"], workspace, "{row}");
    assert_eq!(row["mode"], "agent", "{row}");
    let versions: Value = serde_json::from_str(&succeeds(&["version", "-o", "json"]).await?)?;
    let warnings = versions["warnings"].to_string();
    assert!(
        !warnings.contains(&format!("run {workspace}")),
        "a sidecar of the controller's build is no skew: {warnings}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_keys_verify_a_stopped_sidecars_trail_after_its_key_left_the_jwks() -> Result<()> {
    tokio::task::spawn_blocking(controller).await?;
    let (client, ns) = setup("cli-keys").await?;
    let token = pod_token(&client, &ns, "clerk", "keeper-0", "chaperone").await?;
    let dir = tempfile::tempdir()?;
    let controller = &controller().0;
    let keeper = controller.sidecar("keeper-0", &token).await?;
    keeper.wait_for_version(0, Duration::from_secs(10)).await?;
    // A stand-in registering the sidecar's key as its own (no proof that it
    // holds it): refused, so neither the JWKS nor the archive names it for
    // that key.
    let (forger, _) = sidecar(&client, &ns, "forger-0", "0.0.0-test").await?;
    forger
        .send_signing_key(chaperone_wire::v1::SigningKey {
            kid: keeper.sidecar.key_registration().kid.clone(),
            jwk_json: keeper.sidecar.key_registration().jwk.to_string(),
            proof: Vec::new(),
        })
        .await?;
    // A denied call: a record, decided without any tool server.
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"refund","arguments":{}}}"#;
    let answer = http_request_async(keeper.proxy_port, json_post("/orders", &[], body)).await;
    assert!(answer.contains("no-refunds"), "{answer}");
    let kid = keeper.sidecar.key_registration().kid.clone();
    let keys_file = dir.path().join("keys.json");
    let archived = eventually(Duration::from_secs(20), async || {
        let run = chaperonectl(&["audit", "keys", "-n", &ns]).await?;
        Ok((run.code == 0 && run.stdout.contains(&kid)).then_some(run))
    })
    .await?;
    let jwks: Value = serde_json::from_str(&archived.stdout)?;
    let keys = jwks["keys"].as_array().context("keys")?;
    assert_eq!(keys.len(), 1, "only the sidecar's own key: {jwks:#}");
    assert_eq!(keys[0]["use"], "chaperone-audit", "{jwks:#}");
    assert_eq!(keys[0]["chaperone.dev/pod"], format!("{ns}/keeper-0"));
    assert_eq!(keys[0]["chaperone.dev/agent"], format!("{ns}/clerk"));
    assert!(
        archived.stderr.contains("1 archived key of pods in"),
        "{}",
        archived.stderr
    );
    std::fs::write(&keys_file, &archived.stdout)?;

    // The sidecar stops (its final checkpoint ends its trail) and its pod
    // goes: its key leaves the controller's JWKS, and stays in the archive.
    keeper.sidecar.close_audit()?;
    let trail = dir.path().join("trail.log");
    std::fs::write(&trail, keeper.audit.text())?;
    drop(keeper);
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete("keeper-0", &Default::default())
        .await?;
    let admin = controller.admin_port;
    let live_jwks = eventually(Duration::from_secs(20), async || {
        let response = http_get_async(admin, "/.well-known/jwks.json").await;
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        Ok((response.contains(" 200 ") && !body.contains(&kid)).then_some(body))
    })
    .await?;
    let live_file = dir.path().join("live.json");
    std::fs::write(&live_file, &live_jwks)?;
    let (trail, keys_file, live_file) = (
        trail.to_str().context("path")?,
        keys_file.to_str().context("path")?,
        live_file.to_str().context("path")?,
    );
    let unproven =
        chaperonectl_offline(&["audit", "verify", trail, "--jwks", live_file, "--strict"]).await?;
    assert_ne!(unproven.code, 0, "the live JWKS has no key for it any more");
    assert!(unproven.stderr.contains(&kid), "{}", unproven.stderr);
    let verified =
        chaperonectl_offline(&["audit", "verify", trail, "--jwks", keys_file, "--strict"]).await?;
    assert_eq!(verified.code, 0, "{}", verified.stderr);
    assert!(
        verified.stdout.starts_with("ok: 1 record"),
        "{}",
        verified.stdout
    );
    // Still archived once the pod is gone.
    let later = succeeds(&["audit", "keys", "-n", &ns]).await?;
    assert!(later.contains(&kid), "{later}");
    let metrics = http_get_async(admin, "/metrics").await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("chaperone_controller_signing_keys_refused_total ")
                && !l.ends_with(" 0")
        ),
        "the forger's registration is counted"
    );
    drop(forger);
    // A namespace with no archived keys is an error that says so.
    let (_, empty) = setup("cli-nokeys").await?;
    let none = chaperonectl(&["audit", "keys", "-n", &empty]).await?;
    assert_eq!(none.code, 1);
    assert!(
        none.stderr.contains("no audit keys of pods in"),
        "{}",
        none.stderr
    );
    Ok(())
}

/// The check named by `message` (a prefix), from `check -o json`.
fn check<'a>(report: &'a Value, message: &str) -> Result<&'a Value> {
    report["checks"]
        .as_array()
        .and_then(|checks| {
            checks.iter().find(|c| {
                c["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
        })
        .with_context(|| format!("no check {message:?} in {report:#}"))
}

async fn check_report() -> Result<(i32, Value)> {
    let run = chaperonectl(&["check", "-o", "json"]).await?;
    let report: Value = serde_json::from_str(&run.stdout)
        .with_context(|| format!("check -o json: {}{}", run.stdout, run.stderr))?;
    Ok((run.code, report))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_what_is_healthy_and_names_each_failure_with_a_hint() -> Result<()> {
    let (client, ns, _sidecars) = sidecars("cli-check").await?;
    status_rows(&ns).await?;
    let (controller, pod) = controller();
    let account = "system:serviceaccount:chaperone-system:chaperone-controller";

    // The CRDs as the check's hint says (a no-op when crds/ is fresh).
    let binary = tokio::task::spawn_blocking(chaperonectl_binary).await??;
    let crds = String::from_utf8(Command::new(binary).arg("crds").output()?.stdout)?;
    let applied = ControlPlane::shared()
        .kubectl_with_stdin(&["apply", "--server-side", "-f", "-"], Some(&crds))?;
    if !applied.status.success() {
        bail!(
            "kubectl apply: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }

    // No webhook configuration, no RBAC for the controller's account.
    let (code, report) = check_report().await?;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    for crd in [
        "agentidentities",
        "toolpolicies",
        "delegationgrants",
        "toolcallapprovals",
    ] {
        let line = check(
            &report,
            &format!("{crd}.chaperone.dev is installed at this CLI's version"),
        )?;
        assert_eq!(line["ok"], true);
    }
    assert_eq!(
        check(&report, &format!("replica {pod} is live"))?["ok"],
        true
    );
    let tls = check(
        &report,
        "secret chaperone-system/chaperone-controller-tls: certificate for chaperone-controller.chaperone-system.svc valid until",
    )?;
    assert_eq!(tls["ok"], true);
    let webhook = check(
        &report,
        "mutatingwebhookconfiguration chaperone-injector does not exist",
    )?;
    assert_eq!(webhook["ok"], false);
    assert!(webhook["hint"].is_string());
    let rbac = check(
        &report,
        &format!("{account} may not: list chaperone.dev agentidentities;"),
    )?;
    assert_eq!(rbac["ok"], false);
    // Other tests' sidecars of this build may count too.
    let skew = report["checks"]
        .as_array()
        .and_then(|checks| {
            checks.iter().find(|c| {
                c["message"].as_str().is_some_and(|m| {
                    m.ends_with(
                        " sidecar(s) run 0.0.0-test, not the controller's minor version: \
                         restart their pods to inject the current sidecar",
                    )
                })
            })
        })
        .with_context(|| format!("no skew warning in {report:#}"))?;
    assert_eq!(
        (&skew["ok"], &skew["warning"]),
        (&json!(true), &json!(true)),
        "{skew}"
    );
    // The archive is read (the stand-ins here connected moments ago, within
    // the grace the controller has to archive their keys).
    let archive = check(
        &report,
        "the audit-key archive holds the key of each of the ",
    )?;
    assert_eq!(archive["ok"], true, "{archive}");
    let nack = check(
        &report,
        &format!("sidecar {ns}/nacker rejected its agent's snapshot: "),
    )?;
    assert!(
        nack["message"]
            .as_str()
            .unwrap_or_default()
            .ends_with("rule no-refunds: unknown operator"),
        "{nack}"
    );

    // The webhook registered with the controller's CA and the controller's
    // account from the chart's RBAC, and its Deployment: those checks pass.
    let ca = std::fs::read(&controller.ca_file)?;
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": { "name": "chaperone-injector" },
        "webhooks": [{
            "name": "inject.chaperone.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "objectSelector": { "matchLabels": { "never": "matches" } },
            "clientConfig": {
                "url": format!("https://127.0.0.1:{}/inject", controller.webhook_port),
                "caBundle": base64_of(&ca),
            },
            "rules": [{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"] }]
        }]
    }))?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(
            "chaperone-injector",
            &PatchParams::apply("api-cli-cluster").force(),
            &Patch::Apply(&config),
        )
        .await?;
    // The chart's RBAC and Deployment (release `chaperone`); the Deployment
    // never starts pods here (no controller-manager), so its status and the
    // in-process controller's "pod" are written as a running one's would be.
    let manifest = render_chart(&[
        "--show-only",
        "templates/rbac.yaml",
        "--show-only",
        "templates/deployment.yaml",
        "--set",
        "replicas=1",
    ])
    .await?;
    apply_in_controller_namespace(&manifest)?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), "chaperone-system");
    deployments
        .patch_status(
            "chaperone-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "replicas": 1, "readyReplicas": 1 } })),
        )
        .await?;
    let labels = deployments
        .get("chaperone-controller")
        .await?
        .spec
        .and_then(|s| s.selector.match_labels)
        .context("the chart's Deployment has a selector")?;
    let pods = Api::<Pod>::namespaced(client.clone(), "chaperone-system");
    let replica_pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": pod, "labels": labels },
        "spec": { "containers": [{ "name": "controller", "image": "chaperone-controller:test" }] }
    }))?;
    pods.create(&PostParams::default(), &replica_pod).await?;
    pods.patch_status(
        pod,
        &PatchParams::default(),
        &Patch::Merge(
            json!({ "status": { "conditions": [{ "type": "Ready", "status": "True" }] } }),
        ),
    )
    .await?;
    let report = eventually(Duration::from_secs(10), async || {
        let (_, report) = check_report().await?;
        Ok(check(&report, account)
            .is_ok_and(|c| c["ok"] == true)
            .then_some(report))
    })
    .await?;
    assert_eq!(
        check(
            &report,
            "webhook inject.chaperone.dev: caBundle is the controller's CA, valid"
        )?["ok"],
        true
    );
    let deployment = check(
        &report,
        "deployment chaperone-system/chaperone-controller: 1/1 replicas ready",
    )?;
    assert_eq!(deployment["ok"], true);
    let replica = check(&report, &format!("replica {pod} is ready (heartbeat "))?;
    assert_eq!(replica["ok"], true);
    let reachable = check(&report, "webhook inject.chaperone.dev is reachable: ")?;
    assert_eq!(reachable["ok"], true, "{reachable}");
    assert!(
        reachable["message"]
            .as_str()
            .unwrap_or_default()
            .contains("over TLS"),
        "{reachable}"
    );
    let table = chaperonectl(&["check"]).await?;
    eprintln!("chaperonectl check:\n{}", table.stdout);
    assert!(
        table
            .stdout
            .contains("✔ webhook inject.chaperone.dev: caBundle"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains(&format!("✘ sidecar {ns}/nacker rejected")),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("\n    hint: "), "{}", table.stdout);

    // `helm test`: the chart's test pod runs `check` with these arguments as
    // its own read-only ServiceAccount, and sees what an admin sees.
    let manifest = render_chart(&["--show-only", "templates/tests/check.yaml"]).await?;
    let documents = chart::manifest_documents(&manifest)?;
    let test_pod = documents
        .iter()
        .find(|d| d["kind"] == "Pod")
        .context("the chart's test pod")?;
    assert_eq!(test_pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    let rbac: Vec<String> = documents
        .iter()
        .filter(|d| d["kind"] != "Pod")
        .map(|d| d.to_string())
        .collect();
    apply_in_controller_namespace(&rbac.join("\n"))?;
    let mut args: Vec<String> = test_pod["spec"]["containers"][0]["args"]
        .as_array()
        .context("the test pod's args")?
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_owned())
        .collect();
    let test_account = format!(
        "system:serviceaccount:chaperone-system:{}",
        test_pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or_default()
    );
    args.extend(["-o".into(), "json".into(), "--as".into(), test_account]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, admin) = check_report().await?;
    let run = chaperonectl(&args).await?;
    let as_test: Value = serde_json::from_str(&run.stdout)
        .with_context(|| format!("check as the test pod: {}{}", run.stdout, run.stderr))?;
    // Agents, sidecars and versions of tests running alongside come and go:
    // those categories are compared by being read at all (no "forbidden").
    let moving = ["Agents", "Sidecars", "Versions"];
    let verdicts = |report: &Value| -> Vec<(String, Value)> {
        report["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| !moving.iter().any(|m| c["category"] == *m))
            .map(|c| {
                (
                    c["message"].as_str().unwrap_or_default().to_owned(),
                    c["ok"].clone(),
                )
            })
            .filter(|(m, _)| !m.contains("heartbeat"))
            .collect()
    };
    for category in moving {
        assert!(
            as_test["checks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["category"] == category),
            "no {category} check as the test pod: {as_test:#}"
        );
    }
    assert!(!run.stdout.contains("forbidden"), "{}", run.stdout);
    assert_eq!(verdicts(&as_test), verdicts(&admin));
    Ok(())
}

/// `helm template` of the chart (release `chaperone` in `chaperone-system`)
/// with `args`.
async fn render_chart(args: &[&str]) -> Result<String> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let home = tempfile::tempdir()?;
        let chart = chart::chart_dir().display().to_string();
        let mut all = vec!["template", "chaperone", &chart, "-n", "chaperone-system"];
        all.extend(args.iter().map(String::as_str));
        chart::helm_ok(home.path(), &all, None)
    })
    .await?
}

/// `kubectl apply --server-side` of `manifest` into `chaperone-system`.
fn apply_in_controller_namespace(manifest: &str) -> Result<()> {
    let applied = ControlPlane::shared().kubectl_with_stdin(
        &[
            "apply",
            "--server-side",
            "-n",
            "chaperone-system",
            "-f",
            "-",
        ],
        Some(manifest),
    )?;
    if !applied.status.success() {
        bail!(
            "kubectl apply: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    Ok(())
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
