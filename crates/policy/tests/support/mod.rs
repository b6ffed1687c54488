//! Shared fixtures: objects from YAML, engines, requests.

#![allow(dead_code)]

use chaperone_policy::model::Document;
use chaperone_policy::{
    CompileOptions, DecisionRequest, DelegationChain, DelegationLink, Engine, ObjectKey, ObjectSet,
    SessionHistory, compile_all,
};
use serde_json::Value;

/// 2023-11-14T22:13:20Z.
pub const NOW: i64 = 1_700_000_000;

pub fn objects(yaml: &str) -> ObjectSet {
    let documents: Vec<Document> = serde_saphyr::from_multiple(yaml).expect("fixture YAML parses");
    ObjectSet::from_documents(documents)
}

pub fn basic_example() -> ObjectSet {
    let mut set = objects(include_str!(
        "../../../../examples/basic/agentidentity.yaml"
    ));
    set.extend(
        serde_saphyr::from_multiple::<Document>(include_str!(
            "../../../../examples/basic/toolpolicy.yaml"
        ))
        .expect("example parses"),
    );
    set
}

/// The engine of `agent` (`namespace/name`), asserting the inventory compiles
/// without errors.
pub fn engine(set: &ObjectSet, agent: &str) -> Engine {
    let compiled = compile_all(
        &set.inventory(),
        &CompileOptions {
            version: 7,
            now: NOW,
        },
    );
    assert!(compiled.errors.is_empty(), "errors: {:#?}", compiled.errors);
    engine_of(&compiled.snapshots, agent)
}

pub fn engine_of(snapshots: &[chaperone_policy::Snapshot], agent: &str) -> Engine {
    let key = ObjectKey::parse(agent, "default");
    let snapshot = snapshots
        .iter()
        .find(|s| s.content.agent == key)
        .expect("snapshot of agent");
    Engine::new(snapshot).expect("snapshot compiles")
}

pub fn chain(links: &[(&str, &str)]) -> DelegationChain {
    DelegationChain {
        links: links
            .iter()
            .map(|(delegator, grant)| DelegationLink {
                delegator: ObjectKey::parse(delegator, "default"),
                grant: ObjectKey::parse(grant, "default"),
            })
            .collect(),
    }
}

pub fn request<'a>(
    server: &'a str,
    tool: &'a str,
    arguments: &'a Value,
    session: &'a SessionHistory,
) -> DecisionRequest<'a> {
    DecisionRequest {
        server,
        tool,
        arguments,
        session,
        delegation: None,
        initiator: None,
        now: NOW,
        approved: false,
        definition: Default::default(),
    }
}
