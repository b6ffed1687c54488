//! The generated CRDs on a real API server: they install, document their fields
//! for `kubectl explain`, accept the examples, reject every invalid object with the
//! message of the rule it breaks, and show their printer columns.

use std::{fs, path::PathBuf, sync::OnceLock};

use anyhow::{Context, Result, bail};
use chaperone_api::{AgentIdentity, AgentIdentitySpecV1, model};
use chaperone_testenv::{ControlPlane, create_namespace, unique_suffix};
use kube::{Api, api::PostParams};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Installs `crds/` once per test binary and waits until they are Established.
fn control_plane() -> &'static ControlPlane {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    INSTALLED.get_or_init(|| {
        let crds = repo_root().join("crds");
        let out = cp
            .kubectl(&["apply", "--server-side", "-f", crds.to_str().unwrap()])
            .unwrap();
        assert!(
            out.status.success(),
            "installing CRDs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cp
            .kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "-f",
                crds.to_str().unwrap(),
            ])
            .unwrap();
        assert!(
            out.status.success(),
            "CRDs not Established: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    cp
}

fn kubectl_ok(args: &[&str]) -> Result<String> {
    let out = control_plane().kubectl(args)?;
    if !out.status.success() {
        bail!(
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn new_namespace() -> String {
    let cp = control_plane();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { create_namespace(&cp.client().await?, "crds").await })
        .unwrap()
}

/// Applies `yaml` in `ns`; returns kubectl's stderr when the API server refuses it.
fn apply(ns: &str, yaml: &str) -> Result<(), String> {
    let out = control_plane()
        .kubectl_with_stdin(&["apply", "-n", ns, "-f", "-"], Some(yaml))
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn crds_become_established_with_short_names_and_category() -> Result<()> {
    control_plane();
    let resources = kubectl_ok(&["api-resources", "--api-group=chaperone.dev", "-o", "wide"])?;
    for (kind, short) in [
        ("AgentIdentity", "agentid"),
        ("ToolPolicy", "tpol"),
        ("DelegationGrant", "dgrant"),
    ] {
        let line = resources
            .lines()
            .find(|l| l.contains(kind))
            .with_context(|| format!("{kind} not served:\n{resources}"))?;
        assert!(
            line.contains(short),
            "{kind} lacks short name {short}: {line}"
        );
        assert!(
            line.contains("chaperone"),
            "{kind} lacks category chaperone: {line}"
        );
    }
    Ok(())
}

#[test]
fn kubectl_explain_shows_field_docs() -> Result<()> {
    control_plane();
    let text = kubectl_ok(&["explain", "toolpolicy.spec.rules.when.args.pointer"])?;
    assert!(text.contains("JSON pointer into the arguments"), "{text}");
    let text = kubectl_ok(&["explain", "delegationgrant.spec.maxDepth"])?;
    assert!(text.contains("further hops"), "{text}");
    let text = kubectl_ok(&["explain", "agentidentity.status.discoveredTools"])?;
    assert!(text.contains("tools/list"), "{text}");
    // Doc comments' rustdoc links read as plain words.
    for kind in [
        "agentidentity",
        "toolpolicy",
        "delegationgrant",
        "toolcallapproval",
    ] {
        let text = kubectl_ok(&["explain", kind, "--recursive=false"])?;
        assert!(!text.contains("[`"), "{text}");
        let spec = kubectl_ok(&["explain", &format!("{kind}.spec")])?;
        assert!(!spec.contains("[`"), "{spec}");
    }
    Ok(())
}

#[test]
fn examples_are_accepted() -> Result<()> {
    let ns = new_namespace();
    let mut applied = 0;
    for dir in fs::read_dir(repo_root().join("examples"))? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for file in fs::read_dir(&dir)? {
            let file = file?.path();
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            // Test files of `chaperonectl policy test` are not CRs.
            if !name.ends_with(".yaml") || name.contains("test") {
                continue;
            }
            // The examples name namespace `default`; apply them into a fresh one.
            let docs: Vec<serde_json::Value> =
                serde_saphyr::from_multiple(&fs::read_to_string(&file)?)
                    .with_context(|| format!("parsing {}", file.display()))?;
            for mut doc in docs.into_iter().filter(|d| !d.is_null()) {
                if let Some(meta) = doc.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                    meta.remove("namespace");
                }
                apply(&ns, &doc.to_string())
                    .map_err(|e| anyhow::anyhow!("{} refused: {e}", file.display()))?;
                applied += 1;
            }
        }
    }
    assert!(
        applied >= 2,
        "expected example CRs under examples/*/, applied {applied}"
    );
    let listed = kubectl_ok(&["get", "chaperone", "-n", &ns, "-o", "name"])?;
    assert!(listed.contains("agentidentity.chaperone.dev/"), "{listed}");
    assert!(listed.contains("toolpolicy.chaperone.dev/"), "{listed}");
    Ok(())
}

#[test]
fn printer_columns_appear_in_kubectl_get() -> Result<()> {
    let ns = new_namespace();
    apply(&ns, AGENT).unwrap();
    apply(&ns, POLICY).unwrap();
    apply(&ns, GRANT).unwrap();
    let agents = kubectl_ok(&["get", "agentidentities", "-n", &ns])?;
    let header: Vec<&str> = agents
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "READY", "MODE", "SNAPSHOT", "SIDECARS", "IN-SYNC", "TOOLS", "AGE"
        ],
        "{agents}"
    );
    assert!(
        agents.contains("planner") && agents.contains("enforce"),
        "{agents}"
    );
    let policies = kubectl_ok(&["get", "tpol", "-n", &ns])?;
    assert!(
        policies.starts_with("NAME") && policies.contains("RULES") && policies.contains("AGENTS"),
        "{policies}"
    );
    let grants = kubectl_ok(&["get", "dgrant", "-n", &ns])?;
    let row = grants.lines().nth(1).unwrap_or_default();
    assert!(
        grants.contains("FROM") && grants.contains("MAX-DEPTH") && grants.contains("EXPIRES"),
        "{grants}"
    );
    assert!(
        row.contains("planner") && row.contains("worker"),
        "{grants}"
    );
    // The controller resolves the expiry into the status; a future time reads
    // as itself (a `date` column would print `<invalid>`).
    kubectl_ok(&[
        "patch",
        "dgrant",
        "planner-to-worker",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"expiresAt":"2031-05-06T07:08:09Z"}}"#,
    ])?;
    let grants = kubectl_ok(&["get", "dgrant", "-n", &ns])?;
    assert!(
        grants.contains("2031-05-06T07:08:09Z") && !grants.contains("<invalid>"),
        "{grants}"
    );
    Ok(())
}

