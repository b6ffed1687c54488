//! A whole sidecar process's work, started and watched in one place: the
//! listeners it serves, where its snapshots come from, the maintenance loop;
//! every task is held, and the first one to end on its own stops the sidecar
//! with its name (a sidecar that silently stopped serving would fail open for
//! nobody and closed for everybody, without saying why).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::settings::ControllerSettings;
use crate::{Sidecar, SnapshotStream, standalone};

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
    /// and audit checkpoints until `shutdown` resolves (then the audit trail is
    /// closed with a final checkpoint); or until a task ends on its own, which
    /// is returned as the error.
    pub async fn run(
        &self,
        listeners: Listeners,
        feed: SnapshotFeed,
        maintain_every: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), TaskEnded> {
        let mut tasks: JoinSet<&'static str> = JoinSet::new();
        let forever = std::future::pending::<()>;
        if let Some(proxy) = listeners.proxy {
            let sidecar = self.clone();
            tasks.spawn(async move {
                sidecar.serve_proxy(proxy, forever()).await;
                "proxy"
            });
        }
        if let Some(inbound) = listeners.inbound {
            let sidecar = self.clone();
            tasks.spawn(async move {
                sidecar.serve_inbound(inbound, forever()).await;
                "inbound"
            });
        }
        let sidecar = self.clone();
        tasks.spawn(async move {
            sidecar.serve_admin(listeners.admin, forever()).await;
            "admin"
        });
        let sidecar = self.clone();
        tasks.spawn(async move {
            sidecar.maintain(maintain_every).await;
            "maintenance"
        });
        match feed {
            SnapshotFeed::Controller(controller) => {
                let stream = SnapshotStream::new(self.clone(), controller);
                tasks.spawn(async move {
                    stream.run().await;
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
        tasks.abort_all();
        match self.close_audit() {
            Ok(()) => tracing::info!("stopping: audit trail closed with a final checkpoint"),
            Err(err) => {
                tracing::error!(error = %err, "stopping: final audit checkpoint not written")
            }
        }
        outcome
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
        let outcome = sidecar
            .run(
                listeners,
                SnapshotFeed::Nothing,
                Duration::from_secs(1),
                async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                },
            )
            .await;
        assert!(outcome.is_ok(), "{outcome:?}");
        let records = audit.records();
        let last = records.last().expect("a final checkpoint");
        assert_eq!(last["kind"], "checkpoint");
        assert_eq!(last["final"], true);
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
