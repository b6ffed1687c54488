//! Keeps the public key of every sidecar connected to this replica, agent and
//! tool mode, in the audit-key archive ([`chaperone_api::audit_keys`] defines
//! its ConfigMaps and entries), so that audit trails verify strictly after
//! their pods are gone.
//!
//! The snapshot server hands each key a stream registers to
//! [`AuditKeyArchive::register`] and holds the returned [`ArchivedKeyHold`]
//! while the stream lasts. [`AuditKeyArchive::run`] writes every key into
//! the ConfigMap of each UTC month it is held in (when it is registered, at
//! the first round of a new month, and once more if its last stream ends in
//! a month it was not written in yet), batched per agent namespace, about a
//! second after a change and at least every minute; a failed write is
//! retried with backoff. The leader deletes, every hour, the ConfigMaps of
//! months whose last day is older than the retention.
//!
//! What the archive trusts: a [`ProvenKey`], from a stream the controller
//! authenticated as its pod (TokenReview), whose sidecar proved it holds the
//! key, under the kid derived from it
//! ([`crate::snapshot_server::wire::SigningKey::check_possession`]), so one
//! kid names one key. An entry, once written, is never replaced: a second pod
//! holding the same key (a stolen private key) is refused and counted, never
//! archived over the first.
//!
//! The pure parts ([`plan_write`], [`expired`], [`month_of`]) are apart from the
//! loop doing I/O.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chaperone_api::audit_keys::{
    ArchivedKey, COMPONENT_LABEL, MAX_DATA_BYTES, MONTH_LABEL, NAMESPACE_LABEL, config_map_name,
};
use chaperone_policy::AgentKey;
use k8s_openapi::{api::core::v1::ConfigMap, jiff::civil::Date};
use kube::{
    Api,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;
use thiserror::Error;
use tokio::sync::{Notify, watch};

use crate::{metrics::Metrics, snapshot_server::wire::ProvenKey};

/// How long after a change the archive writes (so that sidecars connecting
/// together are written together).
const DEBOUNCE: Duration = Duration::from_secs(1);
/// The longest wait between two rounds (a new month starts within it).
const ROUND: Duration = Duration::from_secs(60);
/// The first wait after a failed write; doubled up to [`ROUND`]·5.
const RETRY_FIRST: Duration = Duration::from_secs(5);
/// How often the leader deletes expired months.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Shards tried per month and namespace before a write gives up.
const MAX_SHARDS: u32 = 64;
/// Tries of one shard when other writers change it in between.
const CONFLICT_TRIES: usize = 5;

/// Why a key is not archived.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Unarchivable {
    /// Another pod holds (or held) this key.
    #[error("the key is already archived for pod {0}")]
    ClaimedByAnotherPod(String),
    /// The pod registered more keys this month than a sidecar makes.
    #[error("pod {0} registered more than {MAX_KEYS_PER_POD} keys this month")]
    TooManyKeys(String),
}

/// At most this many keys of one pod (by uid) are archived per month by one
/// replica. A sidecar makes one key per start, so this is many restarts; a
/// compromised pod reconnecting with fresh keys cannot grow the archive
/// without bound.
pub const MAX_KEYS_PER_POD: usize = 32;

/// One key this replica holds for the archive.
#[derive(Debug)]
struct Held {
    entry: ArchivedKey,
    /// The pod's namespace (the archive's ConfigMaps are per namespace).
    namespace: String,
    /// Streams holding it now.
    streams: usize,
    /// The last month (`YYYY-MM`) it was written in.
    written: Option<String>,
}

/// The keys of this replica's sidecars, and the writer of their archive.
pub struct AuditKeyArchive {
    held: Mutex<BTreeMap<String, Held>>,
    /// Keys archived per pod uid in the month named first.
    per_pod: Mutex<(String, BTreeMap<String, usize>)>,
    wake: Notify,
    metrics: Arc<Metrics>,
}

/// A stream's hold on its key: the key is written in each month the hold
/// lasts, and in the month it is dropped.
pub struct ArchivedKeyHold {
    archive: Arc<AuditKeyArchive>,
    kid: String,
}

impl Drop for ArchivedKeyHold {
    fn drop(&mut self) {
        let mut held = self.archive.lock();
        if let Some(key) = held.get_mut(&self.kid) {
            key.streams = key.streams.saturating_sub(1);
        }
        drop(held);
        self.archive.wake.notify_one();
    }
}

