//! Tests of the desired statuses and of the writer's transition times.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use chaperone_policy::{
    ObjectKey, ObjectKind, ObjectRef,
    model::{DelegationGrantSpec, Object},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

use super::{
    desired::policy_status,
    writer::{wait_until, with_transition_times},
    *,
};
use crate::{
    index::Index,
    sidecars::SidecarState,
    test_objects::{self, identity, meta},
};

const NOW: i64 = 1_800_000_000;

/// A grant in `ns` from `from` to `to_ns/to`.
fn grant(ns: &str, from: &str, to_ns: &str, to: &str) -> Object<DelegationGrantSpec> {
    test_objects::grant(ns, &format!("{from}-to-{to}"), from, Some(to_ns), to)
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

#[test]
fn a_grant_is_checked_again_when_its_target_namespace_changes() {
    let mut index = Index::new();
    index.apply_grant(grant("a", "planner", "b", "worker"), NOW);
    index.take_status_dirty();

    let objects = objects_to_check(&index, &BTreeSet::from(["b".to_owned()]), &BTreeSet::new());

    assert!(objects.contains(&ObjectRef {
        kind: ObjectKind::DelegationGrant,
        key: key("a", "planner-to-worker"),
    }));
}

#[test]
fn changes_mark_only_the_namespaces_they_can_affect() {
    let mut index = Index::new();
    index.apply_identity(identity("a", "planner"), NOW);
    index.apply_identity(identity("b", "worker"), NOW);
    index.take_status_dirty();

    index.apply_identity(identity("a", "reviewer"), NOW);

    assert_eq!(index.take_status_dirty(), BTreeSet::from(["a".to_owned()]));
    assert!(index.take_status_dirty().is_empty(), "taken once");
}

#[test]
fn out_of_sync_pods_are_listed_up_to_the_cap_and_all_counted() {
    let mut index = Index::new();
    index.apply_identity(identity("a", "planner"), NOW);
    let agent = key("a", "planner");
    let pods: Vec<(String, SidecarState)> = (0..OUT_OF_SYNC_PODS_LISTED + 5)
        .map(|i| {
            let state = SidecarState {
                agent: Some(agent.clone()),
                acked: Some((1, "an older hash".into())),
                ..Default::default()
            };
            (format!("pod-{i}"), state)
        })
        .collect();
    let sidecars = BTreeMap::from([(agent.clone(), pods)]);
    let object = ObjectRef {
        kind: ObjectKind::AgentIdentity,
        key: agent,
    };

    let statuses = desired_statuses(&index, &sidecars, &BTreeMap::new(), &[object], NOW);

    let status = statuses[0].1.as_ref().expect("the identity exists");
    assert_eq!(
        status.fields["sidecarsConnected"],
        json!(OUT_OF_SYNC_PODS_LISTED + 5)
    );
    assert_eq!(status.fields["sidecarsInSync"], json!(0));
    assert_eq!(
        status.fields["outOfSyncPods"].as_array().map(Vec::len),
        Some(OUT_OF_SYNC_PODS_LISTED)
    );
}

#[test]
fn a_deleted_object_has_no_status() {
    let index = Index::new();
    let object = ObjectRef {
        kind: ObjectKind::ToolPolicy,
        key: key("a", "gone"),
    };

    let statuses = desired_statuses(&index, &BTreeMap::new(), &BTreeMap::new(), &[object], NOW);

    assert!(statuses[0].1.is_none());
}

#[test]
fn a_condition_keeps_its_transition_time_while_its_status_holds() {
    let index = Index::new();
    let status = policy_status(
        &index,
        &Object {
            api_version: chaperone_policy::model::API_VERSION.into(),
            metadata: meta("a", "p"),
            spec: Default::default(),
        },
        &[],
    );
    let then = Time(k8s_openapi::jiff::Timestamp::from_second(NOW).unwrap());
    let ready = status.conditions[0].status;

    let kept = with_transition_times(&status, &[("Ready", ready, then.clone())]);
    let moved = with_transition_times(&status, &[("Ready", !ready, then.clone())]);

    assert_eq!(kept[0].last_transition_time, then);
    assert_ne!(moved[0].last_transition_time, then);
}

#[test]
fn the_expiry_ticker_wakes_at_the_expiry_second_itself() {
    let at = |second: i64, nanos: i32| k8s_openapi::jiff::Timestamp::new(second, nanos).unwrap();
    assert_eq!(
        wait_until(NOW, at(NOW - 3, 250_000_000)),
        std::time::Duration::from_millis(2_750)
    );
    // Begun, or long past: at once.
    assert_eq!(wait_until(NOW, at(NOW, 0)), std::time::Duration::ZERO);
    assert_eq!(wait_until(NOW, at(NOW + 5, 0)), std::time::Duration::ZERO);
    // Far ahead: it looks again after a minute.
    assert_eq!(
        wait_until(NOW + 86_400, at(NOW, 0)),
        std::time::Duration::from_secs(60)
    );
}

/// Whether the delegate `a/worker` currently receives a grant.
fn worker_holds_a_grant(index: &crate::index::SharedIndex) -> bool {
    let mut rx = index.lock().subscribe(&key("a", "worker"));
    let snapshot = rx.borrow_and_update().as_ref().map(|s| s.decode().unwrap());
    !snapshot.unwrap().content.grants_received.is_empty()
}

/// A shared index where `a/planner` grants `a/worker` until `expires_at`,
/// compiled at `compiled_at`.
fn index_with_grant(expires_at: i64, compiled_at: i64) -> Arc<crate::index::SharedIndex> {
    let index = crate::index::SharedIndex::new(crate::metrics::Metrics::new());
    let mut expiring = test_objects::grant("a", "short", "planner", None, "worker");
    expiring.spec.expires_at = Some(
        k8s_openapi::jiff::Timestamp::from_second(expires_at)
            .unwrap()
            .to_string(),
    );
    index.update(|i| {
        i.apply_identity(identity("a", "planner"), compiled_at);
        i.apply_identity(identity("a", "worker"), compiled_at);
        i.apply_grant(expiring, compiled_at);
    });
    assert!(worker_holds_a_grant(&index));
    index
}

/// Whether `a/worker` stops receiving a grant within `time`.
async fn grant_withdrawn_within(
    index: &crate::index::SharedIndex,
    time: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + time;
    while worker_holds_a_grant(index) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn a_grant_that_expired_before_the_ticker_started_leaves_at_once() {
    let now = crate::unix_now();
    let index = index_with_grant(now - 5, now - 10);
    let ticker = tokio::spawn(run_expiry_ticker(index.clone()));
    assert!(
        grant_withdrawn_within(&index, std::time::Duration::from_secs(2)).await,
        "the expired grant stayed"
    );
    ticker.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_expires_on_time_while_other_objects_keep_changing() {
    let now = crate::unix_now();
    let index = index_with_grant(now + 2, now);
    let ticker = tokio::spawn(run_expiry_ticker(index.clone()));
    // Another namespace changes every 100 ms, past the expiry: each change
    // makes the ticker look again, and none may push the expiry back.
    let churn = {
        let index = index.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let mut other = identity("b", "busy");
                other.metadata.labels.insert("n".into(), n.to_string());
                index.update(|i| i.apply_identity(other, crate::unix_now()));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    assert!(
        grant_withdrawn_within(&index, std::time::Duration::from_secs(5)).await,
        "the grant outlived its expiry by more than 3 s"
    );
    assert!(crate::unix_now() >= now + 2, "withdrawn before its expiry");
    churn.abort();
    ticker.abort();
}
