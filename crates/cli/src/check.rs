//! `chaperonectl check`: a preflight of Chaperone on the cluster, like
//! `linkerd check`. Each check prints one line, `✔`, `‼` (a warning) or `✘`,
//! and a hint under a warning or failure saying what to do; the command exits
//! 1 when any check failed (warnings do not fail it).
//!
//! - CRDs: each of this CLI's CRDs is installed, Established, and serves the
//!   same schema this CLI generates (`chaperonectl crds`).
//! - Controller: its Deployment (labelled `app.kubernetes.io/component=controller`,
//!   `app.kubernetes.io/part-of=chaperone`) has every replica ready, and each
//!   replica publishes a fresh heartbeat in its `chaperone-replica-<pod>`
//!   ConfigMap. Without a Deployment (a controller run outside the cluster)
//!   the replicas' ConfigMaps alone count.
//! - Webhook: the MutatingWebhookConfiguration (`--webhook-config`) exists;
//!   each webhook's caBundle holds a CA certificate that is valid now and is
//!   the controller's CA (the TLS Secret's `ca.crt`); its Service has ready
//!   endpoints, or its URL answers over TLS trusting that caBundle.
//! - Snapshot service TLS: the TLS Secret's certificate is valid now (and for
//!   more than a week), issued by its CA, and names the controller's Service.
//! - RBAC: the controller's ServiceAccount may make each API call the
//!   controller makes ([`CONTROLLER_PERMISSIONS`]), by SubjectAccessReview.
//! - Agents: every AgentIdentity is Ready.
//! - Sidecars: every agent sidecar a live replica publishes runs its agent's
//!   current snapshot.
//! - Versions: a warning for each skew between this CLI, the replicas and
//!   the sidecars (`chaperonectl version`'s).
//! - Audit keys: every sidecar (agent and tool mode) connected for over
//!   [`ARCHIVE_GRACE_SECONDS`] has its key in the audit-key archive (a
//!   warning names those that do not: their trails would not verify once
//!   their pods are gone).

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use chaperone_api::AgentIdentity;
use chaperone_api::audit_keys;
use chaperone_api::replica_state::MAX_AGE;
use http_body_util::Empty;
use hyper::body::Bytes;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::cluster::{ClusterArgs, on_cluster};
use crate::control_plane::{
    ControllerArgs, Replica, SidecarRow, Sync, current_snapshots, replicas, sidecar_rows,
};
use crate::output::{Format, age, unix_now};
use crate::version::CLIENT_VERSION;

/// Arguments of `chaperonectl check`.
#[derive(clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    controller: ControllerArgs,
    /// The controller's MutatingWebhookConfiguration (default: its
    /// Deployment's CHAPERONE_WEBHOOK_CONFIG, else `chaperone-injector`).
    #[arg(long, value_name = "NAME")]
    webhook_config: Option<String>,
    /// The controller's TLS Secret (default: its Deployment's
    /// CHAPERONE_TLS_SECRET, else `chaperone-controller-tls`).
    #[arg(long, value_name = "NAME")]
    tls_secret: Option<String>,
    /// The controller's Service, which its certificate must name (default:
    /// its Deployment's CHAPERONE_SERVICE_NAME, else `chaperone-controller`).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    /// The controller's ServiceAccount (default: its Deployment's, else
    /// `chaperone-controller`).
    #[arg(long, value_name = "NAME")]
    service_account: Option<String>,
    /// `table` (✔/✘ lines), `json` or `yaml`.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

/// The names of the controller's objects: each from its flag, else from the
/// controller Deployment's environment (what the controller itself reads,
/// see `chaperone-controller --help`), else the chart's default for release
/// `chaperone`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerNames {
    /// Its MutatingWebhookConfiguration.
    pub webhook_config: String,
    /// Its TLS Secret.
    pub tls_secret: String,
    /// Its Service (its certificate names it).
    pub service: String,
    /// Its leader-election Lease.
    pub lease: String,
    /// Its ServiceAccount.
    pub service_account: String,
    /// cert-manager (not the controller) keeps its certificate and the
    /// webhook's caBundle.
    pub external_tls: bool,
}

