//! Unit tests of the CR-document loader.

use super::*;

fn identity(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  selector: {{serviceAccountName: {name}}}\n"
    )
}

const POLICY: &str = "\
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata: {name: orders, namespace: shop}
spec:
  targetRefs: [{name: planner}]
  rules:
    - {name: read, action: allow, tools: [{server: orders, name: get_order}]}
";

const GRANT: &str = "\
apiVersion: chaperone.dev/v1alpha1
kind: DelegationGrant
metadata: {name: planner-to-worker, namespace: shop}
spec:
  from: {name: planner}
  to: {name: worker}
  tools: [{server: orders, name: get_order}]
  ttl: 1h
";

fn set(texts: &[(&str, &str)]) -> Result<DocumentSet, DocumentError> {
    let mut set = DocumentSet::new();
    for (file, text) in texts {
        set.add(file, text)?;
    }
    Ok(set)
}

fn keys(set: &DocumentSet) -> Vec<String> {
    set.objects()
        .identities
        .iter()
        .map(|i| key_of(i).to_string())
        .collect()
}

#[test]
fn reads_every_kind_from_a_multi_document_stream() {
    let text = format!("{}---\n{POLICY}---\n{GRANT}", identity("shop", "planner"));
    let mut set = DocumentSet::new();
    assert_eq!(set.add("all.yaml", &text), Ok(3));
    let objects = set.objects();
    assert_eq!(objects.identities.len(), 1);
    assert_eq!(objects.policies.len(), 1);
    assert_eq!(objects.grants.len(), 1);
    let policy = ObjectRef {
        kind: ObjectKind::ToolPolicy,
        key: ObjectKey::new("shop", "orders"),
    };
    assert_eq!(set.file_of(&policy), Some("all.yaml"));
}

#[test]
fn reads_json() {
    let text = r#"{"apiVersion": "chaperone.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "planner"}, "spec": {"selector": {"serviceAccountName": "planner"}}}"#;
    let set = set(&[("planner.json", text)]).unwrap();
    assert_eq!(keys(&set), ["default/planner"]);
}

#[test]
fn skips_empty_documents() {
    let text = format!("---\n---\n{}---\n", identity("shop", "planner"));
    assert_eq!(DocumentSet::new().add("a.yaml", &text), Ok(1));
    assert_eq!(DocumentSet::new().add("empty.yaml", ""), Ok(0));
}

#[test]
fn skips_kinds_of_other_groups() {
    let text = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: planner}}\n---\n{}",
        identity("shop", "planner")
    );
    assert_eq!(DocumentSet::new().add("a.yaml", &text), Ok(1));
}

#[test]
fn refuses_an_unknown_kind_of_our_group() {
    let text = "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentiy\nmetadata: {name: x}\n";
    let error = DocumentSet::new().add("a.yaml", text).unwrap_err();
    assert!(
        matches!(&error, DocumentError::UnknownKind { kind, .. } if kind == "AgentIdentiy"),
        "{error}"
    );
}

#[test]
fn refuses_our_kind_with_another_api_version() {
    let text = identity("shop", "planner").replace("v1alpha1", "v1");
    let error = DocumentSet::new().add("a.yaml", &text).unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"a.yaml: AgentIdentity planner (document 1): apiVersion "chaperone.dev/v1" is not chaperone.dev/v1alpha1"#
    );
}

#[test]
fn refuses_our_kind_without_api_version() {
    let text = "kind: ToolPolicy\nmetadata: {name: orders}\nspec: {}\n";
    assert!(matches!(
        DocumentSet::new().add("a.yaml", text),
        Err(DocumentError::ApiVersion { found, .. }) if found.is_empty()
    ));
}

#[test]
fn refuses_a_document_without_a_kind() {
    let text = format!("{}---\nname: not a resource\n", identity("shop", "planner"));
    assert_eq!(
        DocumentSet::new().add("a.yaml", &text),
        Err(DocumentError::NotAnObject {
            file: "a.yaml".into(),
            index: 2
        })
    );
}

#[test]
fn refuses_a_document_that_is_not_a_mapping() {
    let text = "- {name: a test case, tool: get_order, expect: allow}\n";
    assert!(matches!(
        DocumentSet::new().add("policy-test.yaml", text),
        Err(DocumentError::NotAnObject { index: 1, .. })
    ));
}

#[test]
fn refuses_a_document_of_the_wrong_shape() {
    let text = "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: planner}\nspec: {}\n";
    let error = DocumentSet::new().add("a.yaml", text).unwrap_err();
    assert!(
        matches!(&error, DocumentError::Invalid { kind: ObjectKind::AgentIdentity, name, .. } if name == "planner"),
        "{error}"
    );
    assert!(error.to_string().contains("selector"), "{error}");
}

#[test]
fn refuses_text_that_is_not_yaml() {
    assert!(matches!(
        DocumentSet::new().add("a.yaml", "kind: [unclosed\n"),
        Err(DocumentError::Syntax { .. })
    ));
}

