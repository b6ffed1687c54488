//! Watches the three Chaperone kinds and feeds the [`Index`]: the thin I/O shell
//! around it. Converts each CR into the policy model's `Object` at this edge.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chaperone_api::{AgentIdentity, DelegationGrant, ToolPolicy, approval::ToolCallApproval};
use chaperone_policy::model::{self, Object};
use futures_util::{FutureExt, StreamExt};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;

use crate::{
    Error,
    index::{Index, SharedIndex},
    metrics::{Metrics, ReconcileResult},
};

/// Fails fast, with what to do, when the CRDs are not installed.
pub async fn check_crds_installed(client: &Client) -> Result<(), Error> {
    async fn check<K>(client: &Client) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        match Api::<K>::all(client.clone())
            .list_metadata(&ListParams::default().limit(1))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                Err(Error::CrdMissing(K::crd_name()))
            }
            Err(e) => Err(Error::Kube(e)),
        }
    }
    check::<AgentIdentity>(client).await?;
    check::<ToolPolicy>(client).await?;
    check::<DelegationGrant>(client).await?;
    check::<ToolCallApproval>(client).await
}

trait CrdName {
    fn crd_name() -> String;
}

impl<K: Resource<DynamicType = ()>> CrdName for K {
    fn crd_name() -> String {
        format!("{}.{}", K::plural(&()), K::group(&()))
    }
}

/// Runs the three watches until the process ends, counting each batch
/// applied to the index in `metrics`.
pub async fn run(client: Client, shared: Arc<SharedIndex>, metrics: Arc<Metrics>) {
    let watch = |kind| Watch {
        client: client.clone(),
        shared: shared.clone(),
        metrics: metrics.clone(),
        kind,
    };
    tokio::join!(
        watch_kind::<AgentIdentity>(watch(Kind::Identity), |o| {
            ModelObject::Identity(model_object(o, |o| o.spec.0.clone()))
        }),
        watch_kind::<ToolPolicy>(watch(Kind::Policy), |o| {
            ModelObject::Policy(model_object(o, |o| o.spec.0.clone()))
        }),
        watch_kind::<DelegationGrant>(watch(Kind::Grant), |o| {
            ModelObject::Grant(model_object(o, |o| o.spec.0.clone()))
        }),
    );
}

#[derive(Clone, Copy)]
enum Kind {
    Identity,
    Policy,
    Grant,
}

impl Kind {
    /// The kind's name, for metrics.
    fn as_str(self) -> &'static str {
        match self {
            Kind::Identity => "AgentIdentity",
            Kind::Policy => "ToolPolicy",
            Kind::Grant => "DelegationGrant",
        }
    }
}

/// What one kind's watch works with.
struct Watch {
    client: Client,
    shared: Arc<SharedIndex>,
    metrics: Arc<Metrics>,
    kind: Kind,
}

/// A model object of any of the three kinds, so one loop handles all three.
enum ModelObject {
    Identity(Object<model::AgentIdentitySpec>),
    Policy(Object<model::ToolPolicySpec>),
    Grant(Object<model::DelegationGrantSpec>),
}

