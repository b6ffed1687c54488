//! `chaperonectl approval list|approve|deny` against a real kube-apiserver
//! (etcd + kube-apiserver with RBAC, the repository's CRDs), run as the
//! binary with the test control plane's kubeconfig. No admission webhook is
//! registered here: `decidedBy` and the phase stay as they were, so these
//! tests check only what the CLI sends, reads and refuses, and that
//! impersonation reaches the API server's authorisation.

use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Result, bail};
use chaperone_api::approval::{
    ApprovalDelegationLink, ApprovalPhase, ApprovalPolicyRef, ApprovalSession, CONDITION_APPROVED,
    CONDITION_DENIED, ToolCallApproval, ToolCallApprovalSpec,
};
use chaperone_testenv::{ControlPlane, create_namespace, kube_fixtures};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

/// The control plane with the CRDs installed (once per test binary).
fn control_plane() -> &'static ControlPlane {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    INSTALLED.get_or_init(|| {
        kube_fixtures::install_crds(cp).expect("installing the CRDs");
    });
    cp
}

/// An admin client and a fresh namespace.
async fn setup(prefix: &str) -> Result<(Client, String)> {
    let client = control_plane().client().await?;
    let ns = create_namespace(&client, prefix).await?;
    Ok((client, ns))
}

/// Creates ToolCallApproval `name` in `ns` the way the controller does
/// (spec, then `status.phase: Pending`); `status` is merged into the status
/// afterwards when given.
async fn create_request(
    client: &Client,
    ns: &str,
    name: &str,
    status: Option<Value>,
) -> Result<ToolCallApproval> {
    create_request_with(client, ns, name, status, |_| {}).await
}

/// [`create_request`] with `edit` applied to the spec first.
async fn create_request_with(
    client: &Client,
    ns: &str,
    name: &str,
    status: Option<Value>,
    edit: impl FnOnce(&mut ToolCallApprovalSpec),
) -> Result<ToolCallApproval> {
    let now = Timestamp::now();
    let mut object = ToolCallApproval::new(
        name,
        ToolCallApprovalSpec {
            agent: "refunder".into(),
            service_account: "refunder".into(),
            pod: "refunder-6c9f".into(),
            session: ApprovalSession {
                scope: "task".into(),
                key: "t-42".into(),
            },
            initiator: Some("alice@example.com".into()),
            delegation_chain: vec![ApprovalDelegationLink {
                agent: format!("{ns}/planner"),
                grant: format!("{ns}/planner-refunds"),
            }],
            server: "payments".into(),
            tool: "refund".into(),
            arguments: json!({ "amount": 250, "card": "[redacted]" }),
            redacted_arguments: vec!["/card".into()],
            args_digest: "ab".repeat(32),
            args_alg: "sha256-rfc8785".into(),
            policy: ApprovalPolicyRef {
                namespace: ns.into(),
                name: "refunds".into(),
            },
            rule: "mid-refunds".into(),
            requested_at: (now - SignedDuration::from_secs(300)).to_string(),
            expires_at: (now + SignedDuration::from_secs(600)).to_string(),
            valid_for_seconds: 300,
        },
    );
    object.metadata.namespace = Some(ns.into());
    edit(&mut object.spec);
    let api = Api::<ToolCallApproval>::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &object).await?;
    let mut merged = json!({ "status": { "phase": "Pending" } });
    if let Some(status) = status {
        merged["status"]
            .as_object_mut()
            .unwrap()
            .extend(status.as_object().unwrap().clone());
    }
    Ok(api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&merged))
        .await?)
}

async fn get(client: &Client, ns: &str, name: &str) -> Result<ToolCallApproval> {
    Ok(Api::<ToolCallApproval>::namespaced(client.clone(), ns)
        .get(name)
        .await?)
}

