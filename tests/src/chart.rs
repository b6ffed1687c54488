//! The Helm chart (`charts/chaperone`) for tests: running helm against the
//! test control plane, rendered manifests as JSON, and the controller flags
//! the chart's Deployment passes through its environment.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{ControlPlane, Tool};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `charts/chaperone`.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts").join("chaperone")
}

/// Runs helm 4 with its cache, config and data under `home` (never the user's
/// Helm setup); against `cluster` when given, else with no cluster at all.
pub fn helm(home: &Path, args: &[&str], cluster: Option<&ControlPlane>) -> Result<Output> {
    helm_with(Tool::Helm, home, args, cluster)
}

/// [`helm`] with `tool`: [`Tool::Helm`] (helm 4) or [`Tool::Helm3`].
pub fn helm_with(
    tool: Tool,
    home: &Path,
    args: &[&str],
    cluster: Option<&ControlPlane>,
) -> Result<Output> {
    let mut command = Command::new(tool.path()?);
    command
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdin(Stdio::null());
    match cluster {
        Some(cp) => command.env("KUBECONFIG", cp.kubeconfig()),
        // Offline commands must not need (or find) a cluster.
        None => command.env("KUBECONFIG", home.join("no-kubeconfig")),
    };
    command.output().context("running helm")
}

/// [`helm`], failing with its output unless it succeeds; returns its stdout.
pub fn helm_ok(home: &Path, args: &[&str], cluster: Option<&ControlPlane>) -> Result<String> {
    helm_ok_with(Tool::Helm, home, args, cluster)
}

/// [`helm_ok`] with `tool`.
pub fn helm_ok_with(
    tool: Tool,
    home: &Path,
    args: &[&str],
    cluster: Option<&ControlPlane>,
) -> Result<String> {
    let out = helm_with(tool, home, args, cluster)?;
    if !out.status.success() {
        bail!(
            "helm {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The objects of a multi-document YAML manifest, as JSON (empty documents
/// left out).
pub fn manifest_documents(manifest: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(manifest).context("parsing a manifest")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The first object of `kind` among `objects`.
pub fn object_of_kind<'a>(objects: &'a [Value], kind: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .with_context(|| format!("no {kind} rendered"))
}

/// The value of a downward-API `fieldPath` (`metadata.name`,
/// `spec.serviceAccountName`, ...) of `object` (a pod as JSON).
pub fn field_path(object: &Value, path: &str) -> Option<String> {
    path.split('.')
        .try_fold(object, |v, key| v.get(key))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The controller's flags (`--name=value`) for the environment the chart's
/// `deployment` gives it: every variable must be one the controller reads
/// (`RUST_LOG` and `OTEL_*` aside: the filter and the trace exporter's
/// standard variables, read from the environment by chaperone-telemetry).
/// Values from the downward API come from `pod` (the
/// controller's pod as JSON) when given, else a stand-in.
pub fn controller_flags(deployment: &Value, pod: Option<&Value>) -> Result<Vec<String>> {
    use clap::CommandFactory as _;
    let command = chaperone_controller::Args::command();
    let by_env: BTreeMap<String, String> = command
        .get_arguments()
        .filter_map(|arg| {
            Some((
                arg.get_env()?.to_str()?.to_owned(),
                arg.get_long()?.to_owned(),
            ))
        })
        .collect();
    let mut flags = Vec::new();
    for env in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .context("env")?
    {
        let name = env["name"].as_str().context("env name")?;
        if name == "RUST_LOG" || name.starts_with("OTEL_") {
            continue;
        }
        let flag = by_env.get(name).with_context(|| {
            format!("the chart sets {name}, which the controller does not read")
        })?;
        let value = match (env["value"].as_str(), pod) {
            (Some(value), _) => value.to_owned(),
            (None, Some(pod)) => {
                let path = env["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .with_context(|| format!("{name} has neither a value nor a fieldRef"))?;
                field_path(pod, path).with_context(|| format!("the pod has no {path}"))?
            }
            (None, None) => "from-the-downward-api".to_owned(),
        };
        flags.push(format!("--{flag}={value}"));
    }
    Ok(flags)
}
