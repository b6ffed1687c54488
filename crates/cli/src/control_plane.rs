//! What the Chaperone control plane says of itself on the cluster, read for
//! `chaperonectl status`, `version` and `check`: each controller replica's
//! published state (the ConfigMaps `chaperone-replica-<pod>`, see
//! [`chaperone_api::replica_state`]) and the snapshot each AgentIdentity's
//! status says is current. A sidecar is in sync when the snapshot it
//! acknowledged has that hash, the predicate the controller's status writer
//! uses for `sidecarsInSync`.

use std::collections::BTreeMap;

use anyhow::Result;
use chaperone_api::AgentIdentity;
use chaperone_api::replica_state::{
    COMPONENT_LABEL, HEARTBEAT_KEY, MAX_AGE, PublishedSidecar, PublishedToolSidecar,
    SIDECAR_CONTAINER, SIDECARS_KEY, TOOL_SIDECARS_KEY, VERSION_KEY,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use crate::cluster::api_error;

/// Where the controller runs (`--controller-namespace`).
#[derive(clap::Args, Clone)]
pub struct ControllerArgs {
    /// The namespace the controller runs in (its Helm release's namespace).
    #[arg(
        long,
        global = true,
        value_name = "NAMESPACE",
        default_value = "chaperone-system"
    )]
    pub controller_namespace: String,
}

/// One controller replica, as its ConfigMap says.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    /// The replica's pod name.
    pub pod: String,
    /// Its build; `None` from a replica older than the `version` key.
    pub version: Option<String>,
    /// When it last wrote, unix seconds.
    pub heartbeat: i64,
    /// Whether its heartbeat is older than the controller's own limit
    /// ([`MAX_AGE`]): it stopped without its pod being deleted.
    pub stale: bool,
    /// Why its ConfigMap could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
    /// Its agent sidecars.
    #[serde(skip)]
    pub sidecars: Vec<PublishedSidecar>,
    /// Its tool-mode sidecars (none from a replica older than this list).
    #[serde(skip)]
    pub tool_sidecars: Vec<PublishedToolSidecar>,
}

/// Reads every replica's ConfigMap in `namespace`, sorted by pod.
pub async fn replicas(client: &Client, namespace: &str, now: i64) -> Result<Vec<Replica>> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let params =
        ListParams::default().labels(&format!("{}={}", COMPONENT_LABEL.0, COMPONENT_LABEL.1));
    let maps = api.list(&params).await.map_err(|err| {
        api_error(
            err,
            &format!("listing the controller replicas' ConfigMaps in {namespace}"),
        )
    })?;
    let mut out: Vec<Replica> = maps
        .items
        .iter()
        .map(|map| read_replica(map, now))
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    Ok(out)
}

/// One replica's ConfigMap; what cannot be read is named in `unreadable`.
pub fn read_replica(map: &ConfigMap, now: i64) -> Replica {
    let name = map.name_any();
    let pod = name
        .strip_prefix("chaperone-replica-")
        .unwrap_or(&name)
        .to_owned();
    let empty = BTreeMap::new();
    let data = map.data.as_ref().unwrap_or(&empty);
    let heartbeat = data.get(HEARTBEAT_KEY).and_then(|h| h.parse::<i64>().ok());
    let sidecars = data
        .get(SIDECARS_KEY)
        .map(|text| serde_json::from_str::<Vec<PublishedSidecar>>(text));
    let tool_sidecars = data
        .get(TOOL_SIDECARS_KEY)
        .map(|text| serde_json::from_str::<Vec<PublishedToolSidecar>>(text))
        .unwrap_or(Ok(Vec::new()));
    let unreadable = match (&heartbeat, &sidecars, &tool_sidecars) {
        (None, _, _) => Some(format!(
            "data key {HEARTBEAT_KEY} is missing or not a number"
        )),
        (_, None, _) => Some(format!("data key {SIDECARS_KEY} is missing")),
        (_, Some(Err(error)), _) => Some(format!("data key {SIDECARS_KEY} is invalid: {error}")),
        (_, _, Err(error)) => Some(format!("data key {TOOL_SIDECARS_KEY} is invalid: {error}")),
        _ => None,
    };
    let heartbeat = heartbeat.unwrap_or(0);
    Replica {
        pod,
        version: data.get(VERSION_KEY).cloned(),
        heartbeat,
        stale: now - heartbeat > MAX_AGE,
        unreadable,
        sidecars: sidecars.and_then(Result::ok).unwrap_or_default(),
        tool_sidecars: tool_sidecars.unwrap_or_default(),
    }
}