impl AuditKeyArchive {
    /// An archive holding nothing yet.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::default(),
            per_pod: Mutex::default(),
            wake: Notify::new(),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream of pod `namespace/pod` (uid `pod_uid`; of `agent`, `None` in
    /// tool mode) registered `key`: hold it for the archive while the
    /// returned hold lives. Refused (and counted) when another pod holds the
    /// key or the pod registered [`MAX_KEYS_PER_POD`] keys this month.
    pub fn register(
        self: &Arc<Self>,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
        agent: Option<&AgentKey>,
        key: &ProvenKey,
    ) -> Result<ArchivedKeyHold, Unarchivable> {
        let entry = ArchivedKey::new(
            &key.kid,
            &key.x,
            namespace,
            pod,
            pod_uid,
            agent.map(|a| format!("{}/{}", a.namespace, a.name)),
        );
        let refused = 'hold: {
            let mut held = self.lock();
            match held.get_mut(&key.kid) {
                Some(known) if known.entry != entry => {
                    break 'hold Unarchivable::ClaimedByAnotherPod(known.entry.pod.clone());
                }
                Some(known) => known.streams += 1,
                None => {
                    if self
                        .count_key_of(pod_uid, &month_of(crate::unix_now()))
                        .is_err()
                    {
                        break 'hold Unarchivable::TooManyKeys(format!("{namespace}/{pod}"));
                    }
                    held.insert(
                        key.kid.clone(),
                        Held {
                            entry,
                            namespace: namespace.to_owned(),
                            streams: 1,
                            written: None,
                        },
                    );
                }
            }
            drop(held);
            self.wake.notify_one();
            return Ok(ArchivedKeyHold {
                archive: Arc::clone(self),
                kid: key.kid.clone(),
            });
        };
        self.metrics.audit_key_refused();
        Err(refused)
    }

    /// Counts a new key of `pod_uid` in `month`; `Err` past
    /// [`MAX_KEYS_PER_POD`].
    fn count_key_of(&self, pod_uid: &str, month: &str) -> Result<(), ()> {
        let mut per_pod = self.per_pod.lock().unwrap_or_else(|p| p.into_inner());
        if per_pod.0 != month {
            *per_pod = (month.to_owned(), BTreeMap::new());
        }
        let count = per_pod.1.entry(pod_uid.to_owned()).or_default();
        if *count >= MAX_KEYS_PER_POD {
            return Err(());
        }
        *count += 1;
        Ok(())
    }

    /// The keys not yet written in `month`, by namespace.
    fn due(&self, month: &str) -> BTreeMap<String, Vec<ArchivedKey>> {
        let mut due: BTreeMap<String, Vec<ArchivedKey>> = BTreeMap::new();
        for held in self.lock().values() {
            if held.written.as_deref() != Some(month) {
                due.entry(held.namespace.clone())
                    .or_default()
                    .push(held.entry.clone());
            }
        }
        due
    }

    /// `kids` are written in `month`: keys no stream holds any more are done.
    fn written(&self, month: &str, kids: &[String]) {
        let mut held = self.lock();
        for kid in kids {
            if let Some(key) = held.get_mut(kid) {
                key.written = Some(month.to_owned());
            }
        }
        held.retain(|_, key| key.streams > 0 || key.written.as_deref() != Some(month));
    }

