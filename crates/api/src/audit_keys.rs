//! The audit-key archive on the cluster: the names and the entry format the
//! controller writes and `chaperonectl audit keys` reads, defined once.
//!
//! The controller's JWKS (`/.well-known/jwks.json`) lists the keys of the
//! agent sidecars connected now: it verifies assertions, so a key leaves it
//! when its pod goes. An audit trail is verified later, often after its pods
//! are gone, and tool-mode sidecars' keys never enter that JWKS at all. So
//! the controller also keeps the public key of every sidecar connected to it,
//! agent and tool mode, for a retention period, apart from that JWKS:
//!
//! - in ConfigMaps in the controller's own namespace (never the agents': who
//!   may edit ConfigMaps in an agent's namespace must not be able to plant a
//!   key that verifies a forged trail), one per UTC month and agent namespace
//!   ([`config_map_name`]), labelled [`COMPONENT_LABEL`], [`MONTH_LABEL`] and
//!   [`NAMESPACE_LABEL`] (a few hundred objects for a year of a hundred
//!   namespaces), and split into further shards near the 1 MiB size
//!   limit of a ConfigMap ([`MAX_DATA_BYTES`]);
//! - one data entry per key, named by its `kid`, holding an [`ArchivedKey`]
//!   as JSON: a JWK whose `use` is [`KEY_USE`] (not `sig`: a JWT library
//!   handed this archive as a JWKS by mistake must not verify assertions with
//!   the keys of stopped sidecars or of tool-mode sidecars), with the pod it
//!   was registered by;
//! - a sidecar's key is written into the ConfigMap of every month it is
//!   connected in, and a ConfigMap is deleted once the last day of its month
//!   is older than the retention, so a key is kept for at least the
//!   retention after its sidecar last ran.
//!
//! [`archive_jwks`] joins the entries of such ConfigMaps into one JWKS for
//! `chaperonectl audit verify --jwks`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The label (and its value) that marks the archive's ConfigMaps.
pub const COMPONENT_LABEL: (&str, &str) = ("app.kubernetes.io/component", "audit-keys");
/// Label: the UTC month (`YYYY-MM`) whose keys a ConfigMap holds.
pub const MONTH_LABEL: &str = "chaperone.dev/audit-key-month";
/// Label: the namespace of the pods whose keys a ConfigMap holds.
pub const NAMESPACE_LABEL: &str = "chaperone.dev/audit-key-namespace";
/// The `use` of an archived JWK: keys for verifying audit checkpoints only.
pub const KEY_USE: &str = "chaperone-audit";
/// At most this many bytes of entries per ConfigMap (the API server refuses
/// objects over 1 MiB; the rest is left for names and metadata).
pub const MAX_DATA_BYTES: usize = 900 * 1024;

/// The name of shard `shard` of the ConfigMap of `month` (`YYYY-MM`) for the
/// pods of `namespace`. Dots separate the parts: a namespace has none, so two
/// (month, namespace, shard) never share a name.
pub fn config_map_name(month: &str, namespace: &str, shard: u32) -> String {
    match shard {
        0 => format!("chaperone-audit-keys.{month}.{namespace}"),
        _ => format!("chaperone-audit-keys.{month}.{namespace}.{shard}"),
    }
}

/// Which kind of sidecar registered an archived key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    /// An agent's sidecar (`chaperone.dev/inject: "true"`).
    Agent,
    /// A sidecar in front of a tool server (`chaperone.dev/inject: "tool"`).
    Tool,
}

