//! SIGTERM, how the kubelet stops a container, ends `stop_requested` instead
//! of the process (in its own test binary: the signal goes to the process).

use std::time::Duration;

#[cfg(unix)]
#[tokio::test]
async fn sigterm_resolves_stop_requested() {
    let stop = tokio::spawn(chaperone_telemetry::stop_requested());
    // Let it install its handler.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!stop.is_finished(), "resolved before any signal");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("SIGTERM did not resolve stop_requested")
        .unwrap();
}
