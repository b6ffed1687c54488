//! `chaperonectl version`: this client's build, each controller replica's
//! (the `version` its replica ConfigMap carries) and the sidecars' (from
//! their hello, as the replicas publish them), with a warning for each skew:
//! a component whose major.minor differs from this client's, or replicas
//! that disagree (a rollout under way). `--client` reads no cluster.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::cluster::{ClusterArgs, on_cluster};
use crate::control_plane::{ControllerArgs, Replica, replicas};
use crate::output::{self, Format, age, unix_now};

/// This build of chaperonectl.
pub const CLIENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Arguments of `chaperonectl version`.
#[derive(clap::Args)]
pub struct VersionArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    controller: ControllerArgs,
    /// This client's version only; reads no cluster.
    #[arg(long)]
    client: bool,
    /// `table`, `json` or `yaml`.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

/// What `version` reports.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Versions {
    /// This chaperonectl.
    pub client: String,
    /// Each controller replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<ControllerVersion>>,
    /// How many sidecars (agent and tool-mode) run each build (`unknown`:
    /// not said).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<BTreeMap<String, usize>>,
    /// Each skew found.
    pub warnings: Vec<String>,
}

/// One controller replica's build.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerVersion {
    /// Its pod.
    pub pod: String,
    /// Its build; `unknown` for a replica that does not say.
    pub version: String,
    /// Seconds since it last wrote its state.
    pub heartbeat_age: i64,
    /// Stopped writing (its heartbeat is too old).
    pub stale: bool,
}

/// Runs `chaperonectl version`.
pub fn run(args: &VersionArgs) -> Result<()> {
    if args.client {
        let versions = Versions {
            client: CLIENT_VERSION.to_owned(),
            controllers: None,
            sidecars: None,
            warnings: Vec::new(),
        };
        return output::print(args.output, &versions, || {
            format!("Client: {CLIENT_VERSION}\n")
        });
    }
    on_cluster(&args.cluster, async |client, _namespace| {
        let now = unix_now();
        let replicas = replicas(&client, &args.controller.controller_namespace, now).await?;
        let (controllers, sidecars) = builds(&replicas, now);
        let warnings = skew(
            CLIENT_VERSION,
            &controllers,
            &sidecars,
            &args.controller.controller_namespace,
        );
        let versions = Versions {
            client: CLIENT_VERSION.to_owned(),
            controllers: Some(controllers),
            sidecars: Some(sidecars),
            warnings,
        };
        if args.output == Format::Table {
            for warning in &versions.warnings {
                eprintln!("warning: {warning}");
            }
        }
        output::print(args.output, &versions, || table(&versions))
    })
}

/// Each replica's build, and how many sidecars (agent and tool-mode) of the
/// live replicas run each build.
pub fn builds(replicas: &[Replica], now: i64) -> (Vec<ControllerVersion>, BTreeMap<String, usize>) {
    let controllers = replicas
        .iter()
        .map(|r| ControllerVersion {
            pod: r.pod.clone(),
            version: r.version.clone().unwrap_or_else(|| "unknown".to_owned()),
            heartbeat_age: now - r.heartbeat,
            stale: r.stale,
        })
        .collect();
    let mut sidecars: BTreeMap<String, usize> = BTreeMap::new();
    for replica in replicas.iter().filter(|r| !r.stale) {
        let agents = replica.sidecars.iter().map(|s| &s.sidecar_version);
        let tools = replica.tool_sidecars.iter().map(|s| &s.sidecar_version);
        for version in agents.chain(tools) {
            let version = version.as_deref().unwrap_or("unknown");
            *sidecars.entry(version.to_owned()).or_default() += 1;
        }
    }
    (controllers, sidecars)
}

fn table(versions: &Versions) -> String {
    let mut out = format!("Client: {}\n", versions.client);
    let controllers = versions.controllers.as_deref().unwrap_or_default();
    out.push_str(&format!("Controller replicas: {}\n", controllers.len()));
    for c in controllers {
        let stale = if c.stale { ", stale" } else { "" };
        out.push_str(&format!(
            "  {}: {} (heartbeat {} ago{stale})\n",
            c.pod,
            c.version,
            age(c.heartbeat_age)
        ));
    }
    let sidecars = versions.sidecars.clone().unwrap_or_default();
    out.push_str(&format!("Sidecars: {}\n", sidecars.values().sum::<usize>()));
    for (version, count) in &sidecars {
        out.push_str(&format!("  {version}: {count}\n"));
    }
    out
}