#[test]
fn refuses_a_key_given_twice() {
    let text = format!("{}kind: ToolPolicy\n", identity("shop", "planner"));
    assert!(matches!(
        DocumentSet::new().add("a.yaml", &text),
        Err(DocumentError::Syntax { .. })
    ));
}

#[test]
fn refuses_an_object_defined_twice_across_files() {
    let error = set(&[
        ("a.yaml", &identity("shop", "planner")),
        ("b.yaml", &identity("shop", "planner")),
    ])
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "b.yaml: AgentIdentity shop/planner is already defined in a.yaml"
    );
}

#[test]
fn refuses_an_object_defined_twice_in_one_file() {
    let text = format!("{}---\n{}", identity("shop", "a"), identity("shop", "a"));
    assert!(matches!(
        DocumentSet::new().add("a.yaml", &text),
        Err(DocumentError::Duplicate { first, .. }) if first == "a.yaml"
    ));
}

#[test]
fn an_absent_namespace_is_default_for_duplicates() {
    let bare = identity("default", "planner").replace(", namespace: default", "");
    assert!(matches!(
        set(&[
            ("a.yaml", &bare),
            ("b.yaml", &identity("default", "planner"))
        ]),
        Err(DocumentError::Duplicate { .. })
    ));
}

#[test]
fn one_name_in_two_namespaces_or_two_kinds_is_no_duplicate() {
    let policy_named_planner = POLICY.replace("name: orders", "name: planner");
    let set = set(&[
        ("a.yaml", &identity("shop", "planner")),
        ("b.yaml", &identity("lab", "planner")),
        ("c.yaml", &policy_named_planner),
    ])
    .unwrap();
    assert_eq!(keys(&set), ["shop/planner", "lab/planner"]);
}

#[test]
fn a_refused_text_adds_nothing() {
    let mut set = DocumentSet::new();
    let text = format!(
        "{POLICY}---\n{}",
        identity("shop", "planner").replace("v1alpha1", "v2")
    );
    assert!(set.add("a.yaml", &text).is_err());
    assert!(set.objects().policies.is_empty());
    // Nor is a text whose second object is a duplicate.
    set.add("b.yaml", &identity("shop", "worker")).unwrap();
    let text = format!("{POLICY}---\n{}", identity("shop", "worker"));
    assert!(set.add("c.yaml", &text).is_err());
    assert!(set.objects().policies.is_empty());
    assert_eq!(set.add("d.yaml", POLICY), Ok(1));
}

#[test]
fn picks_the_only_agent_unnamed() {
    let set = set(&[("a.yaml", &identity("shop", "planner"))]).unwrap();
    assert_eq!(set.agent(None).unwrap().metadata.name, "planner");
}

#[test]
fn refuses_to_pick_among_several_unnamed() {
    let set = set(&[
        ("a.yaml", &identity("shop", "planner")),
        ("b.yaml", &identity("shop", "worker")),
    ])
    .unwrap();
    assert_eq!(
        set.agent(None).unwrap_err().to_string(),
        "several AgentIdentities (shop/planner, shop/worker): name one"
    );
}

#[test]
fn refuses_to_pick_from_no_agent() {
    let set = set(&[("a.yaml", POLICY)]).unwrap();
    assert_eq!(set.agent(None), Err(AgentChoiceError::NoAgentIdentity));
    assert_eq!(
        set.agent(Some("planner")),
        Err(AgentChoiceError::NoAgentIdentity)
    );
}

#[test]
fn picks_by_namespace_and_name() {
    let set = set(&[
        ("a.yaml", &identity("shop", "planner")),
        ("b.yaml", &identity("lab", "planner")),
    ])
    .unwrap();
    let picked = set.agent(Some("lab/planner")).unwrap();
    assert_eq!(picked.metadata.namespace.as_deref(), Some("lab"));
    assert_eq!(
        set.agent(Some("default/planner")),
        Err(AgentChoiceError::NotFound("default/planner".into()))
    );
}

#[test]
fn picks_by_a_bare_name_only_one_agent_has() {
    let set = set(&[
        ("a.yaml", &identity("shop", "planner")),
        ("b.yaml", &identity("shop", "worker")),
    ])
    .unwrap();
    assert_eq!(set.agent(Some("worker")).unwrap().metadata.name, "worker");
    assert_eq!(
        set.agent(Some("auditor")),
        Err(AgentChoiceError::NotFound("auditor".into()))
    );
}

#[test]
fn refuses_a_bare_name_several_namespaces_have() {
    let set = set(&[
        ("a.yaml", &identity("default", "planner")),
        ("b.yaml", &identity("lab", "planner")),
    ])
    .unwrap();
    assert_eq!(
        set.agent(Some("planner")).unwrap_err().to_string(),
        "several AgentIdentities are named planner (default/planner, lab/planner): give namespace/name"
    );
}
