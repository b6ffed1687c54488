//! Standalone mode (`--policy-dir DIR`): compile the CR YAML files of a directory
//! into this agent's snapshot, with no controller and no cluster, and recompile
//! when a file changes (polling modification times about once a second). For
//! development and demos; a broken edit keeps the last good snapshot. The files
//! are read by [`chaperone_policy::DocumentSet`], as `chaperonectl policy` reads
//! them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chaperone_policy::{
    AgentChoiceError, CompileOptions, DOCUMENT_FILE_EXTENSIONS, DocumentError, DocumentSet, compile,
};
use thiserror::Error;

use crate::snapshot::{SnapshotRejected, SnapshotSource};

/// The directory could not be turned into a snapshot.
#[derive(Debug, Error)]
pub enum PolicyDirError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's documents were refused ([`chaperone_policy::DocumentSet`]'s rules).
    #[error(transparent)]
    Documents(#[from] DocumentError),
    /// No AgentIdentity, or several and none chosen.
    #[error("{}: {reason}{hint}", dir.display())]
    Identity {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: AgentChoiceError,
        /// What to do about it.
        hint: &'static str,
    },
    /// The snapshot was refused.
    #[error(transparent)]
    Rejected(#[from] SnapshotRejected),
}

/// The CR files of a directory (`*.yaml`, `*.yml`, `*.json`), sorted.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyDirError> {
    let read = |source| PolicyDirError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        if path.is_file() && DOCUMENT_FILE_EXTENSIONS.contains(&ext) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A fingerprint of the directory: file names, sizes and modification times.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    policy_files(dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            Some((path, meta.len(), meta.modified().ok()?))
        })
        .collect()
}

/// Reads every CR file of the directory.
pub fn read_documents(dir: &Path) -> Result<DocumentSet, PolicyDirError> {
    let mut documents = DocumentSet::new();
    for path in policy_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyDirError::Read {
            path: path.clone(),
            source,
        })?;
        documents.add(&path.display().to_string(), &text)?;
    }
    Ok(documents)
}

/// Compiles the directory's snapshot for `agent` (`namespace/name`, or a name
/// only one AgentIdentity has; needed only when the directory holds several)
/// at `version` and puts it in force.
pub fn load(
    dir: &Path,
    agent: Option<&str>,
    version: u64,
    source: &SnapshotSource,
) -> Result<u64, PolicyDirError> {
    let documents = read_documents(dir)?;
    let identity = documents
        .agent(agent)
        .map_err(|reason| PolicyDirError::Identity {
            dir: dir.to_owned(),
            hint: match reason {
                AgentChoiceError::Several(_) | AgentChoiceError::Ambiguous { .. } => {
                    " with --agent (CHAPERONE_AGENT)"
                }
                _ => "",
            },
            reason,
        })?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let compilation = compile(
        identity,
        &documents.inventory(),
        &CompileOptions { version, now },
    );
    for error in &compilation.errors {
        tracing::warn!(%error, "policy object left out of the snapshot");
    }
    Ok(source.update(compilation.snapshot)?)
}

/// Loads the directory now, then reloads it whenever its files change, until the
/// task is dropped. Versions count up from 1.
pub async fn watch(
    dir: PathBuf,
    agent: Option<String>,
    source: Arc<SnapshotSource>,
    poll: Duration,
) {
    let mut version = 0u64;
    let mut last = None;
    loop {
        let current = fingerprint(&dir);
        if last.as_ref() != Some(&current) {
            version += 1;
            // Parsing, compiling and indexing take milliseconds: on a
            // blocking thread, not on the runtime's (it may be the only one).
            let (path, agent, source) = (dir.clone(), agent.clone(), Arc::clone(&source));
            let loaded =
                crate::runtime::off_worker(move || load(&path, agent.as_deref(), version, &source))
                    .await;
            // None: the runtime is shutting down.
            let Some(loaded) = loaded else { return };
            match loaded {
                Ok(v) => {
                    tracing::info!(version = v, dir = %dir.display(), "policy snapshot loaded")
                }
                Err(err) => {
                    tracing::error!(error = %err, dir = %dir.display(), "policy directory not loaded; keeping the last good snapshot")
                }
            }
            last = Some(current);
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(namespace: &str, name: &str) -> String {
        format!(
            "apiVersion: chaperone.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  selector: {{serviceAccountName: {name}}}\n"
        )
    }

    fn directory(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn loaded_agent(source: &SnapshotSource) -> String {
        source.current().unwrap().snapshot.content.agent.to_string()
    }

    #[test]
    fn loads_the_only_agent_and_skips_other_kinds() {
        let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: planner}\n";
        let dir = directory(&[
            (
                "agent.yaml",
                &format!("{deployment}---\n{}", identity("shop", "planner")),
            ),
            ("notes.txt", "not a CR file"),
        ]);
        let source = SnapshotSource::new();
        assert_eq!(load(dir.path(), None, 3, &source).unwrap(), 3);
        assert_eq!(loaded_agent(&source), "shop/planner");
    }

    #[test]
    fn picks_the_agent_by_name_or_namespace_and_name() {
        let dir = directory(&[
            ("a.yaml", &identity("shop", "planner")),
            ("b.yaml", &identity("lab", "worker")),
        ]);
        let source = SnapshotSource::new();
        load(dir.path(), Some("worker"), 1, &source).unwrap();
        assert_eq!(loaded_agent(&source), "lab/worker");
        load(dir.path(), Some("shop/planner"), 2, &source).unwrap();
        assert_eq!(loaded_agent(&source), "shop/planner");
    }

    #[test]
    fn several_agents_need_a_choice() {
        let dir = directory(&[
            ("a.yaml", &identity("shop", "planner")),
            ("b.yaml", &identity("shop", "worker")),
        ]);
        let error = load(dir.path(), None, 1, &SnapshotSource::new()).unwrap_err();
        assert!(
            matches!(
                &error,
                PolicyDirError::Identity {
                    reason: AgentChoiceError::Several(_),
                    ..
                }
            ),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .ends_with("with --agent (CHAPERONE_AGENT)"),
            "{error}"
        );
    }

    #[test]
    fn refuses_an_object_defined_twice() {
        let dir = directory(&[
            ("a.yaml", &identity("shop", "planner")),
            ("b.json", &identity("shop", "planner")),
        ]);
        let error = load(dir.path(), None, 1, &SnapshotSource::new()).unwrap_err();
        assert!(
            matches!(
                &error,
                PolicyDirError::Documents(DocumentError::Duplicate { .. })
            ),
            "{error}"
        );
    }
}