/// The snapshot each agent's sidecars should run: (version, hash) by
/// `namespace/name`, from the AgentIdentities' status.
pub async fn current_snapshots(client: &Client) -> Result<BTreeMap<String, (i64, String)>> {
    let agents = Api::<AgentIdentity>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|err| api_error(err, "listing agentidentities"))?;
    Ok(agents
        .items
        .iter()
        .filter_map(|agent| {
            let status = agent.status.as_ref()?;
            let current = (status.snapshot_version?, status.snapshot_hash.clone()?);
            Some((
                format!(
                    "{}/{}",
                    agent.namespace().unwrap_or_default(),
                    agent.name_any()
                ),
                current,
            ))
        })
        .collect())
}

/// Whether a sidecar runs the current snapshot of its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Sync {
    /// It acknowledged the current snapshot.
    Synced,
    /// It rejected the latest snapshot it was sent (NACK).
    Rejected,
    /// It runs an older snapshot (or none yet).
    Stale,
    /// The agent has no current snapshot (not compiled, or no status yet).
    Unknown,
    /// A tool-mode sidecar: it runs no snapshot.
    NotApplicable,
    /// An injected pod whose sidecar no live replica lists: not started yet,
    /// or it cannot reach or authenticate to the controller (its log says).
    Disconnected,
}

impl Sync {
    /// As the SYNC column shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Synced => "SYNCED",
            Self::Rejected => "NACKED",
            Self::Stale => "STALE",
            Self::Unknown => "UNKNOWN",
            Self::NotApplicable => "-",
            Self::Disconnected => "DISCONNECTED",
        }
    }
}

/// One sidecar, its replica and whether it runs its agent's current snapshot.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarRow {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod.
    pub pod: String,
    /// `namespace/name` of its AgentIdentity; none for a tool-mode sidecar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// `agent`, or `tool` (in front of a tool server).
    pub mode: &'static str,
    /// The controller replica it streams from.
    pub replica: String,
    /// The sidecar's build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_version: Option<String>,
    /// The snapshot version it runs (acknowledged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_version: Option<u64>,
    /// The agent's current snapshot version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<i64>,
    /// In sync or not.
    pub sync: Sync,
    /// When it acknowledged its snapshot, unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<i64>,
    /// When its stream opened, unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<i64>,
    /// The snapshot it rejected and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nack: Option<String>,
    /// Tools it saw in tools/list, `server/tool`.
    pub tools: Vec<String>,
}

