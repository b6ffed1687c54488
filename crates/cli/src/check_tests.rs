//! The pure parts of `chaperonectl check`: how an installed CRD differs, the
//! names of the controller's objects, the sidecar checks, certificate
//! validity, and the ✔/✘ lines.

use clap::Parser as _;
use serde_json::json;

use super::*;

/// The CRD this CLI generates for AgentIdentity, as the API server would
/// hold it: Established.
fn installed_agent_identity() -> (CustomResourceDefinition, CustomResourceDefinition) {
    let expected = chaperone_api::crds()
        .into_iter()
        .find(|c| c.name_any() == "agentidentities.chaperone.dev")
        .unwrap();
    let mut installed = expected.clone();
    installed.status = serde_json::from_value(json!({
        "conditions": [{"type": "Established", "status": "True"}]
    }))
    .unwrap();
    (expected, installed)
}

#[test]
fn an_established_crd_with_this_clis_schema_matches() {
    let (expected, installed) = installed_agent_identity();
    assert_eq!(crd_difference(&expected, &installed), None);
}

#[test]
fn another_schema_an_unserved_version_or_no_established_condition_is_named() {
    let (expected, installed) = installed_agent_identity();
    let mut older = installed.clone();
    let schema = older.spec.versions[0].schema.as_mut().unwrap();
    schema.open_api_v3_schema.as_mut().unwrap().description = Some("an older build".into());
    assert_eq!(
        crd_difference(&expected, &older).as_deref(),
        Some(
            "version v1alpha1's schema is not this CLI's (installed from another Chaperone version)"
        )
    );
    let mut unserved = installed.clone();
    unserved.spec.versions[0].served = false;
    assert_eq!(
        crd_difference(&expected, &unserved).as_deref(),
        Some("does not serve version v1alpha1")
    );
    let mut pending = installed;
    pending.status = None;
    assert_eq!(
        crd_difference(&expected, &pending).as_deref(),
        Some("is not Established yet")
    );
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    check: CheckArgs,
}

fn args(flags: &[&str]) -> CheckArgs {
    Cli::try_parse_from(std::iter::once("check").chain(flags.iter().copied()))
        .unwrap()
        .check
}

#[test]
fn names_come_from_the_flags_then_the_deployments_environment_then_the_chart() {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "prod-controller"},
        "spec": {
            "selector": {"matchLabels": {"app": "c"}},
            "template": {"spec": {
                "serviceAccountName": "prod-controller",
                "containers": [{"name": "controller", "env": [
                    {"name": "CHAPERONE_WEBHOOK_CONFIG", "value": "prod-injector"},
                    {"name": "CHAPERONE_TLS_SECRET", "value": "prod-controller-tls"},
                    {"name": "CHAPERONE_SERVICE_NAME", "value": "prod-controller"},
                    {"name": "CHAPERONE_LEASE_NAME", "value": "prod-controller"},
                    {"name": "CHAPERONE_EXTERNAL_TLS", "value": "true"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                ]}]
            }}
        }
    }))
    .unwrap();
    let from_deployment = ControllerNames::resolve(&args(&[]), Some(&deployment));
    assert_eq!(
        from_deployment,
        ControllerNames {
            webhook_config: "prod-injector".into(),
            tls_secret: "prod-controller-tls".into(),
            service: "prod-controller".into(),
            lease: "prod-controller".into(),
            service_account: "prod-controller".into(),
            external_tls: true,
        }
    );
    let flagged = ControllerNames::resolve(
        &args(&["--tls-secret", "mine", "--service-account", "sa"]),
        Some(&deployment),
    );
    assert_eq!(
        (
            flagged.tls_secret.as_str(),
            flagged.service_account.as_str()
        ),
        ("mine", "sa")
    );
    let defaults = ControllerNames::resolve(&args(&[]), None);
    assert_eq!(
        defaults,
        ControllerNames {
            webhook_config: "chaperone-injector".into(),
            tls_secret: "chaperone-controller-tls".into(),
            service: "chaperone-controller".into(),
            lease: "chaperone-controller".into(),
            service_account: "chaperone-controller".into(),
            external_tls: false,
        }
    );
}

#[test]
fn each_failure_carries_its_hint_and_the_summary_counts_them() {
    let mut checks = Checks::default();
    checks.pass(
        CRDS,
        "agentidentities.chaperone.dev is installed at this CLI's version",
    );
    checks.fail(
        AGENTS,
        "agentidentity shop/clerk is not Ready: NotCompiled: no snapshot compiled yet",
        "kubectl -n shop describe agentidentity clerk shows its conditions",
    );
    assert_eq!(
        render(&checks.0),
        "CRDs\n----\n\
         ✔ agentidentities.chaperone.dev is installed at this CLI's version\n\
         \n\
         Agents\n------\n\
         ✘ agentidentity shop/clerk is not Ready: NotCompiled: no snapshot compiled yet\n    \
         hint: kubectl -n shop describe agentidentity clerk shows its conditions\n\
         \n\
         Status check results are ✘ (1 of 2 checks failed)\n"
    );
    checks.0.pop();
    assert!(
        render(&checks.0).ends_with("\nStatus check results are ✔ (1 checks)\n"),
        "{}",
        render(&checks.0)
    );
    checks.warn(
        VERSIONS,
        "controller replica c-1 runs 0.2.0",
        "chaperonectl version lists every build",
    );
    let text = render(&checks.0);
    assert!(
        text.contains("‼ controller replica c-1 runs 0.2.0\n    hint: chaperonectl version")
            && text.ends_with("\nStatus check results are ✔ (2 checks, 1 with a warning)\n"),
        "a warning passes: {text}"
    );
}

