//! The controller's `/metrics` on a real API server: sidecar stand-ins (real
//! gRPC clients with pod-bound tokens) connect, reconnect with the same pod
//! while the old stream is still open, and disconnect; every sidecar gauge
//! must then equal what is really connected, exactly. Each test runs its own
//! in-process controller so that its totals are its own.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use chaperone_api::{AgentIdentity, ToolPolicy};
use chaperone_testenv::{
    ControlPlane, create_namespace,
    kube_fixtures::{
        self, InProcessController, SIDECAR_AUDIENCE, SidecarStandIn, SnapshotEndpoint,
        agent_identity, apply, pod_token, tool_pod_token, tool_policy,
    },
    sidecar_fixtures::{eventually, http_get_async},
};
use kube::{Api, api::DeleteParams};
use serde_json::json;

/// A controller of this test alone (its own ports and gauges).
async fn own_controller(name: &str) -> Result<InProcessController> {
    let name = format!("metrics-{name}-{}", std::process::id());
    Ok(tokio::task::spawn_blocking(move || {
        kube_fixtures::start_controller(ControlPlane::shared(), &name)
    })
    .await?)
}

fn agent(name: &str) -> serde_json::Value {
    agent_identity(
        name,
        json!({
            "selector": { "serviceAccountName": name },
            "toolServers": [{ "name": "orders", "url": "http://orders.tools.svc:8080/mcp" }]
        }),
    )
}

fn policy(agent: &str) -> serde_json::Value {
    tool_policy(
        &format!("{agent}-rules"),
        json!({
            "targetRefs": [{ "name": agent }],
            "rules": [{ "name": "allow", "action": "allow", "tools": [{ "server": "orders", "name": "get_order" }] }]
        }),
    )
}

/// The samples of `/metrics`: (name with its labels as written, value).
async fn scrape(controller: &InProcessController) -> Result<BTreeMap<String, f64>> {
    let response = http_get_async(controller.admin_port, "/metrics").await;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("no /metrics response")?;
    let mut samples = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').context("a sample without a value")?;
        samples.insert(series.to_owned(), value.parse()?);
    }
    Ok(samples)
}

/// The series name of `metric` for agent `ns/name`.
fn per_agent(metric: &str, ns: &str, name: &str) -> String {
    format!("{metric}{{namespace=\"{ns}\",agent=\"{name}\"}}")
}

/// Connects a stand-in with `token` and takes its first snapshot that
/// carries `carrying` (the controller may publish an AgentIdentity before it
/// has seen its ToolPolicy), ACKing it when `ack`.
async fn connect(
    endpoint: &SnapshotEndpoint,
    token: &str,
    carrying: &str,
    ack: bool,
) -> Result<SidecarStandIn> {
    let mut sidecar = SidecarStandIn::connect(endpoint, token).await?;
    loop {
        let update = sidecar.next_snapshot(Duration::from_secs(10)).await?;
        if String::from_utf8_lossy(&update.payload).contains(carrying) {
            if ack {
                sidecar.ack(&update).await?;
            }
            return Ok(sidecar);
        }
    }
}