impl ControllerNames {
    /// The names for `args` and the controller's `deployment`, if any.
    pub fn resolve(args: &CheckArgs, deployment: Option<&Deployment>) -> Self {
        let pod = deployment
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.template.spec.as_ref());
        let env: BTreeMap<String, String> = pod
            .and_then(|p| p.containers.iter().find(|c| c.name == "controller"))
            .and_then(|c| c.env.as_ref())
            .map(|env| {
                env.iter()
                    .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        let pick = |flag: &Option<String>, variable: &str, default: &str| {
            flag.clone()
                .or_else(|| env.get(variable).cloned())
                .unwrap_or_else(|| default.to_owned())
        };
        Self {
            webhook_config: pick(
                &args.webhook_config,
                "CHAPERONE_WEBHOOK_CONFIG",
                "chaperone-injector",
            ),
            tls_secret: pick(
                &args.tls_secret,
                "CHAPERONE_TLS_SECRET",
                "chaperone-controller-tls",
            ),
            service: pick(
                &args.service,
                "CHAPERONE_SERVICE_NAME",
                "chaperone-controller",
            ),
            lease: pick(&None, "CHAPERONE_LEASE_NAME", "chaperone-controller"),
            service_account: args
                .service_account
                .clone()
                .or_else(|| pod.and_then(|p| p.service_account_name.clone()))
                .unwrap_or_else(|| "chaperone-controller".to_owned()),
            external_tls: env
                .get("CHAPERONE_EXTERNAL_TLS")
                .is_some_and(|v| v == "true"),
        }
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// Which part of Chaperone it is about.
    pub category: &'static str,
    /// Passed (a warning passes).
    pub ok: bool,
    /// Passed with a warning (`‼`): worth a look, not a failure.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
    /// What was found.
    pub message: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// The checks run so far.
#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn pass(&mut self, category: &'static str, message: impl Into<String>) {
        self.0.push(Check {
            category,
            ok: true,
            warning: false,
            message: message.into(),
            hint: None,
        });
    }

    fn warn(
        &mut self,
        category: &'static str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.with_hint(category, true, message.into(), hint.into());
    }

    fn fail(
        &mut self,
        category: &'static str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.with_hint(category, false, message.into(), hint.into());
    }

    /// A warning (`ok`) or a failure, with what to do about it.
    fn with_hint(&mut self, category: &'static str, ok: bool, message: String, hint: String) {
        self.0.push(Check {
            category,
            ok,
            warning: ok,
            message,
            hint: Some(hint),
        });
    }
}

/// What `check -o json` prints.
#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    checks: &'a [Check],
}

