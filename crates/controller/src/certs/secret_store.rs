//! The Secret the certificates are kept in, shared by the replicas: its four
//! PEM items, read in one GET and written back either by creating the Secret
//! or by replacing it under the `resourceVersion` it was read with, so that of
//! two replicas writing at once one gets a conflict instead of overwriting the
//! other.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, api::PostParams};

use super::{CA_CERT_KEY, CA_KEY_KEY, CertConfig, MANAGER, TLS_CERT_KEY, TLS_KEY_KEY};

/// The four PEM items of the Secret, as stored.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StoredCerts {
    /// `ca.crt`.
    pub ca_cert: Option<String>,
    /// `ca.key`.
    pub ca_key: Option<String>,
    /// `tls.crt`.
    pub tls_cert: Option<String>,
    /// `tls.key`.
    pub tls_key: Option<String>,
}

impl fmt::Debug for StoredCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredCerts")
            .field("ca_cert", &self.ca_cert.is_some())
            .field("ca_key", &self.ca_key.is_some())
            .field("tls_cert", &self.tls_cert.is_some())
            .field("tls_key", &self.tls_key.is_some())
            .finish()
    }
}

impl StoredCerts {
    /// Reads the items from a Secret's data (missing or non-UTF-8 items are `None`).
    pub fn from_secret(secret: &Secret) -> Self {
        let item = |key: &str| {
            secret
                .data
                .as_ref()
                .and_then(|data| data.get(key))
                .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
                .filter(|s| !s.trim().is_empty())
        };
        Self {
            ca_cert: item(CA_CERT_KEY),
            ca_key: item(CA_KEY_KEY),
            tls_cert: item(TLS_CERT_KEY),
            tls_key: item(TLS_KEY_KEY),
        }
    }

    fn into_data(self) -> BTreeMap<String, ByteString> {
        [
            (CA_CERT_KEY, self.ca_cert),
            (CA_KEY_KEY, self.ca_key),
            (TLS_CERT_KEY, self.tls_cert),
            (TLS_KEY_KEY, self.tls_key),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), ByteString(v.into_bytes()))))
        .collect()
    }
}

/// The Secret of `config` as it is now (`None` when it does not exist, to be
/// created) and its items (empty then).
pub(super) async fn read(
    api: &Api<Secret>,
    config: &CertConfig,
) -> Result<(Option<Secret>, StoredCerts), kube::Error> {
    let existing = api.get_opt(&config.secret_name).await?;
    let stored = existing
        .as_ref()
        .map(StoredCerts::from_secret)
        .unwrap_or_default();
    Ok((existing, stored))
}

/// Stores `stored` as the Secret of `config`: creates it when `existing` (what
/// [`read`] returned) is `None`, otherwise replaces `existing`'s data. An
/// already-exists or conflict error means another replica wrote it first.
pub(super) async fn write(
    api: &Api<Secret>,
    config: &CertConfig,
    existing: Option<Secret>,
    stored: StoredCerts,
) -> Result<(), kube::Error> {
    match existing {
        None => {
            let secret = new_secret(config, stored);
            api.create(&PostParams::default(), &secret)
                .await
                .map(|_| ())
        }
        Some(mut secret) => {
            // Keeps the resourceVersion: a concurrent writer makes this fail
            // with a conflict instead of being overwritten.
            secret.data = Some(stored.into_data());
            secret.string_data = None;
            secret.metadata.managed_fields = None;
            api.replace(&config.secret_name, &PostParams::default(), &secret)
                .await
                .map(|_| ())
        }
    }
}

fn new_secret(config: &CertConfig, stored: StoredCerts) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(config.secret_name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                MANAGER.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(stored.into_data()),
        ..Default::default()
    }
}
