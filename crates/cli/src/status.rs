//! `chaperonectl status [POD]`: the sidecars and the snapshot each runs, like
//! `istioctl proxy-status`.
//!
//! One row per agent sidecar that a live controller replica publishes
//! ([`crate::control_plane`]): its agent, the snapshot version it runs
//! against its agent's current one, in sync or not, when it acknowledged,
//! the NACK error if it rejected a snapshot, its build and the replica it
//! streams from; and each injected pod whose sidecar no live replica lists
//! (`DISCONNECTED`). Every namespace unless `-n` is given. `status POD`
//! (`name`, or `namespace/name`) shows one sidecar in full, with the tools
//! it saw.

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::cluster::{ClusterArgs, api_error, on_cluster};
use crate::control_plane::{
    ControllerArgs, SidecarRow, current_snapshots, disconnected_rows, replicas, sidecar_rows,
};
use crate::output::{self, Format, age, unix_now};

/// Arguments of `chaperonectl status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    controller: ControllerArgs,
    /// One sidecar's pod (`name` in -n's namespace, or `namespace/name`):
    /// shown in full, with the tools it saw.
    pod: Option<String>,
    /// `table`, `json` or `yaml`.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

/// Runs `chaperonectl status`.
pub fn run(args: &StatusArgs) -> Result<()> {
    on_cluster(&args.cluster, async |client, namespace| {
        let rows = read(
            &client,
            &args.controller.controller_namespace,
            args.cluster.namespace.as_deref(),
        )
        .await?;
        match &args.pod {
            Some(pod) => {
                let (ns, name) = pod.split_once('/').unwrap_or((&namespace, pod));
                let Some(row) = rows.iter().find(|r| r.namespace == ns && r.pod == name) else {
                    bail!(
                        "no sidecar of pod {ns}/{name} is connected to a live controller replica (is it injected and running? see `chaperonectl status -n {ns}`)"
                    );
                };
                output::print(args.output, row, || details(row, unix_now()))
            }
            None => {
                let rows: Vec<SidecarRow> = match &args.cluster.namespace {
                    Some(ns) => rows.into_iter().filter(|r| &r.namespace == ns).collect(),
                    None => rows,
                };
                if rows.is_empty() && args.output == Format::Table {
                    eprintln!("No sidecars connected to a live controller replica.");
                    return Ok(());
                }
                output::print(args.output, &rows, || table(&rows, unix_now()))
            }
        }
    })
}

/// The sidecars the live replicas publish, and the injected pods (of
/// `namespace`, else all) that none lists.
async fn read(
    client: &Client,
    controller_namespace: &str,
    namespace: Option<&str>,
) -> Result<Vec<SidecarRow>> {
    let replicas = replicas(client, controller_namespace, unix_now()).await?;
    if replicas.is_empty() {
        bail!(
            "no controller replica publishes its state in namespace {controller_namespace} (is the controller running there? --controller-namespace names another)"
        );
    }
    for replica in &replicas {
        if let Some(why) = &replica.unreadable {
            eprintln!(
                "warning: controller replica {} left out: {why}",
                replica.pod
            );
        }
    }
    let current = current_snapshots(client).await?;
    let mut rows = sidecar_rows(&replicas, &current);
    // Injected pods whose sidecar no replica lists.
    let pods: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let injected = match pods.list(&ListParams::default()).await {
        Ok(pods) => disconnected_rows(&pods.items, &rows),
        Err(err) => {
            let err = api_error(err, "listing pods");
            eprintln!("warning: injected pods not connected are not listed: {err:#}");
            Vec::new()
        }
    };
    rows.extend(injected);
    rows.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    Ok(rows)
}

fn version(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("v{v}"))
}

/// The sidecars as columns.
fn table(rows: &[SidecarRow], now: i64) -> String {
    let mut cells = vec![
        [
            "NAMESPACE",
            "POD",
            "AGENT",
            "MODE",
            "SNAPSHOT",
            "LATEST",
            "SYNC",
            "ACKED",
            "SIDECAR",
            "REPLICA",
            "ERROR",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for row in rows {
        cells.push(vec![
            row.namespace.clone(),
            row.pod.clone(),
            row.agent.clone().unwrap_or_else(|| "-".to_owned()),
            row.mode.to_owned(),
            version(row.snapshot_version),
            version(row.latest_version),
            row.sync.as_str().to_owned(),
            row.acked_at
                .map_or_else(|| "-".to_owned(), |at| format!("{} ago", age(now - at))),
            row.sidecar_version
                .clone()
                .unwrap_or_else(|| "-".to_owned()),
            row.replica.clone(),
            row.nack.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    output::table(&cells)
}

/// One sidecar in full.
fn details(row: &SidecarRow, now: i64) -> String {
    let ago =
        |at: Option<i64>| at.map_or_else(|| "-".to_owned(), |at| format!("{} ago", age(now - at)));
    let mut out = format!(
        "Pod:       {}/{}\nAgent:     {}\nMode:      {}\nSidecar:   {}\nReplica:   {} (connected {})\nSnapshot:  {} (latest {}): {}\nAcked:     {}\n",
        row.namespace,
        row.pod,
        row.agent.as_deref().unwrap_or("- (tool-mode sidecar)"),
        row.mode,
        row.sidecar_version.as_deref().unwrap_or("-"),
        row.replica,
        ago(row.connected_at),
        version(row.snapshot_version),
        version(row.latest_version),
        row.sync.as_str(),
        ago(row.acked_at),
    );
    if let Some(nack) = &row.nack {
        out.push_str(&format!("NACK:      {nack}\n"));
    }
    if row.tools.is_empty() {
        out.push_str("Tools:     none seen in tools/list yet\n");
    } else {
        out.push_str(&format!(
            "Tools:     {} seen in tools/list\n",
            row.tools.len()
        ));
        for tool in &row.tools {
            out.push_str(&format!("  {tool}\n"));
        }
    }
    out
}
