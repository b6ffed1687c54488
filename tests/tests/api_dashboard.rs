//! The Grafana dashboard (`charts/chaperone/dashboards/chaperone.json`) and
//! the alerts (`charts/chaperone/alerts/chaperone.rules.yaml`) ask only for
//! metrics the binaries really expose: a controller on a real API server and
//! a sidecar that has decided a call and refused a request are scraped, and
//! every metric name in every PromQL expression of the dashboard and the
//! alerts must be among what they export (a histogram's `_bucket`, `_sum`
//! and `_count`, a counter's `_total`, as the exposition names them). Every
//! expression must also parse as PromQL (the dashboard's with Grafana's
//! variables filled in).

use std::collections::{BTreeMap, BTreeSet};

use std::time::Duration;

use anyhow::{Context, Result};
use chaperone_api::{AgentIdentity, ToolPolicy};
use chaperone_testenv::{
    ControlPlane,
    chart::chart_dir,
    create_namespace,
    kube_fixtures::{self, agent_identity, apply, tool_policy},
    sidecar_fixtures::{
        TestSidecar, eventually, http_get_async, http_request_async, json_post, status_code,
    },
};
use serde_json::{Value, json};

/// What one `/metrics` exposes: every sample's name, and the type of every
/// metric family (`# TYPE` lines, which name families with no sample yet).
#[derive(Debug, Default)]
struct Exposed {
    samples: BTreeSet<String>,
    types: BTreeMap<String, String>,
}

impl Exposed {
    fn parse(body: &str) -> Self {
        let mut exposed = Self::default();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = rest.split_once(' ') {
                    exposed.types.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                exposed.samples.insert(line[..end].to_owned());
            }
        }
        exposed
    }

    /// Whether `name`, as PromQL spells it, is exposed: a sample of that
    /// name, or a family whose type writes it.
    fn exposes(&self, name: &str) -> bool {
        if self.samples.contains(name) {
            return true;
        }
        let family_of = |suffix: &str, kinds: &[&str]| {
            name.strip_suffix(suffix)
                .and_then(|base| self.types.get(base))
                .is_some_and(|kind| kinds.contains(&kind.as_str()))
        };
        family_of("", &["gauge", "unknown"])
            || family_of("_total", &["counter"])
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| family_of(suffix, &["histogram"]))
    }
}

/// The body of `GET /metrics` on `port`.
async fn scrape(port: u16) -> Result<Exposed> {
    let response = http_get_async(port, "/metrics").await;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("no /metrics response")?;
    Ok(Exposed::parse(body))
}

/// Every `chaperone_…` metric name in `promql`.
fn metric_names(promql: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = promql.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut at = 0;
    while let Some(found) = promql[at..].find("chaperone_") {
        let start = at + found;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            names.push(promql[start..end].to_owned());
        }
        at = end;
    }
    names
}

/// Every PromQL string of the dashboard: panel targets' `expr`, template
/// variables' `query`/`definition`.
fn queries(dashboard: &Value, out: &mut Vec<String>) {
    match dashboard {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", Value::String(q)) => out.push(q.clone()),
                    ("query", Value::String(q)) if q.contains("chaperone_") => out.push(q.clone()),
                    _ => queries(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| queries(item, out)),
        _ => {}
    }
}

/// Every alert's `expr` in the Prometheus rules file at `path`, with its name.
fn alert_expressions(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let rules: Value = serde_saphyr::from_str(&std::fs::read_to_string(path)?)
        .with_context(|| format!("{} is not YAML", path.display()))?;
    let mut out = Vec::new();
    for group in rules["groups"].as_array().context("no groups")? {
        for rule in group["rules"].as_array().context("a group without rules")? {
            let name = rule["alert"].as_str().context("a rule without alert")?;
            let expr = rule["expr"].as_str().context("a rule without expr")?;
            out.push((name.to_owned(), expr.to_owned()));
        }
    }
    Ok(out)
}

