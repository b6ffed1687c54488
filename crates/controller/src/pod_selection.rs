//! Which agent a pod is and what its sidecar is for, as both the injection
//! webhook and the snapshot stream's authentication read it: the
//! AgentIdentity selector's predicate over a pod, and the pod's
//! `chaperone.dev/inject` annotation. Pure.
//!
//! The selector type itself is `chaperone_policy::model::AgentSelector`; the
//! predicate is kept here, beside its two readers, so that neither reaches
//! into the other.

use std::collections::BTreeMap;

use chaperone_policy::model::AgentSelector;

/// Pod annotation that asks for injection: `"true"` (an agent), `"tool"` (inbound
/// only, in front of a tool server) or `"false"` (never, even when the namespace
/// asks for it).
pub const INJECT_ANNOTATION: &str = "chaperone.dev/inject";

/// Whether `selector` selects a pod running as `service_account` with `labels`
/// (same namespace assumed): the ServiceAccount matches and the pod carries
/// every label of `matchLabels`.
pub fn selects(
    selector: &AgentSelector,
    service_account: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.service_account_name == service_account
        && selector
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
}

/// The value of [`INJECT_ANNOTATION`] among `annotations`, trimmed and
/// lowercased (`" Tool "` reads as `"tool"`); `None` when absent.
pub fn inject_annotation(annotations: Option<&BTreeMap<String, String>>) -> Option<String> {
    annotations
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .map(|v| v.trim().to_ascii_lowercase())
}