/// One archived key: an Ed25519 public JWK and the pod that registered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedKey {
    /// `OKP`.
    pub kty: String,
    /// `Ed25519`.
    pub crv: String,
    /// `EdDSA`.
    pub alg: String,
    /// [`KEY_USE`].
    #[serde(rename = "use")]
    pub key_use: String,
    /// The key id the sidecar signs its checkpoints with.
    pub kid: String,
    /// The public key, unpadded base64url.
    pub x: String,
    /// `namespace/pod` of the sidecar (what the verifier matches records against).
    #[serde(rename = "chaperone.dev/pod")]
    pub pod: String,
    /// The pod's uid (a pod re-created under the same name has another).
    #[serde(rename = "chaperone.dev/podUid")]
    pub pod_uid: String,
    /// `namespace/name` of the agent's AgentIdentity; absent for a tool-mode sidecar.
    #[serde(
        rename = "chaperone.dev/agent",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub agent: Option<String>,
    /// Which kind of sidecar it is.
    #[serde(rename = "chaperone.dev/sidecar")]
    pub sidecar: SidecarMode,
}

impl ArchivedKey {
    /// The entry of the Ed25519 key `x` (unpadded base64url) registered as
    /// `kid` by pod `namespace/pod` (uid `pod_uid`) of `agent`
    /// (`namespace/name`; `None` for a tool-mode sidecar).
    pub fn new(
        kid: &str,
        x: &str,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
        agent: Option<String>,
    ) -> Self {
        Self {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            alg: "EdDSA".into(),
            key_use: KEY_USE.into(),
            kid: kid.into(),
            x: x.into(),
            pod: format!("{namespace}/{pod}"),
            pod_uid: pod_uid.into(),
            sidecar: if agent.is_some() {
                SidecarMode::Agent
            } else {
                SidecarMode::Tool
            },
            agent,
        }
    }

    /// The ConfigMap data value of this entry.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What [`archive_jwks`] made of a set of archive ConfigMaps.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchivedJwks {
    /// `{"keys": [...]}`: each archived key once, ordered by `kid`.
    pub jwks: Value,
    /// What could not be used or does not add up, one sentence each: an
    /// entry that is not an archived key, a `kid` archived for two keys or
    /// pods (both are kept: `chaperonectl audit verify` then refuses the
    /// JWKS, naming the kid).
    pub problems: Vec<String>,
}

