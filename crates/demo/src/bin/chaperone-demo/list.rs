//! `chaperone-demo list`: a tool server's tools as the agent sees them through
//! its sidecar (`tools/list` in one MCP session), with the first line of each
//! description: what a model would be offered.

use crate::agent::connect_to;

/// Lists `server`'s tools through `sidecar` and prints one line per tool.
pub async fn run(sidecar: &str, server: &str) -> anyhow::Result<()> {
    let client = connect_to(sidecar, server).await?;
    let tools = client.list_all_tools().await;
    let _ = client.cancel().await;
    let tools = tools?;
    if tools.is_empty() {
        println!("  (no tools offered)");
    }
    for tool in tools {
        let description = tool.description.as_deref().unwrap_or_default();
        let first_line = description.lines().next().unwrap_or_default();
        println!("  {server}/{:<14} {first_line}", tool.name);
    }
    Ok(())
}