fn conditions(object: &ToolCallApproval) -> Vec<Condition> {
    object
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// Runs `chaperonectl approval ARGS` with the admin kubeconfig.
fn chaperonectl(args: &[&str]) -> Output {
    let cp = control_plane();
    Command::new(env!("CARGO_BIN_EXE_chaperonectl"))
        .arg("approval")
        .args(args)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .env_remove("KUBECONFIG")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running chaperonectl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "chaperonectl failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Asserts failure and returns stderr.
fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "chaperonectl succeeded but should not have:\nstdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
    stderr(out)
}

#[tokio::test]
async fn list_shows_pending_requests_with_arguments_and_chain() -> Result<()> {
    let (client, ns) = setup("cli-list").await?;
    create_request(&client, &ns, "refunder-pending", None).await?;
    let decided = json!({
        "phase": "Denied",
        "conditions": [{
            "type": "Denied", "status": "True", "reason": "ByTest", "message": "",
            "lastTransitionTime": Timestamp::now().to_string(),
        }],
        "decidedBy": { "username": "bob" },
    });
    create_request(&client, &ns, "refunder-denied", Some(decided)).await?;

    let table = succeeded(&chaperonectl(&["list", "-n", &ns]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAME",
            "AGENT",
            "TOOL",
            "PHASE",
            "REQUESTED",
            "EXPIRES",
            "DECIDED-BY"
        ],
        "{table}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[..5],
        ["refunder-pending", "refunder", "refund", "Pending", "5m"],
        "{table}"
    );
    assert_eq!(
        lines[2],
        format!(
            r#"    args: {{"amount":250,"card":"[redacted]"}}  chain: {ns}/planner → {ns}/refunder"#
        )
    );
    assert!(!table.contains("refunder-denied"), "{table}");

    let all = succeeded(&chaperonectl(&["list", "--all", "-n", &ns]));
    let denied = all
        .lines()
        .find(|line| line.starts_with("refunder-denied"))
        .unwrap_or_else(|| panic!("no denied row in\n{all}"));
    assert_eq!(
        denied.split_whitespace().collect::<Vec<_>>()[3..],
        ["Denied", "5m", "-", "bob"]
    );
    Ok(())
}

#[tokio::test]
async fn list_prints_the_objects_as_json_and_yaml() -> Result<()> {
    let (client, ns) = setup("cli-json").await?;
    create_request(&client, &ns, "refunder-json", None).await?;
    let out = succeeded(&chaperonectl(&["list", "-n", &ns, "-o", "json"]));
    let list: Value = serde_json::from_str(&out)?;
    assert_eq!(list["kind"], "List");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["kind"], "ToolCallApproval");
    assert_eq!(items[0]["apiVersion"], "chaperone.dev/v1alpha1");
    assert_eq!(items[0]["metadata"]["name"], "refunder-json");
    assert_eq!(items[0]["spec"]["arguments"]["card"], "[redacted]");
    assert_eq!(items[0]["status"]["phase"], "Pending");
    assert_eq!(items[0]["metadata"].get("managedFields"), None);

    let yaml = succeeded(&chaperonectl(&["list", "-n", &ns, "-o", "yaml"]));
    let list: Value = serde_saphyr::from_str(&yaml)?;
    assert_eq!(list["items"][0]["metadata"]["name"], "refunder-json");
    Ok(())
}

