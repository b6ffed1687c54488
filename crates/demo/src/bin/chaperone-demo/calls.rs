//! `chaperone-demo calls`: a few tool calls in one MCP session through the
//! sidecar, each printed with its outcome and how long it took (a call held
//! for a person's approval takes as long as the person).

use std::time::Instant;

use anyhow::{Context as _, bail};
use rmcp::model::{CallToolRequestParams, JsonObject};
use serde_json::Value;

use crate::agent::connect_to;

/// One call, as given on the command line: `TOOL` or `TOOL {"json": "arguments"}`.
fn parse_call(text: &str) -> anyhow::Result<(String, JsonObject)> {
    let (tool, arguments) = match text.split_once(' ') {
        Some((tool, json)) => (tool, json.trim()),
        None => (text, "{}"),
    };
    let arguments: Value = serde_json::from_str(arguments)
        .with_context(|| format!("the arguments of {tool:?} are not JSON: {arguments}"))?;
    let Value::Object(arguments) = arguments else {
        bail!("the arguments of {tool:?} must be a JSON object");
    };
    Ok((tool.to_owned(), arguments))
}

/// Makes `calls` in order in one session with `server` through `sidecar`.
/// Prints `ok` or `refused` with the tool's text or the error; fails only when
/// the session cannot be opened or a call cannot be parsed.
pub async fn run(sidecar: &str, server: &str, calls: &[String]) -> anyhow::Result<()> {
    let calls: Vec<(String, JsonObject)> = calls
        .iter()
        .map(|c| parse_call(c))
        .collect::<anyhow::Result<_>>()?;
    let client = connect_to(sidecar, server).await?;
    for (tool, arguments) in calls {
        println!("  → {server}/{tool} {}", Value::Object(arguments.clone()));
        let started = Instant::now();
        let outcome = client
            .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
            .await;
        let took = started.elapsed().as_secs_f32();
        match outcome {
            Ok(result) if result.is_error != Some(true) => {
                let text: Vec<String> = result
                    .content
                    .iter()
                    .filter_map(|c| c.as_text().map(|t| t.text.clone()))
                    .collect();
                println!("    ok after {took:.1}s: {}", text.join(" "));
            }
            Ok(result) => println!("    tool error after {took:.1}s: {:?}", result.content),
            Err(error) => println!("    refused after {took:.1}s: {error}"),
        }
    }
    let _ = client.cancel().await;
    Ok(())
}