/// Runs `chaperonectl check`: exit 0 when every check passed, 1 otherwise.
pub fn run(args: &CheckArgs) -> Result<ExitCode> {
    let checks = on_cluster(&args.cluster, async |client, _namespace| {
        let mut checks = Checks::default();
        let now = unix_now();
        check_crds(&client, &mut checks).await;
        let ns = &args.controller.controller_namespace;
        let replicas = replicas(&client, ns, now)
            .await
            .map_err(|e| format!("{e:#}"));
        let deployment = check_controller(&client, args, &replicas, now, &mut checks).await;
        let names = ControllerNames::resolve(args, deployment.as_ref());
        let ca = check_tls(&client, ns, &names, now, &mut checks).await;
        check_webhook(&client, &names, ca.as_deref(), now, &mut checks).await;
        check_rbac(&client, ns, &names, &mut checks).await;
        check_agents(&client, &mut checks).await;
        if let Ok(replicas) = &replicas {
            check_sidecars(&client, replicas, &mut checks).await;
            check_versions(replicas, ns, now, &mut checks);
            check_audit_keys(&client, ns, replicas, now, &mut checks).await;
        }
        Ok(checks.0)
    })?;
    let ok = checks.iter().all(|c| c.ok);
    crate::output::print(
        args.output,
        &Report {
            ok,
            checks: &checks,
        },
        || render(&checks),
    )?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The checks as lines, grouped by category.
fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    let mut category = "";
    for check in checks {
        if check.category != category {
            if !out.is_empty() {
                out.push('\n');
            }
            category = check.category;
            out.push_str(&format!(
                "{category}\n{}\n",
                "-".repeat(category.chars().count())
            ));
        }
        let mark = match (check.ok, check.warning) {
            (false, _) => '✘',
            (true, true) => '‼',
            (true, false) => '✔',
        };
        out.push_str(&format!("{mark} {}\n", check.message));
        if let Some(hint) = &check.hint {
            out.push_str(&format!("    hint: {hint}\n"));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    let warnings = checks.iter().filter(|c| c.warning).count();
    if failed == 0 && warnings > 0 {
        out.push_str(&format!(
            "\nStatus check results are ✔ ({} checks, {warnings} with a warning)\n",
            checks.len()
        ));
    } else if failed == 0 {
        out.push_str(&format!(
            "\nStatus check results are ✔ ({} checks)\n",
            checks.len()
        ));
    } else {
        out.push_str(&format!(
            "\nStatus check results are ✘ ({failed} of {} checks failed)\n",
            checks.len()
        ));
    }
    out
}

/// An API error in one line.
fn why(error: kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
        other => other.to_string(),
    }
}

const CRDS: &str = "CRDs";
const CONTROLLER: &str = "Controller";
const WEBHOOK: &str = "Admission webhooks";
const TLS: &str = "Snapshot service TLS";
const RBAC: &str = "Controller RBAC";
const AGENTS: &str = "Agents";
const SIDECARS: &str = "Sidecars";
const VERSIONS: &str = "Versions";
const AUDIT_KEYS: &str = "Audit keys";

const CRD_HINT: &str = "install this version's CRDs: chaperonectl crds | kubectl apply \
    --server-side -f - (or helm upgrade with crds.install)";

async fn check_crds(client: &Client, checks: &mut Checks) {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for expected in chaperone_api::crds() {
        let name = expected.name_any();
        match api.get_opt(&name).await {
            Ok(Some(installed)) => match crd_difference(&expected, &installed) {
                None => checks.pass(CRDS, format!("{name} is installed at this CLI's version")),
                Some(difference) => {
                    checks.fail(CRDS, format!("{name}: {difference}"), CRD_HINT);
                }
            },
            Ok(None) => checks.fail(CRDS, format!("{name} is not installed"), CRD_HINT),
            Err(error) => checks.fail(
                CRDS,
                format!("{name} cannot be read: {}", why(error)),
                "read access to customresourcedefinitions is needed for this check",
            ),
        }
    }
}

/// How an installed CRD differs from the one this CLI generates, if it does:
/// not Established, a version missing or not served, or another schema.
pub fn crd_difference(
    expected: &CustomResourceDefinition,
    installed: &CustomResourceDefinition,
) -> Option<String> {
    let established = installed
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    if !established {
        return Some("is not Established yet".to_owned());
    }
    for version in &expected.spec.versions {
        let Some(found) = installed
            .spec
            .versions
            .iter()
            .find(|v| v.name == version.name)
        else {
            return Some(format!("does not have version {}", version.name));
        };
        if !found.served {
            return Some(format!("does not serve version {}", version.name));
        }
        let schema = |v: &CustomResourceDefinitionVersion| {
            v.schema
                .as_ref()
                .and_then(|s| serde_json::to_value(&s.open_api_v3_schema).ok())
        };
        if schema(found) != schema(version) {
            return Some(format!(
                "version {}'s schema is not this CLI's (installed from another Chaperone version)",
                version.name
            ));
        }
    }
    None
}

const READ_DEPLOYMENTS: &str =
    "read access to deployments in the controller's namespace is needed for this check";
const READ_CONFIGMAPS: &str =
    "read access to configmaps in the controller's namespace is needed for this check";
const READ_PODS: &str =
    "read access to pods in the controller's namespace is needed for this check";
const NO_CONTROLLER: &str = "install the chart (helm install chaperone charts/chaperone \
    -n chaperone-system), or name its namespace with --controller-namespace";
const STOPPED_REPLICA: &str = "a replica that stopped leaves its ConfigMap until its pod is \
    deleted; delete a stopped one's ConfigMap";

/// The controller's Deployment, if it has one; checks it and each replica.
async fn check_controller(
    client: &Client,
    args: &CheckArgs,
    replicas: &Result<Vec<Replica>, String>,
    now: i64,
    checks: &mut Checks,
) -> Option<Deployment> {
    let ns = &args.controller.controller_namespace;
    let selector = "app.kubernetes.io/component=controller,app.kubernetes.io/part-of=chaperone";
    let deployment = match Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
    {
        Ok(list) => list.items.into_iter().next(),
        Err(error) => {
            let message = format!(
                "the controller's Deployment in {ns} cannot be read: {}",
                why(error)
            );
            checks.fail(CONTROLLER, message, READ_DEPLOYMENTS);
            None
        }
    };
    let replicas = match replicas {
        Ok(replicas) => replicas,
        Err(error) => {
            checks.fail(CONTROLLER, error.clone(), READ_CONFIGMAPS);
            return deployment;
        }
    };
    match &deployment {
        Some(deployment) => check_deployment(client, ns, deployment, replicas, now, checks).await,
        None if replicas.is_empty() => {
            let message = format!(
                "no controller runs in namespace {ns}: no Deployment and no replica publishes its state"
            );
            checks.fail(CONTROLLER, message, NO_CONTROLLER);
        }
        None => {
            for replica in replicas {
                match heartbeat(Some(replica), now) {
                    Ok(beat) => checks.pass(
                        CONTROLLER,
                        format!(
                            "replica {} is live ({beat}; no Deployment: run outside the cluster)",
                            replica.pod
                        ),
                    ),
                    Err(problem) => checks.fail(
                        CONTROLLER,
                        format!("replica {} {problem}", replica.pod),
                        STOPPED_REPLICA,
                    ),
                }
            }
        }
    }
    deployment
}

/// What a replica's ConfigMap says of it: its heartbeat's age, or why it
/// does not count.
fn heartbeat(replica: Option<&Replica>, now: i64) -> Result<String, String> {
    match replica {
        None => Err("publishes no state (no ConfigMap chaperone-replica-<pod>)".to_owned()),
        Some(Replica {
            unreadable: Some(why),
            ..
        }) => Err(format!("publishes an unreadable state: {why}")),
        Some(r) if r.stale => Err(format!(
            "last published its state {} ago (more than {MAX_AGE}s: stopped, or cut off from \
             the API server)",
            age(now - r.heartbeat)
        )),
        Some(r) => Ok(format!("heartbeat {} ago", age(now - r.heartbeat))),
    }
}

/// The Deployment's ready count, and each of its pods: Ready, with a fresh
/// heartbeat.
async fn check_deployment(
    client: &Client,
    ns: &str,
    deployment: &Deployment,
    replicas: &[Replica],
    now: i64,
    checks: &mut Checks,
) {
    let name = deployment.name_any();
    let spec = deployment.spec.as_ref();
    let wanted = spec.and_then(|s| s.replicas).unwrap_or(1);
    let status = deployment.status.as_ref();
    let ready = status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let message = format!("deployment {ns}/{name}: {ready}/{wanted} replicas ready");
    if ready >= wanted {
        checks.pass(CONTROLLER, message);
    } else {
        let hint = format!(
            "kubectl -n {ns} describe deployment {name} and kubectl -n {ns} logs deploy/{name} \
             say why"
        );
        checks.fail(CONTROLLER, message, hint);
    }
    let selector = spec
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = match Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(pods) => pods.items,
        Err(error) => {
            let message = format!("the controller's pods cannot be listed: {}", why(error));
            checks.fail(CONTROLLER, message, READ_PODS);
            return;
        }
    };
    for pod in pods {
        let pod_name = pod.name_any();
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let replica = replicas.iter().find(|r| r.pod == pod_name);
        let hint =
            format!("kubectl -n {ns} logs {pod_name} says why; deleting the pod restarts it");
        match (ready, heartbeat(replica, now)) {
            (true, Ok(beat)) => {
                checks.pass(CONTROLLER, format!("replica {pod_name} is ready ({beat})"));
            }
            (false, _) => checks.fail(CONTROLLER, format!("replica {pod_name} is not ready"), hint),
            (true, Err(problem)) => {
                checks.fail(CONTROLLER, format!("replica {pod_name} {problem}"), hint);
            }
        }
    }
}

