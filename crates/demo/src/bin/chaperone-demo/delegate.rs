//! The delegation part of the demo (examples/delegation): the planner hands
//! billing work to the billing worker. Each call goes planner → planner's
//! sidecar → worker's sidecar (inbound: assertion and DelegationGrant checked) →
//! worker app → worker's sidecar (decided as a delegated call) → billing; the
//! table shows what the worker's sidecar decided, with the chain.

use std::path::Path;

use anyhow::{Context as _, bail};
use rmcp::model::{CallToolRequestParams, JsonObject};
use serde_json::{Value, json};

use crate::agent::{audit_records, connect_to, decision_of, text_of};

/// One delegated call: the billing tool, its arguments, the expected decision.
const SCRIPT: [(&str, &str, &str); 4] = [
    ("get_invoice", r#"{"invoice":"INV-1001"}"#, "allow"),
    (
        "issue_credit",
        r#"{"invoice":"INV-1001","amount":150}"#,
        "allow",
    ),
    (
        "issue_credit",
        r#"{"invoice":"INV-1001","amount":300}"#,
        "deny",
    ),
    ("void_invoice", r#"{"invoice":"INV-1001"}"#, "deny"),
];

/// Runs the delegated calls through the planner's sidecar at `sidecar`,
/// reading the worker sidecar's decisions from `worker_audit`.
pub async fn run(sidecar: &str, worker_audit: &Path) -> anyhow::Result<()> {
    let worker = connect_to(sidecar, "billing-worker").await?;
    let width = 62;
    println!(
        "{:<width$} | {:<8} | rule",
        "planner → billing-worker → billing", "decision"
    );
    println!(
        "{}-+-{}-+-{}",
        "-".repeat(width),
        "-".repeat(8),
        "-".repeat(40)
    );
    let mut surprises = Vec::new();
    for (tool, args, expect) in SCRIPT {
        let arguments: Value = serde_json::from_str(args)?;
        let label = format!("billing/{tool}({})", &args[1..args.len() - 1]);
        let before = audit_records(worker_audit)?.len();
        let mut params = JsonObject::new();
        params.insert("tool".into(), json!(tool));
        params.insert("arguments".into(), arguments);
        worker
            .call_tool(CallToolRequestParams::new("run_billing").with_arguments(params))
            .await
            .with_context(|| format!("calling the billing worker for {tool}"))?;
        let record = decision_of(worker_audit, before, "billing", tool).await?;
        let (decision, rule, chain) = match &record {
            Some(r) => (
                text_of(&r["decision"]),
                text_of(&r["rule"]),
                r["chain"]
                    .as_array()
                    .map(|c| c.iter().map(text_of).collect::<Vec<_>>().join(" → "))
                    .unwrap_or_default(),
            ),
            None => ("?".into(), "no audit record".into(), String::new()),
        };
        println!("{label:<width$} | {decision:<8} | {rule}   (chain {chain})");
        if decision != expect {
            surprises.push(format!("{label}: expected {expect}, got {decision}"));
        }
    }
    let _ = worker.cancel().await;
    if !surprises.is_empty() {
        bail!("unexpected decisions:\n  {}", surprises.join("\n  "));
    }
    Ok(())
}