    /// Writes the held keys into the archive in ConfigMaps of `namespace`
    /// (the controller's), and, while this replica leads, deletes the months
    /// older than `retention_days`. Runs until dropped.
    pub async fn run(
        self: Arc<Self>,
        client: kube::Client,
        namespace: String,
        retention_days: u16,
        mut leader: watch::Receiver<bool>,
    ) {
        let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
        let mut retry = RETRY_FIRST;
        let mut pruned_at: Option<tokio::time::Instant> = None;
        loop {
            let now = crate::unix_now();
            let (today, month) = (day_of(now), month_of(now));
            let mut failed = false;
            for (pod_namespace, keys) in self.due(&month) {
                match write_month(&api, &namespace, &month, &pod_namespace, keys).await {
                    Ok(outcome) => {
                        self.metrics.audit_keys_archived(outcome.added);
                        for (kid, archived_for) in &outcome.claimed {
                            self.metrics.audit_key_refused();
                            tracing::warn!(kid, archived_for, namespace = %pod_namespace, "a sidecar registered a key whose kid the archive holds for another pod or key: not archived over it");
                        }
                        self.written(&month, &outcome.kids);
                    }
                    Err(error) => {
                        failed = true;
                        self.metrics.audit_key_archive_failed();
                        tracing::warn!(%error, namespace = %pod_namespace, retry_in = ?retry, "could not archive sidecars' audit keys");
                    }
                }
            }
            let leading = *leader.borrow_and_update();
            if leading && pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                match prune(&api, today, retention_days).await {
                    Ok(deleted) => {
                        pruned_at = Some(tokio::time::Instant::now());
                        if !deleted.is_empty() {
                            tracing::info!(
                                ?deleted,
                                retention_days,
                                "deleted expired months of the audit-key archive"
                            );
                        }
                    }
                    Err(error) => {
                        failed = true;
                        self.metrics.audit_key_archive_failed();
                        tracing::warn!(%error, "could not delete expired months of the audit-key archive");
                    }
                }
            }
            let wait = if failed {
                let wait = retry;
                retry = (retry * 2).min(ROUND * 5);
                wait
            } else {
                retry = RETRY_FIRST;
                ROUND
            };
            tokio::select! {
                () = self.wake.notified() => tokio::time::sleep(DEBOUNCE).await,
                () = tokio::time::sleep(wait) => {}
                // Ends only with the leader election (then the controller
                // stops): the next round sees the new leadership at once.
                Ok(()) = leader.changed() => {}
            }
        }
    }
}

/// The UTC day of `unix_seconds`.
pub fn day_of(unix_seconds: i64) -> Date {
    k8s_openapi::jiff::Timestamp::from_second(unix_seconds)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC)
        .date()
}

/// The UTC month of `unix_seconds`, `YYYY-MM` (the archive's [`MONTH_LABEL`]).
pub fn month_of(unix_seconds: i64) -> String {
    let day = day_of(unix_seconds);
    format!("{:04}-{:02}", day.year(), day.month())
}

/// Whether the archive ConfigMap of `month` (its [`MONTH_LABEL`]) is
/// expired on `today`: the month's last day is more than `retention_days`
/// before it. A label that is not a month is kept.
pub fn expired(month: &str, today: Date, retention_days: u16) -> bool {
    let Ok(first) = format!("{month}-01").parse::<Date>() else {
        return false;
    };
    let last = first.last_of_month();
    today
        .checked_sub(k8s_openapi::jiff::Span::new().days(i64::from(retention_days)))
        .is_ok_and(|oldest_kept| last < oldest_kept)
}

/// What to do with one shard whose entries are `existing`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShardPlan {
    /// Entries to add, by kid.
    pub add: BTreeMap<String, String>,
    /// Keys already there, as they are.
    pub present: Vec<String>,
    /// Keys whose kid the shard holds for another pod or key: (kid, that pod).
    pub claimed: Vec<(String, String)>,
    /// Keys that do not fit: for the next shard.
    pub overflow: Vec<ArchivedKey>,
}

/// How `keys` go into a shard holding `existing`: what is already there is
/// left as it is (an entry is never replaced), what fits under
/// [`MAX_DATA_BYTES`] is added, the rest overflows.
pub fn plan_write(existing: &BTreeMap<String, String>, keys: Vec<ArchivedKey>) -> ShardPlan {
    let mut plan = ShardPlan::default();
    let mut size: usize = existing.iter().map(|(k, v)| k.len() + v.len()).sum();
    for key in keys {
        let text = key.to_json();
        match existing.get(&key.kid) {
            Some(archived) if *archived == text => plan.present.push(key.kid),
            Some(archived) => {
                let pod = serde_json::from_str::<ArchivedKey>(archived)
                    .map_or_else(|_| "(unreadable entry)".to_owned(), |k| k.pod);
                plan.claimed.push((key.kid, pod));
            }
            None if size + key.kid.len() + text.len() > MAX_DATA_BYTES => plan.overflow.push(key),
            None => {
                size += key.kid.len() + text.len();
                plan.add.insert(key.kid, text);
            }
        }
    }
    plan
}

