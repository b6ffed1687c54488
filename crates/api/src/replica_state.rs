//! The controller replicas' published state on the cluster: the names and the
//! `sidecars.json` format the controller writes and `chaperonectl status` /
//! `version` / `check` read, defined once.
//!
//! Each controller replica keeps one ConfigMap [`config_map_name`]`(pod)` in
//! its own namespace, labelled [`COMPONENT_LABEL`], with the data keys
//! [`KEYS_KEY`], [`SIDECARS_KEY`] (a JSON list of [`PublishedSidecar`]),
//! [`TOOL_SIDECARS_KEY`] (a JSON list of [`PublishedToolSidecar`]),
//! [`DEFINITIONS_KEY`], [`HEARTBEAT_KEY`] (unix seconds of its last write)
//! and [`VERSION_KEY`] (the replica's build). A replica whose heartbeat is
//! older than [`MAX_AGE`] seconds has stopped.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The label (and its value) that marks the replicas' ConfigMaps.
pub const COMPONENT_LABEL: (&str, &str) = ("app.kubernetes.io/component", "replica-state");
/// A ConfigMap whose heartbeat is older than this (seconds) counts for nothing.
pub const MAX_AGE: i64 = 120;
/// Data key: the JWKS entries of the replica's sidecars' keys.
pub const KEYS_KEY: &str = "keys.json";
/// Data key: the replica's agent sidecars, a JSON list of [`PublishedSidecar`].
pub const SIDECARS_KEY: &str = "sidecars.json";
/// Data key: the replica's tool-mode sidecars, a JSON list of
/// [`PublishedToolSidecar`]; absent from replicas older than this key. Only
/// `chaperonectl` reads it: replicas share agent sidecars only.
pub const TOOL_SIDECARS_KEY: &str = "tool-sidecars.json";
/// Data key: tool definition texts by hash.
pub const DEFINITIONS_KEY: &str = "definitions.json";
/// Data key: when the replica last wrote, unix seconds.
pub const HEARTBEAT_KEY: &str = "heartbeat";
/// Data key: the replica's build (`chaperone_build_info`'s version); absent
/// from replicas older than this key.
pub const VERSION_KEY: &str = "version";

/// The name of the sidecar container the injection webhook adds to a pod
/// (a native sidecar: an init container with `restartPolicy: Always`);
/// `chaperonectl status` finds injected pods by it.
pub const SIDECAR_CONTAINER: &str = "chaperone-proxy";

/// The ConfigMap a replica named `pod_name` publishes.
pub fn config_map_name(pod_name: &str) -> String {
    format!("chaperone-replica-{pod_name}")
}

/// One agent sidecar as `sidecars.json` lists it. Fields added later are
/// optional, so that replicas of different builds read each other.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedSidecar {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid.
    pub pod_uid: String,
    /// `namespace/name` of its AgentIdentity.
    pub agent: String,
    /// The snapshot version it last acknowledged (runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_version: Option<u64>,
    /// That snapshot's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_hash: Option<String>,
    /// When it acknowledged it, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<i64>,
    /// The snapshot version it last rejected (NACK), if it has not
    /// acknowledged a later one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_version: Option<u64>,
    /// Why it rejected it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_error: Option<String>,
    /// The sidecar's build, from its hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_version: Option<String>,
    /// When its stream to this replica opened, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<i64>,
    /// Tools seen in tools/list: [server, tool].
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub tools: BTreeSet<(String, String)>,
    /// The definitions of those tools where pinning is on: [server, tool,
    /// hash, first seen (unix seconds)]; their texts are in
    /// [`DEFINITIONS_KEY`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub definitions: Vec<(String, String, String, i64)>,
}

/// One tool-mode sidecar (in front of a tool server) as
/// [`TOOL_SIDECARS_KEY`] lists it: it runs no snapshot, only key sets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedToolSidecar {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid.
    pub pod_uid: String,
    /// The sidecar's build, from its hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_version: Option<String>,
    /// When its stream to this replica opened, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_of_an_older_replica_without_the_new_fields_reads() {
        let old = r#"[{"namespace":"shop","pod":"clerk-1","podUid":"u1","agent":"shop/clerk","ackedVersion":3,"ackedHash":"h"}]"#;
        let read: Vec<PublishedSidecar> = serde_json::from_str(old).unwrap();
        assert_eq!(read[0].acked_version, Some(3));
        assert_eq!(read[0].sidecar_version, None);
        assert_eq!(read[0].acked_at, None);
    }
}