/// `query` with the dashboard's Grafana variables filled in, as Grafana
/// sends it to Prometheus.
fn as_sent(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$namespace", ".+")
}

/// A sidecar of a new AgentIdentity, on the controller's snapshot stream
/// (so the controller pushes, and the sidecar ACKs, a snapshot), that has
/// denied one call and refused one unparseable request (both answered
/// without a tool server).
async fn busy_sidecar(controller: &kube_fixtures::InProcessController) -> Result<TestSidecar> {
    let client = ControlPlane::shared().client().await?;
    let ns = create_namespace(&client, "dashboard").await?;
    apply::<AgentIdentity>(
        &client,
        &ns,
        agent_identity(
            "dashboard-agent",
            json!({
                "selector": { "serviceAccountName": "dashboard-agent" },
                "toolServers": [{ "name": "shop", "url": "http://127.0.0.1:9/mcp" }]
            }),
        ),
    )
    .await?;
    apply::<ToolPolicy>(
        &client,
        &ns,
        tool_policy(
            "support",
            json!({
                "targetRefs": [{ "name": "dashboard-agent" }],
                "rules": [{ "name": "allow-get-order", "action": "allow", "tools": [{ "server": "shop", "name": "get_order" }] }]
            }),
        ),
    )
    .await?;
    let token = kube_fixtures::pod_token(
        &client,
        &ns,
        "dashboard-agent",
        "dashboard-agent-0",
        kube_fixtures::SIDECAR_AUDIENCE,
    )
    .await?;
    let sidecar = controller.sidecar("dashboard-agent-0", &token).await?;
    // The AgentIdentity alone may be published first: wait for the rule.
    eventually(Duration::from_secs(20), async || {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all","arguments":{}}}"#;
        let answer = http_request_async(sidecar.proxy_port, json_post("/shop", &[], body)).await;
        Ok(answer.contains("no rule allows").then_some(()))
    })
    .await
    .context("the sidecar never denied a call by its controller's snapshot")?;
    let answer = http_request_async(sidecar.proxy_port, json_post("/shop", &[], "{not json")).await;
    assert!(status_code(&answer) / 100 == 4, "{answer}");
    Ok(sidecar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_name_only_metrics_the_binaries_expose() -> Result<()> {
    let name = format!("dashboard-{}", std::process::id());
    let controller = tokio::task::spawn_blocking(move || {
        kube_fixtures::start_controller(ControlPlane::shared(), &name)
    })
    .await?;
    let sidecar = busy_sidecar(&controller).await?;
    // The ACK of the snapshot reaches the controller's counters.
    let from_controller = eventually(Duration::from_secs(10), async || {
        let exposed = scrape(controller.admin_port).await?;
        Ok(exposed
            .samples
            .contains("chaperone_controller_snapshot_pushes_total")
            .then_some(exposed))
    })
    .await?;
    let from_sidecar = scrape(sidecar.admin_port).await?;
    let stop = controller.clone();
    tokio::task::spawn_blocking(move || stop.stop()).await??;

    let path = chart_dir().join("dashboards/chaperone.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut promql = Vec::new();
    queries(&dashboard, &mut promql);
    assert!(promql.len() > 10, "{promql:?}");
    let alerts = alert_expressions(&chart_dir().join("alerts/chaperone.rules.yaml"))?;
    assert!(alerts.len() >= 6, "{alerts:?}");
    let mut unparsed = Vec::new();
    for query in &promql {
        // Template variables' `label_values(…)` is Grafana's, not PromQL.
        if !query.starts_with("label_values(")
            && let Err(error) = promql_parser::parser::parse(&as_sent(query))
        {
            unparsed.push(format!("dashboard {query}: {error}"));
        }
    }
    for (alert, expr) in &alerts {
        if let Err(error) = promql_parser::parser::parse(expr) {
            unparsed.push(format!("alert {alert} {expr}: {error}"));
        }
    }
    assert!(
        unparsed.is_empty(),
        "PromQL that does not parse: {unparsed:#?}"
    );
    promql.extend(alerts.into_iter().map(|(_, expr)| expr));
    let mut missing = Vec::new();
    let mut named = BTreeSet::new();
    for query in &promql {
        let names = metric_names(query);
        assert!(
            !names.is_empty(),
            "a query naming no Chaperone metric: {query}"
        );
        for name in names {
            let exposed = if name.starts_with("chaperone_controller_") {
                from_controller.exposes(&name)
            } else if name.starts_with("chaperone_sidecar_") {
                from_sidecar.exposes(&name)
            } else {
                // `chaperone_build_info`: both binaries.
                from_controller.exposes(&name) && from_sidecar.exposes(&name)
            };
            if !exposed {
                missing.push(name.clone());
            }
            named.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the binaries do not expose: {missing:?}"
    );
    // The panels the README describes are there.
    for metric in [
        "chaperone_sidecar_decisions_total",
        "chaperone_sidecar_refused_total",
        "chaperone_sidecar_stage_duration_seconds_bucket",
        "chaperone_sidecar_upstream_duration_seconds_bucket",
        "chaperone_sidecar_sessions",
        "chaperone_sidecar_snapshot_version",
        "chaperone_controller_snapshot_version",
        "chaperone_controller_sidecars_connected",
        "chaperone_controller_agent_sidecars_in_sync",
        "chaperone_build_info",
    ] {
        assert!(named.contains(metric), "no panel queries {metric}");
    }
    // The alerts the README lists watch these.
    for metric in [
        "chaperone_sidecar_refused_total",
        "chaperone_sidecar_audit_dropped_total",
        "chaperone_controller_agent_sidecars_connected",
        "chaperone_controller_tools_blocked",
        "chaperone_controller_watch_errors_total",
    ] {
        assert!(named.contains(metric), "nothing queries {metric}");
    }
    // Decisions and refusals are real samples, not only families.
    for sample in [
        "chaperone_sidecar_decisions_total",
        "chaperone_sidecar_refused_total",
    ] {
        assert!(
            from_sidecar.samples.contains(sample),
            "{sample}: {:?}",
            from_sidecar.samples
        );
    }
    Ok(())
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(chaperone_sidecar_stage_duration_seconds_bucket{stage="decide"}[5m]))) / chaperone_build_info"#
        ),
        [
            "chaperone_sidecar_stage_duration_seconds_bucket",
            "chaperone_build_info"
        ]
    );
}