/// A certificate read from PEM, with what the checks need of it.
struct Cert {
    der: Vec<u8>,
}

impl Cert {
    fn parsed(&self) -> Option<X509Certificate<'_>> {
        X509Certificate::from_der(&self.der).ok().map(|(_, c)| c)
    }
}

/// The certificates of a PEM bundle.
fn certs_of(pem: &[u8]) -> Vec<Cert> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| Cert { der: p.contents })
        .collect()
}

/// Why a certificate is not usable at `now` (or within `margin` seconds).
fn validity_problem(cert: &X509Certificate<'_>, now: i64, margin: i64) -> Option<String> {
    let validity = cert.validity();
    let (from, until) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now < from {
        return Some(format!("is not valid before {}", validity.not_before));
    }
    if now >= until {
        return Some(format!("expired {}", validity.not_after));
    }
    if now + margin >= until {
        return Some(format!(
            "expires {} (in {})",
            validity.not_after,
            age(until - now)
        ));
    }
    None
}

/// The TLS Secret's CA (PEM), if it could be read.
async fn check_tls(
    client: &Client,
    ns: &str,
    names: &ControllerNames,
    now: i64,
    checks: &mut Checks,
) -> Option<Vec<u8>> {
    let name = &names.tls_secret;
    let secret = match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            checks.fail(
                TLS,
                format!("secret {ns}/{name} does not exist"),
                "the controller creates it on start (or cert-manager, with certManager.enabled); is the controller running? --tls-secret names another",
            );
            return None;
        }
        Err(error) => {
            checks.fail(
                TLS,
                format!("secret {ns}/{name} cannot be read: {}", why(error)),
                "read access to the controller's TLS Secret is needed for this check",
            );
            return None;
        }
    };
    let data = secret.data.unwrap_or_default();
    let get = |key: &str| data.get(key).map(|b| b.0.clone());
    let (Some(tls_crt), Some(ca_crt)) = (get("tls.crt"), get("ca.crt")) else {
        checks.fail(
            TLS,
            format!("secret {ns}/{name} lacks tls.crt or ca.crt"),
            "delete the Secret: the controller writes a new one on restart",
        );
        return None;
    };
    let cas = certs_of(&ca_crt);
    let leaf = certs_of(&tls_crt);
    let (Some(ca), Some(leaf)) = (
        cas.first().and_then(Cert::parsed),
        leaf.first().and_then(Cert::parsed),
    ) else {
        checks.fail(
            TLS,
            format!("secret {ns}/{name}: tls.crt or ca.crt is not a PEM certificate"),
            "delete the Secret: the controller writes a new one on restart",
        );
        return Some(ca_crt);
    };
    let week = 7 * 86400;
    let dns = format!("{}.{ns}.svc", names.service);
    let names: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let problem = if let Some(p) = validity_problem(&leaf, now, week) {
        Some(format!("its certificate {p}"))
    } else if let Some(p) = validity_problem(&ca, now, 0) {
        Some(format!("its CA {p}"))
    } else if leaf.issuer() != ca.subject() {
        Some("its certificate is not issued by its ca.crt".to_owned())
    } else if !names.iter().any(|n| n == &dns) {
        Some(format!(
            "its certificate does not name {dns} (names: {})",
            names.join(", ")
        ))
    } else {
        None
    };
    match problem {
        None => checks.pass(
            TLS,
            format!(
                "secret {ns}/{name}: certificate for {dns} valid until {}, issued by its CA",
                leaf.validity().not_after
            ),
        ),
        Some(problem) => checks.fail(
            TLS,
            format!("secret {ns}/{name}: {problem}"),
            "the controller renews its own certificate; delete the Secret and restart the controller to issue a new one (with cert-manager: check the Certificate)",
        ),
    }
    Some(ca_crt)
}

