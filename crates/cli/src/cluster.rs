//! The cluster side shared by the commands that talk to the API server
//! (`chaperonectl approval`, `chaperonectl tools`): kubectl's flags for the
//! kubeconfig, context, namespace and impersonated user ([`ClusterArgs`]), the
//! client they select ([`on_cluster`]), and API errors worded for a person
//! ([`api_error`]).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Which cluster, namespace and user, as with kubectl.
#[derive(clap::Args)]
pub struct ClusterArgs {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then
    /// the in-cluster ServiceAccount).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Act as this user (impersonation, like kubectl --as): your own user
    /// needs the `impersonate` verb on users.
    #[arg(long = "as", global = true, value_name = "USER")]
    pub as_user: Option<String>,
    /// A group to act as (with --as); repeat for several.
    #[arg(long, global = true, value_name = "GROUP", requires = "as_user")]
    pub as_group: Vec<String>,
}

/// Runs `work` with a client for the selected kubeconfig, context and user
/// and the namespace to work in, on a runtime of its own.
pub fn on_cluster<T>(
    cluster: &ClusterArgs,
    work: impl AsyncFnOnce(Client, String) -> Result<T>,
) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the Kubernetes client")?;
    runtime.block_on(async {
        let (client, namespace) = connect(cluster).await?;
        work(client, namespace).await
    })
}

/// A client for the selected kubeconfig, context and user, and the namespace
/// to work in.
async fn connect(cluster: &ClusterArgs) -> Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: cluster.context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = match &cluster.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("loading the kubeconfig {}", path.display()))?
        }
        None => match Config::from_kubeconfig(&options).await {
            Ok(config) => config,
            // Like kubectl, fall back to the pod's ServiceAccount, unless a
            // context was asked for.
            Err(err) if cluster.context.is_none() => Config::incluster().map_err(|_| {
                anyhow!(err).context(
                    "loading the kubeconfig ($KUBECONFIG or ~/.kube/config; \
                     not in a cluster either)",
                )
            })?,
            Err(err) => return Err(anyhow!(err).context("loading the kubeconfig")),
        },
    };
    if let Some(user) = &cluster.as_user {
        config.auth_info.impersonate = Some(user.clone());
        if !cluster.as_group.is_empty() {
            config.auth_info.impersonate_groups = Some(cluster.as_group.clone());
        }
    }
    let namespace = cluster
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("creating the Kubernetes client")?;
    Ok((client, namespace))
}

/// An API error as the person should read it: what was being done, and the
/// API server's own words (an admission webhook's refusal names its reason).
pub fn api_error(err: kube::Error, doing: &str) -> anyhow::Error {
    match err {
        kube::Error::Api(status) => {
            let reason = if status.reason.is_empty() {
                "Failure".to_owned()
            } else {
                status.reason.clone()
            };
            anyhow!(
                "{doing}: refused by the API server ({reason}, HTTP {}): {}",
                status.code,
                status.message
            )
        }
        other => anyhow!(other).context(format!("{doing}: no answer from the API server")),
    }
}