#[tokio::test]
async fn typed_objects_round_trip_with_defaults() -> Result<()> {
    let cp = control_plane();
    let client = cp.client().await?;
    let ns = create_namespace(&client, "crds").await?;
    let api: Api<AgentIdentity> = Api::namespaced(client, &ns);
    let name = format!("agent-{}", unique_suffix());
    let spec = model::AgentIdentitySpec {
        selector: model::AgentSelector {
            service_account_name: "agent".into(),
            ..Default::default()
        },
        tool_servers: vec![model::ToolServer {
            tool_pinning: Default::default(),
            upstream_secret: None,
            name: "orders".into(),
            url: "http://orders.tools.svc:8080/mcp".into(),
            audience: None,
            agent: None,
        }],
        session: Some(model::SessionSettings::default()),
        ..Default::default()
    };
    api.create(
        &PostParams::default(),
        &AgentIdentity::new(&name, AgentIdentitySpecV1(spec.clone())),
    )
    .await?;
    let stored = api.get(&name).await?;
    assert_eq!(stored.spec.0, spec);
    assert_eq!(stored.spec.0.mode, model::EnforcementMode::Enforce);
    Ok(())
}

const AGENT: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata: { name: planner }
spec:
  selector: { serviceAccountName: planner }
  toolServers:
  - { name: orders, url: "http://orders.tools.svc:8080/mcp" }