async fn check_webhook(
    client: &Client,
    names: &ControllerNames,
    ca: Option<&[u8]>,
    now: i64,
    checks: &mut Checks,
) {
    let name = &names.webhook_config;
    let config = match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(name)
        .await
    {
        Ok(Some(config)) => config,
        Ok(None) => {
            checks.fail(
                WEBHOOK,
                format!(
                    "mutatingwebhookconfiguration {name} does not exist: no pod gets a sidecar"
                ),
                "install the chart, or name the configuration with --webhook-config",
            );
            return;
        }
        Err(error) => {
            checks.fail(
                WEBHOOK,
                format!(
                    "mutatingwebhookconfiguration {name} cannot be read: {}",
                    why(error)
                ),
                "read access to mutatingwebhookconfigurations is needed for this check",
            );
            return;
        }
    };
    let ca_der: Vec<Vec<u8>> = ca
        .map(|pem| certs_of(pem).into_iter().map(|c| c.der).collect())
        .unwrap_or_default();
    for webhook in config.webhooks.unwrap_or_default() {
        let label = format!("webhook {}", webhook.name);
        let bundle = webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        let certs = certs_of(&bundle);
        let parsed: Vec<X509Certificate<'_>> = certs.iter().filter_map(Cert::parsed).collect();
        let hint = "the controller writes the caBundle within a minute of starting (cert-manager's CA injector with certManager.enabled); is it running?";
        if parsed.is_empty() {
            checks.fail(
                WEBHOOK,
                format!("{label}: caBundle holds no certificate"),
                hint,
            );
            continue;
        }
        if let Some(problem) = parsed.iter().find_map(|c| validity_problem(c, now, 0)) {
            checks.fail(
                WEBHOOK,
                format!("{label}: caBundle certificate {problem}"),
                hint,
            );
            continue;
        }
        if !ca_der.is_empty() && !certs.iter().any(|c| ca_der.contains(&c.der)) {
            checks.fail(
                WEBHOOK,
                format!(
                    "{label}: caBundle is not the controller's CA (secret {})",
                    names.tls_secret
                ),
                hint,
            );
            continue;
        }
        checks.pass(
            WEBHOOK,
            format!("{label}: caBundle is the controller's CA, valid"),
        );
        let reachable = match (&webhook.client_config.service, &webhook.client_config.url) {
            (Some(service), _) => {
                service_endpoints(client, &service.namespace, &service.name).await
            }
            (None, Some(url)) => url_answers(url, &bundle).await,
            (None, None) => Err("it names neither a service nor a URL".to_owned()),
        };
        match reachable {
            Ok(how) => checks.pass(WEBHOOK, format!("{label} is reachable: {how}")),
            Err(problem) => checks.fail(
                WEBHOOK,
                format!("{label} is not reachable: {problem}"),
                "pods are created without a sidecar (failurePolicy Ignore) or refused (Fail) until the controller answers; check its pods and Service",
            ),
        }
    }
}

/// Whether Service `ns/name` has ready endpoints.
async fn service_endpoints(client: &Client, ns: &str, name: &str) -> Result<String, String> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await
        .map_err(|e| {
            format!(
                "the endpoints of service {ns}/{name} cannot be read: {}",
                why(e)
            )
        })?;
    let ready = slices
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .count();
    if ready == 0 {
        return Err(format!("service {ns}/{name} has no ready endpoint"));
    }
    Ok(format!("service {ns}/{name} has {ready} ready endpoint(s)"))
}

