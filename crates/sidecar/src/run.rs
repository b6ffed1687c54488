//! A whole sidecar process's work, started and watched in one place: the
//! listeners it serves, where its snapshots come from, the maintenance loop;
//! every task is held, and the first one to end on its own stops the sidecar
//! with its name (a sidecar that silently stopped serving would fail open for
//! nobody and closed for everybody, without saying why).
//!
//! Stopping, in order (the kubelet sends SIGTERM once the agent's containers
//! have exited, and SIGKILL after the pod's grace period):
//! 1. the proxy and inbound listeners close and their connections finish what
//!    is in flight, for at most [`Settings::shutdown_grace`](crate::Settings);
//! 2. the audit trail is closed with its final checkpoint (calls still in
//!    flight after that are refused: they could not be audited);
//! 3. every audit record still queued, the final checkpoint included, is
//!    shipped to the controller and the stream closed, for at most
//!    [`AUDIT_FLUSH_TIMEOUT`]; what could not go is counted in the log (the
//!    trail on stdout has every record).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::settings::ControllerSettings;
use crate::{Sidecar, SnapshotStream, standalone};

/// Longest the last audit records may take to reach the controller when the
/// sidecar stops.
pub const AUDIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The listeners a sidecar serves, bound by the caller (so bind errors name
/// their address before anything starts).
#[derive(Debug)]
pub struct Listeners {
    /// The agent-facing MCP proxy (none in tool mode).
    pub proxy: Option<TcpListener>,
    /// The inbound side (when an inbound upstream is configured).
    pub inbound: Option<TcpListener>,
    /// `/metrics`, `/ready`.
    pub admin: TcpListener,
}

/// Where snapshots come from.
#[derive(Debug)]
pub enum SnapshotFeed {
    /// The controller's stream.
    Controller(ControllerSettings),
    /// A directory of CR files, reloaded when they change.
    PolicyDir {
        /// The directory.
        dir: PathBuf,
        /// The AgentIdentity to act as, when it holds several.
        agent: Option<String>,
    },
    /// None: every call is refused (not ready).
    Nothing,
}

/// A task of the sidecar ended while it should have run on.
#[derive(Debug, Error)]
pub enum TaskEnded {
    /// It returned.
    #[error("the sidecar's {0} task ended on its own")]
    Returned(&'static str),
    /// It panicked.
    #[error("the sidecar's task panicked: {0}")]
    Panicked(String),
}

impl Sidecar {
    /// Serves `listeners`, feeds snapshots from `feed` and maintains sessions
    /// and audit checkpoints until `shutdown` resolves, then stops as the
    /// module documentation says; or until a task ends on its own, which is
    /// returned as the error (after the audit trail is closed and shipped).
    pub async fn run(
        &self,
        listeners: Listeners,
        feed: SnapshotFeed,
        maintain_every: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), TaskEnded> {
        let mut tasks: JoinSet<&'static str> = JoinSet::new();
        let (stop, stopping) = watch::channel(false);
        let stop_requested = move || {
            let mut stopping = stopping.clone();
            async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            }
        };
        let mut serving = 0;
        if let Some(proxy) = listeners.proxy {
            let sidecar = self.clone();
            let stop = stop_requested();
            serving += 1;
            tasks.spawn(async move {
                sidecar.serve_proxy(proxy, stop).await;
                "proxy"
            });
        }
        if let Some(inbound) = listeners.inbound {
            let sidecar = self.clone();
            let stop = stop_requested();
            serving += 1;
            tasks.spawn(async move {
                sidecar.serve_inbound(inbound, stop).await;
                "inbound"
            });
        }
        let sidecar = self.clone();
        tasks.spawn(async move {
            sidecar
                .serve_admin(listeners.admin, std::future::pending())
                .await;
            "admin"
        });
        let sidecar = self.clone();
        tasks.spawn(async move {
            sidecar.maintain(maintain_every).await;
            "maintenance"
        });
        let (finish, finishing) = oneshot::channel::<()>();
        let mut shipped = None;
        match feed {
            SnapshotFeed::Controller(controller) => {
                let stream = SnapshotStream::new(self.clone(), controller);
                let (all_shipped, shipped_rx) = oneshot::channel();
                shipped = Some(shipped_rx);
                tasks.spawn(async move {
                    let all = stream
                        .run_until(async {
                            let _ = finishing.await;
                        })
                        .await;
                    let _ = all_shipped.send(all);
                    "snapshot stream"
                });
            }
            SnapshotFeed::PolicyDir { dir, agent } => {
                let source = Arc::clone(self.snapshots());
                tasks.spawn(async move {
                    standalone::watch(dir, agent, source, Duration::from_secs(1)).await;
                    "policy directory watch"
                });
            }
            SnapshotFeed::Nothing => {}
        }
        let outcome = tokio::select! {
            () = shutdown => Ok(()),
            Some(ended) = tasks.join_next() => Err(match ended {
                Ok(name) => TaskEnded::Returned(name),
                Err(err) => TaskEnded::Panicked(err.to_string()),
            }),
        };
        let _ = stop.send(true);
        if outcome.is_ok() {
            let grace = self.settings().shutdown_grace;
            let drained = tokio::time::timeout(grace, drain(&mut tasks, serving)).await;
            if drained.is_err() {
                tracing::warn!(
                    ?grace,
                    "stopping: connections still open after the grace period are cut (calls not yet decided are refused)"
                );
            }
        }
        let sidecar = self.clone();
        match tokio::task::spawn_blocking(move || sidecar.close_audit()).await {
            Ok(Ok(())) => tracing::info!("stopping: audit trail closed with a final checkpoint"),
            Ok(Err(err)) => {
                tracing::error!(error = %err, "stopping: final audit checkpoint not written")
            }
            Err(err) => tracing::error!(error = %err, "stopping: closing the audit trail failed"),
        }
        let _ = finish.send(());
        if let Some(shipped) = shipped {
            match tokio::time::timeout(AUDIT_FLUSH_TIMEOUT, shipped).await {
                Ok(Ok(true)) => {
                    tracing::info!("stopping: every audit record reached the controller")
                }
                // The stream said what it could not ship.
                Ok(Ok(false)) => {}
                Ok(Err(_)) => tracing::error!(
                    "stopping: the snapshot stream had ended; queued audit records not shipped"
                ),
                Err(_) => tracing::error!(
                    timeout = ?AUDIT_FLUSH_TIMEOUT,
                    "stopping: the controller did not take the last audit records in time"
                ),
            }
        }
        tasks.abort_all();
        outcome
    }
}

/// Waits until the `serving` listener tasks among `tasks` have drained and
/// returned (a task that ends otherwise meanwhile is logged).
async fn drain(tasks: &mut JoinSet<&'static str>, mut serving: usize) {
    while serving > 0 {
        match tasks.join_next().await {
            Some(Ok("proxy" | "inbound")) => serving -= 1,
            Some(Ok(name)) => tracing::warn!(task = name, "ended while the sidecar was stopping"),
            Some(Err(err)) => {
                tracing::warn!(error = %err, "a task panicked while the sidecar was stopping")
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditBuffer;
    use crate::{AuditOutput, Settings};

    async fn bind() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    /// A sidecar writing its audit trail to `audit`, with an agent whose one
    /// tool server (nothing listens there) is in force, so that a call's body
    /// is read before anything else happens to it; its listeners, the proxy's
    /// address, and the policy directory to keep.
    async fn with_agent_in_force(
        settings: Settings,
        audit: AuditBuffer,
    ) -> (Sidecar, Listeners, std::net::SocketAddr, tempfile::TempDir) {
        let sidecar = Sidecar::new(settings, AuditOutput::Writer(Box::new(audit)), false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let identity = "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: agent, namespace: ns}\nspec:\n  selector: {serviceAccountName: agent}\n  toolServers: [{name: shop, url: 'http://127.0.0.1:9/mcp'}]\n";
        std::fs::write(dir.path().join("identity.yaml"), identity).unwrap();
        standalone::load(dir.path(), None, 1, sidecar.snapshots()).unwrap();
        let proxy = bind().await;
        let address = proxy.local_addr().unwrap();
        let listeners = Listeners {
            proxy: Some(proxy),
            inbound: None,
            admin: bind().await,
        };
        (sidecar, listeners, address, dir)
    }

    /// Runs `sidecar` without a snapshot feed, told to stop after 50 ms.
    async fn run_for_50_ms(sidecar: &Sidecar, listeners: Listeners) -> Result<(), TaskEnded> {
        let stop = tokio::time::sleep(Duration::from_millis(50));
        sidecar
            .run(
                listeners,
                SnapshotFeed::Nothing,
                Duration::from_secs(1),
                stop,
            )
            .await
    }

    #[tokio::test]
    async fn stops_on_shutdown_and_closes_the_audit_trail() {
        let audit = AuditBuffer::default();
        let sidecar = Sidecar::new(
            Settings::default(),
            AuditOutput::Writer(Box::new(audit.clone())),
            false,
        )
        .unwrap();
        let listeners = Listeners {
            proxy: Some(bind().await),
            inbound: None,
            admin: bind().await,
        };
        let outcome = run_for_50_ms(&sidecar, listeners).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        let records = audit.records();
        let last = records.last().expect("a final checkpoint");
        assert_eq!(last["kind"], "checkpoint");
        assert_eq!(last["final"], true);
    }

    #[tokio::test]
    async fn stopping_finishes_a_call_in_flight_and_refuses_new_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let audit = AuditBuffer::default();
        let (sidecar, listeners, address, _policy) =
            with_agent_in_force(Settings::default(), audit.clone()).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let running = sidecar.clone();
        let run = tokio::spawn(async move {
            running
                .run(
                    listeners,
                    SnapshotFeed::Nothing,
                    Duration::from_secs(1),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
        });
        // A call whose body is still arriving when the sidecar is told to stop.
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order","arguments":{}}}"#;
        let mut call = tokio::net::TcpStream::connect(address).await.unwrap();
        let head = format!(
            "POST /shop HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        call.write_all(head.as_bytes()).await.unwrap();
        call.write_all(&body.as_bytes()[..10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!run.is_finished(), "stopped with a call in flight");
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "a new connection was accepted while stopping"
        );
        assert!(
            audit.records().is_empty(),
            "the trail was closed with a call in flight"
        );
        call.write_all(&body.as_bytes()[10..]).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), call.read_to_string(&mut response))
            .await
            .expect("the connection was not closed after its response")
            .unwrap();
        // Answered (whatever the answer: nothing listens upstream), and the
        // connection closed.
        assert!(response.starts_with("HTTP/1.1 "), "{response}");
        assert!(response.contains("connection: close"), "{response}");
        let outcome = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run did not return once the connection closed")
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
        let records = audit.records();
        assert_eq!(records.last().unwrap()["final"], true, "{records:?}");
    }

    #[tokio::test]
    async fn a_call_outlasting_the_grace_period_does_not_hold_the_stop() {
        use tokio::io::AsyncWriteExt;

        let settings = Settings {
            shutdown_grace: Duration::from_millis(300),
            ..Settings::default()
        };
        let (sidecar, listeners, address, _policy) =
            with_agent_in_force(settings, AuditBuffer::default()).await;
        let mut call = tokio::net::TcpStream::connect(address).await.unwrap();
        call.write_all(b"POST /shop HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let outcome = run_for_50_ms(&sidecar, listeners).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn names_a_task_that_ended_on_its_own() {
        let sidecar = Sidecar::new(
            Settings::default(),
            AuditOutput::Writer(Box::new(std::io::sink())),
            false,
        )
        .unwrap();
        // The inbound side returns at once when no inbound upstream is
        // configured: a task ending on its own.
        let with_inbound = Listeners {
            proxy: None,
            inbound: Some(bind().await),
            admin: bind().await,
        };
        let outcome = sidecar
            .run(
                with_inbound,
                SnapshotFeed::Nothing,
                Duration::from_secs(1),
                std::future::pending(),
            )
            .await;
        assert!(
            matches!(outcome, Err(TaskEnded::Returned("inbound"))),
            "{outcome:?}"
        );
    }
}