#[tokio::test]
async fn list_across_namespaces_names_each_namespace() -> Result<()> {
    let (client, first) = setup("cli-all-a").await?;
    let second = create_namespace(&client, "cli-all-b").await?;
    create_request(&client, &first, "refunder-a", None).await?;
    create_request(&client, &second, "refunder-b", None).await?;
    let table = succeeded(&chaperonectl(&["list", "-A", "-o", "wide"]));
    assert!(table.starts_with("NAMESPACE "), "{table}");
    for (ns, name) in [(&first, "refunder-a"), (&second, "refunder-b")] {
        let row = table
            .lines()
            .find(|line| line.starts_with(ns.as_str()))
            .unwrap_or_else(|| panic!("no row for {ns} in\n{table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], name);
        let refunds = format!("{ns}/refunds");
        assert_eq!(
            cells[cells.len() - 4..],
            ["payments", "task/t-42", refunds.as_str(), "mid-refunds"],
            "{row}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn list_says_when_nothing_is_pending() -> Result<()> {
    let (_, ns) = setup("cli-empty").await?;
    let out = chaperonectl(&["list", "-n", &ns]);
    assert_eq!(succeeded(&out), "");
    assert_eq!(
        stderr(&out).trim(),
        format!("No pending tool call approvals in namespace {ns}.")
    );
    Ok(())
}

#[tokio::test]
async fn approve_shows_the_call_and_adds_the_approved_condition() -> Result<()> {
    let (client, ns) = setup("cli-approve").await?;
    let before = create_request(&client, &ns, "refunder-ok", None).await?;
    let out = succeeded(&chaperonectl(&[
        "approve",
        "refunder-ok",
        "-n",
        &ns,
        "--message",
        "checked ticket 123",
    ]));
    for shown in [
        format!("ToolCallApproval {ns}/refunder-ok"),
        "Tool:      refund".to_owned(),
        "Session:   task t-42".to_owned(),
        format!("Chain:     {ns}/planner (grant {ns}/planner-refunds) → {ns}/refunder"),
        "(redacted: /card)".to_owned(),
        "\"card\": \"[redacted]\"".to_owned(),
        "toolcallapproval.chaperone.dev/refunder-ok approved".to_owned(),
    ] {
        assert!(out.contains(&shown), "{shown:?} missing from\n{out}");
    }

    let after = get(&client, &ns, "refunder-ok").await?;
    let conditions = conditions(&after);
    assert_eq!(conditions.len(), 1);
    let approved = &conditions[0];
    assert_eq!(approved.type_, CONDITION_APPROVED);
    assert_eq!(approved.status, "True");
    assert_eq!(approved.reason, "ApprovedByUser");
    assert_eq!(approved.message, "checked ticket 123");
    let age = Timestamp::now().duration_since(approved.last_transition_time.0);
    assert!(age < SignedDuration::from_secs(60), "{age:?}");
    // The CLI writes the condition only: the phase and decidedBy are the
    // webhook's (not registered here).
    let status = after.status.unwrap();
    assert_eq!(status.phase, Some(ApprovalPhase::Pending));
    assert_eq!(status.decided_by, None);
    assert_eq!(after.spec, before.spec);
    Ok(())
}

#[tokio::test]
async fn deny_records_the_reason_and_message() -> Result<()> {
    let (client, ns) = setup("cli-deny").await?;
    create_request(&client, &ns, "refunder-no", None).await?;
    let out = succeeded(&chaperonectl(&[
        "deny",
        "refunder-no",
        "-n",
        &ns,
        "--reason",
        "AmountTooLarge",
        "--message",
        "refunds over 200 need a ticket",
    ]));
    assert!(out.contains("toolcallapproval.chaperone.dev/refunder-no denied"));
    let conditions = conditions(&get(&client, &ns, "refunder-no").await?);
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].type_, CONDITION_DENIED);
    assert_eq!(conditions[0].status, "True");
    assert_eq!(conditions[0].reason, "AmountTooLarge");
    assert_eq!(conditions[0].message, "refunds over 200 need a ticket");
    Ok(())
}

#[tokio::test]
async fn deciding_a_request_that_is_not_pending_is_refused_locally() -> Result<()> {
    let (client, ns) = setup("cli-decided").await?;
    create_request(&client, &ns, "refunder-twice", None).await?;
    succeeded(&chaperonectl(&["approve", "refunder-twice", "-n", &ns]));
    let before = get(&client, &ns, "refunder-twice").await?;

    for verb in ["approve", "deny"] {
        let out = chaperonectl(&[verb, "refunder-twice", "-n", &ns]);
        let err = failed(&out);
        assert_eq!(
            stdout(&out),
            "",
            "a decided request is not shown as if to decide"
        );
        assert!(
            err.contains(&format!(
                "cannot {verb} toolcallapproval {ns}/refunder-twice: it was already approved"
            )),
            "{err}"
        );
        assert!(err.contains("Only a Pending request"), "{err}");
    }
    let after = get(&client, &ns, "refunder-twice").await?;
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );

    let consumed = json!({ "phase": "Consumed", "consumedAt": Timestamp::now().to_string() });
    create_request(&client, &ns, "refunder-used", Some(consumed)).await?;
    let err = failed(&chaperonectl(&["deny", "refunder-used", "-n", &ns]));
    assert!(err.contains("approved and used"), "{err}");

    // Past its expiry, before the controller records it.
    create_request_with(&client, &ns, "refunder-late", None, |spec| {
        spec.expires_at = (Timestamp::now() - SignedDuration::from_secs(1)).to_string();
    })
    .await?;
    let err = failed(&chaperonectl(&["approve", "refunder-late", "-n", &ns]));
    assert!(err.contains("has expired (nobody decided before"), "{err}");
    assert!(conditions(&get(&client, &ns, "refunder-late").await?).is_empty());
    Ok(())
}

#[tokio::test]
async fn an_unknown_request_is_named_in_the_error() -> Result<()> {
    let (_, ns) = setup("cli-missing").await?;
    let err = failed(&chaperonectl(&["approve", "nope", "-n", &ns]));
    assert!(
        err.contains(&format!("toolcallapproval {ns}/nope not found")),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_free_text_reason_is_refused_before_anything_is_sent() -> Result<()> {
    let (client, ns) = setup("cli-reason").await?;
    create_request(&client, &ns, "refunder-reason", None).await?;
    let err = failed(&chaperonectl(&[
        "deny",
        "refunder-reason",
        "-n",
        &ns,
        "--reason",
        "too large",
    ]));
    assert!(
        err.contains("CamelCase") && err.contains("--message"),
        "{err}"
    );
    assert!(conditions(&get(&client, &ns, "refunder-reason").await?).is_empty());
    Ok(())
}

/// A Role in `ns` with `rules`, bound to `subject` (a `User` or `Group`).
async fn grant(
    client: &Client,
    ns: &str,
    name: &str,
    rules: Value,
    subject: (&str, &str),
) -> Result<()> {
    kube_fixtures::apply::<Role>(
        client,
        ns,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": { "name": name },
            "rules": rules,
        }),
    )
    .await?;
    kube_fixtures::apply::<RoleBinding>(
        client,
        ns,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": { "name": name },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
            "subjects": [{
                "apiGroup": "rbac.authorization.k8s.io", "kind": subject.0, "name": subject.1,
            }],
        }),
    )
    .await?;
    Ok(())
}