#[test]
fn a_certificate_is_refused_before_its_start_after_its_end_and_near_its_end() {
    let certified = rcgen::generate_simple_self_signed(vec!["chaperone-test".to_owned()]).unwrap();
    let der = certified.cert.der().to_vec();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let (from, until) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    assert_eq!(validity_problem(&cert, from + 10, 0), None);
    assert!(
        validity_problem(&cert, from - 10, 0).is_some_and(|p| p.starts_with("is not valid before")),
    );
    assert!(validity_problem(&cert, until, 0).is_some_and(|p| p.starts_with("expired ")));
    assert!(
        validity_problem(&cert, until - 60, 7 * 86400).is_some_and(|p| p.starts_with("expires ")),
    );
}

fn row(pod: &str, sync: Sync) -> SidecarRow {
    SidecarRow {
        namespace: "shop".into(),
        pod: pod.into(),
        agent: (sync != Sync::NotApplicable).then(|| "shop/clerk".to_owned()),
        mode: if sync == Sync::NotApplicable {
            "tool"
        } else {
            "agent"
        },
        replica: "c-0".into(),
        sidecar_version: Some("0.1.0".into()),
        snapshot_version: Some(3),
        latest_version: Some(4),
        sync,
        acked_at: None,
        connected_at: None,
        nack: (sync == Sync::Rejected).then(|| "rejected v4: bad rule".to_owned()),
        tools: Vec::new(),
    }
}

#[test]
fn each_agent_sidecar_off_its_current_snapshot_fails_and_tool_sidecars_count_for_nothing() {
    let mut checks = Checks::default();
    let rows = [
        row("a", Sync::Synced),
        row("b", Sync::Stale),
        row("c", Sync::Rejected),
        row("d", Sync::Unknown),
        row("orders-0", Sync::NotApplicable),
    ];
    sidecar_checks(&rows, &mut checks);
    let messages: Vec<(&str, bool)> = checks
        .0
        .iter()
        .map(|c| (c.message.as_str(), c.ok))
        .collect();
    assert_eq!(
        messages,
        [
            (
                "sidecar shop/b runs snapshot v3 of shop/clerk, not the current v4",
                false
            ),
            (
                "sidecar shop/c rejected its agent's snapshot: rejected v4: bad rule",
                false
            ),
            (
                "sidecar shop/d: agent shop/clerk has no current snapshot",
                false
            ),
        ]
    );
    assert!(checks.0.iter().all(|c| c.hint.is_some()));

    let mut checks = Checks::default();
    sidecar_checks(
        &[row("a", Sync::Synced), row("orders-0", Sync::NotApplicable)],
        &mut checks,
    );
    assert_eq!(checks.0.len(), 1);
    assert_eq!(
        checks.0[0].message,
        "every agent sidecar runs its agent's current snapshot (1)"
    );
    assert!(checks.0[0].ok);
}

#[test]
fn sidecars_connected_past_the_grace_without_an_archived_key_are_named() {
    use chaperone_api::replica_state::{PublishedSidecar, PublishedToolSidecar};
    let now = 10_000;
    let agent = |pod: &str, uid: &str, since: i64| PublishedSidecar {
        namespace: "team".into(),
        pod: pod.into(),
        pod_uid: uid.into(),
        connected_at: Some(since),
        ..Default::default()
    };
    let replica =
        |stale: bool, sidecars: Vec<PublishedSidecar>, tools: Vec<PublishedToolSidecar>| Replica {
            pod: "chaperone-controller-0".into(),
            version: None,
            heartbeat: now,
            stale,
            unreadable: None,
            sidecars,
            tool_sidecars: tools,
        };
    let tool = PublishedToolSidecar {
        namespace: "tools".into(),
        pod: "orders-0".into(),
        pod_uid: "u-tool".into(),
        connected_at: Some(now - 600),
        ..Default::default()
    };
    let replicas = [
        replica(
            false,
            vec![
                agent("archived", "u1", now - 600),
                agent("unarchived", "u2", now - 600),
                // Just connected: the controller has not written it yet.
                agent("new", "u3", now - 5),
            ],
            vec![tool],
        ),
        // A stopped replica's sidecars count for nothing.
        replica(true, vec![agent("gone", "u4", now - 600)], Vec::new()),
    ];
    let mut checks = Checks::default();
    let archived: BTreeSet<String> = ["u1".to_owned()].into();
    audit_key_checks(&replicas, &archived, now, &mut checks);
    let [check] = &checks.0[..] else {
        panic!("{:?}", checks.0.len())
    };
    assert!(check.ok && check.warning, "a warning, not a failure");
    assert!(
        check
            .message
            .starts_with("2 sidecar(s) connected for over 120 s have no key")
            && check.message.ends_with(": team/unarchived, tools/orders-0"),
        "{}",
        check.message
    );
    let archived: BTreeSet<String> = ["u1", "u2", "u-tool"].map(str::to_owned).into();
    let mut checks = Checks::default();
    audit_key_checks(&replicas, &archived, now, &mut checks);
    assert!(
        checks.0[0].ok && !checks.0[0].warning,
        "{}",
        checks.0[0].message
    );
    assert!(
        checks.0[0].message.contains("each of the 3 sidecar(s)"),
        "{}",
        checks.0[0].message
    );
}