/// `major.minor` of a version (`0.1.0` → `0.1`); the whole text if it has
/// no dot.
fn minor_of(version: &str) -> &str {
    match version.match_indices('.').nth(1) {
        Some((at, _)) => &version[..at],
        None => version,
    }
}

/// The skews between this client, the controller replicas and the sidecars.
pub fn skew(
    client: &str,
    controllers: &[ControllerVersion],
    sidecars: &BTreeMap<String, usize>,
    controller_namespace: &str,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let live: Vec<&ControllerVersion> = controllers.iter().filter(|c| !c.stale).collect();
    if live.is_empty() {
        warnings.push(format!(
            "no live controller replica in namespace {controller_namespace}: its version is unknown"
        ));
    }
    for c in &live {
        if c.version == "unknown" {
            warnings.push(format!(
                "controller replica {} does not report its version (older than this client)",
                c.pod
            ));
        } else if minor_of(&c.version) != minor_of(client) {
            warnings.push(format!(
                "controller replica {} runs {}, this chaperonectl is {client}: use a chaperonectl of the controller's minor version",
                c.pod, c.version
            ));
        }
    }
    let builds: std::collections::BTreeSet<&str> = live
        .iter()
        .map(|c| c.version.as_str())
        .filter(|v| *v != "unknown")
        .collect();
    if builds.len() > 1 {
        warnings.push(format!(
            "controller replicas run different versions ({}): a rollout is under way or stuck",
            builds.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let controller_minors: std::collections::BTreeSet<&str> = live
        .iter()
        .filter(|c| c.version != "unknown")
        .map(|c| minor_of(&c.version))
        .collect();
    for (version, count) in sidecars {
        if version == "unknown" {
            warnings.push(format!(
                "{count} sidecar(s) do not report their version (or a replica older than this client publishes them)"
            ));
        } else if !controller_minors.is_empty() && !controller_minors.contains(minor_of(version)) {
            warnings.push(format!(
                "{count} sidecar(s) run {version}, not the controller's minor version: restart their pods to inject the current sidecar"
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(pod: &str, version: &str, stale: bool) -> ControllerVersion {
        ControllerVersion {
            pod: pod.into(),
            version: version.into(),
            heartbeat_age: 3,
            stale,
        }
    }

    #[test]
    fn the_same_minor_version_everywhere_warns_of_nothing() {
        let sidecars = BTreeMap::from([("0.1.3".to_owned(), 4)]);
        let warnings = skew(
            "0.1.0",
            &[
                controller("c-0", "0.1.2", false),
                controller("c-1", "0.1.2", false),
            ],
            &sidecars,
            "chaperone-system",
        );
        assert_eq!(warnings, Vec::<String>::new());
    }

    #[test]
    fn each_skew_is_named() {
        let sidecars = BTreeMap::from([("0.1.0".to_owned(), 2), ("0.2.0".to_owned(), 1)]);
        let warnings = skew(
            "0.2.0",
            &[
                controller("c-0", "0.2.0", false),
                controller("c-1", "0.1.0", false),
                controller("gone", "0.0.1", true),
            ],
            &sidecars,
            "chaperone-system",
        );
        assert_eq!(
            warnings,
            [
                "controller replica c-1 runs 0.1.0, this chaperonectl is 0.2.0: use a chaperonectl of the controller's minor version",
                "controller replicas run different versions (0.1.0, 0.2.0): a rollout is under way or stuck",
            ],
            "sidecars on either replica's minor are fine; a stale replica counts for nothing"
        );
        let warnings = skew(
            "0.2.0",
            &[controller("c-0", "0.2.0", false)],
            &sidecars,
            "chaperone-system",
        );
        assert_eq!(
            warnings,
            [
                "2 sidecar(s) run 0.1.0, not the controller's minor version: restart their pods to inject the current sidecar"
            ]
        );
    }

    #[test]
    fn no_live_replica_is_a_warning() {
        let warnings = skew(
            "0.1.0",
            &[controller("c-0", "0.1.0", true)],
            &BTreeMap::new(),
            "cs",
        );
        assert_eq!(
            warnings,
            ["no live controller replica in namespace cs: its version is unknown"]
        );
    }
}