/// What writing one month of one namespace did.
#[derive(Debug, Default)]
pub struct WriteOutcome {
    /// Keys done for that month: archived (added or already there) or refused.
    pub kids: Vec<String>,
    /// Entries added.
    pub added: u64,
    /// Keys refused: (kid, the pod the archive holds it for).
    pub claimed: Vec<(String, String)>,
}

/// Why keys could not be written into the archive.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The API server refused or did not answer.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// Every shard of the month is full.
    #[error("{0} keys do not fit into {MAX_SHARDS} ConfigMaps of one month")]
    Full(usize),
    /// Other writers changed the ConfigMap between each read and write.
    #[error("{0} kept changing while being written")]
    Contended(String),
}

/// Writes `keys` of pods in `pod_namespace` into the shards of `month`
/// (ConfigMaps of `api`, in `namespace`): creates what is missing, adds to
/// what exists, never replaces an entry.
pub async fn write_month(
    api: &Api<ConfigMap>,
    namespace: &str,
    month: &str,
    pod_namespace: &str,
    mut keys: Vec<ArchivedKey>,
) -> Result<WriteOutcome, WriteError> {
    let mut outcome = WriteOutcome::default();
    for shard in 0..MAX_SHARDS {
        if keys.is_empty() {
            return Ok(outcome);
        }
        let name = config_map_name(month, pod_namespace, shard);
        let plan = write_shard(api, namespace, &name, month, pod_namespace, keys).await?;
        outcome.added += plan.add.len() as u64;
        outcome.kids.extend(plan.add.into_keys());
        outcome.kids.extend(plan.present);
        outcome
            .kids
            .extend(plan.claimed.iter().map(|(kid, _)| kid.clone()));
        outcome.claimed.extend(plan.claimed);
        keys = plan.overflow;
    }
    if keys.is_empty() {
        Ok(outcome)
    } else {
        Err(WriteError::Full(keys.len()))
    }
}

/// Adds what fits of `keys` to the ConfigMap `name`, creating it if absent;
/// a write that raced another writer is planned again.
async fn write_shard(
    api: &Api<ConfigMap>,
    namespace: &str,
    name: &str,
    month: &str,
    pod_namespace: &str,
    keys: Vec<ArchivedKey>,
) -> Result<ShardPlan, WriteError> {
    for _ in 0..CONFLICT_TRIES {
        let existing = api.get_opt(name).await?;
        let data = existing
            .as_ref()
            .and_then(|cm| cm.data.clone())
            .unwrap_or_default();
        let plan = plan_write(&data, keys.clone());
        if plan.add.is_empty() {
            return Ok(plan);
        }
        let written = match existing {
            None => api
                .create(
                    &PostParams::default(),
                    &new_config_map(namespace, name, month, pod_namespace, plan.add.clone()),
                )
                .await
                .map(drop),
            Some(cm) => {
                // The resourceVersion makes the patch conditional: entries
                // another writer added in between are planned with.
                let patch = json!({
                    "metadata": { "resourceVersion": cm.metadata.resource_version },
                    "data": plan.add,
                });
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop)
            }
        };
        match written {
            Ok(()) => return Ok(plan),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(WriteError::Contended(name.to_owned()))
}

/// A new archive ConfigMap holding `data`.
fn new_config_map(
    namespace: &str,
    name: &str,
    month: &str,
    pod_namespace: &str,
    data: BTreeMap<String, String>,
) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(crate::config_map_labels(
                COMPONENT_LABEL.1,
                [(MONTH_LABEL, month), (NAMESPACE_LABEL, pod_namespace)],
            )),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

/// Deletes the archive's ConfigMaps of months expired on `today`
/// ([`expired`]); returns their names.
pub async fn prune(
    api: &Api<ConfigMap>,
    today: Date,
    retention_days: u16,
) -> Result<Vec<String>, kube::Error> {
    let selector = format!("{}={}", COMPONENT_LABEL.0, COMPONENT_LABEL.1);
    let listed = api
        .list_metadata(&ListParams::default().labels(&selector))
        .await?;
    let mut deleted = Vec::new();
    for cm in listed {
        let month = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(MONTH_LABEL))
            .cloned()
            .unwrap_or_default();
        if !expired(&month, today, retention_days) {
            continue;
        }
        let name = cm.metadata.name.unwrap_or_default();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => deleted.push(name),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
#[path = "audit_key_archive_tests.rs"]
mod tests;