/// Whether `url` answers over TLS, trusting only `ca_bundle`.
async fn url_answers(url: &str, ca_bundle: &[u8]) -> Result<String, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url} is not a URL: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs_of(ca_bundle) {
        roots
            .add(cert.der.into())
            .map_err(|e| format!("the caBundle is unusable: {e}"))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(connector);
    match tokio::time::timeout(Duration::from_secs(5), client.get(uri)).await {
        Ok(Ok(response)) => Ok(format!(
            "{url} answered HTTP {} over TLS",
            response.status().as_u16()
        )),
        Ok(Err(error)) => Err(format!(
            "{url}: {error:#}",
            error = anyhow::Error::new(error)
        )),
        Err(_) => Err(format!("{url} did not answer within 5 s")),
    }
}

/// Which object of a kind a permission is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    /// Any, in every namespace.
    Any,
    /// Any, in the controller's namespace.
    InNamespace,
    /// Its TLS Secret.
    TlsSecret,
    /// Its Lease.
    Lease,
    /// Its MutatingWebhookConfiguration.
    WebhookConfig,
}

/// One API call the controller makes: verb, API group, resource (with
/// `/subresource`), and which object.
pub type Permission = (&'static str, &'static str, &'static str, Object);

/// The API calls the controller makes, as the chart's `rbac.yaml` grants
/// them; [`SELF_MANAGED_TLS_PERMISSIONS`] too unless cert-manager keeps its
/// certificate. `tests/tests/api_cli_cluster.rs` checks the chart's RBAC
/// against this list.
pub const CONTROLLER_PERMISSIONS: &[Permission] = &[
    ("list", "chaperone.dev", "agentidentities", Object::Any),
    ("watch", "chaperone.dev", "agentidentities", Object::Any),
    ("list", "chaperone.dev", "toolpolicies", Object::Any),
    ("watch", "chaperone.dev", "toolpolicies", Object::Any),
    ("list", "chaperone.dev", "delegationgrants", Object::Any),
    ("watch", "chaperone.dev", "delegationgrants", Object::Any),
    (
        "patch",
        "chaperone.dev",
        "agentidentities/status",
        Object::Any,
    ),
    ("patch", "chaperone.dev", "toolpolicies/status", Object::Any),
    (
        "patch",
        "chaperone.dev",
        "delegationgrants/status",
        Object::Any,
    ),
    ("create", "chaperone.dev", "toolcallapprovals", Object::Any),
    ("watch", "chaperone.dev", "toolcallapprovals", Object::Any),
    ("delete", "chaperone.dev", "toolcallapprovals", Object::Any),
    (
        "patch",
        "chaperone.dev",
        "toolcallapprovals/status",
        Object::Any,
    ),
    ("watch", "", "pods", Object::Any),
    ("watch", "", "namespaces", Object::Any),
    ("patch", "", "configmaps", Object::Any),
    (
        "create",
        "authentication.k8s.io",
        "tokenreviews",
        Object::Any,
    ),
    (
        "create",
        "authorization.k8s.io",
        "subjectaccessreviews",
        Object::Any,
    ),
    ("create", "events.k8s.io", "events", Object::Any),
    ("create", "", "events", Object::Any),
    (
        "create",
        "coordination.k8s.io",
        "leases",
        Object::InNamespace,
    ),
    ("update", "coordination.k8s.io", "leases", Object::Lease),
    ("watch", "", "configmaps", Object::InNamespace),
    ("create", "", "configmaps", Object::InNamespace),
    // The leader deletes the audit-key archive's expired months.
    ("delete", "", "configmaps", Object::InNamespace),
    ("get", "", "secrets", Object::TlsSecret),
];

/// The calls of a controller that keeps its own certificate and the
/// webhook's caBundle (no cert-manager).
pub const SELF_MANAGED_TLS_PERMISSIONS: &[Permission] = &[
    ("create", "", "secrets", Object::InNamespace),
    ("update", "", "secrets", Object::TlsSecret),
    (
        "patch",
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        Object::WebhookConfig,
    ),
];

async fn check_rbac(client: &Client, ns: &str, names: &ControllerNames, checks: &mut Checks) {
    let user = format!("system:serviceaccount:{ns}:{}", names.service_account);
    let api = Api::<SubjectAccessReview>::all(client.clone());
    let tls: &[Permission] = if names.external_tls {
        &[]
    } else {
        SELF_MANAGED_TLS_PERMISSIONS
    };
    let permissions: Vec<&Permission> = CONTROLLER_PERMISSIONS.iter().chain(tls).collect();
    let mut missing = Vec::new();
    for (verb, group, resource, object) in &permissions {
        let (resource, subresource) = match resource.split_once('/') {
            Some((r, s)) => (r, Some(s.to_owned())),
            None => (*resource, None),
        };
        let (namespace, name) = match object {
            Object::Any => (None, None),
            Object::InNamespace => (Some(ns.to_owned()), None),
            Object::TlsSecret => (Some(ns.to_owned()), Some(names.tls_secret.clone())),
            Object::Lease => (Some(ns.to_owned()), Some(names.lease.clone())),
            Object::WebhookConfig => (None, Some(names.webhook_config.clone())),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".to_owned(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".to_owned(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some((*verb).to_owned()),
                    group: Some((*group).to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource: subresource.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => {
                let what = match &subresource {
                    Some(sub) => format!("{resource}/{sub}"),
                    None => resource.to_owned(),
                };
                let group = if group.is_empty() { "core" } else { group };
                let name = name.map(|n| format!(" {n}")).unwrap_or_default();
                let scope = namespace.map(|n| format!(" in {n}")).unwrap_or_default();
                missing.push(format!("{verb} {group} {what}{name}{scope}"));
            }
            Err(error) => {
                checks.fail(
                    RBAC,
                    format!(
                        "the controller's permissions cannot be checked: {}",
                        why(error)
                    ),
                    "creating subjectaccessreviews is needed for this check",
                );
                return;
            }
        }
    }
    if missing.is_empty() {
        checks.pass(
            RBAC,
            format!(
                "{user} may make each of the controller's {} kinds of API call",
                permissions.len()
            ),
        );
    } else {
        checks.fail(
            RBAC,
            format!("{user} may not: {}", missing.join("; ")),
            "apply the chart's ClusterRole and Role with their bindings (helm upgrade), or name the account with --service-account",
        );
    }
}

async fn check_agents(client: &Client, checks: &mut Checks) {
    let agents = match Api::<AgentIdentity>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        Err(error) => {
            checks.fail(
                AGENTS,
                format!("agentidentities cannot be listed: {}", why(error)),
                "read access to agentidentities in every namespace is needed for this check",
            );
            return;
        }
    };
    let mut ready = 0;
    for agent in &agents {
        let key = format!(
            "{}/{}",
            agent.namespace().unwrap_or_default(),
            agent.name_any()
        );
        let condition = agent
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        match condition {
            Some(c) if c.status == "True" => ready += 1,
            Some(c) => checks.fail(
                AGENTS,
                format!(
                    "agentidentity {key} is not Ready: {}: {}",
                    c.reason, c.message
                ),
                format!(
                    "kubectl -n {} describe agentidentity {} shows its conditions",
                    agent.namespace().unwrap_or_default(),
                    agent.name_any()
                ),
            ),
            None => checks.fail(
                AGENTS,
                format!("agentidentity {key} has no Ready condition yet"),
                "the leader controller writes it; is a controller running and leading?",
            ),
        }
    }
    if ready == agents.len() {
        checks.pass(AGENTS, format!("every AgentIdentity is Ready ({ready})"));
    }
}

const READ_SIDECARS: &str = "read access to agentidentities is needed for this check";
const STUCK_SIDECAR: &str = "a sidecar acknowledges within seconds; if it stays behind, its \
    stream is stuck: delete the pod";

async fn check_sidecars(client: &Client, replicas: &[Replica], checks: &mut Checks) {
    match current_snapshots(client).await {
        Ok(current) => sidecar_checks(&sidecar_rows(replicas, &current), checks),
        Err(error) => checks.fail(SIDECARS, format!("{error:#}"), READ_SIDECARS),
    }
}

/// This CLI's, the replicas' and the sidecars' builds: one warning per
/// skew (a skew is worth a look, not a failure), else one pass.
fn check_versions(replicas: &[Replica], ns: &str, now: i64, checks: &mut Checks) {
    let (controllers, sidecars) = crate::version::builds(replicas, now);
    let skews = crate::version::skew(CLIENT_VERSION, &controllers, &sidecars, ns);
    if skews.is_empty() {
        let message = format!(
            "this chaperonectl ({CLIENT_VERSION}), the controller replicas and the sidecars run \
             one minor version"
        );
        checks.pass(VERSIONS, message);
    }
    for skew in skews {
        checks.warn(VERSIONS, skew, "chaperonectl version lists every build");
    }
}

/// How long a sidecar may have been connected without its key in the
/// audit-key archive (the controller writes it within seconds).
pub const ARCHIVE_GRACE_SECONDS: i64 = 120;

const ARCHIVE_HINT: &str = "sidecars built before key proofs register keys the controller \
    refuses: restart their pods; otherwise the controller's log says why it cannot write \
    ConfigMaps in its namespace (chaperone_controller_audit_key_archive_errors_total)";

async fn check_audit_keys(
    client: &Client,
    ns: &str,
    replicas: &[Replica],
    now: i64,
    checks: &mut Checks,
) {
    let selector = format!(
        "{}={}",
        audit_keys::COMPONENT_LABEL.0,
        audit_keys::COMPONENT_LABEL.1
    );
    let archive = match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => list.items,
        Err(error) => {
            let message = format!(
                "the audit-key archive in {ns} cannot be read: {}",
                why(error)
            );
            checks.fail(AUDIT_KEYS, message, READ_CONFIGMAPS);
            return;
        }
    };
    let archived: BTreeSet<String> = archive
        .iter()
        .flat_map(|cm| cm.data.iter().flat_map(|data| data.values()))
        .filter_map(|entry| serde_json::from_str::<audit_keys::ArchivedKey>(entry).ok())
        .map(|key| key.pod_uid)
        .collect();
    audit_key_checks(replicas, &archived, now, checks);
}

/// One warning naming the sidecars connected for over
/// [`ARCHIVE_GRACE_SECONDS`] to a live replica whose pod (by uid) has no key
/// in the archive (`archived_pod_uids`), or one pass.
fn audit_key_checks(
    replicas: &[Replica],
    archived_pod_uids: &BTreeSet<String>,
    now: i64,
    checks: &mut Checks,
) {
    let connected = replicas.iter().filter(|r| !r.stale).flat_map(|r| {
        let agents = r
            .sidecars
            .iter()
            .map(|s| (&s.namespace, &s.pod, &s.pod_uid, s.connected_at));
        let tools = r
            .tool_sidecars
            .iter()
            .map(|s| (&s.namespace, &s.pod, &s.pod_uid, s.connected_at));
        agents.chain(tools)
    });
    let mut counted = 0;
    let mut missing = BTreeSet::new();
    for (namespace, pod, uid, connected_at) in connected {
        if connected_at.is_none_or(|at| now - at < ARCHIVE_GRACE_SECONDS) {
            continue;
        }
        counted += 1;
        if !archived_pod_uids.contains(uid) {
            missing.insert(format!("{namespace}/{pod}"));
        }
    }
    if missing.is_empty() {
        checks.pass(
            AUDIT_KEYS,
            format!(
                "the audit-key archive holds the key of each of the {counted} sidecar(s) connected for over {ARCHIVE_GRACE_SECONDS} s"
            ),
        );
        return;
    }
    let named: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
    let more = missing.len().saturating_sub(named.len());
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    checks.warn(
        AUDIT_KEYS,
        format!(
            "{} sidecar(s) connected for over {ARCHIVE_GRACE_SECONDS} s have no key in the audit-key archive, so their trails will not verify once their pods are gone: {}{more}",
            missing.len(),
            named.join(", ")
        ),
        ARCHIVE_HINT,
    );
}

/// One failure per agent sidecar not on its agent's current snapshot, or
/// one pass when all are (tool-mode sidecars run no snapshot).
fn sidecar_checks(rows: &[SidecarRow], checks: &mut Checks) {
    let mut agent_sidecars = 0;
    let mut failed = false;
    for row in rows {
        let pod = format!("{}/{}", row.namespace, row.pod);
        let agent = row.agent.as_deref().unwrap_or_default();
        let version = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
        let (message, hint) = match row.sync {
            Sync::NotApplicable => continue,
            Sync::Synced => {
                agent_sidecars += 1;
                continue;
            }
            Sync::Rejected => (
                format!(
                    "sidecar {pod} rejected its agent's snapshot: {}",
                    row.nack.as_deref().unwrap_or_default()
                ),
                format!(
                    "fix the policy the error names; chaperonectl status {pod} shows the sidecar"
                ),
            ),
            Sync::Stale => (
                format!(
                    "sidecar {pod} runs snapshot {} of {agent}, not the current {}",
                    version(row.snapshot_version.map(|v| format!("v{v}"))),
                    version(row.latest_version.map(|v| format!("v{v}"))),
                ),
                STUCK_SIDECAR.to_owned(),
            ),
            Sync::Disconnected => (
                format!("sidecar {pod} is connected to no live controller replica"),
                format!(
                    "kubectl logs -n {} {} -c chaperone-proxy says why",
                    row.namespace, row.pod
                ),
            ),
            Sync::Unknown => (
                format!("sidecar {pod}: agent {agent} has no current snapshot"),
                format!("the Agents section, or kubectl describe agentidentity {agent}, says why"),
            ),
        };
        agent_sidecars += 1;
        failed = true;
        checks.fail(SIDECARS, message, hint);
    }
    if !failed {
        let message =
            format!("every agent sidecar runs its agent's current snapshot ({agent_sidecars})");
        checks.pass(SIDECARS, message);
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