/// Waits until `check` holds (RBAC changes reach the authoriser's cache
/// shortly after they are written).
async fn eventually(mut check: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match check() {
            Ok(()) => return Ok(()),
            Err(err) if std::time::Instant::now() > deadline => return Err(err),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
}

#[tokio::test]
async fn impersonated_users_are_authorised_as_themselves() -> Result<()> {
    let (client, ns) = setup("cli-as").await?;
    create_request(&client, &ns, "refunder-as", None).await?;

    // A user with no rights cannot even read the request.
    let err = failed(&chaperonectl(&[
        "approve",
        "refunder-as",
        "-n",
        &ns,
        "--as",
        "mallory",
    ]));
    assert!(
        err.contains(&format!(
            "reading toolcallapproval {ns}/refunder-as: refused by the API server (Forbidden, HTTP 403)"
        )),
        "{err}"
    );
    assert!(
        err.contains(r#"User "mallory" cannot get resource "toolcallapprovals""#),
        "{err}"
    );

    // A viewer reads it (the call is shown) but cannot update its status.
    let read = json!([{
        "apiGroups": ["chaperone.dev"], "resources": ["toolcallapprovals"],
        "verbs": ["get", "list"],
    }]);
    grant(&client, &ns, "viewer", read.clone(), ("User", "victor")).await?;
    eventually(|| {
        let out = chaperonectl(&["approve", "refunder-as", "-n", &ns, "--as", "victor"]);
        let err = stderr(&out);
        if out.status.success() {
            bail!("victor approved: {}", stdout(&out));
        }
        if !err.contains(&format!(
            "approve toolcallapproval {ns}/refunder-as: refused by the API server (Forbidden, HTTP 403)"
        )) || !err.contains(r#"User "victor" cannot patch resource "toolcallapprovals/status""#)
        {
            bail!("unexpected error: {err}");
        }
        if !stdout(&out).contains("Tool:      refund") {
            bail!("the call was not shown: {}", stdout(&out));
        }
        Ok(())
    })
    .await?;
    assert!(conditions(&get(&client, &ns, "refunder-as").await?).is_empty());

    // The approvers' group may update the status: the groups are sent too.
    let mut approve = read;
    approve.as_array_mut().unwrap().push(json!({
        "apiGroups": ["chaperone.dev"], "resources": ["toolcallapprovals/status"],
        "verbs": ["patch"],
    }));
    grant(&client, &ns, "approver", approve, ("Group", "approvers")).await?;
    let err = failed(&chaperonectl(&[
        "approve",
        "refunder-as",
        "-n",
        &ns,
        "--as",
        "carol",
    ]));
    assert!(err.contains(r#"User "carol" cannot get"#), "{err}");
    eventually(|| {
        let out = chaperonectl(&[
            "approve",
            "refunder-as",
            "-n",
            &ns,
            "--as",
            "carol",
            "--as-group",
            "approvers",
        ]);
        if !out.status.success() {
            bail!("carol in approvers was refused: {}", stderr(&out));
        }
        Ok(())
    })
    .await?;
    let conditions = conditions(&get(&client, &ns, "refunder-as").await?);
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].type_, CONDITION_APPROVED);
    Ok(())
}

#[tokio::test]
async fn an_unknown_context_is_refused() -> Result<()> {
    let err = failed(&chaperonectl(&["list", "--context", "elsewhere"]));
    assert!(err.contains("kubeconfig"), "{err}");
    Ok(())
}

/// What the CLI's update relies on: a status merge patch that carries the
/// resourceVersion it was read at conflicts when someone decided in between,
/// instead of replacing their conditions.
#[tokio::test]
async fn a_status_patch_read_at_an_old_version_conflicts() -> Result<()> {
    let (client, ns) = setup("cli-conflict").await?;
    let read = create_request(&client, &ns, "refunder-race", None).await?;
    succeeded(&chaperonectl(&["deny", "refunder-race", "-n", &ns]));
    let stale = json!({
        "metadata": { "resourceVersion": read.metadata.resource_version },
        "status": { "conditions": [{
            "type": "Approved", "status": "True", "reason": "ApprovedByUser", "message": "",
            "lastTransitionTime": Timestamp::now().to_string(),
        }]},
    });
    let err = Api::<ToolCallApproval>::namespaced(client.clone(), &ns)
        .patch_status(
            "refunder-race",
            &PatchParams::default(),
            &Patch::Merge(&stale),
        )
        .await
        .expect_err("a stale patch was applied");
    assert!(
        matches!(&err, kube::Error::Api(status) if status.is_conflict()),
        "{err}"
    );
    let conditions = conditions(&get(&client, &ns, "refunder-race").await?);
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].type_, CONDITION_DENIED);
    Ok(())
}
