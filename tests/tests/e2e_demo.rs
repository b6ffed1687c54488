//! `make demo` end to end: the README's first command keeps working. The test
//! runs `scripts/demo.sh` as a user does (the tools from `make tools`, its own
//! control plane, the workspace's binaries, which it builds) and checks that
//! it reaches its last scene with each scene's proof on the way: calls
//! refused by policy, a refund approved by a person, the delegation trail
//! verified with the audit-key archive after both sidecars stopped, a changed
//! tool pinned again.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

#[test]
fn the_demo_runs_to_its_end() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?;
    let out = Command::new("timeout")
        .args(["900", "bash", "scripts/demo.sh"])
        .current_dir(root)
        .env_remove("DEMO_HOLD")
        .output()
        .context("running scripts/demo.sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = |text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    assert!(
        out.status.success(),
        "scripts/demo.sh exited {:?}\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}",
        out.status.code(),
        tail(&stdout),
        tail(&stderr)
    );
    // chaperonectl's summaries go to stderr.
    let all = format!("{stdout}{stderr}");
    for scene in [
        "Chaperone denied this call",
        "was denied by alice",
        "archived keys of pods in default",
        "closed by its final checkpoint",
        "pinned 1 tool of agentidentity support-agent",
        "== Done;",
    ] {
        assert!(
            all.contains(scene),
            "no {scene:?} in the demo's output:\n{}",
            tail(&all)
        );
    }
    Ok(())
}
