//! What a pod's sidecar is for, as both the injection webhook and the
//! snapshot stream's authentication read it: the pod's `chaperone.dev/inject`
//! annotation. Pure. (Which agent a pod is: `AgentSelector::selects`, beside
//! the selector type in `chaperone_policy::model`.)

use std::collections::BTreeMap;

/// Pod annotation that asks for injection: `"true"` (an agent), `"tool"` (inbound
/// only, in front of a tool server) or `"false"` (never, even when the namespace
/// asks for it).
pub const INJECT_ANNOTATION: &str = "chaperone.dev/inject";

/// The value of [`INJECT_ANNOTATION`] among `annotations`, trimmed and
/// lowercased (`" Tool "` reads as `"tool"`); `None` when absent.
pub fn inject_annotation(annotations: Option<&BTreeMap<String, String>>) -> Option<String> {
    annotations
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .map(|v| v.trim().to_ascii_lowercase())
}
