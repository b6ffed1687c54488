//! The controller's metrics rendered: the sidecar gauges read from the
//! registry and the index at each scrape.

use std::sync::Arc;

use chaperone_policy::AgentKey;

use super::*;
use crate::{
    auth::{SidecarIdentity, ToolSidecarIdentity},
    test_objects::identity,
};

const NOW: i64 = 1_800_000_000;

/// The value of the sample `series` (name and labels as written), if any.
fn sample(text: &str, series: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn agent_series(metric: &str, agent: &str) -> String {
    format!("chaperone_controller_{metric}{{namespace=\"ns\",agent=\"{agent}\"}}")
}

fn sidecar(agent: &str, pod: &str) -> SidecarIdentity {
    SidecarIdentity {
        agent: AgentKey::new("ns", agent),
        pod: pod.into(),
        pod_uid: format!("uid-{pod}"),
        service_account: agent.into(),
    }
}

/// A registry and an index with AgentIdentities `planner` and `worker`,
/// scraped through [`SidecarGauges`].
fn setup() -> (Arc<Metrics>, Arc<SidecarRegistry>, Arc<SharedIndex>) {
    let metrics = Metrics::new();
    let index = SharedIndex::new(metrics.clone());
    index.update(|i| {
        i.apply_identity(identity("ns", "planner"), NOW);
        i.apply_identity(identity("ns", "worker"), NOW);
    });
    let sidecars = SidecarRegistry::new();
    metrics.register_collector(SidecarGauges::new(sidecars.clone(), index.clone()));
    (metrics, sidecars, index)
}

fn current_hash(index: &SharedIndex, agent: &str) -> String {
    index
        .lock()
        .snapshot(&AgentKey::new("ns", agent))
        .expect("a snapshot")
        .hash
        .clone()
}

#[test]
fn sidecar_gauges_count_pods_once_through_a_reconnect_and_its_old_streams_end() {
    let (metrics, sidecars, index) = setup();
    let hash = current_hash(&index, "planner");
    let p0 = sidecars.connect(&sidecar("planner", "p0"));
    let _p1 = sidecars.connect(&sidecar("planner", "p1"));
    let _w0 = sidecars.connect(&sidecar("worker", "w0"));
    let _tool = sidecars.connect_tool(&ToolSidecarIdentity {
        namespace: "ns".into(),
        pod: "mcp-0".into(),
        pod_uid: "uid-mcp-0".into(),
        service_account: "mcp".into(),
    });
    sidecars.update("ns", "p0", |s| s.acked = Some((1, hash.clone())));
    sidecars.update("ns", "p1", |s| s.acked = Some((1, "an older hash".into())));

    // p0 reconnects while its first stream is still open, then that stream ends.
    let p0_again = sidecars.connect(&sidecar("planner", "p0"));
    sidecars.update("ns", "p0", |s| s.acked = Some((1, hash.clone())));
    let text = metrics.render();
    assert_eq!(
        sample(&text, "chaperone_controller_sidecars_connected"),
        Some(3),
        "{text}"
    );
    drop(p0);
    let text = metrics.render();
    assert_eq!(
        sample(&text, "chaperone_controller_sidecars_connected"),
        Some(3),
        "{text}"
    );
    assert_eq!(
        sample(&text, "chaperone_controller_tool_sidecars_connected"),
        Some(1)
    );
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_connected", "planner")),
        Some(2)
    );
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_in_sync", "planner")),
        Some(1)
    );
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_connected", "worker")),
        Some(1)
    );
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_in_sync", "worker")),
        Some(0)
    );

    drop(p0_again);
    let text = metrics.render();
    assert_eq!(
        sample(&text, "chaperone_controller_sidecars_connected"),
        Some(2),
        "{text}"
    );
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_connected", "planner")),
        Some(1)
    );
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_in_sync", "planner")),
        Some(0)
    );
}

#[test]
fn a_deleted_agents_series_go_and_agents_without_sidecars_read_zero() {
    let (metrics, sidecars, index) = setup();
    let _w0 = sidecars.connect(&sidecar("worker", "w0"));
    let text = metrics.render();
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_connected", "planner")),
        Some(0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_connected", "worker")),
        Some(1)
    );

    index.update(|i| i.delete_identity(&AgentKey::new("ns", "worker"), NOW));
    let text = metrics.render();
    assert!(!text.contains("agent=\"worker\""), "{text}");
    assert_eq!(
        sample(&text, &agent_series("agent_sidecars_connected", "planner")),
        Some(0)
    );
    // Its stream has not ended yet: it still counts on this replica.
    assert_eq!(
        sample(&text, "chaperone_controller_sidecars_connected"),
        Some(1)
    );
}

#[test]
fn every_push_is_counted_once_by_how_it_ended() {
    let metrics = Metrics::new();
    metrics.push_ended(PushResult::Ack, Duration::from_millis(3));
    metrics.push_ended(PushResult::Nack, Duration::ZERO);
    metrics.push_ended(PushResult::Superseded, Duration::ZERO);
    metrics.push_ended(PushResult::Unanswered, Duration::ZERO);
    let text = metrics.render();
    for result in ["ack", "nack", "superseded", "unanswered"] {
        let series = format!("chaperone_controller_snapshot_pushes_total{{result=\"{result}\"}}");
        assert_eq!(sample(&text, &series), Some(1), "{text}");
    }
    // Only ACKs have a latency.
    assert_eq!(
        sample(&text, "chaperone_controller_push_latency_seconds_count"),
        Some(1)
    );
}

#[test]
fn reconciles_are_counted_by_kind_and_result_with_their_duration() {
    let metrics = Metrics::new();
    metrics.reconciled(
        "ToolPolicy",
        ReconcileResult::Changed,
        Duration::from_millis(2),
    );
    metrics.reconciled(
        "ToolPolicy",
        ReconcileResult::Unchanged,
        Duration::from_micros(50),
    );
    let text = metrics.render();
    assert_eq!(
        sample(
            &text,
            "chaperone_controller_reconciles_total{kind=\"ToolPolicy\",result=\"changed\"}"
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "chaperone_controller_reconcile_duration_seconds_count{kind=\"ToolPolicy\"}"
        ),
        Some(2),
        "{text}"
    );
}

#[test]
fn build_info_is_exported_without_the_controller_prefix() {
    let text = Metrics::new().render();
    assert!(
        text.lines().any(|l| l.starts_with("chaperone_build_info{")
            && l.contains("component=\"controller\"")
            && l.ends_with(" 1")),
        "{text}"
    );
}

#[test]
fn a_watch_exports_its_failure_count_at_zero_from_its_start() {
    let metrics = Metrics::new();
    let series = "chaperone_controller_watch_errors_total{kind=\"ToolPolicy\"}";
    assert_eq!(sample(&metrics.render(), series), None);
    metrics.watch_started("ToolPolicy");
    assert_eq!(sample(&metrics.render(), series), Some(0));
    metrics.watch_failed("ToolPolicy");
    assert_eq!(sample(&metrics.render(), series), Some(1));
}