/// Every sidecar the live replicas publish (a pod two replicas list, after
/// a reconnect, from the later heartbeat), with its sync state, sorted by
/// namespace and pod.
pub fn sidecar_rows(
    replicas: &[Replica],
    current: &BTreeMap<String, (i64, String)>,
) -> Vec<SidecarRow> {
    let mut live: Vec<&Replica> = replicas.iter().filter(|r| !r.stale).collect();
    live.sort_by_key(|r| r.heartbeat);
    let mut rows: BTreeMap<(String, String), SidecarRow> = BTreeMap::new();
    for replica in live {
        for sidecar in &replica.sidecars {
            let latest = current.get(&sidecar.agent);
            let sync = match (latest, &sidecar.acked_hash) {
                (None, _) => Sync::Unknown,
                (Some((_, hash)), Some(acked)) if acked == hash => Sync::Synced,
                _ if sidecar.rejected_error.is_some() => Sync::Rejected,
                _ => Sync::Stale,
            };
            let nack = sidecar
                .rejected_version
                .zip(sidecar.rejected_error.as_ref())
                .map(|(version, error)| format!("rejected v{version}: {error}"));
            rows.insert(
                (sidecar.namespace.clone(), sidecar.pod.clone()),
                SidecarRow {
                    namespace: sidecar.namespace.clone(),
                    pod: sidecar.pod.clone(),
                    agent: Some(sidecar.agent.clone()),
                    mode: "agent",
                    replica: replica.pod.clone(),
                    sidecar_version: sidecar.sidecar_version.clone(),
                    snapshot_version: sidecar.acked_version,
                    latest_version: latest.map(|(v, _)| *v),
                    sync,
                    acked_at: sidecar.acked_at,
                    connected_at: sidecar.connected_at,
                    nack,
                    tools: sidecar
                        .tools
                        .iter()
                        .map(|(server, tool)| format!("{server}/{tool}"))
                        .collect(),
                },
            );
        }
        for sidecar in &replica.tool_sidecars {
            rows.insert(
                (sidecar.namespace.clone(), sidecar.pod.clone()),
                SidecarRow {
                    namespace: sidecar.namespace.clone(),
                    pod: sidecar.pod.clone(),
                    agent: None,
                    mode: "tool",
                    replica: replica.pod.clone(),
                    sidecar_version: sidecar.sidecar_version.clone(),
                    snapshot_version: None,
                    latest_version: None,
                    sync: Sync::NotApplicable,
                    acked_at: None,
                    connected_at: sidecar.connected_at,
                    nack: None,
                    tools: Vec::new(),
                },
            );
        }
    }
    rows.into_values().collect()
}