/// Joins the entries of archive ConfigMaps, given as (name, data), into one
/// JWKS: a key archived in several months appears once.
pub fn archive_jwks<'a>(
    config_maps: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
) -> ArchivedJwks {
    let mut by_kid: BTreeMap<String, Vec<(ArchivedKey, &'a str)>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, data) in config_maps {
        for (entry, text) in data {
            let key = match serde_json::from_str::<ArchivedKey>(text) {
                Ok(key) if key.kid == *entry => key,
                Ok(key) => {
                    problems.push(format!(
                        "{name}: entry {entry:?} holds the key of kid {:?}; left out",
                        key.kid
                    ));
                    continue;
                }
                Err(error) => {
                    problems.push(format!(
                        "{name}: entry {entry:?} is not an archived key ({error}); left out"
                    ));
                    continue;
                }
            };
            let same_kid = by_kid.entry(key.kid.clone()).or_default();
            if let Some((first, first_in)) = same_kid.first()
                && (first.x != key.x || first.pod != key.pod)
            {
                problems.push(format!(
                    "kid {:?} is archived for {} ({first_in}) and for {} ({name}): a pod registered a key under another key's kid or another pod's key; both are listed, so a verification with this JWKS refuses the kid",
                    key.kid, first.pod, key.pod
                ));
            }
            if !same_kid
                .iter()
                .any(|(known, _)| known.x == key.x && known.pod == key.pod)
            {
                same_kid.push((key, name));
            }
        }
    }
    let keys: Vec<Value> = by_kid
        .into_values()
        .flatten()
        .map(|(key, _)| serde_json::to_value(key).unwrap_or_default())
        .collect();
    ArchivedJwks {
        jwks: json!({ "keys": keys }),
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(keys: &[&ArchivedKey]) -> BTreeMap<String, String> {
        keys.iter().map(|k| (k.kid.clone(), k.to_json())).collect()
    }

    #[test]
    fn names_never_collide_across_namespaces_and_shards() {
        assert_eq!(
            config_map_name("2026-12", "team-a", 0),
            "chaperone-audit-keys.2026-12.team-a"
        );
        assert_eq!(
            config_map_name("2026-12", "team-a", 2),
            "chaperone-audit-keys.2026-12.team-a.2"
        );
        // A namespace ending in a number is not a shard of another.
        assert_ne!(
            config_map_name("2026-12", "team-2", 0),
            config_map_name("2026-12", "team", 2)
        );
    }

    #[test]
    fn an_entry_is_a_jwk_for_audit_only_naming_its_pod() {
        let agent = ArchivedKey::new(
            "k1",
            "xx",
            "ns",
            "planner-0",
            "uid-1",
            Some("ns/planner".into()),
        );
        let value: Value = serde_json::from_str(&agent.to_json()).unwrap();
        assert_eq!(value["use"], "chaperone-audit");
        assert_eq!(value["kty"], "OKP");
        assert_eq!(value["crv"], "Ed25519");
        assert_eq!(value["chaperone.dev/pod"], "ns/planner-0");
        assert_eq!(value["chaperone.dev/agent"], "ns/planner");
        assert_eq!(value["chaperone.dev/sidecar"], "agent");
        let tool = ArchivedKey::new("k2", "yy", "ns", "orders-0", "uid-2", None);
        let value: Value = serde_json::from_str(&tool.to_json()).unwrap();
        assert_eq!(value.get("chaperone.dev/agent"), None);
        assert_eq!(value["chaperone.dev/sidecar"], "tool");
        assert_eq!(
            serde_json::from_str::<ArchivedKey>(&tool.to_json()).unwrap(),
            tool
        );
    }

    #[test]
    fn a_key_archived_in_several_months_is_listed_once() {
        let a = ArchivedKey::new("k1", "xx", "ns", "p", "u", None);
        let b = ArchivedKey::new("k2", "yy", "ns", "q", "v", Some("ns/agent".into()));
        let (m1, m2) = (data(&[&a, &b]), data(&[&a]));
        let archived = archive_jwks([("m1", &m1), ("m2", &m2)]);
        assert!(archived.problems.is_empty(), "{:?}", archived.problems);
        let kids: Vec<&str> = archived.jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids, ["k1", "k2"]);
    }

    #[test]
    fn a_kid_archived_for_two_pods_is_listed_twice_and_reported() {
        let victim = ArchivedKey::new("k1", "xx", "ns", "victim", "u1", None);
        let claimant = ArchivedKey::new("k1", "xx", "ns", "claimant", "u2", None);
        let (m1, m2) = (data(&[&victim]), data(&[&claimant]));
        let archived = archive_jwks([("m1", &m1), ("m2", &m2)]);
        assert_eq!(archived.jwks["keys"].as_array().unwrap().len(), 2);
        assert_eq!(archived.problems.len(), 1, "{:?}", archived.problems);
        assert!(
            archived.problems[0].contains("ns/victim (m1)"),
            "{:?}",
            archived.problems
        );
        assert!(
            archived.problems[0].contains("ns/claimant (m2)"),
            "{:?}",
            archived.problems
        );
    }

    #[test]
    fn entries_that_are_not_archived_keys_are_reported_and_left_out() {
        let good = ArchivedKey::new("k1", "xx", "ns", "p", "u", None);
        let mut map = data(&[&good]);
        map.insert("k2".into(), "{not json".into());
        map.insert("k3".into(), good.to_json());
        let archived = archive_jwks([("cm", &map)]);
        assert_eq!(archived.jwks["keys"].as_array().unwrap().len(), 1);
        assert_eq!(archived.problems.len(), 2, "{:?}", archived.problems);
        assert!(archived.problems[0].contains("\"k2\" is not an archived key"));
        assert!(archived.problems[1].contains("\"k3\" holds the key of kid \"k1\""));
    }
}