/// Waits until every `expected` series has its value, then checks that no
/// other series of the sidecar gauges names an agent of `ns`; fails with the
/// differences and the scrape.
async fn expect_gauges(
    controller: &InProcessController,
    ns: &str,
    expected: &BTreeMap<String, f64>,
) -> Result<()> {
    let mut last = BTreeMap::new();
    let outcome = eventually(Duration::from_secs(10), async || {
        last = scrape(controller).await?;
        let ours = |series: &String| {
            series.starts_with("chaperone_controller_agent_sidecars")
                && series.contains(&format!("namespace=\"{ns}\""))
        };
        let unexpected = last
            .keys()
            .filter(|s| ours(s) && !expected.contains_key(*s))
            .count();
        let matches = expected.iter().all(|(s, v)| last.get(s) == Some(v));
        Ok((matches && unexpected == 0).then_some(()))
    })
    .await;
    if outcome.is_err() {
        let differences: Vec<String> = expected
            .iter()
            .filter(|(s, v)| last.get(*s) != Some(*v))
            .map(|(s, v)| format!("{s}: expected {v}, got {:?}", last.get(s)))
            .collect();
        bail!("gauges differ from what is connected: {differences:#?}\n/metrics:\n{last:#?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_gauges_equal_the_streams_connected_through_reconnects_and_disconnects()
-> Result<()> {
    let controller = own_controller("gauges").await?;
    let endpoint = controller.snapshot_endpoint()?;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "metrics").await?;
    for name in ["alpha", "beta"] {
        apply::<AgentIdentity>(&client, &ns, agent(name)).await?;
        apply::<ToolPolicy>(&client, &ns, policy(name)).await?;
    }
    let token = async |agent: &str, i: usize| {
        pod_token(
            &client,
            &ns,
            agent,
            &format!("{agent}-{i}"),
            SIDECAR_AUDIENCE,
        )
        .await
    };
    let mut alpha_tokens = Vec::new();
    for i in 0..6 {
        alpha_tokens.push(token("alpha", i).await?);
    }
    let mut beta_tokens = Vec::new();
    for i in 0..4 {
        beta_tokens.push(token("beta", i).await?);
    }
    let tool_token = tool_pod_token(&client, &ns, "orders", "orders-0", SIDECAR_AUDIENCE).await?;

    // All at once, as a rollout does: alpha-0..3 and beta-0..1 ACK their
    // snapshot, the others never do.
    let connects = alpha_tokens
        .iter()
        .enumerate()
        .map(|(i, t)| connect(&endpoint, t, "get_order", i < 4))
        .chain(
            beta_tokens
                .iter()
                .enumerate()
                .map(|(i, t)| connect(&endpoint, t, "get_order", i < 2)),
        );
    let mut sidecars = futures_util::future::try_join_all(connects).await?;
    let mut beta: Vec<SidecarStandIn> = sidecars.split_off(6);
    let mut alpha = sidecars;
    let tool = SidecarStandIn::connect(&endpoint, &tool_token).await?;

    let mut expected = BTreeMap::from([
        ("chaperone_controller_sidecars_connected".to_owned(), 10.0),
        (
            "chaperone_controller_tool_sidecars_connected".to_owned(),
            1.0,
        ),
        (
            per_agent(
                "chaperone_controller_agent_sidecars_connected",
                &ns,
                "alpha",
            ),
            6.0,
        ),
        (
            per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "alpha"),
            4.0,
        ),
        (
            per_agent("chaperone_controller_agent_sidecars_connected", &ns, "beta"),
            4.0,
        ),
        (
            per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "beta"),
            2.0,
        ),
    ]);
    expect_gauges(&controller, &ns, &expected).await?;

    // alpha-4 and beta-3 reconnect (ACKing this time) while their old streams
    // stay open, as after a network partition: one sidecar each, still.
    let alpha_4_old = std::mem::replace(
        &mut alpha[4],
        connect(&endpoint, &alpha_tokens[4], "get_order", true).await?,
    );
    let beta_3_old = std::mem::replace(
        &mut beta[3],
        connect(&endpoint, &beta_tokens[3], "get_order", true).await?,
    );
    expected.insert(
        per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "alpha"),
        5.0,
    );
    expected.insert(
        per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "beta"),
        3.0,
    );
    expect_gauges(&controller, &ns, &expected).await?;

    // The replaced streams close (the new ones stay), alpha-5 and beta-0 go
    // away, and the tool sidecar too.
    drop((alpha_4_old, beta_3_old));
    drop(alpha.remove(5));
    drop(beta.remove(0));
    drop(tool);
    expected.extend([
        ("chaperone_controller_sidecars_connected".to_owned(), 8.0),
        (
            "chaperone_controller_tool_sidecars_connected".to_owned(),
            0.0,
        ),
        (
            per_agent(
                "chaperone_controller_agent_sidecars_connected",
                &ns,
                "alpha",
            ),
            5.0,
        ),
        (
            per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "alpha"),
            5.0,
        ),
        (
            per_agent("chaperone_controller_agent_sidecars_connected", &ns, "beta"),
            3.0,
        ),
        (
            per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "beta"),
            2.0,
        ),
    ]);
    expect_gauges(&controller, &ns, &expected).await?;

    // A policy edit: until they ACK the new snapshot, none is in sync.
    let mut edited = policy("alpha");
    edited["spec"]["rules"][0]["tools"][0]["name"] = json!("list_orders");
    apply::<ToolPolicy>(&client, &ns, edited).await?;
    for sidecar in &mut alpha[..2] {
        let update = sidecar.next_snapshot(Duration::from_secs(10)).await?;
        sidecar.ack(&update).await?;
    }
    expected.insert(
        per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "alpha"),
        2.0,
    );
    expect_gauges(&controller, &ns, &expected).await?;

    // Everyone leaves: zeros, and the agents' series stay while they exist.
    drop((alpha, beta));
    for value in expected.values_mut() {
        *value = 0.0;
    }
    expect_gauges(&controller, &ns, &expected).await?;

    // The counters beside: every ACK of the snapshot last sent (six, two
    // after the reconnects, two after the edit), snapshots never answered,
    // the ToolPolicy edits reconciled; no approvals; the build.
    let samples = scrape(&controller).await?;
    let value = |series: &str| samples.get(series).copied().unwrap_or_default();
    assert_eq!(
        value("chaperone_controller_snapshot_pushes_total{result=\"ack\"}"),
        10.0,
        "{samples:#?}"
    );
    assert_eq!(
        value("chaperone_controller_snapshot_pushes_total{result=\"nack\"}"),
        0.0
    );
    assert!(value("chaperone_controller_snapshot_pushes_total{result=\"unanswered\"}") >= 3.0);
    assert!(
        value("chaperone_controller_reconciles_total{kind=\"ToolPolicy\",result=\"changed\"}")
            >= 1.0,
        "{samples:#?}"
    );
    assert_eq!(
        samples.get("chaperone_controller_approvals{phase=\"pending\"}"),
        Some(&0.0)
    );
    assert!(
        samples
            .keys()
            .any(|s| s.starts_with("chaperone_build_info{") && s.contains("controller"))
    );
    controller.stop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_agents_series_leave_the_metrics() -> Result<()> {
    let controller = own_controller("removal").await?;
    let endpoint = controller.snapshot_endpoint()?;
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "metrics-gone").await?;
    apply::<AgentIdentity>(&client, &ns, agent("gamma")).await?;
    apply::<AgentIdentity>(&client, &ns, agent("delta")).await?;
    let token = pod_token(&client, &ns, "gamma", "gamma-0", SIDECAR_AUDIENCE).await?;
    let _gamma = connect(&endpoint, &token, "", true).await?;
    let connected = per_agent(
        "chaperone_controller_agent_sidecars_connected",
        &ns,
        "gamma",
    );
    let in_sync = per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "gamma");
    let delta = per_agent(
        "chaperone_controller_agent_sidecars_connected",
        &ns,
        "delta",
    );
    let expected = BTreeMap::from([
        (connected.clone(), 1.0),
        (in_sync.clone(), 1.0),
        (delta.clone(), 0.0),
        (
            per_agent("chaperone_controller_agent_sidecars_in_sync", &ns, "delta"),
            0.0,
        ),
    ]);
    expect_gauges(&controller, &ns, &expected).await?;

    Api::<AgentIdentity>::namespaced(client.clone(), &ns)
        .delete("gamma", &DeleteParams::default())
        .await?;
    eventually(Duration::from_secs(10), async || {
        let samples = scrape(&controller).await?;
        let gamma_left = samples.keys().all(|s| {
            !(s.contains(&format!("namespace=\"{ns}\"")) && s.contains("agent=\"gamma\""))
        });
        Ok((gamma_left && samples.contains_key(&delta)).then_some(()))
    })
    .await
    .context("gamma's series stayed after its AgentIdentity was deleted")?;
    controller.stop()
}
