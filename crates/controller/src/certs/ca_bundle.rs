//! The webhook's `caBundle`: the CA the API server trusts when it calls the
//! injection webhook, kept equal to the controller's CA (self-managed TLS only;
//! with cert-manager its CA injector keeps it).

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::watch;

use super::{CertError, MANAGER, TlsMaterial};

/// Keeps the caBundle of the MutatingWebhookConfiguration `webhook_config_name`
/// equal to the CA `tls` publishes: at start, on every change, and every
/// `interval` (a reinstalled configuration comes back without it). Every replica
/// may run it: they share the CA, and an up-to-date bundle is not written again.
pub fn spawn_ca_bundle_sync(
    client: Client,
    webhook_config_name: String,
    mut tls: watch::Receiver<Arc<TlsMaterial>>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ca = tls.borrow_and_update().ca_pem.clone();
            if let Err(e) = sync_ca_bundle(client.clone(), &webhook_config_name, &ca).await {
                tracing::warn!(config = %webhook_config_name, error = %e, "syncing the caBundle failed; retrying later");
            }
            tokio::select! {
                changed = tls.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(interval) => {}
            }
        }
    })
}

/// Sets `caBundle` of every webhook of the MutatingWebhookConfiguration
/// `webhook_config_name` to `ca_pem` (one JSON patch, guarded by each webhook's
/// name). Does nothing when they already carry it; logs and returns `Ok` when the
/// configuration does not exist (not installed yet, or managed elsewhere).
pub async fn sync_ca_bundle(
    client: Client,
    webhook_config_name: &str,
    ca_pem: &str,
) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let Some(config) = api.get_opt(webhook_config_name).await? else {
        tracing::info!(
            config = webhook_config_name,
            "MutatingWebhookConfiguration not found; caBundle not synced"
        );
        return Ok(());
    };
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let mut ops = Vec::new();
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref() == Some(&bundle) {
            continue;
        }
        ops.push(serde_json::json!({
            "op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook.name
        }));
        ops.push(serde_json::json!({
            "op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded
        }));
    }
    if ops.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).map_err(|e| CertError::Invalid {
            what: "caBundle patch",
            reason: e.to_string(),
        })?;
    api.patch(
        webhook_config_name,
        &PatchParams {
            field_manager: Some(MANAGER.to_string()),
            ..PatchParams::default()
        },
        &Patch::Json::<()>(patch),
    )
    .await?;
    tracing::info!(config = webhook_config_name, "caBundle updated");
    Ok(())
}