"#;

const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: { name: orders }
spec:
  targetRefs: [{ name: planner }]
  rules:
  - name: read-orders
    action: allow
    tools: [{ server: orders, name: "get_*" }]
"#;

const GRANT: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: DelegationGrant
metadata: { name: planner-to-worker }
spec:
  from: { name: planner }
  to: { name: worker }
  tools: [{ server: orders, name: get_order }]
  maxDepth: 1
  ttl: 1h
"#;

/// One invalid object per validation rule, and a fragment of the message the API
/// server must answer with.
const INVALID: &[(&str, &str, &str)] = &[
    (
        "duplicate tool server names",
        r#"{kind: AgentIdentity, spec: {selector: {serviceAccountName: a}, toolServers: [{name: x, url: "http://a"}, {name: x, url: "http://b"}]}}"#,
        "spec.toolServers[1]: Duplicate value",
    ),
    (
        "tool server URL scheme",
        r#"{kind: AgentIdentity, spec: {selector: {serviceAccountName: a}, toolServers: [{name: x, url: "ftp://a"}]}}"#,
        "url must start with http:// or https://",
    ),
    (
        "tool server name not a DNS label",
        r#"{kind: AgentIdentity, spec: {selector: {serviceAccountName: a}, toolServers: [{name: "Orders", url: "http://a"}]}}"#,
        "spec.toolServers[0].name",
    ),
    (
        "assertion lifetime above 5 minutes",
        r#"{kind: AgentIdentity, spec: {selector: {serviceAccountName: a}, assertion: {lifetimeSeconds: 301}}}"#,
        "spec.assertion.lifetimeSeconds: Invalid value: 301: spec.assertion.lifetimeSeconds in body should be less than or equal to 300",
    ),
    (
        "maxDisconnectedSeconds below 5 s",
        r#"{kind: AgentIdentity, spec: {selector: {serviceAccountName: a}, maxDisconnectedSeconds: 2}}"#,
        "spec.maxDisconnectedSeconds: Invalid value: 2: spec.maxDisconnectedSeconds in body should be greater than or equal to 5",
    ),
    (
        "initiator with both jwks and jwksUrl",
        r#"{kind: AgentIdentity, spec: {selector: {serviceAccountName: a}, initiators: [{issuer: i, audience: a, jwks: "{}", jwksUrl: "https://x"}]}}"#,
        "set exactly one of jwks",
    ),
    (
        "unknown mode",
        r#"{kind: AgentIdentity, spec: {selector: {serviceAccountName: a}, mode: audit}}"#,
        "spec.mode: Unsupported value: \"audit\"",
    ),
    (
        "policy with both targetRefs and agentSelector",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], agentSelector: {matchLabels: {}}, rules: [{name: r, action: allow, tools: [{name: t}]}]}}"#,
        "set exactly one of targetRefs",
    ),
    (
        "policy with neither targetRefs nor agentSelector",
        r#"{kind: ToolPolicy, spec: {rules: [{name: r, action: allow, tools: [{name: t}]}]}}"#,
        "set exactly one of targetRefs",
    ),
    (
        "approval settings on an allow rule",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: allow, tools: [{name: t}], approval: {timeoutSeconds: 60}}]}}"#,
        "approval settings are only meaningful on a requireApproval rule",
    ),
    (
        "rate limit on a requireApproval rule",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: requireApproval, tools: [{name: t}], rateLimit: {calls: 1, periodSeconds: 60}}]}}"#,
        "rateLimit is only meaningful on an allow rule",
    ),
    (
        "definition pin on a glob",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], tools: [{server: orders, name: "refund_*", definition: "sha256:0000000000000000000000000000000000000000000000000000000000000000"}], rules: [{name: r, action: allow, tools: [{name: t}]}]}}"#,
        "a definition pin names one tool",
    ),
    (
        "tool classification with neither effects nor pin",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], tools: [{server: orders, name: refund}], rules: [{name: r, action: allow, tools: [{name: t}]}]}}"#,
        "a tool classification names effects, a definition pin, or both",
    ),
    (
        "duplicate rule names",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: allow, tools: [{name: t}]}, {name: r, action: deny, tools: [{name: u}]}]}}"#,
        "spec.rules[1]: Duplicate value",
    ),
    (
        "argument matcher with two operators",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: allow, tools: [{name: t}], when: {args: [{pointer: /x, regex: "a", prefix: "a"}]}}]}}"#,
        "an argument matcher sets exactly one operator",
    ),
    (
        "argument matcher with no operator",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: allow, tools: [{name: t}], when: {args: [{pointer: /x}]}}]}}"#,
        "\"spec.rules[0].when.args[0]\" must validate one and only one schema (oneOf). Found none valid",
    ),
    (
        "argument matcher with in and equals",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: allow, tools: [{name: t}], when: {args: [{pointer: /x, in: [1, 2], equals: 1}]}}]}}"#,
        "\"spec.rules[0].when.args[0]\" must validate one and only one schema (oneOf). Found 2 valid alternatives",
    ),
    (
        "pointer that is not a JSON pointer",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: allow, tools: [{name: t}], when: {args: [{pointer: amount, exists: true}]}}]}}"#,
        "spec.rules[0].when.args[0].pointer",
    ),
    (
        "tool match with name and effect",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: deny, tools: [{name: t, effect: financial}]}]}}"#,
        "a tool match sets exactly one of name",
    ),
    (
        "unknown effect",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: deny, tools: [{effect: sensitive}]}]}}"#,
        "Unsupported value: \"sensitive\"",
    ),
    (
        "rate limit on a deny rule",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: deny, tools: [{name: t}], rateLimit: {calls: 1, periodSeconds: 60}}]}}"#,
        "rateLimit is only meaningful on an allow rule",
    ),
    (
        "rule without tools",
        r#"{kind: ToolPolicy, spec: {targetRefs: [{name: a}], rules: [{name: r, action: allow, tools: []}]}}"#,
        "spec.rules[0].tools",
    ),
    (
        "grant with expiresAt and ttl",
        r#"{kind: DelegationGrant, spec: {from: {name: a}, to: {name: b}, tools: [{name: t}], ttl: 1h, expiresAt: "2030-01-01T00:00:00Z"}}"#,
        "set exactly one of expiresAt",
    ),
    (
        "grant that never expires",
        r#"{kind: DelegationGrant, spec: {from: {name: a}, to: {name: b}, tools: [{name: t}]}}"#,
        "set exactly one of expiresAt",
    ),
    (
        "grant depth above the maximum",
        r#"{kind: DelegationGrant, spec: {from: {name: a}, to: {name: b}, tools: [{name: t}], ttl: 1h, maxDepth: 9}}"#,
        "spec.maxDepth: Invalid value: 9: spec.maxDepth in body should be less than or equal to 8",
    ),
    (
        "grant ttl that is not a duration",
        r#"{kind: DelegationGrant, spec: {from: {name: a}, to: {name: b}, tools: [{name: t}], ttl: "1 day"}}"#,
        "spec.ttl",
    ),
];

#[test]
fn invalid_objects_are_refused_with_the_rules_message() {
    let ns = new_namespace();
    let mut failures = Vec::new();
    for (i, (case, body, expected)) in INVALID.iter().enumerate() {
        // Each case is a flow-style mapping; give it apiVersion and a name.
        let yaml = format!(
            "{{apiVersion: chaperone.dev/v1alpha1, metadata: {{name: invalid-{i}}}, {}",
            body.strip_prefix('{').expect("cases are flow mappings")
        );
        match apply(&ns, &yaml) {
            Ok(()) => failures.push(format!(
                "{case}: accepted, expected refusal with {expected:?}"
            )),
            Err(stderr) if !stderr.contains(expected) => {
                failures.push(format!("{case}: refused without {expected:?}: {stderr}"))
            }
            Err(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        INVALID.len(),
        failures.join("\n")
    );
}
