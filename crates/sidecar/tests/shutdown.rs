//! Stopping a sidecar's snapshot stream (`SnapshotStream::run_until`) against
//! a fake controller: the last audit records, still lingering in a batch when
//! the sidecar stops, and the trail's final checkpoint reach the controller
//! before the stream is closed; without a controller the stream gives up at
//! once instead of holding the stop.

mod common;

use std::time::Duration;

use chaperone_sidecar::SnapshotStream;
use chaperone_sidecar::backoff::Backoff;
use common::controller::{FakeController, short_backoff};
use common::{Harness, call};
use serde_json::json;
use tokio::sync::oneshot;

/// Runs `stream` until the returned sender fires (or is dropped).
fn run_until_told(stream: SnapshotStream) -> (oneshot::Sender<()>, tokio::task::JoinHandle<bool>) {
    let (finish, finishing) = oneshot::channel::<()>();
    let task = tokio::spawn(stream.run_until(async {
        let _ = finishing.await;
    }));
    (finish, task)
}

#[tokio::test]
async fn stopping_ships_the_last_records_and_the_final_checkpoint_then_closes() {
    let harness = Harness::start(true, true).await;
    let controller = FakeController::start().await;
    let stream = SnapshotStream::new(harness.sidecar.clone(), controller.settings())
        .with_backoff(short_backoff());
    let (finish, task) = run_until_told(stream);
    controller.wait_for_connection(&harness.sidecar).await;

    let client = harness.client().await;
    call(&client, "get_order", json!({"id": "A-1"}))
        .await
        .unwrap();
    // Stop at once, as the sidecar does: the call's record still lingers in
    // its batch, then the trail's final checkpoint follows it.
    let sidecar = harness.sidecar.clone();
    tokio::task::spawn_blocking(move || sidecar.close_audit())
        .await
        .unwrap()
        .unwrap();
    finish.send(()).unwrap();
    let all_shipped = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the stream did not finish")
        .unwrap();
    assert!(all_shipped, "the stream says records were left behind");

    let shipped = controller.audit_records();
    let written = harness.audit.records();
    assert_eq!(shipped, written, "what was shipped is not the whole trail");
    assert!(
        shipped.iter().any(|r| r["tool"] == "get_order"),
        "{shipped:?}"
    );
    let last = shipped.last().unwrap();
    assert_eq!(last["kind"], "checkpoint", "{last}");
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(
        controller.closed_by_sidecar(),
        1,
        "the stream was not closed cleanly"
    );
    drop(client);
}

#[tokio::test]
async fn stopping_without_a_controller_gives_up_at_once() {
    let harness = Harness::start(true, true).await;
    // Nothing listens here: every connect is refused.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut settings = FakeController::start().await.settings();
    settings.address = gone.local_addr().unwrap().to_string();
    drop(gone);
    let stream = SnapshotStream::new(harness.sidecar.clone(), settings).with_backoff(Backoff::new(
        Duration::from_secs(30),
        Duration::from_secs(30),
    ));
    let (finish, task) = run_until_told(stream);
    let client = harness.client().await;
    call(&client, "get_order", json!({"id": "A-1"}))
        .await
        .unwrap();
    // Told to stop during a 30 s backoff: one more try at once, then it ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    finish.send(()).unwrap();
    let all_shipped = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the stream held the stop")
        .unwrap();
    assert!(!all_shipped);
    // The local trail has the call regardless.
    assert!(
        harness
            .audit
            .records()
            .iter()
            .any(|r| r["tool"] == "get_order")
    );
    drop(client);
}
