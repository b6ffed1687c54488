//! Where the binaries built by `make tools` live.
//!
//! The layout and versions are the ones `scripts/tools.sh` uses: one file,
//! `scripts/tool-versions.env`, names the versions for both.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const VERSIONS: &str = include_str!("../../scripts/tool-versions.env");

/// A tool `make tools` provides.
#[derive(Clone, Copy, Debug)]
pub enum Tool {
    /// etcd, the API server's store.
    Etcd,
    /// kube-apiserver.
    KubeApiserver,
    /// kubectl.
    Kubectl,
    /// helm 4.
    Helm,
    /// helm 3 (the chart supports both).
    Helm3,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Etcd => "etcd",
            Tool::KubeApiserver => "kube-apiserver",
            Tool::Kubectl => "kubectl",
            Tool::Helm | Tool::Helm3 => "helm",
        }
    }

    fn version_key(self) -> &'static str {
        match self {
            Tool::Etcd => "ETCD_VERSION",
            Tool::KubeApiserver => "KUBE_VERSION",
            Tool::Kubectl => "KUBECTL_VERSION",
            Tool::Helm => "HELM_VERSION",
            Tool::Helm3 => "HELM3_VERSION",
        }
    }

    fn env_override(self) -> &'static str {
        match self {
            Tool::Etcd => "CHAPERONE_ETCD",
            Tool::KubeApiserver => "CHAPERONE_KUBE_APISERVER",
            Tool::Kubectl => "CHAPERONE_KUBECTL",
            Tool::Helm => "CHAPERONE_HELM",
            Tool::Helm3 => "CHAPERONE_HELM3",
        }
    }

    /// The version `scripts/tool-versions.env` pins.
    pub fn version(self) -> &'static str {
        version_of(VERSIONS, self.version_key()).unwrap_or("unknown")
    }

    /// Path of the binary: `$CHAPERONE_<TOOL>` if set, else the tools cache.
    /// Fails with a message that says to run `make tools` when it is missing.
    pub fn path(self) -> Result<PathBuf> {
        let path = match std::env::var_os(self.env_override()) {
            Some(p) => PathBuf::from(p),
            None => tools_dir()?
                .join(self.name())
                .join(self.version())
                .join(self.name()),
        };
        if !is_executable(&path) {
            bail!(
                "{} {} not found at {}: run `make tools` first (it builds it into the tools cache)",
                self.name(),
                self.version(),
                path.display()
            );
        }
        Ok(path)
    }
}

/// `$CHAPERONE_TOOLS_DIR`, else `$XDG_CACHE_HOME/chaperone/tools`, else
/// `~/.cache/chaperone/tools`.
pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CHAPERONE_TOOLS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("chaperone").join("tools"))
}

/// The version `key` pins in `scripts/tool-versions.env`.
pub fn pinned(key: &str) -> Option<&'static str> {
    version_of(VERSIONS, key)
}

fn version_of<'a>(file: &'a str, key: &str) -> Option<&'a str> {
    file.lines()
        .filter_map(|line| line.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pinned_versions() {
        assert!(Tool::KubeApiserver.version().starts_with("v1."));
        assert!(Tool::Etcd.version().starts_with("v3."));
        assert_eq!(version_of("A=1\n# c\nB = 2\n", "B"), Some("2"));
        assert_eq!(version_of("A=1\n", "B"), None);
    }
}