async fn watch_kind<K>(watch: Watch, to_model: fn(&K) -> ModelObject)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let Watch {
        client,
        shared,
        metrics,
        kind,
    } = watch;
    // Its error count exists at 0 from the start, so that the first failure
    // is an increase (`rate`, `increase`, alerts) and not a new series.
    metrics.watch_started(kind.as_str());
    let api = Api::<K>::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut buffer: Vec<ModelObject> = Vec::new();
    let mut first_sync = true;
    while let Some(event) = stream.next().await {
        // The events already received go in one batch: a burst of creates
        // costs one recompilation per namespace, not one per object.
        let mut events = vec![event];
        while events.len() < MAX_BATCH {
            match stream.next().now_or_never() {
                Some(Some(event)) => events.push(event),
                _ => break,
            }
        }
        let now = crate::unix_now();
        let mut changes: Vec<Change> = Vec::new();
        for event in events {
            match event {
                Ok(watcher::Event::Apply(object)) => {
                    changes.push(Change::Apply(Box::new(to_model(&object))));
                }
                Ok(watcher::Event::Delete(object)) => {
                    changes.push(Change::Delete(chaperone_policy::ObjectKey::new(
                        object.namespace().unwrap_or_else(|| "default".into()),
                        object.name_any(),
                    )))
                }
                Ok(watcher::Event::Init) => buffer.clear(),
                Ok(watcher::Event::InitApply(object)) => buffer.push(to_model(&object)),
                Ok(watcher::Event::InitDone) => {
                    let objects = std::mem::take(&mut buffer);
                    changes.push(Change::Reset(objects));
                }
                Err(error) => {
                    metrics.watch_failed(kind.as_str());
                    tracing::warn!(%error, "watch failed; retrying with backoff");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let synced = changes.iter().any(|c| matches!(c, Change::Reset(_)));
        if !changes.is_empty() {
            let started = Instant::now();
            let changed = shared.update(|index| {
                index.batch(now, |index| {
                    for change in changes {
                        match change {
                            Change::Apply(object) => apply(index, *object, now),
                            Change::Delete(key) => match kind {
                                Kind::Identity => index.delete_identity(&key, now),
                                Kind::Policy => index.delete_policy(&key, now),
                                Kind::Grant => index.delete_grant(&key, now),
                            },
                            Change::Reset(objects) => reset(index, kind, objects, now),
                        }
                    }
                });
            });
            let result = if changed {
                ReconcileResult::Changed
            } else {
                ReconcileResult::Unchanged
            };
            metrics.reconciled(kind.as_str(), result, started.elapsed());
        }
        if synced && first_sync {
            first_sync = false;
            shared.kind_synced();
        }
    }
}

/// Watch events handled in one batch at most.
const MAX_BATCH: usize = 1024;

/// One watch event's change to the index, in the order received.
enum Change {
    Apply(Box<ModelObject>),
    Delete(chaperone_policy::ObjectKey),
    /// A complete re-list.
    Reset(Vec<ModelObject>),
}

fn apply(index: &mut Index, object: ModelObject, now: i64) {
    match object {
        ModelObject::Identity(o) => index.apply_identity(o, now),
        ModelObject::Policy(o) => index.apply_policy(o, now),
        ModelObject::Grant(o) => index.apply_grant(o, now),
    }
}

fn reset(index: &mut Index, kind: Kind, objects: Vec<ModelObject>, now: i64) {
    match kind {
        Kind::Identity => index.reset_identities(
            objects
                .into_iter()
                .filter_map(|o| {
                    if let ModelObject::Identity(o) = o {
                        Some(o)
                    } else {
                        None
                    }
                })
                .collect(),
            now,
        ),
        Kind::Policy => index.reset_policies(
            objects
                .into_iter()
                .filter_map(|o| {
                    if let ModelObject::Policy(o) = o {
                        Some(o)
                    } else {
                        None
                    }
                })
                .collect(),
            now,
        ),
        Kind::Grant => index.reset_grants(
            objects
                .into_iter()
                .filter_map(|o| {
                    if let ModelObject::Grant(o) = o {
                        Some(o)
                    } else {
                        None
                    }
                })
                .collect(),
            now,
        ),
    }
}

/// The policy model's view of a CR: metadata the compiler reads, and the spec.
pub fn model_object<K: Resource, S>(object: &K, spec: impl Fn(&K) -> S) -> Object<S> {
    let meta = object.meta();
    Object {
        api_version: model::API_VERSION.to_owned(),
        metadata: model::ObjectMeta {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone().unwrap_or_default(),
            generation: meta.generation,
            creation_timestamp: meta.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        },
        spec: spec(object),
    }
}

/// Ends the snapshot streams of deleted pods, so their signing keys leave the
/// JWKS even if the sidecar's connection lingers; a deleted pod connected to
/// another replica leaves this replica's JWKS at once too.
pub async fn watch_pod_deletions(client: Client, sidecars: Arc<crate::sidecars::SidecarRegistry>) {
    // Metadata only: the name, uid and deletion timestamp are all it reads.
    let api = Api::<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Pod>>::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Delete(pod)) => pod_deleted(&sidecars, &pod),
            Ok(watcher::Event::Apply(pod)) if pod.metadata.deletion_timestamp.is_some() => {
                pod_deleted(&sidecars, &pod);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "pod watch failed; retrying with backoff"),
        }
    }
}

fn pod_deleted(
    sidecars: &crate::sidecars::SidecarRegistry,
    pod: &kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Pod>,
) {
    sidecars.evict(&pod.namespace().unwrap_or_default(), &pod.name_any());
    if let Some(uid) = &pod.metadata.uid {
        sidecars.forget_peer_pod(uid, crate::unix_now());
    }
}