#[test]
fn the_promql_check_refuses_what_prometheus_would() {
    for bad in [
        "sum(rate(chaperone_sidecar_refused_total[5m])",
        "rate(chaperone_sidecar_refused_total)",
        "chaperone_sidecar_refused_total{reason=~no_snapshot}",
    ] {
        assert!(promql_parser::parser::parse(bad).is_err(), "{bad}");
    }
    let sent = as_sent(
        r#"sum by (reason) (rate(chaperone_sidecar_refused_total{namespace=~"$namespace"}[$__rate_interval]))"#,
    );
    assert!(promql_parser::parser::parse(&sent).is_ok(), "{sent}");
}

#[test]
fn exposition_names_are_matched_by_type_and_suffix() {
    let exposed = Exposed::parse(
        "# TYPE a_seconds histogram\n\
         a_seconds_bucket{le=\"1\"} 0\n\
         # TYPE b counter\n\
         b_total 3\n\
         # TYPE c gauge\n\
         c 1\n",
    );
    for name in ["a_seconds_bucket", "a_seconds_count", "b_total", "c"] {
        assert!(exposed.exposes(name), "{name}");
    }
    for name in ["a_seconds", "b", "c_total", "d", "c_bucket"] {
        assert!(!exposed.exposes(name), "{name}");
    }
}