/// A row for each injected pod of `pods` (it has the sidecar container)
/// that `rows` lacks: its sidecar is connected to no live replica. Pods that
/// have finished are left out.
pub fn disconnected_rows(pods: &[Pod], rows: &[SidecarRow]) -> Vec<SidecarRow> {
    pods.iter()
        .filter_map(|pod| {
            let spec = pod.spec.as_ref()?;
            let sidecar = spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .find(|c| c.name == SIDECAR_CONTAINER)?;
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                return None;
            }
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            if rows
                .iter()
                .any(|r| r.namespace == namespace && r.pod == name)
            {
                return None;
            }
            let tool_mode = sidecar.env.iter().flatten().any(|e| {
                e.name == chaperone_wire::sidecar_env::ENV_MODE
                    && e.value.as_deref() == Some("tool")
            });
            Some(SidecarRow {
                namespace,
                pod: name,
                agent: None,
                mode: if tool_mode { "tool" } else { "agent" },
                replica: "-".to_owned(),
                sidecar_version: None,
                snapshot_version: None,
                latest_version: None,
                sync: Sync::Disconnected,
                acked_at: None,
                connected_at: None,
                nack: None,
                tools: Vec::new(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn replica_map(pod: &str, heartbeat: i64, sidecars: serde_json::Value) -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": format!("chaperone-replica-{pod}"), "namespace": "chaperone-system"},
            "data": {
                "heartbeat": heartbeat.to_string(),
                "sidecars.json": sidecars.to_string(),
                "keys.json": "[]",
                "version": "0.1.0",
            }
        }))
        .unwrap()
    }

    fn sidecar(pod: &str, acked: (u64, &str), rejected: Option<(u64, &str)>) -> serde_json::Value {
        let mut s = json!({
            "namespace": "shop", "pod": pod, "podUid": "u", "agent": "shop/clerk",
            "ackedVersion": acked.0, "ackedHash": acked.1, "ackedAt": 990, "sidecarVersion": "0.1.0",
        });
        if let Some((version, error)) = rejected {
            s["rejectedVersion"] = json!(version);
            s["rejectedError"] = json!(error);
        }
        s
    }

    #[test]
    fn a_sidecar_on_the_current_hash_is_synced_and_a_rejecting_one_nacked() {
        let map = replica_map(
            "c-0",
            1000,
            json!([
                sidecar("a", (2, "h2"), None),
                sidecar("b", (1, "h1"), Some((2, "bad rule"))),
                sidecar("c", (1, "h1"), None),
            ]),
        );
        let replicas = vec![read_replica(&map, 1000)];
        let current = BTreeMap::from([("shop/clerk".to_owned(), (2, "h2".to_owned()))]);
        let rows = sidecar_rows(&replicas, &current);
        let sync: Vec<(&str, Sync)> = rows.iter().map(|r| (r.pod.as_str(), r.sync)).collect();
        assert_eq!(
            sync,
            [
                ("a", Sync::Synced),
                ("b", Sync::Rejected),
                ("c", Sync::Stale)
            ]
        );
        assert_eq!(rows[1].nack.as_deref(), Some("rejected v2: bad rule"));
        assert_eq!(rows[0].replica, "c-0");
    }

    #[test]
    fn a_stale_replica_lists_no_sidecars_and_the_later_heartbeat_wins() {
        let old = replica_map(
            "old",
            1000 - MAX_AGE - 1,
            json!([sidecar("a", (1, "h1"), None)]),
        );
        let early = replica_map("early", 990, json!([sidecar("b", (1, "h1"), None)]));
        let late = replica_map("late", 995, json!([sidecar("b", (2, "h2"), None)]));
        let replicas: Vec<Replica> = [old, early, late]
            .iter()
            .map(|m| read_replica(m, 1000))
            .collect();
        assert!(replicas[0].stale);
        let rows = sidecar_rows(&replicas, &BTreeMap::new());
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (rows[0].pod.as_str(), rows[0].replica.as_str()),
            ("b", "late")
        );
        assert_eq!(rows[0].sync, Sync::Unknown);
    }

    #[test]
    fn a_tool_mode_sidecar_is_listed_without_a_snapshot() {
        let mut map = replica_map("c-0", 1000, json!([]));
        map.data.as_mut().unwrap().insert(
            "tool-sidecars.json".into(),
            json!([{"namespace": "tools", "pod": "orders-0", "podUid": "u", "sidecarVersion": "0.1.0"}])
                .to_string(),
        );
        let rows = sidecar_rows(&[read_replica(&map, 1000)], &BTreeMap::new());
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].mode, rows[0].sync, rows[0].agent.as_deref()),
            ("tool", Sync::NotApplicable, None)
        );
        assert_eq!(rows[0].sidecar_version.as_deref(), Some("0.1.0"));
    }

    #[test]
    fn an_unreadable_replica_says_why() {
        let mut map = replica_map("c-0", 1000, json!([]));
        map.data
            .as_mut()
            .unwrap()
            .insert("sidecars.json".into(), "{".into());
        let replica = read_replica(&map, 1000);
        assert!(
            replica
                .unreadable
                .as_deref()
                .is_some_and(|why| why.starts_with("data key sidecars.json is invalid")),
            "{:?}",
            replica.unreadable
        );
    }

    #[test]
    fn an_injected_pod_no_replica_lists_is_disconnected() {
        let pod = |name: &str, container: &str, phase: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {
                    "initContainers": [{"name": container, "env": [{"name": "CHAPERONE_MODE", "value": "tool"}]}],
                    "containers": [{"name": "app"}],
                },
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let connected = sidecar_rows(
            &[read_replica(
                &replica_map("r-1", 1000, json!([sidecar("a-0", (3, "h3"), None)])),
                1000,
            )],
            &BTreeMap::new(),
        );
        let pods = [
            pod("a-0", SIDECAR_CONTAINER, "Running"),
            pod("lost", SIDECAR_CONTAINER, "Running"),
            pod("done", SIDECAR_CONTAINER, "Succeeded"),
            pod("plain", "other", "Running"),
        ];
        let rows = disconnected_rows(&pods, &connected);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].pod, "lost");
        assert_eq!(rows[0].mode, "tool");
        assert_eq!(rows[0].sync.as_str(), "DISCONNECTED");
    }
}
