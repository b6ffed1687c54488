//! Standalone mode (`--policy-dir DIR`): compile the CR YAML files of a directory
//! into this agent's snapshot, with no controller and no cluster, and recompile
//! when a file changes (polling modification times about once a second). For
//! development and demos; a broken edit keeps the last good snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chaperone_policy::model::{
    AgentIdentitySpec, DelegationGrantSpec, Document, Object, ToolPolicySpec,
};
use chaperone_policy::{CompileOptions, Inventory, compile};
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
    /// A file is not Chaperone CR YAML.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// No AgentIdentity, or several and none chosen.
    #[error("{0}")]
    Identity(String),
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
        if path.is_file() && matches!(ext, "yaml" | "yml" | "json") {
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

/// Reads every document of the directory.
pub fn read_documents(dir: &Path) -> Result<Vec<Document>, PolicyDirError> {
    let mut documents = Vec::new();
    for path in policy_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyDirError::Read {
            path: path.clone(),
            source,
        })?;
        let parsed: Vec<Document> =
            serde_saphyr::from_multiple(&text).map_err(|err| PolicyDirError::Parse {
                path: path.clone(),
                message: err.to_string(),
            })?;
        documents.extend(parsed);
    }
    Ok(documents)
}

/// Compiles the directory's snapshot for `agent` (an AgentIdentity name, needed
/// only when the directory holds several) at `version` and puts it in force.
pub fn load(
    dir: &Path,
    agent: Option<&str>,
    version: u64,
    source: &SnapshotSource,
) -> Result<u64, PolicyDirError> {
    let mut identities: Vec<Object<AgentIdentitySpec>> = Vec::new();
    let mut policies: Vec<Object<ToolPolicySpec>> = Vec::new();
    let mut grants: Vec<Object<DelegationGrantSpec>> = Vec::new();
    for document in read_documents(dir)? {
        match document {
            Document::AgentIdentity(o) => identities.push(o),
            Document::ToolPolicy(o) => policies.push(o),
            Document::DelegationGrant(o) => grants.push(o),
        }
    }
    let identity = match agent {
        Some(name) => identities
            .iter()
            .find(|i| i.metadata.name == name)
            .ok_or_else(|| {
                PolicyDirError::Identity(format!(
                    "no AgentIdentity named {name:?} in {}",
                    dir.display()
                ))
            })?,
        None => match identities.as_slice() {
            [only] => only,
            [] => {
                return Err(PolicyDirError::Identity(format!(
                    "no AgentIdentity in {}",
                    dir.display()
                )));
            }
            _ => {
                return Err(PolicyDirError::Identity(
                    "several AgentIdentities: choose one with --agent".to_owned(),
                ));
            }
        },
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let compilation = compile(
        identity,
        &Inventory {
            identities: &identities,
            policies: &policies,
            grants: &grants,
        },
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
            match load(&dir, agent.as_deref(), version, &source) {
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
